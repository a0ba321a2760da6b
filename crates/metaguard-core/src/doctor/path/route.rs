//! The kernel's part of a packet's path in one namespace.
//!
//! Owns: what is local (the namespace's addresses, 127/8, ::1), the
//! longest-prefix route lookup over the main table and its failures
//! (blackhole, unreachable, prohibit, no route), martians
//! (`route_localnet`), forwarding (`ip_forward` / `forwarding`), the
//! source address a local sender picks, and the order of hooks: for a
//! packet that enters (prerouting → input, or forward → postrouting) and
//! for one generated locally (output → postrouting → prerouting and input
//! again on `lo`). The rules at each hook are `walk`'s.

// Every `Result<(), Stopped>` here carries the flow's final verdict, built
// once per flow: boxing it would buy nothing.
#![allow(clippy::result_large_err)]

use std::net::IpAddr;

use super::super::snapshot::{NetState, Route};
use super::model::{sockaddr, Hook, Packet, RuleRef, Trace, Verdict};
use super::walk::Netns;

/// Why a packet stops: the verdict and the rule or kernel decision that
/// decides it.
pub(super) type Stopped = (Verdict, RuleRef);

/// The verdict of a path ([`Netns::enter`], [`Netns::local_out`]): it
/// reaches (`Ok`) or is stopped.
pub(super) fn settle(path: Result<(), Stopped>) -> (Verdict, Option<RuleRef>) {
    match path {
        Ok(()) => (Verdict::Reaches, None),
        Err((v, d)) => (v, Some(d)),
    }
}

/// `blackhole route 169.254.169.254/32`, `unreachable route default`.
pub(super) fn route_text(r: &Route) -> String {
    format!(
        "{} route {}",
        r.kind,
        r.dst.map_or("default".into(), |c| c.to_string())
    )
}

/// Whether a route fails the connection at once.
pub(super) fn is_reject_route(r: &Route) -> bool {
    matches!(r.kind.as_str(), "blackhole" | "unreachable" | "prohibit")
}

/// `iface`'s first address of the family (`v6`), link-local IPv6 aside.
pub(super) fn iface_addr(st: &NetState, iface: &str, v6: bool) -> Option<IpAddr> {
    st.addrs
        .iter()
        .filter(|a| a.ifname == iface && a.addr.is_ipv6() == v6)
        .find(|a| !matches!(a.addr, IpAddr::V6(v) if (v.segments()[0] & 0xffc0) == 0xfe80))
        .map(|a| a.addr)
}

/// The source address a local sender in `ns` uses towards `dst`: the
/// address of the route's device.
pub(super) fn host_src(ns: &Netns<'_>, dst: IpAddr) -> Option<IpAddr> {
    let v6 = dst.is_ipv6();
    let r = ns.lookup(dst)?;
    let dev = r.dev.as_deref()?;
    iface_addr(ns.state, dev, v6)
}

/// The verdict for a packet to a local service's address that no rule
/// turned into a local destination (`done` says what would have: "rewrote"
/// for DNAT, "redirected" for REDIRECT): it leaves and times out.
fn unanswered(p: &Packet, done: &str) -> Stopped {
    (
        Verdict::TimesOut,
        RuleRef::kernel(
            Hook::Routing,
            format!(
                "{} is not local and nothing {done} it: the packet leaves through {}, where nothing answers",
                sockaddr(p.dst, p.dport),
                p.oif.as_deref().unwrap_or("?")
            ),
        ),
    )
}

impl<'a> Netns<'a> {
    /// Whether `ip` is an address of this namespace (or loopback).
    pub(super) fn is_local(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v) if v.is_loopback() => true,
            IpAddr::V6(v) if v.is_loopback() => true,
            _ => self.state.addrs.iter().any(|a| a.addr == ip),
        }
    }

    fn sysctl(&self, key: &str) -> Option<&str> {
        self.state.sysctls.get(key).map(String::as_str)
    }

    /// Whether 127/8 may arrive on `iface` (all or that interface).
    fn route_localnet(&self, iface: &str) -> bool {
        let on = |k: String| self.sysctl(&k).is_some_and(|v| v == "1");
        on("net.ipv4.conf.all.route_localnet".into())
            || on(format!("net.ipv4.conf.{iface}.route_localnet"))
    }

    /// The main table's longest-prefix route to `dst`.
    pub(super) fn lookup(&self, dst: IpAddr) -> Option<&'a Route> {
        let routes = if dst.is_ipv6() {
            &self.state.routes6
        } else {
            &self.state.routes4
        };
        routes
            .iter()
            .filter(|r| r.dst.is_none_or(|c| c.contains(dst)))
            .max_by_key(|r| r.dst.map_or(0, |c| i32::from(c.len) + 1))
    }

    /// Routes `p` out: sets its outgoing interface, or stops it (no
    /// route, or a route that rejects). `hook` names where a missing route
    /// is found.
    fn route_out(&self, p: &mut Packet, hook: Hook) -> Result<(), Stopped> {
        match self.lookup(p.dst) {
            None => Err((
                Verdict::Blocked,
                RuleRef::kernel(hook, format!("no route to {} (network unreachable)", p.dst)),
            )),
            Some(r) if is_reject_route(r) => Err((
                Verdict::Blocked,
                RuleRef {
                    netns: self.label.clone(),
                    ..RuleRef::kernel(Hook::Routing, route_text(r))
                },
            )),
            Some(r) => {
                p.oif = r.dev.clone();
                Ok(())
            }
        }
    }

    /// A locally generated packet's way out: `lo` for a local
    /// destination, else the route.
    fn route_local_out(&self, p: &mut Packet) -> Result<(), Stopped> {
        if self.is_local(p.dst) {
            p.oif = Some("lo".into());
            Ok(())
        } else {
            self.route_out(p, Hook::Output)
        }
    }

    /// The rules at `hook` let the packet on, or stop it.
    fn pass(&self, hook: Hook, p: &mut Packet, tr: &mut Trace) -> Result<(), Stopped> {
        match self.hook(hook, p, tr) {
            Some(stop) => Err(stop),
            None => Ok(()),
        }
    }

    /// A packet that enters on `p.iif`. `local_service`: the target is
    /// served on this host (nothing answers it elsewhere).
    pub(super) fn enter(
        &self,
        p: &mut Packet,
        tr: &mut Trace,
        local_service: bool,
    ) -> Result<(), Stopped> {
        self.pass(Hook::Prerouting, p, tr)?;
        if self.is_local(p.dst) {
            let iif = p.iif.clone().unwrap_or_default();
            let martian = match p.dst {
                IpAddr::V4(v) => v.is_loopback() && iif != "lo" && !self.route_localnet(&iif),
                IpAddr::V6(v) => v.is_loopback() && iif != "lo",
            };
            if martian {
                return Err((
                    Verdict::TimesOut,
                    RuleRef::kernel(
                        Hook::Routing,
                        format!(
                            "martian: {} arrived on {iif} with net.ipv4.conf.all.route_localnet=0 and net.ipv4.conf.{iif}.route_localnet=0; the kernel drops it",
                            sockaddr(p.dst, p.dport)
                        ),
                    ),
                ));
            }
            return self.pass(Hook::Input, p, tr);
        }
        let fwd_key = if p.v6() {
            "net.ipv6.conf.all.forwarding"
        } else {
            "net.ipv4.ip_forward"
        };
        if self.sysctl(fwd_key) == Some("0") {
            return Err((
                Verdict::TimesOut,
                RuleRef::kernel(
                    Hook::Routing,
                    format!("{fwd_key}=0: the host does not forward"),
                ),
            ));
        }
        self.route_out(p, Hook::Routing)?;
        self.pass(Hook::Forward, p, tr)?;
        self.pass(Hook::Postrouting, p, tr)?;
        if local_service {
            return Err(unanswered(p, "rewrote"));
        }
        Ok(())
    }

    /// A locally generated packet. `local_service` as for [`Self::enter`].
    pub(super) fn local_out(
        &self,
        p: &mut Packet,
        tr: &mut Trace,
        local_service: bool,
    ) -> Result<(), Stopped> {
        self.route_local_out(p)?;
        let before = p.dst;
        self.pass(Hook::Output, p, tr)?;
        if p.dst != before {
            self.route_local_out(p)?;
        }
        self.pass(Hook::Postrouting, p, tr)?;
        if self.is_local(p.dst) {
            p.iif = Some("lo".into());
            p.no_nat = true;
            p.cgroup = None;
            self.pass(Hook::Prerouting, p, tr)?;
            return self.pass(Hook::Input, p, tr);
        }
        if local_service {
            return Err(unanswered(p, "redirected"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
