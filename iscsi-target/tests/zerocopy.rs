//! Write payloads (immediate data, Data-Out after R2T) at or above the
//! zero-copy threshold per PDU arrive in the volume's pool buffers with no
//! copy in user space, smaller ones are received in bulk and copied once,
//! a connection mixing both serves both, an empty pool pushes back without
//! failing requests, and reads are sent from the volume's buffer.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use iscsi_target::pdu;
use iscsi_target::IscsiConfig;
use volume::{IoBufPool, MemVolume, PoolChecked, Volume};

fn pooled(total: usize, max_buf: usize) -> Arc<MemVolume> {
    Arc::new(MemVolume::new(512, 32 * 2048).with_pool(IoBufPool::new(total, max_buf)))
}

/// A target whose connections receive write data of `min` bytes and more
/// per PDU zero-copy.
fn serve(vol: Arc<dyn Volume>, min: usize) -> iscsi_target::IscsiTarget {
    let mut cfg = IscsiConfig::new("127.0.0.1:0".parse().unwrap(), IQN);
    cfg.zero_copy_receive_min_bytes = min;
    iscsi_target::start(cfg, vol).expect("start target")
}

/// The test initiator's data segments are at most 8 KiB: the threshold
/// that puts them at it.
const MIN: usize = 8192;

fn pattern(seed: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) as u8)
        .collect()
}

#[test]
fn writes_below_the_threshold_are_copied_once_and_those_at_it_not() {
    for digests in [false, true] {
        let dg = if digests { "CRC32C" } else { "None" };
        // Below (1 and 4 KiB immediate data): each payload byte copied once.
        let vol = PoolChecked::new(pooled(16 << 20, 1 << 20), Duration::ZERO);
        let t = serve(vol.clone(), MIN);
        let mut c = Initiator::connect(t.local_addr());
        c.login(&[("HeaderDigest", dg), ("DataDigest", dg)]);
        let mut written = Vec::new();
        for (k, len) in [1024usize, 4096].into_iter().enumerate() {
            for i in 0..4u32 {
                let lba = i * 64 + k as u32 * 1024;
                let data = pattern(i + len as u32, len);
                assert_eq!(c.write10(lba, &data).status, 0);
                written.push((lba, data));
            }
        }
        assert_eq!(
            t.payload_copied_bytes(),
            4 * (1024 + 4096),
            "digests {digests}"
        );
        for (lba, data) in written {
            let r = c.read10(lba, (data.len() / 512) as u16);
            assert!(
                r.status == 0 && r.data == data,
                "{} bytes at {lba}",
                data.len()
            );
        }
        assert_eq!(vol.unpooled.load(Ordering::Relaxed), 0);
        t.shutdown();
        // At and above (8 KiB segments: immediate data and Data-Out): none.
        let vol = PoolChecked::new(pooled(16 << 20, 1 << 20), Duration::ZERO);
        let t = serve(vol.clone(), MIN);
        let mut c = Initiator::connect(t.local_addr());
        c.login(&[("HeaderDigest", dg), ("DataDigest", dg)]);
        // Writes first: a connection receives in bulk after a read.
        let sizes = [8192usize, 128 * 1024, 1 << 20];
        for (i, &len) in sizes.iter().enumerate() {
            assert_eq!(
                c.write10(i as u32 * 4096, &pattern(i as u32, len)).status,
                0
            );
        }
        assert_eq!(t.payload_copied_bytes(), 0, "digests {digests}");
        for (i, &len) in sizes.iter().enumerate() {
            let lba = i as u32 * 4096;
            let r = c.read10(lba, (len / 512) as u16);
            assert!(
                r.status == 0 && r.data == pattern(i as u32, len),
                "{len} bytes at {lba}"
            );
        }
        assert_eq!(vol.unpooled.load(Ordering::Relaxed), 0);
        t.shutdown();
    }
}

#[test]
fn a_connection_mixing_small_and_large_writes_serves_both() {
    let vol = PoolChecked::new(pooled(16 << 20, 1 << 20), Duration::ZERO);
    let t = serve(vol.clone(), MIN);
    let mut c = Initiator::connect(t.local_addr());
    c.login(&[]);
    // 4 KiB (immediate data) and 128 KiB (8 KiB immediate, then Data-Out
    // after an R2T) writes, alternating on one connection.
    let len = |i: u32| if i % 3 == 1 { 128 * 1024 } else { 4096 };
    for i in 0..24u32 {
        assert_eq!(
            c.write10(i * 256, &pattern(i, len(i))).status,
            0,
            "write {i}"
        );
    }
    for i in 0..24u32 {
        let r = c.read10(i * 256, (len(i) / 512) as u16);
        assert!(r.status == 0 && r.data == pattern(i, len(i)), "write {i}");
    }
    let small: u64 = (0..24)
        .filter(|&i| len(i) < MIN)
        .map(|i| len(i) as u64)
        .sum();
    let large = (0..24).filter(|&i| len(i) >= MIN).count() as u64;
    let copied = t.payload_copied_bytes();
    // Every small payload is copied; of a large write at most its
    // immediate data, which may share a bulk receive with its header.
    assert!(
        copied >= small,
        "copied {copied} < the small writes' {small}"
    );
    assert!(
        copied <= small + large * 8192,
        "copied {copied}: the large writes' Data-Out was not received zero-copy"
    );
    assert_eq!(vol.writes.load(Ordering::Relaxed), 24);
    assert_eq!(vol.unpooled.load(Ordering::Relaxed), 0);
    t.shutdown();
}

#[test]
fn write_payloads_arrive_in_pool_buffers_without_a_copy() {
    for digests in [false, true] {
        let vol = PoolChecked::new(pooled(16 << 20, 1 << 20), Duration::ZERO);
        // Threshold 0: every payload zero-copy.
        let t = serve(vol.clone(), 0);
        let mut c = Initiator::connect(t.local_addr());
        let dg = if digests { "CRC32C" } else { "None" };
        c.login(&[("HeaderDigest", dg), ("DataDigest", dg)]);
        assert_eq!((c.hd, c.dd), (digests, digests));
        let mut n = 0;
        // 1 and 4 KiB go as immediate data; 128 KiB as 8 KiB immediate
        // data and 8 KiB Data-Out PDUs after an R2T. Writes first (a
        // connection receives in bulk after a read, see
        // IscsiConn::receive_limit).
        let mut written = Vec::new();
        for (k, len) in [1024usize, 4096, 128 * 1024].into_iter().enumerate() {
            for i in 0..4u32 {
                let lba = i * 512 + k as u32 * 2048;
                let data = pattern(i + len as u32, len);
                assert_eq!(c.write10(lba, &data).status, 0);
                n += 1;
                written.push((lba, data));
            }
        }
        let big = pattern(99, 1 << 20);
        assert_eq!(c.write10(16384, &big).status, 0);
        n += 1;
        assert_eq!(t.payload_copied_bytes(), 0, "digests {digests}");
        for (lba, data) in written {
            let r = c.read10(lba, (data.len() / 512) as u16);
            assert_eq!(r.status, 0);
            assert!(
                r.data == data,
                "{} bytes at {lba} read back wrong",
                data.len()
            );
        }
        // A 1 MiB read: Data-In PDUs cut from one buffer.
        let r = c.read10(16384, 2048);
        assert!(r.status == 0 && r.data == big);
        assert_eq!(vol.writes.load(Ordering::Relaxed), n, "digests {digests}");
        assert_eq!(vol.unpooled.load(Ordering::Relaxed), 0, "digests {digests}");
        assert_eq!(t.payload_copied_bytes(), 0, "digests {digests}");
        t.shutdown();
    }
}

#[test]
fn an_empty_pool_pushes_back_and_fails_nothing() {
    // Copied (the default threshold) and zero-copy.
    for min in [iscsi_target::DEFAULT_ZERO_COPY_RECEIVE_MIN_BYTES, 0] {
        empty_pool_pushes_back(min);
    }
}

fn empty_pool_pushes_back(min: usize) {
    // Four 4 KiB buffers; every write holds its buffer for a while; 64
    // writes with immediate data sent at once on one connection.
    let mem = pooled(4 * 4096, 4096);
    let vol = PoolChecked::new(mem.clone(), Duration::from_millis(2));
    let t = serve(vol.clone(), min);
    let mut c = Initiator::connect(t.local_addr());
    c.login(&[]);
    let mut itts = Vec::new();
    for i in 0..64u32 {
        let mut cdb = [0u8; 10];
        cdb[0] = 0x2a;
        cdb[2..6].copy_from_slice(&(i * 8).to_be_bytes());
        cdb[7..9].copy_from_slice(&8u16.to_be_bytes());
        let mut p = c.cmd_pdu(&cdb, 4096, false, true);
        p.data = pattern(i, 4096);
        itts.push(p.itt());
        c.send(&mut p);
    }
    for _ in 0..64 {
        let r = c.recv().expect("a response");
        assert_eq!(r.opcode(), pdu::OP_SCSI_RESP);
        assert_eq!(r.bhs[3], 0, "status of ITT {}", r.itt());
        assert!(itts.contains(&r.itt()));
        c.exp_stat_sn = r.u32_at(24).wrapping_add(1);
    }
    for i in 0..64u32 {
        let r = c.read10(i * 8, 8);
        assert!(r.status == 0 && r.data == pattern(i, 4096), "write {i}");
    }
    assert_eq!(vol.writes.load(Ordering::Relaxed), 64);
    assert_eq!(vol.unpooled.load(Ordering::Relaxed), 0);
    let pool = mem.pool().unwrap();
    assert!(
        pool.misses() > 0,
        "the pool never ran empty: no back-pressure tested"
    );
    t.shutdown();
    assert_eq!(pool.in_use_bytes(), 0);
}
