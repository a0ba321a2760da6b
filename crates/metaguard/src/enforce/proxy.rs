//! The host state the proxy needs besides rules:
//!
//! * **policy routing** (`ruleset::ProxyRoute`, per family): `ip rule
//!   fwmark 0x40000000/0x40000000 lookup 19783 pref 90` and `ip route
//!   local default dev lo table 19783`. The rules DNAT a selected caller's
//!   connection to a listener on an endpoint address (which is not the
//!   host's) and mark its packets; this route delivers them locally, where
//!   the listener (`IP_TRANSPARENT`) takes them. Nothing else is routed
//!   differently, and no address is added anywhere.
//! * `net.ipv4.tcp_fwmark_accept = 1`: an accepted connection carries the
//!   mark of its SYN, the caller's identity (see `ruleset::bridge_mark`).
//!
//! Each is recorded in the state file as it is made, so `remove` takes
//! away exactly what metaguard added: a rule or route that existed before
//! is used but never claimed. Addresses on `lo` that an earlier version
//! added for its proxy (recorded the same way) are removed.

use std::net::IpAddr;
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _};
use metaguard_core::ruleset::{ProxyPlan, ProxyRoute};
use serde::{Deserialize, Serialize};

use super::State;

const FWMARK_ACCEPT: &str = "/proc/sys/net/ipv4/tcp_fwmark_accept";

/// What `ip -j rule show` prints for a rule's other selectors and actions
/// (iproute2 6.x): a rule with any of them is not the proxy's.
const RULE_SELECTORS: [&str; 19] = [
    "not",
    "dst",
    "tos",
    "dsfield",
    "iif",
    "oif",
    "l3mdev",
    "uid_start",
    "ipproto",
    "sport",
    "sport_start",
    "dport",
    "dport_start",
    "tun_id",
    "realms",
    "goto",
    "suppress_prefixlen",
    "suppress_ifgroup",
    "flowlabel",
];

/// A policy-routing object of a [`ProxyRoute`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Routing {
    /// `ip rule add fwmark MARK/MARK lookup TABLE pref PREF`.
    Rule {
        v6: bool,
        mark: u32,
        table: u32,
        pref: u32,
    },
    /// `ip route add local default dev lo table TABLE`.
    Route { v6: bool, table: u32 },
}

impl Routing {
    /// The rule and the route of `r`, in the order they are added.
    pub fn of(r: &ProxyRoute) -> [Routing; 2] {
        [
            Routing::Route {
                v6: r.v6,
                table: r.table,
            },
            Routing::Rule {
                v6: r.v6,
                mark: r.mark,
                table: r.table,
                pref: r.pref,
            },
        ]
    }

    fn family(&self) -> &'static str {
        match self {
            Routing::Rule { v6: true, .. } | Routing::Route { v6: true, .. } => "-6",
            _ => "-4",
        }
    }

    /// `rule` or `route`.
    fn object(&self) -> &'static str {
        match self {
            Routing::Rule { .. } => "rule",
            Routing::Route { .. } => "route",
        }
    }

    /// What follows `ip -4|-6 rule|route add|del`.
    fn spec(&self) -> Vec<String> {
        let words = match *self {
            Routing::Rule {
                mark, table, pref, ..
            } => format!("fwmark 0x{mark:x}/0x{mark:x} lookup {table} pref {pref}"),
            Routing::Route { table, .. } => format!("local default dev lo table {table}"),
        };
        words.split(' ').map(str::to_string).collect()
    }

    /// Runs `ip` to add or delete it.
    fn change(&self, op: &str) -> anyhow::Result<()> {
        let spec = self.spec();
        let mut args = vec![self.family(), self.object(), op];
        args.extend(spec.iter().map(String::as_str));
        ip(&args).map(drop)
    }

    /// Whether the kernel has it now.
    fn present(&self) -> anyhow::Result<bool> {
        let fam = self.family();
        match *self {
            Routing::Rule {
                mark, table, pref, ..
            } => {
                let rules = ip_json(&[fam, "rule", "show"])?;
                Ok(rules.iter().any(|r| is_rule(r, mark, table, pref)))
            }
            Routing::Route { table, .. } => {
                let table = table.to_string();
                let routes = match ip_json(&[fam, "route", "show", "table", &table]) {
                    // IPv4 refuses to list a table with no route at all.
                    Err(e) if format!("{e:#}").contains("table does not exist") => Vec::new(),
                    other => other?,
                };
                Ok(routes.iter().any(|r| {
                    r["type"].as_str() == Some("local")
                        && r["dst"].as_str() == Some("default")
                        && r["dev"].as_str() == Some("lo")
                }))
            }
        }
    }
}

/// Whether `r` (one rule of `ip -j rule show`) is exactly `fwmark
/// mark/mark lookup table pref pref`: nothing else selects or acts.
fn is_rule(r: &serde_json::Value, mark: u32, table: u32, pref: u32) -> bool {
    let hex = format!("0x{mark:x}");
    r["priority"].as_u64() == Some(u64::from(pref))
        && r["fwmark"].as_str() == Some(&hex)
        && r["fwmask"].as_str() == Some(&hex)
        && r["table"].as_str() == Some(&table.to_string())
        && r["src"].as_str() == Some("all")
        && RULE_SELECTORS.iter().all(|k| r.get(k).is_none())
}

impl std::fmt::Display for Routing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let family = if self.family() == "-6" {
            "IPv6"
        } else {
            "IPv4"
        };
        write!(f, "{family} {} {}", self.object(), self.spec().join(" "))
    }
}

fn ip(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("cannot run `ip` (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip -j ARGS` as a list of objects.
fn ip_json(args: &[&str]) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut all = vec!["-j"];
    all.extend_from_slice(args);
    let text = ip(&all)?;
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("ip {}: unreadable JSON", all.join(" ")))?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

/// The addresses on `lo` now.
fn lo_addresses() -> anyhow::Result<Vec<IpAddr>> {
    Ok(ip_json(&["addr", "show", "dev", "lo"])?
        .iter()
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a["local"].as_str().and_then(|s| s.parse().ok()))
        .collect())
}

fn prefix(a: &IpAddr) -> String {
    match a {
        IpAddr::V4(_) => format!("{a}/32"),
        IpAddr::V6(_) => format!("{a}/128"),
    }
}

/// Adds what is missing; `save` records the state before each change.
/// Returns what was added.
pub fn install(
    plan: &ProxyPlan,
    state: &mut State,
    save: impl Fn(&State) -> anyhow::Result<()>,
) -> anyhow::Result<Vec<Routing>> {
    remove_old_addresses(state, &save)?;
    let mut added = Vec::new();
    for obj in plan.routes.iter().flat_map(Routing::of) {
        if obj.present()? {
            continue;
        }
        if !state.routing.contains(&obj) {
            state.routing.push(obj);
        }
        save(state)?;
        obj.change("add")
            .with_context(|| format!("cannot add the proxy's policy routing ({obj})"))?;
        added.push(obj);
    }
    let now = std::fs::read_to_string(FWMARK_ACCEPT)
        .with_context(|| format!("cannot read {FWMARK_ACCEPT}"))?;
    if now.trim() != "1" {
        if state.fwmark_accept_was.is_none() {
            state.fwmark_accept_was = Some(now.trim().to_string());
        }
        save(state)?;
        std::fs::write(FWMARK_ACCEPT, "1")
            .with_context(|| format!("cannot set {FWMARK_ACCEPT} to 1"))?;
    }
    Ok(added)
}

/// Addresses an earlier version added to `lo` for its proxy: this one
/// needs none, and with them there every container reached them.
fn remove_old_addresses(
    state: &mut State,
    save: &impl Fn(&State) -> anyhow::Result<()>,
) -> anyhow::Result<Vec<String>> {
    let mut done = Vec::new();
    if state.addresses.is_empty() {
        return Ok(done);
    }
    let present = lo_addresses()?;
    for a in std::mem::take(&mut state.addresses) {
        if present.contains(&a) {
            ip(&["addr", "del", &prefix(&a), "dev", "lo"])?;
            done.push(format!("address {a} on lo"));
        }
    }
    save(state)?;
    Ok(done)
}

/// Removes the routing metaguard added (and addresses an earlier version
/// added) and restores the sysctl; returns what was undone.
pub fn uninstall(state: &mut State) -> anyhow::Result<Vec<String>> {
    let mut done = remove_old_addresses(state, &|_| Ok(()))?;
    // Rules first: without its rule the route is never looked up.
    let mut objs = std::mem::take(&mut state.routing);
    objs.sort_by_key(|o| matches!(o, Routing::Route { .. }));
    for obj in objs {
        if obj.present()? {
            obj.change("del")
                .with_context(|| format!("cannot delete the proxy's policy routing ({obj})"))?;
            done.push(obj.to_string());
        }
    }
    if let Some(was) = state.fwmark_accept_was.take() {
        std::fs::write(FWMARK_ACCEPT, &was)
            .with_context(|| format!("cannot restore {FWMARK_ACCEPT} to {was}"))?;
        done.push(format!("net.ipv4.tcp_fwmark_accept = {was}"));
    }
    Ok(done)
}

/// Takes back what [`install`] `added` (and the sysctl, when it set it)
/// after the rules failed to load, so that a failed apply changes
/// nothing.
pub fn undo(state: &mut State, before: &State, added: &[Routing]) -> anyhow::Result<()> {
    for obj in added.iter().rev() {
        if obj.present()? {
            obj.change("del")
                .with_context(|| format!("cannot delete the proxy's policy routing ({obj})"))?;
        }
        state.routing.retain(|o| o != obj);
    }
    if before.fwmark_accept_was.is_none() {
        if let Some(was) = state.fwmark_accept_was.take() {
            std::fs::write(FWMARK_ACCEPT, &was)
                .with_context(|| format!("cannot restore {FWMARK_ACCEPT} to {was}"))?;
        }
    }
    Ok(())
}

/// What differs from the plan (for `verify`).
pub fn check(plan: &ProxyPlan) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for obj in plan.routes.iter().flat_map(Routing::of) {
        if !obj.present()? {
            out.push(format!(
                "the proxy's policy routing is missing: {obj} (the packets the rules send to the proxy are not delivered to it)"
            ));
        }
    }
    let now = std::fs::read_to_string(FWMARK_ACCEPT).unwrap_or_default();
    if now.trim() != "1" {
        out.push(format!(
            "net.ipv4.tcp_fwmark_accept is {} (the proxy identifies callers by the mark of their SYN; needs 1)",
            now.trim()
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_rule_is_the_proxys() {
        // What iproute2 6.1 prints (`-d` adds "protocol").
        let rules: serde_json::Value = serde_json::from_str(
            r#"[{"priority":0,"src":"all","table":"local","protocol":"kernel"},
                {"priority":90,"src":"all","fwmark":"0x40000000","fwmask":"0x40000000","table":"19783","protocol":"unspec"},
                {"priority":90,"src":"all","fwmark":"0x40000000","fwmask":"0x40000000","iif":"lo","ipproto":"tcp","dport":80,"table":"19783"},
                {"priority":90,"not":null,"src":"all","fwmark":"0x40000000","fwmask":"0x40000000","table":"19783"},
                {"priority":91,"src":"all","fwmark":"0x40000000","fwmask":"0x40000000","table":"19783"},
                {"priority":90,"src":"all","fwmark":"0x40000000","table":"19783"}]"#,
        )
        .expect("json");
        let found: Vec<bool> = rules
            .as_array()
            .expect("list")
            .iter()
            .map(|r| is_rule(r, 0x4000_0000, 19783, 90))
            .collect();
        assert_eq!(found, [false, true, false, false, false, false]);
    }

    #[test]
    fn routing_objects_are_the_ip_commands_they_name() {
        let r = ProxyRoute {
            v6: true,
            mark: 0x4000_0000,
            table: 19783,
            pref: 90,
        };
        let [route, rule] = Routing::of(&r);
        assert_eq!(
            rule.to_string(),
            "IPv6 rule fwmark 0x40000000/0x40000000 lookup 19783 pref 90"
        );
        assert_eq!(
            route.to_string(),
            "IPv6 route local default dev lo table 19783"
        );
        // Recorded in the state file as tagged objects.
        let json = serde_json::to_string(&rule).expect("json");
        assert_eq!(
            json,
            r#"{"kind":"rule","v6":true,"mark":1073741824,"table":19783,"pref":90}"#
        );
        assert_eq!(serde_json::from_str::<Routing>(&json).expect("back"), rule);
    }
}
