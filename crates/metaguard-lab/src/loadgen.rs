//! Load generation for the proxy benchmark: `wrk` and a reference `nginx`
//! reverse proxy, each run as a child process inside a lab namespace, and
//! the memory figures of a process.
//!
//! Both refuse any namespace whose name is not a lab's (`mglab-…`), open it
//! with [`Netns::open_not_root`] and enter it in the child before `exec`
//! ([`Netns::command`]): no request is ever sent from the root namespace.
//! Every process started here is killed by pid and reaped: `wrk` when it
//! overruns its hard timeout, `nginx` (master and workers) when its guard
//! is dropped.
//!
//! nginx is Debian's binary extracted into `<repo>/.tools/nginx` by
//! `scripts/common.sh` (`ensure_nginx`), never installed: the package would
//! start a service on :80 in the root namespace. `METAGUARD_NGINX` names
//! another binary.

use std::fs::File;
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use metaguard_sys::netns::Netns;
use metaguard_sys::process::ProcessId;

use crate::registry::NETNS_PREFIX;
use crate::{cmd, LabError};

/// How long `wrk` may run past its `-d` before it is killed.
const WRK_GRACE: Duration = Duration::from_secs(15);
/// How long nginx gets to accept connections after it was started.
const NGINX_READY: Duration = Duration::from_secs(5);
/// How long nginx gets to exit after SIGTERM before it is killed.
const NGINX_STOP: Duration = Duration::from_secs(3);

/// Opens lab namespace `name`, refusing other names and the root namespace.
fn lab_netns(name: &str) -> Result<Netns, LabError> {
    let valid = name
        .strip_prefix(NETNS_PREFIX)
        .is_some_and(|rest| !rest.is_empty() && !rest.contains('/'));
    if !valid {
        return Err(LabError::ProbeOutput(format!(
            "{name:?} is not a lab namespace ({NETNS_PREFIX}<id>-<role>); load is only generated inside a lab"
        )));
    }
    Ok(Netns::open_not_root(
        Path::new(metaguard_sys::netns::NETNS_RUN_DIR).join(name),
    )?)
}

/// Whether something accepts TCP connections on `listen`, asked from a
/// thread inside `ns` (one connect, 200 ms at most).
fn accepts(ns: &Netns, listen: SocketAddr) -> Result<bool, LabError> {
    Ok(ns
        .spawn_thread("ready", move || {
            TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_ok()
        })?
        .join()
        .unwrap_or(false))
}

/// Why a server started in a lab namespace did not become ready.
#[derive(Debug)]
pub enum NotReady {
    /// The process exited.
    Exited(std::process::ExitStatus),
    /// Nothing accepted connections in time.
    TimedOut,
    Lab(LabError),
}

/// Waits, `within` at most, until `child` — started inside `ns` — accepts
/// TCP connections on `listen` (asked from inside `ns`) and `ready` holds
/// too.
pub fn wait_accepting(
    ns: &Netns,
    listen: SocketAddr,
    child: &mut Child,
    within: Duration,
    ready: impl Fn() -> bool,
) -> Result<(), NotReady> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(NotReady::Exited(status));
        }
        if accepts(ns, listen).map_err(NotReady::Lab)? && ready() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(NotReady::TimedOut);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process that is killed and reaped when dropped.
#[derive(Debug)]
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Reads a pipe to its end on a thread (so a full pipe never blocks the
/// child while the caller waits for it).
fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
}

// ---------------------------------------------------------------------------
// wrk

/// wrk's socket error counters (`Socket errors: connect A, read B, write C,
/// timeout D`; the line is absent when all are zero).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketErrors {
    pub connect: u64,
    pub read: u64,
    pub write: u64,
    pub timeout: u64,
}

impl SocketErrors {
    pub fn total(&self) -> u64 {
        self.connect + self.read + self.write + self.timeout
    }
}

/// What one `wrk --latency` run reported.
#[derive(Clone, Debug, PartialEq)]
pub struct WrkResult {
    /// Completed requests (`N requests in …`).
    pub requests: u64,
    /// The run's length as wrk measured it.
    pub elapsed: Duration,
    /// `Requests/sec:`.
    pub requests_per_sec: f64,
    /// Mean and maximum latency (thread stats).
    pub latency_avg: Duration,
    pub latency_max: Duration,
    /// Latency distribution (`--latency`).
    pub p50: Duration,
    pub p75: Duration,
    pub p90: Duration,
    pub p99: Duration,
    /// `Non-2xx or 3xx responses:` (0 when the line is absent).
    pub non_2xx_3xx: u64,
    pub socket_errors: SocketErrors,
    /// wrk's standard output as printed.
    pub raw: String,
}

/// Runs `wrk --latency -c connections -t threads -d duration` against `url`
/// inside lab namespace `netns`, with extra request `headers`. The duration
/// is rounded up to whole seconds (wrk's resolution); wrk is killed if it
/// has not finished `WRK_GRACE` (15 s) after that.
pub fn wrk(
    netns: &str,
    url: &str,
    connections: u32,
    threads: u32,
    duration: Duration,
    headers: &[(&str, &str)],
) -> Result<WrkResult, LabError> {
    let ns = lab_netns(netns)?;
    if threads == 0 || connections < threads {
        return Err(LabError::ProbeOutput(format!(
            "wrk needs 1 ≤ threads ≤ connections (got -t {threads} -c {connections})"
        )));
    }
    let exe = cmd::find_tool("wrk").ok_or_else(|| LabError::MissingTool {
        tool: "wrk".into(),
        package: "wrk".into(),
    })?;
    let secs = duration.as_secs_f64().ceil().max(1.0) as u64;
    let mut args = vec![
        "--latency".to_string(),
        "-c".into(),
        connections.to_string(),
        "-t".into(),
        threads.to_string(),
        "-d".into(),
        format!("{secs}s"),
    ];
    for (name, value) in headers {
        args.push("-H".into());
        args.push(format!("{name}: {value}"));
    }
    args.push(url.to_string());
    let shown = format!("[{netns}] wrk {}", args.join(" "));
    let mut command = Command::new(exe);
    command
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("LC_ALL", "C");
    ns.command(&mut command)?;
    let mut child = Reaped(command.spawn().map_err(|source| LabError::Spawn {
        command: shown.clone(),
        source,
    })?);
    let out = drain(child.0.stdout.take());
    let err = drain(child.0.stderr.take());
    let deadline = Instant::now() + Duration::from_secs(secs) + WRK_GRACE;
    let status = loop {
        match child.0.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(None) => {
                drop(child);
                return Err(LabError::Command {
                    command: shown,
                    status: "killed".into(),
                    stderr: format!("still running {secs} s + {WRK_GRACE:?} after it started"),
                });
            }
            Err(source) => {
                return Err(LabError::Spawn {
                    command: shown,
                    source,
                })
            }
        }
    };
    drop(child);
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    if !status.success() {
        return Err(LabError::Command {
            command: shown,
            status: status.to_string(),
            stderr: format!("{} {}", stderr.trim(), stdout.trim()),
        });
    }
    parse_wrk(&stdout).map_err(|e| {
        LabError::ProbeOutput(format!(
            "{shown}: {e}; stdout {stdout:?}; stderr {stderr:?}"
        ))
    })
}

/// A wrk time (`451.00us`, `4.92ms`, `1.02s`, `2.00m`, `1.00h`).
pub fn parse_wrk_time(text: &str) -> Option<Duration> {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (num, unit) = text.split_at(split);
    let value: f64 = num.parse().ok()?;
    let scale = match unit {
        "us" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return None,
    };
    Duration::try_from_secs_f64(value * scale).ok()
}

/// Parses the standard output of `wrk --latency`.
pub fn parse_wrk(text: &str) -> Result<WrkResult, String> {
    let time = |s: Option<&str>, what: &str| {
        s.and_then(parse_wrk_time)
            .ok_or_else(|| format!("unreadable {what} {s:?}"))
    };
    let count = |s: Option<&str>, what: &str| {
        s.map(|s| s.trim_end_matches(','))
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| format!("unreadable {what} {s:?}"))
    };
    let mut avg_max = None;
    let mut pct: [Option<Duration>; 4] = [None; 4];
    let mut totals = None;
    let mut rps = None;
    let mut non_2xx_3xx = 0;
    let mut socket_errors = SocketErrors::default();
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Latency", avg, _stdev, max, _within] => {
                avg_max = Some((time(Some(avg), "mean latency")?, time(Some(max), "max")?));
            }
            [p @ ("50%" | "75%" | "90%" | "99%"), value] => {
                let i = ["50%", "75%", "90%", "99%"]
                    .iter()
                    .position(|x| x == p)
                    .unwrap_or(0);
                pct[i] = Some(time(Some(value), p)?);
            }
            [n, "requests", "in", elapsed, ..] => {
                totals = Some((
                    count(Some(n), "request count")?,
                    time(Some(elapsed.trim_end_matches(',')), "elapsed time")?,
                ));
            }
            ["Requests/sec:", value] => {
                rps = Some(
                    value
                        .parse::<f64>()
                        .ok()
                        .filter(|v| v.is_finite())
                        .ok_or_else(|| format!("unreadable Requests/sec {value:?}"))?,
                );
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => {
                non_2xx_3xx = count(Some(n), "non-2xx count")?;
            }
            ["Socket", "errors:", "connect", c, "read", r, "write", w, "timeout", t] => {
                socket_errors = SocketErrors {
                    connect: count(Some(c), "connect errors")?,
                    read: count(Some(r), "read errors")?,
                    write: count(Some(w), "write errors")?,
                    timeout: count(Some(t), "timeouts")?,
                };
            }
            _ => {}
        }
    }
    let (requests, elapsed) = totals.ok_or("no `N requests in T` line")?;
    let (latency_avg, latency_max) = avg_max.ok_or("no thread stats `Latency` line")?;
    let [Some(p50), Some(p75), Some(p90), Some(p99)] = pct else {
        return Err("no latency distribution (was wrk run with --latency?)".into());
    };
    Ok(WrkResult {
        requests,
        elapsed,
        requests_per_sec: rps.ok_or("no Requests/sec line")?,
        latency_avg,
        latency_max,
        p50,
        p75,
        p90,
        p99,
        non_2xx_3xx,
        socket_errors,
        raw: text.to_string(),
    })
}

// ---------------------------------------------------------------------------
// nginx

/// The nginx binary: `$METAGUARD_NGINX`, else `<repo>/.tools/nginx/usr/sbin/nginx`.
pub fn nginx_binary() -> Result<PathBuf, LabError> {
    let path = match std::env::var_os("METAGUARD_NGINX") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.tools/nginx/usr/sbin/nginx"),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(LabError::Io {
            what: "no nginx binary (run ./scripts/test, or `bash -c '. scripts/common.sh && ensure_nginx'`, which extract Debian's nginx into .tools/nginx; or set METAGUARD_NGINX) at",
            path,
            source: std::io::ErrorKind::NotFound.into(),
        })
    }
}

/// The configuration [`Nginx::start`] writes: a plain reverse proxy from
/// `listen` to `upstream` (`host:port`) with keep-alive upstream
/// connections. Every request is logged as one JSON line to
/// `nginx-access.log` (metaguard writes an audit line per request too, so
/// both pay for a log), every path nginx writes is in `work_dir`, and no
/// `X-Forwarded-For` is added (nginx adds none unless told to).
pub fn nginx_conf(listen: SocketAddr, upstream: &str, work_dir: &Path) -> String {
    let w = work_dir.display();
    format!(
        "# Written by metaguard_lab::loadgen::Nginx (reference proxy of benches/proxy.rs).
daemon off;
master_process on;
worker_processes auto;
pid {w}/nginx.pid;
error_log {w}/nginx-error.log warn;

events {{
    worker_connections 1024;
}}

http {{
    log_format audit escape=json '{{\"time\":\"$msec\",\"method\":\"$request_method\",'
        '\"path\":\"$uri\",\"status\":$status,\"upstream_ms\":\"$upstream_response_time\"}}';
    access_log {w}/nginx-access.log audit;
    client_body_temp_path {w}/client_body;
    proxy_temp_path {w}/proxy;
    fastcgi_temp_path {w}/fastcgi;
    uwsgi_temp_path {w}/uwsgi;
    scgi_temp_path {w}/scgi;

    upstream imds {{
        server {upstream};
        keepalive 32;
    }}

    server {{
        listen {listen};
        location / {{
            proxy_pass http://imds;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }}
    }}
}}
"
    )
}

/// A running nginx (master and workers) inside a lab namespace; stopped
/// (SIGTERM, then SIGKILL by pid) and reaped on drop.
#[derive(Debug)]
pub struct Nginx {
    master: Option<Child>,
    listen: SocketAddr,
    work_dir: PathBuf,
}

impl Nginx {
    /// Writes `<work_dir>/nginx.conf` ([`nginx_conf`]), starts nginx inside
    /// lab namespace `netns` and returns once it accepts TCP connections on
    /// `listen` (probed from inside the same namespace).
    pub fn start(
        netns: &str,
        listen: SocketAddr,
        upstream: &str,
        work_dir: &Path,
    ) -> Result<Nginx, LabError> {
        let ns = lab_netns(netns)?;
        if upstream.is_empty()
            || upstream
                .chars()
                .any(|c| c.is_whitespace() || matches!(c, ';' | '{' | '}' | '#' | '"' | '\''))
        {
            return Err(LabError::ProbeOutput(format!(
                "nginx upstream {upstream:?} is not a host:port"
            )));
        }
        let exe = nginx_binary()?;
        let io = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| LabError::Io { what, path, source }
        };
        std::fs::create_dir_all(work_dir).map_err(io("create", work_dir))?;
        let conf = work_dir.join("nginx.conf");
        std::fs::write(&conf, nginx_conf(listen, upstream, work_dir))
            .map_err(io("write", &conf))?;
        let out_path = work_dir.join("nginx.out");
        let out = File::create(&out_path).map_err(io("create", &out_path))?;
        let err = out.try_clone().map_err(io("reopen", &out_path))?;
        let mut command = Command::new(&exe);
        command
            .arg("-p")
            .arg(work_dir)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(work_dir.join("nginx-error.log"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        ns.command(&mut command)?;
        let child = command.spawn().map_err(|source| LabError::Spawn {
            command: format!("[{netns}] {} -c {}", exe.display(), conf.display()),
            source,
        })?;
        let mut nginx = Nginx {
            master: Some(child),
            listen,
            work_dir: work_dir.to_path_buf(),
        };
        // On any error below, dropping `nginx` stops what was started.
        let Some(master) = nginx.master.as_mut() else {
            return Err(nginx.failed("not started"));
        };
        let pid = master.id();
        // The master listens before it forks the workers: ready once a
        // connection is accepted and a worker exists to serve it.
        match wait_accepting(&ns, listen, master, NGINX_READY, || {
            !children_of(pid).is_empty()
        }) {
            Ok(()) => Ok(nginx),
            Err(NotReady::Exited(status)) => Err(nginx.failed(&format!("exited ({status})"))),
            Err(NotReady::TimedOut) => Err(nginx.failed(&format!(
                "does not accept on {listen} after {NGINX_READY:?}"
            ))),
            Err(NotReady::Lab(e)) => Err(e),
        }
    }

    fn failed(&self, what: &str) -> LabError {
        let read =
            |name: &str| std::fs::read_to_string(self.work_dir.join(name)).unwrap_or_default();
        LabError::Server {
            name: "nginx".into(),
            source: std::io::Error::other(format!(
                "{what}; {}",
                (read("nginx.out") + &read("nginx-error.log")).trim()
            )),
        }
    }

    /// The address it listens on.
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// The master's pid.
    pub fn pid(&self) -> Option<u32> {
        self.master.as_ref().map(Child::id)
    }

    /// The master's and the workers' pids.
    pub fn pids(&self) -> Vec<u32> {
        match self.pid() {
            Some(pid) => std::iter::once(pid).chain(children_of(pid)).collect(),
            None => Vec::new(),
        }
    }

    /// VmRSS summed over master and workers, KiB.
    pub fn rss_kib(&self) -> u64 {
        self.pids().into_iter().filter_map(rss_kib).sum()
    }

    /// VmHWM (peak RSS) summed over master and workers, KiB.
    pub fn hwm_kib(&self) -> u64 {
        self.pids().into_iter().filter_map(hwm_kib).sum()
    }

    /// Stops nginx: SIGTERM to the master (which stops and reaps its
    /// workers), SIGKILL to the master and every worker left after
    /// `NGINX_STOP`. Also done on drop.
    pub fn stop(&mut self) {
        let Some(mut master) = self.master.take() else {
            return;
        };
        let workers: Vec<ProcessId> = children_of(master.id())
            .into_iter()
            .filter_map(|pid| {
                metaguard_sys::process::start_time(Path::new("/proc"), pid)
                    .map(|start_time| ProcessId { pid, start_time })
            })
            .collect();
        if let Some(pid) = i32::try_from(master.id())
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + NGINX_STOP;
        while matches!(master.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if matches!(master.try_wait(), Ok(None)) {
            let _ = master.kill();
        }
        let _ = master.wait();
        for w in workers {
            // Only the very process that was a worker (pid and start time).
            if w.is_alive(Path::new("/proc")) {
                if let Some(pid) = i32::try_from(w.pid)
                    .ok()
                    .and_then(rustix::process::Pid::from_raw)
                {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                }
            }
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The pids whose parent is `parent` (from /proc/*/stat).
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| parse_ppid(&s))
                == Some(parent)
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// The parent pid in a /proc/PID/stat line (the field after the state,
/// which follows the command name's closing parenthesis).
fn parse_ppid(stat: &str) -> Option<u32> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

// ---------------------------------------------------------------------------
// memory

/// A `kB` field of /proc/PID/status.
fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_status_kib(&text, key)
}

fn parse_status_kib(status: &str, key: &str) -> Option<u64> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_seconds_counts_this_process() {
        // Spin until the counter shows 50 ms of CPU, 10 s of wall time at
        // most: on a loaded machine 120 ms of wall time gave 40 ms of CPU.
        // A counter that does not move fails at the deadline.
        let before = cpu_seconds(std::process::id()).expect("own stat");
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut x = 1u64;
        let mut after = before;
        while after - before < 0.05 && std::time::Instant::now() < end {
            for _ in 0..100_000 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
            after = cpu_seconds(std::process::id()).expect("own stat");
        }
        std::hint::black_box(x);
        assert!(after - before >= 0.05, "{before} → {after} in 10 s");
        assert_eq!(cpu_seconds(u32::MAX), None);
    }

    // Real outputs of Debian's wrk 4.1.0 in a lab (the proxy bench), verbatim.

    /// nginx `proxy_pass` from c1, before the bench removed TIME_WAIT from
    /// the emulator's namespace: 1 s SYN retransmits and wrk timeouts.
    const NGINX_WITH_TIMEOUTS: &str =
        "Running 3s test @ http://172.17.0.1:8081/latest/meta-data/instance-id
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   180.13ms  304.55ms   1.05s    81.62%
    Req/Sec     0.88k     1.09k    4.16k    85.71%
  Latency Distribution
     50%    1.22ms
     75%  280.23ms
     90%  740.83ms
     99%    1.02s 
  2698 requests in 3.01s, 616.54KB read
  Socket errors: connect 0, read 0, write 0, timeout 2
Requests/sec:    896.40
Transfer/sec:    204.84KB
";

    /// Direct to the emulator from c1; no error lines at all.
    const DIRECT: &str = "Running 3s test @ http://169.254.169.254/latest/meta-data/instance-id
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     0.91ms    1.81ms  20.03ms   90.15%
    Req/Sec     1.61k     1.31k    5.17k    62.86%
  Latency Distribution
     50%  217.00us
     75%  673.00us
     90%    2.62ms
     99%    9.07ms
  5695 requests in 3.05s, 1.21MB read
Requests/sec:   1867.83
Transfer/sec:    404.94KB
";

    /// A path the emulator does not have: every response a 404.
    const NOT_FOUND: &str = "Running 1s test @ http://169.254.169.254/latest/meta-data/nope
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.38ms  834.09us  11.73ms   90.44%
    Req/Sec     2.85k   405.26     3.31k    70.00%
  Latency Distribution
     50%    1.21ms
     75%    1.46ms
     90%    1.87ms
     99%    5.27ms
  2836 requests in 1.00s, 1.32MB read
  Non-2xx or 3xx responses: 2836
Requests/sec:   2825.36
Transfer/sec:      1.31MB
";

    /// HTTP to the lab's TCP echo service: no request ever completes.
    const NOTHING_COMPLETES: &str = "Running 1s test @ http://10.0.0.1:8080/
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     0.00us    0.00us   0.00us    -nan%
    Req/Sec     0.00      0.00     0.00      -nan%
  Latency Distribution
     50%    0.00us
     75%    0.00us
     90%    0.00us
     99%    0.00us
  0 requests in 1.00s, 0.00B read
  Socket errors: connect 0, read 6125, write 0, timeout 0
Requests/sec:      0.00
Transfer/sec:       0.00B
";

    fn ms(v: f64) -> Duration {
        Duration::from_secs_f64(v / 1000.0)
    }

    #[test]
    fn parses_a_run_with_timeouts() {
        let r = parse_wrk(NGINX_WITH_TIMEOUTS).expect("parses");
        assert_eq!(r.requests, 2698);
        assert_eq!(r.elapsed, ms(3010.0));
        assert_eq!(r.requests_per_sec, 896.40);
        assert_eq!(r.latency_avg, ms(180.13));
        assert_eq!(r.latency_max, ms(1050.0));
        assert_eq!(r.p50, ms(1.22));
        assert_eq!(r.p75, ms(280.23));
        assert_eq!(r.p90, ms(740.83));
        assert_eq!(r.p99, ms(1020.0));
        assert_eq!(r.non_2xx_3xx, 0);
        assert_eq!(
            r.socket_errors,
            SocketErrors {
                timeout: 2,
                ..SocketErrors::default()
            }
        );
        assert_eq!(r.socket_errors.total(), 2);
        assert_eq!(r.raw, NGINX_WITH_TIMEOUTS);
    }

    #[test]
    fn parses_a_clean_run_in_microseconds() {
        let r = parse_wrk(DIRECT).expect("parses");
        assert_eq!(r.requests, 5695);
        assert_eq!(r.requests_per_sec, 1867.83);
        assert_eq!(r.latency_avg, ms(0.91));
        assert_eq!(r.p50, Duration::from_micros(217));
        assert_eq!(r.p75, Duration::from_micros(673));
        assert_eq!(r.p90, ms(2.62));
        assert_eq!(r.p99, ms(9.07));
        assert_eq!(r.non_2xx_3xx, 0);
        assert_eq!(r.socket_errors, SocketErrors::default());
    }

    #[test]
    fn counts_non_2xx_and_socket_errors() {
        let r = parse_wrk(NOT_FOUND).expect("parses");
        assert_eq!((r.requests, r.non_2xx_3xx), (2836, 2836));
        assert_eq!(r.p99, ms(5.27));
        let r = parse_wrk(NOTHING_COMPLETES).expect("parses");
        assert_eq!(r.requests, 0);
        assert_eq!(r.requests_per_sec, 0.0);
        assert_eq!(r.p50, Duration::ZERO);
        assert_eq!(r.socket_errors.read, 6125);
        assert_eq!(r.socket_errors.total(), 6125);
    }

    #[test]
    fn refuses_incomplete_output() {
        // Without --latency there is no distribution.
        let no_latency: String = DIRECT
            .lines()
            .filter(|l| {
                !l.trim_start()
                    .starts_with(|c: char| c.is_ascii_digit() && l.contains('%'))
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let e = parse_wrk(&no_latency).expect_err("no distribution");
        assert!(e.contains("--latency"), "{e}");
        assert!(parse_wrk("").is_err());
        assert!(parse_wrk("unable to connect to 169.254.169.254:80 Connection refused\n").is_err());
        let bad = DIRECT.replace("1867.83", "lots");
        assert!(parse_wrk(&bad)
            .expect_err("bad rate")
            .contains("Requests/sec"));
    }

    #[test]
    fn times_in_every_unit() {
        assert_eq!(parse_wrk_time("451.00us"), Some(Duration::from_micros(451)));
        assert_eq!(parse_wrk_time("4.92ms"), Some(Duration::from_micros(4920)));
        assert_eq!(parse_wrk_time("1.50s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_wrk_time("2.00m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_wrk_time("1.00h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_wrk_time("0.00us"), Some(Duration::ZERO));
        for bad in ["", "ms", "12", "1.0ns", "-1ms", "1.2.3ms", "nanus"] {
            assert_eq!(parse_wrk_time(bad), None, "{bad}");
        }
    }

    #[test]
    fn status_fields() {
        let status = "Name:\tnginx\nVmPeak:\t   12345 kB\nVmHWM:\t    6100 kB\nVmRSS:\t    5980 kB\nThreads:\t1\n";
        assert_eq!(parse_status_kib(status, "VmRSS"), Some(5980));
        assert_eq!(parse_status_kib(status, "VmHWM"), Some(6100));
        assert_eq!(parse_status_kib(status, "VmSwap"), None);
        assert_eq!(parse_status_kib(status, "Threads"), None);
        let me = std::process::id();
        assert!(rss_kib(me).is_some_and(|k| k > 0));
        assert!(hwm_kib(me).is_some_and(|k| k > 0));
        // One snapshot: the other tests' threads move RSS between two reads.
        let own = std::fs::read_to_string("/proc/self/status").expect("own status");
        assert!(parse_status_kib(&own, "VmHWM") >= parse_status_kib(&own, "VmRSS"));
    }

    #[test]
    fn ppid_after_the_command_name() {
        assert_eq!(
            parse_ppid("4242 (nginx: worker (x) y) S 4241 4241 1 0 -1"),
            Some(4241)
        );
        assert_eq!(parse_ppid("garbage"), None);
        assert!(children_of(std::process::id()).is_empty());
    }

    #[test]
    fn refuses_names_outside_the_lab() {
        for name in [
            "",
            "mglab-",
            "c1",
            "../mglab-x",
            "mglab-x/../../proc/1/ns/net",
        ] {
            let e =
                wrk(name, "http://127.0.0.1/", 1, 1, Duration::from_secs(1), &[]).expect_err(name);
            assert!(e.to_string().contains("not a lab namespace"), "{e}");
        }
    }

    #[test]
    fn a_missing_nginx_says_how_to_get_it() {
        // The only test that reads METAGUARD_NGINX.
        std::env::set_var("METAGUARD_NGINX", "/nonexistent/nginx");
        let e = nginx_binary().expect_err("missing");
        std::env::remove_var("METAGUARD_NGINX");
        let text = e.to_string();
        assert!(
            text.contains("ensure_nginx") && text.contains("./scripts/test"),
            "{text}"
        );
        assert!(text.contains("/nonexistent/nginx"), "{text}");
    }

    #[test]
    fn config_is_a_plain_keepalive_proxy() {
        let conf = nginx_conf(
            "172.17.0.1:8081".parse().expect("addr"),
            "169.254.169.254:80",
            Path::new("/run/metaguard-lab/x/nginx"),
        );
        for want in [
            "daemon off;",
            "master_process on;",
            "worker_processes auto;",
            "pid /run/metaguard-lab/x/nginx/nginx.pid;",
            "access_log /run/metaguard-lab/x/nginx/nginx-access.log audit;",
            "proxy_temp_path /run/metaguard-lab/x/nginx/proxy;",
            "server 169.254.169.254:80;",
            "keepalive 32;",
            "listen 172.17.0.1:8081;",
            "proxy_pass http://imds;",
            "proxy_http_version 1.1;",
            "proxy_set_header Connection \"\";",
        ] {
            assert!(conf.contains(want), "{want} missing from\n{conf}");
        }
        assert!(!conf.to_ascii_lowercase().contains("forwarded"));
        let v6 = nginx_conf(
            "[fd00:17::1]:8081".parse().expect("addr"),
            "[fd00:ec2::254]:80",
            Path::new("/w"),
        );
        assert!(v6.contains("listen [fd00:17::1]:8081;"));
    }
}
