//! Basic types of the mirror protocol.

/// Sequence number of a mirrored request: strictly increasing, gap-free,
/// never reused. 0 means "none".
pub type Seq = u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Primary,
    Backup,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Backup => "backup",
        }
    }
}

/// The mutating host operations that are mirrored (REQs). FLUSH is a
/// barrier, not a REQ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ReqKind {
    Write = 1,
    WriteZeroes = 2,
    Discard = 3,
    /// A new replicated state blob (the front-ends' small persistent record,
    /// e.g. SCSI persistent reservations): offset and len 0, the payload is
    /// the blob (at most [`MAX_STATE_BYTES`]). "Executing" it stores the blob
    /// in the node's metadata instead of writing the disk.
    State = 4,
}

/// Largest replicated state blob.
pub const MAX_STATE_BYTES: usize = volume::MAX_STATE_BYTES;

impl ReqKind {
    pub fn from_code(c: u8) -> Option<ReqKind> {
        match c {
            1 => Some(ReqKind::Write),
            2 => Some(ReqKind::WriteZeroes),
            3 => Some(ReqKind::Discard),
            4 => Some(ReqKind::State),
            _ => None,
        }
    }
}

/// Header of a REQ as stored in the ring and sent on the link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReqHeader {
    pub seq: Seq,
    /// Generation the primary was in when it assigned `seq`.
    pub gen: u64,
    pub kind: ReqKind,
    pub fua: bool,
    /// Byte offset and length on the volume.
    pub offset: u64,
    pub len: u64,
}

impl ReqHeader {
    pub fn overlaps(&self, offset: u64, len: u64) -> bool {
        ranges_overlap(self.offset, self.len, offset, len)
    }
}

pub fn ranges_overlap(a: u64, alen: u64, b: u64, blen: u64) -> bool {
    a < b + blen && b < a + alen
}

/// One step of the generation history: generation `gen` started at
/// `first_seq`, opened by node `origin` (0 = format).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GenEntry {
    pub gen: u64,
    pub first_seq: Seq,
    pub origin: u32,
}

/// When a node may drop a REQ from its delta queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfirmMode {
    /// ACK2 (backup executed) / ACK3 (primary executed).
    Ack,
    /// A configured period after ACK1 during which heartbeats showed the
    /// peer alive with the same incarnation.
    Timeout { period_ms: u64 },
}

/// Static configuration of a mirror core.
#[derive(Clone, Debug)]
pub struct CoreConfig {
    pub node_id: u32,
    pub confirm: ConfirmMode,
    /// ACK1 only after the backup's ring range is durable.
    pub ack1_persisted: bool,
    /// Volume size in bytes.
    pub volume_bytes: u64,
    /// Dirty-map chunk size in bytes (power of two).
    pub dirty_granularity_bytes: u64,
    /// Most REQs executing on the disk at once.
    pub max_executing: usize,
    /// Most REQs sent and not yet covered by ACK1.
    pub max_unacked_entries: u64,
    /// Most dirty-extent reads / messages in flight during a resync.
    pub max_resync_inflight: usize,
    pub heartbeat_interval_ms: u64,
    pub peer_timeout_ms: u64,
    /// Replay/resync bandwidth ceiling, bytes per second (0 = unlimited).
    pub max_replay_bytes_per_sec: u64,
    /// Replay/resync bandwidth floor, bytes per second (0 = none): while a
    /// replay runs below it, new host writes wait so the replay catches up.
    pub min_replay_bytes_per_sec: u64,
    /// One cumulative ACK per poll (true, the default) or one ACK message per
    /// REQ (false; for measuring what coalescing saves).
    pub coalesce_acks: bool,
    /// Automatic failover (`failover.mode = "etcd"`): `Some(timeout_ms)`. A
    /// primary then completes no write without the backup before the
    /// failover agent confirmed (`Core::stale_recorded`) that the backup's
    /// staleness is recorded in etcd; writes wait at most `timeout_ms` for
    /// it, then fail with a retryable error. `None`: manual failover.
    pub stale_gate_ms: Option<u64>,
    /// Fingerprint of the failover configuration (0: manual). Sent in the
    /// `Hello`; both nodes of a pair must agree.
    pub failover_id: u64,
}

impl CoreConfig {
    pub fn for_tests(node_id: u32, volume_bytes: u64) -> Self {
        CoreConfig {
            node_id,
            confirm: ConfirmMode::Ack,
            ack1_persisted: true,
            volume_bytes,
            dirty_granularity_bytes: 4096 * 4,
            max_executing: 16,
            max_unacked_entries: 64,
            max_resync_inflight: 4,
            heartbeat_interval_ms: 50,
            peer_timeout_ms: 300,
            max_replay_bytes_per_sec: 0,
            min_replay_bytes_per_sec: 0,
            coalesce_acks: true,
            stale_gate_ms: None,
            failover_id: 0,
        }
    }
}

/// What a disk operation the core asked for stands for. The driver hands it
/// back unchanged with the completion (`Event::Executed`, `ExtentRead`,
/// `DiskFlushed`); it never goes on the wire, except a flush's number as the
/// id of a `FlushReq`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Token {
    /// Ring entry `seq` (executed on the disk, or a State entry executed in
    /// the metadata).
    Entry(Seq),
    /// A resync extent: written on the receiver, read on the sender.
    Extent(u64),
    /// An online-verify read of an extent.
    Verify(u64),
    /// A disk flush.
    Flush(u64),
}
