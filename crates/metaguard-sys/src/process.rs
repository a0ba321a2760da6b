//! Process identity that survives pid reuse: pid + start time (in clock
//! ticks since boot, field 22 of `/proc/PID/stat`).

use std::path::Path;

/// A process as seen at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessId {
    pub pid: u32,
    pub start_time: u64,
}

/// Start time of `pid` from `<proc_root>/PID/stat`, or `None` when the
/// process does not exist.
pub fn start_time(proc_root: &Path, pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
    parse_start_time(&stat)
}

/// Field 22 of a stat line (the start time).
pub fn parse_start_time(stat: &str) -> Option<u64> {
    stat_field(stat, 22)?.parse().ok()
}

/// Field `n` of a stat line, numbered as in proc(5) (3 and up); the
/// command name (field 2) may hold spaces and parentheses, so fields are
/// counted from the last `)`.
pub fn stat_field(stat: &str, n: usize) -> Option<&str> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(n.checked_sub(3)?)
}

impl ProcessId {
    /// This process.
    pub fn current() -> Option<ProcessId> {
        let pid = std::process::id();
        Some(ProcessId {
            pid,
            start_time: start_time(Path::new("/proc"), pid)?,
        })
    }

    /// Whether this very process (not a later one reusing the pid) lives.
    pub fn is_alive(&self, proc_root: &Path) -> bool {
        start_time(proc_root, self.pid) == Some(self.start_time)
    }
}

/// Whether the effective user is root.
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_names() {
        let stat =
            "1234 (a b) c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 100";
        assert_eq!(parse_start_time(stat), Some(987654));
        assert_eq!(parse_start_time("garbage"), None);
    }

    #[test]
    fn current_process_is_alive() {
        let me = ProcessId::current().expect("self");
        assert!(me.is_alive(Path::new("/proc")));
        let fake = ProcessId {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!fake.is_alive(Path::new("/proc")));
    }
}
