//! The persistent ring as the core's `Log`.

use super::*;
use storage::backend::IoSeg;
use volume::SharedBuf;

/// The I/O that completes a ring flush (see `docs/ring-format.md`,
/// *Durability protocol*).
pub enum RingFlushIo {
    /// Run `writes` on the ring file `fd` as durable writes
    /// (`BackendOp::WriteVecFd` with `dsync`: `RWF_DSYNC`, so a write is
    /// on stable storage when it completes; they do not overlap, so all at
    /// once). The batch is durable once every one completed in full and
    /// every batch begun before it was reported; a failed or short write
    /// fails the flush.
    Batch {
        fd: RawFd,
        writes: Vec<(u64, Vec<IoSeg>)>,
    },
    /// Two batches are in flight already. Begin the flush again once one
    /// was reported; what that batch makes durable covers this request.
    Busy,
}

/// Adapts the persistent ring to the core's `Log`. The node reaches the
/// ring only through that trait.
pub struct RingLog(pub(super) Ring);

pub(super) fn to_record(h: &ReqHeader) -> RecordHeader {
    RecordHeader {
        seq: h.seq,
        gen: h.gen,
        kind: h.kind as u8,
        flags: h.fua as u8,
        offset: h.offset,
        len: h.len,
    }
}

fn from_record(r: &RecordHeader) -> ReqHeader {
    ReqHeader {
        seq: r.seq,
        gen: r.gen,
        kind: ReqKind::from_code(r.kind).unwrap_or(ReqKind::Write),
        fua: r.flags & 1 != 0,
        offset: r.offset,
        len: r.len,
    }
}

impl Log for RingLog {
    /// The backend operations that complete a flush: the batch's durable
    /// writes, issued beside the disk I/O.
    type Flush = RingFlushIo;

    fn first_seq(&self) -> Seq {
        self.0.first_seq()
    }
    fn next_seq(&self) -> Seq {
        self.0.next_seq()
    }
    fn fits(&self, payload_len: usize) -> bool {
        self.0.fits(payload_len)
    }
    fn append(&mut self, h: &ReqHeader, payload: SharedBuf) -> bool {
        self.0.append(&to_record(h), payload).is_ok()
    }
    fn payload_buf(&self, seq: Seq) -> Option<SharedBuf> {
        self.0.payload_buf(seq)
    }
    fn release_through(&mut self, seq: Seq) {
        self.0.release_through(seq)
    }
    fn get(&self, seq: Seq) -> Option<(ReqHeader, &[u8])> {
        self.0.get(seq).map(|(r, p)| (from_record(&r), p))
    }
    fn trim_through(&mut self, seq: Seq) {
        self.0.trim_through(seq)
    }
    fn truncate_after(&mut self, seq: Seq) {
        timed("ring truncation", || self.0.truncate_after(seq))
    }
    fn reset(&mut self, next_seq: Seq) {
        timed("ring reset", || self.0.reset(next_seq))
    }
    fn payload_bytes(&self) -> u64 {
        self.0.payload_bytes()
    }
    fn capacity_bytes(&self) -> u64 {
        self.0.capacity_bytes()
    }
    fn begin_flush(&mut self) -> (Seq, RingFlushIo) {
        match self.0.begin_write() {
            Some(w) => (
                w.through,
                RingFlushIo::Batch {
                    fd: self.0.fd(),
                    writes: w.writes,
                },
            ),
            None => (self.0.next_seq() - 1, RingFlushIo::Busy),
        }
    }
    fn flush_completed(&mut self, through: Seq) {
        self.0.sync_completed(through)
    }
    fn flush_failed(&mut self, through: Seq, why: String) {
        self.0.sync_failed(through, why)
    }
    fn failure(&self) -> Option<&str> {
        self.0.write_error()
    }
    fn flush_now(&mut self) -> Result<(), String> {
        self.0.sync().map_err(|e| e.to_string())
    }
    fn wants_sync(&self) -> bool {
        // Every regular sync also makes trimmed space reusable; a sync just
        // for that is worth it only when the ring is getting full.
        self.0.reclaim_pending() && self.0.used_bytes() > self.0.capacity_bytes() / 2
    }
}
