//! The server against a raw pure-Rust NBD client on 127.0.0.1: every
//! option, every command, the errors, and bad input.

mod common;

use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use common::*;
use nbd_target::proto::*;
use volume::{MemVolume, PathState};

const BS: u32 = 512;
const BLOCKS: u64 = 2048; // 1 MiB
const SIZE: u64 = BS as u64 * BLOCKS;

fn setup() -> (Arc<MemVolume>, nbd_target::NbdServer) {
    let vol = Arc::new(MemVolume::new(BS, BLOCKS));
    let srv = serve(&vol);
    (vol, srv)
}

#[test]
fn greeting_and_export_name_with_and_without_zeroes() {
    let (_vol, srv) = setup();
    // With NO_ZEROES: size + flags only.
    let mut c = Client::negotiating(srv.local_addr());
    c.send_option(OPT_EXPORT_NAME, EXPORT.as_bytes());
    assert_eq!(c.u64(), SIZE);
    assert_eq!(c.u16(), EXPORT_FLAGS);
    let (e, d) = c.call(CMD_READ, 0, 0, 512, &[]);
    assert_eq!((e, d.len()), (0, 512));

    // Without NO_ZEROES: 124 zero bytes follow. The empty name is the default export.
    let (mut c, _) = Client::connect(srv.local_addr());
    c.send(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    c.send_option(OPT_EXPORT_NAME, b"");
    assert_eq!(c.u64(), SIZE);
    assert_eq!(c.u16(), EXPORT_FLAGS);
    assert_eq!(c.bytes(124), vec![0; 124]);
    c.request(CMD_DISC, 0, 1, 0, 0, &[]);
    c.expect_closed();
    srv.shutdown();
}

#[test]
fn export_flags_advertise_what_we_support() {
    for f in [
        TFLAG_HAS_FLAGS,
        TFLAG_SEND_FLUSH,
        TFLAG_SEND_FUA,
        TFLAG_SEND_TRIM,
    ] {
        assert_ne!(EXPORT_FLAGS & f, 0);
    }
    assert_ne!(EXPORT_FLAGS & TFLAG_SEND_WRITE_ZEROES, 0);
    assert_ne!(EXPORT_FLAGS & TFLAG_CAN_MULTI_CONN, 0);
    assert_eq!(EXPORT_FLAGS & TFLAG_READ_ONLY, 0);
}

#[test]
fn unknown_export_name_closes_the_connection() {
    let (_vol, srv) = setup();
    let mut c = Client::negotiating(srv.local_addr());
    c.send_option(OPT_EXPORT_NAME, b"nope");
    c.expect_closed();
    srv.shutdown();
}

#[test]
fn options_list_info_unsupported_and_abort() {
    let (_vol, srv) = setup();
    let mut c = Client::negotiating(srv.local_addr());

    let r = c.option(OPT_LIST, &[]);
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].0, REP_SERVER);
    let d = &r[0].1;
    let n = u32::from_be_bytes(d[0..4].try_into().unwrap()) as usize;
    assert_eq!(&d[4..4 + n], EXPORT.as_bytes());
    assert_eq!(&d[4 + n..], b"deltamirror test volume");
    assert_eq!(r[1].0, REP_ACK);
    assert_eq!(c.option(OPT_LIST, b"x")[0].0, REP_ERR_INVALID);

    let r = c.option(
        OPT_INFO,
        &info_request(EXPORT, &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]),
    );
    assert_eq!(export_info(&r), Some((SIZE, EXPORT_FLAGS)));
    let bs = info_payload(&r, INFO_BLOCK_SIZE).unwrap();
    let words: Vec<u32> = bs
        .chunks(4)
        .map(|c| u32::from_be_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(words, vec![512, 4096, 1 << 20]);
    assert_eq!(info_payload(&r, INFO_NAME).unwrap(), EXPORT.as_bytes());
    assert_eq!(
        info_payload(&r, INFO_DESCRIPTION).unwrap(),
        b"deltamirror test volume"
    );
    assert_eq!(r.last().unwrap().0, REP_ACK);

    // Name and description only on request.
    let r = c.option(OPT_INFO, &info_request("", &[]));
    assert!(info_payload(&r, INFO_NAME).is_none());
    assert!(info_payload(&r, INFO_DESCRIPTION).is_none());

    let r = c.option(OPT_INFO, &info_request("other", &[]));
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].0, REP_ERR_UNKNOWN);
    let r = c.option(OPT_GO, &info_request("other", &[]));
    assert_eq!(r[0].0, REP_ERR_UNKNOWN);
    assert_eq!(
        c.option(OPT_INFO, &[0, 0, 0, 9, b'a'])[0].0,
        REP_ERR_INVALID
    );

    assert_eq!(c.option(OPT_STRUCTURED_REPLY, &[])[0].0, REP_ERR_UNSUP);
    assert_eq!(c.option(OPT_STARTTLS, &[])[0].0, REP_ERR_UNSUP);
    assert_eq!(c.option(9, &[])[0].0, REP_ERR_UNSUP);
    assert_eq!(c.option(0xdead, b"abc")[0].0, REP_ERR_UNSUP);

    // The session still works after all that: GO, then I/O.
    let r = c.option(OPT_GO, &info_request(EXPORT, &[]));
    assert_eq!(r.last().unwrap().0, REP_ACK);
    assert_eq!(c.call(CMD_FLUSH, 0, 0, 0, &[]).0, 0);

    let mut c = Client::negotiating(srv.local_addr());
    assert_eq!(c.option(OPT_ABORT, &[]), vec![(REP_ACK, vec![])]);
    c.expect_closed();
    srv.shutdown();
}

#[test]
fn every_command_round_trips() {
    let (vol, srv) = setup();
    every_command(&vol, srv);
}

#[test]
fn every_command_round_trips_with_async_completions() {
    let vol = Arc::new(MemVolume::new(BS, BLOCKS));
    let srv = serve_dyn(AsyncVolume::new(vol.clone()));
    every_command(&vol, srv);
}

fn every_command(vol: &MemVolume, srv: nbd_target::NbdServer) {
    let (mut c, size, _) = Client::go(srv.local_addr());
    assert_eq!(size, SIZE);

    let data = pattern(3, 8192);
    assert_eq!(c.call(CMD_WRITE, 0, 4096, 8192, &data).0, 0);
    assert_eq!(c.call(CMD_READ, 0, 4096, 8192, &[]), (0, data.clone()));
    assert_eq!(
        c.call(CMD_WRITE, CMD_FLAG_FUA, 0, 512, &pattern(9, 512)).0,
        0
    );
    assert_eq!(
        c.call(CMD_READ, CMD_FLAG_FUA, 0, 512, &[]).1,
        pattern(9, 512)
    );
    assert_eq!(c.call(CMD_FLUSH, 0, 0, 0, &[]).0, 0);

    assert_eq!(c.call(CMD_TRIM, 0, 4096, 4096, &[]).0, 0);
    assert_eq!(c.call(CMD_READ, 0, 4096, 4096, &[]).1, vec![0; 4096]);
    assert_eq!(
        c.call(
            CMD_WRITE_ZEROES,
            CMD_FLAG_NO_HOLE | CMD_FLAG_FUA,
            8192,
            4096,
            &[]
        )
        .0,
        0
    );
    assert_eq!(c.call(CMD_READ, 0, 8192, 4096, &[]).1, vec![0; 4096]);

    // TRIM / WRITE_ZEROES larger than max_io_bytes are split, not refused.
    assert_eq!(c.call(CMD_WRITE, 0, SIZE - 512, 512, &[7; 512]).0, 0);
    assert_eq!(
        c.call(CMD_WRITE_ZEROES, CMD_FLAG_FUA, 0, SIZE as u32, &[])
            .0,
        0
    );
    assert_eq!(c.call(CMD_READ, 0, SIZE - 512, 512, &[]).1, vec![0; 512]);
    assert_eq!(c.call(CMD_TRIM, 0, 0, SIZE as u32, &[]).0, 0);

    let w = vol.writes.load(Ordering::Relaxed);
    c.request(CMD_DISC, 0, 1, 0, 0, &[]);
    c.expect_closed();
    assert_eq!(vol.writes.load(Ordering::Relaxed), w);
    srv.shutdown();
}

#[test]
fn pipelined_requests_all_answered() {
    let (_vol, srv) = setup();
    pipelined(srv);
}

#[test]
fn pipelined_requests_all_answered_with_async_completions() {
    pipelined(serve_dyn(AsyncVolume::new(Arc::new(MemVolume::new(
        BS, BLOCKS,
    )))));
}

fn pipelined(srv: nbd_target::NbdServer) {
    let (mut c, _, _) = Client::go(srv.local_addr());
    // 1000 requests queued without waiting: more than the in-flight limit.
    let n = 1000u64;
    let mut batch = Vec::new();
    for h in 0..n {
        let off = (h % 256) * 4096;
        let mut m = Vec::new();
        m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        m.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&CMD_WRITE.to_be_bytes());
        m.extend_from_slice(&h.to_be_bytes());
        m.extend_from_slice(&off.to_be_bytes());
        m.extend_from_slice(&4096u32.to_be_bytes());
        m.extend_from_slice(&pattern(h as u8, 4096));
        batch.extend_from_slice(&m);
    }
    let mut s = c.s.try_clone().unwrap();
    let writer = std::thread::spawn(move || s.write_all(&batch).unwrap());
    let mut seen = vec![false; n as usize];
    for _ in 0..n {
        let (e, h) = c.reply();
        assert_eq!(e, 0);
        assert!(!seen[h as usize]);
        seen[h as usize] = true;
    }
    writer.join().unwrap();
    // Last writer of each slot wins: h = 744..999 cover all 256 slots.
    for h in n - 256..n {
        let off = (h % 256) * 4096;
        assert_eq!(
            c.call(CMD_READ, 0, off, 4096, &[]).1,
            pattern(h as u8, 4096)
        );
    }
    srv.shutdown();
}

#[test]
fn request_errors_keep_the_connection_and_never_write() {
    let (vol, srv) = setup();
    let (mut c, _, _) = Client::go(srv.local_addr());
    let w0 = vol.writes.load(Ordering::Relaxed);

    let cases: &[(u16, u16, u64, u32, u32)] = &[
        // kind, flags, offset, len, expected errno
        (CMD_READ, 0, SIZE, 512, EINVAL),
        (CMD_READ, 0, SIZE - 512, 1024, EINVAL),
        (CMD_READ, 0, u64::MAX - 511, 1024, EINVAL),
        (CMD_WRITE, 0, SIZE, 512, ENOSPC),
        (CMD_WRITE, 0, SIZE - 512, 1024, ENOSPC),
        (CMD_TRIM, 0, SIZE, 512, ENOSPC),
        (CMD_WRITE_ZEROES, 0, SIZE - 512, 1024, ENOSPC),
        (CMD_READ, 0, 100, 512, EINVAL),
        (CMD_WRITE, 0, 0, 100, EINVAL),
        (CMD_TRIM, 0, 0, 100, EINVAL),
        (CMD_READ, 0, 0, 0, EINVAL),
        (CMD_WRITE, 0, 0, (1 << 20) + 512, EOVERFLOW),
        (CMD_READ, 0, 0, (1 << 20) + 512, EOVERFLOW),
        (CMD_FLUSH, 0, 512, 0, EINVAL),
        (5, 0, 0, 512, EINVAL),  // NBD_CMD_CACHE: not advertised
        (7, 0, 0, 512, EINVAL),  // NBD_CMD_BLOCK_STATUS: not negotiated
        (77, 0, 0, 512, EINVAL), // unknown
        (CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 512, EINVAL),
        (CMD_READ, 1 << 4, 0, 512, EINVAL), // FAST_ZERO not advertised
    ];
    for &(kind, flags, off, len, want) in cases {
        let payload = if kind == CMD_WRITE {
            vec![0xee; len as usize]
        } else {
            vec![]
        };
        let (e, _) = c.call(kind, flags, off, len, &payload);
        assert_eq!(e, want, "kind {kind} flags {flags} off {off} len {len}");
    }
    // Still in sync and serving.
    assert_eq!(c.call(CMD_READ, 0, 0, 512, &[]), (0, vec![0; 512]));
    assert_eq!(vol.writes.load(Ordering::Relaxed), w0);
    srv.shutdown();
}

#[test]
fn backup_refuses_io_with_eperm() {
    let (vol, srv) = setup();
    let (mut c, _, _) = Client::go(srv.local_addr());
    vol.path.set(PathState::Inaccessible);
    assert_eq!(c.call(CMD_WRITE, 0, 0, 512, &[1; 512]).0, EPERM);
    assert_eq!(
        c.call(CMD_WRITE, CMD_FLAG_FUA, 512, 512, &[1; 512]).0,
        EPERM
    );
    assert_eq!(c.call(CMD_TRIM, 0, 0, 512, &[]).0, EPERM);
    assert_eq!(c.call(CMD_WRITE_ZEROES, CMD_FLAG_FUA, 0, 512, &[]).0, EPERM);
    assert_eq!(c.call(CMD_READ, 0, 0, 512, &[]).0, EPERM);
    // Split requests report the error once.
    assert_eq!(c.call(CMD_TRIM, 0, 0, SIZE as u32, &[]).0, EPERM);
    assert_eq!(c.call(CMD_FLUSH, 0, 0, 0, &[]).0, 0);
    assert_eq!(vol.writes.load(Ordering::Relaxed), 0);
    vol.path.set(PathState::Optimized);
    assert_eq!(c.call(CMD_WRITE, 0, 0, 512, &[1; 512]).0, 0);
    assert_eq!(vol.writes.load(Ordering::Relaxed), 1);
    srv.shutdown();
}

/// Each bad input closes its own connection; the server keeps serving
/// others and the volume sees no write.
#[test]
fn bad_input_closes_only_that_connection() {
    let (vol, srv) = setup();
    let addr = srv.local_addr();
    let (mut healthy, _, _) = Client::go(addr);

    // Garbage instead of client flags + options.
    let (mut c, _) = Client::connect(addr);
    c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    c.expect_closed();

    // Unknown client flags.
    let (mut c, _) = Client::connect(addr);
    c.send(&0x8000_0001u32.to_be_bytes());
    c.expect_closed();

    // Bad option magic.
    let mut c = Client::negotiating(addr);
    c.send(&[0x55; 16]);
    c.expect_closed();

    // Absurd option length.
    let mut c = Client::negotiating(addr);
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&OPT_GO.to_be_bytes());
    m.extend_from_slice(&u32::MAX.to_be_bytes());
    c.send(&m);
    c.expect_closed();

    // Bad request magic in the transmission phase.
    let (mut c, _, _) = Client::go(addr);
    c.send(&[0xab; 28]);
    c.expect_closed();

    // Truncated request: header then half a write payload, then EOF.
    let (mut c, _, _) = Client::go(addr);
    c.request(CMD_WRITE, 0, 1, 0, 4096, &[9; 100]);
    c.s.shutdown(std::net::Shutdown::Write).unwrap();
    c.expect_closed();

    // Huge write length: the payload is not worth reading, the connection closes.
    let (mut c, _, _) = Client::go(addr);
    c.request(CMD_WRITE, 0, 1, 0, u32::MAX, &[0; 64]);
    c.expect_closed();

    // Requests after NBD_CMD_DISC are not executed.
    let (mut c, _, _) = Client::go(addr);
    c.request(CMD_DISC, 0, 1, 0, 0, &[]);
    c.request(CMD_WRITE, 0, 2, 0, 512, &[1; 512]);
    c.expect_closed();

    assert_eq!(vol.writes.load(Ordering::Relaxed), 0);
    assert_eq!(healthy.call(CMD_READ, 0, 0, 512, &[]), (0, vec![0; 512]));
    let (mut fresh, _, _) = Client::go(addr);
    assert_eq!(fresh.call(CMD_WRITE, 0, 0, 512, &[5; 512]).0, 0);
    assert_eq!(healthy.call(CMD_READ, 0, 0, 512, &[]).1, vec![5; 512]);
    srv.shutdown();
}

#[test]
fn max_connections_and_shutdown() {
    let vol = Arc::new(MemVolume::new(BS, BLOCKS));
    let srv = serve_with(vol.clone(), 2);
    let addr = srv.local_addr();
    let (_a, _, _) = Client::go(addr);
    let (mut b, _, _) = Client::go(addr);
    // The third is closed before any greeting.
    let third = std::net::TcpStream::connect(addr).unwrap();
    third
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    Client { s: third }.expect_closed();
    assert_eq!(srv.connections(), 2);
    // Shutdown closes the open ones.
    srv.shutdown();
    b.expect_closed();
}

#[test]
fn start_rejects_bad_config() {
    let vol = Arc::new(MemVolume::new(BS, BLOCKS));
    let cfg = config(0);
    assert!(nbd_target::start(cfg.clone(), vol.clone()).is_err());
    let cfg = nbd_target::NbdConfig {
        max_connections: 1,
        export_name: "a\0b".into(),
        ..cfg
    };
    assert!(nbd_target::start(cfg, vol).is_err());
}

/// A volume that holds every request until released, to observe how much
/// a connection lets pile up.
struct Parked {
    inner: MemVolume,
    held: std::sync::Mutex<Vec<(volume::VolumeOp, volume::Completion)>>,
}

impl Parked {
    fn held(&self) -> usize {
        self.held.lock().unwrap().len()
    }
    fn release(&self) {
        let held: Vec<_> = self.held.lock().unwrap().drain(..).collect();
        for (op, done) in held {
            self.inner.submit(op, done);
        }
    }
}

use volume::{Volume, Wrapper};

impl Wrapper for Parked {
    fn inner(&self) -> &dyn Volume {
        &self.inner
    }
    fn take(&self, op: volume::VolumeOp, done: volume::Completion) {
        self.held.lock().unwrap().push((op, done));
    }
}

fn pile_up(len: u32, count: u64, expect_held: std::ops::RangeInclusive<usize>) {
    let vol = Arc::new(Parked {
        inner: MemVolume::new(512, 2 * 65536), // 64 MiB
        held: std::sync::Mutex::new(Vec::new()),
    });
    let srv = serve_with(vol.clone(), 1);
    let (mut c, _, _) = Client::go(srv.local_addr());
    let mut s = c.s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        for h in 0..count {
            let off = (h * len as u64) % (64 << 20);
            let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
            m.extend_from_slice(&0u16.to_be_bytes());
            m.extend_from_slice(&CMD_WRITE.to_be_bytes());
            m.extend_from_slice(&h.to_be_bytes());
            m.extend_from_slice(&off.to_be_bytes());
            m.extend_from_slice(&len.to_be_bytes());
            m.resize(28 + len as usize, h as u8);
            s.write_all(&m).unwrap();
        }
    });
    // Wait for the server to read up to its limit, then give it time to
    // (wrongly) read more.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while vol.held() < *expect_held.start() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    let held = vol.held();
    assert!(
        expect_held.contains(&held),
        "{held} requests held, want {expect_held:?}"
    );
    // Release in rounds until everything is answered.
    let reader = std::thread::spawn(move || {
        for _ in 0..count {
            assert_eq!(c.reply().0, 0);
        }
    });
    while !reader.is_finished() {
        vol.release();
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    reader.join().unwrap();
    sender.join().unwrap();
    srv.shutdown();
}

#[test]
fn inflight_requests_are_bounded_by_count() {
    let max = nbd_target::MAX_INFLIGHT_PER_CONNECTION;
    pile_up(4096, 400, max..=max);
}

#[test]
fn inflight_requests_are_bounded_by_bytes() {
    let max = nbd_target::session::MAX_INFLIGHT_BYTES >> 20;
    pile_up(1 << 20, 60, max..=max + 1);
}

/// A volume whose every request fails with one error.
struct Failing(volume::IoError);

impl Volume for Failing {
    fn geometry(&self) -> volume::Geometry {
        volume::Geometry {
            block_size: BS,
            num_blocks: BLOCKS,
        }
    }
    fn identity(&self) -> volume::VolumeIdentity {
        MemVolume::new(BS, 1).identity()
    }
    fn path_state(&self) -> PathState {
        PathState::Optimized
    }
    fn path_epoch(&self) -> u64 {
        1
    }
    fn max_io_bytes(&self) -> u32 {
        1 << 20
    }
    fn submit(&self, _op: volume::VolumeOp, done: volume::Completion) {
        done(Err(self.0))
    }
}

#[test]
fn volume_errors_map_to_nbd_errno() {
    use volume::IoError::*;
    let cases = [
        (Io(5), EIO, EIO),
        (Io(28), ENOSPC, ENOSPC),
        (Io(122), ENOSPC, ENOSPC), // EDQUOT
        (Unavailable, ESHUTDOWN, ESHUTDOWN),
        (TooLarge, EOVERFLOW, EOVERFLOW),
        (OutOfRange, EINVAL, ENOSPC),
        (Unaligned, EINVAL, EINVAL),
        (NotPrimary, EPERM, EPERM),
    ];
    for (err, read_errno, write_errno) in cases {
        let srv = serve_with(Arc::new(Failing(err)), 1);
        let (mut c, _, _) = Client::go(srv.local_addr());
        assert_eq!(c.call(CMD_READ, 0, 0, 512, &[]).0, read_errno, "{err:?}");
        assert_eq!(
            c.call(CMD_WRITE, 0, 0, 512, &[0; 512]).0,
            write_errno,
            "{err:?}"
        );
        assert_eq!(
            c.call(CMD_WRITE_ZEROES, CMD_FLAG_FUA, 0, 512, &[]).0,
            write_errno
        );
        // The connection is still in sync after the errors.
        assert_eq!(c.call(CMD_TRIM, 0, 0, 512, &[]).0, write_errno);
        srv.shutdown();
    }
}

#[test]
fn shutdown_does_not_wait_for_a_stuck_volume() {
    let vol = Arc::new(Parked {
        inner: MemVolume::new(BS, BLOCKS),
        held: std::sync::Mutex::new(Vec::new()),
    });
    let srv = serve_with(vol.clone(), 4);
    let (mut c, _, _) = Client::go(srv.local_addr());
    c.request(CMD_WRITE, 0, 1, 0, 512, &[1; 512]);
    // A second client still in the handshake.
    let (_h, _) = Client::connect(srv.local_addr());
    while vol.held() == 0 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let t0 = std::time::Instant::now();
    srv.shutdown();
    assert!(t0.elapsed() < std::time::Duration::from_secs(5));
    c.expect_closed();
    // The late completion finds nobody listening, harmlessly.
    vol.release();
    assert_eq!(vol.inner.writes.load(Ordering::Relaxed), 1);
}

/// A MemVolume that enforces `max_io_bytes` on ranges too, and records
/// every request it receives.
struct Strict {
    inner: MemVolume,
    log: std::sync::Mutex<Vec<String>>,
}

impl Wrapper for Strict {
    fn inner(&self) -> &dyn Volume {
        &self.inner
    }
    fn io_limit(&self) -> u32 {
        1 << 20
    }
    fn take(&self, op: volume::VolumeOp, done: volume::Completion) {
        use volume::VolumeOp::*;
        let entry = match &op {
            Discard { offset, len } => format!("discard {offset}+{len}"),
            WriteZeroes { offset, len } => format!("zeroes {offset}+{len}"),
            Flush => "flush".into(),
            Read { .. } => "read".into(),
            Write { .. } => "write".into(),
        };
        self.log.lock().unwrap().push(entry);
        match op {
            Discard { len, .. } | WriteZeroes { len, .. } if len > 1 << 20 => {
                done(Err(volume::IoError::TooLarge))
            }
            op => self.inner.submit(op, done),
        }
    }
}

#[test]
fn long_ranges_go_whole_and_are_split_only_on_too_large() {
    const MIB: u64 = 1 << 20;
    let strict = Arc::new(Strict {
        inner: MemVolume::new(BS, 5 * 2048 + 8), // 5 MiB + 4 KiB
        log: std::sync::Mutex::new(Vec::new()),
    });
    let srv = serve_with(strict.clone(), 1);
    let (mut c, size, _) = Client::go(srv.local_addr());
    assert_eq!(size, 5 * MIB + 4096);
    assert_eq!(c.call(CMD_WRITE, 0, size - 512, 512, &[7; 512]).0, 0);
    strict.log.lock().unwrap().clear();
    assert_eq!(
        c.call(CMD_WRITE_ZEROES, CMD_FLAG_FUA, 0, size as u32, &[])
            .0,
        0
    );
    let log = std::mem::take(&mut *strict.log.lock().unwrap());
    let want: Vec<String> = [
        format!("zeroes 0+{size}"),
        format!("zeroes 0+{MIB}"),
        format!("zeroes {MIB}+{MIB}"),
        format!("zeroes {}+{MIB}", 2 * MIB),
        format!("zeroes {}+{MIB}", 3 * MIB),
        format!("zeroes {}+{MIB}", 4 * MIB),
        format!("zeroes {}+4096", 5 * MIB),
        "flush".into(),
    ]
    .into();
    assert_eq!(log, want);
    assert_eq!(c.call(CMD_READ, 0, size - 512, 512, &[]).1, vec![0; 512]);

    // A plain MemVolume takes the same request whole.
    let vol = Arc::new(MemVolume::new(BS, 4 * 2048));
    let srv2 = serve(&vol);
    let (mut c2, _, _) = Client::go(srv2.local_addr());
    assert_eq!(c2.call(CMD_TRIM, CMD_FLAG_FUA, 0, 4 << 20, &[]).0, 0);
    assert_eq!(vol.writes.load(Ordering::Relaxed), 1);
    srv.shutdown();
    srv2.shutdown();
}

/// Several connections at once, each pipelining writes to its own region
/// and reading them back; then every connection sees every region
/// (CAN_MULTI_CONN: one shared volume).
#[test]
fn concurrent_connections_share_one_volume() {
    let vol = Arc::new(MemVolume::new(BS, BLOCKS));
    let srv = serve_dyn(AsyncVolume::new(vol.clone()));
    let addr = srv.local_addr();
    const CONNS: u64 = 4;
    const REGION: u64 = SIZE / CONNS;
    let threads: Vec<_> = (0..CONNS)
        .map(|i| {
            std::thread::spawn(move || {
                let (mut c, _, _) = Client::go(addr);
                let mut batch = Vec::new();
                for j in 0..REGION / 4096 {
                    let off = i * REGION + j * 4096;
                    let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
                    m.extend_from_slice(&CMD_FLAG_FUA.to_be_bytes());
                    m.extend_from_slice(&CMD_WRITE.to_be_bytes());
                    m.extend_from_slice(&j.to_be_bytes());
                    m.extend_from_slice(&off.to_be_bytes());
                    m.extend_from_slice(&4096u32.to_be_bytes());
                    m.extend_from_slice(&pattern((i * 64 + j) as u8, 4096));
                    batch.extend_from_slice(&m);
                }
                let mut s = c.s.try_clone().unwrap();
                let sender = std::thread::spawn(move || s.write_all(&batch).unwrap());
                for _ in 0..REGION / 4096 {
                    assert_eq!(c.reply().0, 0);
                }
                sender.join().unwrap();
                assert_eq!(c.call(CMD_FLUSH, 0, 0, 0, &[]).0, 0);
                c
            })
        })
        .collect();
    let mut clients: Vec<Client> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    for c in clients.iter_mut() {
        for i in 0..CONNS {
            for j in [0, REGION / 4096 - 1] {
                let off = i * REGION + j * 4096;
                let want = pattern((i * 64 + j) as u8, 4096);
                assert_eq!(c.call(CMD_READ, 0, off, 4096, &[]).1, want);
            }
        }
    }
    assert_eq!(vol.writes.load(Ordering::Relaxed), SIZE / 4096);
    srv.shutdown();
}

/// The helper behind every "connection closed" assertion above: EOF and a
/// reset are a close, a server that accepts and then goes silent is not
/// (its read times out), and neither is one that sends a byte.
#[test]
fn closed_helper_tells_eof_and_reset_from_a_silent_server() {
    use std::net::{TcpListener, TcpStream};
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let client = || {
        let s = TcpStream::connect(addr).unwrap();
        // Only the silent case waits this long, and silence is its answer.
        s.set_read_timeout(Some(std::time::Duration::from_millis(300)))
            .unwrap();
        Client { s }
    };

    // Silent: accepted and held open, never answered.
    let mut c = client();
    let (held, _) = l.accept().unwrap();
    assert_eq!(c.next_read(), ReadEnd::Timeout);
    assert!(
        !c.is_closed(),
        "a silent server has not closed the connection"
    );

    // EOF: the server closes.
    let mut c = client();
    drop(l.accept().unwrap());
    assert_eq!(c.next_read(), ReadEnd::Eof);
    let mut c = client();
    drop(l.accept().unwrap());
    assert!(c.is_closed());

    // Reset: the server closes with unread bytes in its receive buffer, so
    // the kernel answers with RST.
    let reset = || {
        let mut c = client();
        c.send(b"unread");
        let (s, _) = l.accept().unwrap();
        let mut b = [0u8; 6];
        assert_eq!(s.peek(&mut b).unwrap(), 6, "the bytes reached the server");
        drop(s);
        c
    };
    assert_eq!(reset().next_read(), ReadEnd::Reset);
    assert!(reset().is_closed());

    // Bytes: the server answered, the connection is open.
    let mut c = client();
    let (mut s, _) = l.accept().unwrap();
    Write::write_all(&mut s, b"x").unwrap();
    assert_eq!(c.next_read(), ReadEnd::Data(b'x'));
    drop(held);
}
