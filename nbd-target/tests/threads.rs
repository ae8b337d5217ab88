//! A node's thread count does not grow with its connections: after the
//! handshake a connection lives on a reactor thread, not its own.
//! (Alone in its test binary, so that no other test's threads count.)

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nbd_target::proto::*;
use volume::MemVolume;

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// Waits until no handshake thread is left (they end once their socket is
/// on a reactor), then counts the process's threads.
fn settle() -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let handshaking = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .any(|comm| comm.starts_with("nbd-hs-"));
        if !handshaking {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    threads()
}

#[test]
fn sixty_four_connections_add_no_threads() {
    let vol = Arc::new(MemVolume::new(512, 2048));
    let srv = serve_with(vol, 100);
    let addr: SocketAddr = srv.local_addr();
    // One connection first, so that every lazily started thread exists.
    let (mut first, _, _) = Client::go(addr);
    assert_eq!(first.call(CMD_WRITE, 0, 0, 512, &[1; 512]).0, 0);
    let before = settle();
    let mut clients = Vec::new();
    for i in 0..64u64 {
        let (mut c, _, _) = Client::go(addr);
        let (errno, _) = c.call(CMD_WRITE, 0, (i % 2048) * 512, 512, &[i as u8; 512]);
        assert_eq!(errno, 0);
        clients.push(c);
    }
    let after = settle();
    assert_eq!(srv.connections(), 65);
    assert!(
        after <= before,
        "65 connections: {after} threads, against {before} with one"
    );
    // Every connection still works.
    for (i, c) in clients.iter_mut().enumerate() {
        let (errno, data) = c.call(CMD_READ, 0, (i as u64 % 2048) * 512, 512, &[]);
        assert_eq!(errno, 0);
        assert_eq!(data, vec![i as u8; 512]);
    }
    drop(clients);
    drop(first);
    srv.shutdown();
}
