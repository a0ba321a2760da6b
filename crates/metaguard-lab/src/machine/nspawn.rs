//! One boot of a machine: `systemd-nspawn --boot` in the lab's host
//! namespace, in the disk's cgroup.
//!
//! nspawn's settings, each for a reason found on these machines:
//! * `--keep-unit --register=no`: the host has no system bus (or systemd).
//! * `--network-namespace-path=/run/netns/mglab-<id>-host`: the machine's
//!   network is the lab's host; nothing is created in the root namespace.
//! * `SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1`: a cgroup-v2-only layout, as on
//!   Amazon Linux 2023 and Bottlerocket.
//! * `SYSTEMD_NSPAWN_USE_CGNS=0`: no cgroup namespace, so the machine's
//!   cgroup paths and levels are the kernel's (as for a service on a real
//!   host; nft's `socket cgroupv2 level` counts from the real root).
//! * `SYSTEMD_NSPAWN_API_VFS_WRITABLE=network`: `/proc/sys/net` writable
//!   (the machine's own namespace), the rest of `/proc/sys` read-only.
//! * `SYSTEMD_SECCOMP=0`: nspawn's own filter refuses `bpf()`; the units'
//!   filters still apply.
//! * `--capability=CAP_NET_ADMIN,CAP_SYS_ADMIN,CAP_BPF,CAP_PERFMON`.
//!
//! nspawn leaves its `payload`/`supervisor` cgroups behind and, killed
//! with SIGKILL, its container running: the lab's clean-up ends every
//! process in the machine's cgroup and removes it (and the mirror nspawn
//! makes in the v1 `name=systemd` hierarchy on hybrid hosts).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::Disk;
use crate::topology::Role;
use crate::{Lab, LabError};

/// A booted machine. Dropping it powers it off (or kills it).
#[derive(Debug)]
pub struct Machine {
    nspawn: Option<Child>,
    init_pid: u32,
    name: String,
    console: PathBuf,
    /// The machine's cgroup, relative to the cgroup2 root.
    cgroup: String,
    control_dir: PathBuf,
    /// When nspawn was started (for boot timings).
    started: Instant,
}

/// One journal entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalLine {
    /// CLOCK_MONOTONIC, microseconds (the kernel's; the same clock outside).
    pub monotonic_us: u64,
    pub unit: String,
    pub message: String,
}

const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl Machine {
    /// Boots `disk` in `lab`'s host namespace, with `standin` (the
    /// stand-ins' binary) bound in; returns once systemd reports the boot
    /// finished (`running` or `degraded`).
    pub fn boot(lab: &Lab, disk: &Disk, standin: &Path) -> Result<Machine, LabError> {
        let name = format!("mglab-{}", lab.id());
        let cgroup = disk.machine_cgroup();
        disk.cgroup2().create(&cgroup)?;
        let procs = disk.cgroup2().procs_writer(&cgroup)?;
        let control_dir = lab.work_dir().join("machine-control");
        std::fs::create_dir_all(&control_dir).map_err(|source| LabError::Io {
            what: "create",
            path: control_dir.clone(),
            source,
        })?;
        let console = lab.work_dir().join("machine-console.log");
        let log = std::fs::File::create(&console).map_err(|source| LabError::Io {
            what: "create",
            path: console.clone(),
            source,
        })?;
        let log2 = log.try_clone().map_err(|source| LabError::Io {
            what: "duplicate",
            path: console.clone(),
            source,
        })?;
        let netns = Path::new(metaguard_sys::netns::NETNS_RUN_DIR).join(lab.netns_name(Role::Host));
        let vpc = Path::new(metaguard_sys::netns::NETNS_RUN_DIR).join(lab.netns_name(Role::Vpc));
        let mut cmd = Command::new("systemd-nspawn");
        cmd.args(["--quiet", "--keep-unit", "--register=no", "--boot"])
            .arg(format!("--directory={}", disk.root().display()))
            .arg(format!("--machine={name}"))
            .arg(format!("--network-namespace-path={}", netns.display()))
            .arg("--capability=CAP_NET_ADMIN,CAP_SYS_ADMIN,CAP_BPF,CAP_PERFMON")
            .arg("--console=passive")
            .arg(format!(
                "--bind-ro={}:{}",
                standin.display(),
                crate::standin::STANDIN_EXE
            ))
            .arg(format!(
                "--bind={}:{}",
                control_dir.display(),
                crate::standin::CONTROL_DIR
            ))
            .arg(format!(
                "--bind-ro={}:{}",
                vpc.display(),
                crate::standin::VPC_NETNS
            ))
            .env_clear()
            .env("PATH", PATH)
            .env("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1")
            .env("SYSTEMD_NSPAWN_USE_CGNS", "0")
            .env("SYSTEMD_NSPAWN_API_VFS_WRITABLE", "network")
            .env("SYSTEMD_SECCOMP", "0")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        metaguard_sys::cgroup::enter_before_exec(&mut cmd, procs);
        let started = Instant::now();
        let child = cmd.spawn().map_err(|source| LabError::Spawn {
            command: "systemd-nspawn".into(),
            source,
        })?;
        let mut m = Machine {
            init_pid: 0,
            nspawn: Some(child),
            name,
            console,
            cgroup,
            control_dir,
            started,
        };
        m.init_pid = m.find_init(Duration::from_secs(20))?;
        m.wait_booted(Duration::from_secs(120))?;
        Ok(m)
    }

    /// The container's systemd: the process nspawn starts in the
    /// machine's `payload` cgroup.
    fn find_init(&mut self, within: Duration) -> Result<u32, LabError> {
        let deadline = Instant::now() + within;
        let nspawn_pid = self.nspawn.as_ref().map(Child::id).unwrap_or(0);
        loop {
            let children =
                std::fs::read_to_string(format!("/proc/{nspawn_pid}/task/{nspawn_pid}/children"))
                    .unwrap_or_default();
            for pid in children
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
            {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                if comm.trim() == "systemd" {
                    return Ok(pid);
                }
            }
            if let Some(c) = self.nspawn.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    return Err(LabError::Machine(format!(
                        "systemd-nspawn exited at start ({status}): {}",
                        self.console_text()
                    )));
                }
            }
            if Instant::now() > deadline {
                return Err(LabError::Machine(format!(
                    "the machine's init did not start within {within:?}: {}",
                    self.console_text()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_booted(&self, within: Duration) -> Result<(), LabError> {
        let deadline = Instant::now() + within;
        let out = loop {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .as_secs()
                .max(1);
            let out = self.exec(&[
                "timeout",
                &left.to_string(),
                "systemctl",
                "is-system-running",
                "--wait",
            ])?;
            // Until systemd has set up its private socket, systemctl cannot
            // ask it anything.
            let early = String::from_utf8_lossy(&out.stderr).contains("Failed to connect to bus")
                || String::from_utf8_lossy(&out.stdout).trim() == "offline";
            if !early || Instant::now() > deadline {
                break out;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if state == "running" || state == "degraded" {
            return Ok(());
        }
        Err(LabError::Machine(format!(
            "the machine did not finish booting within {within:?} (state {state:?}: {}); failed units:\n{}\nconsole:\n{}",
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&self.exec(&["systemctl", "--failed", "--no-pager"])?.stdout),
            self.console_text()
        )))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The machine's PID 1, as this (the host's) pid namespace numbers it.
    pub fn init_pid(&self) -> u32 {
        self.init_pid
    }

    /// When nspawn was started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The machine's cgroup, relative to the cgroup2 root.
    pub fn cgroup(&self) -> &str {
        &self.cgroup
    }

    /// The directory bound at [`crate::standin::CONTROL_DIR`] in the machine.
    pub fn control_dir(&self) -> &Path {
        &self.control_dir
    }

    /// What nspawn and the machine's console printed.
    pub fn console_text(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// `path` in the machine's file system as mounted now (through its
    /// PID 1's root: sees its /run).
    pub fn path(&self, path: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.init_pid)).join(path.trim_start_matches('/'))
    }

    /// The command `args` run inside the machine (every namespace of its
    /// PID 1, its root), as a plain process outside any unit.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t")
            .arg(self.init_pid.to_string())
            .args(["-a", "--"])
            .args(args)
            .env_clear()
            .env("PATH", PATH)
            .env("LANG", "C.UTF-8")
            .env("SYSTEMD_COLORS", "0")
            .env("SYSTEMD_PAGER", "")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `args` inside the machine; the output whatever the status.
    pub fn exec(&self, args: &[&str]) -> Result<Output, LabError> {
        self.command(args)
            .output()
            .map_err(|source| LabError::Spawn {
                command: format!("(in {}) {}", self.name, args.join(" ")),
                source,
            })
    }

    /// Runs `args` inside the machine; fails unless it exits 0. Returns
    /// its standard output.
    pub fn exec_ok(&self, args: &[&str]) -> Result<String, LabError> {
        let out = self.exec(args)?;
        if !out.status.success() {
            let mut stderr = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            );
            // A unit that did not start: its journal says why (the gate,
            // the daemon, the program itself), and the test's failure
            // should carry it.
            // metaguard's own journal too: its gate holds units back.
            if let ["systemctl", "start" | "restart" | "reload", units @ ..] = args {
                let mut units: Vec<&str> = units
                    .iter()
                    .copied()
                    .filter(|u| !u.starts_with('-'))
                    .collect();
                if !units.contains(&"metaguard.service") {
                    units.push("metaguard.service");
                }
                for unit in units {
                    if let Ok(j) = self.exec(&["journalctl", "-u", unit, "-n", "25", "--no-pager"])
                    {
                        stderr.push_str(&format!(
                            "\n--- journal of {unit} ---\n{}",
                            String::from_utf8_lossy(&j.stdout).trim()
                        ));
                    }
                }
            }
            return Err(LabError::Command {
                command: format!("(in {}) {}", self.name, args.join(" ")),
                status: out.status.to_string(),
                stderr,
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `systemctl ARGS…`: the output whatever the status.
    pub fn systemctl(&self, args: &[&str]) -> Result<Output, LabError> {
        let mut all = vec!["systemctl", "--no-pager"];
        all.extend_from_slice(args);
        self.exec(&all)
    }

    /// `systemctl is-active UNIT` (`active`, `failed`, `inactive`, …).
    pub fn unit_state(&self, unit: &str) -> Result<String, LabError> {
        let out = self.systemctl(&["is-active", unit])?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// The journal of this boot (optionally of `unit` only).
    pub fn journal(&self, unit: Option<&str>) -> Result<Vec<JournalLine>, LabError> {
        let mut args = vec!["journalctl", "-b", "0", "-o", "json", "--no-pager"];
        if let Some(u) = unit {
            args.extend_from_slice(&["-u", u]);
        }
        let out = self.exec(&args)?;
        let mut lines = Vec::new();
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else {
                continue;
            };
            let field = |k: &str| {
                v.get(k)
                    .and_then(|x| x.as_str())
                    .unwrap_or_default()
                    .to_string()
            };
            let message = match v.get("MESSAGE") {
                // Non-UTF-8 (e.g. colour codes) comes as an array of bytes.
                Some(serde_json::Value::Array(bytes)) => String::from_utf8_lossy(
                    &bytes
                        .iter()
                        .filter_map(|b| b.as_u64().map(|b| b as u8))
                        .collect::<Vec<u8>>(),
                )
                .into_owned(),
                _ => field("MESSAGE"),
            };
            let unit = [field("UNIT"), field("_SYSTEMD_UNIT")]
                .into_iter()
                .find(|u| !u.is_empty())
                .unwrap_or_default();
            lines.push(JournalLine {
                monotonic_us: field("__MONOTONIC_TIMESTAMP").parse().unwrap_or(0),
                unit,
                message,
            });
        }
        Ok(lines)
    }

    /// When (CLOCK_MONOTONIC µs) `unit` first logged a line containing
    /// `text` after `after_us`, in this boot's journal.
    pub fn journal_at(
        &self,
        unit: &str,
        text: &str,
        after_us: u64,
    ) -> Result<Option<u64>, LabError> {
        Ok(first_at(&self.journal(Some(unit))?, unit, text, after_us))
    }

    /// The journal of this boot as text (`journalctl -b -u UNIT`), for
    /// failure messages.
    pub fn journal_text(&self, unit: &str) -> String {
        self.exec(&[
            "journalctl",
            "-b",
            "0",
            "-u",
            unit,
            "--no-pager",
            "-o",
            "short-monotonic",
        ])
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
    }

    /// The pids (as the host numbers them) of the processes in the
    /// machine's cgroup `rel` (relative to the machine's root cgroup,
    /// e.g. `system.slice/docker-<id>.scope`).
    pub fn host_pids(&self, disk: &Disk, rel: &str) -> Result<Vec<u32>, LabError> {
        Ok(disk
            .cgroup2()
            .pids(&format!("{}/{}", self.root_cgroup(), rel.trim_matches('/')))?)
    }

    /// The machine's root cgroup as the machine's own systemd (and so
    /// metaguard inside it) names it: relative to the cgroup2 root, which
    /// the machine sees whole (no cgroup namespace).
    pub fn root_cgroup(&self) -> String {
        format!("{}/payload", self.cgroup)
    }

    /// Powers the machine off (systemd's shutdown, as `poweroff` does) and
    /// waits for nspawn; kills it when that takes longer than `within`.
    pub fn shutdown(&mut self, within: Duration) -> Result<(), LabError> {
        let Some(mut child) = self.nspawn.take() else {
            return Ok(());
        };
        if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill_now(&mut child);
                return Err(LabError::Machine(format!(
                    "the machine did not power off within {within:?}; killed"
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL to nspawn and to the machine's init (a killed nspawn leaves
    /// its container running), by pid.
    fn kill_now(&self, child: &mut Child) {
        for pid in [self.init_pid, child.id()] {
            if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
        let _ = child.wait();
    }
}

/// The first of `lines` from `unit` containing `text` after `after_us`.
pub fn first_at(lines: &[JournalLine], unit: &str, text: &str, after_us: u64) -> Option<u64> {
    lines
        .iter()
        .find(|l| l.unit == unit && l.message.contains(text) && l.monotonic_us > after_us)
        .map(|l| l.monotonic_us)
}

impl Drop for Machine {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown(Duration::from_secs(30)) {
            eprintln!("metaguard machine {}: {e}", self.name);
        }
    }
}
