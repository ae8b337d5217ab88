//! Persistent ring: API behaviour, recovery rules and a seeded model test.

mod common;

use common::{append, check, find, flip_byte, hdr, payload, Rng, TempDir};
use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::Path;
use storage::backend::{Backend, BackendCompletion, BackendOp, IoSeg, MemBackend};
use storage::ring::{
    Ring, RingError, RingFull, RingWrite, GROUP_HEADER_BYTES, GROUP_RECORDS, RECORD_HEADER_BYTES,
    RING_HEADER_BYTES,
};

/// File offset of record `seq`'s 64-byte header in the group block at file
/// offset `group`, whose first record is `first`.
fn member_hdr(group: u64, first: u64, seq: u64) -> u64 {
    group + GROUP_HEADER_BYTES + (seq - first) * RECORD_HEADER_BYTES
}

/// Run one durable write of a batch as the node's backend would.
fn run_write(fd: i32, offset: u64, segs: Vec<IoSeg>) -> Result<u32, i32> {
    let mut be = MemBackend::new(4096, 512, 4);
    be.submit(
        7,
        BackendOp::WriteVecFd {
            fd,
            offset,
            segs,
            dsync: true,
        },
    )
    .expect("room");
    let mut out: Vec<BackendCompletion> = Vec::new();
    assert_eq!(be.reap(&mut out), 1);
    out.pop().unwrap().result
}

/// Run a whole batch (every durable write) and report it.
fn run_batch(ring: &mut Ring) -> u64 {
    let RingWrite { through, writes } = ring.begin_write().expect("no batch in flight");
    for (off, segs) in writes {
        run_write(ring.fd(), off, segs).expect("ring write");
    }
    ring.sync_completed(through);
    through
}

#[test]
fn append_get_trim_truncate_reset() {
    let dir = TempDir::new("ring-basic");
    let path = dir.join("ring");
    let mut ring = Ring::create(&path, 1 << 20, 10).unwrap();
    assert!(ring.is_empty());
    assert_eq!((ring.first_seq(), ring.next_seq()), (10, 10));
    for s in 10..20 {
        append(&mut ring, s, 100 * s as usize);
    }
    assert_eq!(ring.len(), 10);
    assert_eq!(ring.payload_bytes(), (10..20).map(|s| 100 * s).sum::<u64>());
    for s in 10..20 {
        check(&ring, s, 100 * s as usize);
    }
    assert!(ring.get(9).is_none() && ring.get(20).is_none());

    ring.trim_through(12);
    assert_eq!((ring.first_seq(), ring.len()), (13, 7));
    assert!(ring.get(12).is_none());
    check(&ring, 13, 1300);
    ring.trim_through(5); // already gone: no-op
    assert_eq!(ring.first_seq(), 13);

    ring.truncate_after(16);
    assert_eq!((ring.first_seq(), ring.next_seq(), ring.len()), (13, 17, 4));
    assert!(ring.get(17).is_none());
    append(&mut ring, 17, 7);
    check(&ring, 17, 7);
    check(&ring, 16, 1600);
    ring.truncate_after(17); // nothing after 17: no-op
    assert_eq!(ring.next_seq(), 18);

    ring.reset(100);
    assert!(ring.is_empty());
    assert_eq!(
        (ring.first_seq(), ring.next_seq(), ring.payload_bytes()),
        (100, 100, 0)
    );
    append(&mut ring, 100, 1);
    check(&ring, 100, 1);

    // truncate_after below first_seq - 1 drops everything (like reset).
    ring.truncate_after(50);
    assert!(ring.is_empty());
    assert_eq!(ring.next_seq(), 51);

    // trim beyond next_seq drops every record, next_seq stays.
    append(&mut ring, 51, 10);
    ring.trim_through(1000);
    assert!(ring.is_empty());
    assert_eq!((ring.first_seq(), ring.next_seq()), (52, 52));
}

#[test]
#[should_panic(expected = "gap-free")]
fn append_out_of_order_panics() {
    let dir = TempDir::new("ring-order");
    let mut ring = Ring::create(&dir.join("ring"), 1 << 16, 1).unwrap();
    append(&mut ring, 2, 10);
}

#[test]
fn full_ring_and_space_reuse_after_a_durable_trim() {
    let dir = TempDir::new("ring-full");
    let path = dir.join("ring");
    let mut ring = Ring::create(&path, 32768, 1).unwrap();
    // Each record: a header block + one payload block = 8192 bytes; 4 fit.
    for s in 1..=4 {
        assert!(ring.fits(960));
        append(&mut ring, s, 960);
    }
    assert_eq!(ring.used_bytes(), 32768);
    assert!(!ring.fits(0));
    assert_eq!(ring.append(&hdr(5), payload(5, 960).into()), Err(RingFull));
    assert_eq!(ring.next_seq(), 5, "a refused append changes nothing");
    assert!(!ring.fits(32768), "larger than the ring: never fits");

    // Trimmed space is not reused before a header holding the new tail is durable.
    ring.trim_through(2);
    assert!(!ring.fits(960));
    let s = ring.prepare_sync();
    assert_eq!(s, 4);
    assert!(!ring.fits(960), "fdatasync not confirmed yet");
    ring.sync_completed(s);
    assert!(ring.fits(960));
    for s in 5..=6 {
        append(&mut ring, s, 960);
    }
    assert_eq!(ring.append(&hdr(7), payload(7, 960).into()), Err(RingFull));
    for s in 3..=6 {
        check(&ring, s, 960);
    }
    // The records of the new lap are in the file after a flush.
    ring.sync().unwrap();
    drop(ring);
    let (ring, rec) = Ring::open(&path).unwrap();
    assert_eq!((rec.first_seq, rec.next_seq), (3, 7));
    for s in 3..=6 {
        check(&ring, s, 960);
    }
}

#[test]
fn wrap_around_and_reopen() {
    let dir = TempDir::new("ring-wrap");
    let path = dir.join("ring");
    let mut ring = Ring::create(&path, 65536, 1).unwrap();
    let len = |s: u64| (s as usize * 389) % 9000;
    let mut next = 1u64;
    // Many laps: append until full, trim half, sync, repeat.
    for _ in 0..40 {
        while ring.fits(len(next)) {
            append(&mut ring, next, len(next));
            next += 1;
        }
        let keep_from = ring.first_seq() + ring.len() / 2;
        ring.trim_through(keep_from - 1);
        ring.sync().unwrap();
        for s in ring.first_seq()..next {
            check(&ring, s, len(s));
        }
    }
    assert!(next > 100, "wrapped several times ({next} records)");
    let (first, n) = (ring.first_seq(), ring.next_seq());
    drop(ring);
    let (ring, rec) = Ring::open(&path).unwrap();
    assert_eq!(
        (
            rec.first_seq,
            rec.next_seq,
            rec.records,
            rec.torn_tail_bytes
        ),
        (first, n, n - first, 0)
    );
    for s in first..n {
        check(&ring, s, len(s));
    }
}

#[test]
fn reopen_keeps_unsynced_appends_present_in_the_file() {
    // A clean close writes what is staged: reopening finds those records
    // past the header's head, since they are valid and in sequence.
    let dir = TempDir::new("ring-reopen");
    let path = dir.join("ring");
    let mut ring = Ring::create(&path, 1 << 16, 1).unwrap();
    for s in 1..=5 {
        append(&mut ring, s, 50);
    }
    ring.sync().unwrap();
    append(&mut ring, 6, 50);
    drop(ring);
    let (mut ring, rec) = Ring::open(&path).unwrap();
    assert_eq!(
        (rec.first_seq, rec.next_seq, rec.torn_tail_bytes),
        (1, 7, 0)
    );
    check(&ring, 6, 50);
    // A killed process never wrote what it appended after its last flush
    // (no close: the ring is leaked, as kill -9 would leave it).
    append(&mut ring, 7, 50);
    ring.prepare_sync();
    append(&mut ring, 8, 50);
    std::mem::forget(ring);
    let (ring, rec) = Ring::open(&path).unwrap();
    assert_eq!((rec.first_seq, rec.next_seq), (1, 8));
    check(&ring, 7, 50);
}

#[test]
fn torn_tail_is_cut_off() {
    let dir = TempDir::new("ring-torn");
    let path = dir.join("ring");
    let mut ring = Ring::create(&path, 1 << 16, 1).unwrap();
    for s in 1..=5 {
        append(&mut ring, s, 300);
    }
    ring.sync().unwrap();
    for s in 6..=8 {
        append(&mut ring, s, 300);
    }
    let s = ring.prepare_sync(); // header claims head after 8, synced only through 5
    assert_eq!(s, 8);
    drop(ring);
    // Damage seq 7's payload, as if the crash hit while it was written.
    flip_byte(&path, find(&path, b"<seq 00000007>") + 40);
    let (mut ring, rec) = Ring::open(&path).unwrap();
    assert_eq!((rec.first_seq, rec.next_seq, rec.records), (1, 7, 6));
    assert_eq!(
        rec.torn_tail_bytes,
        2 * 8192,
        "seq 7 and 8 (8192 bytes each) cut off"
    );
    check(&ring, 6, 300);
    assert!(ring.get(7).is_none());
    // The ring continues at seq 7 and the old seq 8 never comes back, even
    // though the new seq 7 has the same length and sits where the old one was.
    append(&mut ring, 7, 300);
    drop(ring);
    let (ring, rec) = Ring::open(&path).unwrap();
    assert_eq!(rec.next_seq, 8);
    check(&ring, 7, 300);
}

#[test]
fn mid_ring_corruption_is_reported() {
    let dir = TempDir::new("ring-corrupt");
    let path = dir.join("ring");
    let mut ring = Ring::create(&path, 1 << 20, 1).unwrap();
    for s in 1..=8 {
        append(&mut ring, s, 300);
    }
    ring.sync().unwrap();
    drop(ring);
    // One group: its block, then the 8 payloads.
    let group = find(&path, b"<seq 00000001>") - 4096;
    assert_eq!(group, RING_HEADER_BYTES);
    let at = find(&path, b"<seq 00000004>");
    assert_eq!(at, group + 4 * 4096);
    flip_byte(&path, at + 100);
    match Ring::open(&path) {
        Err(RingError::Corrupt {
            offset,
            seq_expected,
            detail,
        }) => {
            assert_eq!(seq_expected, 4);
            assert_eq!(
                offset,
                member_hdr(group, 1, 4),
                "offset of seq 4's record header in the group block"
            );
            assert!(detail.contains("checksum"), "{detail}");
        }
        other => panic!("expected Corrupt, got {:?}", other.map(|(_, r)| r)),
    }
    let msg = Ring::open(&path).err().unwrap().to_string();
    assert!(
        msg.contains("resynchronise this node from its peer"),
        "{msg}"
    );
    // The file was not modified: the damage is still there to diagnose.
    assert!(matches!(Ring::open(&path), Err(RingError::Corrupt { .. })));
}

/// Batches store the header only now and then, so the header's
/// `synced_seq` may be old; each record says what was durable when it was
/// appended. Damage to a record that a later whole record vouches for is
/// corruption, not a torn tail; damage to the last batch's records (nothing
/// later vouches for them) is a torn tail.
#[test]
fn damage_a_later_record_vouches_for_is_corruption() {
    let dir = TempDir::new("ring-vouch");
    let path = dir.join("ring");
    let mut ring = Ring::create(&path, 1 << 18, 1).unwrap();
    for s in 1..=3 {
        append(&mut ring, s, 300);
    }
    let w = ring.begin_write().unwrap();
    assert_eq!(w.writes.len(), 1, "no trimmed space: no header store");
    for (off, segs) in w.writes {
        run_write(ring.fd(), off, segs).unwrap();
    }
    ring.sync_completed(w.through);
    for s in 4..=6 {
        append(&mut ring, s, 300);
    }
    run_batch(&mut ring);
    std::mem::forget(ring); // a crash: the header on disk says nothing is durable
    let pristine = std::fs::read(&path).unwrap();
    let (img, rec) = Ring::open(&path).unwrap();
    assert_eq!(
        (rec.first_seq, rec.next_seq, rec.torn_tail_bytes),
        (1, 7, 0)
    );
    drop(img);
    // Seq 2: seqs 4..6 were appended once 1..3 were durable and say so.
    // (Each batch is one group: its block, then its payloads.)
    std::fs::write(&path, &pristine).unwrap();
    let group = find(&path, b"<seq 00000001>") - 4096;
    let at = find(&path, b"<seq 00000002>");
    flip_byte(&path, at + 10);
    match Ring::open(&path) {
        Err(RingError::Corrupt {
            offset,
            seq_expected,
            detail,
        }) => {
            assert_eq!((offset, seq_expected), (member_hdr(group, 1, 2), 2));
            assert!(detail.contains("record seq 4"), "{detail}");
            assert!(detail.contains("up to seq 3 was durable"), "{detail}");
        }
        other => panic!("expected Corrupt, got {:?}", other.map(|(_, r)| r)),
    }
    // Seq 2's record header damaged (its gen field): its length still
    // says where seq 3 starts, and seq 4 vouches for it.
    std::fs::write(&path, &pristine).unwrap();
    flip_byte(&path, member_hdr(group, 1, 2) + 20);
    assert!(matches!(
        Ring::open(&path),
        Err(RingError::Corrupt {
            seq_expected: 2,
            ..
        })
    ));
    // Seq 5: nothing appended later vouches for it: a torn tail.
    std::fs::write(&path, &pristine).unwrap();
    flip_byte(&path, find(&path, b"<seq 00000005>") + 10);
    let (img, rec) = Ring::open(&path).unwrap();
    assert_eq!((rec.first_seq, rec.next_seq), (1, 5));
    assert!(rec.torn_tail_bytes > 0);
    for s in 1..=4 {
        check(&img, s, 300);
    }
}

/// Trims make a batch carry a header store once an eighth of the ring
/// waits for it; until then batches are one write (the records), and the
/// trimmed space is not reused.
#[test]
fn header_store_rides_along_when_trimmed_space_waits() {
    let dir = TempDir::new("ring-store-due");
    let path = dir.join("ring");
    let cap = 1u64 << 18;
    let mut ring = Ring::create(&path, cap, 1).unwrap();
    // Two batches, so two groups: 1 (8 KiB), 2..8 (32 KiB).
    append(&mut ring, 1, 4096);
    run_batch(&mut ring);
    for s in 2..=8 {
        append(&mut ring, s, 4096);
    }
    run_batch(&mut ring);
    ring.trim_through(1); // 8 KiB trimmed: under an eighth (32 KiB)
    append(&mut ring, 9, 4096);
    let w = ring.begin_write().unwrap();
    assert_eq!(w.writes.len(), 1, "records only");
    for (off, segs) in w.writes {
        run_write(ring.fd(), off, segs).unwrap();
    }
    ring.sync_completed(w.through);
    assert!(ring.reclaim_pending(), "the trim is not durable yet");
    ring.trim_through(8); // 40 KiB trimmed: due
    append(&mut ring, 10, 4096);
    let w = ring.begin_write().unwrap();
    assert_eq!(w.writes.len(), 2, "records and the header slot");
    assert!(
        w.writes[1].0 < RING_HEADER_BYTES,
        "the second is a header slot"
    );
    for (off, segs) in w.writes {
        run_write(ring.fd(), off, segs).unwrap();
    }
    ring.sync_completed(w.through);
    assert!(!ring.reclaim_pending(), "the new tail is durable");
    std::mem::forget(ring);
    let (ring, rec) = Ring::open(&path).unwrap();
    assert_eq!((rec.first_seq, rec.next_seq), (9, 11));
    check(&ring, 9, 4096);
    check(&ring, 10, 4096);
}

#[test]
fn header_damage_and_foreign_files_are_errors() {
    let dir = TempDir::new("ring-header");
    let path = dir.join("ring");
    Ring::create(&path, 1 << 16, 1).unwrap();
    flip_byte(&path, 20);
    assert!(matches!(
        Ring::open(&path),
        Err(RingError::Corrupt { offset: 0, .. })
    ));
    std::fs::write(&path, vec![7u8; 8192]).unwrap();
    assert!(matches!(Ring::open(&path), Err(RingError::BadMagic { .. })));
    assert!(matches!(
        Ring::open(&dir.join("missing")),
        Err(RingError::Io(_))
    ));
    assert!(Ring::create(&dir.join("odd"), 1000, 1).is_err());
}

#[test]
fn truncation_is_durable_and_dropped_records_stay_dropped() {
    let dir = TempDir::new("ring-trunc");
    let path = dir.join("ring");
    let mut ring = Ring::create(&path, 1 << 18, 1).unwrap();
    for s in 1..=20 {
        append(&mut ring, s, 200);
    }
    ring.sync().unwrap();
    ring.truncate_after(15);
    // A same-sized new 16 overwrites the old 16; the old 17.. follow it in
    // the file and must not be taken for the continuation.
    append(&mut ring, 16, 200);
    drop(ring); // "crash" without a sync
    let (ring, rec) = Ring::open(&path).unwrap();
    assert_eq!(rec.next_seq, 17);
    check(&ring, 16, 200);
    assert!(ring.get(17).is_none());
    drop(ring);
    let (mut ring, _) = Ring::open(&path).unwrap();
    ring.reset(500);
    drop(ring);
    let (ring, rec) = Ring::open(&path).unwrap();
    assert_eq!((rec.first_seq, rec.next_seq, rec.records), (500, 500, 0));
    assert!(ring.is_empty());
}

#[test]
fn delayed_and_out_of_order_sync_completions() {
    let dir = TempDir::new("ring-pending");
    let path = dir.join("ring");
    let mut ring = Ring::create(&path, 40960, 1).unwrap();
    for s in 1..=4 {
        append(&mut ring, s, 960);
    }
    ring.trim_through(2);
    let a = ring.prepare_sync();
    append(&mut ring, 5, 960);
    ring.trim_through(4);
    let b = ring.prepare_sync();
    // The later sync completes first: it covers the earlier one.
    ring.sync_completed(b);
    assert_eq!(ring.durable_seq(), 5);
    assert_eq!(ring.used_bytes(), 8192, "only seq 5 is left");
    ring.sync_completed(a); // stale: no effect
    assert_eq!(ring.durable_seq(), 5);
    assert_eq!(ring.used_bytes(), 8192);
}

/// Seeded model test: random operations against a simple model, with random
/// reopens. Reproduce a failure with the seed printed by the assertion.
#[test]
fn randomized_model() {
    for seed in 1..=12u64 {
        model_run(seed, 1500);
    }
}

fn model_run(seed: u64, steps: usize) {
    let dir = TempDir::new("ring-model");
    let path = dir.join("ring");
    let mut rng = Rng::new(seed);
    // Small rings wrap often; in the larger ones (a group spans up to an
    // eighth of the ring) small records share groups.
    let capacity = [16384u64, 32768, 131072, 1 << 20][rng.below(4) as usize];
    let mut ring = Ring::create(&path, capacity, 1).unwrap();
    // Every record of the current chain by seq (trimmed ones stay, since an
    // unsynced trim may come back after a reopen).
    let mut chain: BTreeMap<u64, usize> = BTreeMap::new();
    let mut first = 1u64;
    let mut next = 1u64;
    let mut prepared: Vec<u64> = Vec::new();
    for step in 0..steps {
        let ctx = format!("seed {seed} step {step}");
        match rng.below(100) {
            0..=49 => {
                let len = match rng.below(5) {
                    0 => 0,
                    1 => rng.below(64) as usize,
                    2 => rng.below(8192) as usize,
                    _ => rng.below(capacity / 3) as usize,
                };
                let fits = ring.fits(len);
                let r = ring.append(&hdr(next), payload(next, len).into());
                assert_eq!(r.is_ok(), fits, "{ctx}: fits() agrees with append");
                if r.is_ok() {
                    chain.insert(next, len);
                    next += 1;
                }
            }
            50..=64 => {
                let s = first.saturating_sub(2) + rng.below(next - first + 3);
                ring.trim_through(s);
                if s >= first {
                    first = (s + 1).min(next);
                }
            }
            65..=69 => {
                let s = first.saturating_sub(3) + rng.below(next + 3 - first);
                let s = s.min(next - 1);
                ring.truncate_after(s);
                chain.retain(|&k, _| k <= s);
                next = s + 1;
                first = first.min(next);
            }
            70..=71 => {
                let n = 1 + rng.below(next + 10);
                ring.reset(n);
                chain.clear();
                first = n;
                next = n;
            }
            72..=81 => prepared.push(ring.prepare_sync()),
            82..=89 if !prepared.is_empty() => {
                let i = rng.below(prepared.len() as u64) as usize;
                ring.sync_completed(prepared.remove(i));
            }
            90..=93 => {
                ring.sync().unwrap();
                prepared.clear();
            }
            94..=96 => {
                drop(ring);
                let (r, rec) = Ring::open(&path).unwrap_or_else(|e| panic!("{ctx}: {e}"));
                ring = r;
                prepared.clear();
                assert_eq!(rec.torn_tail_bytes, 0, "{ctx}: no crash, nothing torn");
                assert_eq!(rec.next_seq, next, "{ctx}: appends survive a reopen");
                assert!(rec.first_seq <= first, "{ctx}: trims only roll back");
                first = rec.first_seq;
            }
            _ => {}
        }
        assert_eq!((ring.first_seq(), ring.next_seq()), (first, next), "{ctx}");
        assert_eq!(ring.len(), next - first, "{ctx}");
        let expect_payload: u64 = (first..next).map(|s| chain[&s] as u64).sum();
        assert_eq!(ring.payload_bytes(), expect_payload, "{ctx}");
        assert!(ring.used_bytes() <= ring.capacity_bytes(), "{ctx}");
        if next > first {
            let s = first + rng.below(next - first);
            check(&ring, s, chain[&s]);
        }
        assert!(ring.get(next).is_none() && (first == 1 || ring.get(first - 1).is_none()));
        // The ring must never wedge: with everything trimmed and synced,
        // a record of half the ring (header block included) fits.
        if rng.below(50) == 0 {
            ring.trim_through(next);
            first = next;
            ring.sync().unwrap();
            prepared.clear();
            assert!(
                ring.fits((capacity / 2 - 4096) as usize),
                "{ctx}: empty ring accepts records"
            );
        }
    }
}

/// Power-loss simulation. After every operation the ring file is
/// snapshotted; a crash image takes each 4 KiB page (or 512-byte sector, for
/// torn block writes) from a random snapshot
/// between the last one a completed fdatasync covered and now (dirty pages
/// reach the disk in any order, each at any of its versions). Every image
/// must open without a corruption error, keep every record confirmed durable,
/// and hold only records the model appended.
#[test]
fn crash_images_keep_every_durable_record() {
    for seed in 100..=111u64 {
        crash_run(seed, 500, 4096);
    }
    // Torn O_DIRECT writes: each 512-byte sector at its own version.
    for seed in 112..=117u64 {
        crash_run(seed, 500, 512);
    }
}

/// A power loss in the middle of one flush's block writes: every sector
/// the write covered is old or new at random. The block that holds the
/// last durable record is rewritten with the same bytes before the new
/// ones, so no tear can damage what was durable; new records survive whole
/// or are cut off as a torn tail.
#[test]
fn torn_block_write_keeps_every_durable_record() {
    let dir = TempDir::new("ring-torn-block");
    let path = dir.join("ring");
    let image_path = dir.join("image");
    let mut rng = Rng::new(7);
    let len = |s: u64| 100 + (s as usize * 977) % 2500;
    let mut ring = Ring::create(&path, 1 << 18, 1).unwrap();
    // Durable records that end in the middle of a block.
    for s in 1..=5 {
        append(&mut ring, s, len(s));
    }
    ring.sync().unwrap();
    let before = std::fs::read(&path).unwrap();
    // One flush: records that start in that block and run over several.
    for s in 6..=12 {
        append(&mut ring, s, len(s));
    }
    ring.prepare_sync();
    let after = std::fs::read(&path).unwrap();
    drop(ring);
    let changed: Vec<usize> = (0..before.len() / 512)
        .filter(|&i| before[i * 512..(i + 1) * 512] != after[i * 512..(i + 1) * 512])
        .collect();
    assert!(changed.len() > 8, "the flush wrote several blocks");
    let mut cut_somewhere = false;
    for round in 0..64 {
        let mut image = before.clone();
        for &i in &changed {
            if round == 63 || rng.below(2) == 0 {
                image[i * 512..(i + 1) * 512].copy_from_slice(&after[i * 512..(i + 1) * 512]);
            }
        }
        std::fs::write(&image_path, &image).unwrap();
        let (img, rec) = Ring::open(&image_path)
            .unwrap_or_else(|e| panic!("round {round}: a torn write is not corruption: {e}"));
        assert_eq!(rec.first_seq, 1, "round {round}");
        assert!(
            rec.next_seq > 5,
            "round {round}: durable records lost ({rec:?})"
        );
        for s in 1..rec.next_seq {
            check(&img, s, len(s));
        }
        cut_somewhere |= rec.next_seq < 13;
        if round == 63 {
            assert_eq!(rec.next_seq, 13, "every sector written: every record back");
        }
    }
    assert!(cut_somewhere, "some tear cut records off");
}

/// A batch's writes not landed yet: (file offset, pieces).
type Writes = Vec<(u64, Vec<IoSeg>)>;

fn crash_run(seed: u64, steps: usize, unit: usize) {
    let dir = TempDir::new("ring-crash");
    let path = dir.join("ring");
    let image_path = dir.join("image");
    let mut rng = Rng::new(seed);
    // Small rings wrap often; in the larger ones (a group spans up to an
    // eighth of the ring) small records share groups.
    let capacity = [16384u64, 65536, 262144, 1 << 20][rng.below(4) as usize];
    let mut ring = Ring::create(&path, capacity, 1).unwrap();
    let mut chain: BTreeMap<u64, usize> = BTreeMap::new();
    let (mut first, mut next) = (1u64, 1u64);
    // Snapshots since the durable floor: snaps[0] is the floor.
    let mut snaps: Vec<Vec<u8>> = vec![std::fs::read(&path).unwrap()];
    let mut base = 0usize; // snapshot number of snaps[0]
    let mut prepared: Vec<(u64, usize)> = Vec::new(); // (seq, snapshot number)
    let mut durable = 0u64;
    // Asynchronous batches (as the node runs them): writes not landed yet,
    // and whether a synchronous operation made the batch moot for the model.
    let mut batches: Vec<(u64, Writes, bool)> = Vec::new();
    for step in 0..steps {
        let ctx = format!("seed {seed} step {step}");
        let mut floor = None; // new durable floor, as a snapshot number
        let now = base + snaps.len(); // number of the snapshot taken after this op
        match rng.below(115) {
            0..=54 => {
                let len = match rng.below(3) {
                    0 => rng.below(100),
                    1 => rng.below(8192),
                    _ => rng.below(capacity / 4),
                } as usize;
                if ring.append(&hdr(next), payload(next, len).into()).is_ok() {
                    chain.insert(next, len);
                    next += 1;
                }
            }
            55..=69 => {
                let s = first + rng.below(next - first + 1);
                ring.trim_through(s);
                if s >= first {
                    first = (s + 1).min(next);
                }
            }
            // (The node uses either protocol, not both at once: a prepared
            // sync's completion would be taken for a batch's.)
            100..=104 if prepared.is_empty() => {
                if let Some(w) = ring.begin_write() {
                    batches.push((w.through, w.writes, false));
                }
            }
            105..=114 if batches.iter().any(|b| !b.1.is_empty()) => {
                // One durable write lands (any batch, any order); a batch
                // whose writes and all earlier batches' writes landed is
                // reported (the model takes the floor only then, although
                // each write was durable on its own: images may hold more
                // old pages than a real crash could).
                let open: Vec<usize> = (0..batches.len())
                    .filter(|&i| !batches[i].1.is_empty())
                    .collect();
                let b = open[rng.below(open.len() as u64) as usize];
                let k = rng.below(batches[b].1.len() as u64) as usize;
                let (off, segs) = batches[b].1.remove(k);
                run_write(ring.fd(), off, segs).unwrap();
                while batches.first().is_some_and(|b| b.1.is_empty()) {
                    let (through, _, moot) = batches.remove(0);
                    ring.sync_completed(through);
                    if !moot {
                        durable = durable.max(through);
                        floor = Some(now);
                    }
                }
            }
            70..=72 => {
                for b in batches.iter_mut() {
                    b.2 = true;
                }
                let s = first.saturating_sub(1) + rng.below(next - first + 1);
                ring.truncate_after(s);
                chain.retain(|&k, _| k <= s);
                next = s + 1;
                first = first.min(next);
                floor = Some(now);
                prepared.clear();
                durable = ring.durable_seq();
            }
            73 => {
                for b in batches.iter_mut() {
                    b.2 = true;
                }
                let n = next + rng.below(5);
                ring.reset(n);
                chain.clear();
                (first, next) = (n, n);
                floor = Some(now);
                prepared.clear();
                durable = ring.durable_seq();
            }
            74..=83 if batches.is_empty() => prepared.push((ring.prepare_sync(), now)),
            84..=95 if !prepared.is_empty() => {
                let (s, snap) = prepared.remove(rng.below(prepared.len() as u64) as usize);
                // The fdatasync issued after that prepare completed: every
                // page is at least at that version.
                ring.sync_completed(s);
                durable = durable.max(s);
                floor = Some(snap);
            }
            _ => {
                for b in batches.iter_mut() {
                    b.2 = true;
                }
                ring.sync().unwrap();
                floor = Some(now);
                prepared.clear();
                durable = ring.durable_seq();
            }
        }
        snaps.push(std::fs::read(&path).unwrap());
        if snaps.len() > 48 {
            for b in batches.iter_mut() {
                b.2 = true;
            }
            ring.sync().unwrap();
            prepared.clear();
            durable = ring.durable_seq();
            floor = Some(base + snaps.len() - 1);
            *snaps.last_mut().unwrap() = std::fs::read(&path).unwrap();
        }
        if let Some(f) = floor {
            if f > base {
                snaps.drain(..f - base);
                base = f;
            }
        }
        if step % 5 != 4 {
            continue;
        }
        // Build and recover a crash image.
        let mut image = snaps[0].clone();
        for u in 0..image.len() / unit {
            let v = &snaps[rng.below(snaps.len() as u64) as usize];
            image[u * unit..(u + 1) * unit].copy_from_slice(&v[u * unit..(u + 1) * unit]);
        }
        std::fs::write(&image_path, &image).unwrap();
        let (img, rec) = Ring::open(&image_path).unwrap_or_else(|e| panic!("{ctx}: {e}"));
        assert!(
            rec.next_seq > durable,
            "{ctx}: durable seq {durable} lost ({rec:?})"
        );
        assert!(
            rec.first_seq <= first,
            "{ctx}: recovered first seq beyond the model's"
        );
        for s in rec.first_seq..rec.next_seq {
            let len = *chain
                .get(&s)
                .unwrap_or_else(|| panic!("{ctx}: seq {s} never appended"));
            check(&img, s, len);
        }
    }
}

/// A batch written asynchronously (as the node does, through the backend)
/// that wraps around the end of the data area: two writes, records back
/// after a reopen.
#[test]
fn async_batch_that_wraps() {
    let dir = TempDir::new("ring-async-wrap");
    let path = dir.join("ring");
    let mut ring = Ring::create(&path, 65536, 1).unwrap();
    // 3 records of 12 KiB (16 KiB each with the header block), trim them,
    // so the head sits at 48 KiB with 16 KiB to the end.
    for s in 1..=3 {
        append(&mut ring, s, 12288);
    }
    run_batch(&mut ring);
    ring.trim_through(3);
    run_batch(&mut ring);
    // 4: fits before the end; 5: needs a wrap marker and goes to offset 0.
    append(&mut ring, 4, 8192);
    append(&mut ring, 5, 8192);
    append(&mut ring, 6, 512);
    let w = ring.begin_write().expect("no batch in flight");
    assert_eq!(w.through, 6);
    let offsets: Vec<u64> = w.writes.iter().map(|(o, _)| *o).collect();
    let h = RING_HEADER_BYTES;
    assert_eq!(
        offsets,
        vec![h + 49152, h],
        "records 4 and the wrap marker, then 5 and 6 at the start; no header store \
         (no trimmed space waits for one)"
    );
    let w2 = ring.begin_write().expect("a second batch may be in flight");
    assert_eq!(
        (w2.through, w2.writes.len()),
        (6, 1),
        "nothing new to write: only a header store"
    );
    assert_eq!(
        w2.writes[0].0, 8192,
        "header slot 2: the slot after the last store's (slot 1, the trim's)"
    );
    assert!(
        ring.begin_write().is_none(),
        "at most two batches in flight"
    );
    for (off, segs) in w.writes.into_iter().chain(w2.writes) {
        run_write(ring.fd(), off, segs).unwrap();
    }
    ring.sync_completed(w.through);
    assert_eq!(ring.writes_in_flight(), 1);
    ring.sync_completed(w2.through);
    assert_eq!(ring.writes_in_flight(), 0);
    assert_eq!(ring.durable_seq(), 6);
    drop(ring);
    let (ring, rec) = Ring::open(&path).unwrap();
    assert_eq!(
        (rec.first_seq, rec.next_seq, rec.torn_tail_bytes),
        (4, 7, 0)
    );
    check(&ring, 4, 8192);
    check(&ring, 5, 8192);
    check(&ring, 6, 512);
}

/// 512-byte payloads (a volume of 512-byte blocks): the last partial block
/// is written zero padded, the record header holds the real length.
#[test]
fn payloads_not_a_multiple_of_the_block() {
    let dir = TempDir::new("ring-512");
    let path = dir.join("ring");
    let mut ring = Ring::create(&path, 1 << 18, 1).unwrap();
    for (s, len) in [
        (1u64, 512usize),
        (2, 4096 + 512),
        (3, 1),
        (4, 0),
        (5, 12288),
    ] {
        append(&mut ring, s, len);
    }
    run_batch(&mut ring);
    let file = std::fs::read(&path).unwrap();
    let h = RING_HEADER_BYTES as usize;
    // One group: its block at h, record 1's payload at h + 4096, zeroes
    // after 512 bytes.
    assert_eq!(&file[h + 4096..h + 4096 + 512], &payload(1, 512)[..]);
    assert!(file[h + 4096 + 512..h + 8192].iter().all(|&b| b == 0));
    // Record 2's payload at h + 8192 runs 4608 bytes.
    assert_eq!(&file[h + 8192..h + 8192 + 4608], &payload(2, 4608)[..]);
    assert!(file[h + 8192 + 4608..h + 16384].iter().all(|&b| b == 0));
    // Record 3 (1 byte) at h + 16384. Record 4 has no payload: it opens a
    // group of its own (block at h + 20480), which record 5 joins.
    assert_eq!(&file[h + 24576..h + 24576 + 12288], &payload(5, 12288)[..]);
    drop(ring);
    let (ring, rec) = Ring::open(&path).unwrap();
    assert_eq!(rec.next_seq, 6);
    for (s, len) in [
        (1u64, 512usize),
        (2, 4096 + 512),
        (3, 1),
        (4, 0),
        (5, 12288),
    ] {
        check(&ring, s, len);
    }
}

/// A failed batch write fails the flush: nothing becomes durable by it, nor
/// by any later sync, and the ring says why.
#[test]
fn failed_vectored_write() {
    use storage::backend::{FaultBackend, FaultControl};
    let dir = TempDir::new("ring-write-fail");
    let path = dir.join("ring");
    let mut ring = Ring::create(&path, 1 << 16, 1).unwrap();
    append(&mut ring, 1, 100);
    run_batch(&mut ring);
    append(&mut ring, 2, 100);
    let ctl = FaultControl::new();
    ctl.fail_fd_writes(true);
    let mut be = FaultBackend::new(MemBackend::new(4096, 512, 8), ctl.clone());
    let w = ring.begin_write().unwrap();
    let n = w.writes.len();
    for (i, (offset, segs)) in w.writes.into_iter().enumerate() {
        be.submit(
            i as u64,
            BackendOp::WriteVecFd {
                fd: ring.fd(),
                offset,
                segs,
                dsync: true,
            },
        )
        .unwrap();
    }
    let mut out = Vec::new();
    assert_eq!(be.reap(&mut out), n);
    assert!(out.iter().all(|c| c.result == Err(libc::EIO)));
    assert_eq!(ctl.injected(), n as u64);
    ring.sync_failed(w.through, "write failed (errno 5)".into());
    assert!(ring.write_error().unwrap().contains("seq 2"));
    assert_eq!(ring.writes_in_flight(), 0);
    ring.sync_completed(w.through);
    assert_eq!(
        ring.durable_seq(),
        1,
        "a failed write makes nothing durable"
    );
    assert!(ring.sync().is_err(), "the ring's state is unknown: no sync");
}

/// Buffers are kept only while needed: every record not yet durable, and
/// durable ones until released or beyond the keep limit; then reads go
/// through the mapping. A backup that never trims (its peer's ACK3s are
/// behind the REQs it cannot receive without a buffer) still gets pool
/// buffers, since the ring gives them back once they are durable.
#[test]
fn kept_buffers_are_bounded_and_a_full_pool_cannot_wedge() {
    use volume::IoBufPool;
    let dir = TempDir::new("ring-keep");
    let path = dir.join("ring");
    let mut ring = Ring::create(&path, 16 << 20, 1).unwrap();
    ring.set_keep_bytes(64 << 10);
    // Room for the keep limit and two batches of 16 writes of 4 KiB.
    let pool = IoBufPool::new((64 << 10) + 2 * 16 * 4096, 4096);
    let mut next = 1u64;
    for round in 0..200 {
        for _ in 0..16 {
            let mut b = pool
                .get(4096)
                .unwrap_or_else(|| panic!("round {round}: pool empty, the pipeline would wedge"));
            b.copy_from_slice(&payload(next, 4096));
            ring.append(&hdr(next), b.share()).expect("fits");
            next += 1;
        }
        assert!(ring.kept_bytes() <= (64 << 10) + 16 * 4096);
        run_batch(&mut ring);
        assert!(
            ring.kept_bytes() <= 64 << 10,
            "durable buffers beyond the limit dropped"
        );
        if next > 1000 {
            ring.trim_through(next - 1000);
        }
    }
    // Old records read through the mapping, recent ones from their buffer.
    let first = ring.first_seq();
    check(&ring, first, 4096);
    assert!(ring.payload_buf(first).is_none());
    assert!(ring.payload_buf(next - 1).is_some());
    check(&ring, next - 1, 4096);
    // Released buffers go as soon as they are durable.
    append(&mut ring, next, 4096);
    ring.release_through(next);
    assert!(ring.payload_buf(next).is_some(), "not durable yet: kept");
    run_batch(&mut ring);
    assert_eq!(ring.kept_bytes(), 0);
    assert!(ring.payload_buf(next).is_none());
    check(&ring, next, 4096);
}

/// Truncations (synchronous) while a batch is in flight, whose writes land
/// only afterwards: the batch's header slot holds an older store and its
/// records are dropped ones, yet the last truncation stands after a reopen
/// (both truncations stored their header in the other slot).
#[test]
fn truncation_while_a_batch_is_in_flight() {
    let dir = TempDir::new("ring-trunc-inflight");
    let path = dir.join("ring");
    let mut ring = Ring::create(&path, 1 << 18, 1).unwrap();
    for s in 1..=4 {
        append(&mut ring, s, 1000);
    }
    run_batch(&mut ring);
    // Two batches in flight: 5 and 6, then 7 and 8.
    append(&mut ring, 5, 1000);
    append(&mut ring, 6, 1000);
    let w = ring.begin_write().unwrap();
    append(&mut ring, 7, 1000);
    append(&mut ring, 8, 1000);
    let w2 = ring.begin_write().unwrap();
    ring.truncate_after(5);
    ring.truncate_after(3);
    assert_eq!(ring.durable_seq(), 3);
    // The stale batches land now, header slots included.
    for (off, segs) in w.writes.into_iter().chain(w2.writes) {
        run_write(ring.fd(), off, segs).unwrap();
    }
    ring.sync_completed(w2.through);
    ring.sync_completed(w.through);
    assert_eq!(ring.durable_seq(), 3, "the stale batches confirm nothing");
    assert_eq!(ring.writes_in_flight(), 0);
    std::mem::forget(ring); // a crash: nothing more written
    let (mut ring, rec) = Ring::open(&path).unwrap();
    assert_eq!(
        (rec.first_seq, rec.next_seq),
        (1, 4),
        "seqs 4..8 stay dropped"
    );
    for s in 1..=3 {
        check(&ring, s, 1000);
    }
    append(&mut ring, 4, 10);
    run_batch(&mut ring);
    drop(ring);
    let (ring, rec) = Ring::open(&path).unwrap();
    assert_eq!(rec.next_seq, 5);
    check(&ring, 4, 10);
}

/// A ring of format 1 is refused by name, with what to do.
#[test]
fn version_1_ring_is_refused() {
    let dir = TempDir::new("ring-v1");
    let path = dir.join("ring");
    drop(Ring::create(&path, 1 << 16, 1).unwrap());
    // Make slot 0 say version 1, as a ring of the previous format does.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&1u32.to_le_bytes(), 8).unwrap();
    match Ring::open(&path) {
        Err(
            e @ RingError::BadVersion {
                found: 1,
                supported: 3,
                ..
            },
        ) => {
            let msg = e.to_string();
            assert!(
                msg.contains("Drain it")
                    && msg.contains("reads versions 2 to 3")
                    && msg.contains("format --force --replace"),
                "{msg}"
            );
        }
        other => panic!("expected BadVersion, got {:?}", other.map(|(_, r)| r)),
    }
}

/// Pages of `path` in the page cache within `[from, from + len)`.
fn resident_pages(path: &Path, from: u64, len: usize) -> usize {
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: a read-only mapping of a file this test owns; nothing
    // writes it through the mapping and it is dropped before returning.
    let map = unsafe { memmap2::MmapOptions::new().offset(from).len(len).map(&f) }.unwrap();
    let mut vec = vec![0u8; len.div_ceil(4096)];
    // SAFETY: `map` covers `len` bytes from a page-aligned address and
    // `vec` holds one byte per page of it.
    let rc = unsafe { libc::mincore(map.as_ptr() as *mut libc::c_void, len, vec.as_mut_ptr()) };
    assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
    vec.iter().filter(|b| **b & 1 == 1).count()
}

/// Trimming durable records whose buffers were released reads nothing back
/// from the file: each page it touched through the mapping would be a
/// synchronous disk read on the reactor (the O_DIRECT writes leave none of
/// them in the page cache).
#[test]
fn trimming_reads_no_record_back_from_the_file() {
    let dir = TempDir::new("ring-trim-reads");
    let path = dir.join("ring");
    let mut ring = Ring::create(&path, 4 << 20, 1).unwrap();
    if !ring.is_direct() {
        eprintln!(
            "skipped: {} takes no O_DIRECT (tmpfs?): its pages stay cached",
            dir.path().display()
        );
        return;
    }
    for seq in 1..=64 {
        append(&mut ring, seq, 4096);
    }
    assert_eq!(run_batch(&mut ring), 64);
    ring.release_through(64);
    assert_eq!(ring.kept_bytes(), 0);
    let span = 64 * 8192;
    let f = std::fs::File::open(&path).unwrap();
    // SAFETY: posix_fadvise takes no memory arguments.
    let rc = unsafe {
        use std::os::unix::io::AsRawFd;
        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED)
    };
    assert_eq!(rc, 0);
    assert_eq!(resident_pages(&path, RING_HEADER_BYTES, span), 0);
    ring.trim_through(64);
    assert_eq!(ring.payload_bytes(), 0);
    assert_eq!(
        resident_pages(&path, RING_HEADER_BYTES, span),
        0,
        "trimming read records back through the mapping"
    );
}

/// Read the group block at file offset `at`: (record count, first seq).
fn group_at(file: &[u8], at: usize) -> (usize, u64) {
    assert_eq!(
        &file[at..at + 4],
        b"DMGR",
        "a group block at file offset {at}"
    );
    let count = u16::from_le_bytes([file[at + 4], file[at + 5]]) as usize;
    let first = u64::from_le_bytes(file[at + 8..at + 16].try_into().unwrap());
    (count, first)
}

/// Ring bytes one batch writes.
fn batch_bytes(w: &RingWrite) -> u64 {
    w.writes
        .iter()
        .flat_map(|(_, segs)| segs.iter().map(|s| s.len as u64))
        .sum()
}

/// More records in one batch than a group block holds: the batch is two
/// groups, back to back, and every record reads back (from its buffer,
/// through the mapping, and after a reopen).
#[test]
fn a_group_fills_up() {
    let dir = TempDir::new("ring-group-full");
    let path = dir.join("ring");
    let mut ring = Ring::create(&path, 4 << 20, 1).unwrap();
    let n = GROUP_RECORDS as u64 + 37;
    for s in 1..=n {
        append(&mut ring, s, 4096);
    }
    let w = ring.begin_write().unwrap();
    assert_eq!(w.writes.len(), 1, "one run, no header store");
    assert_eq!(batch_bytes(&w), (n + 2) * 4096, "two group blocks");
    for (off, segs) in w.writes {
        run_write(ring.fd(), off, segs).unwrap();
    }
    ring.sync_completed(w.through);
    let file = std::fs::read(&path).unwrap();
    let h = RING_HEADER_BYTES as usize;
    assert_eq!(group_at(&file, h), (GROUP_RECORDS, 1));
    let second = h + (GROUP_RECORDS + 1) * 4096;
    assert_eq!(group_at(&file, second), (37, GROUP_RECORDS as u64 + 1));
    assert_eq!(
        &file[second + 4096..second + 8192],
        &payload(GROUP_RECORDS as u64 + 1, 4096)[..]
    );
    // Through the mapping once the buffers are gone.
    ring.release_through(n);
    assert_eq!(ring.kept_bytes(), 0);
    for s in 1..=n {
        check(&ring, s, 4096);
    }
    std::mem::forget(ring); // a crash: the records were durable
    let (ring, rec) = Ring::open(&path).unwrap();
    assert_eq!(
        (rec.first_seq, rec.next_seq, rec.torn_tail_bytes),
        (1, n + 1, 0)
    );
    for s in 1..=n {
        check(&ring, s, 4096);
    }
}

/// A batch whose group reaches the end of the data area: a record whose
/// payload does not fit before it opens a group after a wrap marker, at
/// the start of the next lap; one that ends exactly there stays in its
/// group, and the next opens a group at the start without a marker.
#[test]
fn a_batch_whose_group_hits_the_wrap() {
    let dir = TempDir::new("ring-group-wrap");
    let path = dir.join("ring");
    let cap = 1u64 << 20;
    let h = RING_HEADER_BYTES;
    let mut ring = Ring::create(&path, cap, 1).unwrap();
    // Move the head to 12 KiB before the end.
    append(&mut ring, 1, (cap - 16384) as usize);
    run_batch(&mut ring);
    ring.trim_through(1);
    run_batch(&mut ring);
    // 2 opens a group at cap - 12 KiB; 3 (8 KiB) no longer fits before
    // the end: a marker at cap - 4 KiB, a group at 0; 4 joins it.
    append(&mut ring, 2, 4096);
    append(&mut ring, 3, 8192);
    append(&mut ring, 4, 4096);
    let w = ring.begin_write().unwrap();
    let offsets: Vec<u64> = w.writes.iter().map(|(o, _)| *o).collect();
    assert_eq!(
        offsets,
        vec![h + cap - 12288, h],
        "before and after the wrap"
    );
    assert_eq!(batch_bytes(&w), 4 * 4096 + 3 * 4096);
    for (off, segs) in w.writes {
        run_write(ring.fd(), off, segs).unwrap();
    }
    ring.sync_completed(w.through);
    let file = std::fs::read(&path).unwrap();
    assert_eq!(group_at(&file, (h + cap - 12288) as usize), (1, 2));
    assert_eq!(&file[(h + cap - 4096) as usize..][..4], b"DMWR");
    assert_eq!(group_at(&file, h as usize), (2, 3));
    // 6 and 7 end exactly at the end of the area, in one group; 8 opens a
    // group at the start of the next lap, without a marker.
    ring.trim_through(4);
    append(&mut ring, 5, (cap - 32768) as usize); // 16 KiB .. cap - 12 KiB
    run_batch(&mut ring);
    ring.sync().unwrap(); // the trim is durable: the start is free again
    append(&mut ring, 6, 4096);
    append(&mut ring, 7, 4096);
    append(&mut ring, 8, 4096);
    let w = ring.begin_write().unwrap();
    let offsets: Vec<u64> = w.writes.iter().map(|(o, _)| *o).collect();
    assert_eq!(
        offsets,
        vec![h + cap - 12288, h],
        "up to the end, then the start"
    );
    assert_eq!(batch_bytes(&w), 5 * 4096, "no marker");
    for (off, segs) in w.writes {
        run_write(ring.fd(), off, segs).unwrap();
    }
    ring.sync_completed(w.through);
    let file = std::fs::read(&path).unwrap();
    assert_eq!(group_at(&file, (h + cap - 12288) as usize), (2, 6));
    assert_eq!(group_at(&file, h as usize), (1, 8));
    ring.release_through(8);
    check(&ring, 7, 4096);
    drop(ring);
    let (ring, rec) = Ring::open(&path).unwrap();
    assert_eq!(
        (rec.first_seq, rec.next_seq, rec.torn_tail_bytes),
        (5, 9, 0)
    );
    check(&ring, 5, (cap - 32768) as usize);
    for s in 6..=8 {
        check(&ring, s, 4096);
    }
}

/// A crash while a batch's group is written: the group block landed but
/// the last payload did not; a payload in the middle did not; the group
/// block did not. Each is a torn tail (the records were not durable): the
/// records before the tear stay, the rest of the group is cut off.
#[test]
fn a_torn_group_is_cut_as_a_torn_tail() {
    let dir = TempDir::new("ring-group-torn");
    let path = dir.join("ring");
    let mut ring = Ring::create(&path, 1 << 20, 1).unwrap();
    for s in 1..=3 {
        append(&mut ring, s, 4096);
    }
    run_batch(&mut ring);
    for s in 4..=8 {
        append(&mut ring, s, 4096);
    }
    let w = ring.begin_write().unwrap();
    assert_eq!(w.writes.len(), 1);
    let (off, segs) = w.writes.into_iter().next().unwrap();
    std::mem::forget(ring); // the crash: what lands is up to the test
    let pristine = std::fs::read(&path).unwrap();
    // segs: the group block, then the five payloads.
    assert_eq!(segs.len(), 6);
    let fd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let land = |skip: usize| {
        std::fs::write(&path, &pristine).unwrap();
        let mut at = off;
        for (i, s) in segs.iter().enumerate() {
            if i != skip {
                fd.write_all_at(&s.buf[s.start..s.start + s.len], at)
                    .unwrap();
            }
            at += s.len as u64;
        }
    };
    // Seq 8's payload missing.
    land(5);
    let (ring, rec) = Ring::open(&path).unwrap();
    assert_eq!((rec.first_seq, rec.next_seq), (1, 8));
    assert_eq!(rec.torn_tail_bytes, 4096, "seq 8's payload block");
    for s in 1..=7 {
        check(&ring, s, 4096);
    }
    drop(ring);
    // Seq 5's payload missing: 6..8 are whole but follow a gap.
    land(2);
    let (ring, rec) = Ring::open(&path).unwrap();
    assert_eq!((rec.first_seq, rec.next_seq), (1, 5));
    assert_eq!(
        rec.torn_tail_bytes,
        4 * 4096,
        "seqs 5..8, the rest of the group"
    );
    check(&ring, 4, 4096);
    drop(ring);
    // The group block missing: the whole batch is gone.
    land(0);
    let (mut ring, rec) = Ring::open(&path).unwrap();
    assert_eq!((rec.first_seq, rec.next_seq), (1, 4));
    for s in 1..=3 {
        check(&ring, s, 4096);
    }
    // The ring goes on where the torn group was.
    append(&mut ring, 4, 100);
    run_batch(&mut ring);
    drop(ring);
    let (ring, rec) = Ring::open(&path).unwrap();
    assert_eq!(rec.next_seq, 5);
    check(&ring, 4, 100);
}

/// At depth, a 4 KiB write costs 4 KiB of ring plus its share of a group
/// block: 32 records in one batch take 33 blocks (format 2: 64).
#[test]
fn ring_bytes_per_4k_record_at_depth() {
    let dir = TempDir::new("ring-bytes");
    let path = dir.join("ring");
    let mut ring = Ring::create(&path, 16 << 20, 1).unwrap();
    let mut next = 1u64;
    for depth in [1u64, 32, 63, 64, 200] {
        let used = ring.used_bytes();
        for _ in 0..depth {
            append(&mut ring, next, 4096);
            next += 1;
        }
        let groups = depth.div_ceil(GROUP_RECORDS as u64);
        assert_eq!(ring.used_bytes() - used, (depth + groups) * 4096);
        let w = ring.begin_write().unwrap();
        assert_eq!(
            batch_bytes(&w),
            (depth + groups) * 4096,
            "{depth} records: one block each plus one per group"
        );
        for (off, segs) in w.writes {
            run_write(ring.fd(), off, segs).unwrap();
        }
        ring.sync_completed(w.through);
    }
    drop(ring);
    let (ring, rec) = Ring::open(&path).unwrap();
    assert_eq!(rec.next_seq, next);
    for s in 1..next {
        check(&ring, s, 4096);
    }
}

/// A truncation that cuts a written group short: the new records go in a
/// new group where the last kept one ended, and the dropped ones, still
/// listed in the old group block, never come back. A trim that keeps part
/// of a group keeps its group block as the tail.
#[test]
fn truncation_and_trim_inside_a_group() {
    let dir = TempDir::new("ring-group-trunc");
    let path = dir.join("ring");
    let mut ring = Ring::create(&path, 1 << 20, 1).unwrap();
    for s in 1..=10 {
        append(&mut ring, s, 4096);
    }
    run_batch(&mut ring);
    ring.truncate_after(6);
    append(&mut ring, 7, 100);
    append(&mut ring, 8, 0);
    append(&mut ring, 9, 5000);
    run_batch(&mut ring);
    std::mem::forget(ring);
    let (ring, rec) = Ring::open(&path).unwrap();
    assert_eq!(
        (rec.first_seq, rec.next_seq, rec.torn_tail_bytes),
        (1, 10, 0)
    );
    for s in 1..=6 {
        check(&ring, s, 4096);
    }
    check(&ring, 7, 100);
    check(&ring, 8, 0);
    check(&ring, 9, 5000);
    // A second reopen (a new epoch) still does not take the old 7..10.
    drop(ring);
    let (mut ring, rec) = Ring::open(&path).unwrap();
    assert_eq!(rec.next_seq, 10);
    check(&ring, 9, 5000);
    // Trim into the first group; the header holds its block as the tail.
    ring.trim_through(3);
    ring.sync().unwrap();
    drop(ring);
    let (ring, rec) = Ring::open(&path).unwrap();
    assert_eq!((rec.first_seq, rec.next_seq), (4, 10));
    for s in 4..=6 {
        check(&ring, s, 4096);
    }
    check(&ring, 7, 100);
    drop(ring);
    // Dropping the appended records again: the third group goes too.
    let (mut ring, _) = Ring::open(&path).unwrap();
    ring.truncate_after(5);
    drop(ring);
    let (ring, rec) = Ring::open(&path).unwrap();
    assert_eq!((rec.first_seq, rec.next_seq), (4, 6));
    check(&ring, 5, 4096);
}

/// Writes a format 2 ring file from its specification (docs/ring-format.md,
/// version 2), independently of the ring code: three header slots (slot 0
/// used), records of a 4 KiB header block followed by the payload padded to
/// whole blocks, starting at data offset `tail`.
fn write_format_2_ring(path: &Path, capacity: u64, tail: u64, records: &[(u64, usize)]) {
    fn put64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }
    fn put32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }
    let h = RING_HEADER_BYTES as usize;
    let mut file = vec![0u8; h + capacity as usize];
    let mut pos = tail as usize;
    for &(seq, len) in records {
        let r = &mut file[h + pos..h + pos + 64];
        r[0..4].copy_from_slice(b"DMRC");
        let head = hdr(seq);
        r[4] = head.kind;
        r[5] = head.flags;
        put64(r, 8, seq);
        put64(r, 16, head.gen);
        put64(r, 24, head.offset);
        put64(r, 32, head.len);
        put64(r, 40, 1); // epoch
        put32(r, 48, len as u32);
        put64(r, 52, seq - 1); // synced_seq: every earlier record was durable
        let p = payload(seq, len);
        let crc = crc32c::crc32c_append(crc32c::crc32c(&r[..60]), &p);
        put32(r, 60, crc);
        file[h + pos + 4096..h + pos + 4096 + len].copy_from_slice(&p);
        pos += 4096 + len.next_multiple_of(4096);
    }
    let (first, next) = (records[0].0, records.last().unwrap().0 + 1);
    let s = &mut file[..128];
    s[0..8].copy_from_slice(b"DMIRRING");
    put32(s, 8, 2);
    put32(s, 12, RING_HEADER_BYTES as u32);
    put64(s, 16, capacity);
    put64(s, 24, 1); // epoch
    put64(s, 32, first); // epoch_first_seq
    put64(s, 40, tail);
    put64(s, 48, first);
    put64(s, 56, pos as u64); // head
    put64(s, 64, next);
    put64(s, 72, next - 1); // synced_seq
    put64(s, 80, 1); // sync_count
    let crc = crc32c::crc32c(&s[..120]);
    put32(s, 120, crc);
    std::fs::write(path, &file).unwrap();
}

/// A ring written by format 2 (a header block per record) opens: its
/// records read back, new ones follow in groups (here across the end of
/// the data area), the header is stored as version 3, and after reopens,
/// trims and the last format 2 record's trim, everything reads back.
#[test]
fn format_2_ring_is_read_and_upgraded() {
    let dir = TempDir::new("ring-v2");
    let path = dir.join("ring");
    let cap = 1u64 << 18;
    let old = [(1u64, 4096usize), (2, 100), (3, 0), (4, 8192)];
    // 8 + 8 + 4 + 12 KiB, ending 8 KiB before the end of the area.
    write_format_2_ring(&path, cap, cap - 40960, &old);
    let (mut ring, rec) = Ring::open(&path).unwrap();
    assert_eq!(
        (
            rec.first_seq,
            rec.next_seq,
            rec.records,
            rec.torn_tail_bytes
        ),
        (1, 5, 4, 0)
    );
    for &(s, len) in &old {
        check(&ring, s, len);
    }
    let file = std::fs::read(&path).unwrap();
    let versions: Vec<u32> = (0..3)
        .map(|i| u32::from_le_bytes(file[i * 4096 + 8..i * 4096 + 12].try_into().unwrap()))
        .collect();
    assert_eq!(
        versions,
        vec![2, 3, 0],
        "the open stored version 3 in slot 1"
    );
    // 5 fills the last 8 KiB (its group block and payload); 6 opens a
    // group at the start of the next lap, 7..10 join it.
    let len = |s: u64| 1000 * s as usize;
    for s in 5..=10 {
        append(&mut ring, s, len(s));
    }
    run_batch(&mut ring);
    drop(ring);
    let (mut ring, rec) = Ring::open(&path).unwrap();
    assert_eq!((rec.first_seq, rec.next_seq), (1, 11));
    for &(s, l) in &old {
        check(&ring, s, l);
    }
    for s in 5..=10 {
        check(&ring, s, len(s));
    }
    ring.trim_through(2);
    ring.sync().unwrap();
    drop(ring);
    let (mut ring, rec) = Ring::open(&path).unwrap();
    assert_eq!((rec.first_seq, rec.next_seq), (3, 11));
    check(&ring, 3, 0);
    check(&ring, 4, 8192);
    ring.trim_through(4);
    ring.sync().unwrap();
    drop(ring);
    let (ring, rec) = Ring::open(&path).unwrap();
    assert_eq!((rec.first_seq, rec.next_seq), (5, 11));
    for s in 5..=10 {
        check(&ring, s, len(s));
    }
}
