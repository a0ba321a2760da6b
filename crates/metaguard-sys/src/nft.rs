//! Running `nft`: load a script as one transaction, read a table back as
//! JSON, delete a table — in a chosen network namespace.
//!
//! `nft` resolves `socket cgroupv2` paths (when loading) and cgroup ids
//! (when listing) relative to `/sys/fs/cgroup`. On hosts where the cgroup2
//! hierarchy is mounted elsewhere (hybrid hosts: `/sys/fs/cgroup/unified`),
//! `nft` runs in a private mount namespace of its own in which the
//! hierarchy is bind-mounted at `/sys/fs/cgroup`. The host's mounts are not
//! touched: the bind exists only for that one `nft` process.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use rustix::mount::{mount_bind, mount_change, MountPropagationFlags};
use rustix::thread::{unshare_unsafe, UnshareFlags};

use crate::netns::Netns;

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error(transparent)]
    Tool(#[from] crate::tool::ToolError),
    #[error("cannot run nft in {netns}: {source}")]
    Spawn {
        netns: String,
        source: std::io::Error,
    },
    #[error("nft rejected the transaction in {netns}: {stderr}")]
    Rejected { netns: String, stderr: String },
    #[error("nft {action} failed in {netns}: {stderr}")]
    Failed {
        action: &'static str,
        netns: String,
        stderr: String,
    },
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
}

/// Runs `nft` with the cgroup2 view it needs.
#[derive(Debug, Clone)]
pub struct Nft {
    exe: PathBuf,
    /// Where cgroup2 is mounted, when that is not `/sys/fs/cgroup`.
    cgroup2_elsewhere: Option<PathBuf>,
}

const SYS_FS_CGROUP: &str = "/sys/fs/cgroup";

impl Nft {
    /// `cgroup2_mount`: where the hierarchy is mounted (None when unknown:
    /// cgroupv2 rules then resolve against `/sys/fs/cgroup` as nft does).
    pub fn new(cgroup2_mount: Option<&Path>) -> Result<Nft, NftError> {
        let exe = crate::tool::require("nft")?;
        Ok(Nft {
            exe,
            cgroup2_elsewhere: cgroup2_mount
                .filter(|m| *m != Path::new(SYS_FS_CGROUP))
                .map(Path::to_path_buf),
        })
    }

    /// `nft monitor` (text: one line per change, each transaction closed by
    /// `# new generation N by process PID (NAME)`) in `ns`, for the daemon
    /// to read; stdout piped, stdin and stderr null.
    pub fn monitor_command(&self, ns: Option<&Netns>) -> Result<Command, NftError> {
        let mut cmd = self.command(ns)?;
        cmd.arg("monitor")
            .stdin(Stdio::null())
            .stderr(Stdio::null());
        if let Some(ns) = ns {
            ns.command(&mut cmd)?;
        }
        Ok(cmd)
    }

    fn command(&self, ns: Option<&Netns>) -> Result<Command, NftError> {
        let mut cmd = Command::new(&self.exe);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("LC_ALL", "C");
        if let Some(src) = &self.cgroup2_elsewhere {
            let c_path = |p: &[u8]| {
                CString::new(p).map_err(|_| NftError::Spawn {
                    netns: where_(ns),
                    source: std::io::Error::other("a mount path holds a NUL byte"),
                })
            };
            let src = c_path(src.as_os_str().as_bytes())?;
            let dst = c_path(SYS_FS_CGROUP.as_bytes())?;
            let root = c_path(b"/")?;
            // SAFETY: runs in the forked child before exec, where only this
            // thread exists, so unsharing the mount namespace (and with it
            // the fs struct) cannot affect other threads. The closure only
            // makes raw syscalls (unshare, mount) on C strings prepared
            // before the fork: no allocation, no locks.
            unsafe {
                cmd.pre_exec(move || {
                    unshare_unsafe(UnshareFlags::NEWNS)?;
                    mount_change(
                        root.as_c_str(),
                        MountPropagationFlags::REC | MountPropagationFlags::PRIVATE,
                    )?;
                    mount_bind(src.as_c_str(), dst.as_c_str())?;
                    Ok(())
                });
            }
        }
        Ok(cmd)
    }

    fn run(
        &self,
        ns: Option<&Netns>,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<(bool, String, String), NftError> {
        self.run_pid(ns, args, stdin)
            .map(|(ok, _, out, err)| (ok, out, err))
    }

    fn run_pid(
        &self,
        ns: Option<&Netns>,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<(bool, u32, String, String), NftError> {
        let mut cmd = self.command(ns)?;
        cmd.args(args);
        let out = crate::tool::run(cmd, ns, stdin)?;
        Ok((
            out.status.success(),
            out.pid,
            out.stdout,
            out.stderr.trim().to_string(),
        ))
    }

    /// Loads `script` with `nft -f -`: one transaction, all or nothing.
    pub fn apply(&self, ns: Option<&Netns>, script: &str) -> Result<(), NftError> {
        self.apply_as(ns, script).map(drop)
    }

    /// Like [`Nft::apply`], returning the pid of the `nft` process, which
    /// `nft monitor` names as the author of the transaction.
    pub fn apply_as(&self, ns: Option<&Netns>, script: &str) -> Result<u32, NftError> {
        let (ok, pid, _, stderr) = self.run_pid(ns, &["-f", "-"], Some(script))?;
        if ok {
            Ok(pid)
        } else {
            Err(NftError::Rejected {
                netns: where_(ns),
                stderr,
            })
        }
    }

    /// `nft -c -f -`: checks a script against the kernel without loading it.
    pub fn check(&self, ns: Option<&Netns>, script: &str) -> Result<(), NftError> {
        let (ok, _, stderr) = self.run(ns, &["-c", "-f", "-"], Some(script))?;
        if ok {
            Ok(())
        } else {
            Err(NftError::Rejected {
                netns: where_(ns),
                stderr,
            })
        }
    }

    /// Runs a command about one table; `None` when the table does not
    /// exist (nft's "No such file or directory"), its output otherwise.
    fn on_table(
        &self,
        ns: Option<&Netns>,
        args: &[&str],
        action: &'static str,
    ) -> Result<Option<String>, NftError> {
        let (ok, stdout, stderr) = self.run(ns, args, None)?;
        if ok {
            Ok(Some(stdout))
        } else if stderr.contains("No such file or directory") {
            Ok(None)
        } else {
            Err(NftError::Failed {
                action,
                netns: where_(ns),
                stderr,
            })
        }
    }

    /// `nft -j list table FAMILY NAME`, or `None` when there is no such
    /// table.
    pub fn list_table_json(
        &self,
        ns: Option<&Netns>,
        family: &str,
        table: &str,
    ) -> Result<Option<String>, NftError> {
        self.on_table(ns, &["-j", "list", "table", family, table], "list table")
    }

    /// `nft list table FAMILY NAME` as text, or `None` when absent.
    pub fn list_table_text(
        &self,
        ns: Option<&Netns>,
        family: &str,
        table: &str,
    ) -> Result<Option<String>, NftError> {
        self.on_table(ns, &["list", "table", family, table], "list table")
    }

    /// Deletes a table; `false` when it did not exist.
    pub fn delete_table(
        &self,
        ns: Option<&Netns>,
        family: &str,
        table: &str,
    ) -> Result<bool, NftError> {
        Ok(self
            .on_table(ns, &["delete", "table", family, table], "delete table")?
            .is_some())
    }
}

fn where_(ns: Option<&Netns>) -> String {
    crate::tool::where_(ns)
}
