//! The lab's fake Docker API: containers standing as long-running
//! processes, and the task metadata the agent emulator serves for them.

use std::path::Path;
use std::process::Stdio;

use crate::servers::{self, Bind, ServerThread};
use crate::LabError;

use super::{addr, Lab, Role, Workload};

impl Lab {
    /// Starts a fake Docker Engine API on `<work dir>/docker.sock` that
    /// describes the lab's workloads as an ECS host's dockerd would: the
    /// bridge containers, the awsvpc task's pause container (label
    /// `com.amazonaws.ecs.container-name=~internal~ecs~pause`, its sandbox
    /// the task namespace), a host-network container and `ecs-agent`. Each
    /// is backed by a real process in the workload's namespace and cgroup.
    pub fn start_docker_api(&mut self) -> Result<crate::docker::FakeDocker, LabError> {
        use crate::docker::{FakeContainer, FakeDocker};
        if let Some(d) = &self.docker {
            return Ok(d.clone());
        }
        let socket = self.work_dir().join("docker.sock");
        let docker = FakeDocker::new(&socket);
        let served = docker.clone();
        let s = ServerThread::start(
            self.netns(Role::Host),
            "lab-docker",
            vec![Bind::Unix(socket)],
            move |bound| async move {
                for b in bound {
                    if let servers::Bound::Unix(l) = b {
                        if let Ok(l) = tokio::net::UnixListener::from_std(l) {
                            served.clone().serve(l).await;
                        }
                    }
                }
            },
        )?;
        self.servers.push(s);
        let task_arn =
            "arn:aws:ecs:us-east-1:111122223333:task/lab/0123456789abcdef0123456789abcdef";
        // (workload, container name, image, network mode, labels); the
        // images are the kind an ECS host runs (observe records show them).
        type Row<'a> = (Workload, &'a str, &'a str, &'a str, Vec<(&'a str, &'a str)>);
        let pause = "ecs-lab-api-1-internalecspause-9c8b7a";
        let pause_mode = format!(
            "container:{}",
            FakeContainer::id_for(&format!("{}-{pause}", self.record.id))
        );
        let rows: [Row<'_>; 6] = [
            (
                Workload::BridgeC1,
                "ecs-lab-web-1-app-c1",
                "public.ecr.aws/nginx/nginx:1.27",
                "bridge",
                vec![("com.amazonaws.ecs.container-name", "app")],
            ),
            (
                Workload::BridgeC2,
                "ecs-lab-web-1-sidecar-c2",
                "public.ecr.aws/aws-observability/aws-otel-collector:v0.41.1",
                "bridge",
                vec![("com.amazonaws.ecs.container-name", "sidecar")],
            ),
            (
                Workload::AwsvpcTask,
                pause,
                "amazon/amazon-ecs-pause:0.1.0",
                "none",
                vec![
                    ("com.amazonaws.ecs.container-name", "~internal~ecs~pause"),
                    ("com.amazonaws.ecs.task-arn", task_arn),
                ],
            ),
            // The task's application container joins the pause container's
            // namespace (`container:<id>`): Docker reports no SandboxKey for
            // it, so its namespace file is `/proc/<pid>/ns/net`, another
            // file for the same namespace.
            (
                Workload::AwsvpcTask,
                "ecs-lab-api-1-app-t1",
                "111122223333.dkr.ecr.us-east-1.amazonaws.com/lab-api:2026.12.1",
                &pause_mode,
                vec![
                    ("com.amazonaws.ecs.container-name", "app"),
                    ("com.amazonaws.ecs.task-arn", task_arn),
                ],
            ),
            (
                Workload::HostNetwork,
                "ecs-lab-batch-1-worker-h1",
                "public.ecr.aws/docker/library/python:3.12-slim",
                "host",
                vec![("com.amazonaws.ecs.container-name", "worker")],
            ),
            (
                Workload::Agent,
                "ecs-agent",
                "amazon/amazon-ecs-agent:latest",
                "host",
                vec![],
            ),
        ];
        let mut tmds: Vec<(Workload, String, String, &str)> = Vec::new();
        for (w, name, image, mode, labels) in rows {
            let mut cmd = self.command_in(w, "sleep")?;
            cmd.arg("3600").stdout(Stdio::null()).stderr(Stdio::null());
            let child = cmd.spawn().map_err(|source| LabError::Spawn {
                command: format!("sleep (container {name})"),
                source,
            })?;
            let pid = child.id();
            self.container_procs.push(child);
            let joined = mode.starts_with("container:");
            let sandbox_key = match w.role() {
                Role::Host => String::new(),
                _ if joined => String::new(),
                role => Path::new(metaguard_sys::netns::NETNS_RUN_DIR)
                    .join(self.netns_name(role))
                    .display()
                    .to_string(),
            };
            let id = FakeContainer::id_for(&format!("{}-{name}", self.record.id));
            if !joined {
                tmds.push((w, id.clone(), name.to_string(), mode));
            }
            docker.start(FakeContainer {
                id,
                name: name.to_string(),
                image: image.to_string(),
                labels: labels
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                env: vec![
                    format!(
                        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=/v2/credentials/{}",
                        w.credentials_id()
                    ),
                    format!(
                        "ECS_CONTAINER_METADATA_URI_V4=http://{}/v4/{}",
                        addr::TASK_METADATA_V4,
                        w.tmds_endpoint_id()
                    ),
                ],
                network_mode: mode.to_string(),
                pid,
                sandbox_key,
                user: String::new(),
                cgroup_parent: String::new(),
                running: true,
                addresses: lab_addresses(w),
            });
        }
        self.serve_task_metadata(task_arn, &tmds);
        // `ip netns exec` needs a moment before the sleeps are in place.
        std::thread::sleep(std::time::Duration::from_millis(50));
        self.docker = Some(docker.clone());
        Ok(docker)
    }

    /// Task metadata (v4) for the lab's containers, served by the agent
    /// emulator: the two bridge containers are one task ("web": app and
    /// sidecar), every other container a task of its own. The documents
    /// carry what the real agent's do — ARNs, the cluster, networks,
    /// labels — so that redaction has something to remove.
    pub(super) fn serve_task_metadata(
        &self,
        awsvpc_arn: &str,
        rows: &[(Workload, String, String, &str)],
    ) {
        let doc = |w: Workload, id: &str, name: &str, mode: &str, task_arn: &str| {
            let ip = match w {
                Workload::BridgeC1 => addr::C1_V4.to_string(),
                Workload::BridgeC2 => "172.17.0.3".to_string(),
                Workload::AwsvpcTask => addr::TASK_ENI_V4.to_string(),
                _ => addr::HOST_V4.to_string(),
            };
            crate::agent::container_document(id, name, mode, &ip, task_arn)
        };
        let task = crate::agent::task_document;
        let web = "arn:aws:ecs:us-east-1:111122223333:task/lab/5e1f0c2b9a8d4e7f6a5b4c3d2e1f0a9b";
        let (pair, rest): (Vec<_>, Vec<_>) = rows
            .iter()
            .partition(|(w, ..)| matches!(w, Workload::BridgeC1 | Workload::BridgeC2));
        let containers = pair
            .iter()
            .map(|(w, id, name, mode)| doc(*w, id, name, mode, web))
            .collect();
        let endpoints: Vec<(&str, &str)> = pair
            .iter()
            .map(|(w, id, ..)| (w.tmds_endpoint_id(), id.as_str()))
            .collect();
        self.agent
            .add_task_metadata(task(web, "web", containers), &endpoints);
        for (w, id, name, mode) in rest {
            let arn = if *w == Workload::AwsvpcTask {
                awsvpc_arn.to_string()
            } else {
                format!(
                    "arn:aws:ecs:us-east-1:111122223333:task/lab/{}",
                    w.tmds_endpoint_id()
                )
            };
            self.agent.add_task_metadata(
                task(&arn, name, vec![doc(*w, id, name, mode, &arn)]),
                &[(w.tmds_endpoint_id(), id.as_str())],
            );
        }
    }
}

/// A lab container's addresses on docker0, as Docker reports them.
pub(super) fn lab_addresses(w: Workload) -> Vec<std::net::IpAddr> {
    let last = match w {
        Workload::BridgeC1 => 2,
        Workload::BridgeC2 => 3,
        _ => return Vec::new(),
    };
    vec![
        std::net::Ipv4Addr::new(172, 17, 0, last).into(),
        std::net::Ipv6Addr::new(0xfd00, 0x17, 0, 0, 0, 0, 0, u16::from(last)).into(),
    ]
}
