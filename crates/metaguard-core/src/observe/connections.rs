//! Connection records: every `connect()` / `sendmsg()` of an observed
//! workload to a metadata endpoint, whatever its port or protocol, as the
//! cgroup BPF programs report it (docs/observe.md, "Connection records").
//! The daemon coalesces repeated identical calls ([`Coalescer`]) and
//! writes one [`Connection`] line per run into the same log as the
//! proxy's request [`Record`](super::Record)s; [`parse_line`] tells the two
//! apart. [`would_connect`] says what a config would do with one.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{ContainerInfo, Record, RECORD_VERSION};
use crate::config::{Action, Config};

/// The `kind` of a connection record (request records have none).
pub const KIND_CONNECTION: &str = "connection";

/// One observed connection, or a run of identical ones (same workload,
/// container, process, service, protocol, port, family and call) within
/// the coalescing window: one JSON line in the observe log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Connection {
    /// [`RECORD_VERSION`].
    pub v: u32,
    /// Always [`KIND_CONNECTION`].
    pub kind: String,
    /// Unix time of the last call of the run (seconds, millisecond
    /// precision).
    pub time: f64,
    /// Unix time of the first call of the run.
    pub first: f64,
    /// Calls in the run (at least 1).
    pub count: u64,
    /// `imds` or `task_metadata`: the class of the destination.
    pub service: String,
    /// The caller's workload (its name in the config observed under);
    /// empty for a network namespace nobody had classified yet.
    pub workload: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerInfo>,
    /// How the caller was identified.
    pub caller: String,
    /// The calling process's cgroup, relative to the cgroup2 root (or
    /// `cgroup id N` when the process was gone before it was read).
    pub cgroup: String,
    pub pid: u32,
    /// The calling task's `comm` (at most 15 bytes).
    pub comm: String,
    /// `ipv4` or `ipv6`.
    pub family: String,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// Destination port.
    pub port: u16,
    /// `connect` or `sendmsg`.
    pub syscall: String,
}

impl Connection {
    /// Whether the connection is HTTP's way in under `proxy`: TCP to port
    /// 80, which the nft layer sends to the proxy.
    pub fn is_http_port(&self) -> bool {
        self.protocol == "tcp" && self.port == 80
    }
}

/// One line of the observe log.
#[derive(Debug, Clone, PartialEq)]
pub enum Line {
    Request(Record),
    Connection(Connection),
}

/// Decodes one line of the observe log: a connection record (`"kind":
/// "connection"`) or a request record (no `kind`); `None` for anything
/// else (torn, corrupt, another version).
pub fn parse_line(line: &[u8]) -> Option<Line> {
    #[derive(Deserialize)]
    struct Probe {
        v: u32,
        #[serde(default)]
        kind: Option<String>,
    }
    let p: Probe = serde_json::from_slice(line).ok()?;
    if p.v != RECORD_VERSION {
        return None;
    }
    match p.kind.as_deref() {
        None => serde_json::from_slice(line).ok().map(Line::Request),
        Some(KIND_CONNECTION) => serde_json::from_slice(line).ok().map(Line::Connection),
        Some(_) => None,
    }
}

/// What a config would do with an observed connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WouldConnect {
    /// `allow`, `deny`, or `requests`: decided per HTTP request by the
    /// proxy's path policy (the workload's HTTP records say how).
    pub would: &'static str,
    pub rule: String,
}

/// What `config` would do with `c`: `deny` refuses every connection; under
/// `proxy` only TCP to port 80 reaches the proxy (its requests are then
/// decided one by one: `requests`), anything else is refused; `allow` and
/// `observe` let it through; a workload the config lacks is untouched.
pub fn would_connect(config: &Config, c: &Connection) -> WouldConnect {
    let Some(w) = config.workloads.iter().find(|w| w.name == c.workload) else {
        let rule = if c.workload.is_empty() {
            "a namespace not classified yet (its workload decides once known)".to_string()
        } else {
            format!("no workload {:?} in the config (untouched)", c.workload)
        };
        return WouldConnect {
            would: "allow",
            rule,
        };
    };
    let action = if c.service == "task_metadata" {
        w.task_metadata
    } else {
        w.imds
    };
    let (would, rule) = match action {
        Action::Deny => ("deny", format!("{} = \"deny\"", c.service)),
        Action::Proxy if c.is_http_port() => (
            "requests",
            format!(
                "{} = \"proxy\": HTTP on port 80 goes to the proxy, its requests decide",
                c.service
            ),
        ),
        Action::Proxy => (
            "deny",
            format!(
                "{} = \"proxy\": only HTTP on TCP port 80 reaches the proxy, {}/{} is refused",
                c.service, c.protocol, c.port
            ),
        ),
        Action::Allow | Action::Observe => {
            ("allow", format!("{} = \"{}\"", c.service, action.as_str()))
        }
    };
    WouldConnect { would, rule }
}

/// Coalesces repeated identical events (equal keys) into runs: each key
/// is held from its first event until `window` seconds have passed, then
/// handed out once with its count. At most `max_keys` keys are held; an
/// event that would exceed it hands out every held run first. Memory is
/// therefore bounded by `max_keys`, and a loop of identical calls gives one
/// run per window, however fast it calls.
#[derive(Debug)]
pub struct Coalescer<K: Ord, V> {
    window: f64,
    max_keys: usize,
    held: BTreeMap<K, Run<V>>,
}

/// A run of identical events: the first event's payload, when the first
/// and last were seen, and how many there were.
#[derive(Debug, Clone, PartialEq)]
pub struct Run<V> {
    pub value: V,
    pub first: f64,
    pub last: f64,
    pub count: u64,
}

impl<K: Ord, V> Coalescer<K, V> {
    /// Holds runs for `window` seconds, at most `max_keys` of them (at
    /// least 1).
    pub fn new(window: f64, max_keys: usize) -> Coalescer<K, V> {
        Coalescer {
            window,
            max_keys: max_keys.max(1),
            held: BTreeMap::new(),
        }
    }

    /// Counts one event seen at `time`; returns the runs that must be
    /// written now (all held ones, when a new key finds the table full).
    pub fn add(&mut self, key: K, value: V, time: f64) -> Vec<Run<V>> {
        if let Some(run) = self.held.get_mut(&key) {
            run.count += 1;
            run.last = run.last.max(time);
            return Vec::new();
        }
        let out = if self.held.len() >= self.max_keys {
            self.flush()
        } else {
            Vec::new()
        };
        self.held.insert(
            key,
            Run {
                value,
                first: time,
                last: time,
                count: 1,
            },
        );
        out
    }

    /// The runs whose window has passed at `now`, oldest first.
    pub fn due(&mut self, now: f64) -> Vec<Run<V>> {
        let window = self.window;
        let (due, keep): (BTreeMap<K, Run<V>>, BTreeMap<K, Run<V>>) =
            std::mem::take(&mut self.held)
                .into_iter()
                .partition(|(_, r)| now - r.first >= window);
        self.held = keep;
        let mut out: Vec<Run<V>> = due.into_values().collect();
        out.sort_by(|a, b| a.first.total_cmp(&b.first));
        out
    }

    /// Every held run, oldest first (at shutdown).
    pub fn flush(&mut self) -> Vec<Run<V>> {
        let mut out: Vec<Run<V>> = std::mem::take(&mut self.held).into_values().collect();
        out.sort_by(|a, b| a.first.total_cmp(&b.first));
        out
    }

    /// Whether a run of `key` is held (its next event only counts).
    pub fn holds(&self, key: &K) -> bool {
        self.held.contains_key(key)
    }

    /// Runs held now.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

/// The most distinct `comm`s and pids listed per connection access.
pub const MAX_PROCESSES: usize = 8;

/// One kind of connection (service, protocol, port) of one caller,
/// aggregated over its records.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConnectionAccess {
    pub service: String,
    /// `tcp` or `udp`.
    pub protocol: String,
    pub port: u16,
    /// Families seen (`ipv4`, `ipv6`).
    pub families: Vec<String>,
    /// Calls seen (the records' counts summed).
    pub count: u64,
    pub first_seen: f64,
    pub last_seen: f64,
    /// Distinct `comm`s of the callers (at most [`MAX_PROCESSES`]).
    pub comms: Vec<String>,
    /// Distinct pids (at most [`MAX_PROCESSES`]).
    pub pids: Vec<u32>,
    /// Distinct cgroups (at most [`MAX_PROCESSES`]).
    pub cgroups: Vec<String>,
    /// What the config would do: `allow`, `deny`, or `requests` (TCP port
    /// 80 under `proxy`: the HTTP requests listed next to it decide).
    pub would: &'static str,
    pub rule: String,
}

fn push_bounded<T: PartialEq + Clone>(v: &mut Vec<T>, x: &T) {
    if !v.contains(x) && v.len() < MAX_PROCESSES {
        v.push(x.clone());
    }
}

/// Aggregates one caller's connection records per (service, protocol,
/// port), and asks `config` about each.
pub fn connection_accesses(config: &Config, conns: &[&Connection]) -> Vec<ConnectionAccess> {
    let mut by: BTreeMap<(String, String, u16), Vec<&Connection>> = BTreeMap::new();
    for c in conns {
        by.entry((c.service.clone(), c.protocol.clone(), c.port))
            .or_default()
            .push(c);
    }
    by.into_iter()
        .map(|((service, protocol, port), cs)| {
            let verdict = would_connect(config, cs[0]);
            let mut a = ConnectionAccess {
                service,
                protocol,
                port,
                families: Vec::new(),
                count: 0,
                first_seen: f64::INFINITY,
                last_seen: f64::NEG_INFINITY,
                comms: Vec::new(),
                pids: Vec::new(),
                cgroups: Vec::new(),
                would: verdict.would,
                rule: verdict.rule,
            };
            for c in cs {
                a.count += c.count.max(1);
                a.first_seen = a.first_seen.min(c.first.min(c.time));
                a.last_seen = a.last_seen.max(c.time);
                push_bounded(&mut a.families, &c.family);
                push_bounded(&mut a.comms, &c.comm);
                push_bounded(&mut a.pids, &c.pid);
                push_bounded(&mut a.cgroups, &c.cgroup);
            }
            a.families.sort();
            a.comms.sort();
            a.pids.sort_unstable();
            a.cgroups.sort();
            a
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::{report_with, suggest_with, Window};

    const OBSERVED: &str = r#"mode = "observe"

[[workload]]
name = "containers"
bridges = ["docker0"]
imds = "proxy"
task_metadata = "deny"

[[workload]]
name = "host"
cgroups = ["docker"]
imds = "deny"

[[workload]]
name = "quiet"
cgroups = ["system.slice"]
imds = "deny"
"#;

    fn enforced() -> Config {
        Config::parse_enforced(OBSERVED, "observed.toml").expect("valid")
    }

    pub(crate) fn conn(
        workload: &str,
        container: Option<&str>,
        proto: &str,
        port: u16,
    ) -> Connection {
        Connection {
            v: RECORD_VERSION,
            kind: KIND_CONNECTION.into(),
            time: 1001.0,
            first: 1000.0,
            count: 3,
            service: "imds".into(),
            workload: workload.into(),
            container: container.map(|n| ContainerInfo {
                id: format!("{n}-id"),
                name: n.into(),
                ..ContainerInfo::default()
            }),
            caller: "process in cgroup docker/h1".into(),
            cgroup: "docker/h1".into(),
            pid: 4242,
            comm: "lab-probe".into(),
            family: "ipv4".into(),
            protocol: proto.into(),
            port,
            syscall: if proto == "udp" { "sendmsg" } else { "connect" }.into(),
        }
    }

    #[test]
    fn lines_of_both_kinds_parse_and_others_are_refused() {
        let c = conn("host", None, "udp", 53);
        let line = serde_json::to_vec(&c).expect("json");
        assert!(!line.contains(&b'\n'));
        assert_eq!(parse_line(&line), Some(Line::Connection(c)));
        let r = Record {
            v: RECORD_VERSION,
            time: 1.0,
            service: "imds".into(),
            workload: "w".into(),
            container: None,
            caller: "x".into(),
            family: "ipv4".into(),
            method: "GET".into(),
            path: "/".into(),
            imds_version: Some("v1".into()),
            status: 200,
            decision: "allow".into(),
            own_id: None,
            access_key_id: None,
            caller_ids_known: None,
            over_limit: None,
        };
        let line = serde_json::to_vec(&r).expect("json");
        assert_eq!(parse_line(&line), Some(Line::Request(r)));
        for bad in [
            &b"{\"v\":1,\"kind\":\"other\"}"[..],
            b"{\"v\":2}",
            b"{\"v\":1,\"kind\":\"connection\"}",
            b"not json",
        ] {
            assert_eq!(parse_line(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn the_coalescer_counts_runs_per_window_and_stays_bounded() {
        let mut c: Coalescer<(u32, u16), &str> = Coalescer::new(1.0, 2);
        // A UDP loop: 1000 identical calls in half a second, one run.
        for i in 0..1000 {
            assert!(c.add((1, 53), "a", 10.0 + f64::from(i) / 2000.0).is_empty());
        }
        assert!(c.due(10.9).is_empty(), "its window is not over");
        let runs = c.due(11.0);
        assert_eq!(runs.len(), 1);
        assert_eq!(
            (runs[0].count, runs[0].first, runs[0].value),
            (1000, 10.0, "a")
        );
        assert!(runs[0].last > 10.49 && runs[0].last < 10.5);
        assert!(c.is_empty() && !c.holds(&(1, 53)));
        // A third key in a full table hands out the two held runs.
        assert!(c.add((1, 80), "b", 20.0).is_empty());
        assert!(c.add((2, 80), "c", 20.1).is_empty());
        let out = c.add((3, 80), "d", 20.2);
        assert_eq!(out.iter().map(|r| r.value).collect::<Vec<_>>(), ["b", "c"]);
        assert_eq!(c.len(), 1);
        assert_eq!(c.flush().len(), 1);
    }

    #[test]
    fn a_config_refuses_odd_ports_under_proxy_and_leaves_port_80_to_the_requests() {
        let cfg = enforced();
        let w = |c: &Connection| would_connect(&cfg, c).would;
        assert_eq!(w(&conn("containers", Some("c1"), "tcp", 80)), "requests");
        assert_eq!(w(&conn("containers", Some("c1"), "udp", 80)), "deny");
        assert_eq!(w(&conn("containers", Some("c1"), "tcp", 8080)), "deny");
        assert_eq!(w(&conn("host", None, "tcp", 80)), "deny");
        let mut tmd = conn("containers", Some("c1"), "tcp", 80);
        tmd.service = "task_metadata".into();
        assert_eq!(w(&tmd), "deny");
        assert_eq!(w(&conn("gone", None, "udp", 53)), "allow");
        assert_eq!(w(&conn("", None, "udp", 53)), "allow");
        assert!(would_connect(&cfg, &conn("containers", None, "udp", 53))
            .rule
            .contains("only HTTP on TCP port 80"));
    }

    #[test]
    fn the_report_lists_connections_next_to_requests_per_caller() {
        let cfg = enforced();
        let mut v6 = conn("containers", Some("c1"), "udp", 53);
        v6.family = "ipv6".into();
        v6.pid = 4243;
        v6.comm = "dig".into();
        let conns = vec![
            conn("containers", Some("c1"), "udp", 53),
            v6,
            conn("containers", Some("c1"), "tcp", 80),
            conn("host", None, "tcp", 80),
        ];
        let r = report_with(&cfg, &[], &conns, Window::default());
        assert_eq!(r.window.records, 4);
        assert_eq!((r.window.from, r.window.to), (Some(1000.0), Some(1001.0)));
        let c = &r.workloads[0];
        assert_eq!(c.workload, "containers");
        assert_eq!(c.callers.len(), 1, "one container");
        let list = &c.callers[0].connections;
        assert_eq!(list.len(), 2);
        let udp = &list[1];
        assert_eq!((udp.protocol.as_str(), udp.port, udp.count), ("udp", 53, 6));
        assert_eq!(udp.families, ["ipv4", "ipv6"]);
        assert_eq!(udp.comms, ["dig", "lab-probe"]);
        assert_eq!(udp.pids, [4242, 4243]);
        assert_eq!(udp.would, "deny");
        assert_eq!(list[0].would, "requests");
        let host = &r.workloads[1];
        assert_eq!(host.callers[0].caller, "process in cgroup docker/h1");
        assert!(host.callers[0].accesses.is_empty());
        assert_eq!(r.summary.connections, 12);
        assert_eq!(r.summary.would_deny_connections, 9);
    }

    #[test]
    fn the_suggestion_allows_a_service_used_off_port_80_with_its_evidence() {
        let cfg = enforced();
        let conns = vec![
            conn("containers", Some("c1"), "udp", 53),
            conn("host", None, "tcp", 80),
        ];
        let text = suggest_with(&cfg, &[], &conns);
        let c = Config::parse(&text, "s.toml").unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(c.workloads[0].imds, Action::Allow, "{text}");
        assert!(
            text.contains("# observed connections no proxy can serve: udp/53 ×3, by c1"),
            "{text}"
        );
        // Port-80 TCP alone is decided by the HTTP records: none → deny.
        assert_eq!(c.workloads[1].imds, Action::Deny, "{text}");
        assert_eq!(c.workloads[2].imds, Action::Deny);
        assert_eq!(c.workloads[0].task_metadata, Action::Deny);
    }
}
