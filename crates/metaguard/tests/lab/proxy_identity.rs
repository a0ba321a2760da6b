//! Who a caller of the proxy is, and who owns an id, exactly as the
//! contract says (interface.md, "Caller identity and credentials
//! ownership"): `netns` selectors match by namespace identity, with or
//! without a Docker API; task-metadata endpoint ids of a proxied workload
//! are refused to allow workloads' callers like its credentials ids; and
//! the ids of a container that stops are refused to everyone within a
//! second — also to a new container on its bridge port. Every refusal is
//! paired with the same request answered without metaguard, and the agent
//! emulator's log shows the refused ones never arrived.

use std::time::{Duration, Instant};

use libtest_mimic::Failed;
use metaguard_lab::docker::FakeContainer;
use metaguard_lab::probe::ProbeResult;
use metaguard_lab::topology::Role;
use metaguard_lab::{Lab, Workload};

use crate::daemon::Daemon;
use crate::ensure;
use crate::proxy::{
    agent_hits, audit_lines, curl_with_status, get, instance_id_with_token, json_body,
};
use crate::support::lab;

pub const TESTS: &[(&str, bool, crate::TestFn)] = &[
    (
        "proxy_identity::netns_selected_namespaces_are_their_own_workloads_without_a_docker_api",
        true,
        netns_selected_namespaces_are_their_own_workloads_without_a_docker_api,
    ),
    (
        "proxy_identity::tmds_ids_of_a_proxied_workload_are_refused_to_allow_callers",
        true,
        tmds_ids_of_a_proxied_workload_are_refused_to_allow_callers,
    ),
    (
        "proxy_identity::a_stopped_containers_ids_are_refused_to_everyone_within_a_second",
        true,
        a_stopped_containers_ids_are_refused_to_everyone_within_a_second,
    ),
    (
        "proxy_identity::a_tasks_imdsv2_token_outlives_changes_in_its_listed_containers",
        true,
        a_tasks_imdsv2_token_outlives_changes_in_its_listed_containers,
    ),
];

/// A GET from lab namespace `netns` (no cgroup).
fn get_in(lab: &Lab, netns: &str, url: &str) -> Result<ProbeResult, Failed> {
    let child = lab.spawn_probe_in(netns, &lab.http_get(url))?;
    Ok(lab.finish_probe(child)?)
}

fn credentials_url(id: &str) -> String {
    format!("http://169.254.170.2/v2/credentials/{id}")
}

/// A 403 whose rule contains `rule`.
fn refused(r: &ProbeResult, rule: &str) -> bool {
    r.status == Some(403)
        && json_body(r)["rule"]
            .as_str()
            .is_some_and(|s| s.contains(rule))
}

fn netns_selected_namespaces_are_their_own_workloads_without_a_docker_api() -> Result<(), Failed> {
    let mut lab = lab()?;
    // A namespace a CNI plugin made and no Docker API lists, hanging off
    // docker0 like a container.
    let cni = lab.add_docker0_netns("cni1", "vethcni1", "172.17.0.50")?;
    let cni_id = "cni1-5e2d9a41-credentials";
    lab.agent()
        .add_credentials(cni_id, "arn:aws:iam::111122223333:role/lab-cni1");
    let c1_id = Workload::BridgeC1.credentials_id();
    let task_id = Workload::AwsvpcTask.credentials_id();
    // Without metaguard the CNI namespace gets anyone's credentials.
    let r = get_in(&lab, &cni, &credentials_url(c1_id))?;
    ensure!(r.ok(), "without metaguard, through ecs-init's DNAT: {r:?}");
    // The namespace workloads first: the CNI namespace by a glob, the
    // awsvpc task (which reaches 169.254.170.2 through ecs-bridge) by its
    // path; then the bridges. No Docker API: every id is configured.
    let audit = lab.work_dir().join("audit-identity.jsonl");
    let policy = format!(
        r#"[proxy]
audit_log = "{audit}"

[[workload]]
name            = "cni"
netns           = ["/run/netns/{prefix}-cni*"]
task_metadata   = "proxy"
credentials_ids = ["{cni_id}"]

[[workload]]
name            = "awsvpc"
netns           = ["/run/netns/{task}"]
task_metadata   = "proxy"
credentials_ids = ["{task_id}"]

[[workload]]
name            = "bridge-containers"
bridges         = ["docker0", "ecs-bridge"]
imds            = "deny"
task_metadata   = "proxy"
credentials_ids = ["{c1_id}"]

[layers]
bpf = false
"#,
        audit = audit.display(),
        prefix = format_args!("mglab-{}", lab.id()),
        task = lab.netns_name(Role::Task1),
    );
    let path = lab.write_file("identity.toml", &policy)?;
    let daemon = Daemon::start(&lab, &path.display().to_string(), &[])?;
    let before = agent_hits(&lab, c1_id);
    let own = get_in(&lab, &cni, &credentials_url(cni_id))?;
    ensure!(
        own.ok(),
        "the CNI namespace's own credentials: {own:?}\n{}",
        daemon.log_text()
    );
    let theft = get_in(&lab, &cni, &credentials_url(c1_id))?;
    ensure!(
        refused(&theft, "F13"),
        "the CNI namespace asking for c1's: {theft:?}"
    );
    let own = get(&lab, Workload::AwsvpcTask, &credentials_url(task_id))?;
    ensure!(own.ok(), "the task's own credentials: {own:?}");
    let theft = get(&lab, Workload::AwsvpcTask, &credentials_url(c1_id))?;
    ensure!(
        refused(&theft, "F13"),
        "the task asking for c1's: {theft:?}"
    );
    let own = get(&lab, Workload::BridgeC1, &credentials_url(c1_id))?;
    ensure!(own.ok(), "c1's own credentials: {own:?}");
    let theft = get(&lab, Workload::BridgeC1, &credentials_url(cni_id))?;
    ensure!(
        refused(&theft, "F13"),
        "c1 asking for the CNI namespace's: {theft:?}"
    );
    ensure!(
        agent_hits(&lab, c1_id) == before + 1,
        "a refused request reached the agent"
    );
    // The audit log names the caller's workload (and shortens ids).
    let lines = audit_lines(&audit);
    for (workload, id) in [("cni", cni_id), ("awsvpc", task_id)] {
        let short = format!("/v2/credentials/{}…", &id[..4]);
        ensure!(
            lines
                .iter()
                .any(|l| l["workload"] == workload && l["status"] == 200 && l["path"] == short),
            "no served request attributed to workload {workload}: {lines:?}"
        );
    }
    Ok(())
}

fn tmds_ids_of_a_proxied_workload_are_refused_to_allow_callers() -> Result<(), Failed> {
    let mut lab = lab()?;
    lab.start_docker_api()?;
    let task_tmds = Lab::tmds_url(Workload::AwsvpcTask, "");
    // Without metaguard any container reads any task's metadata.
    let r = get(&lab, Workload::BridgeC2, &task_tmds)?;
    ensure!(r.ok(), "without metaguard: {r:?}");
    let policy = format!(
        r#"[[workload]]
name          = "awsvpc"
netns         = ["/run/netns/{task}"]
task_metadata = "proxy"

[[workload]]
name          = "bridge-containers"
bridges       = ["docker0", "ecs-bridge"]
imds          = "deny"
task_metadata = "allow"

[layers]
bpf = false
"#,
        task = lab.netns_name(Role::Task1),
    );
    let path = lab.write_file("tmds.toml", &policy)?;
    let daemon = Daemon::start(&lab, &path.display().to_string(), &[])?;
    let id = Workload::AwsvpcTask.tmds_endpoint_id();
    let before = agent_hits(&lab, id);
    for url in [
        task_tmds.clone(),
        Lab::tmds_url(Workload::AwsvpcTask, "/task"),
    ] {
        let r = get(&lab, Workload::BridgeC2, &url)?;
        ensure!(
            refused(
                &r,
                "task metadata endpoint id owned by another, proxied workload"
            ),
            "c2 (allow) reading the proxied task's metadata {url}: {r:?}\n{}",
            daemon.log_text()
        );
    }
    ensure!(
        agent_hits(&lab, id) == before,
        "a refused request reached the agent"
    );
    // What allow leaves alone: its own metadata and another allow
    // container's.
    for w in [Workload::BridgeC2, Workload::BridgeC1] {
        let r = get(&lab, Workload::BridgeC2, &Lab::tmds_url(w, ""))?;
        ensure!(r.ok(), "c2 reading {}'s metadata: {r:?}", w.label());
    }
    Ok(())
}

/// Polls `probe` until it is refused with `rule` or `within` passes;
/// returns how long it took.
fn refused_within(
    within: Duration,
    rule: &str,
    mut probe: impl FnMut() -> Result<ProbeResult, Failed>,
) -> Result<Duration, Failed> {
    let start = Instant::now();
    loop {
        let r = probe()?;
        if refused(&r, rule) {
            return Ok(start.elapsed());
        }
        ensure!(
            start.elapsed() < within,
            "not refused within {within:?}: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn a_stopped_containers_ids_are_refused_to_everyone_within_a_second() -> Result<(), Failed> {
    let mut lab = lab()?;
    let docker = lab.start_docker_api()?;
    let policy = format!(
        r#"[[workload]]
name          = "awsvpc"
netns         = ["/run/netns/{task}"]
task_metadata = "proxy"

[[workload]]
name          = "bridge-containers"
bridges       = ["docker0", "ecs-bridge"]
imds          = "deny"
task_metadata = "allow"

[layers]
bpf = false
"#,
        task = lab.netns_name(Role::Task1),
    );
    let path = lab.write_file("revoke.toml", &policy)?;
    let daemon = Daemon::start(&lab, &path.display().to_string(), &[])?;
    let c1_creds = Lab::credentials_url(Workload::BridgeC1);
    let c1_tmds = Lab::tmds_url(Workload::BridgeC1, "");
    // While c1 runs, c2 (allow) may read c1's ids: its owner is an allow
    // workload's container.
    for url in [&c1_creds, &c1_tmds] {
        let r = get(&lab, Workload::BridgeC2, url)?;
        ensure!(r.ok(), "c2 reading c1's {url} while c1 runs: {r:?}");
    }
    // c1's container stops (Docker emits `die`).
    docker.stop("ecs-lab-web-1-app-c1");
    let took = refused_within(Duration::from_secs(1), "revoked", || {
        get(&lab, Workload::BridgeC2, &c1_creds)
    })?;
    eprintln!(
        "measured: c1's credentials id refused within {:.0} ms of its container stopping",
        took.as_secs_f64() * 1000.0
    );
    let hits = agent_hits(&lab, Workload::BridgeC1.credentials_id());
    let r = get(&lab, Workload::BridgeC2, &c1_tmds)?;
    ensure!(
        refused(&r, "revoked"),
        "c1's task metadata after it stopped: {r:?}"
    );
    // A new container takes c1's bridge port, its veth and its address.
    let mut sleep = lab.command_in(Workload::BridgeC1, "sleep")?;
    sleep.arg("60");
    let mut newcomer = Killed(sleep.spawn()?);
    let new_id = "c1b-77d01e3a-credentials";
    lab.agent()
        .add_credentials(new_id, "arn:aws:iam::111122223333:role/lab-c1b");
    docker.start(FakeContainer {
        id: FakeContainer::id_for(&format!("{}-c1b", lab.id())),
        name: "ecs-lab-web-2-app-c1b".into(),
        image: "public.ecr.aws/lab/app:latest".into(),
        labels: Default::default(),
        env: vec![format!(
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=/v2/credentials/{new_id}"
        )],
        network_mode: "bridge".into(),
        pid: newcomer.0.id(),
        sandbox_key: format!("/run/netns/{}", lab.netns_name(Role::C1)),
        user: String::new(),
        cgroup_parent: String::new(),
        running: true,
        addresses: Vec::new(),
    });
    refused_within(Duration::from_secs(1), "revoked", || {
        get(&lab, Workload::BridgeC1, &c1_creds)
    })?;
    let own = get(&lab, Workload::BridgeC1, &credentials_url(new_id))?;
    ensure!(
        own.ok(),
        "the new container's own credentials: {own:?}\n{}",
        daemon.log_text()
    );
    ensure!(
        agent_hits(&lab, Workload::BridgeC1.credentials_id()) == hits,
        "a revoked id reached the agent"
    );
    let _ = newcomer.0.kill();
    Ok(())
}

/// Whether, within 2 s, a credentials request from the awsvpc task is
/// audited as coming from container `id`.
fn found_as(lab: &Lab, audit: &std::path::Path, id: &str) -> Result<bool, Failed> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        let r = get(
            lab,
            Workload::AwsvpcTask,
            &Lab::credentials_url(Workload::AwsvpcTask),
        )?;
        ensure!(r.ok(), "the task's own credentials: {r:?}");
        // The audit writer flushes every 20 ms.
        std::thread::sleep(Duration::from_millis(40));
        if audit_lines(audit)
            .last()
            .is_some_and(|l| l["container"] == id)
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// An IMDSv2 token `curl` gets in lab namespace `role`.
fn token_in(lab: &Lab, role: Role) -> Result<String, Failed> {
    let out = curl_with_status(
        lab,
        role,
        &[
            "-X",
            "PUT",
            "-H",
            "X-aws-ec2-metadata-token-ttl-seconds: 300",
            "http://169.254.169.254/latest/api/token",
        ],
    )?;
    match out.rsplit_once(' ') {
        Some((token, "200")) if token.len() == 64 => Ok(token.to_string()),
        _ => Err(format!("token PUT in {role:?}: {out:?}").into()),
    }
}

/// A caller is one network namespace, whichever of its containers the
/// proxy finds behind it: an awsvpc task's token obtained while only its
/// pause container was listed still works once its application container
/// is (seen once in about 30 runs of the machine proxy test, as a 401 to
/// the GET after a successful PUT, when Docker's event for the app
/// container reached the daemon between the two). It still works only
/// from the task: c1, with a token of its own that works, gets 401 with
/// the task's.
fn a_tasks_imdsv2_token_outlives_changes_in_its_listed_containers() -> Result<(), Failed> {
    let mut lab = lab()?;
    let docker = lab.start_docker_api()?;
    let audit = lab.work_dir().join("audit-task-token.jsonl");
    let policy = format!(
        r#"[proxy]
audit_log = "{audit}"

[[workload]]
name          = "awsvpc"
netns         = ["/run/netns/{task}"]
imds          = "proxy"
task_metadata = "proxy"

[[workload]]
name          = "bridge-containers"
bridges       = ["docker0", "ecs-bridge"]
imds          = "proxy"
task_metadata = "proxy"

[layers]
bpf = false
"#,
        audit = audit.display(),
        task = lab.netns_name(Role::Task1),
    );
    let path = lab.write_file("task-token.toml", &policy)?;
    let daemon = Daemon::start(&lab, &path.display().to_string(), &[])?;
    let task_creds = Lab::credentials_url(Workload::AwsvpcTask);
    let own = get(&lab, Workload::AwsvpcTask, &task_creds)?;
    ensure!(own.ok(), "the task's own credentials: {own:?}");
    // The application container leaves the listing (its process stays in
    // the namespace): the task is its pause container alone, as before its
    // application container is listed. The audit log says when the proxy
    // finds the pause container behind the task's port.
    let app = "ecs-lab-api-1-app-t1";
    let app_id = FakeContainer::id_for(&format!("{}-{app}", lab.id()));
    let pause_id = FakeContainer::id_for(&format!(
        "{}-ecs-lab-api-1-internalecspause-9c8b7a",
        lab.id()
    ));
    ensure!(
        found_as(&lab, &audit, &app_id)?,
        "the task's caller is not its application container\n{}",
        daemon.log_text()
    );
    docker.stop(app);
    ensure!(
        found_as(&lab, &audit, &pause_id)?,
        "the task's caller is not its pause container once the application container left\n{}",
        daemon.log_text()
    );
    let token = token_in(&lab, Role::Task1)?;
    let before = instance_id_with_token(&lab, Role::Task1, &token)?;
    ensure!(
        before == format!("{} 200", lab.instance_id()),
        "the task's token at once: {before:?}"
    );
    // Listed again (Docker's `start`): a new caller is found behind the
    // same port, with the application container as its own.
    let mut sleep = lab.command_in(Workload::AwsvpcTask, "sleep")?;
    sleep.arg("60");
    let newcomer = Killed(sleep.spawn()?);
    docker.start(FakeContainer {
        id: app_id.clone(),
        name: app.into(),
        image: "111122223333.dkr.ecr.us-east-1.amazonaws.com/lab-api:2026.12.1".into(),
        labels: [(
            "com.amazonaws.ecs.container-name".to_string(),
            "app".to_string(),
        )]
        .into_iter()
        .collect(),
        env: vec![format!(
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI=/v2/credentials/{}",
            Workload::AwsvpcTask.credentials_id()
        )],
        network_mode: format!("container:{pause_id}"),
        pid: newcomer.0.id(),
        sandbox_key: String::new(),
        user: String::new(),
        cgroup_parent: String::new(),
        running: true,
        addresses: Vec::new(),
    });
    ensure!(
        found_as(&lab, &audit, &app_id)?,
        "the task's caller is not its application container once listed again\n{}",
        daemon.log_text()
    );
    lab.imds().log().clear();
    let after = instance_id_with_token(&lab, Role::Task1, &token)?;
    ensure!(
        after == format!("{} 200", lab.instance_id()),
        "the task's token once its application container is listed: {after:?}\n{}",
        daemon.log_text()
    );
    // Still the task's alone.
    let c1_token = token_in(&lab, Role::C1)?;
    let c1_own = instance_id_with_token(&lab, Role::C1, &c1_token)?;
    ensure!(
        c1_own == format!("{} 200", lab.instance_id()),
        "c1 with its own token: {c1_own:?}"
    );
    let stolen = instance_id_with_token(&lab, Role::C1, &token)?;
    ensure!(
        stolen.ends_with(" 401"),
        "c1 with the task's token must get IMDS's 401: {stolen:?}"
    );
    ensure!(
        lab.imds()
            .log()
            .entries()
            .iter()
            .all(|e| e.header("x-aws-ec2-metadata-token") != Some(token.as_str())),
        "a caller's token reached IMDS"
    );
    Ok(())
}

/// A child killed (by pid) and reaped when dropped.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
