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
//! * **BPF events.** A thread of its own follows the layer's ring buffer:
//!   refusals become audit lines ([`bpf_events`]); calls of observed
//!   workloads, let through, become connection records in the observe log,
//!   coalesced per second ([`observe_conn`]). SIGTERM writes the runs held.
//! * **Metrics and health** on a loopback address only (see [`metrics`]).

mod bpf_events;
mod bpf_heal;
mod bpf_sync;
mod identity;
mod metrics;
mod monitor;
mod observe_conn;
mod reconcile;
pub mod record;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use metaguard_core::config::Selector;
use metaguard_core::ruleset::{ContainerFact, Plan, FAMILY, PROXY_ROUTE_TABLE, TABLE};
use metaguard_core::Config;
use metaguard_proxy::server::Prepared;
use metaguard_sys::bpf::{Attachment, LinkInfo, MapContents};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

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
    /// Where observed requests are recorded (docs/observe.md).
    pub observe_dir: PathBuf,
    /// How much of them is kept.
    pub observe_caps: metaguard_proxy::observe::Caps,
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
    /// The namespace map (`mg_netns`) as last written.
    netns: BTreeMap<u64, (u32, u32)>,
    /// The warnings of the last namespace-map update: the next one logs
    /// only those it does not repeat (it runs on every container event).
    netns_warnings: Vec<String>,
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
    /// The observe log, opened when a config first observes something and
    /// kept for the daemon's life (it rotates by its own size).
    observe_log: Option<Arc<metaguard_proxy::ObserveLog>>,
    /// What the BPF events follower attributes observed connections with.
    conn_view: observe_conn::Shared,
    /// The containers the Docker API last listed: the facts of plans made
    /// while it does not answer (dockerd restarting), so that its task
    /// namespaces stay in the plan. `None` until it first answered.
    containers: Option<Vec<ContainerFact>>,
    /// Whether the Docker API answers now (set by the watcher).
    docker_up: Arc<AtomicBool>,
    /// Docker events received (by the watcher, at once): the relay holds an
    /// agent container's address back while one is not yet planned for.
    docker_events: Arc<AtomicU64>,
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
    // The proxy holds a descriptor per client connection: the soft limit
    // (1024 under systemd) up to the hard one. Observed workloads' open
    // connections are bounded by a quarter of it (proxy::limits).
    let (before, after) = metaguard_sys::process::raise_open_files_limit();
    if before != after {
        debug!(?before, ?after, "open files limit raised");
    }
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
            observe_log: None,
            conn_view: observe_conn::Shared::default(),
            containers: None,
            docker_up: Arc::new(AtomicBool::new(false)),
            docker_events: Arc::new(AtomicU64::new(0)),
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
        self.publish_agent(self.agent_for(&self.config), 0);
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
        let events = self.docker_events.clone();
        tokio::spawn(crate::discovery::docker::watch(
            self.opts.docker_socket.clone(),
            self.started,
            move |e| {
                events.fetch_add(1, Ordering::SeqCst);
                tx.send(match e {
                    DockerEvent::Up => Event::DockerUp,
                    DockerEvent::Changed => Event::Docker,
                })
                .is_ok()
            },
            self.docker_up.clone(),
        ));
    }

    /// Where the relay should send credentials under `config` with the
    /// containers last listed (the plan's facts): the agent container's
    /// address, when `[agent] credentials` names one.
    fn agent_for(&self, config: &Config) -> Result<SocketAddr, String> {
        match (&config.agent_container, &self.containers) {
            (None, _) => Ok(config.agent_credentials),
            (Some(a), Some(cs)) => metaguard_core::identify::agent_address(a, cs),
            (Some(_), None) => Err("the Docker API has not answered yet".into()),
        }
    }

    /// Publishes `agent` to the relay (see `Directory::publish_agent`), as
    /// planned with the Docker events up to `events`.
    fn publish_agent(&self, agent: Result<SocketAddr, String>, events: u64) {
        if let Some(p) = &self.proxy {
            p.directory.publish_agent(agent, events);
        }
    }

    /// The Docker events received so far (read before a plan's listing).
    fn docker_events_seen(&self) -> u64 {
        self.docker_events.load(Ordering::SeqCst)
    }

    /// Before the rules change: when the agent's address will change,
    /// nothing is relayed until the new rules are in force.
    fn hold_agent(&self, next: &Result<SocketAddr, String>) {
        if let Some(p) = &self.proxy {
            if p.directory.published_agent().as_ref() != Some(next) {
                p.directory
                    .publish_agent(Err("the agent's container is changing".into()), 0);
            }
        }
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
            Some(_) => {
                let observe = self.observe_log(config)?;
                Some(Settings::new(Arc::new(config.clone()))?.with_observe(observe))
            }
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
        let directory = Arc::new(
            identity::Directory::new(self.opts.docker_socket.clone(), Path::new("/proc"))
                .with_docker_events(self.docker_events.clone()),
        );
        let mut server = Server::new(Proxy::new(directory.clone(), metrics, settings));
        let prepared = server.prepare(&wanted, None)?;
        Ok(ProxyStep::Start(
            ProxyService { server, directory },
            prepared,
        ))
    }

    /// The observe log when `config` observes something: opened the first
    /// time (an unwritable directory refuses the config, as an unwritable
    /// audit log does).
    fn observe_log(
        &mut self,
        config: &Config,
    ) -> anyhow::Result<Option<Arc<metaguard_proxy::ObserveLog>>> {
        if !config.observes() {
            return Ok(None);
        }
        if let Some(log) = &self.observe_log {
            return Ok(Some(log.clone()));
        }
        let log =
            metaguard_proxy::ObserveLog::open(&self.opts.observe_dir, self.opts.observe_caps)?;
        info!(dir = %self.opts.observe_dir.display(), "recording observed requests");
        Ok(Some(self.observe_log.insert(Arc::new(log)).clone()))
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
                              // Ends the proxy's workers, then writes its buffered audit lines:
                              // every answered request is in the audit log before the exit.
        self.proxy = None;
        // Writes the connection runs the BPF events follower holds.
        if let Some(f) = self.bpf.as_mut().and_then(|g| g.follower.take()) {
            f.finish();
        }
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
