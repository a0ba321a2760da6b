//! Exceptions on a bridge: a container (or namespace) that a `containers`
//! or `netns` workload selects, plugged into a bridge that a later
//! `bridges` workload selects, gets its own workload's actions in the host
//! table too — first match in file order, as for every caller.
//!
//! The host's `inet` prerouting sees the bridge (`docker0`) as the input
//! device, never the port, so the port is named in the `bridge` table,
//! which sees it: packets from the exception's port (`iifname` of the
//! veth's host side) to the endpoints get that port's identity mark
//! ([`bridge_mark`] of its ifindex, the proxy's F15 mark), and the `inet`
//! prerouting dispatches that mark to the workload's chain before it looks
//! at bridges. A port is matched by its name and index, never by an
//! address the container could change or a later container could inherit.
//! A mark another bridge port shares (a hash collision, about one in 10⁹
//! per pair) gets no exception: fail closed, with a warning.

use std::collections::HashMap;

use super::{bridge_mark, ifname_glob_matches, netns_glob_matches, HostFacts};
use crate::config::{Config, NetnsSelector, Selector};

/// A port of a bridge on the host, as discovered by the caller.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BridgePort {
    pub ifindex: u32,
    /// The port's (the veth's host side) name.
    pub name: String,
    /// The bridge it is a port of.
    pub bridge: String,
    /// The namespace files (containers' and those in the `netns` globs'
    /// directories) of the namespace that holds the port's peer, sorted.
    pub netns: Vec<String>,
}

/// One exception: traffic from `port` goes to workload `workload`'s chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PortException {
    pub port: BridgePort,
    pub workload: usize,
    pub mark: u32,
}

/// The ports whose first matching workload (file order) is a `containers`
/// or `netns` workload ahead of the `bridges` workload that selects their
/// bridge, sorted by ifindex.
pub(super) fn port_exceptions(
    config: &Config,
    facts: &HostFacts,
    warnings: &mut Vec<String>,
) -> Vec<PortException> {
    let mut by_mark: HashMap<u32, usize> = HashMap::new();
    for p in &facts.ports {
        *by_mark.entry(bridge_mark(p.ifindex)).or_default() += 1;
    }
    let mut out: Vec<PortException> = Vec::new();
    for port in &facts.ports {
        let Some(workload) = port_workload(config, facts, port) else {
            continue;
        };
        if !matches!(
            config.workloads[workload].selector,
            Selector::Containers(_) | Selector::Netns(_)
        ) {
            continue;
        }
        let mark = bridge_mark(port.ifindex);
        if by_mark.get(&mark).copied().unwrap_or(0) > 1 {
            warnings.push(format!(
                "workload {:?}: bridge port {} (on {}) shares its mark 0x{mark:08x} with another port; it gets its bridge's workload instead (fail closed) until one of them is re-created",
                config.workloads[workload].name, port.name, port.bridge
            ));
            continue;
        }
        out.push(PortException {
            port: port.clone(),
            workload,
            mark,
        });
    }
    out.sort_by_key(|e| e.port.ifindex);
    out
}

/// The first workload in file order that selects `port`: by its bridge, or
/// by the namespace behind it (`netns`, `containers`). `None` when no
/// `bridges` workload selects its bridge (nothing to make an exception
/// to) or when the bridge's workload comes first.
fn port_workload(config: &Config, facts: &HostFacts, port: &BridgePort) -> Option<usize> {
    let containers: Vec<_> = facts
        .containers
        .iter()
        .flatten()
        .filter(|c| !c.host_network)
        .filter(|c| c.netns.as_ref().is_some_and(|n| port.netns.contains(n)))
        .collect();
    for (i, w) in config.workloads.iter().enumerate() {
        let hit = match &w.selector {
            Selector::Bridges(globs) => {
                if globs.iter().any(|g| ifname_glob_matches(g, &port.bridge)) {
                    return None;
                }
                false
            }
            Selector::Netns(sels) => sels.iter().any(|s| match s {
                NetnsSelector::EcsTasks => containers.iter().any(|c| c.is_ecs_pause()),
                NetnsSelector::Path(g) => port.netns.iter().any(|p| netns_glob_matches(g, p)),
            }),
            Selector::Containers(refs) => {
                containers.iter().any(|c| refs.iter().any(|r| c.matches(r)))
            }
            Selector::Cgroups(_) => false,
        };
        if hit {
            // Only an exception when some later bridges workload selects
            // the port's bridge.
            let later = config.workloads[i + 1..].iter().any(|w| match &w.selector {
                Selector::Bridges(globs) => {
                    globs.iter().any(|g| ifname_glob_matches(g, &port.bridge))
                }
                _ => false,
            });
            return later.then_some(i);
        }
    }
    None
}

/// The mark the relay's connections to an agent in a container carry
/// (`SO_MARK` on its upstream socket): the only traffic the `bridge` table
/// lets through to the agent's credentials port. Bits no identity mark or
/// [`super::PROXY_ROUTE_MARK`] uses, and none of the low 16 (other
/// programs' masquerade marks).
pub const RELAY_UPSTREAM_MARK: u32 = 0x2d00_0000;

/// The agent's container when `[agent] credentials` names one: its bridge
/// ports, its addresses and the port it serves credentials on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct AgentGuard {
    pub ports: Vec<String>,
    pub addrs: Vec<std::net::IpAddr>,
    pub port: u16,
}

/// Where the agent's container is plugged in, when `[agent] credentials`
/// names a container and it runs on a bridge; a warning when it names one
/// that is not found.
pub(super) fn agent_guard(
    config: &Config,
    facts: &HostFacts,
    warnings: &mut Vec<String>,
) -> Option<AgentGuard> {
    let agent = config.agent_container.as_ref()?;
    if !config.proxies().1 {
        warnings.push(
            "[agent] credentials names a container, but no workload has task_metadata = \"proxy\": nothing relays credentials to it (containers cannot reach an agent that is not on the host network otherwise)".into(),
        );
    }
    let containers: Vec<_> = facts
        .containers
        .iter()
        .flatten()
        .filter(|c| c.matches(&agent.container))
        .collect();
    if facts.containers.is_some() && containers.is_empty() {
        warnings.push(
            "[agent] credentials: the agent's container is not running; nothing is relayed to it until it is".into(),
        );
    }
    let mut ports: Vec<String> = facts
        .ports
        .iter()
        .filter(|p| {
            containers
                .iter()
                .any(|c| !c.host_network && c.netns.as_ref().is_some_and(|n| p.netns.contains(n)))
        })
        .map(|p| p.name.clone())
        .collect();
    ports.sort();
    ports.dedup();
    if ports.is_empty() {
        return None;
    }
    let mut addrs: Vec<std::net::IpAddr> = containers
        .iter()
        .flat_map(|c| c.addresses.iter().copied())
        .collect();
    addrs.sort();
    addrs.dedup();
    Some(AgentGuard {
        ports,
        addrs,
        port: agent.port,
    })
}
