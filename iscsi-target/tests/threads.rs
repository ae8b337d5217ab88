//! A target's thread count does not grow with its connections: after the
//! login a connection lives on a reactor thread, not its own.
//! (Alone in its test binary, so that no other test's threads count.)

mod common;

use std::time::{Duration, Instant};

use common::*;

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// Waits until no login thread is left (they end once their socket is on
/// a reactor), then counts the process's threads.
fn settle() -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let logging_in = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .any(|comm| comm.starts_with("iscsi-login"));
        if !logging_in {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    threads()
}

#[test]
fn sixty_four_connections_add_no_threads() {
    let (t, _vol) = target(|c| c.max_connections = 100);
    let addr = t.local_addr();
    // One connection first, so that every lazily started thread exists.
    let mut first = Initiator::connect(addr);
    first.login(&[]);
    assert_eq!(first.write10(0, &[1; 512]).status, 0);
    let before = settle();
    let mut conns = Vec::new();
    for i in 0..64u32 {
        let mut c = Initiator::connect(addr);
        // Distinct ISIDs: the same one would reinstate (close) the session.
        c.isid[5] = i as u8 + 2;
        c.login(&[]);
        assert_eq!(c.write10(i + 1, &[i as u8 + 2; 512]).status, 0);
        conns.push(c);
    }
    let after = settle();
    assert_eq!(t.connections(), 65);
    assert!(
        after <= before,
        "65 connections: {after} threads, against {before} with one"
    );
    // Every connection still works.
    for (i, c) in conns.iter_mut().enumerate() {
        let r = c.read10(i as u32 + 1, 1);
        assert_eq!(r.status, 0);
        assert_eq!(r.data, vec![i as u8 + 2; 512]);
    }
    drop(conns);
    drop(first);
    t.shutdown();
}
