//! The stand-in agent's control API (JSON over its unix socket): what the
//! test asks the "ECS control plane" to run, and what it got.

use serde::{Deserialize, Serialize};

/// `POST /tasks`: run a task.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TaskSpec {
    /// The task definition family (`web`, `api`, …).
    pub family: String,
    /// `bridge`, `awsvpc` or `host`.
    pub network_mode: String,
    pub containers: Vec<ContainerSpec>,
    /// The containers' `--cgroup-parent` (a systemd slice, e.g.
    /// `hostnet.slice`); none: Docker's default, `system.slice`.
    #[serde(default)]
    pub cgroup_parent: Option<String>,
}

/// One container of a task.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ContainerSpec {
    pub name: String,
    /// Numeric uid to run as (`None`: root).
    #[serde(default)]
    pub user: Option<u32>,
}

impl TaskSpec {
    /// A task with one container named `app`, running as root.
    pub fn single(family: &str, network_mode: &str) -> TaskSpec {
        TaskSpec {
            family: family.into(),
            network_mode: network_mode.into(),
            containers: vec![ContainerSpec {
                name: "app".into(),
                user: None,
            }],
            cgroup_parent: None,
        }
    }

    /// The same task with its containers under the slice `parent`.
    pub fn in_slice(mut self, parent: &str) -> TaskSpec {
        self.cgroup_parent = Some(parent.into());
        self
    }
}

/// A running task.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TaskInfo {
    pub arn: String,
    /// The task's short id (the ARN's last segment).
    pub id: String,
    pub network_mode: String,
    /// The id in its containers' `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`.
    pub credentials_id: String,
    /// The role whose credentials the agent serves for it.
    pub role_arn: String,
    /// The application containers (not the pause container).
    pub containers: Vec<ContainerInfo>,
    /// awsvpc: the pause container's id and the ENI's IPv4 address.
    #[serde(default)]
    pub pause_id: Option<String>,
    #[serde(default)]
    pub eni_ipv4: Option<String>,
}

/// One running container of a task.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ContainerInfo {
    pub name: String,
    /// Docker's name (`ecs-<family>-1-<name>-<hex>`).
    pub docker_name: String,
    pub docker_id: String,
    /// Its process, as the machine's pid namespace numbers it.
    pub pid: u32,
    /// The task-metadata (v4) endpoint id in `ECS_CONTAINER_METADATA_URI_V4`.
    pub tmds_id: String,
}

impl TaskInfo {
    /// The credentials URL a container of this task uses.
    pub fn credentials_url(&self) -> String {
        format!(
            "http://169.254.170.2/v2/credentials/{}",
            self.credentials_id
        )
    }
}
