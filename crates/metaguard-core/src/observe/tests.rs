use super::*;

/// The config observed under: the lab's mix (bridges, awsvpc tasks, host
/// network, the agent).
const OBSERVED: &str = r#"mode = "observe"

[[workload]]
name = "ecs-agent"
cgroups = ["docker/ecs-agent"]
imds = "allow"

[[workload]]
name = "bridge-containers"
bridges = ["docker0", "br-*"]
imds = "deny"
task_metadata = "allow"

[[workload]]
name = "awsvpc-tasks"
netns = ["ecs-tasks"]
imds = "deny"
task_metadata = "proxy"

[[workload]]
name = "host-network"
cgroups = ["docker"]
imds = "deny"
task_metadata = "deny"
"#;

fn container(name: &str) -> Option<ContainerInfo> {
    Some(ContainerInfo {
        id: format!("{name}-0123456789abcdef"),
        name: name.into(),
        task_arn: (name == "task").then(|| "arn:aws:ecs:eu-west-1:1:task/c/abc".into()),
        task_family: (name == "task").then(|| "web".into()),
        image: Some(format!("registry.example/{name}:1.0")),
    })
}

fn rec(
    t: f64,
    workload: &str,
    c: &str,
    service: &str,
    method: &str,
    path: &str,
    v: Option<&str>,
) -> Record {
    Record {
        v: RECORD_VERSION,
        time: t,
        service: service.into(),
        workload: workload.into(),
        container: if c.is_empty() { None } else { container(c) },
        caller: if c.is_empty() {
            "host cgroup 4242".into()
        } else {
            format!("port of {c}")
        },
        family: "ipv4".into(),
        method: method.into(),
        path: path.into(),
        imds_version: v.map(str::to_string),
        status: 200,
        decision: "allow".into(),
        own_id: path.contains("credentials").then_some(true),
        access_key_id: path.contains("credentials").then(|| "ASIAEXAMPLE".into()),
        caller_ids_known: path.contains("credentials").then_some(true),
        over_limit: None,
    }
}

fn records() -> Vec<Record> {
    vec![
        rec(
            1000.0,
            "bridge-containers",
            "v1app",
            "imds",
            "GET",
            "/latest/meta-data/instance-id",
            Some("v1"),
        ),
        rec(
            1001.0,
            "bridge-containers",
            "v1app",
            "imds",
            "GET",
            "/latest/meta-data/instance-id",
            Some("v1"),
        ),
        rec(
            1002.0,
            "bridge-containers",
            "v2app",
            "imds",
            "PUT",
            "/latest/api/token",
            Some("v2"),
        ),
        rec(
            1003.0,
            "bridge-containers",
            "v2app",
            "imds",
            "GET",
            "/latest/meta-data/iam/security-credentials/role",
            Some("v2"),
        ),
        rec(
            1004.0,
            "awsvpc-tasks",
            "task",
            "task_metadata",
            "GET",
            "/v2/credentials/abcd…",
            None,
        ),
        rec(
            1005.0,
            "host-network",
            "",
            "imds",
            "GET",
            "/latest/meta-data/placement/region",
            Some("v1"),
        ),
    ]
}

fn enforced() -> Config {
    Config::parse_enforced(OBSERVED, "observed.toml").expect("valid")
}

#[test]
fn the_report_groups_per_workload_and_caller_and_says_what_the_config_would_deny() {
    let r = report(&enforced(), &records(), Window::default());
    assert_eq!(r.summary.requests, 6);
    assert_eq!(r.summary.accesses, 5);
    assert_eq!((r.window.from, r.window.to), (Some(1000.0), Some(1005.0)));
    let bridge = r
        .workloads
        .iter()
        .find(|w| w.workload == "bridge-containers")
        .expect("bridge");
    assert_eq!(bridge.imds, Some("deny"));
    assert_eq!(bridge.callers.len(), 2, "one per container");
    let v1 = &bridge.callers[0];
    assert_eq!(
        v1.container.as_ref().map(|c| c.name.as_str()),
        Some("v1app")
    );
    assert_eq!(
        (v1.accesses[0].count, v1.accesses[0].v1, v1.accesses[0].v2),
        (2, 2, 0)
    );
    assert_eq!(
        (v1.accesses[0].first_seen, v1.accesses[0].last_seen),
        (1000.0, 1001.0)
    );
    assert_eq!(v1.accesses[0].would, "deny");
    assert_eq!(v1.accesses[0].rule, "imds = \"deny\"");
    // The awsvpc task's own credentials pass under task_metadata = "proxy".
    let task = r
        .workloads
        .iter()
        .find(|w| w.workload == "awsvpc-tasks")
        .expect("task");
    let a = &task.callers[0].accesses[0];
    assert_eq!(
        (a.would, a.access_key_ids.as_slice()),
        ("allow", ["ASIAEXAMPLE".to_string()].as_slice())
    );
    assert_eq!(
        task.callers[0]
            .container
            .as_ref()
            .and_then(|c| c.task_family.as_deref()),
        Some("web")
    );
    // Every IMDS access of a denying workload would be denied.
    assert_eq!(r.summary.would_deny, 4);
}

#[test]
fn a_foreign_credentials_id_is_denied_under_proxy_and_allowed_under_allow() {
    let mut r = rec(
        1.0,
        "awsvpc-tasks",
        "task",
        "task_metadata",
        "GET",
        "/v2/credentials/wxyz…",
        None,
    );
    r.own_id = Some(false);
    assert_eq!(would(&enforced(), &r).would, "deny");
    r.workload = "bridge-containers".into();
    assert_eq!(would(&enforced(), &r).would, "allow");
    r.workload = "not-in-the-config".into();
    assert_eq!(would(&enforced(), &r).would, "allow");
}

#[test]
fn the_suggestion_parses_allows_everything_observed_and_denies_the_rest() {
    let text = suggest(&enforced(), &records());
    let c = Config::parse(&text, "suggested.toml").unwrap_or_else(|e| panic!("{e}\n{text}"));
    for r in records() {
        let v = would(&c, &r);
        assert_eq!(v.would, "allow", "{r:?}: {v:?}\n{text}");
    }
    // A new path, a foreign id, a new workload's access, another service.
    let new_path = rec(
        2.0,
        "bridge-containers",
        "v1app",
        "imds",
        "GET",
        "/latest/user-data",
        Some("v1"),
    );
    let mut foreign = rec(
        2.0,
        "awsvpc-tasks",
        "task",
        "task_metadata",
        "GET",
        "/v2/credentials/wxyz…",
        None,
    );
    foreign.own_id = Some(false);
    let host_creds = rec(
        2.0,
        "host-network",
        "",
        "task_metadata",
        "GET",
        "/v2/credentials/abcd…",
        None,
    );
    let task_imds = rec(
        2.0,
        "awsvpc-tasks",
        "task",
        "imds",
        "GET",
        "/latest/meta-data/instance-id",
        Some("v1"),
    );
    for r in [new_path, foreign, host_creds, task_imds] {
        assert_eq!(would(&c, &r).would, "deny", "{r:?}\n{text}");
    }
    // Evidence comments, the agent kept as written.
    assert!(
        text.contains("# observed: GET ×2 (v1 2, v2 0), by v1app"),
        "{text}"
    );
    assert!(text.contains("imds = \"allow\"  # as written"), "{text}");
    assert_eq!(c.workloads.len(), 4);
    assert_eq!(c.mode, crate::config::Mode::Enforce);
}

#[test]
fn a_suggestion_from_nothing_denies_every_observed_workload() {
    let text = suggest(&enforced(), &[]);
    let c = Config::parse(&text, "suggested.toml").unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(c.workloads[1].imds, Action::Deny);
    assert_eq!(c.workloads[3].task_metadata, Action::Deny);
    assert_eq!(c.workloads[0].imds, Action::Allow);
}

/// A workload whose callers Docker does not show (CNI namespaces): the
/// relay knows none of their credentials ids.
const CNI: &str = r#"mode = "observe"

[[workload]]
name = "cni-tasks"
netns = ["/run/netns/cni-*"]
imds = "deny"
task_metadata = "proxy"

[[workload]]
name = "bridge-containers"
bridges = ["docker0"]
imds = "deny"
task_metadata = "proxy"
"#;

fn cni_records() -> Vec<Record> {
    let mut own = rec(
        1.0,
        "cni-tasks",
        "",
        "task_metadata",
        "GET",
        "/v2/credentials/9b1d…",
        None,
    );
    own.caller = "namespace /run/netns/cni-1".into();
    own.own_id = Some(false);
    own.caller_ids_known = Some(false);
    // The same, written before `caller_ids_known` was kept: no container,
    // so none known.
    let mut old = own.clone();
    old.caller_ids_known = None;
    old.path = "/v2/credentials/a3f0…".into();
    old.time = 2.0;
    // A container using another's id: foreign, not a missing list.
    let mut foreign = rec(
        3.0,
        "bridge-containers",
        "v1app",
        "task_metadata",
        "GET",
        "/v2/credentials/wxyz…",
        None,
    );
    foreign.own_id = Some(false);
    vec![own, old, foreign]
}

#[test]
fn the_report_names_the_workloads_that_need_credentials_ids() {
    let c = Config::parse_enforced(CNI, "cni.toml").expect("valid");
    let r = report(&c, &cni_records(), Window::default());
    let cni = &r.workloads[1];
    assert_eq!(cni.workload, "cni-tasks");
    assert_eq!(cni.needs_credentials_ids, ["9b1d…", "a3f0…"]);
    // Enforced as written, proxy would refuse them.
    assert!(cni.callers[0].accesses.iter().all(|a| a.would == "deny"));
    assert!(r.workloads[0].needs_credentials_ids.is_empty());
}

#[test]
fn the_suggestion_leaves_a_credentials_ids_line_to_fill_in_and_allows_meanwhile() {
    let c = Config::parse_enforced(CNI, "cni.toml").expect("valid");
    let text = suggest(&c, &cni_records());
    let s = Config::parse(&text, "suggested.toml").unwrap_or_else(|e| panic!("{e}\n{text}"));
    // Every observed access passes; no full id is written (none is known).
    for r in cni_records() {
        let v = would(&s, &r);
        assert_eq!(v.would, "allow", "{r:?}: {v:?}\n{text}");
    }
    assert!(
        text.contains(
            "# credentials_ids = [\"<full credentials id 9b1d…>\", \"<full credentials id a3f0…>\"]"
        ),
        "{text}"
    );
    assert!(
        text.contains("#   9b1d… observed: GET ×1, by namespace /run/netns/cni-1;"),
        "{text}"
    );
    assert!(s.workloads.iter().all(|w| w.credentials_ids.is_empty()));
    assert_eq!(s.workloads[0].task_metadata, Action::Allow);
    // The rest is denied: the namespace's IMDS, never observed.
    let imds = rec(
        4.0,
        "cni-tasks",
        "",
        "imds",
        "GET",
        "/latest/meta-data/instance-id",
        Some("v1"),
    );
    assert_eq!(would(&s, &imds).would, "deny", "{text}");
    // Filled in as the comment says, the workload's own ids pass under
    // proxy and another's is refused.
    let filled = text
        .replace(
            "# credentials_ids = [\"<full credentials id 9b1d…>\", \"<full credentials id a3f0…>\"]",
            "credentials_ids = [\"9b1d0000-full\", \"a3f00000-full\"]",
        )
        .replace(
            "task_metadata = \"allow\"  # ids the relay cannot",
            "task_metadata = \"proxy\"  # ids the relay cannot",
        );
    let f = Config::parse(&filled, "filled.toml").unwrap_or_else(|e| panic!("{e}\n{filled}"));
    assert_eq!(f.workloads[0].task_metadata, Action::Proxy);
    let caller = |ids: Vec<String>| Caller {
        workload: Some(0),
        container: None,
        credentials_ids: ids,
        tmds_ids: Vec::new(),
        origin: "namespace /run/netns/cni-1".into(),
        ..Caller::default()
    };
    for (target, want) in [
        ("/v2/credentials/9b1d0000-full", true),
        ("/v2/credentials/someone-elses", false),
    ] {
        let req = Request {
            method: "GET",
            target,
            ..Request::default()
        };
        let forwarded = matches!(
            proxy_decision::decide(&f, Kind::Relay, &caller(Vec::new()), &req, |_| true),
            Step::Done(Verdict::Forward(_))
        );
        assert_eq!(forwarded, want, "{target}\n{filled}");
    }
}

#[test]
fn since_takes_units_and_refuses_the_rest() {
    assert_eq!(parse_since("30m"), Ok(1800));
    assert_eq!(parse_since("1h30m"), Ok(5400));
    assert_eq!(parse_since("7d"), Ok(604_800));
    for bad in [
        "",
        "10",
        "1x",
        "h",
        "0s",
        "99999999999999999999d",
        "-1h",
        "1.5h",
    ] {
        assert!(parse_since(bad).is_err(), "{bad:?}");
    }
    let e = parse_since("1 hour").expect_err("a space");
    assert!(e.to_string().contains("e.g. 30m"), "{e}");
}

#[test]
fn a_record_is_one_json_line_and_reads_back() {
    let r = records().remove(4);
    let line = serde_json::to_string(&r).expect("json");
    assert!(!line.contains('\n'));
    let back: Record = serde_json::from_str(&line).expect("reads back");
    assert_eq!(back, r);
}

#[test]
fn a_record_written_before_images_were_kept_still_reads() {
    let line = r#"{"v":1,"time":1.5,"service":"imds","workload":"w","container":{"id":"abc","name":"app","task_family":"web"},"caller":"port","family":"ipv4","method":"GET","path":"/latest/meta-data/instance-id","imds_version":"v1","status":200,"decision":"allow"}"#;
    let r: Record = serde_json::from_str(line).expect("an older record");
    let c = r.container.expect("its container");
    assert_eq!((c.name.as_str(), c.image), ("app", None));
}

#[test]
fn the_image_is_shown_in_the_report_and_the_suggestion() {
    let r = report(&enforced(), &records(), Window::default());
    let c = r.workloads[1].callers[0]
        .container
        .as_ref()
        .expect("a container");
    assert_eq!(c.image.as_deref(), Some("registry.example/v1app:1.0"));
    let text = suggest(&enforced(), &records());
    assert!(
        text.contains("by v1app (image registry.example/v1app:1.0);"),
        "{text}"
    );
}

#[test]
fn suggestion_golden() {
    insta::assert_snapshot!("suggestion", suggest(&enforced(), &records()));
}

/// The report's JSON schema (docs/observe.md), pinned.
#[test]
fn report_json_golden() {
    let mut recs = records();
    // The same container seen once without its name (a busy listing):
    // still one caller, described fully.
    let mut bare = recs[0].clone();
    bare.container = Some(ContainerInfo {
        id: "v1app-0123456789abcdef".into(),
        ..ContainerInfo::default()
    });
    bare.time = 1006.0;
    // ...and over the proxy's rate when it was observed.
    bare.over_limit = Some("rate".into());
    recs.push(bare);
    // A host process whose credentials id the relay could not attribute:
    // its workload needs credentials_ids.
    let mut unattributed = rec(
        1007.0,
        "host-network",
        "",
        "task_metadata",
        "GET",
        "/v2/credentials/9b1d…",
        None,
    );
    unattributed.own_id = Some(false);
    unattributed.caller_ids_known = Some(false);
    recs.push(unattributed);
    let window = Window {
        since: Some("24h".into()),
        skipped_lines: 1,
        truncated: true,
        ..Window::default()
    };
    // Connection records (docs/observe.md): v1app's UDP to IMDS, and the
    // host process's port-80 TCP next to its request.
    let conn = |workload: &str, c: &str, protocol: &str, port: u16| Connection {
        v: RECORD_VERSION,
        kind: KIND_CONNECTION.into(),
        time: 1007.0,
        first: 1006.5,
        count: 2,
        service: "imds".into(),
        workload: workload.into(),
        container: if c.is_empty() { None } else { container(c) },
        caller: if c.is_empty() {
            "host cgroup 4242".into()
        } else {
            format!("process in container {c}")
        },
        cgroup: "docker/x".into(),
        pid: 77,
        comm: "probe".into(),
        family: "ipv4".into(),
        protocol: protocol.into(),
        port,
        syscall: "connect".into(),
    };
    let conns = [
        conn("bridge-containers", "v1app", "udp", 53),
        conn("host-network", "", "tcp", 80),
    ];
    let r = report_with(&enforced(), &recs, &conns, window);
    let bridge = r
        .workloads
        .iter()
        .find(|w| w.workload == "bridge-containers")
        .expect("bridge");
    assert_eq!(bridge.callers.len(), 2);
    let json = serde_json::to_string_pretty(&r).expect("json");
    insta::assert_snapshot!("report_json", json);
}
