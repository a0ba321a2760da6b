//! The tables inside task namespaces: which namespaces get one (first
//! matching workload wins) and what it holds.

use std::fmt::Write as _;
use std::net::SocketAddr;

use super::decisions::{write_decisions, Hook};
use super::proxy::{dnat_target, imds_proxy_addr, task_path, PROXY_NAT_PRIORITY};
use super::sets::write_sets;
use super::{family, matched, quote, replace_prefix, HostFacts, NetnsPlan, FAMILY, TABLE};
use crate::config::{Config, NetnsSelector, Selector};

pub(super) fn plan_netns(
    config: &Config,
    facts: &HostFacts,
    warnings: &mut Vec<String>,
) -> Vec<NetnsPlan> {
    let mut out: Vec<NetnsPlan> = Vec::new();
    for (i, w) in config.workloads.iter().enumerate() {
        if let Selector::Containers(refs) = &w.selector {
            // Containers with a stack of their own get a table inside it.
            for c in matched(facts, refs).filter(|c| !c.host_network) {
                let Some(path) = &c.netns else { continue };
                if out.iter().any(|p| &p.path == path) {
                    continue;
                }
                out.push(NetnsPlan {
                    path: path.clone(),
                    workload: w.name.clone(),
                    script: task_script(config, i),
                });
            }
            continue;
        }
        let Selector::Netns(sels) = &w.selector else {
            continue;
        };
        let mut found = 0usize;
        for sel in sels {
            let candidates: Vec<&String> = match sel {
                NetnsSelector::EcsTasks => match &facts.containers {
                    Some(cs) => cs
                        .iter()
                        .filter(|c| c.is_ecs_pause())
                        .filter_map(|c| c.netns.as_ref())
                        .collect(),
                    None => {
                        warnings.push(format!(
                            "workload {:?}: \"ecs-tasks\" needs the Docker API (unavailable here); no task namespaces found",
                            w.name
                        ));
                        Vec::new()
                    }
                },
                NetnsSelector::Path(glob) => match globset::Glob::new(glob) {
                    Ok(g) => {
                        let m = g.compile_matcher();
                        facts
                            .netns_paths
                            .iter()
                            .filter(|p| m.is_match(p.as_str()))
                            .collect()
                    }
                    Err(_) => Vec::new(),
                },
            };
            for path in candidates {
                if out.iter().any(|p| &p.path == path) {
                    continue; // an earlier workload (or entry) has it: first match wins
                }
                found += 1;
                out.push(NetnsPlan {
                    path: path.clone(),
                    workload: w.name.clone(),
                    script: task_script(config, i),
                });
            }
        }
        if found == 0
            && !sels
                .iter()
                .all(|s| *s == NetnsSelector::EcsTasks && facts.containers.is_none())
        {
            warnings.push(format!(
                "workload {:?}: no network namespace matches its netns selectors",
                w.name
            ));
        }
    }
    out
}

pub(super) fn task_script(config: &Config, i: usize) -> String {
    let w = &config.workloads[i];
    let mut s = String::new();
    replace_prefix(&mut s);
    let _ = writeln!(s, "table {FAMILY} {TABLE} {{");
    let _ = writeln!(
        s,
        "\tcomment {}",
        quote(&format!(
            "managed by metaguard for workload {}; changes are overwritten",
            w.name
        ))
    );
    write_sets(&mut s, config);
    let _ = writeln!(s, "\tchain output {{");
    let _ = writeln!(
        s,
        "\t\ttype filter hook output priority raw; policy accept;"
    );
    write_decisions(&mut s, "\t\t", config, i, Hook::Task);
    let _ = writeln!(s, "\t}}");
    if w.imds.via_proxy() {
        // To the host through ecs-bridge (the task's route to
        // 169.254.170.2), never via 127/8; the host DNATs it on to the
        // IMDS proxy.
        let _ = writeln!(s, "\tchain proxy_output {{");
        let _ = writeln!(
            s,
            "\t\ttype nat hook output priority {PROXY_NAT_PRIORITY}; policy accept;"
        );
        for v6 in [false, true] {
            if task_path(config, v6).is_none() {
                continue;
            }
            if let Some(p) = imds_proxy_addr(config, v6) {
                let (fam, sfx) = family(v6);
                let _ = writeln!(
                    s,
                    "\t\t{fam} daddr @imds{sfx} tcp dport 80 dnat {fam} to {}",
                    dnat_target(SocketAddr::new(p, config.proxy.imds_port))
                );
            }
        }
        let _ = writeln!(s, "\t}}");
    }
    let _ = writeln!(s, "}}");
    s
}
