//! The cached root file system the machines boot from.

use std::path::{Path, PathBuf};

use crate::LabError;

/// The file `scripts/init-rootfs` writes last, naming what it installed.
const STAMP: &str = ".metaguard-init-rootfs";

/// A Debian root file system with systemd, built by `scripts/init-rootfs`.
#[derive(Debug, Clone)]
pub struct Rootfs {
    dir: PathBuf,
}

impl Rootfs {
    /// `<target dir>/init-lab/rootfs`.
    pub fn default_dir(target_dir: &Path) -> PathBuf {
        target_dir.join("init-lab").join("rootfs")
    }

    /// The rootfs at `dir`, which must be complete (its stamp written).
    pub fn open(dir: &Path) -> Result<Rootfs, LabError> {
        if !dir.join(STAMP).is_file() || !dir.join("usr/lib/systemd/systemd").is_file() {
            return Err(LabError::Machine(format!(
                "no machine root file system at {} (scripts/init-rootfs builds it once, with mmdebstrap; ./scripts/test runs it)",
                dir.display()
            )));
        }
        Ok(Rootfs {
            dir: dir.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// What the stamp says was installed.
    pub fn describe(&self) -> String {
        std::fs::read_to_string(self.dir.join(STAMP)).unwrap_or_default()
    }
}
