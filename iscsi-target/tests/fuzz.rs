//! Deterministic, seeded fuzzing of the pure PDU parser, the text parser and
//! the login state machine (~20k mutated inputs), plus a smaller run of
//! mutated PDU streams against a live target. A seed reproduces any failure:
//! `FUZZ_SEED=123 FUZZ_ITERS=100000 cargo test -p iscsi-target --test fuzz`.

mod common;

use common::*;
use iscsi_target::login::{Login, Step};
use iscsi_target::pdu::{self, ParseLimits, Pdu};
use iscsi_target::IscsiConfig;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn env_u64(k: &str, d: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn corpus() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut login = Pdu::new(pdu::OP_LOGIN_REQ);
    login.bhs[0] |= 0x40;
    login.bhs[1] = 0x81;
    login.bhs[8] = 0x80;
    login.data = pdu::encode_text(&kv(&[
        ("InitiatorName", INITIATOR),
        ("TargetName", IQN),
        ("AuthMethod", "CHAP,None"),
        ("HeaderDigest", "CRC32C,None"),
        ("MaxRecvDataSegmentLength", "65536"),
        ("CHAP_A", "5"),
        ("CHAP_N", "user"),
        ("CHAP_R", "0x00112233"),
    ]));
    let mut cmd = Pdu::new(pdu::OP_SCSI_CMD);
    cmd.bhs[1] = 0xa1;
    cmd.set_u32(16, 5);
    cmd.set_u32(20, 1024);
    cmd.bhs[32] = 0x2a;
    cmd.bhs[39] = 2;
    cmd.data = vec![0xee; 1024];
    let mut ext = cmd.clone();
    ext.ahs = vec![
        0, 17, 1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
    ];
    let mut dout = Pdu::new(pdu::OP_DATA_OUT);
    dout.bhs[1] = 0x80;
    dout.set_u32(20, 1);
    dout.data = vec![1; 700];
    let mut text = Pdu::new(pdu::OP_TEXT_REQ);
    text.bhs[1] = 0x80;
    text.data = pdu::encode_text(&kv(&[("SendTargets", "All")]));
    let mut nop = Pdu::new(pdu::OP_NOP_OUT);
    nop.data = b"hello".to_vec();
    let mut tmf = Pdu::new(pdu::OP_TMF_REQ);
    tmf.bhs[1] = 0x81;
    for p in [login, cmd, ext, dout, text, nop, tmf] {
        for (hd, dd) in [(false, false), (true, true)] {
            out.push(p.clone().encode(hd, dd));
        }
    }
    out
}

fn mutate(r: &mut Rng, base: &[u8]) -> Vec<u8> {
    let mut v = base.to_vec();
    for _ in 0..1 + r.below(4) {
        match r.below(7) {
            0 if !v.is_empty() => {
                let i = r.below(v.len());
                v[i] ^= 1 << r.below(8);
            }
            1 if !v.is_empty() => {
                let i = r.below(v.len());
                v[i] = r.next() as u8;
            }
            2 => v.truncate(r.below(v.len() + 1)),
            3 => {
                // Length fields: TotalAHSLength and DataSegmentLength.
                if v.len() >= 8 {
                    let i = 4 + r.below(4);
                    v[i] = [0, 1, 0xff, r.next() as u8][r.below(4)];
                }
            }
            4 => {
                let n = r.below(64);
                let at = r.below(v.len() + 1);
                let junk: Vec<u8> = (0..n).map(|_| r.next() as u8).collect();
                v.splice(at..at, junk);
            }
            5 if v.len() > 48 => {
                // Text-ish payload damage: NULs, '=' and non-UTF-8.
                let i = 48 + r.below(v.len() - 48);
                v[i] = [0, b'=', 0xc3, 0xff][r.below(4)];
            }
            _ => {
                if !v.is_empty() {
                    v[0] = r.next() as u8;
                }
            }
        }
    }
    v
}

#[test]
fn pure_parsers_survive_mutated_input() {
    let seed = env_u64("FUZZ_SEED", 0x1d5c_5eed);
    let iters = env_u64("FUZZ_ITERS", 20_000);
    let mut r = Rng(seed | 1);
    let corpus = corpus();
    let cfg = IscsiConfig::new("127.0.0.1:0".parse().unwrap(), IQN);
    let mut chap_cfg = cfg.clone();
    chap_cfg.chap = Some(iscsi_target::ChapConfig {
        user: "user".into(),
        secret: "0123456789abcdef".into(),
        mutual: Some(("t".into(), "fedcba9876543210".into())),
    });
    let mut login = Login::new(&cfg);
    let mut parsed = 0u64;
    for n in 0..iters {
        let base = &corpus[r.below(corpus.len())];
        let input = mutate(&mut r, base);
        for (hd, dd) in [(false, false), (true, true)] {
            let lim = ParseLimits {
                header_digest: hd,
                data_digest: dd,
                max_data_segment_bytes: 65536,
            };
            let _ = pdu::pdu_len(&input, &lim);
            if let Ok((p, used)) = pdu::parse(&input, &lim) {
                parsed += 1;
                assert!(used <= input.len());
                let _ = pdu::parse_text(&p.data);
                let _ = pdu::extended_cdb(&p.ahs);
                if n % 16 == 0 {
                    let c = if n % 32 == 0 { &chap_cfg } else { &cfg };
                    login = Login::new(c).with_random(Box::new(|b: &mut [u8]| b.fill(7)));
                }
                if p.opcode() == pdu::OP_LOGIN_REQ {
                    let (Step::Fail(resp) | Step::Continue(resp) | Step::Complete(resp)) =
                        login.handle(&p);
                    assert_eq!(resp.opcode(), pdu::OP_LOGIN_RESP);
                }
            }
        }
    }
    eprintln!("fuzz: seed {seed:#x}: {iters} inputs, {parsed} parsed as PDUs");
}

static PANICS: AtomicUsize = AtomicUsize::new(0);

#[test]
fn live_target_survives_mutated_streams() {
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        prev(info);
    }));
    let seed = env_u64("FUZZ_SEED", 0x05ee_d0f1_u64);
    let iters = env_u64("FUZZ_STREAMS", 300);
    let mut r = Rng(seed | 1);
    let (t, _vol) = target(|_| {});
    let corpus = corpus();
    for _ in 0..iters {
        let mut i = Initiator::connect(t.local_addr());
        i.s.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let logged_in = r.below(2) == 0;
        if logged_in {
            i.s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            i.login(&[]);
            i.s.set_read_timeout(Some(Duration::from_millis(20)))
                .unwrap();
        }
        let mut stream = Vec::new();
        for _ in 0..1 + r.below(6) {
            let base = &corpus[r.below(corpus.len())];
            // Keep the digest-free encodings for a digest-free session.
            let base = if base.len() > 1 {
                base.clone()
            } else {
                continue;
            };
            stream.extend(mutate(&mut r, &base));
        }
        let _ = i.s.write_all(&stream);
        let _ = i.recv();
    }
    // The target still serves new sessions.
    let mut i = Initiator::connect(t.local_addr());
    i.login(&[]);
    assert_eq!(i.tur().status, 0);
    t.shutdown();
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "a target thread panicked");
}

/// Random CDBs (known opcodes, random fields) and Data-Out buffers straight
/// into the SCSI layer: every command completes exactly once, no panic.
#[test]
fn scsi_layer_survives_random_cdbs() {
    use iscsi_target::scsi::{execute, Lun, Nexus};
    use std::sync::atomic::AtomicU64;
    use std::sync::{mpsc, Arc};
    let seed = env_u64("FUZZ_SEED", 0x5c51_cdb5);
    let iters = env_u64("FUZZ_CDBS", 20_000);
    let mut r = Rng(seed | 1);
    let vol = Arc::new(volume::MemVolume::new(512, 2048));
    let lun = Lun::new(vol.clone(), IQN.into(), 1);
    let nx = Arc::new(Nexus {
        id: 1,
        initiator: INITIATOR.into(),
        isid: [0x80, 0, 0, 0, 0, 1],
        seen_epoch: AtomicU64::new(vol.path.epoch()),
    });
    let ops = [
        0x00u8, 0x03, 0x08, 0x0a, 0x12, 0x16, 0x17, 0x1a, 0x1b, 0x1e, 0x25, 0x28, 0x2a, 0x2e, 0x2f,
        0x34, 0x35, 0x37, 0x41, 0x42, 0x5a, 0x5e, 0x5f, 0x83, 0x84, 0x88, 0x89, 0x8a, 0x8b, 0x8e,
        0x8f, 0x90, 0x91, 0x93, 0x9c, 0x9e, 0xa0, 0xa3, 0xa8, 0xaa, 0xae, 0xaf, 0xb7,
    ];
    for _ in 0..iters {
        let mut cdb: Vec<u8> = (0..16).map(|_| r.next() as u8).collect();
        cdb[0] = ops[r.below(ops.len())];
        if r.below(2) == 0 {
            // Small lengths and LBAs hit the interesting paths more often.
            for b in cdb.iter_mut().skip(2).take(8) {
                *b &= 0x01;
            }
        }
        let n = [0usize, 1, 24, 512, 1024, 4096][r.below(6)];
        let data: Vec<u8> = (0..n).map(|_| r.next() as u8).collect();
        let lun_id = if r.below(20) == 0 { 1 } else { 0 };
        let (tx, rx) = mpsc::channel();
        execute(
            &lun,
            &nx,
            lun_id,
            &cdb,
            data.into(),
            Box::new(move |res| tx.send(res.status).unwrap()),
        );
        let status = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("command completes");
        assert!(
            matches!(status, 0x00 | 0x02 | 0x18),
            "status {status:#x} for {cdb:02x?}"
        );
    }
}
