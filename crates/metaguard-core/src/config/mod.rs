//! The configuration contract (`../shared/spec/interface.md`, "Config file").
//!
//! Two stages, as with the CLI: `parse::RawConfig` is exactly the TOML shape
//! (serde, unknown keys rejected, every value spanned), and
//! [`Config::parse`] turns it into validated objects that the rest of the
//! program receives. Every error carries the origin (file name), the 1-based
//! line and column, the offending line, and what to do about it.
//!
//! No I/O here: the caller reads the file and passes the text in; a missing
//! file is the caller's business ([`Config::builtin_default`]).

//!
//! Layout: this module holds the validated model ([`Config`] and its
//! parts) and [`ConfigError`]; `parse` the raw TOML shape and the parsing
//! of the file's sections; `validate` the checks of one `[[workload]]`.

mod parse;
mod validate;

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use crate::proxy_path::PathPolicy;

use self::parse::{Ctx, RawConfig};
// What the tests (`use super::*`) name besides this module's own items.
#[cfg(test)]
use self::parse::default_ips;

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
pub(super) const IFNAMSIZ_MAX: usize = 15;

/// What a workload may do with one class of endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// No connection of any protocol to the endpoint; fails fast.
    Deny,
    /// Untouched.
    Allow,
    /// Served by metaguard's proxy with the workload's path policy.
    Proxy,
    /// Flows as with `allow`; HTTP on port 80 passes through the proxy in
    /// pass-through mode, which attributes and records every request for
    /// `metaguard report` (docs/observe.md).
    Observe,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Deny => "deny",
            Action::Allow => "allow",
            Action::Proxy => "proxy",
            Action::Observe => "observe",
        }
    }

    /// Whether port-80 HTTP of this action goes through metaguard's proxy
    /// (`proxy` enforces a policy there, `observe` only records).
    pub fn via_proxy(self) -> bool {
        matches!(self, Action::Proxy | Action::Observe)
    }
}

/// The top-level `mode` key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Every action as written.
    #[default]
    Enforce,
    /// `mode = "observe"`: every `deny` and `proxy` of `imds` and
    /// `task_metadata` becomes `observe`, and `raw_sockets = "deny"`
    /// becomes `allow`: nothing is blocked, everything is recorded.
    Observe,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Observe => "observe",
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

/// The ECS agent's container, when it runs on a bridge: the credentials
/// endpoint is `PORT` on that container's address, as Docker reports it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentContainer {
    pub container: ContainerRef,
    pub port: u16,
}

/// The prefix of an `[agent] credentials` value naming a container.
pub const AGENT_CONTAINER_PREFIX: &str = "container:";

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
    /// Whether the proxy answers from memory what may be kept (docs/proxy.md,
    /// "Cache"; on by default). Off, every allowed request goes upstream.
    pub cache: bool,
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
            cache: true,
        }
    }
}

/// `[layers]`: which enforcement layers run besides the nft rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layers {
    /// cgroup BPF programs on the configured cgroups (default on; a host
    /// without BPF support falls back to nft alone with a warning).
    pub bpf: bool,
    /// `container_cgroups`: the cgroup subtrees (relative to the cgroup2
    /// root) where containers live. When a bridge, `netns` or `containers`
    /// workload denies or proxies something, the BPF programs are attached
    /// here too and refuse those endpoints to every socket outside the
    /// host's network namespace whose namespace is not classified yet.
    /// Subtrees that do not exist are skipped.
    pub container_cgroups: Vec<String>,
    /// Whether the file names `container_cgroups` (else the defaults,
    /// which [`Layers::rebase_default_container_cgroups`] may place under
    /// the host's root cgroup).
    pub container_cgroups_named: bool,
}

impl Layers {
    /// Places the default `container_cgroups` under `root`, the cgroup
    /// the host's init runs below (`""` on a host whose init is in the
    /// hierarchy's root, where this changes nothing): where the host's
    /// systemd makes `system.slice` when it is itself in a cgroup of a
    /// larger hierarchy it does not see as a namespace (a container
    /// booted with its own systemd and no cgroup namespace). Entries the
    /// file names stay as written.
    pub fn rebase_default_container_cgroups(&mut self, root: &str) {
        let root = root.trim_matches('/');
        if self.container_cgroups_named || root.is_empty() {
            return;
        }
        for c in &mut self.container_cgroups {
            *c = format!("{root}/{c}");
        }
    }
}

/// Where container runtimes put containers' cgroups: Docker with the
/// systemd driver (`system.slice/docker-<id>.scope`) or the cgroupfs driver
/// (`docker/<id>`), and the ECS agent's task cgroups (cgroupfs: `ecs/<task>`;
/// systemd: `ecstasks.slice`).
pub const DEFAULT_CONTAINER_CGROUPS: [&str; 4] =
    ["system.slice", "docker", "ecs", "ecstasks.slice"];

impl Default for Layers {
    fn default() -> Layers {
        Layers {
            bpf: true,
            container_cgroups: DEFAULT_CONTAINER_CGROUPS.map(String::from).to_vec(),
            container_cgroups_named: false,
        }
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
    /// `mode`: with [`Mode::Observe`] the workloads' actions below are
    /// already the observed ones ([`Config::parse_enforced`] reads the
    /// same text as written).
    pub mode: Mode,
    pub endpoints: Endpoints,
    pub agent_credentials: SocketAddr,
    /// `[agent] credentials = "container:REF:PORT"`: the agent runs in a
    /// container (on a bridge); the relay forwards to that container's
    /// current address on PORT, found through the Docker API by the
    /// container's identity, and `agent_credentials` is not used.
    pub agent_container: Option<AgentContainer>,
    /// In file order: first match wins.
    pub workloads: Vec<Workload>,
    pub layers: Layers,
    pub proxy: ProxySettings,
}

impl Config {
    /// Whether any workload's `imds` / `task_metadata` goes through the
    /// proxy (`proxy` or `observe`): the proxy then serves that service.
    pub fn proxies(&self) -> (bool, bool) {
        let imds = self.workloads.iter().any(|w| w.imds.via_proxy());
        let tmd = self.workloads.iter().any(|w| w.task_metadata.via_proxy());
        (imds, tmd)
    }

    /// Whether any workload observes something (the daemon then records).
    pub fn observes(&self) -> bool {
        self.workloads
            .iter()
            .any(|w| w.imds == Action::Observe || w.task_metadata == Action::Observe)
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
}

#[cfg(test)]
mod tests;
