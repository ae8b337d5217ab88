//! Real NBD clients against the server (qemu-io, nbdinfo, nbdcopy, fio).
//! Each test is skipped, with its reason recorded through testskip (counted
//! by scripts/test.sh), when its tool is absent.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Arc;

use common::*;
use volume::MemVolume;

/// False, with the skip recorded for scripts/test.sh (testskip), when the
/// tool is absent: the caller returns.
fn have(tool: &str) -> bool {
    let found = testskip::on_path(tool);
    if !found {
        testskip::skip(format!(
            "{tool} is not installed (scripts/test.sh installs it; apt-get install qemu-utils libnbd-bin fio)"
        ));
    }
    found
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!(
        "{cmd:?}\nstatus {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    out
}

fn uri(srv: &nbd_target::NbdServer) -> String {
    format!("nbd://127.0.0.1:{}/{EXPORT}", srv.local_addr().port())
}

fn scratch_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nbd-target-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn qemu_io_write_read_patterns() {
    if !have("qemu-io") {
        return;
    }
    let vol = Arc::new(MemVolume::new(512, 16384)); // 8 MiB
    let srv = serve(&vol);
    let u = uri(&srv);
    let out = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        &u,
        "-c",
        "write -P 0xab 0 64k",
        "-c",
        "write -f -P 0xcd 1m 256k",
        "-c",
        "flush",
        "-c",
        "write -z 64k 64k",
        "-c",
        "discard 2m 64k",
    ]));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(!s.contains("fail") && !s.contains("error"), "{s}");
    // A second connection reads back what the first wrote.
    let out = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        &u,
        "-c",
        "read -P 0xab 0 64k",
        "-c",
        "read -P 0xcd 1m 256k",
        "-c",
        "read -P 0 64k 64k",
    ]));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(!s.contains("Pattern verification failed"), "{s}");
    assert_eq!(s.matches("read ").count(), 3, "{s}");
    // A wrong pattern must be noticed (the check above is not vacuous).
    let out = Command::new("qemu-io")
        .args(["-f", "raw", &u, "-c", "read -P 0x11 0 4k"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("Pattern verification failed"));
    srv.shutdown();
}

#[test]
fn nbdinfo_reports_size_and_list() {
    if !have("nbdinfo") {
        return;
    }
    let vol = Arc::new(MemVolume::new(4096, 1000));
    let srv = serve(&vol);
    let out = run(Command::new("nbdinfo").arg(uri(&srv)));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("4096000"), "{s}");
    assert!(s.contains("deltamirror test volume"), "{s}");
    assert!(s.contains("block_size_minimum: 4096"), "{s}");
    let out = run(Command::new("nbdinfo").args(["--list", &uri(&srv)]));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains(EXPORT), "{s}");
    srv.shutdown();
}

#[test]
fn nbdcopy_in_and_out() {
    if !have("nbdcopy") {
        return;
    }
    const SIZE: usize = 8 << 20;
    let vol = Arc::new(MemVolume::new(512, (SIZE / 512) as u64));
    let srv = serve(&vol);
    let dir = scratch_dir("nbdcopy");
    let (src, dst) = (dir.join("in.img"), dir.join("out.img"));
    let mut data = Vec::with_capacity(SIZE);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    while data.len() < SIZE {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    // A zero region exercises nbdcopy's zeroing path.
    data[SIZE / 2..SIZE / 2 + (1 << 20)].fill(0);
    std::fs::write(&src, &data).unwrap();
    run(Command::new("nbdcopy").arg(&src).arg(uri(&srv)));
    run(Command::new("nbdcopy").arg(uri(&srv)).arg(&dst));
    assert!(
        std::fs::read(&dst).unwrap() == data,
        "image differs after nbdcopy round trip"
    );
    let _ = std::fs::remove_dir_all(&dir);
    srv.shutdown();
}

#[test]
fn fio_randwrite_verify_crc32c() {
    if !have("fio") {
        return;
    }
    // Completions on another thread, as with the engine.
    let srv = serve_dyn(AsyncVolume::new(Arc::new(MemVolume::new(512, 65536)))); // 32 MiB
    let out = Command::new("fio")
        .args([
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={}", uri(&srv)),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--size=16m",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--output-format=terse",
        ])
        .output()
        .unwrap();
    let text = format!(
        "status {}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if String::from_utf8_lossy(&out.stderr).contains("engine nbd not loadable") {
        testskip::skip("this fio has no nbd engine (fio built without libnbd)");
        srv.shutdown();
        return;
    }
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("verify:"), "{text}");
    srv.shutdown();
}

#[test]
fn nbdfuse_mkfs_ext4_and_fsck() {
    if !have("nbdfuse") || !have("mkfs.ext4") || !have("e2fsck") {
        return;
    }
    if !std::path::Path::new("/dev/fuse").exists() {
        testskip::skip("no /dev/fuse on this machine");
        return;
    }
    let vol = Arc::new(MemVolume::new(512, 128 * 2048)); // 128 MiB
    let srv = serve(&vol);
    let dir = scratch_dir("nbdfuse");
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mut fuse = Command::new("nbdfuse")
        .arg(&mnt)
        .arg(uri(&srv))
        .spawn()
        .unwrap();
    let dev = mnt.join("nbd");
    let mut ready = false;
    for _ in 0..100 {
        if std::fs::metadata(&dev)
            .map(|m| m.len() == 128 << 20)
            .unwrap_or(false)
        {
            ready = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let result = std::panic::catch_unwind(|| {
        assert!(ready, "nbdfuse did not expose {dev:?}");
        // mkfs discards, zeroes and writes; fsck then reads it all back.
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&dev));
        run(Command::new("e2fsck").args(["-f", "-n"]).arg(&dev));
    });
    let unmounted = Command::new("fusermount3").arg("-u").arg(&mnt).status();
    if !matches!(unmounted, Ok(s) if s.success()) {
        let _ = Command::new("umount").arg(&mnt).status();
    }
    for _ in 0..50 {
        if matches!(fuse.try_wait(), Ok(Some(_))) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    if matches!(fuse.try_wait(), Ok(None)) {
        let _ = fuse.kill();
        let _ = fuse.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
    srv.shutdown();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
