//! `metaguard reload [--config PATH] [--timeout SECS]`: has the running
//! daemon apply its config again, and says what became of it — the
//! unit's `ExecReload=` (no /bin/kill needed: minimal hosts lack procps).
//!
//! The config is checked here first: a bad one fails at once with its
//! file, line and column (exit 2), and the daemon is not disturbed. Then
//! SIGHUP goes to the daemon — `$MAINPID` when systemd runs this, else the
//! pid in `<state dir>/daemon.json` — and this waits until the daemon's
//! record shows one more reload handled: exit 0 when it was applied, 2
//! with the daemon's reason when it was refused (the rules in force stay).

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use super::{config, ConfigArg, EXIT_ERROR};
use crate::daemon::record;

pub fn run(arg: &ConfigArg, timeout: Duration, state_dir: &Path) -> anyhow::Result<ExitCode> {
    let config = config::load(arg)?;
    let rec = record::read(state_dir).filter(|r| r.is_alive(Path::new("/proc")));
    let pid = match std::env::var("MAINPID").ok().and_then(|p| p.parse::<u32>().ok()) {
        Some(p) => p,
        None => match &rec {
            Some(r) => r.pid,
            None => bail!(
                "no metaguard daemon is running (no live process in {}); start it: systemctl start metaguard",
                record::path(state_dir).display()
            ),
        },
    };
    let before = rec
        .as_ref()
        .filter(|r| r.pid == pid)
        .map_or(0, |r| r.reloads);
    let target = rustix::process::Pid::from_raw(pid as i32)
        .with_context(|| format!("{pid} is not a process id"))?;
    rustix::process::kill_process(target, rustix::process::Signal::HUP)
        .with_context(|| format!("cannot signal the daemon (pid {pid})"))?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(r) = record::read(state_dir).filter(|r| r.pid == pid && r.reloads > before) {
            return Ok(match r.last_reload {
                Some(outcome) if !outcome.applied => {
                    eprintln!(
                        "metaguard: the daemon (pid {pid}) refused the config; the rules in force stay:\n{}",
                        outcome.error.unwrap_or_default()
                    );
                    ExitCode::from(EXIT_ERROR)
                }
                _ => {
                    println!(
                        "metaguard: the daemon (pid {pid}) applied {}",
                        config.origin
                    );
                    ExitCode::SUCCESS
                }
            });
        }
        if Instant::now() > deadline {
            bail!(
                "the daemon (pid {pid}) did not report the reload within {} s; see journalctl -u metaguard",
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
