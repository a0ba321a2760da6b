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

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::http::response::Parts;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// How long a connection to the upstream may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Sends `req` to `addr` on a new connection and reads the whole answer.
/// The caller bounds the total time.
pub async fn exchange(
    addr: SocketAddr,
    req: Request<Full<Bytes>>,
) -> Result<(Parts, Bytes), String> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| format!("connecting to {addr} timed out"))?
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    // Requests are one small write; never wait for an ACK to send it.
    let _ = stream.set_nodelay(true);
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
    tokio::select! {
        biased;
        r = &mut answer => r.map_err(|e| e.to_string()),
        // The upstream closed: whatever it sent is already in the answer's
        // channel, or the answer fails.
        c = &mut conn => match c {
            Ok(()) => answer.await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        },
    }
    // Dropping `conn` closes the socket: nothing is reused.
}
