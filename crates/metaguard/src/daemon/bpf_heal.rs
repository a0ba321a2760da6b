//! Keeps the BPF layer as the daemon's last apply left it: notices a link
//! that someone unpinned (`rm`, `bpftool` — the program detaches when the
//! last reference goes), detached (`bpftool link detach`: the pin stays,
//! the link is defunct), replaced or re-pointed at another program, and a
//! map pin that is gone; the daemon then re-applies the layer.
//!
//! Where the kernel tells: inotify on the pin directory reports an unlink
//! on bpffs at once. Where it does not: a detached link changes nothing
//! in the directory, and a cgroup link's descriptor has no `poll`
//! operation (on Linux 6.18 `poll` answers POLLIN|POLLOUT at once whether
//! the link is attached or not, and `epoll_ctl` refuses it with EPERM;
//! only struct_ops links implement `poll`). So the pinned links are also
//! read back every [`CHECK_PERIOD`] — one `BPF_OBJ_GET` and one
//! `BPF_OBJ_GET_INFO_BY_FD` per link, about 20–40 µs for five links.
//!
//! This module only compares; reading the kernel and re-applying are the
//! daemon's (through `enforce` and `sys::bpf`).

use std::collections::BTreeMap;
use std::time::Duration;

use metaguard_sys::bpf::{LinkInfo, PinnedLink};

/// How often the pinned links are read back while the layer is active.
/// With the time a heal takes (tens of ms), a detached link runs again
/// within ~300 ms — well inside the second the daemon promises.
pub const CHECK_PERIOD: Duration = Duration::from_millis(250);

/// Cause labels of `metaguard_heals_total` for the BPF layer.
pub const CAUSES: [&str; 4] = [
    "bpf-link-unpinned",
    "bpf-link-detached",
    "bpf-link-replaced",
    "bpf-map-unpinned",
];

/// One way the layer differs from what the daemon left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Drift {
    /// The link's pin is gone; unless someone else holds the link, its
    /// program no longer runs.
    Unpinned(String),
    /// The pin is there but the link is defunct: detached, or its cgroup
    /// was removed.
    Detached(String),
    /// The pin holds another link, or the link runs another program.
    Replaced(String),
    /// A map's pin is gone: the programs still use the map, but an apply
    /// would create an empty one next to it.
    MapUnpinned(&'static str),
}

impl Drift {
    /// The `cause` label (one of [`CAUSES`]).
    pub fn cause(&self) -> &'static str {
        match self {
            Drift::Unpinned(_) => CAUSES[0],
            Drift::Detached(_) => CAUSES[1],
            Drift::Replaced(_) => CAUSES[2],
            Drift::MapUnpinned(_) => CAUSES[3],
        }
    }
}

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Drift::Unpinned(n) => write!(f, "{n} unpinned"),
            Drift::Detached(n) => write!(f, "{n} detached (defunct link)"),
            Drift::Replaced(n) => write!(f, "{n} replaced (another link or program)"),
            Drift::MapUnpinned(m) => write!(f, "map {m} unpinned"),
        }
    }
}

/// What differs between `expected` (link pin name → the link as the last
/// apply left it) and the links and map pins found now.
pub fn drift(
    expected: &BTreeMap<String, LinkInfo>,
    actual: &[PinnedLink],
    missing_maps: &[&'static str],
) -> Vec<Drift> {
    let actual: BTreeMap<String, &PinnedLink> = actual.iter().map(|l| (l.name(), l)).collect();
    let mut out = Vec::new();
    for (name, want) in expected {
        match actual.get(name) {
            None => out.push(Drift::Unpinned(name.clone())),
            Some(l) if !l.is_live() => out.push(Drift::Detached(name.clone())),
            Some(l) if l.info.link_id != want.link_id || l.info.prog_id != want.prog_id => {
                out.push(Drift::Replaced(name.clone()))
            }
            Some(_) => {}
        }
    }
    out.extend(missing_maps.iter().map(|m| Drift::MapUnpinned(m)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use metaguard_sys::bpf::Hook;

    fn info(link_id: u32, prog_id: u32, cgroup_id: u64) -> LinkInfo {
        LinkInfo {
            link_id,
            prog_id,
            cgroup_id,
            attach_type: Hook::Connect4.attach_type(),
        }
    }

    fn pinned(name: &str, info: LinkInfo) -> PinnedLink {
        let id = name
            .strip_prefix("link-")
            .and_then(|r| r.split('-').next())
            .and_then(|i| i.parse().ok())
            .unwrap_or(0);
        PinnedLink {
            pin: format!("/sys/fs/bpf/metaguard/{name}").into(),
            hook: Some(Hook::Connect4),
            named_cgroup_id: id,
            info,
        }
    }

    #[test]
    fn each_kind_of_drift_is_named_with_its_cause() {
        let names = [
            "link-7-connect4",
            "link-7-connect6",
            "link-7-sendmsg4",
            "link-7-sendmsg6",
        ];
        let expected: BTreeMap<String, LinkInfo> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.to_string(), info(i as u32, 100 + i as u32, 7)))
            .collect();
        let same: Vec<PinnedLink> = expected.iter().map(|(n, i)| pinned(n, *i)).collect();
        assert!(drift(&expected, &same, &[]).is_empty());

        let actual = vec![
            // connect4 unpinned; connect6 detached (cgroup id 0); sendmsg4
            // runs another program; sendmsg6 is another link.
            pinned(names[1], info(1, 101, 0)),
            pinned(names[2], info(2, 999, 7)),
            pinned(names[3], info(42, 103, 7)),
            // A link metaguard did not leave is not its business here.
            pinned("link-8-connect4", info(50, 150, 8)),
        ];
        let found = drift(&expected, &actual, &["mg_events"]);
        assert_eq!(
            found,
            vec![
                Drift::Unpinned(names[0].into()),
                Drift::Detached(names[1].into()),
                Drift::Replaced(names[2].into()),
                Drift::Replaced(names[3].into()),
                Drift::MapUnpinned("mg_events"),
            ]
        );
        let causes: Vec<&str> = found.iter().map(Drift::cause).collect();
        assert_eq!(
            causes,
            [
                "bpf-link-unpinned",
                "bpf-link-detached",
                "bpf-link-replaced",
                "bpf-link-replaced",
                "bpf-map-unpinned"
            ]
        );
        assert_eq!(
            found[1].to_string(),
            "link-7-connect6 detached (defunct link)"
        );
    }
}
