//! The rule builder: a validated [`Config`] plus the facts discovered on a
//! host → the nft scripts that make the kernel enforce it. Pure: the same
//! inputs give byte-identical scripts (golden files pin them).
//!
//! Shape of what is built (one `inet` table per namespace, owned by
//! metaguard alone, replaced as a whole in one transaction):
//!
//! * **host table** — endpoint sets (`imds4`/`imds6`/`tmd4`/`tmd6`, the
//!   IPv6 sets also holding the IPv4-mapped form of every IPv4 endpoint); a
//!   chain per workload with its decisions; a `prerouting` base chain at
//!   priority raw (before conntrack and before ecs-init's DNAT, so it sees
//!   the address the container asked for) that dispatches traffic entering
//!   from bridges through interval verdict maps keyed by interface name;
//!   an `output` base chain, also at raw (before the REDIRECT of
//!   169.254.170.2), that dispatches host processes by `socket cgroupv2`.
//! * **task table** — inside each awsvpc task namespace, an `output` chain
//!   holding the decisions of the workload that selected the namespace.
//!
//! First matching workload wins. Selector entries that overlap (an
//! interface glob `br-*` and a name `br-x`, a cgroup and its ancestor) are
//! placed in successive lookup *groups*, so an earlier workload's entry is
//! always consulted before a later overlapping one; an entry an earlier one
//! already covers entirely can never match and is dropped with a warning.
//! The per-packet cost is one map lookup per group — typically one —
//! whatever the number of entries or endpoints.
//!
//! `deny` rejects instead of dropping, so clients fail in milliseconds
//! (F14): TCP gets a reset, everything else ICMP administratively
//! prohibited.
//!
//! Layout: this module holds the inputs and outputs ([`HostFacts`],
//! [`Plan`]) and [`plan`]; `host` writes the host table, `task` the task
//! namespaces' tables, `decisions` the rules of one workload (shared by
//! both), `proxy` the proxy's listeners, marks and chains, and `sets` the
//! endpoint sets and the grouping of selector entries into lookup maps;
//! `ports` the exceptions a container or namespace gets on a bridge that a
//! later workload selects.

mod decisions;
mod host;
mod ports;
mod proxy;
mod sets;
mod task;

use std::fmt::Write as _;

use crate::config::{Config, ContainerRef};

pub use self::ports::{BridgePort, RELAY_UPSTREAM_MARK};
pub use self::proxy::{
    bridge_mark, is_host_mark, ProxyPlan, ProxyRoute, BRIDGE_MARK_BASE, BRIDGE_MARK_MOD,
    BRIDGE_MARK_SEED, HOST_MARK_MASK, HOST_MARK_TAG, PROXY_ROUTE_MARK, PROXY_ROUTE_TABLE,
    PROXY_RULE_PREF,
};
// What the tests (`use super::*`) name besides this module's own items.
#[cfg(test)]
use self::sets::*;
#[cfg(test)]
use crate::config::{Action, Selector};

/// The name of metaguard's table in every namespace.
pub const TABLE: &str = "metaguard";
/// The family of metaguard's tables.
pub const FAMILY: &str = "inet";

/// What the host looks like, as discovered by the caller (I/O happens
/// outside core).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFacts {
    /// Network namespace files that exist, as absolute paths (e.g. every
    /// entry of the directories the `netns` globs point into).
    pub netns_paths: Vec<String>,
    /// Running containers, from the Docker API; `None` when there is no
    /// Docker API to ask.
    pub containers: Option<Vec<ContainerFact>>,
    /// The host's bridge ports, with the namespace files behind each (for
    /// exceptions on a bridge, `ports`); empty when no workload needs them.
    pub ports: Vec<BridgePort>,
}

/// The label the ECS agent puts on the pause container of every awsvpc
/// task; that container's namespace is the task's.
pub const ECS_PAUSE_LABEL: (&str, &str) =
    ("com.amazonaws.ecs.container-name", "~internal~ecs~pause");

/// A running container, as far as the plan is concerned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerFact {
    pub id: String,
    /// Without the leading `/`.
    pub name: String,
    /// The image reference it was started from, as Docker reports it
    /// (`Config.Image`); empty when unknown. Only observe records use it.
    pub image: String,
    pub labels: std::collections::BTreeMap<String, String>,
    /// Shares the host's network stack (`--network host`): matched by its
    /// cgroup on the host's output path.
    pub host_network: bool,
    /// Its cgroup v2 path relative to the hierarchy root.
    pub cgroup: Option<String>,
    /// Its network namespace file, when it has its own stack.
    pub netns: Option<String>,
    /// Its environment (`KEY=VALUE`): the proxy learns which credentials
    /// and task-metadata ids belong to it.
    pub env: Vec<String>,
    /// Its addresses on its networks (Docker's `NetworkSettings`): where
    /// the relay finds an agent that runs in a container
    /// (`[agent] credentials = "container:…"`).
    pub addresses: Vec<std::net::IpAddr>,
}

/// Whether a `netns` path glob selects `path`.
pub fn netns_glob_matches(glob: &str, path: &str) -> bool {
    globset::Glob::new(glob).is_ok_and(|g| g.compile_matcher().is_match(path))
}

/// Whether an interface glob (a name, or a prefix and one trailing `*`)
/// matches `name`.
pub fn ifname_glob_matches(glob: &str, name: &str) -> bool {
    match glob.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => glob == name,
    }
}

impl ContainerFact {
    /// The value of an environment variable.
    pub fn env_var(&self, key: &str) -> Option<&str> {
        self.env
            .iter()
            .find_map(|kv| kv.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
    }

    /// Whether a `containers` selector entry names this container.
    pub fn matches(&self, r: &ContainerRef) -> bool {
        match r {
            ContainerRef::Name(n) => {
                &self.name == n
                    || self.id == *n
                    || (n.len() >= 12 && self.id.starts_with(n.as_str()))
            }
            ContainerRef::Label { key, value } => self.labels.get(key) == Some(value),
        }
    }

    /// The ECS agent's pause container of an awsvpc task.
    pub fn is_ecs_pause(&self) -> bool {
        self.labels.get(ECS_PAUSE_LABEL.0).map(String::as_str) == Some(ECS_PAUSE_LABEL.1)
    }
}

/// Containers matched by a `containers` selector, in discovery order.
pub(super) fn matched<'a>(
    facts: &'a HostFacts,
    refs: &'a [ContainerRef],
) -> impl Iterator<Item = &'a ContainerFact> {
    facts
        .containers
        .iter()
        .flatten()
        .filter(move |c| refs.iter().any(|r| c.matches(r)))
}

/// The scripts to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The host namespace's table.
    pub host: String,
    /// One table per selected task namespace, in discovery order.
    pub netns: Vec<NetnsPlan>,
    /// Things the operator should know (shadowed entries, selectors that
    /// matched nothing, selectors apply cannot resolve).
    pub warnings: Vec<String>,
    /// The proxy's listeners and addresses, when any workload proxies.
    pub proxy: Option<ProxyPlan>,
    /// The containers the plan was made with (the BPF layer classifies
    /// their namespaces); `None`: not asked, or no Docker API.
    pub containers: Option<Vec<ContainerFact>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetnsPlan {
    /// The namespace file.
    pub path: String,
    /// The workload that selected it.
    pub workload: String,
    pub script: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("workload {workload:?} uses the proxy action, which needs an IPv4 task_metadata endpoint (e.g. 169.254.170.2: the credentials relay listens there, and task namespaces reach the IMDS proxy through it); [endpoints] task_metadata has none")]
    ProxyWithoutAddress { workload: String },
}

/// Builds the plan. Pure.
pub fn plan(config: &Config, facts: &HostFacts) -> Result<Plan, PlanError> {
    let proxy = proxy::proxy_plan(config)?;
    let mut warnings = Vec::new();
    let host = host::host_script(config, facts, proxy.as_ref(), &mut warnings);
    let netns = task::plan_netns(config, facts, &mut warnings);
    Ok(Plan {
        host,
        netns,
        warnings,
        proxy,
        containers: facts.containers.clone(),
    })
}

/// The whole-table replacement prefix: `add` makes `delete` safe when the
/// table does not exist yet (nft 1.0.6 has no `destroy`), all in the same
/// transaction as the new contents.
pub(super) fn replace_prefix(out: &mut String) {
    let _ = writeln!(out, "add table {FAMILY} {TABLE}");
    let _ = writeln!(out, "delete table {FAMILY} {TABLE}");
}

pub(super) fn family(v6: bool) -> (&'static str, &'static str) {
    if v6 {
        ("ip6", "6")
    } else {
        ("ip", "4")
    }
}

pub(super) fn quote(s: &str) -> String {
    // Config validation keeps quotes and backslashes out of names and
    // paths; escape anyway so a script can never be broken out of.
    format!("\"{}\"", s.replace(['"', '\\'], "_"))
}

#[cfg(test)]
mod tests;
