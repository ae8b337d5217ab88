//! Online verify (as `drbdadm verify`): the primary compares both replicas
//! while host I/O runs, extent by extent.
//!
//! For each extent the primary picks a barrier seq `S` (the last seq it has
//! sent) and asks the backup for the extent's chunk digests "after S". Each
//! node queues the read of the extent in its execution queue right after
//! ring entry `S`, so the read sees every entry up to `S` and none after it
//! on both nodes: equal replicas give equal digests, whatever the host
//! writes meanwhile (overlapping writes after `S` wait behind the read).
//! Mismatched chunks are reported; with `repair` they go into the dirty map
//! and the next handshake resyncs them from the primary.
//!
//! Pure helpers and state only; the hooks live in `machine.rs`.

use std::collections::BTreeMap;

use super::types::{Seq, Token};

/// Largest extent one `VerifyReq` may ask for, and most chunks in it.
pub const MAX_VERIFY_EXTENT: u64 = 4 << 20;
pub const MAX_VERIFY_CHUNKS: u64 = 4096;

/// Mismatched chunk ranges kept in the report (the count goes on).
pub const MAX_REPORTED_MISMATCHES: usize = 64;

/// A 64-bit digest of each `chunk`-byte piece of `data`: two CRC32-C with
/// different seeds (hardware-accelerated; DRBD's common verify-alg is
/// crc32c too). It detects corruption, not an adversary.
pub fn chunk_digests(data: &[u8], chunk: u64) -> Vec<u64> {
    data.chunks(chunk.max(1) as usize)
        .map(|c| {
            let a = crc32c::crc32c(c) as u64;
            let b = crc32c::crc32c_append(0x9E37_79B9, c) as u64;
            (a << 32) | b
        })
        .collect()
}

/// Offsets of the chunks whose digests differ (a missing digest differs).
pub fn mismatched_chunks(offset: u64, chunk: u64, local: &[u64], remote: &[u64]) -> Vec<u64> {
    (0..local.len().max(remote.len()))
        .filter(|&i| local.get(i) != remote.get(i))
        .map(|i| offset + i as u64 * chunk)
        .collect()
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VerifyState {
    Running,
    Done,
    /// Stopped before the end (the link went down, the node stopped being
    /// the primary...): the reason.
    Interrupted(String),
}

/// What a verify run found so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    pub offset: u64,
    pub length: u64,
    pub chunk_bytes: u64,
    pub done_bytes: u64,
    pub mismatched_chunks: u64,
    /// The first mismatched chunks (offset, length), merged when adjacent.
    pub mismatches: Vec<(u64, u64)>,
    pub repair: bool,
    /// Chunks put into the dirty map for a resync from the primary.
    pub repair_chunks: u64,
    pub state: VerifyState,
    pub start_ms: u64,
    pub end_ms: u64,
}

impl VerifyReport {
    pub(super) fn record(&mut self, chunk_offset: u64) {
        self.mismatched_chunks += 1;
        if let Some(last) = self.mismatches.last_mut() {
            if last.0 + last.1 == chunk_offset {
                last.1 += self.chunk_bytes;
                return;
            }
        }
        if self.mismatches.len() < MAX_REPORTED_MISMATCHES {
            self.mismatches.push((chunk_offset, self.chunk_bytes));
        }
    }
}

/// One extent being compared.
pub(super) struct Pending {
    pub offset: u64,
    pub len: u64,
    pub local: Option<Vec<u64>>,
    pub remote: Option<Vec<u64>>,
}

/// The primary's side of a run.
pub(super) struct VerifyRun {
    pub report: VerifyReport,
    pub next_offset: u64,
    pub end: u64,
    pub extent_bytes: u64,
    pub inflight: BTreeMap<u64, Pending>,
    pub next_id: u64,
    pub bytes_per_sec: u64,
    pub tokens: f64,
    /// Offsets of every mismatched chunk (for the repair).
    pub bad: Vec<u64>,
}

/// A verify read queued behind ring entry `after`.
#[derive(Clone, Copy, Debug)]
pub(super) struct QueuedRead {
    pub after: Seq,
    pub token: Token,
    pub offset: u64,
    pub len: u64,
}

/// Whose digests a verify read produces.
#[derive(Clone, Copy, Debug)]
pub(super) enum ReadFor {
    /// This node's run, extent `id`.
    Local(u64),
    /// The peer's `VerifyReq` `id`, chunked by `chunk`.
    Peer { id: u64, chunk: u64 },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_tell_chunks_apart() {
        let mut a = vec![7u8; 4 * 4096];
        let d1 = chunk_digests(&a, 4096);
        assert_eq!(d1.len(), 4);
        assert_eq!(d1[0], d1[3]);
        a[2 * 4096 + 100] ^= 1;
        let d2 = chunk_digests(&a, 4096);
        assert_eq!(
            mismatched_chunks(1 << 20, 4096, &d1, &d2),
            vec![(1 << 20) + 8192]
        );
        assert_eq!(
            mismatched_chunks(0, 4096, &d1, &d2[..2]),
            vec![8192, 12288],
            "a missing digest is a mismatch"
        );
    }

    #[test]
    fn report_merges_adjacent_chunks_and_bounds_the_list() {
        let mut r = VerifyReport {
            offset: 0,
            length: 1 << 30,
            chunk_bytes: 4096,
            done_bytes: 0,
            mismatched_chunks: 0,
            mismatches: vec![],
            repair: false,
            repair_chunks: 0,
            state: VerifyState::Running,
            start_ms: 0,
            end_ms: 0,
        };
        r.record(0);
        r.record(4096);
        r.record(3 * 4096);
        assert_eq!(r.mismatches, vec![(0, 8192), (12288, 4096)]);
        for i in 0..1000 {
            r.record((10 + 2 * i) * 4096);
        }
        assert_eq!(r.mismatches.len(), MAX_REPORTED_MISMATCHES);
        assert_eq!(r.mismatched_chunks, 1003);
    }
}
