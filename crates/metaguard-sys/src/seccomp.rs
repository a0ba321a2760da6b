//! `metaguard exec`'s kernel side: run a command under a seccomp filter
//! whose network system calls are decided — and carried out — by this
//! process, the supervisor. No privilege is needed: the filter is
//! installed with `no_new_privs`.
//!
//! Owns: building the filter ([`filter`]), starting the child with it
//! ([`child`]), the notification workers that inspect and perform the
//! child's `connect`/`sendto`/`sendmsg`/`sendmmsg` ([`notify`]), reading
//! and writing the child's memory ([`mem`]), decoding socket addresses and
//! control messages ([`sockaddr`]), hiding the supervisor's own
//! environment ([`env`](mod@env)) and the signal/exit loop ([`signals`]).
//!
//! Must not: decide policy. Each inspected destination is handed to a
//! [`Policy`] (the binary asks `metaguard_core::exec_policy`).
//!
//! # Why the supervisor performs the system call itself (TOCTOU)
//!
//! A seccomp user notification stops the calling thread inside the system
//! call; the supervisor then reads the arguments that point into the
//! child's memory (the `sockaddr`, the `msghdr`) with
//! `process_vm_readv`. Answering "continue" after that check would be
//! unsafe: the kernel reads the child's memory *again* when the call
//! resumes, and another thread of the child can rewrite the `sockaddr` in
//! between (or `dup2` a different socket onto the same descriptor number).
//! So the supervisor never answers "continue":
//!
//! 1. it copies every byte the call would read (address, iovecs, control
//!    messages) into its own memory, once;
//! 2. it decides on *its copy*; a denial is answered with `EACCES` at once;
//! 3. otherwise it opens a pidfd for the calling thread and checks that the
//!    notification is still alive (`SECCOMP_IOCTL_NOTIF_ID_VALID`), so the
//!    pidfd is the blocked caller's and not a reused pid's. Thread pidfds
//!    are then kept per tid: while the task a kept pidfd names lives, it
//!    holds that tid, so it is the caller; once it is gone `pidfd_getfd`
//!    fails and a fresh pidfd is opened and checked as above;
//! 4. it takes a duplicate of the caller's socket with `pidfd_getfd` (the
//!    same open file description, so the same socket), performs the very
//!    call on it with the very bytes it checked, and answers with that
//!    call's result (or `errno`).
//!
//! What the kernel acts on is therefore exactly what was checked; rewriting
//! memory or descriptors after the read changes nothing. A blocking
//! `connect` blocks one worker thread (a pool of workers receives
//! notifications concurrently), a non-blocking one returns `EINPROGRESS`
//! to the child as it would have without the supervisor. Caller-relative
//! parts are translated: descriptors in `SCM_RIGHTS` are duplicated from
//! the child, `SCM_CREDENTIALS` carries the supervisor's pid, relative
//! `AF_UNIX` paths are resolved from the caller's working directory (the
//! worker thread has its own fs context, `unshare(CLONE_FS)`).
//!
//! What never needs inspection is refused in the filter itself with
//! `EPERM`: `io_uring_*` (its submissions bypass seccomp), packet and raw
//! sockets (`AF_PACKET`, `AF_XDP`, `SOCK_RAW`, `SOCK_PACKET`), SCTP (whose
//! `connectx` socket option connects without `connect`), and the socket
//! options that set IPv4 source routes or IPv6 routing headers (they make
//! the first hop, not the checked address, the packet's destination).
//! `sendto` without an address is not intercepted (it goes to the
//! connected peer, which was checked when it was connected). Foreign
//! architectures (i386 `int 0x80`, x32) kill the process.

use std::ffi::OsString;
use std::io;
use std::net::SocketAddr;

pub mod child;
pub mod env;
pub mod filter;
pub mod mem;
pub mod notify;
pub mod signals;
pub mod sockaddr;

/// The system calls the supervisor inspects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Syscall {
    Connect,
    Sendto,
    Sendmsg,
    Sendmmsg,
}

impl Syscall {
    pub fn name(self) -> &'static str {
        match self {
            Syscall::Connect => "connect",
            Syscall::Sendto => "sendto",
            Syscall::Sendmsg => "sendmsg",
            Syscall::Sendmmsg => "sendmmsg",
        }
    }
}

/// One inspected attempt to reach an IP destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt {
    pub syscall: Syscall,
    /// Thread id of the caller (in the supervisor's pid namespace).
    pub tid: u32,
    /// The destination as the child spelled it (an `AF_UNSPEC` address is
    /// given as the IPv4 address the kernel would read from it).
    pub dest: SocketAddr,
}

/// The answer to an [`Attempt`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny,
}

/// A call the supervisor refused because it could not inspect or perform
/// it safely (fail closed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub syscall: Syscall,
    pub tid: u32,
    pub reason: String,
    pub errno: i32,
}

/// Decides on destinations and hears about refusals. Called from the
/// notification worker threads.
pub trait Policy: Send + Sync + 'static {
    fn decide(&self, attempt: &Attempt) -> Verdict;
    /// A denied attempt, after the child was answered.
    fn denied(&self, attempt: &Attempt);
    /// A call refused without a policy decision.
    fn refused(&self, refusal: &Refusal);
}

/// What to run.
#[derive(Debug, Clone)]
pub struct ExecSpec {
    /// Program: a path, or a name looked up in the child's `PATH`.
    pub program: OsString,
    /// Arguments after the program (argv[1..]).
    pub args: Vec<OsString>,
    /// The child's whole environment.
    pub env: Vec<(OsString, OsString)>,
}

/// How the child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildExit {
    Exited(i32),
    Signaled(i32),
}

impl ChildExit {
    /// The shell convention: the exit code, or 128 + the signal.
    pub fn code(self) -> u8 {
        match self {
            ChildExit::Exited(c) => (c & 0xff) as u8,
            ChildExit::Signaled(s) => (128 + (s & 0x7f)) as u8,
        }
    }
}

/// Everything that can stop `exec` before or while starting the child.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp user notification is not available on this kernel ({kernel}): {what}: {source} — metaguard exec needs Linux 5.9 or later with CONFIG_SECCOMP_FILTER")]
    Unsupported {
        what: &'static str,
        kernel: String,
        source: io::Error,
    },
    #[error("{0}")]
    Forbidden(String),
    #[error("cannot build the seccomp filter: {0}")]
    Filter(String),
    #[error("{program}: command not found")]
    NotFound { program: String },
    #[error("cannot run {program}: {source}")]
    Exec { program: String, source: io::Error },
    #[error("cannot start the child: {what}: {source}")]
    Start {
        what: &'static str,
        source: io::Error,
    },
    #[error(
        "the supervisor must be single-threaded until the child runs; this process has {0} threads"
    )]
    Threads(usize),
}

impl SeccompError {
    /// The exit status a shell would give: 127 not found, 126 cannot
    /// execute, 2 for everything that stopped metaguard itself.
    pub fn exit_code(&self) -> u8 {
        match self {
            SeccompError::NotFound { .. } => 127,
            SeccompError::Exec { .. } => 126,
            _ => 2,
        }
    }
}

/// Checks that this kernel offers what the supervisor needs — seccomp
/// filters with user notification, `pidfd_open`, `pidfd_getfd`, and
/// ptrace-level access to a child — before anything is started.
pub fn check_support() -> Result<(), SeccompError> {
    filter::check_support()
}

/// Runs `spec` under the filter and supervises it until it exits:
/// forwards signals, reaps orphans when this process is PID 1, answers
/// notifications. Returns how the child ended.
///
/// The caller must be single-threaded (no runtime, no helper thread): the
/// child is forked from this process.
pub fn run(spec: &ExecSpec, policy: std::sync::Arc<dyn Policy>) -> Result<ChildExit, SeccompError> {
    let program = child::resolve_program(spec)?;
    let prog = filter::build()?;
    let mask = signals::block()?;
    let started = child::start(&program, spec, &prog)?;
    notify::start_workers(started.listener, policy);
    Ok(signals::supervise(started.pid, &mask))
}
