//! io_uring backend for a regular file or a block device (raw NVMe
//! namespaces included), opened with O_DIRECT.
//!
//! Reads, writes and flushes go through the ring. A node's buffer pool is
//! registered with the ring once ([`Backend::register_pool`]): a read or
//! write of a buffer inside it is a fixed-buffer operation (no page pinning
//! per request). Discard and write-zeroes
//! are synchronous system calls (fallocate or a block ioctl) whose results
//! are queued and returned by the next [`Backend::reap`], like every other
//! completion.

use super::handover::{HandOver, HandOverPolicy, HandOverState, HandOverStats};
use super::{validate_op, AlignedBuf, Backend, BackendCompletion, BackendOp, IoSeg};
use io_uring::{opcode, types, IoUring};
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::RawFd;
use std::path::Path;
use std::time::{Duration, Instant};
use volume::{IoBufPool, SharedBuf};

// Block-layer ioctls from <linux/fs.h> (generic encoding, as on x86_64 and
// aarch64): BLKDISCARD = _IO(0x12, 119), BLKZEROOUT = _IO(0x12, 127). The
// size and block size come from `crate::blockdev::geometry`.
const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// Size of the buffer used to write zeroes where fallocate is unsupported.
const ZERO_CHUNK_BYTES: usize = 256 * 1024;

#[derive(Clone, Debug)]
pub struct UringConfig {
    /// Most operations in flight at once (1..=4096).
    pub queue_depth: u32,
    /// Block size reported for regular files: 4096 (default) or 512. Block
    /// devices always report their logical block size (BLKSSZGET).
    pub file_block_size: u32,
    /// A regular file keeps its space on discard: the range is zeroed
    /// (`FALLOC_FL_ZERO_RANGE`, still allocated) instead of punched out, so
    /// a preallocated volume never becomes sparse ([`Preallocate`]).
    pub keep_space: bool,
    /// How long the end of a reactor pass may keep fewer than
    /// `SUBMIT_CHUNK_ENTRIES` queued entries back while the device is
    /// working on earlier ones of ours, so that the next ones join them
    /// and go out with one device notification (on a virtual disk each is
    /// a VM exit: 5-18 µs of the reactor's core on this VM when the other
    /// core is busy). Durability operations (flushes, `RWF_DSYNC` ring
    /// writes, FUA writes) and polls are never held, nor is anything when
    /// the device has nothing of ours in flight (a lone request at QD1 goes
    /// at once).
    /// 0: hand every pass's entries to the kernel at its end. Only in
    /// chunks ([`HandOver::InChunks`]).
    pub submit_hold_us: u32,
    /// Whether entries go to the kernel one at a time or in chunks
    /// (`reactor.disk_handover`): adaptive by default, by which completes
    /// more under the load of the moment
    /// ([`super::handover::HandOverChooser`]).
    pub hand_over: HandOverPolicy,
}

impl Default for UringConfig {
    fn default() -> UringConfig {
        UringConfig {
            queue_depth: 128,
            file_block_size: 4096,
            keep_space: false,
            submit_hold_us: DEFAULT_SUBMIT_HOLD_US,
            hand_over: HandOverPolicy::Adaptive,
        }
    }
}

/// [`UringConfig::submit_hold_us`] by default (`reactor.disk_submit_hold_us`).
pub const DEFAULT_SUBMIT_HOLD_US: u32 = 50;

/// How a file volume's space is taken when it is created or grown
/// ([`create_file_device_as`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preallocate {
    /// Sparse: blocks are allocated as they are first written, so a write
    /// can fail with ENOSPC once the filesystem is full.
    None,
    /// Every block reserved (`fallocate`): no write ever fails for want of
    /// space; the first write to a block still converts its extent.
    Space,
    /// Reserved and written with zeroes where the file is created or
    /// grown: no allocation or extent conversion on any later write.
    Full,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DeviceKind {
    File,
    Block,
}

/// An operation the kernel owns: its buffer stays here until the completion
/// arrives, even if the caller no longer cares.
struct InFlight {
    tag: u64,
    buf: Option<AlignedBuf>,
    /// The clone of a shared buffer a `WriteShared` writes from.
    shared: Option<SharedBuf>,
    /// A vectored write's pieces and the iovec array the SQE points to.
    vec: Option<(Vec<IoSeg>, Iovecs)>,
    /// Bytes a data transfer must move; `None` for flushes.
    transfer_len: Option<u32>,
}

/// The iovec array of a vectored write in flight.
struct Iovecs(Vec<libc::iovec>);

// SAFETY: the iovecs only point into the `SharedBuf`s kept beside them in the
// same `InFlight` (read-only, `Send` themselves); the array is never read
// through these pointers by this process, only by the kernel.
unsafe impl Send for Iovecs {}

/// The iovec of one piece of a vectored write.
pub(crate) fn iovec_of(seg: &IoSeg) -> libc::iovec {
    libc::iovec {
        iov_base: seg.buf.as_ptr().wrapping_add(seg.start) as *mut libc::c_void,
        iov_len: seg.len,
    }
}

/// Builds an SQE on the backend's own device: `fd` is the registered slot
/// when the file is registered, its raw descriptor otherwise.
macro_rules! own_fd {
    ($self:ident, $fd:ident => $build:expr) => {
        if $self.fixed_file {
            let $fd = types::Fixed(0);
            $build
        } else {
            let $fd = types::Fd($self.file.as_raw_fd());
            $build
        }
    };
}

pub struct UringBackend {
    ring: IoUring,
    file: File,
    kind: DeviceKind,
    /// [`UringConfig::keep_space`].
    keep_space: bool,
    direct: bool,
    size_bytes: u64,
    block_size: u32,
    queue_depth: usize,
    eventfd: OwnedFd,
    /// Whether completions signal `eventfd` now: only from `wait_fd` (a
    /// poll(2) fallback is about to sleep on it) to the next reap.
    eventfd_enabled: bool,
    /// The device's descriptor is registered with the ring (slot 0), so an
    /// SQE names it by index and the kernel skips the per-request file
    /// lookup and reference count; `false` if registration failed.
    fixed_file: bool,
    /// Indexed by the SQE's user_data.
    slots: Vec<Option<InFlight>>,
    free_slots: Vec<u32>,
    kernel_in_flight: usize,
    /// Completions produced without the kernel's ring.
    ready: VecDeque<BackendCompletion>,
    /// Allocated on first use of the write-zeroes fallback.
    zero_buf: Option<AlignedBuf>,
    /// One-shot polls [`Backend::wait`] armed and whose completion has
    /// not been reaped: (fd, events).
    armed_polls: Vec<(RawFd, u32)>,
    /// Fds whose poll fired since [`Backend::take_fired`] last asked.
    fired_polls: Vec<RawFd>,
    /// Reused by [`Backend::poll_fired`]'s reap.
    scratch: Vec<BackendCompletion>,
    /// The pool registered as fixed buffer 0 (kept so its region outlives
    /// the registration).
    fixed_pool: Option<IoBufPool>,
    fixed_ops: u64,
    /// [`UringConfig::submit_hold_us`].
    submit_hold: Duration,
    /// Since when queued entries have been held back.
    held_since: Option<Instant>,
    /// A durability operation is queued: the next flush hands it over.
    urgent_queued: bool,
    /// [`UringConfig::hand_over`]: fixed, or chosen as it runs.
    hand_over: HandOverState,
}

/// The largest buffer io_uring registers as one fixed buffer.
pub const MAX_FIXED_BUFFER_BYTES: usize = 1 << 30;

/// In chunks ([`HandOver::InChunks`]): queued entries handed to the
/// kernel together, without waiting for the end of the reactor's pass:
/// when a round of requests arrives (32 reads from one receive), the
/// device starts on the first ones while the kernel prepares the rest (a
/// couple of microseconds each for a file, all inside one block plug
/// otherwise). On this VM's disk, which serves requests in
/// rounds, alternated runs on a quiet machine: standalone QD32 reads +6% on
/// average (better in 20 of 33 pairs), QD32 writes +3-16%, mirrored QD32
/// writes +17% (docs/performance.md, "QD32 against the disk").
const SUBMIT_CHUNK_ENTRIES: usize = 8;

/// An io_uring whose completions are posted when its thread next enters
/// the kernel instead of interrupting it (IORING_SETUP_COOP_TASKRUN, with
/// IORING_SETUP_TASKRUN_FLAG telling a polling thread when to enter): a
/// reactor that spins takes no inter-processor interrupt per completion
/// (a VM exit on a virtual machine). A plain ring on a kernel before 5.19.
pub fn cooperative_ring(entries: u32) -> io::Result<IoUring> {
    IoUring::builder()
        .setup_coop_taskrun()
        .setup_taskrun_flag()
        .build(entries)
        .or_else(|_| IoUring::new(entries))
}

/// user_data of the poll entries [`Backend::wait`] arms: the top bit
/// set (slot indices never reach it), the fd and the poll events below.
const POLL_TAG: u64 = 1 << 63;

fn poll_tag(fd: RawFd, events: u32) -> u64 {
    POLL_TAG | ((fd as u32 as u64) << 16) | u64::from(events & 0xffff)
}

fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// fallocate(2) of `len` bytes at `offset` of `file` with `mode`; the
/// errno on failure.
fn fallocate_file(file: &File, mode: libc::c_int, offset: u64, len: u64) -> Result<(), i32> {
    // SAFETY: fallocate takes no memory arguments; errors are returned.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            mode,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(errno_of(&io::Error::last_os_error()))
    }
}

/// Writes zeroes over `len` bytes of `file` from `offset`, `zeros` (a
/// buffer of zeroes, aligned when `file` is O_DIRECT) at a time.
fn write_zeroes_at(file: &File, zeros: &[u8], offset: u64, len: u64) -> io::Result<()> {
    let mut done = 0u64;
    while done < len {
        let chunk = (len - done).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..chunk], offset + done)?;
        done += chunk as u64;
    }
    Ok(())
}

fn with_context(e: io::Error, what: String) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn open_rw(path: &Path, flags: i32) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(flags | libc::O_CLOEXEC)
        .open(path)
}

impl UringBackend {
    /// Open `path` (a regular file or a block device) for I/O through a new
    /// io_uring of `config.queue_depth` entries.
    pub fn open(path: &Path, config: &UringConfig) -> io::Result<UringBackend> {
        let shown = path.display();
        if config.queue_depth == 0 || config.queue_depth > 4096 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "queue depth {} for {shown} must be 1..=4096",
                    config.queue_depth
                ),
            ));
        }
        if config.file_block_size != 512 && config.file_block_size != 4096 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "file block size {} for {shown} must be 512 or 4096",
                    config.file_block_size
                ),
            ));
        }
        let (file, direct) = match open_rw(path, libc::O_DIRECT) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                log::warn!(
                    "{shown}: the filesystem refuses O_DIRECT; falling back to buffered I/O \
                     (writes are durable only after a flush; put the device on a disk \
                     filesystem or a block device for direct I/O)"
                );
                let f = open_rw(path, 0)
                    .map_err(|e| with_context(e, format!("{shown}: cannot open for read/write")))?;
                (f, false)
            }
            Err(e) => {
                return Err(with_context(
                    e,
                    format!("{shown}: cannot open for read/write (check the path and permissions)"),
                ))
            }
        };
        let meta = file.metadata()?;
        let fd = file.as_raw_fd();
        let (kind, size_bytes, block_size) = if meta.file_type().is_block_device() {
            let g =
                crate::blockdev::geometry(&file).map_err(|e| with_context(e, shown.to_string()))?;
            (DeviceKind::Block, g.size_bytes, g.logical_block_bytes)
        } else if meta.file_type().is_file() {
            let bs = config.file_block_size;
            (
                DeviceKind::File,
                meta.len() - meta.len() % u64::from(bs),
                bs,
            )
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{shown} is neither a regular file nor a block device"),
            ));
        };
        let mut ring = cooperative_ring(config.queue_depth)
            .map_err(|e| with_context(e, format!("{shown}: cannot set up an io_uring (is io_uring disabled by sysctl kernel.io_uring_disabled or a seccomp policy?)")))?;
        // SAFETY: eventfd has no memory arguments; the result is checked.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `efd` is a freshly created descriptor owned by nobody else.
        let eventfd = unsafe { OwnedFd::from_raw_fd(efd) };
        ring.submitter().register_eventfd(efd)?;
        // Signalled only while a poll(2) fallback sleeps on it (see
        // `wait_fd`): otherwise every completion would cost the kernel a
        // signal and us a read.
        ring.completion().disable_eventfd();
        let fixed_file = match ring.submitter().register_files(&[fd]) {
            Ok(()) => true,
            Err(e) => {
                log::warn!("{shown}: cannot register the file with the io_uring ({e}); using its descriptor");
                false
            }
        };
        let queue_depth = config.queue_depth as usize;
        log::info!(
            "{shown}: {kind:?}, {size_bytes} bytes, block size {block_size}, \
             queue depth {queue_depth}, {}",
            if direct { "O_DIRECT" } else { "buffered" }
        );
        Ok(UringBackend {
            ring,
            file,
            kind,
            direct,
            size_bytes,
            block_size,
            queue_depth,
            eventfd,
            eventfd_enabled: false,
            fixed_file,
            slots: (0..queue_depth).map(|_| None).collect(),
            free_slots: (0..queue_depth as u32).rev().collect(),
            kernel_in_flight: 0,
            ready: VecDeque::with_capacity(queue_depth),
            zero_buf: None,
            keep_space: config.keep_space,
            armed_polls: Vec::new(),
            scratch: Vec::new(),
            fired_polls: Vec::new(),
            fixed_pool: None,
            fixed_ops: 0,
            submit_hold: Duration::from_micros(u64::from(config.submit_hold_us)),
            held_since: None,
            urgent_queued: false,
            hand_over: HandOverState::new(config.hand_over, Instant::now()),
        })
    }

    /// Whether the device was opened with O_DIRECT (false after the buffered
    /// fallback).
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    pub fn is_block_device(&self) -> bool {
        self.kind == DeviceKind::Block
    }

    /// Whether `[ptr, ptr + len)` lies in the registered pool (fixed buffer 0).
    fn is_fixed(&self, ptr: *const u8, len: u32) -> bool {
        self.fixed_pool
            .as_ref()
            .is_some_and(|p| p.contains(ptr, len as usize))
    }

    /// The SQE of a write of `len` bytes at `ptr`: `WRITE_FIXED` when the
    /// bytes lie in the registered pool, a plain `WRITE` otherwise.
    fn write_entry(
        &mut self,
        ptr: *const u8,
        len: u32,
        offset: u64,
        fua: bool,
    ) -> io_uring::squeue::Entry {
        let flags = if fua { libc::RWF_DSYNC } else { 0 };
        if self.is_fixed(ptr, len) {
            self.fixed_ops += 1;
            own_fd!(self, fd => opcode::WriteFixed::new(fd, ptr, len, 0)
                .offset(offset)
                .rw_flags(flags)
                .build())
        } else {
            own_fd!(self, fd => opcode::Write::new(fd, ptr, len)
                .offset(offset)
                .rw_flags(flags)
                .build())
        }
    }

    /// Queue an SQE for `op`, which must be Read, Write, WriteShared, Flush
    /// or SyncFd.
    fn push_sqe(&mut self, tag: u64, op: BackendOp) -> Result<(), BackendOp> {
        if self.ring.submission().is_full() {
            self.submit_queued();
            if self.ring.submission().is_full() {
                return Err(op);
            }
        }
        let slot = self
            .free_slots
            .pop()
            .expect("a free slot below queue depth");
        self.urgent_queued |= matches!(
            op,
            BackendOp::Flush
                | BackendOp::SyncFd { .. }
                | BackendOp::Write { fua: true, .. }
                | BackendOp::WriteShared { fua: true, .. }
                | BackendOp::WriteVecFd { dsync: true, .. }
        );
        let (entry, inflight) = match op {
            BackendOp::Read { offset, mut buf } => {
                let len = buf.len() as u32;
                let ptr = buf.as_mut_ptr();
                let e = if self.is_fixed(ptr, len) {
                    self.fixed_ops += 1;
                    own_fd!(self, fd => opcode::ReadFixed::new(fd, ptr, len, 0)
                        .offset(offset)
                        .build())
                } else {
                    own_fd!(self, fd => opcode::Read::new(fd, ptr, len)
                        .offset(offset)
                        .build())
                };
                (
                    e,
                    InFlight {
                        tag,
                        vec: None,
                        buf: Some(buf),
                        shared: None,
                        transfer_len: Some(len),
                    },
                )
            }
            BackendOp::Write {
                offset,
                mut buf,
                fua,
            } => {
                let len = buf.len() as u32;
                let ptr = buf.as_mut_ptr();
                let e = self.write_entry(ptr, len, offset, fua);
                (
                    e,
                    InFlight {
                        tag,
                        vec: None,
                        buf: Some(buf),
                        shared: None,
                        transfer_len: Some(len),
                    },
                )
            }
            BackendOp::WriteShared { offset, buf, fua } => {
                let len = buf.len() as u32;
                let e = self.write_entry(buf.as_ptr(), len, offset, fua);
                (
                    e,
                    InFlight {
                        tag,
                        vec: None,
                        buf: None,
                        shared: Some(buf),
                        transfer_len: Some(len),
                    },
                )
            }
            BackendOp::Flush => {
                let e = own_fd!(self, fd => opcode::Fsync::new(fd)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build());
                (
                    e,
                    InFlight {
                        tag,
                        vec: None,
                        buf: None,
                        shared: None,
                        transfer_len: None,
                    },
                )
            }
            BackendOp::SyncFd { fd: other } => {
                let e = opcode::Fsync::new(types::Fd(other))
                    .flags(types::FsyncFlags::DATASYNC)
                    .build();
                (
                    e,
                    InFlight {
                        tag,
                        vec: None,
                        buf: None,
                        shared: None,
                        transfer_len: None,
                    },
                )
            }
            BackendOp::WriteVecFd {
                fd,
                offset,
                segs,
                dsync,
            } => {
                let iov = Iovecs(segs.iter().map(iovec_of).collect());
                let want: usize = segs.iter().map(|s| s.len).sum();
                let flags = if dsync { libc::RWF_DSYNC } else { 0 };
                let e = opcode::Writev::new(types::Fd(fd), iov.0.as_ptr(), iov.0.len() as u32)
                    .offset(offset)
                    .rw_flags(flags)
                    .build();
                (
                    e,
                    InFlight {
                        tag,
                        buf: None,
                        shared: None,
                        vec: Some((segs, iov)),
                        // validate_op checked that it fits.
                        transfer_len: Some(want as u32),
                    },
                )
            }
            BackendOp::Discard { .. } | BackendOp::WriteZeroes { .. } => {
                unreachable!("discard and write-zeroes are executed synchronously")
            }
        };
        let entry = entry.user_data(u64::from(slot));
        // SAFETY: the buffer the entry points to (an `AlignedBuf`, a clone of
        // the `SharedBuf` that keeps its bytes alive and unchanged — a shared
        // buffer is read-only — or, for a vectored write, the iovec array and
        // the buffers it points into) is owned by `inflight`, which
        // lives in `self.slots` until the matching completion is reaped (and
        // Drop waits for every in-flight operation), so the kernel never sees
        // a dangling pointer. Our own fd lives as long as `self`; a SyncFd
        // descriptor must stay open until its completion (caller's contract).
        let pushed = unsafe { self.ring.submission().push(&entry) };
        pushed.expect("submission queue has room (checked above)");
        self.slots[slot as usize] = Some(inflight);
        self.kernel_in_flight += 1;
        if self.hand_over.mode() == HandOver::AtOnce
            || self.ring.submission().len() >= SUBMIT_CHUNK_ENTRIES
        {
            self.submit_queued();
        }
        Ok(())
    }

    /// Hands every queued entry to the kernel (one `io_uring_enter`, again
    /// on EINTR).
    fn submit_queued(&mut self) {
        while !self.ring.submission().is_empty() {
            match self.ring.submit() {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // EAGAIN/EBUSY: the kernel is short of resources or the
                // completion queue is busy; the entries stay queued and go
                // out with the next call.
                Err(e) => {
                    log::debug!("io_uring submit deferred: {e}");
                    break;
                }
            }
        }
        self.forget_hold_once_submitted();
    }

    /// Nothing queued any more (a submission took it): nothing is held.
    fn forget_hold_once_submitted(&mut self) {
        if self.ring.submission().is_empty() {
            self.held_since = None;
            self.urgent_queued = false;
        }
    }

    /// Whether the end of this pass keeps its queued entries back
    /// ([`UringConfig::submit_hold_us`]): fewer than a chunk, none of them
    /// urgent, the device busy with others of ours, and not held for
    /// longer than the hold already.
    fn hold_queued(&mut self) -> bool {
        let queued = self.ring.submission().len();
        // Entries queued are counted in `kernel_in_flight` too (a poll's
        // entry is not, hence the saturation).
        let device_busy = self.kernel_in_flight.saturating_sub(queued) > 0;
        if self.submit_hold.is_zero()
            || self.urgent_queued
            || queued >= SUBMIT_CHUNK_ENTRIES
            || !device_busy
        {
            return false;
        }
        let now = Instant::now();
        now.duration_since(*self.held_since.get_or_insert(now)) < self.submit_hold
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<u32, i32> {
        match self.kind {
            DeviceKind::File => {
                let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                let r = if self.keep_space {
                    match self.fallocate(
                        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                        offset,
                        len,
                    ) {
                        // No zero ranges (tmpfs): punch the range out and
                        // reserve it again.
                        Err(libc::EOPNOTSUPP) => self
                            .fallocate(punch, offset, len)
                            .and_then(|_| self.fallocate(libc::FALLOC_FL_KEEP_SIZE, offset, len)),
                        r => r,
                    }
                } else {
                    self.fallocate(punch, offset, len)
                };
                match r {
                    Err(libc::EOPNOTSUPP) => self.write_zeroes_by_writing(offset, len),
                    r => r,
                }
            }
            DeviceKind::Block => self.block_range_ioctl(BLKDISCARD, offset, len),
        }
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<u32, i32> {
        match self.kind {
            DeviceKind::File => {
                let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
                match self.fallocate(mode, offset, len) {
                    Err(libc::EOPNOTSUPP) => self.write_zeroes_by_writing(offset, len),
                    r => r,
                }
            }
            DeviceKind::Block => self.block_range_ioctl(BLKZEROOUT, offset, len),
        }
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> Result<u32, i32> {
        fallocate_file(&self.file, mode, offset, len).map(|()| 0)
    }

    fn block_range_ioctl(&self, request: libc::c_ulong, offset: u64, len: u64) -> Result<u32, i32> {
        let range: [u64; 2] = [offset, len];
        // SAFETY: BLKDISCARD/BLKZEROOUT read two u64 (start, length) through
        // the pointer, which points to a live local array.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), request as _, range.as_ptr()) };
        if rc == 0 {
            Ok(0)
        } else {
            Err(errno_of(&io::Error::last_os_error()))
        }
    }

    /// Fallback for filesystems without hole punching / zero ranges: write
    /// zeroes, so a discarded range reads back as zeroes on both nodes.
    fn write_zeroes_by_writing(&mut self, offset: u64, len: u64) -> Result<u32, i32> {
        let zeros = self
            .zero_buf
            .get_or_insert_with(|| AlignedBuf::new(ZERO_CHUNK_BYTES));
        write_zeroes_at(&self.file, zeros.as_slice(), offset, len)
            .map(|()| 0)
            .map_err(|e| errno_of(&e))
    }

    /// Clear the eventfd counter so poll(2) sleeps until the next completion.
    fn drain_eventfd(eventfd: RawFd) {
        let mut value = 0u64;
        // SAFETY: reads at most 8 bytes into a live local u64; the eventfd is
        // non-blocking, so an empty counter returns EAGAIN, which is fine.
        unsafe {
            libc::read(eventfd, &mut value as *mut u64 as *mut libc::c_void, 8);
        }
    }

    /// Make the eventfd readable now (completions arrived before it was
    /// enabled, so the kernel did not signal them).
    fn signal_eventfd(eventfd: RawFd) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a live local u64; a full counter
        // (EAGAIN) is readable already.
        unsafe {
            libc::write(eventfd, &one as *const u64 as *const libc::c_void, 8);
        }
    }

    /// Queues a one-shot poll of `fd` for `events` unless one is armed;
    /// false when the submission queue has no room even after handing
    /// what it holds to the kernel.
    fn arm(&mut self, fd: RawFd, events: u32) -> bool {
        if self.armed_polls.contains(&(fd, events)) {
            return true;
        }
        let e = opcode::PollAdd::new(types::Fd(fd), events)
            .build()
            .user_data(poll_tag(fd, events));
        // SAFETY: a poll entry points at no memory of ours.
        if unsafe { self.ring.submission().push(&e) }.is_err() {
            self.submit_queued();
            // SAFETY: as above.
            if unsafe { self.ring.submission().push(&e) }.is_err() {
                return false;
            }
        }
        self.armed_polls.push((fd, events));
        // A poll waits for the socket only once the kernel has it: never
        // held back.
        self.urgent_queued = true;
        true
    }

    /// Turn the ring's completions into typed results.
    fn reap_kernel(&mut self, out: &mut Vec<BackendCompletion>) -> usize {
        if self.kernel_in_flight == 0 && self.armed_polls.is_empty() {
            return 0;
        }
        let enabled = std::mem::take(&mut self.eventfd_enabled);
        let mut cq = self.ring.completion();
        if enabled {
            // The poll(2) fallback is over: back to no signals (the next
            // `wait_fd` drains what is left in the counter).
            cq.disable_eventfd();
        }
        if cq.is_empty() {
            drop(cq);
            if !self.ring.submission().taskrun() {
                return 0;
            }
            // Completions wait in the kernel for this thread to enter it
            // (a cooperative ring is not interrupted to post them). Entries
            // held back stay queued: enter without submitting.
            // SAFETY: no argument is passed (a null pointer of size 0);
            // submitting none and waiting for none only runs the pending
            // task work on the way out of the system call.
            let _ = unsafe { self.ring.submitter().enter::<libc::sigset_t>(0, 0, 0, None) };
            cq = self.ring.completion();
            if cq.is_empty() {
                return 0;
            }
        }
        cq.sync();
        let mut n = 0;
        for cqe in cq {
            if cqe.user_data() & POLL_TAG != 0 {
                // A wait's poll fired (or was cancelled): it is disarmed.
                let (fd, ev) = (
                    (cqe.user_data() >> 16) as u32 as RawFd,
                    cqe.user_data() & 0xffff,
                );
                if let Some(i) = self
                    .armed_polls
                    .iter()
                    .position(|&(f, e)| f == fd && u64::from(e) == ev)
                {
                    self.armed_polls.swap_remove(i);
                }
                if cqe.result() >= 0 && !self.fired_polls.contains(&fd) {
                    self.fired_polls.push(fd);
                }
                continue;
            }
            let slot = cqe.user_data() as usize;
            let inflight = self.slots[slot]
                .take()
                .expect("completion for an operation that is in flight");
            self.free_slots.push(slot as u32);
            self.kernel_in_flight -= 1;
            let res = cqe.result();
            let result = if res < 0 {
                Err(-res)
            } else {
                match inflight.transfer_len {
                    Some(want) if res as u32 != want => {
                        log::warn!("short transfer: {res} of {want} bytes; reported as EIO");
                        Err(libc::EIO)
                    }
                    _ => Ok(res as u32),
                }
            };
            // The kernel is done with a vectored write's pieces: release them.
            drop(inflight.vec);
            out.push(BackendCompletion {
                tag: inflight.tag,
                result,
                buf: inflight.buf,
            });
            n += 1;
        }
        n
    }
}

impl Backend for UringBackend {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn submit(&mut self, tag: u64, op: BackendOp) -> Result<(), BackendOp> {
        if self.in_flight() >= self.queue_depth {
            return Err(op);
        }
        let sync_result = match (&op, validate_op(&op, self.size_bytes, self.block_size)) {
            (_, Err(errno)) => Some(Err(errno)),
            (BackendOp::Discard { len: 0, .. } | BackendOp::WriteZeroes { len: 0, .. }, _) => {
                Some(Ok(0))
            }
            (BackendOp::Discard { offset, len }, _) => Some(self.discard(*offset, *len)),
            (BackendOp::WriteZeroes { offset, len }, _) => Some(self.write_zeroes(*offset, *len)),
            _ => None,
        };
        match sync_result {
            Some(result) => {
                self.ready.push_back(BackendCompletion {
                    tag,
                    result,
                    buf: op.into_buf(),
                });
                Ok(())
            }
            None => self.push_sqe(tag, op),
        }
    }

    fn flush_submissions(&mut self) {
        if self.ring.submission().is_empty() || self.hold_queued() {
            return;
        }
        self.submit_queued();
    }

    fn reap(&mut self, out: &mut Vec<BackendCompletion>) -> usize {
        let n = self.ready.len();
        out.extend(self.ready.drain(..));
        let n = n + self.reap_kernel(out);
        if n > 0 {
            if let HandOverState::Adaptive(c) = &mut self.hand_over {
                c.record(n as u64, Instant::now());
            }
        }
        n
    }

    fn in_flight(&self) -> usize {
        self.kernel_in_flight + self.ready.len()
    }

    fn queue_depth(&self) -> usize {
        self.queue_depth
    }

    /// Enables the eventfd's signals until the next reap and clears its
    /// counter; if completions are already queued (they came while it was
    /// disabled and signalled nothing) it is made readable at once, so a
    /// poll(2) on it never sleeps past them.
    fn wait_fd(&mut self) -> Option<RawFd> {
        let fd = self.eventfd.as_raw_fd();
        let mut cq = self.ring.completion();
        if !self.eventfd_enabled {
            cq.enable_eventfd();
            self.eventfd_enabled = true;
        }
        // Enabled before the drain and the check: a completion after the
        // check signals the fd; one before it is seen by the check.
        Self::drain_eventfd(fd);
        cq.sync();
        if !cq.is_empty() {
            Self::signal_eventfd(fd);
        }
        Some(fd)
    }

    fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    fn discard_reads_zeroes(&self) -> bool {
        self.kind == DeviceKind::File
    }

    /// Sleeps inside io_uring_enter: one system call instead of a poll(2)
    /// over eventfds. The polls are one-shot and stay armed until they fire;
    /// their completions are consumed by `reap`. Returns false (without
    /// sleeping) if the submission queue had no room for the polls.
    fn wait(&mut self, fds: &[(RawFd, bool)], timeout_ms: u64) -> bool {
        if !self.ring.completion().is_empty() || !self.ready.is_empty() {
            return true;
        }
        for &(fd, writable) in fds {
            let events = (libc::POLLIN | if writable { libc::POLLOUT } else { 0 }) as u32;
            if !self.arm(fd, events) {
                return false;
            }
        }
        let ts = types::Timespec::from(Duration::from_millis(timeout_ms));
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                ) => {}
            Err(e) => log::warn!("io_uring_enter (wait) failed: {e}"),
        }
        // Whatever was held went with the wait.
        self.forget_hold_once_submitted();
        // Take what woke us now, so the caller can tell which fds fired.
        let mut done = Vec::new();
        self.reap_kernel(&mut done);
        self.ready.extend(done);
        true
    }

    /// Registers the pool's region as fixed buffer 0 (one iovec; the kernel
    /// takes at most 1 GiB in one, and pins the pages against
    /// RLIMIT_MEMLOCK unless the process has CAP_IPC_LOCK).
    fn register_pool(&mut self, pool: &IoBufPool) -> Result<bool, String> {
        if self.fixed_pool.is_some() {
            return Err("a buffer pool is already registered with this io_uring".into());
        }
        let (base, bytes) = pool.region();
        if bytes > MAX_FIXED_BUFFER_BYTES {
            return Err(format!(
                "the buffer pool is {bytes} bytes; io_uring registers at most {MAX_FIXED_BUFFER_BYTES} in one buffer"
            ));
        }
        let iov = libc::iovec {
            iov_base: base as *mut libc::c_void,
            iov_len: bytes,
        };
        // SAFETY: the iovec covers the pool's region, which stays allocated
        // while any handle on the pool lives; `self.fixed_pool` keeps one
        // until the ring (and with it the registration) is dropped, after
        // every in-flight operation completed (Drop waits for them).
        match unsafe { self.ring.submitter().register_buffers(&[iov]) } {
            Ok(()) => {
                self.fixed_pool = Some(pool.clone());
                Ok(true)
            }
            Err(e) => {
                let mut limit = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                // SAFETY: getrlimit writes one rlimit into a live local.
                let memlock = if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } == 0 {
                    format!("RLIMIT_MEMLOCK {} bytes", limit.rlim_cur)
                } else {
                    "RLIMIT_MEMLOCK unknown".into()
                };
                Err(format!(
                    "cannot register the {bytes}-byte buffer pool with the io_uring ({e}; {memlock}): \
                     raise the memlock limit (ulimit -l, LimitMEMLOCK=) or lower reactor.buffer_pool_mib"
                ))
            }
        }
    }

    fn fixed_ops(&self) -> u64 {
        self.fixed_ops
    }

    fn hand_over(&self) -> Option<(HandOver, Option<HandOverStats>)> {
        Some((self.hand_over.mode(), self.hand_over.stats()))
    }

    /// The poll is queued with the pass's other entries (handed to the
    /// kernel by the pass's `flush_submissions` or the next wait).
    fn arm_poll(&mut self, fd: RawFd) -> bool {
        self.arm(fd, libc::POLLIN as u32)
    }

    fn poll_fired(&mut self, fd: RawFd) -> bool {
        let armed = |b: &Self| b.armed_polls.iter().any(|&(f, _)| f == fd);
        if !self.fired_polls.contains(&fd) && armed(self) {
            // Only a load of the completion queue's head and tail when
            // nothing completed.
            let mut done = std::mem::take(&mut self.scratch);
            self.reap_kernel(&mut done);
            self.ready.extend(done.drain(..));
            self.scratch = done;
        }
        // Disarmed without firing (an error, a cancellation): read, or the
        // caller would wait for a poll that never comes.
        self.take_fired(fd) || !armed(self)
    }

    /// Whether a poll that [`Backend::wait`] armed on `fd` fired since
    /// the last call (e.g. an eventfd that then needs draining: without it
    /// no read system call is spent on an eventfd nobody wrote).
    fn take_fired(&mut self, fd: RawFd) -> bool {
        match self.fired_polls.iter().position(|&f| f == fd) {
            Some(i) => {
                self.fired_polls.swap_remove(i);
                true
            }
            None => false,
        }
    }
}

impl Drop for UringBackend {
    fn drop(&mut self) {
        // The kernel may still write into buffers of in-flight operations;
        // wait for all of them before the buffers are freed.
        let mut scratch = Vec::with_capacity(self.queue_depth);
        while self.kernel_in_flight > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::error!(
                        "io_uring: cannot wait for {} in-flight operations ({e}); \
                         leaking their buffers",
                        self.kernel_in_flight
                    );
                    for slot in self.slots.iter_mut() {
                        if let Some(s) = slot.take() {
                            std::mem::forget(s.buf);
                            std::mem::forget(s.shared);
                        }
                    }
                    // The registered pool's region may still be in the
                    // kernel's hands too.
                    std::mem::forget(self.fixed_pool.take());
                    return;
                }
            }
            scratch.clear();
            self.reap_kernel(&mut scratch);
        }
    }
}

/// [`create_file_device_as`] a sparse file ([`Preallocate::None`]).
pub fn create_file_device(path: &Path, size_bytes: u64) -> io::Result<()> {
    create_file_device_as(path, size_bytes, Preallocate::None)
}

/// Create `path` as a file of `size_bytes` (a multiple of 4096) to use as
/// a device, or grow an existing one, taking its space as `prealloc` says
/// (for `Space` and `Full` the whole file is reserved; an existing file's
/// data is never touched: `Full` writes zeroes only where it creates or
/// grows the file). Refuses to shrink an existing file: that would destroy
/// data.
pub fn create_file_device_as(
    path: &Path,
    size_bytes: u64,
    prealloc: Preallocate,
) -> io::Result<()> {
    let shown = path.display();
    if size_bytes == 0 || !size_bytes.is_multiple_of(4096) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{shown}: device size {size_bytes} must be a non-zero multiple of 4096"),
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| with_context(e, format!("{shown}: cannot create device file")))?;
    let current = file.metadata()?.len();
    if current > size_bytes {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{shown} is {current} bytes; refusing to shrink it to {size_bytes} \
                 (that would destroy data): configure a size >= {current} or remove the file"
            ),
        ));
    }
    if current < size_bytes {
        file.set_len(size_bytes)?;
    }
    if prealloc != Preallocate::None {
        if let Err(errno) = fallocate_file(&file, 0, 0, size_bytes) {
            let e = io::Error::from_raw_os_error(errno);
            let why = match errno {
                libc::ENOSPC => {
                    format!("the filesystem has less than {size_bytes} bytes free for it")
                }
                libc::EOPNOTSUPP => "its filesystem cannot reserve space (no fallocate)".into(),
                _ => e.to_string(),
            };
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "{shown}: cannot reserve the volume's {size_bytes} bytes: {why}; free space, \
                     or set volume.preallocate = \"none\" for a sparse file whose writes can \
                     fail once the filesystem is full"
                ),
            ));
        }
    }
    if prealloc == Preallocate::Full && current < size_bytes {
        let zeros = vec![0u8; ZERO_CHUNK_BYTES];
        write_zeroes_at(&file, &zeros, current, size_bytes - current)
            .map_err(|e| with_context(e, format!("{shown}: cannot write zeroes")))?;
    }
    file.sync_all()
}
