//! Replication messages between the two nodes, and their byte encoding.
//!
//! The encoding is little-endian and versioned by the link handshake. A
//! frame on the wire is `len: u32 | crc32c: u32 | body` where the checksum
//! covers the body (see `crate::link`); this module only encodes bodies.
//! Decoding never panics: any malformed body is an `Err`.

use super::types::{GenEntry, ReqHeader, ReqKind, Role, Seq, MAX_STATE_BYTES};
use volume::{IoBuf, SharedBuf};

/// What a node says about itself when a link comes up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub node_id: u32,
    pub role: Role,
    /// Generation history, oldest first. Empty for a new/replaced disk.
    pub history: Vec<GenEntry>,
    /// Highest seq held in the ring (0 when none ever).
    pub head: Seq,
    /// Oldest seq still held in the ring.
    pub first: Seq,
    /// This node's disk must be fully rewritten (new disk, or an
    /// interrupted full remirror).
    pub fresh: bool,
    /// This node's disk is mid-resync (inconsistent) and needs the peer's
    /// dirty extents again.
    pub resyncing: bool,
    /// Boot counter: changes at every start of the node.
    pub incarnation: u64,
    /// Fingerprint of the node's failover configuration (0: manual
    /// failover). Encoded only when non-zero, so a manual-mode node's
    /// `Hello` is the one older versions send and decode.
    pub failover: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    Hello(Hello),
    /// From the receiver of a resync/replay after the handshake: what it now
    /// holds, and the extents of ring entries it dropped (they may have been
    /// executed on its disk and must be rewritten from the authority).
    Ready {
        head: Seq,
        rollback: Vec<(u64, u64)>,
    },
    /// A mirrored request (live or replayed).
    Req {
        hdr: ReqHeader,
        payload: SharedBuf,
    },
    Ack1(Seq),
    Ack2(Seq),
    Ack3(Seq),
    /// Start of a dirty-map resync (or full remirror).
    ResyncBegin {
        extents: u64,
        bytes: u64,
        full: bool,
    },
    /// Current data of one dirty extent.
    Extent {
        offset: u64,
        data: Vec<u8>,
    },
    /// End of a resync: the receiver's ring continues at `next_seq`.
    ResyncEnd {
        next_seq: Seq,
        /// The extents hold the sender's disk as executed through this seq:
        /// the receiver is consistent only once it has executed it too.
        consistent_at: Seq,
    },
    /// From the resync receiver: every extent is applied and durable; the
    /// ring continues at `next_seq`.
    ResyncDone {
        next_seq: Seq,
    },
    /// Host FLUSH barrier: flush your disk once you executed through `through`.
    FlushReq {
        id: u64,
        through: Seq,
    },
    FlushAck {
        id: u64,
        ok: bool,
    },
    Heartbeat {
        incarnation: u64,
    },
    /// The handshake refused the pairing (split brain...).
    Refuse {
        reason: String,
    },
    /// From the sender, once per session when it is not degraded: every
    /// write it completed without the receiver's ACK1 has a seq at or below
    /// this one, and from now on it completes nothing the receiver has not
    /// acknowledged. A receiver that holds this seq durably is current: it
    /// may be promoted without losing acknowledged writes.
    InSync(Seq),
    /// Online verify, primary to backup: read `len` bytes at `offset` right
    /// after executing ring entry `after`, and answer the digests of each
    /// `chunk`-byte piece.
    VerifyReq {
        id: u64,
        offset: u64,
        len: u64,
        chunk: u64,
        after: Seq,
    },
    /// The backup's answer to `VerifyReq` `id`.
    VerifyDigest {
        id: u64,
        digests: Vec<u64>,
    },
    /// From the sender, once per session, once it has executed everything
    /// below the stream's start: its replicated state blob and the seq it
    /// came from. The receiver adopts it when `seq` is higher than its own (or
    /// it holds none): State entries folded into the dirty map, trimmed, or
    /// dropped past a fork reach it this way.
    State {
        seq: Seq,
        blob: Option<Vec<u8>>,
    },
}

#[derive(Debug, PartialEq, Eq)]
pub struct DecodeError(pub &'static str);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed replication message: {}", self.0)
    }
}

/// Upper bound on vector lengths inside a message, against hostile input.
const MAX_ITEMS: u64 = 1 << 20;

struct W<'a>(&'a mut Vec<u8>);
impl W<'_> {
    fn u8(&mut self, v: u8) {
        self.0.push(v)
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes())
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes())
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u64(b.len() as u64);
        self.0.extend_from_slice(b)
    }
}

struct R<'a> {
    b: &'a [u8],
    p: usize,
}
impl<'a> R<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.b.len() - self.p < n {
            return Err(DecodeError("truncated"));
        }
        let s = &self.b[self.p..self.p + n];
        self.p += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn len(&mut self) -> Result<usize, DecodeError> {
        let n = self.u64()?;
        if n > MAX_ITEMS * 64 || n as usize > self.b.len() - self.p {
            return Err(DecodeError("length out of range"));
        }
        Ok(n as usize)
    }
    fn bytes(&mut self) -> Result<Vec<u8>, DecodeError> {
        let n = self.len()?;
        Ok(self.take(n)?.to_vec())
    }
    fn bool(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError("bad bool")),
        }
    }
}

fn role_code(r: Role) -> u8 {
    match r {
        Role::Primary => 1,
        Role::Backup => 2,
    }
}

/// Appends the body of a `Msg::Req` for `hdr` and `payload`: the one
/// encoder of a REQ, used by `Msg::encode` and by the link, which frames a
/// REQ straight from the ring without building a `Msg`.
pub fn encode_req(out: &mut Vec<u8>, hdr: &ReqHeader, payload: &[u8]) {
    out.push(3);
    encode_header(out, hdr);
    W(out).bytes(payload);
}

fn encode_header(w: &mut Vec<u8>, h: &ReqHeader) {
    let mut w = W(w);
    w.u64(h.seq);
    w.u64(h.gen);
    w.u8(h.kind as u8);
    w.u8(h.fua as u8);
    w.u64(h.offset);
    w.u64(h.len);
}

fn decode_header(r: &mut R) -> Result<ReqHeader, DecodeError> {
    let seq = r.u64()?;
    let gen = r.u64()?;
    let kind = ReqKind::from_code(r.u8()?).ok_or(DecodeError("bad request kind"))?;
    let fua = r.bool()?;
    let offset = r.u64()?;
    let len = r.u64()?;
    Ok(ReqHeader {
        seq,
        gen,
        kind,
        fua,
        offset,
        len,
    })
}

impl Msg {
    /// Appends the encoded body to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut w = W(out);
        match self {
            Msg::Hello(h) => {
                w.u8(1);
                w.u32(h.node_id);
                w.u8(role_code(h.role));
                w.u64(h.history.len() as u64);
                for g in &h.history {
                    w.u64(g.gen);
                    w.u64(g.first_seq);
                    w.u32(g.origin);
                }
                w.u64(h.head);
                w.u64(h.first);
                w.u8(h.fresh as u8);
                w.u8(h.resyncing as u8);
                w.u64(h.incarnation);
                if h.failover != 0 {
                    w.u64(h.failover);
                }
            }
            Msg::Ready { head, rollback } => {
                w.u8(2);
                w.u64(*head);
                w.u64(rollback.len() as u64);
                for (o, l) in rollback {
                    w.u64(*o);
                    w.u64(*l);
                }
            }
            Msg::Req { hdr, payload } => encode_req(w.0, hdr, payload),
            Msg::Ack1(s) => {
                w.u8(4);
                w.u64(*s)
            }
            Msg::Ack2(s) => {
                w.u8(5);
                w.u64(*s)
            }
            Msg::Ack3(s) => {
                w.u8(6);
                w.u64(*s)
            }
            Msg::ResyncBegin {
                extents,
                bytes,
                full,
            } => {
                w.u8(7);
                w.u64(*extents);
                w.u64(*bytes);
                w.u8(*full as u8);
            }
            Msg::Extent { offset, data } => {
                w.u8(8);
                w.u64(*offset);
                w.bytes(data);
            }
            Msg::ResyncEnd {
                next_seq,
                consistent_at,
            } => {
                w.u8(9);
                w.u64(*next_seq);
                w.u64(*consistent_at);
            }
            Msg::FlushReq { id, through } => {
                w.u8(10);
                w.u64(*id);
                w.u64(*through);
            }
            Msg::FlushAck { id, ok } => {
                w.u8(11);
                w.u64(*id);
                w.u8(*ok as u8);
            }
            Msg::Heartbeat { incarnation } => {
                w.u8(12);
                w.u64(*incarnation);
            }
            Msg::ResyncDone { next_seq } => {
                w.u8(14);
                w.u64(*next_seq);
            }
            Msg::Refuse { reason } => {
                w.u8(13);
                w.bytes(reason.as_bytes());
            }
            Msg::InSync(s) => {
                w.u8(15);
                w.u64(*s);
            }
            Msg::VerifyReq {
                id,
                offset,
                len,
                chunk,
                after,
            } => {
                w.u8(16);
                for v in [id, offset, len, chunk, after] {
                    w.u64(*v);
                }
            }
            Msg::VerifyDigest { id, digests } => {
                w.u8(17);
                w.u64(*id);
                w.u64(digests.len() as u64);
                for d in digests {
                    w.u64(*d);
                }
            }
            Msg::State { seq, blob } => {
                w.u8(18);
                w.u64(*seq);
                w.u8(blob.is_some() as u8);
                w.bytes(blob.as_deref().unwrap_or(&[]));
            }
        }
    }

    /// Decodes one message body, a REQ's payload into a heap buffer.
    pub fn decode(b: &[u8]) -> Result<Msg, DecodeError> {
        Self::decode_with(b, &mut |n| Some(IoBuf::new(n)))?
            .ok_or(DecodeError("no buffer for the payload"))
    }

    /// Decodes one message body; a REQ's payload is copied into the
    /// buffer `alloc(len)` gives (`len` bytes, e.g. from the node's pool;
    /// an empty payload asks for none). `Ok(None)` when `alloc` had no
    /// buffer: nothing was consumed, the caller keeps the frame and tries
    /// again later.
    pub fn decode_with(
        b: &[u8],
        alloc: &mut dyn FnMut(usize) -> Option<IoBuf>,
    ) -> Result<Option<Msg>, DecodeError> {
        let mut r = R { b, p: 0 };
        let m = match r.u8()? {
            1 => {
                let node_id = r.u32()?;
                let role = match r.u8()? {
                    1 => Role::Primary,
                    2 => Role::Backup,
                    _ => return Err(DecodeError("bad role")),
                };
                let n = r.u64()?;
                if n > 4096 {
                    return Err(DecodeError("history too long"));
                }
                let mut history = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    history.push(GenEntry {
                        gen: r.u64()?,
                        first_seq: r.u64()?,
                        origin: r.u32()?,
                    });
                }
                let (head, first, fresh, resyncing, incarnation) =
                    (r.u64()?, r.u64()?, r.bool()?, r.bool()?, r.u64()?);
                // An older peer's Hello ends here (no failover fingerprint).
                let failover = if r.p < b.len() { r.u64()? } else { 0 };
                Msg::Hello(Hello {
                    node_id,
                    role,
                    history,
                    head,
                    first,
                    fresh,
                    resyncing,
                    incarnation,
                    failover,
                })
            }
            2 => {
                let head = r.u64()?;
                let n = r.u64()?;
                if n > MAX_ITEMS {
                    return Err(DecodeError("too many rollback extents"));
                }
                let mut rollback = Vec::with_capacity(n.min(1024) as usize);
                for _ in 0..n {
                    rollback.push((r.u64()?, r.u64()?));
                }
                Msg::Ready { head, rollback }
            }
            3 => {
                let hdr = decode_header(&mut r)?;
                let n = r.len()?;
                let payload = r.take(n)?;
                let ok = match hdr.kind {
                    ReqKind::Write => payload.len() as u64 == hdr.len,
                    ReqKind::State => {
                        payload.len() <= MAX_STATE_BYTES && hdr.offset == 0 && hdr.len == 0
                    }
                    _ => payload.is_empty(),
                };
                if !ok {
                    return Err(DecodeError("payload length does not match the request"));
                }
                if r.p != b.len() {
                    return Err(DecodeError("trailing bytes"));
                }
                let buf = if payload.is_empty() {
                    IoBuf::empty()
                } else {
                    let Some(mut buf) = alloc(payload.len()) else {
                        return Ok(None);
                    };
                    if buf.capacity() < payload.len() {
                        return Err(DecodeError("the allocator gave a buffer too small"));
                    }
                    buf.set_len(payload.len());
                    buf.copy_from_slice(payload);
                    buf
                };
                return Ok(Some(Msg::Req {
                    hdr,
                    payload: buf.share(),
                }));
            }
            4 => Msg::Ack1(r.u64()?),
            5 => Msg::Ack2(r.u64()?),
            6 => Msg::Ack3(r.u64()?),
            7 => Msg::ResyncBegin {
                extents: r.u64()?,
                bytes: r.u64()?,
                full: r.bool()?,
            },
            8 => Msg::Extent {
                offset: r.u64()?,
                data: r.bytes()?,
            },
            9 => Msg::ResyncEnd {
                next_seq: r.u64()?,
                consistent_at: r.u64()?,
            },
            10 => Msg::FlushReq {
                id: r.u64()?,
                through: r.u64()?,
            },
            11 => Msg::FlushAck {
                id: r.u64()?,
                ok: r.bool()?,
            },
            12 => Msg::Heartbeat {
                incarnation: r.u64()?,
            },
            13 => Msg::Refuse {
                reason: String::from_utf8_lossy(&r.bytes()?).into_owned(),
            },
            14 => Msg::ResyncDone { next_seq: r.u64()? },
            15 => Msg::InSync(r.u64()?),
            16 => Msg::VerifyReq {
                id: r.u64()?,
                offset: r.u64()?,
                len: r.u64()?,
                chunk: r.u64()?,
                after: r.u64()?,
            },
            17 => {
                let id = r.u64()?;
                let n = r.u64()?;
                if n > super::verify::MAX_VERIFY_CHUNKS {
                    return Err(DecodeError("too many verify digests"));
                }
                let mut digests = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    digests.push(r.u64()?);
                }
                Msg::VerifyDigest { id, digests }
            }
            18 => {
                let seq = r.u64()?;
                let some = r.bool()?;
                let b = r.bytes()?;
                if b.len() > MAX_STATE_BYTES || (!some && !b.is_empty()) {
                    return Err(DecodeError("bad state blob"));
                }
                Msg::State {
                    seq,
                    blob: some.then_some(b),
                }
            }
            _ => return Err(DecodeError("unknown message type")),
        };
        if r.p != b.len() {
            return Err(DecodeError("trailing bytes"));
        }
        Ok(Some(m))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Msg> {
        let hdr = ReqHeader {
            seq: 7,
            gen: 2,
            kind: ReqKind::Write,
            fua: true,
            offset: 4096,
            len: 4,
        };
        vec![
            Msg::Hello(Hello {
                node_id: 2,
                role: Role::Backup,
                history: vec![GenEntry {
                    gen: 1,
                    first_seq: 1,
                    origin: 0,
                }],
                head: 9,
                first: 3,
                fresh: false,
                resyncing: true,
                incarnation: 5,
                failover: 0,
            }),
            Msg::Hello(Hello {
                node_id: 1,
                role: Role::Primary,
                history: Vec::new(),
                head: 0,
                first: 1,
                fresh: true,
                resyncing: false,
                incarnation: 1,
                failover: 0x1234_5678_9abc_def0,
            }),
            Msg::Ready {
                head: 4,
                rollback: vec![(0, 4096)],
            },
            Msg::Req {
                hdr,
                payload: vec![1, 2, 3, 4].into(),
            },
            Msg::Ack1(3),
            Msg::Ack2(2),
            Msg::Ack3(1),
            Msg::ResyncBegin {
                extents: 3,
                bytes: 99,
                full: false,
            },
            Msg::Extent {
                offset: 8192,
                data: vec![9; 16],
            },
            Msg::ResyncEnd {
                next_seq: 11,
                consistent_at: 14,
            },
            Msg::ResyncDone { next_seq: 11 },
            Msg::FlushReq { id: 1, through: 5 },
            Msg::FlushAck { id: 1, ok: true },
            Msg::Heartbeat { incarnation: 3 },
            Msg::Refuse {
                reason: "split brain".into(),
            },
            Msg::InSync(12),
            Msg::VerifyReq {
                id: 3,
                offset: 1 << 20,
                len: 1 << 20,
                chunk: 4096,
                after: 17,
            },
            Msg::VerifyDigest {
                id: 3,
                digests: vec![1, u64::MAX, 5],
            },
            Msg::State {
                seq: 9,
                blob: Some(vec![1, 2, 3]),
            },
            Msg::State { seq: 0, blob: None },
            Msg::Req {
                hdr: ReqHeader {
                    seq: 8,
                    gen: 2,
                    kind: ReqKind::State,
                    fua: true,
                    offset: 0,
                    len: 0,
                },
                payload: vec![4; 40].into(),
            },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in samples() {
            let mut b = Vec::new();
            m.encode(&mut b);
            assert_eq!(Msg::decode(&b).unwrap(), m);
        }
    }

    /// Seeded mutation fuzzing: decoding arbitrary bytes never panics.
    #[test]
    fn mutated_messages_never_panic() {
        let mut rng = crate::sim::Rng::new(42);
        let bases: Vec<Vec<u8>> = samples()
            .iter()
            .map(|m| {
                let mut b = Vec::new();
                m.encode(&mut b);
                b
            })
            .collect();
        for i in 0..50_000 {
            let mut b = bases[i % bases.len()].clone();
            for _ in 0..1 + rng.below(4) {
                match rng.below(3) {
                    0 if !b.is_empty() => {
                        let p = rng.below(b.len() as u64) as usize;
                        b[p] = rng.next_u64() as u8;
                    }
                    1 if !b.is_empty() => {
                        b.truncate(rng.below(b.len() as u64) as usize);
                    }
                    _ => b.push(rng.next_u64() as u8),
                }
            }
            let _ = Msg::decode(&b);
        }
    }
}
