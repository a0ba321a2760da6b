//! The three-valued logic's truth tables, and how rules and flows are
//! named in the report.

use super::*;

const ALL: [Truth; 3] = [Truth::Yes, Truth::No, Truth::Maybe];

#[test]
fn truth_and_is_kleene_conjunction() {
    for a in ALL {
        for b in ALL {
            let want = if a == Truth::No || b == Truth::No {
                Truth::No
            } else if a == Truth::Maybe || b == Truth::Maybe {
                Truth::Maybe
            } else {
                Truth::Yes
            };
            assert_eq!(a.and(b), want, "{a:?} and {b:?}");
        }
    }
}

#[test]
fn truth_or_is_kleene_disjunction_and_not_keeps_maybe() {
    for a in ALL {
        for b in ALL {
            // De Morgan holds in Kleene logic.
            assert_eq!(a.or(b), !((!a).and(!b)), "{a:?} or {b:?}");
        }
    }
    assert_eq!(!Truth::Yes, Truth::No);
    assert_eq!(!Truth::No, Truth::Yes);
    assert_eq!(!Truth::Maybe, Truth::Maybe);
    assert_eq!(Truth::from(true), Truth::Yes);
    assert_eq!(Truth::from(false), Truth::No);
}

fn iptables_rule() -> RuleRef {
    RuleRef {
        backend: Backend::IptablesNft,
        family: "ip".into(),
        table: "filter".into(),
        chain: "INPUT".into(),
        hook: Hook::Input,
        position: Some(2),
        handle: None,
        rule: "-A INPUT -d 127.0.0.0/8 ! -i lo -j DROP".into(),
        netns: None,
        args: Vec::new(),
    }
}

#[test]
fn rule_ref_describe_names_backend_table_chain_and_place() {
    assert_eq!(
        iptables_rule().describe(),
        "iptables-nft ip filter INPUT #2: -A INPUT -d 127.0.0.0/8 ! -i lo -j DROP"
    );
    let nft = RuleRef {
        backend: Backend::Nft,
        family: "inet".into(),
        table: "metaguard".into(),
        chain: "forward".into(),
        position: None,
        handle: Some(9),
        rule: "ip daddr 169.254.169.254 drop".into(),
        netns: Some("/run/netns/task".into()),
        ..iptables_rule()
    };
    assert_eq!(
        nft.describe(),
        "nft inet metaguard forward handle 9 [netns /run/netns/task]: ip daddr 169.254.169.254 drop"
    );
    let kernel = RuleRef::kernel(Hook::Routing, "blackhole route default".into());
    assert_eq!(
        kernel.describe(),
        "kernel (routing): blackhole route default"
    );
}

#[test]
fn sockaddr_brackets_ipv6() {
    let v4: IpAddr = Ipv4Addr::new(169, 254, 169, 254).into();
    let v6: IpAddr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254).into();
    assert_eq!(sockaddr(v4, 80), "169.254.169.254:80");
    assert_eq!(sockaddr(v6, 80), "[fd00:ec2::254]:80");
}

#[test]
fn decider_falls_back_to_the_last_accept() {
    let accept = |position| Step {
        action: "accept".into(),
        rule: RuleRef {
            position: Some(position),
            ..iptables_rule()
        },
    };
    let tr = Trace {
        steps: vec![accept(1), accept(2)],
        uncertain: Vec::new(),
    };
    assert_eq!(tr.decider(None).and_then(|r| r.position), Some(2));
    assert_eq!(
        tr.decider(Some(RuleRef {
            position: Some(7),
            ..iptables_rule()
        }))
        .and_then(|r| r.position),
        Some(7),
        "an explicit decider wins"
    );
    assert_eq!(Trace::default().decider(None), None);
}

#[test]
fn first_packet_starts_new_and_unrewritten() {
    let p = Packet::first(
        Ipv4Addr::new(172, 17, 0, 2).into(),
        Ipv4Addr::new(169, 254, 170, 2).into(),
        80,
        Some("docker0".into()),
        None,
    );
    assert!(p.new && !p.dnat && !p.no_nat && !p.v6());
    assert_eq!((p.orig_dst, p.orig_dport), (p.dst, p.dport));
    assert_eq!(p.sport, 40000);
}
