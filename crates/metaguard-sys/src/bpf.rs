//! The cgroup BPF layer's kernel side: loading `bpf/guard.bpf.c` (compiled
//! by build.rs, loaded with aya), filling its maps, attaching it to cgroups
//! through pinned BPF links, reading it back, and taking it away.
//!
//! Everything metaguard creates lives under one *pin directory* on a bpf
//! filesystem (default `/sys/fs/bpf/metaguard`): the maps `mg_policy`,
//! `mg_ep4`, `mg_ep6`, `mg_events` (pinned by name, so a later load reuses
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

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap as BpfHashMap, Map, MapData, RingBuf};
use aya::programs::{CgroupSock, CgroupSockAddr};
use aya::{Ebpf, EbpfLoader};

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

/// Endpoint class bits and the raw-socket bit, as in guard.bpf.c.
pub const CLASS_IMDS: u32 = 1;
pub const CLASS_TASK_METADATA: u32 = 2;
pub const DENY_RAW: u32 = 4;

const BPF_FS_MAGIC: u64 = 0xcafe_4a11;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;
/// `BPF_LINK_UPDATE` flag: replace only if the link still runs `old_prog_fd`.
const BPF_F_REPLACE: u32 = 1 << 2;

const MAPS: [&str; 4] = ["mg_policy", "mg_ep4", "mg_ep6", "mg_events"];
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

/// The layer's objects under one pin directory.
#[derive(Debug, Clone)]
pub struct PinDir {
    dir: PathBuf,
}

impl PinDir {
    pub fn new(dir: impl Into<PathBuf>) -> PinDir {
        PinDir { dir: dir.into() }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Whether anything of metaguard's is pinned here.
    pub fn exists(&self) -> bool {
        self.dir.join("mg_policy").exists()
    }

    /// Makes the kernel hold exactly `contents` in the maps and exactly
    /// `attachments` as links running `object`'s programs: a live link is
    /// kept when it already runs the object's program (same tag) on the
    /// pinned maps, and otherwise given that program in place
    /// (`BPF_LINK_UPDATE` with `BPF_F_REPLACE`: the cgroup is never without
    /// a program); missing links are created and pinned, the rest unpinned
    /// (detached). Maps are updated in place — new entries first, stale ones
    /// removed after — so no moment has an empty policy. Pinned maps of
    /// another shape than the object's are refused before anything changes.
    pub fn apply(
        &self,
        object: &[u8],
        contents: &MapContents,
        attachments: &[Attachment],
    ) -> Result<ApplyOutcome, BpfError> {
        if object.is_empty() {
            return Err(BpfError::NoObject);
        }
        check_bpffs(&self.dir)?;
        std::fs::create_dir_all(&self.dir).map_err(|e| self.io(&self.dir, e))?;
        check_bpffs(&self.dir)?;
        self.check_maps(object)?;
        let mut ebpf = load_object(object, &self.dir)?;
        sync_maps(&mut ebpf, contents)?;
        let pinned_maps = self.map_ids()?;

        let mut outcome = ApplyOutcome::default();
        let wanted: BTreeMap<String, &Attachment> = attachments
            .iter()
            .map(|a| (link_pin_name(a.cgroup_id, a.hook), a))
            .collect();
        // Existing pins: keep (or update) the live ones that are wanted,
        // drop the rest.
        for link in self.links()? {
            let name = link.name();
            let hook = match (wanted.get(&name), link.is_live()) {
                (Some(a), true) => a.hook,
                _ => {
                    std::fs::remove_file(&link.pin).map_err(|e| self.io(&link.pin, e))?;
                    outcome.detached.push(name);
                    continue;
                }
            };
            let (current, theirs) = runs_current(&mut ebpf, hook, &link, &pinned_maps)?;
            if current {
                outcome.kept.push(name);
                continue;
            }
            let ours = program_fd(&mut ebpf, hook)?;
            let pin = link.pin.display().to_string();
            let link_fd = obj_get(&link.pin).map_err(|e| syscall("BPF_OBJ_GET", &pin, e))?;
            let old = prog_get_fd_by_id(theirs.id)
                .map_err(|e| syscall("BPF_PROG_GET_FD_BY_ID", &pin, e))?;
            link_update(link_fd.as_fd(), ours, old.as_fd())
                .map_err(|e| syscall("BPF_LINK_UPDATE", &pin, e))?;
            outcome.updated.push(name);
        }
        for (name, a) in &wanted {
            if outcome.kept.contains(name) || outcome.updated.contains(name) {
                continue;
            }
            let cgroup = File::open(&a.cgroup_dir).map_err(|e| self.io(&a.cgroup_dir, e))?;
            let prog = program_fd(&mut ebpf, a.hook)?;
            let link = link_create(prog, cgroup.as_fd(), a.hook.attach_type()).map_err(|e| {
                syscall(
                    "BPF_LINK_CREATE",
                    &format!("{} ({})", a.cgroup_dir.display(), a.hook.name()),
                    e,
                )
            })?;
            let pin = self.dir.join(name);
            obj_pin(link.as_fd(), &pin)
                .map_err(|e| syscall("BPF_OBJ_PIN", &pin.display().to_string(), e))?;
            outcome.attached.push(name.clone());
        }
        Ok(outcome)
    }

    /// The live pinned links that `apply` with `object` would update: their
    /// program is not the one `object` loads for their hook, or uses maps
    /// that are not the pinned ones. Loads the programs on the pinned maps,
    /// which must all be there (so that the loader pins nothing new) and
    /// of the object's shape.
    pub fn outdated(&self, object: &[u8]) -> Result<Vec<String>, BpfError> {
        if object.is_empty() {
            return Err(BpfError::NoObject);
        }
        if let Some(map) = self.missing_maps().first() {
            return Err(map_err(
                map,
                format!("not pinned in {}", self.dir.display()),
            ));
        }
        self.check_maps(object)?;
        let links: Vec<PinnedLink> = self
            .links()?
            .into_iter()
            .filter(PinnedLink::is_live)
            .collect();
        if links.is_empty() {
            return Ok(Vec::new());
        }
        let mut ebpf = load_object(object, &self.dir)?;
        let pinned_maps = self.map_ids()?;
        let mut out = Vec::new();
        for link in links {
            let Some(hook) = link.hook else { continue };
            if !runs_current(&mut ebpf, hook, &link, &pinned_maps)?.0 {
                out.push(link.name());
            }
        }
        Ok(out)
    }

    /// Refuses pinned maps whose definition differs from `object`'s: the
    /// loader would reuse them as they are, and the programs would read
    /// them with the wrong layout (or fail to load). `apply` checks first.
    pub fn check_maps(&self, object: &[u8]) -> Result<(), BpfError> {
        let shapes = object_map_shapes(object)?;
        for name in MAPS {
            let pin = self.dir.join(name);
            if !pin.exists() {
                continue;
            }
            let want = *shapes
                .get(name)
                .ok_or_else(|| map_err(name, "missing from the object"))?;
            let have = pinned_map(&pin)?.0;
            if have != want {
                return Err(BpfError::MapMismatch {
                    pin,
                    pinned: have,
                    object: want,
                });
            }
        }
        Ok(())
    }

    /// Ids of the maps pinned here (those that exist).
    fn map_ids(&self) -> Result<Vec<u32>, BpfError> {
        let mut ids = Vec::new();
        for name in MAPS {
            let pin = self.dir.join(name);
            if pin.exists() {
                ids.push(pinned_map(&pin)?.1);
            }
        }
        Ok(ids)
    }

    /// Metaguard's maps that are not pinned here.
    pub fn missing_maps(&self) -> Vec<&'static str> {
        MAPS.into_iter()
            .filter(|m| !self.dir.join(m).exists())
            .collect()
    }

    /// The pinned links, read back.
    pub fn links(&self) -> Result<Vec<PinnedLink>, BpfError> {
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(self.io(&self.dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| self.io(&self.dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(LINK_PREFIX) else {
                continue;
            };
            let (id, hook) = rest.split_once('-').unwrap_or((rest, ""));
            let pin = entry.path();
            let fd =
                obj_get(&pin).map_err(|e| syscall("BPF_OBJ_GET", &pin.display().to_string(), e))?;
            let info = link_info(fd.as_fd())
                .map_err(|e| syscall("BPF_OBJ_GET_INFO_BY_FD", &pin.display().to_string(), e))?;
            out.push(PinnedLink {
                pin,
                hook: Hook::from_name(hook),
                named_cgroup_id: id.parse().unwrap_or(0),
                info,
            });
        }
        out.sort_by(|a, b| a.pin.cmp(&b.pin));
        Ok(out)
    }

    /// The maps' contents, read back.
    pub fn read_maps(&self) -> Result<MapContents, BpfError> {
        let mut out = MapContents::default();
        let policy = open_hash::<u64, [u32; 2]>(&self.dir, "mg_policy")?;
        for kv in policy.iter() {
            let (k, v) = kv.map_err(|e| map_err("mg_policy", e))?;
            out.policy.insert(k, (v[0], v[1]));
        }
        let ep4 = open_hash::<[u8; 4], u32>(&self.dir, "mg_ep4")?;
        for kv in ep4.iter() {
            let (k, v) = kv.map_err(|e| map_err("mg_ep4", e))?;
            out.ep4.insert(k, v);
        }
        let ep6 = open_hash::<[u8; 16], u32>(&self.dir, "mg_ep6")?;
        for kv in ep6.iter() {
            let (k, v) = kv.map_err(|e| map_err("mg_ep6", e))?;
            out.ep6.insert(k, v);
        }
        Ok(out)
    }

    /// Unpins every link (detaching exactly metaguard's programs) and map,
    /// then removes the directory. Returns what was removed.
    pub fn remove(&self) -> Result<Vec<String>, BpfError> {
        let mut removed = Vec::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(removed),
            Err(e) => return Err(self.io(&self.dir, e)),
        };
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(LINK_PREFIX) || MAPS.contains(&n.as_str()))
            .collect();
        // Links first, so no program runs with a half-removed map set.
        names.sort_by_key(|n| (!n.starts_with(LINK_PREFIX), n.clone()));
        for n in names {
            let p = self.dir.join(&n);
            std::fs::remove_file(&p).map_err(|e| self.io(&p, e))?;
            removed.push(n);
        }
        match std::fs::remove_dir(&self.dir) {
            Ok(()) => {}
            // Something foreign was pinned here: leave it and the directory.
            Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {}
            Err(e) => return Err(self.io(&self.dir, e)),
        }
        Ok(removed)
    }

    /// Drains the refusal events queued since the last call.
    pub fn drain_events(&self) -> Result<Vec<Event>, BpfError> {
        Ok(self.events()?.drain())
    }

    /// A reader of the refusal events (ring buffer `mg_events`).
    pub fn events(&self) -> Result<EventReader, BpfError> {
        let path = self.dir.join("mg_events");
        let data = MapData::from_pin(&path).map_err(|e| map_err("mg_events", e))?;
        let ring = RingBuf::try_from(Map::RingBuf(data)).map_err(|e| map_err("mg_events", e))?;
        Ok(EventReader { ring })
    }

    fn io(&self, path: &Path, source: io::Error) -> BpfError {
        BpfError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The consumer side of the `mg_events` ring buffer. Its descriptor
/// becomes readable when events are queued (for epoll / tokio `AsyncFd`).
pub struct EventReader {
    ring: RingBuf<MapData>,
}

impl std::fmt::Debug for EventReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventReader")
            .field("fd", &self.ring.as_raw_fd())
            .finish()
    }
}

impl EventReader {
    /// Waits until events are queued or `timeout` passes; `Ok(true)` when
    /// there is something to drain.
    pub fn wait(&self, timeout: std::time::Duration) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.ring.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: `pfd` is one valid pollfd on this stack frame, and the
        // count passed is 1; the descriptor is the ring buffer map's, owned
        // by `self.ring` and open for the whole call (borrowed via &self).
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        match r {
            r if r < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    Ok(false)
                } else {
                    Err(e)
                }
            }
            0 => Ok(false),
            _ => Ok(pfd.revents & libc::POLLIN != 0),
        }
    }

    /// Every event queued now.
    pub fn drain(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        while let Some(item) = self.ring.next() {
            if let Some(e) = Event::parse(&item) {
                out.push(e);
            }
        }
        out
    }
}

impl AsRawFd for EventReader {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.ring.as_raw_fd()
    }
}

/// A refusal, as the programs report it (`struct mg_event`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub cgroup_id: u64,
    pub pid: u32,
    /// "connect", "sendmsg" or "socket".
    pub syscall: &'static str,
    pub family: u32,
    pub port: u16,
    /// Destination (v4: first 4 bytes).
    pub addr: [u8; 16],
    pub sock_type: u32,
    pub protocol: u32,
}

impl Event {
    fn parse(b: &[u8]) -> Option<Event> {
        let u32_at = |o: usize| -> Option<u32> {
            Some(u32::from_ne_bytes(b.get(o..o + 4)?.try_into().ok()?))
        };
        let cgroup_id = u64::from_ne_bytes(b.get(0..8)?.try_into().ok()?);
        let addr: [u8; 16] = b.get(24..40)?.try_into().ok()?;
        Some(Event {
            cgroup_id,
            pid: u32_at(8)?,
            syscall: match u32_at(12)? {
                1 => "connect",
                2 => "sendmsg",
                _ => "socket",
            },
            family: u32_at(16)?,
            port: u16::try_from(u32_at(20)?).ok()?,
            addr,
            sock_type: u32_at(40)?,
            protocol: u32_at(44)?,
        })
    }

    /// The destination as an address, when there is one.
    pub fn destination(&self) -> Option<std::net::IpAddr> {
        match self.family as i32 {
            libc::AF_INET => {
                let [a, b, c, d, ..] = self.addr;
                Some(std::net::Ipv4Addr::new(a, b, c, d).into())
            }
            libc::AF_INET6 if self.syscall != "socket" => {
                Some(std::net::Ipv6Addr::from(self.addr).into())
            }
            _ => None,
        }
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

/// The definitions of metaguard's maps in `object` (its ELF `.maps`).
fn object_map_shapes(object: &[u8]) -> Result<BTreeMap<&'static str, MapShape>, BpfError> {
    let obj = aya_obj::Object::parse(object)
        .map_err(|e| BpfError::Load(format!("parsing the object: {e}")))?;
    Ok(MAPS
        .into_iter()
        .filter_map(|name| {
            let def = obj.maps.get(name)?;
            Some((
                name,
                MapShape {
                    map_type: def.map_type(),
                    key_size: def.key_size(),
                    value_size: def.value_size(),
                    max_entries: def.max_entries(),
                },
            ))
        })
        .collect())
}

/// Whether `link` runs what `ebpf` loads for `hook` (see [`is_current`]),
/// and the program it runs.
fn runs_current(
    ebpf: &mut Ebpf,
    hook: Hook,
    link: &PinnedLink,
    pinned_maps: &[u32],
) -> Result<(bool, ProgInfo), BpfError> {
    let ours = program_fd(ebpf, hook)?;
    let want = prog_info(ours).map_err(|e| syscall("BPF_OBJ_GET_INFO_BY_FD", hook.program(), e))?;
    let theirs = program_info(link.info.prog_id)?;
    Ok((is_current(&theirs, &want, pinned_maps), theirs))
}

/// Whether a link's program `theirs` is what `want` (the object's program
/// for the same hook, loaded on the pinned maps) would run: same tag, and
/// only pinned maps.
fn is_current(theirs: &ProgInfo, want: &ProgInfo, pinned_maps: &[u32]) -> bool {
    theirs.tag == want.tag && theirs.map_ids.iter().all(|m| pinned_maps.contains(m))
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

/// Loads `object`'s maps, reused from (or pinned into) `map_dir` — always
/// given: without it aya would pin into /sys/fs/bpf. Programs are loaded
/// later, one by one.
fn load_object(object: &[u8], map_dir: &Path) -> Result<Ebpf, BpfError> {
    EbpfLoader::new()
        .map_pin_path(map_dir)
        .load(object)
        .map_err(|e| BpfError::Load(format!("{e:#}")))
}

/// The shape and id of the map pinned at `pin`.
fn pinned_map(pin: &Path) -> Result<(MapShape, u32), BpfError> {
    let object = pin.display().to_string();
    let fd = obj_get(pin).map_err(|e| syscall("BPF_OBJ_GET", &object, e))?;
    map_info(fd.as_fd()).map_err(|e| syscall("BPF_OBJ_GET_INFO_BY_FD", &object, e))
}

/// Loads `hook`'s program (once per object) and returns its descriptor.
fn program_fd(ebpf: &mut Ebpf, hook: Hook) -> Result<BorrowedFd<'_>, BpfError> {
    let name = hook.program();
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| BpfError::Load(format!("program {name} missing from the object")))?;
    let load_err = |e: aya::programs::ProgramError| BpfError::Load(format!("{name}: {e:#}"));
    if hook == Hook::SockCreate {
        let p: &mut CgroupSock = prog.try_into().map_err(load_err)?;
        if p.fd().is_err() {
            p.load().map_err(load_err)?;
        }
        Ok(p.fd().map_err(load_err)?.as_fd())
    } else {
        let p: &mut CgroupSockAddr = prog.try_into().map_err(load_err)?;
        if p.fd().is_err() {
            p.load().map_err(load_err)?;
        }
        Ok(p.fd().map_err(load_err)?.as_fd())
    }
}

fn open_hash<K: aya::Pod, V: aya::Pod>(
    dir: &Path,
    name: &'static str,
) -> Result<BpfHashMap<MapData, K, V>, BpfError> {
    let data = MapData::from_pin(dir.join(name)).map_err(|e| map_err(name, e))?;
    BpfHashMap::try_from(Map::HashMap(data)).map_err(|e| map_err(name, e))
}

fn sync_maps(ebpf: &mut Ebpf, want: &MapContents) -> Result<(), BpfError> {
    fn sync<K: aya::Pod + Ord, V: aya::Pod>(
        ebpf: &mut Ebpf,
        name: &'static str,
        want: &BTreeMap<K, V>,
    ) -> Result<(), BpfError> {
        let map = ebpf
            .map_mut(name)
            .ok_or_else(|| map_err(name, "missing from the object"))?;
        let mut map: BpfHashMap<&mut MapData, K, V> =
            BpfHashMap::try_from(map).map_err(|e| map_err(name, e))?;
        for (k, v) in want {
            map.insert(k, v, 0).map_err(|e| map_err(name, e))?;
        }
        let stale: Vec<K> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !want.contains_key(k))
            .collect();
        for k in stale {
            map.remove(&k).map_err(|e| map_err(name, e))?;
        }
        Ok(())
    }
    let policy: BTreeMap<u64, [u32; 2]> = want
        .policy
        .iter()
        .map(|(k, (r, b))| (*k, [*r, *b]))
        .collect();
    // Endpoints before the policy, so a newly guarded cgroup never sees an
    // endpoint set older than its decision.
    sync(ebpf, "mg_ep4", &want.ep4)?;
    sync(ebpf, "mg_ep6", &want.ep6)?;
    sync(ebpf, "mg_policy", &policy)
}

// ---------------------------------------------------------------------------
// Raw bpf(2) commands aya 0.13 does not expose.

#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    target_fd: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
}

#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

#[repr(C)]
#[derive(Default)]
struct GetFdByIdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkDetachAttr {
    link_fd: u32,
}

/// `struct bpf_link_info` up to the cgroup member of its union.
#[repr(C)]
#[derive(Default)]
struct RawLinkInfo {
    type_: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    cgroup_id: u64,
    attach_type: u32,
    _rest: [u32; 9],
}

/// `struct bpf_prog_info` up to `map_ids` (the kernel fills what fits).
#[repr(C)]
#[derive(Default)]
struct RawProgInfo {
    type_: u32,
    id: u32,
    tag: [u8; 8],
    jited_prog_len: u32,
    xlated_prog_len: u32,
    jited_prog_insns: u64,
    xlated_prog_insns: u64,
    load_time: u64,
    created_by_uid: u32,
    nr_map_ids: u32,
    map_ids: u64,
}

/// `struct bpf_map_info` up to `map_flags`.
#[repr(C)]
#[derive(Default)]
struct RawMapInfo {
    type_: u32,
    id: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
}

/// bpf(2) with one command's attribute struct.
///
/// # Safety
/// `attr` must be the attribute layout the kernel expects for `cmd`, and
/// every pointer inside it must be valid for the access `cmd` makes
/// (reads of a NUL-terminated path, writes of `prog_cnt` ids or
/// `info_len` bytes) for the duration of the call.
unsafe fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: the caller upholds the layout and pointer contract above; the
    // size passed is exactly that of `*attr`, which the kernel copies in
    // (and, for query/info, back out) within this call only.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn fd_from(r: libc::c_long) -> io::Result<OwnedFd> {
    let fd = i32::try_from(r).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    // SAFETY: `fd` was just returned by a successful bpf() call that creates
    // a new descriptor (LINK_CREATE, OBJ_GET); nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn link_create(
    prog: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        flags: 0,
    };
    // SAFETY: LinkCreateAttr is the head of bpf_attr.link_create (prog_fd,
    // target_fd, attach_type, flags); it holds no pointers. Both descriptors
    // are borrowed for the call.
    fd_from(unsafe { sys_bpf(BPF_LINK_CREATE, &mut attr) }?)
}

fn path_cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c = path_cstring(path)?;
    let mut attr = ObjAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
    };
    // SAFETY: ObjAttr is bpf_attr's obj member (pathname, bpf_fd,
    // file_flags); `pathname` points to `c`, a NUL-terminated string alive
    // until the end of this function.
    unsafe { sys_bpf(BPF_OBJ_PIN, &mut attr) }.map(drop)
}

fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c = path_cstring(path)?;
    let mut attr = ObjAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: as in obj_pin: `pathname` points to the live NUL-terminated `c`.
    fd_from(unsafe { sys_bpf(BPF_OBJ_GET, &mut attr) }?)
}

/// BPF_OBJ_GET_INFO_BY_FD into `info`.
///
/// # Safety
/// `T` must be a prefix of the info struct the kernel writes for the kind
/// of object `fd` refers to, and every pointer inside `info` must be valid
/// for the length the kernel reads beside it (the kernel writes at most
/// `size_of::<T>()` bytes into `info` itself).
unsafe fn obj_info<T>(fd: BorrowedFd<'_>, info: &mut T) -> io::Result<()> {
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<T>() as u32,
        info: info as *mut T as u64,
    };
    // SAFETY: InfoAttr is bpf_attr's info member; `info` points to a `T`
    // exclusively borrowed for this call, `info_len` is its size, and the
    // caller vouches for `T`'s layout and any pointers inside it.
    unsafe { sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }.map(drop)
}

fn link_info(fd: BorrowedFd<'_>) -> io::Result<LinkInfo> {
    let mut info = RawLinkInfo::default();
    // SAFETY: RawLinkInfo is the head of struct bpf_link_info (through the
    // cgroup member of its union, padded) and holds no pointers.
    unsafe { obj_info(fd, &mut info) }?;
    Ok(LinkInfo {
        link_id: info.id,
        prog_id: info.prog_id,
        cgroup_id: info.cgroup_id,
        attach_type: info.attach_type,
    })
}

/// The most map ids read per program (guard.bpf.c's use four).
const MAX_PROG_MAPS: usize = 64;

fn prog_info(fd: BorrowedFd<'_>) -> io::Result<ProgInfo> {
    let mut ids = [0u32; MAX_PROG_MAPS];
    let mut info = RawProgInfo {
        nr_map_ids: MAX_PROG_MAPS as u32,
        map_ids: ids.as_mut_ptr() as u64,
        ..RawProgInfo::default()
    };
    // SAFETY: RawProgInfo is the head of struct bpf_prog_info through
    // `map_ids`. Its only pointer with a non-zero length beside it is
    // `map_ids`, which points to `ids`, a local array of `nr_map_ids` u32s
    // alive until the end of this function; the kernel writes at most
    // `nr_map_ids` ids there (the instruction pointers are null with
    // lengths 0, so nothing is written for them).
    unsafe { obj_info(fd, &mut info) }?;
    let n = (info.nr_map_ids as usize).min(MAX_PROG_MAPS);
    Ok(ProgInfo {
        id: info.id,
        tag: info.tag,
        map_ids: ids[..n].to_vec(),
    })
}

fn map_info(fd: BorrowedFd<'_>) -> io::Result<(MapShape, u32)> {
    let mut info = RawMapInfo::default();
    // SAFETY: RawMapInfo is the head of struct bpf_map_info (through
    // map_flags) and holds no pointers.
    unsafe { obj_info(fd, &mut info) }?;
    Ok((
        MapShape {
            map_type: info.type_,
            key_size: info.key_size,
            value_size: info.value_size,
            max_entries: info.max_entries,
        },
        info.id,
    ))
}

fn prog_get_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = GetFdByIdAttr {
        id,
        ..GetFdByIdAttr::default()
    };
    // SAFETY: GetFdByIdAttr is bpf_attr's get-by-id member (prog_id,
    // next_id, open_flags); it holds no pointers.
    fd_from(unsafe { sys_bpf(BPF_PROG_GET_FD_BY_ID, &mut attr) }?)
}

/// Swaps `new_prog` into `link` if it still runs `old_prog`.
fn link_update(
    link: BorrowedFd<'_>,
    new_prog: BorrowedFd<'_>,
    old_prog: BorrowedFd<'_>,
) -> io::Result<()> {
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: new_prog.as_raw_fd() as u32,
        flags: BPF_F_REPLACE,
        old_prog_fd: old_prog.as_raw_fd() as u32,
    };
    // SAFETY: LinkUpdateAttr is bpf_attr's link_update member (link_fd,
    // new_prog_fd, flags, old_prog_fd); it holds no pointers, and the three
    // descriptors are borrowed for the call.
    unsafe { sys_bpf(BPF_LINK_UPDATE, &mut attr) }.map(drop)
}

fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkDetachAttr {
        link_fd: link.as_raw_fd() as u32,
    };
    // SAFETY: LinkDetachAttr is bpf_attr's link_detach member (link_fd); it
    // holds no pointers and the descriptor is borrowed for the call.
    unsafe { sys_bpf(BPF_LINK_DETACH, &mut attr) }.map(drop)
}

/// BPF_PROG_QUERY; returns how many programs are attached (and fills
/// `ids` up to its length).
fn prog_query_raw(target_fd: i32, attach_type: u32, ids: Option<&mut [u32]>) -> io::Result<usize> {
    let (ptr, cnt) = match ids {
        Some(ids) => (ids.as_mut_ptr() as u64, ids.len() as u32),
        None => (0, 0),
    };
    let mut attr = QueryAttr {
        target_fd: target_fd as u32,
        attach_type,
        prog_ids: ptr,
        prog_cnt: cnt,
        ..QueryAttr::default()
    };
    // SAFETY: QueryAttr is bpf_attr's query member up to prog_cnt; the
    // kernel writes at most `prog_cnt` u32 ids to `prog_ids`, which points
    // into the caller's exclusively borrowed slice of that length (or is
    // null with a count of 0).
    unsafe { sys_bpf(BPF_PROG_QUERY, &mut attr) }?;
    Ok(attr.prog_cnt as usize)
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
