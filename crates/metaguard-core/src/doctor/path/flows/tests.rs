//! The flows of small snapshots: which sources exist, what each expects
//! from the built-in config, and the flow-level verdicts (established
//! re-check, missing addresses, awsvpc IMDS in and out of a task
//! namespace).

use std::collections::BTreeMap;

use super::*;
use crate::config::Config;
use crate::doctor::path::test_support::{host, route, save4};
use crate::doctor::snapshot::{Docker, HostNetContainer, Link, NetState, Task};

fn link(name: &str, kind: Option<&str>) -> Link {
    Link {
        name: name.into(),
        kind: kind.map(str::to_string),
        master: None,
    }
}

/// A snapshot of `host` with the built-in config and nothing else.
fn snapshot(host: NetState) -> Snapshot {
    Snapshot {
        host,
        ecs_config: BTreeMap::new(),
        docker: Docker::default(),
        cgroup: None,
        boot: None,
        imds_options: None,
        probes: None,
        ethtool: Default::default(),
        config: Config::builtin_default(),
        tasks: Vec::new(),
    }
}

/// The test host with its links (docker0 a bridge).
fn bridged() -> NetState {
    NetState {
        links: vec![
            link("lo", None),
            link("eth0", Some("veth")),
            link("docker0", Some("bridge")),
        ],
        ..host()
    }
}

fn find(flows: &[Flow], source: Source, target: TargetKind) -> &Flow {
    flows
        .iter()
        .find(|f| f.source == source && f.target == target)
        .expect("flow present")
}

#[test]
fn container_bridges_are_docker_bridges_only() {
    let mut st = host();
    st.links = vec![
        link("br-2", Some("bridge")),
        link("docker0", Some("bridge")),
        link("docker_gwbridge", Some("bridge")),
        link("ecs-bridge", Some("bridge")),
        link("br-veth", Some("veth")),
        link("lxcbr0", Some("bridge")),
        link("br-1", None),
    ];
    assert_eq!(
        container_bridges(&snapshot(st)),
        ["br-1", "br-2", "docker0", "docker_gwbridge"]
    );
}

#[test]
fn awsvpc_is_seen_from_the_link_a_task_or_ecs_config() {
    assert!(!has_awsvpc(&snapshot(bridged())));
    let mut st = bridged();
    st.links.push(link("ecs-bridge", Some("bridge")));
    assert!(has_awsvpc(&snapshot(st)));
    let mut snap = snapshot(bridged());
    snap.ecs_config
        .insert("ECS_ENABLE_TASK_ENI".into(), "true".into());
    assert!(has_awsvpc(&snap));
}

#[test]
fn every_source_gets_one_flow_per_endpoint_with_its_expectation() {
    let mut snap = snapshot(bridged());
    snap.docker.host_network_containers.push(HostNetContainer {
        name: "web".into(),
        cgroup: "system.slice/docker-web.scope".into(),
    });
    let flows = evaluate(&snap);
    let names: Vec<_> = flows.iter().map(Flow::name).collect();
    assert_eq!(
        names,
        [
            "bridge container (docker0) → IMDS v4",
            "bridge container (docker0) → IMDS v6",
            "bridge container (docker0) → task credentials",
            "host-network process → IMDS v4",
            "host-network process → IMDS v6",
            "host-network process → task credentials",
            "ECS agent → IMDS v4",
            "ECS agent → IMDS v6",
            "ECS agent → task credentials",
        ]
    );
    // The built-in default: bridges deny IMDS and allow credentials; no
    // workload names host processes.
    let expects: Vec<_> = flows.iter().map(|f| f.expect).collect();
    let (b, r) = (Some(Expect::Block), Some(Expect::Reach));
    assert_eq!(expects, [b, b, r, None, None, None, None, None, None]);
}

#[test]
fn an_unguarded_bridge_reaches_imds_from_its_first_container_address() {
    let flows = evaluate(&snapshot(bridged()));
    let f = find(&flows, Source::BridgeContainer, TargetKind::ImdsV4);
    assert_eq!(f.verdict, Verdict::Reaches);
    assert_eq!(f.destination, "169.254.169.254:80");
    assert_eq!(f.delivered_to.as_deref(), Some("169.254.169.254:80"));
    assert_eq!(f.established, None, "re-checked only when stopped");
    let f = find(&flows, Source::BridgeContainer, TargetKind::ImdsV6);
    assert_eq!(f.verdict, Verdict::Reaches, "docker0 has fd00:d::1");
}

#[test]
fn f11_a_stopped_imds_flow_records_the_established_verdict() {
    let st = NetState {
        legacy4: Some(save4(
            "*filter
:FORWARD ACCEPT [0:0]
-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A FORWARD -d 169.254.169.254/32 -j DROP
COMMIT
",
        )),
        ..bridged()
    };
    let flows = evaluate(&snapshot(st));
    let f = find(&flows, Source::BridgeContainer, TargetKind::ImdsV4);
    assert_eq!(f.verdict, Verdict::TimesOut);
    assert_eq!(f.decided_by.as_ref().and_then(|d| d.position), Some(2));
    let (v, by) = f.established.clone().expect("re-checked");
    assert_eq!(
        (v, by.and_then(|d| d.position)),
        (Verdict::Reaches, Some(1))
    );
}

#[test]
fn a_bridge_without_ipv6_cannot_send_ipv6() {
    let mut st = bridged();
    st.addrs
        .retain(|a| !(a.ifname == "docker0" && a.addr.is_ipv6()));
    let flows = evaluate(&snapshot(st));
    let f = find(&flows, Source::BridgeContainer, TargetKind::ImdsV6);
    assert_eq!(f.verdict, Verdict::NotApplicable);
    assert_eq!(f.notes, ["docker0 has no IPv6 address"]);
    assert_eq!(f.decided_by, None);
}

#[test]
fn a_host_without_a_route_blocks_host_processes() {
    let st = NetState {
        routes6: Vec::new(),
        ..bridged()
    };
    let flows = evaluate(&snapshot(st));
    let f = find(&flows, Source::Agent, TargetKind::ImdsV6);
    assert_eq!(f.verdict, Verdict::Blocked);
    assert_eq!(f.notes, ["the host has no route to fd00:ec2::254"]);
}

#[test]
fn f6_awsvpc_imds_is_judged_from_ecs_config_without_a_task_namespace() {
    let mut snap = snapshot(bridged());
    snap.ecs_config
        .insert("ECS_ENABLE_TASK_ENI".into(), "true".into());
    let flows = evaluate(&snap);
    let f = find(&flows, Source::AwsvpcTask, TargetKind::ImdsV4);
    assert_eq!(
        (f.verdict, f.interface.as_deref()),
        (Verdict::Reaches, None)
    );
    assert_eq!(
        f.notes,
        ["no task namespace in the snapshot; judged from ecs.config"]
    );

    snap.ecs_config
        .insert("ECS_AWSVPC_BLOCK_IMDS".into(), "true".into());
    let flows = evaluate(&snap);
    let f = find(&flows, Source::AwsvpcTask, TargetKind::ImdsV6);
    assert_eq!(f.verdict, Verdict::Blocked);
    assert!(f.notes.is_empty());
}

#[test]
fn f6_awsvpc_imds_is_evaluated_in_the_task_namespace() {
    let mut task_ns = host();
    task_ns.routes4 = vec![
        route("default", Some("eth0"), "unicast"),
        route("169.254.169.254/32", None, "blackhole"),
    ];
    let mut snap = snapshot(bridged());
    snap.tasks.push(Task {
        name: "task1".into(),
        netns: Some("/run/netns/task1".into()),
        state: task_ns,
    });
    let flows = evaluate(&snap);
    let f = find(&flows, Source::AwsvpcTask, TargetKind::ImdsV4);
    assert_eq!(f.verdict, Verdict::Blocked);
    let d = f.decided_by.as_ref().expect("decided");
    assert_eq!(
        (d.rule.as_str(), d.netns.as_deref()),
        (
            "blackhole route 169.254.169.254/32 in the task namespace",
            Some("/run/netns/task1")
        )
    );
    // IPv6 leaves through the task's ENI and reaches, noted as such.
    let f = find(&flows, Source::AwsvpcTask, TargetKind::ImdsV6);
    assert_eq!(f.verdict, Verdict::Reaches);
    assert_eq!(
        f.notes,
        ["evaluated in task namespace task1 (the task's ENI; host rules are not crossed)"]
    );
    // Credentials still cross the host on ecs-bridge.
    let f = find(&flows, Source::AwsvpcTask, TargetKind::TaskCredentials);
    assert_eq!(f.interface.as_deref(), Some("ecs-bridge"));
}

#[test]
fn intent_matches_bridge_globs_and_cgroup_paths() {
    assert!(bridge_glob("br-*", "br-12") && bridge_glob("docker0", "docker0"));
    assert!(!bridge_glob("br-*", "docker0"));
    let config = Config::parse(
        "[[workload]]\nname = \"hostnet\"\ncgroups = [\"docker\"]\nimds = \"deny\"\n",
        "t.toml",
    )
    .expect("config parses");
    let snap = Snapshot {
        config,
        ..snapshot(bridged())
    };
    let spec = |cgroup: &str| SourceSpec {
        source: Source::HostNetwork,
        iface: None,
        src4: None,
        src6: None,
        cgroup: Some(cgroup.into()),
    };
    assert!(intent(&snap, &spec("docker/abc")).is_some());
    assert!(intent(&snap, &spec("system.slice/docker")).is_some());
    assert!(intent(&snap, &spec("system.slice/dockerd.service")).is_none());
}
