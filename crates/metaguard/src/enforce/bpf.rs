//! The cgroup BPF layer in the engine: `core::bpf_policy` decides,
//! `sys::bpf` loads, attaches and reads back; this module resolves cgroup
//! paths to ids and turns outcomes into report lines.
//!
//! The layer is an addition to the nft rules, never a replacement: when it
//! cannot run (no BPF object in this build, no bpf filesystem at the pin
//! directory, a kernel or privilege that refuses `bpf()`), `apply` says so
//! in a warning and the nft layer guards alone — and `verify` reports it,
//! when the config asks for the layer (it is on and some workload denies
//! by cgroup). The object is always the embedded [`sys::OBJECT`].

use std::collections::BTreeMap;
use std::path::Path;

use metaguard_core::bpf_policy::{self, BpfPolicy};
use metaguard_core::ruleset::ContainerFact;
use metaguard_core::Config;
use metaguard_sys::bpf::{self as sys, Attachment, Hook, MapContents, PinDir};
use metaguard_sys::cgroup::Cgroup2;
use serde::Serialize;

use super::{facts, namespaces, Engine, NamespaceReport};

/// The layer's state, for `apply`/`verify` reports.
#[derive(Debug, Default, Serialize, Clone, PartialEq, Eq)]
pub struct BpfReport {
    /// "active"; "disabled" (config), "idle" (nothing to guard), "not
    /// built" (this binary has no BPF object) or "unavailable" (this host).
    pub state: String,
    /// Why the layer is not active, when it is not.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub reason: String,
    pub pin_dir: String,
    pub attached: Vec<String>,
    pub kept: Vec<String>,
    /// Links that ran another program (an older metaguard's) and were
    /// given this one's in place.
    pub updated: Vec<String>,
    pub detached: Vec<String>,
    /// Entries of the namespace map (`mg_netns`): the host's, the
    /// classified namespaces' and the default for the others (0: the
    /// layer guards by cgroup only).
    pub namespaces: usize,
}

impl BpfReport {
    /// One line for `apply`'s output.
    pub fn summary(&self) -> String {
        if self.state == "active" {
            format!(
                "bpf layer: active ({}; attached {}, kept {}, updated {}, detached {}; namespace entries {})",
                self.pin_dir,
                self.attached.len(),
                self.kept.len(),
                self.updated.len(),
                self.detached.len(),
                self.namespaces
            )
        } else {
            let mut s = format!("bpf layer: {}: {}", self.state, self.reason);
            if !self.detached.is_empty() {
                s.push_str(&format!(" (removed {} pin(s))", self.detached.len()));
            }
            s
        }
    }
}

/// `--bpf-attach-within`: the only cgroup subtree where programs may be
/// attached (the lab's, so that no test ever attaches to a cgroup it did
/// not make). Set once by the command line, before any engine exists.
static FENCE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

/// Sets the attach fence for every engine this process makes.
pub fn set_fence(fence: Option<String>) {
    let _ = FENCE.set(fence.map(|f| f.trim_matches('/').to_string()));
}

/// The attach fence, if one was set.
pub(super) fn fence() -> Option<String> {
    FENCE.get().cloned().flatten()
}

/// Why the layer does not run: a report state and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Inactive {
    state: &'static str,
    why: String,
}

/// Whether `policy` has anything for the programs to do: some configured
/// cgroup denies something (an allow-only entry needs no program), or some
/// bridge, `netns` or `containers` workload denies or proxies something
/// (the programs then guard the container cgroups by namespace).
fn guards_anything(policy: &BpfPolicy) -> bool {
    !policy.attach.is_empty()
}

/// Whether `config` asks for the layer: it is on (the default) and has
/// something to refuse. Then a layer that is not active is a problem
/// `verify` reports, whatever the reason. A config that only observes
/// uses the layer when it can (to record connections) but is not left
/// unguarded without it: `apply` warns instead.
fn asked(config: &Config, policy: &BpfPolicy) -> bool {
    config.layers.bpf && guards_anything(policy) && policy.refuses()
}

/// What the kernel should hold for `config`, but the namespace map (see
/// [`Engine::bpf_netns`]): map contents and attachments. Configured cgroups
/// that do not exist are left out with a warning; container cgroups that
/// do not exist (a runtime this host does not use) silently. `fence`: the
/// only subtree programs may be attached in (the lab's).
pub fn desired(
    cg: &Cgroup2,
    policy: &BpfPolicy,
    fence: Option<&str>,
    warnings: &mut Vec<String>,
) -> (MapContents, Vec<Attachment>) {
    let mut contents = MapContents {
        ep4: policy.ep4.clone(),
        ep6: policy.ep6.clone(),
        policy: Default::default(),
        netns: Default::default(),
    };
    for c in &policy.cgroups {
        let id = match cg.id(&c.path) {
            Ok(id) => id,
            Err(e) => {
                warnings.push(format!(
                    "BPF layer: workload {:?}: cgroup {:?} skipped: {e}",
                    c.workload, c.path
                ));
                continue;
            }
        };
        contents.policy.insert(id, (c.rule, c.bits));
    }
    let mut attachments = Vec::new();
    for path in &policy.attach {
        if !inside_fence(fence, path) {
            warnings.push(format!(
                "BPF layer: cgroup {path:?} is outside {}; not attached",
                fence.unwrap_or_default()
            ));
            continue;
        }
        let Ok(id) = cg.id(path) else {
            continue; // warned above when configured; else not used here
        };
        for hook in Hook::ALL {
            attachments.push(Attachment {
                cgroup_dir: cg.path(path),
                cgroup_id: id,
                hook,
            });
        }
    }
    (contents, attachments)
}

/// Whether `path` is inside the attach fence (`--bpf-attach-within`);
/// everything is, without one.
pub(super) fn inside_fence(fence: Option<&str>, path: &str) -> bool {
    fence.is_none_or(|f| path == f || path.starts_with(&format!("{f}/")))
}

/// When namespaces must be refused but none of `[layers]
/// container_cgroups` exists (inside the attach fence: outside it,
/// `desired` has said so), the warning that containers have the nft layer
/// alone — until a subtree is made, which the daemon follows. A layer that
/// covers no container must say so.
fn no_container_cgroup(
    config: &Config,
    policy: &BpfPolicy,
    cg: &Cgroup2,
    fence: Option<&str>,
) -> Option<String> {
    if !policy.refuses_namespaces() {
        return None;
    }
    let inside: Vec<&String> = config
        .layers
        .container_cgroups
        .iter()
        .filter(|p| inside_fence(fence, p))
        .collect();
    if inside.is_empty() || inside.iter().any(|p| cg.exists(p)) {
        return None;
    }
    let names: Vec<&str> = inside.iter().map(|p| p.as_str()).collect();
    Some(format!(
        "BPF layer: none of [layers] container_cgroups exists ({}): bridge containers and task namespaces are guarded by the nft layer alone until one is made (the daemon attaches to it then); name where this host's containers live",
        names.join(", ")
    ))
}

/// When namespaces must be refused: the warning that containers with a
/// namespace of their own run in cgroups below none of the attach points
/// (a custom `--cgroup-parent`, a runtime's own slice) — the programs never
/// run for them, so they have the nft layer alone.
fn uncovered_containers(policy: &BpfPolicy, containers: &[ContainerFact]) -> Option<String> {
    if !policy.refuses_namespaces() {
        return None;
    }
    let outside: Vec<String> = containers
        .iter()
        .filter(|c| !c.host_network)
        .filter_map(|c| Some((c, c.cgroup.as_deref()?)))
        .filter(|(_, cgroup)| !policy.guarded(cgroup))
        .map(|(c, cgroup)| format!("{} ({cgroup})", c.name))
        .collect();
    const SHOWN: usize = 5;
    let more = match outside.len() {
        0 => return None,
        n if n > SHOWN => format!(" and {} more", n - SHOWN),
        _ => String::new(),
    };
    let shown: Vec<&str> = outside.iter().take(SHOWN).map(String::as_str).collect();
    Some(format!(
        "BPF layer: container(s) {}{more} run in cgroups below none of its attach points, so they have the nft layer alone; add where they live to [layers] container_cgroups",
        shown.join(", ")
    ))
}

impl Engine {
    /// Uses `dir` as the BPF layer's pin directory (default
    /// [`sys::DEFAULT_PIN_DIR`]).
    pub fn with_bpf_pin_dir(mut self, dir: &Path) -> Engine {
        self.bpf_pin_dir = dir.to_path_buf();
        self
    }

    /// The namespace map (`mg_netns`) for `config` now: the host's own
    /// namespace, every namespace found and settled (see
    /// [`namespaces::discover`]) with its workload's decision, and the
    /// default for the rest. Empty when no namespace can be refused
    /// anything.
    pub fn bpf_netns(
        &self,
        config: &Config,
        policy: &BpfPolicy,
        containers: Option<&[ContainerFact]>,
        warnings: &mut Vec<String>,
    ) -> BTreeMap<u64, (u32, u32)> {
        if policy.netns_default.is_none() {
            return BTreeMap::new();
        }
        let found = namespaces::discover(config, containers, &facts::netns_paths(config));
        warnings.extend(found.skipped.iter().map(|s| format!("BPF layer: {s}")));
        warnings.extend(uncovered_containers(policy, containers.unwrap_or_default()));
        found.map(config, policy.netns_default)
    }

    /// Rewrites the namespace map only (the daemon, after containers or
    /// namespaces changed): returns what it now holds, or `None` when the
    /// layer is not active or has no namespace part.
    pub fn sync_bpf_netns(
        &self,
        config: &Config,
        containers: Option<&[ContainerFact]>,
        warnings: &mut Vec<String>,
    ) -> anyhow::Result<Option<BTreeMap<u64, (u32, u32)>>> {
        let policy = bpf_policy::plan(config, containers);
        if self.bpf_inactive(config, &policy).is_some() || policy.netns_default.is_none() {
            return Ok(None);
        }
        let map = self.bpf_netns(config, &policy, containers, warnings);
        self.bpf_pins().set_netns(&map)?;
        Ok(Some(map))
    }

    /// Why the layer the config asks for (on, with something to guard)
    /// cannot be active here; `None` when it can, or when the config turns
    /// it off or gives it nothing to guard.
    pub fn bpf_not_active(&self, config: &Config) -> Option<String> {
        let policy = bpf_policy::plan(config, None);
        self.bpf_inactive(config, &policy)
            .filter(|i| i.state == "not built" || i.state == "unavailable")
            .map(|i| i.why)
    }

    /// The layer's pin directory.
    pub fn bpf_pins(&self) -> PinDir {
        PinDir::new(&self.bpf_pin_dir)
    }

    /// Why the layer does not run for `config` here, if it does not.
    fn bpf_inactive(&self, config: &Config, policy: &BpfPolicy) -> Option<Inactive> {
        let inactive = |state, why: String| Some(Inactive { state, why });
        if !config.layers.bpf {
            return inactive("disabled", "[layers] bpf = false".into());
        }
        if sys::OBJECT.is_empty() {
            return inactive("not built", sys::BpfError::NoObject.to_string());
        }
        if !guards_anything(policy) {
            return inactive(
                "idle",
                "no workload denies anything that the layer guards".into(),
            );
        }
        if self.cgroup2.is_none() {
            return inactive(
                "unavailable",
                "the cgroup v2 hierarchy is not mounted".into(),
            );
        }
        if let Err(e) =
            sys::supported(sys::OBJECT).and_then(|()| sys::check_bpffs(&self.bpf_pin_dir))
        {
            return inactive("unavailable", e.to_string());
        }
        None
    }

    /// What the layer should hold for `config` now — map contents and
    /// attachments, with fresh cgroup ids — or `None` when it does not run.
    /// The daemon compares successive answers to notice cgroups that were
    /// re-created or removed.
    pub fn bpf_desired(
        &self,
        config: &Config,
        containers: Option<&[ContainerFact]>,
        warnings: &mut Vec<String>,
    ) -> Option<(MapContents, Vec<Attachment>)> {
        let policy = bpf_policy::plan(config, containers);
        if self.bpf_inactive(config, &policy).is_some() {
            return None;
        }
        let cg = self.cgroup2.as_ref()?;
        Some(desired(cg, &policy, self.bpf_fence.as_deref(), warnings))
    }

    /// What `apply` would give the BPF layer, as `#` comment lines for
    /// `apply --dry-run`: whether it would run, where the programs would be
    /// attached, the cgroup decisions and the namespace map. Reads the
    /// host (cgroup ids, namespaces) and changes nothing.
    pub fn bpf_dry_run(&self, config: &Config, containers: Option<&[ContainerFact]>) -> String {
        use std::fmt::Write as _;
        let policy = bpf_policy::plan(config, containers);
        let mut out = format!(
            "\n# BPF layer (cgroup programs; pins in {}):",
            self.bpf_pin_dir.display()
        );
        if let Some(Inactive { state, why }) = self.bpf_inactive(config, &policy) {
            let _ = writeln!(out, " {state}: {why}");
            return out;
        }
        out.push_str(" would be active\n");
        let Some(cg) = &self.cgroup2 else {
            return out;
        };
        let mut warnings = Vec::new();
        let (_, attachments) = desired(cg, &policy, self.bpf_fence.as_deref(), &mut warnings);
        let classes = bits_text;
        for path in &policy.attach {
            let at = attachments
                .iter()
                .find(|a| a.cgroup_dir == cg.path(path))
                .map_or("absent here or fenced off; not attached".to_string(), |a| {
                    format!("cgroup id {}", a.cgroup_id)
                });
            let _ = writeln!(
                out,
                "#   attach connect4/6, sendmsg4/6, sock_create at {path} ({at})"
            );
        }
        for c in &policy.cgroups {
            let _ = writeln!(
                out,
                "#   cgroup {} (workload {:?}, rule {}): {}",
                c.path,
                c.workload,
                c.rule,
                classes(c.bits)
            );
        }
        if let Some((rule, bits)) = policy.netns_default {
            let found = namespaces::discover(config, containers, &facts::netns_paths(config));
            let _ = writeln!(
                out,
                "#   namespace: host's own (cookie {}): nothing refused",
                found.host_cookie
            );
            let _ = writeln!(
                out,
                "#   namespace: any other not classified yet (rule {rule}): {}",
                classes(bits)
            );
            for ns in &found.namespaces {
                let what = match ns.decision(config) {
                    Some((rule, bits)) if rule != bpf_policy::NO_RULE => {
                        format!("rule {rule}: {}", classes(bits))
                    }
                    Some(_) => "no workload selects it: nothing refused".to_string(),
                    None => "not settled (no port, no container): the default".to_string(),
                };
                let cookie = match ns.cookie {
                    0 => "cookie not read".to_string(),
                    c => format!("cookie {c}"),
                };
                let _ = writeln!(
                    out,
                    "#   namespace: {} ({cookie}; bridges {:?}; containers {:?}): {what}",
                    ns.path,
                    ns.bridges,
                    ns.containers.iter().map(|c| &c.name).collect::<Vec<_>>()
                );
            }
        }
        for w in warnings {
            let _ = writeln!(out, "#   warning: {w}");
        }
        out
    }

    /// Makes the BPF layer match `config` (or removes it when the config
    /// turns it off or leaves it nothing to guard). Never fails the apply:
    /// problems become warnings — and the programs already attached stay
    /// (a binary or host that cannot run the layer does not take away the
    /// one in force).
    pub fn apply_bpf(
        &self,
        config: &Config,
        containers: Option<&[ContainerFact]>,
        warnings: &mut Vec<String>,
    ) -> BpfReport {
        let pins = self.bpf_pins();
        let mut report = BpfReport {
            pin_dir: self.bpf_pin_dir.display().to_string(),
            ..BpfReport::default()
        };
        let policy = bpf_policy::plan(config, containers);
        if let Some(Inactive { state, why }) = self.bpf_inactive(config, &policy) {
            report.state = state.into();
            if asked(config, &policy) {
                warnings.push(format!(
                    "BPF layer not active ({why}); the nft layer guards alone"
                ));
            } else if config.layers.bpf && policy.observes() && state != "idle" {
                warnings.push(format!(
                    "BPF layer not active ({why}); observed workloads' connections are not recorded, only their HTTP requests through the proxy"
                ));
            } else if pins.exists() && sys::check_bpffs(&self.bpf_pin_dir).is_ok() {
                // Turned off, or nothing to guard (any more): leave no
                // stale programs.
                match pins.remove() {
                    Ok(removed) => report.detached = removed,
                    Err(e) => warnings.push(format!("BPF layer: cannot remove its pins: {e}")),
                }
            }
            report.reason = why;
            return report;
        }
        warnings.extend(policy.warnings.iter().map(|w| format!("BPF layer: {w}")));
        let Some(cg) = &self.cgroup2 else {
            return report; // bpf_inactive said it is mounted
        };
        let (mut contents, attachments) = desired(cg, &policy, self.bpf_fence.as_deref(), warnings);
        if let Some(w) = no_container_cgroup(config, &policy, cg, self.bpf_fence.as_deref()) {
            warnings.push(w);
        }
        contents.netns = self.bpf_netns(config, &policy, containers, warnings);
        report.namespaces = contents.netns.len();
        match pins.apply(sys::OBJECT, &contents, &attachments) {
            Ok(o) => {
                report.state = "active".into();
                report.attached = o.attached;
                report.kept = o.kept;
                report.updated = o.updated;
                report.detached = o.detached;
            }
            Err(e) => {
                report.state = "unavailable".into();
                report.reason = e.to_string();
                warnings.push(format!(
                    "BPF layer not active ({e}); the nft layer guards alone"
                ));
            }
        }
        report
    }

    /// Compares the BPF layer with `config`: one report entry, labelled
    /// `bpf <pin dir>`, when the layer is (or should be) there. A config
    /// that asks for the layer (on, something to guard) while it cannot run
    /// — not built into this binary, no bpf filesystem, `bpf()` refused —
    /// is a difference: the host is not guarded the way the config says.
    pub fn verify_bpf(
        &self,
        config: &Config,
        containers: Option<&[ContainerFact]>,
        warnings: &mut Vec<String>,
    ) -> Option<NamespaceReport> {
        let pins = self.bpf_pins();
        let label = format!("bpf {}", self.bpf_pin_dir.display());
        let report = |differences: Vec<String>| NamespaceReport {
            netns: label.clone(),
            ok: differences.is_empty(),
            differences,
        };
        let policy = bpf_policy::plan(config, containers);
        if let Some(Inactive { why, .. }) = self.bpf_inactive(config, &policy) {
            if asked(config, &policy) {
                return Some(report(vec![format!(
                    "the config asks for the BPF layer (a workload denies by cgroup, or by bridge or namespace), but it is not active: {why}"
                )]));
            }
            if pins.exists() {
                return Some(report(vec![
                    "metaguard's BPF programs are still pinned although the config does not use them".into(),
                ]));
            }
            return None;
        }
        let cg = self.cgroup2.as_ref()?;
        let (mut contents, attachments) = desired(cg, &policy, self.bpf_fence.as_deref(), warnings);
        contents.netns = self.bpf_netns(config, &policy, containers, warnings);
        let mut differences = Vec::new();
        if !pins.exists() {
            differences.push("the BPF layer is missing (no pinned maps)".into());
            return Some(report(differences));
        }
        if let Err(e) = pins.check_maps(sys::OBJECT) {
            differences.push(e.to_string());
            return Some(report(differences));
        }
        match pins.read_maps() {
            Ok(actual) => {
                if actual.ep4 != contents.ep4 || actual.ep6 != contents.ep6 {
                    differences.push("endpoint maps differ from the config".into());
                }
                if actual.policy != contents.policy {
                    differences.push(format!(
                        "cgroup decisions differ: want {:?}, have {:?}",
                        contents.policy, actual.policy
                    ));
                }
                differences.extend(netns_differences(&contents.netns, &actual.netns));
            }
            Err(e) => differences.push(format!("cannot read the maps: {e}")),
        }
        match pins.links() {
            Ok(links) => {
                for a in &attachments {
                    let live = links.iter().any(|l| {
                        l.hook == Some(a.hook)
                            && l.named_cgroup_id == a.cgroup_id
                            && l.is_live()
                            && l.info.attach_type == a.hook.attach_type()
                    });
                    if !live {
                        differences.push(format!(
                            "{} is not attached to {}",
                            a.hook.name(),
                            a.cgroup_dir.display()
                        ));
                    }
                }
                for l in &links {
                    let wanted = attachments
                        .iter()
                        .any(|a| Some(a.hook) == l.hook && a.cgroup_id == l.named_cgroup_id);
                    if !wanted {
                        differences.push(format!(
                            "{} is pinned but no longer wanted",
                            l.pin.display()
                        ));
                    }
                }
            }
            Err(e) => differences.push(format!("cannot read the links: {e}")),
        }
        match pins.outdated(sys::OBJECT) {
            Ok(names) => differences.extend(names.into_iter().map(|n| {
                format!("{n} runs another program than this metaguard's (another version); `metaguard apply` swaps it in place")
            })),
            Err(e) => differences.push(format!("cannot compare the links' programs: {e}")),
        }
        Some(report(differences))
    }

    /// Unpins metaguard's BPF links (detaching exactly its programs) and
    /// maps; `None` when there was nothing.
    pub fn remove_bpf(&self) -> anyhow::Result<Option<String>> {
        let pins = self.bpf_pins();
        if !pins.path().exists() || sys::check_bpffs(&self.bpf_pin_dir).is_err() {
            return Ok(None);
        }
        let removed = pins.remove()?;
        Ok((!removed.is_empty()).then(|| format!("bpf {}", self.bpf_pin_dir.display())))
    }
}

/// A decision's bits as `apply --dry-run` prints them: what is refused
/// and what is observed.
fn bits_text(bits: u32) -> String {
    let mut v = Vec::new();
    if bits & bpf_policy::CLASS_IMDS != 0 {
        v.push("imds");
    }
    if bits & bpf_policy::CLASS_TASK_METADATA != 0 {
        v.push("task_metadata");
    }
    if bits & bpf_policy::DENY_RAW != 0 {
        v.push("raw sockets");
    }
    let mut o = Vec::new();
    if bits & bpf_policy::OBSERVE_IMDS != 0 {
        o.push("imds");
    }
    if bits & bpf_policy::OBSERVE_TASK_METADATA != 0 {
        o.push("task_metadata");
    }
    match (v.is_empty(), o.is_empty()) {
        (true, true) => "nothing refused".to_string(),
        (false, true) => format!("refuses {}", v.join(", ")),
        (true, false) => format!("observes {}", o.join(", ")),
        (false, false) => format!("refuses {}; observes {}", v.join(", "), o.join(", ")),
    }
}

/// How the namespace map differs from what it should hold: the default
/// (key 0) and the host's entry by name, the rest counted.
fn netns_differences(
    want: &BTreeMap<u64, (u32, u32)>,
    have: &BTreeMap<u64, (u32, u32)>,
) -> Vec<String> {
    let mut out = Vec::new();
    if want.get(&0) != have.get(&0) {
        out.push(format!(
            "the default for namespaces nobody has classified is {:?}, not {:?} (rule, bits)",
            have.get(&0),
            want.get(&0)
        ));
    }
    // A namespace not (yet) listed takes the default: a difference only
    // when its own decision refuses other classes.
    let default_bits = have.get(&0).map(|d| d.1);
    let differ = want
        .iter()
        .filter(|(k, v)| match have.get(k) {
            Some(h) => h != *v,
            None => **k != 0 && Some(v.1) != default_bits,
        })
        .count();
    let extra = have.keys().filter(|k| !want.contains_key(k)).count();
    if differ > 0 || extra > 0 {
        out.push(format!(
            "namespace decisions differ: {differ} namespace(s) refused other classes than their workloads say, {extra} entries no longer wanted (the daemon keeps them current; `metaguard apply` rewrites them)"
        ));
    }
    out
}

/// What is pinned under a pin directory, for `doctor`.
#[derive(Debug, Serialize, Clone, PartialEq, Eq)]
pub struct BpfState {
    pub pin_dir: String,
    /// "active", "absent" or "unavailable".
    pub state: String,
    pub detail: String,
    /// `link-<cgroup id>-<hook>` names whose cgroup still exists.
    pub live_links: Vec<String>,
    /// Links that no longer run (their cgroup is gone, or they were
    /// detached).
    pub defunct_links: Vec<String>,
}

impl BpfState {
    /// One line for humans.
    pub fn summary(&self) -> String {
        let mut s = format!("BPF layer ({}): {}", self.pin_dir, self.state);
        if !self.detail.is_empty() {
            s.push_str(&format!(" — {}", self.detail));
        }
        s
    }
}

/// Reads the BPF layer's state under `pin_dir` (never changes anything).
pub fn state(pin_dir: &Path) -> BpfState {
    let mut out = BpfState {
        pin_dir: pin_dir.display().to_string(),
        state: "unavailable".into(),
        detail: String::new(),
        live_links: Vec::new(),
        defunct_links: Vec::new(),
    };
    if let Err(e) = sys::supported(sys::OBJECT).and_then(|()| sys::check_bpffs(pin_dir)) {
        out.detail = format!("{e}; the nft layer guards alone");
        return out;
    }
    let pins = PinDir::new(pin_dir);
    if !pins.exists() {
        out.state = "absent".into();
        out.detail = "nothing pinned (`metaguard apply` with cgroups workloads installs it)".into();
        return out;
    }
    match pins.links() {
        Ok(links) => {
            for l in links {
                let name = l.name();
                if l.is_live() {
                    out.live_links.push(name);
                } else {
                    out.defunct_links.push(name);
                }
            }
            out.state = "active".into();
            out.detail = format!(
                "{} program link(s) attached, {} defunct (cgroup removed or link detached)",
                out.live_links.len(),
                out.defunct_links.len()
            );
            if let Ok(maps) = pins.read_maps() {
                out.detail.push_str(&match maps.netns.get(&0) {
                    Some((_, bits)) if bits & bpf_policy::DENY_BITS == 0 => format!(
                        "; namespaces: {} classified, any other observed by default",
                        maps.netns.len().saturating_sub(2)
                    ),
                    Some(_) => format!(
                        "; namespaces: {} classified, any other refused by default",
                        maps.netns.len().saturating_sub(2)
                    ),
                    None => "; no namespace default (cgroups only)".to_string(),
                });
            }
        }
        Err(e) => out.detail = format!("cannot read the pinned links: {e}"),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asks(text: &str) -> bool {
        let config = Config::parse(text, "test.toml").expect("valid config");
        asked(&config, &bpf_policy::plan(&config, None))
    }

    #[test]
    fn a_config_asks_for_the_layer_when_it_is_on_and_denies_by_cgroup() {
        let deny = "[[workload]]\nname = \"c\"\ncgroups = [\"docker\"]\nimds = \"deny\"\n";
        assert!(asks(deny), "on by default");
        assert!(asks(&format!("[layers]\nbpf = true\n{deny}")));
        assert!(!asks(&format!("[layers]\nbpf = false\n{deny}")));
        let raw = "[[workload]]\nname = \"c\"\ncgroups = [\"docker\"]\nraw_sockets = \"deny\"\n";
        assert!(asks(raw));
        // Allow-only workloads need no program; denying bridges and
        // namespaces are guarded at the container cgroups.
        assert!(!asks(
            "[[workload]]\nname = \"agent\"\ncgroups = [\"docker/ecs-agent\"]\nimds = \"allow\"\n"
        ));
        assert!(asks(
            "[[workload]]\nname = \"b\"\nbridges = [\"docker0\"]\nimds = \"deny\"\n"
        ));
        assert!(!asks(
            "[[workload]]\nname = \"b\"\nbridges = [\"docker0\"]\nimds = \"allow\"\n"
        ));
        // Observing only: the layer is used when it can run, not asked.
        assert!(!asks(&format!("mode = \"observe\"\n{deny}")));
        assert!(!asks(
            "[[workload]]\nname = \"b\"\nbridges = [\"docker0\"]\nimds = \"observe\"\n"
        ));
        let default = Config::builtin_default();
        assert!(
            asked(&default, &bpf_policy::plan(&default, None)),
            "the built-in default guards bridges and task namespaces by namespace"
        );
    }

    #[test]
    fn dry_run_names_refused_and_observed_classes() {
        use bpf_policy::{CLASS_IMDS, DENY_RAW, OBSERVE_IMDS, OBSERVE_TASK_METADATA};
        assert_eq!(bits_text(0), "nothing refused");
        assert_eq!(
            bits_text(CLASS_IMDS | DENY_RAW),
            "refuses imds, raw sockets"
        );
        assert_eq!(
            bits_text(OBSERVE_IMDS | OBSERVE_TASK_METADATA),
            "observes imds, task_metadata"
        );
        assert_eq!(
            bits_text(CLASS_IMDS | OBSERVE_TASK_METADATA),
            "refuses imds; observes task_metadata"
        );
    }

    #[test]
    fn the_report_line_says_what_was_done_or_why_not() {
        let active = BpfReport {
            state: "active".into(),
            pin_dir: "/sys/fs/bpf/metaguard".into(),
            kept: vec!["a".into(), "b".into()],
            updated: vec!["c".into()],
            ..BpfReport::default()
        };
        assert_eq!(
            active.summary(),
            "bpf layer: active (/sys/fs/bpf/metaguard; attached 0, kept 2, updated 1, detached 0; namespace entries 0)"
        );
        let not_built = BpfReport {
            state: "not built".into(),
            reason: sys::BpfError::NoObject.to_string(),
            ..BpfReport::default()
        };
        assert!(
            not_built
                .summary()
                .starts_with("bpf layer: not built: BPF layer not built into this binary"),
            "{}",
            not_built.summary()
        );
    }
}
