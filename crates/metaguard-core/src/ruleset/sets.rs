//! The endpoint sets every table holds, and the placement of selector
//! entries (interface globs, cgroup paths) into lookup groups.

use std::fmt::Write as _;
use std::net::IpAddr;

use crate::config::Config;

pub(super) fn write_sets(out: &mut String, config: &Config) {
    for (name, ips) in [
        ("imds", &config.endpoints.imds),
        ("tmd", &config.endpoints.task_metadata),
    ] {
        let v4: Vec<String> = ips
            .iter()
            .filter_map(|ip| match ip {
                IpAddr::V4(v4) => Some(v4.to_string()),
                IpAddr::V6(_) => None,
            })
            .collect();
        let mut v6: Vec<String> = ips
            .iter()
            .map(|ip| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped().to_string(),
                IpAddr::V6(v6) => v6.to_string(),
            })
            .collect();
        v6.sort();
        v6.dedup();
        for (suffix, ty, elems) in [("4", "ipv4_addr", v4), ("6", "ipv6_addr", v6)] {
            let _ = writeln!(out, "\tset {name}{suffix} {{");
            let _ = writeln!(out, "\t\ttype {ty}");
            if !elems.is_empty() {
                let _ = writeln!(out, "\t\telements = {{ {} }}", elems.join(", "));
            }
            let _ = writeln!(out, "\t}}");
        }
    }
}

pub(super) fn depth(path: &str) -> usize {
    path.split('/').filter(|s| !s.is_empty()).count()
}

/// Interface globs: an exact name, or a prefix with one trailing `*`.
pub(super) fn ifname_parts(g: &str) -> (&str, bool) {
    match g.strip_suffix('*') {
        Some(p) => (p, true),
        None => (g, false),
    }
}

pub(super) fn ifname_overlap(a: &str, b: &str) -> bool {
    let (pa, wa) = ifname_parts(a);
    let (pb, wb) = ifname_parts(b);
    match (wa, wb) {
        (false, false) => pa == pb,
        (true, false) => pb.starts_with(pa),
        (false, true) => pa.starts_with(pb),
        (true, true) => pa.starts_with(pb) || pb.starts_with(pa),
    }
}

/// Whether every name `later` matches is matched by `earlier`.
pub(super) fn ifname_covers(earlier: &str, later: &str) -> bool {
    let (pe, we) = ifname_parts(earlier);
    let (pl, wl) = ifname_parts(later);
    match (we, wl) {
        (false, false) => pe == pl,
        (true, _) => pl.starts_with(pe),
        (false, true) => false,
    }
}

/// Where earlier entries were placed, answering the two questions the
/// grouping asks of each new entry without scanning every earlier entry.
pub(super) trait PlacedIndex {
    /// An earlier entry that covers `entry` entirely: (entry, workload).
    fn covering(&self, entry: &str) -> Option<(String, usize)>;
    /// The highest group holding an earlier entry that overlaps `entry`.
    fn max_overlap_group(&self, entry: &str) -> Option<usize>;
    fn insert(&mut self, entry: &str, workload: usize, group: usize);
}

/// Interface globs: exact names hashed; prefixes (few) in a list.
#[derive(Default)]
pub(super) struct IfnameIndex {
    exact: std::collections::HashMap<String, (usize, usize)>,
    prefixes: Vec<(String, usize, usize)>,
}

impl PlacedIndex for IfnameIndex {
    fn covering(&self, entry: &str) -> Option<(String, usize)> {
        let (p, wild) = ifname_parts(entry);
        if !wild {
            if let Some((w, _)) = self.exact.get(p) {
                return Some((entry.to_string(), *w));
            }
        }
        self.prefixes
            .iter()
            .find(|(e, _, _)| ifname_covers(e, entry))
            .map(|(e, w, _)| (e.clone(), *w))
    }

    fn max_overlap_group(&self, entry: &str) -> Option<usize> {
        let (p, wild) = ifname_parts(entry);
        let from_exact = if wild {
            self.exact
                .iter()
                .filter(|(name, _)| name.starts_with(p))
                .map(|(_, (_, g))| *g)
                .max()
        } else {
            self.exact.get(p).map(|(_, g)| *g)
        };
        let from_prefix = self
            .prefixes
            .iter()
            .filter(|(e, _, _)| ifname_overlap(e, entry))
            .map(|(_, _, g)| *g)
            .max();
        from_exact.max(from_prefix)
    }

    fn insert(&mut self, entry: &str, workload: usize, group: usize) {
        match ifname_parts(entry) {
            (p, false) => {
                self.exact.insert(p.to_string(), (workload, group));
            }
            (_, true) => self.prefixes.push((entry.to_string(), workload, group)),
        }
    }
}

/// cgroup paths, ordered so that a subtree is one range.
#[derive(Default)]
pub(super) struct CgroupIndex {
    placed: std::collections::BTreeMap<String, (usize, usize)>,
}

pub(super) fn ancestors_or_self(path: &str) -> impl Iterator<Item = &str> {
    path.match_indices('/')
        .map(move |(i, _)| &path[..i])
        .chain(std::iter::once(path))
}

impl PlacedIndex for CgroupIndex {
    fn covering(&self, entry: &str) -> Option<(String, usize)> {
        ancestors_or_self(entry).find_map(|a| self.placed.get(a).map(|(w, _)| (a.to_string(), *w)))
    }

    fn max_overlap_group(&self, entry: &str) -> Option<usize> {
        let above = ancestors_or_self(entry)
            .filter_map(|a| self.placed.get(a).map(|(_, g)| *g))
            .max();
        // Descendants: keys in ["entry/", "entry0"), as '0' follows '/'.
        let below = self
            .placed
            .range(format!("{entry}/")..format!("{entry}0"))
            .map(|(_, (_, g))| *g)
            .max();
        above.max(below)
    }

    fn insert(&mut self, entry: &str, workload: usize, group: usize) {
        self.placed.insert(entry.to_string(), (workload, group));
    }
}

/// Places entries (in config order) into lookup groups: each entry goes one
/// group after the last group holding an earlier entry it overlaps; an
/// entry covered by an earlier one is dropped (with a warning when the two
/// belong to different workloads). Cost: one index query per entry.
pub(super) fn group(
    config: &Config,
    entries: &[(String, usize)],
    index: &mut dyn PlacedIndex,
    warnings: &mut Vec<String>,
) -> Vec<Vec<(String, usize)>> {
    let mut groups: Vec<Vec<(String, usize)>> = Vec::new();
    for (entry, w) in entries {
        if let Some((e, ew)) = index.covering(entry) {
            if ew != *w {
                warnings.push(format!(
                    "workload {:?}: {entry:?} can never match: workload {:?} lists {e:?} first (first match wins)",
                    config.workloads[*w].name, config.workloads[ew].name
                ));
            }
            continue;
        }
        let g = index.max_overlap_group(entry).map_or(0, |g| g + 1);
        index.insert(entry, *w, g);
        if groups.len() <= g {
            groups.resize_with(g + 1, Vec::new);
        }
        groups[g].push((entry.clone(), *w));
    }
    groups
}
