//! The reference `nginx` reverse proxy, run in a lab namespace, master and
//! workers killed by pid when its guard is dropped.

use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use metaguard_sys::process::ProcessId;

use crate::LabError;

use super::{hwm_kib, lab_netns, rss_kib, wait_accepting, NotReady, NGINX_READY, NGINX_STOP};

/// The nginx binary: `$METAGUARD_NGINX`, else `<repo>/.tools/nginx/usr/sbin/nginx`.
pub fn nginx_binary() -> Result<PathBuf, LabError> {
    let path = match std::env::var_os("METAGUARD_NGINX") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.tools/nginx/usr/sbin/nginx"),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(LabError::Io {
            what: "no nginx binary (run ./scripts/test, or `bash -c '. scripts/common.sh && ensure_nginx'`, which extract Debian's nginx into .tools/nginx; or set METAGUARD_NGINX) at",
            path,
            source: std::io::ErrorKind::NotFound.into(),
        })
    }
}

/// The configuration [`Nginx::start`] writes: a plain reverse proxy from
/// `listen` to `upstream` (`host:port`) with keep-alive upstream
/// connections. Every request is logged as one JSON line to
/// `nginx-access.log` (metaguard writes an audit line per request too, so
/// both pay for a log), every path nginx writes is in `work_dir`, and no
/// `X-Forwarded-For` is added (nginx adds none unless told to).
pub fn nginx_conf(listen: SocketAddr, upstream: &str, work_dir: &Path) -> String {
    nginx_conf_with(listen, upstream, work_dir, false, None)
}

/// [`nginx_conf`], with `cache`: `proxy_cache` on every `200` answer for
/// an hour (a memory zone and the cache directory in `work_dir`), the
/// reference for answering from memory; with `bind`, upstream connections
/// come from that local address (`proxy_bind`, the port chosen at
/// `connect()`, as nginx does with `IP_BIND_ADDRESS_NO_PORT`).
pub fn nginx_conf_with(
    listen: SocketAddr,
    upstream: &str,
    work_dir: &Path,
    cache: bool,
    bind: Option<IpAddr>,
) -> String {
    let w = work_dir.display();
    // An IPv6 address without brackets: nginx rejects `[fd00::1]` here.
    let bind = bind.map_or(String::new(), |a| format!("\n            proxy_bind {a};"));
    let (zone, cache) = if cache {
        (
            format!("proxy_cache_path {w}/cache keys_zone=imds:1m;\n    "),
            "proxy_cache imds;\n            proxy_cache_valid 200 1h;\n            ",
        )
    } else {
        (String::new(), "")
    };
    format!(
        "# Written by metaguard_lab::loadgen::Nginx (reference proxy of benches/proxy.rs).
daemon off;
master_process on;
worker_processes auto;
pid {w}/nginx.pid;
error_log {w}/nginx-error.log warn;

events {{
    worker_connections 1024;
}}

http {{
    log_format audit escape=json '{{\"time\":\"$msec\",\"method\":\"$request_method\",'
        '\"path\":\"$uri\",\"status\":$status,\"upstream_ms\":\"$upstream_response_time\"}}';
    access_log {w}/nginx-access.log audit;
    client_body_temp_path {w}/client_body;
    proxy_temp_path {w}/proxy;
    fastcgi_temp_path {w}/fastcgi;
    uwsgi_temp_path {w}/uwsgi;
    scgi_temp_path {w}/scgi;
    {zone}
    upstream imds {{
        server {upstream};
        keepalive 32;
    }}

    server {{
        listen {listen};
        location / {{
            {cache}proxy_pass http://imds;
            proxy_http_version 1.1;{bind}
            proxy_set_header Connection \"\";
        }}
    }}
}}
"
    )
}

/// A running nginx (master and workers) inside a lab namespace; stopped
/// (SIGTERM, then SIGKILL by pid) and reaped on drop.
#[derive(Debug)]
pub struct Nginx {
    master: Option<Child>,
    listen: SocketAddr,
    work_dir: PathBuf,
}

impl Nginx {
    /// Writes `<work_dir>/nginx.conf` ([`nginx_conf`]), starts nginx inside
    /// lab namespace `netns` and returns once it accepts TCP connections on
    /// `listen` (probed from inside the same namespace).
    pub fn start(
        netns: &str,
        listen: SocketAddr,
        upstream: &str,
        work_dir: &Path,
    ) -> Result<Nginx, LabError> {
        Self::start_with(netns, listen, upstream, work_dir, false, None)
    }

    /// [`Nginx::start`] with [`nginx_conf_with`]'s `cache` and `bind`.
    pub fn start_with(
        netns: &str,
        listen: SocketAddr,
        upstream: &str,
        work_dir: &Path,
        cache: bool,
        bind: Option<IpAddr>,
    ) -> Result<Nginx, LabError> {
        let ns = lab_netns(netns)?;
        if upstream.is_empty()
            || upstream
                .chars()
                .any(|c| c.is_whitespace() || matches!(c, ';' | '{' | '}' | '#' | '"' | '\''))
        {
            return Err(LabError::ProbeOutput(format!(
                "nginx upstream {upstream:?} is not a host:port"
            )));
        }
        let exe = nginx_binary()?;
        let io = |what: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| LabError::Io { what, path, source }
        };
        std::fs::create_dir_all(work_dir).map_err(io("create", work_dir))?;
        let conf = work_dir.join("nginx.conf");
        std::fs::write(
            &conf,
            nginx_conf_with(listen, upstream, work_dir, cache, bind),
        )
        .map_err(io("write", &conf))?;
        let out_path = work_dir.join("nginx.out");
        let out = File::create(&out_path).map_err(io("create", &out_path))?;
        let err = out.try_clone().map_err(io("reopen", &out_path))?;
        let mut command = Command::new(&exe);
        command
            .arg("-p")
            .arg(work_dir)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(work_dir.join("nginx-error.log"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        ns.command(&mut command)?;
        let child = command.spawn().map_err(|source| LabError::Spawn {
            command: format!("[{netns}] {} -c {}", exe.display(), conf.display()),
            source,
        })?;
        let mut nginx = Nginx {
            master: Some(child),
            listen,
            work_dir: work_dir.to_path_buf(),
        };
        // On any error below, dropping `nginx` stops what was started.
        let Some(master) = nginx.master.as_mut() else {
            return Err(nginx.failed("not started"));
        };
        let pid = master.id();
        // The master listens before it forks the workers: ready once a
        // connection is accepted and a worker exists to serve it.
        match wait_accepting(&ns, listen, master, NGINX_READY, || {
            !children_of(pid).is_empty()
        }) {
            Ok(()) => Ok(nginx),
            Err(NotReady::Exited(status)) => Err(nginx.failed(&format!("exited ({status})"))),
            Err(NotReady::TimedOut) => Err(nginx.failed(&format!(
                "does not accept on {listen} after {NGINX_READY:?}"
            ))),
            Err(NotReady::Lab(e)) => Err(e),
        }
    }

    fn failed(&self, what: &str) -> LabError {
        let read =
            |name: &str| std::fs::read_to_string(self.work_dir.join(name)).unwrap_or_default();
        LabError::Server {
            name: "nginx".into(),
            source: std::io::Error::other(format!(
                "{what}; {}",
                (read("nginx.out") + &read("nginx-error.log")).trim()
            )),
        }
    }

    /// The address it listens on.
    pub fn listen(&self) -> SocketAddr {
        self.listen
    }

    /// The master's pid.
    pub fn pid(&self) -> Option<u32> {
        self.master.as_ref().map(Child::id)
    }

    /// The master's and the workers' pids.
    pub fn pids(&self) -> Vec<u32> {
        match self.pid() {
            Some(pid) => std::iter::once(pid).chain(children_of(pid)).collect(),
            None => Vec::new(),
        }
    }

    /// VmRSS summed over master and workers, KiB.
    pub fn rss_kib(&self) -> u64 {
        self.pids().into_iter().filter_map(rss_kib).sum()
    }

    /// VmHWM (peak RSS) summed over master and workers, KiB.
    pub fn hwm_kib(&self) -> u64 {
        self.pids().into_iter().filter_map(hwm_kib).sum()
    }

    /// Stops nginx: SIGTERM to the master (which stops and reaps its
    /// workers), SIGKILL to the master and every worker left after
    /// `NGINX_STOP`. Also done on drop.
    pub fn stop(&mut self) {
        let Some(mut master) = self.master.take() else {
            return;
        };
        let workers: Vec<ProcessId> = children_of(master.id())
            .into_iter()
            .filter_map(|pid| {
                metaguard_sys::process::start_time(Path::new("/proc"), pid)
                    .map(|start_time| ProcessId { pid, start_time })
            })
            .collect();
        if let Some(pid) = i32::try_from(master.id())
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + NGINX_STOP;
        while matches!(master.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if matches!(master.try_wait(), Ok(None)) {
            let _ = master.kill();
        }
        let _ = master.wait();
        for w in workers {
            // Only the very process that was a worker (pid and start time).
            if w.is_alive(Path::new("/proc")) {
                if let Some(pid) = i32::try_from(w.pid)
                    .ok()
                    .and_then(rustix::process::Pid::from_raw)
                {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                }
            }
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The pids whose parent is `parent` (from /proc/*/stat).
pub(super) fn children_of(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| parse_ppid(&s))
                == Some(parent)
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// The parent pid in a /proc/PID/stat line (the field after the state,
/// which follows the command name's closing parenthesis).
pub(super) fn parse_ppid(stat: &str) -> Option<u32> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}
