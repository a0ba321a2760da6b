//! `metaguard gate`: may containers start? Run by the drop-ins the package
//! installs for docker.service, containerd.service and ecs.service
//! (`ExecStartPre=`), after `After=metaguard.service` has ordered them:
//!
//! * exit 0 when metaguard's daemon is running and has reported ready (its
//!   rules are in the kernel and it follows new task namespaces) —
//!   `<state dir>/daemon.json`, checked by pid *and* start time;
//! * exit 0 when `metaguard.service` is not enabled: metaguard is not in
//!   use on this host, so nothing is held back;
//! * while the unit is on its way up (`ActiveState=activating`: starting,
//!   or waiting to be restarted after a crash, `Restart=always`), wait for
//!   the daemon to be ready, up to `--wait` seconds, rather than fail a
//!   Docker restart that happens to meet metaguard's one-second restart;
//! * exit 1 otherwise — enabled but failed, stopped, or not ready in time:
//!   the unit does not start, and its status says why (fail-closed, F5).

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use super::EXIT_PROBLEMS;
use crate::daemon::record;

/// The unit whose daemon the gate waits for.
pub const UNIT: &str = "metaguard.service";

/// How often the record is read again while waiting.
const POLL: Duration = Duration::from_millis(100);

pub fn run(state_dir: &Path, wait: Duration) -> anyhow::Result<ExitCode> {
    let start = Instant::now();
    let mut waited = false;
    let go_ahead = |pid: u32, waited: bool| {
        let after = if waited {
            format!(" (after waiting {} ms for it)", start.elapsed().as_millis())
        } else {
            String::new()
        };
        println!(
            "metaguard: the daemon (pid {pid}) has its rules in the kernel and follows this host; go ahead{after}"
        );
        Ok(ExitCode::SUCCESS)
    };
    let why = loop {
        let why = match ready(state_dir) {
            Ok(pid) => return go_ahead(pid, waited),
            Err(why) => why,
        };
        if !enabled(UNIT) {
            println!("metaguard: {UNIT} is not enabled; holding nothing back ({why})");
            return Ok(ExitCode::SUCCESS);
        }
        if !activating(UNIT) {
            // The unit may have become active since the record was read:
            // the daemon writes its record before READY=1, so a record
            // read after the unit's state is at least as new as that state.
            match ready(state_dir) {
                Ok(pid) => return go_ahead(pid, waited),
                Err(why) => break why,
            }
        }
        if start.elapsed() >= wait {
            break why;
        }
        if !waited {
            println!(
                "metaguard: {UNIT} is starting or restarting ({why}); waiting up to {} s for its daemon",
                wait.as_secs()
            );
            waited = true;
        }
        std::thread::sleep(POLL);
    };
    let why = if waited {
        format!(
            "{why} after {:.1} s of waiting",
            start.elapsed().as_secs_f64()
        )
    } else {
        why
    };
    eprintln!(
        "metaguard: held back (fail-closed): {UNIT} is enabled but {why}, so containers could start unguarded.\n\
         See `systemctl status {UNIT}` and `journalctl -u {UNIT}`; fix and `systemctl start {UNIT}`. \
         To start without metaguard, `systemctl disable {UNIT}` (or mask this drop-in)."
    );
    Ok(ExitCode::from(EXIT_PROBLEMS))
}

/// The ready daemon's pid, or why there is none.
fn ready(state_dir: &Path) -> Result<u32, String> {
    match record::read(state_dir) {
        Some(r) if r.ready && r.is_alive(Path::new("/proc")) => Ok(r.pid),
        Some(r) if r.is_alive(Path::new("/proc")) => Err(format!(
            "metaguard's daemon (pid {}) has not applied its rules yet",
            r.pid
        )),
        Some(r) => Err(format!("metaguard's daemon (pid {}) is not running", r.pid)),
        None => Err(format!(
            "metaguard's daemon has not run since boot (no {})",
            record::path(state_dir).display()
        )),
    }
}

/// Whether UNIT is on its way up: `ActiveState=activating` (its start
/// job runs, or it waits out `RestartSec=` after a crash). False without
/// systemctl, and for failed, inactive or deactivating units.
fn activating(unit: &str) -> bool {
    metaguard_sys::tool::command(
        "systemctl",
        &["show", "--property=ActiveState", "--value", unit],
    )
    .and_then(|cmd| metaguard_sys::tool::run(cmd, None, None))
    .is_ok_and(|out| out.stdout.trim() == "activating")
}

/// `systemctl is-enabled --quiet UNIT` (enabled, enabled-runtime, static,
/// …); false without systemctl.
fn enabled(unit: &str) -> bool {
    metaguard_sys::tool::command("systemctl", &["is-enabled", "--quiet", unit])
        .and_then(|cmd| metaguard_sys::tool::run(cmd, None, None))
        .is_ok_and(|out| out.status.success())
}
