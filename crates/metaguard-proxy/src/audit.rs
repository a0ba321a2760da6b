//! The audit log: one JSON line per request, buffered and written by a
//! thread of its own (see [`AuditSink`]). Credentials are never written; a
//! credentials id is shortened to its first 4 characters (ids are bearer
//! capabilities).

use std::io::Write as _;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::{Caller, Kind};

/// The longest an audit line waits in memory before it is written: lines
/// are collected and written in one `write` per interval (or per
/// `FLUSH_BYTES`, 64 KiB), off the request path.
pub const FLUSH_EVERY: Duration = Duration::from_millis(20);

/// Collected lines are written at once when they reach this size.
const FLUSH_BYTES: usize = 64 * 1024;

/// Where audit lines go.
///
/// To a file, lines are buffered: a request serializes its line and
/// appends it to a buffer in memory, and a writer thread writes the buffer
/// with one `write` on the `O_APPEND` file at most [`FLUSH_EVERY`] after
/// its first line (sooner at 64 KiB, `FLUSH_BYTES`). Nothing is lost on an
/// orderly end: [`AuditSink::flush`], and dropping the last clone of a
/// sink (a reload's old settings, the daemon stopping on SIGTERM/SIGINT
/// after its workers have ended), write everything first. SIGKILL or a
/// crash can lose the lines of the last interval.
#[derive(Debug, Clone)]
pub struct AuditSink {
    file: Option<Arc<Writer>>,
}

/// The buffer, its file and the thread that writes it; the thread ends,
/// writing what is left, when the last sink clone is dropped.
#[derive(Debug)]
struct Writer {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Debug)]
struct Shared {
    pending: Mutex<Pending>,
    /// Signalled when the buffer gets its first line, and on close.
    wake: Condvar,
    /// Held while a batch is written, taken before `pending` is released:
    /// batches reach the file in the order their lines were buffered.
    file: Mutex<std::fs::File>,
}

#[derive(Debug, Default)]
struct Pending {
    buf: Vec<u8>,
    closed: bool,
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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    /// Writes what `p` holds (taken out of it) and releases `p` before the
    /// `write`, so requests keep appending meanwhile.
    fn write_out(&self, mut p: MutexGuard<'_, Pending>) {
        if p.buf.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut p.buf);
        let mut f = lock(&self.file);
        drop(p);
        if let Err(e) = f.write_all(&batch) {
            tracing::warn!(error = %e, bytes = batch.len(), "cannot write the audit log");
        }
    }

    /// The writer thread: waits for a first line, lets lines gather for
    /// [`FLUSH_EVERY`] (cut short by a close), writes them.
    fn run(&self) {
        let mut p = lock(&self.pending);
        loop {
            while p.buf.is_empty() && !p.closed {
                p = self.wake.wait(p).unwrap_or_else(|e| e.into_inner());
            }
            if !p.closed {
                p = self
                    .wake
                    .wait_timeout_while(p, FLUSH_EVERY, |p| !p.closed)
                    .map_or_else(|e| e.into_inner().0, |(p, _)| p);
            }
            let closed = p.closed;
            self.write_out(p);
            if closed {
                // A line appended after the close (a request racing the
                // last drop) is written by `Writer::drop`.
                return;
            }
            p = lock(&self.pending);
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        lock(&self.shared.pending).closed = true;
        self.shared.wake.notify_all();
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
        self.shared.write_out(lock(&self.shared.pending));
    }
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
                let shared = Arc::new(Shared {
                    pending: Mutex::new(Pending::default()),
                    wake: Condvar::new(),
                    file: Mutex::new(f),
                });
                let worker = shared.clone();
                let thread = std::thread::Builder::new()
                    .name("mg-audit".into())
                    .spawn(move || worker.run())?;
                Some(Arc::new(Writer {
                    shared,
                    thread: Mutex::new(Some(thread)),
                }))
            }
        };
        Ok(AuditSink { file })
    }

    /// Writes every line buffered so far before returning.
    pub fn flush(&self) {
        if let Some(w) = &self.file {
            w.shared.write_out(lock(&w.shared.pending));
        }
    }

    /// Buffers one line (whole lines only: a batch is one `write` on an
    /// `O_APPEND` file, so lines never interleave, whatever the workers).
    fn write(&self, line: &Line<'_>) {
        thread_local! {
            /// Where a line is serialized before it joins the batch: one
            /// buffer per worker thread, kept between requests.
            static LINE: std::cell::RefCell<Vec<u8>> =
                std::cell::RefCell::new(Vec::with_capacity(512));
        }
        match &self.file {
            Some(w) => LINE.with_borrow_mut(|one| {
                one.clear();
                line.write_json(one);
                one.push(b'\n');
                let mut p = lock(&w.shared.pending);
                let first = p.buf.is_empty();
                p.buf.extend_from_slice(one);
                if p.buf.len() >= FLUSH_BYTES {
                    w.shared.write_out(p);
                } else if first {
                    drop(p);
                    w.shared.wake.notify_one();
                }
            }),
            None => {
                let mut v = Vec::with_capacity(256);
                line.write_json(&mut v);
                let v = String::from_utf8_lossy(&v);
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

    /// A request whose head hyper refused before the proxy saw it
    /// (malformed, or over `MAX_HEAD`): hyper answered `status` itself.
    /// No method or path: they are what could not be read.
    pub fn head_refused(
        &self,
        kind: Kind,
        caller: &Caller,
        workload: &str,
        status: u16,
        reason: &str,
    ) {
        self.unread(kind, caller, workload, "invalid", reason, Some(status));
    }

    pub fn connection_refused(&self, kind: Kind, caller: &Caller, workload: &str, reason: &str) {
        self.unread(kind, caller, workload, "refused-connection", reason, None);
    }

    /// A line for a connection whose request was never read.
    fn unread(
        &self,
        kind: Kind,
        caller: &Caller,
        workload: &str,
        decision: &str,
        rule: &str,
        status: Option<u16>,
    ) {
        self.write(&Line {
            time: now(),
            audit: "proxy",
            service: kind.as_str(),
            workload,
            container: caller.container.as_deref(),
            origin: &caller.origin,
            method: None,
            path: None,
            decision,
            rule,
            status,
            upstream_ms: None,
            cache: None,
        });
    }
}

/// One audit line.
///
/// Written by [`Line::write_json`]: the same bytes as `serde_json` writes
/// for this struct (the test `a_line_is_the_json_serde_writes` holds them
/// equal over arbitrary values), with its keys written as the constants
/// they are and a string that needs no escaping copied as it is. The
/// derived serializer ran every key and every value through serde_json's
/// escaper and formatted the time through `core::fmt`: 5.5 k of the 19.7 k
/// instructions of a cache hit's handling (callgrind, BENCHMARKS.md).
#[cfg_attr(test, derive(serde::Serialize))]
struct Line<'a> {
    time: Now,
    audit: &'static str,
    service: &'a str,
    workload: &'a str,
    container: Option<&'a str>,
    origin: &'a str,
    #[cfg_attr(test, serde(skip_serializing_if = "Option::is_none"))]
    method: Option<&'a str>,
    #[cfg_attr(test, serde(skip_serializing_if = "Option::is_none"))]
    path: Option<&'a str>,
    decision: &'a str,
    rule: &'a str,
    #[cfg_attr(test, serde(skip_serializing_if = "Option::is_none"))]
    status: Option<u16>,
    upstream_ms: Option<f64>,
    #[cfg_attr(test, serde(skip_serializing_if = "Option::is_none"))]
    cache: Option<&'a str>,
}

impl Line<'_> {
    /// Appends the line's JSON object (no newline) to `out`.
    fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"time\":\"");
        self.time.write(out);
        out.extend_from_slice(b"\",\"audit\":");
        json_str(out, self.audit);
        out.extend_from_slice(b",\"service\":");
        json_str(out, self.service);
        out.extend_from_slice(b",\"workload\":");
        json_str(out, self.workload);
        out.extend_from_slice(b",\"container\":");
        match self.container {
            Some(c) => json_str(out, c),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"origin\":");
        json_str(out, self.origin);
        if let Some(m) = self.method {
            out.extend_from_slice(b",\"method\":");
            json_str(out, m);
        }
        if let Some(p) = self.path {
            out.extend_from_slice(b",\"path\":");
            json_str(out, p);
        }
        out.extend_from_slice(b",\"decision\":");
        json_str(out, self.decision);
        out.extend_from_slice(b",\"rule\":");
        json_str(out, self.rule);
        if let Some(s) = self.status {
            out.extend_from_slice(b",\"status\":");
            out.extend_from_slice(itoa::Buffer::new().format(s).as_bytes());
        }
        out.extend_from_slice(b",\"upstream_ms\":");
        // serde_json's own number form (and `null` for a non-finite one).
        let _ = serde_json::to_writer(&mut *out, &self.upstream_ms);
        if let Some(c) = self.cache {
            out.extend_from_slice(b",\"cache\":");
            json_str(out, c);
        }
        out.push(b'}');
    }
}

/// Appends `s` as a JSON string. JSON escapes only `"`, `\` and the
/// control characters below U+0020 (and `serde_json` nothing else), so a
/// string without them is copied between quotes as it is; any other is
/// left to `serde_json`.
fn json_str(out: &mut Vec<u8>, s: &str) {
    // Every byte looked at, without an early exit: the lines' strings are
    // short and nearly all plain.
    let plain = s
        .bytes()
        .fold(true, |ok, b| ok & (b >= 0x20) & (b != b'"') & (b != b'\\'));
    if plain {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

/// The time of a line: seconds since the epoch, to the millisecond.
struct Now(Duration);

fn now() -> Now {
    Now(SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default())
}

impl Now {
    /// `<seconds>.<milliseconds, 3 digits>`, without `core::fmt`.
    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(itoa::Buffer::new().format(self.0.as_secs()).as_bytes());
        let ms = self.0.subsec_millis();
        out.extend_from_slice(&[
            b'.',
            b'0' + (ms / 100) as u8,
            b'0' + (ms / 10 % 10) as u8,
            b'0' + (ms % 10) as u8,
        ]);
    }
}

#[cfg(test)]
impl serde::Serialize for Now {
    /// The form `Now::write` writes, for the reference serializer.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!(
            "{}.{:03}",
            self.0.as_secs(),
            self.0.subsec_millis()
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use proptest::prelude::*;

    use super::*;

    fn temp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("mg-audit-{}-{name}.jsonl", std::process::id()))
    }

    fn line(sink: &AuditSink, caller: &Caller, n: usize) {
        let path = format!("/latest/meta-data/{n}");
        sink.request(&Entry {
            kind: Kind::Imds,
            caller,
            workload: "w",
            method: "GET",
            path: &path,
            decision: "allow",
            rule: "r",
            status: 200,
            upstream: None,
            cache: Some("hit"),
        });
    }

    fn count(p: &std::path::Path) -> usize {
        std::fs::read_to_string(p).map_or(0, |t| t.lines().count())
    }

    /// Every ASCII character, alone and between others, and some beyond
    /// ASCII: `json_str` writes what `serde_json` writes.
    #[test]
    fn a_string_is_escaped_as_serde_escapes_it() {
        let chars = (0u8..=127)
            .map(char::from)
            .chain(['é', '\u{2028}', '\u{10ffff}']);
        for c in chars {
            for s in [c.to_string(), format!("a{c}b")] {
                let mut ours = Vec::new();
                json_str(&mut ours, &s);
                let theirs = serde_json::to_vec(&s).expect("serializes");
                assert_eq!(ours, theirs, "{s:?}");
            }
        }
    }

    /// Any string, weighted towards what JSON must escape.
    fn text() -> impl Strategy<Value = String> {
        proptest::string::string_regex("([\\x00-\\x1f\"\\\\/\\x7f]|[a-z.-]|\\PC){0,12}")
            .expect("regex")
    }

    proptest! {
        /// `Line::write_json` writes exactly what `serde_json` writes for
        /// the derived `Serialize`: every field, present or absent, any
        /// string (quotes, backslashes, control characters, DEL, non-ASCII),
        /// any status, any upstream time (non-finite ones included).
        #[test]
        fn a_line_is_the_json_serde_writes(
            secs in any::<u64>(),
            nanos in 0u32..1_000_000_000,
            service in text(),
            workload in text(),
            container in proptest::option::of(text()),
            origin in text(),
            method in proptest::option::of(text()),
            path in proptest::option::of(text()),
            decision in text(),
            rule in text(),
            status in proptest::option::of(any::<u16>()),
            upstream_ms in proptest::option::of(prop_oneof![
                any::<f64>(),
                (0u64..10_000_000).prop_map(|us| us as f64 / 1000.0),
            ]),
            cache in proptest::option::of(text()),
        ) {
            let line = Line {
                time: Now(Duration::new(secs, nanos)),
                audit: "proxy",
                service: &service,
                workload: &workload,
                container: container.as_deref(),
                origin: &origin,
                method: method.as_deref(),
                path: path.as_deref(),
                decision: &decision,
                rule: &rule,
                status,
                upstream_ms,
                cache: cache.as_deref(),
            };
            let mut ours = Vec::new();
            line.write_json(&mut ours);
            let theirs = serde_json::to_vec(&line).expect("serializes");
            prop_assert_eq!(
                String::from_utf8_lossy(&ours),
                String::from_utf8_lossy(&theirs)
            );
        }
    }

    #[test]
    fn lines_are_written_within_the_interval_without_a_flush() {
        let p = temp("interval");
        let _ = std::fs::remove_file(&p);
        let sink = AuditSink::open(Some(p.to_str().expect("utf-8"))).expect("open");
        let caller = Caller::default();
        line(&sink, &caller, 1);
        let started = Instant::now();
        while count(&p) < 1 {
            assert!(
                started.elapsed() < FLUSH_EVERY * 50,
                "not written after {:?}",
                started.elapsed()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        // Idle again, then a second line: the writer wakes again.
        line(&sink, &caller, 2);
        let started = Instant::now();
        while count(&p) < 2 {
            assert!(started.elapsed() < FLUSH_EVERY * 50, "second line");
            std::thread::sleep(Duration::from_millis(2));
        }
        drop(sink);
        let _ = std::fs::remove_file(&p);
    }

    /// Concurrent writers, then the last clone dropped at once (as the
    /// daemon's end does after its workers): every line, whole, none lost.
    #[test]
    fn dropping_the_last_clone_writes_every_line_whole() {
        let p = temp("drop");
        let _ = std::fs::remove_file(&p);
        let sink = AuditSink::open(Some(p.to_str().expect("utf-8"))).expect("open");
        let (threads, per) = (4, 5_000);
        std::thread::scope(|s| {
            for t in 0..threads {
                let sink = sink.clone();
                s.spawn(move || {
                    let caller = Caller::default();
                    for n in 0..per {
                        line(&sink, &caller, t * per + n);
                    }
                });
            }
        });
        drop(sink);
        let text = std::fs::read_to_string(&p).expect("read");
        let mut seen = std::collections::BTreeSet::new();
        for l in text.lines() {
            let v: serde_json::Value = serde_json::from_str(l).expect("a whole JSON line");
            let path = v["path"].as_str().expect("path");
            seen.insert(path.rsplit('/').next().expect("n").to_string());
        }
        assert_eq!(text.lines().count(), threads * per);
        assert_eq!(seen.len(), threads * per, "a line twice or lost");
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn flush_writes_before_returning_and_nothing_is_lost_past_the_batch_size() {
        let p = temp("flush");
        let _ = std::fs::remove_file(&p);
        let sink = AuditSink::open(Some(p.to_str().expect("utf-8"))).expect("open");
        let caller = Caller::default();
        line(&sink, &caller, 0);
        sink.flush();
        assert_eq!(count(&p), 1);
        // Past FLUSH_BYTES the request that crosses it writes the batch.
        let mut n = 1;
        while std::fs::metadata(&p).map_or(0, |m| m.len()) < FLUSH_BYTES as u64 {
            line(&sink, &caller, n);
            n += 1;
            assert!(n < 100_000, "never written");
        }
        sink.flush();
        assert_eq!(count(&p), n);
        drop(sink);
        let _ = std::fs::remove_file(&p);
    }
}
