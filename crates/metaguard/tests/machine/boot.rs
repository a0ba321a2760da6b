//! Boot: the stand-ins come up in a booted machine and their containers
//! reach IMDS and task credentials without metaguard (the control every
//! blocked probe is paired with).

use libtest_mimic::Failed;
use metaguard_lab::standin::api::TaskSpec;

use crate::ensure;
use crate::support::{booted, expect_active, expect_own_credentials, installed};

pub const TESTS: &[(&str, crate::TestFn)] = &[
    (
        "boot::without_metaguard_containers_and_tasks_reach_imds_and_credentials",
        without_metaguard_containers_and_tasks_reach_imds_and_credentials,
    ),
    (
        "boot::default_config_guards_what_starts_after_boot",
        default_config_guards_what_starts_after_boot,
    ),
];

fn without_metaguard_containers_and_tasks_reach_imds_and_credentials() -> Result<(), Failed> {
    let mut host = booted()?;
    let m = host.machine()?;
    for unit in ["docker.socket", "docker.service", "ecs.service"] {
        ensure!(
            m.unit_state(unit)? == "active",
            "{unit}: {}",
            m.journal_text(unit)
        );
    }
    for mode in ["bridge", "awsvpc"] {
        let task = host.run_task(&TaskSpec::single(&format!("ctl-{mode}"), mode))?;
        let lab = host.lab()?;
        let c = task.first();
        let spec = lab.http_get("http://169.254.169.254/latest/meta-data/instance-id");
        let r = host.probe(c, &spec)?;
        ensure!(r.ok(), "{mode}: IMDS without metaguard: {r:?}");
        ensure!(
            lab.imds().log().with_header("x-lab-probe", &spec.id).len() == 1,
            "{mode}: the IMDS emulator did not log the probe"
        );
        expect_own_credentials(&host, &task, "without metaguard")?;
    }
    Ok(())
}

fn default_config_guards_what_starts_after_boot() -> Result<(), Failed> {
    let mut host = installed(None)?;
    expect_active(&host, "metaguard.service")?;
    let m = host.machine()?;
    // metaguard was READY ("Started") before Docker began to start.
    let ready = m.journal_at("metaguard.service", "Started metaguard.service", 0)?;
    let docker = m.journal_at("docker.service", "Starting docker.service", 0)?;
    ensure!(
        matches!((ready, docker), (Some(r), Some(d)) if r < d),
        "metaguard ready at {ready:?} µs, docker starting at {docker:?} µs"
    );
    let verify = m.exec(&["metaguard", "verify"])?;
    ensure!(
        verify.status.success(),
        "verify: {}\n{}{}",
        verify.status,
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    let mut tasks = Vec::new();
    for mode in ["bridge", "awsvpc"] {
        let task = host.run_task(&TaskSpec::single(&format!("web-{mode}"), mode))?;
        let lab = host.lab()?;
        let c = task.first();
        // The task's first connection ever.
        let spec = lab.http_get("http://169.254.169.254/latest/meta-data/instance-id");
        let r = host.probe(c, &spec)?;
        ensure!(!r.ok(), "{mode}: reached IMDS with metaguard: {r:?}");
        ensure!(
            lab.imds()
                .log()
                .with_header("x-lab-probe", &spec.id)
                .is_empty(),
            "{mode}: IMDS logged the refused probe"
        );
        expect_own_credentials(&host, &task, "with metaguard")?;
        tasks.push((mode, task));
    }
    // The control: without metaguard's rules the same probes pass.
    let m = host.machine()?;
    m.exec_ok(&["systemctl", "stop", "metaguard.service"])?;
    m.exec_ok(&["metaguard", "remove"])?;
    for (mode, task) in &tasks {
        let lab = host.lab()?;
        let spec = lab.http_get("http://169.254.169.254/latest/meta-data/instance-id");
        let r = host.probe(task.first(), &spec)?;
        ensure!(r.ok(), "{mode}: without metaguard's rules: {r:?}");
    }
    Ok(())
}
