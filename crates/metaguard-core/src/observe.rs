//! Observe mode's records and what is made of them, without I/O: the
//! [`Record`] the proxy writes for every request of an observed workload
//! (one JSON line), the [`report`] that groups records per workload and
//! container and asks the real decision code (`proxy_decision::decide`)
//! what a config would do with each access, and the [`suggest`]ed config
//! that allows exactly what was observed. `connections` holds the
//! connection records the daemon writes from the BPF layer's events.
//!
//! The proxy (`metaguard-proxy::observe`) writes and rotates the files and
//! reads them back; `metaguard report` prints what this module computes.
//! docs/observe.md documents the record and the report's JSON schema.

mod connections;
mod suggest;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::{Action, Config};
use crate::proxy_decision::{self, Caller, Kind, Ownership, Request, Step, Verdict};

pub use connections::{
    connection_accesses, parse_line, would_connect, Coalescer, Connection, ConnectionAccess, Line,
    Run, WouldConnect, KIND_CONNECTION, MAX_PROCESSES,
};
pub use suggest::{suggest, suggest_with};

/// The version of the record format ([`Record::v`]).
pub const RECORD_VERSION: u32 = 1;
/// The report's JSON schema name (docs/observe.md).
pub const REPORT_SCHEMA: &str = "metaguard.report/1";

/// The container a caller belongs to, as Docker describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ContainerInfo {
    pub id: String,
    /// Without the leading `/`; empty when unknown.
    #[serde(default)]
    pub name: String,
    /// `com.amazonaws.ecs.task-arn`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_arn: Option<String>,
    /// `com.amazonaws.ecs.task-definition-family`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_family: Option<String>,
    /// The image reference as Docker reports it (`Config.Image`: what the
    /// container was started from, e.g. `public.ecr.aws/nginx/nginx:1.27`);
    /// absent when unknown (and in records written before it was kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// The Docker label holding an ECS task's ARN.
pub const LABEL_TASK_ARN: &str = "com.amazonaws.ecs.task-arn";
/// The Docker label holding an ECS task's family.
pub const LABEL_TASK_FAMILY: &str = "com.amazonaws.ecs.task-definition-family";

impl ContainerInfo {
    /// From a container's id, name and labels.
    pub fn new(id: &str, name: &str, labels: &BTreeMap<String, String>) -> ContainerInfo {
        ContainerInfo {
            id: id.to_string(),
            name: name.trim_start_matches('/').to_string(),
            task_arn: labels.get(LABEL_TASK_ARN).cloned(),
            task_family: labels.get(LABEL_TASK_FAMILY).cloned(),
            image: None,
        }
    }

    /// This description with its image reference (an empty one: unknown).
    pub fn with_image(mut self, image: &str) -> ContainerInfo {
        self.image = (!image.is_empty()).then(|| image.to_string());
        self
    }
}

/// One observed request: one JSON line in the observe log. Never holds a
/// credential: credentials ids are shortened as in the audit log, and of a
/// credentials answer only the `AccessKeyId` is kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// [`RECORD_VERSION`].
    pub v: u32,
    /// Unix time in seconds (millisecond precision).
    pub time: f64,
    /// `imds` or `task_metadata`.
    pub service: String,
    /// The caller's workload (its name in the config it was observed
    /// under).
    pub workload: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerInfo>,
    /// How the caller was identified (bridge port, namespace, cgroup).
    pub caller: String,
    /// `ipv4` or `ipv6`: the family the caller connected with.
    pub family: String,
    pub method: String,
    /// The canonical path as logged (credentials ids shortened).
    pub path: String,
    /// IMDS only: `v2` when the request carried a session token or asked
    /// for one, else `v1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imds_version: Option<String>,
    pub status: u16,
    /// What the proxy did (`allow`, `invalid`, `deny`, `throttle`,
    /// `error`).
    pub decision: String,
    /// Whether the credentials or task-metadata id in the path was the
    /// caller's own (its container's environment or its workload's
    /// `credentials_ids`); absent when the path holds no id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub own_id: Option<bool>,
    /// The `AccessKeyId` of a credentials answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<String>,
    /// Credentials requests only: whether the relay knew any credentials
    /// id of the caller itself (from its containers' environment, as
    /// Docker shows it). `false` with `own_id` `false`: the id used may be
    /// the caller's own, which the relay could learn only from its
    /// workload's `credentials_ids` (a CNI namespace, a `netns` workload
    /// without Docker containers); `true`: it was another's. Absent in
    /// records written before it was kept (then: no container, none known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller_ids_known: Option<bool>,
    /// The `[proxy]` limit that `proxy` would have refused this request
    /// for: `connections` (its connection was over `max_connections`) or
    /// `rate` (over `rate`/`burst`). Observed traffic is served all the
    /// same; absent when within the limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub over_limit: Option<String>,
}

/// The id spelled in place of a shortened one when a record is decided
/// again (any valid id: only its ownership matters).
const PLACEHOLDER_ID: &str = "observed-id";

impl Record {
    fn kind(&self) -> Kind {
        if self.service == Kind::Relay.as_str() {
            Kind::Relay
        } else {
            Kind::Imds
        }
    }

    /// The target decided on again: the logged path with a shortened
    /// credentials id replaced by [`PLACEHOLDER_ID`].
    fn target(&self) -> (String, Option<String>) {
        if let Some(rest) = self.path.strip_prefix("/v2/credentials/") {
            if !rest.contains('/') {
                return (
                    format!("/v2/credentials/{PLACEHOLDER_ID}"),
                    Some(PLACEHOLDER_ID.into()),
                );
            }
        }
        if let Some((p, q)) = self.path.split_once("?id=") {
            if !q.contains('&') {
                return (
                    format!("{p}?id={PLACEHOLDER_ID}"),
                    Some(PLACEHOLDER_ID.into()),
                );
            }
        }
        let segs: Vec<&str> = self.path.split('/').collect();
        if let ["", "v3" | "v4", eid, ..] = segs.as_slice() {
            return (self.path.clone(), Some((*eid).to_string()));
        }
        (self.path.clone(), None)
    }

    /// The shortened credentials id (`9b1d…`) of a credentials request
    /// whose id the relay could not attribute to the caller because it
    /// knew none of the caller's own ([`Record::caller_ids_known`]): its
    /// workload needs `credentials_ids` to keep being served under
    /// `proxy`. None for any other record.
    pub fn unattributed_id(&self) -> Option<&str> {
        if self.kind() != Kind::Relay || self.own_id != Some(false) {
            return None;
        }
        if self.caller_ids_known.unwrap_or(self.container.is_some()) {
            return None;
        }
        self.path
            .strip_prefix("/v2/credentials/")
            .or_else(|| {
                self.path
                    .strip_prefix("/v1/credentials?id=")
                    .filter(|id| !id.contains('&'))
            })
            .filter(|id| !id.contains('/') && id.ends_with('…'))
    }

    /// The IMDS version as counted: `v1` or `v2` for IMDS, none for the
    /// task-metadata service.
    pub fn version(&self) -> Option<&str> {
        self.imds_version.as_deref()
    }
}

/// What a config would do with one observed access.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Would {
    /// `allow` or `deny`.
    pub would: &'static str,
    /// The rule that decides (as the proxy would log it).
    pub rule: String,
}

/// What `config` would do with `rec`'s access, decided by the proxy's own
/// code: the caller is placed in the workload of the same name (a name the
/// config lacks: no workload selects it, so nothing stops it); a workload
/// with `deny` refuses the connection, `proxy` applies its path policy and
/// ownership rules, `allow` and `observe` forward. Rate limits are not
/// replayed (a record is one request, not a rate).
pub fn would(config: &Config, rec: &Record) -> Would {
    let kind = rec.kind();
    let Some(i) = config.workloads.iter().position(|w| w.name == rec.workload) else {
        return Would {
            would: "allow",
            rule: format!("no workload {:?} in the config (untouched)", rec.workload),
        };
    };
    let w = &config.workloads[i];
    let action = match kind {
        Kind::Imds => w.imds,
        Kind::Relay => w.task_metadata,
    };
    if action == Action::Deny {
        // Refused at the connection (nft, BPF), before any request.
        return Would {
            would: "deny",
            rule: format!("{} = \"deny\"", kind.as_str()),
        };
    }
    let (target, id) = rec.target();
    let own = rec.own_id.unwrap_or(false);
    let owned: Vec<String> = id.filter(|_| own).into_iter().collect();
    let caller = Caller {
        workload: Some(i),
        container: rec.container.as_ref().map(|c| c.id.clone()),
        port: None,
        credentials_ids: owned.clone(),
        tmds_ids: owned,
        origin: rec.caller.clone(),
    };
    let req = Request {
        method: &rec.method,
        target: &target,
        ..Request::default()
    };
    let verdict = match proxy_decision::decide(config, kind, &caller, &req, |_| true) {
        Step::Done(v) => v,
        // A foreign id: its owner is not known from a record; a proxied
        // owner would refuse it, which the report cannot see.
        Step::AskOwner(p) => p.resolve(config, &Ownership::Unknown),
    };
    match verdict {
        Verdict::Forward(f) => Would {
            would: "allow",
            rule: f.rule,
        },
        Verdict::Refuse(r) => Would {
            would: "deny",
            rule: r.rule,
        },
    }
}

/// The report's window over the records.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Window {
    /// Unix time of the first and last record counted (none: no records).
    pub from: Option<f64>,
    pub to: Option<f64>,
    /// `--since`, as given.
    pub since: Option<String>,
    /// Records counted (request and connection records).
    pub records: u64,
    /// Lines that were not records (corrupt or of another version),
    /// skipped.
    pub skipped_lines: u64,
    /// Rotation dropped older records: the window starts later than the
    /// observation did.
    pub truncated: bool,
}

/// One access (service, method, path) of one caller, aggregated.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Access {
    pub service: String,
    pub method: String,
    pub path: String,
    pub count: u64,
    /// IMDS only: requests without and with a session token.
    pub v1: u64,
    pub v2: u64,
    pub first_seen: f64,
    pub last_seen: f64,
    /// Status code → count.
    pub statuses: BTreeMap<u16, u64>,
    /// `AccessKeyId`s handed out, distinct (at most [`MAX_KEY_IDS`]).
    pub access_key_ids: Vec<String>,
    /// What the config would do: `allow` or `deny`.
    pub would: &'static str,
    pub rule: String,
    /// Requests that were over the `[proxy]` limits when observed
    /// ([`Record::over_limit`]): `proxy` would have refused them (429, or
    /// the connection closed) whatever its path policy says.
    pub over_limit: u64,
}

/// The most distinct `AccessKeyId`s listed per access.
pub const MAX_KEY_IDS: usize = 8;

/// One caller (a container, or a host process or namespace without one).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CallerReport {
    pub container: Option<ContainerInfo>,
    /// How it was identified (the first record's).
    pub caller: String,
    pub accesses: Vec<Access>,
    /// Its connections to the endpoints (connection records), per
    /// service, protocol and port.
    pub connections: Vec<ConnectionAccess>,
}

/// One workload's callers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkloadReport {
    pub workload: String,
    /// Its actions in the config asked about (none: the config has no
    /// workload of this name).
    pub imds: Option<&'static str>,
    pub task_metadata: Option<&'static str>,
    pub callers: Vec<CallerReport>,
    /// Credentials ids (shortened: `9b1d…`) its callers used that the
    /// relay could not attribute to them, knowing none of theirs
    /// ([`Record::unattributed_id`]): under `proxy` the workload needs them
    /// in `credentials_ids` (`--suggest` writes the line to fill in).
    /// Absent when none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub needs_credentials_ids: Vec<String>,
}

/// Totals.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Summary {
    pub requests: u64,
    pub accesses: u64,
    /// Accesses (and their requests) the config would deny.
    pub would_deny: u64,
    pub would_deny_requests: u64,
    /// Connections recorded (calls, the records' counts summed) and those
    /// the config would refuse.
    pub connections: u64,
    pub would_deny_connections: u64,
}

/// `metaguard report`'s answer (JSON schema [`REPORT_SCHEMA`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub schema: &'static str,
    /// The config asked about (its origin).
    pub config: String,
    pub window: Window,
    pub workloads: Vec<WorkloadReport>,
    pub summary: Summary,
}

/// Groups `records` (in any order) per workload, caller and access, and
/// asks `config` about each access. `window` carries what the reader knew
/// (skipped lines, truncation, `--since`); its counts and bounds are
/// filled in here.
pub fn report(config: &Config, records: &[Record], window: Window) -> Report {
    report_with(config, records, &[], window)
}

/// [`report`] with connection records too: each caller lists its
/// connections next to its requests.
pub fn report_with(
    config: &Config,
    records: &[Record],
    conns: &[Connection],
    mut window: Window,
) -> Report {
    // A container (by id) is one caller whatever port it came through; a
    // caller without one is told apart by how it was identified.
    type CallerKey = (Option<String>, String);
    type AccessKey = (String, String, String);
    type ByCaller<'r> = BTreeMap<CallerKey, BTreeMap<AccessKey, Vec<&'r Record>>>;
    let mut by: BTreeMap<String, ByCaller<'_>> = BTreeMap::new();
    let mut conn_by: BTreeMap<String, BTreeMap<CallerKey, Vec<&Connection>>> = BTreeMap::new();
    for c in conns {
        let ck = match &c.container {
            Some(k) => (Some(k.id.clone()), String::new()),
            None => (None, c.caller.clone()),
        };
        conn_by
            .entry(c.workload.clone())
            .or_default()
            .entry(ck.clone())
            .or_default()
            .push(c);
        // A caller seen only by its connections is listed too.
        by.entry(c.workload.clone())
            .or_default()
            .entry(ck)
            .or_default();
        let first = c.first.min(c.time);
        window.from = Some(window.from.map_or(first, |f: f64| f.min(first)));
        window.to = Some(window.to.map_or(c.time, |t: f64| t.max(c.time)));
    }
    for r in records {
        let ck = match &r.container {
            Some(c) => (Some(c.id.clone()), String::new()),
            None => (None, r.caller.clone()),
        };
        by.entry(r.workload.clone())
            .or_default()
            .entry(ck)
            .or_default()
            .entry((r.service.clone(), r.method.clone(), r.path.clone()))
            .or_default()
            .push(r);
        window.from = Some(window.from.map_or(r.time, |f: f64| f.min(r.time)));
        window.to = Some(window.to.map_or(r.time, |t: f64| t.max(r.time)));
    }
    window.records = (records.len() + conns.len()) as u64;
    let mut summary = Summary {
        requests: records.len() as u64,
        ..Summary::default()
    };
    let mut workloads = Vec::new();
    for (name, callers) in by {
        let w = config.workloads.iter().find(|w| w.name == name);
        let mut out = Vec::new();
        for (key, accesses) in callers {
            let mine: &[&Connection] = conn_by
                .get(&name)
                .and_then(|c| c.get(&key))
                .map_or(&[], Vec::as_slice);
            let how = key.1;
            // The fullest description any of its records has (a record
            // taken while the daemon's container listing was busy has
            // only the id).
            let container = accesses
                .values()
                .flatten()
                .filter_map(|r| r.container.as_ref())
                .chain(mine.iter().filter_map(|c| c.container.as_ref()))
                .max_by_key(|c| {
                    (
                        !c.name.is_empty(),
                        c.task_arn.is_some(),
                        c.task_family.is_some(),
                        c.image.is_some(),
                    )
                })
                .cloned();
            let mut list = Vec::new();
            let mut caller = how;
            if caller.is_empty() && accesses.is_empty() {
                caller = mine.first().map(|c| c.caller.clone()).unwrap_or_default();
            }
            let connections = connection_accesses(config, mine);
            for c in &connections {
                summary.connections += c.count;
                if c.would == "deny" {
                    summary.would_deny_connections += c.count;
                }
            }
            for ((service, method, path), recs) in accesses {
                if caller.is_empty() {
                    caller = recs[0].caller.clone();
                }
                let verdict = would(config, recs[0]);
                let mut a = Access {
                    service,
                    method,
                    path,
                    count: recs.len() as u64,
                    v1: 0,
                    v2: 0,
                    first_seen: f64::INFINITY,
                    last_seen: f64::NEG_INFINITY,
                    statuses: BTreeMap::new(),
                    access_key_ids: Vec::new(),
                    would: verdict.would,
                    rule: verdict.rule,
                    over_limit: 0,
                };
                for r in recs {
                    match r.version() {
                        Some("v2") => a.v2 += 1,
                        Some(_) => a.v1 += 1,
                        None => {}
                    }
                    a.first_seen = a.first_seen.min(r.time);
                    a.last_seen = a.last_seen.max(r.time);
                    *a.statuses.entry(r.status).or_default() += 1;
                    a.over_limit += u64::from(r.over_limit.is_some());
                    if let Some(k) = &r.access_key_id {
                        if !a.access_key_ids.contains(k) && a.access_key_ids.len() < MAX_KEY_IDS {
                            a.access_key_ids.push(k.clone());
                        }
                    }
                }
                a.access_key_ids.sort();
                summary.accesses += 1;
                if a.would == "deny" {
                    summary.would_deny += 1;
                    summary.would_deny_requests += a.count;
                }
                list.push(a);
            }
            out.push(CallerReport {
                container,
                caller,
                accesses: list,
                connections,
            });
        }
        // By container name (what an operator reads), then id and caller.
        out.sort_by(|a, b| {
            let key = |c: &CallerReport| {
                let (name, id) = c
                    .container
                    .as_ref()
                    .map_or((String::new(), String::new()), |c| {
                        (c.name.clone(), c.id.clone())
                    });
                (c.container.is_none(), name, id, c.caller.clone())
            };
            key(a).cmp(&key(b))
        });
        let mut needs: Vec<String> = records
            .iter()
            .filter(|r| r.workload == name)
            .filter_map(Record::unattributed_id)
            .map(str::to_string)
            .collect();
        needs.sort();
        needs.dedup();
        workloads.push(WorkloadReport {
            workload: name,
            imds: w.map(|w| w.imds.as_str()),
            task_metadata: w.map(|w| w.task_metadata.as_str()),
            callers: out,
            needs_credentials_ids: needs,
        });
    }
    Report {
        schema: REPORT_SCHEMA,
        config: config.origin.to_string(),
        window,
        workloads,
        summary,
    }
}

/// Parses `--since`: a whole number and a unit (`s`, `m`, `h`, `d`),
/// several of them concatenated (`1h30m`). Seconds.
pub fn parse_since(text: &str) -> Result<u64, SinceError> {
    let bad = || SinceError(text.to_string());
    let mut total: u64 = 0;
    let mut digits = String::new();
    if text.is_empty() {
        return Err(bad());
    }
    for ch in text.chars() {
        if ch.is_ascii_digit() {
            digits.push(ch);
            continue;
        }
        let unit: u64 = match ch {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(bad()),
        };
        let n: u64 = digits.parse().map_err(|_| bad())?;
        digits.clear();
        total = n
            .checked_mul(unit)
            .and_then(|x| total.checked_add(x))
            .ok_or_else(bad)?;
    }
    if !digits.is_empty() || total == 0 {
        return Err(bad());
    }
    Ok(total)
}

/// A `--since` that is not a duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--since {0:?} is not a duration: write a whole number and a unit (s, m, h, d), e.g. 30m, 24h, 7d or 1h30m")]
pub struct SinceError(pub String);

#[cfg(test)]
mod tests;
