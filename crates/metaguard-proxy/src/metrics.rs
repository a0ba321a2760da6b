//! The proxy's Prometheus metrics, registered on the daemon's registry.

use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry};

#[derive(Debug, Clone)]
pub struct ProxyMetrics {
    /// Requests by service, workload, decision and status.
    pub requests: IntCounterVec,
    /// Upstream latency by service.
    pub upstream_seconds: HistogramVec,
    /// Upstream failures (connect, timeout) by service.
    pub upstream_errors: IntCounterVec,
    /// Connections closed at once, by workload and reason.
    pub refused_connections: IntCounterVec,
    /// Requests of observed workloads, by workload, service, IMDS version
    /// and decision. Bounded: workloads are the config's (plus none), two
    /// services, three versions (`v1`, `v2`, `none` for task metadata),
    /// five decisions — at most 30 series per observed workload.
    pub observed: IntCounterVec,
    /// Observed requests that could not be recorded (write errors).
    pub observe_errors: IntCounter,
    /// Cacheable requests by service and result (hit, miss, stale, bypass).
    pub cache: IntCounterVec,
    /// Answers served from memory after the upstream failed, by service.
    pub stale_answers: IntCounterVec,
}

impl ProxyMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<ProxyMetrics> {
        let requests = IntCounterVec::new(
            Opts::new(
                "metaguard_proxy_requests_total",
                "Requests to the metadata proxy, by service, workload, decision and status.",
            ),
            &["service", "workload", "decision", "status"],
        )?;
        let upstream_seconds = HistogramVec::new(
            HistogramOpts::new(
                "metaguard_proxy_upstream_seconds",
                "Time the upstream (IMDS or the ECS agent) took to answer, by service.",
            )
            .buckets(vec![
                0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                0.5, 1.0, 2.5, 5.0,
            ]),
            &["service"],
        )?;
        let upstream_errors = IntCounterVec::new(
            Opts::new(
                "metaguard_proxy_upstream_errors_total",
                "Requests the proxy could not forward (upstream unreachable or too slow), by service.",
            ),
            &["service"],
        )?;
        let refused_connections = IntCounterVec::new(
            Opts::new(
                "metaguard_proxy_refused_connections_total",
                "Connections closed at once, by workload and reason.",
            ),
            &["workload", "reason"],
        )?;
        let observed = IntCounterVec::new(
            Opts::new(
                "metaguard_observed_requests_total",
                "Requests of observed workloads, by workload, service, IMDS version (v1, v2; none for task metadata) and decision.",
            ),
            &["workload", "service", "version", "decision"],
        )?;
        let observe_errors = IntCounter::new(
            "metaguard_observe_write_errors_total",
            "Observed requests that could not be written to the observe log.",
        )?;
        registry.register(Box::new(observed.clone()))?;
        registry.register(Box::new(observe_errors.clone()))?;
        let cache = IntCounterVec::new(
            Opts::new(
                "metaguard_proxy_cache_total",
                "Requests the answer cache was asked for, by service and result (hit, miss, stale, bypass).",
            ),
            &["service", "result"],
        )?;
        let stale_answers = IntCounterVec::new(
            Opts::new(
                "metaguard_proxy_stale_answers_total",
                "Credentials served from memory because the upstream failed (never past their Expiration), by service.",
            ),
            &["service"],
        )?;
        registry.register(Box::new(cache.clone()))?;
        registry.register(Box::new(stale_answers.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(upstream_seconds.clone()))?;
        registry.register(Box::new(upstream_errors.clone()))?;
        registry.register(Box::new(refused_connections.clone()))?;
        for s in ["imds", "task_metadata"] {
            upstream_errors.with_label_values(&[s]);
            stale_answers.with_label_values(&[s]);
            for r in ["hit", "miss", "stale", "bypass"] {
                cache.with_label_values(&[s, r]);
            }
        }
        Ok(ProxyMetrics {
            requests,
            upstream_seconds,
            upstream_errors,
            refused_connections,
            observed,
            observe_errors,
            cache,
            stale_answers,
        })
    }
}
