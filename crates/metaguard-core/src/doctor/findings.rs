//! One check per failure mode (failure-modes.md), each citing its id.
//!
//! A check reads the evaluated flows (see [`super::path`]) and the
//! snapshot, and yields at most one [`Finding`]: severity, the flows it
//! concerns, the evidence (the exact rules or settings), a plain
//! explanation, and the fix — concrete actions `--fix` can apply in the
//! backend and namespace where the problem lives, or the reason it will
//! not (ambiguous), plus the durable fix.
//!
//! * `fix` — [`FixAction`] (the exact command lines) and [`Fix`];
//! * `evidence` — the one evidence helper every check writes through, and
//!   the flow queries checks share;
//! * `credentials` — the task-credentials path: F1 (martian), F2 (CIS
//!   drop), F3 (accept in another table), F10 (published port 80);
//! * `guard` — the IMDS guard lost or bypassed: F4 (DOCKER-USER rule
//!   gone), F5 (boot window), F8 (IPv6), F11 (established connections);
//! * `workloads` — senders the host's address rules cannot see or tell
//!   apart: F6 (awsvpc), F7 (host network), F9 (hop limit), F15 (IP-keyed
//!   proxy);
//! * `localnet` — the route_localnet reach-around: F17, and the guard
//!   F1's fix puts in first so that it never opens F17;
//! * `containers` — what containers carry (Docker API): F12 (credential
//!   variables where task metadata is denied), F13 (other tasks'
//!   credentials within reach), F18 (proxy settings without NO_PROXY for
//!   the link-local endpoints; also ecs.config and dockerd);
//! * `host` — the host around the rules: F21 (ENA link-local allowance
//!   exceeded), F22 (Docker's firewall off), F23 (metaguard's table from
//!   another version);
//! * `imds` — IMDS as `--probe` saw it over HTTP, and the instance's
//!   metadata options: F16 (a proxy that adds X-Forwarded-For or drops
//!   the TTL header), F19 (hop limit 1 measured from a bridge), F20
//!   (IMDSv1 enabled);
//! * `latency` — blocks that fail slowly: F14 (silent DROP, a TCP reset
//!   br_netfilter loses).

use serde::Serialize;

use super::path::{Endpoints, Flow};
use super::snapshot::Snapshot;

mod containers;
mod credentials;
mod evidence;
mod fix;
mod guard;
mod host;
mod imds;
mod latency;
mod localnet;
#[cfg(test)]
mod tests;
mod workloads;

use containers::{f12, f13, f18};
use credentials::{f1, f10, f2, f3};
use guard::{f11, f4, f5, f8};
use host::{f21, f22, f23};
use imds::{f16, f19, f20};
use latency::f14;
use localnet::f17;
use workloads::{f15, f6, f7, f9};

pub use fix::{Fix, FixAction};

/// How bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Something is broken or exposed now.
    Error,
    /// Fragile or exposed under conditions (boot, churn, restarts).
    Warning,
}

/// One failure mode found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// `F1` … `F17`.
    pub id: &'static str,
    pub severity: Severity,
    pub title: String,
    /// The flows concerned (`bridge container (docker0) → IMDS v4`).
    pub flows: Vec<String>,
    /// The rules and settings that cause it.
    pub evidence: Vec<String>,
    pub explanation: String,
    pub fix: Fix,
}

/// The fix that lasts, for a guard in chains others own.
const DURABLE: &str = "`metaguard apply` (or the daemon) keeps the guard in a table of metaguard's own, restored within a second; proxy mode removes the need for DNAT to 127.0.0.1";

/// Runs every check.
pub fn check(snap: &Snapshot, flows: &[Flow]) -> Vec<Finding> {
    let ep = Endpoints::of(snap);
    let mut out = Vec::new();
    let checks: [&dyn Fn() -> Option<Finding>; 23] = [
        &|| f1(snap, flows),
        &|| f2(snap, flows, &ep),
        &|| f3(snap, flows, &ep),
        &|| f4(snap, flows, &ep),
        &|| f5(snap, flows),
        &|| f6(snap, flows, &ep),
        &|| f7(snap, flows),
        &|| f8(snap, flows, &ep),
        &|| f9(snap, flows),
        &|| f10(snap, &ep),
        &|| f11(flows, &ep),
        &|| f12(snap),
        &|| f13(snap, flows),
        &|| f14(snap, flows),
        &|| f15(flows),
        &|| f16(snap, flows),
        &|| f17(snap, flows),
        &|| f18(snap, &ep),
        &|| f19(snap),
        &|| f20(snap),
        &|| f21(snap),
        &|| f22(snap),
        &|| f23(snap),
    ];
    for c in checks {
        if let Some(f) = c() {
            out.push(f);
        }
    }
    out
}
