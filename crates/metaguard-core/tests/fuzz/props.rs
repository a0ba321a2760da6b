//! The property functions of the fuzz targets (`fuzz/fuzz_targets/*.rs`),
//! shared with the corpus test (`tests/fuzz_corpus.rs`) through `#[path]`
//! so both run the same checks: the fuzzer on what libFuzzer generates,
//! `cargo test` on the seed corpus, so the targets cannot rot.
//!
//! Every function takes raw bytes, uses only the public API of
//! `metaguard_core`, and panics (the fuzzer's "crash") when a property
//! fails. Properties are cheap: no panic on any input, parse → print →
//! parse round trips where a printer exists, canonical forms idempotent,
//! and glob matching equal to a naive reference on small inputs.

#![allow(dead_code, clippy::unwrap_used, clippy::panic)]

use std::collections::BTreeMap;

use metaguard_core::config::{Config, Key};
use metaguard_core::doctor::iptables_save::{self, Cidr, Family, Save, Target};
use metaguard_core::doctor::nft::{self, Ruleset};
use metaguard_core::doctor::snapshot::Snapshot;
use metaguard_core::proxy_path::{canonical, Canonical, Decision, PathGlob, PathPolicy};
use serde_json::{json, Value};

/// A property function: panics when a property fails.
pub type Property = fn(&[u8]);

/// The fuzz targets, by name (as in `fuzz/Cargo.toml` and `fuzz/seeds/`).
pub const TARGETS: &[(&str, Property)] = &[
    ("config", config),
    ("ethtool", ethtool),
    ("iptables_save", iptables_save),
    ("merge", merge),
    ("nft_json", nft_json),
    ("proxy_target", proxy_target),
    ("snapshot", snapshot),
];

/// Number of lines as the parsers count them (at least 1).
fn line_count(text: &str) -> usize {
    text.lines().count().max(1)
}

// ---------------------------------------------------------------------------
// config: TOML → validated Config (and what a valid config feeds).

pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Locating an error at a key never panics, whatever the text.
    let located = Config::error_at(text, "fuzz.toml", Key::ProxyAuditLog, "m", "h");
    let _ = located.to_string();
    match Config::parse(text, "fuzz.toml") {
        Err(e) => {
            assert!(e.line >= 1 && e.column >= 1, "position is 1-based: {e:?}");
            assert!(
                e.line <= line_count(text) + 1,
                "error line {} past the text's {} lines",
                e.line,
                line_count(text)
            );
            if !e.source_line.is_empty() {
                let line = text.split('\n').nth(e.line - 1).unwrap_or("");
                assert_eq!(
                    e.source_line,
                    line.trim_end_matches('\r'),
                    "source_line is line {} of the text",
                    e.line
                );
            }
            let _ = e.to_string();
        }
        Ok(c) => {
            // Parsing is a function of the text.
            assert_eq!(Config::parse(text, "fuzz.toml").ok(), Some(c.clone()));
            let probes = [
                "/latest/meta-data/iam/security-credentials/role",
                "/latest/meta-data/instance-id",
                "/latest/user-data",
                "/2021-03-23/meta-data/identity-credentials/ec2/info",
            ];
            for w in &c.workloads {
                for p in probes {
                    let target = canonical(p, &[]).unwrap();
                    let _ = w.imds_policy.decide(&target);
                }
            }
            let _ = c.proxies();
            let _ = metaguard_core::ruleset::plan(&c, &Default::default());
        }
    }
}

// ---------------------------------------------------------------------------
// ethtool-stats.txt: `ethtool -S` sections of ENA interfaces.

/// A name the printer writes back unchanged (no space, `:`, `(` or `#`).
fn plain(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
}

pub fn ethtool(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match metaguard_core::doctor::ethtool::parse(text) {
        Err(e) => {
            assert!(
                e.line >= 1 && e.line <= line_count(text),
                "error line {} outside 1..={}",
                e.line,
                line_count(text)
            );
            let _ = e.to_string();
        }
        Ok(stats) => {
            // parse → print → parse gives the same statistics, where every
            // name is one the printer writes back as it is.
            let all_plain = stats.iter().all(|(i, s)| {
                plain(i)
                    && s.driver.as_deref().is_none_or(plain)
                    && s.counters.keys().all(|k| plain(k))
            });
            if !all_plain {
                return;
            }
            let mut printed = String::new();
            for (iface, s) in &stats {
                match &s.driver {
                    Some(d) => printed.push_str(&metaguard_core::doctor::ethtool::header(iface, d)),
                    None => printed.push_str(&format!("# ethtool -S {iface}")),
                }
                printed.push_str("\nNIC statistics:\n");
                for (k, v) in &s.counters {
                    printed.push_str(&format!("     {k}: {v}\n"));
                }
            }
            let again = metaguard_core::doctor::ethtool::parse(&printed)
                .unwrap_or_else(|e| panic!("printed stats do not parse: {e}\n{printed}"));
            assert_eq!(again, stats, "parse → print → parse changed\n{printed}");
        }
    }
}

// ---------------------------------------------------------------------------
// doctor --merge input: a host's `doctor --json` report.

pub fn merge(data: &[u8]) {
    use metaguard_core::doctor::merge as m;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match m::parse_report("fuzz.json", text) {
        Err(e) => {
            assert!(
                e.line >= 1 && e.line <= line_count(text) + 1 && e.column >= 1,
                "error position {}:{} outside the text's {} lines",
                e.line,
                e.column,
                line_count(text)
            );
            assert!(e.to_string().starts_with("fuzz.json:"), "{e}");
        }
        Ok(r) => {
            assert_eq!(r.ok, r.findings.is_empty());
            // Parsing is a function of the text; merging one host twice
            // keeps every finding once per host.
            assert_eq!(m::parse_report("fuzz.json", text).ok(), Some(r.clone()));
            let merged = m::merge(vec![r.clone(), r.clone()]);
            assert_eq!(merged.ok, r.ok);
            for f in &merged.findings {
                assert_eq!(f.hosts.len(), 1, "{f:?}");
            }
            let _ = merged.human();
            let json = serde_json::to_string(&merged).unwrap();
            let _: Value = serde_json::from_str(&json).unwrap();
        }
    }
}

// ---------------------------------------------------------------------------
// iptables-save text.

pub fn iptables_save(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for family in [Family::Ip, Family::Ip6] {
        match iptables_save::parse(text, family) {
            Err(e) => {
                assert!(
                    e.line >= 1 && e.line <= line_count(text),
                    "error line {} outside 1..={}",
                    e.line,
                    line_count(text)
                );
                let _ = e.to_string();
            }
            Ok(save) => {
                let printed = print_save(&save);
                let again = iptables_save::parse(&printed, family).unwrap_or_else(|e| {
                    panic!("printed save does not parse: {e}\n--- printed:\n{printed}")
                });
                assert_eq!(
                    model(&save),
                    model(&again),
                    "parse → print → parse changed the model\n--- printed:\n{printed}"
                );
                for t in &save.tables {
                    for c in &t.chains {
                        for r in &c.rules {
                            cidr_round_trip(r);
                        }
                    }
                }
            }
        }
    }
    // Addresses on their own: parse → display → parse.
    for word in text.split_whitespace().take(64) {
        if let Some(c) = Cidr::parse(word) {
            let shown = c.to_string();
            assert_eq!(Cidr::parse(&shown), Some(c), "{word:?} → {shown:?}");
            let _ = c.contains(c.addr);
        }
    }
}

fn cidr_round_trip(r: &iptables_save::Rule) {
    use iptables_save::Cond;
    for m in &r.matches {
        if let Cond::Src(c) | Cond::Dst(c) = &m.cond {
            assert_eq!(Cidr::parse(&c.to_string()), Some(*c));
            assert!(c.contains(c.addr), "{c} contains its own address");
        }
    }
}

/// What a save means, without where it was written (line numbers, text).
type RuleModel = (Vec<iptables_save::Match>, Target);
type ChainModel = (String, Option<String>, Vec<RuleModel>);

fn model(save: &Save) -> Vec<(String, Vec<ChainModel>)> {
    save.tables
        .iter()
        .map(|t| {
            let chains = t
                .chains
                .iter()
                .map(|c| {
                    let rules = c
                        .rules
                        .iter()
                        .map(|r| (r.matches.clone(), r.target.clone()))
                        .collect();
                    (c.name.clone(), c.policy.clone(), rules)
                })
                .collect();
            (t.name.clone(), chains)
        })
        .collect()
}

/// Prints a save in the grammar the parser reads; every argument quoted.
pub fn print_save(save: &Save) -> String {
    let quote = |w: &str| {
        let mut q = String::from("\"");
        for ch in w.chars() {
            if ch == '"' || ch == '\\' {
                q.push('\\');
            }
            q.push(ch);
        }
        q.push('"');
        q
    };
    let mut out = String::new();
    for t in &save.tables {
        out.push_str(&format!("*{}\n", t.name));
        for c in &t.chains {
            let policy = c.policy.as_deref().unwrap_or("-");
            out.push_str(&format!(":{} {policy} [0:0]\n", c.name));
        }
        for c in &t.chains {
            for r in &c.rules {
                out.push_str(&format!("-A {}", c.name));
                for a in &r.args {
                    out.push(' ');
                    out.push_str(&quote(a));
                }
                out.push('\n');
            }
        }
        out.push_str("COMMIT\n");
    }
    out
}

// ---------------------------------------------------------------------------
// nft JSON.

pub fn nft_json(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Chain priorities as nft prints them, taken from the text too.
    for piece in text.split('"').take(64) {
        let _ = nft::parse_prio(piece);
    }
    match nft::parse(text) {
        Err(e) => {
            let _ = e.to_string();
        }
        Ok(rs) => {
            for t in &rs.tables {
                for s in t.sets.values() {
                    for e in &s.elems {
                        let _ = nft::render_value(e);
                    }
                }
                for c in &t.chains {
                    for r in &c.rules {
                        let _ = r.text();
                    }
                }
            }
            let _ = rs.rule_count();
            let printed = print_nft(&rs).to_string();
            let again = nft::parse(&printed)
                .unwrap_or_else(|e| panic!("printed ruleset does not parse: {e}\n{printed}"));
            // serde_json reads a float to the nearest f64 only roughly
            // (its `float_roundtrip` feature is off), so a float may come
            // back one ulp off. nft prints no floats: compare without them.
            if has_float(&print_nft(&rs)) {
                return;
            }
            assert_eq!(
                rs, again,
                "parse → print → parse changed the ruleset\n{printed}"
            );
        }
    }
}

fn has_float(v: &Value) -> bool {
    match v {
        Value::Number(n) => n.is_f64(),
        Value::Array(a) => a.iter().any(has_float),
        Value::Object(o) => o.values().any(has_float),
        _ => false,
    }
}

/// The `nft -j list ruleset` form of a ruleset model.
pub fn print_nft(rs: &Ruleset) -> Value {
    let mut items = vec![json!({"metainfo": {"json_schema_version": 1}})];
    for t in &rs.tables {
        let (f, n) = (&t.family, &t.name);
        items.push(json!({"table": {"family": f, "name": n}}));
        for (name, s) in &t.sets {
            let kind = if s.is_map { "map" } else { "set" };
            items.push(json!({kind: {"family": f, "table": n, "name": name, "elem": s.elems}}));
        }
        for c in &t.chains {
            let mut body = json!({"family": f, "table": n, "name": c.name});
            let o = body.as_object_mut().unwrap();
            if let Some(h) = &c.hook {
                o.insert("hook".into(), json!(h));
            }
            if let Some(p) = c.prio {
                o.insert("prio".into(), json!(p));
            }
            if let Some(k) = &c.kind {
                o.insert("type".into(), json!(k));
            }
            if let Some(p) = &c.policy {
                o.insert("policy".into(), json!(p));
            }
            items.push(json!({ "chain": body }));
        }
        for c in &t.chains {
            for r in &c.rules {
                let mut body = json!({"family": f, "table": n, "chain": c.name, "expr": r.exprs});
                if let Some(h) = r.handle {
                    body.as_object_mut()
                        .unwrap()
                        .insert("handle".into(), json!(h));
                }
                items.push(json!({ "rule": body }));
            }
        }
    }
    json!({ "nftables": items })
}

// ---------------------------------------------------------------------------
// The proxy's request targets and path policy.

/// Input: the request target on the first line; each further line a glob,
/// `!`-prefixed for a deny glob.
pub fn proxy_target(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.split('\n');
    let target = lines.next().unwrap_or("");
    let mut allow = Vec::new();
    let mut deny = Vec::new();
    for l in lines.take(16) {
        match l.strip_prefix('!') {
            Some(g) => deny.push(g.to_string()),
            None => allow.push(l.to_string()),
        }
    }
    let policy = PathPolicy {
        allow: allow.iter().map(|g| PathGlob::new(g)).collect(),
        deny: deny.iter().map(|g| PathGlob::new(g)).collect(),
    };
    for allowed_query in [&[][..], &["id"][..]] {
        let Ok(c) = canonical(target, allowed_query) else {
            continue;
        };
        canonical_properties(&c, allowed_query);
        for (text, g) in allow
            .iter()
            .zip(&policy.allow)
            .chain(deny.iter().zip(&policy.deny))
        {
            if small(text, &c) {
                assert_eq!(
                    g.matches(&c),
                    naive_matches(text, &c),
                    "glob {text:?} on {:?} disagrees with the naive matcher",
                    c.target()
                );
            } else {
                let _ = g.matches(&c);
            }
        }
        policy_properties(&policy, &allow, &deny, &c);
        if let Some(cat) = sensitive(&c) {
            assert!(
                matches!(PathPolicy::default_imds().decide(&c), Decision::Deny { .. }),
                "the default policy serves sensitive {cat:?}: {}",
                c.target()
            );
        }
    }
}

fn canonical_properties(c: &Canonical, allowed_query: &[&str]) {
    for s in &c.segments {
        assert!(
            !s.is_empty() && s != "." && s != ".." && !s.contains('/') && !s.contains('\\'),
            "segment {s:?} is not canonical"
        );
        assert!(
            !s.bytes().any(|b| b < 0x20 || b == 0x7f),
            "control byte in {s:?}"
        );
    }
    // The path as forwarded is canonical already: canonicalising it again
    // gives the same segments (idempotent), and it prints the same.
    let path = c.path();
    let again =
        canonical(&path, &[]).unwrap_or_else(|e| panic!("{path:?} (forwarded) is refused: {e}"));
    assert_eq!(
        (&again.segments, again.dir),
        (&c.segments, c.dir),
        "{path:?}"
    );
    assert_eq!(again.path(), path);
    // The full target (with its query) is a fixed point too.
    let target = c.target();
    let again = canonical(&target, allowed_query)
        .unwrap_or_else(|e| panic!("{target:?} (forwarded) is refused: {e}"));
    assert_eq!(&again, c, "{target:?}");
    assert_eq!(again.target(), target);
}

/// The categories `proxy_path` treats as sensitive, written out again.
const SENSITIVE: [&[&str]; 3] = [
    &["meta-data", "iam"],
    &["meta-data", "identity-credentials"],
    &["user-data"],
];

fn sensitive(c: &Canonical) -> Option<&'static [&'static str]> {
    SENSITIVE
        .into_iter()
        .find(|cat| c.segments.len() > cat.len() && c.segments[1..=cat.len()] == **cat)
}

fn glob_segments(text: &str) -> Vec<&str> {
    text.split('/').filter(|s| !s.is_empty()).collect()
}

/// A glob that writes the category out (version segment, then the
/// category's segments literally).
fn names(text: &str, cat: &[&str]) -> bool {
    let g = glob_segments(text);
    g.len() > cat.len() && g[0] != "**" && g[1..=cat.len()] == *cat
}

fn policy_properties(policy: &PathPolicy, allow: &[String], deny: &[String], c: &Canonical) {
    let d = policy.decide(c);
    match &d {
        Decision::Allow { rule } => {
            assert!(
                !deny.iter().any(|g| small(g, c) && naive_matches(g, c)),
                "{rule} allowed {} although a deny glob matches",
                c.target()
            );
            if let Some(cat) = sensitive(c) {
                assert!(
                    allow.iter().any(|g| names(g, cat)),
                    "{rule} served sensitive {} without naming {cat:?}",
                    c.target()
                );
            }
        }
        Decision::Deny { .. } => {}
    }
}

/// Small enough for the naive matcher (its cost grows exponentially with
/// the number of `**`).
fn small(glob: &str, c: &Canonical) -> bool {
    c.segments.len() <= 10 && glob_segments(glob).len() <= 8
}

/// The reference matcher: plain recursion over segments, exponential in
/// the number of `**` and so only run on small inputs.
pub fn naive_matches(text: &str, c: &Canonical) -> bool {
    let dir = text.ends_with('/') && text != "/";
    if dir && !c.dir {
        return false;
    }
    fn go(pat: &[&str], segs: &[String]) -> bool {
        match pat.split_first() {
            None => segs.is_empty(),
            Some((&"**", rest)) => (0..=segs.len()).any(|i| go(rest, &segs[i..])),
            Some((p, rest)) => match segs.split_first() {
                Some((s, srest)) => (*p == "*" || p == s) && go(rest, srest),
                None => false,
            },
        }
    }
    go(&glob_segments(text), &c.segments)
}

// ---------------------------------------------------------------------------
// Doctor snapshots.

/// The file separator of a packed snapshot: a line `=== NAME`.
pub const FILE_MARK: &str = "=== ";

/// Splits a packed snapshot (`=== NAME` lines, each followed by that
/// file's text) into the map `Snapshot::parse` takes.
pub fn unpack(text: &str) -> BTreeMap<String, String> {
    let mut files = BTreeMap::new();
    let mut cur: Option<(String, String)> = None;
    for line in text.split_inclusive('\n') {
        if let Some(name) = line.strip_prefix(FILE_MARK) {
            if let Some((n, t)) = cur.take() {
                files.insert(n, t);
            }
            cur = Some((
                name.trim_end_matches(['\n', '\r']).to_string(),
                String::new(),
            ));
        } else if let Some((_, t)) = cur.as_mut() {
            t.push_str(line);
        }
    }
    if let Some((n, t)) = cur {
        files.insert(n, t);
    }
    files
}

/// The inverse of [`unpack`], for building seeds from fixture directories.
pub fn pack(files: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    for (name, text) in files {
        out.push_str(FILE_MARK);
        out.push_str(name);
        out.push('\n');
        out.push_str(text);
        if !text.ends_with('\n') {
            out.push('\n');
        }
    }
    out
}

pub fn snapshot(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let files = unpack(text);
    match Snapshot::parse(&files) {
        Err(e) => {
            assert!(
                e.file == "ip-addr.json" || files.contains_key(&e.file),
                "error names {:?}, which is not a file of the snapshot",
                e.file
            );
            let _ = e.to_string();
        }
        Ok(snap) => {
            let report = metaguard_core::doctor::analyze(&snap, "fuzz");
            assert_eq!(report.ok, report.findings.is_empty());
            let _ = report.human(false);
            let _ = report.human(true);
            let json = serde_json::to_string(&report).expect("the report serialises");
            let _: Value = serde_json::from_str(&json).expect("the report's JSON parses");
        }
    }
}
