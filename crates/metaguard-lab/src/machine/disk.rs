//! A machine's disk: an overlay mount whose lower layer is the cached
//! rootfs (never written) and whose upper layer holds everything the
//! machine changes, across reboots. Recorded in the lab registry before it
//! is mounted, so a crash leaves nothing behind.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

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
        let record = LabRecord {
            id: id.clone(),
            owner_pid: me.pid,
            owner_start_time: me.start_time,
            netns: Vec::new(),
            cgroup_mount: None,
            cgroup_root: None,
            etc_netns: Vec::new(),
            work_dir: Some(dir.clone()),
            mounts: vec![root.clone()],
            extra_cgroup_trees: Vec::new(),
        };
        registry::record(state_dir, &record).map_err(io("write lab record in", state_dir))?;
        let disk = Disk {
            record,
            state_dir: state_dir.to_path_buf(),
            root: root.clone(),
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
