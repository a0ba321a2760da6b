//! The cgroup BPF layer in the engine: `core::bpf_policy` decides,
//! `sys::bpf` loads, attaches and reads back; this module resolves cgroup
//! paths to ids and turns outcomes into report lines.
//!
//! The layer is an addition to the nft rules, never a replacement: when it
//! cannot run (no BPF object in this build, no bpf filesystem at the pin
//! directory, a kernel or privilege that refuses `bpf()`), `apply` says so
//! in a warning and the nft layer guards alone.

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
    /// "active", "disabled" (config) or "unavailable".
    pub state: String,
    pub pin_dir: String,
    pub attached: Vec<String>,
    pub kept: Vec<String>,
    pub detached: Vec<String>,
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

    /// Why the layer the config asks for cannot be active here; `None`
    /// when it can, or when the config turns it off or gives it nothing to
    /// guard.
    pub fn bpf_not_active(&self, config: &Config) -> Option<String> {
        if !config.layers.bpf {
            return None;
        }
        self.bpf_unavailable(config)
            .filter(|why| why != "no workload selects cgroups")
    }

    /// Why the layer cannot run here, if it cannot.
    fn bpf_unavailable(&self, config: &Config) -> Option<String> {
        if self.cgroup2.is_none() {
            return Some("the cgroup v2 hierarchy is not mounted".into());
        }
        if let Err(e) = sys::supported() {
            return Some(e.to_string());
        }
        if bpf_policy::plan(config).cgroups.is_empty() {
            return Some("no workload selects cgroups".into());
        }
        sys::check_bpffs(&self.bpf_pin_dir)
            .err()
            .map(|e| e.to_string())
    }

    /// Makes the BPF layer match `config` (or removes it when the config
    /// turns it off). Never fails the apply: problems become warnings.
    pub fn apply_bpf(&self, config: &Config, warnings: &mut Vec<String>) -> BpfReport {
        let pins = PinDir::new(&self.bpf_pin_dir);
        let mut report = BpfReport {
            pin_dir: self.bpf_pin_dir.display().to_string(),
            ..BpfReport::default()
        };
        if !config.layers.bpf {
            report.state = "disabled".into();
            match pins.remove() {
                Ok(removed) => report.detached = removed,
                Err(e) => warnings.push(format!("BPF layer: cannot remove its pins: {e}")),
            }
            return report;
        }
        let (policy, cg) = match (self.bpf_unavailable(config), &self.cgroup2) {
            (None, Some(cg)) => (bpf_policy::plan(config), cg),
            (why, _) => {
                report.state = "unavailable".into();
                let why = why.unwrap_or_default();
                if why != "no workload selects cgroups" {
                    warnings.push(format!(
                        "BPF layer not active ({why}); the nft layer guards alone"
                    ));
                }
                // Nothing to guard (any more): leave no stale programs.
                if pins.exists() && sys::check_bpffs(&self.bpf_pin_dir).is_ok() {
                    if let Ok(removed) = pins.remove() {
                        report.detached = removed;
                    }
                }
                return report;
            }
        };
        warnings.extend(policy.warnings.iter().map(|w| format!("BPF layer: {w}")));
        let (contents, attachments) = desired(cg, &policy, warnings);
        match pins.apply(&contents, &attachments) {
            Ok(o) => {
                report.state = "active".into();
                report.attached = o.attached;
                report.kept = o.kept;
                report.detached = o.detached;
            }
            Err(e) => {
                report.state = "unavailable".into();
                warnings.push(format!(
                    "BPF layer not active ({e}); the nft layer guards alone"
                ));
            }
        }
        report
    }

    /// Compares the BPF layer with `config`: one report entry, labelled
    /// `bpf <pin dir>`, when the layer is (or should be) there.
    pub fn verify_bpf(
        &self,
        config: &Config,
        warnings: &mut Vec<String>,
    ) -> Option<NamespaceReport> {
        let pins = PinDir::new(&self.bpf_pin_dir);
        let label = format!("bpf {}", self.bpf_pin_dir.display());
        let mut differences = Vec::new();
        let wanted = config.layers.bpf && self.bpf_unavailable(config).is_none();
        if !wanted {
            if config.layers.bpf {
                if let Some(why) = self.bpf_unavailable(config) {
                    if why != "no workload selects cgroups" {
                        warnings.push(format!("BPF layer not active ({why})"));
                    }
                }
            }
            if pins.exists() {
                differences.push("metaguard's BPF programs are still pinned although the config does not use them".into());
                return Some(NamespaceReport {
                    netns: label,
                    ok: false,
                    differences,
                });
            }
            return None;
        }
        let cg = self.cgroup2.as_ref()?;
        let policy = bpf_policy::plan(config);
        let (contents, attachments) = desired(cg, &policy, warnings);
        if !pins.exists() {
            differences.push("the BPF layer is missing (no pinned maps)".into());
        } else {
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
                                && l.info.cgroup_id == a.cgroup_id
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
        }
        Some(NamespaceReport {
            netns: label,
            ok: differences.is_empty(),
            differences,
        })
    }

    /// Unpins metaguard's BPF links (detaching exactly its programs) and
    /// maps; `None` when there was nothing.
    pub fn remove_bpf(&self) -> anyhow::Result<Option<String>> {
        let pins = PinDir::new(&self.bpf_pin_dir);
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
    /// Links whose cgroup is gone (they no longer run).
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
    if let Err(e) = sys::supported().and_then(|()| sys::check_bpffs(pin_dir)) {
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
                let name = l
                    .pin
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if l.info.cgroup_id != 0 && l.info.cgroup_id == l.named_cgroup_id {
                    out.live_links.push(name);
                } else {
                    out.defunct_links.push(name);
                }
            }
            out.state = "active".into();
            out.detail = format!(
                "{} program link(s) attached, {} defunct (cgroup removed)",
                out.live_links.len(),
                out.defunct_links.len()
            );
        }
        Err(e) => out.detail = format!("cannot read the pinned links: {e}"),
    }
    out
}
