//! Deterministic harness for the PDU parser and command dispatch: a byte
//! stream in, the target's replies out, no sockets and no threads (volume
//! completions run inline with `MemVolume`). Used by the bad-input tests
//! and by a seeded mutation fuzzer that runs on the stable toolchain.

use crate::pdu::*;
use crate::queue::QueueCore;
use crate::queue_io::OutTx;
use crate::spec::*;
use crate::subsystem::{NvmeConfig, Shared};
use netreactor::{Outbox, Waker};
use std::io;
use std::sync::Arc;
use volume::Volume;

/// Deterministic xorshift64* generator: the fuzzer's mutations and the
/// host's load (`nvme-host`) draw from it, so a seed reproduces a run.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// One PDU the target sent, decoded leniently (framing only, no digest checks).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    IcResp(IcParams),
    Resp(Cqe),
    Term { fes: u16, fei: u32 },
    R2T(XferHeader),
    C2H(XferHeader, u8, Vec<u8>),
    Other(u8),
}

#[derive(Debug, Default)]
pub struct SessionOutput {
    pub replies: Vec<Reply>,
    /// The target ended the connection.
    pub closed: bool,
    /// Bytes at the end of the output that do not frame as a PDU (must be 0).
    pub unframed_bytes: usize,
}

impl SessionOutput {
    /// Completion queue entries, in order.
    pub fn cqes(&self) -> Vec<Cqe> {
        self.replies
            .iter()
            .filter_map(|r| {
                if let Reply::Resp(c) = r {
                    Some(*c)
                } else {
                    None
                }
            })
            .collect()
    }
    /// The TermReq's FES, if the target terminated with one.
    pub fn term(&self) -> Option<(u16, u32)> {
        self.replies.iter().find_map(|r| {
            if let Reply::Term { fes, fei } = r {
                Some((*fes, *fei))
            } else {
                None
            }
        })
    }
    /// Status of the completion for `cid`.
    pub fn status_of(&self, cid: u16) -> Option<Status> {
        self.cqes().iter().find(|c| c.cid == cid).map(|c| c.status)
    }
}

/// Splits the target's output into replies.
pub fn parse_replies(b: &[u8]) -> Vec<Reply> {
    parse_replies_counted(b).0
}

/// Replies and the number of trailing bytes that did not frame.
pub fn parse_replies_counted(mut b: &[u8]) -> (Vec<Reply>, usize) {
    let mut v = Vec::new();
    while let Ok(raw) = read_pdu(&mut b, u32::MAX) {
        let h = &raw.bytes[..raw.ch.hlen as usize];
        v.push(match raw.ch.pdu_type {
            PDU_ICRESP => Reply::IcResp(decode_ic(h)),
            PDU_CAPSULE_RESP => Reply::Resp(Cqe::decode(&h[CH_LEN..])),
            PDU_C2H_TERM_REQ => Reply::Term {
                fes: get_u16(h, 8),
                fei: get_u32(h, 10),
            },
            PDU_R2T => Reply::R2T(decode_xfer(h)),
            PDU_C2H_DATA => {
                let dd = if raw.ch.flags & FLAG_DDGSTF != 0 {
                    DIGEST_LEN
                } else {
                    0
                };
                let data = raw.bytes[raw.ch.pdo as usize..raw.bytes.len() - dd].to_vec();
                Reply::C2H(decode_xfer(h), raw.ch.flags, data)
            }
            t => Reply::Other(t),
        });
    }
    (v, b.len())
}

/// A target without a listener: sessions are fed from byte slices.
pub struct Harness {
    sh: Arc<Shared>,
}

impl Harness {
    pub fn new(vol: Arc<dyn Volume>, cfg: NvmeConfig) -> io::Result<Harness> {
        let addr = cfg.listen;
        Ok(Harness {
            sh: Shared::new(cfg, vol, addr)?,
        })
    }

    /// The raw bytes the target sends for `input` (one connection, torn down).
    pub fn session_bytes(&self, input: &[u8]) -> Vec<u8> {
        let mut core = QueueCore::new(self.sh.clone(), OutTx::new(Waker::noop()));
        drive(&mut core, input);
        let mut sent = Outbox::new();
        core.drain(&mut sent);
        core.teardown();
        sent.to_vec()
    }

    /// Feeds `input` as one connection. With `teardown` false the queue's
    /// controller outlives the session (to connect I/O queues to it).
    pub fn session(&self, input: &[u8], teardown: bool) -> SessionOutput {
        let mut core = QueueCore::new(self.sh.clone(), OutTx::new(Waker::noop()));
        drive(&mut core, input);
        // What the target sent on its own, before the harness closes the
        // connection from the host side.
        let mut sent = Outbox::new();
        let mut out = SessionOutput {
            closed: !core.drain(&mut sent),
            ..SessionOutput::default()
        };
        if teardown {
            core.teardown();
        }
        drop(core);
        (out.replies, out.unframed_bytes) = parse_replies_counted(&sent.to_vec());
        out
    }
}

/// Frames `input` into PDUs and feeds them until the stream ends or the
/// queue closes the connection.
fn drive(core: &mut QueueCore, input: &[u8]) {
    let mut r = input;
    loop {
        match read_pdu(&mut r, core.max_plen()) {
            Ok(raw) => {
                if !core.feed(&raw) {
                    break;
                }
            }
            Err(Ok(te)) => {
                let mut hdr = [0u8; CH_LEN];
                hdr[2] = CH_LEN as u8;
                core.feed_error(te, &hdr);
                break;
            }
            Err(Err(_)) => break,
        }
    }
}

/// Builds host byte streams.
#[derive(Clone, Debug)]
pub struct Stream {
    pub bytes: Vec<u8>,
    pub dg: Digests,
}

impl Stream {
    /// A stream starting with an ICReq asking for `dg`.
    pub fn new(dg: Digests) -> Stream {
        Stream {
            bytes: encode_ic(
                PDU_ICREQ,
                IcParams {
                    pfv: 0,
                    pda: 0,
                    digests: dg,
                    max: 0,
                },
            ),
            dg,
        }
    }
    pub fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.bytes.extend_from_slice(b);
        self
    }
    /// A command; `icd` goes in the capsule with an in-capsule SGL, else
    /// the SGL is a transport descriptor of `xfer_len` bytes.
    pub fn cmd(&mut self, mut sqe: Sqe, icd: &[u8], xfer_len: u32) -> &mut Self {
        if icd.is_empty() {
            sqe.set_sgl(0, xfer_len, SGL_TRANSPORT);
        } else {
            sqe.set_sgl(0, icd.len() as u32, SGL_ICD);
        }
        self.bytes
            .extend_from_slice(&encode_capsule_cmd(&sqe, icd, self.dg));
        self
    }
    /// A command with its SGL exactly as given.
    pub fn cmd_raw(&mut self, sqe: &Sqe, icd: &[u8]) -> &mut Self {
        self.bytes
            .extend_from_slice(&encode_capsule_cmd(sqe, icd, self.dg));
        self
    }
    pub fn connect(
        &mut self,
        cid: u16,
        qid: u16,
        cntlid: u16,
        subnqn: &str,
        hostnqn: &str,
    ) -> &mut Self {
        let mut sqe = Sqe::new(OPC_FABRICS, cid);
        sqe.0[4] = FCTYPE_CONNECT;
        put_u16(&mut sqe.0, 42, qid);
        put_u16(&mut sqe.0, 44, 31);
        let mut data = vec![0u8; 1024];
        data[..16].copy_from_slice(b"fuzz-host-id-000");
        put_u16(&mut data, 16, cntlid);
        put_str0(&mut data, 256, 256, subnqn);
        put_str0(&mut data, 512, 256, hostnqn);
        self.cmd(sqe, &data, 0)
    }
    /// Property Set CC.EN with 64/16-byte queue entries.
    pub fn enable(&mut self, cid: u16) -> &mut Self {
        let mut sqe = Sqe::new(OPC_FABRICS, cid);
        sqe.0[4] = FCTYPE_PROPERTY_SET;
        put_u32(&mut sqe.0, 44, PROP_CC);
        put_u64(&mut sqe.0, 48, 1 | (6 << 16) | (4 << 20));
        self.cmd(sqe, &[], 0)
    }
    pub fn h2c(
        &mut self,
        cccid: u16,
        ttag: u16,
        offset: u32,
        data: &[u8],
        last: bool,
    ) -> &mut Self {
        let flags = if last { FLAG_LAST_PDU } else { 0 };
        let pdu = encode_xfer(
            PDU_H2C_DATA,
            flags,
            cccid,
            ttag,
            offset,
            data.len() as u32,
            data,
            self.dg,
            4,
        );
        self.bytes.extend_from_slice(&pdu);
        self
    }
}

pub const FUZZ_HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:fuzz";

fn admin_cmd(opcode: u8, cid: u16, nsid: u32, cdw10: u32, cdw11: u32) -> Sqe {
    let mut s = Sqe::new(opcode, cid);
    s.set_nsid(nsid);
    s.set_cdw(10, cdw10);
    s.set_cdw(11, cdw11);
    s
}

/// A well-formed admin session touching every admin command.
pub fn admin_seed(subnqn: &str, dg: Digests) -> Vec<u8> {
    let mut s = Stream::new(dg);
    s.connect(1, 0, 0xFFFF, subnqn, FUZZ_HOST).enable(2);
    let mut pg = Sqe::new(OPC_FABRICS, 3);
    pg.0[4] = FCTYPE_PROPERTY_GET;
    pg.0[40] = 1;
    s.cmd(pg, &[], 0);
    s.cmd(
        admin_cmd(ADM_IDENTIFY, 4, 0, CNS_CONTROLLER as u32, 0),
        &[],
        4096,
    );
    s.cmd(
        admin_cmd(ADM_IDENTIFY, 5, 1, CNS_NAMESPACE as u32, 0),
        &[],
        4096,
    );
    s.cmd(
        admin_cmd(ADM_IDENTIFY, 6, 0, CNS_ACTIVE_NS_LIST as u32, 0),
        &[],
        4096,
    );
    s.cmd(
        admin_cmd(ADM_IDENTIFY, 7, 1, CNS_NS_DESC_LIST as u32, 0),
        &[],
        4096,
    );
    s.cmd(
        admin_cmd(ADM_SET_FEATURES, 8, 0, FID_NUM_QUEUES as u32, 0x0003_0003),
        &[],
        0,
    );
    s.cmd(
        admin_cmd(
            ADM_SET_FEATURES,
            9,
            0,
            FID_ASYNC_EVENT_CFG as u32,
            AEN_ANA_CHANGE,
        ),
        &[],
        0,
    );
    s.cmd(
        admin_cmd(ADM_GET_FEATURES, 10, 0, FID_KEEP_ALIVE as u32, 0),
        &[],
        0,
    );
    s.cmd(
        admin_cmd(
            ADM_GET_LOG_PAGE,
            11,
            0xFFFF_FFFF,
            LID_ANA as u32 | (15 << 16),
            0,
        ),
        &[],
        64,
    );
    s.cmd(
        admin_cmd(
            ADM_GET_LOG_PAGE,
            12,
            0xFFFF_FFFF,
            LID_SMART as u32 | (127 << 16),
            0,
        ),
        &[],
        512,
    );
    s.cmd(admin_cmd(ADM_KEEP_ALIVE, 13, 0, 0, 0), &[], 0);
    s.cmd(admin_cmd(ADM_ASYNC_EVENT, 14, 0, 0, 0), &[], 0);
    s.cmd(admin_cmd(ADM_ABORT, 15, 0, 14 << 16, 0), &[], 0);
    s.bytes
}

/// A well-formed discovery session.
pub fn discovery_seed(dg: Digests) -> Vec<u8> {
    let mut s = Stream::new(dg);
    s.connect(1, 0, 0xFFFF, DISCOVERY_NQN, FUZZ_HOST).enable(2);
    s.cmd(
        admin_cmd(ADM_IDENTIFY, 3, 0, CNS_CONTROLLER as u32, 0),
        &[],
        4096,
    );
    s.cmd(
        admin_cmd(
            ADM_GET_LOG_PAGE,
            4,
            0,
            LID_DISCOVERY as u32 | (255 << 16),
            0,
        ),
        &[],
        1024,
    );
    s.cmd(
        admin_cmd(
            ADM_GET_LOG_PAGE,
            5,
            0,
            LID_DISCOVERY as u32 | (511 << 16),
            0,
        ),
        &[],
        2048,
    );
    s.cmd(
        admin_cmd(ADM_SET_FEATURES, 6, 0, FID_KEEP_ALIVE as u32, 1000),
        &[],
        0,
    );
    s.cmd(admin_cmd(ADM_KEEP_ALIVE, 7, 0, 0, 0), &[], 0);
    s.bytes
}

/// A well-formed I/O session against controller `cntlid`: in-capsule and
/// R2T writes, reads, flush, write zeroes, DSM.
pub fn io_seed(subnqn: &str, cntlid: u16, dg: Digests, block_size: u32) -> Vec<u8> {
    let mut s = Stream::new(dg);
    s.connect(1, 1, cntlid, subnqn, FUZZ_HOST);
    let rw = |op: u8, cid: u16, slba: u64, nlb: u32| {
        let mut q = rw_sqe(op, 1, slba, nlb, false);
        q.set_cid(cid);
        q
    };
    let bs = block_size as usize;
    s.cmd(rw(IO_WRITE, 2, 0, 2), &vec![0x5A; 2 * bs], 0);
    s.cmd(rw(IO_READ, 3, 0, 2), &[], 2 * block_size);
    s.cmd(rw(IO_WRITE, 4, 4, 20), &[], 20 * block_size);
    s.h2c(4, 0, 0, &vec![0x11; 8 * bs], false);
    s.h2c(4, 0, 8 * block_size, &vec![0x22; 12 * bs], true);
    let mut f = Sqe::new(IO_FLUSH, 5);
    f.set_nsid(1);
    s.cmd(f, &[], 0);
    s.cmd(rw(IO_WRITE_ZEROES, 6, 8, 4), &[], 0);
    let mut d = Sqe::new(IO_DSM, 7);
    d.set_nsid(1);
    d.set_cdw(10, 0);
    d.set_cdw(11, 1 << 2);
    let mut range = [0u8; 16];
    put_u32(&mut range, 4, 2);
    put_u64(&mut range, 8, 10);
    s.cmd(d, &range, 0);
    s.bytes
}

/// One mutation of `input`, chosen by `rng`.
pub fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    let rounds = 1 + rng.below(4);
    for _ in 0..rounds {
        if v.is_empty() {
            v.push(rng.next_u64() as u8);
        }
        let at = rng.below(v.len() as u64) as usize;
        match rng.below(8) {
            0 => v[at] ^= 1 << rng.below(8),
            1 => v[at] = [0u8, 0xFF, 0x7F, 0x80, 0x01, 0x5A, 0x01][rng.below(7) as usize],
            2 => v[at] = rng.next_u64() as u8,
            3 => v.truncate(at),
            4 => {
                let n = (rng.below(16) as usize).min(v.len() - at);
                v.drain(at..at + n);
            }
            5 => {
                let n = rng.below(16) as usize;
                let ins: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                v.splice(at..at, ins);
            }
            6 => {
                // Overwrite a little-endian word with a boundary value.
                let w: u32 =
                    [0, 1, 0xFFFF, 0xFFFF_FFFF, 0x8000_0000, 4096, 1 << 20][rng.below(7) as usize];
                for (i, b) in w.to_le_bytes().iter().enumerate() {
                    if at + i < v.len() {
                        v[at + i] = *b;
                    }
                }
            }
            _ => {
                // Duplicate a slice (repeated PDUs, repeated CIDs).
                let n = (rng.below(96) as usize).min(v.len() - at);
                let dup = v[at..at + n].to_vec();
                let to = rng.below(v.len() as u64 + 1) as usize;
                v.splice(to..to, dup);
            }
        }
    }
    v
}

/// A structure-aware mutation: changes a few bytes inside one PDU's header
/// (the SQE of a command, the fields of H2CData) and fixes its header
/// digest, so the mutated command gets past framing into dispatch.
pub fn mutate_field(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut pdus = Vec::new();
    let mut b = input;
    while let Ok(raw) = read_pdu(&mut b, u32::MAX) {
        pdus.push(raw.bytes);
    }
    if pdus.len() < 2 {
        return mutate(rng, input);
    }
    let i = 1 + rng.below(pdus.len() as u64 - 1) as usize;
    let p = &mut pdus[i];
    let hlen = p[2] as usize;
    if hlen > CH_LEN && hlen <= p.len() {
        for _ in 0..1 + rng.below(3) {
            let at = CH_LEN + rng.below((hlen - CH_LEN) as u64) as usize;
            p[at] = match rng.below(4) {
                0 => p[at] ^ (1 << rng.below(8)),
                1 => [0u8, 0xFF, 0x01, 0x80][rng.below(4) as usize],
                2 => p[at].wrapping_add(1),
                _ => rng.next_u64() as u8,
            };
        }
        if p[1] & FLAG_HDGSTF != 0 && p.len() >= hlen + DIGEST_LEN {
            let c = crc(&p[..hlen]);
            put_u32(p, hlen, c);
        }
    }
    pdus.concat()
}

#[derive(Debug, Default)]
pub struct FuzzStats {
    pub runs: u64,
    pub closed: u64,
    pub terminated: u64,
    pub completions: u64,
    pub errors: u64,
}

/// Runs `iterations` mutated sessions (admin and I/O seeds, with and
/// without digests) against `vol`. Panics propagate to the caller.
pub fn run(
    vol: Arc<dyn Volume>,
    cfg: NvmeConfig,
    iterations: u64,
    seed: u64,
) -> io::Result<FuzzStats> {
    let subnqn = cfg.subnqn.clone();
    let h = Harness::new(vol.clone(), cfg)?;
    let bs = vol.geometry().block_size;
    let mut seeds = Vec::new();
    for dg in [
        Digests::default(),
        Digests {
            header: true,
            data: true,
        },
    ] {
        // A controller for the I/O sessions to join, kept alive.
        let out = h.session(&admin_seed(&subnqn, dg), false);
        let cntlid = out.cqes().first().map(|c| c.dw0 as u16).unwrap_or(1);
        seeds.push(admin_seed(&subnqn, dg));
        seeds.push(io_seed(&subnqn, cntlid, dg, bs));
        seeds.push(discovery_seed(dg));
    }
    let mut rng = Rng::new(seed);
    let mut st = FuzzStats::default();
    for _ in 0..iterations {
        let s = &seeds[rng.below(seeds.len() as u64) as usize];
        let input = if rng.below(2) == 0 {
            mutate(&mut rng, s)
        } else {
            mutate_field(&mut rng, s)
        };
        let out = h.session(&input, true);
        st.runs += 1;
        assert_eq!(
            out.unframed_bytes, 0,
            "target output does not frame as PDUs"
        );
        st.closed += out.closed as u64;
        st.terminated += out.term().is_some() as u64;
        for c in out.cqes() {
            st.completions += 1;
            st.errors += !c.status.is_success() as u64;
        }
    }
    Ok(st)
}
