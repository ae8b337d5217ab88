//! Block backends behind one narrow, completion-based trait.
//!
//! A backend is owned by one reactor thread. Requests are queued with
//! [`Backend::submit`], handed to the kernel by [`Backend::flush_submissions`]
//! (one syscall for a whole batch), and their completions are reaped by
//! [`Backend::reap`]. Buffers are owned by the operation until its completion
//! comes back, even if the caller has lost interest.
//!
//! Error contract (all backends): a request that is misaligned to
//! [`Backend::block_size`] completes with `Err(EINVAL)`, one that reaches past
//! [`Backend::size_bytes`] with `Err(ERANGE)` (front-ends map it to "LBA out
//! of range"); device errors come back as the kernel's errno. Backends never
//! panic on an I/O error. A data transfer either moves the whole buffer
//! (`Ok(len)`) or fails; a short transfer is reported as `Err(EIO)`.
//!
//! Waking up: completions that are ready without the kernel (in-memory
//! backend, injected faults, validation errors, synchronous discard) are
//! returned by the next [`Backend::reap`] and do not signal
//! [`Backend::wait_fd`]; [`Backend::has_ready`] tells whether some are
//! waiting. A reactor therefore reaps after submitting and only sleeps when
//! `has_ready()` is false. A backend with a ring of its own (io_uring) can
//! host the whole sleep ([`Backend::wait`]: its completions and the caller's
//! fds in one system call); the others leave it to the caller's poll(2) on
//! its fds and `wait_fd`.

pub mod aligned;
pub mod fault;
pub mod handover;
pub mod mem;
pub mod uring;

pub use aligned::{AlignedBuf, BufPool, BUF_ALIGN_BYTES};
pub use fault::{FaultBackend, FaultControl, FaultOps};
pub use handover::{HandOver, HandOverPolicy, HandOverStats};
pub use mem::MemBackend;
pub use uring::{
    create_file_device, create_file_device_as, Preallocate, UringBackend, UringConfig,
    DEFAULT_SUBMIT_HOLD_US,
};
pub use volume::SharedBuf;

use std::os::unix::io::RawFd;

use volume::IoBufPool;

/// A piece of a vectored write: `len` bytes of `buf` from byte `start`. The
/// operation holds the buffer (a clone of the shared handle) until its
/// completion is reaped.
#[derive(Clone, Debug)]
pub struct IoSeg {
    pub buf: SharedBuf,
    pub start: usize,
    pub len: usize,
}

impl IoSeg {
    /// The whole of `buf`.
    pub fn whole(buf: SharedBuf) -> IoSeg {
        let len = buf.len();
        IoSeg { buf, start: 0, len }
    }

    /// The bytes this piece writes.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
}

/// Longest list of pieces one [`BackendOp::WriteVecFd`] may carry (the
/// kernel's `IOV_MAX`).
pub const MAX_WRITE_SEGS: usize = 1024;

/// One backend operation. Offsets and lengths are bytes, aligned to
/// [`Backend::block_size`].
#[derive(Debug)]
pub enum BackendOp {
    Read {
        offset: u64,
        buf: AlignedBuf,
    },
    Write {
        offset: u64,
        buf: AlignedBuf,
        fua: bool,
    },
    /// Writes a buffer others share too (a payload the ring and the link
    /// also hold): the operation keeps its clone until the completion is
    /// reaped, and the completion hands no buffer back. A backend with a
    /// registered pool ([`Backend::register_pool`]) writes it as a fixed
    /// buffer when it lies in that pool.
    WriteShared {
        offset: u64,
        buf: SharedBuf,
        fua: bool,
    },
    /// Make every completed write durable (fdatasync / NVMe flush).
    Flush,
    /// Deallocate a range. Files and the in-memory backend read it back as
    /// zeroes; on a block device (BLKDISCARD) the contents afterwards are
    /// whatever the device guarantees, so use `WriteZeroes` where both mirror
    /// nodes must read identical data.
    Discard {
        offset: u64,
        len: u64,
    },
    /// Make a range read back as zeroes (fallocate ZERO_RANGE, BLKZEROOUT).
    WriteZeroes {
        offset: u64,
        len: u64,
    },
    /// Make the data of another file durable (fdatasync on `fd`); used for the
    /// persistent ring so its flush runs beside the disk I/O.
    SyncFd {
        fd: RawFd,
    },
    /// Write `segs`, one after the other, to another file at byte `offset`
    /// (one `pwritev2`; the persistent ring's batch write). The pieces'
    /// addresses and lengths must suit that file's O_DIRECT alignment; at
    /// most [`MAX_WRITE_SEGS`] pieces and `u32::MAX` bytes. A short write
    /// completes with `Err(EIO)`, like any data transfer. With `dsync` the
    /// write carries `RWF_DSYNC`: it completes only once its bytes are
    /// durable (a FUA write, or the write and a cache flush, as the device
    /// needs), so no separate `SyncFd` is needed for them.
    WriteVecFd {
        fd: RawFd,
        offset: u64,
        segs: Vec<IoSeg>,
        dsync: bool,
    },
}

/// A completed operation: the tag given at submission, the result (bytes
/// transferred or a negative errno) and the buffer handed back.
#[derive(Debug)]
pub struct BackendCompletion {
    pub tag: u64,
    /// Bytes transferred (0 for non-data ops) or `Err(errno)`.
    pub result: Result<u32, i32>,
    pub buf: Option<AlignedBuf>,
}

pub trait Backend: Send {
    /// Device size in bytes.
    fn size_bytes(&self) -> u64;
    /// Logical block size in bytes (alignment required by O_DIRECT).
    fn block_size(&self) -> u32;
    /// Queue an operation. Fails only when the submission queue is full
    /// (`queue_depth` operations already in flight); the op is handed back.
    fn submit(&mut self, tag: u64, op: BackendOp) -> Result<(), BackendOp>;
    /// Hand queued operations to the kernel (no-op for synchronous backends).
    fn flush_submissions(&mut self);
    /// Move completed operations to `out`; returns how many were added.
    fn reap(&mut self, out: &mut Vec<BackendCompletion>) -> usize;
    /// Operations submitted and not yet reaped.
    fn in_flight(&self) -> usize;
    /// Most operations that may be in flight at once; `submit` hands back
    /// anything beyond this.
    fn queue_depth(&self) -> usize;
    /// A file descriptor that becomes readable when completions are ready
    /// (an eventfd), so an idle reactor can sleep in poll(2): call it just
    /// before that poll (the io_uring backend signals the fd only from this
    /// call to the next reap, so a busy reactor pays no signal or read per
    /// completion). `None` for backends that complete inline.
    fn wait_fd(&mut self) -> Option<RawFd>;
    /// Completions produced without the kernel (inline, injected, refused)
    /// are waiting for [`Backend::reap`]: they signal no fd, so the caller
    /// must not sleep.
    fn has_ready(&self) -> bool;
    /// Whether a `Discard` reads back as zeroes afterwards (files and memory
    /// do; a block device's BLKDISCARD promises nothing), so a mirror that
    /// needs both disks identical turns discards into `WriteZeroes` where it
    /// does not.
    fn discard_reads_zeroes(&self) -> bool;
    /// Sleeps inside the backend's own wait until one of its operations
    /// completes, one of `fds` is ready (`(fd, also_writable)`: readable,
    /// and writable too when asked) or `timeout_ms` passes: one system call
    /// for the device and the caller's fds. Returns false without sleeping
    /// when the backend cannot (it has no ring of its own, or no room for
    /// the polls now): the caller then sleeps in poll(2) on `fds` and
    /// [`Backend::wait_fd`]. Returns true at once if completions are ready.
    fn wait(&mut self, fds: &[(RawFd, bool)], timeout_ms: u64) -> bool {
        let _ = (fds, timeout_ms);
        false
    }
    /// After a [`Backend::wait`] that returned true: whether `fd` was seen
    /// ready since the last call (an eventfd that then needs draining).
    fn take_fired(&mut self, fd: RawFd) -> bool {
        let _ = fd;
        false
    }
    /// Arms a one-shot poll for `fd` becoming readable in the backend's
    /// kernel queue, without waiting (a no-op if one is armed already), so
    /// the caller can stop trying a socket that was empty and ask
    /// [`Backend::poll_fired`] instead: no system call until it has data.
    /// False when the backend has no such queue or no room now: the caller
    /// keeps trying the fd itself.
    fn arm_poll(&mut self, fd: RawFd) -> bool {
        let _ = fd;
        false
    }
    /// Whether the caller should read `fd` now: the poll
    /// [`Backend::arm_poll`] armed on it fired since the last call, or no
    /// poll is armed on it any more (it failed or was cancelled), or the
    /// backend arms no polls. Completions reaped on the way are kept for
    /// [`Backend::reap`].
    fn poll_fired(&mut self, fd: RawFd) -> bool {
        let _ = fd;
        true
    }
    /// Registers `pool`'s region with the backend's kernel queue once, so
    /// reads and writes of buffers inside it skip the per-request page
    /// pinning (io_uring fixed buffers). `Ok(false)`: the backend has no
    /// such queue (memory, nothing to do); `Err`: registration failed
    /// (memlock limit, region too large) and I/O stays plain. The backend
    /// keeps a handle on the pool, so the region outlives the registration.
    fn register_pool(&mut self, pool: &IoBufPool) -> Result<bool, String> {
        let _ = pool;
        Ok(false)
    }
    /// Data transfers issued as fixed-buffer operations so far.
    fn fixed_ops(&self) -> u64 {
        0
    }

    /// How queued entries reach the kernel now, and what the adaptive
    /// choice last measured ([`handover`]; no figures when the mode is
    /// fixed); `None` for a backend that submits nothing to a kernel.
    fn hand_over(&self) -> Option<(HandOver, Option<HandOverStats>)> {
        None
    }
}

impl BackendOp {
    /// Whether the operation changes the device's contents.
    pub fn is_mutating(&self) -> bool {
        matches!(
            self,
            BackendOp::Write { .. }
                | BackendOp::WriteShared { .. }
                | BackendOp::Discard { .. }
                | BackendOp::WriteZeroes { .. }
        )
    }

    /// The byte range the operation touches, if it addresses the device.
    pub fn byte_range(&self) -> Option<(u64, u64)> {
        match self {
            BackendOp::Read { offset, buf } | BackendOp::Write { offset, buf, .. } => {
                Some((*offset, buf.len() as u64))
            }
            BackendOp::WriteShared { offset, buf, .. } => Some((*offset, buf.len() as u64)),
            BackendOp::Discard { offset, len } | BackendOp::WriteZeroes { offset, len } => {
                Some((*offset, *len))
            }
            BackendOp::Flush | BackendOp::SyncFd { .. } | BackendOp::WriteVecFd { .. } => None,
        }
    }

    /// Give back the operation's buffer (for a completion that never ran).
    pub fn into_buf(self) -> Option<AlignedBuf> {
        match self {
            BackendOp::Read { buf, .. } | BackendOp::Write { buf, .. } => Some(buf),
            _ => None,
        }
    }
}

/// Check an operation against the device geometry; `Err(errno)` as described
/// in the module documentation. Data transfers must also fit in a `u32`.
pub fn validate_op(op: &BackendOp, size_bytes: u64, block_size: u32) -> Result<(), i32> {
    if let BackendOp::WriteVecFd { segs, .. } = op {
        let total: u64 = segs.iter().map(|s| s.len as u64).sum();
        if segs.len() > MAX_WRITE_SEGS || total > u64::from(u32::MAX) {
            return Err(libc::EINVAL);
        }
    }
    let Some((offset, len)) = op.byte_range() else {
        return Ok(());
    };
    let block = u64::from(block_size);
    if offset % block != 0 || len % block != 0 {
        return Err(libc::EINVAL);
    }
    if matches!(
        op,
        BackendOp::Read { .. } | BackendOp::Write { .. } | BackendOp::WriteShared { .. }
    ) && len > u64::from(u32::MAX)
    {
        return Err(libc::EINVAL);
    }
    match offset.checked_add(len) {
        Some(end) if end <= size_bytes => Ok(()),
        _ => Err(libc::ERANGE),
    }
}
