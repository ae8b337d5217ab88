//! One NVMe/TCP queue (connection): a sans-IO state machine fed with framed
//! PDUs. It answers through its [`crate::queue_io`] channel (drained by the
//! connection's reactor, or by the fuzz harness) and submits I/O to the volume
//! without waiting: completions build their response on the engine thread
//! and post it to the same channel.

use crate::admin::{self, ADMIN_QUEUE_ENTRIES, AER_LIMIT, IDENTIFY_LEN};
use crate::pdu::*;
use crate::queue_io::{drain_queue, Out, OutTx, QueueIo};
use crate::spec::*;
use crate::subsystem::{Ctrl, Shared};
use netreactor::RxBuf;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use volume::{IoBuf, IoError, IoResult, PathState, VolumeOp};

/// Data a queue may wait for (R2Ts issued, H2CData not yet received).
const R2T_BUDGET_BYTES: usize = 16 << 20;
/// Connect command data length.
const CONNECT_DATA_LEN: u32 = 1024;
/// In-capsule data accepted on the admin queue (the Linux host sizes admin
/// capsules at 8 KiB).
const ADMIN_ICD_BYTES: u32 = 8192;

/// A write (or other host-to-controller transfer) waiting for H2CData.
struct Transfer {
    cid: u16,
    sqe: Sqe,
    len: usize,
    /// The write's buffer, from the volume's pool at the first H2CData
    /// (`None` before, and while the connection receives into it).
    buf: Option<IoBuf>,
    /// Bytes of `buf` received so far (H2CData arrive in order).
    received: usize,
    digest_failed: bool,
}

/// Where the data of a PDU goes (see [`QueueCore::data_target`]).
pub enum DataPlace {
    /// Receive the whole PDU and [`QueueCore::feed`] it.
    Inline,
    /// The volume has no buffer free: leave the header unconsumed and ask
    /// again later.
    Stall,
    /// Receive the data straight into `buf[at..]` (up to its length), then
    /// [`QueueCore::feed_split`].
    Target(RxBuf),
}

/// A capsule's data: a slice of a received PDU, or a buffer it was
/// received into.
enum CapsuleData<'a> {
    Slice(&'a [u8]),
    Owned(IoBuf),
}

impl CapsuleData<'_> {
    fn as_slice(&self) -> &[u8] {
        match self {
            CapsuleData::Slice(s) => s,
            CapsuleData::Owned(b) => b,
        }
    }
}

/// An H2CData PDU's data: a slice of the received PDU, or `n` bytes
/// already received in place into the transfer's buffer.
enum H2cData<'a> {
    Slice(&'a [u8]),
    InPlace(usize),
}

impl H2cData<'_> {
    fn len(&self) -> usize {
        match self {
            H2cData::Slice(s) => s.len(),
            H2cData::InPlace(n) => *n,
        }
    }
}

/// Result of dispatching a command.
enum Outcome {
    Done(Status, u64, Vec<u8>),
    Submit(VolumeOp),
    /// Several volume ops (DSM ranges): one completion when all finish.
    SubmitAll(Vec<VolumeOp>),
    /// Completed later (AER).
    Deferred,
}

fn done(st: Status) -> Outcome {
    Outcome::Done(st, 0, Vec::new())
}

/// Maps a volume error to an NVMe status: the one place this happens.
pub fn status_of(e: IoError, is_read: bool) -> Status {
    match e {
        IoError::NotPrimary => SC_ANA_INACCESSIBLE,
        IoError::OutOfRange => SC_LBA_OUT_OF_RANGE,
        IoError::Unaligned | IoError::TooLarge => SC_INVALID_FIELD,
        IoError::Io(_) if is_read => SC_UNRECOVERED_READ,
        IoError::Io(_) => SC_WRITE_FAULT,
        IoError::Unavailable => SC_INTERNAL_PATH_ERROR,
    }
}

pub struct QueueCore {
    sh: Arc<Shared>,
    out: OutTx,
    io: Option<Arc<QueueIo>>,
    qid: Option<u16>,
    ctrl: Option<Arc<Ctrl>>,
    sq_entries: u32,
    /// CIDs of the commands in flight: added when a command is taken,
    /// removed when its completion is encoded (both on this thread).
    inflight: HashSet<u16>,
    /// [`QueueCore::drain`] met a close: nothing more is sent.
    closed: bool,
    transfers: HashMap<u16, Transfer>,
    /// Bytes of the transfers waiting for H2CData.
    r2t_bytes: usize,
    r2t_waiting: VecDeque<(u16, Sqe, u32)>,
    next_ttag: u16,
}

impl QueueCore {
    pub fn new(sh: Arc<Shared>, out: OutTx) -> Self {
        QueueCore {
            sh,
            out,
            io: None,
            qid: None,
            ctrl: None,
            sq_entries: ADMIN_QUEUE_ENTRIES as u32,
            inflight: HashSet::new(),
            closed: false,
            transfers: HashMap::new(),
            r2t_bytes: 0,
            r2t_waiting: VecDeque::new(),
            next_ttag: 0,
        }
    }

    /// Largest PDU accepted in the current state.
    pub fn max_plen(&self) -> u32 {
        // The same before ICReq, so that a wrong first PDU is read whole and
        // reported as a sequence error rather than a length error.
        let data = self
            .sh
            .max_h2c_data
            .max(self.sh.icd_bytes)
            .max(ADMIN_ICD_BYTES);
        CMD_HLEN as u32 + 4 + 128 + data + 4
    }

    fn terminate(&mut self, e: TransportError, offending: &[u8]) -> bool {
        let hlen = offending.get(2).copied().unwrap_or(0) as usize;
        let hdr = &offending[..hlen.clamp(CH_LEN.min(offending.len()), offending.len())];
        log::debug!(
            "nvme-tcp: terminating connection: FES {:#x} FEI {}",
            e.fes,
            e.fei
        );
        self.out
            .send(Out::Bytes(encode_term(PDU_C2H_TERM_REQ, e, hdr)));
        self.out.send(Out::Close);
        false
    }

    /// Encodes what the queue and its completions posted into `out`.
    /// Returns false once the queue asked for the connection to close
    /// (nothing posted after that is sent).
    pub fn drain(&mut self, out: &mut netreactor::Outbox) -> bool {
        if self.closed {
            while self.out.pop().is_some() {}
            return false;
        }
        let open = drain_queue(&self.out, self.io.as_deref(), &mut self.inflight, out);
        self.closed = !open;
        open
    }

    /// Reports a framing error found before a PDU could be read whole.
    pub fn feed_error(&mut self, e: TransportError, header: &[u8]) -> bool {
        self.terminate(e, header)
    }

    /// Handles one framed PDU. Returns false when the connection must end.
    pub fn feed(&mut self, raw: &RawPdu) -> bool {
        let io = match &self.io {
            None => return self.on_icreq(raw),
            Some(io) => io.clone(),
        };
        let p = match check_pdu(raw, io.dg) {
            Ok(p) => p,
            Err(e) => return self.terminate(e, &raw.bytes),
        };
        match p.ch.pdu_type {
            PDU_CAPSULE_CMD => {
                self.on_capsule(&io, p.header, CapsuleData::Slice(p.data), p.data_digest_ok)
            }
            PDU_H2C_DATA => self.on_h2c_data(
                &io,
                p.ch.flags,
                p.header,
                H2cData::Slice(p.data),
                p.data_digest_ok,
            ),
            PDU_H2C_TERM_REQ => {
                log::debug!(
                    "nvme-tcp: host terminated the connection (FES {:#x})",
                    get_u16(p.header, 8)
                );
                self.out.send(Out::Close);
                false
            }
            PDU_ICREQ => self.terminate(TransportError::new(FES_PDU_SEQUENCE_ERROR, 0), &raw.bytes),
            _ => self.terminate(TransportError::new(FES_INVALID_HEADER_FIELD, 0), &raw.bytes),
        }
    }

    fn on_icreq(&mut self, raw: &RawPdu) -> bool {
        if raw.ch.pdu_type != PDU_ICREQ {
            return self.terminate(TransportError::new(FES_PDU_SEQUENCE_ERROR, 0), &raw.bytes);
        }
        let p = match check_pdu(raw, Digests::default()) {
            Ok(p) => p,
            Err(e) => return self.terminate(e, &raw.bytes),
        };
        let ic = decode_ic(p.header);
        if ic.pfv != 0 {
            return self.terminate(TransportError::new(FES_INVALID_HEADER_FIELD, 8), &raw.bytes);
        }
        if ic.pda > 31 {
            return self.terminate(
                TransportError::new(FES_INVALID_HEADER_FIELD, 10),
                &raw.bytes,
            );
        }
        let resp = IcParams {
            pfv: 0,
            pda: 0,
            digests: ic.digests,
            max: self.sh.max_h2c_data,
        };
        self.out.send(Out::Bytes(encode_ic(PDU_ICRESP, resp)));
        self.io = Some(Arc::new(QueueIo::new(
            self.out.clone(),
            ic.digests,
            (ic.pda as usize + 1) * 4,
        )));
        true
    }

    /// Where the data of the PDU whose bytes up to its data (PDO) are
    /// `head` should be received: straight into a write's buffer for an
    /// in-capsule write or an H2CData PDU whose header checks out, else
    /// inline (the whole PDU through [`QueueCore::feed`], which also reports
    /// whatever is wrong with it).
    pub fn data_target(&mut self, head: &[u8]) -> DataPlace {
        let Some(io) = &self.io else {
            return DataPlace::Inline;
        };
        if head.len() < CH_LEN {
            return DataPlace::Inline;
        }
        let ch = CommonHeader::parse(&head[..CH_LEN]);
        let Ok(len) = check_head(ch, head, io.dg) else {
            return DataPlace::Inline;
        };
        match ch.pdu_type {
            PDU_CAPSULE_CMD if matches!(self.qid, Some(q) if q != 0) => {
                let mut sq = [0u8; 64];
                sq.copy_from_slice(&head[CH_LEN..CMD_HLEN]);
                let sqe = Sqe(sq);
                let (addr, sgl_len, sgl_id) = sqe.sgl();
                let plain_write = sqe.opcode() == IO_WRITE
                    && sgl_id == SGL_ICD
                    && addr == 0
                    && sgl_len as usize == len
                    && sgl_len <= self.sh.icd_bytes
                    && sqe.flags() & 0x03 == 0;
                if !plain_write {
                    return DataPlace::Inline;
                }
                match self.sh.vol.alloc_buf(len) {
                    Some(buf) => DataPlace::Target(RxBuf { buf, at: 0 }),
                    None => DataPlace::Stall,
                }
            }
            PDU_H2C_DATA => {
                let x = decode_xfer(head);
                let Some(t) = self.transfers.get_mut(&x.ttag) else {
                    return DataPlace::Inline;
                };
                let (off, n) = (x.offset as usize, x.len as usize);
                if t.cid != x.cccid
                    || n != len
                    || n == 0
                    || x.len > self.sh.max_h2c_data
                    || off != t.received
                    || off + n > t.len
                {
                    return DataPlace::Inline;
                }
                if t.buf.is_none() {
                    t.buf = self.sh.vol.alloc_buf(t.len);
                }
                let Some(mut buf) = t.buf.take() else {
                    return DataPlace::Stall;
                };
                buf.set_len(off + n);
                DataPlace::Target(RxBuf { buf, at: off })
            }
            _ => DataPlace::Inline,
        }
    }

    /// Handles a PDU whose data was received into the buffer
    /// [`QueueCore::data_target`] gave: `head` as given there, `buf` full,
    /// `digest` the data digest that followed (if negotiated). Returns
    /// false when the connection must end.
    pub fn feed_split(&mut self, head: &[u8], mut buf: IoBuf, digest: Option<u32>) -> bool {
        let Some(io) = self.io.clone() else {
            return false;
        };
        let ch = CommonHeader::parse(&head[..CH_LEN]);
        let header = &head[..ch.hlen as usize];
        match ch.pdu_type {
            PDU_CAPSULE_CMD => {
                let ok = digest.is_none_or(|d| d == crc(&buf));
                self.on_capsule(&io, header, CapsuleData::Owned(buf), ok)
            }
            _ => {
                let x = decode_xfer(header);
                let (off, n) = (x.offset as usize, x.len as usize);
                let ok = digest.is_none_or(|d| d == crc(&buf[off..off + n]));
                let Some(t) = self.transfers.get_mut(&x.ttag) else {
                    return false;
                };
                buf.set_len(t.len);
                t.buf = Some(buf);
                self.on_h2c_data(&io, ch.flags, header, H2cData::InPlace(n), ok)
            }
        }
    }

    /// Whether H2CData may come next (transfers wait for data).
    pub fn expects_h2c(&self) -> bool {
        !self.transfers.is_empty()
    }

    fn on_capsule(
        &mut self,
        io: &Arc<QueueIo>,
        header: &[u8],
        data: CapsuleData<'_>,
        data_digest_ok: bool,
    ) -> bool {
        let mut sq = [0u8; 64];
        sq.copy_from_slice(&header[CH_LEN..CMD_HLEN]);
        let sqe = Sqe(sq);
        let cid = sqe.cid();
        io.sq_head.fetch_add(1, Ordering::Relaxed);
        self.sh.poll_path_epoch();
        // The in-flight set is this thread's: a CID leaves it when its
        // completion is encoded, i.e. before the host can see it free. One
        // present for a retired AER stays present (the new command takes
        // its place).
        let in_flight = self.inflight.contains(&cid);
        if in_flight && !self.retire_aer(cid) {
            // The first command with this CID is still in flight and
            // keeps its slot.
            io.refuse(cid, SC_CID_CONFLICT);
            return true;
        }
        if !in_flight {
            if self.inflight.len() as u32 >= self.sq_entries {
                return self.terminate(TransportError::new(FES_PDU_SEQUENCE_ERROR, 0), header);
            }
            self.inflight.insert(cid);
        }
        if !data_digest_ok {
            self.fail(
                io,
                cid,
                &sqe,
                SC_TRANSIENT_TRANSPORT,
                "data digest mismatch",
            );
            return true;
        }
        if self.qid.is_none() && !(sqe.opcode() == OPC_FABRICS && sqe.fctype() == FCTYPE_CONNECT) {
            io.complete(cid, SC_CMD_SEQ_ERROR, 0, &[]);
            return true;
        }
        if sqe.flags() & 0x03 != 0 {
            // Fused operations are not supported.
            self.fail(io, cid, &sqe, SC_INVALID_FIELD, "fused operation");
            return true;
        }
        let need = match self.data_out_len(&sqe) {
            Ok(n) => n,
            Err(st) => {
                io.complete(cid, st, 0, &[]);
                return true;
            }
        };
        let (addr, sgl_len, sgl_id) = sqe.sgl();
        let icd = data.as_slice();
        match need {
            Some(n) if n > 0 => {
                if sgl_len != n {
                    self.fail(
                        io,
                        cid,
                        &sqe,
                        SC_SGL_DATA_LEN_INVALID,
                        "SGL length is not the data length",
                    );
                    return true;
                }
                match sgl_id {
                    SGL_ICD => {
                        let max_icd = if self.qid.unwrap_or(0) == 0 {
                            ADMIN_ICD_BYTES.max(self.sh.icd_bytes)
                        } else {
                            self.sh.icd_bytes
                        };
                        if addr != 0 || n > max_icd {
                            self.fail(
                                io,
                                cid,
                                &sqe,
                                SC_SGL_OFFSET_INVALID,
                                "in-capsule SGL offset or length",
                            );
                        } else if icd.len() != n as usize {
                            self.fail(
                                io,
                                cid,
                                &sqe,
                                SC_SGL_DATA_LEN_INVALID,
                                "in-capsule data length is not the SGL length",
                            );
                        } else {
                            let buf = match data {
                                CapsuleData::Owned(b) => b,
                                CapsuleData::Slice(d) => {
                                    // Connect data and the like are no
                                    // write payload.
                                    let payload = matches!(self.qid, Some(q) if q != 0)
                                        && sqe.opcode() == IO_WRITE;
                                    self.copied_buf(d, payload)
                                }
                            };
                            self.run(io, cid, &sqe, buf);
                        }
                    }
                    SGL_TRANSPORT => {
                        if !icd.is_empty() {
                            self.fail(
                                io,
                                cid,
                                &sqe,
                                SC_INVALID_FIELD,
                                "in-capsule data with a transport SGL",
                            );
                        } else {
                            self.start_r2t(io, cid, sqe, n);
                        }
                    }
                    _ => self.fail(
                        io,
                        cid,
                        &sqe,
                        SC_SGL_TYPE_INVALID,
                        "unsupported SGL descriptor type",
                    ),
                }
            }
            _ => {
                if !icd.is_empty() {
                    io.complete(cid, SC_INVALID_FIELD, 0, &[]);
                } else if sgl_len != 0 && sgl_id != SGL_TRANSPORT {
                    io.complete(cid, SC_SGL_TYPE_INVALID, 0, &[]);
                } else {
                    self.run(io, cid, &sqe, IoBuf::empty());
                }
            }
        }
        true
    }

    /// Retires the outstanding AER with this CID, if there is one on this
    /// admin queue. A host that gave up an AER on its side (Linux and SPDK
    /// hosts do at disconnect) reuses its CID for the next command: the
    /// AER then ends without a completion and the new command runs.
    fn retire_aer(&self, cid: u16) -> bool {
        let ctrl = match (&self.ctrl, self.qid) {
            (Some(c), Some(0)) => c,
            _ => return false,
        };
        let mut st = ctrl.st.lock().unwrap();
        match st.aers.iter().position(|&c| c == cid) {
            Some(i) => {
                st.aers.remove(i);
                drop(st);
                log::debug!(
                    "nvme-tcp: controller {:#x}: command id {cid} reused by the host: its AER is retired",
                    ctrl.cntlid
                );
                true
            }
            None => false,
        }
    }

    /// Fails a command before it runs; a refused Connect is logged with why
    /// (`what` says what was wrong).
    fn fail(&self, io: &QueueIo, cid: u16, sqe: &Sqe, st: Status, what: &str) {
        if sqe.opcode() == OPC_FABRICS && sqe.fctype() == FCTYPE_CONNECT {
            log::warn!(
                "nvme-tcp: refused Connect (qid {}): {what}; answered {st}",
                get_u16(&sqe.0, 42)
            );
        }
        io.complete(cid, st, 0, &[]);
    }

    /// Asks for a write's data, unless the queue already waits for
    /// `R2T_BUDGET_BYTES`: then the R2T waits until a transfer finishes, so
    /// buffers for data not yet received stay bounded per queue.
    fn start_r2t(&mut self, io: &Arc<QueueIo>, cid: u16, sqe: Sqe, len: u32) {
        if !self.transfers.is_empty() && self.r2t_bytes + len as usize > R2T_BUDGET_BYTES {
            self.r2t_waiting.push_back((cid, sqe, len));
            return;
        }
        let mut ttag = self.next_ttag;
        while self.transfers.contains_key(&ttag) {
            ttag = ttag.wrapping_add(1);
        }
        self.next_ttag = ttag.wrapping_add(1);
        self.r2t_bytes += len as usize;
        self.transfers.insert(
            ttag,
            Transfer {
                cid,
                sqe,
                len: len as usize,
                buf: None,
                received: 0,
                digest_failed: false,
            },
        );
        let pdu = encode_xfer(PDU_R2T, 0, cid, ttag, 0, len, &[], io.dg, 4);
        self.out.send(Out::Bytes(pdu));
    }

    /// A transfer finished: issue R2Ts that waited for budget.
    fn release_r2t(&mut self, io: &Arc<QueueIo>, len: usize) {
        self.r2t_bytes -= len;
        while let Some(&(_, _, n)) = self.r2t_waiting.front() {
            if !self.transfers.is_empty() && self.r2t_bytes + n as usize > R2T_BUDGET_BYTES {
                break;
            }
            let (cid, sqe, n) = self.r2t_waiting.pop_front().expect("front exists");
            self.start_r2t(io, cid, sqe, n);
        }
    }

    /// Capsule data that reached a receive buffer: copied into a buffer of
    /// the volume's (from its pool if it has one free), and counted if it
    /// is a write's `payload`.
    fn copied_buf(&self, d: &[u8], payload: bool) -> IoBuf {
        let mut b = self
            .sh
            .vol
            .alloc_buf(d.len())
            .unwrap_or_else(|| IoBuf::new(d.len()));
        b.copy_from_slice(d);
        if payload {
            self.sh
                .payload_copied
                .fetch_add(d.len() as u64, Ordering::Relaxed);
        }
        b
    }

    fn on_h2c_data(
        &mut self,
        io: &Arc<QueueIo>,
        flags: u8,
        header: &[u8],
        data: H2cData<'_>,
        data_digest_ok: bool,
    ) -> bool {
        let p_header = header;
        let x = decode_xfer(header);
        let max_h2c = self.sh.max_h2c_data;
        let t = match self.transfers.get_mut(&x.ttag) {
            Some(t) => t,
            None => {
                return self.terminate(TransportError::new(FES_INVALID_HEADER_FIELD, 10), p_header)
            }
        };
        if t.cid != x.cccid {
            return self.terminate(TransportError::new(FES_INVALID_HEADER_FIELD, 8), p_header);
        }
        if x.len as usize != data.len() || x.len == 0 {
            return self.terminate(TransportError::new(FES_INVALID_HEADER_FIELD, 16), p_header);
        }
        if x.len > max_h2c {
            return self.terminate(TransportError::new(FES_DATA_LIMIT_EXCEEDED, 16), p_header);
        }
        if x.offset as usize != t.received || x.offset as usize + x.len as usize > t.len {
            return self.terminate(TransportError::new(FES_DATA_OUT_OF_RANGE, 12), p_header);
        }
        if let H2cData::Slice(d) = data {
            // Received with its header: copied into the write's buffer.
            let buf = t.buf.get_or_insert_with(|| {
                self.sh
                    .vol
                    .alloc_buf(t.len)
                    .unwrap_or_else(|| IoBuf::new(t.len))
            });
            buf[t.received..t.received + d.len()].copy_from_slice(d);
            self.sh
                .payload_copied
                .fetch_add(d.len() as u64, Ordering::Relaxed);
        }
        t.received += data.len();
        t.digest_failed |= !data_digest_ok;
        let complete = t.received == t.len;
        if flags & FLAG_LAST_PDU != 0 && !complete {
            return self.terminate(TransportError::new(FES_PDU_SEQUENCE_ERROR, 1), p_header);
        }
        if complete {
            let t = self
                .transfers
                .remove(&x.ttag)
                .expect("transfer looked up above");
            self.release_r2t(io, t.len);
            if t.digest_failed {
                self.fail(
                    io,
                    t.cid,
                    &t.sqe,
                    SC_TRANSIENT_TRANSPORT,
                    "data digest mismatch",
                );
            } else {
                let buf = t.buf.unwrap_or_else(|| IoBuf::new(t.len));
                self.run(io, t.cid, &t.sqe, buf);
            }
        }
        true
    }

    /// Host-to-controller data a command needs, validated before any data
    /// moves so that a bad write never transfers or reaches the volume.
    fn data_out_len(&self, sqe: &Sqe) -> Result<Option<u32>, Status> {
        match self.qid {
            None => Ok(Some(CONNECT_DATA_LEN)),
            Some(0) => Ok(None),
            Some(_) => match sqe.opcode() {
                IO_WRITE => {
                    self.check_ns_and_path(sqe)?;
                    let (_, len) = self.rw_range(sqe)?;
                    Ok(Some(len))
                }
                IO_DSM => {
                    self.check_ns_and_path(sqe)?;
                    Ok(Some(((sqe.cdw(10) & 0xFF) + 1) * 16))
                }
                _ => Ok(None),
            },
        }
    }

    fn check_ns_and_path(&self, sqe: &Sqe) -> Result<(), Status> {
        if sqe.nsid() != 1 && !(sqe.opcode() == IO_FLUSH && sqe.nsid() == 0xFFFF_FFFF) {
            return Err(SC_INVALID_NS);
        }
        if self.sh.vol.path_state() != PathState::Optimized {
            return Err(SC_ANA_INACCESSIBLE);
        }
        Ok(())
    }

    /// Byte offset and length of a Read / Write / Write Zeroes.
    fn rw_range(&self, sqe: &Sqe) -> Result<(u64, u32), Status> {
        let g = self.sh.geometry;
        let slba = sqe.cdw(10) as u64 | ((sqe.cdw(11) as u64) << 32);
        let nlb = (sqe.cdw(12) & 0xFFFF) as u64 + 1;
        match slba.checked_add(nlb) {
            Some(end) if end <= g.num_blocks => {}
            _ => return Err(SC_LBA_OUT_OF_RANGE),
        }
        let len = nlb * g.block_size as u64;
        if sqe.opcode() != IO_WRITE_ZEROES && len > self.sh.mdts_bytes as u64 {
            return Err(SC_INVALID_FIELD);
        }
        Ok((slba * g.block_size as u64, len.min(u32::MAX as u64) as u32))
    }

    fn run(&mut self, io: &Arc<QueueIo>, cid: u16, sqe: &Sqe, data: IoBuf) {
        let (_, sgl_len, _) = sqe.sgl();
        let outcome = match self.qid {
            None => self.connect(io, sqe, &data),
            Some(0) => self.admin(cid, sqe),
            Some(_) => self.io_cmd(sqe, data),
        };
        match outcome {
            Outcome::Done(st, result, out) => {
                if st.is_success() && out.len() > sgl_len as usize {
                    io.complete(cid, SC_SGL_DATA_LEN_INVALID, 0, &[]);
                } else {
                    io.complete(cid, st, result, &out);
                }
            }
            Outcome::Deferred => {}
            Outcome::Submit(op) => {
                let is_read = matches!(op, VolumeOp::Read { .. });
                let io = io.clone();
                self.sh.vol.submit(
                    op,
                    Box::new(move |r: IoResult| match r {
                        Ok(d) if is_read => io.complete_read(cid, d),
                        Ok(_) => io.complete(cid, Status::SUCCESS, 0, &[]),
                        Err(e) => io.complete(cid, status_of(e, is_read), 0, &[]),
                    }),
                );
            }
            Outcome::SubmitAll(ops) => {
                let left = Arc::new(AtomicU32::new(ops.len() as u32));
                let first_err: Arc<Mutex<Option<IoError>>> = Arc::new(Mutex::new(None));
                for op in ops {
                    let (io, left, first_err) = (io.clone(), left.clone(), first_err.clone());
                    self.sh.vol.submit(
                        op,
                        Box::new(move |r: IoResult| {
                            if let Err(e) = r {
                                first_err.lock().unwrap().get_or_insert(e);
                            }
                            if left.fetch_sub(1, Ordering::AcqRel) == 1 {
                                let st = match *first_err.lock().unwrap() {
                                    Some(e) => status_of(e, false),
                                    None => Status::SUCCESS,
                                };
                                io.complete(cid, st, 0, &[]);
                            }
                        }),
                    );
                }
            }
        }
    }

    fn connect(&mut self, io: &Arc<QueueIo>, sqe: &Sqe, data: &[u8]) -> Outcome {
        let recfmt = get_u16(&sqe.0, 40);
        let qid = get_u16(&sqe.0, 42);
        let sqsize = get_u16(&sqe.0, 44);
        let cattr = sqe.0[46];
        let kato = get_u32(&sqe.0, 48);
        let mut hostid = [0u8; 16];
        hostid.copy_from_slice(&data[0..16]);
        let cntlid = get_u16(data, 16);
        let subnqn = get_str0(data, 256, 256);
        let hostnqn = get_str0(data, 512, 256);
        // Every refusal is logged: a host that cannot connect shows why.
        let refuse = |st: Status, dw0: u64, why: String| {
            log::warn!(
                "nvme-tcp: refused Connect (qid {qid}, host {hostnqn:?}, subsystem {subnqn:?}): {why}; answered {st}"
            );
            Outcome::Done(st, dw0, Vec::new())
        };
        // Invalid parameter at byte `off` of the command / of the data.
        let ipo_sqe = |off: u32, why: String| refuse(SC_CONNECT_INVALID_PARAM, off as u64, why);
        let ipo_data =
            |off: u32, why: String| refuse(SC_CONNECT_INVALID_PARAM, ((1 << 16) | off) as u64, why);
        if recfmt != 0 {
            return refuse(
                SC_CONNECT_INCOMPATIBLE_FORMAT,
                0,
                format!("record format {recfmt} (only 0 is known)"),
            );
        }
        let cfg = &self.sh.cfg;
        let discovery = subnqn == DISCOVERY_NQN;
        if !discovery && subnqn != cfg.subnqn {
            return ipo_data(
                256,
                format!(
                    "no such subsystem here (this target serves {:?})",
                    cfg.subnqn
                ),
            );
        }
        // An empty host NQN is a host like any other when any host may
        // connect; with an allow-list it is simply not in it.
        if !discovery && !self.sh.host_allowed(&hostnqn) {
            return refuse(
                SC_CONNECT_INVALID_HOST,
                0,
                "host NQN not in nvme allowed_hosts".into(),
            );
        }
        let ctrl = if qid == 0 {
            if !(1..ADMIN_QUEUE_ENTRIES).contains(&sqsize) {
                return ipo_sqe(
                    44,
                    format!(
                        "admin SQSIZE {sqsize} (0's based) outside 1..={}",
                        ADMIN_QUEUE_ENTRIES - 1
                    ),
                );
            }
            if cntlid != 0xFFFF {
                return ipo_data(
                    16,
                    format!("CNTLID {cntlid:#x} on an admin queue (dynamic model: 0xffff)"),
                );
            }
            if kato > cfg.keep_alive_max_ms {
                return ipo_sqe(
                    48,
                    format!(
                        "KATO {kato} ms above keep_alive_max_ms {}",
                        cfg.keep_alive_max_ms
                    ),
                );
            }
            match self
                .sh
                .new_controller(discovery, hostnqn.clone(), hostid, kato, io.clone())
            {
                Some(c) => c,
                None => return refuse(SC_INTERNAL, 0, "no free controller id".into()),
            }
        } else {
            if discovery {
                return ipo_sqe(42, format!("I/O queue {qid} on the discovery subsystem"));
            }
            let ctrl = match self.sh.controller(cntlid) {
                Some(c) => c,
                None => return ipo_data(16, format!("no controller {cntlid:#x}")),
            };
            if ctrl.hostnqn != hostnqn || ctrl.hostid != hostid {
                return ipo_data(
                    512,
                    format!(
                        "host NQN / host id differ from those of controller {cntlid:#x}'s admin queue"
                    ),
                );
            }
            if sqsize < 1 || sqsize >= cfg.max_queue_depth {
                return ipo_sqe(
                    44,
                    format!(
                        "I/O SQSIZE {sqsize} (0's based) outside 1..={}",
                        cfg.max_queue_depth - 1
                    ),
                );
            }
            let mut st = ctrl.st.lock().unwrap();
            if st.dead || st.csts & 1 == 0 {
                drop(st);
                return refuse(
                    SC_CMD_SEQ_ERROR,
                    0,
                    format!("controller {cntlid:#x} is not enabled (CSTS.RDY 0) or has ended"),
                );
            }
            if qid > st.nr_io_queues {
                let n = st.nr_io_queues;
                drop(st);
                return ipo_sqe(42, format!("QID {qid} above the {n} I/O queues granted"));
            }
            if st.io_queues.contains_key(&qid) {
                drop(st);
                return refuse(
                    SC_CMD_SEQ_ERROR,
                    0,
                    format!("QID {qid} of controller {cntlid:#x} is already connected"),
                );
            }
            st.io_queues.insert(qid, io.clone());
            drop(st);
            ctrl
        };
        self.sq_entries = sqsize as u32 + 1;
        io.qid.store(qid as u32, Ordering::Relaxed);
        io.sq_entries.store(sqsize as u32 + 1, Ordering::Relaxed);
        io.sqflow_disabled
            .store(cattr & 0x04 != 0, Ordering::Relaxed);
        let cntlid = ctrl.cntlid;
        self.qid = Some(qid);
        self.ctrl = Some(ctrl);
        Outcome::Done(Status::SUCCESS, cntlid as u64, Vec::new())
    }

    /// A Connect on a queue that is already connected.
    fn connect_again(&self) -> Outcome {
        log::warn!(
            "nvme-tcp: refused Connect: queue {} of controller {:#x} is already connected; answered {}",
            self.qid.unwrap_or(0),
            self.ctrl.as_ref().map_or(0, |c| c.cntlid),
            SC_CMD_SEQ_ERROR
        );
        done(SC_CMD_SEQ_ERROR)
    }

    fn admin(&mut self, cid: u16, sqe: &Sqe) -> Outcome {
        let ctrl = self.ctrl.clone().expect("admin queue is connected");
        if sqe.opcode() == OPC_FABRICS {
            return match sqe.fctype() {
                FCTYPE_PROPERTY_GET => self.property_get(&ctrl, sqe),
                FCTYPE_PROPERTY_SET => self.property_set(&ctrl, sqe),
                FCTYPE_CONNECT => self.connect_again(),
                _ => done(SC_INVALID_OPCODE),
            };
        }
        {
            let st = ctrl.st.lock().unwrap();
            if st.cc & 1 == 0 || st.csts & 1 == 0 {
                return done(SC_CMD_SEQ_ERROR);
            }
        }
        match sqe.opcode() {
            ADM_IDENTIFY => self.identify(&ctrl, sqe),
            ADM_GET_LOG_PAGE => self.get_log_page(&ctrl, sqe),
            ADM_SET_FEATURES => self.set_features(&ctrl, sqe),
            ADM_GET_FEATURES => self.get_features(&ctrl, sqe),
            ADM_KEEP_ALIVE => {
                ctrl.st.lock().unwrap().last_keep_alive = Instant::now();
                done(Status::SUCCESS)
            }
            // Commands are never aborted (allowed by the spec): dword 0 bit 0 set.
            ADM_ABORT => Outcome::Done(Status::SUCCESS, 1, Vec::new()),
            ADM_ASYNC_EVENT => {
                let mut st = ctrl.st.lock().unwrap();
                if st.aers.len() >= AER_LIMIT {
                    return done(SC_AER_LIMIT);
                }
                st.aers.push(cid);
                drop(st);
                self.sh.maybe_send_ana_aen(&ctrl);
                Outcome::Deferred
            }
            _ => done(SC_INVALID_OPCODE),
        }
    }

    fn property_get(&self, ctrl: &Ctrl, sqe: &Sqe) -> Outcome {
        let size8 = sqe.0[40] & 0x07 == 1;
        let ofst = get_u32(&sqe.0, 44);
        let st = ctrl.st.lock().unwrap();
        let v: u64 = match ofst {
            PROP_CAP => self.sh.cap(),
            PROP_VS => admin::NVME_VERSION as u64,
            PROP_CC => st.cc as u64,
            PROP_CSTS => st.csts as u64,
            _ => return done(SC_INVALID_FIELD),
        };
        let v = if size8 { v } else { v & 0xFFFF_FFFF };
        Outcome::Done(Status::SUCCESS, v, Vec::new())
    }

    fn property_set(&self, ctrl: &Ctrl, sqe: &Sqe) -> Outcome {
        let ofst = get_u32(&sqe.0, 44);
        let value = get_u64(&sqe.0, 48) as u32;
        if ofst != PROP_CC {
            return done(SC_INVALID_FIELD);
        }
        let mut st = ctrl.st.lock().unwrap();
        let was_enabled = st.cc & 1 != 0;
        st.cc = value;
        if value & 1 != 0 && !was_enabled {
            let iosqes = (value >> 16) & 0xF;
            let iocqes = (value >> 20) & 0xF;
            st.csts = if iosqes == 6 && iocqes == 4 {
                1
            } else {
                1 << 1
            };
        } else if value & 1 == 0 && was_enabled {
            // Controller reset: I/O queues go away, AERs are dropped.
            st.csts = 0;
            // Outstanding AERs end with the reset; their CIDs are free again.
            let aers: Vec<u16> = st.aers.drain(..).collect();
            for cid in aers {
                st.admin.forget(cid);
            }
            for (_, q) in st.io_queues.drain() {
                q.close();
            }
        }
        if (value >> 14) & 3 != 0 {
            st.csts = (st.csts & !(3 << 2)) | (2 << 2);
        }
        done(Status::SUCCESS)
    }

    fn identify(&self, ctrl: &Ctrl, sqe: &Sqe) -> Outcome {
        let cns = (sqe.cdw(10) & 0xFF) as u8;
        let nsid = sqe.nsid();
        let data = match cns {
            CNS_CONTROLLER => admin::identify_controller(&self.sh, ctrl),
            CNS_NAMESPACE if !ctrl.discovery && nsid == 1 => admin::identify_namespace(&self.sh),
            CNS_ACTIVE_NS_LIST if !ctrl.discovery && nsid < 0xFFFF_FFFE => {
                admin::active_ns_list(nsid)
            }
            CNS_NS_DESC_LIST if !ctrl.discovery && nsid == 1 => admin::ns_descriptors(&self.sh),
            // NVM command set specific structures (CSI 0 in CDW11 31:24): all
            // zero, meaning no limits beyond MDTS and no extended formats.
            CNS_CSI_NAMESPACE | CNS_CSI_CONTROLLER if sqe.cdw(11) >> 24 != 0 => {
                return done(SC_INVALID_FIELD)
            }
            CNS_CSI_CONTROLLER if !ctrl.discovery => vec![0u8; IDENTIFY_LEN],
            CNS_CSI_NAMESPACE if !ctrl.discovery && nsid == 1 => vec![0u8; IDENTIFY_LEN],
            CNS_NAMESPACE | CNS_ACTIVE_NS_LIST | CNS_NS_DESC_LIST | CNS_CSI_NAMESPACE => {
                return done(SC_INVALID_NS)
            }
            _ => return done(SC_INVALID_FIELD),
        };
        debug_assert_eq!(data.len(), IDENTIFY_LEN);
        Outcome::Done(Status::SUCCESS, 0, data)
    }

    fn get_log_page(&self, ctrl: &Ctrl, sqe: &Sqe) -> Outcome {
        let cdw10 = sqe.cdw(10);
        let lid = (cdw10 & 0xFF) as u8;
        let lsp = (cdw10 >> 8) & 0x7F;
        let rae = cdw10 & (1 << 15) != 0;
        let numd = (((sqe.cdw(11) & 0xFFFF) as u64) << 16 | (cdw10 >> 16) as u64) + 1;
        let len = numd * 4;
        let offset = sqe.cdw(12) as u64 | ((sqe.cdw(13) as u64) << 32);
        if len > self.sh.mdts_bytes as u64 || !offset.is_multiple_of(4) {
            return done(SC_INVALID_FIELD);
        }
        let mut ana_epoch = None;
        let page = match (lid, ctrl.discovery) {
            (LID_ERROR, _) => admin::error_log(),
            (LID_DISCOVERY, true) => {
                admin::discovery_log(&self.sh, self.sh.host_allowed(&ctrl.hostnqn))
            }
            (LID_SMART, false) => admin::smart_log(),
            (LID_FW_SLOT, false) => admin::fw_slot_log(),
            (LID_CHANGED_NS, false) => admin::changed_ns_log(),
            (LID_ANA, false) => {
                // Read the epoch first: a change racing with this read is
                // then reported again by the next AEN.
                let epoch = self.sh.vol.path_epoch();
                ana_epoch = Some(epoch);
                admin::ana_log(&self.sh, epoch, self.sh.vol.path_state(), lsp & 1 != 0)
            }
            _ => return done(SC_INVALID_LOG_PAGE),
        };
        if offset > page.len() as u64 {
            return done(SC_INVALID_FIELD);
        }
        let mut data = page[offset as usize..].to_vec();
        data.resize(len as usize, 0);
        if let (Some(epoch), false) = (ana_epoch, rae) {
            let mut st = ctrl.st.lock().unwrap();
            st.ana_masked = false;
            st.ana_notified_epoch = epoch;
            drop(st);
            self.sh.maybe_send_ana_aen(ctrl);
        }
        Outcome::Done(Status::SUCCESS, 0, data)
    }

    fn set_features(&self, ctrl: &Ctrl, sqe: &Sqe) -> Outcome {
        let fid = (sqe.cdw(10) & 0xFF) as u8;
        if sqe.cdw(10) & (1 << 31) != 0 {
            return done(SC_FEATURE_NOT_SAVEABLE);
        }
        let v = sqe.cdw(11);
        let mut st = ctrl.st.lock().unwrap();
        match fid {
            FID_NUM_QUEUES if !ctrl.discovery => {
                let (nsq, ncq) = (v & 0xFFFF, v >> 16);
                if nsq == 0xFFFF || ncq == 0xFFFF {
                    return done(SC_INVALID_FIELD);
                }
                let n = (nsq.max(ncq) + 1).min(self.sh.cfg.max_queues as u32) as u16;
                st.nr_io_queues = n;
                Outcome::Done(Status::SUCCESS, num_queues_dw0(n) as u64, Vec::new())
            }
            FID_ASYNC_EVENT_CFG => {
                st.aen_cfg = v & if ctrl.discovery {
                    1 << 31
                } else {
                    AEN_ANA_CHANGE
                };
                drop(st);
                self.sh.maybe_send_ana_aen(ctrl);
                done(Status::SUCCESS)
            }
            FID_KEEP_ALIVE => {
                if v > self.sh.cfg.keep_alive_max_ms {
                    return done(SC_INVALID_FIELD);
                }
                st.kato_ms = v;
                st.last_keep_alive = Instant::now();
                done(Status::SUCCESS)
            }
            // The write cache cannot be turned off; a request to keep it on is fine.
            FID_VOLATILE_WC if !ctrl.discovery && v & 1 == 1 => done(Status::SUCCESS),
            FID_TEMP_THRESHOLD if !ctrl.discovery => done(Status::SUCCESS),
            // Mandatory features with nothing to configure here: arbitration
            // is accepted as is; power state 0 and the default error
            // recovery / write atomicity settings are the only values.
            FID_ARBITRATION if !ctrl.discovery => done(Status::SUCCESS),
            FID_POWER_MGMT | FID_ERROR_RECOVERY | FID_WRITE_ATOMICITY
                if !ctrl.discovery && v == 0 =>
            {
                done(Status::SUCCESS)
            }
            // On fabrics the host identifier comes with Connect only.
            FID_HOST_ID => done(SC_CMD_SEQ_ERROR),
            _ => done(SC_INVALID_FIELD),
        }
    }

    fn get_features(&self, ctrl: &Ctrl, sqe: &Sqe) -> Outcome {
        let fid = (sqe.cdw(10) & 0xFF) as u8;
        let sel = (sqe.cdw(10) >> 8) & 0x7;
        if fid == FID_HOST_ID {
            // Set by Connect: neither changeable nor saveable.
            if sel == 3 {
                return done(Status::SUCCESS);
            }
            // Only the 128-bit form (CTRATT bit 0): EXHID must be set.
            if sqe.cdw(11) & 1 == 0 {
                return done(SC_INVALID_FIELD);
            }
            return Outcome::Done(Status::SUCCESS, 0, ctrl.hostid.to_vec());
        }
        let st = ctrl.st.lock().unwrap();
        let v = match fid {
            FID_NUM_QUEUES if !ctrl.discovery => num_queues_dw0(st.nr_io_queues),
            FID_ASYNC_EVENT_CFG => st.aen_cfg,
            FID_KEEP_ALIVE => st.kato_ms,
            FID_VOLATILE_WC if !ctrl.discovery => 1,
            FID_TEMP_THRESHOLD if !ctrl.discovery => 343,
            FID_ARBITRATION | FID_POWER_MGMT | FID_ERROR_RECOVERY | FID_WRITE_ATOMICITY
                if !ctrl.discovery =>
            {
                0
            }
            _ => return done(SC_INVALID_FIELD),
        };
        // SEL 011b: supported capabilities (changeable, not saveable).
        let v = if sel == 3 { 1 << 2 } else { v };
        Outcome::Done(Status::SUCCESS, v as u64, Vec::new())
    }

    fn io_cmd(&mut self, sqe: &Sqe, data: IoBuf) -> Outcome {
        if sqe.opcode() == OPC_FABRICS {
            return if sqe.fctype() == FCTYPE_CONNECT {
                self.connect_again()
            } else {
                done(SC_INVALID_OPCODE)
            };
        }
        if !matches!(
            sqe.opcode(),
            IO_FLUSH | IO_WRITE | IO_READ | IO_WRITE_ZEROES | IO_DSM
        ) {
            return done(SC_INVALID_OPCODE);
        }
        if let Err(st) = self.check_ns_and_path(sqe) {
            return done(st);
        }
        let g = self.sh.geometry;
        match sqe.opcode() {
            IO_READ => match self.rw_range(sqe) {
                Err(st) => done(st),
                Ok((_, len)) if sqe.sgl().1 != len || sqe.sgl().2 != SGL_TRANSPORT => {
                    done(SC_SGL_DATA_LEN_INVALID)
                }
                Ok((offset, len)) => Outcome::Submit(VolumeOp::Read { offset, len }),
            },
            IO_WRITE => match self.rw_range(sqe) {
                Err(st) => done(st),
                Ok((offset, len)) => {
                    // The data phase collected exactly the command's length
                    // (checked against the SGL before any byte moved).
                    assert_eq!(data.len(), len as usize, "write data length");
                    Outcome::Submit(VolumeOp::Write {
                        offset,
                        data,
                        fua: sqe.cdw(12) & (1 << 30) != 0,
                    })
                }
            },
            IO_FLUSH => Outcome::Submit(VolumeOp::Flush),
            IO_WRITE_ZEROES => match self.rw_range(sqe) {
                Err(st) => done(st),
                Ok((offset, len)) => Outcome::SubmitAll(self.split(offset, len as u64, false)),
            },
            _ => {
                // Dataset Management: only the deallocate attribute acts.
                if sqe.cdw(11) & (1 << 2) == 0 {
                    return done(Status::SUCCESS);
                }
                let mut ops = Vec::new();
                for r in data.chunks_exact(16) {
                    let nlb = get_u32(r, 4) as u64;
                    let slba = get_u64(r, 8);
                    match slba.checked_add(nlb) {
                        Some(end) if end <= g.num_blocks => {}
                        _ => return done(SC_LBA_OUT_OF_RANGE),
                    }
                    if nlb > 0 {
                        let bs = g.block_size as u64;
                        ops.extend(self.split(slba * bs, nlb * bs, true));
                    }
                }
                if ops.is_empty() {
                    done(Status::SUCCESS)
                } else {
                    Outcome::SubmitAll(ops)
                }
            }
        }
    }

    /// Splits a zeroing or discard range into requests no larger than the
    /// volume accepts (Write Zeroes is not bounded by MDTS).
    fn split(&self, offset: u64, len: u64, discard: bool) -> Vec<VolumeOp> {
        let bs = self.sh.geometry.block_size as u64;
        let max = (self.sh.vol.max_io_bytes() as u64 / bs).max(1) * bs;
        let mut ops = Vec::new();
        let mut off = offset;
        while off < offset + len {
            let n = max.min(offset + len - off);
            ops.push(if discard {
                VolumeOp::Discard {
                    offset: off,
                    len: n,
                }
            } else {
                VolumeOp::WriteZeroes {
                    offset: off,
                    len: n,
                }
            });
            off += n;
        }
        ops
    }

    /// The connection ended: an admin queue takes its controller with it.
    pub fn teardown(&mut self) {
        self.r2t_waiting.clear();
        for (_, t) in self.transfers.drain() {
            self.inflight.remove(&t.cid);
        }
        if let (Some(ctrl), Some(qid)) = (self.ctrl.take(), self.qid) {
            if qid == 0 {
                self.sh.remove_controller(&ctrl);
            } else {
                ctrl.st.lock().unwrap().io_queues.remove(&qid);
            }
        }
        self.out.send(Out::Close);
    }
}

fn num_queues_dw0(n: u16) -> u32 {
    let z = n.saturating_sub(1) as u32;
    z | (z << 16)
}
