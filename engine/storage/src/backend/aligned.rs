//! Page-aligned I/O buffers and a bounded pool of them.
//!
//! O_DIRECT needs the buffer address, length and file offset aligned to the
//! device's logical block size; aligning every buffer to 4096 bytes covers
//! both 512-byte and 4 KiB devices. The buffer type is the volume's
//! [`volume::IoBuf`], so a payload a front-end received into one reaches the
//! disk without a copy.

/// The engine's name for the volume's block-aligned buffer.
pub use volume::IoBuf as AlignedBuf;

/// Alignment of every [`AlignedBuf`], in bytes.
pub const BUF_ALIGN_BYTES: usize = volume::IO_ALIGN;

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
            self.buf_len_bytes.next_multiple_of(BUF_ALIGN_BYTES),
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
