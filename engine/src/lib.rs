//! deltamirror mirror engine: the sans-IO mirror core, its deterministic
//! simulator, the replication link and the node's reactor.

pub mod core;
pub mod link;
pub mod node;
pub mod sim;
pub mod status;
pub mod sys;
