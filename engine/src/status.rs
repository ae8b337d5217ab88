//! What a node reports to the control plane (status, metrics) and the
//! commands it accepts. Off the data path: the reactor publishes a snapshot
//! a few times a second and polls for commands between batches.

use serde::{Deserialize, Serialize};

/// Statistics of one finished (or running) replay to the peer.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ReplayStats {
    /// Ring entries sent during the replay.
    pub entries: u64,
    /// Payload bytes sent (ring entries plus dirty-map extents).
    pub bytes: u64,
    /// Dirty-map extents sent (current data).
    pub extents: u64,
    /// Seconds from start to catch-up (so far, while running).
    pub seconds: f64,
    /// Entries / bytes still to send (0 once finished).
    pub remaining_entries: u64,
    pub remaining_bytes: u64,
    /// True when this replay was a full remirror (new or replaced disk).
    pub full_remirror: bool,
    /// First and last seq streamed (the peer missed exactly these entries).
    pub first_seq: u64,
    pub last_seq: u64,
}

/// An online verify (`deltamirror verify`), running or the last one.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct VerifyStatus {
    /// "running", "done" or "interrupted".
    pub state: String,
    /// Why it was interrupted.
    pub reason: Option<String>,
    pub offset: u64,
    pub length: u64,
    pub done_bytes: u64,
    pub chunk_bytes: u64,
    /// Chunks whose digests differ between the two nodes.
    pub mismatched_chunks: u64,
    /// The first mismatched ranges, `[offset, length]` (adjacent chunks merged).
    pub mismatches: Vec<(u64, u64)>,
    pub repair: bool,
    /// Chunks sent for a resync from the primary.
    pub repair_chunks: u64,
    pub seconds: f64,
}

/// What `POST /verify` asks for.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VerifyRequest {
    pub offset: u64,
    /// 0: to the end of the volume.
    pub length: u64,
    pub repair: bool,
    /// 0: no limit.
    pub bytes_per_sec: u64,
}

/// Latency percentiles in microseconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    pub count: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
}

/// Host I/O counters of this node (since start).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct IoStats {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub errors: u64,
    pub read_latency: Latency,
    pub write_latency: Latency,
    /// Ring durability: submission to completion of each ring fdatasync.
    #[serde(default)]
    pub ring_sync_latency: Latency,
    /// Disk writes this node executed (host REQs and replayed ones alike).
    #[serde(default)]
    pub disk_write_latency: Latency,
    /// Where a mirrored write's time goes, sampled one write at a time
    /// (every write at QD1): see [`WriteStages`].
    #[serde(default)]
    pub stages: WriteStages,
}

/// The stages of a mirrored write, each measured from the stage's start
/// point to when it was reached, for one sampled write at a time (a new
/// sample begins once the last one finished: every write at queue depth 1,
/// a fraction at depth). On the primary from when the front-end received
/// the write; on the backup from when the REQ arrived.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct WriteStages {
    /// Primary: the REQ handed to the replication link.
    pub req_sent: Latency,
    /// Primary and backup: the write's ring batch durable.
    pub ring_durable: Latency,
    /// Primary: the ACK1 covering it received. Backup: that ACK1 sent.
    pub ack1: Latency,
    /// Primary: the disk write issued (both conditions met).
    pub execute: Latency,
    /// Primary: the disk write done (the host's completion follows).
    pub executed: Latency,
}

/// One node's full status. `peer_state` is one of "connected",
/// "replaying", "disconnected", "refused".
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct NodeStatus {
    pub pid: u32,
    pub node_id: u32,
    pub node_name: String,
    /// "primary" or "backup".
    pub role: String,
    pub generation: u64,
    /// "connected", "replaying", "disconnected" or "refused".
    pub peer_state: String,
    /// Why the peer was refused (split brain, wrong key, ...), if it was.
    pub peer_refused_reason: Option<String>,
    /// True while this node serves host I/O.
    #[serde(default)]
    pub serving: bool,
    /// Why it does not serve (waiting for the peer, fenced, backup...).
    #[serde(default)]
    pub not_serving_reason: Option<String>,
    /// Fenced after refusing the peer (split brain): serves nothing until
    /// an operator resolves it. The reason.
    #[serde(default)]
    pub fenced_reason: Option<String>,
    /// Fenced by the failover agent (it lost both etcd and the peer): the
    /// reason. Serves nothing until the agent lifts it.
    #[serde(default)]
    pub self_fenced_reason: Option<String>,
    /// Automatic failover: writes wait for this stale mark to be recorded
    /// in etcd before they may complete without the backup.
    #[serde(default)]
    pub stale_mark_wanted: Option<StaleMarkWanted>,
    /// Automatic failover (`failover.mode = "etcd"`): the agent's view.
    /// None in manual mode.
    #[serde(default)]
    pub failover: Option<FailoverStatus>,
    /// Backup: caught up with the primary since it started, so `promote`
    /// loses no acknowledged write.
    #[serde(default)]
    pub current: bool,
    /// Generations opened by `promote --force`.
    #[serde(default)]
    pub forced_generations: Vec<u64>,
    /// True while the primary serves writes without the backup (degraded).
    pub degraded: bool,
    /// "backup stale from seq S", when degraded.
    pub peer_stale_from_seq: Option<u64>,
    /// Highest seq assigned (primary) or received (backup).
    pub head_seq: u64,
    /// Highest seq executed on this node's disk (contiguous).
    pub executed_seq: u64,
    /// Delta queue: entries this node holds that the peer has not been
    /// confirmed to have executed.
    pub delta_entries: u64,
    pub delta_bytes: u64,
    pub ring_capacity_bytes: u64,
    /// Where the ring is and how it is written, e.g. "/var/lib/dm/ring:
    /// regular file, O_DIRECT" or "/dev/nvme1n1: block device of … bytes
    /// (logical blocks of 4096 bytes), O_DIRECT".
    #[serde(default)]
    pub ring_location: String,
    pub ack1_seq: u64,
    pub ack2_seq: u64,
    pub ack3_seq: u64,
    pub dirty_extents: u64,
    pub dirty_bytes: u64,
    /// Chunk size of the dirty map (the exact per-block map: the block size).
    #[serde(default)]
    pub dirty_granularity_bytes: u64,
    /// Memory the dirty map takes, one bit per chunk of the volume.
    #[serde(default)]
    pub dirty_map_memory_bytes: u64,
    /// Full remirrors (sent or received) since format.
    pub remirrors: u64,
    /// The running online verify, or the last one.
    #[serde(default)]
    pub verify: Option<VerifyStatus>,
    pub last_replay: Option<ReplayStats>,
    /// Present while a replay is running.
    pub replay_progress: Option<ReplayStats>,
    pub io: IoStats,
    /// Replication link: messages and bytes each way, heartbeats missed.
    pub link_msgs_sent: u64,
    pub link_msgs_received: u64,
    pub link_bytes_sent: u64,
    pub link_bytes_received: u64,
    /// Peers the link refused since start: a failed PSK handshake, or a
    /// fabric connection request without this connection's token.
    pub link_peers_refused: u64,
    pub uptime_seconds: f64,
    /// Resident set size of the process, bytes.
    pub rss_bytes: u64,
    /// The node's buffer pool and the user-space copies of write payloads.
    #[serde(default)]
    pub buffers: BufferStats,
    /// Busy and idle time of each reactor thread since the node started:
    /// the node's reactor first, then the connection reactors of the
    /// other cores of `reactor.cores`.
    #[serde(default)]
    pub reactors: Vec<ReactorLoad>,
    /// How the disk's io_uring hands operations to the kernel
    /// (`reactor.disk_handover`); `None` for a backend without a kernel
    /// ring.
    #[serde(default)]
    pub disk_handover: Option<DiskHandOverStatus>,
}

/// `reactor.disk_handover` at work (storage::backend::handover): the mode
/// in use and, when it is adaptive, the figures of its last comparison.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct DiskHandOverStatus {
    /// "at-once" (one `io_uring_enter` per operation) or "in-chunks".
    pub mode: String,
    /// The mode is chosen by measurement (`disk_handover = "adaptive"`).
    pub adaptive: bool,
    /// Comparisons finished, and how many of them chose "at-once".
    pub comparisons: u64,
    pub chose_at_once: u64,
    /// Disk operations completed per second in each mode, in the last
    /// comparison.
    pub at_once_ops_per_sec: u64,
    pub in_chunks_ops_per_sec: u64,
}

impl DiskHandOverStatus {
    pub fn of(backend: &impl storage::backend::Backend) -> Option<Self> {
        let (mode, stats) = backend.hand_over()?;
        let s = stats.unwrap_or_default();
        Some(DiskHandOverStatus {
            mode: mode.name().into(),
            adaptive: stats.is_some(),
            comparisons: s.comparisons,
            chose_at_once: s.chose_at_once,
            at_once_ops_per_sec: s.at_once_per_sec,
            in_chunks_ops_per_sec: s.in_chunks_per_sec,
        })
    }
}

/// Where one reactor thread's time went since it started
/// (`netreactor::Load`): passes that found work are busy; passes that
/// found none, with the yields and sleeps after them, are idle. Busy time
/// over the I/Os served is the reactor's cost per I/O.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ReactorLoad {
    /// The thread: `dm-reactor-<node id>` (the node's reactor: the mirror
    /// core, the disk and the connections of `reactor.cores[0]`) or
    /// `dm-conn-<i>` (the connections of `reactor.cores[i]`).
    pub thread: String,
    /// The core it is pinned to, if any.
    pub core: Option<usize>,
    pub busy_us: u64,
    pub idle_us: u64,
}

/// The node's buffer pool (`reactor.buffer_pool_mib`) and how often a
/// write's payload was copied in user space by the engine.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct BufferStats {
    pub pool_bytes: u64,
    /// Bytes of the pool's buffers handed out now.
    pub pool_in_use_bytes: u64,
    /// Requests that found the pool empty (back-pressure events: a
    /// front-end or the link waited for a buffer).
    pub pool_misses: u64,
    /// The pool is registered with the disk's io_uring (fixed buffers).
    pub pool_registered: bool,
    /// Registrations that failed (then disk I/O uses plain buffers).
    pub pool_registration_failures: u64,
    /// Disk reads and writes issued as fixed-buffer operations.
    pub fixed_disk_ops: u64,
    /// Payload bytes of writes the engine copied in user space, where:
    /// the link receive buffer into a pool buffer (backup), a ring
    /// entry into a disk-write buffer (`Execute` of an entry the ring no
    /// longer holds the buffer of), a ring entry into the link's transmit
    /// buffer. The front-end's socket receive and the ring's own append
    /// are not counted here (docs/performance.md lists them).
    pub payload_copy_bytes: u64,
    /// Of `payload_copy_bytes`: the link receive copies (the backup's
    /// one copy), the ring-to-disk-buffer copies of `Execute`, and the
    /// ring-to-transmit-buffer copies of the link (TCP without the
    /// entry's buffer; fabric: always, into its staging ring).
    pub link_receive_copy_bytes: u64,
    pub execute_copy_bytes: u64,
    pub link_send_copy_bytes: u64,
    /// Payload bytes the front-ends (NBD, NVMe/TCP, iSCSI) copied from a
    /// connection's receive buffer into the write's buffer: writes below
    /// `reactor.zero_copy_receive_min_bytes`, received in bulk, and the
    /// part of a larger write that came in the same receive as its header.
    /// Filled in by the binary (not part of `payload_copy_bytes`).
    #[serde(default)]
    pub frontend_receive_copy_bytes: u64,
}

/// The stale mark a primary waits for before it completes writes without
/// the backup (automatic failover).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct StaleMarkWanted {
    /// The generation degraded mode opens.
    pub generation: u64,
    /// First seq the backup lacks.
    pub from_seq: u64,
    /// How long writes have been waiting for it.
    pub waiting_ms: u64,
}

/// The failover agent's state (`failover.mode = "etcd"`), in `status`
/// (the `failover` object) and `/metrics`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct FailoverStatus {
    /// "etcd".
    pub mode: String,
    /// The election key in etcd.
    pub key: String,
    /// The node named by the key ("" when nobody holds it or etcd was not
    /// read), and the generation it names.
    pub lease_holder: String,
    pub lease_holder_node_id: Option<u32>,
    pub lease_generation: Option<u64>,
    /// This node holds the key under its lease.
    pub holds_lease: bool,
    /// This node's lease: time left on its own monotonic clock before it
    /// must consider the lease lost (ms; 0 when it holds none).
    pub lease_left_ms: u64,
    /// Since the last successful renewal (ms; None when never renewed).
    pub last_renewal_ms_ago: Option<u64>,
    /// The highest generation recorded in etcd.
    pub etcd_generation: Option<u64>,
    /// etcd answered the last request.
    pub etcd_reachable: bool,
    /// The last etcd error, or why the agent distrusts what it read.
    pub etcd_error: Option<String>,
    /// The stale mark in etcd ("backup node N stale from seq S"), if any.
    pub stale_mark: Option<String>,
    /// The agent fenced this node, and why.
    pub fenced: bool,
    pub fenced_reason: Option<String>,
    /// The last transition and its reason.
    pub last_transition: Option<String>,
    /// Transitions since start.
    pub transitions: u64,
}

/// Commands of the failover agent to its node.
#[derive(Clone, Debug, PartialEq)]
pub enum FailoverCommand {
    /// Promote to a generation of at least `floor` (won in etcd).
    PromoteTo { force: bool, floor: u64 },
    /// Stop serving: the node lost both etcd and the peer.
    SelfFence(String),
    /// Serve again: the node regained its quorum.
    LiftFence(String),
    /// etcd holds the stale mark (generation, first seq the backup lacks).
    StaleRecorded { gen: u64, from_seq: u64 },
}

/// The control interface the admin endpoint drives.
pub trait Control: Send + Sync + 'static {
    fn status(&self) -> NodeStatus;
    /// Make this node the primary (executes everything it holds, bumps the
    /// generation, starts serving).
    /// `force` skips the checks that it loses no acknowledged write
    /// (`promote --force`): the new generation is recorded as forced.
    fn promote(&self, force: bool) -> Result<(), String>;
    /// Make this node a backup (stops serving writes).
    fn demote(&self) -> Result<(), String>;
    /// Start the latency histograms (host read/write, ring sync, disk
    /// write) afresh, e.g. between benchmark workloads. Counters stay.
    fn reset_latency(&self) -> Result<(), String>;
    /// Start an online verify of both replicas (primary only).
    fn verify(&self, req: VerifyRequest) -> Result<(), String>;
}
