//! The `/etc/ecs/ecs.config` lines the policy implies, each with a comment
//! saying why. ecs.config is read as an env file (systemd and
//! `docker run --env-file`): only whole-line `#` comments, `KEY=VALUE`
//! without quotes. The agent reads it once, when it starts — so these
//! lines must be in place before it starts (user data does that).

use std::fmt::Write as _;

use crate::config::{Action, Config, ContainerRef, NetnsSelector, Selector, Workload};

use super::{Kind, Options, Stamp, ECS_CONFIG_PATH};

/// The keys metaguard writes; the user-data script replaces earlier values
/// of exactly these.
pub const KEYS: [&str; 4] = [
    "ECS_CLUSTER",
    "ECS_AWSVPC_BLOCK_IMDS",
    "ECS_ENABLE_TASK_IAM_ROLE",
    "ECS_ENABLE_TASK_IAM_ROLE_NETWORK_HOST",
];

/// The bridge ECS uses for `bridge` and `default` network mode.
const ECS_BRIDGE_MODE_IFACE: &str = "docker0";

fn matches_ifname(glob: &str, name: &str) -> bool {
    match glob.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => glob == name,
    }
}

/// The workload that governs bridge-mode tasks (first match on docker0).
fn bridge_workload(config: &Config) -> Option<&Workload> {
    config.workloads.iter().find(|w| match &w.selector {
        Selector::Bridges(globs) => globs
            .iter()
            .any(|g| matches_ifname(g, ECS_BRIDGE_MODE_IFACE)),
        _ => false,
    })
}

/// The workload that governs awsvpc tasks (first to select "ecs-tasks").
fn awsvpc_workload(config: &Config) -> Option<&Workload> {
    config.workloads.iter().find(|w| match &w.selector {
        Selector::Netns(sels) => sels.contains(&NetnsSelector::EcsTasks),
        _ => false,
    })
}

/// Host-network workloads (cgroups and containers selectors) that deny the
/// task-metadata endpoint.
fn host_network_denying_tmd(config: &Config) -> Vec<&Workload> {
    config
        .workloads
        .iter()
        .filter(|w| matches!(w.selector, Selector::Cgroups(_) | Selector::Containers(_)))
        .filter(|w| w.task_metadata == Action::Deny)
        .collect()
}

/// The `KEY=VALUE` lines with their comments, without the header: shared
/// by the `ecs-config` kind and the user-data script.
pub fn body(config: &Config, cluster: Option<&str>) -> String {
    let mut out = String::new();
    if let Some(c) = cluster {
        let _ = writeln!(out, "# The cluster this container instance joins.");
        let _ = writeln!(out, "ECS_CLUSTER={c}");
    }

    match awsvpc_workload(config) {
        Some(w) if w.imds == Action::Deny => {
            let _ = writeln!(
                out,
                "# awsvpc tasks: workload {:?} denies IMDS. The agent then also puts blackhole\n\
                 # routes to IMDS into each task's network namespace before its containers\n\
                 # start, a second layer under metaguard's rules there (F6).",
                w.name
            );
            let _ = writeln!(out, "ECS_AWSVPC_BLOCK_IMDS=true");
        }
        Some(w) => {
            let _ = writeln!(
                out,
                "# awsvpc tasks: workload {:?} does not deny IMDS ({}), so the agent must not\n\
                 # blackhole it either.",
                w.name, w.imds
            );
            let _ = writeln!(out, "ECS_AWSVPC_BLOCK_IMDS=false");
        }
        None => {
            let _ = writeln!(
                out,
                "# awsvpc tasks: no workload selects \"ecs-tasks\"; ECS_AWSVPC_BLOCK_IMDS is left\n\
                 # at the agent's default (false: awsvpc tasks reach IMDS, F6)."
            );
        }
    }

    let bridge = bridge_workload(config);
    let bridge_roles = match bridge {
        Some(w) if w.task_metadata == Action::Deny => {
            let _ = writeln!(
                out,
                "# bridge-mode tasks: workload {:?} denies the task credentials endpoint\n\
                 # (169.254.170.2), so IAM roles for tasks cannot work there; turned off so\n\
                 # that nothing relies on them.",
                w.name
            );
            let _ = writeln!(out, "ECS_ENABLE_TASK_IAM_ROLE=false");
            false
        }
        Some(w) => {
            let imds = if w.imds == Action::Deny {
                "denies IMDS"
            } else {
                "allows IMDS"
            };
            let _ = writeln!(
                out,
                "# bridge-mode tasks: workload {:?} {imds} and keeps the task credentials\n\
                 # endpoint (169.254.170.2): tasks get their own role's credentials from\n\
                 # the agent instead of the instance's.",
                w.name
            );
            let _ = writeln!(out, "ECS_ENABLE_TASK_IAM_ROLE=true");
            true
        }
        None => {
            let _ = writeln!(
                out,
                "# bridge-mode tasks: no workload selects docker0, so they are not guarded;\n\
                 # IAM roles for tasks stay on so tasks need not use the instance's role."
            );
            let _ = writeln!(out, "ECS_ENABLE_TASK_IAM_ROLE=true");
            true
        }
    };

    let denying = host_network_denying_tmd(config);
    if let Some(w) = denying.first() {
        let _ = writeln!(
            out,
            "# host-network tasks: workload {:?} denies the task credentials endpoint to\n\
             # host-network processes, so IAM roles for host-network tasks cannot work.",
            w.name
        );
        let _ = writeln!(out, "ECS_ENABLE_TASK_IAM_ROLE_NETWORK_HOST=false");
    } else if bridge_roles {
        let _ = writeln!(
            out,
            "# host-network tasks: no workload denies them the task credentials endpoint;\n\
             # with IAM roles for tasks they need not use the instance's role. (Their IMDS\n\
             # access is decided by cgroups workloads, F7.)"
        );
        let _ = writeln!(out, "ECS_ENABLE_TASK_IAM_ROLE_NETWORK_HOST=true");
    } else {
        let _ = writeln!(
            out,
            "# host-network tasks: IAM roles for tasks are off (see above), and this\n\
             # setting only works together with ECS_ENABLE_TASK_IAM_ROLE=true."
        );
        let _ = writeln!(out, "ECS_ENABLE_TASK_IAM_ROLE_NETWORK_HOST=false");
    }
    out
}

pub fn render(stamp: &Stamp, config: &Config, opts: &Options) -> String {
    format!(
        "# {ECS_CONFIG_PATH} settings implied by the metaguard policy.\n\
         {}\
         # The ECS agent reads this file once, when it starts.\n\
         {}{}",
        stamp.lines("# ", Kind::EcsConfig),
        body(config, opts.cluster.as_deref()),
        agent_on_bridge(config).unwrap_or_default()
    )
}

/// The agent-on-a-bridge recipe, as comments, when `[agent] credentials`
/// names a container: how to run the agent without host networking and
/// without a published port, and what the policy must hold for it.
fn agent_on_bridge(config: &Config) -> Option<String> {
    let agent = config.agent_container.as_ref()?;
    let name = match &agent.container {
        ContainerRef::Name(n) => n.clone(),
        ContainerRef::Label { .. } => "ecs-agent".to_string(),
    };
    let label = match &agent.container {
        ContainerRef::Label { key, value } => format!("\n#     --label {key}={value} \\"),
        ContainerRef::Name(_) => String::new(),
    };
    let port = agent.port;
    let mut out = String::new();
    let _ = write!(
        out,
        "#\n\
         # The ECS agent on a bridge ([agent] credentials = \"container:…:{port}\").\n\
         # ecs-init runs the agent with --net host; run it as a container on docker0\n\
         # instead (or on a bridge of its own: docker network create ecs-agent-net,\n\
         # then --network ecs-agent-net, and list its br-* name in the bridges workload):\n\
         #\n\
         #   docker run --name {name} --detach --restart=on-failure:10 \\{label}\n\
         #     --volume=/var/run/docker.sock:/var/run/docker.sock \\\n\
         #     --volume=/var/log/ecs:/log --volume=/var/lib/ecs/data:/data \\\n\
         #     --env-file={ECS_CONFIG_PATH} \\\n\
         #     --env=ECS_LOGFILE=/log/ecs-agent.log --env=ECS_DATADIR=/data \\\n\
         #     amazon/amazon-ecs-agent:latest\n\
         #\n\
         # No --net host and no -p 169.254.170.2:80:{port}: nothing is published, so\n\
         # host port 80 stays free for containers (F10) and 169.254.170.2 needs no\n\
         # address on lo. metaguard's relay serves 169.254.170.2:80 to every workload\n\
         # with task_metadata = \"proxy\" and forwards to the agent's container, found\n\
         # through the Docker API and followed when it restarts; only the relay reaches\n\
         # the agent's port {port}. From a bridge the agent's IMDSv2 token needs a PUT\n\
         # response hop limit of 2 (F9): aws ec2 modify-instance-metadata-options\n\
         # --http-put-response-hop-limit 2.\n"
    );
    let bridge = bridge_workload(config);
    let bridge_at = bridge.and_then(|b| config.workloads.iter().position(|w| std::ptr::eq(w, b)));
    let allowed = config.workloads.iter().enumerate().any(|(i, w)| {
        bridge_at.is_none_or(|b| i < b)
            && w.imds != Action::Deny
            && match &w.selector {
                Selector::Containers(refs) => refs.contains(&agent.container),
                _ => false,
            }
    });
    if !allowed {
        let _ = write!(
            out,
            "# WARNING: no workload ahead of the docker0 workload selects the agent's\n\
             # container with imds = \"allow\"; add one before it:\n\
             #   [[workload]]\n\
             #   name = \"ecs-agent\"\n\
             #   containers = [\"{name}\"]\n\
             #   imds = \"allow\"\n"
        );
    }
    if !config.proxies().1 {
        let _ = write!(
            out,
            "# WARNING: no workload has task_metadata = \"proxy\": nothing relays task\n\
             # credentials to the agent's container. Set it on the bridge and awsvpc workloads.\n"
        );
    }
    Some(out)
}
