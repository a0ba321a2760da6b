//! `metaguard apply [--config PATH] [--dry-run]`: install or replace this
//! host's rules, atomically.

use std::path::Path;
use std::process::ExitCode;

use super::{config, ConfigArg};
use crate::enforce::Engine;

pub fn run(
    arg: &ConfigArg,
    dry_run: bool,
    state_dir: &Path,
    docker: &Path,
    bpf_pin_dir: &Path,
) -> anyhow::Result<ExitCode> {
    let config = config::load(arg)?;
    if !dry_run {
        config::require_root("apply")?;
    }
    let engine = Engine::new(state_dir, docker)?.with_bpf_pin_dir(bpf_pin_dir);
    let plan = engine.plan(&config)?;
    if dry_run {
        for w in &plan.warnings {
            eprintln!("warning: {w}");
        }
        println!("# metaguard apply --dry-run: exactly what would be loaded; nothing was changed.");
        println!("# config: {}", config.origin);
        println!("\n# network namespace: host (the one metaguard runs in)");
        print!("{}", plan.host);
        for n in &plan.netns {
            println!(
                "\n# network namespace: {} (workload {:?})",
                n.path, n.workload
            );
            print!("{}", n.script);
        }
        print!(
            "{}",
            engine.bpf_dry_run(&config, plan.containers.as_deref())
        );
        return Ok(ExitCode::SUCCESS);
    }
    let started = std::time::Instant::now();
    let report = engine.apply(&config, &plan)?;
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    if plan.proxy.is_some() {
        eprintln!("warning: workloads with the proxy action are served by `metaguard daemon`; until it runs, their metadata requests are refused (fail-closed)");
    }
    println!(
        "applied {} table{} in {} ms: {}",
        report.tables.len(),
        if report.tables.len() == 1 { "" } else { "s" },
        started.elapsed().as_millis(),
        report.tables.join(", ")
    );
    if !report.removed_stale.is_empty() {
        println!(
            "removed metaguard's table from namespaces no longer selected: {}",
            report.removed_stale.join(", ")
        );
    }
    if let Some(b) = &report.bpf {
        println!("{}", b.summary());
    }
    if report.conntrack_deleted > 0 {
        println!(
            "cut {} existing connection(s) to denied endpoints",
            report.conntrack_deleted
        );
    }
    Ok(ExitCode::SUCCESS)
}
