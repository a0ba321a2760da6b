//! `metaguard demo`: builds the emulated ECS host, shows which workloads
//! reach the metadata endpoints without protection and with it, and tears
//! everything down — also on Ctrl-C.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context as _;
use metaguard_lab::matrix::{self, Matrix};
use metaguard_lab::{Lab, LabOptions, Workload};

/// The rows of the demo's matrix.
pub const ROWS: [Workload; 4] = [
    Workload::BridgeC1,
    Workload::AwsvpcTask,
    Workload::HostNetwork,
    Workload::Agent,
];

pub fn run(json: bool, color: &str) -> anyhow::Result<ExitCode> {
    install_interrupt_handler()?;
    let color = match color {
        "always" => true,
        "never" => false,
        _ => std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
    };
    let started = Instant::now();
    let exe = std::env::current_exe()
        .context("cannot find the metaguard executable for the lab's probes")?;
    eprintln!("metaguard demo: building an emulated ECS container instance in network namespaces…");
    let mut lab = Lab::start(LabOptions::new(exe)).context("cannot build the lab")?;
    eprintln!(
        "metaguard demo: lab {} ready in {} ms (namespaces mglab-{}-*); probing without protection…",
        lab.id(),
        started.elapsed().as_millis(),
        lab.id()
    );
    let before = Matrix::measure(&lab, &ROWS)?;
    let policy = lab.write_file("metaguard.toml", &lab.policy_toml())?;
    eprintln!(
        "metaguard demo: metaguard apply --config {} (inside the lab's host namespace)…",
        policy.display()
    );
    let out = lab.metaguard(&["apply", "--config", &policy.display().to_string()])?;
    if !out.status.success() {
        anyhow::bail!(
            "metaguard apply failed in the lab ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    eprint!("metaguard demo: {}", String::from_utf8_lossy(&out.stdout));
    let after = Some(Matrix::measure(&lab, &ROWS)?);

    if json {
        let doc = serde_json::json!({ "lab": lab.id(), "before": before, "after": after });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        let mut tables = vec![("without metaguard", &before)];
        if let Some(a) = &after {
            tables.push(("with metaguard apply", a));
        }
        print!("{}", matrix::render(&tables, color));
        println!();
        println!("reached = HTTP 200 and the endpoint's request log holds the probe;");
        println!("refused/unreachable/denied/timeout = the client failed and the endpoint's log holds nothing.");
        println!("policy applied: {}", policy.display());
    }
    let problems = lab.teardown();
    for p in &problems {
        eprintln!("metaguard demo: clean-up problem: {p}");
    }
    eprintln!(
        "metaguard demo: lab torn down; {} ms in all.",
        started.elapsed().as_millis()
    );
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(super::EXIT_PROBLEMS)
    })
}

/// Ctrl-C and SIGTERM tear down every lab of this process, then exit 130.
fn install_interrupt_handler() -> anyhow::Result<()> {
    ctrlc::set_handler(|| {
        eprintln!("\nmetaguard demo: interrupted; tearing the lab down…");
        metaguard_lab::registry::teardown_live();
        std::process::exit(130);
    })
    .context("cannot install the Ctrl-C handler")
}
