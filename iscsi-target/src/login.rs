//! Login phase (RFC 7143 §6, §11.12–11.13, §13): security negotiation (None,
//! CHAP with optional mutual CHAP) and operational parameter negotiation.
//!
//! `Login` is a pure state machine: request PDUs in, response PDUs out. The
//! connection code does the socket I/O.

use md5::{Digest, Md5};

use crate::pdu::{self, Pdu, OP_LOGIN_RESP};
use crate::{ChapConfig, IscsiConfig};

/// Longest value we accept for any key (RFC 7143 §6.1 caps most at 255; CHAP
/// binary values may be longer, we cap them at 1024 characters).
pub const MAX_CHAP_VALUE_CHARS: usize = 1024;
const MAX_VALUE_CHARS: usize = 255;
/// Cap on a login text that spans several PDUs (C bit).
const MAX_LOGIN_TEXT_BYTES: usize = 64 * 1024;

// Login status class/detail (RFC 7143 §11.13.5).
pub const ST_INITIATOR_ERROR: u16 = 0x0200;
pub const ST_AUTH_FAILED: u16 = 0x0201;
pub const ST_NOT_FOUND: u16 = 0x0203;
pub const ST_UNSUPPORTED_VERSION: u16 = 0x0205;
pub const ST_MISSING_PARAM: u16 = 0x0207;
pub const ST_NO_SESSION: u16 = 0x020a;
pub const ST_INVALID_DURING_LOGIN: u16 = 0x020b;

/// Operational parameters in force after login.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    pub header_digest: bool,
    pub data_digest: bool,
    /// The initiator's MaxRecvDataSegmentLength: our largest outgoing PDU.
    pub send_max_data_segment_bytes: u32,
    /// Our MaxRecvDataSegmentLength.
    pub recv_max_data_segment_bytes: u32,
    pub max_burst_bytes: u32,
    pub first_burst_bytes: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    pub max_outstanding_r2t: u32,
}

impl Params {
    fn defaults(cfg: &IscsiConfig) -> Params {
        Params {
            header_digest: false,
            data_digest: false,
            send_max_data_segment_bytes: 8192,
            recv_max_data_segment_bytes: cfg.max_recv_data_segment_bytes,
            max_burst_bytes: 262_144.min(cfg.max_burst_bytes),
            first_burst_bytes: 65_536.min(cfg.first_burst_bytes),
            immediate_data: true,
            initial_r2t: true,
            max_outstanding_r2t: 1,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionType {
    Normal,
    Discovery,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Auth {
    /// Nothing negotiated yet.
    Start,
    /// We answered AuthMethod=CHAP and wait for CHAP_A.
    ChapOffered,
    /// We sent CHAP_I / CHAP_C and wait for CHAP_N / CHAP_R.
    ChapChallenged {
        id: u8,
        challenge: Vec<u8>,
    },
    Done,
}

/// What the connection should do after one login request.
#[derive(Debug)]
pub enum Step {
    /// Send the response and read the next login request.
    Continue(Pdu),
    /// Send the response; the login failed; close the connection.
    Fail(Pdu),
    /// Send the response; full feature phase starts.
    Complete(Pdu),
}

/// Result of a completed login.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub params: Params,
    pub session_type: SessionType,
    pub initiator: String,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub cmd_sn: u32,
    pub stat_sn: u32,
}

/// Source of CHAP identifiers and challenges.
pub type RandomFn = Box<dyn FnMut(&mut [u8]) + Send>;

pub struct Login {
    target_iqn: String,
    chap: Option<ChapConfig>,
    portal_group_tag: u16,
    cfg_limits: (u32, u32, u32),
    stage: u8,
    first: bool,
    isid: [u8; 6],
    itt: u32,
    cmd_sn: u32,
    stat_sn: u32,
    tsih: u16,
    initiator: Option<String>,
    target_name: Option<String>,
    session_type: Option<SessionType>,
    auth: Auth,
    params: Params,
    declared_mrdsl: bool,
    responded: bool,
    pending_text: Vec<u8>,
    random: RandomFn,
}

fn random_bytes(buf: &mut [u8]) {
    use std::io::Read;
    let ok = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .is_ok();
    if !ok {
        // Fallback: time-seeded xorshift (CHAP challenges only need to be
        // unpredictable to a passive observer; /dev/urandom is the norm).
        let mut x = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9e37_79b9)
            | 1;
        for b in buf.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
}

fn hex(b: &[u8]) -> String {
    let mut s = String::from("0x");
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

/// Decodes a CHAP binary value: 0x-prefixed hex or 0b-prefixed base64.
fn decode_binary(v: &str) -> Option<Vec<u8>> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        if h.is_empty() || !h.is_ascii() {
            return None;
        }
        let h = if h.len() % 2 == 1 {
            format!("0{h}")
        } else {
            h.to_string()
        };
        return (0..h.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&h[i..i + 2], 16).ok())
            .collect();
    }
    if let Some(b) = v.strip_prefix("0b").or_else(|| v.strip_prefix("0B")) {
        return base64_decode(b);
    }
    None
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => return None,
        } as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    if out.is_empty() {
        None
    } else {
        Some(out)
    }
}

/// CHAP response (RFC 1994): MD5(id || secret || challenge).
pub fn chap_response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

fn yes(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn yn(b: bool) -> String {
    if b { "Yes" } else { "No" }.to_string()
}

fn number(v: &str) -> Option<u32> {
    if let Some(h) = v.strip_prefix("0x") {
        u32::from_str_radix(h, 16).ok()
    } else {
        v.parse().ok()
    }
}

impl Login {
    pub fn new(cfg: &IscsiConfig) -> Login {
        Login {
            target_iqn: cfg.target_iqn.clone(),
            chap: cfg.chap.clone(),
            portal_group_tag: cfg.portal_group_tag,
            cfg_limits: (
                cfg.max_recv_data_segment_bytes,
                cfg.max_burst_bytes,
                cfg.first_burst_bytes,
            ),
            stage: 0,
            first: true,
            isid: [0; 6],
            itt: 0,
            cmd_sn: 0,
            stat_sn: 0,
            tsih: 0,
            initiator: None,
            target_name: None,
            session_type: None,
            auth: Auth::Start,
            params: Params::defaults(cfg),
            declared_mrdsl: false,
            responded: false,
            pending_text: Vec::new(),
            random: Box::new(random_bytes),
        }
    }

    /// Deterministic challenges (tests and fuzzing).
    pub fn with_random(mut self, f: RandomFn) -> Login {
        self.random = f;
        self
    }

    /// The TSIH given to a new session; set by the caller before completion.
    pub fn set_tsih(&mut self, tsih: u16) {
        self.tsih = tsih;
    }

    pub fn outcome(&self) -> Outcome {
        Outcome {
            params: self.params,
            session_type: self.session_type.unwrap_or(SessionType::Normal),
            initiator: self.initiator.clone().unwrap_or_default(),
            isid: self.isid,
            tsih: self.tsih,
            cmd_sn: self.cmd_sn,
            stat_sn: self.stat_sn,
        }
    }

    fn response(
        &mut self,
        transit: bool,
        csg: u8,
        nsg: u8,
        status: u16,
        kv: &[(String, String)],
    ) -> Pdu {
        self.responded = true;
        let mut p = Pdu::new(OP_LOGIN_RESP);
        p.bhs[1] = if transit {
            0x80 | (csg << 2) | nsg
        } else {
            csg << 2
        };
        p.bhs[2] = 0; // version max
        p.bhs[3] = 0; // version active
        p.bhs[8..14].copy_from_slice(&self.isid);
        p.set_u16(
            14,
            if transit && nsg == 3 && status == 0 {
                self.tsih
            } else {
                0
            },
        );
        p.set_u32(16, self.itt);
        p.set_u32(24, self.stat_sn);
        self.stat_sn = self.stat_sn.wrapping_add(1);
        p.set_u32(28, self.cmd_sn);
        p.set_u32(32, self.cmd_sn.wrapping_add(crate::QUEUE_DEPTH - 1));
        p.set_u16(36, status);
        if status == 0 {
            p.data = pdu::encode_text(kv);
        }
        p
    }

    fn fail(&mut self, status: u16) -> Step {
        let csg = self.stage;
        Step::Fail(self.response(false, csg, 0, status, &[]))
    }

    /// Handles one Login Request PDU.
    pub fn handle(&mut self, req: &Pdu) -> Step {
        let flags = req.flags();
        let transit = flags & 0x80 != 0;
        let cont = flags & 0x40 != 0;
        let csg = (flags >> 2) & 3;
        let nsg = flags & 3;
        if self.first {
            self.first = false;
            self.isid.copy_from_slice(&req.bhs[8..14]);
            self.itt = req.itt();
            self.cmd_sn = req.u32_at(24);
            self.stat_sn = req.u32_at(28);
            let tsih = u16::from_be_bytes([req.bhs[14], req.bhs[15]]);
            if req.bhs[3] > 0 {
                // VersionMin above 0: we only speak version 0.
                return self.fail(ST_UNSUPPORTED_VERSION);
            }
            if tsih != 0 {
                // Adding a connection to an existing session (MC/S) is not
                // supported; MaxConnections is 1.
                return self.fail(ST_NO_SESSION);
            }
        } else {
            if req.bhs[8..14] != self.isid {
                return self.fail(ST_INITIATOR_ERROR);
            }
            self.itt = req.itt();
        }
        if transit && cont {
            return self.fail(ST_INITIATOR_ERROR);
        }
        if csg == 2 || csg == 3 || csg != self.stage && !(self.stage == 0 && csg == 1) {
            return self.fail(ST_INITIATOR_ERROR);
        }
        if csg == 1 && self.stage == 0 {
            // Security stage skipped: allowed only without CHAP.
            if self.chap.is_some() {
                return self.fail(ST_AUTH_FAILED);
            }
            self.auth = Auth::Done;
            self.stage = 1;
        }
        if transit && (nsg == 2 || nsg <= csg) {
            return self.fail(ST_INITIATOR_ERROR);
        }
        if self.pending_text.len() + req.data.len() > MAX_LOGIN_TEXT_BYTES {
            return self.fail(ST_INITIATOR_ERROR);
        }
        self.pending_text.extend_from_slice(&req.data);
        if cont {
            // More text follows: acknowledge with an empty response.
            return Step::Continue(self.response(false, csg, 0, 0, &[]));
        }
        let text = std::mem::take(&mut self.pending_text);
        let Ok(keys) = pdu::parse_text(&text) else {
            return self.fail(ST_INITIATOR_ERROR);
        };
        let mut out: Vec<(String, String)> = Vec::new();
        if let Err(st) = self.process_keys(csg, &keys, &mut out) {
            return self.fail(st);
        }
        if self.stage == 0 && transit && self.auth == Auth::Start {
            // Transit without any AuthMethod negotiation: only when no
            // authentication is required. A CHAP exchange in progress just
            // delays the transit (T=0 in our answer).
            if self.chap.is_some() {
                return self.fail(ST_AUTH_FAILED);
            }
            self.auth = Auth::Done;
        }
        if !self.responded && self.session_type != Some(SessionType::Discovery) {
            out.push((
                "TargetPortalGroupTag".into(),
                self.portal_group_tag.to_string(),
            ));
        }
        let mut grant = transit;
        if grant && nsg == 3 {
            if let Err(st) = self.check_leading_keys() {
                return self.fail(st);
            }
        }
        if (csg == 1 || (grant && nsg == 3)) && !self.declared_mrdsl {
            self.declared_mrdsl = true;
            out.push((
                "MaxRecvDataSegmentLength".into(),
                self.params.recv_max_data_segment_bytes.to_string(),
            ));
        }
        if self.stage == 0 && matches!(self.auth, Auth::ChapOffered | Auth::ChapChallenged { .. }) {
            // CHAP exchange in progress: we do not transit yet.
            grant = false;
        }
        let resp = self.response(grant, csg, if grant { nsg } else { 0 }, 0, &out);
        if grant {
            self.stage = nsg;
            if nsg == 3 {
                return Step::Complete(resp);
            }
        }
        Step::Continue(resp)
    }

    fn check_leading_keys(&self) -> Result<(), u16> {
        if self.initiator.is_none() {
            return Err(ST_MISSING_PARAM);
        }
        match self.session_type.unwrap_or(SessionType::Normal) {
            SessionType::Discovery => Ok(()),
            SessionType::Normal => match &self.target_name {
                None => Err(ST_MISSING_PARAM),
                Some(t) if *t != self.target_iqn => Err(ST_NOT_FOUND),
                Some(_) => Ok(()),
            },
        }
    }

    fn process_keys(
        &mut self,
        csg: u8,
        keys: &[(String, String)],
        out: &mut Vec<(String, String)>,
    ) -> Result<(), u16> {
        let (cfg_mrdsl, cfg_burst, cfg_first) = self.cfg_limits;
        let mut chap_n = None;
        let mut chap_r = None;
        let mut chap_i = None;
        let mut chap_c = None;
        for (k, v) in keys {
            let is_chap = k.starts_with("CHAP_");
            if v.len()
                > if is_chap {
                    MAX_CHAP_VALUE_CHARS
                } else {
                    MAX_VALUE_CHARS
                }
            {
                return Err(ST_INITIATOR_ERROR);
            }
            let k = k.as_str();
            match k {
                "InitiatorName" => {
                    if v.is_empty() {
                        return Err(ST_INITIATOR_ERROR);
                    }
                    self.initiator = Some(v.clone());
                }
                "TargetName" => self.target_name = Some(v.clone()),
                "SessionType" => {
                    self.session_type = Some(match v.as_str() {
                        "Normal" => SessionType::Normal,
                        "Discovery" => SessionType::Discovery,
                        _ => return Err(ST_INITIATOR_ERROR),
                    })
                }
                "InitiatorAlias" | "TargetAlias" => {}
                "AuthMethod" => {
                    if csg != 0 {
                        return Err(ST_INVALID_DURING_LOGIN);
                    }
                    let offered: Vec<&str> = v.split(',').collect();
                    if self.chap.is_some() {
                        if !offered.contains(&"CHAP") {
                            return Err(ST_AUTH_FAILED);
                        }
                        self.auth = Auth::ChapOffered;
                        out.push(("AuthMethod".into(), "CHAP".into()));
                    } else {
                        if !offered.contains(&"None") {
                            return Err(ST_AUTH_FAILED);
                        }
                        self.auth = Auth::Done;
                        out.push(("AuthMethod".into(), "None".into()));
                    }
                }
                "CHAP_A" => {
                    if self.auth != Auth::ChapOffered {
                        return Err(ST_INITIATOR_ERROR);
                    }
                    if !v.split(',').any(|a| a == "5") {
                        return Err(ST_AUTH_FAILED);
                    }
                    let mut idb = [0u8; 1];
                    (self.random)(&mut idb);
                    let mut challenge = vec![0u8; 16];
                    (self.random)(&mut challenge);
                    out.push(("CHAP_A".into(), "5".into()));
                    out.push(("CHAP_I".into(), idb[0].to_string()));
                    out.push(("CHAP_C".into(), hex(&challenge)));
                    self.auth = Auth::ChapChallenged {
                        id: idb[0],
                        challenge,
                    };
                }
                "CHAP_N" => chap_n = Some(v.clone()),
                "CHAP_R" => chap_r = Some(v.clone()),
                "CHAP_I" => chap_i = Some(v.clone()),
                "CHAP_C" => chap_c = Some(v.clone()),
                "HeaderDigest" | "DataDigest" => {
                    let pick = v.split(',').find(|d| *d == "CRC32C" || *d == "None");
                    let Some(pick) = pick else {
                        out.push((k.into(), "Reject".into()));
                        continue;
                    };
                    if k == "HeaderDigest" {
                        self.params.header_digest = pick == "CRC32C";
                    } else {
                        self.params.data_digest = pick == "CRC32C";
                    }
                    out.push((k.into(), pick.into()));
                }
                "MaxRecvDataSegmentLength" => {
                    let n = number(v).ok_or(ST_INITIATOR_ERROR)?;
                    if !(512..=16_777_215).contains(&n) {
                        return Err(ST_INITIATOR_ERROR);
                    }
                    self.params.send_max_data_segment_bytes = n;
                    if !self.declared_mrdsl {
                        self.declared_mrdsl = true;
                        out.push((k.into(), cfg_mrdsl.to_string()));
                    }
                }
                "MaxBurstLength" | "FirstBurstLength" => {
                    let n = number(v).ok_or(ST_INITIATOR_ERROR)?;
                    if !(512..=16_777_215).contains(&n) {
                        return Err(ST_INITIATOR_ERROR);
                    }
                    if k == "MaxBurstLength" {
                        self.params.max_burst_bytes = n.min(cfg_burst);
                        self.params.first_burst_bytes = self
                            .params
                            .first_burst_bytes
                            .min(self.params.max_burst_bytes);
                        out.push((k.into(), self.params.max_burst_bytes.to_string()));
                    } else {
                        self.params.first_burst_bytes =
                            n.min(cfg_first).min(self.params.max_burst_bytes);
                        out.push((k.into(), self.params.first_burst_bytes.to_string()));
                    }
                }
                "InitialR2T" => {
                    // OR: we are happy without, so the initiator decides.
                    let b = yes(v).ok_or(ST_INITIATOR_ERROR)?;
                    self.params.initial_r2t = b;
                    out.push((k.into(), yn(b)));
                }
                "ImmediateData" => {
                    // AND: we support it, so the initiator decides.
                    let b = yes(v).ok_or(ST_INITIATOR_ERROR)?;
                    self.params.immediate_data = b;
                    out.push((k.into(), yn(b)));
                }
                "MaxOutstandingR2T" => {
                    let n = number(v).ok_or(ST_INITIATOR_ERROR)?;
                    if n == 0 {
                        return Err(ST_INITIATOR_ERROR);
                    }
                    self.params.max_outstanding_r2t = n.min(16);
                    out.push((k.into(), self.params.max_outstanding_r2t.to_string()));
                }
                "ErrorRecoveryLevel" => {
                    number(v).ok_or(ST_INITIATOR_ERROR)?;
                    out.push((k.into(), "0".into()));
                }
                "MaxConnections" => {
                    number(v).ok_or(ST_INITIATOR_ERROR)?;
                    out.push((k.into(), "1".into()));
                }
                "DataPDUInOrder" | "DataSequenceInOrder" => {
                    yes(v).ok_or(ST_INITIATOR_ERROR)?;
                    out.push((k.into(), "Yes".into()));
                }
                "DefaultTime2Wait" => {
                    let n = number(v).ok_or(ST_INITIATOR_ERROR)?;
                    out.push((k.into(), n.clamp(0, 3600).max(2).to_string()));
                }
                "DefaultTime2Retain" => {
                    number(v).ok_or(ST_INITIATOR_ERROR)?;
                    out.push((k.into(), "0".into()));
                }
                "IFMarker" | "OFMarker" => out.push((k.into(), "No".into())),
                "IFMarkInt" | "OFMarkInt" => out.push((k.into(), "Irrelevant".into())),
                _ => out.push((k.into(), "NotUnderstood".into())),
            }
        }
        if chap_n.is_some() || chap_r.is_some() {
            let Auth::ChapChallenged { id, challenge } = self.auth.clone() else {
                return Err(ST_INITIATOR_ERROR);
            };
            let chap = self.chap.clone().ok_or(ST_AUTH_FAILED)?;
            let (Some(n), Some(r)) = (chap_n, chap_r) else {
                return Err(ST_AUTH_FAILED);
            };
            let r = decode_binary(&r).ok_or(ST_AUTH_FAILED)?;
            let want = chap_response(id, chap.secret.as_bytes(), &challenge);
            if n != chap.user || r.as_slice() != want.as_slice() {
                return Err(ST_AUTH_FAILED);
            }
            match (chap_i, chap_c) {
                (Some(i), Some(c)) => {
                    let Some((muser, msecret)) = chap.mutual.clone() else {
                        return Err(ST_AUTH_FAILED);
                    };
                    let i: u8 = i.parse().map_err(|_| ST_AUTH_FAILED)?;
                    let c = decode_binary(&c).ok_or(ST_AUTH_FAILED)?;
                    // A reflected challenge would let an attacker use us as
                    // an oracle for our own secret (RFC 7143 §12.1.3).
                    if c == challenge || c.len() < 8 {
                        return Err(ST_AUTH_FAILED);
                    }
                    let resp = chap_response(i, msecret.as_bytes(), &c);
                    out.push(("CHAP_N".into(), muser));
                    out.push(("CHAP_R".into(), hex(&resp)));
                }
                (None, None) => {
                    if chap.mutual.is_some() {
                        // Mutual CHAP is configured: the initiator must
                        // authenticate us too.
                        return Err(ST_AUTH_FAILED);
                    }
                }
                _ => return Err(ST_AUTH_FAILED),
            }
            self.auth = Auth::Done;
        } else if chap_i.is_some() || chap_c.is_some() {
            return Err(ST_AUTH_FAILED);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_known_vector() {
        let h: [u8; 16] = Md5::digest(b"abc").into();
        assert_eq!(hex(&h), "0x900150983cd24fb0d6963f7d28e17f72");
    }

    #[test]
    fn binary_decoding() {
        assert_eq!(decode_binary("0x0102ff"), Some(vec![1, 2, 255]));
        assert_eq!(decode_binary("0bAQL/"), Some(vec![1, 2, 255]));
        assert_eq!(decode_binary("zz"), None);
    }
}
