//! Per-workload limits: a token bucket for requests and a cap on open
//! connections. Unknown callers share one bucket and one cap (key `None`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

#[derive(Debug)]
pub struct Limits {
    rate: f64,
    burst: f64,
    max_connections: usize,
    buckets: Mutex<HashMap<Option<usize>, Bucket>>,
    conns: Mutex<HashMap<Option<usize>, Arc<Semaphore>>>,
}

impl Limits {
    pub fn new(rate: u32, burst: u32, max_connections: u32) -> Limits {
        Limits {
            rate: f64::from(rate),
            burst: f64::from(burst),
            max_connections: max_connections as usize,
            buckets: Mutex::new(HashMap::new()),
            conns: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one request token; `false` when the workload is over its rate.
    pub fn request(&self, workload: Option<usize>) -> bool {
        self.request_at(workload, Instant::now())
    }

    fn request_at(&self, workload: Option<usize>, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
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
    pub fn connection(&self, workload: Option<usize>) -> Option<OwnedSemaphorePermit> {
        let sem = {
            let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
            conns
                .entry(workload)
                .or_insert_with(|| Arc::new(Semaphore::new(self.max_connections)))
                .clone()
        };
        sem.try_acquire_owned().ok()
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
}
