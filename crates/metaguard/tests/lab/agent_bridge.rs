//! The ECS agent on a bridge (issue 24): the agent runs in a container on
//! `docker0` (the lab's c2 namespace), a `containers = ["ecs-agent"]`
//! workload listed before `bridge-containers` lets it reach IMDS, and
//! every other container on `docker0` is refused — matched by the agent's
//! bridge port, never its address.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use metaguard_lab::agent::AgentEmulator;
use metaguard_lab::docker::{FakeContainer, FakeDocker};
use metaguard_lab::probe::Outcome;
use metaguard_lab::topology::Role;
use metaguard_lab::{Lab, Workload};

use crate::daemon::Daemon;
use crate::enforce::apply;
use crate::ensure;
use crate::support::lab;

pub const TESTS: &[(&str, bool, crate::TestFn)] = &[
    (
        "agent_bridge::the_agent_on_docker0_reaches_imds_and_its_neighbours_do_not",
        true,
        the_agent_on_docker0_reaches_imds_and_its_neighbours_do_not,
    ),
    (
        "agent_bridge::credentials_are_relayed_to_the_agents_container_and_follow_it",
        true,
        credentials_are_relayed_to_the_agents_container_and_follow_it,
    ),
    (
        "agent_bridge::demo_shows_the_agent_on_a_bridge",
        true,
        demo_shows_the_agent_on_a_bridge,
    ),
];

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
    agent_container(
        lab,
        docker,
        &lab.netns_name(AGENT_ROLE),
        "agent-1",
        &["172.17.0.3", "fd00:17::3"],
    )
}

/// Starts a container named `ecs-agent` in lab namespace `ns` (id from
/// `tag`) with `addresses`.
pub fn agent_container(
    lab: &Lab,
    docker: &FakeDocker,
    ns: &str,
    tag: &str,
    addresses: &[&str],
) -> Result<AgentContainer, Failed> {
    let child = Command::new("ip")
        .args(["netns", "exec", ns, "sleep", "3600"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let id = FakeContainer::id_for(&format!("{}-ecs-agent-{tag}", lab.id()));
    docker.start(FakeContainer {
        id,
        name: "ecs-agent".into(),
        image: "amazon/amazon-ecs-agent:latest".into(),
        labels: Default::default(),
        env: vec![],
        network_mode: "bridge".into(),
        pid: child.id(),
        sandbox_key: format!("/run/netns/{ns}"),
        user: String::new(),
        cgroup_parent: String::new(),
        running: true,
        addresses: addresses
            .iter()
            .map(|a| a.parse())
            .collect::<Result<_, _>>()?,
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
    crate::support::imds_answers(
        lab,
        w,
        &url,
        Some(2000),
        &format!("{} (v6 {v6})", w.label()),
    )
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
    // doctor takes the exception's port map for this version's, not for
    // another version's table (F23).
    let out = lab.metaguard(&["doctor", "--json", "--config", &path])?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "doctor --json: {e}: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    let ids: Vec<&str> = report["findings"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["id"].as_str())
        .collect();
    ensure!(
        !ids.contains(&"F23"),
        "doctor names F23 for the exceptions: {ids:?}\n{report}"
    );
    Ok(())
}

/// The agent on a bridge, behind the relay: credentials for bridge
/// containers and awsvpc tasks through 169.254.170.2, the relay sending
/// them to the agent's container found through the Docker API.
pub use metaguard_lab::topology::AGENT_ON_BRIDGE_POLICY as RELAY_POLICY;

/// An agent emulator holding every lab workload's credentials.
fn agent_emulator() -> AgentEmulator {
    let a = AgentEmulator::new();
    for w in Workload::ALL {
        a.add_credentials(w.credentials_id(), "arn:aws:iam::111122223333:role/lab");
    }
    a
}

/// Requests `a` answered whose target holds `needle` (the relay does not
/// forward the probes' own headers).
fn hits(a: &AgentEmulator, needle: &str) -> usize {
    a.log()
        .entries()
        .iter()
        .filter(|e| e.target.contains(needle))
        .count()
}

/// `w` fetches its own task credentials through 169.254.170.2: whether it
/// got them, and how many requests for them each of `agents` had seen
/// before.
fn credentials(
    lab: &Lab,
    w: Workload,
    agents: &[&AgentEmulator],
) -> Result<(bool, Vec<usize>), Failed> {
    let id = w.credentials_id();
    let before = agents.iter().map(|a| hits(a, id)).collect();
    let mut spec = lab.http_get(&Lab::credentials_url(w));
    spec.timeout_ms = 2000;
    let r = lab.probe(w, &spec)?;
    Ok((r.ok(), before))
}

/// Which of `agents` served `w`'s last credentials request.
fn served(w: Workload, agents: &[&AgentEmulator], before: &[usize]) -> Vec<bool> {
    agents
        .iter()
        .zip(before)
        .map(|(a, b)| hits(a, w.credentials_id()) > *b)
        .collect()
}

fn credentials_are_relayed_to_the_agents_container_and_follow_it() -> Result<(), Failed> {
    let mut lab = lab()?;
    let docker = lab.start_docker_api()?;
    let agent = agent_on_docker0(&lab, &docker)?;
    let first = agent_emulator();
    let c2 = lab.netns_name(AGENT_ROLE);
    lab.serve_agent_in(&c2, &first, "0.0.0.0:51679".parse()?)?;
    // A host-network service on 0.0.0.0:80 (F10: the recipe publishes no
    // port, so the host keeps it).
    let web = AgentEmulator::new();
    let host = lab.netns_name(Role::Host);
    lab.serve_agent_in(&host, &web, "0.0.0.0:80".parse()?)?;
    // Without metaguard a neighbour reaches the agent's port directly.
    let direct = format!(
        "http://172.17.0.3:51679/v2/credentials/{}",
        Workload::AwsvpcTask.credentials_id()
    );
    let r = lab.probe(Workload::BridgeC1, &lab.http_get(&direct))?;
    ensure!(
        r.ok(),
        "the agent's port is not open before metaguard: {r:?}"
    );
    let path = lab
        .write_file("relay.toml", RELAY_POLICY)?
        .display()
        .to_string();
    let d = Daemon::start(&lab, &path, &[])?;
    // Docker is asked once the daemon is ready; the relay has the agent
    // once the rules guard its port.
    wait_for_agent_guard(&lab, "vethc2")?;
    ensure!(
        lab.wait_for_credentials(Workload::BridgeC1, Duration::from_secs(5)),
        "the relay served no credentials within 5 s:\n{}",
        d.log_text()
    );

    // Bridge container and awsvpc task: relayed to the agent's container.
    for w in [Workload::BridgeC1, Workload::AwsvpcTask] {
        let agents = [&first, lab.agent()];
        let (ok, before) = credentials(&lab, w, &agents)?;
        ensure!(ok, "{}: no credentials through the relay", w.label());
        ensure!(
            served(w, &agents, &before) == [true, false],
            "{}: not served by the agent's container alone",
            w.label()
        );
    }
    // A neighbour asking the agent's address directly, for another
    // task's id: nothing arrives (F13 not bypassed). Dropped, not
    // rejected: the bridge family has no reject without nft_reject_bridge.
    for url in [
        format!(
            "http://172.17.0.3:51679/v2/credentials/{}",
            Workload::AwsvpcTask.credentials_id()
        ),
        format!(
            "http://[fd00:17::3]:51679/v2/credentials/{}",
            Workload::AwsvpcTask.credentials_id()
        ),
    ] {
        let mut spec = lab.http_get(&url);
        spec.timeout_ms = 500;
        let r = lab.probe(Workload::BridgeC1, &spec)?;
        ensure!(
            r.outcome == Outcome::Timeout,
            "direct access to the agent was not cut: {r:?}"
        );
        ensure!(
            first.log().with_header("x-lab-probe", &spec.id).is_empty(),
            "direct access arrived: {url}"
        );
    }
    // A host process other than the relay: cut as well.
    let mut spec = lab.http_get("http://172.17.0.3:51679/v1/credentials?id=x");
    spec.timeout_ms = 500;
    let r = lab.probe(Workload::HostOther, &spec)?;
    ensure!(
        r.outcome == Outcome::Timeout,
        "a host process reached the agent: {r:?}"
    );
    // The host-network service on :80 serves.
    let mut spec = lab.http_get("http://10.0.0.10:80/v2/credentials/none");
    spec.timeout_ms = 2000;
    let r = lab.probe(Workload::HostOther, &spec)?;
    ensure!(
        r.outcome == Outcome::Answered && web.log().with_header("x-lab-probe", &spec.id).len() == 1,
        "the host's own service on port 80 did not answer: {r:?}"
    );

    // The agent moves: a new container on docker0 with a new address; c2
    // keeps the old address and (a squatter now) still listens on :51679.
    let ns = lab.add_netns("agent2")?;
    lab.ip_in(
        &host,
        // The lab's docker0 has no fixed MAC (Docker sets one): a port
        // with a lower MAC would change the bridge's, and c1's ARP entry
        // for its gateway would point at the old one for up to a minute
        // (its packets dropped as not for this host). So the new port's
        // MAC is high.
        &format!("link add vagent2 address fe:ff:ff:00:00:09 type veth peer name eth0 netns {ns}\nlink set vagent2 master docker0 up\n"),
    )?;
    lab.ip_in(
        &ns,
        "link set eth0 up\naddr add 172.17.0.9/16 dev eth0\naddr add fd00:17::9/64 dev eth0 nodad\nroute add default via 172.17.0.1\nroute add default via fd00:17::1\n",
    )?;
    let second = agent_emulator();
    lab.serve_agent_in(&ns, &second, "0.0.0.0:51679".parse::<SocketAddr>()?)?;
    docker.stop("ecs-agent");
    drop(agent);
    let started = Instant::now();
    let _moved = agent_container(&lab, &docker, &ns, "agent-2", &["172.17.0.9", "fd00:17::9"])?;
    let before = first.log().entries().len();
    let mut followed = None;
    let mut tries = Vec::new();
    while started.elapsed() < Duration::from_secs(3) {
        let agents = [&second];
        let before: Vec<usize> = agents
            .iter()
            .map(|a| hits(a, Workload::BridgeC1.credentials_id()))
            .collect();
        let mut spec = lab.http_get(&Lab::credentials_url(Workload::BridgeC1));
        spec.timeout_ms = 2000;
        let r = lab.probe(Workload::BridgeC1, &spec)?;
        tries.push(format!(
            "{:?} {:?} {} us (at {} ms)",
            r.outcome,
            r.status,
            r.elapsed_us,
            started.elapsed().as_millis()
        ));
        let ok = r.ok();
        if ok && served(Workload::BridgeC1, &agents, &before) == [true] {
            followed = Some(started.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let Some(took) = followed else {
        return Err(format!(
            "credentials did not follow the agent within 3 s: {tries:?}\n{}\n{}\n{}",
            lab.run_in(Role::Host, "ss", &["-tan"])?,
            lab.run_in(Role::Host, "nft", &["list", "table", "bridge", "metaguard"])?,
            d.log_text()
        )
        .into());
    };
    eprintln!(
        "agent moved: credentials from its new container after {} ms",
        took.as_millis()
    );
    ensure!(
        took < Duration::from_secs(1),
        "credentials followed the agent only after {took:?}"
    );
    for w in [Workload::BridgeC1, Workload::AwsvpcTask] {
        let agents = [&second, &first];
        let (ok, before) = credentials(&lab, w, &agents)?;
        let got = served(w, &agents, &before);
        ensure!(
            ok && got == [true, false],
            "{}: not relayed to the moved agent alone (ok {ok}, served by [moved, old] {got:?}):\n{}",
            w.label(),
            d.log_text()
        );
    }
    // The squatter on the old address got nothing relayed, and it is no
    // longer allowed IMDS; the moved agent is.
    ensure!(
        first.log().entries().len() == before,
        "the container on the agent's old address was sent a request"
    );
    ensure!(
        !imds_reaches(&lab, AGENT, false)?,
        "the squatter on the agent's old address reaches IMDS"
    );
    let mut spec = lab.http_get(&Lab::imds_url_v4("/latest/meta-data/instance-id"));
    spec.timeout_ms = 2000;
    let r = lab
        .spawn_probe_in(&ns, &spec)
        .and_then(|c| lab.finish_probe(c))?;
    ensure!(r.ok(), "the moved agent lost IMDS: {r:?}");
    // Someone deletes the bridge table (the moved agent's port guard): the
    // daemon puts it back.
    lab.run_in(
        Role::Host,
        "nft",
        &["delete", "table", "bridge", "metaguard"],
    )?;
    let deleted = Instant::now();
    loop {
        let t = lab.run_in(Role::Host, "nft", &["list", "tables"])?;
        if t.contains("table bridge metaguard") {
            eprintln!(
                "bridge table back after {} ms",
                deleted.elapsed().as_millis()
            );
            break;
        }
        ensure!(
            deleted.elapsed() < Duration::from_secs(2),
            "the daemon did not put the bridge table back:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    Ok(())
}

fn demo_shows_the_agent_on_a_bridge() -> Result<(), Failed> {
    let out = Command::new(crate::support::exe())
        .args(["demo", "--agent-on-bridge", "--color", "never"])
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "demo failed: {stderr}");
    // After: IMDS v4, v6, task credentials.
    for (row, after) in [
        ("bridge container", [false, false, true]),
        ("ECS agent (bridge)", [true, true, true]),
        ("awsvpc task", [false, false, true]),
    ] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(row))
            .ok_or(format!("no row {row}:\n{stdout}"))?;
        let parts: Vec<&str> = line.split('│').collect();
        ensure!(parts.len() == 3, "row {row}: {line}");
        let cells: Vec<&str> = parts[2]
            .split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .collect();
        ensure!(cells.len() == 3, "after: row {row}: {cells:?}");
        for (cell, reach) in cells.iter().zip(after) {
            ensure!(
                cell.starts_with("reached 200") == reach,
                "after: row {row}: {cell:?} (expected reached={reach}):\n{stdout}"
            );
        }
    }
    ensure!(stdout.contains("with metaguard daemon"), "{stdout}");
    Ok(())
}

/// Waits (5 s at most) until the bridge table guards the agent's port
/// `port`.
fn wait_for_agent_guard(lab: &Lab, port: &str) -> Result<(), Failed> {
    let started = Instant::now();
    loop {
        let t = lab.run_in(Role::Host, "nft", &["list", "table", "bridge", "metaguard"]);
        if t.is_ok_and(|t| t.contains("chain agent_output") && t.contains(port)) {
            return Ok(());
        }
        ensure!(
            started.elapsed() < Duration::from_secs(5),
            "the agent's port {port} is not guarded after 5 s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
