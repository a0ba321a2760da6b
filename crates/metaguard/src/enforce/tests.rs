//! The engine's order of operations, pinned through the recording fake
//! host ([`FakeHost`]): no root, no kernel. Namespaces are plain files in a
//! temporary directory; the state file lives there too.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use metaguard_core::ruleset::{NetnsPlan, Plan, ProxyPlan, ProxyRoute};
use metaguard_core::Config;
use metaguard_sys::host::fake::{FakeHost, World};
use metaguard_sys::routing::Routing;

use super::redirect::FWMARK_ACCEPT;
use super::{Engine, Guarding, Stale, State};

/// A directory removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "metaguard-engine-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }

    /// A "namespace file" named `name`.
    fn netns(&self, name: &str) -> String {
        let p = self.0.join(name);
        std::fs::write(&p, "").expect("netns file");
        p.display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const HOST: &str =
    "add table inet metaguard\ndelete table inet metaguard\ntable inet metaguard {\n}\n";
const PROXY_HOST: &str = "add table inet metaguard\ndelete table inet metaguard\ntable inet metaguard {\n}\nadd table bridge metaguard\ndelete table bridge metaguard\ntable bridge metaguard {\n}\n";
const TASK: &str =
    "add table inet metaguard\ndelete table inet metaguard\ntable inet metaguard {\n  # task\n}\n";

const V4_ROUTE: Routing = Routing::Route {
    v6: false,
    table: 19783,
};
const V4_RULE: Routing = Routing::Rule {
    v6: false,
    mark: 0x4000_0000,
    table: 19783,
    pref: 90,
};
const V6_ROUTE: Routing = Routing::Route {
    v6: true,
    table: 19783,
};
const V6_RULE: Routing = Routing::Rule {
    v6: true,
    mark: 0x4000_0000,
    table: 19783,
    pref: 90,
};

struct Rig {
    scratch: Scratch,
    fake: FakeHost,
    engine: Engine,
    config: Config,
}

/// An engine on a fake host whose `tcp_fwmark_accept` is 0 and which has
/// no tables.
fn rig() -> Rig {
    let scratch = Scratch::new();
    let mut world = World::default();
    world.sysctls.insert(FWMARK_ACCEPT.into(), "0".into());
    let fake = FakeHost::new(world);
    let engine = Engine::with_host(
        Box::new(fake.clone()),
        &scratch.0.join("state"),
        &scratch.0.join("docker.sock"),
    )
    .with_bpf_pin_dir(&scratch.0.join("bpf"));
    let config = Config::parse(
        "[[workload]]\nname = \"c\"\nbridges = [\"docker0\"]\nimds = \"deny\"\n",
        "test.toml",
    )
    .expect("valid config");
    Rig {
        scratch,
        fake,
        engine,
        config,
    }
}

fn plan(netns: &[&str], proxy: bool) -> Plan {
    Plan {
        host: if proxy { PROXY_HOST } else { HOST }.to_string(),
        netns: netns
            .iter()
            .map(|p| NetnsPlan {
                path: p.to_string(),
                workload: "c".into(),
                script: TASK.into(),
            })
            .collect(),
        warnings: Vec::new(),
        containers: None,
        proxy: proxy.then(|| ProxyPlan {
            relay: Vec::new(),
            imds: Vec::new(),
            routes: vec![
                ProxyRoute {
                    v6: false,
                    mark: 0x4000_0000,
                    table: 19783,
                    pref: 90,
                },
                ProxyRoute {
                    v6: true,
                    mark: 0x4000_0000,
                    table: 19783,
                    pref: 90,
                },
            ],
        }),
    }
}

/// The calls that check or change, up to the first conntrack call.
fn changes_before_conntrack(fake: &FakeHost) -> Vec<String> {
    fake.changes()
        .into_iter()
        .take_while(|c| !c.starts_with("conntrack"))
        .collect()
}

#[test]
fn apply_checks_every_task_table_before_loading_any() {
    let r = rig();
    let (a, b) = (r.scratch.netns("a"), r.scratch.netns("b"));
    let report = r
        .engine
        .apply(&r.config, &plan(&[&a, &b], false))
        .expect("apply");
    assert_eq!(report.tables, ["host", a.as_str(), b.as_str()]);
    assert_eq!(
        changes_before_conntrack(&r.fake),
        [
            format!("nft check {a}"),
            format!("nft check {b}"),
            // Without a proxy, the host load is its own check.
            "nft apply host".into(),
            format!("nft apply {a}"),
            format!("nft apply {b}"),
            // No proxy: its bridge table goes (there was none).
            "nft delete host bridge metaguard".into(),
        ]
    );
    // F11: open connections to the denied endpoints are cut in every
    // guarded namespace, after the tables are in.
    let cut: Vec<String> = r
        .fake
        .changes()
        .into_iter()
        .filter(|c| c.starts_with("conntrack delete"))
        .collect();
    assert!(cut.iter().any(|c| c.starts_with("conntrack delete host ")));
    assert!(cut
        .iter()
        .any(|c| c.starts_with(&format!("conntrack delete {b} "))));
    assert_eq!(r.engine.load_state().netns, [a, b]);
}

#[test]
fn a_task_table_that_does_not_load_changes_nothing() {
    let r = rig();
    let (a, b) = (r.scratch.netns("a"), r.scratch.netns("b"));
    let before = r.fake.world();
    r.fake.fail_on(&format!("nft check {b}"));
    let e = r
        .engine
        .apply(&r.config, &plan(&[&a, &b], true))
        .expect_err("b does not load");
    assert!(format!("{e:#}").contains("nothing was changed"), "{e:#}");
    assert_eq!(r.fake.world(), before);
    assert_eq!(
        r.fake.changes(),
        [
            "nft check host".to_string(),
            format!("nft check {a}"),
            format!("nft check {b}")
        ]
    );
}

/// The ordering bug of issue 19: the proxy's routing and sysctl were made
/// before the host table had been checked, and the host table's failure
/// then said "nothing was changed".
#[test]
fn proxy_routing_waits_until_the_host_table_is_checked() {
    let r = rig();
    let before = r.fake.world();
    r.fake.fail_on("nft check host");
    let e = r
        .engine
        .apply(&r.config, &plan(&[], true))
        .expect_err("the host table does not load");
    assert!(format!("{e:#}").contains("nothing was changed"), "{e:#}");
    assert_eq!(r.fake.world(), before);
    assert_eq!(r.fake.changes(), ["nft check host"]);
    assert_eq!(r.engine.load_state(), State::default());
}

/// A host table that passes its check but fails to load (the kernel
/// changed in between) leaves the host as it was: the routing and sysctl
/// made for it are taken back, and addresses an earlier version added to
/// `lo` are removed only once the new tables are in.
#[test]
fn a_host_table_that_fails_to_load_leaves_the_host_as_it_was() {
    let r = rig();
    let old: IpAddr = "169.254.170.2".parse().expect("address");
    r.fake.with_world(|w| {
        w.lo_addresses.insert(old);
    });
    r.engine
        .save_state(&State {
            addresses: vec![old],
            ..State::default()
        })
        .expect("state");
    let before = r.fake.world();
    r.fake.fail_on("nft apply host");
    let e = r
        .engine
        .apply(&r.config, &plan(&[], true))
        .expect_err("the host table does not load");
    assert!(format!("{e:#}").contains("nothing was changed"), "{e:#}");
    assert_eq!(r.fake.world(), before);
    let state = r.engine.load_state();
    assert!(state.routing.is_empty(), "{state:?}");
    assert_eq!(state.fwmark_accept_was, None);
    assert_eq!(state.addresses, [old]);
}

#[test]
fn proxy_routing_is_made_in_order_after_the_checks_and_before_the_rules() {
    let r = rig();
    let a = r.scratch.netns("a");
    r.engine
        .apply(&r.config, &plan(&[&a], true))
        .expect("apply");
    assert_eq!(
        changes_before_conntrack(&r.fake),
        [
            "nft check host".to_string(),
            format!("nft check {a}"),
            format!("routing add {V4_ROUTE}"),
            format!("routing add {V4_RULE}"),
            format!("routing add {V6_ROUTE}"),
            format!("routing add {V6_RULE}"),
            format!("sysctl write {FWMARK_ACCEPT}=1"),
            "nft apply host".into(),
            format!("nft apply {a}"),
        ]
    );
    let state = r.engine.load_state();
    assert_eq!(state.routing, [V4_ROUTE, V4_RULE, V6_ROUTE, V6_RULE]);
    assert_eq!(state.fwmark_accept_was.as_deref(), Some("0"));
    let world = r.fake.world();
    assert_eq!(world.routing.len(), 4);
    assert_eq!(world.sysctls[FWMARK_ACCEPT], "1");
}

#[test]
fn routing_that_fails_midway_is_taken_back() {
    let r = rig();
    let before = r.fake.world();
    r.fake.fail_on(&format!("routing add {V6_ROUTE}"));
    let e = r
        .engine
        .apply(&r.config, &plan(&[], true))
        .expect_err("the IPv6 route cannot be added");
    assert!(format!("{e:#}").contains("nothing was changed"), "{e:#}");
    assert_eq!(r.fake.world(), before);
    assert!(r.engine.load_state().routing.is_empty());
    let deleted: Vec<String> = r
        .fake
        .changes()
        .into_iter()
        .filter(|c| c.starts_with("routing delete"))
        .collect();
    // Last added, first taken back.
    assert_eq!(
        deleted,
        [
            format!("routing delete {V4_RULE}"),
            format!("routing delete {V4_ROUTE}")
        ]
    );
}

#[test]
fn routing_that_was_there_before_is_used_but_not_claimed() {
    let r = rig();
    r.fake.with_world(|w| {
        w.routing.insert(V4_ROUTE);
        w.routing.insert(V4_RULE);
    });
    r.engine.apply(&r.config, &plan(&[], true)).expect("apply");
    assert_eq!(r.engine.load_state().routing, [V6_ROUTE, V6_RULE]);
    r.engine.remove().expect("remove");
    let world = r.fake.world();
    assert_eq!(world.routing.iter().copied().collect::<Vec<_>>(), {
        let mut v = vec![V4_ROUTE, V4_RULE];
        v.sort();
        v
    });
    assert_eq!(world.sysctls[FWMARK_ACCEPT], "0");
}

#[test]
fn tables_of_namespaces_no_longer_selected_are_removed_unless_kept() {
    for stale in [Stale::Remove, Stale::Keep] {
        let r = rig();
        let (a, b) = (r.scratch.netns("a"), r.scratch.netns("b"));
        r.engine
            .apply(&r.config, &plan(&[&a, &b], false))
            .expect("first apply");
        r.fake.clear_calls();
        let report = r
            .engine
            .apply_with(&r.config, &plan(&[&a], false), stale)
            .expect("second apply");
        let key = (b.clone(), "inet".to_string(), "metaguard".to_string());
        match stale {
            Stale::Remove => {
                assert_eq!(report.removed_stale, std::slice::from_ref(&b));
                assert!(!r.fake.world().tables.contains_key(&key));
                assert_eq!(r.engine.load_state().netns, std::slice::from_ref(&a));
                // Only after the planned tables are in.
                let changes = changes_before_conntrack(&r.fake);
                let removed = changes
                    .iter()
                    .position(|c| *c == format!("nft delete {b} inet metaguard"))
                    .expect("stale table deleted");
                let loaded = changes
                    .iter()
                    .position(|c| *c == format!("nft apply {a}"))
                    .expect("a loaded");
                assert!(loaded < removed, "{changes:?}");
            }
            Stale::Keep => {
                assert!(report.removed_stale.is_empty());
                assert!(r.fake.world().tables.contains_key(&key));
                assert_eq!(r.engine.load_state().netns, [a.clone(), b.clone()]);
            }
        }
    }
}

#[test]
fn a_namespace_that_is_gone_is_forgotten_without_a_call() {
    let r = rig();
    let (a, b) = (r.scratch.netns("a"), r.scratch.netns("b"));
    r.engine
        .apply(&r.config, &plan(&[&a, &b], false))
        .expect("first apply");
    std::fs::remove_file(&b).expect("b gone");
    r.fake.clear_calls();
    let report = r
        .engine
        .apply(&r.config, &plan(&[&a], false))
        .expect("second apply");
    assert!(report.removed_stale.is_empty());
    assert!(!r
        .fake
        .changes()
        .iter()
        .any(|c| c.starts_with(&format!("nft delete {b}"))));
    assert_eq!(r.engine.load_state().netns, [a]);
}

#[test]
fn remove_takes_away_what_metaguard_made_and_restores_the_sysctl() {
    let r = rig();
    let a = r.scratch.netns("a");
    let initial = r.fake.world();
    r.engine
        .apply(&r.config, &plan(&[&a], true))
        .expect("apply");
    r.fake.clear_calls();
    let removed = r.engine.remove().expect("remove");
    assert_eq!(r.fake.world(), initial);
    assert!(removed.contains(&"host".to_string()), "{removed:?}");
    assert!(removed.contains(&"host bridge table".to_string()));
    assert!(removed.contains(&a));
    assert!(removed.contains(&format!("{FWMARK_ACCEPT} = 0")));
    // Rules before routes: without its rule a route is never looked up.
    let deletes: Vec<String> = r
        .fake
        .changes()
        .into_iter()
        .filter(|c| c.starts_with("routing delete"))
        .collect();
    assert_eq!(
        deletes,
        [
            format!("routing delete {V4_RULE}"),
            format!("routing delete {V6_RULE}"),
            format!("routing delete {V4_ROUTE}"),
            format!("routing delete {V6_ROUTE}"),
        ]
    );
    assert!(!r.scratch.0.join("state/state.json").exists());
}

#[test]
fn apply_without_a_proxy_takes_the_proxys_routing_away() {
    let r = rig();
    let initial = r.fake.world();
    r.engine
        .apply(&r.config, &plan(&[], true))
        .expect("with proxy");
    r.engine
        .apply(&r.config, &plan(&[], false))
        .expect("without");
    let world = r.fake.world();
    assert!(world.routing.is_empty());
    assert_eq!(world.sysctls, initial.sysctls);
    assert_eq!(
        world
            .tables
            .keys()
            .map(|k| k.1.as_str())
            .collect::<Vec<_>>(),
        ["inet"]
    );
    assert_eq!(r.engine.load_state(), State::default());
}

#[test]
fn heal_adds_back_only_the_routing_someone_deleted() {
    let r = rig();
    let p = plan(&[], true);
    r.engine.apply(&r.config, &p).expect("apply");
    r.fake.with_world(|w| {
        w.routing.remove(&V6_RULE);
    });
    r.fake.clear_calls();
    let added = r
        .engine
        .heal_proxy(p.proxy.as_ref().expect("proxy"))
        .expect("heal");
    assert_eq!(added, [V6_RULE]);
    assert_eq!(r.fake.changes(), [format!("routing add {V6_RULE}")]);
}

#[test]
fn guard_new_loads_new_namespaces_and_drops_unselected_ones() {
    let r = rig();
    let (a, b, c) = (
        r.scratch.netns("a"),
        r.scratch.netns("b"),
        r.scratch.netns("c"),
    );
    let first = plan(&[&a, &b], false);
    r.engine.apply(&r.config, &first).expect("apply");
    r.fake.clear_calls();
    let mut heard = Vec::new();
    let before = [a.clone(), b.clone()];
    r.engine
        .guard_new(&plan(&[&a, &c], false), &before, Stale::Remove, |g| {
            heard.push(g)
        })
        .expect("guard");
    assert_eq!(
        heard,
        [
            Guarding::Loaded {
                netns: c.clone(),
                pid: 1004
            },
            Guarding::Removed(b.clone()),
        ]
    );
    // The state file names the new set before anything is touched.
    assert_eq!(r.engine.load_state().netns, [a.clone(), c.clone()]);
    assert_eq!(
        r.fake.changes(),
        [
            format!("nft apply {c}"),
            format!("nft delete {b} inet metaguard")
        ]
    );
}

#[test]
fn guard_new_keeps_earlier_namespaces_without_container_facts() {
    let r = rig();
    let (a, b) = (r.scratch.netns("a"), r.scratch.netns("b"));
    r.engine
        .apply(&r.config, &plan(&[&a, &b], false))
        .expect("apply");
    r.fake.clear_calls();
    let before = [a.clone(), b.clone()];
    let mut heard = Vec::new();
    r.engine
        .guard_new(&plan(&[&a], false), &before, Stale::Keep, |g| heard.push(g))
        .expect("guard");
    assert!(heard.is_empty(), "{heard:?}");
    assert!(r.fake.changes().is_empty());
    assert_eq!(r.engine.load_state().netns, [a, b]);
}
