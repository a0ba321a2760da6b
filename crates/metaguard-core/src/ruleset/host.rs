//! The host namespace's table: the endpoint sets, a chain per workload,
//! and the `prerouting`/`output` base chains that dispatch bridges and
//! cgroups to those chains through verdict maps.

use std::fmt::Write as _;

use super::decisions::{write_decisions, Hook};
use super::ports::{agent_guard, port_exceptions};
use super::proxy::{
    probe_rule, task_path, write_bridge_table, write_host_proxy_chains, ProxyPlan,
    BRIDGE_MARK_BASE, HOST_MARK_MASK, HOST_MARK_TAG, PROXY_ROUTE_MARK, PROXY_ROUTE_PRIORITY, SYN,
};
use super::sets::{depth, group, write_sets, CgroupIndex, IfnameIndex};
use super::{family, matched, quote, replace_prefix, HostFacts, FAMILY, TABLE};
use crate::config::{Config, Selector};

/// The host table's script; warnings about shadowed entries and selectors
/// that match nothing are added to `warnings`.
pub(super) fn host_script(
    config: &Config,
    facts: &HostFacts,
    proxy: Option<&ProxyPlan>,
    warnings: &mut Vec<String>,
) -> String {
    // Bridges: (glob, workload index), in config order.
    let bridge_entries: Vec<(String, usize)> = config
        .workloads
        .iter()
        .enumerate()
        .filter_map(|(i, w)| match &w.selector {
            Selector::Bridges(globs) => Some(globs.iter().map(move |g| (g.clone(), i))),
            _ => None,
        })
        .flatten()
        .collect();
    let bridge_groups = group(
        config,
        &bridge_entries,
        &mut IfnameIndex::default(),
        warnings,
    );

    // cgroup entries in config order: configured paths, and the cgroups of
    // host-network containers a `containers` selector matches.
    let mut cgroup_entries: Vec<(String, usize)> = Vec::new();
    for (i, w) in config.workloads.iter().enumerate() {
        match &w.selector {
            Selector::Cgroups(paths) => cgroup_entries.extend(paths.iter().map(|p| (p.clone(), i))),
            Selector::Containers(refs) => cgroup_entries.extend(
                matched(facts, refs)
                    .filter(|c| c.host_network)
                    .filter_map(|c| c.cgroup.clone())
                    .map(|p| (p, i)),
            ),
            _ => {}
        }
    }
    let cgroup_groups = group(
        config,
        &cgroup_entries,
        &mut CgroupIndex::default(),
        warnings,
    );

    // Containers and namespaces on a bridge that a later workload selects.
    let exceptions = port_exceptions(config, facts, warnings);
    let mut port_workloads: Vec<usize> = exceptions.iter().map(|e| e.workload).collect();
    port_workloads.sort_unstable();
    port_workloads.dedup();

    for w in &config.workloads {
        let Selector::Containers(refs) = &w.selector else {
            continue;
        };
        if facts.containers.is_none() {
            warnings.push(format!(
                "workload {:?}: containers selectors need the Docker API, which is not available here; it selects nothing",
                w.name
            ));
        } else if matched(facts, refs).next().is_none() {
            warnings.push(format!(
                "workload {:?}: no running container matches its containers selector",
                w.name
            ));
        }
    }

    // Workloads that get a chain in the host table.
    let mut host_workloads: Vec<usize> = bridge_groups
        .iter()
        .chain(cgroup_groups.iter())
        .flat_map(|g| g.iter().map(|(_, i)| *i))
        .collect();
    host_workloads.sort_unstable();
    host_workloads.dedup();
    // Host processes of a workload that proxies something: their packets
    // are marked in `output` and rerouted through `lo` to the proxy.
    let host_proxied = proxy.is_some()
        && host_workloads.iter().any(|&i| {
            let w = &config.workloads[i];
            !matches!(w.selector, Selector::Bridges(_))
                && (w.imds.via_proxy() || w.task_metadata.via_proxy())
        });

    let mut host = String::new();
    replace_prefix(&mut host);
    let _ = writeln!(host, "table {FAMILY} {TABLE} {{");
    let _ = writeln!(
        host,
        "\tcomment \"managed by metaguard; changes are overwritten\""
    );
    write_sets(&mut host, config);
    for &i in &host_workloads {
        let w = &config.workloads[i];
        let bridge = matches!(w.selector, Selector::Bridges(_));
        let _ = writeln!(host, "\tchain wl{i} {{");
        let _ = writeln!(
            host,
            "\t\tcomment {}",
            quote(&format!("workload {}", w.name))
        );
        let hook = if bridge {
            Hook::Bridge
        } else {
            Hook::HostOutput(i)
        };
        write_decisions(&mut host, "\t\t", config, i, hook);
        let _ = writeln!(host, "\t}}");
    }
    for &i in &port_workloads {
        let _ = writeln!(host, "\tchain wl{i}_ports {{");
        let _ = writeln!(
            host,
            "\t\tcomment {}",
            quote(&format!(
                "workload {} on bridge ports",
                config.workloads[i].name
            ))
        );
        write_decisions(&mut host, "\t\t", config, i, Hook::Bridge);
        let _ = writeln!(host, "\t}}");
    }
    if !exceptions.is_empty() {
        let elems: Vec<String> = exceptions
            .iter()
            .map(|e| format!("0x{:08x} : goto wl{}_ports", e.mark, e.workload))
            .collect();
        let _ = writeln!(host, "\tmap ports {{");
        let _ = writeln!(host, "\t\ttype mark : verdict");
        let _ = writeln!(host, "\t\telements = {{ {} }}", elems.join(", "));
        let _ = writeln!(host, "\t}}");
        if proxy.is_none() {
            // The bridge table's marks are ours alone: off again before
            // routing, as `proxy_route` does when the proxy runs.
            let _ = writeln!(host, "\tchain port_marks {{");
            let _ = writeln!(
                host,
                "\t\ttype filter hook prerouting priority {PROXY_ROUTE_PRIORITY}; policy accept;"
            );
            let _ = writeln!(
                host,
                "\t\tmeta mark & 0x{:08x} == 0x{BRIDGE_MARK_BASE:08x} meta mark set 0x00000000",
                BRIDGE_MARK_BASE | PROXY_ROUTE_MARK
            );
            let _ = writeln!(host, "\t}}");
        }
    }
    if let Some(p) = proxy {
        write_host_proxy_chains(&mut host, config, p, host_proxied);
    }
    // Per group, exact names go into a hash map and globs into an interval
    // map: within a group nothing overlaps, so the two lookups commute.
    let mut bridge_maps: Vec<String> = Vec::new();
    for (g, entries) in bridge_groups.iter().enumerate() {
        for (suffix, wild) in [("names", false), ("globs", true)] {
            let elems: Vec<String> = entries
                .iter()
                .filter(|(glob, _)| glob.ends_with('*') == wild)
                .map(|(glob, i)| format!("{} : goto wl{i}", quote(glob)))
                .collect();
            if elems.is_empty() {
                continue;
            }
            let name = format!("bridges{g}_{suffix}");
            let _ = writeln!(host, "\tmap {name} {{");
            let _ = writeln!(host, "\t\ttype ifname : verdict");
            if wild {
                let _ = writeln!(host, "\t\tflags interval");
            }
            let _ = writeln!(host, "\t\telements = {{ {} }}", elems.join(", "));
            let _ = writeln!(host, "\t}}");
            bridge_maps.push(name);
        }
    }
    // cgroup maps: one per (group, depth), since the depth is part of the
    // match expression.
    let mut cgroup_maps: Vec<CgroupMap<'_>> = Vec::new();
    for (g, entries) in cgroup_groups.iter().enumerate() {
        let mut depths: Vec<usize> = entries.iter().map(|(p, _)| depth(p)).collect();
        depths.sort_unstable_by(|a, b| b.cmp(a));
        depths.dedup();
        for d in depths {
            let name = format!("cgroups{g}_l{d}");
            let members = entries.iter().filter(|(p, _)| depth(p) == d).collect();
            cgroup_maps.push(CgroupMap {
                name,
                depth: d,
                members,
            });
        }
    }
    for CgroupMap {
        name,
        depth: d,
        members,
    } in &cgroup_maps
    {
        let _ = writeln!(host, "\tmap {name} {{");
        let _ = writeln!(host, "\t\ttypeof socket cgroupv2 level {d} : verdict");
        let elems: Vec<String> = members
            .iter()
            .map(|(p, i)| format!("{} : goto wl{i}", quote(p)))
            .collect();
        let _ = writeln!(host, "\t\telements = {{ {} }}", elems.join(", "));
        let _ = writeln!(host, "\t}}");
    }
    let mut prerouting: Vec<String> = Vec::new();
    if host_proxied {
        // Host processes' connections come back through `lo`, already
        // DNATed to a listener: a SYN nobody transparent listens for is
        // refused (apply alone, a stopped daemon: fail closed, fast).
        let host_mark = format!("meta mark & 0x{HOST_MARK_MASK:08x} == 0x{HOST_MARK_TAG:08x}");
        prerouting.push(format!(
            "\t\tiif \"lo\" {host_mark} {SYN} socket transparent 1 accept\n"
        ));
        prerouting.push(format!(
            "\t\tiif \"lo\" {host_mark} {SYN} reject with tcp reset\n"
        ));
    }
    for v6 in [false, true] {
        // Task namespaces' tables send IMDS requests to the task-metadata
        // address on the IMDS proxy's port, through whatever bridge they
        // are plugged into: from any bridge port (a bridge mark), that
        // port leads to the IMDS proxy, which serves each caller by its
        // own workload. Nothing else listens there.
        let Some(to) = task_path(config, v6) else {
            continue;
        };
        let (fam, sfx) = family(v6);
        let from_bridge =
            format!("meta mark & 0x{BRIDGE_MARK_BASE:08x} == 0x{BRIDGE_MARK_BASE:08x} ");
        let port = config.proxy.imds_port.to_string();
        prerouting.push(probe_rule("\t\t", &from_bridge, "tmd", v6, &port, to));
        prerouting.push(format!(
            "\t\t{from_bridge}{fam} daddr @tmd{sfx} tcp dport {port} {SYN} reject with tcp reset\n"
        ));
        prerouting.push(format!(
            "\t\t{from_bridge}{fam} daddr @tmd{sfx} tcp dport {port} accept\n"
        ));
    }
    if !exceptions.is_empty() {
        // Ahead of the bridges: the port's own workload comes first.
        prerouting.push("\t\tmeta mark vmap @ports\n".to_string());
    }
    prerouting.extend(
        bridge_maps
            .iter()
            .map(|name| format!("\t\tiifname vmap @{name}\n")),
    );
    if !prerouting.is_empty() {
        let _ = writeln!(host, "\tchain prerouting {{");
        let _ = writeln!(
            host,
            "\t\ttype filter hook prerouting priority raw; policy accept;"
        );
        host.extend(prerouting);
        let _ = writeln!(host, "\t}}");
    }
    if !cgroup_maps.is_empty() {
        // A route chain when host processes go to the proxy: the mark
        // their workload's chain sets reroutes them (policy route).
        let kind = if host_proxied { "route" } else { "filter" };
        let _ = writeln!(host, "\tchain output {{");
        let _ = writeln!(
            host,
            "\t\ttype {kind} hook output priority raw; policy accept;"
        );
        for CgroupMap { name, depth: d, .. } in &cgroup_maps {
            let _ = writeln!(host, "\t\tsocket cgroupv2 level {d} vmap @{name}");
        }
        let _ = writeln!(host, "\t}}");
    }
    let _ = writeln!(host, "}}");
    let agent = agent_guard(config, facts, warnings);
    if proxy.is_some() || !exceptions.is_empty() || agent.is_some() {
        write_bridge_table(
            &mut host,
            config,
            proxy.is_some(),
            &exceptions,
            agent.as_ref(),
        );
    }

    host
}

/// One `socket cgroupv2 level N` verdict map: entries of one lookup group
/// at one depth.
pub(super) struct CgroupMap<'a> {
    name: String,
    depth: usize,
    members: Vec<&'a (String, usize)>,
}
