//! The request log shared by the lab's servers (the IMDS emulator, the ECS
//! agent emulator, the echo service).
//!
//! Tests read it to prove that a request did — or did not — arrive, from
//! which source address, and what it was answered. A server pushes an entry
//! *before* it sends its response, so once a client has its answer the entry
//! is visible.
//!
//! This module owns only the in-memory record; it does no I/O. A poisoned
//! lock is recovered (the log is plain data, there is no invariant a
//! panicking writer could have broken half-way), so no reader or writer ever
//! panics because another one did.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

/// One request as a server saw it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LoggedRequest {
    /// When the request was answered, in milliseconds since the Unix epoch.
    pub at_unix_ms: u128,
    /// The client's address (source of the connection).
    pub peer: SocketAddr,
    /// The server's address the connection arrived on.
    pub local: SocketAddr,
    /// The request method (`GET`, `PUT`, … or `TCP`/`UDP` for raw probes).
    pub method: String,
    /// The raw request target, including any query.
    pub target: String,
    /// Header names lowercased, values as sent (lossily decoded), in order.
    pub headers: Vec<(String, String)>,
    /// The status code the server answered (0 when there is none).
    pub status: u16,
}

impl LoggedRequest {
    /// Records an HTTP request together with the status it is being
    /// answered, stamped with the current time.
    pub fn from_request<B>(
        peer: SocketAddr,
        local: SocketAddr,
        req: &hyper::Request<B>,
        status: u16,
    ) -> Self {
        let headers = req
            .headers()
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_ascii_lowercase(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect();
        LoggedRequest {
            at_unix_ms: now_unix_ms(),
            peer,
            local,
            method: req.method().as_str().to_string(),
            target: req.uri().to_string(),
            headers,
            status,
        }
    }

    /// The first value of header `name` (matched case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// A shared, append-only (until [`RequestLog::clear`]) list of requests.
/// Clones share the same list.
#[derive(Clone, Default, Debug)]
pub struct RequestLog(Arc<Mutex<Vec<LoggedRequest>>>);

impl RequestLog {
    fn lock(&self) -> MutexGuard<'_, Vec<LoggedRequest>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Appends one entry.
    pub fn push(&self, r: LoggedRequest) {
        self.lock().push(r);
    }

    /// A snapshot of every entry, oldest first.
    pub fn entries(&self) -> Vec<LoggedRequest> {
        self.lock().clone()
    }

    /// How many entries there are.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Forgets every entry.
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// The entries whose header `name` (case-insensitive) has exactly `value`.
    pub fn with_header(&self, name: &str, value: &str) -> Vec<LoggedRequest> {
        self.lock()
            .iter()
            .filter(|r| r.header(name) == Some(value))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(method: &str, headers: &[(&str, &str)]) -> LoggedRequest {
        LoggedRequest {
            at_unix_ms: 1,
            peer: ([127, 0, 0, 1], 1000).into(),
            local: ([127, 0, 0, 1], 80).into(),
            method: method.to_string(),
            target: "/".to_string(),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            status: 200,
        }
    }

    #[test]
    fn push_len_clear() {
        let log = RequestLog::default();
        assert!(log.is_empty());
        let other = log.clone();
        other.push(entry("GET", &[]));
        assert_eq!(log.len(), 1);
        assert_eq!(log.entries()[0].method, "GET");
        log.clear();
        assert!(other.is_empty());
    }

    #[test]
    fn header_lookup_is_case_insensitive_and_first_wins() {
        let e = entry("GET", &[("x-lab-probe", "a"), ("x-lab-probe", "b")]);
        assert_eq!(e.header("X-Lab-Probe"), Some("a"));
        assert_eq!(e.header("absent"), None);
        let log = RequestLog::default();
        log.push(e);
        log.push(entry("PUT", &[("x-lab-probe", "c")]));
        assert_eq!(log.with_header("x-lab-probe", "c").len(), 1);
        assert_eq!(log.with_header("X-LAB-PROBE", "a").len(), 1);
        assert!(log.with_header("x-lab-probe", "b").is_empty());
    }

    #[test]
    fn poisoned_lock_is_recovered() {
        let log = RequestLog::default();
        let l2 = log.clone();
        let _ = std::thread::spawn(move || {
            let _guard = l2.0.lock();
            panic!("poison the lock");
        })
        .join();
        assert!(log.0.is_poisoned());
        log.push(entry("GET", &[]));
        assert_eq!(log.len(), 1);
    }

    #[test]
    fn from_request_lowercases_and_keeps_order() {
        let req = hyper::Request::builder()
            .method("PUT")
            .uri("/latest/api/token?x=1")
            .header("X-B", "2")
            .header("X-A", "1")
            .body(())
            .expect("valid request");
        let e = LoggedRequest::from_request(
            ([127, 0, 0, 1], 5).into(),
            ([127, 0, 0, 1], 6).into(),
            &req,
            403,
        );
        assert_eq!(e.method, "PUT");
        assert_eq!(e.target, "/latest/api/token?x=1");
        assert_eq!(
            e.headers,
            vec![("x-b".into(), "2".into()), ("x-a".into(), "1".into())]
        );
        assert_eq!(e.status, 403);
    }
}
