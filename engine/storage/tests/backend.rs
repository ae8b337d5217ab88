//! Backend behaviour: the same conformance checks run against the in-memory
//! and the io_uring backends, plus fault injection.

mod common;

use common::TempDir;
use storage::backend::{
    create_file_device, create_file_device_as, BufPool, FaultBackend, FaultControl, FaultOps,
    HandOver, HandOverPolicy, MemBackend, Preallocate, UringBackend, UringConfig,
};
use storage::{AlignedBuf, Backend, BackendCompletion, BackendOp};
use testskip::LoopDevice;

const DEV_BYTES: u64 = 1 << 20;

/// Submit one op and wait for its completion (sleeping on `wait_fd` when the
/// backend has one, which also checks that the eventfd is signalled).
fn run<B: Backend>(b: &mut B, tag: u64, op: BackendOp) -> BackendCompletion {
    b.submit(tag, op).expect("queue has room");
    b.flush_submissions();
    let mut out = Vec::new();
    loop {
        if b.reap(&mut out) > 0 {
            assert_eq!(out.len(), 1);
            let c = out.pop().unwrap();
            assert_eq!(c.tag, tag);
            return c;
        }
        let fd = b
            .wait_fd()
            .expect("a backend that completes later has a wait fd");
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let rc = unsafe { libc::poll(&mut pfd, 1, 5000) };
        assert_eq!(rc, 1, "completion not signalled on the wait fd within 5 s");
    }
}

fn write<B: Backend>(b: &mut B, offset: u64, data: &[u8], fua: bool) -> Result<u32, i32> {
    let op = BackendOp::Write {
        offset,
        buf: AlignedBuf::from_slice(data),
        fua,
    };
    run(b, 1, op).result
}

fn read<B: Backend>(b: &mut B, offset: u64, len: usize) -> Result<Vec<u8>, i32> {
    let c = run(
        b,
        2,
        BackendOp::Read {
            offset,
            buf: AlignedBuf::new(len),
        },
    );
    c.result.map(|n| {
        assert_eq!(n as usize, len);
        c.buf.expect("read returns its buffer").as_slice().to_vec()
    })
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Checks every backend must pass; the device is DEV_BYTES, block size 4096.
fn conformance<B: Backend>(b: &mut B) {
    assert_eq!(b.size_bytes(), DEV_BYTES);
    assert_eq!(b.block_size(), 4096);

    let a = pattern(8192, 1);
    assert_eq!(write(b, 4096, &a, false), Ok(8192));
    assert_eq!(read(b, 4096, 8192).unwrap(), a);
    let f = pattern(4096, 7);
    assert_eq!(write(b, 0, &f, true), Ok(4096), "FUA write");
    assert_eq!(read(b, 0, 4096).unwrap(), f);
    assert_eq!(run(b, 3, BackendOp::Flush).result, Ok(0));

    // Discard and write-zeroes both read back as zeroes.
    assert_eq!(
        run(
            b,
            4,
            BackendOp::Discard {
                offset: 4096,
                len: 4096
            }
        )
        .result,
        Ok(0)
    );
    assert_eq!(read(b, 4096, 4096).unwrap(), vec![0; 4096]);
    assert_eq!(read(b, 8192, 4096).unwrap(), a[4096..]);
    assert_eq!(
        run(
            b,
            5,
            BackendOp::WriteZeroes {
                offset: 8192,
                len: 4096
            }
        )
        .result,
        Ok(0)
    );
    assert_eq!(read(b, 8192, 4096).unwrap(), vec![0; 4096]);
    assert_eq!(read(b, 0, 4096).unwrap(), f);

    // The last block of the device works, one past it is out of range.
    let last = DEV_BYTES - 4096;
    assert_eq!(write(b, last, &a[..4096], false), Ok(4096));
    assert_eq!(read(b, last, 4096).unwrap(), a[..4096]);
    assert_eq!(write(b, DEV_BYTES, &a[..4096], false), Err(libc::ERANGE));
    assert_eq!(write(b, last, &a, false), Err(libc::ERANGE));
    assert_eq!(read(b, DEV_BYTES, 4096), Err(libc::ERANGE));
    let c = run(
        b,
        6,
        BackendOp::Discard {
            offset: last,
            len: 8192,
        },
    );
    assert_eq!(c.result, Err(libc::ERANGE));
    let c = run(
        b,
        7,
        BackendOp::WriteZeroes {
            offset: u64::MAX - 4095,
            len: 8192,
        },
    );
    assert_eq!(c.result, Err(libc::ERANGE));
    // Misaligned requests.
    assert_eq!(write(b, 100, &a[..4096], false), Err(libc::EINVAL));
    assert_eq!(read(b, 0, 100), Err(libc::EINVAL));

    // Queue depth: requests beyond it are handed back, buffer included.
    let qd = b.queue_depth();
    for i in 0..qd {
        let op = BackendOp::Read {
            offset: 4096 * i as u64,
            buf: AlignedBuf::new(4096),
        };
        b.submit(100 + i as u64, op).expect("below queue depth");
    }
    let refused = b.submit(
        999,
        BackendOp::Read {
            offset: 0,
            buf: AlignedBuf::new(4096),
        },
    );
    match refused {
        Err(BackendOp::Read { buf, .. }) => assert_eq!(buf.len(), 4096),
        other => panic!("expected the op back, got {other:?}"),
    }
    b.flush_submissions();
    let mut out = Vec::new();
    while out.len() < qd {
        b.reap(&mut out);
    }
    assert_eq!(b.in_flight(), 0);
    let mut tags: Vec<u64> = out.iter().map(|c| c.tag).collect();
    tags.sort();
    assert_eq!(tags, (100..100 + qd as u64).collect::<Vec<_>>());
    assert!(out.iter().all(|c| c.result == Ok(4096)));
}

#[test]
fn mem_backend_conformance() {
    let mut b = MemBackend::new(DEV_BYTES, 4096, 8);
    conformance(&mut b);
    assert!(b.wait_fd().is_none());
}

#[test]
fn uring_backend_conformance_on_a_file() {
    let dir = TempDir::new("uring");
    let path = dir.join("dev");
    create_file_device(&path, DEV_BYTES).unwrap();
    let cfg = UringConfig {
        queue_depth: 8,
        file_block_size: 4096,
        ..UringConfig::default()
    };
    let mut b = UringBackend::open(&path, &cfg).unwrap();
    assert!(!b.is_block_device());
    assert!(
        b.is_direct(),
        "/var/tmp is a disk filesystem: O_DIRECT expected"
    );
    conformance(&mut b);
    // Data written through the backend is in the file.
    drop(b);
    let data = std::fs::read(&path).unwrap();
    assert_eq!(data[..4096], pattern(4096, 7)[..]);
}

#[test]
fn uring_sync_fd_and_drop_with_operations_in_flight() {
    let dir = TempDir::new("uring-syncfd");
    let path = dir.join("dev");
    create_file_device(&path, DEV_BYTES).unwrap();
    let other = std::fs::File::create(dir.join("other")).unwrap();
    let mut b = UringBackend::open(&path, &UringConfig::default()).unwrap();
    use std::os::fd::AsRawFd;
    let c = run(
        &mut b,
        1,
        BackendOp::SyncFd {
            fd: other.as_raw_fd(),
        },
    );
    assert_eq!(c.result, Ok(0));
    assert_eq!(
        run(&mut b, 2, BackendOp::SyncFd { fd: -1 }).result,
        Err(libc::EBADF)
    );
    // Dropping with reads in flight must wait for them, not free their buffers early.
    for i in 0..16 {
        let op = BackendOp::Read {
            offset: 4096 * i,
            buf: AlignedBuf::new(4096),
        };
        b.submit(i, op).unwrap();
    }
    b.flush_submissions();
    drop(b);
}

/// Reaps (which never submits) until every tag in `want` has completed,
/// failing after 5 s; returns the tags seen, in order.
fn reap_until<B: Backend>(b: &mut B, want: &[u64]) -> Vec<u64> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut seen = Vec::new();
    let mut out = Vec::new();
    while !want.iter().all(|t| seen.contains(t)) {
        assert!(
            std::time::Instant::now() < deadline,
            "tags {want:?} not all completed within 5 s (seen {seen:?})"
        );
        out.clear();
        b.reap(&mut out);
        for c in &out {
            assert!(c.result.is_ok(), "tag {}: {:?}", c.tag, c.result);
            seen.push(c.tag);
        }
    }
    seen
}

/// `UringConfig::submit_hold_us`: the end of a pass keeps a few queued
/// entries back only while an earlier operation is still in flight, never
/// a durability operation, and for no longer than the hold; a reap never
/// hands held entries to the kernel.
#[test]
fn a_pass_holds_entries_back_only_while_the_disk_is_busy() {
    let dir = TempDir::new("uring-hold");
    let path = dir.join("dev");
    create_file_device(&path, DEV_BYTES).unwrap();
    let read = |offset| BackendOp::Read {
        offset,
        buf: AlignedBuf::new(4096),
    };
    // Opens a backend with the hold `hold_us` and ends two passes: the
    // first with read 1 (nothing in flight: it goes at once, so QD1 is not
    // delayed), the second with read 2 (read 1 is not reaped yet, so it
    // counts as in flight: read 2 is held).
    let two_passes = |hold_us| {
        let cfg = UringConfig {
            submit_hold_us: hold_us,
            hand_over: HandOverPolicy::Fixed(HandOver::InChunks),
            ..UringConfig::default()
        };
        let mut b = UringBackend::open(&path, &cfg).unwrap();
        b.submit(1, read(0)).unwrap();
        b.flush_submissions();
        b.submit(2, read(4096)).unwrap();
        b.flush_submissions();
        b
    };
    // A hold far longer than the test: only "the disk is idle" releases.
    let mut b = two_passes(60_000_000);
    assert_eq!(reap_until(&mut b, &[1]), [1]);
    let settle = std::time::Instant::now() + std::time::Duration::from_millis(50);
    let mut out = Vec::new();
    while std::time::Instant::now() < settle {
        b.reap(&mut out);
        assert!(out.is_empty(), "a held read was submitted: {out:?}");
    }
    // Nothing of ours in flight any more: the next pass's end hands it over.
    b.flush_submissions();
    assert_eq!(reap_until(&mut b, &[2]), [2]);
    // A flush is never held, and takes what is queued before it along.
    b.submit(3, read(0)).unwrap();
    b.flush_submissions();
    b.submit(4, read(8192)).unwrap();
    b.submit(5, BackendOp::Flush).unwrap();
    b.flush_submissions();
    assert_eq!(reap_until(&mut b, &[3, 4, 5]).len(), 3);
    drop(b);

    // A short hold ends by itself at a later pass, the disk still busy.
    let mut b = two_passes(1_000);
    std::thread::sleep(std::time::Duration::from_millis(5));
    b.flush_submissions();
    assert_eq!(reap_until(&mut b, &[1, 2]).len(), 2);
}

/// `reactor.disk_handover`: at once, an entry goes to the kernel as it is
/// queued (no pass end, no hold); the conformance checks pass in both
/// fixed modes; adaptive, a steady load runs comparisons, which the
/// backend reports.
#[test]
fn disk_handover_modes() {
    let dir = TempDir::new("uring-handover");
    let path = dir.join("dev");
    create_file_device(&path, DEV_BYTES).unwrap();
    let open = |hand_over| {
        let cfg = UringConfig {
            queue_depth: 64,
            // A hold far longer than the test: in chunks, only a pass's
            // end with the disk idle would hand an entry over.
            submit_hold_us: 60_000_000,
            hand_over,
            ..UringConfig::default()
        };
        UringBackend::open(&path, &cfg).unwrap()
    };
    let read = |offset| BackendOp::Read {
        offset,
        buf: AlignedBuf::new(4096),
    };
    for mode in [HandOver::AtOnce, HandOver::InChunks] {
        let mut b = open(HandOverPolicy::Fixed(mode));
        assert_eq!(b.hand_over(), Some((mode, None)));
        conformance(&mut b);
    }
    let mut b = open(HandOverPolicy::Fixed(HandOver::AtOnce));
    b.submit(1, read(0)).unwrap();
    b.submit(2, read(4096)).unwrap();
    // No `flush_submissions`: both are with the kernel already.
    assert_eq!(reap_until(&mut b, &[1, 2]).len(), 2);
    drop(b);

    let mut b = open(HandOverPolicy::Adaptive);
    let (mode, stats) = b.hand_over().unwrap();
    assert_eq!((mode, stats.unwrap().comparisons), (HandOver::InChunks, 0));
    // QD32 4 KiB writes until a comparison ends (one takes 0.2 s, or
    // 25 ms under a light load); 5 s at most.
    let data = pattern(4096, 3);
    let start = std::time::Instant::now();
    let (mut next, mut in_flight, mut out) = (0u64, 0usize, Vec::new());
    while b.hand_over().unwrap().1.unwrap().comparisons == 0
        && start.elapsed() < std::time::Duration::from_secs(5)
    {
        while in_flight < 32 {
            let op = BackendOp::Write {
                offset: (next % (DEV_BYTES / 4096)) * 4096,
                buf: AlignedBuf::from_slice(&data),
                fua: false,
            };
            b.submit(next, op).unwrap();
            next += 1;
            in_flight += 1;
        }
        b.flush_submissions();
        out.clear();
        b.reap(&mut out);
        assert!(out.iter().all(|c| c.result.is_ok()), "{out:?}");
        in_flight -= out.len();
    }
    let stats = b.hand_over().unwrap().1.unwrap();
    assert!(stats.comparisons >= 1, "{stats:?} after {next} writes");
    assert!(stats.chose_at_once <= stats.comparisons);
}

/// The ring's batch write through io_uring and the in-memory backend: the
/// pieces land in order at the offset, as a plain write or a durable one
/// (`RWF_DSYNC`); a bad descriptor fails it with the kernel's errno.
#[test]
fn write_vec_fd_plain_and_durable() {
    use std::os::fd::AsRawFd;
    use storage::backend::IoSeg;
    let dir = TempDir::new("write-vec-fd");
    let path = dir.join("dev");
    create_file_device(&path, DEV_BYTES).unwrap();
    let target = dir.join("ring");
    std::fs::write(&target, vec![0u8; 65536]).unwrap();
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&target)
        .unwrap();
    let fd = file.as_raw_fd();
    let pieces = |seed: u8| {
        let a: storage::backend::SharedBuf = AlignedBuf::from_slice(&pattern(4096, seed)).share();
        let b: storage::backend::SharedBuf =
            AlignedBuf::from_slice(&pattern(8192, seed + 1)).share();
        vec![
            IoSeg::whole(a),
            IoSeg {
                buf: b,
                start: 4096,
                len: 4096,
            },
        ]
    };
    let mut uring = UringBackend::open(&path, &UringConfig::default()).unwrap();
    let mut mem = MemBackend::new(DEV_BYTES, 4096, 8);
    for (i, dsync) in [false, true].into_iter().enumerate() {
        let seed = 10 * i as u8;
        let at = 16384 * i as u64;
        let op = |segs| BackendOp::WriteVecFd {
            fd,
            offset: at,
            segs,
            dsync,
        };
        assert_eq!(run(&mut uring, 1, op(pieces(seed))).result, Ok(8192));
        let data = std::fs::read(&target).unwrap();
        let at = at as usize;
        assert_eq!(data[at..at + 4096], pattern(4096, seed)[..]);
        assert_eq!(data[at + 4096..at + 8192], pattern(8192, seed + 1)[4096..]);
        let at2 = at as u64 + 8192;
        let op = BackendOp::WriteVecFd {
            fd,
            offset: at2,
            segs: pieces(seed + 3),
            dsync,
        };
        assert_eq!(run(&mut mem, 2, op).result, Ok(8192));
        let data = std::fs::read(&target).unwrap();
        assert_eq!(data[at + 8192..at + 12288], pattern(4096, seed + 3)[..]);
    }
    for dsync in [false, true] {
        let op = BackendOp::WriteVecFd {
            fd: -1,
            offset: 0,
            segs: pieces(1),
            dsync,
        };
        assert_eq!(run(&mut uring, 3, op).result, Err(libc::EBADF));
    }
}

/// A durable write to another file is its write and its flush in one: the
/// fault backend fails it when that file's flushes fail, and leaves a plain
/// one alone.
#[test]
fn fault_fd_syncs_fail_durable_fd_writes() {
    use std::os::fd::AsRawFd;
    use storage::backend::IoSeg;
    let dir = TempDir::new("fault-dsync");
    let target = dir.join("ring");
    std::fs::write(&target, vec![0u8; 8192]).unwrap();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&target)
        .unwrap();
    let fd = file.as_raw_fd();
    let ctl = FaultControl::new();
    let mut b = FaultBackend::new(MemBackend::new(DEV_BYTES, 4096, 8), ctl.clone());
    let op = |dsync| BackendOp::WriteVecFd {
        fd,
        offset: 0,
        segs: vec![IoSeg::whole(
            AlignedBuf::from_slice(&pattern(4096, 5)).share(),
        )],
        dsync,
    };
    ctl.fail_fd_syncs(true);
    assert_eq!(run(&mut b, 1, op(true)).result, Err(libc::EIO));
    assert_eq!(run(&mut b, 2, op(false)).result, Ok(4096));
    assert_eq!(ctl.injected(), 1);
    ctl.clear();
    ctl.fail_flushes(true);
    assert_eq!(run(&mut b, 3, op(true)).result, Err(libc::EIO));
    ctl.clear();
    assert_eq!(run(&mut b, 4, op(true)).result, Ok(4096));
    ctl.fail_fd_writes(true);
    assert_eq!(run(&mut b, 5, op(false)).result, Err(libc::EIO));
    assert_eq!(run(&mut b, 6, op(true)).result, Err(libc::EIO));
}

/// A registered pool: writes and reads of its buffers are fixed-buffer
/// operations (counted), others plain; a `WriteShared` keeps its buffer
/// until reaped and hands none back; the pool outlives the backend's use.
#[test]
fn uring_fixed_buffers_from_a_registered_pool() {
    let dir = TempDir::new("uring-fixed");
    let path = dir.join("dev");
    create_file_device(&path, DEV_BYTES).unwrap();
    let mut b = UringBackend::open(&path, &UringConfig::default()).unwrap();
    let pool = volume::IoBufPool::new(4 << 20, 64 << 10);
    assert_eq!(b.fixed_ops(), 0);
    // Root (CAP_IPC_LOCK) or a memlock limit above 4 MiB: registration works.
    assert_eq!(b.register_pool(&pool), Ok(true));
    assert!(b.register_pool(&pool).is_err(), "registered twice");
    let mut buf = pool.get(8192).unwrap();
    buf.copy_from_slice(&pattern(8192, 3));
    let shared = buf.share();
    let keep = shared.clone();
    let c = run(
        &mut b,
        1,
        BackendOp::WriteShared {
            offset: 4096,
            buf: shared,
            fua: false,
        },
    );
    assert_eq!(c.result, Ok(8192));
    assert!(c.buf.is_none());
    assert_eq!(b.fixed_ops(), 1);
    // The op let its clone go: ours is the only one left.
    let buf = keep
        .try_unwrap()
        .expect("the backend still holds the buffer");
    drop(buf);
    assert_eq!(pool.in_use_bytes(), 0);
    // A fixed read of a pool buffer, then a plain read of a heap one.
    let c = run(
        &mut b,
        2,
        BackendOp::Read {
            offset: 4096,
            buf: pool.get(8192).unwrap(),
        },
    );
    assert_eq!(c.result, Ok(8192));
    assert_eq!(c.buf.unwrap()[..], pattern(8192, 3)[..]);
    assert_eq!(b.fixed_ops(), 2);
    assert_eq!(read(&mut b, 4096, 8192).unwrap(), pattern(8192, 3));
    assert_eq!(write(&mut b, 0, &pattern(4096, 5), false), Ok(4096));
    assert_eq!(b.fixed_ops(), 2);
    // A shared heap buffer is a plain write.
    let c = run(
        &mut b,
        3,
        BackendOp::WriteShared {
            offset: 0,
            buf: AlignedBuf::from_slice(&pattern(4096, 6)).share(),
            fua: true,
        },
    );
    assert_eq!(c.result, Ok(4096));
    assert_eq!(b.fixed_ops(), 2);
    assert_eq!(read(&mut b, 0, 4096).unwrap(), pattern(4096, 6));
    // A memory backend has nothing to register.
    assert_eq!(
        MemBackend::new(DEV_BYTES, 4096, 8).register_pool(&pool),
        Ok(false)
    );
}

/// Whether the filesystem holding `path` accepts O_DIRECT, asked of the
/// kernel with open(2) itself, independently of the backend.
fn accepts_o_direct(path: &std::path::Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Ok(_) => true,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => false,
        Err(e) => panic!("open({}, O_DIRECT): {e}", path.display()),
    }
}

/// Opens a device file at `path` with the io_uring backend and checks that
/// it uses O_DIRECT exactly when the filesystem accepts it, that it passes
/// the conformance checks either way, and that what it wrote is in the file.
/// Returns whether the filesystem refused O_DIRECT (the fallback was taken).
fn open_direct_or_buffered(path: &std::path::Path) -> bool {
    create_file_device(path, DEV_BYTES).unwrap();
    let direct = accepts_o_direct(path);
    let mut b = UringBackend::open(path, &UringConfig::default()).unwrap();
    assert_eq!(
        b.is_direct(),
        direct,
        "{}: the backend must use O_DIRECT exactly when the filesystem accepts it \
         (open(2) with O_DIRECT {})",
        path.display(),
        if direct {
            "succeeds"
        } else {
            "fails with EINVAL"
        }
    );
    conformance(&mut b);
    drop(b);
    let data = std::fs::read(path).unwrap();
    assert_eq!(data[..4096], pattern(4096, 7)[..]);
    !direct
}

/// A ramfs mounted on a scratch directory, unmounted on drop. ramfs has no
/// direct I/O at all, so it refuses O_DIRECT on every kernel. None where
/// mounting fails (not root).
struct RamFs(TempDir);

impl RamFs {
    fn mount() -> Option<RamFs> {
        let dir = TempDir::new("ramfs");
        let st = std::process::Command::new("mount")
            .args(["-t", "ramfs", "ramfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        st.success().then_some(RamFs(dir))
    }
}

impl Drop for RamFs {
    fn drop(&mut self) {
        // Lazy: the kernel may still hold the closed io_uring's registered
        // file for a moment.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

/// Where the filesystem refuses O_DIRECT (tmpfs before Linux 6.6, ramfs on
/// every kernel), the backend falls back to buffered I/O and still works;
/// where it accepts it (tmpfs since 6.6), it uses O_DIRECT.
#[test]
fn uring_falls_back_to_buffered_io_where_o_direct_is_refused() {
    let mut fell_back = Vec::new();
    // /dev/shm is tmpfs.
    if std::path::Path::new("/dev/shm").is_dir() {
        struct Remove(std::path::PathBuf);
        impl Drop for Remove {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
        let path = Remove(format!("/dev/shm/deltamirror-test-{}", std::process::id()).into());
        if open_direct_or_buffered(&path.0) {
            fell_back.push("tmpfs");
        }
    }
    if let Some(ramfs) = RamFs::mount() {
        assert!(
            open_direct_or_buffered(&ramfs.0.join("dev")),
            "ramfs has no direct I/O: open(2) with O_DIRECT must fail there"
        );
        fell_back.push("ramfs");
    }
    if fell_back.is_empty() {
        testskip::skip(
            "no filesystem here refuses O_DIRECT: tmpfs accepts it since Linux 6.6 \
             and mounting a ramfs needs root",
        );
    }
}

#[test]
fn file_device_creation_refuses_to_shrink() {
    let dir = TempDir::new("create");
    let path = dir.join("dev");
    create_file_device(&path, 2 * DEV_BYTES).unwrap();
    create_file_device(&path, 2 * DEV_BYTES).unwrap();
    create_file_device(&path, 3 * DEV_BYTES).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 3 * DEV_BYTES);
    let err = create_file_device(&path, DEV_BYTES).unwrap_err();
    assert!(err.to_string().contains("refusing to shrink"), "{err}");
    assert!(create_file_device(&path, 1000).is_err());
    let cfg = UringConfig {
        queue_depth: 4,
        file_block_size: 512,
        ..UringConfig::default()
    };
    let b = UringBackend::open(&path, &cfg).unwrap();
    assert_eq!(b.block_size(), 512);
    assert!(UringBackend::open(&dir.join("missing"), &cfg).is_err());
}

/// Bytes the filesystem holds for `path`.
fn allocated(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn file_devices_take_their_space_as_preallocate_says() {
    let dir = TempDir::new("prealloc");
    let (none, space, full) = (dir.join("none"), dir.join("space"), dir.join("full"));
    create_file_device_as(&none, 4 * DEV_BYTES, Preallocate::None).unwrap();
    create_file_device_as(&space, 4 * DEV_BYTES, Preallocate::Space).unwrap();
    create_file_device_as(&full, 4 * DEV_BYTES, Preallocate::Full).unwrap();
    assert!(allocated(&none) < DEV_BYTES, "sparse: {}", allocated(&none));
    assert!(
        allocated(&space) >= 4 * DEV_BYTES,
        "reserved: {}",
        allocated(&space)
    );
    assert!(
        allocated(&full) >= 4 * DEV_BYTES,
        "written: {}",
        allocated(&full)
    );
    for p in [&none, &space, &full] {
        let data = std::fs::read(p).unwrap();
        assert_eq!(data.len() as u64, 4 * DEV_BYTES);
        assert!(data.iter().all(|&b| b == 0), "{} reads zeroes", p.display());
    }
    // Growing an existing file, or reserving it again: its data stays.
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(&none).unwrap();
    f.write_all_at(&pattern(4096, 3), DEV_BYTES).unwrap();
    drop(f);
    create_file_device_as(&none, 4 * DEV_BYTES, Preallocate::Space).unwrap();
    assert!(allocated(&none) >= 4 * DEV_BYTES);
    create_file_device_as(&none, 6 * DEV_BYTES, Preallocate::Full).unwrap();
    assert!(allocated(&none) >= 6 * DEV_BYTES);
    let data = std::fs::read(&none).unwrap();
    assert_eq!(data.len() as u64, 6 * DEV_BYTES);
    assert_eq!(
        &data[DEV_BYTES as usize..DEV_BYTES as usize + 4096],
        &pattern(4096, 3)[..]
    );
}

#[test]
fn a_discard_keeps_a_reserved_files_space_only_when_asked() {
    let dir = TempDir::new("keepspace");
    // And on tmpfs, which has no zero ranges (the range is punched out and
    // reserved again).
    let shm = std::path::PathBuf::from(format!("/dev/shm/dm-storage-test-{}", std::process::id()));
    std::fs::create_dir_all(&shm).unwrap();
    let cases = [
        dir.join("punched"),
        dir.join("kept"),
        shm.join("punched"),
        shm.join("kept"),
    ];
    for path in cases {
        let keep_space = path.ends_with("kept");
        create_file_device_as(&path, DEV_BYTES, Preallocate::Space).unwrap();
        let cfg = UringConfig {
            queue_depth: 4,
            keep_space,
            ..UringConfig::default()
        };
        let mut b = UringBackend::open(&path, &cfg).unwrap();
        for i in 0..DEV_BYTES / 65536 {
            write(&mut b, i * 65536, &pattern(65536, i as u8 + 1), false).unwrap();
        }
        let c = run(
            &mut b,
            1,
            BackendOp::Discard {
                offset: 0,
                len: DEV_BYTES,
            },
        );
        assert_eq!(c.result, Ok(0));
        assert_eq!(read(&mut b, 0, 65536).unwrap(), vec![0u8; 65536]);
        drop(b);
        let held = allocated(&path);
        if keep_space {
            assert!(held >= DEV_BYTES, "{}: kept {held}", path.display());
        } else {
            assert!(
                held < DEV_BYTES / 2,
                "{}: punched out to {held}",
                path.display()
            );
        }
    }
    let _ = std::fs::remove_dir_all(&shm);
}

#[test]
fn fault_countdown_fails_every_op_after_n() {
    let ctl = FaultControl::new();
    let mut b = FaultBackend::new(MemBackend::new(DEV_BYTES, 4096, 8), ctl.clone());
    ctl.fail_after(2);
    assert_eq!(write(&mut b, 0, &pattern(4096, 1), false), Ok(4096));
    assert_eq!(read(&mut b, 0, 4096).unwrap(), pattern(4096, 1));
    assert_eq!(write(&mut b, 0, &pattern(4096, 2), false), Err(libc::EIO));
    assert_eq!(read(&mut b, 0, 4096), Err(libc::EIO));
    assert_eq!(run(&mut b, 9, BackendOp::Flush).result, Err(libc::EIO));
    assert_eq!(ctl.injected(), 3);
    ctl.clear();
    // The failed write never reached the device.
    assert_eq!(read(&mut b, 0, 4096).unwrap(), pattern(4096, 1));
    assert_eq!(b.inner().contents()[..4096], pattern(4096, 1)[..]);
}

#[test]
fn fault_range_and_direction() {
    let ctl = FaultControl::new();
    let mut b = FaultBackend::new(MemBackend::new(DEV_BYTES, 4096, 8), ctl.clone());
    assert_eq!(write(&mut b, 8192, &pattern(4096, 5), false), Ok(4096));
    ctl.fail_range(8192 + 100, 1);
    assert_eq!(read(&mut b, 4096, 4096).map(|_| ()), Ok(()));
    assert_eq!(read(&mut b, 8192, 4096), Err(libc::EIO));
    assert_eq!(
        read(&mut b, 4096, 8192),
        Err(libc::EIO),
        "overlapping op fails"
    );
    let c = run(
        &mut b,
        3,
        BackendOp::Discard {
            offset: 8192,
            len: 4096,
        },
    );
    assert_eq!(c.result, Err(libc::EIO));
    // Writes only: reads of the range succeed again, writes still fail.
    ctl.set_ops(FaultOps::WritesOnly);
    assert_eq!(read(&mut b, 8192, 4096).unwrap(), pattern(4096, 5));
    assert_eq!(
        write(&mut b, 8192, &pattern(4096, 6), false),
        Err(libc::EIO)
    );
    assert_eq!(b.inner().contents()[8192..12288], pattern(4096, 5)[..]);
    // Reads only.
    ctl.set_ops(FaultOps::ReadsOnly);
    assert_eq!(write(&mut b, 8192, &pattern(4096, 6), false), Ok(4096));
    assert_eq!(read(&mut b, 8192, 4096), Err(libc::EIO));
    ctl.clear();
    assert_eq!(read(&mut b, 8192, 4096).unwrap(), pattern(4096, 6));
    // Countdown restricted to writes lets reads through.
    ctl.set_ops(FaultOps::WritesOnly);
    ctl.fail_after(0);
    assert!(read(&mut b, 0, 4096).is_ok());
    assert_eq!(write(&mut b, 0, &pattern(4096, 1), false), Err(libc::EIO));
}

#[test]
fn fault_flushes() {
    let ctl = FaultControl::new();
    let mut b = FaultBackend::new(MemBackend::new(DEV_BYTES, 4096, 8), ctl.clone());
    ctl.fail_flushes(true);
    assert_eq!(run(&mut b, 1, BackendOp::Flush).result, Err(libc::EIO));
    assert_eq!(
        run(&mut b, 1, BackendOp::SyncFd { fd: 0 }).result,
        Err(libc::EIO)
    );
    assert_eq!(write(&mut b, 0, &pattern(4096, 1), false), Ok(4096));
    ctl.fail_flushes(false);
    assert_eq!(run(&mut b, 1, BackendOp::Flush).result, Ok(0));
}

#[test]
fn fault_fd_syncs_leave_device_flushes_alone() {
    let ctl = FaultControl::new();
    let mut b = FaultBackend::new(MemBackend::new(DEV_BYTES, 4096, 8), ctl.clone());
    let file = std::fs::File::open("/proc/self/exe").unwrap();
    let fd = std::os::unix::io::AsRawFd::as_raw_fd(&file);
    ctl.fail_fd_syncs(true);
    assert_eq!(
        run(&mut b, 1, BackendOp::SyncFd { fd }).result,
        Err(libc::EIO)
    );
    assert_eq!(run(&mut b, 2, BackendOp::Flush).result, Ok(0));
    assert_eq!(ctl.injected(), 1);
    ctl.clear();
    assert_eq!(run(&mut b, 3, BackendOp::SyncFd { fd }).result, Ok(0));
}

#[test]
fn ready_completions_are_announced() {
    // Inline and injected completions signal no fd: `has_ready` says the
    // caller must reap instead of sleeping, and `wait` does not sleep.
    let ctl = FaultControl::new();
    let mut b = FaultBackend::new(MemBackend::new(DEV_BYTES, 4096, 8), ctl.clone());
    assert!(!b.has_ready());
    assert!(b.discard_reads_zeroes());
    b.submit(1, BackendOp::Flush).unwrap();
    assert!(b.has_ready());
    let mut out = Vec::new();
    assert_eq!(b.reap(&mut out), 1);
    assert!(!b.has_ready());
    assert!(!b.wait(&[], 0), "memory has no wait of its own");
    ctl.fail_flushes(true);
    b.submit(2, BackendOp::Flush).unwrap();
    assert!(b.has_ready());
    assert!(b.wait(&[], 10_000), "an injected failure is ready now");
    assert_eq!(b.reap(&mut out), 1);
    assert_eq!(out[1].result, Err(libc::EIO));

    let dir = TempDir::new("ready-uring");
    let path = dir.join("dev");
    create_file_device(&path, DEV_BYTES).unwrap();
    let mut u = UringBackend::open(&path, &UringConfig::default()).unwrap();
    assert!(u.discard_reads_zeroes(), "a file reads discards as zeroes");
    u.submit(
        7,
        BackendOp::Discard {
            offset: 0,
            len: 4096,
        },
    )
    .unwrap();
    assert!(
        u.has_ready(),
        "a synchronous discard is ready without the ring"
    );
    assert!(u.wait(&[], 10_000));
    out.clear();
    assert_eq!(u.reap(&mut out), 1);
    assert!(!u.has_ready());
}

#[test]
fn fault_backend_over_uring() {
    let dir = TempDir::new("fault-uring");
    let path = dir.join("dev");
    create_file_device(&path, DEV_BYTES).unwrap();
    let ctl = FaultControl::new();
    let inner = UringBackend::open(&path, &UringConfig::default()).unwrap();
    let mut b = FaultBackend::new(inner, ctl.clone());
    assert_eq!(write(&mut b, 0, &pattern(4096, 1), false), Ok(4096));
    ctl.fail_after(0);
    let c = run(
        &mut b,
        5,
        BackendOp::Write {
            offset: 0,
            buf: AlignedBuf::new(4096),
            fua: false,
        },
    );
    assert_eq!(c.result, Err(libc::EIO));
    assert_eq!(c.buf.map(|b| b.len()), Some(4096), "buffer handed back");
    ctl.clear();
    assert_eq!(read(&mut b, 0, 4096).unwrap(), pattern(4096, 1));
}

#[test]
fn aligned_buf_and_pool() {
    let b = AlignedBuf::new(10);
    assert_eq!(b.len(), 10);
    assert_eq!(b.as_slice(), &[0; 10]);
    assert_eq!(b.as_slice().as_ptr() as usize % 4096, 0);
    let z = AlignedBuf::new(0);
    assert!(z.is_empty());
    let c = AlignedBuf::from_slice(b"hello");
    assert_eq!(c.as_slice(), b"hello");

    let mut pool = BufPool::new(2, 8192);
    let mut x = pool.get().unwrap();
    let y = pool.get().unwrap();
    assert!(pool.get().is_none(), "bounded");
    assert_eq!(x.len(), 8192);
    x.set_len(4096);
    pool.put(x);
    let x = pool.get().unwrap();
    assert_eq!(x.len(), 8192, "length reset on get");
    pool.put(x);
    pool.put(y);
    assert_eq!(pool.available(), 2);
}

#[test]
fn uring_backend_conformance_on_a_block_device() {
    let dir = TempDir::new("uring-blk");
    let file = dir.join("backing");
    create_file_device(&file, DEV_BYTES).unwrap();
    let Some(dev) = LoopDevice::attach(&file, 4096) else {
        return;
    };
    let mut b = UringBackend::open(dev.path(), &UringConfig::default()).unwrap();
    assert!(b.is_block_device());
    // Size from BLKGETSIZE64 and block size from BLKSSZGET; discard and
    // write-zeroes through BLKDISCARD / BLKZEROOUT.
    conformance(&mut b);
    drop(b);
    let Some(dev512) = LoopDevice::attach(&file, 512) else {
        return;
    };
    let b = UringBackend::open(dev512.path(), &UringConfig::default()).unwrap();
    assert_eq!((b.block_size(), b.size_bytes()), (512, DEV_BYTES));
}

#[test]
fn owned_by_a_reactor_thread_and_movable() {
    fn send<T: Send>() {}
    send::<AlignedBuf>();
    send::<MemBackend>();
    send::<UringBackend>();
    send::<FaultBackend<UringBackend>>();
    send::<storage::Ring>();
    send::<storage::MetaStore>();
    fn sync<T: Sync + Send>() {}
    sync::<FaultControl>();
}

/// A poll armed on an empty socket does not fire until data arrives (no
/// read of the socket meanwhile); once fired it is no longer armed (read),
/// and a disk completion reaped while asking is kept for `reap`. Backends
/// without polls say "fired" every time, so their callers keep reading.
#[test]
fn an_armed_poll_fires_when_its_socket_has_data() {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let dir = TempDir::new("arm-poll");
    let path = dir.join("dev");
    create_file_device(&path, DEV_BYTES).unwrap();
    let mut u = UringBackend::open(&path, &UringConfig::default()).unwrap();
    let (mut tx, rx) = std::os::unix::net::UnixStream::pair().unwrap();
    let fd = rx.as_raw_fd();
    assert!(u.arm_poll(fd));
    assert!(u.arm_poll(fd), "arming twice keeps the one poll");
    u.flush_submissions();
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert!(!u.poll_fired(fd), "nothing was sent");
    // A disk write completes while the socket is still empty.
    u.submit(
        9,
        BackendOp::Write {
            offset: 0,
            buf: AlignedBuf::new(4096),
            fua: false,
        },
    )
    .unwrap();
    u.flush_submissions();
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(!u.poll_fired(fd));
    tx.write_all(b"x").unwrap();
    let t0 = std::time::Instant::now();
    while !u.poll_fired(fd) {
        assert!(t0.elapsed().as_secs() < 5, "the poll never fired");
        std::hint::spin_loop();
    }
    // Fired and taken: nothing armed, so the caller reads (as it would
    // after a poll that failed).
    assert!(u.poll_fired(fd));
    let mut byte = [0u8; 1];
    std::io::Read::read_exact(&mut &rx, &mut byte).unwrap();
    assert!(u.arm_poll(fd));
    u.flush_submissions();
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert!(!u.poll_fired(fd), "armed again on an empty socket");
    let mut out = Vec::new();
    assert_eq!(u.reap(&mut out), 1, "the write's completion was kept");
    assert_eq!((out[0].tag, out[0].result), (9, Ok(4096)));

    let mut m = MemBackend::new(DEV_BYTES, 4096, 8);
    assert!(!m.arm_poll(fd), "memory arms no polls");
    assert!(m.poll_fired(fd));
}
