//! A small blocking iSCSI initiator for tests: enough of RFC 7143 to log in
//! (None or CHAP), negotiate, run SCSI commands with immediate data and R2T,
//! and to send deliberately malformed PDUs.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use iscsi_target::pdu::{self, ParseLimits, Pdu};
use iscsi_target::{IscsiConfig, IscsiTarget};
use volume::MemVolume;

pub const IQN: &str = "iqn.2026-01.io.deltamirror:test";
pub const INITIATOR: &str = "iqn.2026-01.io.deltamirror:initiator";

pub fn target(cfg_edit: impl FnOnce(&mut IscsiConfig)) -> (IscsiTarget, Arc<MemVolume>) {
    let vol = Arc::new(MemVolume::new(512, 8192));
    let mut cfg = IscsiConfig::new("127.0.0.1:0".parse().unwrap(), IQN);
    cfg_edit(&mut cfg);
    let t = iscsi_target::start(cfg, vol.clone()).expect("start target");
    (t, vol)
}

pub struct Initiator {
    pub s: TcpStream,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub max_cmd_sn: u32,
    pub itt: u32,
    pub hd: bool,
    pub dd: bool,
    pub isid: [u8; 6],
    pub max_burst: u32,
    pub first_burst: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
}

#[derive(Debug)]
pub struct ScsiReply {
    pub status: u8,
    pub sense: Vec<u8>,
    pub data: Vec<u8>,
    pub residual: u32,
    pub flags: u8,
}

impl ScsiReply {
    pub fn key_asc(&self) -> (u8, u8, u8) {
        if self.sense.len() >= 14 {
            (self.sense[2] & 0xf, self.sense[12], self.sense[13])
        } else {
            (0, 0, 0)
        }
    }
}

pub fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Initiator {
    pub fn connect(addr: SocketAddr) -> Initiator {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.set_nodelay(true).unwrap();
        Initiator {
            s,
            cmd_sn: 1,
            exp_stat_sn: 0,
            max_cmd_sn: 1,
            itt: 1,
            hd: false,
            dd: false,
            isid: [0x80, 0, 0, 0, 0, 1],
            max_burst: 262144,
            first_burst: 65536,
            immediate_data: true,
            initial_r2t: true,
        }
    }

    pub fn send(&mut self, p: &mut Pdu) {
        let b = p.encode(self.hd, self.dd);
        self.s.write_all(&b).unwrap();
    }

    pub fn send_raw(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.s.write_all(b)
    }

    /// Next PDU, or None on EOF / timeout.
    pub fn recv(&mut self) -> Option<Pdu> {
        let lim = ParseLimits {
            header_digest: self.hd,
            data_digest: self.dd,
            max_data_segment_bytes: 16 << 20,
        };
        let mut buf = vec![0u8; pdu::BHS_LEN];
        self.s.read_exact(&mut buf).ok()?;
        let n = pdu::pdu_len(&buf, &lim).ok()?;
        buf.resize(n, 0);
        self.s.read_exact(&mut buf[pdu::BHS_LEN..]).ok()?;
        let (p, _) = pdu::parse(&buf, &lim).ok()?;
        if p.opcode() != pdu::OP_LOGIN_RESP {
            self.max_cmd_sn = p.u32_at(32);
        }
        Some(p)
    }

    /// Whether the target closed the connection (EOF, not a timeout).
    pub fn closed(&mut self) -> bool {
        self.s
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let mut b = [0u8; 1];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }

    pub fn login_pdu(&mut self, csg: u8, nsg: u8, transit: bool, keys: &[(String, String)]) -> Pdu {
        let mut p = Pdu::new(pdu::OP_LOGIN_REQ);
        p.bhs[0] |= 0x40;
        p.bhs[1] = (csg << 2) | if transit { 0x80 | nsg } else { 0 };
        p.bhs[8..14].copy_from_slice(&self.isid);
        p.set_u32(16, self.itt);
        p.set_u32(24, self.cmd_sn);
        p.set_u32(28, self.exp_stat_sn);
        p.data = pdu::encode_text(keys);
        p
    }

    /// One login exchange: returns (status, response keys, transit granted).
    pub fn login_step(
        &mut self,
        csg: u8,
        nsg: u8,
        transit: bool,
        keys: &[(String, String)],
    ) -> (u16, Vec<(String, String)>, bool) {
        let mut p = self.login_pdu(csg, nsg, transit, keys);
        self.send(&mut p);
        let r = self.recv().expect("login response");
        assert_eq!(r.opcode(), pdu::OP_LOGIN_RESP);
        self.exp_stat_sn = r.u32_at(24).wrapping_add(1);
        let status = u16::from_be_bytes([r.bhs[36], r.bhs[37]]);
        let keys = pdu::parse_text(&r.data).unwrap();
        (status, keys, r.bhs[1] & 0x80 != 0)
    }

    /// Login with AuthMethod=None and the given operational keys.
    pub fn login(&mut self, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let k = kv(&[
            ("InitiatorName", INITIATOR),
            ("TargetName", IQN),
            ("SessionType", "Normal"),
            ("AuthMethod", "None"),
        ]);
        let (st, _, t) = self.login_step(0, 1, true, &k);
        assert_eq!(st, 0, "security stage");
        assert!(t);
        let mut ops = kv(&[
            ("HeaderDigest", "None"),
            ("DataDigest", "None"),
            ("MaxRecvDataSegmentLength", "262144"),
            ("ImmediateData", "Yes"),
            ("InitialR2T", "Yes"),
            ("MaxBurstLength", "262144"),
            ("FirstBurstLength", "65536"),
            ("ErrorRecoveryLevel", "0"),
        ]);
        for (k, v) in extra {
            ops.retain(|(a, _)| a != k);
            ops.push((k.to_string(), v.to_string()));
        }
        let (st, keys, t) = self.login_step(1, 3, true, &ops);
        assert_eq!(st, 0, "operational stage");
        assert!(t);
        self.apply(&keys);
        keys
    }

    pub fn apply(&mut self, keys: &[(String, String)]) {
        for (k, v) in keys {
            match k.as_str() {
                "HeaderDigest" => self.hd = v == "CRC32C",
                "DataDigest" => self.dd = v == "CRC32C",
                "MaxBurstLength" => self.max_burst = v.parse().unwrap(),
                "FirstBurstLength" => self.first_burst = v.parse().unwrap(),
                "ImmediateData" => self.immediate_data = v == "Yes",
                "InitialR2T" => self.initial_r2t = v == "Yes",
                _ => {}
            }
        }
    }

    pub fn cmd_pdu(&mut self, cdb: &[u8], edtl: u32, read: bool, write: bool) -> Pdu {
        let mut p = Pdu::new(pdu::OP_SCSI_CMD);
        p.bhs[1] = 0x80 | if read { 0x40 } else { 0 } | if write { 0x20 } else { 0 } | 1;
        self.itt += 1;
        p.set_u32(16, self.itt);
        p.set_u32(20, edtl);
        p.set_u32(24, self.cmd_sn);
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        p.set_u32(28, self.exp_stat_sn);
        p.bhs[32..32 + cdb.len()].copy_from_slice(cdb);
        p
    }

    /// Runs one SCSI command: immediate data up to FirstBurstLength, the rest
    /// on R2T.
    pub fn scsi(&mut self, cdb: &[u8], out: &[u8], read_len: u32) -> ScsiReply {
        let write = !out.is_empty();
        let edtl = if write { out.len() as u32 } else { read_len };
        let mut p = self.cmd_pdu(cdb, edtl, read_len > 0, write);
        let itt = p.itt();
        let imm = if write && self.immediate_data {
            out.len().min(self.first_burst as usize).min(8192)
        } else {
            0
        };
        p.data = out[..imm].to_vec();
        self.send(&mut p);
        self.finish(itt, out)
    }

    pub fn finish(&mut self, itt: u32, out: &[u8]) -> ScsiReply {
        let mut data = Vec::new();
        loop {
            let r = self.recv().expect("response PDU");
            match r.opcode() {
                pdu::OP_R2T => {
                    let ttt = r.u32_at(20);
                    let off = r.u32_at(40) as usize;
                    let len = r.u32_at(44) as usize;
                    let mut at = off;
                    let mut sn = 0;
                    while at < off + len {
                        let n = (off + len - at).min(8192);
                        let mut d = Pdu::new(pdu::OP_DATA_OUT);
                        d.bhs[1] = if at + n == off + len { 0x80 } else { 0 };
                        d.set_u32(16, itt);
                        d.set_u32(20, ttt);
                        d.set_u32(28, self.exp_stat_sn);
                        d.set_u32(36, sn);
                        d.set_u32(40, at as u32);
                        d.data = out[at..at + n].to_vec();
                        self.send(&mut d);
                        sn += 1;
                        at += n;
                    }
                }
                pdu::OP_DATA_IN => {
                    data.extend_from_slice(&r.data);
                    if r.bhs[1] & 0x01 != 0 {
                        self.exp_stat_sn = r.u32_at(24).wrapping_add(1);
                        return ScsiReply {
                            status: r.bhs[3],
                            sense: Vec::new(),
                            data,
                            residual: r.u32_at(44),
                            flags: r.bhs[1],
                        };
                    }
                }
                pdu::OP_SCSI_RESP => {
                    self.exp_stat_sn = r.u32_at(24).wrapping_add(1);
                    let sense = if r.data.len() >= 2 {
                        r.data[2..].to_vec()
                    } else {
                        Vec::new()
                    };
                    return ScsiReply {
                        status: r.bhs[3],
                        sense,
                        data,
                        residual: r.u32_at(44),
                        flags: r.bhs[1],
                    };
                }
                op => panic!("unexpected opcode {op:#x} while waiting for ITT {itt}"),
            }
        }
    }

    pub fn write10(&mut self, lba: u32, data: &[u8]) -> ScsiReply {
        let n = (data.len() / 512) as u16;
        let mut cdb = [0u8; 10];
        cdb[0] = 0x2a;
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[7..9].copy_from_slice(&n.to_be_bytes());
        self.scsi(&cdb, data, 0)
    }

    pub fn read10(&mut self, lba: u32, blocks: u16) -> ScsiReply {
        let mut cdb = [0u8; 10];
        cdb[0] = 0x28;
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
        self.scsi(&cdb, &[], blocks as u32 * 512)
    }

    pub fn tur(&mut self) -> ScsiReply {
        self.scsi(&[0u8; 6], &[], 0)
    }

    pub fn nop(&mut self) -> Pdu {
        let mut p = Pdu::new(pdu::OP_NOP_OUT);
        p.bhs[0] |= 0x40;
        p.bhs[1] = 0x80;
        self.itt += 1;
        p.set_u32(16, self.itt);
        p.set_u32(20, pdu::RSVD_TAG);
        p.set_u32(24, self.cmd_sn);
        p.set_u32(28, self.exp_stat_sn);
        p.data = b"ping".to_vec();
        self.send(&mut p);
        self.recv().expect("nop-in")
    }

    pub fn logout(&mut self) -> Pdu {
        let mut p = Pdu::new(pdu::OP_LOGOUT_REQ);
        p.bhs[0] |= 0x40;
        p.bhs[1] = 0x80;
        self.itt += 1;
        p.set_u32(16, self.itt);
        p.set_u32(24, self.cmd_sn);
        p.set_u32(28, self.exp_stat_sn);
        self.send(&mut p);
        self.recv().expect("logout response")
    }
}

pub enum Mutual {
    No,
    Challenge(Vec<u8>),
    /// Send the target's own challenge back (a reflection attack).
    Reflect,
    /// A CHAP_C value of this many hex digits.
    Oversized(usize),
}

pub fn hex(b: &[u8]) -> String {
    format!(
        "0x{}",
        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
    )
}

/// CHAP login up to the final security-stage response: (status, keys).
pub fn chap_login(
    i: &mut Initiator,
    user: &str,
    secret: &str,
    mutual: Mutual,
) -> (u16, Vec<(String, String)>) {
    let k = kv(&[
        ("InitiatorName", INITIATOR),
        ("TargetName", IQN),
        ("SessionType", "Normal"),
        ("AuthMethod", "CHAP,None"),
    ]);
    let (st, keys, _) = i.login_step(0, 1, false, &k);
    assert_eq!(st, 0);
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
    let r = chap_md5(id, secret.as_bytes(), &c);
    let mut resp = vec![
        ("CHAP_N".to_string(), user.to_string()),
        ("CHAP_R".to_string(), hex(&r)),
    ];
    let ch = match mutual {
        Mutual::No => None,
        Mutual::Challenge(ch) => Some(hex(&ch)),
        Mutual::Reflect => Some(hex(&c)),
        Mutual::Oversized(n) => Some(format!("0x{}", "ab".repeat(n / 2))),
    };
    if let Some(ch) = ch {
        resp.push(("CHAP_I".into(), "7".into()));
        resp.push(("CHAP_C".into(), ch));
    }
    let (st, keys, _) = i.login_step(0, 1, true, &resp);
    (st, keys)
}

/// The CHAP response of RFC 1994 section 4.1, MD5(identifier || secret ||
/// challenge), computed here with [`md5`] so that the initiator side of
/// these tests does not use the code under test.
pub fn chap_md5(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut m = vec![id];
    m.extend_from_slice(secret);
    m.extend_from_slice(challenge);
    md5(&m)
}

/// MD5 as RFC 1321 specifies it, written for the tests (the target uses the
/// md-5 crate); checked against RFC 1321's test suite in basic.rs.
pub fn md5(msg: &[u8]) -> [u8; 16] {
    const S: [u32; 64] = [
        7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 5, 9, 14, 20, 5, 9, 14, 20, 5,
        9, 14, 20, 5, 9, 14, 20, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 6, 10,
        15, 21, 6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21,
    ];
    // T[i] = floor(2^32 * |sin(i + 1)|), RFC 1321 section 3.4.
    let t: Vec<u32> = (0..64)
        .map(|i| ((i as f64 + 1.0).sin().abs() * 4294967296.0) as u32)
        .collect();
    let mut m = msg.to_vec();
    m.push(0x80);
    while m.len() % 64 != 56 {
        m.push(0);
    }
    m.extend_from_slice(&((msg.len() as u64).wrapping_mul(8)).to_le_bytes());
    let mut h: [u32; 4] = [0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476];
    for block in m.chunks(64) {
        let x: Vec<u32> = block
            .chunks(4)
            .map(|w| u32::from_le_bytes(w.try_into().unwrap()))
            .collect();
        let [mut a, mut b, mut c, mut d] = h;
        for i in 0..64 {
            let (f, g) = match i / 16 {
                0 => ((b & c) | (!b & d), i),
                1 => ((b & d) | (c & !d), (5 * i + 1) % 16),
                2 => (b ^ c ^ d, (3 * i + 5) % 16),
                _ => (c ^ (b | !d), (7 * i) % 16),
            };
            let sum = a.wrapping_add(f).wrapping_add(x[g]).wrapping_add(t[i]);
            a = d;
            d = c;
            c = b;
            b = b.wrapping_add(sum.rotate_left(S[i]));
        }
        h = [
            h[0].wrapping_add(a),
            h[1].wrapping_add(b),
            h[2].wrapping_add(c),
            h[3].wrapping_add(d),
        ];
    }
    let mut out = [0u8; 16];
    for (o, w) in out.chunks_mut(4).zip(h) {
        o.copy_from_slice(&w.to_le_bytes());
    }
    out
}
