//! The TCP replication link: connection set-up with a pre-shared-key
//! challenge/response, and checksummed framing of `Msg` bodies.
//!
//! Node 1 dials, node 2 accepts. Connection set-up (dial, accept, the
//! authentication exchange) runs on a link-manager thread, off the data
//! path; an authenticated, non-blocking `TcpStream` is handed to the
//! reactor through a queue, and an eventfd wakes it.
//!
//! Authentication (both directions, HMAC-SHA256 over fresh nonces):
//! ```text
//! acceptor -> dialer : "DMLINK01" | node_id u32 | nonce_a [32]
//! dialer   -> acceptor: "DMLINK01" | node_id u32 | nonce_d [32] | HMAC(psk, "dialer" | nonce_a | nonce_d)
//! acceptor -> dialer : HMAC(psk, "acceptor" | nonce_d | nonce_a)
//! ```
//! A peer that fails this is refused and logged; it never reaches the core.
//!
//! Both sides then state their transport (`link.transport`, and for
//! `"fabric"` the provider) and refuse a peer that differs. With
//! `"fabric"`, the fabric connection is set up over this same
//! authenticated socket ([`fabric`]); with `"tcp"`, the socket itself
//! carries the frames ([`tcp`]). Either way the reactor gets a
//! [`Transport`] and never sees which.
//!
//! Frames: `len u32 | crc32c(body) u32 | body`, little-endian.

pub mod fabric;
pub mod tcp;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::core::msg::{encode_req, Msg};
use crate::core::ReqHeader;
use crate::sys::{random_bytes, EventFd};
use volume::{IoBuf, SharedBuf};

const MAGIC: &[u8; 8] = b"DMLINK01";
const TRANSPORT_MAGIC: &[u8; 8] = b"DMXPORT1";
pub const FRAME_HEADER_BYTES: usize = 8;

#[derive(Clone)]
pub struct LinkOptions {
    pub node_id: u32,
    pub listen: SocketAddr,
    pub peer: SocketAddr,
    pub psk: Vec<u8>,
    pub connect_retry_ms: u64,
    pub handshake_timeout_ms: u64,
    pub transport: LinkTransport,
}

/// What carries the replication frames once the handshake succeeded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum LinkTransport {
    /// The authenticated TCP socket itself.
    #[default]
    Tcp,
    /// One-sided writes into the peer's landing ring through libfabric.
    Fabric(fabric::FabricOptions),
}

impl LinkTransport {
    fn describe(&self) -> String {
        match self {
            LinkTransport::Tcp => "link.transport = \"tcp\"".into(),
            LinkTransport::Fabric(f) => format!(
                "link.transport = \"fabric\", link.fabric_provider = \"{}\", link.fabric_ring_bytes = {}",
                f.provider, f.ring_bytes
            ),
        }
    }

    fn tag(&self) -> [u8; 64] {
        let mut t = [0u8; 64];
        t[..8].copy_from_slice(TRANSPORT_MAGIC);
        let d = self.describe();
        let n = d.len().min(56);
        t[8..8 + n].copy_from_slice(&d.as_bytes()[..n]);
        t
    }
}

/// One established replication connection, whatever carries it: the seam
/// between the reactor and the link's transports (TCP or fabric).
pub trait Transport: Send {
    /// "tcp" or "fabric".
    fn kind(&self) -> &'static str;
    /// Queues a message; [`Transport::flush`] sends it.
    fn send(&mut self, m: &Msg);
    /// Queues a `Msg::Req` built straight from a ring entry (the payload
    /// is copied into the transmit buffer).
    fn send_req(&mut self, hdr: &ReqHeader, payload: &[u8]);
    /// Queues a `Msg::Req` whose payload is the buffer the write arrived
    /// in; the transport keeps a clone until the bytes left. Returns the
    /// payload bytes it copied in user space (TCP: none, it writes the
    /// buffer with the frame's header in one writev; by default: all,
    /// through [`Transport::send_req`]).
    fn send_req_buf(&mut self, hdr: &ReqHeader, payload: SharedBuf) -> usize {
        self.send_req(hdr, &payload);
        payload.len()
    }
    /// Takes what arrived, decoding messages into `out`; the bytes taken.
    /// A REQ's payload goes into the buffer `alloc(len)` gives; when it
    /// gives none, that frame and the ones behind it wait in the receive
    /// buffer for the next call (never dropped or reordered; TCP stops
    /// reading, so the sender is held back). An error means the
    /// connection is lost (the text says why).
    fn recv(
        &mut self,
        out: &mut Vec<Msg>,
        alloc: &mut dyn FnMut(usize) -> Option<IoBuf>,
    ) -> Result<u64, String>;
    /// Sends what is queued, as far as the transport takes it now; the
    /// bytes sent.
    fn flush(&mut self) -> Result<u64, String>;
    /// The fd the reactor may sleep on and whether it waits for
    /// writability; None when it must not sleep (work may be pending).
    fn sleep_fd(&mut self) -> Option<(RawFd, bool)>;
    /// The socket to wait on for readability instead of calling
    /// [`Transport::recv`] again: Some when the last `recv` read it until
    /// it would block and no frame waits in the receive buffer for a
    /// payload buffer. None when `recv` has work to do, or is cheap to
    /// call every pass (the fabric reads its completion queue in user
    /// space).
    fn idle_fd(&self) -> Option<RawFd> {
        None
    }
    /// Ends the connection and forgets what was queued.
    fn close(&mut self);
}

/// After authentication: both sides state their transport; a peer that
/// differs is refused with the fix.
fn agree_transport(s: &mut TcpStream, mine: &LinkTransport) -> Result<(), String> {
    s.write_all(&mine.tag()).map_err(|e| e.to_string())?;
    let mut theirs = [0u8; 64];
    s.read_exact(&mut theirs).map_err(|e| e.to_string())?;
    if theirs != mine.tag() {
        let end = theirs[8..]
            .iter()
            .position(|&b| b == 0)
            .map_or(64, |p| p + 8);
        return Err(format!(
            "the peer runs {}, this node {}: set the same link.transport, link.fabric_provider and link.fabric_ring_bytes on both nodes",
            String::from_utf8_lossy(&theirs[8..end]),
            mine.describe()
        ));
    }
    Ok(())
}

fn mac(psk: &[u8], label: &[u8], a: &[u8], b: &[u8]) -> [u8; 32] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(psk).expect("HMAC takes any key length");
    m.update(label);
    m.update(a);
    m.update(b);
    m.finalize().into_bytes().into()
}

fn verify(psk: &[u8], label: &[u8], a: &[u8], b: &[u8], tag: &[u8]) -> bool {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(psk).expect("HMAC takes any key length");
    m.update(label);
    m.update(a);
    m.update(b);
    m.verify_slice(tag).is_ok()
}

#[derive(Debug)]
pub enum AuthError {
    Io(io::Error),
    BadMagic,
    WrongKey,
}

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthError::Io(e) => write!(f, "{e}"),
            AuthError::BadMagic => write!(f, "not a deltamirror replication peer"),
            AuthError::WrongKey => write!(f, "authentication failed (wrong pre-shared key?)"),
        }
    }
}

impl From<io::Error> for AuthError {
    fn from(e: io::Error) -> Self {
        AuthError::Io(e)
    }
}

/// Acceptor side of the handshake; returns the peer's node id.
pub fn auth_accept(s: &mut TcpStream, node_id: u32, psk: &[u8]) -> Result<u32, AuthError> {
    let mut nonce_a = [0u8; 32];
    random_bytes(&mut nonce_a)?;
    let mut hello = Vec::with_capacity(44);
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&node_id.to_le_bytes());
    hello.extend_from_slice(&nonce_a);
    s.write_all(&hello)?;
    let mut reply = [0u8; 8 + 4 + 32 + 32];
    s.read_exact(&mut reply)?;
    if &reply[..8] != MAGIC {
        return Err(AuthError::BadMagic);
    }
    let peer_id = u32::from_le_bytes(reply[8..12].try_into().unwrap());
    let nonce_d = &reply[12..44];
    if !verify(psk, b"dialer", &nonce_a, nonce_d, &reply[44..76]) {
        return Err(AuthError::WrongKey);
    }
    s.write_all(&mac(psk, b"acceptor", nonce_d, &nonce_a))?;
    Ok(peer_id)
}

/// Dialer side of the handshake; returns the peer's node id.
pub fn auth_dial(s: &mut TcpStream, node_id: u32, psk: &[u8]) -> Result<u32, AuthError> {
    let mut hello = [0u8; 44];
    s.read_exact(&mut hello)?;
    if &hello[..8] != MAGIC {
        return Err(AuthError::BadMagic);
    }
    let peer_id = u32::from_le_bytes(hello[8..12].try_into().unwrap());
    let nonce_a = &hello[12..44];
    let mut nonce_d = [0u8; 32];
    random_bytes(&mut nonce_d)?;
    let mut reply = Vec::with_capacity(76);
    reply.extend_from_slice(MAGIC);
    reply.extend_from_slice(&node_id.to_le_bytes());
    reply.extend_from_slice(&nonce_d);
    reply.extend_from_slice(&mac(psk, b"dialer", nonce_a, &nonce_d));
    s.write_all(&reply)?;
    let mut tag = [0u8; 32];
    s.read_exact(&mut tag)?;
    if !verify(psk, b"acceptor", &nonce_d, nonce_a, &tag) {
        return Err(AuthError::WrongKey);
    }
    Ok(peer_id)
}

/// Counters the status page shows.
#[derive(Default)]
pub struct LinkCounters {
    pub auth_failures: AtomicU64,
    pub connections: AtomicU64,
    /// Fabric connection requests rejected (no or a stale handshake token).
    pub fabric_refused: AtomicU64,
}

/// An established connection, handed from the link manager to the reactor.
pub type Connection = Box<dyn Transport>;

/// What the manager needs beyond [`LinkOptions`] to build a connection.
#[derive(Clone, Copy)]
struct Build {
    max_frame: usize,
    busy: bool,
}

/// Runs connection set-up on its own thread and hands authenticated
/// connections to the reactor.
pub struct LinkManager {
    pub ready: Arc<Mutex<Option<Connection>>>,
    pub want: Arc<AtomicBool>,
    pub wake: Arc<EventFd>,
    pub counters: Arc<LinkCounters>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl LinkManager {
    /// Starts the manager: frames up to `max_frame` bytes; `busy` when the
    /// reactor spins (a fabric CQ then needs no wait fd).
    pub fn start(opts: LinkOptions, max_frame: usize, busy: bool) -> io::Result<LinkManager> {
        let ready = Arc::new(Mutex::new(None));
        let want = Arc::new(AtomicBool::new(true));
        let wake = Arc::new(EventFd::new()?);
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(LinkCounters::default());
        let listener = if opts.node_id != 1 {
            let l = TcpListener::bind(opts.listen).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot listen for the peer on link.listen = {}: {e}",
                        opts.listen
                    ),
                )
            })?;
            l.set_nonblocking(true)?;
            Some(l)
        } else {
            None
        };
        // The fabric port listens from the start, so a bad address or a
        // missing provider stops the start with its reason.
        let fabric_listener = match (&opts.transport, &listener) {
            (LinkTransport::Fabric(f), Some(_)) => Some(
                rdma::Listener::bind(&f.provider, f.listen)
                    .map_err(|e| io::Error::other(format!("link.transport = \"fabric\": {e}")))?,
            ),
            _ => None,
        };
        if let LinkTransport::Fabric(f) = &opts.transport {
            rdma::mem::check_memlock(f.channel(busy).locked_bytes(), "link.fabric_ring_bytes")
                .map_err(io::Error::other)?;
        }
        let build = Build { max_frame, busy };
        let (r, w, k, s, c) = (
            ready.clone(),
            want.clone(),
            wake.clone(),
            stop.clone(),
            counters.clone(),
        );
        let thread = std::thread::Builder::new()
            .name("dm-link".into())
            .spawn(move || run_manager(opts, build, listener, fabric_listener, r, w, k, s, c))?;
        Ok(LinkManager {
            ready,
            want,
            wake,
            counters,
            stop,
            thread: Some(thread),
        })
    }

    /// The reactor lost its connection: set up a new one.
    pub fn request(&self) {
        self.want.store(true, Ordering::Release);
    }

    pub fn take(&self) -> Option<Connection> {
        self.ready.lock().unwrap().take()
    }

    /// Stops dialing and accepting for good (the listener closes within
    /// one accept poll); a connection set up meanwhile may still arrive
    /// through [`LinkManager::take`].
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }
}

impl Drop for LinkManager {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn prepare(s: &TcpStream, timeout_ms: u64) -> io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_millis(timeout_ms)))?;
    s.set_write_timeout(Some(Duration::from_millis(timeout_ms)))?;
    Ok(())
}

/// Turns an authenticated stream into the configured transport.
fn establish(
    mut s: TcpStream,
    opts: &LinkOptions,
    build: Build,
    fabric_listener: Option<&rdma::Listener>,
    counters: &LinkCounters,
) -> Result<Connection, String> {
    agree_transport(&mut s, &opts.transport)?;
    match &opts.transport {
        LinkTransport::Tcp => {
            s.set_nonblocking(true).map_err(|e| e.to_string())?;
            s.set_read_timeout(None).map_err(|e| e.to_string())?;
            Ok(Box::new(tcp::TcpLink::new(s, build.max_frame)))
        }
        LinkTransport::Fabric(f) => {
            let cfg = f.channel(build.busy);
            let timeout = Duration::from_millis(opts.handshake_timeout_ms);
            let ch = match fabric_listener {
                Some(l) => {
                    fabric::setup_accept(&mut s, l, &cfg, timeout, &counters.fabric_refused)?
                }
                None => fabric::setup_dial(&mut s, opts.peer, &cfg, timeout)?,
            };
            // The TCP socket has done its job: the fabric carries the frames.
            Ok(Box::new(fabric::FabricLink::new(ch, build.max_frame)))
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run_manager(
    opts: LinkOptions,
    build: Build,
    listener: Option<TcpListener>,
    fabric_listener: Option<rdma::Listener>,
    ready: Arc<Mutex<Option<Connection>>>,
    want: Arc<AtomicBool>,
    wake: Arc<EventFd>,
    stop: Arc<AtomicBool>,
    counters: Arc<LinkCounters>,
) {
    let mut last_refusal_log = std::time::Instant::now() - Duration::from_secs(60);
    while !stop.load(Ordering::Acquire) {
        let attempt: Option<(TcpStream, Result<u32, AuthError>)> = match &listener {
            // The acceptor always accepts: a restarted peer replaces the old
            // connection.
            Some(l) => match l.accept() {
                Ok((mut s, addr)) => {
                    let _ = s.set_nonblocking(false);
                    if prepare(&s, opts.handshake_timeout_ms).is_err() {
                        continue;
                    }
                    let r = auth_accept(&mut s, opts.node_id, &opts.psk);
                    if let Err(e) = &r {
                        log::warn!("refused replication peer {addr}: {e}");
                    }
                    Some((s, r))
                }
                Err(_) => {
                    if let Some(fl) = &fabric_listener {
                        let mut refused = Vec::new();
                        fl.reject_strays(&mut refused);
                        for why in refused {
                            counters.fabric_refused.fetch_add(1, Ordering::Relaxed);
                            log::warn!("fabric port: {why}");
                        }
                    }
                    std::thread::sleep(Duration::from_millis(20));
                    None
                }
            },
            None => {
                if !want.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                match TcpStream::connect_timeout(
                    &opts.peer,
                    Duration::from_millis(opts.handshake_timeout_ms),
                ) {
                    Ok(mut s) => {
                        if prepare(&s, opts.handshake_timeout_ms).is_err() {
                            continue;
                        }
                        let r = auth_dial(&mut s, opts.node_id, &opts.psk);
                        if let Err(e) = &r {
                            log::warn!("replication peer {} refused: {e}", opts.peer);
                        }
                        Some((s, r))
                    }
                    Err(e) => {
                        if last_refusal_log.elapsed() > Duration::from_secs(10) {
                            log::info!("peer {} not reachable yet: {e}; retrying", opts.peer);
                            last_refusal_log = std::time::Instant::now();
                        }
                        std::thread::sleep(Duration::from_millis(opts.connect_retry_ms));
                        None
                    }
                }
            }
        };
        let Some((s, r)) = attempt else { continue };
        match r {
            Ok(peer_id) if peer_id != opts.node_id => {
                let conn = match establish(s, &opts, build, fabric_listener.as_ref(), &counters) {
                    Ok(c) => c,
                    Err(e) => {
                        log::warn!("replication link with node {peer_id} not set up: {e}");
                        std::thread::sleep(Duration::from_millis(opts.connect_retry_ms));
                        continue;
                    }
                };
                counters.connections.fetch_add(1, Ordering::Relaxed);
                log::info!("replication link up with node {peer_id} ({})", conn.kind());
                want.store(false, Ordering::Release);
                *ready.lock().unwrap() = Some(conn);
                wake.notify();
            }
            Ok(peer_id) => {
                log::error!("the peer has the same node.id = {peer_id} as this node; give the two nodes different ids");
                std::thread::sleep(Duration::from_millis(opts.connect_retry_ms));
            }
            Err(_) => {
                counters.auth_failures.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(opts.connect_retry_ms));
            }
        }
    }
}

/// Appends a frame holding `m` to `out`.
pub fn push_frame(out: &mut Vec<u8>, m: &Msg) {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER_BYTES]);
    m.encode(out);
    seal(out, start);
}

/// Appends a `Msg::Req` frame straight from a ring entry (no copy of the
/// payload into an intermediate message).
pub fn push_req_frame(out: &mut Vec<u8>, hdr: &ReqHeader, payload: &[u8]) {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER_BYTES]);
    encode_req(out, hdr, payload);
    seal(out, start);
}

/// The bytes of a `Msg::Req` frame before its payload (frame header and
/// REQ header), its CRC computed over those and `payload` where it lies:
/// the frame is these bytes followed by the payload, sent without copying
/// it.
pub fn req_frame_head(out: &mut Vec<u8>, hdr: &ReqHeader, payload: &[u8]) {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER_BYTES]);
    encode_req(out, hdr, &[]);
    // `encode_req` wrote a zero length before the (empty) payload bytes:
    // put the payload's length there.
    let n = out.len();
    out[n - 8..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    let head = &out[start + FRAME_HEADER_BYTES..];
    let len = (head.len() + payload.len()) as u32;
    let crc = crc32c::crc32c_append(crc32c::crc32c(head), payload);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

fn seal(out: &mut [u8], start: usize) {
    let body = &out[start + FRAME_HEADER_BYTES..];
    let len = body.len() as u32;
    let crc = crc32c::crc32c(body);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

#[derive(Debug, PartialEq, Eq)]
pub enum FrameError {
    TooLarge(u32),
    BadChecksum,
    Decode(String),
}

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameError::TooLarge(n) => {
                write!(f, "frame of {n} bytes exceeds link.max_message_bytes")
            }
            FrameError::BadChecksum => write!(f, "frame checksum mismatch"),
            FrameError::Decode(e) => write!(f, "{e}"),
        }
    }
}

/// What [`parse_frames`] took.
#[derive(Debug, PartialEq, Eq)]
pub struct Parsed {
    /// Bytes consumed from the front of the buffer (whole frames).
    pub used: usize,
    /// A complete frame waits at `used`: its payload found no buffer.
    pub blocked: bool,
}

/// Takes complete frames from the front of `buf`, decoding each; a REQ's
/// payload goes into a buffer from `alloc` (see [`Msg::decode_with`]).
/// Stops at a partial frame or at a REQ `alloc` has no buffer for.
pub fn parse_frames(
    buf: &[u8],
    max_frame: usize,
    out: &mut Vec<Msg>,
    alloc: &mut dyn FnMut(usize) -> Option<IoBuf>,
) -> Result<Parsed, FrameError> {
    let mut p = 0;
    while buf.len() - p >= FRAME_HEADER_BYTES {
        let len = u32::from_le_bytes(buf[p..p + 4].try_into().unwrap());
        if len as usize > max_frame {
            return Err(FrameError::TooLarge(len));
        }
        let total = FRAME_HEADER_BYTES + len as usize;
        if buf.len() - p < total {
            break;
        }
        let crc = u32::from_le_bytes(buf[p + 4..p + 8].try_into().unwrap());
        let body = &buf[p + FRAME_HEADER_BYTES..p + total];
        if crc32c::crc32c(body) != crc {
            return Err(FrameError::BadChecksum);
        }
        match Msg::decode_with(body, alloc).map_err(|e| FrameError::Decode(e.to_string()))? {
            Some(m) => out.push(m),
            None => {
                return Ok(Parsed {
                    used: p,
                    blocked: true,
                })
            }
        }
        p += total;
    }
    Ok(Parsed {
        used: p,
        blocked: false,
    })
}

/// An allocator for [`parse_frames`] that always gives a heap buffer.
pub fn heap(n: usize) -> Option<IoBuf> {
    Some(IoBuf::new(n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::ReqKind;

    #[test]
    fn frames_round_trip_and_corruption_is_detected() {
        let mut b = Vec::new();
        push_frame(&mut b, &Msg::Ack1(5));
        let hdr = ReqHeader {
            seq: 1,
            gen: 1,
            kind: ReqKind::Write,
            fua: false,
            offset: 0,
            len: 3,
        };
        push_req_frame(&mut b, &hdr, &[1, 2, 3]);
        let mut out = Vec::new();
        assert_eq!(
            parse_frames(&b, 1 << 20, &mut out, &mut heap).unwrap().used,
            b.len()
        );
        assert_eq!(
            out[1],
            Msg::Req {
                hdr,
                payload: vec![1, 2, 3].into()
            }
        );
        // A partial frame is left for later.
        out.clear();
        assert_eq!(
            parse_frames(&b[..b.len() - 1], 1 << 20, &mut out, &mut heap).unwrap(),
            Parsed {
                used: 17,
                blocked: false
            }
        );
        let mut bad = b.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(
            parse_frames(&bad, 1 << 20, &mut Vec::new(), &mut heap),
            Err(FrameError::BadChecksum)
        );
        assert!(matches!(
            parse_frames(&b, 4, &mut Vec::new(), &mut heap),
            Err(FrameError::TooLarge(_))
        ));
    }

    #[test]
    fn a_req_frame_head_and_payload_make_the_same_frame() {
        let hdr = ReqHeader {
            seq: 9,
            gen: 2,
            kind: ReqKind::Write,
            fua: true,
            offset: 8192,
            len: 4096,
        };
        let payload: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        let mut whole = Vec::new();
        push_req_frame(&mut whole, &hdr, &payload);
        let mut split = Vec::new();
        req_frame_head(&mut split, &hdr, &payload);
        split.extend_from_slice(&payload);
        assert_eq!(whole, split);
    }

    #[test]
    fn a_req_without_a_buffer_waits_in_place() {
        let hdr = ReqHeader {
            seq: 1,
            gen: 1,
            kind: ReqKind::Write,
            fua: false,
            offset: 0,
            len: 4096,
        };
        let mut b = Vec::new();
        push_frame(&mut b, &Msg::Ack1(5));
        let first = b.len();
        push_req_frame(&mut b, &hdr, &[7u8; 4096]);
        push_frame(&mut b, &Msg::Ack2(4));
        let mut out = Vec::new();
        // No buffer: the ACK1 before the REQ is taken, the REQ and what
        // follows it stay.
        let p = parse_frames(&b, 1 << 20, &mut out, &mut |_| None).unwrap();
        assert_eq!(
            p,
            Parsed {
                used: first,
                blocked: true
            }
        );
        assert_eq!(out, vec![Msg::Ack1(5)]);
        // A buffer from a pool: the payload is copied into it once.
        let pool = volume::IoBufPool::new(1 << 20, 64 << 10);
        let mut copied = 0;
        let p = parse_frames(&b[first..], 1 << 20, &mut out, &mut |n| {
            copied += n;
            pool.get(n)
        })
        .unwrap();
        assert_eq!(p.used, b.len() - first);
        assert!(!p.blocked);
        assert_eq!(copied, 4096);
        match &out[1] {
            Msg::Req { hdr: h, payload } => {
                assert_eq!(*h, hdr);
                assert!(payload.is_pooled());
                assert_eq!(&payload[..], &[7u8; 4096][..]);
            }
            m => panic!("expected the REQ, got {m:?}"),
        }
        assert_eq!(out[2], Msg::Ack2(4));
    }

    #[test]
    fn wrong_key_is_refused_both_ways() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            auth_accept(&mut s, 2, b"the-right-key-0123456789").map(|_| ())
        });
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let r = auth_dial(&mut c, 1, b"a-wrong-key-0123456789xx");
        assert!(matches!(t.join().unwrap(), Err(AuthError::WrongKey)));
        assert!(r.is_err());

        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            auth_accept(&mut s, 2, b"the-right-key-0123456789")
        });
        let mut c = TcpStream::connect(addr).unwrap();
        assert_eq!(
            auth_dial(&mut c, 1, b"the-right-key-0123456789").unwrap(),
            2
        );
        assert_eq!(t.join().unwrap().unwrap(), 1);
    }
}
