//! The cgroup BPF layer's kernel side: loading `bpf/guard.bpf.c` (compiled
//! by build.rs, loaded with aya), filling its maps, attaching it to cgroups
//! through pinned BPF links, reading it back, and taking it away.
//!
//! Everything metaguard creates lives under one *pin directory* on a bpf
//! filesystem (default `/sys/fs/bpf/metaguard`): the maps `mg_policy`,
//! `mg_ep4`, `mg_ep6`, `mg_netns`, `mg_events` (pinned by name, so a later load reuses
//! them) and one link per (cgroup, hook), `link-<cgroup id>-<hook>`. A
//! pinned link keeps its program attached after the process exits
//! (fail-closed); unpinning it detaches exactly that program. Links are
//! multi-attach by construction, so other programs on the same cgroup keep
//! running and are never touched.
//!
//! Must not: decide policy. The map contents come from `metaguard-core`.
//!
//! The object is an input of [`PinDir::apply`]: production passes the
//! embedded [`OBJECT`], tests a variant (another build of guard.bpf.c), so
//! an upgrade — links made by one object, applied by another — can be
//! tested. `apply` swaps a changed program into each existing link with
//! `BPF_LINK_UPDATE` (`BPF_F_REPLACE`), so the cgroup is never without
//! one; pinned maps whose definitions differ from the object's are refused
//! before anything is loaded.
//!
//! aya 0.13 does not expose link creation for pinning, link updates or
//! program queries, so `BPF_LINK_CREATE`, `BPF_LINK_UPDATE`,
//! `BPF_LINK_DETACH`, `BPF_OBJ_PIN`, `BPF_OBJ_GET`, `BPF_PROG_QUERY`,
//! `BPF_PROG_GET_FD_BY_ID` and `BPF_OBJ_GET_INFO_BY_FD` are issued here
//! directly.

//!
//! Layout: this module holds the types, the checks and the unpinned
//! attachments; `pins` the pin directory (apply, verify, remove) and the
//! loader; `events` the ring buffer's reader; `raw` the bpf(2) commands
//! aya does not expose, each in a small wrapper that argues its safety.

mod events;
mod pins;
mod raw;

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

pub use self::events::{Event, EventReader};
pub use self::pins::PinDir;
#[cfg(test)]
use self::pins::{is_current, object_map_shapes};
use self::pins::{load_object, program_fd};
use self::raw::{link_create, link_detach, obj_get, prog_get_fd_by_id, prog_info, prog_query_raw};

/// The compiled BPF object (`bpf/guard.bpf.c`, built by build.rs); empty
/// when this crate was built without its `bpf` feature.
#[cfg(feature = "bpf")]
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/guard.bpf.o"));
/// The compiled BPF object: none, this build has no `bpf` feature.
#[cfg(not(feature = "bpf"))]
pub static OBJECT: &[u8] = &[];

/// Whether this build carries the BPF layer (cargo feature `bpf`, on by
/// default).
pub const BUILT: bool = cfg!(feature = "bpf");

/// Default pin directory.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/metaguard";

/// Endpoint class bits, the raw-socket bit and the observe bits (a class
/// bit << 3), as in guard.bpf.c.
pub const CLASS_IMDS: u32 = 1;
pub const CLASS_TASK_METADATA: u32 = 2;
pub const DENY_RAW: u32 = 4;
pub const OBSERVE_IMDS: u32 = 8;
pub const OBSERVE_TASK_METADATA: u32 = 16;

const BPF_FS_MAGIC: u64 = 0xcafe_4a11;

const MAPS: [&str; 5] = ["mg_policy", "mg_ep4", "mg_ep6", "mg_netns", "mg_events"];
const LINK_PREFIX: &str = "link-";

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("BPF layer not built into this binary (built without the cargo feature `bpf`)")]
    NoObject,
    #[error("{path} is not on a bpf filesystem (mount one: mount -t bpf bpf /sys/fs/bpf)")]
    NotBpffs { path: PathBuf },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("loading the BPF object: {0}")]
    Load(String),
    #[error("BPF map {map}: {message}")]
    Map { map: &'static str, message: String },
    #[error(
        "pinned BPF map {pin} is {pinned}, but this metaguard's programs need {object} \
         (it was made by another metaguard version); run `metaguard remove`, then `metaguard apply`"
    )]
    MapMismatch {
        pin: PathBuf,
        pinned: MapShape,
        object: MapShape,
    },
    #[error("bpf({cmd}) on {object}: {source}")]
    Syscall {
        cmd: &'static str,
        object: String,
        source: io::Error,
    },
}

/// The five hooks, each a program of guard.bpf.c.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hook {
    Connect4,
    Connect6,
    Sendmsg4,
    Sendmsg6,
    SockCreate,
}

impl Hook {
    pub const ALL: [Hook; 5] = [
        Hook::Connect4,
        Hook::Connect6,
        Hook::Sendmsg4,
        Hook::Sendmsg6,
        Hook::SockCreate,
    ];

    /// Name as in pins and reports (the libbpf section name's tail).
    pub fn name(self) -> &'static str {
        match self {
            Hook::Connect4 => "connect4",
            Hook::Connect6 => "connect6",
            Hook::Sendmsg4 => "sendmsg4",
            Hook::Sendmsg6 => "sendmsg6",
            Hook::SockCreate => "sock_create",
        }
    }

    fn program(self) -> &'static str {
        match self {
            Hook::Connect4 => "mg_connect4",
            Hook::Connect6 => "mg_connect6",
            Hook::Sendmsg4 => "mg_sendmsg4",
            Hook::Sendmsg6 => "mg_sendmsg6",
            Hook::SockCreate => "mg_sock_create",
        }
    }

    /// `enum bpf_attach_type`.
    pub fn attach_type(self) -> u32 {
        match self {
            Hook::SockCreate => 2, // BPF_CGROUP_INET_SOCK_CREATE
            Hook::Connect4 => 10,  // BPF_CGROUP_INET4_CONNECT
            Hook::Connect6 => 11,  // BPF_CGROUP_INET6_CONNECT
            Hook::Sendmsg4 => 14,  // BPF_CGROUP_UDP4_SENDMSG
            Hook::Sendmsg6 => 15,  // BPF_CGROUP_UDP6_SENDMSG
        }
    }

    fn from_name(s: &str) -> Option<Hook> {
        Hook::ALL.into_iter().find(|h| h.name() == s)
    }
}

/// What the maps should hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapContents {
    /// IPv4 address octets → class bits.
    pub ep4: BTreeMap<[u8; 4], u32>,
    /// IPv6 address octets → class bits (IPv4-mapped addresses are looked
    /// up in `ep4` by the programs).
    pub ep6: BTreeMap<[u8; 16], u32>,
    /// cgroup id → (rule index, deny bits).
    pub policy: BTreeMap<u64, (u32, u32)>,
    /// Network namespace cookie → (rule index, deny bits); key 0 is the
    /// decision for a namespace not listed (other than the host's, which
    /// must be listed whenever key 0 is).
    pub netns: BTreeMap<u64, (u32, u32)>,
}

/// One attachment: a cgroup (by directory) and a hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub cgroup_dir: PathBuf,
    pub cgroup_id: u64,
    pub hook: Hook,
}

/// A pinned link, read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinnedLink {
    pub pin: PathBuf,
    pub hook: Option<Hook>,
    /// The cgroup id in the pin's name.
    pub named_cgroup_id: u64,
    pub info: LinkInfo,
}

impl PinnedLink {
    /// The pin's file name, `link-<cgroup id>-<hook>`.
    pub fn name(&self) -> String {
        file_name(&self.pin)
    }

    /// Whether the link still runs on the cgroup its name says. A link
    /// whose cgroup was removed, or that was detached (`BPF_LINK_DETACH`,
    /// `bpftool link detach`), reports cgroup id 0: it runs no more.
    pub fn is_live(&self) -> bool {
        self.info.cgroup_id != 0 && self.info.cgroup_id == self.named_cgroup_id
    }
}

/// `struct bpf_link_info` for a cgroup link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkInfo {
    pub link_id: u32,
    pub prog_id: u32,
    /// 0 once the cgroup is gone or the link was detached (it is defunct).
    pub cgroup_id: u64,
    pub attach_type: u32,
}

/// A loaded program, from `struct bpf_prog_info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgInfo {
    pub id: u32,
    /// The kernel's digest of the instructions (map references zeroed):
    /// programs with equal tags run the same code.
    pub tag: [u8; 8],
    /// The maps it uses.
    pub map_ids: Vec<u32>,
}

/// What a map is, from its definition: what must agree between a pinned
/// map and the object that reuses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapShape {
    /// `enum bpf_map_type`.
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

impl std::fmt::Display for MapShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.map_type {
            1 => "hash".to_string(),
            27 => "ringbuf".to_string(),
            t => format!("type {t}"),
        };
        write!(
            f,
            "{kind} (key {} B, value {} B, {} entries)",
            self.key_size, self.value_size, self.max_entries
        )
    }
}

/// What `apply` did, by link pin name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyOutcome {
    pub attached: Vec<String>,
    /// Live links already running the object's program on the pinned maps.
    pub kept: Vec<String>,
    /// Live links whose program was swapped for the object's in place
    /// (`BPF_LINK_UPDATE`): same link, new program, no gap.
    pub updated: Vec<String>,
    pub detached: Vec<String>,
}

/// Whether `dir` (or, when it does not exist yet, its nearest existing
/// ancestor) is on a bpf filesystem.
pub fn check_bpffs(dir: &Path) -> Result<(), BpfError> {
    let probe = dir.ancestors().find(|p| p.exists()).unwrap_or(dir);
    let st = rustix::fs::statfs(probe).map_err(|e| BpfError::Io {
        path: probe.to_path_buf(),
        source: e.into(),
    })?;
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
    if st.f_type as u64 != BPF_FS_MAGIC {
        return Err(BpfError::NotBpffs {
            path: probe.to_path_buf(),
        });
    }
    Ok(())
}

/// Whether this kernel can run the layer with `object`: the object is
/// built and a trivial `bpf()` call is understood. The error says why not.
pub fn supported(object: &[u8]) -> Result<(), BpfError> {
    if object.is_empty() {
        return Err(BpfError::NoObject);
    }
    // BPF_PROG_QUERY on an invalid fd: EBADF means bpf() exists; ENOSYS or
    // EPERM/EINVAL on the command itself means it does not (or not for us).
    match prog_query_raw(-1, Hook::Connect4.attach_type(), None) {
        Err(e) if e.raw_os_error() == Some(libc::EBADF) => Ok(()),
        Err(e) => Err(BpfError::Syscall {
            cmd: "BPF_PROG_QUERY",
            object: "probe".into(),
            source: e,
        }),
        Ok(_) => Ok(()),
    }
}

/// Attaches one guard program of `object` with its own, separate maps
/// (pinned under `map_dir`, empty unless filled) to `cgroup_dir`, unpinned:
/// the link lives as long as the returned descriptor. Programs with empty
/// maps allow everything; tests use this as "someone else's program".
pub fn attach_unpinned(
    object: &[u8],
    cgroup_dir: &Path,
    hook: Hook,
    map_dir: &Path,
) -> Result<OwnedFd, BpfError> {
    check_bpffs(map_dir)?;
    let mut ebpf = load_object(object, map_dir)?;
    let cgroup = File::open(cgroup_dir).map_err(|e| BpfError::Io {
        path: cgroup_dir.to_path_buf(),
        source: e,
    })?;
    let prog = program_fd(&mut ebpf, hook)?;
    link_create(prog, cgroup.as_fd(), hook.attach_type()).map_err(|e| BpfError::Syscall {
        cmd: "BPF_LINK_CREATE",
        object: cgroup_dir.display().to_string(),
        source: e,
    })
}

/// Detaches the link pinned at `pin` from its cgroup without unpinning it
/// (`BPF_LINK_DETACH`, what `bpftool link detach` does): the pin stays, the
/// link is defunct (cgroup id 0) and its program no longer runs. Tests use
/// it as the drift the daemon must heal.
pub fn detach_pinned_link(pin: &Path) -> Result<(), BpfError> {
    let object = pin.display().to_string();
    let fd = obj_get(pin).map_err(|e| syscall("BPF_OBJ_GET", &object, e))?;
    link_detach(fd.as_fd()).map_err(|e| syscall("BPF_LINK_DETACH", &object, e))
}

/// A loaded program, by id (`BPF_PROG_GET_FD_BY_ID`, then its info).
pub fn program_info(id: u32) -> Result<ProgInfo, BpfError> {
    let object = format!("program {id}");
    let fd = prog_get_fd_by_id(id).map_err(|e| syscall("BPF_PROG_GET_FD_BY_ID", &object, e))?;
    prog_info(fd.as_fd()).map_err(|e| syscall("BPF_OBJ_GET_INFO_BY_FD", &object, e))
}

/// Ids of the programs attached directly to `cgroup_dir` at `hook`
/// (not inherited ones), in run order.
pub fn attached_programs(cgroup_dir: &Path, hook: Hook) -> Result<Vec<u32>, BpfError> {
    let cgroup = File::open(cgroup_dir).map_err(|e| BpfError::Io {
        path: cgroup_dir.to_path_buf(),
        source: e,
    })?;
    let mut ids = vec![0u32; 64];
    let n =
        prog_query_raw(cgroup.as_raw_fd(), hook.attach_type(), Some(&mut ids)).map_err(|e| {
            BpfError::Syscall {
                cmd: "BPF_PROG_QUERY",
                object: cgroup_dir.display().to_string(),
                source: e,
            }
        })?;
    ids.truncate(n);
    Ok(ids)
}

fn link_pin_name(cgroup_id: u64, hook: Hook) -> String {
    format!("{LINK_PREFIX}{cgroup_id}-{}", hook.name())
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn syscall(cmd: &'static str, object: &str, source: io::Error) -> BpfError {
    BpfError::Syscall {
        cmd,
        object: object.to_string(),
        source,
    }
}

fn map_err(map: &'static str, e: impl std::fmt::Display) -> BpfError {
    BpfError::Map {
        map,
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_objects_maps_have_the_shapes_the_programs_and_readers_assume() {
        if !BUILT {
            assert!(OBJECT.is_empty());
            eprintln!("skipped: built without the `bpf` feature");
            return;
        }
        assert!(
            !OBJECT.is_empty(),
            "the `bpf` feature never ships an empty object"
        );
        let shapes = object_map_shapes(OBJECT).expect("parse the object");
        let shape = |map_type, key_size, value_size, max_entries| MapShape {
            map_type,
            key_size,
            value_size,
            max_entries,
        };
        // read_maps and sync_maps use u64 → [u32; 2], [u8; 4] → u32 and
        // [u8; 16] → u32.
        assert_eq!(shapes["mg_policy"], shape(1, 8, 8, 4096));
        assert_eq!(shapes["mg_ep4"], shape(1, 4, 4, 256));
        assert_eq!(shapes["mg_ep6"], shape(1, 16, 4, 256));
        assert_eq!(shapes["mg_netns"], shape(1, 8, 8, 16384));
        assert_eq!(shapes["mg_events"], shape(27, 0, 0, 256 * 1024));
        assert_eq!(
            shapes["mg_policy"].to_string(),
            "hash (key 8 B, value 8 B, 4096 entries)"
        );
    }

    #[test]
    fn a_link_is_current_with_the_same_tag_on_pinned_maps_only() {
        let prog = |tag: u8, map_ids: &[u32]| ProgInfo {
            id: 7,
            tag: [tag; 8],
            map_ids: map_ids.to_vec(),
        };
        let want = prog(1, &[10, 11, 12]);
        let pinned = [10, 11, 12, 13];
        assert!(is_current(&prog(1, &[10, 13]), &want, &pinned));
        // Another version's instructions.
        assert!(!is_current(&prog(2, &[10, 13]), &want, &pinned));
        // The same code on maps that are no longer pinned (someone removed
        // a map pin and an apply made a new one): it would read a stale
        // policy.
        assert!(!is_current(&prog(1, &[10, 99]), &want, &pinned));
    }

    #[test]
    fn an_empty_object_is_not_built() {
        assert!(matches!(supported(&[]), Err(BpfError::NoObject)));
        let pins = PinDir::new("/nonexistent/metaguard-test");
        assert!(matches!(
            pins.apply(&[], &MapContents::default(), &[]),
            Err(BpfError::NoObject)
        ));
        assert!(matches!(pins.outdated(&[]), Err(BpfError::NoObject)));
    }
}
