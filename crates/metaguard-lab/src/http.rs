//! The small HTTP/1.1 server both emulators stand on, and the helpers they
//! share to build responses (bodies, timestamps, fake key material).
//!
//! [`serve`] is a plain hyper 1.x accept loop: one tokio task per
//! connection, connection errors ignored, running until its future is
//! dropped — which also aborts every connection it started. It needs only a
//! tokio runtime, so it works on the `current_thread` runtime a lab server
//! thread builds after entering its network namespace.
//!
//! This module binds nothing: the caller hands it a listener it bound where
//! it chose. It owns no emulator behaviour either; the handlers do.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd as _, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// The body type of every emulator response.
pub type Body = Full<Bytes>;

/// The socket a request arrived on, found in the request's extensions
/// (every request [`serve`] hands a handler carries one): a handler may set
/// options on it before its answer goes out — the IMDS emulator's hop limit
/// on `PUT` answers.
#[derive(Clone, Debug)]
pub struct ConnSocket {
    fd: Arc<OwnedFd>,
    local: SocketAddr,
}

impl ConnSocket {
    /// The IP TTL (IPv4) or unicast hop limit (IPv6) of every packet this
    /// connection sends from now on, as `HttpPutResponseHopLimit` sets it
    /// on IMDS's answers: each router on the way takes one off, and a
    /// packet that reaches 0 is dropped there.
    pub fn set_hop_limit(&self, hops: u8) -> io::Result<()> {
        match self.local {
            SocketAddr::V4(_) => rustix::net::sockopt::set_ip_ttl(&*self.fd, u32::from(hops)),
            SocketAddr::V6(_) => rustix::net::sockopt::set_ipv6_unicast_hops(&*self.fd, Some(hops)),
        }
        .map_err(io::Error::from)
    }
}

/// Answers one request. Implemented for every
/// `Fn(peer, local, request) -> impl Future<Output = Response<Body>>`
/// closure that is `Send + Sync + 'static`.
pub trait Handler: Send + Sync + 'static {
    /// Builds the response to `req`, which arrived from `peer` on the
    /// server's address `local`.
    fn handle(
        &self,
        peer: SocketAddr,
        local: SocketAddr,
        req: Request<Incoming>,
    ) -> impl Future<Output = Response<Body>> + Send;
}

impl<F, Fut> Handler for F
where
    F: Fn(SocketAddr, SocketAddr, Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send,
{
    fn handle(
        &self,
        peer: SocketAddr,
        local: SocketAddr,
        req: Request<Incoming>,
    ) -> impl Future<Output = Response<Body>> + Send {
        self(peer, local, req)
    }
}

/// Serves HTTP/1.1 on `listener` with `handler` until the returned future is
/// dropped; dropping it also aborts the connections it accepted.
///
/// A failed connection (reset, malformed request, timeout) is dropped and
/// the loop goes on. A failed `accept` is retried after a short pause
/// (file-descriptor exhaustion passes); the error is returned only when the
/// listener itself has become unusable.
pub async fn serve<S: Handler>(listener: TcpListener, handler: S) -> io::Result<()> {
    let handler = Arc::new(handler);
    let mut connections = JoinSet::new();
    loop {
        // Reap finished connections so the set does not grow without bound.
        while connections.try_join_next().is_some() {}
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                if listener.local_addr().is_err() {
                    return Err(e);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Ok(local) = stream.local_addr() else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        // A second descriptor of the connection's socket, for handlers
        // that set options on it (the stream itself goes to hyper).
        let Ok(fd) = stream.as_fd().try_clone_to_owned() else {
            continue;
        };
        let socket = ConnSocket {
            fd: Arc::new(fd),
            local,
        };
        let handler = Arc::clone(&handler);
        connections.spawn(async move {
            let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(socket.clone());
                let handler = Arc::clone(&handler);
                async move { Ok::<_, Infallible>(handler.handle(peer, local, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                // Header names go out as `Content-Type`, like EC2ws and Go's
                // net/http write them, for clients that compare them exactly.
                .title_case_headers(true)
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Serves an emulator on `listener` until the future is dropped (see
/// [`serve`]): `respond` answers each request, and every answered request
/// is pushed to `log` (with its status) before the response goes out.
pub async fn serve_logged<E, R>(
    listener: TcpListener,
    emulator: E,
    log: crate::log::RequestLog,
    respond: R,
) -> io::Result<()>
where
    E: Send + Sync + 'static,
    R: Fn(&E, &Request<Incoming>) -> Response<Body> + Send + Sync + 'static,
{
    let shared = Arc::new((emulator, log, respond));
    serve(listener, move |peer, local, req| {
        let shared = Arc::clone(&shared);
        async move {
            let (emulator, log, respond) = &*shared;
            let resp = respond(emulator, &req);
            log.push(crate::log::LoggedRequest::from_request(
                peer,
                local,
                &req,
                resp.status().as_u16(),
            ));
            resp
        }
    })
    .await
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}

/// A response with `status`, a `Content-Type` and `body`.
pub fn response(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// A `text/plain` response.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    response(status, "text/plain", body)
}

/// An `application/json` response.
pub fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    response(status, "application/json", body)
}

/// `t` as an RFC 3339 UTC timestamp with second precision, the form AWS
/// uses in credential documents: `2024-05-01T12:00:00Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let c = Civil::from(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        c.year, c.month, c.day, c.hour, c.minute, c.second
    )
}

/// `t` as an HTTP date (RFC 9110 IMF-fixdate): `Sun, 13 Feb 2022 13:17:17 GMT`.
pub fn http_date(t: SystemTime) -> String {
    const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let c = Civil::from(t);
    let day = DAYS.get(c.weekday as usize).copied().unwrap_or("Thu");
    let month = MONTHS
        .get((c.month as usize).saturating_sub(1))
        .copied()
        .unwrap_or("Jan");
    format!(
        "{day}, {:02} {month} {:04} {:02}:{:02}:{:02} GMT",
        c.day, c.year, c.hour, c.minute, c.second
    )
}

/// A UTC calendar time, from days-since-epoch arithmetic
/// (Howard Hinnant's `civil_from_days`).
struct Civil {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    /// 0 = Sunday.
    weekday: u32,
}

impl From<SystemTime> for Civil {
    fn from(t: SystemTime) -> Self {
        let secs = t
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let days = i64::try_from(secs / 86_400).unwrap_or(0);
        let rem = secs % 86_400;
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        Civil {
            year,
            month: u32::try_from(month).unwrap_or(1),
            day: u32::try_from(day).unwrap_or(1),
            hour: u32::try_from(rem / 3_600).unwrap_or(0),
            minute: u32::try_from(rem % 3_600 / 60).unwrap_or(0),
            second: u32::try_from(rem % 60).unwrap_or(0),
            weekday: u32::try_from((days + 4).rem_euclid(7)).unwrap_or(4),
        }
    }
}

/// Upper-case letters and digits, the alphabet of AWS key ids.
pub(crate) const KEY_ID_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
/// The alphabet of AWS secret keys.
pub(crate) const SECRET_ALPHABET: &[u8] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// `len` characters from `alphabet`, determined by `seed` alone: fake but
/// realistic-looking key material that tests can reproduce.
pub(crate) fn fake_chars(seed: &str, alphabet: &[u8], len: usize) -> String {
    // FNV-1a: stable across Rust releases, unlike `DefaultHasher`.
    let mut state = seed.bytes().fold(0xCBF2_9CE4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3)
    });
    let mut out = String::with_capacity(len);
    for _ in 0..len {
        // splitmix64
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let idx = usize::try_from(z % alphabet.len().max(1) as u64).unwrap_or(0);
        out.push(char::from(alphabet.get(idx).copied().unwrap_or(b'A')));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        let t = UNIX_EPOCH + Duration::from_secs(1_644_758_237); // 2022-02-13 13:17:17 UTC
        assert_eq!(rfc3339(t), "2022-02-13T13:17:17Z");
        assert_eq!(http_date(t), "Sun, 13 Feb 2022 13:17:17 GMT");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(http_date(UNIX_EPOCH), "Thu, 01 Jan 1970 00:00:00 GMT");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00Z");
        let before = UNIX_EPOCH - Duration::from_secs(10);
        assert_eq!(rfc3339(before), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn fake_chars_is_deterministic_and_in_alphabet() {
        let a = fake_chars("seed", KEY_ID_ALPHABET, 16);
        assert_eq!(a, fake_chars("seed", KEY_ID_ALPHABET, 16));
        assert_ne!(a, fake_chars("other", KEY_ID_ALPHABET, 16));
        assert_eq!(a.len(), 16);
        assert!(a.bytes().all(|b| KEY_ID_ALPHABET.contains(&b)));
    }
}
