//! iscsi-target
