//! Links and namespace ids over rtnetlink (`NETLINK_ROUTE`), synchronous,
//! in the calling thread's network namespace: what `ip -d link show` and
//! `ip netns identify` would say, without a process per question.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable, NLM_F_DUMP,
    NLM_F_DUMP_INTR, NLM_F_REQUEST,
};
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::nsid::{NsidAttribute, NsidMessage};
use netlink_packet_route::route::RouteAttribute;
use netlink_packet_route::rule::RuleAttribute;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket};

/// One link of this namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub ifindex: u32,
    pub name: String,
    /// The bridge (or other master) it is a port of.
    pub master: Option<u32>,
    /// Its peer's (veth) or parent's ifindex, in `link_netnsid`'s
    /// namespace when that is set, else in this one.
    pub link: Option<u32>,
    /// The id this namespace gives the namespace its peer lives in (set
    /// only when that is another namespace). The kernel fills it in: a
    /// process inside that other namespace cannot change it.
    pub link_netnsid: Option<i32>,
}

/// A netlink socket of `protocol` talking to the kernel.
pub(crate) fn kernel_socket(protocol: isize) -> io::Result<Socket> {
    let mut socket = Socket::new(protocol)?;
    socket.bind_auto()?;
    socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
    Ok(socket)
}

fn open() -> io::Result<Socket> {
    kernel_socket(NETLINK_ROUTE)
}

/// Sends one request of any netlink family (`flags` with
/// `NLM_F_REQUEST`).
pub(crate) fn send<T: NetlinkSerializable>(socket: &Socket, flags: u16, msg: T) -> io::Result<()> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0)?;
    Ok(())
}

/// Receives answers until `NLMSG_DONE` (a dump), an acknowledgement (a
/// change sent with `NLM_F_ACK`) or the first answer (`single`), handing
/// each inner message to `each`.
pub(crate) fn receive(
    socket: &Socket,
    single: bool,
    mut each: impl FnMut(RouteNetlinkMessage),
) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = socket.recv(&mut &mut buf[..], 0)?;
        let mut offset = 0;
        while offset < n {
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[offset..n]).map_err(
                |e| io::Error::new(io::ErrorKind::InvalidData, format!("rtnetlink: {e}")),
            )?;
            let len = msg.header.length as usize;
            if msg.header.flags & NLM_F_DUMP_INTR != 0 {
                // The table changed while it was dumped: the answer may
                // be incomplete.
                return Err(io::Error::from_raw_os_error(libc::EINTR));
            }
            match msg.payload {
                NetlinkPayload::InnerMessage(m) => {
                    each(m);
                    if single {
                        return Ok(());
                    }
                }
                NetlinkPayload::Done(d) if d.code < 0 => {
                    return Err(io::Error::from_raw_os_error(-d.code))
                }
                NetlinkPayload::Done(_) => return Ok(()),
                // An error, or (code 0) the acknowledgement of a change
                // sent with NLM_F_ACK: either way the answer is complete.
                NetlinkPayload::Error(e) => {
                    return match e.code {
                        None => Ok(()),
                        Some(_) => Err(io::Error::from_raw_os_error(-e.raw_code())),
                    }
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
        if single && n == 0 {
            return Ok(());
        }
    }
}

/// Every link of this namespace (`RTM_GETLINK` dump), retried when the
/// table changed during the dump.
pub fn links() -> io::Result<Vec<LinkInfo>> {
    let mut tries = 0;
    loop {
        match dump_links() {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) && tries < 3 => tries += 1,
            other => return other,
        }
    }
}

fn dump_links() -> io::Result<Vec<LinkInfo>> {
    let socket = open()?;
    send(
        &socket,
        NLM_F_REQUEST | NLM_F_DUMP,
        RouteNetlinkMessage::GetLink(LinkMessage::default()),
    )?;
    let mut out = Vec::new();
    receive(&socket, false, |m| {
        if let RouteNetlinkMessage::NewLink(l) = m {
            let mut info = LinkInfo {
                ifindex: l.header.index,
                name: String::new(),
                master: None,
                link: None,
                link_netnsid: None,
            };
            for a in l.attributes {
                match a {
                    LinkAttribute::IfName(n) => info.name = n,
                    LinkAttribute::Controller(i) => info.master = Some(i),
                    LinkAttribute::Link(i) => info.link = Some(i),
                    LinkAttribute::LinkNetNsId(i) => info.link_netnsid = Some(i),
                    _ => {}
                }
            }
            out.push(info);
        }
    })?;
    Ok(out)
}

/// The id this namespace gives the namespace `netns` (an open namespace
/// file), as `link_netnsid` reports it; `None` when it has none (no link
/// here has a peer there).
pub fn netns_id(netns: BorrowedFd<'_>) -> io::Result<Option<i32>> {
    let socket = open()?;
    let mut msg = NsidMessage::default();
    let fd =
        u32::try_from(netns.as_raw_fd()).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    msg.attributes.push(NsidAttribute::Fd(fd));
    send(&socket, NLM_F_REQUEST, RouteNetlinkMessage::GetNsId(msg))?;
    let mut id = None;
    receive(&socket, true, |m| {
        if let RouteNetlinkMessage::NewNsId(r) = m {
            id = r.attributes.iter().find_map(|a| match a {
                NsidAttribute::Id(i) if *i >= 0 => Some(*i),
                _ => None,
            });
        }
    })?;
    Ok(id)
}

/// Follows deletions of routing-policy rules and routes of routing table
/// `table` in this namespace (both families; the multicast groups
/// `RTNLGRP_IPV{4,6}_{RULE,ROUTE}`): `each` is called once per batch of
/// notifications that holds one, and also when the kernel dropped some
/// (`ENOBUFS`: one may have been lost). Blocks; returns when `each`
/// returns false (after the next such batch), or on a socket error.
pub fn follow_table_deletions(table: u32, mut each: impl FnMut() -> bool) -> io::Result<()> {
    let socket = kernel_socket(NETLINK_ROUTE)?;
    for group in [
        libc::RTNLGRP_IPV4_ROUTE,
        libc::RTNLGRP_IPV6_ROUTE,
        libc::RTNLGRP_IPV4_RULE,
        libc::RTNLGRP_IPV6_RULE,
    ] {
        socket.add_membership(group)?;
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match socket.recv(&mut &mut buf[..], 0) {
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                if !each() {
                    return Ok(());
                }
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let mut offset = 0;
        let mut hit = false;
        while offset < n {
            let Ok(msg) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[offset..n])
            else {
                // Not one we can read (a newer kernel's attribute): look.
                hit = true;
                break;
            };
            let len = msg.header.length as usize;
            if let NetlinkPayload::InnerMessage(m) = msg.payload {
                hit |= deletes_from(&m, table);
            }
            if len == 0 {
                break;
            }
            offset += len;
        }
        if hit && !each() {
            return Ok(());
        }
    }
}

/// Whether `m` deletes a rule or route of routing table `table` (ids above
/// 255 travel as an attribute).
fn deletes_from(m: &RouteNetlinkMessage, table: u32) -> bool {
    match m {
        RouteNetlinkMessage::DelRoute(r) => {
            u32::from(r.header.table) == table
                || r.attributes
                    .iter()
                    .any(|a| matches!(a, RouteAttribute::Table(t) if *t == table))
        }
        RouteNetlinkMessage::DelRule(r) => {
            u32::from(r.header.table) == table
                || r.attributes
                    .iter()
                    .any(|a| matches!(a, RuleAttribute::Table(t) if *t == table))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This namespace's loopback link is listed, and asking for the id
    /// of a namespace is answered (the lab tests use real peers).
    #[test]
    fn lists_loopback_and_answers_an_id_question() {
        let all = links().expect("RTM_GETLINK answers");
        assert!(
            all.iter()
                .any(|l| l.name == "lo" && l.ifindex == 1 && l.master.is_none()),
            "no lo in {all:?}"
        );
        let own = std::fs::File::open("/proc/self/ns/net").expect("own namespace");
        netns_id(std::os::fd::AsFd::as_fd(&own)).expect("RTM_GETNSID answers");
    }

    /// A rule of the followed table added and deleted in a scratch
    /// namespace is reported; another table's is not.
    #[test]
    fn a_deleted_rule_of_the_table_is_reported() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::time::Duration;
        if !crate::process::is_root() {
            eprintln!("skipped: creating a network namespace needs root");
            return;
        }
        let ns = crate::netns::Netns::new_anonymous().expect("scratch netns");
        let (tx, rx) = std::sync::mpsc::channel();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let follower = ns
            .spawn_thread("follow", move || {
                follow_table_deletions(4711, || {
                    let _ = tx.send(());
                    !stopped.load(Ordering::Relaxed)
                })
            })
            .expect("thread");
        let ip = |args: &str| {
            let mut cmd = std::process::Command::new("ip");
            cmd.args(args.split_whitespace());
            ns.command(&mut cmd).expect("netns");
            assert!(cmd.status().expect("ip").success(), "ip {args}");
        };
        let cycle = |table: u32| {
            ip(&format!("rule add fwmark 0x1 lookup {table} pref 91"));
            ip(&format!("rule del fwmark 0x1 lookup {table} pref 91"));
        };
        // Until the follower (subscribing on its own thread) reports one;
        // bounded.
        let subscribed = (0..50).any(|_| {
            cycle(4711);
            rx.recv_timeout(Duration::from_millis(100)).is_ok()
        });
        assert!(subscribed, "no report of the deleted rule");
        while rx.try_recv().is_ok() {}
        cycle(4712);
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "another table's rule was reported"
        );
        stop.store(true, Ordering::Relaxed);
        cycle(4711);
        follower.join().expect("join").expect("follower");
    }
}
