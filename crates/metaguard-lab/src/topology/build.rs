//! Building the lab: namespaces, links, addresses, sysctls, the ecs-init
//! and Docker NAT rules, cgroups, and the emulators' servers.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;

use metaguard_sys::netns::Netns;

use crate::agent::AgentEmulator;
use crate::cmd;
use crate::host_rules;
use crate::registry::NETNS_PREFIX;
use crate::servers::{self, Bind, ServerThread};
use crate::LabError;

use super::{addr, Lab, Role, Workload};

impl Lab {
    pub(super) fn ns_by_name(&self, role: Role) -> Result<Netns, LabError> {
        Ok(Netns::open_not_root(
            Path::new(metaguard_sys::netns::NETNS_RUN_DIR).join(self.netns_name(role)),
        )?)
    }

    pub(super) fn build(&mut self) -> Result<(), LabError> {
        let work = self.work_dir().to_path_buf();
        std::fs::create_dir_all(&work).map_err(|source| LabError::Io {
            what: "create",
            path: work.clone(),
            source,
        })?;
        for &role in self.roles() {
            let name = self.netns_name(role);
            let ns = create_netns(&name)?;
            self.netns.push((role, ns));
        }
        self.build_vpc()?;
        self.build_sysctls()?;
        if !self.opts.bare_host {
            self.build_links()?;
            if self.opts.ecs_init {
                self.install_ecs_init()?;
            }
            self.install_docker_nat()?;
            self.build_cgroups()?;
        }
        self.build_etc_hosts()?;
        self.start_servers()?;
        Ok(())
    }

    /// The VPC (its switch and router, the metadata addresses) and the
    /// host's link into it: what every lab has.
    pub(super) fn build_vpc(&self) -> Result<(), LabError> {
        let host = self.netns_name(Role::Host);
        // Each veth is created here with its peer placed straight into the
        // other lab namespace: no end ever exists in the root namespace.
        // Bridges get a fixed MAC, as dockerd gives docker0: a bridge
        // without one takes its lowest port's, so a port added later could
        // change it and leave neighbours' ARP entries stale for seconds.
        let vpc = format!(
            "link set lo up
addr add 169.254.169.254/32 dev lo
addr add fd00:ec2::254/128 dev lo nodad
link add vpcbr address 02:42:0a:00:00:01 type bridge
addr add 10.0.0.1/24 dev vpcbr
addr add fd00:10::1/64 dev vpcbr nodad
link set vpcbr up
link add vpc-host type veth peer name eth0 netns {host}
link set vpc-host master vpcbr up
route add fd00:17::/64 via fd00:10::10
"
        );
        cmd::ip_batch(self.netns(Role::Vpc), &vpc)?;
        let hostscript = "link set lo up
link set eth0 up
addr add 10.0.0.10/24 dev eth0
addr add fd00:10::10/64 dev eth0 nodad
route add default via 10.0.0.1
route add default via fd00:10::1
";
        cmd::ip_batch(self.netns(Role::Host), hostscript)
    }

    /// The emulated ECS host's own network: docker0 with two bridge
    /// containers, ecs-bridge, and the awsvpc task with its ENI.
    pub(super) fn build_links(&self) -> Result<(), LabError> {
        let c1 = self.netns_name(Role::C1);
        let c2 = self.netns_name(Role::C2);
        let task = self.netns_name(Role::Task1);
        let vpc = format!(
            "link add vpc-task1 type veth peer name eth0 netns {task}
link set vpc-task1 master vpcbr up
"
        );
        cmd::ip_batch(self.netns(Role::Vpc), &vpc)?;
        let hostscript = format!(
            "link add docker0 address 02:42:ac:11:00:01 type bridge
addr add 172.17.0.1/16 dev docker0
addr add fd00:17::1/64 dev docker0 nodad
link set docker0 up
link add ecs-bridge address 02:42:a9:fe:ac:01 type bridge
addr add 169.254.172.1/22 dev ecs-bridge
link set ecs-bridge up
link add vethc1 type veth peer name eth0 netns {c1}
link set vethc1 master docker0 up
link add vethc2 type veth peer name eth0 netns {c2}
link set vethc2 master docker0 up
link add vethtask1 type veth peer name ecs-eth0 netns {task}
link set vethtask1 master ecs-bridge up
"
        );
        cmd::ip_batch(self.netns(Role::Host), &hostscript)?;
        for (role, v4, v6) in [
            (Role::C1, addr::C1_V4.to_string(), "fd00:17::2"),
            (Role::C2, "172.17.0.3".to_string(), "fd00:17::3"),
        ] {
            let script = format!(
                "link set lo up
link set eth0 up
addr add {v4}/16 dev eth0
addr add {v6}/64 dev eth0 nodad
route add default via 172.17.0.1
route add default via fd00:17::1
"
            );
            cmd::ip_batch(self.netns(role), &script)?;
        }
        // The ECS CNI plugins' layout: the ENI carries the default route;
        // ecs-eth0 reaches only the credentials endpoint via ecs-bridge.
        let taskscript = "link set lo up
link set eth0 up
addr add 10.0.0.20/24 dev eth0
addr add fd00:10::20/64 dev eth0 nodad
route add default via 10.0.0.1
route add default via fd00:10::1
link set ecs-eth0 up
addr add 169.254.172.2/22 dev ecs-eth0
route add 169.254.170.2/32 via 169.254.172.1 dev ecs-eth0
";
        cmd::ip_batch(self.netns(Role::Task1), taskscript)?;
        Ok(())
    }

    pub(super) fn sysctl(&self, role: Role, settings: &[&str]) -> Result<(), LabError> {
        let mut args = vec!["-q", "-w"];
        args.extend_from_slice(settings);
        cmd::run(Some(self.netns(role)), "sysctl", &args, None).map(drop)
    }

    pub(super) fn build_sysctls(&self) -> Result<(), LabError> {
        // Namespaced sysctls, written from inside each lab namespace. A
        // bare host's own Docker turns forwarding on, as dockerd does.
        if !self.opts.bare_host {
            self.sysctl(
                Role::Host,
                &["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"],
            )?;
        }
        self.sysctl(
            Role::Vpc,
            &["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"],
        )?;
        Ok(())
    }

    /// What ecs-init installs on an ECS container instance
    /// ([`host_rules::ecs_init`] and `route_localnet=1`).
    pub(super) fn install_ecs_init(&self) -> Result<(), LabError> {
        let ns = self.netns(Role::Host);
        for rule in &host_rules::ecs_init() {
            cmd::run(Some(ns), "iptables", &host_rules::args("-A", rule), None)?;
        }
        self.sysctl(Role::Host, &["net.ipv4.conf.all.route_localnet=1"])
    }

    /// What dockerd installs for docker0 ([`host_rules::docker_nat`]).
    pub fn install_docker_nat(&self) -> Result<(), LabError> {
        cmd::run(
            Some(self.netns(Role::Host)),
            "iptables",
            &host_rules::args("-A", &host_rules::docker_nat()),
            None,
        )
        .map(drop)
    }

    pub(super) fn build_cgroups(&self) -> Result<(), LabError> {
        for w in Workload::ALL {
            self.cgroup.create(&self.cgroup_of(w))?;
        }
        Ok(())
    }

    /// `ip netns exec` bind-mounts `/etc/netns/<name>/hosts` over
    /// `/etc/hosts`: lab workloads resolve `instance-data` like EC2's DNS.
    pub(super) fn build_etc_hosts(&self) -> Result<(), LabError> {
        for dir in &self.record.etc_netns {
            std::fs::create_dir_all(dir).map_err(|source| LabError::Io {
                what: "create",
                path: dir.clone(),
                source,
            })?;
            let hosts = "127.0.0.1 localhost\n::1 localhost ip6-localhost\n169.254.169.254 instance-data instance-data.ec2.internal\n";
            std::fs::write(dir.join("hosts"), hosts).map_err(|source| LabError::Io {
                what: "write",
                path: dir.join("hosts"),
                source,
            })?;
        }
        Ok(())
    }

    pub(super) fn start_servers(&mut self) -> Result<(), LabError> {
        let imds_binds = vec![
            Bind::Tcp(SocketAddr::new(IpAddr::V4(addr::IMDS_V4), 80)),
            Bind::Tcp(SocketAddr::new(IpAddr::V6(addr::IMDS_V6), 80)),
        ];
        let imds = self.imds.clone();
        let vpc = self.netns(Role::Vpc);
        let s = ServerThread::start(vpc, "lab-imds", imds_binds, move |bound| async move {
            let mut set = tokio::task::JoinSet::new();
            for b in bound {
                if let servers::Bound::Tcp(l) = b {
                    let imds = imds.clone();
                    set.spawn_local(async move {
                        if let Ok(l) = tokio::net::TcpListener::from_std(l) {
                            let _ = imds.serve(l).await;
                        }
                    });
                }
            }
            while set.join_next().await.is_some() {}
        })?;
        self.servers.push(s);

        let mut echo_binds = Vec::new();
        for ip in [
            IpAddr::V4(addr::IMDS_V4),
            IpAddr::V6(addr::IMDS_V6),
            IpAddr::V4(addr::VPC_GW_V4),
            IpAddr::V6(addr::VPC_GW_V6),
        ] {
            echo_binds.push(Bind::Tcp(SocketAddr::new(ip, addr::ECHO_TCP_PORT)));
            echo_binds.push(Bind::Udp(SocketAddr::new(ip, addr::ECHO_UDP_PORT)));
        }
        let log = self.echo_log.clone();
        let s = ServerThread::start(
            self.netns(Role::Vpc),
            "lab-echo",
            echo_binds,
            move |bound| servers::echo(bound, log),
        )?;
        self.servers.push(s);

        if self.opts.bare_host {
            // The host's own init runs the agent.
            return Ok(());
        }
        for w in Workload::ALL {
            self.agent.add_credentials(
                w.credentials_id(),
                &format!(
                    "arn:aws:iam::111122223333:role/lab-{}",
                    w.cgroup_suffix().replace('/', "-")
                ),
            );
        }
        let agent = self.agent.clone();
        self.serve_agent(
            &agent,
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr::AGENT_PORT),
        )
    }

    /// Serves `agent` on `at` in the lab's host namespace until the lab is
    /// torn down: the lab's own agent, or a second one (e.g. for a config
    /// whose `[agent] credentials` moves).
    pub fn serve_agent(&mut self, agent: &AgentEmulator, at: SocketAddr) -> Result<(), LabError> {
        let name = match at.port() {
            addr::AGENT_PORT => "lab-agent".to_string(),
            port => format!("lab-agent-{port}"),
        };
        let ns = self.ns_by_name(Role::Host)?;
        self.serve_agent_on(&ns, &name, agent, at)
    }

    /// Serves `agent` on `at` in lab namespace `netns_name` (e.g. one from
    /// [`Lab::add_netns`], or a container's: the ECS agent on a bridge).
    pub fn serve_agent_in(
        &mut self,
        netns_name: &str,
        agent: &AgentEmulator,
        at: SocketAddr,
    ) -> Result<(), LabError> {
        let ns =
            Netns::open_not_root(Path::new(metaguard_sys::netns::NETNS_RUN_DIR).join(netns_name))?;
        self.serve_agent_on(&ns, &format!("lab-agent-{}", at.ip()), agent, at)
    }

    fn serve_agent_on(
        &mut self,
        ns: &Netns,
        name: &str,
        agent: &AgentEmulator,
        at: SocketAddr,
    ) -> Result<(), LabError> {
        let agent = agent.clone();
        let s = ServerThread::start(ns, name, vec![Bind::Tcp(at)], move |bound| async move {
            for b in bound {
                if let servers::Bound::Tcp(l) = b {
                    if let Ok(l) = tokio::net::TcpListener::from_std(l) {
                        let _ = agent.serve(l).await;
                    }
                }
            }
        })?;
        self.servers.push(s);
        Ok(())
    }

    /// Creates one more lab namespace, `mglab-<id>-<suffix>` (recorded, so
    /// it is removed with the lab), and returns its name.
    pub fn add_netns(&mut self, suffix: &str) -> Result<String, LabError> {
        let name = format!("{NETNS_PREFIX}{}-{suffix}", self.record.id);
        self.record.netns.push(name.clone());
        self.save_record()?;
        let ns = create_netns(&name)?;
        cmd::ip_batch(&ns, "link set lo up\n")?;
        Ok(name)
    }

    /// A namespace of the lab's own (`add_netns(suffix)`) plugged into
    /// docker0 as a CNI plugin would plug one that no Docker API lists:
    /// host end `veth` on docker0, `eth0` inside with `addr_v4` (a
    /// `/16` of docker0's subnet) and the default route via docker0's
    /// address. Returns its name.
    pub fn add_docker0_netns(
        &mut self,
        suffix: &str,
        veth: &str,
        addr_v4: &str,
    ) -> Result<String, LabError> {
        let ns = self.add_netns(suffix)?;
        let host = self.netns_name(Role::Host);
        self.ip_in(
            &host,
            &format!("link add {veth} type veth peer name eth0 netns {ns}\nlink set {veth} master docker0 up\n"),
        )?;
        self.ip_in(
            &ns,
            &format!(
                "link set eth0 up\naddr add {addr_v4}/16 dev eth0\nroute add default via {}\n",
                addr::DOCKER0_V4
            ),
        )?;
        Ok(ns)
    }

    /// Mounts a bpf filesystem at `<work dir>/bpffs`, where the lab's
    /// metaguard pins the BPF layer (`bpffs/metaguard`), and returns that
    /// pin directory. Recorded, so the lab's teardown unmounts it, which
    /// releases every pin on it (never /sys/fs/bpf).
    pub fn mount_bpffs(&mut self) -> Result<std::path::PathBuf, LabError> {
        let dir = self.work_dir().join("bpffs");
        std::fs::create_dir_all(&dir).map_err(|source| LabError::Io {
            what: "create",
            path: dir.clone(),
            source,
        })?;
        self.record.mounts.push(dir.clone());
        self.save_record()?;
        cmd::run(
            None,
            "mount",
            &["-t", "bpf", "bpf", &dir.display().to_string()],
            None,
        )?;
        Ok(dir.join("metaguard"))
    }

    /// Lets the lab's probes run in cgroup subtree `root` (relative to the
    /// cgroup2 root) too: one that something else made for the lab and
    /// removes (a machine's disk). Never the hierarchy's root.
    pub fn adopt_cgroup_root(&mut self, root: &str) -> Result<(), LabError> {
        let root = root.trim_matches('/');
        if !root.starts_with("metaguard-lab/") {
            return Err(LabError::Machine(format!(
                "cgroup {root:?} is not a lab subtree (metaguard-lab/…)"
            )));
        }
        self.adopted_cgroups.push(root.to_string());
        Ok(())
    }

    /// Binds namespace file `source` (e.g. `/proc/<pid>/ns/net` of a
    /// machine's container) to `/run/netns/mglab-<id>-<suffix>`, recorded
    /// like every lab namespace, so the lab's probes can run in it.
    pub fn bind_netns(&mut self, suffix: &str, source: &Path) -> Result<String, LabError> {
        let name = format!("{NETNS_PREFIX}{}-{suffix}", self.record.id);
        self.record.netns.push(name.clone());
        self.save_record()?;
        let target = Path::new(metaguard_sys::netns::NETNS_RUN_DIR).join(&name);
        std::fs::create_dir_all(metaguard_sys::netns::NETNS_RUN_DIR).map_err(|source| {
            LabError::Io {
                what: "create",
                path: metaguard_sys::netns::NETNS_RUN_DIR.into(),
                source,
            }
        })?;
        std::fs::write(&target, "").map_err(|source| LabError::Io {
            what: "create",
            path: target.clone(),
            source,
        })?;
        rustix::mount::mount_bind(source, &target).map_err(|e| LabError::Io {
            what: "bind-mount a namespace onto",
            path: target.clone(),
            source: e.into(),
        })?;
        // Never the root namespace: the probes run here.
        Netns::open_not_root(&target)?;
        Ok(name)
    }
}

/// `ip netns add NAME`, opened (never the root namespace), with duplicate
/// address detection off before any link exists: new interfaces' link-local
/// addresses, which neighbour discovery needs, are usable at once instead
/// of after 1–2 s.
fn create_netns(name: &str) -> Result<Netns, LabError> {
    cmd::run(None, "ip", &["netns", "add", name], None)?;
    let ns = Netns::open_not_root(Path::new(metaguard_sys::netns::NETNS_RUN_DIR).join(name))?;
    cmd::run(
        Some(&ns),
        "sysctl",
        &[
            "-q",
            "-w",
            "net.ipv6.conf.default.accept_dad=0",
            "net.ipv6.conf.all.accept_dad=0",
        ],
        None,
    )?;
    Ok(ns)
}
