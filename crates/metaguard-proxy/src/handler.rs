//! One request: the pure decision (`core::proxy_decision`) with its I/O
//! around it — the caller's re-identification after a reload, the rate
//! limiter, the owner of a foreign id (the directory, on a blocking
//! thread), forwarding, audit and metrics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use metaguard_core::proxy_decision::{self, Forward, Refusal, Step, Verdict};
use metaguard_core::Config;
use serde_json::json;

use crate::audit::Entry;
use crate::settings::Settings;
use crate::{Caller, Connection, Kind, Ownership, Proxy, UPSTREAM_TIMEOUT};

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
    /// The `AccessKeyId` of a credentials answer (observed requests only).
    access_key_id: Option<String>,
}

/// The answer to a request the decision refused.
fn refused(r: Refusal, workload: &str) -> Outcome {
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::FORBIDDEN);
    refuse(status, r.decision, r.rule, workload, r.path)
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
        access_key_id: None,
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
        // Observe: what the record needs of the request itself.
        let observed = s
            .observe
            .as_ref()
            .filter(|_| crate::observe::observed(&s.config, caller, kind))
            .map(|log| {
                let target = req
                    .uri()
                    .path_and_query()
                    .map_or_else(|| "/".to_string(), |p| p.as_str().to_string());
                let token = req.headers().contains_key("x-aws-ec2-metadata-token");
                (log.clone(), target, token)
            });
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
        if let Some((log, target, token)) = observed {
            self.observe(
                &s, &log, kind, caller, conn, &wname, &method, &target, token, &out,
            );
        }
        out.resp
    }

    /// Records an observed request and counts it.
    #[allow(clippy::too_many_arguments)]
    fn observe(
        &self,
        s: &Settings,
        log: &crate::ObserveLog,
        kind: Kind,
        caller: &Caller,
        conn: &Connection,
        wname: &str,
        method: &str,
        target: &str,
        token: bool,
        out: &Outcome,
    ) {
        let seen = crate::observe::Seen {
            kind,
            caller,
            workload: wname,
            ipv6: conn.origin.peer.is_ipv6(),
            method,
            target,
            path: &out.path,
            token,
            status: out.resp.status().as_u16(),
            decision: out.decision,
            access_key_id: out.access_key_id.clone(),
        };
        let rec = crate::observe::record_of(&s.config, self.directory.as_ref(), &seen);
        self.metrics
            .observed
            .with_label_values(&[
                wname,
                kind.as_str(),
                rec.imds_version.as_deref().unwrap_or("none"),
                out.decision,
            ])
            .inc();
        if let Err(e) = log.record(&rec) {
            self.metrics.observe_errors.inc();
            tracing::warn!(error = %e, "cannot record an observed request");
        }
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
        let target = req
            .uri()
            .path_and_query()
            .map_or_else(|| "/".to_string(), |p| p.as_str().to_string());
        let h = req.headers();
        let content_lengths: Vec<&[u8]> = h
            .get_all(hyper::header::CONTENT_LENGTH)
            .iter()
            .map(HeaderValue::as_bytes)
            .collect();
        let head = proxy_decision::Request {
            method: req.method().as_str(),
            target: &target,
            absolute: req.uri().scheme().is_some() || req.uri().authority().is_some(),
            host: h.get(hyper::header::HOST).and_then(|v| v.to_str().ok()),
            transfer_encoding: h.contains_key(hyper::header::TRANSFER_ENCODING),
            content_lengths: &content_lengths,
            forwarded_for: h.contains_key("x-forwarded-for"),
        };
        let step = proxy_decision::decide(config, kind, caller, &head, |w| s.limits.request(w));
        let verdict = match step {
            Step::Done(v) => v,
            Step::AskOwner(pending) => {
                let dir = self.directory.clone();
                let (config2, id) = (config.clone(), pending.id.clone());
                let id_kind = pending.kind;
                let ownership =
                    tokio::task::spawn_blocking(move || dir.owner(&config2, id_kind, &id))
                        .await
                        .unwrap_or(Ownership::Unknown);
                pending.resolve(config, &ownership)
            }
        };
        match verdict {
            Verdict::Refuse(r) => refused(r, wname),
            Verdict::Forward(f) => self.forward(s, wname, req, f).await,
        }
    }

    async fn forward(
        &self,
        s: &Settings,
        wname: &str,
        req: Request<Incoming>,
        f: Forward,
    ) -> Outcome {
        let Forward {
            kind,
            target,
            rule,
            path,
            redact_for,
        } = f;
        let headers: &[HeaderName] = match kind {
            Kind::Imds => &IMDS_REQUEST_HEADERS,
            Kind::Relay => &RELAY_REQUEST_HEADERS,
        };
        // Origin-form target and our own Host: the upstream sees a request
        // for itself, whatever the client wrote.
        let (mut upstream, mut host) = match kind {
            Kind::Imds => (s.upstreams.imds, s.upstream_hosts[0].clone()),
            Kind::Relay => (s.upstreams.agent, s.upstream_hosts[1].clone()),
        };
        // The agent in a container: its address now, by its identity (the
        // directory asks Docker), and a marked connection (the only one
        // the host's rules let through to its port).
        let mut mark = None;
        if kind == Kind::Relay && s.config.agent_container.is_some() {
            let dir = self.directory.clone();
            let config = s.config.clone();
            let found = tokio::task::spawn_blocking(move || dir.agent_upstream(&config))
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
            match found {
                Ok(addr) => {
                    upstream = addr;
                    host = host_header(addr);
                    mark = Some(metaguard_core::ruleset::RELAY_UPSTREAM_MARK);
                }
                Err(why) => {
                    return self.upstream_failed(
                        kind,
                        wname,
                        format!("upstream error: {why}"),
                        path,
                    )
                }
            }
        }
        let mut up = Request::builder()
            .method(req.method().clone())
            .uri(target)
            .header(hyper::header::HOST, &host);
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
        let result = match mark {
            None => crate::upstream::exchange(upstream, up, deadline).await,
            Some(_) => crate::upstream::exchange_marked(upstream, mark, up, deadline).await,
        };
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
        let access_key_id = (s.observe.is_some() && parts.status.is_success())
            .then(|| crate::observe::access_key_id(&bytes))
            .flatten();
        let mut resp = Response::new(Full::new(bytes));
        *resp.status_mut() = parts.status;
        copy_headers(&parts.headers, resp.headers_mut(), &RESPONSE_HEADERS);
        Outcome {
            resp,
            decision,
            rule,
            path,
            upstream: Some(elapsed),
            access_key_id,
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
}
