//! Follows the BPF layer's events (ring buffer `mg_events`): one audit log
//! line and one metric increment per refused `connect`, `sendmsg` or
//! `socket` call; observed calls go to the connection recorder
//! ([`super::observe_conn`]). Runs on a thread of its own (a blocking
//! `poll` on the ring buffer), never on the runtime.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use metaguard_sys::bpf::{Event, PinDir};

use super::observe_conn::Recorder;
use prometheus::IntCounterVec;
use tracing::{info, warn};

/// A running follower; it stops (within a second) when dropped — e.g.
/// when a heal re-created the ring buffer and a new follower takes over,
/// since the old ring receives nothing any more.
#[derive(Debug)]
pub struct Follower {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Follower {
    /// Stops the follower and waits for it (≤ 250 ms: its poll period),
    /// so the connection runs it holds are written before the daemon
    /// exits.
    pub fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Starts the follower; it also stops when the ring buffer fails — the
/// programs keep refusing either way. `None` (with a warning) when the
/// ring buffer cannot be opened.
pub fn spawn(
    pin_dir: PathBuf,
    refusals: IntCounterVec,
    mut recorder: Recorder,
) -> Option<Follower> {
    let mut reader = match PinDir::new(&pin_dir).events() {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "bpf layer: refusal events are not followed");
            return None;
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let started = std::thread::Builder::new()
        .name("bpf-events".into())
        .spawn(move || {
            info!(pin_dir = %pin_dir.display(), "bpf layer: following refusal events");
            while !stopped.load(Ordering::Relaxed) {
                // Woken at least every 250 ms, so a coalesced run is
                // written soon after its window ends.
                match reader.wait(Duration::from_millis(250)) {
                    Ok(_) => {
                        for e in reader.drain() {
                            if e.observed {
                                recorder.add(e);
                            } else {
                                refusals.with_label_values(&[e.syscall]).inc();
                                audit(&e);
                            }
                        }
                        recorder.tick();
                    }
                    Err(e) => {
                        warn!(error = %e, "bpf layer: refusal events stopped");
                        recorder.flush();
                        return;
                    }
                }
            }
            recorder.flush();
        });
    match started {
        Ok(thread) => Some(Follower {
            stop,
            thread: Some(thread),
        }),
        Err(e) => {
            warn!(error = %e, "bpf layer: refusal events are not followed");
            None
        }
    }
}

fn audit(e: &Event) {
    let destination = e
        .destination()
        .map(|ip| std::net::SocketAddr::new(ip, e.port).to_string())
        .unwrap_or_default();
    warn!(
        audit = "bpf-refusal",
        syscall = e.syscall,
        cgroup_id = e.cgroup_id,
        pid = e.pid,
        destination = %destination,
        sock_type = e.sock_type,
        protocol = e.protocol,
        "refused by the BPF layer"
    );
}
