//! The sockets as hyper sees them.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;

/// A connection whose `shutdown` does nothing: hyper shuts a connection
/// down when it is done with it (the upstream's `Connection: close`, or a
/// client's), and the proxy closes the socket right after, which sends the
/// same FIN — and, with unread input, the same RST — so the `shutdown` is
/// only one more system call per connection (measured: nginx does not
/// make it; BENCHMARKS.md, "Metadata proxy").
pub struct CloseWithoutShutdown<T>(pub T);

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for CloseWithoutShutdown<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for CloseWithoutShutdown<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A caller's connection: [`CloseWithoutShutdown`], and once the answer
/// being written is the connection's last ([`LastAnswer::mark`]: the
/// caller asked for `Connection: close`, as SDKs do with IMDS), its bytes
/// are corked (`TCP_CORK`) until the close, so the FIN leaves in the same
/// segment as the answer's end.
///
/// Without it the answer leaves at once and the FIN a few system calls
/// later (hyper's end of the connection, the epoll deregistration, the
/// close): a caller that closes as soon as it has read the answer wins
/// that race, and *its* side is left in TIME_WAIT. Measured with wrk in a
/// container: about one TIME_WAIT per request in the caller's namespace,
/// and once some 14,000 of them name the same destination every
/// `connect()` walks the ephemeral ports (wrk at 100 % system time, 6,000
/// → 400 requests/s). With the FIN in the answer's segment the caller has
/// read the end of the stream before it closes, and closes second.
pub struct CallerIo {
    io: CloseWithoutShutdown<TokioIo<tokio::net::TcpStream>>,
    last: LastAnswer,
    corked: bool,
}

/// Set by the handler when the answer it returns ends the connection.
#[derive(Debug, Clone, Default)]
pub struct LastAnswer(Arc<AtomicBool>);

impl LastAnswer {
    /// The answer now being made is the connection's last.
    pub fn mark(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Whether a request asks to end its connection after the answer, as
/// hyper decides it: `Connection: close`, or HTTP/1.0 without
/// `Connection: keep-alive`.
pub fn asks_to_close(head: &hyper::http::request::Parts) -> bool {
    let has = |token| connection_has(&head.headers, token);
    has("close") || (head.version <= hyper::Version::HTTP_10 && !has("keep-alive"))
}

/// Whether the `Connection` headers of `headers` list `token` (any case,
/// comma-separated, any number of headers).
pub fn connection_has(headers: &hyper::HeaderMap, token: &str) -> bool {
    headers
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

impl CallerIo {
    pub fn new(stream: tokio::net::TcpStream, last: LastAnswer) -> CallerIo {
        CallerIo {
            io: CloseWithoutShutdown(TokioIo::new(stream)),
            last,
            corked: false,
        }
    }

    /// Corks once the last answer is being written. Best effort: a socket
    /// that refuses is served as before (the FIN a little later).
    fn cork_if_last(&mut self) {
        if !self.corked && self.last.is_set() {
            self.corked = true;
            let _ = rustix::net::sockopt::set_tcp_cork(self.io.0.inner(), true);
        }
    }
}

impl hyper::rt::Read for CallerIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for CallerIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.cork_if_last();
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.cork_if_last();
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
