//! `metaguard doctor`, the pure part: parse a host snapshot, evaluate the
//! packet paths that matter, and turn failure-modes.md into findings.
//!
//! * [`env`](mod@env) — credential and proxy variables, and what a snapshot keeps of an environment;
//! * [`ethtool`] — `ethtool -S` of ENA interfaces (the link-local allowance);
//! * [`iptables_save`] — a parser of the iptables-save grammar (file:line errors);
//! * [`nft`] — the nft JSON model;
//! * [`snapshot`] — the snapshot's typed form (files → [`snapshot::Snapshot`]);
//! * [`path`] — packet-path evaluation of every (workload, endpoint) flow;
//! * [`findings`] — one check per failure mode, with evidence and fix;
//! * [`report`] — the report, its JSON schema and the human rendering;
//! * [`merge`] — many hosts' JSON reports into one host × finding table (`--merge`).
//!
//! No I/O: the binary collects the snapshot, applies fixes and probes.

pub mod env;
pub mod ethtool;
pub mod findings;
pub mod iptables_save;
pub mod merge;
pub mod nft;
pub mod path;
pub mod report;
pub mod snapshot;

pub use report::{analyze, new_findings, Report};
