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
use hyper::http::request::Parts;
use hyper::{Request, Response, StatusCode};
use metaguard_core::proxy_decision::{self, Forward, Refusal, Step, Verdict};
use metaguard_core::Config;
use serde_json::json;

use crate::audit::Entry;
use crate::cache::{self, Answer, Fetched, Key, Rule, Source};
use crate::settings::Settings;
use crate::tokens;
use crate::{Caller, Connection, Kind, Ownership, Proxy, UPSTREAM_TIMEOUT};

type Resp = Response<Full<Bytes>>;

/// The workload's name for logs and labels.
pub fn workload_name<'a>(config: &'a Config, caller: &Caller) -> &'a str {
    caller
        .workload
        .and_then(|i| config.workloads.get(i))
        .map_or("unidentified", |w| w.name.as_str())
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
    /// Where the answer came from, for an answer the cache was asked for.
    cache: Option<Source>,
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
        cache: None,
    }
}

/// Non-standard headers as names made once: inserting by a `&str` name
/// copies the name into a new allocation, and looking one up by a `&str`
/// parses it into a name every time (about 450 instructions, callgrind).
static TTL_NAME: HeaderName = HeaderName::from_static(tokens::TTL_HEADER);
static TOKEN_NAME: HeaderName = HeaderName::from_static(tokens::TOKEN_HEADER);
static XFF_NAME: HeaderName = HeaderName::from_static("x-forwarded-for");

/// Request headers forwarded, per service; everything else (notably
/// `X-Forwarded-For`, hop-by-hop headers, cookies) is dropped.
static IMDS_REQUEST_HEADERS: [HeaderName; 4] = [
    HeaderName::from_static(tokens::TOKEN_HEADER),
    HeaderName::from_static(tokens::TTL_HEADER),
    hyper::header::USER_AGENT,
    hyper::header::ACCEPT,
];
/// Request headers forwarded with the proxy's own token: the caller's
/// token and TTL header stay here.
static IMDS_V2_REQUEST_HEADERS: [HeaderName; 2] =
    [hyper::header::USER_AGENT, hyper::header::ACCEPT];
static RELAY_REQUEST_HEADERS: [HeaderName; 3] = [
    hyper::header::AUTHORIZATION,
    hyper::header::USER_AGENT,
    hyper::header::ACCEPT,
];
/// Response headers passed back; the last, the TTL header, not for a
/// request sent with the proxy's own token.
static RESPONSE_HEADERS: [HeaderName; 6] = [
    hyper::header::CONTENT_TYPE,
    hyper::header::LAST_MODIFIED,
    hyper::header::ETAG,
    hyper::header::SERVER,
    hyper::header::DATE,
    HeaderName::from_static(tokens::TTL_HEADER),
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
        // Requests with a body are refused (the decision): only the head
        // matters.
        let (head, _body) = req.into_parts();
        if crate::io::asks_to_close(&head) {
            conn.last.mark();
        }
        let ipv6 = conn.origin.peer.is_ipv6();
        self.respond_on(kind, caller, &s, &head, ipv6, conn.over_connections)
            .await
    }

    /// The answer to request `head` of `caller` (connected over IPv6 when
    /// `ipv6`) under settings `s`, on a connection within the limits: the
    /// tests' shorthand for [`Proxy::respond_on`].
    #[cfg(test)]
    pub(crate) async fn respond(
        &self,
        kind: Kind,
        caller: &Caller,
        s: &Settings,
        head: &Parts,
        ipv6: bool,
    ) -> Resp {
        self.respond_on(kind, caller, s, head, ipv6, false).await
    }

    /// The answer to request `head` of `caller` (connected over IPv6 when
    /// `ipv6`) under settings `s`, counted, audited and, for an observed
    /// workload, recorded — with `over_connections` when its connection was
    /// over `[proxy] max_connections` (served: observe is not held to it).
    pub(crate) async fn respond_on(
        &self,
        kind: Kind,
        caller: &Caller,
        s: &Settings,
        head: &Parts,
        ipv6: bool,
        over_connections: bool,
    ) -> Resp {
        let wname = workload_name(&s.config, caller);
        // Observe: what the record needs of the request itself.
        let observed = s
            .observe
            .as_ref()
            .filter(|_| crate::observe::observed(&s.config, caller, kind))
            .map(|log| {
                let target = head
                    .uri
                    .path_and_query()
                    .map_or_else(|| "/".to_string(), |p| p.as_str().to_string());
                let token = head.headers.contains_key(&TOKEN_NAME);
                // Never refused for the limits (the decision does not ask
                // them under observe); what proxy would have refused is
                // counted apart and recorded.
                let over_limit = if over_connections {
                    Some("connections")
                } else if !s.limits.observed_request(caller.workload) {
                    Some("rate")
                } else {
                    None
                };
                (log.clone(), target, token, over_limit)
            });
        let out = self.route(kind, caller, s, wname, head).await;
        let status = out.resp.status().as_u16();
        self.metrics
            .count_request(kind, wname, out.decision, status);
        if let Some(c) = out.cache {
            self.metrics.count_cache(kind, c);
        }
        s.audit.request(&Entry {
            kind,
            caller,
            workload: wname,
            method: head.method.as_str(),
            path: &out.path,
            decision: out.decision,
            rule: &out.rule,
            status,
            upstream: out.upstream,
            cache: out.cache.map(Source::as_str),
        });
        if let Some((log, target, token, over_limit)) = observed {
            self.observe(
                s,
                &log,
                kind,
                caller,
                ipv6,
                wname,
                head.method.as_str(),
                &target,
                token,
                &out,
                over_limit,
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
        ipv6: bool,
        wname: &str,
        method: &str,
        target: &str,
        token: bool,
        out: &Outcome,
        over_limit: Option<&'static str>,
    ) {
        let seen = crate::observe::Seen {
            kind,
            caller,
            workload: wname,
            ipv6,
            method,
            target,
            path: &out.path,
            token,
            status: out.resp.status().as_u16(),
            decision: out.decision,
            access_key_id: out.access_key_id.clone(),
            over_limit,
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
        req: &Parts,
    ) -> Outcome {
        let config = &s.config;
        let target = req.uri.path_and_query().map_or("/", |p| p.as_str());
        let h = &req.headers;
        let content_lengths: Vec<&[u8]> = h
            .get_all(hyper::header::CONTENT_LENGTH)
            .iter()
            .map(HeaderValue::as_bytes)
            .collect();
        let head = proxy_decision::Request {
            method: req.method.as_str(),
            target,
            absolute: req.uri.scheme().is_some() || req.uri.authority().is_some(),
            host: h.get(hyper::header::HOST).and_then(|v| v.to_str().ok()),
            transfer_encoding: h.contains_key(hyper::header::TRANSFER_ENCODING),
            content_lengths: &content_lengths,
            forwarded_for: h.contains_key(&XFF_NAME),
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
        // Everything below runs only for a request the decision allowed
        // for this caller: the tokens and the cache never widen access.
        match verdict {
            Verdict::Refuse(r) => refused(r, wname),
            Verdict::Forward(f) if f.kind == Kind::Imds => {
                self.imds(s, caller, wname, req, f).await
            }
            Verdict::Forward(f) => self.forward(s, wname, req, f, None).await,
        }
    }

    /// An allowed IMDS request: a token `PUT` is answered here, a request
    /// with a token is checked against the caller and sent with the
    /// proxy's own token; one without (IMDSv1) goes as it came, so the
    /// instance's `HttpTokens` setting still decides it.
    async fn imds(
        &self,
        s: &Settings,
        caller: &Caller,
        wname: &str,
        req: &Parts,
        f: Forward,
    ) -> Outcome {
        if f.target == tokens::TOKEN_PATH && req.method == hyper::Method::PUT {
            return self.issue_token(caller, wname, req, f);
        }
        let Some(token) = req.headers.get(&TOKEN_NAME) else {
            return self.forward(s, wname, req, f, None).await;
        };
        let binding = tokens::binding(wname, caller);
        match self.tokens.check(&binding, token.as_bytes()) {
            Some(left) => self.forward(s, wname, req, f, Some(left)).await,
            None => imds_error(
                StatusCode::UNAUTHORIZED,
                "deny",
                "IMDSv2 token not issued to this caller, or expired",
                f.path,
            ),
        }
    }

    /// `PUT /latest/api/token`, answered as IMDS answers it, with a token
    /// valid for this caller only.
    fn issue_token(&self, caller: &Caller, wname: &str, req: &Parts, f: Forward) -> Outcome {
        if req.headers.contains_key(&XFF_NAME) {
            // IMDS's own answer (F16); the decision refuses these for
            // proxied workloads already.
            let mut o = imds_error(
                StatusCode::FORBIDDEN,
                "deny",
                "token PUT with X-Forwarded-For (IMDS refuses these too)",
                f.path,
            );
            *o.resp.body_mut() = Full::new(Bytes::new());
            return o;
        }
        let Some(ttl) = tokens::parse_ttl(req.headers.get(&TTL_NAME)) else {
            return imds_error(
                StatusCode::BAD_REQUEST,
                "invalid",
                "token TTL missing or not 1-21600 seconds",
                f.path,
            );
        };
        let binding = tokens::binding(wname, caller);
        match self.tokens.issue(&binding, ttl) {
            Ok(token) => {
                let mut resp = Response::new(Full::new(Bytes::from(token)));
                let h = resp.headers_mut();
                h.insert(
                    hyper::header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain"),
                );
                h.insert(TTL_NAME.clone(), HeaderValue::from(ttl));
                Outcome {
                    resp,
                    decision: "allow",
                    rule: format!("{}; token issued by metaguard for this caller", f.rule),
                    path: f.path,
                    upstream: None,
                    access_key_id: None,
                    cache: None,
                }
            }
            Err(e) => imds_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "error",
                &e.to_string(),
                f.path,
            ),
        }
    }

    /// Forwards an allowed request (from the cache when its rule allows):
    /// `v2` holds the seconds left on the caller's IMDSv2 token, for a
    /// request sent with the proxy's own token.
    async fn forward(
        &self,
        s: &Settings,
        wname: &str,
        req: &Parts,
        f: Forward,
        v2: Option<u64>,
    ) -> Outcome {
        let Forward {
            kind,
            target,
            rule,
            path,
            redact_for,
        } = f;
        let key_rule = match kind {
            _ if !s.config.proxy.cache || req.method != hyper::Method::GET => Rule::Never,
            // IMDSv1 answers are not kept: a v1 request must reach IMDS,
            // whose HttpTokens setting decides it.
            Kind::Imds if v2.is_none() => Rule::Never,
            Kind::Imds => cache::imds_rule(&target),
            Kind::Relay if redact_for.is_some() => Rule::Never,
            Kind::Relay => cache::relay_rule(&target),
        };
        let started = Instant::now();
        let fetch = || self.fetch(s, kind, req, &target, v2.is_some());
        let fetched = if key_rule == Rule::Never {
            self.cache.bypass(fetch).await
        } else {
            let key = Key {
                kind,
                target: target.clone(),
                authorization: match kind {
                    Kind::Relay => req
                        .headers
                        .get(hyper::header::AUTHORIZATION)
                        .map(|v| Bytes::copy_from_slice(v.as_bytes())),
                    Kind::Imds => None,
                },
            };
            self.cache.get(key, key_rule, fetch).await
        };
        let elapsed = started.elapsed();
        let (answer, source) = match fetched {
            Fetched::Answer(a, src) => (a, src),
            Fetched::Failed(e) => {
                return self.upstream_failed(kind, wname, format!("upstream error: {e}"), path)
            }
        };
        let upstream = matches!(source, Source::Miss | Source::Bypass).then_some(elapsed);
        if source == Source::Stale {
            self.metrics
                .stale_answers
                .with_label_values(&[kind.as_str()])
                .inc();
        }
        // An answer nobody else holds (not kept: a miss of a `Never` rule)
        // is taken apart; a kept one is copied (its body is shared).
        let (status, headers, mut bytes) = match Arc::try_unwrap(answer) {
            Ok(a) => (a.status, a.headers, a.body),
            Err(kept) => (kept.status, kept.headers.clone(), kept.body.clone()),
        };
        let mut decision = "allow";
        if let Some(own) = redact_for {
            if status.is_success() {
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
        let access_key_id = (s.observe.is_some() && status.is_success())
            .then(|| crate::observe::access_key_id(&bytes))
            .flatten();
        let mut resp = Response::new(Full::new(bytes));
        *resp.status_mut() = status;
        *resp.headers_mut() = headers;
        if let Some(left) = v2 {
            // The caller's token's time left, as IMDS echoes it (the
            // upstream's header named the proxy's own token).
            resp.headers_mut()
                .insert(TTL_NAME.clone(), HeaderValue::from(left));
        }
        let rule = match source {
            Source::Stale => {
                format!("{rule}; served stale: the upstream failed, credentials still valid")
            }
            _ => rule,
        };
        Outcome {
            resp,
            decision,
            rule,
            path,
            upstream,
            access_key_id,
            cache: (key_rule != Rule::Never).then_some(source),
        }
    }

    /// One upstream exchange for `target`: with the proxy's own IMDS token
    /// when `own_token` (asked for again once if IMDS refuses it).
    async fn fetch(
        &self,
        s: &Settings,
        kind: Kind,
        req: &Parts,
        target: &str,
        own_token: bool,
    ) -> Result<Answer, String> {
        let headers: &[HeaderName] = match kind {
            Kind::Imds if own_token => &IMDS_V2_REQUEST_HEADERS,
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
            let addr = tokio::task::spawn_blocking(move || dir.agent_upstream(&config))
                .await
                .unwrap_or_else(|e| Err(e.to_string()))?;
            upstream = addr;
            host = host_header(addr);
            mark = Some(metaguard_core::ruleset::RELAY_UPSTREAM_MARK);
        }
        let host = &host;
        let started = Instant::now();
        let deadline = tokio::time::Instant::from_std(started + UPSTREAM_TIMEOUT);
        for attempt in 0..2 {
            let token = if own_token {
                self.upstream_token
                    .get(upstream, || tokens::put_request(upstream, host, deadline))
                    .await?
            } else {
                None
            };
            let mut up = Request::builder()
                .method(req.method.clone())
                .uri(target)
                .header(hyper::header::HOST, host);
            if let Some(h) = up.headers_mut() {
                copy_headers(&req.headers, h, headers);
                if let Some(t) = token {
                    h.insert(TOKEN_NAME.clone(), t);
                }
            }
            let up = up
                .body(Full::new(Bytes::new()))
                .map_err(|e| format!("cannot build the upstream request: {e}"))?;
            let (parts, body) = match mark {
                None => crate::upstream::exchange(upstream, up, deadline).await?,
                Some(_) => crate::upstream::exchange_marked(upstream, mark, up, deadline).await?,
            };
            self.metrics.observe_upstream(kind, started.elapsed());
            if own_token && parts.status == StatusCode::UNAUTHORIZED && attempt == 0 {
                // IMDS no longer knows the proxy's token (it restarted).
                self.upstream_token.forget();
                continue;
            }
            let mut out = HeaderMap::new();
            let passed: &[HeaderName] = if own_token {
                &RESPONSE_HEADERS[..RESPONSE_HEADERS.len() - 1]
            } else {
                &RESPONSE_HEADERS
            };
            copy_headers(&parts.headers, &mut out, passed);
            return Ok(Answer {
                status: parts.status,
                headers: out,
                body,
            });
        }
        Err("IMDS refused the proxy's token twice".into())
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

/// IMDS's own error answer (its XHTML page) for `status`.
fn imds_error(status: StatusCode, decision: &'static str, rule: &str, path: String) -> Outcome {
    let title = format!(
        "{} - {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error")
    );
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"iso-8859-1\"?>\n\
         <!DOCTYPE html PUBLIC \"-//W3C//DTD XHTML 1.0 Transitional//EN\"\n\
         \x20        \"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd\">\n\
         <html xmlns=\"http://www.w3.org/1999/xhtml\" xml:lang=\"en\" lang=\"en\">\n\
         \x20<head>\n\
         \x20 <title>{title}</title>\n\
         \x20</head>\n\
         \x20<body>\n\
         \x20 <h1>{title}</h1>\n\
         \x20</body>\n\
         </html>\n"
    );
    let resp = Response::builder()
        .status(status)
        .header("content-type", "text/html")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default();
    Outcome {
        resp,
        decision,
        rule: rule.to_string(),
        path,
        upstream: None,
        access_key_id: None,
        cache: None,
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
