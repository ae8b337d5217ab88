//! Write payloads (in-capsule and H2CData after R2T) arrive in the
//! volume's pool buffers with no copy in user space, an empty pool pushes
//! back without failing requests, and reads are sent from the volume's
//! buffer.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use nvme_host::initiator::Controller;
use nvme_target::pdu::Digests;
use volume::{IoBufPool, MemVolume, PoolChecked};

fn pooled(total: usize, max_buf: usize) -> Arc<MemVolume> {
    Arc::new(MemVolume::new(512, 32 * 2048).with_pool(IoBufPool::new(total, max_buf)))
}

#[test]
fn write_payloads_arrive_in_pool_buffers_without_a_copy() {
    for digests in [false, true] {
        let mem = pooled(16 << 20, 1 << 20);
        let vol = PoolChecked::new(mem, Duration::ZERO);
        let t = serve(vol.clone());
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
    // Four 4 KiB buffers; every write holds its buffer for a while; 64
    // writes in flight at once on one I/O queue.
    let mem = pooled(4 * 4096, 4096);
    let vol = PoolChecked::new(mem.clone(), Duration::from_millis(2));
    let t = serve(vol.clone());
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
