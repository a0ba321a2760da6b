//! The host around the rules: the ENA link-local packet allowance (F21),
//! Docker's own firewall turned off (F22), and a metaguard table that
//! this version would not render (F23).

use std::collections::BTreeSet;

use super::super::snapshot::Snapshot;
use super::evidence::Evidence;
use super::{Finding, Fix, Severity};
use crate::ruleset::{self, ContainerFact, HostFacts};

/// The ENA counter of packets dropped over the link-local allowance.
const LINKLOCAL: &str = "linklocal_allowance_exceeded";

pub(super) fn f21(snap: &Snapshot) -> Option<Finding> {
    let mut evidence = Evidence::default();
    for (iface, s) in &snap.ethtool {
        if let Some(n) = s.counters.get(LINKLOCAL).filter(|n| **n > 0) {
            evidence.line(format!(
                "{iface} ({}): {LINKLOCAL} = {n}",
                s.driver.as_deref().unwrap_or("?")
            ));
        }
    }
    if evidence.is_empty() {
        return None;
    }
    Some(Finding {
        id: "F21",
        severity: Severity::Warning,
        title: "link-local packets were dropped over the ENA allowance (IMDS, DNS, time sync)".into(),
        flows: Vec::new(),
        evidence: evidence.into_lines(),
        explanation: "Each ENI may send about 1024 packets per second to link-local services — IMDS (the SDKs' and the ECS agent's credential fetches), the Route 53 Resolver at 169.254.169.253 and the time sync service at 169.254.169.123 share it. Packets over it are dropped silently: credential and DNS requests time out in bursts. The counter counts since the driver loaded; compare two readings to see whether it still grows.".into(),
        fix: Fix::new("send fewer link-local packets", Vec::new(), "cache what callers fetch: SDK credential caching, a local DNS cache (systemd-resolved, dnsmasq), and metaguard's proxy, which answers repeated IMDS reads from the host")
            .manual("find the caller that polls IMDS or DNS hardest (per-container request rates in metaguard's proxy metrics, or a packet capture) and make it cache"),
    })
}

/// The Docker chains dockerd makes when it manages the firewall.
fn docker_chains_present(snap: &Snapshot) -> bool {
    [&snap.host.legacy4, &snap.host.iptnft4]
        .into_iter()
        .flatten()
        .any(|s| {
            s.tables.iter().any(|t| {
                t.chains
                    .iter()
                    .any(|c| c.name == "DOCKER" || c.name == "DOCKER-USER")
            })
        })
        || snap.host.nft.as_ref().is_some_and(|r| {
            r.tables.iter().any(|t| {
                t.chains
                    .iter()
                    .any(|c| c.name == "DOCKER" || c.name == "DOCKER-USER")
            })
        })
}

pub(super) fn f22(snap: &Snapshot) -> Option<Finding> {
    let d = snap.docker.daemon.as_ref()?;
    let mut evidence = Evidence::default();
    if d.iptables == Some(false) {
        evidence.line("/etc/docker/daemon.json: \"iptables\": false");
    }
    if d.bridge.as_deref() == Some("none") {
        evidence.line("/etc/docker/daemon.json: \"bridge\": \"none\"");
    }
    if d.running && d.iptables != Some(false) && !docker_chains_present(snap) {
        evidence.line("dockerd runs, but neither iptables backend nor nft holds a DOCKER or DOCKER-USER chain");
    }
    if evidence.is_empty() {
        return None;
    }
    Some(Finding {
        id: "F22",
        severity: Severity::Warning,
        title: "Docker's own firewall is off: no DOCKER-USER chain for an IMDS guard".into(),
        flows: Vec::new(),
        evidence: evidence.into_lines(),
        explanation: "With \"iptables\": false (or \"bridge\": \"none\", or chains removed) dockerd creates no DOCKER/DOCKER-USER chains: the AWS recipe's `DOCKER-USER -d 169.254.169.254 -j DROP` has nowhere to go, and container NAT and isolation are whatever was set up by hand. Guards that assume Docker's chains are missing, and may be silently absent on the next restart.".into(),
        fix: Fix::new("keep the IMDS guard out of Docker's chains", Vec::new(), "`metaguard apply` (or the daemon) guards bridges from a table of metaguard's own, whatever dockerd manages")
            .manual("if Docker's firewall was turned off by mistake, remove \"iptables\": false / \"bridge\": \"none\" from /etc/docker/daemon.json and restart docker"),
    })
}

/// Chain, set and map names of a rendered `inet metaguard` table.
fn rendered_names(script: &str) -> BTreeSet<String> {
    script
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            ["chain ", "set ", "map "]
                .iter()
                .find_map(|k| l.strip_prefix(k))
                .and_then(|r| r.strip_suffix('{'))
                .map(|n| n.trim().to_string())
        })
        .collect()
}

pub(super) fn f23(snap: &Snapshot) -> Option<Finding> {
    let live = snap
        .host
        .nft
        .as_ref()?
        .tables
        .iter()
        .find(|t| t.family == ruleset::FAMILY && t.name == ruleset::TABLE)?;
    let containers: Vec<ContainerFact> = snap
        .docker
        .containers
        .iter()
        .map(|c| ContainerFact {
            id: String::new(),
            name: c.name.clone(),
            image: String::new(),
            labels: c.labels.clone(),
            host_network: c.network_mode == "host",
            cgroup: c.cgroup.clone(),
            netns: c.netns.clone(),
            env: Vec::new(),
            addresses: Vec::new(),
        })
        .collect();
    let facts = HostFacts {
        netns_paths: Vec::new(),
        containers: Some(containers),
        ports: Vec::new(),
    };
    let plan = ruleset::plan(&snap.config, &facts).ok()?;
    let want = rendered_names(&plan.host);
    // Bridge-port exceptions (the `ports` map, `wl<N>_ports` chains and,
    // without the proxy, `port_marks`) exist only while an excepted
    // container's port does, which a snapshot does not record: never
    // counted as another version's.
    let port_dependent = |n: &str| {
        n == "ports"
            || n == "port_marks"
            || n.strip_prefix("wl")
                .and_then(|r| r.strip_suffix("_ports"))
                .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
    };
    let have: BTreeSet<String> = live
        .chains
        .iter()
        .map(|c| c.name.clone())
        .chain(live.sets.keys().cloned())
        .filter(|n| want.contains(n) || !port_dependent(n))
        .collect();
    if want == have {
        return None;
    }
    let mut evidence = Evidence::default();
    let extra: Vec<&String> = have.difference(&want).collect();
    let missing: Vec<&String> = want.difference(&have).collect();
    if !extra.is_empty() {
        evidence.line(format!(
            "inet metaguard holds {} that this version does not render for the config in force",
            join(&extra)
        ));
    }
    if !missing.is_empty() {
        evidence.line(format!(
            "inet metaguard lacks {} that this version renders",
            join(&missing)
        ));
    }
    Some(Finding {
        id: "F23",
        severity: Severity::Warning,
        title: "metaguard's table was written by another version (or for another config)".into(),
        flows: Vec::new(),
        evidence: evidence.into_lines(),
        explanation: "The `inet metaguard` table in the kernel does not have the chains and sets this metaguard renders for the config in force: an older or newer metaguard wrote it, or the config changed since the last apply. Its rules may guard less (or differently) than the config says, and `metaguard verify` reports drift until it is replaced.".into(),
        fix: Fix::new("replace the table with what this version renders", Vec::new(), "`metaguard apply` replaces the table in one transaction (the daemon does it on start)")
            .manual("run `metaguard apply` with this version (after upgrading every host's metaguard binary and unit)"),
    })
}

fn join(v: &[&String]) -> String {
    v.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
}
