//! `metaguard doctor [--json] [--fix [--dry-run]] [--probe] [--from DIR | --collect DIR]`:
//! diagnose this host (or a snapshot) for the known failure modes;
//! `metaguard doctor --merge FILE… [--json]`: many hosts' reports as one table.
//!
//! Exit codes: 0 no findings · 1 findings (after `--fix`: findings left, or a new
//! id appeared) · 2 bad input (a snapshot file names its line), usage or permission error.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use metaguard_core::doctor::snapshot::Snapshot;
use metaguard_core::doctor::{analyze, new_findings, Report};

use super::{config, ConfigArg, EXIT_PROBLEMS};
use crate::doctor::{collect, fix, probe};

/// Validated arguments.
#[derive(Debug)]
pub struct Args<'a> {
    pub json: bool,
    pub fix: bool,
    pub dry_run: bool,
    pub probe: bool,
    pub from: Option<&'a Path>,
    pub collect: Option<&'a Path>,
    /// `doctor --json` outputs to merge (empty: no merge).
    pub merge: &'a [PathBuf],
    pub config: &'a ConfigArg,
    /// The BPF layer's pin directory (its state is shown for this host).
    pub bpf_pin_dir: &'a Path,
    /// The Docker API socket (containers' environment, F12/F13/F18).
    pub docker_socket: &'a Path,
}

fn config_text(arg: &ConfigArg) -> Option<String> {
    let p = arg
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(metaguard_core::config::DEFAULT_PATH));
    std::fs::read_to_string(p).ok()
}

fn live(
    arg: &ConfigArg,
    docker_socket: &Path,
) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    let cfg = config::load(arg)?;
    config::require_root("doctor")?;
    collect::collect(&cfg, config_text(arg).as_deref(), docker_socket)
}

fn parse(
    files: &std::collections::BTreeMap<String, String>,
    dir: Option<&Path>,
) -> anyhow::Result<Snapshot> {
    Snapshot::parse(files).map_err(|e| match dir {
        Some(d) => anyhow::anyhow!("{}/{}", d.display(), e),
        None => anyhow::anyhow!("collected {e}"),
    })
}

/// This host's name (the UTS namespace's), for `--merge`.
fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

/// `--merge FILE…`: one host × finding table; exit 1 when a host has
/// findings, 2 when a file is not a doctor report (`FILE:LINE:COLUMN`).
fn merge(files: &[PathBuf], json: bool) -> anyhow::Result<ExitCode> {
    use metaguard_core::doctor::merge;
    let mut hosts = Vec::new();
    for f in files {
        let name = f.display().to_string();
        let text = std::fs::read_to_string(f).with_context(|| format!("cannot read {name}"))?;
        hosts.push(merge::parse_report(&name, &text)?);
    }
    let m = merge::merge(hosts);
    if json {
        println!("{}", serde_json::to_string_pretty(&m)?);
    } else {
        print!("{}", m.human());
    }
    Ok(if m.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_PROBLEMS)
    })
}

pub fn run(a: &Args<'_>) -> anyhow::Result<ExitCode> {
    if !a.merge.is_empty() {
        return merge(a.merge, a.json);
    }
    if a.from.is_some() && (a.fix || a.probe || a.collect.is_some()) {
        bail!("--from analyses a snapshot; --fix, --probe and --collect act on this host and cannot be combined with it");
    }
    if a.dry_run && !a.fix {
        bail!("--dry-run shows what --fix would do; give --fix too");
    }
    if let Some(dir) = a.collect {
        let mut files = live(a.config, a.docker_socket)?;
        // Parse what was collected, so a snapshot that cannot be read back is never written silently.
        let snap = parse(&files, None)?;
        if a.probe {
            files.insert("probes.json".into(), probe::http(&snap)?);
            parse(&files, None)?;
        }
        collect::write(dir, &files)?;
        eprintln!(
            "metaguard doctor: wrote {} files to {}",
            files.len(),
            dir.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let (files, source) = match a.from {
        Some(dir) => (collect::read(dir)?, format!("snapshot {}", dir.display())),
        None => (live(a.config, a.docker_socket)?, "this host".to_string()),
    };
    let mut snap = parse(&files, a.from)?;
    if a.probe && !a.fix {
        // IMDS over HTTP from this namespace and a bridge's (F16, F19, F20).
        let mut files = files;
        files.insert("probes.json".into(), probe::http(&snap)?);
        snap = parse(&files, None)?;
    }
    let mut report = analyze(&snap, &source);
    if a.from.is_none() {
        report.host = hostname();
    }
    let color =
        !a.json && std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    if !a.fix {
        let probes = if a.probe {
            Some(probe::run(&snap, &report)?)
        } else {
            None
        };
        // The BPF layer is live kernel state, not part of a snapshot.
        let bpf = a
            .from
            .is_none()
            .then(|| crate::enforce::bpf::state(a.bpf_pin_dir));
        print(&report, probes.as_deref(), bpf.as_ref(), a.json, color)?;
        return Ok(code(&report, probes.as_deref()));
    }
    // --fix
    let (actions, skipped) = fix::plan(&report);
    if a.dry_run {
        if a.json {
            let doc = serde_json::json!({"schema": "metaguard.doctor-fix/v1", "dry_run": true, "report": report, "actions": actions, "skipped": skipped});
            println!("{}", serde_json::to_string_pretty(&doc)?);
        } else {
            print!("{}", report.human(color));
            println!();
            println!("--fix would run (nothing changed):");
            for act in &actions {
                println!("  $ {}", act.shell());
            }
            for s in &skipped {
                println!("  {s}");
            }
        }
        return Ok(code(&report, None));
    }
    config::require_root("doctor --fix")?;
    let mut done = Vec::new();
    for act in &actions {
        if !a.json {
            println!("$ {}", act.shell());
        }
        fix::apply(act).with_context(|| {
            format!(
                "fix stopped; applied before it: {}",
                if done.is_empty() {
                    "nothing".to_string()
                } else {
                    done.join("; ")
                }
            )
        })?;
        done.push(act.shell());
    }
    let after_files = live(a.config, a.docker_socket)?;
    let mut after = analyze(&parse(&after_files, None)?, &source);
    after.host = report.host.clone();
    // A fix must never open another failure mode: the ids that appeared.
    let opened = new_findings(&report, &after);
    if a.json {
        let doc = serde_json::json!({"schema": "metaguard.doctor-fix/v1", "dry_run": false, "before": report, "applied": actions, "skipped": skipped, "after": after, "new_after_fix": opened});
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        for s in &skipped {
            println!("{s}");
        }
        println!();
        println!("after the fix:");
        print!("{}", after.human(color));
        println!();
        if opened.is_empty() {
            println!("No finding appeared that was not there before the fix.");
        } else {
            println!(
                "NEW after the fix (the fix opened them; report this): {}",
                opened.join(", ")
            );
        }
        println!("These fixes are in tables others own and may be undone (dockerd restarts, iptables-restore); the durable fix is `metaguard apply` (or the daemon, with proxy mode).");
    }
    if !opened.is_empty() {
        return Ok(ExitCode::from(EXIT_PROBLEMS));
    }
    Ok(code(&after, None))
}

fn code(r: &Report, probes: Option<&[probe::Probe]>) -> ExitCode {
    if r.ok && probes.is_none_or(|p| p.iter().all(|x| x.agrees)) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_PROBLEMS)
    }
}

fn print(
    r: &Report,
    probes: Option<&[probe::Probe]>,
    bpf: Option<&crate::enforce::bpf::BpfState>,
    json: bool,
    color: bool,
) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if json {
        let mut v = serde_json::to_value(r)?;
        if let (Some(p), Some(obj)) = (probes, v.as_object_mut()) {
            obj.insert("probes".into(), serde_json::to_value(p)?);
        }
        if let (Some(b), Some(obj)) = (bpf, v.as_object_mut()) {
            obj.insert("bpf_layer".into(), serde_json::to_value(b)?);
        }
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        write!(out, "{}", r.human(color))?;
        if let Some(b) = bpf {
            writeln!(out)?;
            writeln!(out, "{}", b.summary())?;
        }
        if let Some(ps) = probes {
            writeln!(out)?;
            writeln!(
                out,
                "Probes (a real connection from a short-lived namespace on the bridge)"
            )?;
            for p in ps {
                writeln!(
                    out,
                    "  {:<52} static {:<10} observed {:<10} {}",
                    p.flow,
                    p.expected.as_str(),
                    p.observed.as_str(),
                    if p.agrees { "ok" } else { "DIFFERS" }
                )?;
            }
        }
    }
    Ok(())
}
