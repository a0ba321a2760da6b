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
use metaguard_core::doctor::snapshot::{HttpProbe, ImdsProbe, Probes, Snapshot};
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

/// A short-lived namespace plugged into a container bridge like a
/// container (a veth, an unused address of the bridge's subnet, the
/// bridge's address as gateway); deleted on drop.
struct BridgeNs {
    ns: Netns,
    bridge: String,
    _cleanup: Cleanup,
}

/// Refuses in the root network namespace (see the module's doc).
fn refuse_in_root() -> anyhow::Result<()> {
    let here = metaguard_sys::netns::current_thread_id()
        .context("cannot identify this network namespace")?;
    if metaguard_sys::netns::is_root(here)? {
        bail!("--probe refused: this is the root network namespace, and a probe namespace would have to be linked to its bridge; run doctor without --probe (the static verdicts stand), or inside a lab");
    }
    Ok(())
}

/// Plugs a namespace named `mgdoctor-<pid>-<tag>` into the first
/// container bridge.
fn bridge_ns(snap: &Snapshot, tag: &str) -> anyhow::Result<BridgeNs> {
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
    let name = format!("mgdoctor-{pid}-{tag}");
    let veth = format!("mgdp{pid}{tag}");
    ip(None, &["netns", "add", &name])?;
    let cleanup = Cleanup(name.clone());
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
    Ok(BridgeNs {
        ns,
        bridge,
        _cleanup: cleanup,
    })
}

/// Probes the first bridge's IMDS v4 and task-credentials flows.
pub fn run(snap: &Snapshot, report: &Report) -> anyhow::Result<Vec<Probe>> {
    refuse_in_root()?;
    let BridgeNs {
        ns,
        bridge,
        _cleanup,
    } = bridge_ns(snap, "t")?;
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

/// The TTL header of IMDSv2 (request and answer).
const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";

/// How long one HTTP probe may take.
const HTTP_TIMEOUT: Duration = Duration::from_millis(1500);

/// One HTTP/1.1 request to `dst` from this thread's namespace. With
/// `keep_body`, the body of an answer that is not a 200 is kept (200
/// characters: IMDS's reason for a refusal).
fn http_once(
    dst: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    keep_body: bool,
) -> HttpProbe {
    let failed = |outcome: &str, e: String| HttpProbe {
        outcome: outcome.into(),
        status: None,
        ttl_header: false,
        body: Some(e),
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return failed("error", format!("no runtime: {e}")),
    };
    rt.block_on(async {
        use http_body_util::BodyExt as _;
        let go = async {
            let stream = tokio::net::TcpStream::connect(dst).await?;
            let (mut send, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .map_err(std::io::Error::other)?;
            tokio::spawn(conn);
            let mut req = hyper::Request::builder()
                .method(method)
                .uri(path)
                .header("host", dst.ip().to_string());
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            let req = req
                .body(http_body_util::Empty::<bytes::Bytes>::new())
                .map_err(std::io::Error::other)?;
            let resp = send
                .send_request(req)
                .await
                .map_err(std::io::Error::other)?;
            let status = resp.status().as_u16();
            let ttl_header = resp.headers().contains_key(TTL_HEADER);
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            Ok::<_, std::io::Error>((status, ttl_header, body))
        };
        match tokio::time::timeout(HTTP_TIMEOUT, go).await {
            Err(_) => failed("timeout", "no answer within 1.5 s".into()),
            Ok(Ok((status, ttl_header, body))) => HttpProbe {
                outcome: "answered".into(),
                status: Some(status),
                ttl_header,
                // A 200's body is never kept (a token, or metadata).
                body: (keep_body && status != 200)
                    .then(|| String::from_utf8_lossy(&body).chars().take(200).collect()),
            },
            Ok(Err(e)) => {
                let outcome = match e.kind() {
                    std::io::ErrorKind::ConnectionRefused => "refused",
                    std::io::ErrorKind::HostUnreachable
                    | std::io::ErrorKind::NetworkUnreachable => "unreachable",
                    std::io::ErrorKind::TimedOut => "timeout",
                    _ if e.raw_os_error() == Some(113) || e.raw_os_error() == Some(101) => {
                        "unreachable"
                    }
                    _ => "error",
                };
                failed(outcome, e.to_string())
            }
        }
    })
}

/// IMDS over HTTP from this thread's namespace, labelled `from`: a token
/// PUT (the token itself is not kept), a tokenless GET of
/// `/latest/meta-data/`, and — from a bridge — whether TCP connects.
fn imds_http(dst: SocketAddr, from: String, connect: bool) -> ImdsProbe {
    let token_put = http_once(dst, "PUT", "/latest/api/token", &[(TTL_HEADER, "60")], true);
    let tokenless_get = http_once(dst, "GET", "/latest/meta-data/", &[], false);
    let connect = connect.then(|| {
        match TcpStream::connect_timeout(&dst, Duration::from_millis(1500)) {
            Ok(_) => "answered",
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => "timeout",
            Err(_) => "refused",
        }
        .to_string()
    });
    ImdsProbe {
        from,
        token_put: Some(token_put),
        tokenless_get: Some(tokenless_get),
        connect,
    }
}

/// `--probe`'s HTTP requests to IMDS v4 — from doctor's own namespace and
/// from a short-lived namespace on the first container bridge — as the
/// `probes.json` text of the snapshot (F16, F19, F20).
pub fn http(snap: &Snapshot) -> anyhow::Result<String> {
    refuse_in_root()?;
    let ep = metaguard_core::doctor::path::Endpoints::of(snap);
    let dst = SocketAddr::from((ep.imds4, 80));
    let mut probes = Probes::default();
    probes.imds.push(imds_http(dst, "host".into(), false));
    if !metaguard_core::doctor::path::container_bridges(snap).is_empty() {
        let b = bridge_ns(snap, "h")?;
        let from = format!("bridge {}", b.bridge);
        let h =
            b.ns.spawn_thread("doctor-http", move || imds_http(dst, from, true))?;
        probes.imds.push(
            h.join()
                .map_err(|_| anyhow::anyhow!("probe thread panicked"))?,
        );
    }
    Ok(serde_json::to_string_pretty(&probes)? + "\n")
}
