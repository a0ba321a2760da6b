//! A machine's disk: an overlay mount whose lower layer is the cached
//! rootfs (never written) and whose upper layer holds everything the
//! machine changes, across reboots. Recorded in the lab registry before it
//! is mounted, so a crash leaves nothing behind.
//!
//! The disk also owns the machine's cgroup, `metaguard-lab/<disk id>/machine`,
//! so that its paths stay the same across reboots (a config on the disk
//! may name them) and everything that ran in it is ended with the disk.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use metaguard_sys::cgroup::Cgroup2;
use metaguard_sys::process::ProcessId;

use super::Rootfs;
use crate::registry::{self, LabRecord};
use crate::LabError;

/// An overlay root on a rootfs. Dropping it unmounts and removes it.
#[derive(Debug)]
pub struct Disk {
    record: LabRecord,
    state_dir: PathBuf,
    root: PathBuf,
    cgroup2: Cgroup2,
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> LabError + 'a {
    move |source| LabError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

impl Disk {
    /// A new disk on `rootfs`, its layers under `state_dir`.
    pub fn new(rootfs: &Rootfs, state_dir: &Path) -> Result<Disk, LabError> {
        let me = ProcessId::current()
            .ok_or_else(|| LabError::Machine("cannot read this process's start time".into()))?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let id = format!("disk-{:x}-{:x}", me.pid, nanos);
        let dir = state_dir.join(&id);
        let root = dir.join("root");
        let cgroup2 = Cgroup2::discover(Path::new("/proc/self/mountinfo"))?;
        let cgroup_root = format!("metaguard-lab/{id}");
        let record = LabRecord {
            id: id.clone(),
            owner_pid: me.pid,
            owner_start_time: me.start_time,
            netns: Vec::new(),
            cgroup_mount: Some(cgroup2.mount().to_path_buf()),
            etc_netns: Vec::new(),
            work_dir: Some(dir.clone()),
            mounts: vec![root.clone()],
            // nspawn mirrors its cgroup in the v1 name=systemd hierarchy on
            // hybrid hosts.
            extra_cgroup_trees: named_systemd_mount()
                .map(|m| m.join(&cgroup_root))
                .into_iter()
                .collect(),
            cgroup_root: Some(cgroup_root),
        };
        registry::record(state_dir, &record).map_err(io("write lab record in", state_dir))?;
        let disk = Disk {
            record,
            state_dir: state_dir.to_path_buf(),
            root: root.clone(),
            cgroup2,
        };
        for d in ["upper", "work", "root"] {
            std::fs::create_dir_all(dir.join(d)).map_err(io("create", &dir))?;
        }
        let data = format!(
            "lowerdir={},upperdir={},workdir={}",
            rootfs.path().display(),
            dir.join("upper").display(),
            dir.join("work").display()
        );
        let data = std::ffi::CString::new(data)
            .map_err(|_| LabError::Machine("overlay options contain a NUL byte".into()))?;
        rustix::mount::mount(
            "overlay",
            &root,
            "overlay",
            rustix::mount::MountFlags::empty(),
            Some(data.as_c_str()),
        )
        .map_err(|e| LabError::Io {
            what: "mount an overlay on",
            path: root.clone(),
            source: e.into(),
        })?;
        Ok(disk)
    }

    /// The machine's cgroup (relative to the cgroup2 root), the same on
    /// every boot of this disk.
    pub fn machine_cgroup(&self) -> String {
        format!(
            "{}/machine",
            self.record.cgroup_root.as_deref().unwrap_or_default()
        )
    }

    pub fn cgroup2(&self) -> &Cgroup2 {
        &self.cgroup2
    }

    /// The machine's `/`, as seen from outside.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `path` (absolute, as the machine names it) on this disk.
    pub fn path(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    /// Writes a file (creating its directory) with `mode`.
    pub fn write(&self, path: &str, contents: &str, mode: u32) -> Result<(), LabError> {
        let p = self.path(path);
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        }
        std::fs::write(&p, contents).map_err(io("write", &p))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).map_err(io("chmod", &p))
    }

    /// A symlink (replacing what is there): unit enablement and masking.
    pub fn symlink(&self, path: &str, target: &str) -> Result<(), LabError> {
        let p = self.path(path);
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir).map_err(io("create", dir))?;
        }
        let _ = std::fs::remove_file(&p);
        std::os::unix::fs::symlink(target, &p).map_err(io("symlink", &p))
    }

    pub fn read(&self, path: &str) -> Result<String, LabError> {
        let p = self.path(path);
        std::fs::read_to_string(&p).map_err(io("read", &p))
    }

    pub fn exists(&self, path: &str) -> bool {
        self.path(path).symlink_metadata().is_ok()
    }

    pub fn remove(&self, path: &str) -> Result<(), LabError> {
        let p = self.path(path);
        match std::fs::remove_file(&p) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("remove", &p)(e)),
            _ => Ok(()),
        }
    }
}

/// The v1 `name=systemd` hierarchy's mount, on hybrid hosts.
fn named_systemd_mount() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        let mut post = post.split_whitespace();
        let fstype = post.next()?;
        let _source = post.next()?;
        let opts = post.next().unwrap_or("");
        (fstype == "cgroup" && opts.split(',').any(|o| o == "name=systemd"))
            .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))
            .flatten()
    })
}

impl Drop for Disk {
    fn drop(&mut self) {
        for p in registry::teardown(&self.state_dir, &self.record) {
            eprintln!(
                "metaguard machine disk {}: clean-up problem: {p}",
                self.record.id
            );
        }
    }
}
