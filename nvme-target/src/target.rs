//! The NVMe/TCP target: the listener and the service thread (keep-alive
//! timeouts, ANA change events) over the state of [`crate::subsystem`]
//! (configuration, controllers). Each accepted connection (queue) goes
//! straight to a connection reactor ([`netreactor`]): its PDUs are framed
//! in place from the received bytes and fed to the queue's state machine,
//! whose output the same reactor sends. No thread per connection.

use crate::pdu::{expected_hlen, CommonHeader, RawPdu, TransportError};
use crate::queue::{DataPlace, QueueCore};
use crate::queue_io::OutTx;
use crate::spec::*;
use crate::subsystem::Shared;
pub use crate::subsystem::{DiscoveryPort, NvmeConfig};
use netreactor::{Input, Outbox as NetOut, ReactorConfig, Reactors, RxBuf, RxMode, Waker};
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};
use volume::Volume;

/// How often the service thread polls the path epoch and keep-alive timers.
const SERVICE_TICK_MS: u64 = 25;

/// A running target. Dropping it without `shutdown` leaves threads running.
pub struct NvmeTarget {
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// Connections open on the reactors.
    conns: Arc<AtomicUsize>,
    reactors: Arc<Reactors>,
    /// Reactors this target started itself (and stops).
    own_reactors: bool,
}

/// Starts serving `vol` on `cfg.listen`, on reactors of its own (one
/// adaptive thread that sleeps as soon as it has no work).
pub fn start(cfg: NvmeConfig, vol: Arc<dyn Volume>) -> io::Result<NvmeTarget> {
    start_with(cfg, vol, &ReactorConfig::single("nvme-reactor"))
}

/// Starts serving `vol` on `cfg.listen`, on reactors of its own started
/// with `reactor` (threads, pinning, busy or adaptive polling).
pub fn start_with(
    cfg: NvmeConfig,
    vol: Arc<dyn Volume>,
    reactor: &ReactorConfig,
) -> io::Result<NvmeTarget> {
    let reactors = Reactors::start(reactor)?;
    start_inner(cfg, vol, reactors, true)
}

/// Starts serving `vol` on `cfg.listen` with its connections on `reactors`
/// (shared with the node's other targets).
pub fn start_on(
    cfg: NvmeConfig,
    vol: Arc<dyn Volume>,
    reactors: Arc<Reactors>,
) -> io::Result<NvmeTarget> {
    start_inner(cfg, vol, reactors, false)
}

fn start_inner(
    cfg: NvmeConfig,
    vol: Arc<dyn Volume>,
    reactors: Arc<Reactors>,
    own_reactors: bool,
) -> io::Result<NvmeTarget> {
    let listener = TcpListener::bind(cfg.listen).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "nvme: cannot listen on {}: {e} (is the port in use?)",
                cfg.listen
            ),
        )
    })?;
    let local_addr = listener.local_addr()?;
    let shared = Shared::new(cfg, vol, local_addr)?;
    listener.set_nonblocking(true)?;
    let stop = Arc::new(AtomicBool::new(false));
    let conns = Arc::new(AtomicUsize::new(0));
    let mut threads = Vec::new();
    {
        let (shared, stop, conns, reactors) = (
            shared.clone(),
            stop.clone(),
            conns.clone(),
            reactors.clone(),
        );
        threads.push(
            thread::Builder::new()
                .name("nvme-accept".into())
                .spawn(move || accept_loop(listener, shared, stop, conns, reactors))?,
        );
    }
    {
        let (shared, stop) = (shared.clone(), stop.clone());
        threads.push(
            thread::Builder::new()
                .name("nvme-service".into())
                .spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        thread::sleep(Duration::from_millis(SERVICE_TICK_MS));
                        shared.poll_path_epoch();
                        shared.expire_keep_alive(Instant::now());
                    }
                })?,
        );
    }
    log::info!("nvme-tcp: serving {} on {local_addr}", shared.cfg.subnqn);
    Ok(NvmeTarget {
        shared,
        stop,
        threads,
        conns,
        reactors,
        own_reactors,
    })
}

impl NvmeTarget {
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// Write payload bytes copied in user space on their way to the volume:
    /// writes below `zero_copy_receive_min_bytes`, received in bulk with
    /// the PDUs around them and copied once into their buffer, and the
    /// part of a larger write that came in the same receive as its header.
    pub fn payload_copied_bytes(&self) -> u64 {
        self.shared.payload_copied.load(Ordering::Relaxed)
    }

    /// The counter behind [`Self::payload_copied_bytes`], to read after the
    /// target is gone or from another thread (the node's status).
    pub fn payload_copied_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.shared.payload_copied)
    }

    /// Live controllers (admin associations).
    pub fn controller_count(&self) -> usize {
        self.shared.controller_count()
    }

    /// Stops accepting, closes every connection and joins the threads.
    pub fn shutdown(self) {
        self.stop.store(true, Ordering::Release);
        for t in self.threads {
            let _ = t.join();
        }
        // Connections see the stop flag (`Conn::aborted`) once kicked.
        self.reactors.kick();
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.conns.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(2));
        }
        if self.own_reactors {
            self.reactors.shutdown();
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    conns: Arc<AtomicUsize>,
    reactors: Arc<Reactors>,
) {
    while !stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((s, peer)) => {
                log::debug!("nvme-tcp: connection from {peer}");
                let _ = s.set_nonblocking(false);
                let _ = s.set_nodelay(true);
                let (sh, stop, conns2) = (shared.clone(), stop.clone(), conns.clone());
                conns.fetch_add(1, Ordering::AcqRel);
                let make = Box::new(move |waker: Waker| {
                    Box::new(NvmeConn::new(sh, stop, waker, conns2)) as Box<dyn netreactor::Conn>
                });
                if reactors.adopt(s, Vec::new(), make).is_err() {
                    log::warn!("nvme-tcp: no reactor can take {peer}; closing it");
                    conns.fetch_sub(1, Ordering::AcqRel);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(10))
            }
            Err(e) => {
                log::warn!("nvme-tcp: accept failed: {e}");
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// One queue (connection) on a reactor: frames PDUs from the received
/// bytes, feeds them to its [`QueueCore`], and hands what the queue and its
/// completions post to the reactor to send.
struct NvmeConn {
    core: QueueCore,
    /// A PDU whose data is being received straight into a write's buffer.
    split: Option<Split>,
    /// The last PDU header waits for a buffer from the volume's pool.
    stalled: bool,
    /// How write data is received: at or above the threshold straight into
    /// its buffer, one PDU header per receive while such writes flow;
    /// below it (and after other commands) in bulk, copied.
    rx_mode: RxMode,
    sh: Arc<Shared>,
    /// The queue ended the connection (`Out::Close`, a terminated
    /// transport, or a failed feed): send what is queued, then close.
    closing: bool,
    stop: Arc<AtomicBool>,
    conns: Arc<AtomicUsize>,
}

/// A PDU split at its data: `head` (the bytes up to PDO) is parsed, the
/// data goes into `buf` (lent to the reactor while it receives into it),
/// and a data digest (`dd`) follows the data.
struct Split {
    head: Vec<u8>,
    buf: Option<RxBuf>,
    dd: bool,
    /// The data is received straight into `buf` (lent to the reactor);
    /// false: it comes as input, with what follows, and is copied.
    zero_copy: bool,
}

impl NvmeConn {
    fn new(sh: Arc<Shared>, stop: Arc<AtomicBool>, waker: Waker, conns: Arc<AtomicUsize>) -> Self {
        NvmeConn {
            core: QueueCore::new(sh.clone(), OutTx::new(waker)),
            split: None,
            stalled: false,
            rx_mode: RxMode::new(sh.cfg.zero_copy_receive_min_bytes),
            sh,
            closing: false,
            stop,
            conns,
        }
    }
}

/// The length of the PDU that starts `b` (at least [`CH_LEN`] bytes), or
/// the framing error that ends the connection. Pure.
fn frame(b: &[u8], max_plen: u32) -> Result<usize, TransportError> {
    let ch = CommonHeader::parse(&b[..CH_LEN]);
    let hlen = expected_hlen(ch.pdu_type)
        .ok_or_else(|| TransportError::new(FES_INVALID_HEADER_FIELD, 0))?;
    if ch.hlen as usize != hlen {
        return Err(TransportError::new(FES_INVALID_HEADER_FIELD, 2));
    }
    if (ch.plen as usize) < hlen || ch.plen > max_plen {
        return Err(TransportError::new(FES_INVALID_HEADER_FIELD, 4));
    }
    Ok(ch.plen as usize)
}

impl netreactor::Conn for NvmeConn {
    fn input(&mut self, input: &[u8], out: &mut NetOut) -> Input {
        let mut at = 0;
        self.stalled = false;
        while !self.closing {
            let avail = &input[at..];
            if let Some(sp) = &mut self.split {
                let Some(b) = sp.buf.as_mut() else {
                    break;
                };
                // Data that came with the header (or a driver without
                // payload targets): copied into the buffer.
                at += b.fill_from(avail, &self.sh.payload_copied);
                if !b.is_full() {
                    break;
                }
                let digest = if sp.dd {
                    let rest = &input[at..];
                    if rest.len() < DIGEST_LEN {
                        return Input {
                            consumed: at,
                            need: DIGEST_LEN,
                        };
                    }
                    at += DIGEST_LEN;
                    Some(u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]))
                } else {
                    None
                };
                self.finish_split(digest);
                continue;
            }
            if avail.len() < CH_LEN {
                return Input {
                    consumed: at,
                    need: CH_LEN,
                };
            }
            let plen = match frame(avail, self.core.max_plen()) {
                Ok(n) => n,
                Err(te) => {
                    // Report it with the 8 bytes we understood.
                    let mut hdr = [0u8; 8];
                    hdr[2] = 8;
                    let _ = self.core.feed_error(te, &hdr);
                    self.closing = true;
                    break;
                }
            };
            let ch = CommonHeader::parse(&avail[..CH_LEN]);
            let pdo = ch.pdo as usize;
            self.note_pdu(&ch, avail);
            if matches!(ch.pdu_type, PDU_CAPSULE_CMD | PDU_H2C_DATA) && pdo >= CH_LEN && pdo < plen
            {
                // A PDU with data: once its header is in, its data may go
                // straight into the write's buffer.
                if avail.len() < pdo {
                    return Input {
                        consumed: at,
                        need: pdo,
                    };
                }
                match self.core.data_target(&avail[..pdo]) {
                    DataPlace::Stall => {
                        self.stalled = true;
                        return Input {
                            consumed: at,
                            need: 0,
                        };
                    }
                    DataPlace::Target(buf) => {
                        let zero_copy = self.rx_mode.zero_copy(buf.buf.len() - buf.at);
                        self.split = Some(Split {
                            head: avail[..pdo].to_vec(),
                            buf: Some(buf),
                            dd: ch.flags & FLAG_DDGSTF != 0,
                            zero_copy,
                        });
                        at += pdo;
                        continue;
                    }
                    DataPlace::Inline => {}
                }
            }
            if avail.len() < plen {
                return Input {
                    consumed: at,
                    need: plen,
                };
            }
            let raw = RawPdu {
                ch: CommonHeader::parse(&avail[..CH_LEN]),
                bytes: avail[..plen].to_vec(),
            };
            at += plen;
            if !self.core.feed(&raw) {
                self.closing = true;
            }
        }
        self.poll(out);
        Input {
            consumed: at,
            need: 0,
        }
    }

    fn poll(&mut self, out: &mut NetOut) {
        // Completions are encoded here, on the reactor thread, straight
        // into the connection's outbox.
        if !self.core.drain(out) {
            self.closing = true;
        }
    }

    fn wants_input(&self) -> bool {
        !self.closing
    }

    fn closing(&self) -> bool {
        self.closing
    }

    fn quiescent(&self) -> bool {
        // Completions after the close are dropped, as the writer thread
        // did before: nothing to wait for.
        true
    }

    fn aborted(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    fn closed(&mut self, why: &str) {
        log::debug!("nvme-tcp: connection closed ({why})");
        self.core.teardown();
        self.conns.fetch_sub(1, Ordering::AcqRel);
    }

    fn take_payload_target(&mut self) -> Option<RxBuf> {
        self.split.as_mut().filter(|sp| sp.zero_copy)?.buf.take()
    }

    fn payload_received(&mut self, buf: RxBuf, _out: &mut NetOut) {
        let Some(sp) = &mut self.split else {
            return;
        };
        let dd = sp.dd;
        sp.buf = Some(buf);
        if !dd {
            self.finish_split(None);
        }
        // With a data digest, the digest arrives as input.
    }

    fn receive_limit(&self) -> usize {
        // While writes at or above the zero-copy threshold flow, one PDU
        // header at a time, so that data after it is received straight
        // into its buffer: a command capsule's, or the common header alone
        // while H2CData may come; with a data digest to come after a
        // payload received so, only the digest (the next header's size is
        // not known before the digest is checked). After smaller writes
        // and other commands: in bulk (their data is copied).
        match &self.split {
            Some(sp) if !sp.zero_copy => usize::MAX,
            Some(sp) if sp.dd => DIGEST_LEN,
            _ if !self.rx_mode.header_only() => usize::MAX,
            _ if self.core.expects_h2c() => CH_LEN,
            _ => CMD_HLEN,
        }
    }

    fn stalled(&self) -> bool {
        self.stalled
    }
}

impl NvmeConn {
    /// Sizes the next receives by the PDU that starts `b` (header `ch`,
    /// framed): the write data it carries or, for a write command without
    /// in-capsule data, announces (its H2CData to come).
    fn note_pdu(&mut self, ch: &CommonHeader, b: &[u8]) {
        let (pdo, plen) = (ch.pdo as usize, ch.plen as usize);
        let dd = if ch.flags & FLAG_DDGSTF != 0 {
            DIGEST_LEN
        } else {
            0
        };
        let data_len = match ch.pdu_type {
            PDU_CAPSULE_CMD | PDU_H2C_DATA if pdo >= CH_LEN && pdo < plen => {
                plen.saturating_sub(pdo + dd)
            }
            // A write whose data comes in H2CData PDUs: the SGL's length
            // (SQE bytes 32..36), or large if not yet received.
            PDU_CAPSULE_CMD if b.len() > CH_LEN && b[CH_LEN] == IO_WRITE => {
                b.get(CH_LEN + 32..CH_LEN + 36).map_or(usize::MAX, |l| {
                    u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize
                })
            }
            // Another command while H2CData is still due: keep the mode
            // that data's command chose.
            _ if self.core.expects_h2c() => return,
            _ => 0,
        };
        self.rx_mode.saw(data_len);
    }

    /// The split PDU's data is whole: hand it to the queue.
    fn finish_split(&mut self, digest: Option<u32>) {
        let Some(Split {
            head, buf: Some(b), ..
        }) = self.split.take()
        else {
            return;
        };
        if !self.core.feed_split(&head, b.buf, digest) {
            self.closing = true;
        }
    }
}
