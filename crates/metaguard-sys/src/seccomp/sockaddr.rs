//! Decoding what the child passed, as the kernel would read it: socket
//! addresses, `msghdr`/`mmsghdr` layouts and control messages. Safe code
//! over byte copies; the layouts are Linux x86_64/aarch64 (LP64).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

/// Largest address the kernel copies in (`sizeof(struct sockaddr_storage)`).
pub const SOCKADDR_MAX: usize = 128;
/// `sizeof(struct msghdr)` on LP64.
pub const MSGHDR_SIZE: usize = 56;
/// `sizeof(struct mmsghdr)` on LP64 (msghdr + u32 msg_len + padding).
pub const MMSGHDR_SIZE: usize = 64;
/// `UIO_MAXIOV`: most iovecs per message and messages per `sendmmsg`.
pub const UIO_MAXIOV: usize = 1024;
/// `sizeof(struct cmsghdr)` (aligned): where the data of a cmsg starts.
const CMSG_HDR: usize = 16;

/// What a socket address designates, for the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    /// An IP destination the kernel may route to (`AF_INET`, `AF_INET6`,
    /// or `AF_UNSPEC`, which IPv4 UDP/raw `sendmsg` reads as IPv4).
    Ip(SocketAddr),
    /// `AF_UNIX` with a path relative to the caller's working directory.
    UnixRelative,
    /// Anything else: absolute or abstract `AF_UNIX`, netlink, too short
    /// to be read as IP by the kernel, unknown families.
    Other,
}

fn u16_ne(b: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([b[at], b[at + 1]])
}

/// Decodes a socket address exactly as long as the child passed it.
pub fn decode(addr: &[u8]) -> Dest {
    if addr.len() < 2 {
        return Dest::Other;
    }
    let family = i32::from(u16_ne(addr, 0));
    let port = |b: &[u8]| u16::from_be_bytes([b[2], b[3]]);
    match family {
        // AF_UNSPEC is read as sockaddr_in by udp_sendmsg/raw_sendmsg; 8
        // bytes hold family, port and address (the kernel wants 16, but
        // checking from 8 on costs nothing and is never too lax).
        libc::AF_INET | libc::AF_UNSPEC if addr.len() >= 8 => {
            let ip = Ipv4Addr::new(addr[4], addr[5], addr[6], addr[7]);
            Dest::Ip(SocketAddr::V4(SocketAddrV4::new(ip, port(addr))))
        }
        // SIN6_LEN_RFC2133: the kernel accepts 24 bytes (no scope id).
        libc::AF_INET6 if addr.len() >= 24 => {
            let mut b = [0u8; 16];
            b.copy_from_slice(&addr[8..24]);
            let flow = u32::from_be_bytes([addr[4], addr[5], addr[6], addr[7]]);
            let scope = if addr.len() >= 28 {
                u32::from_ne_bytes([addr[24], addr[25], addr[26], addr[27]])
            } else {
                0
            };
            Dest::Ip(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(b),
                port(addr),
                flow,
                scope,
            )))
        }
        libc::AF_UNIX => {
            let path = &addr[2..];
            match path.first() {
                // abstract (leading NUL), unnamed (no path) or absolute
                None | Some(0) | Some(b'/') => Dest::Other,
                Some(_) => Dest::UnixRelative,
            }
        }
        _ => Dest::Other,
    }
}

fn u64_ne(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_ne_bytes(a)
}

fn u32_ne(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The pointer fields of a `struct msghdr`, read from the child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsgHdr {
    pub name: u64,
    pub namelen: u32,
    pub iov: u64,
    pub iovlen: u64,
    pub control: u64,
    pub controllen: u64,
}

impl MsgHdr {
    /// Parses the first [`MSGHDR_SIZE`] bytes of `b`.
    pub fn parse(b: &[u8]) -> Option<MsgHdr> {
        if b.len() < MSGHDR_SIZE {
            return None;
        }
        Some(MsgHdr {
            name: u64_ne(b, 0),
            namelen: u32_ne(b, 8),
            iov: u64_ne(b, 16),
            iovlen: u64_ne(b, 24),
            control: u64_ne(b, 32),
            controllen: u64_ne(b, 40),
        })
    }
}

/// `(base, len)` pairs of an iovec array.
pub fn parse_iovecs(b: &[u8]) -> Vec<(u64, u64)> {
    b.chunks_exact(16)
        .map(|c| (u64_ne(c, 0), u64_ne(c, 8)))
        .collect()
}

/// A control message that matters to the supervisor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmsg {
    /// `SCM_RIGHTS`: descriptors at byte `offset`, `count` of them.
    Rights {
        offset: usize,
        count: usize,
    },
    /// `SCM_CREDENTIALS`: `struct ucred` at byte `offset`.
    Credentials {
        offset: usize,
    },
    /// A source route / routing header: refused.
    SourceRoute,
    Other,
}

/// Why a control buffer is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmsgError {
    /// Malformed (the kernel answers `EINVAL` too).
    Invalid,
}

/// Walks a control buffer the way the kernel's `for_each_cmsghdr` and
/// `CMSG_OK` do, and classifies each message.
pub fn parse_cmsgs(buf: &[u8]) -> Result<Vec<Cmsg>, CmsgError> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while buf.len().saturating_sub(at) >= CMSG_HDR {
        let len = u64_ne(buf, at) as usize;
        if len < CMSG_HDR || len > buf.len() - at {
            return Err(CmsgError::Invalid);
        }
        let level = u32_ne(buf, at + 8) as i32;
        let ty = u32_ne(buf, at + 12) as i32;
        let data = len - CMSG_HDR;
        let c = match (level, ty) {
            (libc::SOL_SOCKET, libc::SCM_RIGHTS) => Cmsg::Rights {
                offset: at + CMSG_HDR,
                count: data / 4,
            },
            (libc::SOL_SOCKET, libc::SCM_CREDENTIALS) if data >= 12 => Cmsg::Credentials {
                offset: at + CMSG_HDR,
            },
            (libc::IPPROTO_IP, libc::IP_RETOPTS)
            | (libc::IPPROTO_IPV6, libc::IPV6_RTHDR)
            | (libc::IPPROTO_IPV6, libc::IPV6_2292RTHDR) => Cmsg::SourceRoute,
            _ => Cmsg::Other,
        };
        out.push(c);
        // CMSG_ALIGN
        at += (len + 7) & !7;
    }
    Ok(out)
}

/// Reads the `i32` at `offset`.
pub fn read_i32(buf: &[u8], offset: usize) -> i32 {
    u32_ne(buf, offset) as i32
}

/// Writes `v` at `offset`.
pub fn write_i32(buf: &mut [u8], offset: usize, v: i32) {
    buf[offset..offset + 4].copy_from_slice(&v.to_ne_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sin(ip: [u8; 4], port: u16, family: u16) -> Vec<u8> {
        let mut b = vec![0u8; 16];
        b[..2].copy_from_slice(&family.to_ne_bytes());
        b[2..4].copy_from_slice(&port.to_be_bytes());
        b[4..8].copy_from_slice(&ip);
        b
    }

    #[test]
    fn decodes_both_families_and_unspec_as_ipv4() {
        assert_eq!(
            decode(&sin([169, 254, 169, 254], 80, libc::AF_INET as u16)),
            Dest::Ip("169.254.169.254:80".parse().expect("sa"))
        );
        assert_eq!(
            decode(&sin([169, 254, 170, 2], 80, libc::AF_UNSPEC as u16)),
            Dest::Ip("169.254.170.2:80".parse().expect("sa"))
        );
        let mut b6 = vec![0u8; 28];
        b6[..2].copy_from_slice(&(libc::AF_INET6 as u16).to_ne_bytes());
        b6[2..4].copy_from_slice(&80u16.to_be_bytes());
        b6[8..24].copy_from_slice(
            &"::ffff:169.254.169.254"
                .parse::<Ipv6Addr>()
                .expect("ip")
                .octets(),
        );
        assert_eq!(
            decode(&b6),
            Dest::Ip("[::ffff:169.254.169.254]:80".parse().expect("sa"))
        );
        assert_eq!(decode(&b6[..24]), decode(&b6));
        assert_eq!(decode(&b6[..23]), Dest::Other);
        assert_eq!(decode(&[2]), Dest::Other);
    }

    #[test]
    fn unix_paths() {
        let mk = |p: &[u8]| {
            let mut b = (libc::AF_UNIX as u16).to_ne_bytes().to_vec();
            b.extend_from_slice(p);
            b
        };
        assert_eq!(decode(&mk(b"/run/x.sock\0")), Dest::Other);
        assert_eq!(decode(&mk(b"\0abstract")), Dest::Other);
        assert_eq!(decode(&mk(b"")), Dest::Other);
        assert_eq!(decode(&mk(b"rel.sock\0")), Dest::UnixRelative);
    }

    fn cmsg(level: i32, ty: i32, data: &[u8]) -> Vec<u8> {
        let len = CMSG_HDR + data.len();
        let mut b = (len as u64).to_ne_bytes().to_vec();
        b.extend_from_slice(&level.to_ne_bytes());
        b.extend_from_slice(&ty.to_ne_bytes());
        b.extend_from_slice(data);
        while b.len() % 8 != 0 {
            b.push(0);
        }
        b
    }

    #[test]
    fn control_messages() {
        let mut buf = cmsg(
            libc::SOL_SOCKET,
            libc::SCM_RIGHTS,
            &[3, 0, 0, 0, 4, 0, 0, 0],
        );
        buf.extend(cmsg(libc::SOL_SOCKET, libc::SCM_CREDENTIALS, &[0; 12]));
        buf.extend(cmsg(libc::IPPROTO_IP, libc::IP_RETOPTS, &[0; 8]));
        buf.extend(cmsg(libc::IPPROTO_IP, libc::IP_TOS, &[0; 4]));
        let c = parse_cmsgs(&buf).expect("valid");
        assert_eq!(
            c,
            vec![
                Cmsg::Rights {
                    offset: 16,
                    count: 2
                },
                Cmsg::Credentials { offset: 40 },
                Cmsg::SourceRoute,
                Cmsg::Other
            ]
        );
        assert_eq!(read_i32(&buf, 20), 4);
        // A length running past the buffer is refused, like CMSG_OK.
        let mut bad = cmsg(libc::SOL_SOCKET, libc::SCM_RIGHTS, &[3, 0, 0, 0]);
        bad[0] = 200;
        assert_eq!(parse_cmsgs(&bad), Err(CmsgError::Invalid));
        let mut short = cmsg(libc::SOL_SOCKET, libc::SCM_RIGHTS, &[]);
        short[0] = 8;
        assert_eq!(parse_cmsgs(&short), Err(CmsgError::Invalid));
        assert_eq!(parse_cmsgs(&[0u8; 7]), Ok(vec![]));
    }

    #[test]
    fn msghdr_layout_matches_libc() {
        assert_eq!(std::mem::size_of::<libc::msghdr>(), MSGHDR_SIZE);
        assert_eq!(std::mem::size_of::<libc::mmsghdr>(), MMSGHDR_SIZE);
        assert_eq!(std::mem::size_of::<libc::sockaddr_storage>(), SOCKADDR_MAX);
        let mut b = vec![0u8; MSGHDR_SIZE];
        b[0..8].copy_from_slice(&0x1000u64.to_ne_bytes());
        b[8..12].copy_from_slice(&16u32.to_ne_bytes());
        b[16..24].copy_from_slice(&0x2000u64.to_ne_bytes());
        b[24..32].copy_from_slice(&2u64.to_ne_bytes());
        b[32..40].copy_from_slice(&0x3000u64.to_ne_bytes());
        b[40..48].copy_from_slice(&24u64.to_ne_bytes());
        assert_eq!(
            MsgHdr::parse(&b),
            Some(MsgHdr {
                name: 0x1000,
                namelen: 16,
                iov: 0x2000,
                iovlen: 2,
                control: 0x3000,
                controllen: 24
            })
        );
    }
}
