//! The flows: which senders the snapshot shows, what the configuration
//! wants for each, and the evaluation of every (sender, endpoint) pair.
//!
//! Owns: the sources (bridge containers per bridge, awsvpc tasks,
//! host-network processes, the ECS agent) and the addresses and cgroups
//! they send from, the config's intent for each, how each kind of sender
//! enters the path (on a bridge, or locally generated), the awsvpc IMDS
//! flow that stays inside the task namespace (F6), and the established
//! re-check of stopped IMDS flows (F11). The path itself is
//! `route`'s and `walk`'s.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::super::snapshot::Snapshot;
use super::model::{
    sockaddr, Endpoints, Expect, Flow, Hook, Packet, RuleRef, Source, TargetKind, Trace, Verdict,
};
use super::route::{host_src, iface_addr, is_reject_route, route_text, settle};
use super::walk::Netns;
use crate::config::{Action, NetnsSelector, Selector};

/// Everything the analysis needs about one source.
#[derive(Debug, Clone)]
struct SourceSpec {
    source: Source,
    /// The interface it enters the host on (bridges, `ecs-bridge`).
    iface: Option<String>,
    src4: Option<Ipv4Addr>,
    src6: Option<Ipv6Addr>,
    /// The cgroup it sends from (host-network, agent).
    cgroup: Option<String>,
}

/// The address after `a` (a bridge's first container after its gateway).
fn next_addr(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V4(v) => IpAddr::V4(Ipv4Addr::from(u32::from(v).wrapping_add(1))),
        IpAddr::V6(v) => IpAddr::V6(Ipv6Addr::from(u128::from(v).wrapping_add(1))),
    }
}

/// The first container address on bridge `iface`, IPv4.
fn container_addr4(snap: &Snapshot, iface: &str) -> Option<Ipv4Addr> {
    match next_addr(iface_addr(&snap.host, iface, false)?) {
        IpAddr::V4(v) => Some(v),
        IpAddr::V6(_) => None,
    }
}

/// The first container address on bridge `iface`, IPv6.
fn container_addr6(snap: &Snapshot, iface: &str) -> Option<Ipv6Addr> {
    match next_addr(iface_addr(&snap.host, iface, true)?) {
        IpAddr::V6(v) => Some(v),
        IpAddr::V4(_) => None,
    }
}

/// Bridges that carry bridge-mode containers.
pub fn container_bridges(snap: &Snapshot) -> Vec<String> {
    let st = &snap.host;
    let mut out: Vec<String> = st
        .links
        .iter()
        .filter(|l| l.name != "ecs-bridge")
        .filter(|l| match &l.kind {
            Some(k) => {
                k == "bridge"
                    && (l.name == "docker0"
                        || l.name.starts_with("br-")
                        || l.name.starts_with("docker"))
            }
            None => l.name == "docker0" || l.name.starts_with("br-"),
        })
        .map(|l| l.name.clone())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Whether the host runs awsvpc tasks.
pub fn has_awsvpc(snap: &Snapshot) -> bool {
    snap.host.links.iter().any(|l| l.name == "ecs-bridge")
        || !snap.tasks.is_empty()
        || snap
            .ecs_config
            .get("ECS_ENABLE_TASK_ENI")
            .is_some_and(|v| v == "true")
}

/// A `bridges` selector's glob: a trailing `*` matches a prefix.
fn bridge_glob(g: &str, name: &str) -> bool {
    match g.strip_suffix('*') {
        Some(p) => name.starts_with(p),
        None => g == name,
    }
}

/// (imds, task_metadata) actions the config gives a source; `None` when no
/// workload selects it.
fn intent(snap: &Snapshot, s: &SourceSpec) -> Option<(Action, Action)> {
    for w in &snap.config.workloads {
        let hit = match (&w.selector, s.source) {
            (Selector::Bridges(gs), Source::BridgeContainer) => s
                .iface
                .as_deref()
                .is_some_and(|i| gs.iter().any(|g| bridge_glob(g, i))),
            (Selector::Netns(ns), Source::AwsvpcTask) => {
                !ns.is_empty()
                    && ns
                        .iter()
                        .any(|n| matches!(n, NetnsSelector::EcsTasks | NetnsSelector::Path(_)))
            }
            (Selector::Cgroups(cs), Source::HostNetwork | Source::Agent) => {
                s.cgroup.as_deref().is_some_and(|c| {
                    cs.iter().any(|p| {
                        c == p
                            || c.starts_with(&format!("{p}/"))
                            || c.ends_with(&format!("/{p}"))
                            || c.contains(&format!("/{p}/"))
                    })
                })
            }
            (Selector::Containers(_), _) => false,
            _ => false,
        };
        if hit {
            return Some((w.imds, w.task_metadata));
        }
    }
    None
}

/// Every source the snapshot shows, in report order.
fn sources(snap: &Snapshot) -> Vec<SourceSpec> {
    let mut specs = Vec::new();
    for b in container_bridges(snap) {
        specs.push(SourceSpec {
            source: Source::BridgeContainer,
            src4: container_addr4(snap, &b),
            src6: container_addr6(snap, &b),
            iface: Some(b),
            cgroup: None,
        });
    }
    if has_awsvpc(snap) {
        specs.push(SourceSpec {
            source: Source::AwsvpcTask,
            iface: Some("ecs-bridge".into()),
            src4: container_addr4(snap, "ecs-bridge"),
            src6: None,
            cgroup: None,
        });
    }
    let hostnet_cg = snap.docker.host_network_containers.first().map_or_else(
        || "docker/host-network-container".to_string(),
        |c| c.cgroup.clone(),
    );
    specs.push(SourceSpec {
        source: Source::HostNetwork,
        iface: None,
        src4: None,
        src6: None,
        cgroup: Some(hostnet_cg),
    });
    specs.push(SourceSpec {
        source: Source::Agent,
        iface: None,
        src4: None,
        src6: None,
        cgroup: Some(
            snap.docker
                .agent_cgroup
                .clone()
                .unwrap_or_else(|| "docker/ecs-agent".into()),
        ),
    });
    specs
}

/// Evaluates every flow of the snapshot.
pub fn evaluate(snap: &Snapshot) -> Vec<Flow> {
    let ep = Endpoints::of(snap);
    let host = Netns::host(&snap.host);
    let mut flows = Vec::new();
    for s in &sources(snap) {
        let acts = intent(snap, s);
        for target in TargetKind::ALL {
            let act = acts.map(|(i, t)| {
                if target == TargetKind::TaskCredentials {
                    t
                } else {
                    i
                }
            });
            let expect = match act {
                // Observe flows as allow does (through the proxy for HTTP).
                Some(Action::Allow | Action::Observe) => Some(Expect::Reach),
                Some(Action::Deny | Action::Proxy) => Some(Expect::Block),
                None => None,
            };
            let mut f = flow_one(snap, &host, &ep, s, target);
            f.expect = expect;
            flows.push(f);
        }
    }
    flows
}

/// Records a walked path in `flow`: its verdict and decider, the steps,
/// the uncertain rules and where the packet went.
fn record(flow: &mut Flow, (verdict, decider): (Verdict, Option<RuleRef>), tr: Trace, p: &Packet) {
    flow.verdict = verdict;
    flow.decided_by = tr.decider(decider);
    flow.delivered_to = Some(sockaddr(p.dst, p.dport));
    flow.steps = tr.steps;
    flow.assumed_not_matching = tr.uncertain;
}

fn flow_one(
    snap: &Snapshot,
    host: &Netns<'_>,
    ep: &Endpoints,
    s: &SourceSpec,
    target: TargetKind,
) -> Flow {
    let (dst, dport): (IpAddr, u16) = match target {
        TargetKind::ImdsV4 => (IpAddr::V4(ep.imds4), 80),
        TargetKind::ImdsV6 => (IpAddr::V6(ep.imds6), 80),
        TargetKind::TaskCredentials => (IpAddr::V4(ep.creds), 80),
        TargetKind::HostLoopback => (IpAddr::V4(Ipv4Addr::LOCALHOST), ep.agent_port),
    };
    let mut flow = Flow::new(s.source, s.iface.clone(), target, sockaddr(dst, dport));
    let local_service = target == TargetKind::TaskCredentials;
    // awsvpc IMDS: inside the task namespace, not through the host.
    if s.source == Source::AwsvpcTask && target != TargetKind::TaskCredentials {
        flow.interface = None;
        return awsvpc_imds(snap, flow, dst, dport);
    }
    let run = |p: &mut Packet, tr: &mut Trace| -> (Verdict, Option<RuleRef>) {
        match s.source {
            Source::BridgeContainer | Source::AwsvpcTask => {
                settle(host.enter(p, tr, local_service))
            }
            Source::HostNetwork | Source::Agent => settle(host.local_out(p, tr, local_service)),
        }
    };
    let src: Option<IpAddr> = match s.source {
        Source::BridgeContainer | Source::AwsvpcTask => {
            if dst.is_ipv6() {
                s.src6.map(IpAddr::V6)
            } else {
                s.src4.map(IpAddr::V4)
            }
        }
        Source::HostNetwork | Source::Agent => {
            host_src(host, dst).or_else(|| if host.is_local(dst) { Some(dst) } else { None })
        }
    };
    let Some(src) = src else {
        flow.notes.push(match &s.iface {
            Some(i) => format!(
                "{i} has no {} address",
                if dst.is_ipv6() { "IPv6" } else { "IPv4" }
            ),
            None => format!("the host has no route to {dst}"),
        });
        if s.iface.is_none() {
            flow.verdict = Verdict::Blocked;
            flow.decided_by = Some(RuleRef::kernel(
                Hook::Routing,
                format!("no route to {dst} (network unreachable)"),
            ));
        }
        return flow;
    };
    let mut tr = Trace::default();
    let mut p = Packet::first(src, dst, dport, s.iface.clone(), s.cgroup.clone());
    let outcome = run(&mut p, &mut tr);
    record(&mut flow, outcome, tr, &p);
    // A stopped IMDS flow: would a connection opened before the block
    // still work (F11)?
    if target != TargetKind::TaskCredentials && flow.verdict.stopped() && !p.dnat {
        let mut tr2 = Trace::default();
        let mut p2 = Packet::first(src, dst, dport, s.iface.clone(), s.cgroup.clone());
        p2.new = false;
        let (v2, d2) = run(&mut p2, &mut tr2);
        flow.established = Some((v2, tr2.decider(d2)));
    }
    flow
}

/// An awsvpc task's IMDS flow: evaluated in the first task namespace of
/// the snapshot, else judged by `ECS_AWSVPC_BLOCK_IMDS` in ecs.config.
fn awsvpc_imds(snap: &Snapshot, mut flow: Flow, dst: IpAddr, dport: u16) -> Flow {
    if let Some(task) = snap.tasks.first() {
        let ns = Netns {
            state: &task.state,
            label: Some(task.netns.clone().unwrap_or_else(|| task.name.clone())),
        };
        let Some(src) = host_src(&ns, dst) else {
            flow.verdict = match ns.lookup(dst) {
                Some(r) if is_reject_route(r) => Verdict::Blocked,
                Some(_) => Verdict::NotApplicable,
                None => Verdict::Blocked,
            };
            flow.decided_by = Some(RuleRef {
                netns: ns.label.clone(),
                ..RuleRef::kernel(
                    Hook::Routing,
                    match ns.lookup(dst) {
                        Some(r) => format!("{} in the task namespace", route_text(r)),
                        None => format!("no route to {dst} in the task namespace"),
                    },
                )
            });
            return flow;
        };
        let mut tr = Trace::default();
        let mut p = Packet::first(src, dst, dport, None, None);
        let outcome = settle(ns.local_out(&mut p, &mut tr, false));
        record(&mut flow, outcome, tr, &p);
        flow.notes.push(format!(
            "evaluated in task namespace {} (the task's ENI; host rules are not crossed)",
            task.name
        ));
        if snap.tasks.len() > 1 {
            flow.notes.push(format!(
                "{} task namespaces in the snapshot; the first is shown",
                snap.tasks.len()
            ));
        }
        return flow;
    }
    let block = snap
        .ecs_config
        .get("ECS_AWSVPC_BLOCK_IMDS")
        .is_some_and(|v| v == "true");
    if block {
        flow.verdict = Verdict::Blocked;
        flow.decided_by = Some(RuleRef::kernel(
            Hook::Routing,
            "ECS_AWSVPC_BLOCK_IMDS=true in ecs.config: the agent adds blackhole routes in each task namespace".into(),
        ));
    } else {
        flow.verdict = Verdict::Reaches;
        flow.decided_by = Some(RuleRef::kernel(
            Hook::Routing,
            "the task's own ENI inside the task namespace: the host's FORWARD/DOCKER-USER rules are never crossed, and ECS_AWSVPC_BLOCK_IMDS is not true".into(),
        ));
        flow.notes
            .push("no task namespace in the snapshot; judged from ecs.config".into());
    }
    flow
}

#[cfg(test)]
mod tests;
