//! The replay rate floor, end to end on a real in-process pair (two
//! reactors, io_uring on files, TCP on 127.0.0.1).
//!
//! Node 2 misses 20,000 writes (80 MiB); node 1 replays them to it with a
//! ceiling of 16 MiB/s, so the replay lasts about five seconds. A host write
//! made two seconds into the replay then either completes while the replay
//! is still running (no floor) or waits for it (a floor above the ceiling,
//! which the replay can never reach: host writes must wait). The test checks
//! the order of events, not how long anything took.

use std::path::Path;
use std::time::{Duration, Instant};

use engine::core::Role;
use engine::link::LinkOptions;
use engine::node::{default_core_config, format, FormatFlags, Node, NodeOptions, PollMode};
use engine::status::Control;
use storage::backend::uring::create_file_device;
use volume::{submit_wait, Volume, VolumeIdentity, VolumeOp};

const MIB: u64 = 1 << 20;

fn opts(dir: &Path, id: u32, port: u16, floor: u64) -> NodeOptions {
    let d = dir.join(format!("node{id}"));
    let mut core = default_core_config(id);
    core.max_replay_bytes_per_sec = 16 * MIB;
    core.min_replay_bytes_per_sec = floor;
    NodeOptions {
        node_id: id,
        node_name: format!("floor-{id}"),
        data_dir: d.clone(),
        ring_path: d.join("ring"),
        volume_path: d.join("volume.img"),
        block_size: 4096,
        keep_volume_space: false,
        identity: VolumeIdentity {
            uuid: *b"deltamirror-flor",
            serial: "FLOOR".into(),
            model: "test".into(),
            node_index: id as u16,
        },
        core,
        link: LinkOptions {
            node_id: id,
            listen: format!("127.0.0.1:{}", port + id as u16 - 1)
                .parse()
                .unwrap(),
            peer: format!("127.0.0.1:{}", port + 2 - id as u16)
                .parse()
                .unwrap(),
            psk: b"replay-floor-test-key-0123456789".to_vec(),
            connect_retry_ms: 50,
            handshake_timeout_ms: 2000,
            transport: engine::link::LinkTransport::Tcp,
        },
        core_id: None,
        poll_mode: PollMode::Adaptive,
        adaptive_spin_us: 50,
        disk_submit_hold_us: storage::backend::DEFAULT_SUBMIT_HOLD_US,
        disk_hand_over: Default::default(),
        queue_depth: 128,
        max_io_bytes: 1 << 20,
        max_message_bytes: 8 << 20,
        buffer_pool_bytes: 16 << 20,
    }
}

fn write(vol: &dyn Volume, block: u64, fill: u8) {
    submit_wait(
        vol,
        VolumeOp::Write {
            offset: block * 4096,
            data: vec![fill; 4096].into(),
            fua: false,
        },
    )
    .expect("host write");
}

fn wait(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Returns how many entries node 1 still had to replay when a host write
/// made two seconds into the replay completed (its status lags by up to
/// 100 ms, about 400 entries at 16 MiB/s).
fn replay_left_when_a_write_completed(name: &str, port: u16, floor: u64) -> u64 {
    let dir = std::env::temp_dir().join(format!("dm-floor-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut o = Vec::new();
    for id in 1..=2u32 {
        let x = opts(&dir, id, port, floor);
        std::fs::create_dir_all(&x.data_dir).unwrap();
        create_file_device(&x.volume_path, 256 * MIB).unwrap();
        let role = if id == 1 { Role::Primary } else { Role::Backup };
        // The ring holds the 20,000 writes of the outage (8 KiB a record).
        let force = FormatFlags {
            force: true,
            ..FormatFlags::default()
        };
        format(&x, 256 * MIB, role, force).unwrap();
        o.push(x);
    }
    let n1 = Node::start(o[0].clone()).unwrap();
    let n2 = Node::start(o[1].clone()).unwrap();
    wait("the pair to connect", 30, || {
        n1.control.status().peer_state == "connected"
    });
    n2.shutdown();
    // 80 MiB of writes node 2 misses (the first ones wait for node 1 to
    // declare its peer gone and go degraded).
    for i in 0..20_000u64 {
        write(&*n1.volume, i % 60_000, (i % 251) as u8);
    }
    let n2 = Node::start(o[1].clone()).unwrap();
    wait("the replay to start", 30, || {
        n1.control.status().replay_progress.is_some()
    });
    std::thread::sleep(Duration::from_secs(2));
    write(&*n1.volume, 65_000, 0x5a);
    let s = n1.control.status();
    let left = s
        .replay_progress
        .as_ref()
        .map_or(0, |p| p.remaining_entries);
    println!(
        "{name}: host write completed with {left} of 20000 entries left to replay, progress {:?}",
        s.replay_progress.map(|p| (p.entries, p.remaining_entries))
    );
    wait("the pair to be in sync", 120, || {
        let s = n1.control.status();
        s.peer_state == "connected" && s.ack2_seq == s.head_seq
    });
    let s = n1.control.status();
    let r = s.last_replay.expect("a finished replay");
    assert!(r.entries >= 20_000, "replayed {} entries", r.entries);
    assert_eq!(s.remirrors, 0);
    n1.shutdown();
    n2.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
    left
}

#[test]
fn replay_floor_holds_host_writes_until_the_replay_catches_up() {
    // Without a floor, host writes go on during the replay: two seconds
    // into a five-second replay, more than half of it is still to come.
    let left = replay_left_when_a_write_completed("nofloor", 24600, 0);
    assert!(
        left > 5000,
        "without a floor a host write waited for the replay ({left} entries left)"
    );
    // A floor the (16 MiB/s-capped) replay cannot reach: host writes wait
    // until it is (all but) over.
    let left = replay_left_when_a_write_completed("floor", 24610, 64 * MIB);
    assert!(
        left < 1000,
        "with the floor above the replay rate a host write completed with {left} entries left"
    );
}
