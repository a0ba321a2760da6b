//! Enforcement benchmarks on the lab (root only):
//!
//! 1. `metaguard apply` wall time with 10, 1,000 and 10,000 entries in a
//!    bridges selector (one interval verdict map);
//! 2. TCP connect rate from a bridge container to an unrelated VPC address
//!    with no metaguard table vs 10,000 entries loaded, measured side by
//!    side in alternating rounds; the ratio is what matters on a noisy box.
//!
//! `cargo bench -p metaguard --bench enforce` runs it in full and rewrites
//! the `enforce` section of BENCHMARKS.md; under `cargo test` it runs once
//! with tiny sizes as a smoke test.

use std::path::{Path, PathBuf};
use std::time::Instant;

use metaguard_lab::topology::Role;
use metaguard_lab::{Lab, LabOptions};

mod common;

use common::stats;

fn main() {
    common::main_as_root("enforce", "network namespaces", run);
}

fn config(n: usize) -> String {
    let mut names: Vec<String> = vec!["docker0".into(), "br-*".into(), "ecs-bridge".into()];
    names.extend((0..n.saturating_sub(3)).map(|i| format!("vb{i:05}")));
    let list: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
    format!(
        "[[workload]]\nname = \"bridge-containers\"\nbridges = [{}]\nimds = \"deny\"\n",
        list.join(", ")
    )
}

fn apply(lab: &Lab, path: &Path) -> Result<f64, String> {
    let t = Instant::now();
    let out = lab
        .metaguard(&["apply", "--config", &path.display().to_string()])
        .map_err(|e| e.to_string())?;
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    if !out.status.success() {
        return Err(format!("apply: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(ms)
}

fn run(full: bool) -> Result<(), String> {
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_metaguard"));
    let lab = Lab::start(LabOptions::new(exe)).map_err(|e| e.to_string())?;
    // Client-closed connections leave TIME_WAIT; let the container reuse
    // them so the loop measures the filter path, not port exhaustion.
    lab.run_in(Role::C1, "sysctl", &["-q", "-w", "net.ipv4.tcp_tw_reuse=1"])
        .map_err(|e| e.to_string())?;
    let sizes: &[usize] = if full { &[10, 1_000, 10_000] } else { &[10] };
    let reps = if full { 7 } else { 1 };
    let mut report = String::new();
    report.push_str("| entries | apply min | median | max |\n|---:|---:|---:|---:|\n");
    for &n in sizes {
        let path = lab
            .write_file(&format!("bench-{n}.toml"), &config(n))
            .map_err(|e| e.to_string())?;
        let mut times = Vec::new();
        for _ in 0..reps {
            times.push(apply(&lab, &path)?);
        }
        let s = stats(times);
        report.push_str(&format!(
            "| {n} | {:.1} ms | {:.1} ms | {:.1} ms |\n",
            s.min, s.median, s.max
        ));
    }

    let big = *sizes.last().unwrap_or(&10);
    let loaded = lab
        .write_file("bench-loaded.toml", &config(big))
        .map_err(|e| e.to_string())?;
    // The same policy with only the default entries (docker0, br-*,
    // ecs-bridge): separates the cost of having rules at all from the cost
    // of 10,000 entries, which is what the goal is about.
    let small = lab
        .write_file("bench-small.toml", &config(3))
        .map_err(|e| e.to_string())?;
    let rounds = if full { 11 } else { 1 };
    let count = if full { 8000 } else { 50 };
    let (mut base, mut few, mut with) = (Vec::new(), Vec::new(), Vec::new());
    let (mut r_none, mut r_few) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        // Rotate the order each round: whichever case runs last in a round
        // is measured warmer, and a fixed order would bias the ratios.
        let mut rates = [0.0f64; 3];
        for k in 0..3 {
            let case = (k + round) % 3;
            match case {
                0 => {
                    let out = lab.metaguard(&["remove"]).map_err(|e| e.to_string())?;
                    if !out.status.success() {
                        return Err("remove failed".into());
                    }
                }
                1 => {
                    apply(&lab, &small)?;
                }
                _ => {
                    apply(&lab, &loaded)?;
                }
            }
            rates[case] = common::connect_rate(&lab, count)?;
        }
        let [b, f, w] = rates;
        base.push(b);
        few.push(f);
        with.push(w);
        r_none.push(w / b);
        r_few.push(w / f);
    }
    let (b, f, w) = (stats(base), stats(few), stats(with));
    let (rn, rf) = (stats(r_none), stats(r_few));
    report.push_str(&format!(
        "\n| TCP connects/s, bridge container → 10.0.0.1:8080 | min | median | max |\n|---|---:|---:|---:|\n\
         | no metaguard table | {:.0} | {:.0} | {:.0} |\n\
         | default policy (3 bridge entries) | {:.0} | {:.0} | {:.0} |\n\
         | {big} entries loaded | {:.0} | {:.0} | {:.0} |\n\
         | ratio {big} entries / 3 entries (per round) | {:.3} | {:.3} | {:.3} |\n\
         | ratio {big} entries / no table (per round) | {:.3} | {:.3} | {:.3} |\n",
        b.min, b.median, b.max, f.min, f.median, f.max, w.min, w.median, w.max,
        rf.min, rf.median, rf.max, rn.min, rn.median, rn.max
    ));
    println!("{report}");
    if full {
        common::write_section(
            "enforce",
            &format!(
                "## Enforcement (nft) — `sudo cargo bench -p metaguard --bench enforce`\n\n\
                 Lab: the emulated ECS host (network namespaces). `apply` is the whole `metaguard apply` process \
                 (process start, config, discovery, one `nft -f` transaction, conntrack), 7 runs per size. \
                 Entries are interface names in one `bridges` selector (a hash verdict map; `br-*` in an interval map). Connect rate: \
                 {rounds} rounds, each measuring no table, the default 3-entry table and the largest table (in an order rotated every round), \
                 of up to {count} connects (3 s cap); ratios are taken per round. Machine: {}.\n\n{report}",
                common::machine()
            ),
        )?;
    }
    Ok(())
}
