//! The IMDS guard lost or bypassed: the DOCKER-USER rule gone (F4), the
//! window before the guard exists at boot (F5), the IPv6 endpoint left
//! open (F8), and connections established before the block (F11).

use super::super::iptables_save::Target;
use super::super::path::{Backend, Endpoints, Expect, Flow, RuleRef, Source, TargetKind, Verdict};
use super::super::snapshot::Snapshot;
use super::evidence::{dedup, imds_flow_unguarded, names, Evidence};
use super::{Finding, Fix, FixAction, Severity, DURABLE};

pub(super) fn f4(snap: &Snapshot, flows: &[Flow], ep: &Endpoints) -> Option<Finding> {
    let hit: Vec<&Flow> = flows
        .iter()
        .filter(|f| {
            f.source == Source::BridgeContainer
                && f.target == TargetKind::ImdsV4
                && f.expect == Some(Expect::Block)
                && imds_flow_unguarded(f)
        })
        .collect();
    if hit.is_empty() {
        return None;
    }
    let mut evidence = Evidence::default();
    let mut with_du = Vec::new();
    let mut candidates = Vec::new();
    for (save, backend) in [
        (snap.host.legacy4.as_ref(), Backend::Legacy),
        (snap.host.iptnft4.as_ref(), Backend::IptablesNft),
    ] {
        let Some(save) = save else { continue };
        if !save.is_empty() {
            candidates.push(backend);
        }
        if let Some(du) = save.table("filter").and_then(|t| t.chain("DOCKER-USER")) {
            let jumped = save
                .table("filter")
                .and_then(|t| t.chain("FORWARD"))
                .is_some_and(|fw| {
                    fw.rules
                        .iter()
                        .any(|r| r.target == Target::Jump("DOCKER-USER".into()))
                });
            evidence.line(format!(
                "{} filter DOCKER-USER: {} rule(s), none for {}{}",
                backend.as_str(),
                du.rules.len(),
                ep.imds4,
                if jumped {
                    ""
                } else {
                    " (and FORWARD does not jump to it)"
                }
            ));
            if jumped {
                with_du.push(backend);
            }
        }
    }
    if evidence.is_empty() {
        evidence.line("no DOCKER-USER chain and no rule on the path stops the packet");
    }
    for f in &hit {
        evidence.deciders(&format!("{}: accepted by ", f.name()), [*f]);
    }
    let args = |iface: Option<&str>| {
        let mut a: Vec<String> = Vec::new();
        if let Some(i) = iface {
            a.extend(["-i".into(), i.to_string()]);
        }
        a.extend([
            "-d".into(),
            format!("{}/32", ep.imds4),
            "-j".into(),
            "REJECT".into(),
            "--reject-with".into(),
            "icmp-admin-prohibited".into(),
        ]);
        a
    };
    let summary = "re-add the AWS rule (as a fast reject) in the backend Docker uses";
    let fix = if with_du.len() == 1 {
        Fix::new(
            summary,
            vec![FixAction::IptablesInsert {
                backend: with_du[0],
                family: "ip".into(),
                table: "filter".into(),
                chain: "DOCKER-USER".into(),
                position: 1,
                args: args(None),
                netns: None,
            }],
            DURABLE,
        )
    } else if with_du.is_empty() && candidates.len() == 1 {
        let actions = hit
            .iter()
            .filter_map(|f| f.interface.as_deref())
            .map(|i| FixAction::IptablesInsert {
                backend: candidates[0],
                family: "ip".into(),
                table: "filter".into(),
                chain: "FORWARD".into(),
                position: 1,
                args: args(Some(i)),
                netns: None,
            })
            .collect();
        Fix::new(summary, actions, DURABLE)
    } else {
        Fix::new(summary, Vec::new(), DURABLE).refuse(format!(
            "ambiguous: {} iptables backends hold rules and {} have a DOCKER-USER chain that FORWARD jumps to; run `metaguard apply` instead",
            candidates.len(),
            with_du.len()
        ))
    };
    Some(Finding {
        id: "F4",
        severity: Severity::Error,
        title: "bridge containers reach IMDS: the DOCKER-USER rule is missing".into(),
        flows: names(&hit),
        evidence: evidence.into_lines(),
        explanation: "The AWS recipe (`-I DOCKER-USER -d 169.254.169.254/32 -j DROP`) lives in chains that dockerd, `iptables -F`, `iptables-restore` and configuration management re-own: after a Docker restart it is gone and containers get the instance role's credentials again.".into(),
        fix: fix.manual("the fix above is lost again at the next Docker restart: use metaguard's own table"),
    })
}

pub(super) fn f5(snap: &Snapshot, flows: &[Flow]) -> Option<Finding> {
    let boot = snap.boot.as_ref()?;
    let guarded: Vec<&Flow> = flows
        .iter()
        .filter(|f| {
            f.source == Source::BridgeContainer
                && f.target == TargetKind::ImdsV4
                && f.expect == Some(Expect::Block)
                && f.verdict.stopped()
        })
        .collect();
    if guarded.is_empty() || !boot.units.contains_key("docker.service") {
        return None;
    }
    let before_docker = |u: &str| {
        boot.units
            .get(u)
            .is_some_and(|u| u.before.iter().any(|b| b == "docker.service"))
    };
    let guard_in_metaguard = guarded.iter().all(|f| {
        f.decided_by
            .as_ref()
            .is_some_and(|d| d.backend == Backend::Nft && d.table == "metaguard")
    });
    let safe = (guard_in_metaguard && before_docker("metaguard.service"))
        || !boot.boothooks_with_imds_rule.is_empty();
    if safe {
        return None;
    }
    let mut evidence = Evidence::default();
    evidence.deciders("the guard: ", guarded.iter().copied());
    match boot.units.get("metaguard.service") {
        Some(u) => evidence.line(format!("metaguard.service Before={}", u.before.join(" "))),
        None => evidence.line(
            "no unit installs the guard before docker.service, and no cloud-init boothook holds it",
        ),
    }
    Some(Finding {
        id: "F5",
        severity: Severity::Warning,
        title: "containers can reach IMDS during boot".into(),
        flows: names(&guarded),
        evidence: evidence.into_lines(),
        explanation: "The guard is installed after dockerd and the ECS agent start, so containers started at boot (restart policies, the agent's first tasks) have a window with no rule.".into(),
        fix: Fix::new("install a fail-closed ruleset before dockerd", Vec::new(), "`metaguard render systemd` (a unit ordered Before=docker.service) or `metaguard render boothook`")
            .manual("order the guard before docker.service: `metaguard render systemd > /etc/systemd/system/metaguard.service`"),
    })
}

fn mirror_v6(snap: &Snapshot, d: &RuleRef, ep: &Endpoints) -> Result<FixAction, String> {
    match d.backend {
        Backend::Legacy | Backend::IptablesNft if d.netns.is_none() => {
            let save6 = match d.backend {
                Backend::Legacy => snap.host.legacy6.as_ref(),
                _ => snap.host.iptnft6.as_ref(),
            };
            let has_chain = save6.and_then(|s| s.table(&d.table)).and_then(|t| t.chain(&d.chain)).is_some();
            let builtin = ["INPUT", "FORWARD", "OUTPUT", "PREROUTING", "POSTROUTING"].contains(&d.chain.as_str());
            let chain = if has_chain || builtin { d.chain.clone() } else { "FORWARD".into() };
            if d.args.is_empty() {
                return Err(format!("the IPv4 guard is a chain policy ({}), not a rule to mirror", d.describe()));
            }
            let mut args = Vec::new();
            let mut i = 0;
            while i < d.args.len() {
                let a = d.args[i].as_str();
                match a {
                    "-s" | "--source" => {
                        if args.last().is_some_and(|l| l == "!") {
                            args.pop();
                        }
                        i += 2;
                        continue;
                    }
                    "-d" | "--destination" => {
                        args.push("-d".into());
                        args.push(format!("{}/128", ep.imds6));
                        i += 2;
                        continue;
                    }
                    "--reject-with" => {
                        args.push("--reject-with".into());
                        args.push("icmp6-adm-prohibited".into());
                        i += 2;
                        continue;
                    }
                    "icmp" => {
                        args.push("ipv6-icmp".into());
                    }
                    _ => args.push(a.to_string()),
                }
                i += 1;
            }
            if !args.iter().any(|a| a == "-d") {
                return Err(format!("the IPv4 guard does not match on the destination ({}); mirroring it would be a guess", d.describe()));
            }
            Ok(FixAction::IptablesInsert {
                backend: d.backend,
                family: "ip6".into(),
                table: d.table.clone(),
                chain,
                position: 1,
                args,
                netns: None,
            })
        }
        _ => Err(format!("the IPv4 guard is {}; add its IPv6 counterpart there yourself, or run `metaguard apply` (guards both families)", d.describe())),
    }
}

pub(super) fn f8(snap: &Snapshot, flows: &[Flow], ep: &Endpoints) -> Option<Finding> {
    if snap.imds_options.as_ref().and_then(|o| o.ipv6.as_deref()) == Some("disabled") {
        return None;
    }
    let mut hit = Vec::new();
    let mut evidence = Evidence::default();
    let mut actions = Vec::new();
    let mut refused = None;
    for v6 in flows.iter().filter(|f| {
        f.target == TargetKind::ImdsV6
            && f.verdict.reaches()
            && f.source != Source::AwsvpcTask
            && f.expect != Some(Expect::Reach)
    }) {
        let Some(v4) = flows.iter().find(|f| {
            f.target == TargetKind::ImdsV4 && f.source == v6.source && f.interface == v6.interface
        }) else {
            continue;
        };
        if !v4.verdict.stopped() {
            continue;
        }
        hit.push(v6);
        if let Some(d) = &v4.decided_by {
            evidence.rule("IPv4 guard: ", d);
            match mirror_v6(snap, d, ep) {
                Ok(a) => actions.push(a),
                Err(e) => refused = Some(e),
            }
        }
        evidence.line(format!(
            "{}: {}",
            v6.name(),
            v6.decided_by
                .as_ref()
                .map_or("no rule stops it".into(), |d| format!(
                    "accepted by {}",
                    d.describe()
                ))
        ));
    }
    if hit.is_empty() {
        return None;
    }
    dedup(&mut actions);
    let mut fix = Fix::new(
        format!(
            "guard {} like the IPv4 endpoint, in the same backend and chain",
            ep.imds6
        ),
        actions,
        "`metaguard apply` guards every endpoint in both families",
    );
    if let Some(r) = refused {
        fix = fix.refuse(r);
    }
    Some(Finding {
        id: "F8",
        severity: Severity::Error,
        title: "IPv6 bypass: IMDS is blocked over IPv4 only".into(),
        flows: names(&hit),
        evidence: evidence.into_lines(),
        explanation: format!("IMDS also answers on {} (Nitro, when the IPv6 endpoint is on). The guard matches only {}.", ep.imds6, ep.imds4),
        fix,
    })
}

pub(super) fn f11(flows: &[Flow], ep: &Endpoints) -> Option<Finding> {
    let mut hit = Vec::new();
    let mut evidence = Evidence::default();
    let mut actions = Vec::new();
    for f in flows.iter().filter(|f| {
        f.target != TargetKind::TaskCredentials
            && f.expect == Some(Expect::Block)
            && f.verdict.stopped()
    }) {
        let Some((Verdict::Reaches, Some(acc))) = &f.established else {
            continue;
        };
        hit.push(f);
        evidence.rule("established connections accepted by ", acc);
        if let Some(d) = &f.decided_by {
            evidence.rule("new ones stopped later by ", d);
            if d.backend != Backend::Kernel
                && !d.args.is_empty()
                && (d.backend, &d.table, &d.chain) == (acc.backend, &acc.table, &acc.chain)
            {
                if let Some(pos) = acc.position {
                    actions.push(FixAction::IptablesInsert {
                        backend: d.backend,
                        family: d.family.clone(),
                        table: d.table.clone(),
                        chain: d.chain.clone(),
                        position: pos,
                        args: d.args.clone(),
                        netns: d.netns.clone(),
                    });
                }
            }
        }
        actions.push(FixAction::ConntrackDelete {
            destination: if f.target == TargetKind::ImdsV6 {
                ep.imds6.to_string()
            } else {
                ep.imds4.to_string()
            },
        });
    }
    if hit.is_empty() {
        return None;
    }
    dedup(&mut actions);
    Some(Finding {
        id: "F11",
        severity: Severity::Warning,
        title: "connections opened before the block keep working".into(),
        flows: names(&hit),
        evidence: evidence.into_lines(),
        explanation: "A `ctstate RELATED,ESTABLISHED` accept comes before the IMDS block, so a container that connected before the rule existed keeps its connection (and can keep fetching credentials over it).".into(),
        fix: Fix::new("put the block before the established-accept and delete the existing conntrack entries", actions, "`metaguard apply` blocks before conntrack state is consulted and deletes conntrack entries towards the endpoints"),
    })
}
