//! Per-workload limits: a token bucket for requests and a cap on open
//! connections. Unknown callers share one bucket and one cap (key `None`).
//!
//! Observed traffic (`observe`) is never refused by them: `observe` flows
//! as `allow` does, and `allow` IMDS traffic never reaches the proxy at all.
//! It is counted instead in buckets and counts of its own
//! ([`Limits::observed_request`], [`Limits::observed_connection`]), with
//! the same rate, burst and cap, so that a record can say what `proxy`
//! would have refused — without spending the tokens or taking the
//! connection places of the workload's enforced service. One backstop
//! remains, which `[proxy]` does not set: a workload may not hold more
//! than a quarter of the daemon's file descriptors in observed connections
//! ([`Limits::observed_ceiling`]); past that the daemon itself (every
//! workload's rules and proxy) would be at stake, which `allow` — traffic
//! that never reaches the daemon — does not put there.
//!
//! A reload builds new limits with the new rate, burst and cap and
//! [`Limits::adopt`]s the old ones' state by workload name, so a reload
//! neither refills a bucket nor forgets a connection that is still open.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Buckets and open-connection counts per workload.
#[derive(Debug, Default)]
struct Counters {
    buckets: Mutex<HashMap<Option<usize>, Bucket>>,
    /// Open connections per workload; shared with the slots that count
    /// them (and with the limits of the next reload).
    conns: Mutex<HashMap<Option<usize>, Arc<AtomicUsize>>>,
}

impl Counters {
    fn open(&self, workload: Option<usize>) -> Arc<AtomicUsize> {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.entry(workload).or_default().clone()
    }

    /// Takes `old`'s state, each workload under `index(old index)`
    /// (`None`: the workload is gone), its tokens at most `burst`.
    fn adopt(
        &self,
        old: &Counters,
        burst: f64,
        index: &impl Fn(Option<usize>) -> Option<Option<usize>>,
    ) {
        {
            let from = old.buckets.lock().unwrap_or_else(|p| p.into_inner());
            let mut to = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
            for (k, b) in from.iter() {
                if let Some(k) = index(*k) {
                    let tokens = b.tokens.min(burst);
                    to.insert(k, Bucket { tokens, ..*b });
                }
            }
        }
        let from = old.conns.lock().unwrap_or_else(|p| p.into_inner());
        let mut to = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        for (k, open) in from.iter() {
            if let Some(k) = index(*k) {
                to.insert(k, open.clone());
            }
        }
    }
}

#[derive(Debug)]
pub struct Limits {
    rate: f64,
    burst: f64,
    max_connections: usize,
    /// Open observed connections per workload at which one more is
    /// refused after all (the descriptor backstop).
    observed_ceiling: usize,
    /// What refuses (`proxy`, `allow` on the relay, `deny`).
    enforced: Counters,
    /// What observed traffic would have spent; never refuses.
    observed: Counters,
}

/// An open connection's place under its workload's cap; freed on drop.
#[derive(Debug)]
pub struct ConnectionSlot(Arc<AtomicUsize>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Limits {
    pub fn new(rate: u32, burst: u32, max_connections: u32) -> Limits {
        Limits {
            rate: f64::from(rate),
            burst: f64::from(burst),
            max_connections: max_connections as usize,
            observed_ceiling: Self::observed_ceiling(),
            enforced: Counters::default(),
            observed: Counters::default(),
        }
    }

    /// Takes one request token; `false` when the workload is over its rate.
    pub fn request(&self, workload: Option<usize>) -> bool {
        self.take(&self.enforced, workload, Instant::now())
    }

    /// An observed request, counted in the observed buckets: `false` when
    /// `proxy` would have refused it for the rate (it is served anyway).
    pub fn observed_request(&self, workload: Option<usize>) -> bool {
        self.take(&self.observed, workload, Instant::now())
    }

    #[cfg(test)]
    fn request_at(&self, workload: Option<usize>, now: Instant) -> bool {
        self.take(&self.enforced, workload, now)
    }

    fn take(&self, counters: &Counters, workload: Option<usize>, now: Instant) -> bool {
        let mut buckets = counters.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let b = buckets.entry(workload).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// A connection slot, held for the connection's life; `None` when the
    /// workload has `max_connections` open already.
    pub fn connection(&self, workload: Option<usize>) -> Option<ConnectionSlot> {
        let open = self.enforced.open(workload);
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < self.max_connections).then_some(n + 1)
        })
        .ok()
        .map(|_| ConnectionSlot(open))
    }

    /// An observed connection's slot among the workload's observed ones,
    /// and whether it is within `max_connections` — `false`: `proxy` would
    /// have closed it unanswered, observe serves it. `None` only past the
    /// descriptor backstop ([`Limits::observed_ceiling`]).
    pub fn observed_connection(&self, workload: Option<usize>) -> Option<(ConnectionSlot, bool)> {
        let open = self.observed.open(workload);
        let before = open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.observed_ceiling).then_some(n + 1)
            })
            .ok()?;
        Some((ConnectionSlot(open), before < self.max_connections))
    }

    /// The backstop on one workload's open observed connections: a quarter
    /// of the process's file-descriptor limit (`RLIMIT_NOFILE`, soft; 1024
    /// under systemd's default: 256), at least 64.
    pub fn observed_ceiling() -> usize {
        let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(1024, |(soft, _)| soft);
        usize::try_from(soft / 4).unwrap_or(usize::MAX).max(64)
    }

    /// Takes over `old`'s state: each workload's tokens (at most the new
    /// burst) and its count of open connections, enforced and observed
    /// alike, under the index `index(old index)` gives it now (`None`: the
    /// workload is gone).
    pub fn adopt(&self, old: &Limits, index: impl Fn(Option<usize>) -> Option<Option<usize>>) {
        self.enforced.adopt(&old.enforced, self.burst, &index);
        self.observed.adopt(&old.observed, self.burst, &index);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_allows_burst_then_rate() {
        let l = Limits::new(40, 60, 4);
        let t0 = Instant::now();
        let granted = (0..100).filter(|_| l.request_at(Some(1), t0)).count();
        assert_eq!(granted, 60, "the burst");
        // A quarter second later: 10 more tokens.
        let t1 = t0 + Duration::from_millis(250);
        let granted = (0..100).filter(|_| l.request_at(Some(1), t1)).count();
        assert_eq!(granted, 10);
        // Other workloads have their own bucket.
        assert!(l.request_at(Some(2), t1));
    }

    #[test]
    fn connection_cap_is_per_workload() {
        let l = Limits::new(1, 1, 2);
        let a = l.connection(Some(0));
        let b = l.connection(Some(0));
        assert!(a.is_some() && b.is_some());
        assert!(l.connection(Some(0)).is_none());
        assert!(l.connection(Some(1)).is_some());
        drop(a);
        assert!(l.connection(Some(0)).is_some());
    }

    #[test]
    fn observed_traffic_is_counted_apart_and_never_refused() {
        let l = Limits::new(1, 2, 1);
        // Over the rate and the cap: still a slot, flagged.
        assert!(l.observed_request(Some(0)) && l.observed_request(Some(0)));
        assert!(!l.observed_request(Some(0)));
        let (_a, within) = l.observed_connection(Some(0)).expect("a slot");
        let (_b, within_b) = l.observed_connection(Some(0)).expect("a slot");
        assert!(within && !within_b);
        // The workload's enforced service spent nothing of its own.
        assert!(l.request(Some(0)) && l.request(Some(0)));
        assert!(l.connection(Some(0)).is_some());
    }

    #[test]
    fn observed_connections_stop_only_at_the_descriptor_backstop() {
        let mut l = Limits::new(1, 1, 1);
        l.observed_ceiling = 3;
        let held: Vec<_> = (0..3).map(|_| l.observed_connection(Some(0))).collect();
        assert!(held.iter().all(Option::is_some));
        assert!(l.observed_connection(Some(0)).is_none());
        drop(held);
        assert!(l.observed_connection(Some(0)).is_some());
        assert!(Limits::observed_ceiling() >= 64);
    }

    #[test]
    fn a_reload_keeps_tokens_and_open_connections_by_workload() {
        let old = Limits::new(40, 60, 4);
        let t0 = Instant::now();
        // Workload 0 spends 58 of its 60 tokens and holds 2 connections.
        assert_eq!((0..58).filter(|_| old.request_at(Some(0), t0)).count(), 58);
        let held: Vec<_> = (0..2).map(|_| old.connection(Some(0))).collect();
        assert!(held.iter().all(Option::is_some));
        // The new config puts it second, lowers the cap to 2 and the burst
        // to 1; a workload that is gone (old 1) is dropped.
        assert!(old.request_at(Some(1), t0));
        let new = Limits::new(40, 1, 2);
        new.adopt(&old, |k| match k {
            Some(0) => Some(Some(1)),
            Some(_) => None,
            None => Some(None),
        });
        // 2 tokens left, capped at the new burst of 1: one request passes.
        assert!(new.request_at(Some(1), t0));
        assert!(!new.request_at(Some(1), t0));
        // Its 2 connections still count against the new cap...
        assert!(new.connection(Some(1)).is_none());
        // ...and free their places when they close.
        drop(held);
        assert!(new.connection(Some(1)).is_some());
        // The new workload 0 starts afresh.
        assert!(new.request_at(Some(0), t0));
    }
}
