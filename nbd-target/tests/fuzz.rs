//! Deterministic, seeded fuzzing of the handshake and request parsing.
//! No sockets: `session::serve` runs over byte buffers, against a volume
//! that fails the test if it ever receives an invalid request.
//! Reproduce a failure with its printed seed and iteration.

use std::io::Cursor;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};

use nbd_target::proto::*;
use nbd_target::session::{serve, NoTransport, SessionCtx};
use volume::{Completion, MemVolume, Volume, VolumeOp, Wrapper};

const BS: u32 = 512;
const BLOCKS: u64 = 256; // 128 KiB
const MAX_IO: u32 = 64 << 10; // half the volume: long ranges get split

/// xorshift64*: small, deterministic, good enough to pick mutations.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

/// A MemVolume that panics (failing the test) on any request the NBD
/// layer should have refused, and counts what it accepted.
struct Checked {
    inner: Arc<MemVolume>,
    mutations: AtomicU64,
    too_large: AtomicU64,
    /// When set, requests complete on this worker thread instead of inline.
    worker: Option<Mutex<Sender<(VolumeOp, Completion)>>>,
}

impl Wrapper for Checked {
    fn inner(&self) -> &dyn Volume {
        &*self.inner
    }
    fn io_limit(&self) -> u32 {
        MAX_IO
    }
    fn take(&self, op: VolumeOp, done: Completion) {
        let g = self.geometry();
        let (off, len) = match &op {
            VolumeOp::Read { offset, len } => (*offset, *len as u64),
            VolumeOp::Write { offset, data, .. } => (*offset, data.len() as u64),
            VolumeOp::Discard { offset, len } | VolumeOp::WriteZeroes { offset, len } => {
                (*offset, *len)
            }
            VolumeOp::Flush => (0, 0),
        };
        if !matches!(op, VolumeOp::Flush) {
            assert!(len > 0, "empty request reached the volume: {op:?}");
            assert_eq!(
                g.check_range(off, len),
                Ok(()),
                "bad range reached the volume: {op:?}"
            );
        }
        if len > MAX_IO as u64 {
            // Like a volume that enforces its limit on every op: only a
            // range may be longer, and the front-end must split it.
            assert!(
                matches!(op, VolumeOp::Discard { .. } | VolumeOp::WriteZeroes { .. }),
                "oversized data request reached the volume: {op:?}"
            );
            self.too_large.fetch_add(1, Ordering::Relaxed);
            return done(Err(volume::IoError::TooLarge));
        }
        if op.is_mutation() {
            self.mutations.fetch_add(1, Ordering::Relaxed);
        }
        match &self.worker {
            Some(w) => {
                let _ = w.lock().unwrap().send((op, done));
            }
            None => self.inner.submit(op, done),
        }
    }
}

fn ctx() -> (Arc<Checked>, SessionCtx) {
    ctx_with(false)
}

/// `on_thread`: completions run on a worker thread, as with the engine.
fn ctx_with(on_thread: bool) -> (Arc<Checked>, SessionCtx) {
    let inner = Arc::new(MemVolume::new(BS, BLOCKS));
    let worker = on_thread.then(|| {
        let (tx, rx) = mpsc::channel::<(VolumeOp, Completion)>();
        let mem = inner.clone();
        std::thread::spawn(move || {
            for (op, done) in rx {
                mem.submit(op, done);
            }
        });
        Mutex::new(tx)
    });
    let vol = Arc::new(Checked {
        inner,
        mutations: AtomicU64::new(0),
        too_large: AtomicU64::new(0),
        worker,
    });
    let ctx = SessionCtx::new(
        vol.clone(),
        "vol0".into(),
        "fuzz".into(),
        8,
        Arc::new(AtomicBool::new(false)),
    );
    (vol, ctx)
}

fn run(input: &[u8], ctx: &SessionCtx) -> Vec<u8> {
    let mut out = Vec::new();
    serve(Cursor::new(input), &mut out, ctx, "fuzz", &NoTransport);
    out
}

fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    m
}

fn go(name: &str, reqs: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
    for r in reqs {
        d.extend_from_slice(&r.to_be_bytes());
    }
    d
}

fn request(kind: u16, flags: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(&kind.to_be_bytes());
    m.extend_from_slice(&handle.to_be_bytes());
    m.extend_from_slice(&offset.to_be_bytes());
    m.extend_from_slice(&len.to_be_bytes());
    if kind == CMD_WRITE {
        m.resize(m.len() + len as usize, 0x5a);
    }
    m
}

fn handshake(rng: &mut Rng) -> Vec<u8> {
    let mut s = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    if rng.below(2) == 0 {
        s.extend(option(OPT_LIST, &[]));
        s.extend(option(OPT_INFO, &go("vol0", &[INFO_NAME, INFO_BLOCK_SIZE])));
        s.extend(option(OPT_STRUCTURED_REPLY, &[]));
    }
    if rng.below(4) == 0 {
        s.extend(option(OPT_EXPORT_NAME, b"vol0"));
    } else {
        s.extend(option(OPT_GO, &go("vol0", &[INFO_DESCRIPTION])));
    }
    s
}

/// A valid request, or with `invalid`, one the server must refuse.
fn random_request(rng: &mut Rng, invalid: bool) -> Vec<u8> {
    let size = BS as u64 * BLOCKS;
    let kinds = [CMD_READ, CMD_WRITE, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES];
    let kind = kinds[rng.below(kinds.len() as u64) as usize];
    // Mostly small requests; sometimes a range longer than MAX_IO.
    let long = rng.below(8) == 0 && matches!(kind, CMD_TRIM | CMD_WRITE_ZEROES);
    let blocks = if long {
        BLOCKS / 2 + rng.below(BLOCKS / 2)
    } else {
        1 + rng.below(8)
    };
    let off = rng.below(BLOCKS - blocks) * BS as u64;
    let (mut off, mut len) = (off, (blocks * BS as u64) as u32);
    let mut flags = if rng.below(3) == 0 { CMD_FLAG_FUA } else { 0 };
    if kind == CMD_FLUSH {
        (off, len) = (0, 0);
    }
    let mut kind = kind;
    if invalid {
        match rng.below(8) {
            0 => off = size + rng.below(4) * BS as u64,
            1 => off = u64::MAX - rng.below(1024),
            2 => off += 1 + rng.below(BS as u64 - 1),
            3 => len += 1 + rng.below(BS as u64 - 1) as u32,
            4 => len = 0,
            5 => kind = [5, 7, 8, 9, 0x7fff, 0xffff][rng.below(6) as usize],
            6 => flags |= 1 << (2 + rng.below(14)),
            _ => {
                kind = if rng.below(2) == 0 {
                    CMD_READ
                } else {
                    CMD_WRITE
                };
                len = MAX_IO + BS * (1 + rng.below(4) as u32);
            }
        }
        if kind == CMD_FLUSH && off == 0 && len == 0 {
            len = BS;
        }
        if kind == CMD_WRITE && len > 4 * MAX_IO {
            len = MAX_IO + BS;
        }
    }
    request(kind, flags, rng.next(), off, len)
}

fn mutate(rng: &mut Rng, s: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(4) {
        if s.is_empty() {
            s.push(rng.next() as u8);
        }
        let at = rng.below(s.len() as u64) as usize;
        match rng.below(7) {
            0 => s[at] ^= 1 << rng.below(8),
            1 => s[at] = rng.next() as u8,
            2 => s.truncate(at),
            3 => {
                let n = rng.below(32) as usize;
                let end = (at + n).min(s.len());
                s.drain(at..end);
            }
            4 => {
                let n = rng.below(16) as usize;
                for _ in 0..n {
                    s.insert(at, rng.next() as u8);
                }
            }
            5 => {
                // An interesting 32-bit value over a length or option field.
                let v: u32 =
                    [0, 1, 511, 512, 4096, u32::MAX, 1 << 31, MAX_IO + 512][rng.below(8) as usize];
                let end = (at + 4).min(s.len());
                s[at..end].copy_from_slice(&v.to_be_bytes()[..end - at]);
            }
            _ => {
                let n = rng.below(64) as usize;
                let end = (at + n).min(s.len());
                let chunk = s[at..end].to_vec();
                s.splice(at..at, chunk);
            }
        }
    }
}

#[test]
fn mutated_streams_never_panic_or_send_bad_requests_to_the_volume() {
    let seed = 0x5eed_0001u64;
    let mut rng = Rng(seed);
    let (mut wrote, mut replied, mut split) = (0, 0, 0);
    for iter in 0..3000 {
        let (vol, ctx) = ctx_with(iter % 2 == 1);
        let mut s = handshake(&mut rng);
        for _ in 0..rng.below(12) {
            let invalid = rng.below(3) == 0;
            s.extend(random_request(&mut rng, invalid));
        }
        if rng.below(2) == 0 {
            s.extend(request(CMD_DISC, 0, 0, 0, 0));
        }
        mutate(&mut rng, &mut s);
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&s, &ctx)));
        let out = out.unwrap_or_else(|_| panic!("seed {seed:#x} iteration {iter} panicked"));
        assert_eq!(&out[..8], &NBDMAGIC.to_be_bytes(), "iteration {iter}");
        wrote += (vol.mutations.load(Ordering::Relaxed) > 0) as u32;
        split += vol.too_large.load(Ordering::Relaxed);
        replied += out
            .windows(4)
            .any(|w| w == SIMPLE_REPLY_MAGIC.to_be_bytes()) as u32;
    }
    // The mutations must leave enough streams intact to exercise the
    // transmission phase, or this test proves nothing.
    println!("{wrote} of 3000 streams wrote, {replied} got replies, {split} ranges split");
    assert!(
        wrote > 300 && replied > 600 && split > 50,
        "{wrote} wrote, {replied} replied, {split} split"
    );
}

#[test]
fn invalid_requests_never_reach_the_volume() {
    let seed = 0x5eed_0002u64;
    let mut rng = Rng(seed);
    for iter in 0..2000 {
        let (vol, ctx) = ctx_with(iter % 2 == 1);
        let mut s = handshake(&mut rng);
        let n = 1 + rng.below(10);
        for _ in 0..n {
            s.extend(random_request(&mut rng, true));
        }
        let out = run(&s, &ctx);
        assert_eq!(
            vol.mutations.load(Ordering::Relaxed),
            0,
            "seed {seed:#x} iteration {iter}"
        );
        assert_eq!(vol.inner.writes.load(Ordering::Relaxed), 0);
        // Every refused request got an error reply (none closed the stream
        // early: refused write payloads were drained).
        let replies = out
            .windows(4)
            .filter(|w| *w == SIMPLE_REPLY_MAGIC.to_be_bytes())
            .count();
        assert!(
            replies as u64 >= n,
            "iteration {iter}: {replies} replies for {n} requests"
        );
    }
}

#[test]
fn garbage_handshakes_never_reach_transmission() {
    let mut rng = Rng(0x5eed_0003);
    for _ in 0..3000 {
        let (vol, ctx) = ctx();
        let len = rng.below(200) as usize;
        let mut s: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        // Followed by a write that must not be executed.
        s.extend(request(CMD_WRITE, 0, 1, 0, 512));
        run(&s, &ctx);
        assert_eq!(vol.mutations.load(Ordering::Relaxed), 0);
    }
}

#[test]
fn decoder_accepts_only_executable_requests() {
    let mut rng = Rng(0x5eed_0004);
    let lim = Limits {
        size_bytes: BS as u64 * BLOCKS,
        block_size: BS,
        max_payload_bytes: MAX_IO,
    };
    for _ in 0..200_000 {
        let mut b = [0u8; REQUEST_HEADER_BYTES];
        for x in b.iter_mut() {
            *x = rng.next() as u8;
        }
        if rng.below(2) == 0 {
            b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
            b[6] = 0;
            b[7] = rng.below(10) as u8;
        }
        let h = RequestHeader::parse(&b);
        match decode_request(&h, &lim) {
            Decoded::Execute(cmd) => {
                assert_eq!(h.magic, REQUEST_MAGIC);
                let (off, len) = match cmd {
                    Command::Flush => continue,
                    Command::Read { offset, len } | Command::Write { offset, len, .. } => {
                        assert!(len <= MAX_IO);
                        (offset, len)
                    }
                    Command::Trim { offset, len, .. }
                    | Command::WriteZeroes { offset, len, .. } => (offset, len),
                };
                assert!(len > 0 && off % BS as u64 == 0 && len % BS == 0);
                assert!(off + len as u64 <= lim.size_bytes);
            }
            Decoded::Refuse { drain, .. } => {
                assert!(drain <= DRAIN_LIMIT_BYTES);
                assert_eq!(drain, if h.kind == CMD_WRITE { h.length } else { 0 });
            }
            Decoded::Close(_) => {}
            Decoded::Disconnect => assert_eq!(h.kind, CMD_DISC),
        }
    }
}
