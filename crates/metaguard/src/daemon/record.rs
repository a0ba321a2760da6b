//! `<state dir>/daemon.json`: who the running daemon is and what it has
//! done, for the commands that work with it from outside — `metaguard gate`
//! (may Docker start?) and `metaguard reload` (what became of my reload?).
//!
//! Written atomically (a rename) when the daemon is ready, after every
//! reload it handled, and when it stops. A record whose process is gone
//! (SIGKILL, crash) is recognised by its pid *and* start time, so a reused
//! pid never passes for the daemon.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use metaguard_sys::process::ProcessId;
use serde::{Deserialize, Serialize};

const FILE: &str = "daemon.json";

/// The daemon's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub pid: u32,
    /// The process's start time (clock ticks since boot, /proc/PID/stat).
    pub start_time: u64,
    pub version: String,
    /// The config in force (a path, or `<built-in default>`).
    pub config: String,
    /// Its rules are in the kernel and it follows the host (READY=1).
    pub ready: bool,
    /// Reloads handled so far (applied or refused): a reload is answered
    /// when this grows.
    pub reloads: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reload: Option<Reload>,
}

/// The outcome of one reload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reload {
    pub at_unix_ms: u64,
    pub applied: bool,
    /// Why it was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// The record, if there is a readable one.
pub fn read(state_dir: &Path) -> Option<Record> {
    let text = std::fs::read_to_string(path(state_dir)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Writes `rec` atomically.
pub fn write(state_dir: &Path, rec: &Record) -> anyhow::Result<()> {
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("cannot create {}", state_dir.display()))?;
    let p = path(state_dir);
    let tmp = p.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(rec)?)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &p).with_context(|| format!("cannot write {}", p.display()))
}

impl Record {
    /// A record for this process, not ready yet.
    pub fn for_this_process(config: &str) -> anyhow::Result<Record> {
        let me = ProcessId::current().context("cannot read this process's start time")?;
        Ok(Record {
            pid: me.pid,
            start_time: me.start_time,
            version: env!("CARGO_PKG_VERSION").to_string(),
            config: config.to_string(),
            ready: false,
            reloads: 0,
            last_reload: None,
        })
    }

    /// Whether the process the record names still runs (same pid, same
    /// start time).
    pub fn is_alive(&self, proc_root: &Path) -> bool {
        ProcessId {
            pid: self.pid,
            start_time: self.start_time,
        }
        .is_alive(proc_root)
    }
}

pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_names_this_process() {
        let dir = std::env::temp_dir().join(format!("metaguard-record-{}", std::process::id()));
        let mut rec = Record::for_this_process("/etc/metaguard/metaguard.toml").expect("record");
        rec.ready = true;
        rec.reloads = 2;
        rec.last_reload = Some(Reload {
            at_unix_ms: 1,
            applied: false,
            error: Some("bad".into()),
        });
        write(&dir, &rec).expect("write");
        assert_eq!(read(&dir), Some(rec.clone()));
        assert!(rec.is_alive(Path::new("/proc")));
        let other = Record {
            start_time: rec.start_time + 1,
            ..rec
        };
        assert!(
            !other.is_alive(Path::new("/proc")),
            "a reused pid is not the daemon"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
