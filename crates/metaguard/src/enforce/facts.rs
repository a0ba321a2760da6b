//! What a plan needs from the host besides the kernel's tables: the
//! namespace files `netns` globs point into, the running containers (the
//! Docker API), and the endpoints whose open connections apply cuts.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use metaguard_core::config::{Action, NetnsSelector, Selector};
use metaguard_core::ruleset::{BridgePort, ContainerFact, HostFacts};
use metaguard_core::Config;
use metaguard_sys::host::Host;
use metaguard_sys::netns::Netns;

use super::Engine;

impl Engine {
    /// Host facts for the plan: namespace files (see [`netns_paths`]) and,
    /// when a selector needs them, the running containers from the Docker
    /// API. A Docker API that exists but fails is an error: planning
    /// without it would silently drop workloads.
    pub fn facts(&self, config: &Config) -> anyhow::Result<HostFacts> {
        self.facts_with(config, Containers::Ask)
    }

    /// The running containers from the Docker API (`None`: no socket).
    pub fn containers(&self) -> anyhow::Result<Option<Vec<ContainerFact>>> {
        crate::discovery::docker::containers(&self.docker_socket, self.host.proc_root())
    }

    pub(super) fn facts_with(
        &self,
        config: &Config,
        containers: Containers<'_>,
    ) -> anyhow::Result<HostFacts> {
        let containers = match containers {
            _ if !needs_docker(config) => None,
            Containers::Ask => self.containers()?,
            Containers::Known(cs) => Some(cs.to_vec()),
            Containers::Unknown => None,
        };
        let netns_paths = netns_paths(config);
        let ports = if needs_ports(config) {
            self.bridge_ports(&netns_paths, containers.as_deref())?
        } else {
            Vec::new()
        };
        Ok(HostFacts {
            netns_paths,
            containers,
            ports,
        })
    }

    /// Every bridge port of the host (rtnetlink), with the namespace files
    /// — containers' and those `netns` globs point at — of the namespace
    /// that holds its peer (the port's `link_netnsid` against the id the
    /// host gives each file's namespace: nothing inside a container can
    /// change either).
    fn bridge_ports(
        &self,
        netns_paths: &[String],
        containers: Option<&[ContainerFact]>,
    ) -> anyhow::Result<Vec<BridgePort>> {
        let links = self.host.links()?;
        let names: HashMap<u32, &str> =
            links.iter().map(|l| (l.ifindex, l.name.as_str())).collect();
        let files: Vec<&String> = containers
            .into_iter()
            .flatten()
            .filter(|c| !c.host_network)
            .filter_map(|c| c.netns.as_ref())
            .chain(netns_paths)
            .collect();
        let mut ids: Option<Vec<(&String, Option<i32>)>> = None;
        let mut out = Vec::new();
        for l in &links {
            let Some(bridge) = l.master.and_then(|m| names.get(&m)) else {
                continue;
            };
            let mut netns: Vec<String> = match l.link_netnsid {
                Some(peer) => ids
                    .get_or_insert_with(|| {
                        files
                            .iter()
                            .map(|f| (*f, self.host.netns_id(Path::new(f))))
                            .collect()
                    })
                    .iter()
                    .filter(|(_, id)| *id == Some(peer))
                    .map(|(f, _)| (*f).clone())
                    .collect(),
                None => Vec::new(),
            };
            netns.sort();
            netns.dedup();
            out.push(BridgePort {
                ifindex: l.ifindex,
                name: l.name.clone(),
                bridge: (*bridge).to_string(),
                netns,
            });
        }
        Ok(out)
    }
}

/// Whether the plan needs the host's bridge ports: `config` can make
/// exceptions on a bridge (a `containers` or `netns` workload ahead of a
/// `bridges` workload; first match wins), or the agent runs in a container
/// whose credentials port the bridge table guards.
pub fn needs_ports(config: &Config) -> bool {
    let first_selector = config
        .workloads
        .iter()
        .position(|w| matches!(w.selector, Selector::Containers(_) | Selector::Netns(_)));
    let last_bridges = config
        .workloads
        .iter()
        .rposition(|w| matches!(w.selector, Selector::Bridges(_)));
    config.agent_container.is_some()
        || matches!((first_selector, last_bridges), (Some(a), Some(b)) if a < b)
}

/// Where a plan's container facts come from.
#[derive(Debug, Clone, Copy)]
pub enum Containers<'a> {
    /// Ask the Docker API now.
    Ask,
    /// These (the daemon's last answer from the Docker API).
    Known(&'a [ContainerFact]),
    /// None known, and the API must not be asked now: at daemon start-up,
    /// before READY. Docker is ordered after metaguard at boot, and on
    /// hosts with `docker.socket` a connection would start dockerd, which
    /// waits for metaguard: asking would stall the start until a timeout.
    Unknown,
}

/// Whether a selector of `config` needs the Docker API.
pub fn needs_docker(config: &Config) -> bool {
    config.agent_container.is_some()
        || config.workloads.iter().any(|w| match &w.selector {
            Selector::Containers(_) => true,
            Selector::Netns(sels) => sels.contains(&NetnsSelector::EcsTasks),
            _ => false,
        })
}

/// The directories `netns` path globs point into (the literal part before
/// the first wildcard, up to its last `/`), each once, in config order.
pub fn netns_dirs(config: &Config) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for w in &config.workloads {
        let Selector::Netns(sels) = &w.selector else {
            continue;
        };
        for s in sels {
            if let NetnsSelector::Path(glob) = s {
                let literal: String = glob
                    .chars()
                    .take_while(|c| !matches!(c, '*' | '?' | '[' | '{'))
                    .collect();
                let dir = match literal.rfind('/') {
                    Some(i) => PathBuf::from(&literal[..i.max(1)]),
                    None => continue,
                };
                if !dirs.contains(&dir) {
                    dirs.push(dir);
                }
            }
        }
    }
    dirs
}

/// The entries of every directory a `netns` glob points into. Unreadable
/// directories contribute nothing (the plan then warns that the selector
/// matched nothing).
pub fn netns_paths(config: &Config) -> Vec<String> {
    let dirs = netns_dirs(config);
    let mut netns_paths = Vec::new();
    for d in dirs {
        if let Ok(rd) = std::fs::read_dir(&d) {
            let mut entries: Vec<String> = rd
                .flatten()
                .map(|e| e.path().display().to_string())
                .collect();
            entries.sort();
            netns_paths.extend(entries);
        }
    }
    netns_paths
}

/// Endpoints of every class some workload denies.
pub(super) fn denied_endpoints(config: &Config) -> Vec<IpAddr> {
    let mut out = Vec::new();
    if config.workloads.iter().any(|w| w.imds == Action::Deny) {
        out.extend(config.endpoints.imds.iter().copied());
    }
    if config
        .workloads
        .iter()
        .any(|w| w.task_metadata == Action::Deny)
    {
        out.extend(config.endpoints.task_metadata.iter().copied());
    }
    out
}

/// `conntrack -D` for flows whose original destination is one of `ips`;
/// returns how many were deleted.
pub(super) fn conntrack_delete(
    host: &dyn Host,
    ns: Option<&Netns>,
    ips: &[IpAddr],
) -> anyhow::Result<u64> {
    let mut total = 0;
    for ip in ips {
        total += host.conntrack_delete(ns, *ip)?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> Config {
        Config::parse(text, "t.toml").expect("valid config")
    }

    #[test]
    fn ports_are_read_only_when_an_exception_or_an_agent_container_can_need_them() {
        // The built-in default: the task namespaces come after the bridges.
        assert!(!needs_ports(&Config::builtin_default()));
        let agent_first = "[[workload]]\nname = \"a\"\ncontainers = [\"ecs-agent\"]\n\
                           [[workload]]\nname = \"b\"\nbridges = [\"docker0\"]\nimds = \"deny\"\n";
        assert!(needs_ports(&cfg(agent_first)));
        let bridge_first = "[[workload]]\nname = \"b\"\nbridges = [\"docker0\"]\nimds = \"deny\"\n\
                            [[workload]]\nname = \"a\"\ncontainers = [\"ecs-agent\"]\n";
        assert!(!needs_ports(&cfg(bridge_first)));
        let relayed =
            format!("[agent]\ncredentials = \"container:ecs-agent:51679\"\n{bridge_first}");
        assert!(needs_ports(&cfg(&relayed)));
        // An agent in a container is found through the Docker API.
        let only_bridges = "[agent]\ncredentials = \"container:ecs-agent:51679\"\n\
                            [[workload]]\nname = \"b\"\nbridges = [\"docker0\"]\n";
        assert!(needs_docker(&cfg(only_bridges)));
    }
}
