//! The block `Volume` that every front-end (NBD, NVMe-oF/TCP, iSCSI) exports.
//!
//! Front-ends know nothing of mirroring: they see geometry, an identity that is
//! the same on both nodes, a path state, and an asynchronous request interface.
//! A request is submitted with a completion callback; the callback runs exactly
//! once, on some engine thread, and must not block (post the result to the
//! connection's own writer instead of writing a socket from it when the write
//! could block for long).

pub mod buf;

pub use buf::{IoBuf, IoBufPool, SharedBuf, IO_ALIGN};

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// Size of the volume in logical blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Logical block size in bytes (512 or 4096).
    pub block_size: u32,
    /// Number of logical blocks.
    pub num_blocks: u64,
}

impl Geometry {
    pub fn size_bytes(&self) -> u64 {
        self.num_blocks * self.block_size as u64
    }

    /// Checks that a byte range is block aligned and inside the volume.
    pub fn check_range(&self, offset: u64, len: u64) -> Result<(), IoError> {
        let bs = self.block_size as u64;
        if !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
            return Err(IoError::Unaligned);
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.size_bytes() => Ok(()),
            _ => Err(IoError::OutOfRange),
        }
    }
}

/// Identity of the exported volume. Both nodes of a pair report the same
/// identity so that multipath hosts see one device with two paths.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeIdentity {
    /// 16-byte unique id (NVMe NGUID/UUID, SCSI NAA).
    pub uuid: [u8; 16],
    /// Serial number string (<= 20 ASCII characters).
    pub serial: String,
    /// Human readable model string (<= 40 ASCII characters).
    pub model: String,
    /// Node number of this node (1 or 2): used for port / port-group ids.
    pub node_index: u16,
}

/// Path state of this node's export, following the mirror role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathState {
    /// The primary: reads and writes are served (NVMe ANA optimized,
    /// ALUA active/optimized).
    Optimized,
    /// The backup: I/O is refused (NVMe ANA inaccessible, ALUA standby).
    Inaccessible,
}

/// Errors a volume request can end with. Each front-end maps these to its
/// protocol's status in one place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoError {
    /// This node is not the primary (path inaccessible / standby).
    NotPrimary,
    /// Offset/length outside the volume.
    OutOfRange,
    /// Offset/length not a multiple of the block size.
    Unaligned,
    /// The request is larger than the volume accepts (`max_io_bytes`).
    TooLarge,
    /// The backing device failed the I/O (errno).
    Io(i32),
    /// The node is shutting down or the engine refused further work after
    /// a disk error.
    Unavailable,
}

impl std::fmt::Display for IoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IoError::NotPrimary => write!(f, "this node is the backup; writes go to the primary"),
            IoError::OutOfRange => write!(f, "range outside the volume"),
            IoError::Unaligned => write!(f, "range not aligned to the block size"),
            IoError::TooLarge => write!(f, "request larger than max_io_bytes"),
            IoError::Io(e) => write!(f, "device I/O error (errno {e})"),
            IoError::Unavailable => write!(f, "volume unavailable"),
        }
    }
}

impl std::error::Error for IoError {}

/// One block request. Offsets and lengths are in bytes and must be aligned
/// to the block size.
#[derive(Debug)]
pub enum VolumeOp {
    Read {
        offset: u64,
        len: u32,
    },
    /// `fua`: the data is durable on both nodes before completion. `data`
    /// comes from [`Volume::alloc_buf`] where the front-end can arrange it
    /// (the volume then writes it without copying it again).
    Write {
        offset: u64,
        data: IoBuf,
        fua: bool,
    },
    /// Barrier: every write completed before it is durable on both nodes.
    Flush,
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
    },
}

impl VolumeOp {
    pub fn is_mutation(&self) -> bool {
        !matches!(self, VolumeOp::Read { .. } | VolumeOp::Flush)
    }
}

/// Result of a request: for a read, the buffer the data was read into (send
/// it from there); otherwise empty.
pub type IoResult = Result<IoBuf, IoError>;

/// Completion callback. Runs once, on an engine thread; must not block.
pub type Completion = Box<dyn FnOnce(IoResult) + Send + 'static>;

/// The block device a front-end exports.
pub trait Volume: Send + Sync + 'static {
    fn geometry(&self) -> Geometry;
    fn identity(&self) -> VolumeIdentity;
    fn path_state(&self) -> PathState;
    /// A counter bumped at every path-state change, so front-ends can notice
    /// changes (NVMe ANA-change AEN, SCSI unit attention) by polling it.
    fn path_epoch(&self) -> u64;
    /// Largest single request in bytes.
    fn max_io_bytes(&self) -> u32;
    /// Submit a request; `done` is called exactly once.
    fn submit(&self, op: VolumeOp, done: Completion);
    /// A buffer for a write's payload of `len` bytes, to receive the payload
    /// from the socket straight into. `None` when the volume's bounded pool
    /// is empty: the front-end stops reading that connection and asks again
    /// on its next poll (buffers come back as writes complete). The default:
    /// a heap buffer (volumes without a pool).
    fn alloc_buf(&self, len: usize) -> Option<IoBuf> {
        Some(IoBuf::new(len))
    }
    /// The latest replicated state blob (see [`MAX_STATE_BYTES`]), or `None`
    /// when none was ever stored. A small, opaque record that front-ends
    /// keep beside the blocks (the iSCSI target's persistent reservations):
    /// it follows the volume through a failover. On the primary it is the
    /// blob of the last completed [`Volume::put_persistent_state`]; on a
    /// backup, the primary's as mirrored so far.
    /// The default: a volume that keeps no such state (test wrappers).
    fn persistent_state(&self) -> Option<Vec<u8>> {
        None
    }
    /// Replaces the state blob. `done` runs once the new blob is durable
    /// and mirrored exactly like a write: `Ok` means the peer holds it too
    /// (or, in degraded mode, the peer is durably recorded as stale), so a
    /// failover keeps it. Errors as for writes (`NotPrimary` on a backup,
    /// `TooLarge` beyond [`Volume::max_state_bytes`]); on an error the old
    /// blob may or may not have been replaced, as for a failed write.
    /// The default refuses (`Unavailable`): the volume keeps no such state.
    fn put_persistent_state(&self, blob: Vec<u8>, done: Completion) {
        drop(blob);
        done(Err(IoError::Unavailable))
    }
    /// Largest blob `put_persistent_state` accepts.
    fn max_state_bytes(&self) -> usize {
        MAX_STATE_BYTES
    }
}

/// Upper bound of a replicated state blob, whatever the volume.
pub const MAX_STATE_BYTES: usize = 64 << 10;

/// A volume around another one, for tests that hold, count, check or delay
/// requests: every request goes to [`Wrapper::take`], and the geometry,
/// identity, path and request limit come from [`Wrapper::inner`] (the
/// limit unless [`Wrapper::io_limit`] says otherwise). Such a volume keeps
/// no replicated state blob.
pub trait Wrapper: Send + Sync + 'static {
    fn inner(&self) -> &dyn Volume;
    /// A request to the wrapper; `done` is called exactly once.
    fn take(&self, op: VolumeOp, done: Completion);
    /// Largest single request in bytes.
    fn io_limit(&self) -> u32 {
        self.inner().max_io_bytes()
    }
}

impl<W: Wrapper> Volume for W {
    fn geometry(&self) -> Geometry {
        self.inner().geometry()
    }
    fn identity(&self) -> VolumeIdentity {
        self.inner().identity()
    }
    fn path_state(&self) -> PathState {
        self.inner().path_state()
    }
    fn path_epoch(&self) -> u64 {
        self.inner().path_epoch()
    }
    fn max_io_bytes(&self) -> u32 {
        self.io_limit()
    }
    fn submit(&self, op: VolumeOp, done: Completion) {
        self.take(op, done)
    }
    fn alloc_buf(&self, len: usize) -> Option<IoBuf> {
        self.inner().alloc_buf(len)
    }
}

/// A test volume around a [`MemVolume`]: counts the writes whose payload
/// is not a pool buffer (a front-end that copied it into a buffer of its
/// own), and completes every request on a worker thread after `hold`
/// (holding its buffer meanwhile, so a small pool runs dry).
pub struct PoolChecked {
    inner: Arc<MemVolume>,
    /// Writes seen.
    pub writes: AtomicU64,
    /// Writes whose payload was not a pool buffer.
    pub unpooled: AtomicU64,
    queue: Mutex<std::sync::mpsc::Sender<(VolumeOp, Completion)>>,
}

impl PoolChecked {
    pub fn new(inner: Arc<MemVolume>, hold: std::time::Duration) -> Arc<PoolChecked> {
        let (tx, rx) = std::sync::mpsc::channel::<(VolumeOp, Completion)>();
        let worker = inner.clone();
        std::thread::spawn(move || {
            for (op, done) in rx {
                if !hold.is_zero() {
                    std::thread::sleep(hold);
                }
                worker.submit(op, done);
            }
        });
        Arc::new(PoolChecked {
            inner,
            writes: AtomicU64::new(0),
            unpooled: AtomicU64::new(0),
            queue: Mutex::new(tx),
        })
    }
}

impl Wrapper for PoolChecked {
    fn inner(&self) -> &dyn Volume {
        &*self.inner
    }
    fn take(&self, op: VolumeOp, done: Completion) {
        if let VolumeOp::Write { data, .. } = &op {
            self.writes.fetch_add(1, Ordering::Relaxed);
            if !data.is_pooled() {
                self.unpooled.fetch_add(1, Ordering::Relaxed);
            }
        }
        let _ = self.queue.lock().unwrap().send((op, done));
    }
}

/// Submit and wait: a helper for front-end code paths that are not
/// performance critical (and for tests).
pub fn submit_wait(vol: &dyn Volume, op: VolumeOp) -> IoResult {
    let slot = Arc::new((Mutex::new(None), Condvar::new()));
    let s2 = slot.clone();
    vol.submit(
        op,
        Box::new(move |r| {
            let (m, c) = &*s2;
            *m.lock().unwrap() = Some(r);
            c.notify_one();
        }),
    );
    let (m, c) = &*slot;
    let mut g = m.lock().unwrap();
    loop {
        if let Some(r) = g.take() {
            return r;
        }
        g = c.wait(g).unwrap();
    }
}

/// Shared, lock-free path state cell used by volumes and the node.
#[derive(Debug)]
pub struct PathCell {
    state: AtomicU8,
    epoch: AtomicU64,
}

impl PathCell {
    pub fn new(state: PathState) -> Self {
        PathCell {
            state: AtomicU8::new(Self::enc(state)),
            epoch: AtomicU64::new(1),
        }
    }
    fn enc(s: PathState) -> u8 {
        match s {
            PathState::Optimized => 0,
            PathState::Inaccessible => 1,
        }
    }
    pub fn get(&self) -> PathState {
        if self.state.load(Ordering::Acquire) == 0 {
            PathState::Optimized
        } else {
            PathState::Inaccessible
        }
    }
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }
    /// Sets the state; bumps the epoch only when it changed.
    pub fn set(&self, s: PathState) {
        let old = self.state.swap(Self::enc(s), Ordering::AcqRel);
        if old != Self::enc(s) {
            self.epoch.fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// An in-memory volume that completes inline. Used by front-end tests and
/// fuzzers; not a mirror.
pub struct MemVolume {
    geometry: Geometry,
    identity: VolumeIdentity,
    data: Mutex<Vec<u8>>,
    pub path: PathCell,
    /// Number of mutating requests executed (tests assert "never a write").
    pub writes: AtomicU64,
    /// The replicated state blob (in memory: nothing to replicate to).
    state: Mutex<Option<Vec<u8>>>,
    /// Where write payload and read buffers come from, if not the heap.
    pool: Option<IoBufPool>,
}

impl MemVolume {
    pub fn new(block_size: u32, num_blocks: u64) -> Self {
        MemVolume {
            geometry: Geometry {
                block_size,
                num_blocks,
            },
            identity: VolumeIdentity {
                uuid: *b"deltamirror-mem!",
                serial: "DMMEM0001".into(),
                model: "deltamirror".into(),
                node_index: 1,
            },
            data: Mutex::new(vec![0u8; (block_size as u64 * num_blocks) as usize]),
            path: PathCell::new(PathState::Optimized),
            writes: AtomicU64::new(0),
            state: Mutex::new(None),
            pool: None,
        }
    }

    /// Payload buffers ([`Volume::alloc_buf`]) come from `pool`, so that
    /// tests see the back-pressure of an empty pool; reads fill a pool
    /// buffer when one is free.
    pub fn with_pool(mut self, pool: IoBufPool) -> Self {
        self.pool = Some(pool);
        self
    }

    pub fn pool(&self) -> Option<&IoBufPool> {
        self.pool.as_ref()
    }

    pub fn with_identity(mut self, identity: VolumeIdentity) -> Self {
        self.identity = identity;
        self
    }

    /// Runs one operation synchronously against the memory image.
    fn execute(&self, op: VolumeOp) -> IoResult {
        let g = self.geometry;
        if op.is_mutation() && self.path.get() != PathState::Optimized {
            return Err(IoError::NotPrimary);
        }
        let mut data = self.data.lock().unwrap();
        match op {
            VolumeOp::Read { offset, len } => {
                if self.path.get() != PathState::Optimized {
                    return Err(IoError::NotPrimary);
                }
                g.check_range(offset, len as u64)?;
                let src = &data[offset as usize..offset as usize + len as usize];
                match self.pool.as_ref().and_then(|p| p.get(src.len())) {
                    Some(mut b) => {
                        b.copy_from_slice(src);
                        Ok(b)
                    }
                    None => Ok(IoBuf::from_slice(src)),
                }
            }
            VolumeOp::Write {
                offset, data: buf, ..
            } => {
                g.check_range(offset, buf.len() as u64)?;
                data[offset as usize..offset as usize + buf.len()].copy_from_slice(&buf);
                self.writes.fetch_add(1, Ordering::Relaxed);
                Ok(IoBuf::empty())
            }
            VolumeOp::Flush => Ok(IoBuf::empty()),
            VolumeOp::Discard { offset, len } | VolumeOp::WriteZeroes { offset, len } => {
                g.check_range(offset, len)?;
                data[offset as usize..(offset + len) as usize].fill(0);
                self.writes.fetch_add(1, Ordering::Relaxed);
                Ok(IoBuf::empty())
            }
        }
    }
}

impl Volume for MemVolume {
    fn geometry(&self) -> Geometry {
        self.geometry
    }
    fn identity(&self) -> VolumeIdentity {
        self.identity.clone()
    }
    fn path_state(&self) -> PathState {
        self.path.get()
    }
    fn path_epoch(&self) -> u64 {
        self.path.epoch()
    }
    fn max_io_bytes(&self) -> u32 {
        1 << 20
    }
    fn submit(&self, op: VolumeOp, done: Completion) {
        done(self.execute(op))
    }
    fn alloc_buf(&self, len: usize) -> Option<IoBuf> {
        match &self.pool {
            Some(p) => p.get(len),
            None => Some(IoBuf::new(len)),
        }
    }
    fn persistent_state(&self) -> Option<Vec<u8>> {
        self.state.lock().unwrap().clone()
    }
    fn put_persistent_state(&self, blob: Vec<u8>, done: Completion) {
        let r = if self.path.get() != PathState::Optimized {
            Err(IoError::NotPrimary)
        } else if blob.len() > MAX_STATE_BYTES {
            Err(IoError::TooLarge)
        } else {
            *self.state.lock().unwrap() = Some(blob);
            Ok(IoBuf::empty())
        };
        done(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_volume_round_trip_and_backup_refuses_writes() {
        let v = MemVolume::new(512, 16);
        submit_wait(
            &v,
            VolumeOp::Write {
                offset: 512,
                data: vec![7; 1024].into(),
                fua: false,
            },
        )
        .unwrap();
        let r = submit_wait(
            &v,
            VolumeOp::Read {
                offset: 512,
                len: 1024,
            },
        )
        .unwrap();
        assert!(r.iter().all(|&b| b == 7));
        assert_eq!(
            submit_wait(
                &v,
                VolumeOp::Read {
                    offset: 8192,
                    len: 512
                }
            ),
            Err(IoError::OutOfRange)
        );
        let e0 = v.path_epoch();
        v.path.set(PathState::Inaccessible);
        assert!(v.path_epoch() > e0);
        let put = |v: &MemVolume, b: Vec<u8>| {
            let r = Arc::new(Mutex::new(None));
            let r2 = r.clone();
            v.put_persistent_state(b, Box::new(move |x| *r2.lock().unwrap() = Some(x)));
            let x = r.lock().unwrap().take().unwrap();
            x
        };
        assert_eq!(put(&v, vec![1, 2]), Err(IoError::NotPrimary));
        assert_eq!(v.persistent_state(), None);
        v.path.set(PathState::Optimized);
        assert_eq!(put(&v, vec![1, 2]), Ok(IoBuf::empty()));
        assert_eq!(v.persistent_state(), Some(vec![1, 2]));
        assert_eq!(
            put(&v, vec![0; MAX_STATE_BYTES + 1]),
            Err(IoError::TooLarge)
        );
        v.path.set(PathState::Inaccessible);
        assert_eq!(
            submit_wait(
                &v,
                VolumeOp::Write {
                    offset: 0,
                    data: vec![1; 512].into(),
                    fua: false
                }
            ),
            Err(IoError::NotPrimary)
        );
    }
}
