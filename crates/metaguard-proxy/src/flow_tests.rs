//! Whole requests through [`Proxy::respond`] — decision, tokens, cache,
//! upstream — against the lab's IMDS and agent emulators on loopback
//! (no namespace, no rule: nothing leaves 127.0.0.1).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use http_body_util::BodyExt as _;
use hyper::http::request::Parts;
use metaguard_core::Config;
use metaguard_lab::agent::AgentEmulator;
use metaguard_lab::imds::{ImdsEmulator, ImdsSettings};
use proptest::prelude::*;

use crate::settings::Settings;
use crate::{Caller, Directory, IdKind, Kind, Origin, Owner, Ownership, Proxy, ProxyMetrics};

/// Who owns each credentials id: (workload, container).
const OWNERS: &[(&str, usize, &str)] = &[("id-c1", 0, "c1"), ("id-c2", 0, "c2"), ("id-b", 1, "b1")];

#[derive(Debug)]
struct Owners;

impl Directory for Owners {
    fn identify(&self, _: &Arc<Config>, _: Origin) -> Caller {
        Caller::default()
    }
    fn owner(&self, _: &Config, _: IdKind, id: &str) -> Ownership {
        OWNERS
            .iter()
            .find(|(i, _, _)| *i == id)
            .map_or(Ownership::Unknown, |(_, w, c)| {
                Ownership::Owned(Owner {
                    workload: Some(*w),
                    container: Some((*c).to_string()),
                    uncertain: false,
                })
            })
    }
}

/// The emulators, served on loopback by a runtime of their own.
struct Upstreams {
    imds: ImdsEmulator,
    agent: AgentEmulator,
    imds_addr: SocketAddr,
    agent_addr: SocketAddr,
    stop: Vec<tokio::task::AbortHandle>,
    _rt: tokio::runtime::Runtime,
}

fn upstreams() -> Upstreams {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let imds = ImdsEmulator::new(ImdsSettings::default());
    let agent = AgentEmulator::new();
    for (id, _, c) in OWNERS {
        agent.add_credentials(id, &format!("arn:aws:iam::111122223333:role/{c}"));
    }
    agent.add_credentials("id-free", "arn:aws:iam::111122223333:role/free");
    let (imds_addr, agent_addr, stop) = rt.block_on(async {
        let l1 = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let l2 = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let (a1, a2) = (
            l1.local_addr().expect("addr"),
            l2.local_addr().expect("addr"),
        );
        let (i, g) = (imds.clone(), agent.clone());
        let t1 = tokio::spawn(async move { i.serve(l1).await });
        let t2 = tokio::spawn(async move { g.serve(l2).await });
        (a1, a2, vec![t1.abort_handle(), t2.abort_handle()])
    });
    Upstreams {
        imds,
        agent,
        imds_addr,
        agent_addr,
        stop,
        _rt: rt,
    }
}

const POLICY: &str = r#"
[[workload]]
name            = "a"
bridges         = ["docker0"]
imds            = "proxy"
task_metadata   = "proxy"

[workload.imds_policy]
allow = ["/latest/api/token", "/latest/meta-data/instance-id", "/latest/meta-data/placement/**",
         "/latest/meta-data/iam/**"]

[[workload]]
name            = "b"
bridges         = ["br-b"]
imds            = "proxy"
task_metadata   = "allow"

[[workload]]
name            = "c"
bridges         = ["br-c"]
imds            = "deny"
task_metadata   = "proxy"
credentials_ids = ["id-free"]
"#;

/// The same workloads after a reload that narrows and widens: `a` loses
/// the role's credentials, `b` loses IMDS, `c` gains it (default
/// catalogue) and gives up the relay.
const POLICY_RELOADED: &str = r#"
[[workload]]
name            = "a"
bridges         = ["docker0"]
imds            = "proxy"
task_metadata   = "proxy"

[workload.imds_policy]
allow = ["/latest/api/token", "/latest/meta-data/instance-id"]

[[workload]]
name            = "b"
bridges         = ["br-b"]
imds            = "deny"
task_metadata   = "proxy"

[[workload]]
name            = "c"
bridges         = ["br-c"]
imds            = "proxy"
task_metadata   = "deny"
"#;

fn settings(u: &Upstreams, policy: &str, cache: bool, audit: &std::path::Path) -> Settings {
    let text = format!(
        "[proxy]\nrate = 1000000\nburst = 1000000\ncache = {cache}\naudit_log = \"{}\"\n{policy}",
        audit.display()
    );
    let c = Config::parse(&text, "test.toml").expect("valid config");
    let mut s = Settings::new(Arc::new(c)).expect("settings");
    s.upstreams.imds = u.imds_addr;
    s.upstreams.agent = u.agent_addr;
    s.upstream_hosts = [u.imds_addr, u.agent_addr].map(crate::handler::host_header);
    s
}

fn proxy(s: Settings) -> Arc<Proxy> {
    let metrics = ProxyMetrics::new(&prometheus::Registry::new()).expect("metrics");
    Proxy::new(Arc::new(Owners), metrics, s)
}

fn caller(workload: usize, container: Option<&str>) -> Caller {
    let ids = OWNERS
        .iter()
        .filter(|(_, _, c)| Some(*c) == container)
        .map(|(i, _, _)| (*i).to_string())
        .collect();
    Caller {
        workload: Some(workload),
        container: container.map(str::to_string),
        credentials_ids: ids,
        tmds_ids: Vec::new(),
        origin: format!("test port of {container:?}"),
        ..Caller::default()
    }
}

fn head(method: &str, host: &str, target: &str, headers: &[(&str, &str)]) -> Parts {
    let mut b = hyper::Request::builder()
        .method(method)
        .uri(target)
        .header("host", host);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).expect("request").into_parts().0
}

/// Status, headers and body of one request.
async fn send(
    p: &Proxy,
    kind: Kind,
    c: &Caller,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> (u16, hyper::HeaderMap, String) {
    let host = match kind {
        Kind::Imds => "169.254.169.254",
        Kind::Relay => "169.254.170.2",
    };
    let s = p.settings();
    let resp = p
        .respond(kind, c, &s, &head(method, host, target, headers), false)
        .await;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    (
        parts.status.as_u16(),
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

async fn token(p: &Proxy, c: &Caller) -> String {
    let (status, h, body) = send(
        p,
        Kind::Imds,
        c,
        "PUT",
        "/latest/api/token",
        &[("x-aws-ec2-metadata-token-ttl-seconds", "120")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(h["x-aws-ec2-metadata-token-ttl-seconds"], "120");
    body
}

fn temp(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("mg-proxy-flow-{}-{name}.jsonl", std::process::id()))
}

fn imds_gets(u: &Upstreams, path: &str) -> usize {
    u.imds
        .log()
        .entries()
        .iter()
        .filter(|e| e.method == "GET" && e.target == path)
        .count()
}

#[test]
fn tokens_are_bound_to_their_caller_and_keep_imds_ttl_rules() {
    let u = upstreams();
    run(async {
        let audit = temp("tokens");
        let p = proxy(settings(&u, POLICY, true, &audit));
        let (c1, c2) = (caller(0, Some("c1")), caller(0, Some("c2")));
        let t1 = token(&p, &c1).await;
        assert_eq!(t1.len(), 64);
        let id = "/latest/meta-data/instance-id";
        let tok = [("x-aws-ec2-metadata-token", t1.as_str())];
        let (status, h, body) = send(&p, Kind::Imds, &c1, "GET", id, &tok).await;
        assert_eq!((status, body.as_str()), (200, "i-0123456789abcdef0"));
        let left: u64 = h["x-aws-ec2-metadata-token-ttl-seconds"]
            .to_str()
            .expect("ascii")
            .parse()
            .expect("seconds");
        assert!(
            (119..=120).contains(&left),
            "the caller's token's time left: {left}"
        );
        // c1's token from c2, from another workload, or made up: 401.
        for (c, t) in [
            (&c2, t1.as_str()),
            (&caller(1, Some("c1")), t1.as_str()),
            (
                &c1,
                "0000000000000000000000000000000000000000000000000000000000000000",
            ),
        ] {
            let (status, _, body) = send(
                &p,
                Kind::Imds,
                c,
                "GET",
                id,
                &[("x-aws-ec2-metadata-token", t)],
            )
            .await;
            assert_eq!(status, 401, "{c:?}: {body}");
            assert!(body.contains("401 - Unauthorized"), "{body}");
        }
        // TTLs as IMDS checks them; no X-Forwarded-For.
        for ttl in [None, Some("0"), Some("21601"), Some("-1"), Some("1.5")] {
            let h: Vec<(&str, &str)> = ttl
                .map(|t| vec![("x-aws-ec2-metadata-token-ttl-seconds", t)])
                .unwrap_or_default();
            let (status, _, _) = send(&p, Kind::Imds, &c1, "PUT", "/latest/api/token", &h).await;
            assert_eq!(status, 400, "TTL {ttl:?}");
        }
        let (status, _, _) = send(
            &p,
            Kind::Imds,
            &c1,
            "PUT",
            "/latest/api/token",
            &[
                ("x-aws-ec2-metadata-token-ttl-seconds", "21600"),
                ("x-forwarded-for", "10.0.0.1"),
            ],
        )
        .await;
        assert_eq!(status, 403);
        // IMDSv1 passes as it came: IMDS (optional mode) answers it.
        let (status, _, body) = send(&p, Kind::Imds, &c1, "GET", id, &[]).await;
        assert_eq!((status, body.as_str()), (200, "i-0123456789abcdef0"));
        // IMDS saw one PUT — the proxy's own, for six hours — and no caller's
        // token.
        let log = u.imds.log().entries();
        let puts: Vec<_> = log.iter().filter(|e| e.method == "PUT").collect();
        assert_eq!(puts.len(), 1, "{log:?}");
        assert_eq!(
            puts[0]
                .headers
                .iter()
                .find(|(k, _)| k == "x-aws-ec2-metadata-token-ttl-seconds")
                .map(|(_, v)| v.as_str()),
            Some("21600")
        );
        assert!(log.iter().all(|e| e.headers.iter().all(|(_, v)| v != &t1)));
        let _ = std::fs::remove_file(&audit);
    });
}

#[test]
fn answers_that_may_be_kept_reach_the_upstream_once() {
    let u = upstreams();
    run(async {
        for cache in [true, false] {
            u.imds.log().clear();
            u.agent.log().clear();
            let audit = temp(&format!("cache-{cache}"));
            let p = proxy(settings(&u, POLICY, cache, &audit));
            let c1 = caller(0, Some("c1"));
            let t = token(&p, &c1).await;
            let tok = [("x-aws-ec2-metadata-token", t.as_str())];
            let role = "/latest/meta-data/iam/security-credentials/lab-instance-role";
            let paths = [
                "/latest/meta-data/instance-id",
                "/latest/meta-data/placement/availability-zone",
                role,
                "/latest/meta-data/iam/info",
            ];
            for _ in 0..5 {
                for path in paths {
                    let (status, _, body) = send(&p, Kind::Imds, &c1, "GET", path, &tok).await;
                    assert_eq!(status, 200, "{path}: {body}");
                }
                let (status, _, body) =
                    send(&p, Kind::Relay, &c1, "GET", "/v2/credentials/id-c1", &[]).await;
                assert_eq!(status, 200, "{body}");
            }
            let kept = if cache { 1 } else { 5 };
            for path in &paths[..3] {
                assert_eq!(imds_gets(&u, path), kept, "{path}, cache {cache}");
            }
            assert_eq!(imds_gets(&u, "/latest/meta-data/iam/info"), 5, "never kept");
            assert_eq!(
                u.agent.log().entries().len(),
                kept,
                "task credentials, cache {cache}"
            );
            p.settings().audit.flush();
            let lines = std::fs::read_to_string(&audit).unwrap_or_default();
            if cache {
                assert!(lines.contains("\"cache\":\"hit\""), "{lines}");
            } else {
                assert!(!lines.contains("\"cache\""), "{lines}");
            }
            let _ = std::fs::remove_file(&audit);
        }
    });
}

/// Runs `f` on a runtime of the test's own (the emulators have theirs).
fn run(f: impl std::future::Future<Output = ()>) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f);
}

/// The `Expiration` of a credentials answer.
fn expiration(body: &str) -> SystemTime {
    crate::cache::expiration(body.as_bytes()).expect("an Expiration")
}

#[test]
fn credentials_outlive_an_outage_until_expiration_and_never_past_it() {
    let mut u = upstreams();
    run(async {
        u.imds.set_credentials_lifetime(Duration::from_secs(4));
        u.agent.set_credentials_lifetime(Duration::from_secs(4));
        let audit = temp("stale");
        let metrics = ProxyMetrics::new(&prometheus::Registry::new()).expect("metrics");
        let p = Proxy::new(
            Arc::new(Owners),
            metrics.clone(),
            settings(&u, POLICY, true, &audit),
        );
        let c1 = caller(0, Some("c1"));
        let t = token(&p, &c1).await;
        let tok = [("x-aws-ec2-metadata-token", t.as_str())];
        let role = "/latest/meta-data/iam/security-credentials/lab-instance-role";
        let creds = "/v2/credentials/id-c1";
        let (s1, _, imds_doc) = send(&p, Kind::Imds, &c1, "GET", role, &tok).await;
        let (s2, _, task_doc) = send(&p, Kind::Relay, &c1, "GET", creds, &[]).await;
        assert_eq!((s1, s2), (200, 200));
        // IMDS and the agent go away: connections are refused.
        for s in u.stop.drain(..) {
            s.abort();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut failed_at: HashMap<&str, SystemTime> = HashMap::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(6);
        while std::time::Instant::now() < deadline {
            for (kind, path, doc, h) in [
                (Kind::Imds, role, &imds_doc, &tok[..]),
                (Kind::Relay, creds, &task_doc, &[][..]),
            ] {
                let (status, _, body) = send(&p, kind, &c1, "GET", path, h).await;
                let now = SystemTime::now();
                match status {
                    200 => {
                        assert_eq!(&body, doc, "only what was fetched before");
                        assert!(expiration(&body) > now, "served past Expiration");
                        assert!(
                            !failed_at.contains_key(path),
                            "{path}: a 200 after a failure"
                        );
                    }
                    502 => {
                        failed_at.entry(path).or_insert(now);
                    }
                    other => panic!("{other}: {body}"),
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Served until the guard before Expiration, then refused cleanly.
        for (path, doc) in [(role, &imds_doc), (creds, &task_doc)] {
            let at = failed_at
                .get(path)
                .copied()
                .expect("failed after Expiration");
            assert!(
                at + crate::cache::STALE_GUARD + Duration::from_millis(500) >= expiration(doc),
                "{path}: refused {:?} before Expiration",
                expiration(doc).duration_since(at)
            );
        }
        // Every stale answer audited and counted.
        p.settings().audit.flush();
        let lines = std::fs::read_to_string(&audit).unwrap_or_default();
        let audited = lines.matches("\"cache\":\"stale\"").count();
        let counted: u64 = ["imds", "task_metadata"]
            .iter()
            .map(|s| metrics.stale_answers.with_label_values(&[s]).get())
            .sum();
        assert!(audited >= 2, "{lines}");
        assert_eq!(audited as u64, counted);
        let _ = std::fs::remove_file(&audit);
    });
}

/// One request of a property case.
#[derive(Debug, Clone)]
struct Ask {
    workload: usize,
    container: Option<&'static str>,
    kind: Kind,
    target: String,
}

fn ask() -> impl Strategy<Value = Ask> {
    let imds_paths = prop::sample::select(vec![
        "/latest/meta-data/instance-id",
        "/latest/meta-data/placement/availability-zone",
        "/latest/meta-data/iam/security-credentials/lab-instance-role",
        "/latest/meta-data/iam/info",
        "/latest/meta-data/local-ipv4",
    ]);
    let ids = prop::sample::select(vec!["id-c1", "id-c2", "id-b", "id-free", "id-unknown"]);
    let target = prop_oneof![
        imds_paths.prop_map(|p| (Kind::Imds, p.to_string())),
        ids.prop_map(|i| (Kind::Relay, format!("/v2/credentials/{i}"))),
    ];
    (
        0..3usize,
        prop::sample::select(vec![None, Some("c1"), Some("c2"), Some("b1")]),
        target,
    )
        .prop_map(|(workload, container, (kind, target))| Ask {
            workload,
            container,
            kind,
            target,
        })
}

/// The upstreams every property case shares.
fn shared() -> &'static Upstreams {
    static U: OnceLock<Upstreams> = OnceLock::new();
    U.get_or_init(upstreams)
}

/// Status and decision of `a` asked of `p` (IMDS requests with a token
/// of `p`'s for the caller).
async fn outcome(p: &Proxy, a: &Ask, tokens: &mut HashMap<String, String>) -> (u16, String) {
    let c = caller(a.workload, a.container);
    let mut h = Vec::new();
    let key = format!("{}/{:?}", a.workload, a.container);
    if a.kind == Kind::Imds {
        if !tokens.contains_key(&key) {
            let (status, _, body) = send(
                p,
                Kind::Imds,
                &c,
                "PUT",
                "/latest/api/token",
                &[("x-aws-ec2-metadata-token-ttl-seconds", "600")],
            )
            .await;
            if status == 200 {
                tokens.insert(key.clone(), body);
            }
        }
        if let Some(t) = tokens.get(&key) {
            h.push(("x-aws-ec2-metadata-token", t.as_str()));
        }
    }
    let (status, _, body) = send(p, a.kind, &c, "GET", &a.target, &h).await;
    (status, body)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// The cache never widens access: over callers (workload, container),
    /// paths and credentials ids, the cache on and off give the same
    /// answers, also after a reload that changes who may see what
    /// (entries kept under the old policy are never served against the
    /// new one).
    #[test]
    fn decisions_are_identical_with_the_cache_on_and_off(
        before in prop::collection::vec(ask(), 1..12),
        after in prop::collection::vec(ask(), 1..12),
    ) {
        let u = shared();
        let audit = temp("prop");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            let on = proxy(settings(u, POLICY, true, &audit));
            let off = proxy(settings(u, POLICY, false, &audit));
            let (mut ton, mut toff) = (HashMap::new(), HashMap::new());
            for (i, asks) in [&before, &after].into_iter().enumerate() {
                if i == 1 {
                    on.reconfigure(settings(u, POLICY_RELOADED, true, &audit));
                    off.reconfigure(settings(u, POLICY_RELOADED, false, &audit));
                    // Tokens stay valid: bindings are by workload name.
                }
                for a in asks {
                    let x = outcome(&on, a, &mut ton).await;
                    let y = outcome(&off, a, &mut toff).await;
                    prop_assert_eq!(x.0, y.0, "{:?} (reloaded: {})", a, i == 1);
                    if x.0 == 200 {
                        prop_assert_eq!(&x.1, &y.1, "{:?}", a);
                    }
                }
            }
            Ok(())
        })?;
        let _ = std::fs::remove_file(&audit);
    }
}

/// Requests per round of a cost measurement: `MG_COST_N`, else `default`
/// (under callgrind a few thousand are enough for an exact count).
fn cost_rounds(default: u32) -> u32 {
    std::env::var("MG_COST_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The handler's own cost per cache hit, in process (no sockets between
/// client and proxy): `cargo test --release -p metaguard-proxy --
/// --ignored per_request_cost --nocapture`. Prints ns per request;
/// `MG_COST_N` sets the requests per round (200,000), and under `valgrind
/// --tool=callgrind` (`MG_COST_N=2000`) the inclusive instruction count of
/// `respond_on` over its calls is the user-space work per hit.
#[test]
#[ignore = "a measurement, run by hand"]
fn per_request_cost_of_a_cache_hit() {
    let u = upstreams();
    // MG_COST_AUDIT=/dev/null: the same without the file system's append.
    let own = temp("cost");
    let audit = std::env::var_os("MG_COST_AUDIT").map_or(own.clone(), std::path::PathBuf::from);
    let p = proxy(settings(&u, POLICY, true, &audit));
    let c1 = caller(0, Some("c1"));
    run(async {
        let t = token(&p, &c1).await;
        let h = head(
            "GET",
            "169.254.169.254",
            "/latest/meta-data/instance-id",
            &[("x-aws-ec2-metadata-token", t.as_str())],
        );
        let s = p.settings();
        let n = cost_rounds(200_000);
        for round in 0..3 {
            let started = std::time::Instant::now();
            for _ in 0..n {
                let r = p.respond(Kind::Imds, &c1, &s, &h, false).await;
                assert_eq!(r.status(), 200);
            }
            let ns = started.elapsed().as_nanos() / u128::from(n);
            eprintln!(
                "round {round}: {ns} ns per cache hit (audit to {})",
                audit.display()
            );
        }
    });
    let _ = std::fs::remove_file(&own);
}

/// An IMDSv1 `GET instance-id`: forwarded every time (v1 answers are
/// never kept).
fn v1_instance_id() -> Parts {
    head(
        "GET",
        "169.254.169.254",
        "/latest/meta-data/instance-id",
        &[],
    )
}

/// The proxy's own cost per forwarded request (a miss: IMDSv1, never
/// kept), in process: `Proxy::respond` up to and including the upstream
/// exchange with the in-process IMDS emulator over loopback (no socket
/// between client and proxy). `cargo test --release -p metaguard-proxy --
/// --ignored per_request_cost_of_a_miss --nocapture` prints µs per miss;
/// `MG_COST_N` sets the requests per round (20,000). Under `valgrind
/// --tool=callgrind` (`MG_COST_N=2000`) the inclusive instruction count
/// of `respond_on` over its calls is the user-space work per miss, exact
/// and repeatable however noisy the machine (BENCHMARKS.md, "Metadata
/// proxy").
#[test]
#[ignore = "a measurement, run by hand"]
fn per_request_cost_of_a_miss() {
    let u = upstreams();
    let audit = temp("miss-cost");
    let p = proxy(settings(&u, POLICY, true, &audit));
    let c1 = caller(0, Some("c1"));
    let h = v1_instance_id();
    let n = cost_rounds(20_000);
    run(async {
        let s = p.settings();
        for round in 0..3 {
            let started = std::time::Instant::now();
            for _ in 0..n {
                let r = p.respond(Kind::Imds, &c1, &s, &h, false).await;
                assert_eq!(r.status(), 200);
            }
            let us = started.elapsed().as_secs_f64() * 1e6 / f64::from(n);
            eprintln!("round {round}: {us:.1} µs per miss");
        }
    });
    assert!(imds_gets(&u, "/latest/meta-data/instance-id") >= 3 * n as usize);
    let _ = std::fs::remove_file(&audit);
}

/// What `observe` costs against `proxy` per forwarded request, in process:
/// the same IMDSv1 `GET instance-id`, forwarded to the emulator every
/// time (v1 is never cached), under `imds = "proxy"` and under `imds =
/// "observe"` with a record per request, rounds alternating.
/// `cargo test --release -p metaguard-proxy -- --ignored observe_vs_proxy
/// --nocapture`. A measurement, not a check.
#[test]
#[ignore = "a measurement; run it by name"]
fn per_request_cost_observe_vs_proxy() {
    let u = upstreams();
    let audit = temp("observe-cost-audit");
    let dir = temp("observe-cost-log");
    let log = Arc::new(
        crate::observe::ObserveLog::open(&dir, crate::observe::Caps::default()).expect("open"),
    );
    let text = |action: &str| {
        format!("[[workload]]\nname = \"a\"\nbridges = [\"docker0\"]\nimds = \"{action}\"\n")
    };
    let proxied = proxy(settings(&u, &text("proxy"), true, &audit));
    let observed = proxy(settings(&u, &text("observe"), true, &audit).with_observe(Some(log)));
    let c1 = caller(0, Some("c1"));
    let h = v1_instance_id();
    run(async {
        let n = 5_000u32;
        for round in 0..3 {
            for (name, p) in [("proxy", &proxied), ("observe", &observed)] {
                let s = p.settings();
                let started = std::time::Instant::now();
                for _ in 0..n {
                    let r = p.respond(Kind::Imds, &c1, &s, &h, false).await;
                    assert_eq!(r.status(), 200, "{name}");
                }
                let us = started.elapsed().as_secs_f64() * 1e6 / f64::from(n);
                eprintln!("round {round}: {name}: {us:.1} µs per forwarded request");
            }
        }
    });
    let _ = std::fs::remove_file(&audit);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Observed traffic is never refused by `[proxy]` limits (docs/observe.md,
/// "Limits"): the same burst of requests and connections that `proxy`
/// throttles (429) and closes is served under `observe`, and each record
/// says which limit `proxy` would have refused it for.
#[test]
fn observed_traffic_over_the_limits_is_served_and_proxied_traffic_is_not() {
    let u = upstreams();
    let audit = temp("limits-audit");
    let dir = temp("limits-observe");
    let log = Arc::new(
        crate::observe::ObserveLog::open(&dir, crate::observe::Caps::default()).expect("open"),
    );
    // 1 request per second, a burst of 3, 2 connections.
    let limited = |action: &str| {
        let policy = if action == "proxy" {
            "\n[workload.imds_policy]\nallow = [\"/latest/meta-data/instance-id\"]\n"
        } else {
            ""
        };
        let text = format!(
            "[proxy]\nrate = 1\nburst = 3\nmax_connections = 2\naudit_log = \"{}\"\n\n\
             [[workload]]\nname = \"a\"\nbridges = [\"docker0\"]\nimds = \"{action}\"\n{policy}",
            audit.display()
        );
        let c = Config::parse(&text, "test.toml").expect("valid config");
        let mut s = Settings::new(Arc::new(c)).expect("settings");
        s.upstreams.imds = u.imds_addr;
        s.upstreams.agent = u.agent_addr;
        s.upstream_hosts = [u.imds_addr, u.agent_addr].map(crate::handler::host_header);
        s
    };
    let proxied = proxy(limited("proxy"));
    let observed = proxy(limited("observe").with_observe(Some(log)));
    let c1 = caller(0, Some("c1"));
    let id = "/latest/meta-data/instance-id";
    let n = 10;
    run(async {
        // Requests: proxy serves the burst (and what the rate refills
        // meanwhile), then answers 429; observe serves all of them.
        let started = std::time::Instant::now();
        let mut statuses = Vec::new();
        for _ in 0..n {
            statuses.push(send(&proxied, Kind::Imds, &c1, "GET", id, &[]).await.0);
        }
        let refill = started.elapsed().as_secs() as usize + 1;
        let served = statuses.iter().filter(|s| **s == 200).count();
        assert!(
            statuses.contains(&429) && served >= 3 && served <= 3 + refill,
            "proxy: {statuses:?}"
        );
        let started = std::time::Instant::now();
        for _ in 0..n {
            let (status, _, body) = send(&observed, Kind::Imds, &c1, "GET", id, &[]).await;
            assert_eq!(status, 200, "observe is never throttled: {body}");
        }
        let refill = started.elapsed().as_secs() as usize + 1;
        let r = crate::observe::read(&dir, None).expect("read");
        assert_eq!(r.records.len(), n);
        assert!(r.records.iter().all(|r| r.decision == "allow"), "{r:?}");
        let over: Vec<Option<&str>> = r.records.iter().map(|r| r.over_limit.as_deref()).collect();
        assert_eq!(over[..3], [None, None, None], "the burst: {over:?}");
        let flagged = over.iter().filter(|o| **o == Some("rate")).count();
        assert!(
            flagged >= (n - 3).saturating_sub(refill),
            "over the rate: {over:?}"
        );

        // Connections: proxy closes the third; observe admits it, and its
        // requests' records say proxy would have closed it.
        for (p, observe) in [(&proxied, false), (&observed, true)] {
            let s = p.settings();
            let held: Vec<_> = (0..2).map(|_| p.admit(&s, Kind::Imds, &c1)).collect();
            assert!(held.iter().all(|h| matches!(h, Some((_, false)))));
            let third = p.admit(&s, Kind::Imds, &c1);
            match third {
                None => assert!(!observe, "observe refused a connection"),
                Some((_, over)) => assert!(observe && over, "proxy: a third connection"),
            }
        }
        let s = observed.settings();
        let h = head("GET", "169.254.169.254", id, &[]);
        let resp = observed
            .respond_on(Kind::Imds, &c1, &s, &h, false, true)
            .await;
        assert_eq!(resp.status(), 200);
        let r = crate::observe::read(&dir, None).expect("read");
        assert_eq!(
            r.records.last().and_then(|r| r.over_limit.as_deref()),
            Some("connections")
        );
    });
    let _ = std::fs::remove_file(&audit);
    let _ = std::fs::remove_dir_all(&dir);
}
