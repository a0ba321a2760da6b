//! What systemd hands a service it starts: the listening sockets of socket
//! activation (`LISTEN_PID`, `LISTEN_FDS`, descriptors from 3 on; see
//! sd_listen_fds(3)).

use std::os::fd::{FromRawFd, OwnedFd};

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: i32 = 3;

/// Takes the sockets systemd passed to this process, if it passed any:
/// `LISTEN_PID` must be this process (the variables are inherited by
/// children, which must not take them). The variables are removed, so a
/// second call returns nothing and a child started later does not see
/// them.
pub fn take_listen_fds() -> Vec<OwnedFd> {
    let pid_ok = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    let count = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<i32>().ok())
        .unwrap_or(0);
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    if !pid_ok || count <= 0 {
        return Vec::new();
    }
    (LISTEN_FDS_START..LISTEN_FDS_START + count)
        // SAFETY: systemd passed descriptors 3..3+LISTEN_FDS to this very
        // process (LISTEN_PID is ours), open and owned by nobody else here;
        // the variables are removed above before anything else can read
        // them, so each descriptor is adopted exactly once.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect()
}
