//! The nftables dialect of the evaluator.
//!
//! Owns: an nft table's base chains at a hook, and judging one nft JSON
//! rule against a packet — its expressions in order: matches (payload,
//! meta, ct, socket cgroupv2; sets, maps, prefixes, ranges) in
//! three-valued logic ([`Truth`]), verdict maps, NAT statements and
//! verdicts, as a [`RuleOutcome`]. Expressions it does not know are
//! statements without a verdict; `xt` (iptables-nft's opaque matches)
//! makes a rule uncertain. The walk itself is `walk`'s.

use std::net::IpAddr;

use serde_json::Value;

use super::super::iptables_save::Cidr;
use super::super::nft::{Chain, Rule, Table};
use super::model::{Backend, Hook, Packet, RuleRef, Truth};
use super::walk::{BaseChain, BaseRules, Netns, RuleDialect, RuleOutcome};

/// `table`'s base chains at `hook`, in the table's order.
pub(super) fn base_chains(table: &Table, hook: Hook) -> impl Iterator<Item = BaseChain<'_>> {
    table
        .chains
        .iter()
        .filter(move |c| c.hook.as_deref() == Some(hook.as_str()))
        .map(move |chain| BaseChain {
            prio: chain.prio.unwrap_or(0),
            nat: chain.kind.as_deref() == Some("nat"),
            rules: BaseRules::Nft { table, chain },
        })
}

/// One nft table at one hook, as the walker sees it.
#[derive(Debug)]
pub(super) struct NftRules<'n, 'a> {
    ns: &'n Netns<'a>,
    table: &'a Table,
    hook: Hook,
}

impl<'n, 'a> NftRules<'n, 'a> {
    pub(super) fn new(ns: &'n Netns<'a>, table: &'a Table, hook: Hook) -> Self {
        NftRules { ns, table, hook }
    }

    /// A `match` expression's truth for `p`.
    fn matches(&self, b: &Value, p: &Packet) -> Truth {
        let Some(left) = b.get("left") else {
            return Truth::Maybe;
        };
        let Some(right) = b.get("right") else {
            return Truth::Maybe;
        };
        let lv = packet_value(left, p, self.hook);
        let op = b.get("op").and_then(Value::as_str).unwrap_or("==");
        if lv == PacketValue::Absent {
            // A match on a header the packet does not have never matches
            // (nft adds an implicit dependency), negated or not.
            return Truth::No;
        }
        let r = value_in(&lv, right, self.table);
        match op {
            "==" | "in" => r,
            "!=" => !r,
            _ => Truth::Maybe,
        }
    }

    /// A verdict (`{"accept": null}`, `{"jump": {"target": …}}`, …) as an
    /// outcome; `None` for one that does not end the rule.
    fn verdict(&self, v: &Value) -> Option<RuleOutcome<&'a Chain>> {
        let (vk, vb) = v.as_object().and_then(|o| o.iter().next())?;
        let callee = || {
            vb.get("target")
                .and_then(Value::as_str)
                .and_then(|n| self.table.chain(n))
        };
        Some(match vk.as_str() {
            "accept" => RuleOutcome::Accept,
            "drop" => RuleOutcome::Drop,
            "reject" => RuleOutcome::Reject,
            "return" => RuleOutcome::Return,
            "continue" => RuleOutcome::Next,
            "jump" => callee().map_or(RuleOutcome::Next, RuleOutcome::Jump),
            "goto" => callee().map_or(RuleOutcome::Next, RuleOutcome::Goto),
            _ => return None,
        })
    }

    /// A `dnat`/`redirect` statement (`what`); `None` where it does not
    /// apply (outside a nat base chain).
    fn nat(
        &self,
        what: &str,
        b: &Value,
        chain: &Chain,
        depth: usize,
    ) -> Option<RuleOutcome<&'a Chain>> {
        if chain.kind.as_deref() != Some("nat") && depth == 0 {
            return None;
        }
        let port = b
            .get("port")
            .and_then(Value::as_u64)
            .and_then(|x| u16::try_from(x).ok());
        if what != "dnat" {
            return Some(RuleOutcome::Redirect { port });
        }
        Some(
            match b
                .get("addr")
                .and_then(Value::as_str)
                .and_then(|a| a.parse::<IpAddr>().ok())
            {
                Some(a) => RuleOutcome::Dnat {
                    addr: Some(a),
                    port,
                },
                None => RuleOutcome::Unsure { listed: true },
            },
        )
    }
}

impl<'a> RuleDialect for NftRules<'_, 'a> {
    type Chain = &'a Chain;

    fn rule_count(&self, chain: &'a Chain) -> usize {
        chain.rules.len()
    }

    fn judge(
        &self,
        chain: &'a Chain,
        idx: usize,
        p: &Packet,
        depth: usize,
    ) -> RuleOutcome<&'a Chain> {
        let r = &chain.rules[idx];
        for e in &r.exprs {
            let Some((k, b)) = e.as_object().and_then(|o| o.iter().next()) else {
                continue;
            };
            let outcome = match k.as_str() {
                "match" => match self.matches(b, p) {
                    Truth::Yes => None,
                    Truth::No => Some(RuleOutcome::Next),
                    Truth::Maybe => Some(RuleOutcome::Unsure {
                        listed: has_verdict(r),
                    }),
                },
                "accept" | "drop" | "return" | "continue" | "jump" | "goto" => self.verdict(e),
                "reject" => Some(RuleOutcome::Reject),
                "vmap" => {
                    let key = b
                        .get("key")
                        .map_or(PacketValue::Unknown, |k| packet_value(k, p, self.hook));
                    if key == PacketValue::Absent {
                        return RuleOutcome::Next;
                    }
                    match vmap_lookup(&key, b.get("data"), self.table) {
                        VmapLookup::Found(v) => self.verdict(&v),
                        VmapLookup::Missing => Some(RuleOutcome::Next),
                        VmapLookup::Unknown => Some(RuleOutcome::Unsure { listed: true }),
                    }
                }
                "dnat" | "redirect" => self.nat(k, b, chain, depth),
                "snat" | "masquerade" => Some(RuleOutcome::Accept),
                "xt" => Some(RuleOutcome::Unsure { listed: true }),
                // counter, log, limit, meta set, mangle, notrack, …
                _ => None,
            };
            if let Some(o) = outcome {
                return o;
            }
        }
        RuleOutcome::Next
    }

    fn policy_drops(&self, chain: &'a Chain) -> bool {
        chain.policy.as_deref() == Some("drop")
    }

    fn rule_ref(&self, chain: &'a Chain, idx: Option<usize>, _v6: bool) -> RuleRef {
        let rule = idx.map(|i| &chain.rules[i]);
        RuleRef {
            backend: Backend::Nft,
            family: self.table.family.clone(),
            table: self.table.name.clone(),
            chain: chain.name.clone(),
            hook: self.hook,
            position: None,
            handle: rule.and_then(|r| r.handle),
            rule: match rule {
                Some(r) => r.text(),
                None => format!("policy {}", chain.policy.as_deref().unwrap_or("accept")),
            },
            netns: self.ns.label.clone(),
            args: Vec::new(),
        }
    }
}

/// Whether a rule holds anything that would decide (so that assuming it
/// does not match is worth listing).
fn has_verdict(r: &Rule) -> bool {
    r.exprs.iter().any(|e| {
        e.as_object()
            .and_then(|o| o.keys().next())
            .is_some_and(|k| {
                matches!(
                    k.as_str(),
                    "accept"
                        | "drop"
                        | "reject"
                        | "jump"
                        | "goto"
                        | "vmap"
                        | "dnat"
                        | "redirect"
                        | "return"
                )
            })
    })
}

/// The packet's value for the left side of a match (`payload`, `meta`,
/// `ct`, `socket`).
fn packet_value(left: &Value, p: &Packet, hook: Hook) -> PacketValue {
    let Some((k, b)) = left.as_object().and_then(|o| o.iter().next()) else {
        return PacketValue::Unknown;
    };
    let s = |key: &str| b.get(key).and_then(Value::as_str).unwrap_or("");
    match k.as_str() {
        "payload" => match (s("protocol"), s("field")) {
            ("ip", f) if !p.v6() => match f {
                "daddr" => PacketValue::Addr(p.dst),
                "saddr" => PacketValue::Addr(p.src),
                "protocol" => PacketValue::Proto,
                _ => PacketValue::Unknown,
            },
            ("ip6", f) if p.v6() => match f {
                "daddr" => PacketValue::Addr(p.dst),
                "saddr" => PacketValue::Addr(p.src),
                "nexthdr" => PacketValue::Proto,
                _ => PacketValue::Unknown,
            },
            ("ip", _) | ("ip6", _) => PacketValue::Absent,
            ("tcp" | "th", "dport") => PacketValue::Num(u64::from(p.dport)),
            ("tcp" | "th", "sport") => PacketValue::Num(u64::from(p.sport)),
            ("udp" | "icmp" | "icmpv6" | "sctp" | "udplite", _) => PacketValue::Absent,
            _ => PacketValue::Unknown,
        },
        "meta" => match s("key") {
            "l4proto" | "protocol" if s("key") == "l4proto" => PacketValue::Proto,
            "protocol" => PacketValue::Str(if p.v6() { "ip6".into() } else { "ip".into() }),
            "nfproto" => PacketValue::Str(if p.v6() { "ipv6".into() } else { "ipv4".into() }),
            "iifname" | "iif" => PacketValue::Str(p.iif.clone().unwrap_or_default()),
            "oifname" | "oif" => PacketValue::Str(p.oif.clone().unwrap_or_default()),
            _ => PacketValue::Unknown,
        },
        "ct" => match (s("key"), b.get("dir").and_then(Value::as_str)) {
            ("state", _) => PacketValue::Flags(vec![if p.new { "new" } else { "established" }]),
            ("status", _) => {
                let mut f = Vec::new();
                if p.dnat {
                    f.push("dnat");
                }
                if !p.new {
                    f.extend(["confirmed", "seen-reply", "assured"]);
                }
                PacketValue::Flags(f)
            }
            ("daddr" | "ip daddr" | "ip6 daddr", Some("original")) => PacketValue::Addr(p.orig_dst),
            ("proto-dst", Some("original")) => PacketValue::Num(u64::from(p.orig_dport)),
            ("daddr", Some("reply")) | ("saddr", Some("original")) => PacketValue::Unknown,
            _ => PacketValue::Unknown,
        },
        "socket" => match s("key") {
            "cgroupv2" if hook == Hook::Output => match &p.cgroup {
                Some(c) => PacketValue::Cgroup(c.clone()),
                None => PacketValue::Unknown,
            },
            "cgroupv2" => PacketValue::Absent,
            _ => PacketValue::Unknown,
        },
        _ => PacketValue::Unknown,
    }
}

/// A value taken from the packet for an nft match.
#[derive(Debug, Clone, PartialEq)]
enum PacketValue {
    /// An address (`ip daddr`, `ct original daddr`, …).
    Addr(IpAddr),
    /// A port.
    Num(u64),
    /// A name (`iifname`, `meta protocol`).
    Str(String),
    /// The L4 protocol (always tcp here).
    Proto,
    /// `ct state` / `ct status` flags.
    Flags(Vec<&'static str>),
    /// The sending socket's cgroup path.
    Cgroup(String),
    /// The packet has no such header: no match.
    Absent,
    /// A key the evaluator does not know: the match may hold.
    Unknown,
}

/// Whether `v` equals / lies in `right`.
fn value_in(v: &PacketValue, right: &Value, t: &Table) -> Truth {
    if *v == PacketValue::Unknown {
        return Truth::Maybe;
    }
    match right {
        Value::String(s) if s.starts_with('@') => match t.sets.get(&s[1..]) {
            Some(set) => any_of(v, set.elems.iter(), t),
            None => Truth::Maybe,
        },
        Value::Array(a) => {
            if let PacketValue::Flags(f) = v {
                return Truth::from(a.iter().filter_map(Value::as_str).any(|x| f.contains(&x)));
            }
            any_of(v, a.iter(), t)
        }
        // An anonymous set: its elements, as an array (or one value).
        Value::Object(o) if o.contains_key("set") => match o.get("set") {
            Some(inner) => value_in(v, inner, t),
            None => Truth::Maybe,
        },
        other => elem_eq(v, other),
    }
}

/// Whether `v` is any of the set or map elements `it`.
fn any_of<'v>(v: &PacketValue, it: impl Iterator<Item = &'v Value>, t: &Table) -> Truth {
    let mut acc = Truth::No;
    for e in it {
        // Map entries are [key, data]; set entries may be {"elem": {"val": …}}.
        let e = match e {
            Value::Array(kv) if kv.len() == 2 => &kv[0],
            Value::Object(o) if o.contains_key("elem") => {
                o.get("elem").and_then(|x| x.get("val")).unwrap_or(e)
            }
            other => other,
        };
        match value_in(v, e, t) {
            Truth::Yes => return Truth::Yes,
            Truth::Maybe => acc = Truth::Maybe,
            Truth::No => {}
        }
    }
    acc
}

/// Whether `v` equals one element (address, prefix, range, port,
/// service name, interface pattern, flag, cgroup path).
fn elem_eq(v: &PacketValue, right: &Value) -> Truth {
    match (v, right) {
        (PacketValue::Addr(a), Value::String(s)) => match s.parse::<IpAddr>() {
            Ok(b) => Truth::from(*a == b || mapped_eq(*a, b)),
            Err(_) => Truth::Maybe,
        },
        (PacketValue::Addr(a), Value::Object(o)) => {
            if let Some(p) = o.get("prefix") {
                let addr = p
                    .get("addr")
                    .and_then(Value::as_str)
                    .and_then(|x| x.parse::<IpAddr>().ok());
                let len = p
                    .get("len")
                    .and_then(Value::as_u64)
                    .and_then(|l| u8::try_from(l).ok())
                    // A prefix longer than the address is not one nft
                    // prints: unknown, not "contains nothing".
                    .filter(|l| {
                        *l <= if addr.is_some_and(|a| a.is_ipv4()) {
                            32
                        } else {
                            128
                        }
                    });
                return match (addr, len) {
                    (Some(addr), Some(len)) => Truth::from(Cidr { addr, len }.contains(*a)),
                    _ => Truth::Maybe,
                };
            }
            if let Some(Value::Array(r)) = o.get("range") {
                let lo = r
                    .first()
                    .and_then(Value::as_str)
                    .and_then(|x| x.parse::<IpAddr>().ok());
                let hi = r
                    .get(1)
                    .and_then(Value::as_str)
                    .and_then(|x| x.parse::<IpAddr>().ok());
                return match (lo, hi) {
                    (Some(lo), Some(hi)) if lo.is_ipv4() == a.is_ipv4() => {
                        Truth::from(lo <= *a && *a <= hi)
                    }
                    (Some(_), Some(_)) => Truth::No,
                    _ => Truth::Maybe,
                };
            }
            Truth::Maybe
        }
        (PacketValue::Num(n), Value::Number(m)) => Truth::from(m.as_u64() == Some(*n)),
        (PacketValue::Num(n), Value::String(s)) => match service_port(s) {
            Some(p) => Truth::from(u64::from(p) == *n),
            None => Truth::Maybe,
        },
        (PacketValue::Num(n), Value::Object(o)) => match o.get("range").and_then(Value::as_array) {
            Some(r) if r.len() == 2 => match (r[0].as_u64(), r[1].as_u64()) {
                (Some(a), Some(b)) => Truth::from(a <= *n && *n <= b),
                _ => Truth::Maybe,
            },
            _ => Truth::Maybe,
        },
        (PacketValue::Proto, Value::String(s)) => Truth::from(s == "tcp"),
        (PacketValue::Proto, Value::Number(m)) => Truth::from(m.as_u64() == Some(6)),
        (PacketValue::Str(a), Value::String(s)) => Truth::from(ifname_match(s, a)),
        (PacketValue::Flags(f), Value::String(s)) => Truth::from(f.contains(&s.as_str())),
        (PacketValue::Cgroup(c), Value::String(s)) => {
            let s = s.trim_matches('/');
            Truth::from(c == s || c.starts_with(&format!("{s}/")))
        }
        (PacketValue::Cgroup(_), _) => Truth::Maybe,
        _ => Truth::Maybe,
    }
}

/// Whether an IPv4 address and its IPv4-mapped IPv6 form are the same.
fn mapped_eq(a: IpAddr, b: IpAddr) -> bool {
    match (a, b) {
        (IpAddr::V4(x), IpAddr::V6(y)) | (IpAddr::V6(y), IpAddr::V4(x)) => {
            y.to_ipv4_mapped() == Some(x)
        }
        _ => false,
    }
}

/// A port number, or a service name nft prints for one.
fn service_port(s: &str) -> Option<u16> {
    match s {
        "http" => Some(80),
        "https" => Some(443),
        other => other.parse().ok(),
    }
}

/// nft's interface-name wildcard: a trailing `*` (unescaped) matches a prefix.
fn ifname_match(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) if !prefix.ends_with('\\') => name.starts_with(prefix),
        _ => pattern.replace("\\*", "*") == name,
    }
}

/// The result of looking a key up in a verdict map.
#[derive(Debug)]
enum VmapLookup {
    /// The verdict of the first element whose key matches.
    Found(Value),
    /// No element matches: the rule does nothing.
    Missing,
    /// The map or an element cannot be judged.
    Unknown,
}

/// Looks `key` up in a verdict map (`data`: `@name` or an anonymous map).
fn vmap_lookup(key: &PacketValue, data: Option<&Value>, t: &Table) -> VmapLookup {
    let elems: Vec<&Value> = match data {
        Some(Value::String(s)) if s.starts_with('@') => match t.sets.get(&s[1..]) {
            Some(set) => set.elems.iter().collect(),
            None => return VmapLookup::Unknown,
        },
        Some(Value::Object(o)) => match o.get("set") {
            Some(Value::Array(a)) => a.iter().collect(),
            _ => return VmapLookup::Unknown,
        },
        _ => return VmapLookup::Unknown,
    };
    let mut unknown = false;
    // Interval maps keyed by name: exact names win over wildcards is not a
    // rule of nft; the first element that matches in nft's order does. The
    // JSON lists elements sorted, which is that order for disjoint keys.
    for e in elems {
        let Some(kv) = e.as_array().filter(|kv| kv.len() == 2) else {
            unknown = true;
            continue;
        };
        match value_in(key, &kv[0], t) {
            Truth::Yes => return VmapLookup::Found(kv[1].clone()),
            Truth::Maybe => unknown = true,
            Truth::No => {}
        }
    }
    if unknown {
        VmapLookup::Unknown
    } else {
        VmapLookup::Missing
    }
}

#[cfg(test)]
mod tests;
