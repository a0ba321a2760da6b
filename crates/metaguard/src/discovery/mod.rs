//! Discovery: what the host looks like, for the plan. `docker` asks the
//! Docker Engine API which containers run, with which network mode, cgroup
//! and namespace (async [`docker::list_containers`], and
//! [`docker::containers`] for synchronous callers), and follows its events
//! ([`docker::watch`], which reports its own [`docker::DockerEvent`]s).
//!
//! Must not: import the daemon or the engine — they call discovery, and
//! map its events onto theirs (`tests/module_graph.rs` keeps the binary's
//! modules free of import cycles).

pub mod docker;
