//! `metaguard daemon`: apply, then keep it true.
//!
//! One single-threaded tokio runtime drives everything. It waits for
//! events, with one exception: while the BPF layer is active its pinned
//! links are read back every 250 ms, since the kernel reports no event
//! when a link is detached (see [`bpf_heal`]).
//!
//! * **Heal.** An `nft monitor` per guarded namespace reports every ruleset
//!   transaction, closed by `# new generation N by process PID (NAME)`. A
//!   transaction that touches metaguard's table is followed by a read-back
//!   compared with the canonical expected table (cached from a scratch
//!   namespace, see `enforce`); on any difference the table is replaced in
//!   one transaction. The log says what changed (table deleted, ruleset
//!   flushed, chain or set altered) and which process did it. metaguard's
//!   own transactions compare equal and cause nothing. A monitor that dies
//!   is restarted and followed by a full check (events may have been lost).
//! * **Heal the BPF layer.** inotify on the pin directory (a link or map
//!   unpinned), the periodic read-back (a link detached, replaced or given
//!   another program) and cgroup events compare the pinned links with what
//!   the last apply left; on any difference the layer is applied again
//!   (`PinDir::apply`), logged as `healed` with `layer = "bpf"` and counted
//!   with a `bpf-…` cause. A configured cgroup that appears, goes or is
//!   re-created re-plans the layer instead.
//! * **Follow.** inotify on the directories that `netns` globs point into:
//!   a new matching namespace gets its table as soon as its nsfs mount
//!   appears; a deleted one is forgotten (its monitor ended, so it does not
//!   keep the namespace alive). Bridges and cgroups need no following: the
//!   rules match the bridge by name and the cgroup by ancestor, so a new
//!   port or a new container cgroup is covered from its first packet.
//! * **Signals.** SIGHUP reloads the config; a bad one is refused with its
//!   line and column and the rules in force stay. SIGTERM/SIGINT leave the
//!   rules in place (fail-closed) unless `--remove-on-exit`. SIGKILL leaves
//!   them too, of course: a restart finds and replaces them.
//! * **Heal the proxy's policy routing.** rtnetlink notifications of
//!   deleted rules and routes in the proxy's routing table (a thread
//!   blocked on the socket; no polling) are followed by a read-back and
//!   the missing ones added again, logged as `healed` with `layer =
//!   "routing"`.
//! * **Proxy.** Started by the first config that proxies anything, and
//!   reconfigured by every reload in two steps around the rules: before
//!   them its new listeners are bound and its new settings (audit log,
//!   upstreams, limits) opened; after them both are put in force and the
//!   listeners the new plan lacks are closed. A failure in either step
//!   before the rules refuses the whole reload.
//! * **Metrics and health** on a loopback address only (see [`metrics`]).

mod bpf_events;
mod bpf_heal;
mod identity;
mod metrics;
mod monitor;
pub mod record;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use metaguard_core::config::Selector;
use metaguard_core::ruleset::{ContainerFact, Plan, FAMILY, PROXY_ROUTE_TABLE, TABLE};
use metaguard_core::Config;
use metaguard_proxy::server::Prepared;
use metaguard_sys::bpf::{Attachment, LinkInfo, MapContents};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::discovery::docker::DockerEvent;
use crate::enforce::{canonical, needs_docker, Containers, Engine, Guarding, Stale, Target};

pub use metrics::DEFAULT_ADDR as DEFAULT_METRICS_ADDR;

/// Options of `metaguard daemon`, validated.
#[derive(Debug)]
pub struct Options {
    pub config_path: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub docker_socket: PathBuf,
    /// The BPF layer's pin directory.
    pub bpf_pin_dir: PathBuf,
    pub remove_on_exit: bool,
    pub metrics_addr: SocketAddr,
}

/// What wakes the daemon up.
#[derive(Debug)]
pub enum Event {
    /// An nft transaction in namespace `key` ("host" or a netns path).
    Nft(monitor::Batch),
    /// The monitor of `key` ended (it is restarted; everything is checked).
    MonitorEnded { key: String },
    /// Something appeared in or left a watched namespace directory.
    NetnsDir,
    /// A container started or stopped (Docker API events).
    Docker,
    /// The Docker API answers (again): dockerd started or restarted, and
    /// containers may have changed while nobody answered.
    DockerUp,
    /// A directory holding a configured cgroup changed: one may have
    /// appeared or been re-created (with a new id the rules must use).
    Cgroup,
    /// Something was unpinned from (or moved out of) the BPF layer's pin
    /// directory, or the directory itself went.
    BpfPins,
    /// A rule or route of the proxy's routing table was deleted.
    Routing,
}

/// What the daemon keeps of an active BPF layer, to notice drift.
struct BpfGuard {
    /// Link pin name → the link as the last apply left it.
    links: BTreeMap<String, LinkInfo>,
    /// What the layer was asked to hold then (with the cgroup ids of the
    /// time): when a cgroup is removed or re-created, this changes, and
    /// the layer is re-planned rather than healed.
    planned: Option<(MapContents, Vec<Attachment>)>,
    /// The refusal events' follower.
    follower: Option<bpf_events::Follower>,
    /// After a failed heal, checks rest until then.
    retry_at: Option<Instant>,
}

/// How long checks rest after a failed BPF heal.
const BPF_RETRY: Duration = Duration::from_secs(5);
/// The `cause` of a heal of the proxy's policy routing.
pub const ROUTING_CAUSE: &str = "policy-routing-deleted";

/// A guarded namespace and what is expected in it.
struct Guarded {
    target: Target,
    expected: canonical::Table,
    monitor: monitor::Handle,
}

struct Daemon {
    opts: Options,
    engine: Engine,
    config: Config,
    plan: Plan,
    guarded: HashMap<String, Guarded>,
    tx: mpsc::UnboundedSender<Event>,
    metrics: metrics::Metrics,
    /// Directories watched for namespaces.
    netns_dirs: Vec<PathBuf>,
    watched: Vec<PathBuf>,
    /// Pids of the daemon's own recent nft transactions: their monitor
    /// events are skipped, so drift is always attributed to someone else.
    own_pids: std::collections::VecDeque<u32>,
    /// Expected (canonical) tables by script text. Every task namespace of
    /// a workload has the same script, so one scratch load serves them all.
    expected_cache: HashMap<String, canonical::Table>,
    /// The proxy, once a config has proxied anything.
    proxy: Option<ProxyService>,
    /// The proxy's metrics, registered once (a refused first start and a
    /// later one share them).
    proxy_metrics: Option<metaguard_proxy::ProxyMetrics>,
    /// The containers the Docker API last listed: the facts of plans made
    /// while it does not answer (dockerd restarting), so that its task
    /// namespaces stay in the plan. `None` until it first answered.
    containers: Option<Vec<ContainerFact>>,
    /// Whether the Docker API answers now (set by the watcher).
    docker_up: Arc<AtomicBool>,
    /// Whether the Docker watcher runs.
    docker_watched: bool,
    /// When the daemon started (Unix seconds): Docker events are replayed
    /// from here.
    started: u64,
    /// `<state dir>/daemon.json`.
    record: record::Record,
    /// The BPF layer, while it is active.
    bpf: Option<BpfGuard>,
    /// inotify on the BPF pin directory (once the layer was active).
    bpf_watches: Option<inotify::Watches>,
    /// Whether the proxy's routing table is followed (from the first plan
    /// with a proxy on).
    routing_followed: bool,
}

/// The running proxy: its threads, listeners and settings, and the view of
/// workloads it identifies callers with.
struct ProxyService {
    server: metaguard_proxy::Server,
    directory: Arc<identity::Directory>,
}

/// The proxy's part of a config, prepared before its rules are applied;
/// dropped, it leaves the proxy as it was.
enum ProxyStep {
    /// Nothing proxied, before or after.
    Idle,
    /// The first proxy action: a new proxy, its listeners bound.
    Start(ProxyService, Prepared),
    /// The running proxy's next settings and listeners.
    Change(Prepared),
}

/// Runs the daemon until SIGTERM/SIGINT. Errors before the first apply exit
/// 2 with nothing changed, like `apply`.
pub fn run(
    opts: Options,
    load: impl Fn(Option<&Path>) -> anyhow::Result<Config>,
) -> anyhow::Result<()> {
    if !opts.metrics_addr.ip().is_loopback() {
        bail!(
            "--metrics {}: the metrics endpoint must listen on a loopback address (127.0.0.0/8 or ::1) so that no container can reach it",
            opts.metrics_addr
        );
    }
    // Docker events are replayed from here: before the first discovery.
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let config = load(opts.config_path.as_deref())?;
    let engine =
        Engine::new(&opts.state_dir, &opts.docker_socket)?.with_bpf_pin_dir(&opts.bpf_pin_dir);
    // No Docker before READY (see `Containers::Unknown`): the first plan
    // knows no containers, and keeps the task tables of an earlier run.
    let plan = engine.plan_present(&config, Containers::Unknown)?;
    let record = record::Record::for_this_process(&config.origin.to_string())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(async move {
        let (tx, rx) = mpsc::unbounded_channel();
        let metrics = metrics::Metrics::new()?;
        let mut d = Daemon {
            netns_dirs: crate::enforce::netns_dirs(&config),
            opts,
            engine,
            config,
            plan,
            guarded: HashMap::new(),
            tx,
            metrics,
            watched: Vec::new(),
            own_pids: std::collections::VecDeque::new(),
            expected_cache: HashMap::new(),
            proxy: None,
            proxy_metrics: None,
            containers: None,
            docker_up: Arc::new(AtomicBool::new(false)),
            docker_watched: false,
            started,
            record,
            bpf: None,
            bpf_watches: None,
            routing_followed: false,
        };
        // Signals first: a SIGTERM right after "ready" must find its handler.
        let signals = Signals::new()?;
        d.start()?;
        d.run(rx, signals, load).await
    })
}

impl Daemon {
    /// The first apply, then monitors, watches and the metrics server.
    fn start(&mut self) -> anyhow::Result<()> {
        let t = Instant::now();
        let proxy = self.prepare_proxy(&self.config.clone(), &self.plan.clone())?;
        let stale = if needs_docker(&self.config) {
            Stale::Keep
        } else {
            Stale::Remove
        };
        let report = self.engine.apply_with(&self.config, &self.plan, stale)?;
        for w in &report.warnings {
            warn!(warning = %w, "plan");
        }
        self.metrics.last_apply.set(t.elapsed().as_secs_f64());
        self.sync_guarded()?;
        self.update_gauges();
        metrics::serve(self.opts.metrics_addr, self.metrics.clone())?;
        self.commit_proxy(proxy);
        self.follow_routing();
        self.sync_bpf(report.bpf.as_ref().is_some_and(|b| b.state == "active"));
        self.watch_netns_dirs()?;
        self.watch_docker();
        info!(
            tables = report.tables.len(),
            ms = t.elapsed().as_millis() as u64,
            metrics = %self.opts.metrics_addr,
            "ready: rules applied; watching"
        );
        self.record.ready = true;
        self.save_record();
        let status = self.status();
        let _ = sd_notify::notify(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&status),
        ]);
        Ok(())
    }

    /// Follows the Docker API when the config or the proxy needs it:
    /// whenever its socket appears and answers (dockerd started or
    /// restarted), the host is re-planned, and then on every container
    /// event. Started once; a connection may start a socket-activated
    /// dockerd, which is why it waits until the daemon is ready.
    fn watch_docker(&mut self) {
        if self.docker_watched || !(needs_docker(&self.config) || self.proxy.is_some()) {
            return;
        }
        self.docker_watched = true;
        let tx = self.tx.clone();
        tokio::spawn(crate::discovery::docker::watch(
            self.opts.docker_socket.clone(),
            self.started,
            move |e| {
                tx.send(match e {
                    DockerEvent::Up => Event::DockerUp,
                    DockerEvent::Changed => Event::Docker,
                })
                .is_ok()
            },
            self.docker_up.clone(),
        ));
    }

    /// The plan for `config` now: with the containers the Docker API lists
    /// when it answers, else those it listed last (dockerd restarting);
    /// before it ever answered, none — and then the tables of namespaces
    /// guarded earlier are kept ([`Stale::Keep`]).
    fn plan_now(&mut self, config: &Config) -> anyhow::Result<(Plan, Stale)> {
        let proxied = self.proxy.is_some();
        if !needs_docker(config) && !proxied {
            return Ok((
                self.engine.plan_present(config, Containers::Unknown)?,
                Stale::Remove,
            ));
        }
        if self.docker_up.load(Ordering::Relaxed) {
            match self.engine.containers() {
                Ok(Some(cs)) => {
                    // The proxy takes the same listing: a stopped
                    // container's ids are revoked before the next request.
                    if let Some(p) = &self.proxy {
                        p.directory.containers_listed(cs.clone());
                    }
                    self.containers = Some(cs);
                }
                Ok(None) => {}
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "the Docker API did not answer; planning with the containers it listed last")
                }
            }
        }
        if !needs_docker(config) {
            return Ok((
                self.engine.plan_present(config, Containers::Unknown)?,
                Stale::Remove,
            ));
        }
        match &self.containers {
            Some(cs) => {
                // Containers that stopped meanwhile took their namespace.
                let live: Vec<ContainerFact> = cs
                    .iter()
                    .filter(|c| c.netns.as_ref().is_none_or(|p| Path::new(p).exists()))
                    .cloned()
                    .collect();
                Ok((
                    self.engine.plan_present(config, Containers::Known(&live))?,
                    Stale::Remove,
                ))
            }
            None => Ok((
                self.engine.plan_present(config, Containers::Unknown)?,
                Stale::Keep,
            )),
        }
    }

    fn save_record(&self) {
        if let Err(e) = record::write(&self.opts.state_dir, &self.record) {
            warn!(error = %format!("{e:#}"), "cannot write the daemon's record");
        }
    }

    /// One line for `systemctl status`.
    fn status(&self) -> String {
        let proxy = match &self.proxy {
            Some(p) if !p.server.listening().is_empty() => "; proxy serving",
            _ => "",
        };
        format!(
            "guarding: host + {} task namespace(s){proxy}; config {}",
            self.plan.netns.len(),
            self.config.origin
        )
    }

    /// Opens the proxy settings `config` asks for and binds the listeners
    /// `plan` adds, changing nothing in force (see [`Daemon::commit_proxy`]).
    /// A new proxy runs on threads of its own, so heals never stall
    /// requests.
    fn prepare_proxy(&mut self, config: &Config, plan: &Plan) -> anyhow::Result<ProxyStep> {
        use metaguard_proxy::{server, Proxy, ProxyMetrics, Server, Settings};
        let wanted = server::listeners(plan.proxy.as_ref());
        let settings = match plan.proxy {
            Some(_) => Some(Settings::new(Arc::new(config.clone()))?),
            None => None,
        };
        let settings = match (&mut self.proxy, settings) {
            (Some(p), settings) => {
                return Ok(ProxyStep::Change(p.server.prepare(&wanted, settings)?))
            }
            (None, None) => return Ok(ProxyStep::Idle),
            (None, Some(s)) => s,
        };
        let metrics = match &self.proxy_metrics {
            Some(m) => m.clone(),
            None => {
                let m = ProxyMetrics::new(self.metrics.registry())?;
                self.proxy_metrics.insert(m).clone()
            }
        };
        let directory = Arc::new(identity::Directory::new(
            self.opts.docker_socket.clone(),
            Path::new("/proc"),
        ));
        let mut server = Server::new(Proxy::new(directory.clone(), metrics, settings));
        let prepared = server.prepare(&wanted, None)?;
        Ok(ProxyStep::Start(
            ProxyService { server, directory },
            prepared,
        ))
    }

    /// Puts a prepared proxy step in force, once the rules are: its
    /// settings, its new listeners, and the end of those the plan lost.
    fn commit_proxy(&mut self, step: ProxyStep) {
        let (service, prepared) = match step {
            ProxyStep::Idle => return,
            ProxyStep::Start(service, prepared) => (self.proxy.insert(service), prepared),
            ProxyStep::Change(prepared) => match self.proxy.as_mut() {
                Some(service) => (service, prepared),
                None => return,
            },
        };
        let change = service.server.commit(prepared);
        let listening: Vec<String> = service
            .server
            .listening()
            .iter()
            .map(ToString::to_string)
            .collect();
        let names = |ls: &[metaguard_proxy::Listener]| -> Vec<String> {
            ls.iter().map(ToString::to_string).collect()
        };
        if listening.is_empty() && !change.close.is_empty() {
            info!(closed = ?names(&change.close), "proxy stopped: nothing is proxied; its listeners are closed");
        } else if !change.open.is_empty() || !change.close.is_empty() {
            info!(
                listen = ?listening,
                opened = ?names(&change.open),
                closed = ?names(&change.close),
                workers = metaguard_proxy::workers(),
                "proxy serving"
            );
        }
    }

    fn watch_netns_dirs(&mut self) -> anyhow::Result<()> {
        for dir in self.netns_dirs.clone() {
            if !self.watched.contains(&dir) {
                monitor::watch_dir(&dir, self.tx.clone(), || Event::NetnsDir)?;
                self.watched.push(dir);
            }
        }
        for dir in self.engine.cgroup_watch_dirs(&self.config) {
            if !self.watched.contains(&dir) {
                monitor::watch_dir(&dir, self.tx.clone(), || Event::Cgroup)?;
                self.watched.push(dir);
            }
        }
        Ok(())
    }

    /// Makes `guarded` match the plan's targets: monitors for new ones
    /// (with their expected table), none for those gone.
    fn sync_guarded(&mut self) -> anyhow::Result<()> {
        let mut warnings = Vec::new();
        let targets = self.engine.targets(&self.plan, &mut warnings)?;
        let keys: Vec<String> = targets.iter().map(|t| t.label.clone()).collect();
        self.guarded.retain(|k, _| keys.contains(k));
        // Scripts no target uses any more (old configs) leave the cache.
        self.expected_cache
            .retain(|script, _| targets.iter().any(|t| &t.script == script));
        for t in targets {
            let expected = match self.expected_cache.get(&t.script) {
                Some(e) => e.clone(),
                None => {
                    let e = self.engine.expected(&t.script)?;
                    self.expected_cache.insert(t.script.clone(), e.clone());
                    e
                }
            };
            match self.guarded.get_mut(&t.label) {
                Some(g) => {
                    g.expected = expected;
                    g.target = t;
                }
                None => {
                    let monitor = monitor::spawn(
                        self.engine.host(),
                        t.netns.as_ref(),
                        &t.label,
                        self.tx.clone(),
                    )?;
                    self.guarded.insert(
                        t.label.clone(),
                        Guarded {
                            target: t,
                            expected,
                            monitor,
                        },
                    );
                }
            }
        }
        Ok(())
    }

    fn update_gauges(&self) {
        let mut counts: HashMap<&str, i64> = HashMap::new();
        for w in &self.config.workloads {
            let n = match &w.selector {
                Selector::Bridges(v) => v.len(),
                Selector::Cgroups(v) => v.len(),
                Selector::Containers(v) => v.len(),
                Selector::Netns(_) => 0,
            };
            *counts.entry(w.selector.kind()).or_default() += n as i64;
        }
        *counts.entry("netns").or_default() = self.plan.netns.len() as i64;
        for kind in ["bridges", "cgroups", "containers", "netns"] {
            self.metrics
                .workloads
                .with_label_values(&[kind])
                .set(counts.get(kind).copied().unwrap_or(0));
        }
    }

    async fn run(
        &mut self,
        mut rx: mpsc::UnboundedReceiver<Event>,
        mut sig: Signals,
        load: impl Fn(Option<&Path>) -> anyhow::Result<Config>,
    ) -> anyhow::Result<()> {
        // The BPF links are also read back periodically while the layer is
        // active: a detached link gives no event (see `bpf_heal`).
        let period = bpf_heal::CHECK_PERIOD;
        let mut bpf_tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        bpf_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                Some(ev) = rx.recv() => self.handle(ev),
                _ = bpf_tick.tick(), if self.bpf.is_some() => self.check_bpf("periodic check"),
                _ = sig.hup.recv() => self.reload(&load),
                _ = sig.term.recv() => return self.stop("SIGTERM"),
                _ = sig.int.recv() => return self.stop("SIGINT"),
            }
        }
    }

    fn remember_own(&mut self, pid: u32) {
        if self.own_pids.len() >= 64 {
            self.own_pids.pop_front();
        }
        self.own_pids.push_back(pid);
    }

    fn stop(&mut self, signal: &str) -> anyhow::Result<()> {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        self.record.ready = false;
        self.save_record();
        self.guarded.clear(); // ends the monitors
        if self.opts.remove_on_exit {
            let removed = self.engine.remove()?;
            info!(signal, removed = ?removed, "stopping: --remove-on-exit, rules removed");
        } else {
            info!(signal, "stopping: rules stay in place (fail-closed)");
        }
        Ok(())
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Nft(batch) => {
                let ours = batch.pid.is_some_and(|p| self.own_pids.contains(&p));
                if !ours && (batch.touches(FAMILY, TABLE) || batch.touches("bridge", TABLE)) {
                    self.check(&batch.key.clone(), Some(&batch));
                }
            }
            Event::MonitorEnded { key } => {
                warn!(netns = %key, "nft monitor ended; restarting it and checking the table");
                if let Some(g) = self.guarded.get_mut(&key) {
                    match monitor::spawn(
                        self.engine.host(),
                        g.target.netns.as_ref(),
                        &key,
                        self.tx.clone(),
                    ) {
                        Ok(m) => g.monitor = m,
                        Err(e) => {
                            error!(netns = %key, error = %format!("{e:#}"), "cannot restart nft monitor")
                        }
                    }
                    self.check(&key, None);
                }
            }
            Event::NetnsDir => {
                if let Some(p) = &self.proxy {
                    p.directory.namespaces_changed();
                }
                self.replan("namespace appeared or left")
            }
            Event::DockerUp => {
                info!(socket = %self.opts.docker_socket.display(), "the Docker API answers; following containers");
                self.handle(Event::Docker);
            }
            Event::Docker => {
                if let Some(p) = &self.proxy {
                    p.directory.containers_changed();
                }
                self.replan("container started or stopped")
            }
            Event::Cgroup => {
                // Same paths, possibly new ids: reload the host table even
                // if its text is unchanged.
                self.plan.host.clear();
                self.replan("a configured cgroup appeared or was re-created");
                self.follow_cgroups_bpf();
            }
            Event::BpfPins => self.check_bpf("pin directory changed"),
            Event::Routing => self.heal_routing(),
        }
    }

    /// Follows deletions in the proxy's routing table (rtnetlink, on a
    /// thread of its own) once a plan has a proxy.
    fn follow_routing(&mut self) {
        if self.routing_followed || self.plan.proxy.is_none() {
            return;
        }
        let tx = self.tx.clone();
        let spawned = std::thread::Builder::new()
            .name("metaguard-routing".into())
            .spawn(move || {
                let r = metaguard_sys::rtnl::follow_table_deletions(PROXY_ROUTE_TABLE, || {
                    tx.send(Event::Routing).is_ok()
                });
                if let Err(e) = r {
                    error!(error = %e, "cannot follow the proxy's policy routing; it is checked only by verify");
                }
            });
        match spawned {
            Ok(_) => self.routing_followed = true,
            Err(e) => error!(error = %e, "cannot start the policy routing follower"),
        }
    }

    /// Puts back the proxy's policy routing after someone deleted some.
    fn heal_routing(&mut self) {
        let Some(p) = &self.plan.proxy else {
            return;
        };
        let started = Instant::now();
        match self.engine.heal_proxy(p) {
            Ok(added) if added.is_empty() => {}
            Ok(added) => {
                let secs = started.elapsed().as_secs_f64();
                self.metrics.drift.inc();
                self.metrics.heals.with_label_values(&[ROUTING_CAUSE]).inc();
                let changes = added
                    .iter()
                    .map(|o| format!("{o} deleted"))
                    .collect::<Vec<_>>()
                    .join("; ");
                info!(
                    layer = "routing",
                    cause = ROUTING_CAUSE,
                    changes = %changes,
                    ms = (secs * 1000.0) as u64,
                    "healed"
                );
            }
            Err(e) => error!(layer = "routing", error = %format!("{e:#}"), "heal failed"),
        }
    }

    /// After an apply: remembers the BPF layer as it left it — or forgets
    /// it when the layer is not active — watches its pin directory and
    /// follows its refusal events.
    fn sync_bpf(&mut self, active: bool) {
        if !active {
            self.bpf = None;
            return;
        }
        let pins = self.engine.bpf_pins();
        let links = match pins.links() {
            Ok(l) => l,
            Err(e) => {
                error!(error = %e, "cannot read the BPF layer back; it is not watched");
                self.bpf = None;
                return;
            }
        };
        let mut warnings = Vec::new();
        let planned = self.engine.bpf_desired(&self.config, &mut warnings);
        self.watch_bpf_pins(pins.path());
        let follower = self.bpf.take().and_then(|g| g.follower).or_else(|| {
            bpf_events::spawn(
                self.opts.bpf_pin_dir.clone(),
                self.metrics.bpf_refusals.clone(),
            )
        });
        self.bpf = Some(BpfGuard {
            links: links.into_iter().map(|l| (l.name(), l.info)).collect(),
            planned,
            follower,
            retry_at: None,
        });
    }

    /// inotify on the pin directory; added again after every apply, since
    /// a directory that was removed and re-created is another inode.
    fn watch_bpf_pins(&mut self, dir: &Path) {
        use inotify::WatchMask;
        let mask = WatchMask::DELETE
            | WatchMask::MOVED_FROM
            | WatchMask::DELETE_SELF
            | WatchMask::MOVE_SELF;
        let result = match &mut self.bpf_watches {
            Some(w) => w.add(dir, mask).map(drop).map_err(anyhow::Error::from),
            None => monitor::watch(dir, mask, self.tx.clone(), || Event::BpfPins)
                .map(|w| self.bpf_watches = Some(w)),
        };
        if let Err(e) = result {
            warn!(dir = %dir.display(), error = %format!("{e:#}"), "cannot watch the BPF pin directory; the periodic check still runs");
        }
    }

    /// Reads the pinned links back and compares them with what the last
    /// apply left; re-applies the layer on any difference.
    fn check_bpf(&mut self, trigger: &'static str) {
        let Some(g) = &self.bpf else {
            return;
        };
        if g.retry_at.is_some_and(|t| Instant::now() < t) {
            return;
        }
        let pins = self.engine.bpf_pins();
        let found = match pins.links() {
            Ok(actual) => bpf_heal::drift(&g.links, &actual, &pins.missing_maps()),
            Err(e) => {
                error!(error = %e, "cannot read the BPF links back");
                return;
            }
        };
        if found.is_empty() {
            return;
        }
        // A configured cgroup that went or came back is a new plan (other
        // links), not drift to undo.
        let mut warnings = Vec::new();
        if self.engine.bpf_desired(&self.config, &mut warnings) != g.planned {
            self.replan_bpf("a configured cgroup was removed or re-created");
            return;
        }
        self.heal_bpf(trigger, &found);
    }

    /// Puts the BPF layer back (one apply of it: links re-created, updated
    /// or unpinned, maps re-filled) and says what had changed.
    fn heal_bpf(&mut self, trigger: &'static str, found: &[bpf_heal::Drift]) {
        let started = Instant::now();
        let cause = found.first().map_or(bpf_heal::CAUSES[2], |d| d.cause());
        let changes = found
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        self.metrics.drift.inc();
        let mut warnings = Vec::new();
        let report = self.engine.apply_bpf(&self.config, &mut warnings);
        for w in &warnings {
            warn!(warning = %w, "bpf layer");
        }
        if report.state != "active" {
            error!(layer = "bpf", cause, changes = %changes, reason = %report.reason, "heal failed; checking again in 5 s");
            if let Some(g) = &mut self.bpf {
                g.retry_at = Some(Instant::now() + BPF_RETRY);
            }
            return;
        }
        if found.contains(&bpf_heal::Drift::MapUnpinned("mg_events")) {
            // A new ring buffer: the old follower reads one nobody writes.
            if let Some(g) = &mut self.bpf {
                g.follower = None;
            }
        }
        self.sync_bpf(true);
        let secs = started.elapsed().as_secs_f64();
        self.metrics.heals.with_label_values(&[cause]).inc();
        self.metrics.last_apply.set(secs);
        info!(
            layer = "bpf",
            pin_dir = %report.pin_dir,
            cause,
            trigger,
            changes = %changes,
            attached = report.attached.len(),
            updated = report.updated.len(),
            detached = report.detached.len(),
            ms = (secs * 1000.0) as u64,
            "healed"
        );
    }

    /// After cgroup events: a configured cgroup that appeared, went or was
    /// re-created (new id) changes what the BPF layer should hold; anything
    /// else is checked as drift.
    fn follow_cgroups_bpf(&mut self) {
        let Some(g) = &self.bpf else {
            return;
        };
        let mut warnings = Vec::new();
        if self.engine.bpf_desired(&self.config, &mut warnings) != g.planned {
            self.replan_bpf("a configured cgroup appeared, was removed or re-created");
        } else {
            self.check_bpf("cgroup event");
        }
    }

    /// Applies the BPF layer for a new plan (not a heal).
    fn replan_bpf(&mut self, why: &str) {
        let mut warnings = Vec::new();
        let report = self.engine.apply_bpf(&self.config, &mut warnings);
        for w in &warnings {
            warn!(warning = %w, "bpf layer");
        }
        info!(
            why,
            state = %report.state,
            attached = report.attached.len(),
            updated = report.updated.len(),
            detached = report.detached.len(),
            "bpf layer updated"
        );
        self.sync_bpf(report.state == "active");
    }

    /// Compares one namespace's table with what is expected; heals drift.
    fn check(&mut self, key: &str, batch: Option<&monitor::Batch>) {
        let Some(g) = self.guarded.get(key) else {
            return;
        };
        let started = Instant::now();
        // A transaction that ended with the table deleted needs no
        // read-back: heal at once (two nft runs fewer on the hot path).
        let gone = batch.is_some_and(|b| b.leaves_table_deleted(FAMILY, TABLE));
        let actual = if gone {
            None
        } else {
            match self
                .engine
                .read(g.target.netns.as_ref(), g.expected.has_bridge())
            {
                Ok(a) => a,
                Err(e) => {
                    error!(netns = %key, error = %format!("{e:#}"), "cannot read the table back");
                    return;
                }
            }
        };
        let differences = match &actual {
            None => vec![format!("table {FAMILY} {TABLE} is missing")],
            Some(a) => canonical::diff(&g.expected, a),
        };
        if differences.is_empty() {
            return;
        }
        let cause = batch.map_or("monitor-restart", |b| b.cause(FAMILY, TABLE));
        self.metrics.drift.inc();
        match self.engine.load(&g.target) {
            Ok(pid) => {
                self.remember_own(pid);
                let secs = started.elapsed().as_secs_f64();
                self.metrics.heals.with_label_values(&[cause]).inc();
                self.metrics.last_apply.set(secs);
                info!(
                    netns = %key,
                    cause,
                    by = batch.map(|b| b.process.as_str()).unwrap_or("unknown"),
                    changes = %differences.join("; "),
                    ms = (secs * 1000.0) as u64,
                    "healed"
                );
            }
            Err(e) => error!(netns = %key, cause, error = %format!("{e:#}"), "heal failed"),
        }
    }

    /// Re-plans with fresh host facts (new or removed namespaces) and
    /// applies what changed.
    fn replan(&mut self, why: &str) {
        // A namespace file exists before `ip netns add` mounts the nsfs on
        // it; wait (briefly, bounded) until every candidate is a namespace.
        let deadline = Instant::now() + Duration::from_millis(500);
        loop {
            let paths = crate::enforce::netns_paths(&self.config);
            let pending = paths.iter().any(|p| !is_nsfs(Path::new(p)));
            if !pending || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let config = self.config.clone();
        let (plan, stale) = match self.plan_now(&config) {
            Ok(p) => p,
            Err(e) => {
                error!(error = %format!("{e:#}"), why, "cannot re-plan; the rules in force stay");
                return;
            }
        };
        let before: Vec<String> = self.plan.netns.iter().map(|n| n.path.clone()).collect();
        let after: Vec<String> = plan.netns.iter().map(|n| n.path.clone()).collect();
        let host_changed = plan.host != self.plan.host;
        if before == after && !host_changed {
            return;
        }
        self.plan = plan;
        if host_changed {
            let host = Target {
                netns: None,
                label: "host".into(),
                script: self.plan.host.clone(),
            };
            match self.engine.load(&host) {
                Ok(pid) => {
                    self.remember_own(pid);
                    info!(why, "host rules updated");
                }
                Err(e) => {
                    error!(error = %format!("{e:#}"), "cannot update the host rules; the previous ones stay")
                }
            }
        }
        if let Err(e) = self.apply_new_namespaces(&before, stale) {
            error!(error = %format!("{e:#}"), "cannot guard new namespaces");
        }
        self.update_gauges();
        let status = self.status();
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&status)]);
    }

    /// Loads the tables of namespaces new to the plan and removes those of
    /// namespaces it no longer selects (with [`Stale::Keep`] — no
    /// container facts yet — those guarded earlier are kept).
    fn apply_new_namespaces(&mut self, before: &[String], stale: Stale) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut own = Vec::new();
        let done = self.engine.guard_new(&self.plan, before, stale, |g| match g {
            Guarding::Loaded { netns, pid } => {
                own.push(pid);
                info!(netns = %netns, ms = started.elapsed().as_millis() as u64, "new namespace guarded");
            }
            Guarding::Removed(netns) => {
                info!(netns = %netns, "namespace no longer selected; its table removed")
            }
            Guarding::Forgotten(netns) => info!(netns = %netns, "namespace gone; forgotten"),
        });
        for pid in own {
            self.remember_own(pid);
        }
        done?;
        self.sync_guarded()
    }

    /// SIGHUP: a new config, all or nothing: parsed, planned, the proxy's
    /// settings opened and new listeners bound, then the rules applied;
    /// only then is the proxy switched over.
    fn reload(&mut self, load: &impl Fn(Option<&Path>) -> anyhow::Result<Config>) {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Reloading]);
        let result = load(self.opts.config_path.as_deref()).and_then(|config| {
            let (plan, stale) = self.plan_now(&config)?;
            let proxy = self.prepare_proxy(&config, &plan)?;
            let report = self.engine.apply_with(&config, &plan, stale)?;
            Ok((config, plan, proxy, report))
        });
        self.record.reloads += 1;
        self.record.last_reload = Some(record::Reload {
            at_unix_ms: record::now_unix_ms(),
            applied: result.is_ok(),
            error: result.as_ref().err().map(|e| format!("{e:#}")),
        });
        match result {
            Ok((config, plan, proxy, report)) => {
                self.netns_dirs = crate::enforce::netns_dirs(&config);
                if let Err(e) = self.watch_netns_dirs() {
                    warn!(error = %format!("{e:#}"), "cannot watch a namespace directory");
                }
                self.config = config;
                self.plan = plan;
                self.commit_proxy(proxy);
                self.follow_routing();
                self.sync_bpf(report.bpf.as_ref().is_some_and(|b| b.state == "active"));
                if let Err(e) = self.sync_guarded() {
                    error!(error = %format!("{e:#}"), "after reload");
                }
                self.update_gauges();
                self.record.config = self.config.origin.to_string();
                self.watch_docker();
                self.metrics.reloads.with_label_values(&["applied"]).inc();
                info!(tables = report.tables.len(), "reloaded: new config applied");
            }
            Err(e) => {
                self.metrics.reloads.with_label_values(&["refused"]).inc();
                error!(error = %format!("{e:#}"), "reload refused; the previous rules and proxy stay in force");
            }
        }
        self.save_record();
        let status = self.status();
        let _ = sd_notify::notify(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&status),
        ]);
    }
}

/// The signals the daemon handles, registered before the first apply.
struct Signals {
    hup: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            hup: signal(SignalKind::hangup()).context("SIGHUP handler")?,
            term: signal(SignalKind::terminate()).context("SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("SIGINT handler")?,
        })
    }
}

/// Whether `p` is a namespace file (an nsfs bind mount), not the empty file
/// `ip netns add` creates first.
fn is_nsfs(p: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(p), p.parent().map(std::fs::metadata)) {
        (Ok(m), Some(Ok(parent))) => m.dev() != parent.dev(),
        _ => false,
    }
}
