//! HTTP/1.1 over a unix socket, blocking: the Docker Engine API client the
//! stand-in agent uses (as the real agent's Docker client does), and the
//! test's client of the agent's control socket and of the stand-in dockerd.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use super::api::{TaskInfo, TaskSpec};

/// A client of one unix socket.
#[derive(Debug, Clone)]
pub struct UnixHttp {
    socket: PathBuf,
    timeout: Duration,
}

/// A failed call: what was asked, and why it failed (transport or status).
#[derive(Debug, thiserror::Error)]
#[error("{method} {path} on {socket}: {message}")]
pub struct CallError {
    pub method: String,
    pub path: String,
    pub socket: PathBuf,
    /// The HTTP status, when the server answered.
    pub status: Option<u16>,
    pub message: String,
}

impl UnixHttp {
    pub fn new(socket: impl Into<PathBuf>) -> UnixHttp {
        UnixHttp {
            socket: socket.into(),
            timeout: Duration::from_secs(30),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// One request with an optional JSON body; the status and the body.
    pub fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Bytes), CallError> {
        let err = |status: Option<u16>, message: String| CallError {
            method: method.to_string(),
            path: path.to_string(),
            socket: self.socket.clone(),
            status,
            message,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| err(None, format!("runtime: {e}")))?;
        let payload = body.map(|b| b.to_string()).unwrap_or_default();
        let fut = async {
            let stream = tokio::net::UnixStream::connect(&self.socket)
                .await
                .map_err(|e| err(None, format!("connect: {e}")))?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| err(None, format!("handshake: {e}")))?;
            tokio::spawn(conn);
            let req = Request::builder()
                .method(method.clone())
                .uri(path)
                .header("host", "localhost")
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(payload)))
                .map_err(|e| err(None, format!("request: {e}")))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| err(None, format!("send: {e}")))?;
            let status = resp.status().as_u16();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| err(Some(status), format!("body: {e}")))?
                .to_bytes();
            Ok((status, bytes))
        };
        rt.block_on(async {
            tokio::time::timeout(self.timeout, fut)
                .await
                .map_err(|_| err(None, format!("no answer within {:?}", self.timeout)))?
        })
    }

    /// A call that must answer 2xx; its body parsed as JSON (`null` when
    /// empty).
    pub fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, CallError> {
        let (status, bytes) = self.call(method.clone(), path, body)?;
        if !(200..300).contains(&status) {
            return Err(CallError {
                method: method.to_string(),
                path: path.to_string(),
                socket: self.socket.clone(),
                status: Some(status),
                message: format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes).trim()),
            });
        }
        if bytes.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).map_err(|e| CallError {
            method: method.to_string(),
            path: path.to_string(),
            socket: self.socket.clone(),
            status: Some(status),
            message: format!("bad JSON: {e}"),
        })
    }
}

/// The Docker Engine API calls `docker run`, `docker stop` and
/// `docker inspect` make.
#[derive(Debug, Clone)]
pub struct DockerClient(pub UnixHttp);

impl DockerClient {
    pub fn new(socket: impl Into<PathBuf>) -> DockerClient {
        DockerClient(UnixHttp::new(socket))
    }

    /// `docker create` + `docker start`; returns the container's id.
    pub fn run(&self, name: &str, create: &Value) -> Result<String, CallError> {
        let created = self.0.json(
            Method::POST,
            &format!("/v1.44/containers/create?name={name}"),
            Some(create),
        )?;
        let id = created["Id"].as_str().unwrap_or_default().to_string();
        self.0
            .json(Method::POST, &format!("/v1.44/containers/{id}/start"), None)?;
        Ok(id)
    }

    pub fn inspect(&self, id: &str) -> Result<Value, CallError> {
        self.0
            .json(Method::GET, &format!("/v1.44/containers/{id}/json"), None)
    }

    /// `docker rm -f`.
    pub fn remove(&self, id: &str) -> Result<(), CallError> {
        self.0
            .json(
                Method::DELETE,
                &format!("/v1.44/containers/{id}?force=1"),
                None,
            )
            .map(drop)
    }
}

/// The stand-in agent's control socket.
#[derive(Debug, Clone)]
pub struct AgentControl(pub UnixHttp);

impl AgentControl {
    pub fn new(socket: impl Into<PathBuf>) -> AgentControl {
        AgentControl(UnixHttp::new(socket))
    }

    /// Runs a task; returns once its containers run.
    pub fn run_task(&self, spec: &TaskSpec) -> Result<TaskInfo, CallError> {
        let body = serde_json::to_value(spec).unwrap_or_default();
        let v = self.0.json(Method::POST, "/tasks", Some(&body))?;
        serde_json::from_value(v).map_err(|e| CallError {
            method: "POST".into(),
            path: "/tasks".into(),
            socket: self.0.socket.clone(),
            status: None,
            message: format!("bad task JSON: {e}"),
        })
    }

    /// Stops a task: its containers are removed and its credentials
    /// forgotten.
    pub fn stop_task(&self, id: &str) -> Result<(), CallError> {
        self.0
            .json(Method::DELETE, &format!("/tasks/{id}"), None)
            .map(drop)
    }

    /// Every request the agent's credentials endpoint answered.
    pub fn requests(&self) -> Result<Vec<Value>, CallError> {
        let v = self.0.json(Method::GET, "/requests", None)?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }
}
