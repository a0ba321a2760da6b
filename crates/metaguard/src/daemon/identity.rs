//! The proxy's directory: gathers what identification needs from the host
//! and caches it; the decisions are `core::identify`'s, pure functions of
//! the [`Snapshot`] kept here (mark → port → namespace → containers →
//! workload, F15). Read from the host: links and their peers' namespace
//! ids (`sys::rtnl`), the containers (Docker API) and the id the host gives
//! each one's namespace file (`RTM_GETNSID`), the files `netns` selectors
//! name (read again when an inode changes), and for host callers the
//! cgroup id of the client's socket (`sock_diag`, by the client's own
//! address pair) and the cgroup ids below each container's cgroup (under
//! the injectable `/proc` root's cgroup2 mount).
//!
//! Cached: ports by mark, namespace ids per container listing, and the
//! whole answer by mark for one config (a known caller costs a hash lookup
//! per connection); a miss refreshes, at most one Docker listing per
//! 200 ms. A Docker event makes the next caller wait for one listing and
//! one `RTM_GETNSID` per container. A stopped container's ids are revoked.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use metaguard_core::identify::{self, ids, Link, Mark, Snapshot};
use metaguard_core::ruleset::{bridge_mark, netns_glob_matches, ContainerFact};
use metaguard_core::Config;
use metaguard_proxy::{Caller, IdKind, Origin, Owner, Ownership};
use tracing::warn;

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
    /// Where the relay sends credentials when the agent runs in a
    /// container: published by the daemon once the host rules guard that
    /// container's port (`None`: not yet).
    agent: Option<Result<SocketAddr, String>>,
    /// The Docker events `agent` was planned with.
    agent_events: u64,
}

/// The most revoked ids remembered: a stopped container's ids stay refused
/// until this many newer ones have been revoked.
const MAX_REVOKED: usize = 65_536;

/// How long the relay waits for the daemon to re-plan after a Docker event
/// before it refuses a request for an agent in a container.
const AGENT_REPLAN_WAIT: Duration = Duration::from_secs(1);

impl Cache {
    /// The containers changed: forget what was derived from them.
    fn forget_derived(&mut self) {
        self.netns_ids = None;
        self.callers.clear();
        self.cgroup_containers.clear();
    }

    /// The snapshot of what is cached, with `selected` as the namespace
    /// files of `netns` selectors.
    fn snapshot<'a>(&'a self, selected: &'a [(String, Option<i32>)]) -> Snapshot<'a> {
        Snapshot {
            ports: &self.ports,
            containers: &self.containers,
            netns_ids: self.netns_ids.as_ref().unwrap_or_else(|| {
                static EMPTY: OnceLock<HashMap<String, Option<i32>>> = OnceLock::new();
                EMPTY.get_or_init(HashMap::new)
            }),
            selected,
            cgroups: &self.cgroup_containers,
        }
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
    /// Where `/proc` is (containers' namespace files and cgroups, the
    /// cgroup2 mount).
    proc_root: PathBuf,
    cache: Mutex<Cache>,
    /// Docker events received by the daemon's watcher.
    docker_events: Arc<std::sync::atomic::AtomicU64>,
}

impl Directory {
    pub fn new(docker_socket: PathBuf, proc_root: &Path) -> Directory {
        Directory {
            docker_socket,
            proc_root: proc_root.to_path_buf(),
            cache: Mutex::new(Cache::default()),
            docker_events: Arc::default(),
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

    /// The agent container's address the host rules now guard (or why
    /// there is none): the relay's upstream from now on. The daemon
    /// publishes an error before it changes the rules and the new address
    /// after, so the relay never sends to an address whose port the rules
    /// do not let it reach — nor, after the agent moved, to its old one.
    ///
    /// `events`: the Docker events received (`with_docker_events`) when
    /// the plan's containers were listed. While a later one is not planned
    /// for, the relay sends nothing (a stopped agent's address may already
    /// be someone else's).
    pub fn publish_agent(&self, agent: Result<SocketAddr, String>, events: u64) {
        let mut c = self.lock();
        c.agent = Some(agent);
        c.agent_events = events;
    }

    /// Counts Docker events as the daemon's watcher receives them.
    pub fn with_docker_events(mut self, events: Arc<std::sync::atomic::AtomicU64>) -> Directory {
        self.docker_events = events;
        self
    }

    /// What [`Directory::publish_agent`] last published.
    pub fn published_agent(&self) -> Option<Result<SocketAddr, String>> {
        self.lock().agent.clone()
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
        match crate::discovery::docker::containers(&self.docker_socket, &self.proc_root) {
            // An unchanged listing keeps what was derived from it.
            Ok(list) => c.take_listing(list.unwrap_or_default()),
            Err(e) => {
                warn!(error = %format!("{e:#}"), "proxy: cannot list containers");
                c.containers_at = Some(Instant::now());
            }
        }
    }

    /// The files `config`'s `netns` path selectors name (entries of their
    /// directories that match a glob), with the id the host gives their
    /// namespace. Found by namespace identity, so a namespace no Docker API
    /// lists (a CNI plugin's, containerd's) is matched as the selector says.
    fn selected_files(&self, c: &mut Cache, config: &Config) -> Vec<(String, Option<i32>)> {
        let globs = identify::netns_globs(config);
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
            out.push((path, nsid));
        }
        out
    }

    /// The ports by mark, read again when `mark` is not among them.
    fn ensure_port(&self, c: &mut Cache, mark: u32) -> Result<(), String> {
        if c.ports.contains_key(&mark) {
            return Ok(());
        }
        c.ports.clear();
        c.callers.clear();
        let links = host_links().map_err(|e| format!("cannot list links: {e}"))?;
        for l in links.into_iter().filter(|l| l.master.is_some()) {
            c.ports.entry(bridge_mark(l.ifindex)).or_default().push(l);
        }
        Ok(())
    }

    /// The listed containers' namespace ids, read once per listing.
    fn ensure_netns_ids(c: &mut Cache) {
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
        });
    }

    /// `identify`; with `may_block` false, `None` whenever answering would
    /// read the host (list links or containers) or wait for the cache.
    fn identify_with(
        &self,
        config: &Arc<Config>,
        origin: Origin,
        may_block: bool,
    ) -> Option<Caller> {
        let mark = origin.mark;
        match Mark::of(mark) {
            Mark::None => {
                return Some(identify::identify(
                    config,
                    &Cache::default().snapshot(&[]),
                    origin,
                    None,
                ))
            }
            Mark::Host(idx) => return self.identify_host(config, origin, idx, may_block),
            Mark::Bridge(_) => {}
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
        let port = match self.ensure_port(&mut c, mark) {
            Ok(()) => identify::port(&c.ports, mark).cloned(),
            Err(why) => Err(why),
        };
        let port = match port {
            Ok(p) => p,
            Err(why) => {
                return Some(Caller {
                    origin: format!("{why} (from {})", origin.peer),
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
        Self::ensure_netns_ids(&mut c);
        let mut selected = self.selected_files(&mut c, config);
        if identify::netns_of_port(&c.snapshot(&selected), &port).is_empty() {
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
            Self::ensure_netns_ids(&mut c);
            selected = self.selected_files(&mut c, config);
        }
        let caller = identify::identify(config, &c.snapshot(&selected), origin, None);
        c.callers.insert(mark, (config.clone(), caller.clone()));
        Some(caller)
    }

    /// A host process (host mark `idx`): its container from the cgroup
    /// that created its socket, looked up and answered under one hold of
    /// the cache (a listing in between would forget the cgroup index).
    fn identify_host(
        &self,
        config: &Config,
        o: Origin,
        idx: usize,
        may_block: bool,
    ) -> Option<Caller> {
        let socket_cgroup = match o.dst {
            Some(dst) if identify::host_workload(config, idx) => socket_cgroup(o.peer, dst),
            _ => None,
        };
        let Some(id) = socket_cgroup else {
            return Some(identify::host_caller(config, o, idx, None));
        };
        let mut c = self.cache(may_block)?;
        if !c.cgroup_containers.contains_key(&id) {
            if !may_block {
                return None;
            }
            // A new container, or a new cgroup below a known one's: list
            // the containers again (bounded) and re-read their cgroup
            // trees. What is still unknown is remembered as no container's
            // until the containers change.
            self.refresh_containers(&mut c);
            let mut index = cgroup_index(&self.proc_root, &c.containers);
            index.entry(id).or_insert(None);
            c.cgroup_containers = index;
        }
        Some(identify::identify(config, &c.snapshot(&[]), o, Some(id)))
    }
}

/// The cgroup id of the host socket `local` → `remote` (none: not found,
/// gone, or the lookup failed).
fn socket_cgroup(local: SocketAddr, remote: SocketAddr) -> Option<u64> {
    match metaguard_sys::sockdiag::tcp_socket_cgroup(local, remote) {
        Ok(id) => id,
        Err(e) => {
            warn!(error = %e, %local, "proxy: cannot look up a host caller's socket");
            None
        }
    }
}

/// Every cgroup id at or below a container's cgroup (a container's
/// processes may sit in sub-cgroups), mapped to that container; bounded
/// walk. Empty when there is no cgroup v2 hierarchy.
pub(super) fn cgroup_index(
    proc_root: &Path,
    containers: &[ContainerFact],
) -> HashMap<u64, Option<ContainerFact>> {
    const MAX_DIRS: usize = 4096;
    let mut out = HashMap::new();
    let Ok(cg) = metaguard_sys::cgroup::Cgroup2::discover(&proc_root.join("self/mountinfo")) else {
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

impl metaguard_proxy::Directory for Directory {
    fn agent_upstream(&self, config: &Config) -> Result<SocketAddr, String> {
        if config.agent_container.is_none() {
            return Ok(config.agent_credentials);
        }
        // What the daemon published with the rules in force, never a
        // listing of its own: the rules and the relay agree on the agent.
        // A Docker event not yet planned for (the agent may have stopped,
        // its address be someone else's): wait for the daemon's re-plan,
        // a second at most, rather than refuse at once (called on a
        // blocking thread).
        let deadline = Instant::now() + AGENT_REPLAN_WAIT;
        loop {
            let c = self.lock();
            if self.docker_events.load(std::sync::atomic::Ordering::SeqCst) <= c.agent_events {
                return c.agent.clone().unwrap_or_else(|| {
                    Err("the daemon has not found the agent's container yet".into())
                });
            }
            drop(c);
            if Instant::now() > deadline {
                return Err(
                    "a container started or stopped and the daemon has not re-planned yet".into(),
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn identify(&self, config: &Arc<Config>, origin: Origin) -> Caller {
        // With `may_block`, identify_with always answers.
        self.identify_with(config, origin, true)
            .unwrap_or_else(|| Caller::identification_failed(origin.mark))
    }

    fn identify_cached(&self, config: &Arc<Config>, origin: Origin) -> Option<Caller> {
        self.identify_with(config, origin, false)
    }

    fn container_info(&self, id: &str) -> Option<metaguard_core::observe::ContainerInfo> {
        // From the last listing, without waiting for one in progress.
        let c = self.cache(false)?;
        let f = c.containers.iter().find(|f| f.id == id)?;
        Some(
            metaguard_core::observe::ContainerInfo::new(&f.id, &f.name, &f.labels)
                .with_image(&f.image),
        )
    }

    fn owner(&self, config: &Config, kind: IdKind, id: &str) -> Ownership {
        if let Some(i) = identify::listed_owner(config, kind, id) {
            return Ownership::Owned(Owner {
                workload: Some(i),
                container: None,
                uncertain: false,
            });
        }
        let mut c = self.lock();
        self.refresh_containers(&mut c);
        let Some(owner) = identify::holder(&c.containers, kind, id).cloned() else {
            return if c.revoked.contains(&(kind, id.to_string())) {
                Ownership::Revoked
            } else {
                Ownership::Unknown
            };
        };
        // The bridge the owner hangs off and everyone in its namespace:
        // host links first (listing them gives the peers' namespace ids).
        // Not knowing is not an answer: the owner is then treated as
        // proxied (the request refused).
        let links = match host_links() {
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
        Self::ensure_netns_ids(&mut c);
        let selected = self.selected_files(&mut c, config);
        Ownership::Owned(identify::place(
            config,
            &c.snapshot(&selected),
            &links,
            &owner,
        ))
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
            image: String::new(),
            labels: Default::default(),
            host_network: false,
            cgroup: None,
            netns: Some(netns.to_string()),
            env: vec![format!(
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=/v2/credentials/{credentials_id}"
            )],
            addresses: Vec::new(),
        }
    }

    /// A directory whose cache already knows port 7 on docker0 and the
    /// namespace and containers behind it (no host lookups).
    fn directory(containers: Vec<ContainerFact>) -> (Directory, u32) {
        let d = Directory::new(
            PathBuf::from("/nonexistent/docker.sock"),
            Path::new("/proc"),
        );
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
    fn observe_records_get_a_listed_containers_name_labels_and_image() {
        let mut app = container("app-id", "app-creds");
        app.name = "ecs-web-1-app".into();
        app.image = "public.ecr.aws/nginx/nginx:1.27".into();
        app.labels.insert(
            metaguard_core::observe::LABEL_TASK_FAMILY.into(),
            "web".into(),
        );
        let (d, _) = directory(vec![app, container("bare-id", "bare-creds")]);
        let info = d.container_info("app-id").expect("listed");
        assert_eq!(
            (
                info.name.as_str(),
                info.task_family.as_deref(),
                info.image.as_deref()
            ),
            (
                "ecs-web-1-app",
                Some("web"),
                Some("public.ecr.aws/nginx/nginx:1.27")
            )
        );
        // No image in the listing: none in the record.
        assert_eq!(d.container_info("bare-id").and_then(|i| i.image), None);
        assert!(d.container_info("gone").is_none());
    }

    #[test]
    fn the_agent_upstream_is_what_the_daemon_published() {
        let d = Directory::new(
            PathBuf::from("/nonexistent/docker.sock"),
            Path::new("/proc"),
        );
        let cfg = config("[agent]\ncredentials = \"container:ecs-agent:51679\"\n");
        // Nothing before the daemon published (never a listing of its own).
        let mut agent = container_in("ecs-agent", "", "/run/netns/agent");
        agent.addresses = vec!["172.17.0.3".parse().expect("ip")];
        d.containers_listed(vec![agent]);
        assert!(d.agent_upstream(&cfg).is_err());
        let addr: SocketAddr = "172.17.0.3:51679".parse().expect("addr");
        let events = Arc::new(std::sync::atomic::AtomicU64::new(3));
        let d = d.with_docker_events(events.clone());
        d.publish_agent(Ok(addr), 3);
        assert_eq!(d.agent_upstream(&cfg), Ok(addr));
        // A Docker event not yet planned for: nothing until it is.
        events.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        assert!(d.agent_upstream(&cfg).is_err());
        d.publish_agent(Ok(addr), 4);
        assert_eq!(d.agent_upstream(&cfg), Ok(addr));
        d.publish_agent(Err("changing".into()), 4);
        assert!(d.agent_upstream(&cfg).is_err());
        // Without a container reference: the configured address.
        let plain = config("[agent]\ncredentials = \"127.0.0.1:51680\"\n");
        assert_eq!(
            d.agent_upstream(&plain),
            Ok("127.0.0.1:51680".parse().expect("addr"))
        );
    }

    #[test]
    fn a_stopped_containers_ids_are_revoked_and_a_restarted_one_gets_them_back() {
        let d = Directory::new(
            PathBuf::from("/nonexistent/docker.sock"),
            Path::new("/proc"),
        );
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
}
