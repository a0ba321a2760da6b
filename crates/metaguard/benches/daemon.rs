//! Daemon benchmarks on the lab (root only):
//!
//! 1. heal latency: `nft flush ruleset` in the lab host, then the time until
//!    the daemon's replacement table is committed — both seen by an
//!    `nft monitor` of the bench's own, so the figure is kernel-to-kernel,
//!    not polling resolution; p50/p99/max over 120 flushes;
//! 2. memory: daemon RSS before, during and after creating and deleting
//!    1,000 task namespaces that its `netns` glob selects (each one gets a
//!    table and a monitor, then is forgotten);
//! 3. idle CPU: the daemon's user+system time over 10 s with nothing
//!    happening.
//!
//! `cargo bench -p metaguard --bench daemon` runs it in full and rewrites
//! the `daemon` section of BENCHMARKS.md; under `cargo test` it runs once
//! with tiny counts as a smoke test.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use metaguard_lab::daemon::Daemon;
use metaguard_lab::loadgen;
use metaguard_lab::topology::Role;
use metaguard_lab::{Lab, LabOptions};

mod common;

fn main() {
    common::main_as_root("daemon", "network namespaces", run);
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn proc_field(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn run(full: bool) -> Result<(), String> {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_metaguard"));
    let mut lab = Lab::start(LabOptions::new(exe)).map_err(|e| e.to_string())?;
    let glob = format!(
        "/run/netns/{}",
        lab.netns_name(Role::Task1).replace("task1", "task*")
    );
    let policy_text = lab.policy_toml().replace(
        &format!("/run/netns/{}", lab.netns_name(Role::Task1)),
        &glob,
    );
    let policy = lab
        .write_file("policy.toml", &policy_text)
        .map_err(|e| e.to_string())?;
    let daemon =
        Daemon::start(&lab, &policy.display().to_string(), &[]).map_err(|e| e.to_string())?;
    let pid = u32::try_from(daemon.pid()).map_err(|e| e.to_string())?;

    // 1. Heal latency, seen by a monitor of our own.
    let mut mon = Command::new("nft");
    mon.arg("monitor")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    lab.netns(Role::Host)
        .command(&mut mon)
        .map_err(|e| e.to_string())?;
    let mut mon = Killed(mon.spawn().map_err(|e| e.to_string())?);
    let out = mon.0.stdout.take().ok_or("monitor stdout")?;
    let (tx, rx) = mpsc::channel::<(Instant, String)>();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send((Instant::now(), line)).is_err() {
                return;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(100));
    let flushes = if full { 120 } else { 3 };
    let mut heal_ms = Vec::new();
    for _ in 0..flushes {
        while rx.try_recv().is_ok() {}
        lab.run_in(Role::Host, "nft", &["flush", "ruleset"])
            .map_err(|e| e.to_string())?;
        // The flush's own events, then the heal's table.
        let mut flushed_at = None;
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let (at, line) = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .map_err(|_| "no heal within 2 s".to_string())?;
            if line.starts_with("delete table inet metaguard") {
                flushed_at = Some(at);
            } else if line.starts_with("add table inet metaguard") {
                if let Some(f) = flushed_at {
                    heal_ms.push((at - f).as_secs_f64() * 1000.0);
                    break;
                }
            }
        }
        // Let the heal's own transaction settle before the next flush.
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(mon);

    // 2. RSS across namespace churn.
    let rss_before = proc_field(pid, "VmRSS:");
    let churn = if full { 1000 } else { 5 };
    let mut rss_mid = 0;
    let t = Instant::now();
    for i in 0..churn {
        let name = lab
            .add_netns(&format!("task-c{i}"))
            .map_err(|e| e.to_string())?;
        // Give the daemon time to guard it, as a real task start would.
        std::thread::sleep(Duration::from_millis(5));
        metaguard_lab::cmd::run(None, "ip", &["netns", "delete", &name], None)
            .map_err(|e| e.to_string())?;
        if i == churn / 2 {
            rss_mid = proc_field(pid, "VmRSS:");
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let churn_secs = t.elapsed().as_secs_f64();
    let rss_after = proc_field(pid, "VmRSS:");
    let guarded = daemon.log_text().matches("new namespace guarded").count();

    // 3. Idle CPU.
    let idle_secs = if full { 10 } else { 1 };
    let ticks = || loadgen::cpu_ticks(pid).unwrap_or(0);
    let c0 = ticks();
    std::thread::sleep(Duration::from_secs(idle_secs));
    let idle_ticks = ticks().saturating_sub(c0);

    let report = format!(
        "| heal latency over {flushes} `nft flush ruleset` | p50 | p99 | max |\n|---|---:|---:|---:|\n\
         | flush committed → table re-committed | {:.1} ms | {:.1} ms | {:.1} ms |\n\n\
         | daemon RSS | before churn | mid-churn | after {churn} task namespaces created and deleted |\n|---|---:|---:|---:|\n\
         | VmRSS | {} KiB | {} KiB | {} KiB |\n\n\
         Churn: {churn} namespaces in {churn_secs:.1} s, {guarded} of them guarded before deletion (each got a table and a monitor, then was forgotten).\n\n\
         Idle: {idle_ticks} clock ticks (1/{hz} s) of CPU in {idle_secs} s.\n",
        pct(&heal_ms, 0.5),
        pct(&heal_ms, 0.99),
        pct(&heal_ms, 1.0),
        rss_before,
        rss_mid,
        rss_after,
        hz = rustix::param::clock_ticks_per_second(),
    );
    println!("{report}");
    drop(daemon);
    drop(lab);
    if full {
        common::write_section(
            "daemon",
            &format!(
                "## Daemon — `sudo cargo bench -p metaguard --bench daemon`\n\n\
                 Lab host, the lab policy with the task glob `mglab-<id>-task*`; release build. \
                 Heal latency is measured by an `nft monitor` of the benchmark's own: from the flush's \
                 `delete table inet metaguard` event to the daemon's `add table inet metaguard`. Machine: {}.\n\n{report}",
                common::machine()
            ),
        )?;
    }
    Ok(())
}
