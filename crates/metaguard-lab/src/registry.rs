//! What every lab created, written down *before* it is created, so that
//! nothing outlives the lab: torn down on drop, on Ctrl-C (through
//! [`teardown_live`]), and — after a crash or SIGKILL — by the next lab,
//! which finds the record of a dead owner and removes what it lists.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use metaguard_sys::cgroup::Cgroup2;
use metaguard_sys::process::ProcessId;
use serde::{Deserialize, Serialize};

use crate::cmd;

/// Where lab records live (tmpfs: gone after a reboot, like the
/// namespaces they describe).
pub const STATE_DIR: &str = "/run/metaguard-lab";
/// Every lab namespace name starts with this.
pub const NETNS_PREFIX: &str = "mglab-";

/// One lab's objects.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LabRecord {
    pub id: String,
    pub owner_pid: u32,
    pub owner_start_time: u64,
    /// Named network namespaces (under /run/netns).
    pub netns: Vec<String>,
    /// The cgroup2 mount and the lab's subtree below it.
    pub cgroup_mount: Option<PathBuf>,
    pub cgroup_root: Option<String>,
    /// `/etc/netns/<name>` directories (per-namespace /etc/hosts).
    pub etc_netns: Vec<PathBuf>,
    /// The lab's scratch directory (configs, metaguard's state dir).
    #[serde(default)]
    pub work_dir: Option<PathBuf>,
    /// Mount points the lab made in the root mount namespace (a machine's
    /// overlay root): unmounted (lazily) before the work dir is removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<PathBuf>,
    /// Cgroup directories outside the cgroup2 subtree that a tool made on
    /// the lab's behalf (systemd-nspawn mirrors its cgroup into the v1
    /// `name=systemd` hierarchy on hybrid hosts): removed deepest first,
    /// after the processes in them are ended.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_cgroup_trees: Vec<PathBuf>,
}

impl LabRecord {
    fn path(&self, state_dir: &Path) -> PathBuf {
        state_dir.join(format!("{}.json", self.id))
    }

    fn owner(&self) -> ProcessId {
        ProcessId {
            pid: self.owner_pid,
            start_time: self.owner_start_time,
        }
    }
}

static LIVE: Mutex<Vec<(PathBuf, LabRecord)>> = Mutex::new(Vec::new());

fn live() -> std::sync::MutexGuard<'static, Vec<(PathBuf, LabRecord)>> {
    LIVE.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Writes the record (before anything it lists exists) and registers it
/// for [`teardown_live`].
pub fn record(state_dir: &Path, rec: &LabRecord) -> std::io::Result<()> {
    std::fs::create_dir_all(state_dir)?;
    let text = serde_json::to_string_pretty(rec).map_err(std::io::Error::other)?;
    let path = rec.path(state_dir);
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &path)?;
    live().retain(|(_, r)| r.id != rec.id);
    live().push((state_dir.to_path_buf(), rec.clone()));
    Ok(())
}

/// Removes everything `rec` lists, then the record itself. Best effort:
/// every step is tried; the failures are returned as text.
pub fn teardown(state_dir: &Path, rec: &LabRecord) -> Vec<String> {
    let mut problems = Vec::new();
    // Processes inside the lab's namespaces (a daemon, nginx, a bench's
    // relay): the lab or its tests started them, as nothing else enters
    // them. A test or bench that ends by Ctrl-C or a crash does not stop
    // them itself, and each would keep its namespace alive.
    end_processes_in(&rec.netns);
    // Processes left in the lab's cgroups are lab probes: ours to end.
    if let (Some(mount), Some(root)) = (&rec.cgroup_mount, &rec.cgroup_root) {
        let cg = Cgroup2::at(mount);
        if let Err(e) = remove_cgroup_tree(&cg, root) {
            problems.push(e);
        }
    }
    for tree in &rec.extra_cgroup_trees {
        if let Err(e) = remove_dir_tree(tree) {
            problems.push(e);
        }
        // Its "metaguard-lab" parent, when no other lab holds a subtree.
        if let Some(parent) = tree
            .parent()
            .filter(|p| p.file_name().is_some_and(|n| n == "metaguard-lab"))
        {
            let _ = std::fs::remove_dir(parent);
        }
    }
    for m in &rec.mounts {
        if let Err(e) = unmount(m) {
            problems.push(e);
        }
    }
    // Mounts in the work dir that no record names (a test's own, left by
    // a killed process): the dir cannot go while they are there.
    if let Some(dir) = &rec.work_dir {
        for m in mounts_below(Path::new("/proc/self/mountinfo"), dir) {
            if let Err(e) = unmount(&m) {
                problems.push(e);
            }
        }
    }
    for ns in &rec.netns {
        if Path::new(metaguard_sys::netns::NETNS_RUN_DIR)
            .join(ns)
            .exists()
        {
            if let Err(e) = cmd::run(None, "ip", &["netns", "delete", ns], None) {
                problems.push(e.to_string());
            }
        }
    }
    for dir in &rec.etc_netns {
        if dir.exists() {
            if let Err(e) = std::fs::remove_dir_all(dir) {
                problems.push(format!("remove {}: {e}", dir.display()));
            }
        }
    }
    if let Some(dir) = rec.work_dir.as_ref().filter(|d| d.exists()) {
        if let Err(e) = std::fs::remove_dir_all(dir) {
            problems.push(format!("remove {}: {e}", dir.display()));
        }
    }
    // Leave /etc/netns itself only when something else uses it.
    let _ = std::fs::remove_dir(Path::new("/etc/netns"));
    if problems.is_empty() {
        let _ = std::fs::remove_file(rec.path(state_dir));
        live().retain(|(_, r)| r.id != rec.id);
    }
    problems
}

/// Kills the processes in `root`'s subtree (by pid; they can only be lab
/// probes), then removes the cgroups deepest first.
fn remove_cgroup_tree(cg: &Cgroup2, root: &str) -> Result<(), String> {
    let base = cg.path(root);
    remove_dir_tree(&base)?;
    // Parents of the lab root that held only lab subtrees ("metaguard-lab").
    if let Some(parent) = Path::new(root)
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
    {
        let _ = std::fs::remove_dir(cg.path(&parent.to_string_lossy()));
    }
    Ok(())
}

/// The mount points at or below `dir` in mount table `mountinfo`
/// (`/proc/self/mountinfo`), deepest first.
fn mounts_below(mountinfo: &Path, dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string(mountinfo).unwrap_or_default();
    let mut found: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount_path)
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// A mount point as mountinfo spells it: space, tab, newline and backslash
/// as octal escapes (`\040`).
fn unescape_mount_path(field: &str) -> PathBuf {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    use std::os::unix::ffi::OsStringExt as _;
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

/// Unmounts `mount` (detached: gone from the tree at once, released when
/// its last user is), if it is still a mount point.
fn unmount(mount: &Path) -> Result<(), String> {
    match rustix::mount::unmount(mount, rustix::mount::UnmountFlags::DETACH) {
        Ok(()) => Ok(()),
        // Not mounted (any more), or gone.
        Err(e) if e == rustix::io::Errno::INVAL || e == rustix::io::Errno::NOENT => Ok(()),
        Err(e) => Err(format!("unmount {}: {e}", mount.display())),
    }
}

/// Ends (SIGKILL, by pid) every process whose network namespace is one of
/// the named lab namespaces `names`, except this one, and waits (1 s at
/// most) until none is left there. Returns how many it ended.
pub fn end_processes_in(names: &[String]) -> usize {
    use metaguard_sys::netns::{NsId, NETNS_RUN_DIR};
    // Never the root namespace, whatever a name points at: no process
    // outside the lab is ever ended.
    let roots = metaguard_sys::netns::root_ids().unwrap_or_default();
    if roots.is_empty() {
        return 0;
    }
    let ids: Vec<NsId> = names
        .iter()
        .filter_map(|n| NsId::of(&Path::new(NETNS_RUN_DIR).join(n)).ok())
        .filter(|id| !roots.contains(id))
        .collect();
    if ids.is_empty() {
        return 0;
    }
    let inside = || -> Vec<i32> {
        let me = std::process::id();
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| pid != me)
            .filter(|pid| {
                NsId::of(Path::new(&format!("/proc/{pid}/ns/net")))
                    .is_ok_and(|id| ids.contains(&id))
            })
            .filter_map(|pid| i32::try_from(pid).ok())
            .collect()
    };
    let found = inside();
    for &pid in &found {
        if let Some(pid) = rustix::process::Pid::from_raw(pid) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
    // A killed process leaves its namespace a moment after SIGKILL (a
    // zombie's namespace link no longer resolves).
    for _ in 0..100 {
        if inside().is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    found.len()
}

/// Ends the processes in the cgroup tree at `base` (any hierarchy), then
/// removes its directories deepest first.
fn remove_dir_tree(base: &Path) -> Result<(), String> {
    if !base.exists() {
        return Ok(());
    }
    let mut dirs = Vec::new();
    collect_dirs(base, &mut dirs);
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    for dir in &dirs {
        if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in text.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                }
            }
        }
    }
    let mut failed = None;
    for dir in &dirs {
        // A killed process leaves its cgroup a moment after SIGKILL.
        let mut result = std::fs::remove_dir(dir);
        for _ in 0..50 {
            match &result {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    result = std::fs::remove_dir(dir);
                }
                _ => break,
            }
        }
        if let Err(e) = result.or_else(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Ok(())
            } else {
                Err(e)
            }
        }) {
            failed = Some(format!("remove cgroup {}: {e}", dir.display()));
        }
    }
    failed.map_or(Ok(()), Err)
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&e.path(), out);
            }
        }
    }
}

/// Tears down every lab of this process (the Ctrl-C path).
pub fn teardown_live() {
    let labs: Vec<(PathBuf, LabRecord)> = live().clone();
    for (dir, rec) in labs {
        for p in teardown(&dir, &rec) {
            eprintln!("metaguard lab: clean-up of {}: {p}", rec.id);
        }
    }
}

/// Finds labs whose owner process is gone (crash, SIGKILL) and removes
/// them, and removes lab namespaces no record claims. Returns the ids of
/// what was reaped.
pub fn reap_leftovers(state_dir: &Path) -> Vec<String> {
    let mut reaped = Vec::new();
    if let Ok(rd) = std::fs::read_dir(state_dir) {
        for e in rd.flatten() {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let Ok(rec) = serde_json::from_str::<LabRecord>(&text) else {
                eprintln!(
                    "metaguard lab: ignoring unreadable record {}",
                    path.display()
                );
                continue;
            };
            if rec.owner().is_alive(Path::new("/proc")) {
                continue;
            }
            let problems = teardown(state_dir, &rec);
            for p in &problems {
                eprintln!("metaguard lab: leftover {}: {p}", rec.id);
            }
            reaped.push(rec.id.clone());
        }
    }
    // Lab namespaces without any record (a record removed by hand, or a
    // lab killed between writing… no: records are written before anything
    // is created, so a namespace whose id has no record file is orphaned).
    if let Ok(rd) = std::fs::read_dir(metaguard_sys::netns::NETNS_RUN_DIR) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(id) = lab_id_of(&name) else { continue };
            if state_dir.join(format!("{id}.json")).exists() {
                continue;
            }
            end_processes_in(std::slice::from_ref(&name));
            if cmd::run(None, "ip", &["netns", "delete", &name], None).is_ok() {
                reaped.push(name);
            }
        }
    }
    reaped
}

/// The lab id in a lab namespace name (`mglab-<id>-<role>`).
pub fn lab_id_of(netns_name: &str) -> Option<&str> {
    let rest = netns_name.strip_prefix(NETNS_PREFIX)?;
    rest.split_once('-').map(|(id, _)| id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_below_a_dir_are_found_deepest_first_and_unescaped() {
        let dir = std::env::temp_dir().join(format!("mg-mountinfo-{}", std::process::id()));
        let info = dir.join("mountinfo");
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(
            &info,
            "27 1 254:0 / / rw - ext4 /dev/vda rw\n\
             337 27 0:40 / /run/metaguard-lab/abc/bpffs rw - bpf bpf rw\n\
             338 337 0:41 / /run/metaguard-lab/abc/bpffs/x\\040y rw - tmpfs t rw\n\
             339 27 0:42 / /run/metaguard-lab/abcd/bpffs rw - bpf bpf rw\n",
        )
        .expect("write");
        let found = mounts_below(&info, Path::new("/run/metaguard-lab/abc"));
        assert_eq!(
            found,
            vec![
                PathBuf::from("/run/metaguard-lab/abc/bpffs/x y"),
                PathBuf::from("/run/metaguard-lab/abc/bpffs"),
            ]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn lab_ids_come_from_names() {
        assert_eq!(lab_id_of("mglab-1a2b3c-host"), Some("1a2b3c"));
        assert_eq!(lab_id_of("mglab-x"), None);
        assert_eq!(lab_id_of("other-1-host"), None);
    }
}
