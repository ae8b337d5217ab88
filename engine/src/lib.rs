//! deltamirror mirror engine.
pub mod status;
