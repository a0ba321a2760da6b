use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use proptest::prelude::*;

use super::*;

/// Workloads by index: 0 `imds = "proxy"`, `task_metadata = "proxy"`,
/// `tmds = "redact"`, own `credentials_ids`; 1 `allow` everywhere; 2 `deny`
/// everywhere; 3 `task_metadata = "proxy"` with `tmds = "allow"`; 4
/// `tmds = "deny"`.
const CONFIG: &str = r#"
[[workload]]
name = "proxied"
bridges = ["br-p"]
imds = "proxy"
task_metadata = "proxy"
credentials_ids = ["listed-id"]

[[workload]]
name = "open"
bridges = ["br-o"]
imds = "allow"
task_metadata = "allow"

[[workload]]
name = "closed"
bridges = ["br-c"]
imds = "deny"
task_metadata = "deny"

[[workload]]
name = "tmds-allow"
bridges = ["br-a"]
task_metadata = "proxy"
tmds = "allow"

[[workload]]
name = "tmds-deny"
bridges = ["br-d"]
task_metadata = "proxy"
tmds = "deny"
"#;

fn config() -> Arc<Config> {
    Arc::new(Config::parse(CONFIG, "test.toml").expect("valid config"))
}

fn caller(workload: usize) -> Caller {
    Caller {
        workload: Some(workload),
        container: Some(format!("c{workload}")),
        credentials_ids: vec![format!("own-{workload}")],
        tmds_ids: vec![format!("tmds-{workload}")],
        origin: format!("test caller of workload {workload}"),
        ..Caller::default()
    }
}

fn get(target: &str) -> Request<'_> {
    Request {
        method: "GET",
        target,
        host: Some("169.254.169.254"),
        ..Request::default()
    }
}

/// A directory that knows the owners it is given and records what it was
/// asked.
#[derive(Default)]
struct FakeDirectory {
    owners: HashMap<(IdKind, String), Ownership>,
    asked: Mutex<Vec<(IdKind, String)>>,
}

impl FakeDirectory {
    fn with(mut self, kind: IdKind, id: &str, o: Ownership) -> Self {
        self.owners.insert((kind, id.to_string()), o);
        self
    }
    fn asked(&self) -> Vec<(IdKind, String)> {
        self.asked.lock().map(|a| a.clone()).unwrap_or_default()
    }
}

impl Directory for FakeDirectory {
    fn identify(&self, _config: &Arc<Config>, origin: Origin) -> Caller {
        Caller::identification_failed(origin.mark)
    }
    fn owner(&self, _config: &Config, kind: IdKind, id: &str) -> Ownership {
        if let Ok(mut a) = self.asked.lock() {
            a.push((kind, id.to_string()));
        }
        self.owners
            .get(&(kind, id.to_string()))
            .cloned()
            .unwrap_or(Ownership::Unknown)
    }
}

fn owned_by(workload: usize, container: &str) -> Ownership {
    Ownership::Owned(Owner {
        workload: Some(workload),
        container: Some(container.to_string()),
        uncertain: false,
    })
}

/// A case's expected status (200: forwarded), decision and rule.
type Expected = (u16, &'static str, &'static str);

/// What a verdict comes to: the status (200 for forwarded), the decision
/// and the rule.
fn outcome(v: &Verdict) -> (u16, &'static str, String) {
    match v {
        Verdict::Refuse(r) => (r.status, r.decision, r.rule.clone()),
        Verdict::Forward(f) => (200, "forward", f.rule.clone()),
    }
}

fn run(dir: &FakeDirectory, kind: Kind, who: &Caller, req: &Request<'_>) -> Verdict {
    decide_with(dir, &config(), kind, who, req, |_| true)
}

#[test]
fn requests_are_checked_before_the_caller_and_the_caller_before_anything_else() {
    let dir = FakeDirectory::default();
    let unknown = Caller {
        origin: "no metaguard mark".into(),
        ..Caller::default()
    };
    let lengths: [&[u8]; 2] = [b"0", b"0"];
    let body: [&[u8]; 1] = [b"5"];
    let zero: [&[u8]; 1] = [b"0"];
    let cases: Vec<(&str, Request<'_>, &Caller, Expected)> = vec![
        (
            "absolute-form",
            Request {
                absolute: true,
                ..get("/latest/meta-data/")
            },
            &unknown,
            (
                400,
                "invalid",
                "only origin-form request targets (/path) are accepted",
            ),
        ),
        (
            "a Host elsewhere",
            Request {
                host: Some("example.com"),
                ..get("/latest/meta-data/")
            },
            &unknown,
            (
                400,
                "invalid",
                "the Host header does not name a metadata endpoint",
            ),
        ),
        (
            "Transfer-Encoding",
            Request {
                transfer_encoding: true,
                ..get("/")
            },
            &unknown,
            (
                400,
                "invalid",
                "Transfer-Encoding is not accepted (metadata requests have no body)",
            ),
        ),
        (
            "two Content-Lengths",
            Request {
                content_lengths: &lengths,
                ..get("/")
            },
            &unknown,
            (400, "invalid", "more than one Content-Length"),
        ),
        (
            "a body",
            Request {
                content_lengths: &body,
                ..get("/")
            },
            &unknown,
            (
                400,
                "invalid",
                "a request body is not accepted (Content-Length must be 0)",
            ),
        ),
        (
            "unidentified, fail closed",
            Request {
                content_lengths: &zero,
                host: None,
                ..get("/latest/meta-data/")
            },
            &unknown,
            (403, "deny", "unidentified caller (no metaguard mark)"),
        ),
    ];
    for (what, req, who, (status, decision, rule)) in cases {
        for kind in [Kind::Imds, Kind::Relay] {
            let v = run(&dir, kind, who, &req);
            assert_eq!(outcome(&v), (status, decision, rule.to_string()), "{what}");
        }
    }
    // A workload index the config does not have is no workload.
    let stale = Caller {
        workload: Some(99),
        ..caller(0)
    };
    let v = run(&dir, Kind::Imds, &stale, &get("/latest/meta-data/"));
    assert_eq!(outcome(&v).0, 403);
    assert!(dir.asked().is_empty());
}

#[test]
fn the_rate_limit_is_asked_once_and_only_of_identified_callers_with_good_requests() {
    let cfg = config();
    let mut asked = Vec::new();
    let bad = Request {
        host: Some("example.com"),
        ..get("/")
    };
    let step = decide(&cfg, Kind::Imds, &caller(1), &bad, |w| {
        asked.push(w);
        true
    });
    assert!(matches!(step, Step::Done(Verdict::Refuse(_))));
    let step = decide(&cfg, Kind::Imds, &Caller::default(), &get("/"), |w| {
        asked.push(w);
        true
    });
    assert!(matches!(step, Step::Done(Verdict::Refuse(_))));
    assert!(asked.is_empty(), "{asked:?}");
    // Throttled before the action or the path is looked at.
    let step = decide(&cfg, Kind::Imds, &caller(2), &get("/%zz"), |w| {
        asked.push(w);
        false
    });
    let Step::Done(v) = step else {
        panic!("a throttled request needs no owner")
    };
    assert_eq!(
        outcome(&v),
        (429, "throttle", "rate limit (40 rps, burst 60)".into())
    );
    assert_eq!(asked, vec![Some(2)]);
}

#[test]
fn imds_decisions_follow_the_action_the_method_and_the_path_policy() {
    let dir = FakeDirectory::default();
    let put = |target| Request {
        method: "PUT",
        ..get(target)
    };
    let cases: Vec<(usize, Request<'_>, (u16, &str, &str))> = vec![
        (
            2,
            get("/latest/meta-data/"),
            (403, "deny", "imds = \"deny\""),
        ),
        (
            2,
            get("/%zz"),
            (403, "deny", "imds = \"deny\""), // deny wins over a bad path
        ),
        (
            1,
            get("/latest/meta-data/iam/"),
            (200, "forward", "imds = \"allow\""),
        ),
        (1, put("/anything"), (200, "forward", "imds = \"allow\"")),
        (
            1,
            get("/a/../../b"),
            (400, "invalid", "canonical path: `..` escapes the root"),
        ),
        (
            0,
            get("/latest/meta-data/instance-id"),
            (200, "forward", "allow /latest/meta-data/instance-id"),
        ),
        (
            0,
            get("/latest/meta-data/iam/security-credentials/"),
            (403, "deny", "deny /latest/meta-data/iam/**"),
        ),
        (
            0,
            get("/latest/meta-data/unknown-category"),
            (403, "deny", "default deny (not in the allowed catalogue)"),
        ),
        (
            0,
            put("/latest/api/token"),
            (200, "forward", "allow /latest/api/token"),
        ),
        (
            0,
            Request {
                forwarded_for: true,
                ..put("/latest/api/token")
            },
            (
                403,
                "deny",
                "token PUT with X-Forwarded-For (IMDS refuses these too)",
            ),
        ),
        (
            0,
            put("/latest/meta-data/instance-id"),
            (405, "deny", "method PUT is not served on this path"),
        ),
        (
            0,
            Request {
                method: "get",
                ..get("/latest/meta-data/instance-id")
            },
            (405, "deny", "method get is not served on this path"),
        ),
        (
            0,
            get("/latest/meta-data/?x=1"),
            (
                400,
                "invalid",
                "canonical path: query parameter \"x\" is not accepted on this path",
            ),
        ),
    ];
    for (w, req, (status, decision, rule)) in cases {
        let v = run(&dir, Kind::Imds, &caller(w), &req);
        assert_eq!(
            outcome(&v),
            (status, decision, rule.to_string()),
            "workload {w}: {} {}",
            req.method,
            req.target
        );
    }
    // What is forwarded is the canonical form, never the raw target.
    let v = run(
        &dir,
        Kind::Imds,
        &caller(0),
        &get("//latest/./meta-data/x/../instance-id"),
    );
    let Verdict::Forward(f) = v else {
        panic!("allowed: {v:?}")
    };
    assert_eq!(f.target, "/latest/meta-data/instance-id");
    assert_eq!(f.kind, Kind::Imds);
    assert_eq!(f.redact_for, None);
    assert!(dir.asked().is_empty(), "IMDS never needs an owner");
}

#[test]
fn credentials_ids_are_served_to_their_owners_only_f13() {
    let other_proxied = owned_by(0, "c-other");
    let cases: Vec<(usize, &str, Option<Ownership>, Expected)> = vec![
        // Proxied: own ids only, the directory is never asked.
        (
            0,
            "/v2/credentials/own-0",
            None,
            (200, "forward", "credentials id owned by the caller"),
        ),
        (
            0,
            "/v1/credentials?id=listed-id",
            None,
            (200, "forward", "credentials id owned by the caller"),
        ),
        (
            0,
            "/v2/credentials/own-1",
            None,
            (
                403,
                "deny",
                "credentials id not owned by this workload (F13)",
            ),
        ),
        (
            0,
            "/v2/metadata",
            None,
            (
                403,
                "deny",
                "not a credentials or task metadata path (default deny)",
            ),
        ),
        // Allowed: anything but what a proxied workload or a stopped
        // container owns.
        (
            1,
            "/v2/credentials/own-1",
            None,
            (200, "forward", "credentials id owned by the caller"),
        ),
        (
            1,
            "/v2/credentials/nobodys",
            Some(Ownership::Unknown),
            (200, "forward", "task_metadata = \"allow\""),
        ),
        (
            1,
            "/v2/credentials/proxied-id",
            Some(other_proxied),
            (
                403,
                "deny",
                "credentials id owned by another, proxied workload (F13)",
            ),
        ),
        (
            1,
            "/v2/credentials/open-id",
            Some(owned_by(1, "c-another")),
            (200, "forward", "task_metadata = \"allow\""),
        ),
        (
            1,
            "/v2/credentials/mine-anyway",
            Some(owned_by(0, "c1")),
            (200, "forward", "task_metadata = \"allow\""),
        ),
        (
            1,
            "/v2/credentials/uncertain-id",
            Some(Ownership::Owned(Owner {
                workload: None,
                container: Some("c-x".into()),
                uncertain: true,
            })),
            (
                403,
                "deny",
                "credentials id owned by another, proxied workload (F13)",
            ),
        ),
        (
            1,
            "/v1/credentials?id=revoked-id",
            Some(Ownership::Revoked),
            (
                403,
                "deny",
                "credentials id of a container that has stopped (revoked)",
            ),
        ),
        (
            1,
            "/v2/metadata",
            None,
            (200, "forward", "task_metadata = \"allow\""),
        ),
        (
            2,
            "/v2/credentials/own-2",
            None,
            (403, "deny", "task_metadata = \"deny\""),
        ),
    ];
    for (w, target, owner, (status, decision, rule)) in cases {
        let id = target.rsplit(['/', '=']).next().unwrap_or_default();
        let dir = match &owner {
            Some(o) => FakeDirectory::default().with(IdKind::Credentials, id, o.clone()),
            None => FakeDirectory::default(),
        };
        let v = run(&dir, Kind::Relay, &caller(w), &get(target));
        assert_eq!(
            outcome(&v),
            (status, decision, rule.to_string()),
            "workload {w}: {target}"
        );
        let expected: Vec<(IdKind, String)> = owner
            .iter()
            .map(|_| (IdKind::Credentials, id.to_string()))
            .collect();
        assert_eq!(dir.asked(), expected, "workload {w}: {target}");
    }
}

#[test]
fn task_metadata_follows_tmds_and_endpoint_id_ownership() {
    let cases: Vec<(usize, &str, Option<Ownership>, Expected)> = vec![
        (
            0,
            "/v4/tmds-0",
            None,
            (200, "forward", "tmds = \"redact\" (v4)"),
        ),
        (
            0,
            "/v3/tmds-0/task",
            None,
            (200, "forward", "tmds = \"redact\" (v3)"),
        ),
        (
            0,
            "/v4/tmds-0/task/stats",
            None,
            (403, "deny", "tmds = \"redact\": statistics are not served"),
        ),
        (
            0,
            "/v4/tmds-1",
            None,
            (
                403,
                "deny",
                "task metadata endpoint id not owned by the caller",
            ),
        ),
        (
            3,
            "/v4/tmds-3/stats",
            None,
            (200, "forward", "tmds = \"allow\" (v4)"),
        ),
        (4, "/v4/tmds-4", None, (403, "deny", "tmds = \"deny\"")),
        (
            1,
            "/v4/tmds-1",
            None,
            (200, "forward", "task_metadata = \"allow\""),
        ),
        (
            1,
            "/v4/tmds-0",
            Some(owned_by(0, "c0")),
            (
                403,
                "deny",
                "task metadata endpoint id owned by another, proxied workload (F13)",
            ),
        ),
        (
            1,
            "/v3/gone",
            Some(Ownership::Revoked),
            (
                403,
                "deny",
                "task metadata endpoint id of a container that has stopped (revoked)",
            ),
        ),
    ];
    for (w, target, owner, (status, decision, rule)) in cases {
        let id = target.split('/').nth(2).unwrap_or_default();
        let dir = match &owner {
            Some(o) => FakeDirectory::default().with(IdKind::TaskMetadata, id, o.clone()),
            None => FakeDirectory::default(),
        };
        let v = run(&dir, Kind::Relay, &caller(w), &get(target));
        assert_eq!(
            outcome(&v),
            (status, decision, rule.to_string()),
            "workload {w}: {target}"
        );
        if let Verdict::Forward(f) = &v {
            let redacted = f.rule.starts_with("tmds = \"redact\"");
            assert_eq!(
                f.redact_for,
                redacted.then(|| Some(format!("c{w}"))),
                "{target}"
            );
        }
        assert_eq!(dir.asked().len(), usize::from(owner.is_some()), "{target}");
    }
}

#[test]
fn a_relay_method_other_than_get_or_head_is_refused() {
    let dir = FakeDirectory::default();
    for w in [0, 1] {
        let v = run(
            &dir,
            Kind::Relay,
            &caller(w),
            &Request {
                method: "POST",
                ..get("/v2/credentials/own-0")
            },
        );
        assert_eq!(
            outcome(&v),
            (
                405,
                "deny",
                "method POST is not served by the credentials endpoint".into()
            )
        );
    }
}

#[test]
fn credentials_ids_are_shortened_in_the_log() {
    let dir = FakeDirectory::default();
    for (target, logged) in [
        ("/v2/credentials/own-0", "/v2/credentials/own-…"),
        ("/v1/credentials?id=listed-id", "/v1/credentials?id=list…"),
        ("/v4/tmds-0", "/v4/tmds-0"),
    ] {
        let Verdict::Forward(f) = run(&dir, Kind::Relay, &caller(0), &get(target)) else {
            panic!("{target} is the caller's own")
        };
        assert_eq!(f.path, logged);
    }
    // A refused target without a canonical form is logged raw, cut short.
    let long = format!("/{}%zz", "a".repeat(300));
    let Verdict::Refuse(r) = run(&dir, Kind::Imds, &caller(1), &get(&long)) else {
        panic!("no canonical form")
    };
    assert_eq!(r.path.chars().count(), 200);
}

#[test]
fn host_header_must_name_an_endpoint() {
    let c = Config::builtin_default();
    for good in [
        "169.254.169.254",
        "169.254.169.254:80",
        "169.254.170.2",
        "169.254.170.2:9470",
        "[fd00:ec2::254]",
        "[fd00:ec2::254]:80",
        "[FD00:EC2::254]:80",
        " 169.254.169.254 ",
        "instance-data",
        "INSTANCE-DATA:80",
        "Instance-Data.EC2.Internal",
    ] {
        assert!(host_ok(&c, Some(good)), "{good}");
    }
    for bad in [
        "example.com",
        "127.0.0.1:51679",
        "169.254.169.254.evil",
        "10.0.0.1",
        "",
    ] {
        assert!(!host_ok(&c, Some(bad)), "{bad}");
    }
    assert!(host_ok(&c, None), "HTTP/1.0 without Host");
}

proptest! {
    /// Whatever the target and method: an unidentified caller is never
    /// forwarded, and what is forwarded is canonical (canonicalising it
    /// again changes nothing), so what was decided on is what is sent.
    #[test]
    fn only_canonical_targets_of_identified_callers_are_forwarded(
        target in "/[a-z0-9/.%?=&-]{0,40}",
        method in prop::sample::select(vec!["GET", "HEAD", "PUT", "POST"]),
        workload in prop::option::of(0usize..6),
        relay in any::<bool>(),
    ) {
        let cfg = config();
        let kind = if relay { Kind::Relay } else { Kind::Imds };
        let who = Caller { workload, ..caller(workload.unwrap_or(0)) };
        let req = Request { method, ..get(&target) };
        let dir = FakeDirectory::default();
        let v = decide_with(&dir, &cfg, kind, &who, &req, |_| true);
        if let Verdict::Forward(f) = v {
            prop_assert!(workload.is_some_and(|w| w < cfg.workloads.len()));
            let allowed: &[&str] = if relay { &["id"] } else { &[] };
            let again = canonical(&f.target, allowed).map(|c| c.target());
            prop_assert_eq!(again.as_deref(), Ok(f.target.as_str()));
        }
    }
}

#[test]
fn observe_is_decided_as_allow_whatever_the_path_policy_would_say() {
    // Under mode = "observe" the proxied and denying workloads observe:
    // every well-formed request is forwarded, the rule names observe, and
    // a foreign id is still asked about as under allow (F13 holds).
    let c = Arc::new(
        Config::parse(&format!("mode = \"observe\"\n{CONFIG}"), "test.toml").expect("valid"),
    );
    for w in [0, 2] {
        let v = decide_with(
            &FakeDirectory::default(),
            &c,
            Kind::Imds,
            &caller(w),
            &get("/latest/meta-data/iam/security-credentials/role"),
            |_| true,
        );
        let Verdict::Forward(f) = v else {
            panic!("workload {w}: {v:?}")
        };
        assert_eq!(f.rule, "imds = \"observe\"");
    }
    // No rate limit of metaguard's own: the limiter is not even asked.
    let v = decide_with(
        &FakeDirectory::default(),
        &c,
        Kind::Imds,
        &caller(0),
        &get("/latest/meta-data/instance-id"),
        |_| panic!("observe asked the rate limiter"),
    );
    assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
    let step = decide(
        &c,
        Kind::Relay,
        &caller(0),
        &get("/v2/credentials/foreign"),
        |_| true,
    );
    assert!(matches!(step, Step::AskOwner(_)), "{step:?}");
    // A malformed target is still refused: observe forwards only what
    // allow would.
    let v = decide_with(
        &FakeDirectory::default(),
        &c,
        Kind::Imds,
        &caller(0),
        &get("/latest/%2e%2e/x%2f"),
        |_| true,
    );
    assert!(matches!(v, Verdict::Refuse(_)), "{v:?}");
}
