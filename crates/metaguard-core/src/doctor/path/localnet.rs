//! The route_localnet reach-around (F17): a container that routes
//! 127.0.0.1 via its bridge gateway (it needs only NET_ADMIN in its own
//! namespace) sends the host a packet addressed to loopback, with no DNAT
//! on the way. With `route_localnet=1` the kernel accepts it, so unless a
//! rule drops 127/8 arriving on a non-loopback interface that was not
//! DNATed (`ct status dnat`), the container talks to the agent's port and
//! every other 127.0.0.1 service directly.
//!
//! Owns: the direct-to-loopback flows of every container bridge (and
//! `ecs-bridge` for awsvpc tasks). They are not part of the report's flow
//! table (which stays {workload} × {endpoint}); F17 reads them.

use std::net::{IpAddr, Ipv4Addr};

use super::super::snapshot::Snapshot;
use super::flows::{container_bridges, has_awsvpc};
use super::model::{sockaddr, Endpoints, Flow, Packet, Source, TargetKind, Trace};
use super::route::{iface_addr, settle};
use super::walk::Netns;

/// One flow per container bridge (and `ecs-bridge`): a new TCP connection
/// from the bridge's first container address straight to
/// `127.0.0.1:<agent port>`, entering the host on the bridge.
pub fn loopback_flows(snap: &Snapshot) -> Vec<Flow> {
    let ep = Endpoints::of(snap);
    let host = Netns::host(&snap.host);
    let mut bridges: Vec<(Source, String)> = container_bridges(snap)
        .into_iter()
        .map(|b| (Source::BridgeContainer, b))
        .collect();
    if has_awsvpc(snap) {
        bridges.push((Source::AwsvpcTask, "ecs-bridge".into()));
    }
    let dst = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let mut out = Vec::new();
    for (source, iface) in bridges {
        let mut flow = Flow::new(
            source,
            Some(iface.clone()),
            TargetKind::HostLoopback,
            sockaddr(dst, ep.agent_port),
        );
        let src = match iface_addr(&snap.host, &iface, false) {
            Some(IpAddr::V4(v)) => IpAddr::V4(Ipv4Addr::from(u32::from(v).wrapping_add(1))),
            _ => {
                flow.notes.push(format!("{iface} has no IPv4 address"));
                out.push(flow);
                continue;
            }
        };
        let mut tr = Trace::default();
        let mut p = Packet::first(src, dst, ep.agent_port, Some(iface), None);
        let (verdict, decider) = settle(host.enter(&mut p, &mut tr, true));
        flow.verdict = verdict;
        flow.decided_by = tr.decider(decider);
        flow.delivered_to = Some(sockaddr(p.dst, p.dport));
        flow.steps = tr.steps;
        flow.assumed_not_matching = tr.uncertain;
        out.push(flow);
    }
    out
}

#[cfg(test)]
mod tests;
