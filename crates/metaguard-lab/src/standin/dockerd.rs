//! The stand-in dockerd: the Docker Engine API of [`FakeDocker`] with a
//! runtime that makes containers the way dockerd (systemd cgroup driver,
//! default bridge network) makes them.
//!
//! * **Network.** At start: `docker0` (172.17.0.1/16, fd00:17::1/64) if it
//!   is missing, forwarding on, and the MASQUERADE rule for 172.17.0.0/16.
//!   Per container: bridge mode gets a namespace file
//!   `/run/docker/netns/<12 hex>`, a veth `veth<7 hex>` on docker0 and
//!   `eth0` with the next free 172.17.0.N and fd00:17::N; `none` only the
//!   namespace with `lo`; `host` none at all (its sandbox is
//!   `/var/run/docker/netns/default`, as Docker reports it);
//!   `container:<id>` joins that container's namespace.
//! * **Process.** `systemd-run --scope --unit docker-<id>.scope
//!   --slice system.slice` (or the container's `--cgroup-parent` slice), then `nsenter --net=…` and `setpriv` for the
//!   container's user, then `mglab-standin pause` with the container's
//!   environment — so `/proc/<pid>/cgroup`, `/proc/<pid>/environ` and the
//!   namespace look like a real container's.
//! * **Stop.** SIGKILL, the namespace file unmounted and removed (its
//!   links go with it). Stopping dockerd stops every container and emits
//!   `die`, like dockerd without live-restore.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metaguard_sys::netns::Netns;

use crate::cmd;
use crate::docker::{FakeContainer, FakeDocker, Runtime};

/// Where container namespaces are bind-mounted (`SandboxKey`).
pub const NETNS_DIR: &str = "/run/docker/netns";

/// The runtime: containers as namespaces and scoped processes.
#[derive(Debug)]
pub struct ScopeRuntime {
    pause_exe: PathBuf,
    procs: Mutex<HashMap<String, Child>>,
    /// Host part N of 172.17.0.N / fd00:17::N, by container id.
    addresses: Mutex<HashMap<String, u8>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl ScopeRuntime {
    pub fn new(pause_exe: &Path) -> ScopeRuntime {
        ScopeRuntime {
            pause_exe: pause_exe.to_path_buf(),
            procs: Mutex::default(),
            addresses: Mutex::default(),
        }
    }

    fn netns_file(id: &str) -> PathBuf {
        Path::new(NETNS_DIR).join(&id[..12])
    }

    fn allocate(&self, id: &str) -> Result<u8, String> {
        let mut used = lock(&self.addresses);
        let taken: BTreeSet<u8> = used.values().copied().collect();
        let n = (2..=254u8)
            .find(|n| !taken.contains(n))
            .ok_or("docker0 is full")?;
        used.insert(id.to_string(), n);
        Ok(n)
    }
}

/// `unshare --net=FILE true`: a new namespace kept by its bind mount, with
/// duplicate address detection off (the lab's addresses are usable at once).
fn create_netns(file: &Path) -> Result<(), String> {
    std::fs::create_dir_all(NETNS_DIR).map_err(|e| format!("{NETNS_DIR}: {e}"))?;
    std::fs::write(file, "").map_err(|e| format!("{}: {e}", file.display()))?;
    cmd::run(
        None,
        "unshare",
        &[&format!("--net={}", file.display()), "true"],
        None,
    )
    .map_err(|e| e.to_string())?;
    write_sysctls(
        file,
        &[
            ("net/ipv6/conf/all/accept_dad", "0"),
            ("net/ipv6/conf/default/accept_dad", "0"),
        ],
    )
}

/// Writes `/proc/sys/<key>` inside the namespace at `file` (procps may be
/// absent; `/proc/sys/net` shows the namespace of the thread that opens it).
pub fn write_sysctls(file: &Path, settings: &[(&str, &str)]) -> Result<(), String> {
    let ns = Netns::open(file).map_err(|e| e.to_string())?;
    let settings: Vec<(String, String)> = settings
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    ns.spawn_thread("sysctl", move || -> Result<(), String> {
        for (k, v) in settings {
            let p = Path::new("/proc/sys").join(&k);
            std::fs::write(&p, &v).map_err(|e| format!("{}: {e}", p.display()))?;
        }
        Ok(())
    })
    .map_err(|e| e.to_string())?
    .join()
    .map_err(|_| "sysctl thread panicked".to_string())?
}

fn ip_in(file: &Path, script: &str) -> Result<(), String> {
    let ns = Netns::open(file).map_err(|e| e.to_string())?;
    cmd::ip_batch(&ns, script).map_err(|e| e.to_string())
}

fn remove_netns(file: &Path) {
    let _ = rustix::mount::unmount(file, rustix::mount::UnmountFlags::DETACH);
    let _ = std::fs::remove_file(file);
}

impl Runtime for ScopeRuntime {
    fn start(&self, c: &mut FakeContainer, running: &[FakeContainer]) -> Result<(), String> {
        let mode = c.network_mode.clone();
        let mut owned_netns = None;
        let join: Option<String> = match mode.as_str() {
            "host" => None,
            "none" | "bridge" | "default" => {
                let file = Self::netns_file(&c.id);
                create_netns(&file)?;
                owned_netns = Some(file.clone());
                Some(file.display().to_string())
            }
            m if m.starts_with("container:") => {
                let target = &m["container:".len()..];
                let other = running
                    .iter()
                    .find(|r| r.id == target || r.name == target || r.id.starts_with(target))
                    .ok_or_else(|| format!("network mode {m}: no such running container"))?;
                Some(format!("/proc/{}/ns/net", other.pid))
            }
            other => return Err(format!("network mode {other:?} is not emulated")),
        };
        let result = self.start_process(c, &mode, owned_netns.as_deref(), join.as_deref());
        if result.is_err() {
            if let Some(f) = &owned_netns {
                remove_netns(f);
            }
            lock(&self.addresses).remove(&c.id);
        }
        result
    }

    fn stop(&self, c: &FakeContainer) {
        if let Some(mut child) = lock(&self.procs).remove(&c.id) {
            let _ = child.kill();
            let _ = child.wait();
        }
        if matches!(c.network_mode.as_str(), "none" | "bridge" | "default") {
            remove_netns(&Self::netns_file(&c.id));
        }
        lock(&self.addresses).remove(&c.id);
    }
}

impl ScopeRuntime {
    fn start_process(
        &self,
        c: &mut FakeContainer,
        mode: &str,
        owned_netns: Option<&Path>,
        join: Option<&str>,
    ) -> Result<(), String> {
        if let Some(file) = owned_netns {
            if mode == "none" {
                ip_in(file, "link set lo up\n")?;
            } else {
                let n = self.allocate(&c.id)?;
                let veth = format!("veth{}", &c.id[..7]);
                cmd::run(
                    None,
                    "ip",
                    &[
                        "link",
                        "add",
                        &veth,
                        "type",
                        "veth",
                        "peer",
                        "name",
                        "eth0",
                        "netns",
                        &file.display().to_string(),
                    ],
                    None,
                )
                .map_err(|e| e.to_string())?;
                cmd::run(
                    None,
                    "ip",
                    &["link", "set", &veth, "master", "docker0", "up"],
                    None,
                )
                .map_err(|e| e.to_string())?;
                ip_in(
                    file,
                    &format!(
                        "link set lo up
link set eth0 up
addr add 172.17.0.{n}/16 dev eth0
addr add fd00:17::{n:x}/64 dev eth0 nodad
route add default via 172.17.0.1
route add default via fd00:17::1
"
                    ),
                )?;
            }
        }
        // The systemd cgroup driver: a scope in the container's
        // `--cgroup-parent` slice, else in system.slice.
        let slice = if c.cgroup_parent.ends_with(".slice") {
            c.cgroup_parent.clone()
        } else {
            "system.slice".to_string()
        };
        let mut cmd = Command::new("systemd-run");
        cmd.args([
            "--scope",
            "--quiet",
            "--collect",
            &format!("--slice={slice}"),
            &format!("--unit=docker-{}.scope", c.id),
            "--",
        ]);
        if let Some(ns) = join {
            cmd.args(["nsenter", &format!("--net={ns}"), "--"]);
        }
        let user = c.user.trim();
        if !user.is_empty() && user != "0" && user != "root" {
            let uid: u32 = user
                .parse()
                .map_err(|_| format!("user {user:?}: only numeric uids are emulated"))?;
            cmd.args([
                "setpriv",
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
                "--",
            ]);
        }
        cmd.arg(&self.pause_exe).arg("pause");
        cmd.env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .envs(c.env.iter().filter_map(|kv| kv.split_once('=')))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("systemd-run for {}: {e}", c.name))?;
        let pid = child.id();
        // Started = the container's own program runs, in its scope.
        let deadline = Instant::now() + Duration::from_secs(10);
        let scope = format!("docker-{}.scope", c.id);
        loop {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
            if comm.trim() == "mglab-standin" && cgroup.contains(&scope) {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("container {} exited at start: {status}", c.name));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("container {} did not start within 10 s", c.name));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        c.pid = pid;
        c.sandbox_key = match (mode, owned_netns) {
            ("host", _) => "/var/run/docker/netns/default".into(),
            (_, Some(f)) => f.display().to_string(),
            _ => String::new(),
        };
        lock(&self.procs).insert(c.id.clone(), child);
        Ok(())
    }
}

/// What dockerd sets up on the host when it starts.
fn setup_host() -> Result<(), String> {
    let host = Path::new("/proc/self/ns/net");
    let links = cmd::run(None, "ip", &["-j", "link", "show", "docker0"], None);
    if links.is_err() {
        cmd::run(
            None,
            "ip",
            &["-batch", "-"],
            Some(
                "link add docker0 type bridge
addr add 172.17.0.1/16 dev docker0
addr add fd00:17::1/64 dev docker0 nodad
link set docker0 up
",
            ),
        )
        .map_err(|e| e.to_string())?;
    }
    write_sysctls(
        host,
        &[
            ("net/ipv4/ip_forward", "1"),
            ("net/ipv6/conf/all/forwarding", "1"),
        ],
    )?;
    iptables_ensure(&crate::host_rules::docker_nat())
}

/// `iptables -C` then `-A` when missing: idempotent across restarts.
pub fn iptables_ensure(rule: &crate::host_rules::Rule) -> Result<(), String> {
    let check = crate::host_rules::args("-C", rule);
    if cmd::run(None, "iptables", &check, None).is_ok() {
        return Ok(());
    }
    cmd::run(None, "iptables", &crate::host_rules::args("-A", rule), None)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// `mglab-standin dockerd`: serves until SIGTERM, then stops every
/// container.
pub fn run(pause_exe: &Path) -> Result<(), String> {
    setup_host()?;
    let listener = match metaguard_sys::systemd::take_listen_fds().into_iter().next() {
        Some(fd) => std::os::unix::net::UnixListener::from(fd),
        None => {
            let _ = std::fs::remove_file(super::DOCKER_SOCKET);
            std::os::unix::net::UnixListener::bind(super::DOCKER_SOCKET)
                .map_err(|e| format!("{}: {e}", super::DOCKER_SOCKET))?
        }
    };
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("socket: {e}"))?;
    let runtime = Arc::new(ScopeRuntime::new(pause_exe));
    let docker = FakeDocker::with_runtime(Path::new(super::DOCKER_SOCKET), runtime.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let local = tokio::task::LocalSet::new();
    let served = docker.clone();
    local.block_on(&rt, async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
        let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
        let listener = tokio::net::UnixListener::from_std(listener).map_err(|e| e.to_string())?;
        tokio::task::spawn_local(served.serve(listener));
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        eprintln!(
            "dockerd (lab stand-in): API listening on {}",
            super::DOCKER_SOCKET
        );
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        Ok::<(), String>(())
    })?;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    for id in docker.ids() {
        let _ = docker.stop_container(&id, true);
    }
    eprintln!("dockerd (lab stand-in): stopped every container");
    Ok(())
}
