//! What the containers themselves carry (Docker API, `docker.json`
//! `containers`): credential variables injected where the workload is
//! denied task metadata (F12), the credentials of several tasks within
//! reach of any one container (F13), and proxy settings that send SDK
//! traffic for the link-local endpoints to a proxy server (F18).

use std::net::IpAddr;

use super::super::env::{proxy_gap, CREDENTIAL_VARS};
use super::super::path::{Backend, Endpoints, Expect, Flow, Source, TargetKind};
use super::super::snapshot::{DockerContainer, Snapshot};
use super::evidence::{names, Evidence};
use super::{Finding, Fix, Severity};
use crate::config::{Action, Workload};
use crate::identify::workload_for;
use crate::ruleset::ContainerFact;

/// The ECS label naming a container's task.
const TASK_ARN: &str = "com.amazonaws.ecs.task-arn";

/// The variables of `c` that point at credentials or task metadata.
fn credential_vars(c: &DockerContainer) -> Vec<&str> {
    CREDENTIAL_VARS
        .iter()
        .copied()
        .filter(|v| c.env.contains_key(*v))
        .collect()
}

/// The config workload `c` belongs to (bridge containers on `docker0`).
fn workload_of<'a>(snap: &'a Snapshot, c: &DockerContainer) -> Option<&'a Workload> {
    let fact = ContainerFact {
        id: String::new(),
        name: c.name.clone(),
        image: String::new(),
        labels: c.labels.clone(),
        host_network: c.network_mode == "host",
        cgroup: c.cgroup.clone(),
        netns: c.netns.clone(),
        env: Vec::new(),
        addresses: Vec::new(),
    };
    let master = (c.network_mode == "bridge").then_some("docker0");
    let netns: Vec<String> = c.netns.iter().cloned().collect();
    let i = workload_for(&snap.config, master, &[&fact], &netns)?;
    snap.config.workloads.get(i)
}

pub(super) fn f12(snap: &Snapshot) -> Option<Finding> {
    let mut evidence = Evidence::default();
    for c in &snap.docker.containers {
        let vars = credential_vars(c);
        if vars.is_empty() {
            continue;
        }
        let Some(w) = workload_of(snap, c) else {
            continue;
        };
        if w.task_metadata != Action::Deny {
            continue;
        }
        evidence.line(format!(
            "container {} (workload {:?}: task_metadata = \"deny\") carries {}",
            c.name,
            w.name,
            vars.join(", ")
        ));
    }
    if evidence.is_empty() {
        return None;
    }
    Some(Finding {
        id: "F12",
        severity: Severity::Warning,
        title: "credential variables are injected into containers denied task metadata".into(),
        flows: Vec::new(),
        evidence: evidence.into_lines(),
        explanation: "The ECS agent (and Fargate) puts AWS_CONTAINER_CREDENTIALS_RELATIVE_URI and ECS_CONTAINER_METADATA_URI_V4 into every container of a task with a role. The host's rules deny this workload the endpoint, so its SDKs try it and fail (slowly, behind a DROP); where no host rule can apply (Fargate: no host access, no NET_ADMIN) the variables are the way in.".into(),
        fix: Fix::new("remove the variables from the container, or the role from its task", Vec::new(), "run the container's entrypoint under `metaguard exec`, which scrubs these variables and refuses connections to the endpoints (seccomp user-notify; no privilege needed — works on Fargate)")
            .manual("drop taskRoleArn from the task definition if the container needs no AWS credentials, or start it as `metaguard exec -- CMD`"),
    })
}

/// A credentials flow from a container that is delivered to the ECS
/// agent as is: no relay of metaguard's in between.
fn reaches_agent_directly(f: &Flow) -> bool {
    matches!(f.source, Source::BridgeContainer | Source::AwsvpcTask)
        && f.target == TargetKind::TaskCredentials
        && f.verdict.reaches()
        && f.expect != Some(Expect::Block)
        && !f
            .steps
            .iter()
            .any(|s| s.rule.backend == Backend::Nft && s.rule.table == "metaguard")
}

pub(super) fn f13(snap: &Snapshot, flows: &[Flow]) -> Option<Finding> {
    // Tasks holding credentials: by task ARN, else one per container.
    let mut tasks: Vec<(String, Vec<&str>)> = Vec::new();
    for c in &snap.docker.containers {
        if c.name == "ecs-agent"
            || !c.env.contains_key("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
                && !c.env.contains_key("AWS_CONTAINER_CREDENTIALS_FULL_URI")
        {
            continue;
        }
        let key = c
            .labels
            .get(TASK_ARN)
            .cloned()
            .unwrap_or_else(|| format!("container {}", c.name));
        match tasks.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(&c.name),
            None => tasks.push((key, vec![&c.name])),
        }
    }
    if tasks.len() < 2 {
        return None;
    }
    let hit: Vec<&Flow> = flows.iter().filter(|f| reaches_agent_directly(f)).collect();
    if hit.is_empty() {
        return None;
    }
    let mut evidence = Evidence::listing([format!(
        "{} tasks hold credentials on this host",
        tasks.len()
    )]);
    for (k, cs) in &tasks {
        evidence.line(if k.starts_with("container ") {
            format!("{k} (no task ARN label)")
        } else {
            format!("task {k}: {}", cs.join(", "))
        });
    }
    for f in &hit {
        let to = f.delivered_to.as_deref().unwrap_or(&f.destination);
        evidence.line(format!(
            "{}: delivered to {to}, the agent's endpoint, with no relay that checks who asks",
            f.name()
        ));
    }
    Some(Finding {
        id: "F13",
        severity: Severity::Warning,
        title: "a container can read other tasks' credentials".into(),
        flows: names(&hit),
        evidence: evidence.into_lines(),
        explanation: "The ECS agent's credentials endpoint does not check who asks: any caller that presents a credentials id gets that task's role credentials. An id leaks easily (environment dumps, logs, /proc of a shared namespace), and every container that reaches 169.254.170.2 can then act as any task on the host.".into(),
        fix: Fix::new("bind each credentials id to the workload it was issued to", Vec::new(), "task_metadata = \"proxy\" on every container workload, then `metaguard apply` (or the daemon): metaguard's relay serves a credentials id only to the containers that hold it")
            .manual("set task_metadata = \"proxy\" on the bridge and awsvpc workloads in /etc/metaguard/metaguard.toml and run `metaguard apply`"),
    })
}

/// The endpoints SDKs call over plain HTTP (IPv4).
fn link_local(ep: &Endpoints) -> [IpAddr; 2] {
    [IpAddr::V4(ep.imds4), IpAddr::V4(ep.creds)]
}

pub(super) fn f18(snap: &Snapshot, ep: &Endpoints) -> Option<Finding> {
    let eps = link_local(ep);
    let mut evidence = Evidence::default();
    let mut manual = Vec::new();
    let mut say = |who: &str, g: super::super::env::ProxyGap| {
        let missing: Vec<String> = g.missing.iter().map(IpAddr::to_string).collect();
        evidence.line(format!(
            "{who}: {} with {} — {} not exempted",
            g.proxies.join(", "),
            match &g.no_proxy {
                Some(n) => format!("NO_PROXY={n}"),
                None => "no NO_PROXY".to_string(),
            },
            missing.join(", ")
        ));
    };
    for c in &snap.docker.containers {
        if let Some(g) = proxy_gap(|k| c.env.get(k).and_then(|v| v.as_deref()), &eps) {
            say(&format!("container {}", c.name), g);
        }
    }
    if let Some(g) = proxy_gap(|k| snap.ecs_config.get(k).map(String::as_str), &eps) {
        say("ecs.config", g);
        manual.push("add NO_PROXY=169.254.169.254,169.254.170.2,/var/run/docker.sock to /etc/ecs/ecs.config and restart the ECS agent".to_string());
    }
    if let Some(d) = &snap.docker.daemon {
        if let Some(g) = proxy_gap(|k| d.env.get(k).map(String::as_str), &eps) {
            say(
                &format!(
                    "dockerd environment ({})",
                    d.env_source.as_deref().unwrap_or("?")
                ),
                g,
            );
            manual.push("add 169.254.169.254,169.254.170.2 to NO_PROXY in docker.service's environment (a drop-in `Environment=`), then `systemctl daemon-reload && systemctl restart docker`".to_string());
        }
    }
    if evidence.is_empty() {
        return None;
    }
    manual.push("containers: pass NO_PROXY=169.254.169.254,169.254.170.2 (and no_proxy) with the proxy settings in the task definition".to_string());
    let mut fix = Fix::new(
        "exempt the link-local endpoints from the proxy (NO_PROXY=169.254.169.254,169.254.170.2)",
        Vec::new(),
        "set NO_PROXY with every proxy setting where it is defined (task definitions, ecs.config, docker.service)",
    );
    for m in manual {
        fix = fix.manual(m);
    }
    Some(Finding {
        id: "F18",
        severity: Severity::Error,
        title: "proxy settings send SDK requests for the link-local endpoints to a proxy server".into(),
        flows: Vec::new(),
        evidence: evidence.into_lines(),
        explanation: "SDKs honour HTTP_PROXY/HTTPS_PROXY/ALL_PROXY for the credentials and IMDS endpoints unless NO_PROXY names them (the EKS and ECS user guides say to add 169.254.169.254,169.254.170.2). The proxy server cannot reach this instance's link-local addresses: requests fail, or the proxy answers from its own host's IMDS with another instance's credentials. Some SDKs ignore CIDR entries in NO_PROXY; list the two addresses.".into(),
        fix,
    })
}
