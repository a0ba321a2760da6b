//! The cgroup BPF layer's decisions (pure): which endpoints the programs
//! know, and for each configured cgroup its rule index and deny bits.
//!
//! First match wins as in the nft layer: each `cgroups` entry gets a rule
//! index in file order; the programs look at the caller's cgroup and all
//! its ancestors and use the configured one with the lowest index. So
//! `docker/ecs-agent` (allow, listed first) keeps IMDS while `docker`
//! (deny) covers every other container.
//!
//! Programs are attached to every entry that denies something and has no
//! denying ancestor entry: a program attached to a cgroup runs for its
//! whole subtree, and its ancestor walk gives the right answer for every
//! descendant, so attaching lower down again would only run it twice.
//!
//! `proxy` is not a BPF decision (the nft layer redirects those flows), so
//! it sets no bit here.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::config::{Action, Config, Selector};

/// Endpoint class bits and the raw-socket bit (as in `guard.bpf.c`).
pub const CLASS_IMDS: u32 = 1;
pub const CLASS_TASK_METADATA: u32 = 2;
pub const DENY_RAW: u32 = 4;

/// One configured cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupRule {
    /// Relative to the cgroup2 root.
    pub path: String,
    pub workload: String,
    /// Position in file order (lower wins).
    pub rule: u32,
    pub bits: u32,
    /// Whether the programs are attached here.
    pub attach: bool,
}

/// The whole BPF policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BpfPolicy {
    pub ep4: BTreeMap<[u8; 4], u32>,
    pub ep6: BTreeMap<[u8; 16], u32>,
    pub cgroups: Vec<CgroupRule>,
    pub warnings: Vec<String>,
}

impl BpfPolicy {
    /// The decision (deny bits) for a process in cgroup `path`: what the
    /// programs compute (first configured ancestor-or-self in rule order).
    pub fn bits_for(&self, path: &str) -> u32 {
        self.cgroups
            .iter()
            .filter(|c| is_ancestor_or_self(&c.path, path))
            .min_by_key(|c| c.rule)
            .map_or(0, |c| c.bits)
    }

    /// Whether any attached program would run for `path`.
    pub fn guarded(&self, path: &str) -> bool {
        self.cgroups
            .iter()
            .any(|c| c.attach && is_ancestor_or_self(&c.path, path))
    }
}

fn is_ancestor_or_self(ancestor: &str, path: &str) -> bool {
    path == ancestor
        || path
            .strip_prefix(ancestor)
            .is_some_and(|rest| rest.starts_with('/'))
        || ancestor.is_empty()
}

/// Builds the policy from a validated config.
pub fn plan(config: &Config) -> BpfPolicy {
    let mut out = BpfPolicy::default();
    for (ips, class) in [
        (&config.endpoints.imds, CLASS_IMDS),
        (&config.endpoints.task_metadata, CLASS_TASK_METADATA),
    ] {
        for ip in ips {
            match ip {
                IpAddr::V4(v4) => *out.ep4.entry(v4.octets()).or_default() |= class,
                IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                    Some(v4) => *out.ep4.entry(v4.octets()).or_default() |= class,
                    None => *out.ep6.entry(v6.octets()).or_default() |= class,
                },
            }
        }
    }
    let mut rule = 0u32;
    for w in &config.workloads {
        if let Selector::Containers(_) = w.selector {
            out.warnings.push(format!(
                "workload {:?}: containers selectors are not resolved by the BPF layer; only the nft layer guards it",
                w.name
            ));
            continue;
        }
        let Selector::Cgroups(paths) = &w.selector else {
            continue;
        };
        let mut bits = 0;
        if w.imds == Action::Deny {
            bits |= CLASS_IMDS;
        }
        if w.task_metadata == Action::Deny {
            bits |= CLASS_TASK_METADATA;
        }
        if w.raw_sockets == Action::Deny {
            bits |= DENY_RAW;
        }
        for p in paths {
            if out.cgroups.iter().any(|c| &c.path == p) {
                continue; // an earlier entry for the same cgroup wins
            }
            out.cgroups.push(CgroupRule {
                path: p.clone(),
                workload: w.name.clone(),
                rule,
                bits,
                attach: false,
            });
            rule += 1;
        }
    }
    let denying: Vec<String> = out
        .cgroups
        .iter()
        .filter(|c| c.bits != 0)
        .map(|c| c.path.clone())
        .collect();
    for c in &mut out.cgroups {
        c.attach = c.bits != 0
            && !denying
                .iter()
                .any(|d| d != &c.path && is_ancestor_or_self(d, &c.path));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> Config {
        Config::parse(text, "t.toml").expect("valid config")
    }

    const AGENT_FIRST: &str = r#"
[[workload]]
name = "ecs-agent"
cgroups = ["docker/ecs-agent"]
imds = "allow"

[[workload]]
name = "containers"
cgroups = ["docker"]
imds = "deny"
task_metadata = "deny"
raw_sockets = "deny"

[[workload]]
name = "c1-again"
cgroups = ["docker/c1"]
imds = "allow"
"#;

    #[test]
    fn first_match_keeps_the_agent_and_attaches_once() {
        let p = plan(&cfg(AGENT_FIRST));
        assert_eq!(p.bits_for("docker/ecs-agent"), 0);
        assert_eq!(p.bits_for("docker/ecs-agent/sub"), 0);
        let all = CLASS_IMDS | CLASS_TASK_METADATA | DENY_RAW;
        assert_eq!(
            p.bits_for("docker/c1"),
            all,
            "docker (rule 1) wins over docker/c1 (rule 2)"
        );
        assert_eq!(p.bits_for("docker/task1"), all);
        assert_eq!(p.bits_for("system.slice/x"), 0);
        assert_eq!(p.bits_for("dockerx"), 0);
        let attached: Vec<&str> = p
            .cgroups
            .iter()
            .filter(|c| c.attach)
            .map(|c| c.path.as_str())
            .collect();
        assert_eq!(attached, ["docker"]);
        assert!(p.guarded("docker/c2") && !p.guarded("system.slice/unrelated.service"));
    }

    #[test]
    fn endpoints_cover_both_families_and_fold_mapped() {
        let p = plan(&cfg(
            "[endpoints]\nimds = [\"169.254.169.254\", \"fd00:ec2::254\", \"::ffff:10.1.2.3\"]\n",
        ));
        assert_eq!(p.ep4.get(&[169, 254, 169, 254]), Some(&CLASS_IMDS));
        assert_eq!(p.ep4.get(&[10, 1, 2, 3]), Some(&CLASS_IMDS));
        assert_eq!(p.ep4.get(&[169, 254, 170, 2]), Some(&CLASS_TASK_METADATA));
        let v6: std::net::Ipv6Addr = "fd00:ec2::254".parse().expect("v6");
        assert_eq!(p.ep6.get(&v6.octets()), Some(&CLASS_IMDS));
        assert_eq!(p.ep6.len(), 2);
        assert!(p.cgroups.is_empty());
    }

    #[test]
    fn nested_deny_entries_attach_at_the_top_only() {
        let p = plan(&cfg(
            "[[workload]]\nname = \"a\"\ncgroups = [\"x/y\"]\nraw_sockets = \"deny\"\n\n[[workload]]\nname = \"b\"\ncgroups = [\"x\"]\nimds = \"deny\"\n",
        ));
        assert_eq!(p.bits_for("x/y/z"), DENY_RAW);
        assert_eq!(p.bits_for("x/w"), CLASS_IMDS);
        let attached: Vec<&str> = p
            .cgroups
            .iter()
            .filter(|c| c.attach)
            .map(|c| c.path.as_str())
            .collect();
        assert_eq!(attached, ["x"]);
    }

    #[test]
    fn layers_and_raw_sockets_parse() {
        let c = cfg("[layers]\nbpf = false\n");
        assert!(!c.layers.bpf);
        assert!(Config::builtin_default().layers.bpf);
        let e = Config::parse(
            "[[workload]]\nname = \"b\"\nbridges = [\"docker0\"]\nraw_sockets = \"deny\"\n",
            "t.toml",
        )
        .expect_err("raw_sockets needs cgroups");
        assert!(e.message.contains("needs a cgroups selector"), "{e}");
        let e = Config::parse("[layers]\nebpf = true\n", "t.toml").expect_err("unknown key");
        assert_eq!((e.line, e.column), (2, 1));
    }
}
