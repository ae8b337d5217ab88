//! SPC-4 persistent reservations (PERSISTENT RESERVE IN / OUT), kept in
//! memory per logical unit. Registrations are keyed by initiator port name
//! (initiator name + ISID), so they survive reconnects of the same port.

use crate::scsi::{
    Access, Lun, Nexus, ScsiResult, Sense, KEY_ILLEGAL_REQUEST, SENSE_INVALID_FIELD_CDB,
    SENSE_INVALID_FIELD_PARAM, SENSE_PARAM_LIST_LENGTH,
};

const WE: u8 = 1;
const EA: u8 = 3;
const WERO: u8 = 5;
const EARO: u8 = 6;
const WEAR: u8 = 7;
const EAAR: u8 = 8;

#[derive(Default, Debug)]
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

impl PrState {
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

pub fn pr_in(lun: &Lun, _nx: &Nexus, cdb: &[u8]) -> ScsiResult {
    let sa = cdb[1] & 0x1f;
    let alloc = u16::from_be_bytes([cdb[7], cdb[8]]) as usize;
    let pr = lun.pr.lock().unwrap();
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
                e.extend_from_slice(&lun.ident.node_index.to_be_bytes());
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

pub fn pr_out(lun: &Lun, nx: &Nexus, cdb: &[u8], data: &[u8]) -> ScsiResult {
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
    let port = nx.port_name();
    let mut pr = lun.pr.lock().unwrap();
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
