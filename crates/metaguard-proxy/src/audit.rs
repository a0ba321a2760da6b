//! The audit log: one JSON line per request. Credentials are never
//! written; a credentials id is shortened to its first 4 characters (ids
//! are bearer capabilities).

use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::{Caller, Kind};

/// Where audit lines go.
#[derive(Debug, Clone)]
pub struct AuditSink {
    file: Option<Arc<Mutex<std::fs::File>>>,
}

/// One request, as audited.
#[derive(Debug)]
pub struct Entry<'a> {
    pub kind: Kind,
    pub caller: &'a Caller,
    pub workload: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub decision: &'a str,
    pub rule: &'a str,
    pub status: u16,
    pub upstream: Option<Duration>,
    /// For a request the answer cache was asked for: `hit`, `miss`,
    /// `stale` (served after an upstream failure) or `bypass`.
    pub cache: Option<&'a str>,
}

impl AuditSink {
    /// Appends to `path` (created, with its directory), or logs to stderr
    /// through `tracing` when `None`.
    pub fn open(path: Option<&str>) -> std::io::Result<AuditSink> {
        let file = match path {
            None => None,
            Some(p) => {
                if let Some(dir) = std::path::Path::new(p).parent() {
                    std::fs::create_dir_all(dir)?;
                }
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?;
                Some(Arc::new(Mutex::new(f)))
            }
        };
        Ok(AuditSink { file })
    }

    /// Writes one line: a single `write` on an `O_APPEND` file, so lines
    /// from concurrent workers never interleave.
    fn write<T: Serialize>(&self, line: &T) {
        match &self.file {
            Some(f) => {
                let mut buf = Vec::with_capacity(512);
                if serde_json::to_writer(&mut buf, line).is_err() {
                    return;
                }
                buf.push(b'\n');
                let mut f = f.lock().unwrap_or_else(|p| p.into_inner());
                if let Err(e) = f.write_all(&buf) {
                    tracing::warn!(error = %e, "cannot write the audit log");
                }
            }
            None => {
                let v = serde_json::to_string(line).unwrap_or_default();
                tracing::info!(target: "metaguard::audit", audit = %v, "proxy");
            }
        }
    }

    pub fn request(&self, e: &Entry<'_>) {
        self.write(&Line {
            time: now(),
            audit: "proxy",
            service: e.kind.as_str(),
            workload: e.workload,
            container: e.caller.container.as_deref(),
            origin: &e.caller.origin,
            method: Some(e.method),
            path: Some(e.path),
            decision: e.decision,
            rule: e.rule,
            status: Some(e.status),
            upstream_ms: e
                .upstream
                .map(|d| (d.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0),
            cache: e.cache,
        });
    }

    pub fn connection_refused(&self, kind: Kind, caller: &Caller, workload: &str, reason: &str) {
        self.write(&Line {
            time: now(),
            audit: "proxy",
            service: kind.as_str(),
            workload,
            container: caller.container.as_deref(),
            origin: &caller.origin,
            method: None,
            path: None,
            decision: "refused-connection",
            rule: reason,
            status: None,
            upstream_ms: None,
            cache: None,
        });
    }
}

/// One audit line, serialized as is (no intermediate JSON value).
#[derive(Serialize)]
struct Line<'a> {
    time: String,
    audit: &'static str,
    service: &'a str,
    workload: &'a str,
    container: Option<&'a str>,
    origin: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    method: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<&'a str>,
    decision: &'a str,
    rule: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    upstream_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache: Option<&'a str>,
}

fn now() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}.{:03}", d.as_secs(), d.subsec_millis())
}
