//! A fake Docker Engine API on a unix socket: what metaguard's discovery
//! reads from a real dockerd (`/containers/json`, `/containers/{id}/json`,
//! `/events`), serving `docker inspect`-shaped JSON for containers that the
//! lab emulates with namespaces and cgroups. There is no Docker engine on
//! these machines, and there must not be one in tests (containers would get
//! real egress).
//!
//! Containers are added and removed at run time; each change is streamed to
//! `/events` subscribers as Docker does (`start`, `die`).

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
            "State": "running",
            "Status": "Up 5 minutes",
            "HostConfig": { "NetworkMode": self.network_mode },
            "NetworkSettings": { "Networks": {} },
            "Mounts": []
        })
    }

    fn inspect(&self) -> Value {
        json!({
            "Id": self.id,
            "Created": "2026-11-23T10:00:00.000000000Z",
            "Path": "/pause",
            "Args": [],
            "State": {
                "Status": "running", "Running": true, "Paused": false, "Restarting": false,
                "OOMKilled": false, "Dead": false, "Pid": self.pid, "ExitCode": 0, "Error": "",
                "StartedAt": "2026-11-23T10:00:01.000000000Z", "FinishedAt": "0001-01-01T00:00:00Z"
            },
            "Image": format!("sha256:{}", "0".repeat(64)),
            "Name": format!("/{}", self.name),
            "RestartCount": 0,
            "Driver": "overlay2",
            "Platform": "linux",
            "HostConfig": {
                "NetworkMode": self.network_mode,
                "CgroupParent": "",
                "Privileged": false
            },
            "Config": {
                "Hostname": &self.id[..12],
                "Env": self.env,
                "Image": self.image,
                "Labels": self.labels
            },
            "NetworkSettings": {
                "Bridge": "",
                "SandboxID": &self.id,
                "SandboxKey": self.sandbox_key,
                "Networks": {}
            }
        })
    }
}

#[derive(Debug, Default)]
struct State {
    containers: Vec<FakeContainer>,
    /// Every event sent, for `/events?since=` replays.
    history: Vec<Value>,
}

/// The fake API. Cheap to clone.
#[derive(Debug, Clone)]
pub struct FakeDocker {
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<Value>,
    socket: PathBuf,
}

impl FakeDocker {
    pub fn new(socket: &Path) -> FakeDocker {
        let (events, _) = broadcast::channel(1024);
        FakeDocker {
            state: Arc::default(),
            events,
            socket: socket.to_path_buf(),
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
    pub fn start(&self, c: FakeContainer) {
        self.event("start", &c);
        let mut st = self.lock();
        st.containers.retain(|x| x.id != c.id);
        st.containers.push(c);
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

    fn list(&self, filters: Option<&Value>) -> Value {
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
                .filter(|c| matches(c))
                .map(FakeContainer::summary)
                .collect(),
        )
    }

    fn find(&self, id_or_name: &str) -> Option<FakeContainer> {
        let key = id_or_name.trim_start_matches('/');
        self.lock()
            .containers
            .iter()
            .find(|c| c.id == key || c.name == key || (key.len() >= 12 && c.id.starts_with(key)))
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
                    async move { Ok::<_, Infallible>(me.route(&req)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    }

    fn route(&self, req: &Request<hyper::body::Incoming>) -> Response<BoxBody<Bytes, Infallible>> {
        let path = req.uri().path();
        // Strip the API version prefix: /v1.43/containers/json
        let path = match path.strip_prefix("/v") {
            Some(rest) => rest.find('/').map_or(path, |i| &rest[i..]),
            None => path,
        };
        let query: HashMap<String, String> = req
            .uri()
            .query()
            .map(|q| {
                q.split('&')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_string(), percent_decode(v)))
                    .collect()
            })
            .unwrap_or_default();
        let filters: Option<Value> = query
            .get("filters")
            .and_then(|f| serde_json::from_str(f).ok());
        match path {
            "/_ping" => text(200, "OK"),
            "/version" => json_resp(
                200,
                &json!({"Version": "25.0.3", "ApiVersion": "1.44", "MinAPIVersion": "1.24", "Os": "linux", "Arch": "amd64"}),
            ),
            "/containers/json" => json_resp(200, &self.list(filters.as_ref())),
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

fn text(status: u16, body: &str) -> Response<BoxBody<Bytes, Infallible>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(BodyExt::boxed(Full::new(Bytes::from(body.to_string()))))
        .unwrap_or_else(|_| Response::new(BodyExt::boxed(Full::new(Bytes::new()))))
}

fn json_resp(status: u16, v: &Value) -> Response<BoxBody<Bytes, Infallible>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("api-version", "1.44")
        .body(BodyExt::boxed(Full::new(Bytes::from(v.to_string()))))
        .unwrap_or_else(|_| text(500, "x"))
}
