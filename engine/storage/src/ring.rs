//! The persistent ring: a memory-mapped file holding a node's delay buffer
//! and delta queue as one gap-free sequence of records.
//!
//! The byte format and the recovery rules are specified in
//! `docs/ring-format.md`; this module is the reference implementation. In
//! short: a 4 KiB header block holds the cursors; records (64-byte header +
//! payload, padded to 64 bytes) follow in a circular data area; a record never
//! straddles the end of the area (a wrap marker sends readers back to the
//! start). Positions are *logical* byte counts that only grow; the physical
//! offset in the data area is `pos % capacity`.
//!
//! Writes: the file is opened with O_DIRECT (where the filesystem refuses
//! it, e.g. tmpfs before Linux 6.6, the ring logs so and writes through the page cache).
//! Appends are built in place in a block-aligned staging area; nothing
//! reaches the file until [`Ring::prepare_sync`], which writes everything
//! appended since the previous one as one contiguous write (two where the
//! records wrap around the end of the data area), from the block that holds
//! the first new byte to the block that holds the last. It then writes the
//! header block and returns the highest seq a following `fdatasync(fd())`
//! makes durable; the caller issues that fdatasync (through the backend) and
//! reports its completion with [`Ring::sync_completed`]: one flush per batch
//! of appends, whatever the batch size (group commit). The staging area
//! keeps the most recent records (up to [`STAGE_BYTES`]), so sending and
//! executing them reads memory; older records are read through a read-only
//! mapping of the file. Until then the ring does not
//! reuse trimmed space, so a crash can never leave the on-disk header
//! pointing at records that were overwritten. [`Ring::truncate_after`] and
//! [`Ring::reset`] are rare (start-up, handshake, failover) and make
//! themselves durable before returning.
//!
//! Memory: the index of record offsets is the only heap structure (4 bytes
//! per retained record, at most `capacity_bytes / 16` bytes).

use crate::backend::AlignedBuf;
use memmap2::Mmap;
use std::collections::VecDeque;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::io::RawFd;
use std::path::{Path, PathBuf};

/// Size of the header block that precedes the data area.
pub const RING_HEADER_BYTES: u64 = 4096;
/// Records and wrap markers start on multiples of this.
pub const RECORD_ALIGN_BYTES: u64 = 64;
/// Size of a record header (and of a wrap marker).
pub const RECORD_HEADER_BYTES: u64 = 64;
/// Largest data area: record offsets are kept as `u32` multiples of 64.
pub const MAX_CAPACITY_BYTES: u64 = (u32::MAX as u64 + 1) * RECORD_ALIGN_BYTES;
/// Format version written by this code.
pub const RING_VERSION: u32 = 1;
/// Unit of every write to the ring file: writes start and end on multiples
/// of this (O_DIRECT), and appends never use the last partial block before
/// space that is still retained, so a write never covers a retained record
/// it does not rewrite with the same bytes.
pub const RING_BLOCK_BYTES: u64 = 4096;
/// Size of the staging area appends are built in (larger when one record
/// needs it). It is also the window of recent records read from memory.
pub const STAGE_BYTES: u64 = 8 << 20;
/// When the staging area is full, the most recent bytes it held (at most
/// this many) stay in it, so records appended just before are still read
/// from memory.
const STAGE_KEEP_BYTES: u64 = 1 << 20;

const RING_MAGIC: &[u8; 8] = b"DMIRRING";
const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"DMRC");
const WRAP_MAGIC: u32 = u32::from_le_bytes(*b"DMWR");
/// Prepared-but-unconfirmed syncs remembered; older ones are forgotten, which
/// only delays the reuse of trimmed space.
const MAX_PENDING_SYNCS: usize = 16;

// Header field offsets (see docs/ring-format.md).
const H_MAGIC: usize = 0;
const H_VERSION: usize = 8;
const H_HEADER_BYTES: usize = 12;
const H_CAPACITY: usize = 16;
const H_EPOCH: usize = 24;
const H_EPOCH_FIRST_SEQ: usize = 32;
const H_TAIL_POS: usize = 40;
const H_FIRST_SEQ: usize = 48;
const H_HEAD_POS: usize = 56;
const H_NEXT_SEQ: usize = 64;
const H_SYNCED_SEQ: usize = 72;
const H_SYNC_COUNT: usize = 80;
const H_CRC: usize = 120;

// Record header field offsets.
const R_MAGIC: usize = 0;
const R_KIND: usize = 4;
const R_FLAGS: usize = 5;
const R_SEQ: usize = 8;
const R_GEN: usize = 16;
const R_OFFSET: usize = 24;
const R_LEN: usize = 32;
const R_EPOCH: usize = 40;
const R_PAYLOAD_LEN: usize = 48;
const R_CRC: usize = 60;

/// The engine's description of a record; `kind` and `flags` are opaque to
/// the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub seq: u64,
    pub gen: u64,
    pub kind: u8,
    pub flags: u8,
    pub offset: u64,
    pub len: u64,
}

/// What [`Ring::open`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recovery {
    /// Records retained.
    pub records: u64,
    /// Bytes cut off at the end: from the end of the last valid record to the
    /// furthest point that the header or a partly written record claimed.
    pub torn_tail_bytes: u64,
    pub first_seq: u64,
    pub next_seq: u64,
}

#[derive(Debug)]
pub enum RingError {
    Io(io::Error),
    BadMagic {
        path: PathBuf,
    },
    BadVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    /// Damage that a crash cannot explain: reported, never truncated away.
    /// `offset` is the byte offset in the file.
    Corrupt {
        offset: u64,
        seq_expected: u64,
        detail: String,
    },
}

impl fmt::Display for RingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RingError::Io(e) => write!(
                f,
                "ring file I/O error: {e}; check the ring path, its permissions and free space"
            ),
            RingError::BadMagic { path } => write!(
                f,
                "{} is not a deltamirror ring (bad magic); check the configured ring path. \
                 Creating a new ring there would lose this node's delta queue",
                path.display()
            ),
            RingError::BadVersion {
                path,
                found,
                supported,
            } => write!(
                f,
                "{} has ring format version {found}, this build reads version {supported}; \
                 run a deltamirror build that supports version {found}",
                path.display()
            ),
            RingError::Corrupt {
                offset,
                seq_expected,
                detail,
            } => write!(
                f,
                "ring corrupt at file offset {offset} (expected record seq {seq_expected}): \
                 {detail}. Durable records are damaged, so the ring cannot be trusted: keep the \
                 file for diagnosis, check the disk (SMART, dmesg), and resynchronise this node \
                 from its peer"
            ),
        }
    }
}

impl std::error::Error for RingError {}

impl From<io::Error> for RingError {
    fn from(e: io::Error) -> RingError {
        RingError::Io(e)
    }
}

/// The record does not fit in the free space (or can never fit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingFull;

impl fmt::Display for RingFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ring full")
    }
}

impl std::error::Error for RingFull {}

#[derive(Clone, Copy, Debug)]
struct PendingSync {
    seq: u64,
    tail_pos: u64,
}

pub struct Ring {
    path: PathBuf,
    file: File,
    /// Whether `file` was opened with O_DIRECT.
    direct: bool,
    /// Read-only view of the file, for records no longer in the staging
    /// area (see [`Ring::bytes_at`]).
    map: Mmap,
    /// Records are built here and written from here (see [`Ring::write_out`]).
    /// Byte `i` is logical position `stage_start + i`; the bytes before
    /// `stage_end` are exactly what the ring holds (or will hold) there.
    stage: AlignedBuf,
    /// Block-aligned logical position of `stage[0]`. The staged range never
    /// spans the end of the data area.
    stage_start: u64,
    /// End of the bytes built in the stage (the head, or the end of a wrap
    /// marker that precedes the head).
    stage_end: u64,
    /// Every staged byte before this logical position has been written to
    /// the file.
    written_pos: u64,
    /// The header block, built here for its write.
    header_buf: AlignedBuf,
    /// The first failed write or fdatasync, if any: the ring's state is
    /// unknown from then on.
    write_error: Option<String>,
    capacity: u64,
    epoch: u64,
    /// First seq appended in the current epoch; records with a lower seq
    /// belong to earlier epochs.
    epoch_first_seq: u64,
    /// Logical position of the record `first_seq` (== head_pos when empty).
    tail_pos: u64,
    head_pos: u64,
    first_seq: u64,
    next_seq: u64,
    /// Highest seq known durable (an fdatasync after it completed).
    durable_seq: u64,
    /// Appends never write at or beyond `reclaim_pos + capacity`: the tail
    /// that a durable header holds.
    reclaim_pos: u64,
    /// Physical offset / 64 of each retained record, `first_seq` first.
    index: VecDeque<u32>,
    payload_bytes: u64,
    pending: VecDeque<PendingSync>,
    sync_count: u64,
}

/// Overwrite the first `len` bytes of `file` with zeroes and make them durable.
fn write_zeroes(file: &File, len: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let chunk = AlignedBuf::new(1 << 20);
    let chunk = chunk.as_slice();
    let mut at = 0;
    while at < len {
        let n = chunk.len().min((len - at) as usize);
        file.write_all_at(&chunk[..n], at)?;
        at += n as u64;
    }
    file.sync_data()
}

fn rd_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn rd_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

fn wr_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn wr_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Bytes a record with `payload_len` bytes of payload occupies.
pub fn record_size(payload_len: usize) -> u64 {
    (RECORD_HEADER_BYTES + payload_len as u64).next_multiple_of(RECORD_ALIGN_BYTES)
}

fn record_crc(hdr: &[u8], payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&hdr[..R_CRC]), payload)
}

/// A record or wrap marker as read from the data area.
struct RawRecord {
    magic: u32,
    seq: u64,
    epoch: u64,
    payload_len: u64,
}

fn round_down(pos: u64) -> u64 {
    pos / RING_BLOCK_BYTES * RING_BLOCK_BYTES
}

fn round_up(pos: u64) -> u64 {
    pos.next_multiple_of(RING_BLOCK_BYTES)
}

/// Open the ring file for reading and writing, with O_DIRECT where the
/// filesystem allows it. Returns the file and whether O_DIRECT is on.
fn open_file(path: &Path, create: bool) -> io::Result<(File, bool)> {
    use std::os::unix::fs::OpenOptionsExt;
    let open = |flags: i32| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(create)
            .custom_flags(flags)
            .open(path)
    };
    match open(libc::O_DIRECT) {
        Ok(f) => Ok((f, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            log::warn!(
                "{}: the filesystem refuses O_DIRECT ({e}); the ring is written through \
                 the page cache (slower flushes; put ring.path on a disk filesystem)",
                path.display()
            );
            open(0).map(|f| (f, false))
        }
        Err(e) => Err(e),
    }
}

fn corrupt(offset: u64, seq_expected: u64, detail: String) -> RingError {
    RingError::Corrupt {
        offset,
        seq_expected,
        detail,
    }
}

impl Ring {
    /// Create (or overwrite) the ring file at `path` with a data area of
    /// `capacity_bytes` (a multiple of 4096, at most [`MAX_CAPACITY_BYTES`]);
    /// the first record appended must carry `first_seq` (>= 1). The file is
    /// preallocated so that page faults on the mapping never hit ENOSPC.
    pub fn create(path: &Path, capacity_bytes: u64, first_seq: u64) -> Result<Ring, RingError> {
        if capacity_bytes == 0
            || !capacity_bytes.is_multiple_of(4096)
            || capacity_bytes > MAX_CAPACITY_BYTES
        {
            return Err(RingError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: ring capacity {capacity_bytes} must be a non-zero multiple of 4096 \
                     and at most {MAX_CAPACITY_BYTES}",
                    path.display()
                ),
            )));
        }
        assert!(first_seq >= 1, "seqs start at 1");
        let (file, direct) = open_file(path, true).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("{}: cannot create ring: {e}", path.display()),
            )
        })?;
        let file_len = RING_HEADER_BYTES + capacity_bytes;
        // SAFETY: fallocate takes no memory arguments; the result is checked.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, file_len as libc::off_t) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                return Err(RingError::Io(io::Error::new(
                    e.kind(),
                    format!(
                        "{}: cannot allocate {file_len} bytes for the ring: {e}",
                        path.display()
                    ),
                )));
            }
            file.set_len(file_len)?;
        }
        // Write every block once. Blocks that fallocate left "unwritten" make
        // each first write a metadata change (extent conversion), which turns
        // every ring fdatasync into a journal commit: 3-5x slower here.
        write_zeroes(&file, file_len).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("{}: cannot write the ring's blocks: {e}", path.display()),
            )
        })?;
        let map = Self::map(&file)?;
        let mut ring = Ring {
            path: path.to_path_buf(),
            file,
            direct,
            map,
            stage: AlignedBuf::new(Self::stage_len(capacity_bytes)),
            stage_start: 0,
            stage_end: 0,
            written_pos: 0,
            header_buf: AlignedBuf::new(RING_HEADER_BYTES as usize),
            write_error: None,
            capacity: capacity_bytes,
            epoch: 1,
            epoch_first_seq: first_seq,
            tail_pos: 0,
            head_pos: 0,
            first_seq,
            next_seq: first_seq,
            durable_seq: first_seq - 1,
            reclaim_pos: 0,
            index: VecDeque::new(),
            payload_bytes: 0,
            pending: VecDeque::with_capacity(MAX_PENDING_SYNCS),
            sync_count: 0,
        };
        ring.sync_header()?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Make the new directory entry durable too.
            File::open(dir)?.sync_all()?;
        }
        Ok(ring)
    }

    fn map(file: &File) -> io::Result<Mmap> {
        // SAFETY: the mapping is MAP_SHARED over a file this process opened
        // read/write and owns for the ring's lifetime; deltamirror never
        // resizes it, and other processes must not modify a ring in use (the
        // same rule as for any database file).
        // The mapping is read-only: records go in with (O_DIRECT) pwrite from
        // the staging area, and the kernel drops cached pages of a range an
        // O_DIRECT write covered, so reads through the mapping see the file.
        unsafe { memmap2::MmapOptions::new().map(file) }
    }

    /// Staging area size for a ring of `capacity` bytes: room for any record
    /// plus the block before it, up to [`STAGE_BYTES`].
    fn stage_len(capacity: u64) -> usize {
        (capacity.min(STAGE_BYTES) + RING_BLOCK_BYTES) as usize
    }

    /// Whether the ring file is written with O_DIRECT.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Open an existing ring, validate every retained record and recover its
    /// state. A torn tail (damage after the last durable record) is cut off
    /// and reported in [`Recovery`]; damage before it is `Err(Corrupt)`.
    /// On success the recovered state is made durable before returning.
    pub fn open(path: &Path) -> Result<(Ring, Recovery), RingError> {
        let shown = path.display();
        let (file, direct) = open_file(path, false)
            .map_err(|e| io::Error::new(e.kind(), format!("{shown}: cannot open ring: {e}")))?;
        let file_len = file.metadata()?.len();
        if file_len < 16 {
            return Err(RingError::BadMagic {
                path: path.to_path_buf(),
            });
        }
        let map = Self::map(&file)?;
        let h = &map[..];
        if &h[H_MAGIC..H_MAGIC + 8] != RING_MAGIC {
            return Err(RingError::BadMagic {
                path: path.to_path_buf(),
            });
        }
        let version = rd_u32(h, H_VERSION);
        if version != RING_VERSION {
            return Err(RingError::BadVersion {
                path: path.to_path_buf(),
                found: version,
                supported: RING_VERSION,
            });
        }
        let header_corrupt = |detail: String| corrupt(0, 0, format!("{shown}: header: {detail}"));
        if file_len < RING_HEADER_BYTES + 4096 {
            return Err(header_corrupt(format!("file is only {file_len} bytes")));
        }
        if crc32c::crc32c(&h[..H_CRC]) != rd_u32(h, H_CRC) {
            return Err(header_corrupt("checksum mismatch".into()));
        }
        let capacity = rd_u64(h, H_CAPACITY);
        let epoch = rd_u64(h, H_EPOCH);
        let epoch_first_seq = rd_u64(h, H_EPOCH_FIRST_SEQ);
        let tail_pos = rd_u64(h, H_TAIL_POS);
        let first_seq = rd_u64(h, H_FIRST_SEQ);
        let head_pos = rd_u64(h, H_HEAD_POS);
        let next_seq = rd_u64(h, H_NEXT_SEQ);
        let synced_seq = rd_u64(h, H_SYNCED_SEQ);
        let sync_count = rd_u64(h, H_SYNC_COUNT);
        let sane = u64::from(rd_u32(h, H_HEADER_BYTES)) == RING_HEADER_BYTES
            && capacity == file_len - RING_HEADER_BYTES
            && capacity.is_multiple_of(4096)
            && capacity <= MAX_CAPACITY_BYTES
            && tail_pos <= head_pos
            && head_pos - tail_pos <= capacity
            && tail_pos.is_multiple_of(RECORD_ALIGN_BYTES)
            && first_seq >= 1
            && first_seq <= next_seq
            && synced_seq < next_seq
            && epoch_first_seq <= next_seq;
        if !sane {
            return Err(header_corrupt(format!(
                "inconsistent cursors (capacity {capacity}, file {file_len} bytes, tail {tail_pos}/\
                 seq {first_seq}, head {head_pos}/seq {next_seq}, synced seq {synced_seq})"
            )));
        }

        let mut ring = Ring {
            path: path.to_path_buf(),
            file,
            direct,
            map,
            stage: AlignedBuf::new(Self::stage_len(capacity)),
            stage_start: 0,
            stage_end: 0,
            written_pos: 0,
            header_buf: AlignedBuf::new(RING_HEADER_BYTES as usize),
            write_error: None,
            capacity,
            epoch,
            epoch_first_seq,
            tail_pos,
            head_pos: tail_pos,
            first_seq,
            next_seq: first_seq,
            durable_seq: 0,
            reclaim_pos: tail_pos,
            index: VecDeque::new(),
            payload_bytes: 0,
            pending: VecDeque::with_capacity(MAX_PENDING_SYNCS),
            sync_count,
        };
        let torn_tail_bytes = ring.scan(head_pos, synced_seq)?;
        if torn_tail_bytes > 0 {
            log::warn!(
                "{shown}: torn tail cut off at seq {} ({torn_tail_bytes} bytes); \
                 those records were never durable",
                ring.next_seq
            );
        }
        // Appends continue in the block that holds the head: stage what the
        // file holds before the head in that block.
        ring.restage_at(ring.head_pos);
        // A new epoch makes every record left beyond the recovered head (the
        // torn tail, older laps) invalid for good, even if a later crash
        // leaves a new record of the same length in front of it.
        ring.epoch += 1;
        ring.epoch_first_seq = ring.next_seq;
        ring.sync_header()?;
        let recovery = Recovery {
            records: ring.len(),
            torn_tail_bytes,
            first_seq: ring.first_seq,
            next_seq: ring.next_seq,
        };
        Ok((ring, recovery))
    }

    fn read_raw(&self, phys: u64) -> RawRecord {
        let at = (RING_HEADER_BYTES + phys) as usize;
        let b = &self.map[at..at + RECORD_HEADER_BYTES as usize];
        RawRecord {
            magic: rd_u32(b, R_MAGIC),
            seq: rd_u64(b, R_SEQ),
            epoch: rd_u64(b, R_EPOCH),
            payload_len: u64::from(rd_u32(b, R_PAYLOAD_LEN)),
        }
    }

    /// Whether a record or marker carrying `seq` and `epoch` may belong to
    /// the current chain (see "Epochs" in docs/ring-format.md).
    fn epoch_ok(&self, seq: u64, epoch: u64) -> bool {
        if seq >= self.epoch_first_seq {
            epoch == self.epoch
        } else {
            epoch < self.epoch
        }
    }

    /// Why the record or marker at `phys` is not the expected `seq`, or
    /// `None` if it is valid.
    fn check_at(&self, phys: u64, seq: u64) -> Option<String> {
        let raw = self.read_raw(phys);
        let at = (RING_HEADER_BYTES + phys) as usize;
        let hdr = &self.map[at..at + RECORD_HEADER_BYTES as usize];
        let payload_len = match raw.magic {
            RECORD_MAGIC => raw.payload_len,
            WRAP_MAGIC => 0,
            m => return Some(format!("no record here (magic {m:#010x})")),
        };
        if raw.magic == RECORD_MAGIC && phys + record_size(payload_len as usize) > self.capacity {
            return Some(format!(
                "payload length {payload_len} runs past the end of the data area"
            ));
        }
        let payload = &self.map[at + RECORD_HEADER_BYTES as usize
            ..at + RECORD_HEADER_BYTES as usize + payload_len as usize];
        if record_crc(hdr, payload) != rd_u32(hdr, R_CRC) {
            return Some("checksum mismatch".into());
        }
        if raw.seq != seq {
            return Some(format!("found seq {} instead", raw.seq));
        }
        if !self.epoch_ok(raw.seq, raw.epoch) {
            return Some(format!(
                "stale record of epoch {} (ring epoch {}, epoch starts at seq {})",
                raw.epoch, self.epoch, self.epoch_first_seq
            ));
        }
        None
    }

    /// Rebuild the index from `tail_pos`. Returns the torn-tail byte count,
    /// or `Err(Corrupt)` for a bad record at or before `synced_seq`.
    fn scan(&mut self, header_head_pos: u64, synced_seq: u64) -> Result<u64, RingError> {
        let mut pos = self.tail_pos;
        let limit = self.tail_pos + self.capacity;
        loop {
            let phys = pos % self.capacity;
            let seq = self.next_seq;
            if pos + RECORD_HEADER_BYTES > limit {
                break;
            }
            if let Some(why) = self.check_at(phys, seq) {
                if seq <= synced_seq {
                    return Err(corrupt(
                        RING_HEADER_BYTES + phys,
                        seq,
                        format!(
                            "{}: {why}; the header says every record up to seq {synced_seq} \
                             was durable",
                            self.path.display()
                        ),
                    ));
                }
                let raw = self.read_raw(phys);
                let mut claimed_end = header_head_pos;
                // A record that carries the expected seq but fails its
                // checksum is the partly written one; stale records of older
                // laps or epochs are not part of the torn tail.
                if raw.magic == RECORD_MAGIC && raw.seq == seq && raw.epoch == self.epoch {
                    let end = pos + record_size(raw.payload_len as usize);
                    if end <= limit {
                        claimed_end = claimed_end.max(end);
                    }
                }
                return Ok(claimed_end.saturating_sub(pos));
            }
            let raw = self.read_raw(phys);
            if raw.magic == WRAP_MAGIC {
                pos += self.capacity - phys;
                continue;
            }
            let size = record_size(raw.payload_len as usize);
            if pos + size > limit {
                break;
            }
            if self.index.is_empty() {
                self.tail_pos = pos;
            }
            self.index.push_back((phys / RECORD_ALIGN_BYTES) as u32);
            self.payload_bytes += raw.payload_len;
            self.next_seq += 1;
            pos += size;
            self.head_pos = pos;
        }
        Ok(0)
    }

    /// Write the cursors into the header block (durable with the next
    /// fdatasync).
    fn store_header(&mut self) {
        self.sync_count += 1;
        let mut hb = std::mem::replace(&mut self.header_buf, AlignedBuf::new(0));
        let h = hb.as_mut_slice();
        h.fill(0);
        h[H_MAGIC..H_MAGIC + 8].copy_from_slice(RING_MAGIC);
        wr_u32(h, H_VERSION, RING_VERSION);
        wr_u32(h, H_HEADER_BYTES, RING_HEADER_BYTES as u32);
        wr_u64(h, H_CAPACITY, self.capacity);
        wr_u64(h, H_EPOCH, self.epoch);
        wr_u64(h, H_EPOCH_FIRST_SEQ, self.epoch_first_seq);
        wr_u64(h, H_TAIL_POS, self.tail_pos);
        wr_u64(h, H_FIRST_SEQ, self.first_seq);
        wr_u64(h, H_HEAD_POS, self.head_pos);
        wr_u64(h, H_NEXT_SEQ, self.next_seq);
        // Truncate and reset store the header before durable_seq is lowered.
        let synced = self
            .durable_seq
            .min(self.next_seq - 1)
            .max(self.first_seq - 1);
        wr_u64(h, H_SYNCED_SEQ, synced);
        wr_u64(h, H_SYNC_COUNT, self.sync_count);
        let crc = crc32c::crc32c(&h[..H_CRC]);
        wr_u32(h, H_CRC, crc);
        self.write_at(0, hb.as_slice());
        self.header_buf = hb;
    }

    /// One pwrite of whole blocks (O_DIRECT: it reaches the device before
    /// returning; the next fdatasync makes it durable). A failure is kept
    /// and reported by [`Ring::write_error`]: the node must stop, since the
    /// ring no longer holds what it was told to.
    fn write_at(&mut self, at: u64, bytes: &[u8]) {
        use std::os::unix::fs::FileExt;
        if let Err(e) = self.file.write_all_at(bytes, at) {
            if self.write_error.is_none() {
                self.write_error = Some(format!(
                    "{}: write of {} bytes at offset {at} failed: {e}",
                    self.path.display(),
                    bytes.len()
                ));
            }
        }
    }

    /// The first failed ring write or fdatasync, if any: from then on the
    /// ring's on-disk state is unknown and the node must stop.
    pub fn write_error(&self) -> Option<&str> {
        self.write_error.as_deref()
    }

    /// Write the staged bytes not yet in the file: one write from the block
    /// that holds the first of them to the block that holds the last. The
    /// rest of that last block is zero in the stage; it is free space in the
    /// file (appends never use a block that also holds retained records of
    /// an earlier lap, see [`Ring::placement`]).
    fn write_out(&mut self) {
        if self.stage_end <= self.written_pos {
            return;
        }
        let from = round_down(self.written_pos);
        let to = round_up(self.stage_end);
        let base = self.stage_start;
        let end_in_stage = (self.stage_end - base) as usize;
        let to_in_stage = (to - base) as usize;
        self.stage.as_mut_slice()[end_in_stage..to_in_stage].fill(0);
        let stage = std::mem::replace(&mut self.stage, AlignedBuf::new(0));
        let at = RING_HEADER_BYTES + from % self.capacity;
        self.write_at(at, &stage.as_slice()[(from - base) as usize..to_in_stage]);
        self.stage = stage;
        self.written_pos = self.stage_end;
    }

    /// Start the staging area afresh at the block that holds logical
    /// position `pos` (the head), with the bytes the ring holds before `pos`
    /// in that block: from the current stage if it has them, else from the
    /// file. Everything staged before must already be written.
    fn restage_at(&mut self, pos: u64) {
        debug_assert!(self.written_pos >= self.stage_end || self.stage_end == 0);
        let start = round_down(pos);
        let keep = (pos - start) as usize;
        if keep > 0 {
            if start >= self.stage_start && pos <= self.stage_end {
                let from = (start - self.stage_start) as usize;
                self.stage.as_mut_slice().copy_within(from..from + keep, 0);
            } else {
                let at = (RING_HEADER_BYTES + start % self.capacity) as usize;
                let (map, stage) = (&self.map, &mut self.stage);
                stage.as_mut_slice()[..keep].copy_from_slice(&map[at..at + keep]);
            }
        }
        self.stage_start = start;
        self.stage_end = pos;
        self.written_pos = pos;
    }

    /// Make the stage hold `size` bytes at logical position `pos` (>= the
    /// stage end): when they would run past the stage or the end of the
    /// data area, write out what is staged and start the stage again,
    /// keeping the most recent bytes (up to [`STAGE_KEEP_BYTES`]) of the
    /// same lap for reads.
    fn stage_room(&mut self, pos: u64, size: u64) {
        let same_lap = pos / self.capacity == self.stage_start / self.capacity
            && (pos + size - 1) / self.capacity == self.stage_start / self.capacity;
        if same_lap && pos + size - self.stage_start <= self.stage.len() as u64 {
            return;
        }
        self.write_out();
        let stage_len = self.stage.len() as u64;
        if same_lap {
            // Keep the recent bytes before `pos`, whole blocks from the block
            // that holds `pos` back.
            let room = stage_len.saturating_sub(size + RING_BLOCK_BYTES);
            let keep_from =
                round_down(pos.saturating_sub(STAGE_KEEP_BYTES.min(room))).max(self.stage_start);
            let from = (keep_from - self.stage_start) as usize;
            let to = (pos - self.stage_start) as usize;
            self.stage.as_mut_slice().copy_within(from..to, 0);
            self.stage_start = keep_from;
        } else {
            self.stage_start = round_down(pos);
            let keep = (pos - self.stage_start) as usize;
            if keep > 0 {
                // Not reached: a new lap starts at a block boundary.
                let at = (RING_HEADER_BYTES + self.stage_start % self.capacity) as usize;
                let (map, stage) = (&self.map, &mut self.stage);
                stage.as_mut_slice()[..keep].copy_from_slice(&map[at..at + keep]);
            }
        }
        self.stage_end = pos;
        self.written_pos = pos;
        let need = pos + size - self.stage_start;
        if need > self.stage.len() as u64 {
            // One record larger than the stage: grow it (kept for later).
            let mut bigger = AlignedBuf::new(round_up(need) as usize);
            let keep = (pos - self.stage_start) as usize;
            bigger.as_mut_slice()[..keep].copy_from_slice(&self.stage.as_slice()[..keep]);
            self.stage = bigger;
        }
    }

    /// Write what is staged and the header, and fdatasync now; everything
    /// is durable afterwards.
    fn sync_header(&mut self) -> io::Result<()> {
        self.write_out();
        self.store_header();
        if let Some(e) = &self.write_error {
            return Err(io::Error::other(e.clone()));
        }
        self.file.sync_data()?;
        self.pending.clear();
        self.durable_seq = self.next_seq - 1;
        self.reclaim_pos = self.tail_pos;
        Ok(())
    }

    /// `sync_header`, for the operations whose signature has no error path:
    /// if the ring cannot be made durable its on-disk state is unknown. The
    /// error is kept for [`Ring::write_error`], and the node must stop rather
    /// than guess (a restart recovers from what is on disk).
    fn sync_header_or_fail(&mut self, what: &str) {
        if let Err(e) = self.sync_header() {
            if self.write_error.is_none() {
                self.write_error = Some(format!(
                    "{}: fdatasync after {what} failed: {e}; the ring's on-disk state is \
                     unknown, restart the node so it recovers from the ring",
                    self.path.display()
                ));
            }
        }
    }

    /// Where a record of `size` bytes would go: (logical write position,
    /// bytes consumed including a skipped end of the area), or `None`.
    /// Appends stop at the block boundary at or before the oldest byte a
    /// durable header may still hold, so the block-sized writes never touch
    /// a retained record they do not hold in the stage.
    fn placement(&self, size: u64) -> Option<(u64, u64)> {
        let phys = self.head_pos % self.capacity;
        let room_to_end = self.capacity - phys;
        let (write_pos, need) = if size <= room_to_end {
            (self.head_pos, size)
        } else {
            (self.head_pos + room_to_end, room_to_end + size)
        };
        let limit = round_down(self.reclaim_pos + self.capacity);
        (size <= self.capacity && self.head_pos + need <= limit).then_some((write_pos, need))
    }

    /// Build a record (or wrap marker) at logical position `pos` in the stage.
    fn put_chunk(&mut self, pos: u64, magic: u32, h: &RecordHeader, payload: &[u8]) {
        let size = record_size(payload.len());
        self.stage_room(pos, size);
        let epoch = self.epoch;
        let at = (pos - self.stage_start) as usize;
        let rec = &mut self.stage.as_mut_slice()[at..at + size as usize];
        let hl = RECORD_HEADER_BYTES as usize;
        rec[..hl].fill(0);
        wr_u32(rec, R_MAGIC, magic);
        rec[R_KIND] = h.kind;
        rec[R_FLAGS] = h.flags;
        wr_u64(rec, R_SEQ, h.seq);
        wr_u64(rec, R_GEN, h.gen);
        wr_u64(rec, R_OFFSET, h.offset);
        wr_u64(rec, R_LEN, h.len);
        wr_u64(rec, R_EPOCH, epoch);
        wr_u32(rec, R_PAYLOAD_LEN, payload.len() as u32);
        rec[hl..hl + payload.len()].copy_from_slice(payload);
        rec[hl + payload.len()..].fill(0);
        let crc = record_crc(&rec[..hl], payload);
        wr_u32(rec, R_CRC, crc);
        self.stage_end = pos + size;
    }

    /// Append a record; `h.seq` must be [`Ring::next_seq`]. It is built in
    /// the staging area; not in the file until the next
    /// [`Ring::prepare_sync`], and not durable until the fdatasync after it.
    pub fn append(&mut self, h: &RecordHeader, payload: &[u8]) -> Result<(), RingFull> {
        assert_eq!(
            h.seq, self.next_seq,
            "ring append out of order: seqs are gap-free"
        );
        assert!(payload.len() <= u32::MAX as usize, "payload too large");
        let size = record_size(payload.len());
        let (write_pos, _) = self.placement(size).ok_or(RingFull)?;
        if write_pos != self.head_pos {
            let marker = RecordHeader {
                seq: h.seq,
                gen: 0,
                kind: 0,
                flags: 0,
                offset: 0,
                len: 0,
            };
            self.put_chunk(self.head_pos, WRAP_MAGIC, &marker, &[]);
        }
        let phys = write_pos % self.capacity;
        self.put_chunk(write_pos, RECORD_MAGIC, h, payload);
        if self.index.is_empty() {
            self.tail_pos = write_pos;
        }
        self.index.push_back((phys / RECORD_ALIGN_BYTES) as u32);
        self.head_pos = write_pos + size;
        self.next_seq += 1;
        self.payload_bytes += payload.len() as u64;
        Ok(())
    }

    /// Whether a record with `payload_len` bytes of payload fits now.
    pub fn fits(&self, payload_len: usize) -> bool {
        payload_len <= u32::MAX as usize && self.placement(record_size(payload_len)).is_some()
    }

    /// Oldest retained seq (== `next_seq()` when empty).
    pub fn first_seq(&self) -> u64 {
        self.first_seq
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Records retained.
    pub fn len(&self) -> u64 {
        self.index.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    fn phys_of(&self, seq: u64) -> u64 {
        u64::from(self.index[(seq - self.first_seq) as usize]) * RECORD_ALIGN_BYTES
    }

    /// Logical position of retained record `seq`.
    fn pos_of(&self, seq: u64) -> u64 {
        let tail_phys = self.tail_pos % self.capacity;
        let phys = self.phys_of(seq);
        self.tail_pos + (phys + self.capacity - tail_phys) % self.capacity
    }

    /// The record `seq` and its payload, if retained. The checksum is
    /// verified on every read: a mismatch means the mapped file changed under
    /// us (disk or memory corruption), and the node stops rather than serve it.
    pub fn get(&self, seq: u64) -> Option<(RecordHeader, &[u8])> {
        if seq < self.first_seq || seq >= self.next_seq {
            return None;
        }
        let phys = self.phys_of(seq);
        let hl = RECORD_HEADER_BYTES as usize;
        let hdr = self.bytes_at(self.pos_of(seq), RECORD_HEADER_BYTES);
        let payload_len = rd_u32(hdr, R_PAYLOAD_LEN) as usize;
        assert!(
            rd_u32(hdr, R_MAGIC) == RECORD_MAGIC
                && rd_u64(hdr, R_SEQ) == seq
                && phys + record_size(payload_len) <= self.capacity,
            "{}: index points to a damaged record for seq {seq} at data offset {phys}",
            self.path.display()
        );
        let payload = &self.bytes_at(self.pos_of(seq), (hl + payload_len) as u64)[hl..];
        assert_eq!(
            record_crc(hdr, payload),
            rd_u32(hdr, R_CRC),
            "{}: checksum mismatch reading seq {seq} at data offset {phys}",
            self.path.display()
        );
        let h = RecordHeader {
            seq,
            gen: rd_u64(hdr, R_GEN),
            kind: hdr[R_KIND],
            flags: hdr[R_FLAGS],
            offset: rd_u64(hdr, R_OFFSET),
            len: rd_u64(hdr, R_LEN),
        };
        Some((h, payload))
    }

    fn payload_len_of(&self, seq: u64) -> u64 {
        let hdr = self.bytes_at(self.pos_of(seq), RECORD_HEADER_BYTES);
        u64::from(rd_u32(hdr, R_PAYLOAD_LEN))
    }

    /// `len` bytes of what the ring holds at logical position `pos`: from
    /// the staging area if it has them, else through the mapping (the file
    /// holds every byte staged before `stage_start`).
    fn bytes_at(&self, pos: u64, len: u64) -> &[u8] {
        if pos >= self.stage_start && pos + len <= self.stage_end {
            let at = (pos - self.stage_start) as usize;
            &self.stage.as_slice()[at..at + len as usize]
        } else {
            let at = (RING_HEADER_BYTES + pos % self.capacity) as usize;
            &self.map[at..at + len as usize]
        }
    }

    /// Drop every record with a seq <= `seq` (the peer executed them). Seqs
    /// already gone are a no-op; a seq >= `next_seq()` drops every record.
    /// The space is reused once a header holding the new tail is durable.
    pub fn trim_through(&mut self, seq: u64) {
        if seq < self.first_seq || self.is_empty() {
            return;
        }
        let last = seq.min(self.next_seq - 1);
        for s in self.first_seq..=last {
            self.payload_bytes -= self.payload_len_of(s);
        }
        let new_first = last + 1;
        let new_tail = if new_first == self.next_seq {
            self.head_pos
        } else {
            self.pos_of(new_first)
        };
        self.index.drain(..(new_first - self.first_seq) as usize);
        self.first_seq = new_first;
        self.tail_pos = new_tail;
    }

    /// Drop every record with a seq > `seq`; `next_seq()` becomes `seq + 1`.
    /// `seq` must be < `next_seq()`; `seq == next_seq() - 1` is a no-op. A
    /// `seq` below `first_seq() - 1` drops every record (like `reset(seq+1)`).
    /// Durable when it returns (one fdatasync of the ring file), unless
    /// [`Ring::write_error`] reports a failure.
    pub fn truncate_after(&mut self, seq: u64) {
        assert!(
            seq < self.next_seq,
            "truncate_after({seq}) beyond the last seq {}: that would leave a gap",
            self.next_seq - 1
        );
        if seq + 1 == self.next_seq {
            // Nothing to drop; what is kept is still made durable.
            if self.durable_seq < seq {
                self.sync_header_or_fail("truncation");
            }
            return;
        }
        if seq < self.first_seq {
            self.reset(seq + 1);
            return;
        }
        for s in seq + 1..self.next_seq {
            self.payload_bytes -= self.payload_len_of(s);
        }
        // What is staged goes to the file first, so the records kept are
        // there and the stage can restart at the new head.
        self.write_out();
        let last_pos = self.pos_of(seq);
        self.head_pos = last_pos + record_size(self.payload_len_of(seq) as usize);
        self.restage_at(self.head_pos);
        self.index.truncate((seq + 1 - self.first_seq) as usize);
        self.next_seq = seq + 1;
        self.epoch += 1;
        self.epoch_first_seq = self.next_seq;
        self.sync_header_or_fail("truncation");
    }

    /// Drop every record; the next append must carry `next_seq` (>= 1).
    /// Durable when it returns (one fdatasync of the ring file), unless
    /// [`Ring::write_error`] reports a failure.
    pub fn reset(&mut self, next_seq: u64) {
        assert!(next_seq >= 1, "seqs start at 1");
        // The dropped records may still be staged: write them out so the
        // stage and the file agree before the head moves on.
        self.write_out();
        self.index.clear();
        self.payload_bytes = 0;
        self.tail_pos = self.head_pos;
        self.first_seq = next_seq;
        self.next_seq = next_seq;
        self.epoch += 1;
        self.epoch_first_seq = next_seq;
        self.sync_header_or_fail("reset");
    }

    /// Bytes appends cannot use now: from the oldest tail a durable header
    /// may still hold up to the head, including wrap padding.
    pub fn used_bytes(&self) -> u64 {
        self.head_pos - self.reclaim_pos
    }

    /// Size of the data area.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity
    }

    /// Sum of the payload lengths of the retained records.
    pub fn payload_bytes(&self) -> u64 {
        self.payload_bytes
    }

    /// The ring file, for an fdatasync issued through the backend
    /// (`BackendOp::SyncFd`).
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Write what was appended since the last call (one contiguous write of
    /// whole blocks, two at a wrap of the data area) and the header block.
    /// Returns the highest seq that an fdatasync of [`Ring::fd`] issued
    /// after this call makes durable
    /// (`next_seq() - 1`). Report that fdatasync's success with
    /// [`Ring::sync_completed`]; without it trimmed space is never reused.
    pub fn prepare_sync(&mut self) -> u64 {
        self.write_out();
        self.store_header();
        let seq = self.next_seq - 1;
        if self.pending.len() == MAX_PENDING_SYNCS {
            self.pending.pop_front();
        }
        self.pending.push_back(PendingSync {
            seq,
            tail_pos: self.tail_pos,
        });
        seq
    }

    /// An fdatasync of [`Ring::fd`] issued after the `prepare_sync` that
    /// returned `synced_seq` completed successfully. Call once per completed
    /// fdatasync, in any order. (A failed fdatasync must not be reported: the
    /// node should stop, as the kernel may have dropped the dirty pages.)
    pub fn sync_completed(&mut self, synced_seq: u64) {
        if self.write_error.is_some() {
            // After a failed write or fdatasync a later fdatasync may succeed
            // without what the failed one lost: nothing becomes durable.
            return;
        }
        let Some(i) = self.pending.iter().position(|p| p.seq == synced_seq) else {
            return; // covered by a later sync that completed first
        };
        let done = self.pending[i];
        self.pending.drain(..=i);
        self.durable_seq = self.durable_seq.max(done.seq);
        self.reclaim_pos = self.reclaim_pos.max(done.tail_pos);
    }

    /// The fdatasync issued after the `prepare_sync` that returned
    /// `synced_seq` failed: the kernel may have dropped the ring's dirty
    /// pages, so its on-disk state is unknown. Kept for
    /// [`Ring::write_error`]; nothing is reported durable by it.
    pub fn sync_failed(&mut self, synced_seq: u64, why: String) {
        if self.write_error.is_none() {
            self.write_error = Some(format!(
                "{}: the fdatasync that was to make seq {synced_seq} durable failed: {why}",
                self.path.display()
            ));
        }
    }

    /// Trimmed space waits for a durable header before it can be reused:
    /// true when a sync would free space.
    pub fn reclaim_pending(&self) -> bool {
        self.reclaim_pos < self.tail_pos
    }

    /// Highest seq known durable.
    pub fn durable_seq(&self) -> u64 {
        self.durable_seq
    }

    /// `prepare_sync` + a synchronous fdatasync, twice, so the on-disk header
    /// also records the new durable seq (start-up, shutdown, tests).
    pub fn sync(&mut self) -> io::Result<()> {
        for _ in 0..2 {
            self.prepare_sync();
            self.file.sync_data()?;
            // This fdatasync covers every sync prepared so far.
            let latest = self.pending.pop_back().expect("just prepared");
            self.pending.clear();
            self.durable_seq = self.durable_seq.max(latest.seq);
            self.reclaim_pos = self.reclaim_pos.max(latest.tail_pos);
        }
        Ok(())
    }
}

impl Drop for Ring {
    /// A clean close writes what is staged (without making it durable), as
    /// page-cache writes used to leave it in the file. A process that is
    /// killed loses what it staged since its last flush: those records were
    /// never durable.
    fn drop(&mut self) {
        if self.write_error.is_none() {
            self.write_out();
        }
    }
}
