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

use std::path::Path;

use metaguard_core::bpf_policy::{self, BpfPolicy};
use metaguard_core::Config;
use metaguard_sys::bpf::{self as sys, Attachment, Hook, MapContents, PinDir};
use metaguard_sys::cgroup::Cgroup2;
use serde::Serialize;

use super::{Engine, NamespaceReport};

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
}

impl BpfReport {
    /// One line for `apply`'s output.
    pub fn summary(&self) -> String {
        if self.state == "active" {
            format!(
                "bpf layer: active ({}; attached {}, kept {}, updated {}, detached {})",
                self.pin_dir,
                self.attached.len(),
                self.kept.len(),
                self.updated.len(),
                self.detached.len()
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

/// Why the layer does not run: a report state and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Inactive {
    state: &'static str,
    why: String,
}

/// Whether `policy` has anything for the programs to do: some configured
/// cgroup denies something (an allow-only entry needs no program).
fn guards_anything(policy: &BpfPolicy) -> bool {
    policy.cgroups.iter().any(|c| c.attach)
}

/// Whether `config` asks for the layer: it is on (the default) and has
/// something to guard. Then a layer that is not active is a problem
/// `verify` reports, whatever the reason.
fn asked(config: &Config, policy: &BpfPolicy) -> bool {
    config.layers.bpf && guards_anything(policy)
}

/// What the kernel should hold for `config`: map contents and attachments.
/// Cgroups that do not exist are left out (the caller warns).
pub fn desired(
    cg: &Cgroup2,
    policy: &BpfPolicy,
    warnings: &mut Vec<String>,
) -> (MapContents, Vec<Attachment>) {
    let mut contents = MapContents {
        ep4: policy.ep4.clone(),
        ep6: policy.ep6.clone(),
        policy: Default::default(),
        netns: Default::default(),
    };
    let mut attachments = Vec::new();
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
        if c.attach {
            for hook in Hook::ALL {
                attachments.push(Attachment {
                    cgroup_dir: cg.path(&c.path),
                    cgroup_id: id,
                    hook,
                });
            }
        }
    }
    (contents, attachments)
}

impl Engine {
    /// Uses `dir` as the BPF layer's pin directory (default
    /// [`sys::DEFAULT_PIN_DIR`]).
    pub fn with_bpf_pin_dir(mut self, dir: &Path) -> Engine {
        self.bpf_pin_dir = dir.to_path_buf();
        self
    }

    /// Why the layer the config asks for (on, with something to guard)
    /// cannot be active here; `None` when it can, or when the config turns
    /// it off or gives it nothing to guard.
    pub fn bpf_not_active(&self, config: &Config) -> Option<String> {
        let policy = bpf_policy::plan(config);
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
            return inactive("idle", "no workload denies anything by cgroup".into());
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
        warnings: &mut Vec<String>,
    ) -> Option<(MapContents, Vec<Attachment>)> {
        let policy = bpf_policy::plan(config);
        if self.bpf_inactive(config, &policy).is_some() {
            return None;
        }
        let cg = self.cgroup2.as_ref()?;
        Some(desired(cg, &policy, warnings))
    }

    /// Makes the BPF layer match `config` (or removes it when the config
    /// turns it off or leaves it nothing to guard). Never fails the apply:
    /// problems become warnings — and the programs already attached stay
    /// (a binary or host that cannot run the layer does not take away the
    /// one in force).
    pub fn apply_bpf(&self, config: &Config, warnings: &mut Vec<String>) -> BpfReport {
        let pins = self.bpf_pins();
        let mut report = BpfReport {
            pin_dir: self.bpf_pin_dir.display().to_string(),
            ..BpfReport::default()
        };
        let policy = bpf_policy::plan(config);
        if let Some(Inactive { state, why }) = self.bpf_inactive(config, &policy) {
            report.state = state.into();
            if asked(config, &policy) {
                warnings.push(format!(
                    "BPF layer not active ({why}); the nft layer guards alone"
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
        let (contents, attachments) = desired(cg, &policy, warnings);
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
        warnings: &mut Vec<String>,
    ) -> Option<NamespaceReport> {
        let pins = self.bpf_pins();
        let label = format!("bpf {}", self.bpf_pin_dir.display());
        let report = |differences: Vec<String>| NamespaceReport {
            netns: label.clone(),
            ok: differences.is_empty(),
            differences,
        };
        let policy = bpf_policy::plan(config);
        if let Some(Inactive { why, .. }) = self.bpf_inactive(config, &policy) {
            if asked(config, &policy) {
                return Some(report(vec![format!(
                    "the config asks for the BPF layer (a workload denies by cgroup), but it is not active: {why}"
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
        let (contents, attachments) = desired(cg, &policy, warnings);
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
        asked(&config, &bpf_policy::plan(&config))
    }

    #[test]
    fn a_config_asks_for_the_layer_when_it_is_on_and_denies_by_cgroup() {
        let deny = "[[workload]]\nname = \"c\"\ncgroups = [\"docker\"]\nimds = \"deny\"\n";
        assert!(asks(deny), "on by default");
        assert!(asks(&format!("[layers]\nbpf = true\n{deny}")));
        assert!(!asks(&format!("[layers]\nbpf = false\n{deny}")));
        let raw = "[[workload]]\nname = \"c\"\ncgroups = [\"docker\"]\nraw_sockets = \"deny\"\n";
        assert!(asks(raw));
        // Allow-only cgroups need no program; bridges and namespaces are
        // the nft layer's.
        assert!(!asks(
            "[[workload]]\nname = \"agent\"\ncgroups = [\"docker/ecs-agent\"]\nimds = \"allow\"\n"
        ));
        assert!(!asks(
            "[[workload]]\nname = \"b\"\nbridges = [\"docker0\"]\nimds = \"deny\"\n"
        ));
        let default = Config::builtin_default();
        assert!(
            !asked(&default, &bpf_policy::plan(&default)),
            "the built-in default has nothing for the layer: verify passes without it"
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
            "bpf layer: active (/sys/fs/bpf/metaguard; attached 0, kept 2, updated 1, detached 0)"
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
