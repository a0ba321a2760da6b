//! metaguard's pure core.
//!
//! Owns: the configuration contract (parse + validate, with line/column
//! errors) and, as the engine grows, the policy and the nft rule builder.
//!
//! Must not: touch the file system, the network, the kernel or the clock.
//! Everything here is a function of its inputs, so it is tested exhaustively
//! without root. Callers read files and hand the text in.
#![forbid(unsafe_code)]

pub mod bpf_policy;
pub mod config;
pub mod doctor;
pub mod exec_policy;
pub mod identify;
pub mod location;
pub mod observe;
pub mod proxy_decision;
pub mod proxy_path;
pub mod render;
pub mod ruleset;

pub use config::{Action, Config, ConfigError, Selector, Workload};
