//! Policy routing and `lo` addresses over rtnetlink, synchronous, in the
//! calling thread's network namespace: what `ip rule`, `ip route … table`
//! and `ip addr … dev lo` do, without a process per change.
//!
//! Only the two objects the proxy needs are expressed ([`Routing`]): an
//! `fwmark MARK/MARK lookup TABLE pref PREF` rule and a `local default dev
//! lo` route in that table.

use std::io;
use std::net::IpAddr;

use netlink_packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::route::{
    RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket};
use serde::{Deserialize, Serialize};

use crate::rtnl::{kernel_socket, send};

/// The loopback link's index, the same in every network namespace
/// (`LOOPBACK_IFINDEX`).
pub const LO_INDEX: u32 = 1;

/// Routing tables above this travel as an attribute (`RT_TABLE_COMPAT` in
/// the header).
const RT_TABLE_COMPAT: u8 = 252;

/// A policy-routing object of the proxy's route. Recorded in the state
/// file as a tagged object (`{"kind":"rule",…}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
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
    fn v6(&self) -> bool {
        match *self {
            Routing::Rule { v6, .. } | Routing::Route { v6, .. } => v6,
        }
    }

    fn family(&self) -> AddressFamily {
        if self.v6() {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
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
    pub fn spec(&self) -> String {
        match *self {
            Routing::Rule {
                mark, table, pref, ..
            } => format!("fwmark 0x{mark:x}/0x{mark:x} lookup {table} pref {pref}"),
            Routing::Route { table, .. } => format!("local default dev lo table {table}"),
        }
    }

    fn rule_message(mark: u32, table: u32, pref: u32, family: AddressFamily) -> RuleMessage {
        let mut m = RuleMessage::default();
        m.header.family = family;
        m.header.action = RuleAction::ToTable;
        m.header.table = u8::try_from(table).unwrap_or(RT_TABLE_COMPAT);
        m.attributes = vec![
            RuleAttribute::Priority(pref),
            RuleAttribute::FwMark(mark),
            RuleAttribute::FwMask(mark),
            RuleAttribute::Table(table),
        ];
        m
    }

    fn route_message(table: u32, family: AddressFamily) -> RouteMessage {
        let mut m = RouteMessage::default();
        m.header.address_family = family;
        m.header.table = u8::try_from(table).unwrap_or(RT_TABLE_COMPAT);
        m.header.protocol = RouteProtocol::Boot;
        m.header.scope = RouteScope::Host;
        m.header.kind = RouteType::Local;
        m.attributes = vec![RouteAttribute::Table(table), RouteAttribute::Oif(LO_INDEX)];
        m
    }

    fn message(&self, add: bool) -> RouteNetlinkMessage {
        match *self {
            Routing::Rule {
                mark, table, pref, ..
            } => {
                let m = Self::rule_message(mark, table, pref, self.family());
                if add {
                    RouteNetlinkMessage::NewRule(m)
                } else {
                    RouteNetlinkMessage::DelRule(m)
                }
            }
            Routing::Route { table, .. } => {
                let m = Self::route_message(table, self.family());
                if add {
                    RouteNetlinkMessage::NewRoute(m)
                } else {
                    RouteNetlinkMessage::DelRoute(m)
                }
            }
        }
    }

    /// Adds it (fails with `EEXIST` when it is there).
    pub fn add(&self) -> io::Result<()> {
        request(
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
            self.message(true),
        )
    }

    /// Deletes it (fails with `ENOENT`/`ESRCH` when it is not there).
    pub fn delete(&self) -> io::Result<()> {
        request(NLM_F_REQUEST | NLM_F_ACK, self.message(false))
    }

    /// Whether the kernel has it now: for a rule, exactly it (a rule that
    /// also selects or acts on anything else is not the proxy's).
    pub fn present(&self) -> io::Result<bool> {
        match *self {
            Routing::Rule {
                mark, table, pref, ..
            } => {
                let mut m = RuleMessage::default();
                m.header.family = self.family();
                let mut found = false;
                dump(RouteNetlinkMessage::GetRule(m), |msg| {
                    if let RouteNetlinkMessage::NewRule(r) = msg {
                        found |= is_rule(&r, mark, table, pref);
                    }
                })?;
                Ok(found)
            }
            Routing::Route { table, .. } => {
                let mut m = RouteMessage::default();
                m.header.address_family = self.family();
                let mut found = false;
                dump(RouteNetlinkMessage::GetRoute(m), |msg| {
                    if let RouteNetlinkMessage::NewRoute(r) = msg {
                        found |= is_local_default(&r, table);
                    }
                })?;
                Ok(found)
            }
        }
    }
}

impl std::fmt::Display for Routing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let family = if self.v6() { "IPv6" } else { "IPv4" };
        write!(f, "{family} {} {}", self.object(), self.spec())
    }
}

/// Whether `r` is exactly `fwmark mark/mark lookup table pref pref`:
/// nothing else selects or acts.
pub fn is_rule(r: &RuleMessage, mark: u32, table: u32, pref: u32) -> bool {
    let h = &r.header;
    if h.action != RuleAction::ToTable
        || h.flags.contains(RuleFlags::Invert)
        || h.src_len != 0
        || h.dst_len != 0
        || h.tos != 0
    {
        return false;
    }
    let (mut got_mark, mut got_mask, mut got_pref) = (false, false, false);
    let mut got_table = u32::from(h.table) == table;
    for a in &r.attributes {
        match a {
            RuleAttribute::Priority(p) if *p == pref => got_pref = true,
            RuleAttribute::FwMark(m) if *m == mark => got_mark = true,
            RuleAttribute::FwMask(m) if *m == mark => got_mask = true,
            RuleAttribute::Table(t) => got_table = *t == table,
            RuleAttribute::Protocol(_) => {}
            // The kernel reports these unset as all ones.
            RuleAttribute::SuppressPrefixLen(u32::MAX)
            | RuleAttribute::SuppressIfGroup(u32::MAX) => {}
            _ => return false,
        }
    }
    got_mark && got_mask && got_pref && got_table
}

/// Whether `r` is `local default dev lo` in routing table `table`.
fn is_local_default(r: &RouteMessage, table: u32) -> bool {
    let h = &r.header;
    let mut in_table = u32::from(h.table) == table;
    let mut on_lo = false;
    for a in &r.attributes {
        match a {
            RouteAttribute::Table(t) => in_table = *t == table,
            RouteAttribute::Oif(i) => on_lo = *i == LO_INDEX,
            _ => {}
        }
    }
    h.kind == RouteType::Local && h.destination_prefix_length == 0 && in_table && on_lo
}

/// The addresses on `lo` now.
pub fn lo_addresses() -> io::Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    dump(
        RouteNetlinkMessage::GetAddress(AddressMessage::default()),
        |msg| {
            if let RouteNetlinkMessage::NewAddress(a) = msg {
                if a.header.index != LO_INDEX {
                    return;
                }
                let local = a.attributes.iter().find_map(|x| match x {
                    AddressAttribute::Local(ip) => Some(*ip),
                    _ => None,
                });
                let address = a.attributes.iter().find_map(|x| match x {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                });
                if let Some(ip) = local.or(address) {
                    out.push(ip);
                }
            }
        },
    )?;
    Ok(out)
}

/// Deletes host address `addr` (`/32`, `/128`) from `lo`.
pub fn lo_address_delete(addr: IpAddr) -> io::Result<()> {
    let mut m = AddressMessage::default();
    m.header.index = LO_INDEX;
    match addr {
        IpAddr::V4(_) => {
            m.header.family = AddressFamily::Inet;
            m.header.prefix_len = 32;
            m.attributes.push(AddressAttribute::Local(addr));
        }
        IpAddr::V6(_) => {
            m.header.family = AddressFamily::Inet6;
            m.header.prefix_len = 128;
        }
    }
    m.attributes.push(AddressAttribute::Address(addr));
    request(
        NLM_F_REQUEST | NLM_F_ACK,
        RouteNetlinkMessage::DelAddress(m),
    )
}

fn open() -> io::Result<Socket> {
    kernel_socket(NETLINK_ROUTE)
}

/// Sends one change and waits for its acknowledgement.
fn request(flags: u16, msg: RouteNetlinkMessage) -> io::Result<()> {
    let socket = open()?;
    send(&socket, flags, msg)?;
    crate::rtnl::receive(&socket, false, |_| {})
}

/// A dump request, retried (three times) when the kernel's table changed
/// during the dump.
fn dump(msg: RouteNetlinkMessage, mut each: impl FnMut(RouteNetlinkMessage)) -> io::Result<()> {
    let mut tries = 0;
    loop {
        let socket = open()?;
        send(&socket, NLM_F_REQUEST | NLM_F_DUMP, msg.clone())?;
        let mut got = Vec::new();
        match crate::rtnl::receive(&socket, false, |m| got.push(m)) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) && tries < 3 => tries += 1,
            Err(e) => return Err(e),
            Ok(()) => {
                got.into_iter().for_each(&mut each);
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(attrs: Vec<RuleAttribute>) -> RuleMessage {
        let mut m = Routing::rule_message(0x4000_0000, 19783, 90, AddressFamily::Inet);
        m.attributes = attrs;
        m
    }

    #[test]
    fn only_the_exact_rule_is_the_proxys() {
        let exact = || {
            vec![
                RuleAttribute::Table(19783),
                RuleAttribute::SuppressPrefixLen(u32::MAX),
                RuleAttribute::Protocol(RouteProtocol::Boot),
                RuleAttribute::Priority(90),
                RuleAttribute::FwMark(0x4000_0000),
                RuleAttribute::FwMask(0x4000_0000),
            ]
        };
        assert!(is_rule(&rule(exact()), 0x4000_0000, 19783, 90));
        let mut iif = exact();
        iif.push(RuleAttribute::Iifname("lo".into()));
        assert!(!is_rule(&rule(iif), 0x4000_0000, 19783, 90));
        let mut inverted = rule(exact());
        inverted.header.flags = RuleFlags::Invert;
        assert!(!is_rule(&inverted, 0x4000_0000, 19783, 90));
        assert!(!is_rule(&rule(exact()), 0x4000_0000, 19783, 91));
        let no_mask: Vec<_> = exact()
            .into_iter()
            .filter(|a| !matches!(a, RuleAttribute::FwMask(_)))
            .collect();
        assert!(!is_rule(&rule(no_mask), 0x4000_0000, 19783, 90));
    }

    #[test]
    fn routing_objects_are_the_ip_commands_they_name() {
        let rule = Routing::Rule {
            v6: true,
            mark: 0x4000_0000,
            table: 19783,
            pref: 90,
        };
        let route = Routing::Route {
            v6: true,
            table: 19783,
        };
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

    /// Added, found, deleted and gone again, in a scratch namespace.
    #[test]
    fn rule_route_and_address_round_trip_in_a_scratch_namespace() {
        if !crate::process::is_root() {
            eprintln!("skipped: creating a network namespace needs root");
            return;
        }
        let ns = crate::netns::Netns::new_anonymous().expect("scratch netns");
        let ip = |args: &str| {
            let mut cmd = std::process::Command::new("ip");
            cmd.args(args.split_whitespace());
            ns.command(&mut cmd).expect("netns");
            assert!(cmd.status().expect("ip").success(), "ip {args}");
        };
        // Routes need their link up.
        ip("link set lo up");
        ip("addr add 10.9.9.9/32 dev lo");
        ns.spawn_thread("routing", || -> io::Result<()> {
            for v6 in [false, true] {
                let objs = [
                    Routing::Route { v6, table: 4711 },
                    Routing::Rule {
                        v6,
                        mark: 0x4000_0000,
                        table: 4711,
                        pref: 90,
                    },
                ];
                for o in objs {
                    assert!(!o.present()?, "{o} before");
                    o.add()?;
                    assert!(o.present()?, "{o} after add");
                    assert!(o.add().is_err(), "{o} added twice");
                }
                for o in objs.iter().rev() {
                    o.delete()?;
                    assert!(!o.present()?, "{o} after delete");
                }
            }
            let extra: IpAddr = "10.9.9.9".parse().expect("address");
            let before = lo_addresses()?;
            assert!(before.contains(&extra), "{before:?}");
            assert!(before.contains(&"127.0.0.1".parse().expect("address")));
            lo_address_delete(extra)?;
            assert!(!lo_addresses()?.contains(&extra));
            Ok(())
        })
        .expect("thread")
        .join()
        .expect("join")
        .expect("round trip");
    }
}
