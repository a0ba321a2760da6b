//! An emulator of the EC2 instance metadata service (IMDS), faithful to the
//! wire behaviour metaguard has to reason about: IMDSv2 session tokens, the
//! `X-Forwarded-For` rejection, the `Optional`/`Required` token modes, the
//! status codes and the bodies real clients parse.
//!
//! Every request is logged — rejected ones too — with its source address
//! and status, *before* the response is sent, so a test can prove that a
//! request did or did not reach "IMDS".
//!
//! It owns no socket: [`ImdsEmulator::serve`] runs on a listener the caller
//! bound (in the lab, on 169.254.169.254:80 inside the VPC namespace; in
//! tests, on 127.0.0.1:0). It never contacts anything.
//!
//! # Sources for the behaviour
//!
//! - AWS EC2 User Guide, "Use IMDSv2" (`configuring-instance-metadata-service`,
//!   awsdocs/amazon-ec2-user-guide): TTL 1 s – 21 600 s; "HTTP `GET` and
//!   `HEAD` methods are allowed"; "`PUT` requests are rejected if they
//!   contain an X-Forwarded-For header"; with tokens required, "requests
//!   without a valid token or with an expired token receive a
//!   `401 - Unauthorized`"; IMDS tells v1 from v2 requests by whether the
//!   v2 headers are present.
//! - Same guide, "Retrieve instance metadata" (`instancedata-data-retrieval`):
//!   `400` for an invalid `PUT`, `401` "The `GET` request uses an invalid
//!   token" (stated for IMDSv2 requests without regard to the mode, hence
//!   401 for a bad token in `Optional` mode too), `403` for a `PUT` to a
//!   version-specific token path, `404` for unknown resources, listings one
//!   item a line, everything `text/plain`, and the list of versions at `/`.
//! - The real `404` page, quoted in Netflix/ndbench#47; a real `403` for
//!   `PUT /latest/api/token/` (empty body, `text/plain`, `Server: EC2ws`),
//!   quoted in aws-beam/aws_credentials#47; a real
//!   `405 Not Allowed` + `Allow: OPTIONS, PUT` for `GET /latest/api/token`,
//!   quoted in a comment of the aws-mock-metadata emulators
//!   (jtblin/aws-mock-metadata lineage); the directory redirect
//!   (`…/security-credentials` → `…/security-credentials/`) noted in
//!   Netflix/titus-executor#6; response headers (`Accept-Ranges: none`,
//!   `Last-Modified`, `Connection: close`, the TTL header echoed on v2 GETs)
//!   from `curl -v` captures in public write-ups.
//! - The credential and instance-identity documents' fields and layout
//!   (`"Key" : value`, two-space indent) from the same captures and the
//!   guide's examples; botocore's `InstanceMetadataFetcher` is the client
//!   the integration tests drive against it.
//!
//! - `HttpPutResponseHopLimit` (EC2 User Guide, "Instance metadata access
//!   considerations", and `ModifyInstanceMetadataOptions`): "the desired
//!   HTTP PUT response hop limit" — IMDS sends its answers to `PUT`s with
//!   that IP TTL / IPv6 hop limit (1 by default on many AMIs; 2 on Amazon
//!   Linux 2023), so from a bridge-mode container, one router hop behind
//!   the host, a limit of 1 lets the token request through and drops the
//!   token on the way back (F9). The emulator sets the same limit on the
//!   connection's socket before it answers a `PUT`
//!   ([`ImdsSettings::put_response_hop_limit`], switchable with
//!   [`ImdsEmulator::set_put_response_hop_limit`]); `GET` answers keep the
//!   namespace's default (64), as IMDSv1 from containers keeps working on
//!   such instances.
//!
//! Deliberate differences: the redirect's `Location` is relative (the real
//! one names `http://169.254.169.254`, which a test client following it
//! must never be sent to); there is no user data and no throttling.

mod tree;

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use hyper::header::{HeaderMap, HeaderName, HeaderValue, ALLOW, LOCATION};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::Value;
use tokio::net::TcpListener;

use crate::http::{self, Body};
use crate::log::RequestLog;
// What the tests (`use super::*`) name besides this module's own items.
#[cfg(test)]
use self::tree::{aws_json, fields};
#[cfg(test)]
use serde_json::json;

/// The only path that issues tokens.
pub const TOKEN_PATH: &str = "/latest/api/token";
/// Request header carrying the wanted token lifetime (on `PUT`), echoed on
/// the response.
pub const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
/// Request header carrying a session token (on `GET`/`HEAD`).
pub const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
/// The longest token lifetime IMDS grants, in seconds (six hours).
pub const MAX_TOKEN_TTL_SECS: u64 = 21_600;

/// The metadata versions IMDS lists at `/` (from the EC2 User Guide).
const VERSIONS: &[&str] = &[
    "1.0",
    "2007-01-19",
    "2007-03-01",
    "2007-08-29",
    "2007-10-10",
    "2007-12-15",
    "2008-02-01",
    "2008-09-01",
    "2009-04-04",
    "2011-01-01",
    "2011-05-01",
    "2012-01-12",
    "2014-02-25",
    "2014-11-05",
    "2015-10-20",
    "2016-04-19",
    "2016-06-30",
    "2016-09-02",
    "2018-03-28",
    "2018-08-17",
    "2018-09-24",
    "2019-10-01",
    "2020-10-27",
    "2021-01-03",
    "2021-03-23",
    "latest",
];

/// Whether IMDSv1 (token-less) requests are answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenMode {
    /// `HttpTokens=optional`: IMDSv1 and IMDSv2 both work.
    Optional,
    /// `HttpTokens=required`: only requests with a valid token work.
    Required,
}

/// What the emulated instance looks like.
#[derive(Clone, Debug)]
pub struct ImdsSettings {
    /// The token mode at start (switchable later).
    pub tokens: TokenMode,
    /// `i-…`
    pub instance_id: String,
    /// e.g. `m5.large`.
    pub instance_type: String,
    /// `ami-…`
    pub ami_id: String,
    /// e.g. `us-east-1`.
    pub region: String,
    /// e.g. `us-east-1a`.
    pub availability_zone: String,
    /// The instance's primary private IPv4 address (served, never used).
    pub local_ipv4: String,
    /// The primary interface's MAC address.
    pub mac: String,
    /// The 12-digit account id.
    pub account_id: String,
    /// The instance profile's role name, or none for an instance without one.
    pub role: Option<String>,
    /// `HttpPutResponseHopLimit` (1–64): the IP TTL / IPv6 hop limit of the
    /// answers to `PUT`s, i.e. how many hops an IMDSv2 token survives. The
    /// default is 2 (Amazon Linux 2023's, with which bridge containers one
    /// hop behind the host get tokens, as the lab's tests without a proxy
    /// expect); 1 reproduces F9.
    pub put_response_hop_limit: u8,
}

/// `HttpPutResponseHopLimit` on Amazon Linux 2023 (IMDSv2 usable from
/// bridge containers); many older AMIs have 1.
pub const DEFAULT_PUT_RESPONSE_HOP_LIMIT: u8 = 2;

impl Default for ImdsSettings {
    fn default() -> Self {
        ImdsSettings {
            tokens: TokenMode::Optional,
            instance_id: "i-0123456789abcdef0".to_string(),
            instance_type: "m5.large".to_string(),
            ami_id: "ami-0abcdef1234567890".to_string(),
            region: "us-east-1".to_string(),
            availability_zone: "us-east-1a".to_string(),
            local_ipv4: "10.0.0.10".to_string(),
            mac: "0e:49:61:0f:c3:11".to_string(),
            account_id: "111122223333".to_string(),
            role: Some("lab-instance-role".to_string()),
            put_response_hop_limit: DEFAULT_PUT_RESPONSE_HOP_LIMIT,
        }
    }
}

/// The IMDS emulator. Clones share state (tokens, mode, log).
#[derive(Clone, Debug)]
pub struct ImdsEmulator {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    settings: ImdsSettings,
    required: AtomicBool,
    /// The hop limit of `PUT` answers now.
    put_hop_limit: AtomicU8,
    /// token → the instant it expires.
    tokens: Mutex<HashMap<String, Instant>>,
    token_counter: AtomicU64,
    log: RequestLog,
    /// When the emulated instance "launched": `pendingTime`, `LastUpdated`,
    /// `Last-Modified`.
    started: SystemTime,
    /// The role's credentials now (re-minted when short-lived ones are
    /// due; see [`ImdsEmulator::set_credentials_lifetime`]).
    credentials: Mutex<Option<RoleCredentials>>,
    /// `None`: the credentials minted at start expire in six hours.
    lifetime: Mutex<Option<Duration>>,
}

#[derive(Debug, Clone)]
struct RoleCredentials {
    role: String,
    access_key_id: String,
    secret_access_key: String,
    token: String,
    expiration: String,
    /// `expiration`, as a time (whole seconds).
    expires: SystemTime,
    /// How many times they were re-minted.
    generation: u64,
}

/// Credentials for `role` of the instance `seed` names, expiring at
/// `expires` (cut to whole seconds, as `Expiration` shows it); keys
/// differ per `generation`.
fn mint(seed: &str, role: &str, expires: SystemTime, generation: u64) -> RoleCredentials {
    let secs = expires
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let expires = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
    let seed = if generation == 0 {
        format!("{seed}/{role}")
    } else {
        format!("{seed}/{role}/{generation}")
    };
    RoleCredentials {
        role: role.to_string(),
        access_key_id: format!(
            "ASIA{}",
            http::fake_chars(&format!("{seed}/akid"), http::KEY_ID_ALPHABET, 16)
        ),
        secret_access_key: http::fake_chars(&format!("{seed}/secret"), http::SECRET_ALPHABET, 40),
        token: format!(
            "IQoJb3JpZ2luX2VjE{}",
            http::fake_chars(&format!("{seed}/token"), http::SECRET_ALPHABET, 300)
        ),
        expiration: http::rfc3339(expires),
        expires,
        generation,
    }
}

/// How a metadata request authenticated.
enum Auth {
    /// No token header, tokens optional.
    V1,
    /// A valid token with this many seconds left.
    V2(u64),
    /// Missing (in `Required` mode), unknown or expired token.
    Denied,
}

/// Where a metadata path leads.
enum Node {
    Dir(Vec<(String, Node)>),
    Leaf(String),
}

enum Routed {
    Body(String),
    Redirect(String),
    NotFound,
}

impl ImdsEmulator {
    /// An emulator for the instance `settings` describes.
    pub fn new(settings: ImdsSettings) -> Self {
        let started = SystemTime::now();
        let credentials = settings.role.as_ref().map(|role| {
            mint(
                &settings.instance_id,
                role,
                started + Duration::from_secs(6 * 3600),
                0,
            )
        });
        ImdsEmulator {
            inner: Arc::new(Inner {
                required: AtomicBool::new(settings.tokens == TokenMode::Required),
                put_hop_limit: AtomicU8::new(settings.put_response_hop_limit),
                settings,
                tokens: Mutex::new(HashMap::new()),
                token_counter: AtomicU64::new(0),
                log: RequestLog::default(),
                started,
                credentials: Mutex::new(credentials),
                lifetime: Mutex::new(None),
            }),
        }
    }

    /// The instance this emulator describes.
    pub fn settings(&self) -> &ImdsSettings {
        &self.inner.settings
    }

    /// The log of every request answered (shared, not a snapshot).
    pub fn log(&self) -> RequestLog {
        self.inner.log.clone()
    }

    /// Switches between IMDSv1+v2 and v2-only, effective for the next
    /// request. Issued tokens stay valid.
    pub fn set_token_mode(&self, mode: TokenMode) {
        self.inner
            .required
            .store(mode == TokenMode::Required, Ordering::SeqCst);
    }

    /// The current token mode.
    pub fn token_mode(&self) -> TokenMode {
        if self.inner.required.load(Ordering::SeqCst) {
            TokenMode::Required
        } else {
            TokenMode::Optional
        }
    }

    /// Changes `HttpPutResponseHopLimit` (as `ModifyInstanceMetadataOptions`
    /// does), effective for the next `PUT`.
    pub fn set_put_response_hop_limit(&self, hops: u8) {
        self.inner.put_hop_limit.store(hops, Ordering::SeqCst);
    }

    /// The hop limit of `PUT` answers now.
    pub fn put_response_hop_limit(&self) -> u8 {
        self.inner.put_hop_limit.load(Ordering::SeqCst)
    }

    /// The JSON document `/latest/meta-data/iam/security-credentials/<role>`
    /// serves, or none when the instance has no role.
    pub fn role_credentials(&self) -> Option<Value> {
        self.current_credentials()
            .as_ref()
            .map(|c| Value::Object(self.credentials_fields(c).into_iter().collect()))
    }

    /// Makes the role's credentials short-lived: from now on they expire
    /// `lifetime` after they are minted, and new ones are minted once half
    /// of that is left (EC2 publishes new role credentials ahead of the
    /// old ones' expiry, at least 5 minutes ahead; here half the lifetime,
    /// so a test sees several generations in seconds).
    pub fn set_credentials_lifetime(&self, lifetime: Duration) {
        *self
            .inner
            .lifetime
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(lifetime);
        let mut c = self
            .inner
            .credentials
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(old) = c.as_ref() {
            let next = mint(
                &self.inner.settings.instance_id,
                &old.role,
                SystemTime::now() + lifetime,
                old.generation + 1,
            );
            *c = Some(next);
        }
    }

    /// The role's credentials now, minted anew when short-lived ones are
    /// due.
    fn current_credentials(&self) -> Option<RoleCredentials> {
        let lifetime = *self
            .inner
            .lifetime
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut c = self
            .inner
            .credentials
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let now = SystemTime::now();
        if let (Some(l), Some(old)) = (lifetime, c.as_ref()) {
            let due = old.expires.checked_sub(l / 2).unwrap_or(old.expires);
            if now >= due {
                let next = mint(
                    &self.inner.settings.instance_id,
                    &old.role,
                    now + l,
                    old.generation + 1,
                );
                *c = Some(next);
            }
        }
        c.clone()
    }

    /// Serves IMDS on `listener` until the future is dropped, logging
    /// every request answered (see [`http::serve_logged`]).
    pub async fn serve(&self, listener: TcpListener) -> std::io::Result<()> {
        http::serve_logged(listener, self.clone(), self.inner.log.clone(), |me, req| {
            me.respond(req)
        })
        .await
    }

    fn respond<B>(&self, req: &Request<B>) -> Response<Body> {
        let resp = self.answer(req);
        if req.method() == Method::PUT {
            // Every answer to a PUT leaves with the instance's hop limit
            // (requests that came without a socket — unit tests — have
            // none to set).
            if let Some(socket) = req.extensions().get::<http::ConnSocket>() {
                if socket.set_hop_limit(self.put_response_hop_limit()).is_err() {
                    return finish(html_error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "500 - Internal Server Error",
                    ));
                }
            }
        }
        resp
    }

    fn answer<B>(&self, req: &Request<B>) -> Response<Body> {
        let path = req.uri().path();
        let method = req.method();
        if path == TOKEN_PATH {
            return match *method {
                Method::PUT => self.issue_token(req.headers()),
                Method::OPTIONS => finish(allow(http::text(StatusCode::OK, ""), "OPTIONS, PUT")),
                _ => {
                    let mut resp = allow(
                        http::text(StatusCode::METHOD_NOT_ALLOWED, ""),
                        "OPTIONS, PUT",
                    );
                    resp.extensions_mut()
                        .insert(hyper::ext::ReasonPhrase::from_static(b"Not Allowed"));
                    finish(resp)
                }
            };
        }
        if *method == Method::PUT {
            // Tokens come from /latest/api/token only; a PUT anywhere else
            // (a version path, a trailing slash) is forbidden.
            return forbidden();
        }
        if *method != Method::GET && *method != Method::HEAD {
            return finish(allow(
                html_error(StatusCode::METHOD_NOT_ALLOWED, "405 - Method Not Allowed"),
                "GET, HEAD",
            ));
        }
        let remaining = match self.authorize(req.headers()) {
            Auth::V1 => None,
            Auth::V2(secs) => Some(secs),
            Auth::Denied => {
                return finish(html_error(StatusCode::UNAUTHORIZED, "401 - Unauthorized"))
            }
        };
        match self.route(path) {
            Routed::Body(body) => {
                let mut resp = http::text(StatusCode::OK, body);
                let h = resp.headers_mut();
                h.insert("accept-ranges", HeaderValue::from_static("none"));
                if let Ok(v) = HeaderValue::from_str(&http::http_date(self.inner.started)) {
                    h.insert("last-modified", v);
                }
                if let Some(secs) = remaining {
                    h.insert(HeaderName::from_static(TTL_HEADER), HeaderValue::from(secs));
                }
                finish(resp)
            }
            Routed::Redirect(location) => match HeaderValue::from_str(&location) {
                Ok(v) => {
                    let mut resp =
                        html_error(StatusCode::MOVED_PERMANENTLY, "301 - Moved Permanently");
                    resp.headers_mut().insert(LOCATION, v);
                    finish(resp)
                }
                Err(_) => not_found(),
            },
            Routed::NotFound => not_found(),
        }
    }

    fn issue_token(&self, headers: &HeaderMap) -> Response<Body> {
        if headers.contains_key("x-forwarded-for") {
            return forbidden();
        }
        let Some(ttl) = parse_ttl(headers.get(TTL_HEADER)) else {
            return finish(html_error(StatusCode::BAD_REQUEST, "400 - Bad Request"));
        };
        let token = self.new_token();
        let now = Instant::now();
        {
            let mut tokens = self.tokens();
            tokens.retain(|_, expires| *expires > now);
            tokens.insert(token.clone(), now + Duration::from_secs(ttl));
        }
        let mut resp = http::text(StatusCode::OK, token);
        let h = resp.headers_mut();
        h.insert("accept-ranges", HeaderValue::from_static("none"));
        h.insert(HeaderName::from_static(TTL_HEADER), HeaderValue::from(ttl));
        finish(resp)
    }

    fn authorize(&self, headers: &HeaderMap) -> Auth {
        let Some(value) = headers.get(TOKEN_HEADER) else {
            return if self.token_mode() == TokenMode::Required {
                Auth::Denied
            } else {
                Auth::V1
            };
        };
        // A token header makes this an IMDSv2 request in either mode: it
        // must be valid.
        let Ok(token) = value.to_str() else {
            return Auth::Denied;
        };
        let now = Instant::now();
        let mut tokens = self.tokens();
        match tokens.get(token) {
            Some(expires) if *expires > now => {
                let left = *expires - now;
                Auth::V2(left.as_secs() + u64::from(left.subsec_nanos() > 0))
            }
            Some(_) => {
                tokens.remove(token);
                Auth::Denied
            }
            None => Auth::Denied,
        }
    }

    fn tokens(&self) -> MutexGuard<'_, HashMap<String, Instant>> {
        self.inner
            .tokens
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A fresh token shaped like the real ones: 40 bytes, URL-safe base64
    /// (`AQAEA…==`).
    fn new_token(&self) -> String {
        let counter = self.inner.token_counter.fetch_add(1, Ordering::Relaxed);
        let mut bytes = [0u8; 40];
        bytes[..4].copy_from_slice(&[1, 0, 4, 0]);
        for (i, chunk) in bytes[4..].chunks_mut(8).enumerate() {
            let mut h = RandomState::new().build_hasher();
            h.write_u64(counter);
            h.write_usize(i);
            h.write_u128(crate::log::now_unix_ms());
            let word = h.finish().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
        base64url(&bytes)
    }
}

/// A TTL is 1 – 21 600 written in decimal digits; anything else (absent,
/// empty, signed, non-ASCII, overflowing) is invalid.
fn parse_ttl(value: Option<&HeaderValue>) -> Option<u64> {
    let bytes = value?.as_bytes();
    if bytes.is_empty() || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let ttl: u64 = std::str::from_utf8(bytes).ok()?.parse().ok()?;
    (1..=MAX_TOKEN_TTL_SECS).contains(&ttl).then_some(ttl)
}

fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk.first().copied().unwrap_or(0),
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                let idx = (n >> (18 - 6 * i)) & 63;
                out.push(char::from(ALPHABET[idx as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Adds the headers every IMDS response carries.
fn finish(mut resp: Response<Body>) -> Response<Body> {
    let h = resp.headers_mut();
    h.insert("server", HeaderValue::from_static("EC2ws"));
    h.insert("connection", HeaderValue::from_static("close"));
    resp
}

fn allow(mut resp: Response<Body>, methods: &'static str) -> Response<Body> {
    resp.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(methods));
    resp
}

/// IMDS's `403`: empty `text/plain`.
fn forbidden() -> Response<Body> {
    finish(http::text(StatusCode::FORBIDDEN, ""))
}

fn not_found() -> Response<Body> {
    finish(html_error(StatusCode::NOT_FOUND, "404 - Not Found"))
}

/// IMDS's XHTML error page.
fn html_error(status: StatusCode, title: &str) -> Response<Body> {
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
    http::response(status, "text/html", body)
}

#[cfg(test)]
mod tests;
