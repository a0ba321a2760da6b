use super::*;
use proptest::prelude::*;
use std::net::{SocketAddrV4, SocketAddrV6};

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

fn default_policy() -> ExecPolicy {
    ExecPolicy::from_args(&ExecPolicyArgs::default()).expect("defaults")
}

#[test]
fn parses_every_spelling() {
    let cases = [
        ("169.254.169.254", "169.254.169.254", 32, None),
        ("169.254.0.0/16", "169.254.0.0", 16, None),
        ("169.254.170.2:80", "169.254.170.2", 32, Some(80)),
        ("169.254.0.0/16:443", "169.254.0.0", 16, Some(443)),
        ("fd00:ec2::254", "fd00:ec2::254", 128, None),
        ("fe80::/10", "fe80::", 10, None),
        ("[fd00:ec2::254]", "fd00:ec2::254", 128, None),
        ("[fd00:ec2::254]:80", "fd00:ec2::254", 128, Some(80)),
        ("[fd00:ec2::/32]:80", "fd00:ec2::", 32, Some(80)),
        ("[fd00:ec2::]/32:80", "fd00:ec2::", 32, Some(80)),
        ("[fd00:ec2::]/32", "fd00:ec2::", 32, None),
        (" 10.0.0.1 ", "10.0.0.1", 32, None),
        // IPv4-mapped rules are IPv4 rules.
        ("::ffff:169.254.169.254", "169.254.169.254", 32, None),
        ("::ffff:169.254.0.0/112", "169.254.0.0", 16, None),
    ];
    for (text, addr, prefix, port) in cases {
        let r = Rule::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(r.addr(), addr.parse::<IpAddr>().expect("ip"), "{text}");
        assert_eq!(r.prefix(), prefix, "{text}");
        assert_eq!(r.port(), port, "{text}");
    }
}

#[test]
fn refuses_bad_rules_with_the_reason() {
    let cases = [
        ("", "empty rule"),
        ("metadata", "not an IPv4 or IPv6 address"),
        (
            "169.254.169.254/33",
            "prefix \"33\" is not a number from 0 to 32",
        ),
        ("fe80::/129", "from 0 to 128"),
        ("169.254.169.254/16", "did you mean 169.254.0.0/16"),
        ("169.254.169.254:0", "port \"0\""),
        ("169.254.169.254:65536", "port \"65536\""),
        ("169.254.169.254:http", "port \"http\""),
        ("169.254.169.254:", "port \"\""),
        ("[fd00:ec2::254", "brackets"),
        ("[fd00:ec2::254]80", "brackets"),
        ("[fd00::/8]/16", "brackets"),
        ("1.2.3", "not an IPv4"),
        ("169.254.169.254/-1", "prefix"),
    ];
    for (text, want) in cases {
        let e = Rule::parse(text).expect_err(text).to_string();
        assert!(e.contains(want), "{text}: {e}");
        assert!(e.contains(&format!("{text:?}")), "names the input: {e}");
    }
}

#[test]
fn default_list_denies_every_metadata_endpoint_on_every_port() {
    let p = default_policy();
    for dest in [
        "169.254.169.254:80",
        "169.254.169.254:8080",
        "[fd00:ec2::254]:80",
        "169.254.170.2:80",
        "169.254.170.23:80",
        "[fd00:ec2::23]:80",
        "169.254.170.2:1",
    ] {
        assert!(matches!(p.decide(sa(dest)), Decision::Deny(_)), "{dest}");
    }
    for dest in [
        "127.0.0.1:51679",
        "10.0.0.1:8080",
        "169.254.172.1:80",
        "[::1]:80",
        "[fd00:ec2::255]:80",
    ] {
        assert_eq!(p.decide(sa(dest)), Decision::Allow, "{dest}");
    }
}

#[test]
fn f12_ipv4_mapped_compat_and_nat64_spellings_are_denied() {
    let p = default_policy();
    for dest in [
        "[::ffff:169.254.169.254]:80",
        "[::ffff:a9fe:aa02]:80",
        "[::169.254.169.254]:80",
        "[64:ff9b::169.254.170.2]:80",
    ] {
        assert!(matches!(p.decide(sa(dest)), Decision::Deny(_)), "{dest}");
    }
    // `::1` and `::` are not IPv4-compatible addresses.
    assert_eq!(candidates("::1".parse().expect("ip")).len(), 1);
}

#[test]
fn allow_wins_and_can_name_one_port() {
    let p = ExecPolicy::from_args(&ExecPolicyArgs {
        allow: vec!["169.254.170.2:80".into()],
        deny: vec!["10.0.0.0/8".into(), "[fd00:10::/64]:8080".into()],
        deny_link_local: false,
    })
    .expect("policy");
    assert_eq!(p.decide(sa("169.254.170.2:80")), Decision::Allow);
    assert_eq!(p.decide(sa("[::ffff:169.254.170.2]:80")), Decision::Allow);
    assert!(matches!(
        p.decide(sa("169.254.170.2:81")),
        Decision::Deny(_)
    ));
    assert!(matches!(p.decide(sa("10.1.2.3:22")), Decision::Deny(_)));
    assert!(matches!(
        p.decide(sa("[fd00:10::1]:8080")),
        Decision::Deny(_)
    ));
    assert_eq!(p.decide(sa("[fd00:10::1]:8081")), Decision::Allow);
}

#[test]
fn link_local_is_optional() {
    let off = default_policy();
    assert_eq!(off.decide(sa("169.254.1.1:80")), Decision::Allow);
    let on = ExecPolicy::from_args(&ExecPolicyArgs {
        deny_link_local: true,
        ..Default::default()
    })
    .expect("policy");
    assert!(matches!(on.decide(sa("169.254.1.1:80")), Decision::Deny(_)));
    assert!(matches!(on.decide(sa("[fe80::1]:80")), Decision::Deny(_)));
}

#[test]
fn display_round_trips() {
    for text in [
        "169.254.169.254",
        "169.254.0.0/16",
        "169.254.170.2:80",
        "169.254.0.0/16:80",
        "fd00:ec2::254",
        "fe80::/10",
        "[fd00:ec2::254]:80",
        "[fd00::/8]:80",
    ] {
        let r = Rule::parse(text).expect("rule");
        assert_eq!(r.to_string(), text);
        assert_eq!(Rule::parse(&r.to_string()).expect("again"), r);
    }
}

#[test]
fn env_scrub_defaults_and_overrides() {
    let s = EnvScrub::new(&[], &[]).expect("defaults");
    for n in DEFAULT_SCRUB_ENV {
        assert!(s.scrubs(n), "{n}");
    }
    assert!(!s.scrubs("PATH"));
    assert!(!s.scrubs("ecs_container_metadata_uri"));
    let s = EnvScrub::new(
        &["MY_SECRET".into()],
        &["AWS_CONTAINER_CREDENTIALS_RELATIVE_URI".into()],
    )
    .expect("custom");
    assert!(s.scrubs("MY_SECRET"));
    assert!(!s.scrubs("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"));
    assert!(EnvScrub::new(&["A=B".into()], &[]).is_err());
    assert!(EnvScrub::new(&[], &[String::new()]).is_err());
}

fn any_ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<u32>().prop_map(|b| IpAddr::V4(Ipv4Addr::from(b))),
        any::<u128>().prop_map(|b| IpAddr::V6(Ipv6Addr::from(b))),
        // Addresses near the metadata endpoints, in both families.
        (0u8..=255, 0u8..=255).prop_map(|(c, d)| IpAddr::V4(Ipv4Addr::new(169, 254, c, d))),
        (0u8..=255, 0u8..=255)
            .prop_map(|(c, d)| IpAddr::V6(Ipv4Addr::new(169, 254, c, d).to_ipv6_mapped())),
    ]
}

proptest! {
    #[test]
    fn parse_never_panics(s in "\\PC{0,40}") {
        let _ = Rule::parse(&s);
    }

    #[test]
    fn rule_text_round_trips(ip in any_ip(), prefix in 0u8..=128, port in proptest::option::of(1u16..)) {
        let max = max_prefix(canonical(ip));
        let prefix = prefix.min(max);
        let net = mask(canonical(ip), prefix);
        let r = Rule { addr: net, prefix, port };
        prop_assert_eq!(Rule::parse(&r.to_string()).expect("parse"), r);
    }

    #[test]
    fn mapped_spelling_decides_like_ipv4(c in 0u8..=255, d in 0u8..=255, port in 1u16..) {
        let p = ExecPolicy::from_args(&ExecPolicyArgs { deny_link_local: true, ..Default::default() }).expect("policy");
        let v4 = Ipv4Addr::new(169, 254, c, d);
        let a = p.decide(SocketAddr::V4(SocketAddrV4::new(v4, port)));
        let b = p.decide(SocketAddr::V6(SocketAddrV6::new(v4.to_ipv6_mapped(), port, 0, 0)));
        prop_assert_eq!(a, b);
        prop_assert!(matches!(a, Decision::Deny(_)));
    }

    #[test]
    fn host_rule_matches_only_its_address(ip in any_ip(), other in any_ip(), port in 1u16..) {
        let r = Rule::host(ip);
        prop_assert!(r.matches(canonical(ip), port));
        if canonical(other) != canonical(ip) {
            prop_assert!(!r.matches(canonical(other), port));
        }
    }
}
