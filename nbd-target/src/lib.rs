//! nbd-target
