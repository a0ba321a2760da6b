//! `metaguard verify [--config PATH] [--json]`: exit 0 when the kernel
//! matches the config; 1 and a readable diff when not.

use std::path::Path;
use std::process::ExitCode;

use super::{config, ConfigArg, EXIT_PROBLEMS};
use crate::enforce::Engine;

pub fn run(
    arg: &ConfigArg,
    json: bool,
    state_dir: &Path,
    docker: &Path,
    bpf_pin_dir: &Path,
) -> anyhow::Result<ExitCode> {
    let config = config::load(arg)?;
    config::require_root("verify")?;
    let engine = Engine::new(state_dir, docker)?.with_bpf_pin_dir(bpf_pin_dir);
    let plan = engine.plan(&config)?;
    let (mut reports, mut warnings) = engine.verify(&plan)?;
    reports.extend(engine.verify_bpf(&config, plan.containers.as_deref(), &mut warnings));
    let ok = reports.iter().all(|r| r.ok);
    if json {
        let doc = serde_json::json!({ "ok": ok, "namespaces": reports, "warnings": warnings });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        for w in &warnings {
            eprintln!("warning: {w}");
        }
        for r in &reports {
            if r.ok {
                println!("ok     {}", r.netns);
            } else {
                println!("DRIFT  {}", r.netns);
                for d in &r.differences {
                    println!("       {}", d.replace('\n', "\n       "));
                }
            }
        }
        if !ok {
            println!("the kernel does not match the config; `metaguard apply` restores it");
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_PROBLEMS)
    })
}
