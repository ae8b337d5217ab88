//! Bad input: malformed PDUs, PDUs wrong for the state, out-of-range
//! lengths and offsets, digest mismatches, unknown opcodes. Each ends in
//! the spec's status or a C2HTermReq, never a panic, never a volume write.

mod common;
use common::*;
use nvme_target::fuzz::{admin_seed, Harness, Reply, SessionOutput, Stream, FUZZ_HOST};
use nvme_target::pdu::*;
use nvme_target::spec::*;
use std::sync::Arc;
use volume::MemVolume;

const BS: u32 = 512;

struct Fx {
    vol: Arc<MemVolume>,
    h: Harness,
    cntlid: u16,
}

fn fx(dg: Digests) -> Fx {
    let vol = mem(BS, 8192);
    let h = Harness::new(vol.clone(), cfg()).unwrap();
    let out = h.session(&admin_seed(NQN, dg), false);
    let cntlid = out.cqes()[0].dw0 as u16;
    Fx { vol, h, cntlid }
}

impl Fx {
    /// An I/O queue stream already connected.
    fn io(&self, dg: Digests) -> Stream {
        let mut s = Stream::new(dg);
        s.connect(1, 1, self.cntlid, NQN, FUZZ_HOST);
        s
    }
    fn run(&self, s: &Stream) -> SessionOutput {
        let w = writes(&self.vol);
        let out = self.h.session(&s.bytes, true);
        assert_eq!(
            writes(&self.vol),
            w,
            "bad input reached the volume: {out:?}"
        );
        out
    }
}

fn write_sqe(cid: u16, slba: u64, nlb: u32) -> Sqe {
    let mut s = rw_sqe(IO_WRITE, 1, slba, nlb, false);
    s.set_cid(cid);
    s
}

const PLAIN: Digests = Digests {
    header: false,
    data: false,
};
const BOTH: Digests = Digests {
    header: true,
    data: true,
};

#[test]
fn first_pdu_must_be_icreq() {
    let f = fx(PLAIN);
    let mut s = Stream::new(PLAIN);
    s.bytes.clear();
    s.connect(1, 0, 0xFFFF, NQN, FUZZ_HOST);
    let out = f.run(&s);
    assert_eq!(out.term(), Some((FES_PDU_SEQUENCE_ERROR, 0)));
    assert!(out.closed);
}

#[test]
fn icreq_with_unknown_pfv_or_bad_lengths() {
    let f = fx(PLAIN);
    let mut ic = encode_ic(
        PDU_ICREQ,
        IcParams {
            pfv: 1,
            pda: 0,
            digests: PLAIN,
            max: 0,
        },
    );
    let out = f.run(&Stream {
        bytes: ic.clone(),
        dg: PLAIN,
    });
    assert_eq!(out.term(), Some((FES_INVALID_HEADER_FIELD, 8)));
    ic[8] = 0;
    ic[2] = 100; // hlen wrong for the type
    assert_eq!(
        f.run(&Stream {
            bytes: ic.clone(),
            dg: PLAIN
        })
        .term(),
        Some((FES_INVALID_HEADER_FIELD, 2))
    );
    ic[2] = 128;
    put_u32(&mut ic, 4, 1 << 30); // plen too large
    assert_eq!(
        f.run(&Stream {
            bytes: ic.clone(),
            dg: PLAIN
        })
        .term(),
        Some((FES_INVALID_HEADER_FIELD, 4))
    );
    ic[0] = 0x0F; // unknown PDU type
    assert_eq!(
        f.run(&Stream {
            bytes: ic,
            dg: PLAIN
        })
        .term(),
        Some((FES_INVALID_HEADER_FIELD, 0))
    );
}

#[test]
fn commands_and_data_before_connect() {
    let f = fx(PLAIN);
    let mut s = Stream::new(PLAIN);
    let mut id = Sqe::new(ADM_IDENTIFY, 9);
    id.set_cdw(10, CNS_CONTROLLER as u32);
    s.cmd(id, &[], 4096);
    let out = f.run(&s);
    assert_eq!(out.status_of(9), Some(SC_CMD_SEQ_ERROR));
    assert!(!out.replies.iter().any(|r| matches!(r, Reply::C2H(..))));
    let mut s = Stream::new(PLAIN);
    s.h2c(1, 0, 0, &[0u8; 512], true);
    let out = f.run(&s);
    assert_eq!(out.term(), Some((FES_INVALID_HEADER_FIELD, 10)));
    assert!(out.closed);
}

#[test]
fn h2c_data_for_a_read_is_refused() {
    let f = fx(PLAIN);
    let mut s = f.io(PLAIN);
    let mut r = rw_sqe(IO_READ, 1, 0, 1, false);
    r.set_cid(5);
    s.cmd(r, &[], 512);
    s.h2c(5, 0, 0, &[1u8; 512], true);
    let out = f.run(&s);
    assert_eq!(out.status_of(5), Some(Status::SUCCESS));
    assert_eq!(out.term(), Some((FES_INVALID_HEADER_FIELD, 10)));
}

#[test]
fn h2c_offsets_and_lengths_out_of_range() {
    let f = fx(PLAIN);
    // Offset not where the transfer stands.
    let mut s = f.io(PLAIN);
    s.cmd(write_sqe(5, 0, 16), &[], 16 * BS);
    s.h2c(5, 0, 512, &[1u8; 512], false);
    let out = f.run(&s);
    assert!(out
        .replies
        .iter()
        .any(|r| matches!(r, Reply::R2T(x) if x.cccid == 5 && x.len == 16 * BS)));
    assert_eq!(out.term(), Some((FES_DATA_OUT_OF_RANGE, 12)));
    // More data than the R2T asked for.
    let mut s = f.io(PLAIN);
    s.cmd(write_sqe(5, 0, 2), &[], 2 * BS);
    s.h2c(5, 0, 0, &[1u8; 2048], true);
    assert_eq!(f.run(&s).term(), Some((FES_DATA_OUT_OF_RANGE, 12)));
    // Wrong command id for the transfer tag.
    let mut s = f.io(PLAIN);
    s.cmd(write_sqe(5, 0, 2), &[], 2 * BS);
    s.h2c(6, 0, 0, &[1u8; 1024], true);
    assert_eq!(f.run(&s).term(), Some((FES_INVALID_HEADER_FIELD, 8)));
    // LAST_PDU before all data arrived.
    let mut s = f.io(PLAIN);
    s.cmd(write_sqe(5, 0, 2), &[], 2 * BS);
    s.h2c(5, 0, 0, &[1u8; 512], true);
    assert_eq!(f.run(&s).term(), Some((FES_PDU_SEQUENCE_ERROR, 1)));
    // DATAL not matching the PDU's data.
    let mut s = f.io(PLAIN);
    s.cmd(write_sqe(5, 0, 2), &[], 2 * BS);
    let mut pdu = encode_xfer(
        PDU_H2C_DATA,
        FLAG_LAST_PDU,
        5,
        0,
        0,
        1024,
        &[1u8; 1024],
        PLAIN,
        4,
    );
    put_u32(&mut pdu, 16, 1000);
    s.raw(&pdu);
    assert_eq!(f.run(&s).term(), Some((FES_INVALID_HEADER_FIELD, 16)));
}

#[test]
fn command_ranges_checked_before_any_transfer() {
    let f = fx(PLAIN);
    let mut s = f.io(PLAIN);
    s.cmd(write_sqe(5, 8191, 2), &[], 2 * BS); // past the end
    s.cmd(write_sqe(6, 0, 4096), &[], 4096 * BS); // over MDTS
    s.cmd(write_sqe(7, u64::MAX, 1), &[], BS); // slba + nlb overflows
    let mut r = rw_sqe(IO_READ, 1, 8184, 16, false);
    r.set_cid(8);
    s.cmd(r, &[], 16 * BS);
    let mut wz = rw_sqe(IO_WRITE_ZEROES, 1, 8000, 200, false);
    wz.set_cid(9);
    s.cmd(wz, &[], 0);
    let out = f.run(&s);
    assert_eq!(out.status_of(5), Some(SC_LBA_OUT_OF_RANGE));
    assert_eq!(out.status_of(6), Some(SC_INVALID_FIELD));
    assert_eq!(out.status_of(7), Some(SC_LBA_OUT_OF_RANGE));
    assert_eq!(out.status_of(8), Some(SC_LBA_OUT_OF_RANGE));
    assert_eq!(out.status_of(9), Some(SC_LBA_OUT_OF_RANGE));
    assert!(!out.replies.iter().any(|r| matches!(r, Reply::R2T(_))));
    assert!(!out.closed);
}

#[test]
fn sgl_descriptors_checked() {
    let f = fx(PLAIN);
    let mut s = f.io(PLAIN);
    // Keyed data block descriptor (RDMA): not for TCP.
    let mut w = write_sqe(5, 0, 1);
    w.set_sgl(0, BS, 0x40);
    s.cmd_raw(&w, &[]);
    // In-capsule SGL longer than the data in the capsule.
    let mut w = write_sqe(6, 0, 2);
    w.set_sgl(0, 2 * BS, SGL_ICD);
    s.cmd_raw(&w, &[0u8; 512]);
    // In-capsule SGL with a non-zero offset.
    let mut w = write_sqe(7, 0, 1);
    w.set_sgl(16, BS, SGL_ICD);
    s.cmd_raw(&w, &[0u8; 512]);
    // SGL length not matching the command's length.
    let mut w = write_sqe(8, 0, 2);
    w.set_sgl(0, BS, SGL_TRANSPORT);
    s.cmd_raw(&w, &[]);
    // In-capsule data bigger than the I/O queue accepts.
    s.cmd(write_sqe(9, 0, 32), &vec![0u8; 32 * BS as usize], 0);
    // In-capsule data on a read.
    let mut r = rw_sqe(IO_READ, 1, 0, 1, false);
    r.set_cid(10);
    s.cmd(r, &[0u8; 512], 0);
    let out = f.run(&s);
    assert_eq!(out.status_of(5), Some(SC_SGL_TYPE_INVALID));
    assert_eq!(out.status_of(6), Some(SC_SGL_DATA_LEN_INVALID));
    assert_eq!(out.status_of(7), Some(SC_SGL_OFFSET_INVALID));
    assert_eq!(out.status_of(8), Some(SC_SGL_DATA_LEN_INVALID));
    assert_eq!(out.status_of(9), Some(SC_SGL_OFFSET_INVALID));
    assert_eq!(out.status_of(10), Some(SC_INVALID_FIELD));
}

#[test]
fn digest_mismatches() {
    let f = fx(BOTH);
    // Header digest: fatal.
    let mut s = f.io(BOTH);
    let mut pdu = encode_capsule_cmd(&write_sqe(5, 0, 1), &[1u8; 512], BOTH);
    pdu[CMD_HLEN] ^= 0xFF;
    s.raw(&pdu);
    assert_eq!(f.run(&s).term(), Some((FES_HEADER_DIGEST_ERROR, 0)));
    // Data digest on in-capsule data: transient transport error, no write,
    // the connection goes on.
    let mut s = f.io(BOTH);
    let mut w = write_sqe(5, 0, 1);
    w.set_sgl(0, BS, SGL_ICD);
    let mut pdu = encode_capsule_cmd(&w, &[1u8; 512], BOTH);
    let n = pdu.len();
    pdu[n - 1] ^= 1;
    s.raw(&pdu);
    let mut id = rw_sqe(IO_READ, 1, 0, 1, false);
    id.set_cid(6);
    s.cmd(id, &[], BS);
    let out = f.run(&s);
    assert_eq!(out.status_of(5), Some(SC_TRANSIENT_TRANSPORT));
    assert_eq!(out.status_of(6), Some(Status::SUCCESS));
    assert_eq!(out.term(), None);
    // Data digest on H2CData.
    let mut s = f.io(BOTH);
    s.cmd(write_sqe(5, 0, 2), &[], 2 * BS);
    let mut pdu = encode_xfer(
        PDU_H2C_DATA,
        FLAG_LAST_PDU,
        5,
        0,
        0,
        1024,
        &[3u8; 1024],
        BOTH,
        4,
    );
    let n = pdu.len();
    pdu[n - 2] ^= 1;
    s.raw(&pdu);
    assert_eq!(f.run(&s).status_of(5), Some(SC_TRANSIENT_TRANSPORT));
    // Digest flag missing although negotiated.
    let mut s = f.io(BOTH);
    s.raw(&encode_capsule_cmd(&write_sqe(5, 0, 1), &[], PLAIN));
    assert_eq!(f.run(&s).term(), Some((FES_INVALID_HEADER_FIELD, 1)));
}

#[test]
fn unknown_opcodes_and_bad_admin_fields() {
    let f = fx(PLAIN);
    let mut s = f.io(PLAIN);
    let mut x = Sqe::new(0x7E, 5);
    x.set_nsid(1);
    s.cmd(x, &[], 0);
    let mut x = Sqe::new(IO_WRITE, 6);
    x.set_nsid(7); // no such namespace
    x.set_cdw(12, 0);
    s.cmd(x, &[], BS);
    let out = f.run(&s);
    assert_eq!(out.status_of(5), Some(SC_INVALID_OPCODE));
    assert_eq!(out.status_of(6), Some(SC_INVALID_NS));

    let mut s = Stream::new(PLAIN);
    s.connect(1, 0, 0xFFFF, NQN, FUZZ_HOST).enable(2);
    s.cmd(Sqe::new(0xC5, 3), &[], 0);
    let mut gl = Sqe::new(ADM_GET_LOG_PAGE, 4);
    gl.set_cdw(10, 0x55 | (127 << 16));
    s.cmd(gl, &[], 512);
    let mut id = Sqe::new(ADM_IDENTIFY, 5);
    id.set_cdw(10, 0x99);
    s.cmd(id, &[], 4096);
    let mut id = Sqe::new(ADM_IDENTIFY, 6);
    id.set_cdw(10, CNS_CONTROLLER as u32);
    s.cmd(id, &[], 100); // buffer too small
    let out = f.run(&s);
    assert_eq!(out.status_of(3), Some(SC_INVALID_OPCODE));
    assert_eq!(out.status_of(4), Some(SC_INVALID_LOG_PAGE));
    assert_eq!(out.status_of(5), Some(SC_INVALID_FIELD));
    assert_eq!(out.status_of(6), Some(SC_SGL_DATA_LEN_INVALID));
    // A CID in flight (a write waiting for its data) conflicts; an AER's
    // CID is retired instead (tests/hosts.rs).
    let mut s = f.io(PLAIN);
    s.cmd(write_sqe(7, 0, 1), &[], BS);
    s.cmd(write_sqe(7, 1, 1), &[], BS);
    assert_eq!(f.run(&s).status_of(7), Some(SC_CID_CONFLICT));
}

#[test]
fn connect_errors() {
    let f = fx(PLAIN);
    let mut s = Stream::new(PLAIN);
    s.connect(1, 0, 0xFFFF, "nqn.2026-11.io.example:other", FUZZ_HOST);
    let c = f.run(&s).cqes()[0];
    assert_eq!(
        (c.status, c.dw0),
        (SC_CONNECT_INVALID_PARAM, (1 << 16) | 256)
    );
    // I/O queue for a controller that does not exist.
    let mut s = Stream::new(PLAIN);
    s.connect(1, 1, 0x1234, NQN, FUZZ_HOST);
    let c = f.run(&s).cqes()[0];
    assert_eq!(
        (c.status, c.dw0),
        (SC_CONNECT_INVALID_PARAM, (1 << 16) | 16)
    );
    // I/O queue id beyond the queue count.
    let mut s = Stream::new(PLAIN);
    s.connect(1, 100, f.cntlid, NQN, FUZZ_HOST);
    let c = f.run(&s).cqes()[0];
    assert_eq!((c.status, c.dw0), (SC_CONNECT_INVALID_PARAM, 42));
    // Record format 1.
    let mut s = Stream::new(PLAIN);
    let mut sqe = Sqe::new(OPC_FABRICS, 1);
    sqe.0[4] = FCTYPE_CONNECT;
    put_u16(&mut sqe.0, 40, 1);
    put_u16(&mut sqe.0, 44, 31);
    let mut data = vec![0u8; 1024];
    put_u16(&mut data, 16, 0xFFFF);
    put_str0(&mut data, 256, 256, NQN);
    put_str0(&mut data, 512, 256, FUZZ_HOST);
    s.cmd(sqe, &data, 0);
    assert_eq!(f.run(&s).cqes()[0].status, SC_CONNECT_INCOMPATIBLE_FORMAT);
}

#[test]
fn bad_input_over_tcp_terminates_without_writes() {
    let vol = mem(BS, 2048);
    let t = serve(vol.clone());
    let c = nvme_host::initiator::Controller::connect(t.local_addr(), &host()).unwrap();
    c.write(0, vec![9; 512], false).unwrap();
    let w = writes(&vol);
    // H2CData nobody asked for, on the I/O queue.
    c.io[0]
        .send_raw(&encode_xfer(
            PDU_H2C_DATA,
            FLAG_LAST_PDU,
            1,
            77,
            0,
            512,
            &[1u8; 512],
            PLAIN,
            4,
        ))
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while !c.io[0].is_dead() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(c.io[0].is_dead());
    // Garbage on the admin queue ends the controller.
    c.admin.send_raw(&[0xEE; 64]).unwrap();
    while t.controller_count() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(t.controller_count(), 0);
    assert_eq!(writes(&vol), w);
    // The target still serves new hosts.
    let c2 = nvme_host::initiator::Controller::connect(t.local_addr(), &host()).unwrap();
    assert_eq!(c2.read(0, 1).unwrap(), vec![9; 512]);
    c2.disconnect();
    t.shutdown();
}

#[test]
fn seeded_fuzz_of_parser_and_dispatch() {
    let vol = mem(BS, 2048);
    // NVME_FUZZ_ITERS / NVME_FUZZ_SEED run it longer or elsewhere.
    let iters = std::env::var("NVME_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let seed = std::env::var("NVME_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0xDE17A);
    let st = nvme_target::fuzz::run(vol, cfg(), iters, seed).unwrap();
    eprintln!("fuzz: {st:?}");
    assert_eq!(st.runs, iters);
    // The mutations reach both the error paths and the command paths.
    assert!(st.terminated > iters / 40, "{st:?}");
    assert!(st.completions > iters, "{st:?}");
    assert!(st.errors > iters / 20, "{st:?}");
}

#[test]
fn wire_layouts_match_the_transport_spec() {
    let f = fx(PLAIN);
    // ICResp: 128 bytes, PFV 0, CPDA 0, digests echoed, MAXH2CDATA = MDTS.
    let ic = encode_ic(
        PDU_ICREQ,
        IcParams {
            pfv: 0,
            pda: 1,
            digests: BOTH,
            max: 0,
        },
    );
    let mut s = Stream {
        bytes: ic,
        dg: BOTH,
    };
    s.connect(1, 0, 0xFFFF, NQN, FUZZ_HOST).enable(2);
    let mut id = Sqe::new(ADM_IDENTIFY, 3);
    id.set_cdw(10, CNS_CONTROLLER as u32);
    s.cmd(id, &[], 4096);
    let out = f.h.session(&s.bytes, true);
    assert_eq!(
        out.replies[0],
        Reply::IcResp(IcParams {
            pfv: 0,
            pda: 0,
            digests: BOTH,
            max: 1 << 20
        })
    );
    // Raw bytes: run again and look at the framing of each PDU.
    let raw = raw_session(&f, &s.bytes);
    let mut b = &raw[..];
    let icresp = read_pdu(&mut b, u32::MAX).unwrap();
    assert_eq!(&icresp.bytes[..8], &[0x01, 0, 128, 0, 128, 0, 0, 0]);
    let resp = read_pdu(&mut b, u32::MAX).unwrap();
    // CapsuleResp with header digest: hlen 24, pdo 0, plen 28.
    assert_eq!(
        (
            resp.ch.pdu_type,
            resp.ch.flags,
            resp.ch.hlen,
            resp.ch.pdo,
            resp.ch.plen
        ),
        (5, 1, 24, 0, 28)
    );
    assert_eq!(get_u32(&resp.bytes, 24), crc(&resp.bytes[..24]));
    let _cc = read_pdu(&mut b, u32::MAX).unwrap();
    // C2HData with both digests and HPDA 1 (8-byte alignment): data at 32.
    let c2h = read_pdu(&mut b, u32::MAX).unwrap();
    assert_eq!(
        (c2h.ch.pdu_type, c2h.ch.flags, c2h.ch.hlen, c2h.ch.pdo),
        (7, 0x01 | 0x02 | 0x04, 24, 32)
    );
    assert_eq!(c2h.ch.plen, 32 + 4096 + 4);
    assert_eq!(get_u16(&c2h.bytes, 8), 3);
    assert_eq!(
        (get_u32(&c2h.bytes, 12), get_u32(&c2h.bytes, 16)),
        (0, 4096)
    );
    let data = &c2h.bytes[32..32 + 4096];
    assert_eq!(get_u32(&c2h.bytes, 32 + 4096), crc(data));
    // Identify Controller fields at their specified offsets.
    assert_eq!(get_u16(data, 78), get_u16(&resp.bytes, 8)); // CNTLID = Connect dword 0
    assert_eq!(get_u32(data, 80), 0x0001_0400); // VER
    assert_eq!(data[111], 1); // CNTRLTYPE I/O
    assert_eq!((data[512], data[513]), (0x66, 0x44)); // SQES, CQES
    assert_eq!(get_u32(data, 516), 1); // NN
    assert_eq!(get_u32(data, 1792), (64 + 8192) / 16); // IOCCSZ
    assert_eq!(get_str0(data, 768, 256), NQN);
}

fn raw_session(f: &Fx, input: &[u8]) -> Vec<u8> {
    f.h.session_bytes(input)
}

#[test]
fn admin_features_logs_and_events() {
    let f = fx(PLAIN);
    let mut s = Stream::new(PLAIN);
    s.connect(1, 0, 0xFFFF, NQN, FUZZ_HOST);
    // Admin commands before CC.EN: command sequence error.
    s.cmd(Sqe::new(ADM_KEEP_ALIVE, 2), &[], 0);
    s.enable(3);
    let feat = |op: u8, cid: u16, cdw10: u32, cdw11: u32| {
        let mut q = Sqe::new(op, cid);
        q.set_cdw(10, cdw10);
        q.set_cdw(11, cdw11);
        q
    };
    s.cmd(
        feat(ADM_SET_FEATURES, 4, FID_NUM_QUEUES as u32, 0x00FF_00FF),
        &[],
        0,
    );
    s.cmd(feat(ADM_GET_FEATURES, 5, FID_NUM_QUEUES as u32, 0), &[], 0);
    s.cmd(
        feat(ADM_SET_FEATURES, 6, FID_KEEP_ALIVE as u32, 5000),
        &[],
        0,
    );
    s.cmd(feat(ADM_GET_FEATURES, 7, FID_KEEP_ALIVE as u32, 0), &[], 0);
    s.cmd(
        feat(
            ADM_SET_FEATURES,
            8,
            FID_ASYNC_EVENT_CFG as u32 | (1 << 31),
            0,
        ),
        &[],
        0,
    );
    s.cmd(feat(ADM_GET_FEATURES, 9, FID_VOLATILE_WC as u32, 0), &[], 0);
    s.cmd(feat(ADM_GET_FEATURES, 10, 0x42, 0), &[], 0);
    for (cid, lid, len) in [
        (11u16, LID_ERROR, 64u32),
        (12, LID_SMART, 512),
        (13, LID_FW_SLOT, 512),
        (14, LID_CHANGED_NS, 4096),
    ] {
        s.cmd(
            feat(ADM_GET_LOG_PAGE, cid, lid as u32 | ((len / 4 - 1) << 16), 0),
            &[],
            len,
        );
    }
    // Discovery log on an I/O controller: invalid log page.
    s.cmd(
        feat(ADM_GET_LOG_PAGE, 15, LID_DISCOVERY as u32 | (255 << 16), 0),
        &[],
        1024,
    );
    for cid in 16..21 {
        s.cmd(Sqe::new(ADM_ASYNC_EVENT, cid), &[], 0);
    }
    s.cmd(feat(ADM_ABORT, 21, 16 << 16, 0), &[], 0);
    let out = f.run(&s);
    assert_eq!(out.status_of(2), Some(SC_CMD_SEQ_ERROR));
    let c = |cid| out.cqes().into_iter().find(|c| c.cid == cid).unwrap();
    // 256 queues asked, 8 granted (0's based).
    assert_eq!((c(4).status, c(4).dw0), (Status::SUCCESS, 0x0007_0007));
    assert_eq!(c(5).dw0, 0x0007_0007);
    assert_eq!(c(7).dw0, 5000);
    assert_eq!(c(8).status, SC_FEATURE_NOT_SAVEABLE);
    assert_eq!(c(9).dw0, 1);
    assert_eq!(c(10).status, SC_INVALID_FIELD);
    for cid in 11..15 {
        assert_eq!(c(cid).status, Status::SUCCESS);
    }
    assert_eq!(c(15).status, SC_INVALID_LOG_PAGE);
    // Four AERs accepted (no completion yet), the fifth over the limit.
    assert!((16..20).all(|cid| out.status_of(cid).is_none()));
    assert_eq!(c(20).status, SC_AER_LIMIT);
    assert_eq!((c(21).status, c(21).dw0 & 1), (Status::SUCCESS, 1));
    let smart = out.replies.iter().find_map(|r| match r {
        Reply::C2H(x, _, d) if x.cccid == 12 => Some(d.clone()),
        _ => None,
    });
    assert_eq!(smart.map(|d| (d.len(), d[3])), Some((512, 100)));
}

#[test]
fn success_flag_only_with_sq_flow_control_disabled() {
    let f = fx(PLAIN);
    for (cattr, want_success) in [(0u8, false), (0x04, true)] {
        let mut s = Stream::new(PLAIN);
        let mut sqe = Sqe::new(OPC_FABRICS, 1);
        sqe.0[4] = FCTYPE_CONNECT;
        put_u16(&mut sqe.0, 42, 1);
        put_u16(&mut sqe.0, 44, 31);
        sqe.0[46] = cattr;
        let mut data = vec![0u8; 1024];
        data[..16].copy_from_slice(b"fuzz-host-id-000");
        put_u16(&mut data, 16, f.cntlid);
        put_str0(&mut data, 256, 256, NQN);
        put_str0(&mut data, 512, 256, FUZZ_HOST);
        s.cmd(sqe, &data, 0);
        let mut r = rw_sqe(IO_READ, 1, 0, 1, false);
        r.set_cid(2);
        s.cmd(r, &[], BS);
        let out = f.run(&s);
        let flags = out.replies.iter().find_map(|r| match r {
            Reply::C2H(x, fl, _) if x.cccid == 2 => Some(*fl),
            _ => None,
        });
        let last_success = FLAG_LAST_PDU | if want_success { FLAG_SUCCESS } else { 0 };
        assert_eq!(flags, Some(last_success));
        assert_eq!(out.status_of(2).is_some(), !want_success);
        // SQHD is reported unless flow control is disabled (then FFFFh).
        let sqhd = out.cqes()[0].sqhd;
        assert_eq!(sqhd == 0xFFFF, want_success);
    }
}
