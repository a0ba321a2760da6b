//! The stand-in ECS agent (`ecs.service`): `ecs-init pre-start`, then the
//! agent itself.
//!
//! * [`pre_start`] installs what ecs-init installs before the agent runs:
//!   the DNAT of 169.254.170.2:80 to 127.0.0.1:51679 for traffic from
//!   `docker0` and `ecs-bridge`, the REDIRECT for host processes, and
//!   `route_localnet=1` (without which the DNAT'd packets are martians,
//!   F1).
//! * [`run`] serves the credentials and task-metadata emulator
//!   ([`AgentEmulator`]) on 127.0.0.1:51679 and a control socket on which
//!   the test asks for tasks (the ECS control plane's part). A task is
//!   started the way the agent starts one: through the Docker API, each
//!   container with `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI` and
//!   `ECS_CONTAINER_METADATA_URI_V4` in its environment and the ECS labels;
//!   an awsvpc task as a pause container (`~internal~ecs~pause`, network
//!   mode `none`) whose namespace the CNI plugins then plug in — `ecs-eth0`
//!   on `ecs-bridge` (169.254.172.N/22, a route to 169.254.170.2 only) and
//!   an ENI (`eth0`, 10.0.0.N/24 and fd00:10::N/64 on the VPC's switch,
//!   the default routes) — and only then the application containers,
//!   joined to it (`container:<pause id>`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Response};
use metaguard_sys::netns::Netns;
use serde_json::{json, Value};

use super::api::{ContainerInfo, TaskInfo, TaskSpec};
use super::client::DockerClient;
use super::dockerd::{iptables_ensure, write_sysctls};
use crate::agent::{container_document, task_document, AgentEmulator};
use crate::cmd;

/// `ecs-init pre-start`.
pub fn pre_start() -> Result<(), String> {
    for rule in &crate::host_rules::ecs_init() {
        iptables_ensure(rule)?;
    }
    write_sysctls(
        Path::new("/proc/self/ns/net"),
        &[("net/ipv4/conf/all/route_localnet", "1")],
    )
}

/// The agent's tasks.
#[derive(Debug)]
struct Agent {
    emulator: AgentEmulator,
    docker: DockerClient,
    state: Mutex<AgentState>,
}

#[derive(Debug, Default)]
struct AgentState {
    started: u32,
    tasks: HashMap<String, Running>,
}

#[derive(Debug, Clone)]
struct Running {
    info: TaskInfo,
    /// Every container id, the pause container's last.
    docker_ids: Vec<String>,
    /// The task's ecs-bridge veth and ENI (host and VPC ends).
    links: Vec<(bool, String)>,
}

fn lock(m: &Mutex<AgentState>) -> std::sync::MutexGuard<'_, AgentState> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A hex string derived from `seed` (ids, ARNs).
fn hex(seed: &str, len: usize) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut out = String::new();
    while out.len() < len {
        for b in seed.bytes().chain(out.clone().into_bytes()) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        out.push_str(&format!("{h:016x}"));
    }
    out.truncate(len);
    out
}

impl Agent {
    fn run_task(&self, spec: &TaskSpec) -> Result<TaskInfo, String> {
        if !matches!(spec.network_mode.as_str(), "bridge" | "awsvpc" | "host") {
            return Err(format!(
                "network mode {:?} (use bridge, awsvpc or host)",
                spec.network_mode
            ));
        }
        if spec.containers.is_empty() {
            return Err("a task needs at least one container".into());
        }
        let n = {
            let mut st = lock(&self.state);
            // A restarted agent counts from 1 again, while an earlier run's
            // awsvpc task may still hold that number's links
            // (`vethtask<n>`): skip the numbers in use.
            loop {
                st.started += 1;
                let veth = format!("vethtask{}", st.started);
                if cmd::run(None, "ip", &["link", "show", &veth], None).is_err() {
                    break st.started;
                }
            }
        };
        let seed = format!("{}/{n}/{}", spec.family, crate::log::now_unix_ms());
        let task_id = hex(&seed, 32);
        let arn = format!("arn:aws:ecs:us-east-1:111122223333:task/lab/{task_id}");
        let credentials_id = format!(
            "{}-{}-credentials",
            spec.family,
            hex(&format!("{seed}/creds"), 8)
        );
        let role_arn = format!("arn:aws:iam::111122223333:role/lab-task-{}", spec.family);
        self.emulator.add_credentials(&credentials_id, &role_arn);
        let labels = |container: &str| {
            json!({
                "com.amazonaws.ecs.cluster": "lab",
                "com.amazonaws.ecs.task-arn": arn,
                "com.amazonaws.ecs.task-definition-family": spec.family,
                "com.amazonaws.ecs.task-definition-version": "1",
                "com.amazonaws.ecs.container-name": container,
            })
        };
        let mut running = Running {
            info: TaskInfo {
                arn: arn.clone(),
                id: task_id.clone(),
                network_mode: spec.network_mode.clone(),
                credentials_id: credentials_id.clone(),
                role_arn,
                containers: Vec::new(),
                pause_id: None,
                eni_ipv4: None,
            },
            docker_ids: Vec::new(),
            links: Vec::new(),
        };
        let result = self.start_containers(spec, n, &seed, &labels, &mut running);
        if let Err(e) = result {
            self.teardown(&running);
            self.emulator.remove_credentials(&credentials_id);
            return Err(e);
        }
        let ip = running
            .info
            .eni_ipv4
            .clone()
            .unwrap_or_else(|| "10.0.0.10".into());
        let docs: Vec<Value> = running
            .info
            .containers
            .iter()
            .map(|c| {
                container_document(&c.docker_id, &c.docker_name, &spec.network_mode, &ip, &arn)
            })
            .collect();
        let endpoints: Vec<(&str, &str)> = running
            .info
            .containers
            .iter()
            .map(|c| (c.tmds_id.as_str(), c.docker_id.as_str()))
            .collect();
        self.emulator
            .add_task_metadata(task_document(&arn, &spec.family, docs), &endpoints);
        let info = running.info.clone();
        lock(&self.state).tasks.insert(task_id, running);
        Ok(info)
    }

    fn start_containers(
        &self,
        spec: &TaskSpec,
        n: u32,
        seed: &str,
        labels: &dyn Fn(&str) -> Value,
        running: &mut Running,
    ) -> Result<(), String> {
        let suffix = hex(&format!("{seed}/name"), 12);
        let mut mode = match spec.network_mode.as_str() {
            "awsvpc" => String::new(),
            m => m.to_string(),
        };
        if spec.network_mode == "awsvpc" {
            let name = format!("ecs-{}-1-internalecspause-{suffix}", spec.family);
            let id = self
                .docker
                .run(
                    &name,
                    &json!({
                        "Image": "amazon/amazon-ecs-pause:0.1.0",
                        "Labels": labels("~internal~ecs~pause"),
                        "HostConfig": {
                            "NetworkMode": "none",
                            "CgroupParent": spec.cgroup_parent.clone().unwrap_or_default(),
                        },
                    }),
                )
                .map_err(|e| e.to_string())?;
            running.docker_ids.push(id.clone());
            let inspect = self.docker.inspect(&id).map_err(|e| e.to_string())?;
            let netns = inspect["NetworkSettings"]["SandboxKey"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let eni = self.plug_awsvpc(n, &netns, running)?;
            running.info.eni_ipv4 = Some(eni.to_string());
            running.info.pause_id = Some(id.clone());
            mode = format!("container:{id}");
        }
        for c in &spec.containers {
            let tmds_id = format!(
                "{}-{}-tmds",
                c.name,
                hex(&format!("{seed}/{}/tmds", c.name), 8)
            );
            let docker_name = format!("ecs-{}-1-{}-{suffix}", spec.family, c.name);
            let env = json!([
                format!(
                    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=/v2/credentials/{}",
                    running.info.credentials_id
                ),
                format!("ECS_CONTAINER_METADATA_URI_V4=http://169.254.170.2/v4/{tmds_id}"),
                format!("ECS_CONTAINER_METADATA_URI=http://169.254.170.2/v3/{tmds_id}"),
                "AWS_EXECUTION_ENV=AWS_ECS_EC2".to_string(),
            ]);
            let id = self
                .docker
                .run(
                    &docker_name,
                    &json!({
                        "Image": "public.ecr.aws/lab/app:latest",
                        "Env": env,
                        "User": c.user.map(|u| u.to_string()).unwrap_or_default(),
                        "Labels": labels(&c.name),
                        "HostConfig": {
                            "NetworkMode": mode,
                            "CgroupParent": spec.cgroup_parent.clone().unwrap_or_default(),
                        },
                    }),
                )
                .map_err(|e| e.to_string())?;
            // Application containers stop before the pause container.
            running.docker_ids.insert(0, id.clone());
            let inspect = self.docker.inspect(&id).map_err(|e| e.to_string())?;
            running.info.containers.push(ContainerInfo {
                name: c.name.clone(),
                docker_name,
                docker_id: id,
                pid: inspect["State"]["Pid"].as_u64().unwrap_or(0) as u32,
                tmds_id,
            });
        }
        Ok(())
    }

    /// The CNI plugins' work for an awsvpc task: `ecs-eth0` on ecs-bridge
    /// and the ENI on the VPC's switch. Returns the ENI's IPv4 address.
    fn plug_awsvpc(&self, n: u32, netns: &str, running: &mut Running) -> Result<Ipv4Addr, String> {
        if netns.is_empty() {
            return Err("the pause container has no network namespace".into());
        }
        let host_part = 100 + (n % 150) as u8;
        let bridge_part = 1 + (n % 1000) as u16;
        if cmd::run(None, "ip", &["link", "show", "ecs-bridge"], None).is_err() {
            cmd::run(
                None,
                "ip",
                &["-batch", "-"],
                Some(
                    "link add ecs-bridge type bridge
addr add 169.254.172.1/22 dev ecs-bridge
link set ecs-bridge up
",
                ),
            )
            .map_err(|e| e.to_string())?;
        }
        let veth = format!("vethtask{n}");
        running.links.push((true, veth.clone()));
        cmd::run(
            None,
            "ip",
            &["-batch", "-"],
            Some(&format!(
                "link add {veth} type veth peer name ecs-eth0 netns {netns}
link set {veth} master ecs-bridge up
"
            )),
        )
        .map_err(|e| e.to_string())?;
        let vpc = Netns::open(super::VPC_NETNS).map_err(|e| e.to_string())?;
        let eni = format!("eni{n}");
        running.links.push((false, eni.clone()));
        cmd::ip_batch(
            &vpc,
            &format!(
                "link add {eni} type veth peer name eth0 netns {netns}
link set {eni} master vpcbr up
"
            ),
        )
        .map_err(|e| e.to_string())?;
        let task = Netns::open(netns).map_err(|e| e.to_string())?;
        let b_hi = 172 + bridge_part / 256;
        let b_lo = bridge_part % 256;
        cmd::ip_batch(
            &task,
            &format!(
                "link set ecs-eth0 up
addr add 169.254.{b_hi}.{b_lo}/22 dev ecs-eth0
route add 169.254.170.2/32 via 169.254.172.1 dev ecs-eth0
link set eth0 up
addr add 10.0.0.{host_part}/24 dev eth0
addr add fd00:10::{host_part:x}/64 dev eth0 nodad
route add default via 10.0.0.1
route add default via fd00:10::1
"
            ),
        )
        .map_err(|e| e.to_string())?;
        Ok(Ipv4Addr::new(10, 0, 0, host_part))
    }

    fn teardown(&self, running: &Running) {
        for id in &running.docker_ids {
            let _ = self.docker.remove(id);
        }
        for (host, link) in &running.links {
            if *host {
                let _ = cmd::run(None, "ip", &["link", "del", link], None);
            } else if let Ok(vpc) = Netns::open(super::VPC_NETNS) {
                let _ = cmd::ip_batch(&vpc, &format!("link del {link}\n"));
            }
        }
    }

    fn stop_task(&self, id: &str) -> Result<(), String> {
        let running = lock(&self.state)
            .tasks
            .remove(id)
            .ok_or_else(|| format!("no task {id}"))?;
        self.teardown(&running);
        self.emulator
            .remove_credentials(&running.info.credentials_id);
        Ok(())
    }

    fn control(&self, method: &Method, path: &str, body: &[u8]) -> (u16, Value) {
        match (method.as_str(), path) {
            ("POST", "/tasks") => match serde_json::from_slice::<TaskSpec>(body) {
                Ok(spec) => match self.run_task(&spec) {
                    Ok(info) => (201, serde_json::to_value(info).unwrap_or_default()),
                    Err(e) => (500, json!({ "message": e })),
                },
                Err(e) => (400, json!({ "message": format!("bad task spec: {e}") })),
            },
            ("DELETE", p) if p.starts_with("/tasks/") => {
                match self.stop_task(&p["/tasks/".len()..]) {
                    Ok(()) => (200, json!({})),
                    Err(e) => (404, json!({ "message": e })),
                }
            }
            ("GET", "/requests") => (
                200,
                serde_json::to_value(self.emulator.log().entries()).unwrap_or_default(),
            ),
            _ => (404, json!({ "message": "page not found" })),
        }
    }
}

/// `mglab-standin ecs-agent`: the credentials endpoint and the control
/// socket, until SIGTERM (then every task is stopped).
pub fn run() -> Result<(), String> {
    let agent = Arc::new(Agent {
        emulator: AgentEmulator::new(),
        docker: DockerClient::new(super::DOCKER_SOCKET),
        state: Mutex::default(),
    });
    let control_path = Path::new(super::CONTROL_DIR).join(super::CONTROL_SOCKET);
    let _ = std::fs::remove_file(&control_path);
    let control = std::os::unix::net::UnixListener::bind(&control_path)
        .map_err(|e| format!("{}: {e}", control_path.display()))?;
    control.set_nonblocking(true).map_err(|e| e.to_string())?;
    let credentials = std::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 51679)))
        .map_err(|e| format!("127.0.0.1:51679: {e}"))?;
    credentials
        .set_nonblocking(true)
        .map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let served = agent.clone();
    rt.block_on(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
        let credentials =
            tokio::net::TcpListener::from_std(credentials).map_err(|e| e.to_string())?;
        let emulator = served.emulator.clone();
        tokio::spawn(async move { emulator.serve(credentials).await });
        let control = tokio::net::UnixListener::from_std(control).map_err(|e| e.to_string())?;
        tokio::spawn(serve_control(control, served));
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        eprintln!("ecs-agent (lab stand-in): credentials on 127.0.0.1:51679");
        let _ = term.recv().await;
        Ok::<(), String>(())
    })?;
    let ids: Vec<String> = lock(&agent.state).tasks.keys().cloned().collect();
    for id in ids {
        let _ = agent.stop_task(&id);
    }
    Ok(())
}

async fn serve_control(listener: tokio::net::UnixListener, agent: Arc<Agent>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let agent = agent.clone();
                async move {
                    let (parts, body) = req.into_parts();
                    let body = body
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let path = parts.uri.path().to_string();
                    let (status, value) = tokio::task::spawn_blocking(move || {
                        agent.control(&parts.method, &path, &body)
                    })
                    .await
                    .unwrap_or((500, json!({"message": "control handler panicked"})));
                    let resp = Response::builder()
                        .status(status)
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(value.to_string())))
                        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())));
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}
