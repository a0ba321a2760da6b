//! The host state the proxy needs besides rules: metaguard's own addresses
//! on `lo` (every task-metadata endpoint, /32 or /128: the credentials
//! relay and the IMDS proxy listen there, reached by plain routing, never
//! by a DNAT to 127/8 — F1, F2, F10) and `net.ipv4.tcp_fwmark_accept = 1`
//! (an accepted connection then carries the mark of its SYN: the caller's
//! identity, see `ruleset::bridge_mark`).
//!
//! Both are recorded in the state file as they are made, so `remove` takes
//! away exactly what metaguard added: an address that existed before (an
//! agent without host networking adds 169.254.170.2 itself, F10) is used
//! but never claimed.

use std::net::IpAddr;
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _};
use metaguard_core::ruleset::ProxyPlan;

use super::State;

const FWMARK_ACCEPT: &str = "/proc/sys/net/ipv4/tcp_fwmark_accept";

fn ip(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("cannot run `ip` (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The addresses on `lo` now.
fn lo_addresses() -> anyhow::Result<Vec<IpAddr>> {
    let json = ip(&["-j", "addr", "show", "dev", "lo"])?;
    let v: serde_json::Value = serde_json::from_str(&json).context("ip -j addr: bad JSON")?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a["local"].as_str().and_then(|s| s.parse().ok()))
        .collect())
}

fn prefix(a: &IpAddr) -> String {
    match a {
        IpAddr::V4(_) => format!("{a}/32"),
        IpAddr::V6(_) => format!("{a}/128"),
    }
}

/// Adds what is missing; `save` records the state after each change.
pub fn install(
    plan: &ProxyPlan,
    state: &mut State,
    save: impl Fn(&State) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let present = lo_addresses()?;
    for a in &plan.addresses {
        if present.contains(a) {
            continue;
        }
        if !state.addresses.contains(a) {
            state.addresses.push(*a);
        }
        save(state)?;
        let p = prefix(a);
        let mut args = vec!["addr", "add", p.as_str(), "dev", "lo", "scope", "host"];
        if a.is_ipv6() {
            args.push("nodad");
        }
        ip(&args).with_context(|| format!("cannot add the proxy's address {a} to lo"))?;
    }
    let now = std::fs::read_to_string(FWMARK_ACCEPT)
        .with_context(|| format!("cannot read {FWMARK_ACCEPT}"))?;
    if now.trim() != "1" {
        if state.fwmark_accept_was.is_none() {
            state.fwmark_accept_was = Some(now.trim().to_string());
        }
        save(state)?;
        std::fs::write(FWMARK_ACCEPT, "1")
            .with_context(|| format!("cannot set {FWMARK_ACCEPT} to 1"))?;
    }
    Ok(())
}

/// Removes the addresses metaguard added and restores the sysctl; returns
/// what was undone.
pub fn uninstall(state: &mut State) -> anyhow::Result<Vec<String>> {
    let mut done = Vec::new();
    if !state.addresses.is_empty() {
        let present = lo_addresses()?;
        for a in std::mem::take(&mut state.addresses) {
            if present.contains(&a) {
                ip(&["addr", "del", &prefix(&a), "dev", "lo"])?;
                done.push(format!("address {a} on lo"));
            }
        }
    }
    if let Some(was) = state.fwmark_accept_was.take() {
        std::fs::write(FWMARK_ACCEPT, &was)
            .with_context(|| format!("cannot restore {FWMARK_ACCEPT} to {was}"))?;
        done.push(format!("net.ipv4.tcp_fwmark_accept = {was}"));
    }
    Ok(done)
}

/// What differs from the plan (for `verify`).
pub fn check(plan: &ProxyPlan) -> anyhow::Result<Vec<String>> {
    let present = lo_addresses()?;
    let mut out: Vec<String> = plan
        .addresses
        .iter()
        .filter(|a| !present.contains(a))
        .map(|a| format!("the proxy's address {a} is missing from lo"))
        .collect();
    let now = std::fs::read_to_string(FWMARK_ACCEPT).unwrap_or_default();
    if now.trim() != "1" {
        out.push(format!(
            "net.ipv4.tcp_fwmark_accept is {} (the proxy identifies callers by the mark of their SYN; needs 1)",
            now.trim()
        ));
    }
    Ok(out)
}
