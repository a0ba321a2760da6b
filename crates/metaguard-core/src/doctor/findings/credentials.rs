//! The task-credentials path: 169.254.170.2 DNATed to the agent on
//! 127.0.0.1 and dropped as a martian (F1) or by a hardening rule (F2),
//! an accept put in another table than the drop (F3), and the agent's
//! published port 80 (F10).

use std::net::IpAddr;

use super::super::iptables_save::{Cond, Target};
use super::super::path::{Backend, Endpoints, Expect, Flow, Hook, RuleRef};
use super::super::snapshot::Snapshot;
use super::evidence::{creds_should_reach, dedup, delivered_loopback, is_martian, names, Evidence};
use super::{localnet, Finding, Fix, FixAction, Severity, DURABLE};

/// F10's way out: the agent on a bridge with no published port, its
/// credentials relayed by metaguard (docs/deploy.md, "The ECS agent on a
/// bridge"; `metaguard render ecs-config` prints the recipe).
const AGENT_ON_A_BRIDGE: &str = "drop the published port: run the agent on a bridge without -p and set [agent] credentials = \"container:ecs-agent:51679\" with task_metadata = \"proxy\", so metaguard's relay serves 169.254.170.2 and forwards to the agent's container (docs/deploy.md, \"The ECS agent on a bridge\"; metaguard render ecs-config); or run the agent with host networking";

pub(super) fn f1(snap: &Snapshot, flows: &[Flow]) -> Option<Finding> {
    let hit: Vec<&Flow> = flows
        .iter()
        .filter(|f| creds_should_reach(f) && is_martian(f))
        .collect();
    if hit.is_empty() {
        return None;
    }
    let mut evidence = Evidence::default();
    for s in hit.iter().flat_map(|f| &f.steps) {
        if s.action.starts_with("dnat") {
            evidence.rule("", &s.rule);
        }
    }
    evidence.deciders("", hit.iter().copied());
    Some(Finding {
        id: "F1",
        severity: Severity::Error,
        title: "task credentials time out: DNATed packets to 127.0.0.1 are dropped as martians".into(),
        flows: names(&hit),
        evidence: evidence.into_lines(),
        explanation: "169.254.170.2:80 is DNATed to the agent on 127.0.0.1, but net.ipv4.conf.all.route_localnet is 0, so the kernel drops packets to 127/8 that arrive on a bridge. Containers wait for their timeout and the agent logs nothing.".into(),
        fix: f1_fix(snap, flows),
    })
}

/// F1's fix: route_localnet=1, preceded by the F17 guard whenever
/// route_localnet=1 would let containers reach 127.0.0.1 directly, so the
/// fix never opens F17.
fn f1_fix(snap: &Snapshot, flows: &[Flow]) -> Fix {
    let sysctl = FixAction::Sysctl {
        key: "net.ipv4.conf.all.route_localnet".into(),
        value: "1".into(),
    };
    let durable = "persist both in /etc/sysctl.d/ and your firewall config, or avoid DNAT to 127/8 altogether (metaguard's proxy listens on 169.254.170.2 itself; `metaguard apply` keeps the guard)";
    match localnet::guard_for_f1(snap, flows) {
        Some(guard) => Fix::new(
            "first drop 127.0.0.0/8 arriving on any interface but lo unless DNATed (else route_localnet=1 opens F17), then set net.ipv4.conf.all.route_localnet=1 (what ecs-init does)",
            vec![guard, sysctl],
            durable,
        ),
        None => Fix::new(
            "set net.ipv4.conf.all.route_localnet=1 (what ecs-init does); a rule already drops 127.0.0.0/8 that was not DNATed, so F17 stays closed",
            vec![sysctl],
            durable,
        ),
    }
}

/// The ACCEPT that lets credentials past `drop` for a flow entering on
/// `iface` — only what a DNAT rule rewrote (`ct status dnat`): an accept of
/// any packet to 127/8 from a bridge, inserted above an F17 guard, would
/// reopen F17.
fn accept_before(
    snap: &Snapshot,
    drop: &RuleRef,
    iface: &str,
    port: u16,
) -> Result<FixAction, String> {
    if drop.netns.is_some() {
        return Err(format!(
            "the drop lives in namespace {:?}, not on the host",
            drop.netns
        ));
    }
    match drop.backend {
        Backend::Legacy | Backend::IptablesNft => {
            let position = match drop.position {
                Some(p) => p,
                None => chain_len(snap, drop).map_or(1, |n| n + 1),
            };
            Ok(FixAction::IptablesInsert {
                backend: drop.backend,
                family: drop.family.clone(),
                table: drop.table.clone(),
                chain: drop.chain.clone(),
                position,
                args: [
                    "-i",
                    iface,
                    "-d",
                    "127.0.0.0/8",
                    "-p",
                    "tcp",
                    "-m",
                    "tcp",
                    "--dport",
                    &port.to_string(),
                    "-m",
                    "conntrack",
                    "--ctstate",
                    "DNAT",
                    "-j",
                    "ACCEPT",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect(),
                netns: None,
            })
        }
        Backend::Nft => Ok(FixAction::NftInsert {
            family: drop.family.clone(),
            table: drop.table.clone(),
            chain: drop.chain.clone(),
            before_handle: drop.handle,
            rule: format!(
                "iifname \"{iface}\" ip daddr 127.0.0.0/8 tcp dport {port} ct status dnat accept"
            ),
            netns: None,
        }),
        Backend::Kernel => Err("the packet is dropped by the kernel, not by a rule".into()),
    }
}

pub(super) fn chain_len(snap: &Snapshot, r: &RuleRef) -> Option<usize> {
    let save = match (r.backend, r.family.as_str()) {
        (Backend::Legacy, "ip") => snap.host.legacy4.as_ref(),
        (Backend::Legacy, "ip6") => snap.host.legacy6.as_ref(),
        (Backend::IptablesNft, "ip") => snap.host.iptnft4.as_ref(),
        (Backend::IptablesNft, "ip6") => snap.host.iptnft6.as_ref(),
        _ => None,
    }?;
    save.table(&r.table)?.chain(&r.chain).map(|c| c.rules.len())
}

/// Flows whose credentials are dropped by a rule at input after DNAT to 127/8.
fn f2_flows(flows: &[Flow]) -> Vec<&Flow> {
    flows
        .iter()
        .filter(|f| {
            creds_should_reach(f)
                && f.verdict.stopped()
                && f.interface.is_some()
                && delivered_loopback(f).is_some()
                && f.decided_by
                    .as_ref()
                    .is_some_and(|d| d.backend != Backend::Kernel && d.hook == Hook::Input)
        })
        .collect()
}

fn f2_actions(snap: &Snapshot, hit: &[&Flow], ep: &Endpoints) -> Result<Vec<FixAction>, String> {
    let mut actions = Vec::new();
    for f in hit {
        let (Some(d), Some(i)) = (&f.decided_by, &f.interface) else {
            continue;
        };
        let port = delivered_loopback(f).unwrap_or(ep.agent_port);
        actions.push(accept_before(snap, d, i, port)?);
    }
    dedup(&mut actions);
    Ok(actions)
}

pub(super) fn f2(snap: &Snapshot, flows: &[Flow], ep: &Endpoints) -> Option<Finding> {
    let hit = f2_flows(flows);
    if hit.is_empty() {
        return None;
    }
    let mut evidence = Evidence::default();
    evidence.deciders("", hit.iter().copied());
    let fix = Fix::new(
        "accept DNATed tcp to 127.0.0.0/8 port 51679 from each bridge (`ct status dnat`, so F17 stays closed), before the drop, in the backend and chain that hold it",
        Vec::new(),
        DURABLE,
    );
    let fix = match f2_actions(snap, &hit, ep) {
        Ok(a) => Fix::new(fix.summary, a, DURABLE),
        Err(why) => fix.refuse(why),
    };
    Some(Finding {
        id: "F2",
        severity: Severity::Error,
        title: "task credentials time out: a hardening rule drops the DNATed packets".into(),
        flows: names(&hit),
        evidence: evidence.into_lines(),
        explanation: "ecs-init DNATs 169.254.170.2:80 to 127.0.0.1:51679; a CIS-style rule (`-d 127.0.0.0/8 ! -i lo -j DROP`) then drops those packets in INPUT because they did not come in on lo. Containers time out; the agent never sees the request.".into(),
        fix,
    })
}

pub(super) fn f3(snap: &Snapshot, flows: &[Flow], ep: &Endpoints) -> Option<Finding> {
    let mut hit = Vec::new();
    let mut evidence = Evidence::default();
    for f in flows {
        let should = creds_should_reach(f) || (f.expect == Some(Expect::Reach));
        let Some(d) = &f.decided_by else { continue };
        if !should || !f.verdict.stopped() || d.backend == Backend::Kernel {
            continue;
        }
        let other: Vec<&RuleRef> = f
            .steps
            .iter()
            .filter(|s| {
                s.action == "accept"
                    && s.rule.hook == d.hook
                    && (s.rule.backend, &s.rule.family, &s.rule.table)
                        != (d.backend, &d.family, &d.table)
                    && !s.rule.rule.starts_with("policy")
            })
            .map(|s| &s.rule)
            .collect();
        if other.is_empty() {
            continue;
        }
        hit.push(f);
        for o in other {
            evidence.rule("accepted by ", o);
        }
        evidence.rule("but dropped by ", d);
    }
    if hit.is_empty() {
        return None;
    }
    let f2h: Vec<&Flow> = hit
        .iter()
        .copied()
        .filter(|f| f2_flows(flows).contains(f))
        .collect();
    let summary = "put the accept in the backend and table that drop, before the drop";
    let fix = if f2h.len() == hit.len() {
        match f2_actions(snap, &f2h, ep) {
            Ok(a) => Fix::new(summary, a, DURABLE),
            Err(why) => Fix::new(summary, Vec::new(), DURABLE).refuse(why),
        }
    } else {
        Fix::new(summary, Vec::new(), DURABLE).refuse("the accepted flow is not task credentials after DNAT; which rule to copy is ambiguous — copy the accept shown into the dropping chain yourself")
    };
    Some(Finding {
        id: "F3",
        severity: Severity::Error,
        title: "an accept in one table cannot override a drop in another".into(),
        flows: names(&hit),
        evidence: evidence.into_lines(),
        explanation: "Every base chain at a hook runs — both iptables backends (legacy and nft) and every nft table. An accept ends only its own chain; a drop in any other is final. The accept was put in a different backend or table than the drop.".into(),
        fix,
    })
}

pub(super) fn f10(snap: &Snapshot, ep: &Endpoints) -> Option<Finding> {
    let creds = IpAddr::V4(ep.creds);
    let mut lines = Vec::new();
    for (save, backend) in [
        (snap.host.legacy4.as_ref(), Backend::Legacy),
        (snap.host.iptnft4.as_ref(), Backend::IptablesNft),
    ] {
        let Some(nat) = save.and_then(|s| s.table("nat")) else {
            continue;
        };
        for c in nat.chains.iter().filter(|c| c.name == "DOCKER") {
            for r in &c.rules {
                let to_creds = r.matches.iter().any(|m| {
                    !m.neg && matches!(&m.cond, Cond::Dst(d) if d.contains(creds) && d.len == 32)
                });
                let port80 = r
                    .matches
                    .iter()
                    .any(|m| !m.neg && matches!(&m.cond, Cond::Dport(p) if p.contains(80)));
                if to_creds && port80 && matches!(r.target, Target::Dnat { .. }) {
                    lines.push(format!(
                        "{} nat DOCKER line {}: {}",
                        backend.as_str(),
                        r.line,
                        r.text
                    ));
                }
            }
        }
    }
    for p in &snap.docker.published {
        if p.host_ip == ep.creds.to_string() && p.host_port == 80 {
            lines.push(format!(
                "container {} publishes {}:80 → {}",
                p.container.as_deref().unwrap_or("?"),
                p.host_ip,
                p.container_port.map_or("?".into(), |c| c.to_string())
            ));
        }
    }
    if lines.is_empty() {
        return None;
    }
    let mut evidence = Evidence::listing(lines);
    let on_lo = snap.host.addrs.iter().any(|a| a.addr == creds);
    let (severity, title, fix) = if on_lo {
        (
            Severity::Warning,
            "the agent publishes 169.254.170.2:80: host port 80 is taken for every container",
            Fix::new(
                "let metaguard own the 169.254.170.2 listener",
                Vec::new(),
                AGENT_ON_A_BRIDGE,
            ),
        )
    } else {
        evidence.line(format!("{} is not an address of this host (lo)", ep.creds));
        (
            Severity::Error,
            "the agent publishes 169.254.170.2:80 but the address is missing from lo",
            Fix::new(
                format!("add {}/32 to lo", ep.creds),
                vec![FixAction::AddrAdd {
                    addr: format!("{}/32", ep.creds),
                    dev: "lo".into(),
                }],
                AGENT_ON_A_BRIDGE,
            ),
        )
    };
    Some(Finding {
        id: "F10",
        severity,
        title: title.into(),
        flows: Vec::new(),
        evidence: evidence.into_lines(),
        explanation: "An agent without host networking publishes `169.254.170.2:80:51679`. That needs 169.254.170.2/32 on lo, and Docker then counts host port 80 as taken, so containers that bind 0.0.0.0:80 fail to start.".into(),
        fix,
    })
}
