//! NVMe-oF/TCP target for deltamirror. The small NVMe/TCP initiator for
//! tests and benchmarks (and `dm-nvme`) is the `nvme-host` crate beside it.
//!
//! The target exports one [`volume::Volume`] as namespace 1 of an NVM
//! subsystem, plus the well-known discovery subsystem on the same port.
//! The namespace sits in one ANA group whose state follows the volume's
//! path state (primary = optimized, backup = inaccessible); a change is
//! announced with an ANA change asynchronous event.
//!
//! Architecture invariant: the target never writes to the volume for a
//! command that failed validation; protocol errors are values (a status or
//! a C2HTermReq), never panics.

pub mod admin;
pub mod fuzz;
pub mod pdu;
pub mod queue;
pub mod queue_io;
pub mod spec;
pub mod subsystem;
pub mod target;

pub use target::{start, start_on, start_with, DiscoveryPort, NvmeConfig, NvmeTarget};

pub use netreactor::{
    ReactorConfig, DEFAULT_ADAPTIVE_SPIN_US, DEFAULT_ZERO_COPY_RECEIVE_MIN_BYTES,
};
