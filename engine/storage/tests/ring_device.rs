//! The ring on a raw block device (a loop device over a file in a scratch
//! directory): the same behaviour as on a file (batches through io_uring,
//! wrap, reopen, torn tail), its size from the device, and the device held
//! exclusively. Needs root and the loop driver; skipped (testskip) only
//! where losetup or /dev/loop-control is missing.

mod common;

use common::{append, check, find, flip_byte, TempDir};
use storage::backend::{
    create_file_device, Backend, BackendCompletion, BackendOp, UringBackend, UringConfig,
};
use storage::blockdev::{self, Signature};
use storage::ring::{Ring, RingError, RING_HEADER_BYTES};
use testskip::LoopDevice;

/// A loop device of `bytes` over a file in `dir`, with logical blocks of
/// `sector` bytes; `None` when the test is skipped.
fn loop_device(dir: &TempDir, bytes: u64, sector: u32) -> Option<LoopDevice> {
    let backing = dir.join("backing");
    create_file_device(&backing, bytes).unwrap();
    LoopDevice::attach(&backing, sector)
}

/// The io_uring backend the batches go through, as in the node (over a
/// small file device: only its ring is used, for the ring's descriptor).
fn backend(dir: &TempDir) -> UringBackend {
    let dev = dir.join("volume");
    create_file_device(&dev, 1 << 20).unwrap();
    UringBackend::open(&dev, &UringConfig::default()).unwrap()
}

/// Begin a batch, run its durable writes on `be`'s io_uring and report it.
fn run_batch(ring: &mut Ring, be: &mut UringBackend) {
    assert_eq!(run_batches(ring, be, 1), 1);
}

/// Begin up to `n` batches (group commit: appends between them go into the
/// next; at most two in flight), run all their durable writes at once on
/// `be`'s io_uring, and report them in order. Returns the batches begun.
fn run_batches(ring: &mut Ring, be: &mut UringBackend, n: usize) -> usize {
    let mut throughs = Vec::new();
    let mut ops = 0;
    for b in 0..n {
        let Some(w) = ring.begin_write() else { break };
        let fd = ring.fd();
        for (offset, segs) in w.writes {
            let op = BackendOp::WriteVecFd {
                fd,
                offset,
                segs,
                dsync: true,
            };
            be.submit(ops, op).expect("room");
            ops += 1;
        }
        throughs.push(w.through);
        let s = ring.next_seq();
        if b + 1 < n && ring.fits(len_of(s)) {
            // The next batch carries what is appended meanwhile.
            append(ring, s, len_of(s));
        }
    }
    be.flush_submissions();
    let mut out: Vec<BackendCompletion> = Vec::new();
    while out.len() < ops as usize {
        if be.reap(&mut out) == 0 {
            be.wait(&[], 1000);
        }
    }
    for c in &out {
        c.result.expect("durable ring write");
    }
    for &t in &throughs {
        ring.sync_completed(t);
    }
    assert_eq!(ring.writes_in_flight(), 0);
    throughs.len()
}

/// The payload length of record `seq` in the wrap test: 0 to 8999 bytes.
fn len_of(seq: u64) -> usize {
    (seq as usize * 389) % 9000
}

/// Many laps of batches on a device larger than the ring, then a reopen
/// that finds every retained record; on 512- and 4096-byte logical blocks.
#[test]
fn batches_wrap_and_reopen_on_a_block_device() {
    for sector in [512u32, 4096] {
        let dir = TempDir::new("ringdev-wrap");
        let Some(dev) = loop_device(&dir, 4 << 20, sector) else {
            return;
        };
        let mut be = backend(&dir);
        let cap = 256 << 10;
        let mut ring = Ring::create(dev.path(), cap, 1).unwrap();
        let g = ring.device().expect("the ring knows it is on a device");
        assert_eq!((g.size_bytes, g.logical_block_bytes), (4 << 20, sector));
        assert!(ring.is_direct());
        assert_eq!(ring.capacity_bytes(), cap, "the ring, not the device");
        assert!(ring.describe().starts_with("block device of 4194304 bytes"));
        let len = len_of;
        let mut next = 1u64;
        let mut two_in_flight = 0;
        for lap in 0..30 {
            while ring.fits(len(next)) {
                append(&mut ring, next, len(next));
                next += 1;
                if next.is_multiple_of(7) {
                    // Two batches in flight, the second with one more record.
                    if run_batches(&mut ring, &mut be, 2) == 2 {
                        two_in_flight += 1;
                    }
                    next = ring.next_seq();
                }
            }
            run_batch(&mut ring, &mut be);
            let keep_from = ring.first_seq() + ring.len() / 2;
            ring.trim_through(keep_from - 1);
            // Batches until a header store frees the trimmed space (the
            // synchronous path every other lap).
            if lap % 2 == 0 {
                ring.sync().unwrap();
            } else {
                while ring.reclaim_pending() {
                    run_batch(&mut ring, &mut be);
                }
            }
            for s in ring.first_seq()..next {
                check(&ring, s, len(s));
            }
        }
        assert!(next > 200, "wrapped many times ({next} records)");
        assert!(
            two_in_flight > 20,
            "{two_in_flight} times two batches in flight"
        );
        let (first, n, durable) = (ring.first_seq(), ring.next_seq(), ring.durable_seq());
        assert_eq!(durable, n - 1);
        drop(ring);
        let (ring, rec) = Ring::open(dev.path()).unwrap();
        assert_eq!(
            (
                rec.first_seq,
                rec.next_seq,
                rec.records,
                rec.torn_tail_bytes
            ),
            (first, n, n - first, 0)
        );
        assert_eq!(ring.capacity_bytes(), cap);
        assert_eq!(ring.device().map(|g| g.logical_block_bytes), Some(sector));
        for s in first..n {
            check(&ring, s, len(s));
        }
        // The device holds our ring's signature.
        drop(ring);
        assert_eq!(
            blockdev::signature(dev.path()).unwrap(),
            Some(Signature::Ring)
        );
    }
}

/// A crash that tore a record after the last durable one: cut off as a torn
/// tail on the device as in a file, and the ring goes on from there.
#[test]
fn torn_tail_on_a_block_device_is_cut_off() {
    let dir = TempDir::new("ringdev-torn");
    let Some(dev) = loop_device(&dir, 2 << 20, 512) else {
        return;
    };
    let mut ring = Ring::create(dev.path(), 1 << 20, 1).unwrap();
    for s in 1..=5 {
        append(&mut ring, s, 300);
    }
    ring.sync().unwrap();
    for s in 6..=8 {
        append(&mut ring, s, 300);
    }
    // The header claims the head after 8, durable only through 5.
    assert_eq!(ring.prepare_sync(), 8);
    drop(ring);
    flip_byte(dev.path(), find(dev.path(), b"<seq 00000007>") + 40);
    let (mut ring, rec) = Ring::open(dev.path()).unwrap();
    assert_eq!((rec.first_seq, rec.next_seq, rec.records), (1, 7, 6));
    assert_eq!(rec.torn_tail_bytes, 2 * 4096, "seq 7 and 8 cut off");
    check(&ring, 6, 300);
    assert!(ring.get(7).is_none());
    append(&mut ring, 7, 300);
    ring.sync().unwrap();
    drop(ring);
    let (ring, rec) = Ring::open(dev.path()).unwrap();
    assert_eq!((rec.next_seq, rec.torn_tail_bytes), (8, 0));
    check(&ring, 7, 300);
    // Damage to a durable record is corruption, never cut away.
    drop(ring);
    flip_byte(dev.path(), find(dev.path(), b"<seq 00000003>") + 40);
    assert!(matches!(
        Ring::open(dev.path()),
        Err(RingError::Corrupt { .. })
    ));
}

#[test]
fn a_device_too_small_for_the_ring_is_refused_naming_the_size() {
    let dir = TempDir::new("ringdev-small");
    let Some(dev) = loop_device(&dir, 1 << 20, 512) else {
        return;
    };
    let err = Ring::create(dev.path(), 1 << 20, 1)
        .err()
        .expect("1 MiB of ring and its header slots do not fit in 1 MiB");
    let msg = err.to_string();
    let most = (1 << 20) - RING_HEADER_BYTES;
    for part in [
        "ring.size_bytes = 1048576".to_string(),
        dev.path().display().to_string(),
        "(1048576 bytes)".to_string(),
        format!("at most {most}"),
    ] {
        assert!(msg.contains(&part), "{part:?} missing in: {msg}");
    }
    // What the message offers fits.
    Ring::create(dev.path(), most, 1).unwrap();
}

/// O_EXCL: while one ring holds the device, a second open (another node
/// process given the same device) is refused, and so is a mounted device.
#[test]
fn a_device_in_use_is_refused() {
    let dir = TempDir::new("ringdev-excl");
    let Some(dev) = loop_device(&dir, 2 << 20, 512) else {
        return;
    };
    let mut ring = Ring::create(dev.path(), 1 << 20, 1).unwrap();
    append(&mut ring, 1, 100);
    ring.sync().unwrap();
    for err in [
        Ring::open(dev.path()).err().expect("held exclusively"),
        Ring::create(dev.path(), 1 << 20, 1)
            .err()
            .expect("held exclusively"),
    ] {
        let msg = err.to_string();
        assert!(
            msg.contains("is in use") && msg.contains(&dev.path().display().to_string()),
            "{msg}"
        );
    }
    assert!(blockdev::signature(dev.path()).is_err(), "held exclusively");
    drop(ring);
    let (ring, rec) = Ring::open(dev.path()).unwrap();
    assert_eq!(rec.next_seq, 2);
    check(&ring, 1, 100);
    drop(ring);

    if !testskip::on_path("mkfs.ext4") {
        testskip::skip("mkfs.ext4 is not installed (e2fsprogs)");
        return;
    }
    let ok = std::process::Command::new("mkfs.ext4")
        .arg("-q")
        .arg(dev.path())
        .status()
        .unwrap()
        .success();
    assert!(ok, "mkfs.ext4");
    let mnt = dir.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let ok = std::process::Command::new("mount")
        .arg(dev.path())
        .arg(&mnt)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mount {}", dev.path().display());
    let created = Ring::create(dev.path(), 1 << 20, 1);
    let _ = std::process::Command::new("umount").arg(&mnt).status();
    let msg = created.err().expect("a mounted device").to_string();
    assert!(msg.contains("is in use"), "{msg}");
    assert_eq!(
        blockdev::signature(dev.path()).unwrap(),
        Some(Signature::Ext)
    );
}
