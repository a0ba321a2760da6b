//! A machine host for tests and benchmarks: a disk that persists across
//! boots, and for each boot a fresh bare lab and a booted machine, with
//! the stand-in units installed the way their packages would install them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Disk, Machine, Rootfs};
use crate::probe::{ProbeResult, ProbeSpec};
use crate::standin::api::{ContainerInfo, TaskInfo, TaskSpec};
use crate::standin::client::{AgentControl, DockerClient};
use crate::topology::Role;
use crate::{Lab, LabError, LabOptions};

/// Where things are.
#[derive(Debug, Clone)]
pub struct HostOptions {
    /// The program that runs lab probes (`metaguard lab-probe`).
    pub probe_exe: PathBuf,
    /// The `mglab-standin` binary, bound into the machine.
    pub standin_exe: PathBuf,
    /// The cached rootfs (see [`Rootfs::default_dir`]).
    pub rootfs: PathBuf,
    /// Where lab records and the disk's layers live.
    pub state_dir: PathBuf,
}

impl HostOptions {
    /// Paths for a test or bench binary built by cargo: `metaguard` (the
    /// probe program) and `mglab-standin` next to each other in the
    /// profile directory, the rootfs under the target directory.
    pub fn beside(probe_exe: &Path) -> HostOptions {
        let profile_dir = probe_exe.parent().unwrap_or(Path::new("."));
        let target = profile_dir.parent().unwrap_or(Path::new("."));
        HostOptions {
            probe_exe: probe_exe.to_path_buf(),
            standin_exe: profile_dir.join("mglab-standin"),
            rootfs: Rootfs::default_dir(target),
            state_dir: PathBuf::from(crate::registry::STATE_DIR),
        }
    }
}

/// A container of a running task, and where its probes run.
#[derive(Debug, Clone)]
pub struct Member {
    pub container: ContainerInfo,
    /// The lab namespace name bound to its network namespace.
    pub netns: String,
    /// Its cgroup (the Docker scope), relative to the cgroup2 root.
    pub cgroup: String,
}

/// A task the stand-in agent runs.
#[derive(Debug, Clone)]
pub struct RunningTask {
    pub info: TaskInfo,
    pub members: Vec<Member>,
}

impl RunningTask {
    /// The first (or only) container.
    pub fn first(&self) -> &Member {
        &self.members[0]
    }
}

/// A probe's result and the probe's id (to look for in request logs).
pub type Probed = (String, ProbeResult);

/// A disk, and the lab and machine of the current boot.
#[derive(Debug)]
pub struct Host {
    opts: HostOptions,
    // Field order is drop order: the machine powers off before its lab
    // goes, and both before the disk.
    machine: Option<Machine>,
    lab: Option<Lab>,
    disk: Disk,
    tasks: u32,
}

/// The stand-in units, as the packages they stand for install them.
const DOCKER_SOCKET_UNIT: &str = "\
# Lab stand-in for Debian's docker.io docker.socket.
[Unit]
Description=Docker Socket for the API (metaguard lab stand-in)

[Socket]
ListenStream=/run/docker.sock
SocketMode=0660
SocketUser=root
SocketGroup=root

[Install]
WantedBy=sockets.target
";

const DOCKER_SERVICE_UNIT: &str = "\
# Lab stand-in for docker.service (dockerd): the Docker Engine API, making
# containers as namespaces, veths on docker0 and systemd scopes.
[Unit]
Description=Docker Application Container Engine (metaguard lab stand-in)
After=network-online.target docker.socket firewalld.service containerd.service time-set.target
Wants=network-online.target
Requires=docker.socket

[Service]
Type=notify
ExecStart=/opt/mglab/bin/mglab-standin dockerd
TimeoutStartSec=0
RestartSec=2
Restart=always
StartLimitBurst=3
StartLimitInterval=60s
Delegate=yes
KillMode=process
OOMScoreAdjust=-500

[Install]
WantedBy=multi-user.target
";

const ECS_SERVICE_UNIT: &str = "\
# Lab stand-in for Amazon Linux's ecs.service (ecs-init and the agent).
[Unit]
Description=Amazon Elastic Container Service - container agent (metaguard lab stand-in)
Documentation=https://aws.amazon.com/documentation/ecs/
Requires=docker.service
After=docker.service

[Service]
Type=notify
Restart=on-failure
RestartSec=10s
ExecStartPre=/opt/mglab/bin/mglab-standin ecs-init-pre-start
ExecStart=/opt/mglab/bin/mglab-standin ecs-agent

[Install]
WantedBy=multi-user.target
";

/// What systemd does on a real host and nspawn does not: a bpf file
/// system at /sys/fs/bpf (nspawn's /sys is a read-only tmpfs without it).
const BPFFS_UNIT: &str = "\
# Lab only: a real host's systemd mounts bpffs at /sys/fs/bpf early in
# boot; nspawn does not. Mounted before local-fs.target, as systemd does.
[Unit]
Description=BPF file system at /sys/fs/bpf (metaguard lab: what the host's systemd does)
DefaultDependencies=no
Before=local-fs.target sysinit.target
ConditionPathIsMountPoint=!/sys/fs/bpf

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/bin/sh -c 'mount -o remount,rw /sys && mkdir -p /sys/fs/bpf; mount -o remount,ro /sys; mount -t bpf -o mode=0700 bpf /sys/fs/bpf'

[Install]
WantedBy=sysinit.target
";

impl Host {
    /// A new disk on the cached rootfs, with the stand-ins installed and
    /// enabled. Not booted yet.
    pub fn new(opts: HostOptions) -> Result<Host, LabError> {
        if !rustix::process::geteuid().is_root() {
            return Err(LabError::NotRoot);
        }
        if !opts.standin_exe.is_file() {
            return Err(LabError::Machine(format!(
                "{} is missing (cargo build -p metaguard-lab --bin mglab-standin; ./scripts/test builds it)",
                opts.standin_exe.display()
            )));
        }
        for (tool, package) in [
            ("systemd-nspawn", "systemd-container"),
            ("nsenter", "util-linux"),
        ] {
            if crate::cmd::find_tool(tool).is_none() {
                return Err(LabError::MissingTool {
                    tool: tool.into(),
                    package: package.into(),
                });
            }
        }
        let rootfs = Rootfs::open(&opts.rootfs)?;
        let disk = Disk::new(&rootfs, &opts.state_dir)?;
        let host = Host {
            opts,
            machine: None,
            lab: None,
            disk,
            tasks: 0,
        };
        host.install_standins()?;
        Ok(host)
    }

    fn install_standins(&self) -> Result<(), LabError> {
        let d = &self.disk;
        for (name, text) in [
            ("docker.socket", DOCKER_SOCKET_UNIT),
            ("docker.service", DOCKER_SERVICE_UNIT),
            ("ecs.service", ECS_SERVICE_UNIT),
            ("mglab-bpffs.service", BPFFS_UNIT),
        ] {
            d.write(&format!("/lib/systemd/system/{name}"), text, 0o644)?;
        }
        for (wants, unit) in [
            ("sockets.target.wants", "docker.socket"),
            ("multi-user.target.wants", "docker.service"),
            ("multi-user.target.wants", "ecs.service"),
            ("sysinit.target.wants", "mglab-bpffs.service"),
        ] {
            d.symlink(
                &format!("/etc/systemd/system/{wants}/{unit}"),
                &format!("/lib/systemd/system/{unit}"),
            )?;
        }
        // Nothing in the machine should try to reach a package mirror.
        for timer in [
            "apt-daily.timer",
            "apt-daily-upgrade.timer",
            "dpkg-db-backup.timer",
            "e2scrub_all.timer",
        ] {
            d.symlink(&format!("/etc/systemd/system/{timer}"), "/dev/null")?;
        }
        Ok(())
    }

    /// Boots: a fresh bare lab (nothing survives a reboot in the kernel)
    /// and the machine on this disk.
    pub fn boot(&mut self) -> Result<(), LabError> {
        self.boot_with(|_| Ok(()))
    }

    /// [`Host::boot`], running `before_machine` on the fresh lab before the
    /// machine starts (a benchmark's observer in the host namespace).
    pub fn boot_with<T>(
        &mut self,
        before_machine: impl FnOnce(&Lab) -> Result<T, LabError>,
    ) -> Result<T, LabError> {
        if self.machine.is_some() {
            return Err(LabError::Machine("already booted".into()));
        }
        let mut opts = LabOptions::new(&self.opts.probe_exe);
        opts.bare_host = true;
        opts.state_dir = self.opts.state_dir.clone();
        let mut lab = Lab::start(opts)?;
        lab.adopt_cgroup_root(&self.disk.machine_cgroup())?;
        let observed = before_machine(&lab);
        let machine = Machine::boot(&lab, &self.disk, &self.opts.standin_exe);
        self.lab = Some(lab);
        self.machine = Some(machine?);
        observed
    }

    /// Powers off (as `poweroff` does) and tears the lab down.
    pub fn shutdown(&mut self) -> Result<(), LabError> {
        let result = match self.machine.as_mut() {
            Some(m) => m.shutdown(Duration::from_secs(60)),
            None => Ok(()),
        };
        self.machine = None;
        self.lab = None;
        result
    }

    pub fn reboot(&mut self) -> Result<(), LabError> {
        self.shutdown()?;
        self.boot()
    }

    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    /// The machine's root cgroup as metaguard inside it names it (relative
    /// to the cgroup2 root; the same on every boot): cgroups selectors in
    /// test configs go below it, never above.
    pub fn cgroup_root(&self) -> String {
        format!("{}/payload", self.disk.machine_cgroup())
    }

    /// The booted machine (an error when not booted).
    pub fn machine(&self) -> Result<&Machine, LabError> {
        self.machine
            .as_ref()
            .ok_or_else(|| LabError::Machine("not booted".into()))
    }

    /// The lab of the current boot.
    pub fn lab(&self) -> Result<&Lab, LabError> {
        self.lab
            .as_ref()
            .ok_or_else(|| LabError::Machine("not booted".into()))
    }

    /// The stand-in agent's control socket.
    pub fn agent(&self) -> Result<AgentControl, LabError> {
        Ok(AgentControl::new(
            self.machine()?
                .control_dir()
                .join(crate::standin::CONTROL_SOCKET),
        ))
    }

    /// The stand-in dockerd's API (through the machine's /run).
    pub fn docker(&self) -> Result<DockerClient, LabError> {
        Ok(DockerClient::new(
            self.machine()?.path(crate::standin::DOCKER_SOCKET),
        ))
    }

    /// Asks the agent for a task and makes each of its containers
    /// probe-able: its network namespace bound under a lab name.
    pub fn run_task(&mut self, spec: &TaskSpec) -> Result<RunningTask, LabError> {
        let info = self
            .agent()?
            .run_task(spec)
            .map_err(|e| LabError::Machine(e.to_string()))?;
        self.tasks += 1;
        let n = self.tasks;
        let (Some(machine), Some(lab)) = (self.machine.as_ref(), self.lab.as_mut()) else {
            return Err(LabError::Machine("not booted".into()));
        };
        let mut members = Vec::new();
        let slice = spec
            .cgroup_parent
            .clone()
            .filter(|p| p.ends_with(".slice"))
            .unwrap_or_else(|| "system.slice".into());
        for (i, c) in info.containers.iter().enumerate() {
            let scope = format!("{slice}/docker-{}.scope", c.docker_id);
            let pid = *machine
                .host_pids(&self.disk, &scope)?
                .first()
                .ok_or_else(|| LabError::Machine(format!("no process in {scope}")))?;
            let netns = if info.network_mode == "host" {
                lab.netns_name(Role::Host)
            } else {
                lab.bind_netns(
                    &format!("t{n}c{i}"),
                    Path::new(&format!("/proc/{pid}/ns/net")),
                )?
            };
            members.push(Member {
                container: c.clone(),
                netns,
                cgroup: format!("{}/payload/{scope}", machine.cgroup()),
            });
        }
        Ok(RunningTask { info, members })
    }

    /// Runs `spec` as a process of `member` (its namespace and cgroup).
    pub fn probe(&self, member: &Member, spec: &ProbeSpec) -> Result<ProbeResult, LabError> {
        self.lab()?.probe_as(&member.netns, &member.cgroup, spec)
    }
}
