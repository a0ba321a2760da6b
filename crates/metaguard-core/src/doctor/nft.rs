//! The nftables JSON model (`nft -j list ruleset`) for what the doctor
//! evaluates: tables, named sets and maps (with their elements), chains
//! (hook, priority, type, policy) and rules (handle and expressions).
//!
//! Expressions are kept as `serde_json::Value` and interpreted by the
//! evaluator in [`super::path`]; this module only gives them structure and a
//! readable nft-like rendering for evidence. The typed `nftables` crate was
//! not used: its model rejects some read-back shapes nft 1.0.6 prints (see
//! dependencies.md), and the doctor must never fail on a ruleset it can
//! partially understand — unknown expressions stay opaque instead.

use std::collections::BTreeMap;

use serde_json::Value;

/// A structural error in the JSON: what and where (the index of the
/// object in the `nftables` array).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NftJsonError {
    #[error("line {line}, column {column}: not valid JSON: {message}")]
    Json {
        line: usize,
        column: usize,
        message: String,
    },
    #[error("line 1: {0}")]
    Shape(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Ruleset {
    pub tables: Vec<Table>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    /// `ip`, `ip6`, `inet`, `bridge`, `arp`, `netdev`.
    pub family: String,
    pub name: String,
    /// Named sets and maps, by name.
    pub sets: BTreeMap<String, Set>,
    pub chains: Vec<Chain>,
}

impl Table {
    pub fn chain(&self, name: &str) -> Option<&Chain> {
        self.chains.iter().find(|c| c.name == name)
    }
}

/// A named set (`elem` are values) or map (`elem` are `[key, data]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Set {
    pub is_map: bool,
    pub elems: Vec<Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Chain {
    pub name: String,
    /// `prerouting`, `input`, `forward`, `output`, `postrouting`, … for base chains.
    pub hook: Option<String>,
    pub prio: Option<i32>,
    /// `filter`, `nat`, `route`.
    pub kind: Option<String>,
    /// `accept` / `drop` for base chains.
    pub policy: Option<String>,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub handle: Option<u64>,
    pub exprs: Vec<Value>,
}

impl Rule {
    /// An nft-like rendering, for evidence (`ip daddr 127.0.0.0/8 drop`).
    pub fn text(&self) -> String {
        self.exprs
            .iter()
            .map(render_stmt)
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl Ruleset {
    /// Number of rules in every table.
    pub fn rule_count(&self) -> usize {
        self.tables
            .iter()
            .flat_map(|t| &t.chains)
            .map(|c| c.rules.len())
            .sum()
    }
}

/// Named chain priorities as nft prints them. A sum past `i32` (nft
/// itself keeps priorities in an `int`) is not a priority: `None`, as for
/// any other unreadable one.
fn named_prio(s: &str) -> Option<i32> {
    let s = s.trim();
    let (name, delta) = if let Some((a, b)) = s.split_once(" + ") {
        (a, b.trim().parse::<i32>().ok()?)
    } else if let Some((a, b)) = s.split_once(" - ") {
        (a, b.trim().parse::<i32>().ok()?.checked_neg()?)
    } else {
        (s, 0)
    };
    let base: i32 = match name.trim() {
        "raw" => -300,
        "mangle" => -150,
        "dstnat" => -100,
        "filter" => 0,
        "security" => 50,
        "srcnat" => 100,
        n => n.parse().ok()?,
    };
    base.checked_add(delta)
}

fn str_of<'a>(o: &'a Value, key: &str) -> Option<&'a str> {
    o.get(key).and_then(Value::as_str)
}

/// Parses the output of `nft -j list ruleset`.
pub fn parse(text: &str) -> Result<Ruleset, NftJsonError> {
    let doc: Value = serde_json::from_str(text).map_err(|e| NftJsonError::Json {
        line: e.line(),
        column: e.column(),
        message: e.to_string(),
    })?;
    let items = doc
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or_else(|| NftJsonError::Shape("expected an object {\"nftables\": [...]}".into()))?;
    let mut rs = Ruleset { tables: Vec::new() };
    let shape = |i: usize, what: &str, msg: &str| {
        NftJsonError::Shape(format!("nftables[{i}] ({what}): {msg}"))
    };
    for (i, item) in items.iter().enumerate() {
        let Some(obj) = item.as_object() else {
            return Err(shape(i, "?", "not an object"));
        };
        let Some((kind, body)) = obj.iter().next() else {
            return Err(shape(i, "?", "empty object"));
        };
        let fam_name = |key: &str| -> Result<(String, String), NftJsonError> {
            let f = str_of(body, "family").ok_or_else(|| shape(i, kind, "missing \"family\""))?;
            let n =
                str_of(body, key).ok_or_else(|| shape(i, kind, &format!("missing \"{key}\"")))?;
            Ok((f.to_string(), n.to_string()))
        };
        match kind.as_str() {
            "metainfo" => {}
            "table" => {
                let (family, name) = fam_name("name")?;
                rs.tables.push(Table {
                    family,
                    name,
                    sets: BTreeMap::new(),
                    chains: Vec::new(),
                });
            }
            "set" | "map" => {
                let (family, table) = fam_name("table")?;
                let name =
                    str_of(body, "name").ok_or_else(|| shape(i, kind, "missing \"name\""))?;
                let t = find_table(&mut rs, &family, &table).ok_or_else(|| {
                    shape(
                        i,
                        kind,
                        &format!("table {family} {table} not declared before"),
                    )
                })?;
                let elems = match body.get("elem") {
                    Some(Value::Array(a)) => a.clone(),
                    Some(_) => return Err(shape(i, kind, "\"elem\" is not an array")),
                    None => Vec::new(),
                };
                t.sets.insert(
                    name.to_string(),
                    Set {
                        is_map: kind == "map",
                        elems,
                    },
                );
            }
            "chain" => {
                let (family, table) = fam_name("table")?;
                let name =
                    str_of(body, "name").ok_or_else(|| shape(i, kind, "missing \"name\""))?;
                let prio = match body.get("prio") {
                    None => None,
                    Some(Value::Number(n)) => n.as_i64().and_then(|p| i32::try_from(p).ok()),
                    Some(Value::String(s)) => named_prio(s),
                    Some(_) => return Err(shape(i, kind, "bad \"prio\"")),
                };
                let t = find_table(&mut rs, &family, &table).ok_or_else(|| {
                    shape(
                        i,
                        kind,
                        &format!("table {family} {table} not declared before"),
                    )
                })?;
                t.chains.push(Chain {
                    name: name.to_string(),
                    hook: str_of(body, "hook").map(str::to_string),
                    prio,
                    kind: str_of(body, "type").map(str::to_string),
                    policy: str_of(body, "policy").map(str::to_string),
                    rules: Vec::new(),
                });
            }
            "rule" => {
                let (family, table) = fam_name("table")?;
                let chain =
                    str_of(body, "chain").ok_or_else(|| shape(i, kind, "missing \"chain\""))?;
                let exprs = match body.get("expr") {
                    Some(Value::Array(a)) => a.clone(),
                    _ => return Err(shape(i, kind, "missing \"expr\" array")),
                };
                let t = find_table(&mut rs, &family, &table).ok_or_else(|| {
                    shape(
                        i,
                        kind,
                        &format!("table {family} {table} not declared before"),
                    )
                })?;
                let c = t
                    .chains
                    .iter_mut()
                    .find(|c| c.name == chain)
                    .ok_or_else(|| shape(i, kind, &format!("chain {chain} not declared before")))?;
                c.rules.push(Rule {
                    handle: body.get("handle").and_then(Value::as_u64),
                    exprs,
                });
            }
            // Flowtables, counters, quotas, ct helpers, elements: not
            // needed for verdicts.
            _ => {}
        }
    }
    Ok(rs)
}

fn find_table<'a>(rs: &'a mut Ruleset, family: &str, name: &str) -> Option<&'a mut Table> {
    rs.tables
        .iter_mut()
        .find(|t| t.family == family && t.name == name)
}

/// Renders a value (the right side of a match, a key) nft-like.
pub fn render_value(v: &Value) -> String {
    match v {
        Value::String(s) => {
            if s.starts_with('@')
                || s.parse::<std::net::IpAddr>().is_ok()
                || s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                    && !s.contains('-')
            {
                s.clone()
            } else {
                format!("\"{s}\"")
            }
        }
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => String::new(),
        Value::Array(a) => format!(
            "{{ {} }}",
            a.iter().map(render_value).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(o) => {
            let Some((k, b)) = o.iter().next() else {
                return String::new();
            };
            match k.as_str() {
                "payload" => {
                    let p = str_of(b, "protocol").unwrap_or("?");
                    let f = str_of(b, "field").unwrap_or("?");
                    format!("{p} {f}")
                }
                "meta" => format!("meta {}", str_of(b, "key").unwrap_or("?")),
                "ct" => {
                    let key = str_of(b, "key").unwrap_or("?");
                    match str_of(b, "dir") {
                        Some(d) => format!("ct {d} {key}"),
                        None => format!("ct {key}"),
                    }
                }
                "socket" => format!("socket {}", str_of(b, "key").unwrap_or("?")),
                "fib" => format!("fib {}", str_of(b, "result").unwrap_or("?")),
                "prefix" => format!(
                    "{}/{}",
                    b.get("addr").map(render_value).unwrap_or_default(),
                    b.get("len").map(render_value).unwrap_or_default()
                ),
                "range" => match b.as_array() {
                    Some(a) if a.len() == 2 => {
                        format!("{}-{}", render_value(&a[0]), render_value(&a[1]))
                    }
                    _ => "range".into(),
                },
                "set" => match b {
                    Value::Array(a) => format!(
                        "{{ {} }}",
                        a.iter().map(render_value).collect::<Vec<_>>().join(", ")
                    ),
                    other => render_value(other),
                },
                "concat" => match b.as_array() {
                    Some(a) => a.iter().map(render_value).collect::<Vec<_>>().join(" . "),
                    None => "concat".into(),
                },
                other => other.to_string(),
            }
        }
    }
}

/// Renders one statement of a rule nft-like.
pub fn render_stmt(v: &Value) -> String {
    let Some((k, b)) = v.as_object().and_then(|o| o.iter().next()) else {
        return String::new();
    };
    match k.as_str() {
        "match" => {
            let left = b.get("left").map(render_value).unwrap_or_default();
            let right = b.get("right").map(render_value).unwrap_or_default();
            let left = left
                .strip_prefix("meta ")
                .filter(|l| {
                    [
                        "iifname", "oifname", "iif", "oif", "l4proto", "nfproto", "mark", "skuid",
                    ]
                    .contains(l)
                })
                .map(str::to_string)
                .unwrap_or(left);
            match str_of(b, "op") {
                Some("==") | Some("in") | None => format!("{left} {right}"),
                Some(op) => format!("{left} {op} {right}"),
            }
        }
        "counter" => "counter".into(),
        "accept" | "drop" | "return" | "continue" => k.clone(),
        "jump" | "goto" => format!("{k} {}", str_of(b, "target").unwrap_or("?")),
        "reject" => match (str_of(b, "type"), b.get("expr").map(render_value)) {
            (Some(t), Some(e)) => format!("reject with {t} {e}"),
            (Some(t), None) => format!("reject with {t}"),
            _ => "reject".into(),
        },
        "dnat" | "snat" => {
            let a = b.get("addr").map(render_value).unwrap_or_default();
            match b.get("port") {
                Some(p) => format!("{k} to {a}:{}", render_value(p)),
                None => format!("{k} to {a}"),
            }
        }
        "redirect" => match b.get("port") {
            Some(p) => format!("redirect to :{}", render_value(p)),
            None => "redirect".into(),
        },
        "masquerade" => "masquerade".into(),
        "vmap" => format!(
            "{} vmap {}",
            b.get("key").map(render_value).unwrap_or_default(),
            b.get("data").map(render_value).unwrap_or_default()
        ),
        "xt" => format!(
            "xt {} {}",
            str_of(b, "type").unwrap_or("?"),
            str_of(b, "name").unwrap_or("?")
        ),
        "log" => "log".into(),
        other => other.to_string(),
    }
}

/// Parses a chain priority as nft prints it (number or `filter - 10`).
pub fn parse_prio(s: &str) -> Option<i32> {
    named_prio(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_priorities() {
        assert_eq!(parse_prio("filter"), Some(0));
        assert_eq!(parse_prio("dstnat - 10"), Some(-110));
        assert_eq!(parse_prio("srcnat + 5"), Some(105));
        assert_eq!(parse_prio("-150"), Some(-150));
        assert_eq!(parse_prio("bogus"), None);
    }

    /// Regression (fuzz target `nft_json`): a priority whose sum leaves
    /// `i32` panicked ("attempt to add with overflow") in debug builds and
    /// wrapped to a wrong priority in release builds.
    #[test]
    fn out_of_range_priorities_are_unreadable_not_a_panic() {
        assert_eq!(parse_prio("srcnat + 2147483647"), None);
        assert_eq!(parse_prio("raw - 2147483647"), None);
        assert_eq!(parse_prio("filter - -2147483648"), None);
        assert_eq!(parse_prio("filter + 2147483647"), Some(i32::MAX));
        let text = r#"{"nftables":[{"table":{"family":"ip","name":"t"}},
            {"chain":{"family":"ip","table":"t","name":"c","prio":"srcnat + 2147483647"}}]}"#;
        let rs = parse(text).expect("parses");
        assert_eq!(rs.tables[0].chains[0].prio, None);
    }
}
