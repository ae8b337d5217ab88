//! SCSI block command emulation (SPC-4 / SBC-3) over a `Volume`.
//!
//! `execute` takes a CDB and its Data-Out buffer and calls `done` exactly
//! once with the status, sense and Data-In. Fast paths (READ, WRITE,
//! SYNCHRONIZE CACHE) are asynchronous volume requests; multi-step commands
//! (COMPARE AND WRITE, VERIFY, WRITE SAME, UNMAP) run on the LUN's slow-path
//! worker thread, which serializes them against each other.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use volume::{submit_wait, Geometry, IoBuf, IoError, VolumeOp};

use crate::lun::{
    lbppbe, max_atomic_blocks, MAX_COMPARE_WRITE_BLOCKS, MAX_UNMAP_BLOCKS, MAX_UNMAP_DESCRIPTORS,
    MAX_WRITE_SAME_BLOCKS,
};
use crate::pr::Access;
// The connection code and the tests reach the unit and the sense
// vocabulary through this module, the command layer.
pub use crate::lun::{Lun, Nexus};
pub use crate::sense::*;

fn be16(b: &[u8], at: usize) -> u32 {
    u16::from_be_bytes([b[at], b[at + 1]]) as u32
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// CDB length implied by the opcode's group code.
pub fn cdb_len(op: u8) -> usize {
    match op >> 5 {
        0 => 6,
        1 | 2 => 10,
        4 => 16,
        5 => 12,
        _ => 16,
    }
}

fn access_class(cdb: &[u8]) -> Access {
    match cdb[0] {
        0x08 | 0x28 | 0xa8 | 0x88 | 0x2f | 0xaf | 0x8f | 0x34 | 0x90 => Access::Read,
        0x9e if cdb[1] & 0x1f == 0x12 => Access::Read,
        0x0a | 0x2a | 0xaa | 0x8a | 0x2e | 0xae | 0x8e | 0x41 | 0x93 | 0x42 | 0x89 | 0x35
        | 0x91 | 0x15 | 0x55 | 0x1b | 0x8b | 0x9c | 0x83 => Access::Write,
        _ => Access::None,
    }
}

/// Commands that neither report nor clear a pending unit attention.
fn ua_exempt(op: u8) -> bool {
    matches!(op, 0x12 | 0xa0 | 0x03)
}

/// Commands served in the ALUA standby state (SPC-4 §5.15.2.4.4): the
/// rest fail with NOT READY, LOGICAL UNIT NOT ACCESSIBLE, TARGET PORT IN
/// STANDBY STATE.
fn allowed_in_standby(op: u8) -> bool {
    matches!(
        op,
        0x12 | 0xa0
            | 0x03
            | 0x1a
            | 0x5a
            | 0x15
            | 0x55
            | 0x4c
            | 0x4d
            | 0x1c
            | 0x1d
            | 0xa3
            | 0xa4
            | 0x5e
            | 0x5f
            | 0x3b
            | 0x3c
    )
}

/// Executes one SCSI command on LUN `lun_id` and calls `done` once.
pub fn execute(lun: &Arc<Lun>, nx: &Arc<Nexus>, lun_id: u64, cdb: &[u8], data: IoBuf, done: Done) {
    if cdb.is_empty() {
        return done(ScsiResult::check(SENSE_INVALID_OPCODE));
    }
    let op = cdb[0];
    // Only LUN 0 exists (single-level addressing, peripheral method).
    if lun_id != 0 {
        return match op {
            0xa0 => done(report_luns(cdb)),
            0x12 => {
                let mut r = inquiry(lun, cdb);
                if r.status == STATUS_GOOD && !r.data.is_empty() {
                    r.data[0] = 0x7f;
                }
                done(r)
            }
            0x03 => done(request_sense(lun, nx, cdb)),
            _ => done(ScsiResult::check(SENSE_LUN_NOT_SUPPORTED)),
        };
    }
    if cdb.len() < cdb_len(op) {
        return done(ScsiResult::check(SENSE_INVALID_FIELD_CDB));
    }
    if !ua_exempt(op) {
        if let Some(s) = lun.take_ua(nx) {
            return done(ScsiResult::check(s));
        }
    }
    let class = access_class(cdb);
    if conflicts(lun, nx, cdb, class) {
        return done(ScsiResult::conflict());
    }
    if !allowed_in_standby(op) && lun.standby() {
        return done(ScsiResult::check(SENSE_STANDBY));
    }
    let geo = lun.geo;
    let bs = geo.block_size as u64;
    match op {
        0x00 => done(ScsiResult::good(Vec::new())),
        0x03 => done(request_sense(lun, nx, cdb)),
        0x12 => done(inquiry(lun, cdb)),
        0x1a | 0x5a => done(mode_sense(lun, cdb)),
        0x25 => {
            let last = geo.num_blocks.saturating_sub(1).min(0xffff_ffff) as u32;
            let mut d = last.to_be_bytes().to_vec();
            d.extend_from_slice(&geo.block_size.to_be_bytes());
            done(ScsiResult::good(d))
        }
        0x9e => match cdb[1] & 0x1f {
            0x10 => done(read_capacity16(lun, cdb)),
            0x12 => done(get_lba_status(lun, cdb)),
            _ => done(ScsiResult::check(SENSE_INVALID_FIELD_CDB)),
        },
        0xa0 => done(report_luns(cdb)),
        0xa3 => match cdb[1] & 0x1f {
            0x0a => done(report_tpgs(lun, cdb)),
            0x0c => done(crate::opcodes::report_supported(cdb)),
            _ => done(ScsiResult::check(SENSE_INVALID_FIELD_CDB)),
        },
        // START STOP UNIT, PREVENT ALLOW MEDIUM REMOVAL: nothing to do on a
        // non-removable, always-spinning medium.
        0x1b => done(ScsiResult::good(Vec::new())),
        0x1e => {
            if cdb[4] & 0x3 != 0 && cdb[4] & 0x3 != 1 {
                return done(ScsiResult::check(SENSE_INVALID_FIELD_CDB));
            }
            done(ScsiResult::good(Vec::new()))
        }
        0x37 | 0xb7 => done(read_defect_data(cdb)),
        0x16 | 0x56 => done(reserve6(lun, nx)),
        0x17 | 0x57 => {
            let mut r = lun.reserve6.lock().unwrap();
            if *r == Some(nx.id) {
                *r = None;
            }
            done(ScsiResult::good(Vec::new()))
        }
        0x5e => done(crate::pr::pr_in(&lun.pr(), lun.ident.node_index, cdb)),
        0x5f => crate::lun::pr_out(lun, nx, cdb, &data, done),
        // READ 6/10/12/16
        0x08 | 0x28 | 0xa8 | 0x88 => {
            let (lba, n) = match rw_lba_len(cdb) {
                Ok(v) => v,
                Err(s) => return done(ScsiResult::check(s)),
            };
            if let Err(s) = check_range(geo, lba, n as u64) {
                return done(ScsiResult::check(s));
            }
            if n == 0 {
                return done(ScsiResult::good(Vec::new()));
            }
            let len = n as u64 * bs;
            if len > lun.max_cmd_bytes as u64 {
                return done(ScsiResult::check(SENSE_INVALID_FIELD_CDB));
            }
            read_async(lun, lba * bs, len as u32, done)
        }
        // WRITE 6/10/12/16, WRITE AND VERIFY 10/12/16
        0x0a | 0x2a | 0xaa | 0x8a | 0x2e | 0xae | 0x8e => {
            let (lba, n) = match rw_lba_len(cdb) {
                Ok(v) => v,
                Err(s) => return done(ScsiResult::check(s)),
            };
            if let Err(s) = check_range(geo, lba, n as u64) {
                return done(ScsiResult::check(s));
            }
            if n == 0 {
                return done(ScsiResult::good(Vec::new()));
            }
            // With an expected transfer length below the CDB's, only the
            // whole blocks received are written (the residual reports the
            // overflow), as common targets do.
            let len = (n as u64 * bs).min(data.len() as u64 / bs * bs);
            if len == 0 {
                return done(ScsiResult::good(Vec::new()));
            }
            let mut data = data;
            data.set_len(len as usize);
            let fua = op != 0x0a && cdb[1] & 0x08 != 0;
            write_async(lun, lba * bs, data, fua, done)
        }
        // VERIFY 10/12/16
        0x2f | 0xaf | 0x8f => {
            let lun2 = lun.clone();
            let cdb = cdb.to_vec();
            lun.slow(Box::new(move || done(verify(&lun2, &cdb, &data))))
        }
        // SYNCHRONIZE CACHE 10/16
        0x35 | 0x91 => {
            let (lba, n) = if op == 0x35 {
                (be32(cdb, 2) as u64, be16(cdb, 7) as u64)
            } else {
                (be64(cdb, 2), be32(cdb, 10) as u64)
            };
            if let Err(s) = check_range(geo, lba, n) {
                return done(ScsiResult::check(s));
            }
            lun.vol.submit(
                VolumeOp::Flush,
                Box::new(move |r| match r {
                    Ok(_) => done(ScsiResult::good(Vec::new())),
                    Err(e) => done(ScsiResult::check(io_error_sense(e, true))),
                }),
            )
        }
        // PRE-FETCH 10/16
        0x34 | 0x90 => {
            let (lba, n) = if op == 0x34 {
                (be32(cdb, 2) as u64, be16(cdb, 7) as u64)
            } else {
                (be64(cdb, 2), be32(cdb, 10) as u64)
            };
            match check_range(geo, lba, n) {
                Ok(()) => done(ScsiResult::good(Vec::new())),
                Err(s) => done(ScsiResult::check(s)),
            }
        }
        0x41 | 0x93 => {
            let lun2 = lun.clone();
            let cdb = cdb.to_vec();
            lun.slow(Box::new(move || done(write_same(&lun2, &cdb, &data))))
        }
        0x42 => {
            let lun2 = lun.clone();
            let cdb = cdb.to_vec();
            lun.slow(Box::new(move || done(unmap(&lun2, &cdb, &data))))
        }
        0x89 => {
            let lun2 = lun.clone();
            let cdb = cdb.to_vec();
            lun.slow(Box::new(move || {
                done(compare_and_write(&lun2, &cdb, &data))
            }))
        }
        0x83 => {
            let nexus = nx.id;
            let lun2 = lun.clone();
            let cdb = cdb.to_vec();
            lun.slow(Box::new(move || {
                done(crate::xcopy::extended_copy(&lun2, nexus, &cdb, &data))
            }))
        }
        0x84 => done(crate::xcopy::receive_copy_results(lun, nx.id, cdb)),
        0x8b => {
            let lun2 = lun.clone();
            let cdb = cdb.to_vec();
            lun.slow(Box::new(move || done(or_write(&lun2, &cdb, &data))))
        }
        0x9c => {
            let lun2 = lun.clone();
            let cdb = cdb.to_vec();
            lun.slow(Box::new(move || done(write_atomic(&lun2, &cdb, &data))))
        }
        _ => done(ScsiResult::check(SENSE_INVALID_OPCODE)),
    }
}

/// Bytes of Data-Out the CDB asks for (used for residual accounting), or
/// None when the command transfers no Data-Out or it cannot be computed.
pub fn data_out_len(cdb: &[u8], block_size: u32) -> Option<u64> {
    let bs = block_size as u64;
    let op = *cdb.first()?;
    if cdb.len() < cdb_len(op) {
        return None;
    }
    match op {
        0x0a | 0x2a | 0xaa | 0x8a | 0x2e | 0xae | 0x8e => {
            rw_lba_len(cdb).ok().map(|(_, n)| n as u64 * bs)
        }
        0x2f | 0xaf | 0x8f => {
            let bytchk = (cdb[1] >> 1) & 3;
            let n = rw_lba_len(cdb).ok()?.1 as u64;
            match bytchk {
                0 => Some(0),
                1 => Some(n * bs),
                3 => Some(bs),
                _ => None,
            }
        }
        0x89 => Some(cdb[13] as u64 * 2 * bs),
        0x8b => Some(be32(cdb, 10) as u64 * bs),
        0x9c => Some(be16(cdb, 12) as u64 * bs),
        _ => None,
    }
}

fn rw_lba_len(cdb: &[u8]) -> Result<(u64, u32), Sense> {
    let op = cdb[0];
    match op {
        0x08 | 0x0a => {
            let lba = (((cdb[1] & 0x1f) as u64) << 16) | be16(cdb, 2) as u64;
            let n = if cdb[4] == 0 { 256 } else { cdb[4] as u32 };
            Ok((lba, n))
        }
        0x28 | 0x2a | 0x2e | 0x2f => {
            protect_check(cdb)?;
            Ok((be32(cdb, 2) as u64, be16(cdb, 7)))
        }
        0xa8 | 0xaa | 0xae | 0xaf => {
            protect_check(cdb)?;
            Ok((be32(cdb, 2) as u64, be32(cdb, 6)))
        }
        _ => {
            protect_check(cdb)?;
            Ok((be64(cdb, 2), be32(cdb, 10)))
        }
    }
}

/// RDPROTECT / WRPROTECT / VRPROTECT must be zero: no protection information.
fn protect_check(cdb: &[u8]) -> Result<(), Sense> {
    if cdb[1] & 0xe0 != 0 {
        Err(SENSE_INVALID_FIELD_CDB)
    } else {
        Ok(())
    }
}

fn check_range(geo: Geometry, lba: u64, n: u64) -> Result<(), Sense> {
    match lba.checked_add(n) {
        Some(end) if end <= geo.num_blocks && lba <= geo.num_blocks => Ok(()),
        _ => Err(SENSE_LBA_OUT_OF_RANGE),
    }
}

/// Splits [offset, offset+len) into volume-sized pieces.
fn pieces(offset: u64, len: u64, max: u64) -> Vec<(u64, u64)> {
    let mut v = Vec::new();
    let mut at = 0;
    while at < len {
        let n = (len - at).min(max);
        v.push((offset + at, n));
        at += n;
    }
    v
}

fn max_piece(lun: &Lun) -> u64 {
    let bs = lun.geo.block_size as u64;
    let m = (lun.vol.max_io_bytes() as u64 / bs).max(1) * bs;
    m.max(bs)
}

fn read_async(lun: &Arc<Lun>, offset: u64, len: u32, done: Done) {
    let parts = pieces(offset, len as u64, max_piece(lun));
    if parts.len() == 1 {
        return lun.vol.submit(
            VolumeOp::Read { offset, len },
            Box::new(move |r| match r {
                Ok(d) => done(ScsiResult::good(d)),
                Err(e) => done(ScsiResult::check(io_error_sense(e, false))),
            }),
        );
    }
    struct Gather {
        buf: Vec<u8>,
        left: usize,
        err: Option<IoError>,
        done: Option<Done>,
    }
    let g = Arc::new(Mutex::new(Gather {
        buf: vec![0; len as usize],
        left: parts.len(),
        err: None,
        done: Some(done),
    }));
    for (off, n) in parts {
        let g = g.clone();
        let at = (off - offset) as usize;
        lun.vol.submit(
            VolumeOp::Read {
                offset: off,
                len: n as u32,
            },
            Box::new(move |r| {
                let mut s = g.lock().unwrap();
                match r {
                    Ok(d) if d.len() == n as usize => s.buf[at..at + d.len()].copy_from_slice(&d),
                    Ok(_) => s.err = Some(IoError::Io(libc::EIO)),
                    Err(e) => s.err = Some(e),
                }
                s.left -= 1;
                if s.left == 0 {
                    let done = s.done.take().unwrap();
                    let res = match s.err {
                        Some(e) => ScsiResult::check(io_error_sense(e, false)),
                        None => ScsiResult::good(std::mem::take(&mut s.buf)),
                    };
                    drop(s);
                    done(res);
                }
            }),
        );
    }
}

fn write_async(lun: &Arc<Lun>, offset: u64, data: IoBuf, fua: bool, done: Done) {
    let parts = pieces(offset, data.len() as u64, max_piece(lun));
    let finish = |r: Result<(), IoError>, done: Done| match r {
        Ok(()) => done(ScsiResult::good(Vec::new())),
        Err(e) => done(ScsiResult::check(io_error_sense(e, true))),
    };
    if parts.len() == 1 {
        return lun.vol.submit(
            VolumeOp::Write { offset, data, fua },
            Box::new(move |r| finish(r.map(|_| ()), done)),
        );
    }
    let left = Arc::new(AtomicUsize::new(parts.len()));
    let state: Arc<Mutex<(Option<IoError>, Option<Done>)>> =
        Arc::new(Mutex::new((None, Some(done))));
    for (off, n) in parts {
        let at = (off - offset) as usize;
        let chunk = data[at..at + n as usize].to_vec();
        let left = left.clone();
        let state = state.clone();
        lun.vol.submit(
            VolumeOp::Write {
                offset: off,
                data: chunk.into(),
                fua,
            },
            Box::new(move |r| {
                let mut s = state.lock().unwrap();
                if let Err(e) = r {
                    s.0.get_or_insert(e);
                }
                if left.fetch_sub(1, Ordering::AcqRel) == 1 {
                    let d = s.1.take().unwrap();
                    let err = s.0;
                    drop(s);
                    finish(err.map_or(Ok(()), Err), d);
                }
            }),
        );
    }
}

/// Synchronous read for the slow path.
fn read_sync(lun: &Lun, offset: u64, len: u64) -> Result<Vec<u8>, IoError> {
    let mut out = Vec::with_capacity(len as usize);
    for (off, n) in pieces(offset, len, max_piece(lun)) {
        out.extend_from_slice(&submit_wait(
            &*lun.vol,
            VolumeOp::Read {
                offset: off,
                len: n as u32,
            },
        )?);
    }
    Ok(out)
}

fn write_sync(lun: &Lun, offset: u64, data: &[u8], fua: bool) -> Result<(), IoError> {
    for (off, n) in pieces(offset, data.len() as u64, max_piece(lun)) {
        let at = (off - offset) as usize;
        let chunk = data[at..at + n as usize].to_vec();
        submit_wait(
            &*lun.vol,
            VolumeOp::Write {
                offset: off,
                data: chunk.into(),
                fua,
            },
        )?;
    }
    Ok(())
}

fn miscompare(at: usize) -> ScsiResult {
    ScsiResult::check(Sense {
        info: Some(at as u32),
        ..Sense::new(KEY_MISCOMPARE, 0x1d, 0x00)
    })
}

fn verify(lun: &Lun, cdb: &[u8], data: &[u8]) -> ScsiResult {
    let (lba, n) = match rw_lba_len(cdb) {
        Ok(v) => v,
        Err(s) => return ScsiResult::check(s),
    };
    if let Err(s) = check_range(lun.geo, lba, n as u64) {
        return ScsiResult::check(s);
    }
    let bytchk = (cdb[1] >> 1) & 3;
    if bytchk == 2 {
        return ScsiResult::check(SENSE_INVALID_FIELD_CDB);
    }
    if n == 0 {
        return ScsiResult::good(Vec::new());
    }
    let bs = lun.geo.block_size as u64;
    let len = n as u64 * bs;
    if len > lun.max_cmd_bytes as u64 {
        return ScsiResult::check(SENSE_INVALID_FIELD_CDB);
    }
    let media = match read_sync(lun, lba * bs, len) {
        Ok(d) => d,
        Err(e) => return ScsiResult::check(io_error_sense(e, false)),
    };
    match bytchk {
        1 => {
            if (data.len() as u64) < len {
                return ScsiResult::check(SENSE_INVALID_FIELD_CDB);
            }
            if let Some(at) = media.iter().zip(data).position(|(a, b)| a != b) {
                return miscompare(at);
            }
        }
        3 => {
            if (data.len() as u64) < bs {
                return ScsiResult::check(SENSE_INVALID_FIELD_CDB);
            }
            for (i, blk) in media.chunks(bs as usize).enumerate() {
                if let Some(at) = blk
                    .iter()
                    .zip(&data[..bs as usize])
                    .position(|(a, b)| a != b)
                {
                    return miscompare(i * bs as usize + at);
                }
            }
        }
        _ => {}
    }
    ScsiResult::good(Vec::new())
}

fn compare_and_write(lun: &Lun, cdb: &[u8], data: &[u8]) -> ScsiResult {
    if let Err(s) = protect_check(cdb) {
        return ScsiResult::check(s);
    }
    let lba = be64(cdb, 2);
    let n = cdb[13] as u64;
    if let Err(s) = check_range(lun.geo, lba, n) {
        return ScsiResult::check(s);
    }
    if n == 0 {
        if !data.is_empty() {
            return ScsiResult::check(SENSE_INVALID_FIELD_CDB);
        }
        return ScsiResult::good(Vec::new());
    }
    if n > MAX_COMPARE_WRITE_BLOCKS as u64 {
        return ScsiResult::check(SENSE_INVALID_FIELD_CDB);
    }
    let bs = lun.geo.block_size as u64;
    let len = (n * bs) as usize;
    if data.len() != 2 * len {
        // The Data-Out buffer must hold exactly the verify and write data.
        return ScsiResult::check(SENSE_INVALID_FIELD_CDB);
    }
    let media = match read_sync(lun, lba * bs, len as u64) {
        Ok(d) => d,
        Err(e) => return ScsiResult::check(io_error_sense(e, false)),
    };
    if let Some(at) = media.iter().zip(&data[..len]).position(|(a, b)| a != b) {
        return miscompare(at);
    }
    let fua = cdb[1] & 0x08 != 0;
    match write_sync(lun, lba * bs, &data[len..2 * len], fua) {
        Ok(()) => ScsiResult::good(Vec::new()),
        Err(e) => ScsiResult::check(io_error_sense(e, true)),
    }
}

/// ORWRITE (16): the new data is ORed into the blocks (read-modify-write,
/// serialized with the other slow-path commands).
fn or_write(lun: &Lun, cdb: &[u8], data: &[u8]) -> ScsiResult {
    if let Err(s) = protect_check(cdb) {
        return ScsiResult::check(s);
    }
    let lba = be64(cdb, 2);
    let n = be32(cdb, 10) as u64;
    if let Err(s) = check_range(lun.geo, lba, n) {
        return ScsiResult::check(s);
    }
    let bs = lun.geo.block_size as u64;
    let len = (n * bs).min(data.len() as u64 / bs * bs);
    if len == 0 {
        return ScsiResult::good(Vec::new());
    }
    if len > lun.max_cmd_bytes as u64 {
        return ScsiResult::check(SENSE_INVALID_FIELD_CDB);
    }
    let mut media = match read_sync(lun, lba * bs, len) {
        Ok(d) => d,
        Err(e) => return ScsiResult::check(io_error_sense(e, false)),
    };
    for (m, d) in media.iter_mut().zip(data) {
        *m |= *d;
    }
    match write_sync(lun, lba * bs, &media, cdb[1] & 0x08 != 0) {
        Ok(()) => ScsiResult::good(Vec::new()),
        Err(e) => ScsiResult::check(io_error_sense(e, true)),
    }
}

/// WRITE ATOMIC (16): accepted only when it fits one volume request.
fn write_atomic(lun: &Lun, cdb: &[u8], data: &[u8]) -> ScsiResult {
    if let Err(s) = protect_check(cdb) {
        return ScsiResult::check(s);
    }
    let lba = be64(cdb, 2);
    let n = be16(cdb, 12) as u64;
    if let Err(s) = check_range(lun.geo, lba, n) {
        return ScsiResult::check(s);
    }
    if n == 0 {
        return ScsiResult::good(Vec::new());
    }
    if n > max_atomic_blocks(lun) as u64 {
        return ScsiResult::check(SENSE_INVALID_FIELD_CDB);
    }
    let bs = lun.geo.block_size as u64;
    let len = (n * bs) as usize;
    if data.len() < len {
        return ScsiResult::check(SENSE_INVALID_FIELD_CDB);
    }
    let op = VolumeOp::Write {
        offset: lba * bs,
        data: data[..len].into(),
        fua: cdb[1] & 0x08 != 0,
    };
    match submit_wait(&*lun.vol, op) {
        Ok(_) => ScsiResult::good(Vec::new()),
        Err(e) => ScsiResult::check(io_error_sense(e, true)),
    }
}

fn write_same(lun: &Lun, cdb: &[u8], data: &[u8]) -> ScsiResult {
    if let Err(s) = protect_check(cdb) {
        return ScsiResult::check(s);
    }
    let (lba, mut n) = if cdb[0] == 0x41 {
        (be32(cdb, 2) as u64, be16(cdb, 7) as u64)
    } else {
        (be64(cdb, 2), be32(cdb, 10) as u64)
    };
    let unmap = cdb[1] & 0x08 != 0;
    let anchor = cdb[1] & 0x10 != 0;
    let ndob = cdb[0] == 0x93 && cdb[1] & 0x01 != 0;
    if anchor {
        return ScsiResult::check(SENSE_INVALID_FIELD_CDB);
    }
    let geo = lun.geo;
    if lba > geo.num_blocks {
        return ScsiResult::check(SENSE_LBA_OUT_OF_RANGE);
    }
    if n == 0 {
        // WSNZ = 0: zero blocks means "to the end of the medium".
        n = geo.num_blocks - lba;
    }
    if let Err(s) = check_range(geo, lba, n) {
        return ScsiResult::check(s);
    }
    if n > MAX_WRITE_SAME_BLOCKS {
        return ScsiResult::check(SENSE_INVALID_FIELD_CDB);
    }
    let bs = geo.block_size as usize;
    let block: Vec<u8> = if ndob {
        vec![0; bs]
    } else {
        // Exactly one logical block of Data-Out.
        if data.len() != bs {
            return ScsiResult::check(SENSE_INVALID_FIELD_CDB);
        }
        data[..bs].to_vec()
    };
    let offset = lba * bs as u64;
    let len = n * bs as u64;
    if n == 0 {
        return ScsiResult::good(Vec::new());
    }
    let r = if block.iter().all(|&b| b == 0) {
        // Zeroed blocks (with or without UNMAP) become WRITE ZEROES so the
        // volume may deallocate them while reads still return zeros.
        let _ = unmap;
        submit_wait(&*lun.vol, VolumeOp::WriteZeroes { offset, len }).map(|_| ())
    } else {
        let per = (max_piece(lun) / bs as u64).max(1);
        let mut r = Ok(());
        let mut done_blocks = 0u64;
        while done_blocks < n && r.is_ok() {
            let k = (n - done_blocks).min(per);
            let buf = block.repeat(k as usize);
            r = submit_wait(
                &*lun.vol,
                VolumeOp::Write {
                    offset: offset + done_blocks * bs as u64,
                    data: buf.into(),
                    fua: false,
                },
            )
            .map(|_| ());
            done_blocks += k;
        }
        r
    };
    match r {
        Ok(()) => ScsiResult::good(Vec::new()),
        Err(e) => ScsiResult::check(io_error_sense(e, true)),
    }
}

fn unmap(lun: &Lun, cdb: &[u8], data: &[u8]) -> ScsiResult {
    if cdb[1] & 0x01 != 0 {
        // ANCHOR is not supported (ANC_SUP = 0).
        return ScsiResult::check(SENSE_INVALID_FIELD_CDB);
    }
    let plen = be16(cdb, 7) as usize;
    if plen == 0 {
        return ScsiResult::good(Vec::new());
    }
    if plen < 8 || data.len() < 8 {
        return ScsiResult::check(SENSE_PARAM_LIST_LENGTH);
    }
    let data = &data[..plen.min(data.len())];
    let bd_len = (be16(data, 2) as usize).min(data.len() - 8);
    let count = bd_len / 16;
    if count as u32 > MAX_UNMAP_DESCRIPTORS {
        return ScsiResult::check(SENSE_INVALID_FIELD_PARAM);
    }
    let mut ranges = Vec::new();
    for i in 0..count {
        let d = &data[8 + i * 16..8 + i * 16 + 16];
        let lba = be64(d, 0);
        let n = be32(d, 8);
        if n > MAX_UNMAP_BLOCKS {
            return ScsiResult::check(SENSE_INVALID_FIELD_PARAM);
        }
        if let Err(s) = check_range(lun.geo, lba, n as u64) {
            return ScsiResult::check(s);
        }
        if n > 0 {
            ranges.push((lba, n as u64));
        }
    }
    let bs = lun.geo.block_size as u64;
    for (lba, n) in ranges {
        if let Err(e) = submit_wait(
            &*lun.vol,
            VolumeOp::Discard {
                offset: lba * bs,
                len: n * bs,
            },
        ) {
            return ScsiResult::check(io_error_sense(e, true));
        }
    }
    ScsiResult::good(Vec::new())
}

fn get_lba_status(lun: &Lun, cdb: &[u8]) -> ScsiResult {
    let lba = be64(cdb, 2);
    let alloc = be32(cdb, 10) as usize;
    if lba >= lun.geo.num_blocks {
        return ScsiResult::check(SENSE_LBA_OUT_OF_RANGE);
    }
    // We do not track allocation: every block reads back as mapped.
    let n = (lun.geo.num_blocks - lba).min(0xffff_ffff) as u32;
    let mut d = vec![0u8; 24];
    d[0..4].copy_from_slice(&20u32.to_be_bytes());
    d[8..16].copy_from_slice(&lba.to_be_bytes());
    d[16..20].copy_from_slice(&n.to_be_bytes());
    d.truncate(alloc);
    ScsiResult::good(d)
}

fn read_capacity16(lun: &Lun, cdb: &[u8]) -> ScsiResult {
    let alloc = be32(cdb, 10) as usize;
    let mut d = vec![0u8; 32];
    d[0..8].copy_from_slice(&lun.geo.num_blocks.saturating_sub(1).to_be_bytes());
    d[8..12].copy_from_slice(&lun.geo.block_size.to_be_bytes());
    // LBPME: UNMAP and WRITE SAME are supported; LBPRZ stays 0 because a
    // discarded block's contents are up to the backend.
    d[13] = lbppbe(lun.geo.block_size);
    d[14] = 0x80;
    d.truncate(alloc);
    ScsiResult::good(d)
}

fn report_luns(cdb: &[u8]) -> ScsiResult {
    if cdb.len() < 12 {
        return ScsiResult::check(SENSE_INVALID_FIELD_CDB);
    }
    let sel = cdb[2];
    let alloc = be32(cdb, 6) as usize;
    if sel > 2 && !(0x10..=0x12).contains(&sel) {
        return ScsiResult::check(SENSE_INVALID_FIELD_CDB);
    }
    if alloc < 16 {
        return ScsiResult::check(SENSE_INVALID_FIELD_CDB);
    }
    let mut d = vec![0u8; 16];
    if sel == 1 || sel == 0x11 || sel == 0x12 {
        // Only the well-known / administrative LUNs: we have none.
        d.truncate(8);
    } else {
        d[3] = 8;
    }
    d.truncate(alloc);
    ScsiResult::good(d)
}

fn request_sense(lun: &Lun, nx: &Nexus, cdb: &[u8]) -> ScsiResult {
    let desc = cdb[1] & 0x01 != 0;
    let alloc = cdb[4] as usize;
    let s = lun.take_ua(nx).unwrap_or(Sense::new(KEY_NO_SENSE, 0, 0));
    let mut d = s.to_bytes(desc);
    d.truncate(alloc);
    ScsiResult::good(d)
}

fn reserve6(lun: &Lun, nx: &Nexus) -> ScsiResult {
    if lun.pr().has_registrations() {
        return ScsiResult::conflict();
    }
    let mut r = lun.reserve6.lock().unwrap();
    match *r {
        Some(h) if h != nx.id => ScsiResult::conflict(),
        _ => {
            *r = Some(nx.id);
            ScsiResult::good(Vec::new())
        }
    }
}

/// Reservation checks: SPC-2 RESERVE(6) and SPC-4 persistent reservations.
fn conflicts(lun: &Lun, nx: &Nexus, cdb: &[u8], class: Access) -> bool {
    let op = cdb[0];
    if let Some(h) = *lun.reserve6.lock().unwrap() {
        if h != nx.id {
            let allowed = matches!(op, 0x12 | 0xa0 | 0x03 | 0x17 | 0x57 | 0x25)
                || (op == 0x9e && cdb[1] & 0x1f == 0x10)
                || (op == 0xa3 && cdb[1] & 0x1f == 0x0a)
                || op == 0x5e;
            if !allowed {
                return true;
            }
        }
    }
    if class == Access::None {
        return false;
    }
    lun.pr().conflicts(&nx.port_name(), class)
}

fn inquiry(lun: &Lun, cdb: &[u8]) -> ScsiResult {
    let evpd = cdb[1] & 0x01 != 0;
    let page = cdb[2];
    let alloc = be16(cdb, 3) as usize;
    if cdb[1] & 0xfe != 0 {
        return ScsiResult::check(SENSE_INVALID_FIELD_CDB);
    }
    let mut d = if !evpd {
        if page != 0 {
            return ScsiResult::check(SENSE_INVALID_FIELD_CDB);
        }
        standard_inquiry(lun)
    } else {
        match crate::vpd::page(lun, page) {
            Some(d) => d,
            None => return ScsiResult::check(SENSE_INVALID_FIELD_CDB),
        }
    };
    d.truncate(alloc);
    ScsiResult::good(d)
}

fn pad_ascii(s: &str, n: usize) -> Vec<u8> {
    let mut v: Vec<u8> = s
        .bytes()
        .map(|b| if (0x20..0x7f).contains(&b) { b } else { b' ' })
        .take(n)
        .collect();
    v.resize(n, b' ');
    v
}

fn standard_inquiry(lun: &Lun) -> Vec<u8> {
    let mut d = vec![0u8; 96];
    d[0] = 0x00; // direct access block device
    d[2] = 0x06; // SPC-4
    d[3] = 0x12; // HISUP, response data format 2
    d[4] = (d.len() - 5) as u8;
    d[5] = 0x10 | 0x08; // TPGS = 01b: implicit ALUA; 3PC: EXTENDED COPY
    d[7] = 0x02; // CMDQUE
    d[8..16].copy_from_slice(&pad_ascii("DELTAMIR", 8));
    d[16..32].copy_from_slice(&pad_ascii(&lun.ident.model, 16));
    d[32..36].copy_from_slice(&pad_ascii("0001", 4));
    // Version descriptors: SAM-5, iSCSI, SPC-4, SBC-3.
    for (i, v) in [0x00a0u16, 0x0960, 0x0460, 0x04c0].iter().enumerate() {
        d[58 + i * 2..60 + i * 2].copy_from_slice(&v.to_be_bytes());
    }
    d
}

fn mode_sense(lun: &Lun, cdb: &[u8]) -> ScsiResult {
    let ten = cdb[0] == 0x5a;
    let dbd = cdb[1] & 0x08 != 0;
    let pc = cdb[2] >> 6;
    let page = cdb[2] & 0x3f;
    let sub = cdb[3];
    let alloc = if ten {
        be16(cdb, 7) as usize
    } else {
        cdb[4] as usize
    };
    if pc == 3 {
        return ScsiResult::check(SENSE_SAVING_NOT_SUPPORTED);
    }
    if sub != 0 && sub != 0xff {
        return ScsiResult::check(SENSE_INVALID_FIELD_CDB);
    }
    let changeable = pc == 1;
    let caching = || {
        let mut p = vec![0u8; 20];
        p[0] = 0x08;
        p[1] = 0x12;
        if !changeable {
            p[2] = 0x04; // WCE: hosts must send SYNCHRONIZE CACHE for durability
        }
        p
    };
    let control = || {
        let mut p = vec![0u8; 12];
        p[0] = 0x0a;
        p[1] = 0x0a;
        if !changeable {
            p[2] = 0x00; // TST 0, D_SENSE 0
            p[3] = 0x10; // unrestricted reordering, QERR 0
            p[8] = 0xff;
            p[9] = 0xff; // busy timeout period: unlimited
        }
        p
    };
    let iec = || {
        let mut p = vec![0u8; 12];
        p[0] = 0x1c;
        p[1] = 0x0a;
        p
    };
    let mut pages = Vec::new();
    match page {
        0x08 => pages.extend(caching()),
        0x0a => pages.extend(control()),
        0x1c => pages.extend(iec()),
        0x3f => {
            pages.extend(caching());
            pages.extend(control());
            pages.extend(iec());
        }
        _ => return ScsiResult::check(SENSE_INVALID_FIELD_CDB),
    }
    let mut blockdesc = Vec::new();
    if !dbd {
        blockdesc = vec![0u8; 8];
        let n = lun.geo.num_blocks.min(0xffff_ffff) as u32;
        blockdesc[0..4].copy_from_slice(&n.to_be_bytes());
        blockdesc[5..8].copy_from_slice(&lun.geo.block_size.to_be_bytes()[1..4]);
    }
    let devspec = 0x10; // DPOFUA, not write protected
    let mut d = if ten {
        let mut h = vec![0u8; 8];
        h[3] = devspec;
        h[7] = blockdesc.len() as u8;
        h
    } else {
        vec![0, 0, devspec, blockdesc.len() as u8]
    };
    d.extend(blockdesc);
    d.extend(pages);
    if ten {
        let l = (d.len() - 2) as u16;
        d[0..2].copy_from_slice(&l.to_be_bytes());
    } else {
        d[0] = (d.len() - 1) as u8;
    }
    d.truncate(alloc);
    ScsiResult::good(d)
}

fn read_defect_data(cdb: &[u8]) -> ScsiResult {
    let fmt = cdb[2] & 0x1f;
    if cdb[0] == 0x37 {
        let alloc = be16(cdb, 7) as usize;
        let mut d = vec![0, fmt & 0x1f, 0, 0];
        d.truncate(alloc);
        ScsiResult::good(d)
    } else {
        let alloc = be32(cdb, 6) as usize;
        let mut d = vec![0, fmt & 0x1f, 0, 0, 0, 0, 0, 0];
        d.truncate(alloc);
        ScsiResult::good(d)
    }
}

/// REPORT TARGET PORT GROUPS: our group from the volume's path state, the
/// peer's group in the opposite state.
fn report_tpgs(lun: &Lun, cdb: &[u8]) -> ScsiResult {
    let alloc = be32(cdb, 6) as usize;
    let ext = (cdb[1] >> 5) == 1;
    let ours = lun.ident.node_index;
    let other = if ours == 1 { 2 } else { 1 };
    let ours_opt = !lun.standby();
    let mut body = Vec::new();
    let mut groups = [(ours, ours_opt), (other, !ours_opt)];
    groups.sort_by_key(|g| g.0);
    for (id, opt) in groups {
        let state = if opt { 0x00 } else { 0x02 };
        body.extend_from_slice(&[
            if opt { 0x80 | state } else { state },
            0x05, // S_SUP | AO_SUP
        ]);
        body.extend_from_slice(&id.to_be_bytes());
        body.extend_from_slice(&[0, 0x02, 0, 1]); // status: implicit change; one port
        body.extend_from_slice(&[0, 0]);
        body.extend_from_slice(&id.to_be_bytes());
    }
    let mut d = Vec::new();
    if ext {
        d.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        d.extend_from_slice(&[0x10, 10, 0, 0]);
    } else {
        d.extend_from_slice(&(body.len() as u32).to_be_bytes());
    }
    d.extend(body);
    d.truncate(alloc);
    ScsiResult::good(d)
}
