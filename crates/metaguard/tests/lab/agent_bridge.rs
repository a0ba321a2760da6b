//! The ECS agent on a bridge (issue 24): the agent runs in a container on
//! `docker0` (the lab's c2 namespace), a `containers = ["ecs-agent"]`
//! workload listed before `bridge-containers` lets it reach IMDS, and
//! every other container on `docker0` is refused — matched by the agent's
//! bridge port, never its address.

use std::process::{Child, Stdio};

use libtest_mimic::Failed;
use metaguard_lab::docker::{FakeContainer, FakeDocker};
use metaguard_lab::probe::Outcome;
use metaguard_lab::topology::Role;
use metaguard_lab::{Lab, Workload};

use crate::enforce::apply;
use crate::ensure;
use crate::support::lab;

pub const TESTS: &[(&str, bool, crate::TestFn)] = &[(
    "agent_bridge::the_agent_on_docker0_reaches_imds_and_its_neighbours_do_not",
    true,
    the_agent_on_docker0_reaches_imds_and_its_neighbours_do_not,
)];

/// The agent's workload ahead of the bridges (nft only: no bpf
/// filesystem in this lab).
pub const POLICY: &str = r#"[layers]
bpf = false

[[workload]]
name          = "ecs-agent"
containers    = ["ecs-agent"]
imds          = "allow"

[[workload]]
name          = "bridge-containers"
bridges       = ["docker0", "br-*", "ecs-bridge"]
imds          = "deny"
task_metadata = "allow"

[[workload]]
name          = "awsvpc-tasks"
netns         = ["ecs-tasks"]
imds          = "deny"
"#;

/// The workload whose namespace the agent's container gets.
pub const AGENT: Workload = Workload::BridgeC2;
pub const AGENT_ROLE: Role = Role::C2;

/// Its process; ended (by pid) when dropped.
pub struct AgentContainer {
    child: Child,
}

impl Drop for AgentContainer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Moves the lab's `ecs-agent` container off the host network onto
/// `docker0`: Docker lists it in c2's namespace (whose sidecar container
/// is gone), as `docker run --name ecs-agent` without `--net host` would.
pub fn agent_on_docker0(lab: &Lab, docker: &FakeDocker) -> Result<AgentContainer, Failed> {
    docker.stop("ecs-agent");
    docker.stop("ecs-lab-web-1-sidecar-c2");
    agent_container(lab, docker, "agent-1")
}

/// Starts a container named `ecs-agent` in c2's namespace (id from `tag`).
pub fn agent_container(
    lab: &Lab,
    docker: &FakeDocker,
    tag: &str,
) -> Result<AgentContainer, Failed> {
    let mut cmd = lab.command_in(AGENT, "sleep")?;
    cmd.arg("3600").stdout(Stdio::null()).stderr(Stdio::null());
    let child = cmd.spawn()?;
    let id = FakeContainer::id_for(&format!("{}-ecs-agent-{tag}", lab.id()));
    docker.start(FakeContainer {
        id,
        name: "ecs-agent".into(),
        image: "amazon/amazon-ecs-agent:latest".into(),
        labels: Default::default(),
        env: vec![],
        network_mode: "bridge".into(),
        pid: child.id(),
        sandbox_key: format!("/run/netns/{}", lab.netns_name(AGENT_ROLE)),
        user: String::new(),
        cgroup_parent: String::new(),
        running: true,
    });
    Ok(AgentContainer { child })
}

/// Whether `w` gets IMDS (v6 or v4); a refusal must be fast and nothing
/// may arrive at the emulator.
pub fn imds_reaches(lab: &Lab, w: Workload, v6: bool) -> Result<bool, Failed> {
    let url = if v6 {
        Lab::imds_url_v6("/latest/meta-data/instance-id")
    } else {
        Lab::imds_url_v4("/latest/meta-data/instance-id")
    };
    let mut spec = lab.http_get(&url);
    spec.timeout_ms = 2000;
    let r = lab.probe(w, &spec)?;
    let arrived = !lab
        .imds()
        .log()
        .with_header("x-lab-probe", &spec.id)
        .is_empty();
    ensure!(
        r.ok() == arrived,
        "{} (v6 {v6}): client and server disagree: {r:?}",
        w.label()
    );
    if !r.ok() {
        ensure!(
            matches!(r.outcome, Outcome::Refused | Outcome::Unreachable),
            "{} (v6 {v6}): not rejected fast: {r:?}",
            w.label()
        );
    }
    Ok(r.ok())
}

fn the_agent_on_docker0_reaches_imds_and_its_neighbours_do_not() -> Result<(), Failed> {
    let mut lab = lab()?;
    let docker = lab.start_docker_api()?;
    let _agent = agent_on_docker0(&lab, &docker)?;
    // Open without metaguard, for both.
    for w in [AGENT, Workload::BridgeC1] {
        for v6 in [false, true] {
            ensure!(
                imds_reaches(&lab, w, v6)?,
                "{} (v6 {v6}) blocked before apply",
                w.label()
            );
        }
    }
    let path = apply(&lab, Some(POLICY))?;
    for v6 in [false, true] {
        ensure!(
            imds_reaches(&lab, AGENT, v6)?,
            "the agent on docker0 lost IMDS (v6 {v6})"
        );
        ensure!(
            !imds_reaches(&lab, Workload::BridgeC1, v6)?,
            "its neighbour on docker0 reaches IMDS (v6 {v6})"
        );
    }
    ensure!(
        !imds_reaches(&lab, Workload::AwsvpcTask, false)?,
        "the awsvpc task reaches IMDS"
    );
    let out = lab.metaguard(&["verify", "--config", &path])?;
    ensure!(
        out.status.success(),
        "verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
