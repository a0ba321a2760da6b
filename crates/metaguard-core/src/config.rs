//! The configuration contract (`../shared/spec/interface.md`, "Config file").
//!
//! Two stages, as with the CLI: [`RawConfig`] is exactly the TOML shape
//! (serde, unknown keys rejected, every value spanned), and
//! [`Config::parse`] turns it into validated objects that the rest of the
//! program receives. Every error carries the origin (file name), the 1-based
//! line and column, the offending line, and what to do about it.
//!
//! No I/O here: the caller reads the file and passes the text in; a missing
//! file is the caller's business ([`Config::builtin_default`]).

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;

use serde::Deserialize;
use serde_spanned::Spanned;

use crate::location::{line_at, Position};
use crate::proxy_path::{PathGlob, PathPolicy};

/// Default location of the configuration file.
pub const DEFAULT_PATH: &str = "/etc/metaguard/metaguard.toml";

/// The IMDS addresses guarded when `[endpoints] imds` is not given.
pub const DEFAULT_IMDS: [&str; 2] = ["169.254.169.254", "fd00:ec2::254"];
/// The task-metadata / credentials addresses guarded by default
/// (ECS 169.254.170.2; EKS Pod Identity 169.254.170.23 and fd00:ec2::23).
pub const DEFAULT_TASK_METADATA: [&str; 3] = ["169.254.170.2", "169.254.170.23", "fd00:ec2::23"];
/// Where the ECS agent serves task credentials on the host.
pub const DEFAULT_AGENT_CREDENTIALS: &str = "127.0.0.1:51679";

/// The policy in force when no configuration file exists.
pub const BUILTIN_DEFAULT_TOML: &str = r#"# metaguard's built-in default policy (used when no config file exists).
[[workload]]
name          = "bridge-containers"
bridges       = ["docker0", "br-*", "ecs-bridge"]
imds          = "deny"
task_metadata = "allow"

[[workload]]
name          = "awsvpc-tasks"
netns         = ["ecs-tasks"]
imds          = "deny"
"#;

/// Interface names are at most 15 bytes (IFNAMSIZ - 1).
const IFNAMSIZ_MAX: usize = 15;

/// What a workload may do with one class of endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// No connection of any protocol to the endpoint; fails fast.
    Deny,
    /// Untouched.
    Allow,
    /// Served by metaguard's proxy with the workload's path policy.
    Proxy,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Deny => "deny",
            Action::Allow => "allow",
            Action::Proxy => "proxy",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A network-namespace selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetnsSelector {
    /// Every awsvpc task namespace found through the Docker API.
    EcsTasks,
    /// A path glob, e.g. `/run/netns/task-*`. Bare names are taken
    /// relative to `/run/netns`.
    Path(String),
}

/// A container reference, resolved at run time through the Docker API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerRef {
    Name(String),
    Label { key: String, value: String },
}

/// Who a workload is: exactly one kind of selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// Traffic entering from bridges whose names match these globs. A glob
    /// is a literal name or a prefix followed by a single trailing `*`
    /// (what nft's `iifname "br-*"` matches natively).
    Bridges(Vec<String>),
    /// Task network namespaces; rules go inside each.
    Netns(Vec<NetnsSelector>),
    /// cgroup v2 subtrees, relative to the cgroup2 root, normalised without
    /// leading or trailing `/`.
    Cgroups(Vec<String>),
    /// Containers by name or label.
    Containers(Vec<ContainerRef>),
}

impl Selector {
    /// The TOML key of this selector kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Selector::Bridges(_) => "bridges",
            Selector::Netns(_) => "netns",
            Selector::Cgroups(_) => "cgroups",
            Selector::Containers(_) => "containers",
        }
    }
}

/// One `[[workload]]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub name: String,
    pub selector: Selector,
    pub imds: Action,
    pub task_metadata: Action,
    pub credentials_ids: Vec<String>,
    /// `raw_sockets = "deny"`: raw and packet sockets are refused at
    /// creation (BPF layer, `cgroups` workloads only). Deny or Allow.
    pub raw_sockets: Action,
    /// `[workload.imds_policy]`: what the proxy serves this workload from
    /// IMDS (`imds = "proxy"`); the default catalogue when not given.
    pub imds_policy: PathPolicy,
    /// `tmds`: what the proxy does with task-metadata (`/v3`, `/v4`) paths
    /// for this workload (`task_metadata = "proxy"`).
    pub tmds: TmdsMode,
}

/// What the credentials relay does with the task metadata endpoints
/// (`/v3/<id>/…`, `/v4/<id>/…`) for a proxied workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TmdsMode {
    /// Served as the agent answers (the caller's own endpoint id only).
    Allow,
    /// Refused (403).
    Deny,
    /// The caller's own endpoint only, with other containers, ARNs and
    /// network details removed; statistics refused.
    #[default]
    Redact,
}

impl TmdsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TmdsMode::Allow => "allow",
            TmdsMode::Deny => "deny",
            TmdsMode::Redact => "redact",
        }
    }
}

/// `[proxy]`: the metadata proxy and credentials relay (served by the
/// daemon; see `ruleset::ProxyPlan` for where they listen).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxySettings {
    /// The port of the proxy's listeners: the IMDS proxy's on the IMDS
    /// address, the credentials relay's on the task-metadata address
    /// (neither address is the host's; rules DNAT callers there).
    pub imds_port: u16,
    /// Requests per second allowed per workload (token bucket, steady).
    pub rate: u32,
    /// Token bucket size per workload.
    pub burst: u32,
    /// Open connections allowed per workload.
    pub max_connections: u32,
    /// Where audit lines go (JSON, one per request); `None`: the daemon's
    /// log (stderr).
    pub audit_log: Option<String>,
}

/// Default port of the proxy's listeners (on the endpoint addresses, never
/// 127/8).
pub const DEFAULT_IMDS_PROXY_PORT: u16 = 9470;

impl Default for ProxySettings {
    fn default() -> ProxySettings {
        // The ECS agent's own credentials-endpoint throttle: 40 rps steady,
        // 60 burst.
        ProxySettings {
            imds_port: DEFAULT_IMDS_PROXY_PORT,
            rate: 40,
            burst: 60,
            max_connections: 64,
            audit_log: None,
        }
    }
}

/// `[layers]`: which enforcement layers run besides the nft rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layers {
    /// cgroup BPF programs on the configured cgroups (default on; a host
    /// without BPF support falls back to nft alone with a warning).
    pub bpf: bool,
}

impl Default for Layers {
    fn default() -> Layers {
        Layers { bpf: true }
    }
}

/// The endpoints to guard, per class, each list deduplicated and in file
/// order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    pub imds: Vec<IpAddr>,
    pub task_metadata: Vec<IpAddr>,
}

/// Where the configuration came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    BuiltinDefault,
    File(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::BuiltinDefault => f.write_str("<built-in default>"),
            Origin::File(p) => f.write_str(p),
        }
    }
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub origin: Origin,
    pub endpoints: Endpoints,
    pub agent_credentials: SocketAddr,
    /// In file order: first match wins.
    pub workloads: Vec<Workload>,
    pub layers: Layers,
    pub proxy: ProxySettings,
}

impl Config {
    /// Whether any workload has `action` for `imds` / `task_metadata`.
    pub fn proxies(&self) -> (bool, bool) {
        let imds = self.workloads.iter().any(|w| w.imds == Action::Proxy);
        let tmd = self
            .workloads
            .iter()
            .any(|w| w.task_metadata == Action::Proxy);
        (imds, tmd)
    }
}

/// A configuration error: where, what, and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub origin: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
    /// The source line the error points into (empty when unknown).
    pub source_line: String,
    pub hint: Option<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.origin, self.line, self.column, self.message
        )?;
        if !self.source_line.is_empty() {
            let gutter = self.line.to_string().len();
            write!(
                f,
                "\n {:gutter$} |\n {} | {}\n {:gutter$} | {:>col$}",
                "",
                self.line,
                self.source_line,
                "",
                "^",
                col = self.column
            )?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "\n  = help: {hint}")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Raw TOML shape.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    endpoints: Option<RawEndpoints>,
    agent: Option<RawAgent>,
    layers: Option<RawLayers>,
    proxy: Option<RawProxy>,
    #[serde(default)]
    workload: Vec<Spanned<RawWorkload>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    imds_port: Option<Spanned<i64>>,
    rate: Option<Spanned<i64>>,
    burst: Option<Spanned<i64>>,
    max_connections: Option<Spanned<i64>>,
    audit_log: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPathPolicy {
    #[serde(default)]
    allow: Vec<Spanned<String>>,
    #[serde(default)]
    deny: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoints {
    imds: Option<Spanned<Vec<Spanned<String>>>>,
    task_metadata: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLayers {
    bpf: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    credentials: Option<Spanned<String>>,
}

type SpannedList = Spanned<Vec<Spanned<String>>>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkload {
    name: Option<Spanned<String>>,
    bridges: Option<SpannedList>,
    netns: Option<SpannedList>,
    cgroups: Option<SpannedList>,
    containers: Option<SpannedList>,
    imds: Option<Spanned<String>>,
    task_metadata: Option<Spanned<String>>,
    credentials_ids: Option<SpannedList>,
    raw_sockets: Option<Spanned<String>>,
    imds_policy: Option<Spanned<RawPathPolicy>>,
    tmds: Option<Spanned<String>>,
}

// ---------------------------------------------------------------------------

struct Ctx<'a> {
    text: &'a str,
    origin: &'a str,
}

impl Ctx<'_> {
    fn err(
        &self,
        span: Range<usize>,
        message: impl Into<String>,
        hint: Option<&str>,
    ) -> ConfigError {
        let pos = Position::of(self.text, span.start);
        ConfigError {
            origin: self.origin.to_string(),
            line: pos.line,
            column: pos.column,
            message: message.into(),
            source_line: line_at(self.text, span.start).to_string(),
            hint: hint.map(str::to_string),
        }
    }
}

/// A key whose value the host, not the parser, can find wrong (a path the
/// daemon cannot write): [`Config::error_at`] points an error at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    /// `[proxy] audit_log`.
    ProxyAuditLog,
}

impl Config {
    /// An error about `key`'s value in `text` (the config's text, from
    /// `origin`), located at that value — file, line, column, the line and
    /// a caret — like every parse error; at the file's start when the key
    /// is not in the text.
    pub fn error_at(
        text: &str,
        origin: &str,
        key: Key,
        message: impl Into<String>,
        hint: &str,
    ) -> ConfigError {
        let cx = Ctx { text, origin };
        let span = toml::from_str::<RawConfig>(text)
            .ok()
            .and_then(|raw| match key {
                Key::ProxyAuditLog => raw.proxy.and_then(|p| p.audit_log).map(|v| v.span()),
            });
        cx.err(span.unwrap_or(0..0), message, Some(hint))
    }

    /// The built-in default policy (interface.md: used when no file exists).
    pub fn builtin_default() -> Config {
        // The default text is a constant of this crate and is covered by a
        // unit test, so a failure here is a build defect, not user input.
        let mut config = Self::parse(BUILTIN_DEFAULT_TOML, "<built-in default>")
            .unwrap_or_else(|e| unreachable!("built-in default config is invalid: {e}"));
        config.origin = Origin::BuiltinDefault;
        config
    }

    /// Parses and validates `text`; `origin` names it in errors (a path).
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let cx = Ctx { text, origin };
        let raw: RawConfig = toml::from_str(text).map_err(|e| toml_error(&cx, &e))?;

        let endpoints = match raw.endpoints {
            None => Endpoints {
                imds: default_ips(&DEFAULT_IMDS),
                task_metadata: default_ips(&DEFAULT_TASK_METADATA),
            },
            Some(e) => Endpoints {
                imds: match e.imds {
                    None => default_ips(&DEFAULT_IMDS),
                    Some(list) => parse_ip_list(&cx, "endpoints.imds", list)?,
                },
                task_metadata: match e.task_metadata {
                    None => default_ips(&DEFAULT_TASK_METADATA),
                    Some(list) => parse_ip_list(&cx, "endpoints.task_metadata", list)?,
                },
            },
        };
        if let Some(overlap) = endpoints
            .imds
            .iter()
            .find(|ip| endpoints.task_metadata.contains(ip))
        {
            return Err(cx.err(
                0..0,
                format!("{overlap} is listed both as an imds and a task_metadata endpoint"),
                Some("each address belongs to exactly one endpoint class"),
            ));
        }

        let agent_credentials = match raw.agent.and_then(|a| a.credentials) {
            None => DEFAULT_AGENT_CREDENTIALS
                .parse()
                .unwrap_or_else(|e| unreachable!("default agent address: {e}")),
            Some(s) => s.get_ref().parse::<SocketAddr>().map_err(|_| {
                cx.err(
                    s.span(),
                    format!(
                        "agent.credentials: {:?} is not an IP:PORT address",
                        s.get_ref()
                    ),
                    Some(r#"write it like "127.0.0.1:51679" or "[::1]:51679""#),
                )
            })?,
        };

        let mut names = BTreeSet::new();
        let mut workloads = Vec::with_capacity(raw.workload.len());
        for w in raw.workload {
            let span = w.span();
            let w = w.into_inner();
            let workload = validate_workload(&cx, span.clone(), w)?;
            if !names.insert(workload.name.clone()) {
                return Err(cx.err(
                    span,
                    format!("workload name {:?} is used twice", workload.name),
                    Some("give every [[workload]] a unique name"),
                ));
            }
            workloads.push(workload);
        }

        Ok(Config {
            origin: Origin::File(origin.to_string()),
            endpoints,
            agent_credentials,
            workloads,
            layers: Layers {
                bpf: raw.layers.and_then(|l| l.bpf).unwrap_or(true),
            },
            proxy: parse_proxy(&cx, raw.proxy)?,
        })
    }
}

fn parse_proxy(cx: &Ctx<'_>, raw: Option<RawProxy>) -> Result<ProxySettings, ConfigError> {
    let mut p = ProxySettings::default();
    let Some(raw) = raw else { return Ok(p) };
    let int = |key: &str, v: Spanned<i64>, min: i64, max: i64| -> Result<u32, ConfigError> {
        let n = *v.get_ref();
        if n < min || n > max {
            return Err(cx.err(
                v.span(),
                format!("proxy.{key}: {n} is out of range"),
                Some(&format!("use a whole number from {min} to {max}")),
            ));
        }
        Ok(n as u32)
    };
    if let Some(v) = raw.imds_port {
        let span = v.span();
        p.imds_port = int("imds_port", v, 1, 65535)? as u16;
        if p.imds_port == 80 {
            return Err(cx.err(
                span,
                "proxy.imds_port: 80 is the port callers ask for; the proxy's listeners must be on another",
                Some("pick another port, e.g. 9470 (the default)"),
            ));
        }
    }
    if let Some(v) = raw.rate {
        p.rate = int("rate", v, 1, 1_000_000)?;
    }
    if let Some(v) = raw.burst {
        p.burst = int("burst", v, 1, 1_000_000)?;
    }
    if let Some(v) = raw.max_connections {
        p.max_connections = int("max_connections", v, 1, 1_000_000)?;
    }
    if let Some(v) = raw.audit_log {
        if !v.get_ref().starts_with('/') {
            return Err(cx.err(
                v.span(),
                format!("proxy.audit_log: {:?} is not an absolute path", v.get_ref()),
                Some("write an absolute file path, e.g. \"/var/log/metaguard/audit.log\", or remove the key to log to the daemon's stderr"),
            ));
        }
        p.audit_log = Some(v.into_inner());
    }
    Ok(p)
}

fn parse_path_globs(
    cx: &Ctx<'_>,
    key: &str,
    list: Vec<Spanned<String>>,
) -> Result<Vec<PathGlob>, ConfigError> {
    list.into_iter()
        .map(|g| {
            let s = g.get_ref();
            let bad = !s.starts_with('/')
                || s.contains(['?', '#', '%', '\\'])
                || s.split('/').any(|seg| seg == "." || seg == "..")
                || s.split('/').any(|seg| seg.contains('*') && seg != "*" && seg != "**");
            if bad {
                Err(cx.err(
                    g.span(),
                    format!("{key}: {s:?} is not a path glob"),
                    Some("write canonical paths like \"/latest/meta-data/placement/**\": absolute, no query, no '.'/'..'; '*' is one whole segment, '**' any number"),
                ))
            } else {
                Ok(PathGlob::new(s))
            }
        })
        .collect()
}

fn toml_error(cx: &Ctx<'_>, e: &toml::de::Error) -> ConfigError {
    let span = e.span().unwrap_or(0..0);
    let message = e.message().trim().to_string();
    let hint = if message.starts_with("unknown field") {
        Some("check the spelling; the keys are listed in docs/config.md and interface.md")
    } else {
        None
    };
    cx.err(span, message, hint)
}

fn default_ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter()
        .map(|s| {
            s.parse()
                .unwrap_or_else(|e| unreachable!("default endpoint {s}: {e}"))
        })
        .collect()
}

fn parse_ip_list(cx: &Ctx<'_>, key: &str, list: SpannedList) -> Result<Vec<IpAddr>, ConfigError> {
    let span = list.span();
    let list = list.into_inner();
    if list.is_empty() {
        return Err(cx.err(
            span,
            format!("{key} is empty: metaguard would guard nothing there"),
            Some("remove the key to use the defaults"),
        ));
    }
    let mut out: Vec<IpAddr> = Vec::with_capacity(list.len());
    for item in list {
        let ip = parse_ip(item.get_ref()).ok_or_else(|| {
            cx.err(
                item.span(),
                format!("{key}: {:?} is not an IP address", item.get_ref()),
                Some("write a plain IPv4 or IPv6 address, like \"169.254.169.254\" or \"fd00:ec2::254\""),
            )
        })?;
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    Ok(out)
}

/// Parses an endpoint address. IPv4-mapped IPv6 (`::ffff:a.b.c.d`) is
/// folded to IPv4: the kernel treats both spellings as one destination, and
/// the rule builder covers the mapped form of every IPv4 endpoint anyway.
fn parse_ip(s: &str) -> Option<IpAddr> {
    let ip: IpAddr = s.trim().parse().ok()?;
    Some(match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    })
}

fn parse_action(
    cx: &Ctx<'_>,
    key: &str,
    v: Option<Spanned<String>>,
) -> Result<Action, ConfigError> {
    let Some(v) = v else {
        return Ok(Action::Allow);
    };
    match v.get_ref().as_str() {
        "deny" => Ok(Action::Deny),
        "allow" => Ok(Action::Allow),
        "proxy" => Ok(Action::Proxy),
        other => Err(cx.err(
            v.span(),
            format!("{key}: unknown action {other:?}"),
            Some(r#"use one of "deny", "allow", "proxy""#),
        )),
    }
}

fn validate_workload(
    cx: &Ctx<'_>,
    span: Range<usize>,
    w: RawWorkload,
) -> Result<Workload, ConfigError> {
    let name = match w.name {
        Some(n) if !n.get_ref().trim().is_empty() => n.into_inner(),
        Some(n) => {
            return Err(cx.err(
                n.span(),
                "workload name is empty",
                Some("name every workload"),
            ))
        }
        None => {
            return Err(cx.err(
                span,
                "workload has no name",
                Some(r#"add name = "…" to this [[workload]]"#),
            ))
        }
    };

    let given: Vec<(&'static str, &SpannedList)> = [
        ("bridges", w.bridges.as_ref()),
        ("netns", w.netns.as_ref()),
        ("cgroups", w.cgroups.as_ref()),
        ("containers", w.containers.as_ref()),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.map(|v| (k, v)))
    .collect();
    let (kind, list) = match given.as_slice() {
        [] => {
            return Err(cx.err(
                span,
                format!("workload {name:?} has no selector"),
                Some("give it exactly one of bridges, netns, cgroups, containers"),
            ))
        }
        [one] => *one,
        [_, second, ..] => {
            let kinds: Vec<&str> = given.iter().map(|(k, _)| *k).collect();
            return Err(cx.err(
                second.1.span(),
                format!(
                    "workload {name:?} has more than one kind of selector ({})",
                    kinds.join(", ")
                ),
                Some("split it into one [[workload]] per selector kind"),
            ));
        }
    };
    if list.get_ref().is_empty() {
        return Err(cx.err(
            list.span(),
            format!("workload {name:?}: {kind} is empty, so it selects nothing"),
            Some("list at least one entry, or remove the workload"),
        ));
    }
    let items = list.get_ref();
    let selector = match kind {
        "bridges" => Selector::Bridges(
            items
                .iter()
                .map(|i| check_bridge_glob(cx, i))
                .collect::<Result<_, _>>()?,
        ),
        "netns" => Selector::Netns(
            items
                .iter()
                .map(|i| check_netns(cx, i))
                .collect::<Result<_, _>>()?,
        ),
        "cgroups" => Selector::Cgroups(
            items
                .iter()
                .map(|i| check_cgroup(cx, i))
                .collect::<Result<_, _>>()?,
        ),
        _ => Selector::Containers(
            items
                .iter()
                .map(|i| check_container(cx, i))
                .collect::<Result<_, _>>()?,
        ),
    };

    let raw_sockets = match &w.raw_sockets {
        None => Action::Allow,
        Some(v) => match v.get_ref().as_str() {
            "deny" if kind == "cgroups" => Action::Deny,
            "deny" => {
                return Err(cx.err(
                    v.span(),
                    format!("workload {name:?}: raw_sockets = \"deny\" needs a cgroups selector"),
                    Some("raw and packet sockets are refused by cgroup BPF programs; select the workload by cgroups"),
                ))
            }
            "allow" => Action::Allow,
            other => {
                return Err(cx.err(
                    v.span(),
                    format!("raw_sockets: unknown action {other:?}"),
                    Some(r#"use "deny" or "allow""#),
                ))
            }
        },
    };
    let imds = parse_action(cx, "imds", w.imds)?;
    let task_metadata = parse_action(cx, "task_metadata", w.task_metadata)?;
    let credentials_ids = match w.credentials_ids {
        None => Vec::new(),
        Some(ids) => ids
            .into_inner()
            .into_iter()
            .map(|id| {
                let ok = !id.get_ref().is_empty()
                    && id
                        .get_ref()
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
                if ok {
                    Ok(id.into_inner())
                } else {
                    Err(cx.err(
                        id.span(),
                        format!("credentials id {:?} is not a valid id", id.get_ref()),
                        Some("ids are letters, digits, '-' and '_' (the last segment of AWS_CONTAINER_CREDENTIALS_RELATIVE_URI)"),
                    ))
                }
            })
            .collect::<Result<_, _>>()?,
    };
    let imds_policy = match w.imds_policy {
        None => PathPolicy::default_imds(),
        Some(p) if imds != Action::Proxy => {
            return Err(cx.err(
                p.span(),
                format!("workload {name:?}: imds_policy is only used with imds = \"proxy\""),
                Some("set imds = \"proxy\" or remove the imds_policy table"),
            ))
        }
        Some(p) => {
            let p = p.into_inner();
            PathPolicy {
                allow: parse_path_globs(cx, "imds_policy.allow", p.allow)?,
                deny: parse_path_globs(cx, "imds_policy.deny", p.deny)?,
            }
        }
    };
    let tmds = match w.tmds {
        None => TmdsMode::default(),
        Some(v) if task_metadata != Action::Proxy => {
            return Err(cx.err(
                v.span(),
                format!("workload {name:?}: tmds is only used with task_metadata = \"proxy\""),
                Some("set task_metadata = \"proxy\" or remove tmds"),
            ))
        }
        Some(v) => match v.get_ref().as_str() {
            "allow" => TmdsMode::Allow,
            "deny" => TmdsMode::Deny,
            "redact" => TmdsMode::Redact,
            other => {
                return Err(cx.err(
                    v.span(),
                    format!("tmds: unknown mode {other:?}"),
                    Some(r#"use one of "allow", "deny", "redact""#),
                ))
            }
        },
    };
    Ok(Workload {
        name,
        selector,
        imds,
        task_metadata,
        credentials_ids,
        raw_sockets,
        imds_policy,
        tmds,
    })
}

fn check_bridge_glob(cx: &Ctx<'_>, item: &Spanned<String>) -> Result<String, ConfigError> {
    let s = item.get_ref();
    let body = s.strip_suffix('*').unwrap_or(s);
    let problem = if s.is_empty() || s == "*" {
        Some("an interface glob must name something (\"*\" alone would select every interface)")
    } else if body.contains('*') || body.contains('?') || body.contains('[') {
        Some("only a single trailing '*' is supported (nft matches iifname \"br-*\" natively)")
    } else if body.len() > IFNAMSIZ_MAX {
        Some("interface names are at most 15 bytes long")
    } else if body.bytes().any(|b| {
        b == b'/' || b == b'"' || b == b'\\' || b.is_ascii_whitespace() || b.is_ascii_control()
    }) {
        Some("interface names cannot hold '/', quotes, backslashes or white space")
    } else {
        None
    };
    match problem {
        None => Ok(s.clone()),
        Some(why) => Err(cx.err(
            item.span(),
            format!("bridges: {s:?} is not a usable interface glob"),
            Some(why),
        )),
    }
}

fn check_netns(cx: &Ctx<'_>, item: &Spanned<String>) -> Result<NetnsSelector, ConfigError> {
    let s = item.get_ref();
    if s == "ecs-tasks" {
        return Ok(NetnsSelector::EcsTasks);
    }
    if s.is_empty() || s.split('/').any(|seg| seg == "..") {
        return Err(cx.err(
            item.span(),
            format!("netns: {s:?} is not a usable namespace path"),
            Some("use an absolute path glob like \"/run/netns/task-*\", a name under /run/netns, or \"ecs-tasks\""),
        ));
    }
    let path = if s.starts_with('/') {
        s.clone()
    } else {
        format!("/run/netns/{s}")
    };
    globset::Glob::new(&path).map_err(|e| {
        cx.err(
            item.span(),
            format!("netns: {s:?} is not a valid glob: {}", e.kind()),
            None,
        )
    })?;
    Ok(NetnsSelector::Path(path))
}

fn check_cgroup(cx: &Ctx<'_>, item: &Spanned<String>) -> Result<String, ConfigError> {
    let s = item.get_ref();
    let trimmed = s.trim_matches('/');
    let bad = trimmed.is_empty()
        || trimmed
            .split('/')
            .any(|seg| seg.is_empty() || seg == "." || seg == "..")
        || trimmed
            .bytes()
            .any(|b| b == b'"' || b == b'\\' || b.is_ascii_control());
    if bad {
        return Err(cx.err(
            item.span(),
            format!("cgroups: {s:?} is not a usable cgroup v2 path"),
            Some("write a subtree relative to the cgroup2 root, like \"docker\" or \"system.slice/docker-abc.scope\" (the root itself cannot be selected)"),
        ));
    }
    Ok(trimmed.to_string())
}

fn check_container(cx: &Ctx<'_>, item: &Spanned<String>) -> Result<ContainerRef, ConfigError> {
    let s = item.get_ref();
    if let Some(label) = s.strip_prefix("label:") {
        return match label.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok(ContainerRef::Label {
                key: k.to_string(),
                value: v.to_string(),
            }),
            _ => Err(cx.err(
                item.span(),
                format!("containers: {s:?} is not a label selector"),
                Some("write label selectors as \"label:KEY=VALUE\""),
            )),
        };
    }
    let name = s.strip_prefix('/').unwrap_or(s);
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        return Err(cx.err(
            item.span(),
            format!("containers: {s:?} is not a container name"),
            Some("container names are letters, digits, '_', '.' and '-'; use \"label:K=V\" to select by label"),
        ));
    }
    Ok(ContainerRef::Name(name.to_string()))
}

#[cfg(test)]
mod tests;
