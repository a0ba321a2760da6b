//! The consumer side of the `mg_events` ring buffer and the events it
//! carries.

use std::io;
use std::os::fd::AsRawFd;

use aya::maps::{MapData, RingBuf};

/// The consumer side of the `mg_events` ring buffer. Its descriptor
/// becomes readable when events are queued (for epoll / tokio `AsyncFd`).
pub struct EventReader {
    pub(super) ring: RingBuf<MapData>,
}

impl std::fmt::Debug for EventReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventReader")
            .field("fd", &self.ring.as_raw_fd())
            .finish()
    }
}

impl EventReader {
    /// Waits until events are queued or `timeout` passes; `Ok(true)` when
    /// there is something to drain.
    pub fn wait(&self, timeout: std::time::Duration) -> io::Result<bool> {
        self.poll(timeout)
    }

    fn poll(&self, timeout: std::time::Duration) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.ring.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `pfd` is one valid pollfd on this stack frame, and the
        // count passed is 1; the descriptor is the ring buffer map's, owned
        // by `self.ring` and open for the whole call (borrowed via &self).
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        match r {
            r if r < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    Ok(false)
                } else {
                    Err(e)
                }
            }
            0 => Ok(false),
            _ => Ok(pfd.revents & libc::POLLIN != 0),
        }
    }

    /// Every event queued now.
    ///
    /// Each item is taken only while the kernel says the ring holds data
    /// (`poll` with no wait: its consumer and producer positions differ).
    /// aya 0.13's reader caches the producer position starting from 0 and
    /// reloads it only when the consumer position equals the cache, so a
    /// reader opened on a ring whose consumer position is not 0 — every
    /// ring a previous reader consumed from: a restarted daemon's, a new
    /// follower's — never sees the producer position and reads on past it
    /// forever, consuming stale bytes and pushing the consumer position
    /// beyond the producer's, after which the kernel finds the ring full
    /// and drops every event. Asking the kernel first stops at the real
    /// end (one `poll` per event).
    pub fn drain(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        while self.poll(std::time::Duration::ZERO).unwrap_or(false) {
            let Some(item) = self.ring.next() else {
                break; // a record still being written
            };
            if let Some(e) = Event::parse(&item) {
                out.push(e);
            }
        }
        out
    }
}

impl AsRawFd for EventReader {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.ring.as_raw_fd()
    }
}

/// A refusal, or an observed call, as the programs report it (`struct
/// mg_event`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub cgroup_id: u64,
    pub pid: u32,
    /// "connect", "sendmsg" or "socket".
    pub syscall: &'static str,
    pub family: u32,
    pub port: u16,
    /// Destination (v4: first 4 bytes).
    pub addr: [u8; 16],
    pub sock_type: u32,
    pub protocol: u32,
    /// The socket's network namespace cookie (0: not known — a `socket`
    /// event, or an event of the first layout).
    pub netns_cookie: u64,
    /// The socket's cookie (0: not known).
    pub sock_cookie: u64,
    /// The calling task's `comm` (empty: not known).
    pub comm: String,
    /// The call was let through and reported because its class is
    /// observed; else it was refused.
    pub observed: bool,
    /// The rule index that decided (`core::bpf_policy::rule_index`;
    /// `u32::MAX`: none, or not known).
    pub rule: u32,
}

/// The size of `struct mg_event` before the observe fields were added;
/// programs of that layout (an older metaguard's, until an upgrade swaps
/// them) still emit it.
const FIRST_LAYOUT: usize = 48;
/// The size of `struct mg_event` now.
const LAYOUT: usize = 88;

impl Event {
    /// Decodes one ring buffer record (either layout); `None` for a record
    /// too short for the first one.
    pub fn parse(b: &[u8]) -> Option<Event> {
        let u32_at = |o: usize| -> Option<u32> {
            Some(u32::from_ne_bytes(b.get(o..o + 4)?.try_into().ok()?))
        };
        let u64_at = |o: usize| -> Option<u64> {
            Some(u64::from_ne_bytes(b.get(o..o + 8)?.try_into().ok()?))
        };
        if b.len() < FIRST_LAYOUT {
            return None;
        }
        let addr: [u8; 16] = b.get(24..40)?.try_into().ok()?;
        let full = b.len() >= LAYOUT;
        let comm = if full {
            let raw = b.get(64..80)?;
            let end = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
            String::from_utf8_lossy(&raw[..end]).into_owned()
        } else {
            String::new()
        };
        Some(Event {
            cgroup_id: u64_at(0)?,
            pid: u32_at(8)?,
            syscall: match u32_at(12)? {
                1 => "connect",
                2 => "sendmsg",
                _ => "socket",
            },
            family: u32_at(16)?,
            port: u16::try_from(u32_at(20)?).ok()?,
            addr,
            sock_type: u32_at(40)?,
            protocol: u32_at(44)?,
            netns_cookie: if full { u64_at(48)? } else { 0 },
            sock_cookie: if full { u64_at(56)? } else { 0 },
            comm,
            observed: full && u32_at(80)? == 1,
            rule: if full { u32_at(84)? } else { u32::MAX },
        })
    }

    /// `ipv6` for an AF_INET6 call, else `ipv4`.
    pub fn family_name(&self) -> &'static str {
        if self.family == libc::AF_INET6 as u32 {
            "ipv6"
        } else {
            "ipv4"
        }
    }

    /// `udp` for a datagram socket, else `tcp` (the programs see stream
    /// and datagram sockets; a raw one is refused at creation).
    pub fn transport(&self) -> &'static str {
        if self.sock_type == libc::SOCK_DGRAM as u32 {
            "udp"
        } else {
            "tcp"
        }
    }

    /// The destination as an address, when there is one.
    pub fn destination(&self) -> Option<std::net::IpAddr> {
        match self.family as i32 {
            libc::AF_INET => {
                let [a, b, c, d, ..] = self.addr;
                Some(std::net::Ipv4Addr::new(a, b, c, d).into())
            }
            libc::AF_INET6 if self.syscall != "socket" => {
                Some(std::net::Ipv6Addr::from(self.addr).into())
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record laid out as `struct mg_event` (x86-64/aarch64: natural
    /// alignment, no padding but at the end).
    fn record(full: bool) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(77u64.to_ne_bytes()); // cgroup_id
        b.extend(4242u32.to_ne_bytes()); // pid
        b.extend(2u32.to_ne_bytes()); // syscall: sendmsg
        b.extend((libc::AF_INET as u32).to_ne_bytes());
        b.extend(53u32.to_ne_bytes()); // port
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[169, 254, 169, 254]);
        b.extend(addr);
        b.extend((libc::SOCK_DGRAM as u32).to_ne_bytes());
        b.extend(17u32.to_ne_bytes()); // IPPROTO_UDP
        if full {
            b.extend(4096u64.to_ne_bytes()); // netns cookie
            b.extend(99u64.to_ne_bytes()); // socket cookie
            let mut comm = [0u8; 16];
            comm[..5].copy_from_slice(b"probe");
            b.extend(comm);
            b.extend(1u32.to_ne_bytes()); // observed
            b.extend(0x0003_0000u32.to_ne_bytes()); // rule
        }
        b
    }

    #[test]
    fn both_event_layouts_decode() {
        let full = record(true);
        assert_eq!(full.len(), LAYOUT);
        let e = Event::parse(&full).expect("full layout");
        assert_eq!(
            (e.cgroup_id, e.pid, e.syscall, e.port),
            (77, 4242, "sendmsg", 53)
        );
        assert_eq!(
            e.destination(),
            Some("169.254.169.254".parse().expect("ip"))
        );
        assert_eq!((e.netns_cookie, e.sock_cookie), (4096, 99));
        assert_eq!(e.comm, "probe");
        assert!(e.observed);
        assert_eq!(e.rule, 0x0003_0000);
        assert_eq!((e.transport(), e.family_name()), ("udp", "ipv4"));
        // An older program's event: refused, nothing of the new fields.
        let old = record(false);
        assert_eq!(old.len(), FIRST_LAYOUT);
        let e = Event::parse(&old).expect("first layout");
        assert!(!e.observed && e.comm.is_empty() && e.netns_cookie == 0);
        assert_eq!(e.rule, u32::MAX);
        assert_eq!(Event::parse(&old[..40]), None);
        // A comm of 16 bytes without its NUL is still read.
        let mut long = record(true);
        long[64..80].copy_from_slice(b"abcdefghijklmnop");
        assert_eq!(Event::parse(&long).expect("full").comm, "abcdefghijklmnop");
    }
}
