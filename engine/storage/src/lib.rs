//! Block backends, persistent rings and the node metadata store.
//!
//! - [`backend`]: the narrow [`Backend`] trait with an io_uring backend for
//!   files and block devices, an in-memory backend and a fault injector.
//! - [`ring`]: the persistent, memory-mapped ring that holds a node's delay
//!   buffer and delta queue (format: `docs/ring-format.md`).
//! - [`meta`]: a crash-safe store for the node's small persistent state.
//! - [`blockdev`]: block device size and block size, exclusive opens, and
//!   the signatures `deltamirror format` checks before it writes a ring
//!   onto a device.

pub mod backend;
pub mod blockdev;
pub mod meta;
pub mod ring;

pub use backend::{AlignedBuf, Backend, BackendCompletion, BackendOp};
pub use meta::{MetaError, MetaStore};
pub use ring::{RecordHeader, Recovery, Ring, RingError, RingFull};
