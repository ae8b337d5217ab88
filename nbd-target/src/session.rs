//! One NBD connection: handshake, then the transmission phase.
//!
//! The server runs the handshake ([`negotiate`]) on a short-lived thread
//! and then hands the socket to a connection reactor, which drives the
//! transmission phase with [`NbdConn`] (see [`crate::conn`]). [`serve`] runs
//! both phases over any blocking `Read`/`Write` pair with the same state
//! machine: tests and the fuzz driver hand it byte buffers.
//!
//! A connection stops taking input while `max_inflight` requests or
//! [`MAX_INFLIGHT_BYTES`] of payload are unanswered, which bounds the memory
//! it can hold (to that budget plus one request).

use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use netreactor::{Conn, Input, Outbox, Waker};
use volume::Volume;

use crate::conn::NbdConn;
use crate::handshake::{negotiate, ExportInfo, HandshakeEnd};
use crate::proto::*;

/// Socket buffer sizes on our side of each connection.
pub const READ_BUFFER_BYTES: usize = 256 * 1024;
pub const REPLY_BUFFER_BYTES: usize = 256 * 1024;

/// Read and write payload bytes held by unanswered requests after which a
/// connection's reader stops reading.
pub const MAX_INFLIGHT_BYTES: usize = 32 << 20;

/// How long the byte-buffer driver waits for completions between looks.
const WAIT_US: u64 = 200;

/// Everything a connection needs that is the same for all connections.
pub struct SessionCtx {
    pub export: ExportInfo,
    pub limits: Limits,
    pub vol: Arc<dyn Volume>,
    /// Unanswered requests after which the reader stops reading.
    pub max_inflight: usize,
    /// Set when the server shuts down.
    pub stop: Arc<AtomicBool>,
    /// Write payload bytes copied in user space on their way to the
    /// volume, over all connections (0 while payloads are received
    /// straight into the volume's buffers).
    pub payload_copied: Arc<AtomicU64>,
    /// Write payloads of at least this many bytes are received straight
    /// into their buffers; smaller ones in bulk and copied
    /// ([`netreactor::RxMode`]).
    pub zero_copy_receive_min_bytes: usize,
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
            payload_copied: Arc::new(AtomicU64::new(0)),
            zero_copy_receive_min_bytes: netreactor::DEFAULT_ZERO_COPY_RECEIVE_MIN_BYTES,
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
    transmission(r, w, ctx, peer)
}

/// The transmission phase over a blocking `Read`/`Write` pair, driven by
/// the same [`NbdConn`] machine the reactors drive. Replies go out after
/// each chunk of input; while the connection is full, or after the input
/// ends, it waits for the volume's completions.
fn transmission<R: Read, W: Write>(
    mut r: BufReader<R>,
    mut w: BufWriter<W>,
    ctx: &SessionCtx,
    peer: &str,
) -> SessionEnd {
    let mut conn = NbdConn::new(ctx, peer.to_string(), Waker::noop(), None);
    let mut buf = r.buffer().to_vec();
    r.consume(buf.len());
    let mut chunk = vec![0u8; READ_BUFFER_BYTES];
    let mut out = Outbox::new();
    let mut input_end: Option<SessionEnd> = None;
    loop {
        loop {
            conn.poll(&mut out);
            if buf.is_empty() || conn.closing() || !conn.wants_input() {
                break;
            }
            let Input { consumed, .. } = conn.input(&buf, &mut out);
            buf.drain(..consumed);
            if consumed == 0 {
                break;
            }
        }
        if !out.is_empty() {
            let sent = out.segments().try_for_each(|seg| w.write_all(seg));
            if let Err(e) = sent.and_then(|_| w.flush()) {
                log::info!("nbd {peer}: sending replies failed: {e}");
                return SessionEnd::Stopped;
            }
            out.clear();
        }
        if ctx.stop.load(Ordering::Relaxed) {
            return SessionEnd::Stopped;
        }
        if conn.closing() || input_end.is_some() {
            if conn.quiescent() {
                break;
            }
            thread::sleep(Duration::from_micros(WAIT_US));
            continue;
        }
        if !conn.wants_input() {
            thread::sleep(Duration::from_micros(WAIT_US));
            continue;
        }
        match r.read(&mut chunk) {
            Ok(0) => input_end = Some(SessionEnd::Closed(None)),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => input_end = Some(SessionEnd::Closed(Some(e))),
        }
    }
    conn.take_end()
        .or(input_end)
        .unwrap_or(SessionEnd::Closed(None))
}
