//! The cgroup v2 hierarchy: where it is mounted, cgroup ids, and moving a
//! child process into a cgroup.
//!
//! Hosts differ: Amazon Linux 2023 and Bottlerocket mount cgroup2 at
//! `/sys/fs/cgroup`; hybrid hosts at `/sys/fs/cgroup/unified`; some have it
//! nowhere. The mount is found in `/proc/self/mountinfo`, never assumed.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot read {path}: {source}")]
    Mountinfo { path: PathBuf, source: io::Error },
    #[error("the cgroup v2 hierarchy is not mounted (no cgroup2 line in {path})")]
    NotMounted { path: PathBuf },
    #[error("cgroup {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// A mounted cgroup v2 hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup2 {
    mount: PathBuf,
}

/// Mount points of every `cgroup2` line in a mountinfo text, in order.
pub fn cgroup2_mounts(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            // "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SRC SUPER"
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let root = left.split_whitespace().nth(3)?;
            let mount = left.split_whitespace().nth(4)?;
            // Only mounts of the hierarchy's root give the whole tree.
            (fstype == "cgroup2" && root == "/").then(|| PathBuf::from(unescape_mountinfo(mount)))
        })
        .collect()
}

/// The inode of the initial cgroup namespace (`PROC_CGROUP_INIT_INO`,
/// include/linux/proc_ns.h): the host's own.
pub const INIT_CGROUP_NS_INO: u64 = 0xEFFF_FFFB;

/// Whether this process sees the cgroup hierarchy from the host's cgroup
/// namespace. In another one (a container's private cgroup namespace, a
/// systemd-nspawn machine) a cgroup2 mount's root is the namespace's root,
/// so paths under it do not tell a cgroup's level counted from the real
/// root — the level nft's `socket cgroupv2 level N` and BPF's ancestor
/// helpers use.
pub fn in_initial_namespace() -> io::Result<bool> {
    Ok(std::fs::metadata("/proc/self/ns/cgroup")?.ino() == INIT_CGROUP_NS_INO)
}

/// The cgroup v2 path in the text of a `/proc/<pid>/cgroup` (its `0::`
/// line), relative to the hierarchy's root: `""` for the root itself.
pub fn v2_path(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().trim_matches('/'))
}

/// [`v2_path`] of process `pid`, from `<proc_root>/<pid>/cgroup`.
pub fn of_process(proc_root: &Path, pid: impl std::fmt::Display) -> Option<String> {
    let text = std::fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup")).ok()?;
    v2_path(&text).map(str::to_string)
}

/// The cgroup the host's init runs below, relative to the hierarchy's
/// root, from `<proc>/1/cgroup`: the parent of systemd's `init.scope`
/// (`""` when that is the root, as on a host booted normally); `""` too
/// when init is not systemd or its cgroup cannot be read.
pub fn init_root(proc: &Path) -> String {
    of_process(proc, 1)
        .as_deref()
        .map(init_root_of)
        .unwrap_or_default()
}

/// [`init_root`] for init's cgroup path (as [`v2_path`] gives it).
fn init_root_of(init_cgroup: &str) -> String {
    match init_cgroup.strip_suffix("init.scope") {
        Some(root) if root.is_empty() || root.ends_with('/') => {
            root.trim_end_matches('/').to_string()
        }
        _ => String::new(),
    }
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Cgroup2 {
    /// A hierarchy known to be mounted at `mount`.
    pub fn at(mount: impl Into<PathBuf>) -> Cgroup2 {
        Cgroup2 {
            mount: mount.into(),
        }
    }

    /// Finds the hierarchy through a mountinfo file (normally
    /// `/proc/self/mountinfo`). Prefers `/sys/fs/cgroup` when it is mounted
    /// in several places.
    pub fn discover(mountinfo: &Path) -> Result<Cgroup2, CgroupError> {
        let text = std::fs::read_to_string(mountinfo).map_err(|source| CgroupError::Mountinfo {
            path: mountinfo.to_path_buf(),
            source,
        })?;
        let mounts = cgroup2_mounts(&text);
        let best = mounts
            .iter()
            .find(|m| m.as_path() == Path::new("/sys/fs/cgroup"))
            .or_else(|| mounts.first())
            .ok_or_else(|| CgroupError::NotMounted {
                path: mountinfo.to_path_buf(),
            })?;
        Ok(Cgroup2::at(best.clone()))
    }

    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// Absolute path of `rel` (relative to the hierarchy's root).
    pub fn path(&self, rel: &str) -> PathBuf {
        self.mount.join(rel.trim_matches('/'))
    }

    fn io(&self, rel: &str) -> impl Fn(io::Error) -> CgroupError + '_ {
        let path = self.path(rel);
        move |source| CgroupError::Io {
            path: path.clone(),
            source,
        }
    }

    /// The cgroup id the kernel uses (`socket cgroupv2`, BPF): the inode
    /// number of the cgroup's directory.
    pub fn id(&self, rel: &str) -> Result<u64, CgroupError> {
        Ok(std::fs::metadata(self.path(rel))
            .map_err(self.io(rel))?
            .ino())
    }

    pub fn exists(&self, rel: &str) -> bool {
        self.path(rel).join("cgroup.procs").exists()
    }

    /// Creates `rel` and its missing parents.
    pub fn create(&self, rel: &str) -> Result<(), CgroupError> {
        std::fs::create_dir_all(self.path(rel)).map_err(self.io(rel))
    }

    /// Removes `rel` (which must hold no processes) and then each parent up
    /// to, but not including, `keep_above`'s depth: `remove("a/b/c", 1)`
    /// removes a/b/c and a/b. Parents that are not empty are left.
    pub fn remove(&self, rel: &str, keep_depth: usize) -> Result<(), CgroupError> {
        let segs: Vec<&str> = rel.trim_matches('/').split('/').collect();
        for depth in (keep_depth + 1..=segs.len()).rev() {
            let sub = segs[..depth].join("/");
            match std::fs::remove_dir(self.path(&sub)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) if depth < segs.len() && e.raw_os_error() == Some(libc::EBUSY) => break,
                Err(e) => return Err(self.io(&sub)(e)),
            }
        }
        Ok(())
    }

    /// Pids of the processes in `rel` (not in its descendants).
    pub fn pids(&self, rel: &str) -> Result<Vec<u32>, CgroupError> {
        let p = self.path(rel).join("cgroup.procs");
        let text = std::fs::read_to_string(&p).map_err(self.io(rel))?;
        Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
    }

    /// `cgroup.procs` of `rel`, open for writing: hand it to
    /// [`crate::netns::Netns::command`] to start a child inside the cgroup.
    pub fn procs_writer(&self, rel: &str) -> Result<OwnedFd, CgroupError> {
        let p = self.path(rel).join("cgroup.procs");
        let f = OpenOptions::new()
            .write(true)
            .open(&p)
            .map_err(self.io(rel))?;
        Ok(f.into())
    }
}

/// Makes `cmd`'s child move itself into the cgroup whose `cgroup.procs` is
/// open in `procs` (see [`Cgroup2::procs_writer`]) before it executes, so
/// every socket the program creates is tagged with that cgroup.
pub fn enter_before_exec(cmd: &mut std::process::Command, procs: OwnedFd) {
    use std::os::unix::process::CommandExt;
    // SAFETY: runs in the forked child before exec and performs exactly one
    // raw write(2) on a descriptor the closure owns: async-signal-safe, no
    // allocation, no locks, nothing shared with the parent's other threads.
    unsafe {
        cmd.pre_exec(move || {
            // Writing "0" moves the writing process (this child).
            rustix::io::write(&procs, b"0")?;
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_root_is_the_parent_of_systemds_init_scope() {
        let root = |text: &str| v2_path(text).map(init_root_of).unwrap_or_default();
        assert_eq!(root("0::/init.scope\n"), "");
        assert_eq!(
            root("0::/metaguard-lab/disk-1/machine/payload/init.scope\n"),
            "metaguard-lab/disk-1/machine/payload"
        );
        assert_eq!(root("9:name=systemd:/\n0::/\n"), "");
        assert_eq!(root("0::/system.slice/foo.service\n"), "");
        assert_eq!(root("0::/system.slice/notinit.scope\n"), "");
        assert_eq!(root(""), "");
    }

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
90 23 0:38 /sub /mnt/partial rw - cgroup2 cgroup2 rw
91 23 0:38 / /run/a\\040b rw shared:5 - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_hybrid_and_escaped_mounts_but_not_partial_ones() {
        assert_eq!(
            cgroup2_mounts(HYBRID),
            vec![
                PathBuf::from("/sys/fs/cgroup/unified"),
                PathBuf::from("/run/a b")
            ]
        );
    }

    #[test]
    fn prefers_sys_fs_cgroup() {
        let dir = std::env::temp_dir().join(format!("mg-mountinfo-{}", std::process::id()));
        std::fs::write(
            &dir,
            "1 0 0:1 / /x rw - cgroup2 c rw\n2 0 0:1 / /sys/fs/cgroup rw - cgroup2 c rw\n",
        )
        .expect("write");
        let c = Cgroup2::discover(&dir).expect("found");
        assert_eq!(c.mount(), Path::new("/sys/fs/cgroup"));
        std::fs::write(&dir, "1 0 0:1 / /x rw - tmpfs c rw\n").expect("write");
        let e = Cgroup2::discover(&dir).expect_err("none");
        assert!(e.to_string().contains("not mounted"), "{e}");
        let _ = std::fs::remove_file(&dir);
    }
}
