//! `metaguard lab-probe SPEC` (hidden): one reachability probe from inside a
//! lab workload, started by the lab. Prints one JSON line. Refuses to run in
//! the root network namespace (exit 2).

use std::process::ExitCode;

use anyhow::Context as _;
use metaguard_lab::probe::{self, ProbeSpec};

pub fn run(spec: &str) -> anyhow::Result<ExitCode> {
    let spec: ProbeSpec =
        serde_json::from_str(spec).context("lab-probe: the spec is not valid probe JSON")?;
    let result = probe::run(&spec)?;
    println!("{}", serde_json::to_string(&result)?);
    Ok(ExitCode::SUCCESS)
}
