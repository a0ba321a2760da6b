//! The network namespaces the BPF layer classifies: every container the
//! Docker API lists with a namespace of its own, and every namespace file
//! under `/run/netns` or where `netns` selectors point, each with the
//! kernel's cookie for it (what `bpf_get_netns_cookie` gives the programs)
//! and the bridges its host-side ports are plugged into.
//!
//! The decision is `core::bpf_policy::classify`'s. What is decided here is
//! which namespaces are *settled* enough to be written at all: one whose
//! workload is found, or one that no workload selects although it is
//! plugged into a bridge (which no workload names). Any other namespace —
//! an awsvpc task before its CNI plugs its links, its application
//! container listed before its pause container, a bridge container before
//! Docker connects it — is left out, so it keeps the map's default:
//! unknown means denied.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use metaguard_core::bpf_policy::{classify, NamespaceFact, NO_RULE};
use metaguard_core::ruleset::ContainerFact;
use metaguard_core::Config;
use metaguard_sys::netns::{Netns, NsId, NETNS_RUN_DIR};

/// One namespace found, as the programs see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    /// The file it was found by (the first, when several name it).
    pub path: String,
    /// The kernel's cookie for it; read only for a settled namespace (one
    /// the map will list: a thread enters it), 0 for the others.
    pub cookie: u64,
    /// The bridges its host-side ports are plugged into.
    pub bridges: Vec<String>,
    /// The containers that live in it (an awsvpc task's pause container
    /// and its application containers share one).
    pub containers: Vec<ContainerFact>,
}

impl Namespace {
    /// Its decision: the first workload (lowest rule) that selects it by
    /// any of its bridges, containers or its path; `None` when it is not
    /// settled (no workload selects it, and it is plugged into no bridge).
    pub fn decision(&self, config: &Config) -> Option<(u32, u32)> {
        let bridges: Vec<Option<&str>> = match self.bridges.as_slice() {
            [] => vec![None],
            b => b.iter().map(|b| Some(b.as_str())).collect(),
        };
        let containers: Vec<Option<&ContainerFact>> = match self.containers.as_slice() {
            [] => vec![None],
            c => c.iter().map(Some).collect(),
        };
        let mut best = (NO_RULE, 0);
        for bridge in &bridges {
            for container in &containers {
                let d = classify(
                    config,
                    &NamespaceFact {
                        path: &self.path,
                        bridge: *bridge,
                        container: *container,
                    },
                );
                if d.0 < best.0 {
                    best = d;
                }
            }
        }
        // Unselected is settled only for a namespace plugged into a bridge
        // no workload names. A container alone is not enough: an awsvpc
        // task's application container can be listed before its pause
        // container, and the CNI plugs the task's links after both exist.
        let settled = best.0 != NO_RULE || !self.bridges.is_empty();
        settled.then_some(best)
    }
}

/// The namespaces found, and what could not be looked at.
#[derive(Debug, Default)]
pub struct Found {
    /// The cookie of this process's own namespace: the host's.
    pub host_cookie: u64,
    pub namespaces: Vec<Namespace>,
    pub skipped: Vec<String>,
}

impl Found {
    /// `mg_netns` for `config`: the host's namespace (no bits), each
    /// settled namespace's decision, and under key 0 `default`. Empty
    /// when there is no default (nothing for namespaces to be refused).
    pub fn map(&self, config: &Config, default: Option<(u32, u32)>) -> BTreeMap<u64, (u32, u32)> {
        let mut out = BTreeMap::new();
        let Some(default) = default else {
            return out;
        };
        out.insert(0, default);
        for ns in &self.namespaces {
            if let (Some(d), true) = (ns.decision(config), ns.cookie != 0) {
                out.insert(ns.cookie, d);
            }
        }
        // Last, so nothing can take the host's entry.
        out.insert(self.host_cookie, (NO_RULE, 0));
        out
    }
}

/// Finds the namespaces of `containers` (those with a stack of their own)
/// and of the files in `/run/netns` and in `netns_paths`; the cookies of
/// those `config` settles.
pub fn discover(
    config: &Config,
    containers: Option<&[ContainerFact]>,
    netns_paths: &[String],
) -> Found {
    let mut found = Found::default();
    match metaguard_sys::netns::current_cookie() {
        Ok(c) => found.host_cookie = c,
        Err(e) => {
            found
                .skipped
                .push(format!("cannot read this namespace's cookie: {e}"));
            return found;
        }
    }
    let own = metaguard_sys::netns::current_thread_id().ok();
    let links = metaguard_sys::rtnl::links().unwrap_or_else(|e| {
        found.skipped.push(format!(
            "cannot list the host's links (bridges unknown): {e}"
        ));
        Vec::new()
    });
    let names: HashMap<u32, &str> = links.iter().map(|l| (l.ifindex, l.name.as_str())).collect();
    let mut candidates: Vec<(String, Option<&ContainerFact>)> = Vec::new();
    for c in containers.unwrap_or_default() {
        if let (false, Some(p)) = (c.host_network, &c.netns) {
            candidates.push((p.clone(), Some(c)));
        }
    }
    let mut files: Vec<String> = std::fs::read_dir(NETNS_RUN_DIR)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path().display().to_string())
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files.extend(netns_paths.iter().cloned());
    candidates.extend(files.into_iter().map(|p| (p, None)));

    let mut by_id: HashMap<NsId, usize> = HashMap::new();
    let mut opened: Vec<Netns> = Vec::new();
    let mut skipped = Vec::new();
    for (path, container) in candidates {
        let Ok(ns) = Netns::open(Path::new(&path)) else {
            continue; // gone, or not a namespace file
        };
        if Some(ns.id()) == own {
            continue;
        }
        if let Some(&i) = by_id.get(&ns.id()) {
            if let Some(c) = container {
                found.namespaces[i].containers.push(c.clone());
            }
            continue;
        }
        let nsid = metaguard_sys::rtnl::netns_id(std::os::fd::AsFd::as_fd(&ns))
            .ok()
            .flatten();
        let mut bridges: Vec<String> = links
            .iter()
            .filter(|l| nsid.is_some() && l.link_netnsid == nsid)
            .filter_map(|l| l.master.and_then(|m| names.get(&m)))
            .map(|m| m.to_string())
            .collect();
        bridges.dedup();
        by_id.insert(ns.id(), found.namespaces.len());
        found.namespaces.push(Namespace {
            path,
            cookie: 0,
            bridges,
            containers: container.into_iter().cloned().collect(),
        });
        opened.push(ns);
    }
    // Cookies last (a thread per namespace), and only for those the map
    // lists: containers joining a namespace are all known by now.
    for (entry, ns) in found.namespaces.iter_mut().zip(&opened) {
        if entry.decision(config).is_none() {
            continue;
        }
        match ns.cookie() {
            Ok(c) => entry.cookie = c,
            Err(e) => skipped.push(e.to_string()),
        }
    }
    found.skipped.extend(skipped);
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use metaguard_core::bpf_policy::{plan, rule_index, CLASS_IMDS};

    fn ns(bridges: &[&str], containers: Vec<ContainerFact>) -> Namespace {
        Namespace {
            path: "/run/netns/x".into(),
            cookie: 7,
            bridges: bridges.iter().map(|b| b.to_string()).collect(),
            containers,
        }
    }

    #[test]
    fn only_settled_namespaces_are_written_and_the_host_is_never_refused() {
        let config = Config::builtin_default();
        let default = plan(&config, None).netns_default;
        assert_eq!(default, Some((rule_index(0, 0), CLASS_IMDS)));
        let found = Found {
            host_cookie: 1,
            namespaces: vec![
                Namespace {
                    cookie: 2,
                    ..ns(&["docker0"], Vec::new())
                },
                // Not plugged in yet, no container: left to the default.
                Namespace {
                    cookie: 3,
                    ..ns(&[], Vec::new())
                },
                // On a bridge no workload names: known, untouched.
                Namespace {
                    cookie: 4,
                    ..ns(&["mybridge"], Vec::new())
                },
                // A container no workload selects, on no bridge yet (a
                // task's app container before its pause one): the default.
                Namespace {
                    cookie: 5,
                    ..ns(
                        &[],
                        vec![ContainerFact {
                            name: "app".into(),
                            ..ContainerFact::default()
                        }],
                    )
                },
            ],
            skipped: Vec::new(),
        };
        let map = found.map(&config, default);
        let want: BTreeMap<u64, (u32, u32)> = [
            (0, (rule_index(0, 0), CLASS_IMDS)),
            (1, (NO_RULE, 0)),
            (2, (rule_index(0, 0), CLASS_IMDS)),
            (4, (NO_RULE, 0)),
        ]
        .into();
        assert_eq!(map, want);
        assert!(found.map(&config, None).is_empty(), "no default: no map");
    }

    #[test]
    fn the_first_workload_over_all_bridges_and_containers_decides() {
        let config = Config::parse(
            "[[workload]]\nname = \"agent\"\ncontainers = [\"ecs-agent\"]\nimds = \"allow\"\n\n[[workload]]\nname = \"b\"\nbridges = [\"docker0\"]\nimds = \"deny\"\n",
            "t.toml",
        )
        .expect("valid");
        let agent = ContainerFact {
            name: "ecs-agent".into(),
            ..ContainerFact::default()
        };
        let other = ContainerFact {
            name: "web".into(),
            ..ContainerFact::default()
        };
        assert_eq!(
            ns(&["docker0"], vec![other.clone()]).decision(&config),
            Some((rule_index(1, 0), CLASS_IMDS))
        );
        assert_eq!(
            ns(&["docker0"], vec![other, agent]).decision(&config),
            Some((rule_index(0, 0), 0))
        );
    }
}
