//! The notification workers: receive, copy, check, perform, answer.
//!
//! Several worker threads block in `SECCOMP_IOCTL_NOTIF_RECV` on the same
//! listener (the kernel hands each notification to one of them). A worker
//! handles its notification to the end, so a blocking `connect` occupies
//! one worker; when the last idle worker takes a notification it starts
//! another, up to [`MAX_WORKERS`]. Each worker has its own filesystem
//! context (`unshare(CLONE_FS)`) so it can resolve a relative `AF_UNIX`
//! path from the caller's working directory.
//!
//! See the parent module for why the call is performed here, on a
//! `pidfd_getfd` duplicate, with the bytes that were checked.
//!
//! Layout: this module holds the workers, the ioctls and the context of
//! one call (`Call`); `calls` the emulated syscalls themselves
//! (`connect`, `sendto`, `sendmsg`, `sendmmsg`).

mod calls;

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use rustix::process::{Pid, PidfdFlags, PidfdGetfdFlags};

use super::sockaddr::Dest;
use super::{mem, Attempt, Policy, Refusal, Syscall, Verdict};

use self::calls::{connect, sendmmsg, sendmsg, sendto};
/// Most concurrent workers (each may sit in a blocking connect).
pub const MAX_WORKERS: usize = 64;
/// Most payload bytes copied for one send; a stream socket gets a
/// partial send beyond it, a datagram `EMSGSIZE`.
pub const MAX_PAYLOAD: usize = 4 << 20;
/// Most control-message bytes (the kernel's `optmem_max` is smaller).
pub const MAX_CONTROL: usize = 1 << 16;

struct Shared {
    listener: OwnedFd,
    policy: Arc<dyn Policy>,
    idle: AtomicUsize,
    workers: AtomicUsize,
    nr: Numbers,
}

/// Native syscall numbers of the intercepted calls.
#[derive(Clone, Copy)]
struct Numbers {
    connect: i32,
    sendto: i32,
    sendmsg: i32,
    sendmmsg: i32,
}

/// `SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP` (Linux 6.6+): wake the supervisor
/// and the caller on the same CPU, which halves the notification round
/// trip. Optional.
const SYNC_WAKE_UP: u64 = 1;

/// One received notification (`struct seccomp_notif`).
struct Notif {
    id: u64,
    tid: u32,
    nr: i32,
    args: [u64; 6],
}

fn ioctl_recv(fd: RawFd) -> io::Result<Notif> {
    // The kernel wants a zeroed buffer; retried on EINTR, bounded.
    for _ in 0..1000 {
        // SAFETY: seccomp_notif is plain data; all-zero is what the kernel
        // expects on entry.
        let mut n: libc::seccomp_notif = unsafe { std::mem::zeroed() };
        // SAFETY: SECCOMP_IOCTL_NOTIF_RECV writes one seccomp_notif (its
        // size is encoded in the request number) into `n`, which is ours
        // and alive for the call.
        let r = unsafe { libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_RECV, &mut n) };
        if r == 0 {
            return Ok(Notif {
                id: n.id,
                tid: n.pid,
                nr: n.data.nr,
                args: n.data.args,
            });
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
    Err(io::Error::from_raw_os_error(libc::EINTR))
}

/// Answers notification `id`: `Ok(val)` or `Err(errno)` (positive).
fn ioctl_send(fd: RawFd, id: u64, answer: Answer) -> io::Result<()> {
    let (val, error) = match answer {
        Ok(v) => (v, 0),
        Err(e) => (0, -e),
    };
    let mut resp = libc::seccomp_notif_resp {
        id,
        val,
        error,
        flags: 0,
    };
    // SAFETY: SECCOMP_IOCTL_NOTIF_SEND reads one seccomp_notif_resp from
    // `resp`, ours and alive for the call.
    let r = unsafe { libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_SEND, &mut resp) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn ioctl_id_valid(fd: RawFd, id: u64) -> bool {
    let mut id = id;
    // SAFETY: SECCOMP_IOCTL_NOTIF_ID_VALID reads one u64 from `id`.
    unsafe { libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_ID_VALID, &mut id) == 0 }
}

fn set_sync_wake_up(fd: RawFd) {
    let mut flags = SYNC_WAKE_UP;
    // SAFETY: SECCOMP_IOCTL_NOTIF_SET_FLAGS reads one u64; on kernels
    // without it the call fails (EINVAL/ENOTTY) and nothing changes.
    unsafe { libc::ioctl(fd, libc::SECCOMP_IOCTL_NOTIF_SET_FLAGS, &mut flags) };
}

/// Starts the first workers; they live until the process exits.
pub fn start_workers(listener: OwnedFd, policy: Arc<dyn Policy>) {
    set_sync_wake_up(listener.as_raw_fd());
    let shared = Arc::new(Shared {
        listener,
        policy,
        idle: AtomicUsize::new(0),
        workers: AtomicUsize::new(0),
        nr: Numbers {
            connect: libc::SYS_connect as i32,
            sendto: libc::SYS_sendto as i32,
            sendmsg: libc::SYS_sendmsg as i32,
            sendmmsg: libc::SYS_sendmmsg as i32,
        },
    });
    for _ in 0..2 {
        spawn_worker(&shared);
    }
}

fn spawn_worker(shared: &Arc<Shared>) {
    if shared.workers.fetch_add(1, Ordering::SeqCst) >= MAX_WORKERS {
        shared.workers.fetch_sub(1, Ordering::SeqCst);
        return;
    }
    shared.idle.fetch_add(1, Ordering::SeqCst);
    let s = Arc::clone(shared);
    let spawned = std::thread::Builder::new()
        .name("metaguard-notify".into())
        .spawn(move || worker(s));
    if spawned.is_err() {
        shared.idle.fetch_sub(1, Ordering::SeqCst);
        shared.workers.fetch_sub(1, Ordering::SeqCst);
    }
}

fn worker(shared: Arc<Shared>) {
    // Own cwd for relative AF_UNIX paths; failure only disables those.
    // SAFETY: unshare(CLONE_FS) only detaches this thread's fs context
    // (cwd, root, umask) from the other threads'; no memory is involved.
    let own_fs = unsafe { libc::unshare(libc::CLONE_FS) } == 0;
    let fd = shared.listener.as_raw_fd();
    // The worker lives as long as the supervisor; each iteration handles
    // one notification. Errors other than a vanished notification end it
    // after a bounded number of retries.
    let mut failures = 0u32;
    loop {
        // Wait in poll first: with SYNC_WAKE_UP the kernel wakes poll
        // waiters on the caller's CPU (a RECV blocked in the ioctl is woken
        // the ordinary way). POLLHUP: no task uses the filter any more.
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, ours, for the call.
        let n = unsafe { libc::poll(&mut pfd, 1, -1) };
        if n > 0
            && pfd.revents & libc::POLLIN == 0
            && pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0
        {
            shared.idle.fetch_sub(1, Ordering::SeqCst);
            shared.workers.fetch_sub(1, Ordering::SeqCst);
            return;
        }
        let req = match ioctl_recv(fd) {
            Ok(r) => {
                failures = 0;
                r
            }
            Err(_) => {
                // ENOENT: the caller vanished between wake-up and receive.
                failures += 1;
                if failures > 1000 {
                    shared.idle.fetch_sub(1, Ordering::SeqCst);
                    shared.workers.fetch_sub(1, Ordering::SeqCst);
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
                continue;
            }
        };
        if shared.idle.fetch_sub(1, Ordering::SeqCst) == 1 {
            spawn_worker(&shared);
        }
        let answer = handle(&shared, &req, own_fs);
        // ENOENT: the caller was interrupted or died meanwhile.
        let _ = ioctl_send(fd, req.id, answer);
        shared.idle.fetch_add(1, Ordering::SeqCst);
    }
}

/// What a handler answers: the return value, or a positive errno.
type Answer = Result<i64, i32>;

fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

struct Call<'a> {
    shared: &'a Shared,
    id: u64,
    tid: u32,
    syscall: Syscall,
    own_fs: bool,
}

impl Call<'_> {
    fn refuse(&self, reason: String, errno: i32) -> i32 {
        self.shared.policy.refused(&Refusal {
            syscall: self.syscall,
            tid: self.tid,
            reason,
            errno,
        });
        errno
    }

    /// Reads child memory; an unreadable child is refused (fail closed),
    /// a bad pointer is the child's own EFAULT.
    fn read(&self, addr: u64, len: usize) -> Result<Vec<u8>, i32> {
        mem::read(self.tid, addr, len).map_err(|e| match errno_of(&e) {
            libc::EFAULT => libc::EFAULT,
            _ => self.refuse(format!("cannot read the caller's memory: {e}"), libc::EPERM),
        })
    }

    fn still_valid(&self) -> Result<(), i32> {
        if ioctl_id_valid(self.shared.listener.as_raw_fd(), self.id) {
            Ok(())
        } else {
            Err(libc::ENOENT)
        }
    }

    /// Checks one destination with the policy; Err(EACCES) when denied.
    fn check(&self, dest: Dest) -> Result<(), i32> {
        if let Dest::Ip(sa) = dest {
            let attempt = Attempt {
                syscall: self.syscall,
                tid: self.tid,
                dest: sa,
            };
            if self.shared.policy.decide(&attempt) == Verdict::Deny {
                self.shared.policy.denied(&attempt);
                return Err(libc::EACCES);
            }
        }
        Ok(())
    }

    /// A fresh pidfd for the calling thread: a thread pidfd where the
    /// kernel has them (6.9+), else its thread group's. (Callers look in
    /// this worker's [`PIDFDS`] cache first.)
    fn pidfd(&self) -> Result<Rc<OwnedFd>, i32> {
        let tid = Pid::from_raw(self.tid as i32).ok_or(libc::ESRCH)?;
        if !NO_THREAD_PIDFD.load(Ordering::Relaxed) {
            // PIDFD_THREAD is O_EXCL.
            match rustix::process::pidfd_open(
                tid,
                PidfdFlags::from_bits_retain(libc::O_EXCL as u32),
            ) {
                Ok(fd) => return Ok(Rc::new(fd)),
                Err(rustix::io::Errno::INVAL) => NO_THREAD_PIDFD.store(true, Ordering::Relaxed),
                Err(e) => return Err(self.refuse(format!("pidfd_open: {e}"), libc::EPERM)),
            }
        }
        let tgid = tgid_of(self.tid).ok_or(libc::ESRCH)?;
        let pid = Pid::from_raw(tgid).ok_or(libc::ESRCH)?;
        rustix::process::pidfd_open(pid, PidfdFlags::empty())
            .map(Rc::new)
            .map_err(|e| self.refuse(format!("pidfd_open: {e}"), libc::EPERM))
    }

    /// The caller's socket `fd`, duplicated into this process.
    ///
    /// A cached thread pidfd needs no re-check: while the task it names
    /// lives it holds the caller's tid, so it *is* the blocked caller;
    /// once that task is gone `pidfd_getfd` fails (`ESRCH`) and a fresh
    /// pidfd is opened. A fresh pidfd is opened before the notification
    /// is re-checked, so it is the blocked caller's and not a reused
    /// tid's; only then is it cached.
    fn socket(&self, fd: u64) -> Result<OwnedFd, i32> {
        let fd = i32::try_from(fd as i64).map_err(|_| libc::EBADF)?;
        let getfd = |pidfd: &OwnedFd| {
            rustix::process::pidfd_getfd(pidfd, fd as RawFd, PidfdGetfdFlags::empty())
        };
        if let Some(pidfd) = cached_pidfd(self.tid) {
            match getfd(&pidfd) {
                Ok(sock) => return Ok(sock),
                Err(rustix::io::Errno::BADF) => return Err(libc::EBADF),
                // The cached task is gone: the tid is someone new.
                Err(_) => forget_pidfd(self.tid),
            }
        }
        let pidfd = self.pidfd()?;
        self.still_valid()?;
        let sock = getfd(&pidfd).map_err(|e| match e {
            rustix::io::Errno::BADF => libc::EBADF,
            e => self.refuse(format!("pidfd_getfd: {e}"), libc::EPERM),
        })?;
        if !NO_THREAD_PIDFD.load(Ordering::Relaxed) {
            remember_pidfd(self.tid, pidfd);
        }
        Ok(sock)
    }

    /// Enters the caller's working directory when a relative AF_UNIX path
    /// is about to be resolved.
    fn enter_cwd(&self, dest: Dest) -> Result<(), i32> {
        if dest != Dest::UnixRelative {
            return Ok(());
        }
        if !self.own_fs {
            return Err(self.refuse(
                "relative AF_UNIX path and no private cwd".into(),
                libc::EACCES,
            ));
        }
        let cwd = std::fs::File::open(format!("/proc/{}/cwd", self.tid))
            .map_err(|e| self.refuse(format!("cannot open the caller's cwd: {e}"), libc::EACCES))?;
        rustix::process::fchdir(&cwd).map_err(|e| self.refuse(format!("fchdir: {e}"), libc::EACCES))
    }
}

/// Set once `pidfd_open(PIDFD_THREAD)` is refused (kernels before 6.9):
/// pidfds then name thread groups, which outlive a thread's tid, so none
/// is cached.
static NO_THREAD_PIDFD: AtomicBool = AtomicBool::new(false);

/// Most thread pidfds one worker keeps (a full cache is emptied).
const PIDFD_CACHE: usize = 256;

thread_local! {
    /// This worker's thread pidfds, by tid: saves a `pidfd_open` and a
    /// `close` per intercepted call of a thread seen before.
    static PIDFDS: RefCell<HashMap<u32, Rc<OwnedFd>>> = RefCell::new(HashMap::new());
}

fn cached_pidfd(tid: u32) -> Option<Rc<OwnedFd>> {
    PIDFDS.with(|c| c.borrow().get(&tid).cloned())
}

fn remember_pidfd(tid: u32, pidfd: Rc<OwnedFd>) {
    PIDFDS.with(|c| {
        let mut c = c.borrow_mut();
        if c.len() >= PIDFD_CACHE {
            c.clear();
        }
        c.insert(tid, pidfd);
    });
}

fn forget_pidfd(tid: u32) {
    PIDFDS.with(|c| c.borrow_mut().remove(&tid));
}

fn tgid_of(tid: u32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

fn handle(shared: &Shared, req: &Notif, own_fs: bool) -> Answer {
    let nr = req.nr;
    let syscall = if nr == shared.nr.connect {
        Syscall::Connect
    } else if nr == shared.nr.sendto {
        Syscall::Sendto
    } else if nr == shared.nr.sendmsg {
        Syscall::Sendmsg
    } else if nr == shared.nr.sendmmsg {
        Syscall::Sendmmsg
    } else {
        return Err(libc::ENOSYS);
    };
    let call = Call {
        shared,
        id: req.id,
        tid: req.tid,
        syscall,
        own_fs,
    };
    let a = req.args;
    match syscall {
        Syscall::Connect => connect(&call, a[0], a[1], a[2]),
        Syscall::Sendto => sendto(&call, a),
        Syscall::Sendmsg => sendmsg(&call, a[0], a[1], a[2]),
        Syscall::Sendmmsg => sendmmsg(&call, a[0], a[1], a[2], a[3]),
    }
}
