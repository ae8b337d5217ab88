#![allow(dead_code)]
//! Shared helpers for the end-to-end tests.

use nvme_host::initiator::{Controller, HostConfig};
use nvme_target::{start, NvmeConfig, NvmeTarget};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use volume::{
    Completion, Geometry, MemVolume, PathCell, PathState, Volume, VolumeIdentity, VolumeOp,
};

pub const NQN: &str = "nqn.2026-11.io.deltamirror:vol0";

pub fn mem(block_size: u32, blocks: u64) -> Arc<MemVolume> {
    Arc::new(MemVolume::new(block_size, blocks))
}

pub fn cfg() -> NvmeConfig {
    NvmeConfig::new("127.0.0.1:0".parse().unwrap(), NQN)
}

pub fn serve(vol: Arc<dyn Volume>) -> NvmeTarget {
    start(cfg(), vol).unwrap()
}

pub fn host() -> HostConfig {
    HostConfig::new(NQN)
}

pub fn connect(t: &NvmeTarget) -> Controller {
    Controller::connect(t.local_addr(), &host()).unwrap()
}

pub fn writes(v: &MemVolume) -> u64 {
    v.writes.load(Ordering::Relaxed)
}

pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// One node's view of a shared (mirrored) memory volume: its own path
/// state, the data shared with the other node.
pub struct NodeVol {
    pub inner: Arc<MemVolume>,
    pub path: PathCell,
    pub node_index: u16,
}

impl NodeVol {
    pub fn pair(block_size: u32, blocks: u64) -> (Arc<NodeVol>, Arc<NodeVol>) {
        let inner = mem(block_size, blocks);
        let a = Arc::new(NodeVol {
            inner: inner.clone(),
            path: PathCell::new(PathState::Optimized),
            node_index: 1,
        });
        let b = Arc::new(NodeVol {
            inner,
            path: PathCell::new(PathState::Inaccessible),
            node_index: 2,
        });
        (a, b)
    }
}

impl Volume for NodeVol {
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }
    fn identity(&self) -> VolumeIdentity {
        VolumeIdentity {
            node_index: self.node_index,
            ..self.inner.identity()
        }
    }
    fn path_state(&self) -> PathState {
        self.path.get()
    }
    fn path_epoch(&self) -> u64 {
        self.path.epoch()
    }
    fn max_io_bytes(&self) -> u32 {
        self.inner.max_io_bytes()
    }
    fn submit(&self, op: VolumeOp, done: Completion) {
        if self.path.get() != PathState::Optimized {
            return done(Err(volume::IoError::NotPrimary));
        }
        self.inner.submit(op, done)
    }
}
