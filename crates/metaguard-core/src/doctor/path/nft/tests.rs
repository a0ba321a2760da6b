//! The nftables dialect on nft JSON: matches (payload, meta, ct, socket
//! cgroupv2) against values, sets, maps and prefixes; verdict maps; NAT
//! statements; and what stays uncertain.

use super::super::model::{Backend, Hook, Packet, Verdict};
use super::super::test_support::{
    from_bridge, from_host, host, ip, place, ruleset, run_hook, save4, stopped_by, HookRun,
};
use crate::doctor::snapshot::NetState;

/// A host with one `inet t` table: chain `c` at `hook` (type `kind`,
/// policy `policy`), holding one rule per expression list in `rules`
/// (handles 1, 2, …), plus `extra` items (sets, user chains).
fn table(hook: &str, kind: &str, policy: &str, rules: &[&str], extra: &str) -> NetState {
    let mut items = vec![
        r#"{"table": {"family": "inet", "name": "t"}}"#.to_string(),
        format!(
            r#"{{"chain": {{"family": "inet", "table": "t", "name": "c", "hook": "{hook}", "prio": 0, "type": "{kind}", "policy": "{policy}"}}}}"#
        ),
    ];
    if !extra.is_empty() {
        items.push(extra.to_string());
    }
    for (i, expr) in rules.iter().enumerate() {
        items.push(format!(
            r#"{{"rule": {{"family": "inet", "table": "t", "chain": "c", "handle": {}, "expr": {expr}}}}}"#,
            i + 1
        ));
    }
    NetState {
        nft: Some(ruleset(&items.join(",\n"))),
        ..host()
    }
}

fn forward(rules: &[&str]) -> NetState {
    table("forward", "filter", "accept", rules, "")
}

const IMDS_DROP: &str = r#"[{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "169.254.169.254"}}, {"drop": null}]"#;

fn imds_packet() -> Packet {
    from_bridge("169.254.169.254")
}

#[test]
fn f4_daddr_drop_is_named_by_handle() {
    let run = run_hook(&forward(&[IMDS_DROP]), Hook::Forward, imds_packet());
    let (v, r) = run.stop.expect("dropped");
    assert_eq!(v, Verdict::TimesOut);
    assert_eq!(place(&r), (Backend::Nft, "inet", "t", "c"));
    assert_eq!((r.handle, r.position), (Some(1), None));
    assert_eq!(r.rule, "ip daddr 169.254.169.254 drop");
}

#[test]
fn f8_an_ip_match_never_matches_an_ipv6_packet_even_negated() {
    let st = forward(&[
        r#"[{"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "10.9.9.9"}}, {"drop": null}]"#,
    ]);
    let mut p = from_bridge("fd00:ec2::254");
    p.src = ip("fd00:d::2");
    assert!(run_hook(&st, Hook::Forward, p).stop.is_none());
    // …while it does match an IPv4 packet.
    assert!(run_hook(&st, Hook::Forward, imds_packet()).stop.is_some());
}

#[test]
fn named_and_anonymous_sets_and_prefixes() {
    let set = r#"{"set": {"family": "inet", "table": "t", "name": "imds", "type": "ipv4_addr", "elem": ["10.9.9.9", {"prefix": {"addr": "169.254.169.0", "len": 24}}]}}"#;
    let st = table(
        "forward",
        "filter",
        "accept",
        &[
            r#"[{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "@imds"}}, {"reject": null}]"#,
        ],
        set,
    );
    let run = run_hook(&st, Hook::Forward, imds_packet());
    assert_eq!(run.stop.map(|s| s.0), Some(Verdict::Blocked));

    let anon = forward(&[
        r#"[{"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": {"set": [22, {"range": [70, 90]}]}}}, {"drop": null}]"#,
    ]);
    assert!(run_hook(&anon, Hook::Forward, imds_packet()).stop.is_some());
    // A missing named set cannot be judged: uncertain, listed.
    let missing = forward(&[
        r#"[{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "@nope"}}, {"drop": null}]"#,
    ]);
    let run = run_hook(&missing, Hook::Forward, imds_packet());
    assert!(run.stop.is_none());
    assert_eq!(run.trace.uncertain.len(), 1);
}

#[test]
fn vmap_on_iifname_picks_the_verdict() {
    let st = forward(&[
        r#"[{"vmap": {"key": {"meta": {"key": "iifname"}}, "data": {"set": [["br-*", {"accept": null}], ["docker0", {"drop": null}]]}}}]"#,
    ]);
    let run = run_hook(&st, Hook::Forward, imds_packet());
    assert_eq!(run.stop.map(|s| s.0), Some(Verdict::TimesOut));
    let mut p = imds_packet();
    p.iif = Some("br-42".into());
    let run = run_hook(&st, Hook::Forward, p);
    assert!(run.stop.is_none());
    assert_eq!(run.trace.steps.len(), 1, "the wildcard's accept");
    let mut p = imds_packet();
    p.iif = Some("eth1".into());
    let run = run_hook(&st, Hook::Forward, p);
    assert!(
        run.stop.is_none() && run.trace.steps.is_empty(),
        "no element: nothing"
    );
}

#[test]
fn jump_return_and_goto_through_user_chains() {
    let user = r#"{"chain": {"family": "inet", "table": "t", "name": "u"}},
        {"rule": {"family": "inet", "table": "t", "chain": "u", "handle": 10, "expr": [{"return": null}]}},
        {"rule": {"family": "inet", "table": "t", "chain": "u", "handle": 11, "expr": [{"drop": null}]}}"#;
    // A base chain with policy drop: `verdict` to u, then accept.
    let via = |verdict: &str| {
        let first = format!(r#"[{{"{verdict}": {{"target": "u"}}}}]"#);
        let st = table(
            "forward",
            "filter",
            "drop",
            &[&first, r#"[{"accept": null}]"#],
            user,
        );
        run_hook(&st, Hook::Forward, imds_packet())
    };
    let run = via("jump");
    assert!(run.stop.is_none(), "return comes back; the accept follows");
    let run = via("goto");
    let (v, r) = run.stop.expect("the base policy");
    assert_eq!((v, r.rule.as_str()), (Verdict::TimesOut, "policy drop"));
}

#[test]
fn f1_dnat_applies_in_nat_base_chains_only() {
    let dnat = r#"[{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "169.254.170.2"}}, {"dnat": {"addr": "127.0.0.1", "port": 51679}}]"#;
    let nat = table("prerouting", "nat", "accept", &[dnat], "");
    let HookRun { trace, packet, .. } =
        run_hook(&nat, Hook::Prerouting, from_bridge("169.254.170.2"));
    assert_eq!(
        (packet.dst, packet.dport, packet.dnat),
        (ip("127.0.0.1"), 51679, true)
    );
    assert_eq!(trace.steps[0].action, "dnat to 127.0.0.1:51679");

    let filter = table("prerouting", "filter", "accept", &[dnat], "");
    let run = run_hook(&filter, Hook::Prerouting, from_bridge("169.254.170.2"));
    assert!(!run.packet.dnat, "a filter base chain ignores dnat");

    let bad = r#"[{"dnat": {"addr": {"map": {}}}}, {"accept": null}]"#;
    let run = run_hook(
        &table("prerouting", "nat", "accept", &[bad], ""),
        Hook::Prerouting,
        from_bridge("169.254.170.2"),
    );
    assert!(!run.packet.dnat);
    assert_eq!(run.trace.uncertain.len(), 1, "an address it cannot read");
}

#[test]
fn redirect_and_masquerade() {
    let st = table(
        "output",
        "nat",
        "accept",
        &[r#"[{"redirect": {"port": 51679}}]"#],
        "",
    );
    let run = run_hook(&st, Hook::Output, from_host("169.254.170.2", "docker/x"));
    assert_eq!((run.packet.dst, run.packet.dport), (ip("127.0.0.1"), 51679));
    assert_eq!(run.trace.steps[0].action, "redirect to 127.0.0.1:51679");

    let st = table(
        "postrouting",
        "nat",
        "drop",
        &[r#"[{"masquerade": null}]"#],
        "",
    );
    let run = run_hook(&st, Hook::Postrouting, imds_packet());
    assert!(run.stop.is_none(), "masquerade accepts");
}

#[test]
fn xt_and_unknown_keys_are_uncertain() {
    let st = forward(&[
        r#"[{"xt": {"type": "match", "name": "owner"}}, {"drop": null}]"#,
        r#"[{"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": 1}}, {"drop": null}]"#,
        r#"[{"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": 1}}, {"counter": null}]"#,
    ]);
    let run = run_hook(&st, Hook::Forward, imds_packet());
    assert!(run.stop.is_none());
    let listed: Vec<_> = run.trace.uncertain.iter().map(|r| r.handle).collect();
    assert_eq!(
        listed,
        [Some(1), Some(2)],
        "a counter-only rule decides nothing"
    );
}

#[test]
fn f7_socket_cgroupv2_matches_at_output_only() {
    let rule = r#"[{"match": {"op": "==", "left": {"socket": {"key": "cgroupv2", "level": 1}}, "right": "docker"}}, {"reject": null}]"#;
    let out = table("output", "filter", "accept", &[rule], "");
    let run = run_hook(
        &out,
        Hook::Output,
        from_host("169.254.169.254", "docker/abc"),
    );
    assert_eq!(run.stop.map(|s| s.0), Some(Verdict::Blocked));
    let run = run_hook(
        &out,
        Hook::Output,
        from_host("169.254.169.254", "system.slice/ecs"),
    );
    assert!(run.stop.is_none());
    // At forward the packet has no local socket: no match, not uncertain.
    let fwd = forward(&[rule]);
    let run = run_hook(&fwd, Hook::Forward, imds_packet());
    assert!(run.stop.is_none() && run.trace.uncertain.is_empty());
}

#[test]
fn f11_ct_state_and_status() {
    let st = forward(&[
        r#"[{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}}, {"accept": null}]"#,
        r#"[{"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}}, {"accept": null}]"#,
        IMDS_DROP,
    ]);
    let run = run_hook(&st, Hook::Forward, imds_packet());
    assert_eq!(run.stop.map(|s| s.1.handle), Some(Some(3)));
    let mut p = imds_packet();
    p.new = false;
    let run = run_hook(&st, Hook::Forward, p);
    assert_eq!(run.trace.steps[0].rule.handle, Some(1));
    let mut p = imds_packet();
    p.dnat = true;
    let run = run_hook(&st, Hook::Forward, p);
    assert_eq!(run.trace.steps[0].rule.handle, Some(2));
}

#[test]
fn f3_tables_run_by_priority_and_iptables_nft_tables_are_skipped() {
    // iptables-nft owns `ip filter`: its nft JSON is not evaluated again.
    let mut st = NetState {
        iptnft4: Some(save4("*filter\n:FORWARD ACCEPT [0:0]\nCOMMIT\n")),
        ..host()
    };
    st.nft = Some(ruleset(
        r#"{"table": {"family": "ip", "name": "filter"}},
        {"chain": {"family": "ip", "table": "filter", "name": "FORWARD", "hook": "forward", "prio": 0, "type": "filter", "policy": "drop"}}"#,
    ));
    let run = run_hook(&st, Hook::Forward, imds_packet());
    assert!(run.stop.is_none(), "{:?}", stopped_by(&run));
}
