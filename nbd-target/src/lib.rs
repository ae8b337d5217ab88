//! NBD front-end: exports a [`volume::Volume`] over the Network Block
//! Device protocol (fixed newstyle handshake, simple replies).
//!
//! Code map:
//! - [`proto`]: wire constants, the pure request decoder and the one
//!   volume-error-to-errno mapping.
//! - [`handshake`]: option haggling over any `Read`/`Write`.
//! - [`conn`]: the transmission phase as a state machine over bytes
//!   ([`conn::NbdConn`]), which a connection reactor ([`netreactor`]) drives.
//! - [`session`]: the connection's context, and both phases over any
//!   blocking `Read`/`Write` (tests, fuzzers).
//! - `server`: the TCP listener; the handshake on a short-lived thread per
//!   connection, then the socket handed to a reactor.
//!
//! Architecture invariant: nothing here knows about mirroring; a request
//! reaches the volume only after [`proto::decode_request`] accepted it.
//! See docs/nbd.md for what is supported.

pub mod conn;
pub mod handshake;
pub mod proto;
mod server;
pub mod session;

pub use netreactor::DEFAULT_ZERO_COPY_RECEIVE_MIN_BYTES;

pub use server::{
    start, start_on, NbdConfig, NbdServer, HANDSHAKE_TIMEOUT_MS, MAX_INFLIGHT_PER_CONNECTION,
};
