//! The proxy's threads and listening sockets, and how a reload changes
//! them.
//!
//! * **Workers.** One single-threaded runtime per worker thread
//!   ([`crate::workers`]), started with the first listener; each serves its
//!   own `SO_REUSEPORT` copy of every listener, so a connection and its
//!   requests never change threads.
//! * **Listeners follow the plan.** The wanted set of (address, service)
//!   pairs comes from the plan ([`listeners`]). A change is made in two
//!   steps around the daemon's rules: [`Server::prepare`] binds what is new
//!   (before the rules send anything there; see [`crate::bind`]) and opens
//!   the new settings — any failure leaves everything as it was —, then
//!   [`Server::commit`] puts the settings in force, serves the new
//!   sockets and closes the vanished ones. An unchanged listener keeps its
//!   sockets: no connection meets a gap. A closed one stops accepting;
//!   connections it accepted finish on their own.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use metaguard_core::ruleset::ProxyPlan;
use tokio::sync::oneshot;
use tracing::warn;

use crate::settings::Settings;
use crate::{Kind, Proxy};

/// One listening address and the service it offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Listener {
    pub addr: SocketAddr,
    pub kind: Kind,
}

impl std::fmt::Display for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.addr, self.kind.as_str())
    }
}

/// The listeners a plan asks for (none when nothing is proxied).
pub fn listeners(plan: Option<&ProxyPlan>) -> BTreeSet<Listener> {
    let Some(p) = plan else {
        return BTreeSet::new();
    };
    let relay = p.relay.iter().map(|&addr| Listener {
        addr,
        kind: Kind::Relay,
    });
    let imds = p.imds.iter().map(|&addr| Listener {
        addr,
        kind: Kind::Imds,
    });
    relay.chain(imds).collect()
}

/// What going from one listener set to another takes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Change {
    /// Listeners to bind and serve.
    pub open: Vec<Listener>,
    /// Listeners to close.
    pub close: Vec<Listener>,
}

/// The change from `current` to `wanted`; what both hold is kept as it is.
pub fn diff<'a>(
    current: impl IntoIterator<Item = &'a Listener>,
    wanted: &BTreeSet<Listener>,
) -> Change {
    let current: BTreeSet<Listener> = current.into_iter().copied().collect();
    Change {
        open: wanted.difference(&current).copied().collect(),
        close: current.difference(wanted).copied().collect(),
    }
}

/// Why the proxy could not take a new listener set.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr} for the {} proxy (is something else serving it? F10)", .kind.as_str())]
    Bind {
        addr: SocketAddr,
        kind: Kind,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start proxy worker {n}")]
    Worker {
        n: usize,
        #[source]
        source: std::io::Error,
    },
}

/// A change bound and opened, not yet in force ([`Server::commit`]).
/// Dropping it closes what it bound.
#[derive(Debug)]
pub struct Prepared {
    settings: Option<Settings>,
    bound: Vec<(Listener, Vec<std::net::TcpListener>)>,
    close: Vec<Listener>,
}

impl Prepared {
    /// The change it makes.
    pub fn change(&self) -> Change {
        Change {
            open: self.bound.iter().map(|(l, _)| *l).collect(),
            close: self.close.clone(),
        }
    }
}

/// One worker thread and its runtime.
#[derive(Debug)]
struct Worker {
    handle: tokio::runtime::Handle,
    /// Dropped to end the thread (its runtime and every task on it).
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A listener being served: one accept task per worker.
#[derive(Debug)]
struct Open {
    /// Dropped to close: each copy's accept task ends when its sender goes.
    close: Vec<oneshot::Sender<()>>,
    /// Disconnected once every copy's socket is closed.
    closed: mpsc::Receiver<()>,
}

/// How long [`Server::commit`] waits for closed sockets to be released.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// The running proxy's threads and listeners.
#[derive(Debug)]
pub struct Server {
    proxy: Arc<Proxy>,
    workers: Vec<Worker>,
    open: BTreeMap<Listener, Open>,
}

impl Server {
    /// A server for `proxy`, with no thread and no listener yet.
    pub fn new(proxy: Arc<Proxy>) -> Server {
        Server {
            proxy,
            workers: Vec::new(),
            open: BTreeMap::new(),
        }
    }

    /// The listeners being served.
    pub fn listening(&self) -> BTreeSet<Listener> {
        self.open.keys().copied().collect()
    }

    /// Binds the listeners `wanted` adds (one copy per worker; workers
    /// are started if there are none yet). Nothing in force changes: the
    /// new sockets are served, the vanished ones closed and `settings` put
    /// in force (when given) by [`Server::commit`].
    pub fn prepare(
        &mut self,
        wanted: &BTreeSet<Listener>,
        settings: Option<Settings>,
    ) -> Result<Prepared, ServerError> {
        let change = diff(self.open.keys(), wanted);
        if !change.open.is_empty() {
            self.start_workers()?;
        }
        let copies = self.workers.len();
        let bound = change
            .open
            .iter()
            .map(|l| {
                crate::bind(l.addr, copies)
                    .map(|socks| (*l, socks))
                    .map_err(|source| ServerError::Bind {
                        addr: l.addr,
                        kind: l.kind,
                        source,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Prepared {
            settings,
            bound,
            close: change.close,
        })
    }

    /// Puts `p` in force: first its settings, then its new listeners are
    /// served and the vanished ones closed. Returns once their sockets are
    /// closed (a few milliseconds; at most `CLOSE_WAIT`, 2 s, with a warning).
    pub fn commit(&mut self, p: Prepared) -> Change {
        let change = p.change();
        if let Some(s) = p.settings {
            self.proxy.reconfigure(s);
        }
        for (l, socks) in p.bound {
            let (closed_tx, closed) = mpsc::channel();
            let mut close = Vec::with_capacity(socks.len());
            for (w, sock) in self.workers.iter().zip(socks) {
                let (tx, rx) = oneshot::channel();
                close.push(tx);
                w.handle.spawn(accept(
                    self.proxy.clone(),
                    sock,
                    l.kind,
                    rx,
                    closed_tx.clone(),
                ));
            }
            self.open.insert(l, Open { close, closed });
        }
        let closing: Vec<(Listener, Open)> = p
            .close
            .iter()
            .filter_map(|l| self.open.remove(l).map(|o| (*l, o)))
            .collect();
        let deadline = Instant::now() + CLOSE_WAIT;
        for (l, o) in closing {
            drop(o.close);
            let left = deadline.saturating_duration_since(Instant::now());
            if let Err(RecvTimeoutError::Timeout) | Ok(()) = o.closed.recv_timeout(left) {
                warn!(listener = %l, "proxy listener not closed after {CLOSE_WAIT:?}");
            }
        }
        change
    }

    fn start_workers(&mut self) -> Result<(), ServerError> {
        let n = crate::workers();
        while self.workers.len() < n {
            let i = self.workers.len();
            let err = |source| ServerError::Worker { n: i, source };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(err)?;
            let handle = rt.handle().clone();
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("metaguard-proxy-{i}"))
                .spawn(move || {
                    let _ = rt.block_on(stopped);
                })
                .map_err(err)?;
            self.workers.push(Worker {
                handle,
                stop: Some(stop),
                thread: Some(thread),
            });
        }
        Ok(())
    }
}

impl Drop for Server {
    /// Ends the workers — their runtimes drop every listener and
    /// connection — then writes the audit lines still buffered: every
    /// request answered has its line in the file when this returns.
    fn drop(&mut self) {
        for w in &mut self.workers {
            w.stop.take();
        }
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
        self.proxy.settings().audit.flush();
    }
}

/// Serves one copy of a listener until `close` fires or its sender is
/// dropped; `closed` is dropped after the socket.
async fn accept(
    proxy: Arc<Proxy>,
    sock: std::net::TcpListener,
    kind: Kind,
    close: oneshot::Receiver<()>,
    closed: mpsc::Sender<()>,
) {
    match tokio::net::TcpListener::from_std(sock) {
        Ok(listener) => {
            tokio::select! {
                () = proxy.serve(&listener, kind) => {}
                _ = close => {}
            }
            drop(listener);
        }
        Err(e) => warn!(error = %e, "proxy listener"),
    }
    drop(closed);
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use metaguard_core::Config;

    use super::*;
    use crate::{Caller, Directory, IdKind, Origin, Ownership, ProxyMetrics};

    fn l(addr: &str, kind: Kind) -> Listener {
        Listener {
            addr: addr.parse().expect("address"),
            kind,
        }
    }

    #[test]
    fn listener_sets_are_diffed_keeping_what_both_hold() {
        let relay = l("169.254.170.2:9470", Kind::Relay);
        let imds = l("169.254.169.254:9470", Kind::Imds);
        let moved = l("169.254.169.254:9471", Kind::Imds);
        let current = BTreeSet::from([relay, imds]);
        // imds_port changes: one closed, one opened, the relay untouched.
        let wanted = BTreeSet::from([relay, moved]);
        assert_eq!(
            diff(&current, &wanted),
            Change {
                open: vec![moved],
                close: vec![imds]
            }
        );
        // The same set: nothing to do.
        assert_eq!(diff(&current, &current), Change::default());
        // The last proxy action removed: everything closes.
        assert_eq!(
            diff(&current, &BTreeSet::new()),
            Change {
                open: vec![],
                close: vec![imds, relay]
            }
        );
        // The first one added: everything opens.
        assert_eq!(
            diff(&BTreeSet::new(), &current),
            Change {
                open: vec![imds, relay],
                close: vec![]
            }
        );
    }

    #[test]
    fn the_plan_names_relay_and_imds_listeners() {
        let plan = ProxyPlan {
            relay: vec!["169.254.170.2:9470".parse().expect("address")],
            imds: vec!["169.254.169.254:9470".parse().expect("address")],
            routes: Vec::new(),
        };
        assert_eq!(
            listeners(Some(&plan)),
            BTreeSet::from([
                l("169.254.170.2:9470", Kind::Relay),
                l("169.254.169.254:9470", Kind::Imds)
            ])
        );
        assert!(listeners(None).is_empty());
    }

    /// Every caller is the config's first workload.
    #[derive(Debug)]
    struct First;

    impl Directory for First {
        fn identify(&self, _: &Arc<Config>, _: Origin) -> Caller {
            Caller {
                workload: Some(0),
                origin: "test".into(),
                ..Caller::default()
            }
        }
        fn owner(&self, _: &Config, _: IdKind, _: &str) -> Ownership {
            Ownership::Unknown
        }
    }

    /// A free loopback port (bound, then released).
    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port")
    }

    fn settings(audit: &std::path::Path, rate: u32, burst: u32) -> Settings {
        let text = format!(
            "[proxy]\naudit_log = \"{}\"\nrate = {rate}\nburst = {burst}\n\n\
             [[workload]]\nname = \"w\"\nbridges = [\"docker0\"]\nimds = \"proxy\"\n",
            audit.display()
        );
        let c = Config::parse(&text, "test.toml").expect("valid config");
        Settings::new(Arc::new(c)).expect("settings")
    }

    /// A server on a free loopback port where every caller is the first
    /// workload (`settings(audit, rate, burst)`), counting into `registry`;
    /// `None` (said) without CAP_NET_ADMIN (the listeners are transparent
    /// sockets, IP_TRANSPARENT).
    fn serving(
        audit: &std::path::Path,
        rate: u32,
        burst: u32,
        registry: &prometheus::Registry,
    ) -> Option<(Server, Listener)> {
        let metrics = ProxyMetrics::new(registry).expect("metrics");
        let proxy = Proxy::new(Arc::new(First), metrics, settings(audit, rate, burst));
        let mut server = Server::new(proxy);
        let a = l(&format!("127.0.0.1:{}", free_port()), Kind::Imds);
        match server.prepare(&BTreeSet::from([a]), None) {
            Ok(p) => {
                server.commit(p);
                Some((server, a))
            }
            Err(e) if format!("{:?}", std::error::Error::source(&e)).contains("CAP_NET_ADMIN") => {
                eprintln!("skipped: {e}: needs CAP_NET_ADMIN");
                None
            }
            Err(e) => panic!("bind: {e}"),
        }
    }

    /// One request for a path the default IMDS policy denies (so nothing
    /// is forwarded); its status code, or `None` when not connected.
    fn status(addr: SocketAddr) -> Option<u16> {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(
            b"GET /latest/meta-data/iam/info HTTP/1.1\r\nHost: 169.254.169.254\r\n\
              Connection: close\r\n\r\n",
        )
        .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        out.get(9..12)?.parse().ok()
    }

    /// Audit lines in `p`, once the writer threads have had time to write
    /// what they buffered.
    fn lines(p: &std::path::Path) -> usize {
        std::thread::sleep(crate::audit::FLUSH_EVERY * 4);
        std::fs::read_to_string(p).map_or(0, |t| t.lines().count())
    }

    /// One whole answer from `s` (head and `content-length` bytes of
    /// body), and whether the end of the stream was already there when it
    /// had been read: the caller's next read returns 0 at once.
    fn answer_then_eof(s: &mut std::net::TcpStream) -> (String, bool) {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&got).into_owned();
            if let Some(end) = text.find("\r\n\r\n") {
                let len: usize = text
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap_or(0))
                    })
                    .unwrap_or(0);
                if got.len() >= end + 4 + len {
                    break;
                }
            }
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        let text = String::from_utf8_lossy(&got).into_owned();
        s.set_nonblocking(true).expect("nonblocking");
        let eof = matches!(s.read(&mut buf), Ok(0));
        s.set_nonblocking(false).expect("blocking");
        (text, eof)
    }

    /// The listeners `bind` makes pass TCP_NODELAY on to every accepted
    /// socket (the proxy no longer sets it per connection).
    #[test]
    fn accepted_sockets_inherit_the_listeners_nodelay() {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let listeners = match crate::bind(addr, 1) {
            Ok(l) => l,
            Err(e) if e.to_string().contains("CAP_NET_ADMIN") => {
                eprintln!("skipped: {e}");
                return;
            }
            Err(e) => panic!("bind: {e}"),
        };
        let listener = &listeners[0];
        listener.set_nonblocking(false).expect("blocking");
        let _client = std::net::TcpStream::connect(addr).expect("connect");
        let (accepted, _) = listener.accept().expect("accept");
        assert!(accepted.nodelay().expect("TCP_NODELAY"));
    }

    #[test]
    fn the_last_answer_carries_the_fin_and_keep_alive_answers_are_not_held() {
        let dir = std::env::temp_dir().join(format!("mg-proxy-fin-{}", std::process::id()));
        let registry = prometheus::Registry::new();
        let Some((server, a)) = serving(&dir.join("a.jsonl"), 1_000_000, 1_000_000, &registry)
        else {
            return;
        };
        const REQ: &[u8] = b"GET /latest/meta-data/iam/info HTTP/1.1\r\nHost: 169.254.169.254\r\n";
        // `Connection: close`, as SDKs ask IMDS: the FIN is in the answer's
        // last segment, so the caller has the end of the stream when it has
        // the answer and never closes first (no TIME_WAIT on its side).
        // Without the cork 68, 91 and 154 of 200 had it (three runs here).
        let rounds = 200;
        let mut eof_with_answer = 0;
        for _ in 0..rounds {
            let mut s = std::net::TcpStream::connect(a.addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
            s.write_all(&[REQ, b"Connection: close\r\n\r\n"].concat())
                .expect("write");
            let (text, eof) = answer_then_eof(&mut s);
            assert!(text.starts_with("HTTP/1.1 403"), "{text}");
            eof_with_answer += usize::from(eof);
        }
        assert_eq!(eof_with_answer, rounds, "answers whose FIN came with them");
        // Keep-alive: nothing is corked, each answer comes at once (a
        // corked one would wait for the kernel's 200 ms timer) and the
        // connection stays open.
        let mut s = std::net::TcpStream::connect(a.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        for _ in 0..5 {
            let t = std::time::Instant::now();
            s.write_all(&[REQ, b"\r\n"].concat()).expect("write");
            let (text, eof) = answer_then_eof(&mut s);
            assert!(text.starts_with("HTTP/1.1 403"), "{text}");
            assert!(!eof, "a keep-alive connection was closed");
            assert!(
                t.elapsed() < Duration::from_millis(150),
                "answer held {:?}",
                t.elapsed()
            );
        }
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn heads_hyper_refuses_are_answered_counted_and_audited() {
        let dir = std::env::temp_dir().join(format!("mg-proxy-head-{}", std::process::id()));
        let audit = dir.join("a.jsonl");
        let registry = prometheus::Registry::new();
        let Some((server, a)) = serving(&audit, 1_000_000, 1_000_000, &registry) else {
            return;
        };
        let send = |bytes: &[u8]| -> String {
            let mut s = std::net::TcpStream::connect(a.addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout");
            let _ = s.write_all(bytes);
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out);
            String::from_utf8_lossy(&out).into_owned()
        };
        // A header line without a colon; then a head over MAX_HEAD.
        let bad = send(
            b"GET /latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\nno colon here\r\n\r\n",
        );
        assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
        let big = format!(
            "GET /latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(crate::MAX_HEAD + 1024)
        );
        let big = send(big.as_bytes());
        assert!(big.starts_with("HTTP/1.1 431"), "{big}");
        // Audited as the proxy's own `invalid` answers, without a method or
        // path (what could not be read), and counted.
        std::thread::sleep(crate::audit::FLUSH_EVERY * 4);
        let text = std::fs::read_to_string(&audit).expect("audit log");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect();
        let statuses: Vec<u64> = lines
            .iter()
            .filter(|l| l["decision"] == "invalid" && l["method"].is_null() && l["path"].is_null())
            .filter_map(|l| l["status"].as_u64())
            .collect();
        assert_eq!(statuses, vec![400, 431], "{text}");
        assert!(
            lines
                .iter()
                .all(|l| l["rule"].as_str().is_some_and(|r| r.starts_with("http: "))),
            "{text}"
        );
        let counted: f64 = registry
            .gather()
            .iter()
            .filter(|f| f.name() == "metaguard_proxy_requests_total")
            .flat_map(|f| f.get_metric().iter())
            .filter(|m| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == "decision" && l.value() == "invalid")
            })
            .map(|m| m.get_counter().get_value())
            .sum();
        assert_eq!(counted, 2.0);
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_commit_swaps_settings_and_listeners_for_the_next_request() {
        let dir = std::env::temp_dir().join(format!("mg-proxy-server-{}", std::process::id()));
        let (audit_a, audit_b) = (dir.join("a.jsonl"), dir.join("b.jsonl"));
        let Some((mut server, a)) = serving(&audit_a, 40, 60, &prometheus::Registry::new()) else {
            return;
        };
        let b = l(&format!("127.0.0.1:{}", free_port()), Kind::Imds);
        for _ in 0..3 {
            assert_eq!(status(a.addr), Some(403), "denied by the path policy");
        }
        assert_eq!(lines(&audit_a), 3);

        // A new audit log and a bucket of 1; a moves to b.
        let p = server
            .prepare(&BTreeSet::from([b]), Some(settings(&audit_b, 1, 1)))
            .expect("bind b");
        assert_eq!(
            p.change(),
            Change {
                open: vec![b],
                close: vec![a]
            }
        );
        assert_eq!(status(a.addr), Some(403), "nothing in force changed yet");
        server.commit(p);
        assert_eq!(status(a.addr), None, "a is closed");
        assert_eq!(status(b.addr), Some(403), "the one token");
        assert_eq!(status(b.addr), Some(429), "throttled");
        assert_eq!((lines(&audit_a), lines(&audit_b)), (4, 2));
        assert_eq!(server.listening(), BTreeSet::from([b]));

        // A bind that fails changes nothing: b keeps serving.
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let c = l(&taken.local_addr().expect("addr").to_string(), Kind::Relay);
        let err = server
            .prepare(&BTreeSet::from([b, c]), Some(settings(&audit_a, 40, 60)))
            .expect_err("the port is taken");
        assert!(err.to_string().contains(&c.addr.to_string()), "{err}");
        assert!(matches!(status(b.addr), Some(403 | 429)));
        assert_eq!(
            (lines(&audit_a), lines(&audit_b)),
            (4, 3),
            "the old settings stay"
        );
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Every caller is the config's first workload, in container `c1`,
    /// owning credentials id `own-id`; `c1` is the task `web`.
    #[derive(Debug)]
    struct Observed;

    impl Directory for Observed {
        fn identify(&self, _: &Arc<Config>, _: Origin) -> Caller {
            Caller {
                workload: Some(0),
                container: Some("c1".into()),
                credentials_ids: vec!["own-id".into()],
                origin: "test".into(),
                ..Caller::default()
            }
        }
        fn owner(&self, _: &Config, _: IdKind, _: &str) -> Ownership {
            Ownership::Unknown
        }
        fn container_info(&self, id: &str) -> Option<metaguard_core::observe::ContainerInfo> {
            let labels = [(
                metaguard_core::observe::LABEL_TASK_FAMILY.to_string(),
                "web".to_string(),
            )];
            Some(
                metaguard_core::observe::ContainerInfo::new(
                    id,
                    "/app",
                    &labels.into_iter().collect(),
                )
                .with_image("public.ecr.aws/lab/web:1.0"),
            )
        }
    }

    /// A fake ECS agent: answers every request with credentials.
    fn fake_agent() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        std::thread::spawn(move || {
            for s in l.incoming().take(8) {
                let Ok(mut s) = s else { continue };
                let mut buf = [0u8; 4096];
                let _ = std::io::Read::read(&mut s, &mut buf);
                let body =
                    r#"{"AccessKeyId":"ASIAFAKE","SecretAccessKey":"secret","Token":"token"}"#;
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        addr
    }

    fn request(addr: SocketAddr, head: &str) -> Option<u16> {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(7))).ok()?;
        s.write_all(head.as_bytes()).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        out.get(9..12)?.parse().ok()
    }

    #[test]
    fn observed_requests_pass_and_are_recorded_without_their_secrets() {
        let dir = std::env::temp_dir().join(format!("mg-proxy-observe-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let agent = fake_agent();
        let text = format!(
            "mode = \"observe\"\n[agent]\ncredentials = \"{agent}\"\n\n\
             [[workload]]\nname = \"w\"\nbridges = [\"docker0\"]\nimds = \"deny\"\ntask_metadata = \"proxy\"\n"
        );
        let c = Config::parse(&text, "test.toml").expect("valid config");
        let log = Arc::new(
            crate::ObserveLog::open(&dir, crate::observe::Caps::default()).expect("observe log"),
        );
        let settings = Settings::new(Arc::new(c))
            .expect("settings")
            .with_observe(Some(log));
        let registry = prometheus::Registry::new();
        let metrics = ProxyMetrics::new(&registry).expect("metrics");
        let mut server = Server::new(Proxy::new(Arc::new(Observed), metrics, settings));
        let relay = l(&format!("127.0.0.1:{}", free_port()), Kind::Relay);
        let p = match server.prepare(&BTreeSet::from([relay]), None) {
            Ok(p) => p,
            Err(e) if format!("{:?}", std::error::Error::source(&e)).contains("CAP_NET_ADMIN") => {
                eprintln!("skipped: {e}: needs CAP_NET_ADMIN");
                return;
            }
            Err(e) => panic!("bind: {e}"),
        };
        server.commit(p);
        let get = |path: &str| {
            request(
                relay.addr,
                &format!("GET {path} HTTP/1.1\r\nHost: 169.254.170.2\r\nConnection: close\r\n\r\n"),
            )
        };
        // Own and foreign ids alike pass (observe decides as allow).
        assert_eq!(get("/v2/credentials/own-id"), Some(200));
        assert_eq!(get("/v2/credentials/other-id"), Some(200));
        let r = crate::observe::read(&dir, None).expect("read");
        assert_eq!(r.records.len(), 2, "{r:?}");
        let (own, other) = (&r.records[0], &r.records[1]);
        assert_eq!((own.own_id, other.own_id), (Some(true), Some(false)));
        assert_eq!(own.path, "/v2/credentials/own-…");
        assert_eq!(own.access_key_id.as_deref(), Some("ASIAFAKE"));
        assert_eq!(
            (own.service.as_str(), own.decision.as_str(), own.status),
            ("task_metadata", "allow", 200)
        );
        let c = own.container.as_ref().expect("container");
        assert_eq!(
            (
                c.name.as_str(),
                c.task_family.as_deref(),
                c.image.as_deref()
            ),
            ("app", Some("web"), Some("public.ecr.aws/lab/web:1.0"))
        );
        let all = std::fs::read_to_string(dir.join(crate::observe::CURRENT)).expect("log");
        assert!(!all.contains("secret") && !all.contains("own-id"), "{all}");
        let m = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .expect("metrics");
        assert!(
            m.contains("metaguard_observed_requests_total{decision=\"allow\",service=\"task_metadata\",version=\"none\",workload=\"w\"} 2"),
            "{m}"
        );
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
