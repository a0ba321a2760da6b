//! The kernel's part of the path: route lookup and its failures,
//! martians, forwarding, unanswered local services, and the order of
//! hooks for entering and locally generated packets.

use super::*;
use crate::doctor::path::model::Trace;
use crate::doctor::path::test_support::{from_bridge, from_host, host, ip, route, save4};

/// Runs the path of a packet that enters the host on its `iif`.
fn enter(st: &NetState, mut p: Packet, local_service: bool) -> (Verdict, Option<RuleRef>, Packet) {
    let (v, d) = settle(Netns::host(st).enter(&mut p, &mut Trace::default(), local_service));
    (v, d, p)
}

/// Runs the path of a locally generated packet.
fn local_out(
    st: &NetState,
    mut p: Packet,
    local_service: bool,
) -> (Verdict, Option<RuleRef>, Packet) {
    let (v, d) = settle(Netns::host(st).local_out(&mut p, &mut Trace::default(), local_service));
    (v, d, p)
}

fn said(d: &Option<RuleRef>) -> &str {
    d.as_ref().map_or("", |r| r.rule.as_str())
}

#[test]
fn longest_prefix_wins_and_a_blackhole_blocks() {
    let mut st = host();
    st.routes4
        .push(route("169.254.169.254/32", None, "blackhole"));
    let ns = Netns::host(&st);
    assert_eq!(
        ns.lookup(ip("169.254.169.254")).map(|r| r.kind.as_str()),
        Some("blackhole")
    );
    assert_eq!(
        ns.lookup(ip("169.254.169.253"))
            .and_then(|r| r.dev.as_deref()),
        Some("eth0"),
        "the default route"
    );
    let (v, d, _) = enter(&st, from_bridge("169.254.169.254"), false);
    assert_eq!(
        (v, said(&d)),
        (Verdict::Blocked, "blackhole route 169.254.169.254/32")
    );
}

#[test]
fn no_route_is_network_unreachable() {
    let st = NetState {
        routes4: Vec::new(),
        ..host()
    };
    let (v, d, _) = enter(&st, from_bridge("169.254.169.254"), false);
    assert_eq!(
        (v, said(&d)),
        (
            Verdict::Blocked,
            "no route to 169.254.169.254 (network unreachable)"
        )
    );
}

#[test]
fn forwarding_reaches_and_sets_the_outgoing_interface() {
    let (v, d, p) = enter(&host(), from_bridge("169.254.169.254"), false);
    assert_eq!((v, d), (Verdict::Reaches, None));
    assert_eq!(p.oif.as_deref(), Some("eth0"));
}

#[test]
fn forwarding_off_times_out() {
    let mut st = host();
    st.sysctls.insert("net.ipv4.ip_forward".into(), "0".into());
    let (v, d, _) = enter(&st, from_bridge("169.254.169.254"), false);
    assert_eq!(
        (v, said(&d)),
        (
            Verdict::TimesOut,
            "net.ipv4.ip_forward=0: the host does not forward"
        )
    );
}

const DNAT_TO_AGENT: &str = "*nat
:PREROUTING ACCEPT [0:0]
-A PREROUTING -d 169.254.170.2/32 -p tcp -j DNAT --to-destination 127.0.0.1:51679
COMMIT
";

#[test]
fn f1_loopback_from_a_bridge_is_a_martian_unless_route_localnet() {
    let mut st = NetState {
        legacy4: Some(save4(DNAT_TO_AGENT)),
        ..host()
    };
    let (v, d, _) = enter(&st, from_bridge("169.254.170.2"), true);
    assert_eq!(v, Verdict::TimesOut);
    assert!(
        said(&d).starts_with("martian: 127.0.0.1:51679 arrived on docker0"),
        "{}",
        said(&d)
    );

    st.sysctls
        .insert("net.ipv4.conf.docker0.route_localnet".into(), "1".into());
    let (v, d, p) = enter(&st, from_bridge("169.254.170.2"), true);
    assert_eq!((v, d), (Verdict::Reaches, None));
    assert_eq!(p.dst, ip("127.0.0.1"));
}

#[test]
fn a_local_service_nothing_rewrote_goes_unanswered() {
    let (v, d, _) = enter(&host(), from_bridge("169.254.170.2"), true);
    assert_eq!(v, Verdict::TimesOut);
    assert_eq!(
        said(&d),
        "169.254.170.2:80 is not local and nothing rewrote it: the packet leaves through eth0, where nothing answers"
    );
    let (v, d, _) = local_out(&host(), from_host("169.254.170.2", "docker/x"), true);
    assert_eq!(v, Verdict::TimesOut);
    assert!(said(&d).contains("nothing redirected it"), "{}", said(&d));
}

#[test]
fn local_out_redirected_to_loopback_reenters_on_lo_without_nat() {
    let st = NetState {
        legacy4: Some(save4(
            "*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A PREROUTING -j DNAT --to-destination 10.9.9.9:1
-A OUTPUT -d 169.254.170.2/32 -p tcp -j REDIRECT --to-ports 51679
COMMIT
*filter
:INPUT ACCEPT [0:0]
-A INPUT ! -i lo -j DROP
COMMIT
",
        )),
        ..host()
    };
    let (v, d, p) = local_out(&st, from_host("169.254.170.2", "docker/x"), true);
    assert_eq!((v, d), (Verdict::Reaches, None));
    assert_eq!(
        (p.dst, p.dport),
        (ip("127.0.0.1"), 51679),
        "PREROUTING's DNAT skipped"
    );
    assert_eq!(
        (p.iif.as_deref(), p.oif.as_deref()),
        (Some("lo"), Some("lo"))
    );
    assert!(p.no_nat && p.cgroup.is_none());
}

#[test]
fn local_out_is_stopped_at_output() {
    let st = NetState {
        legacy4: Some(save4(
            "*filter\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -d 169.254.169.254/32 -j REJECT\nCOMMIT\n",
        )),
        ..host()
    };
    let (v, d, _) = local_out(&st, from_host("169.254.169.254", "docker/x"), false);
    assert_eq!(
        (v, d.map(|r| r.hook)),
        (Verdict::Blocked, Some(Hook::Output))
    );
}

#[test]
fn source_address_is_the_route_device_address_link_local_aside() {
    let mut st = host();
    st.addrs.insert(
        0,
        crate::doctor::snapshot::Addr {
            ifname: "eth0".into(),
            addr: ip("fe80::1"),
            prefix: 64,
        },
    );
    let ns = Netns::host(&st);
    assert_eq!(host_src(&ns, ip("169.254.169.254")), Some(ip("10.0.0.10")));
    assert_eq!(host_src(&ns, ip("fd00:ec2::254")), Some(ip("fd00::10")));
    assert_eq!(iface_addr(&st, "docker1", false), None);
    assert!(ns.is_local(ip("127.8.8.8")) && ns.is_local(ip("::1")));
    assert!(ns.is_local(ip("172.17.0.1")) && !ns.is_local(ip("172.17.0.2")));
}

#[test]
fn route_text_names_kind_and_destination() {
    assert_eq!(
        route_text(&route("default", None, "unreachable")),
        "unreachable route default"
    );
    assert!(is_reject_route(&route("default", None, "prohibit")));
    assert!(!is_reject_route(&route("default", Some("eth0"), "unicast")));
}
