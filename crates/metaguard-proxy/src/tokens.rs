//! IMDSv2 session tokens, issued by the proxy and bound to their caller.
//!
//! Through a pass-through proxy an IMDSv2 token is a bearer token: one
//! that leaks out of a container works from every other. The proxy
//! therefore answers `PUT /latest/api/token` itself ([`Tokens::issue`])
//! and accepts a token only from the caller it was issued to
//! ([`Tokens::check`]): the same workload and the same container (or,
//! for a caller in no known container, the same namespace or host
//! workload — [`binding`]). Anyone else gets IMDS's own answer to an
//! invalid token, `401`. Upstream, the proxy uses a token of its own
//! ([`UpstreamToken`]), obtained and refreshed before it expires; a
//! caller's token never leaves the proxy.
//!
//! The TTL rules are IMDS's: `X-aws-ec2-metadata-token-ttl-seconds`
//! between 1 and 21,600 in decimal digits (else `400`), echoed in the
//! answer; a `PUT` with `X-Forwarded-For` is refused (`403`, F16).
//!
//! Memory is bounded: at most [`PER_CALLER`] live tokens per caller (a
//! new one replaces that caller's oldest) and [`CALLERS`] callers (a new
//! caller first makes room by dropping expired tokens, then the caller
//! whose newest token is oldest). Tokens are 32 bytes from the kernel's
//! random source (`getrandom`), hex-encoded, and compared in constant
//! time.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::HeaderValue;
use hyper::Request;

use crate::Caller;

/// The only path that issues tokens.
pub const TOKEN_PATH: &str = "/latest/api/token";
/// The TTL header of a token `PUT` and of the answers to IMDSv2 requests.
pub const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
/// The header carrying a token on IMDSv2 requests.
pub const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
/// The longest token lifetime IMDS grants (six hours).
pub const MAX_TTL_SECS: u64 = 21_600;
/// Live tokens kept per caller.
pub const PER_CALLER: usize = 64;
/// Callers with live tokens kept.
pub const CALLERS: usize = 4096;

/// Who a token belongs to: the workload's name and, for a bridge caller,
/// the host's port its namespace is plugged into; for a host caller, its
/// container, else its origin without the client's address and port (a
/// host workload's mark).
///
/// A bridge caller is bound to its port, not to the container found
/// behind it: all containers in one namespace are one caller, and which of
/// them is found can change between a token's `PUT` and its use (an awsvpc
/// task's application container is listed after its pause container, and
/// a caller is found again whenever Docker reports a change). The port is
/// the namespace's own link, which no other namespace is given while the
/// token lives.
///
/// Built by appending (no `core::fmt`): it is made for every IMDSv2
/// request.
pub fn binding(workload: &str, caller: &Caller) -> String {
    let mut itoa = itoa::Buffer::new();
    let (kind, what) = match (caller.port, &caller.container) {
        (Some(ifindex), _) => ("port ", itoa.format(ifindex)),
        (None, Some(c)) => ("container ", c.as_str()),
        (None, None) => (
            "",
            caller
                .origin
                .rsplit_once(" from ")
                .map_or(caller.origin.as_str(), |(o, _)| o),
        ),
    };
    let mut b = String::with_capacity(workload.len() + 1 + kind.len() + what.len());
    b.push_str(workload);
    b.push('\0');
    b.push_str(kind);
    b.push_str(what);
    b
}

/// A TTL as IMDS accepts it: 1 – 21,600 in decimal digits; anything else
/// (absent, empty, signed, spaced, overflowing) is `None`.
pub fn parse_ttl(value: Option<&HeaderValue>) -> Option<u64> {
    let bytes = value?.as_bytes();
    if bytes.is_empty() || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let ttl: u64 = std::str::from_utf8(bytes).ok()?.parse().ok()?;
    (1..=MAX_TTL_SECS).contains(&ttl).then_some(ttl)
}

/// Why a token could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read the kernel's random source for a token: {0}")]
    Random(String),
}

#[derive(Debug)]
struct Issued {
    token: [u8; 32],
    expires: Instant,
}

/// The tokens the proxy issued, by caller.
#[derive(Debug, Default)]
pub struct Tokens {
    by_caller: Mutex<HashMap<String, VecDeque<Issued>>>,
}

impl Tokens {
    /// A new token for `binding`, valid for `ttl` seconds: its text.
    pub fn issue(&self, binding: &str, ttl: u64) -> Result<String, TokenError> {
        self.issue_at(binding, ttl, Instant::now())
    }

    fn issue_at(&self, binding: &str, ttl: u64, now: Instant) -> Result<String, TokenError> {
        let mut token = [0u8; 32];
        getrandom::fill(&mut token).map_err(|e| TokenError::Random(e.to_string()))?;
        let expires = now + Duration::from_secs(ttl);
        let mut map = self.by_caller.lock().unwrap_or_else(|p| p.into_inner());
        if !map.contains_key(binding) && map.len() >= CALLERS {
            make_room(&mut map, now);
        }
        let list = map.entry(binding.to_string()).or_default();
        list.retain(|t| t.expires > now);
        while list.len() >= PER_CALLER {
            list.pop_front();
        }
        list.push_back(Issued { token, expires });
        Ok(hex(&token))
    }

    /// The seconds left on `token` when `binding` presents it (rounded
    /// up, as IMDS echoes them), or `None`: not issued to this caller,
    /// expired, or not a token of ours.
    pub fn check(&self, binding: &str, token: &[u8]) -> Option<u64> {
        self.check_at(binding, token, Instant::now())
    }

    fn check_at(&self, binding: &str, token: &[u8], now: Instant) -> Option<u64> {
        let wanted = unhex(token)?;
        let map = self.by_caller.lock().unwrap_or_else(|p| p.into_inner());
        let list = map.get(binding)?;
        // Every token of the caller is compared whole (no early exit on
        // the first differing byte), so timing tells nothing about them.
        let mut found = None;
        for t in list {
            let diff = t
                .token
                .iter()
                .zip(&wanted)
                .fold(0u8, |d, (a, b)| d | (a ^ b));
            if diff == 0 && t.expires > now {
                found = Some(t.expires - now);
            }
        }
        found.map(|left| left.as_secs() + u64::from(left.subsec_nanos() > 0))
    }

    /// How many tokens are held (live or not yet pruned).
    pub fn count(&self) -> usize {
        let map = self.by_caller.lock().unwrap_or_else(|p| p.into_inner());
        map.values().map(VecDeque::len).sum()
    }
}

/// Drops expired tokens, and callers left without any; when none went,
/// the caller whose newest token expires first.
fn make_room(map: &mut HashMap<String, VecDeque<Issued>>, now: Instant) {
    map.retain(|_, list| {
        list.retain(|t| t.expires > now);
        !list.is_empty()
    });
    if map.len() < CALLERS {
        return;
    }
    let oldest = map
        .iter()
        .min_by_key(|(_, list)| list.back().map(|t| t.expires))
        .map(|(k, _)| k.clone());
    if let Some(k) = oldest {
        map.remove(&k);
    }
}

fn hex(bytes: &[u8; 32]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(64);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    s
}

fn unhex(text: &[u8]) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, pair) in text.chunks_exact(2).enumerate() {
        out[i] = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Some(out)
}

/// The proxy's own IMDS token: asked for with the longest TTL, renewed
/// when a quarter of it is left, or at once after IMDS refused it.
/// Concurrent requests that find it missing wait for one `PUT`.
#[derive(Debug, Default)]
pub struct UpstreamToken {
    held: Mutex<Option<Held>>,
    /// Held while a `PUT` is under way (single flight).
    renewing: tokio::sync::Mutex<()>,
}

#[derive(Debug, Clone)]
struct Held {
    upstream: SocketAddr,
    /// `None`: IMDS gave no token (it does not do IMDSv2); requests go
    /// without one until the next renewal.
    token: Option<HeaderValue>,
    renew_at: Instant,
}

/// What asking IMDS for a token gave.
#[derive(Debug)]
pub enum Obtained {
    /// A token, and how long it lives.
    Token(HeaderValue, Duration),
    /// IMDS answered, without a token (an instance without IMDSv2).
    NoToken,
}

impl UpstreamToken {
    fn current(&self, upstream: SocketAddr, now: Instant) -> Option<Option<HeaderValue>> {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.as_ref()
            .filter(|h| h.upstream == upstream && h.renew_at > now)
            .map(|h| h.token.clone())
    }

    /// The token to send to `upstream`, obtained with `put` when there is
    /// none or it is due for renewal. `Err`: IMDS could not be asked.
    pub async fn get<F, Fut>(
        &self,
        upstream: SocketAddr,
        put: F,
    ) -> Result<Option<HeaderValue>, String>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Obtained, String>>,
    {
        if let Some(t) = self.current(upstream, Instant::now()) {
            return Ok(t);
        }
        let _one = self.renewing.lock().await;
        if let Some(t) = self.current(upstream, Instant::now()) {
            return Ok(t); // another request renewed it meanwhile
        }
        let now = Instant::now();
        let (token, renew_at) = match put().await? {
            Obtained::Token(v, ttl) => (Some(v), now + ttl.mul_f64(0.75)),
            // Ask again in a minute: the instance's options may change.
            Obtained::NoToken => (None, now + Duration::from_secs(60)),
        };
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        *held = Some(Held {
            upstream,
            token: token.clone(),
            renew_at,
        });
        Ok(token)
    }

    /// Forgets the token (IMDS answered `401` to it: it restarted, or the
    /// token was revoked).
    pub fn forget(&self) {
        *self.held.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// The proxy's token `PUT` to IMDS at `upstream` (`host` its `Host`).
pub async fn put_request(
    upstream: SocketAddr,
    host: &HeaderValue,
    deadline: tokio::time::Instant,
) -> Result<Obtained, String> {
    let req = Request::put(TOKEN_PATH)
        .header(hyper::header::HOST, host)
        .header(TTL_HEADER, MAX_TTL_SECS)
        .header(hyper::header::CONTENT_LENGTH, 0)
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let (parts, body) = crate::upstream::exchange(upstream, req, deadline).await?;
    if parts.status.is_server_error() {
        return Err(format!("IMDS answered the token PUT with {}", parts.status));
    }
    if !parts.status.is_success() {
        return Ok(Obtained::NoToken);
    }
    let ttl = parse_ttl(parts.headers.get(TTL_HEADER)).unwrap_or(MAX_TTL_SECS);
    let token = HeaderValue::from_maybe_shared(body)
        .map_err(|_| "IMDS answered the token PUT with an unusable token".to_string())?;
    Ok(Obtained::Token(token, Duration::from_secs(ttl)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(container: Option<&str>, origin: &str) -> Caller {
        Caller {
            workload: Some(0),
            container: container.map(str::to_string),
            origin: origin.into(),
            ..Caller::default()
        }
    }

    /// The three forms of a binding, exactly: a bridge caller's port, a
    /// host caller's container, else its origin without the client.
    #[test]
    fn a_binding_names_the_port_else_the_container_else_the_origin() {
        let port = Caller {
            port: Some(4321),
            ..caller(Some("c1"), "port veth1 on docker0")
        };
        assert_eq!(binding("w", &port), "w\0port 4321");
        assert_eq!(
            binding("w", &caller(Some("c1"), "cgroup /x from 10.0.0.1:5")),
            "w\0container c1"
        );
        assert_eq!(
            binding("h", &caller(None, "mark 0x2 from 10.0.0.1:5")),
            "h\0mark 0x2"
        );
        assert_eq!(binding("h", &caller(None, "mark 0x2")), "h\0mark 0x2");
    }

    #[test]
    fn a_token_is_valid_only_for_its_caller_and_lifetime() {
        let t = Tokens::default();
        let now = Instant::now();
        let c1 = binding("w", &caller(Some("c1"), "port veth1 on docker0"));
        let c2 = binding("w", &caller(Some("c2"), "port veth2 on docker0"));
        let tok = t.issue_at(&c1, 10, now).expect("token");
        assert_eq!(tok.len(), 64);
        assert_eq!(t.check_at(&c1, tok.as_bytes(), now), Some(10));
        assert_eq!(
            t.check_at(&c1, tok.as_bytes(), now + Duration::from_millis(9_500)),
            Some(1),
            "rounded up, as IMDS echoes it"
        );
        assert_eq!(t.check_at(&c2, tok.as_bytes(), now), None, "another caller");
        let other_workload = binding("v", &caller(Some("c1"), "port veth1 on docker0"));
        assert_eq!(t.check_at(&other_workload, tok.as_bytes(), now), None);
        assert_eq!(
            t.check_at(&c1, tok.as_bytes(), now + Duration::from_secs(10)),
            None,
            "expired"
        );
        assert_eq!(t.check_at(&c1, b"not a token", now), None);
        assert_eq!(t.check_at(&c1, tok.to_uppercase().as_bytes(), now), None);
        assert_ne!(t.issue_at(&c1, 10, now).expect("token"), tok, "random");
    }

    #[test]
    fn a_host_caller_is_bound_without_its_client_port() {
        let a = caller(
            None,
            "host process of workload \"h\" (mark 0x6e000001) from 10.0.0.1:4000",
        );
        let b = caller(
            None,
            "host process of workload \"h\" (mark 0x6e000001) from 10.0.0.1:4001",
        );
        assert_eq!(binding("h", &a), binding("h", &b));
        let ns = caller(None, "port veth1 on docker0, netns /run/netns/x");
        let other = caller(None, "port veth2 on docker0, netns /run/netns/y");
        assert_ne!(binding("w", &ns), binding("w", &other));
    }

    #[test]
    fn a_bridge_caller_is_bound_to_its_port_whichever_of_its_containers_is_found() {
        let t = Tokens::default();
        let now = Instant::now();
        let on_port = |container: &str, ifindex: u32| Caller {
            port: Some(ifindex),
            ..caller(Some(container), "port veth7 on ecs-bridge")
        };
        // Issued while only the task's pause container was listed, used
        // once its application container is.
        let tok = t
            .issue_at(&binding("tasks", &on_port("pause", 7)), 60, now)
            .expect("token");
        let app = binding("tasks", &on_port("app", 7));
        assert_eq!(t.check_at(&app, tok.as_bytes(), now), Some(60));
        let other_port = binding("tasks", &on_port("app", 8));
        assert_eq!(
            t.check_at(&other_port, tok.as_bytes(), now),
            None,
            "another namespace"
        );
        let other_workload = binding("bridges", &on_port("app", 7));
        assert_eq!(t.check_at(&other_workload, tok.as_bytes(), now), None);
    }

    #[test]
    fn memory_is_bounded_per_caller_and_overall() {
        let t = Tokens::default();
        let now = Instant::now();
        let first = t.issue_at("c", 100, now).expect("token");
        for _ in 0..PER_CALLER {
            t.issue_at("c", 100, now).expect("token");
        }
        assert_eq!(t.count(), PER_CALLER);
        assert_eq!(
            t.check_at("c", first.as_bytes(), now),
            None,
            "the oldest went"
        );
        for i in 0..CALLERS + 10 {
            t.issue_at(&format!("k{i}"), 100, now).expect("token");
        }
        let callers = t.by_caller.lock().expect("lock").len();
        assert!(callers <= CALLERS, "{callers}");
    }

    #[test]
    fn ttls_are_checked_as_imds_checks_them() {
        let v = |s: &str| HeaderValue::from_str(s).expect("header");
        for ok in ["1", "21600", "300", "00021", "0000060"] {
            assert!(parse_ttl(Some(&v(ok))).is_some(), "{ok}");
        }
        for bad in [
            "",
            "0",
            "21601",
            "-1",
            "+5",
            " 5",
            "5 ",
            "1e3",
            "99999999999999999999",
        ] {
            assert_eq!(parse_ttl(Some(&v(bad))), None, "{bad:?}");
        }
        assert_eq!(parse_ttl(None), None);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_upstream_token_is_asked_for_once_and_renewed() {
        let up = UpstreamToken::default();
        let addr: SocketAddr = "127.0.0.1:80".parse().expect("address");
        let puts = std::sync::atomic::AtomicUsize::new(0);
        let put = || async {
            puts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(Obtained::Token(
                HeaderValue::from_static("up"),
                Duration::from_secs(3600),
            ))
        };
        for _ in 0..3 {
            assert_eq!(
                up.get(addr, put).await.expect("token"),
                Some(HeaderValue::from_static("up"))
            );
        }
        assert_eq!(puts.load(std::sync::atomic::Ordering::SeqCst), 1);
        up.forget();
        up.get(addr, put).await.expect("token");
        assert_eq!(puts.load(std::sync::atomic::Ordering::SeqCst), 2);
        let fail = || async { Err::<Obtained, _>("down".to_string()) };
        up.forget();
        assert!(up.get(addr, fail).await.is_err());
    }
}
