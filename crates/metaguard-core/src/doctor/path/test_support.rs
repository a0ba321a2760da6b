//! Builders the path unit tests share: a small host (eth0, docker0, lo,
//! routes, forwarding on), rulesets from iptables-save text or nft JSON,
//! packets, and a walk of one hook or one whole path.

use std::net::IpAddr;

use super::super::iptables_save::{self, Cidr, Family, Save};
use super::super::nft;
use super::super::snapshot::{Addr, NetState, Route};
use super::model::{Backend, Hook, Packet, RuleRef, Trace, Verdict};
use super::walk::Netns;

/// An address (`"10.0.0.5"`) or a panic naming it.
pub(super) fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address parses")
}

/// An IPv4 iptables-save file.
pub(super) fn save4(text: &str) -> Save {
    iptables_save::parse(text, Family::Ip).expect("iptables-save text parses")
}

/// An IPv6 iptables-save file.
pub(super) fn save6(text: &str) -> Save {
    iptables_save::parse(text, Family::Ip6).expect("ip6tables-save text parses")
}

/// An nft ruleset from the `nftables` array's items, written as JSON.
pub(super) fn ruleset(items: &str) -> nft::Ruleset {
    nft::parse(&format!("{{\"nftables\": [{items}]}}")).expect("nft JSON parses")
}

/// A route: `dst` is `default` or a prefix, `kind` `unicast`, `blackhole`, ….
pub(super) fn route(dst: &str, dev: Option<&str>, kind: &str) -> Route {
    Route {
        dst: if dst == "default" {
            None
        } else {
            Some(Cidr::parse(dst).expect("test prefix parses"))
        },
        dev: dev.map(str::to_string),
        gateway: None,
        kind: kind.to_string(),
    }
}

fn addr(ifname: &str, a: &str, prefix: u8) -> Addr {
    Addr {
        ifname: ifname.into(),
        addr: ip(a),
        prefix,
    }
}

/// A host: lo (127.0.0.1, ::1), eth0 (10.0.0.10, fd00::10), docker0
/// (172.17.0.1, fd00:d::1); a default route out of eth0 in both families
/// and the bridge's subnet; forwarding on; no rules.
pub(super) fn host() -> NetState {
    let mut st = NetState {
        addrs: vec![
            addr("lo", "127.0.0.1", 8),
            addr("lo", "::1", 128),
            addr("eth0", "10.0.0.10", 24),
            addr("eth0", "fd00::10", 64),
            addr("docker0", "172.17.0.1", 16),
            addr("docker0", "fd00:d::1", 64),
        ],
        routes4: vec![
            route("default", Some("eth0"), "unicast"),
            route("10.0.0.0/24", Some("eth0"), "unicast"),
            route("172.17.0.0/16", Some("docker0"), "unicast"),
        ],
        routes6: vec![
            route("default", Some("eth0"), "unicast"),
            route("fd00:d::/64", Some("docker0"), "unicast"),
        ],
        ..NetState::default()
    };
    st.sysctls.insert("net.ipv4.ip_forward".into(), "1".into());
    st.sysctls
        .insert("net.ipv6.conf.all.forwarding".into(), "1".into());
    st
}

/// The first packet of a connection from a container on docker0
/// (172.17.0.2) to `dst:80`.
pub(super) fn from_bridge(dst: &str) -> Packet {
    Packet::first(ip("172.17.0.2"), ip(dst), 80, Some("docker0".into()), None)
}

/// The first packet of a connection a host process in `cgroup` opens
/// to `dst:80`.
pub(super) fn from_host(dst: &str, cgroup: &str) -> Packet {
    Packet::first(ip("10.0.0.10"), ip(dst), 80, None, Some(cgroup.into()))
}

/// What running the base chains at one hook did.
#[derive(Debug)]
pub(super) struct HookRun {
    /// `Some` when the packet was stopped.
    pub(super) stop: Option<(Verdict, RuleRef)>,
    pub(super) trace: Trace,
    pub(super) packet: Packet,
}

/// Runs every base chain of `st` at `hook` on `p`.
pub(super) fn run_hook(st: &NetState, hook: Hook, mut p: Packet) -> HookRun {
    let mut trace = Trace::default();
    let stop = Netns::host(st).hook(hook, &mut p, &mut trace);
    HookRun {
        stop,
        trace,
        packet: p,
    }
}

/// The rule text of what stopped the packet, or `None`.
pub(super) fn stopped_by(run: &HookRun) -> Option<(Verdict, String)> {
    run.stop.as_ref().map(|(v, r)| (*v, r.rule.clone()))
}

/// Where a rule lives: backend, family, table, chain.
pub(super) fn place(r: &RuleRef) -> (Backend, &str, &str, &str) {
    (r.backend, &r.family, &r.table, &r.chain)
}
