//! Lab servers: each runs on its own thread that first enters a lab
//! namespace, binds its sockets there, and then drives a single-threaded
//! tokio runtime until the lab stops it.

use std::future::Future;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::thread::JoinHandle;

use metaguard_sys::netns::Netns;
use tokio::sync::oneshot;

use crate::log::{LoggedRequest, RequestLog};
use crate::LabError;

/// A socket to bind for a server.
#[derive(Debug, Clone)]
pub enum Bind {
    Tcp(SocketAddr),
    Udp(SocketAddr),
    /// A unix socket at this path (replaced if it exists).
    Unix(std::path::PathBuf),
}

/// A bound socket handed to the server's body (still std; convert inside
/// the runtime with `from_std`).
#[derive(Debug)]
pub enum Bound {
    Tcp(TcpListener),
    Udp(UdpSocket),
    Unix(std::os::unix::net::UnixListener),
}

/// A running server thread; stopped and joined on drop.
#[derive(Debug)]
pub struct ServerThread {
    name: String,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ServerThread {
    /// Starts `body(bound sockets)` on a thread inside `ns`. Returns once
    /// every socket is bound, or with the bind error.
    pub fn start<F, Fut>(
        ns: &Netns,
        name: &str,
        binds: Vec<Bind>,
        body: F,
    ) -> Result<ServerThread, LabError>
    where
        F: FnOnce(Vec<Bound>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), std::io::Error>>();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let thread = ns.spawn_thread(name, move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let bound: Result<Vec<Bound>, std::io::Error> = binds
                .into_iter()
                .map(|b| match b {
                    Bind::Tcp(a) => {
                        let l = TcpListener::bind(a)?;
                        // std listens with a backlog of 128; load loops in
                        // benchmarks overflow that, and a dropped SYN costs
                        // a 1 s retransmission. Listening again resizes it.
                        rustix::net::listen(&l, 4096)?;
                        l.set_nonblocking(true)?;
                        Ok(Bound::Tcp(l))
                    }
                    Bind::Udp(a) => {
                        let s = UdpSocket::bind(a)?;
                        s.set_nonblocking(true)?;
                        Ok(Bound::Udp(s))
                    }
                    Bind::Unix(p) => {
                        match std::fs::remove_file(&p) {
                            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                            _ => {}
                        }
                        let l = std::os::unix::net::UnixListener::bind(&p)?;
                        l.set_nonblocking(true)?;
                        Ok(Bound::Unix(l))
                    }
                })
                .collect();
            let bound = match bound {
                Ok(b) => {
                    let _ = ready_tx.send(Ok(()));
                    b
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            // A LocalSet lets bodies spawn !Send tasks on this one thread.
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                tokio::select! {
                    () = body(bound) => {}
                    _ = stop_rx => {}
                }
            });
        })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(ServerThread {
                name: name.to_string(),
                stop: Some(stop_tx),
                thread: Some(thread),
            }),
            Ok(Err(source)) => {
                let _ = thread.join();
                Err(LabError::Server {
                    name: name.to_string(),
                    source,
                })
            }
            Err(_) => Err(LabError::Server {
                name: name.to_string(),
                source: std::io::Error::other("server thread ended before binding"),
            }),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Stops the server and waits for its thread; its sockets are closed
    /// when this returns.
    pub fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ServerThread {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The first line a lab probe sends on a raw TCP or UDP probe.
pub const PROBE_PREFIX: &str = "MGPROBE ";

/// An echo service (TCP and UDP) standing on the metadata addresses' other
/// ports and on an unrelated VPC address. It answers each line with the
/// same line and logs a probe's arrival (method `TCP`/`UDP`, header
/// `x-lab-probe`), so a test can prove that a non-HTTP probe did or did not
/// arrive.
pub async fn echo(bound: Vec<Bound>, log: RequestLog) {
    let mut tasks = tokio::task::JoinSet::new();
    for b in bound {
        let log = log.clone();
        match b {
            Bound::Tcp(l) => {
                tasks.spawn_local(async move {
                    let Ok(l) = tokio::net::TcpListener::from_std(l) else {
                        return;
                    };
                    loop {
                        let Ok((stream, peer)) = l.accept().await else {
                            continue;
                        };
                        let log = log.clone();
                        tokio::task::spawn_local(echo_tcp(stream, peer, log));
                    }
                });
            }
            Bound::Unix(_) => {}
            Bound::Udp(s) => {
                tasks.spawn_local(async move {
                    let Ok(s) = tokio::net::UdpSocket::from_std(s) else {
                        return;
                    };
                    let local = s.local_addr().unwrap_or_else(|_| ([0, 0, 0, 0], 0).into());
                    let mut buf = vec![0u8; 2048];
                    loop {
                        let Ok((n, peer)) = s.recv_from(&mut buf).await else {
                            continue;
                        };
                        log_probe(&log, "UDP", peer, local, &buf[..n]);
                        let _ = s.send_to(&buf[..n], peer).await;
                    }
                });
            }
        }
    }
    while tasks.join_next().await.is_some() {}
}

async fn echo_tcp(mut stream: tokio::net::TcpStream, peer: SocketAddr, log: RequestLog) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let local = stream
        .local_addr()
        .unwrap_or_else(|_| ([0, 0, 0, 0], 0).into());
    let mut buf = vec![0u8; 2048];
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buf)).await;
    let n = match read {
        Ok(Ok(n)) => n,
        _ => 0,
    };
    log_probe(&log, "TCP", peer, local, &buf[..n]);
    let _ = stream.write_all(&buf[..n]).await;
    let _ = stream.shutdown().await;
}

fn log_probe(log: &RequestLog, proto: &str, peer: SocketAddr, local: SocketAddr, data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let line = text.lines().next().unwrap_or("").to_string();
    let mut headers = Vec::new();
    if let Some(id) = line.strip_prefix(PROBE_PREFIX) {
        headers.push(("x-lab-probe".to_string(), id.trim().to_string()));
    }
    log.push(LoggedRequest {
        at_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0),
        peer,
        local,
        method: proto.to_string(),
        target: line,
        headers,
        status: 0,
    });
}
