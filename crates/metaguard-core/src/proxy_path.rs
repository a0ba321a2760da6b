//! Canonical request paths and the per-workload path policy of the metadata
//! proxy (`imds = "proxy"`, `[workload.imds_policy]`).
//!
//! Every decision is made on the **canonical** form of the request target,
//! and the proxy forwards exactly that canonical form upstream — so what was
//! decided on is what IMDS sees. Canonicalisation:
//!
//! * origin-form only (`/path?query`): absolute-form (`http://host/…`),
//!   authority-form, `*` and fragments are refused;
//! * percent-decoding happens once; an encoded `/`, `.`, `%`, `\`, or any
//!   control byte is refused (decoding twice — or an upstream that decodes
//!   again — must not turn `%252F` or `%2e%2e` into structure);
//! * empty segments (`//`) and `.` are removed; `..` removes the previous
//!   segment and is refused when there is none (no escaping the root);
//! * a trailing `/` is kept (IMDS distinguishes a listing from a leaf);
//! * query parameters must be among those the route allows.
//!
//! Policy: `deny` globs win over `allow` globs; anything matching neither
//! is denied (IMDS grows new categories; unknown must not mean allowed).
//! Globs match whole segments: `*` is one segment, `**` any number.
//!
//! The categories that hand out credentials or secrets — `meta-data/iam`,
//! `meta-data/identity-credentials` and `user-data`, under any version —
//! are served only through an allow glob that *names* them (writes their
//! segments literally: `/latest/meta-data/iam/**`), never through a
//! wildcard (`/latest/meta-data/**`, `/*/**`), in any policy: a custom
//! policy that does not mention `iam` cannot let the instance role's
//! credentials through by accident, and one that wants them must say so.

use std::fmt;

/// Why a request target was refused before any policy was consulted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("only origin-form request targets (/path) are accepted")]
    NotOriginForm,
    #[error("fragments are not part of a request target")]
    Fragment,
    #[error("malformed percent-encoding")]
    BadPercent,
    #[error("encoded {0:?} is refused (it would change the path's structure if decoded again)")]
    EncodedStructure(char),
    #[error("control characters and backslashes are refused")]
    BadByte,
    #[error("the path is not valid UTF-8 once decoded")]
    NotUtf8,
    #[error("`..` escapes the root")]
    Escapes,
    #[error("query parameter {0:?} is not accepted on this path")]
    Query(String),
}

/// A canonical request target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Canonical {
    /// Decoded segments, none empty, `.` or `..`.
    pub segments: Vec<String>,
    /// The target ended with `/` (a listing).
    pub dir: bool,
    /// Decoded query parameters, in order.
    pub query: Vec<(String, String)>,
}

impl Canonical {
    /// The path as forwarded upstream: segments re-encoded, `/`-joined.
    pub fn path(&self) -> String {
        let mut s = String::with_capacity(self.len_hint());
        self.push_path(&mut s);
        s
    }

    /// The full target as forwarded upstream (path and query).
    pub fn target(&self) -> String {
        let mut t = String::with_capacity(self.len_hint());
        self.push_path(&mut t);
        for (i, (k, v)) in self.query.iter().enumerate() {
            t.push(if i == 0 { '?' } else { '&' });
            encode_into(&mut t, k, b"/?");
            t.push('=');
            encode_into(&mut t, v, b"/?=");
        }
        t
    }

    /// Appends [`Canonical::path`] to `s`.
    fn push_path(&self, s: &mut String) {
        for seg in &self.segments {
            s.push('/');
            encode_into(s, seg, b"");
        }
        if self.segments.is_empty() || self.dir {
            s.push('/');
        }
    }

    /// The target's length when nothing needs encoding: one allocation
    /// of the right size in the common case.
    fn len_hint(&self) -> usize {
        let path: usize = self.segments.iter().map(|s| s.len() + 1).sum();
        let query: usize = self.query.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
        path + query + 1
    }
}

impl fmt::Display for Canonical {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.target())
    }
}

/// Unreserved characters (RFC 3986) and those in `keep` pass; everything
/// else is encoded.
///
/// A query keeps `/` and `?` (and a value `=`) as they arrived: decoding
/// refuses them encoded (they are structure there), so encoding them would
/// make the forwarded target one that canonicalisation refuses, not the
/// fixed point it must be (`?id=a/b` became `?id=a%2Fb`).
fn encode_into(out: &mut String, s: &str, keep: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let passes = |b: u8| {
        b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') || keep.contains(&b)
    };
    // The common case, nothing to encode: one copy.
    if s.bytes().all(passes) {
        out.push_str(s);
        return;
    }
    for b in s.bytes() {
        if passes(b) {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 0xf)] as char);
        }
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// A byte refused wherever it arrives unencoded: control characters,
/// DEL and `\`.
fn refused(c: u8) -> bool {
    c < 0x20 || c == 0x7f || c == b'\\'
}

/// Decodes one component once; structural characters arriving encoded are
/// refused.
fn decode(component: &str, structural: &[u8]) -> Result<String, PathError> {
    let b = component.as_bytes();
    // The common case, nothing encoded and no byte refused: one copy (the
    // loop below would copy every byte as it is).
    if b.iter().all(|&c| c != b'%' && !refused(c)) {
        return Ok(component.to_owned());
    }
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'%' {
            let (h, l) = match (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) {
                (Some(h), Some(l)) => (h, l),
                _ => return Err(PathError::BadPercent),
            };
            let v = h * 16 + l;
            if structural.contains(&v) || v == b'%' || v == b'\\' {
                return Err(PathError::EncodedStructure(v as char));
            }
            if v < 0x20 || v == 0x7f {
                return Err(PathError::BadByte);
            }
            out.push(v);
            i += 3;
        } else {
            if refused(c) {
                return Err(PathError::BadByte);
            }
            out.push(c);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| PathError::NotUtf8)
}

/// Canonicalises `target`; `allowed_query` names the query parameters the
/// route accepts (none for IMDS, `id` for `/v1/credentials`).
pub fn canonical(target: &str, allowed_query: &[&str]) -> Result<Canonical, PathError> {
    if !target.starts_with('/') {
        return Err(PathError::NotOriginForm);
    }
    if target.contains('#') {
        return Err(PathError::Fragment);
    }
    let (raw_path, raw_query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let mut segments: Vec<String> =
        Vec::with_capacity(raw_path.bytes().filter(|&b| b == b'/').count());
    let mut dir = false;
    let mut raw_segments = raw_path.split('/').peekable();
    while let Some(raw) = raw_segments.next() {
        let last = raw_segments.peek().is_none();
        let seg = decode(raw, b"/.")?;
        match seg.as_str() {
            "" | "." => {
                if last {
                    dir = true;
                }
            }
            ".." => {
                if segments.pop().is_none() {
                    return Err(PathError::Escapes);
                }
                if last {
                    dir = true;
                }
            }
            _ => {
                segments.push(seg);
                if last {
                    dir = false;
                }
            }
        }
    }
    let mut query = Vec::new();
    if let Some(q) = raw_query.filter(|q| !q.is_empty()) {
        for pair in q.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let k = decode(k, b"/&=?")?;
            let v = decode(v, b"/&=?")?;
            if !allowed_query.contains(&k.as_str()) {
                return Err(PathError::Query(k));
            }
            query.push((k, v));
        }
    }
    Ok(Canonical {
        segments,
        dir,
        query,
    })
}

/// A glob on canonical paths: `*` matches one segment, `**` any number
/// (including none); a trailing `/` matches listings only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathGlob {
    text: String,
    segments: Vec<String>,
    dir: bool,
}

impl PathGlob {
    pub fn new(text: &str) -> PathGlob {
        let dir = text.ends_with('/') && text != "/";
        let segments = text
            .split('/')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        PathGlob {
            text: text.to_string(),
            segments,
            dir,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// `verb` and the glob: the rule a decision names.
    fn rule(&self, verb: &str) -> String {
        let mut r = String::with_capacity(verb.len() + self.text.len());
        r.push_str(verb);
        r.push_str(&self.text);
        r
    }

    pub fn matches(&self, c: &Canonical) -> bool {
        if self.dir && !c.dir {
            return false;
        }
        // `reach[j]`: the glob's segments so far match the path's first
        // `j` segments. One pass per glob segment, so matching costs
        // O(glob × path) segments; trying every split of every `**`
        // recursively was exponential in the number of `**` (a policy glob
        // like `/**/**/**/…/x` took seconds on a 30-segment request).
        // On the stack for any path a client sends; on the heap past that.
        let segs = &c.segments;
        let mut reach: smallvec::SmallVec<[bool; 32]> = smallvec::smallvec![false; segs.len() + 1];
        reach[0] = true;
        for p in &self.segments {
            if p == "**" {
                // Any number of segments: reachable from any earlier j.
                let mut any = false;
                for r in reach.iter_mut() {
                    any |= *r;
                    *r = any;
                }
            } else {
                for j in (0..segs.len()).rev() {
                    reach[j + 1] = reach[j] && (p == "*" || *p == segs[j]);
                }
                reach[0] = false;
            }
        }
        reach[segs.len()]
    }
}

/// The sensitive categories, as the segments after the version segment
/// (`latest`, `2021-03-23`, …).
const SENSITIVE: [&[&str]; 3] = [
    &["meta-data", "iam"],
    &["meta-data", "identity-credentials"],
    &["user-data"],
];

/// The sensitive category `c` lies in (or is), if any.
fn sensitive(c: &Canonical) -> Option<&'static [&'static str]> {
    SENSITIVE
        .into_iter()
        .find(|cat| c.segments.get(1..=cat.len()).is_some_and(|s| s == *cat))
}

impl PathGlob {
    /// Whether this glob writes category `cat` out: a version segment
    /// (literal or `*`, not `**`) followed by the category's own segments.
    fn names(&self, cat: &[&str]) -> bool {
        self.segments.first().is_some_and(|v| v != "**")
            && self
                .segments
                .get(1..=cat.len())
                .is_some_and(|s| s.iter().zip(cat).all(|(g, c)| g == c))
    }
}

/// What the proxy does with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow { rule: String },
    Deny { rule: String },
}

/// A workload's path policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPolicy {
    pub allow: Vec<PathGlob>,
    pub deny: Vec<PathGlob>,
}

impl PathPolicy {
    /// The default for `imds = "proxy"`: the non-sensitive catalogue;
    /// credentials, user data and anything unknown are denied.
    pub fn default_imds() -> PathPolicy {
        let allow = [
            "/latest/meta-data/",
            "/latest/meta-data/instance-id",
            "/latest/meta-data/instance-type",
            "/latest/meta-data/ami-id",
            "/latest/meta-data/local-ipv4",
            "/latest/meta-data/placement/",
            "/latest/meta-data/placement/**",
            "/latest/meta-data/network/",
            "/latest/meta-data/network/**",
            "/latest/dynamic/instance-identity/document",
            "/latest/api/token",
        ];
        let deny = [
            "/latest/meta-data/iam/**",
            "/latest/meta-data/identity-credentials/**",
            "/latest/user-data",
            "/latest/user-data/**",
        ];
        PathPolicy {
            allow: allow.iter().map(|g| PathGlob::new(g)).collect(),
            deny: deny.iter().map(|g| PathGlob::new(g)).collect(),
        }
    }

    /// Deny globs win; then allow globs (for a sensitive category only
    /// one that names it); anything else is denied.
    pub fn decide(&self, c: &Canonical) -> Decision {
        if let Some(g) = self.deny.iter().find(|g| g.matches(c)) {
            return Decision::Deny {
                rule: g.rule("deny "),
            };
        }
        if let Some(cat) = sensitive(c) {
            return match self.allow.iter().find(|g| g.matches(c) && g.names(cat)) {
                Some(g) => Decision::Allow {
                    rule: g.rule("allow "),
                },
                None => Decision::Deny {
                    rule: format!(
                        "sensitive /*/{}/**: served only through an allow glob that names it",
                        cat.join("/")
                    ),
                },
            };
        }
        if let Some(g) = self.allow.iter().find(|g| g.matches(c)) {
            return Decision::Allow {
                rule: g.rule("allow "),
            };
        }
        Decision::Deny {
            rule: "default deny (not in the allowed catalogue)".into(),
        }
    }
}

#[cfg(test)]
mod tests;
