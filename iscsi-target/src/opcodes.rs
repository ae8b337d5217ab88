//! REPORT SUPPORTED OPERATION CODES (SPC-4 §6.35) and the table of the
//! commands this target implements.

use crate::sense::{ScsiResult, Sense};

/// (opcode, service action, CDB length).
const SUPPORTED: &[(u8, Option<u8>, usize)] = &[
    (0x00, None, 6),
    (0x03, None, 6),
    (0x08, None, 6),
    (0x0a, None, 6),
    (0x12, None, 6),
    (0x16, None, 6),
    (0x17, None, 6),
    (0x1a, None, 6),
    (0x1b, None, 6),
    (0x1e, None, 6),
    (0x25, None, 10),
    (0x28, None, 10),
    (0x2a, None, 10),
    (0x2e, None, 10),
    (0x2f, None, 10),
    (0x34, None, 10),
    (0x35, None, 10),
    (0x37, None, 10),
    (0x41, None, 10),
    (0x42, None, 10),
    (0x5a, None, 10),
    (0x5e, Some(0x00), 10),
    (0x5e, Some(0x01), 10),
    (0x5e, Some(0x02), 10),
    (0x5e, Some(0x03), 10),
    (0x5f, Some(0x00), 10),
    (0x5f, Some(0x01), 10),
    (0x5f, Some(0x02), 10),
    (0x5f, Some(0x03), 10),
    (0x5f, Some(0x04), 10),
    (0x5f, Some(0x05), 10),
    (0x5f, Some(0x06), 10),
    (0x83, Some(0x00), 16),
    (0x84, Some(0x00), 16),
    (0x84, Some(0x03), 16),
    (0x88, None, 16),
    (0x89, None, 16),
    (0x8a, None, 16),
    (0x8b, None, 16),
    (0x8e, None, 16),
    (0x8f, None, 16),
    (0x90, None, 16),
    (0x91, None, 16),
    (0x93, None, 16),
    (0x9c, None, 16),
    (0x9e, Some(0x10), 16),
    (0x9e, Some(0x12), 16),
    (0xa0, None, 12),
    (0xa3, Some(0x0a), 12),
    (0xa3, Some(0x0c), 12),
    (0xa8, None, 12),
    (0xaa, None, 12),
    (0xae, None, 12),
    (0xaf, None, 12),
    (0xb7, None, 12),
];

fn has_sa(op: u8) -> bool {
    SUPPORTED.iter().any(|e| e.0 == op && e.1.is_some())
}

/// The CDB usage map: which bits of each CDB byte the command looks at.
fn usage(op: u8, sa: Option<u8>, len: usize) -> Vec<u8> {
    let mut u = vec![0xffu8; len];
    u[0] = op;
    if let Some(sa) = sa {
        u[1] = sa;
    }
    u[len - 1] = 0x07;
    u
}

fn timeouts() -> [u8; 12] {
    let mut t = [0u8; 12];
    t[1] = 0x0a;
    t[4..8].copy_from_slice(&60u32.to_be_bytes());
    t[8..12].copy_from_slice(&60u32.to_be_bytes());
    t
}

pub fn report_supported(cdb: &[u8]) -> ScsiResult {
    let rctd = cdb[2] & 0x80 != 0;
    let opt = cdb[2] & 0x07;
    let req_op = cdb[3];
    let req_sa = u16::from_be_bytes([cdb[4], cdb[5]]);
    let alloc = u32::from_be_bytes([cdb[6], cdb[7], cdb[8], cdb[9]]) as usize;
    let mut d = Vec::new();
    match opt {
        0 => {
            d.extend_from_slice(&[0; 4]);
            for &(op, sa, len) in SUPPORTED {
                d.push(op);
                d.push(0);
                d.extend_from_slice(&(sa.unwrap_or(0) as u16).to_be_bytes());
                d.push(0);
                d.push((if sa.is_some() { 0x01 } else { 0 }) | if rctd { 0x02 } else { 0 });
                d.extend_from_slice(&(len as u16).to_be_bytes());
                if rctd {
                    d.extend_from_slice(&timeouts());
                }
            }
            let l = (d.len() - 4) as u32;
            d[0..4].copy_from_slice(&l.to_be_bytes());
        }
        1..=3 => {
            let found = match opt {
                1 => {
                    if has_sa(req_op) {
                        return ScsiResult::check(Sense::invalid_cdb_field(2));
                    }
                    SUPPORTED.iter().find(|e| e.0 == req_op && e.1.is_none())
                }
                2 => {
                    if !has_sa(req_op) && SUPPORTED.iter().any(|e| e.0 == req_op) {
                        return ScsiResult::check(Sense::invalid_cdb_field(2));
                    }
                    SUPPORTED
                        .iter()
                        .find(|e| e.0 == req_op && e.1.map(|s| s as u16) == Some(req_sa))
                }
                _ => SUPPORTED.iter().find(|e| {
                    e.0 == req_op
                        && (e.1.map(|s| s as u16) == Some(req_sa) || (e.1.is_none() && req_sa == 0))
                }),
            };
            match found {
                Some(&(op, sa, len)) => {
                    d.push(0);
                    d.push(0x03 | if rctd { 0x80 } else { 0 });
                    d.extend_from_slice(&(len as u16).to_be_bytes());
                    d.extend(usage(op, sa, len));
                    if rctd {
                        d.extend_from_slice(&timeouts());
                    }
                }
                None => d.extend_from_slice(&[0, 0x01, 0, 0]),
            }
        }
        _ => return ScsiResult::check(Sense::invalid_cdb_field(2)),
    }
    d.truncate(alloc);
    ScsiResult::good(d)
}
