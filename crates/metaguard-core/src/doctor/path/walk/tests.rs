//! The shared skeleton, driven by a scripted dialect: chains are lists of
//! outcomes, so each test pins one rule of the walk (jumps, gotos,
//! returns, uncertainty, NAT, policies, the depth limit) independently of
//! iptables and nft.

use super::*;
use crate::doctor::path::test_support::{from_bridge, from_host, host, ip, ruleset, save4};
use RuleOutcome::{Accept, Drop, Goto, Jump, Next, Reject, Return, Unsure};

/// A dialect whose rules are their outcomes; chain `i` is `chains[i]`.
#[derive(Debug)]
struct Scripted {
    chains: Vec<Vec<RuleOutcome<usize>>>,
    /// Chains whose policy drops.
    drops: Vec<usize>,
}

impl RuleDialect for Scripted {
    type Chain = usize;

    fn rule_count(&self, chain: usize) -> usize {
        self.chains[chain].len()
    }

    fn judge(&self, chain: usize, idx: usize, _p: &Packet, _depth: usize) -> RuleOutcome<usize> {
        self.chains[chain][idx].clone()
    }

    fn policy_drops(&self, chain: usize) -> bool {
        self.drops.contains(&chain)
    }

    fn rule_ref(&self, chain: usize, idx: Option<usize>, v6: bool) -> RuleRef {
        RuleRef {
            family: if v6 { "ip6" } else { "ip" }.into(),
            chain: format!("c{chain}"),
            position: idx.map(|i| i + 1),
            ..RuleRef::kernel(Hook::Forward, String::new())
        }
    }
}

fn script(chains: Vec<Vec<RuleOutcome<usize>>>) -> Scripted {
    Scripted {
        chains,
        drops: Vec::new(),
    }
}

/// Walks chain 0 of `d` from a bridge packet to 169.254.169.254.
fn walk0(d: &Scripted) -> (ChainEnd, Trace, Packet) {
    let st = host();
    let ns = Netns::host(&st);
    let mut p = from_bridge("169.254.169.254");
    let mut tr = Trace::default();
    let end = ns.run_chain(d, 0, &mut p, &mut tr);
    (end, tr, p)
}

/// `c1 #2`-style name of the rule an end names.
fn at(end: &ChainEnd) -> String {
    let r = match end {
        ChainEnd::Fallthrough => return "fallthrough".into(),
        ChainEnd::Accept(r) => ("accept", r),
        ChainEnd::Drop(r) => ("drop", r),
        ChainEnd::Reject(r) => ("reject", r),
    };
    match r.1.position {
        Some(p) => format!("{} {} #{p}", r.0, r.1.chain),
        None => format!("{} {} policy", r.0, r.1.chain),
    }
}

#[test]
fn first_terminal_rule_decides() {
    let d = script(vec![vec![Next, Reject, Drop]]);
    assert_eq!(at(&walk0(&d).0), "reject c0 #2");
}

#[test]
fn jump_fallthrough_continues_with_the_next_rule() {
    let d = script(vec![vec![Jump(1), Drop], vec![Next]]);
    assert_eq!(at(&walk0(&d).0), "drop c0 #2");
}

#[test]
fn jump_verdict_ends_the_caller_too() {
    let d = script(vec![vec![Jump(1), Drop], vec![Accept]]);
    assert_eq!(at(&walk0(&d).0), "accept c1 #1");
}

#[test]
fn return_ends_only_the_callee() {
    let d = script(vec![vec![Jump(1), Accept], vec![Return, Drop]]);
    assert_eq!(at(&walk0(&d).0), "accept c0 #2");
}

#[test]
fn goto_does_not_come_back() {
    let d = script(vec![vec![Goto(1), Drop], vec![Next]]);
    assert_eq!(at(&walk0(&d).0), "fallthrough");
}

#[test]
fn fallthrough_of_a_dropping_base_chain_is_its_policy() {
    let mut d = script(vec![vec![Jump(1)], vec![Next]]);
    d.drops = vec![0, 1];
    // Only the base chain's policy counts; a user chain just falls through.
    assert_eq!(at(&walk0(&d).0), "drop c0 policy");
}

#[test]
fn jump_loops_stop_at_the_depth_limit() {
    // c0 jumps to itself forever: the walk gives up and falls through.
    let d = script(vec![vec![Jump(0)]]);
    assert_eq!(at(&walk0(&d).0), "fallthrough");
}

#[test]
fn unsure_rules_never_decide_and_are_listed_when_they_would_have() {
    let d = script(vec![vec![
        Unsure { listed: true },
        Unsure { listed: false },
        Accept,
    ]]);
    let (end, tr, _) = walk0(&d);
    assert_eq!(at(&end), "accept c0 #3");
    let listed: Vec<_> = tr.uncertain.iter().map(|r| r.position).collect();
    assert_eq!(listed, [Some(1)]);
}

#[test]
fn dnat_rewrites_records_a_step_and_accepts() {
    let d = script(vec![vec![
        RuleOutcome::Dnat {
            addr: Some(ip("127.0.0.1")),
            port: Some(51679),
        },
        Drop,
    ]]);
    let (end, tr, p) = walk0(&d);
    assert_eq!(at(&end), "accept c0 #1");
    assert_eq!((p.dst, p.dport, p.dnat), (ip("127.0.0.1"), 51679, true));
    assert_eq!((p.orig_dst, p.orig_dport), (ip("169.254.169.254"), 80));
    let steps: Vec<_> = tr.steps.iter().map(|s| s.action.as_str()).collect();
    assert_eq!(steps, ["dnat to 127.0.0.1:51679"]);
}

#[test]
fn dnat_without_address_keeps_the_destination() {
    let d = script(vec![vec![RuleOutcome::Dnat {
        addr: None,
        port: Some(8080),
    }]]);
    let (_, tr, p) = walk0(&d);
    assert_eq!((p.dst, p.dport), (ip("169.254.169.254"), 8080));
    assert_eq!(tr.steps[0].action, "dnat to 169.254.169.254:8080");
}

#[test]
fn redirect_goes_to_the_incoming_interface_or_loopback() {
    let d = script(vec![vec![RuleOutcome::Redirect { port: Some(51679) }]]);
    let (_, tr, p) = walk0(&d);
    assert_eq!(p.dst, ip("172.17.0.1"), "docker0's address");
    assert_eq!(tr.steps[0].action, "redirect to 172.17.0.1:51679");

    let st = host();
    let mut p = from_host("169.254.170.2", "system.slice");
    let mut tr = Trace::default();
    let _ = Netns::host(&st).run_chain(&d, 0, &mut p, &mut tr);
    assert_eq!(p.dst, ip("127.0.0.1"), "locally generated: loopback");
}

#[test]
fn a_stopped_packet_still_records_accepts_of_later_base_chains() {
    // Two real base chains at forward: a drop at -10, an accept at 10.
    let mut st = host();
    st.nft = Some(ruleset(
        r#"{"table": {"family": "inet", "name": "a"}},
        {"chain": {"family": "inet", "table": "a", "name": "late", "hook": "forward", "prio": 10, "type": "filter", "policy": "accept"}},
        {"rule": {"family": "inet", "table": "a", "chain": "late", "handle": 2, "expr": [{"accept": null}]}},
        {"table": {"family": "inet", "name": "b"}},
        {"chain": {"family": "inet", "table": "b", "name": "early", "hook": "forward", "prio": -10, "type": "filter", "policy": "accept"}},
        {"rule": {"family": "inet", "table": "b", "chain": "early", "handle": 3, "expr": [{"drop": null}]}}"#,
    ));
    let mut p = from_bridge("169.254.169.254");
    let mut tr = Trace::default();
    let stop = Netns::host(&st).hook(Hook::Forward, &mut p, &mut tr);
    let (v, r) = stop.expect("stopped");
    assert_eq!((v, r.table.as_str()), (Verdict::TimesOut, "b"));
    let accepts: Vec<_> = tr.steps.iter().map(|s| s.rule.table.as_str()).collect();
    assert_eq!(accepts, ["a"], "the later table's accept is recorded (F3)");
}

#[test]
fn nat_base_chains_skip_established_and_loopback_reentry() {
    let mut st = host();
    st.legacy4 = Some(save4(
        "*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j DNAT --to-destination 127.0.0.1:51679\nCOMMIT\n",
    ));
    let ns = Netns::host(&st);
    let mut p = from_bridge("169.254.170.2");
    p.new = false;
    let _ = ns.hook(Hook::Prerouting, &mut p, &mut Trace::default());
    assert!(!p.dnat, "established: NAT chains do not run");
    let mut p = from_bridge("169.254.170.2");
    p.no_nat = true;
    let _ = ns.hook(Hook::Prerouting, &mut p, &mut Trace::default());
    assert!(!p.dnat, "loopback re-entry: NAT chains do not run");
    let mut p = from_bridge("169.254.170.2");
    let _ = ns.hook(Hook::Prerouting, &mut p, &mut Trace::default());
    assert!(p.dnat, "the first packet is NATed");
}

#[test]
fn nft_tables_leaves_out_what_iptables_nft_owns() {
    let mut st = host();
    st.iptnft4 = Some(save4("*filter\n:INPUT ACCEPT [0:0]\nCOMMIT\n"));
    st.nft = Some(ruleset(
        r#"{"table": {"family": "ip", "name": "filter"}},
        {"table": {"family": "ip6", "name": "filter"}},
        {"table": {"family": "inet", "name": "metaguard"}}"#,
    ));
    let names: Vec<_> = nft_tables(&st).into_iter().collect();
    assert_eq!(
        names,
        [
            ("inet".to_string(), "metaguard".to_string()),
            ("ip6".to_string(), "filter".to_string())
        ]
    );
}
