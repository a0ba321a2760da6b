//! Prometheus metrics and a health endpoint, served on loopback only.

use std::convert::Infallible;
use std::net::SocketAddr;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use prometheus::{
    Encoder, Gauge, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Default listen address: loopback, never reachable from a container
/// (metaguard's bridge rules reject packets to 127.0.0.0/8, F17).
pub const DEFAULT_ADDR: &str = "127.0.0.1:9469";

#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    pub heals: IntCounterVec,
    pub drift: IntCounter,
    pub last_apply: Gauge,
    pub workloads: IntGaugeVec,
    pub reloads: IntCounterVec,
    /// Calls refused by the BPF layer, by syscall.
    pub bpf_refusals: IntCounterVec,
    /// Connections of observed workloads the BPF layer reported, by
    /// workload, service and protocol (docs/observe.md).
    pub observed_connections: IntCounterVec,
}

impl Metrics {
    /// The registry, for metrics registered elsewhere (the proxy's).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn new() -> anyhow::Result<Metrics> {
        let registry = Registry::new();
        let heals = IntCounterVec::new(
            Opts::new(
                "metaguard_heals_total",
                "Rulesets (and the BPF layer) re-applied after someone changed them, by cause.",
            ),
            &["cause"],
        )?;
        let drift = IntCounter::new(
            "metaguard_drift_detected_total",
            "Times the kernel's ruleset was found to differ from the policy.",
        )?;
        let last_apply = Gauge::new(
            "metaguard_last_apply_duration_seconds",
            "Duration of the last apply or heal, in seconds.",
        )?;
        let workloads = IntGaugeVec::new(
            Opts::new(
                "metaguard_workloads_guarded",
                "Selector entries (and task namespaces) guarded, by kind.",
            ),
            &["kind"],
        )?;
        let reloads = IntCounterVec::new(
            Opts::new(
                "metaguard_reloads_total",
                "Configuration reloads (SIGHUP), by result.",
            ),
            &["result"],
        )?;
        registry.register(Box::new(heals.clone()))?;
        registry.register(Box::new(drift.clone()))?;
        registry.register(Box::new(last_apply.clone()))?;
        registry.register(Box::new(workloads.clone()))?;
        registry.register(Box::new(reloads.clone()))?;
        let bpf_refusals = IntCounterVec::new(
            Opts::new(
                "metaguard_bpf_refusals_total",
                "Calls refused by the cgroup BPF layer, by syscall (connect, sendmsg, socket).",
            ),
            &["syscall"],
        )?;
        registry.register(Box::new(bpf_refusals.clone()))?;
        for syscall in ["connect", "sendmsg", "socket"] {
            bpf_refusals.with_label_values(&[syscall]);
        }
        let observed_connections = IntCounterVec::new(
            Opts::new(
                "metaguard_observed_connections_total",
                "Connections (connect, sendmsg) of observed workloads to the metadata endpoints, by workload (empty: a namespace not classified yet), service and protocol (tcp, udp).",
            ),
            &["workload", "service", "protocol"],
        )?;
        registry.register(Box::new(observed_connections.clone()))?;
        for cause in [
            "table-deleted",
            "ruleset-flushed",
            "chain-altered",
            "set-altered",
            "monitor-restart",
        ]
        .into_iter()
        .chain(super::bpf_heal::CAUSES)
        .chain([super::ROUTING_CAUSE])
        {
            heals.with_label_values(&[cause]);
        }
        for result in ["applied", "refused"] {
            reloads.with_label_values(&[result]);
        }
        Ok(Metrics {
            registry,
            heals,
            drift,
            last_apply,
            workloads,
            reloads,
            bpf_refusals,
            observed_connections,
        })
    }

    fn render(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        buf
    }
}

/// Binds now (so a busy address fails the start), serves in the background.
pub fn serve(addr: SocketAddr, metrics: Metrics) -> anyhow::Result<()> {
    let std_listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("cannot listen on {addr} for metrics"))?;
    std_listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(std_listener)?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let metrics = metrics.clone();
                    async move { Ok::<_, Infallible>(respond(&req, &metrics)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(())
}

fn respond(req: &Request<hyper::body::Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match req.uri().path() {
        "/metrics" => (200, "text/plain; version=0.0.4", metrics.render()),
        "/healthz" => (200, "text/plain", b"ok\n".to_vec()),
        _ => (
            404,
            "text/plain",
            b"not found: try /metrics or /healthz\n".to_vec(),
        ),
    };
    Response::builder()
        .status(status)
        .header("content-type", ctype)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}
