//! The reach-around flows: martian with route_localnet=0, delivered with
//! route_localnet=1, stopped by the `ct status dnat` guard (both iptables
//! dialects) or a CIS drop, while DNATed credentials still pass the guard.

use std::collections::BTreeMap;

use super::*;
use crate::config::Config;
use crate::doctor::path::evaluate;
use crate::doctor::path::model::Verdict;
use crate::doctor::path::test_support::{host, save4};
use crate::doctor::snapshot::{Docker, Link, NetState};

fn snapshot(mut host: NetState, route_localnet: &str) -> Snapshot {
    host.links = vec![Link {
        name: "docker0".into(),
        kind: Some("bridge".into()),
        master: None,
    }];
    host.sysctls.insert(
        "net.ipv4.conf.all.route_localnet".into(),
        route_localnet.into(),
    );
    Snapshot {
        host,
        ecs_config: BTreeMap::new(),
        docker: Docker::default(),
        cgroup: None,
        boot: None,
        imds_options: None,
        probes: None,
        ethtool: Default::default(),
        config: Config::builtin_default(),
        tasks: Vec::new(),
    }
}

const ECS_INIT_NAT: &str = "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n-A PREROUTING -d 169.254.170.2/32 -i docker0 -p tcp -m tcp --dport 80 -j DNAT --to-destination 127.0.0.1:51679\nCOMMIT\n";

fn with_filter(filter_rules: &str) -> NetState {
    let text = format!("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n-A FORWARD -d 169.254.169.254/32 -j REJECT --reject-with icmp-admin-prohibited\n{filter_rules}COMMIT\n{ECS_INIT_NAT}");
    NetState {
        iptnft4: Some(save4(&text)),
        ..host()
    }
}

fn only(flows: &[Flow]) -> &Flow {
    assert_eq!(flows.len(), 1, "{flows:?}");
    &flows[0]
}

#[test]
fn f17_martian_without_route_localnet() {
    let snap = snapshot(with_filter(""), "0");
    let f = loopback_flows(&snap);
    let f = only(&f);
    assert_eq!(f.verdict, Verdict::TimesOut);
    assert_eq!(f.destination, "127.0.0.1:51679");
    assert!(f
        .decided_by
        .as_ref()
        .is_some_and(|d| d.rule.starts_with("martian")));
}

#[test]
fn f17_reaches_with_route_localnet_and_no_guard() {
    let snap = snapshot(with_filter(""), "1");
    let f = loopback_flows(&snap);
    let f = only(&f);
    assert_eq!(f.verdict, Verdict::Reaches);
    assert_eq!(f.interface.as_deref(), Some("docker0"));
    assert_eq!(f.source, Source::BridgeContainer);
}

#[test]
fn f17_ct_status_dnat_guard_stops_direct_but_not_dnat() {
    let snap = snapshot(
        with_filter("-A INPUT -d 127.0.0.0/8 ! -i lo -m conntrack ! --ctstate DNAT -j DROP\n"),
        "1",
    );
    let f = loopback_flows(&snap);
    assert_eq!(only(&f).verdict, Verdict::TimesOut);
    let creds = evaluate(&snap)
        .into_iter()
        .find(|f| f.source == Source::BridgeContainer && f.target == TargetKind::TaskCredentials)
        .expect("credentials flow");
    assert_eq!(creds.verdict, Verdict::Reaches, "{creds:?}");
}

#[test]
fn f17_cis_drop_also_stops_direct() {
    let snap = snapshot(
        with_filter("-A INPUT -d 127.0.0.0/8 ! -i lo -j DROP\n"),
        "1",
    );
    assert_eq!(only(&loopback_flows(&snap)).verdict, Verdict::TimesOut);
}

#[test]
fn f17_nft_ct_status_dnat_guard() {
    let mut st = with_filter("");
    st.nft = Some(crate::doctor::path::test_support::ruleset(
        r#"{"table": {"family": "inet", "name": "g", "handle": 1}},
        {"chain": {"family": "inet", "table": "g", "name": "input", "handle": 1, "type": "filter", "hook": "input", "prio": 0, "policy": "accept"}},
        {"rule": {"family": "inet", "table": "g", "chain": "input", "handle": 2, "expr": [
          {"match": {"op": "!=", "left": {"meta": {"key": "iifname"}}, "right": "lo"}},
          {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": {"prefix": {"addr": "127.0.0.0", "len": 8}}}},
          {"match": {"op": "!=", "left": {"ct": {"key": "status"}}, "right": "dnat"}},
          {"drop": null}]}}"#,
    ));
    let snap = snapshot(st, "1");
    let f = loopback_flows(&snap);
    let f = only(&f);
    assert_eq!(f.verdict, Verdict::TimesOut, "{f:?}");
    assert_eq!(
        f.decided_by.as_ref().map(|d| d.backend),
        Some(super::super::Backend::Nft)
    );
}

/// The credentials-path ids (the test host has no IPv6 guard: F8 is not
/// what these tests are about).
fn ids(snap: &Snapshot) -> Vec<&'static str> {
    crate::doctor::findings::check(snap, &evaluate(snap))
        .iter()
        .map(|f| f.id)
        .filter(|id| matches!(*id, "F1" | "F2" | "F17"))
        .collect()
}

#[test]
fn f17_finding_and_its_fix_closes_it() {
    let snap = snapshot(with_filter(""), "1");
    let findings = crate::doctor::findings::check(&snap, &evaluate(&snap));
    let f17 = findings.iter().find(|f| f.id == "F17").expect("F17 named");
    assert_eq!(f17.fix.commands, ["iptables-nft -w -t filter -I INPUT 1 -d 127.0.0.0/8 '!' -i lo -m conntrack '!' --ctstate DNAT -j DROP"]);
    let guarded = snapshot(
        with_filter("-A INPUT -d 127.0.0.0/8 ! -i lo -m conntrack ! --ctstate DNAT -j DROP\n"),
        "1",
    );
    assert!(ids(&guarded).is_empty(), "{:?}", ids(&guarded));
}

#[test]
fn f1_fix_puts_the_f17_guard_first() {
    let snap = snapshot(with_filter(""), "0");
    assert_eq!(ids(&snap), ["F1"]);
    let findings = crate::doctor::findings::check(&snap, &evaluate(&snap));
    let cmds = &findings[0].fix.commands;
    assert_eq!(cmds.len(), 2, "{cmds:?}");
    assert!(cmds[0].contains("--ctstate DNAT -j DROP"), "{cmds:?}");
    assert_eq!(cmds[1], "sysctl -w net.ipv4.conf.all.route_localnet=1");
    // With the guard in place the fix is the sysctl alone.
    let guarded = snapshot(
        with_filter("-A INPUT -d 127.0.0.0/8 ! -i lo -m conntrack ! --ctstate DNAT -j DROP\n"),
        "0",
    );
    let findings = crate::doctor::findings::check(&guarded, &evaluate(&guarded));
    assert_eq!(
        findings[0].fix.commands,
        ["sysctl -w net.ipv4.conf.all.route_localnet=1"]
    );
}

#[test]
fn new_findings_are_the_ids_a_fix_opened() {
    use crate::doctor::{analyze, new_findings};
    let before = analyze(&snapshot(with_filter(""), "0"), "a");
    let after = analyze(&snapshot(with_filter(""), "1"), "b");
    assert_eq!(new_findings(&before, &after), ["F17"]);
    assert!(new_findings(&after, &after).is_empty());
}
