//! The RDMA replication transport of deltamirror: a binding to libfabric
//! (a C shim over its static-inline calls, in `sys`) and the fabric
//! channel (`channel`): one-sided writes with 32-bit immediate data into
//! the peer's landing ring, over an FI_EP_MSG endpoint with manual
//! progress. The `verbs` provider runs it on RoCE and InfiniBand; the
//! userspace `tcp` provider runs the same code path on any network.

pub mod channel;
pub mod mem;
pub mod sys;

pub use channel::{connect, Channel, ChannelConfig, ChannelStats, Listener, RingDesc, TOKEN_BYTES};
