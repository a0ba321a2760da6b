//! `--probe`: confirm the static verdicts of the bridge-container flows with
//! real TCP connections from a short-lived namespace plugged into the
//! bridge like a container.
//!
//! Refused in the root network namespace: the probe namespace would need a
//! link to the host's bridge, and nothing may be sent from or linked to
//! the root namespace by a diagnostic. (In the lab, doctor runs inside the
//! lab's host namespace, where probing is allowed.) The namespace and its
//! veth are deleted before returning, also on error.

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, Context as _};
use metaguard_core::doctor::path::{Source, TargetKind, Verdict};
use metaguard_core::doctor::snapshot::Snapshot;
use metaguard_core::doctor::Report;
use metaguard_sys::netns::Netns;
use metaguard_sys::tool;
use serde::Serialize;

/// One probe's outcome next to the static verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    pub flow: String,
    pub destination: String,
    pub expected: Verdict,
    pub observed: Verdict,
    pub agrees: bool,
}

struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Ok(cmd) = tool::command("ip", &["netns", "del", &self.0]) {
            let _ = tool::run(cmd, None, None);
        }
    }
}

fn ip(ns: Option<&Netns>, args: &[&str]) -> anyhow::Result<()> {
    tool::run(tool::command("ip", args)?, ns, None)?.success()?;
    Ok(())
}

/// Probes the first bridge's IMDS v4 and task-credentials flows.
pub fn run(snap: &Snapshot, report: &Report) -> anyhow::Result<Vec<Probe>> {
    let here = metaguard_sys::netns::current_thread_id()
        .context("cannot identify this network namespace")?;
    if metaguard_sys::netns::is_root(here)? {
        bail!("--probe refused: this is the root network namespace, and a probe namespace would have to be linked to its bridge; run doctor without --probe (the static verdicts stand), or inside a lab");
    }
    let Some(bridge) = metaguard_core::doctor::path::container_bridges(snap)
        .into_iter()
        .next()
    else {
        bail!("--probe: no container bridge on this host to probe from");
    };
    let Some(gw) = snap
        .host
        .addrs
        .iter()
        .find(|a| a.ifname == bridge && a.addr.is_ipv4())
    else {
        bail!("--probe: {bridge} has no IPv4 address");
    };
    let IpAddr::V4(g) = gw.addr else {
        bail!("--probe: {bridge} has no IPv4 address")
    };
    let addr = std::net::Ipv4Addr::from(u32::from(g).wrapping_add(200));
    let pid = std::process::id();
    let name = format!("mgdoctor-{pid}");
    let veth = format!("mgdp{pid}");
    ip(None, &["netns", "add", &name])?;
    let _guard = Cleanup(name.clone());
    let ns = Netns::open_not_root(std::path::Path::new("/run/netns").join(&name))?;
    ip(
        None,
        &[
            "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &name,
        ],
    )?;
    ip(None, &["link", "set", &veth, "master", &bridge, "up"])?;
    ip(Some(&ns), &["link", "set", "lo", "up"])?;
    ip(
        Some(&ns),
        &[
            "addr",
            "add",
            &format!("{addr}/{}", gw.prefix),
            "dev",
            "eth0",
        ],
    )?;
    ip(Some(&ns), &["link", "set", "eth0", "up"])?;
    ip(
        Some(&ns),
        &["route", "add", "default", "via", &g.to_string()],
    )?;
    let mut out = Vec::new();
    for f in report.flows.iter().filter(|f| {
        f.source == Source::BridgeContainer && f.interface.as_deref() == Some(bridge.as_str())
    }) {
        if !matches!(f.target, TargetKind::ImdsV4 | TargetKind::TaskCredentials) {
            continue;
        }
        let Ok(dst) = f.destination.parse::<SocketAddr>() else {
            continue;
        };
        let h = ns.spawn_thread("doctor-probe", move || {
            match TcpStream::connect_timeout(&dst, Duration::from_millis(1500)) {
                Ok(_) => Verdict::Reaches,
                Err(e)
                    if e.kind() == std::io::ErrorKind::TimedOut
                        || e.kind() == std::io::ErrorKind::WouldBlock =>
                {
                    Verdict::TimesOut
                }
                Err(_) => Verdict::Blocked,
            }
        })?;
        let observed = h
            .join()
            .map_err(|_| anyhow::anyhow!("probe thread panicked"))?;
        out.push(Probe {
            flow: f.name(),
            destination: f.destination.clone(),
            expected: f.verdict,
            observed,
            agrees: observed == f.verdict,
        });
    }
    Ok(out)
}
