use super::*;
use crate::config::Config;

fn cfg(text: &str) -> Config {
    Config::parse(text, "t.toml").expect("valid config")
}

const CONTRACT: &str = r#"
[[workload]]
name          = "ecs-agent"
cgroups       = ["docker/ecs-agent"]
imds          = "allow"

[[workload]]
name          = "bridge-containers"
bridges       = ["docker0", "br-*", "ecs-bridge"]
imds          = "deny"
task_metadata = "allow"

[[workload]]
name          = "awsvpc-tasks"
netns         = ["/run/netns/task-*"]
imds          = "deny"

[[workload]]
name          = "host-network-containers"
cgroups       = ["docker"]
imds          = "deny"
"#;

#[test]
fn default_policy_golden() {
    let p = plan(&Config::builtin_default(), &HostFacts::default()).expect("plan");
    insta::assert_snapshot!("default_host", p.host);
    assert!(p.netns.is_empty());
    assert_eq!(p.warnings.len(), 1, "{:?}", p.warnings);
    assert!(p.warnings[0].contains("ecs-tasks"), "{:?}", p.warnings);
}

#[test]
fn contract_example_golden() {
    let facts = HostFacts {
        netns_paths: vec![
            "/run/netns/task-1".into(),
            "/run/netns/other".into(),
            "/run/netns/task-2".into(),
        ],
        containers: None,
        ports: Vec::new(),
    };
    let p = plan(&cfg(CONTRACT), &facts).expect("plan");
    insta::assert_snapshot!("contract_host", p.host);
    let paths: Vec<_> = p.netns.iter().map(|n| n.path.as_str()).collect();
    assert_eq!(paths, ["/run/netns/task-1", "/run/netns/task-2"]);
    insta::assert_snapshot!("contract_task", p.netns[0].script);
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
}

#[test]
fn plan_is_deterministic() {
    let c = cfg(CONTRACT);
    assert_eq!(
        plan(&c, &HostFacts::default()),
        plan(&c, &HostFacts::default())
    );
}

#[test]
fn shadowed_entries_are_dropped_with_a_warning() {
    let c = cfg(r#"
[[workload]]
name = "all-docker"
cgroups = ["docker"]
imds = "deny"
[[workload]]
name = "agent"
cgroups = ["docker/ecs-agent"]
[[workload]]
name = "bridges"
bridges = ["br-*"]
imds = "deny"
[[workload]]
name = "one-bridge"
bridges = ["br-x", "docker0"]
"#);
    let p = plan(&c, &HostFacts::default()).expect("plan");
    assert_eq!(p.warnings.len(), 2, "{:?}", p.warnings);
    assert!(
        p.warnings[0].contains("\"br-x\" can never match"),
        "{:?}",
        p.warnings
    );
    assert!(
        p.warnings[1].contains("\"docker/ecs-agent\" can never match"),
        "{:?}",
        p.warnings
    );
    assert!(!p.host.contains("\"br-x\""));
    assert!(p.host.contains("\"docker0\" : goto wl3"));
}

#[test]
fn overlapping_specific_entries_go_into_an_earlier_group() {
    let c = cfg(r#"
[[workload]]
name = "special"
bridges = ["br-x"]
[[workload]]
name = "rest"
bridges = ["br-*", "docker0"]
imds = "deny"
"#);
    let p = plan(&c, &HostFacts::default()).expect("plan");
    assert!(p.host.contains("map bridges0_names {"), "{}", p.host);
    assert!(
        p.host
            .contains("elements = { \"br-x\" : goto wl0, \"docker0\" : goto wl1 }"),
        "{}",
        p.host
    );
    assert!(p.host.contains("map bridges1_globs {"), "{}", p.host);
    assert!(
        p.host.contains("elements = { \"br-*\" : goto wl1 }"),
        "{}",
        p.host
    );
    let pre = p
        .host
        .find("iifname vmap @bridges0_names")
        .expect("group 0 rule");
    let pre1 = p
        .host
        .find("iifname vmap @bridges1_globs")
        .expect("group 1 rule");
    assert!(pre < pre1);
}

#[test]
fn netns_first_match_wins_and_empty_matches_warn() {
    let c = cfg(r#"
[[workload]]
name = "a"
netns = ["/run/netns/t-1"]
imds = "allow"
[[workload]]
name = "b"
netns = ["/run/netns/t-*"]
imds = "deny"
[[workload]]
name = "c"
netns = ["/var/run/none/*"]
imds = "deny"
"#);
    let facts = HostFacts {
        netns_paths: vec!["/run/netns/t-1".into(), "/run/netns/t-2".into()],
        containers: Some(vec![]),
        ports: Vec::new(),
    };
    let p = plan(&c, &facts).expect("plan");
    let got: Vec<_> = p
        .netns
        .iter()
        .map(|n| (n.path.as_str(), n.workload.as_str()))
        .collect();
    assert_eq!(got, [("/run/netns/t-1", "a"), ("/run/netns/t-2", "b")]);
    assert!(
        !p.netns[0].script.contains("reject"),
        "allow workload must not reject"
    );
    assert!(p.netns[1]
        .script
        .contains("ip daddr @imds4 meta l4proto tcp reject with tcp reset"));
    assert_eq!(
        p.warnings,
        vec!["workload \"c\": no network namespace matches its netns selectors".to_string()]
    );
}

#[test]
fn mapped_ipv6_forms_are_in_the_v6_sets() {
    let p = plan(&Config::builtin_default(), &HostFacts::default()).expect("plan");
    assert!(p.host.contains("::ffff:169.254.169.254"), "{}", p.host);
    assert!(p.host.contains("::ffff:169.254.170.2"), "{}", p.host);
}

/// Interface-glob dispatch as nft performs it: groups in order, first map
/// holding a matching element decides.
fn simulated_ifname(groups: &[Vec<(String, usize)>], name: &str) -> Option<usize> {
    groups.iter().find_map(|g| {
        g.iter().find_map(|(glob, w)| {
            let hit = match glob.strip_suffix('*') {
                Some(p) => name.starts_with(p),
                None => name == glob,
            };
            hit.then_some(*w)
        })
    })
}

fn first_match_ifname(entries: &[(String, usize)], name: &str) -> Option<usize> {
    entries.iter().find_map(|(glob, w)| {
        let hit = match glob.strip_suffix('*') {
            Some(p) => name.starts_with(p),
            None => name == glob,
        };
        hit.then_some(*w)
    })
}

fn cgroup_is_ancestor_or_self(a: &str, b: &str) -> bool {
    b == a || b.starts_with(&format!("{a}/"))
}

fn simulated_cgroup(groups: &[Vec<(String, usize)>], path: &str) -> Option<usize> {
    groups.iter().find_map(|g| {
        g.iter()
            .find_map(|(p, w)| cgroup_is_ancestor_or_self(p, path).then_some(*w))
    })
}

proptest::proptest! {
    /// No two entries in one group overlap (nft would reject an interval
    /// map with overlaps, and a lookup would be ambiguous), and dispatching
    /// through the groups is exactly first-match-wins in config order.
    #[test]
    fn ifname_groups_are_first_match_wins(
        globs in proptest::collection::vec(("[ab]{1,3}", proptest::bool::ANY, 0usize..4), 1..8),
        names in proptest::collection::vec("[ab]{1,4}", 1..10),
    ) {
        let entries: Vec<(String, usize)> = globs.iter()
            .map(|(p, star, w)| (if *star { format!("{p}*") } else { p.clone() }, *w))
            .collect();
        let config = Config { workloads: (0..4).map(|i| crate::config::Workload {
            name: format!("w{i}"), selector: Selector::Bridges(vec!["x".into()]), imds: Action::Deny,
            task_metadata: Action::Allow, credentials_ids: vec![], raw_sockets: Action::Allow, imds_policy: crate::proxy_path::PathPolicy::default_imds(), tmds: Default::default() }).collect(), ..Config::builtin_default() };
        let groups = group(&config, &entries, &mut IfnameIndex::default(), &mut Vec::new());
        for g in &groups {
            for (i, (a, _)) in g.iter().enumerate() {
                for (b, _) in &g[i + 1..] {
                    proptest::prop_assert!(!ifname_overlap(a, b), "{a} and {b} overlap in one group");
                }
            }
        }
        for n in &names {
            proptest::prop_assert_eq!(simulated_ifname(&groups, n), first_match_ifname(&entries, n), "name {}", n);
        }
    }

    #[test]
    fn cgroup_groups_are_first_match_wins(
        paths in proptest::collection::vec(("[ab](/[ab]){0,2}", 0usize..4), 1..8),
        probes in proptest::collection::vec("[ab](/[ab]){0,3}", 1..10),
    ) {
        let config = Config { workloads: (0..4).map(|i| crate::config::Workload {
            name: format!("w{i}"), selector: Selector::Cgroups(vec!["x".into()]), imds: Action::Deny,
            task_metadata: Action::Allow, credentials_ids: vec![], raw_sockets: Action::Allow, imds_policy: crate::proxy_path::PathPolicy::default_imds(), tmds: Default::default() }).collect(), ..Config::builtin_default() };
        let groups = group(&config, &paths, &mut CgroupIndex::default(), &mut Vec::new());
        for p in &probes {
            let want = paths.iter().find_map(|(e, w)| cgroup_is_ancestor_or_self(e, p).then_some(*w));
            // Within a group, at most one entry can be an ancestor of p.
            for g in &groups {
                let hits = g.iter().filter(|(e, _)| cgroup_is_ancestor_or_self(e, p)).count();
                proptest::prop_assert!(hits <= 1);
            }
            proptest::prop_assert_eq!(simulated_cgroup(&groups, p), want, "path {}", p);
        }
    }
}

#[test]
fn ten_thousand_entries_plan_quickly() {
    let names: Vec<String> = (0..10_000).map(|i| format!("\"vb{i:05}\"")).collect();
    let c = cfg(&format!(
        "[[workload]]\nname = \"a\"\nbridges = [\"br-*\", {}]\nimds = \"deny\"\n",
        names.join(", ")
    ));
    let t = std::time::Instant::now();
    let p = plan(&c, &HostFacts::default()).expect("plan");
    // Linear work: far below the 200 ms apply budget even in a debug build.
    assert!(
        t.elapsed() < std::time::Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    assert!(p.host.contains("\"vb09999\" : goto wl0"));
}

fn container(
    name: &str,
    host: bool,
    labels: &[(&str, &str)],
    cgroup: Option<&str>,
    netns: Option<&str>,
) -> ContainerFact {
    ContainerFact {
        id: format!("{name}-id"),
        name: name.into(),
        image: String::new(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        host_network: host,
        cgroup: cgroup.map(str::to_string),
        netns: netns.map(str::to_string),
        env: Vec::new(),
        addresses: Vec::new(),
    }
}

#[test]
fn containers_and_ecs_tasks_resolve_through_docker_facts() {
    let c = cfg(r#"
[[workload]]
name = "agent"
containers = ["ecs-agent"]
imds = "allow"
[[workload]]
name = "tasks"
netns = ["ecs-tasks"]
imds = "deny"
[[workload]]
name = "host-net"
cgroups = ["docker"]
imds = "deny"
[[workload]]
name = "labelled"
containers = ["label:team=red"]
imds = "deny"
"#);
    let facts = HostFacts {
        netns_paths: vec![],
        containers: Some(vec![
            container("ecs-agent", true, &[], Some("docker/aaa"), None),
            container(
                "pause",
                false,
                &[ECS_PAUSE_LABEL],
                Some("docker/bbb"),
                Some("/var/run/docker/netns/bbb"),
            ),
            container(
                "red",
                false,
                &[("team", "red")],
                Some("docker/ccc"),
                Some("/var/run/docker/netns/ccc"),
            ),
        ]),
        ports: Vec::new(),
    };
    let p = plan(&c, &facts).expect("plan");
    // The agent's cgroup is allowed ahead of the "docker" deny.
    assert!(p.host.contains("\"docker/aaa\" : goto wl0"), "{}", p.host);
    let pos_agent = p
        .host
        .find("socket cgroupv2 level 2 vmap @cgroups0_l2")
        .expect("agent map rule");
    let pos_docker = p
        .host
        .find("socket cgroupv2 level 1 vmap @cgroups1_l1")
        .expect("docker map rule");
    assert!(pos_agent < pos_docker, "{}", p.host);
    let got: Vec<_> = p
        .netns
        .iter()
        .map(|n| (n.path.as_str(), n.workload.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("/var/run/docker/netns/bbb", "tasks"),
            ("/var/run/docker/netns/ccc", "labelled")
        ]
    );
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
}

const PROXY: &str = r#"
[[workload]]
name          = "agent"
cgroups       = ["docker/ecs-agent"]
imds          = "allow"

[[workload]]
name          = "bridges"
bridges       = ["docker0", "br-*", "ecs-bridge"]
imds          = "proxy"
task_metadata = "proxy"

[[workload]]
name          = "tasks"
netns         = ["/run/netns/task-*"]
imds          = "proxy"
task_metadata = "deny"

[[workload]]
name          = "hostnet"
cgroups       = ["docker"]
imds          = "proxy"
task_metadata = "proxy"
"#;

#[test]
fn proxy_golden() {
    let facts = HostFacts {
        netns_paths: vec!["/run/netns/task-1".into()],
        containers: None,
        ports: Vec::new(),
    };
    let p = plan(&cfg(PROXY), &facts).expect("plan");
    insta::assert_snapshot!("proxy_host", p.host);
    insta::assert_snapshot!("proxy_task", p.netns[0].script);
    let proxy = p.proxy.expect("proxy plan");
    let addrs = |v: &[std::net::SocketAddr]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
    // On the endpoint addresses themselves, never on port 80 (F10).
    assert_eq!(
        addrs(&proxy.imds),
        ["169.254.169.254:9470", "[fd00:ec2::254]:9470"]
    );
    assert_eq!(
        addrs(&proxy.relay),
        ["169.254.170.2:9470", "[fd00:ec2::23]:9470"]
    );
    assert_eq!(
        proxy.routes,
        [false, true].map(|v6| ProxyRoute {
            v6,
            mark: PROXY_ROUTE_MARK,
            table: PROXY_ROUTE_TABLE,
            pref: PROXY_RULE_PREF
        })
    );
    assert!(plan(&Config::builtin_default(), &facts)
        .expect("plan")
        .proxy
        .is_none());
}

/// The chain of workload `name` in a host table.
fn chain<'a>(host: &'a str, name: &str) -> Vec<&'a str> {
    let start = format!("\t\tcomment \"workload {name}\"");
    host.lines()
        .skip_while(|l| *l != start)
        .skip(1)
        .take_while(|l| *l != "\t}")
        .map(str::trim)
        .collect()
}

#[test]
fn the_relay_takes_only_callers_of_workloads_that_use_it() {
    let text = r#"
[[workload]]
name          = "proxied"
bridges       = ["docker0"]
task_metadata = "proxy"

[[workload]]
name          = "allowed"
bridges       = ["br-allow"]

[[workload]]
name          = "denied"
bridges       = ["br-deny"]
task_metadata = "deny"
"#;
    let p = plan(&cfg(text), &HostFacts::default()).expect("plan");
    let relay = "tproxy ip to 169.254.170.2:9470 meta mark set meta mark | 0x40000000 accept";
    // proxy: to the relay if it listens, else refused at once.
    let proxied = chain(&p.host, "proxied");
    let probe = proxied
        .iter()
        .position(|r| r.contains(relay))
        .expect("a probe rule");
    assert!(
        proxied[probe + 1].ends_with(
            "tcp dport 80 tcp flags & (fin | syn | rst | ack) == syn reject with tcp reset"
        ),
        "{proxied:#?}"
    );
    // allow: to the relay if it listens (ownership, F13), else on to the
    // agent untouched: no rule refuses anything.
    let allowed = chain(&p.host, "allowed");
    assert!(allowed.iter().any(|r| r.contains(relay)), "{allowed:#?}");
    assert!(
        !allowed.iter().any(|r| r.contains("reject")),
        "{allowed:#?}"
    );
    // deny: refused, never relayed.
    let denied = chain(&p.host, "denied");
    assert!(!denied.iter().any(|r| r.contains("tproxy")), "{denied:#?}");
    // Nothing reaches the proxy's route but what a probe or a host
    // workload marked: the nat chain DNATs only marked packets, and no
    // rule matches on other bridges (br-other is nobody's).
    assert!(!p.host.contains("br-other"));
    for line in p.host.lines().filter(|l| l.contains(" dnat ip")) {
        assert!(
            line.contains("meta mark & 0xc0000000 == 0xc0000000"),
            "{line}"
        );
    }
    // No host workload proxies: no output chain, no lo rules.
    assert!(!p.host.contains("iif \"lo\"") && !p.host.contains("proxy_output"));
}

#[test]
fn without_an_allow_workload_or_a_proxy_nothing_is_relayed() {
    let allow_only = "[[workload]]\nname = \"a\"\nbridges = [\"docker0\"]\nimds = \"deny\"\n";
    let p = plan(&cfg(allow_only), &HostFacts::default()).expect("plan");
    assert!(
        p.proxy.is_none() && !p.host.contains("tproxy") && !p.host.contains("bridge metaguard")
    );
}

#[test]
fn proxy_needs_an_ipv4_address() {
    let text = format!("[endpoints]\ntask_metadata = [\"fd00:ec2::23\"]\n{PROXY}");
    let e = plan(&cfg(&text), &HostFacts::default()).expect_err("no v4 address");
    assert!(e.to_string().contains("IPv4"), "{e}");
}

#[test]
fn bridge_mark_is_the_kernels_jhash() {
    // Measured in a namespace: a SYN entering from port ifindex 3 through
    // the bridge table's rule (mod 0x3fffffff) arrived with SO_MARK
    // 0xbcf24a34.
    assert_eq!(bridge_mark(3), 0xbcf2_4a34);
    for i in [1u32, 2, 3, 1000, 1 << 20, u32::MAX] {
        assert!(bridge_mark(i) >= BRIDGE_MARK_BASE);
    }
}

#[test]
fn identity_marks_and_the_route_mark_do_not_overlap() {
    // Bridge marks leave the route bit free (it is added for the policy
    // route and taken off again before TCP reads the mark) and never look
    // like a host mark; host marks carry it.
    for i in (1u32..5000).chain([1 << 20, u32::MAX]) {
        let m = bridge_mark(i);
        assert_eq!(m & PROXY_ROUTE_MARK, 0, "ifindex {i}: 0x{m:08x}");
        assert!(!is_host_mark(m) && !is_host_mark(m | PROXY_ROUTE_MARK));
    }
    assert_eq!(HOST_MARK_TAG, 0x6e00_0000);
    assert_eq!(HOST_MARK_TAG & PROXY_ROUTE_MARK, PROXY_ROUTE_MARK);
    assert_eq!(HOST_MARK_TAG & BRIDGE_MARK_BASE, 0);
    assert!(is_host_mark(HOST_MARK_TAG | 3));
}

#[test]
fn observe_routes_http_through_the_proxy_and_blocks_nothing() {
    let facts = HostFacts {
        netns_paths: vec!["/run/netns/task-1".into()],
        containers: None,
        ports: Vec::new(),
    };
    let enforced = plan(&cfg(PROXY), &facts).expect("plan");
    let observed = plan(&cfg(&format!("mode = \"observe\"\n{PROXY}")), &facts).expect("plan");
    // The same listeners and routes: observed HTTP goes through the proxy.
    assert_eq!(observed.proxy, enforced.proxy);
    // No workload's rules refuse anything: no port, protocol or the host's
    // loopback (F17 guards deny/proxy only). What stays is the proxy's own
    // fail-closed guard for SYNs already DNATed to its port (host
    // processes, task namespaces) while nothing listens: docs/observe.md.
    for w in ["agent", "bridges", "hostnet"] {
        let rules = chain(&observed.host, w);
        assert!(
            rules.iter().all(|r| !r.contains("reject")),
            "{w}: {rules:?}"
        );
    }
    let task = &observed.netns[0].script;
    assert!(!task.contains("reject"), "{task}");
    assert!(
        enforced.netns[0].script.contains("reject"),
        "the enforced file rejects"
    );
    // Bridges: to the proxy when it listens, straight on when it does not.
    let bridges = chain(&observed.host, "bridges");
    assert!(
        bridges
            .iter()
            .any(|r| r.contains("tproxy ip to 169.254.169.254:9470")),
        "{bridges:?}"
    );
    // Host processes are marked for the proxy's output route.
    assert!(
        chain(&observed.host, "hostnet")
            .iter()
            .any(|r| r.contains("meta mark set")),
        "{}",
        observed.host
    );
    // A task's IMDS requests go to the host's proxy.
    assert!(observed.netns[0].script.contains("chain proxy_output"));
}

const AGENT_ON_BRIDGE: &str = r#"
[[workload]]
name          = "ecs-agent"
containers    = ["ecs-agent"]
imds          = "allow"

[[workload]]
name          = "bridge-containers"
bridges       = ["docker0", "br-*", "ecs-bridge"]
imds          = "deny"
task_metadata = "allow"

[[workload]]
name          = "awsvpc-tasks"
netns         = ["ecs-tasks"]
imds          = "deny"
"#;

fn port(ifindex: u32, name: &str, bridge: &str, netns: &[&str]) -> BridgePort {
    BridgePort {
        ifindex,
        name: name.into(),
        bridge: bridge.into(),
        netns: netns.iter().map(|s| s.to_string()).collect(),
    }
}

fn agent_on_bridge_facts() -> HostFacts {
    HostFacts {
        netns_paths: vec![],
        containers: Some(vec![
            container(
                "ecs-agent",
                false,
                &[],
                Some("docker/agent"),
                Some("/var/run/docker/netns/agent"),
            ),
            container(
                "app",
                false,
                &[],
                Some("docker/app"),
                Some("/var/run/docker/netns/app"),
            ),
            container(
                "pause",
                false,
                &[ECS_PAUSE_LABEL],
                Some("docker/pause"),
                Some("/var/run/docker/netns/task"),
            ),
        ]),
        ports: vec![
            port(7, "vethagent", "docker0", &["/var/run/docker/netns/agent"]),
            port(8, "vethapp", "docker0", &["/var/run/docker/netns/app"]),
            port(9, "vethtask", "ecs-bridge", &["/var/run/docker/netns/task"]),
        ],
    }
}

#[test]
fn agent_on_bridge_golden() {
    let p = plan(&cfg(AGENT_ON_BRIDGE), &agent_on_bridge_facts()).expect("plan");
    insta::assert_snapshot!("agent_on_bridge_host", p.host);
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
}

#[test]
fn a_container_listed_before_its_bridge_gets_its_own_actions_by_port() {
    let p = plan(&cfg(AGENT_ON_BRIDGE), &agent_on_bridge_facts()).expect("plan");
    let agent = bridge_mark(7);
    // Only the agent's port: by its mark, ahead of the bridges.
    assert!(
        p.host
            .contains(&format!("elements = {{ 0x{agent:08x} : goto wl0_ports }}")),
        "{}",
        p.host
    );
    assert!(!p.host.contains(&format!("0x{:08x}", bridge_mark(8))));
    let vmap = p
        .host
        .find("meta mark vmap @ports")
        .expect("ports dispatch");
    let bridges = p.host.find("iifname vmap @bridges0").expect("bridges");
    assert!(vmap < bridges, "{}", p.host);
    // The bridge table names the port, not an address.
    assert!(p.host.contains("iifname { \"vethagent\" } ip daddr { 169.254.169.254, 169.254.170.2, 169.254.170.23 } meta mark set jhash meta iif"), "{}", p.host);
    assert!(p.host.contains("iifname { \"vethagent\" } ip6 daddr {"));
    // The awsvpc task's workload comes after ecs-bridge's: no exception.
    assert!(!p.host.contains("vethtask"));
    // Its own table inside its namespace as before (allow: nothing in it).
    assert!(p
        .netns
        .iter()
        .any(|n| n.path == "/var/run/docker/netns/agent" && n.workload == "ecs-agent"));
}

#[test]
fn a_bridge_listed_first_wins_over_a_container_on_it() {
    let c = cfg(r#"
[[workload]]
name          = "bridge-containers"
bridges       = ["docker0"]
imds          = "deny"
[[workload]]
name          = "ecs-agent"
containers    = ["ecs-agent"]
imds          = "allow"
"#);
    let p = plan(&c, &agent_on_bridge_facts()).expect("plan");
    assert!(!p.host.contains("@ports"), "{}", p.host);
    assert!(!p.host.contains("table bridge"), "{}", p.host);
}

#[test]
fn a_netns_selector_gets_an_exception_by_its_port_too() {
    let c = cfg(r#"
[[workload]]
name          = "tasks-first"
netns         = ["ecs-tasks"]
imds          = "allow"
[[workload]]
name          = "special"
netns         = ["/run/netns/special"]
imds          = "allow"
[[workload]]
name          = "bridge-containers"
bridges       = ["docker0", "ecs-bridge"]
imds          = "deny"
"#);
    let mut facts = agent_on_bridge_facts();
    facts.netns_paths = vec!["/run/netns/special".into()];
    facts.ports[1].netns.push("/run/netns/special".into());
    let p = plan(&c, &facts).expect("plan");
    assert!(
        p.host.contains(&format!(
            "0x{:08x} : goto wl1_ports, 0x{:08x} : goto wl0_ports",
            bridge_mark(8),
            bridge_mark(9)
        )) || p.host.contains(&format!(
            "0x{:08x} : goto wl0_ports, 0x{:08x} : goto wl1_ports",
            bridge_mark(9),
            bridge_mark(8)
        )),
        "{}",
        p.host
    );
    assert!(!p.host.contains(&format!("0x{:08x}", bridge_mark(7))));
}

#[test]
fn a_port_whose_mark_another_port_shares_gets_no_exception() {
    // Find two ifindexes with the same mark (the hash is over 2^30 - 1
    // values: search a range large enough to hold a collision).
    let mut seen = std::collections::HashMap::new();
    let (a, b) = (1u32..200_000)
        .find_map(|i| seen.insert(bridge_mark(i), i).map(|j| (j, i)))
        .expect("a collision below 200,000");
    let mut facts = agent_on_bridge_facts();
    facts.ports[0].ifindex = a;
    facts.ports[1].ifindex = b;
    let p = plan(&cfg(AGENT_ON_BRIDGE), &facts).expect("plan");
    assert!(!p.host.contains("@ports"), "{}", p.host);
    assert_eq!(p.warnings.len(), 1, "{:?}", p.warnings);
    assert!(p.warnings[0].contains("vethagent"), "{:?}", p.warnings);
}

#[test]
fn only_the_relay_reaches_an_agent_container_s_credentials_port() {
    let text = format!(
        "[agent]\ncredentials = \"container:ecs-agent:51679\"\n{}",
        AGENT_ON_BRIDGE.replace("task_metadata = \"allow\"", "task_metadata = \"proxy\"")
    );
    let mut facts = agent_on_bridge_facts();
    if let Some(cs) = facts.containers.as_mut() {
        cs[0].addresses = vec!["172.17.0.3".parse().expect("ip")];
    }
    let p = plan(&cfg(&text), &facts).expect("plan");
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    let mark = format!("0x{RELAY_UPSTREAM_MARK:08x}");
    for rule in [
        "oifname { \"vethagent\" } tcp dport 51679 drop".to_string(),
        format!("oifname {{ \"vethagent\" }} tcp dport 51679 meta mark != {mark} drop"),
        format!("meta mark {mark} oifname != {{ \"vethagent\" }} drop"),
    ] {
        assert!(p.host.contains(&rule), "{rule}\n{}", p.host);
    }
    // Never the agent's address.
    assert!(!p.host.contains("172.17.0.3"), "{}", p.host);
    // Without a relay: a warning.
    let text = format!("[agent]\ncredentials = \"container:ecs-agent:51679\"\n{AGENT_ON_BRIDGE}");
    let p = plan(&cfg(&text), &facts).expect("plan");
    assert!(
        p.warnings.iter().any(|w| w.contains("nothing relays")),
        "{:?}",
        p.warnings
    );
}
