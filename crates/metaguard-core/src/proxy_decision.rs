//! The metadata proxy's decision on one request, without I/O: who is
//! calling ([`Caller`]), what it asks ([`Request`]) and the config in →
//! refuse (status, reason) or forward (the canonical target, the rule that
//! allowed it) out. The proxy (`metaguard-proxy`) reads the request and the
//! caller, calls [`decide`], asks its [`Directory`] when the decision needs
//! an id's owner ([`Step::AskOwner`]), and then forwards, audits and counts.
//!
//! The order of the checks is part of the contract (interface.md v1.1,
//! "Caller identity and credentials ownership"):
//!
//! 1. the request itself: origin-form target, a `Host` that names a
//!    metadata endpoint, no body or `Transfer-Encoding` (400);
//! 2. the caller: an unidentified caller is refused (403, fail closed);
//! 3. its workload's rate limit (429) — asked only of identified callers
//!    with a well-formed request, and not under `observe`;
//! 4. the workload's action for the service: `deny` (403); `observe` is
//!    decided as `allow` (the proxy records what passes);
//! 5. the canonical target (400 when it has none, whatever the action);
//! 6. per service: IMDS methods, the token `PUT` with `X-Forwarded-For`
//!    (F16) and the path policy under `proxy`; credentials ids (F13) and
//!    task-metadata endpoint ids under `proxy` (only the caller's own) and
//!    `allow` (anything but an id a proxied workload or a stopped container
//!    owns).

use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::{Action, TmdsMode, Workload};
use crate::proxy_path::{canonical, Canonical, Decision};
use crate::Config;

/// Which service a listener offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// The task-credentials relay (169.254.170.2:80 and friends).
    Relay,
    /// The IMDS proxy.
    Imds,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Relay => "task_metadata",
            Kind::Imds => "imds",
        }
    }
}

/// Who is calling, as far as the proxy is concerned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Caller {
    /// Index of the workload in the config (first match), if known.
    pub workload: Option<usize>,
    /// The container's id, when the caller is a known container.
    pub container: Option<String>,
    /// The ifindex of the host's bridge port a bridge caller came
    /// through: its network namespace as the host sees it, which stays the
    /// same while the containers listed in that namespace change (an
    /// awsvpc task's pause container alone, then with its application
    /// container). Kernel ifindexes are allocated cyclically, so a port's
    /// is not handed to another link while tokens bound to it live.
    pub port: Option<u32>,
    /// Credentials ids this caller owns (its containers' environment).
    pub credentials_ids: Vec<String>,
    /// Task-metadata endpoint ids this caller owns.
    pub tmds_ids: Vec<String>,
    /// How the caller was identified, for the audit log ("port veth1 on
    /// docker0", "host cgroup workload 3", "unknown mark 0x0").
    pub origin: String,
}

impl Caller {
    /// A caller whose identification broke down: refused like any
    /// unknown caller, with the mark in the audit log.
    pub fn identification_failed(mark: u32) -> Caller {
        Caller {
            origin: format!("identification failed (mark 0x{mark:08x})"),
            ..Caller::default()
        }
    }
}

/// Where a connection to the proxy comes from, as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    /// The mark its SYN carried (`SO_MARK` of the accepted socket).
    pub mark: u32,
    /// The client's address and port.
    pub peer: SocketAddr,
    /// For host processes (a host mark): where the client connected to,
    /// before any DNAT — with `peer`, the client socket's own 4-tuple.
    pub dst: Option<SocketAddr>,
}

/// Who owns a credentials id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub workload: Option<usize>,
    pub container: Option<String>,
    /// The owner's workload could not be determined (a host lookup
    /// failed): it is treated as proxied, so the id is refused to others.
    pub uncertain: bool,
}

/// The two kinds of id a container's environment holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IdKind {
    /// A task-credentials id (`/v2/credentials/<id>`, `?id=<id>`).
    Credentials,
    /// A task-metadata endpoint id (`/v3/<id>`, `/v4/<id>`).
    TaskMetadata,
}

impl IdKind {
    pub fn as_str(self) -> &'static str {
        match self {
            IdKind::Credentials => "credentials id",
            IdKind::TaskMetadata => "task metadata endpoint id",
        }
    }
}

/// What is known of an id's owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ownership {
    /// Nobody known: neither a running container nor a workload's
    /// `credentials_ids`.
    Unknown,
    Owned(Owner),
    /// It belonged to a container that has stopped: refused to everyone
    /// (interface.md, "When the owning container stops, its ids are
    /// refused to everyone").
    Revoked,
}

/// The daemon's knowledge of workloads: identifies callers and owners
/// under the config the proxy's settings hold (workload indices are
/// indices into it). Calls may block briefly (they read the host's links
/// and containers on a cache miss); the proxy calls them on a blocking
/// thread unless [`Directory::identify_cached`] answers.
pub trait Directory: Send + Sync + 'static {
    /// The caller of a connection.
    fn identify(&self, config: &Arc<Config>, origin: Origin) -> Caller;
    /// [`Directory::identify`] answered from memory without blocking, or
    /// `None` when that is not possible (the proxy then calls `identify`
    /// on a blocking thread). The default never answers.
    fn identify_cached(&self, _config: &Arc<Config>, _origin: Origin) -> Option<Caller> {
        None
    }
    /// Who owns credentials or task-metadata id `id`.
    fn owner(&self, config: &Config, kind: IdKind, id: &str) -> Ownership;
    /// Container `id`'s name and ECS labels, from memory without blocking
    /// (observe records); none when not known at once. The default knows
    /// nothing.
    fn container_info(&self, _id: &str) -> Option<crate::observe::ContainerInfo> {
        None
    }
    /// Where the relay sends credentials requests when the agent runs in a
    /// container (`[agent] credentials = "container:…"`): that container's
    /// address now, by its identity (may block: the Docker API). `Err`
    /// says why there is none; nothing is then relayed. The default knows
    /// no containers.
    fn agent_upstream(&self, _config: &Config) -> Result<std::net::SocketAddr, String> {
        Err("no Docker API to find the agent's container".into())
    }
}

/// What the decision needs of a request, as received.
#[derive(Debug, Clone, Copy, Default)]
pub struct Request<'a> {
    /// The method, as sent (`GET`, `HEAD`, `PUT`, …; case matters).
    pub method: &'a str,
    /// The target's path and query as received (`/` when it has none).
    pub target: &'a str,
    /// The target had a scheme or an authority (absolute- or
    /// authority-form).
    pub absolute: bool,
    /// The `Host` header: `None` when absent or not visible ASCII.
    pub host: Option<&'a str>,
    /// A `Transfer-Encoding` header is present.
    pub transfer_encoding: bool,
    /// Every `Content-Length` header's value.
    pub content_lengths: &'a [&'a [u8]],
    /// An `X-Forwarded-For` header is present.
    pub forwarded_for: bool,
}

/// A request refused by the proxy itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// 400, 403, 405 or 429.
    pub status: u16,
    /// For the audit log and metrics: `invalid`, `deny` or `throttle`.
    pub decision: &'static str,
    /// Why, for the caller and the audit log.
    pub rule: String,
    /// The path as logged (canonical, credentials ids shortened; the raw
    /// target, cut short, when it has no canonical form).
    pub path: String,
}

/// A request to forward upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub kind: Kind,
    /// The canonical target: exactly what was decided on.
    pub target: String,
    /// The rule that allowed it.
    pub rule: String,
    /// The path as logged.
    pub path: String,
    /// Task metadata is served redacted for this container (none: a
    /// caller in no known container).
    pub redact_for: Option<Option<String>>,
}

/// The decision on a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Refuse(Refusal),
    Forward(Forward),
}

/// [`decide`]'s answer: a verdict, or a question about an id's owner
/// whose answer gives the verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Done(Verdict),
    AskOwner(Pending),
}

/// A request that is forwarded unless the owner of `id` forbids it: an
/// `allow` workload's caller asking for an id it does not own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub kind: IdKind,
    pub id: String,
    caller_container: Option<String>,
    forward: Forward,
}

impl Pending {
    /// The verdict once the id's owner is known: refused when a stopped
    /// container owned it (revoked) or when a proxied workload's other
    /// container owns it (or its workload could not be placed) — F13.
    pub fn resolve(self, config: &Config, ownership: &Ownership) -> Verdict {
        let why = match ownership {
            Ownership::Unknown => None,
            Ownership::Revoked => Some(format!(
                "{} of a container that has stopped (revoked)",
                self.kind.as_str()
            )),
            Ownership::Owned(o) => {
                let proxied = o.uncertain
                    || o.workload
                        .and_then(|i| config.workloads.get(i))
                        .is_some_and(|ow| ow.task_metadata == Action::Proxy);
                (proxied && o.container != self.caller_container).then(|| {
                    format!(
                        "{} owned by another, proxied workload (F13)",
                        self.kind.as_str()
                    )
                })
            }
        };
        match why {
            Some(rule) => Verdict::Refuse(Refusal {
                status: 403,
                decision: "deny",
                rule,
                path: self.forward.path,
            }),
            None => Verdict::Forward(self.forward),
        }
    }
}

/// The decision on request `req` of `caller` to service `kind` under
/// `config`. `admit` is the caller's workload's rate limiter, asked once,
/// only when the request is well formed and the caller identified.
pub fn decide(
    config: &Config,
    kind: Kind,
    caller: &Caller,
    req: &Request<'_>,
    admit: impl FnOnce(Option<usize>) -> bool,
) -> Step {
    // A refusal logs the target as received (its first 200 characters).
    let refuse = |status, decision, rule: String| {
        Step::Done(Verdict::Refuse(Refusal {
            status,
            decision,
            rule,
            path: req.target.chars().take(200).collect(),
        }))
    };
    if req.absolute {
        return refuse(
            400,
            "invalid",
            "only origin-form request targets (/path) are accepted".into(),
        );
    }
    if !host_ok(config, req.host) {
        return refuse(
            400,
            "invalid",
            "the Host header does not name a metadata endpoint".into(),
        );
    }
    if let Some(why) = framing_problem(req) {
        return refuse(400, "invalid", why.into());
    }
    let Some(w) = caller.workload.and_then(|i| config.workloads.get(i)) else {
        return refuse(
            403,
            "deny",
            format!("unidentified caller ({})", caller.origin),
        );
    };
    let (action, allowed_query): (Action, &[&str]) = match kind {
        Kind::Imds => (w.imds, &[]),
        Kind::Relay => (w.task_metadata, &["id"]),
    };
    // Observe flows as allow does: no rate limit of metaguard's own.
    if action != Action::Observe && !admit(caller.workload) {
        return refuse(
            429,
            "throttle",
            format!(
                "rate limit ({} rps, burst {})",
                config.proxy.rate, config.proxy.burst
            ),
        );
    }
    if action == Action::Deny {
        return refuse(403, "deny", format!("{} = \"deny\"", kind.as_str()));
    }
    let c = match canonical(req.target, allowed_query) {
        Ok(c) => c,
        // allow and proxy alike: a target without a canonical form is
        // never forwarded.
        Err(e) => return refuse(400, "invalid", format!("canonical path: {e}")),
    };
    let path = log_path(&c, kind);
    match kind {
        Kind::Imds => Step::Done(imds(w, action, req, &c, path)),
        Kind::Relay => relay(caller, w, action, req, &c, path),
    }
}

/// [`decide`], with the owner asked of `directory` at once: for tests and
/// callers that may block.
pub fn decide_with(
    directory: &dyn Directory,
    config: &Config,
    kind: Kind,
    caller: &Caller,
    req: &Request<'_>,
    admit: impl FnOnce(Option<usize>) -> bool,
) -> Verdict {
    match decide(config, kind, caller, req, admit) {
        Step::Done(v) => v,
        Step::AskOwner(p) => {
            let ownership = directory.owner(config, p.kind, &p.id);
            p.resolve(config, &ownership)
        }
    }
}

fn deny(status: u16, rule: impl Into<String>, path: String) -> Verdict {
    Verdict::Refuse(Refusal {
        status,
        decision: "deny",
        rule: rule.into(),
        path,
    })
}

fn imds(w: &Workload, action: Action, req: &Request<'_>, c: &Canonical, path: String) -> Verdict {
    // allow and observe: forwarded as asked (observe only records).
    let rule = if action == Action::Proxy {
        let token = c.segments == ["latest", "api", "token"];
        let m = req.method;
        if !(m == "GET" || m == "HEAD" || (m == "PUT" && token)) {
            return deny(405, format!("method {m} is not served on this path"), path);
        }
        if m == "PUT" && req.forwarded_for {
            // What IMDS itself answers (F16): a token must not be
            // obtainable through a forwarding proxy.
            return deny(
                403,
                "token PUT with X-Forwarded-For (IMDS refuses these too)",
                path,
            );
        }
        match w.imds_policy.decide(c) {
            Decision::Deny { rule } => return deny(403, rule, path),
            Decision::Allow { rule } => rule,
        }
    } else {
        format!("imds = \"{action}\"")
    };
    Verdict::Forward(Forward {
        kind: Kind::Imds,
        // What `log_path` made of an IMDS target is the target itself.
        target: path.clone(),
        rule,
        path,
        redact_for: None,
    })
}

fn relay(
    caller: &Caller,
    w: &Workload,
    action: Action,
    req: &Request<'_>,
    c: &Canonical,
    path: String,
) -> Step {
    let done = Step::Done;
    if req.method != "GET" && req.method != "HEAD" {
        return done(deny(
            405,
            format!(
                "method {} is not served by the credentials endpoint",
                req.method
            ),
            path,
        ));
    }
    let segs: Vec<&str> = c.segments.iter().map(String::as_str).collect();
    let creds_id: Option<&str> = match segs.as_slice() {
        ["v2", "credentials", id] => Some(id),
        ["v1", "credentials"] => c
            .query
            .iter()
            .find(|(k, _)| k == "id")
            .map(|(_, v)| v.as_str()),
        _ => None,
    };
    let proxied = action == Action::Proxy;
    let mut forward = Forward {
        kind: Kind::Relay,
        target: c.target(),
        rule: format!("task_metadata = \"{action}\""),
        path,
        redact_for: None,
    };
    let ask = |kind, id: &str, forward| {
        Step::AskOwner(Pending {
            kind,
            id: id.to_string(),
            caller_container: caller.container.clone(),
            forward,
        })
    };
    if let Some(id) = creds_id {
        let own = caller.credentials_ids.iter().any(|x| x == id)
            || w.credentials_ids.iter().any(|x| x == id);
        if own {
            forward.rule = "credentials id owned by the caller".into();
        } else if proxied {
            return done(deny(
                403,
                "credentials id not owned by this workload (F13)",
                forward.path,
            ));
        } else {
            return ask(IdKind::Credentials, id, forward);
        }
    } else if let [v @ ("v3" | "v4"), eid, rest @ ..] = segs.as_slice() {
        let own = caller.tmds_ids.iter().any(|i| i == eid);
        if !proxied {
            if !own {
                return ask(IdKind::TaskMetadata, eid, forward);
            }
        } else {
            match w.tmds {
                TmdsMode::Deny => return done(deny(403, "tmds = \"deny\"", forward.path)),
                _ if !own => {
                    return done(deny(
                        403,
                        "task metadata endpoint id not owned by the caller",
                        forward.path,
                    ))
                }
                TmdsMode::Redact if rest.last() == Some(&"stats") => {
                    return done(deny(
                        403,
                        "tmds = \"redact\": statistics are not served",
                        forward.path,
                    ))
                }
                TmdsMode::Redact => {
                    forward.rule = format!("tmds = \"redact\" ({v})");
                    forward.redact_for = Some(caller.container.clone());
                }
                TmdsMode::Allow => forward.rule = format!("tmds = \"allow\" ({v})"),
            }
        }
    } else if proxied {
        return done(deny(
            403,
            "not a credentials or task metadata path (default deny)",
            forward.path,
        ));
    }
    done(Verdict::Forward(forward))
}

/// The path as logged: the canonical target, with credentials ids
/// shortened to their first four characters.
pub fn log_path(c: &Canonical, kind: Kind) -> String {
    if kind == Kind::Relay {
        let segs = &c.segments;
        if segs.len() == 3 && segs[0] == "v2" && segs[1] == "credentials" {
            return format!("/v2/credentials/{}…", short(&segs[2]));
        }
        if let Some((_, id)) = c.query.iter().find(|(k, _)| k == "id") {
            return format!("{}?id={}…", c.path(), short(id));
        }
    }
    c.target()
}

fn short(id: &str) -> String {
    id.chars().take(4).collect()
}

/// Whether a `Host` header names a metadata endpoint (or metaguard's own
/// listener). Requests for other hosts are refused: the proxy must not be
/// usable as a relay to somewhere else.
pub fn host_ok(config: &Config, host: Option<&str>) -> bool {
    let Some(h) = host else {
        return true; // HTTP/1.0 without Host: nothing to mislead
    };
    let h = h.trim();
    let name = match h.rsplit_once(':') {
        Some((n, port)) if !n.ends_with(':') && port.bytes().all(|b| b.is_ascii_digit()) => n,
        _ => h,
    };
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    if bare.eq_ignore_ascii_case("instance-data")
        || bare.eq_ignore_ascii_case("instance-data.ec2.internal")
    {
        return true;
    }
    match bare.parse::<std::net::IpAddr>() {
        Ok(ip) => {
            config.endpoints.imds.contains(&ip) || config.endpoints.task_metadata.contains(&ip)
        }
        Err(_) => false,
    }
}

/// Refuses what no metadata client sends and what smuggling needs: a body,
/// `Transfer-Encoding`, several or non-zero `Content-Length`s.
fn framing_problem(req: &Request<'_>) -> Option<&'static str> {
    if req.transfer_encoding {
        return Some("Transfer-Encoding is not accepted (metadata requests have no body)");
    }
    match req.content_lengths {
        [_, _, ..] => Some("more than one Content-Length"),
        [l] if *l != b"0" => Some("a request body is not accepted (Content-Length must be 0)"),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
