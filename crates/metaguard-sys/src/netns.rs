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

/// `statfs`'s type of the namespace file system (nsfs), from
/// include/uapi/linux/magic.h.
const NSFS_MAGIC: u64 = 0x6e73_6673;

/// Identity of a namespace: device and inode of its nsfs file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NsId {
    pub dev: u64,
    pub ino: u64,
}

impl NsId {
    /// The namespace a namespace file names (`/run/netns/NAME`,
    /// `/proc/PID/ns/net`), by the file's device and inode.
    pub fn of(path: &Path) -> io::Result<NsId> {
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
    #[error("cannot identify the root network namespace: {0}")]
    Root(io::Error),
    #[error("{path} is the root network namespace; refusing to use it from the lab")]
    IsRoot { path: PathBuf },
    #[error("this thread is in the root network namespace; the probe refuses to send from it")]
    InRoot,
    #[error("cannot start a thread in network namespace {path}: {source}")]
    Thread { path: PathBuf, source: io::Error },
    #[error("cannot read the cookie of network namespace {path}: {source}")]
    Cookie { path: PathBuf, source: io::Error },
}

/// The cookie of the calling thread's network namespace: `SO_NETNS_COOKIE`
/// (Linux 5.14) of a fresh UDP socket, the value the BPF programs'
/// `bpf_get_netns_cookie` gives for sockets of that namespace.
pub fn current_cookie() -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    let sock = rustix::net::socket(
        rustix::net::AddressFamily::INET,
        rustix::net::SocketType::DGRAM,
        None,
    )?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `sock` is an open socket owned for the whole call; `cookie`
    // and `len` are valid, writable and live across it, and `len` says
    // exactly how many bytes `cookie` holds, so the kernel writes at most
    // that many.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Inode of the kernel's initial network namespace (`init_net`): fixed by
/// the kernel (`PROC_NET_INIT_INO` in include/linux/proc_ns.h).
pub const INIT_NET_INO: u64 = 0xEFFF_FFF9;

/// The namespaces no lab traffic may ever come from: the kernel's initial
/// one, and PID 1's (they differ inside a container). `/proc/1/ns/net` can
/// be unreadable (no ptrace access to PID 1); the initial namespace is
/// then recognised by its fixed inode on the nsfs device.
pub fn root_ids() -> Result<Vec<NsId>, NetnsError> {
    let own = NsId::of(Path::new("/proc/self/ns/net")).map_err(NetnsError::Root)?;
    let mut ids = vec![NsId {
        dev: own.dev,
        ino: INIT_NET_INO,
    }];
    match NsId::of(Path::new("/proc/1/ns/net")) {
        Ok(pid1) => ids.push(pid1),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {}
        Err(e) => return Err(NetnsError::Root(e)),
    }
    Ok(ids)
}

/// Whether `id` is a root namespace (see [`root_ids`]).
pub fn is_root(id: NsId) -> Result<bool, NetnsError> {
    Ok(root_ids()?.contains(&id))
}

/// The namespace of the calling thread.
pub fn current_thread_id() -> io::Result<NsId> {
    NsId::of(Path::new("/proc/thread-self/ns/net"))
}

/// Fails when the calling thread is in a root network namespace. Every
/// lab probe calls this before it sends anything.
pub fn ensure_not_in_root() -> Result<(), NetnsError> {
    let here = current_thread_id().map_err(NetnsError::Root)?;
    if is_root(here)? {
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

impl AsFd for Netns {
    /// The namespace file's descriptor (for `RTM_GETNSID`).
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Netns {
    /// Opens the namespace file at `path` (`/run/netns/NAME`,
    /// `/proc/PID/ns/net`, or a bind mount of one). Any file opens (the
    /// engine's tests stand namespaces in with plain files); entering one
    /// that is no namespace fails, saying so ([`Netns::enter_this_thread`]).
    pub fn open(path: impl Into<PathBuf>) -> Result<Netns, NetnsError> {
        let path = path.into();
        let open_err = |source| NetnsError::Open {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(open_err)?;
        let m = file.metadata().map_err(open_err)?;
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

    /// A new, empty network namespace held only by the returned handle: it
    /// disappears when the handle (and anything running in it) is gone.
    /// Used to ask the kernel what a ruleset becomes once loaded, without
    /// touching any real namespace.
    pub fn new_anonymous() -> Result<Netns, NetnsError> {
        let path = PathBuf::from("<scratch namespace>");
        let err = |source: io::Error| NetnsError::Thread {
            path: PathBuf::from("<scratch namespace>"),
            source,
        };
        let handle = std::thread::Builder::new()
            .name("netns-scratch".into())
            .spawn(|| -> io::Result<(OwnedFd, NsId)> {
                // SAFETY: CLONE_NEWNET changes only this thread's network
                // namespace; it does not unshare the file table, so file
                // descriptors stay valid and shared with other threads (the
                // hazard `unshare_unsafe` documents is CLONE_FILES).
                unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET) }?;
                let file = File::open("/proc/thread-self/ns/net")?;
                let m = file.metadata()?;
                Ok((
                    file.into(),
                    NsId {
                        dev: m.dev(),
                        ino: m.ino(),
                    },
                ))
            })
            .map_err(err)?;
        let (fd, id) = handle
            .join()
            .map_err(|_| err(io::Error::other("scratch namespace thread panicked")))?
            .map_err(err)?;
        Ok(Netns { fd, path, id })
    }

    /// Like [`Netns::open`], but refuses the root namespace.
    pub fn open_not_root(path: impl Into<PathBuf>) -> Result<Netns, NetnsError> {
        let ns = Self::open(path)?;
        if is_root(ns.id)? {
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
            // EINVAL for a file that is no namespace: say which it is. A
            // bind mount whose namespace was unmounted (a container or
            // task that just stopped) leaves an empty file that opens fine.
            let gone = rustix::fs::fstatfs(&self.fd).is_ok_and(|fs| fs.f_type as u64 != NSFS_MAGIC);
            NetnsError::Enter {
                path: self.path.clone(),
                source: if gone {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "not a namespace file (its namespace is gone: a container or task that \
                         stopped leaves the empty file its bind mount was on)",
                    )
                } else {
                    e.into()
                },
            }
        })
    }

    /// The kernel's cookie for this namespace: what `bpf_get_netns_cookie`
    /// gives the BPF programs for a socket in it. Read on a thread that
    /// enters the namespace (see [`current_cookie`]).
    pub fn cookie(&self) -> Result<u64, NetnsError> {
        let thread = self.spawn_thread("mg-netns-cookie", current_cookie)?;
        thread
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("cookie thread panicked")))
            .map_err(|source| NetnsError::Cookie {
                path: self.path.clone(),
                source,
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
                    // never run outside the namespace. Ends this thread
                    // only (no panic message: `resume_unwind` skips the
                    // hook); nobody joins it, as the caller gets `Err`.
                    std::panic::resume_unwind(Box::new("did not enter the namespace"));
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
    fn a_scratch_namespace_is_not_root_and_the_initial_one_is() {
        if !crate::process::is_root() {
            eprintln!("skipped: creating a network namespace needs root");
            return;
        }
        let scratch = Netns::new_anonymous().expect("scratch netns");
        assert!(!is_root(scratch.id()).expect("ids"));
        let here = current_thread_id().expect("own netns");
        if here.ino == INIT_NET_INO {
            assert!(is_root(here).expect("ids"));
        }
    }

    #[test]
    fn a_thread_that_cannot_enter_ends_alone_and_the_caller_gets_the_error() {
        // Before: the thread aborted the whole process (the daemon died
        // with SIGABRT when a container stopped under its BPF map update).
        // What a stopped container's /run/docker/netns/ID is once its
        // namespace is unmounted: an empty regular file.
        let f = std::env::temp_dir().join(format!("metaguard-no-netns-{}", std::process::id()));
        std::fs::write(&f, b"").expect("file");
        let ns = Netns::open(&f).expect("any file opens");
        let _ = std::fs::remove_file(&f);
        let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let r = ran.clone();
        let e = ns
            .spawn_thread("mg-test-enter", move || {
                r.store(true, std::sync::atomic::Ordering::SeqCst)
            })
            .expect_err("setns on a plain file fails");
        assert!(matches!(e, NetnsError::Enter { .. }), "{e}");
        let text = format!(
            "{e}: {}",
            std::error::Error::source(&e)
                .map(ToString::to_string)
                .unwrap_or_default()
        );
        assert!(text.contains(&f.display().to_string()), "{text}");
        assert!(text.contains("not a namespace file"), "{text}");
        assert!(ns.cookie().is_err());
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(
            !ran.load(std::sync::atomic::Ordering::SeqCst),
            "f ran outside"
        );
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
