use super::*;

const CONTRACT_EXAMPLE: &str = r#"
[endpoints]
imds          = ["169.254.169.254", "fd00:ec2::254"]
task_metadata = ["169.254.170.2", "169.254.170.23", "fd00:ec2::23"]

[agent]
credentials = "127.0.0.1:51679"

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
netns         = ["ecs-tasks"]
imds          = "deny"

[[workload]]
name          = "host-network-containers"
cgroups       = ["docker"]
imds          = "deny"
"#;

fn err(text: &str) -> ConfigError {
    match Config::parse(text, "test.toml") {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => e,
    }
}

#[test]
fn contract_example_parses() {
    let c = Config::parse(CONTRACT_EXAMPLE, "x.toml").expect("valid");
    assert_eq!(c.workloads.len(), 4);
    assert_eq!(c.workloads[0].name, "ecs-agent");
    assert_eq!(
        c.workloads[0].selector,
        Selector::Cgroups(vec!["docker/ecs-agent".into()])
    );
    assert_eq!(c.workloads[1].imds, Action::Deny);
    assert_eq!(c.workloads[1].task_metadata, Action::Allow);
    assert_eq!(
        c.workloads[2].selector,
        Selector::Netns(vec![NetnsSelector::EcsTasks])
    );
    // omitted action means untouched
    assert_eq!(c.workloads[2].task_metadata, Action::Allow);
    assert_eq!(c.endpoints.imds.len(), 2);
    assert_eq!(c.endpoints.task_metadata.len(), 3);
    assert_eq!(c.agent_credentials.to_string(), "127.0.0.1:51679");
    assert_eq!(c.origin, Origin::File("x.toml".into()));
}

#[test]
fn builtin_default_is_the_documented_one() {
    let c = Config::builtin_default();
    assert_eq!(c.origin, Origin::BuiltinDefault);
    let names: Vec<_> = c.workloads.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(names, ["bridge-containers", "awsvpc-tasks"]);
    assert_eq!(c.endpoints.imds, default_ips(&DEFAULT_IMDS));
}

#[test]
fn empty_file_means_defaults_for_endpoints_and_no_workloads() {
    let c = Config::parse("", "e.toml").expect("valid");
    assert!(c.workloads.is_empty());
    assert_eq!(
        c.endpoints.task_metadata,
        default_ips(&DEFAULT_TASK_METADATA)
    );
}

#[test]
fn mapped_ipv6_endpoint_folds_to_ipv4_and_duplicates_collapse() {
    let c = Config::parse(
        "[endpoints]\nimds = [\"::ffff:169.254.169.254\", \"169.254.169.254\"]\n",
        "m.toml",
    )
    .expect("valid");
    assert_eq!(
        c.endpoints.imds,
        vec!["169.254.169.254".parse::<IpAddr>().expect("ip")]
    );
}

#[test]
fn selectors_normalise() {
    let c = Config::parse(
        r#"
[[workload]]
name = "a"
cgroups = ["/system.slice/docker-1.scope/"]
[[workload]]
name = "b"
netns = ["task-*", "/var/run/docker/netns/*"]
[[workload]]
name = "c"
containers = ["/ecs-agent", "label:com.amazonaws.ecs.task-arn=x"]
credentials_ids = ["abc-123"]
"#,
        "s.toml",
    )
    .expect("valid");
    assert_eq!(
        c.workloads[0].selector,
        Selector::Cgroups(vec!["system.slice/docker-1.scope".into()])
    );
    assert_eq!(
        c.workloads[1].selector,
        Selector::Netns(vec![
            NetnsSelector::Path("/run/netns/task-*".into()),
            NetnsSelector::Path("/var/run/docker/netns/*".into())
        ])
    );
    assert_eq!(
        c.workloads[2].selector,
        Selector::Containers(vec![
            ContainerRef::Name("ecs-agent".into()),
            ContainerRef::Label {
                key: "com.amazonaws.ecs.task-arn".into(),
                value: "x".into()
            }
        ])
    );
}

/// (name, text, line, column, message fragment)
const BAD: &[(&str, &str, usize, usize, &str)] = &[
    ("syntax", "[[workload]\nname = \"a\"\n", 1, 12, ""),
    ("unterminated string", "[agent]\ncredentials = \"127.0.0.1:1\n", 2, 27, ""),
    ("unknown top-level key", "[endpoint]\nimds = []\n", 1, 2, "unknown field `endpoint`"),
    ("unknown workload key", "[[workload]]\nname = \"a\"\nbridge = [\"docker0\"]\n", 3, 1, "unknown field `bridge`"),
    ("wrong type", "[[workload]]\nname = \"a\"\nbridges = \"docker0\"\n", 3, 11, "invalid type"),
    ("bad ip", "[endpoints]\nimds = [\"169.254.169.254\", \"169.254.169.256\"]\n", 2, 28, "not an IP address"),
    ("empty endpoint list", "[endpoints]\nimds = []\n", 2, 8, "is empty"),
    ("overlapping endpoint classes", "[endpoints]\nimds = [\"169.254.170.2\"]\n", 1, 1, "both as an imds and a task_metadata"),
    ("bad agent", "[agent]\ncredentials = \"localhost:51679\"\n", 2, 15, "not an IP:PORT"),
    ("bad action", "[[workload]]\nname = \"a\"\nbridges = [\"docker0\"]\nimds = \"block\"\n", 4, 8, "unknown action \"block\""),
    ("no selector", "[[workload]]\nname = \"a\"\nimds = \"deny\"\n", 1, 1, "has no selector"),
    ("two selectors", "[[workload]]\nname = \"a\"\nbridges = [\"docker0\"]\ncgroups = [\"docker\"]\n", 4, 11, "more than one kind"),
    ("no name", "[[workload]]\nbridges = [\"docker0\"]\n", 1, 1, "has no name"),
    ("duplicate name", "[[workload]]\nname = \"a\"\nbridges = [\"x\"]\n[[workload]]\nname = \"a\"\nbridges = [\"y\"]\n", 4, 1, "used twice"),
    ("empty selector", "[[workload]]\nname = \"a\"\nbridges = []\n", 3, 11, "selects nothing"),
    ("inner glob", "[[workload]]\nname = \"a\"\nbridges = [\"br-*-x\"]\n", 3, 12, "not a usable interface glob"),
    ("star alone", "[[workload]]\nname = \"a\"\nbridges = [\"*\"]\n", 3, 12, "not a usable interface glob"),
    ("long ifname", "[[workload]]\nname = \"a\"\nbridges = [\"abcdefghijklmnop\"]\n", 3, 12, "not a usable interface glob"),
    ("cgroup escape", "[[workload]]\nname = \"a\"\ncgroups = [\"docker/../x\"]\n", 3, 12, "not a usable cgroup"),
    ("cgroup root", "[[workload]]\nname = \"a\"\ncgroups = [\"/\"]\n", 3, 12, "not a usable cgroup"),
    ("netns escape", "[[workload]]\nname = \"a\"\nnetns = [\"../x\"]\n", 3, 10, "not a usable namespace"),
    ("bad label", "[[workload]]\nname = \"a\"\ncontainers = [\"label:=x\"]\n", 3, 15, "not a label selector"),
    ("bad container", "[[workload]]\nname = \"a\"\ncontainers = [\"a b\"]\n", 3, 15, "not a container name"),
    ("glob inside a segment", "[[workload]]\nname = \"a\"\nbridges = [\"x\"]\nimds = \"proxy\"\n\n[workload.imds_policy]\nallow = [\"/latest/meta-data/inst*\"]\n", 7, 10, "is not a path glob"),
    ("relative glob", "[[workload]]\nname = \"a\"\nbridges = [\"x\"]\nimds = \"proxy\"\n\n[workload.imds_policy]\nallow = [\"/latest/meta-data/\"]\ndeny = [\"latest/user-data\"]\n", 8, 9, "is not a path glob"),
    ("dot-dot glob", "[[workload]]\nname = \"a\"\nbridges = [\"x\"]\nimds = \"proxy\"\nimds_policy = { allow = [\"/latest/../iam/**\"] }\n", 5, 26, "is not a path glob"),
    ("query in a glob", "[[workload]]\nname = \"a\"\nbridges = [\"x\"]\nimds = \"proxy\"\n\n[workload.imds_policy]\nallow = [\"/latest/api/token?x=1\"]\n", 7, 10, "is not a path glob"),
    ("imds_policy without proxy", "[[workload]]\nname = \"a\"\nbridges = [\"x\"]\nimds = \"deny\"\n\n[workload.imds_policy]\nallow = [\"/latest/meta-data/instance-id\"]\n", 6, 1, "imds_policy is only used with imds = \"proxy\""),
    ("unknown imds_policy key", "[[workload]]\nname = \"a\"\nbridges = [\"x\"]\nimds = \"proxy\"\n\n[workload.imds_policy]\nalow = [\"/latest/meta-data/instance-id\"]\n", 7, 1, "unknown field `alow`"),
    ("imds_policy not a list", "[[workload]]\nname = \"a\"\nbridges = [\"x\"]\nimds = \"proxy\"\n\n[workload.imds_policy]\nallow = \"/latest/meta-data/instance-id\"\n", 7, 9, "invalid type"),
    ("bad mode", "mode = \"watch\"\n[[workload]]\nname = \"a\"\nbridges = [\"x\"]\n", 1, 8, "unknown mode \"watch\""),
    ("mode not a string", "mode = true\n", 1, 8, "invalid type"),
    ("mode inside a table", "[agent]\nmode = \"observe\"\n", 2, 1, "unknown field `mode`"),
    ("bad credentials id", "[[workload]]\nname = \"a\"\nbridges = [\"x\"]\ncredentials_ids = [\"../x\"]\n", 4, 20, "not a valid id"),
];

#[test]
fn every_kind_of_bad_file_names_line_and_column() {
    for (what, text, line, column, fragment) in BAD {
        let e = err(text);
        assert_eq!((e.line, e.column), (*line, *column), "{what}: {e}");
        assert!(
            e.message.contains(fragment),
            "{what}: {:?} lacks {fragment:?}",
            e.message
        );
        assert_eq!(e.origin, "test.toml");
        let shown = e.to_string();
        assert!(
            shown.starts_with(&format!("test.toml:{line}:{column}: ")),
            "{what}: {shown}"
        );
    }
}

#[test]
fn error_display_points_at_the_column() {
    let e = err("[[workload]]\nname = \"a\"\nbridges = [\"docker0\"]\nimds = \"block\"\n");
    let shown = e.to_string();
    let lines: Vec<&str> = shown.lines().collect();
    assert_eq!(lines[2], " 4 | imds = \"block\"");
    // the caret sits under the opening quote (column 8)
    assert_eq!(lines[3].find('^'), Some(" 4 | ".len() + 7));
    assert!(shown.contains("help: use one of"));
}

proptest::proptest! {
    /// Arbitrary input never panics the parser, and every error points
    /// inside the text.
    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
        if let Err(e) = Config::parse(&text, "p.toml") {
            proptest::prop_assert!(e.line >= 1 && e.line <= text.lines().count().max(1) + 1);
        }
    }

    /// Mutations of a valid file never panic either.
    #[test]
    fn mutated_contract_example_never_panics(pos in 0usize..CONTRACT_EXAMPLE.len(), byte in proptest::num::u8::ANY) {
        let mut bytes = CONTRACT_EXAMPLE.as_bytes().to_vec();
        bytes[pos] = byte;
        if let Ok(text) = String::from_utf8(bytes) {
            let _ = Config::parse(&text, "p.toml");
        }
    }
}

#[test]
fn imds_policy_replaces_the_catalogue_for_its_workload_only() {
    let text = r#"
[[workload]]
name = "named-role"
netns = ["/run/netns/a"]
imds = "proxy"

[workload.imds_policy]
allow = ["/latest/meta-data/instance-id", "/latest/meta-data/iam/**"]
deny  = ["/latest/meta-data/iam/info"]

[[workload]]
name = "broad"
bridges = ["docker0"]
imds = "proxy"
imds_policy = { allow = ["/latest/meta-data/**", "/latest/api/token"] }

[[workload]]
name = "default"
bridges = ["br-*"]
imds = "proxy"
"#;
    let c = Config::parse(text, "p.toml").expect("valid");
    let globs = |p: &PathPolicy| {
        (
            p.allow
                .iter()
                .map(|g| g.as_str().to_string())
                .collect::<Vec<_>>(),
            p.deny
                .iter()
                .map(|g| g.as_str().to_string())
                .collect::<Vec<_>>(),
        )
    };
    assert_eq!(
        globs(&c.workloads[0].imds_policy),
        (
            vec![
                "/latest/meta-data/instance-id".to_string(),
                "/latest/meta-data/iam/**".to_string()
            ],
            vec!["/latest/meta-data/iam/info".to_string()]
        )
    );
    assert_eq!(c.workloads[2].imds_policy, PathPolicy::default_imds());
    // One path, three answers.
    let decide = |i: usize, t: &str| {
        let canon = crate::proxy_path::canonical(t, &[]).expect("canonical");
        matches!(
            c.workloads[i].imds_policy.decide(&canon),
            crate::proxy_path::Decision::Allow { .. }
        )
    };
    let role = "/latest/meta-data/iam/security-credentials/role";
    assert_eq!(
        [decide(0, role), decide(1, role), decide(2, role)],
        [true, false, false]
    );
    let host = "/latest/meta-data/hostname";
    assert_eq!(
        [decide(0, host), decide(1, host), decide(2, host)],
        [false, true, false]
    );
    let id = "/latest/meta-data/instance-id";
    assert_eq!(
        [decide(0, id), decide(1, id), decide(2, id)],
        [true, true, true]
    );
}

#[test]
fn observe_is_an_action_for_both_endpoint_classes() {
    let c = Config::parse(
        "[[workload]]\nname = \"a\"\nbridges = [\"x\"]\nimds = \"observe\"\ntask_metadata = \"observe\"\n",
        "test.toml",
    )
    .expect("valid");
    assert_eq!(c.mode, Mode::Enforce);
    assert_eq!(
        (c.workloads[0].imds, c.workloads[0].task_metadata),
        (Action::Observe, Action::Observe)
    );
    assert!(c.observes());
    assert_eq!(
        c.proxies(),
        (true, true),
        "observed HTTP goes through the proxy"
    );
    assert!(!Config::builtin_default().observes());
}

#[test]
fn mode_observe_turns_every_deny_and_proxy_into_observe_and_keeps_the_text_enforceable() {
    let text = "mode = \"observe\"\n\n[[workload]]\nname = \"agent\"\ncgroups = [\"docker/ecs-agent\"]\nimds = \"allow\"\n\n\
                [[workload]]\nname = \"host\"\ncgroups = [\"docker\"]\nimds = \"deny\"\nraw_sockets = \"deny\"\n\n\
                [[workload]]\nname = \"b\"\nbridges = [\"x\"]\nimds = \"proxy\"\ntask_metadata = \"proxy\"\n\n\
                [workload.imds_policy]\nallow = [\"/latest/meta-data/instance-id\"]\n";
    let c = Config::parse(text, "test.toml").expect("valid");
    assert_eq!(c.mode, Mode::Observe);
    let acts: Vec<(Action, Action, Action)> = c
        .workloads
        .iter()
        .map(|w| (w.imds, w.task_metadata, w.raw_sockets))
        .collect();
    assert_eq!(
        acts,
        [
            (Action::Allow, Action::Allow, Action::Allow),
            (Action::Observe, Action::Allow, Action::Allow),
            (Action::Observe, Action::Observe, Action::Allow),
        ]
    );
    // The policy the file would enforce is kept for the report.
    let e = Config::parse_enforced(text, "test.toml").expect("valid");
    assert_eq!(e.mode, Mode::Observe);
    assert_eq!(
        (
            e.workloads[1].imds,
            e.workloads[1].raw_sockets,
            e.workloads[2].imds
        ),
        (Action::Deny, Action::Deny, Action::Proxy)
    );
    assert_eq!(c.workloads[2].imds_policy, e.workloads[2].imds_policy);
    let explicit = Config::parse("mode = \"enforce\"\n", "test.toml").expect("valid");
    assert_eq!(explicit.mode, Mode::Enforce);
}

#[test]
fn agent_credentials_take_a_container_reference() {
    let c = Config::parse(
        "[agent]\ncredentials = \"container:ecs-agent:51679\"\n",
        "t.toml",
    )
    .expect("valid");
    assert_eq!(
        c.agent_container,
        Some(AgentContainer {
            container: ContainerRef::Name("ecs-agent".into()),
            port: 51679
        })
    );
    let c = Config::parse(
        "[agent]\ncredentials = \"container:label:role=agent:8080\"\n",
        "t.toml",
    )
    .expect("valid");
    assert_eq!(
        c.agent_container.map(|a| a.container),
        Some(ContainerRef::Label {
            key: "role".into(),
            value: "agent".into()
        })
    );
    assert_eq!(
        Config::parse("", "t.toml").expect("valid").agent_container,
        None
    );
    for bad in [
        "container:ecs-agent",
        "container:ecs-agent:0",
        "container:ecs-agent:http",
        "container::51679",
        "container:a b:51679",
    ] {
        let e = Config::parse(&format!("[agent]\ncredentials = \"{bad}\"\n"), "t.toml")
            .expect_err(bad)
            .to_string();
        assert!(e.contains("t.toml:2:"), "{bad}: {e}");
    }
}

#[test]
fn default_container_cgroups_move_under_the_hosts_init_root_and_named_ones_stay() {
    let mut c = Config::builtin_default();
    c.layers.rebase_default_container_cgroups("");
    assert_eq!(c.layers.container_cgroups, DEFAULT_CONTAINER_CGROUPS);
    c.layers
        .rebase_default_container_cgroups("/lab/machine/payload/");
    assert_eq!(
        c.layers.container_cgroups,
        [
            "lab/machine/payload/system.slice",
            "lab/machine/payload/docker",
            "lab/machine/payload/ecs",
            "lab/machine/payload/ecstasks.slice"
        ]
    );
    let mut named = Config::parse("[layers]\ncontainer_cgroups = [\"docker\"]\n", "t.toml")
        .expect("valid config");
    named
        .layers
        .rebase_default_container_cgroups("lab/machine/payload");
    assert_eq!(named.layers.container_cgroups, ["docker"]);
}
