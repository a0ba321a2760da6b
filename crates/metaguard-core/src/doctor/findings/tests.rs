//! The evidence helper and the fix actions' command lines.

use super::evidence::Evidence;
use super::FixAction;
use crate::doctor::path::{Backend, Hook, RuleRef};

fn drop_rule(position: usize) -> RuleRef {
    RuleRef {
        backend: Backend::Legacy,
        family: "ip".into(),
        table: "filter".into(),
        chain: "INPUT".into(),
        hook: Hook::Input,
        position: Some(position),
        handle: None,
        rule: "-A INPUT -d 127.0.0.0/8 ! -i lo -j DROP".into(),
        netns: None,
        args: Vec::new(),
    }
}

#[test]
fn evidence_keeps_the_first_of_equal_lines_in_order() {
    let mut e = Evidence::default();
    assert!(e.is_empty());
    e.rule("but dropped by ", &drop_rule(2));
    e.line("a setting");
    e.rule("but dropped by ", &drop_rule(2));
    e.line("a setting");
    e.rule("", &drop_rule(3));
    assert_eq!(
        e.into_lines(),
        [
            "but dropped by iptables-legacy ip filter INPUT #2: -A INPUT -d 127.0.0.0/8 ! -i lo -j DROP",
            "a setting",
            "iptables-legacy ip filter INPUT #3: -A INPUT -d 127.0.0.0/8 ! -i lo -j DROP",
        ]
    );
}

#[test]
fn evidence_listing_keeps_every_listed_object() {
    let mut e = Evidence::listing(["container a".to_string(), "container a".to_string()]);
    e.line("container a");
    e.line("address missing");
    assert_eq!(
        e.into_lines(),
        ["container a", "container a", "address missing"]
    );
}

#[test]
fn fix_actions_spell_the_exact_command() {
    let ins = FixAction::IptablesInsert {
        backend: Backend::IptablesNft,
        family: "ip6".into(),
        table: "filter".into(),
        chain: "DOCKER-USER".into(),
        position: 1,
        args: ["-d", "fd00:ec2::254/128", "-j", "REJECT"]
            .map(String::from)
            .to_vec(),
        netns: None,
    };
    assert_eq!(
        ins.shell(),
        "ip6tables-nft -w -t filter -I DOCKER-USER 1 -d fd00:ec2::254/128 -j REJECT"
    );
    let nft = FixAction::NftInsert {
        family: "inet".into(),
        table: "t".into(),
        chain: "input".into(),
        before_handle: Some(4),
        rule: "iifname \"docker0\" accept".into(),
        netns: Some("/run/netns/x".into()),
    };
    assert_eq!(
        nft.shell(),
        "nsenter --net=/run/netns/x nft insert rule inet t input position 4 'iifname \"docker0\" accept'"
    );
    let route = FixAction::RouteAdd {
        v6: true,
        route: "blackhole fd00:ec2::254/128".into(),
        netns: None,
    };
    assert_eq!(
        route.argv(),
        ["ip", "-6", "route", "add", "blackhole", "fd00:ec2::254/128"]
    );
}

/// A host with docker0 (172.17.0.1/16) and eth0, forwarding on, and the
/// given extra snapshot files.
fn bridged_host(extra: &[(&str, &str)]) -> crate::doctor::snapshot::Snapshot {
    let mut files: std::collections::BTreeMap<String, String> = [
        ("ip-addr.json", r#"[{"ifname": "lo", "addr_info": [{"local": "127.0.0.1", "prefixlen": 8}]}, {"ifname": "eth0", "addr_info": [{"local": "10.0.0.10", "prefixlen": 24}]}, {"ifname": "docker0", "addr_info": [{"local": "172.17.0.1", "prefixlen": 16}]}]"#),
        ("ip-link.json", r#"[{"ifname": "lo"}, {"ifname": "eth0"}, {"ifname": "docker0", "linkinfo": {"info_kind": "bridge"}}]"#),
        ("ip-route.json", r#"[{"dst": "default", "gateway": "10.0.0.1", "dev": "eth0"}, {"dst": "10.0.0.0/24", "dev": "eth0"}, {"dst": "172.17.0.0/16", "dev": "docker0"}]"#),
        ("sysctl.txt", "net.ipv4.ip_forward = 1\n"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (k, v) in extra {
        files.insert((*k).to_string(), (*v).to_string());
    }
    crate::doctor::snapshot::Snapshot::parse(&files).expect("snapshot parses")
}

fn f14_of(snap: &crate::doctor::snapshot::Snapshot) -> Option<super::Finding> {
    let flows = crate::doctor::path::evaluate(snap);
    super::check(snap, &flows)
        .into_iter()
        .find(|f| f.id == "F14")
}

#[test]
fn f14_policy_drop_gets_a_reject_appended_for_the_endpoint() {
    let snap = bridged_host(&[(
        "iptables-nft-save.txt",
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n-A FORWARD -o docker0 -j ACCEPT\nCOMMIT\n",
    )]);
    let f = f14_of(&snap).expect("F14 for a FORWARD policy drop");
    assert!(f.evidence[0].contains("policy DROP"), "{:?}", f.evidence);
    match &f.fix.actions[..] {
        [FixAction::IptablesInsert {
            chain,
            position,
            args,
            ..
        }, ..] => {
            assert_eq!((chain.as_str(), *position), ("FORWARD", 2));
            assert_eq!(
                args.join(" "),
                "-d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j REJECT --reject-with icmp-admin-prohibited"
            );
        }
        other => panic!("unexpected actions {other:?}"),
    }
}

#[test]
fn f14_nft_drop_gets_the_same_matches_with_a_reject_before_it() {
    let snap = bridged_host(&[(
        "nft-ruleset.json",
        r#"{"nftables": [{"table": {"family": "inet", "name": "t", "handle": 1}}, {"chain": {"family": "inet", "table": "t", "name": "fwd", "handle": 2, "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}}, {"rule": {"family": "inet", "table": "t", "chain": "fwd", "handle": 5, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "169.254.169.254"}}, {"drop": null}]}}]}"#,
    )]);
    let f = f14_of(&snap).expect("F14 for an nft drop");
    match &f.fix.actions[..] {
        [FixAction::NftInsert {
            before_handle,
            rule,
            ..
        }] => {
            assert_eq!(*before_handle, Some(5));
            assert!(
                rule.ends_with("reject with icmpx type admin-prohibited") && !rule.contains("drop"),
                "{rule}"
            );
            assert!(rule.contains("169.254.169.254"), "{rule}");
        }
        other => panic!("unexpected actions {other:?}"),
    }
}

#[test]
fn f14_a_reject_is_not_a_slow_failure() {
    let snap = bridged_host(&[(
        "iptables-nft-save.txt",
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n-A FORWARD -d 169.254.169.254/32 -j REJECT --reject-with icmp-admin-prohibited\nCOMMIT\n",
    )]);
    assert!(f14_of(&snap).is_none());
}

#[test]
fn f14_tcp_reset_of_bridged_traffic_under_br_netfilter() {
    // The agent in a bridge container: credentials DNATed to it on docker0
    // (bridged, hairpin), then reset by a reject — lost under br_netfilter.
    let save = "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n-A PREROUTING -d 169.254.170.2/32 -i docker0 -p tcp -m tcp --dport 80 -j DNAT --to-destination 172.17.0.5:51679\nCOMMIT\n*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n-A FORWARD -d 172.17.0.5/32 -p tcp -j REJECT --reject-with tcp-reset\nCOMMIT\n";
    let quiet = bridged_host(&[("iptables-nft-save.txt", save)]);
    assert!(f14_of(&quiet).is_none(), "no br_netfilter: a reset arrives");
    let snap = bridged_host(&[
        ("iptables-nft-save.txt", save),
        (
            "sysctl.txt",
            "net.ipv4.ip_forward = 1\nnet.bridge.bridge-nf-call-iptables = 1\n",
        ),
    ]);
    let f = f14_of(&snap).expect("F14 for a bridged tcp reset");
    assert!(
        f.evidence.iter().any(|e| e.contains("the reset is lost")),
        "{:?}",
        f.evidence
    );
    match &f.fix.actions[..] {
        [FixAction::IptablesInsert { position, args, .. }] => {
            assert_eq!(*position, 1);
            assert_eq!(
                args.join(" "),
                "-d 172.17.0.5/32 -p tcp -j REJECT --reject-with icmp-admin-prohibited"
            );
        }
        other => panic!("unexpected actions {other:?}"),
    }
}
