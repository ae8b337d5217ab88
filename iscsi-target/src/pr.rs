//! SPC-4 persistent reservations (PERSISTENT RESERVE IN / OUT).
//! Registrations are keyed by initiator port name (initiator name + ISID),
//! so they survive reconnects of the same port.
//!
//! The state lives in the volume's replicated state blob
//! (`Volume::put_persistent_state`), encoded by [`PrState::encode`]: a
//! PERSISTENT RESERVE OUT that changes it completes only once the new state
//! is durable and mirrored like a write, so it survives a restart and a
//! failover. The logical unit keeps a decoded copy for the data path and
//! reloads it from the volume when the path state changes (a promote).
//!
//! This module is the state and the commands over it, with no logical unit
//! in sight: `lun::pr_out` runs PERSISTENT RESERVE OUT on the unit's
//! slow-path thread through [`apply_out`] and stores the result.

use crate::sense::{
    ScsiResult, Sense, KEY_ILLEGAL_REQUEST, SENSE_INVALID_FIELD_CDB, SENSE_INVALID_FIELD_PARAM,
    SENSE_PARAM_LIST_LENGTH,
};

const WE: u8 = 1;
const EA: u8 = 3;
const WERO: u8 = 5;
const EARO: u8 = 6;
const WEAR: u8 = 7;
const EAAR: u8 = 8;

/// Access class of a command, for reservation checks.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Always allowed (INQUIRY, REPORT LUNS, ...).
    None,
    Read,
    Write,
}

#[derive(Default, Debug, Clone, PartialEq, Eq)]
pub struct PrState {
    generation: u32,
    /// (initiator port name, reservation key)
    regs: Vec<(String, u64)>,
    /// (holder port name, type)
    res: Option<(String, u8)>,
}

fn all_registrants(t: u8) -> bool {
    t == WEAR || t == EAAR
}

/// Magic and version of the encoded state.
const MAGIC: &[u8; 4] = b"DMPR";
const VERSION: u8 = 1;
/// Longest initiator port name accepted in an encoded state (an iSCSI name
/// is at most 223 bytes, plus ",i,0x" and 12 hex digits).
const MAX_PORT_NAME: usize = 1024;

fn valid_type(t: u8) -> bool {
    matches!(t, WE | EA | WERO | EARO | WEAR | EAAR)
}

impl PrState {
    /// The byte format kept in the volume's replicated state blob
    /// (docs/iscsi.md), little-endian:
    /// `"DMPR" | version u8 = 1 | reservation type u8 (0 = none) | 0 u16 |
    /// PRgeneration u32 | registrations u32 | [holder: len u16, name]` (when
    /// reserved) `| registrations × (key u64, len u16, name)`.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(16 + self.regs.len() * 80);
        b.extend_from_slice(MAGIC);
        b.push(VERSION);
        b.push(self.res.as_ref().map_or(0, |r| r.1));
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(&self.generation.to_le_bytes());
        b.extend_from_slice(&(self.regs.len() as u32).to_le_bytes());
        let name = |b: &mut Vec<u8>, n: &str| {
            b.extend_from_slice(&(n.len() as u16).to_le_bytes());
            b.extend_from_slice(n.as_bytes());
        };
        if let Some((h, _)) = &self.res {
            name(&mut b, h);
        }
        for (port, key) in &self.regs {
            b.extend_from_slice(&key.to_le_bytes());
            name(&mut b, port);
        }
        b
    }

    /// Decodes [`PrState::encode`]'s format. Never panics; rejects anything
    /// malformed (unknown version, bad type, over-long or duplicate names,
    /// trailing bytes).
    pub fn decode(b: &[u8]) -> Result<PrState, &'static str> {
        struct R<'a>(&'a [u8]);
        impl<'a> R<'a> {
            fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
                if self.0.len() < n {
                    return Err("truncated");
                }
                let (a, rest) = self.0.split_at(n);
                self.0 = rest;
                Ok(a)
            }
            fn u16(&mut self) -> Result<u16, &'static str> {
                Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
            }
            fn u32(&mut self) -> Result<u32, &'static str> {
                Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
            }
            fn u64(&mut self) -> Result<u64, &'static str> {
                Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
            }
            fn name(&mut self) -> Result<String, &'static str> {
                let n = self.u16()? as usize;
                if n == 0 || n > MAX_PORT_NAME {
                    return Err("bad port name length");
                }
                String::from_utf8(self.take(n)?.to_vec()).map_err(|_| "port name not UTF-8")
            }
        }
        let mut r = R(b);
        if r.take(4)? != MAGIC {
            return Err("not a persistent reservation state");
        }
        if r.take(1)?[0] != VERSION {
            return Err("unknown persistent reservation state version");
        }
        let ty = r.take(1)?[0];
        if r.u16()? != 0 {
            return Err("reserved bytes set");
        }
        let generation = r.u32()?;
        let n = r.u32()? as usize;
        // Each registration takes at least 11 bytes: bounds `n` by the input.
        if n > r.0.len() / 11 {
            return Err("too many registrations");
        }
        let res = match ty {
            0 => None,
            t if valid_type(t) => Some((r.name()?, t)),
            _ => return Err("bad reservation type"),
        };
        let mut regs: Vec<(String, u64)> = Vec::with_capacity(n);
        for _ in 0..n {
            let key = r.u64()?;
            let port = r.name()?;
            if key == 0 || regs.iter().any(|x| x.0 == port) {
                return Err("bad registration");
            }
            regs.push((port, key));
        }
        if !r.0.is_empty() {
            return Err("trailing bytes");
        }
        Ok(PrState {
            generation,
            regs,
            res,
        })
    }

    pub fn has_registrations(&self) -> bool {
        !self.regs.is_empty()
    }

    fn key_of(&self, port: &str) -> Option<u64> {
        self.regs.iter().find(|r| r.0 == port).map(|r| r.1)
    }

    fn is_holder(&self, port: &str) -> bool {
        match &self.res {
            Some((h, t)) => {
                if all_registrants(*t) {
                    self.key_of(port).is_some()
                } else {
                    h == port
                }
            }
            None => false,
        }
    }

    pub fn conflicts(&self, port: &str, class: Access) -> bool {
        let Some((_, t)) = &self.res else {
            return false;
        };
        if self.is_holder(port) {
            return false;
        }
        let registered = self.key_of(port).is_some();
        match *t {
            WE => class == Access::Write,
            EA => class != Access::None,
            WERO | WEAR => !registered && class == Access::Write,
            EARO | EAAR => !registered && class != Access::None,
            _ => false,
        }
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fn transport_id(port: &str) -> Vec<u8> {
    // Format 01b: "name,i,0xISID", protocol identifier 5 (iSCSI).
    let mut name = port.as_bytes().to_vec();
    name.push(0);
    while !name.len().is_multiple_of(4) {
        name.push(0);
    }
    let mut t = vec![0x45, 0];
    t.extend_from_slice(&(name.len() as u16).to_be_bytes());
    t.extend(name);
    t
}

/// PERSISTENT RESERVE IN over the unit's state `pr`; `port_id` is this
/// node's relative target port identifier.
pub fn pr_in(pr: &PrState, port_id: u16, cdb: &[u8]) -> ScsiResult {
    let sa = cdb[1] & 0x1f;
    let alloc = u16::from_be_bytes([cdb[7], cdb[8]]) as usize;
    let mut d = Vec::new();
    d.extend_from_slice(&pr.generation.to_be_bytes());
    d.extend_from_slice(&[0; 4]);
    match sa {
        0 => {
            for (_, k) in &pr.regs {
                d.extend_from_slice(&k.to_be_bytes());
            }
        }
        1 => {
            if let Some((h, t)) = &pr.res {
                let key = if all_registrants(*t) {
                    0
                } else {
                    pr.key_of(h).unwrap_or(0)
                };
                d.extend_from_slice(&key.to_be_bytes());
                d.extend_from_slice(&[0; 5]);
                d.push(*t);
                d.extend_from_slice(&[0; 2]);
            }
        }
        2 => {
            let mut c = vec![0u8; 8];
            c[1] = 8;
            c[2] = 0x10; // CRH: RESERVE(6) conflicts with registrations
            c[3] = 0x80; // TMV: the type mask is valid
            c[4] = 0x80 | 0x40 | 0x20 | 0x08 | 0x02;
            c[5] = 0x01;
            c.truncate(alloc);
            return ScsiResult::good(c);
        }
        3 => {
            for (port, key) in &pr.regs {
                let mut e = Vec::new();
                e.extend_from_slice(&key.to_be_bytes());
                e.extend_from_slice(&[0; 4]);
                let holder = pr.is_holder(port);
                e.push(if holder { 0x01 } else { 0 });
                e.push(if holder {
                    pr.res.as_ref().map_or(0, |r| r.1)
                } else {
                    0
                });
                e.extend_from_slice(&[0; 4]);
                e.extend_from_slice(&port_id.to_be_bytes());
                let tid = transport_id(port);
                e.extend_from_slice(&(tid.len() as u32).to_be_bytes());
                e.extend(tid);
                d.extend(e);
            }
        }
        _ => return ScsiResult::check(SENSE_INVALID_FIELD_CDB),
    }
    let l = (d.len() - 8) as u32;
    d[4..8].copy_from_slice(&l.to_be_bytes());
    d.truncate(alloc);
    ScsiResult::good(d)
}

/// Applies one PERSISTENT RESERVE OUT to `pr` (a copy: the caller stores it
/// once it is durable). Nothing changes unless the result is GOOD.
pub(crate) fn apply_out(pr: &mut PrState, port: String, cdb: &[u8], data: &[u8]) -> ScsiResult {
    let sa = cdb[1] & 0x1f;
    let scope = cdb[2] >> 4;
    let ty = cdb[2] & 0x0f;
    let plen = be32(cdb, 5) as usize;
    if sa > 6 {
        return ScsiResult::check(SENSE_INVALID_FIELD_CDB);
    }
    if plen != 24 || data.len() < 24 {
        return ScsiResult::check(SENSE_PARAM_LIST_LENGTH);
    }
    let key = be64(data, 0);
    let sa_key = be64(data, 8);
    let flags = data[20];
    if flags & 0x08 != 0 || flags & 0x04 != 0 {
        // SPEC_I_PT and ALL_TG_PT are not supported.
        return ScsiResult::check(SENSE_INVALID_FIELD_PARAM);
    }
    let current = pr.key_of(&port);
    let needs_type = matches!(sa, 1 | 2 | 4 | 5);
    if needs_type && (scope != 0 || !matches!(ty, WE | EA | WERO | EARO | WEAR | EAAR)) {
        return ScsiResult::check(SENSE_INVALID_FIELD_CDB);
    }
    match sa {
        0 | 6 => {
            match current {
                None => {
                    if sa == 0 && key != 0 {
                        return ScsiResult::conflict();
                    }
                    if sa_key != 0 {
                        pr.regs.push((port, sa_key));
                    }
                }
                Some(k) => {
                    if sa == 0 && key != k {
                        return ScsiResult::conflict();
                    }
                    if sa_key == 0 {
                        let was_holder = pr.is_holder(&port);
                        pr.regs.retain(|r| r.0 != port);
                        if was_holder {
                            let keep = pr.res.as_ref().is_some_and(|r| all_registrants(r.1))
                                && !pr.regs.is_empty();
                            if !keep {
                                pr.res = None;
                            }
                        }
                    } else if let Some(r) = pr.regs.iter_mut().find(|r| r.0 == port) {
                        r.1 = sa_key;
                    }
                }
            }
            pr.generation = pr.generation.wrapping_add(1);
            ScsiResult::good(Vec::new())
        }
        1 => {
            if current != Some(key) {
                return ScsiResult::conflict();
            }
            match &pr.res {
                Some((_, t)) if pr.is_holder(&port) => {
                    if *t != ty {
                        return ScsiResult::conflict();
                    }
                }
                Some(_) => return ScsiResult::conflict(),
                None => pr.res = Some((port, ty)),
            }
            ScsiResult::good(Vec::new())
        }
        2 => {
            if current != Some(key) {
                return ScsiResult::conflict();
            }
            if pr.is_holder(&port) {
                if pr.res.as_ref().map(|r| r.1) != Some(ty) {
                    return ScsiResult::check(Sense::new(KEY_ILLEGAL_REQUEST, 0x26, 0x04));
                }
                pr.res = None;
            }
            ScsiResult::good(Vec::new())
        }
        3 => {
            if current != Some(key) {
                return ScsiResult::conflict();
            }
            pr.regs.clear();
            pr.res = None;
            pr.generation = pr.generation.wrapping_add(1);
            ScsiResult::good(Vec::new())
        }
        _ => {
            // PREEMPT / PREEMPT AND ABORT.
            if current != Some(key) {
                return ScsiResult::conflict();
            }
            let res = pr.res.clone();
            match res {
                Some((_, t)) if all_registrants(t) => {
                    if sa_key == 0 {
                        pr.regs.retain(|r| r.0 == port);
                        pr.res = Some((port.clone(), ty));
                    } else {
                        pr.regs.retain(|r| r.1 != sa_key || r.0 == port);
                    }
                }
                Some((holder, _)) => {
                    let holder_key = pr.key_of(&holder);
                    if sa_key == 0 {
                        return ScsiResult::check(SENSE_INVALID_FIELD_PARAM);
                    }
                    if !pr.regs.iter().any(|r| r.1 == sa_key) {
                        return ScsiResult::conflict();
                    }
                    pr.regs.retain(|r| r.1 != sa_key || r.0 == port);
                    if holder_key == Some(sa_key) {
                        pr.res = Some((port.clone(), ty));
                    }
                }
                None => {
                    if sa_key == 0 {
                        return ScsiResult::check(SENSE_INVALID_FIELD_PARAM);
                    }
                    if !pr.regs.iter().any(|r| r.1 == sa_key) {
                        return ScsiResult::conflict();
                    }
                    pr.regs.retain(|r| r.1 != sa_key || r.0 == port);
                }
            }
            pr.generation = pr.generation.wrapping_add(1);
            ScsiResult::good(Vec::new())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> PrState {
        PrState {
            generation: 7,
            regs: vec![
                ("iqn.2026-01.a:h1,i,0x800000000001".into(), 0xaa),
                ("iqn.2026-01.a:h2,i,0x800000000002".into(), 0xbb),
            ],
            res: Some(("iqn.2026-01.a:h1,i,0x800000000001".into(), WE)),
        }
    }

    #[test]
    fn state_round_trips() {
        for s in [PrState::default(), sample()] {
            assert_eq!(PrState::decode(&s.encode()).unwrap(), s);
        }
        let e = sample().encode();
        assert!(PrState::decode(&e[..e.len() - 1]).is_err());
        let mut t = e.clone();
        t.push(0);
        assert!(PrState::decode(&t).is_err());
        let mut v = e.clone();
        v[4] = 2;
        assert!(PrState::decode(&v).is_err(), "unknown version");
    }

    /// Seeded mutation fuzzing: decoding arbitrary bytes never panics, and
    /// whatever decodes encodes back to the same bytes.
    #[test]
    fn mutated_states_never_panic() {
        let base = sample().encode();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..50_000 {
            let mut b = base.clone();
            for _ in 0..1 + rnd() % 4 {
                match rnd() % 3 {
                    0 => {
                        let p = (rnd() % b.len() as u64) as usize;
                        b[p] = rnd() as u8;
                    }
                    1 => b.truncate((rnd() % (b.len() as u64 + 1)) as usize),
                    _ => b.push(rnd() as u8),
                }
                if b.is_empty() {
                    break;
                }
            }
            if let Ok(s) = PrState::decode(&b) {
                assert_eq!(s.encode(), b);
            }
        }
    }
}
