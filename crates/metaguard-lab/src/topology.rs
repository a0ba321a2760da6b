//! The emulated ECS container instance.
//!
//! ```text
//!            ┌──────────────────── vpc ────────────────────┐
//!            │ vpcbr 10.0.0.1/24 fd00:10::1/64              │
//!            │ lo 169.254.169.254/32 fd00:ec2::254/128      │
//!            │ IMDS emulator :80 · echo :8080/tcp :5353/udp │
//!            └──────┬───────────────────────────┬───────────┘
//!              vpc-host                     vpc-task1            (veth, both ends in lab netns)
//!                   │ eth0 10.0.0.10            │ eth0 10.0.0.20 (the task's ENI)
//!   ┌───────────── host ──────────────┐   ┌── task1 (awsvpc) ──┐
//!   │ docker0 172.17.0.1/16 fd00:17::1 │   │ ecs-eth0           │
//!   │ ecs-bridge 169.254.172.1/22 ─────┼───┤ 169.254.172.2/22   │
//!   │ nat: 169.254.170.2:80 → 127.0.0.1:51679 (ecs-init)    │
//!   │ ECS agent emulator 127.0.0.1:51679 │ └────────────────────┘
//!   │ host-network workloads = cgroups │
//!   └───┬──────────────┬───────────────┘
//!     c1 172.17.0.2  c2 172.17.0.3        (bridge-mode containers)
//! ```
//!
//! Every namespace is named `mglab-<id>-<role>`; no link has an end in the
//! root namespace. The lab's cgroups live under `metaguard-lab/<id>/` in
//! the cgroup v2 hierarchy, wherever it is mounted.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use metaguard_sys::cgroup::Cgroup2;
use metaguard_sys::netns::Netns;
use metaguard_sys::process::ProcessId;

use crate::agent::AgentEmulator;
use crate::cmd;
use crate::host_rules;
use crate::imds::{ImdsEmulator, ImdsSettings};
use crate::log::RequestLog;
use crate::probe::{ProbeKind, ProbeResult, ProbeSpec};
use crate::registry::{self, LabRecord, NETNS_PREFIX};
use crate::servers::{self, Bind, ServerThread};
use crate::LabError;

/// Addresses of the lab, as constants tests and the demo can name.
pub mod addr {
    use std::net::{Ipv4Addr, Ipv6Addr};

    pub const IMDS_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
    pub const IMDS_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
    pub const TASK_METADATA_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 170, 2);
    /// EKS Pod Identity's credentials endpoint (IPv4 and IPv6): in the
    /// default `[endpoints] task_metadata`, served by nothing in the lab
    /// until metaguard's relay listens there.
    pub const POD_IDENTITY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 170, 23);
    pub const POD_IDENTITY_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23);
    pub const AGENT_PORT: u16 = 51679;
    pub const VPC_GW_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    pub const VPC_GW_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 1);
    pub const HOST_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
    pub const HOST_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 0x10);
    pub const TASK_ENI_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 20);
    pub const TASK_ENI_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0, 0, 0, 0, 0x20);
    pub const DOCKER0_V4: Ipv4Addr = Ipv4Addr::new(172, 17, 0, 1);
    pub const DOCKER0_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x17, 0, 0, 0, 0, 0, 1);
    pub const ECS_BRIDGE_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 172, 1);
    pub const TASK_ECS_ETH0_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 172, 2);
    /// TCP and UDP echo port on the metadata addresses and the VPC gateway.
    pub const ECHO_TCP_PORT: u16 = 8080;
    pub const ECHO_UDP_PORT: u16 = 5353;
}

/// Who sends a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Bridge-mode container on docker0.
    BridgeC1,
    /// A second bridge-mode container on docker0.
    BridgeC2,
    /// awsvpc task: own ENI into the VPC, `ecs-eth0` into ecs-bridge.
    AwsvpcTask,
    /// A host-network container: a host process in cgroup `docker/hostnet1`.
    HostNetwork,
    /// The ECS agent: a host process in cgroup `docker/ecs-agent`.
    Agent,
    /// An unrelated host process in `system.slice/unrelated.service`.
    HostOther,
}

impl Workload {
    pub const ALL: [Workload; 6] = [
        Workload::BridgeC1,
        Workload::BridgeC2,
        Workload::AwsvpcTask,
        Workload::HostNetwork,
        Workload::Agent,
        Workload::HostOther,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Workload::BridgeC1 => "bridge container",
            Workload::BridgeC2 => "bridge container 2",
            Workload::AwsvpcTask => "awsvpc task",
            Workload::HostNetwork => "host-network workload",
            Workload::Agent => "ECS agent",
            Workload::HostOther => "other host process",
        }
    }

    fn role(self) -> Role {
        match self {
            Workload::BridgeC1 => Role::C1,
            Workload::BridgeC2 => Role::C2,
            Workload::AwsvpcTask => Role::Task1,
            Workload::HostNetwork | Workload::Agent | Workload::HostOther => Role::Host,
        }
    }

    /// The workload's cgroup, relative to the lab's cgroup root.
    pub fn cgroup_suffix(self) -> &'static str {
        match self {
            Workload::BridgeC1 => "docker/c1",
            Workload::BridgeC2 => "docker/c2",
            Workload::AwsvpcTask => "docker/task1",
            Workload::HostNetwork => "docker/hostnet1",
            Workload::Agent => "docker/ecs-agent",
            Workload::HostOther => "system.slice/unrelated.service",
        }
    }

    /// The task metadata (v4) endpoint id of this workload's container:
    /// the last segment of its `ECS_CONTAINER_METADATA_URI_V4`.
    pub fn tmds_endpoint_id(self) -> &'static str {
        match self {
            Workload::BridgeC1 => "c1-6a2f90d4-tmds",
            Workload::BridgeC2 => "c2-18e7b3c5-tmds",
            Workload::AwsvpcTask => "task1-c94e0a27-tmds",
            Workload::HostNetwork => "hostnet1-5d31f8b6-tmds",
            Workload::Agent => "agent-0b6e2d19-tmds",
            Workload::HostOther => "other-7f4a1c83-tmds",
        }
    }

    /// The task-credentials id the agent emulator holds for this workload.
    pub fn credentials_id(self) -> &'static str {
        match self {
            Workload::BridgeC1 => "c1-3f6c2a10-credentials",
            Workload::BridgeC2 => "c2-9b1d77e4-credentials",
            Workload::AwsvpcTask => "task1-51c0a8e2-credentials",
            Workload::HostNetwork => "hostnet1-0d9e4b37-credentials",
            Workload::Agent => "agent-7c2e5f01-credentials",
            Workload::HostOther => "other-2b8d6a93-credentials",
        }
    }
}

/// The namespaces of a lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Host,
    Vpc,
    C1,
    C2,
    Task1,
}

impl Role {
    pub const ALL: [Role; 5] = [Role::Host, Role::Vpc, Role::C1, Role::C2, Role::Task1];
    /// The namespaces of a bare-host lab ([`LabOptions::bare_host`]).
    pub const BARE: [Role; 2] = [Role::Host, Role::Vpc];

    fn suffix(self) -> &'static str {
        match self {
            Role::Host => "host",
            Role::Vpc => "vpc",
            Role::C1 => "c1",
            Role::C2 => "c2",
            Role::Task1 => "task1",
        }
    }
}

/// How to build a lab.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// The program that runs probes (`metaguard lab-probe <json>`).
    pub probe_exe: PathBuf,
    /// Where lab records are kept.
    pub state_dir: PathBuf,
    /// The cgroup2 hierarchy; `None` finds it in /proc/self/mountinfo.
    pub cgroup2: Option<Cgroup2>,
    pub imds: ImdsSettings,
    /// Install what ecs-init installs (DNAT of 169.254.170.2:80 and
    /// route_localnet=1). Off to emulate a host without it.
    pub ecs_init: bool,
    /// Default timeout of a probe.
    pub probe_timeout_ms: u64,
    /// Only the VPC (IMDS, echo services) and a bare host (`lo`, `eth0`
    /// into the VPC, default routes): no bridges, containers, task, NAT
    /// rules or agent. For a host whose own init brings Docker and the
    /// ECS agent (see [`crate::machine`]).
    pub bare_host: bool,
}

impl LabOptions {
    pub fn new(probe_exe: impl Into<PathBuf>) -> LabOptions {
        LabOptions {
            probe_exe: probe_exe.into(),
            state_dir: PathBuf::from(registry::STATE_DIR),
            cgroup2: None,
            imds: ImdsSettings::default(),
            ecs_init: true,
            probe_timeout_ms: 1000,
            bare_host: false,
        }
    }
}

/// A running lab. Dropping it tears everything down.
#[derive(Debug)]
pub struct Lab {
    record: LabRecord,
    opts: LabOptions,
    netns: Vec<(Role, Netns)>,
    cgroup: Cgroup2,
    servers: Vec<ServerThread>,
    imds: ImdsEmulator,
    agent: AgentEmulator,
    echo_log: RequestLog,
    probe_seq: AtomicU32,
    torn_down: bool,
    /// Long-running processes standing for containers (see
    /// [`Lab::start_docker_api`]); killed by pid on teardown.
    container_procs: Vec<std::process::Child>,
    /// Cgroup subtrees besides the lab's own where its probes may run: a
    /// machine disk's (owned and removed by the disk).
    adopted_cgroups: Vec<String>,
    docker: Option<crate::docker::FakeDocker>,
}

fn lab_id() -> String {
    // pid and a sub-second clock: unique across processes and runs; short
    // enough for readable namespace names.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let mix =
        (u64::from(std::process::id()) << 20) ^ u64::from(nanos >> 6) ^ (u64::from(seq) << 40);
    format!("{:07x}", (mix ^ (mix >> 29)) & 0xfff_ffff)
}

impl Lab {
    /// Builds a lab. Needs root. Removes leftovers of crashed labs first.
    pub fn start(opts: LabOptions) -> Result<Lab, LabError> {
        if !rustix::process::geteuid().is_root() {
            return Err(LabError::NotRoot);
        }
        cmd::check_tools()?;
        for id in registry::reap_leftovers(&opts.state_dir) {
            eprintln!("metaguard lab: removed leftover lab {id} of a process that is gone");
        }
        let cgroup = match &opts.cgroup2 {
            Some(c) => c.clone(),
            None => Cgroup2::discover(Path::new("/proc/self/mountinfo"))?,
        };
        let id = lab_id();
        let me = ProcessId::current().ok_or_else(|| LabError::Io {
            what: "read own start time",
            path: "/proc/self/stat".into(),
            source: std::io::Error::other("unreadable"),
        })?;
        let roles: &[Role] = if opts.bare_host {
            &Role::BARE
        } else {
            &Role::ALL
        };
        let names: Vec<String> = roles
            .iter()
            .map(|r| format!("{NETNS_PREFIX}{id}-{}", r.suffix()))
            .collect();
        let record = LabRecord {
            id: id.clone(),
            owner_pid: me.pid,
            owner_start_time: me.start_time,
            etc_netns: names
                .iter()
                .map(|n| Path::new("/etc/netns").join(n))
                .collect(),
            netns: names,
            cgroup_mount: Some(cgroup.mount().to_path_buf()),
            cgroup_root: Some(format!("metaguard-lab/{id}")),
            work_dir: Some(opts.state_dir.join(&id)),
            mounts: Vec::new(),
            extra_cgroup_trees: Vec::new(),
        };
        registry::record(&opts.state_dir, &record).map_err(|source| LabError::Io {
            what: "write lab record in",
            path: opts.state_dir.clone(),
            source,
        })?;
        let mut lab = Lab {
            record,
            netns: Vec::new(),
            cgroup,
            servers: Vec::new(),
            imds: ImdsEmulator::new(opts.imds.clone()),
            agent: AgentEmulator::new(),
            echo_log: RequestLog::default(),
            probe_seq: AtomicU32::new(0),
            torn_down: false,
            container_procs: Vec::new(),
            adopted_cgroups: Vec::new(),
            docker: None,
            opts,
        };
        // On error, `lab` is dropped here and tears down what exists.
        lab.build()?;
        Ok(lab)
    }

    pub fn id(&self) -> &str {
        &self.record.id
    }

    /// The name of a lab namespace (`mglab-<id>-<role>`).
    pub fn netns_name(&self, role: Role) -> String {
        format!("{NETNS_PREFIX}{}-{}", self.record.id, role.suffix())
    }

    pub fn netns(&self, role: Role) -> &Netns {
        // Every role's namespace is opened in build() before a Lab is
        // handed out; a missing one is a bug in the caller (a bare-host
        // lab has only the host and the VPC).
        match self.netns.iter().find(|(r, _)| *r == role) {
            Some((_, ns)) => ns,
            None => unreachable!("lab namespace {role:?} is not part of this lab"),
        }
    }

    /// The namespaces this lab has.
    pub fn roles(&self) -> &'static [Role] {
        if self.opts.bare_host {
            &Role::BARE
        } else {
            &Role::ALL
        }
    }

    pub fn cgroup2(&self) -> &Cgroup2 {
        &self.cgroup
    }

    /// The lab's cgroup subtree relative to the cgroup2 root
    /// (`metaguard-lab/<id>`): prefix for config `cgroups` selectors.
    pub fn cgroup_root(&self) -> String {
        format!("metaguard-lab/{}", self.record.id)
    }

    /// A workload's cgroup, relative to the cgroup2 root.
    pub fn cgroup_of(&self, w: Workload) -> String {
        format!("{}/{}", self.cgroup_root(), w.cgroup_suffix())
    }

    /// The instance id the IMDS emulator serves.
    pub fn instance_id(&self) -> &str {
        &self.opts.imds.instance_id
    }

    pub fn imds(&self) -> &ImdsEmulator {
        &self.imds
    }

    pub fn agent(&self) -> &AgentEmulator {
        &self.agent
    }

    /// Log of the echo services (TCP/UDP probes to metadata addresses on
    /// other ports, and to the unrelated VPC service).
    pub fn echo_log(&self) -> &RequestLog {
        &self.echo_log
    }

    fn ns_by_name(&self, role: Role) -> Result<Netns, LabError> {
        Ok(Netns::open_not_root(
            Path::new(metaguard_sys::netns::NETNS_RUN_DIR).join(self.netns_name(role)),
        )?)
    }

    fn build(&mut self) -> Result<(), LabError> {
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
    fn build_vpc(&self) -> Result<(), LabError> {
        let host = self.netns_name(Role::Host);
        // Each veth is created here with its peer placed straight into the
        // other lab namespace: no end ever exists in the root namespace.
        let vpc = format!(
            "link set lo up
addr add 169.254.169.254/32 dev lo
addr add fd00:ec2::254/128 dev lo nodad
link add vpcbr type bridge
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
    fn build_links(&self) -> Result<(), LabError> {
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
            "link add docker0 type bridge
addr add 172.17.0.1/16 dev docker0
addr add fd00:17::1/64 dev docker0 nodad
link set docker0 up
link add ecs-bridge type bridge
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
            (Role::C1, "172.17.0.2", "fd00:17::2"),
            (Role::C2, "172.17.0.3", "fd00:17::3"),
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

    fn sysctl(&self, role: Role, settings: &[&str]) -> Result<(), LabError> {
        let mut args = vec!["-q", "-w"];
        args.extend_from_slice(settings);
        cmd::run(Some(self.netns(role)), "sysctl", &args, None).map(drop)
    }

    fn build_sysctls(&self) -> Result<(), LabError> {
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
    fn install_ecs_init(&self) -> Result<(), LabError> {
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

    fn build_cgroups(&self) -> Result<(), LabError> {
        for w in Workload::ALL {
            self.cgroup.create(&self.cgroup_of(w))?;
        }
        Ok(())
    }

    /// `ip netns exec` bind-mounts `/etc/netns/<name>/hosts` over
    /// `/etc/hosts`: lab workloads resolve `instance-data` like EC2's DNS.
    fn build_etc_hosts(&self) -> Result<(), LabError> {
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

    fn start_servers(&mut self) -> Result<(), LabError> {
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
        let agent = agent.clone();
        let name = match at.port() {
            addr::AGENT_PORT => "lab-agent".to_string(),
            port => format!("lab-agent-{port}"),
        };
        let s = ServerThread::start(
            self.netns(Role::Host),
            &name,
            vec![Bind::Tcp(at)],
            move |bound| async move {
                for b in bound {
                    if let servers::Bound::Tcp(l) = b {
                        if let Ok(l) = tokio::net::TcpListener::from_std(l) {
                            let _ = agent.serve(l).await;
                        }
                    }
                }
            },
        )?;
        self.servers.push(s);
        Ok(())
    }

    /// The lab's scratch directory, removed with the lab.
    pub fn work_dir(&self) -> &Path {
        match &self.record.work_dir {
            Some(d) => d,
            None => unreachable!("lab records always have a work dir"),
        }
    }

    /// A realistic policy for this lab (interface.md's example, with the
    /// lab's cgroup and namespace names): the agent keeps IMDS; bridge
    /// containers, the awsvpc task and host-network containers are denied
    /// it; everyone keeps task credentials. The BPF layer is off: this is
    /// the nft layer's policy.
    pub fn policy_toml(&self) -> String {
        format!(
            r#"# metaguard policy for lab {id}
[[workload]]
name          = "ecs-agent"
cgroups       = ["{agent}"]
imds          = "allow"

[[workload]]
name          = "bridge-containers"
bridges       = ["docker0", "br-*", "ecs-bridge"]
imds          = "deny"
task_metadata = "allow"

[[workload]]
name          = "awsvpc-tasks"
netns         = ["{task}"]
imds          = "deny"

[[workload]]
name          = "host-network-containers"
cgroups       = ["{docker}"]
imds          = "deny"

# The nft layer's policy: the BPF layer's tests mount a bpf filesystem and
# write policies of their own; without one, a layer asked for would be a
# difference `verify` reports.
[layers]
bpf = false
"#,
            id = self.record.id,
            agent = self.cgroup_of(Workload::Agent),
            task = Path::new(metaguard_sys::netns::NETNS_RUN_DIR)
                .join(self.netns_name(Role::Task1))
                .display(),
            docker = self.cgroup_root() + "/docker",
        )
    }

    /// Writes `text` to a file in the lab's work dir and returns its path.
    pub fn write_file(&self, name: &str, text: &str) -> Result<PathBuf, LabError> {
        let p = self.work_dir().join(name);
        std::fs::write(&p, text).map_err(|source| LabError::Io {
            what: "write",
            path: p.clone(),
            source,
        })?;
        Ok(p)
    }

    /// Runs the metaguard binary (the probe executable) with `args` inside
    /// the lab's host namespace — the lab host is "this host" for it — with
    /// its state kept in the lab's work dir. The exit status is returned,
    /// not judged.
    pub fn metaguard(&self, args: &[&str]) -> Result<std::process::Output, LabError> {
        let mut cmd = self.metaguard_command(args)?;
        cmd.stdin(Stdio::null());
        cmd.output().map_err(|source| LabError::Spawn {
            command: format!("metaguard {}", args.join(" ")),
            source,
        })
    }

    /// The command [`Lab::metaguard`] runs, for callers that start it in
    /// the background (the daemon).
    pub fn metaguard_command(&self, args: &[&str]) -> Result<Command, LabError> {
        let mut cmd = Command::new(&self.opts.probe_exe);
        // The lab's own Docker API socket (served only after
        // start_docker_api), never the host's.
        cmd.arg("--state-dir")
            .arg(self.work_dir().join("metaguard-state"))
            .arg("--docker-socket")
            .arg(self.work_dir().join("docker.sock"))
            // The BPF layer pins under the lab's own directory; it is only
            // active when a test mounts a bpf filesystem at `bpffs/`.
            .arg("--bpf-pin-dir")
            .arg(self.work_dir().join("bpffs").join("metaguard"))
            .args(args)
            .env("NO_COLOR", "1");
        self.netns(Role::Host).command(&mut cmd)?;
        Ok(cmd)
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

    fn save_record(&self) -> Result<(), LabError> {
        registry::record(&self.opts.state_dir, &self.record).map_err(|source| LabError::Io {
            what: "update lab record in",
            path: self.opts.state_dir.clone(),
            source,
        })
    }

    /// Runs `ip -batch` inside a lab namespace given by name (for
    /// namespaces added with [`Lab::add_netns`]).
    pub fn ip_in(&self, netns_name: &str, script: &str) -> Result<(), LabError> {
        let ns = self.lab_netns_by_name(netns_name)?;
        cmd::ip_batch(&ns, script)
    }

    /// Runs a system tool inside a lab namespace given by name (e.g. `nft`
    /// in a machine's container bound with [`Lab::bind_netns`]).
    pub fn run_in_named(
        &self,
        netns_name: &str,
        program: &str,
        args: &[&str],
    ) -> Result<String, LabError> {
        let ns = self.lab_netns_by_name(netns_name)?;
        cmd::run(Some(&ns), program, args, None)
    }

    fn lab_netns_by_name(&self, netns_name: &str) -> Result<Netns, LabError> {
        if !self.record.netns.iter().any(|n| n == netns_name) {
            return Err(LabError::ProbeOutput(format!(
                "{netns_name} is not a namespace of lab {}",
                self.record.id
            )));
        }
        Ok(Netns::open_not_root(
            Path::new(metaguard_sys::netns::NETNS_RUN_DIR).join(netns_name),
        )?)
    }

    /// Starts a probe in the background inside lab namespace `netns_name`
    /// (no cgroup); wait for it with [`Lab::finish_probe`].
    pub fn spawn_probe_in(
        &self,
        netns_name: &str,
        spec: &ProbeSpec,
    ) -> Result<std::process::Child, LabError> {
        self.spawn_probe_as(netns_name, None, spec)
    }

    /// Waits for a probe started with [`Lab::spawn_probe_in`].
    pub fn finish_probe(&self, child: std::process::Child) -> Result<ProbeResult, LabError> {
        let out = child.wait_with_output().map_err(|source| LabError::Spawn {
            command: "lab-probe".into(),
            source,
        })?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(stdout.lines().last().unwrap_or("")).map_err(|e| {
            LabError::ProbeOutput(format!(
                "{e}; stdout {stdout:?}; stderr {:?}",
                String::from_utf8_lossy(&out.stderr)
            ))
        })
    }

    /// Starts a fake Docker Engine API on `<work dir>/docker.sock` that
    /// describes the lab's workloads as an ECS host's dockerd would: the
    /// bridge containers, the awsvpc task's pause container (label
    /// `com.amazonaws.ecs.container-name=~internal~ecs~pause`, its sandbox
    /// the task namespace), a host-network container and `ecs-agent`. Each
    /// is backed by a real process in the workload's namespace and cgroup.
    pub fn start_docker_api(&mut self) -> Result<crate::docker::FakeDocker, LabError> {
        use crate::docker::{FakeContainer, FakeDocker};
        if let Some(d) = &self.docker {
            return Ok(d.clone());
        }
        let socket = self.work_dir().join("docker.sock");
        let docker = FakeDocker::new(&socket);
        let served = docker.clone();
        let s = ServerThread::start(
            self.netns(Role::Host),
            "lab-docker",
            vec![Bind::Unix(socket)],
            move |bound| async move {
                for b in bound {
                    if let servers::Bound::Unix(l) = b {
                        if let Ok(l) = tokio::net::UnixListener::from_std(l) {
                            served.clone().serve(l).await;
                        }
                    }
                }
            },
        )?;
        self.servers.push(s);
        let task_arn =
            "arn:aws:ecs:us-east-1:111122223333:task/lab/0123456789abcdef0123456789abcdef";
        // (workload, container name, network mode, labels)
        type Row<'a> = (Workload, &'a str, &'a str, Vec<(&'a str, &'a str)>);
        let pause = "ecs-lab-api-1-internalecspause-9c8b7a";
        let pause_mode = format!(
            "container:{}",
            FakeContainer::id_for(&format!("{}-{pause}", self.record.id))
        );
        let rows: [Row<'_>; 6] = [
            (
                Workload::BridgeC1,
                "ecs-lab-web-1-app-c1",
                "bridge",
                vec![("com.amazonaws.ecs.container-name", "app")],
            ),
            (
                Workload::BridgeC2,
                "ecs-lab-web-1-sidecar-c2",
                "bridge",
                vec![("com.amazonaws.ecs.container-name", "sidecar")],
            ),
            (
                Workload::AwsvpcTask,
                pause,
                "none",
                vec![
                    ("com.amazonaws.ecs.container-name", "~internal~ecs~pause"),
                    ("com.amazonaws.ecs.task-arn", task_arn),
                ],
            ),
            // The task's application container joins the pause container's
            // namespace (`container:<id>`): Docker reports no SandboxKey for
            // it, so its namespace file is `/proc/<pid>/ns/net`, another
            // file for the same namespace.
            (
                Workload::AwsvpcTask,
                "ecs-lab-api-1-app-t1",
                &pause_mode,
                vec![
                    ("com.amazonaws.ecs.container-name", "app"),
                    ("com.amazonaws.ecs.task-arn", task_arn),
                ],
            ),
            (
                Workload::HostNetwork,
                "ecs-lab-batch-1-worker-h1",
                "host",
                vec![("com.amazonaws.ecs.container-name", "worker")],
            ),
            (Workload::Agent, "ecs-agent", "host", vec![]),
        ];
        let mut tmds: Vec<(Workload, String, String, &str)> = Vec::new();
        for (w, name, mode, labels) in rows {
            let mut cmd = self.command_in(w, "sleep")?;
            cmd.arg("3600").stdout(Stdio::null()).stderr(Stdio::null());
            let child = cmd.spawn().map_err(|source| LabError::Spawn {
                command: format!("sleep (container {name})"),
                source,
            })?;
            let pid = child.id();
            self.container_procs.push(child);
            let joined = mode.starts_with("container:");
            let sandbox_key = match w.role() {
                Role::Host => String::new(),
                _ if joined => String::new(),
                role => Path::new(metaguard_sys::netns::NETNS_RUN_DIR)
                    .join(self.netns_name(role))
                    .display()
                    .to_string(),
            };
            let id = FakeContainer::id_for(&format!("{}-{name}", self.record.id));
            if !joined {
                tmds.push((w, id.clone(), name.to_string(), mode));
            }
            docker.start(FakeContainer {
                id,
                name: name.to_string(),
                image: "public.ecr.aws/lab/app:latest".into(),
                labels: labels
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                env: vec![
                    format!(
                        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=/v2/credentials/{}",
                        w.credentials_id()
                    ),
                    format!(
                        "ECS_CONTAINER_METADATA_URI_V4=http://{}/v4/{}",
                        addr::TASK_METADATA_V4,
                        w.tmds_endpoint_id()
                    ),
                ],
                network_mode: mode.to_string(),
                pid,
                sandbox_key,
                user: String::new(),
                cgroup_parent: String::new(),
                running: true,
            });
        }
        self.serve_task_metadata(task_arn, &tmds);
        // `ip netns exec` needs a moment before the sleeps are in place.
        std::thread::sleep(std::time::Duration::from_millis(50));
        self.docker = Some(docker.clone());
        Ok(docker)
    }

    /// Task metadata (v4) for the lab's containers, served by the agent
    /// emulator: the two bridge containers are one task ("web": app and
    /// sidecar), every other container a task of its own. The documents
    /// carry what the real agent's do — ARNs, the cluster, networks,
    /// labels — so that redaction has something to remove.
    fn serve_task_metadata(&self, awsvpc_arn: &str, rows: &[(Workload, String, String, &str)]) {
        let doc = |w: Workload, id: &str, name: &str, mode: &str, task_arn: &str| {
            let ip = match w {
                Workload::BridgeC1 => "172.17.0.2".to_string(),
                Workload::BridgeC2 => "172.17.0.3".to_string(),
                Workload::AwsvpcTask => addr::TASK_ENI_V4.to_string(),
                _ => addr::HOST_V4.to_string(),
            };
            crate::agent::container_document(id, name, mode, &ip, task_arn)
        };
        let task = crate::agent::task_document;
        let web = "arn:aws:ecs:us-east-1:111122223333:task/lab/5e1f0c2b9a8d4e7f6a5b4c3d2e1f0a9b";
        let (pair, rest): (Vec<_>, Vec<_>) = rows
            .iter()
            .partition(|(w, ..)| matches!(w, Workload::BridgeC1 | Workload::BridgeC2));
        let containers = pair
            .iter()
            .map(|(w, id, name, mode)| doc(*w, id, name, mode, web))
            .collect();
        let endpoints: Vec<(&str, &str)> = pair
            .iter()
            .map(|(w, id, ..)| (w.tmds_endpoint_id(), id.as_str()))
            .collect();
        self.agent
            .add_task_metadata(task(web, "web", containers), &endpoints);
        for (w, id, name, mode) in rest {
            let arn = if *w == Workload::AwsvpcTask {
                awsvpc_arn.to_string()
            } else {
                format!(
                    "arn:aws:ecs:us-east-1:111122223333:task/lab/{}",
                    w.tmds_endpoint_id()
                )
            };
            self.agent.add_task_metadata(
                task(&arn, name, vec![doc(*w, id, name, mode, &arn)]),
                &[(w.tmds_endpoint_id(), id.as_str())],
            );
        }
    }

    /// A fresh probe id, unique in this lab.
    pub fn probe_id(&self, what: &str) -> String {
        let n = self.probe_seq.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n}-{what}", self.record.id)
    }

    /// An HTTP GET probe spec with a fresh id.
    pub fn http_get(&self, url: &str) -> ProbeSpec {
        ProbeSpec {
            id: self.probe_id("http"),
            kind: ProbeKind::Http {
                url: url.to_string(),
                method: "GET".into(),
                headers: Vec::new(),
            },
            timeout_ms: self.opts.probe_timeout_ms,
        }
    }

    /// Runs `spec` from `w`: in its namespace (through `ip netns exec`, so
    /// the namespace's /etc/hosts applies) and in its cgroup.
    pub fn probe(&self, w: Workload, spec: &ProbeSpec) -> Result<ProbeResult, LabError> {
        let json = serde_json::to_string(spec).map_err(|e| LabError::ProbeOutput(e.to_string()))?;
        let mut cmd = self.command_in(w, &self.opts.probe_exe)?;
        cmd.arg("lab-probe").arg(json);
        let shown = format!(
            "{} lab-probe (as {})",
            self.opts.probe_exe.display(),
            w.label()
        );
        let out = cmd.output().map_err(|source| LabError::Spawn {
            command: shown.clone(),
            source,
        })?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().last().unwrap_or("");
        serde_json::from_str(line).map_err(|e| {
            LabError::ProbeOutput(format!(
                "{shown}: {e}; status {}; stdout {stdout:?}; stderr {:?}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        })
    }

    /// A command that will run as workload `w` (its namespace and cgroup),
    /// for real clients such as python/botocore or curl. Never the root
    /// namespace: lab namespaces are opened with `open_not_root`.
    pub fn command_in(
        &self,
        w: Workload,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> Result<Command, LabError> {
        let ns = self.netns_name(w.role());
        // Double-check the namespace is not the root one before using it.
        self.ns_by_name(w.role())?;
        let procs = self.cgroup.procs_writer(&self.cgroup_of(w))?;
        let ip = cmd::find_tool("ip").unwrap_or_else(|| "ip".into());
        let mut cmd = Command::new(ip);
        cmd.args(["netns", "exec", &ns])
            .arg(program)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env_remove("http_proxy")
            .env_remove("https_proxy")
            .env_remove("HTTP_PROXY")
            .env_remove("HTTPS_PROXY")
            .env_remove("ALL_PROXY")
            .env_remove("all_proxy");
        metaguard_sys::cgroup::enter_before_exec(&mut cmd, procs);
        Ok(cmd)
    }

    /// Runs `spec` as a host-network process in `cgroup` (a path relative
    /// to the cgroup2 root, which must lie inside this lab's subtree and
    /// exist), e.g. a cgroup created after the daemon started.
    pub fn probe_in_cgroup(&self, cgroup: &str, spec: &ProbeSpec) -> Result<ProbeResult, LabError> {
        self.probe_as(&self.netns_name(Role::Host), cgroup, spec)
    }

    /// Runs `spec` in lab namespace `netns_name` and in `cgroup` (relative
    /// to the cgroup2 root; inside this lab's subtree): as a process of a
    /// container that something else made (a machine's Docker).
    pub fn probe_as(
        &self,
        netns_name: &str,
        cgroup: &str,
        spec: &ProbeSpec,
    ) -> Result<ProbeResult, LabError> {
        let child = self.spawn_probe_as(netns_name, Some(cgroup), spec)?;
        self.finish_probe(child)
    }

    /// [`Lab::probe_as`] in the background; wait with [`Lab::finish_probe`].
    pub fn spawn_probe_as(
        &self,
        netns_name: &str,
        cgroup: Option<&str>,
        spec: &ProbeSpec,
    ) -> Result<std::process::Child, LabError> {
        self.lab_netns_by_name(netns_name)?;
        let json = serde_json::to_string(spec).map_err(|e| LabError::ProbeOutput(e.to_string()))?;
        let ip = cmd::find_tool("ip").unwrap_or_else(|| "ip".into());
        let mut cmd = Command::new(ip);
        cmd.args(["netns", "exec", netns_name])
            .arg(&self.opts.probe_exe)
            .arg("lab-probe")
            .arg(json)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(cgroup) = cgroup {
            let inside = std::iter::once(self.cgroup_root())
                .chain(self.adopted_cgroups.iter().cloned())
                .any(|root| cgroup.starts_with(&format!("{root}/")));
            if !inside {
                return Err(LabError::ProbeOutput(format!(
                    "{cgroup} is not inside lab {}",
                    self.record.id
                )));
            }
            let procs = self.cgroup.procs_writer(cgroup)?;
            metaguard_sys::cgroup::enter_before_exec(&mut cmd, procs);
        }
        cmd.spawn().map_err(|source| LabError::Spawn {
            command: format!("lab-probe in {netns_name}"),
            source,
        })
    }

    /// The F17 attack, from bridge container `role` (which has NET_ADMIN in
    /// its own namespace): route 127.0.0.0/8 through the bridge gateway
    /// ahead of the local table, and allow sending to loopback addresses
    /// off `lo`. With the host's route_localnet=1 (ecs-init sets it), the
    /// container then reaches the host's 127.0.0.1 services directly.
    pub fn route_loopback_via_gateway(&self, role: Role) -> Result<(), LabError> {
        let gw = match role {
            Role::C1 | Role::C2 => "172.17.0.1",
            _ => {
                return Err(LabError::ProbeOutput(format!(
                    "{role:?} is not a bridge container"
                )))
            }
        };
        // The local table is consulted first (pref 0); move it after ours.
        cmd::ip_batch(
            self.netns(role),
            &format!(
                "route add 127.0.0.0/8 via {gw} dev eth0 table 100\n\
                 rule add to 127.0.0.0/8 lookup 100 pref 100\n\
                 rule add lookup local pref 1000\n\
                 rule del pref 0\n"
            ),
        )?;
        self.sysctl(
            role,
            &[
                "net.ipv4.conf.all.route_localnet=1",
                "net.ipv4.conf.eth0.route_localnet=1",
            ],
        )
    }

    /// Runs a system tool inside a lab namespace (e.g. `nft`, `iptables`).
    pub fn run_in(&self, role: Role, program: &str, args: &[&str]) -> Result<String, LabError> {
        cmd::run(Some(self.netns(role)), program, args, None)
    }

    /// URL of IMDS over IPv4 / IPv6 for `path` (starting with `/`).
    pub fn imds_url_v4(path: &str) -> String {
        format!("http://{}{path}", addr::IMDS_V4)
    }

    pub fn imds_url_v6(path: &str) -> String {
        format!("http://[{}]{path}", addr::IMDS_V6)
    }

    /// `http://169.254.170.2/v4/<w's endpoint id><suffix>` (suffix: "",
    /// "/task", "/stats", …).
    pub fn tmds_url(w: Workload, suffix: &str) -> String {
        format!(
            "http://{}/v4/{}{suffix}",
            addr::TASK_METADATA_V4,
            w.tmds_endpoint_id()
        )
    }

    /// URL of the task credentials of `w` via 169.254.170.2.
    pub fn credentials_url(w: Workload) -> String {
        format!(
            "http://{}/v2/credentials/{}",
            addr::TASK_METADATA_V4,
            w.credentials_id()
        )
    }

    /// Tears the lab down now (also done on drop). Returns the problems.
    pub fn teardown(&mut self) -> Vec<String> {
        if self.torn_down {
            return Vec::new();
        }
        self.torn_down = true;
        for mut c in self.container_procs.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        for s in &mut self.servers {
            s.stop();
        }
        self.servers.clear();
        self.netns.clear();
        registry::teardown(&self.opts.state_dir, &self.record)
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

impl Drop for Lab {
    fn drop(&mut self) {
        for p in self.teardown() {
            eprintln!("metaguard lab {}: clean-up problem: {p}", self.record.id);
        }
    }
}
