//! Network namespaces: open by path, compare with the root namespace, enter
//! on one thread, or enter in a child process before `exec`.
//!
//! `setns(CLONE_NEWNET)` changes only the calling thread; a socket stays in
//! the namespace it was created in. So servers are run on a dedicated
//! thread that enters first and then creates its sockets, and commands are
//! spawned with the namespace entered in the child ([`Netns::command`]).

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};

/// Where `ip netns add` keeps named namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// Identity of a namespace: device and inode of its nsfs file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NsId {
    pub dev: u64,
    pub ino: u64,
}

impl NsId {
    fn of(path: &Path) -> io::Result<NsId> {
        let m = std::fs::metadata(path)?;
        Ok(NsId {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open network namespace {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot enter network namespace {path}: {source}")]
    Enter { path: PathBuf, source: io::Error },
    #[error("cannot identify the root network namespace (/proc/1/ns/net): {0}")]
    Root(io::Error),
    #[error("{path} is the root network namespace; refusing to use it from the lab")]
    IsRoot { path: PathBuf },
    #[error("this thread is in the root network namespace; the probe refuses to send from it")]
    InRoot,
    #[error("cannot start a thread in network namespace {path}: {source}")]
    Thread { path: PathBuf, source: io::Error },
}

/// The namespace of PID 1: the one no lab traffic may ever come from.
pub fn root_id() -> Result<NsId, NetnsError> {
    NsId::of(Path::new("/proc/1/ns/net")).map_err(NetnsError::Root)
}

/// The namespace of the calling thread.
pub fn current_thread_id() -> io::Result<NsId> {
    NsId::of(Path::new("/proc/thread-self/ns/net"))
}

/// Fails when the calling thread is in the root network namespace. Every
/// lab probe calls this before it sends anything.
pub fn ensure_not_in_root() -> Result<(), NetnsError> {
    let here = current_thread_id().map_err(NetnsError::Root)?;
    if here == root_id()? {
        return Err(NetnsError::InRoot);
    }
    Ok(())
}

/// An open handle on a network namespace.
#[derive(Debug)]
pub struct Netns {
    fd: OwnedFd,
    path: PathBuf,
    id: NsId,
}

impl Netns {
    /// Opens the namespace file at `path` (`/run/netns/NAME`,
    /// `/proc/PID/ns/net`, or a bind mount of one).
    pub fn open(path: impl Into<PathBuf>) -> Result<Netns, NetnsError> {
        let path = path.into();
        let file = File::open(&path).map_err(|source| NetnsError::Open {
            path: path.clone(),
            source,
        })?;
        let m = file.metadata().map_err(|source| NetnsError::Open {
            path: path.clone(),
            source,
        })?;
        Ok(Netns {
            fd: file.into(),
            id: NsId {
                dev: m.dev(),
                ino: m.ino(),
            },
            path,
        })
    }

    /// Opens a namespace created by `ip netns add NAME`.
    pub fn named(name: &str) -> Result<Netns, NetnsError> {
        Self::open(Path::new(NETNS_RUN_DIR).join(name))
    }

    /// Like [`Netns::open`], but refuses the root namespace.
    pub fn open_not_root(path: impl Into<PathBuf>) -> Result<Netns, NetnsError> {
        let ns = Self::open(path)?;
        if ns.id == root_id()? {
            return Err(NetnsError::IsRoot { path: ns.path });
        }
        Ok(ns)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn id(&self) -> NsId {
        self.id
    }

    /// Moves the calling thread into this namespace. Only this thread
    /// changes; sockets it creates afterwards live in the namespace.
    pub fn enter_this_thread(&self) -> Result<(), NetnsError> {
        move_into_link_name_space(self.fd.as_fd(), Some(LinkNameSpaceType::Network)).map_err(|e| {
            NetnsError::Enter {
                path: self.path.clone(),
                source: e.into(),
            }
        })
    }

    /// Runs `f` on a new thread that has entered this namespace first.
    pub fn spawn_thread<F, T>(
        &self,
        name: &str,
        f: F,
    ) -> Result<std::thread::JoinHandle<T>, NetnsError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let fd = self.fd.try_clone().map_err(|source| NetnsError::Thread {
            path: self.path.clone(),
            source,
        })?;
        let ns = Netns {
            fd,
            path: self.path.clone(),
            id: self.id,
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let entered = ns.enter_this_thread();
                let ok = entered.is_ok();
                let _ = tx.send(entered);
                if !ok {
                    // The caller gets the error from the channel; `f` must
                    // never run outside the namespace.
                    std::process::abort();
                }
                f()
            })
            .map_err(|source| NetnsError::Thread {
                path: self.path.clone(),
                source,
            })?;
        match rx.recv() {
            Ok(Ok(())) => Ok(handle),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(NetnsError::Thread {
                path: self.path.clone(),
                source: io::Error::other("namespace thread died before entering"),
            }),
        }
    }

    /// Makes `cmd` run inside this namespace, entered in the child before
    /// `exec`, so the program's first instruction already runs there.
    pub fn command(&self, cmd: &mut Command) -> Result<(), NetnsError> {
        let fd = self.fd.try_clone().map_err(|source| NetnsError::Open {
            path: self.path.clone(),
            source,
        })?;
        // SAFETY: the closure runs in the forked child before exec. It makes
        // one raw setns(2) on a descriptor it owns, which is
        // async-signal-safe; it allocates nothing (the error path builds an
        // io::Error from an errno, no heap), takes no locks and touches no
        // state shared with the parent's other threads.
        unsafe {
            cmd.pre_exec(move || {
                move_into_link_name_space(fd.as_fd(), Some(LinkNameSpaceType::Network))?;
                Ok(())
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_namespace_is_identified() {
        let a = current_thread_id().expect("own netns");
        let b = NsId::of(Path::new("/proc/self/ns/net")).expect("netns");
        assert_eq!(a, b);
    }

    #[test]
    fn missing_namespace_names_the_path() {
        let e = Netns::named("metaguard-no-such-namespace").expect_err("missing");
        assert!(
            e.to_string()
                .contains("/run/netns/metaguard-no-such-namespace"),
            "{e}"
        );
    }
}
