//! The host seam: everything the enforcement engine and the daemon's
//! reconcile loop ask of the kernel, behind one small trait.
//!
//! [`RealHost`] does it (nft, rtnetlink, `/proc/sys`, `conntrack`);
//! `fake::FakeHost` (feature `fake`, or this crate's tests) records every
//! call in order, keeps tables, routing, addresses and sysctls in memory and
//! fails the calls a test names — so the engine's order of operations is
//! unit-tested without root, and the real kernel is tested in the lab.
//!
//! Namespaces are entered by the implementation: `ns` `None` is the
//! calling thread's own (the host's, for the daemon).

use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::netns::{Netns, NetnsError, NsId};
use crate::nft::{Nft, NftError};
use crate::routing::Routing;
use crate::tool::ToolError;

#[cfg(any(test, feature = "fake"))]
pub mod fake;

/// Where procfs is mounted on a real host.
pub const PROC: &str = "/proc";

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(transparent)]
    Nft(#[from] NftError),
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("cannot {what} (rtnetlink): {source}")]
    Netlink { what: String, source: io::Error },
    #[error("cannot {action} {path}: {source}")]
    Sysctl {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("conntrack -D in {netns} failed: {stderr}")]
    Conntrack { netns: String, stderr: String },
    /// Only from the fake: a failure a test asked for.
    #[error("{call}: failed (injected by the test)")]
    Injected { call: String },
}

/// Which form `nft list table` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listing {
    Json,
    Text,
}

/// What the engine asks of the host.
///
/// `&dyn Host` rather than a type parameter: every call starts a process
/// or talks netlink, so dispatch costs nothing measurable, and `Engine`,
/// the daemon and the CLI keep one concrete type each.
pub trait Host: std::fmt::Debug + Send + Sync {
    /// Where procfs is mounted (`/proc` on a real host).
    fn proc_root(&self) -> &Path;

    /// The calling thread's network namespace.
    fn own_netns(&self) -> Result<NsId, HostError>;
    /// Opens a namespace file (to enter it for later calls).
    fn open_netns(&self, path: &Path) -> Result<Netns, HostError>;
    /// A new, empty namespace that goes away with its handle.
    fn scratch_netns(&self) -> Result<Netns, HostError>;

    /// `nft -c -f -`: whether `script` would load, changing nothing.
    fn nft_check(&self, ns: Option<&Netns>, script: &str) -> Result<(), HostError>;
    /// `nft -f -`: one transaction; returns the pid that committed it.
    fn nft_apply(&self, ns: Option<&Netns>, script: &str) -> Result<u32, HostError>;
    /// `nft [-j] list table`, `None` when there is no such table.
    fn nft_list(
        &self,
        ns: Option<&Netns>,
        family: &str,
        table: &str,
        form: Listing,
    ) -> Result<Option<String>, HostError>;
    /// `nft delete table`; `false` when it did not exist.
    fn nft_delete(&self, ns: Option<&Netns>, family: &str, table: &str) -> Result<bool, HostError>;
    /// The `nft monitor` command for `ns` (stdout piped), for the daemon.
    fn nft_monitor(&self, ns: Option<&Netns>) -> Result<Command, HostError>;

    /// The addresses on this namespace's `lo`.
    fn lo_addresses(&self) -> Result<Vec<IpAddr>, HostError>;
    /// Deletes a host address from `lo`.
    fn lo_address_delete(&self, addr: IpAddr) -> Result<(), HostError>;
    /// Whether this namespace has the policy-routing object now.
    fn routing_present(&self, r: &Routing) -> Result<bool, HostError>;
    fn routing_add(&self, r: &Routing) -> Result<(), HostError>;
    fn routing_delete(&self, r: &Routing) -> Result<(), HostError>;

    /// A sysctl by its dotted name (`net.ipv4.tcp_fwmark_accept`), read
    /// under [`Host::proc_root`]; trimmed.
    fn sysctl_read(&self, key: &str) -> Result<String, HostError>;
    fn sysctl_write(&self, key: &str, value: &str) -> Result<(), HostError>;

    /// `conntrack -D` of the flows whose original destination is `ip`;
    /// how many were deleted.
    fn conntrack_delete(&self, ns: Option<&Netns>, ip: IpAddr) -> Result<u64, HostError>;

    /// This namespace's links (rtnetlink); a fake has none.
    fn links(&self) -> Result<Vec<crate::rtnl::LinkInfo>, HostError> {
        Ok(Vec::new())
    }
    /// The id this namespace gives the namespace at `path` (`RTM_GETNSID`;
    /// `None`: unreadable, or no link here has a peer there); a fake knows
    /// none.
    fn netns_id(&self, _path: &Path) -> Option<i32> {
        None
    }
}

/// The file of sysctl `key` under `proc_root`.
pub fn sysctl_path(proc_root: &Path, key: &str) -> PathBuf {
    proc_root.join("sys").join(key.replace('.', "/"))
}

/// The kernel.
#[derive(Debug, Clone)]
pub struct RealHost {
    nft: Nft,
    proc_root: PathBuf,
}

impl RealHost {
    /// `cgroup2_mount` as [`Nft::new`] takes it.
    pub fn new(cgroup2_mount: Option<&Path>) -> Result<RealHost, HostError> {
        Ok(RealHost {
            nft: Nft::new(cgroup2_mount)?,
            proc_root: PathBuf::from(PROC),
        })
    }

    /// Reads sysctls (and answers [`Host::proc_root`]) under `root`.
    pub fn with_proc_root(mut self, root: &Path) -> RealHost {
        self.proc_root = root.to_path_buf();
        self
    }
}

fn netlink(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> HostError {
    let what = what.to_string();
    move |source| HostError::Netlink { what, source }
}

impl Host for RealHost {
    fn proc_root(&self) -> &Path {
        &self.proc_root
    }

    fn own_netns(&self) -> Result<NsId, HostError> {
        crate::netns::current_thread_id().map_err(|e| HostError::Netns(NetnsError::Root(e)))
    }

    fn open_netns(&self, path: &Path) -> Result<Netns, HostError> {
        Ok(Netns::open(path)?)
    }

    fn scratch_netns(&self) -> Result<Netns, HostError> {
        Ok(Netns::new_anonymous()?)
    }

    fn nft_check(&self, ns: Option<&Netns>, script: &str) -> Result<(), HostError> {
        Ok(self.nft.check(ns, script)?)
    }

    fn nft_apply(&self, ns: Option<&Netns>, script: &str) -> Result<u32, HostError> {
        Ok(self.nft.apply_as(ns, script)?)
    }

    fn nft_list(
        &self,
        ns: Option<&Netns>,
        family: &str,
        table: &str,
        form: Listing,
    ) -> Result<Option<String>, HostError> {
        Ok(match form {
            Listing::Json => self.nft.list_table_json(ns, family, table)?,
            Listing::Text => self.nft.list_table_text(ns, family, table)?,
        })
    }

    fn nft_delete(&self, ns: Option<&Netns>, family: &str, table: &str) -> Result<bool, HostError> {
        Ok(self.nft.delete_table(ns, family, table)?)
    }

    fn nft_monitor(&self, ns: Option<&Netns>) -> Result<Command, HostError> {
        Ok(self.nft.monitor_command(ns)?)
    }

    fn lo_addresses(&self) -> Result<Vec<IpAddr>, HostError> {
        crate::routing::lo_addresses().map_err(netlink("list the addresses on lo"))
    }

    fn lo_address_delete(&self, addr: IpAddr) -> Result<(), HostError> {
        crate::routing::lo_address_delete(addr)
            .map_err(netlink(format!("delete address {addr} from lo")))
    }

    fn routing_present(&self, r: &Routing) -> Result<bool, HostError> {
        r.present().map_err(netlink(format!("look for {r}")))
    }

    fn routing_add(&self, r: &Routing) -> Result<(), HostError> {
        r.add().map_err(netlink(format!("add {r}")))
    }

    fn routing_delete(&self, r: &Routing) -> Result<(), HostError> {
        r.delete().map_err(netlink(format!("delete {r}")))
    }

    fn sysctl_read(&self, key: &str) -> Result<String, HostError> {
        let path = sysctl_path(&self.proc_root, key);
        std::fs::read_to_string(&path)
            .map(|s| s.trim().to_string())
            .map_err(|source| HostError::Sysctl {
                action: "read",
                path,
                source,
            })
    }

    fn sysctl_write(&self, key: &str, value: &str) -> Result<(), HostError> {
        let path = sysctl_path(&self.proc_root, key);
        std::fs::write(&path, value).map_err(|source| HostError::Sysctl {
            action: "write",
            path,
            source,
        })
    }

    fn links(&self) -> Result<Vec<crate::rtnl::LinkInfo>, HostError> {
        crate::rtnl::links().map_err(netlink("list links"))
    }

    fn netns_id(&self, path: &Path) -> Option<i32> {
        let file = std::fs::File::open(path).ok()?;
        crate::rtnl::netns_id(std::os::fd::AsFd::as_fd(&file))
            .ok()
            .flatten()
    }

    fn conntrack_delete(&self, ns: Option<&Netns>, ip: IpAddr) -> Result<u64, HostError> {
        let family = if ip.is_ipv4() { "ipv4" } else { "ipv6" };
        let cmd = crate::tool::command("conntrack", &["-D", "-f", family, "-d", &ip.to_string()])?;
        // It exits 1 when nothing matched; the count on stderr says.
        let out = crate::tool::run(cmd, ns, None)?;
        parse_conntrack_count(&out.stderr).ok_or_else(|| HostError::Conntrack {
            netns: crate::tool::where_(ns),
            stderr: out.stderr.trim().to_string(),
        })
    }
}

/// "conntrack v1.4.7 (conntrack-tools): N flow entries have been deleted."
fn parse_conntrack_count(stderr: &str) -> Option<u64> {
    stderr
        .split("): ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conntrack_counts_are_read_from_its_message() {
        assert_eq!(
            parse_conntrack_count(
                "conntrack v1.4.7 (conntrack-tools): 3 flow entries have been deleted.\n"
            ),
            Some(3)
        );
        assert_eq!(
            parse_conntrack_count("conntrack: Operation not permitted"),
            None
        );
    }

    #[test]
    fn sysctls_live_under_the_proc_root() {
        assert_eq!(
            sysctl_path(Path::new("/tmp/p"), "net.ipv4.tcp_fwmark_accept"),
            Path::new("/tmp/p/sys/net/ipv4/tcp_fwmark_accept")
        );
    }
}
