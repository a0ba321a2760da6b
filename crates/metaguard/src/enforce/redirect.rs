//! The host state that delivers redirected connections to the proxy,
//! besides the rules:
//!
//! * **policy routing** (`ruleset::ProxyRoute`, per family): `ip rule
//!   fwmark 0x40000000/0x40000000 lookup 19783 pref 90` and `ip route
//!   local default dev lo table 19783`, made over rtnetlink
//!   ([`metaguard_sys::routing`]). The rules DNAT a selected caller's
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
//!
//! Everything goes through the [`Host`] seam.

use anyhow::Context as _;
use metaguard_core::ruleset::{ProxyPlan, ProxyRoute};
use metaguard_sys::host::Host;
pub use metaguard_sys::routing::Routing;

use super::State;

/// The sysctl that keeps the SYN's mark on an accepted connection.
pub const FWMARK_ACCEPT: &str = "net.ipv4.tcp_fwmark_accept";

/// The route and the rule of `r`, in the order they are added.
pub fn routing_of(r: &ProxyRoute) -> [Routing; 2] {
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

/// Adds what is missing; `save` records the state before each change.
/// What it added is pushed to `added` as it is added, so that a failure
/// midway can be taken back with [`undo`].
pub fn install(
    host: &dyn Host,
    plan: &ProxyPlan,
    state: &mut State,
    added: &mut Vec<Routing>,
    save: impl Fn(&State) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    for obj in plan.routes.iter().flat_map(routing_of) {
        if host.routing_present(&obj)? {
            continue;
        }
        let claimed = !state.routing.contains(&obj);
        if claimed {
            state.routing.push(obj);
        }
        save(state)?;
        if let Err(e) = host.routing_add(&obj) {
            if claimed {
                state.routing.retain(|o| *o != obj);
            }
            return Err(anyhow::Error::new(e)
                .context(format!("cannot add the proxy's policy routing ({obj})")));
        }
        added.push(obj);
    }
    let now = host.sysctl_read(FWMARK_ACCEPT)?;
    if now != "1" {
        if state.fwmark_accept_was.is_none() {
            state.fwmark_accept_was = Some(now);
        }
        save(state)?;
        host.sysctl_write(FWMARK_ACCEPT, "1")
            .with_context(|| format!("cannot set {FWMARK_ACCEPT} to 1"))?;
    }
    Ok(())
}

/// Addresses an earlier version added to `lo` for its proxy: this one
/// needs none, and with them there every container reached them.
pub fn remove_old_addresses(
    host: &dyn Host,
    state: &mut State,
    save: &impl Fn(&State) -> anyhow::Result<()>,
) -> anyhow::Result<Vec<String>> {
    let mut done = Vec::new();
    if state.addresses.is_empty() {
        return Ok(done);
    }
    let present = host.lo_addresses()?;
    for a in std::mem::take(&mut state.addresses) {
        if present.contains(&a) {
            host.lo_address_delete(a)?;
            done.push(format!("address {a} on lo"));
        }
    }
    save(state)?;
    Ok(done)
}

/// Removes the routing metaguard added (and addresses an earlier version
/// added) and restores the sysctl; returns what was undone.
pub fn uninstall(host: &dyn Host, state: &mut State) -> anyhow::Result<Vec<String>> {
    let mut done = remove_old_addresses(host, state, &|_| Ok(()))?;
    // Rules first: without its rule the route is never looked up.
    let mut objs = std::mem::take(&mut state.routing);
    objs.sort_by_key(|o| matches!(o, Routing::Route { .. }));
    for obj in objs {
        if host.routing_present(&obj)? {
            host.routing_delete(&obj)
                .with_context(|| format!("cannot delete the proxy's policy routing ({obj})"))?;
            done.push(obj.to_string());
        }
    }
    if let Some(was) = state.fwmark_accept_was.take() {
        host.sysctl_write(FWMARK_ACCEPT, &was)
            .with_context(|| format!("cannot restore {FWMARK_ACCEPT} to {was}"))?;
        done.push(format!("{FWMARK_ACCEPT} = {was}"));
    }
    Ok(done)
}

/// Takes back what [`install`] `added` (and the sysctl, when it set it)
/// after a later step failed, so that a failed apply changes nothing.
pub fn undo(
    host: &dyn Host,
    state: &mut State,
    before: &State,
    added: &[Routing],
) -> anyhow::Result<()> {
    for obj in added.iter().rev() {
        if host.routing_present(obj)? {
            host.routing_delete(obj)
                .with_context(|| format!("cannot delete the proxy's policy routing ({obj})"))?;
        }
        state.routing.retain(|o| o != obj);
    }
    if before.fwmark_accept_was.is_none() {
        if let Some(was) = state.fwmark_accept_was.take() {
            host.sysctl_write(FWMARK_ACCEPT, &was)
                .with_context(|| format!("cannot restore {FWMARK_ACCEPT} to {was}"))?;
        }
    }
    Ok(())
}

/// What differs from the plan (for `verify`).
pub fn check(host: &dyn Host, plan: &ProxyPlan) -> anyhow::Result<Vec<String>> {
    let mut out = Vec::new();
    for obj in plan.routes.iter().flat_map(routing_of) {
        if !host.routing_present(&obj)? {
            out.push(format!(
                "the proxy's policy routing is missing: {obj} (the packets the rules send to the proxy are not delivered to it)"
            ));
        }
    }
    let now = host.sysctl_read(FWMARK_ACCEPT).unwrap_or_default();
    if now != "1" {
        out.push(format!(
            "net.ipv4.tcp_fwmark_accept is {now} (the proxy identifies callers by the mark of their SYN; needs 1)"
        ));
    }
    Ok(out)
}
