//! One upstream exchange: a fresh connection, one request, the whole
//! answer — driven in the calling task.
//!
//! IMDS closes every connection after one answer (`Connection: close`),
//! so a pool holds nothing worth keeping; and the ECS agent's credentials
//! endpoint is asked rarely (SDKs cache credentials for hours). hyper's
//! low-level HTTP/1 connection is polled right here rather than spawned
//! as a task of its own and fed through a pool's channels: one task, no
//! cross-task wake-ups on the request path (measured: see BENCHMARKS.md,
//! "Metadata proxy").
//!
//! One deadline, one timer, bounds the whole exchange, connection
//! included: the runtime's timer wakes its own thread (an `eventfd` write
//! and one more event per request) whenever a timer is set earlier than
//! any it already holds, and a separate, shorter connect timeout was just
//! that, on every request.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::http::response::Parts;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Sends `req` to `addr` on a new connection and reads the whole answer,
/// all before `deadline` (one timer).
pub async fn exchange(
    addr: SocketAddr,
    req: Request<Full<Bytes>>,
    deadline: Instant,
) -> Result<(Parts, Bytes), String> {
    exchange_marked(addr, None, req, deadline).await
}

/// [`exchange`] over a socket with `SO_MARK` `mark`, when given: the
/// relay's connections to an agent in a container carry
/// `ruleset::RELAY_UPSTREAM_MARK`, the only traffic the host's rules let
/// through to the agent's credentials port.
pub async fn exchange_marked(
    addr: SocketAddr,
    mark: Option<u32>,
    req: Request<Full<Bytes>>,
    deadline: Instant,
) -> Result<(Parts, Bytes), String> {
    let mut connected = false;
    let result = tokio::time::timeout_at(deadline, send(addr, mark, req, &mut connected)).await;
    match result {
        Ok(r) => r,
        Err(_) if connected => Err(format!("{addr} did not answer in time")),
        Err(_) => Err(format!("connecting to {addr} timed out")),
    }
}

/// How long one marked connection attempt waits for its SYN-ACK before a
/// fresh attempt replaces it.
const MARKED_ATTEMPT: std::time::Duration = std::time::Duration::from_millis(100);

/// A socket for a connection to `addr`, marked `mark` when given (the SYN
/// carries it), in Linux's delayed-ACK mode (`TCP_QUICKACK` off before
/// `connect()`).
///
/// In that mode the ACK of the upstream's SYN-ACK waits for data to ride
/// on (at most 200 ms, the kernel's `TCP_DELACK_MAX`), and the request,
/// written microseconds later, carries it: the upstream takes the
/// connection with its request already in. And an answer that arrives
/// whole, with or just before the upstream's FIN, is not acknowledged
/// before the proxy's reset ends the connection. Measured at the lab's
/// emulator: 3 segments from the proxy per forwarded request (SYN, the
/// request, the reset) where there were 5 (and nginx `proxy_pass` sends
/// 5); 7 in all where there were 9. IMDS counts packets against the
/// link-local allowance. An answer that comes in pieces is acknowledged as
/// before: an upstream that writes its head and body apart under Nagle is
/// not held for a delayed ACK (unit test; on loopback, answers of 19 B to
/// 100 KB in 2 to 8 writes took the same time with and without the
/// option). Should the option fail, the connection is made without it.
fn socket(addr: SocketAddr, mark: Option<u32>) -> std::io::Result<tokio::net::TcpSocket> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    if let Some(mark) = mark {
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Mark, &mark)
            .map_err(std::io::Error::from)?;
    }
    let _ = rustix::net::sockopt::set_tcp_quickack(&socket, false);
    Ok(socket)
}

/// A connection from a socket marked `mark` before it connects. The host
/// rules drop the relay's marked packets on every port but the agent's;
/// should a SYN be dropped while they are being replaced, TCP would resend
/// it only after a second — so a fresh attempt goes out every 100 ms, until
/// one connects or the caller's deadline ends the exchange.
async fn connect_marked(addr: SocketAddr, mark: u32) -> std::io::Result<TcpStream> {
    loop {
        let socket = socket(addr, Some(mark))?;
        if let Ok(r) = tokio::time::timeout(MARKED_ATTEMPT, socket.connect(addr)).await {
            return r;
        }
    }
}

/// [`exchange`] without its deadline; sets `connected` once connected.
///
/// The socket is closed with a reset (`SO_LINGER` zero) once the answer is
/// read, or on any failure. IMDS closes after every answer and its FIN is
/// in by then, so the reset only spares it the wait for the proxy's FIN:
/// one segment fewer per forwarded request than a FIN exchange (IMDS's
/// ACK of that FIN; measured at the emulator: 10.0 → 9.0 segments per
/// request, nginx `proxy_pass` 10.0), no TIME_WAIT on the host whoever
/// closes first (a closed-first FIN left a minute of it per request, and
/// each new connection's port search walked them), and the connection's
/// conntrack entry ends in CLOSE (10 s) rather than TIME_WAIT (2 min). An
/// upstream that keeps connections alive (the ECS agent) is reset at once
/// too. The host's `TcpOutRsts` and `TCPAbortOnData` counters count one
/// per forwarded request.
async fn send(
    addr: SocketAddr,
    mark: Option<u32>,
    req: Request<Full<Bytes>>,
    connected: &mut bool,
) -> Result<(Parts, Bytes), String> {
    let stream = match mark {
        None => match socket(addr, None) {
            Ok(s) => s.connect(addr).await,
            Err(e) => Err(e),
        },
        Some(mark) => connect_marked(addr, mark).await,
    }
    .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    *connected = true;
    stream
        .set_zero_linger()
        .map_err(|e| format!("cannot set SO_LINGER on the connection to {addr}: {e}"))?;
    // No TCP_NODELAY: the request is one write on a fresh connection, with
    // nothing unacknowledged in flight, so Nagle never holds it (nginx sets
    // none on its upstream connections either); the call cost a system
    // call per forwarded request.
    let io = crate::io::CloseWithoutShutdown(TokioIo::new(stream));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    let answer = async move {
        let resp = sender.send_request(req).await?;
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await?.to_bytes();
        Ok::<_, hyper::Error>((parts, bytes))
    };
    let mut conn = std::pin::pin!(conn);
    let mut answer = std::pin::pin!(answer);
    // Whichever ends first; the socket is closed (reset) when `conn` drops.
    tokio::select! {
        biased;
        r = &mut answer => r.map_err(|e| e.to_string()),
        // hyper is done with the connection (the answer said `Connection:
        // close`, or the upstream closed): whatever it sent is in the
        // answer's channel, or the answer fails.
        c = &mut conn => match c {
            Ok(()) => answer.await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    //! Loopback only.

    use std::time::Duration;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    use super::*;

    fn request() -> Request<Full<Bytes>> {
        Request::get("/latest/meta-data/instance-id")
            .header("host", "169.254.169.254")
            .body(Full::new(Bytes::new()))
            .expect("request")
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_answer_is_read_whole() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let mut buf = vec![0; 1024];
            let n = s.read(&mut buf).await.expect("read");
            s.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 19\r\n\
                  connection: close\r\n\r\ni-0123456789abcdef0",
            )
            .await
            .expect("write");
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        let (parts, body) = exchange(addr, request(), deadline).await.expect("exchange");
        assert_eq!(parts.status, 200);
        assert_eq!(&body[..], b"i-0123456789abcdef0");
        let seen = server.await.expect("server");
        assert!(
            seen.starts_with("GET /latest/meta-data/instance-id HTTP/1.1\r\n"),
            "{seen}"
        );
    }

    /// How the proxy's side of a connection ended, as the upstream saw it.
    #[derive(Debug, PartialEq)]
    enum End {
        Reset,
        Fin,
        Open,
    }

    /// Serves one answer with `head` (then shuts its own side down, as IMDS
    /// closes, when `close`), and reports how the client's side ended
    /// within 300 ms.
    async fn client_end(head: &'static [u8], close: bool) -> End {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let mut buf = vec![0; 1024];
            let _ = s.read(&mut buf).await.expect("read");
            s.write_all(head).await.expect("write");
            if close {
                s.shutdown().await.expect("shutdown");
            }
            match tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await {
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => End::Reset,
                Ok(Ok(0)) => End::Fin,
                other => {
                    assert!(other.is_err(), "{other:?}");
                    End::Open
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        let (parts, body) = exchange(addr, request(), deadline).await.expect("exchange");
        assert_eq!((parts.status.as_u16(), &body[..]), (200, &b"i-0"[..]));
        server.await.expect("server")
    }

    /// IMDS closes after every answer; the proxy answers its FIN with a
    /// reset, not a FIN of its own: no TIME_WAIT on either side, no last
    /// ACK from IMDS.
    #[tokio::test(flavor = "current_thread")]
    async fn an_upstream_that_says_close_is_reset_after_its_fin() {
        let end = client_end(
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\ni-0",
            true,
        )
        .await;
        assert_eq!(end, End::Reset);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_upstream_that_keeps_the_connection_is_reset_at_once() {
        let end = client_end(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\ni-0", false).await;
        assert_eq!(
            end,
            End::Reset,
            "the proxy kept a connection nobody would close"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_silent_upstream_fails_at_the_deadline() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        // Accepts and reads, never answers; closes after 3 s (so a missing
        // deadline fails the test instead of hanging it).
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let mut buf = vec![0; 1024];
            let _ = tokio::time::timeout(Duration::from_secs(3), async {
                while s.read(&mut buf).await.is_ok_and(|n| n > 0) {}
            })
            .await;
        });
        let started = Instant::now();
        let err = exchange(addr, request(), started + Duration::from_millis(200))
            .await
            .expect_err("no answer");
        assert!(err.contains("did not answer in time"), "{err}");
        let took = started.elapsed();
        assert!(
            (Duration::from_millis(190)..Duration::from_secs(2)).contains(&took),
            "{took:?}"
        );
        server.abort();
    }

    /// The upstream sees no connection until the request arrives with the
    /// handshake's last ACK: a plain connection is in the listener's queue
    /// as soon as it is connected; one from [`socket`] only once it has
    /// written, and then with the request already in.
    #[tokio::test(flavor = "current_thread")]
    async fn the_handshakes_last_ack_rides_on_the_request() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.set_nonblocking(true).expect("nonblocking");
        let addr = l.local_addr().expect("addr");
        let plain = TcpStream::connect(addr).await.expect("connect");
        assert!(
            l.accept().is_ok(),
            "a plain connection's handshake ends when it is connected"
        );
        drop(plain);
        for attempt in 0.. {
            if attempt > 0 {
                // The last attempt's connection, closed unwritten, may be
                // queued by now: not this attempt's.
                tokio::time::sleep(Duration::from_millis(10)).await;
                while l.accept().is_ok() {}
            }
            let started = std::time::Instant::now();
            let mut s = socket(addr, None)
                .expect("socket")
                .connect(addr)
                .await
                .expect("connect");
            let queued = l.accept();
            // The kernel sends the held ACK on its own after 200 ms: a run
            // that slow says nothing; try again.
            if queued.is_ok() && started.elapsed() > Duration::from_millis(150) && attempt < 5 {
                continue;
            }
            assert!(
                matches!(&queued, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
                "connected, nothing written, and the upstream already has the connection: \
                 {queued:?}"
            );
            s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.expect("write");
            let until = std::time::Instant::now() + Duration::from_secs(2);
            let mut accepted = loop {
                match l.accept() {
                    Ok((a, _)) => break a,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        assert!(std::time::Instant::now() < until, "never accepted");
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            };
            accepted.set_nonblocking(true).expect("nonblocking");
            let mut buf = [0; 64];
            let n = std::io::Read::read(&mut accepted, &mut buf).expect("the request is in");
            assert_eq!(&buf[..n], b"GET / HTTP/1.1\r\n\r\n");
            break;
        }
    }

    /// An upstream that writes its answer's head and body apart, with
    /// Nagle on (no `TCP_NODELAY`), holds the body until its head is
    /// acknowledged: the answer must be acknowledged at once, not after a
    /// delayed ACK's 40 ms.
    #[tokio::test(flavor = "current_thread")]
    async fn an_answer_written_in_two_pieces_under_nagle_is_not_held() {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            for _ in 0..5 {
                let (mut s, _) = l.accept().await.expect("accept");
                s.set_nodelay(false).expect("nagle");
                let mut buf = vec![0; 1024];
                let _ = s.read(&mut buf).await.expect("read");
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\n")
                    .await
                    .expect("write");
                tokio::time::sleep(Duration::from_millis(2)).await;
                s.write_all(b"i-0").await.expect("write");
                let _ = s.shutdown().await;
            }
        });
        for _ in 0..5 {
            let started = std::time::Instant::now();
            let (parts, body) = exchange(addr, request(), Instant::now() + Duration::from_secs(5))
                .await
                .expect("exchange");
            assert_eq!((parts.status.as_u16(), &body[..]), (200, &b"i-0"[..]));
            let took = started.elapsed();
            assert!(
                took < Duration::from_millis(30),
                "the body waited for an ACK: {took:?}"
            );
        }
        server.await.expect("server");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_closed_port_fails_at_once() {
        let addr = {
            let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            l.local_addr().expect("addr")
        }; // closed again: connecting is refused
        let started = Instant::now();
        let err = exchange(addr, request(), started + Duration::from_secs(5))
            .await
            .expect_err("refused");
        assert!(err.contains("cannot connect"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
