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

/// The persistent ring as the core sees it: the delay buffer and the delta
/// queue. Appends are volatile until the driver reports `RingFlushed`.
pub trait Log {
    /// Oldest seq held (== `next_seq()` when empty).
    fn first_seq(&self) -> Seq;
    /// Seq the next append must carry.
    fn next_seq(&self) -> Seq;
    fn fits(&self, payload_len: usize) -> bool;
    /// Appends; `false` when the ring is full.
    fn append(&mut self, h: &ReqHeader, payload: &[u8]) -> bool;
    fn get(&self, seq: Seq) -> Option<(ReqHeader, &[u8])>;
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
