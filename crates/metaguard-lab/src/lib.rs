//! The metaguard lab: an emulated ECS container instance built from network
//! namespaces on a real kernel, with a faithful IMDS emulator and an ECS
//! agent credentials emulator.
//!
//! Used by `metaguard demo`, the integration tests and the benchmarks;
//! never linked into the daemon's hot paths.
//!
//! Invariant: **a lab is never linked to the root network namespace.**
//! Every link is created with both ends inside lab namespaces, no lab
//! command changes the root namespace's firewall, routes, addresses or
//! sysctls, and the probe refuses to send from the root namespace.
#![forbid(unsafe_code)]

pub mod agent;
pub mod http;
pub mod imds;
#[cfg(feature = "harness")]
pub mod loadgen;
pub mod log;
#[cfg(feature = "harness")]
pub mod machine;

pub mod cmd;
#[cfg(feature = "harness")]
pub mod daemon;
pub mod docker;
pub mod error;
pub mod host_rules;
pub mod matrix;
pub mod probe;
pub mod registry;
pub mod servers;
#[cfg(feature = "harness")]
pub mod standin;
#[cfg(feature = "harness")]
pub mod testing;
pub mod topology;

pub use error::LabError;
pub use topology::{Lab, LabOptions, Workload};
