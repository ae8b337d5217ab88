//! Block-aligned payload buffers and the bounded pool they come from.
//!
//! A write's payload lives in one [`IoBuf`] from the moment the front-end
//! receives it from the socket until the last of its users is done: the ring
//! writes it with O_DIRECT, the link sends it, and the disk write uses it as a
//! fixed (registered) buffer. Every address is aligned to [`IO_ALIGN`] so the
//! kernel can DMA to or from it directly.
//!
//! A node allocates one [`IoBufPool`] at start-up: one region, carved into
//! size classes, registered once with the reactor's io_uring. Front-ends ask
//! the volume for a buffer ([`crate::Volume::alloc_buf`]); when the pool is
//! empty they get none and stop reading their socket until one comes back
//! (back-pressure instead of allocation). A buffer returns to its pool when
//! its last owner drops it, on whatever thread that is: the free lists are
//! lock-free bounded queues.
//!
//! This module holds the crate's only unsafe code: raw allocations handed
//! out as disjoint, exclusively owned slices.

use std::alloc::{self, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam_queue::ArrayQueue;

/// Alignment of every buffer's address and of the pool's size classes.
pub const IO_ALIGN: usize = 4096;

/// Where a buffer's memory goes back to when it is dropped.
enum Home {
    /// Its own heap allocation of `cap` bytes (none when `cap == 0`).
    Heap,
    /// A slot of a pool's size class.
    Pool { pool: Arc<PoolShared>, class: usize },
}

/// A block-aligned byte buffer owned by one request.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
    home: Home,
}

// SAFETY: an `IoBuf` exclusively owns its bytes (a heap allocation or a pool
// slot no other `IoBuf` is handed while this one lives), like a `Vec<u8>`.
unsafe impl Send for IoBuf {}
// SAFETY: `&IoBuf` gives only shared reads of the bytes; mutation needs
// `&mut IoBuf`.
unsafe impl Sync for IoBuf {}

fn heap_layout(cap: usize) -> Layout {
    Layout::from_size_align(cap, IO_ALIGN).expect("buffer size overflows isize")
}

impl IoBuf {
    /// An empty buffer that owns no memory (a result with no data).
    pub fn empty() -> IoBuf {
        IoBuf {
            ptr: NonNull::new(std::ptr::without_provenance_mut(IO_ALIGN)).expect("non-zero"),
            len: 0,
            cap: 0,
            home: Home::Heap,
        }
    }

    /// A zeroed heap buffer of `len` bytes, outside any pool.
    pub fn new(len: usize) -> IoBuf {
        if len == 0 {
            return IoBuf::empty();
        }
        let cap = len.next_multiple_of(IO_ALIGN);
        let layout = heap_layout(cap);
        // SAFETY: `layout` has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        IoBuf {
            ptr,
            len,
            cap,
            home: Home::Heap,
        }
    }

    /// A heap buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> IoBuf {
        let mut b = IoBuf::new(data.len());
        b.copy_from_slice(data);
        b
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes the buffer can hold; [`IoBuf::set_len`] may grow it up to this.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Changes the visible length within the capacity. Bytes that become
    /// visible hold whatever the buffer held before (initialised memory:
    /// zeroes or an earlier request's data).
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.cap,
            "IoBuf::set_len({len}) beyond capacity {}",
            self.cap
        );
        self.len = len;
    }

    pub fn as_slice(&self) -> &[u8] {
        self
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        self
    }

    /// Whether the buffer is a slot of an [`IoBufPool`] (and so lies in the
    /// pool's registered region).
    pub fn is_pooled(&self) -> bool {
        matches!(self.home, Home::Pool { .. })
    }

    /// The address of the first byte, for handing the buffer to the kernel.
    /// The caller keeps the buffer alive until the kernel is done with it.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// As [`IoBuf::as_ptr`], for the kernel to write into.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Hands the buffer to several owners at once (ring, link, disk write):
    /// it returns to its pool when the last one drops it.
    pub fn share(self) -> SharedBuf {
        SharedBuf(Arc::new(self))
    }
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` points to `cap >= len` initialised bytes (zeroed at
        // allocation, written only through `&mut self` since) owned by
        // `self`; for `cap == 0` it is a dangling, aligned pointer and the
        // slice is empty.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        match &self.home {
            Home::Heap if self.cap == 0 => {}
            Home::Heap => {
                // SAFETY: `ptr` came from `alloc_zeroed` with this exact
                // layout and is freed only here.
                unsafe { alloc::dealloc(self.ptr.as_ptr(), heap_layout(self.cap)) }
            }
            Home::Pool { pool, class } => {
                let offset = self.ptr.as_ptr() as usize - pool.base.as_ptr() as usize;
                pool.put(*class, offset);
            }
        }
    }
}

impl fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoBuf")
            .field("len", &self.len)
            .field("capacity", &self.cap)
            .field("pooled", &self.is_pooled())
            .finish()
    }
}

impl Clone for IoBuf {
    /// A heap copy (never a pool slot: a clone is not on the data path).
    fn clone(&self) -> IoBuf {
        IoBuf::from_slice(self)
    }
}

impl PartialEq for IoBuf {
    fn eq(&self, other: &IoBuf) -> bool {
        self[..] == other[..]
    }
}

impl Eq for IoBuf {}

impl From<Vec<u8>> for IoBuf {
    fn from(v: Vec<u8>) -> IoBuf {
        IoBuf::from_slice(&v)
    }
}

impl From<&[u8]> for IoBuf {
    fn from(v: &[u8]) -> IoBuf {
        IoBuf::from_slice(v)
    }
}

impl Default for IoBuf {
    fn default() -> IoBuf {
        IoBuf::empty()
    }
}

/// An [`IoBuf`] with several read-only owners.
#[derive(Clone)]
pub struct SharedBuf(Arc<IoBuf>);

impl SharedBuf {
    /// The buffer back if this is its only owner.
    pub fn try_unwrap(self) -> Result<IoBuf, SharedBuf> {
        Arc::try_unwrap(self.0).map_err(SharedBuf)
    }

    pub fn is_pooled(&self) -> bool {
        self.0.is_pooled()
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.0.as_ptr()
    }
}

impl Deref for SharedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for SharedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl PartialEq for SharedBuf {
    fn eq(&self, other: &SharedBuf) -> bool {
        self[..] == other[..]
    }
}

impl Eq for SharedBuf {}

impl From<Vec<u8>> for SharedBuf {
    fn from(v: Vec<u8>) -> SharedBuf {
        IoBuf::from(v).share()
    }
}

impl From<IoBuf> for SharedBuf {
    fn from(b: IoBuf) -> SharedBuf {
        b.share()
    }
}

/// Size classes of a pool: 4 KiB, 16 KiB, 64 KiB, 256 KiB, 1 MiB, ... up to
/// the largest request.
fn class_sizes(max_buf: usize) -> Vec<usize> {
    let mut v = vec![IO_ALIGN];
    while *v.last().unwrap() < max_buf {
        let next = (v.last().unwrap() * 4).min(max_buf.next_multiple_of(IO_ALIGN));
        v.push(next);
    }
    v
}

struct Class {
    size: usize,
    /// Offsets (from the region's base) of the free slots.
    free: ArrayQueue<usize>,
    count: usize,
}

struct PoolShared {
    base: NonNull<u8>,
    bytes: usize,
    classes: Vec<Class>,
    in_use_bytes: AtomicUsize,
    /// Requests that found no buffer (back-pressure events).
    misses: AtomicUsize,
}

// SAFETY: the region is plain memory; the shared state is atomics and
// lock-free queues, and each slot is handed to one `IoBuf` at a time.
unsafe impl Send for PoolShared {}
// SAFETY: as above.
unsafe impl Sync for PoolShared {}

impl PoolShared {
    fn put(&self, class: usize, offset: usize) {
        let c = &self.classes[class];
        self.in_use_bytes.fetch_sub(c.size, Ordering::Relaxed);
        // A slot can only come back once (its `IoBuf` is gone), and the
        // queue holds every slot of the class: it cannot be full.
        c.free
            .push(offset)
            .expect("a pool slot returned twice: buffer accounting broken");
    }
}

impl Drop for PoolShared {
    fn drop(&mut self) {
        // SAFETY: `base` came from `alloc` with this layout; every
        // `IoBuf` of the pool holds an `Arc` to it, so none is alive now.
        unsafe { alloc::dealloc(self.base.as_ptr(), heap_layout(self.bytes)) }
    }
}

/// A bounded set of block-aligned buffers carved from one region that is
/// allocated and written once at start-up (resident from then on).
#[derive(Clone)]
pub struct IoBufPool {
    shared: Arc<PoolShared>,
}

impl IoBufPool {
    /// A pool of about `total_bytes` whose largest buffer holds `max_buf`
    /// bytes. The region is split evenly by bytes between the size classes
    /// (4 KiB, 16 KiB, 64 KiB, ... `max_buf`), each class with at least
    /// one buffer.
    pub fn new(total_bytes: usize, max_buf: usize) -> IoBufPool {
        let sizes = class_sizes(max_buf.max(IO_ALIGN));
        let share = total_bytes / sizes.len();
        let counts: Vec<usize> = sizes.iter().map(|s| (share / s).max(1)).collect();
        let bytes: usize = sizes.iter().zip(&counts).map(|(s, c)| s * c).sum();
        let layout = heap_layout(bytes);
        // SAFETY: `layout` has a non-zero size (at least one 4 KiB slot).
        let raw = unsafe { alloc::alloc(layout) };
        let Some(base) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        // Every page written now: the whole pool is resident from the start
        // (a flat memory footprint, no page faults on the data path), and
        // every byte is initialised (not with zeroes: a zeroing write could
        // be turned back into a lazily zeroed allocation).
        // SAFETY: `base` points to `bytes` writable bytes just allocated.
        unsafe { std::ptr::write_bytes(base.as_ptr(), 0xa5, bytes) };
        let mut offset = 0;
        let classes = sizes
            .iter()
            .zip(&counts)
            .map(|(&size, &count)| {
                let free = ArrayQueue::new(count);
                for _ in 0..count {
                    free.push(offset).expect("queue sized for the class");
                    offset += size;
                }
                Class { size, free, count }
            })
            .collect();
        IoBufPool {
            shared: Arc::new(PoolShared {
                base,
                bytes,
                classes,
                in_use_bytes: AtomicUsize::new(0),
                misses: AtomicUsize::new(0),
            }),
        }
    }

    /// A buffer of `len` bytes from the smallest class that holds it (or a
    /// larger one when that class is empty), or `None` when none is free or
    /// `len` exceeds the largest class. Its bytes are whatever an earlier
    /// user left.
    pub fn get(&self, len: usize) -> Option<IoBuf> {
        let b = self.try_get(len);
        if b.is_none() {
            self.shared.misses.fetch_add(1, Ordering::Relaxed);
        }
        b
    }

    /// [`IoBufPool::get`] for a caller that does not wait when the pool is
    /// empty (it takes a heap buffer instead): not counted as a miss.
    pub fn try_get(&self, len: usize) -> Option<IoBuf> {
        let s = &self.shared;
        for (i, c) in s.classes.iter().enumerate() {
            if c.size < len {
                continue;
            }
            if let Some(offset) = c.free.pop() {
                s.in_use_bytes.fetch_add(c.size, Ordering::Relaxed);
                // SAFETY: `offset + size <= bytes` (slots were laid out
                // inside the region), so the pointer stays in the allocation.
                let ptr = unsafe { s.base.as_ptr().add(offset) };
                return Some(IoBuf {
                    ptr: NonNull::new(ptr).expect("inside a non-null region"),
                    len,
                    cap: c.size,
                    home: Home::Pool {
                        pool: s.clone(),
                        class: i,
                    },
                });
            }
        }
        None
    }

    /// The region every buffer of the pool lies in, for registering it with
    /// io_uring (one fixed buffer) or a fabric once.
    pub fn region(&self) -> (*const u8, usize) {
        (self.shared.base.as_ptr(), self.shared.bytes)
    }

    /// Whether `[ptr, ptr + len)` lies inside the pool's region.
    pub fn contains(&self, ptr: *const u8, len: usize) -> bool {
        let base = self.shared.base.as_ptr() as usize;
        let p = ptr as usize;
        p >= base && p + len <= base + self.shared.bytes
    }

    pub fn total_bytes(&self) -> usize {
        self.shared.bytes
    }

    /// Bytes of the slots handed out now.
    pub fn in_use_bytes(&self) -> usize {
        self.shared.in_use_bytes.load(Ordering::Relaxed)
    }

    /// How often `get` found no buffer since the pool was made.
    pub fn misses(&self) -> usize {
        self.shared.misses.load(Ordering::Relaxed)
    }

    /// The largest buffer `get` can return.
    pub fn max_buf(&self) -> usize {
        self.shared.classes.last().map_or(0, |c| c.size)
    }

    /// `(size, free, count)` of each class.
    pub fn classes(&self) -> Vec<(usize, usize, usize)> {
        self.shared
            .classes
            .iter()
            .map(|c| (c.size, c.free.len(), c.count))
            .collect()
    }
}

impl fmt::Debug for IoBufPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoBufPool")
            .field("bytes", &self.shared.bytes)
            .field("in_use_bytes", &self.in_use_bytes())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heap_buffers_are_aligned_and_copy() {
        let b = IoBuf::from_slice(&[1, 2, 3]);
        assert_eq!(&b[..], &[1, 2, 3]);
        assert_eq!(b.as_ptr() as usize % IO_ALIGN, 0);
        assert!(!b.is_pooled());
        let e = IoBuf::empty();
        assert!(e.is_empty());
        assert_eq!(e.as_ptr() as usize % IO_ALIGN, 0);
        assert_eq!(IoBuf::from(vec![9u8; 5000]).capacity(), 8192);
    }

    #[test]
    fn pool_is_bounded_and_slots_come_back_from_any_thread() {
        let pool = IoBufPool::new(5 * 64 * 1024, 1 << 20);
        assert_eq!(
            pool.classes().iter().map(|c| c.0).collect::<Vec<_>>(),
            vec![4096, 16384, 65536, 262144, 1 << 20]
        );
        let (base, bytes) = pool.region();
        let mut held = Vec::new();
        while let Some(mut b) = pool.get(4096) {
            assert!(pool.contains(b.as_ptr(), b.len()));
            assert_eq!(b.as_ptr() as usize % IO_ALIGN, 0);
            assert!(b.as_ptr() as usize >= base as usize);
            assert!(b.as_ptr() as usize + b.capacity() <= base as usize + bytes);
            b[0] = held.len() as u8;
            held.push(b);
        }
        // Every class down to the 1 MiB one served 4 KiB requests.
        assert_eq!(pool.in_use_bytes(), pool.total_bytes());
        assert!(pool.get(1).is_none());
        assert!(pool.get(2 << 20).is_none());
        assert_eq!(pool.misses(), 3);
        // A caller with a fallback (`try_get`) is not a miss.
        assert!(pool.try_get(4096).is_none());
        assert_eq!(pool.misses(), 3);
        let n = held.len();
        let shared: Vec<SharedBuf> = held.into_iter().map(IoBuf::share).collect();
        let t = std::thread::spawn(move || {
            for (i, s) in shared.iter().enumerate() {
                assert_eq!(s[0], i as u8);
            }
            drop(shared);
        });
        t.join().unwrap();
        assert_eq!(pool.in_use_bytes(), 0);
        let again: Vec<IoBuf> = (0..n).map_while(|_| pool.get(4096)).collect();
        assert_eq!(again.len(), n);
    }

    #[test]
    fn shared_buffer_unwraps_only_when_alone() {
        let pool = IoBufPool::new(1 << 20, 64 << 10);
        let s = pool.get(8192).unwrap().share();
        let s2 = s.clone();
        let s = s.try_unwrap().unwrap_err();
        drop(s2);
        let b = s.try_unwrap().unwrap();
        assert_eq!(b.len(), 8192);
        assert!(b.is_pooled());
    }
}
