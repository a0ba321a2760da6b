//! The route_localnet reach-around (F17), and the guard that closes it —
//! which F1's fix also puts in first, so that turning route_localnet on
//! never opens F17.

use super::super::path::{loopback_flows, Backend, Flow};
use super::super::snapshot::Snapshot;
use super::evidence::{names, Evidence};
use super::{Finding, Fix, FixAction, Severity, DURABLE};

/// The guard's iptables arguments: drop what arrives for 127/8 on any
/// interface but lo, unless a DNAT rule rewrote it (ecs-init's
/// 169.254.170.2 → 127.0.0.1:51679 keeps working).
pub(super) const GUARD_ARGS: &[&str] = &[
    "-d",
    "127.0.0.0/8",
    "!",
    "-i",
    "lo",
    "-m",
    "conntrack",
    "!",
    "--ctstate",
    "DNAT",
    "-j",
    "DROP",
];

/// The iptables backend the guard goes in: the one that DNATs the
/// credentials (ecs-init's), else the one that holds rules (iptables-nft
/// when both or neither do).
fn guard_backend(snap: &Snapshot, flows: &[Flow]) -> Backend {
    let dnat = flows.iter().flat_map(|f| &f.steps).find_map(|s| {
        (s.action.starts_with("dnat")
            && s.rule.netns.is_none()
            && matches!(s.rule.backend, Backend::Legacy | Backend::IptablesNft))
        .then_some(s.rule.backend)
    });
    if let Some(b) = dnat {
        return b;
    }
    let holds =
        |s: &Option<super::super::iptables_save::Save>| s.as_ref().is_some_and(|s| !s.is_empty());
    if holds(&snap.host.legacy4) && !holds(&snap.host.iptnft4) {
        Backend::Legacy
    } else {
        Backend::IptablesNft
    }
}

/// The guard, at the top of filter INPUT in `backend`.
pub(super) fn guard_action(backend: Backend) -> FixAction {
    FixAction::IptablesInsert {
        backend,
        family: "ip".into(),
        table: "filter".into(),
        chain: "INPUT".into(),
        position: 1,
        args: GUARD_ARGS.iter().map(|s| s.to_string()).collect(),
        netns: None,
    }
}

/// The guard F1's fix must put in before it sets route_localnet=1: `Some`
/// when, with route_localnet on, a container could reach 127.0.0.1.
pub(super) fn guard_for_f1(snap: &Snapshot, flows: &[Flow]) -> Option<FixAction> {
    let mut on = snap.clone();
    on.host
        .sysctls
        .insert("net.ipv4.conf.all.route_localnet".into(), "1".into());
    loopback_flows(&on)
        .iter()
        .any(|f| f.verdict.reaches())
        .then(|| guard_action(guard_backend(snap, flows)))
}

pub(super) fn f17(snap: &Snapshot, flows: &[Flow]) -> Option<Finding> {
    let direct = loopback_flows(snap);
    let hit: Vec<&Flow> = direct.iter().filter(|f| f.verdict.reaches()).collect();
    if hit.is_empty() {
        return None;
    }
    let mut evidence = Evidence::default();
    for (k, v) in &snap.host.sysctls {
        if k.ends_with(".route_localnet") && v == "1" {
            evidence.line(format!("{k} = {v}"));
        }
    }
    for f in &hit {
        let iface = f.interface.as_deref().unwrap_or("?");
        match &f.decided_by {
            Some(d) => evidence.line(format!(
                "{}: a packet to {} entering on {iface} is accepted by {}",
                f.name(),
                f.destination,
                d.describe()
            )),
            None => evidence.line(format!(
                "{}: no rule drops a packet to {} entering on {iface} that was not DNATed",
                f.name(),
                f.destination
            )),
        }
    }
    let backend = guard_backend(snap, flows);
    Some(Finding {
        id: "F17",
        severity: Severity::Error,
        title: "containers can reach the host's 127.0.0.1 services directly (route_localnet reach-around)".into(),
        flows: names(&hit),
        evidence: evidence.into_lines(),
        explanation: "route_localnet=1 (set by ecs-init for its DNAT to 127.0.0.1:51679) makes the host accept packets addressed to 127.0.0.0/8 from other interfaces. A container with NET_ADMIN in its own namespace routes 127.0.0.1 via its bridge gateway and talks to the agent's credentials port — and every other loopback service — directly, past any proxy policy (the CVE-2020-8558 pattern).".into(),
        fix: Fix::new(
            format!(
                "drop 127.0.0.0/8 arriving on any interface but lo unless it was DNATed (`ct status dnat`), at the top of {} filter INPUT; ecs-init's DNATed credentials keep working",
                backend.as_str()
            ),
            vec![guard_action(backend)],
            DURABLE,
        ),
    })
}
