//! nvme-target
