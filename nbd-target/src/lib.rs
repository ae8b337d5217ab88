//! NBD front-end: exports a [`volume::Volume`] over the Network Block
//! Device protocol (fixed newstyle handshake, simple replies).
//!
//! Code map:
//! - [`proto`]: wire constants, the pure request decoder and the one
//!   volume-error-to-errno mapping.
//! - [`handshake`]: option haggling over any `Read`/`Write`.
//! - [`session`]: one connection (reader on the caller's thread, a scoped
//!   reply thread batching replies), over any `Read`/`Write`.
//! - `server`: the TCP listener and connection registry.
//!
//! Architecture invariant: nothing here knows about mirroring; a request
//! reaches the volume only after [`proto::decode_request`] accepted it.
//! See docs/nbd.md for what is supported.

pub mod handshake;
pub mod proto;
mod server;
pub mod session;

pub use server::{start, NbdConfig, NbdServer, HANDSHAKE_TIMEOUT_MS, MAX_INFLIGHT_PER_CONNECTION};
