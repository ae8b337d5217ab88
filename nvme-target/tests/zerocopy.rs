//! Write payloads (in-capsule and H2CData after R2T) at or above the
//! zero-copy threshold arrive in the volume's pool buffers with no copy in
//! user space, smaller ones are received in bulk and copied once, a queue
//! mixing both serves both, an empty pool pushes back without failing
//! requests, and reads are sent from the volume's buffer.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use nvme_host::initiator::Controller;
use nvme_target::pdu::Digests;
use nvme_target::NvmeTarget;
use volume::{IoBufPool, MemVolume, PoolChecked, Volume};

fn pooled(total: usize, max_buf: usize) -> Arc<MemVolume> {
    Arc::new(MemVolume::new(512, 32 * 2048).with_pool(IoBufPool::new(total, max_buf)))
}

/// A target whose queues receive write data of `min` bytes and more per
/// PDU zero-copy.
fn serve_zero_copy_from(vol: Arc<dyn Volume>, min: usize) -> NvmeTarget {
    let mut c = cfg();
    c.zero_copy_receive_min_bytes = min;
    nvme_target::start(c, vol).unwrap()
}

fn connect_with_digests(t: &NvmeTarget, digests: bool) -> Controller {
    let mut h = host();
    h.digests = Digests {
        header: digests,
        data: digests,
    };
    Controller::connect(t.local_addr(), &h).unwrap()
}

const MIN: usize = 16 * 1024;

#[test]
fn writes_below_the_threshold_are_copied_once_and_those_at_it_not() {
    for digests in [false, true] {
        // Below (4 KiB in-capsule, 12 KiB after an R2T): each payload byte
        // copied once.
        let vol = PoolChecked::new(pooled(16 << 20, 1 << 20), Duration::ZERO);
        let t = serve_zero_copy_from(vol.clone(), MIN);
        let c = connect_with_digests(&t, digests);
        let mut written = Vec::new();
        for len in [4096usize, MIN - 4096] {
            for i in 0..8u64 {
                let slba = i * 64 + if len == 4096 { 0 } else { 1024 };
                let data = pattern(i + len as u64, len);
                c.write(slba, data.clone(), false).unwrap();
                written.push((slba, data));
            }
        }
        assert_eq!(
            t.payload_copied_bytes(),
            8 * MIN as u64,
            "digests {digests}"
        );
        for (slba, data) in &written {
            assert!(c.read(*slba, (data.len() / 512) as u32).unwrap() == *data);
        }
        assert_eq!(vol.unpooled.load(Ordering::Relaxed), 0);
        c.disconnect();
        t.shutdown();
        // At and above: none.
        let vol = PoolChecked::new(pooled(16 << 20, 1 << 20), Duration::ZERO);
        let t = serve_zero_copy_from(vol.clone(), MIN);
        let c = connect_with_digests(&t, digests);
        for (i, len) in [MIN, 128 * 1024, 1 << 20].into_iter().enumerate() {
            let data = pattern(i as u64, len);
            c.write(i as u64 * 4096, data.clone(), false).unwrap();
            assert!(c.read(i as u64 * 4096, (len / 512) as u32).unwrap() == data);
        }
        assert_eq!(t.payload_copied_bytes(), 0, "digests {digests}");
        assert_eq!(vol.unpooled.load(Ordering::Relaxed), 0);
        c.disconnect();
        t.shutdown();
    }
}

#[test]
fn a_queue_mixing_small_and_large_writes_serves_both() {
    let vol = PoolChecked::new(pooled(16 << 20, 1 << 20), Duration::ZERO);
    let t = serve_zero_copy_from(vol.clone(), MIN);
    let c = connect(&t);
    // 4 KiB and 128 KiB writes from several threads at once on one queue,
    // so that small and large PDUs share receives.
    let len = |i: u64| if i % 3 == 1 { 128 * 1024 } else { 4096 };
    std::thread::scope(|s| {
        for i in 0..48u64 {
            let c = &c;
            s.spawn(move || c.write(i * 256, pattern(i, len(i)), false).unwrap());
        }
    });
    for i in 0..48u64 {
        let n = len(i);
        assert!(
            c.read(i * 256, (n / 512) as u32).unwrap() == pattern(i, n),
            "write {i}"
        );
    }
    let small = (0..48)
        .filter(|&i| len(i) < MIN)
        .map(|i| len(i) as u64)
        .sum::<u64>();
    let total = (0..48).map(|i| len(i) as u64).sum::<u64>();
    let copied = t.payload_copied_bytes();
    // Every small payload is copied; a large one's data comes after an R2T
    // and goes straight into its buffer, unless part of it shared a bulk
    // receive with small capsules (at most the 64 KiB receive buffer each).
    assert!(
        copied >= small,
        "copied {copied} < the small writes' {small}"
    );
    assert!(
        copied < total,
        "copied {copied} of {total}: nothing zero-copy"
    );
    assert_eq!(vol.writes.load(Ordering::Relaxed), 48);
    assert_eq!(vol.unpooled.load(Ordering::Relaxed), 0);
    c.disconnect();
    t.shutdown();
}

#[test]
fn write_payloads_arrive_in_pool_buffers_without_a_copy() {
    for digests in [false, true] {
        let mem = pooled(16 << 20, 1 << 20);
        let vol = PoolChecked::new(mem, Duration::ZERO);
        // Threshold 0: every payload zero-copy.
        let t = serve_zero_copy_from(vol.clone(), 0);
        let mut h = host();
        h.digests = Digests {
            header: digests,
            data: digests,
        };
        let c = Controller::connect(t.local_addr(), &h).unwrap();
        let mut n = 0;
        // 4 KiB goes in-capsule, 128 KiB after an R2T; writes first (a
        // queue receives in bulk after a read, see NvmeConn::receive_limit).
        let mut written = Vec::new();
        for len in [4096usize, 128 * 1024] {
            for i in 0..8u64 {
                let slba = i * 512 + if len == 4096 { 0 } else { 4096 };
                let data = pattern(i + len as u64, len);
                c.write(slba, data.clone(), i % 2 == 0).unwrap();
                n += 1;
                written.push((slba, data));
            }
        }
        let big = pattern(99, 1 << 20);
        c.write(16384, big.clone(), false).unwrap();
        n += 1;
        assert_eq!(t.payload_copied_bytes(), 0, "digests {digests}");
        for (slba, data) in written {
            assert!(c.read(slba, (data.len() / 512) as u32).unwrap() == data);
        }
        // A 1 MiB read: eight C2HData PDUs cut from one buffer.
        assert!(c.read(16384, 2048).unwrap() == big);
        c.disconnect();
        assert_eq!(vol.writes.load(Ordering::Relaxed), n, "digests {digests}");
        assert_eq!(vol.unpooled.load(Ordering::Relaxed), 0, "digests {digests}");
        assert_eq!(t.payload_copied_bytes(), 0, "digests {digests}");
        t.shutdown();
    }
}

#[test]
fn an_empty_pool_pushes_back_and_fails_nothing() {
    // Copied (the default threshold) and zero-copy.
    for min in [MIN, 0] {
        empty_pool_pushes_back(min);
    }
}

fn empty_pool_pushes_back(min: usize) {
    // Four 4 KiB buffers; every write holds its buffer for a while; 64
    // writes in flight at once on one I/O queue.
    let mem = pooled(4 * 4096, 4096);
    let vol = PoolChecked::new(mem.clone(), Duration::from_millis(2));
    let t = serve_zero_copy_from(vol.clone(), min);
    let c = connect(&t);
    std::thread::scope(|s| {
        for i in 0..64u64 {
            let c = &c;
            s.spawn(move || c.write(i * 8, pattern(i, 4096), false).unwrap());
        }
    });
    for i in 0..64u64 {
        assert!(c.read(i * 8, 8).unwrap() == pattern(i, 4096), "write {i}");
    }
    assert_eq!(vol.writes.load(Ordering::Relaxed), 64);
    assert_eq!(vol.unpooled.load(Ordering::Relaxed), 0);
    let pool = mem.pool().unwrap();
    assert!(
        pool.misses() > 0,
        "the pool never ran empty: no back-pressure tested"
    );
    c.disconnect();
    t.shutdown();
    assert_eq!(pool.in_use_bytes(), 0);
}
