//! One NBD connection: handshake, then the transmission phase.
//!
//! The calling thread is the reader: it parses request headers, reads write
//! payloads and submits each request to the volume without waiting. Results
//! reach the socket by one of two ways, both under one lock:
//! - a completion that runs on another thread (the engine's) posts to a
//!   channel; a scoped reply thread writes every queued reply, then flushes
//!   once;
//! - a completion that runs inline in the reader's own `submit`, and the
//!   reader's refusals, are kept by the reader and written by it before it
//!   next blocks, which saves waking the reply thread.
//!
//! The reader stops reading while `max_inflight` requests or
//! [`MAX_INFLIGHT_BYTES`] of payload are unanswered, which bounds the memory
//! a connection can hold (to that budget plus one request).
//!
//! [`serve`] works over any `Read`/`Write` pair: the server hands it a
//! socket, tests and the fuzz driver hand it byte buffers.

use std::cell::RefCell;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
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

/// How often a blocked reply thread or reader looks at the stop flags.
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
    /// The reply side is done: close the connection so a blocked reader wakes.
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
    r: R,
    w: W,
    ctx: &SessionCtx,
    peer: &str,
    t: &dyn Transport,
) -> SessionEnd {
    let mut r = BufReader::with_capacity(READ_BUFFER_BYTES, r);
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

/// Why a request failed: a volume error (mapped by `nbd_errno`), or an
/// NBD errno chosen when the request was refused.
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
    /// The reader stopped; the reply thread ends once nothing is in flight.
    ReaderDone,
}

/// State shared by a connection's reader and reply thread.
struct Shared {
    inflight: AtomicUsize,
    inflight_bytes: AtomicUsize,
    /// The reply side failed or exited: the reader must stop.
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

thread_local! {
    /// While a reader is inside `Volume::submit`, completions of its own
    /// connection that run synchronously (inline) are parked here, tagged
    /// with the connection id, so the reader can send them itself instead
    /// of waking the reply thread.
    static INLINE: RefCell<Option<(u64, Vec<Reply>)>> = const { RefCell::new(None) };
}

/// Source of connection ids for the inline sink.
static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// The completion for one volume request. It only hands the result on: to
/// the reader if it runs inline in the reader's submit, otherwise to the
/// reply thread through the channel (it may run on an engine thread, where
/// it must not block or submit more work).
fn completion(tx: &Sender<Msg>, conn: u64, handle: u64, kind: Kind) -> Completion {
    let tx = tx.clone();
    Box::new(move |res: IoResult| {
        let rep = Reply {
            handle,
            kind,
            result: res.map_err(Fail::Volume),
        };
        let rep = INLINE.with(|sink| match &mut *sink.borrow_mut() {
            Some((id, pending)) if *id == conn => {
                pending.push(rep);
                None
            }
            _ => Some(rep),
        });
        if let Some(rep) = rep {
            // The connection may be gone; then nobody wants the reply.
            let _ = tx.send(Msg::Reply(rep));
        }
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
    mut r: BufReader<R>,
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
    let out = Mutex::new(Out {
        w,
        tx: tx.clone(),
        warned_backup: false,
    });
    let conn = NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed);
    let reader = thread::current();
    thread::scope(|s| {
        let (sh, out) = (&shared, &out);
        let spawned = thread::Builder::new()
            .name("nbd-reply".into())
            .spawn_scoped(s, move || {
                reply_loop(rx, out, sh, ctx, peer, reader);
                t.close();
            });
        if let Err(e) = spawned {
            log::error!("nbd {peer}: cannot start the reply thread: {e}");
            return SessionEnd::Stopped;
        }
        let mut rd = Reader {
            tx: &tx,
            conn,
            pending: Vec::new(),
            sh,
            out,
            ctx,
            peer,
            t,
        };
        let mut end = rd.run(&mut r);
        if rd.flush_pending().is_err() {
            end = SessionEnd::Stopped;
        }
        let _ = tx.send(Msg::ReaderDone);
        match &end {
            SessionEnd::Violation(v) => log::warn!("nbd {peer}: closing connection: {v:?}"),
            SessionEnd::Closed(Some(e)) => log::info!("nbd {peer}: connection lost: {e}"),
            _ => log::debug!("nbd {peer}: connection ended: {end:?}"),
        }
        end
    })
}

/// The reading side of a connection (runs on the connection's thread).
struct Reader<'a, W: Write> {
    tx: &'a Sender<Msg>,
    conn: u64,
    /// Replies produced on this thread (refusals and inline completions),
    /// sent before the reader next blocks.
    pending: Vec<Reply>,
    sh: &'a Shared,
    out: &'a Mutex<Out<W>>,
    ctx: &'a SessionCtx,
    peer: &'a str,
    t: &'a dyn Transport,
}

impl<W: Write> Reader<'_, W> {
    /// Submits with the inline sink armed for this connection.
    fn submit(&mut self, op: VolumeOp, kind: Kind, handle: u64) {
        let done = completion(self.tx, self.conn, handle, kind);
        let pending = std::mem::take(&mut self.pending);
        INLINE.with(|sink| *sink.borrow_mut() = Some((self.conn, pending)));
        self.ctx.vol.submit(op, done);
        if let Some((_, pending)) = INLINE.with(|sink| sink.borrow_mut().take()) {
            self.pending = pending;
        }
    }

    /// Sends the replies produced on this thread. Called before anything
    /// that may block, so no reply waits on the client's next request.
    fn flush_pending(&mut self) -> Result<(), ()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let replies = std::mem::take(&mut self.pending);
        let res = match self.out.lock() {
            Ok(mut out) => out.send(replies, self.sh, self.ctx, self.peer),
            Err(_) => Err(io::Error::other("reply lock poisoned")),
        };
        if let Err(e) = res {
            log::info!("nbd {}: sending replies failed: {e}", self.peer);
            self.sh.dead.store(true, Ordering::Release);
            self.t.close();
            return Err(());
        }
        Ok(())
    }

    fn stopped(&self) -> bool {
        self.sh.dead.load(Ordering::Acquire) || self.ctx.stop.load(Ordering::Relaxed)
    }

    fn run<R: Read>(&mut self, r: &mut BufReader<R>) -> SessionEnd {
        let mut hdr = [0u8; REQUEST_HEADER_BYTES];
        loop {
            // Whatever is pending goes out before we wait for room or for
            // the socket; a large backlog goes out early too.
            if (self.sh.full(self.ctx.max_inflight)
                || r.buffer().len() < REQUEST_HEADER_BYTES
                || self.pending.len() >= 32)
                && self.flush_pending().is_err()
            {
                return SessionEnd::Stopped;
            }
            while self.sh.full(self.ctx.max_inflight) {
                if self.stopped() {
                    return SessionEnd::Stopped;
                }
                thread::park_timeout(Duration::from_millis(POLL_MS));
            }
            if self.stopped() {
                return SessionEnd::Stopped;
            }
            match r.read_exact(&mut hdr) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return SessionEnd::Closed(None)
                }
                Err(e) => return SessionEnd::Closed(Some(e)),
            }
            let h = RequestHeader::parse(&hdr);
            let cmd = match decode_request(&h, &self.ctx.limits) {
                Decoded::Execute(cmd) => cmd,
                Decoded::Disconnect => return SessionEnd::Disconnect,
                Decoded::Close(v) => return SessionEnd::Violation(v),
                Decoded::Refuse { errno, drain } => {
                    if drain > 0 {
                        if r.buffer().len() < drain as usize && self.flush_pending().is_err() {
                            return SessionEnd::Stopped;
                        }
                        match io::copy(&mut r.by_ref().take(drain as u64), &mut io::sink()) {
                            Ok(n) if n == drain as u64 => {}
                            Ok(_) => return SessionEnd::Closed(None),
                            Err(e) => return SessionEnd::Closed(Some(e)),
                        }
                    }
                    self.sh.admit(0);
                    self.pending.push(Reply {
                        handle: h.handle,
                        kind: Kind::Refused,
                        result: Err(Fail::Errno(errno)),
                    });
                    continue;
                }
            };
            let handle = h.handle;
            match cmd {
                Command::Read { offset, len } => {
                    self.sh.admit(len);
                    self.submit(VolumeOp::Read { offset, len }, Kind::Read(len), handle);
                }
                Command::Write { offset, len, fua } => {
                    // The whole payload is read before anything is
                    // submitted or refused, so the stream stays in sync.
                    if r.buffer().len() < len as usize && self.flush_pending().is_err() {
                        return SessionEnd::Stopped;
                    }
                    let mut data = self.sh.take_buffer(len as usize);
                    if let Err(e) = r.read_exact(&mut data) {
                        return match e.kind() {
                            io::ErrorKind::UnexpectedEof => SessionEnd::Closed(None),
                            _ => SessionEnd::Closed(Some(e)),
                        };
                    }
                    self.sh.admit(len);
                    self.submit(
                        VolumeOp::Write { offset, data, fua },
                        Kind::Write(len),
                        handle,
                    );
                }
                Command::Flush => {
                    self.sh.admit(0);
                    self.submit(VolumeOp::Flush, Kind::Flush, handle);
                }
                Command::Trim { offset, len, fua } | Command::WriteZeroes { offset, len, fua } => {
                    self.sh.admit(0);
                    let rr = RangeReq {
                        zeroes: matches!(cmd, Command::WriteZeroes { .. }),
                        offset,
                        len,
                        fua,
                        stage: Stage::Whole,
                    };
                    // One request even when longer than max_io_bytes: a
                    // whole-device discard should stay one replicated
                    // request. Only a volume that answers TooLarge gets it
                    // in pieces.
                    self.submit(rr.op(offset, len as u64), Kind::Range(rr), handle);
                }
            }
        }
    }
}

/// The socket's sending side, shared by the reader (for replies produced
/// on its thread) and the reply thread (for everything else).
struct Out<W: Write> {
    w: BufWriter<W>,
    /// For follow-up requests' completions.
    tx: Sender<Msg>,
    warned_backup: bool,
}

impl<W: Write> Out<W> {
    /// Handles a batch of results, writes the replies, flushes once, and
    /// releases what the answered requests held.
    fn send(
        &mut self,
        batch: impl IntoIterator<Item = Reply>,
        sh: &Shared,
        ctx: &SessionCtx,
        peer: &str,
    ) -> io::Result<()> {
        let (mut n, mut bytes) = (0, 0);
        let mut res = Ok(());
        for rep in batch {
            let charge = rep.kind.charge();
            match self.handle(rep, sh, ctx, peer) {
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
        let res = res.and_then(|_| self.w.flush());
        sh.inflight.fetch_sub(n, Ordering::AcqRel);
        sh.inflight_bytes.fetch_sub(bytes, Ordering::AcqRel);
        res
    }

    /// Either submits the next step of a request (`Ok(false)`) or writes
    /// its reply into the buffer (`Ok(true)`).
    fn handle(
        &mut self,
        rep: Reply,
        sh: &Shared,
        ctx: &SessionCtx,
        peer: &str,
    ) -> io::Result<bool> {
        if let Kind::Range(r) = rep.kind {
            // Follow-ups complete through the channel (this may be the
            // reader's thread, but the inline sink is not armed here).
            let vol = &*ctx.vol;
            match &rep.result {
                Err(Fail::Volume(IoError::TooLarge)) if r.stage == Stage::Whole => {
                    let r = RangeReq {
                        stage: Stage::Split,
                        ..r
                    };
                    let chunk = ctx.limits.max_payload_bytes as u64;
                    let done = completion(&self.tx, 0, rep.handle, Kind::Range(r));
                    submit_split(vol, r, chunk, done);
                    return Ok(false);
                }
                Ok(_) if r.fua && r.stage != Stage::Flushed => {
                    // The volume ops carry no FUA for ranges: flush instead.
                    let r = RangeReq {
                        stage: Stage::Flushed,
                        ..r
                    };
                    let done = completion(&self.tx, 0, rep.handle, Kind::Range(r));
                    vol.submit(VolumeOp::Flush, done);
                    return Ok(false);
                }
                _ => {}
            }
        }
        self.write_reply(rep, sh, peer)?;
        Ok(true)
    }

    /// Encodes one reply into the buffer; returns data buffers to the pool.
    fn write_reply(&mut self, rep: Reply, sh: &Shared, peer: &str) -> io::Result<()> {
        let w = &mut self.w;
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
                    _ => w.write_all(&simple_reply(0, rep.handle)),
                };
                sh.give_buffer(data);
                return res;
            }
            Err(Fail::Errno(e)) => e,
            Err(Fail::Volume(e)) => {
                if e == IoError::NotPrimary && !self.warned_backup {
                    self.warned_backup = true;
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
}

/// The reply thread: sends the results that arrive through the channel
/// (completions on other threads, follow-ups), one flush per batch.
fn reply_loop<W: Write>(
    rx: Receiver<Msg>,
    out: &Mutex<Out<W>>,
    sh: &Shared,
    ctx: &SessionCtx,
    peer: &str,
    reader: Thread,
) {
    let mut reader_done = false;
    let mut batch = Vec::new();
    loop {
        if reader_done && sh.inflight.load(Ordering::Acquire) == 0 {
            break;
        }
        let first = match rx.recv_timeout(Duration::from_millis(POLL_MS)) {
            Ok(m) => m,
            Err(RecvTimeoutError::Timeout) if ctx.stop.load(Ordering::Relaxed) => break,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let mut next = Some(first);
        while let Some(msg) = next {
            match msg {
                Msg::ReaderDone => reader_done = true,
                Msg::Reply(rep) => batch.push(rep),
            }
            next = rx.try_recv().ok();
        }
        let res = match lock(out) {
            Some(mut o) => o.send(batch.drain(..), sh, ctx, peer),
            None => Err(io::Error::other("reply lock poisoned")),
        };
        reader.unpark();
        if let Err(e) = res {
            log::info!("nbd {peer}: sending replies failed: {e}");
            break;
        }
    }
    if let Some(mut o) = lock(out) {
        let _ = o.w.flush();
    }
    sh.dead.store(true, Ordering::Release);
    reader.unpark();
}

fn lock<W: Write>(m: &Mutex<Out<W>>) -> Option<MutexGuard<'_, Out<W>>> {
    m.lock().ok()
}
