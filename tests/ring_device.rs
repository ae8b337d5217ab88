//! The ring on a raw block device (`ring.path` naming a loop device), with
//! the real binary: `deltamirror format` refuses a device that holds a
//! filesystem or another ring unless told, and a mirrored node whose ring is
//! on a device recovers it after kill -9 with every acknowledged write.
//!
//! Needs root and the loop driver (skipped, testskip, only where losetup or
//! /dev/loop-control is missing) and mkfs.ext4 for the filesystem case.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use common::{block_of, images_identical, nbd_writer, need, oracle_block, u, Pair, EXE};
use testskip::LoopDevice;

/// The tests share the machine's two cores: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// A scratch directory for loop devices' backing files, removed on drop
/// (after the devices, which are declared after it).
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!(
            "dm-test-ringdev-{name}-backing-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    /// A loop device over a new sparse file of `bytes`.
    fn device(&self, file: &str, bytes: u64) -> Option<LoopDevice> {
        let backing = self.0.join(file);
        std::fs::File::create(&backing)
            .unwrap()
            .set_len(bytes)
            .unwrap();
        LoopDevice::attach(&backing, 512)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `example-config` for node `id` in `dir`, its ring on `dev` with
/// `ring_bytes`, written to `dir/node{id}.toml`.
fn config(dir: &Path, id: u32, dev: &Path, ring_bytes: u64) -> PathBuf {
    let out = Command::new(EXE)
        .args(["example-config", "--node", &id.to_string(), "--dir"])
        .arg(dir)
        .args(["--port-offset", "4310"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let toml = String::from_utf8(out.stdout).unwrap().replace(
        "[ring]\nsize_bytes = 67108864",
        &format!("[ring]\nsize_bytes = {ring_bytes}\npath = {dev:?}"),
    );
    assert!(toml.contains(&format!("path = {dev:?}")), "{toml}");
    let cfg = dir.join(format!("node{id}.toml"));
    std::fs::write(&cfg, toml).unwrap();
    cfg
}

/// `deltamirror format --config CFG FLAGS`: success and stderr.
fn format(cfg: &Path, flags: &[&str]) -> (bool, String) {
    let out = Command::new(EXE)
        .args(["format", "--config"])
        .arg(cfg)
        .args(flags)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn format_refuses_a_ring_device_holding_a_filesystem_or_a_ring_unless_told() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !need(&["mkfs.ext4"]) {
        return;
    }
    let scratch = Scratch::new("format");
    let Some(dev) = scratch.device("ring", 32 << 20) else {
        return;
    };
    let shown = dev.path().display().to_string();
    let dir = common::fresh_dir("ringdev-format");
    let cfg1 = config(&dir, 1, dev.path(), 16 << 20);
    let ok = Command::new("mkfs.ext4")
        .arg("-q")
        .arg(dev.path())
        .status()
        .unwrap()
        .success();
    assert!(ok, "mkfs.ext4 {shown}");
    // A filesystem: refused, naming the device, what it holds and the flag;
    // --force (erase this node's state) is not enough.
    for flags in [&[][..], &["--force"][..]] {
        let (ok, err) = format(&cfg1, flags);
        assert!(!ok, "format {flags:?} wrote over ext4");
        for part in [
            shown.as_str(),
            "an ext2/ext3/ext4 filesystem",
            "--force-ring-device",
        ] {
            assert!(err.contains(part), "{part:?} missing in: {err}");
        }
    }
    assert!(
        !dir.join("node1").join("meta").exists(),
        "a refused format leaves no node behind"
    );
    // Accepted with the flag: the device then holds a ring.
    let (ok, err) = format(&cfg1, &["--force-ring-device"]);
    assert!(ok, "format --force-ring-device: {err}");
    assert!(!dir.join("node1").join("ring").exists(), "no ring file");
    let (ring, rec) = storage::Ring::open(dev.path()).expect("a ring on the device");
    assert_eq!((ring.capacity_bytes(), rec.records), (16 << 20, 0));
    drop(ring);
    // Another node's format onto that device: refused, naming the ring and
    // --force.
    let cfg2 = config(&dir, 2, dev.path(), 16 << 20);
    let (ok, err) = format(&cfg2, &[]);
    assert!(!ok, "format of node 2 wrote over node 1's ring");
    for part in [
        shown.as_str(),
        "already holds a deltamirror ring",
        "--force",
    ] {
        assert!(err.contains(part), "{part:?} missing in: {err}");
    }
    // Node 1 formatted again: its data directory says so first; --force
    // erases its state and the ring on the device.
    let (ok, err) = format(&cfg1, &[]);
    assert!(!ok && err.contains("already formatted"), "{err}");
    let (ok, err) = format(&cfg1, &["--force"]);
    assert!(ok, "format --force over this node's own ring: {err}");
    drop(dev);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A few tens of seconds: node 1 (primary) keeps its ring on a loop device;
/// it is killed under mirrored writes, restarts, recovers the ring from the
/// device and holds every write that was acknowledged, as does its backup.
#[test]
fn a_node_with_its_ring_on_a_device_recovers_it_after_kill_9() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = Scratch::new("pair");
    // The default 64 MiB ring and its header slots, with room to spare.
    let Some(dev) = scratch.device("ring1", 72 << 20) else {
        return;
    };
    let ring_dev = dev.path().to_path_buf();
    let mut p = Pair::new("ringdev", 4300, |id, t| {
        if id == 1 {
            t.replace("[ring]", &format!("[ring]\npath = {ring_dev:?}"))
        } else {
            t
        }
    });
    assert!(
        !p.dir.join("node1").join("ring").exists(),
        "ring on the device"
    );
    p.start(0);
    p.start(1);
    p.wait(0, "connected", 30, |s| {
        s["peer_state"] == "connected" && s["role"] == "primary"
    });
    // Mirrored writes (4 in flight); node 1 dies once 300 are acknowledged.
    let (stop, acks) = (AtomicBool::new(false), AtomicU64::new(0));
    let nbd = p.n[0].nbd.clone();
    let written = std::thread::scope(|sc| {
        let writer = sc.spawn(|| nbd_writer(&nbd, 9, 1000, 50_000, 4, &stop, &acks));
        while acks.load(Ordering::Acquire) < 300 && !writer.is_finished() {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        p.kill9(0);
        stop.store(true, Ordering::Release);
        writer.join().unwrap()
    });
    assert!(
        written.acked.len() >= 300,
        "{} acknowledged",
        written.acked.len()
    );
    assert_eq!(written.errors, 0);
    // The device stays held while the process lives; its death frees it.
    p.start(0);
    let s = p.wait(0, "back as primary with its backup", 30, |s| {
        s["role"] == "primary"
            && s["peer_state"] == "connected"
            && s["degraded"] == false
            && s["executed_seq"] == s["head_seq"]
            && s["ack2_seq"] == s["head_seq"]
    });
    let head = u(&s, "head_seq");
    p.wait(1, "backup executed the head", 30, |b| {
        b["executed_seq"].as_u64() >= Some(head)
    });
    let log = std::fs::read_to_string(&p.n[0].log).unwrap();
    let recovered = log
        .lines()
        .rev()
        .find(|l| l.contains("ring recovered:"))
        .expect("a ring recovered line");
    assert!(
        recovered.contains(&format!(
            "{}: block device of 75497472 bytes",
            dev.path().display()
        )),
        "{recovered}"
    );
    // Every acknowledged write is on node 1's disk, and the disks agree.
    for &blk in &written.acked {
        assert!(
            block_of(&p.n[0].volume, blk) == oracle_block(9, blk),
            "acknowledged write to block {blk} lost on node 1"
        );
    }
    assert!(
        images_identical(&p.n[0].volume, &p.n[1].volume),
        "images differ"
    );
    println!(
        "{} writes acknowledged before the kill; {recovered}",
        written.acked.len()
    );
    drop(p);
    drop(dev);
}
