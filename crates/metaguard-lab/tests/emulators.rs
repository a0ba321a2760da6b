//! Integration tests of the IMDS and ECS agent emulators over real TCP on
//! 127.0.0.1 only (ephemeral ports), with a real HTTP client (hyper) and a
//! real AWS SDK (Python botocore, driven from `tests/py/`); and, inside a
//! lab, the AWS SDK for Rust (`mg-aws-probe`, crate metaguard-awsprobe).
//!
//! Nothing here sends a packet from this process's namespace anywhere but
//! loopback: every helper asserts the address it talks to is 127.0.0.1.
//! The `aws_sdk_rust_*` tests need root: they build a lab and run the probe
//! as a lab workload, so their traffic stays inside lab namespaces (the
//! probe refuses the root namespace). Not root, they print `skipped: …` and
//! pass — unless `METAGUARD_REQUIRE_ROOT=1`, when they fail. They need
//! `target/<profile>/mg-aws-probe` (`cargo build --workspace`).
//!
//! The botocore tests look for Python as every test binary does
//! (`metaguard_lab::testing::python`: `METAGUARD_PYTHON`, else
//! `<workspace>/.venv/bin/python`). Without it (or without botocore) they
//! print `skipped: <reason>` and pass — unless `METAGUARD_REQUIRE_PYTHON=1`,
//! when they fail.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::header::HeaderMap;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use metaguard_lab::agent::{AgentEmulator, TaskCredentials};
use metaguard_lab::imds::{ImdsEmulator, ImdsSettings, TokenMode};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TTL: &str = "x-aws-ec2-metadata-token-ttl-seconds";
const TOKEN: &str = "x-aws-ec2-metadata-token";
const IID: &str = "/latest/meta-data/instance-id";

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

async fn loopback_listener() -> TcpListener {
    TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0")
}

async fn start_imds(settings: ImdsSettings) -> (ImdsEmulator, SocketAddr) {
    let imds = ImdsEmulator::new(settings);
    let listener = loopback_listener().await;
    let addr = listener.local_addr().expect("local addr");
    let server = imds.clone();
    tokio::spawn(async move { server.serve(listener).await });
    (imds, addr)
}

async fn start_agent() -> (AgentEmulator, SocketAddr) {
    let agent = AgentEmulator::new();
    let listener = loopback_listener().await;
    let addr = listener.local_addr().expect("local addr");
    let server = agent.clone();
    tokio::spawn(async move { server.serve(listener).await });
    (agent, addr)
}

#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
    /// The client's own address: what the server should log as `peer`.
    client: SocketAddr,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// One request on a fresh connection, with a 5 s limit.
async fn send(addr: SocketAddr, method: &str, target: &str, headers: &[(&str, &str)]) -> Reply {
    assert!(addr.ip().is_loopback(), "tests talk to loopback only");
    let fut = async {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let client = stream.local_addr().expect("client addr");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(Method::from_bytes(method.as_bytes()).expect("method"))
            .uri(target)
            .header("host", addr.to_string());
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let req = req.body(Empty::<Bytes>::new()).expect("request");
        let resp = sender.send_request(req).await.expect("response");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
            client,
        }
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .expect("request timed out")
}

async fn get(addr: SocketAddr, target: &str) -> Reply {
    send(addr, "GET", target, &[]).await
}

async fn token(addr: SocketAddr, ttl: &str) -> String {
    let r = send(addr, "PUT", "/latest/api/token", &[(TTL, ttl)]).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    r.body
}

/// Writes `raw` on a fresh connection and reads until the server closes or
/// goes quiet; returns what came back.
async fn raw_exchange(addr: SocketAddr, raw: &[u8]) -> String {
    assert!(addr.ip().is_loopback(), "tests talk to loopback only");
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(raw).await.expect("write");
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn is_rfc3339_z(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 20
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'Z',
            _ => c.is_ascii_digit(),
        })
}

// ---------------------------------------------------------------------------
// IMDS: tokens
// ---------------------------------------------------------------------------

#[tokio::test]
async fn imds_token_put_echoes_ttl_and_authorizes_gets() {
    let (imds, addr) = start_imds(ImdsSettings::default()).await;
    let r = send(addr, "PUT", "/latest/api/token", &[(TTL, "21600")]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header(TTL), Some("21600"));
    assert_eq!(r.header("content-type"), Some("text/plain"));
    assert_eq!(r.header("server"), Some("EC2ws"));
    assert_eq!(r.body.len(), 56, "token {:?}", r.body);
    assert!(!r.body.ends_with('\n'));

    let r2 = send(addr, "PUT", "/latest/api/token", &[(TTL, "60")]).await;
    assert_eq!(r2.header(TTL), Some("60"));
    assert_ne!(r.body, r2.body, "tokens are unique");

    let got = send(addr, "GET", IID, &[(TOKEN, &r.body)]).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body, imds.settings().instance_id);
    // A v2 GET echoes the token's remaining lifetime.
    let left: u64 = got
        .header(TTL)
        .expect("ttl on v2 GET")
        .parse()
        .expect("number");
    assert!((21_590..=21_600).contains(&left), "{left}");
    assert_eq!(got.header("content-type"), Some("text/plain"));
    assert!(got.header("last-modified").is_some());
}

#[tokio::test]
async fn imds_token_ttl_must_be_1_to_21600() {
    let (_imds, addr) = start_imds(ImdsSettings::default()).await;
    let huge = "9".repeat(5000);
    for ttl in [
        "0",
        "21601",
        "-1",
        "+5",
        "1.5",
        "abc",
        "",
        " ",
        "0x10",
        huge.as_str(),
    ] {
        let r = send(addr, "PUT", "/latest/api/token", &[(TTL, ttl)]).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "ttl {ttl:?}");
        assert!(r.body.contains("400"), "{}", r.body);
    }
    let missing = send(addr, "PUT", "/latest/api/token", &[]).await;
    assert_eq!(missing.status, StatusCode::BAD_REQUEST);
    for ttl in ["1", "21600"] {
        let r = send(addr, "PUT", "/latest/api/token", &[(TTL, ttl)]).await;
        assert_eq!(r.status, StatusCode::OK, "ttl {ttl}");
        assert_eq!(r.header(TTL), Some(ttl));
    }
}

#[tokio::test]
async fn imds_token_put_with_x_forwarded_for_is_403() {
    let (imds, addr) = start_imds(ImdsSettings::default()).await;
    for ttl in ["21600", "bogus"] {
        let r = send(
            addr,
            "PUT",
            "/latest/api/token",
            &[(TTL, ttl), ("x-forwarded-for", "203.0.113.7")],
        )
        .await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "ttl {ttl}");
        assert_eq!(r.body, "");
        assert_eq!(r.header(TTL), None);
    }
    // Header names are case-insensitive, and an empty value still counts.
    let r = send(
        addr,
        "PUT",
        "/latest/api/token",
        &[(TTL, "60"), ("X-Forwarded-For", "")],
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let logged = imds.log().entries();
    assert_eq!(logged.len(), 3);
    assert!(logged
        .iter()
        .all(|e| e.status == 403 && e.header("x-forwarded-for").is_some()));
    // An XFF header on a GET is no reason to refuse it.
    let g = send(addr, "GET", IID, &[("x-forwarded-for", "203.0.113.7")]).await;
    assert_eq!(g.status, StatusCode::OK);
}

#[tokio::test]
async fn imds_token_path_answers_405_to_other_methods() {
    let (_imds, addr) = start_imds(ImdsSettings::default()).await;
    for m in ["GET", "POST", "DELETE", "PATCH", "HEAD"] {
        let r = send(addr, m, "/latest/api/token", &[(TTL, "60")]).await;
        assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{m}");
        assert_eq!(r.header("allow"), Some("OPTIONS, PUT"), "{m}");
    }
    let o = send(addr, "OPTIONS", "/latest/api/token", &[]).await;
    assert_eq!(o.status, StatusCode::OK);
    assert_eq!(o.header("allow"), Some("OPTIONS, PUT"));
    // The reason phrase is IMDS's own.
    let raw = raw_exchange(
        addr,
        b"GET /latest/api/token HTTP/1.1\r\nHost: imds\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 405 Not Allowed\r\n"), "{raw}");
}

#[tokio::test]
async fn imds_put_anywhere_but_the_token_path_is_403() {
    let (_imds, addr) = start_imds(ImdsSettings::default()).await;
    for path in [
        "/latest/api/token/",
        "/2021-03-23/api/token",
        "/latest/meta-data/",
        "/",
    ] {
        let r = send(addr, "PUT", path, &[(TTL, "60")]).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{path}");
        assert_eq!(r.body, "");
    }
}

#[tokio::test]
async fn imds_required_mode_refuses_v1_with_401() {
    let (imds, addr) = start_imds(ImdsSettings {
        tokens: TokenMode::Required,
        ..ImdsSettings::default()
    })
    .await;
    assert_eq!(imds.token_mode(), TokenMode::Required);
    for path in [
        IID,
        "/",
        "/latest/meta-data/",
        "/latest/meta-data/no-such-thing",
    ] {
        let r = get(addr, path).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{path}");
        assert!(
            r.body.contains("<title>401 - Unauthorized</title>"),
            "{}",
            r.body
        );
        assert_eq!(r.header("content-type"), Some("text/html"));
    }
    let t = token(addr, "300").await;
    assert_eq!(
        send(addr, "GET", IID, &[(TOKEN, &t)]).await.status,
        StatusCode::OK
    );

    imds.set_token_mode(TokenMode::Optional);
    assert_eq!(get(addr, IID).await.status, StatusCode::OK);
    imds.set_token_mode(TokenMode::Required);
    assert_eq!(get(addr, IID).await.status, StatusCode::UNAUTHORIZED);
    // Tokens issued before a switch stay valid.
    assert_eq!(
        send(addr, "GET", IID, &[(TOKEN, &t)]).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn imds_optional_mode_serves_v1() {
    let (imds, addr) = start_imds(ImdsSettings::default()).await;
    let r = get(addr, IID).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, imds.settings().instance_id);
    assert_eq!(r.header(TTL), None, "no token, no TTL echo");
}

#[tokio::test]
async fn imds_invalid_token_is_401_in_both_modes() {
    let (imds, addr) = start_imds(ImdsSettings::default()).await;
    for mode in [TokenMode::Optional, TokenMode::Required] {
        imds.set_token_mode(mode);
        for bad in [
            "bogus",
            "",
            "AQAEAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        ] {
            let r = send(addr, "GET", IID, &[(TOKEN, bad)]).await;
            assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{mode:?} {bad:?}");
        }
    }
}

#[tokio::test]
async fn imds_token_expires_after_its_ttl() {
    let (_imds, addr) = start_imds(ImdsSettings::default()).await;
    let t = token(addr, "1").await;
    let fresh = send(addr, "GET", IID, &[(TOKEN, &t)]).await;
    assert_eq!(fresh.status, StatusCode::OK);
    assert_eq!(fresh.header(TTL), Some("1"));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let stale = send(addr, "GET", IID, &[(TOKEN, &t)]).await;
    assert_eq!(stale.status, StatusCode::UNAUTHORIZED);
    // Expired even where v1 would have been accepted.
    assert_eq!(get(addr, IID).await.status, StatusCode::OK);
}

// ---------------------------------------------------------------------------
// IMDS: paths and documents
// ---------------------------------------------------------------------------

#[tokio::test]
async fn imds_unknown_paths_are_404_html() {
    let (_imds, addr) = start_imds(ImdsSettings::default()).await;
    for path in [
        "/latest/meta-data/no-such-thing",
        "/latest/no-such-category/",
        "/no-such-version/meta-data/",
        "/latest/meta-data/instance-id/extra",
        "/latest/user-data",
        "/latest/api/",
        "/latest/meta-data//instance-id",
    ] {
        let r = get(addr, path).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(r.header("content-type"), Some("text/html"));
        assert!(r
            .body
            .starts_with("<?xml version=\"1.0\" encoding=\"iso-8859-1\"?>"));
        assert!(
            r.body.contains("<title>404 - Not Found</title>"),
            "{}",
            r.body
        );
        assert_eq!(r.header("server"), Some("EC2ws"));
    }
}

#[tokio::test]
async fn imds_listings() {
    let (_imds, addr) = start_imds(ImdsSettings::default()).await;
    let root = get(addr, "/").await;
    assert_eq!(root.status, StatusCode::OK);
    let versions: Vec<&str> = root.body.lines().collect();
    assert_eq!(versions.first(), Some(&"1.0"));
    assert_eq!(versions.last(), Some(&"latest"));
    assert!(!root.body.ends_with('\n'));

    assert_eq!(get(addr, "/latest/").await.body, "dynamic\nmeta-data");

    let meta = get(addr, "/latest/meta-data/").await;
    assert_eq!(meta.status, StatusCode::OK);
    let items: Vec<&str> = meta.body.lines().collect();
    for want in [
        "ami-id",
        "hostname",
        "iam/",
        "instance-id",
        "instance-type",
        "local-hostname",
        "local-ipv4",
        "mac",
        "placement/",
    ] {
        assert!(items.contains(&want), "{want} missing from {items:?}");
    }
    let mut sorted = items.clone();
    sorted.sort_unstable();
    assert_eq!(items, sorted, "listing is sorted");
    assert!(!meta.body.ends_with('\n'));

    assert_eq!(
        get(addr, "/latest/meta-data/placement/").await.body,
        "availability-zone\nregion"
    );
    assert_eq!(
        get(addr, "/latest/meta-data/iam/").await.body,
        "info\nsecurity-credentials/"
    );
    assert_eq!(
        get(addr, "/latest/meta-data/iam/security-credentials/")
            .await
            .body,
        "lab-instance-role"
    );
    assert_eq!(
        get(addr, "/latest/dynamic/instance-identity/").await.body,
        "document"
    );
    // Versioned paths serve the same tree.
    assert_eq!(get(addr, "/2021-03-23/meta-data/").await.body, meta.body);
}

#[tokio::test]
async fn imds_directory_without_slash_redirects() {
    let (_imds, addr) = start_imds(ImdsSettings::default()).await;
    for (path, to) in [
        ("/latest", "/latest/"),
        ("/latest/meta-data", "/latest/meta-data/"),
        (
            "/latest/meta-data/iam/security-credentials",
            "/latest/meta-data/iam/security-credentials/",
        ),
    ] {
        let r = get(addr, path).await;
        assert_eq!(r.status, StatusCode::MOVED_PERMANENTLY, "{path}");
        assert_eq!(r.header("location"), Some(to));
    }
}

#[tokio::test]
async fn imds_values_come_from_settings() {
    let settings = ImdsSettings {
        instance_id: "i-0fedcba9876543210".into(),
        instance_type: "c6i.xlarge".into(),
        ami_id: "ami-0123456789abcdef0".into(),
        region: "eu-west-1".into(),
        availability_zone: "eu-west-1b".into(),
        local_ipv4: "10.1.2.3".into(),
        mac: "02:00:00:00:00:01".into(),
        account_id: "444455556666".into(),
        role: Some("web".into()),
        tokens: TokenMode::Optional,
        // One hop is enough on loopback.
        put_response_hop_limit: 1,
    };
    let (_imds, addr) = start_imds(settings.clone()).await;
    for (path, want) in [
        (IID, settings.instance_id.as_str()),
        ("/latest/meta-data/instance-type", &settings.instance_type),
        ("/latest/meta-data/ami-id", &settings.ami_id),
        ("/latest/meta-data/local-ipv4", &settings.local_ipv4),
        ("/latest/meta-data/mac", &settings.mac),
        (
            "/latest/meta-data/placement/availability-zone",
            &settings.availability_zone,
        ),
        ("/latest/meta-data/placement/region", &settings.region),
        (
            "/latest/meta-data/local-hostname",
            "ip-10-1-2-3.eu-west-1.compute.internal",
        ),
        ("/latest/meta-data/iam/security-credentials/", "web"),
        (
            "/latest/meta-data/instance-id/",
            settings.instance_id.as_str(),
        ),
    ] {
        let r = get(addr, path).await;
        assert_eq!(r.status, StatusCode::OK, "{path}");
        assert_eq!(r.body, want, "{path}");
    }
}

#[tokio::test]
async fn imds_role_credentials_document_has_the_real_shape() {
    let (imds, addr) = start_imds(ImdsSettings::default()).await;
    let r = get(
        addr,
        "/latest/meta-data/iam/security-credentials/lab-instance-role",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("content-type"), Some("text/plain"));
    assert!(
        r.body
            .starts_with("{\n  \"Code\" : \"Success\",\n  \"LastUpdated\" : \""),
        "{}",
        r.body
    );
    let doc: Value = serde_json::from_str(&r.body).expect("json");
    assert_eq!(Some(&doc), imds.role_credentials().as_ref());
    assert_eq!(doc["Code"], "Success");
    assert_eq!(doc["Type"], "AWS-HMAC");
    let akid = doc["AccessKeyId"].as_str().expect("AccessKeyId");
    assert!(akid.starts_with("ASIA") && akid.len() == 20, "{akid}");
    assert_eq!(doc["SecretAccessKey"].as_str().map(str::len), Some(40));
    assert!(doc["Token"].as_str().is_some_and(|t| t.len() > 100));
    for key in ["LastUpdated", "Expiration"] {
        assert!(
            doc[key].as_str().is_some_and(is_rfc3339_z),
            "{key}: {}",
            doc[key]
        );
    }
    assert_eq!(doc.as_object().map(|o| o.len()), Some(7));

    let unknown = get(
        addr,
        "/latest/meta-data/iam/security-credentials/other-role",
    )
    .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);

    let info: Value =
        serde_json::from_str(&get(addr, "/latest/meta-data/iam/info").await.body).expect("json");
    assert_eq!(info["Code"], "Success");
    assert_eq!(
        info["InstanceProfileArn"],
        "arn:aws:iam::111122223333:instance-profile/lab-instance-role"
    );
    assert!(info["InstanceProfileId"]
        .as_str()
        .is_some_and(|s| s.starts_with("AIPA")));
}

#[tokio::test]
async fn imds_without_role_has_no_iam() {
    let (imds, addr) = start_imds(ImdsSettings {
        role: None,
        ..ImdsSettings::default()
    })
    .await;
    assert!(imds.role_credentials().is_none());
    assert!(!get(addr, "/latest/meta-data/").await.body.contains("iam"));
    assert_eq!(
        get(addr, "/latest/meta-data/iam/").await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn imds_identity_document_has_the_real_shape() {
    let (imds, addr) = start_imds(ImdsSettings::default()).await;
    let r = get(addr, "/latest/dynamic/instance-identity/document").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        r.body
            .starts_with("{\n  \"accountId\" : \"111122223333\",\n"),
        "{}",
        r.body
    );
    let doc: Value = serde_json::from_str(&r.body).expect("json");
    let s = imds.settings();
    assert_eq!(doc["accountId"], s.account_id.as_str());
    assert_eq!(doc["architecture"], "x86_64");
    assert_eq!(doc["availabilityZone"], s.availability_zone.as_str());
    assert_eq!(doc["imageId"], s.ami_id.as_str());
    assert_eq!(doc["instanceId"], s.instance_id.as_str());
    assert_eq!(doc["instanceType"], s.instance_type.as_str());
    assert_eq!(doc["privateIp"], s.local_ipv4.as_str());
    assert_eq!(doc["region"], s.region.as_str());
    assert_eq!(doc["version"], "2017-09-30");
    assert!(doc["pendingTime"].as_str().is_some_and(is_rfc3339_z));
    for null in [
        "billingProducts",
        "devpayProductCodes",
        "marketplaceProductCodes",
        "kernelId",
        "ramdiskId",
    ] {
        assert!(doc[null].is_null(), "{null}");
    }
}

#[tokio::test]
async fn imds_head_is_allowed_other_methods_are_not() {
    let (imds, addr) = start_imds(ImdsSettings::default()).await;
    let h = send(addr, "HEAD", IID, &[]).await;
    assert_eq!(h.status, StatusCode::OK);
    assert_eq!(h.body, "");
    assert_eq!(
        h.header("content-length"),
        Some(imds.settings().instance_id.len().to_string().as_str())
    );
    for m in ["POST", "DELETE", "PATCH", "OPTIONS"] {
        let r = send(addr, m, IID, &[]).await;
        assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{m}");
        assert_eq!(r.header("allow"), Some("GET, HEAD"));
    }
}

#[tokio::test]
async fn imds_log_records_peer_local_and_status_of_every_request() {
    let (imds, addr) = start_imds(ImdsSettings {
        tokens: TokenMode::Required,
        ..ImdsSettings::default()
    })
    .await;
    let log = imds.log();
    assert!(log.is_empty());
    let denied = send(
        addr,
        "GET",
        "/latest/meta-data/?q=1",
        &[("X-Lab-Probe", "p1")],
    )
    .await;
    let forbidden = send(
        addr,
        "PUT",
        "/latest/api/token",
        &[(TTL, "60"), ("x-forwarded-for", "x")],
    )
    .await;
    let t = token(addr, "60").await;
    let ok = send(addr, "GET", IID, &[(TOKEN, &t), ("x-lab-probe", "p2")]).await;

    let entries = log.entries();
    assert_eq!(entries.len(), 4);
    let statuses: Vec<u16> = entries.iter().map(|e| e.status).collect();
    assert_eq!(statuses, [401, 403, 200, 200]);
    assert_eq!(entries[0].peer, denied.client);
    assert_eq!(entries[1].peer, forbidden.client);
    assert_eq!(entries[3].peer, ok.client);
    assert!(entries.iter().all(|e| e.local == addr));
    assert_eq!(entries[0].method, "GET");
    assert_eq!(entries[0].target, "/latest/meta-data/?q=1");
    assert_eq!(entries[1].method, "PUT");
    assert!(entries[0]
        .headers
        .iter()
        .any(|(n, v)| n == "x-lab-probe" && v == "p1"));
    assert_eq!(log.with_header("x-lab-probe", "p2").len(), 1);
    assert!(entries
        .windows(2)
        .all(|w| w[0].at_unix_ms <= w[1].at_unix_ms));
    log.clear();
    assert!(imds.log().is_empty());
}

#[tokio::test]
async fn imds_survives_malformed_requests() {
    let (imds, addr) = start_imds(ImdsSettings::default()).await;
    // Not UTF-8 in the request target: refused by the HTTP layer.
    let r = raw_exchange(addr, b"GET /latest/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(r.is_empty() || r.starts_with("HTTP/1.1 400"), "{r}");
    // Not UTF-8 in the token and TTL headers: a 401 and a 400, not a panic.
    let r = raw_exchange(
        addr,
        b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\nX-aws-ec2-metadata-token: \xff\xfe\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 401 "), "{r}");
    let r = raw_exchange(
        addr,
        b"PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nX-aws-ec2-metadata-token-ttl-seconds: 6\xff0\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
    // Garbage, and a connection dropped mid-headers.
    let _ = raw_exchange(addr, b"\x00\x01\x02 nonsense\r\n\r\n").await;
    {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /latest/meta-data/ HTTP/1.1\r\nHo")
            .await
            .expect("write");
    }
    // An absolute-form target is served by its path and logged whole.
    let r = raw_exchange(
        addr,
        b"GET http://imds.invalid/latest/meta-data/instance-id HTTP/1.1\r\nHost: imds.invalid\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200 OK"), "{r}");
    assert!(r.ends_with("i-0123456789abcdef0"), "{r}");
    assert!(imds
        .log()
        .entries()
        .iter()
        .any(|e| e.target == "http://imds.invalid/latest/meta-data/instance-id"));
    // Still serving.
    assert_eq!(get(addr, IID).await.status, StatusCode::OK);
}

#[tokio::test]
async fn imds_response_headers_look_like_ec2ws() {
    let (_imds, addr) = start_imds(ImdsSettings::default()).await;
    let raw = raw_exchange(
        addr,
        b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    for line in [
        "Server: EC2ws\r\n",
        "Content-Type: text/plain\r\n",
        "Accept-Ranges: none\r\n",
        "Connection: close\r\n",
    ] {
        assert!(raw.contains(line), "{line:?} missing from {raw}");
    }
}

// ---------------------------------------------------------------------------
// ECS agent credentials endpoint
// ---------------------------------------------------------------------------

const ROLE_ARN: &str = "arn:aws:iam::111122223333:role/lab-task";

#[tokio::test]
async fn agent_serves_v2_and_v1_credentials() {
    let (agent, addr) = start_agent().await;
    let creds = agent.add_credentials("8d9f4b1e-task", ROLE_ARN);
    assert_eq!(creds.role_arn, ROLE_ARN);
    let expected_body = serde_json::to_string(&creds).expect("json");
    for target in [
        "/v2/credentials/8d9f4b1e-task",
        "/v1/credentials?id=8d9f4b1e-task",
    ] {
        let r = get(addr, target).await;
        assert_eq!(r.status, StatusCode::OK, "{target}");
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.body, expected_body, "{target}");
        let parsed: TaskCredentials = serde_json::from_str(&r.body).expect("parse");
        assert_eq!(parsed, creds);
    }
    assert!(
        expected_body.starts_with("{\"RoleArn\":"),
        "{expected_body}"
    );
    // The routes take any method, as the agent registers them without one.
    assert_eq!(
        send(addr, "POST", "/v2/credentials/8d9f4b1e-task", &[])
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn agent_credentials_expire_about_six_hours_ahead() {
    let agent = AgentEmulator::new();
    let creds = agent.add_credentials("x", ROLE_ARN);
    assert!(is_rfc3339_z(&creds.expiration), "{}", creds.expiration);
    let now = SystemTime::now();
    let lo = metaguard_lab::http::rfc3339(now + Duration::from_secs(6 * 3600 - 60));
    let hi = metaguard_lab::http::rfc3339(now + Duration::from_secs(6 * 3600 + 60));
    assert!(
        lo <= creds.expiration && creds.expiration <= hi,
        "{}",
        creds.expiration
    );
}

#[tokio::test]
async fn agent_error_bodies_match_the_agent() {
    let (agent, addr) = start_agent().await;
    agent.add_credentials("known", ROLE_ARN);
    agent.add_pending("later");
    let cases: [(&str, u16, &str); 7] = [
        (
            "/v2/credentials/unknown",
            400,
            r#"{"code":"InvalidIdInRequest","message":"CredentialsV2Request: Credentials not found","HTTPErrorCode":400}"#,
        ),
        (
            "/v2/credentials/",
            400,
            r#"{"code":"NoIdInRequest","message":"CredentialsV2Request: No Credential ID in the request","HTTPErrorCode":400}"#,
        ),
        (
            "/v1/credentials",
            400,
            r#"{"code":"NoIdInRequest","message":"CredentialsV1Request: No Credential ID in the request","HTTPErrorCode":400}"#,
        ),
        (
            "/v1/credentials?id=",
            400,
            r#"{"code":"NoIdInRequest","message":"CredentialsV1Request: No Credential ID in the request","HTTPErrorCode":400}"#,
        ),
        (
            "/v1/credentials?id=unknown",
            400,
            r#"{"code":"InvalidIdInRequest","message":"CredentialsV1Request: Credentials not found","HTTPErrorCode":400}"#,
        ),
        (
            "/v2/credentials/later",
            503,
            r#"{"code":"CredentialsUninitialized","message":"CredentialsV2Request: Credentials uninitialized for ID","HTTPErrorCode":503}"#,
        ),
        (
            "/v2/credentials/known/extra",
            400,
            r#"{"code":"InvalidIdInRequest","message":"CredentialsV2Request: Credentials not found","HTTPErrorCode":400}"#,
        ),
    ];
    for (target, status, body) in cases {
        let r = get(addr, target).await;
        assert_eq!(r.status.as_u16(), status, "{target}");
        assert_eq!(
            r.header("content-type"),
            Some("application/json"),
            "{target}"
        );
        assert_eq!(r.body, body, "{target}");
    }
    agent.add_credentials("later", ROLE_ARN);
    assert_eq!(
        get(addr, "/v2/credentials/later").await.status,
        StatusCode::OK
    );
    agent.remove_credentials("known");
    assert_eq!(
        get(addr, "/v2/credentials/known").await.status,
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn agent_unknown_paths_are_go_404s() {
    let (agent, addr) = start_agent().await;
    agent.add_credentials("id", ROLE_ARN);
    for target in [
        "/",
        "/v2/credentials",
        "/v3/credentials/id",
        "/v1/credentials/id",
        "/v2/metadata",
    ] {
        let r = get(addr, target).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{target}");
        assert_eq!(r.body, "404 page not found\n");
        assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    }
}

#[tokio::test]
async fn agent_redirects_unclean_paths_and_decodes_ids() {
    let (agent, addr) = start_agent().await;
    agent.add_credentials("a b", ROLE_ARN);
    let r = get(addr, "//v2//credentials/x").await;
    assert_eq!(r.status, StatusCode::MOVED_PERMANENTLY);
    assert_eq!(r.header("location"), Some("/v2/credentials/x"));
    let r = get(addr, "/v2/credentials/../credentials/x?y=1").await;
    assert_eq!(r.status, StatusCode::MOVED_PERMANENTLY);
    assert_eq!(r.header("location"), Some("/v2/credentials/x?y=1"));
    assert_eq!(
        get(addr, "/v2/credentials/a%20b").await.status,
        StatusCode::OK
    );
    assert_eq!(
        get(addr, "/v1/credentials?id=a+b").await.status,
        StatusCode::OK
    );
    assert_eq!(
        get(addr, "/v1/credentials?id=a%20b").await.status,
        StatusCode::OK
    );
    assert_eq!(
        get(addr, "/v2/credentials/a%2").await.status,
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn agent_log_records_peer_and_status() {
    let (agent, addr) = start_agent().await;
    agent.add_credentials("id", ROLE_ARN);
    let a = get(addr, "/v2/credentials/id").await;
    let b = get(addr, "/v2/credentials/nope").await;
    let c = get(addr, "/nowhere").await;
    let entries = agent.log().entries();
    let seen: Vec<(SocketAddr, &str, u16)> = entries
        .iter()
        .map(|e| (e.peer, e.target.as_str(), e.status))
        .collect();
    assert_eq!(
        seen,
        [
            (a.client, "/v2/credentials/id", 200),
            (b.client, "/v2/credentials/nope", 400),
            (c.client, "/nowhere", 404),
        ]
    );
    assert!(entries.iter().all(|e| e.local == addr && e.method == "GET"));
}

#[tokio::test]
async fn agent_survives_malformed_requests() {
    let (agent, addr) = start_agent().await;
    agent.add_credentials("id", ROLE_ARN);
    let r = raw_exchange(
        addr,
        b"GET /v2/credentials/\xff HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(r.is_empty() || r.starts_with("HTTP/1.1 400"), "{r}");
    let _ = raw_exchange(addr, b"\r\n\r\n\r\nBLAH\r\n\r\n").await;
    assert_eq!(get(addr, "/v2/credentials/id").await.status, StatusCode::OK);
}

// ---------------------------------------------------------------------------
// Real SDK: Python botocore
// ---------------------------------------------------------------------------

/// An emulator on its own thread and `current_thread` runtime, bound to
/// 127.0.0.1:0 — the way the lab runs them — stopped on drop.
struct Background {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Background {
    fn start<F, Fut>(serve: F) -> Background
    where
        F: FnOnce(TcpListener) -> Fut + Send + 'static,
        Fut: Future<Output = std::io::Result<()>>,
    {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("addr");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = TcpListener::from_std(std_listener).expect("listener");
                tokio::select! {
                    _ = serve(listener) => {}
                    _ = stopped => {}
                }
            });
        });
        Background {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn base_url(&self) -> String {
        assert!(self.addr.ip().is_loopback());
        format!("http://{}", self.addr)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Python with botocore ([`metaguard_lab::testing::python`]: skipped with
/// the reason printed when there is none); fails instead when
/// `METAGUARD_REQUIRE_PYTHON=1`.
fn python_or_skip(test: &str) -> Option<PathBuf> {
    match metaguard_lab::testing::python() {
        Ok(Some(p)) => Some(p),
        Ok(None) => {
            println!("{test} skipped: no python with botocore");
            None
        }
        Err(e) => panic!("{test}: {}", e.message().unwrap_or("no python")),
    }
}

/// Runs `tests/py/<script> args…` with an empty environment (no proxies)
/// and a 20 s limit; returns its last stdout line as JSON.
fn run_py(python: &PathBuf, script: &str, args: &[&str]) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/py")
        .join(script);
    let mut child = Command::new(python)
        .arg(&path)
        .args(args)
        .env_clear()
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("PYTHONNOUSERSITE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn python");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{script} {args:?} timed out");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{script} {args:?} failed: {}\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    let last = stdout.lines().last().unwrap_or("");
    serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("{script}: bad JSON {last:?}: {e}\nstderr: {stderr}"))
}

#[test]
fn botocore_instance_metadata_fetcher_against_imds() {
    let Some(python) = python_or_skip("botocore_instance_metadata_fetcher_against_imds") else {
        return;
    };
    let imds = ImdsEmulator::new(ImdsSettings::default());
    let server = {
        let imds = imds.clone();
        Background::start(move |l| async move { imds.serve(l).await })
    };
    let base = server.base_url();
    let expected = imds.role_credentials().expect("role credentials");

    for mode in [TokenMode::Optional, TokenMode::Required] {
        imds.set_token_mode(mode);
        imds.log().clear();
        let out = run_py(&python, "imds_botocore.py", &["v2", &base]);
        assert_eq!(out["instance_id"], "i-0123456789abcdef0", "{mode:?}: {out}");
        assert!(
            out["token"].as_str().is_some_and(|t| t.len() == 56),
            "{out}"
        );
        let creds = &out["credentials"];
        assert_eq!(creds["role_name"], "lab-instance-role");
        assert_eq!(creds["access_key"], expected["AccessKeyId"]);
        assert_eq!(creds["secret_key"], expected["SecretAccessKey"]);
        assert_eq!(creds["token"], expected["Token"]);
        assert_eq!(creds["expiry_time"], expected["Expiration"]);
        // botocore went the IMDSv2 way: PUT first, then GETs with the token.
        let entries = imds.log().entries();
        assert_eq!(entries.first().map(|e| e.method.as_str()), Some("PUT"));
        assert!(entries
            .iter()
            .filter(|e| e.method == "GET")
            .all(|e| e.header(TOKEN).is_some() && e.status == 200));
        assert!(entries.iter().all(|e| e.peer.ip().is_loopback()));
    }

    // Required mode: botocore's token-less request is refused.
    imds.set_token_mode(TokenMode::Required);
    let out = run_py(&python, "imds_botocore.py", &["v1", &base]);
    assert_eq!(out["status"], 401, "{out}");
    imds.set_token_mode(TokenMode::Optional);
    let out = run_py(&python, "imds_botocore.py", &["v1", &base]);
    assert_eq!(out["status"], 200, "{out}");
    assert_eq!(out["body"], "i-0123456789abcdef0");

    // A token PUT through a proxy (X-Forwarded-For) is refused, and
    // botocore's fetcher reads that 403 as "no IMDSv2 here".
    imds.log().clear();
    let out = run_py(&python, "imds_botocore.py", &["xff", &base]);
    assert_eq!(out["status"], 403, "{out}");
    let logged = imds.log().entries();
    assert_eq!(logged.len(), 1);
    assert_eq!(logged[0].status, 403);
    assert!(logged[0].header("x-forwarded-for").is_some());
}

#[test]
fn botocore_container_provider_against_agent() {
    let Some(python) = python_or_skip("botocore_container_provider_against_agent") else {
        return;
    };
    let agent = AgentEmulator::new();
    let creds = agent.add_credentials("7e1c1f0e-6a3b-4b59-9a1c-0c5b1a7f2d11", ROLE_ARN);
    let server = {
        let agent = agent.clone();
        Background::start(move |l| async move { agent.serve(l).await })
    };
    let url = format!(
        "{}/v2/credentials/7e1c1f0e-6a3b-4b59-9a1c-0c5b1a7f2d11",
        server.base_url()
    );
    let out = run_py(&python, "container_botocore.py", &["provider", &url]);
    assert_eq!(out["method"], "container-role");
    assert_eq!(out["access_key"], creds.access_key_id.as_str());
    assert_eq!(out["secret_key"], creds.secret_access_key.as_str());
    assert_eq!(out["token"], creds.token.as_str());
    assert_eq!(out["raw"]["RoleArn"], ROLE_ARN);
    assert_eq!(out["raw"]["Expiration"], creds.expiration.as_str());

    agent.log().clear();
    let bad = format!("{}/v2/credentials/unknown", server.base_url());
    let out = run_py(&python, "container_botocore.py", &["error", &bad]);
    let err = out["error"].as_str().expect("an error");
    assert!(
        err.contains("400") && err.contains("InvalidIdInRequest"),
        "{err}"
    );
    // botocore tried three times; each is logged with its status.
    let statuses: Vec<u16> = agent.log().entries().iter().map(|e| e.status).collect();
    assert_eq!(statuses, [400, 400, 400]);
}

// ---------------------------------------------------------------------------
// Real SDK: the AWS SDK for Rust (aws-config), inside a lab
// ---------------------------------------------------------------------------
//
// `mg-aws-probe` (crate metaguard-awsprobe) is aws-config's own IMDS client
// and ECS credentials provider. Unlike botocore above, it cannot be pointed
// at 127.0.0.1 for everything — `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI`
// always means http://169.254.170.2 — so these tests build a lab (root
// only) and run it as a lab workload with `Lab::command_in` (`ip netns
// exec` + the workload's cgroup): every packet stays in lab namespaces, and
// the probe itself refuses the root namespace.

/// `<target dir>/<profile>/mg-aws-probe`, beside this test's `deps/`
/// directory (the binary belongs to another package, so there is no
/// `CARGO_BIN_EXE_` for it here).
fn awsprobe_exe() -> PathBuf {
    let me = std::env::current_exe().expect("current exe");
    let exe = me
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join("mg-aws-probe"))
        .expect("no target dir above the test executable");
    assert!(
        exe.exists(),
        "{} missing: build it with `cargo build --workspace` (`cargo test --workspace` builds it too)",
        exe.display()
    );
    exe
}

/// A lab whose IMDS runs in `tokens` mode, or `None` (with the reason
/// printed) when not root — a failure instead when
/// `METAGUARD_REQUIRE_ROOT=1`, as under the README's test command.
fn lab_or_skip(test: &str, tokens: TokenMode) -> Option<metaguard_lab::Lab> {
    if !metaguard_sys::process::is_root() {
        assert!(
            std::env::var("METAGUARD_REQUIRE_ROOT").as_deref() != Ok("1"),
            "{test}: METAGUARD_REQUIRE_ROOT=1 but not running as root"
        );
        println!("{test} skipped: needs root to build a lab (network namespaces)");
        return None;
    }
    let exe = awsprobe_exe();
    // The lab's own `lab-probe` runner (the metaguard binary) is not used
    // by these tests; only `command_in` is.
    let mut opts = metaguard_lab::LabOptions::new(&exe);
    opts.imds.tokens = tokens;
    Some(metaguard_lab::Lab::start(opts).unwrap_or_else(|e| panic!("{test}: lab: {e}")))
}

/// What one `mg-aws-probe` run printed.
#[derive(Debug)]
struct AwsProbe {
    code: Option<i32>,
    json: Value,
    elapsed: Duration,
    stderr: String,
}

/// Runs `mg-aws-probe args…` as workload `w`, with only `env` in its
/// environment (nothing of this machine's AWS_* or proxy settings), and a
/// 10 s limit (the probe's own is 5 s).
fn awsprobe(
    lab: &metaguard_lab::Lab,
    w: metaguard_lab::Workload,
    args: &[&str],
    env: &[(&str, &str)],
) -> AwsProbe {
    let mut cmd = lab.command_in(w, awsprobe_exe()).expect("lab command");
    cmd.args(args).env_clear().envs(env.iter().copied());
    let t0 = Instant::now();
    let mut child = cmd.spawn().expect("spawn mg-aws-probe");
    let deadline = t0 + Duration::from_secs(10);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("mg-aws-probe {args:?} as {w:?} ran past 10 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let elapsed = t0.elapsed();
    let out = child.wait_with_output().expect("output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let last = stdout.lines().last().unwrap_or("");
    let json = serde_json::from_str(last).unwrap_or_else(|e| {
        panic!("mg-aws-probe {args:?}: bad JSON {last:?}: {e}\nstderr: {stderr}")
    });
    AwsProbe {
        code: out.status.code(),
        json,
        elapsed,
        stderr,
    }
}

#[test]
fn aws_sdk_rust_imds_v2_through_the_lab_emulator() {
    use metaguard_lab::topology::addr;
    use metaguard_lab::Workload;
    let test = "aws_sdk_rust_imds_v2_through_the_lab_emulator";
    let Some(lab) = lab_or_skip(test, TokenMode::Required) else {
        return;
    };
    let imds = lab.imds();
    assert_eq!(imds.token_mode(), TokenMode::Required);

    // The SDK's defaults: http://169.254.169.254, then (endpoint mode IPv6)
    // http://[fd00:ec2::254] — the lab serves IMDS on both.
    for (mode, server) in [
        (None, IpAddr::V4(addr::IMDS_V4)),
        (Some("IPv6"), IpAddr::V6(addr::IMDS_V6)),
    ] {
        imds.log().clear();
        let env: Vec<(&str, &str)> = mode
            .map(|m| ("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", m))
            .into_iter()
            .collect();
        let r = awsprobe(&lab, Workload::HostNetwork, &["imds", IID], &env);
        assert_eq!(r.code, Some(0), "{mode:?}: {r:?}");
        assert_eq!(r.json["ok"], true, "{r:?}");
        assert!(r.stderr.is_empty(), "{r:?}");
        assert_eq!(r.json["value"], lab.instance_id(), "{r:?}");

        // IMDSv2: a token PUT, then the GET carrying that token.
        let entries = imds.log().entries();
        let seen: Vec<(&str, &str, u16)> = entries
            .iter()
            .map(|e| (e.method.as_str(), e.target.as_str(), e.status))
            .collect();
        assert_eq!(
            seen,
            [("PUT", "/latest/api/token", 200), ("GET", IID, 200)],
            "{mode:?}"
        );
        assert_eq!(entries[0].header(TTL), Some("21600"), "SDK's default TTL");
        assert_eq!(entries[0].header(TOKEN), None);
        assert!(
            entries[1].header(TOKEN).is_some_and(|t| t.len() == 56),
            "{:?}",
            entries[1]
        );
        for e in &entries {
            assert!(
                e.header("user-agent")
                    .is_some_and(|ua| ua.starts_with("aws-sdk-rust/") && ua.contains("api/imds/")),
                "{e:?}"
            );
        }
        // From the lab host, to the metadata address itself.
        assert!(
            entries.iter().all(|e| e.local.ip() == server),
            "{entries:?}"
        );
        let host = match server {
            IpAddr::V4(_) => IpAddr::V4(addr::HOST_V4),
            IpAddr::V6(_) => IpAddr::V6(addr::HOST_V6),
        };
        assert!(entries.iter().all(|e| e.peer.ip() == host), "{entries:?}");
    }
}

#[test]
fn aws_sdk_rust_ecs_credentials_through_the_lab_agent() {
    use metaguard_lab::topology::addr;
    use metaguard_lab::Workload;
    let test = "aws_sdk_rust_ecs_credentials_through_the_lab_agent";
    let Some(lab) = lab_or_skip(test, TokenMode::Required) else {
        return;
    };
    let agent = lab.agent();

    // AWS_CONTAINER_CREDENTIALS_RELATIVE_URI: the SDK fetches
    // http://169.254.170.2<uri>, which the lab routes as an ECS host does —
    // bridge containers through docker0 and the awsvpc task through
    // ecs-eth0/ecs-bridge reach ecs-init's DNAT to the agent emulator on
    // the host's 127.0.0.1:51679; host-network processes its nat OUTPUT
    // REDIRECT (their source address is the one routing chose for
    // 169.254.170.2: eth0's).
    for (w, peer) in [
        (Workload::BridgeC1, Ipv4Addr::new(172, 17, 0, 2)),
        (Workload::AwsvpcTask, addr::TASK_ECS_ETH0_V4),
        (Workload::HostNetwork, addr::HOST_V4),
    ] {
        let id = w.credentials_id();
        let creds = agent.credentials(id).expect("the lab's credentials");
        agent.log().clear();
        let uri = format!("/v2/credentials/{id}");
        let r = awsprobe(
            &lab,
            w,
            &["ecs-credentials"],
            &[("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", &uri)],
        );
        assert_eq!(r.code, Some(0), "{w:?}: {r:?}");
        assert_eq!(r.json["ok"], true, "{w:?}: {r:?}");
        assert_eq!(r.json["access_key_id"], creds.access_key_id.as_str());
        let expiry = r.json["expiry"].as_u64().expect("an expiry");
        assert_eq!(
            metaguard_lab::http::rfc3339(UNIX_EPOCH + Duration::from_secs(expiry)),
            creds.expiration,
            "{w:?}"
        );
        // Only the access key id is printed, never the secret or token.
        let obj = r.json.as_object().expect("object");
        assert_eq!(obj.len(), 3, "{}", r.json);
        let printed = r.json.to_string();
        assert!(!printed.contains(&creds.secret_access_key) && !printed.contains(&creds.token));
        // One request, no retry, arriving from the workload's own address.
        let entries = agent.log().entries();
        let seen: Vec<(IpAddr, &str, u16)> = entries
            .iter()
            .map(|e| (e.peer.ip(), e.target.as_str(), e.status))
            .collect();
        assert_eq!(seen, [(IpAddr::V4(peer), uri.as_str(), 200)], "{w:?}");
        assert_eq!(entries[0].header("accept"), Some("application/json"));
    }

    // AWS_CONTAINER_CREDENTIALS_FULL_URI: plain HTTP only to loopback,
    // 169.254.170.2 or the EKS pod-identity addresses. Loopback reaches the
    // agent from a host-network process (its own 127.0.0.1:51679)...
    let id = Workload::HostNetwork.credentials_id();
    let full = format!("http://127.0.0.1:{}/v2/credentials/{id}", addr::AGENT_PORT);
    let r = awsprobe(
        &lab,
        Workload::HostNetwork,
        &["ecs-credentials"],
        &[("AWS_CONTAINER_CREDENTIALS_FULL_URI", &full)],
    );
    assert_eq!(r.code, Some(0), "{r:?}");
    assert_eq!(
        r.json["access_key_id"],
        agent.credentials(id).expect("creds").access_key_id.as_str()
    );
    // ...but any other host is refused by the SDK before it connects: the
    // lab's echo service on the VPC gateway never hears of it.
    lab.echo_log().clear();
    let other = format!(
        "http://{}:{}/v2/credentials/{id}",
        addr::VPC_GW_V4,
        addr::ECHO_TCP_PORT
    );
    let r = awsprobe(
        &lab,
        Workload::HostNetwork,
        &["ecs-credentials"],
        &[("AWS_CONTAINER_CREDENTIALS_FULL_URI", &other)],
    );
    assert_eq!(r.code, Some(1), "{r:?}");
    let err = r.json["error"].as_str().expect("an error");
    assert!(
        err.contains("did not refer to an allowed IP address"),
        "{err}"
    );
    assert!(lab.echo_log().is_empty(), "{:?}", lab.echo_log().entries());

    // An id the agent does not know: a 400, not retried, and the SDK
    // reports only the status (the agent's error code is in the body).
    agent.log().clear();
    let r = awsprobe(
        &lab,
        Workload::AwsvpcTask,
        &["ecs-credentials"],
        &[(
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "/v2/credentials/unknown",
        )],
    );
    assert_eq!(r.code, Some(1), "{r:?}");
    assert_eq!(r.json["ok"], false);
    let err = r.json["error"].as_str().expect("an error");
    assert!(err.contains("400"), "{err}");
    let statuses: Vec<u16> = agent.log().entries().iter().map(|e| e.status).collect();
    assert_eq!(statuses, [400]);
}

#[test]
fn aws_sdk_rust_fails_fast_when_imds_does_not_answer() {
    use metaguard_lab::Workload;
    let test = "aws_sdk_rust_fails_fast_when_imds_does_not_answer";
    let Some(lab) = lab_or_skip(test, TokenMode::Required) else {
        return;
    };
    // AWS_EC2_METADATA_SERVICE_ENDPOINT moves the SDK off the emulator:
    // - a port nothing listens on at the metadata address (a TCP reset);
    // - an address on the VPC subnet nobody has (no ARP answer: the SDK's
    //   1 s IMDS connect timeout, which it does not retry).
    for (endpoint, want) in [
        ("http://169.254.169.254:81", "refused"),
        ("http://10.0.0.99", "timeout"),
    ] {
        lab.imds().log().clear();
        let r = awsprobe(
            &lab,
            Workload::HostNetwork,
            &["imds", IID],
            &[("AWS_EC2_METADATA_SERVICE_ENDPOINT", endpoint)],
        );
        assert_eq!(r.code, Some(1), "{endpoint}: {r:?}");
        assert_eq!(r.json["ok"], false, "{endpoint}: {r:?}");
        let err = r.json["error"].as_str().expect("an error");
        assert!(err.to_lowercase().contains(want), "{endpoint}: {err}");
        assert!(r.elapsed < Duration::from_secs(5), "{endpoint}: {r:?}");
        assert!(lab.imds().log().is_empty(), "{endpoint}");
    }
}
