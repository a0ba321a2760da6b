//! Docker API discovery against the lab's fake Docker Engine API:
//! `ecs-tasks` finds awsvpc task namespaces through their pause
//! containers, `containers = ["ecs-agent"]` resolves the agent's cgroup so a
//! host can deny `docker` and still allow the agent, and the daemon guards
//! a task that starts while it runs from its first packet.

use std::time::Duration;

use libtest_mimic::Failed;
use metaguard_lab::docker::FakeContainer;
use metaguard_lab::probe::Outcome;
use metaguard_lab::topology::Role;
use metaguard_lab::{Lab, Workload};

use crate::daemon::{first_contact, Daemon};
use crate::enforce::apply;
use crate::ensure;
use crate::support::lab;

pub const TESTS: &[(&str, bool, crate::TestFn)] = &[
    (
        "discovery::ecs_tasks_and_the_ecs_agent_resolve_through_the_docker_api",
        true,
        ecs_tasks_and_the_ecs_agent_resolve_through_the_docker_api,
    ),
    (
        "discovery::daemon_guards_a_task_started_while_it_runs",
        true,
        daemon_guards_a_task_started_while_it_runs,
    ),
    (
        "discovery::without_a_docker_api_ecs_tasks_warns",
        true,
        without_a_docker_api_ecs_tasks_warns,
    ),
];

/// The nft layer resolving containers and tasks (the BPF layer, which
/// does not resolve `containers`, is off: no bpf filesystem in this lab).
fn policy(lab: &Lab) -> String {
    format!(
        r#"[layers]
bpf = false

[[workload]]
name          = "ecs-agent"
containers    = ["ecs-agent"]
imds          = "allow"

[[workload]]
name          = "bridge-containers"
bridges       = ["docker0", "br-*", "ecs-bridge"]
imds          = "deny"

[[workload]]
name          = "awsvpc-tasks"
netns         = ["ecs-tasks"]
imds          = "deny"

[[workload]]
name          = "host-network-containers"
cgroups       = ["{}/docker"]
imds          = "deny"
"#,
        lab.cgroup_root()
    )
}

fn reaches(lab: &Lab, w: Workload) -> Result<bool, Failed> {
    crate::support::imds_answers(
        lab,
        w,
        &Lab::imds_url_v4("/latest/meta-data/instance-id"),
        None,
        w.label(),
    )
}

fn ecs_tasks_and_the_ecs_agent_resolve_through_the_docker_api() -> Result<(), Failed> {
    let mut lab = lab()?;
    lab.start_docker_api()?;
    for w in [Workload::AwsvpcTask, Workload::HostNetwork, Workload::Agent] {
        ensure!(reaches(&lab, w)?, "{} blocked before apply", w.label());
    }
    let text = policy(&lab);
    let path = lab.write_file("policy.toml", &text)?.display().to_string();
    let dry = lab.metaguard(&["apply", "--dry-run", "--config", &path])?;
    let stdout = String::from_utf8_lossy(&dry.stdout);
    ensure!(
        stdout.contains(&format!(
            "# network namespace: /run/netns/{} (workload \"awsvpc-tasks\")",
            lab.netns_name(Role::Task1)
        )),
        "the task namespace was not found through the pause container:\n{stdout}"
    );
    let agent_cg = lab.cgroup_of(Workload::Agent);
    ensure!(
        stdout.contains(&format!("\"{agent_cg}\" : goto wl0")),
        "the agent's cgroup was not resolved:\n{stdout}"
    );
    apply(&lab, Some(&text))?;
    ensure!(
        !reaches(&lab, Workload::AwsvpcTask)?,
        "awsvpc task not blocked"
    );
    ensure!(
        !reaches(&lab, Workload::HostNetwork)?,
        "host-network container not blocked"
    );
    ensure!(reaches(&lab, Workload::Agent)?, "the agent lost IMDS");
    let out = lab.metaguard(&["verify", "--config", &path])?;
    ensure!(
        out.status.success(),
        "verify: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}

fn daemon_guards_a_task_started_while_it_runs() -> Result<(), Failed> {
    let mut lab = lab()?;
    let docker = lab.start_docker_api()?;
    let path = lab
        .write_file("policy.toml", &policy(&lab))?
        .display()
        .to_string();
    let d = Daemon::start(&lab, &path, &[])?;
    // ECS starts a new awsvpc task: the CNI plugin makes its namespace, the
    // agent starts the pause container (Docker emits `start`), then the
    // ENI is plugged in. The task's process tries IMDS all along.
    let ns = lab.add_netns("task3")?;
    let spec = first_contact(&lab, "169.254.169.254");
    let child = lab.spawn_probe_in(&ns, &spec)?;
    let name = "ecs-lab-api-2-internalecspause-1f2e3d";
    docker.start(FakeContainer {
        id: FakeContainer::id_for(&format!("{}-{name}", lab.id())),
        name: name.into(),
        image: "amazon/amazon-ecs-pause:0.1.0".into(),
        labels: [("com.amazonaws.ecs.container-name", "~internal~ecs~pause")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        env: vec![],
        network_mode: "none".into(),
        pid: child.id(),
        sandbox_key: format!("/run/netns/{ns}"),
        user: String::new(),
        cgroup_parent: String::new(),
        running: true,
        addresses: Vec::new(),
    });
    // Its own line: the daemon also guards task1 once Docker first answers
    // (it never asks before it is ready).
    d.wait_log(
        &format!("\"netns\":\"/run/netns/{ns}\""),
        Duration::from_secs(3),
    )?;
    let vpc = lab.netns_name(Role::Vpc);
    lab.ip_in(&vpc, &format!("link add vpc-task3 type veth peer name eth0 netns {ns}\nlink set vpc-task3 master vpcbr up\n"))?;
    lab.ip_in(
        &ns,
        "link set eth0 up\naddr add 10.0.0.23/24 dev eth0\nroute add default via 10.0.0.1\n",
    )?;
    let r = lab.finish_probe(child)?;
    ensure!(
        r.outcome == Outcome::Refused,
        "the new task's first contact was not refused: {r:?}"
    );
    ensure!(
        lab.echo_log()
            .with_header("x-lab-probe", &spec.id)
            .is_empty(),
        "the probe arrived"
    );
    // The pause container stops (the lab keeps its namespace file): the
    // namespace is no longer selected and its table goes.
    docker.stop(name);
    d.wait_log(
        "namespace no longer selected; its table removed",
        Duration::from_secs(3),
    )?;
    ensure!(
        !lab.run_in_named(&ns, "nft", &["list", "tables"])?
            .contains("metaguard"),
        "the stopped task's table is still there"
    );
    Ok(())
}

fn without_a_docker_api_ecs_tasks_warns() -> Result<(), Failed> {
    let lab = lab()?;
    let path = lab
        .write_file("policy.toml", &policy(&lab))?
        .display()
        .to_string();
    let out = lab.metaguard(&["apply", "--config", &path])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "apply: {stderr}");
    ensure!(
        stderr.contains("\"ecs-tasks\" needs the Docker API"),
        "no warning: {stderr}"
    );
    ensure!(
        stderr.contains("containers selectors need the Docker API"),
        "no warning: {stderr}"
    );
    Ok(())
}
