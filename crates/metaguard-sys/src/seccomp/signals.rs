//! The supervisor's main thread after the child started: wait for signals
//! (blocked in every thread, taken with `sigwaitinfo`), forward them to
//! the child, reap children (all of them when this process is PID 1 and
//! inherits orphans), and return when the child exits.

use std::io;

use super::{ChildExit, SeccompError};

/// Signals forwarded to the child. `SIGCHLD` is blocked too and drives
/// reaping; `SIGKILL`/`SIGSTOP` cannot be caught.
pub const FORWARDED: [i32; 13] = [
    libc::SIGHUP,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGTERM,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
    libc::SIGCONT,
    libc::SIGALRM,
    libc::SIGTSTP,
    libc::SIGTTIN,
    libc::SIGTTOU,
    libc::SIGPWR,
];

/// The blocked set, to wait on.
#[derive(Clone, Copy)]
pub struct Mask(libc::sigset_t);

impl std::fmt::Debug for Mask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Mask")
    }
}

/// Blocks the forwarded signals and `SIGCHLD` in this thread (and so in
/// every thread started afterwards). Call before forking: a signal that
/// arrives while the child starts stays pending and is forwarded later.
pub fn block() -> Result<Mask, SeccompError> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, initialised sigset_t owned here; the
    // signal numbers are valid; pthread_sigmask only reads `set`.
    let r = unsafe {
        libc::sigemptyset(&mut set);
        for s in FORWARDED.iter().chain(&[libc::SIGCHLD]) {
            libc::sigaddset(&mut set, *s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if r != 0 {
        return Err(SeccompError::Start {
            what: "pthread_sigmask",
            source: io::Error::from_raw_os_error(r),
        });
    }
    Ok(Mask(set))
}

fn decode_status(status: i32) -> ChildExit {
    if libc::WIFSIGNALED(status) {
        ChildExit::Signaled(libc::WTERMSIG(status))
    } else {
        ChildExit::Exited(libc::WEXITSTATUS(status))
    }
}

/// Reaps every exited child; returns the status of `child` if it exited.
fn reap_all(child: libc::pid_t) -> Option<ChildExit> {
    let mut found = None;
    // Bounded: at most one iteration per exited child, capped.
    for _ in 0..65_536 {
        let mut status = 0;
        // SAFETY: `status` is a valid out-pointer; WNOHANG never blocks.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            break;
        }
        if pid == child {
            found = Some(decode_status(status));
        }
    }
    found
}

/// Waits until `child` exits, forwarding signals and reaping orphans.
pub fn supervise(child: u32, mask: &Mask) -> ChildExit {
    let child = child as libc::pid_t;
    loop {
        // SAFETY: siginfo_t is plain data filled by the kernel.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `mask.0` is an initialised set and `info` a valid
        // out-pointer, both alive for the call.
        let sig = unsafe { libc::sigwaitinfo(&mask.0, &mut info) };
        if sig < 0 {
            // EINTR (a stop/continue of this process): wait again.
            continue;
        }
        if sig == libc::SIGCHLD {
            if let Some(exit) = reap_all(child) {
                return exit;
            }
            continue;
        }
        // Signals the terminal sent to the whole foreground process group
        // already reached the child: forward only those sent by a process
        // (kill, docker stop) or the kernel to this process alone.
        if info.si_code == libc::SI_KERNEL && is_tty_signal(sig) {
            continue;
        }
        // SAFETY: kill with a pid we forked and have not yet reaped (the
        // pid cannot be reused before waitpid collects it).
        unsafe { libc::kill(child, sig) };
    }
}

fn is_tty_signal(sig: i32) -> bool {
    matches!(
        sig,
        libc::SIGINT | libc::SIGQUIT | libc::SIGTSTP | libc::SIGWINCH
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell() {
        assert_eq!(ChildExit::Exited(3).code(), 3);
        assert_eq!(ChildExit::Signaled(libc::SIGKILL).code(), 137);
        assert_eq!(ChildExit::Signaled(libc::SIGTERM).code(), 143);
    }
}
