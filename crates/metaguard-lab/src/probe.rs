//! Reachability probes: one connection attempt from inside a lab workload.
//!
//! The parent side ([`crate::Lab::probe`]) starts the probe program (the
//! `metaguard` binary's hidden `lab-probe` command, which calls [`run`])
//! inside the workload's namespace and cgroup, and reads one JSON line of
//! result. The probe refuses to run in the root network namespace: lab
//! traffic never leaves the lab.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};

use crate::servers::PROBE_PREFIX;

/// What to try.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ProbeKind {
    /// One HTTP/1.1 request; the header `x-lab-probe: <id>` is added.
    Http {
        url: String,
        #[serde(default = "get")]
        method: String,
        #[serde(default)]
        headers: Vec<(String, String)>,
    },
    /// TCP connect, send `MGPROBE <id>`, read the echo.
    Tcp { host: String, port: u16 },
    /// UDP datagram `MGPROBE <id>` to host:port, wait for the echo.
    Udp { host: String, port: u16 },
    /// Like `Udp`, on an unconnected socket: `sendto` with the address
    /// (the path the `sendmsg` hooks see), then `recvfrom`.
    UdpSendTo { host: String, port: u16 },
    /// Creates one socket and closes it: `raw4` (AF_INET SOCK_RAW ICMP),
    /// `raw6` (AF_INET6 SOCK_RAW ICMPv6), `packet` (AF_PACKET SOCK_RAW) or
    /// `udp4` (a plain datagram socket, for contrast). Answered = created.
    Socket { family: String },
    /// For benchmarks: `count` UDP `connect()` calls on one socket to
    /// host:port (no packet is sent; the call is the route lookup plus any
    /// connect hooks), each timed. The body reports
    /// `{"median_ns": M, "mean_ns": A, "errors": E}`.
    ConnectCost { host: String, port: u16, count: u32 },
    /// Keeps trying a TCP connect (every 5 ms, each attempt up to 100 ms)
    /// until one gets a definitive answer — connected (then `MGPROBE <id>`
    /// is sent and the echo read) or refused — or `max_ms` passes. Shows
    /// whether a workload's *first* packets were blocked, while its network
    /// is still being plugged in. The body lists the outcomes seen before.
    FirstContact {
        host: String,
        port: u16,
        max_ms: u64,
    },
    /// Keeps trying TCP connects to host:port, back to back, for `max_ms`:
    /// shows whether a guard had a gap while it was being changed. Each
    /// attempt is counted as denied (EPERM/EACCES from a local filter),
    /// connected (then `MGPROBE <id>` is sent, so the server logs it) or
    /// other. The body reports `{"attempts": N, "denied": D, "connected":
    /// C, "other": O}`.
    ConnectWatch {
        host: String,
        port: u16,
        max_ms: u64,
    },
    /// A bounded load loop for benchmarks: up to `count` TCP connects
    /// (each closed at once), stopping after `max_ms`. The body reports
    /// `{"connects": N, "seconds": S}`.
    ConnectLoop {
        host: String,
        port: u16,
        count: u32,
        max_ms: u64,
    },
}

fn get() -> String {
    "GET".into()
}

/// A probe to run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProbeSpec {
    /// Unique id; the servers log it, so a test can prove arrival.
    pub id: String,
    #[serde(flatten)]
    pub kind: ProbeKind,
    pub timeout_ms: u64,
}

/// How the attempt ended.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Connected and got an answer (any HTTP status).
    Answered,
    /// TCP reset / ICMP port unreachable.
    Refused,
    /// ICMP host/net unreachable or administratively prohibited.
    Unreachable,
    /// EPERM/EACCES from the local stack (a local filter said no).
    Denied,
    /// Nothing came back within the timeout.
    Timeout,
    /// Name did not resolve, or another error.
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Answered => "answered",
            Outcome::Refused => "refused",
            Outcome::Unreachable => "unreachable",
            Outcome::Denied => "denied",
            Outcome::Timeout => "timeout",
            Outcome::Error => "error",
        }
    }
}

/// The probe's report.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProbeResult {
    pub id: String,
    /// The address the name resolved to, when it did.
    pub resolved: Option<SocketAddr>,
    pub outcome: Outcome,
    /// HTTP status, for HTTP probes that were answered.
    pub status: Option<u16>,
    /// Response body (HTTP) or echo (TCP/UDP), at most 64 KiB.
    pub body: Option<String>,
    pub elapsed_us: u64,
    pub error: Option<String>,
    /// The probe's own cgroup v2 path (from /proc/self/cgroup), proving
    /// which workload it ran as.
    pub cgroup: Option<String>,
    /// The probe's pid and `comm` (what the BPF layer reports of the
    /// caller, for observe mode's connection records).
    #[serde(default)]
    pub pid: Option<u32>,
    #[serde(default)]
    pub comm: Option<String>,
}

impl ProbeResult {
    /// Answered with HTTP 200 (or an echo for TCP/UDP).
    pub fn ok(&self) -> bool {
        self.outcome == Outcome::Answered && self.status.is_none_or(|s| s == 200)
    }

    pub fn elapsed(&self) -> Duration {
        Duration::from_micros(self.elapsed_us)
    }
}

/// Runs one probe in this process (the `lab-probe` command). Refuses, with
/// an error, when this thread is in the root network namespace.
pub fn run(spec: &ProbeSpec) -> Result<ProbeResult, metaguard_sys::netns::NetnsError> {
    metaguard_sys::netns::ensure_not_in_root()?;
    let start = Instant::now();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let (resolved, res) = match rt {
        Ok(rt) => tokio::task::LocalSet::new().block_on(&rt, async {
            let timeout = Duration::from_millis(spec.timeout_ms);
            let mut resolved = None;
            let attempt = attempt(spec, &mut resolved);
            match tokio::time::timeout(timeout, attempt).await {
                Ok(r) => (resolved, r),
                Err(_) => (resolved, Err(Attempt::Timeout)),
            }
        }),
        Err(e) => (None, Err(Attempt::Io(e))),
    };
    let elapsed_us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
    let mut result = ProbeResult {
        id: spec.id.clone(),
        resolved,
        outcome: Outcome::Error,
        status: None,
        body: None,
        elapsed_us,
        error: None,
        cgroup: own_cgroup(),
        pid: Some(std::process::id()),
        comm: std::fs::read_to_string("/proc/self/comm")
            .ok()
            .map(|c| c.trim_end().to_string()),
    };
    match res {
        Ok((status, body)) => {
            result.outcome = Outcome::Answered;
            result.status = status;
            result.body = Some(body);
        }
        Err(Attempt::Timeout) => result.outcome = Outcome::Timeout,
        Err(Attempt::Io(e)) => {
            result.outcome = classify(&e);
            result.error = Some(e.to_string());
        }
        Err(Attempt::Other(e)) => result.error = Some(e),
    }
    Ok(result)
}

/// The `0::/path` line of /proc/self/cgroup.
fn own_cgroup() -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_string)
}

enum Attempt {
    Timeout,
    Io(io::Error),
    Other(String),
}

impl From<io::Error> for Attempt {
    fn from(e: io::Error) -> Self {
        Attempt::Io(e)
    }
}

fn classify(e: &io::Error) -> Outcome {
    match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => Outcome::Refused,
        Some(libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EHOSTDOWN) => Outcome::Unreachable,
        Some(libc::EPERM | libc::EACCES) => Outcome::Denied,
        Some(libc::ETIMEDOUT) => Outcome::Timeout,
        _ => Outcome::Error,
    }
}

async fn resolve(
    host: &str,
    port: u16,
    out: &mut Option<SocketAddr>,
) -> Result<SocketAddr, Attempt> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addr = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| Attempt::Other(format!("cannot resolve {host:?}: {e}")))?
        .next()
        .ok_or_else(|| Attempt::Other(format!("{host:?} resolved to nothing")))?;
    *out = Some(addr);
    Ok(addr)
}

const MAX_BODY: usize = 64 * 1024;

async fn attempt(
    spec: &ProbeSpec,
    resolved: &mut Option<SocketAddr>,
) -> Result<(Option<u16>, String), Attempt> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    match &spec.kind {
        ProbeKind::Http {
            url,
            method,
            headers,
        } => {
            let uri: hyper::Uri = url
                .parse()
                .map_err(|e| Attempt::Other(format!("bad url {url:?}: {e}")))?;
            let host = uri
                .host()
                .ok_or_else(|| Attempt::Other(format!("url {url:?} has no host")))?;
            let port = uri.port_u16().unwrap_or(80);
            let addr = resolve(host, port, resolved).await?;
            let stream = tokio::net::TcpStream::connect(addr).await?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| Attempt::Other(format!("handshake: {e}")))?;
            tokio::task::spawn_local(async move {
                let _ = conn.await;
            });
            let authority = uri.authority().map_or(host.to_string(), |a| a.to_string());
            let path = uri
                .path_and_query()
                .map_or("/".to_string(), |p| p.to_string());
            let mut req = Request::builder()
                .method(method.as_str())
                .uri(path)
                .header("host", authority)
                .header("user-agent", "metaguard-lab-probe")
                .header("x-lab-probe", &spec.id);
            for (k, v) in headers {
                req = req.header(k.as_str(), v.as_str());
            }
            let req = req
                .body(Empty::<Bytes>::new())
                .map_err(|e| Attempt::Other(format!("request: {e}")))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| Attempt::Other(format!("request failed: {e}")))?;
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| Attempt::Other(format!("body: {e}")))?
                .to_bytes();
            let body = String::from_utf8_lossy(&body[..body.len().min(MAX_BODY)]).into_owned();
            Ok((Some(status), body))
        }
        ProbeKind::Tcp { host, port } => {
            let addr = resolve(host, *port, resolved).await?;
            let mut stream = tokio::net::TcpStream::connect(addr).await?;
            stream
                .write_all(format!("{PROBE_PREFIX}{}\n", spec.id).as_bytes())
                .await?;
            let mut buf = vec![0u8; 256];
            let n = stream.read(&mut buf).await?;
            Ok((
                None,
                String::from_utf8_lossy(&buf[..n]).trim_end().to_string(),
            ))
        }
        ProbeKind::FirstContact { host, port, max_ms } => {
            let addr = resolve(host, *port, resolved).await?;
            let deadline = Instant::now() + Duration::from_millis(*max_ms);
            let mut seen: Vec<String> = Vec::new();
            loop {
                let attempt = tokio::time::timeout(
                    Duration::from_millis(100),
                    tokio::net::TcpStream::connect(addr),
                )
                .await;
                match attempt {
                    Ok(Ok(mut stream)) => {
                        stream
                            .write_all(format!("{PROBE_PREFIX}{}\n", spec.id).as_bytes())
                            .await?;
                        let mut buf = vec![0u8; 256];
                        let n = stream.read(&mut buf).await?;
                        let echo = String::from_utf8_lossy(&buf[..n]).trim_end().to_string();
                        return Ok((
                            None,
                            format!("connected after [{}]: {echo}", seen.join(", ")),
                        ));
                    }
                    Ok(Err(e)) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                        return Err(Attempt::Io(e));
                    }
                    Ok(Err(e)) => seen.push(
                        e.raw_os_error()
                            .map_or_else(|| e.to_string(), |n| format!("errno {n}")),
                    ),
                    Err(_) => seen.push("timeout".into()),
                }
                if Instant::now() > deadline {
                    return Err(Attempt::Timeout);
                }
                seen.dedup();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        ProbeKind::ConnectLoop {
            host,
            port,
            count,
            max_ms,
        } => {
            let addr = resolve(host, *port, resolved).await?;
            let (count, max) = (*count, Duration::from_millis(*max_ms));
            // Blocking std sockets on a helper thread: the loop measures the
            // kernel path, not the async runtime.
            let run = tokio::task::spawn_blocking(move || -> io::Result<(u32, f64)> {
                let start = Instant::now();
                let mut n = 0;
                while n < count && start.elapsed() < max {
                    let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
                    drop(s);
                    n += 1;
                }
                Ok((n, start.elapsed().as_secs_f64()))
            });
            let (n, secs) = run
                .await
                .map_err(|e| Attempt::Other(format!("connect loop: {e}")))??;
            Ok((None, format!("{{\"connects\": {n}, \"seconds\": {secs}}}")))
        }
        ProbeKind::ConnectWatch { host, port, max_ms } => {
            let addr = resolve(host, *port, resolved).await?;
            let (line, max) = (
                format!("{PROBE_PREFIX}{}\n", spec.id),
                Duration::from_millis(*max_ms),
            );
            // Blocking std sockets on a helper thread, back to back: as
            // many attempts as the kernel path allows.
            let run = tokio::task::spawn_blocking(move || {
                use std::io::Write as _;
                let start = Instant::now();
                let [mut attempts, mut denied, mut connected, mut other] = [0u64; 4];
                while start.elapsed() < max {
                    attempts += 1;
                    match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)) {
                        Ok(mut s) => {
                            connected += 1;
                            let _ = s.write_all(line.as_bytes());
                        }
                        Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES)) => {
                            denied += 1
                        }
                        Err(_) => other += 1,
                    }
                }
                format!(
                    "{{\"attempts\": {attempts}, \"denied\": {denied}, \"connected\": {connected}, \"other\": {other}}}"
                )
            });
            let body = run
                .await
                .map_err(|e| Attempt::Other(format!("connect watch: {e}")))?;
            Ok((None, body))
        }
        ProbeKind::Udp { host, port } => {
            let addr = resolve(host, *port, resolved).await?;
            let bind: SocketAddr = if addr.is_ipv4() {
                ([0, 0, 0, 0], 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let sock = tokio::net::UdpSocket::bind(bind).await?;
            sock.connect(addr).await?;
            sock.send(format!("{PROBE_PREFIX}{}\n", spec.id).as_bytes())
                .await?;
            let mut buf = vec![0u8; 256];
            let n = sock.recv(&mut buf).await?;
            Ok((
                None,
                String::from_utf8_lossy(&buf[..n]).trim_end().to_string(),
            ))
        }
        ProbeKind::UdpSendTo { host, port } => {
            let addr = resolve(host, *port, resolved).await?;
            let bind: SocketAddr = if addr.is_ipv4() {
                ([0, 0, 0, 0], 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let sock = tokio::net::UdpSocket::bind(bind).await?;
            sock.send_to(format!("{PROBE_PREFIX}{}\n", spec.id).as_bytes(), addr)
                .await?;
            let mut buf = vec![0u8; 256];
            let (n, _) = sock.recv_from(&mut buf).await?;
            Ok((
                None,
                String::from_utf8_lossy(&buf[..n]).trim_end().to_string(),
            ))
        }
        ProbeKind::ConnectCost { host, port, count } => {
            let addr = resolve(host, *port, resolved).await?;
            let bind: SocketAddr = if addr.is_ipv4() {
                ([0, 0, 0, 0], 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let sock = std::net::UdpSocket::bind(bind)?;
            let mut times = Vec::with_capacity(*count as usize);
            let mut errors = 0u32;
            let all = Instant::now();
            for _ in 0..*count {
                let t = Instant::now();
                let r = sock.connect(addr);
                times.push(t.elapsed().as_nanos() as u64);
                errors += u32::from(r.is_err());
            }
            let total = all.elapsed().as_nanos() as u64;
            times.sort_unstable();
            let median = times.get(times.len() / 2).copied().unwrap_or(0);
            let mean = total / u64::from((*count).max(1));
            Ok((
                None,
                format!("{{\"median_ns\": {median}, \"mean_ns\": {mean}, \"errors\": {errors}}}"),
            ))
        }
        ProbeKind::Socket { family } => {
            use rustix::net::{ipproto, socket, AddressFamily, SocketType};
            let made = match family.as_str() {
                "raw4" => socket(AddressFamily::INET, SocketType::RAW, Some(ipproto::ICMP)),
                "raw6" => socket(AddressFamily::INET6, SocketType::RAW, Some(ipproto::ICMPV6)),
                "packet" => socket(AddressFamily::PACKET, SocketType::RAW, None),
                "udp4" => socket(AddressFamily::INET, SocketType::DGRAM, None),
                other => return Err(Attempt::Other(format!("unknown socket family {other:?}"))),
            };
            made.map_err(io::Error::from)?;
            Ok((None, format!("{family} socket created")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_round_trips_as_json() {
        let spec = ProbeSpec {
            id: "p1".into(),
            kind: ProbeKind::Http {
                url: "http://[fd00:ec2::254]/latest/meta-data/".into(),
                method: "GET".into(),
                headers: vec![("x-a".into(), "b".into())],
            },
            timeout_ms: 500,
        };
        let text = serde_json::to_string(&spec).expect("json");
        assert!(text.contains("\"kind\":\"http\""), "{text}");
        assert_eq!(
            serde_json::from_str::<ProbeSpec>(&text).expect("parse"),
            spec
        );
    }

    #[test]
    fn refuses_the_root_namespace() {
        // The test runner itself runs in the root namespace on CI.
        let in_root = metaguard_sys::netns::current_thread_id()
            .is_ok_and(|id| metaguard_sys::netns::is_root(id).unwrap_or(false));
        if !in_root {
            eprintln!("skipped: this test process is not in the root network namespace");
            return;
        }
        let spec = ProbeSpec {
            id: "root".into(),
            kind: ProbeKind::Tcp {
                host: "127.0.0.1".into(),
                port: 9,
            },
            timeout_ms: 100,
        };
        let e = run(&spec).expect_err("must refuse");
        assert!(e.to_string().contains("root network namespace"), "{e}");
    }
}
