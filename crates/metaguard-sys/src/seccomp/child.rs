//! Starting the child under the filter.
//!
//! The listener descriptor only exists after the child has loaded the
//! filter, and the child cannot send it over a socket (`sendmsg` is then
//! intercepted and nobody answers yet). So the hand-over is:
//!
//! ```text
//! parent                                  child (after fork: raw syscalls only)
//!                                         PR_SET_DUMPABLE 1, PR_SET_PDEATHSIG
//!                                         PR_SET_NO_NEW_PRIVS 1
//!                                         seccomp(SET_MODE_FILTER, NEW_LISTENER) → L
//!   read report pipe  ◄──── (LISTENER, L) write
//!   pidfd_getfd(child, L)
//!   write ack pipe    ────►               read ack; close(L)
//!                                         unblock signals; execve
//!   read report pipe: EOF = exec'd  ◄──── or (EXEC, errno)
//! ```
//!
//! `L` is closed before `execve` (and is close-on-exec anyway), so the
//! command never holds its own listener. Everything the child needs (argv,
//! envp, the BPF program) is prepared before `fork`, and the parent is
//! single-threaded when it forks (checked), so the child never allocates.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rustix::process::{Pid, PidfdFlags, PidfdGetfdFlags};

use super::filter::Insn;
use super::{ExecSpec, SeccompError};

const STAGE_LISTENER: u32 = 1;
const STAGE_NNP: u32 = 2;
const STAGE_FILTER: u32 = 3;
const STAGE_EXEC: u32 = 4;
const STAGE_DUMPABLE: u32 = 5;

/// A started child and the supervisor's copy of its listener.
#[derive(Debug)]
pub struct Started {
    pub pid: u32,
    pub listener: OwnedFd,
}

fn start_err(what: &'static str) -> impl FnOnce(io::Error) -> SeccompError {
    move |source| SeccompError::Start { what, source }
}

/// Finds the program like `execvp` does, in the child's `PATH`.
pub fn resolve_program(spec: &ExecSpec) -> Result<PathBuf, SeccompError> {
    let prog = Path::new(&spec.program);
    if spec.program.is_empty() {
        return Err(SeccompError::NotFound {
            program: String::new(),
        });
    }
    if spec.program.as_bytes().contains(&b'/') {
        return Ok(prog.to_path_buf());
    }
    let path = spec
        .env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| OsString::from("/usr/local/bin:/usr/bin:/bin"));
    let mut found_not_exec = None;
    for dir in std::env::split_paths(&path) {
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        let cand = dir.join(prog);
        if let Ok(m) = std::fs::metadata(&cand) {
            if m.is_file() && m.permissions().mode() & 0o111 != 0 {
                return Ok(cand);
            }
            if m.is_file() {
                found_not_exec.get_or_insert(cand);
            }
        }
    }
    match found_not_exec {
        Some(p) => Ok(p),
        None => Err(SeccompError::NotFound {
            program: spec.program.to_string_lossy().into_owned(),
        }),
    }
}

fn cstring(s: &OsStr) -> Result<CString, SeccompError> {
    CString::new(s.as_bytes()).map_err(|_| SeccompError::Exec {
        program: s.to_string_lossy().into_owned(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "argument contains a NUL byte"),
    })
}

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(1)
}

fn read_report(fd: &OwnedFd) -> io::Result<Option<(u32, i32)>> {
    let mut buf = [0u8; 8];
    let mut got = 0;
    while got < buf.len() {
        match rustix::io::read(fd, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    if got == 0 {
        return Ok(None);
    }
    if got != buf.len() {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "short report from the child",
        ));
    }
    let stage = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let value = i32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]);
    Ok(Some((stage, value)))
}

fn reap(pid: libc::pid_t) {
    let mut status = 0;
    // SAFETY: `status` is a valid out-pointer for the call; waiting on our
    // own child has no other effect.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, &mut status, 0);
    }
}

/// Forks the child, hands its listener over, lets it `execve` `program`.
pub fn start(program: &Path, spec: &ExecSpec, prog: &[Insn]) -> Result<Started, SeccompError> {
    let path = cstring(program.as_os_str())?;
    let mut argv_c = vec![cstring(&spec.program)?];
    for a in &spec.args {
        argv_c.push(cstring(a)?);
    }
    let mut envp_c = Vec::with_capacity(spec.env.len());
    for (k, v) in &spec.env {
        let mut kv = k.clone().into_vec();
        kv.push(b'=');
        kv.extend_from_slice(v.as_bytes());
        envp_c.push(cstring(OsStr::from_bytes(&kv))?);
    }
    let mut argv: Vec<*const libc::c_char> = argv_c.iter().map(|c| c.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = envp_c.iter().map(|c| c.as_ptr()).collect();
    envp.push(std::ptr::null());
    let fprog = libc::sock_fprog {
        len: u16::try_from(prog.len())
            .map_err(|_| SeccompError::Filter(format!("{} instructions", prog.len())))?,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };

    let (report_r, report_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| start_err("pipe")(e.into()))?;
    let (ack_r, ack_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| start_err("pipe")(e.into()))?;

    let threads = thread_count();
    if threads != 1 {
        return Err(SeccompError::Threads(threads));
    }
    let parent = rustix::process::getpid().as_raw_nonzero().get();
    let report_w_raw = report_w.as_raw_fd();
    let ack_r_raw = ack_r.as_raw_fd();

    // SAFETY: this process is single-threaded (checked just above), so the
    // child is a consistent copy. The child runs only `child_main`, which
    // makes raw system calls on values prepared above (no allocation, no
    // locks) and never returns: it ends in execve or _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(start_err("fork")(io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: in the freshly forked child; the pointers in `argv`,
        // `envp` and `fprog` point into CStrings / the program owned by the
        // parent's frame, which the fork copied and nothing frees before
        // execve.
        unsafe {
            child_main(
                parent,
                report_w_raw,
                ack_r_raw,
                &path,
                argv.as_ptr(),
                envp.as_ptr(),
                &fprog,
            )
        }
    }
    drop(report_w);
    drop(ack_r);

    let fail = |e: SeccompError| {
        reap(pid);
        e
    };
    let listener_num =
        match read_report(&report_r).map_err(|e| fail(start_err("read from the child")(e)))? {
            Some((STAGE_LISTENER, fd)) => fd,
            Some((stage, errno)) => {
                reap(pid);
                let source = io::Error::from_raw_os_error(errno);
                return Err(match stage {
                    STAGE_NNP => SeccompError::Start {
                        what: "prctl(PR_SET_NO_NEW_PRIVS)",
                        source,
                    },
                    STAGE_FILTER => SeccompError::Unsupported {
                        what: "seccomp(SECCOMP_SET_MODE_FILTER, NEW_LISTENER)",
                        kernel: rustix::system::uname()
                            .release()
                            .to_string_lossy()
                            .into_owned(),
                        source,
                    },
                    STAGE_DUMPABLE => SeccompError::Start {
                        what: "prctl(PR_SET_DUMPABLE)",
                        source,
                    },
                    _ => SeccompError::Start {
                        what: "child set-up",
                        source,
                    },
                });
            }
            None => {
                reap(pid);
                return Err(SeccompError::Start {
                    what: "child set-up",
                    source: io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the child exited before loading the filter",
                    ),
                });
            }
        };
    let child_pid =
        Pid::from_raw(pid).ok_or_else(|| start_err("fork")(io::Error::other("pid 0")))?;
    let pidfd = rustix::process::pidfd_open(child_pid, PidfdFlags::empty())
        .map_err(|e| fail(start_err("pidfd_open(child)")(e.into())))?;
    let listener =
        rustix::process::pidfd_getfd(&pidfd, listener_num as RawFd, PidfdGetfdFlags::empty())
            .map_err(|e| fail(start_err("pidfd_getfd(child listener)")(e.into())))?;
    rustix::io::write(&ack_w, &[1]).map_err(|e| fail(start_err("write to the child")(e.into())))?;
    drop(ack_w);
    match read_report(&report_r).map_err(|e| fail(start_err("read from the child")(e)))? {
        None => Ok(Started {
            pid: pid as u32,
            listener,
        }),
        Some((_, errno)) if errno == libc::ENOENT => {
            reap(pid);
            Err(SeccompError::NotFound {
                program: program.display().to_string(),
            })
        }
        Some((_, errno)) => {
            reap(pid);
            Err(SeccompError::Exec {
                program: program.display().to_string(),
                source: io::Error::from_raw_os_error(errno),
            })
        }
    }
}

/// The child between fork and exec. Raw system calls only.
///
/// # Safety
/// Must run in a just-forked child of a single-threaded parent; `path`,
/// `argv`, `envp` and `fprog` must be valid as built by [`start`].
unsafe fn child_main(
    parent: i32,
    report_w: RawFd,
    ack_r: RawFd,
    path: &CString,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    fprog: &libc::sock_fprog,
) -> ! {
    let report = |stage: u32, value: i32| {
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&stage.to_ne_bytes());
        b[4..].copy_from_slice(&value.to_ne_bytes());
        // SAFETY: `b` is 8 valid bytes on this stack frame.
        unsafe { libc::write(report_w, b.as_ptr().cast(), b.len()) };
    };
    let die = |stage: u32| -> ! {
        // SAFETY: __errno_location is always valid for the calling thread.
        let errno = unsafe { *libc::__errno_location() };
        report(stage, errno);
        // SAFETY: _exit ends this process without running Rust or libc
        // destructors, which belong to the parent's copy.
        unsafe { libc::_exit(127) }
    };
    // SAFETY: prctl, seccomp, read, close, signal, sigprocmask and
    // execve are async-signal-safe system calls; every pointer passed is to
    // a local or to data prepared by the parent that the fork copied and
    // that lives until execve.
    unsafe {
        // Dumpable, so the (non-dumpable) supervisor may take the listener
        // with pidfd_getfd; execve sets this anew for the command.
        if libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) != 0 {
            die(STAGE_DUMPABLE);
        }
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        if libc::getppid() != parent {
            libc::_exit(127);
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            die(STAGE_NNP);
        }
        let listener = libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
            fprog as *const libc::sock_fprog,
        );
        if listener < 0 {
            die(STAGE_FILTER);
        }
        report(STAGE_LISTENER, listener as i32);
        let mut ack = [0u8; 1];
        loop {
            let n = libc::read(ack_r, ack.as_mut_ptr().cast(), 1);
            if n == 1 {
                break;
            }
            if n < 0 && *libc::__errno_location() == libc::EINTR {
                continue;
            }
            libc::_exit(127);
        }
        libc::close(listener as i32);
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::execve(path.as_ptr(), argv, envp);
        die(STAGE_EXEC)
    }
}
