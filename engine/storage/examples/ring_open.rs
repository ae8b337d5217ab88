//! Recovery time: how long `Ring::open` takes on a full ring (it checks
//! every retained record's checksum, payload included, and rebuilds the
//! index).
//!
//! ```text
//! cargo run --release -p storage --example ring_open -- DIR [MIB] [RECORD_BYTES] [PER_BATCH]
//! ```
//!
//! DIR: a directory on the filesystem to measure (the ring is created there
//! and removed afterwards); MIB: ring size (default 1024); RECORD_BYTES:
//! payload of each record (default 4096); PER_BATCH: records per batch
//! write (default 32, so records share groups as at depth). The ring is
//! filled to 90 %, synced and closed, then opened twice: the first open
//! after dropping the file's pages from the page cache (cold, as after a
//! reboot), the second with them cached.

mod common;
use common::arg;

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::Instant;

use storage::backend::SharedBuf;
use storage::ring::{RecordHeader, Ring};
use storage::AlignedBuf;

/// Drop the file's cached pages (they are clean after the sync).
fn drop_cache(path: &std::path::Path) {
    let f = std::fs::File::open(path).expect("ring file");
    // SAFETY: posix_fadvise takes no memory arguments.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0, "posix_fadvise");
}

fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| {
        eprintln!("usage: ring_open DIR [MIB] [RECORD_BYTES] [PER_BATCH]");
        std::process::exit(2)
    }));
    let (mib, len, per_batch) = (arg(2, 1024), arg(3, 4096) as usize, arg(4, 32).max(1));
    let path = dir.join("ring-open-ring");
    let mut ring = Ring::create(&path, mib << 20, 1).expect("ring");
    let payload: SharedBuf = AlignedBuf::from_slice(&vec![0x5a; len]).share();
    let fill = ring.capacity_bytes() / 10 * 9;
    while ring.used_bytes() < fill {
        for _ in 0..per_batch {
            let h = RecordHeader {
                seq: ring.next_seq(),
                gen: 1,
                kind: 1,
                flags: 0,
                offset: 0,
                len: len as u64,
            };
            if ring.append(&h, payload.clone()).is_err() {
                break;
            }
        }
        // Each batch its own write (and so its own groups).
        let s = ring.prepare_sync();
        ring.sync_completed(s);
    }
    ring.sync().expect("sync");
    let records = ring.len();
    drop(ring);
    for cold in [true, false] {
        if cold {
            drop_cache(&path);
        }
        let start = Instant::now();
        let (ring, rec) = Ring::open(&path).expect("open");
        let took = start.elapsed();
        assert_eq!(rec.records, records);
        println!(
            "open ({}): {} MiB ring, {records} records of {len} bytes ({per_batch} per batch): \
             {:.1} ms",
            if cold { "cold" } else { "cached" },
            mib,
            took.as_secs_f64() * 1e3
        );
        drop(ring);
    }
    let _ = std::fs::remove_file(&path);
}
