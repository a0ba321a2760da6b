//! One request: checks, decision, forwarding, audit and metrics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use metaguard_core::config::{Action, TmdsMode};
use metaguard_core::proxy_path::{canonical, Canonical, Decision};
use metaguard_core::Config;
use serde_json::json;

use crate::audit::Entry;
use crate::settings::Settings;
use crate::{Caller, Connection, IdKind, Kind, Ownership, Proxy, UPSTREAM_TIMEOUT};

type Resp = Response<Full<Bytes>>;

/// The workload's name for logs and labels.
pub fn workload_name(config: &Config, caller: &Caller) -> String {
    caller
        .workload
        .and_then(|i| config.workloads.get(i))
        .map_or_else(|| "unidentified".to_string(), |w| w.name.clone())
}

/// What happened to a request.
struct Outcome {
    resp: Resp,
    decision: &'static str,
    rule: String,
    /// The path as logged (canonical; credentials ids shortened).
    path: String,
    upstream: Option<Duration>,
}

fn refuse(
    status: StatusCode,
    decision: &'static str,
    rule: impl Into<String>,
    workload: &str,
    path: String,
) -> Outcome {
    let rule = rule.into();
    let body = json!({
        "error": if status == StatusCode::FORBIDDEN { "denied by metaguard" } else { "refused by metaguard" },
        "rule": rule,
        "workload": workload,
    });
    let resp = Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string() + "\n")))
        .unwrap_or_default();
    Outcome {
        resp,
        decision,
        rule,
        path,
        upstream: None,
    }
}

/// Request headers forwarded, per service; everything else (notably
/// `X-Forwarded-For`, hop-by-hop headers, cookies) is dropped.
static IMDS_REQUEST_HEADERS: [HeaderName; 4] = [
    HeaderName::from_static("x-aws-ec2-metadata-token"),
    HeaderName::from_static("x-aws-ec2-metadata-token-ttl-seconds"),
    hyper::header::USER_AGENT,
    hyper::header::ACCEPT,
];
static RELAY_REQUEST_HEADERS: [HeaderName; 3] = [
    hyper::header::AUTHORIZATION,
    hyper::header::USER_AGENT,
    hyper::header::ACCEPT,
];
/// Response headers passed back.
static RESPONSE_HEADERS: [HeaderName; 6] = [
    hyper::header::CONTENT_TYPE,
    HeaderName::from_static("x-aws-ec2-metadata-token-ttl-seconds"),
    hyper::header::LAST_MODIFIED,
    hyper::header::ETAG,
    hyper::header::SERVER,
    hyper::header::DATE,
];

fn copy_headers(from: &HeaderMap, to: &mut HeaderMap, names: &[HeaderName]) {
    for name in names {
        for v in from.get_all(name) {
            to.append(name.clone(), v.clone());
        }
    }
}

/// The `Host` header for requests to `upstream`: its address, without the
/// port when that is 80.
pub(crate) fn host_header(upstream: SocketAddr) -> HeaderValue {
    let host = match (upstream.ip(), upstream.port()) {
        (std::net::IpAddr::V4(ip), 80) => ip.to_string(),
        (std::net::IpAddr::V6(ip), 80) => format!("[{ip}]"),
        _ => upstream.to_string(),
    };
    HeaderValue::try_from(host).expect("an address and port are a valid header value")
}

/// Shortens credentials ids in a logged path.
fn log_path(c: &Canonical, kind: Kind) -> String {
    if kind == Kind::Relay {
        let segs = &c.segments;
        if segs.len() == 3 && segs[0] == "v2" && segs[1] == "credentials" {
            return format!("/v2/credentials/{}…", short(&segs[2]));
        }
        if let Some((_, id)) = c.query.iter().find(|(k, _)| k == "id") {
            return format!("{}?id={}…", c.path(), short(id));
        }
    }
    c.target()
}

fn short(id: &str) -> String {
    id.chars().take(4).collect()
}

/// Whether a `Host` header names a metadata endpoint (or metaguard's own
/// listener). Requests for other hosts are refused: the proxy must not be
/// usable as a relay to somewhere else.
fn host_ok(config: &Config, host: Option<&HeaderValue>) -> bool {
    let Some(h) = host.and_then(|h| h.to_str().ok()) else {
        return true; // HTTP/1.0 without Host: nothing to mislead
    };
    let h = h.trim().to_ascii_lowercase();
    let name = match h.rsplit_once(':') {
        Some((n, port)) if !n.ends_with(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            n.to_string()
        }
        _ => h.clone(),
    };
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    if matches!(bare, "instance-data" | "instance-data.ec2.internal") {
        return true;
    }
    match bare.parse::<std::net::IpAddr>() {
        Ok(ip) => {
            config.endpoints.imds.contains(&ip) || config.endpoints.task_metadata.contains(&ip)
        }
        Err(_) => false,
    }
}

/// Refuses what no metadata client sends and what smuggling needs: a body,
/// `Transfer-Encoding`, several or non-zero `Content-Length`s.
fn framing_problem(req: &Request<Incoming>) -> Option<&'static str> {
    let h = req.headers();
    if h.contains_key(hyper::header::TRANSFER_ENCODING) {
        return Some("Transfer-Encoding is not accepted (metadata requests have no body)");
    }
    let lengths: Vec<&HeaderValue> = h.get_all(hyper::header::CONTENT_LENGTH).iter().collect();
    if lengths.len() > 1 {
        return Some("more than one Content-Length");
    }
    if let Some(l) = lengths.first() {
        if l.as_bytes() != b"0" {
            return Some("a request body is not accepted (Content-Length must be 0)");
        }
    }
    None
}

impl Proxy {
    /// One request on `conn`, under the settings in force now: a reload
    /// since the connection was accepted has its caller identified again
    /// under the new config.
    pub(crate) async fn handle(
        &self,
        kind: Kind,
        conn: &Connection,
        req: Request<Incoming>,
    ) -> Resp {
        let s = self.settings();
        let reidentified;
        let caller = if Arc::ptr_eq(&s.config, &conn.config) {
            &conn.caller
        } else {
            reidentified = self.identify(&s.config, conn.origin).await;
            &reidentified
        };
        let wname = workload_name(&s.config, caller);
        let method = req.method().as_str().to_string();
        let out = self.route(kind, caller, &s, &wname, req).await;
        let status = out.resp.status().as_u16();
        self.metrics
            .requests
            .with_label_values(&[kind.as_str(), &wname, out.decision, &status.to_string()])
            .inc();
        s.audit.request(&Entry {
            kind,
            caller,
            workload: &wname,
            method: &method,
            path: &out.path,
            decision: out.decision,
            rule: &out.rule,
            status,
            upstream: out.upstream,
        });
        out.resp
    }

    async fn route(
        &self,
        kind: Kind,
        caller: &Caller,
        s: &Settings,
        wname: &str,
        req: Request<Incoming>,
    ) -> Outcome {
        let config = &s.config;
        let raw = req
            .uri()
            .path_and_query()
            .map_or_else(|| "/".to_string(), |p| p.as_str().to_string());
        let raw_log: String = raw.chars().take(200).collect();
        if req.uri().scheme().is_some() || req.uri().authority().is_some() {
            return refuse(
                StatusCode::BAD_REQUEST,
                "invalid",
                "only origin-form request targets (/path) are accepted",
                wname,
                raw_log,
            );
        }
        if !host_ok(config, req.headers().get(hyper::header::HOST)) {
            return refuse(
                StatusCode::BAD_REQUEST,
                "invalid",
                "the Host header does not name a metadata endpoint",
                wname,
                raw_log,
            );
        }
        if let Some(why) = framing_problem(&req) {
            return refuse(StatusCode::BAD_REQUEST, "invalid", why, wname, raw_log);
        }
        let Some(w) = caller.workload.and_then(|i| config.workloads.get(i)) else {
            return refuse(
                StatusCode::FORBIDDEN,
                "deny",
                format!("unidentified caller ({})", caller.origin),
                wname,
                raw_log,
            );
        };
        if !s.limits.request(caller.workload) {
            return refuse(
                StatusCode::TOO_MANY_REQUESTS,
                "throttle",
                format!(
                    "rate limit ({} rps, burst {})",
                    config.proxy.rate, config.proxy.burst
                ),
                wname,
                raw_log,
            );
        }
        let (action, allowed_query): (Action, &[&str]) = match kind {
            Kind::Imds => (w.imds, &[]),
            Kind::Relay => (w.task_metadata, &["id"]),
        };
        if action == Action::Deny {
            return refuse(
                StatusCode::FORBIDDEN,
                "deny",
                format!("{} = \"deny\"", kind.as_str()),
                wname,
                raw_log,
            );
        }
        let c = match canonical(&raw, allowed_query) {
            Ok(c) => c,
            // allow and proxy alike: a target without a canonical form is
            // never forwarded.
            Err(e) => {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    "invalid",
                    format!("canonical path: {e}"),
                    wname,
                    raw_log,
                )
            }
        };
        let path = log_path(&c, kind);
        match kind {
            Kind::Imds => self.imds(s, w, action, wname, c, path, req).await,
            Kind::Relay => self.relay(s, caller, w, action, wname, c, path, req).await,
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn imds(
        &self,
        s: &Settings,
        w: &metaguard_core::config::Workload,
        action: Action,
        wname: &str,
        c: Canonical,
        path: String,
        req: Request<Incoming>,
    ) -> Outcome {
        let mut rule = "imds = \"allow\"".to_string();
        if action == Action::Proxy {
            let token = c.segments == ["latest", "api", "token"];
            let m = req.method();
            if !(m == Method::GET || m == Method::HEAD || (m == Method::PUT && token)) {
                return refuse(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "deny",
                    format!("method {m} is not served on this path"),
                    wname,
                    path,
                );
            }
            if m == Method::PUT && req.headers().contains_key("x-forwarded-for") {
                // What IMDS itself answers (F16): a token must not be
                // obtainable through a forwarding proxy.
                return refuse(
                    StatusCode::FORBIDDEN,
                    "deny",
                    "token PUT with X-Forwarded-For (IMDS refuses these too)",
                    wname,
                    path,
                );
            }
            match w.imds_policy.decide(&c) {
                Decision::Deny { rule } => {
                    return refuse(StatusCode::FORBIDDEN, "deny", rule, wname, path)
                }
                Decision::Allow { rule: r } => rule = r,
            }
        }
        self.forward(
            s,
            Kind::Imds,
            wname,
            req,
            c.target(),
            &IMDS_REQUEST_HEADERS,
            rule,
            path,
            None,
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn relay(
        &self,
        s: &Settings,
        caller: &Caller,
        w: &metaguard_core::config::Workload,
        action: Action,
        wname: &str,
        c: Canonical,
        path: String,
        req: Request<Incoming>,
    ) -> Outcome {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                "deny",
                format!(
                    "method {} is not served by the credentials endpoint",
                    req.method()
                ),
                wname,
                path,
            );
        }
        let segs: Vec<&str> = c.segments.iter().map(String::as_str).collect();
        let creds_id: Option<String> = match segs.as_slice() {
            ["v2", "credentials", id] => Some((*id).to_string()),
            ["v1", "credentials"] => c
                .query
                .iter()
                .find(|(k, _)| k == "id")
                .map(|(_, v)| v.clone()),
            _ => None,
        };
        let config = &s.config;
        let proxied = action == Action::Proxy;
        let mut rule = format!("task_metadata = \"{action}\"");
        let mut redact_for: Option<Option<String>> = None;
        if let Some(id) = &creds_id {
            let own = caller.credentials_ids.contains(id) || w.credentials_ids.contains(id);
            if own {
                rule = "credentials id owned by the caller".into();
            } else if proxied {
                return refuse(
                    StatusCode::FORBIDDEN,
                    "deny",
                    "credentials id not owned by this workload (F13)",
                    wname,
                    path,
                );
            } else if let Some(why) = self
                .foreign_id(config, caller, IdKind::Credentials, id)
                .await
            {
                return refuse(StatusCode::FORBIDDEN, "deny", why, wname, path);
            }
        } else if let [v @ ("v3" | "v4"), eid, rest @ ..] = segs.as_slice() {
            if !proxied && !caller.tmds_ids.iter().any(|i| i == eid) {
                if let Some(why) = self
                    .foreign_id(config, caller, IdKind::TaskMetadata, eid)
                    .await
                {
                    return refuse(StatusCode::FORBIDDEN, "deny", why, wname, path);
                }
            }
            if proxied {
                match w.tmds {
                    TmdsMode::Deny => {
                        return refuse(
                            StatusCode::FORBIDDEN,
                            "deny",
                            "tmds = \"deny\"",
                            wname,
                            path,
                        )
                    }
                    _ if !caller.tmds_ids.iter().any(|i| i == eid) => {
                        return refuse(
                            StatusCode::FORBIDDEN,
                            "deny",
                            "task metadata endpoint id not owned by the caller",
                            wname,
                            path,
                        )
                    }
                    TmdsMode::Redact if rest.last() == Some(&"stats") => {
                        return refuse(
                            StatusCode::FORBIDDEN,
                            "deny",
                            "tmds = \"redact\": statistics are not served",
                            wname,
                            path,
                        )
                    }
                    TmdsMode::Redact => {
                        rule = format!("tmds = \"redact\" ({v})");
                        redact_for = Some(caller.container.clone());
                    }
                    TmdsMode::Allow => rule = format!("tmds = \"allow\" ({v})"),
                }
            }
        } else if proxied {
            return refuse(
                StatusCode::FORBIDDEN,
                "deny",
                "not a credentials or task metadata path (default deny)",
                wname,
                path,
            );
        }
        self.forward(
            s,
            Kind::Relay,
            wname,
            req,
            c.target(),
            &RELAY_REQUEST_HEADERS,
            rule,
            path,
            redact_for,
        )
        .await
    }

    /// For a caller of an `allow` workload asking for an id it does not
    /// own: why it is refused — the id's owner is proxied (or could not be
    /// placed), or its container has stopped — or `None` to forward it.
    async fn foreign_id(
        &self,
        config: &Arc<Config>,
        caller: &Caller,
        kind: IdKind,
        id: &str,
    ) -> Option<String> {
        let dir = self.directory.clone();
        let (config2, id2) = (config.clone(), id.to_string());
        let ownership = tokio::task::spawn_blocking(move || dir.owner(&config2, kind, &id2))
            .await
            .unwrap_or(Ownership::Unknown);
        match ownership {
            Ownership::Unknown => None,
            Ownership::Revoked => Some(format!(
                "{} of a container that has stopped (revoked)",
                kind.as_str()
            )),
            Ownership::Owned(o) => {
                let proxied = o.uncertain
                    || o.workload
                        .and_then(|i| config.workloads.get(i))
                        .is_some_and(|ow| ow.task_metadata == Action::Proxy);
                (proxied && o.container != caller.container)
                    .then(|| format!("{} owned by another, proxied workload (F13)", kind.as_str()))
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        s: &Settings,
        kind: Kind,
        wname: &str,
        req: Request<Incoming>,
        target: String,
        headers: &[HeaderName],
        rule: String,
        path: String,
        redact_for: Option<Option<String>>,
    ) -> Outcome {
        // Origin-form target and our own Host: the upstream sees a request
        // for itself, whatever the client wrote.
        let (upstream, host) = match kind {
            Kind::Imds => (s.upstreams.imds, &s.upstream_hosts[0]),
            Kind::Relay => (s.upstreams.agent, &s.upstream_hosts[1]),
        };
        let mut up = Request::builder()
            .method(req.method().clone())
            .uri(target)
            .header(hyper::header::HOST, host);
        if let Some(h) = up.headers_mut() {
            copy_headers(req.headers(), h, headers);
        }
        let Ok(up) = up.body(Full::new(Bytes::new())) else {
            return refuse(
                StatusCode::BAD_REQUEST,
                "invalid",
                "cannot build the upstream request",
                wname,
                path,
            );
        };
        let started = Instant::now();
        let deadline = tokio::time::Instant::from_std(started + UPSTREAM_TIMEOUT);
        let result = crate::upstream::exchange(upstream, up, deadline).await;
        let elapsed = started.elapsed();
        let (parts, mut bytes) = match result {
            Ok(x) => x,
            Err(e) => {
                return self.upstream_failed(kind, wname, format!("upstream error: {e}"), path)
            }
        };
        self.metrics
            .upstream_seconds
            .with_label_values(&[kind.as_str()])
            .observe(elapsed.as_secs_f64());
        let mut decision = "allow";
        if let Some(own) = redact_for {
            if parts.status.is_success() {
                match serde_json::from_slice::<serde_json::Value>(&bytes) {
                    Ok(mut v) => {
                        crate::redact::redact(&mut v, own.as_deref());
                        bytes = Bytes::from(v.to_string());
                        decision = "redact";
                    }
                    Err(_) => {
                        return refuse(
                            StatusCode::BAD_GATEWAY,
                            "error",
                            "tmds answer is not JSON; not served in redact mode",
                            wname,
                            path,
                        )
                    }
                }
            }
        }
        let mut resp = Response::new(Full::new(bytes));
        *resp.status_mut() = parts.status;
        copy_headers(&parts.headers, resp.headers_mut(), &RESPONSE_HEADERS);
        Outcome {
            resp,
            decision,
            rule,
            path,
            upstream: Some(elapsed),
        }
    }

    fn upstream_failed(&self, kind: Kind, wname: &str, why: String, path: String) -> Outcome {
        self.metrics
            .upstream_errors
            .with_label_values(&[kind.as_str()])
            .inc();
        let mut o = refuse(StatusCode::BAD_GATEWAY, "error", why, wname, path);
        o.decision = "error";
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstreams_are_sent_their_own_host() {
        for (addr, host) in [
            ("169.254.169.254:80", "169.254.169.254"),
            ("[fd00:ec2::254]:80", "[fd00:ec2::254]"),
            ("127.0.0.1:51679", "127.0.0.1:51679"),
        ] {
            let addr: SocketAddr = addr.parse().expect("address");
            assert_eq!(host_header(addr), host);
        }
    }

    #[test]
    fn host_header_must_name_an_endpoint() {
        let c = Config::builtin_default();
        let ok = |h: &str| host_ok(&c, Some(&HeaderValue::from_str(h).expect("header")));
        for good in [
            "169.254.169.254",
            "169.254.169.254:80",
            "169.254.170.2",
            "169.254.170.2:9470",
            "[fd00:ec2::254]",
            "[fd00:ec2::254]:80",
            "instance-data",
            "INSTANCE-DATA:80",
        ] {
            assert!(ok(good), "{good}");
        }
        for bad in [
            "example.com",
            "127.0.0.1:51679",
            "169.254.169.254.evil",
            "10.0.0.1",
            "",
        ] {
            assert!(!ok(bad), "{bad}");
        }
    }
}
