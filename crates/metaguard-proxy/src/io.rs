//! The sockets as hyper sees them.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

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
