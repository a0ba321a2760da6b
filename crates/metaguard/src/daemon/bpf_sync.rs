//! The daemon's side of the cgroup BPF layer: remember what the last apply
//! left, watch its pin directory, read it back, heal and re-plan it (the
//! comparison itself is [`bpf_heal`]).

use super::*;

impl Daemon {
    /// After an apply: remembers the BPF layer as it left it — or forgets
    /// it when the layer is not active — watches its pin directory and
    /// follows its refusal events.
    pub(super) fn sync_bpf(&mut self, active: bool) {
        if !active {
            self.bpf = None;
            return;
        }
        let pins = self.engine.bpf_pins();
        let links = match pins.links() {
            Ok(l) => l,
            Err(e) => {
                error!(error = %e, "cannot read the BPF layer back; it is not watched");
                self.bpf = None;
                return;
            }
        };
        let mut warnings = Vec::new();
        let planned =
            self.engine
                .bpf_desired(&self.config, self.containers.as_deref(), &mut warnings);
        self.watch_bpf_pins(pins.path());
        let netns = pins.read_maps().map(|m| m.netns).unwrap_or_default();
        self.publish_conn_view(&netns);
        let (follower, netns_warnings) = self
            .bpf
            .take()
            .map_or((None, Vec::new()), |g| (g.follower, g.netns_warnings));
        let follower = follower.or_else(|| {
            bpf_events::spawn(
                self.opts.bpf_pin_dir.clone(),
                self.metrics.bpf_refusals.clone(),
                observe_conn::Recorder::new(
                    self.conn_view.clone(),
                    self.metrics.observed_connections.clone(),
                    Path::new("/proc"),
                ),
            )
        });
        self.bpf = Some(BpfGuard {
            links: links.into_iter().map(|l| (l.name(), l.info)).collect(),
            planned,
            follower,
            retry_at: None,
            netns,
            netns_warnings,
        });
    }

    /// Rewrites the namespace map (`mg_netns`) for the containers and
    /// namespaces there are now; says so when it changed.
    pub(super) fn sync_bpf_namespaces(&mut self, why: &str) {
        if self.bpf.is_none() {
            return;
        }
        let started = Instant::now();
        let mut warnings = Vec::new();
        let result =
            self.engine
                .sync_bpf_netns(&self.config, self.containers.as_deref(), &mut warnings);
        if let Some(g) = &mut self.bpf {
            for w in warnings.iter().filter(|w| !g.netns_warnings.contains(w)) {
                warn!(warning = %w, "bpf layer");
            }
            g.netns_warnings = warnings;
        }
        match result {
            Ok(Some(map)) => {
                let Some(g) = &mut self.bpf else { return };
                if g.netns != map {
                    info!(
                        layer = "bpf",
                        why,
                        entries = map.len(),
                        us = started.elapsed().as_micros() as u64,
                        "bpf namespace map updated"
                    );
                    g.netns = map;
                }
            }
            Ok(None) => {}
            Err(e) => {
                error!(layer = "bpf", why, error = %format!("{e:#}"), "cannot update the bpf namespace map; new namespaces stay refused")
            }
        }
        // The containers (and the map) the connection records are
        // attributed with.
        if let Some(g) = &self.bpf {
            let netns = g.netns.clone();
            self.publish_conn_view(&netns);
        }
    }

    /// Publishes what the events follower attributes observed connections
    /// with: the config, the observe log (when observing), the namespace
    /// map as written and the containers.
    pub(super) fn publish_conn_view(&self, netns: &BTreeMap<u64, (u32, u32)>) {
        let log = if self.config.observes() {
            self.observe_log.clone()
        } else {
            None
        };
        self.conn_view.publish(observe_conn::View {
            config: Arc::new(self.config.clone()),
            log,
            netns: netns.clone(),
            containers: Arc::new(self.containers.clone().unwrap_or_default()),
            write_errors: self
                .proxy_metrics
                .as_ref()
                .map(|m| m.observe_errors.clone()),
        });
    }

    /// inotify on the pin directory; added again after every apply, since
    /// a directory that was removed and re-created is another inode.
    pub(super) fn watch_bpf_pins(&mut self, dir: &Path) {
        use inotify::WatchMask;
        let mask = WatchMask::DELETE
            | WatchMask::MOVED_FROM
            | WatchMask::DELETE_SELF
            | WatchMask::MOVE_SELF;
        let result = match &mut self.bpf_watches {
            Some(w) => w.add(dir, mask).map(drop).map_err(anyhow::Error::from),
            None => monitor::watch(dir, mask, self.tx.clone(), || Event::BpfPins)
                .map(|w| self.bpf_watches = Some(w)),
        };
        if let Err(e) = result {
            warn!(dir = %dir.display(), error = %format!("{e:#}"), "cannot watch the BPF pin directory; the periodic check still runs");
        }
    }

    /// Reads the pinned links back and compares them with what the last
    /// apply left; re-applies the layer on any difference.
    pub(super) fn check_bpf(&mut self, trigger: &'static str) {
        let Some(g) = &self.bpf else {
            return;
        };
        if g.retry_at.is_some_and(|t| Instant::now() < t) {
            return;
        }
        let pins = self.engine.bpf_pins();
        let found = match pins.links() {
            Ok(actual) => bpf_heal::drift(&g.links, &actual, &pins.missing_maps()),
            Err(e) => {
                error!(error = %e, "cannot read the BPF links back");
                return;
            }
        };
        if found.is_empty() {
            return;
        }
        // A configured cgroup that went or came back is a new plan (other
        // links), not drift to undo.
        let mut warnings = Vec::new();
        if self
            .engine
            .bpf_desired(&self.config, self.containers.as_deref(), &mut warnings)
            != g.planned
        {
            self.replan_bpf("a configured cgroup was removed or re-created");
            return;
        }
        self.heal_bpf(trigger, &found);
    }

    /// Puts the BPF layer back (one apply of it: links re-created, updated
    /// or unpinned, maps re-filled) and says what had changed.
    pub(super) fn heal_bpf(&mut self, trigger: &'static str, found: &[bpf_heal::Drift]) {
        let started = Instant::now();
        let cause = found.first().map_or(bpf_heal::CAUSES[2], |d| d.cause());
        let changes = found
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        self.metrics.drift.inc();
        let mut warnings = Vec::new();
        let report = self
            .engine
            .apply_bpf(&self.config, self.containers.as_deref(), &mut warnings);
        for w in &warnings {
            warn!(warning = %w, "bpf layer");
        }
        if report.state != "active" {
            error!(layer = "bpf", cause, changes = %changes, reason = %report.reason, "heal failed; checking again in 5 s");
            if let Some(g) = &mut self.bpf {
                g.retry_at = Some(Instant::now() + BPF_RETRY);
            }
            return;
        }
        if found.contains(&bpf_heal::Drift::MapUnpinned("mg_events")) {
            // A new ring buffer: the old follower reads one nobody writes.
            if let Some(g) = &mut self.bpf {
                g.follower = None;
            }
        }
        self.sync_bpf(true);
        let secs = started.elapsed().as_secs_f64();
        self.metrics.heals.with_label_values(&[cause]).inc();
        self.metrics.last_apply.set(secs);
        info!(
            layer = "bpf",
            pin_dir = %report.pin_dir,
            cause,
            trigger,
            changes = %changes,
            attached = report.attached.len(),
            updated = report.updated.len(),
            detached = report.detached.len(),
            ms = (secs * 1000.0) as u64,
            "healed"
        );
    }

    /// After cgroup events: a configured cgroup that appeared, went or was
    /// re-created (new id) changes what the BPF layer should hold; anything
    /// else is checked as drift.
    pub(super) fn follow_cgroups_bpf(&mut self) {
        let Some(g) = &self.bpf else {
            return;
        };
        let mut warnings = Vec::new();
        if self
            .engine
            .bpf_desired(&self.config, self.containers.as_deref(), &mut warnings)
            != g.planned
        {
            self.replan_bpf("a configured cgroup appeared, was removed or re-created");
        } else {
            self.check_bpf("cgroup event");
        }
    }

    /// Applies the BPF layer for a new plan (not a heal).
    pub(super) fn replan_bpf(&mut self, why: &str) {
        let mut warnings = Vec::new();
        let report = self
            .engine
            .apply_bpf(&self.config, self.containers.as_deref(), &mut warnings);
        for w in &warnings {
            warn!(warning = %w, "bpf layer");
        }
        info!(
            why,
            state = %report.state,
            attached = report.attached.len(),
            updated = report.updated.len(),
            detached = report.detached.len(),
            "bpf layer updated"
        );
        self.sync_bpf(report.state == "active");
    }
}
