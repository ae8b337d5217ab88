//! The persistent ring: a file holding a node's delay buffer and delta queue
//! as one gap-free sequence of records.
//!
//! The byte format and the recovery rules are specified in
//! `docs/ring-format.md`; this module is the reference implementation. In
//! short: three 4 KiB header slots hold the cursors (a store never goes to
//! a slot a batch in flight writes; recovery takes the valid one stored
//! last); records follow in a circular data area in *groups* (format 3): a
//! 4 KiB group block holding the 64-byte headers of up to
//! [`GROUP_RECORDS`] consecutive records, followed by their payloads, each
//! padded to whole 4 KiB blocks, so every payload sits at a block-aligned
//! file offset and a 4 KiB write costs 4 KiB of ring plus its share of the
//! group block. A group belongs to one batch and never straddles the end of
//! the area (a wrap marker block sends readers back to the start). Rings of
//! format 2 (a header block per record) are still read: a ring upgraded in
//! place holds format 2 records followed by groups. Positions are *logical*
//! byte counts that only grow; the physical offset in the data area is
//! `pos % capacity`.
//!
//! No payload is copied: [`Ring::append`] keeps the `SharedBuf` the payload
//! arrived in, and a batch write takes its pieces straight from those
//! buffers ([`Ring::begin_write`]: one vectored O_DIRECT write per run of
//! consecutive records, two where the batch wraps around the end of the
//! area, and the header slot only when a store is due (trimmed space waits
//! for it), each a durable write (`RWF_DSYNC`) that the driver runs on its
//! io_uring as [`crate::backend::BackendOp::WriteVecFd`] with `dsync`: no
//! separate fdatasync). Each record says which seqs were durable when it
//! was appended, so recovery tells damage from a torn tail even when the
//! header's own word on that is old. Only
//! the group blocks (built when the batch is written, all their records
//! known then) and the last partial block of a payload whose length is not
//! a multiple of 4 KiB are built in a small staging buffer (zero padded). At most [`MAX_BATCHES_IN_FLIGHT`] batches are in flight:
//! appends made meanwhile go into a later one (group commit), and a batch
//! is reported durable only after every batch begun before it.
//!
//! A record's buffer is kept while the record may not be in the file yet
//! and, once durable, until the driver releases it ([`Ring::release_through`])
//! or the durable buffers kept exceed [`KEEP_DURABLE_BYTES`]; after that the
//! record is read through a read-only mapping of the file. Until a trim is
//! durable the ring does not reuse the trimmed space, so a crash can never
//! leave the on-disk header pointing at records that were overwritten.
//! [`Ring::truncate_after`] and [`Ring::reset`] are rare (start-up,
//! handshake, failover) and make themselves durable before returning, with
//! synchronous writes (they rewrite, with the same bytes, what a batch in
//! flight carries).
//!
//! Where the filesystem refuses O_DIRECT (e.g. tmpfs before Linux 6.6) the
//! ring logs so and the same writes go through the page cache.
//!
//! The ring lives in a regular file or on a block device of its own (a raw
//! device or partition: no filesystem, so no inode or timestamp update per
//! write). On a device the format is the same, at the start of the device:
//! nothing is allocated, the size comes from the device (it must hold the
//! header slots and the data area), and the device is opened exclusively
//! (O_EXCL), so a mounted device or one another node process uses is
//! refused.

use crate::backend::{AlignedBuf, IoSeg, SharedBuf, MAX_WRITE_SEGS};
use crate::blockdev::{self, Geometry};
use memmap2::Mmap;
use std::collections::VecDeque;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::io::RawFd;
use std::path::{Path, PathBuf};

/// Size of one header slot.
pub const RING_HEADER_SLOT_BYTES: u64 = 4096;
/// Header slots at the start of the file: one more than the batches that
/// may be in flight, so a store never goes to a slot a store in flight may
/// still land in.
pub const RING_HEADER_SLOTS: usize = MAX_BATCHES_IN_FLIGHT + 1;
/// Size of the header area (the slots) that precedes the data area.
pub const RING_HEADER_BYTES: u64 = RING_HEADER_SLOTS as u64 * RING_HEADER_SLOT_BYTES;
/// Batch writes ([`Ring::begin_write`]) that may be in flight at once.
pub const MAX_BATCHES_IN_FLIGHT: usize = 2;
/// Unit of every write to the ring file: group blocks, payloads and wrap
/// markers start on multiples of this and fill whole blocks, so no two
/// payloads share a block and a group block holds nothing but headers.
pub const RING_BLOCK_BYTES: u64 = 4096;

/// The largest ring capacity (`ring.size_bytes`) a block device of
/// `device_bytes` holds, with the header slots in front.
pub fn largest_capacity_on(device_bytes: u64) -> u64 {
    device_bytes.saturating_sub(RING_HEADER_BYTES) / RING_BLOCK_BYTES * RING_BLOCK_BYTES
}
/// Group blocks (and format 2 records) and wrap markers start on multiples
/// of this.
pub const RECORD_ALIGN_BYTES: u64 = RING_BLOCK_BYTES;
/// Bytes of one record header (in a group block; format 2: at the start of
/// the record's own header block).
pub const RECORD_HEADER_BYTES: u64 = 64;
/// Bytes of a group block's own header, before its record headers.
pub const GROUP_HEADER_BYTES: u64 = 64;
/// Records one group block holds at most: its header, then one record
/// header each.
pub const GROUP_RECORDS: usize =
    ((RING_BLOCK_BYTES - GROUP_HEADER_BYTES) / RECORD_HEADER_BYTES) as usize;

/// A retained record in [`Ring`]'s index: the physical offset / 4096 of the
/// block holding its header (its group block; format 2: its own header
/// block), where its payload starts relative to that block (in blocks), and
/// its payload length. Enough to trim, truncate and find the record without
/// reading the file.
#[derive(Clone, Copy)]
struct Slot {
    block: u32,
    rel: u32,
    payload_len: u32,
}

impl Slot {
    /// A record whose header sits in the block at physical offset
    /// `block_phys` and whose payload starts `rel_bytes` after it.
    fn new(block_phys: u64, rel_bytes: u64, payload_len: u64) -> Slot {
        Slot {
            block: (block_phys / RECORD_ALIGN_BYTES) as u32,
            rel: (rel_bytes / RING_BLOCK_BYTES) as u32,
            payload_len: payload_len as u32,
        }
    }
}

/// Largest data area: record offsets are kept as `u32` multiples of 4096.
pub const MAX_CAPACITY_BYTES: u64 = (u32::MAX as u64 + 1) * RECORD_ALIGN_BYTES;
/// Format version written by this code (format 3: records in groups).
pub const RING_VERSION: u32 = 3;
/// Oldest format version [`Ring::open`] reads: format 2 records (a header
/// block each) are read, and new records follow them in groups.
pub const RING_MIN_VERSION: u32 = 2;
/// Payload bytes of durable records whose buffers the ring keeps, by
/// default, when the driver has not released them: reads of recent records
/// (sending, executing) come from memory instead of the mapping.
pub const KEEP_DURABLE_BYTES: u64 = 8 << 20;
/// Largest single vectored write a batch is split into.
const MAX_WRITE_BYTES: u64 = 1 << 30;

/// The magic at the start of every header slot.
pub(crate) const RING_MAGIC: &[u8; 8] = b"DMIRRING";
const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"DMRC");
const WRAP_MAGIC: u32 = u32::from_le_bytes(*b"DMWR");
const GROUP_MAGIC: u32 = u32::from_le_bytes(*b"DMGR");
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
/// The highest seq confirmed durable when the record was appended (0 in
/// rings written before this field was used: it claims nothing).
const R_SYNCED_SEQ: usize = 52;
const R_CRC: usize = 60;

// Group header field offsets (the first 64 bytes of a group block).
const G_MAGIC: usize = 0;
const G_COUNT: usize = 4;
const G_FIRST_SEQ: usize = 8;
const G_CRC: usize = 60;

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
    /// The block device named for the ring cannot hold it (too small, a
    /// logical block size above 4096): why, and what to change.
    Device(String),
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
                "ring I/O error: {e}; check ring.path (its file or device), its permissions and free space"
            ),
            RingError::Device(why) => f.write_str(why),
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
                "{} has ring format version {found}, this build reads versions \
                 {RING_MIN_VERSION} to {supported} (docs/ring-format.md, Versions). Drain it with the build that wrote it: run \
                 that build until the pair is in sync and this node's delta queue is empty, so \
                 no acknowledged write lives only in this ring; then re-create the node with \
                 this build, `deltamirror format --force --replace` (it rejoins as backup and \
                 receives a full remirror from its peer)",
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
    /// Tells apart syncs of the same seq (a count of prepared syncs).
    id: u64,
}

/// What a [`Chunk`] is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum ChunkKind {
    /// A wrap marker block.
    Wrap,
    /// A group block: built when the batch is written, from the headers of
    /// the records that follow it in the chunk list.
    Group,
    /// A record of the group before it: `pos` is where its payload goes.
    Record,
}

/// A group block, record or wrap marker appended and not yet known to be
/// in the file: its 64-byte header (a record's or a marker's) and its
/// payload (the buffer it arrived in).
#[derive(Clone)]
struct Chunk {
    kind: ChunkKind,
    /// Logical position of the block (a record: of its payload).
    pos: u64,
    /// The record's seq (a wrap marker or group block: the seq of the
    /// record after it).
    seq: u64,
    hdr: [u8; RECORD_HEADER_BYTES as usize],
    payload: Option<SharedBuf>,
}

/// An asynchronous batch write in flight ([`Ring::begin_write`]).
struct InFlightBatch {
    through: u64,
    /// Its [`PendingSync::id`].
    id: u64,
    /// What it writes: a synchronous write while it is in flight rewrites
    /// these (same bytes) so that it does not depend on the batch.
    chunks: Vec<Chunk>,
    /// The header slot it writes, if it carries a header store.
    slot: Option<usize>,
}

/// A retained record whose payload buffer the ring still holds.
struct Kept {
    h: RecordHeader,
    buf: SharedBuf,
}

/// One batch write begun by [`Ring::begin_write`]: run `writes` on the ring
/// file as durable writes (`RWF_DSYNC`; in any order, or all at once: no two
/// overlap); once every one completed in full, and every batch begun before
/// was reported, report the outcome with [`Ring::sync_completed`] (or
/// [`Ring::sync_failed`] for a failed or short write) for `through`.
pub struct RingWrite {
    /// The highest seq the batch makes durable.
    pub through: u64,
    /// `(file offset, pieces)`: the records' runs (group blocks and wrap
    /// markers from a staging buffer, payloads from the buffers they arrived
    /// in), then the header slot.
    pub writes: Vec<(u64, Vec<IoSeg>)>,
}

pub struct Ring {
    path: PathBuf,
    file: File,
    /// Whether `file` was opened with O_DIRECT.
    direct: bool,
    /// The block device's geometry when the ring is on a raw device (opened
    /// O_EXCL), `None` for a regular file.
    device: Option<Geometry>,
    /// Read-only view of the file, for records whose buffer is no longer
    /// kept (see [`Ring::get`]).
    map: Mmap,
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
    /// Highest seq known durable (its batch's durable writes completed, or
    /// an fdatasync after its write).
    durable_seq: u64,
    /// Appends never write at or beyond `reclaim_pos + capacity`: the tail
    /// that a durable header holds.
    reclaim_pos: u64,
    /// Where each retained record is and its payload length, `first_seq`
    /// first: trimming counts payload bytes from here, never from the
    /// mapping (a page the ring's O_DIRECT writes left out of the page
    /// cache would be a synchronous disk read on the reactor).
    index: VecDeque<Slot>,
    payload_bytes: u64,
    pending: VecDeque<PendingSync>,
    sync_count: u64,
    /// Syncs prepared so far (their [`PendingSync::id`]).
    sync_ids: u64,
    /// The header slot of the last header store.
    last_slot: usize,
    /// Records and wrap markers appended since the last write was planned.
    unwritten: Vec<Chunk>,
    /// Batches begun and not reported yet, oldest first.
    in_flight: VecDeque<InFlightBatch>,
    /// The group the next append joins if it has room and the payload fits
    /// before the end of the group's lap: (logical position of its group
    /// block, records in it). Every write of what was appended closes it
    /// (a group belongs to one batch), and so does anything that moves the
    /// head otherwise (truncation, reset, a trim of every record).
    open_group: Option<(u64, usize)>,
    /// A truncation moved the head back over space that batches in flight
    /// still write: nothing appended since is written (no batch begins,
    /// synchronous writes leave it out) until those batches are reported,
    /// so a write of theirs that lands late cannot overwrite a new record.
    hold: bool,
    /// Buffers of the records `kept_first..next_seq`.
    kept: VecDeque<Kept>,
    kept_first: u64,
    /// Payload bytes in `kept`.
    kept_bytes: u64,
    /// Durable records' buffers are dropped, oldest first, beyond this.
    keep_limit: u64,
    /// Staging buffers of earlier batches, reused once their writes are done.
    stage_spare: Vec<SharedBuf>,
    /// The driver needs no buffer of a seq <= this any more.
    released_through: u64,
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

/// `len` rounded up to whole blocks.
fn padded(len: u64) -> u64 {
    len.next_multiple_of(RING_BLOCK_BYTES)
}

fn record_crc(hdr: &[u8], payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&hdr[..R_CRC]), payload)
}

/// Where an entry of the chain sits.
#[derive(Clone, Copy, Debug)]
enum Loc {
    /// At the block at this logical position: a format 2 record, a wrap
    /// marker, or a group block (its first record).
    Block(u64),
    /// Record `idx` (> 0) of the `count` in the group block at logical
    /// position `group`, its payload at logical position `payload`.
    Member {
        group: u64,
        idx: usize,
        count: usize,
        payload: u64,
    },
}

impl Loc {
    /// Where the chain stops if this entry is not valid: the ring's head
    /// after recovery.
    fn pos(self) -> u64 {
        match self {
            Loc::Block(pos) => pos,
            Loc::Member { payload, .. } => payload,
        }
    }
}

/// A record or wrap marker as read from the data area: its structure
/// checked (magic, lengths), its checksum, seq and epoch not.
#[derive(Clone, Copy, Debug)]
struct Entry {
    /// `RECORD_MAGIC` or `WRAP_MAGIC`.
    magic: u32,
    /// Logical position of the block holding its header (its group block,
    /// or its own).
    block: u64,
    /// Physical data-area offset of its 64-byte header.
    hdr: u64,
    /// (index, records in the group) for a record of a group.
    member: Option<(usize, usize)>,
    seq: u64,
    epoch: u64,
    payload_len: u64,
    /// Logical position of its payload.
    payload: u64,
}

impl Entry {
    /// Logical position where it ends (a wrap marker: its block).
    fn end(&self) -> u64 {
        if self.magic == WRAP_MAGIC {
            self.block + RING_BLOCK_BYTES
        } else {
            self.payload + padded(self.payload_len)
        }
    }

    /// Where the next entry of the chain sits.
    fn next(&self, capacity: u64) -> Loc {
        match self.member {
            _ if self.magic == WRAP_MAGIC => Loc::Block((self.block / capacity + 1) * capacity),
            Some((idx, count)) if idx + 1 < count => Loc::Member {
                group: self.block,
                idx: idx + 1,
                count,
                payload: self.end(),
            },
            _ => Loc::Block(self.end()),
        }
    }
}

/// Why the chain stops at an entry (see [`Ring::follow`]).
struct Stop {
    /// Logical position where the chain stops (the new head).
    at: u64,
    /// File offset of the bad record's header (or of the block that holds
    /// no record), for the corruption report.
    offset: u64,
    /// The bad record, if its structure could be read.
    entry: Option<Entry>,
    why: String,
}

fn round_down(pos: u64) -> u64 {
    pos / RING_BLOCK_BYTES * RING_BLOCK_BYTES
}

/// Open the ring file for reading and writing, with O_DIRECT where the
/// filesystem allows it: a regular file (created, or truncated, if
/// `create`), or with `device` a block device, exclusively (O_EXCL: see
/// [`blockdev::open_exclusive`]). Returns the file and whether O_DIRECT is
/// on.
fn open_file(path: &Path, create: bool, device: bool) -> io::Result<(File, bool)> {
    use std::os::unix::fs::OpenOptionsExt;
    let open = |flags: i32| {
        if device {
            return blockdev::open_exclusive(path, true, flags);
        }
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

/// The geometry of the ring's block device `file` (at `path`), refused
/// unless its logical block size allows the ring's 4 KiB O_DIRECT writes.
fn device_geometry(path: &Path, file: &File) -> Result<Geometry, RingError> {
    let g = blockdev::geometry(file)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    let lbs = u64::from(g.logical_block_bytes);
    if lbs == 0 || !RING_BLOCK_BYTES.is_multiple_of(lbs) {
        return Err(RingError::Device(format!(
            "the block device {} has logical blocks of {lbs} bytes: the ring writes whole \
             {RING_BLOCK_BYTES}-byte blocks with O_DIRECT, so it needs logical blocks of \
             512, 1024, 2048 or 4096 bytes; put ring.path on another device (or a file)",
            path.display()
        )));
    }
    Ok(g)
}

fn corrupt(offset: u64, seq_expected: u64, detail: String) -> RingError {
    RingError::Corrupt {
        offset,
        seq_expected,
        detail,
    }
}

/// The cursors one header slot holds.
#[derive(Clone, Copy)]
struct StoredHeader {
    capacity: u64,
    epoch: u64,
    epoch_first_seq: u64,
    tail_pos: u64,
    first_seq: u64,
    head_pos: u64,
    next_seq: u64,
    synced_seq: u64,
    sync_count: u64,
}

/// Parse a header slot (magic and version already checked): why it is not
/// valid, or its cursors. `file_len`: the bytes of the ring file, which its
/// header and data area fill; with `device`, the bytes of the block device,
/// which they must fit in.
fn parse_header(h: &[u8], file_len: u64, device: bool) -> Result<StoredHeader, String> {
    if crc32c::crc32c(&h[..H_CRC]) != rd_u32(h, H_CRC) {
        return Err("checksum mismatch".into());
    }
    let s = StoredHeader {
        capacity: rd_u64(h, H_CAPACITY),
        epoch: rd_u64(h, H_EPOCH),
        epoch_first_seq: rd_u64(h, H_EPOCH_FIRST_SEQ),
        tail_pos: rd_u64(h, H_TAIL_POS),
        first_seq: rd_u64(h, H_FIRST_SEQ),
        head_pos: rd_u64(h, H_HEAD_POS),
        next_seq: rd_u64(h, H_NEXT_SEQ),
        synced_seq: rd_u64(h, H_SYNCED_SEQ),
        sync_count: rd_u64(h, H_SYNC_COUNT),
    };
    let sane = u64::from(rd_u32(h, H_HEADER_BYTES)) == RING_HEADER_BYTES
        && (s.capacity == file_len - RING_HEADER_BYTES
            || device && s.capacity <= file_len - RING_HEADER_BYTES)
        && s.capacity.is_multiple_of(RING_BLOCK_BYTES)
        && s.capacity <= MAX_CAPACITY_BYTES
        && s.tail_pos <= s.head_pos
        && s.head_pos - s.tail_pos <= s.capacity
        && s.tail_pos.is_multiple_of(RECORD_ALIGN_BYTES)
        && s.first_seq >= 1
        && s.first_seq <= s.next_seq
        && s.synced_seq < s.next_seq
        && s.epoch_first_seq <= s.next_seq;
    if !sane {
        return Err(format!(
            "inconsistent cursors (capacity {}, {} {file_len} bytes, tail {}/seq {}, head {}/seq \
             {}, synced seq {})",
            s.capacity,
            if device { "device" } else { "file" },
            s.tail_pos,
            s.first_seq,
            s.head_pos,
            s.next_seq,
            s.synced_seq
        ));
    }
    Ok(s)
}

/// A record's (or wrap marker's) 64-byte header, checksum included.
/// `synced_seq`: the highest seq confirmed durable now.
fn record_header(
    magic: u32,
    h: &RecordHeader,
    epoch: u64,
    synced_seq: u64,
    payload: &[u8],
) -> [u8; RECORD_HEADER_BYTES as usize] {
    let mut rec = [0u8; RECORD_HEADER_BYTES as usize];
    wr_u32(&mut rec, R_MAGIC, magic);
    rec[R_KIND] = h.kind;
    rec[R_FLAGS] = h.flags;
    wr_u64(&mut rec, R_SEQ, h.seq);
    wr_u64(&mut rec, R_GEN, h.gen);
    wr_u64(&mut rec, R_OFFSET, h.offset);
    wr_u64(&mut rec, R_LEN, h.len);
    wr_u64(&mut rec, R_EPOCH, epoch);
    wr_u32(&mut rec, R_PAYLOAD_LEN, payload.len() as u32);
    wr_u64(&mut rec, R_SYNCED_SEQ, synced_seq);
    let crc = record_crc(&rec, payload);
    wr_u32(&mut rec, R_CRC, crc);
    rec
}

/// Where an append goes ([`Ring::placement`]): logical positions.
struct Placement {
    /// A wrap marker first, here.
    marker: Option<u64>,
    /// A new group block, here (else the record joins the open group).
    group: Option<u64>,
    payload: u64,
    /// Where the head goes.
    end: u64,
}

/// A piece of a planned write: from the staging buffer, or from a payload.
enum Piece {
    Stage { at: usize, len: usize },
    Payload { buf: SharedBuf, len: usize },
}

/// Staging buffers a ring keeps for reuse (a batch's writes hold theirs
/// until they complete; at most two batches are in flight).
const MAX_SPARE_STAGES: usize = 4;

/// A zeroed staging buffer of `len` bytes: one of `spare` that no write
/// holds any more and is large enough, else a new one (sized up to a power
/// of two, at least 64 KiB, so that later batches can reuse it). Reusing
/// them keeps a busy ring from allocating a differently sized aligned
/// buffer per batch, which fragments the heap.
fn stage_buf(spare: &mut Vec<SharedBuf>, len: usize) -> AlignedBuf {
    let mut found = None;
    let mut kept = Vec::with_capacity(spare.len());
    for s in spare.drain(..) {
        if found.is_some() {
            kept.push(s);
            continue;
        }
        match s.try_unwrap() {
            Ok(b) if b.capacity() >= len => found = Some(b),
            // Free but too small: dropped (a larger one replaces it).
            Ok(_) => {}
            Err(s) => kept.push(s),
        }
    }
    *spare = kept;
    let mut b = found.unwrap_or_else(|| AlignedBuf::new(len.next_power_of_two().max(64 << 10)));
    b.set_len(len);
    b.as_mut_slice().fill(0);
    b
}

/// Write a group block's header: `count` records from `first_seq` on.
fn finish_group(block: &mut [u8], first_seq: u64, count: usize) {
    wr_u32(block, G_MAGIC, GROUP_MAGIC);
    block[G_COUNT..G_COUNT + 2].copy_from_slice(&(count as u16).to_le_bytes());
    wr_u64(block, G_FIRST_SEQ, first_seq);
    let crc = crc32c::crc32c(&block[..G_CRC]);
    wr_u32(block, G_CRC, crc);
}

/// The writes that put `chunks` (in append order: each group block before
/// its records) into a ring file with a data area of `capacity` bytes: one
/// per run of consecutive chunks (a run ends at the end of the data area,
/// and at [`MAX_WRITE_SEGS`] pieces or [`MAX_WRITE_BYTES`]). Group blocks
/// (their header and the headers of the records that follow them), wrap
/// markers, and the last partial block of a payload whose length is not a
/// multiple of the block size (zero padded), are built in one staging
/// buffer; whole payload blocks are written from the payload's own buffer.
fn plan_writes(
    chunks: &[Chunk],
    capacity: u64,
    spare: &mut Vec<SharedBuf>,
) -> Vec<(u64, Vec<IoSeg>)> {
    let block = RING_BLOCK_BYTES as usize;
    let stage_blocks: usize = chunks
        .iter()
        .map(|c| match c.kind {
            ChunkKind::Wrap | ChunkKind::Group => 1,
            ChunkKind::Record => {
                usize::from(c.payload.as_ref().is_some_and(|p| p.len() % block != 0))
            }
        })
        .sum();
    let mut stage = stage_buf(spare, stage_blocks * block);
    let mut runs: Vec<(u64, Vec<Piece>)> = Vec::new();
    let (mut run_end, mut run_bytes) = (u64::MAX, 0u64);
    let mut at = 0usize;
    // The group block being filled: (its offset in `stage`, first seq,
    // records so far).
    let mut group: Option<(usize, u64, usize)> = None;
    for c in chunks {
        if c.kind != ChunkKind::Record {
            if let Some((g, first, n)) = group.take() {
                finish_group(&mut stage.as_mut_slice()[g..g + block], first, n);
            }
        }
        let size = match c.kind {
            ChunkKind::Wrap | ChunkKind::Group => RING_BLOCK_BYTES,
            ChunkKind::Record => padded(c.payload.as_ref().map_or(0, |p| p.len()) as u64),
        };
        if size > 0 {
            let new_run = c.pos != run_end
                || c.pos.is_multiple_of(capacity)
                || runs.last().is_none_or(|r| r.1.len() + 3 > MAX_WRITE_SEGS)
                || run_bytes + size > MAX_WRITE_BYTES;
            if new_run {
                runs.push((RING_HEADER_BYTES + c.pos % capacity, Vec::new()));
                run_bytes = 0;
            }
            run_end = c.pos + size;
            run_bytes += size;
        }
        match c.kind {
            ChunkKind::Wrap | ChunkKind::Group => {
                if c.kind == ChunkKind::Wrap {
                    stage.as_mut_slice()[at..at + RECORD_HEADER_BYTES as usize]
                        .copy_from_slice(&c.hdr);
                } else {
                    group = Some((at, c.seq, 0));
                }
                let pieces = &mut runs.last_mut().expect("a run").1;
                pieces.push(Piece::Stage { at, len: block });
                at += block;
            }
            ChunkKind::Record => {
                let (g, _, n) = group
                    .as_mut()
                    .expect("a record follows its group block in the chunk list");
                let h = *g + (GROUP_HEADER_BYTES + *n as u64 * RECORD_HEADER_BYTES) as usize;
                stage.as_mut_slice()[h..h + RECORD_HEADER_BYTES as usize].copy_from_slice(&c.hdr);
                *n += 1;
                let Some(p) = &c.payload else { continue };
                let pieces = &mut runs.last_mut().expect("a run").1;
                let whole = p.len() / block * block;
                if whole > 0 {
                    pieces.push(Piece::Payload {
                        buf: p.clone(),
                        len: whole,
                    });
                }
                if whole < p.len() {
                    let rest = p.len() - whole;
                    stage.as_mut_slice()[at..at + rest].copy_from_slice(&p[whole..]);
                    pieces.push(Piece::Stage { at, len: block });
                    at += block;
                }
            }
        }
    }
    if let Some((g, first, n)) = group {
        finish_group(&mut stage.as_mut_slice()[g..g + block], first, n);
    }
    let stage = stage.share();
    if spare.len() < MAX_SPARE_STAGES {
        spare.push(stage.clone());
    }
    runs.into_iter()
        .map(|(offset, pieces)| {
            let segs = pieces
                .into_iter()
                .map(|p| match p {
                    Piece::Stage { at, len } => IoSeg {
                        buf: stage.clone(),
                        start: at,
                        len,
                    },
                    Piece::Payload { buf, len } => IoSeg { buf, start: 0, len },
                })
                .collect();
            (offset, segs)
        })
        .collect()
}

impl Ring {
    /// Create (or overwrite) the ring file at `path` with a data area of
    /// `capacity_bytes` (a multiple of 4096, at most [`MAX_CAPACITY_BYTES`]);
    /// the first record appended must carry `first_seq` (>= 1). The file is
    /// preallocated so that page faults on the mapping never hit ENOSPC.
    /// A `path` naming a block device puts the ring at the start of that
    /// device (opened O_EXCL), which must hold it; the caller checks first
    /// that the device holds nothing else (`deltamirror format` does, with
    /// [`blockdev::signature`]).
    pub fn create(path: &Path, capacity_bytes: u64, first_seq: u64) -> Result<Ring, RingError> {
        if capacity_bytes == 0
            || !capacity_bytes.is_multiple_of(RING_BLOCK_BYTES)
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
        let is_dev = blockdev::is_block_device(path)?;
        let (file, direct) = open_file(path, true, is_dev).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("{}: cannot create ring: {e}", path.display()),
            )
        })?;
        let file_len = RING_HEADER_BYTES + capacity_bytes;
        let device = if is_dev {
            let g = device_geometry(path, &file)?;
            if g.size_bytes < file_len {
                let most = largest_capacity_on(g.size_bytes);
                return Err(RingError::Device(format!(
                    "ring.size_bytes = {capacity_bytes} does not fit on the block device {} \
                     ({} bytes): the ring needs {file_len} bytes ({RING_HEADER_BYTES} of \
                     header slots and the data area); lower ring.size_bytes to at most {most} \
                     or use a larger device",
                    path.display(),
                    g.size_bytes
                )));
            }
            Some(g)
        } else {
            None
        };
        let rc = match device {
            // A device has its blocks: nothing to allocate.
            Some(_) => 0,
            // SAFETY: fallocate takes no memory arguments; the result is
            // checked.
            None => unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, file_len as libc::off_t) },
        };
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
        let map = Self::map(&file, file_len)?;
        let mut ring = Ring::with(path, file, direct, device, map, capacity_bytes);
        ring.epoch = 1;
        ring.epoch_first_seq = first_seq;
        ring.first_seq = first_seq;
        ring.next_seq = first_seq;
        ring.kept_first = first_seq;
        ring.durable_seq = first_seq - 1;
        ring.sync_header()?;
        if device.is_some() {
            return Ok(ring);
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Make the new directory entry durable too.
            File::open(dir)?.sync_all()?;
        }
        Ok(ring)
    }

    /// An empty ring over `file` (cursors at zero).
    fn with(
        path: &Path,
        file: File,
        direct: bool,
        device: Option<Geometry>,
        map: Mmap,
        capacity: u64,
    ) -> Ring {
        Ring {
            path: path.to_path_buf(),
            file,
            direct,
            device,
            map,
            write_error: None,
            capacity,
            epoch: 0,
            epoch_first_seq: 0,
            tail_pos: 0,
            head_pos: 0,
            first_seq: 0,
            next_seq: 0,
            durable_seq: 0,
            reclaim_pos: 0,
            index: VecDeque::new(),
            payload_bytes: 0,
            pending: VecDeque::with_capacity(MAX_PENDING_SYNCS),
            sync_count: 0,
            sync_ids: 0,
            // The first store goes to slot 0.
            last_slot: RING_HEADER_SLOTS - 1,
            unwritten: Vec::new(),
            open_group: None,
            in_flight: VecDeque::with_capacity(MAX_BATCHES_IN_FLIGHT),
            hold: false,
            kept: VecDeque::new(),
            kept_first: 0,
            kept_bytes: 0,
            keep_limit: KEEP_DURABLE_BYTES,
            stage_spare: Vec::new(),
            released_through: 0,
        }
    }

    /// A read-only mapping of the first `len` bytes of `file` (given: a
    /// block device's metadata says 0 bytes).
    fn map(file: &File, len: u64) -> io::Result<Mmap> {
        // SAFETY: the mapping is MAP_SHARED over a file (or a block device,
        // opened O_EXCL) this process opened read/write and owns for the
        // ring's lifetime; `len` is within it, deltamirror never resizes
        // it, and other processes must not modify a ring in use (the same
        // rule as for any database file).
        // The mapping is read-only: records go in with (O_DIRECT) writes, and
        // the kernel drops cached pages of a range an O_DIRECT write covered,
        // so reads through the mapping see the file.
        unsafe { memmap2::MmapOptions::new().len(len as usize).map(file) }
    }

    /// Whether the ring file is written with O_DIRECT.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// The block device's geometry when the ring is on a raw device,
    /// `None` for a regular file.
    pub fn device(&self) -> Option<Geometry> {
        self.device
    }

    /// The ring's path and [`Ring::describe`], for the status and logs.
    pub fn location(&self) -> String {
        format!("{}: {}", self.path.display(), self.describe())
    }

    /// One phrase for logs: where the ring is and how it is written, e.g.
    /// "block device of 1073741824 bytes (logical blocks of 512 bytes),
    /// O_DIRECT".
    pub fn describe(&self) -> String {
        let how = if self.direct {
            "O_DIRECT"
        } else {
            "through the page cache"
        };
        match self.device {
            Some(g) => format!(
                "block device of {} bytes (logical blocks of {} bytes), {how}",
                g.size_bytes, g.logical_block_bytes
            ),
            None => format!("regular file, {how}"),
        }
    }

    /// Open an existing ring, validate every retained record and recover its
    /// state. A torn tail (damage after the last durable record) is cut off
    /// and reported in [`Recovery`]; damage before it is `Err(Corrupt)`.
    /// On success the recovered state is made durable before returning.
    pub fn open(path: &Path) -> Result<(Ring, Recovery), RingError> {
        let shown = path.display();
        let is_dev = blockdev::is_block_device(path)?;
        let (file, direct) = open_file(path, false, is_dev)
            .map_err(|e| io::Error::new(e.kind(), format!("{shown}: cannot open ring: {e}")))?;
        let device = if is_dev {
            Some(device_geometry(path, &file)?)
        } else {
            None
        };
        let file_len = match device {
            Some(g) => g.size_bytes,
            None => file.metadata()?.len(),
        };
        if file_len < 16 {
            return Err(RingError::BadMagic {
                path: path.to_path_buf(),
            });
        }
        // The header slots first: they say how much of a device the ring
        // holds (a file: all of it).
        let map = Self::map(&file, file_len.min(RING_HEADER_BYTES))?;
        let slot_len = RING_HEADER_SLOT_BYTES as usize;
        let slots = (file_len / RING_HEADER_SLOT_BYTES).min(RING_HEADER_SLOTS as u64) as usize;
        let has_magic = |i: usize| {
            let at = i * slot_len;
            map[at + H_MAGIC..at + H_MAGIC + 8] == RING_MAGIC[..]
        };
        if !(0..slots).any(has_magic) {
            return Err(RingError::BadMagic {
                path: path.to_path_buf(),
            });
        }
        // Another format version (version 1 has a single header at offset
        // 0) is refused by name, whatever the other slots hold. Version 2
        // is read (its records; new ones go in groups and the header is
        // stored as version 3), and a ring upgraded in place may hold slots
        // of both.
        for i in (0..slots).filter(|&i| has_magic(i)) {
            let version = rd_u32(&map[i * slot_len..], H_VERSION);
            if !(RING_MIN_VERSION..=RING_VERSION).contains(&version) {
                return Err(RingError::BadVersion {
                    path: path.to_path_buf(),
                    found: version,
                    supported: RING_VERSION,
                });
            }
        }
        let header_corrupt = |detail: String| corrupt(0, 0, format!("{shown}: header: {detail}"));
        if file_len < RING_HEADER_BYTES + RING_BLOCK_BYTES {
            return Err(header_corrupt(format!("file is only {file_len} bytes")));
        }
        // The valid slot stored last wins: a store torn by a crash, or one
        // that landed late, leaves another slot's header in force.
        let mut best: Option<(usize, StoredHeader)> = None;
        let mut why = Vec::new();
        for i in 0..RING_HEADER_SLOTS {
            let h = &map[i * slot_len..(i + 1) * slot_len];
            if !has_magic(i) {
                why.push(format!("slot {i}: no header"));
                continue;
            }
            match parse_header(h, file_len, device.is_some()) {
                Ok(s) if best.is_none_or(|(_, b)| s.sync_count > b.sync_count) => {
                    best = Some((i, s))
                }
                Ok(_) => {}
                Err(e) => why.push(format!("slot {i}: {e}")),
            }
        }
        let Some((slot, h)) = best else {
            return Err(header_corrupt(why.join("; ")));
        };
        drop(map);
        let map = Self::map(&file, RING_HEADER_BYTES + h.capacity)?;
        let mut ring = Ring::with(path, file, direct, device, map, h.capacity);
        ring.epoch = h.epoch;
        ring.epoch_first_seq = h.epoch_first_seq;
        ring.tail_pos = h.tail_pos;
        ring.head_pos = h.tail_pos;
        ring.first_seq = h.first_seq;
        ring.next_seq = h.first_seq;
        ring.reclaim_pos = h.tail_pos;
        ring.sync_count = h.sync_count;
        // The next store goes to the next slot: this one stays as it is
        // until that store is durable.
        ring.last_slot = slot;
        let torn_tail_bytes = ring.scan(h.head_pos, h.synced_seq)?;
        if torn_tail_bytes > 0 {
            log::warn!(
                "{shown}: torn tail cut off at seq {} ({torn_tail_bytes} bytes); \
                 those records were never durable",
                ring.next_seq
            );
        }
        ring.kept_first = ring.next_seq;
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

    /// Whether a record or marker carrying `seq` and `epoch` may belong to
    /// the current chain (see "Epochs" in docs/ring-format.md).
    fn epoch_ok(&self, seq: u64, epoch: u64) -> bool {
        if seq >= self.epoch_first_seq {
            epoch == self.epoch
        } else {
            epoch < self.epoch
        }
    }

    /// The 64 bytes at physical data-area offset `phys`.
    fn hdr_bytes(&self, phys: u64) -> &[u8] {
        let at = (RING_HEADER_BYTES + phys) as usize;
        &self.map[at..at + RECORD_HEADER_BYTES as usize]
    }

    /// The entry at `loc`, its structure checked (magic, a group header's
    /// checksum and count, a payload that ends inside its lap), or why
    /// there is none.
    fn entry(&self, loc: Loc) -> Result<Entry, String> {
        let cap = self.capacity;
        let (block, hdr, member, payload) = match loc {
            Loc::Block(pos) => {
                let phys = pos % cap;
                let b = self.hdr_bytes(phys);
                match rd_u32(b, R_MAGIC) {
                    RECORD_MAGIC | WRAP_MAGIC => (pos, phys, None, pos + RING_BLOCK_BYTES),
                    GROUP_MAGIC => {
                        if crc32c::crc32c(&b[..G_CRC]) != rd_u32(b, G_CRC) {
                            return Err("group block header checksum mismatch".into());
                        }
                        let count = usize::from(u16::from_le_bytes([b[G_COUNT], b[G_COUNT + 1]]));
                        if count == 0 || count > GROUP_RECORDS {
                            return Err(format!("group block says it holds {count} records"));
                        }
                        (
                            pos,
                            phys + GROUP_HEADER_BYTES,
                            Some((0, count)),
                            pos + RING_BLOCK_BYTES,
                        )
                    }
                    m => return Err(format!("no record here (magic {m:#010x})")),
                }
            }
            Loc::Member {
                group,
                idx,
                count,
                payload,
            } => {
                let hdr = group % cap + GROUP_HEADER_BYTES + idx as u64 * RECORD_HEADER_BYTES;
                (group, hdr, Some((idx, count)), payload)
            }
        };
        let b = self.hdr_bytes(hdr);
        let magic = rd_u32(b, R_MAGIC);
        if member.is_some() && magic != RECORD_MAGIC {
            return Err(format!(
                "no record header in the group block (magic {magic:#010x})"
            ));
        }
        let payload_len = if magic == WRAP_MAGIC {
            0
        } else {
            u64::from(rd_u32(b, R_PAYLOAD_LEN))
        };
        let lap_end = (block / cap + 1) * cap;
        if payload + padded(payload_len) > lap_end {
            return Err(format!(
                "payload length {payload_len} runs past the end of the data area"
            ));
        }
        Ok(Entry {
            magic,
            block,
            hdr,
            member,
            seq: rd_u64(b, R_SEQ),
            epoch: rd_u64(b, R_EPOCH),
            payload_len,
            payload,
        })
    }

    /// Whether the record or marker `e` is whole (its checksum over header
    /// and payload holds).
    fn whole(&self, e: &Entry) -> bool {
        let hdr = self.hdr_bytes(e.hdr);
        let at = (RING_HEADER_BYTES + e.payload % self.capacity) as usize;
        let payload = &self.map[at..at + e.payload_len as usize];
        record_crc(hdr, payload) == rd_u32(hdr, R_CRC)
    }

    /// Why `e` is not the expected `seq` of the chain, or `None` if it is.
    fn check(&self, e: &Entry, seq: u64) -> Option<String> {
        if !self.whole(e) {
            return Some("checksum mismatch".into());
        }
        if e.seq != seq {
            return Some(format!("found seq {} instead", e.seq));
        }
        if !self.epoch_ok(e.seq, e.epoch) {
            return Some(format!(
                "stale record of epoch {} (ring epoch {}, epoch starts at seq {})",
                e.epoch, self.epoch, self.epoch_first_seq
            ));
        }
        None
    }

    /// The entry for `seq` that the chain holds at `loc`. A later record of
    /// a group that is not `seq` may be a leftover of a truncation that cut
    /// the group short: the chain then goes on at the block where the
    /// record before it ended. Otherwise, or if nothing valid is there
    /// either, why the chain stops.
    fn follow(&self, loc: Loc, seq: u64) -> Result<Entry, Stop> {
        let cap = self.capacity;
        let stop_at = |pos: u64, entry: Option<Entry>, why: String| Stop {
            at: pos,
            offset: RING_HEADER_BYTES + entry.map_or(pos % cap, |e| e.hdr),
            entry,
            why,
        };
        let e = self
            .entry(loc)
            .map_err(|why| stop_at(loc.pos(), None, why))?;
        let Some(why) = self.check(&e, seq) else {
            return Ok(e);
        };
        if let Loc::Member { payload, .. } = loc {
            let cont = self.entry(Loc::Block(payload));
            let cont_why = match cont {
                Ok(c) => match self.check(&c, seq) {
                    None => return Ok(c),
                    Some(w) => w,
                },
                Err(ref w) => w.clone(),
            };
            if self.whole(&e) {
                // A whole record of another seq or epoch: what was to
                // follow in the chain is what is missing.
                return Err(stop_at(payload, cont.ok(), cont_why));
            }
        }
        Err(stop_at(loc.pos(), Some(e), why))
    }

    /// Rebuild the index from `tail_pos`. Returns the torn-tail byte count,
    /// or `Err(Corrupt)` for a bad record at or before `synced_seq`.
    fn scan(&mut self, header_head_pos: u64, synced_seq: u64) -> Result<u64, RingError> {
        let cap = self.capacity;
        let start = self.tail_pos;
        let limit = start + cap;
        let mut loc = Loc::Block(start);
        loop {
            let seq = self.next_seq;
            if let Loc::Block(pos) = loc {
                if pos + RING_BLOCK_BYTES > limit {
                    break;
                }
            }
            // The header's tail may be a group whose first records were
            // trimmed (trimmed space is reused by whole groups only).
            if self.index.is_empty() {
                if let Ok(e) = self.entry(loc) {
                    if e.member.is_some() && e.block == start && e.seq < seq && e.end() <= limit {
                        loc = e.next(cap);
                        continue;
                    }
                }
            }
            let e = match self.follow(loc, seq) {
                Ok(e) => e,
                Err(stop) => return self.stopped(stop, seq, header_head_pos, synced_seq, limit),
            };
            if e.end() > limit {
                break;
            }
            if e.magic == WRAP_MAGIC {
                loc = e.next(cap);
                continue;
            }
            if self.index.is_empty() {
                self.tail_pos = e.block;
            }
            self.index
                .push_back(Slot::new(e.block % cap, e.payload - e.block, e.payload_len));
            self.payload_bytes += e.payload_len;
            self.next_seq += 1;
            self.head_pos = e.end();
            loc = e.next(cap);
        }
        Ok(0)
    }

    /// The scan stopped at `stop` expecting `seq`: corruption (`Err`) if a
    /// record that was durable is missing, else a torn tail (its bytes).
    fn stopped(
        &self,
        stop: Stop,
        seq: u64,
        header_head_pos: u64,
        synced_seq: u64,
        limit: u64,
    ) -> Result<u64, RingError> {
        let Stop {
            at,
            offset,
            entry,
            why,
        } = stop;
        if seq <= synced_seq {
            return Err(corrupt(
                offset,
                seq,
                format!(
                    "{}: {why}; the header says every record up to seq {synced_seq} was durable",
                    self.path.display()
                ),
            ));
        }
        // The header's synced_seq may be old (batches store it only now and
        // then): a record appended later that is whole and says `seq` was
        // durable proves this is damage, not a tear.
        if let Some((claim_at, m, claim)) = entry.and_then(|e| self.later_claim(&e, limit, seq)) {
            return Err(corrupt(
                offset,
                seq,
                format!(
                    "{}: {why}; record seq {m} (file offset {claim_at}), appended later, says                      every record up to seq {claim} was durable",
                    self.path.display()
                ),
            ));
        }
        let mut claimed_end = header_head_pos;
        // A record that carries the expected seq but fails its checksum is
        // the partly written one; stale records of older laps or epochs are
        // not part of the torn tail.
        if let Some(e) = entry {
            if e.magic == RECORD_MAGIC && e.seq == seq && e.epoch == self.epoch && e.end() <= limit
            {
                claimed_end = claimed_end.max(e.end());
                // The rest of its group was written in the same batch.
                let mut last = e;
                while let next @ Loc::Member { .. } = last.next(self.capacity) {
                    match self.entry(next) {
                        Ok(m) if m.end() <= limit => {
                            claimed_end = claimed_end.max(m.end());
                            last = m;
                        }
                        _ => break,
                    }
                }
            }
        }
        Ok(claimed_end.saturating_sub(at))
    }

    /// Whether the records that follow the damaged record `bad` (expected
    /// to be `seq`) say that `seq` was durable: (file offset, seq, claim) of
    /// the first that does. The damaged record's own header tells where the
    /// next one starts (its payload length is not verified: damage to the
    /// payload, the usual case, leaves it right); the chain is followed from
    /// there, seq by seq, up to `limit` or its first invalid record, so this
    /// costs a read per record that follows, not a scan of the ring.
    fn later_claim(&self, bad: &Entry, limit: u64, seq: u64) -> Option<(u64, u64, u64)> {
        if bad.magic != RECORD_MAGIC {
            return None;
        }
        let mut loc = bad.next(self.capacity);
        let mut expected = seq + 1;
        loop {
            if let Loc::Block(pos) = loc {
                if pos + RING_BLOCK_BYTES > limit {
                    return None;
                }
            }
            let next = self.follow(loc, expected).ok()?;
            if next.end() > limit {
                return None;
            }
            loc = next.next(self.capacity);
            if next.magic == WRAP_MAGIC {
                continue;
            }
            let claim = rd_u64(self.hdr_bytes(next.hdr), R_SYNCED_SEQ);
            if claim >= seq {
                return Some((RING_HEADER_BYTES + next.hdr, expected, claim));
            }
            expected += 1;
        }
    }

    /// The header slot the next store goes to: the next one after the last
    /// store's that no batch in flight is writing (a store that lands late
    /// must not replace a newer one in its slot).
    fn next_slot(&mut self) -> usize {
        let n = RING_HEADER_SLOTS;
        let slot = (1..=n)
            .map(|i| (self.last_slot + i) % n)
            .find(|&s| !self.in_flight.iter().any(|f| f.slot == Some(s)))
            .expect("a slot free: more slots than batches in flight");
        self.last_slot = slot;
        slot
    }

    /// The header block holding the current cursors, and the slot it goes
    /// to (durable with the next fdatasync after its write).
    fn header_block(&mut self) -> (usize, AlignedBuf) {
        self.sync_count += 1;
        let slot = self.next_slot();
        let mut hb = AlignedBuf::new(RING_HEADER_SLOT_BYTES as usize);
        let h = hb.as_mut_slice();
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
        (slot, hb)
    }

    /// Write the header block now (synchronously).
    fn store_header(&mut self) {
        let (slot, hb) = self.header_block();
        let segs = [IoSeg::whole(hb.share())];
        self.write_segs(slot as u64 * RING_HEADER_SLOT_BYTES, &segs);
    }

    /// One synchronous vectored write (O_DIRECT: it reaches the device
    /// before returning; the next fdatasync makes it durable). A failure is
    /// kept and reported by [`Ring::write_error`]: the node must stop, since
    /// the ring no longer holds what it was told to.
    fn write_segs(&mut self, at: u64, segs: &[IoSeg]) {
        if let Err(errno) = crate::backend::mem::write_vec_fd(self.fd(), at, segs, false) {
            if self.write_error.is_none() {
                let len: usize = segs.iter().map(|s| s.len).sum();
                self.write_error = Some(format!(
                    "{}: write of {len} bytes at offset {at} failed: {}",
                    self.path.display(),
                    io::Error::from_raw_os_error(errno)
                ));
            }
        }
    }

    /// The first failed ring write or fdatasync, if any: from then on the
    /// ring's on-disk state is unknown and the node must stop.
    pub fn write_error(&self) -> Option<&str> {
        self.write_error.as_deref()
    }

    /// Write synchronously every chunk not known to be in the file: the
    /// batch in flight's (again, the same bytes) and those appended since.
    fn write_out(&mut self) {
        let mut chunks: Vec<Chunk> = self
            .in_flight
            .iter()
            .flat_map(|f| f.chunks.iter().cloned())
            .collect();
        if !self.hold {
            chunks.append(&mut self.unwritten);
            // Its group block goes out now: later appends open another.
            self.open_group = None;
        }
        if chunks.is_empty() {
            return;
        }
        for (at, segs) in plan_writes(&chunks, self.capacity, &mut self.stage_spare) {
            self.write_segs(at, &segs);
        }
    }

    /// Write what is appended and the header, and fdatasync now; everything
    /// is durable afterwards.
    fn sync_header(&mut self) -> io::Result<()> {
        self.write_out();
        self.store_header();
        if let Some(e) = &self.write_error {
            return Err(io::Error::other(e.clone()));
        }
        self.file.sync_data()?;
        self.pending.clear();
        self.durable_seq = self.written_through();
        self.reclaim_pos = self.tail_pos;
        self.release_kept();
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

    /// Where a record with `payload_len` bytes of payload would go, or
    /// `None` if it does not fit now. A record with a payload joins the
    /// open group if that has room, the payload ends before the end of the
    /// group's lap and the group then spans at most
    /// [`Ring::max_group_span`]; else (and always without a payload) it
    /// opens a group at the head, or, if the group block and payload do
    /// not fit before the end of the area, after a wrap marker at the start
    /// of the next lap. Appends stop at the oldest byte a durable header may
    /// still hold.
    fn placement(&self, payload_len: u64) -> Option<Placement> {
        let cap = self.capacity;
        let padded = padded(payload_len);
        let head = self.head_pos;
        let place = match self.open_group {
            Some((g, n))
                if n < GROUP_RECORDS
                    && payload_len > 0
                    && head + padded <= (g / cap + 1) * cap
                    && head + padded - g <= self.max_group_span() =>
            {
                Placement {
                    marker: None,
                    group: None,
                    payload: head,
                    end: head + padded,
                }
            }
            _ => {
                let size = RING_BLOCK_BYTES + padded;
                if size > cap {
                    return None;
                }
                let room_to_end = cap - head % cap;
                let g = if size <= room_to_end {
                    head
                } else {
                    head + room_to_end
                };
                Placement {
                    marker: (g != head).then_some(head),
                    group: Some(g),
                    payload: g + RING_BLOCK_BYTES,
                    end: g + size,
                }
            }
        };
        let mut limit = round_down(self.reclaim_pos + cap);
        // Never where a batch in flight may still land (a synchronous
        // operation may have made its records durable and trimmable).
        if let Some(c) = self.in_flight.iter().find_map(|f| f.chunks.first()) {
            limit = limit.min(c.pos + cap);
        }
        // Nor where something appended is still to be written: under a
        // hold, records trimmed before they were written still go out
        // once it ends, although a header store may have moved the
        // durable tail past them.
        if let Some(c) = self.unwritten.first() {
            limit = limit.min(c.pos + cap);
        }
        (place.end <= limit).then_some(place)
    }

    /// The most bytes (group block and payloads) a group grows to by
    /// records joining it: an eighth of the data area. Trimmed space is
    /// reused by whole groups (the tail is a group block), so this bounds
    /// what a partly trimmed group holds back. (A record larger than that
    /// opens a group of its own.)
    fn max_group_span(&self) -> u64 {
        round_down(self.capacity / 8)
    }

    /// The highest seq whose record is in the file or being written: all
    /// of them, except under a hold (the `hold` field).
    fn written_through(&self) -> u64 {
        self.unwritten
            .first()
            .map_or(self.next_seq - 1, |c| c.seq - 1)
    }

    /// Append a record; `h.seq` must be [`Ring::next_seq`]. The ring keeps
    /// `payload` (no copy) and writes the record from it with the next batch
    /// ([`Ring::begin_write`] or [`Ring::prepare_sync`]); it is not durable
    /// until that batch's durable writes (or the fdatasync after that
    /// prepare) completed.
    pub fn append(&mut self, h: &RecordHeader, payload: SharedBuf) -> Result<(), RingFull> {
        assert_eq!(
            h.seq, self.next_seq,
            "ring append out of order: seqs are gap-free"
        );
        if payload.len() > u32::MAX as usize {
            return Err(RingFull);
        }
        let place = self.placement(payload.len() as u64).ok_or(RingFull)?;
        let chunk = |kind, pos, hdr| Chunk {
            kind,
            pos,
            seq: h.seq,
            hdr,
            payload: None,
        };
        if let Some(at) = place.marker {
            let marker = RecordHeader {
                seq: h.seq,
                gen: 0,
                kind: 0,
                flags: 0,
                offset: 0,
                len: 0,
            };
            let hdr = record_header(WRAP_MAGIC, &marker, self.epoch, self.durable_seq, &[]);
            self.unwritten.push(chunk(ChunkKind::Wrap, at, hdr));
        }
        if let Some(at) = place.group {
            self.unwritten.push(chunk(
                ChunkKind::Group,
                at,
                [0; RECORD_HEADER_BYTES as usize],
            ));
            self.open_group = Some((at, 0));
        }
        let hdr = record_header(RECORD_MAGIC, h, self.epoch, self.durable_seq, &payload);
        self.unwritten.push(Chunk {
            payload: (!payload.is_empty()).then(|| payload.clone()),
            ..chunk(ChunkKind::Record, place.payload, hdr)
        });
        let (group, members) = self.open_group.as_mut().expect("a group is open");
        *members += 1;
        let group = *group;
        if self.index.is_empty() {
            self.tail_pos = group;
        }
        self.index.push_back(Slot::new(
            group % self.capacity,
            place.payload - group,
            payload.len() as u64,
        ));
        self.head_pos = place.end;
        self.next_seq += 1;
        self.payload_bytes += payload.len() as u64;
        self.kept_bytes += payload.len() as u64;
        self.kept.push_back(Kept {
            h: *h,
            buf: payload,
        });
        Ok(())
    }

    /// Whether a record with `payload_len` bytes of payload fits now.
    pub fn fits(&self, payload_len: usize) -> bool {
        payload_len <= u32::MAX as usize && self.placement(payload_len as u64).is_some()
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

    fn slot(&self, seq: u64) -> Slot {
        self.index[(seq - self.first_seq) as usize]
    }

    /// Logical position of the block holding retained record `seq`'s
    /// header (its group block; format 2: its own header block). A group's
    /// block lies at or after the tail and before the head, so within one
    /// lap of the tail.
    fn pos_of(&self, seq: u64) -> u64 {
        let tail_phys = self.tail_pos % self.capacity;
        let phys = u64::from(self.slot(seq).block) * RECORD_ALIGN_BYTES;
        self.tail_pos + (phys + self.capacity - tail_phys) % self.capacity
    }

    /// Logical position where retained record `seq` ends (its payload's
    /// last block).
    fn end_of(&self, seq: u64) -> u64 {
        let slot = self.slot(seq);
        self.pos_of(seq)
            + u64::from(slot.rel) * RING_BLOCK_BYTES
            + padded(u64::from(slot.payload_len))
    }

    /// The record `seq` and its payload, if retained: from the buffer it
    /// arrived in while the ring keeps it, else through the mapping. The
    /// checksum is verified on every read from the mapping: a mismatch means
    /// the file changed under us (disk or memory corruption), and the node
    /// stops rather than serve it.
    pub fn get(&self, seq: u64) -> Option<(RecordHeader, &[u8])> {
        if seq < self.first_seq || seq >= self.next_seq {
            return None;
        }
        if seq >= self.kept_first {
            let k = &self.kept[(seq - self.kept_first) as usize];
            return Some((k.h, &k.buf[..]));
        }
        let slot = self.slot(seq);
        let phys = u64::from(slot.block) * RECORD_ALIGN_BYTES;
        let block = self.hdr_bytes(phys);
        let damaged = || {
            format!(
                "{}: index points to a damaged record for seq {seq} at data offset {phys}",
                self.path.display()
            )
        };
        let hdr_phys = match rd_u32(block, R_MAGIC) {
            RECORD_MAGIC => phys,
            GROUP_MAGIC => {
                let idx = seq.checked_sub(rd_u64(block, G_FIRST_SEQ));
                let count = u64::from(u16::from_le_bytes([block[G_COUNT], block[G_COUNT + 1]]));
                let idx = idx
                    .filter(|&i| i < count)
                    .unwrap_or_else(|| panic!("{}", damaged()));
                phys + GROUP_HEADER_BYTES + idx * RECORD_HEADER_BYTES
            }
            _ => panic!("{}", damaged()),
        };
        let hdr = self.hdr_bytes(hdr_phys);
        let payload_len = rd_u32(hdr, R_PAYLOAD_LEN) as usize;
        let from = phys + u64::from(slot.rel) * RING_BLOCK_BYTES;
        assert!(
            rd_u32(hdr, R_MAGIC) == RECORD_MAGIC
                && rd_u64(hdr, R_SEQ) == seq
                && payload_len == slot.payload_len as usize
                && from + payload_len as u64 <= self.capacity,
            "{}",
            damaged()
        );
        let from = (RING_HEADER_BYTES + from) as usize;
        let payload = &self.map[from..from + payload_len];
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

    /// The buffer record `seq`'s payload arrived in, while the ring keeps
    /// it (see [`Ring::release_through`]).
    pub fn payload_buf(&self, seq: u64) -> Option<SharedBuf> {
        if seq < self.first_seq.max(self.kept_first) || seq >= self.next_seq {
            return None;
        }
        Some(self.kept[(seq - self.kept_first) as usize].buf.clone())
    }

    /// The driver needs no payload buffer of a seq <= `seq` any more (it
    /// executed and sent those entries): the ring drops them once they are
    /// durable, and reads those records through the mapping from then on.
    pub fn release_through(&mut self, seq: u64) {
        self.released_through = self.released_through.max(seq);
        self.release_kept();
    }

    /// Keep at most `bytes` of payload buffers of durable records that were
    /// not released (default [`KEEP_DURABLE_BYTES`]).
    pub fn set_keep_bytes(&mut self, bytes: u64) {
        self.keep_limit = bytes;
        self.release_kept();
    }

    /// Payload bytes of the buffers the ring holds now: at most the
    /// payloads appended and not yet durable plus the keep limit.
    pub fn kept_bytes(&self) -> u64 {
        self.kept_bytes
    }

    /// Drop the buffers of durable records, oldest first, that were released
    /// or exceed the keep limit. A record not yet durable keeps its buffer:
    /// its write may not have reached the file.
    fn release_kept(&mut self) {
        while let Some(k) = self.kept.front() {
            let seq = self.kept_first;
            if seq > self.durable_seq
                || (seq > self.released_through && self.kept_bytes <= self.keep_limit)
            {
                break;
            }
            self.kept_bytes -= k.buf.len() as u64;
            self.kept.pop_front();
            self.kept_first += 1;
        }
    }

    fn payload_len_of(&self, seq: u64) -> u64 {
        u64::from(self.index[(seq - self.first_seq) as usize].payload_len)
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
            // Nothing left: the next append opens a group at the head.
            self.open_group = None;
            self.head_pos
        } else {
            self.pos_of(new_first)
        };
        self.index.drain(..(new_first - self.first_seq) as usize);
        while self.kept_first < new_first {
            let k = self
                .kept
                .pop_front()
                .expect("kept covers kept_first..next_seq");
            self.kept_bytes -= k.buf.len() as u64;
            self.kept_first += 1;
        }
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
        // What is appended goes to the file first, so the records kept are
        // there before the head moves back (under a hold, what was appended
        // since the hold began waits; the dropped part of it is forgotten).
        self.write_out();
        self.unwritten.retain(|c| c.seq <= seq);
        // Batches in flight may write where the head goes back to.
        self.hold |= !self.in_flight.is_empty();
        self.head_pos = self.end_of(seq);
        // The next append opens a group at the new head.
        self.open_group = None;
        self.index.truncate((seq + 1 - self.first_seq) as usize);
        while self.kept_first + self.kept.len() as u64 > seq + 1 {
            let Some(k) = self.kept.pop_back() else { break };
            self.kept_bytes -= k.buf.len() as u64;
        }
        self.next_seq = seq + 1;
        self.kept_first = self.kept_first.min(self.next_seq);
        self.epoch += 1;
        // The new epoch starts at the first record not in the file: under a
        // hold, the kept records still waiting are stamped with it, since
        // what the file holds where they go is older and must not pass.
        let epoch = self.epoch;
        for c in self
            .unwritten
            .iter_mut()
            .filter(|c| c.kind != ChunkKind::Group)
        {
            wr_u64(&mut c.hdr, R_EPOCH, epoch);
            let crc = record_crc(&c.hdr, c.payload.as_deref().unwrap_or(&[]));
            wr_u32(&mut c.hdr, R_CRC, crc);
        }
        self.epoch_first_seq = self.written_through() + 1;
        self.sync_header_or_fail("truncation");
    }

    /// Drop every record; the next append must carry `next_seq` (>= 1).
    /// Durable when it returns (one fdatasync of the ring file), unless
    /// [`Ring::write_error`] reports a failure.
    pub fn reset(&mut self, next_seq: u64) {
        assert!(next_seq >= 1, "seqs start at 1");
        // The dropped records may not be in the file yet: write them out so
        // the file holds what the batches in flight claim before the head
        // moves on (under a hold, what waits is dropped with them).
        self.write_out();
        self.unwritten.clear();
        self.open_group = None;
        self.index.clear();
        self.kept.clear();
        self.kept_bytes = 0;
        self.kept_first = next_seq;
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

    /// The ring file, for the batch writes issued through the backend
    /// (`BackendOp::WriteVecFd` with `dsync`).
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Remember a sync prepared for `seq`, with the tail its header holds.
    fn push_pending(&mut self, seq: u64) {
        self.push_pending_tail(seq, self.tail_pos);
    }

    /// Remember a sync prepared for `seq` that makes `tail_pos` the durable
    /// tail; returns its id.
    fn push_pending_tail(&mut self, seq: u64, tail_pos: u64) -> u64 {
        if self.pending.len() == MAX_PENDING_SYNCS {
            self.pending.pop_front();
        }
        self.sync_ids += 1;
        let id = self.sync_ids;
        self.pending.push_back(PendingSync { seq, tail_pos, id });
        id
    }

    /// Begin the asynchronous write of everything appended since the last
    /// one and of the header: `None` while [`MAX_BATCHES_IN_FLIGHT`] batches
    /// are in flight (appends made meanwhile go into a later batch; call
    /// again once one was reported). The caller runs the returned writes,
    /// each a durable write (`RWF_DSYNC`: complete means on stable storage),
    /// and reports with [`Ring::sync_completed`] once all of them completed
    /// in full and every batch begun before was reported (or with
    /// [`Ring::sync_failed`] if any write failed or was short). The writes
    /// hold the payload buffers they write from until they complete.
    pub fn begin_write(&mut self) -> Option<RingWrite> {
        if self.in_flight.len() >= MAX_BATCHES_IN_FLIGHT || self.hold {
            return None;
        }
        let chunks = std::mem::take(&mut self.unwritten);
        // A group belongs to one batch: the next append opens another.
        self.open_group = None;
        let mut writes = plan_writes(&chunks, self.capacity, &mut self.stage_spare);
        // The header goes along only when its tail is worth making durable
        // (or when there is nothing else to write): recovery finds the new
        // records by scanning, and each record says what was durable.
        let store = chunks.is_empty() || self.header_due();
        let slot = store.then(|| {
            let (slot, hb) = self.header_block();
            writes.push((
                slot as u64 * RING_HEADER_SLOT_BYTES,
                vec![IoSeg::whole(hb.share())],
            ));
            slot
        });
        let through = self.next_seq - 1;
        // A batch without a header store frees no trimmed space.
        let tail = if store {
            self.tail_pos
        } else {
            self.reclaim_pos
        };
        let id = self.push_pending_tail(through, tail);
        self.in_flight.push_back(InFlightBatch {
            through,
            id,
            chunks,
            slot,
        });
        Some(RingWrite { through, writes })
    }

    /// Whether the next batch should store the header: trimmed space waits
    /// for it, and either an eighth of the ring waits or the ring is more
    /// than half full. (A mirrored pair trims after nearly every batch; a
    /// header store per batch would double a batch's durable writes.)
    fn header_due(&self) -> bool {
        self.reclaim_pending()
            && (self.tail_pos - self.reclaim_pos >= self.capacity / 8
                || self.used_bytes() > self.capacity / 2)
    }

    /// Batches begun by [`Ring::begin_write`] and not reported yet.
    pub fn writes_in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// A batch for `through` was reported: forget the oldest batch in
    /// flight for it, and those before it. Batches are reported in order,
    /// once every write of theirs completed, so none of their stores can
    /// land any more. Returns the reported batch's sync id, if it was still
    /// in flight.
    fn batch_reported(&mut self, through: u64) -> Option<u64> {
        let i = self.in_flight.iter().position(|f| f.through >= through);
        let i = i.unwrap_or(self.in_flight.len());
        let reported = self
            .in_flight
            .get(i)
            .filter(|f| f.through == through)
            .map(|f| f.id);
        self.in_flight.drain(..i + usize::from(reported.is_some()));
        if self.in_flight.is_empty() {
            self.hold = false;
        }
        reported
    }

    /// Write what was appended since the last write and the header block,
    /// synchronously. Returns the highest seq that an fdatasync of
    /// [`Ring::fd`] issued after this call makes durable (`next_seq() - 1`).
    /// Report that fdatasync's success with [`Ring::sync_completed`];
    /// without it trimmed space is never reused. (The node uses
    /// [`Ring::begin_write`]; this is the same protocol on the caller's
    /// thread.)
    pub fn prepare_sync(&mut self) -> u64 {
        self.write_out();
        self.store_header();
        let seq = self.written_through();
        self.push_pending(seq);
        seq
    }

    /// The fdatasync issued after the `prepare_sync` that returned
    /// `synced_seq` completed successfully, or so did every durable write of
    /// the `begin_write` batch of that `through` (and of those before it).
    /// Call once per completed fdatasync, in any order. (A failed write or
    /// fdatasync must not be reported here: see [`Ring::sync_failed`].)
    pub fn sync_completed(&mut self, synced_seq: u64) {
        let batch = self.batch_reported(synced_seq);
        if self.write_error.is_some() {
            // After a failed write or fdatasync a later fdatasync may succeed
            // without what the failed one lost: nothing becomes durable.
            return;
        }
        // A batch's own sync (a synchronous operation since may have made it
        // moot: then it is gone), else a `prepare_sync`'s of that seq.
        let found = match batch {
            Some(id) => self.pending.iter().position(|p| p.id == id),
            None => self.pending.iter().position(|p| p.seq == synced_seq),
        };
        let Some(i) = found else {
            return; // covered by a later sync that completed first
        };
        let done = self.pending[i];
        self.pending.drain(..=i);
        self.durable_seq = self.durable_seq.max(done.seq);
        self.reclaim_pos = self.reclaim_pos.max(done.tail_pos);
        self.release_kept();
    }

    /// A write of the batch, or the fdatasync issued after the sync that
    /// returned `synced_seq`, failed: the kernel may have dropped the ring's
    /// dirty pages, so its on-disk state is unknown. Kept for
    /// [`Ring::write_error`]; nothing is reported durable by it.
    pub fn sync_failed(&mut self, synced_seq: u64, why: String) {
        self.batch_reported(synced_seq);
        if self.write_error.is_none() {
            self.write_error = Some(format!(
                "{}: the write or fdatasync that was to make seq {synced_seq} durable failed: \
                 {why}",
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
            if let Some(e) = &self.write_error {
                return Err(io::Error::other(e.clone()));
            }
            self.file.sync_data()?;
            // This fdatasync covers every sync prepared so far.
            let latest = self.pending.pop_back().expect("just prepared");
            self.pending.clear();
            self.durable_seq = self.durable_seq.max(latest.seq);
            self.reclaim_pos = self.reclaim_pos.max(latest.tail_pos);
        }
        self.release_kept();
        Ok(())
    }
}

impl Drop for Ring {
    /// A clean close writes what was appended (without making it durable).
    /// A process that is killed loses what it appended since its last
    /// flush: those records were never durable.
    fn drop(&mut self) {
        if self.write_error.is_none() {
            self.write_out();
        }
    }
}
