//! A slow connection (one byte of a command PDU per second) and hostile ones
//! (garbage after the login) on the same reactor as eight connections
//! running QD32 writes: the eight keep going, the garbage connections are
//! refused and closed, the slow one stays open and unanswered. The IOPS of
//! the eight with and without the bad ones are printed (`--nocapture`);
//! only structural facts are asserted, never timings.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use iscsi_target::pdu::{self, Pdu};
use volume::MemVolume;

const BS: u32 = 4096;
const BLOCKS: u64 = 8192;
const QD: u32 = 32;

/// A WRITE(10) of one 4 KiB block with its data as immediate data.
fn write_pdu(i: &mut Initiator, lba: u32) -> Pdu {
    let mut cdb = [0u8; 10];
    cdb[0] = 0x2a;
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[7..9].copy_from_slice(&1u16.to_be_bytes());
    let mut p = i.cmd_pdu(&cdb, BS, false, true);
    p.data = vec![lba as u8; BS as usize];
    p
}

fn login(addr: SocketAddr, isid: u8) -> Initiator {
    let mut i = Initiator::connect(addr);
    i.isid[5] = isid;
    i.login(&[]);
    i
}

/// QD32 4 KiB writes on one connection for `secs`; returns completions.
fn qd32(addr: SocketAddr, secs: f64, seed: u64) -> u64 {
    let mut i = login(addr, seed as u8);
    let mut next = seed;
    let mut lba = move || {
        next = next
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((next >> 33) % BLOCKS) as u32
    };
    for _ in 0..QD {
        let mut p = write_pdu(&mut i, lba());
        i.send(&mut p);
    }
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let (mut done, mut sent) = (0u64, QD as u64);
    while done < sent {
        let r = i.recv().expect("a response");
        assert_eq!(r.opcode(), pdu::OP_SCSI_RESP, "unexpected PDU");
        assert_eq!((r.bhs[2], r.bhs[3]), (0, 0), "completed, GOOD");
        i.exp_stat_sn = r.u32_at(24).wrapping_add(1);
        done += 1;
        if Instant::now() < end {
            let mut p = write_pdu(&mut i, lba());
            i.send(&mut p);
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
    let mut cfg = iscsi_target::IscsiConfig::new("127.0.0.1:0".parse().unwrap(), IQN);
    cfg.max_connections = 32;
    let t = iscsi_target::start(cfg, vol).unwrap();
    let addr = t.local_addr();
    let secs = 2.0;
    let alone = eight(addr, secs);

    let stop = Arc::new(AtomicBool::new(false));
    // One byte of a valid write command per second.
    let mut slow = login(addr, 100);
    let slow_sent = Arc::new(AtomicU64::new(0));
    let slow_t = {
        let (stop, sent) = (stop.clone(), slow_sent.clone());
        let bytes = write_pdu(&mut slow, 7).encode(false, false);
        let mut s = slow.s.try_clone().unwrap();
        thread::spawn(move || {
            for b in bytes.iter() {
                if stop.load(Ordering::Acquire) {
                    break;
                }
                s.write_all(std::slice::from_ref(b)).unwrap();
                sent.fetch_add(1, Ordering::Relaxed);
                thread::sleep(Duration::from_secs(1));
            }
        })
    };
    // Garbage after the login, again and again: each is refused.
    let garbage_closed = Arc::new(AtomicU64::new(0));
    let garbage_t = {
        let (stop, closed) = (stop.clone(), garbage_closed.clone());
        thread::spawn(move || {
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            let mut n = 0u8;
            while !stop.load(Ordering::Acquire) {
                n = n.wrapping_add(1);
                let mut c = login(addr, 101u8.wrapping_add(n % 100));
                let junk: Vec<u8> = (0..4096)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect();
                let _ = c.s.write_all(&junk);
                // A header that announces more data than negotiated is
                // rejected and the connection closed (the stream cannot be
                // resynchronised); other garbage is rejected PDU by PDU.
                c.s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut b = [0u8; 4096];
                loop {
                    match c.s.read(&mut b) {
                        Ok(0) => {
                            closed.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        Ok(_) => continue,
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                            closed.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        Err(_) => break,
                    }
                }
            }
        })
    };
    let with_bad = eight(addr, secs);
    stop.store(true, Ordering::Release);
    garbage_t.join().unwrap();

    // The slow connection is still open and got no reply: its command is
    // not complete.
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
    t.shutdown();
}
