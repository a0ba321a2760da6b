//! The emulated syscalls: copy the caller's arguments, check every
//! destination with the policy, perform the call on a `pidfd_getfd`
//! duplicate with the bytes that were checked, and answer.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use rustix::process::PidfdGetfdFlags;

use crate::seccomp::mem;
use crate::seccomp::sockaddr::{self, Cmsg, Dest, MsgHdr};

use super::{cached_pidfd, tgid_of, Answer, Call, MAX_CONTROL, MAX_PAYLOAD};

/// Reads an address argument of `len` bytes (`len` as the kernel takes
/// it: an `int`, at most `sockaddr_storage`).
pub(super) fn read_addr(call: &Call<'_>, ptr: u64, len: u64) -> Result<Vec<u8>, i32> {
    let len = len as u32 as i32;
    if len < 0 || len as usize > sockaddr::SOCKADDR_MAX {
        return Err(libc::EINVAL);
    }
    call.read(ptr, len as usize)
}

pub(super) fn ret(r: isize) -> Answer {
    if r < 0 {
        Err(io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO))
    } else {
        Ok(r as i64)
    }
}

pub(super) fn connect(call: &Call<'_>, fd: u64, ptr: u64, len: u64) -> Answer {
    let addr = read_addr(call, ptr, len)?;
    let dest = sockaddr::decode(&addr);
    call.check(dest)?;
    let sock = call.socket(fd)?;
    call.enter_cwd(dest)?;
    // SAFETY: `sock` is an open descriptor owned here; `addr` is our own
    // copy of exactly `addr.len()` bytes (≤ sockaddr_storage), alive for
    // the call; connect only reads it.
    let r = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            addr.as_ptr().cast(),
            addr.len() as libc::socklen_t,
        )
    };
    ret(r as isize)
}

pub(super) fn socket_type(sock: &OwnedFd) -> i32 {
    rustix::net::sockopt::socket_type(sock)
        .map(|t| t.as_raw() as i32)
        .unwrap_or(libc::SOCK_STREAM)
}

/// How many payload bytes to copy for a send of `total` bytes, or
/// EMSGSIZE for a datagram that is too large to copy.
pub(super) fn payload_len(sock: &OwnedFd, total: u64) -> Result<usize, i32> {
    if total as usize <= MAX_PAYLOAD {
        return Ok(total as usize);
    }
    match socket_type(sock) {
        libc::SOCK_STREAM => Ok(MAX_PAYLOAD),
        _ => Err(libc::EMSGSIZE),
    }
}

/// The caller would have got SIGPIPE from the kernel; this process did
/// not (it sends with MSG_NOSIGNAL), so pass it on.
pub(super) fn sigpipe(call: &Call<'_>, answer: &Answer, flags: i32) {
    if answer == &Err(libc::EPIPE) && flags & libc::MSG_NOSIGNAL == 0 {
        if let Some(tgid) = tgid_of(call.tid) {
            // SAFETY: tgkill with ids read just now; at worst the thread is
            // gone and the kernel answers ESRCH.
            unsafe { libc::syscall(libc::SYS_tgkill, tgid, call.tid as i32, libc::SIGPIPE) };
        }
    }
}

pub(super) fn sendto(call: &Call<'_>, a: [u64; 6]) -> Answer {
    let (fd, buf, len, flags, ptr, alen) = (a[0], a[1], a[2], a[3] as i32, a[4], a[5]);
    let addr = read_addr(call, ptr, alen)?;
    let dest = sockaddr::decode(&addr);
    call.check(dest)?;
    let sock = call.socket(fd)?;
    let n = payload_len(&sock, len)?;
    let data = call.read(buf, n)?;
    call.enter_cwd(dest)?;
    // SAFETY: `sock` is open and owned here; `data` and `addr` are our own
    // buffers of the lengths passed, alive for the call, only read.
    let r = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            flags | libc::MSG_NOSIGNAL,
            addr.as_ptr().cast(),
            addr.len() as libc::socklen_t,
        )
    };
    let answer = ret(r);
    sigpipe(call, &answer, flags);
    answer
}

/// One message, copied out of the child and made ready to send here.
pub(super) struct Msg {
    name: Vec<u8>,
    data: Vec<u8>,
    control: Vec<u8>,
    /// Descriptors duplicated for SCM_RIGHTS; closed after the send.
    _fds: Vec<OwnedFd>,
    dest: Dest,
}

/// Copies one `msghdr` (already read) and everything it points to.
pub(super) fn copy_msg(
    call: &Call<'_>,
    h: &MsgHdr,
    sock: Option<&OwnedFd>,
    budget: &mut usize,
) -> Result<Msg, i32> {
    let name = if h.name == 0 {
        Vec::new()
    } else {
        // The kernel truncates a longer msg_namelen to sockaddr_storage.
        let len = (h.namelen as usize).min(sockaddr::SOCKADDR_MAX);
        call.read(h.name, len)?
    };
    let dest = if name.is_empty() {
        Dest::Other
    } else {
        sockaddr::decode(&name)
    };
    if h.iovlen as usize > sockaddr::UIO_MAXIOV {
        return Err(libc::EMSGSIZE);
    }
    let iovs = sockaddr::parse_iovecs(&call.read(h.iov, h.iovlen as usize * 16)?);
    let total: u64 = iovs.iter().map(|(_, l)| *l).fold(0u64, u64::saturating_add);
    let want = match sock {
        Some(s) => payload_len(s, total)?,
        None => total as usize,
    }
    .min(*budget);
    let mut data = Vec::with_capacity(want);
    for (base, len) in iovs {
        if data.len() >= want {
            break;
        }
        let take = (len as usize).min(want - data.len());
        data.extend_from_slice(&call.read(base, take)?);
    }
    *budget -= data.len();
    if h.controllen as usize > MAX_CONTROL {
        return Err(libc::ENOBUFS);
    }
    let mut control = if h.controllen == 0 {
        Vec::new()
    } else {
        call.read(h.control, h.controllen as usize)?
    };
    let mut fds = Vec::new();
    let cmsgs = sockaddr::parse_cmsgs(&control).map_err(|_| libc::EINVAL)?;
    for c in cmsgs {
        match c {
            Cmsg::Rights { offset, count } => {
                let pidfd = cached_pidfd(call.tid).map_or_else(|| call.pidfd(), Ok)?;
                for i in 0..count {
                    let at = offset + 4 * i;
                    let theirs = sockaddr::read_i32(&control, at);
                    let ours =
                        rustix::process::pidfd_getfd(&pidfd, theirs, PidfdGetfdFlags::empty())
                            .map_err(|_| libc::EBADF)?;
                    sockaddr::write_i32(&mut control, at, ours.as_raw_fd());
                    fds.push(ours);
                }
            }
            Cmsg::Credentials { offset } => {
                // The kernel accepts only the sender's own pid.
                sockaddr::write_i32(&mut control, offset, std::process::id() as i32);
            }
            Cmsg::SourceRoute => {
                return Err(call.refuse(
                    "source route / routing header control message".into(),
                    libc::EPERM,
                ));
            }
            Cmsg::Other => {}
        }
    }
    Ok(Msg {
        name,
        data,
        control,
        _fds: fds,
        dest,
    })
}

/// A `libc::msghdr` pointing into `m` (and `iov`, which must outlive it).
pub(super) fn raw_msghdr(m: &Msg, iov: &mut libc::iovec) -> libc::msghdr {
    *iov = libc::iovec {
        iov_base: m.data.as_ptr() as *mut libc::c_void,
        iov_len: m.data.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
    if !m.name.is_empty() {
        h.msg_name = m.name.as_ptr() as *mut libc::c_void;
        h.msg_namelen = m.name.len() as libc::socklen_t;
    }
    h.msg_iov = iov;
    h.msg_iovlen = 1;
    if !m.control.is_empty() {
        h.msg_control = m.control.as_ptr() as *mut libc::c_void;
        h.msg_controllen = m.control.len();
    }
    h
}

pub(super) fn sendmsg(call: &Call<'_>, fd: u64, ptr: u64, flags: u64) -> Answer {
    let flags = flags as i32;
    let hdr = call.read(ptr, sockaddr::MSGHDR_SIZE)?;
    let h = MsgHdr::parse(&hdr).ok_or(libc::EFAULT)?;
    let sock = call.socket(fd)?;
    let mut budget = MAX_PAYLOAD;
    let m = copy_msg(call, &h, Some(&sock), &mut budget)?;
    call.check(m.dest)?;
    call.enter_cwd(m.dest)?;
    let mut iov = libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    };
    let raw = raw_msghdr(&m, &mut iov);
    // SAFETY: `raw` points only into `m` and `iov`, our own buffers, alive
    // for the call; descriptors in its control data are ours (`m._fds`).
    let r = unsafe { libc::sendmsg(sock.as_raw_fd(), &raw, flags | libc::MSG_NOSIGNAL) };
    let answer = ret(r);
    sigpipe(call, &answer, flags);
    answer
}

pub(super) fn sendmmsg(call: &Call<'_>, fd: u64, ptr: u64, vlen: u64, flags: u64) -> Answer {
    let flags = flags as i32;
    let vlen = (vlen as u32 as usize).min(sockaddr::UIO_MAXIOV);
    if vlen == 0 {
        return Ok(0);
    }
    let arr = call.read(ptr, vlen * sockaddr::MMSGHDR_SIZE)?;
    let sock = call.socket(fd)?;
    let mut budget = MAX_PAYLOAD;
    let mut msgs = Vec::with_capacity(vlen);
    let mut denied = None;
    for i in 0..vlen {
        let at = i * sockaddr::MMSGHDR_SIZE;
        let h = MsgHdr::parse(&arr[at..at + sockaddr::MSGHDR_SIZE]).ok_or(libc::EFAULT)?;
        let m = match copy_msg(call, &h, Some(&sock), &mut budget) {
            Ok(m) => m,
            Err(e) => {
                denied = Some(e);
                break;
            }
        };
        if let Err(e) = call.check(m.dest).and_then(|_| call.enter_cwd(m.dest)) {
            denied = Some(e);
            break;
        }
        msgs.push(m);
    }
    // Like the kernel: messages before the first failure are sent; the
    // failure is reported only when nothing was sent.
    if msgs.is_empty() {
        return Err(denied.unwrap_or(libc::EINVAL));
    }
    let mut iovs = vec![
        libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0
        };
        msgs.len()
    ];
    let mut raw: Vec<libc::mmsghdr> = msgs
        .iter()
        .zip(iovs.iter_mut())
        .map(|(m, iov)| libc::mmsghdr {
            msg_hdr: raw_msghdr(m, iov),
            msg_len: 0,
        })
        .collect();
    // SAFETY: `raw` has `raw.len()` headers pointing into `msgs` and
    // `iovs`, our own buffers alive for the call; the kernel writes only
    // the msg_len fields of `raw`.
    let r = unsafe {
        libc::sendmmsg(
            sock.as_raw_fd(),
            raw.as_mut_ptr(),
            raw.len() as libc::c_uint,
            flags | libc::MSG_NOSIGNAL,
        )
    };
    let answer = ret(r as isize);
    if let Ok(sent) = answer {
        // Tell the caller how much of each message went, like the kernel.
        for (i, h) in raw.iter().take(sent as usize).enumerate() {
            let at = ptr + (i * sockaddr::MMSGHDR_SIZE + sockaddr::MSGHDR_SIZE) as u64;
            let _ = mem::write(call.tid, at, &h.msg_len.to_ne_bytes());
        }
    }
    sigpipe(call, &answer, flags);
    answer
}
