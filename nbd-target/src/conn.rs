//! One connection's transmission phase as a state machine over bytes.
//!
//! [`NbdConn`] is what a connection reactor ([`netreactor`]) drives: it is
//! handed the bytes received so far, parses request headers in place with
//! [`decode_request`], submits each request to the volume without waiting,
//! and encodes replies into the reactor's send buffer. A volume completion
//! (on whatever thread the volume completes on) only queues its result in
//! the connection and wakes the reactor; the reactor then calls
//! [`netreactor::Conn::poll`], which encodes the replies. The same machine
//! serves byte buffers in [`crate::session::serve`] (tests, fuzzers).
//!
//! A connection holds at most `max_inflight` unanswered requests and
//! [`MAX_INFLIGHT_BYTES`] of their payload (plus one request); past that
//! it takes no input, and the reactor stops receiving from its socket. It
//! also takes none while [`MAX_QUEUED_OUT_BYTES`] of replies wait to be
//! sent: a client that sends reads and never reads the replies is pushed
//! back by TCP instead of growing the node's memory.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_queue::SegQueue;
use netreactor::{Input, Outbox, RxBuf, RxMode, Waker};
use volume::{Completion, IoError, IoResult, Volume, VolumeOp};

use crate::proto::*;
use crate::session::{SessionCtx, SessionEnd, MAX_INFLIGHT_BYTES};

/// Replies queued and not yet handed to the socket past which a connection
/// takes no more input.
pub const MAX_QUEUED_OUT_BYTES: usize = 8 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Carries `len` bytes of data on success.
    Read(u32),
    /// A write whose `len`-byte payload the connection holds.
    Write(u32),
    Flush,
    /// TRIM or WRITE_ZEROES, which may need follow-up volume requests.
    Range(RangeReq),
}

impl Kind {
    fn is_mutation(self) -> bool {
        matches!(self, Kind::Write(_) | Kind::Range(_))
    }

    /// Payload bytes the request holds until its reply is sent.
    fn charge(self) -> usize {
        match self {
            Kind::Read(n) | Kind::Write(n) => n as usize,
            Kind::Flush | Kind::Range(_) => 0,
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

struct Reply {
    handle: u64,
    kind: Kind,
    result: IoResult,
}

/// Results that arrived and wait for [`NbdConn::poll`]. Unbounded in type,
/// bounded in fact: every entry is the one completion of an admitted
/// request, and at most `max_inflight` are admitted.
type Done = Arc<SegQueue<Reply>>;

/// A write whose header is parsed and whose payload is being received.
struct PendingWrite {
    handle: u64,
    offset: u64,
    fua: bool,
    len: u32,
    /// The payload buffer from [`Volume::alloc_buf`]: `None` while the
    /// volume's pool is empty (the connection is stalled) or while the
    /// reactor receives into it (`lent`).
    buf: Option<RxBuf>,
    lent: bool,
}

/// A connection's transmission phase.
pub struct NbdConn {
    vol: Arc<dyn Volume>,
    limits: Limits,
    max_inflight: usize,
    stop: Arc<AtomicBool>,
    peer: String,
    done: Done,
    waker: Waker,
    inflight: usize,
    inflight_bytes: usize,
    /// Reply bytes queued for the socket at the last `input` or `poll`.
    queued_out: usize,
    /// A refused write's payload still to skip: (bytes left, handle, errno).
    drain: Option<(u32, u64, u32)>,
    pending: Option<PendingWrite>,
    /// How write payloads are received: at or above the threshold straight
    /// into their buffers, one request header per receive while such
    /// writes flow; below it (and after reads) in bulk, copied.
    rx: RxMode,
    /// Payload bytes copied in user space (from the receive buffer into a
    /// write's buffer), shared by the server's connections.
    copied: Arc<AtomicU64>,
    end: Option<SessionEnd>,
    warned_backup: bool,
    on_close: Option<Box<dyn FnOnce() + Send>>,
}

impl NbdConn {
    /// A connection in the transmission phase. `on_close` runs once when
    /// the reactor drops it.
    pub fn new(
        ctx: &SessionCtx,
        peer: String,
        waker: Waker,
        on_close: Option<Box<dyn FnOnce() + Send>>,
    ) -> NbdConn {
        NbdConn {
            vol: ctx.vol.clone(),
            limits: ctx.limits,
            max_inflight: ctx.max_inflight,
            stop: ctx.stop.clone(),
            peer,
            done: Arc::new(SegQueue::new()),
            waker,
            inflight: 0,
            inflight_bytes: 0,
            queued_out: 0,
            drain: None,
            pending: None,
            rx: RxMode::new(ctx.zero_copy_receive_min_bytes),
            copied: ctx.payload_copied.clone(),
            end: None,
            warned_backup: false,
            on_close,
        }
    }

    /// How the protocol ended, if it did.
    pub fn take_end(&mut self) -> Option<SessionEnd> {
        self.end.take()
    }

    fn room(&self) -> bool {
        self.inflight < self.max_inflight && self.inflight_bytes < MAX_INFLIGHT_BYTES
    }

    fn completion(&self, handle: u64, kind: Kind) -> Completion {
        let (done, waker) = (self.done.clone(), self.waker.clone());
        Box::new(move |result: IoResult| {
            done.push(Reply {
                handle,
                kind,
                result,
            });
            waker.wake();
        })
    }

    fn submit(&mut self, op: VolumeOp, kind: Kind, handle: u64) {
        self.inflight += 1;
        self.inflight_bytes += kind.charge();
        let done = self.completion(handle, kind);
        self.vol.submit(op, done);
    }

    /// Submits the pending write once its payload is complete.
    fn submit_if_whole(&mut self) {
        let whole = self
            .pending
            .as_ref()
            .and_then(|p| p.buf.as_ref())
            .is_some_and(|b| b.at == b.buf.len());
        if !whole {
            return;
        }
        let Some(PendingWrite {
            handle,
            offset,
            fua,
            len,
            buf: Some(b),
            ..
        }) = self.pending.take()
        else {
            return;
        };
        self.submit(
            VolumeOp::Write {
                offset,
                data: b.buf,
                fua,
            },
            Kind::Write(len),
            handle,
        );
    }

    /// Gets the pending write its buffer if it has none; false while the
    /// volume has none to give.
    fn pending_buffer(&mut self) -> bool {
        let Some(p) = &mut self.pending else {
            return true;
        };
        if p.buf.is_none() && !p.lent {
            match self.vol.alloc_buf(p.len as usize) {
                Some(buf) => p.buf = Some(RxBuf { buf, at: 0 }),
                None => return false,
            }
        }
        true
    }

    /// Either submits the next step of a range request (false) or encodes
    /// the reply (true).
    fn handle(&mut self, rep: Reply, out: &mut Outbox) -> bool {
        if let Kind::Range(r) = rep.kind {
            match &rep.result {
                Err(IoError::TooLarge) if r.stage == Stage::Whole => {
                    let r = RangeReq {
                        stage: Stage::Split,
                        ..r
                    };
                    let chunk = self.limits.max_payload_bytes as u64;
                    let done = self.completion(rep.handle, Kind::Range(r));
                    submit_split(&*self.vol, r, chunk, done);
                    return false;
                }
                Ok(_) if r.fua && r.stage != Stage::Flushed => {
                    // The volume ops carry no FUA for ranges: flush instead.
                    let r = RangeReq {
                        stage: Stage::Flushed,
                        ..r
                    };
                    let done = self.completion(rep.handle, Kind::Range(r));
                    self.vol.submit(VolumeOp::Flush, done);
                    return false;
                }
                _ => {}
            }
        }
        let errno = match rep.result {
            Ok(data) => {
                match rep.kind {
                    Kind::Read(len) if data.len() != len as usize => {
                        // A volume bug; refuse rather than desynchronise the stream.
                        log::error!(
                            "nbd {}: volume returned {} bytes for a {len}-byte read",
                            self.peer,
                            data.len()
                        );
                        out.extend_from_slice(&simple_reply(EIO, rep.handle));
                    }
                    Kind::Read(_) => {
                        // Sent from the buffer the volume read into.
                        out.extend_from_slice(&simple_reply(0, rep.handle));
                        out.push_buf(data);
                    }
                    _ => out.extend_from_slice(&simple_reply(0, rep.handle)),
                }
                return true;
            }
            Err(e) => {
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
        out.extend_from_slice(&simple_reply(errno, rep.handle));
        true
    }
}

impl netreactor::Conn for NbdConn {
    fn input(&mut self, input: &[u8], out: &mut Outbox) -> Input {
        let r = self.take_input(input, out);
        self.queued_out = out.len();
        r
    }

    fn poll(&mut self, out: &mut Outbox) {
        while let Some(rep) = self.done.pop() {
            let charge = rep.kind.charge();
            if self.handle(rep, out) {
                self.inflight -= 1;
                self.inflight_bytes -= charge;
            }
        }
        self.queued_out = out.len();
    }

    fn wants_input(&self) -> bool {
        self.end.is_none() && self.room() && self.queued_out < MAX_QUEUED_OUT_BYTES
    }

    fn closing(&self) -> bool {
        self.end.is_some()
    }

    fn quiescent(&self) -> bool {
        self.inflight == 0
    }

    fn aborted(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn closed(&mut self, why: &str) {
        log::info!("nbd {}: disconnected ({why})", self.peer);
        if let Some(f) = self.on_close.take() {
            f();
        }
    }

    fn take_payload_target(&mut self) -> Option<RxBuf> {
        if !self.pending_buffer() {
            return None;
        }
        let p = self.pending.as_mut()?;
        if !self.rx.zero_copy(p.len as usize) {
            // Received in bulk with what follows, and copied.
            return None;
        }
        let b = p.buf.take()?;
        p.lent = true;
        Some(b)
    }

    fn payload_received(&mut self, buf: RxBuf, _out: &mut Outbox) {
        if let Some(p) = &mut self.pending {
            p.lent = false;
            p.buf = Some(buf);
        }
        self.submit_if_whole();
    }

    fn receive_limit(&self) -> usize {
        // While writes at or above the zero-copy threshold flow, one request
        // header at a time: a write's payload that follows is received
        // straight into its own buffer. After a smaller write or a read, in
        // bulk: a receive per request would cost more than copying its
        // payload. (A refused write's payload being skipped comes in whole.)
        if !self.rx.header_only() {
            return usize::MAX;
        }
        self.drain.map_or(0, |(left, _, _)| left as usize) + REQUEST_HEADER_BYTES
    }

    fn stalled(&self) -> bool {
        self.pending
            .as_ref()
            .is_some_and(|p| p.buf.is_none() && !p.lent)
    }
}

impl NbdConn {
    /// Payload bytes this connection's server copied in user space.
    pub fn payload_copied_bytes(&self) -> u64 {
        self.copied.load(Ordering::Relaxed)
    }
}

impl NbdConn {
    /// Parses and submits the requests `input` holds, as long as the
    /// connection takes input.
    fn take_input(&mut self, input: &[u8], out: &mut Outbox) -> Input {
        let mut at = 0;
        while self.end.is_none() {
            let avail = input.len() - at;
            if self.pending.is_some() {
                // A write's payload that reached the receive buffer (a
                // driver without payload targets, or bytes received with
                // its header): copied into the write's buffer.
                if !self.pending_buffer() {
                    break;
                }
                let Some(b) = self.pending.as_mut().and_then(|p| p.buf.as_mut()) else {
                    break;
                };
                at += b.fill_from(&input[at..at + avail], &self.copied);
                self.submit_if_whole();
                if self.pending.is_some() {
                    break;
                }
                continue;
            }
            if let Some((left, handle, errno)) = self.drain {
                let n = (left as usize).min(avail);
                at += n;
                if n < left as usize {
                    self.drain = Some((left - n as u32, handle, errno));
                    break;
                }
                self.drain = None;
                out.extend_from_slice(&simple_reply(errno, handle));
                continue;
            }
            if !self.room() || out.len() >= MAX_QUEUED_OUT_BYTES {
                break;
            }
            if avail < REQUEST_HEADER_BYTES {
                return Input {
                    consumed: at,
                    need: REQUEST_HEADER_BYTES,
                };
            }
            let mut hdr = [0u8; REQUEST_HEADER_BYTES];
            hdr.copy_from_slice(&input[at..at + REQUEST_HEADER_BYTES]);
            let h = RequestHeader::parse(&hdr);
            let cmd = match decode_request(&h, &self.limits) {
                Decoded::Execute(cmd) => cmd,
                Decoded::Disconnect => {
                    at += REQUEST_HEADER_BYTES;
                    self.end = Some(SessionEnd::Disconnect);
                    break;
                }
                Decoded::Close(v) => {
                    log::warn!("nbd {}: closing connection: {v:?}", self.peer);
                    self.end = Some(SessionEnd::Violation(v));
                    break;
                }
                Decoded::Refuse { errno, drain } => {
                    at += REQUEST_HEADER_BYTES;
                    if drain > 0 {
                        self.drain = Some((drain, h.handle, errno));
                    } else {
                        out.extend_from_slice(&simple_reply(errno, h.handle));
                    }
                    continue;
                }
            };
            let handle = h.handle;
            self.rx.saw(match cmd {
                Command::Write { len, .. } => len as usize,
                _ => 0,
            });
            match cmd {
                Command::Read { offset, len } => {
                    at += REQUEST_HEADER_BYTES;
                    self.submit(VolumeOp::Read { offset, len }, Kind::Read(len), handle);
                }
                Command::Write { offset, len, fua } => {
                    // The payload goes into a buffer of the volume's (the
                    // reactor receives it there); the write is submitted
                    // once it is whole, so the stream stays in sync.
                    at += REQUEST_HEADER_BYTES;
                    self.pending = Some(PendingWrite {
                        handle,
                        offset,
                        fua,
                        len,
                        buf: None,
                        lent: false,
                    });
                }
                Command::Flush => {
                    at += REQUEST_HEADER_BYTES;
                    self.submit(VolumeOp::Flush, Kind::Flush, handle);
                }
                Command::Trim { offset, len, fua } | Command::WriteZeroes { offset, len, fua } => {
                    at += REQUEST_HEADER_BYTES;
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
        Input {
            consumed: at,
            need: 0,
        }
    }
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
                        done(err.map_or(Ok(volume::IoBuf::empty()), Err));
                    }
                }
            }),
        );
        at += n;
    }
}
