//! An emulator of the ECS agent's task credentials endpoint — the
//! `/v1/credentials?id=…` and `/v2/credentials/…` routes the agent serves on
//! 127.0.0.1:51679 on the host (and that containers reach as
//! 169.254.170.2:80 through the agent's NAT rule).
//!
//! Its wire behaviour follows the agent's source (aws/amazon-ecs-agent,
//! `ecs-agent/tmds/handlers/v1/credentials_handler.go`,
//! `ecs-agent/tmds/handlers/v2/credentials_handler.go`,
//! `ecs-agent/tmds/handlers/utils/helpers.go`,
//! `ecs-agent/credentials/manager.go`, `agent/handlers/task_server_setup.go`):
//!
//! - success: `200`, `Content-Type: application/json`, the body
//!   `{"RoleArn":…,"AccessKeyId":…,"SecretAccessKey":…,"Token":…,"Expiration":…}`
//!   in that order, compact, no trailing newline;
//! - errors: `{"code":…,"message":"CredentialsV<n>Request: …","HTTPErrorCode":…}`
//!   with the same status — `400 NoIdInRequest` (no or empty id),
//!   `400 InvalidIdInRequest` ("Credentials not found"), `503
//!   CredentialsUninitialized` (an id known but not yet delivered);
//! - the routes accept any method (they are registered without a method
//!   filter); `/v2/credentials/` with an empty id is a `400`, not a `404`;
//! - any other path: gorilla/mux's `404 page not found\n`
//!   (`text/plain; charset=utf-8`, `X-Content-Type-Options: nosniff`);
//! - an unclean path (`//`, `.`, `..`) is redirected (`301`) to its cleaned
//!   form, as the agent's router does with path cleaning on.
//!
//! Task metadata v4 (`agent/handlers/v4/`): `/v4/<endpoint id>` (the
//! container), `/v4/<endpoint id>/task` (the task with all its
//! containers), and `…/stats`, `…/task/stats`, for the endpoints added
//! with [`AgentEmulator::add_task_metadata`] — each container of a task
//! has its own endpoint id (`ECS_CONTAINER_METADATA_URI_V4`); an unknown
//! id is a `404` with a JSON error, as the agent answers.
//!
//! Not emulated: the agent's request rate limiter (`429`), its audit log,
//! v3 and the other task metadata routes.
//!
//! Every request is logged with its source address and status before the
//! response is sent. The emulator owns no socket; the caller binds.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use hyper::header::{HeaderValue, LOCATION};
use hyper::{Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::http::{self, Body};
use crate::log::RequestLog;

/// One task's role credentials, with the agent's JSON field names.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TaskCredentials {
    /// The task role's ARN.
    #[serde(rename = "RoleArn")]
    pub role_arn: String,
    /// `ASIA…`
    #[serde(rename = "AccessKeyId")]
    pub access_key_id: String,
    /// The secret key.
    #[serde(rename = "SecretAccessKey")]
    pub secret_access_key: String,
    /// The session token.
    #[serde(rename = "Token")]
    pub token: String,
    /// RFC 3339 UTC expiry, e.g. `2024-05-01T18:00:00Z`.
    #[serde(rename = "Expiration")]
    pub expiration: String,
}

/// The agent's error body (`handlersutils.ErrorMessage`).
#[derive(Serialize)]
struct ErrorMessage<'a> {
    code: &'a str,
    message: String,
    #[serde(rename = "HTTPErrorCode")]
    http_error_code: u16,
}

/// A container's task-metadata (v4) document, with what the real agent's
/// carries — ARNs, the cluster, networks, labels — so that redaction has
/// something to remove.
pub fn container_document(
    docker_id: &str,
    name: &str,
    network_mode: &str,
    ipv4: &str,
    task_arn: &str,
) -> serde_json::Value {
    serde_json::json!({
        "DockerId": docker_id,
        "Name": name,
        "DockerName": name,
        "Image": "public.ecr.aws/lab/app:latest",
        "Labels": {"com.amazonaws.ecs.task-arn": task_arn, "com.amazonaws.ecs.cluster": "lab"},
        "DesiredStatus": "RUNNING",
        "KnownStatus": "RUNNING",
        "Type": "NORMAL",
        "ContainerARN": format!("arn:aws:ecs:us-east-1:111122223333:container/lab/{docker_id}"),
        "Networks": [{"NetworkMode": network_mode, "IPv4Addresses": [ipv4]}],
    })
}

/// A task's metadata (v4) document with its containers' documents.
pub fn task_document(
    arn: &str,
    family: &str,
    containers: Vec<serde_json::Value>,
) -> serde_json::Value {
    serde_json::json!({
        "Cluster": "arn:aws:ecs:us-east-1:111122223333:cluster/lab",
        "TaskARN": arn,
        "Family": family,
        "Revision": "1",
        "DesiredStatus": "RUNNING",
        "KnownStatus": "RUNNING",
        "AvailabilityZone": "us-east-1a",
        "LaunchType": "EC2",
        "Containers": containers,
    })
}

/// The ECS agent credentials emulator. Clones share state.
#[derive(Clone, Debug, Default)]
pub struct AgentEmulator {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    state: Mutex<State>,
    log: RequestLog,
}

#[derive(Debug, Default)]
struct State {
    credentials: HashMap<String, TaskCredentials>,
    /// Ids the agent knows of but whose credentials have not arrived.
    pending: HashSet<String>,
    /// TMDS v4 endpoint id → (its container's document, its task's).
    tmds: HashMap<String, (serde_json::Value, serde_json::Value)>,
    /// Short-lived credentials: their lifetime
    /// ([`AgentEmulator::set_credentials_lifetime`]).
    lifetime: Option<Duration>,
    /// Per credentials id: when the served credentials expire (whole
    /// seconds) and how many times they were re-minted.
    minted: HashMap<String, (SystemTime, u64)>,
}

/// Task credentials for `id`, expiring at `expires` (cut to whole
/// seconds); keys differ per `generation`.
fn mint(
    id: &str,
    role_arn: &str,
    expires: SystemTime,
    generation: u64,
) -> (TaskCredentials, SystemTime) {
    let secs = expires
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let expires = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
    let seed = if generation == 0 {
        id.to_string()
    } else {
        format!("{id}/{generation}")
    };
    let creds = TaskCredentials {
        role_arn: role_arn.to_string(),
        access_key_id: format!(
            "ASIA{}",
            http::fake_chars(&format!("{seed}/akid"), http::KEY_ID_ALPHABET, 16)
        ),
        secret_access_key: http::fake_chars(&format!("{seed}/secret"), http::SECRET_ALPHABET, 40),
        token: format!(
            "IQoJb3JpZ2luX2VjE{}",
            http::fake_chars(&format!("{seed}/token"), http::SECRET_ALPHABET, 300)
        ),
        expiration: http::rfc3339(expires),
    };
    (creds, expires)
}

impl AgentEmulator {
    /// An agent with no credentials.
    pub fn new() -> Self {
        Self::default()
    }

    /// Delivers credentials for credentials id `id` (replacing any), as ACS
    /// would: fake keys derived from `id`, expiring in six hours. Returns
    /// what the endpoint will serve.
    pub fn add_credentials(&self, id: &str, role_arn: &str) -> TaskCredentials {
        let mut state = self.state();
        let lifetime = state.lifetime.unwrap_or(Duration::from_secs(6 * 3600));
        let (creds, expires) = mint(id, role_arn, SystemTime::now() + lifetime, 0);
        state.pending.remove(id);
        state.minted.insert(id.to_string(), (expires, 0));
        state.credentials.insert(id.to_string(), creds.clone());
        creds
    }

    /// Makes task credentials short-lived, from their next delivery or
    /// renewal on: they expire `lifetime` after they are minted, and new
    /// ones are served once half of that is left (the agent receives new
    /// credentials from ACS well before the old ones expire).
    pub fn set_credentials_lifetime(&self, lifetime: Duration) {
        let mut state = self.state();
        state.lifetime = Some(lifetime);
        let now = SystemTime::now();
        let ids: Vec<String> = state.credentials.keys().cloned().collect();
        for id in ids {
            renew(&mut state, &id, now, true);
        }
    }

    /// Marks `id` as known but not yet delivered: requests for it get
    /// `503 CredentialsUninitialized` until [`AgentEmulator::add_credentials`].
    pub fn add_pending(&self, id: &str) {
        let mut state = self.state();
        if !state.credentials.contains_key(id) {
            state.pending.insert(id.to_string());
        }
    }

    /// Forgets `id` (the task stopped).
    pub fn remove_credentials(&self, id: &str) {
        let mut state = self.state();
        state.credentials.remove(id);
        state.pending.remove(id);
    }

    /// Serves task metadata v4 for `task` (the task document, with every
    /// container in `Containers`): each container's endpoint id is the
    /// key of its document in `endpoints` (endpoint id → `DockerId`).
    pub fn add_task_metadata(&self, task: serde_json::Value, endpoints: &[(&str, &str)]) {
        let containers = task["Containers"].as_array().cloned().unwrap_or_default();
        let mut state = self.state();
        for (endpoint, docker_id) in endpoints {
            let own = containers
                .iter()
                .find(|c| c["DockerId"] == *docker_id)
                .cloned()
                .unwrap_or_default();
            state
                .tmds
                .insert((*endpoint).to_string(), (own, task.clone()));
        }
    }

    /// The credentials served for `id`, if any.
    pub fn credentials(&self, id: &str) -> Option<TaskCredentials> {
        self.state().credentials.get(id).cloned()
    }

    /// The log of every request answered (shared, not a snapshot).
    pub fn log(&self) -> RequestLog {
        self.inner.log.clone()
    }

    /// Serves the endpoint on `listener` until the future is dropped, logging
    /// every request answered (see [`http::serve_logged`]).
    pub async fn serve(&self, listener: TcpListener) -> std::io::Result<()> {
        http::serve_logged(listener, self.clone(), self.inner.log.clone(), |me, req| {
            me.respond(req)
        })
        .await
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn respond<B>(&self, req: &Request<B>) -> Response<Body> {
        let raw = req.uri().path();
        let cleaned = clean_path(raw);
        if cleaned != raw {
            let location = match req.uri().query() {
                Some(q) => format!("{cleaned}?{q}"),
                None => cleaned,
            };
            let mut resp = Response::new(Body::default());
            *resp.status_mut() = StatusCode::MOVED_PERMANENTLY;
            if let Ok(v) = HeaderValue::from_str(&location) {
                resp.headers_mut().insert(LOCATION, v);
            }
            return resp;
        }
        // Routes match the decoded path, as gorilla/mux does; Go's server
        // refuses a target with a broken escape before any handler runs.
        let Some(path) = percent_decode(raw, false) else {
            return http::response(
                StatusCode::BAD_REQUEST,
                "text/plain; charset=utf-8",
                "400 Bad Request",
            );
        };
        if path == "/v1/credentials" {
            let id = query_value(req.uri().query().unwrap_or(""), "id").unwrap_or_default();
            self.credentials_response(&id, 1)
        } else if let Some(id) = path.strip_prefix("/v2/credentials/") {
            self.credentials_response(id, 2)
        } else if let Some(rest) = path.strip_prefix("/v4/") {
            self.tmds_v4(rest)
        } else {
            let mut resp = http::response(
                StatusCode::NOT_FOUND,
                "text/plain; charset=utf-8",
                "404 page not found\n",
            );
            resp.headers_mut().insert(
                "x-content-type-options",
                HeaderValue::from_static("nosniff"),
            );
            resp
        }
    }

    /// `/v4/<endpoint id>[/task][/stats]`.
    fn tmds_v4(&self, rest: &str) -> Response<Body> {
        let (id, route) = rest.split_once('/').unwrap_or((rest, ""));
        let state = self.state();
        let Some((container, task)) = state.tmds.get(id) else {
            return http::json(
                StatusCode::NOT_FOUND,
                format!(
                    "{{\"error\":\"V4 metadata handler: unable to get task arn from request: unable to get task Arn from v3 endpoint ID: {id}\"}}"
                ),
            );
        };
        let body = match route {
            "" => container.clone(),
            "task" => task.clone(),
            "stats" => {
                serde_json::json!({"read": "2024-05-01T12:00:00Z", "memory_stats": {"usage": 7340032}})
            }
            "task/stats" => serde_json::json!({}),
            _ => {
                return http::response(
                    StatusCode::NOT_FOUND,
                    "text/plain; charset=utf-8",
                    "404 page not found\n",
                )
            }
        };
        http::json(StatusCode::OK, body.to_string())
    }

    fn credentials_response(&self, id: &str, version: u8) -> Response<Body> {
        let prefix = format!("CredentialsV{version}Request: ");
        if id.is_empty() {
            return error(
                StatusCode::BAD_REQUEST,
                "NoIdInRequest",
                format!("{prefix}No Credential ID in the request"),
            );
        }
        let mut state = self.state();
        renew(&mut state, id, SystemTime::now(), false);
        if state.pending.contains(id) {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "CredentialsUninitialized",
                format!("{prefix}Credentials uninitialized for ID"),
            );
        }
        let Some(creds) = state.credentials.get(id) else {
            return error(
                StatusCode::BAD_REQUEST,
                "InvalidIdInRequest",
                format!("{prefix}Credentials not found"),
            );
        };
        match serde_json::to_vec(creds) {
            Ok(body) => http::json(StatusCode::OK, body),
            // The agent answers a marshalling failure with `500 {}`.
            Err(_) => http::json(StatusCode::INTERNAL_SERVER_ERROR, "{}"),
        }
    }
}

/// Re-mints `id`'s credentials when they are short-lived and half their
/// lifetime is gone (or at once with `now_anyway`).
fn renew(state: &mut State, id: &str, now: SystemTime, now_anyway: bool) {
    let Some(l) = state.lifetime else { return };
    let Some(old) = state.credentials.get(id) else {
        return;
    };
    let (expires, generation) = state.minted.get(id).copied().unwrap_or((now, 0));
    let due = expires.checked_sub(l / 2).unwrap_or(expires);
    if now_anyway || now >= due {
        let (creds, expires) = mint(id, &old.role_arn, now + l, generation + 1);
        state
            .minted
            .insert(id.to_string(), (expires, generation + 1));
        state.credentials.insert(id.to_string(), creds);
    }
}

fn error(status: StatusCode, code: &str, message: String) -> Response<Body> {
    let msg = ErrorMessage {
        code,
        message,
        http_error_code: status.as_u16(),
    };
    match serde_json::to_vec(&msg) {
        Ok(body) => http::json(status, body),
        Err(_) => http::json(StatusCode::INTERNAL_SERVER_ERROR, "{}"),
    }
}

/// Go's `path.Clean` as gorilla/mux applies it: collapse `//`, resolve `.`
/// and `..`, keep a trailing slash.
fn clean_path(p: &str) -> String {
    if p.is_empty() {
        return "/".to_string();
    }
    let mut parts: Vec<&str> = Vec::new();
    for seg in p.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            s => parts.push(s),
        }
    }
    let mut out = format!("/{}", parts.join("/"));
    if p.ends_with('/') && out != "/" {
        out.push('/');
    }
    out
}

/// Decodes `%XX` escapes (and `+` as space when `plus_is_space`); `None` on
/// a malformed escape. Bytes that are not UTF-8 are replaced.
fn percent_decode(s: &str, plus_is_space: bool) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'%' => {
                let hi = hex(*bytes.get(i + 1)?)?;
                let lo = hex(*bytes.get(i + 2)?)?;
                out.push(hi << 4 | lo);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The first value of `key` in a query string, decoded as Go's
/// `url.ParseQuery` does (pairs with a bad escape are skipped).
fn query_value(query: &str, key: &str) -> Option<String> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Some((percent_decode(k, true)?, percent_decode(v, true)?))
        })
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_path_like_go() {
        assert_eq!(clean_path("/v2/credentials/x"), "/v2/credentials/x");
        assert_eq!(clean_path("/v2/credentials/"), "/v2/credentials/");
        assert_eq!(clean_path("//v2//credentials/x"), "/v2/credentials/x");
        assert_eq!(clean_path("/v2/credentials/../x"), "/v2/x");
        assert_eq!(clean_path("/../.."), "/");
        assert_eq!(clean_path("/./a/./"), "/a/");
    }

    #[test]
    fn query_parsing_like_go() {
        assert_eq!(query_value("id=abc", "id").as_deref(), Some("abc"));
        assert_eq!(
            query_value("x=1&id=a%2Fb+c&id=2", "id").as_deref(),
            Some("a/b c")
        );
        assert_eq!(query_value("id", "id").as_deref(), Some(""));
        assert_eq!(query_value("id=%zz&id=ok", "id").as_deref(), Some("ok"));
        assert_eq!(query_value("", "id"), None);
    }

    #[test]
    fn percent_decode_rejects_broken_escapes() {
        assert_eq!(percent_decode("/a%20b", false).as_deref(), Some("/a b"));
        assert_eq!(percent_decode("/a+b", false).as_deref(), Some("/a+b"));
        assert_eq!(percent_decode("/a%2", false), None);
        assert_eq!(percent_decode("/a%g0", false), None);
    }

    #[test]
    fn credentials_are_deterministic_per_id() {
        let agent = AgentEmulator::new();
        let a = agent.add_credentials("id-1", "arn:aws:iam::111122223333:role/a");
        let b = AgentEmulator::new().add_credentials("id-1", "arn:aws:iam::111122223333:role/a");
        assert_eq!(a.access_key_id, b.access_key_id);
        assert!(a.access_key_id.starts_with("ASIA") && a.access_key_id.len() == 20);
        assert_eq!(a.secret_access_key.len(), 40);
        assert!(a.expiration.ends_with('Z'));
        assert_eq!(agent.credentials("id-1"), Some(a));
        agent.remove_credentials("id-1");
        assert_eq!(agent.credentials("id-1"), None);
    }

    #[test]
    fn json_field_names_and_order() {
        let c = TaskCredentials {
            role_arn: "r".into(),
            access_key_id: "a".into(),
            secret_access_key: "s".into(),
            token: "t".into(),
            expiration: "e".into(),
        };
        let body = serde_json::to_string(&c).expect("serializes");
        assert_eq!(
            body,
            r#"{"RoleArn":"r","AccessKeyId":"a","SecretAccessKey":"s","Token":"t","Expiration":"e"}"#
        );
        let msg = ErrorMessage {
            code: "InvalidIdInRequest",
            message: "CredentialsV2Request: Credentials not found".into(),
            http_error_code: 400,
        };
        assert_eq!(
            serde_json::to_string(&msg).expect("serializes"),
            r#"{"code":"InvalidIdInRequest","message":"CredentialsV2Request: Credentials not found","HTTPErrorCode":400}"#
        );
    }
}
