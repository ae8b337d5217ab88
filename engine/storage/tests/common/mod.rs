//! Helpers shared by the integration tests (each test binary uses a subset).
#![allow(dead_code)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use storage::ring::{RecordHeader, Ring};

/// A scratch directory on a disk filesystem (/var/tmp, not tmpfs, so
/// O_DIRECT and fallocate behave as in production), removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let path = PathBuf::from(format!(
            "/var/tmp/deltamirror-storage-test-{}-{name}-{n}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create scratch dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A small deterministic PRNG (SplitMix64), so a seed reproduces a run.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

// Records for the ring tests (ring.rs, ring_device.rs).

/// The header of record `seq` in the ring tests.
pub fn hdr(seq: u64) -> RecordHeader {
    RecordHeader {
        seq,
        gen: 3,
        kind: 1,
        flags: 2,
        offset: seq * 4096,
        len: 4096,
    }
}

/// A payload that identifies its seq, so tests can find it in the file.
pub fn payload(seq: u64, len: usize) -> Vec<u8> {
    let tag = format!("<seq {seq:08}>");
    tag.bytes().cycle().take(len).collect()
}

/// Append record `seq` with a payload of `len` bytes ([`payload`]).
pub fn append(ring: &mut Ring, seq: u64, len: usize) {
    ring.append(&hdr(seq), payload(seq, len).into())
        .expect("fits");
}

/// Record `seq` is in the ring, with its header and a payload of `len`
/// bytes.
pub fn check(ring: &Ring, seq: u64, len: usize) {
    let (h, p) = ring.get(seq).unwrap_or_else(|| panic!("seq {seq} missing"));
    assert_eq!(h, hdr(seq));
    assert_eq!(p, payload(seq, len));
}

/// Offset of the first occurrence of `needle` in the file (or block device).
pub fn find(path: &Path, needle: &[u8]) -> u64 {
    let data = std::fs::read(path).unwrap();
    data.windows(needle.len())
        .position(|w| w == needle)
        .expect("bytes in file") as u64
}

/// Flip a byte at `offset` of the file (or block device), durably.
pub fn flip_byte(path: &Path, offset: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x5a;
    f.write_all_at(&b, offset).unwrap();
    f.sync_data().unwrap();
}
