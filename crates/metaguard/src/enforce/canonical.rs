//! Semantic comparison of nft tables.
//!
//! `nft` rewrites what it is given (implicit `meta l4proto`, priorities as
//! names, cgroupv2 levels dropped from map types…), so the kernel's state is
//! never compared with the script that was sent. The *expected* state is the
//! read-back of the same script loaded into a scratch namespace on this very
//! kernel and nft; the *actual* state is the read-back of the live table.
//! Both are reduced to a canonical form — handles dropped, set elements
//! sorted — and compared object by object.

use std::collections::BTreeMap;

use serde_json::Value;

/// A table in canonical form, plus its text listing for display.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    /// Table attributes (comment, flags).
    pub table: Value,
    /// `set:NAME`, `map:NAME`, `chain:NAME` → attributes.
    pub objects: BTreeMap<String, Value>,
    /// Chain name → rule expressions in order.
    pub rules: BTreeMap<String, Vec<Value>>,
    /// Chain name → rule lines of `nft list table` (for diffs a human reads).
    pub rule_text: BTreeMap<String, Vec<String>>,
}

impl Table {
    /// Adds the host's `bridge metaguard` table (the proxy's identity
    /// marks): its objects and chains are named `bridge NAME`.
    pub fn merge_bridge(&mut self, bridge: Table) {
        self.objects.insert("table:bridge".into(), bridge.table);
        for (k, v) in bridge.objects {
            let (kind, name) = k.split_once(':').unwrap_or(("object", k.as_str()));
            self.objects.insert(format!("{kind}:bridge {name}"), v);
        }
        for (chain, rules) in bridge.rules {
            self.rules.insert(format!("bridge {chain}"), rules);
        }
        for (chain, lines) in bridge.rule_text {
            self.rule_text.insert(format!("bridge {chain}"), lines);
        }
    }

    /// Whether the bridge table is part of this (expected) state.
    pub fn has_bridge(&self) -> bool {
        self.objects.contains_key("table:bridge")
    }
}

/// Builds the canonical form from `nft -j list table` output and the text
/// listing of the same table.
pub fn parse(json: &str, text: &str) -> Result<Table, String> {
    let doc: Value =
        serde_json::from_str(json).map_err(|e| format!("nft printed unreadable JSON: {e}"))?;
    let items = doc
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or("nft JSON has no \"nftables\" array")?;
    let mut t = Table {
        table: Value::Null,
        objects: BTreeMap::new(),
        rules: BTreeMap::new(),
        rule_text: rule_lines(text),
    };
    for item in items {
        let Some((kind, body)) = item.as_object().and_then(|o| o.iter().next()) else {
            continue;
        };
        let mut body = body.clone();
        strip(&mut body);
        match kind.as_str() {
            "metainfo" => {}
            "table" => t.table = body,
            "rule" => {
                let chain = body
                    .get("chain")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                let expr = body.get("expr").cloned().unwrap_or(Value::Null);
                t.rules.entry(chain).or_default().push(expr);
            }
            other => {
                let name = body
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                t.objects.insert(format!("{other}:{name}"), body);
            }
        }
    }
    Ok(t)
}

/// Removes what differs between equal tables: handles; sorts set elements.
fn strip(v: &mut Value) {
    if let Some(o) = v.as_object_mut() {
        o.remove("handle");
        if let Some(Value::Array(elems)) = o.get_mut("elem") {
            elems.sort_by_key(|e| e.to_string());
        }
    }
}

/// The rule lines of each chain in an `nft list table` listing.
fn rule_lines(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let trimmed = line.trim();
        if let Some(name) = trimmed
            .strip_prefix("chain ")
            .and_then(|r| r.strip_suffix(" {"))
        {
            current = Some(name.to_string());
            out.entry(name.to_string()).or_default();
            continue;
        }
        if trimmed == "}" {
            current = None;
            continue;
        }
        if let Some(chain) = &current {
            if trimmed.is_empty() || trimmed.starts_with("type ") || trimmed.starts_with("comment ")
            {
                continue;
            }
            out.entry(chain.clone())
                .or_default()
                .push(trimmed.to_string());
        }
    }
    out
}

/// What differs between the expected and the actual table, as sentences;
/// empty when they are the same.
pub fn diff(expected: &Table, actual: &Table) -> Vec<String> {
    let mut out = Vec::new();
    if expected.table != actual.table {
        out.push(format!(
            "table attributes changed: expected {}, found {}",
            expected.table, actual.table
        ));
    }
    for (key, want) in &expected.objects {
        match actual.objects.get(key) {
            None => out.push(format!("{} is missing", describe(key))),
            Some(got) if got != want => out.extend(object_diff(key, want, got)),
            Some(_) => {}
        }
    }
    for key in actual
        .objects
        .keys()
        .filter(|k| !expected.objects.contains_key(*k))
    {
        out.push(format!(
            "{} is not part of the policy (added by someone else)",
            describe(key)
        ));
    }
    let chains: std::collections::BTreeSet<&String> =
        expected.rules.keys().chain(actual.rules.keys()).collect();
    for chain in chains {
        let want = expected.rules.get(chain).map(Vec::as_slice).unwrap_or(&[]);
        let got = actual.rules.get(chain).map(Vec::as_slice).unwrap_or(&[]);
        if want != got {
            let wt = expected.rule_text.get(chain).cloned().unwrap_or_default();
            let gt = actual.rule_text.get(chain).cloned().unwrap_or_default();
            let mut s = format!("chain {chain}: rules differ");
            for l in wt.iter().filter(|l| !gt.contains(l)) {
                s.push_str(&format!("\n    - {l}"));
            }
            for l in gt.iter().filter(|l| !wt.contains(l)) {
                s.push_str(&format!("\n    + {l}"));
            }
            if wt.iter().all(|l| gt.contains(l)) && gt.iter().all(|l| wt.contains(l)) {
                s.push_str("\n    (same rules, different order)");
            }
            out.push(s);
        }
    }
    out
}

fn describe(key: &str) -> String {
    match key.split_once(':') {
        Some((kind, name)) => format!("{kind} {name}"),
        None => key.to_string(),
    }
}

fn object_diff(key: &str, want: &Value, got: &Value) -> Vec<String> {
    let elems = |v: &Value| -> Vec<String> {
        v.get("elem")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(element_text).collect())
            .unwrap_or_default()
    };
    let (we, ge) = (elems(want), elems(got));
    let mut out = Vec::new();
    let missing: Vec<&String> = we.iter().filter(|e| !ge.contains(e)).collect();
    let extra: Vec<&String> = ge.iter().filter(|e| !we.contains(e)).collect();
    if !missing.is_empty() {
        out.push(format!(
            "{}: missing element{} {}",
            describe(key),
            if missing.len() == 1 { "" } else { "s" },
            join(&missing)
        ));
    }
    if !extra.is_empty() {
        out.push(format!(
            "{}: unexpected element{} {}",
            describe(key),
            if extra.len() == 1 { "" } else { "s" },
            join(&extra)
        ));
    }
    let mut w = want.clone();
    let mut g = got.clone();
    for v in [&mut w, &mut g] {
        if let Some(o) = v.as_object_mut() {
            o.remove("elem");
        }
    }
    if w != g {
        out.push(format!(
            "{} changed: expected {w}, found {g}",
            describe(key)
        ));
    }
    out
}

fn join(items: &[&String]) -> String {
    const SHOWN: usize = 8;
    let mut s = items
        .iter()
        .take(SHOWN)
        .map(|e| e.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > SHOWN {
        s.push_str(&format!(" and {} more", items.len() - SHOWN));
    }
    s
}

/// An element as nft would print it: plain strings bare, the rest as JSON.
fn element_text(e: &Value) -> String {
    match e {
        Value::String(s) => s.clone(),
        Value::Array(pair) if pair.len() == 2 => {
            format!("{} : {}", element_text(&pair[0]), pair[1])
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JSON: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
      {"table": {"family": "inet", "name": "metaguard", "handle": 7, "comment": "c"}},
      {"set": {"family": "inet", "name": "imds4", "table": "metaguard", "type": "ipv4_addr", "handle": 1, "elem": ["169.254.169.254", "1.2.3.4"]}},
      {"chain": {"family": "inet", "table": "metaguard", "name": "wl0", "handle": 2}},
      {"rule": {"family": "inet", "table": "metaguard", "chain": "wl0", "handle": 5, "expr": [{"accept": null}]}}]}"#;
    const TEXT: &str =
        "table inet metaguard {\n\tchain wl0 {\n\t\tcomment \"x\"\n\t\taccept\n\t}\n}\n";

    #[test]
    fn handles_and_element_order_do_not_matter() {
        let a = parse(JSON, TEXT).expect("parse");
        let b = parse(
            &JSON.replace("\"handle\": 7", "\"handle\": 99").replace(
                "[\"169.254.169.254\", \"1.2.3.4\"]",
                "[\"1.2.3.4\", \"169.254.169.254\"]",
            ),
            TEXT,
        )
        .expect("parse");
        assert!(diff(&a, &b).is_empty(), "{:?}", diff(&a, &b));
    }

    #[test]
    fn differences_are_named() {
        let a = parse(JSON, TEXT).expect("parse");
        let b = parse(
            &JSON
                .replace(", \"1.2.3.4\"", "")
                .replace("{\"accept\": null}", "{\"drop\": null}"),
            &TEXT.replace("accept", "drop"),
        )
        .expect("parse");
        let d = diff(&a, &b);
        assert_eq!(d.len(), 2, "{d:?}");
        assert_eq!(d[0], "set imds4: missing element 1.2.3.4");
        assert_eq!(d[1], "chain wl0: rules differ\n    - accept\n    + drop");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(parse("not json", "").is_err());
        assert!(parse("{}", "").is_err());
        assert!(parse(r#"{"nftables": [1, "x", {}]}"#, "").is_ok());
    }
}
