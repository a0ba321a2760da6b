//! The answer cache: what may be answered from memory, for how long, and
//! what is served when the upstream fails (docs/proxy.md, "Cache").
//!
//! The cache sits *behind* the decision: the handler asks it only for a
//! request `core::proxy_decision` has already allowed for this caller,
//! so it never widens access — an answer in memory is one the caller
//! was allowed to fetch from upstream at that moment. Keys hold
//! everything the upstream answer depends on: the canonical target (for
//! IMDS the same answer for every caller of the instance; for the relay
//! the credentials id is in the target) and the relay's `Authorization`
//! header, which the agent checks.
//!
//! * [`Rule::Instance`]: paths that cannot change while the instance
//!   runs (instance-id, ami-id, instance-type, placement, the identity
//!   document, …), kept for the daemon's lifetime (a stop/start restarts
//!   it).
//! * [`Rule::Credentials`]: instance-role and task credentials, kept
//!   until a margin before their `Expiration`: 5 minutes (EC2 publishes
//!   new role credentials at least 5 minutes before expiry), or half the
//!   time left when that is shorter.
//! * [`Rule::RoleListing`]: the role listing, for a minute (an instance
//!   profile can be replaced while the instance runs); served stale
//!   through an outage, as SDKs read it before the credentials.
//! * [`Rule::Never`]: everything else — network interfaces, spot and
//!   events, tags, public addresses, IAM info, task metadata.
//!
//! Concurrent misses for one key make one upstream request (the others
//! wait for it: single flight). Memory is bounded ([`MAX_KEYS`],
//! [`MAX_BYTES`], [`MAX_BODY`]): beyond it answers are served without
//! being kept. [`Cache::clear`] drops everything (a reload that changes
//! the config).
//!
//! **Serve-stale.** When the upstream times out, refuses the connection
//! or answers 5xx, kept credentials are served while their `Expiration`
//! is at least [`STALE_GUARD`] away — never after it (and the role
//! listing for [`ROLE_LISTING_STALE`]). For
//! [`RETRY_AFTER`] after a failure, requests for that key are served the
//! stale answer at once instead of each waiting on the upstream again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use hyper::header::HeaderMap;
use hyper::StatusCode;

use crate::Kind;

/// Most keys kept.
pub const MAX_KEYS: usize = 4096;
/// Most body bytes kept, all keys together.
pub const MAX_BYTES: usize = 4 * 1024 * 1024;
/// Largest body kept (IMDS and credentials answers are a few KiB).
pub const MAX_BODY: usize = 64 * 1024;
/// The margin before `Expiration` at which kept credentials are fetched
/// again (EC2 rotates role credentials at least this long before).
pub const CREDENTIALS_MARGIN: Duration = Duration::from_secs(300);
/// A stale answer is served only while its credentials have at least
/// this long left.
pub const STALE_GUARD: Duration = Duration::from_secs(1);
/// After an upstream failure, how long a key's stale answer is served
/// without asking the upstream again.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// How long an answer may be kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// For the instance's (the daemon's) lifetime.
    Instance,
    /// Until a margin before the document's `Expiration`.
    Credentials,
    /// The role listing (`iam/security-credentials/`): fresh for
    /// [`ROLE_LISTING_TTL`], servable stale for [`ROLE_LISTING_STALE`].
    RoleListing,
    /// Not kept.
    Never,
}

/// How long the role listing is answered from memory: an instance
/// profile can be replaced while the instance runs, and the listing then
/// names the new role; SDKs read it before every credentials refresh.
pub const ROLE_LISTING_TTL: Duration = Duration::from_secs(60);
/// How long the role listing is served stale while IMDS is down: a role
/// name is no credential (the credentials themselves stop at their
/// `Expiration`), and without it no SDK gets to the credentials.
pub const ROLE_LISTING_STALE: Duration = Duration::from_secs(6 * 3600);

/// Meta-data leaves that never change while the instance runs.
const IMMUTABLE: &[&str] = &[
    "ami-id",
    "ami-launch-index",
    "ami-manifest-path",
    "instance-id",
    "instance-type",
    "kernel-id",
    "ramdisk-id",
    "reservation-id",
    "local-hostname",
    "hostname",
    "mac",
    "product-codes",
    "instance-life-cycle",
];

/// The rule for IMDS target `target` (canonical, origin-form).
pub fn imds_rule(target: &str) -> Rule {
    // On the stack: no rule names more than six segments.
    let segs: smallvec::SmallVec<[&str; 8]> = target.trim_start_matches('/').split('/').collect();
    // segs[0] is the version (latest, a date, 1.0).
    match segs.get(1..).unwrap_or_default() {
        ["meta-data", leaf] if IMMUTABLE.contains(leaf) => Rule::Instance,
        ["meta-data", "placement", ..] => Rule::Instance,
        ["meta-data", "services", "domain" | "partition"] => Rule::Instance,
        ["dynamic", "instance-identity", "document" | "pkcs7" | "signature" | "rsa2048"] => {
            Rule::Instance
        }
        ["meta-data", "iam", "security-credentials", ""]
        | ["meta-data", "identity-credentials", "ec2", "security-credentials", ""] => {
            Rule::RoleListing
        }
        ["meta-data", "iam", "security-credentials", role] if !role.is_empty() => Rule::Credentials,
        ["meta-data", "identity-credentials", "ec2", "security-credentials", name]
            if !name.is_empty() =>
        {
            Rule::Credentials
        }
        _ => Rule::Never,
    }
}

/// The rule for relay target `target` (canonical): credentials by id.
pub fn relay_rule(target: &str) -> Rule {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    match path {
        p if p.starts_with("/v2/credentials/") && p.len() > "/v2/credentials/".len() => {
            Rule::Credentials
        }
        "/v1/credentials" if query.split('&').any(|kv| kv.starts_with("id=")) => Rule::Credentials,
        _ => Rule::Never,
    }
}

/// What a cached answer is found by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub kind: Kind,
    /// The canonical target.
    pub target: String,
    /// The `Authorization` header sent (relay), part of what the
    /// upstream decided on.
    pub authorization: Option<Bytes>,
}

/// An upstream answer, as kept: status, the response headers passed
/// back, body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Memory, fresh.
    Hit,
    /// The upstream (and kept when the rule allows).
    Miss,
    /// Memory, after the upstream failed; valid credentials.
    Stale,
    /// The upstream; not cacheable, or the cache was full.
    Bypass,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Hit => "hit",
            Source::Miss => "miss",
            Source::Stale => "stale",
            Source::Bypass => "bypass",
        }
    }
}

/// What [`Cache::get`] gives.
#[derive(Debug)]
pub enum Fetched {
    Answer(Arc<Answer>, Source),
    /// The upstream failed and nothing valid is kept: why.
    Failed(String),
}

#[derive(Debug)]
struct Stored {
    answer: Arc<Answer>,
    /// `None`: for the instance's lifetime.
    fresh_until: Option<Instant>,
    /// The credentials' `Expiration`: the end of stale serving.
    expires: Option<SystemTime>,
    size: usize,
}

#[derive(Debug, Default)]
struct Slot {
    stored: Option<Stored>,
    /// The last upstream failure for this key.
    failed_at: Option<Instant>,
    /// Held while the key is being fetched (single flight).
    flight: Arc<tokio::sync::Mutex<()>>,
}

#[derive(Debug, Default)]
struct Slots {
    map: HashMap<Key, Slot>,
    bytes: usize,
    generation: u64,
}

/// The cache shared by every worker.
#[derive(Debug, Default)]
pub struct Cache {
    slots: Mutex<Slots>,
    /// Upstream requests made through the cache (tests, metrics).
    fetches: AtomicU64,
}

impl Stored {
    fn fresh(&self, now: Instant) -> bool {
        self.fresh_until.is_none_or(|t| now < t)
    }

    fn servable_stale(&self, wall: SystemTime) -> bool {
        self.expires
            .is_some_and(|e| e.duration_since(wall).is_ok_and(|left| left >= STALE_GUARD))
    }
}

impl Cache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many upstream requests went through the cache.
    pub fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// Drops every kept answer; fetches under way keep nothing.
    pub fn clear(&self) {
        let mut s = self.lock();
        s.map.clear();
        s.bytes = 0;
        s.generation += 1;
    }

    /// How many answers are kept, and their bytes.
    pub fn size(&self) -> (usize, usize) {
        let s = self.lock();
        (
            s.map.values().filter(|v| v.stored.is_some()).count(),
            s.bytes,
        )
    }

    /// The answer for `key`: from memory while fresh, else from `fetch`
    /// (one at a time per key), kept per `rule`; on an upstream failure
    /// the kept credentials while they are valid.
    pub async fn get<F, Fut>(&self, key: Key, rule: Rule, fetch: F) -> Fetched
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Answer, String>>,
    {
        if rule == Rule::Never {
            return self.bypass(fetch).await;
        }
        let found = {
            let mut s = self.lock();
            if let Some(hit) = fresh(&s, &key, Instant::now()) {
                return Fetched::Answer(hit, Source::Hit);
            }
            if !s.map.contains_key(&key) && s.map.len() >= MAX_KEYS {
                prune(&mut s, Instant::now(), SystemTime::now());
            }
            let generation = s.generation;
            if !s.map.contains_key(&key) && s.map.len() >= MAX_KEYS {
                None // full: served, not kept
            } else {
                let slot = s.map.entry(key.clone()).or_default();
                Some((slot.flight.clone(), generation))
            }
        };
        let Some((flight, generation)) = found else {
            return self.bypass(fetch).await;
        };
        let _one = flight.lock().await;
        {
            let s = self.lock();
            let now = Instant::now();
            if let Some(hit) = fresh(&s, &key, now) {
                return Fetched::Answer(hit, Source::Hit);
            }
            // The upstream failed a moment ago: serve what is valid now
            // rather than wait on it again.
            if let Some(slot) = s.map.get(&key) {
                if let (Some(at), Some(st)) = (slot.failed_at, &slot.stored) {
                    if now.duration_since(at) < RETRY_AFTER && st.servable_stale(SystemTime::now())
                    {
                        return Fetched::Answer(st.answer.clone(), Source::Stale);
                    }
                }
            }
        }
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let result = fetch().await;
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut s = self.lock();
        let current = s.generation == generation;
        let failure = match result {
            Ok(a) if a.status == StatusCode::OK => {
                let a = Arc::new(a);
                if current {
                    store(&mut s, &key, rule, a.clone(), now, wall);
                }
                return Fetched::Answer(a, Source::Miss);
            }
            Ok(a) if a.status.is_server_error() => Ok(a),
            Ok(a) => {
                // An authoritative answer (404: the role or the id is
                // gone): what was kept goes too.
                if current {
                    remove(&mut s, &key);
                }
                return Fetched::Answer(Arc::new(a), Source::Miss);
            }
            Err(e) => Err(e),
        };
        let Some(slot) = s.map.get_mut(&key).filter(|_| current) else {
            return match failure {
                Ok(a) => Fetched::Answer(Arc::new(a), Source::Miss),
                Err(e) => Fetched::Failed(e),
            };
        };
        slot.failed_at = Some(now);
        match &slot.stored {
            Some(st) if st.servable_stale(wall) => {
                Fetched::Answer(st.answer.clone(), Source::Stale)
            }
            _ => match failure {
                Ok(a) => Fetched::Answer(Arc::new(a), Source::Miss),
                Err(e) => Fetched::Failed(e),
            },
        }
    }

    /// One upstream exchange, not kept and not looked for: the answer to
    /// a request whose rule is [`Rule::Never`] (counted as a fetch).
    pub(crate) async fn bypass<F, Fut>(&self, fetch: F) -> Fetched
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Answer, String>>,
    {
        self.fetches.fetch_add(1, Ordering::Relaxed);
        match fetch().await {
            Ok(a) => Fetched::Answer(Arc::new(a), Source::Bypass),
            Err(e) => Fetched::Failed(e),
        }
    }
}

fn fresh(s: &Slots, key: &Key, now: Instant) -> Option<Arc<Answer>> {
    let st = s.map.get(key)?.stored.as_ref()?;
    st.fresh(now).then(|| st.answer.clone())
}

fn remove(s: &mut Slots, key: &Key) {
    if let Some(slot) = s.map.get_mut(key) {
        if let Some(st) = slot.stored.take() {
            s.bytes -= st.size;
        }
        slot.failed_at = None;
    }
}

/// Keeps `a` for `key` per `rule`, within the bounds; else forgets what
/// the key held (it is no longer current).
fn store(s: &mut Slots, key: &Key, rule: Rule, a: Arc<Answer>, now: Instant, wall: SystemTime) {
    remove(s, key);
    let Some((fresh_until, expires)) = freshness(rule, &a.body, now, wall) else {
        return;
    };
    let size = a.body.len() + key.target.len() + 256;
    if a.body.len() > MAX_BODY || s.bytes + size > MAX_BYTES {
        return;
    }
    if let Some(slot) = s.map.get_mut(key) {
        slot.stored = Some(Stored {
            answer: a,
            fresh_until,
            expires,
            size,
        });
        s.bytes += size;
    }
}

/// Until when an answer under `rule` is fresh (`None`: always) and when
/// its credentials expire; `None` when it is not to be kept.
fn freshness(
    rule: Rule,
    body: &[u8],
    now: Instant,
    wall: SystemTime,
) -> Option<(Option<Instant>, Option<SystemTime>)> {
    match rule {
        Rule::Never => None,
        Rule::Instance => Some((None, None)),
        Rule::RoleListing => Some((
            Some(now + ROLE_LISTING_TTL),
            Some(wall + ROLE_LISTING_STALE),
        )),
        Rule::Credentials => {
            let expires = expiration(body)?;
            let left = expires.duration_since(wall).ok()?;
            let margin = CREDENTIALS_MARGIN.min(left / 2);
            Some((Some(now + (left - margin)), Some(expires)))
        }
    }
}

/// The `Expiration` of a credentials document (RFC 3339), if any.
pub fn expiration(body: &[u8]) -> Option<SystemTime> {
    #[derive(serde::Deserialize)]
    struct Doc {
        #[serde(rename = "Expiration")]
        expiration: String,
    }
    let doc: Doc = serde_json::from_slice(body).ok()?;
    let t = time::OffsetDateTime::parse(
        doc.expiration.trim(),
        &time::format_description::well_known::Rfc3339,
    )
    .ok()?;
    let nanos = u64::try_from(t.unix_timestamp_nanos()).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos))
}

/// Makes room: drops keys nobody is fetching whose answer is neither
/// fresh nor servable stale.
fn prune(s: &mut Slots, now: Instant, wall: SystemTime) {
    let mut freed = 0;
    s.map.retain(|_, slot| {
        let idle = Arc::strong_count(&slot.flight) == 1;
        let useful = slot
            .stored
            .as_ref()
            .is_some_and(|st| st.fresh(now) || st.servable_stale(wall));
        let keep = !idle || useful;
        if !keep {
            freed += slot.stored.as_ref().map_or(0, |st| st.size);
        }
        keep
    });
    s.bytes -= freed;
}

#[cfg(test)]
mod tests;
