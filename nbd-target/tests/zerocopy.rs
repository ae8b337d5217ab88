//! Write payloads at or above the zero-copy threshold arrive in the
//! volume's pool buffers (no copy in user space), smaller ones are received
//! in bulk and copied once, a connection mixing both serves both, an empty
//! pool pushes back without failing requests, and large reads are sent
//! from the volume's buffer to a client that reads slowly.

mod common;

use std::io::Read;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use nbd_target::proto::*;
use nbd_target::{start, NbdConfig, NbdServer};
use volume::{IoBufPool, MemVolume, PoolChecked};

const BS: u32 = 512;
const BLOCKS: u64 = 16 * 2048; // 16 MiB

fn write_request(handle: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(28 + data.len());
    m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    m.extend_from_slice(&0u16.to_be_bytes());
    m.extend_from_slice(&CMD_WRITE.to_be_bytes());
    m.extend_from_slice(&handle.to_be_bytes());
    m.extend_from_slice(&offset.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    m
}

/// Pipelines `n` writes of `len` bytes (all sent in one go) and checks
/// every reply.
fn pipelined_writes(c: &mut Client, n: usize, len: usize) {
    let mut all = Vec::new();
    for i in 0..n {
        let data = pattern(i as u8, len);
        all.extend_from_slice(&write_request(i as u64, (i * len) as u64, &data));
    }
    c.send(&all);
    let mut seen = vec![false; n];
    for _ in 0..n {
        let (errno, handle) = c.reply();
        assert_eq!(errno, 0, "write {handle} failed");
        assert!(!seen[handle as usize], "two replies for {handle}");
        seen[handle as usize] = true;
    }
}

/// Reads back what [`pipelined_writes`] wrote.
fn verify(c: &mut Client, n: usize, len: usize) {
    for i in 0..n {
        let (errno, got) = c.call(CMD_READ, 0, (i * len) as u64, len as u32, &[]);
        assert_eq!(errno, 0);
        assert!(
            got == pattern(i as u8, len),
            "write {i} of {len} bytes reads back wrong"
        );
    }
}

/// A server whose connections receive write payloads of `min` bytes and
/// more zero-copy.
fn serve_zero_copy_from(vol: Arc<dyn volume::Volume>, min: usize) -> NbdServer {
    let cfg = NbdConfig {
        zero_copy_receive_min_bytes: min,
        ..config(8)
    };
    start(cfg, vol).unwrap()
}

fn pooled() -> Arc<PoolChecked> {
    let pool = IoBufPool::new(16 << 20, 1 << 20);
    let mem = Arc::new(MemVolume::new(BS, BLOCKS).with_pool(pool));
    PoolChecked::new(mem, Duration::ZERO)
}

#[test]
fn write_payloads_arrive_in_pool_buffers_without_a_copy() {
    let vol = pooled();
    // Threshold 0: every payload zero-copy.
    let srv = serve_zero_copy_from(vol.clone(), 0);
    let (mut c, _, _) = Client::go(srv.local_addr());
    // Writes only (a connection receives in bulk after a read, so that a
    // write right behind reads may be copied; see NbdConn::receive_limit).
    for len in [4096, 128 * 1024] {
        // One at a time, then 32 at once.
        let data = pattern(7, len);
        let (errno, _) = c.call(CMD_WRITE, CMD_FLAG_FUA, 8 << 20, len as u32, &data);
        assert_eq!(errno, 0);
        pipelined_writes(&mut c, 32, len);
    }
    assert_eq!(srv.payload_copied_bytes(), 0);
    verify(&mut c, 32, 128 * 1024);
    assert_eq!(vol.writes.load(Ordering::Relaxed), 2 * 33);
    assert_eq!(vol.unpooled.load(Ordering::Relaxed), 0);
    assert_eq!(srv.payload_copied_bytes(), 0);
    srv.shutdown();
}

#[test]
fn writes_below_the_threshold_are_copied_once_and_those_at_it_not() {
    const MIN: usize = 16 * 1024;
    // Below: every payload byte copied once (received in bulk).
    let vol = pooled();
    let srv = serve_zero_copy_from(vol.clone(), MIN);
    let (mut c, _, _) = Client::go(srv.local_addr());
    for len in [4096, MIN - 4096] {
        pipelined_writes(&mut c, 32, len);
        verify(&mut c, 32, len);
    }
    assert_eq!(srv.payload_copied_bytes(), 32 * (4096 + MIN as u64 - 4096));
    assert_eq!(vol.writes.load(Ordering::Relaxed), 64);
    assert_eq!(vol.unpooled.load(Ordering::Relaxed), 0);
    srv.shutdown();
    // At and above: none (writes only: a connection receives in bulk
    // after a read or a small write).
    let vol = pooled();
    let srv = serve_zero_copy_from(vol.clone(), MIN);
    let (mut c, _, _) = Client::go(srv.local_addr());
    for len in [MIN, 128 * 1024] {
        let (errno, _) = c.call(CMD_WRITE, 0, 8 << 20, len as u32, &pattern(3, len));
        assert_eq!(errno, 0);
        pipelined_writes(&mut c, 32, len);
    }
    assert_eq!(srv.payload_copied_bytes(), 0);
    verify(&mut c, 32, 128 * 1024);
    assert_eq!(vol.unpooled.load(Ordering::Relaxed), 0);
    srv.shutdown();
}

#[test]
fn a_connection_mixing_small_and_large_writes_serves_both() {
    const MIN: usize = 16 * 1024;
    let vol = pooled();
    let srv = serve_zero_copy_from(vol.clone(), MIN);
    let (mut c, _, _) = Client::go(srv.local_addr());
    // 4 KiB, 128 KiB, 4 KiB, 4 KiB, 128 KiB, ... in one stream, each at
    // its own offset.
    let sizes: Vec<usize> = (0..48)
        .map(|i| if i % 3 == 1 { 128 * 1024 } else { 4096 })
        .collect();
    let slot = 128 * 1024;
    let mut all = Vec::new();
    for (i, &len) in sizes.iter().enumerate() {
        all.extend_from_slice(&write_request(
            i as u64,
            (i * slot) as u64,
            &pattern(i as u8, len),
        ));
    }
    c.send(&all);
    for _ in &sizes {
        let (errno, handle) = c.reply();
        assert_eq!(errno, 0, "write {handle} failed");
    }
    for (i, &len) in sizes.iter().enumerate() {
        let (errno, got) = c.call(CMD_READ, 0, (i * slot) as u64, len as u32, &[]);
        assert_eq!(errno, 0);
        assert!(
            got == pattern(i as u8, len),
            "write {i} ({len} bytes) reads back wrong"
        );
    }
    let small: u64 = sizes.iter().filter(|&&n| n < MIN).map(|&n| n as u64).sum();
    let total: u64 = sizes.iter().map(|&n| n as u64).sum();
    let copied = srv.payload_copied_bytes();
    // Every small payload is copied; of a large one at most what came in
    // the bulk receive with its header (the connection's 64 KiB buffer).
    assert!(
        copied >= small,
        "copied {copied} < the small writes' {small}"
    );
    assert!(
        copied <= small + 16 * netreactor::RECV_BUFFER_BYTES as u64 && copied < total,
        "copied {copied} of {total}: the large writes were not received zero-copy"
    );
    assert_eq!(vol.writes.load(Ordering::Relaxed), sizes.len() as u64);
    assert_eq!(vol.unpooled.load(Ordering::Relaxed), 0);
    srv.shutdown();
}

#[test]
fn an_empty_pool_pushes_back_and_fails_nothing() {
    // Copied (the default threshold) and zero-copy.
    for min in [nbd_target::DEFAULT_ZERO_COPY_RECEIVE_MIN_BYTES, 0] {
        empty_pool_pushes_back(min);
    }
}

fn empty_pool_pushes_back(min: usize) {
    // Four 4 KiB buffers; every write holds its buffer for a while.
    let pool = IoBufPool::new(4 * 4096, 4096);
    let mem = Arc::new(MemVolume::new(BS, BLOCKS).with_pool(pool));
    let vol = PoolChecked::new(mem.clone(), Duration::from_millis(2));
    let srv = serve_zero_copy_from(vol.clone(), min);
    let (mut c, _, _) = Client::go(srv.local_addr());
    pipelined_writes(&mut c, 64, 4096);
    verify(&mut c, 64, 4096);
    assert_eq!(vol.writes.load(Ordering::Relaxed), 64);
    assert_eq!(vol.unpooled.load(Ordering::Relaxed), 0);
    let pool = mem.pool().unwrap();
    assert!(
        pool.misses() > 0,
        "the pool never ran empty: no back-pressure tested"
    );
    // Every buffer is back once the connection is gone (a read's buffer
    // until its send completed).
    srv.shutdown();
    assert_eq!(pool.in_use_bytes(), 0);
}

#[test]
fn large_reads_reach_a_slow_reader_whole() {
    let pool = IoBufPool::new(8 << 20, 1 << 20);
    let mem = Arc::new(MemVolume::new(BS, BLOCKS).with_pool(pool));
    let vol = PoolChecked::new(mem, Duration::ZERO);
    let srv = serve_dyn(vol.clone());
    let (mut c, _, _) = Client::go(srv.local_addr());
    const MIB: usize = 1 << 20;
    for i in 0..4 {
        let (errno, _) = c.call(
            CMD_WRITE,
            0,
            (i * MIB) as u64,
            MIB as u32,
            &pattern(i as u8, MIB),
        );
        assert_eq!(errno, 0);
    }
    // Four 1 MiB reads queued at once; the client takes the replies a few
    // KiB at a time, so the server's sends end short and resume.
    for i in 0..4u64 {
        c.request(CMD_READ, 0, i, i * MIB as u64, MIB as u32, &[]);
    }
    let mut got = Vec::new();
    let mut chunk = vec![0u8; 7000];
    let want = 4 * (16 + MIB);
    while got.len() < want {
        let n =
            c.s.read(&mut chunk[..(want - got.len()).min(7000)])
                .unwrap();
        assert!(n > 0, "connection closed after {} bytes", got.len());
        got.extend_from_slice(&chunk[..n]);
        if got.len() < 256 * 1024 {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    let mut at = 0;
    for _ in 0..4 {
        let h = &got[at..at + 16];
        assert_eq!(
            u32::from_be_bytes(h[0..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        assert_eq!(u32::from_be_bytes(h[4..8].try_into().unwrap()), 0);
        let handle = u64::from_be_bytes(h[8..16].try_into().unwrap()) as usize;
        assert!(
            got[at + 16..at + 16 + MIB] == pattern(handle as u8, MIB),
            "read {handle} differs"
        );
        at += 16 + MIB;
    }
    srv.shutdown();
}
