//! EXTENDED COPY (LID1) within this logical unit and RECEIVE COPY RESULTS
//! (SPC-4 §6.4, §6.18): block-to-block segments between identification
//! target descriptors that name this LU. The copy runs on the slow-path
//! thread through the volume, so it is mirrored like any write.

use volume::{submit_wait, VolumeOp};

use crate::lun::{naa, CopyResult, Lun};
use crate::sense::{
    io_error_sense, ScsiResult, Sense, KEY_ILLEGAL_REQUEST, SENSE_INVALID_FIELD_CDB,
    SENSE_PARAM_LIST_LENGTH,
};

const MAX_TARGET_DESCRIPTORS: u16 = 8;
const MAX_SEGMENT_DESCRIPTORS: u16 = 16;
const MAX_DESCRIPTOR_LIST_BYTES: u32 = 1024;
/// Largest single segment, in bytes (2^16 - 1 blocks of 512 bytes is 32 MiB).
const MAX_SEGMENT_BYTES: u32 = 32 << 20;
const KEY_COPY_ABORTED: u8 = 0x0a;
/// Results kept for RECEIVE COPY RESULTS (COPY STATUS), newest last.
pub const KEPT_RESULTS: usize = 16;

fn be16(b: &[u8], at: usize) -> usize {
    u16::from_be_bytes([b[at], b[at + 1]]) as usize
}
fn be32(b: &[u8], at: usize) -> usize {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap()) as usize
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fn ill(asc: u8, ascq: u8) -> ScsiResult {
    ScsiResult::check(Sense::new(KEY_ILLEGAL_REQUEST, asc, ascq))
}

fn aborted(asc: u8, ascq: u8) -> ScsiResult {
    ScsiResult::check(Sense::new(KEY_COPY_ABORTED, asc, ascq))
}

struct Segment {
    src: usize,
    dst: usize,
    blocks: u64,
    src_lba: u64,
    dst_lba: u64,
}

/// EXTENDED COPY (LID1).
pub fn extended_copy(lun: &Lun, nexus: u64, cdb: &[u8], data: &[u8]) -> ScsiResult {
    if cdb[1] & 0x1f != 0 {
        return ScsiResult::check(SENSE_INVALID_FIELD_CDB);
    }
    let plen = be32(cdb, 10);
    if plen == 0 {
        return ScsiResult::good(Vec::new());
    }
    if plen < 16 || data.len() < plen {
        return ScsiResult::check(SENSE_PARAM_LIST_LENGTH);
    }
    let d = &data[..plen];
    let list_id = d[0];
    let tdl = be16(d, 2);
    let sdl = be32(d, 8);
    let inline = be32(d, 12);
    if inline != 0 {
        // No inline or embedded data is supported.
        return ill(0x26, 0x00);
    }
    if tdl + sdl > MAX_DESCRIPTOR_LIST_BYTES as usize {
        return ScsiResult::check(SENSE_PARAM_LIST_LENGTH);
    }
    if 16 + tdl + sdl > plen {
        return ScsiResult::check(SENSE_PARAM_LIST_LENGTH);
    }
    if !tdl.is_multiple_of(32) {
        return ScsiResult::check(SENSE_PARAM_LIST_LENGTH);
    }
    if tdl / 32 > MAX_TARGET_DESCRIPTORS as usize {
        return ill(0x26, 0x06); // TOO MANY TARGET DESCRIPTORS
    }
    let naa = naa(&lun.ident.uuid);
    let mut targets = Vec::new();
    for t in d[16..16 + tdl].chunks(32) {
        if t[0] != 0xe4 {
            return ill(0x26, 0x07); // UNSUPPORTED TARGET DESCRIPTOR TYPE CODE
        }
        // Identification descriptor: it names this LU when the designator is
        // our NAA (the LU ID TYPE field is ignored, as SPC-4 says).
        let dlen = (t[7] as usize).min(20);
        let matches = t[5] & 0x0f == 3 && dlen == 16 && t[8..8 + dlen] == naa;
        let bs = u32::from_be_bytes([0, t[29], t[30], t[31]]);
        targets.push(matches && (bs == 0 || bs == lun.geo.block_size));
    }
    let mut segs = Vec::new();
    let mut at = 16 + tdl;
    let end = 16 + tdl + sdl;
    while at < end {
        if at + 4 > end {
            return ScsiResult::check(SENSE_PARAM_LIST_LENGTH);
        }
        let s = &d[at..end];
        let len = 4 + be16(s, 2);
        if s[0] != 0x02 {
            return ill(0x26, 0x09); // UNSUPPORTED SEGMENT DESCRIPTOR TYPE CODE
        }
        if len != 28 || s.len() < 28 {
            return ScsiResult::check(SENSE_PARAM_LIST_LENGTH);
        }
        if segs.len() == MAX_SEGMENT_DESCRIPTORS as usize {
            return ill(0x26, 0x08); // TOO MANY SEGMENT DESCRIPTORS
        }
        segs.push(Segment {
            src: be16(s, 4),
            dst: be16(s, 6),
            blocks: be16(s, 10) as u64,
            src_lba: be64(s, 12),
            dst_lba: be64(s, 20),
        });
        at += len;
    }
    let mut result = CopyResult {
        nexus,
        list_id,
        ok: false,
        segments: 0,
        blocks: 0,
    };
    let outcome = run_segments(lun, &targets, &segs, &mut result);
    result.ok = outcome.status == 0;
    let mut kept = lun.copy_results.lock().unwrap();
    kept.retain(|r| !(r.nexus == nexus && r.list_id == list_id));
    if kept.len() == KEPT_RESULTS {
        kept.remove(0);
    }
    kept.push(result);
    outcome
}

fn run_segments(lun: &Lun, targets: &[bool], segs: &[Segment], res: &mut CopyResult) -> ScsiResult {
    let bs = lun.geo.block_size as u64;
    for s in segs {
        let reachable = |i: usize| targets.get(i).copied().unwrap_or(false);
        if !reachable(s.src) || !reachable(s.dst) {
            return aborted(0x0d, 0x02); // COPY TARGET DEVICE NOT REACHABLE
        }
        let n = lun.geo.num_blocks;
        let in_range = |lba: u64| lba.checked_add(s.blocks).is_some_and(|e| e <= n);
        if !in_range(s.src_lba) || !in_range(s.dst_lba) {
            return aborted(0x00, 0x00);
        }
        let chunk =
            ((lun.vol.max_io_bytes() as u64 / bs).max(1)).min(MAX_SEGMENT_BYTES as u64 / bs);
        let mut done = 0u64;
        while done < s.blocks {
            let k = (s.blocks - done).min(chunk);
            let read = VolumeOp::Read {
                offset: (s.src_lba + done) * bs,
                len: (k * bs) as u32,
            };
            let buf = match submit_wait(&*lun.vol, read) {
                Ok(b) => b,
                Err(e) => {
                    return ScsiResult::check(Sense {
                        key: KEY_COPY_ABORTED,
                        ..io_error_sense(e, false)
                    })
                }
            };
            let write = VolumeOp::Write {
                offset: (s.dst_lba + done) * bs,
                data: buf,
                fua: false,
            };
            if let Err(e) = submit_wait(&*lun.vol, write) {
                return ScsiResult::check(Sense {
                    key: KEY_COPY_ABORTED,
                    ..io_error_sense(e, true)
                });
            }
            done += k;
            res.blocks += k;
        }
        res.segments += 1;
    }
    ScsiResult::good(Vec::new())
}

/// RECEIVE COPY RESULTS: COPY STATUS (0) and OPERATING PARAMETERS (3).
pub fn receive_copy_results(lun: &Lun, nexus: u64, cdb: &[u8]) -> ScsiResult {
    let sa = cdb[1] & 0x1f;
    let list_id = cdb[2];
    let alloc = be32(cdb, 10);
    let mut d = match sa {
        0 => {
            let kept = lun.copy_results.lock().unwrap();
            let Some(r) = kept
                .iter()
                .rev()
                .find(|r| r.nexus == nexus && r.list_id == list_id)
            else {
                return ScsiResult::check(Sense::invalid_cdb_field(2));
            };
            let mut d = vec![0u8; 12];
            d[0..4].copy_from_slice(&8u32.to_be_bytes());
            d[4] = if r.ok { 0x00 } else { 0x01 };
            d[5..7].copy_from_slice(&r.segments.to_be_bytes());
            d[7] = 0xf1; // transfer count in units of logical blocks
            d[8..12].copy_from_slice(&(r.blocks.min(u32::MAX as u64) as u32).to_be_bytes());
            d
        }
        3 => {
            let mut d = vec![0u8; 46];
            d[0..4].copy_from_slice(&42u32.to_be_bytes());
            d[4] = 0x01; // SNLID
            d[8..10].copy_from_slice(&MAX_TARGET_DESCRIPTORS.to_be_bytes());
            d[10..12].copy_from_slice(&MAX_SEGMENT_DESCRIPTORS.to_be_bytes());
            d[12..16].copy_from_slice(&MAX_DESCRIPTOR_LIST_BYTES.to_be_bytes());
            d[16..20].copy_from_slice(&MAX_SEGMENT_BYTES.to_be_bytes());
            d[34..36].copy_from_slice(&1u16.to_be_bytes()); // total concurrent copies
            d[36] = 1; // maximum concurrent copies
            d[37] = 9; // data segment granularity: 512 bytes (log2)
            d[43] = 2; // implemented descriptor list length
            d[44] = 0x02; // block -> block segment
            d[45] = 0xe4; // identification target descriptor
            d
        }
        _ => return ScsiResult::check(Sense::invalid_cdb_field(1)),
    };
    d.truncate(alloc);
    ScsiResult::good(d)
}

fn tpc_descriptor(ty: u16, body: &[u8]) -> Vec<u8> {
    let mut d = ty.to_be_bytes().to_vec();
    let mut b = body.to_vec();
    while !(b.len() + 4).is_multiple_of(4) || b.is_empty() {
        b.push(0);
    }
    d.extend_from_slice(&(b.len() as u16).to_be_bytes());
    d.extend(b);
    d
}

/// Third-party copy VPD page (8Fh) body: supported commands, parameter data
/// and supported descriptors (SPC-4 §7.8.17).
pub fn third_party_copy_descriptors() -> Vec<u8> {
    let mut out = Vec::new();
    // Supported commands: EXTENDED COPY (LID1) and RECEIVE COPY RESULTS.
    let cmds = [0x83u8, 1, 0x00, 0x84, 2, 0x00, 0x03];
    let mut b = vec![cmds.len() as u8];
    b.extend_from_slice(&cmds);
    out.extend(tpc_descriptor(0x0001, &b));
    // Parameter data.
    let mut p = vec![0u8; 28];
    p[4..6].copy_from_slice(&MAX_TARGET_DESCRIPTORS.to_be_bytes());
    p[6..8].copy_from_slice(&MAX_SEGMENT_DESCRIPTORS.to_be_bytes());
    p[8..12].copy_from_slice(&MAX_DESCRIPTOR_LIST_BYTES.to_be_bytes());
    out.extend(tpc_descriptor(0x0008, &p));
    // Supported descriptors: block -> block segment, identification target.
    out.extend(tpc_descriptor(0x000c, &[2, 0x02, 0xe4]));
    out
}
