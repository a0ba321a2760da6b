//! Shared by the benchmarks (included with `mod common;`): a description of
//! the machine, and writing one bench's section of BENCHMARKS.md.

// Each bench target compiles its own copy of this module and uses a part.
#![allow(dead_code)]

use std::path::PathBuf;

use metaguard_lab::probe::{ProbeKind, ProbeSpec};
use metaguard_lab::{Lab, Workload};

/// A root-only bench's `main`: skipped, saying why, when not root; else
/// `run(full)` (`full` with `--bench`), a failure exiting 1.
pub fn main_as_root<E: std::fmt::Display>(
    bench: &str,
    needs: &str,
    run: impl FnOnce(bool) -> Result<(), E>,
) {
    let full = std::env::args().any(|a| a == "--bench");
    if !metaguard_sys::process::is_root() {
        println!("{bench} bench skipped: needs root ({needs})");
        return;
    }
    if let Err(e) = run(full) {
        eprintln!("{bench} bench failed: {e}");
        std::process::exit(1);
    }
}

/// "CPU model, N cores".
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{cpu}, {cores} cores")
}

/// The minimum, median and maximum of a set of figures (NaN when empty).
pub struct Stats {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

pub fn stats(mut v: Vec<f64>) -> Stats {
    v.sort_by(f64::total_cmp);
    Stats {
        min: v.first().copied().unwrap_or(f64::NAN),
        median: v.get(v.len() / 2).copied().unwrap_or(f64::NAN),
        max: v.last().copied().unwrap_or(f64::NAN),
    }
}

/// Replaces the text between `<!-- bench:NAME -->` and
/// `<!-- /bench:NAME -->` in BENCHMARKS.md with `body` (the markers stay),
/// or appends the section when it is not there yet. Other sections and
/// text outside the markers are left as they are.
pub fn write_section(name: &str, body: &str) -> Result<(), String> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../BENCHMARKS.md");
    let start = format!("<!-- bench:{name} -->");
    let end = format!("<!-- /bench:{name} -->");
    let section = format!("{start}\n{}\n{end}", body.trim_end());
    let text = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        "# Benchmarks\n\nFigures from the project's benchmarks; each section names the command that produced it.\n".into()
    });
    let new = match (text.find(&start), text.find(&end)) {
        (Some(a), Some(b)) if b > a => format!("{}{section}{}", &text[..a], &text[b + end.len()..]),
        _ => format!("{}\n\n{section}\n", text.trim_end()),
    };
    std::fs::write(&path, new).map_err(|e| format!("write {}: {e}", path.display()))
}

/// TCP connects per second from bridge container c1 to the unrelated VPC
/// echo service (10.0.0.1): up to `count` connects, 3 s at most.
pub fn connect_rate(lab: &Lab, count: u32) -> Result<f64, String> {
    let spec = ProbeSpec {
        id: lab.probe_id("bench-connect"),
        kind: ProbeKind::ConnectLoop {
            host: "10.0.0.1".into(),
            port: metaguard_lab::topology::addr::ECHO_TCP_PORT,
            count,
            max_ms: 3000,
        },
        timeout_ms: 10_000,
    };
    let r = lab
        .probe(Workload::BridgeC1, &spec)
        .map_err(|e| e.to_string())?;
    let body: serde_json::Value =
        serde_json::from_str(r.body.as_deref().unwrap_or("")).map_err(|e| format!("{e}: {r:?}"))?;
    let n = body["connects"].as_f64().unwrap_or(0.0);
    if n < 1.0 {
        return Err(format!("no connects: {r:?}"));
    }
    Ok(n / body["seconds"].as_f64().unwrap_or(1.0))
}
