//! Login, negotiation, I/O, discovery, digests, CHAP and ALUA through the
//! test initiator.

mod common;

use common::*;
use iscsi_target::{pdu, ChapConfig};
use std::sync::atomic::Ordering;
use volume::PathState;

#[test]
fn login_io_and_logout() {
    let (t, vol) = target(|_| {});
    let mut i = Initiator::connect(t.local_addr());
    let keys = i.login(&[]);
    assert!(keys.iter().any(|(k, _)| k == "MaxRecvDataSegmentLength"));
    assert_eq!(i.tur().status, 0);
    let data: Vec<u8> = (0..4096u32).map(|x| (x * 7) as u8).collect();
    assert_eq!(i.write10(8, &data).status, 0);
    let r = i.read10(8, 8);
    assert_eq!(r.status, 0);
    assert_eq!(r.data, data);
    // Large write: immediate data plus R2T sequences.
    let big: Vec<u8> = (0..600_000u32).map(|x| (x % 251) as u8).collect();
    let big = &big[..big.len() / 512 * 512];
    assert_eq!(i.write10(100, big).status, 0);
    let r = i.read10(100, (big.len() / 512) as u16);
    assert_eq!(r.data, big);
    assert_eq!(vol.writes.load(Ordering::Relaxed), 2);
    let p = i.nop();
    assert_eq!(p.opcode(), pdu::OP_NOP_IN);
    assert_eq!(p.data, b"ping");
    let p = i.logout();
    assert_eq!(p.opcode(), pdu::OP_LOGOUT_RESP);
    assert_eq!(p.bhs[2], 0);
    t.shutdown();
}

#[test]
fn digests_and_unsolicited_data() {
    let (t, _vol) = target(|_| {});
    let mut i = Initiator::connect(t.local_addr());
    i.login(&[
        ("HeaderDigest", "CRC32C,None"),
        ("DataDigest", "CRC32C"),
        ("InitialR2T", "No"),
    ]);
    assert!(i.hd && i.dd && !i.initial_r2t);
    let data = vec![0x5au8; 16384];
    assert_eq!(i.write10(0, &data).status, 0);
    assert_eq!(i.read10(0, 32).data, data);
    t.shutdown();
}

#[test]
fn residual_on_short_read_allocation() {
    let (t, _vol) = target(|_| {});
    let mut i = Initiator::connect(t.local_addr());
    i.login(&[]);
    // READ10 of one block with EDTL of two blocks: underflow of 512.
    let mut cdb = [0u8; 10];
    cdb[0] = 0x28;
    cdb[8] = 1;
    let r = i.scsi(&cdb, &[], 1024);
    assert_eq!(r.status, 0);
    assert_eq!(r.flags & 0x02, 0x02);
    assert_eq!(r.residual, 512);
    t.shutdown();
}

#[test]
fn report_supported_opcodes_options() {
    let (t, _vol) = target(|_| {});
    let mut i = Initiator::connect(t.local_addr());
    i.login(&[]);
    let mut cdb = [0u8; 12];
    cdb[0] = 0xa3;
    cdb[1] = 0x0c;
    cdb[2] = 2;
    cdb[3] = 0x00;
    cdb[9] = 0xff;
    let r = i.scsi(&cdb, &[], 255);
    assert_eq!(r.status, 2);
    assert_eq!(r.key_asc(), (5, 0x24, 0));
    cdb[2] = 1;
    let r = i.scsi(&cdb, &[], 255);
    assert_eq!(r.status, 0);
    assert_eq!(r.data[4], 0);
    t.shutdown();
}

#[test]
fn discovery_lists_own_and_peer_portals() {
    let (t, vol) = target(|c| c.peer_portals = vec!["127.0.0.1:3261".parse().unwrap()]);
    // The peer's portal is listed while this node is the standby
    // (tests/hosts.rs: the primary lists its own only).
    vol.path.set(PathState::Inaccessible);
    let mut i = Initiator::connect(t.local_addr());
    let k = kv(&[
        ("InitiatorName", INITIATOR),
        ("SessionType", "Discovery"),
        ("AuthMethod", "None"),
    ]);
    let (st, _, _) = i.login_step(0, 1, true, &k);
    assert_eq!(st, 0);
    let (st, _, _) = i.login_step(1, 3, true, &kv(&[("HeaderDigest", "None")]));
    assert_eq!(st, 0);
    let mut p = pdu::Pdu::new(pdu::OP_TEXT_REQ);
    p.bhs[0] |= 0x40;
    p.bhs[1] = 0x80;
    p.set_u32(16, 99);
    p.set_u32(20, pdu::RSVD_TAG);
    p.set_u32(24, i.cmd_sn);
    p.data = pdu::encode_text(&kv(&[("SendTargets", "All")]));
    i.send(&mut p);
    let r = i.recv().unwrap();
    assert_eq!(r.opcode(), pdu::OP_TEXT_RESP);
    let keys = pdu::parse_text(&r.data).unwrap();
    assert!(keys.contains(&("TargetName".into(), IQN.into())));
    let addrs: Vec<_> = keys
        .iter()
        .filter(|(k, _)| k == "TargetAddress")
        .map(|(_, v)| v.clone())
        .collect();
    assert_eq!(addrs.len(), 2);
    assert!(addrs.contains(&format!("{},1", t.local_addr())));
    assert!(addrs.contains(&"127.0.0.1:3261,2".to_string()));
    // SCSI commands are refused in a discovery session.
    let mut c = i.cmd_pdu(&[0u8; 6], 0, false, false);
    i.send(&mut c);
    assert_eq!(i.recv().unwrap().opcode(), pdu::OP_REJECT);
    t.shutdown();
}

/// The target's CHAP response and the tests' own MD5 against values computed
/// outside this code: RFC 1321's test suite (appendix A.5) and RFC 1994
/// responses from python3's hashlib, e.g.
/// python3 -c "import hashlib; print(hashlib.md5(bytes([1]) +
///   b'initiator-secret-1' + bytes(range(16))).hexdigest())"
#[test]
fn chap_responses_match_independently_computed_vectors() {
    let hex = |b: [u8; 16]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    for (msg, want) in [
        ("", "d41d8cd98f00b204e9800998ecf8427e"),
        ("a", "0cc175b9c0f1b6a831c399e269772661"),
        ("abc", "900150983cd24fb0d6963f7d28e17f72"),
        ("message digest", "f96b697d7cb7938d525a2f31aaf161d0"),
        (
            "abcdefghijklmnopqrstuvwxyz",
            "c3fcd3d76192e4007dfb496cca67e13b",
        ),
        (
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
            "d174ab98d277d9f5a5611c2c9f419d9f",
        ),
        (
            "12345678901234567890123456789012345678901234567890123456789012345678901234567890",
            "57edf4a22be3c955ac49da2e2107b67a",
        ),
    ] {
        assert_eq!(hex(md5(msg.as_bytes())), want, "MD5({msg:?})");
    }
    let ch16: Vec<u8> = (0..16).collect();
    let ch64: Vec<u8> = (192..=255).rev().collect();
    let x100 = [b'x'; 100];
    for (id, secret, challenge, want) in [
        (
            7u8,
            &b"target-secret-22"[..],
            &[9u8; 16][..],
            "096dc84d580500af2ba52e9f31db0a93",
        ),
        (
            1,
            b"initiator-secret-1",
            &ch16,
            "f8a876be858b70fd6d198f4ed5b966b3",
        ),
        (0xff, &x100, &ch64, "eb8ac36bf4b564a0f5262425d72d2d87"),
    ] {
        assert_eq!(
            hex(iscsi_target::login::chap_response(id, secret, challenge)),
            want,
            "the target's chap_response({id}, ..)"
        );
        assert_eq!(
            hex(chap_md5(id, secret, challenge)),
            want,
            "chap_md5({id}, ..)"
        );
    }
}

#[test]
fn chap_and_mutual_chap() {
    let chap = ChapConfig {
        user: "host1".into(),
        secret: "initiator-secret-1".into(),
        mutual: Some(("tgt".into(), "target-secret-22".into())),
    };
    let (t, _vol) = target(|c| c.chap = Some(chap.clone()));
    // Correct secrets, mutual challenge: the target answers with its own.
    let mut i = Initiator::connect(t.local_addr());
    let ch = [9u8; 16];
    let (st, keys) = chap_login(
        &mut i,
        "host1",
        "initiator-secret-1",
        Mutual::Challenge(ch.to_vec()),
    );
    assert_eq!(st, 0);
    // MD5(0x07 || "target-secret-22" || 16 x 0x09), computed independently:
    // python3 -c "import hashlib; print(hashlib.md5(bytes([7]) +
    //   b'target-secret-22' + bytes([9] * 16)).hexdigest())"
    let got = &keys.iter().find(|(k, _)| k == "CHAP_R").unwrap().1;
    assert_eq!(got, "0x096dc84d580500af2ba52e9f31db0a93");
    // Wrong secret: authentication failure.
    let mut i = Initiator::connect(t.local_addr());
    let (st, _) = chap_login(
        &mut i,
        "host1",
        "wrong-secret-xxxx",
        Mutual::Challenge(ch.to_vec()),
    );
    assert_eq!(st, 0x0201);
    assert!(i.closed());
    // None is refused when CHAP is configured.
    let mut i = Initiator::connect(t.local_addr());
    let k = kv(&[
        ("InitiatorName", INITIATOR),
        ("TargetName", IQN),
        ("AuthMethod", "None"),
    ]);
    let (st, _, _) = i.login_step(0, 1, true, &k);
    assert_eq!(st, 0x0201);
    t.shutdown();
}

#[test]
fn alua_standby_and_unit_attention() {
    let (t, vol) = target(|_| {});
    let mut i = Initiator::connect(t.local_addr());
    i.login(&[]);
    assert_eq!(i.tur().status, 0);
    vol.path.set(PathState::Inaccessible);
    let r = i.tur();
    assert_eq!(
        r.key_asc(),
        (6, 0x2a, 0x06),
        "unit attention after the state change"
    );
    let r = i.read10(0, 1);
    assert_eq!(r.key_asc(), (2, 0x04, 0x0b), "standby");
    assert_eq!(
        i.tur().key_asc(),
        (2, 0x04, 0x0b),
        "TEST UNIT READY reports standby"
    );
    let mut inq = [0u8; 6];
    inq[0] = 0x12;
    inq[4] = 96;
    assert_eq!(
        i.scsi(&inq, &[], 96).status,
        0,
        "INQUIRY is served in standby"
    );
    let before = vol.writes.load(Ordering::Relaxed);
    let r = i.write10(0, &[1u8; 512]);
    assert_eq!(r.key_asc(), (2, 0x04, 0x0b));
    assert_eq!(vol.writes.load(Ordering::Relaxed), before);
    // REPORT TARGET PORT GROUPS: our group (1) standby, the peer's (2) optimized.
    let mut cdb = [0u8; 12];
    cdb[0] = 0xa3;
    cdb[1] = 0x0a;
    cdb[9] = 0xff;
    let r = i.scsi(&cdb, &[], 255);
    assert_eq!(r.status, 0);
    assert_eq!(&r.data[4..8], &[0x02, 0x05, 0, 1]);
    assert_eq!(&r.data[16..20], &[0x80, 0x05, 0, 2]);
    vol.path.set(PathState::Optimized);
    assert_eq!(i.tur().key_asc(), (6, 0x2a, 0x06));
    assert_eq!(i.read10(0, 1).status, 0);
    t.shutdown();
}

/// A MemVolume whose requests wait until the test releases them, so that
/// "before the write completed" is a state the test holds, not a race.
struct Parked {
    inner: volume::MemVolume,
    held: std::sync::Mutex<Vec<(volume::VolumeOp, volume::Completion)>>,
}

impl Parked {
    fn held(&self) -> usize {
        self.held.lock().unwrap().len()
    }
    fn release(&self) {
        let held: Vec<_> = self.held.lock().unwrap().drain(..).collect();
        for (op, done) in held {
            volume::Volume::submit(&self.inner, op, done);
        }
    }
}

impl volume::Volume for Parked {
    fn geometry(&self) -> volume::Geometry {
        self.inner.geometry()
    }
    fn identity(&self) -> volume::VolumeIdentity {
        self.inner.identity()
    }
    fn path_state(&self) -> PathState {
        self.inner.path_state()
    }
    fn path_epoch(&self) -> u64 {
        self.inner.path_epoch()
    }
    fn max_io_bytes(&self) -> u32 {
        self.inner.max_io_bytes()
    }
    fn submit(&self, op: volume::VolumeOp, done: volume::Completion) {
        self.held.lock().unwrap().push((op, done));
    }
}

/// Solicited Data-Out is bounded per session (64 MiB): of three 32 MiB
/// writes, the first two get their R2Ts in arrival order, and the third gets
/// its first R2T only after one of the first two completed on the volume:
/// not when its Data-Out is in, not while the volume holds it.
#[test]
fn write_budget_defers_r2ts() {
    let vol = std::sync::Arc::new(Parked {
        inner: volume::MemVolume::new(512, 8192),
        held: std::sync::Mutex::new(Vec::new()),
    });
    let t = iscsi_target::start(
        iscsi_target::IscsiConfig::new("127.0.0.1:0".parse().unwrap(), IQN),
        vol.clone(),
    )
    .unwrap();
    let mut i = Initiator::connect(t.local_addr());
    i.login(&[("MaxBurstLength", "1048576")]);
    let big = 32u32 << 20;
    let mut itts = Vec::new();
    for _ in 0..3 {
        let mut cdb = [0u8; 10];
        cdb[0] = 0x2a;
        cdb[7..9].copy_from_slice(&1u16.to_be_bytes());
        let mut p = i.cmd_pdu(&cdb, big, false, true);
        itts.push(p.itt());
        i.send(&mut p);
    }
    let is_third_r2t = |p: &pdu::Pdu| p.opcode() == pdu::OP_R2T && p.itt() == itts[2];
    let a = i.recv().expect("R2T");
    let b = i.recv().expect("R2T");
    assert_eq!(
        (a.opcode(), a.itt(), b.opcode(), b.itt()),
        (pdu::OP_R2T, itts[0], pdu::OP_R2T, itts[1]),
        "the first two writes get R2Ts, in arrival order"
    );
    // Answer every R2T of the first write (one outstanding at a time), never
    // the second's: the third must not get an R2T meanwhile.
    let data: Vec<u8> = (0..big as usize).map(|x| (x % 251) as u8 + 1).collect();
    let mut r2t = a;
    loop {
        let (off, len) = (r2t.u32_at(40) as usize, r2t.u32_at(44) as usize);
        let mut at = off;
        let mut sn = 0;
        while at < off + len {
            let n = (off + len - at).min(65536);
            let mut d = pdu::Pdu::new(pdu::OP_DATA_OUT);
            d.bhs[1] = if at + n == off + len { 0x80 } else { 0 };
            d.set_u32(16, itts[0]);
            d.set_u32(20, r2t.u32_at(20));
            d.set_u32(36, sn);
            d.set_u32(40, at as u32);
            d.data = data[at..at + n].to_vec();
            i.send(&mut d);
            at += n;
            sn += 1;
        }
        if off + len == big as usize {
            break;
        }
        r2t = i.recv().expect("R2T");
        assert!(
            !is_third_r2t(&r2t),
            "third write's R2T while the first's data was still coming"
        );
        assert_eq!((r2t.opcode(), r2t.itt()), (pdu::OP_R2T, itts[0]));
    }
    // The first write's data is in and it reached the volume, which holds it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while vol.held() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the first write never reached the volume"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // Everything the target queued before it read this NOP-Out arrives
    // before the NOP-In: no R2T for the third write may be among it.
    let p = i.nop();
    assert!(
        !is_third_r2t(&p),
        "third write's R2T before the first write completed on the volume"
    );
    assert_eq!(
        p.opcode(),
        pdu::OP_NOP_IN,
        "unexpected PDU for itt {:#x}",
        p.itt()
    );
    assert_eq!(vol.held(), 1, "only the first write reached the volume");
    // The first write completes: the third gets its R2T and the first its
    // response (in either order).
    vol.release();
    let (mut third_r2t, mut first_done) = (false, false);
    while !(third_r2t && first_done) {
        let p = i.recv().expect("PDU");
        if is_third_r2t(&p) {
            third_r2t = true;
        } else if p.opcode() == pdu::OP_SCSI_RESP && p.itt() == itts[0] {
            assert_eq!((p.bhs[2], p.bhs[3]), (0, 0), "completed, GOOD");
            first_done = true;
        } else {
            panic!("unexpected PDU {:#x} for itt {:#x}", p.opcode(), p.itt());
        }
    }
    assert_eq!(vol.inner.writes.load(Ordering::SeqCst), 1);
    t.shutdown();
}

/// Two nodes export the same target and LU identity; their port groups
/// report complementary ALUA states.
#[test]
fn both_nodes_share_identity_with_complementary_port_groups() {
    use std::sync::Arc;
    use volume::{MemVolume, VolumeIdentity};
    let ident = |node: u16| VolumeIdentity {
        uuid: *b"0123456789abcdef",
        serial: "DM0001".into(),
        model: "deltamirror".into(),
        node_index: node,
    };
    let primary = Arc::new(MemVolume::new(512, 2048).with_identity(ident(1)));
    let backup = Arc::new(MemVolume::new(512, 2048).with_identity(ident(2)));
    backup.path.set(PathState::Inaccessible);
    let cfg = |p: u16| {
        let mut c = iscsi_target::IscsiConfig::new("127.0.0.1:0".parse().unwrap(), IQN);
        c.portal_group_tag = p;
        c
    };
    let t1 = iscsi_target::start(cfg(1), primary.clone()).unwrap();
    let t2 = iscsi_target::start(cfg(2), backup.clone()).unwrap();
    let mut views = Vec::new();
    for t in [&t1, &t2] {
        let mut i = Initiator::connect(t.local_addr());
        i.login(&[]);
        let r = i.scsi(&[0x12, 1, 0x83, 0, 255, 0], &[], 255);
        assert_eq!(r.status, 0);
        let naa = r.data[8..24].to_vec();
        let mut cdb = [0u8; 12];
        cdb[0] = 0xa3;
        cdb[1] = 0x0a;
        cdb[9] = 0xff;
        let g = i.scsi(&cdb, &[], 255).data;
        // (group id, state) for both descriptors
        let groups = vec![(g[7], g[4] & 0x0f), (g[19], g[16] & 0x0f)];
        views.push((naa, groups));
    }
    assert_eq!(views[0].0, views[1].0, "same NAA designator on both nodes");
    assert_eq!(views[0].1, vec![(1, 0), (2, 2)]);
    assert_eq!(
        views[1].1,
        vec![(1, 0), (2, 2)],
        "both nodes agree: node 1 optimized, node 2 standby"
    );
    t1.shutdown();
    t2.shutdown();
}

/// libiscsi asks to transit already in its first security PDU; the target
/// must hold the transit (T=0) until CHAP completes instead of failing.
#[test]
fn chap_when_the_initiator_requests_transit_early() {
    let chap = ChapConfig {
        user: "host1".into(),
        secret: "initiator-secret-1".into(),
        mutual: None,
    };
    let (t, _vol) = target(|c| c.chap = Some(chap.clone()));
    let mut i = Initiator::connect(t.local_addr());
    let k = kv(&[
        ("InitiatorName", INITIATOR),
        ("TargetName", IQN),
        ("SessionType", "Normal"),
        ("AuthMethod", "CHAP,None"),
    ]);
    let (st, keys, granted) = i.login_step(0, 1, true, &k);
    assert_eq!((st, granted), (0, false));
    assert!(keys.contains(&("AuthMethod".into(), "CHAP".into())));
    let (st, keys, _) = i.login_step(0, 1, false, &kv(&[("CHAP_A", "5")]));
    assert_eq!(st, 0);
    let get = |k: &str| keys.iter().find(|(a, _)| a == k).unwrap().1.clone();
    let id: u8 = get("CHAP_I").parse().unwrap();
    let c = get("CHAP_C");
    let c: Vec<u8> = (2..c.len())
        .step_by(2)
        .map(|x| u8::from_str_radix(&c[x..x + 2], 16).unwrap())
        .collect();
    let r = chap_md5(id, b"initiator-secret-1", &c);
    let (st, _, granted) = i.login_step(
        0,
        1,
        true,
        &[
            ("CHAP_N".into(), "host1".into()),
            ("CHAP_R".into(), hex(&r).to_uppercase().replace("0X", "0x")),
        ],
    );
    assert_eq!((st, granted), (0, true));
    let (st, _, granted) = i.login_step(1, 3, true, &kv(&[("HeaderDigest", "None")]));
    assert_eq!((st, granted), (0, true));
    assert_eq!(i.tur().status, 0);
    t.shutdown();
}
