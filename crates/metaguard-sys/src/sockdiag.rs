//! Which cgroup created a TCP socket: an exact `sock_diag` lookup
//! (`NETLINK_SOCK_DIAG`, `SOCK_DIAG_BY_FAMILY` without `NLM_F_DUMP`) of the
//! socket with a given local and remote address in the calling thread's
//! network namespace, answered with its `INET_DIAG_CGROUP_ID` (Linux 5.7+):
//! the cgroup v2 id — the inode number of the cgroup's directory — of the
//! process that created it, which that process cannot choose.
//!
//! The proxy asks this about the *client's* end of a connection from a
//! host process, to tell containers on the host network apart.

use std::io;
use std::net::{IpAddr, SocketAddr};

use netlink_packet_core::{NetlinkMessage, NetlinkPayload, Nla as _, NLM_F_REQUEST};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP, TCP_LISTEN};
use netlink_packet_sock_diag::inet::nlas::Nla;
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket};

/// `INET_DIAG_CGROUP_ID` (include/uapi/linux/inet_diag.h).
const INET_DIAG_CGROUP_ID: u16 = 21;

/// The cgroup id of the TCP socket whose own address is `local` and whose
/// peer is `remote`; `None` when there is no such socket here (it closed,
/// or lives in another namespace) or the kernel does not report cgroups.
/// An IPv4 pair is also looked for as an IPv6 socket with v4-mapped
/// addresses (a dual-stack socket).
pub fn tcp_socket_cgroup(local: SocketAddr, remote: SocketAddr) -> io::Result<Option<u64>> {
    let socket = open()?;
    if let Some(id) = lookup(&socket, local, remote)? {
        return Ok(Some(id));
    }
    match (local.ip(), remote.ip()) {
        (IpAddr::V4(l), IpAddr::V4(r)) => lookup(
            &socket,
            SocketAddr::new(IpAddr::V6(l.to_ipv6_mapped()), local.port()),
            SocketAddr::new(IpAddr::V6(r.to_ipv6_mapped()), remote.port()),
        ),
        _ => Ok(None),
    }
}

fn open() -> io::Result<Socket> {
    crate::rtnl::kernel_socket(NETLINK_SOCK_DIAG)
}

fn lookup(socket: &Socket, local: SocketAddr, remote: SocketAddr) -> io::Result<Option<u64>> {
    let family = match (local.ip(), remote.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) => AF_INET,
        (IpAddr::V6(_), IpAddr::V6(_)) => AF_INET6,
        _ => return Ok(None),
    };
    crate::rtnl::send(
        socket,
        NLM_F_REQUEST,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: SocketId {
                source_port: local.port(),
                destination_port: remote.port(),
                source_address: local.ip(),
                destination_address: remote.ip(),
                interface_id: 0,
                // INET_DIAG_NOCOOKIE: match on the addresses alone.
                cookie: [0xff; 8],
            },
        }),
    )?;
    let mut answer = vec![0u8; 8192];
    let n = socket.recv(&mut &mut answer[..], 0)?;
    let message = NetlinkMessage::<SockDiagMessage>::deserialize(&answer[..n])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("sock_diag: {e}")))?;
    match message.payload {
        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
            // The kernel's exact lookup falls back to a listening socket on
            // the local address: only the connected socket asked for counts.
            let id = &r.header.socket_id;
            let exact = id.source_port == local.port()
                && id.destination_port == remote.port()
                && id.source_address == local.ip()
                && id.destination_address == remote.ip();
            if r.header.state == TCP_LISTEN || !exact {
                return Ok(None);
            }
            Ok(r.nlas.iter().find_map(|nla| match nla {
                Nla::Other(a) if a.kind() == INET_DIAG_CGROUP_ID && a.value_len() == 8 => {
                    let mut v = [0u8; 8];
                    a.emit_value(&mut v);
                    Some(u64::from_ne_bytes(v))
                }
                _ => None,
            }))
        }
        // No such socket: ENOENT.
        NetlinkPayload::Error(e) if e.raw_code() == -libc::ENOENT => Ok(None),
        NetlinkPayload::Error(e) => Err(io::Error::from_raw_os_error(-e.raw_code())),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loopback connection of this process: its socket is found, with
    /// this process's cgroup; the reverse pair names the accepted socket
    /// (same process), and a pair that exists nowhere is none.
    #[test]
    fn finds_the_cgroup_of_a_loopback_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind on loopback");
        let client = std::net::TcpStream::connect(listener.local_addr().expect("address"))
            .expect("loopback connect");
        let (_server, _) = listener.accept().expect("accept");
        let (local, remote) = (
            client.local_addr().expect("address"),
            client.peer_addr().expect("address"),
        );
        let mine = crate::cgroup::Cgroup2::discover(std::path::Path::new("/proc/self/mountinfo"))
            .ok()
            .and_then(|cg| {
                let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
                let rel = own.lines().find_map(|l| l.strip_prefix("0::"))?.to_string();
                cg.id(rel.trim_start_matches('/')).ok()
            });
        let found = tcp_socket_cgroup(local, remote).expect("sock_diag answers");
        assert!(found.is_some(), "the client socket has a cgroup id");
        if let Some(mine) = mine {
            assert_eq!(found, Some(mine), "the socket's cgroup is this process's");
        }
        assert_eq!(
            tcp_socket_cgroup(remote, local).expect("sock_diag answers"),
            found
        );
        let nowhere = SocketAddr::new(local.ip(), 1);
        assert_eq!(
            tcp_socket_cgroup(nowhere, remote).expect("sock_diag answers"),
            None
        );
    }
}
