//! A fault-injecting wrapper around any backend.
//!
//! The faults are driven by a shared [`FaultControl`] made of atomics, so a
//! test or the simulator can change them at run time from any thread while
//! the reactor keeps using the backend. An operation chosen to fail completes
//! with `Err(EIO)` and never reaches the inner device.

use super::{Backend, BackendCompletion, BackendOp};
use std::collections::VecDeque;
use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

/// Which operations the countdown and byte-range faults apply to. Flushes
/// have their own switches ([`FaultControl::fail_flushes`],
/// [`FaultControl::fail_fd_syncs`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOps {
    /// Every operation, flushes included.
    All,
    /// Write, WriteZeroes and Discard.
    WritesOnly,
    /// Read.
    ReadsOnly,
}

const COUNTDOWN_OFF: u64 = u64::MAX;

/// The switches of a [`FaultBackend`]. All setters take `&self`.
#[derive(Debug)]
pub struct FaultControl {
    /// Operations (of the selected kind) still allowed to succeed before every
    /// following one fails; `COUNTDOWN_OFF` when disarmed.
    countdown: AtomicU64,
    /// Fail operations touching `[range_start, range_end)`; empty = off.
    range_start: AtomicU64,
    range_end: AtomicU64,
    ops: AtomicU8,
    fail_flushes: AtomicBool,
    fail_fd_syncs: AtomicBool,
    fail_fd_writes: AtomicBool,
    injected: AtomicU64,
}

impl Default for FaultControl {
    fn default() -> FaultControl {
        FaultControl {
            countdown: AtomicU64::new(COUNTDOWN_OFF),
            range_start: AtomicU64::new(0),
            range_end: AtomicU64::new(0),
            ops: AtomicU8::new(0),
            fail_flushes: AtomicBool::new(false),
            fail_fd_syncs: AtomicBool::new(false),
            fail_fd_writes: AtomicBool::new(false),
            injected: AtomicU64::new(0),
        }
    }
}

impl FaultControl {
    pub fn new() -> Arc<FaultControl> {
        Arc::new(FaultControl::default())
    }

    /// Let `n` more operations of the selected kind succeed, then fail every
    /// following one until [`FaultControl::clear`] (`n = 0`: fail from now).
    pub fn fail_after(&self, n: u64) {
        assert!(n < COUNTDOWN_OFF);
        self.countdown.store(n, Ordering::SeqCst);
    }

    /// Fail operations of the selected kind that touch `[offset, offset+len)`.
    pub fn fail_range(&self, offset: u64, len: u64) {
        // Disarm first so a concurrent check never sees a half-updated range
        // wider than either the old or the new one.
        self.range_end.store(0, Ordering::SeqCst);
        self.range_start.store(offset, Ordering::SeqCst);
        self.range_end
            .store(offset.saturating_add(len), Ordering::SeqCst);
    }

    /// Choose which operations the countdown and range faults apply to.
    pub fn set_ops(&self, ops: FaultOps) {
        let v = match ops {
            FaultOps::All => 0,
            FaultOps::WritesOnly => 1,
            FaultOps::ReadsOnly => 2,
        };
        self.ops.store(v, Ordering::SeqCst);
    }

    /// Make Flush and SyncFd, and durable (`dsync`) WriteVecFd, fail (or
    /// succeed again).
    pub fn fail_flushes(&self, on: bool) {
        self.fail_flushes.store(on, Ordering::SeqCst);
    }

    /// Make SyncFd and durable (`dsync`) WriteVecFd fail (or succeed again)
    /// and leave Flush alone: the flush of another file through this backend
    /// (a mirror node's ring, whose batch writes are durable writes) fails
    /// while the device's own flushes still work.
    pub fn fail_fd_syncs(&self, on: bool) {
        self.fail_fd_syncs.store(on, Ordering::SeqCst);
    }

    /// Disarm every fault (the injected-fault counter is kept).
    pub fn clear(&self) {
        self.countdown.store(COUNTDOWN_OFF, Ordering::SeqCst);
        self.range_end.store(0, Ordering::SeqCst);
        self.range_start.store(0, Ordering::SeqCst);
        self.ops.store(0, Ordering::SeqCst);
        self.fail_flushes.store(false, Ordering::SeqCst);
        self.fail_fd_syncs.store(false, Ordering::SeqCst);
        self.fail_fd_writes.store(false, Ordering::SeqCst);
    }

    /// Make WriteVecFd (a write to another file through this backend: a
    /// mirror node's ring batch) fail (or succeed again); the device's own
    /// operations are left alone.
    pub fn fail_fd_writes(&self, on: bool) {
        self.fail_fd_writes.store(on, Ordering::SeqCst);
    }

    /// Operations failed so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::SeqCst)
    }

    fn selected(&self, op: &BackendOp) -> bool {
        match self.ops.load(Ordering::SeqCst) {
            0 => true,
            1 => op.is_mutating(),
            _ => matches!(op, BackendOp::Read { .. }),
        }
    }

    /// Decide whether `op` fails; consumes one countdown step if it applies.
    fn should_fail(&self, op: &BackendOp) -> bool {
        let is_flush = matches!(op, BackendOp::Flush | BackendOp::SyncFd { .. });
        if is_flush && self.fail_flushes.load(Ordering::SeqCst) {
            return true;
        }
        if matches!(op, BackendOp::SyncFd { .. }) && self.fail_fd_syncs.load(Ordering::SeqCst) {
            return true;
        }
        if let BackendOp::WriteVecFd { dsync, .. } = op {
            // A durable write is the write and its flush in one: a failed
            // flush of the ring fails it too.
            return self.fail_fd_writes.load(Ordering::SeqCst)
                || (*dsync
                    && (self.fail_fd_syncs.load(Ordering::SeqCst)
                        || self.fail_flushes.load(Ordering::SeqCst)));
        }
        if !self.selected(op) {
            return false;
        }
        if let Some((offset, len)) = op.byte_range() {
            let start = self.range_start.load(Ordering::SeqCst);
            let end = self.range_end.load(Ordering::SeqCst);
            let op_end = offset.saturating_add(len.max(1));
            if start < end && offset < end && start < op_end {
                return true;
            }
        }
        let step = self
            .countdown
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| match c {
                COUNTDOWN_OFF | 0 => None,
                c => Some(c - 1),
            });
        matches!(step, Err(0))
    }
}

pub struct FaultBackend<B: Backend> {
    inner: B,
    control: Arc<FaultControl>,
    failed: VecDeque<BackendCompletion>,
}

impl<B: Backend> FaultBackend<B> {
    pub fn new(inner: B, control: Arc<FaultControl>) -> FaultBackend<B> {
        let failed = VecDeque::with_capacity(inner.queue_depth());
        FaultBackend {
            inner,
            control,
            failed,
        }
    }

    pub fn control(&self) -> &Arc<FaultControl> {
        &self.control
    }

    pub fn inner(&self) -> &B {
        &self.inner
    }

    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B: Backend> Backend for FaultBackend<B> {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }

    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }

    fn submit(&mut self, tag: u64, op: BackendOp) -> Result<(), BackendOp> {
        if self.in_flight() >= self.queue_depth() {
            return Err(op);
        }
        if self.control.should_fail(&op) {
            self.control.injected.fetch_add(1, Ordering::SeqCst);
            self.failed.push_back(BackendCompletion {
                tag,
                result: Err(libc::EIO),
                buf: op.into_buf(),
            });
            return Ok(());
        }
        self.inner.submit(tag, op)
    }

    fn flush_submissions(&mut self) {
        self.inner.flush_submissions();
    }

    fn reap(&mut self, out: &mut Vec<BackendCompletion>) -> usize {
        let n = self.failed.len();
        out.extend(self.failed.drain(..));
        n + self.inner.reap(out)
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.failed.len()
    }

    fn queue_depth(&self) -> usize {
        self.inner.queue_depth()
    }

    fn wait_fd(&mut self) -> Option<RawFd> {
        self.inner.wait_fd()
    }

    fn has_ready(&self) -> bool {
        !self.failed.is_empty() || self.inner.has_ready()
    }

    fn discard_reads_zeroes(&self) -> bool {
        self.inner.discard_reads_zeroes()
    }

    fn wait(&mut self, fds: &[(RawFd, bool)], timeout_ms: u64) -> bool {
        // Injected failures are ready now: no sleep, nothing fired.
        if !self.failed.is_empty() {
            return true;
        }
        self.inner.wait(fds, timeout_ms)
    }

    fn take_fired(&mut self, fd: RawFd) -> bool {
        self.inner.take_fired(fd)
    }

    fn arm_poll(&mut self, fd: RawFd) -> bool {
        self.inner.arm_poll(fd)
    }

    fn poll_fired(&mut self, fd: RawFd) -> bool {
        self.inner.poll_fired(fd)
    }

    fn register_pool(&mut self, pool: &volume::IoBufPool) -> Result<bool, String> {
        self.inner.register_pool(pool)
    }

    fn fixed_ops(&self) -> u64 {
        self.inner.fixed_ops()
    }

    fn hand_over(&self) -> Option<(super::HandOver, Option<super::HandOverStats>)> {
        self.inner.hand_over()
    }
}
