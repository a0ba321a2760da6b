//! The ECS agent on a bridge (issue 24), for the demo: the lab's
//! `ecs-agent` container moves off the host network into c2's namespace on
//! docker0 (c2's sidecar container is gone), where an agent emulator holding
//! every workload's credentials serves port 51679; the policy lets it reach
//! IMDS by its bridge port and relays task credentials to it.

use std::path::Path;
use std::process::Stdio;

use crate::docker::FakeContainer;
use crate::LabError;

use super::{Lab, Role, Workload};

/// The workload whose namespace the agent's container takes.
pub const AGENT_ON_BRIDGE: Workload = Workload::BridgeC2;

/// Its row label in the demo.
pub const AGENT_ON_BRIDGE_LABEL: &str = "ECS agent (bridge)";

/// The recipe's policy (docs/deploy.md, "The ECS agent on a bridge"); the
/// nft layer only (no bpf filesystem in the lab).
pub const AGENT_ON_BRIDGE_POLICY: &str = r#"[layers]
bpf = false

# Every credentials request goes to the agent's container (no answer
# cache): what is shown is where the relay sends it.
[proxy]
cache = false

[agent]
credentials = "container:ecs-agent:51679"

[[workload]]
name          = "ecs-agent"
containers    = ["ecs-agent"]
imds          = "allow"

[[workload]]
name          = "bridge-containers"
bridges       = ["docker0", "br-*", "ecs-bridge"]
imds          = "deny"
task_metadata = "proxy"

[[workload]]
name          = "awsvpc-tasks"
netns         = ["ecs-tasks"]
imds          = "deny"
task_metadata = "proxy"
"#;

impl Lab {
    /// Starts the Docker API (if not yet) with `ecs-agent` as a bridge
    /// container in c2's namespace (172.17.0.3, fd00:17::3), and serves the
    /// lab's agent emulator there on port 51679.
    pub fn move_agent_to_bridge(&mut self) -> Result<(), LabError> {
        let docker = self.start_docker_api()?;
        docker.stop("ecs-agent");
        docker.stop("ecs-lab-web-1-sidecar-c2");
        let mut cmd = self.command_in(AGENT_ON_BRIDGE, "sleep")?;
        cmd.arg("3600").stdout(Stdio::null()).stderr(Stdio::null());
        let child = cmd.spawn().map_err(|source| LabError::Spawn {
            command: "sleep (container ecs-agent on docker0)".into(),
            source,
        })?;
        let pid = child.id();
        self.container_procs.push(child);
        let ns = self.netns_name(Role::C2);
        docker.start(FakeContainer {
            id: FakeContainer::id_for(&format!("{}-ecs-agent-bridge", self.record.id)),
            name: "ecs-agent".into(),
            image: "amazon/amazon-ecs-agent:latest".into(),
            labels: Default::default(),
            env: Vec::new(),
            network_mode: "bridge".into(),
            pid,
            sandbox_key: Path::new(metaguard_sys::netns::NETNS_RUN_DIR)
                .join(&ns)
                .display()
                .to_string(),
            user: String::new(),
            cgroup_parent: String::new(),
            running: true,
            addresses: super::docker::lab_addresses(AGENT_ON_BRIDGE),
        });
        let agent = self.agent.clone();
        self.serve_agent_in(
            &ns,
            &agent,
            std::net::SocketAddr::from(([0, 0, 0, 0], super::addr::AGENT_PORT)),
        )
    }

    /// Waits until `w` gets its task credentials (the daemon's relay has
    /// the agent's container, after the Docker events it was started with),
    /// `within` at most; whether it did.
    pub fn wait_for_credentials(&self, w: Workload, within: std::time::Duration) -> bool {
        let started = std::time::Instant::now();
        while started.elapsed() < within {
            let mut spec = self.http_get(&Lab::credentials_url(w));
            spec.timeout_ms = 500;
            if self.probe(w, &spec).is_ok_and(|r| r.ok()) {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        false
    }
}
