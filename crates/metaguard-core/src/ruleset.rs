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

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use crate::config::{Action, Config, ContainerRef, NetnsSelector, Selector};

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
fn matched<'a>(
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

/// Where the proxy listens and how the packets the rules send to it are
/// delivered there.
///
/// The listeners sit on the endpoint addresses themselves, which are not
/// the host's: bound with `IP_FREEBIND` and `IP_TRANSPARENT`, they are
/// reachable only by packets that a rule DNATs to them (to
/// `[proxy] imds_port`, never to 127/8) and that the [`ProxyRoute`]s then
/// deliver locally. No port of the host's own addresses is taken (F10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyPlan {
    /// Credentials relay: the first task-metadata address of each family,
    /// port `[proxy] imds_port` (when a workload proxies task metadata).
    pub relay: Vec<SocketAddr>,
    /// IMDS proxy: the first IMDS address of each family, the same port
    /// (when a workload proxies IMDS).
    pub imds: Vec<SocketAddr>,
    /// Policy routing for packets carrying [`PROXY_ROUTE_MARK`], one per
    /// family that has a listener.
    pub routes: Vec<ProxyRoute>,
}

/// The policy routing of one family that delivers packets marked for the
/// proxy to the host itself: `ip rule add fwmark MARK/MARK lookup TABLE
/// pref PREF` and `ip route add local default dev lo table TABLE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyRoute {
    pub v6: bool,
    /// The rule matches `fwmark mark/mark`.
    pub mark: u32,
    pub table: u32,
    pub pref: u32,
}

/// The routing table of [`ProxyRoute`]: 0x4d47, "MG", like the bridge
/// hash's seed; an unusual number, so that no other program's table is
/// shared.
pub const PROXY_ROUTE_TABLE: u32 = 0x4d47;
/// The priority of [`ProxyRoute`]'s rule: ahead of the rules other
/// programs add (which match other marks or sources), after `local` (0).
pub const PROXY_RULE_PREF: u32 = 90;

/// The whole-table replacement prefix: `add` makes `delete` safe when the
/// table does not exist yet (nft 1.0.6 has no `destroy`), all in the same
/// transaction as the new contents.
fn replace_prefix(out: &mut String) {
    let _ = writeln!(out, "add table {FAMILY} {TABLE}");
    let _ = writeln!(out, "delete table {FAMILY} {TABLE}");
}

/// Marks that carry the caller's identity to the proxy (read back with
/// `SO_MARK` on the accepted socket; `net.ipv4.tcp_fwmark_accept = 1`),
/// and the bit that routes a packet to it.
///
/// * Bridge ports: the `bridge` table sets `BRIDGE_MARK_BASE` plus
///   `jhash(iif) mod BRIDGE_MARK_MOD` on packets to the endpoints (nft
///   cannot copy an ifindex into the mark; a hash of it it can, and
///   [`bridge_mark`] computes the same hash, so the proxy maps a mark back
///   to the port): bit 31 set, the hash in bits 0–29, bit 30 clear.
/// * Host processes: `HOST_MARK_TAG | workload index`, set by the
///   workload's output chain.
/// * [`PROXY_ROUTE_MARK`] (bit 30): the packet goes to the proxy. The
///   policy rule of [`ProxyRoute`] matches it; the rules set it only on
///   packets they DNAT to a listener. It is part of every host mark
///   (`0x6e` = `0x2e | 0x40`: a host workload's marked packets always go to
///   the proxy) and is cleared from bridge marks in `input`, after routing
///   and before TCP reads the mark, so that a bridge caller's identity
///   reads back exactly and the replies, which carry it
///   (`tcp_fwmark_accept`), are routed normally.
pub const BRIDGE_MARK_BASE: u32 = 0x8000_0000;
pub const BRIDGE_MARK_MOD: u32 = 0x3fff_ffff;
pub const BRIDGE_MARK_SEED: u32 = 0x4d47;
pub const PROXY_ROUTE_MARK: u32 = 0x4000_0000;
pub const HOST_MARK_TAG: u32 = 0x2e00_0000 | PROXY_ROUTE_MARK;
/// The bits of a mark that hold [`HOST_MARK_TAG`].
pub const HOST_MARK_MASK: u32 = 0xff00_0000;

/// Whether a connection's mark was set by a host workload's output chain.
pub fn is_host_mark(mark: u32) -> bool {
    mark & HOST_MARK_MASK == HOST_MARK_TAG
}
/// nat chains hook just before ecs-init's and Docker's (dstnat, -100): the
/// first NAT binding wins, so theirs never runs on proxied flows.
const PROXY_NAT_PRIORITY: i32 = -110;
/// After every DNAT (dstnat, -100): marks the packets of flows DNATed to a
/// listener for the policy route, and clears unused bridge marks.
const PROXY_ROUTE_PRIORITY: i32 = -90;
/// A TCP SYN (the first packet of a connection).
const SYN: &str = "tcp flags & (fin | syn | rst | ack) == syn";

/// The mark the bridge table gives packets entering from port `ifindex`:
/// the kernel's `jhash` (include/linux/jhash.h) of the 4-byte register,
/// scaled like `nft_jhash_eval`.
pub fn bridge_mark(ifindex: u32) -> u32 {
    let mut a = 0xdead_beef_u32
        .wrapping_add(4)
        .wrapping_add(BRIDGE_MARK_SEED);
    let mut b = a;
    let mut c = a;
    // The register holds the ifindex in host byte order; jhash reads the
    // bytes little-endian-first (k[0] + k[1] << 8 …), i.e. the value on
    // little-endian machines.
    let bytes = ifindex.to_ne_bytes();
    a = a.wrapping_add(u32::from_le_bytes(bytes));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(14));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(11));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(25));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(16));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(4));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(14));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(24));
    let scaled = ((u64::from(c) * u64::from(BRIDGE_MARK_MOD)) >> 32) as u32;
    scaled + BRIDGE_MARK_BASE
}

/// Builds the plan. Pure.
pub fn plan(config: &Config, facts: &HostFacts) -> Result<Plan, PlanError> {
    let proxy = proxy_plan(config)?;
    let mut warnings = Vec::new();

    // Bridges: (glob, workload index), in config order.
    let bridge_entries: Vec<(String, usize)> = config
        .workloads
        .iter()
        .enumerate()
        .filter_map(|(i, w)| match &w.selector {
            Selector::Bridges(globs) => Some(globs.iter().map(move |g| (g.clone(), i))),
            _ => None,
        })
        .flatten()
        .collect();
    let bridge_groups = group(
        config,
        &bridge_entries,
        &mut IfnameIndex::default(),
        &mut warnings,
    );

    // cgroup entries in config order: configured paths, and the cgroups of
    // host-network containers a `containers` selector matches.
    let mut cgroup_entries: Vec<(String, usize)> = Vec::new();
    for (i, w) in config.workloads.iter().enumerate() {
        match &w.selector {
            Selector::Cgroups(paths) => cgroup_entries.extend(paths.iter().map(|p| (p.clone(), i))),
            Selector::Containers(refs) => cgroup_entries.extend(
                matched(facts, refs)
                    .filter(|c| c.host_network)
                    .filter_map(|c| c.cgroup.clone())
                    .map(|p| (p, i)),
            ),
            _ => {}
        }
    }
    let cgroup_groups = group(
        config,
        &cgroup_entries,
        &mut CgroupIndex::default(),
        &mut warnings,
    );

    for w in &config.workloads {
        let Selector::Containers(refs) = &w.selector else {
            continue;
        };
        if facts.containers.is_none() {
            warnings.push(format!(
                "workload {:?}: containers selectors need the Docker API, which is not available here; it selects nothing",
                w.name
            ));
        } else if matched(facts, refs).next().is_none() {
            warnings.push(format!(
                "workload {:?}: no running container matches its containers selector",
                w.name
            ));
        }
    }

    // Workloads that get a chain in the host table.
    let mut host_workloads: Vec<usize> = bridge_groups
        .iter()
        .chain(cgroup_groups.iter())
        .flat_map(|g| g.iter().map(|(_, i)| *i))
        .collect();
    host_workloads.sort_unstable();
    host_workloads.dedup();
    // Host processes of a workload that proxies something: their packets
    // are marked in `output` and rerouted through `lo` to the proxy.
    let host_proxied = proxy.is_some()
        && host_workloads.iter().any(|&i| {
            let w = &config.workloads[i];
            !matches!(w.selector, Selector::Bridges(_))
                && (w.imds == Action::Proxy || w.task_metadata == Action::Proxy)
        });

    let mut host = String::new();
    replace_prefix(&mut host);
    let _ = writeln!(host, "table {FAMILY} {TABLE} {{");
    let _ = writeln!(
        host,
        "\tcomment \"managed by metaguard; changes are overwritten\""
    );
    write_sets(&mut host, config);
    for &i in &host_workloads {
        let w = &config.workloads[i];
        let bridge = matches!(w.selector, Selector::Bridges(_));
        let _ = writeln!(host, "\tchain wl{i} {{");
        let _ = writeln!(
            host,
            "\t\tcomment {}",
            quote(&format!("workload {}", w.name))
        );
        let hook = if bridge {
            Hook::Bridge
        } else {
            Hook::HostOutput(i)
        };
        write_decisions(&mut host, "\t\t", config, i, hook);
        let _ = writeln!(host, "\t}}");
    }
    if let Some(p) = &proxy {
        write_host_proxy_chains(&mut host, config, p, host_proxied);
    }
    // Per group, exact names go into a hash map and globs into an interval
    // map: within a group nothing overlaps, so the two lookups commute.
    let mut bridge_maps: Vec<String> = Vec::new();
    for (g, entries) in bridge_groups.iter().enumerate() {
        for (suffix, wild) in [("names", false), ("globs", true)] {
            let elems: Vec<String> = entries
                .iter()
                .filter(|(glob, _)| glob.ends_with('*') == wild)
                .map(|(glob, i)| format!("{} : goto wl{i}", quote(glob)))
                .collect();
            if elems.is_empty() {
                continue;
            }
            let name = format!("bridges{g}_{suffix}");
            let _ = writeln!(host, "\tmap {name} {{");
            let _ = writeln!(host, "\t\ttype ifname : verdict");
            if wild {
                let _ = writeln!(host, "\t\tflags interval");
            }
            let _ = writeln!(host, "\t\telements = {{ {} }}", elems.join(", "));
            let _ = writeln!(host, "\t}}");
            bridge_maps.push(name);
        }
    }
    // cgroup maps: one per (group, depth), since the depth is part of the
    // match expression.
    let mut cgroup_maps: Vec<CgroupMap<'_>> = Vec::new();
    for (g, entries) in cgroup_groups.iter().enumerate() {
        let mut depths: Vec<usize> = entries.iter().map(|(p, _)| depth(p)).collect();
        depths.sort_unstable_by(|a, b| b.cmp(a));
        depths.dedup();
        for d in depths {
            let name = format!("cgroups{g}_l{d}");
            let members = entries.iter().filter(|(p, _)| depth(p) == d).collect();
            cgroup_maps.push(CgroupMap {
                name,
                depth: d,
                members,
            });
        }
    }
    for CgroupMap {
        name,
        depth: d,
        members,
    } in &cgroup_maps
    {
        let _ = writeln!(host, "\tmap {name} {{");
        let _ = writeln!(host, "\t\ttypeof socket cgroupv2 level {d} : verdict");
        let elems: Vec<String> = members
            .iter()
            .map(|(p, i)| format!("{} : goto wl{i}", quote(p)))
            .collect();
        let _ = writeln!(host, "\t\telements = {{ {} }}", elems.join(", "));
        let _ = writeln!(host, "\t}}");
    }
    let mut prerouting: Vec<String> = Vec::new();
    if host_proxied {
        // Host processes' connections come back through `lo`, already
        // DNATed to a listener: a SYN nobody transparent listens for is
        // refused (apply alone, a stopped daemon: fail closed, fast).
        let host_mark = format!("meta mark & 0x{HOST_MARK_MASK:08x} == 0x{HOST_MARK_TAG:08x}");
        prerouting.push(format!(
            "\t\tiif \"lo\" {host_mark} {SYN} socket transparent 1 accept\n"
        ));
        prerouting.push(format!(
            "\t\tiif \"lo\" {host_mark} {SYN} reject with tcp reset\n"
        ));
    }
    for v6 in [false, true] {
        // Task namespaces' tables send IMDS requests to the task-metadata
        // address on the IMDS proxy's port, through whatever bridge they
        // are plugged into: from any bridge port (a bridge mark), that
        // port leads to the IMDS proxy, which serves each caller by its
        // own workload. Nothing else listens there.
        let Some(to) = task_path(config, v6) else {
            continue;
        };
        let (fam, sfx) = family(v6);
        let from_bridge =
            format!("meta mark & 0x{BRIDGE_MARK_BASE:08x} == 0x{BRIDGE_MARK_BASE:08x} ");
        let port = config.proxy.imds_port.to_string();
        prerouting.push(probe_rule("\t\t", &from_bridge, "tmd", v6, &port, to));
        prerouting.push(format!(
            "\t\t{from_bridge}{fam} daddr @tmd{sfx} tcp dport {port} {SYN} reject with tcp reset\n"
        ));
        prerouting.push(format!(
            "\t\t{from_bridge}{fam} daddr @tmd{sfx} tcp dport {port} accept\n"
        ));
    }
    prerouting.extend(
        bridge_maps
            .iter()
            .map(|name| format!("\t\tiifname vmap @{name}\n")),
    );
    if !prerouting.is_empty() {
        let _ = writeln!(host, "\tchain prerouting {{");
        let _ = writeln!(
            host,
            "\t\ttype filter hook prerouting priority raw; policy accept;"
        );
        host.extend(prerouting);
        let _ = writeln!(host, "\t}}");
    }
    if !cgroup_maps.is_empty() {
        // A route chain when host processes go to the proxy: the mark
        // their workload's chain sets reroutes them (policy route).
        let kind = if host_proxied { "route" } else { "filter" };
        let _ = writeln!(host, "\tchain output {{");
        let _ = writeln!(
            host,
            "\t\ttype {kind} hook output priority raw; policy accept;"
        );
        for CgroupMap { name, depth: d, .. } in &cgroup_maps {
            let _ = writeln!(host, "\t\tsocket cgroupv2 level {d} vmap @{name}");
        }
        let _ = writeln!(host, "\t}}");
    }
    let _ = writeln!(host, "}}");
    if proxy.is_some() {
        write_bridge_table(&mut host, config);
    }

    let netns = plan_netns(config, facts, &mut warnings);
    Ok(Plan {
        host,
        netns,
        warnings,
        proxy,
    })
}

/// The proxy's listeners and routes; `None` when nothing is proxied.
fn proxy_plan(config: &Config) -> Result<Option<ProxyPlan>, PlanError> {
    let (imds, tmd) = config.proxies();
    if !imds && !tmd {
        return Ok(None);
    }
    if imds_proxy_addr(config, false).is_none() {
        let w = config
            .workloads
            .iter()
            .find(|w| w.imds == Action::Proxy || w.task_metadata == Action::Proxy)
            .map(|w| w.name.clone())
            .unwrap_or_default();
        return Err(PlanError::ProxyWithoutAddress { workload: w });
    }
    let listeners = |service: Service, on: bool| -> Vec<SocketAddr> {
        [false, true]
            .into_iter()
            .filter(|_| on)
            .filter_map(|v6| listener(config, service, v6))
            .collect()
    };
    let relay = listeners(Service::Relay, tmd);
    let imds = listeners(Service::Imds, imds);
    let routes = [false, true]
        .into_iter()
        .filter(|v6| relay.iter().chain(&imds).any(|a| a.is_ipv6() == *v6))
        .map(|v6| ProxyRoute {
            v6,
            mark: PROXY_ROUTE_MARK,
            table: PROXY_ROUTE_TABLE,
            pref: PROXY_RULE_PREF,
        })
        .collect();
    Ok(Some(ProxyPlan {
        relay,
        imds,
        routes,
    }))
}

/// The two services of the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Service {
    Imds,
    Relay,
}

/// Where `service` listens in one family: on the first endpoint address
/// of that family (IMDS's for the IMDS proxy, task metadata's for the
/// relay), port `[proxy] imds_port`. None without such an address.
fn listener(config: &Config, service: Service, v6: bool) -> Option<SocketAddr> {
    let endpoints = match service {
        Service::Imds => &config.endpoints.imds,
        Service::Relay => &config.endpoints.task_metadata,
    };
    endpoints
        .iter()
        .find(|a| a.is_ipv6() == v6)
        .map(|a| SocketAddr::new(*a, config.proxy.imds_port))
}

/// Where a task namespace's table sends its IMDS requests, in one family:
/// the first task-metadata address (its route to the host goes through
/// ecs-bridge), port `[proxy] imds_port`; the host then DNATs them to the
/// IMDS proxy.
fn imds_proxy_addr(config: &Config, v6: bool) -> Option<IpAddr> {
    config
        .endpoints
        .task_metadata
        .iter()
        .find(|a| a.is_ipv6() == v6)
        .copied()
}

/// Whether packets of one family to a task-metadata address on
/// `[proxy] imds_port` can reach the IMDS proxy (task namespaces send their
/// IMDS requests there).
fn task_path(config: &Config, v6: bool) -> Option<SocketAddr> {
    if !config.proxies().0 {
        return None;
    }
    imds_proxy_addr(config, v6).and(listener(config, Service::Imds, v6))
}

fn dnat_target(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(a) => a.to_string(),
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
    }
}

fn family(v6: bool) -> (&'static str, &'static str) {
    if v6 {
        ("ip6", "6")
    } else {
        ("ip", "4")
    }
}

/// A SYN of a selected caller's connection to `set`:`dport`: sent to the
/// proxy's `to` if it is listening (`tproxy` finds its transparent
/// listener, else the rule does not match); then marked for the policy
/// route, which the nat chain's DNAT to `to` and the route chain follow.
fn probe_rule(
    indent: &str,
    prefix: &str,
    set: &str,
    v6: bool,
    dport: &str,
    to: SocketAddr,
) -> String {
    let (fam, sfx) = family(v6);
    format!(
        "{indent}{prefix}{fam} daddr @{set}{sfx} tcp dport {dport} {SYN} tproxy {fam} to {} meta mark set meta mark | 0x{PROXY_ROUTE_MARK:08x} accept\n",
        dnat_target(to)
    )
}

/// The host table's proxy chains besides the workloads' own rules:
///
/// * `proxy_prerouting` (nat, -110): a bridge caller's SYN that a probe
///   rule marked is DNATed to the listener, so that ecs-init's DNAT to
///   127.0.0.1 never runs (the first NAT binding wins) — F1, F2;
/// * `proxy_output` (nat, -110): the same for host processes of proxied
///   workloads (their output chain marked them; `output` is then a route
///   chain, so the mark reroutes them through `lo`);
/// * `proxy_route` (after every DNAT): every packet of a flow DNATed to a
///   listener carries [`PROXY_ROUTE_MARK`] (the policy route delivers it
///   locally), and bridge marks not used for that are cleared again;
/// * `proxy_input`: [`PROXY_ROUTE_MARK`] is taken off bridge marks before
///   TCP reads them.
fn write_host_proxy_chains(out: &mut String, config: &Config, plan: &ProxyPlan, host: bool) {
    let port = config.proxy.imds_port;
    let routed = PROXY_ROUTE_MARK | BRIDGE_MARK_BASE;
    let bridge_routed = format!("meta mark & 0x{routed:08x} == 0x{routed:08x}");
    let host_mark = format!("meta mark & 0x{HOST_MARK_MASK:08x} == 0x{HOST_MARK_TAG:08x}");
    let _ = writeln!(out, "\tchain proxy_prerouting {{");
    let _ = writeln!(
        out,
        "\t\ttype nat hook prerouting priority {PROXY_NAT_PRIORITY}; policy accept;"
    );
    for v6 in [false, true] {
        let (fam, sfx) = family(v6);
        if let Some(to) = plan.imds.iter().find(|a| a.is_ipv6() == v6) {
            let _ = writeln!(
                out,
                "\t\t{bridge_routed} {fam} daddr @imds{sfx} tcp dport 80 dnat {fam} to {}",
                dnat_target(*to)
            );
        }
        if let Some(to) = task_path(config, v6) {
            let _ = writeln!(
                out,
                "\t\t{bridge_routed} {fam} daddr @tmd{sfx} tcp dport {port} dnat {fam} to {}",
                dnat_target(to)
            );
        }
        if let Some(to) = plan.relay.iter().find(|a| a.is_ipv6() == v6) {
            let _ = writeln!(
                out,
                "\t\t{bridge_routed} {fam} daddr @tmd{sfx} tcp dport 80 dnat {fam} to {}",
                dnat_target(*to)
            );
        }
    }
    let _ = writeln!(out, "\t}}");
    if host {
        let _ = writeln!(out, "\tchain proxy_output {{");
        let _ = writeln!(
            out,
            "\t\ttype nat hook output priority {PROXY_NAT_PRIORITY}; policy accept;"
        );
        for v6 in [false, true] {
            let (fam, sfx) = family(v6);
            for (set, listeners) in [("imds", &plan.imds), ("tmd", &plan.relay)] {
                if let Some(to) = listeners.iter().find(|a| a.is_ipv6() == v6) {
                    let _ = writeln!(
                        out,
                        "\t\t{host_mark} {fam} daddr @{set}{sfx} tcp dport 80 dnat {fam} to {}",
                        dnat_target(*to)
                    );
                }
            }
        }
        let _ = writeln!(out, "\t}}");
    }
    let _ = writeln!(out, "\tchain proxy_route {{");
    let _ = writeln!(
        out,
        "\t\ttype filter hook prerouting priority {PROXY_ROUTE_PRIORITY}; policy accept;"
    );
    for v6 in [false, true] {
        let (fam, _) = family(v6);
        let mut addrs: Vec<String> = plan
            .imds
            .iter()
            .chain(&plan.relay)
            .filter(|a| a.is_ipv6() == v6)
            .map(|a| a.ip().to_string())
            .collect();
        addrs.sort();
        addrs.dedup();
        if addrs.is_empty() {
            continue;
        }
        let _ = writeln!(
            out,
            "\t\tct direction original ct status dnat meta l4proto tcp ct reply proto-src {port} ct reply {fam} saddr {{ {} }} meta mark set meta mark | 0x{PROXY_ROUTE_MARK:08x}",
            addrs.join(", ")
        );
    }
    let _ = writeln!(
        out,
        "\t\tmeta mark & 0x{routed:08x} == 0x{BRIDGE_MARK_BASE:08x} meta mark set 0x00000000"
    );
    let _ = writeln!(out, "\t}}");
    let _ = writeln!(out, "\tchain proxy_input {{");
    let _ = writeln!(
        out,
        "\t\ttype filter hook input priority raw; policy accept;"
    );
    let _ = writeln!(
        out,
        "\t\t{bridge_routed} meta mark set meta mark & 0x{:08x}",
        !PROXY_ROUTE_MARK
    );
    let _ = writeln!(out, "\t}}");
}

/// Bridge globs of workloads that proxy IMDS, in file order.
fn imds_proxy_bridges(config: &Config) -> Vec<&String> {
    config
        .workloads
        .iter()
        .filter(|w| w.imds == Action::Proxy)
        .filter_map(|w| match &w.selector {
            Selector::Bridges(g) => Some(g.iter()),
            _ => None,
        })
        .flatten()
        .collect()
}

/// The `bridge` table: marks packets headed for the proxy with a hash of
/// the bridge port they entered from — the caller's identity, which no
/// source address can fake (F15).
fn write_bridge_table(out: &mut String, config: &Config) {
    let port = config.proxy.imds_port;
    let mark = format!(
        "meta mark set jhash meta iif mod {BRIDGE_MARK_MOD} seed 0x{BRIDGE_MARK_SEED:x} offset 0x{BRIDGE_MARK_BASE:08x}"
    );
    let _ = writeln!(out, "add table bridge {TABLE}");
    let _ = writeln!(out, "delete table bridge {TABLE}");
    let _ = writeln!(out, "table bridge {TABLE} {{");
    let _ = writeln!(
        out,
        "\tcomment \"managed by metaguard; changes are overwritten\""
    );
    let _ = writeln!(out, "\tchain prerouting {{");
    let _ = writeln!(
        out,
        "\t\ttype filter hook prerouting priority -300; policy accept;"
    );
    for (fam, v6) in [("ip", false), ("ip6", true)] {
        let tmd: Vec<String> = config
            .endpoints
            .task_metadata
            .iter()
            .filter(|a| a.is_ipv6() == v6)
            .map(|a| a.to_string())
            .collect();
        if !tmd.is_empty() {
            let _ = writeln!(
                out,
                "\t\t{fam} daddr {{ {} }} tcp dport {{ 80, {port} }} {mark}",
                tmd.join(", ")
            );
        }
        let imds: Vec<String> = config
            .endpoints
            .imds
            .iter()
            .filter(|a| a.is_ipv6() == v6)
            .map(|a| a.to_string())
            .collect();
        if imds.is_empty() {
            continue;
        }
        // Every port of every bridge: `meta ibrname` needs
        // nft_meta_bridge, which hosts often lack, and the mark only names
        // the port (the nat chain picks proxied bridges by name).
        if !imds_proxy_bridges(config).is_empty() {
            let _ = writeln!(
                out,
                "\t\t{fam} daddr {{ {} }} tcp dport 80 {mark}",
                imds.join(", ")
            );
        }
    }
    let _ = writeln!(out, "\t}}");
    let _ = writeln!(out, "}}");
}

fn plan_netns(config: &Config, facts: &HostFacts, warnings: &mut Vec<String>) -> Vec<NetnsPlan> {
    let mut out: Vec<NetnsPlan> = Vec::new();
    for (i, w) in config.workloads.iter().enumerate() {
        if let Selector::Containers(refs) = &w.selector {
            // Containers with a stack of their own get a table inside it.
            for c in matched(facts, refs).filter(|c| !c.host_network) {
                let Some(path) = &c.netns else { continue };
                if out.iter().any(|p| &p.path == path) {
                    continue;
                }
                out.push(NetnsPlan {
                    path: path.clone(),
                    workload: w.name.clone(),
                    script: task_script(config, i),
                });
            }
            continue;
        }
        let Selector::Netns(sels) = &w.selector else {
            continue;
        };
        let mut found = 0usize;
        for sel in sels {
            let candidates: Vec<&String> = match sel {
                NetnsSelector::EcsTasks => match &facts.containers {
                    Some(cs) => cs
                        .iter()
                        .filter(|c| c.is_ecs_pause())
                        .filter_map(|c| c.netns.as_ref())
                        .collect(),
                    None => {
                        warnings.push(format!(
                            "workload {:?}: \"ecs-tasks\" needs the Docker API (unavailable here); no task namespaces found",
                            w.name
                        ));
                        Vec::new()
                    }
                },
                NetnsSelector::Path(glob) => match globset::Glob::new(glob) {
                    Ok(g) => {
                        let m = g.compile_matcher();
                        facts
                            .netns_paths
                            .iter()
                            .filter(|p| m.is_match(p.as_str()))
                            .collect()
                    }
                    Err(_) => Vec::new(),
                },
            };
            for path in candidates {
                if out.iter().any(|p| &p.path == path) {
                    continue; // an earlier workload (or entry) has it: first match wins
                }
                found += 1;
                out.push(NetnsPlan {
                    path: path.clone(),
                    workload: w.name.clone(),
                    script: task_script(config, i),
                });
            }
        }
        if found == 0
            && !sels
                .iter()
                .all(|s| *s == NetnsSelector::EcsTasks && facts.containers.is_none())
        {
            warnings.push(format!(
                "workload {:?}: no network namespace matches its netns selectors",
                w.name
            ));
        }
    }
    out
}

/// One `socket cgroupv2 level N` verdict map: entries of one lookup group
/// at one depth.
struct CgroupMap<'a> {
    name: String,
    depth: usize,
    members: Vec<&'a (String, usize)>,
}

fn task_script(config: &Config, i: usize) -> String {
    let w = &config.workloads[i];
    let mut s = String::new();
    replace_prefix(&mut s);
    let _ = writeln!(s, "table {FAMILY} {TABLE} {{");
    let _ = writeln!(
        s,
        "\tcomment {}",
        quote(&format!(
            "managed by metaguard for workload {}; changes are overwritten",
            w.name
        ))
    );
    write_sets(&mut s, config);
    let _ = writeln!(s, "\tchain output {{");
    let _ = writeln!(
        s,
        "\t\ttype filter hook output priority raw; policy accept;"
    );
    write_decisions(&mut s, "\t\t", config, i, Hook::Task);
    let _ = writeln!(s, "\t}}");
    if w.imds == Action::Proxy {
        // To the host through ecs-bridge (the task's route to
        // 169.254.170.2), never via 127/8; the host DNATs it on to the
        // IMDS proxy.
        let _ = writeln!(s, "\tchain proxy_output {{");
        let _ = writeln!(
            s,
            "\t\ttype nat hook output priority {PROXY_NAT_PRIORITY}; policy accept;"
        );
        for v6 in [false, true] {
            if task_path(config, v6).is_none() {
                continue;
            }
            if let Some(p) = imds_proxy_addr(config, v6) {
                let (fam, sfx) = family(v6);
                let _ = writeln!(
                    s,
                    "\t\t{fam} daddr @imds{sfx} tcp dport 80 dnat {fam} to {}",
                    dnat_target(SocketAddr::new(p, config.proxy.imds_port))
                );
            }
        }
        let _ = writeln!(s, "\t}}");
    }
    let _ = writeln!(s, "}}");
    s
}

fn write_sets(out: &mut String, config: &Config) {
    for (name, ips) in [
        ("imds", &config.endpoints.imds),
        ("tmd", &config.endpoints.task_metadata),
    ] {
        let v4: Vec<String> = ips
            .iter()
            .filter_map(|ip| match ip {
                IpAddr::V4(v4) => Some(v4.to_string()),
                IpAddr::V6(_) => None,
            })
            .collect();
        let mut v6: Vec<String> = ips
            .iter()
            .map(|ip| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped().to_string(),
                IpAddr::V6(v6) => v6.to_string(),
            })
            .collect();
        v6.sort();
        v6.dedup();
        for (suffix, ty, elems) in [("4", "ipv4_addr", v4), ("6", "ipv6_addr", v6)] {
            let _ = writeln!(out, "\tset {name}{suffix} {{");
            let _ = writeln!(out, "\t\ttype {ty}");
            if !elems.is_empty() {
                let _ = writeln!(out, "\t\telements = {{ {} }}", elems.join(", "));
            }
            let _ = writeln!(out, "\t}}");
        }
    }
}

/// Where a workload's chain runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hook {
    /// Host prerouting, traffic entering from a bridge.
    Bridge,
    /// Host output, processes selected by cgroup (workload index).
    HostOutput(usize),
    /// Output inside a task namespace.
    Task,
}

/// The rules of one workload.
fn write_decisions(out: &mut String, indent: &str, config: &Config, i: usize, hook: Hook) {
    let w = &config.workloads[i];
    let (imds, tmd) = (w.imds, w.task_metadata);
    let bridge = hook == Hook::Bridge;
    let imds_port = config.proxy.imds_port;
    let (imds_proxied, tmd_proxied) = config.proxies();
    for (set, action) in [("imds", imds), ("tmd", tmd)] {
        let service = if set == "imds" {
            Service::Imds
        } else {
            Service::Relay
        };
        if action == Action::Proxy {
            // Only HTTP on port 80 goes on (to the proxy); any other port
            // or protocol is refused as with deny. The task-metadata
            // addresses also carry the IMDS proxy's port.
            let ports = if set == "tmd" && imds_proxied {
                format!("{{ 80, {imds_port} }}")
            } else {
                "80".to_string()
            };
            for v6 in [false, true] {
                let (fam, sfx) = family(v6);
                let to = match (set, hook) {
                    // A task's table DNATs to the task-metadata address,
                    // the host on to the IMDS proxy.
                    ("imds", Hook::Task) => task_path(config, v6),
                    _ => listener(config, service, v6),
                };
                let Some(to) = to else {
                    // No proxy listener in this family: fail closed.
                    let _ = writeln!(
                        out,
                        "{indent}{fam} daddr @{set}{sfx} meta l4proto tcp reject with tcp reset"
                    );
                    let _ = writeln!(
                        out,
                        "{indent}{fam} daddr @{set}{sfx} reject with icmpx admin-prohibited"
                    );
                    continue;
                };
                let _ = writeln!(
                    out,
                    "{indent}{fam} daddr @{set}{sfx} tcp dport != {ports} reject with tcp reset"
                );
                let _ = writeln!(
                    out,
                    "{indent}{fam} daddr @{set}{sfx} meta l4proto != tcp reject with icmpx admin-prohibited"
                );
                match hook {
                    // To the proxy if it listens; refused at once if not.
                    Hook::Bridge => {
                        out.push_str(&probe_rule(indent, "", set, v6, "80", to));
                        let _ = writeln!(
                            out,
                            "{indent}{fam} daddr @{set}{sfx} tcp dport 80 {SYN} reject with tcp reset"
                        );
                    }
                    Hook::HostOutput(idx) => {
                        let _ = writeln!(
                            out,
                            "{indent}{fam} daddr @{set}{sfx} tcp dport 80 meta mark set 0x{:08x}",
                            HOST_MARK_TAG | (idx as u32 & 0xffff)
                        );
                    }
                    Hook::Task => {}
                }
            }
            continue;
        }
        if action == Action::Allow && set == "tmd" && tmd_proxied && bridge {
            // Relayed while the relay listens, so that no id a proxied
            // workload owns is handed to it (F13); straight on to the
            // agent as without metaguard when it does not.
            for v6 in [false, true] {
                if let Some(to) = listener(config, Service::Relay, v6) {
                    out.push_str(&probe_rule(indent, "", set, v6, "80", to));
                }
            }
            continue;
        }
        if action != Action::Deny {
            continue;
        }
        for (fam, suffix) in [("ip", "4"), ("ip6", "6")] {
            let _ = writeln!(
                out,
                "{indent}{fam} daddr @{set}{suffix} meta l4proto tcp reject with tcp reset"
            );
            let _ = writeln!(
                out,
                "{indent}{fam} daddr @{set}{suffix} reject with icmpx admin-prohibited"
            );
        }
    }
    if bridge && (imds != Action::Allow || tmd != Action::Allow) {
        // F17: nothing entering from a container bridge is addressed to the
        // host's loopback legitimately (DNATed credentials traffic still
        // carries 169.254.170.2 here, before NAT). With route_localnet=1 it
        // would otherwise reach the agent's port and local services directly.
        let _ = writeln!(
            out,
            "{indent}ip daddr 127.0.0.0/8 reject with icmpx admin-prohibited"
        );
        let _ = writeln!(
            out,
            "{indent}ip6 daddr ::1 reject with icmpx admin-prohibited"
        );
    }
}

fn quote(s: &str) -> String {
    // Config validation keeps quotes and backslashes out of names and
    // paths; escape anyway so a script can never be broken out of.
    format!("\"{}\"", s.replace(['"', '\\'], "_"))
}

fn depth(path: &str) -> usize {
    path.split('/').filter(|s| !s.is_empty()).count()
}

/// Interface globs: an exact name, or a prefix with one trailing `*`.
fn ifname_parts(g: &str) -> (&str, bool) {
    match g.strip_suffix('*') {
        Some(p) => (p, true),
        None => (g, false),
    }
}

fn ifname_overlap(a: &str, b: &str) -> bool {
    let (pa, wa) = ifname_parts(a);
    let (pb, wb) = ifname_parts(b);
    match (wa, wb) {
        (false, false) => pa == pb,
        (true, false) => pb.starts_with(pa),
        (false, true) => pa.starts_with(pb),
        (true, true) => pa.starts_with(pb) || pb.starts_with(pa),
    }
}

/// Whether every name `later` matches is matched by `earlier`.
fn ifname_covers(earlier: &str, later: &str) -> bool {
    let (pe, we) = ifname_parts(earlier);
    let (pl, wl) = ifname_parts(later);
    match (we, wl) {
        (false, false) => pe == pl,
        (true, _) => pl.starts_with(pe),
        (false, true) => false,
    }
}

/// Where earlier entries were placed, answering the two questions the
/// grouping asks of each new entry without scanning every earlier entry.
trait PlacedIndex {
    /// An earlier entry that covers `entry` entirely: (entry, workload).
    fn covering(&self, entry: &str) -> Option<(String, usize)>;
    /// The highest group holding an earlier entry that overlaps `entry`.
    fn max_overlap_group(&self, entry: &str) -> Option<usize>;
    fn insert(&mut self, entry: &str, workload: usize, group: usize);
}

/// Interface globs: exact names hashed; prefixes (few) in a list.
#[derive(Default)]
struct IfnameIndex {
    exact: std::collections::HashMap<String, (usize, usize)>,
    prefixes: Vec<(String, usize, usize)>,
}

impl PlacedIndex for IfnameIndex {
    fn covering(&self, entry: &str) -> Option<(String, usize)> {
        let (p, wild) = ifname_parts(entry);
        if !wild {
            if let Some((w, _)) = self.exact.get(p) {
                return Some((entry.to_string(), *w));
            }
        }
        self.prefixes
            .iter()
            .find(|(e, _, _)| ifname_covers(e, entry))
            .map(|(e, w, _)| (e.clone(), *w))
    }

    fn max_overlap_group(&self, entry: &str) -> Option<usize> {
        let (p, wild) = ifname_parts(entry);
        let from_exact = if wild {
            self.exact
                .iter()
                .filter(|(name, _)| name.starts_with(p))
                .map(|(_, (_, g))| *g)
                .max()
        } else {
            self.exact.get(p).map(|(_, g)| *g)
        };
        let from_prefix = self
            .prefixes
            .iter()
            .filter(|(e, _, _)| ifname_overlap(e, entry))
            .map(|(_, _, g)| *g)
            .max();
        from_exact.max(from_prefix)
    }

    fn insert(&mut self, entry: &str, workload: usize, group: usize) {
        match ifname_parts(entry) {
            (p, false) => {
                self.exact.insert(p.to_string(), (workload, group));
            }
            (_, true) => self.prefixes.push((entry.to_string(), workload, group)),
        }
    }
}

/// cgroup paths, ordered so that a subtree is one range.
#[derive(Default)]
struct CgroupIndex {
    placed: std::collections::BTreeMap<String, (usize, usize)>,
}

fn ancestors_or_self(path: &str) -> impl Iterator<Item = &str> {
    path.match_indices('/')
        .map(move |(i, _)| &path[..i])
        .chain(std::iter::once(path))
}

impl PlacedIndex for CgroupIndex {
    fn covering(&self, entry: &str) -> Option<(String, usize)> {
        ancestors_or_self(entry).find_map(|a| self.placed.get(a).map(|(w, _)| (a.to_string(), *w)))
    }

    fn max_overlap_group(&self, entry: &str) -> Option<usize> {
        let above = ancestors_or_self(entry)
            .filter_map(|a| self.placed.get(a).map(|(_, g)| *g))
            .max();
        // Descendants: keys in ["entry/", "entry0"), as '0' follows '/'.
        let below = self
            .placed
            .range(format!("{entry}/")..format!("{entry}0"))
            .map(|(_, (_, g))| *g)
            .max();
        above.max(below)
    }

    fn insert(&mut self, entry: &str, workload: usize, group: usize) {
        self.placed.insert(entry.to_string(), (workload, group));
    }
}

/// Places entries (in config order) into lookup groups: each entry goes one
/// group after the last group holding an earlier entry it overlaps; an
/// entry covered by an earlier one is dropped (with a warning when the two
/// belong to different workloads). Cost: one index query per entry.
fn group(
    config: &Config,
    entries: &[(String, usize)],
    index: &mut dyn PlacedIndex,
    warnings: &mut Vec<String>,
) -> Vec<Vec<(String, usize)>> {
    let mut groups: Vec<Vec<(String, usize)>> = Vec::new();
    for (entry, w) in entries {
        if let Some((e, ew)) = index.covering(entry) {
            if ew != *w {
                warnings.push(format!(
                    "workload {:?}: {entry:?} can never match: workload {:?} lists {e:?} first (first match wins)",
                    config.workloads[*w].name, config.workloads[ew].name
                ));
            }
            continue;
        }
        let g = index.max_overlap_group(entry).map_or(0, |g| g + 1);
        index.insert(entry, *w, g);
        if groups.len() <= g {
            groups.resize_with(g + 1, Vec::new);
        }
        groups[g].push((entry.clone(), *w));
    }
    groups
}

#[cfg(test)]
mod tests;
