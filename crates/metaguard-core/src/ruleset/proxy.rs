//! The proxy's part of the plan: where its listeners sit, the marks that
//! carry a caller's identity to it, and the host table's chains (and the
//! `bridge` table) that steer proxied connections there.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use super::ports::{AgentGuard, PortException, RELAY_UPSTREAM_MARK};
use super::{family, quote, Config, PlanError, TABLE};
use crate::config::Selector;

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
pub(super) const PROXY_NAT_PRIORITY: i32 = -110;
/// After every DNAT (dstnat, -100): marks the packets of flows DNATed to a
/// listener for the policy route, and clears unused bridge marks.
pub(super) const PROXY_ROUTE_PRIORITY: i32 = -90;
/// A TCP SYN (the first packet of a connection).
pub(super) const SYN: &str = "tcp flags & (fin | syn | rst | ack) == syn";

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

/// The proxy's listeners and routes; `None` when nothing is proxied.
pub(super) fn proxy_plan(config: &Config) -> Result<Option<ProxyPlan>, PlanError> {
    let (imds, tmd) = config.proxies();
    if !imds && !tmd {
        return Ok(None);
    }
    if imds_proxy_addr(config, false).is_none() {
        let w = config
            .workloads
            .iter()
            .find(|w| w.imds.via_proxy() || w.task_metadata.via_proxy())
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
pub(super) enum Service {
    Imds,
    Relay,
}

/// Where `service` listens in one family: on the first endpoint address
/// of that family (IMDS's for the IMDS proxy, task metadata's for the
/// relay), port `[proxy] imds_port`. None without such an address.
pub(super) fn listener(config: &Config, service: Service, v6: bool) -> Option<SocketAddr> {
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
pub(super) fn imds_proxy_addr(config: &Config, v6: bool) -> Option<IpAddr> {
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
pub(super) fn task_path(config: &Config, v6: bool) -> Option<SocketAddr> {
    if !config.proxies().0 {
        return None;
    }
    imds_proxy_addr(config, v6).and(listener(config, Service::Imds, v6))
}

pub(super) fn dnat_target(addr: SocketAddr) -> String {
    match addr {
        SocketAddr::V4(a) => a.to_string(),
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
    }
}

/// A SYN of a selected caller's connection to `set`:`dport`: sent to the
/// proxy's `to` if it is listening (`tproxy` finds its transparent
/// listener, else the rule does not match); then marked for the policy
/// route, which the nat chain's DNAT to `to` and the route chain follow.
pub(super) fn probe_rule(
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
pub(super) fn write_host_proxy_chains(
    out: &mut String,
    config: &Config,
    plan: &ProxyPlan,
    host: bool,
) {
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
pub(super) fn imds_proxy_bridges(config: &Config) -> Vec<&String> {
    config
        .workloads
        .iter()
        .filter(|w| w.imds.via_proxy())
        .filter_map(|w| match &w.selector {
            Selector::Bridges(g) => Some(g.iter()),
            _ => None,
        })
        .flatten()
        .collect()
}

/// The `bridge` table: marks packets headed for the proxy with a hash of
/// the bridge port they entered from — the caller's identity, which no
/// source address can fake (F15) — and every packet to an endpoint from a
/// port with an exception (`ports`), which the host table dispatches by
/// that mark.
pub(super) fn write_bridge_table(
    out: &mut String,
    config: &Config,
    proxied: bool,
    exceptions: &[PortException],
    agent: Option<&AgentGuard>,
) {
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
    if !exceptions.is_empty() {
        let ports: Vec<String> = exceptions.iter().map(|e| quote(&e.port.name)).collect();
        for (fam, v6) in [("ip", false), ("ip6", true)] {
            let mut addrs: Vec<String> = if v6 {
                // The IPv6 sets also hold the IPv4-mapped forms.
                config
                    .endpoints
                    .imds
                    .iter()
                    .chain(&config.endpoints.task_metadata)
                    .map(|a| match a {
                        IpAddr::V4(v4) => v4.to_ipv6_mapped().to_string(),
                        IpAddr::V6(v6) => v6.to_string(),
                    })
                    .collect()
            } else {
                config
                    .endpoints
                    .imds
                    .iter()
                    .chain(&config.endpoints.task_metadata)
                    .filter(|a| a.is_ipv4())
                    .map(|a| a.to_string())
                    .collect()
            };
            addrs.sort();
            addrs.dedup();
            if !addrs.is_empty() {
                let _ = writeln!(
                    out,
                    "\t\tiifname {{ {} }} {fam} daddr {{ {} }} {mark}",
                    ports.join(", "),
                    addrs.join(", ")
                );
            }
        }
    }
    for (fam, v6) in [("ip", false), ("ip6", true)]
        .into_iter()
        .filter(|_| proxied)
    {
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
    if let Some(a) = agent {
        // By port: only the relay's connections (their socket mark) reach
        // the agent's credentials port — neighbours on its bridge (bridge
        // forward), routed callers and other host processes (bridge
        // output) are dropped (the bridge family cannot reject on hosts
        // without nft_reject_bridge) — and the relay's go nowhere else:
        // not to a container that took the agent's old address (F13
        // cannot be bypassed around the relay).
        let ports: Vec<String> = a.ports.iter().map(|p| quote(p)).collect();
        let ports = ports.join(", ");
        let _ = writeln!(out, "\tchain agent_forward {{");
        let _ = writeln!(
            out,
            "\t\ttype filter hook forward priority -300; policy accept;"
        );
        let _ = writeln!(out, "\t\toifname {{ {ports} }} tcp dport {} drop", a.port);
        let _ = writeln!(out, "\t}}");
        let _ = writeln!(out, "\tchain agent_output {{");
        let _ = writeln!(
            out,
            "\t\ttype filter hook output priority -300; policy accept;"
        );
        let _ = writeln!(
            out,
            "\t\toifname {{ {ports} }} tcp dport {} meta mark != 0x{RELAY_UPSTREAM_MARK:08x} drop",
            a.port
        );
        let _ = writeln!(
            out,
            "\t\tmeta mark 0x{RELAY_UPSTREAM_MARK:08x} oifname != {{ {ports} }} drop"
        );
        let _ = writeln!(out, "\t}}");
    }
    let _ = writeln!(out, "}}");
}
