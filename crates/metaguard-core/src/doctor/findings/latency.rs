//! Blocks that fail slowly (F14): a silent DROP on the way to an endpoint
//! a workload is denied, where an SDK then waits its whole timeout
//! (botocore: 2 s for IMDS, 9 s for container credentials), and a
//! `reject with tcp reset` on bridged traffic, which br_netfilter loses.
//!
//! The fix inserts, right before the drop, the same rule with an ICMP
//! admin-prohibited reject: the same packets are stopped, at once.

use std::net::IpAddr;

use super::super::path::{Backend, Expect, Flow, RuleRef, TargetKind, Verdict};
use super::super::snapshot::Snapshot;
use super::credentials::chain_len;
use super::evidence::{dedup, names, Evidence};
use super::{Finding, Fix, FixAction, Severity, DURABLE};

/// The ICMP reject of an iptables family.
fn ipt_reject(family: &str) -> [&'static str; 4] {
    if family == "ip6" {
        ["-j", "REJECT", "--reject-with", "icmp6-adm-prohibited"]
    } else {
        ["-j", "REJECT", "--reject-with", "icmp-admin-prohibited"]
    }
}

/// The ICMP reject of an nft family.
fn nft_reject(family: &str) -> &'static str {
    match family {
        "ip" => "reject with icmp type admin-prohibited",
        "ip6" => "reject with icmpv6 type admin-prohibited",
        _ => "reject with icmpx type admin-prohibited",
    }
}

/// Whether a stopping rule is a `reject with tcp reset`.
fn is_tcp_reset(r: &RuleRef) -> bool {
    r.rule.contains("tcp-reset") || r.rule.contains("tcp reset")
}

/// br_netfilter passes bridged IPv4 traffic through iptables.
fn br_netfilter_on(snap: &Snapshot) -> bool {
    snap.host
        .sysctls
        .get("net.bridge.bridge-nf-call-iptables")
        .is_some_and(|v| v == "1")
}

/// The address and port a flow was delivered to (after NAT).
fn delivered(f: &Flow) -> Option<(IpAddr, u16)> {
    let d = f.delivered_to.as_deref().unwrap_or(&f.destination);
    let (a, p) = d.rsplit_once(':')?;
    Some((a.trim_matches(['[', ']']).parse().ok()?, p.parse().ok()?))
}

/// Whether the flow's destination lies on the bridge it enters on (the
/// packet is bridged, not routed).
fn bridged(snap: &Snapshot, f: &Flow) -> bool {
    let (Some(iface), Some((ip, _))) = (f.interface.as_deref(), delivered(f)) else {
        return false;
    };
    snap.host.addrs.iter().any(|a| {
        a.ifname == iface
            && a.addr.is_ipv4() == ip.is_ipv4()
            && super::super::iptables_save::Cidr {
                addr: a.addr,
                len: a.prefix,
            }
            .contains(ip)
    })
}

/// The action that rejects what `r` drops, inserted before it; `Err`: why not.
fn reject_before(snap: &Snapshot, f: &Flow, r: &RuleRef) -> Result<FixAction, String> {
    let (dst, port) = delivered(f).ok_or("the flow has no destination address")?;
    let host = |ip: IpAddr| match ip {
        IpAddr::V4(_) => format!("{ip}/32"),
        IpAddr::V6(_) => format!("{ip}/128"),
    };
    match r.backend {
        Backend::Legacy | Backend::IptablesNft => {
            if r.table != "filter" {
                return Err(format!(
                    "the drop is in the {} table, where REJECT is not allowed",
                    r.table
                ));
            }
            let (position, args) = match r.position {
                Some(p) => {
                    let j = r
                        .args
                        .iter()
                        .position(|a| a == "-j" || a == "--jump")
                        .ok_or("the dropping rule has no target to replace")?;
                    let mut args: Vec<String> = r.args[..j].to_vec();
                    args.extend(ipt_reject(&r.family).map(str::to_string));
                    (p, args)
                }
                None => {
                    let len = match &r.netns {
                        None => chain_len(snap, r).ok_or("the chain is not in the snapshot")?,
                        Some(_) => return Err("a policy drop inside a task namespace".into()),
                    };
                    let mut args = vec![
                        "-d".to_string(),
                        host(dst),
                        "-p".into(),
                        "tcp".into(),
                        "-m".into(),
                        "tcp".into(),
                        "--dport".into(),
                        port.to_string(),
                    ];
                    args.extend(ipt_reject(&r.family).map(str::to_string));
                    (len + 1, args)
                }
            };
            Ok(FixAction::IptablesInsert {
                backend: r.backend,
                family: r.family.clone(),
                table: r.table.clone(),
                chain: r.chain.clone(),
                position,
                args,
                netns: r.netns.clone(),
            })
        }
        Backend::Nft => {
            let reject = nft_reject(&r.family);
            let (before_handle, rule) = match r.handle {
                Some(h) => {
                    let head = r
                        .rule
                        .strip_suffix("drop")
                        .ok_or("the dropping nft rule does not end in `drop`")?;
                    (Some(h), format!("{head}{reject}"))
                }
                None => {
                    let fam = if dst.is_ipv4() { "ip" } else { "ip6" };
                    (None, format!("{fam} daddr {dst} tcp dport {port} {reject}"))
                }
            };
            Ok(FixAction::NftInsert {
                family: r.family.clone(),
                table: r.table.clone(),
                chain: r.chain.clone(),
                before_handle,
                rule,
                netns: r.netns.clone(),
            })
        }
        Backend::Kernel => Err("the kernel drops it, not a rule".into()),
    }
}

pub(super) fn f14(snap: &Snapshot, flows: &[Flow]) -> Option<Finding> {
    let br_nf = br_netfilter_on(snap);
    let hit: Vec<&Flow> = flows
        .iter()
        .filter(|f| {
            if f.target == TargetKind::HostLoopback {
                return false;
            }
            let Some(d) = &f.decided_by else {
                return false;
            };
            if d.backend == Backend::Kernel {
                return false;
            }
            match f.verdict {
                Verdict::TimesOut => f.expect == Some(Expect::Block),
                Verdict::Blocked => br_nf && is_tcp_reset(d) && bridged(snap, f),
                _ => false,
            }
        })
        .collect();
    if hit.is_empty() {
        return None;
    }
    let mut evidence = Evidence::default();
    let mut actions = Vec::new();
    let mut refused = Vec::new();
    for f in &hit {
        let Some(d) = &f.decided_by else { continue };
        let what = if f.verdict == Verdict::TimesOut {
            "dropped silently by"
        } else {
            "reset (bridged, br_netfilter on: the reset is lost) by"
        };
        evidence.rule(&format!("{}: {what} ", f.name()), d);
        match reject_before(snap, f, d) {
            Ok(a) => actions.push(a),
            Err(why) => refused.push(format!("{}: {why}", d.describe())),
        }
    }
    if hit.iter().any(|f| f.verdict == Verdict::Blocked) {
        evidence.line("net.bridge.bridge-nf-call-iptables = 1 (br_netfilter: bridged traffic crosses iptables)");
    }
    dedup(&mut actions);
    let mut fix = Fix::new(
        "reject at once (ICMP admin-prohibited) right before each silent drop, matching the same packets",
        actions,
        DURABLE,
    );
    if !refused.is_empty() {
        if fix.actions.is_empty() {
            fix = fix.refuse(refused.join("; "));
        } else {
            for r in refused {
                fix = fix.manual(format!("replace the drop by a reject by hand: {r}"));
            }
        }
    }
    Some(Finding {
        id: "F14",
        severity: Severity::Warning,
        title: "blocked endpoints fail slowly: a silent DROP makes SDKs wait their whole timeout".into(),
        flows: names(&hit),
        evidence: evidence.into_lines(),
        explanation: "A DROP sends nothing back: the SDK's connect waits for its timeout (botocore measured: IMDS 2 s, container credentials 9 s, with no fallback), on every call. An ICMP admin-prohibited reject fails the connection at once. With br_netfilter, a `reject with tcp reset` of bridged traffic was observed lost (timeouts), so the reject used is ICMP.".into(),
        fix,
    })
}
