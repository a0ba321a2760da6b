//! `metaguard daemon` run in a lab's host namespace, for the lab tests and
//! the benchmarks: started with the lab's state, Docker socket and BPF
//! directories, ready once it logs that its rules are applied, and
//! SIGKILLed (by its pid, never by name) and reaped when dropped. The
//! rules it leaves go with the lab's namespaces.

use std::io::Read as _;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

pub use rustix::process::Signal;

use crate::error::LabError;
use crate::Lab;

/// What a ready daemon logs (`--json`).
pub const READY: &str = "ready: rules applied";

/// A running daemon; its stderr (JSON log lines) goes to a file in the
/// lab's work directory.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    /// Starts `metaguard daemon --json --config <config> <extra>` and waits
    /// (10 s at most) until it is ready.
    pub fn start(lab: &Lab, config: &str, extra: &[&str]) -> Result<Daemon, LabError> {
        let log = lab
            .work_dir()
            .join(format!("daemon-{}.log", std::process::id() ^ tag()));
        let file = std::fs::File::create(&log).map_err(|source| LabError::Io {
            what: "create the daemon log",
            path: log.clone(),
            source,
        })?;
        let mut args = vec!["daemon", "--json", "--config", config];
        args.extend_from_slice(extra);
        let mut cmd = lab.metaguard_command(&args)?;
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(file);
        let child = cmd.spawn().map_err(|source| LabError::Spawn {
            command: format!("metaguard {}", args.join(" ")),
            source,
        })?;
        let d = Daemon {
            child: Some(child),
            log,
        };
        d.wait_log(READY, Duration::from_secs(10))?;
        Ok(d)
    }

    /// Its pid (0 once it has exited and been reaped).
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map_or(0, |c| c.id() as i32)
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Waits until the log holds `needle` `n` times.
    pub fn wait_log_count(&self, needle: &str, n: usize, within: Duration) -> Result<(), LabError> {
        let end = Instant::now() + within;
        loop {
            if self.log_text().matches(needle).count() >= n {
                return Ok(());
            }
            if Instant::now() > end {
                return Err(LabError::Daemon(format!(
                    "its log lacks {n}× {needle:?} after {within:?}:\n{}",
                    self.log_text()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn wait_log(&self, needle: &str, within: Duration) -> Result<(), LabError> {
        self.wait_log_count(needle, 1, within)
    }

    /// Sends `sig` to the daemon (by its pid).
    pub fn signal(&self, sig: Signal) -> Result<(), LabError> {
        let pid = rustix::process::Pid::from_raw(self.pid())
            .ok_or_else(|| LabError::Daemon("it has exited".to_string()))?;
        rustix::process::kill_process(pid, sig)
            .map_err(|e| LabError::Daemon(format!("cannot send it {sig:?}: {e}")))
    }

    /// Waits for the process to exit (after a signal) and returns its code.
    pub fn wait_exit(&mut self, within: Duration) -> Result<Option<i32>, LabError> {
        let end = Instant::now() + within;
        while Instant::now() < end {
            if let Some(c) = self.child.as_mut() {
                let waited = c.try_wait().map_err(|source| LabError::Io {
                    what: "wait for the daemon",
                    path: self.log.clone(),
                    source,
                })?;
                if let Some(st) = waited {
                    self.child = None;
                    return Ok(st.code());
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(LabError::Daemon(format!(
            "it did not exit within {within:?}"
        )))
    }

    /// SIGKILLs and reaps it (done on drop too).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Keeps the log names of daemons started in one process apart.
fn tag() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}
