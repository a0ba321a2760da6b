//! Discovery: what the host looks like, for the plan. `docker` asks the
//! Docker Engine API which containers run, with which network mode, cgroup
//! and namespace.

pub mod docker;
