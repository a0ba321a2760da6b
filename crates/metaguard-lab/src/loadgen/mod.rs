//! Load generation for the proxy benchmark: `wrk` and a reference `nginx`
//! reverse proxy, each run as a child process inside a lab namespace, and
//! the memory figures of a process.
//!
//! Both refuse any namespace whose name is not a lab's (`mglab-…`), open it
//! with [`Netns::open_not_root`] and enter it in the child before `exec`
//! ([`Netns::command`]): no request is ever sent from the root namespace.
//! Every process started here is killed by pid and reaped: `wrk` when it
//! overruns its hard timeout, `nginx` (master and workers) when its guard
//! is dropped.
//!
//! nginx is Debian's binary extracted into `<repo>/.tools/nginx` by
//! `scripts/common.sh` (`ensure_nginx`), never installed: the package would
//! start a service on :80 in the root namespace. `METAGUARD_NGINX` names
//! another binary.
//!
//! Layout: this module holds what both share (opening a lab namespace,
//! waiting for a listener, reaping); `wrk` runs wrk and parses its report,
//! `nginx` runs the reference proxy, `procstat` reads a process's memory
//! and CPU figures.

mod nginx;
mod procstat;
mod wrk;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use metaguard_sys::netns::Netns;

use crate::registry::NETNS_PREFIX;
use crate::LabError;

pub use self::nginx::*;
pub use self::procstat::*;
pub use self::wrk::*;

/// How long `wrk` may run past its `-d` before it is killed.
pub(super) const WRK_GRACE: Duration = Duration::from_secs(15);
/// How long nginx gets to accept connections after it was started.
pub(super) const NGINX_READY: Duration = Duration::from_secs(5);
/// How long nginx gets to exit after SIGTERM before it is killed.
pub(super) const NGINX_STOP: Duration = Duration::from_secs(3);

/// Opens lab namespace `name`, refusing other names and the root namespace.
pub(super) fn lab_netns(name: &str) -> Result<Netns, LabError> {
    let valid = name
        .strip_prefix(NETNS_PREFIX)
        .is_some_and(|rest| !rest.is_empty() && !rest.contains('/'));
    if !valid {
        return Err(LabError::ProbeOutput(format!(
            "{name:?} is not a lab namespace ({NETNS_PREFIX}<id>-<role>); load is only generated inside a lab"
        )));
    }
    Ok(Netns::open_not_root(
        Path::new(metaguard_sys::netns::NETNS_RUN_DIR).join(name),
    )?)
}

/// Whether something accepts TCP connections on `listen`, asked from a
/// thread inside `ns` (one connect, 200 ms at most).
pub(super) fn accepts(ns: &Netns, listen: SocketAddr) -> Result<bool, LabError> {
    Ok(ns
        .spawn_thread("ready", move || {
            TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_ok()
        })?
        .join()
        .unwrap_or(false))
}

/// Why a server started in a lab namespace did not become ready.
#[derive(Debug)]
pub enum NotReady {
    /// The process exited.
    Exited(std::process::ExitStatus),
    /// Nothing accepted connections in time.
    TimedOut,
    Lab(LabError),
}

/// Waits, `within` at most, until `child` — started inside `ns` — accepts
/// TCP connections on `listen` (asked from inside `ns`) and `ready` holds
/// too.
pub fn wait_accepting(
    ns: &Netns,
    listen: SocketAddr,
    child: &mut Child,
    within: Duration,
    ready: impl Fn() -> bool,
) -> Result<(), NotReady> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(NotReady::Exited(status));
        }
        if accepts(ns, listen).map_err(NotReady::Lab)? && ready() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(NotReady::TimedOut);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process that is killed and reaped when dropped.
#[derive(Debug)]
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Reads a pipe to its end on a thread (so a full pipe never blocks the
/// child while the caller waits for it).
pub(super) fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
}

#[cfg(test)]
mod tests;
