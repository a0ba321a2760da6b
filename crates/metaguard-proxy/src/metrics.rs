//! The proxy's Prometheus metrics, registered on the daemon's registry.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
};

use crate::Kind;

/// Distinguishes the metrics of one proxy from another's in a thread's
/// cache of counters (tests run several proxies in one process).
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Counters a worker thread has looked up, at most this many; the cache
/// starts again when full (a reload that renames workloads, or statuses
/// beyond the usual few).
const THREAD_CACHE: usize = 64;

/// A request counter, by (metrics, service, decision, status, workload).
struct Cached {
    id: u64,
    kind: Kind,
    decision: &'static str,
    status: u16,
    workload: Box<str>,
    counter: IntCounter,
}

thread_local! {
    /// Counting a request is then an atomic add: no label hashing, no
    /// lock, no allocation (prometheus's `with_label_values` does all
    /// three, ~40 ns a call).
    static REQUESTS: RefCell<Vec<Cached>> = const { RefCell::new(Vec::new()) };
}

#[derive(Debug, Clone)]
pub struct ProxyMetrics {
    /// See [`NEXT_ID`].
    id: u64,
    /// `cache` by service and result, looked up once.
    cache_counters: [[IntCounter; 4]; 2],
    /// `upstream_seconds` by service, looked up once.
    upstream_histograms: [Histogram; 2],
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
        let cache_counters = ["imds", "task_metadata"]
            .map(|s| ["hit", "miss", "stale", "bypass"].map(|r| cache.with_label_values(&[s, r])));
        let upstream_histograms =
            ["imds", "task_metadata"].map(|s| upstream_seconds.with_label_values(&[s]));
        Ok(ProxyMetrics {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            cache_counters,
            upstream_histograms,
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

impl ProxyMetrics {
    /// Counts one request in `metaguard_proxy_requests_total`.
    pub(crate) fn count_request(
        &self,
        kind: Kind,
        workload: &str,
        decision: &'static str,
        status: u16,
    ) {
        REQUESTS.with_borrow_mut(|cache| {
            if let Some(c) = cache.iter().find(|c| {
                c.id == self.id
                    && c.kind == kind
                    && c.status == status
                    && c.decision == decision
                    && *c.workload == *workload
            }) {
                c.counter.inc();
                return;
            }
            let counter = self.requests.with_label_values(&[
                kind.as_str(),
                workload,
                decision,
                &status.to_string(),
            ]);
            counter.inc();
            if cache.len() >= THREAD_CACHE {
                cache.clear();
            }
            cache.push(Cached {
                id: self.id,
                kind,
                decision,
                status,
                workload: workload.into(),
                counter,
            });
        });
    }

    /// Records how long one upstream exchange of `kind` took.
    pub(crate) fn observe_upstream(&self, kind: Kind, took: std::time::Duration) {
        self.upstream_histograms[usize::from(kind != Kind::Imds)].observe(took.as_secs_f64());
    }

    /// Counts one request the answer cache was asked for.
    pub(crate) fn count_cache(&self, kind: Kind, result: crate::cache::Source) {
        let k = usize::from(kind != Kind::Imds);
        let r = match result {
            crate::cache::Source::Hit => 0,
            crate::cache::Source::Miss => 1,
            crate::cache::Source::Stale => 2,
            crate::cache::Source::Bypass => 3,
        };
        self.cache_counters[k][r].inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What counting one request costs: `cargo test --release -p
    /// metaguard-proxy -- --ignored metrics_cost --nocapture`.
    #[test]
    #[ignore = "a measurement, run by hand"]
    fn metrics_cost_per_request() {
        let m = ProxyMetrics::new(&Registry::new()).expect("metrics");
        let n = 2_000_000u32;
        for round in 0..3 {
            let started = std::time::Instant::now();
            for i in 0..n {
                let status = if i % 7 == 0 { 403u16 } else { 200 };
                m.requests
                    .with_label_values(&["imds", "containers", "allow", &status.to_string()])
                    .inc();
                m.cache.with_label_values(&["imds", "hit"]).inc();
            }
            let labels = started.elapsed().as_nanos() / u128::from(n);
            let started = std::time::Instant::now();
            for i in 0..n {
                let status = if i % 7 == 0 { 403u16 } else { 200 };
                m.count_request(Kind::Imds, "containers", "allow", status);
                m.count_cache(Kind::Imds, crate::cache::Source::Hit);
            }
            let cached = started.elapsed().as_nanos() / u128::from(n);
            eprintln!(
                "round {round}: per request, two with_label_values {labels} ns; \
                 count_request + count_cache {cached} ns"
            );
        }
    }

    #[test]
    fn cached_counters_count_what_with_label_values_would() {
        let m = ProxyMetrics::new(&Registry::new()).expect("metrics");
        let other = ProxyMetrics::new(&Registry::new()).expect("metrics");
        for _ in 0..3 {
            m.count_request(Kind::Imds, "a", "allow", 200);
        }
        m.count_request(Kind::Imds, "a", "deny", 403);
        m.count_request(Kind::Relay, "a", "allow", 200);
        m.count_request(Kind::Imds, "b", "allow", 200);
        other.count_request(Kind::Imds, "a", "allow", 200);
        m.count_cache(Kind::Relay, crate::cache::Source::Stale);
        let get = |m: &ProxyMetrics, l: [&str; 4]| m.requests.with_label_values(&l).get();
        assert_eq!(get(&m, ["imds", "a", "allow", "200"]), 3);
        assert_eq!(get(&m, ["imds", "a", "deny", "403"]), 1);
        assert_eq!(get(&m, ["task_metadata", "a", "allow", "200"]), 1);
        assert_eq!(get(&m, ["imds", "b", "allow", "200"]), 1);
        assert_eq!(
            get(&other, ["imds", "a", "allow", "200"]),
            1,
            "its own registry"
        );
        assert_eq!(
            m.cache.with_label_values(&["task_metadata", "stale"]).get(),
            1
        );
        assert_eq!(m.cache.with_label_values(&["imds", "stale"]).get(), 0);
        // More series than the thread's cache holds: still all counted.
        for s in 0..(THREAD_CACHE as u16 * 2) {
            m.count_request(Kind::Imds, "many", "allow", 300 + s);
        }
        m.count_request(Kind::Imds, "many", "allow", 300);
        assert_eq!(get(&m, ["imds", "many", "allow", "300"]), 2);
    }
}
