//! (f) the floor: the least an HTTP proxy on tokio must do per request, in
//! the shape of metaguard's proxy (one single-threaded runtime per worker
//! thread over its own `SO_REUSEPORT` listener, one task per client
//! connection, `TCP_NODELAY` towards the client; upstream connections
//! from their own source address, without `TCP_NODELAY`, closed with a
//! reset once the answer is in), and nothing else: no HTTP library, no
//! caller identification, no policy, no audit line, no metrics. Per
//! request it reads the client's request head, opens a new connection to
//! the upstream, writes the head there unchanged, reads the answer as far
//! as its `Content-Length`, and writes it back without the upstream's
//! `Connection: close` (so the client's connection stays alive, as it does
//! through the real proxies).
//!
//! It tells whether a goal is within reach of the stack at all: what it
//! costs per request is what any tokio proxy pays for the same network
//! work, whatever it parses. Not a proxy to use: it trusts the upstream's
//! framing and checks nothing.
//!
//! (g) is the same process answering every request from memory (upstream
//! `memory`): a fixed `200` with an instance id, no upstream — the least a
//! tokio server pays per answer, beside nginx's `proxy_cache` (e) and
//! metaguard's cache hit (b).
//!
//! The bench re-executes itself (`proxy --floor-relay LISTEN UPSTREAM SOURCE`)
//! inside the lab host's namespace to run it as a process of its own, so
//! its CPU time and memory are measured like the other proxies'.

use std::net::{IpAddr, SocketAddr};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream};

/// The argument that makes the bench binary run the relay.
pub const ARG: &str = "--floor-relay";

/// Largest request or response head read.
const MAX_HEAD: usize = 16 * 1024;

/// The answer (g) gives every request, and the one it gives a request
/// that asked to close (wrk counts a close the answer did not announce as
/// a read error).
const FROM_MEMORY: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 19\r\n\r\ni-0123456789abcdef0";
const FROM_MEMORY_CLOSE: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 19\r\n\
connection: close\r\n\r\ni-0123456789abcdef0";

/// Runs the relay (to `upstream`, connecting from `source`, or answering
/// from memory when `None`) until the process is killed; returns only on a
/// set-up error.
pub fn run(
    listen: SocketAddr,
    upstream: Option<SocketAddr>,
    source: IpAddr,
) -> std::io::Result<()> {
    let listeners = metaguard_proxy::bind(listen, metaguard_proxy::workers())?;
    let threads: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            std::thread::spawn(move || -> std::io::Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .build()?;
                rt.block_on(async move {
                    let l = tokio::net::TcpListener::from_std(l)?;
                    loop {
                        let (s, _) = l.accept().await?;
                        tokio::spawn(connection(s, upstream, source));
                    }
                })
            })
        })
        .collect();
    for t in threads {
        t.join()
            .map_err(|_| std::io::Error::other("a relay thread panicked"))??;
    }
    Ok(())
}

/// Where a head ends (after its blank line).
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Whether a head has the header `name: value` (both lowercase).
fn has_header(head: &[u8], name: &str, value: &str) -> bool {
    String::from_utf8_lossy(head).lines().any(|l| {
        l.split_once(':').is_some_and(|(n, v)| {
            n.trim().eq_ignore_ascii_case(name) && v.trim().eq_ignore_ascii_case(value)
        })
    })
}

/// The `Content-Length` of a response head (0 when absent).
fn content_length(head: &[u8]) -> usize {
    String::from_utf8_lossy(head)
        .lines()
        .find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())
                .flatten()
        })
        .unwrap_or(0)
}

/// A new upstream connection from `source` (the port chosen at `connect()`,
/// `IP_BIND_ADDRESS_NO_PORT`, as nginx's `proxy_bind` does), closed with a
/// reset when dropped (`SO_LINGER` zero), as metaguard's proxy closes its
/// own: no TIME_WAIT whoever closes first. `TCP_QUICKACK` is off before
/// `connect()`, as metaguard's upstream sockets have it: the handshake's
/// last ACK rides on the request (`metaguard_proxy::upstream`).
async fn connect(upstream: SocketAddr, source: IpAddr) -> std::io::Result<TcpStream> {
    let socket = if upstream.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    nix::sys::socket::setsockopt(
        &socket,
        nix::sys::socket::sockopt::IpBindAddressNoPort,
        &true,
    )?;
    socket.bind(SocketAddr::new(source, 0))?;
    rustix::net::sockopt::set_tcp_quickack(&socket, false)?;
    let stream = socket.connect(upstream).await?;
    stream.set_zero_linger()?;
    Ok(stream)
}

async fn connection(mut client: TcpStream, upstream: Option<SocketAddr>, source: IpAddr) {
    let _ = client.set_nodelay(true);
    let mut req = Vec::with_capacity(4096);
    let mut resp = Vec::with_capacity(4096);
    loop {
        let end = loop {
            if let Some(end) = head_end(&req) {
                break end;
            }
            if req.len() > MAX_HEAD || !matches!(client.read_buf(&mut req).await, Ok(n) if n > 0) {
                return;
            }
        };
        let close = has_header(&req[..end], "connection", "close");
        let Some(upstream) = upstream else {
            req.drain(..end);
            let answer = if close {
                FROM_MEMORY_CLOSE
            } else {
                FROM_MEMORY
            };
            if client.write_all(answer).await.is_err() || close {
                return;
            }
            continue;
        };
        let Ok(mut up) = connect(upstream, source).await else {
            return;
        };
        if up.write_all(&req[..end]).await.is_err() {
            return;
        }
        req.drain(..end);
        resp.clear();
        let total = loop {
            if let Some(h) = head_end(&resp) {
                let total = h + content_length(&resp[..h]);
                if resp.len() >= total {
                    break total;
                }
            }
            if resp.len() > MAX_HEAD || !matches!(up.read_buf(&mut resp).await, Ok(n) if n > 0) {
                return;
            }
        };
        drop(up);
        resp.truncate(total);
        if !close {
            // Keep the client's connection: drop the upstream's
            // `Connection: close` line (the emulator closes every one).
            let h = head_end(&resp).unwrap_or(0);
            let body = resp.split_off(h);
            let head: String = String::from_utf8_lossy(&resp)
                .split_inclusive("\r\n")
                .filter(|l| !has_header(l.as_bytes(), "connection", "close"))
                .collect();
            resp = head.into_bytes();
            resp.extend_from_slice(&body);
        }
        if client.write_all(&resp).await.is_err() || close {
            return;
        }
    }
}
