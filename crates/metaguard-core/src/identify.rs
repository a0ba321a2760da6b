//! Who is calling the proxy, decided without I/O: the mark of the
//! connection's SYN → a bridge port or a host workload → the containers
//! behind it → a workload (F15: never the source address). The daemon's
//! directory (`metaguard::daemon::identity`) gathers a [`Snapshot`] of the
//! host — links, containers, namespace ids, cgroup ids — and caches it;
//! everything it concludes from it is here.
//!
//! * A **bridge mark** is `ruleset::bridge_mark(ifindex)` of the port the
//!   SYN entered from; exactly one port must have it, else the caller is
//!   unidentified (refused).
//! * The **containers** behind a port are those whose namespace holds the
//!   port's peer, as the kernel reports it: the port's peer namespace id
//!   equals the id the host gives the container's namespace file. All
//!   containers sharing that namespace (an awsvpc task's pause and
//!   application containers, whose namespace files differ) are one caller.
//!   A namespace file that now names another namespace (a
//!   `/proc/<pid>/ns/net` whose pid was reused) is matched by what it names
//!   now, never by the listing's word.
//! * A **host mark** (`HOST_MARK_TAG | index`) names the cgroup workload
//!   whose output chain set it; its container is the one whose cgroup (or
//!   a cgroup below it) created the client's socket.
//! * The **workload** is the first in file order whose selector matches
//!   the port's bridge, the namespace, the containers or their cgroups.

use std::collections::HashMap;

use crate::config::{NetnsSelector, Selector};
use crate::proxy_decision::{Caller, IdKind, Origin, Owner};
use crate::ruleset::{
    ifname_glob_matches, is_host_mark, netns_glob_matches, ContainerFact, BRIDGE_MARK_BASE,
};
use crate::Config;

/// One host link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub ifindex: u32,
    pub name: String,
    /// Its master's (bridge's) name.
    pub master: Option<String>,
    /// The id the host gives the namespace of its peer (a veth's other
    /// end), when that is another namespace.
    pub peer_netns: Option<i32>,
}

/// What the host looked like when the directory last read it.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot<'a> {
    /// Bridge mark → the bridge ports (links with a master) with that mark.
    pub ports: &'a HashMap<u32, Vec<Link>>,
    /// The running containers (Docker API).
    pub containers: &'a [ContainerFact],
    /// Each listed container's namespace file → the id the host gives the
    /// namespace it names now (none: unreadable or gone).
    pub netns_ids: &'a HashMap<String, Option<i32>>,
    /// The namespace files that `netns` path selectors name (existing
    /// entries matching a glob) → the id the host gives their namespace.
    pub selected: &'a [(String, Option<i32>)],
    /// cgroup id → the container whose cgroup it is or lies under (none:
    /// no container's).
    pub cgroups: &'a HashMap<u64, Option<ContainerFact>>,
}

/// What a connection's mark says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// A host workload's output chain: the workload's index.
    Host(usize),
    /// A bridge port's hash.
    Bridge(u32),
    /// No metaguard mark.
    None,
}

impl Mark {
    pub fn of(mark: u32) -> Mark {
        if is_host_mark(mark) {
            Mark::Host((mark & 0xffff) as usize)
        } else if mark & BRIDGE_MARK_BASE != 0 {
            Mark::Bridge(mark)
        } else {
            Mark::None
        }
    }
}

/// The caller of a connection from `origin`. `socket_cgroup` is the cgroup
/// id of a host caller's socket (`sock_diag`), if known.
pub fn identify(
    config: &Config,
    snap: &Snapshot<'_>,
    origin: Origin,
    socket_cgroup: Option<u64>,
) -> Caller {
    let Origin { mark, peer, .. } = origin;
    match Mark::of(mark) {
        Mark::None => Caller {
            origin: format!("no metaguard mark (0x{mark:08x}) from {peer}"),
            ..Caller::default()
        },
        Mark::Host(idx) => {
            let container = socket_cgroup
                .and_then(|id| snap.cgroups.get(&id))
                .and_then(Option::as_ref);
            host_caller(config, origin, idx, container)
        }
        Mark::Bridge(_) => match port(snap.ports, mark) {
            Ok(port) => bridge_caller(config, snap, port, &netns_of_port(snap, port)),
            Err(why) => Caller {
                origin: format!("{why} (from {peer})"),
                ..Caller::default()
            },
        },
    }
}

/// Whether host mark `idx` names a workload whose callers are host
/// processes (a `cgroups` or `containers` workload).
pub fn host_workload(config: &Config, idx: usize) -> bool {
    config
        .workloads
        .get(idx)
        .is_some_and(|w| matches!(w.selector, Selector::Cgroups(_) | Selector::Containers(_)))
}

/// A host process (host mark `idx`): its workload from the mark, its
/// container from the cgroup that created its socket.
pub fn host_caller(
    config: &Config,
    o: Origin,
    idx: usize,
    container: Option<&ContainerFact>,
) -> Caller {
    let mark = o.mark;
    let Some(w) = config
        .workloads
        .get(idx)
        .filter(|_| host_workload(config, idx))
    else {
        return Caller {
            origin: format!("host mark 0x{mark:08x} names no cgroup workload"),
            ..Caller::default()
        };
    };
    let (credentials_ids, tmds_ids) = container.map(|k| ids(&[k])).unwrap_or_default();
    Caller {
        workload: Some(idx),
        origin: format!(
            "host process of workload {:?} (mark 0x{mark:08x}{}) from {}",
            w.name,
            container
                .map(|k| format!(", container {}", k.name))
                .unwrap_or_default(),
            o.peer
        ),
        container: container.map(|k| k.id.clone()),
        port: None,
        credentials_ids,
        tmds_ids,
    }
}

/// The one port with bridge mark `mark`.
pub fn port(ports: &HashMap<u32, Vec<Link>>, mark: u32) -> Result<&Link, String> {
    match ports.get(&mark).map(Vec::as_slice) {
        Some([one]) => Ok(one),
        Some([]) | None => Err(format!("no bridge port has mark 0x{mark:08x}")),
        Some(many) => Err(format!(
            "mark 0x{mark:08x} is ambiguous ({} ports)",
            many.len()
        )),
    }
}

/// The namespace files (sorted) whose namespace has id `id`: listed
/// containers' and those `netns` selectors name.
pub fn files_in_netns(snap: &Snapshot<'_>, id: i32) -> Vec<String> {
    let mut paths: Vec<String> = snap
        .netns_ids
        .iter()
        .chain(snap.selected.iter().map(|(p, i)| (p, i)))
        .filter(|(_, i)| **i == Some(id))
        .map(|(p, _)| p.clone())
        .collect();
    paths.sort();
    paths.dedup();
    paths
}

/// The namespace files (sorted) of the namespace that holds the peer of
/// `port`: one namespace, whose containers' files may differ.
pub fn netns_of_port(snap: &Snapshot<'_>, port: &Link) -> Vec<String> {
    port.peer_netns
        .map(|peer| files_in_netns(snap, peer))
        .unwrap_or_default()
}

/// The caller behind bridge port `port`, whose namespace's files are
/// `netns`.
pub fn bridge_caller(
    config: &Config,
    snap: &Snapshot<'_>,
    port: &Link,
    netns: &[String],
) -> Caller {
    let group: Vec<&ContainerFact> = snap
        .containers
        .iter()
        .filter(|k| k.netns.as_ref().is_some_and(|p| netns.contains(p)))
        .collect();
    let workload = workload_for(config, port.master.as_deref(), &group, netns);
    let (credentials_ids, tmds_ids) = ids(&group);
    // The caller's own container: the first that is not a task's pause
    // container, else the pause container.
    let own_container = group
        .iter()
        .find(|k| !k.is_ecs_pause())
        .or(group.first())
        .map(|k| k.id.clone());
    Caller {
        workload,
        container: own_container,
        port: Some(port.ifindex),
        credentials_ids,
        tmds_ids,
        origin: format!(
            "port {} on {}{}",
            port.name,
            port.master.as_deref().unwrap_or("?"),
            netns
                .first()
                .map(|n| format!(", netns {n}"))
                .unwrap_or_default()
        ),
    }
}

/// The first workload matching a bridge and/or a group of containers in
/// one namespace (whose files are `netns`).
pub fn workload_for(
    config: &Config,
    master: Option<&str>,
    group: &[&ContainerFact],
    netns: &[String],
) -> Option<usize> {
    config.workloads.iter().position(|w| match &w.selector {
        Selector::Bridges(globs) => {
            master.is_some_and(|m| globs.iter().any(|g| ifname_glob_matches(g, m)))
        }
        Selector::Netns(sels) => sels.iter().any(|s| match s {
            NetnsSelector::EcsTasks => group.iter().any(|c| c.is_ecs_pause()),
            NetnsSelector::Path(g) => netns.iter().any(|p| netns_glob_matches(g, p)),
        }),
        Selector::Containers(refs) => group.iter().any(|c| refs.iter().any(|r| c.matches(r))),
        Selector::Cgroups(paths) => group.iter().any(|c| {
            c.cgroup.as_deref().is_some_and(|cg| {
                paths
                    .iter()
                    .any(|p| cg == p || cg.starts_with(&format!("{p}/")))
            })
        }),
    })
}

/// The `netns` path selectors' globs of `config`.
pub fn netns_globs(config: &Config) -> Vec<&str> {
    config
        .workloads
        .iter()
        .filter_map(|w| match &w.selector {
            Selector::Netns(sels) => Some(sels),
            _ => None,
        })
        .flatten()
        .filter_map(|s| match s {
            NetnsSelector::Path(g) => Some(g.as_str()),
            NetnsSelector::EcsTasks => None,
        })
        .collect()
}

/// The workload whose `credentials_ids` list credentials id `id`.
pub fn listed_owner(config: &Config, kind: IdKind, id: &str) -> Option<usize> {
    if kind != IdKind::Credentials {
        return None;
    }
    config
        .workloads
        .iter()
        .position(|w| w.credentials_ids.iter().any(|x| x == id))
}

/// The listed container whose environment holds id `id`.
pub fn holder<'a>(
    containers: &'a [ContainerFact],
    kind: IdKind,
    id: &str,
) -> Option<&'a ContainerFact> {
    containers.iter().find(|k| {
        let (creds, tmds) = ids(&[k]);
        match kind {
            IdKind::Credentials => creds.iter().any(|x| x == id),
            IdKind::TaskMetadata => tmds.iter().any(|x| x == id),
        }
    })
}

/// Where container `owner` is, as its callers are found: the bridge its
/// namespace hangs off (the master of the host link whose peer is in it;
/// `links` are all the host's links), everyone in that namespace, and the
/// first workload matching them.
pub fn place(config: &Config, snap: &Snapshot<'_>, links: &[Link], owner: &ContainerFact) -> Owner {
    let owner_ns = owner
        .netns
        .as_ref()
        .and_then(|p| snap.netns_ids.get(p).copied().flatten());
    let master = owner_ns.and_then(|id| {
        links
            .iter()
            .find(|l| l.master.is_some() && l.peer_netns == Some(id))?
            .master
            .clone()
    });
    let mut netns: Vec<String> = owner.netns.iter().cloned().collect();
    if let Some(id) = owner_ns {
        netns.extend(files_in_netns(snap, id));
    }
    netns.sort();
    netns.dedup();
    let group: Vec<&ContainerFact> = snap
        .containers
        .iter()
        .filter(|k| !k.host_network && k.netns.as_ref().is_some_and(|p| netns.contains(p)))
        .collect();
    let group = if group.is_empty() { vec![owner] } else { group };
    Owner {
        workload: workload_for(config, master.as_deref(), &group, &netns),
        container: Some(owner.id.clone()),
        uncertain: false,
    }
}

/// The ids a group of containers' environments name: credentials ids and
/// task-metadata endpoint ids, each sorted and without duplicates.
pub fn ids(group: &[&ContainerFact]) -> (Vec<String>, Vec<String>) {
    let mut creds = Vec::new();
    let mut tmds = Vec::new();
    for c in group {
        if let Some(uri) = c.env_var("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") {
            creds.extend(credentials_id(uri));
        }
        if let Some(uri) = c.env_var("AWS_CONTAINER_CREDENTIALS_FULL_URI") {
            creds.extend(full_uri_path(uri).and_then(credentials_id));
        }
        for key in [
            "ECS_CONTAINER_METADATA_URI",
            "ECS_CONTAINER_METADATA_URI_V4",
        ] {
            if let Some(uri) = c.env_var(key) {
                if let Some(id) = uri.trim_end_matches('/').rsplit('/').next() {
                    tmds.push(id.to_string());
                }
            }
        }
    }
    creds.sort();
    creds.dedup();
    tmds.sort();
    tmds.dedup();
    (creds, tmds)
}

/// The credentials id a task-metadata credentials path names:
/// `/v2/credentials/<id>` (ECS) or `/v1/credentials?id=<id>`; `None` for
/// anything else, such as EKS Pod Identity's id-less `/v1/credentials`.
fn credentials_id(path_and_query: &str) -> Option<String> {
    let (path, query) = path_and_query
        .split_once('?')
        .unwrap_or((path_and_query, ""));
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let id = match segs.as_slice() {
        ["v2", "credentials", id] => (*id).to_string(),
        ["v1", "credentials"] => query
            .split('&')
            .find_map(|kv| kv.strip_prefix("id="))?
            .to_string(),
        _ => return None,
    };
    (!id.is_empty()).then_some(id)
}

/// The path and query of an `AWS_CONTAINER_CREDENTIALS_FULL_URI` whose host
/// is a task-metadata address (`169.254.170.2`, `169.254.170.23`,
/// `[fd00:ec2::23]`); a full URI elsewhere (a sidecar on loopback, Greengrass)
/// never reaches the proxy, so its path says nothing about ownership here.
fn full_uri_path(uri: &str) -> Option<&str> {
    let rest = uri
        .strip_prefix("http://")
        .or_else(|| uri.strip_prefix("https://"))?;
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split_once(']')?.0,
        None => authority.split(':').next()?,
    };
    let tmds: std::net::IpAddr = host.parse().ok()?;
    let known = ["169.254.170.2", "169.254.170.23", "fd00:ec2::23"]
        .iter()
        .any(|a| a.parse::<std::net::IpAddr>().is_ok_and(|a| a == tmds));
    known.then_some(path)
}

/// The address the relay sends credentials requests to when the ECS agent
/// runs in a container: the one running container `agent` names (a second
/// one is an error: never guess which gets the callers' ids), its IPv4
/// address (else IPv6) as the Docker API reports it now, on the configured
/// port. By the container's identity, never a remembered address: once the
/// container is gone, nothing is relayed (a container that takes its old
/// address gets nothing).
pub fn agent_address(
    agent: &crate::config::AgentContainer,
    containers: &[ContainerFact],
) -> Result<std::net::SocketAddr, String> {
    let mut matching = containers.iter().filter(|c| c.matches(&agent.container));
    let Some(c) = matching.next() else {
        return Err("the ECS agent's container is not running".into());
    };
    if let Some(other) = matching.next() {
        return Err(format!(
            "the agent container reference matches more than one container ({} and {})",
            c.name, other.name
        ));
    }
    if c.host_network {
        // The agent on the host network serves on the host's loopback.
        return Ok(std::net::SocketAddr::new(
            std::net::Ipv4Addr::LOCALHOST.into(),
            agent.port,
        ));
    }
    c.addresses
        .iter()
        .find(|a| a.is_ipv4())
        .or(c.addresses.first())
        .map(|a| std::net::SocketAddr::new(*a, agent.port))
        .ok_or_else(|| format!("the agent's container {} has no address", c.name))
}

#[cfg(test)]
mod tests;
