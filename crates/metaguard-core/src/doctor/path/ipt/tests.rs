//! The iptables dialect on real iptables-save text: what each match and
//! target does to a packet, how rules are named, and that both backends'
//! tables run at their priorities.

use super::super::model::{Backend, Hook, Verdict};
use super::super::test_support::{
    from_bridge, from_host, host, ip, place, run_hook, save4, save6, stopped_by, HookRun,
};
use crate::doctor::snapshot::NetState;

/// A host whose legacy IPv4 tables are `save`.
fn legacy(save: &str) -> NetState {
    NetState {
        legacy4: Some(save4(save)),
        ..host()
    }
}

const CIS_INPUT: &str = "*filter
:INPUT ACCEPT [0:0]
-A INPUT -i lo -j ACCEPT
-A INPUT -d 127.0.0.0/8 ! -i lo -j DROP
COMMIT
";

#[test]
fn f2_cis_drop_decides_with_its_position_and_args() {
    let run = run_hook(&legacy(CIS_INPUT), Hook::Input, from_bridge("127.0.0.1"));
    let (v, r) = run.stop.expect("dropped");
    assert_eq!(v, Verdict::TimesOut);
    assert_eq!(place(&r), (Backend::Legacy, "ip", "filter", "INPUT"));
    assert_eq!(r.position, Some(2));
    assert_eq!(r.rule, "-A INPUT -d 127.0.0.0/8 ! -i lo -j DROP");
    assert_eq!(r.args, ["-d", "127.0.0.0/8", "!", "-i", "lo", "-j", "DROP"]);
}

#[test]
fn accept_ends_the_chain_and_is_a_step() {
    let mut p = from_host("127.0.0.1", "system.slice");
    p.iif = Some("lo".into());
    let run = run_hook(&legacy(CIS_INPUT), Hook::Input, p);
    assert!(run.stop.is_none());
    let steps: Vec<_> = run
        .trace
        .steps
        .iter()
        .map(|s| (s.action.as_str(), s.rule.position))
        .collect();
    assert_eq!(steps, [("accept", Some(1))]);
}

#[test]
fn reject_blocks_and_a_drop_policy_times_out() {
    let st = legacy(
        "*filter
:FORWARD DROP [0:0]
-A FORWARD -d 169.254.169.254/32 -j REJECT --reject-with icmp-admin-prohibited
COMMIT
",
    );
    let run = run_hook(&st, Hook::Forward, from_bridge("169.254.169.254"));
    assert_eq!(
        stopped_by(&run),
        Some((
            Verdict::Blocked,
            "-A FORWARD -d 169.254.169.254/32 -j REJECT --reject-with icmp-admin-prohibited".into()
        ))
    );
    let run = run_hook(&st, Hook::Forward, from_bridge("10.0.0.99"));
    let (v, r) = run.stop.expect("policy drops");
    assert_eq!(
        (v, r.rule.as_str(), r.position),
        (Verdict::TimesOut, "policy DROP", None)
    );
}

#[test]
fn f4_docker_user_jump_return_and_fallthrough() {
    let st = legacy(
        "*filter
:FORWARD ACCEPT [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
-A FORWARD -o docker0 -j ACCEPT
-A DOCKER-USER -d 10.9.9.9/32 -j DROP
-A DOCKER-USER -j RETURN
-A DOCKER-USER -d 169.254.169.254/32 -j DROP
COMMIT
",
    );
    // RETURN comes before the IMDS drop: the packet goes back to FORWARD.
    let run = run_hook(&st, Hook::Forward, from_bridge("169.254.169.254"));
    assert!(run.stop.is_none());
    let run = run_hook(&st, Hook::Forward, from_bridge("10.9.9.9"));
    let (_, r) = run.stop.expect("dropped in the user chain");
    assert_eq!((r.chain.as_str(), r.position), ("DOCKER-USER", Some(1)));
}

#[test]
fn goto_does_not_return_to_the_caller() {
    let st = legacy(
        "*filter
:FORWARD ACCEPT [0:0]
:GUARD - [0:0]
-A FORWARD -g GUARD
-A FORWARD -j DROP
-A GUARD -d 10.9.9.9/32 -j DROP
COMMIT
",
    );
    let run = run_hook(&st, Hook::Forward, from_bridge("169.254.169.254"));
    assert!(run.stop.is_none(), "{:?}", stopped_by(&run));
}

#[test]
fn f1_dnat_in_the_nat_table_rewrites_the_destination() {
    let st = legacy(
        "*nat
:PREROUTING ACCEPT [0:0]
-A PREROUTING -d 169.254.170.2/32 -i docker0 -p tcp -m tcp --dport 80 -j DNAT --to-destination 127.0.0.1:51679
COMMIT
",
    );
    let HookRun {
        stop,
        trace,
        packet,
    } = run_hook(&st, Hook::Prerouting, from_bridge("169.254.170.2"));
    assert!(stop.is_none());
    assert_eq!((packet.dst, packet.dport), (ip("127.0.0.1"), 51679));
    assert!(packet.dnat);
    let steps: Vec<_> = trace.steps.iter().map(|s| s.action.as_str()).collect();
    assert_eq!(steps, ["dnat to 127.0.0.1:51679"], "no second accept step");
    assert_eq!(trace.steps[0].rule.table, "nat");
}

#[test]
fn nat_targets_outside_the_nat_table_do_nothing() {
    let st = legacy(
        "*mangle
:PREROUTING ACCEPT [0:0]
-A PREROUTING -j DNAT --to-destination 127.0.0.1:51679
-A PREROUTING -j REDIRECT --to-ports 51679
COMMIT
",
    );
    let run = run_hook(&st, Hook::Prerouting, from_bridge("169.254.170.2"));
    assert!(!run.packet.dnat);
    assert!(run.trace.steps.is_empty());
}

#[test]
fn redirect_on_output_goes_to_loopback() {
    let st = legacy(
        "*nat
:OUTPUT ACCEPT [0:0]
-A OUTPUT -d 169.254.170.2/32 -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 51679
COMMIT
",
    );
    let run = run_hook(&st, Hook::Output, from_host("169.254.170.2", "docker/x"));
    assert_eq!((run.packet.dst, run.packet.dport), (ip("127.0.0.1"), 51679));
    assert_eq!(run.trace.steps[0].action, "redirect to 127.0.0.1:51679");
}

#[test]
fn opaque_matches_never_decide_and_are_listed() {
    let st = legacy(
        "*filter
:FORWARD ACCEPT [0:0]
-A FORWARD -m set --match-set blocked dst -j DROP
-A FORWARD -m owner --uid-owner 0 -j LOG
COMMIT
",
    );
    let run = run_hook(&st, Hook::Forward, from_bridge("169.254.169.254"));
    assert!(run.stop.is_none());
    let listed: Vec<_> = run.trace.uncertain.iter().map(|r| r.position).collect();
    assert_eq!(
        listed,
        [Some(1)],
        "a LOG rule would decide nothing: not listed"
    );
}

#[test]
fn f11_ctstate_splits_new_from_established() {
    let st = legacy(
        "*filter
:FORWARD ACCEPT [0:0]
-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -d 169.254.169.254/32 -j DROP
COMMIT
",
    );
    let run = run_hook(&st, Hook::Forward, from_bridge("169.254.169.254"));
    assert_eq!(run.stop.map(|s| s.1.position), Some(Some(2)));
    let mut p = from_bridge("169.254.169.254");
    p.new = false;
    let run = run_hook(&st, Hook::Forward, p);
    assert!(run.stop.is_none());
    assert_eq!(run.trace.steps[0].rule.position, Some(1));
}

#[test]
fn ctstatus_dnat_and_addrtype_local() {
    let st = legacy(
        "*filter
:INPUT ACCEPT [0:0]
-A INPUT -m conntrack --ctstate DNAT -j ACCEPT
-A INPUT -m addrtype --dst-type LOCAL -j DROP
COMMIT
",
    );
    let mut p = from_bridge("10.0.0.10");
    let run = run_hook(&st, Hook::Input, p.clone());
    assert_eq!(
        run.stop.map(|s| s.1.position),
        Some(Some(2)),
        "local address"
    );
    p.dnat = true;
    let run = run_hook(&st, Hook::Input, p);
    assert!(run.stop.is_none(), "DNATed: accepted first");
}

#[test]
fn negated_and_wildcard_interfaces_and_ports() {
    let st = legacy(
        "*filter
:FORWARD ACCEPT [0:0]
-A FORWARD ! -i br+ -p tcp -m multiport --dports 22,70:90 -j REJECT
COMMIT
",
    );
    let run = run_hook(&st, Hook::Forward, from_bridge("169.254.169.254"));
    assert_eq!(
        run.stop.map(|s| s.0),
        Some(Verdict::Blocked),
        "docker0 is not br+"
    );
    let mut p = from_bridge("169.254.169.254");
    p.iif = Some("br-1234".into());
    assert!(run_hook(&st, Hook::Forward, p).stop.is_none());
}

#[test]
fn both_backends_run_in_priority_order() {
    // legacy mangle (-150) drops before iptables-nft filter (0) accepts;
    // the accept is still recorded (F3).
    let st = NetState {
        legacy4: Some(save4(
            "*mangle\n:FORWARD ACCEPT [0:0]\n-A FORWARD -d 169.254.169.254/32 -j DROP\nCOMMIT\n",
        )),
        iptnft4: Some(save4(
            "*filter\n:FORWARD ACCEPT [0:0]\n-A FORWARD -j ACCEPT\nCOMMIT\n",
        )),
        ..host()
    };
    let run = run_hook(&st, Hook::Forward, from_bridge("169.254.169.254"));
    let (_, r) = run.stop.expect("dropped");
    assert_eq!((r.backend, r.table.as_str()), (Backend::Legacy, "mangle"));
    let accepts: Vec<_> = run.trace.steps.iter().map(|s| s.rule.backend).collect();
    assert_eq!(accepts, [Backend::IptablesNft]);
}

#[test]
fn ipv6_rules_are_named_ip6() {
    let st = NetState {
        legacy6: Some(save6(
            "*filter\n:FORWARD ACCEPT [0:0]\n-A FORWARD -d fd00:ec2::254/128 -j DROP\nCOMMIT\n",
        )),
        ..host()
    };
    let mut p = from_bridge("fd00:ec2::254");
    p.src = ip("fd00:d::2");
    let run = run_hook(&st, Hook::Forward, p);
    assert_eq!(run.stop.map(|s| s.1.family), Some("ip6".to_string()));
    // The IPv4 file does not see IPv6 packets, nor the reverse.
    let run = run_hook(&st, Hook::Forward, from_bridge("169.254.169.254"));
    assert!(run.stop.is_none());
}
