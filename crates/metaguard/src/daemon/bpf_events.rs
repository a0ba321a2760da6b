//! Follows the BPF layer's refusal events (ring buffer `mg_events`): one
//! audit log line and one metric increment per refused `connect`,
//! `sendmsg` or `socket` call. Runs on a thread of its own (a blocking
//! `poll` on the ring buffer), never on the runtime.

use std::path::PathBuf;
use std::time::Duration;

use metaguard_sys::bpf::{Event, PinDir};
use prometheus::IntCounterVec;
use tracing::{info, warn};

/// Starts the follower; it stops when the ring buffer fails (e.g. after
/// `remove`) — the programs keep refusing either way.
pub fn spawn(pin_dir: PathBuf, refusals: IntCounterVec) {
    let mut reader = match PinDir::new(&pin_dir).events() {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "bpf layer: refusal events are not followed");
            return;
        }
    };
    let started = std::thread::Builder::new()
        .name("bpf-events".into())
        .spawn(move || {
            info!(pin_dir = %pin_dir.display(), "bpf layer: following refusal events");
            loop {
                match reader.wait(Duration::from_secs(1)) {
                    Ok(_) => {
                        for e in reader.drain() {
                            refusals.with_label_values(&[e.syscall]).inc();
                            audit(&e);
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "bpf layer: refusal events stopped");
                        return;
                    }
                }
            }
        });
    if let Err(e) = started {
        warn!(error = %e, "bpf layer: refusal events are not followed");
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
