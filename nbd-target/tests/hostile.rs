//! A slow connection (one byte of a request per second) and a hostile one
//! (garbage after the handshake) on the same reactor as eight connections
//! running QD32 writes: the eight keep going, the garbage one is closed,
//! the slow one stays open and unanswered. The IOPS of the eight with and
//! without the two are printed (`--nocapture`); only structural facts are
//! asserted, never timings.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use nbd_target::proto::*;
use volume::MemVolume;

const BS: u32 = 4096;
const BLOCKS: u64 = 8192;
const QD: u64 = 32;

fn write_req(handle: u64, offset: u64) -> Vec<u8> {
    let mut m = Vec::with_capacity(28 + BS as usize);
    m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    m.extend_from_slice(&0u16.to_be_bytes());
    m.extend_from_slice(&CMD_WRITE.to_be_bytes());
    m.extend_from_slice(&handle.to_be_bytes());
    m.extend_from_slice(&offset.to_be_bytes());
    m.extend_from_slice(&BS.to_be_bytes());
    m.resize(28 + BS as usize, handle as u8);
    m
}

/// QD32 4 KiB writes on one connection for `secs`; returns completions.
fn qd32(addr: SocketAddr, secs: f64, seed: u64) -> u64 {
    let (mut c, _, _) = Client::go(addr);
    let mut next = seed;
    let mut offset = move || {
        next = next
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (next >> 33) % BLOCKS * BS as u64
    };
    for h in 0..QD {
        c.send(&write_req(h, offset()));
    }
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let (mut done, mut sent) = (0u64, QD);
    while done < sent {
        let (errno, handle) = c.reply();
        assert_eq!(errno, 0);
        done += 1;
        if Instant::now() < end {
            c.send(&write_req(handle, offset()));
            sent += 1;
        }
    }
    done
}

/// Eight QD32 connections at once; total IOPS.
fn eight(addr: SocketAddr, secs: f64) -> f64 {
    let t = Instant::now();
    let hs: Vec<_> = (0..8)
        .map(|i| thread::spawn(move || qd32(addr, secs, i + 1)))
        .collect();
    let n: u64 = hs.into_iter().map(|h| h.join().unwrap()).sum();
    n as f64 / t.elapsed().as_secs_f64()
}

#[test]
fn slow_and_garbage_connections_do_not_stop_the_others() {
    let vol = Arc::new(MemVolume::new(BS, BLOCKS));
    let srv = serve_with(vol, 32);
    let addr = srv.local_addr();
    let secs = 2.0;
    let alone = eight(addr, secs);

    let stop = Arc::new(AtomicBool::new(false));
    // One byte of a valid write request per second.
    let (slow, _, _) = Client::go(addr);
    let slow_sent = Arc::new(AtomicU64::new(0));
    let slow_t = {
        let (stop, sent) = (stop.clone(), slow_sent.clone());
        let mut s: TcpStream = slow.s.try_clone().unwrap();
        thread::spawn(move || {
            let req = write_req(7, 0);
            for b in req.iter() {
                if stop.load(Ordering::Acquire) {
                    break;
                }
                s.write_all(std::slice::from_ref(b)).unwrap();
                sent.fetch_add(1, Ordering::Relaxed);
                thread::sleep(Duration::from_secs(1));
            }
        })
    };
    // Garbage after the handshake, again and again: each is closed.
    let garbage_closed = Arc::new(AtomicU64::new(0));
    let garbage_t = {
        let (stop, closed) = (stop.clone(), garbage_closed.clone());
        thread::spawn(move || {
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            while !stop.load(Ordering::Acquire) {
                let (mut c, _, _) = Client::go(addr);
                let junk: Vec<u8> = (0..4096)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect();
                let _ = c.s.write_all(&junk);
                let mut b = [0u8; 64];
                // A bad magic closes the connection without a reply.
                if matches!(c.s.read(&mut b), Ok(0) | Err(_)) {
                    closed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let with_bad = eight(addr, secs);
    stop.store(true, Ordering::Release);
    garbage_t.join().unwrap();

    // The slow connection is still open and got no reply: its request is
    // not complete.
    let mut slow = slow;
    slow.s
        .set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut b = [0u8; 1];
    let r = slow.s.read(&mut b);
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the slow connection was answered or closed: {r:?}"
    );
    assert!(slow_sent.load(Ordering::Relaxed) >= 2);
    assert!(garbage_closed.load(Ordering::Relaxed) >= 1);
    println!(
        "eight QD32 4 KiB write connections: {alone:.0} IOPS alone, {with_bad:.0} IOPS \
         next to a slow and a garbage connection ({:.2}x); garbage connections closed: {}",
        with_bad / alone,
        garbage_closed.load(Ordering::Relaxed)
    );
    drop(slow);
    slow_t.join().unwrap();
    srv.shutdown();
}

/// Counts the reads a connection submits, then passes them on.
struct CountingVolume {
    inner: Arc<MemVolume>,
    reads: AtomicU64,
}

impl volume::Wrapper for CountingVolume {
    fn inner(&self) -> &dyn volume::Volume {
        &*self.inner
    }
    fn take(&self, op: volume::VolumeOp, done: volume::Completion) {
        if matches!(op, volume::VolumeOp::Read { .. }) {
            self.reads.fetch_add(1, Ordering::Relaxed);
        }
        volume::Volume::submit(&*self.inner, op, done);
    }
}

/// A client that sends reads and never reads the replies is pushed back:
/// the connection stops taking its requests once 8 MiB of replies wait
/// (the rest wait in the socket), instead of queueing 500 MiB of replies in
/// the node's memory; once the client reads, every request is answered, in
/// order, whole.
#[test]
fn a_client_that_never_reads_is_pushed_back() {
    const READS: u64 = 2000;
    const LEN: u32 = 256 * 1024;
    let vol = Arc::new(CountingVolume {
        inner: Arc::new(MemVolume::new(BS, BLOCKS)),
        reads: AtomicU64::new(0),
    });
    let srv = serve_dyn(vol.clone());
    let (mut c, _, _) = Client::go(srv.local_addr());
    for h in 0..READS {
        c.request(CMD_READ, 0, h, 0, LEN, &[]);
    }
    // Wait until the connection stops taking requests (the count holds
    // still for half a second) or has taken them all.
    let mut last = u64::MAX;
    let mut still_since = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n = vol.reads.load(Ordering::Relaxed);
        if n == READS || Instant::now() > deadline {
            break;
        }
        if n != last {
            last = n;
            still_since = Instant::now();
        } else if still_since.elapsed() > Duration::from_millis(500) {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let taken = vol.reads.load(Ordering::Relaxed);
    println!("reads submitted while the client did not read: {taken} of {READS}");
    assert!(
        taken < READS / 4,
        "{taken} of {READS} reads taken (the replies of all would be 500 MiB)"
    );
    for h in 0..READS {
        let (errno, handle) = c.reply();
        assert_eq!((errno, handle), (0, h));
        assert_eq!(c.bytes(LEN as usize).len(), LEN as usize);
    }
    assert_eq!(vol.reads.load(Ordering::Relaxed), READS);
}
