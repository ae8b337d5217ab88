//! An in-memory device: completes every operation at submission. Used by
//! tests and the simulator, where determinism matters more than speed.

use super::{validate_op, Backend, BackendCompletion, BackendOp};
use std::collections::VecDeque;
use std::os::unix::io::RawFd;

pub struct MemBackend {
    data: Vec<u8>,
    block_size: u32,
    queue_depth: usize,
    done: VecDeque<BackendCompletion>,
    /// `WriteShared` operations executed, and those of them whose buffer
    /// came from a pool (for tests of the zero-copy path).
    shared_writes: u64,
    pooled_writes: u64,
}

impl MemBackend {
    /// A zeroed device of `size_bytes` (a multiple of `block_size`).
    pub fn new(size_bytes: u64, block_size: u32, queue_depth: usize) -> MemBackend {
        assert!(
            block_size.is_power_of_two() && block_size >= 512,
            "block size {block_size} must be a power of two >= 512"
        );
        assert!(
            size_bytes.is_multiple_of(u64::from(block_size)),
            "device size {size_bytes} is not a multiple of the block size {block_size}"
        );
        assert!(queue_depth > 0, "queue depth must be at least 1");
        let len = usize::try_from(size_bytes).expect("device too large for memory");
        MemBackend {
            data: vec![0; len],
            block_size,
            queue_depth,
            done: VecDeque::with_capacity(queue_depth),
            shared_writes: 0,
            pooled_writes: 0,
        }
    }

    /// `(WriteShared operations, those with a pooled buffer)` so far.
    pub fn shared_writes(&self) -> (u64, u64) {
        (self.shared_writes, self.pooled_writes)
    }

    /// The device contents, for checks in tests.
    pub fn contents(&self) -> &[u8] {
        &self.data
    }

    fn execute(&mut self, op: &mut BackendOp) -> Result<u32, i32> {
        validate_op(op, self.data.len() as u64, self.block_size)?;
        match op {
            BackendOp::Read { offset, buf } => {
                let start = *offset as usize;
                let len = buf.len();
                buf.as_mut_slice()
                    .copy_from_slice(&self.data[start..start + len]);
                Ok(len as u32)
            }
            BackendOp::Write { offset, buf, .. } => {
                let start = *offset as usize;
                self.data[start..start + buf.len()].copy_from_slice(buf.as_slice());
                Ok(buf.len() as u32)
            }
            BackendOp::WriteShared { offset, buf, .. } => {
                let start = *offset as usize;
                self.data[start..start + buf.len()].copy_from_slice(buf);
                self.shared_writes += 1;
                if buf.is_pooled() {
                    self.pooled_writes += 1;
                }
                Ok(buf.len() as u32)
            }
            BackendOp::Discard { offset, len } | BackendOp::WriteZeroes { offset, len } => {
                // Discarded blocks read back as zeroes, like a hole punched in
                // a file, so both mirror nodes stay byte-identical.
                let start = *offset as usize;
                self.data[start..start + *len as usize].fill(0);
                Ok(0)
            }
            BackendOp::Flush => Ok(0),
            BackendOp::WriteVecFd {
                fd,
                offset,
                segs,
                dsync,
            } => write_vec_fd(*fd, *offset, segs, *dsync),
            BackendOp::SyncFd { fd } => {
                // SAFETY: fdatasync only reads the descriptor number; an
                // invalid one yields EBADF, which is returned as the result.
                let rc = unsafe { libc::fdatasync(*fd) };
                if rc == 0 {
                    Ok(0)
                } else {
                    Err(std::io::Error::last_os_error()
                        .raw_os_error()
                        .unwrap_or(libc::EIO))
                }
            }
        }
    }
}

/// A [`BackendOp::WriteVecFd`] done at once: one `pwritev2`, with
/// `RWF_DSYNC` when `dsync` (durable when it returns). A short write is
/// `Err(EIO)`.
pub(crate) fn write_vec_fd(
    fd: RawFd,
    offset: u64,
    segs: &[super::IoSeg],
    dsync: bool,
) -> Result<u32, i32> {
    let iov: Vec<libc::iovec> = segs.iter().map(super::uring::iovec_of).collect();
    let want: usize = segs.iter().map(|s| s.len).sum();
    let flags = if dsync { libc::RWF_DSYNC } else { 0 };
    // SAFETY: every iovec points into a buffer `segs` holds for the whole
    // call (the kernel only reads them); the descriptor number is only read,
    // and an invalid one yields EBADF, returned as the result.
    let rc = unsafe {
        libc::pwritev2(
            fd,
            iov.as_ptr(),
            iov.len() as i32,
            offset as libc::off_t,
            flags,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO));
    }
    if rc as usize != want {
        return Err(libc::EIO);
    }
    Ok(want as u32)
}

impl Backend for MemBackend {
    fn size_bytes(&self) -> u64 {
        self.data.len() as u64
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn submit(&mut self, tag: u64, mut op: BackendOp) -> Result<(), BackendOp> {
        if self.done.len() >= self.queue_depth {
            return Err(op);
        }
        let result = self.execute(&mut op);
        self.done.push_back(BackendCompletion {
            tag,
            result,
            buf: op.into_buf(),
        });
        Ok(())
    }

    fn flush_submissions(&mut self) {}

    fn reap(&mut self, out: &mut Vec<BackendCompletion>) -> usize {
        let n = self.done.len();
        out.extend(self.done.drain(..));
        n
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }

    fn queue_depth(&self) -> usize {
        self.queue_depth
    }

    fn wait_fd(&mut self) -> Option<RawFd> {
        None
    }

    fn has_ready(&self) -> bool {
        !self.done.is_empty()
    }

    fn discard_reads_zeroes(&self) -> bool {
        true
    }
}
