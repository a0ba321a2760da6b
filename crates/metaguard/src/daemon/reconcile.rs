//! The daemon's reconcile loop for the nft tables and the proxy's policy
//! routing: heal a table that drifted, re-plan when namespaces, containers
//! or cgroups change, guard new namespaces, reload the config. Every kernel
//! operation goes through the engine and so through its host seam
//! (`metaguard_sys::host`); the plans it carries out
//! ([`Engine::guard_new`](crate::enforce::Engine::guard_new), apply) are
//! unit-tested in `enforce` through the recording fake.

use std::path::Path;
use std::time::{Duration, Instant};

use metaguard_core::ruleset::{FAMILY, TABLE};
use metaguard_core::Config;
use tracing::{error, info};

use super::*;

impl Daemon {
    /// Makes `guarded` match the plan's targets: monitors for new ones
    /// (with their expected table), none for those gone.
    pub(super) fn sync_guarded(&mut self) -> anyhow::Result<()> {
        let mut warnings = Vec::new();
        let targets = self.engine.targets(&self.plan, &mut warnings)?;
        let keys: Vec<String> = targets.iter().map(|t| t.label.clone()).collect();
        self.guarded.retain(|k, _| keys.contains(k));
        // Scripts no target uses any more (old configs) leave the cache.
        self.expected_cache
            .retain(|script, _| targets.iter().any(|t| &t.script == script));
        for t in targets {
            let expected = match self.expected_cache.get(&t.script) {
                Some(e) => e.clone(),
                None => {
                    let e = self.engine.expected(&t.script)?;
                    self.expected_cache.insert(t.script.clone(), e.clone());
                    e
                }
            };
            match self.guarded.get_mut(&t.label) {
                Some(g) => {
                    g.expected = expected;
                    g.target = t;
                }
                None => {
                    let monitor = monitor::spawn(
                        self.engine.host(),
                        t.netns.as_ref(),
                        &t.label,
                        self.tx.clone(),
                    )?;
                    self.guarded.insert(
                        t.label.clone(),
                        Guarded {
                            target: t,
                            expected,
                            monitor,
                        },
                    );
                }
            }
        }
        Ok(())
    }

    /// Follows deletions in the proxy's routing table (rtnetlink, on a
    /// thread of its own) once a plan has a proxy.
    pub(super) fn follow_routing(&mut self) {
        if self.routing_followed || self.plan.proxy.is_none() {
            return;
        }
        let tx = self.tx.clone();
        let spawned = std::thread::Builder::new()
            .name("metaguard-routing".into())
            .spawn(move || {
                let r = metaguard_sys::rtnl::follow_table_deletions(PROXY_ROUTE_TABLE, || {
                    tx.send(Event::Routing).is_ok()
                });
                if let Err(e) = r {
                    error!(error = %e, "cannot follow the proxy's policy routing; it is checked only by verify");
                }
            });
        match spawned {
            Ok(_) => self.routing_followed = true,
            Err(e) => error!(error = %e, "cannot start the policy routing follower"),
        }
    }

    /// Puts back the proxy's policy routing after someone deleted some.
    pub(super) fn heal_routing(&mut self) {
        let Some(p) = &self.plan.proxy else {
            return;
        };
        let started = Instant::now();
        match self.engine.heal_proxy(p) {
            Ok(added) if added.is_empty() => {}
            Ok(added) => {
                let secs = started.elapsed().as_secs_f64();
                self.metrics.drift.inc();
                self.metrics.heals.with_label_values(&[ROUTING_CAUSE]).inc();
                let changes = added
                    .iter()
                    .map(|o| format!("{o} deleted"))
                    .collect::<Vec<_>>()
                    .join("; ");
                info!(
                    layer = "routing",
                    cause = ROUTING_CAUSE,
                    changes = %changes,
                    ms = (secs * 1000.0) as u64,
                    "healed"
                );
            }
            Err(e) => error!(layer = "routing", error = %format!("{e:#}"), "heal failed"),
        }
    }

    /// Compares one namespace's table with what is expected; heals drift.
    pub(super) fn check(&mut self, key: &str, batch: Option<&monitor::Batch>) {
        let Some(g) = self.guarded.get(key) else {
            return;
        };
        let started = Instant::now();
        // A transaction that ended with the table deleted needs no
        // read-back: heal at once (two nft runs fewer on the hot path).
        let gone = batch.is_some_and(|b| b.leaves_table_deleted(FAMILY, TABLE));
        let actual = if gone {
            None
        } else {
            match self
                .engine
                .read(g.target.netns.as_ref(), g.expected.has_bridge())
            {
                Ok(a) => a,
                Err(e) => {
                    error!(netns = %key, error = %format!("{e:#}"), "cannot read the table back");
                    return;
                }
            }
        };
        let differences = match &actual {
            None => vec![format!("table {FAMILY} {TABLE} is missing")],
            Some(a) => canonical::diff(&g.expected, a),
        };
        if differences.is_empty() {
            return;
        }
        let cause = batch.map_or("monitor-restart", |b| b.cause(FAMILY, TABLE));
        self.metrics.drift.inc();
        match self.engine.load(&g.target) {
            Ok(pid) => {
                self.remember_own(pid);
                let secs = started.elapsed().as_secs_f64();
                self.metrics.heals.with_label_values(&[cause]).inc();
                self.metrics.last_apply.set(secs);
                info!(
                    netns = %key,
                    cause,
                    by = batch.map(|b| b.process.as_str()).unwrap_or("unknown"),
                    changes = %differences.join("; "),
                    ms = (secs * 1000.0) as u64,
                    "healed"
                );
            }
            Err(e) => error!(netns = %key, cause, error = %format!("{e:#}"), "heal failed"),
        }
    }

    /// Re-plans with fresh host facts (new or removed namespaces) and
    /// applies what changed.
    pub(super) fn replan(&mut self, why: &str) {
        // A namespace file exists before `ip netns add` mounts the nsfs on
        // it; wait (briefly, bounded) until every candidate is a namespace.
        let deadline = Instant::now() + Duration::from_millis(500);
        loop {
            let paths = crate::enforce::netns_paths(&self.config);
            let pending = paths.iter().any(|p| !is_nsfs(Path::new(p)));
            if !pending || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let config = self.config.clone();
        let events = self.docker_events_seen();
        let (plan, stale) = match self.plan_now(&config) {
            Ok(p) => p,
            Err(e) => {
                error!(error = %format!("{e:#}"), why, "cannot re-plan; the rules in force stay");
                return;
            }
        };
        let before: Vec<String> = self.plan.netns.iter().map(|n| n.path.clone()).collect();
        let after: Vec<String> = plan.netns.iter().map(|n| n.path.clone()).collect();
        let host_changed = plan.host != self.plan.host;
        let agent = self.agent_for(&config);
        if before == after && !host_changed {
            // The rules guard the same ports.
            self.publish_agent(agent, events);
            // The BPF layer's namespace map (an unclassified namespace is
            // refused there, so this only lets allowing workloads in).
            self.sync_bpf_namespaces(why);
            return;
        }
        self.plan = plan;
        if host_changed {
            self.hold_agent(&agent);
            let host = Target {
                netns: None,
                label: "host".into(),
                script: self.plan.host.clone(),
            };
            match self.engine.load(&host) {
                Ok(pid) => {
                    self.remember_own(pid);
                    info!(why, "host rules updated");
                    self.publish_agent(agent, events);
                }
                Err(e) => {
                    error!(error = %format!("{e:#}"), "cannot update the host rules; the previous ones stay")
                }
            }
        } else {
            self.publish_agent(agent, events);
        }
        if let Err(e) = self.apply_new_namespaces(&before, stale) {
            error!(error = %format!("{e:#}"), "cannot guard new namespaces");
        }
        // After the nft tables, which new namespaces wait for; the BPF
        // layer refuses them meanwhile.
        self.sync_bpf_namespaces(why);
        self.update_gauges();
        let status = self.status();
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&status)]);
    }

    /// Loads the tables of namespaces new to the plan and removes those of
    /// namespaces it no longer selects (with [`Stale::Keep`] — no
    /// container facts yet — those guarded earlier are kept).
    pub(super) fn apply_new_namespaces(
        &mut self,
        before: &[String],
        stale: Stale,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut own = Vec::new();
        let done = self.engine.guard_new(&self.plan, before, stale, |g| match g {
            Guarding::Loaded { netns, pid } => {
                own.push(pid);
                info!(netns = %netns, ms = started.elapsed().as_millis() as u64, "new namespace guarded");
            }
            Guarding::Removed(netns) => {
                info!(netns = %netns, "namespace no longer selected; its table removed")
            }
            Guarding::Forgotten(netns) => info!(netns = %netns, "namespace gone; forgotten"),
        });
        for pid in own {
            self.remember_own(pid);
        }
        done?;
        self.sync_guarded()
    }

    /// SIGHUP: a new config, all or nothing: parsed, planned, the proxy's
    /// settings opened and new listeners bound, then the rules applied;
    /// only then is the proxy switched over.
    pub(super) fn reload(&mut self, load: &impl Fn(Option<&Path>) -> anyhow::Result<Config>) {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Reloading]);
        let events = self.docker_events_seen();
        let result = load(self.opts.config_path.as_deref()).and_then(|config| {
            let (plan, stale) = self.plan_now(&config)?;
            let proxy = self.prepare_proxy(&config, &plan)?;
            let report = self.engine.apply_with(&config, &plan, stale)?;
            Ok((config, plan, proxy, report))
        });
        self.record.reloads += 1;
        self.record.last_reload = Some(record::Reload {
            at_unix_ms: record::now_unix_ms(),
            applied: result.is_ok(),
            error: result.as_ref().err().map(|e| format!("{e:#}")),
        });
        match result {
            Ok((config, plan, proxy, report)) => {
                self.netns_dirs = crate::enforce::netns_dirs(&config);
                if let Err(e) = self.watch_netns_dirs() {
                    warn!(error = %format!("{e:#}"), "cannot watch a namespace directory");
                }
                self.config = config;
                self.plan = plan;
                self.commit_proxy(proxy);
                self.publish_agent(self.agent_for(&self.config), events);
                self.follow_routing();
                self.sync_bpf(report.bpf.as_ref().is_some_and(|b| b.state == "active"));
                if let Err(e) = self.sync_guarded() {
                    error!(error = %format!("{e:#}"), "after reload");
                }
                self.update_gauges();
                self.record.config = self.config.origin.to_string();
                self.watch_docker();
                self.metrics.reloads.with_label_values(&["applied"]).inc();
                info!(tables = report.tables.len(), "reloaded: new config applied");
            }
            Err(e) => {
                self.metrics.reloads.with_label_values(&["refused"]).inc();
                error!(error = %format!("{e:#}"), "reload refused; the previous rules and proxy stay in force");
            }
        }
        self.save_record();
        let status = self.status();
        let _ = sd_notify::notify(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&status),
        ]);
    }
}

/// Whether `p` is a namespace file (an nsfs bind mount), not the empty file
/// `ip netns add` creates first.
fn is_nsfs(p: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(p), p.parent().map(std::fs::metadata)) {
        (Ok(m), Some(Ok(parent))) => m.dev() != parent.dev(),
        _ => false,
    }
}
