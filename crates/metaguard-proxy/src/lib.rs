//! metaguard's metadata proxy: the task-credentials relay (`task_metadata =
//! "proxy"`) and the IMDS proxy (`imds = "proxy"`).
//!
//! ```text
//!  container ──► 169.254.170.2:80   ─nft DNAT─► 169.254.170.2:9470 (relay)        ──► [agent] credentials (127.0.0.1:51679)
//!            ──► 169.254.169.254:80 ─nft DNAT─► 169.254.169.254:9470 (IMDS proxy) ──► IMDS (169.254.169.254:80)
//! ```
//!
//! * **Where.** Each listens on the endpoint address it serves (the relay
//!   on 169.254.170.2, the IMDS proxy on 169.254.169.254; IPv6 alike), on
//!   `[proxy] imds_port`. Those addresses are not the host's: the sockets
//!   are bound with `IP_FREEBIND` and `IP_TRANSPARENT`, and only the
//!   connections the rules DNAT to them reach them (a policy route
//!   delivers those locally), so no port of the host's own is taken — a
//!   host-network service keeps `0.0.0.0:80` (F10) — and nothing is sent to
//!   127/8, so neither `route_localnet` nor a CIS `127.0.0.0/8` drop rule
//!   matters (F1, F2). The rules find out whether a listener is there
//!   (`tproxy` finds only transparent sockets), which is why the sockets
//!   are transparent. The proxy talks to IMDS from the host, so the
//!   instance's hop limit of 1 no longer breaks containers (F9).
//! * **Who.** Every accepted connection carries the mark of its SYN
//!   (`tcp_fwmark_accept`): a hash of the bridge port it entered from, or a
//!   host workload's tag. The [`Directory`] (the daemon's) turns it into a
//!   workload and a container — never the source address alone (F15).
//! * **What.** IMDS paths are decided on their canonical form
//!   (`core::proxy_path`) against the workload's path policy and forwarded
//!   in exactly that form; the token `PUT` and its TTL header pass both
//!   ways; status codes are kept; `X-Forwarded-For` is never added, and a
//!   token `PUT` carrying one is refused as IMDS does (F16). Credentials
//!   ids are served only to the workload that owns them (F13); task
//!   metadata is allowed, denied or redacted per workload.
//! * **Limits.** Per workload: a token bucket (40 rps, 60 burst by
//!   default, the ECS agent's own throttle) and a connection cap, neither
//!   of which refuses observed traffic (counted apart, `limits`); header
//!   read timeout and size limit (slowloris); requests with a body,
//!   `Transfer-Encoding`, or conflicting lengths are refused (smuggling).
//! * **Record.** One JSON audit line per request (never a credential or a
//!   full credentials id) and Prometheus metrics on the daemon's registry.
//! * **Reload.** The config, upstreams, limits and audit sink are one
//!   [`Settings`] value, swapped whole ([`settings`]); the listening
//!   sockets follow the plan's listener set ([`server`]).

#![forbid(unsafe_code)]

mod audit;
pub mod cache;
#[cfg(test)]
mod flow_tests;
mod handler;
mod io;
mod limits;
mod metrics;
pub mod observe;
pub mod redact;
pub mod server;
pub mod settings;
pub mod tokens;
mod upstream;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hyper_util::rt::TokioTimer;
use metaguard_core::Config;
use tokio::net::TcpListener;
use tracing::{debug, warn};

pub use audit::{AuditSink, FLUSH_EVERY as AUDIT_FLUSH_EVERY};
pub use metrics::ProxyMetrics;
pub use observe::ObserveLog;
pub use server::{Listener, Server};
pub use settings::{Settings, SettingsError, Upstreams};

pub use metaguard_core::proxy_decision::{
    Caller, Directory, IdKind, Kind, Origin, Owner, Ownership,
};

/// Header read timeout (slowloris) and idle keep-alive limit.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head accepted (IMDS requests are a few hundred bytes).
pub const MAX_HEAD: usize = 16 * 1024;
/// How long the upstream has to answer.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);

/// The running proxy state shared by every connection.
pub struct Proxy {
    directory: Arc<dyn Directory>,
    /// The settings in force: read once per connection and per request,
    /// written only by a reload ([`settings`]).
    settings: RwLock<Arc<Settings>>,
    metrics: ProxyMetrics,
    /// IMDSv2 tokens issued to callers ([`tokens`]).
    tokens: tokens::Tokens,
    /// The proxy's own IMDS token.
    upstream_token: tokens::UpstreamToken,
    /// Answers kept ([`cache`]); cleared by a reload that changes the
    /// config.
    cache: cache::Cache,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// An accepted connection: where it comes from and who it was found to be
/// under the config in force when it was accepted.
#[derive(Debug)]
pub(crate) struct Connection {
    pub(crate) origin: Origin,
    pub(crate) config: Arc<Config>,
    pub(crate) caller: Caller,
    /// An observed connection over `[proxy] max_connections`: served, and
    /// its requests' records say that `proxy` would have closed it.
    pub(crate) over_connections: bool,
    /// Told when the answer being made is the connection's last (see
    /// [`io::CallerIo`]).
    pub(crate) last: io::LastAnswer,
}

impl Proxy {
    pub fn new(
        directory: Arc<dyn Directory>,
        metrics: ProxyMetrics,
        settings: Settings,
    ) -> Arc<Proxy> {
        Arc::new(Proxy {
            directory,
            settings: RwLock::new(Arc::new(settings)),
            metrics,
            tokens: tokens::Tokens::default(),
            upstream_token: tokens::UpstreamToken::default(),
            cache: cache::Cache::default(),
        })
    }

    /// The settings in force.
    pub fn settings(&self) -> Arc<Settings> {
        self.settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Puts `new` in force for the next connection and request; the limits
    /// keep their state (tokens, open connections) workload by workload.
    /// A new config (policies, workloads, upstreams) empties the cache:
    /// what was kept under the old one is fetched again under the new.
    pub fn reconfigure(&self, new: Settings) {
        let mut slot = self.settings.write().unwrap_or_else(|p| p.into_inner());
        new.follow(&slot);
        if new.config != slot.config || new.upstreams != slot.upstreams {
            self.cache.clear();
        }
        *slot = Arc::new(new);
    }

    /// The answer cache (its counters, for tests and benchmarks).
    pub fn cache(&self) -> &cache::Cache {
        &self.cache
    }

    /// Who `origin` is under `config`: from memory when the directory can
    /// answer inline, else on a blocking thread (it reads the host's links
    /// and containers).
    pub(crate) async fn identify(&self, config: &Arc<Config>, origin: Origin) -> Caller {
        if let Some(c) = self.directory.identify_cached(config, origin) {
            return c;
        }
        let dir = self.directory.clone();
        let config = config.clone();
        tokio::task::spawn_blocking(move || dir.identify(&config, origin))
            .await
            .unwrap_or_else(|_| Caller::identification_failed(origin.mark))
    }

    /// Accepts connections on `listener` until the future is dropped.
    pub(crate) async fn serve(self: Arc<Self>, listener: &TcpListener, kind: Kind) {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "proxy accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let me = self.clone();
            tokio::spawn(async move { me.connection(stream, peer, kind).await });
        }
    }

    async fn connection(
        self: Arc<Self>,
        stream: tokio::net::TcpStream,
        peer: SocketAddr,
        kind: Kind,
    ) {
        // TCP_NODELAY is the listener's, inherited (`bind`).
        let mark =
            nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::Mark).unwrap_or(0);
        // A host process's own end of the connection, for the daemon to
        // look up (sock_diag): the destination it connected to, before the
        // DNAT that brought it here.
        let dst = metaguard_core::ruleset::is_host_mark(mark)
            .then(|| original_destination(&stream))
            .flatten();
        let origin = Origin { mark, peer, dst };
        let settings = self.settings();
        // A known port is answered inline; only a miss (which reads the
        // host's links and containers) goes to a blocking thread.
        let caller = self.identify(&settings.config, origin).await;
        let Some((_slot, over_connections)) = self.admit(&settings, kind, &caller) else {
            return; // dropping the stream closes it
        };
        let last = io::LastAnswer::default();
        let conn = Arc::new(Connection {
            origin,
            config: settings.config.clone(),
            caller,
            over_connections,
            last: last.clone(),
        });
        drop(settings);
        let me = self.clone();
        let this = conn.clone();
        let svc = hyper::service::service_fn(move |req| {
            let me = me.clone();
            let conn = conn.clone();
            async move { Ok::<_, std::convert::Infallible>(me.handle(kind, &conn, req).await) }
        });
        let result = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .max_buf_size(MAX_HEAD)
            .serve_connection(io::CallerIo::new(stream, last), svc)
            .await;
        if let Err(e) = result {
            if e.is_parse() || e.is_parse_too_large() {
                self.head_refused(kind, &this, &e);
            }
            debug!(error = %e, %peer, "proxy connection ended with an error");
        }
    }

    /// A request head hyper refused (and answered itself: 431 for one over
    /// [`MAX_HEAD`], else 400) is counted and audited like the proxy's own
    /// `invalid` answers: a caller probing with malformed requests leaves
    /// the same trace as one probing with well-formed ones.
    fn head_refused(&self, kind: Kind, conn: &Connection, e: &hyper::Error) {
        let s = self.settings();
        let wname = handler::workload_name(&s.config, &conn.caller);
        let status = if e.is_parse_too_large() { 431 } else { 400 };
        self.metrics.count_request(kind, wname, "invalid", status);
        s.audit
            .head_refused(kind, &conn.caller, wname, status, &format!("http: {e}"));
    }
}

impl Proxy {
    /// A place for `caller`'s new connection to `kind` under its workload's
    /// `[proxy] max_connections`, held while the connection lives; `None`
    /// (counted and audited): the workload holds that many already, close
    /// it. An observed caller is not held to the cap (observe flows as
    /// allow, whose IMDS traffic never meets it): its connections are
    /// counted apart, the flag says one is over the cap, and only the
    /// descriptor backstop (`Limits::observed_ceiling`) refuses one.
    pub(crate) fn admit(
        &self,
        settings: &Settings,
        kind: Kind,
        caller: &Caller,
    ) -> Option<(limits::ConnectionSlot, bool)> {
        let (admitted, reason) = if observe::observed(&settings.config, caller, kind) {
            let slot = settings.limits.observed_connection(caller.workload);
            (
                slot.map(|(slot, within)| (slot, !within)),
                "observe-backstop",
            )
        } else {
            let slot = settings.limits.connection(caller.workload);
            (slot.map(|slot| (slot, false)), "connection-limit")
        };
        if admitted.is_none() {
            let wname = handler::workload_name(&settings.config, caller);
            self.metrics
                .refused_connections
                .with_label_values(&[wname, reason])
                .inc();
            settings
                .audit
                .connection_refused(kind, caller, wname, reason);
        }
        admitted
    }
}

/// The destination the client connected to before DNAT
/// (`SO_ORIGINAL_DST`), else the socket's own address (no NAT).
fn original_destination(stream: &tokio::net::TcpStream) -> Option<SocketAddr> {
    use nix::sys::socket::{getsockopt, sockopt};
    let local = stream.local_addr().ok()?;
    let original = match local {
        SocketAddr::V4(_) => getsockopt(stream, sockopt::OriginalDst).ok().map(|a| {
            SocketAddr::new(
                std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)).into(),
                u16::from_be(a.sin_port),
            )
        }),
        SocketAddr::V6(_) => getsockopt(stream, sockopt::Ip6tOriginalDst).ok().map(|a| {
            SocketAddr::new(
                std::net::Ipv6Addr::from(a.sin6_addr.s6_addr).into(),
                u16::from_be(a.sin6_port),
            )
        }),
    };
    original.or(Some(local))
}

/// How many threads serve the proxy: one per CPU, at most
/// [`MAX_WORKERS`]. Each runs a single-threaded runtime over its own
/// listening sockets (`SO_REUSEPORT`; the kernel spreads connections), so
/// a request never hops between threads — the shape of nginx's worker
/// processes, measured in BENCHMARKS.md ("Metadata proxy").
pub fn workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().clamp(1, MAX_WORKERS))
}

/// The most proxy threads: metadata traffic is a few requests per second
/// per workload (the token bucket caps it), so more would only hold memory.
pub const MAX_WORKERS: usize = 4;

/// Binds `copies` listening sockets on `addr`, sharing the port through
/// `SO_REUSEPORT`; one per worker. `IP_FREEBIND`: the address is not the
/// host's (an endpoint address; see the crate's "Where"). `IP_TRANSPARENT`
/// (needs `CAP_NET_ADMIN`): the rules' `tproxy` probe finds only
/// transparent listeners, and a transparent socket may answer from an
/// address that is not the host's. Only processes of the same user can
/// join the group, and the first bind fails if another program holds the
/// port without it (F10) — a reload binds before its rules change, so that
/// such a port refuses the reload before anything changed. `TCP_NODELAY`
/// (an answer on a keep-alive connection is not held for the caller's ACK
/// of the one before) is set here once: every accepted socket inherits
/// it, one system call per connection fewer than setting it on each.
pub fn bind(addr: SocketAddr, copies: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    use nix::sys::socket::{self, sockopt, AddressFamily, Backlog, SockFlag, SockType};
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let one = |_| -> std::io::Result<std::net::TcpListener> {
        let fd = socket::socket(
            family,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
        socket::setsockopt(&fd, sockopt::ReusePort, &true)?;
        socket::setsockopt(&fd, sockopt::TcpNoDelay, &true)?;
        // IPPROTO_IP level, which IPv6 sockets accept too (one flag each).
        socket::setsockopt(&fd, sockopt::IpFreebind, &true)?;
        socket::setsockopt(&fd, sockopt::IpTransparent, &true).map_err(|e| {
            std::io::Error::new(
                std::io::Error::from(e).kind(),
                format!("IP_TRANSPARENT: {e} (it needs CAP_NET_ADMIN)"),
            )
        })?;
        socket::bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &socket::SockaddrStorage::from(addr),
        )?;
        socket::listen(&fd, Backlog::new(1024).unwrap_or(Backlog::MAXCONN))?;
        Ok(std::net::TcpListener::from(fd))
    };
    (0..copies.max(1)).map(one).collect()
}
