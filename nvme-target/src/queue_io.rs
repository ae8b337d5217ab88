//! The sending half of an NVMe/TCP queue. Completions may come from any
//! thread (the volume's, a controller's AER): [`QueueIo`] queues each as a
//! small record on a lock-free queue and wakes the connection's reactor;
//! the reactor, which owns the queue's [`crate::queue::QueueCore`], encodes
//! the records straight into the connection's outbox (`QueueCore::drain`):
//! no channel, no buffer per PDU, no lock on the data path.

use crate::pdu::*;
use crate::spec::*;
use crossbeam_queue::SegQueue;
use netreactor::Outbox;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

/// Largest data carried by one C2HData PDU; longer reads are split.
pub const C2H_CHUNK_BYTES: usize = 128 * 1024;

/// What a queue posts for its connection to send.
#[derive(Debug)]
pub enum Out {
    /// PDUs already encoded (ICResp, R2T, a termination request).
    Bytes(Vec<u8>),
    /// Command `cid` completed: C2HData for `data` (on success; its PDUs
    /// carry slices of the buffer, which for a read is the one the volume
    /// filled), then a CapsuleResp unless the SUCCESS flag on the last
    /// C2HData replaces it. `retire`: the command leaves the in-flight set
    /// (false for a refusal of a CID that is still in flight: that command
    /// keeps its slot).
    Done {
        cid: u16,
        status: Status,
        result: u64,
        data: volume::IoBuf,
        retire: bool,
    },
    /// Command `cid` will never complete (an AER at reset): its CID is free.
    Forget(u16),
    /// Shut the socket down (both directions) and stop.
    Close,
}

/// Where a queue's output goes: a lock-free queue, and the waker of whoever
/// drains it (the connection's reactor; a no-op for the fuzz harness).
#[derive(Clone)]
pub struct OutTx {
    q: Arc<SegQueue<Out>>,
    waker: netreactor::Waker,
}

impl OutTx {
    pub fn new(waker: netreactor::Waker) -> OutTx {
        OutTx {
            q: Arc::new(SegQueue::new()),
            waker,
        }
    }

    pub(crate) fn send(&self, o: Out) {
        self.q.push(o);
        self.waker.wake();
    }

    pub(crate) fn pop(&self) -> Option<Out> {
        self.q.pop()
    }
}

/// The part of a queue that completions need: where to post, and what the
/// encoder reads (framing, digests, SQ head).
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
        }
    }

    /// Drops a command that will never complete (an AER at reset).
    pub fn forget(&self, cid: u16) {
        self.out.send(Out::Forget(cid));
    }

    pub fn close(&self) {
        self.out.send(Out::Close);
    }

    /// Completes command `cid`: C2HData for `data` (on success) and a
    /// CapsuleResp, unless the SUCCESS flag on the last C2HData replaces it.
    pub fn complete(&self, cid: u16, status: Status, result: u64, data: &[u8]) {
        let data = if data.is_empty() {
            volume::IoBuf::empty()
        } else {
            volume::IoBuf::from_slice(data)
        };
        self.out.send(Out::Done {
            cid,
            status,
            result,
            data,
            retire: true,
        });
    }

    /// Completes a read with the buffer the volume filled (sent from it).
    pub fn complete_read(&self, cid: u16, buf: volume::IoBuf) {
        self.out.send(Out::Done {
            cid,
            status: Status::SUCCESS,
            result: 0,
            data: buf,
            retire: true,
        });
    }

    /// Answers `cid` without touching the in-flight set.
    pub(crate) fn refuse(&self, cid: u16, status: Status) {
        self.out.send(Out::Done {
            cid,
            status,
            result: 0,
            data: volume::IoBuf::empty(),
            retire: false,
        });
    }

    fn cqe(&self, cid: u16, status: Status, result: u64) -> Cqe {
        let sqhd = if self.sqflow_disabled.load(Ordering::Relaxed) {
            0xFFFF
        } else {
            (self.sq_head.load(Ordering::Relaxed) % self.sq_entries.load(Ordering::Relaxed)) as u16
        };
        Cqe {
            dw0: result as u32,
            dw1: (result >> 32) as u32,
            sqhd,
            sqid: self.qid.load(Ordering::Relaxed) as u16,
            cid,
            status,
        }
    }

    /// Appends the PDUs that answer `cid`: on success C2HData for `data`
    /// (its slices by reference, in chunks of [`C2H_CHUNK_BYTES`]), then a
    /// CapsuleResp unless the SUCCESS flag on the last C2HData replaces it.
    fn encode(&self, cid: u16, status: Status, result: u64, data: volume::IoBuf, out: &mut Outbox) {
        let mut resp_needed = true;
        if status.is_success() && !data.is_empty() {
            let buf = data.share();
            let n = buf.len().div_ceil(C2H_CHUNK_BYTES);
            let success_flag = self.sqflow_disabled.load(Ordering::Relaxed) && result == 0;
            for i in 0..n {
                let start = i * C2H_CHUNK_BYTES;
                let end = (start + C2H_CHUNK_BYTES).min(buf.len());
                let mut flags = 0;
                if i + 1 == n {
                    flags |= FLAG_LAST_PDU;
                    if success_flag {
                        flags |= FLAG_SUCCESS;
                        resp_needed = false;
                    }
                }
                put_xfer_head(
                    out.bytes_mut(),
                    PDU_C2H_DATA,
                    flags,
                    cid,
                    0,
                    start as u32,
                    (end - start) as u32,
                    self.dg,
                    self.c2h_align,
                );
                out.push_shared(&buf, start..end);
                if self.dg.data {
                    out.extend_from_slice(&crc(&buf[start..end]).to_le_bytes());
                }
            }
        }
        if resp_needed {
            put_capsule_resp(out.bytes_mut(), &self.cqe(cid, status, result), self.dg);
        }
    }
}

/// Encodes everything posted on `q` so far into `out` (on the thread that
/// owns the queue), retiring completed commands from `inflight`. Returns
/// false once an [`Out::Close`] was taken: nothing posted after it is sent.
/// Before the queue has its [`QueueIo`] (no ICReq yet) only raw bytes and
/// closes are posted.
pub(crate) fn drain_queue(
    q: &OutTx,
    io: Option<&QueueIo>,
    inflight: &mut HashSet<u16>,
    out: &mut Outbox,
) -> bool {
    while let Some(o) = q.pop() {
        match (o, io) {
            (Out::Bytes(b), _) => out.extend_from_slice(&b),
            (Out::Close, _) => {
                // Nothing posted after a Close is sent.
                while q.pop().is_some() {}
                return false;
            }
            (Out::Forget(cid), _) => {
                inflight.remove(&cid);
            }
            (
                Out::Done {
                    cid,
                    status,
                    result,
                    data,
                    retire,
                },
                Some(io),
            ) => {
                if retire {
                    inflight.remove(&cid);
                }
                io.encode(cid, status, result, data, out);
            }
            // A completion needs the queue's framing, which exists from the
            // ICReq on, before any command: not reachable.
            (Out::Done { .. }, None) => {}
        }
    }
    true
}
