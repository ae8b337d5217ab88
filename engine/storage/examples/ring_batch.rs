//! Ring batch latency, the two ways of making a batch durable, side by side:
//! *fdatasync* (the batch's writes, then `BackendOp::SyncFd`, as up to ring
//! format 2's first cut) and *dsync* (every write a durable `RWF_DSYNC`
//! write, what the node does now). Both run through the same io_uring
//! backend on the same ring file, in alternating rounds, so a busy machine
//! perturbs both alike.
//!
//! ```text
//! cargo run --release -p storage --example ring_batch -- DIR|DEVICE [BATCHES] [RECORDS] [ROUNDS]
//! ```
//!
//! DIR: a directory on the filesystem to measure (the ring and a small
//! device file are created there and removed afterwards); or DEVICE: a
//! block device to put the ring on (its first 64 MiB + 12 KiB are
//! overwritten; the small device file goes to /var/tmp); BATCHES per round
//! and mode (default 500); RECORDS of 4 KiB per batch (default 1: a QD1
//! write); ROUNDS (default 4). Prints each mode's batch latency p50 / p90 /
//! p99 in microseconds, one batch at a time, and the ring bytes a batch
//! writes (its records and, when one is due, the header slot).

mod common;
use common::arg;

use std::path::PathBuf;
use std::time::Instant;

use storage::backend::{
    create_file_device, Backend, BackendCompletion, BackendOp, SharedBuf, UringBackend, UringConfig,
};
use storage::ring::{RecordHeader, Ring};
use storage::AlignedBuf;

/// Submit `ops` and wait for all of them; `Err` on the first failure.
fn run_all(b: &mut UringBackend, ops: Vec<BackendOp>) -> Result<(), i32> {
    let n = ops.len();
    for (i, op) in ops.into_iter().enumerate() {
        b.submit(i as u64, op).expect("queue has room");
    }
    b.flush_submissions();
    let mut out: Vec<BackendCompletion> = Vec::new();
    while out.len() < n {
        if b.reap(&mut out) == 0 {
            b.wait(&[], 1000);
        }
    }
    out.iter().try_for_each(|c| c.result.map(|_| ()))
}

fn pct(v: &mut [u64], p: f64) -> u64 {
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p) as usize]
}

fn main() {
    let target = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| {
        eprintln!("usage: ring_batch DIR|DEVICE [BATCHES] [RECORDS] [ROUNDS]");
        std::process::exit(2)
    }));
    let (batches, records, rounds) = (arg(2, 500), arg(3, 1), arg(4, 4));
    let on_device = storage::blockdev::is_block_device(&target).expect("stat DIR|DEVICE");
    let (dev, ring_path) = if on_device {
        let dev = PathBuf::from(format!("/var/tmp/ring-batch-dev-{}", std::process::id()));
        (dev, target.clone())
    } else {
        (
            target.join("ring-batch-dev"),
            target.join("ring-batch-ring"),
        )
    };
    create_file_device(&dev, 1 << 20).expect("device file");
    let mut be = UringBackend::open(&dev, &UringConfig::default()).expect("io_uring");
    let mut ring = Ring::create(&ring_path, 64 << 20, 1).expect("ring");
    println!("ring at {}: {}", ring_path.display(), ring.describe());
    let payload: SharedBuf = AlignedBuf::from_slice(&[0x5a; 4096]).share();
    let mut lat: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
    let mut bytes: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..rounds {
        for (mode, dsync) in [(0, false), (1, true)] {
            for _ in 0..batches {
                for _ in 0..records {
                    let seq = ring.next_seq();
                    let h = RecordHeader {
                        seq,
                        gen: 1,
                        kind: 1,
                        flags: 0,
                        offset: 0,
                        len: 4096,
                    };
                    ring.append(&h, payload.clone()).expect("room");
                }
                let start = Instant::now();
                let w = ring.begin_write().expect("no batch in flight");
                let fd = ring.fd();
                bytes[mode].push(
                    w.writes
                        .iter()
                        .flat_map(|(_, segs)| segs.iter().map(|s| s.len as u64))
                        .sum(),
                );
                let ops = w
                    .writes
                    .into_iter()
                    .map(|(offset, segs)| BackendOp::WriteVecFd {
                        fd,
                        offset,
                        segs,
                        dsync,
                    })
                    .collect();
                run_all(&mut be, ops).expect("ring writes");
                if !dsync {
                    run_all(&mut be, vec![BackendOp::SyncFd { fd }]).expect("fdatasync");
                }
                lat[mode].push(start.elapsed().as_micros() as u64);
                ring.sync_completed(w.through);
                ring.trim_through(w.through);
            }
        }
    }
    for (mode, name) in [(0, "writes + fdatasync"), (1, "durable writes (RWF_DSYNC)")] {
        let v = &mut lat[mode];
        let b = &mut bytes[mode];
        let mean = b.iter().sum::<u64>() / b.len().max(1) as u64;
        println!(
            "{name:28} {records} x 4 KiB per batch, {} batches: p50 {} µs  p90 {} µs  p99 {} µs; \
             ring bytes per batch: mean {mean}, max {}",
            v.len(),
            pct(v, 0.5),
            pct(v, 0.9),
            pct(v, 0.99),
            pct(b, 1.0)
        );
    }
    drop(ring);
    drop(be);
    if !on_device {
        let _ = std::fs::remove_file(&ring_path);
    }
    let _ = std::fs::remove_file(&dev);
}
