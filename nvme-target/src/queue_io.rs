//! The sending half of an NVMe/TCP queue: the channel its output goes to
//! (drained by the connection's reactor, or by the fuzz harness) and
//! [`QueueIo`], what a completion needs to answer a command from any
//! thread (framing, digests, SQ head).

use crate::pdu::*;
use crate::spec::*;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{SendError, Sender};
use std::sync::Mutex;

/// Largest data carried by one C2HData PDU; longer reads are split.
pub const C2H_CHUNK_BYTES: usize = 128 * 1024;
/// What a queue sends to its writer.
#[derive(Debug)]
pub enum Out {
    Bytes(Vec<u8>),
    /// PDUs whose data is sent from the buffer a read filled.
    Spliced(netreactor::Outbox),
    /// Shut the socket down (both directions) and stop.
    Close,
}

/// Where a queue's output goes: a channel, and the waker of whoever drains
/// it (the connection's reactor; a no-op for the fuzz harness).
#[derive(Clone)]
pub struct OutTx {
    tx: Sender<Out>,
    waker: netreactor::Waker,
}

impl OutTx {
    pub fn new(tx: Sender<Out>, waker: netreactor::Waker) -> OutTx {
        OutTx { tx, waker }
    }

    pub(crate) fn send(&self, o: Out) -> Result<(), SendError<Out>> {
        let r = self.tx.send(o);
        self.waker.wake();
        r
    }
}

impl From<Sender<Out>> for OutTx {
    fn from(tx: Sender<Out>) -> OutTx {
        OutTx::new(tx, netreactor::Waker::noop())
    }
}

/// The part of a queue that completions need: where to send, how to frame.
pub struct QueueIo {
    out: OutTx,
    pub(crate) dg: Digests,
    /// Host PDU data alignment in bytes.
    pub(crate) c2h_align: usize,
    pub(crate) qid: AtomicU32,
    /// SQ size (entries) once connected, for SQHD wrap.
    pub(crate) sq_entries: AtomicU32,
    pub(crate) sq_head: AtomicU32,
    pub(crate) sqflow_disabled: AtomicBool,
    pub(crate) inflight: Mutex<HashSet<u16>>,
}

impl QueueIo {
    pub(crate) fn new(out: OutTx, dg: Digests, c2h_align: usize) -> Self {
        QueueIo {
            out,
            dg,
            c2h_align,
            qid: AtomicU32::new(0),
            sq_entries: AtomicU32::new(u16::MAX as u32 + 1),
            sq_head: AtomicU32::new(0),
            sqflow_disabled: AtomicBool::new(false),
            inflight: Mutex::new(HashSet::new()),
        }
    }

    /// Drops a command that will never complete (an AER at reset).
    pub fn forget(&self, cid: u16) {
        self.inflight.lock().unwrap().remove(&cid);
    }

    pub fn close(&self) {
        let _ = self.out.send(Out::Close);
    }

    fn sqhd(&self) -> u16 {
        if self.sqflow_disabled.load(Ordering::Relaxed) {
            return 0xFFFF;
        }
        (self.sq_head.load(Ordering::Relaxed) % self.sq_entries.load(Ordering::Relaxed)) as u16
    }

    /// Completes command `cid`: C2HData for `data` (on success) and a
    /// CapsuleResp, unless the SUCCESS flag on the last C2HData replaces it.
    pub fn complete(&self, cid: u16, status: Status, result: u64, data: &[u8]) {
        self.inflight.lock().unwrap().remove(&cid);
        self.send_completion(cid, status, result, data);
    }

    /// Completes a read with the buffer the volume filled: the C2HData PDUs
    /// carry slices of it (no copy; the data digest is computed over it),
    /// then a CapsuleResp unless the SUCCESS flag replaces it.
    pub fn complete_read(&self, cid: u16, buf: volume::IoBuf) {
        self.inflight.lock().unwrap().remove(&cid);
        if buf.is_empty() {
            self.send_completion(cid, Status::SUCCESS, 0, &[]);
            return;
        }
        let buf = buf.share();
        let mut out = netreactor::Outbox::new();
        let n = buf.len().div_ceil(C2H_CHUNK_BYTES);
        let success_flag = self.sqflow_disabled.load(Ordering::Relaxed);
        for i in 0..n {
            let start = i * C2H_CHUNK_BYTES;
            let end = (start + C2H_CHUNK_BYTES).min(buf.len());
            let mut flags = 0;
            if i + 1 == n {
                flags |= FLAG_LAST_PDU;
                if success_flag {
                    flags |= FLAG_SUCCESS;
                }
            }
            out.extend_from_slice(&encode_xfer_head(
                PDU_C2H_DATA,
                flags,
                cid,
                0,
                start as u32,
                (end - start) as u32,
                self.dg,
                self.c2h_align,
            ));
            out.push_shared(&buf, start..end);
            if self.dg.data {
                out.extend_from_slice(&crc(&buf[start..end]).to_le_bytes());
            }
        }
        if !success_flag {
            out.extend_from_slice(&encode_capsule_resp(
                &self.cqe(cid, Status::SUCCESS, 0),
                self.dg,
            ));
        }
        let _ = self.out.send(Out::Spliced(out));
    }

    fn cqe(&self, cid: u16, status: Status, result: u64) -> Cqe {
        Cqe {
            dw0: result as u32,
            dw1: (result >> 32) as u32,
            sqhd: self.sqhd(),
            sqid: self.qid.load(Ordering::Relaxed) as u16,
            cid,
            status,
        }
    }

    /// Sends the completion PDUs without touching the in-flight set.
    pub(crate) fn send_completion(&self, cid: u16, status: Status, result: u64, data: &[u8]) {
        let mut bytes = Vec::new();
        let mut resp_needed = true;
        if status.is_success() && !data.is_empty() {
            let n = data.len().div_ceil(C2H_CHUNK_BYTES);
            let success_flag = self.sqflow_disabled.load(Ordering::Relaxed) && result == 0;
            for (i, chunk) in data.chunks(C2H_CHUNK_BYTES).enumerate() {
                let mut flags = 0;
                if i + 1 == n {
                    flags |= FLAG_LAST_PDU;
                    if success_flag {
                        flags |= FLAG_SUCCESS;
                        resp_needed = false;
                    }
                }
                let off = (i * C2H_CHUNK_BYTES) as u32;
                bytes.extend_from_slice(&encode_xfer(
                    PDU_C2H_DATA,
                    flags,
                    cid,
                    0,
                    off,
                    chunk.len() as u32,
                    chunk,
                    self.dg,
                    self.c2h_align,
                ));
            }
        }
        if resp_needed {
            bytes.extend_from_slice(&encode_capsule_resp(
                &self.cqe(cid, status, result),
                self.dg,
            ));
        }
        let _ = self.out.send(Out::Bytes(bytes));
    }
}
