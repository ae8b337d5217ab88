//! The sans-IO mirror core: events in, actions out. No clock, no sockets,
//! no threads. The same code runs in the node's reactor and in the
//! deterministic simulator (`crate::sim`).
//!
//! Architecture invariant: nothing in this module performs I/O or reads
//! the time; time arrives as `Event::Tick`, durability as `RingFlushed` /
//! `MetaPersisted`, disk results as `Executed` / `DiskFlushed`.

pub mod decide;
pub mod machine;
pub mod meta;
pub mod msg;
pub mod types;
pub mod verify;

pub use machine::session::{SessionState, Side};
pub use machine::{Action, Core, Event, HostError};
pub use meta::{DirtyMap, Meta};
pub use msg::{Hello, Msg};
pub use types::*;
pub use volume::SharedBuf;

/// The persistent ring as the core sees it: the delay buffer and the delta
/// queue. Appends are volatile until a flush makes them durable.
///
/// Flush protocol (the same in the node and in the simulator): the core asks
/// for a flush with `Action::FlushRing`; the driver calls
/// [`Core::begin_log_flush`](machine::Core::begin_log_flush), which calls
/// [`Log::begin_flush`] and hands back the seq the flush makes durable and
/// the I/O the driver must carry out ([`Log::Flush`]: for the node's ring an
/// fdatasync of the ring file). The driver reports the outcome as
/// `Event::RingFlushed { through }` (the core then calls
/// [`Log::flush_completed`]) or `Event::RingFlushFailed { through, why }`
/// (the core calls [`Log::flush_failed`] and refuses further work). A log
/// whose on-disk state became unknown in any other way (a failed write)
/// says so through [`Log::failure`], and the core refuses further work too.
pub trait Log {
    /// The I/O a driver carries out to complete a flush begun with
    /// [`Log::begin_flush`] (the simulator's log needs none: `()`).
    type Flush;
    /// Oldest seq held (== `next_seq()` when empty).
    fn first_seq(&self) -> Seq;
    /// Seq the next append must carry.
    fn next_seq(&self) -> Seq;
    fn fits(&self, payload_len: usize) -> bool;
    /// Appends; `false` when the ring is full. The log may keep `payload`
    /// (the buffer the host's write arrived in) instead of copying it.
    fn append(&mut self, h: &ReqHeader, payload: SharedBuf) -> bool;
    fn get(&self, seq: Seq) -> Option<(ReqHeader, &[u8])>;
    /// The buffer entry `seq`'s payload arrived in, while the log still
    /// holds it: the driver writes the disk and sends the link frame from
    /// it without a copy. `None` when the log keeps no such buffer for the
    /// entry (then `get` is the way to the payload).
    fn payload_buf(&self, seq: Seq) -> Option<SharedBuf> {
        let _ = seq;
        None
    }
    /// Every entry through `seq` executed here (and, on a sender, was sent:
    /// it executed after its ACK1), so the driver needs none of their
    /// payload buffers any more; the log may let them go (the payloads stay
    /// readable through `get`).
    fn release_through(&mut self, seq: Seq) {
        let _ = seq;
    }
    fn trim_through(&mut self, seq: Seq);
    fn truncate_after(&mut self, seq: Seq);
    fn reset(&mut self, next_seq: Seq);
    fn payload_bytes(&self) -> u64;
    fn capacity_bytes(&self) -> u64;
    /// The ring would free space (or otherwise benefit) from a sync even
    /// with nothing new appended.
    fn wants_sync(&self) -> bool {
        false
    }
    /// Start a flush of everything appended so far: returns the highest seq
    /// it makes durable once the returned I/O completed and
    /// [`Log::flush_completed`] is called with that seq.
    fn begin_flush(&mut self) -> (Seq, Self::Flush);
    /// The flush that `begin_flush` said makes `through` durable completed.
    /// Flushes may complete in any order; one that completed covers every
    /// flush begun before it.
    fn flush_completed(&mut self, through: Seq);
    /// The flush for `through` failed: the log's on-disk state is unknown
    /// (the kernel may have dropped what it was asked to write), so it is
    /// never reported durable; [`Log::failure`] says why from now on.
    fn flush_failed(&mut self, through: Seq, why: String);
    /// Why the log's on-disk state is unknown (a failed write or flush), if
    /// it is: the node must refuse further work, and a restart recovers
    /// from what is durable.
    fn failure(&self) -> Option<&str>;
    /// Make everything appended durable before returning (shutdown).
    fn flush_now(&mut self) -> Result<(), String>;
    fn head(&self) -> Seq {
        self.next_seq() - 1
    }
    fn len(&self) -> u64 {
        self.next_seq() - self.first_seq()
    }
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
