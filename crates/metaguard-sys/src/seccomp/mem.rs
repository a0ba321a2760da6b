//! Copying from and to the child's memory with `process_vm_readv` /
//! `process_vm_writev` (ptrace-mode access, which a parent has over its
//! same-uid, dumpable descendants).

use std::io;

/// Copies `len` bytes at `addr` in process `pid` into a new buffer.
/// A short copy (an unmapped page) is `EFAULT`, as the kernel would say.
pub fn read(pid: u32, addr: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    if len == 0 {
        return Ok(buf);
    }
    if addr == 0 {
        return Err(io::Error::from_raw_os_error(libc::EFAULT));
    }
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: len,
    };
    let remote = libc::iovec {
        iov_base: addr as usize as *mut libc::c_void,
        iov_len: len,
    };
    // SAFETY: `local` describes `buf`, which is `len` bytes long, owned
    // here and alive for the call; the kernel writes at most `len` bytes
    // into it. `remote` is only dereferenced by the kernel, in the other
    // process's address space, with its own access checks.
    let n = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != len {
        return Err(io::Error::from_raw_os_error(libc::EFAULT));
    }
    Ok(buf)
}

/// Writes `data` at `addr` in process `pid`.
pub fn write(pid: u32, addr: u64, data: &[u8]) -> io::Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    let local = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as usize as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: `local` describes `data`, alive and `data.len()` bytes long;
    // process_vm_writev only reads from it (the `*mut` is the iovec type's
    // spelling). `remote` is written by the kernel in the other process,
    // with its own access checks.
    let n = unsafe { libc::process_vm_writev(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != data.len() {
        return Err(io::Error::from_raw_os_error(libc::EFAULT));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_writes_own_memory() {
        let mut target = *b"metadata";
        let me = std::process::id();
        let addr = target.as_mut_ptr() as u64;
        assert_eq!(read(me, addr, 8).expect("read"), b"metadata");
        write(me, addr, b"META").expect("write");
        // Read back through the kernel, not through the (possibly cached)
        // local value.
        assert_eq!(read(me, addr, 8).expect("read"), b"METAdata");
        std::hint::black_box(&mut target);
        assert_eq!(
            read(me, 0, 4).expect_err("null").raw_os_error(),
            Some(libc::EFAULT)
        );
        assert_eq!(read(me, addr, 0).expect("empty"), b"");
    }
}
