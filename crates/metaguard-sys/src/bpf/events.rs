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
    pub fn drain(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        while let Some(item) = self.ring.next() {
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

/// A refusal, as the programs report it (`struct mg_event`).
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
}

impl Event {
    fn parse(b: &[u8]) -> Option<Event> {
        let u32_at = |o: usize| -> Option<u32> {
            Some(u32::from_ne_bytes(b.get(o..o + 4)?.try_into().ok()?))
        };
        let cgroup_id = u64::from_ne_bytes(b.get(0..8)?.try_into().ok()?);
        let addr: [u8; 16] = b.get(24..40)?.try_into().ok()?;
        Some(Event {
            cgroup_id,
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
        })
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
