//! Who is calling the proxy: the mark of the connection's SYN → a bridge
//! port or a host workload → a container and a workload (F15: never the
//! source address).
//!
//! * A **bridge mark** is `ruleset::bridge_mark(ifindex)` of the port the
//!   SYN entered from. The host's links (rtnetlink, `sys::rtnl`, in this
//!   process's namespace) are hashed the same way; exactly one port must
//!   match, else the caller is unidentified (refused).
//! * The **containers** behind a port are those whose namespace holds the
//!   port's peer, as the kernel reports it: the port's `link_netnsid` (the
//!   id the host gives the peer's namespace) equals the id the host gives
//!   the container's namespace file (`RTM_GETNSID`). Nothing inside a
//!   container can change either. Containers come from the Docker API;
//!   all containers sharing that namespace (an awsvpc task's pause and
//!   application containers, whose namespace files differ) are one
//!   caller.
//! * A **host mark** (`HOST_MARK_TAG | index`) names the cgroup workload
//!   whose output chain set it. The container is the one whose cgroup (or
//!   a cgroup below it) created the client's socket: the kernel reports
//!   that socket's cgroup id through `sock_diag`, looked up by the
//!   client's own address pair (the proxy passes the pre-DNAT
//!   destination), so each container on the host network owns the ids in
//!   its own environment; a host process in no container owns only its
//!   workload's configured `credentials_ids`.
//! * The **workload** is the first in file order whose selector matches
//!   the port's bridge, the namespace, the containers or their cgroups.
//!
//! Lookups are cached: ports by mark, the containers' namespace ids per
//! container listing, and the whole answer by mark for one config — the
//! one in the proxy's settings, which every call passes (a caller
//! identified once costs a hash lookup per connection); a miss
//! refreshes (bounded: at most one Docker listing per 200 ms). A Docker
//! event makes the next caller wait for one container listing and one
//! `RTM_GETNSID` per container — no process is started.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metaguard_core::config::{NetnsSelector, Selector};
use metaguard_core::ruleset::{
    bridge_mark, ifname_glob_matches, is_host_mark, netns_glob_matches, ContainerFact,
    BRIDGE_MARK_BASE,
};
use metaguard_core::Config;
use metaguard_proxy::{Caller, IdKind, Origin, Owner, Ownership};
use tracing::warn;

/// One host link.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Link {
    ifindex: u32,
    name: String,
    master: Option<String>,
    /// The id the host gives the namespace of its peer (a veth's other
    /// end), when that is another namespace.
    peer_netns: Option<i32>,
}

/// The host's links, with their masters' names.
fn host_links() -> std::io::Result<Vec<Link>> {
    let all = metaguard_sys::rtnl::links()?;
    let names: HashMap<u32, String> = all.iter().map(|l| (l.ifindex, l.name.clone())).collect();
    Ok(all
        .into_iter()
        .map(|l| Link {
            ifindex: l.ifindex,
            master: l.master.and_then(|m| names.get(&m).cloned()),
            name: l.name,
            peer_netns: l.link_netnsid,
        })
        .collect())
}

/// The id the host gives the namespace at `path` (none: unreadable, or no
/// host link has a peer there).
fn netns_id_of(path: &str) -> Option<i32> {
    let file = std::fs::File::open(path).ok()?;
    metaguard_sys::rtnl::netns_id(std::os::fd::AsFd::as_fd(&file))
        .ok()
        .flatten()
}

#[derive(Debug, Default)]
struct Cache {
    /// Bridge mark → the ports with that mark (more than one: ambiguous).
    ports: HashMap<u32, Vec<Link>>,
    containers: Vec<ContainerFact>,
    /// When `containers` was listed; none: containers changed since.
    containers_at: Option<Instant>,
    /// The id the host gives each listed container's namespace file (the
    /// files are only good for the listing they came with: a
    /// `/proc/<pid>/ns/net` names whatever process has that pid now);
    /// none until needed after a listing.
    netns_ids: Option<HashMap<String, Option<i32>>>,
    /// Bridge mark → the caller found from the entries above, under the
    /// config it was found with; cleared whenever any of them changes.
    callers: HashMap<u32, (Arc<Config>, Caller)>,
    /// cgroup id → the container whose cgroup it is or lies under (none:
    /// no container's), built from `containers`; cleared with them.
    cgroup_containers: HashMap<u64, Option<ContainerFact>>,
    /// The namespace files that `netns` selectors name (matched by their
    /// globs, with or without a Docker API): path → the file's inode and
    /// the id the host gives its namespace. A file whose inode changed is
    /// read again.
    netns_files: HashMap<String, (u64, Option<i32>)>,
    /// Every id in the last listing's environments, with its container.
    seen_ids: HashMap<(IdKind, String), String>,
    /// Ids whose container has stopped, oldest first (bounded).
    revoked: HashSet<(IdKind, String)>,
    revoked_order: VecDeque<(IdKind, String)>,
}

/// The most revoked ids remembered: a stopped container's ids stay refused
/// until this many newer ones have been revoked.
const MAX_REVOKED: usize = 65_536;

impl Cache {
    /// The containers changed: forget what was derived from them.
    fn forget_derived(&mut self) {
        self.netns_ids = None;
        self.callers.clear();
        self.cgroup_containers.clear();
    }

    /// A new container listing: what was derived from the old one goes
    /// when it differs, and the ids of containers no longer listed are
    /// revoked.
    fn take_listing(&mut self, list: Vec<ContainerFact>) {
        let mut seen = HashMap::new();
        for k in &list {
            let (creds, tmds) = ids(&[k]);
            for (kind, ids) in [(IdKind::Credentials, creds), (IdKind::TaskMetadata, tmds)] {
                for id in ids {
                    seen.insert((kind, id), k.id.clone());
                }
            }
        }
        let gone: Vec<(IdKind, String)> = self
            .seen_ids
            .keys()
            .filter(|key| !seen.contains_key(*key))
            .cloned()
            .collect();
        for key in gone {
            if self.revoked.insert(key.clone()) {
                self.revoked_order.push_back(key);
            }
        }
        while self.revoked_order.len() > MAX_REVOKED {
            if let Some(old) = self.revoked_order.pop_front() {
                self.revoked.remove(&old);
            }
        }
        // An id listed again (a restarted container keeps its
        // environment) is its owner's again.
        for key in seen.keys() {
            if self.revoked.remove(key) {
                self.revoked_order.retain(|k| k != key);
            }
        }
        self.seen_ids = seen;
        if list != self.containers {
            self.containers = list;
            self.forget_derived();
        }
        self.containers_at = Some(Instant::now());
    }
}

/// The daemon's view, shared with the proxy threads.
#[derive(Debug)]
pub struct Directory {
    docker_socket: PathBuf,
    cache: Mutex<Cache>,
}

impl Directory {
    pub fn new(docker_socket: PathBuf) -> Directory {
        Directory {
            docker_socket,
            cache: Mutex::new(Cache::default()),
        }
    }

    /// Containers started or stopped: they are listed again before the
    /// next caller is answered (one Docker API call and one namespace id
    /// per container; no namespace is scanned).
    pub fn containers_changed(&self) {
        let mut c = self.lock();
        c.containers_at = None;
        c.forget_derived();
    }

    /// The daemon's own fresh listing (it lists containers on every Docker
    /// event to re-plan): taken as if this directory had listed them, so
    /// the ids of a container that stopped are revoked at once, before the
    /// next request.
    pub fn containers_listed(&self, list: Vec<ContainerFact>) {
        self.lock().take_listing(list);
    }

    /// Namespace files appeared or went (a `netns` selector's directory
    /// changed): callers found through them are identified again.
    pub fn namespaces_changed(&self) {
        let mut c = self.lock();
        c.netns_files.clear();
        c.callers.clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cache; without `may_block`, none while another thread holds it
    /// (it is refreshing: let the blocking path wait).
    fn cache(&self, may_block: bool) -> Option<std::sync::MutexGuard<'_, Cache>> {
        if may_block {
            Some(self.lock())
        } else {
            self.cache.try_lock().ok()
        }
    }

    fn refresh_containers(&self, c: &mut Cache) {
        if c.containers_at
            .is_some_and(|t| t.elapsed() < Duration::from_millis(200))
        {
            return;
        }
        match crate::discovery::docker::containers(
            &self.docker_socket,
            std::path::Path::new("/proc"),
        ) {
            // An unchanged listing keeps what was derived from it.
            Ok(list) => c.take_listing(list.unwrap_or_default()),
            Err(e) => {
                warn!(error = %format!("{e:#}"), "proxy: cannot list containers");
                c.containers_at = Some(Instant::now());
            }
        }
    }

    /// The files `config`'s `netns` path selectors name (entries of their
    /// directories that match a glob) whose namespace the host calls `id`.
    /// Found by namespace identity, so a namespace no Docker API lists (a
    /// CNI plugin's, containerd's) is matched as the selector says.
    fn selected_files_in(&self, c: &mut Cache, config: &Config, id: i32) -> Vec<String> {
        let globs: Vec<&str> = config
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
            .collect();
        if globs.is_empty() {
            return Vec::new();
        }
        let mut out = Vec::new();
        for path in crate::enforce::netns_paths(config) {
            if !globs.iter().any(|g| netns_glob_matches(g, &path)) {
                continue;
            }
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            let ino = std::os::unix::fs::MetadataExt::ino(&meta);
            let known = c
                .netns_files
                .get(&path)
                .filter(|(i, _)| *i == ino)
                .map(|(_, n)| *n);
            let nsid = match known {
                Some(n) => n,
                None => {
                    let n = netns_id_of(&path);
                    c.netns_files.insert(path.clone(), (ino, n));
                    n
                }
            };
            if nsid == Some(id) {
                out.push(path);
            }
        }
        out
    }

    fn port(&self, c: &mut Cache, mark: u32) -> Result<Link, String> {
        if !c.ports.contains_key(&mark) {
            c.ports.clear();
            c.callers.clear();
            match host_links() {
                Ok(ls) => {
                    for l in ls.into_iter().filter(|l| l.master.is_some()) {
                        c.ports.entry(bridge_mark(l.ifindex)).or_default().push(l);
                    }
                }
                Err(e) => return Err(format!("cannot list links: {e}")),
            }
        }
        match c.ports.get(&mark).map(Vec::as_slice) {
            Some([one]) => Ok(one.clone()),
            Some([]) | None => Err(format!("no bridge port has mark 0x{mark:08x}")),
            Some(many) => Err(format!(
                "mark 0x{mark:08x} is ambiguous ({} ports)",
                many.len()
            )),
        }
    }

    /// The listed containers' namespace ids, computed once per listing.
    fn netns_ids<'c>(&self, c: &'c mut Cache) -> &'c HashMap<String, Option<i32>> {
        let containers = &c.containers;
        c.netns_ids.get_or_insert_with(|| {
            containers
                .iter()
                .filter(|k| !k.host_network)
                .filter_map(|k| k.netns.clone())
                .map(|p| {
                    let id = netns_id_of(&p);
                    (p, id)
                })
                .collect()
        })
    }

    /// The namespace files (sorted) of the listed containers whose
    /// namespace holds the peer of host port `port`: one namespace, whose
    /// containers' files may differ.
    fn netns_of_port(&self, c: &mut Cache, config: &Config, port: &Link) -> Vec<String> {
        let Some(peer) = port.peer_netns else {
            return Vec::new();
        };
        let mut paths = self.paths_in_netns(c, peer);
        paths.extend(self.selected_files_in(c, config, peer));
        paths.sort();
        paths.dedup();
        paths
    }

    /// The namespace files (sorted) of the listed containers whose
    /// namespace has id `id`.
    fn paths_in_netns(&self, c: &mut Cache, id: i32) -> Vec<String> {
        let mut paths: Vec<String> = self
            .netns_ids(c)
            .iter()
            .filter(|(_, i)| **i == Some(id))
            .map(|(p, _)| p.clone())
            .collect();
        paths.sort();
        paths
    }

    /// `identify`; with `may_block` false, `None` whenever answering would
    /// read the host (list links or containers) or wait for the cache.
    fn identify_with(
        &self,
        config: &Arc<Config>,
        origin: Origin,
        may_block: bool,
    ) -> Option<Caller> {
        let Origin { mark, peer, .. } = origin;
        if is_host_mark(mark) {
            return self.identify_host(config, origin, may_block);
        }
        if mark & BRIDGE_MARK_BASE == 0 {
            return Some(Caller {
                origin: format!("no metaguard mark (0x{mark:08x}) from {peer}"),
                ..Caller::default()
            });
        }
        let mut c = self.cache(may_block)?;
        if let Some((seen, caller)) = c.callers.get(&mark) {
            if Arc::ptr_eq(seen, config) {
                return Some(caller.clone());
            }
        }
        if !may_block && !c.ports.contains_key(&mark) {
            return None;
        }
        let port = match self.port(&mut c, mark) {
            Ok(p) => p,
            Err(why) => {
                return Some(Caller {
                    origin: format!("{why} (from {peer})"),
                    ..Caller::default()
                })
            }
        };
        // Containers changed since they were listed: list them again (a
        // Docker API call) and read their namespace ids before answering.
        if !may_block && (c.containers_at.is_none() || c.netns_ids.is_none()) {
            return None;
        }
        if c.containers_at.is_none() {
            self.refresh_containers(&mut c);
        }
        let mut netns = self.netns_of_port(&mut c, config, &port);
        if netns.is_empty() {
            // Perhaps a container that has just started: list again
            // (bounded) before answering that nobody is behind the port.
            if !may_block {
                return None;
            }
            self.refresh_containers(&mut c);
            // Also when the listing is unchanged: a namespace id read
            // before the container's veth existed (CNI plugins add it after
            // the container started) was none. Once per mark: the answer
            // is remembered below.
            c.netns_ids = None;
            netns = self.netns_of_port(&mut c, config, &port);
        }
        let group: Vec<&ContainerFact> = c
            .containers
            .iter()
            .filter(|k| k.netns.as_ref().is_some_and(|p| netns.contains(p)))
            .collect();
        let workload = Self::workload_for(config, port.master.as_deref(), &group, &netns);
        let (credentials_ids, tmds_ids) = ids(&group);
        // The caller's own container: the first that is not a task's pause
        // container, else the pause container.
        let own_container = group
            .iter()
            .find(|k| !k.is_ecs_pause())
            .or(group.first())
            .map(|k| k.id.clone());
        let caller = Caller {
            workload,
            container: own_container,
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
        };
        c.callers.insert(mark, (config.clone(), caller.clone()));
        Some(caller)
    }

    /// A host process (host mark): its workload from the mark, its
    /// container from the cgroup that created its socket.
    fn identify_host(&self, config: &Config, o: Origin, may_block: bool) -> Option<Caller> {
        let mark = o.mark;
        let idx = (mark & 0xffff) as usize;
        let Some(w) = config
            .workloads
            .get(idx)
            .filter(|w| matches!(w.selector, Selector::Cgroups(_) | Selector::Containers(_)))
        else {
            return Some(Caller {
                origin: format!("host mark 0x{mark:08x} names no cgroup workload"),
                ..Caller::default()
            });
        };
        let container = match o.dst {
            Some(dst) => self.host_container(o.peer, dst, may_block)?,
            None => None,
        };
        let (credentials_ids, tmds_ids) = container.as_ref().map(|k| ids(&[k])).unwrap_or_default();
        Some(Caller {
            workload: Some(idx),
            origin: format!(
                "host process of workload {:?} (mark 0x{mark:08x}{}) from {}",
                w.name,
                container
                    .as_ref()
                    .map(|k| format!(", container {}", k.name))
                    .unwrap_or_default(),
                o.peer
            ),
            container: container.map(|k| k.id),
            credentials_ids,
            tmds_ids,
        })
    }

    /// The container whose cgroup created the host socket `local` →
    /// `remote`: `Some(None)` when it is no container's (or is gone),
    /// `None` when answering needs the host and `may_block` is false.
    fn host_container(
        &self,
        local: SocketAddr,
        remote: SocketAddr,
        may_block: bool,
    ) -> Option<Option<ContainerFact>> {
        let id = match metaguard_sys::sockdiag::tcp_socket_cgroup(local, remote) {
            Ok(Some(id)) => id,
            Ok(None) => return Some(None),
            Err(e) => {
                warn!(error = %e, %local, "proxy: cannot look up a host caller's socket");
                return Some(None);
            }
        };
        let mut c = self.cache(may_block)?;
        if let Some(hit) = c.cgroup_containers.get(&id) {
            return Some(hit.clone());
        }
        if !may_block {
            return None;
        }
        // A new container, or a new cgroup below a known one's: list the
        // containers again (bounded) and re-read their cgroup trees. What
        // is still unknown is remembered as no container's until the
        // containers change.
        self.refresh_containers(&mut c);
        let mut index = cgroup_index(&c.containers);
        let hit = index.entry(id).or_insert(None).clone();
        c.cgroup_containers = index;
        Some(hit)
    }

    /// The first workload matching a bridge and/or a group of containers.
    fn workload_for(
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
}

/// Every cgroup id at or below a container's cgroup (a container's
/// processes may sit in sub-cgroups), mapped to that container; bounded
/// walk. Empty when there is no cgroup v2 hierarchy.
fn cgroup_index(containers: &[ContainerFact]) -> HashMap<u64, Option<ContainerFact>> {
    const MAX_DIRS: usize = 4096;
    let mut out = HashMap::new();
    let Ok(cg) =
        metaguard_sys::cgroup::Cgroup2::discover(std::path::Path::new("/proc/self/mountinfo"))
    else {
        return out;
    };
    // Deepest cgroups first: a container whose cgroup lies inside
    // another's (`--cgroup-parent`) owns its own subtree.
    let mut by_depth: Vec<&ContainerFact> = containers.iter().collect();
    by_depth.sort_by_key(|k| std::cmp::Reverse(k.cgroup.as_deref().map_or(0, str::len)));
    for k in by_depth {
        let Some(rel) = &k.cgroup else { continue };
        let mut stack = vec![cg.path(rel)];
        let mut seen = 0;
        while let Some(dir) = stack.pop() {
            seen += 1;
            if seen > MAX_DIRS {
                break;
            }
            let Ok(meta) = std::fs::metadata(&dir) else {
                continue;
            };
            out.entry(std::os::unix::fs::MetadataExt::ino(&meta))
                .or_insert_with(|| Some(k.clone()));
            if let Ok(rd) = std::fs::read_dir(&dir) {
                stack.extend(
                    rd.flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
        }
    }
    out
}

/// The ids a container's environment names.
fn ids(group: &[&ContainerFact]) -> (Vec<String>, Vec<String>) {
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

impl metaguard_proxy::Directory for Directory {
    fn identify(&self, config: &Arc<Config>, origin: Origin) -> Caller {
        // With `may_block`, identify_with always answers.
        self.identify_with(config, origin, true)
            .unwrap_or_else(|| Caller::identification_failed(origin.mark))
    }

    fn identify_cached(&self, config: &Arc<Config>, origin: Origin) -> Option<Caller> {
        self.identify_with(config, origin, false)
    }

    fn owner(&self, config: &Config, kind: IdKind, id: &str) -> Ownership {
        if kind == IdKind::Credentials {
            if let Some(i) = config
                .workloads
                .iter()
                .position(|w| w.credentials_ids.iter().any(|x| x == id))
            {
                return Ownership::Owned(Owner {
                    workload: Some(i),
                    container: None,
                    uncertain: false,
                });
            }
        }
        let mut c = self.lock();
        self.refresh_containers(&mut c);
        let held = |k: &ContainerFact| {
            let (creds, tmds) = ids(&[k]);
            match kind {
                IdKind::Credentials => creds.iter().any(|x| x == id),
                IdKind::TaskMetadata => tmds.iter().any(|x| x == id),
            }
        };
        let Some(owner) = c.containers.iter().find(|k| held(k)).cloned() else {
            return if c.revoked.contains(&(kind, id.to_string())) {
                Ownership::Revoked
            } else {
                Ownership::Unknown
            };
        };
        // The bridge the owner hangs off (the master of the host port whose
        // peer is in the owner's namespace), and everyone in that namespace.
        // Host links first: listing them gives the peers' namespaces ids.
        // Not knowing is not an answer: the owner is then treated as
        // proxied (the request refused).
        let host = match host_links() {
            Ok(h) => h,
            Err(e) => {
                warn!(error = %e, "proxy: cannot list links to place an id's owner");
                return Ownership::Owned(Owner {
                    workload: None,
                    container: Some(owner.id.clone()),
                    uncertain: true,
                });
            }
        };
        let owner_ns = owner
            .netns
            .as_ref()
            .and_then(|p| self.netns_ids(&mut c).get(p).copied().flatten());
        let master = owner_ns.and_then(|id| {
            host.iter()
                .find(|l| l.master.is_some() && l.peer_netns == Some(id))?
                .master
                .clone()
        });
        let mut netns: Vec<String> = owner.netns.iter().cloned().collect();
        if let Some(id) = owner_ns {
            netns.extend(self.paths_in_netns(&mut c, id));
        }
        netns.sort();
        netns.dedup();
        // The namespace as its callers are found: `netns` selectors by
        // namespace identity too.
        let selected = owner_ns
            .map(|id| self.selected_files_in(&mut c, config, id))
            .unwrap_or_default();
        let group: Vec<&ContainerFact> = c
            .containers
            .iter()
            .filter(|k| !k.host_network && k.netns.as_ref().is_some_and(|p| netns.contains(p)))
            .collect();
        let group = if group.is_empty() {
            vec![&owner]
        } else {
            group
        };
        netns.extend(selected);
        netns.sort();
        netns.dedup();
        Ownership::Owned(Owner {
            workload: Self::workload_for(config, master.as_deref(), &group, &netns),
            container: Some(owner.id.clone()),
            uncertain: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metaguard_proxy::Directory as _;

    const NETNS: &str = "/run/netns/task-a";

    fn config(workloads: &str) -> Arc<Config> {
        Arc::new(Config::parse(workloads, "test.toml").expect("valid config"))
    }

    fn container(id: &str, credentials_id: &str) -> ContainerFact {
        container_in(id, credentials_id, NETNS)
    }

    fn container_in(id: &str, credentials_id: &str, netns: &str) -> ContainerFact {
        ContainerFact {
            id: id.to_string(),
            name: id.to_string(),
            labels: Default::default(),
            host_network: false,
            cgroup: None,
            netns: Some(netns.to_string()),
            env: vec![format!(
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=/v2/credentials/{credentials_id}"
            )],
        }
    }

    /// A directory whose cache already knows port 7 on docker0 and the
    /// namespace and containers behind it (no host lookups).
    fn directory(containers: Vec<ContainerFact>) -> (Directory, u32) {
        let d = Directory::new(PathBuf::from("/nonexistent/docker.sock"));
        let mark = bridge_mark(7);
        d.learn(mark, containers);
        (d, mark)
    }

    impl Directory {
        fn learn(&self, mark: u32, containers: Vec<ContainerFact>) {
            let mut c = self.lock();
            c.ports.insert(
                mark,
                vec![Link {
                    ifindex: 7,
                    name: "veth7".to_string(),
                    master: Some("docker0".to_string()),
                    peer_netns: Some(3),
                }],
            );
            drop(c);
            self.list_containers(containers);
        }

        /// What a Docker listing and reading the namespace ids would do:
        /// every namespace file is namespace 3 (port 7's peer's), except
        /// those under `/other/`, which are namespace 4.
        fn list_containers(&self, containers: Vec<ContainerFact>) {
            let mut c = self.lock();
            c.netns_ids = Some(
                containers
                    .iter()
                    .filter_map(|k| k.netns.clone())
                    .map(|p| {
                        let id = if p.starts_with("/other/") { 4 } else { 3 };
                        (p, Some(id))
                    })
                    .collect(),
            );
            c.containers = containers;
            c.containers_at = Some(Instant::now());
        }
    }

    const PEER: &str = "172.17.0.2:40000";

    #[test]
    fn a_stopped_containers_ids_are_revoked_and_a_restarted_one_gets_them_back() {
        let d = Directory::new(PathBuf::from("/nonexistent/docker.sock"));
        let mut tmds = container("c1", "c1-creds");
        tmds.env
            .push("ECS_CONTAINER_METADATA_URI_V4=http://169.254.170.2/v4/c1-tmds".into());
        d.containers_listed(vec![tmds.clone(), container("c2", "c2-creds")]);
        let cfg = config(
            "[[workload]]\nname = \"b\"\nbridges = [\"docker0\"]\ntask_metadata = \"proxy\"\n",
        );
        let revoked = |kind, id: &str| {
            let c = d.lock();
            c.revoked.contains(&(kind, id.to_string()))
        };
        assert!(!revoked(IdKind::Credentials, "c1-creds"));
        // c1 stops.
        d.containers_listed(vec![container("c2", "c2-creds")]);
        assert!(revoked(IdKind::Credentials, "c1-creds"));
        assert!(revoked(IdKind::TaskMetadata, "c1-tmds"));
        assert!(!revoked(IdKind::Credentials, "c2-creds"));
        // Nobody is asked again within 200 ms of a listing: the answer is
        // the revoked set's.
        assert_eq!(
            d.owner(&cfg, IdKind::Credentials, "c1-creds"),
            Ownership::Revoked
        );
        assert_eq!(
            d.owner(&cfg, IdKind::Credentials, "never-seen"),
            Ownership::Unknown
        );
        // Restarted with the same environment: its ids are its own again.
        d.containers_listed(vec![tmds, container("c2", "c2-creds")]);
        assert!(!revoked(IdKind::Credentials, "c1-creds"));
        assert!(!revoked(IdKind::TaskMetadata, "c1-tmds"));
    }

    #[test]
    fn a_remembered_caller_follows_container_and_config_changes() {
        let two = "[[workload]]\nname = \"first\"\nbridges = [\"br-*\"]\nimds = \"proxy\"\n\n\
                   [[workload]]\nname = \"second\"\nbridges = [\"docker0\"]\nimds = \"proxy\"\n";
        let config_two = config(two);
        let (d, mark) = directory(vec![container("c1", "old-id")]);
        let peer: SocketAddr = PEER.parse().expect("a socket address");
        let origin = Origin {
            mark,
            peer,
            dst: None,
        };
        let first = d
            .identify_cached(&config_two, origin)
            .expect("known port, answered inline");
        assert_eq!(first.workload, Some(1));
        assert_eq!(first.credentials_ids, vec!["old-id".to_string()]);
        assert_eq!(
            d.identify_cached(&config_two, origin),
            Some(first.clone()),
            "remembered"
        );

        // Docker says containers changed: the remembered caller is gone
        // and the containers must be listed again (a cache-only lookup
        // cannot answer)...
        d.containers_changed();
        assert_eq!(d.identify_cached(&config_two, origin), None);
        // ...and the next listing is what is answered. Port 7's caller is
        // everyone in its peer's namespace, whatever file names it (an
        // app container joined to a pause container's namespace), and
        // nobody in another namespace.
        d.list_containers(vec![
            container_in("c2", "new-id", "/proc/4242/ns/net"),
            container_in("c3", "joined-id", NETNS),
            container_in("c4", "other-id", "/other/ns"),
        ]);
        let second = d
            .identify_cached(&config_two, origin)
            .expect("answered after the listing");
        assert_eq!(
            second.credentials_ids,
            vec!["joined-id".to_string(), "new-id".to_string()]
        );
        assert!(matches!(second.container.as_deref(), Some("c2" | "c3")));

        // A new config: the same port is matched against its workloads.
        let only =
            config("[[workload]]\nname = \"only\"\nbridges = [\"docker*\"]\nimds = \"proxy\"\n");
        let third = d.identify_cached(&only, origin).expect("same port");
        assert_eq!(third.workload, Some(0));
        assert_eq!(third.credentials_ids, second.credentials_ids);
    }

    #[test]
    fn credentials_ids_come_from_relative_and_full_uris_on_task_metadata_addresses() {
        let mut c = container("c1", "rel-id");
        c.env.extend([
            "AWS_CONTAINER_CREDENTIALS_FULL_URI=http://169.254.170.2/v2/credentials/full-id".into(),
            "ECS_CONTAINER_METADATA_URI_V4=http://169.254.170.2/v4/tmds-id".into(),
        ]);
        let mut v6 = container("c2", "");
        v6.env = vec![
            "AWS_CONTAINER_CREDENTIALS_FULL_URI=http://[fd00:ec2::23]:80/v1/credentials?x=1&id=v6-id"
                .into(),
        ];
        let mut elsewhere = container("c3", "");
        elsewhere.env = vec![
            "AWS_CONTAINER_CREDENTIALS_FULL_URI=http://127.0.0.1:8080/v2/credentials/loopback-id"
                .into(),
        ];
        let mut eks = container("c4", "");
        eks.env =
            vec!["AWS_CONTAINER_CREDENTIALS_FULL_URI=http://169.254.170.23/v1/credentials".into()];
        let (creds, tmds) = ids(&[&c, &v6, &elsewhere, &eks]);
        assert_eq!(creds, vec!["full-id", "rel-id", "v6-id"]);
        assert_eq!(tmds, vec!["tmds-id"]);
        for bad in [
            "",
            "http://",
            "http://[fd00:ec2::23/v2/credentials/x",
            "ftp://169.254.170.2/v2/credentials/x",
            "http://169.254.170.2",
            "http://169.254.170.2/v2/credentials/",
            "http://169.254.170.2/v1/credentials?id=",
        ] {
            assert_eq!(full_uri_path(bad).and_then(credentials_id), None, "{bad}");
        }
    }
}
