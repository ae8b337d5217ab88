//! The mirror state machine of one node.
//!
//! Write path on the primary: a host write gets the next seq and is
//! appended to the ring (delay buffer + delta queue), streamed to the
//! backup, and executed on the local disk only once ACK1 covers it and the
//! local ring append is durable (I1). It completes to the host after the
//! local execution (I2). Entries leave the delta queue once the peer is
//! known to have executed them (I3).
//!
//! The same machine plays the backup: it appends what it receives, answers
//! cumulative ACK1 (after its ring range is durable when `ack1_persisted`),
//! executes in seq order where ranges overlap, and answers ACK2.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::decide::{decide, Plan};
use super::meta::Meta;
use super::msg::{Hello, Msg};
use super::types::*;
use super::verify::{
    chunk_digests, mismatched_chunks, Pending, QueuedRead, ReadFor, VerifyReport, VerifyRun,
    VerifyState, MAX_VERIFY_CHUNKS, MAX_VERIFY_EXTENT, VERIFY_TOKEN,
};
use super::Log;

#[path = "state.rs"]
mod state;

/// Ring syncs that may overlap.
const MAX_LOG_SYNCS: u8 = 2;

/// Tokens of resync extents are kept apart from seqs by this bit.
const EXTENT_TOKEN: u64 = 1 << 63;

#[derive(Debug)]
pub enum Event {
    /// The replication link is up and the peer authenticated.
    PeerConnected,
    /// The replication link went down.
    PeerDisconnected,
    PeerMsg(Msg),
    /// A `SyncLog` finished: every ring entry up to `through` is durable.
    LogSynced {
        through: Seq,
    },
    /// The flush for `through` failed: the ring's on-disk state is unknown.
    LogFlushFailed {
        through: Seq,
        why: String,
    },
    MetaPersisted {
        version: u64,
    },
    /// A ring entry (token = seq) or resync extent finished on the disk.
    Executed {
        token: u64,
        result: Result<(), i32>,
    },
    ExtentRead {
        token: u64,
        offset: u64,
        result: Result<Vec<u8>, i32>,
    },
    DiskFlushed {
        token: u64,
        result: Result<(), i32>,
    },
    Tick {
        now_ms: u64,
    },
}

#[derive(Debug, PartialEq)]
pub enum Action {
    Send(Msg),
    /// Send ring entry `seq` as a `Msg::Req`.
    SendEntry(Seq),
    /// Make the ring durable: the driver calls `Core::begin_log_flush`,
    /// carries out the flush I/O it returns and answers `LogSynced` or
    /// `LogFlushFailed` with the seq it returned.
    SyncLog,
    PersistMeta {
        version: u64,
        bytes: Vec<u8>,
    },
    /// Execute ring entry `seq` on the disk; answer `Executed { token: seq }`.
    Execute {
        seq: Seq,
    },
    /// Write resync data; answer `Executed { token }`.
    WriteExtent {
        token: u64,
        offset: u64,
        data: Vec<u8>,
    },
    /// Read current data for a resync; answer `ExtentRead`.
    ReadExtent {
        token: u64,
        offset: u64,
        len: u64,
    },
    FlushDisk {
        token: u64,
    },
    CompleteWrite {
        id: u64,
        result: Result<(), HostError>,
    },
    CompleteFlush {
        id: u64,
        result: Result<(), HostError>,
    },
    /// Drop the replication connection (protocol violation, silent peer,
    /// role change); the driver reconnects.
    ResetLink {
        reason: String,
    },
    /// The node starts (true) or stops (false) serving host I/O.
    PathChanged {
        serving: bool,
    },
    /// Something the operator should see in the log.
    Notice(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostError {
    NotPrimary,
    Io(i32),
    Unavailable,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkState {
    Down,
    /// Hello sent; waiting for the peer's.
    Handshake,
    /// Source: waiting for the target's `Ready`.
    AwaitReady,
    /// Target: preparing `Ready` (ring sync pending).
    SendingReady,
    Active,
    Refused(String),
}

impl LinkState {
    pub fn as_str(&self) -> &'static str {
        match self {
            LinkState::Down => "down",
            LinkState::Handshake | LinkState::AwaitReady | LinkState::SendingReady => "handshake",
            LinkState::Active => "active",
            LinkState::Refused(_) => "refused",
        }
    }
}

/// `s` cut to at most `max` characters, marked when cut.
fn bounded(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

struct Waiting {
    id: u64,
    kind: ReqKind,
    offset: u64,
    len: u64,
    fua: bool,
    payload: Vec<u8>,
}

struct HostFlush {
    id: u64,
    token: u64,
    local_done: Option<Result<(), i32>>,
    peer_done: bool,
    /// Session in which the FlushReq was sent (resent after a reconnect).
    session: u64,
}

struct PeerFlush {
    id: u64,
    through: Seq,
    token: Option<u64>,
}

#[derive(Clone, Copy, Debug)]
enum ExecItem {
    /// seq, byte offset, byte length (kept here so scheduling never has to
    /// read the ring).
    Entry(Seq, u64, u64),
    /// token, byte offset, byte length.
    Extent(u64, u64, u64),
    /// An online-verify read: token, byte offset, byte length.
    Verify(u64, u64, u64),
    /// A `ReqKind::State` entry: overlaps nothing.
    State(Seq),
}

impl ExecItem {
    fn range(&self) -> (u64, u64) {
        match *self {
            ExecItem::Entry(_, o, l) | ExecItem::Extent(_, o, l) | ExecItem::Verify(_, o, l) => {
                (o, l)
            }
            ExecItem::State(_) => (0, 0),
        }
    }
}

/// A target between the handshake decision and `Ready`.
struct PendingTarget {
    /// Metadata version holding the rollback extents and the role.
    gate: u64,
    /// Drop ring entries after this seq.
    truncate: Option<Seq>,
    /// The authority's history, adopted once the truncation is durable.
    history: Vec<GenEntry>,
}

/// Source side of a dirty-map resync / full remirror.
struct ResyncSource {
    next_chunk: u64,
    reads_inflight: usize,
    end_seq: Seq,
    ended: bool,
}

/// Target side of a resync.
struct ResyncTarget {
    meta_version: u64,
    end: Option<Seq>,
    full: bool,
    /// The disk flush that makes the resynced data durable before the node
    /// records its disk consistent: `Some(token)` while in flight.
    flush_token: Option<u64>,
    flushed: bool,
    /// From `ResyncEnd`: the extents hold the source's disk as of this seq.
    consistent_at: Seq,
}

#[derive(Clone, Debug, Default)]
pub struct ReplayProgress {
    pub start_ms: u64,
    pub end_ms: u64,
    pub entries: u64,
    pub bytes: u64,
    pub extents: u64,
    pub target_seq: Seq,
    pub first_seq: Seq,
    pub full: bool,
    pub done: bool,
}

pub struct Core<L: Log> {
    cfg: CoreConfig,
    /// Private to the core: drivers read it through [`Core::log`] and drive
    /// its flushes through [`Core::begin_log_flush`] and the flush events.
    pub(in crate::core) log: L,
    meta: Meta,
    meta_version: u64,
    meta_durable: u64,
    meta_inflight: bool,
    meta_dirty: bool,
    /// Metadata version that made the current role durable.
    role_version: u64,
    now_ms: u64,
    serving: bool,
    failed: Option<String>,

    // Write path.
    waiting: VecDeque<Waiting>,
    /// Host ids of entries not yet executed locally.
    host_of: BTreeMap<Seq, u64>,
    log_durable: Seq,
    /// Ring syncs in flight (at most `MAX_LOG_SYNCS`) and the head the
    /// newest one covers: a second sync overlaps the first so appends made
    /// meanwhile do not wait for two full fdatasyncs.
    log_syncs_inflight: u8,
    log_sync_issued: Seq,
    ack1: Seq,
    ack2: Seq,
    ack3: Seq,
    executed: Seq,
    done_out_of_order: BTreeSet<Seq>,
    exec_next: Seq,
    exec_queue: VecDeque<ExecItem>,
    executing: Vec<(u64, u64, u64)>,
    extents: BTreeMap<u64, (u64, Vec<u8>)>,
    next_token: u64,

    // Degraded mode.
    degrade_version: Option<u64>,
    degraded: bool,
    /// Seqs below this may execute without ACK1 (degraded, durably recorded).
    no_ack_below: Seq,
    fold_pending: Option<(u64, Seq)>,

    // Link.
    link: LinkState,
    source: bool,
    peer_hello: Option<Hello>,
    last_rx_ms: u64,
    last_hb_ms: u64,
    alive_since_ms: u64,
    send_next: Seq,
    /// Highest FUA entry appended (received mode acks it only once durable).
    fua_sync_through: Seq,
    resync_meta_gate: u64,
    pending_target: Option<PendingTarget>,
    sent_ack1: Seq,
    sent_ack2: Seq,
    sent_ack3: Seq,
    rx_backlog: VecDeque<(ReqHeader, Vec<u8>)>,
    ack_times: VecDeque<(Seq, u64)>,
    resync_src: Option<ResyncSource>,
    resync_tgt: Option<ResyncTarget>,
    resync_done_sent: bool,
    replay: Option<ReplayProgress>,
    pub last_replay: Option<ReplayProgress>,
    rate_tokens: f64,
    /// (ms, replay bytes) samples, one per 100 ms while a replay runs: the
    /// replay rate over the last second, for the floor.
    replay_samples: VecDeque<(u64, u64)>,
    session: u64,
    /// The replicated state blob's session bookkeeping (`state.rs`).
    st: state::StateSync,

    // Roles.
    /// A primary that (re)started waits for the peer's handshake before it
    /// serves: the peer may have been promoted meanwhile. `promote` forces.
    awaiting_peer: bool,
    promoting: bool,
    demoting: bool,
    /// The promotion in progress was forced (`promote --force`).
    forced_promote: bool,
    /// Backup: holds every write the primary may have completed, so a
    /// promote loses nothing. Set once the source's `InSync` seq is durable
    /// here; false at every start and every new handshake.
    current: bool,
    /// Backup: the source's `InSync` seq in this session.
    in_sync_at: Option<Seq>,
    /// Source: `InSync` sent in this session.
    in_sync_sent: bool,
    /// The handshake refused the peer (split brain...): this node serves
    /// nothing until an operator resolves it (I6). The reason.
    fenced: Option<String>,
    host_flushes: Vec<HostFlush>,
    peer_flushes: Vec<PeerFlush>,
    // Online verify.
    verify: Option<VerifyRun>,
    last_verify: Option<VerifyReport>,
    /// Verify reads waiting for their ring entry to be scheduled, by seq.
    verify_queued: VecDeque<QueuedRead>,
    verify_reads: BTreeMap<u64, ReadFor>,
    executed_persisted_ms: u64,

    out: Vec<Action>,
    pub stats: CoreStats,
}

#[derive(Clone, Debug, Default)]
pub struct CoreStats {
    pub entries_sent: u64,
    pub entries_received: u64,
    pub replayed_entries: u64,
    pub replayed_bytes: u64,
    pub resync_extents: u64,
    /// Handshakes (as the authority) that decided a replay, and those that
    /// began with a dirty-map resync (a full remirror not counted).
    pub replays: u64,
    pub dirty_resyncs: u64,
}

impl<L: Log> Core<L> {
    /// Builds a node from its recovered state. `meta.incarnation` should
    /// already be bumped (and persisted) by the caller for this start.
    pub fn new(cfg: CoreConfig, meta: Meta, log: L, now_ms: u64) -> Self {
        let head = log.head();
        // Entries at or below the persisted executed watermark were executed;
        // later ones are executed again (in order, so the result is the same).
        let executed = meta.executed.min(head).max(log.first_seq() - 1);
        let degraded = meta.peer_stale_from.is_some() && meta.role == Role::Primary;
        let mut c = Core {
            serving: false,
            failed: None,
            waiting: VecDeque::new(),
            host_of: BTreeMap::new(),
            log_durable: head,
            log_syncs_inflight: 0,
            log_sync_issued: head,
            ack1: executed,
            ack2: log.first_seq() - 1,
            ack3: log.first_seq() - 1,
            executed,
            done_out_of_order: BTreeSet::new(),
            exec_next: executed + 1,
            exec_queue: VecDeque::new(),
            executing: Vec::new(),
            extents: BTreeMap::new(),
            next_token: 1,
            degrade_version: None,
            degraded,
            no_ack_below: if degraded { u64::MAX } else { 0 },
            fold_pending: None,
            link: LinkState::Down,
            source: false,
            peer_hello: None,
            last_rx_ms: now_ms,
            last_hb_ms: now_ms,
            alive_since_ms: now_ms,
            send_next: head + 1,
            fua_sync_through: 0,
            resync_meta_gate: 0,
            pending_target: None,
            sent_ack1: 0,
            sent_ack2: 0,
            sent_ack3: 0,
            rx_backlog: VecDeque::new(),
            ack_times: VecDeque::new(),
            resync_src: None,
            resync_tgt: None,
            resync_done_sent: false,
            replay: None,
            last_replay: None,
            rate_tokens: 0.0,
            replay_samples: VecDeque::new(),
            session: 0,
            st: state::StateSync::default(),
            awaiting_peer: meta.role == Role::Primary,
            promoting: false,
            demoting: false,
            forced_promote: false,
            current: false,
            in_sync_at: None,
            in_sync_sent: false,
            fenced: None,
            host_flushes: Vec::new(),
            peer_flushes: Vec::new(),
            verify: None,
            last_verify: None,
            verify_queued: VecDeque::new(),
            verify_reads: BTreeMap::new(),
            executed_persisted_ms: now_ms,
            meta_version: 0,
            meta_durable: 0,
            meta_inflight: false,
            meta_dirty: false,
            role_version: 0,
            now_ms,
            out: Vec::new(),
            stats: CoreStats::default(),
            cfg,
            log,
            meta,
        };
        if c.meta.role == Role::Backup && !c.cfg.ack1_persisted {
            // With `ack1 = "received"` a restart may have lost entries this
            // backup acknowledged: it is behind until a handshake says what
            // the authority holds.
            c.meta.behind_until = c.meta.behind_until.max(c.log.head() + 1);
        }
        c.update_path();
        c
    }

    // ----- accessors for status -----

    pub fn role(&self) -> Role {
        self.meta.role
    }
    pub fn meta(&self) -> &Meta {
        &self.meta
    }
    pub fn link_state(&self) -> &LinkState {
        &self.link
    }
    pub fn is_serving(&self) -> bool {
        self.serving
    }
    pub fn is_degraded(&self) -> bool {
        self.degraded
    }
    pub fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }
    /// The log, to read entries (send, execute) and report on it.
    pub fn log(&self) -> &L {
        &self.log
    }
    /// The log back from a stopped core (the simulator's crash).
    pub fn into_log(self) -> L {
        self.log
    }
    /// Begin the flush an `Action::SyncLog` asked for: the seq it makes
    /// durable and the I/O the driver carries out before answering
    /// `LogSynced` or `LogFlushFailed` with that seq.
    pub fn begin_log_flush(&mut self) -> (Seq, L::Flush) {
        self.log.begin_flush()
    }
    /// Make the log durable before returning (shutdown).
    pub fn flush_log_now(&mut self) -> Result<(), String> {
        self.log.flush_now()
    }
    /// Backup: caught up with the primary since this node started, so a
    /// promote loses no acknowledged write.
    pub fn is_current(&self) -> bool {
        self.current
    }
    /// The host id of ring entry `seq`, while its write is in flight here.
    pub fn host_id_of(&self, seq: Seq) -> Option<u64> {
        self.host_of.get(&seq).copied()
    }
    /// Why the handshake refused the peer, while this node is fenced.
    pub fn fenced(&self) -> Option<&str> {
        self.fenced.as_deref()
    }
    /// Why this node does not serve host I/O now (None while it serves).
    pub fn not_serving_reason(&self) -> Option<String> {
        if self.serving {
            return None;
        }
        Some(if let Some(f) = &self.failed {
            format!("failed: {f}")
        } else if let Some(r) = &self.fenced {
            format!(
                "fenced after refusing the peer ({}); an operator must resolve it",
                bounded(r, 200)
            )
        } else if self.promoting {
            "promoting: executing every held request".into()
        } else if self.demoting {
            "demoting: finishing in-flight writes".into()
        } else if self.meta.role == Role::Backup {
            "backup: the peer serves".into()
        } else if self.awaiting_peer {
            "waiting for the peer's handshake (it may have been promoted while this node was down)"
                .into()
        } else {
            "making the role durable".into()
        })
    }
    pub fn watermarks(&self) -> (Seq, Seq, Seq, Seq) {
        (self.ack1, self.ack2, self.ack3, self.executed)
    }
    pub fn replay_progress(&self) -> Option<&ReplayProgress> {
        self.replay.as_ref()
    }
    /// True when nothing is in flight and the peer has everything (tests).
    pub fn quiescent(&self) -> bool {
        self.waiting.is_empty()
            && self.host_of.is_empty()
            && self.executing.is_empty()
            && self.exec_queue.is_empty()
            && self.executed == self.log.head()
            && !self.meta_inflight
            && !self.meta_dirty
    }
    /// The replication stream is caught up in both directions.
    pub fn in_sync(&self) -> bool {
        self.link == LinkState::Active
            && self.resync_src.is_none()
            && self.resync_tgt.is_none()
            && self.rx_backlog.is_empty()
            && (!self.source
                || (self.ack1 == self.log.head()
                    && (self.cfg.confirm != ConfirmMode::Ack || self.ack2 == self.log.head())))
    }

    /// A one-line summary of the state, for simulator failures.
    pub fn debug_state(&self) -> String {
        format!(
            "role={:?} link={:?} source={} serving={} degraded={} head={} first={} durable={} exec={} exec_next={} ack1={} ack2={} ack3={} send_next={} host={} waiting={} executing={} queue={} backlog={} resync_src={} resync_tgt={} meta v{}/{} dirty={} promoting={} demoting={} failed={:?} flushes={}",
            self.meta.role, self.link, self.source, self.serving, self.degraded, self.log.head(), self.log.first_seq(),
            self.log_durable, self.executed, self.exec_next, self.ack1, self.ack2, self.ack3, self.send_next,
            self.host_of.len(), self.waiting.len(), self.executing.len(), self.exec_queue.len(), self.rx_backlog.len(),
            self.resync_src.is_some(), self.resync_tgt.is_some(), self.meta_durable, self.meta_version,
            self.meta.dirty.count(), self.promoting, self.demoting, self.failed, self.host_flushes.len()
        )
    }

    /// Moves the actions produced so far into `out`.
    pub fn drain_actions(&mut self, out: &mut Vec<Action>) {
        if out.is_empty() {
            std::mem::swap(out, &mut self.out);
        } else {
            out.append(&mut self.out);
        }
    }

    /// The driver hit an error it cannot recover from (ring or metadata
    /// write failed): refuse further work rather than guess.
    pub fn fatal(&mut self, why: String) {
        self.fail(why)
    }

    /// A log whose on-disk state is unknown makes the node refuse further
    /// work (once); a restart recovers from what is durable.
    fn check_log(&mut self) {
        if self.failed.is_none() {
            if let Some(e) = self.log.failure() {
                let why = format!("the ring failed: {e}");
                self.fail(why);
            }
        }
    }

    fn fail(&mut self, why: String) {
        if self.failed.is_some() {
            return;
        }
        self.out
            .push(Action::Notice(format!("node refuses further work: {why}")));
        self.failed = Some(why);
        for (_, id) in std::mem::take(&mut self.host_of) {
            self.out.push(Action::CompleteWrite {
                id,
                result: Err(HostError::Unavailable),
            });
        }
        for w in std::mem::take(&mut self.waiting) {
            self.out.push(Action::CompleteWrite {
                id: w.id,
                result: Err(HostError::Unavailable),
            });
        }
        for f in std::mem::take(&mut self.host_flushes) {
            self.out.push(Action::CompleteFlush {
                id: f.id,
                result: Err(HostError::Unavailable),
            });
        }
        self.update_path();
        if self.link != LinkState::Down {
            self.reset_link(format!(
                "node failed: {}",
                self.failed.clone().unwrap_or_default()
            ));
        }
    }

    fn update_path(&mut self) {
        let serving = self.failed.is_none()
            && self.fenced.is_none()
            && self.meta.role == Role::Primary
            && !self.demoting
            && !self.promoting
            && !self.awaiting_peer
            && self.meta_durable >= self.role_version;
        if serving != self.serving {
            self.serving = serving;
            self.out.push(Action::PathChanged { serving });
        }
    }

    fn persist_meta(&mut self) -> u64 {
        self.meta_version += 1;
        self.meta_dirty = true;
        self.meta_version
    }

    // ----- host interface -----

    /// A host write (WRITE / WRITE ZEROES / DISCARD). Completes later with
    /// `Action::CompleteWrite { id }`.
    pub fn host_write(
        &mut self,
        id: u64,
        kind: ReqKind,
        offset: u64,
        len: u64,
        fua: bool,
        payload: &[u8],
    ) {
        if let Some(e) = self.refuse_host() {
            self.out.push(Action::CompleteWrite { id, result: Err(e) });
            return;
        }
        debug_assert!(
            kind == ReqKind::State
                || payload.len() as u64 == if kind == ReqKind::Write { len } else { 0 }
        );
        if self.waiting.is_empty() && !self.replay_starved() && self.log.fits(payload.len()) {
            self.assign(id, kind, offset, len, fua, payload);
        } else {
            self.waiting.push_back(Waiting {
                id,
                kind,
                offset,
                len,
                fua,
                payload: payload.to_vec(),
            });
        }
    }

    /// A host FLUSH: completes once every write completed before it is
    /// durable on both nodes (or on this one, with the peer durably stale).
    pub fn host_flush(&mut self, id: u64) {
        if let Some(e) = self.refuse_host() {
            self.out.push(Action::CompleteFlush { id, result: Err(e) });
            return;
        }
        let token = self.token();
        self.out.push(Action::FlushDisk { token });
        // The FlushReq goes out from `flushes()`, once per session.
        self.host_flushes.push(HostFlush {
            id,
            token,
            local_done: None,
            peer_done: false,
            session: 0,
        });
    }

    fn refuse_host(&self) -> Option<HostError> {
        if self.failed.is_some() {
            Some(HostError::Unavailable)
        } else if !self.serving {
            Some(HostError::NotPrimary)
        } else {
            None
        }
    }

    fn token(&mut self) -> u64 {
        self.next_token += 1;
        self.next_token
    }

    fn assign(&mut self, id: u64, kind: ReqKind, offset: u64, len: u64, fua: bool, payload: &[u8]) {
        let seq = self.log.next_seq();
        let hdr = ReqHeader {
            seq,
            gen: self.meta.generation(),
            kind,
            fua,
            offset,
            len,
        };
        let ok = self.log.append(&hdr, payload);
        assert!(ok, "ring append after fits() succeeded");
        self.host_of.insert(seq, id);
    }

    // ----- control -----

    /// The operator's `promote`. Without `force` it is accepted only when
    /// it cannot lose an acknowledged write or create a split brain that
    /// this node can foresee; `force` skips those checks (never the disk's
    /// consistency) and records the new generation as forced.
    pub fn promote(&mut self, force: bool) -> Result<(), String> {
        if self.failed.is_some() {
            return Err("this node failed after a disk error; fix the disk and restart it".into());
        }
        if self.meta.role == Role::Primary {
            if let Some(r) = &self.fenced {
                if !force {
                    return Err(format!(
                        "this node refused its peer ({}) and is fenced; choose the survivor: \
                         run `deltamirror promote --force` on it and \
                         `deltamirror format --replace --force` on the other node",
                        bounded(r, 200)
                    ));
                }
                self.fenced = None;
                // Recorded as forced: a later refusal by the same peer does
                // not fence the node the operator chose.
                self.record_forced(self.meta.generation());
                self.persist_meta();
                self.out.push(Action::Notice(
                    "promote --force: the operator chose this node; serving despite the refused peer"
                        .into(),
                ));
                self.update_path();
                return Ok(());
            }
            if self.awaiting_peer && self.link != LinkState::Active {
                if !force {
                    return Err(
                        "this node restarted as primary and has not reached its peer \
                                since: the peer may have been promoted meanwhile, and serving now \
                                would make a split brain. Start the peer and let the nodes \
                                handshake; if you are sure the peer was never promoted (or its \
                                disk is lost), run `deltamirror promote --force`"
                            .into(),
                    );
                }
                // Serving without the handshake: new seqs could collide with
                // entries a promoted peer holds under the same numbers, so
                // this goes through a promotion to a new (forced) generation,
                // as on a backup: the histories then tell the two apart.
                self.awaiting_peer = false;
                self.promoting = true;
                self.forced_promote = true;
                self.out.push(Action::Notice(
                    "promote --force: serving without waiting for the peer, in a new generation"
                        .into(),
                ));
                self.update_path();
                return Ok(());
            }
            return Err("this node is already the primary".into());
        }
        if self.meta.history.is_empty() || self.meta.fresh || self.meta.resyncing {
            return Err("this node's disk is not consistent (a remirror or resync is unfinished); it cannot be promoted".into());
        }
        if self.meta.inconsistent_until > self.executed {
            return Err(format!(
                "this node's disk is not consistent: a resync wrote blocks as of the peer's seq \
                 {}, and this node has executed only through seq {}; it cannot be promoted, \
                 even with --force, until it receives the rest from the peer",
                self.meta.inconsistent_until, self.executed
            ));
        }
        if !matches!(self.link, LinkState::Down | LinkState::Refused(_))
            && self.peer_hello.as_ref().map(|h| h.role) == Some(Role::Primary)
        {
            return Err("the peer is primary and connected; demote it first".into());
        }
        if !force {
            if self.log.head() < self.meta.behind_until || self.resync_tgt.is_some() {
                return Err(format!(
                    "this node is behind the primary (holds seq {}, the primary had {}): \
                     promoting it would lose acknowledged writes. Start the primary and let \
                     this node catch up, or run `deltamirror promote --force` to accept losing them",
                    self.log.head(),
                    self.meta.behind_until
                ));
            }
            if !self.current {
                return Err(format!(
                    "this node has not caught up with the primary since it started (link {}): \
                     the primary may have completed writes without it (degraded mode) that \
                     it does not hold. Start the primary and let this node catch up, or run \
                     `deltamirror promote --force` to accept losing them",
                    self.link.as_str()
                ));
            }
        }
        if let Some(r) = self.fenced.take() {
            self.out.push(Action::Notice(format!(
                "promote --force: the operator chose this node over the refused peer ({})",
                bounded(&r, 200)
            )));
        }
        self.promoting = true;
        self.current = false;
        self.forced_promote = force;
        self.out.push(Action::Notice(format!(
            "promote{}: executing every held request, then taking over",
            if force { " --force" } else { "" }
        )));
        Ok(())
    }

    pub fn demote(&mut self) -> Result<(), String> {
        if self.meta.role == Role::Backup {
            return Err("this node is already a backup".into());
        }
        self.demoting = true;
        self.update_path();
        for w in std::mem::take(&mut self.waiting) {
            self.out.push(Action::CompleteWrite {
                id: w.id,
                result: Err(HostError::NotPrimary),
            });
        }
        self.out.push(Action::Notice(
            "demote: finishing in-flight writes, then becoming backup".into(),
        ));
        Ok(())
    }

    // ----- online verify -----

    /// Starts comparing `[offset, offset + length)` of both replicas
    /// (`length` 0: to the end of the volume), at most `bytes_per_sec` (0:
    /// unlimited). Only on a primary in sync with its backup.
    pub fn start_verify(
        &mut self,
        offset: u64,
        length: u64,
        repair: bool,
        bytes_per_sec: u64,
    ) -> Result<(), String> {
        if self.meta.role != Role::Primary || !self.serving {
            return Err("verify runs on the serving primary".into());
        }
        if self.link != LinkState::Active || !self.source {
            return Err("the backup is not connected: nothing to compare with".into());
        }
        if self.degraded || self.resync_src.is_some() || self.replay.is_some() {
            return Err(
                "the backup is still catching up (replay or resync); verify once it is in sync"
                    .into(),
            );
        }
        if self.verify.is_some() {
            return Err("a verify is already running".into());
        }
        let chunk = self.meta.dirty.granularity;
        let end = if length == 0 {
            self.cfg.volume_bytes
        } else {
            offset.saturating_add(length)
        };
        if !offset.is_multiple_of(chunk) || end > self.cfg.volume_bytes || offset >= end {
            return Err(format!(
                "verify range {offset}+{length}: must lie inside the volume ({} bytes) and start \
                 on a multiple of {chunk}",
                self.cfg.volume_bytes
            ));
        }
        let report = VerifyReport {
            offset,
            length: end - offset,
            chunk_bytes: chunk,
            done_bytes: 0,
            mismatched_chunks: 0,
            mismatches: Vec::new(),
            repair,
            repair_chunks: 0,
            state: VerifyState::Running,
            start_ms: self.now_ms,
            end_ms: 0,
        };
        self.out.push(Action::Notice(format!(
            "verify: comparing {} bytes from offset {offset}{}",
            end - offset,
            if repair { ", repairing mismatches" } else { "" }
        )));
        self.verify = Some(VerifyRun {
            report,
            next_offset: offset,
            end,
            extent_bytes: (MAX_VERIFY_EXTENT / 4)
                .max(chunk)
                .min(chunk * MAX_VERIFY_CHUNKS),
            inflight: BTreeMap::new(),
            next_id: 1,
            bytes_per_sec,
            tokens: 0.0,
            bad: Vec::new(),
        });
        Ok(())
    }

    /// The running verify, or the last one.
    pub fn verify_report(&self) -> Option<&VerifyReport> {
        self.verify
            .as_ref()
            .map(|v| &v.report)
            .or(self.last_verify.as_ref())
    }

    fn stop_verify(&mut self, why: String) {
        if let Some(mut v) = self.verify.take() {
            v.report.state = VerifyState::Interrupted(why.clone());
            v.report.end_ms = self.now_ms;
            self.out
                .push(Action::Notice(format!("verify interrupted: {why}")));
            self.last_verify = Some(v.report);
        }
    }

    /// Issues the next extents (up to 4 in flight, within the rate), and
    /// finishes the run.
    fn verify_step(&mut self) {
        let Some(v) = self.verify.as_mut() else {
            return;
        };
        if self.meta.role != Role::Primary || self.degraded || self.fenced.is_some() {
            return self.stop_verify("this node stopped being an in-sync primary".into());
        }
        if v.bytes_per_sec > 0 {
            // Refilled from the tick; a burst of one extent at most.
            v.tokens = v.tokens.min(v.extent_bytes as f64);
        }
        while v.inflight.len() < 4 && v.next_offset < v.end {
            let len = v.extent_bytes.min(v.end - v.next_offset);
            if v.bytes_per_sec > 0 {
                if v.tokens < len as f64 {
                    break;
                }
                v.tokens -= len as f64;
            }
            let id = v.next_id;
            v.next_id += 1;
            let offset = v.next_offset;
            v.next_offset += len;
            v.inflight.insert(
                id,
                Pending {
                    offset,
                    len,
                    local: None,
                    remote: None,
                },
            );
            // Every entry up to `after` is already on the wire, so the
            // backup queues its read at the same point of the stream.
            let after = self.send_next - 1;
            self.next_token += 1;
            let token = VERIFY_TOKEN | self.next_token;
            self.verify_reads.insert(token, ReadFor::Local(id));
            self.verify_queued.push_back(QueuedRead {
                after,
                token,
                offset,
                len,
            });
            self.out.push(Action::Send(Msg::VerifyReq {
                id,
                offset,
                len,
                chunk: v.report.chunk_bytes,
                after,
            }));
        }
        if v.next_offset >= v.end && v.inflight.is_empty() {
            let mut v = self.verify.take().unwrap();
            v.report.state = VerifyState::Done;
            v.report.end_ms = self.now_ms;
            let r = &mut v.report;
            self.out.push(Action::Notice(format!(
                "verify finished: {} bytes compared, {} mismatched chunks of {} bytes",
                r.done_bytes, r.mismatched_chunks, r.chunk_bytes
            )));
            if r.repair && !v.bad.is_empty() {
                for &o in &v.bad {
                    self.meta.dirty.mark(o, r.chunk_bytes);
                }
                r.repair_chunks = v.bad.len() as u64;
                self.persist_meta();
                self.out.push(Action::Notice(format!(
                    "verify: resyncing {} mismatched chunks from this node",
                    v.bad.len()
                )));
                // The handshake after the reset resyncs the dirty map once
                // it is durable (`on_ready` waits for the metadata).
                self.reset_link("verify repair: resync the mismatched chunks".into());
            }
            self.last_verify = Some(v.report);
        }
    }

    fn on_verify_read(&mut self, token: u64, result: Result<Vec<u8>, i32>) {
        if let Some(i) = self.executing.iter().position(|&(t, _, _)| t == token) {
            self.executing.swap_remove(i);
        }
        let Some(whom) = self.verify_reads.remove(&token) else {
            return;
        };
        let data = match result {
            Ok(d) => d,
            Err(e) => return self.fail(format!("disk read error {e} during verify")),
        };
        match whom {
            ReadFor::Peer { id, chunk } => {
                if self.link == LinkState::Active && !self.source {
                    let digests = chunk_digests(&data, chunk);
                    self.out
                        .push(Action::Send(Msg::VerifyDigest { id, digests }));
                }
            }
            ReadFor::Local(id) => {
                let Some(v) = self.verify.as_mut() else {
                    return;
                };
                let chunk = v.report.chunk_bytes;
                if let Some(p) = v.inflight.get_mut(&id) {
                    p.local = Some(chunk_digests(&data, chunk));
                    self.verify_compare(id);
                }
            }
        }
    }

    fn verify_compare(&mut self, id: u64) {
        let Some(v) = self.verify.as_mut() else {
            return;
        };
        let done = v
            .inflight
            .get(&id)
            .is_some_and(|p| p.local.is_some() && p.remote.is_some());
        if !done {
            return;
        }
        let p = v.inflight.remove(&id).unwrap();
        let chunk = v.report.chunk_bytes;
        for o in mismatched_chunks(
            p.offset,
            chunk,
            p.local.as_ref().unwrap(),
            p.remote.as_ref().unwrap(),
        ) {
            v.report.record(o);
            v.bad.push(o);
        }
        v.report.done_bytes += p.len;
    }

    // ----- events -----

    pub fn handle(&mut self, ev: Event) {
        match ev {
            Event::Tick { now_ms } => self.tick(now_ms),
            Event::PeerConnected => self.on_connected(),
            Event::PeerDisconnected => self.on_disconnected(),
            Event::PeerMsg(m) => {
                if self.link == LinkState::Down {
                    return;
                }
                if self.now_ms.saturating_sub(self.last_rx_ms) > 2 * self.cfg.heartbeat_interval_ms
                {
                    // A missed heartbeat (the peer stalled, or the network
                    // did): the incident report of the timeout rule.
                    self.alive_since_ms = self.now_ms;
                }
                self.last_rx_ms = self.now_ms;
                self.on_msg(m)
            }
            Event::LogFlushFailed { through, why } => {
                self.log_syncs_inflight = self.log_syncs_inflight.saturating_sub(1);
                self.log.flush_failed(through, why);
                self.check_log();
            }
            Event::LogSynced { through } => {
                self.log.flush_completed(through);
                self.log_syncs_inflight = self.log_syncs_inflight.saturating_sub(1);
                // A truncation may have dropped entries since the sync began;
                // after a failed flush nothing counts as durable any more.
                if self.log.failure().is_none() {
                    self.log_durable = self.log_durable.max(through.min(self.log.head()));
                }
            }
            Event::MetaPersisted { version } => {
                self.meta_inflight = false;
                self.meta_durable = self.meta_durable.max(version);
                if let Some(v) = self.degrade_version {
                    if self.meta_durable >= v {
                        self.degrade_version = None;
                        self.degraded = true;
                        self.no_ack_below = u64::MAX;
                    }
                }
                if let Some((v, through)) = self.fold_pending {
                    if self.meta_durable >= v {
                        self.fold_pending = None;
                        self.log.trim_through(through);
                    }
                }
                self.state_persisted();
                self.update_path();
            }
            Event::Executed { token, result } => self.on_executed(token, result),
            Event::ExtentRead {
                token,
                offset: _,
                result,
            } if token & VERIFY_TOKEN != 0 => self.on_verify_read(token, result),
            Event::ExtentRead {
                token: _,
                offset,
                result,
            } => match result {
                Ok(data) => {
                    if let Some(r) = self.resync_src.as_mut() {
                        r.reads_inflight -= 1;
                    }
                    if let Some(p) = self.replay.as_mut() {
                        p.extents += 1;
                        p.bytes += data.len() as u64;
                    }
                    self.stats.resync_extents += 1;
                    self.stats.replayed_bytes += data.len() as u64;
                    if self.link == LinkState::Active {
                        self.out.push(Action::Send(Msg::Extent { offset, data }));
                    }
                }
                Err(e) => self.fail(format!(
                    "disk read error {e} at offset {offset} during resync"
                )),
            },
            Event::DiskFlushed { token, result } => {
                if let Some(f) = self.host_flushes.iter_mut().find(|f| f.token == token) {
                    f.local_done = Some(result);
                } else if let Some(r) = self
                    .resync_tgt
                    .as_mut()
                    .filter(|r| r.flush_token == Some(token))
                {
                    r.flush_token = None;
                    match result {
                        Ok(()) => r.flushed = true,
                        Err(e) => self.fail(format!(
                            "disk flush after a resync failed (errno {e}); the disk is not \
                             known to hold the resynced data"
                        )),
                    }
                } else if let Some(i) = self
                    .peer_flushes
                    .iter()
                    .position(|f| f.token == Some(token))
                {
                    let f = self.peer_flushes.remove(i);
                    if self.link == LinkState::Active {
                        self.out.push(Action::Send(Msg::FlushAck {
                            id: f.id,
                            ok: result.is_ok(),
                        }));
                    }
                }
            }
        }
    }

    fn tick(&mut self, now_ms: u64) {
        let dt = now_ms.saturating_sub(self.now_ms);
        self.now_ms = now_ms;
        if let Some(v) = self.verify.as_mut() {
            v.tokens += v.bytes_per_sec as f64 * dt as f64 / 1000.0;
        }
        if self.current && self.meta.role == Role::Backup && dt >= self.cfg.peer_timeout_ms / 2 {
            // This node did not run for a while (stopped, starved): the
            // primary may have gone degraded meanwhile, and nothing said so
            // yet. Not current until a new session's `InSync`.
            self.current = false;
            self.in_sync_at = None;
            let why = format!(
                "this node did not run for {dt} ms: the primary may have completed writes \
                 without it meanwhile; it can be promoted again once it has caught up"
            );
            self.out.push(Action::Notice(why.clone()));
            if !matches!(self.link, LinkState::Down | LinkState::Refused(_)) {
                self.reset_link(why);
            }
        }
        self.sample_replay_rate();
        if self.cfg.max_replay_bytes_per_sec > 0 {
            let cap = self.cfg.max_replay_bytes_per_sec as f64;
            self.rate_tokens =
                (self.rate_tokens + cap * dt as f64 / 1000.0).min(cap / 10.0 + 1.0e6);
        }
        if !matches!(self.link, LinkState::Down | LinkState::Refused(_)) {
            if now_ms - self.last_hb_ms >= self.cfg.heartbeat_interval_ms {
                self.last_hb_ms = now_ms;
                self.out.push(Action::Send(Msg::Heartbeat {
                    incarnation: self.meta.incarnation,
                }));
            }
            if now_ms - self.last_rx_ms >= self.cfg.peer_timeout_ms {
                self.reset_link(format!("peer silent for {} ms", now_ms - self.last_rx_ms));
            }
        }
        // Persist the executed watermark now and then so a restart replays little.
        if now_ms - self.executed_persisted_ms >= 1000 && self.meta.executed != self.executed {
            self.executed_persisted_ms = now_ms;
            self.meta.executed = self.executed;
            self.persist_meta();
        }
    }

    fn reset_link(&mut self, reason: String) {
        self.out.push(Action::ResetLink { reason });
        self.on_disconnected();
    }

    fn on_connected(&mut self) {
        if self.link != LinkState::Down {
            self.on_disconnected();
        }
        self.link = LinkState::Handshake;
        self.last_rx_ms = self.now_ms;
        self.last_hb_ms = self.now_ms;
        self.alive_since_ms = self.now_ms;
        self.peer_hello = None;
        let hello = self.hello();
        self.out.push(Action::Send(Msg::Hello(hello)));
    }

    fn hello(&self) -> Hello {
        Hello {
            node_id: self.meta.node_id,
            role: self.meta.role,
            history: self.meta.history.clone(),
            head: self.log.head(),
            first: self.log.first_seq(),
            fresh: self.meta.fresh,
            resyncing: self.meta.resyncing,
            incarnation: self.meta.incarnation,
        }
    }

    fn on_disconnected(&mut self) {
        if self.link == LinkState::Down {
            return;
        }
        self.link = LinkState::Down;
        self.source = false;
        self.resync_src = None;
        self.resync_tgt = None;
        self.pending_target = None;
        self.rx_backlog.clear();
        self.peer_flushes.clear();
        self.in_sync_at = None;
        self.in_sync_sent = false;
        self.verify_queued.clear();
        self.stop_verify("the replication link went down".into());
        self.state_disconnected();
        if let Some(mut p) = self.replay.take() {
            p.end_ms = self.now_ms;
            self.last_replay = Some(p);
        }
        // Host flushes waiting for the peer are settled by degraded mode.
        self.out
            .push(Action::Notice("replication link down".into()));
    }

    fn on_msg(&mut self, m: Msg) {
        match m {
            Msg::Hello(h) => {
                if self.link != LinkState::Handshake {
                    return self.reset_link("unexpected Hello".into());
                }
                if let Some(old) = &self.peer_hello {
                    if old.incarnation != h.incarnation {
                        self.alive_since_ms = self.now_ms;
                    }
                }
                let mine = self.hello();
                let plan = decide(&mine, &h);
                self.peer_hello = Some(h);
                self.start_session(plan);
            }
            Msg::Ready { head, rollback } => {
                if self.link != LinkState::AwaitReady {
                    return self.reset_link("unexpected Ready".into());
                }
                self.on_ready(head, rollback);
            }
            Msg::Req { hdr, payload } => {
                if self.link != LinkState::Active || self.source {
                    return self.reset_link("unexpected Req".into());
                }
                self.stats.entries_received += 1;
                self.rx_backlog.push_back((hdr, payload));
                self.drain_backlog();
            }
            Msg::Ack1(s) => {
                if !self.source || self.link != LinkState::Active || s >= self.send_next {
                    return self.reset_link(format!("bad ACK1({s})"));
                }
                if s > self.ack1 {
                    self.ack1 = s;
                    self.ack_times.push_back((s, self.now_ms));
                }
            }
            Msg::Ack2(s) => {
                if !self.source || s >= self.send_next {
                    return self.reset_link(format!("bad ACK2({s})"));
                }
                self.ack2 = self.ack2.max(s);
            }
            Msg::Ack3(s) => {
                if self.source {
                    return self.reset_link("unexpected ACK3".into());
                }
                self.ack3 = self.ack3.max(s);
            }
            Msg::ResyncBegin {
                extents: _,
                bytes: _,
                full,
            } => {
                if self.source || self.link != LinkState::Active {
                    return self.reset_link("unexpected ResyncBegin".into());
                }
                if !self.meta.fresh {
                    self.meta.resyncing = true;
                }
                let v = self.persist_meta();
                self.resync_tgt = Some(ResyncTarget {
                    meta_version: v,
                    end: None,
                    full,
                    flush_token: None,
                    flushed: false,
                    consistent_at: 0,
                });
                self.resync_done_sent = false;
            }
            Msg::Extent { offset, data } => {
                if self.resync_tgt.as_ref().is_none_or(|r| r.end.is_some())
                    || offset
                        .checked_add(data.len() as u64)
                        .is_none_or(|e| e > self.cfg.volume_bytes)
                {
                    return self.reset_link("unexpected or out-of-range Extent".into());
                }
                let token = EXTENT_TOKEN | self.token();
                let len = data.len() as u64;
                self.extents.insert(token, (offset, data));
                self.exec_queue
                    .push_back(ExecItem::Extent(token, offset, len));
            }
            Msg::ResyncEnd {
                next_seq,
                consistent_at,
            } => match self.resync_tgt.as_mut() {
                Some(r) if r.end.is_none() && next_seq >= self.log.next_seq() => {
                    r.end = Some(next_seq);
                    r.consistent_at = consistent_at;
                }
                _ => self.reset_link("unexpected ResyncEnd".into()),
            },
            Msg::ResyncDone { next_seq } => {
                if let Some(r) = &self.resync_src {
                    if r.ended && next_seq == r.end_seq {
                        self.resync_src = None;
                        self.meta.dirty.clear();
                        self.meta.fold_base = 0;
                        self.persist_meta();
                        self.out
                            .push(Action::Notice("resync finished; dirty map cleared".into()));
                        return;
                    }
                }
                self.reset_link("unexpected ResyncDone".into())
            }
            Msg::FlushReq { id, through } => {
                self.peer_flushes.push(PeerFlush {
                    id,
                    through,
                    token: None,
                });
            }
            Msg::FlushAck { id, ok } => {
                if let Some(f) = self.host_flushes.iter_mut().find(|f| f.token == id) {
                    if ok {
                        f.peer_done = true;
                    } else {
                        // The backup could not flush: it stops; we go on degraded.
                        self.reset_link("peer failed a flush".into());
                    }
                }
            }
            Msg::Heartbeat { incarnation } => {
                if let Some(h) = &self.peer_hello {
                    if h.incarnation != incarnation {
                        self.alive_since_ms = self.now_ms;
                    }
                }
            }
            Msg::Refuse { reason } => {
                self.out.push(Action::Notice(format!(
                    "peer refused the pairing: {}",
                    bounded(&reason, 300)
                )));
                self.fence(&reason);
                self.link = LinkState::Refused(reason);
            }
            Msg::InSync(s) => {
                if self.source || self.link != LinkState::Active {
                    return self.reset_link("unexpected InSync".into());
                }
                self.in_sync_at = Some(s);
            }
            Msg::VerifyReq {
                id,
                offset,
                len,
                chunk,
                after,
            } => {
                let ok = !self.source
                    && self.link == LinkState::Active
                    && chunk.is_power_of_two()
                    && chunk >= 512
                    && len > 0
                    && len <= MAX_VERIFY_EXTENT
                    && len.div_ceil(chunk) <= MAX_VERIFY_CHUNKS
                    && offset
                        .checked_add(len)
                        .is_some_and(|e| e <= self.cfg.volume_bytes)
                    && after + 1 >= self.exec_next;
                if !ok {
                    return self.reset_link(format!(
                        "bad VerifyReq (offset {offset}, len {len}, chunk {chunk}, after {after})"
                    ));
                }
                let token = VERIFY_TOKEN | self.token();
                self.verify_reads.insert(token, ReadFor::Peer { id, chunk });
                self.verify_queued.push_back(QueuedRead {
                    after,
                    token,
                    offset,
                    len,
                });
            }
            Msg::VerifyDigest { id, digests } => {
                let known = self
                    .verify
                    .as_ref()
                    .and_then(|v| v.inflight.get(&id))
                    .is_some_and(|p| p.remote.is_none());
                if !self.source || !known {
                    return self.reset_link(format!("unexpected VerifyDigest {id}"));
                }
                let v = self.verify.as_mut().unwrap();
                v.inflight.get_mut(&id).unwrap().remote = Some(digests);
                self.verify_compare(id);
            }
            Msg::State { seq, blob } => self.on_state_msg(seq, blob),
        }
    }

    fn start_session(&mut self, plan: Plan) {
        match plan {
            Plan::Refuse(reason) => {
                self.out.push(Action::Notice(format!(
                    "refusing the peer: {}",
                    bounded(&reason, 300)
                )));
                self.out.push(Action::Send(Msg::Refuse {
                    reason: reason.clone(),
                }));
                self.fence(&reason);
                self.link = LinkState::Refused(reason);
            }
            Plan::Source => {
                self.unfence();
                // A restarted primary keeps waiting until the target's
                // `Ready`: only then has the target dropped whatever it held
                // past our (possibly torn) ring head, so new seqs cannot
                // collide with entries it still has.
                self.source = true;
                self.link = LinkState::AwaitReady;
            }
            Plan::Target { truncate_to } => {
                let peer = self.peer_hello.clone().expect("hello");
                self.source = false;
                // A new session: current again only after this one's `InSync`.
                self.current = false;
                if self.promoting {
                    // The peer came back as the authority while this node
                    // was promoting: promoting now would make two primaries.
                    self.promoting = false;
                    self.forced_promote = false;
                    self.out.push(Action::Notice(
                        "promote cancelled: the peer returned and holds the authority".into(),
                    ));
                }
                // The authority holds every entry through the fork: what
                // this node keeps is acknowledged.
                self.ack1 = self.ack1.max(truncate_to.min(self.log.head()));
                if truncate_to + 1 < self.log.first_seq() && self.log.head() > truncate_to {
                    // Entries past the fork already left our ring: they were
                    // executed here and their extents are unknown. Only an
                    // operator can choose which data survives.
                    let reason = format!(
                        "this node executed seqs {}..={} in an older generation that the peer's \
                         newer generation does not contain; choose the survivor, then run \
                         `deltamirror format --replace --force` on the other node",
                        truncate_to + 1,
                        self.log.head()
                    );
                    return self.start_session(Plan::Refuse(reason));
                }
                if let Some(stale) = self.meta.peer_stale_from {
                    if self.meta.role == Role::Primary
                        && self.log.head() > truncate_to
                        && self.log.head() >= stale
                    {
                        // We served writes past the fork while the peer was
                        // away (degraded), and the peer was promoted
                        // meanwhile: both accepted writes. Dropping ours
                        // would lose writes hosts saw complete.
                        let reason = format!(
                            "split brain: this node completed writes (seqs {}..={}) without the peer, \
                             which was promoted from seq {}; choose the survivor, then run \
                             `deltamirror format --replace --force` on the other node",
                            stale.max(truncate_to + 1),
                            self.log.head(),
                            truncate_to + 1
                        );
                        return self.start_session(Plan::Refuse(reason));
                    }
                }
                // Only now, past every refusal: a refused old primary must
                // not start serving.
                self.awaiting_peer = false;
                self.unfence();
                let mut rollback = Vec::new();
                let mut truncate = None;
                if truncate_to < self.log.head() {
                    // Entries past the fork were never acknowledged by the
                    // authority; a backup may have executed them, so their
                    // extents are rewritten from the authority. The extents
                    // are made durable before the entries leave the ring.
                    for s in (truncate_to + 1).max(self.log.first_seq())..=self.log.head() {
                        if let Some((h, _)) = self.log.get(s) {
                            rollback.push((h.offset, h.len));
                        }
                    }
                    // Unexecuted entries past the fork must not run now.
                    self.exec_queue.retain(|i| {
                        !matches!(i, ExecItem::Entry(s, _, _) | ExecItem::State(s) if *s > truncate_to)
                    });
                    self.exec_next = self.exec_next.min(truncate_to + 1);
                    let dropped: Vec<Seq> = self
                        .host_of
                        .range(truncate_to + 1..)
                        .map(|(s, _)| *s)
                        .collect();
                    for s in dropped {
                        let id = self.host_of.remove(&s).unwrap();
                        self.out.push(Action::CompleteWrite {
                            id,
                            result: Err(HostError::NotPrimary),
                        });
                    }
                    self.out.push(Action::Notice(format!(
                        "dropping ring entries {}..={} (never acknowledged by the authority)",
                        truncate_to + 1,
                        self.log.head()
                    )));
                    truncate = Some(truncate_to.max(self.log.first_seq() - 1));
                }
                let mut changed = self.state_truncate(&peer);
                if self.meta.role == Role::Primary {
                    self.out.push(Action::Notice(format!(
                        "the peer holds a newer generation ({}); becoming backup",
                        peer.history.last().map_or(0, |g| g.gen)
                    )));
                    self.meta.role = Role::Backup;
                    self.demoting = false;
                    self.promoting = false;
                    self.degraded = false;
                    self.no_ack_below = 0;
                    self.meta.peer_stale_from = None;
                    for w in std::mem::take(&mut self.waiting) {
                        self.out.push(Action::CompleteWrite {
                            id: w.id,
                            result: Err(HostError::NotPrimary),
                        });
                    }
                    changed = true;
                }
                // On a target the dirty map lists the extents it needs
                // rewritten by the authority; it is durable before `Ready`
                // and cleared once the resync is applied.
                for (o, l) in rollback {
                    self.meta.dirty.mark(o, l);
                    changed = true;
                }
                // The new history is adopted only after the truncation is
                // durable (`send_ready`): with it, the dropped entries would
                // look like the authority's own.
                if changed {
                    self.persist_meta();
                }
                self.update_path();
                if self.meta.behind_until != peer.head {
                    // Durable (persisted before `Ready`): a restart does not
                    // make a lagging backup promotable.
                    self.meta.behind_until = peer.head;
                    self.persist_meta();
                }
                let gate = if changed {
                    self.persist_meta()
                } else {
                    self.meta_version
                };
                self.pending_target = Some(PendingTarget {
                    gate,
                    truncate,
                    history: peer.history.clone(),
                });
                self.link = LinkState::SendingReady;
            }
        }
    }

    fn record_forced(&mut self, gen: u64) {
        if !self.meta.forced.contains(&gen) {
            self.meta.forced.push(gen);
        }
        if self.meta.forced.len() > super::meta::MAX_FORCED {
            self.meta.forced.remove(0);
        }
    }

    /// The pairing was refused. A node that serves in a generation the
    /// operator forced keeps serving (the operator chose it); any other
    /// stops serving until an operator resolves the refusal (I6).
    fn fence(&mut self, reason: &str) {
        let chosen = self.serving && self.meta.forced.contains(&self.meta.generation());
        if chosen || self.fenced.is_some() {
            return;
        }
        self.fenced = Some(reason.to_string());
        for w in std::mem::take(&mut self.waiting) {
            self.out.push(Action::CompleteWrite {
                id: w.id,
                result: Err(HostError::NotPrimary),
            });
        }
        if self.meta.role == Role::Primary {
            self.out.push(Action::Notice(
                "fenced: not serving until an operator resolves the refused pairing".into(),
            ));
        }
        self.update_path();
    }

    /// A handshake succeeded: whatever was refused has been resolved.
    fn unfence(&mut self) {
        if self.fenced.take().is_some() {
            self.out.push(Action::Notice(
                "the peer's handshake succeeded: no longer fenced".into(),
            ));
            self.update_path();
        }
    }

    fn on_ready(&mut self, head: Seq, rollback: Vec<(u64, u64)>) {
        if head > self.log.head()
            || rollback
                .iter()
                .any(|&(o, l)| o.checked_add(l).is_none_or(|e| e > self.cfg.volume_bytes))
        {
            return self.reset_link(format!("bad Ready (head {head}, ours {})", self.log.head()));
        }
        let peer = self.peer_hello.clone().expect("hello");
        self.link = LinkState::Active;
        self.session += 1;
        if self.awaiting_peer {
            self.awaiting_peer = false;
            self.update_path();
        }
        // A new session: the target holds (durably) every entry through `head`.
        self.ack1 = head.min(self.log.head());
        self.ack_times.clear();
        self.ack_times.push_back((self.ack1, self.now_ms));
        self.sent_ack3 = 0;
        for (o, l) in &rollback {
            self.meta.dirty.mark(*o, *l);
        }
        let first = self.log.first_seq();
        let covered_by_dirty = self.meta.fold_base > 0 && head + 1 >= self.meta.fold_base;
        // The peer confirmed executing everything below our ring (ACK2), even
        // if its own ring lost the tail: its disk has it.
        let covered_by_ack2 = self.cfg.confirm == ConfirmMode::Ack && self.ack2 + 1 >= first;
        let full = peer.fresh
            || (peer.resyncing && self.meta.dirty.is_empty())
            || (head + 1 < first && !covered_by_dirty && !covered_by_ack2);
        if full {
            self.meta.dirty.mark_all();
            self.meta.remirrors += 1;
            self.out
                .push(Action::Notice("the peer needs a full remirror".into()));
        }
        // The stream starts after what the peer holds in its ring, or has
        // executed on its disk (ACK2, which our trims already relied on).
        let executed_by_peer = if self.cfg.confirm == ConfirmMode::Ack && !peer.fresh {
            self.ack2
        } else {
            0
        };
        // What the peer executed, it held: as good as ACK1 for our delay buffer.
        self.ack1 = self.ack1.max(executed_by_peer.min(self.log.head()));
        let end_seq = (head + 1).max(executed_by_peer + 1).max(first);
        // A resync also carries the jump of the peer's ring to `end_seq`.
        let resync = !self.meta.dirty.is_empty() || peer.resyncing || end_seq > head + 1;
        let backlog = self.log.head() + 1 - end_seq;
        if resync {
            let v = self.persist_meta();
            self.resync_src = Some(ResyncSource {
                next_chunk: 0,
                reads_inflight: 0,
                end_seq,
                ended: false,
            });
            self.resync_meta_gate = v;
            self.out.push(Action::Send(Msg::ResyncBegin {
                extents: self.meta.dirty.count(),
                bytes: self.meta.dirty.bytes(),
                full,
            }));
        }
        self.send_next = end_seq;
        self.state_session(end_seq);
        if backlog > 0 || resync {
            self.stats.replays += 1;
            if resync && !full && !self.meta.dirty.is_empty() {
                self.stats.dirty_resyncs += 1;
            }
            self.replay = Some(ReplayProgress {
                start_ms: self.now_ms,
                target_seq: self.log.head(),
                first_seq: end_seq,
                full,
                ..Default::default()
            });
            self.out.push(Action::Notice(format!(
                "replaying {backlog} entries to the peer (from seq {end_seq}){}",
                if resync {
                    format!(" after {} dirty extents", self.meta.dirty.count())
                } else {
                    String::new()
                }
            )));
        }
    }

    /// Target: append what arrived, in order, as the ring has room.
    fn drain_backlog(&mut self) {
        if self.resync_tgt.is_some() {
            return;
        }
        while let Some((hdr, payload)) = self.rx_backlog.front() {
            let next = self.log.next_seq();
            if hdr.seq < next {
                self.rx_backlog.pop_front();
                continue;
            }
            if hdr.seq > next {
                return self.reset_link(format!(
                    "gap in the stream: got seq {} expecting {next}",
                    hdr.seq
                ));
            }
            if !self.log.fits(payload.len()) {
                return;
            }
            let (hdr, payload) = self.rx_backlog.pop_front().unwrap();
            assert!(self.log.append(&hdr, &payload));
            if hdr.fua {
                self.fua_sync_through = hdr.seq;
            }
        }
    }

    fn on_executed(&mut self, token: u64, result: Result<(), i32>) {
        let Some(i) = self.executing.iter().position(|&(t, _, _)| t == token) else {
            return;
        };
        self.executing.swap_remove(i);
        if token & EXTENT_TOKEN != 0 {
            self.extents.remove(&token);
            if let Err(e) = result {
                self.fail(format!(
                    "disk write error {e} while applying a resync extent"
                ));
            }
            return;
        }
        let seq = token;
        if let Err(e) = result {
            if let Some(id) = self.host_of.remove(&seq) {
                self.out.push(Action::CompleteWrite {
                    id,
                    result: Err(HostError::Io(e)),
                });
            }
            return self.fail(format!("disk write error {e} executing seq {seq}"));
        }
        if seq > self.executed {
            self.done_out_of_order.insert(seq);
            while self.done_out_of_order.remove(&(self.executed + 1)) {
                self.executed += 1;
            }
        }
        if let Some(id) = self.host_of.remove(&seq) {
            // I2: durable in the ring, executed, and covered by ACK1 (or
            // degraded with the peer durably recorded as stale).
            assert!(
                seq <= self.log_durable,
                "I2: completing seq {seq} not durable in the ring"
            );
            assert!(
                seq <= self.ack1
                    || (seq < self.no_ack_below && self.meta.peer_stale_from.is_some()),
                "I2: completing seq {seq} without ACK1 ({}) outside degraded mode",
                self.ack1
            );
            self.out.push(Action::CompleteWrite { id, result: Ok(()) });
        }
    }

    // ----- the end of a batch: coalesced work -----

    /// Runs everything that batches: ring sync, streaming, executions,
    /// coalesced ACKs, trims, flushes, metadata. Call once per reactor
    /// iteration after handling the events of that iteration.
    pub fn poll(&mut self) {
        self.check_log();
        if self.failed.is_some() {
            return;
        }
        self.check_degrade();
        self.admit_waiting();
        self.send_ready();
        let head = self.log.head();
        // A new sync when something is not durable and not already covered
        // by the sync in flight.
        let more = self.log_durable < head
            && (self.log_syncs_inflight == 0 || head > self.log_sync_issued);
        if self.log_syncs_inflight < MAX_LOG_SYNCS
            && (more || (self.log_syncs_inflight == 0 && self.log.wants_sync()))
        {
            self.log_syncs_inflight += 1;
            self.log_sync_issued = head;
            self.out.push(Action::SyncLog);
        }
        self.drain_backlog();
        if self.meta.behind_until > 0 && self.log_durable >= self.meta.behind_until {
            self.meta.behind_until = 0;
            self.persist_meta();
        }
        if self.meta.inconsistent_until > 0
            && self.executed >= self.meta.inconsistent_until
            && self.log_durable >= self.meta.inconsistent_until
        {
            self.meta.inconsistent_until = 0;
            self.persist_meta();
        }
        self.send_state();
        self.track_current();
        self.verify_step();
        self.stream();
        self.resync_source();
        self.resync_target();
        self.schedule_executions();
        self.send_acks();
        self.trim();
        self.flushes();
        self.roles();
        self.update_replay();
        if self.meta_dirty && !self.meta_inflight {
            self.meta_dirty = false;
            self.meta_inflight = true;
            self.out.push(Action::PersistMeta {
                version: self.meta_version,
                bytes: self.meta.encode(),
            });
        }
    }

    /// Source: says `InSync` once per session when it no longer completes
    /// writes without the target. Target: current once that seq is durable.
    fn track_current(&mut self) {
        if self.link != LinkState::Active {
            return;
        }
        if self.source {
            if !self.in_sync_sent
                && !self.degraded
                && self.resync_src.is_none()
                && self.state_sent()
            {
                self.in_sync_sent = true;
                self.out.push(Action::Send(Msg::InSync(self.log.head())));
            }
            return;
        }
        if let Some(s) = self.in_sync_at {
            if !self.current
                && self.meta.role == Role::Backup
                && self.resync_tgt.is_none()
                && self.pending_target.is_none()
                && !self.meta.fresh
                && !self.meta.resyncing
                && self.log_durable >= s
                && self.state_adopted()
            {
                self.current = true;
                self.out.push(Action::Notice(format!(
                    "caught up with the primary (seq {s}): this backup can be promoted"
                )));
            }
        }
    }

    fn check_degrade(&mut self) {
        if self.meta.role != Role::Primary || self.degraded || self.degrade_version.is_some() {
            return;
        }
        let peer_gone = match self.link {
            LinkState::Down | LinkState::Refused(_) => true,
            LinkState::Active => false,
            _ => false,
        };
        let need =
            !self.host_of.is_empty() || !self.waiting.is_empty() || !self.host_flushes.is_empty();
        // The new generation starts after the durable ring head, so a crash
        // cannot leave the history pointing past the ring.
        let ring_durable = self.log_durable >= self.log.head();
        // `peer_timeout_ms` after the last message from the peer, as the
        // config says: the link reset at that same moment (a silent peer) or
        // earlier (a closed connection), never one timeout later.
        if peer_gone
            && need
            && ring_durable
            && self.now_ms - self.last_rx_ms >= self.cfg.peer_timeout_ms
        {
            // Durably bump the generation and record the backup as stale
            // before completing anything without ACK1.
            let gen = self.meta.generation() + 1;
            self.meta.history.push(GenEntry {
                gen,
                first_seq: self.log.next_seq(),
                origin: self.meta.node_id,
            });
            self.meta.peer_stale_from = Some(self.ack1 + 1);
            self.out.push(Action::Notice(format!(
                "peer unreachable: degraded mode, generation {gen}, backup stale from seq {}",
                self.ack1 + 1
            )));
            self.degrade_version = Some(self.persist_meta());
        }
    }

    /// The replay floor: true while a replay that has run for a second moved
    /// fewer than `min_replay_bytes_per_sec` over the last second. New host
    /// writes then wait (as if the ring were full) so the replay catches up.
    fn replay_starved(&self) -> bool {
        let floor = self.cfg.min_replay_bytes_per_sec;
        let Some(p) = self.replay.as_ref() else {
            return false;
        };
        if floor == 0 || self.now_ms < p.start_ms + 1000 {
            return false;
        }
        let (Some(&(t0, b0)), Some(&(t1, b1))) =
            (self.replay_samples.front(), self.replay_samples.back())
        else {
            return false;
        };
        if t1 <= t0 {
            return false;
        }
        (b1 - b0) as f64 * 1000.0 / ((t1 - t0) as f64) < floor as f64
    }

    fn sample_replay_rate(&mut self) {
        let Some(p) = self.replay.as_ref() else {
            self.replay_samples.clear();
            return;
        };
        let due = self
            .replay_samples
            .back()
            .is_none_or(|&(t, _)| self.now_ms >= t + 100);
        if due {
            self.replay_samples.push_back((self.now_ms, p.bytes));
            while self.replay_samples.len() > 11 {
                self.replay_samples.pop_front();
            }
        }
    }

    fn admit_waiting(&mut self) {
        if self.replay_starved() {
            return;
        }
        while let Some(w) = self.waiting.front() {
            if self.log.fits(w.payload.len()) {
                let w = self.waiting.pop_front().unwrap();
                self.assign(w.id, w.kind, w.offset, w.len, w.fua, &w.payload);
                continue;
            }
            // Overflow: fold executed entries into the dirty map, only while
            // the peer is away (when it is connected, writes wait for ACKs).
            if self.degraded && self.link != LinkState::Active && self.fold_pending.is_none() {
                let first = self.log.first_seq();
                let n = (self.log.len() / 4).max(1);
                let through = (first + n - 1).min(self.executed);
                if through >= first {
                    for s in first..=through {
                        let (h, _) = self.log.get(s).expect("ring entry");
                        self.meta.dirty.mark(h.offset, h.len);
                    }
                    if self.meta.fold_base == 0 {
                        self.meta.fold_base = first;
                    }
                    let v = self.persist_meta();
                    self.fold_pending = Some((v, through));
                }
            }
            return;
        }
    }

    fn send_ready(&mut self) {
        if self.link != LinkState::SendingReady {
            return;
        }
        if let Some(pt) = &self.pending_target {
            // Phase 1 (rollback extents, role) durable; phase 2: drop the
            // entries past the fork once no execution of theirs is in
            // flight; phase 3: adopt the authority's history.
            if self.meta_durable < pt.gate {
                return;
            }
            if let Some(t) = pt.truncate {
                if self
                    .executing
                    .iter()
                    .any(|&(tok, _, _)| tok & EXTENT_TOKEN == 0 && tok > t)
                {
                    return;
                }
                self.log.truncate_after(t);
                self.log_durable = self.log_durable.min(self.log.head());
                self.exec_next = self.exec_next.min(self.log.head() + 1);
                self.executed = self.executed.min(self.log.head());
                self.done_out_of_order.retain(|&s| s <= t);
                self.meta.executed = self.meta.executed.min(self.log.head());
            }
            let pt = self.pending_target.take().unwrap();
            if !self.meta.fresh && self.meta.history != pt.history {
                self.meta.history = pt.history;
            }
            self.persist_meta();
            return;
        }
        if self.cfg.ack1_persisted && self.log_durable < self.log.head() {
            return;
        }
        if self.meta_durable < self.meta_version {
            return;
        }
        let g = self.meta.dirty.granularity;
        let mut rollback = Vec::new();
        let mut c = 0;
        while let Some(n) = self.meta.dirty.next_set(c) {
            rollback.push((n * g, g.min(self.cfg.volume_bytes - n * g)));
            c = n + 1;
        }
        self.out.push(Action::Send(Msg::Ready {
            head: self.log.head(),
            rollback,
        }));
        self.sent_ack1 = self.log.head();
        self.sent_ack2 = 0;
        self.ack_times.clear();
        self.ack_times.push_back((self.sent_ack1, self.now_ms));
        self.link = LinkState::Active;
    }

    fn stream(&mut self) {
        if self.link != LinkState::Active || !self.source {
            return;
        }
        if self.resync_src.as_ref().is_some_and(|r| !r.ended) {
            return;
        }
        let limit = self.ack1 + self.cfg.max_unacked_entries;
        while self.send_next <= self.log.head() && self.send_next <= limit {
            let replaying = self
                .replay
                .as_ref()
                .is_some_and(|p| self.send_next <= p.target_seq);
            if replaying {
                let bytes = self.log.get(self.send_next).map_or(0, |(h, _)| {
                    if h.kind == ReqKind::Write {
                        h.len
                    } else {
                        0
                    }
                });
                if self.cfg.max_replay_bytes_per_sec > 0 {
                    if self.rate_tokens < bytes as f64 {
                        break;
                    }
                    self.rate_tokens -= bytes as f64;
                }
                let p = self.replay.as_mut().unwrap();
                p.entries += 1;
                p.bytes += bytes;
                self.stats.replayed_entries += 1;
                self.stats.replayed_bytes += bytes;
            }
            self.out.push(Action::SendEntry(self.send_next));
            self.stats.entries_sent += 1;
            self.send_next += 1;
        }
    }

    fn resync_source(&mut self) {
        if self.link != LinkState::Active {
            return;
        }
        let gate = self.resync_meta_gate;
        let Some(r) = self.resync_src.as_mut() else {
            return;
        };
        if r.ended || self.meta_durable < gate {
            return;
        }
        // Extent data must include every entry below the stream start.
        if self.executed + 1 < r.end_seq {
            return;
        }
        let g = self.meta.dirty.granularity;
        while r.reads_inflight < self.cfg.max_resync_inflight {
            match self.meta.dirty.next_set(r.next_chunk) {
                Some(c) => {
                    let offset = c * g;
                    let len = g.min(self.cfg.volume_bytes - offset);
                    if self.cfg.max_replay_bytes_per_sec > 0 {
                        if self.rate_tokens < len as f64 {
                            return;
                        }
                        self.rate_tokens -= len as f64;
                    }
                    r.next_chunk = c + 1;
                    r.reads_inflight += 1;
                    self.next_token += 1;
                    let token = EXTENT_TOKEN | self.next_token;
                    self.out.push(Action::ReadExtent { token, offset, len });
                }
                None => {
                    if r.reads_inflight == 0 && self.fold_pending.is_none() {
                        // Entries folded meanwhile are in the dirty map just sent.
                        r.end_seq = r.end_seq.max(self.log.first_seq());
                        self.send_next = r.end_seq;
                        r.ended = true;
                        self.out.push(Action::Send(Msg::ResyncEnd {
                            next_seq: r.end_seq,
                            consistent_at: self.executed,
                        }));
                    }
                    return;
                }
            }
        }
    }

    fn resync_target(&mut self) {
        let Some(r) = self.resync_tgt.as_ref() else {
            return;
        };
        let Some(end) = r.end else { return };
        if !self.exec_queue.is_empty()
            || !self.executing.is_empty()
            || self.executed < self.log.head()
        {
            return;
        }
        if !r.flushed {
            // The extents and entries are on the disk but maybe only in its
            // volatile cache: flush it (through the backend, so the reactor
            // keeps answering heartbeats meanwhile) before recording the disk
            // consistent.
            if r.flush_token.is_none() {
                let token = self.token();
                self.resync_tgt.as_mut().unwrap().flush_token = Some(token);
                self.out.push(Action::FlushDisk { token });
            }
            return;
        }
        if !self.resync_done_sent {
            // Everything applied and flushed: continue the ring at `end` and
            // record the disk consistent again, durably, before telling the
            // source.
            if end > self.log.next_seq() {
                self.log.reset(end);
                self.log_durable = end - 1;
                self.executed = end - 1;
                self.exec_next = end;
                self.done_out_of_order.clear();
            }
            self.meta.executed = self.executed;
            self.meta.resyncing = false;
            if r.consistent_at > self.executed {
                self.meta.inconsistent_until = r.consistent_at;
            }
            self.meta.dirty.clear();
            self.meta.fold_base = 0;
            if self.meta.fresh || r.full {
                if let Some(h) = &self.peer_hello {
                    self.meta.history = h.history.clone();
                }
                if self.meta.fresh {
                    self.meta.remirrors += 1;
                }
                self.meta.fresh = false;
            }
            let v = self.persist_meta();
            self.resync_tgt.as_mut().unwrap().meta_version = v;
            self.resync_done_sent = true;
            return;
        }
        if self.meta_durable >= r.meta_version {
            self.out
                .push(Action::Send(Msg::ResyncDone { next_seq: end }));
            self.resync_tgt = None;
            self.resync_done_sent = false;
            self.out
                .push(Action::Notice("resync applied; disk consistent".into()));
            self.drain_backlog();
        }
    }

    fn exec_limit(&self) -> Seq {
        let head = match self.pending_target.as_ref().and_then(|p| p.truncate) {
            Some(t) => self.log.head().min(t),
            None => self.log.head(),
        };
        // Nothing reaches a disk before its ring entry is durable: an entry
        // a crash drops from the ring must not survive on the disk, or no
        // handshake could know to rewrite it.
        if self.meta.role == Role::Backup
            || self.promoting
            || (self.source && self.meta.role != Role::Primary)
        {
            return head.min(self.log_durable);
        }
        let mut limit = self.ack1.min(self.log_durable);
        if self.no_ack_below > 0 {
            limit = limit.max(self.no_ack_below.saturating_sub(1).min(self.log_durable));
        }
        limit.min(head)
    }

    fn schedule_executions(&mut self) {
        let limit = self.exec_limit();
        // A verify read goes into the queue right after its ring entry, so
        // it sees every entry up to it and none after it.
        while let Some(q) = self.verify_queued.front().copied() {
            if q.after >= self.exec_next {
                break;
            }
            self.verify_queued.pop_front();
            self.exec_queue
                .push_back(ExecItem::Verify(q.token, q.offset, q.len));
        }
        while self.exec_next <= limit {
            if let Some((h, _)) = self.log.get(self.exec_next) {
                self.exec_queue.push_back(if h.kind == ReqKind::State {
                    ExecItem::State(h.seq)
                } else {
                    ExecItem::Entry(h.seq, h.offset, h.len)
                });
            }
            self.exec_next += 1;
            while let Some(q) = self.verify_queued.front().copied() {
                if q.after >= self.exec_next {
                    break;
                }
                self.verify_queued.pop_front();
                self.exec_queue
                    .push_back(ExecItem::Verify(q.token, q.offset, q.len));
            }
        }
        let extents_gate = self.resync_tgt.as_ref().map(|r| r.meta_version);
        let mut i = 0;
        let mut scanned = 0;
        while i < self.exec_queue.len()
            && self.executing.len() < self.cfg.max_executing
            && scanned < 256
        {
            scanned += 1;
            let item = self.exec_queue[i];
            let (token, off, len) = match item {
                ExecItem::Entry(seq, o, l) | ExecItem::Verify(seq, o, l) => (seq, o, l),
                ExecItem::State(seq) => (seq, 0, 0),
                ExecItem::Extent(t, o, l) => {
                    // Extents run after every ring entry held before them,
                    // and only once the "resyncing" state is durable.
                    if self.executed < self.log.head()
                        || extents_gate.is_some_and(|v| self.meta_durable < v)
                    {
                        i += 1;
                        continue;
                    }
                    (t, o, l)
                }
            };
            let blocked = self
                .executing
                .iter()
                .any(|&(_, o, l)| ranges_overlap(o, l, off, len))
                || self.exec_queue.iter().take(i).any(|it| {
                    let (o, l) = it.range();
                    ranges_overlap(o, l, off, len)
                });
            if blocked {
                i += 1;
                continue;
            }
            self.exec_queue.remove(i);
            if let ExecItem::Entry(s, _, _) | ExecItem::State(s) = item {
                if self.meta.role == Role::Primary && !self.promoting {
                    // I1: the primary never executes a REQ before ACK1 covers
                    // it, except in degraded mode.
                    assert!(
                        s <= self.ack1 || s < self.no_ack_below,
                        "I1: executing seq {s} beyond ACK1 {} outside degraded mode",
                        self.ack1
                    );
                    assert!(
                        s <= self.log_durable,
                        "executing seq {s} before its ring append is durable"
                    );
                }
                if matches!(item, ExecItem::State(_)) {
                    self.execute_state(s);
                    continue;
                }
                self.executing.push((token, off, len));
                self.out.push(Action::Execute { seq: s });
            } else if let ExecItem::Verify(t, o, l) = item {
                self.executing.push((t, o, l));
                self.out.push(Action::ReadExtent {
                    token: t,
                    offset: o,
                    len: l,
                });
            } else {
                let data = self
                    .extents
                    .get_mut(&token)
                    .map(|(_, d)| std::mem::take(d))
                    .unwrap_or_default();
                self.executing.push((token, off, len));
                self.out.push(Action::WriteExtent {
                    token,
                    offset: off,
                    data,
                });
            }
        }
    }

    fn send_acks(&mut self) {
        if self.link != LinkState::Active {
            return;
        }
        if self.source {
            if self.executed > self.sent_ack3 && self.cfg.confirm == ConfirmMode::Ack {
                if !self.cfg.coalesce_acks {
                    for s in self.sent_ack3 + 1..self.executed {
                        self.out.push(Action::Send(Msg::Ack3(s)));
                    }
                }
                self.sent_ack3 = self.executed;
                self.out.push(Action::Send(Msg::Ack3(self.executed)));
            }
            return;
        }
        if self.resync_tgt.is_some() {
            return;
        }
        // ACK1 covers what is durable in the ring (persisted mode), or
        // everything received (received mode) unless a FUA entry still
        // waits for the ring to be durable.
        let a1 = if self.cfg.ack1_persisted || self.log_durable < self.fua_sync_through {
            self.log_durable
        } else {
            self.log.head()
        }
        .min(self.log.head());
        if a1 > self.sent_ack1 {
            // Uncoalesced (a measurement setting): one message per REQ.
            if !self.cfg.coalesce_acks {
                for s in self.sent_ack1 + 1..a1 {
                    self.out.push(Action::Send(Msg::Ack1(s)));
                }
            }
            self.sent_ack1 = a1;
            self.ack_times.push_back((a1, self.now_ms));
            self.out.push(Action::Send(Msg::Ack1(a1)));
        }
        if self.cfg.confirm == ConfirmMode::Ack
            && self.executed > self.sent_ack2
            && self.executed <= self.log.head()
        {
            if !self.cfg.coalesce_acks {
                for s in self.sent_ack2 + 1..self.executed {
                    self.out.push(Action::Send(Msg::Ack2(s)));
                }
            }
            self.sent_ack2 = self.executed;
            self.out.push(Action::Send(Msg::Ack2(self.executed)));
        }
    }

    fn trim(&mut self) {
        let peer_done = match self.cfg.confirm {
            ConfirmMode::Ack => {
                if self.source {
                    self.ack2
                } else {
                    self.ack3
                }
            }
            ConfirmMode::Timeout { period_ms } => {
                // Dropped once `period_ms` passed since ACK1 while heartbeats
                // showed the same peer alive the whole time: a message from
                // it arrived after the period, with no heartbeat missed
                // since ACK1 (`alive_since_ms`).
                let mut through = 0;
                if self.link == LinkState::Active {
                    // An ACK1 from before the last incident counts from the
                    // incident: the full period must pass again without one.
                    while let Some(&(s, t)) = self.ack_times.front() {
                        if t.max(self.alive_since_ms) + period_ms <= self.last_rx_ms {
                            through = s;
                            self.ack_times.pop_front();
                        } else {
                            break;
                        }
                    }
                }
                through.max(self.log.first_seq() - 1)
            }
        };
        let through = peer_done.min(self.executed);
        if through >= self.log.first_seq() && self.fold_pending.is_none() {
            // I3: only what the peer is known to have executed leaves the queue.
            self.log.trim_through(through);
        }
        if self.meta.role == Role::Primary
            && self.degraded
            && self.link == LinkState::Active
            && self.resync_src.is_none()
        {
            // Caught up with the live stream: back to synchronous mirroring.
            if self.no_ack_below == u64::MAX
                && self.ack1 + self.cfg.max_unacked_entries / 2 >= self.log.head()
            {
                self.no_ack_below = self.log.next_seq();
            }
            if self.no_ack_below != u64::MAX && self.ack1 + 1 >= self.no_ack_below {
                self.degraded = false;
                self.meta.peer_stale_from = None;
                self.persist_meta();
                self.out.push(Action::Notice(
                    "backup caught up: synchronous mirroring again".into(),
                ));
            }
        }
    }

    fn flushes(&mut self) {
        // Backup side: flush once executed through the requested seq.
        for i in 0..self.peer_flushes.len() {
            if self.peer_flushes[i].token.is_none()
                && self.executed >= self.peer_flushes[i].through.min(self.log.head())
            {
                let t = self.token();
                self.peer_flushes[i].token = Some(t);
                self.out.push(Action::FlushDisk { token: t });
            }
        }
        let degraded_ok = self.degraded && self.meta_durable == self.meta_version;
        if self.link == LinkState::Active && self.source && self.resync_src.is_none() {
            let head = self.log.head();
            for f in self
                .host_flushes
                .iter_mut()
                .filter(|f| !f.peer_done && f.session != self.session)
            {
                f.session = self.session;
                self.out.push(Action::Send(Msg::FlushReq {
                    id: f.token,
                    through: head,
                }));
            }
        }
        let mut i = 0;
        while i < self.host_flushes.len() {
            let f = &self.host_flushes[i];
            if let Some(r) = f.local_done {
                if r.is_err() || f.peer_done || degraded_ok {
                    let f = self.host_flushes.remove(i);
                    let result = r.map_err(HostError::Io);
                    self.out.push(Action::CompleteFlush { id: f.id, result });
                    continue;
                }
            }
            i += 1;
        }
    }

    fn roles(&mut self) {
        if self.promoting
            && self.executed == self.log.head()
            && self.log_durable >= self.log.head()
            && self.executing.is_empty()
            && self.exec_queue.is_empty()
        {
            self.promoting = false;
            self.current = false;
            let gen = self.meta.generation() + 1;
            // A forced promote can take a node that adopted the authority's
            // history but never received its entries: generations that
            // start at or past our next seq describe writes this node does
            // not hold, and go (the peer's copy of them then diverges from
            // ours, so the handshake sees the fork).
            let next = self.log.next_seq();
            self.state_promoted(next);
            while self.meta.history.len() > 1
                && self
                    .meta
                    .history
                    .last()
                    .is_some_and(|g| g.first_seq >= next)
            {
                self.meta.history.pop();
            }
            self.meta.history.push(GenEntry {
                gen,
                first_seq: self.log.next_seq(),
                origin: self.meta.node_id,
            });
            if std::mem::take(&mut self.forced_promote) {
                self.record_forced(gen);
                self.out.push(Action::Notice(format!(
                    "promote --force: generation {gen} is recorded as forced; writes the old \
                     primary completed from seq {} on are lost when it rejoins",
                    self.log.next_seq()
                )));
            }
            self.meta.role = Role::Primary;
            self.meta.executed = self.executed;
            self.ack1 = self.log.head();
            self.exec_next = self.log.head() + 1;
            self.role_version = self.meta_version + 1;
            if self.link != LinkState::Active {
                // Serving without the peer from the start: the peer is stale
                // from here on, recorded with the same generation bump.
                self.meta.peer_stale_from = Some(self.log.next_seq());
                self.degraded = true;
                self.no_ack_below = u64::MAX;
            }
            self.persist_meta();
            self.out.push(Action::Notice(format!(
                "promoted: primary in generation {gen}"
            )));
            if self.link != LinkState::Down {
                self.reset_link("role change: new handshake".into());
            }
            self.update_path();
        }
        if self.demoting && self.host_of.is_empty() && self.executing.is_empty() {
            self.demoting = false;
            self.current = false;
            self.meta.role = Role::Backup;
            self.role_version = self.meta_version + 1;
            self.degraded = false;
            self.no_ack_below = 0;
            self.meta.executed = self.executed;
            self.persist_meta();
            self.out.push(Action::Notice("demoted: now backup".into()));
            if self.link != LinkState::Down {
                self.reset_link("role change: new handshake".into());
            }
            self.update_path();
        }
    }

    fn update_replay(&mut self) {
        let done = match &self.replay {
            Some(p) => {
                self.resync_src.is_none()
                    && self.ack1 >= p.target_seq
                    && self.link == LinkState::Active
            }
            None => false,
        };
        if done {
            let mut p = self.replay.take().unwrap();
            p.end_ms = self.now_ms;
            p.done = true;
            self.out.push(Action::Notice(format!(
                "replay finished: {} entries, {} bytes, {} extents in {} ms",
                p.entries,
                p.bytes,
                p.extents,
                p.end_ms - p.start_ms
            )));
            self.last_replay = Some(p);
        }
    }
}
