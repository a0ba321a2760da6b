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

/// Raises this process's soft limit on open files (`RLIMIT_NOFILE`) to its
/// hard limit, as a server that holds one descriptor per client connection
/// should (systemd starts services with soft 1024, hard 524288). Returns
/// the limits before and after (soft); unchanged when it cannot be read or
/// set.
pub fn raise_open_files_limit() -> (Option<u64>, Option<u64>) {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let before = getrlimit(Resource::Nofile);
    let mut wanted = before;
    wanted.current = before.maximum;
    if wanted.current != before.current {
        let _ = setrlimit(Resource::Nofile, wanted);
    }
    (before.current, getrlimit(Resource::Nofile).current)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_open_files_limit_is_raised_to_the_hard_one() {
        let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum;
        let (before, after) = raise_open_files_limit();
        assert!(after >= before, "{before:?} -> {after:?}");
        assert_eq!(after, hard);
    }

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
