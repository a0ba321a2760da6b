use std::sync::atomic::AtomicUsize;

use super::*;

fn key(target: &str) -> Key {
    Key {
        kind: Kind::Imds,
        target: target.into(),
        authorization: None,
    }
}

fn answer(status: u16, body: &str) -> Answer {
    Answer {
        status: StatusCode::from_u16(status).expect("status"),
        headers: HeaderMap::new(),
        body: Bytes::from(body.to_string()),
    }
}

fn rfc3339(t: SystemTime) -> String {
    let d = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970");
    let t = time::OffsetDateTime::from_unix_timestamp(i64::try_from(d.as_secs()).expect("secs"))
        .expect("time");
    t.format(&time::format_description::well_known::Rfc3339)
        .expect("format")
}

/// A credentials document expiring `secs` from now.
fn creds(secs: u64, key: &str) -> String {
    let exp = rfc3339(SystemTime::now() + Duration::from_secs(secs));
    format!(r#"{{"Code":"Success","AccessKeyId":"{key}","Expiration":"{exp}"}}"#)
}

fn body(f: &Fetched) -> (String, Source) {
    match f {
        Fetched::Answer(a, s) => (String::from_utf8_lossy(&a.body).into_owned(), *s),
        Fetched::Failed(e) => panic!("failed: {e}"),
    }
}

#[test]
fn rules_name_what_cannot_change_and_credentials() {
    for p in [
        "/latest/meta-data/instance-id",
        "/latest/meta-data/ami-id",
        "/2021-03-23/meta-data/instance-type",
        "/latest/meta-data/placement/availability-zone",
        "/latest/meta-data/placement/",
        // Longer than the segments `imds_rule` keeps on the stack.
        "/latest/meta-data/placement/a/b/c/d/e/f/g/h",
        "/latest/dynamic/instance-identity/document",
    ] {
        assert_eq!(imds_rule(p), Rule::Instance, "{p}");
    }
    for p in [
        "/latest/meta-data/iam/security-credentials/role",
        "/latest/meta-data/identity-credentials/ec2/security-credentials/ec2-instance",
    ] {
        assert_eq!(imds_rule(p), Rule::Credentials, "{p}");
    }
    for p in [
        "/latest/meta-data/iam/security-credentials/",
        "/latest/meta-data/identity-credentials/ec2/security-credentials/",
    ] {
        assert_eq!(imds_rule(p), Rule::RoleListing, "{p}");
    }
    for p in [
        "/latest/meta-data/iam/info",
        "/latest/meta-data/network/interfaces/macs/",
        "/latest/meta-data/spot/instance-action",
        "/latest/meta-data/events/maintenance/scheduled",
        "/latest/meta-data/tags/instance/Name",
        "/latest/meta-data/public-ipv4",
        "/latest/meta-data/local-ipv4",
        "/latest/meta-data/",
        "/latest/api/token",
        "/latest/user-data",
        "/latest/meta-data/iam/security-credentials/role/a/b/c/d",
    ] {
        assert_eq!(imds_rule(p), Rule::Never, "{p}");
    }
    assert_eq!(relay_rule("/v2/credentials/abc"), Rule::Credentials);
    assert_eq!(relay_rule("/v1/credentials?id=abc"), Rule::Credentials);
    assert_eq!(relay_rule("/v2/credentials/"), Rule::Never);
    assert_eq!(relay_rule("/v4/abc/task"), Rule::Never);
    assert_eq!(relay_rule("/v1/credentials"), Rule::Never);
}

#[test]
fn expiration_is_read_from_the_document() {
    let t = expiration(br#"{"Expiration":"2026-12-07T10:00:00Z"}"#).expect("parsed");
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    assert_eq!(secs, 1_796_637_600);
    assert!(expiration(b"{}").is_none());
    assert!(expiration(br#"{"Expiration":"tomorrow"}"#).is_none());
    assert!(expiration(b"not json").is_none());
}

#[tokio::test(flavor = "current_thread")]
async fn instance_paths_are_fetched_once_and_mutable_ones_always() {
    let c = Cache::default();
    for _ in 0..3 {
        let f = c
            .get(
                key("/latest/meta-data/instance-id"),
                Rule::Instance,
                || async { Ok(answer(200, "i-1")) },
            )
            .await;
        assert_eq!(body(&f).0, "i-1");
    }
    assert_eq!(c.fetches(), 1);
    for _ in 0..3 {
        c.get(
            key("/latest/meta-data/spot/instance-action"),
            Rule::Never,
            || async { Ok(answer(200, "x")) },
        )
        .await;
    }
    assert_eq!(c.fetches(), 4);
    // Errors and 404s are not kept.
    for _ in 0..2 {
        c.get(key("/latest/meta-data/ami-id"), Rule::Instance, || async {
            Ok(answer(404, "no"))
        })
        .await;
    }
    assert_eq!(c.fetches(), 6);
    c.clear();
    c.get(
        key("/latest/meta-data/instance-id"),
        Rule::Instance,
        || async { Ok(answer(200, "i-1")) },
    )
    .await;
    assert_eq!(c.fetches(), 7, "a clear drops everything");
}

#[tokio::test(flavor = "current_thread")]
async fn credentials_are_kept_until_a_margin_before_expiration() {
    let c = Cache::default();
    let k = key("/latest/meta-data/iam/security-credentials/r");
    // Six hours left: kept (fresh for 5 h 55 min).
    let doc = creds(6 * 3600, "A");
    for _ in 0..3 {
        let f = c
            .get(k.clone(), Rule::Credentials, || async {
                Ok(answer(200, &doc))
            })
            .await;
        assert_eq!(body(&f).0, doc);
    }
    assert_eq!(c.fetches(), 1);
    // Two seconds left: fresh for one (half of it), then fetched again.
    c.clear();
    let short = creds(2, "B");
    c.get(k.clone(), Rule::Credentials, || async {
        Ok(answer(200, &short))
    })
    .await;
    c.get(k.clone(), Rule::Credentials, || async {
        Ok(answer(200, &short))
    })
    .await;
    assert_eq!(c.fetches(), 2);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    c.get(k.clone(), Rule::Credentials, || async {
        Ok(answer(200, &short))
    })
    .await;
    assert_eq!(c.fetches(), 3);
    // A document without Expiration, or already expired: not kept.
    c.clear();
    for doc in [r#"{"AccessKeyId":"x"}"#.to_string(), creds(0, "C")] {
        for _ in 0..2 {
            c.get(k.clone(), Rule::Credentials, || async {
                Ok(answer(200, &doc))
            })
            .await;
        }
    }
    assert_eq!(c.fetches(), 7);
}

#[tokio::test(flavor = "current_thread")]
async fn concurrent_misses_make_one_upstream_request() {
    let c = Arc::new(Cache::default());
    let calls = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    let local = tokio::task::LocalSet::new();
    for _ in 0..20 {
        let (c, calls) = (c.clone(), calls.clone());
        tasks.push(local.spawn_local(async move {
            let f = c
                .get(
                    key("/latest/meta-data/instance-id"),
                    Rule::Instance,
                    || async {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok(answer(200, "i-1"))
                    },
                )
                .await;
            body(&f)
        }));
    }
    local
        .run_until(async {
            let mut sources = Vec::new();
            for t in tasks {
                let (b, s) = t.await.expect("task");
                assert_eq!(b, "i-1");
                sources.push(s);
            }
            assert_eq!(sources.iter().filter(|s| **s == Source::Miss).count(), 1);
            assert_eq!(sources.iter().filter(|s| **s == Source::Hit).count(), 19);
        })
        .await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "current_thread")]
async fn credentials_are_served_stale_on_failure_but_never_past_expiration() {
    let c = Cache::default();
    let k = key("/latest/meta-data/iam/security-credentials/r");
    // Five to six seconds left (Expiration has whole seconds): fresh for
    // half of that (at most 3 s), servable stale until one second before
    // expiry (at least 4 s from now).
    let doc = creds(6, "A");
    let expires = expiration(doc.as_bytes()).expect("Expiration");
    c.get(k.clone(), Rule::Credentials, || async {
        Ok(answer(200, &doc))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(3100)).await;
    for failure in [
        Err("connection refused".to_string()),
        Ok(answer(503, "busy")),
    ] {
        let f = c
            .get(k.clone(), Rule::Credentials, || async { failure })
            .await;
        assert_eq!(body(&f), (doc.clone(), Source::Stale));
    }
    // Within RETRY_AFTER of the failure the upstream is not asked again.
    let before = c.fetches();
    let f = c
        .get(k.clone(), Rule::Credentials, || async {
            panic!("asked the upstream within RETRY_AFTER")
        })
        .await;
    assert_eq!(body(&f).1, Source::Stale);
    assert_eq!(c.fetches(), before);
    // Past Expiration minus the guard: the failure is passed on.
    let guard_at = expires - STALE_GUARD + Duration::from_millis(50);
    if let Ok(left) = guard_at.duration_since(SystemTime::now()) {
        tokio::time::sleep(left).await;
    }
    match c
        .get(k.clone(), Rule::Credentials, || async {
            Err("refused".to_string())
        })
        .await
    {
        Fetched::Failed(e) => assert_eq!(e, "refused"),
        other => panic!("served past the guard: {other:?}"),
    }
    let f = c
        .get(k.clone(), Rule::Credentials, || async {
            Ok(answer(503, "busy"))
        })
        .await;
    assert_eq!(body(&f), ("busy".into(), Source::Miss));
    // Instance paths are never stale: they are always fresh.
    let m = Cache::default();
    let f = m
        .get(key("/latest/meta-data/spot/x"), Rule::Never, || async {
            Err("down".to_string())
        })
        .await;
    assert!(matches!(f, Fetched::Failed(_)));
}

#[tokio::test(flavor = "current_thread")]
async fn memory_is_bounded() {
    let c = Cache::default();
    let big = "x".repeat(MAX_BODY + 1);
    c.get(
        key("/latest/meta-data/instance-id"),
        Rule::Instance,
        || async { Ok(answer(200, &big)) },
    )
    .await;
    assert_eq!(c.size().0, 0, "a body over MAX_BODY is not kept");
    for i in 0..MAX_KEYS + 100 {
        let k = key(&format!("/latest/meta-data/placement/{i}"));
        c.get(k, Rule::Instance, || async { Ok(answer(200, "az")) })
            .await;
    }
    let (n, bytes) = c.size();
    assert!(
        n <= MAX_KEYS && bytes <= MAX_BYTES,
        "{n} keys, {bytes} bytes"
    );
    let before = c.fetches();
    let f = c
        .get(
            key("/latest/meta-data/placement/new"),
            Rule::Instance,
            || async { Ok(answer(200, "az")) },
        )
        .await;
    assert_eq!(body(&f).1, Source::Bypass, "full: served, not kept");
    assert_eq!(c.fetches(), before + 1);
}
