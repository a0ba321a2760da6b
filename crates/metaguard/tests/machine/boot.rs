//! Boot: the stand-ins come up in a booted machine and their containers
//! reach IMDS and task credentials without metaguard (the control every
//! blocked probe is paired with).

use libtest_mimic::Failed;
use metaguard_lab::standin::api::TaskSpec;

use crate::ensure;
use crate::support::booted;

pub const TESTS: &[(&str, crate::TestFn)] = &[(
    "boot::without_metaguard_containers_and_tasks_reach_imds_and_credentials",
    without_metaguard_containers_and_tasks_reach_imds_and_credentials,
)];

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
        let spec = lab.http_get(&task.info.credentials_url());
        let r = host.probe(c, &spec)?;
        ensure!(
            r.ok()
                && r.body
                    .as_deref()
                    .unwrap_or("")
                    .contains(&task.info.role_arn),
            "{mode}: task credentials: {r:?}"
        );
    }
    Ok(())
}
