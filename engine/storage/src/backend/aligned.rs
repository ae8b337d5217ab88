//! Page-aligned I/O buffers and a bounded pool of them.
//!
//! O_DIRECT needs the buffer address, length and file offset aligned to the
//! device's logical block size; aligning every buffer to 4096 bytes covers
//! both 512-byte and 4 KiB devices.

use std::alloc::{self, Layout};
use std::fmt;
use std::ptr::NonNull;

/// Alignment of every [`AlignedBuf`], in bytes.
pub const BUF_ALIGN_BYTES: usize = 4096;

/// A zero-initialised heap buffer whose address is aligned to
/// [`BUF_ALIGN_BYTES`]. Its length can be changed within its capacity, so a
/// pooled buffer can serve requests of any size up to the pool's buffer size.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    /// Allocated bytes: `len` rounded up to the alignment (at least one page,
    /// so a zero-length buffer still owns a valid allocation).
    capacity: usize,
}

// SAFETY: the buffer exclusively owns its allocation (no aliasing pointers
// are handed out beyond borrows tied to `&self`/`&mut self`), so moving it to
// another thread is as safe as moving a `Vec<u8>`.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes.
    pub fn new(len: usize) -> AlignedBuf {
        let capacity = len.max(1).next_multiple_of(BUF_ALIGN_BYTES);
        let layout = Self::layout(capacity);
        // SAFETY: `layout` has a non-zero size (capacity >= 4096).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, len, capacity }
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> AlignedBuf {
        let mut buf = AlignedBuf::new(data.len());
        buf.as_mut_slice().copy_from_slice(data);
        buf
    }

    fn layout(capacity: usize) -> Layout {
        Layout::from_size_align(capacity, BUF_ALIGN_BYTES).expect("buffer size overflows isize")
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes allocated; [`AlignedBuf::set_len`] may grow the buffer up to this.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Change the visible length without reallocating. Bytes that become
    /// visible keep whatever the buffer held before (zero for a fresh buffer).
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.capacity,
            "AlignedBuf::set_len({len}) beyond capacity {}",
            self.capacity
        );
        self.len = len;
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `capacity >= len` initialised (zeroed at
        // allocation) bytes owned by `self`, borrowed for the lifetime of `&self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Raw pointer for handing the buffer to the kernel. The caller keeps the
    /// buffer alive (owned by the in-flight operation) until the kernel is done.
    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` was returned by `alloc_zeroed` with this exact layout
        // and is freed only here.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.capacity)) }
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl Clone for AlignedBuf {
    fn clone(&self) -> AlignedBuf {
        AlignedBuf::from_slice(self.as_slice())
    }
}

/// A fixed number of equally sized buffers, allocated once at start-up, so
/// the I/O path never allocates. `get` returns `None` when every buffer is in
/// use: the caller applies back-pressure instead of allocating more.
pub struct BufPool {
    free: Vec<AlignedBuf>,
    count: usize,
    buf_len_bytes: usize,
}

impl BufPool {
    /// `count` buffers of `buf_len_bytes` each.
    pub fn new(count: usize, buf_len_bytes: usize) -> BufPool {
        let free = (0..count).map(|_| AlignedBuf::new(buf_len_bytes)).collect();
        BufPool {
            free,
            count,
            buf_len_bytes,
        }
    }

    /// A free buffer with its length reset to the pool's buffer size, or
    /// `None` if all are in use.
    pub fn get(&mut self) -> Option<AlignedBuf> {
        let mut buf = self.free.pop()?;
        buf.set_len(self.buf_len_bytes);
        Some(buf)
    }

    /// Return a buffer obtained from [`BufPool::get`].
    pub fn put(&mut self, buf: AlignedBuf) {
        assert_eq!(
            buf.capacity(),
            self.buf_len_bytes.max(1).next_multiple_of(BUF_ALIGN_BYTES),
            "buffer returned to a pool it does not belong to"
        );
        assert!(
            self.free.len() < self.count,
            "more buffers returned to the pool than it holds ({})",
            self.count
        );
        self.free.push(buf);
    }

    /// Buffers currently free.
    pub fn available(&self) -> usize {
        self.free.len()
    }

    /// Buffers owned by the pool in total.
    pub fn count(&self) -> usize {
        self.count
    }

    pub fn buf_len_bytes(&self) -> usize {
        self.buf_len_bytes
    }
}
