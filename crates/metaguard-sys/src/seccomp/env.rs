//! Keeping the supervisor's own environment from a same-uid child.
//!
//! `/proc/<pid>/environ` shows the memory the environment was passed in
//! (the initial stack), not `std::env`'s view; `unsetenv` does not erase
//! it. Two layers:
//!
//! * [`scrub_in_place`] overwrites every scrubbed `NAME=VALUE` string with
//!   NUL bytes where it lies, so `/proc/<pid>/environ` shows nothing of it
//!   even to a reader allowed to open the file;
//! * [`set_non_dumpable`] makes `/proc/<pid>/{environ,mem,fd}`,
//!   `process_vm_readv` and `pidfd_getfd` on the supervisor need
//!   `CAP_SYS_PTRACE` — which protects the rest of its memory (heap
//!   copies, the seccomp listener).
//!
//! Measured unprivileged (kernel 6.18, uid 65534): with both, a child's
//! `cat /proc/$PPID/environ` fails with EACCES, and nothing of a scrubbed
//! value remains in the supervisor's environ area. Changing the child's
//! uid needs privilege and is not done.

use std::io;

/// Overwrites, in this process's environment block, every entry whose
/// name `scrub` selects. Returns how many were erased.
///
/// Call while the process is single-threaded: other threads might read
/// the environment concurrently.
pub fn scrub_in_place(scrub: &dyn Fn(&[u8]) -> bool) -> usize {
    let mut erased = 0;
    // SAFETY: `environ` is the NULL-terminated array libc keeps; each entry
    // is a NUL-terminated string in writable memory (the initial stack, or
    // heap copies made by setenv). We only overwrite bytes up to each
    // string's terminating NUL and keep the terminator, so every entry stays
    // a valid (empty) C string and the array itself is untouched. The
    // process is single-threaded here (documented precondition), so no
    // getenv runs concurrently.
    unsafe {
        let mut p = libc::environ;
        if p.is_null() {
            return 0;
        }
        // Bounded by the array's NULL terminator; cap for safety.
        for _ in 0..1_000_000 {
            let entry = *p;
            if entry.is_null() {
                break;
            }
            let len = libc::strlen(entry);
            let bytes = std::slice::from_raw_parts(entry as *const u8, len);
            let name = match bytes.iter().position(|&b| b == b'=') {
                Some(i) => &bytes[..i],
                None => bytes,
            };
            if len > 0 && scrub(name) {
                std::ptr::write_bytes(entry, 0, len);
                erased += 1;
            }
            p = p.add(1);
        }
    }
    erased
}

/// `prctl(PR_SET_DUMPABLE, 0)` for this process.
pub fn set_non_dumpable() -> io::Result<()> {
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
        .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erases_only_selected_entries_in_a_forked_child() {
        // Runs in a forked child, so the test runner's environment stays.
        std::env::set_var("METAGUARD_TEST_SCRUB_ME", "secret-value");
        std::env::set_var("METAGUARD_TEST_KEEP_ME", "fine");
        // SAFETY: the child has only this thread (fork copies the calling
        // thread alone); it scrubs, reads its environment and leaves with
        // _exit. glibc makes malloc usable after fork; the variables were
        // set in the parent before forking.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let n = scrub_in_place(&|name| name == b"METAGUARD_TEST_SCRUB_ME");
            let environ = std::fs::read("/proc/self/environ").unwrap_or_default();
            let leaked = environ.windows(12).any(|w| w == b"secret-value");
            let kept = std::env::var("METAGUARD_TEST_KEEP_ME").is_ok_and(|v| v == "fine");
            let gone = std::env::var_os("METAGUARD_TEST_SCRUB_ME").is_none();
            let ok = n == 1 && !leaked && kept && gone;
            // SAFETY: leave the forked child without running destructors.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: waiting for the child forked above.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        std::env::remove_var("METAGUARD_TEST_SCRUB_ME");
        std::env::remove_var("METAGUARD_TEST_KEEP_ME");
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "status {status}"
        );
    }
}
