//! `metaguard demo`: builds the emulated ECS host, shows which workloads
//! reach the metadata endpoints without protection and with it, and tears
//! everything down — also on Ctrl-C.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context as _;
use metaguard_lab::matrix::{self, Matrix};
use metaguard_lab::topology::{
    Role, AGENT_ON_BRIDGE, AGENT_ON_BRIDGE_LABEL, AGENT_ON_BRIDGE_POLICY,
};
use metaguard_lab::{Lab, LabOptions, Workload};

/// The rows of the demo's matrix.
pub const ROWS: [Workload; 4] = [
    Workload::BridgeC1,
    Workload::AwsvpcTask,
    Workload::HostNetwork,
    Workload::Agent,
];

/// The rows with `--agent-on-bridge`: c2 is the ECS agent's container.
pub const ROWS_AGENT_ON_BRIDGE: [Workload; 4] = [
    Workload::BridgeC1,
    AGENT_ON_BRIDGE,
    Workload::AwsvpcTask,
    Workload::HostNetwork,
];

pub fn run(json: bool, color: &str, agent_on_bridge: bool) -> anyhow::Result<ExitCode> {
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
    if agent_on_bridge {
        return agent_on_bridge_demo(lab, json, color, started);
    }
    let before = Matrix::measure(&lab, &ROWS)?;
    // Both layers where this kernel can run the BPF one: a bpf filesystem
    // in the lab's work dir, programs on the lab's own cgroups only.
    let bpf = match lab.mount_bpffs() {
        Ok(_) => true,
        Err(e) => {
            eprintln!("metaguard demo: no bpf filesystem ({e}); showing the nft layer alone");
            false
        }
    };
    let text = if bpf {
        lab.bpf_policy_toml()
    } else {
        lab.policy_toml()
    };
    let policy = lab.write_file("metaguard.toml", &text)?;
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
    // The BPF layer alone: metaguard's nft tables deleted (F4), no
    // metaguard process running (F5).
    let bpf_alone = if bpf && after.as_ref().is_some() {
        eprintln!("metaguard demo: deleting metaguard's nft tables (nft delete table inet metaguard), no daemon…");
        lab.delete_metaguard_tables(&[Role::Host, Role::Task1])?;
        Some(Matrix::measure(&lab, &ROWS)?)
    } else {
        None
    };

    if json {
        let doc = serde_json::json!({ "lab": lab.id(), "before": before, "after": after, "bpf_alone": bpf_alone });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        let mut tables = vec![("without metaguard", &before)];
        if let Some(a) = &after {
            tables.push(("with metaguard apply", a));
        }
        if let Some(b) = &bpf_alone {
            tables.push(("nft tables deleted, no daemon: the BPF layer alone", b));
        }
        print!("{}", matrix::render(&tables, color));
        println!();
        println!("reached = HTTP 200 and the endpoint's request log holds the probe;");
        println!("refused/unreachable/denied/timeout = the client failed and the endpoint's log holds nothing.");
        println!("policy applied: {}", policy.display());
    }
    finish(lab, started)
}

/// Tears the lab down; the exit code says whether that went cleanly.
fn finish(mut lab: Lab, started: Instant) -> anyhow::Result<ExitCode> {
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

/// `--agent-on-bridge`: the ECS agent as a container on docker0 (the
/// recipe of docs/deploy.md), the recipe's policy under `metaguard daemon`,
/// whose relay serves task credentials from the agent's container.
fn agent_on_bridge_demo(
    mut lab: Lab,
    json: bool,
    color: bool,
    started: Instant,
) -> anyhow::Result<ExitCode> {
    lab.move_agent_to_bridge()
        .context("cannot move the ECS agent onto docker0")?;
    let rows = &ROWS_AGENT_ON_BRIDGE;
    let relabel = |mut m: Matrix| {
        m.labels.push((AGENT_ON_BRIDGE, AGENT_ON_BRIDGE_LABEL));
        m
    };
    let before = relabel(Matrix::measure(&lab, rows)?);
    let policy = lab.write_file("metaguard.toml", AGENT_ON_BRIDGE_POLICY)?;
    eprintln!(
        "metaguard demo: metaguard daemon --config {} (inside the lab's host namespace)…",
        policy.display()
    );
    let mut daemon = start_daemon(&lab, &policy)?;
    if !lab.wait_for_credentials(Workload::BridgeC1, std::time::Duration::from_secs(5)) {
        eprintln!("metaguard demo: the relay served no credentials within 5 s");
    }
    let after = Matrix::measure(&lab, rows).map(relabel);
    // Our own child, by its pid.
    let _ = daemon.kill();
    let _ = daemon.wait();
    let after = after?;
    if json {
        let doc = serde_json::json!({ "lab": lab.id(), "before": before, "after": after });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        let tables = [
            ("without metaguard", &before),
            ("with metaguard daemon", &after),
        ];
        print!("{}", matrix::render(&tables, color));
        println!();
        println!("reached = HTTP 200 and the endpoint's request log holds the probe;");
        println!("refused/unreachable/denied/timeout = the client failed and the endpoint's log holds nothing.");
        println!("policy applied: {}", policy.display());
    }
    finish(lab, started)
}

fn start_daemon(lab: &Lab, policy: &std::path::Path) -> anyhow::Result<std::process::Child> {
    let log = lab.work_dir().join("demo-daemon.log");
    let file =
        std::fs::File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
    let mut cmd = lab.metaguard_command(&["daemon", "--config", &policy.display().to_string()])?;
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(file);
    let mut child = cmd
        .spawn()
        .context("cannot start metaguard daemon in the lab")?;
    let started = Instant::now();
    while started.elapsed() < std::time::Duration::from_secs(10) {
        // Ready, and past its first plan with the Docker API's containers
        // (asked only once it is ready): the agent's port has its rules.
        let ready = std::fs::read_to_string(&log).is_ok_and(|t| t.contains("ready: rules applied"));
        if ready
            && lab
                .run_in(Role::Host, "nft", &["list", "table", "inet", "metaguard"])
                .is_ok_and(|t| t.contains("map ports"))
        {
            return Ok(child);
        }
        if let Ok(Some(status)) = child.try_wait() {
            anyhow::bail!(
                "metaguard daemon exited in the lab ({status}): {}",
                std::fs::read_to_string(&log).unwrap_or_default().trim()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    anyhow::bail!("metaguard daemon was not ready within 10 s in the lab")
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
