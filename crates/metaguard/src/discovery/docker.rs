//! Containers from the Docker Engine API (bollard, over the unix socket).
//!
//! For each running container: its name, image and labels, whether it shares the
//! host's network stack, its network namespace (`NetworkSettings.SandboxKey`;
//! for `container:<id>` network modes the other container's; else
//! `/proc/<pid>/ns/net`) and its cgroup v2 path (from `/proc/<pid>/cgroup`). The ECS agent's awsvpc pause containers carry
//! `com.amazonaws.ecs.container-name=~internal~ecs~pause`; core turns them
//! into the `ecs-tasks` namespaces.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::Context as _;
use bollard::query_parameters::{EventsOptionsBuilder, ListContainersOptionsBuilder};
use bollard::{Docker, API_DEFAULT_VERSION};
use metaguard_core::ruleset::ContainerFact;

/// Default Docker API socket.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";

fn connect(socket: &Path) -> anyhow::Result<Docker> {
    Docker::connect_with_unix(&socket.display().to_string(), 5, API_DEFAULT_VERSION)
        .with_context(|| format!("cannot connect to the Docker API at {}", socket.display()))
}

/// The running containers, or `None` when there is no socket (no Docker on
/// this host). For async callers.
pub async fn list_containers(
    socket: &Path,
    proc_root: &Path,
) -> anyhow::Result<Option<Vec<ContainerFact>>> {
    if !socket.exists() {
        return Ok(None);
    }
    list(socket, proc_root).await.map(Some)
}

/// [`list_containers`] for synchronous callers (the CLI's apply and verify,
/// the engine, the proxy's identification on its blocking threads). The
/// listing runs on one discovery thread with its own runtime, started on
/// the first call and kept: nothing is started per call, and it may be
/// called from a thread inside another runtime alike (it only blocks the
/// calling thread).
pub fn containers(socket: &Path, proc_root: &Path) -> anyhow::Result<Option<Vec<ContainerFact>>> {
    if !socket.exists() {
        return Ok(None);
    }
    let (reply, answer) = std::sync::mpsc::sync_channel(1);
    let job = Job {
        socket: socket.to_path_buf(),
        proc_root: proc_root.to_path_buf(),
        reply,
    };
    worker()
        .send(job)
        .map_err(|_| anyhow::anyhow!("the Docker discovery thread has stopped"))?;
    answer
        .recv()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the Docker discovery thread has stopped")))
}

/// One listing asked of the discovery thread.
struct Job {
    socket: PathBuf,
    proc_root: PathBuf,
    reply: std::sync::mpsc::SyncSender<anyhow::Result<Option<Vec<ContainerFact>>>>,
}

/// The discovery thread's queue: started once; each job runs as its own
/// task there, so concurrent callers do not wait for each other.
fn worker() -> &'static tokio::sync::mpsc::UnboundedSender<Job> {
    static WORKER: OnceLock<tokio::sync::mpsc::UnboundedSender<Job>> = OnceLock::new();
    WORKER.get_or_init(|| {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Job>();
        let run = move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let why = format!("cannot start a runtime for the Docker API: {e}");
                    while let Some(job) = rx.blocking_recv() {
                        let _ = job.reply.send(Err(anyhow::anyhow!("{why}")));
                    }
                    return;
                }
            };
            rt.block_on(async move {
                while let Some(job) = rx.recv().await {
                    tokio::spawn(async move {
                        let got = list_containers(&job.socket, &job.proc_root).await;
                        let _ = job.reply.send(got);
                    });
                }
            });
        };
        // A thread that cannot be started leaves the queue's receiver
        // dropped: every call then says the thread has stopped.
        let _ = std::thread::Builder::new()
            .name("metaguard-docker".into())
            .spawn(run);
        tx
    })
}

async fn list(socket: &Path, proc_root: &Path) -> anyhow::Result<Vec<ContainerFact>> {
    let docker = connect(socket)?;
    let summaries = tokio::time::timeout(
        Duration::from_secs(10),
        docker.list_containers(Some(ListContainersOptionsBuilder::new().all(false).build())),
    )
    .await
    .context("the Docker API did not answer within 10 s")?
    .with_context(|| format!("listing containers through {}", socket.display()))?;
    let mut out = Vec::with_capacity(summaries.len());
    let mut modes = Vec::with_capacity(summaries.len());
    for s in summaries {
        let Some(id) = s.id else { continue };
        let inspect = match docker.inspect_container(&id, None).await {
            Ok(i) => i,
            // It stopped between list and inspect: it needs no rules.
            Err(_) => continue,
        };
        let name = inspect
            .name
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_string();
        // The reference it was started from (`Config.Image`), else the
        // listing's (both are what `docker ps` shows, not the digest).
        let image = inspect
            .config
            .as_ref()
            .and_then(|c| c.image.clone())
            .filter(|i| !i.is_empty())
            .or(s.image)
            .unwrap_or_default();
        let labels = inspect
            .config
            .as_ref()
            .and_then(|c| c.labels.clone())
            .unwrap_or_default()
            .into_iter()
            .collect();
        let mode = inspect
            .host_config
            .as_ref()
            .and_then(|h| h.network_mode.clone())
            .unwrap_or_default();
        let pid = inspect.state.as_ref().and_then(|s| s.pid).unwrap_or(0);
        let sandbox = inspect
            .network_settings
            .as_ref()
            .and_then(|n| n.sandbox_key.clone())
            .filter(|k| !k.is_empty());
        let host_network = mode == "host";
        let netns = if host_network {
            None
        } else {
            sandbox.or_else(|| {
                (pid > 0).then(|| {
                    proc_root
                        .join(pid.to_string())
                        .join("ns/net")
                        .display()
                        .to_string()
                })
            })
        };
        let cgroup = (pid > 0)
            .then(|| metaguard_sys::cgroup::of_process(proc_root, pid))
            .flatten()
            .filter(|p| !p.is_empty());
        let env = inspect
            .config
            .as_ref()
            .and_then(|c| c.env.clone())
            .unwrap_or_default();
        let addresses = addresses(inspect.network_settings.as_ref());
        out.push(ContainerFact {
            id,
            name,
            image,
            labels,
            host_network,
            cgroup,
            netns,
            env,
            addresses,
        });
        modes.push(mode);
    }
    share_joined_namespaces(&mut out, &modes);
    Ok(out)
}

/// A container's addresses on its networks, IPv4 first, each once.
fn addresses(settings: Option<&bollard::models::NetworkSettings>) -> Vec<std::net::IpAddr> {
    let mut out: Vec<std::net::IpAddr> = settings
        .and_then(|n| n.networks.as_ref())
        .into_iter()
        .flatten()
        .flat_map(|(_, e)| [e.ip_address.as_deref(), e.global_ipv6_address.as_deref()])
        .flatten()
        .filter_map(|a| a.parse().ok())
        .collect();
    out.sort_by_key(|a: &std::net::IpAddr| (a.is_ipv6(), *a));
    out.dedup();
    out
}

/// A container in network mode `container:<id>` (an awsvpc task's
/// application containers join the pause container) has no `SandboxKey`;
/// its namespace is the other container's, so it gets that one's file
/// rather than `/proc/<pid>/ns/net`. Opening a process's namespace file
/// needs ptrace access to it, which metaguard.service's bounded
/// capabilities do not give over a container's more privileged process.
fn share_joined_namespaces(containers: &mut [ContainerFact], modes: &[String]) {
    for (i, mode) in modes.iter().enumerate() {
        let Some(target) = mode.strip_prefix("container:") else {
            continue;
        };
        let shared = containers
            .iter()
            .find(|c| {
                c.id == target
                    || c.name == target
                    || (target.len() >= 12 && c.id.starts_with(target))
            })
            .filter(|c| !c.host_network)
            .and_then(|c| c.netns.clone())
            .filter(|p| !p.starts_with("/proc/"));
        if let Some(path) = shared {
            containers[i].netns = Some(path);
        }
    }
}

/// What [`watch`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DockerEvent {
    /// The Docker API answers (again): dockerd started or restarted, and
    /// containers may have changed while nobody answered.
    Up,
    /// A container started, stopped or was removed.
    Changed,
}

/// Follows the Docker API: waits for its socket (inotify on its directory,
/// so a dockerd that starts later is seen at once), checks that it answers
/// (`/_ping`: a socket-activated socket exists before dockerd does), then
/// reports [`DockerEvent::Up`] and a [`DockerEvent::Changed`] for every
/// container start, stop or removal since `since` (Unix seconds: the
/// daemon's start; Docker replays events from then, and after a reconnect
/// from the last one seen). `up` says whether the API answers now. `send`
/// returns false when nobody listens any more, which ends the watch;
/// otherwise it retries every second at most and never returns.
pub async fn watch(
    socket: PathBuf,
    since: u64,
    mut send: impl FnMut(DockerEvent) -> bool + Send,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use futures_util::StreamExt as _;
    use std::sync::atomic::Ordering;
    let mut backoff = Duration::from_millis(100);
    let mut since = since;
    let mut appeared = socket_appeared(&socket);
    loop {
        if !socket.exists() {
            // Woken when something is created in the socket's directory;
            // a second at most (a directory that did not exist yet).
            match appeared.as_mut() {
                Some(stream) => {
                    let _ = tokio::time::timeout(Duration::from_secs(1), stream.next()).await;
                }
                None => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    appeared = socket_appeared(&socket);
                }
            }
            continue;
        }
        if let Ok(docker) = connect(&socket) {
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(10), docker.ping()).await {
                up.store(true, Ordering::Relaxed);
                backoff = Duration::from_millis(100);
                if !send(DockerEvent::Up) {
                    return;
                }
                let filters = std::collections::HashMap::from([
                    ("type", vec!["container"]),
                    ("event", vec!["start", "die", "destroy"]),
                ]);
                let opts = EventsOptionsBuilder::new()
                    .since(&since.to_string())
                    .filters(&filters)
                    .build();
                let mut events = docker.events(Some(opts));
                while let Some(ev) = events.next().await {
                    let Ok(ev) = ev else { break };
                    if let Some(t) = ev.time.and_then(|t| u64::try_from(t).ok()) {
                        since = since.max(t);
                    }
                    if !send(DockerEvent::Changed) {
                        return;
                    }
                }
                up.store(false, Ordering::Relaxed);
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// Creations in the directory of `socket` (`/var/run` resolves to `/run`).
fn socket_appeared(socket: &Path) -> Option<inotify::EventStream<Vec<u8>>> {
    let dir = socket.parent()?;
    let inotify = inotify::Inotify::init().ok()?;
    inotify
        .watches()
        .add(
            dir,
            inotify::WatchMask::CREATE | inotify::WatchMask::MOVED_TO,
        )
        .ok()?;
    inotify.into_event_stream(vec![0u8; 1024]).ok()
}
