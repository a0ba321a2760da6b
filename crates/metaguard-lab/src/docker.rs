//! A fake Docker Engine API on a unix socket: what metaguard's discovery
//! reads from a real dockerd (`/containers/json`, `/containers/{id}/json`,
//! `/events`), serving `docker inspect`-shaped JSON for containers that the
//! lab emulates with namespaces and cgroups. There is no Docker engine on
//! these machines, and there must not be one in tests (containers would get
//! real egress).
//!
//! Containers are added and removed at run time; each change is streamed to
//! `/events` subscribers as Docker does (`start`, `die`).
//!
//! With a [`Runtime`] ([`FakeDocker::with_runtime`]) it also takes the
//! calls `docker run` makes — `POST /containers/create`, `…/start`,
//! `…/stop`, `…/kill`, `DELETE /containers/{id}` — and the runtime makes
//! each container real (the machine lab's stand-in dockerd, see
//! [`crate::standin`]). Without one those calls answer `501`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::{Request, Response};
use serde_json::{json, Value};
use tokio::sync::broadcast;

/// One emulated container.
#[derive(Debug, Clone)]
pub struct FakeContainer {
    /// 64 hex characters, like Docker's.
    pub id: String,
    /// Without the leading `/`.
    pub name: String,
    pub image: String,
    pub labels: HashMap<String, String>,
    pub env: Vec<String>,
    /// `host`, `bridge`, `none`, `container:<id>`, or a network name.
    pub network_mode: String,
    /// Its process (a lab process in the container's netns / cgroup).
    pub pid: u32,
    /// Its network namespace file (`NetworkSettings.SandboxKey`).
    pub sandbox_key: String,
    /// `Config.User` (empty: root).
    pub user: String,
    /// `HostConfig.CgroupParent` (empty: the default).
    pub cgroup_parent: String,
    /// Running (listed by `/containers/json`), or created/stopped.
    pub running: bool,
    /// Its addresses on the `bridge` network
    /// (`NetworkSettings.Networks.bridge.IPAddress`, `GlobalIPv6Address`).
    pub addresses: Vec<std::net::IpAddr>,
}

/// What `POST /containers/create` takes (the fields `docker run` sends
/// that the lab uses).
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CreateRequest {
    #[serde(default)]
    pub image: String,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub labels: HashMap<String, String>,
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub host_config: CreateHostConfig,
}

#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CreateHostConfig {
    #[serde(default)]
    pub network_mode: String,
    #[serde(default)]
    pub cgroup_parent: String,
}

/// Makes containers real: their namespace, links and process.
pub trait Runtime: Send + Sync + std::fmt::Debug + 'static {
    /// Starts `c` (its network mode says how), filling in its `pid` and
    /// `sandbox_key`. `running` lists the containers already running (for
    /// `container:<id>` modes).
    fn start(&self, c: &mut FakeContainer, running: &[FakeContainer]) -> Result<(), String>;
    /// Ends `c`'s process and removes what `start` made.
    fn stop(&self, c: &FakeContainer);
}

impl FakeContainer {
    /// A container id derived from its name (stable across runs).
    pub fn id_for(name: &str) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        format!("{h:016x}").repeat(4)
    }

    fn summary(&self) -> Value {
        json!({
            "Id": self.id,
            "Names": [format!("/{}", self.name)],
            "Image": self.image,
            "ImageID": format!("sha256:{}", "0".repeat(64)),
            "Command": "/pause",
            "Created": 1_700_000_000,
            "Ports": [],
            "Labels": self.labels,
            "State": if self.running { "running" } else { "created" },
            "Status": if self.running { "Up 5 minutes" } else { "Created" },
            "HostConfig": { "NetworkMode": self.network_mode },
            "NetworkSettings": { "Networks": {} },
            "Mounts": []
        })
    }

    /// `NetworkSettings.Networks`: one `bridge` network holding its
    /// addresses, when it has any.
    fn networks(&self) -> Value {
        if self.addresses.is_empty() {
            return json!({});
        }
        let v4 = self.addresses.iter().find(|a| a.is_ipv4());
        let v6 = self.addresses.iter().find(|a| a.is_ipv6());
        json!({ "bridge": {
            "IPAddress": v4.map(ToString::to_string).unwrap_or_default(),
            "IPPrefixLen": if v4.is_some() { 16 } else { 0 },
            "GlobalIPv6Address": v6.map(ToString::to_string).unwrap_or_default(),
            "GlobalIPv6PrefixLen": if v6.is_some() { 64 } else { 0 },
        }})
    }

    fn inspect(&self) -> Value {
        json!({
            "Id": self.id,
            "Created": "2026-11-23T10:00:00.000000000Z",
            "Path": "/pause",
            "Args": [],
            "State": {
                "Status": if self.running { "running" } else { "created" },
                "Running": self.running, "Paused": false, "Restarting": false,
                "OOMKilled": false, "Dead": false,
                "Pid": if self.running { self.pid } else { 0 }, "ExitCode": 0, "Error": "",
                "StartedAt": "2026-11-23T10:00:01.000000000Z", "FinishedAt": "0001-01-01T00:00:00Z"
            },
            "Image": format!("sha256:{}", "0".repeat(64)),
            "Name": format!("/{}", self.name),
            "RestartCount": 0,
            "Driver": "overlay2",
            "Platform": "linux",
            "HostConfig": {
                "NetworkMode": self.network_mode,
                "CgroupParent": self.cgroup_parent,
                "Privileged": false
            },
            "Config": {
                "Hostname": &self.id[..12],
                "User": self.user,
                "Env": self.env,
                "Image": self.image,
                "Labels": self.labels
            },
            "NetworkSettings": {
                "Bridge": "",
                "SandboxID": &self.id,
                "SandboxKey": self.sandbox_key,
                "Networks": self.networks()
            }
        })
    }
}

#[derive(Debug, Default)]
struct State {
    containers: Vec<FakeContainer>,
    /// Every event sent, for `/events?since=` replays.
    history: Vec<Value>,
    /// Containers created so far (for fresh ids).
    created: u64,
}

/// The fake API. Cheap to clone.
#[derive(Debug, Clone)]
pub struct FakeDocker {
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<Value>,
    socket: PathBuf,
    runtime: Option<Arc<dyn Runtime>>,
}

type Reply = Response<BoxBody<Bytes, Infallible>>;

impl FakeDocker {
    pub fn new(socket: &Path) -> FakeDocker {
        let (events, _) = broadcast::channel(1024);
        FakeDocker {
            state: Arc::default(),
            events,
            socket: socket.to_path_buf(),
            runtime: None,
        }
    }

    /// A fake API whose create/start/stop calls make real containers
    /// through `runtime`.
    pub fn with_runtime(socket: &Path, runtime: Arc<dyn Runtime>) -> FakeDocker {
        FakeDocker {
            runtime: Some(runtime),
            ..FakeDocker::new(socket)
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn event(&self, action: &str, c: &FakeContainer) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let ev = json!({
            "status": action, "id": c.id, "from": c.image,
            "Type": "container", "Action": action,
            "Actor": { "ID": c.id, "Attributes": { "name": c.name, "image": c.image } },
            "scope": "local", "time": now.as_secs(), "timeNano": now.as_nanos() as u64
        });
        self.lock().history.push(ev.clone());
        let _ = self.events.send(ev);
    }

    /// Adds a running container and emits `start`.
    pub fn start(&self, mut c: FakeContainer) {
        c.running = true;
        self.event("start", &c);
        let mut st = self.lock();
        st.containers.retain(|x| x.id != c.id);
        st.containers.push(c);
    }

    /// Every container's id (running or not), for a runtime's shutdown.
    pub fn ids(&self) -> Vec<String> {
        self.lock()
            .containers
            .iter()
            .map(|c| c.id.clone())
            .collect()
    }

    /// `POST /containers/create?name=NAME`: records a created container.
    pub fn create(&self, name: &str, req: CreateRequest) -> Result<String, (u16, String)> {
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
        {
            return Err((
                400,
                format!(
                    "Invalid container name ({name:?}), only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed"
                ),
            ));
        }
        let mut st = self.lock();
        if st.containers.iter().any(|c| c.name == name) {
            return Err((
                409,
                format!("Conflict. The container name \"/{name}\" is already in use"),
            ));
        }
        st.created += 1;
        let id = FakeContainer::id_for(&format!(
            "{name}/{}/{}",
            st.created,
            crate::log::now_unix_ms()
        ));
        let c = FakeContainer {
            id: id.clone(),
            name: name.to_string(),
            image: req.image,
            labels: req.labels,
            env: req.env,
            network_mode: if req.host_config.network_mode.is_empty() {
                "bridge".into()
            } else {
                req.host_config.network_mode
            },
            pid: 0,
            sandbox_key: String::new(),
            user: req.user,
            cgroup_parent: req.host_config.cgroup_parent,
            running: false,
            addresses: Vec::new(),
        };
        st.containers.push(c.clone());
        drop(st);
        self.event("create", &c);
        Ok(id)
    }

    /// `POST /containers/{id}/start` through the runtime.
    pub fn start_created(&self, id_or_name: &str) -> Result<(), (u16, String)> {
        let runtime = self
            .runtime
            .clone()
            .ok_or((501, "no runtime".to_string()))?;
        let (mut c, running) = {
            let st = self.lock();
            let c = st
                .containers
                .iter()
                .find(|c| matches_ref(c, id_or_name))
                .cloned()
                .ok_or((404, format!("No such container: {id_or_name}")))?;
            let running: Vec<FakeContainer> = st
                .containers
                .iter()
                .filter(|c| c.running)
                .cloned()
                .collect();
            (c, running)
        };
        if c.running {
            return Err((304, String::new()));
        }
        runtime.start(&mut c, &running).map_err(|e| (500, e))?;
        c.running = true;
        {
            let mut st = self.lock();
            if let Some(slot) = st.containers.iter_mut().find(|x| x.id == c.id) {
                *slot = c.clone();
            }
        }
        self.event("start", &c);
        Ok(())
    }

    /// `POST /containers/{id}/stop` (or `kill`) through the runtime; with
    /// `remove`, also `DELETE /containers/{id}`.
    pub fn stop_container(&self, id_or_name: &str, remove: bool) -> Result<(), (u16, String)> {
        let c = self
            .lock()
            .containers
            .iter()
            .find(|c| matches_ref(c, id_or_name))
            .cloned()
            .ok_or((404, format!("No such container: {id_or_name}")))?;
        if c.running {
            if let Some(rt) = &self.runtime {
                rt.stop(&c);
            }
            let mut st = self.lock();
            if let Some(slot) = st.containers.iter_mut().find(|x| x.id == c.id) {
                slot.running = false;
                slot.pid = 0;
            }
            drop(st);
            self.event("die", &c);
            self.event("stop", &c);
        }
        if remove {
            self.lock().containers.retain(|x| x.id != c.id);
            self.event("destroy", &c);
        }
        Ok(())
    }

    /// Removes a container and emits `die`.
    pub fn stop(&self, name: &str) {
        let removed: Vec<FakeContainer> = {
            let mut st = self.lock();
            let (gone, keep): (Vec<_>, Vec<_>) =
                st.containers.drain(..).partition(|c| c.name == name);
            st.containers = keep;
            gone
        };
        for c in removed {
            self.event("die", &c);
        }
    }

    fn list(&self, filters: Option<&Value>, all: bool) -> Value {
        let st = self.lock();
        let labels: Vec<String> = filters
            .and_then(|f| f.get("label"))
            .map(|l| match l {
                Value::Array(a) => a
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect(),
                Value::Object(o) => o.keys().cloned().collect(),
                _ => Vec::new(),
            })
            .unwrap_or_default();
        let matches = |c: &FakeContainer| {
            labels.iter().all(|l| match l.split_once('=') {
                Some((k, v)) => c.labels.get(k).is_some_and(|x| x == v),
                None => c.labels.contains_key(l),
            })
        };
        Value::Array(
            st.containers
                .iter()
                .filter(|c| (all || c.running) && matches(c))
                .map(FakeContainer::summary)
                .collect(),
        )
    }

    fn find(&self, id_or_name: &str) -> Option<FakeContainer> {
        self.lock()
            .containers
            .iter()
            .find(|c| matches_ref(c, id_or_name))
            .cloned()
    }

    /// Serves the API on its unix socket until the future is dropped.
    pub async fn serve(self, listener: tokio::net::UnixListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let me = self.clone();
            tokio::task::spawn_local(async move {
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let me = me.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = match body.collect().await {
                            Ok(b) => b.to_bytes(),
                            Err(_) => Bytes::new(),
                        };
                        let reply = if parts.method == hyper::Method::GET {
                            me.route(&Request::from_parts(parts, ()))
                        } else {
                            // Changes go through the runtime, which blocks
                            // (ip, systemd-run): off the accept loop.
                            let me2 = me.clone();
                            tokio::task::spawn_blocking(move || me2.change(&parts, &body))
                                .await
                                .unwrap_or_else(|_| {
                                    json_resp(500, &json!({"message": "runtime panicked"}))
                                })
                        };
                        Ok::<_, Infallible>(reply)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    }

    /// `POST`/`DELETE` requests: create, start, stop, kill, remove.
    fn change(&self, parts: &hyper::http::request::Parts, body: &[u8]) -> Reply {
        let (path, query) = split_target(parts.uri.path(), parts.uri.query());
        let result: Result<Reply, (u16, String)> = match (parts.method.as_str(), path) {
            ("POST", "/containers/create") => {
                let name = query.get("name").cloned().unwrap_or_default();
                serde_json::from_slice::<CreateRequest>(body)
                    .map_err(|e| (400, format!("bad create request: {e}")))
                    .and_then(|req| self.create(&name, req))
                    .map(|id| json_resp(201, &json!({"Id": id, "Warnings": []})))
            }
            ("POST", p) if p.starts_with("/containers/") => {
                let rest = &p["/containers/".len()..];
                match rest.rsplit_once('/') {
                    Some((id, "start")) => self.start_created(id).map(|()| text(204, "")),
                    Some((id, "stop" | "kill")) => {
                        self.stop_container(id, false).map(|()| text(204, ""))
                    }
                    _ => Err((404, "page not found".into())),
                }
            }
            ("DELETE", p) if p.starts_with("/containers/") => {
                let id = &p["/containers/".len()..];
                self.stop_container(id, true).map(|()| text(204, ""))
            }
            _ => Err((404, "page not found".into())),
        };
        result.unwrap_or_else(|(status, message)| {
            if status == 304 {
                text(304, "")
            } else {
                json_resp(status, &json!({ "message": message }))
            }
        })
    }

    fn route(&self, req: &Request<()>) -> Reply {
        let (path, query) = split_target(req.uri().path(), req.uri().query());
        let filters: Option<Value> = query
            .get("filters")
            .and_then(|f| serde_json::from_str(f).ok());
        match path {
            "/_ping" => text(200, "OK"),
            "/version" => json_resp(
                200,
                &json!({"Version": "25.0.3", "ApiVersion": "1.44", "MinAPIVersion": "1.24", "Os": "linux", "Arch": "amd64"}),
            ),
            "/containers/json" => {
                let all = query.get("all").is_some_and(|v| v == "1" || v == "true");
                json_resp(200, &self.list(filters.as_ref(), all))
            }
            "/events" => {
                // Subscribe first, then replay what happened since `since`
                // (seconds, as Docker takes it): nothing falls in between.
                let rx = self.events.subscribe();
                let since: Option<f64> = query.get("since").and_then(|s| s.parse().ok());
                let replay: std::collections::VecDeque<Value> = match since {
                    Some(t) => self
                        .lock()
                        .history
                        .iter()
                        .filter(|e| {
                            e.get("time")
                                .and_then(Value::as_f64)
                                .is_some_and(|et| et >= t.floor())
                        })
                        .cloned()
                        .collect(),
                    None => std::collections::VecDeque::new(),
                };
                let stream =
                    futures_util::stream::unfold((rx, replay), |(mut rx, mut replay)| async move {
                        if let Some(v) = replay.pop_front() {
                            let mut line = v.to_string();
                            line.push('\n');
                            return Some((
                                Ok::<_, Infallible>(Frame::data(Bytes::from(line))),
                                (rx, replay),
                            ));
                        }
                        loop {
                            match rx.recv().await {
                                Ok(v) => {
                                    let mut line = v.to_string();
                                    line.push('\n');
                                    return Some((
                                        Ok::<_, Infallible>(Frame::data(Bytes::from(line))),
                                        (rx, replay),
                                    ));
                                }
                                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                                Err(broadcast::error::RecvError::Closed) => return None,
                            }
                        }
                    });
                Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .body(BodyExt::boxed(StreamBody::new(stream)))
                    .unwrap_or_else(|_| text(500, "x"))
            }
            p if p.starts_with("/containers/") && p.ends_with("/json") => {
                let id = &p["/containers/".len()..p.len() - "/json".len()];
                match self.find(id) {
                    Some(c) => json_resp(200, &c.inspect()),
                    None => json_resp(404, &json!({"message": format!("No such container: {id}")})),
                }
            }
            _ => json_resp(404, &json!({"message": "page not found"})),
        }
    }
}

/// Whether `key` names `c`: its id, a 12+ character id prefix, or its
/// name (with or without the leading `/`).
fn matches_ref(c: &FakeContainer, key: &str) -> bool {
    let key = key.trim_start_matches('/');
    c.id == key || c.name == key || (key.len() >= 12 && c.id.starts_with(key))
}

/// The request path without the API version prefix (`/v1.43/…`) and the
/// query's decoded parameters.
fn split_target<'a>(path: &'a str, query: Option<&str>) -> (&'a str, HashMap<String, String>) {
    let path = match path.strip_prefix("/v") {
        Some(rest) if rest.starts_with(|c: char| c.is_ascii_digit()) => {
            rest.find('/').map_or(path, |i| &rest[i..])
        }
        _ => path,
    };
    let query = query
        .map(|q| {
            q.split('&')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), percent_decode(v)))
                .collect()
        })
        .unwrap_or_default();
    (path, query)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
                {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn text(status: u16, body: &str) -> Reply {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(BodyExt::boxed(Full::new(Bytes::from(body.to_string()))))
        .unwrap_or_else(|_| Response::new(BodyExt::boxed(Full::new(Bytes::new()))))
}

fn json_resp(status: u16, v: &Value) -> Reply {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("api-version", "1.44")
        .body(BodyExt::boxed(Full::new(Bytes::from(v.to_string()))))
        .unwrap_or_else(|_| text(500, "x"))
}
