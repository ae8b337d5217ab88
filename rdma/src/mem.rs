//! Memory the fabric may access: anonymous mappings, locked in RAM, and the
//! RLIMIT_MEMLOCK check that precedes them. (The kernel refuses long-term
//! write pins of file mappings, so a landing ring is never file-backed.)

use std::io;

/// RLIMIT_MEMLOCK's soft limit in bytes; `None` when unlimited.
pub fn memlock_limit() -> io::Result<Option<u64>> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(if r.rlim_cur == libc::RLIM_INFINITY {
        None
    } else {
        Some(r.rlim_cur)
    })
}

/// Fails, naming the limit and the fix, when `need` bytes of locked memory
/// exceed RLIMIT_MEMLOCK. `what` names the setting that asks for them.
pub fn check_memlock(need: u64, what: &str) -> Result<(), String> {
    match memlock_limit() {
        Err(e) => Err(format!("cannot read RLIMIT_MEMLOCK: {e}")),
        Ok(None) => Ok(()),
        Ok(Some(limit)) if need <= limit => Ok(()),
        Ok(Some(limit)) => Err(format!(
            "{what} needs {need} bytes ({} KiB) of locked memory, but RLIMIT_MEMLOCK is {limit} bytes ({} KiB): \
             raise the limit (systemd: LimitMEMLOCK=infinity in the unit, as configs/deltamirror@.service has; a shell: `ulimit -l unlimited`; \
             or memlock in /etc/security/limits.conf) or lower {what}",
            need.div_ceil(1024),
            limit / 1024
        )),
    }
}

/// An anonymous, page-aligned, zeroed mapping locked in RAM.
pub struct Region {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the region is plain memory owned by this value; whoever holds it
// (one connection, used by one thread at a time) is its only user.
unsafe impl Send for Region {}

impl Region {
    pub fn new(len: usize) -> io::Result<Region> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty region"));
        }
        // SAFETY: a fresh private anonymous mapping; no existing memory is
        // touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: p..p+len is the mapping just made.
        if unsafe { libc::mlock(p, len) } != 0 {
            let e = io::Error::last_os_error();
            // SAFETY: unmapping the mapping made above, never used.
            unsafe { libc::munmap(p, len) };
            return Err(io::Error::new(
                e.kind(),
                format!("mlock of {len} bytes failed (RLIMIT_MEMLOCK?): {e}"),
            ));
        }
        Ok(Region { ptr: p.cast(), len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// The bytes at `off..off+len`.
    ///
    /// Panics if the range is outside the region (a caller bug).
    pub fn slice(&self, off: usize, len: usize) -> &[u8] {
        assert!(off.checked_add(len).is_some_and(|e| e <= self.len));
        // SAFETY: the range is inside the live mapping (checked above). The
        // fabric may write it only where the caller's protocol has handed
        // that range to the peer, which it reads only after the completion.
        unsafe { std::slice::from_raw_parts(self.ptr.add(off), len) }
    }

    /// The bytes at `off..off+len`, to fill before handing them to the fabric.
    pub fn slice_mut(&mut self, off: usize, len: usize) -> &mut [u8] {
        assert!(off.checked_add(len).is_some_and(|e| e <= self.len));
        // SAFETY: inside the live mapping (checked above); `&mut self` makes
        // this the only Rust reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(off), len) }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; every registration of it is
        // closed before (the owner drops its `Mr` first).
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}
