//! Malformed and hostile input: the target rejects or closes per RFC 7143,
//! never panics, and never writes to the volume.

mod common;

use common::*;
use iscsi_target::{pdu, pdu::Pdu, ChapConfig};
use std::io::{Read, Write};
use std::sync::atomic::Ordering;
use std::time::Duration;

fn quiet(i: &mut Initiator) -> bool {
    i.s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let r = i.recv();
    i.s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    r.is_none()
}

fn write_cdb(lba: u32, blocks: u16) -> [u8; 10] {
    let mut cdb = [0u8; 10];
    cdb[0] = 0x2a;
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
    cdb
}

#[test]
fn scsi_command_before_login_closes() {
    let (t, vol) = target(|_| {});
    let mut i = Initiator::connect(t.local_addr());
    let mut p = i.cmd_pdu(&write_cdb(0, 1), 512, false, true);
    p.data = vec![1; 512];
    i.send(&mut p);
    assert!(i.closed());
    assert_eq!(vol.writes.load(Ordering::Relaxed), 0);
    // Login request that skips to full feature phase without InitiatorName.
    let mut i = Initiator::connect(t.local_addr());
    let (st, _, _) = i.login_step(1, 3, true, &kv(&[("TargetName", IQN)]));
    assert_eq!(st, 0x0207);
    assert!(i.closed());
    t.shutdown();
}

#[test]
fn unknown_opcode_and_bad_ahs_are_rejected() {
    let (t, vol) = target(|_| {});
    let mut i = Initiator::connect(t.local_addr());
    i.login(&[]);
    for op in [0x07u8, 0x0f, 0x1c, 0x3e] {
        let mut p = Pdu::new(op);
        p.bhs[0] |= 0x40;
        i.send(&mut p);
        let r = i.recv().unwrap();
        assert_eq!(r.opcode(), pdu::OP_REJECT);
        assert_eq!(r.bhs[2], pdu::REJECT_CMD_NOT_SUPPORTED);
        assert_eq!(r.data[0] & 0x3f, op);
    }
    // An AHS whose own length runs past TotalAHSLength.
    let mut p = i.cmd_pdu(&write_cdb(0, 1), 512, false, true);
    p.ahs = vec![0, 200, 1, 0];
    p.data = vec![9; 512];
    i.send(&mut p);
    let r = i.recv().unwrap();
    assert_eq!(r.opcode(), pdu::OP_REJECT);
    assert_eq!(r.bhs[2], pdu::REJECT_INVALID_PDU_FIELD);
    // A login request in full feature phase.
    let mut p = i.login_pdu(0, 1, true, &[]);
    i.send(&mut p);
    assert_eq!(i.recv().unwrap().bhs[2], pdu::REJECT_PROTOCOL_ERROR);
    // The session still works, and nothing was written.
    assert_eq!(i.tur().status, 0);
    assert_eq!(vol.writes.load(Ordering::Relaxed), 0);
    t.shutdown();
}

#[test]
fn cmd_sn_outside_window_is_ignored() {
    let (t, vol) = target(|_| {});
    let mut i = Initiator::connect(t.local_addr());
    i.login(&[]);
    assert_eq!(i.tur().status, 0);
    let good = i.cmd_sn;
    for bad in [
        i.max_cmd_sn.wrapping_add(1),
        good.wrapping_sub(1),
        good.wrapping_add(0x8000_0000),
    ] {
        i.cmd_sn = bad;
        let mut p = i.cmd_pdu(&write_cdb(0, 1), 512, false, true);
        p.data = vec![7; 512];
        i.send(&mut p);
        assert!(quiet(&mut i), "CmdSN {bad} must be ignored");
    }
    i.cmd_sn = good;
    assert_eq!(i.tur().status, 0);
    assert_eq!(vol.writes.load(Ordering::Relaxed), 0);
    t.shutdown();
}

#[test]
fn data_beyond_negotiated_bursts_is_refused() {
    let (t, vol) = target(|_| {});
    let mut i = Initiator::connect(t.local_addr());
    i.login(&[("FirstBurstLength", "4096"), ("MaxBurstLength", "8192")]);
    assert_eq!(i.first_burst, 4096);
    // Immediate data larger than FirstBurstLength.
    let mut p = i.cmd_pdu(&write_cdb(0, 16), 8192, false, true);
    p.data = vec![1; 8192];
    i.send(&mut p);
    let r = i.recv().unwrap();
    assert_eq!(r.opcode(), pdu::OP_REJECT);
    // Immediate data beyond the expected transfer length.
    let mut p = i.cmd_pdu(&write_cdb(0, 1), 512, false, true);
    p.data = vec![1; 1024];
    i.send(&mut p);
    assert_eq!(i.recv().unwrap().opcode(), pdu::OP_REJECT);
    // Solicited data beyond what the R2T asked for.
    let mut p = i.cmd_pdu(&write_cdb(0, 32), 16384, false, true);
    let itt = p.itt();
    i.send(&mut p);
    let r2t = i.recv().unwrap();
    assert_eq!(r2t.opcode(), pdu::OP_R2T);
    assert_eq!(r2t.u32_at(44), 8192, "R2T bounded by MaxBurstLength");
    let mut d = Pdu::new(pdu::OP_DATA_OUT);
    d.bhs[1] = 0x80;
    d.set_u32(16, itt);
    d.set_u32(20, r2t.u32_at(20));
    d.data = vec![3; 12288];
    i.send(&mut d);
    let r = i.recv().unwrap();
    assert_eq!(r.opcode(), pdu::OP_REJECT);
    let r = i.recv().unwrap();
    assert_eq!(r.opcode(), pdu::OP_SCSI_RESP);
    assert_eq!(r.bhs[3], 2, "the command ends in CHECK CONDITION");
    // Unsolicited Data-Out when InitialR2T=Yes (F bit clear on the command).
    let mut p = i.cmd_pdu(&write_cdb(0, 1), 512, false, true);
    p.bhs[1] &= !0x80;
    i.send(&mut p);
    assert_eq!(i.recv().unwrap().opcode(), pdu::OP_REJECT);
    assert_eq!(vol.writes.load(Ordering::Relaxed), 0);
    // A data segment above our MaxRecvDataSegmentLength: reject, close.
    let mut p = Pdu::new(pdu::OP_NOP_OUT);
    p.bhs[0] |= 0x40;
    p.set_u32(16, pdu::RSVD_TAG);
    p.bhs[5..8].copy_from_slice(&[0x7f, 0xff, 0xff]);
    let mut raw = p.bhs.to_vec();
    raw.extend(vec![0u8; 1024]);
    let _ = i.send_raw(&raw);
    assert_eq!(i.recv().unwrap().opcode(), pdu::OP_REJECT);
    assert!(i.closed());
    assert_eq!(vol.writes.load(Ordering::Relaxed), 0);
    t.shutdown();
}

#[test]
fn header_digest_error_closes_the_connection() {
    let (t, vol) = target(|_| {});
    let mut i = Initiator::connect(t.local_addr());
    i.login(&[("HeaderDigest", "CRC32C")]);
    assert!(i.hd);
    let mut p = i.cmd_pdu(&write_cdb(0, 1), 512, false, true);
    p.data = vec![1; 512];
    let mut raw = p.encode(true, false);
    raw[pdu::BHS_LEN] ^= 0xff;
    i.send_raw(&raw).unwrap();
    assert!(i.closed());
    assert_eq!(vol.writes.load(Ordering::Relaxed), 0);
    t.shutdown();
}

fn chap_target() -> (iscsi_target::IscsiTarget, std::sync::Arc<volume::MemVolume>) {
    target(|c| {
        c.chap = Some(ChapConfig {
            user: "host1".into(),
            secret: "initiator-secret-1".into(),
            mutual: Some(("tgt".into(), "target-secret-22".into())),
        })
    })
}

#[test]
fn chap_values_over_1024_bytes_fail_login() {
    let (t, vol) = chap_target();
    let mut i = Initiator::connect(t.local_addr());
    let (st, _) = chap_login(
        &mut i,
        "host1",
        "initiator-secret-1",
        Mutual::Oversized(1100),
    );
    assert_eq!(st >> 8, 2, "initiator error class");
    assert!(i.closed());
    // An oversized CHAP_R as well.
    let mut i = Initiator::connect(t.local_addr());
    let k = kv(&[
        ("InitiatorName", INITIATOR),
        ("TargetName", IQN),
        ("AuthMethod", "CHAP"),
    ]);
    i.login_step(0, 1, false, &k);
    i.login_step(0, 1, false, &kv(&[("CHAP_A", "5")]));
    let big = format!("0x{}", "0".repeat(2000));
    let (st, _, _) = i.login_step(0, 1, true, &kv(&[("CHAP_N", "host1"), ("CHAP_R", &big)]));
    assert_eq!(st >> 8, 2);
    assert!(i.closed());
    assert_eq!(vol.writes.load(Ordering::Relaxed), 0);
    t.shutdown();
}

#[test]
fn reflected_mutual_chap_challenge_fails_login() {
    let (t, _vol) = chap_target();
    let mut i = Initiator::connect(t.local_addr());
    let (st, keys) = chap_login(&mut i, "host1", "initiator-secret-1", Mutual::Reflect);
    assert_eq!(st, 0x0201);
    assert!(
        !keys.iter().any(|(k, _)| k == "CHAP_R"),
        "no response to a reflected challenge"
    );
    assert!(i.closed());
    // Without the mutual challenge while mutual CHAP is configured: refused.
    let mut i = Initiator::connect(t.local_addr());
    let (st, _) = chap_login(&mut i, "host1", "initiator-secret-1", Mutual::No);
    assert_eq!(st, 0x0201);
    t.shutdown();
}

#[test]
fn unauthenticated_session_cannot_reach_full_feature_phase() {
    let (t, vol) = chap_target();
    let mut i = Initiator::connect(t.local_addr());
    // Skip the security stage.
    let k = kv(&[("InitiatorName", INITIATOR), ("TargetName", IQN)]);
    let (st, _, _) = i.login_step(1, 3, true, &k);
    assert_eq!(st, 0x0201);
    assert!(i.closed());
    // Ask to transit before answering the challenge.
    let mut i = Initiator::connect(t.local_addr());
    let k = kv(&[
        ("InitiatorName", INITIATOR),
        ("TargetName", IQN),
        ("AuthMethod", "CHAP"),
    ]);
    i.login_step(0, 1, false, &k);
    let (st, _, granted) = i.login_step(0, 3, true, &kv(&[("CHAP_A", "5")]));
    assert!(st != 0 || !granted);
    assert_eq!(vol.writes.load(Ordering::Relaxed), 0);
    t.shutdown();
}

/// An initiator that sends pings with 256 KiB of data and never reads the
/// answers: once the target holds a bounded amount of unsent responses it
/// stops receiving, so the initiator's sends block (TCP pushes back)
/// instead of the target's memory growing; when the initiator reads again,
/// every ping is answered.
#[test]
fn an_initiator_that_never_reads_is_pushed_back() {
    const PINGS: u32 = 400; // 100 MiB of answers if nothing pushed back
    const LEN: usize = 256 * 1024;
    let (t, _vol) = target(|_| {});
    let mut i = Initiator::connect(t.local_addr());
    i.login(&[]);
    let ping = |itt: u32, cmd_sn: u32| {
        let mut p = Pdu::new(pdu::OP_NOP_OUT);
        p.bhs[0] |= 0x40;
        p.bhs[1] = 0x80;
        p.set_u32(16, itt);
        p.set_u32(20, pdu::RSVD_TAG);
        p.set_u32(24, cmd_sn);
        p.data = vec![itt as u8; LEN];
        p.encode(false, false)
    };
    i.s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut blocked = None;
    'send: for itt in 1..=PINGS {
        let bytes = ping(itt, i.cmd_sn);
        let mut at = 0;
        while at < bytes.len() {
            match i.s.write(&bytes[at..]) {
                Ok(n) => at += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    blocked = Some((itt, bytes[at..].to_vec()));
                    break 'send;
                }
                Err(e) => panic!("send: {e}"),
            }
        }
    }
    let (last, rest) =
        blocked.expect("the target took 100 MiB of pings without their answers being read");
    // Reading again: every ping sent is answered, in order, whole.
    let mut s = i.s.try_clone().unwrap();
    let r = std::thread::spawn(move || {
        let lim = pdu::ParseLimits {
            header_digest: false,
            data_digest: false,
            max_data_segment_bytes: LEN as u32,
        };
        for itt in 1..=last {
            let mut b = vec![0u8; pdu::BHS_LEN];
            s.read_exact(&mut b).unwrap();
            b.resize(pdu::pdu_len(&b, &lim).unwrap(), 0);
            s.read_exact(&mut b[pdu::BHS_LEN..]).unwrap();
            let (p, _) = pdu::parse(&b, &lim).unwrap();
            assert_eq!((p.opcode(), p.itt()), (pdu::OP_NOP_IN, itt));
            assert!(p.data.len() == LEN && p.data.iter().all(|&b| b == itt as u8));
        }
    });
    i.s.set_write_timeout(None).unwrap();
    i.s.write_all(&rest).unwrap();
    r.join().unwrap();
    t.shutdown();
}
