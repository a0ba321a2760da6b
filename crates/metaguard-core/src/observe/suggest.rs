//! `metaguard report --suggest`: a config that allows exactly what was
//! observed and denies the rest, every allowance with its evidence in a
//! comment. The text parses with `Config::parse` (a unit test holds it to
//! that for every input it generates).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::{Connection, Record};
use crate::config::{
    Action, Config, ContainerRef, NetnsSelector, Selector, TmdsMode, Workload,
    DEFAULT_AGENT_CREDENTIALS, DEFAULT_IMDS, DEFAULT_TASK_METADATA,
};
use crate::proxy_decision::Kind;

fn q(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn list<'a>(items: impl IntoIterator<Item = &'a str>) -> String {
    let v: Vec<String> = items.into_iter().map(q).collect();
    format!("[{}]", v.join(", "))
}

fn selector(s: &Selector) -> String {
    match s {
        Selector::Bridges(g) => format!("bridges = {}", list(g.iter().map(String::as_str))),
        Selector::Cgroups(g) => format!("cgroups = {}", list(g.iter().map(String::as_str))),
        Selector::Netns(n) => format!(
            "netns = {}",
            list(n.iter().map(|n| match n {
                NetnsSelector::EcsTasks => "ecs-tasks",
                NetnsSelector::Path(p) => p.as_str(),
            }))
        ),
        Selector::Containers(c) => {
            let v: Vec<String> = c
                .iter()
                .map(|c| match c {
                    ContainerRef::Name(n) => n.clone(),
                    ContainerRef::Label { key, value } => format!("label:{key}={value}"),
                })
                .collect();
            format!("containers = {}", list(v.iter().map(String::as_str)))
        }
    }
}

/// What was seen of one path.
#[derive(Default)]
struct Evidence {
    count: u64,
    v1: u64,
    v2: u64,
    methods: Vec<String>,
    callers: Vec<String>,
    first: f64,
    last: f64,
}

impl Evidence {
    fn add(&mut self, r: &Record) {
        if self.count == 0 {
            self.first = r.time;
            self.last = r.time;
        }
        self.count += 1;
        match r.imds_version.as_deref() {
            Some("v2") => self.v2 += 1,
            Some(_) => self.v1 += 1,
            None => {}
        }
        if !self.methods.contains(&r.method) {
            self.methods.push(r.method.clone());
        }
        let who = r
            .container
            .as_ref()
            .map(|c| {
                let name: String = if c.name.is_empty() {
                    c.id.chars().take(12).collect()
                } else {
                    c.name.clone()
                };
                match &c.image {
                    Some(image) => format!("{name} (image {image})"),
                    None => name,
                }
            })
            .unwrap_or_else(|| r.caller.clone());
        if !self.callers.contains(&who) && self.callers.len() < 4 {
            self.callers.push(who);
        }
        self.first = self.first.min(r.time);
        self.last = self.last.max(r.time);
    }

    fn comment(&self, kind: Kind) -> String {
        let versions = if kind == Kind::Imds {
            format!(" (v1 {}, v2 {})", self.v1, self.v2)
        } else {
            String::new()
        };
        format!(
            "# observed: {} ×{}{}, by {}; first {:.0}, last {:.0}",
            self.methods.join("/"),
            self.count,
            versions,
            self.callers.join(", "),
            self.first,
            self.last
        )
    }
}

/// The `credentials_ids` line a workload needs under `proxy`, commented
/// out, with its evidence: its callers used credentials ids the relay could
/// not attribute to them (it knows none of theirs — not Docker containers,
/// or their environment does not show one). The records keep 4 characters
/// of an id (ids are bearer capabilities), and no source the suggestion
/// can read knows the rest — the relay would have attributed them if
/// Docker showed them —, so the line names each id by its first characters
/// for the operator to fill in; the workload keeps `allow` meanwhile.
fn write_credentials_ids(out: &mut String, w: &Workload, recs: &[&Record]) {
    let mut ids: BTreeMap<&str, Evidence> = BTreeMap::new();
    for r in recs {
        if let Some(id) = r.unattributed_id() {
            ids.entry(id).or_default().add(r);
        }
    }
    let _ = writeln!(
        out,
        "# credentials_ids: its callers used credentials ids the relay cannot attribute to them"
    );
    let _ = writeln!(
        out,
        "# (it knows none of theirs: no Docker container shows one). To serve it only its own"
    );
    let _ = writeln!(
        out,
        "# credentials, write the full ids (the records keep 4 characters) and set task_metadata = \"proxy\":"
    );
    for (id, ev) in &ids {
        let _ = writeln!(
            out,
            "#   {id} {}",
            ev.comment(Kind::Relay).trim_start_matches("# ")
        );
    }
    let placeholders = w
        .credentials_ids
        .iter()
        .map(|id| q(id))
        .chain(
            ids.keys()
                .map(|id| q(&format!("<full credentials id {id}>"))),
        )
        .collect::<Vec<_>>();
    let _ = writeln!(out, "# credentials_ids = [{}]", placeholders.join(", "));
}

/// Whether `path` can be written as an allow glob that matches exactly it
/// (config globs refuse `%`, `?`, `*` inside a segment, `…`).
fn expressible(path: &str) -> bool {
    path.starts_with('/')
        && !path.contains(['?', '#', '%', '\\', '*', '…'])
        && !path.split('/').any(|s| s == "." || s == "..")
}

/// A config that allows each workload exactly what `records` show it
/// used and denies the rest. `config` is the file as it would be enforced
/// (`Config::parse_enforced`): its endpoints, agent, proxy and layers are
/// kept, and so are its workloads (names, selectors, order); a workload
/// whose `imds` / `task_metadata` is `allow` is not observed, so it keeps
/// `allow`. For the others:
///
/// * `imds`: nothing observed → `deny`; else `proxy` with an
///   `imds_policy` allowing each path observed (IMDSv2's token path
///   included when it was used);
/// * `task_metadata`: nothing observed → `deny`; only the caller's own
///   credentials and task-metadata ids → `proxy` (with `tmds = "allow"`
///   when `/v3` or `/v4` was used); a foreign id or another path →
///   `allow` (a comment says why). Credentials ids are not written into
///   the file: the records hold them shortened (they are capabilities),
///   and the relay learns each container's own ids from Docker. A workload
///   whose callers used ids the relay could not attribute to them (it
///   knows none of theirs: [`Record::unattributed_id`]) gets a commented
///   `credentials_ids` line naming each id by its first characters, with
///   its evidence, to fill in before switching it to `proxy`; it keeps
///   `allow` meanwhile.
pub fn suggest(config: &Config, records: &[Record]) -> String {
    suggest_with(config, records, &[])
}

/// [`suggest`] with connection records too: a workload that used a service
/// other than by HTTP on TCP port 80 (UDP, another port) cannot keep it
/// under `proxy`, which only ever sees port-80 HTTP; it gets `allow` for
/// that service, with the connections as evidence.
pub fn suggest_with(config: &Config, records: &[Record], conns: &[Connection]) -> String {
    let mut out = String::new();
    let (from, to) = records
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), r| {
            (a.min(r.time), b.max(r.time))
        });
    let _ = writeln!(
        out,
        "# Suggested by `metaguard report --suggest` from {} observed requests{}.",
        records.len(),
        if records.is_empty() {
            String::new()
        } else {
            format!(" (unix time {from:.0} to {to:.0})")
        }
    );
    let _ = writeln!(
        out,
        "# It allows what was observed and denies the rest; review it, then enforce."
    );
    write_globals(&mut out, config);
    for w in &config.workloads {
        let mine: Vec<&Record> = records
            .iter()
            .filter(|r| r.workload == w.name && r.decision == "allow")
            .collect();
        let odd: Vec<&Connection> = conns
            .iter()
            .filter(|c| c.workload == w.name && !c.is_http_port())
            .collect();
        write_workload(&mut out, w, &mine, &odd);
    }
    out
}

fn write_globals(out: &mut String, config: &Config) {
    let ips = |v: &[std::net::IpAddr]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
    let imds = ips(&config.endpoints.imds);
    let tmd = ips(&config.endpoints.task_metadata);
    if imds != DEFAULT_IMDS || tmd != DEFAULT_TASK_METADATA {
        let _ = writeln!(out, "\n[endpoints]");
        let _ = writeln!(out, "imds = {}", list(imds.iter().map(String::as_str)));
        let _ = writeln!(
            out,
            "task_metadata = {}",
            list(tmd.iter().map(String::as_str))
        );
    }
    if config.agent_credentials.to_string() != DEFAULT_AGENT_CREDENTIALS {
        let _ = writeln!(
            out,
            "\n[agent]\ncredentials = {}",
            q(&config.agent_credentials.to_string())
        );
    }
    if !config.layers.bpf {
        let _ = writeln!(out, "\n[layers]\nbpf = false");
    }
    let p = &config.proxy;
    let d = crate::config::ProxySettings::default();
    if *p != d {
        let _ = writeln!(out, "\n[proxy]");
        let _ = writeln!(out, "imds_port = {}", p.imds_port);
        let _ = writeln!(out, "rate = {}", p.rate);
        let _ = writeln!(out, "burst = {}", p.burst);
        let _ = writeln!(out, "max_connections = {}", p.max_connections);
        if let Some(a) = &p.audit_log {
            let _ = writeln!(out, "audit_log = {}", q(a));
        }
    }
}

/// `service = "allow"` with the connections no proxy could serve as its
/// evidence, when there are any of `service`.
fn odd_allowance(service: &str, odd: &[&Connection]) -> Option<String> {
    let mine: Vec<&&Connection> = odd.iter().filter(|c| c.service == service).collect();
    if mine.is_empty() {
        return None;
    }
    let mut kinds: BTreeMap<(String, u16), u64> = BTreeMap::new();
    let mut callers: Vec<String> = Vec::new();
    let (mut first, mut last) = (f64::INFINITY, f64::NEG_INFINITY);
    for c in &mine {
        *kinds.entry((c.protocol.clone(), c.port)).or_default() += c.count.max(1);
        let who = match &c.container {
            Some(k) if !k.name.is_empty() => k.name.clone(),
            Some(k) => k.id.chars().take(12).collect(),
            None => format!("{} (pid {})", c.comm, c.pid),
        };
        if !callers.contains(&who) && callers.len() < 4 {
            callers.push(who);
        }
        first = first.min(c.first.min(c.time));
        last = last.max(c.time);
    }
    let kinds: Vec<String> = kinds
        .iter()
        .map(|((p, port), n)| format!("{p}/{port} ×{n}"))
        .collect();
    Some(format!(
        "# observed connections no proxy can serve: {}, by {}; first {first:.0}, last {last:.0}\n{service} = \"allow\"  # proxy only sees HTTP on TCP port 80; review, or move those callers to a workload of their own",
        kinds.join(", "),
        callers.join(", ")
    ))
}

fn write_workload(out: &mut String, w: &Workload, mine: &[&Record], odd: &[&Connection]) {
    let _ = writeln!(out, "\n[[workload]]");
    let _ = writeln!(out, "name = {}", q(&w.name));
    let _ = writeln!(out, "{}", selector(&w.selector));
    if !w.credentials_ids.is_empty() {
        let _ = writeln!(
            out,
            "credentials_ids = {}",
            list(w.credentials_ids.iter().map(String::as_str))
        );
    }
    if w.raw_sockets == Action::Deny {
        let _ = writeln!(out, "raw_sockets = \"deny\"");
    }

    // task_metadata first: imds may need a [workload.imds_policy] table,
    // which must come after every plain key.
    let relay: Vec<&Record> = mine
        .iter()
        .copied()
        .filter(|r| r.service == Kind::Relay.as_str())
        .collect();
    let mut tmds_line = None;
    let odd_relay = (w.task_metadata != Action::Allow)
        .then(|| odd_allowance(Kind::Relay.as_str(), odd))
        .flatten();
    match w.task_metadata {
        _ if odd_relay.is_some() => {
            let _ = writeln!(out, "{}", odd_relay.unwrap_or_default());
        }
        Action::Allow => {
            let _ = writeln!(
                out,
                "task_metadata = \"allow\"  # as written (allow is not observed)"
            );
        }
        _ if relay.is_empty() => {
            let _ = writeln!(
                out,
                "task_metadata = \"deny\"  # no task metadata access observed"
            );
        }
        _ => {
            let unattributed: Vec<&Record> = relay
                .iter()
                .copied()
                .filter(|r| r.unattributed_id().is_some())
                .collect();
            if !unattributed.is_empty() {
                write_credentials_ids(out, w, &unattributed);
            }
            let foreign = relay
                .iter()
                .find(|r| r.own_id != Some(true) && r.unattributed_id().is_none());
            let tmds_used = relay
                .iter()
                .any(|r| r.path.starts_with("/v3/") || r.path.starts_with("/v4/"));
            match foreign {
                None if !unattributed.is_empty() => {
                    let _ = writeln!(
                        out,
                        "task_metadata = \"allow\"  # ids the relay cannot attribute to this workload were used: proxy needs them in credentials_ids (above)"
                    );
                }
                Some(r) => {
                    let _ = writeln!(
                        out,
                        "task_metadata = \"allow\"  # observed {} {} (not an id this workload owns): proxy would refuse it",
                        r.method, r.path
                    );
                }
                None => {
                    let mut ev = Evidence::default();
                    relay.iter().for_each(|r| ev.add(r));
                    let _ = writeln!(out, "{}", ev.comment(Kind::Relay));
                    let _ = writeln!(
                        out,
                        "task_metadata = \"proxy\"  # only the callers' own credentials ids were used"
                    );
                    if tmds_used {
                        tmds_line = Some("tmds = \"allow\"  # /v3 or /v4 task metadata was used");
                    } else if w.task_metadata == Action::Proxy && w.tmds != TmdsMode::default() {
                        tmds_line = None;
                        let _ = writeln!(out, "tmds = {}", q(w.tmds.as_str()));
                    }
                }
            }
        }
    }
    if let Some(t) = tmds_line {
        let _ = writeln!(out, "{t}");
    }

    let imds: Vec<&Record> = mine
        .iter()
        .copied()
        .filter(|r| r.service == Kind::Imds.as_str())
        .collect();
    let odd_imds = (w.imds != Action::Allow)
        .then(|| odd_allowance(Kind::Imds.as_str(), odd))
        .flatten();
    match w.imds {
        _ if odd_imds.is_some() => {
            let _ = writeln!(out, "{}", odd_imds.unwrap_or_default());
        }
        Action::Allow => {
            let _ = writeln!(
                out,
                "imds = \"allow\"  # as written (allow is not observed)"
            );
        }
        _ if imds.is_empty() => {
            let _ = writeln!(out, "imds = \"deny\"  # no IMDS access observed");
        }
        _ => {
            let mut paths: BTreeMap<&str, Evidence> = BTreeMap::new();
            for r in &imds {
                paths.entry(r.path.as_str()).or_default().add(r);
            }
            let _ = writeln!(out, "imds = \"proxy\"");
            let _ = writeln!(out, "\n[workload.imds_policy]");
            let _ = writeln!(out, "allow = [");
            for (path, ev) in &paths {
                if expressible(path) {
                    let _ = writeln!(out, "    {}", ev.comment(Kind::Imds));
                    let _ = writeln!(out, "    {},", q(path));
                } else {
                    let _ = writeln!(
                        out,
                        "    # not expressible as a glob, left denied: {path:?} ({})",
                        ev.comment(Kind::Imds).trim_start_matches("# ")
                    );
                }
            }
            let _ = writeln!(out, "]");
        }
    }
}
