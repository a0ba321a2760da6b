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
