//! Senders the host's address and interface rules cannot see or tell
//! apart: awsvpc tasks behind their own ENI (F6), host-network containers
//! (F7), bridge containers behind a hop limit of 1 (F9), and callers of a
//! proxy that keys identity on source IP (F15).

use super::super::path::{Backend, Endpoints, Expect, Flow, Source, TargetKind};
use super::super::snapshot::Snapshot;
use super::evidence::{dedup, imds_flow_unguarded, names, Evidence};
use super::{Finding, Fix, FixAction, Severity};

pub(super) fn f6(snap: &Snapshot, flows: &[Flow], ep: &Endpoints) -> Option<Finding> {
    let hit: Vec<&Flow> = flows
        .iter()
        .filter(|f| {
            f.source == Source::AwsvpcTask
                && f.target != TargetKind::TaskCredentials
                && f.expect == Some(Expect::Block)
                && f.verdict.reaches()
        })
        .collect();
    if hit.is_empty() {
        return None;
    }
    let mut evidence = Evidence::default();
    evidence.deciders("", hit.iter().copied());
    evidence.line(format!(
        "ecs.config ECS_AWSVPC_BLOCK_IMDS={}",
        snap.ecs_config
            .get("ECS_AWSVPC_BLOCK_IMDS")
            .map_or("(unset)", String::as_str)
    ));
    evidence.deciders(
        "the bridge guard, never crossed by awsvpc traffic: ",
        flows.iter().filter(|f| {
            f.source == Source::BridgeContainer
                && f.target == TargetKind::ImdsV4
                && f.verdict.stopped()
        }),
    );
    let mut actions = Vec::new();
    for t in &snap.tasks {
        let Some(ns) = &t.netns else { continue };
        for f in &hit {
            let (v6, route) = match f.target {
                TargetKind::ImdsV6 => (true, format!("blackhole {}/128", ep.imds6)),
                _ => (false, format!("blackhole {}/32", ep.imds4)),
            };
            actions.push(FixAction::RouteAdd {
                v6,
                route,
                netns: Some(ns.clone()),
            });
        }
    }
    dedup(&mut actions);
    let mut fix = Fix::new("blackhole the IMDS addresses inside each task namespace", actions, "ECS_AWSVPC_BLOCK_IMDS=true in /etc/ecs/ecs.config before the agent starts (new tasks), or metaguard's `netns` workloads (`metaguard apply`)")
        .manual("set ECS_AWSVPC_BLOCK_IMDS=true in /etc/ecs/ecs.config and restart the ECS agent (applies to new tasks)");
    if fix.actions.is_empty() {
        fix = fix.refuse("no task namespace in the snapshot to fix; select them with a `netns` workload in the config");
    }
    Some(Finding {
        id: "F6",
        severity: Severity::Error,
        title: "awsvpc tasks reach IMDS: their traffic never crosses the host's rules".into(),
        flows: names(&hit),
        evidence: evidence.into_lines(),
        explanation: "An awsvpc task sends through its own ENI inside its own network namespace. DOCKER-USER and FORWARD rules on the host never see that traffic; only rules or routes inside each task namespace do.".into(),
        fix,
    })
}

pub(super) fn f7(snap: &Snapshot, flows: &[Flow]) -> Option<Finding> {
    if snap.docker.host_network_containers.is_empty() {
        return None;
    }
    let hit: Vec<&Flow> = flows
        .iter()
        .filter(|f| {
            f.source == Source::HostNetwork
                && f.target == TargetKind::ImdsV4
                && f.expect != Some(Expect::Reach)
                && f.verdict.reaches()
        })
        .collect();
    if hit.is_empty() {
        return None;
    }
    let evidence = Evidence::listing(
        snap.docker
            .host_network_containers
            .iter()
            .map(|c| format!("host-network container {} (cgroup {})", c.name, c.cgroup)),
    );
    Some(Finding {
        id: "F7",
        severity: Severity::Warning,
        title: "host-network containers reach IMDS".into(),
        flows: names(&hit),
        evidence: evidence.into_lines(),
        explanation: "Host-network containers share the host's stack and source address, so address- and interface-based rules cannot tell them from the ECS agent (AWS documents this as not possible). They can be told apart by cgroup.".into(),
        fix: Fix::new("deny IMDS by cgroup, keeping the agent's cgroup allowed", Vec::new(), "a `cgroups` workload with imds = \"deny\" (and the agent's cgroup allowed first), then `metaguard apply`")
            .manual("add [[workload]] cgroups = [\"docker\"] imds = \"deny\" after the ecs-agent workload, then run `metaguard apply`"),
    })
}

pub(super) fn f9(snap: &Snapshot, flows: &[Flow]) -> Option<Finding> {
    let o = snap.imds_options.as_ref()?;
    let hop = o.hop_limit?;
    if hop >= 2 {
        return None;
    }
    let hit: Vec<&Flow> = flows
        .iter()
        .filter(|f| {
            f.source == Source::BridgeContainer
                && f.target == TargetKind::ImdsV4
                && imds_flow_unguarded(f)
        })
        .collect();
    if hit.is_empty() {
        return None;
    }
    Some(Finding {
        id: "F9",
        severity: Severity::Warning,
        title: "IMDSv2 from bridge containers hangs: the token's hop limit is 1".into(),
        flows: names(&hit),
        evidence: Evidence::listing([format!("MetadataOptions HttpPutResponseHopLimit={hop}, HttpTokens={}", o.tokens.as_deref().unwrap_or("?"))]).into_lines(),
        explanation: "The response to PUT /latest/api/token leaves IMDS with IP TTL = hop limit; the host's forwarding hop to the bridge uses it up, so SDKs in bridge containers wait, then fall back or fail.".into(),
        fix: Fix::new("raise the hop limit to 2, or answer from the host", Vec::new(), "metaguard's proxy answers from the host, where hop count no longer matters")
            .manual("aws ec2 modify-instance-metadata-options --instance-id <id> --http-put-response-hop-limit 2"),
    })
}

pub(super) fn f15(flows: &[Flow]) -> Option<Finding> {
    let mut hit = Vec::new();
    let mut evidence = Evidence::default();
    for f in flows.iter().filter(|f| {
        f.target != TargetKind::TaskCredentials
            && matches!(f.source, Source::BridgeContainer | Source::AwsvpcTask)
            && f.verdict.reaches()
    }) {
        for s in f
            .steps
            .iter()
            .filter(|s| s.action.starts_with("dnat") || s.action.starts_with("redirect"))
        {
            if s.rule.backend == Backend::Nft && s.rule.table == "metaguard" {
                continue;
            }
            hit.push(f);
            evidence.rule(&format!("{} by ", s.action), &s.rule);
        }
    }
    if hit.is_empty() {
        return None;
    }
    dedup(&mut hit);
    Some(Finding {
        id: "F15",
        severity: Severity::Warning,
        title: "IMDS requests go to a proxy that can only tell callers apart by source IP".into(),
        flows: names(&hit),
        evidence: evidence.into_lines(),
        explanation: "A NAT rule sends containers' IMDS traffic to a local proxy. Seen after NAT, a caller is only a source IP; after container churn a new container can get an old one's IP and with it the old one's role.".into(),
        fix: Fix::new("identify callers by network namespace, veth or cgroup", Vec::new(), "metaguard's proxy mode (`imds = \"proxy\"`) identifies callers by namespace/veth/cgroup, never by IP alone")
            .manual("replace the IP-keyed proxy's DNAT with metaguard's proxy mode"),
    })
}
