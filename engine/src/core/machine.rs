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
//!
//! `Core` is made of sub-machines, each in its own file with its own
//! asserts and the core's steps that drive it:
//!
//! - `session.rs`: the replication session (down, handshake, awaiting
//!   `Ready`, active as sender or receiver, refused) and the handshake.
//! - `role.rs`: primary or backup, the promote/demote in progress, how a
//!   primary mirrors (synchronous, degrading, degraded), the fence; under
//!   automatic failover the agent's fence, the stale-mark gate before a
//!   degrade and the promotion's generation floor.
//! - `pipeline.rs`: the write pipeline's cursors and ring flushes, and the
//!   steps that append, stream, execute, acknowledge and trim.
//! - `resync.rs`: replay and dirty-map resync after an outage.
//! - `state.rs`: the replicated state blob.
//!
//! This file holds the events and actions, the host entry points (the
//! operator's `promote` and `demote` are in `role.rs`), online verify's
//! hooks, and `poll`, the list of named steps run once per reactor pass.

use std::collections::{BTreeMap, VecDeque};
use volume::SharedBuf;

use super::decide::{decide, Plan};
use super::meta::Meta;
use super::msg::{Hello, Msg};
use super::types::*;
use super::verify::{
    chunk_digests, mismatched_chunks, Pending, QueuedRead, ReadFor, VerifyReport, VerifyRun,
    VerifyState, MAX_VERIFY_CHUNKS, MAX_VERIFY_EXTENT,
};
use super::Log;

#[path = "pipeline.rs"]
mod pipeline;
#[path = "resync.rs"]
mod resync;
#[path = "role.rs"]
mod role;
#[path = "session.rs"]
pub mod session;
#[path = "state.rs"]
mod state;

use pipeline::Pipeline;
pub use resync::ReplayProgress;
use resync::{ResyncReceiver, ResyncSender};
use role::{Mirroring, RoleMachine, Transition};
use session::{Session, SessionState};

#[derive(Debug)]
pub enum Event {
    /// The replication link is up and the peer authenticated.
    PeerConnected,
    /// The replication link went down.
    PeerDisconnected,
    PeerMsg(Msg),
    /// A `FlushRing` finished: every ring entry up to `through` is durable.
    RingFlushed {
        through: Seq,
    },
    /// The flush for `through` failed: the ring's on-disk state is unknown.
    RingFlushFailed {
        through: Seq,
        why: String,
    },
    MetaPersisted {
        version: u64,
    },
    /// A ring entry or resync extent finished on the disk.
    Executed {
        token: Token,
        result: Result<(), i32>,
    },
    ExtentRead {
        token: Token,
        offset: u64,
        result: Result<Vec<u8>, i32>,
    },
    DiskFlushed {
        token: Token,
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
    /// carries out the flush I/O it returns and answers `RingFlushed` or
    /// `RingFlushFailed` with the seq it returned.
    FlushRing,
    PersistMeta {
        version: u64,
        bytes: Vec<u8>,
    },
    /// Execute ring entry `seq` on the disk; answer
    /// `Executed { token: Token::Entry(seq) }`.
    Execute {
        seq: Seq,
    },
    /// Write resync data; answer `Executed { token }`.
    WriteExtent {
        token: Token,
        offset: u64,
        data: Vec<u8>,
    },
    /// Read current data for a resync; answer `ExtentRead`.
    ReadExtent {
        token: Token,
        offset: u64,
        len: u64,
    },
    FlushDisk {
        token: Token,
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
    /// Automatic failover: the primary wants to complete writes without the
    /// backup. The failover agent records "backup stale from `from_seq`, in
    /// generation `gen`" in etcd under its lease and answers
    /// `Core::stale_recorded(gen, from_seq)`; until then writes wait.
    RecordStale {
        gen: u64,
        from_seq: Seq,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostError {
    NotPrimary,
    Io(i32),
    Unavailable,
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
    payload: SharedBuf,
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
    Extent(Token, u64, u64),
    /// An online-verify read: token, byte offset, byte length.
    Verify(Token, u64, u64),
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

pub struct Core<L: Log> {
    cfg: CoreConfig,
    /// Private to the core: drivers read it through [`Core::log`] and drive
    /// its flushes through [`Core::begin_log_flush`] and the flush events.
    pub(in crate::core) log: L,
    now_ms: u64,
    /// Why this node refuses further work (a disk or ring error), if it does.
    failed: Option<String>,
    /// Whether the path is optimized (the last `PathChanged`).
    serving: bool,
    out: Vec<Action>,
    pub stats: CoreStats,

    // The sub-machines.
    /// The replication session (`session.rs`).
    session: Session,
    /// Promote/demote, mirroring mode, fence (`role.rs`).
    roles: RoleMachine,
    /// The write pipeline's cursors and ring flushes (`pipeline.rs`).
    pipe: Pipeline,

    // Persistent node state, written by the driver one version at a time.
    meta: Meta,
    meta_version: u64,
    meta_durable: u64,
    meta_inflight: bool,
    meta_dirty: bool,
    executed_persisted_ms: u64,

    // What the pipeline carries.
    /// Host writes waiting for ring room (or for a starved replay).
    waiting: VecDeque<Waiting>,
    /// Host ids of entries not yet executed locally.
    host_of: BTreeMap<Seq, u64>,
    exec_queue: VecDeque<ExecItem>,
    /// Disk operations in flight: token, byte offset, byte length.
    executing: Vec<(Token, u64, u64)>,
    /// Resync extents received, waiting for their turn on the disk.
    extents: BTreeMap<Token, (u64, Vec<u8>)>,
    next_token: u64,
    /// (ACK1 seq, when it arrived): the timeout confirm rule's clock, kept
    /// only under `ConfirmMode::Timeout` (`note_ack1`).
    ack_times: VecDeque<(Seq, u64)>,
    /// Overflow: the metadata version holding the folded entries' extents
    /// and the seq the ring is trimmed through once it is durable.
    fold_pending: Option<(u64, Seq)>,
    host_flushes: Vec<HostFlush>,
    peer_flushes: Vec<PeerFlush>,

    // Replay and resync (`resync.rs`).
    resync_sender: Option<ResyncSender>,
    resync_receiver: Option<ResyncReceiver>,
    replay: Option<ReplayProgress>,
    pub last_replay: Option<ReplayProgress>,
    rate_tokens: f64,
    /// (ms, replay bytes) samples, one per 100 ms while a replay runs: the
    /// replay rate over the last second, for the floor.
    replay_samples: VecDeque<(u64, u64)>,

    /// The replicated state blob's session bookkeeping (`state.rs`).
    st: state::StateSync,

    // Online verify.
    verify: Option<VerifyRun>,
    last_verify: Option<VerifyReport>,
    /// Verify reads waiting for their ring entry to be scheduled, by seq.
    verify_queued: VecDeque<QueuedRead>,
    verify_reads: BTreeMap<Token, ReadFor>,
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
        let mut c = Core {
            serving: false,
            failed: None,
            waiting: VecDeque::new(),
            host_of: BTreeMap::new(),
            pipe: Pipeline::new(log.first_seq(), head, executed),
            exec_queue: VecDeque::new(),
            executing: Vec::new(),
            extents: BTreeMap::new(),
            next_token: 1,
            fold_pending: None,
            session: Session::new(now_ms),
            ack_times: VecDeque::new(),
            resync_sender: None,
            resync_receiver: None,
            replay: None,
            last_replay: None,
            rate_tokens: 0.0,
            replay_samples: VecDeque::new(),
            st: state::StateSync::default(),
            roles: RoleMachine::new(meta.role, meta.peer_stale_from.is_some()),
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
    pub fn session_state(&self) -> &SessionState {
        self.session.state()
    }
    pub fn is_serving(&self) -> bool {
        self.serving
    }
    pub fn is_degraded(&self) -> bool {
        self.roles.is_degraded()
    }
    /// How many ACK1 times the timeout confirm rule holds (`note_ack1`).
    #[cfg(test)]
    pub(crate) fn ack1_times_held(&self) -> usize {
        self.ack_times.len()
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
    /// Begin the flush an `Action::FlushRing` asked for: the seq it makes
    /// durable and the I/O the driver carries out before answering
    /// `RingFlushed` or `RingFlushFailed` with that seq.
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
        self.roles.current
    }
    /// The host id of ring entry `seq`, while its write is in flight here.
    pub fn host_id_of(&self, seq: Seq) -> Option<u64> {
        self.host_of.get(&seq).copied()
    }
    /// Why the handshake refused the peer, while this node is fenced.
    pub fn fenced(&self) -> Option<&str> {
        self.roles.fenced.as_deref()
    }
    /// Why the failover agent fenced this node, while it is.
    pub fn self_fenced(&self) -> Option<&str> {
        self.roles.self_fenced.as_deref()
    }
    /// Automatic failover: the stale mark (generation, first seq the backup
    /// lacks) that writes wait for, and since when (ms), if any.
    pub fn stale_wanted(&self) -> Option<(u64, Seq, u64)> {
        self.roles.stale_wanted
    }
    /// Why this node does not serve host I/O now (None while it serves).
    pub fn not_serving_reason(&self) -> Option<String> {
        if self.serving {
            return None;
        }
        Some(if let Some(f) = &self.failed {
            format!("failed: {f}")
        } else if let Some(r) = &self.roles.self_fenced {
            format!("fenced by the failover agent: {}", bounded(r, 200))
        } else if let Some(r) = &self.roles.fenced {
            format!(
                "fenced after refusing the peer ({}); an operator must resolve it",
                bounded(r, 200)
            )
        } else if self.roles.promoting() {
            "promoting: executing every held request".into()
        } else if self.roles.demoting() {
            "demoting: finishing in-flight writes".into()
        } else if self.meta.role == Role::Backup {
            "backup: the peer serves".into()
        } else if self.roles.awaiting_peer {
            "waiting for the peer's handshake (it may have been promoted while this node was down)"
                .into()
        } else {
            "making the role durable".into()
        })
    }
    pub fn watermarks(&self) -> (Seq, Seq, Seq, Seq) {
        (
            self.pipe.ack1,
            self.pipe.ack2,
            self.pipe.ack3,
            self.pipe.executed,
        )
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
            && self.pipe.executed == self.log.head()
            && !self.meta_inflight
            && !self.meta_dirty
    }
    /// The replication stream is caught up in both directions.
    pub fn in_sync(&self) -> bool {
        self.session.is_active()
            && self.resync_sender.is_none()
            && self.resync_receiver.is_none()
            && self.session.rx_backlog.is_empty()
            && (!self.session.is_sender()
                || (self.pipe.ack1 == self.log.head()
                    && (self.cfg.confirm != ConfirmMode::Ack || self.pipe.ack2 == self.log.head())))
    }

    /// A one-line summary of the state, for simulator failures.
    pub fn debug_state(&self) -> String {
        format!(
            "role={:?} session={:?} serving={} mirroring={:?} transition={:?} head={} first={} durable={} exec={} exec_next={} ack1={} ack2={} ack3={} send_next={} host={} waiting={} executing={} queue={} backlog={} resync_sender={} resync_receiver={} meta v{}/{} dirty={} failed={:?} flushes={}",
            self.meta.role, self.session.state(), self.serving, self.roles.mirroring, self.roles.transition, self.log.head(), self.log.first_seq(),
            self.pipe.ring_durable, self.pipe.executed, self.pipe.exec_next, self.pipe.ack1, self.pipe.ack2, self.pipe.ack3, self.pipe.send_next,
            self.host_of.len(), self.waiting.len(), self.executing.len(), self.exec_queue.len(), self.session.rx_backlog.len(),
            self.resync_sender.is_some(), self.resync_receiver.is_some(), self.meta_durable, self.meta_version,
            self.meta.dirty.count(), self.failed, self.host_flushes.len()
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

    /// Answers every host write and flush the core holds with `err`.
    pub(in crate::core) fn fail_host_requests(&mut self, err: HostError) {
        for (_, id) in std::mem::take(&mut self.host_of) {
            self.out.push(Action::CompleteWrite {
                id,
                result: Err(err),
            });
        }
        for w in std::mem::take(&mut self.waiting) {
            self.out.push(Action::CompleteWrite {
                id: w.id,
                result: Err(err),
            });
        }
        for f in std::mem::take(&mut self.host_flushes) {
            self.out.push(Action::CompleteFlush {
                id: f.id,
                result: Err(err),
            });
        }
    }

    fn fail(&mut self, why: String) {
        if self.failed.is_some() {
            return;
        }
        self.out
            .push(Action::Notice(format!("node refuses further work: {why}")));
        self.failed = Some(why);
        self.fail_host_requests(HostError::Unavailable);
        self.update_path();
        if !self.session.is_down() {
            self.reset_link(format!(
                "node failed: {}",
                self.failed.clone().unwrap_or_default()
            ));
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
        payload: SharedBuf,
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
                payload,
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
        self.out.push(Action::FlushDisk {
            token: Token::Flush(token),
        });
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

    // ----- control -----

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
        if !self.session.is_active_sender() {
            return Err("the backup is not connected: nothing to compare with".into());
        }
        if self.roles.is_degraded() || self.resync_sender.is_some() || self.replay.is_some() {
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
        if self.meta.role != Role::Primary
            || self.roles.is_degraded()
            || self.roles.fenced.is_some()
        {
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
            let after = self.pipe.send_next - 1;
            self.next_token += 1;
            let token = Token::Verify(self.next_token);
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

    fn on_verify_read(&mut self, token: Token, result: Result<Vec<u8>, i32>) {
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
                if self.session.is_active_receiver() {
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
                if self.session.is_down() {
                    return;
                }
                if self.now_ms.saturating_sub(self.session.last_rx_ms)
                    > 2 * self.cfg.heartbeat_interval_ms
                {
                    // A missed heartbeat (the peer stalled, or the network
                    // did): the incident report of the timeout rule.
                    self.session.alive_since_ms = self.now_ms;
                }
                self.session.last_rx_ms = self.now_ms;
                self.on_msg(m)
            }
            Event::RingFlushFailed { through, why } => {
                self.pipe.ring_flush_failed();
                self.log.flush_failed(through, why);
                self.check_log();
            }
            Event::RingFlushed { through } => {
                self.log.flush_completed(through);
                // After a failed flush nothing counts as durable any more.
                if self.log.failure().is_none() {
                    self.pipe.ring_flushed(through, self.log.head());
                } else {
                    self.pipe.ring_flush_failed();
                }
            }
            Event::MetaPersisted { version } => {
                self.meta_inflight = false;
                self.meta_durable = self.meta_durable.max(version);
                self.roles.meta_persisted(self.meta_durable);
                if let Some((v, through)) = self.fold_pending {
                    if self.meta_durable >= v {
                        self.fold_pending = None;
                        // I3's other way out of the queue: executed here,
                        // and its extents durable in the dirty map.
                        assert!(
                            through <= self.pipe.executed,
                            "I3: folding seq {through} past the executed {}",
                            self.pipe.executed
                        );
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
            } if matches!(token, Token::Verify(_)) => self.on_verify_read(token, result),
            Event::ExtentRead {
                token: _,
                offset,
                result,
            } => self.on_extent_read(offset, result),
            Event::DiskFlushed { token, result } => {
                let Token::Flush(token) = token else {
                    return;
                };
                if let Some(f) = self.host_flushes.iter_mut().find(|f| f.token == token) {
                    f.local_done = Some(result);
                } else if let Some(r) = self
                    .resync_receiver
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
                    if self.session.is_active() {
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
        if self.roles.current
            && self.meta.role == Role::Backup
            && dt >= self.cfg.peer_timeout_ms / 2
        {
            // This node did not run for a while (stopped, starved): the
            // primary may have gone degraded meanwhile, and nothing said so
            // yet. Not current until a new session's `InSync`.
            self.roles.current = false;
            self.session.in_sync_at = None;
            let why = format!(
                "this node did not run for {dt} ms: the primary may have completed writes \
                 without it meanwhile; it can be promoted again once it has caught up"
            );
            self.out.push(Action::Notice(why.clone()));
            if self.session.is_up() {
                self.reset_link(why);
            }
        }
        self.sample_replay_rate();
        if self.cfg.max_replay_bytes_per_sec > 0 {
            let cap = self.cfg.max_replay_bytes_per_sec as f64;
            self.rate_tokens =
                (self.rate_tokens + cap * dt as f64 / 1000.0).min(cap / 10.0 + 1.0e6);
        }
        if self.session.is_up() {
            if now_ms - self.session.last_hb_ms >= self.cfg.heartbeat_interval_ms {
                self.session.last_hb_ms = now_ms;
                self.out.push(Action::Send(Msg::Heartbeat {
                    incarnation: self.meta.incarnation,
                }));
            }
            if now_ms - self.session.last_rx_ms >= self.cfg.peer_timeout_ms {
                self.reset_link(format!(
                    "peer silent for {} ms",
                    now_ms - self.session.last_rx_ms
                ));
            }
        }
        // Persist the executed watermark now and then so a restart replays little.
        if now_ms - self.executed_persisted_ms >= 1000 && self.meta.executed != self.pipe.executed {
            self.executed_persisted_ms = now_ms;
            self.meta.executed = self.pipe.executed;
            self.persist_meta();
        }
    }

    fn on_msg(&mut self, m: Msg) {
        match m {
            Msg::Hello(h) => {
                if *self.session.state() != SessionState::Handshake {
                    return self.reset_link("unexpected Hello".into());
                }
                if let Some(reason) = self.failover_mismatch(&h) {
                    return self.refuse_failover_mismatch(h, reason);
                }
                let mine = self.hello();
                let plan = decide(&mine, &h);
                self.session.peer = Some(h);
                self.start_session(plan);
            }
            Msg::Ready { head, rollback } => {
                if *self.session.state() != SessionState::AwaitReady {
                    return self.reset_link("unexpected Ready".into());
                }
                self.on_ready(head, rollback);
            }
            Msg::Req { hdr, payload } => {
                if !self.session.is_active_receiver() {
                    return self.reset_link("unexpected Req".into());
                }
                self.stats.entries_received += 1;
                self.session.rx_backlog.push_back((hdr, payload));
                self.drain_backlog();
            }
            Msg::Ack1(s) => {
                if !self.session.is_active_sender() || s >= self.pipe.send_next {
                    return self.reset_link(format!("bad ACK1({s})"));
                }
                if self.pipe.ack1_received(s) {
                    self.note_ack1(s);
                }
            }
            Msg::Ack2(s) => {
                if !self.session.is_sender() || s >= self.pipe.send_next {
                    return self.reset_link(format!("bad ACK2({s})"));
                }
                self.pipe.ack2 = self.pipe.ack2.max(s);
            }
            Msg::Ack3(s) => {
                if self.session.is_sender() {
                    return self.reset_link("unexpected ACK3".into());
                }
                self.pipe.ack3 = self.pipe.ack3.max(s);
            }
            Msg::ResyncBegin {
                extents: _,
                bytes: _,
                full,
            } => self.on_resync_begin(full),
            Msg::Extent { offset, data } => self.on_extent(offset, data),
            Msg::ResyncEnd {
                next_seq,
                consistent_at,
            } => self.on_resync_end(next_seq, consistent_at),
            Msg::ResyncDone { next_seq } => self.on_resync_done(next_seq),
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
                if let Some(h) = &self.session.peer {
                    if h.incarnation != incarnation {
                        self.session.alive_since_ms = self.now_ms;
                    }
                }
            }
            Msg::Refuse { reason } => {
                self.out.push(Action::Notice(format!(
                    "peer refused the pairing: {}",
                    bounded(&reason, 300)
                )));
                // A refusal for differing [failover] sections is a
                // configuration error, not a split brain: nobody is fenced.
                let config_error = self
                    .session
                    .peer
                    .as_ref()
                    .is_some_and(|h| self.failover_mismatch(h).is_some());
                if !config_error {
                    self.fence(&reason);
                }
                self.session.refuse(reason);
            }
            Msg::InSync(s) => {
                if !self.session.is_active_receiver() {
                    return self.reset_link("unexpected InSync".into());
                }
                self.session.in_sync_at = Some(s);
            }
            Msg::VerifyReq {
                id,
                offset,
                len,
                chunk,
                after,
            } => {
                let ok = self.session.is_active_receiver()
                    && chunk.is_power_of_two()
                    && chunk >= 512
                    && len > 0
                    && len <= MAX_VERIFY_EXTENT
                    && len.div_ceil(chunk) <= MAX_VERIFY_CHUNKS
                    && offset
                        .checked_add(len)
                        .is_some_and(|e| e <= self.cfg.volume_bytes)
                    && after + 1 >= self.pipe.exec_next;
                if !ok {
                    return self.reset_link(format!(
                        "bad VerifyReq (offset {offset}, len {len}, chunk {chunk}, after {after})"
                    ));
                }
                let token = Token::Verify(self.token());
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
                if !self.session.is_sender() || !known {
                    return self.reset_link(format!("unexpected VerifyDigest {id}"));
                }
                let v = self.verify.as_mut().unwrap();
                v.inflight.get_mut(&id).unwrap().remote = Some(digests);
                self.verify_compare(id);
            }
            Msg::State { seq, blob } => self.on_state_msg(seq, blob),
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
        // ACKs before the ring write and the executes this poll starts: the
        // reactor hands the link what is queued ahead of disk submissions,
        // and an ACK1 is what the primary's writes wait for. Again at the
        // end for what this poll itself made durable or received.
        self.send_acks();
        self.flush_ring();
        self.drain_backlog();
        self.clear_caught_up_marks();
        self.send_state();
        self.track_current();
        self.verify_step();
        self.stream();
        self.resync_send();
        self.resync_receive();
        self.schedule_executions();
        self.send_acks();
        self.trim();
        self.flushes();
        self.complete_role_changes();
        self.update_replay();
        self.write_meta();
        self.check();
    }

    /// A backup that now holds what the authority had, or has executed
    /// through a resync's consistency point, drops the mark that kept it
    /// from being promoted.
    fn clear_caught_up_marks(&mut self) {
        if self.meta.behind_until > 0 && self.pipe.ring_durable >= self.meta.behind_until {
            self.meta.behind_until = 0;
            self.persist_meta();
        }
        if self.meta.inconsistent_until > 0
            && self.pipe.executed >= self.meta.inconsistent_until
            && self.pipe.ring_durable >= self.meta.inconsistent_until
        {
            self.meta.inconsistent_until = 0;
            self.persist_meta();
        }
    }

    /// One metadata write at a time, of the newest version.
    fn write_meta(&mut self) {
        if self.meta_dirty && !self.meta_inflight {
            self.meta_dirty = false;
            self.meta_inflight = true;
            self.out.push(Action::PersistMeta {
                version: self.meta_version,
                bytes: self.meta.encode(),
            });
        }
    }

    /// The sub-machines' own asserts, once per batch.
    fn check(&self) {
        self.session.check();
        self.pipe.check(self.log.head());
        self.roles.check(self.meta.role);
    }
}
