//! The filter, built with libseccomp and exported as a classic BPF
//! program, so the child can load it with one raw `seccomp()` call after
//! `fork` (no allocation there).
//!
//! Native architecture only; any other (i386 `int 0x80`, x32 numbers)
//! kills the process. Integer arguments are compared on their low 32 bits
//! (`MaskedEqual(0xffff_ffff)`): the kernel truncates an `int` argument,
//! so a caller could otherwise dodge an equality test by setting the high
//! half of the register.

use std::io::{self, Read, Seek};
use std::os::fd::OwnedFd;

use libseccomp::{ScmpAction, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall};

use super::SeccompError;

const LOW32: u64 = 0xffff_ffff;

/// One classic BPF instruction (`struct sock_filter`).
pub type Insn = libc::sock_filter;

fn low32_eq(arg: u32, value: u64) -> ScmpArgCompare {
    ScmpArgCompare::new(arg, ScmpCompareOp::MaskedEqual(LOW32), value)
}

fn err(e: impl std::fmt::Display) -> SeccompError {
    SeccompError::Filter(e.to_string())
}

fn syscall(name: &str) -> Result<ScmpSyscall, SeccompError> {
    ScmpSyscall::from_name(name).map_err(|e| err(format!("{name}: {e}")))
}

/// The libseccomp context (also used by tests to print the PFC text).
pub fn context() -> Result<ScmpFilterContext, SeccompError> {
    let mut ctx = ScmpFilterContext::new(ScmpAction::Allow).map_err(err)?;
    ctx.set_act_badarch(ScmpAction::KillProcess).map_err(err)?;
    let eperm = ScmpAction::Errno(libc::EPERM);

    for name in ["connect", "sendmsg", "sendmmsg"] {
        ctx.add_rule(ScmpAction::Notify, syscall(name)?)
            .map_err(err)?;
    }
    // sendto with a destination; without one it goes to the connected
    // peer, which was checked at connect time.
    ctx.add_rule_conditional(
        ScmpAction::Notify,
        syscall("sendto")?,
        &[ScmpArgCompare::new(4, ScmpCompareOp::NotEqual, 0)],
    )
    .map_err(err)?;

    for name in ["io_uring_setup", "io_uring_enter", "io_uring_register"] {
        ctx.add_rule(eperm, syscall(name)?).map_err(err)?;
    }

    let socket = syscall("socket")?;
    for family in [libc::AF_PACKET, libc::AF_XDP] {
        ctx.add_rule_conditional(eperm, socket, &[low32_eq(0, family as u64)])
            .map_err(err)?;
    }
    for ty in [libc::SOCK_RAW, SOCK_PACKET] {
        // The type argument carries SOCK_NONBLOCK/SOCK_CLOEXEC in its
        // high bits; the type is the low nibble.
        ctx.add_rule_conditional(
            eperm,
            socket,
            &[ScmpArgCompare::new(
                1,
                ScmpCompareOp::MaskedEqual(0xf),
                ty as u64,
            )],
        )
        .map_err(err)?;
    }
    ctx.add_rule_conditional(eperm, socket, &[low32_eq(2, libc::IPPROTO_SCTP as u64)])
        .map_err(err)?;

    let setsockopt = syscall("setsockopt")?;
    for (level, name) in [
        (libc::IPPROTO_IP, libc::IP_OPTIONS),
        (libc::IPPROTO_IPV6, libc::IPV6_RTHDR),
        (libc::IPPROTO_IPV6, IPV6_2292PKTOPTIONS),
    ] {
        ctx.add_rule_conditional(
            eperm,
            setsockopt,
            &[low32_eq(1, level as u64), low32_eq(2, name as u64)],
        )
        .map_err(err)?;
    }
    Ok(ctx)
}

/// `SOCK_PACKET` (obsolete packet socket type; deprecated in the libc crate).
const SOCK_PACKET: i32 = 10;

/// `IPV6_2292PKTOPTIONS` (RFC 2292 sticky options, a routing header among
/// them); not in the libc crate.
pub const IPV6_2292PKTOPTIONS: i32 = 6;

/// Builds the filter and exports it as BPF instructions.
pub fn build() -> Result<Vec<Insn>, SeccompError> {
    let ctx = context()?;
    let memfd: OwnedFd =
        rustix::fs::memfd_create("metaguard-seccomp", rustix::fs::MemfdFlags::CLOEXEC)
            .map_err(|e| err(format!("memfd_create: {e}")))?;
    ctx.export_bpf(&memfd).map_err(err)?;
    let mut f = std::fs::File::from(memfd);
    f.rewind().map_err(err)?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes).map_err(err)?;
    let size = std::mem::size_of::<Insn>();
    if bytes.is_empty() || bytes.len() % size != 0 {
        return Err(err(format!(
            "libseccomp exported {} bytes, not a whole number of {size}-byte instructions",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(size)
        .map(|c| Insn {
            code: u16::from_ne_bytes([c[0], c[1]]),
            jt: c[2],
            jf: c[3],
            k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
        })
        .collect())
}

/// The filter in libseccomp's readable PFC form.
pub fn pfc() -> Result<String, SeccompError> {
    let ctx = context()?;
    let memfd: OwnedFd =
        rustix::fs::memfd_create("metaguard-seccomp-pfc", rustix::fs::MemfdFlags::CLOEXEC)
            .map_err(|e| err(format!("memfd_create: {e}")))?;
    ctx.export_pfc(&memfd).map_err(err)?;
    let mut f = std::fs::File::from(memfd);
    f.rewind().map_err(err)?;
    let mut text = String::new();
    f.read_to_string(&mut text).map_err(err)?;
    Ok(text)
}

fn kernel_release() -> String {
    rustix::system::uname()
        .release()
        .to_string_lossy()
        .into_owned()
}

fn unsupported(what: &'static str, source: io::Error) -> SeccompError {
    SeccompError::Unsupported {
        what,
        kernel: kernel_release(),
        source,
    }
}

/// Probes each kernel feature the supervisor relies on.
pub fn check_support() -> Result<(), SeccompError> {
    // SAFETY: PR_GET_SECCOMP takes no pointer arguments; it only reports
    // this thread's seccomp mode (EINVAL without CONFIG_SECCOMP).
    let mode = unsafe { libc::prctl(libc::PR_GET_SECCOMP, 0, 0, 0, 0) };
    if mode < 0 {
        return Err(unsupported(
            "prctl(PR_GET_SECCOMP)",
            io::Error::last_os_error(),
        ));
    }
    let action: u32 = libc::SECCOMP_RET_USER_NOTIF;
    // SAFETY: SECCOMP_GET_ACTION_AVAIL reads one u32 from the pointer,
    // which points to `action`, alive for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_GET_ACTION_AVAIL,
            0,
            &action as *const u32,
        )
    };
    if r != 0 {
        return Err(unsupported(
            "SECCOMP_GET_ACTION_AVAIL(SECCOMP_RET_USER_NOTIF)",
            io::Error::last_os_error(),
        ));
    }
    let me = rustix::process::getpid();
    let pidfd = rustix::process::pidfd_open(me, rustix::process::PidfdFlags::empty())
        .map_err(|e| unsupported("pidfd_open", e.into()))?;
    use std::os::fd::AsRawFd;
    let raw = pidfd.as_raw_fd();
    rustix::process::pidfd_getfd(&pidfd, raw, rustix::process::PidfdGetfdFlags::empty())
        .map_err(|e| unsupported("pidfd_getfd", e.into()))?;
    if let Ok(scope) = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope") {
        if scope.trim().parse::<u32>().is_ok_and(|s| s >= 2) {
            return Err(SeccompError::Forbidden(format!(
                "kernel.yama.ptrace_scope = {}: the supervisor may not read its child's memory (needs 0 or 1)",
                scope.trim()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_builds_and_kills_foreign_architectures() {
        let prog = build().expect("filter");
        assert!(prog.len() > 10);
        let text = pfc().expect("pfc");
        // Native arch only; anything else (i386, x32) is killed.
        assert!(text.contains("if ($arch == 3221225534)"), "{text}");
        assert!(text.contains("action KILL_PROCESS"), "{text}");
        // x32 system call numbers (__X32_SYSCALL_BIT) are filtered out:
        // libseccomp emits `jge 0x40000000` to the bad-arch action.
        assert!(
            prog.iter().any(|i| i.code == 0x35 && i.k == 0x4000_0000),
            "no x32 check"
        );
        for name in [
            "connect",
            "sendmsg",
            "sendmmsg",
            "sendto",
            "io_uring_setup",
            "socket",
            "setsockopt",
        ] {
            assert!(
                text.contains(&format!("# filter for syscall \"{name}\"")),
                "{name}: {text}"
            );
        }
    }
}
