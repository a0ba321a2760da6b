//! The layer's objects under one pin directory: applying the object
//! (maps, programs, links) in place, checking it, reading it back and
//! removing it; and the loader that reuses pinned maps.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use aya::maps::{HashMap as BpfHashMap, Map, MapData, RingBuf};
use aya::programs::{CgroupSock, CgroupSockAddr};
use aya::{Ebpf, EbpfLoader};

use super::raw::{
    link_create, link_info, link_update, map_info, obj_get, obj_pin, prog_get_fd_by_id, prog_info,
};
use super::{
    check_bpffs, link_pin_name, map_err, program_info, syscall, ApplyOutcome, Attachment, BpfError,
    Event, EventReader, Hook, MapContents, MapShape, PinnedLink, ProgInfo, LINK_PREFIX, MAPS,
};

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
        let netns = open_hash::<u64, [u32; 2]>(&self.dir, "mg_netns")?;
        for kv in netns.iter() {
            let (k, v) = kv.map_err(|e| map_err("mg_netns", e))?;
            out.netns.insert(k, (v[0], v[1]));
        }
        Ok(out)
    }

    /// Makes the pinned `mg_netns` map hold exactly `want`, without loading
    /// anything: the daemon's answer to a namespace that appeared or went.
    /// Listed namespaces are written before the default (key 0), and the
    /// default removed before them, so the host's namespace is never
    /// without its entry while a default applies.
    pub fn set_netns(&self, want: &BTreeMap<u64, (u32, u32)>) -> Result<(), BpfError> {
        let mut map = open_hash::<u64, [u32; 2]>(&self.dir, "mg_netns")?;
        sync_netns(&mut map, want)
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

/// The definitions of metaguard's maps in `object` (its ELF `.maps`).
pub(super) fn object_map_shapes(
    object: &[u8],
) -> Result<BTreeMap<&'static str, MapShape>, BpfError> {
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
pub(super) fn runs_current(
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
pub(super) fn is_current(theirs: &ProgInfo, want: &ProgInfo, pinned_maps: &[u32]) -> bool {
    theirs.tag == want.tag && theirs.map_ids.iter().all(|m| pinned_maps.contains(m))
}

/// Loads `object`'s maps, reused from (or pinned into) `map_dir` — always
/// given: without it aya would pin into /sys/fs/bpf. Programs are loaded
/// later, one by one.
pub(super) fn load_object(object: &[u8], map_dir: &Path) -> Result<Ebpf, BpfError> {
    EbpfLoader::new()
        .map_pin_path(map_dir)
        .load(object)
        .map_err(|e| BpfError::Load(format!("{e:#}")))
}

/// The shape and id of the map pinned at `pin`.
pub(super) fn pinned_map(pin: &Path) -> Result<(MapShape, u32), BpfError> {
    let object = pin.display().to_string();
    let fd = obj_get(pin).map_err(|e| syscall("BPF_OBJ_GET", &object, e))?;
    map_info(fd.as_fd()).map_err(|e| syscall("BPF_OBJ_GET_INFO_BY_FD", &object, e))
}

/// Loads `hook`'s program (once per object) and returns its descriptor.
pub(super) fn program_fd(ebpf: &mut Ebpf, hook: Hook) -> Result<BorrowedFd<'_>, BpfError> {
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

pub(super) fn open_hash<K: aya::Pod, V: aya::Pod>(
    dir: &Path,
    name: &'static str,
) -> Result<BpfHashMap<MapData, K, V>, BpfError> {
    let data = MapData::from_pin(dir.join(name)).map_err(|e| map_err(name, e))?;
    BpfHashMap::try_from(Map::HashMap(data)).map_err(|e| map_err(name, e))
}

pub(super) fn sync_maps(ebpf: &mut Ebpf, want: &MapContents) -> Result<(), BpfError> {
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
    sync(ebpf, "mg_policy", &policy)?;
    let map = ebpf
        .map_mut("mg_netns")
        .ok_or_else(|| map_err("mg_netns", "missing from the object"))?;
    let mut map: BpfHashMap<&mut MapData, u64, [u32; 2]> =
        BpfHashMap::try_from(map).map_err(|e| map_err("mg_netns", e))?;
    sync_netns(&mut map, &want.netns)
}

/// `mg_netns` made equal to `want`, in an order that never leaves the
/// default (key 0) in force without the namespaces listed beside it (the
/// host's above all): listed entries are inserted first and the default
/// last; a default that goes is removed first.
fn sync_netns<T: std::borrow::BorrowMut<MapData>>(
    map: &mut BpfHashMap<T, u64, [u32; 2]>,
    want: &BTreeMap<u64, (u32, u32)>,
) -> Result<(), BpfError> {
    let err = |e| map_err("mg_netns", e);
    if !want.contains_key(&0) && map.get(&0, 0).is_ok() {
        map.remove(&0).map_err(err)?;
    }
    let listed = want.iter().filter(|(k, _)| **k != 0);
    for (k, (rule, bits)) in listed.chain(want.get_key_value(&0)) {
        map.insert(k, [*rule, *bits], 0).map_err(err)?;
    }
    let stale: Vec<u64> = map
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !want.contains_key(k))
        .collect();
    for k in stale {
        map.remove(&k).map_err(err)?;
    }
    Ok(())
}
