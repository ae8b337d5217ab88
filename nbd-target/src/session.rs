//! One NBD connection: handshake, then the transmission phase.
//!
//! The calling thread is the reader: it parses request headers, reads write
//! payloads and submits each request to the volume without waiting. A
//! scoped writer thread receives completions through a channel and sends
//! the replies, writing every queued reply before one flush. The reader
//! stops reading while `max_inflight` requests or [`MAX_INFLIGHT_BYTES`] of
//! payload are unanswered, which bounds the memory a connection can hold
//! (to that budget plus one request).
//!
//! [`serve`] works over any `Read`/`Write` pair: the server hands it a
//! socket, tests and the fuzz driver hand it byte buffers.

use std::io::{self, BufWriter, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::{self, Thread};
use std::time::Duration;

use volume::{Completion, IoError, IoResult, Volume, VolumeOp};

use crate::handshake::{negotiate, ExportInfo, HandshakeEnd};
use crate::proto::*;

/// Socket buffer sizes on our side of each connection.
pub const READ_BUFFER_BYTES: usize = 256 * 1024;
pub const REPLY_BUFFER_BYTES: usize = 256 * 1024;

/// Read and write payload bytes held by unanswered requests after which a
/// connection's reader stops reading.
pub const MAX_INFLIGHT_BYTES: usize = 32 << 20;

/// Write buffers kept per connection for reuse, and the largest one kept.
const POOL_BUFFERS: usize = 64;
const POOL_BUFFER_MAX_BYTES: usize = 128 * 1024;

/// How often a blocked writer or reader looks at the stop flags.
const POLL_MS: u64 = 100;

/// Everything a connection needs that is the same for all connections.
pub struct SessionCtx {
    pub export: ExportInfo,
    pub limits: Limits,
    pub vol: Arc<dyn Volume>,
    /// Unanswered requests after which the reader stops reading.
    pub max_inflight: usize,
    /// Set when the server shuts down.
    pub stop: Arc<AtomicBool>,
}

impl SessionCtx {
    /// Builds the export description from the volume.
    pub fn new(
        vol: Arc<dyn Volume>,
        name: String,
        description: String,
        max_inflight: usize,
        stop: Arc<AtomicBool>,
    ) -> SessionCtx {
        let g = vol.geometry();
        let bs = g.block_size.max(1);
        // Never more per request than a refused write may drain, which also
        // caps the buffer one request can make the reader allocate.
        let max_io = vol.max_io_bytes().min(DRAIN_LIMIT_BYTES);
        let max_payload = (max_io / bs * bs).max(bs);
        SessionCtx {
            export: ExportInfo {
                name,
                description,
                size_bytes: g.size_bytes(),
                flags: EXPORT_FLAGS,
                min_block_bytes: bs,
                preferred_block_bytes: prev_power_of_two(bs.max(4096).min(max_payload)),
                max_block_bytes: max_payload,
            },
            limits: Limits {
                size_bytes: g.size_bytes(),
                block_size: bs,
                max_payload_bytes: max_payload,
            },
            vol,
            max_inflight: max_inflight.max(1),
            stop,
        }
    }
}

/// Largest power of two <= `x` (`x` > 0).
fn prev_power_of_two(x: u32) -> u32 {
    1 << (31 - x.max(1).leading_zeros())
}

/// Hooks into the connection's transport (no-ops for byte buffers).
pub trait Transport: Sync {
    /// The handshake finished: lift the handshake timeout.
    fn negotiated(&self) {}
    /// The writer is done: close the connection so a blocked reader wakes.
    fn close(&self) {}
}

/// A transport with nothing to do, for buffers.
pub struct NoTransport;
impl Transport for NoTransport {}

/// How a connection ended.
#[derive(Debug)]
pub enum SessionEnd {
    Handshake(HandshakeEnd),
    /// NBD_CMD_DISC.
    Disconnect,
    /// End of file or a socket error between requests.
    Closed(Option<io::Error>),
    /// The client broke the protocol in the transmission phase.
    Violation(Violation),
    /// The server is shutting down, or the reply side failed.
    Stopped,
}

/// Runs one connection to its end.
pub fn serve<R: Read, W: Write + Send>(
    mut r: R,
    w: W,
    ctx: &SessionCtx,
    peer: &str,
    t: &dyn Transport,
) -> SessionEnd {
    let mut w = BufWriter::with_capacity(REPLY_BUFFER_BYTES, w);
    if let Err(e) = negotiate(&mut r, &mut w, &ctx.export, &|| {
        ctx.stop.load(Ordering::Relaxed)
    }) {
        return SessionEnd::Handshake(e);
    }
    t.negotiated();
    log::debug!("nbd {peer}: transmission phase");
    transmission(r, w, ctx, peer, t)
}

impl Kind {
    fn is_mutation(self) -> bool {
        matches!(self, Kind::Write(_) | Kind::Mutation)
    }

    /// Payload bytes the request holds until its reply is sent.
    fn charge(self) -> usize {
        match self {
            Kind::Read(n) | Kind::Write(n) => n as usize,
            Kind::Mutation | Kind::Flush => 0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Carries `len` bytes of data on success.
    Read(u32),
    /// A write whose `len`-byte payload the connection holds.
    Write(u32),
    /// TRIM, WRITE_ZEROES, or a refused write (payload already dropped).
    Mutation,
    Flush,
}

enum Fail {
    Volume(IoError),
    Errno(u32),
}

struct Reply {
    handle: u64,
    kind: Kind,
    result: Result<Vec<u8>, Fail>,
}

/// State shared by a connection's reader and writer.
struct Shared {
    inflight: AtomicUsize,
    inflight_bytes: AtomicUsize,
    /// The writer has exited: the reader must stop.
    dead: AtomicBool,
    pool: Mutex<Vec<Vec<u8>>>,
}

impl Shared {
    /// Counts one more unanswered request holding `bytes` of payload.
    fn admit(&self, bytes: u32) {
        self.inflight.fetch_add(1, Ordering::AcqRel);
        self.inflight_bytes
            .fetch_add(bytes as usize, Ordering::AcqRel);
    }

    fn full(&self, max_inflight: usize) -> bool {
        self.inflight.load(Ordering::Acquire) >= max_inflight
            || self.inflight_bytes.load(Ordering::Acquire) >= MAX_INFLIGHT_BYTES
    }

    fn take_buffer(&self, len: usize) -> Vec<u8> {
        let mut b = self
            .pool
            .lock()
            .map(|mut p| p.pop())
            .ok()
            .flatten()
            .unwrap_or_default();
        b.clear();
        b.resize(len, 0);
        b
    }

    fn give_buffer(&self, b: Vec<u8>) {
        if b.capacity() <= POOL_BUFFER_MAX_BYTES {
            if let Ok(mut p) = self.pool.lock() {
                if p.len() < POOL_BUFFERS {
                    p.push(b);
                }
            }
        }
    }
}

fn completion(tx: &Sender<Reply>, handle: u64, kind: Kind) -> Completion {
    let tx = tx.clone();
    Box::new(move |res: IoResult| {
        // The connection may be gone; then nobody wants the reply.
        let _ = tx.send(Reply {
            handle,
            kind,
            result: res.map_err(Fail::Volume),
        });
    })
}

/// Submits a discard or write-zeroes, split into pieces of at most `chunk`
/// bytes (the volume's request limit); `done` runs once after the last
/// piece with the first error, if any.
fn submit_range(
    vol: &dyn Volume,
    op: fn(u64, u64) -> VolumeOp,
    offset: u64,
    len: u64,
    chunk: u64,
    done: Completion,
) {
    if len <= chunk {
        vol.submit(op(offset, len), done);
        return;
    }
    struct FanIn {
        left: AtomicUsize,
        first_err: Mutex<Option<IoError>>,
        done: Mutex<Option<Completion>>,
    }
    let pieces = len.div_ceil(chunk);
    let fan = Arc::new(FanIn {
        left: AtomicUsize::new(pieces as usize),
        first_err: Mutex::new(None),
        done: Mutex::new(Some(done)),
    });
    let mut at = offset;
    let end = offset + len;
    while at < end {
        let n = chunk.min(end - at);
        let fan = fan.clone();
        vol.submit(
            op(at, n),
            Box::new(move |res: IoResult| {
                if let Err(e) = res {
                    if let Ok(mut slot) = fan.first_err.lock() {
                        slot.get_or_insert(e);
                    }
                }
                if fan.left.fetch_sub(1, Ordering::AcqRel) == 1 {
                    let err = fan.first_err.lock().ok().and_then(|s| *s);
                    let done = fan.done.lock().ok().and_then(|mut d| d.take());
                    if let Some(done) = done {
                        done(err.map_or(Ok(Vec::new()), Err));
                    }
                }
            }),
        );
        at += n;
    }
}

/// Wraps `done` so that a successful mutation is followed by a volume
/// flush before it completes (FUA on TRIM / WRITE_ZEROES, which the volume
/// ops cannot carry themselves).
fn then_flush(vol: &Arc<dyn Volume>, done: Completion) -> Completion {
    let vol = vol.clone();
    Box::new(move |res: IoResult| match res {
        Ok(_) => vol.submit(VolumeOp::Flush, done),
        Err(e) => done(Err(e)),
    })
}

fn transmission<R: Read, W: Write + Send>(
    mut r: R,
    w: BufWriter<W>,
    ctx: &SessionCtx,
    peer: &str,
    t: &dyn Transport,
) -> SessionEnd {
    let shared = Shared {
        inflight: AtomicUsize::new(0),
        inflight_bytes: AtomicUsize::new(0),
        dead: AtomicBool::new(false),
        pool: Mutex::new(Vec::new()),
    };
    let (tx, rx) = mpsc::channel::<Reply>();
    let reader = thread::current();
    thread::scope(|s| {
        let shared = &shared;
        let spawned = thread::Builder::new()
            .name("nbd-reply".into())
            .spawn_scoped(s, move || writer_loop(w, rx, shared, ctx, peer, t, reader));
        if let Err(e) = spawned {
            // Nothing was read yet; `tx` is dropped with this scope.
            log::error!("nbd {peer}: cannot start the reply thread: {e}");
            return SessionEnd::Stopped;
        }
        let end = reader_loop(&mut r, tx, shared, ctx);
        match &end {
            SessionEnd::Violation(v) => log::warn!("nbd {peer}: closing connection: {v:?}"),
            SessionEnd::Closed(Some(e)) => log::info!("nbd {peer}: connection lost: {e}"),
            _ => log::debug!("nbd {peer}: connection ended: {end:?}"),
        }
        end
    })
}

fn reader_loop<R: Read>(r: &mut R, tx: Sender<Reply>, sh: &Shared, ctx: &SessionCtx) -> SessionEnd {
    let mut hdr = [0u8; REQUEST_HEADER_BYTES];
    let chunk = ctx.limits.max_payload_bytes as u64;
    loop {
        while sh.full(ctx.max_inflight) {
            if sh.dead.load(Ordering::Acquire) || ctx.stop.load(Ordering::Relaxed) {
                return SessionEnd::Stopped;
            }
            thread::park_timeout(Duration::from_millis(POLL_MS));
        }
        if sh.dead.load(Ordering::Acquire) || ctx.stop.load(Ordering::Relaxed) {
            return SessionEnd::Stopped;
        }
        match r.read_exact(&mut hdr) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return SessionEnd::Closed(None),
            Err(e) => return SessionEnd::Closed(Some(e)),
        }
        let h = RequestHeader::parse(&hdr);
        let cmd = match decode_request(&h, &ctx.limits) {
            Decoded::Execute(cmd) => cmd,
            Decoded::Disconnect => return SessionEnd::Disconnect,
            Decoded::Close(v) => return SessionEnd::Violation(v),
            Decoded::Refuse { errno, drain } => {
                if drain > 0 {
                    match io::copy(&mut r.by_ref().take(drain as u64), &mut io::sink()) {
                        Ok(n) if n == drain as u64 => {}
                        Ok(_) => return SessionEnd::Closed(None),
                        Err(e) => return SessionEnd::Closed(Some(e)),
                    }
                }
                let kind = if h.kind == CMD_READ {
                    Kind::Read(0)
                } else {
                    Kind::Mutation
                };
                sh.admit(0);
                let _ = tx.send(Reply {
                    handle: h.handle,
                    kind,
                    result: Err(Fail::Errno(errno)),
                });
                continue;
            }
        };
        let handle = h.handle;
        let vol = &*ctx.vol;
        match cmd {
            Command::Read { offset, len } => {
                sh.admit(len);
                vol.submit(
                    VolumeOp::Read { offset, len },
                    completion(&tx, handle, Kind::Read(len)),
                );
            }
            Command::Write { offset, len, fua } => {
                // The whole payload is read before anything is submitted
                // or refused, so the stream stays in sync.
                let mut data = sh.take_buffer(len as usize);
                if let Err(e) = r.read_exact(&mut data) {
                    return match e.kind() {
                        io::ErrorKind::UnexpectedEof => SessionEnd::Closed(None),
                        _ => SessionEnd::Closed(Some(e)),
                    };
                }
                sh.admit(len);
                vol.submit(
                    VolumeOp::Write { offset, data, fua },
                    completion(&tx, handle, Kind::Write(len)),
                );
            }
            Command::Flush => {
                sh.admit(0);
                vol.submit(VolumeOp::Flush, completion(&tx, handle, Kind::Flush));
            }
            Command::Trim { offset, len, fua } | Command::WriteZeroes { offset, len, fua } => {
                sh.admit(0);
                let mut done = completion(&tx, handle, Kind::Mutation);
                if fua {
                    done = then_flush(&ctx.vol, done);
                }
                let op: fn(u64, u64) -> VolumeOp = match cmd {
                    Command::Trim { .. } => |offset, len| VolumeOp::Discard { offset, len },
                    _ => |offset, len| VolumeOp::WriteZeroes { offset, len },
                };
                submit_range(vol, op, offset, len as u64, chunk, done);
            }
        }
    }
}

/// Encodes one reply into the buffered writer; returns buffers to the pool.
fn write_reply<W: Write>(
    w: &mut BufWriter<W>,
    rep: Reply,
    sh: &Shared,
    peer: &str,
    warned_backup: &mut bool,
) -> io::Result<()> {
    let errno = match rep.result {
        Ok(data) => {
            let res = match rep.kind {
                Kind::Read(len) if data.len() != len as usize => {
                    // A volume bug; refuse rather than desynchronise the stream.
                    log::error!(
                        "nbd {peer}: volume returned {} bytes for a {len}-byte read",
                        data.len()
                    );
                    w.write_all(&simple_reply(EIO, rep.handle))
                }
                Kind::Read(_) => w
                    .write_all(&simple_reply(0, rep.handle))
                    .and_then(|_| w.write_all(&data)),
                Kind::Write(_) | Kind::Mutation | Kind::Flush => {
                    w.write_all(&simple_reply(0, rep.handle))
                }
            };
            sh.give_buffer(data);
            return res;
        }
        Err(Fail::Errno(e)) => e,
        Err(Fail::Volume(e)) => {
            if e == IoError::NotPrimary && !*warned_backup {
                *warned_backup = true;
                log::warn!(
                    "nbd {peer}: this node is the backup; writes go to the primary \
                     (refusing I/O with EPERM)"
                );
            }
            nbd_errno(e, rep.kind.is_mutation())
        }
    };
    w.write_all(&simple_reply(errno, rep.handle))
}

fn writer_loop<W: Write>(
    mut w: BufWriter<W>,
    rx: Receiver<Reply>,
    sh: &Shared,
    ctx: &SessionCtx,
    peer: &str,
    t: &dyn Transport,
    reader: Thread,
) {
    let mut warned_backup = false;
    loop {
        let first = match rx.recv_timeout(Duration::from_millis(POLL_MS)) {
            Ok(rep) => rep,
            Err(RecvTimeoutError::Timeout) if ctx.stop.load(Ordering::Relaxed) => break,
            Err(RecvTimeoutError::Timeout) => continue,
            // The reader is done and every submitted request completed.
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let (mut n, mut bytes) = (1, first.kind.charge());
        let mut res = write_reply(&mut w, first, sh, peer, &mut warned_backup);
        while res.is_ok() {
            match rx.try_recv() {
                Ok(rep) => {
                    n += 1;
                    bytes += rep.kind.charge();
                    res = write_reply(&mut w, rep, sh, peer, &mut warned_backup);
                }
                Err(_) => break,
            }
        }
        let res = res.and_then(|_| w.flush());
        sh.inflight.fetch_sub(n, Ordering::AcqRel);
        sh.inflight_bytes.fetch_sub(bytes, Ordering::AcqRel);
        reader.unpark();
        if let Err(e) = res {
            log::info!("nbd {peer}: sending replies failed: {e}");
            break;
        }
    }
    let _ = w.flush();
    sh.dead.store(true, Ordering::Release);
    reader.unpark();
    t.close();
}
