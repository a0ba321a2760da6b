//! `metaguard gate`: may containers start? Run by the drop-ins the package
//! installs for docker.service, containerd.service and ecs.service
//! (`ExecStartPre=`), after `After=metaguard.service` has ordered them:
//!
//! * exit 0 when metaguard's daemon is running and has reported ready (its
//!   rules are in the kernel and it follows new task namespaces) —
//!   `<state dir>/daemon.json`, checked by pid *and* start time;
//! * exit 0 when `metaguard.service` is not enabled: metaguard is not in
//!   use on this host, so nothing is held back;
//! * exit 1 otherwise — enabled but not running (failed to start, stopped,
//!   restarting): the unit does not start, and its status says why
//!   (fail-closed, F5).

use std::path::Path;
use std::process::ExitCode;

use super::EXIT_PROBLEMS;
use crate::daemon::record;

/// The unit whose daemon the gate waits for.
pub const UNIT: &str = "metaguard.service";

pub fn run(state_dir: &Path) -> anyhow::Result<ExitCode> {
    let rec = record::read(state_dir);
    let why = match &rec {
        Some(r) if r.ready && r.is_alive(Path::new("/proc")) => {
            println!(
                "metaguard: the daemon (pid {}) has its rules in the kernel and follows this host; go ahead",
                r.pid
            );
            return Ok(ExitCode::SUCCESS);
        }
        Some(r) if r.is_alive(Path::new("/proc")) => {
            format!(
                "metaguard's daemon (pid {}) has not applied its rules yet",
                r.pid
            )
        }
        Some(r) => format!("metaguard's daemon (pid {}) is not running", r.pid),
        None => format!(
            "metaguard's daemon has not run since boot (no {})",
            record::path(state_dir).display()
        ),
    };
    if !enabled(UNIT) {
        println!("metaguard: {UNIT} is not enabled; holding nothing back ({why})");
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!(
        "metaguard: held back (fail-closed): {UNIT} is enabled but {why}, so containers could start unguarded.\n\
         See `systemctl status {UNIT}` and `journalctl -u {UNIT}`; fix and `systemctl start {UNIT}`. \
         To start without metaguard, `systemctl disable {UNIT}` (or mask this drop-in)."
    );
    Ok(ExitCode::from(EXIT_PROBLEMS))
}

/// `systemctl is-enabled --quiet UNIT` (enabled, enabled-runtime, static,
/// …); false without systemctl.
fn enabled(unit: &str) -> bool {
    metaguard_sys::tool::command("systemctl", &["is-enabled", "--quiet", unit])
        .and_then(|cmd| metaguard_sys::tool::run(cmd, None, None))
        .is_ok_and(|out| out.status.success())
}
