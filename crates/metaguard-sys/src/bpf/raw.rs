//! Raw bpf(2) commands aya 0.13 does not expose, each in a small wrapper
//! whose `// SAFETY:` comment argues the attribute struct's invariant.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::{LinkInfo, MapShape, ProgInfo};

pub(super) const BPF_OBJ_PIN: libc::c_long = 6;
pub(super) const BPF_OBJ_GET: libc::c_long = 7;
pub(super) const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
pub(super) const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
pub(super) const BPF_PROG_QUERY: libc::c_long = 16;
pub(super) const BPF_LINK_CREATE: libc::c_long = 28;
pub(super) const BPF_LINK_UPDATE: libc::c_long = 29;
pub(super) const BPF_LINK_DETACH: libc::c_long = 34;
/// `BPF_LINK_UPDATE` flag: replace only if the link still runs `old_prog_fd`.
pub(super) const BPF_F_REPLACE: u32 = 1 << 2;

#[repr(C)]
#[derive(Default)]
pub(super) struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

#[repr(C)]
#[derive(Default)]
pub(super) struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

#[repr(C)]
#[derive(Default)]
pub(super) struct QueryAttr {
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
pub(super) struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

#[repr(C)]
#[derive(Default)]
pub(super) struct GetFdByIdAttr {
    id: u32,
    next_id: u32,
    open_flags: u32,
}

#[repr(C)]
#[derive(Default)]
pub(super) struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

#[repr(C)]
#[derive(Default)]
pub(super) struct LinkDetachAttr {
    link_fd: u32,
}

/// `struct bpf_link_info` up to the cgroup member of its union.
#[repr(C)]
#[derive(Default)]
pub(super) struct RawLinkInfo {
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
pub(super) struct RawProgInfo {
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
pub(super) struct RawMapInfo {
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
pub(super) unsafe fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
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

pub(super) fn fd_from(r: libc::c_long) -> io::Result<OwnedFd> {
    let fd = i32::try_from(r).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    // SAFETY: `fd` was just returned by a successful bpf() call that creates
    // a new descriptor (LINK_CREATE, OBJ_GET); nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(super) fn link_create(
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

pub(super) fn path_cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

pub(super) fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
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

pub(super) fn obj_get(path: &Path) -> io::Result<OwnedFd> {
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
pub(super) unsafe fn obj_info<T>(fd: BorrowedFd<'_>, info: &mut T) -> io::Result<()> {
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

pub(super) fn link_info(fd: BorrowedFd<'_>) -> io::Result<LinkInfo> {
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
pub(super) const MAX_PROG_MAPS: usize = 64;

pub(super) fn prog_info(fd: BorrowedFd<'_>) -> io::Result<ProgInfo> {
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

pub(super) fn map_info(fd: BorrowedFd<'_>) -> io::Result<(MapShape, u32)> {
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

pub(super) fn prog_get_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    let mut attr = GetFdByIdAttr {
        id,
        ..GetFdByIdAttr::default()
    };
    // SAFETY: GetFdByIdAttr is bpf_attr's get-by-id member (prog_id,
    // next_id, open_flags); it holds no pointers.
    fd_from(unsafe { sys_bpf(BPF_PROG_GET_FD_BY_ID, &mut attr) }?)
}

/// Swaps `new_prog` into `link` if it still runs `old_prog`.
pub(super) fn link_update(
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

pub(super) fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = LinkDetachAttr {
        link_fd: link.as_raw_fd() as u32,
    };
    // SAFETY: LinkDetachAttr is bpf_attr's link_detach member (link_fd); it
    // holds no pointers and the descriptor is borrowed for the call.
    unsafe { sys_bpf(BPF_LINK_DETACH, &mut attr) }.map(drop)
}

/// BPF_PROG_QUERY; returns how many programs are attached (and fills
/// `ids` up to its length).
pub(super) fn prog_query_raw(
    target_fd: i32,
    attach_type: u32,
    ids: Option<&mut [u32]>,
) -> io::Result<usize> {
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
