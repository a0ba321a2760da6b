//! One check per failure mode (failure-modes.md), each citing its id.
//!
//! A check reads the evaluated flows (see [`super::path`]) and the
//! snapshot, and yields at most one [`Finding`]: severity, the flows it
//! concerns, the evidence (the exact rules or settings), a plain
//! explanation, and the fix — concrete actions `--fix` can apply in the
//! backend and namespace where the problem lives, or the reason it will
//! not (ambiguous), plus the durable fix.

use std::net::IpAddr;

use serde::Serialize;

use super::path::Endpoints;
use super::path::{Backend, Expect, Flow, Hook, RuleRef, Source, TargetKind, Verdict};
use super::snapshot::Snapshot;

/// How bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Something is broken or exposed now.
    Error,
    /// Fragile or exposed under conditions (boot, churn, restarts).
    Warning,
}

/// One change `--fix` can make.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum FixAction {
    /// Insert an iptables rule at `position` (1-based) of `chain`.
    IptablesInsert {
        backend: Backend,
        family: String,
        table: String,
        chain: String,
        position: usize,
        args: Vec<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        netns: Option<String>,
    },
    /// Insert an nft rule before the rule with `before_handle` (append when None).
    NftInsert {
        family: String,
        table: String,
        chain: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        before_handle: Option<u64>,
        rule: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        netns: Option<String>,
    },
    Sysctl {
        key: String,
        value: String,
    },
    AddrAdd {
        addr: String,
        dev: String,
    },
    /// `ip [-6] route add ROUTE` in `netns`.
    RouteAdd {
        v6: bool,
        route: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        netns: Option<String>,
    },
    ConntrackDelete {
        destination: String,
    },
}

impl FixAction {
    /// The exact command line.
    pub fn argv(&self) -> Vec<String> {
        let s = |x: &str| x.to_string();
        match self {
            FixAction::IptablesInsert {
                backend,
                family,
                table,
                chain,
                position,
                args,
                ..
            } => {
                let prog = match (backend, family.as_str()) {
                    (Backend::Legacy, "ip6") => "ip6tables-legacy",
                    (Backend::Legacy, _) => "iptables-legacy",
                    (_, "ip6") => "ip6tables-nft",
                    _ => "iptables-nft",
                };
                let mut v = vec![
                    s(prog),
                    s("-w"),
                    s("-t"),
                    table.clone(),
                    s("-I"),
                    chain.clone(),
                    position.to_string(),
                ];
                v.extend(args.iter().cloned());
                v
            }
            FixAction::NftInsert {
                family,
                table,
                chain,
                before_handle,
                rule,
                ..
            } => {
                let mut v = match before_handle {
                    Some(_) => vec![s("nft"), s("insert"), s("rule")],
                    None => vec![s("nft"), s("add"), s("rule")],
                };
                v.extend([family.clone(), table.clone(), chain.clone()]);
                if let Some(h) = before_handle {
                    v.extend([s("position"), h.to_string()]);
                }
                v.push(rule.clone());
                v
            }
            FixAction::Sysctl { key, value } => {
                vec![s("sysctl"), s("-w"), format!("{key}={value}")]
            }
            FixAction::AddrAdd { addr, dev } => vec![
                s("ip"),
                s("addr"),
                s("add"),
                addr.clone(),
                s("dev"),
                dev.clone(),
            ],
            FixAction::RouteAdd { v6, route, .. } => {
                let mut v = vec![s("ip")];
                if *v6 {
                    v.push(s("-6"));
                }
                v.extend([s("route"), s("add")]);
                v.extend(route.split_whitespace().map(str::to_string));
                v
            }
            FixAction::ConntrackDelete { destination } => {
                vec![s("conntrack"), s("-D"), s("-d"), destination.clone()]
            }
        }
    }

    /// The namespace the action runs in (`None`: the host's).
    pub fn netns(&self) -> Option<&str> {
        match self {
            FixAction::IptablesInsert { netns, .. }
            | FixAction::NftInsert { netns, .. }
            | FixAction::RouteAdd { netns, .. } => netns.as_deref(),
            _ => None,
        }
    }

    /// A shell line (for display).
    pub fn shell(&self) -> String {
        let cmd = self
            .argv()
            .iter()
            .map(|a| {
                if a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./:=,+@".contains(c))
                {
                    a.clone()
                } else {
                    format!("'{}'", a.replace('\'', "'\\''"))
                }
            })
            .collect::<Vec<_>>()
            .join(" ");
        match self.netns() {
            Some(ns) => format!("nsenter --net={ns} {cmd}"),
            None => cmd,
        }
    }
}

/// How to repair a finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Fix {
    pub summary: String,
    /// What `--fix` applies, in order.
    pub actions: Vec<FixAction>,
    /// The same, as shell lines.
    pub commands: Vec<String>,
    /// Steps only an operator can take.
    pub manual: Vec<String>,
    /// Why `--fix` will not act (ambiguous), if so.
    pub refused: Option<String>,
    /// The fix that lasts.
    pub durable: String,
}

impl Fix {
    fn new(summary: impl Into<String>, actions: Vec<FixAction>, durable: impl Into<String>) -> Fix {
        let commands = actions.iter().map(FixAction::shell).collect();
        Fix {
            summary: summary.into(),
            actions,
            commands,
            manual: Vec::new(),
            refused: None,
            durable: durable.into(),
        }
    }

    fn manual(mut self, m: impl Into<String>) -> Fix {
        self.manual.push(m.into());
        self
    }

    fn refuse(mut self, why: impl Into<String>) -> Fix {
        self.refused = Some(why.into());
        self.actions.clear();
        self.commands.clear();
        self
    }
}

/// One failure mode found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// `F1` … `F17`.
    pub id: &'static str,
    pub severity: Severity,
    pub title: String,
    /// The flows concerned (`bridge container (docker0) → IMDS v4`).
    pub flows: Vec<String>,
    /// The rules and settings that cause it.
    pub evidence: Vec<String>,
    pub explanation: String,
    pub fix: Fix,
}

const DURABLE: &str = "`metaguard apply` (or the daemon) keeps the guard in a table of metaguard's own, restored within a second; proxy mode removes the need for DNAT to 127.0.0.1";

/// Runs every check.
pub fn check(snap: &Snapshot, flows: &[Flow]) -> Vec<Finding> {
    let ep = Endpoints::of(snap);
    let mut out = Vec::new();
    let checks: [&dyn Fn() -> Option<Finding>; 12] = [
        &|| f1(flows),
        &|| f2(snap, flows, &ep),
        &|| f3(snap, flows, &ep),
        &|| f4(snap, flows, &ep),
        &|| f5(snap, flows),
        &|| f6(snap, flows, &ep),
        &|| f7(snap, flows),
        &|| f8(snap, flows, &ep),
        &|| f9(snap, flows),
        &|| f10(snap, &ep),
        &|| f11(flows, &ep),
        &|| f15(flows),
    ];
    for c in checks {
        if let Some(f) = c() {
            out.push(f);
        }
    }
    out
}

fn names<'a>(fs: impl Iterator<Item = &'a Flow>) -> Vec<String> {
    fs.map(Flow::name).collect()
}

fn dedup<T: PartialEq>(v: &mut Vec<T>) {
    let mut out: Vec<T> = Vec::new();
    for x in v.drain(..) {
        if !out.contains(&x) {
            out.push(x);
        }
    }
    *v = out;
}

fn is_martian(f: &Flow) -> bool {
    f.decided_by
        .as_ref()
        .is_some_and(|d| d.backend == Backend::Kernel && d.rule.starts_with("martian"))
}

fn creds_should_reach(f: &Flow) -> bool {
    f.target == TargetKind::TaskCredentials && f.expect != Some(Expect::Block)
}

fn f1(flows: &[Flow]) -> Option<Finding> {
    let hit: Vec<&Flow> = flows
        .iter()
        .filter(|f| creds_should_reach(f) && is_martian(f))
        .collect();
    if hit.is_empty() {
        return None;
    }
    let mut evidence: Vec<String> = hit
        .iter()
        .flat_map(|f| {
            f.steps
                .iter()
                .filter(|s| s.action.starts_with("dnat"))
                .map(|s| s.rule.describe())
        })
        .collect();
    evidence.extend(
        hit.iter()
            .filter_map(|f| f.decided_by.as_ref().map(RuleRef::describe)),
    );
    dedup(&mut evidence);
    Some(Finding {
        id: "F1",
        severity: Severity::Error,
        title: "task credentials time out: DNATed packets to 127.0.0.1 are dropped as martians".into(),
        flows: names(hit.iter().copied()),
        evidence,
        explanation: "169.254.170.2:80 is DNATed to the agent on 127.0.0.1, but net.ipv4.conf.all.route_localnet is 0, so the kernel drops packets to 127/8 that arrive on a bridge. Containers wait for their timeout and the agent logs nothing.".into(),
        fix: Fix::new(
            "set net.ipv4.conf.all.route_localnet=1 (what ecs-init does)",
            vec![FixAction::Sysctl { key: "net.ipv4.conf.all.route_localnet".into(), value: "1".into() }],
            "persist it in /etc/sysctl.d/, or avoid DNAT to 127/8 (metaguard's proxy listens on 169.254.170.2 itself); route_localnet=1 also exposes 127.0.0.1 services to containers (F17): `metaguard apply` closes that",
        ),
    })
}

/// The ACCEPT that lets credentials past `drop` for a flow entering on `iface`.
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
            rule: format!("iifname \"{iface}\" ip daddr 127.0.0.0/8 tcp dport {port} accept"),
            netns: None,
        }),
        Backend::Kernel => Err("the packet is dropped by the kernel, not by a rule".into()),
    }
}

fn chain_len(snap: &Snapshot, r: &RuleRef) -> Option<usize> {
    let save = match (r.backend, r.family.as_str()) {
        (Backend::Legacy, "ip") => snap.host.legacy4.as_ref(),
        (Backend::Legacy, "ip6") => snap.host.legacy6.as_ref(),
        (Backend::IptablesNft, "ip") => snap.host.iptnft4.as_ref(),
        (Backend::IptablesNft, "ip6") => snap.host.iptnft6.as_ref(),
        _ => None,
    }?;
    save.table(&r.table)?.chain(&r.chain).map(|c| c.rules.len())
}

fn delivered_loopback(f: &Flow) -> Option<u16> {
    let d = f.delivered_to.as_deref()?;
    let (a, p) = d.rsplit_once(':')?;
    let ip: IpAddr = a.trim_matches(['[', ']']).parse().ok()?;
    if ip.is_loopback() {
        p.parse().ok()
    } else {
        None
    }
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

fn f2(snap: &Snapshot, flows: &[Flow], ep: &Endpoints) -> Option<Finding> {
    let hit = f2_flows(flows);
    if hit.is_empty() {
        return None;
    }
    let mut evidence: Vec<String> = hit
        .iter()
        .filter_map(|f| f.decided_by.as_ref().map(RuleRef::describe))
        .collect();
    dedup(&mut evidence);
    let fix = Fix::new(
        "accept tcp to 127.0.0.0/8 port 51679 from each bridge, before the drop, in the backend and chain that hold it",
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
        flows: names(hit.iter().copied()),
        evidence,
        explanation: "ecs-init DNATs 169.254.170.2:80 to 127.0.0.1:51679; a CIS-style rule (`-d 127.0.0.0/8 ! -i lo -j DROP`) then drops those packets in INPUT because they did not come in on lo. Containers time out; the agent never sees the request.".into(),
        fix,
    })
}

fn f3(snap: &Snapshot, flows: &[Flow], ep: &Endpoints) -> Option<Finding> {
    let mut hit = Vec::new();
    let mut evidence = Vec::new();
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
            evidence.push(format!("accepted by {}", o.describe()));
        }
        evidence.push(format!("but dropped by {}", d.describe()));
    }
    if hit.is_empty() {
        return None;
    }
    dedup(&mut evidence);
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
        flows: names(hit.iter().copied()),
        evidence,
        explanation: "Every base chain at a hook runs — both iptables backends (legacy and nft) and every nft table. An accept ends only its own chain; a drop in any other is final. The accept was put in a different backend or table than the drop.".into(),
        fix,
    })
}

fn imds_flow_unguarded(f: &Flow) -> bool {
    f.verdict.reaches()
        && f.steps
            .iter()
            .all(|s| !s.action.starts_with("dnat") && !s.action.starts_with("redirect"))
}

fn f4(snap: &Snapshot, flows: &[Flow], ep: &Endpoints) -> Option<Finding> {
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
    let mut evidence = Vec::new();
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
                    fw.rules.iter().any(|r| {
                        r.target == super::iptables_save::Target::Jump("DOCKER-USER".into())
                    })
                });
            evidence.push(format!(
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
        evidence.push("no DOCKER-USER chain and no rule on the path stops the packet".into());
    }
    for f in &hit {
        if let Some(d) = &f.decided_by {
            evidence.push(format!("{}: accepted by {}", f.name(), d.describe()));
        }
    }
    dedup(&mut evidence);
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
        flows: names(hit.iter().copied()),
        evidence,
        explanation: "The AWS recipe (`-I DOCKER-USER -d 169.254.169.254/32 -j DROP`) lives in chains that dockerd, `iptables -F`, `iptables-restore` and configuration management re-own: after a Docker restart it is gone and containers get the instance role's credentials again.".into(),
        fix: fix.manual("the fix above is lost again at the next Docker restart: use metaguard's own table"),
    })
}

fn f5(snap: &Snapshot, flows: &[Flow]) -> Option<Finding> {
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
    let mut evidence: Vec<String> = guarded
        .iter()
        .filter_map(|f| {
            f.decided_by
                .as_ref()
                .map(|d| format!("the guard: {}", d.describe()))
        })
        .collect();
    match boot.units.get("metaguard.service") {
        Some(u) => evidence.push(format!("metaguard.service Before={}", u.before.join(" "))),
        None => evidence.push(
            "no unit installs the guard before docker.service, and no cloud-init boothook holds it"
                .into(),
        ),
    }
    dedup(&mut evidence);
    Some(Finding {
        id: "F5",
        severity: Severity::Warning,
        title: "containers can reach IMDS during boot".into(),
        flows: names(guarded.iter().copied()),
        evidence,
        explanation: "The guard is installed after dockerd and the ECS agent start, so containers started at boot (restart policies, the agent's first tasks) have a window with no rule.".into(),
        fix: Fix::new("install a fail-closed ruleset before dockerd", Vec::new(), "`metaguard render systemd` (a unit ordered Before=docker.service) or `metaguard render boothook`")
            .manual("order the guard before docker.service: `metaguard render systemd > /etc/systemd/system/metaguard.service`"),
    })
}

fn f6(snap: &Snapshot, flows: &[Flow], ep: &Endpoints) -> Option<Finding> {
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
    let mut evidence: Vec<String> = hit
        .iter()
        .filter_map(|f| f.decided_by.as_ref().map(RuleRef::describe))
        .collect();
    evidence.push(format!(
        "ecs.config ECS_AWSVPC_BLOCK_IMDS={}",
        snap.ecs_config
            .get("ECS_AWSVPC_BLOCK_IMDS")
            .map_or("(unset)", String::as_str)
    ));
    let bridge_guard: Vec<String> = flows
        .iter()
        .filter(|f| {
            f.source == Source::BridgeContainer
                && f.target == TargetKind::ImdsV4
                && f.verdict.stopped()
        })
        .filter_map(|f| {
            f.decided_by.as_ref().map(|d| {
                format!(
                    "the bridge guard, never crossed by awsvpc traffic: {}",
                    d.describe()
                )
            })
        })
        .collect();
    evidence.extend(bridge_guard);
    dedup(&mut evidence);
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
        flows: names(hit.iter().copied()),
        evidence,
        explanation: "An awsvpc task sends through its own ENI inside its own network namespace. DOCKER-USER and FORWARD rules on the host never see that traffic; only rules or routes inside each task namespace do.".into(),
        fix,
    })
}

fn f7(snap: &Snapshot, flows: &[Flow]) -> Option<Finding> {
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
    let evidence = snap
        .docker
        .host_network_containers
        .iter()
        .map(|c| format!("host-network container {} (cgroup {})", c.name, c.cgroup))
        .collect();
    Some(Finding {
        id: "F7",
        severity: Severity::Warning,
        title: "host-network containers reach IMDS".into(),
        flows: names(hit.iter().copied()),
        evidence,
        explanation: "Host-network containers share the host's stack and source address, so address- and interface-based rules cannot tell them from the ECS agent (AWS documents this as not possible). They can be told apart by cgroup.".into(),
        fix: Fix::new("deny IMDS by cgroup, keeping the agent's cgroup allowed", Vec::new(), "a `cgroups` workload with imds = \"deny\" (and the agent's cgroup allowed first), then `metaguard apply`")
            .manual("add [[workload]] cgroups = [\"docker\"] imds = \"deny\" after the ecs-agent workload, then run `metaguard apply`"),
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

fn f8(snap: &Snapshot, flows: &[Flow], ep: &Endpoints) -> Option<Finding> {
    if snap.imds_options.as_ref().and_then(|o| o.ipv6.as_deref()) == Some("disabled") {
        return None;
    }
    let mut hit = Vec::new();
    let mut evidence = Vec::new();
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
            evidence.push(format!("IPv4 guard: {}", d.describe()));
            match mirror_v6(snap, d, ep) {
                Ok(a) => actions.push(a),
                Err(e) => refused = Some(e),
            }
        }
        evidence.push(format!(
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
    dedup(&mut evidence);
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
        flows: names(hit.iter().copied()),
        evidence,
        explanation: format!("IMDS also answers on {} (Nitro, when the IPv6 endpoint is on). The guard matches only {}.", ep.imds6, ep.imds4),
        fix,
    })
}

fn f9(snap: &Snapshot, flows: &[Flow]) -> Option<Finding> {
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
        flows: names(hit.iter().copied()),
        evidence: vec![format!("MetadataOptions HttpPutResponseHopLimit={hop}, HttpTokens={}", o.tokens.as_deref().unwrap_or("?"))],
        explanation: "The response to PUT /latest/api/token leaves IMDS with IP TTL = hop limit; the host's forwarding hop to the bridge uses it up, so SDKs in bridge containers wait, then fall back or fail.".into(),
        fix: Fix::new("raise the hop limit to 2, or answer from the host", Vec::new(), "metaguard's proxy answers from the host, where hop count no longer matters")
            .manual("aws ec2 modify-instance-metadata-options --instance-id <id> --http-put-response-hop-limit 2"),
    })
}

fn f10(snap: &Snapshot, ep: &Endpoints) -> Option<Finding> {
    let creds = IpAddr::V4(ep.creds);
    let mut evidence = Vec::new();
    for (save, backend) in [
        (snap.host.legacy4.as_ref(), Backend::Legacy),
        (snap.host.iptnft4.as_ref(), Backend::IptablesNft),
    ] {
        let Some(nat) = save.and_then(|s| s.table("nat")) else {
            continue;
        };
        for c in nat.chains.iter().filter(|c| c.name == "DOCKER") {
            for r in &c.rules {
                let to_creds = r.matches.iter().any(|m| !m.neg && matches!(&m.cond, super::iptables_save::Cond::Dst(d) if d.contains(creds) && d.len == 32));
                let port80 = r.matches.iter().any(|m| {
                    !m.neg
                        && matches!(&m.cond, super::iptables_save::Cond::Dport(p) if p.contains(80))
                });
                if to_creds
                    && port80
                    && matches!(r.target, super::iptables_save::Target::Dnat { .. })
                {
                    evidence.push(format!(
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
            evidence.push(format!(
                "container {} publishes {}:80 → {}",
                p.container.as_deref().unwrap_or("?"),
                p.host_ip,
                p.container_port.map_or("?".into(), |c| c.to_string())
            ));
        }
    }
    if evidence.is_empty() {
        return None;
    }
    let on_lo = snap.host.addrs.iter().any(|a| a.addr == creds);
    let (severity, title, fix) = if on_lo {
        (
            Severity::Warning,
            "the agent publishes 169.254.170.2:80: host port 80 is taken for every container",
            Fix::new("let metaguard own the 169.254.170.2 listener", Vec::new(), "run the agent with host networking; metaguard's proxy serves 169.254.170.2 without a published port"),
        )
    } else {
        evidence.push(format!("{} is not an address of this host (lo)", ep.creds));
        (
            Severity::Error,
            "the agent publishes 169.254.170.2:80 but the address is missing from lo",
            Fix::new(
                format!("add {}/32 to lo", ep.creds),
                vec![FixAction::AddrAdd { addr: format!("{}/32", ep.creds), dev: "lo".into() }],
                "run the agent with host networking; metaguard's proxy serves 169.254.170.2 without a published port",
            ),
        )
    };
    Some(Finding {
        id: "F10",
        severity,
        title: title.into(),
        flows: Vec::new(),
        evidence,
        explanation: "An agent without host networking publishes `169.254.170.2:80:51679`. That needs 169.254.170.2/32 on lo, and Docker then counts host port 80 as taken, so containers that bind 0.0.0.0:80 fail to start.".into(),
        fix,
    })
}

fn f11(flows: &[Flow], ep: &Endpoints) -> Option<Finding> {
    let mut hit = Vec::new();
    let mut evidence = Vec::new();
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
        evidence.push(format!(
            "established connections accepted by {}",
            acc.describe()
        ));
        if let Some(d) = &f.decided_by {
            evidence.push(format!("new ones stopped later by {}", d.describe()));
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
    dedup(&mut evidence);
    dedup(&mut actions);
    Some(Finding {
        id: "F11",
        severity: Severity::Warning,
        title: "connections opened before the block keep working".into(),
        flows: names(hit.iter().copied()),
        evidence,
        explanation: "A `ctstate RELATED,ESTABLISHED` accept comes before the IMDS block, so a container that connected before the rule existed keeps its connection (and can keep fetching credentials over it).".into(),
        fix: Fix::new("put the block before the established-accept and delete the existing conntrack entries", actions, "`metaguard apply` blocks before conntrack state is consulted and deletes conntrack entries towards the endpoints"),
    })
}

fn f15(flows: &[Flow]) -> Option<Finding> {
    let mut hit = Vec::new();
    let mut evidence = Vec::new();
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
            evidence.push(format!("{} by {}", s.action, s.rule.describe()));
        }
    }
    if hit.is_empty() {
        return None;
    }
    dedup(&mut hit);
    dedup(&mut evidence);
    Some(Finding {
        id: "F15",
        severity: Severity::Warning,
        title: "IMDS requests go to a proxy that can only tell callers apart by source IP".into(),
        flows: names(hit.iter().copied()),
        evidence,
        explanation: "A NAT rule sends containers' IMDS traffic to a local proxy. Seen after NAT, a caller is only a source IP; after container churn a new container can get an old one's IP and with it the old one's role.".into(),
        fix: Fix::new("identify callers by network namespace, veth or cgroup", Vec::new(), "metaguard's proxy mode (`imds = \"proxy\"`) identifies callers by namespace/veth/cgroup, never by IP alone")
            .manual("replace the IP-keyed proxy's DNAT with metaguard's proxy mode"),
    })
}
