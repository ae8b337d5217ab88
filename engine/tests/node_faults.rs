//! Disk and ring faults on a real in-process pair: two `Node`s (two
//! reactors, the TCP link on 127.0.0.1) whose disks are in memory behind a
//! fault-injecting backend (`FaultBackend<MemBackend>`). The rings and the
//! metadata are real files in a temporary directory, and every ring flush
//! goes through the node's backend (durable writes, `BackendOp::WriteVecFd`
//! with `dsync`), where the fault backend fails it on demand.
//!
//! Four host writers write blocks of their own, each block once, while the
//! pair is healthy; then one node's disk fails a write, or its ring flush
//! fails. The node that saw the fault must refuse further work (host I/O
//! and `promote`) with an inaccessible path, the other node must serve
//! (the backup after `promote`, the primary on its own, degraded), and
//! every write a writer saw acknowledged must read back from the survivor
//! (a write that failed may have landed or not: its block holds it or
//! zeroes, nothing else). One run is on files (io_uring under the fault
//! backend) so that the failed primary can restart on its disk: it rejoins
//! as the backup and both disks end byte-identical.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use engine::core::Role;
use engine::link::LinkOptions;
use engine::node::{
    default_core_config, format_with_size, FormatFlags, Node, NodeOptions, PollMode,
};
use engine::status::Control;
use storage::backend::{
    create_file_device, FaultBackend, FaultControl, FaultOps, MemBackend, UringBackend, UringConfig,
};
use volume::{submit_wait, IoError, PathState, Volume, VolumeIdentity, VolumeOp};

const BLOCK: u64 = 4096;
const VOLUME_BYTES: u64 = 64 << 20;
const WRITERS: u64 = 4;
/// Blocks each writer owns (a quarter of the volume).
const BLOCKS_PER_WRITER: u64 = VOLUME_BYTES / BLOCK / WRITERS;
/// Writes acknowledged by the healthy pair before the fault.
const BEFORE_FAULT: usize = 200;
/// Writes the surviving primary acknowledges alone after a backup fault.
const AFTER_FAULT: usize = 200;

/// Where the fault hits.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    /// The disk fails every write from now on (EIO).
    DiskWrite,
    /// The ring's flush fails: its durable batch writes fail as a failed
    /// fdatasync of the ring would (`fail_fd_syncs`).
    RingFlush,
    /// The ring's batch write (a vectored write through the backend) fails.
    RingWrite,
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("dm-node-faults-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Two free ports on 127.0.0.1 (node 1 listens on the first).
fn free_ports() -> [u16; 2] {
    let a = TcpListener::bind("127.0.0.1:0").unwrap();
    let b = TcpListener::bind("127.0.0.1:0").unwrap();
    [
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    ]
}

fn opts(dir: &Path, id: u32, ports: [u16; 2]) -> NodeOptions {
    let d = dir.join(format!("node{id}"));
    let me = ports[id as usize - 1];
    let peer = ports[2 - id as usize];
    NodeOptions {
        node_id: id,
        node_name: format!("faults-{id}"),
        data_dir: d.clone(),
        ring_path: d.join("ring"),
        // The disk on files ([`Disks::Files`]); unused on memory.
        volume_path: d.join("volume.img"),
        block_size: BLOCK as u32,
        keep_volume_space: false,
        identity: VolumeIdentity {
            uuid: *b"deltamirror-flts",
            serial: "FAULTS".into(),
            model: "test".into(),
            node_index: id as u16,
        },
        core: default_core_config(id),
        link: LinkOptions {
            node_id: id,
            listen: format!("127.0.0.1:{me}").parse().unwrap(),
            peer: format!("127.0.0.1:{peer}").parse().unwrap(),
            psk: b"node-faults-test-key-0123456789ab".to_vec(),
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

fn wait(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The data of writer `w`'s write to `block`: recognisable per block.
fn data_of(block: u64) -> Vec<u8> {
    let mut d = vec![(block % 251) as u8 + 1; BLOCK as usize];
    d[..8].copy_from_slice(&block.to_le_bytes());
    d
}

/// What the writers did: acknowledged blocks, blocks whose write failed,
/// and the errors they saw.
#[derive(Default)]
struct Record {
    acked: Vec<u64>,
    failed: Vec<u64>,
    errors: HashMap<String, u64>,
}

/// Host writers that each write their blocks in order, one at a time,
/// until told to stop or refused.
struct Writers {
    stop: Arc<AtomicBool>,
    record: Arc<Mutex<Record>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Writers {
    fn start(vol: Arc<dyn Volume>) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let record = Arc::new(Mutex::new(Record::default()));
        let threads = (0..WRITERS)
            .map(|w| {
                let (vol, stop, record) = (vol.clone(), stop.clone(), record.clone());
                std::thread::spawn(move || {
                    for i in 0..BLOCKS_PER_WRITER {
                        if stop.load(Ordering::Acquire) {
                            return;
                        }
                        let block = w * BLOCKS_PER_WRITER + i;
                        let r = submit_wait(
                            &*vol,
                            VolumeOp::Write {
                                offset: block * BLOCK,
                                data: data_of(block).into(),
                                fua: false,
                            },
                        );
                        let mut rec = record.lock().unwrap();
                        match r {
                            Ok(_) => rec.acked.push(block),
                            Err(e) => {
                                rec.failed.push(block);
                                *rec.errors.entry(format!("{e:?}")).or_default() += 1;
                                return;
                            }
                        }
                    }
                })
            })
            .collect();
        Writers {
            stop,
            record,
            threads,
        }
    }

    fn acked(&self) -> usize {
        self.record.lock().unwrap().acked.len()
    }

    fn finish(self) -> Record {
        self.stop.store(true, Ordering::Release);
        for t in self.threads {
            t.join().unwrap();
        }
        Arc::try_unwrap(self.record)
            .ok()
            .unwrap()
            .into_inner()
            .unwrap()
    }
}

/// What the nodes' disks are, under the fault backend.
#[derive(Clone, Copy, PartialEq)]
enum Disks {
    /// `MemBackend`: gone when the node stops.
    Memory,
    /// `UringBackend` on a file per node: a node can restart on it.
    Files,
}

struct Pair {
    nodes: Vec<Node>,
    faults: Vec<Arc<FaultControl>>,
    opts: Vec<NodeOptions>,
    _dir: TempDir,
}

fn start_pair(name: &str, disks: Disks) -> Pair {
    let dir = TempDir::new(name);
    let ports = free_ports();
    let mut nodes = Vec::new();
    let mut faults = Vec::new();
    let mut all_opts = Vec::new();
    for id in 1..=2u32 {
        let o = opts(&dir.0, id, ports);
        let role = if id == 1 { Role::Primary } else { Role::Backup };
        format_with_size(&o, VOLUME_BYTES, 16 << 20, role, FormatFlags::default()).unwrap();
        let ctl = FaultControl::new();
        let node = match disks {
            Disks::Memory => {
                let disk = MemBackend::new(VOLUME_BYTES, BLOCK as u32, 128);
                Node::start_on(o.clone(), FaultBackend::new(disk, ctl.clone()))
            }
            Disks::Files => {
                create_file_device(&o.volume_path, VOLUME_BYTES).unwrap();
                let disk = UringBackend::open(&o.volume_path, &UringConfig::default()).unwrap();
                Node::start_on(o.clone(), FaultBackend::new(disk, ctl.clone()))
            }
        };
        nodes.push(node.unwrap());
        faults.push(ctl);
        all_opts.push(o);
    }
    let p = Pair {
        nodes,
        faults,
        opts: all_opts,
        _dir: dir,
    };
    wait("the pair to connect and node 1 to serve", 30, || {
        let s = p.nodes[0].control.status();
        s.peer_state == "connected" && s.serving
    });
    p
}

fn arm(ctl: &FaultControl, fault: Fault) {
    match fault {
        Fault::DiskWrite => {
            ctl.set_ops(FaultOps::WritesOnly);
            ctl.fail_after(0);
        }
        Fault::RingFlush => ctl.fail_fd_syncs(true),
        Fault::RingWrite => ctl.fail_fd_writes(true),
    }
}

/// What the failed node says about itself.
fn failed_reason(fault: Fault) -> &'static str {
    match fault {
        Fault::DiskWrite => "disk write error",
        Fault::RingFlush | Fault::RingWrite => "the ring failed",
    }
}

/// The node refuses further work: not serving (for the fault's reason),
/// path inaccessible, host reads and writes refused, promote refused.
fn check_refuses_work(n: &Node, fault: Fault) {
    let s = n.control.status();
    assert!(!s.serving, "a failed node serves");
    let reason = s.not_serving_reason.unwrap_or_default();
    assert!(
        reason.contains("failed") && reason.contains(failed_reason(fault)),
        "not serving for another reason: {reason}"
    );
    assert_eq!(n.volume.path_state(), PathState::Inaccessible);
    let w = submit_wait(
        &*n.volume,
        VolumeOp::Write {
            offset: 0,
            data: vec![0xee; BLOCK as usize].into(),
            fua: false,
        },
    );
    assert_eq!(
        w.err(),
        Some(IoError::Unavailable),
        "a write after the fault"
    );
    let r = submit_wait(
        &*n.volume,
        VolumeOp::Read {
            offset: 0,
            len: BLOCK as u32,
        },
    );
    assert_eq!(
        r.err(),
        Some(IoError::Unavailable),
        "a read after the fault"
    );
    let e = n.control.promote(false).unwrap_err();
    assert!(e.contains("failed"), "promote of a failed node: {e}");
}

/// Reads the whole written area from `vol`: every acknowledged block holds
/// its data, every failed one its data or zeroes, every other one zeroes.
fn check_nothing_acknowledged_lost(vol: &dyn Volume, rec: &Record) {
    let mut want: HashMap<u64, bool> = HashMap::new();
    for &b in &rec.acked {
        want.insert(b, true);
    }
    for &b in &rec.failed {
        want.insert(b, false);
    }
    let chunk = 256u64; // blocks per read (1 MiB)
    let zero = vec![0u8; BLOCK as usize];
    let (mut acked_ok, mut failed_landed) = (0, 0);
    for first in (0..VOLUME_BYTES / BLOCK).step_by(chunk as usize) {
        let d = submit_wait(
            vol,
            VolumeOp::Read {
                offset: first * BLOCK,
                len: (chunk * BLOCK) as u32,
            },
        )
        .expect("read from the survivor");
        for i in 0..chunk {
            let b = first + i;
            let got = &d[(i * BLOCK) as usize..((i + 1) * BLOCK) as usize];
            match want.get(&b) {
                Some(true) => {
                    assert_eq!(got, &data_of(b)[..], "acknowledged block {b} lost");
                    acked_ok += 1;
                }
                Some(false) => {
                    if got == &data_of(b)[..] {
                        failed_landed += 1;
                    } else {
                        assert_eq!(got, &zero[..], "failed block {b} holds other data");
                    }
                }
                None => assert_eq!(got, &zero[..], "block {b} was never written"),
            }
        }
    }
    assert_eq!(acked_ok, rec.acked.len());
    println!(
        "{} acknowledged writes read back; {} of {} failed writes landed; errors {:?}",
        acked_ok,
        failed_landed,
        rec.failed.len(),
        rec.errors
    );
}

/// The primary (node 1) fails: it refuses further work, node 2 takes over
/// on `promote` and holds every acknowledged write.
fn primary_fault(name: &str, fault: Fault) {
    primary_fault_on(&start_pair(name, Disks::Memory), fault);
}

/// [`primary_fault`] on a running pair; returns what the writers saw.
fn primary_fault_on(p: &Pair, fault: Fault) -> Record {
    let (n1, n2) = (&p.nodes[0], &p.nodes[1]);
    let writers = Writers::start(n1.volume.clone());
    wait("writes on the healthy pair", 60, || {
        writers.acked() >= BEFORE_FAULT
    });
    arm(&p.faults[0], fault);
    wait("node 1 to fail", 30, || {
        n1.control.status().not_serving_reason.is_some()
    });
    let rec = writers.finish();
    assert!(p.faults[0].injected() > 0, "no fault was injected");
    assert!(rec.acked.len() >= BEFORE_FAULT);
    assert!(!rec.failed.is_empty(), "no write failed after the fault");
    if fault == Fault::DiskWrite {
        // The write whose execution failed reports the disk's errno.
        assert!(
            rec.errors
                .contains_key(&format!("{:?}", IoError::Io(libc::EIO))),
            "no writer saw the EIO: {:?}",
            rec.errors
        );
    }
    check_refuses_work(n1, fault);
    // The operator promotes the backup; it may not have seen its peer go
    // yet (it then says so), so the operator tries again.
    let mut refusals = Vec::new();
    wait("promote of node 2 to be accepted", 30, || {
        match n2.control.promote(false) {
            Ok(()) => true,
            Err(e) => {
                refusals.push(e);
                false
            }
        }
    });
    wait("node 2 to serve", 30, || {
        n2.control.status().serving && n2.volume.path_state() == PathState::Optimized
    });
    println!(
        "promote refused {} times first: {refusals:?}",
        refusals.len()
    );
    check_nothing_acknowledged_lost(&*n2.volume, &rec);
    // Node 2 takes new writes.
    let w = submit_wait(
        &*n2.volume,
        VolumeOp::Write {
            offset: VOLUME_BYTES - BLOCK,
            data: vec![0x5a; BLOCK as usize].into(),
            fua: false,
        },
    );
    assert!(w.is_ok(), "node 2 refused a write after taking over: {w:?}");
    check_refuses_work(n1, fault);
    rec
}

/// The backup (node 2) fails: it refuses further work, node 1 goes on
/// alone (degraded), and holds every acknowledged write.
fn backup_fault(name: &str, fault: Fault) {
    let p = start_pair(name, Disks::Memory);
    let (n1, n2) = (&p.nodes[0], &p.nodes[1]);
    let writers = Writers::start(n1.volume.clone());
    wait("writes on the healthy pair", 60, || {
        writers.acked() >= BEFORE_FAULT
    });
    arm(&p.faults[1], fault);
    wait("node 2 to fail", 30, || {
        n2.control
            .status()
            .not_serving_reason
            .is_some_and(|r| r.contains(failed_reason(fault)))
    });
    let at_fault = writers.acked();
    wait("node 1 to go on alone", 60, || {
        let s = n1.control.status();
        s.degraded && s.serving && writers.acked() >= at_fault + AFTER_FAULT
    });
    let rec = writers.finish();
    assert!(p.faults[1].injected() > 0, "no fault was injected");
    assert!(
        rec.failed.is_empty(),
        "the primary failed host writes when its backup failed: {:?}",
        rec.errors
    );
    check_refuses_work(n2, fault);
    assert_eq!(n1.volume.path_state(), PathState::Optimized);
    check_nothing_acknowledged_lost(&*n1.volume, &rec);
}

/// After a disk EIO on the primary and the backup's promotion, the
/// operator restarts the failed node on its (fixed) disk: it rejoins as
/// the backup, catches up, and both disks end byte-identical.
#[test]
fn failed_primary_rejoins_as_backup_after_a_restart() {
    let mut p = start_pair("rejoin", Disks::Files);
    let rec = primary_fault_on(&p, Fault::DiskWrite);
    p.nodes.remove(0).shutdown();
    let n1 = Node::start(p.opts[0].clone()).unwrap();
    let n2 = &p.nodes[0];
    // Writes while node 1 catches up, so the replay has company.
    for b in 0..64 {
        let block = VOLUME_BYTES / BLOCK - 2 - b;
        let w = submit_wait(
            &*n2.volume,
            VolumeOp::Write {
                offset: block * BLOCK,
                data: data_of(block).into(),
                fua: false,
            },
        );
        assert!(w.is_ok(), "node 2 refused a write: {w:?}");
    }
    wait("node 1 to rejoin as backup and catch up", 60, || {
        let (s1, s2) = (n1.control.status(), n2.control.status());
        s1.role == "backup"
            && s2.peer_state == "connected"
            && s2.ack2_seq == s2.head_seq
            && s1.executed_seq == s2.head_seq
    });
    assert_eq!(n2.control.status().role, "primary");
    let e = n1.control.promote(false).unwrap_err();
    assert!(e.contains("demote it first"), "promote of the backup: {e}");
    n1.shutdown();
    p.nodes.remove(0).shutdown();
    let a = std::fs::read(&p.opts[0].volume_path).unwrap();
    let b = std::fs::read(&p.opts[1].volume_path).unwrap();
    let first_difference = a.iter().zip(&b).position(|(x, y)| x != y);
    assert_eq!(first_difference, None, "the disks differ");
    for &block in &rec.acked {
        let at = (block * BLOCK) as usize;
        assert_eq!(&a[at..at + BLOCK as usize], &data_of(block)[..]);
    }
}

/// A healthy pair on files (io_uring, the pools registered): writes whose
/// payloads come from the primary's pool (`Volume::alloc_buf`) reach both
/// disks. The backup copies each payload exactly once from the link, the
/// primary never from the link; every disk write that copied nothing was
/// a fixed-buffer write; and once the ring hands its buffers out
/// (`Log::payload_buf`), neither node copies anything more than that.
#[test]
fn payload_copies_on_a_mirrored_pair() {
    let p = start_pair("copies", Disks::Files);
    let vol = &p.nodes[0].volume;
    const WRITES: u64 = 256;
    for block in 0..WRITES {
        let mut buf = vol.alloc_buf(BLOCK as usize).expect("the pool has room");
        assert!(buf.is_pooled(), "alloc_buf gave a heap buffer");
        buf.copy_from_slice(&data_of(block));
        let w = submit_wait(
            &**vol,
            VolumeOp::Write {
                offset: block * BLOCK,
                data: buf,
                fua: false,
            },
        );
        assert!(w.is_ok(), "write {block}: {w:?}");
    }
    // Each status is one snapshot (published every 100 ms): counters and
    // watermarks agree within it. Wait for one of the primary's that has
    // every write, then for both nodes to have executed its head.
    wait("both nodes to execute every write", 30, || {
        let s1 = p.nodes[0].control.status();
        s1.io.writes >= WRITES
            && p.nodes
                .iter()
                .all(|n| n.control.status().executed_seq >= s1.head_seq)
    });
    let (s1, s2) = (p.nodes[0].control.status(), p.nodes[1].control.status());
    let written = WRITES * BLOCK;
    for (who, s) in [("primary", &s1), ("backup", &s2)] {
        let b = &s.buffers;
        eprintln!("{who}: {b:?}");
        assert!(b.pool_registered, "{who}: pool not registered");
        // The pool rounds its classes down to whole buffers.
        let want = p.opts[0].buffer_pool_bytes as u64;
        assert!(b.pool_bytes > want * 9 / 10 && b.pool_bytes <= want);
        assert_eq!(
            b.payload_copy_bytes,
            b.link_receive_copy_bytes + b.execute_copy_bytes + b.link_send_copy_bytes
        );
        // Each write's execute either copied its payload or wrote the
        // pool buffer as a fixed buffer.
        assert!(
            b.execute_copy_bytes / BLOCK + b.fixed_disk_ops >= WRITES,
            "{who}: {b:?}"
        );
        assert!(b.execute_copy_bytes <= written, "{who}: {b:?}");
    }
    // Each node reports its reactor thread's time: busy with these writes
    // (the backup's with their REQs), idle before and after them.
    for (i, s) in [&s1, &s2].into_iter().enumerate() {
        let r = &s.reactors;
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r[0].thread, format!("dm-reactor-{}", i + 1));
        assert!(r[0].busy_us > 0 && r[0].idle_us > 0, "{r:?}");
    }
    let (b1, b2) = (&s1.buffers, &s2.buffers);
    assert_eq!(b1.link_receive_copy_bytes, 0);
    assert_eq!(
        b2.link_receive_copy_bytes, written,
        "one link copy per byte"
    );
    assert_eq!(b2.link_send_copy_bytes, 0, "the backup sends no REQs");
    assert!(b1.link_send_copy_bytes <= written);
    if b1.execute_copy_bytes == 0 && b1.link_send_copy_bytes == 0 {
        // The ring kept the buffers: no copy at all on the primary beyond
        // the front-end's socket receive, one on the backup.
        assert_eq!(b2.payload_copy_bytes, written);
    }
    drop(s1);
    let mut nodes = p.nodes;
    nodes.pop().unwrap().shutdown();
    nodes.pop().unwrap().shutdown();
    let a = std::fs::read(&p.opts[0].volume_path).unwrap();
    let b = std::fs::read(&p.opts[1].volume_path).unwrap();
    for block in 0..WRITES {
        let at = (block * BLOCK) as usize;
        assert_eq!(&a[at..at + BLOCK as usize], &data_of(block)[..], "primary");
        assert_eq!(&b[at..at + BLOCK as usize], &data_of(block)[..], "backup");
    }
}

#[test]
fn disk_eio_on_the_primary() {
    primary_fault("eio-primary", Fault::DiskWrite);
}

#[test]
fn disk_eio_on_the_backup() {
    backup_fault("eio-backup", Fault::DiskWrite);
}

#[test]
fn ring_flush_failure_on_the_primary() {
    primary_fault("flush-primary", Fault::RingFlush);
}

#[test]
fn ring_flush_failure_on_the_backup() {
    backup_fault("flush-backup", Fault::RingFlush);
}

#[test]
fn ring_write_failure_on_the_primary() {
    primary_fault("ringwrite-primary", Fault::RingWrite);
}

#[test]
fn ring_write_failure_on_the_backup() {
    backup_fault("ringwrite-backup", Fault::RingWrite);
}

/// The standalone node runs on any backend too: a disk EIO reaches the
/// host as that errno, and the node goes on serving (it has no peer to
/// hand over to, and no ring to keep consistent).
#[test]
fn disk_eio_on_a_standalone_node() {
    let dir = TempDir::new("standalone");
    let o = opts(&dir.0, 1, free_ports());
    let ctl = FaultControl::new();
    let disk = FaultBackend::new(
        MemBackend::new(VOLUME_BYTES, BLOCK as u32, 128),
        ctl.clone(),
    );
    let n = Node::start_standalone_on(o, disk).unwrap();
    wait("the standalone node to serve", 30, || {
        n.volume.path_state() == PathState::Optimized
    });
    let write = |block: u64| {
        submit_wait(
            &*n.volume,
            VolumeOp::Write {
                offset: block * BLOCK,
                data: data_of(block).into(),
                fua: false,
            },
        )
    };
    assert!(write(1).is_ok());
    ctl.set_ops(FaultOps::WritesOnly);
    ctl.fail_after(0);
    assert_eq!(write(2).err(), Some(IoError::Io(libc::EIO)));
    ctl.clear();
    let read = |block: u64| {
        submit_wait(
            &*n.volume,
            VolumeOp::Read {
                offset: block * BLOCK,
                len: BLOCK as u32,
            },
        )
        .unwrap()
    };
    assert_eq!(read(1), data_of(1).into());
    assert_eq!(
        read(2),
        vec![0; BLOCK as usize].into(),
        "the failed write landed"
    );
    assert_eq!(ctl.injected(), 1);
}
