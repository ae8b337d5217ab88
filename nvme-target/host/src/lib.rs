//! A small NVMe/TCP host for deltamirror's tests and benchmarks: the
//! initiator (admin and I/O queues over TCP, identify, discovery, ANA and
//! asynchronous events), a pipelined load generator with verification and a
//! multipath failover run that follows ANA, and the `dm-nvme` command.
//!
//! It speaks the codec of the `nvme-target` crate beside it (`pdu`,
//! `spec`); the target depends on it only for its own tests.

pub mod initiator;
pub mod load;
