//! `wrk`, run in a lab namespace, and its report parsed.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{cmd, LabError};

use super::{drain, lab_netns, Reaped, WRK_GRACE};

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
    /// CPU time (user + system, 10 ms ticks) the wrk process used: the
    /// caller's side of every request, including the kernel's path for
    /// what it sends (the redirect's rules and NAT run in its context).
    /// Zero from [`parse_wrk`] alone.
    pub client_cpu: Duration,
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
    let pid = rustix::process::Pid::from_raw(child.0.id() as i32);
    let mut client_cpu = Duration::ZERO;
    let status = loop {
        // Exited but not reaped yet (WNOWAIT): its stat still holds its
        // final CPU times. Where waitid fails, reaped without them.
        let exited = pid.map(|pid| {
            rustix::process::waitid(
                rustix::process::WaitId::Pid(pid),
                rustix::process::WaitIdOptions::EXITED
                    | rustix::process::WaitIdOptions::NOWAIT
                    | rustix::process::WaitIdOptions::NOHANG,
            )
        });
        if let Some(Ok(Some(_))) = exited {
            if let Some(secs) = super::cpu_seconds(child.0.id()) {
                client_cpu = Duration::from_secs_f64(secs);
            }
        }
        let reap = !matches!(exited, Some(Ok(None)));
        match if reap { child.0.try_wait() } else { Ok(None) } {
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
    parse_wrk(&stdout)
        .map(|r| WrkResult { client_cpu, ..r })
        .map_err(|e| {
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
        client_cpu: Duration::ZERO,
    })
}
