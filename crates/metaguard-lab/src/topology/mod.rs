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

mod agent_bridge;
mod build;
mod docker;
mod probe;
mod urls;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use metaguard_sys::cgroup::Cgroup2;
use metaguard_sys::netns::Netns;
use metaguard_sys::process::ProcessId;

pub use self::agent_bridge::{AGENT_ON_BRIDGE, AGENT_ON_BRIDGE_LABEL, AGENT_ON_BRIDGE_POLICY};
use crate::agent::AgentEmulator;
use crate::cmd;
use crate::imds::{ImdsEmulator, ImdsSettings};
use crate::log::RequestLog;
use crate::registry::{self, LabRecord, NETNS_PREFIX};
use crate::servers::ServerThread;
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
    /// c1, the bridge container, on docker0.
    pub const C1_V4: Ipv4Addr = Ipv4Addr::new(172, 17, 0, 2);
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

    /// [`Lab::policy_toml`] with the BPF layer on, its container cgroups
    /// the lab's own `docker` and `system.slice` subtrees (for a lab with a
    /// bpf filesystem, see [`Lab::mount_bpffs`]).
    pub fn bpf_policy_toml(&self) -> String {
        let nft = self.policy_toml();
        let cut = nft.find("# The nft layer's policy").unwrap_or(nft.len());
        format!(
            "{}# Both layers: the BPF programs on the lab's container cgroups.\n[layers]\ncontainer_cgroups = [\"{root}/docker\", \"{root}/system.slice\"]\n",
            &nft[..cut],
            root = self.cgroup_root()
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
            // …and attaches programs only inside the lab's cgroup subtree.
            .arg("--bpf-attach-within")
            .arg(self.cgroup_root())
            .args(args)
            .env("NO_COLOR", "1");
        self.netns(Role::Host).command(&mut cmd)?;
        Ok(cmd)
    }

    fn save_record(&self) -> Result<(), LabError> {
        registry::record(&self.opts.state_dir, &self.record).map_err(|source| LabError::Io {
            what: "update lab record in",
            path: self.opts.state_dir.clone(),
            source,
        })
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

impl Drop for Lab {
    fn drop(&mut self) {
        for p in self.teardown() {
            eprintln!("metaguard lab {}: clean-up problem: {p}", self.record.id);
        }
    }
}
