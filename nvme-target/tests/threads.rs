//! The target's thread count does not grow with its connections: every
//! queue (connection) lives on a connection reactor. Only the target's own
//! threads (`nvme-*`) are counted; the initiator's are the test's.

mod common;

use common::*;
use std::time::{Duration, Instant};

fn target_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.starts_with("nvme-"))
        .count()
}

#[test]
fn thirty_four_queues_add_no_target_threads() {
    let vol = mem(512, 4096);
    let t = serve(vol);
    let first = connect(&t);
    first.write(0, vec![1; 512], false).unwrap();
    let before = target_threads();
    // Sixteen more controllers: an admin and an I/O queue each.
    let ctrls: Vec<_> = (0..16).map(|_| connect(&t)).collect();
    for (i, c) in ctrls.iter().enumerate() {
        c.write(1 + i as u64, vec![i as u8; 512], false).unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while target_threads() > before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let after = target_threads();
    assert!(
        after <= before,
        "17 controllers: {after} target threads, against {before} with one"
    );
    for (i, c) in ctrls.iter().enumerate() {
        assert_eq!(c.read(1 + i as u64, 1).unwrap(), vec![i as u8; 512]);
    }
    drop(ctrls);
    drop(first);
    t.shutdown();
}
