//! Applying the fixes core proposes — exactly those, in the backend and
//! namespace each names, in finding order, each command shown first.
//! Findings whose fix core refused (ambiguous) are listed, not touched.

use anyhow::{bail, Context as _};
use metaguard_core::doctor::findings::FixAction;
use metaguard_core::doctor::Report;
use metaguard_sys::netns::Netns;
use metaguard_sys::tool;

/// The actions to run (deduplicated: F2 and F3 may propose the same
/// ACCEPT) and the findings `--fix` leaves alone, with the reason.
pub fn plan(report: &Report) -> (Vec<FixAction>, Vec<String>) {
    let mut actions: Vec<FixAction> = Vec::new();
    let mut skipped = Vec::new();
    for f in &report.findings {
        if let Some(why) = &f.fix.refused {
            skipped.push(format!("{}: not fixed: {why}", f.id));
            continue;
        }
        if f.fix.actions.is_empty() {
            skipped.push(format!(
                "{}: nothing --fix can apply; {}",
                f.id,
                f.fix
                    .manual
                    .first()
                    .map_or(f.fix.durable.as_str(), String::as_str)
            ));
            continue;
        }
        for a in &f.fix.actions {
            if !actions.contains(a) {
                actions.push(a.clone());
            }
        }
    }
    (actions, skipped)
}

/// Runs one action; fails with the command and its stderr.
pub fn apply(action: &FixAction) -> anyhow::Result<()> {
    let argv = action.argv();
    let Some((prog, args)) = argv.split_first() else {
        bail!("empty fix command")
    };
    let cmd = tool::command(prog, args)?;
    let ns = action.netns().map(Netns::open_not_root).transpose()?;
    let out = tool::run(cmd, ns.as_ref(), None)
        .with_context(|| format!("cannot run {}", action.shell()))?;
    if !out.status.success() {
        // conntrack -D exits 1 when there was nothing to delete.
        if matches!(action, FixAction::ConntrackDelete { .. }) {
            return Ok(());
        }
        bail!("`{}` failed: {}", action.shell(), out.stderr.trim());
    }
    Ok(())
}
