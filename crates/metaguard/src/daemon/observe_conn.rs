//! Connection records (docs/observe.md): the BPF layer's *observed*
//! events — every `connect()` / `sendmsg()` of an observed workload to a
//! metadata endpoint, whatever its port or protocol — attributed to their
//! workload, container, cgroup, pid and comm, coalesced
//! (`core::observe::Coalescer`) and written to the observe log next to the
//! proxy's request records.
//!
//! Runs on the events follower's thread ([`super::bpf_events`]), never on
//! the runtime. What attribution needs from the daemon — its config, the
//! namespace map as written, the containers, the observe log — is a
//! [`View`] the daemon publishes into [`Shared`] after every apply and
//! every namespace map update.
//!
//! * **Workload**: the rule index the programs decided with
//!   (`core::bpf_policy::rule_workload`), except for a namespace nobody
//!   had classified yet (its cookie not in the map, key 0 decided): no
//!   workload then.
//! * **Container**: the caller's cgroup id, looked up among the
//!   containers' cgroups and their sub-cgroups (the index the proxy uses
//!   for host callers), rebuilt at most once a second on a miss.
//! * **cgroup**: `/proc/<pid>/cgroup`, read at a run's first event, while
//!   the caller is (almost always) still there (`cgroup id N` when it is
//!   gone already).
//!
//! Bounded: at most [`MAX_RUNS`] runs are held, each at most [`WINDOW`]; a
//! loop of identical calls writes one record per window.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use metaguard_core::bpf_policy;
use metaguard_core::observe::{Coalescer, Connection, ContainerInfo, Run, KIND_CONNECTION};
use metaguard_core::ruleset::ContainerFact;
use metaguard_core::Config;
use metaguard_proxy::ObserveLog;
use metaguard_sys::bpf::Event;
use prometheus::{IntCounter, IntCounterVec};
use tracing::warn;

/// How long identical calls are coalesced into one record.
pub const WINDOW: Duration = Duration::from_secs(1);
/// The most runs held at once (then all are written).
pub const MAX_RUNS: usize = 1024;

/// What attribution needs, as the daemon last published it.
#[derive(Debug)]
pub struct View {
    pub config: Arc<Config>,
    /// The observe log, when the config observes something.
    pub log: Option<Arc<ObserveLog>>,
    /// The namespace map as last written (cookie → rule, bits).
    pub netns: BTreeMap<u64, (u32, u32)>,
    pub containers: Arc<Vec<ContainerFact>>,
    /// `metaguard_observe_write_errors_total` (the proxy's, registered
    /// whenever something is observed).
    pub write_errors: Option<IntCounter>,
}

/// The daemon's side publishes, the follower reads.
#[derive(Debug, Clone, Default)]
pub struct Shared(Arc<Mutex<Option<Arc<View>>>>);

impl Shared {
    pub fn publish(&self, view: View) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(view));
    }

    fn get(&self) -> Option<Arc<View>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// What makes two events the same call for coalescing.
type Key = (
    u32,
    u64,
    u64,
    u32,
    u32,
    u32,
    u16,
    &'static str,
    [u8; 16],
    String,
);

fn key(e: &Event) -> Key {
    (
        e.pid,
        e.cgroup_id,
        e.netns_cookie,
        e.rule,
        e.family,
        e.sock_type,
        e.port,
        e.syscall,
        e.addr,
        e.comm.clone(),
    )
}

/// The follower's recorder.
pub struct Recorder {
    shared: Shared,
    /// Each run's first event and its caller's cgroup path.
    runs: Coalescer<Key, (Event, Option<String>)>,
    /// `metaguard_observed_connections_total{workload, service, protocol}`.
    connections: IntCounterVec,
    proc_root: PathBuf,
    /// cgroup id → container, for the containers of `index_of`.
    index: HashMap<u64, Option<ContainerFact>>,
    index_of: Option<Arc<Vec<ContainerFact>>>,
    index_at: Option<Instant>,
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

impl Recorder {
    pub fn new(shared: Shared, connections: IntCounterVec, proc_root: &Path) -> Recorder {
        Recorder {
            shared,
            runs: Coalescer::new(WINDOW.as_secs_f64(), MAX_RUNS),
            connections,
            proc_root: proc_root.to_path_buf(),
            index: HashMap::new(),
            index_of: None,
            index_at: None,
        }
    }

    /// Counts one observed event; writes what must be written now.
    pub fn add(&mut self, e: Event) {
        let k = key(&e);
        let cgroup = if self.runs.holds(&k) {
            None
        } else {
            metaguard_sys::cgroup::of_process(&self.proc_root, e.pid)
        };
        let full = self.runs.add(k, (e, cgroup), now());
        self.write(full);
    }

    /// Writes the runs whose window has passed.
    pub fn tick(&mut self) {
        let due = self.runs.due(now());
        self.write(due);
    }

    /// Writes every run held (the follower stops).
    pub fn flush(&mut self) {
        let all = self.runs.flush();
        self.write(all);
    }

    fn write(&mut self, runs: Vec<Run<(Event, Option<String>)>>) {
        if runs.is_empty() {
            return;
        }
        let Some(view) = self.shared.get() else {
            return;
        };
        let Some(log) = view.log.clone() else {
            return; // the config observes nothing (any more)
        };
        for run in runs {
            let Some(c) = self.connection(&view, &run) else {
                continue;
            };
            self.connections
                .with_label_values(&[&c.workload, &c.service, &c.protocol])
                .inc_by(c.count);
            if let Err(e) = log.record_connection(&c) {
                warn!(error = %e, "observe: cannot write a connection record");
                if let Some(w) = &view.write_errors {
                    w.inc();
                }
            }
        }
    }

    /// The record of one run; `None` when its destination is no endpoint
    /// of the config (it changed since the event).
    fn connection(
        &mut self,
        view: &View,
        run: &Run<(Event, Option<String>)>,
    ) -> Option<Connection> {
        let (e, cgroup) = &run.value;
        let service = service_of(&view.config, e.destination()?)?;
        let unclassified = e.netns_cookie != 0
            && !view.netns.contains_key(&e.netns_cookie)
            && view.netns.get(&0).is_some_and(|d| d.0 == e.rule);
        let workload = match bpf_policy::rule_workload(e.rule) {
            Some(i) if !unclassified => view
                .config
                .workloads
                .get(i)
                .map(|w| w.name.clone())
                .unwrap_or_default(),
            _ => String::new(),
        };
        let container = self.container_of(view, e.cgroup_id);
        let cgroup = cgroup
            .clone()
            .unwrap_or_else(|| format!("cgroup id {}", e.cgroup_id));
        let caller = match (&container, unclassified) {
            (Some(k), _) => format!("container {} (cgroup id {})", k.name, e.cgroup_id),
            (None, true) => format!(
                "namespace cookie {} (not classified yet), cgroup {cgroup}",
                e.netns_cookie
            ),
            (None, false) => format!("process in cgroup {cgroup}"),
        };
        Some(Connection {
            v: metaguard_core::observe::RECORD_VERSION,
            kind: KIND_CONNECTION.into(),
            time: (run.last * 1000.0).round() / 1000.0,
            first: (run.first * 1000.0).round() / 1000.0,
            count: run.count,
            service: service.into(),
            workload,
            container,
            caller,
            cgroup,
            pid: e.pid,
            comm: e.comm.clone(),
            family: e.family_name().into(),
            protocol: e.transport().into(),
            port: e.port,
            syscall: e.syscall.into(),
        })
    }

    /// The container whose cgroup (or a sub-cgroup of it) is `id`.
    fn container_of(&mut self, view: &View, id: u64) -> Option<ContainerInfo> {
        let same = self
            .index_of
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(c, &view.containers));
        let stale = !same
            || (!self.index.contains_key(&id)
                && self
                    .index_at
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(1)));
        if stale {
            self.index = super::identity::cgroup_index(&self.proc_root, &view.containers);
            self.index_of = Some(view.containers.clone());
            self.index_at = Some(Instant::now());
        }
        let k = self.index.get(&id)?.as_ref()?;
        Some(ContainerInfo::new(&k.id, &k.name, &k.labels).with_image(&k.image))
    }
}

/// `imds` or `task_metadata`: the class of `ip` in `config`'s endpoints
/// (an IPv4-mapped address as its IPv4 address, as the programs do).
fn service_of(config: &Config, ip: IpAddr) -> Option<&'static str> {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    let norm = |a: &IpAddr| match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(*a, IpAddr::V4),
        v4 => *v4,
    };
    if config.endpoints.imds.iter().any(|a| norm(a) == ip) {
        Some("imds")
    } else if config.endpoints.task_metadata.iter().any(|a| norm(a) == ip) {
        Some("task_metadata")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_map_to_their_service_mapped_addresses_too() {
        let c = Config::builtin_default();
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(service_of(&c, ip("169.254.169.254")), Some("imds"));
        assert_eq!(service_of(&c, ip("::ffff:169.254.169.254")), Some("imds"));
        assert_eq!(service_of(&c, ip("fd00:ec2::254")), Some("imds"));
        assert_eq!(service_of(&c, ip("169.254.170.2")), Some("task_metadata"));
        assert_eq!(service_of(&c, ip("10.0.0.1")), None);
    }

    fn event(cookie: u64, rule: u32, ip: [u8; 4], sock_type: u32) -> Event {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&ip);
        Event {
            cgroup_id: 99,
            pid: 4_000_000, // no such process: the cgroup is not read
            syscall: "sendmsg",
            family: 2,
            port: 53,
            addr,
            sock_type,
            protocol: 17,
            netns_cookie: cookie,
            sock_cookie: 1,
            comm: "probe".into(),
            observed: true,
            rule,
        }
    }

    #[test]
    fn runs_are_attributed_by_rule_coalesced_and_written() {
        use bpf_policy::{rule_index, NO_RULE, OBSERVE_IMDS};
        let config = Config::parse(
            "mode = \"observe\"\n[[workload]]\nname = \"b\"\nbridges = [\"docker0\"]\nimds = \"deny\"\n\n[[workload]]\nname = \"h\"\ncgroups = [\"x\"]\nimds = \"deny\"\n",
            "t.toml",
        )
        .expect("config");
        let dir = std::env::temp_dir().join(format!("mg-obsconn-log-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let log = ObserveLog::open(&dir, metaguard_proxy::observe::Caps::default()).expect("log");
        let shared = Shared::default();
        let default = (rule_index(0, 0), OBSERVE_IMDS);
        shared.publish(View {
            config: Arc::new(config),
            log: Some(Arc::new(log)),
            netns: [(0, default), (555, default), (1, (NO_RULE, 0))].into(),
            containers: Arc::new(Vec::new()),
            write_errors: None,
        });
        let counter = IntCounterVec::new(
            prometheus::Opts::new("t", "t"),
            &["workload", "service", "protocol"],
        )
        .expect("metric");
        let mut r = Recorder::new(shared, counter.clone(), &dir);
        let imds = [169, 254, 169, 254];
        // A UDP loop in a classified namespace: one run.
        for _ in 0..100 {
            r.add(event(555, rule_index(0, 0), imds, 2));
        }
        // A namespace nobody classified (key 0 decided), a host process
        // of the cgroups workload, and a destination that is no endpoint
        // (any more).
        r.add(event(777, rule_index(0, 0), imds, 1));
        r.add(event(1, rule_index(1, 0), imds, 1));
        r.add(event(1, rule_index(1, 0), [10, 0, 0, 1], 1));
        r.tick();
        assert!(
            metaguard_proxy::observe::read(&dir, None)
                .expect("read")
                .connections
                .is_empty(),
            "nothing before the window ends"
        );
        r.flush();
        let read = metaguard_proxy::observe::read(&dir, None).expect("read");
        let got: Vec<(&str, u64, &str, &str)> = read
            .connections
            .iter()
            .map(|c| {
                (
                    c.workload.as_str(),
                    c.count,
                    c.protocol.as_str(),
                    c.cgroup.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("b", 100, "udp", "cgroup id 99"),
                ("", 1, "tcp", "cgroup id 99"),
                ("h", 1, "tcp", "cgroup id 99"),
            ]
        );
        assert!(read.connections[1].caller.contains("not classified yet"));
        assert_eq!(read.connections[0].comm, "probe");
        assert_eq!(counter.with_label_values(&["b", "imds", "udp"]).get(), 100);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_process_cgroup_is_read_from_proc() {
        let d = std::env::temp_dir().join(format!("mg-obsconn-proc-{}", std::process::id()));
        std::fs::create_dir_all(d.join("42")).expect("dir");
        std::fs::write(d.join("42/cgroup"), "0::/metaguard-lab/x/docker/c1\n").expect("write");
        assert_eq!(
            metaguard_sys::cgroup::of_process(&d, 42).as_deref(),
            Some("metaguard-lab/x/docker/c1")
        );
        assert_eq!(metaguard_sys::cgroup::of_process(&d, 43), None);
        let _ = std::fs::remove_dir_all(&d);
    }
}
