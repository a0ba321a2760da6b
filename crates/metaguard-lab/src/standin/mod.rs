//! Stand-ins for what a real ECS container instance runs beside metaguard,
//! for the machine lab ([`crate::machine`]), where they run under the
//! booted systemd as `docker.socket`/`docker.service` and `ecs.service`:
//!
//! * [`dockerd`] — the Docker Engine API ([`crate::docker::FakeDocker`])
//!   with a runtime that makes each container real the way dockerd does:
//!   a network namespace bind-mounted under `/run/docker/netns/`, a veth
//!   into `docker0` (bridge mode), a process in the systemd scope
//!   `system.slice/docker-<id>.scope` (the systemd cgroup driver), the
//!   container's environment and user. Socket-activated like Debian's
//!   docker.io (`docker.socket`), `Type=notify` like dockerd.
//! * [`agent`] — `ecs-init pre-start` (the credentials DNAT of
//!   169.254.170.2:80 to 127.0.0.1:51679 and `route_localnet=1`) and the
//!   agent: the credentials and task-metadata emulator on 127.0.0.1:51679,
//!   and tasks started through the Docker API as the agent starts them —
//!   awsvpc tasks as a pause container whose namespace gets `ecs-eth0`
//!   on `ecs-bridge` and an ENI plugged into the VPC (the CNI plugins'
//!   work), then the application containers joining it.
//!
//! The test drives the agent through a control socket ([`api`],
//! [`client`]), as the ECS control plane would; it asks the stand-in
//! dockerd directly for plain `docker run` containers.
//!
//! Everything here runs inside the booted machine, in the lab's host
//! namespace; nothing runs in the root network namespace.

pub mod agent;
pub mod api;
pub mod client;
pub mod dockerd;

/// The directory shared between the test and the machine (bind-mounted
/// from the lab's work dir): control socket, logs.
pub const CONTROL_DIR: &str = "/run/mglab";
/// The agent's control socket, in [`CONTROL_DIR`].
pub const CONTROL_SOCKET: &str = "ecs.sock";
/// The VPC's namespace, bind-mounted into the machine so the agent can
/// plug task ENIs into the VPC's switch (what EC2 does when it attaches an
/// ENI).
pub const VPC_NETNS: &str = "/run/mglab-vpc.netns";
/// Where the stand-in binary is bind-mounted in the machine.
pub const STANDIN_EXE: &str = "/opt/mglab/bin/mglab-standin";
/// The Docker API socket in the machine.
pub const DOCKER_SOCKET: &str = "/run/docker.sock";
