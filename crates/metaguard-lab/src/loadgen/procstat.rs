//! Memory and CPU figures of a process, from /proc/PID/{status,stat}.

/// A `kB` field of /proc/PID/status.
pub(super) fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_status_kib(&text, key)
}

pub(super) fn parse_status_kib(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        let mut words = rest.split_whitespace();
        let value = words.next()?.parse().ok()?;
        (words.next() == Some("kB")).then_some(value)
    })
}

/// Resident set size of `pid` (VmRSS), KiB; none for a gone process or a
/// kernel thread.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS")
}

/// Peak resident set size of `pid` (VmHWM), KiB.
pub fn hwm_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM")
}

/// CPU time (user + system) `pid` has used so far, all its threads, in
/// clock ticks (`rustix::param::clock_ticks_per_second`); none for a gone
/// process.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let field = |n| {
        metaguard_sys::process::stat_field(&stat, n)?
            .parse::<u64>()
            .ok()
    };
    // utime and stime
    Some(field(14)? + field(15)?)
}

/// CPU time of every thread of process `pid` so far, in nanoseconds, from
/// `/proc/<pid>/task/*/schedstat` (time on a CPU; nanosecond resolution,
/// where [`cpu_ticks`] counts 10 ms ticks). Threads that ended are not
/// counted.
pub fn cpu_ns(pid: u32) -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let text = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
        total += text.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// [`cpu_ticks`] in seconds. Resolution: one clock tick (10 ms).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    Some(cpu_ticks(pid)? as f64 / rustix::param::clock_ticks_per_second() as f64)
}
