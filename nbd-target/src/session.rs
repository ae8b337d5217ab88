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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Carries `len` bytes of data on success.
    Read(u32),
    /// A write whose `len`-byte payload the connection holds.
    Write(u32),
    Flush,
    /// TRIM or WRITE_ZEROES, which may need follow-up volume requests.
    Range(RangeReq),
    /// Refused before reaching the volume (the reply is an errno).
    Refused,
}

impl Kind {
    fn is_mutation(self) -> bool {
        matches!(self, Kind::Write(_) | Kind::Range(_))
    }

    /// Payload bytes the request holds until its reply is sent.
    fn charge(self) -> usize {
        match self {
            Kind::Read(n) | Kind::Write(n) => n as usize,
            Kind::Flush | Kind::Range(_) | Kind::Refused => 0,
        }
    }
}

/// A TRIM or WRITE_ZEROES and how far it got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RangeReq {
    zeroes: bool,
    offset: u64,
    len: u32,
    fua: bool,
    stage: Stage,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Submitted as one volume request.
    Whole,
    /// The volume said `TooLarge`: resubmitted in `max_io_bytes` pieces.
    Split,
    /// FUA: the volume flush after the range completed.
    Flushed,
}

impl RangeReq {
    fn op(&self, offset: u64, len: u64) -> VolumeOp {
        if self.zeroes {
            VolumeOp::WriteZeroes { offset, len }
        } else {
            VolumeOp::Discard { offset, len }
        }
    }
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

enum Msg {
    Reply(Reply),
    /// The reader stopped; the writer ends once nothing is in flight.
    ReaderDone,
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

/// The completion for one volume request: it only posts the result to the
/// connection's writer (it runs on an engine thread and must not block or
/// submit more work there).
fn completion(tx: &Sender<Msg>, handle: u64, kind: Kind) -> Completion {
    let tx = tx.clone();
    Box::new(move |res: IoResult| {
        // The connection may be gone; then nobody wants the reply.
        let _ = tx.send(Msg::Reply(Reply {
            handle,
            kind,
            result: res.map_err(Fail::Volume),
        }));
    })
}

/// Submits a range request in pieces of at most `chunk` bytes; `done` runs
/// once after the last piece, with the first error if any.
fn submit_split(vol: &dyn Volume, r: RangeReq, chunk: u64, done: Completion) {
    struct FanIn {
        left: AtomicUsize,
        first_err: Mutex<Option<IoError>>,
        done: Mutex<Option<Completion>>,
    }
    let (offset, len) = (r.offset, r.len as u64);
    let fan = Arc::new(FanIn {
        left: AtomicUsize::new(len.div_ceil(chunk) as usize),
        first_err: Mutex::new(None),
        done: Mutex::new(Some(done)),
    });
    let mut at = offset;
    while at < offset + len {
        let n = chunk.min(offset + len - at);
        let fan = fan.clone();
        vol.submit(
            r.op(at, n),
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
    let (tx, rx) = mpsc::channel::<Msg>();
    let reader = thread::current();
    thread::scope(|s| {
        let shared = &shared;
        let writer_tx = tx.clone();
        let spawned = thread::Builder::new()
            .name("nbd-reply".into())
            .spawn_scoped(s, move || {
                let mut wr = Writer {
                    w,
                    tx: writer_tx,
                    sh: shared,
                    ctx,
                    peer,
                    warned_backup: false,
                };
                wr.run(rx, reader);
                t.close();
            });
        if let Err(e) = spawned {
            log::error!("nbd {peer}: cannot start the reply thread: {e}");
            return SessionEnd::Stopped;
        }
        let end = reader_loop(&mut r, &tx, shared, ctx);
        let _ = tx.send(Msg::ReaderDone);
        match &end {
            SessionEnd::Violation(v) => log::warn!("nbd {peer}: closing connection: {v:?}"),
            SessionEnd::Closed(Some(e)) => log::info!("nbd {peer}: connection lost: {e}"),
            _ => log::debug!("nbd {peer}: connection ended: {end:?}"),
        }
        end
    })
}

fn reader_loop<R: Read>(r: &mut R, tx: &Sender<Msg>, sh: &Shared, ctx: &SessionCtx) -> SessionEnd {
    let mut hdr = [0u8; REQUEST_HEADER_BYTES];
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
                sh.admit(0);
                let _ = tx.send(Msg::Reply(Reply {
                    handle: h.handle,
                    kind: Kind::Refused,
                    result: Err(Fail::Errno(errno)),
                }));
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
                    completion(tx, handle, Kind::Read(len)),
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
                    completion(tx, handle, Kind::Write(len)),
                );
            }
            Command::Flush => {
                sh.admit(0);
                vol.submit(VolumeOp::Flush, completion(tx, handle, Kind::Flush));
            }
            Command::Trim { offset, len, fua } | Command::WriteZeroes { offset, len, fua } => {
                sh.admit(0);
                let r = RangeReq {
                    zeroes: matches!(cmd, Command::WriteZeroes { .. }),
                    offset,
                    len,
                    fua,
                    stage: Stage::Whole,
                };
                // One request even when longer than max_io_bytes: a whole-
                // device discard should stay one replicated request. Only
                // a volume that answers TooLarge gets it in pieces.
                vol.submit(
                    r.op(offset, len as u64),
                    completion(tx, handle, Kind::Range(r)),
                );
            }
        }
    }
}

/// The reply side of a connection: sends replies and submits the
/// follow-up volume requests some commands need, so that completions never
/// submit work from an engine thread.
struct Writer<'a, W: Write> {
    w: BufWriter<W>,
    /// For follow-up requests' completions.
    tx: Sender<Msg>,
    sh: &'a Shared,
    ctx: &'a SessionCtx,
    peer: &'a str,
    warned_backup: bool,
}

impl<W: Write> Writer<'_, W> {
    fn run(&mut self, rx: Receiver<Msg>, reader: Thread) {
        let mut reader_done = false;
        loop {
            if reader_done && self.sh.inflight.load(Ordering::Acquire) == 0 {
                break;
            }
            let first = match rx.recv_timeout(Duration::from_millis(POLL_MS)) {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) if self.ctx.stop.load(Ordering::Relaxed) => break,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            // Write every queued reply, then flush once.
            let (mut n, mut bytes) = (0, 0);
            let mut res = Ok(());
            let mut next = Some(first);
            while let Some(msg) = next {
                match msg {
                    Msg::ReaderDone => reader_done = true,
                    Msg::Reply(rep) => {
                        let charge = rep.kind.charge();
                        match self.handle(rep) {
                            Ok(true) => {
                                n += 1;
                                bytes += charge;
                            }
                            Ok(false) => {}
                            Err(e) => {
                                res = Err(e);
                                break;
                            }
                        }
                    }
                }
                next = rx.try_recv().ok();
            }
            let res = res.and_then(|_| self.w.flush());
            self.sh.inflight.fetch_sub(n, Ordering::AcqRel);
            self.sh.inflight_bytes.fetch_sub(bytes, Ordering::AcqRel);
            reader.unpark();
            if let Err(e) = res {
                log::info!("nbd {}: sending replies failed: {e}", self.peer);
                break;
            }
        }
        let _ = self.w.flush();
        self.sh.dead.store(true, Ordering::Release);
        reader.unpark();
    }

    /// Either submits the next step of a request (`Ok(false)`) or writes
    /// its reply into the buffer (`Ok(true)`).
    fn handle(&mut self, rep: Reply) -> io::Result<bool> {
        if let Kind::Range(r) = rep.kind {
            let vol = &*self.ctx.vol;
            match &rep.result {
                Err(Fail::Volume(IoError::TooLarge)) if r.stage == Stage::Whole => {
                    let r = RangeReq {
                        stage: Stage::Split,
                        ..r
                    };
                    let chunk = self.ctx.limits.max_payload_bytes as u64;
                    submit_split(
                        vol,
                        r,
                        chunk,
                        completion(&self.tx, rep.handle, Kind::Range(r)),
                    );
                    return Ok(false);
                }
                Ok(_) if r.fua && r.stage != Stage::Flushed => {
                    // The volume ops carry no FUA for ranges: flush instead.
                    let r = RangeReq {
                        stage: Stage::Flushed,
                        ..r
                    };
                    vol.submit(
                        VolumeOp::Flush,
                        completion(&self.tx, rep.handle, Kind::Range(r)),
                    );
                    return Ok(false);
                }
                _ => {}
            }
        }
        self.write_reply(rep)?;
        Ok(true)
    }

    /// Encodes one reply into the buffer; returns data buffers to the pool.
    fn write_reply(&mut self, rep: Reply) -> io::Result<()> {
        let w = &mut self.w;
        let errno = match rep.result {
            Ok(data) => {
                let res = match rep.kind {
                    Kind::Read(len) if data.len() != len as usize => {
                        // A volume bug; refuse rather than desynchronise the stream.
                        log::error!(
                            "nbd {}: volume returned {} bytes for a {len}-byte read",
                            self.peer,
                            data.len()
                        );
                        w.write_all(&simple_reply(EIO, rep.handle))
                    }
                    Kind::Read(_) => w
                        .write_all(&simple_reply(0, rep.handle))
                        .and_then(|_| w.write_all(&data)),
                    _ => w.write_all(&simple_reply(0, rep.handle)),
                };
                self.sh.give_buffer(data);
                return res;
            }
            Err(Fail::Errno(e)) => e,
            Err(Fail::Volume(e)) => {
                if e == IoError::NotPrimary && !self.warned_backup {
                    self.warned_backup = true;
                    log::warn!(
                        "nbd {}: this node is the backup; writes go to the primary \
                         (refusing I/O with EPERM)",
                        self.peer
                    );
                }
                nbd_errno(e, rep.kind.is_mutation())
            }
        };
        w.write_all(&simple_reply(errno, rep.handle))
    }
}
