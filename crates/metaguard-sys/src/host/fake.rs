//! A recording [`Host`] for tests: no kernel, no root.
//!
//! Every call is recorded, in order, as one line (`nft apply host`,
//! `routing add IPv4 rule …`, `sysctl write net.ipv4.tcp_fwmark_accept=1`).
//! The host's state ([`World`]: tables per namespace, policy routing, `lo`
//! addresses, sysctls) is kept in memory, so a test can compare the state
//! after a failed operation with the state before it. Calls fail when a
//! test says so: the Nth call, or every call that starts with a prefix.
//!
//! Namespaces are plain files (any file opens as a [`Netns`]); a call's
//! namespace is named by that file's path, `host` for `None`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{Host, HostError, Listing};
use crate::netns::{Netns, NsId};
use crate::routing::Routing;

/// What the fake host holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct World {
    /// (namespace, family, table) → the script that made it.
    pub tables: BTreeMap<(String, String, String), String>,
    pub routing: BTreeSet<Routing>,
    pub lo_addresses: BTreeSet<IpAddr>,
    /// Dotted name → value.
    pub sysctls: BTreeMap<String, String>,
    /// (namespace, destination) → open flows, for `conntrack -D`.
    pub flows: BTreeMap<(String, IpAddr), u64>,
}

#[derive(Debug, Default)]
struct Inner {
    world: World,
    calls: Vec<String>,
    fail_nth: BTreeSet<usize>,
    fail_prefix: Vec<String>,
    next_pid: u32,
}

/// The recording fake. Clones share one host: a test keeps one while the
/// code under test owns another.
#[derive(Debug, Clone)]
pub struct FakeHost {
    inner: Arc<Mutex<Inner>>,
    proc_root: PathBuf,
}

impl Default for FakeHost {
    fn default() -> Self {
        FakeHost::new(World::default())
    }
}

/// The namespace name of `ns` in calls and in [`World::tables`].
pub fn label(ns: Option<&Netns>) -> String {
    ns.map_or_else(|| "host".to_string(), |n| n.path().display().to_string())
}

/// The `(family, name)` of every table a script creates.
fn tables_of(script: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for line in script.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let rest = match words.as_slice() {
            ["table", rest @ ..] | ["add", "table", rest @ ..] => rest,
            _ => continue,
        };
        if let [family, name, ..] = rest {
            let t = (family.to_string(), name.trim_end_matches(';').to_string());
            if !out.contains(&t) {
                out.push(t);
            }
        }
    }
    out
}

impl FakeHost {
    pub fn new(world: World) -> FakeHost {
        FakeHost {
            inner: Arc::new(Mutex::new(Inner {
                world,
                next_pid: 1000,
                ..Inner::default()
            })),
            proc_root: PathBuf::from("/fake/proc"),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A test that panicked while holding it has failed already.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Fails the `n`th call (1-based, counting every call).
    pub fn fail_nth(&self, n: usize) -> &Self {
        self.lock().fail_nth.insert(n);
        self
    }

    /// Fails every call whose record starts with `prefix`.
    pub fn fail_on(&self, prefix: &str) -> &Self {
        self.lock().fail_prefix.push(prefix.to_string());
        self
    }

    /// Stops failing calls.
    pub fn heal(&self) {
        let mut g = self.lock();
        g.fail_nth.clear();
        g.fail_prefix.clear();
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    /// The calls that change the host (or check a table), in order:
    /// what order-of-operations tests compare.
    pub fn changes(&self) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter(|c| {
                [
                    "nft check",
                    "nft apply",
                    "nft delete",
                    "routing add",
                    "routing delete",
                    "lo delete",
                    "sysctl write",
                    "conntrack delete",
                ]
                .iter()
                .any(|p| c.starts_with(p))
            })
            .collect()
    }

    /// Forgets the calls so far (not the state).
    pub fn clear_calls(&self) {
        self.lock().calls.clear();
    }

    /// The host's state now.
    pub fn world(&self) -> World {
        self.lock().world.clone()
    }

    /// Changes the host's state behind the engine's back (someone else).
    pub fn with_world(&self, f: impl FnOnce(&mut World)) {
        f(&mut self.lock().world)
    }

    /// Records `call`; fails it when a test asked to.
    fn call(&self, call: String) -> Result<MutexGuard<'_, Inner>, HostError> {
        let mut g = self.lock();
        g.calls.push(call.clone());
        let n = g.calls.len();
        if g.fail_nth.contains(&n) || g.fail_prefix.iter().any(|p| call.starts_with(p)) {
            return Err(HostError::Injected { call });
        }
        Ok(g)
    }
}

impl Host for FakeHost {
    fn proc_root(&self) -> &Path {
        &self.proc_root
    }

    fn own_netns(&self) -> Result<NsId, HostError> {
        self.call("own netns".into()).map(drop)?;
        // No file a test creates has this identity.
        Ok(NsId { dev: 0, ino: 0 })
    }

    fn open_netns(&self, path: &Path) -> Result<Netns, HostError> {
        self.call(format!("open netns {}", path.display()))
            .map(drop)?;
        Ok(Netns::open(path)?)
    }

    fn scratch_netns(&self) -> Result<Netns, HostError> {
        self.call("scratch netns".into()).map(drop)?;
        Ok(Netns::open("/dev/null")?)
    }

    fn nft_check(&self, ns: Option<&Netns>, _script: &str) -> Result<(), HostError> {
        self.call(format!("nft check {}", label(ns))).map(drop)?;
        Ok(())
    }

    fn nft_apply(&self, ns: Option<&Netns>, script: &str) -> Result<u32, HostError> {
        let ns = label(ns);
        let mut g = self.call(format!("nft apply {ns}"))?;
        for (family, name) in tables_of(script) {
            g.world
                .tables
                .insert((ns.clone(), family, name), script.to_string());
        }
        g.next_pid += 1;
        Ok(g.next_pid)
    }

    fn nft_list(
        &self,
        ns: Option<&Netns>,
        family: &str,
        table: &str,
        form: Listing,
    ) -> Result<Option<String>, HostError> {
        let ns = label(ns);
        let form = match form {
            Listing::Json => "json",
            Listing::Text => "text",
        };
        let g = self.call(format!("nft list {ns} {family} {table} {form}"))?;
        Ok(g.world
            .tables
            .get(&(ns, family.to_string(), table.to_string()))
            .cloned())
    }

    fn nft_delete(&self, ns: Option<&Netns>, family: &str, table: &str) -> Result<bool, HostError> {
        let ns = label(ns);
        let mut g = self.call(format!("nft delete {ns} {family} {table}"))?;
        Ok(g.world
            .tables
            .remove(&(ns, family.to_string(), table.to_string()))
            .is_some())
    }

    fn nft_monitor(&self, ns: Option<&Netns>) -> Result<Command, HostError> {
        self.call(format!("nft monitor {}", label(ns))).map(drop)?;
        // Prints nothing and ends: the daemon restarts and re-checks.
        Ok(Command::new("true"))
    }

    fn lo_addresses(&self) -> Result<Vec<IpAddr>, HostError> {
        let g = self.call("lo addresses".into())?;
        Ok(g.world.lo_addresses.iter().copied().collect())
    }

    fn lo_address_delete(&self, addr: IpAddr) -> Result<(), HostError> {
        let mut g = self.call(format!("lo delete {addr}"))?;
        g.world.lo_addresses.remove(&addr);
        Ok(())
    }

    fn routing_present(&self, r: &Routing) -> Result<bool, HostError> {
        let g = self.call(format!("routing present {r}"))?;
        Ok(g.world.routing.contains(r))
    }

    fn routing_add(&self, r: &Routing) -> Result<(), HostError> {
        let mut g = self.call(format!("routing add {r}"))?;
        if !g.world.routing.insert(*r) {
            return Err(HostError::Netlink {
                what: format!("add {r}"),
                source: std::io::Error::from_raw_os_error(libc::EEXIST),
            });
        }
        Ok(())
    }

    fn routing_delete(&self, r: &Routing) -> Result<(), HostError> {
        let mut g = self.call(format!("routing delete {r}"))?;
        if !g.world.routing.remove(r) {
            return Err(HostError::Netlink {
                what: format!("delete {r}"),
                source: std::io::Error::from_raw_os_error(libc::ENOENT),
            });
        }
        Ok(())
    }

    fn sysctl_read(&self, key: &str) -> Result<String, HostError> {
        let g = self.call(format!("sysctl read {key}"))?;
        g.world
            .sysctls
            .get(key)
            .cloned()
            .ok_or_else(|| HostError::Sysctl {
                action: "read",
                path: super::sysctl_path(&self.proc_root, key),
                source: std::io::Error::from_raw_os_error(libc::ENOENT),
            })
    }

    fn sysctl_write(&self, key: &str, value: &str) -> Result<(), HostError> {
        let mut g = self.call(format!("sysctl write {key}={value}"))?;
        g.world.sysctls.insert(key.to_string(), value.to_string());
        Ok(())
    }

    fn conntrack_delete(&self, ns: Option<&Netns>, ip: IpAddr) -> Result<u64, HostError> {
        let ns = label(ns);
        let mut g = self.call(format!("conntrack delete {ns} {ip}"))?;
        Ok(g.world.flows.remove(&(ns, ip)).unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_calls_keeps_tables_and_fails_on_request() {
        let host = FakeHost::default();
        let script = "add table inet metaguard\ndelete table inet metaguard\ntable inet metaguard {\n}\nadd table bridge metaguard\n";
        host.nft_apply(None, script).expect("apply");
        assert_eq!(
            host.world().tables.keys().cloned().collect::<Vec<_>>(),
            [
                (
                    "host".to_string(),
                    "bridge".to_string(),
                    "metaguard".to_string()
                ),
                (
                    "host".to_string(),
                    "inet".to_string(),
                    "metaguard".to_string()
                ),
            ]
        );
        host.fail_nth(3).fail_on("nft delete host bridge");
        assert!(host.nft_delete(None, "inet", "metaguard").expect("delete"));
        assert!(host
            .nft_list(None, "inet", "metaguard", Listing::Json)
            .is_err());
        assert!(host.nft_delete(None, "bridge", "metaguard").is_err());
        assert_eq!(
            host.calls(),
            [
                "nft apply host",
                "nft delete host inet metaguard",
                "nft list host inet metaguard json",
                "nft delete host bridge metaguard",
            ]
        );
        assert_eq!(host.world().tables.len(), 1, "the failed delete kept it");
    }
}
