//! Observe mode's cost (root only), side by side in one lab and one run:
//! bridge container c1 (workload `containers`, `bridges = ["docker0"]`)
//! under three configs, each served by `metaguard daemon` with the same
//! `[proxy]` limits (raised out of the way) and an audit log file:
//!
//! * `allow`: untouched — c1 → 169.254.169.254:80 straight to the IMDS
//!   emulator;
//! * `proxy`: the default IMDS policy (instance-id allowed) — through the
//!   proxy, decided and audited;
//! * `observe`: through the proxy, decided as allow, audited **and
//!   recorded** (one JSON line in the observe log per request).
//!
//! Per proxied request: `wrk -t1 -c1 --latency` for `GET
//! /latest/meta-data/instance-id` from c1, keep-alive and `Connection:
//! close`. Per connect: TCP connects/s from c1 to the VPC echo service
//! (10.0.0.1; every packet crosses the workload's chain, which under
//! observe holds the port-80 probe rules; no cgroup BPF program runs: this
//! lab mounts no bpf filesystem — the programs' cost under observe is the
//! `bpf` bench's "observe" rows), with `net.ipv4.tcp_tw_reuse=1` in c1
//! (without it the rate collapses after some 10 000 connects in one lab). Variants rotate each round; figures are
//! the medians over rounds. `sudo cargo bench -p metaguard --bench
//! observe` runs 5 rounds × 3 s (`METAGUARD_OBSERVE_BENCH_ROUNDS`,
//! `…_SECS`) and rewrites the `observe` section of BENCHMARKS.md; under
//! `cargo test` it runs one 1 s round as a smoke test.

use std::time::Duration;

use metaguard_lab::daemon::Daemon;
use metaguard_lab::loadgen;
use metaguard_lab::topology::Role;
use metaguard_lab::{Lab, LabOptions};

mod common;

use common::{stats, Stats};

const URL: &str = "http://169.254.169.254/latest/meta-data/instance-id";
const VARIANTS: [&str; 3] = ["allow", "proxy", "observe"];

fn main() {
    common::main_as_root("observe", "network namespaces, nft, the daemon", run);
}

fn env(name: &str, default: u64, max: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
        .clamp(1, max)
}

fn start(lab: &Lab, variant: &str) -> Result<Daemon, String> {
    let text = format!(
        "[proxy]\nrate = 1000000\nburst = 1000000\nmax_connections = 100000\naudit_log = \"{}\"\n\n\
         [[workload]]\nname = \"containers\"\nbridges = [\"docker0\"]\nimds = \"{variant}\"\n",
        lab.work_dir().join(format!("audit-{variant}.jsonl")).display(),
    );
    let path = lab
        .write_file(&format!("bench-observe-{variant}.toml"), &text)
        .map_err(|e| e.to_string())?;
    let dir = lab.work_dir().join("observe").display().to_string();
    Daemon::start(lab, &path.display().to_string(), &["--observe-dir", &dir])
        .map_err(|e| format!("{variant}: {e}"))
}

#[derive(Default)]
struct Figures {
    /// Per variant: keep-alive p50 (µs), rps; close p50 (µs), rps;
    /// connects/s.
    keep_p50: Vec<f64>,
    keep_rps: Vec<f64>,
    close_p50: Vec<f64>,
    close_rps: Vec<f64>,
    connects: Vec<f64>,
}

fn run(full: bool) -> Result<(), String> {
    if metaguard_lab::cmd::find_tool("wrk").is_none() {
        println!("observe bench skipped: wrk is not installed (apt-get install wrk)");
        return Ok(());
    }
    let rounds = if full {
        env("METAGUARD_OBSERVE_BENCH_ROUNDS", 5, 20)
    } else {
        1
    };
    let secs = if full {
        env("METAGUARD_OBSERVE_BENCH_SECS", 3, 30)
    } else {
        1
    };
    let exe = std::path::PathBuf::from(env!("CARGO_BIN_EXE_metaguard"));
    let mut lab = Lab::start(LabOptions::new(exe)).map_err(|e| format!("lab: {e}"))?;
    lab.start_docker_api().map_err(|e| e.to_string())?;
    // c1 reuses its TIME_WAIT ports: without it, some 10 000 connects in
    // the connect rate slows to ~70/s for every variant alike, and
    // whichever runs later measures the exhaustion, not the rules.
    lab.run_in(Role::C1, "sysctl", &["-qw", "net.ipv4.tcp_tw_reuse=1"])
        .map_err(|e| e.to_string())?;
    // The emulator answers with `Connection: close`, so it holds the
    // TIME_WAIT of every forwarded request; a later SYN for the same
    // address pair whose TCP timestamps (offset per address pair) are
    // older is dropped by PAWS — a 1 s SYN retransmit in the tail (as in
    // the proxy bench). An artefact of the emulator being a Linux socket.
    lab.run_in(
        Role::Vpc,
        "sysctl",
        &["-q", "-w", "net.ipv4.tcp_max_tw_buckets=0"],
    )
    .map_err(|e| e.to_string())?;
    let from = lab.netns_name(Role::C1);
    let mut figs: Vec<Figures> = (0..VARIANTS.len()).map(|_| Figures::default()).collect();
    let mut records = 0u64;
    let mut socket_errors = [0u64; VARIANTS.len()];
    for round in 0..rounds as usize {
        for k in 0..VARIANTS.len() {
            let i = (k + round) % VARIANTS.len();
            let variant = VARIANTS[i];
            let mut d = start(&lab, variant)?;
            let us = |d: Duration| d.as_secs_f64() * 1e6;
            for close in [false, true] {
                let headers: &[(&str, &str)] = if close {
                    &[("Connection", "close")]
                } else {
                    &[]
                };
                let r = loadgen::wrk(&from, URL, 1, 1, Duration::from_secs(secs), headers)
                    .map_err(|e| format!("{variant}: {e}"))?;
                if r.non_2xx_3xx > 0 || r.requests == 0 {
                    return Err(format!("{variant}: errors under wrk:\n{}", r.raw));
                }
                if std::env::var_os("METAGUARD_BENCH_RAW").is_some() {
                    eprintln!("--- {variant} close={close}\n{}", r.raw);
                }
                // Counted and printed, not fatal: wrk counts a request
                // still open when the run ends as a timeout.
                socket_errors[i] += r.socket_errors.total();
                let f = &mut figs[i];
                let (p50, rps) = (us(r.p50), r.requests_per_sec);
                if close {
                    f.close_p50.push(p50);
                    f.close_rps.push(rps);
                } else {
                    f.keep_p50.push(p50);
                    f.keep_rps.push(rps);
                }
                if variant == "observe" {
                    records += r.requests;
                }
            }
            figs[i].connects.push(common::connect_rate(&lab, 20_000)?);
            d.kill();
        }
    }
    let observed = metaguard_proxy::observe::read(&lab.work_dir().join("observe"), None)
        .map_err(|e| e.to_string())?;
    if (observed.records.len() as u64) < records {
        return Err(format!(
            "observe recorded {} of {records} requests",
            observed.records.len()
        ));
    }
    let med = |v: &Vec<f64>| stats(v.clone()).median;
    let [a, p, o] = [&figs[0], &figs[1], &figs[2]];
    // Per round, so each ratio compares runs taken minutes apart at most.
    let per_round = |x: &Vec<f64>, y: &Vec<f64>, f: &dyn Fn(f64, f64) -> f64| {
        stats(x.iter().zip(y).map(|(x, y)| f(*x, *y)).collect())
    };
    let pct = |x: f64, base: f64| (x / base - 1.0) * 100.0;
    let ns_per = |x: f64, base: f64| 1e9 / x - 1e9 / base;
    let mut body = format!(
        "## Observe mode — `sudo cargo bench -p metaguard --bench observe`\n\n\
         {}; {rounds} round(s) × {secs} s per variant and load, variants rotated per round; min / median / max over rounds. \
         Bridge container c1 → `GET /latest/meta-data/instance-id` (wrk -t1 -c1 --latency; IMDSv1, so `proxy` forwards every request as `observe` does), \
         and TCP connects/s from c1 to the VPC echo service. The emulator's namespace keeps no TIME_WAIT sockets \
         (`tcp_max_tw_buckets=0`: otherwise PAWS drops SYNs that reuse a 4-tuple, a 1 s retransmit in the tail — see the bench's source). \
         All {records} observed requests were recorded ({} records in the log). \
         wrk socket errors (allow, proxy, observe): {socket_errors:?}.\n\n\
         | c1's `imds` | keep-alive p50 | keep-alive req/s | `Connection: close` p50 | close req/s | TCP connects/s |\n|---|---|---|---|---|---|\n",
        common::machine(),
        observed.records.len(),
    );
    let span = |v: &Vec<f64>, unit: &str| {
        let s = stats(v.clone());
        format!("{:.0} / {:.0} / {:.0}{unit}", s.min, s.median, s.max)
    };
    for (name, f) in VARIANTS.iter().zip(&figs) {
        body.push_str(&format!(
            "| `{name}` | {} | {} | {} | {} | {} |\n",
            span(&f.keep_p50, " µs"),
            span(&f.keep_rps, ""),
            span(&f.close_p50, " µs"),
            span(&f.close_rps, ""),
            span(&f.connects, "")
        ));
    }
    let row = |what: &str, s: Stats, unit: &str, goal: &str| {
        format!(
            "| {what} | {:+.1}{unit} | {:+.1}{unit} | {:+.1}{unit} | {goal} |\n",
            s.min, s.median, s.max
        )
    };
    body.push_str("\n| per round | min | median | max | goal |\n|---|---:|---:|---:|---|\n");
    body.push_str(&row(
        "observe over proxy, keep-alive req/s",
        per_round(&o.keep_rps, &p.keep_rps, &pct),
        " %",
        "≥ −10 %",
    ));
    body.push_str(&row(
        "observe over proxy, close req/s",
        per_round(&o.close_rps, &p.close_rps, &pct),
        " %",
        "≥ −10 %",
    ));
    body.push_str(&row(
        "observe over proxy, keep-alive p50",
        per_round(&o.keep_p50, &p.keep_p50, &pct),
        " %",
        "≤ +10 %",
    ));
    body.push_str(&row(
        "observe over proxy, close p50",
        per_round(&o.close_p50, &p.close_p50, &pct),
        " %",
        "≤ +10 %",
    ));
    body.push_str(&row(
        "observe over allow, keep-alive p50 (the proxy hop)",
        per_round(&o.keep_p50, &a.keep_p50, &pct),
        " %",
        "—",
    ));
    body.push_str(&row(
        "observe over allow, ns per connect (from the connect rates)",
        per_round(&o.connects, &a.connects, &ns_per),
        " ns",
        "≤ 1000 ns",
    ));
    body.push_str(&format!(
        "\nMedians: observe over proxy req/s {:+.1} % keep-alive, {:+.1} % close; per connect {:+.0} ns.\n",
        pct(med(&o.keep_rps), med(&p.keep_rps)),
        pct(med(&o.close_rps), med(&p.close_rps)),
        ns_per(med(&o.connects), med(&a.connects)),
    ));
    println!("{body}");
    if full {
        common::write_section("observe", &body)?;
    }
    drop(lab);
    Ok(())
}
