//! deltamirror mirror engine.
