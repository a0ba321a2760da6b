//! The metadata proxy benchmark (root only): requests/s, p50/p99 latency
//! and the proxy's CPU time per request for `GET
//! /latest/meta-data/instance-id`, with one load tool (wrk, Debian's
//! package, `--latency`) run from a bridge container's namespace, over one
//! lab, under three loads — one keep-alive connection (the latency a proxy
//! adds, no queueing), one request per new connection (`Connection:
//! close`, how SDKs talk to IMDS), and 32 connections (saturation) — for
//! each way to the IMDS emulator:
//!
//! * (a) direct: c2 → 169.254.169.254:80, routed like a real container's
//!   request (docker0 → the lab host, MASQUERADE → the vpc namespace, where
//!   the emulator listens on the metadata address); no metaguard rules are
//!   loaded;
//! * (b) metaguard's proxy, cache hit: `metaguard daemon` in the lab host,
//!   c1 proxied, selected by its namespace (see [`metaguard_variants`]);
//!   c1 → 169.254.169.254:80 → DNAT in c1 → 169.254.170.2:9470 → DNAT in
//!   the host to the IMDS proxy's
//!   listener on 169.254.169.254:9470 (policy route), with the IMDSv2 token
//!   the proxy issued to c1: answered from memory;
//! * (c) the same proxy, miss: no token (IMDSv1), so forwarded to the
//!   emulator every time;
//! * (d) nginx (Debian's binary, extracted by `scripts/common.sh`
//!   `ensure_nginx`) in the lab host namespace on 172.17.0.1:8081 (docker0's
//!   address, which c1 reaches on its own subnet), `proxy_pass` to
//!   169.254.169.254:80 with 32 keep-alive upstream connections and one
//!   JSON access-log line per request (metaguard writes an audit line),
//!   its upstream connections from 10.0.0.11 (`proxy_bind`; see
//!   [`NGINX_SOURCE`]);
//! * (e) the same nginx with `proxy_cache` (every `200` for an hour) on
//!   172.17.0.1:8083;
//! * (f) the floor ([`floor`]): a minimal tokio relay in the proxy's shape
//!   on 172.17.0.1:8082 that does only the network work of a proxy
//!   (upstream connections from 10.0.0.12, ended with a reset as
//!   metaguard's are) — what any tokio proxy pays, whatever else it does;
//! * (g) the same floor process answering every request from memory (a
//!   fixed `200`, on 172.17.0.1:8084): what any tokio server pays per
//!   answer, beside (b) and (e);
//! * (h) the nginx of (e) reached as an IMDS proxy must be: from c3 (its
//!   own namespace on docker0) to 169.254.169.254:80, one DNAT in the lab
//!   host to 172.17.0.1:8083 — what interception costs nginx, beside (b)'s
//!   DNATs;
//! * (i) and (j) (b) and (c) again while the daemon selects c1 by its
//!   bridge (`bridges = ["docker0"]`), as a Docker container is: c1 →
//!   169.254.169.254:80 → the bridge's mark → one DNAT in the host to the
//!   listener. (b) and (c) select c1 by its namespace (`netns = [c1]`, the
//!   path of an awsvpc task: a DNAT in c1 and another in the host). The
//!   bridge selection also takes c2 and c3, so it is in force only during
//!   (i)'s and (j)'s runs (`metaguard reload` before and after each, see
//!   [`select`]), and after each switch what c1's connections left in the
//!   kernel is forgotten ([`forget_c1_connections`]: one way's TIME_WAIT
//!   and conntrack state stalled the other way's new connections).
//!
//! Each round measures every variant once per load, in an order rotated
//! every round
//! (whatever runs last is measured warmer); ratios against (a) are taken
//! per round. `sudo cargo bench -p metaguard --bench proxy` runs 5 rounds ×
//! 3 s per variant and load (`METAGUARD_PROXY_BENCH_ROUNDS`, `…_SECS`,
//! `…_CONNECTIONS`, `…_THREADS` change that, bounded) and prints the
//! BENCHMARKS.md section (`METAGUARD_PROXY_BENCH_RAW=1` also prints every
//! wrk output; `METAGUARD_PROXY_BENCH_HOLD=SECS` keeps the lab up before
//! measuring, printing each variant's wrk command and pids, for profiling
//! by hand); it writes the `proxy` section only once (b) exists. Under
//! `cargo test` it runs one 1 s round as a smoke test.
//!
//! The emulator closes every connection (`Connection: close`, like IMDS):
//! (a) pays a TCP handshake per request from c1 through the host's NAT,
//! while wrk keeps its connections to a proxy alive and the proxy makes the
//! new connection from the host — so a proxy can beat (a).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use metaguard_lab::daemon::Daemon;
use metaguard_lab::loadgen::{self, Nginx, WrkResult};
use metaguard_lab::topology::{addr, Role};
use metaguard_lab::{Lab, LabError, LabOptions};

mod common;
#[path = "proxy/floor.rs"]
mod floor;

use common::stats;

/// The resource every variant requests.
const PATH: &str = "/latest/meta-data/instance-id";
/// Where nginx listens: docker0's address in the lab host.
const NGINX_PORT: u16 = 8081;
/// Where the floor relay (f) listens, on the same address.
const FLOOR_PORT: u16 = 8082;
/// Where nginx with `proxy_cache` (e) listens.
const NGINX_CACHE_PORT: u16 = 8083;
/// Where the floor answering from memory (g) listens.
const FLOOR_MEMORY_PORT: u16 = 8084;
/// The lab host addresses nginx's and the floor relay's upstream
/// connections come from (`proxy_bind`; the floor binds likewise), beside
/// metaguard's, which come from the host's own 10.0.0.10. A client that
/// closes first keeps a TIME_WAIT socket for 60 s, and `connect()` walks
/// every one with the same source and destination when it picks a port: in
/// one address the proxies paid for each other's. nginx leaves thousands
/// per run (it often closes before the emulator's FIN is in); with 14,000
/// of them, 63 % of metaguard's proxy's samples were that search (`perf`:
/// `__inet_hash_connect`, `__inet_check_established`, `tcp_twsk_unique`),
/// and once they filled the half of the ports `connect()` tries first,
/// nginx's own throughput fell from ~12,000 to 3,453 and then 1,647
/// requests/s. Each proxy now pays for its own, as the only IMDS client of
/// a host does.
const NGINX_SOURCE: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 11);
const FLOOR_SOURCE: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 12);
/// How long the floor relay gets to accept connections once started.
const FLOOR_READY: Duration = Duration::from_secs(5);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some(floor::ARG) {
        let addr = |i: usize| -> Result<SocketAddr, String> {
            let a = args
                .get(i)
                .ok_or(format!("{} LISTEN UPSTREAM|memory SOURCE", floor::ARG))?;
            a.parse().map_err(|e| format!("{a:?}: {e}"))
        };
        let result = addr(2).and_then(|listen| {
            let upstream = match args.get(3).map(String::as_str) {
                Some("memory") => None,
                _ => Some(addr(3)?),
            };
            let source = match args.get(4) {
                Some(a) => a.parse().map_err(|e| format!("source {a:?}: {e}"))?,
                None => return Err(format!("{} LISTEN UPSTREAM|memory SOURCE", floor::ARG)),
            };
            floor::run(listen, upstream, source)
                .map_err(|e| format!("floor relay on {listen}: {e}"))
        });
        if let Err(e) = result {
            eprintln!("{e}");
        }
        std::process::exit(1);
    }
    let full = std::env::args().any(|a| a == "--bench");
    if !metaguard_sys::process::is_root() {
        println!("proxy bench skipped: needs root (network namespaces)");
        return;
    }
    let required = full || std::env::var_os("METAGUARD_REQUIRE_ROOT").is_some_and(|v| v == "1");
    let missing = match (
        metaguard_lab::cmd::find_tool("wrk"),
        loadgen::nginx_binary(),
    ) {
        (None, _) => {
            Some("wrk is not installed (apt-get install wrk; ./scripts/test does it)".to_string())
        }
        (_, Err(e)) => Some(e.to_string()),
        _ => None,
    };
    if let Some(why) = missing {
        if !required {
            println!("proxy bench skipped: {why}");
            return;
        }
        eprintln!("proxy bench failed: {why}");
        std::process::exit(1);
    }
    if let Err(e) = run(full) {
        eprintln!("proxy bench failed: {e}");
        std::process::exit(1);
    }
}

/// One way from c1 to the IMDS emulator.
struct Variant {
    /// Row label in the tables.
    label: String,
    /// The lab namespace wrk runs in.
    from: String,
    url: String,
    headers: Vec<(String, String)>,
    /// The proxy, kept running while the variant lives (stopped when it is
    /// dropped); none for direct.
    proxy: Option<Box<dyn Proxy>>,
    /// Run before and after each of this variant's wrk runs (after also when
    /// the run failed): e.g. load and remove rules that would otherwise
    /// also catch the other variants' requests.
    before: Option<Hook>,
    after: Option<Hook>,
    /// Answers from memory: its requests do not reach the emulator.
    cached: bool,
    /// The lab host address its upstream connections come from, when it
    /// forwards: its TIME_WAIT sockets towards IMDS are counted there.
    source: Option<Ipv4Addr>,
}

type Hook = Box<dyn Fn(&Lab) -> Result<(), String>>;

/// A running proxy: a guard that stops it on drop, and its processes.
trait Proxy {
    /// Its processes now, for the memory figures.
    fn pids(&self) -> Vec<u32>;
}

impl Proxy for Nginx {
    fn pids(&self) -> Vec<u32> {
        Nginx::pids(self)
    }
}

/// (b) and (c) metaguard's IMDS proxy: `metaguard daemon` in the lab host
/// with c1's namespace as a proxied workload (`netns = [c1]`, `imds =
/// "proxy"`, rate limits lifted so the load is not throttled), so c1's
/// request to 169.254.169.254:80 is DNATed in c1's namespace to
/// 169.254.170.2:9470 and in the host to the IMDS proxy's listener on
/// 169.254.169.254:9470, identified by its bridge port and checked
/// against the default path policy. (b) sends the IMDSv2 token c1 got from
/// the proxy: the instance id is answered from memory (docs/proxy.md);
/// (c) sends none (IMDSv1): forwarded to the emulator every time, as every
/// cache miss is. One daemon serves both. (a) runs from c2, which no
/// workload selects: the same path to the emulator, untouched.
fn metaguard_variants(lab: &Lab) -> Option<Result<[Variant; 4], String>> {
    Some(start_daemon(lab).and_then(|d| {
        let token = lab
            .run_in(
                Role::C1,
                "curl",
                &[
                    "-sf",
                    "-m",
                    "3",
                    "-X",
                    "PUT",
                    "-H",
                    "X-aws-ec2-metadata-token-ttl-seconds: 21600",
                    &Lab::imds_url_v4("/latest/api/token"),
                ],
            )
            .map_err(|e| format!("an IMDSv2 token from the proxy: {e}"))?;
        let pid = d.pid();
        let hit = Variant {
            label: "(b) metaguard, cache hit (169.254.169.254:9470)".to_string(),
            from: lab.netns_name(Role::C1),
            url: Lab::imds_url_v4(PATH),
            headers: vec![(
                "X-aws-ec2-metadata-token".to_string(),
                token.trim().to_string(),
            )],
            proxy: Some(Box::new(d)),
            before: None,
            after: None,
            cached: true,
            source: None,
        };
        let miss = Variant {
            label: "(c) metaguard, miss: forwarded (169.254.169.254:9470)".to_string(),
            from: lab.netns_name(Role::C1),
            url: Lab::imds_url_v4(PATH),
            headers: Vec::new(),
            proxy: Some(Box::new(SamePids(vec![u32::try_from(pid).unwrap_or(0)]))),
            before: None,
            after: None,
            cached: false,
            source: Some(addr::HOST_V4),
        };
        // (i) and (j): the same requests while c1 is selected by its
        // bridge, as a Docker container on docker0 is: one DNAT, in the
        // host. Only for their runs (hooks), since that selects c2 and c3
        // too, whose (a) and (h) must stay untouched.
        let by_bridge = |label: &str, v: &Variant| Variant {
            label: label.to_string(),
            from: v.from.clone(),
            url: v.url.clone(),
            headers: v.headers.clone(),
            proxy: Some(Box::new(SamePids(vec![u32::try_from(pid).unwrap_or(0)]))),
            // The daemon's own work after a reload (re-identifying
            // callers, following containers) is left a moment to end
            // before wrk starts.
            before: Some(Box::new(|lab: &Lab| {
                select(lab, Selection::Bridge)?;
                std::thread::sleep(Duration::from_millis(500));
                Ok(())
            })),
            after: Some(Box::new(|lab: &Lab| select(lab, Selection::Namespace))),
            cached: v.cached,
            source: v.source,
        };
        let bridge_hit = by_bridge(
            "(i) metaguard, cache hit, c1 selected by its bridge (169.254.169.254:9470)",
            &hit,
        );
        let bridge_miss = by_bridge(
            "(j) metaguard, miss, c1 selected by its bridge (169.254.169.254:9470)",
            &miss,
        );
        Ok([hit, miss, bridge_hit, bridge_miss])
    }))
}

/// A proxy some other variant runs: its pids, for the CPU figures.
struct SamePids(Vec<u32>);

impl Proxy for SamePids {
    fn pids(&self) -> Vec<u32> {
        self.0.clone()
    }
}

impl Proxy for Daemon {
    fn pids(&self) -> Vec<u32> {
        u32::try_from(self.pid()).into_iter().collect()
    }
}

/// How the bench's workload selects c1.
#[derive(Debug, Clone, Copy)]
enum Selection {
    /// `netns = [c1]`: the path of a task namespace — a DNAT in c1's own
    /// namespace to 169.254.170.2:9470, then the host's DNAT. (b), (c),
    /// and every other variant's runs (c2 and c3 untouched).
    Namespace,
    /// `bridges = ["docker0"]`: a Docker container's — one DNAT, in the
    /// host. (i) and (j); it selects c2 and c3 as well.
    Bridge,
}

/// The daemon's config for `selection` (rate limits lifted, so that the
/// load is not throttled), written to the lab's `bench-proxy.toml`.
fn write_policy(lab: &Lab, selection: Selection) -> Result<PathBuf, String> {
    let c1 =
        std::path::Path::new(metaguard_sys::netns::NETNS_RUN_DIR).join(lab.netns_name(Role::C1));
    let selector = match selection {
        Selection::Namespace => format!("netns = [\"{}\"]", c1.display()),
        Selection::Bridge => "bridges = [\"docker0\"]".to_string(),
    };
    let policy = format!(
        "[proxy]\nrate = 1000000\nburst = 1000000\nmax_connections = 100000\naudit_log = \"{}\"\n\n\
         [[workload]]\nname = \"bench\"\n{selector}\nimds = \"proxy\"\n",
        lab.work_dir().join("audit.jsonl").display(),
    );
    lab.write_file("bench-proxy.toml", &policy)
        .map_err(|e| e.to_string())
}

fn start_daemon(lab: &Lab) -> Result<Daemon, String> {
    let path = write_policy(lab, Selection::Namespace)?;
    Daemon::start(lab, &path.display().to_string(), &[]).map_err(|e| e.to_string())
}

/// Has the running daemon select c1 as `selection` says (`metaguard
/// reload`, which returns once the new rules are in), then forgets what
/// c1's connections the other way left ([`forget_c1_connections`]). The
/// same workload name either way, so c1's IMDSv2 token stays valid (bound
/// to the workload and c1's bridge port, docs/proxy.md).
fn select(lab: &Lab, selection: Selection) -> Result<(), String> {
    let path = write_policy(lab, selection)?.display().to_string();
    let out = lab
        .metaguard(&["reload", "--config", &path, "--timeout", "30"])
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "metaguard reload ({selection:?}): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    forget_c1_connections(lab)
}

/// Forgets what c1's earlier connections left in the kernel — the
/// conntrack entries in c1 and, for c1's flows, in the lab host, and the
/// lab host's TIME_WAIT sockets towards c1 — after each change of c1's
/// selection, as on a host where c1 had always been selected this way.
///
/// Left in place, the state of one way in met the connections of the
/// other for two minutes: with `Connection: close` (c1 opening a
/// connection per request and the proxy closing first) c1's ports came
/// round within seconds, and SYNs met the host's TIME_WAIT sockets of the
/// other way's connections, where PAWS dropped them (`TcpExtPAWSTimewait`
/// in the lab host, one per `TcpExtTCPSynRetrans` in c1): a 1-s stall
/// each. Measured in a held lab, 2-s runs from c1 after switching ways:
/// 5 to 5,125 requests, with 1 to 69 SYN retransmits each, against
/// 6,583–11,027 with this step, whose runs retransmitted none; in a
/// 3-round run of the bench before it, (i)'s and (j)'s `Connection:
/// close` rows read 12–4,209 requests/s beside (b)'s 5,840–16,670, with
/// 45 SYN retransmits from c1. Either way on its own, runs after runs,
/// retransmitted none. Neither conntrack flush nor the TIME_WAIT sockets'
/// removal alone was enough.
fn forget_c1_connections(lab: &Lab) -> Result<(), String> {
    let c1 = addr::C1_V4.to_string();
    for (role, args) in [
        (Role::C1, vec!["-D", "-p", "tcp"]),
        (Role::Host, vec!["-D", "-p", "tcp", "-s", c1.as_str()]),
    ] {
        match lab.run_in(role, "conntrack", &args) {
            // It exits 1 when nothing matched.
            Err(LabError::Command { stderr, .. }) if stderr.contains(" 0 flow entries") => {}
            Err(e) => return Err(format!("forgetting c1's connections: {e}")),
            Ok(_) => {}
        }
    }
    lab.run_in(Role::Host, "ss", &["-K", "state", "time-wait", "dst", &c1])
        .map(drop)
        .map_err(|e| format!("forgetting c1's connections: {e}"))
}

/// (a) straight to the emulator from c2 (which no workload selects).
fn direct_variant(lab: &Lab) -> Variant {
    Variant {
        label: format!("(a) direct → {}:80", addr::IMDS_V4),
        from: lab.netns_name(Role::C2),
        url: Lab::imds_url_v4(PATH),
        headers: Vec::new(),
        proxy: None,
        before: None,
        after: None,
        cached: false,
        source: None,
    }
}

/// (f) the floor relay ([`floor`]) and (g): this binary again, in the lab host's
/// namespace on docker0's address, relaying to the emulator; killed and
/// reaped on drop.
struct FloorRelay(loadgen::Reaped);

impl Proxy for FloorRelay {
    fn pids(&self) -> Vec<u32> {
        vec![self.0 .0.id()]
    }
}

/// (f) the floor relay, or (g) the same process answering from memory.
fn floor_variant(lab: &Lab, memory: bool) -> Result<Variant, String> {
    let port = if memory {
        FLOOR_MEMORY_PORT
    } else {
        FLOOR_PORT
    };
    let listen = SocketAddr::new(addr::DOCKER0_V4.into(), port);
    let ns = lab.netns(Role::Host);
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut command = std::process::Command::new(exe);
    command
        .arg(floor::ARG)
        .arg(listen.to_string())
        .arg(if memory {
            "memory".to_string()
        } else {
            format!("{}:80", addr::IMDS_V4)
        })
        .arg(FLOOR_SOURCE.to_string())
        .stdin(std::process::Stdio::null());
    ns.command(&mut command).map_err(|e| e.to_string())?;
    let mut relay = FloorRelay(loadgen::Reaped(
        command
            .spawn()
            .map_err(|e| format!("starting the floor relay: {e}"))?,
    ));
    loadgen::wait_accepting(ns, listen, &mut relay.0 .0, FLOOR_READY, || true).map_err(
        |e| match e {
            loadgen::NotReady::Exited(status) => format!("the floor relay exited ({status})"),
            loadgen::NotReady::TimedOut => {
                format!("the floor relay does not accept on {listen} after {FLOOR_READY:?}")
            }
            loadgen::NotReady::Lab(e) => e.to_string(),
        },
    )?;
    Ok(Variant {
        label: if memory {
            format!("(g) floor: minimal tokio server answering from memory ({listen})")
        } else {
            format!("(f) floor: minimal tokio relay ({listen})")
        },
        from: lab.netns_name(Role::C1),
        url: format!("http://{listen}{PATH}"),
        headers: Vec::new(),
        proxy: Some(Box::new(relay)),
        before: None,
        after: None,
        cached: memory,
        source: (!memory).then_some(FLOOR_SOURCE),
    })
}

/// c3's address on docker0: the namespace (h) runs from.
const C3_V4: &str = "172.17.0.60";

/// (h) the nginx of (e), reached the way an IMDS proxy must be: c3 asks
/// 169.254.169.254:80 and one DNAT in the lab host (prerouting, by c3's
/// address, as a `DOCKER-USER`-style rule would) sends it to nginx's
/// 172.17.0.1:8083 — where (e) is addressed directly, which no proxy of
/// the metadata service can be. c3 is its own namespace on docker0, so its
/// TIME_WAIT sockets towards 169.254.169.254:80 are not (a)'s (c2's) or
/// (b)'s and (c)'s (c1's): a caller whose own port search walks them pays
/// for them in `connect()`.
fn nginx_intercepted_variant(lab: &mut Lab, nginx_cache: Vec<u32>) -> Result<Variant, String> {
    let from = lab
        .add_docker0_netns("c3", "vethc3", C3_V4)
        .map_err(|e| e.to_string())?;
    let dnat = format!("{}:{NGINX_CACHE_PORT}", addr::DOCKER0_V4);
    let imds = addr::IMDS_V4.to_string();
    for cmd in [
        vec!["add", "table", "ip", "mgbench"],
        vec![
            "add",
            "chain",
            "ip",
            "mgbench",
            "pre",
            "{ type nat hook prerouting priority dstnat ; policy accept ; }",
        ],
        vec![
            "add", "rule", "ip", "mgbench", "pre", "ip", "saddr", C3_V4, "ip", "daddr", &imds,
            "tcp", "dport", "80", "dnat", "to", &dnat,
        ],
    ] {
        lab.run_in(Role::Host, "nft", &cmd)
            .map_err(|e| format!("(h)'s DNAT: {e}"))?;
    }
    Ok(Variant {
        label: format!(
            "(h) nginx `proxy_cache` behind a DNAT ({}:80 → {dnat})",
            addr::IMDS_V4
        ),
        from,
        url: Lab::imds_url_v4(PATH),
        headers: Vec::new(),
        proxy: Some(Box::new(SamePids(nginx_cache))),
        before: None,
        after: None,
        cached: true,
        source: None,
    })
}

/// (d) nginx in the lab host, proxying to the emulator; (e) the same with
/// `proxy_cache` (every `200` kept for an hour) on another port.
fn nginx_variant(lab: &Lab, cache: bool) -> Result<Variant, String> {
    let (port, dir) = if cache {
        (NGINX_CACHE_PORT, "nginx-cache")
    } else {
        (NGINX_PORT, "nginx")
    };
    let listen = SocketAddr::new(addr::DOCKER0_V4.into(), port);
    let nginx = Nginx::start_with(
        &lab.netns_name(Role::Host),
        listen,
        &format!("{}:80", addr::IMDS_V4),
        &lab.work_dir().join(dir),
        cache,
        Some(NGINX_SOURCE.into()),
    )
    .map_err(|e| e.to_string())?;
    Ok(Variant {
        label: if cache {
            format!("(e) nginx `proxy_cache` ({listen})")
        } else {
            format!("(d) nginx `proxy_pass` ({listen})")
        },
        from: lab.netns_name(Role::C1),
        url: format!("http://{listen}{PATH}"),
        headers: Vec::new(),
        proxy: Some(Box::new(nginx)),
        before: None,
        after: None,
        cached: cache,
        source: (!cache).then_some(NGINX_SOURCE),
    })
}

/// A bounded setting from the environment.
fn setting(name: &str, default: u32, max: u32) -> Result<u32, String> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(v) => match v.trim().parse::<u32>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(format!("{name}={v:?}: want a whole number from 1 to {max}")),
        },
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The figures compared: name, decimals, unit.
const METRICS: [(&str, usize, &str); 3] = [
    ("requests/s", 0, ""),
    ("p50 latency", 3, " ms"),
    ("p99 latency", 3, " ms"),
];

/// One run's figures, indexed like [`METRICS`].
fn metrics(r: &WrkResult) -> [f64; 3] {
    [r.requests_per_sec, ms(r.p50), ms(r.p99)]
}

/// A load: wrk's connections and threads.
#[derive(Debug, Clone, Copy)]
struct Load {
    conns: u32,
    threads: u32,
    /// Sends `Connection: close`: a new connection to the proxy for every
    /// request, as SDKs make to IMDS (which closes every connection).
    close: bool,
    /// What it measures, for the tables.
    what: &'static str,
}

/// What one variant collected over the rounds under one load.
#[derive(Default)]
struct Series {
    /// Per round, indexed like [`METRICS`].
    values: [Vec<f64>; 3],
    /// The proxy's CPU time (all its processes) per request, µs, per round.
    cpu_us: Vec<f64>,
    /// The caller's (wrk's) CPU time per request, µs, per round.
    client_us: Vec<f64>,
    /// TIME_WAIT sockets towards IMDS from the variant's source address
    /// after each of its runs (forwarding variants only).
    time_wait: Vec<f64>,
    /// Per round, against (a)'s figures of the same round: ratios indexed
    /// like [`METRICS`], added p50 and p99 (ms), requests/s over nginx's.
    ratios: [Vec<f64>; 3],
    added_ms: [Vec<f64>; 2],
    /// requests/s over (d)'s (nginx `proxy_pass`) and over (e)'s
    /// (`proxy_cache`), per round.
    over_d: Vec<f64>,
    over_e: Vec<f64>,
    /// requests/s over (h)'s (the same nginx behind a DNAT), per round.
    over_h: Vec<f64>,
    requests: u64,
    non_2xx: u64,
    socket_errors: u64,
    forwarded_for: usize,
    /// SYN retransmits in the caller's namespace during the runs.
    syn_retransmits: u64,
}

/// Set by Ctrl-C: the bench stops before its next wrk run (or its hold)
/// and returns, so every variant's proxy, nginx and the lab are removed by
/// their drops — a process exit from the handler would leave the daemon
/// and nginx running.
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn interrupted() -> Result<(), String> {
    if INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed) {
        return Err("interrupted (Ctrl-C): lab and proxies removed".into());
    }
    Ok(())
}

/// One wrk run of `v` under `load`; checks that its requests reached the
/// emulator. Also returns the proxy's CPU seconds over the run.
/// One wrk run of `v`: its result, the proxy's CPU seconds over it, and
/// the TIME_WAIT sockets towards IMDS from the variant's source address
/// after it (when it forwards).
fn measure(
    lab: &Lab,
    v: &Variant,
    secs: u32,
    load: Load,
) -> Result<(WrkResult, f64, Option<usize>), String> {
    interrupted()?;
    let log = lab.imds().log();
    log.clear();
    let mut headers: Vec<(&str, &str)> = v
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    if load.close {
        headers.push(("Connection", "close"));
    }
    if let Some(before) = &v.before {
        before(lab).map_err(|e| format!("{}: before the run: {e}", v.label))?;
    }
    let cpu = || -> f64 {
        v.proxy.as_ref().map_or(0.0, |p| {
            p.pids().into_iter().filter_map(loadgen::cpu_seconds).sum()
        })
    };
    let cpu_before = cpu();
    let r = loadgen::wrk(
        &v.from,
        &v.url,
        load.conns,
        load.threads,
        Duration::from_secs(secs.into()),
        &headers,
    )
    .map_err(|e| format!("{}: {e}", v.label));
    let cpu_used = cpu() - cpu_before;
    if let Some(after) = &v.after {
        after(lab).map_err(|e| format!("{}: after the run: {e}", v.label))?;
    }
    let r = r?;
    let time_wait = match v.source {
        Some(source) => Some(time_wait(lab, source)?),
        None => None,
    };
    if std::env::var_os("METAGUARD_PROXY_BENCH_RAW").is_some() {
        eprintln!("--- {} ---\n{}", v.label, r.raw);
    }
    let seen = log.len() as u64;
    if r.requests == 0 || (!v.cached && seen < r.requests) {
        return Err(format!(
            "{}: wrk completed {} requests, the emulator answered {seen}:\n{}",
            v.label, r.requests, r.raw
        ));
    }
    Ok((r, cpu_used, time_wait))
}

/// TIME_WAIT sockets in the lab host from `source` to IMDS's port 80.
fn time_wait(lab: &Lab, source: Ipv4Addr) -> Result<usize, String> {
    let out = lab
        .run_in(
            Role::Host,
            "ss",
            &[
                "-Htan",
                "state",
                "time-wait",
                "src",
                &source.to_string(),
                "dst",
                &format!("{}:80", addr::IMDS_V4),
            ],
        )
        .map_err(|e| format!("counting TIME_WAIT from {source}: {e}"))?;
    Ok(out.lines().filter(|l| !l.trim().is_empty()).count())
}

/// A table row of min / median / max.
fn row(label: &str, values: &[f64], prec: usize, unit: &str) -> String {
    let st = stats(values.to_vec());
    format!(
        "| {label} | {:.prec$}{unit} | {:.prec$}{unit} | {:.prec$}{unit} |\n",
        st.min, st.median, st.max
    )
}

/// `METAGUARD_PROXY_BENCH_HOLD=SECS` (at most 1800): before measuring,
/// print each variant's namespace, URL, headers and pids, and keep the lab
/// up that long, for profiling one variant by hand (`ip netns exec NS wrk
/// …`, `perf record -p PID`, `strace -p PID`). Ctrl-C ends it and the lab
/// is removed as always.
fn hold(variants: &[Variant]) -> Result<(), String> {
    let secs = setting("METAGUARD_PROXY_BENCH_HOLD", 0, 1800)?;
    if secs == 0 {
        return Ok(());
    }
    for v in variants {
        let headers: Vec<String> = v
            .headers
            .iter()
            .map(|(k, val)| format!("-H '{k}: {val}'"))
            .collect();
        eprintln!(
            "{}\n  ip netns exec {} wrk -t1 -c1 -d3s --latency {} {}\n  pids {:?}",
            v.label,
            v.from,
            headers.join(" "),
            v.url,
            v.proxy.as_ref().map(|p| p.pids()).unwrap_or_default()
        );
    }
    eprintln!("holding the lab for {secs} s (METAGUARD_PROXY_BENCH_HOLD; Ctrl-C ends it)");
    let end = std::time::Instant::now() + Duration::from_secs(secs as u64);
    while std::time::Instant::now() < end {
        interrupted()?;
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// The short name of a variant: "(b)".
fn short(v: &Variant) -> &str {
    v.label.split(' ').next().unwrap_or("")
}

fn run(full: bool) -> Result<(), String> {
    let rounds = if full {
        setting("METAGUARD_PROXY_BENCH_ROUNDS", 5, 20)?
    } else {
        1
    };
    let secs = if full {
        setting("METAGUARD_PROXY_BENCH_SECS", 3, 10)?
    } else {
        1
    };
    let conns = setting("METAGUARD_PROXY_BENCH_CONNECTIONS", 32, 1000)?;
    let threads = setting("METAGUARD_PROXY_BENCH_THREADS", 2, 16)?.min(conns);
    let loads = [
        Load {
            conns: 1,
            threads: 1,
            close: false,
            what: "one connection, one request at a time: the latency a proxy adds, no queueing",
        },
        Load {
            conns: 1,
            threads: 1,
            close: true,
            what: "one request at a time, each on a new connection (`Connection: close`, as SDKs talk to IMDS): adds the proxy's accept and caller identification",
        },
        Load {
            conns,
            threads,
            close: false,
            what: "saturation: throughput, and latency including queueing on the shared CPUs",
        },
    ];

    let _ = ctrlc::set_handler(|| INTERRUPTED.store(true, std::sync::atomic::Ordering::Relaxed));
    let exe = PathBuf::from(env!("CARGO_BIN_EXE_metaguard"));
    // Declared first, dropped last: the variants' proxies stop before the
    // lab's namespaces go.
    let mut lab = Lab::start(LabOptions::new(exe)).map_err(|e| e.to_string())?;
    // The proxy identifies c1 through the (fake) Docker API's containers.
    lab.start_docker_api().map_err(|e| e.to_string())?;
    // The emulator closes every connection first (`Connection: close`), so
    // its namespace keeps one TIME_WAIT socket per request for 60 s. (a)'s
    // connections (c1, masqueraded to 10.0.0.10) and the proxies' (the lab
    // host, 10.0.0.10) then reuse each other's 4-tuples, and a SYN whose
    // TCP timestamps — offset per address pair, so unrelated between c1 and
    // the host — are older than the TIME_WAIT's is dropped by PAWS: a 1 s
    // SYN retransmit, always for the variant with the lower offset (nginx's
    // p99 was 1.02 s in every round). An artefact of the emulator being a
    // Linux socket: no TIME_WAIT in its namespace.
    lab.run_in(
        Role::Vpc,
        "sysctl",
        &["-q", "-w", "net.ipv4.tcp_max_tw_buckets=0"],
    )
    .map_err(|e| e.to_string())?;
    // (a)'s caller keeps no TIME_WAIT either. wrk reads an answer and
    // closes, often before the emulator's FIN is in, so c2 kept a minute
    // of TIME_WAIT for up to half of (a)'s requests (6,600 in one 3-s run
    // on one connection); once ~14,100 of them filled the half of the
    // ephemeral ports `connect()` tries first, (a) fell from ~11,400 to
    // ~550 requests/s, in some rounds and not others (its 32-connection
    // medians were 536 to 11,120 across runs). The baseline measured
    // port exhaustion, not going direct; the goals compare against it.
    lab.run_in(
        Role::C2,
        "sysctl",
        &["-q", "-w", "net.ipv4.tcp_max_tw_buckets=0"],
    )
    .map_err(|e| e.to_string())?;
    // nginx's and the floor's upstream source addresses (see NGINX_SOURCE).
    for source in [NGINX_SOURCE, FLOOR_SOURCE] {
        lab.run_in(
            Role::Host,
            "ip",
            &["addr", "add", &format!("{source}/24"), "dev", "eth0"],
        )
        .map_err(|e| e.to_string())?;
    }
    let mut variants = vec![direct_variant(&lab)];
    let mut by_bridge = Vec::new();
    let with_metaguard = match metaguard_variants(&lab) {
        Some(v) => {
            let [hit, miss, bridge_hit, bridge_miss] = v?;
            variants.push(hit);
            variants.push(miss);
            by_bridge = vec![bridge_hit, bridge_miss];
            true
        }
        None => false,
    };
    variants.push(nginx_variant(&lab, false)?);
    let nginx = variants.len() - 1;
    variants.push(nginx_variant(&lab, true)?);
    let nginx_cache = variants.len() - 1;
    variants.push(floor_variant(&lab, false)?);
    variants.push(floor_variant(&lab, true)?);
    let cache_pids = variants[nginx_cache]
        .proxy
        .as_ref()
        .map_or(Vec::new(), |p| p.pids());
    variants.push(nginx_intercepted_variant(&mut lab, cache_pids)?);
    let intercepted = variants.len() - 1;
    // (i) and (j), last: their rows follow the others'.
    let bridge_hit = variants.len();
    variants.extend(by_bridge);

    hold(&variants)?;
    if full {
        // Warm-up (not counted): connections, caches, nginx's workers.
        for v in &variants {
            measure(&lab, v, 1, loads[2])?;
        }
    }
    // series[load][variant]
    let mut series: Vec<Vec<Series>> = loads
        .iter()
        .map(|_| variants.iter().map(|_| Series::default()).collect())
        .collect();
    for round in 0..rounds as usize {
        for (l, load) in loads.iter().enumerate() {
            let mut results: Vec<Option<WrkResult>> = variants.iter().map(|_| None).collect();
            for k in 0..variants.len() {
                let i = (round + k) % variants.len();
                let syn_before = lab.nstat_named(&variants[i].from, "TcpExtTCPSynRetrans");
                let (r, cpu, tw) = measure(&lab, &variants[i], secs, *load)?;
                let syn_after = lab.nstat_named(&variants[i].from, "TcpExtTCPSynRetrans");
                let s = &mut series[l][i];
                if let (Ok(a), Ok(b)) = (syn_before, syn_after) {
                    s.syn_retransmits += b.saturating_sub(a);
                }
                s.forwarded_for += lab
                    .imds()
                    .log()
                    .entries()
                    .iter()
                    .filter(|e| e.header("x-forwarded-for").is_some())
                    .count();
                for (m, value) in metrics(&r).into_iter().enumerate() {
                    s.values[m].push(value);
                }
                if variants[i].proxy.is_some() && r.requests > 0 {
                    s.cpu_us.push(cpu * 1e6 / r.requests as f64);
                }
                if let Some(tw) = tw {
                    s.time_wait.push(tw as f64);
                }
                if r.requests > 0 && !r.client_cpu.is_zero() {
                    s.client_us
                        .push(r.client_cpu.as_secs_f64() * 1e6 / r.requests as f64);
                }
                s.requests += r.requests;
                s.non_2xx += r.non_2xx_3xx;
                s.socket_errors += r.socket_errors.total();
                results[i] = Some(r);
            }
            lab.imds().log().clear();
            let Some(Some(direct)) = results.first() else {
                continue;
            };
            for (i, r) in results.iter().enumerate().skip(1) {
                let Some(r) = r else { continue };
                let s = &mut series[l][i];
                for (m, (value, base)) in metrics(r).into_iter().zip(metrics(direct)).enumerate() {
                    s.ratios[m].push(value / base);
                }
                s.added_ms[0].push(ms(r.p50) - ms(direct.p50));
                s.added_ms[1].push(ms(r.p99) - ms(direct.p99));
                if let (true, Some(d)) = (i != nginx, &results[nginx]) {
                    s.over_d.push(r.requests_per_sec / d.requests_per_sec);
                }
                if let (true, Some(e)) = (i != nginx_cache, &results[nginx_cache]) {
                    s.over_e.push(r.requests_per_sec / e.requests_per_sec);
                }
                if let (true, Some(h)) = (i != intercepted, &results[intercepted]) {
                    s.over_h.push(r.requests_per_sec / h.requests_per_sec);
                }
            }
        }
    }
    for (v, s) in series
        .iter()
        .flat_map(|per_load| variants.iter().zip(per_load))
    {
        if s.non_2xx > 0 {
            return Err(format!(
                "{}: {} responses were not 2xx/3xx",
                v.label, s.non_2xx
            ));
        }
    }

    let mut report = String::new();
    if with_metaguard {
        // The goals of issue 23, from the tables below: (b) is variant 1,
        // (c) variant 2.
        let median = |v: &[f64]| stats(v.to_vec()).median;
        let rss: u64 = variants[1]
            .proxy
            .as_ref()
            .map_or(Vec::new(), |p| p.pids())
            .into_iter()
            .filter_map(loadgen::rss_kib)
            .sum();
        report += "| goal (issue 23) | target | measured: median of the per-round values |\n|---|---|---|\n";
        let close = |load: &Load| {
            if load.close {
                " (Connection: close)"
            } else {
                ""
            }
        };
        for (l, load) in loads.iter().enumerate() {
            report += &format!(
                "| (b) requests/s over (e)'s, wrk -c{}{} | ≥ 1.0 | {:.3} |\n",
                load.conns,
                close(load),
                median(&series[l][1].over_e)
            );
        }
        for (l, load) in loads.iter().enumerate() {
            report += &format!(
                "| context: (b) requests/s over (h)'s (nginx behind a DNAT, as an IMDS proxy must be), wrk -c{}{} | — | {:.3} |\n",
                load.conns,
                close(load),
                median(&series[l][1].over_h)
            );
        }
        for (l, load) in loads.iter().enumerate() {
            report += &format!(
                "| (b) p50 over (a)'s, wrk -c{}{} | < 1.0 | {:.3} |\n",
                load.conns,
                close(load),
                median(&series[l][1].ratios[1])
            );
        }
        report += &format!(
            "| (c) requests/s over (d)'s at saturation (wrk -c{}) | ≥ 1.0 | {:.3} |\n",
            loads[2].conns,
            median(&series[2][2].over_d)
        );
        // The same goals for c1 selected by its bridge, (i) and (j).
        for (l, load) in loads.iter().enumerate() {
            report += &format!(
                "| (i) requests/s over (e)'s, wrk -c{}{} (c1 selected by its bridge) | ≥ 1.0 | {:.3} |\n",
                load.conns,
                close(load),
                median(&series[l][bridge_hit].over_e)
            );
        }
        for (l, load) in loads.iter().enumerate() {
            report += &format!(
                "| (i) p50 over (a)'s, wrk -c{}{} (c1 selected by its bridge) | < 1.0 | {:.3} |\n",
                load.conns,
                close(load),
                median(&series[l][bridge_hit].ratios[1])
            );
        }
        report += &format!(
            "| (j) requests/s over (d)'s at saturation (wrk -c{}, c1 selected by its bridge) | ≥ 1.0 | {:.3} |\n",
            loads[2].conns,
            median(&series[2][bridge_hit + 1].over_d)
        );
        report += &format!(
            "| metaguard's RSS after the runs | < 20 MB | {:.1} MB |\n\n",
            rss as f64 / 1024.0
        );
    }
    for (l, load) in loads.iter().enumerate() {
        report += &format!(
            "### wrk -t{} -c{}{}: {}\n",
            load.threads,
            load.conns,
            if load.close {
                " -H 'Connection: close'"
            } else {
                ""
            },
            load.what
        );
        for (t, (what, prec, unit)) in METRICS.iter().enumerate() {
            report += &format!("\n| {what} | min | median | max |\n|---|---:|---:|---:|\n");
            for (v, s) in variants.iter().zip(&series[l]) {
                report += &row(&v.label, &s.values[t], *prec, unit);
            }
            for (v, s) in variants.iter().zip(&series[l]).skip(1) {
                report += &row(
                    &format!("ratio {} / (a) (per round)", short(v)),
                    &s.ratios[t],
                    3,
                    "",
                );
            }
            if t == 0 {
                for (v, s) in variants.iter().zip(&series[l]).skip(1) {
                    if !s.over_d.is_empty() {
                        report += &row(
                            &format!("ratio {} / (d) (per round)", short(v)),
                            &s.over_d,
                            3,
                            "",
                        );
                    }
                }
                for (v, s) in variants.iter().zip(&series[l]).skip(1) {
                    if v.cached && !s.over_e.is_empty() {
                        report += &row(
                            &format!("ratio {} / (e) (per round)", short(v)),
                            &s.over_e,
                            3,
                            "",
                        );
                    }
                }
                if let Some(s) = series[l].get(1).filter(|s| !s.over_h.is_empty()) {
                    report += &row("ratio (b) / (h) (per round)", &s.over_h, 3, "");
                }
            }
            if t > 0 {
                for (v, s) in variants.iter().zip(&series[l]).skip(1) {
                    report += &row(
                        &format!("added by {} over (a) (per round)", short(v)),
                        &s.added_ms[t - 1],
                        3,
                        " ms",
                    );
                }
            }
        }
        report += "\n| proxy CPU time per request (all its processes and threads) | min | median | max |\n|---|---:|---:|---:|\n";
        for (v, s) in variants.iter().zip(&series[l]) {
            if v.proxy.is_some() {
                report += &row(&v.label, &s.cpu_us, 1, " µs");
            }
        }
        report += "\n| TIME_WAIT sockets towards IMDS from the proxy's own source address, after each run (they last 60 s) | min | median | max |\n|---|---:|---:|---:|\n";
        for (v, s) in variants.iter().zip(&series[l]) {
            if let (Some(source), false) = (v.source, s.time_wait.is_empty()) {
                report += &row(&format!("{} from {source}", v.label), &s.time_wait, 0, "");
            }
        }
        report += "\n| caller (wrk) CPU time per request, with the kernel's path for what it sends (the redirect runs in its context) | min | median | max |\n|---|---:|---:|---:|\n";
        for (v, s) in variants.iter().zip(&series[l]) {
            if !s.client_us.is_empty() {
                report += &row(&v.label, &s.client_us, 1, " µs");
            }
        }
        report += "\n";
    }
    report += "| proxy memory after the runs | VmRSS | VmHWM (peak) |\n|---|---:|---:|\n";
    let mut listed: Vec<Vec<u32>> = Vec::new();
    for v in &variants {
        let Some(pids) = v.proxy.as_ref().map(|p| p.pids()) else {
            continue;
        };
        if listed.contains(&pids) {
            continue; // (c): the same process as (b)
        }
        listed.push(pids.clone());
        let rss: u64 = pids.iter().filter_map(|&p| loadgen::rss_kib(p)).sum();
        let hwm: u64 = pids.iter().filter_map(|&p| loadgen::hwm_kib(p)).sum();
        report += &format!(
            "| {} ({} processes) | {rss} KiB | {hwm} KiB |\n",
            v.label,
            pids.len()
        );
    }
    report += "\nRequests (all rounds and loads), socket errors, requests carrying `X-Forwarded-For` at the emulator, SYN retransmits in the caller's namespace during the runs (each a connection that waited 1 s): ";
    report += &variants
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let (req, err, xff, syn) = series.iter().fold((0, 0, 0, 0), |acc, per_load| {
                let s = &per_load[i];
                (
                    acc.0 + s.requests,
                    acc.1 + s.socket_errors,
                    acc.2 + s.forwarded_for,
                    acc.3 + s.syn_retransmits,
                )
            });
            format!("{} {req} / {err} / {xff} / {syn}", short(v))
        })
        .collect::<Vec<_>>()
        .join("; ");
    report += &format!(
        ".\nSYN retransmits over the whole run (c1, lab host): {}, {}.\n",
        syn_retransmits(&lab, Role::C1),
        syn_retransmits(&lab, Role::Host)
    );
    let errors =
        std::fs::read_to_string(lab.work_dir().join("nginx/nginx-error.log")).unwrap_or_default();
    if !errors.trim().is_empty() {
        eprintln!("nginx error log:\n{errors}");
    }
    let section = format!(
        "## Metadata proxy — `sudo cargo bench -p metaguard --bench proxy`\n\n\
         Lab: `GET {PATH}` from a bridge container's namespace (c2 for (a), c1 for the proxies; identical paths) \
         with wrk (Debian 4.1.0, `--latency`) to the IMDS emulator in the vpc namespace: (a) directly \
         (docker0 → lab host → vpc, no metaguard rules), {b}(d) through nginx {nginx} (Debian's build, \
         `worker_processes auto`, upstream `keepalive 32`, one JSON access-log line per request as metaguard \
         writes one audit line) in the lab host on docker0's address, (e) the same nginx with `proxy_cache` \
         (every `200` kept for an hour) on another port, (f) through the floor: a minimal tokio \
         relay in metaguard's proxy's shape (a single-threaded runtime per CPU over `SO_REUSEPORT` \
         listeners) that does only the network work — request head in, new upstream connection, head out, \
         answer back, the handshake's last ACK on the request and the connection closed with a reset as \
         metaguard's are — and nothing of a proxy's job (no HTTP library, identification, policy, audit or \
         metrics; `benches/proxy/floor.rs`): what any tokio proxy pays for the same requests, (g) the same \
         process answering every request from memory with a fixed `200` (no HTTP library, nothing checked, \
         on docker0's address like nginx): what any tokio server pays per answer, beside (b) and (e), \
         (h) the nginx of (e) reached as an IMDS proxy must be: from c3, its own namespace on docker0, to \
         169.254.169.254:80, sent to nginx by one DNAT in the lab host (what interception costs nginx; (e) is \
         addressed directly, which no proxy of the metadata service can be){ij}. \
         Three loads: one connection (the latency a proxy adds, without queueing), one request per new \
         connection, and {conns} connections on {threads} threads (saturation). {rounds} rounds of {secs} s per variant and load{warm}, the order \
         rotated every round; ratios and differences are taken per round. The emulator answers every request \
         with `Connection: close`, as IMDS does, so every request is a new upstream connection for a proxy \
         that forwards it, and a new connection from c1 for (a), while wrk keeps its connections to a proxy alive; the \
         emulator's namespace keeps no TIME_WAIT sockets (`tcp_max_tw_buckets=0`, see the bench's source), nor does \
         c2, (a)'s (wrk often closes before the emulator's FIN is in, and its own TIME_WAIT filled the ports \
         it connects from within a minute). \
         Each forwarding proxy connects to IMDS from a lab host address of its own (metaguard from the host's \
         10.0.0.10, nginx from {NGINX_SOURCE} by `proxy_bind`, the floor from {FLOOR_SOURCE}), as the only IMDS \
         client of a host would: a client that closes first keeps a TIME_WAIT socket for 60 s, and `connect()` \
         walks every one with the same source and destination when it picks a port, so in one address the \
         proxies paid for each other's (see the TIME_WAIT rows). \
         Proxy CPU is user + system time from `/proc/<pid>/stat` over each run (10 ms ticks), which \
         includes the kernel's network path run in the proxy's context; (b), (c), (i) and (j) are one process, \
         measured over their own runs. The caller's CPU is wrk's own, read the same way when it has exited: it \
         includes the kernel's path for what wrk sends (rules, NAT, bridge and veth run in its context). \
         Machine: {}.\n\n{report}",
        common::machine(),
        b = if with_metaguard {
            "through metaguard's proxy (the daemon, one thread per CPU, audit log on, answer cache on, \
             c1 selected by its namespace as an awsvpc task is: a DNAT in c1 to 169.254.170.2:9470 and \
             another in the host) (b) with the IMDSv2 token c1 got from it, answered from memory (a cache \
             hit), (c) without a token (IMDSv1), forwarded every time as a cache miss is, "
        } else {
            ""
        },
        ij = if with_metaguard {
            ", (i) and (j) as (b) and (c) while the daemon selects c1 by its bridge (`bridges = \
             [\"docker0\"]`), as a Docker container is: one DNAT, in the host (that selects c2 and c3 \
             too, so it is in force only for (i)'s and (j)'s runs: `metaguard reload` before and after \
             each, then c1's conntrack entries in c1 and the host and the host's TIME_WAIT sockets \
             towards c1 are removed, as on a host where c1 was always selected that way: one way's \
             left-overs made the other way's new connections wait 1 s, see the bench's source)"
        } else {
            ""
        },
        nginx = nginx_version(),
        warm = if full { " after a 1 s warm-up each" } else { "" },
    );
    println!("{section}");
    if full && with_metaguard {
        common::write_section("proxy", &section)?;
    } else if full {
        println!(
            "(BENCHMARKS.md not written: no metaguard proxy variant yet, see metaguard_variants)"
        );
    }
    Ok(())
}

/// `nginx/1.22.1`, from `nginx -v`.
fn nginx_version() -> String {
    loadgen::nginx_binary()
        .ok()
        .and_then(|b| std::process::Command::new(b).arg("-v").output().ok())
        .map(|o| {
            String::from_utf8_lossy(&o.stderr)
                .trim()
                .trim_start_matches("nginx version: ")
                .to_string()
        })
        .unwrap_or_default()
}

/// `TcpExtTCPSynRetrans` of a lab namespace since it was created: each one
/// is a connection that waited ≥ 1 s.
fn syn_retransmits(lab: &Lab, role: Role) -> String {
    lab.nstat(role, "TcpExtTCPSynRetrans")
        .map_or_else(|_| "?".into(), |n| n.to_string())
}
