//! The enforcement engine: discover the host, build the plan (core), make
//! the kernel match it, check that it does, and take it away again.
//!
//! * **apply** checks every table's script in its namespace with `nft -c`
//!   first, so a bad plan changes nothing; then loads each table as one
//!   transaction that replaces the old one whole (never flush-then-fill);
//!   removes metaguard's tables from namespaces that are no longer selected;
//!   and deletes conntrack entries towards denied endpoints (F11), so an
//!   already-open connection does not outlive the rules.
//! * **verify** loads the same scripts into a throwaway namespace and reads
//!   them back: that is what the kernel makes of the policy. The live tables
//!   are read back and compared with it semantically (see [`canonical`]).
//! * **remove** deletes metaguard's table in the host namespace and in every
//!   namespace the state file lists — nothing else.
//!
//! The state file (`<state dir>/state.json`) lists the task namespaces
//! metaguard wrote to; it is written before they are touched.
//!
//! Every kernel operation goes through the [`Host`] seam
//! ([`metaguard_sys::host`]): the real host in production, the recording
//! fake in this module's unit tests, which pin the order of operations.

pub mod bpf;
pub mod canonical;
mod facts;
pub mod namespaces;
pub mod redirect;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use metaguard_core::config::Selector;
use metaguard_core::ruleset::{self, Plan, FAMILY, TABLE};
use metaguard_core::Config;
use metaguard_sys::cgroup::Cgroup2;
use metaguard_sys::host::{Host, Listing, RealHost};
use metaguard_sys::netns::Netns;
use serde::{Deserialize, Serialize};

pub use facts::{needs_docker, netns_dirs, netns_paths, Containers};

/// Default directory of metaguard's run-time state.
pub const DEFAULT_STATE_DIR: &str = "/run/metaguard";

/// The namespaces metaguard wrote tables into, besides the host's own.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct State {
    pub netns: Vec<String>,
    /// Addresses an earlier version added to the host's `lo` for its
    /// proxy (never ones that were there before); removed by the next
    /// apply or `remove`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<std::net::IpAddr>,
    /// Policy-routing rules and routes metaguard added for its proxy
    /// (never ones that were there before).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routing: Vec<redirect::Routing>,
    /// `net.ipv4.tcp_fwmark_accept` before metaguard set it, restored by
    /// `remove`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fwmark_accept_was: Option<String>,
}

/// Host context for the engine.
#[derive(Debug)]
pub struct Engine {
    /// The kernel, or the recording fake in tests (`dyn`: every call
    /// starts a process or talks netlink, so dispatch costs nothing, and
    /// the CLI and the daemon keep one concrete `Engine`).
    host: Box<dyn Host>,
    cgroup2: Option<Cgroup2>,
    state_dir: PathBuf,
    docker_socket: PathBuf,
    bpf_pin_dir: PathBuf,
    /// The only cgroup subtree the BPF layer may attach in (the lab's).
    bpf_fence: Option<String>,
}

/// A namespace and the table planned for it.
#[derive(Debug)]
pub struct Target {
    /// `None` is the host (this process's) namespace.
    pub netns: Option<Netns>,
    pub label: String,
    pub script: String,
}

/// What `apply` did.
#[derive(Debug, Default, Serialize)]
pub struct ApplyReport {
    pub tables: Vec<String>,
    pub removed_stale: Vec<String>,
    pub conntrack_deleted: u64,
    pub warnings: Vec<String>,
    /// The cgroup BPF layer (`None` when not attempted).
    pub bpf: Option<bpf::BpfReport>,
}

/// The outcome of `verify` for one namespace.
#[derive(Debug, Serialize)]
pub struct NamespaceReport {
    pub netns: String,
    pub ok: bool,
    pub differences: Vec<String>,
}

impl Engine {
    /// `state_dir`: where the state file lives. Finds cgroup2 through
    /// /proc/self/mountinfo (absent is fine unless the config needs it).
    pub fn new(state_dir: &Path, docker_socket: &Path) -> anyhow::Result<Engine> {
        let cgroup2 = Cgroup2::discover(Path::new("/proc/self/mountinfo")).ok();
        let host = RealHost::new(cgroup2.as_ref().map(Cgroup2::mount))?;
        let mut engine = Engine::with_host(Box::new(host), state_dir, docker_socket);
        engine.cgroup2 = cgroup2;
        Ok(engine)
    }

    /// An engine on `host` (the fake, in tests), without a cgroup2
    /// hierarchy.
    pub fn with_host(host: Box<dyn Host>, state_dir: &Path, docker_socket: &Path) -> Engine {
        Engine {
            host,
            cgroup2: None,
            state_dir: state_dir.to_path_buf(),
            docker_socket: docker_socket.to_path_buf(),
            bpf_pin_dir: PathBuf::from(metaguard_sys::bpf::DEFAULT_PIN_DIR),
            bpf_fence: bpf::fence(),
        }
    }

    /// The host seam this engine runs on.
    pub fn host(&self) -> &dyn Host {
        self.host.as_ref()
    }

    /// Discovers what the config needs from the host and builds the plan.
    /// Errors (exit 2) for things that make the plan meaningless: a cgroup
    /// that does not exist, cgroup selectors without a cgroup2 hierarchy.
    pub fn plan(&self, config: &Config) -> anyhow::Result<Plan> {
        self.check_cgroups(config)?;
        let facts = self.facts(config)?;
        Ok(ruleset::plan(config, &facts)?)
    }

    /// Like [`Engine::plan`], for the daemon: configured cgroups that do
    /// not exist (yet) are left out of the plan with a warning instead of
    /// failing it — a cgroup that does not exist holds no process to guard.
    /// The daemon watches for them and re-plans when they appear.
    ///
    /// The containers are given (or asked for, with [`Containers::Ask`]);
    /// with [`Containers::Unknown`] the plan has no task namespaces and no
    /// `containers` matches, and says so.
    pub fn plan_present(
        &self,
        config: &Config,
        containers: Containers<'_>,
    ) -> anyhow::Result<Plan> {
        let mut present = config.clone();
        let mut missing = Vec::new();
        if let Some(cg) = &self.cgroup2 {
            for w in &mut present.workloads {
                if let Selector::Cgroups(paths) = &mut w.selector {
                    paths.retain(|p| {
                        let here = cg.exists(p);
                        if !here {
                            missing.push(format!(
                                "workload {:?}: cgroup {p:?} does not exist yet; guarded as soon as it appears",
                                w.name
                            ));
                        }
                        here
                    });
                }
            }
        }
        self.check_cgroups(&present)?;
        let unknown = matches!(containers, Containers::Unknown);
        let facts = self.facts_with(&present, containers)?;
        let mut plan = ruleset::plan(&present, &facts)?;
        plan.warnings.extend(missing);
        if unknown && needs_docker(config) {
            plan.warnings.push(
                "the Docker API is asked once the daemon is ready (ecs-tasks and containers selectors are followed from then on); task namespaces guarded before keep their tables".into(),
            );
        }
        Ok(plan)
    }

    /// The directories to watch for configured cgroups appearing or being
    /// re-created: the nearest existing ancestor of each — of every
    /// `cgroups` entry and, with the BPF layer on, of every
    /// `container_cgroups` subtree (inside the attach fence), so a subtree
    /// made after `apply` (`ecstasks.slice` at the first ECS task,
    /// cgroupfs Docker's `docker` at its first container) gets the
    /// programs when it appears.
    pub fn cgroup_watch_dirs(&self, config: &Config) -> Vec<PathBuf> {
        let Some(cg) = &self.cgroup2 else {
            return Vec::new();
        };
        let mut paths: Vec<&str> = config
            .workloads
            .iter()
            .filter_map(|w| match &w.selector {
                Selector::Cgroups(paths) => Some(paths),
                _ => None,
            })
            .flatten()
            .map(String::as_str)
            .collect();
        if config.layers.bpf {
            let fence = self.bpf_fence.as_deref();
            paths.extend(
                config
                    .layers
                    .container_cgroups
                    .iter()
                    .map(String::as_str)
                    .filter(|p| bpf::inside_fence(fence, p)),
            );
        }
        let mut dirs = Vec::new();
        for p in paths {
            let mut dir = cg.path(p);
            while !dir.is_dir() || dir == cg.path(p) {
                match dir.parent() {
                    Some(parent) if parent.starts_with(cg.mount()) => dir = parent.to_path_buf(),
                    _ => break,
                }
            }
            if dir.is_dir() && !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
        dirs
    }

    fn check_cgroups(&self, config: &Config) -> anyhow::Result<()> {
        for w in &config.workloads {
            let Selector::Cgroups(paths) = &w.selector else {
                continue;
            };
            let Some(cg) = &self.cgroup2 else {
                bail!(
                    "workload {:?} selects cgroups, but the cgroup v2 hierarchy is not mounted on this host; mount it (mount -t cgroup2 none /sys/fs/cgroup/unified) or remove the workload. Nothing was changed.",
                    w.name
                );
            };
            // nft matches `socket cgroupv2 level N` counted from the real
            // root, which a private cgroup namespace hides: the rules would
            // silently match nothing.
            if !metaguard_sys::cgroup::in_initial_namespace().unwrap_or(true) {
                bail!(
                    "workload {:?} selects cgroups, but metaguard runs in a cgroup namespace of its own, where cgroup paths do not show how deep a cgroup really is (nft's `socket cgroupv2 level` counts from the host's root); run metaguard in the host's cgroup namespace (a systemd unit on the host does; `docker run --cgroupns=host` for a container). Nothing was changed.",
                    w.name
                );
            }
            for p in paths {
                if !cg.exists(p) {
                    bail!(
                        "workload {:?}: cgroup {p:?} does not exist (looked for {}); create it or fix the config. Nothing was changed.",
                        w.name,
                        cg.path(p).display()
                    );
                }
            }
        }
        Ok(())
    }

    /// Opens the namespaces of a plan. A selected namespace that is this
    /// process's own (which would overwrite the host table) is skipped with
    /// a warning.
    pub fn targets(&self, plan: &Plan, warnings: &mut Vec<String>) -> anyhow::Result<Vec<Target>> {
        let own = self
            .host
            .own_netns()
            .context("cannot identify this network namespace")?;
        let mut out = vec![Target {
            netns: None,
            label: "host".into(),
            script: plan.host.clone(),
        }];
        for n in &plan.netns {
            let ns = self
                .host
                .open_netns(Path::new(&n.path))
                .with_context(|| format!("workload {:?}", n.workload))?;
            if ns.id() == own {
                warnings.push(format!(
                    "{} (workload {:?}) is metaguard's own network namespace; its rules are the host table, skipped",
                    n.path, n.workload
                ));
                continue;
            }
            out.push(Target {
                netns: Some(ns),
                label: n.path.clone(),
                script: n.script.clone(),
            });
        }
        Ok(out)
    }

    fn state_path(&self) -> PathBuf {
        self.state_dir.join("state.json")
    }

    pub fn load_state(&self) -> State {
        std::fs::read_to_string(self.state_path())
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    }

    pub fn save_state(&self, state: &State) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.state_dir)
            .with_context(|| format!("cannot create {}", self.state_dir.display()))?;
        let tmp = self.state_path().with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(state)?)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, self.state_path())
            .with_context(|| format!("cannot write {}", self.state_path().display()))?;
        Ok(())
    }

    /// Makes the kernel match `plan`. Checks everything before changing
    /// anything.
    pub fn apply(&self, config: &Config, plan: &Plan) -> anyhow::Result<ApplyReport> {
        self.apply_with(config, plan, Stale::Remove)
    }

    /// [`Engine::apply`]; with [`Stale::Keep`] the tables in namespaces an
    /// earlier apply guarded and `plan` does not list are left in place
    /// (and stay in the state file): for a plan made before the Docker API
    /// could be asked, which does not know the task namespaces yet.
    pub fn apply_with(
        &self,
        config: &Config,
        plan: &Plan,
        stale: Stale,
    ) -> anyhow::Result<ApplyReport> {
        let mut report = ApplyReport {
            warnings: plan.warnings.clone(),
            ..ApplyReport::default()
        };
        let targets = self.targets(plan, &mut report.warnings)?;
        // All or nothing across namespaces: every table is checked against
        // its kernel before anything changes. The host table, the big one,
        // is checked apart from its load only when the proxy's routing and
        // sysctl are changed before it; otherwise its load (one transaction,
        // which changes nothing when it fails) is its check.
        for t in &targets {
            if t.netns.is_some() || plan.proxy.is_some() {
                self.host
                    .nft_check(t.netns.as_ref(), &t.script)
                    .with_context(|| {
                        format!(
                            "the ruleset for {} does not load; nothing was changed",
                            t.label
                        )
                    })?;
            }
        }
        let previous = self.load_state();
        let mut state = State {
            netns: targets
                .iter()
                .filter(|t| t.netns.is_some())
                .map(|t| t.label.clone())
                .collect(),
            addresses: previous.addresses.clone(),
            routing: previous.routing.clone(),
            fwmark_accept_was: previous.fwmark_accept_was.clone(),
        };
        // Record before touching: the union, so a crash midway still lets
        // `remove` find everything.
        let mut union = state.clone();
        for p in &previous.netns {
            if !union.netns.contains(p) {
                union.netns.push(p.clone());
            }
        }
        self.save_state(&union)?;
        // The proxy's policy routing and identity sysctl before the rules
        // that steer traffic to it; recorded as they are made, taken back
        // when it or the host table fails.
        let mut added = Vec::new();
        let host_first = match &plan.proxy {
            Some(p) => redirect::install(self.host(), p, &mut state, &mut added, |s| {
                self.save_state(s)
            }),
            None => Ok(()),
        }
        .and_then(|()| match targets.first() {
            Some(t) => self
                .host
                .nft_apply(t.netns.as_ref(), &t.script)
                .map(|_| report.tables.push(t.label.clone()))
                .map_err(anyhow::Error::new),
            None => Ok(()),
        });
        if let Err(e) = host_first {
            redirect::undo(self.host(), &mut state, &previous, &added)?;
            self.save_state(&state)?;
            return Err(e.context(format!(
                "the ruleset for {} does not load; nothing was changed",
                targets.first().map_or("host", |t| t.label.as_str())
            )));
        }
        for t in targets.iter().skip(1) {
            self.host
                .nft_apply(t.netns.as_ref(), &t.script)
                .with_context(|| {
                    format!(
                        "loading the ruleset for {} failed after {} was loaded",
                        t.label,
                        report.tables.join(", ")
                    )
                })?;
            report.tables.push(t.label.clone());
        }
        let unplanned: Vec<String> = previous
            .netns
            .iter()
            .filter(|p| !state.netns.contains(p))
            .cloned()
            .collect();
        for old in &unplanned {
            if stale == Stale::Keep {
                if Path::new(old).exists() {
                    state.netns.push(old.clone());
                }
                continue;
            }
            // A namespace that is gone took its table with it.
            if let Ok(ns) = self.host.open_netns(Path::new(old)) {
                if self.host.nft_delete(Some(&ns), FAMILY, TABLE)? {
                    report.removed_stale.push(old.clone());
                }
            }
        }
        if plan.proxy.is_none() {
            // No proxy any more: its bridge table (unless exceptions on a
            // bridge keep one), routing and sysctl go.
            if !plan.host.contains("\ntable bridge ") {
                self.host.nft_delete(None, "bridge", TABLE)?;
            }
            redirect::uninstall(self.host(), &mut state)?;
        } else {
            redirect::remove_old_addresses(self.host(), &mut state, &|s| self.save_state(s))?;
        }
        state.netns.sort();
        self.save_state(&state)?;
        let endpoints = facts::denied_endpoints(config);
        for t in &targets {
            match facts::conntrack_delete(self.host(), t.netns.as_ref(), &endpoints) {
                Ok(n) => report.conntrack_deleted += n,
                Err(e) => report.warnings.push(format!(
                    "{}: existing connections to the endpoints were not cut (F11): {e:#}",
                    t.label
                )),
            }
        }
        // The BPF layer after the nft tables: it never fails the apply.
        report.bpf = Some(self.apply_bpf(config, plan.containers.as_deref(), &mut report.warnings));
        Ok(report)
    }

    /// The daemon's re-plan: loads the tables of namespaces new to `plan`
    /// (not in `before`) and removes those of namespaces it no longer
    /// selects — with [`Stale::Keep`] (no container facts yet) those an
    /// earlier apply guarded are kept. The state file is written first.
    /// `each` hears of every change as it is made.
    pub fn guard_new(
        &self,
        plan: &Plan,
        before: &[String],
        stale: Stale,
        mut each: impl FnMut(Guarding),
    ) -> anyhow::Result<()> {
        let previous = self.load_state();
        let mut netns: Vec<String> = plan.netns.iter().map(|n| n.path.clone()).collect();
        if stale == Stale::Keep {
            for p in &previous.netns {
                if !netns.contains(p) && Path::new(p).exists() {
                    netns.push(p.clone());
                }
            }
        }
        let state = State { netns, ..previous };
        self.save_state(&state)?;
        let mut warnings = Vec::new();
        for t in self.targets(plan, &mut warnings)? {
            if t.netns.is_some() && !before.contains(&t.label) {
                let pid = self.load(&t)?;
                each(Guarding::Loaded {
                    netns: t.label,
                    pid,
                });
            }
        }
        for gone in before.iter().filter(|p| !state.netns.contains(p)) {
            // Still there but no longer selected: its table goes too.
            match self.host.open_netns(Path::new(gone)) {
                Ok(ns) => {
                    if self.host.nft_delete(Some(&ns), FAMILY, TABLE)? {
                        each(Guarding::Removed(gone.clone()));
                    }
                }
                Err(_) => each(Guarding::Forgotten(gone.clone())),
            }
        }
        Ok(())
    }

    /// What the kernel makes of each distinct script: loaded into a scratch
    /// namespace and read back.
    pub fn expected(&self, script: &str) -> anyhow::Result<canonical::Table> {
        let scratch = self
            .host
            .scratch_netns()
            .context("cannot create a scratch network namespace")?;
        self.host
            .nft_apply(Some(&scratch), script)
            .context("loading the expected ruleset into a scratch namespace")?;
        self.read(Some(&scratch), script.contains("\ntable bridge "))?
            .context("the scratch namespace has no metaguard table after loading it")
    }

    /// Reads metaguard's table back, with the host's bridge table merged in
    /// when `bridge` (the proxy's; see [`canonical::Table::merge_bridge`]).
    pub fn read(
        &self,
        ns: Option<&Netns>,
        bridge: bool,
    ) -> anyhow::Result<Option<canonical::Table>> {
        let read_one = |family: &str| -> anyhow::Result<Option<canonical::Table>> {
            let Some(json) = self.host.nft_list(ns, family, TABLE, Listing::Json)? else {
                return Ok(None);
            };
            let text = self
                .host
                .nft_list(ns, family, TABLE, Listing::Text)?
                .unwrap_or_default();
            Ok(Some(
                canonical::parse(&json, &text).map_err(anyhow::Error::msg)?,
            ))
        };
        let Some(mut t) = read_one(FAMILY)? else {
            return Ok(None);
        };
        if bridge {
            // Missing: the diff then names every object of it.
            if let Some(b) = read_one("bridge")? {
                t.merge_bridge(b);
            }
        }
        Ok(Some(t))
    }

    /// Loads one target's table (one transaction); returns the pid of the
    /// `nft` process that committed it.
    pub fn load(&self, t: &Target) -> anyhow::Result<u32> {
        self.host
            .nft_apply(t.netns.as_ref(), &t.script)
            .with_context(|| format!("loading the ruleset for {}", t.label))
    }

    /// Compares the kernel with `plan`, namespace by namespace.
    pub fn verify(&self, plan: &Plan) -> anyhow::Result<(Vec<NamespaceReport>, Vec<String>)> {
        let mut warnings = plan.warnings.clone();
        let targets = self.targets(plan, &mut warnings)?;
        let mut cache: Vec<(String, canonical::Table)> = Vec::new();
        let mut out = Vec::new();
        for t in &targets {
            let expected = match cache.iter().find(|(s, _)| *s == t.script) {
                Some((_, e)) => e.clone(),
                None => {
                    let e = self.expected(&t.script)?;
                    cache.push((t.script.clone(), e.clone()));
                    e
                }
            };
            let mut differences = match self.read(t.netns.as_ref(), expected.has_bridge())? {
                None => vec![format!("table {FAMILY} {TABLE} is missing")],
                Some(actual) => canonical::diff(&expected, &actual),
            };
            if t.netns.is_none() {
                if let Some(p) = &plan.proxy {
                    differences.extend(redirect::check(self.host(), p)?);
                }
            }
            out.push(NamespaceReport {
                netns: t.label.clone(),
                ok: differences.is_empty(),
                differences,
            });
        }
        // Tables left in namespaces no longer selected.
        let selected: Vec<&String> = plan.netns.iter().map(|n| &n.path).collect();
        for stale in self
            .load_state()
            .netns
            .iter()
            .filter(|p| !selected.contains(p))
        {
            if let Ok(ns) = self.host.open_netns(Path::new(stale)) {
                if self
                    .host
                    .nft_list(Some(&ns), FAMILY, TABLE, Listing::Json)?
                    .is_some()
                {
                    out.push(NamespaceReport {
                        netns: stale.clone(),
                        ok: false,
                        differences: vec![format!(
                            "table {FAMILY} {TABLE} is still here although no workload selects this namespace"
                        )],
                    });
                }
            }
        }
        Ok((out, warnings))
    }

    /// Adds whatever of the proxy's policy routing (and sysctl) is
    /// missing, recorded like apply's; returns what was added. The daemon
    /// calls it when the kernel reports a deletion in the proxy's table.
    pub fn heal_proxy(
        &self,
        plan: &metaguard_core::ruleset::ProxyPlan,
    ) -> anyhow::Result<Vec<redirect::Routing>> {
        let mut state = self.load_state();
        let mut added = Vec::new();
        redirect::install(self.host(), plan, &mut state, &mut added, |s| {
            self.save_state(s)
        })?;
        Ok(added)
    }

    /// Deletes metaguard's tables: host, and every namespace in the state.
    pub fn remove(&self) -> anyhow::Result<Vec<String>> {
        let mut removed = Vec::new();
        if let Some(b) = self.remove_bpf()? {
            removed.push(b);
        }
        if self.host.nft_delete(None, FAMILY, TABLE)? {
            removed.push("host".to_string());
        }
        if self.host.nft_delete(None, "bridge", TABLE)? {
            removed.push("host bridge table".to_string());
        }
        let mut state = self.load_state();
        removed.extend(redirect::uninstall(self.host(), &mut state)?);
        for p in state.netns {
            if let Ok(ns) = self.host.open_netns(Path::new(&p)) {
                if self.host.nft_delete(Some(&ns), FAMILY, TABLE)? {
                    removed.push(p);
                }
            }
        }
        match std::fs::remove_file(self.state_path()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("cannot remove {}", self.state_path().display()))
            }
        }
        Ok(removed)
    }
}

/// A change [`Engine::guard_new`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Guarding {
    /// A new namespace's table loaded, by the `nft` process `pid`.
    Loaded { netns: String, pid: u32 },
    /// A namespace no longer selected: its table removed.
    Removed(String),
    /// A namespace that is gone: forgotten.
    Forgotten(String),
}

/// What apply does with tables in namespaces the plan no longer lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stale {
    Remove,
    Keep,
}
