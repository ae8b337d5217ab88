//! deltamirror mirror engine: the sans-IO mirror core, its deterministic
//! simulator, the replication link and the node's reactor.

pub mod core;
pub mod sim;
pub mod status;
