//! Commands whose engine is not built yet. They validate what they can
//! (config, privileges) — so scripts get the same errors they will get
//! later — and then say plainly that the command does not exist yet, with
//! exit code 2 and nothing changed. No fake output.

use std::process::ExitCode;

fn pending(what: &str, issue: &str) -> anyhow::Result<ExitCode> {
    anyhow::bail!("`metaguard {what}` is not built yet (tracked in {issue}); nothing was changed")
}

pub fn not_built(what: &str, issue: &str) -> anyhow::Result<ExitCode> {
    pending(what, issue)
}
