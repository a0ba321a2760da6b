//! The cgroup BPF layer's decisions (pure): which endpoints the programs
//! know, and for each configured cgroup its rule index and deny bits.
//!
//! First match wins as in the nft layer: each `cgroups` entry gets a rule
//! index in file order; the programs look at the caller's cgroup and all
//! its ancestors and use the configured one with the lowest index. So
//! `docker/ecs-agent` (allow, listed first) keeps IMDS while `docker`
//! (deny) covers every other container.
//!
//! Programs are attached to every entry that denies or observes something
//! and has no such ancestor entry: a program attached to a cgroup runs for its
//! whole subtree, and its ancestor walk gives the right answer for every
//! descendant, so attaching lower down again would only run it twice.
//!
//! `proxy` is not a BPF decision (the nft layer redirects those flows), so
//! it sets no bit here.
//!
//! **Observe** (docs/observe.md): a class a workload observes gets its
//! observe bit (the class bit << [`OBSERVE_SHIFT`]); the programs let such
//! a call through and report it on `mg_events`, so the daemon records
//! every connection of an observed workload, whatever its port or
//! protocol. Deny wins: a class denied and observed (two workloads in the
//! namespace default) is refused. Observe never refuses anything.
//!
//! **Namespaces** (groundwork for guarding what bridge and `netns`
//! workloads select, issue 20): the programs also look up the socket's
//! network namespace cookie in `mg_netns`. [`classify`] gives a namespace
//! the engine found its workload's decision; a namespace nobody has
//! classified yet takes [`BpfPolicy::netns_default`] — every class that
//! some bridge, `netns` or `containers` workload denies or proxies, so
//! unknown means denied. Rule indices are shared with the cgroup entries
//! ([`rule_index`]: file order), so the first match in the file decides
//! between a cgroup entry and a namespace.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::config::{Action, Config, NetnsSelector, Selector, Workload};
use crate::ruleset::{ifname_glob_matches, netns_glob_matches, ContainerFact};

/// Endpoint class bits and the raw-socket bit (as in `guard.bpf.c`).
pub const CLASS_IMDS: u32 = 1;
pub const CLASS_TASK_METADATA: u32 = 2;
pub const DENY_RAW: u32 = 4;
/// Observe bits: a class bit shifted by [`OBSERVE_SHIFT`] (as in
/// `guard.bpf.c`).
pub const OBSERVE_SHIFT: u32 = 3;
pub const OBSERVE_IMDS: u32 = CLASS_IMDS << OBSERVE_SHIFT;
pub const OBSERVE_TASK_METADATA: u32 = CLASS_TASK_METADATA << OBSERVE_SHIFT;
/// The bits that refuse something.
pub const DENY_BITS: u32 = CLASS_IMDS | CLASS_TASK_METADATA | DENY_RAW;

/// Drops the observe bit of every class that `bits` also denies (deny
/// wins; the programs check deny first, this keeps the maps readable).
pub fn deny_wins(bits: u32) -> u32 {
    let denied = bits & (CLASS_IMDS | CLASS_TASK_METADATA);
    bits & !(denied << OBSERVE_SHIFT)
}

/// The workload index a rule index belongs to ([`rule_index`]'s inverse;
/// `None` for [`NO_RULE`]).
pub fn rule_workload(rule: u32) -> Option<usize> {
    (rule != NO_RULE).then_some((rule >> 16) as usize)
}

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
    /// (rule index, deny bits) for a network namespace other than the
    /// host's that nobody has classified; `None` when no bridge, `netns`
    /// or `containers` workload denies or proxies anything.
    pub netns_default: Option<(u32, u32)>,
    /// Where the programs are attached, relative to the cgroup2 root: every
    /// denying `cgroups` entry and, when [`BpfPolicy::netns_default`] is
    /// set, every `[layers] container_cgroups` subtree — each without an
    /// ancestor in the list (a program runs for its whole subtree).
    pub attach: Vec<String>,
    pub warnings: Vec<String>,
}

/// A rule index in file order: the workload's position, then the entry's
/// within it (lower wins, as in the nft layer).
pub fn rule_index(workload: usize, entry: usize) -> u32 {
    let w = u32::try_from(workload)
        .unwrap_or(u32::MAX >> 16)
        .min(0xfffe);
    let e = u32::try_from(entry).unwrap_or(0xffff).min(0xffff);
    (w << 16) | e
}

/// The rule index of "no workload": loses to every configured entry.
pub const NO_RULE: u32 = u32::MAX;

/// A network namespace other than the host's, as the engine found it.
#[derive(Debug, Clone, Copy, Default)]
pub struct NamespaceFact<'a> {
    /// Its namespace file (`/run/netns/…`, `/var/run/docker/netns/…`).
    pub path: &'a str,
    /// The bridge its host-side port is plugged into, if any.
    pub bridge: Option<&'a str>,
    /// The container that owns it (an awsvpc task's: the pause container).
    pub container: Option<&'a ContainerFact>,
}

/// The classes a workload's actions keep from the programs: `deny`, and
/// with `proxy_too` also `proxy` (for a namespace not classified yet,
/// which must not reach an endpoint before its workload is known); and the
/// observe bits of the classes it observes.
fn class_bits(w: &Workload, proxy_too: bool) -> u32 {
    let blocks = |a: Action| a == Action::Deny || (proxy_too && a == Action::Proxy);
    let mut bits = 0;
    for (action, class) in [(w.imds, CLASS_IMDS), (w.task_metadata, CLASS_TASK_METADATA)] {
        if blocks(action) {
            bits |= class;
        } else if action == Action::Observe {
            bits |= class << OBSERVE_SHIFT;
        }
    }
    bits
}

/// Whether a bridge, `netns` or `containers` workload selects `ns`.
fn selects(w: &Workload, ns: &NamespaceFact<'_>) -> bool {
    match &w.selector {
        Selector::Bridges(globs) => ns
            .bridge
            .is_some_and(|b| globs.iter().any(|g| ifname_glob_matches(g, b))),
        Selector::Netns(sels) => sels.iter().any(|s| match s {
            NetnsSelector::EcsTasks => ns.container.is_some_and(ContainerFact::is_ecs_pause),
            NetnsSelector::Path(glob) => netns_glob_matches(glob, ns.path),
        }),
        Selector::Containers(refs) => ns
            .container
            .is_some_and(|c| refs.iter().any(|r| c.matches(r))),
        Selector::Cgroups(_) => false,
    }
}

/// The decision for a namespace the engine found: (rule index, deny bits)
/// of the first workload that selects it, or ([`NO_RULE`], 0) when none
/// does (a container no workload selects is untouched).
pub fn classify(config: &Config, ns: &NamespaceFact<'_>) -> (u32, u32) {
    config
        .workloads
        .iter()
        .enumerate()
        .find(|(_, w)| selects(w, ns))
        .map_or((NO_RULE, 0), |(i, w)| {
            (rule_index(i, 0), class_bits(w, false))
        })
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

    /// Whether anything is refused: a cgroup entry or the namespace
    /// default has a deny bit. (Observe bits alone need the programs too,
    /// but a host that cannot run them is not left unguarded by it.)
    pub fn refuses(&self) -> bool {
        self.cgroups.iter().any(|c| c.bits & DENY_BITS != 0) || self.refuses_namespaces()
    }

    /// Whether namespaces nobody has classified are refused something:
    /// the namespace default has a deny bit.
    pub fn refuses_namespaces(&self) -> bool {
        self.netns_default
            .is_some_and(|(_, bits)| bits & DENY_BITS != 0)
    }

    /// Whether anything is observed by the programs.
    pub fn observes(&self) -> bool {
        let observe = OBSERVE_IMDS | OBSERVE_TASK_METADATA;
        self.cgroups.iter().any(|c| c.bits & observe != 0)
            || self
                .netns_default
                .is_some_and(|(_, bits)| bits & observe != 0)
    }

    /// Whether any attached program would run for `path`.
    pub fn guarded(&self, path: &str) -> bool {
        self.attach.iter().any(|a| is_ancestor_or_self(a, path))
    }
}

fn is_ancestor_or_self(ancestor: &str, path: &str) -> bool {
    path == ancestor
        || path
            .strip_prefix(ancestor)
            .is_some_and(|rest| rest.starts_with('/'))
        || ancestor.is_empty()
}

/// Builds the policy from a validated config and, when the Docker API
/// answered, the running containers: a `containers` workload's
/// host-network containers are decided by their cgroups (as a `cgroups`
/// entry in the workload's place), the others by their namespaces
/// ([`classify`]).
pub fn plan(config: &Config, containers: Option<&[ContainerFact]>) -> BpfPolicy {
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
    let mut default: Option<(u32, u32)> = None;
    for (i, w) in config.workloads.iter().enumerate() {
        if !matches!(w.selector, Selector::Cgroups(_)) {
            // Its namespaces, until classified, must not reach what it
            // denies or proxies.
            default.get_or_insert((rule_index(i, 0), 0)).1 |= class_bits(w, true);
        }
        let paths: Vec<String> = match &w.selector {
            Selector::Cgroups(paths) => paths.clone(),
            Selector::Containers(refs) => containers
                .unwrap_or_default()
                .iter()
                .filter(|c| c.host_network && refs.iter().any(|r| c.matches(r)))
                .filter_map(|c| c.cgroup.clone())
                .collect(),
            _ => continue,
        };
        let mut bits = class_bits(w, false);
        if w.raw_sockets == Action::Deny {
            bits |= DENY_RAW;
        }
        for (entry, p) in paths.iter().enumerate() {
            if out.cgroups.iter().any(|c| &c.path == p) {
                continue; // an earlier entry for the same cgroup wins
            }
            out.cgroups.push(CgroupRule {
                path: p.clone(),
                workload: w.name.clone(),
                rule: rule_index(i, entry),
                bits,
                attach: false,
            });
        }
    }
    out.netns_default = default
        .map(|(rule, bits)| (rule, deny_wins(bits)))
        .filter(|(_, bits)| *bits != 0);
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
    let mut wanted: Vec<&String> = out
        .cgroups
        .iter()
        .filter(|c| c.attach)
        .map(|c| &c.path)
        .collect();
    if out.netns_default.is_some() {
        wanted.extend(&config.layers.container_cgroups);
    }
    for p in &wanted {
        let covered = wanted.iter().any(|a| a != p && is_ancestor_or_self(a, p));
        if !covered && !out.attach.contains(p) {
            out.attach.push((*p).clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> Config {
        Config::parse(text, "t.toml").expect("valid config")
    }

    fn plan_of(c: &Config) -> BpfPolicy {
        plan(c, None)
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
        let p = plan_of(&cfg(AGENT_FIRST));
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
        let p = plan_of(&cfg(
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
        let p = plan_of(&cfg(
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

    fn container(name: &str, pause: bool) -> ContainerFact {
        let mut c = ContainerFact {
            name: name.into(),
            id: format!("{name}-id"),
            ..ContainerFact::default()
        };
        if pause {
            c.labels.insert(
                crate::ruleset::ECS_PAUSE_LABEL.0.into(),
                crate::ruleset::ECS_PAUSE_LABEL.1.into(),
            );
        }
        c
    }

    #[test]
    fn the_default_config_denies_imds_to_unclassified_namespaces() {
        let c = Config::builtin_default();
        let p = plan_of(&c);
        assert_eq!(p.netns_default, Some((rule_index(0, 0), CLASS_IMDS)));
        assert!(p.cgroups.is_empty());
        // A bridge container and an awsvpc task: IMDS denied, task
        // credentials kept.
        let on_docker0 = NamespaceFact {
            path: "/var/run/docker/netns/abc",
            bridge: Some("docker0"),
            container: None,
        };
        assert_eq!(classify(&c, &on_docker0), (rule_index(0, 0), CLASS_IMDS));
        let pause = container("ecs-pause", true);
        let task = NamespaceFact {
            path: "/var/run/docker/netns/def",
            bridge: None,
            container: Some(&pause),
        };
        assert_eq!(classify(&c, &task), (rule_index(1, 0), CLASS_IMDS));
        // A container on a bridge no workload names is left alone.
        let other = NamespaceFact {
            bridge: Some("mybridge"),
            ..on_docker0
        };
        assert_eq!(classify(&c, &other), (NO_RULE, 0));
    }

    #[test]
    fn first_match_decides_between_namespaces_and_cgroups() {
        let c = cfg(r#"
[[workload]]
name = "agent"
containers = ["ecs-agent"]
imds = "allow"

[[workload]]
name = "proxied"
bridges = ["br-p*"]
imds = "proxy"

[[workload]]
name = "host"
cgroups = ["system.slice/x", "system.slice/y"]
imds = "deny"

[[workload]]
name = "rest"
bridges = ["docker0"]
task_metadata = "deny"
"#);
        let p = plan_of(&c);
        // Unknown: everything some namespace workload denies or proxies.
        assert_eq!(
            p.netns_default,
            Some((rule_index(0, 0), CLASS_IMDS | CLASS_TASK_METADATA))
        );
        let agent = container("ecs-agent", false);
        let ns = |bridge, container| NamespaceFact {
            path: "/x",
            bridge,
            container,
        };
        assert_eq!(
            classify(&c, &ns(Some("docker0"), Some(&agent))),
            (rule_index(0, 0), 0)
        );
        // A proxied namespace, once known, passes to the nft redirect.
        assert_eq!(
            classify(&c, &ns(Some("br-p1"), None)),
            (rule_index(1, 0), 0)
        );
        assert_eq!(
            classify(&c, &ns(Some("docker0"), None)),
            (rule_index(3, 0), CLASS_TASK_METADATA)
        );
        let rules: Vec<u32> = p.cgroups.iter().map(|r| r.rule).collect();
        assert_eq!(rules, [rule_index(2, 0), rule_index(2, 1)]);
        assert!(rule_index(1, 0) < rules[0] && rules[1] < rule_index(3, 0));
    }

    #[test]
    fn cgroup_only_configs_have_no_namespace_default() {
        assert_eq!(plan_of(&cfg(AGENT_FIRST)).netns_default, None);
        let allow_only =
            cfg("[[workload]]\nname = \"b\"\nbridges = [\"docker0\"]\nimds = \"allow\"\n");
        assert_eq!(plan_of(&allow_only).netns_default, None);
    }

    #[test]
    fn container_cgroups_are_attach_points_only_when_namespaces_can_be_refused() {
        let p = plan_of(&Config::builtin_default());
        assert_eq!(
            p.attach,
            ["system.slice", "docker", "ecs", "ecstasks.slice"]
        );
        assert!(p.guarded("system.slice/docker-abc.scope") && !p.guarded("user.slice/x"));
        // A denying cgroup below a container cgroup runs under its program.
        let c = cfg(
            "[[workload]]\nname = \"h\"\ncgroups = [\"docker/hostnet\", \"init.scope\"]\nimds = \"deny\"\n\n[[workload]]\nname = \"b\"\nbridges = [\"docker0\"]\nimds = \"deny\"\n\n[layers]\ncontainer_cgroups = [\"docker\", \"/docker/\"]\n",
        );
        assert_eq!(c.layers.container_cgroups, ["docker"]);
        assert_eq!(plan_of(&c).attach, ["init.scope", "docker"]);
        // Allow-only bridges: nothing for namespaces, no container cgroups.
        let allow = cfg("[[workload]]\nname = \"b\"\nbridges = [\"docker0\"]\nimds = \"allow\"\n");
        assert!(plan_of(&allow).attach.is_empty());
        let e = Config::parse(
            "[layers]\ncontainer_cgroups = [\"docker\", \"a/../b\"]\n",
            "t.toml",
        )
        .expect_err("`..` refused");
        assert_eq!((e.line, e.column), (2, 32), "{e}");
    }

    #[test]
    fn containers_selectors_resolve_host_network_containers_to_their_cgroups() {
        let c = cfg(
            "[[workload]]\nname = \"agent\"\ncontainers = [\"ecs-agent\"]\nimds = \"allow\"\n\n[[workload]]\nname = \"hostnet\"\ncontainers = [\"label:role=web\"]\nimds = \"deny\"\n",
        );
        let mut agent = container("ecs-agent", false);
        agent.host_network = true;
        agent.cgroup = Some("system.slice/docker-a.scope".into());
        let mut web = container("web", false);
        web.host_network = true;
        web.cgroup = Some("system.slice/docker-w.scope".into());
        web.labels.insert("role".into(), "web".into());
        // Bridged: decided by its namespace, not its cgroup.
        let mut bridged = container("web2", false);
        bridged.labels.insert("role".into(), "web".into());
        bridged.cgroup = Some("system.slice/docker-b.scope".into());
        let p = plan(&c, Some(&[agent, web, bridged]));
        assert_eq!(p.bits_for("system.slice/docker-a.scope"), 0);
        assert_eq!(p.bits_for("system.slice/docker-w.scope"), CLASS_IMDS);
        assert_eq!(p.bits_for("system.slice/docker-b.scope"), 0);
        assert_eq!(p.netns_default, Some((rule_index(0, 0), CLASS_IMDS)));
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    }

    #[test]
    fn observed_classes_get_observe_bits_and_deny_wins_in_the_default() {
        let c = cfg(&format!("mode = \"observe\"\n{AGENT_FIRST}"));
        let p = plan_of(&c);
        // mode = "observe": deny becomes observe, raw_sockets allow.
        assert_eq!(p.bits_for("docker/ecs-agent"), 0);
        assert_eq!(
            p.bits_for("docker/c1"),
            OBSERVE_IMDS | OBSERVE_TASK_METADATA
        );
        assert_eq!(p.attach, ["docker"]);
        assert!(p.observes() && !p.refuses());
        assert_eq!(p.netns_default, None, "cgroups only");

        // Namespaces: observe for the classes only observed, deny kept
        // where another workload denies (deny wins).
        let c = cfg(r#"
[[workload]]
name = "obs"
bridges = ["docker0"]
imds = "observe"
task_metadata = "observe"

[[workload]]
name = "tasks"
netns = ["ecs-tasks"]
imds = "deny"
task_metadata = "allow"

[[workload]]
name = "host"
cgroups = ["system.slice/x"]
imds = "observe"
"#);
        let p = plan_of(&c);
        assert_eq!(
            p.netns_default,
            Some((rule_index(0, 0), CLASS_IMDS | OBSERVE_TASK_METADATA))
        );
        assert!(p.observes() && p.refuses());
        assert_eq!(p.bits_for("system.slice/x"), OBSERVE_IMDS);
        assert!(p.attach.contains(&"system.slice/x".to_string()) || p.guarded("system.slice/x"));
        let ns = NamespaceFact {
            path: "/x",
            bridge: Some("docker0"),
            container: None,
        };
        assert_eq!(
            classify(&c, &ns),
            (rule_index(0, 0), OBSERVE_IMDS | OBSERVE_TASK_METADATA)
        );
        assert_eq!(rule_workload(rule_index(2, 1)), Some(2));
        assert_eq!(rule_workload(NO_RULE), None);
        assert_eq!(
            deny_wins(CLASS_IMDS | OBSERVE_IMDS | OBSERVE_TASK_METADATA),
            CLASS_IMDS | OBSERVE_TASK_METADATA
        );

        // Observe-only namespaces: the container cgroups are attach points.
        let c = cfg("mode = \"observe\"\n[[workload]]\nname = \"b\"\nbridges = [\"docker0\"]\nimds = \"deny\"\n");
        let p = plan_of(&c);
        assert_eq!(p.netns_default, Some((rule_index(0, 0), OBSERVE_IMDS)));
        assert_eq!(
            p.attach,
            ["system.slice", "docker", "ecs", "ecstasks.slice"]
        );
        assert!(!p.refuses());
        // Allow is neither refused nor observed.
        let allow = cfg("[[workload]]\nname = \"b\"\nbridges = [\"docker0\"]\nimds = \"allow\"\n");
        assert!(!plan_of(&allow).observes());
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
