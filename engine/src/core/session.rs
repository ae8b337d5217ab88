//! The replication session: one connection's life, from the link coming up
//! to it going down.
//!
//! ```text
//!   Down ──PeerConnected──► Handshake ──Hello, plan Sender──► AwaitReady ──Ready──► Active(Sender)
//!                               │      └─Hello, plan Receiver─► SendingReady ─Ready sent─► Active(Receiver)
//!                               └─Hello, plan Refuse (or the peer's Refuse)──► Refused
//!   any state ──PeerDisconnected / ResetLink──► Down
//! ```
//!
//! The sender is the authority of the pairing: it streams ring entries and
//! resync extents; the receiver appends and acknowledges. `Refused` lasts
//! until the link goes down (and a new handshake refuses again until an
//! operator resolves it).
//!
//! The core's handshake steps live here too: the hello (with the failover
//! fingerprint, and the refusal of a peer whose `[failover]` section
//! differs), the decision (`decide.rs`) and what each side does with it,
//! `Ready`, and the fence a refusal puts up.

use std::collections::VecDeque;

use super::*;

/// Which end of an active session this node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The authority: streams entries and extents, receives ACKs.
    Sender,
    /// Appends what the sender streams, answers ACK1/ACK2.
    Receiver,
}

/// Where the replication session stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionState {
    Down,
    /// Hello sent; waiting for the peer's.
    Handshake,
    /// Sender: waiting for the receiver's `Ready`.
    AwaitReady,
    /// Receiver: preparing `Ready` (metadata and ring flush pending).
    SendingReady,
    Active(Side),
    /// The handshake refused the pairing (split brain...): the reason.
    Refused(String),
}

impl SessionState {
    pub fn as_str(&self) -> &'static str {
        match self {
            SessionState::Down => "down",
            SessionState::Handshake | SessionState::AwaitReady | SessionState::SendingReady => {
                "handshake"
            }
            SessionState::Active(_) => "active",
            SessionState::Refused(_) => "refused",
        }
    }
}

/// A receiver between the handshake decision and `Ready`.
pub(super) struct PendingReceiver {
    /// Metadata version holding the rollback extents and the role.
    pub gate: u64,
    /// Drop ring entries after this seq.
    pub truncate: Option<Seq>,
    /// The authority's history, adopted once the truncation is durable.
    pub history: Vec<GenEntry>,
}

/// The session and what belongs to it: the peer's hello, the receiver's
/// preparation, the liveness clocks and the received entries not yet
/// appended.
pub(super) struct Session {
    state: SessionState,
    /// The side the handshake gave this node, from the decision until the
    /// link goes down. A refusal that comes after the decision keeps it: the
    /// peer's confirmations are still read from that side's watermark
    /// (ACK2 on a sender, ACK3 otherwise).
    side: Option<Side>,
    /// The peer's hello of this session (kept after it ends, for `promote`'s
    /// check of a connected primary and the remirror's history).
    pub peer: Option<Hello>,
    /// From the receiver's handshake decision until its `Ready` is about
    /// to go out (or the link goes down; a refusal meanwhile keeps it, so
    /// nothing past the fork executes).
    pub pending: Option<PendingReceiver>,
    /// Counts sessions that reached `Active` (host flushes are resent once
    /// per session).
    pub number: u64,
    pub last_rx_ms: u64,
    pub last_hb_ms: u64,
    /// Since when heartbeats showed the same peer alive with no gap (the
    /// timeout confirm rule).
    pub alive_since_ms: u64,
    /// Received REQs waiting for ring room or the end of a resync.
    pub rx_backlog: VecDeque<(ReqHeader, SharedBuf)>,
    /// Receiver: the sender's `InSync` seq in this session.
    pub in_sync_at: Option<Seq>,
    /// Sender: `InSync` sent in this session.
    pub in_sync_sent: bool,
}

impl Session {
    pub fn new(now_ms: u64) -> Self {
        Session {
            state: SessionState::Down,
            side: None,
            peer: None,
            pending: None,
            number: 0,
            last_rx_ms: now_ms,
            last_hb_ms: now_ms,
            alive_since_ms: now_ms,
            rx_backlog: VecDeque::new(),
            in_sync_at: None,
            in_sync_sent: false,
        }
    }

    pub fn state(&self) -> &SessionState {
        &self.state
    }

    pub fn is_down(&self) -> bool {
        self.state == SessionState::Down
    }

    /// Connected and not refused: heartbeats flow.
    pub fn is_up(&self) -> bool {
        !matches!(self.state, SessionState::Down | SessionState::Refused(_))
    }

    pub fn is_active(&self) -> bool {
        matches!(self.state, SessionState::Active(_))
    }

    pub fn is_active_sender(&self) -> bool {
        self.state == SessionState::Active(Side::Sender)
    }

    pub fn is_active_receiver(&self) -> bool {
        self.state == SessionState::Active(Side::Receiver)
    }

    /// The sender's end from the handshake decision on (awaiting `Ready`,
    /// active, or refused by the peer after the decision).
    pub fn is_sender(&self) -> bool {
        self.side == Some(Side::Sender)
    }

    /// The link came up: a new handshake begins.
    pub fn connect(&mut self, now_ms: u64) {
        assert!(self.is_down(), "session: connect while {:?}", self.state);
        self.state = SessionState::Handshake;
        self.last_rx_ms = now_ms;
        self.last_hb_ms = now_ms;
        self.alive_since_ms = now_ms;
        self.peer = None;
    }

    /// The link went down: everything of the session goes.
    pub fn disconnect(&mut self) {
        self.state = SessionState::Down;
        self.side = None;
        self.pending = None;
        self.rx_backlog.clear();
        self.in_sync_at = None;
        self.in_sync_sent = false;
    }

    /// The handshake decided this node sends.
    pub fn await_ready(&mut self) {
        assert_eq!(
            self.state,
            SessionState::Handshake,
            "session: plan outside the handshake"
        );
        self.state = SessionState::AwaitReady;
        self.side = Some(Side::Sender);
    }

    /// The handshake decided this node receives, once `pending` is done.
    pub fn prepare_ready(&mut self, pending: PendingReceiver) {
        assert_eq!(
            self.state,
            SessionState::Handshake,
            "session: plan outside the handshake"
        );
        self.state = SessionState::SendingReady;
        self.side = Some(Side::Receiver);
        self.pending = Some(pending);
    }

    /// Sender: the receiver's `Ready` arrived.
    pub fn ready_received(&mut self) {
        assert_eq!(
            self.state,
            SessionState::AwaitReady,
            "session: Ready while not awaiting it"
        );
        self.state = SessionState::Active(Side::Sender);
        self.number += 1;
    }

    /// Receiver: `Ready` went out.
    pub fn ready_sent(&mut self) {
        assert_eq!(
            self.state,
            SessionState::SendingReady,
            "session: Ready sent out of turn"
        );
        assert!(
            self.pending.is_none(),
            "session: Ready before the receiver's preparation"
        );
        self.state = SessionState::Active(Side::Receiver);
    }

    /// Either node refused the pairing.
    pub fn refuse(&mut self, reason: String) {
        assert!(!self.is_down(), "session: refusal without a link");
        self.state = SessionState::Refused(reason);
    }

    /// Asserts what no sequence of events may produce.
    pub fn check(&self) {
        match &self.state {
            SessionState::Down | SessionState::Handshake => {
                assert_eq!(self.side, None, "session: a side before the decision")
            }
            SessionState::AwaitReady => assert_eq!(self.side, Some(Side::Sender)),
            SessionState::SendingReady => assert_eq!(self.side, Some(Side::Receiver)),
            SessionState::Active(side) => assert_eq!(self.side, Some(*side)),
            SessionState::Refused(_) => {}
        }
    }

    /// The truncation a receiver still has to make before `Ready`, if any.
    pub fn pending_truncate(&self) -> Option<Seq> {
        self.pending.as_ref().and_then(|p| p.truncate)
    }
}

impl<L: Log> Core<L> {
    pub(super) fn reset_link(&mut self, reason: String) {
        self.out.push(Action::ResetLink { reason });
        self.on_disconnected();
    }

    pub(super) fn on_connected(&mut self) {
        if !self.session.is_down() {
            self.on_disconnected();
        }
        self.session.connect(self.now_ms);
        let hello = self.hello();
        self.out.push(Action::Send(Msg::Hello(hello)));
    }

    pub(super) fn hello(&self) -> Hello {
        Hello {
            node_id: self.meta.node_id,
            role: self.meta.role,
            history: self.meta.history.clone(),
            head: self.log.head(),
            first: self.log.first_seq(),
            fresh: self.meta.fresh,
            resyncing: self.meta.resyncing,
            incarnation: self.meta.incarnation,
            failover: self.cfg.failover_id,
        }
    }

    /// The two nodes' failover configurations differ (a pair must agree),
    /// or one of them predates automatic failover: the reason, if so.
    pub(super) fn failover_mismatch(&self, peer: &Hello) -> Option<String> {
        let mode = |id: u64| {
            if id == 0 {
                "manual (or a version without automatic failover)".to_string()
            } else {
                format!("etcd (configuration fingerprint {id:016x})")
            }
        };
        (peer.failover != self.cfg.failover_id).then(|| {
            format!(
                "the [failover] sections differ: this node (id {}) runs failover {}, the peer \
                 (id {}) runs failover {}; give both nodes the same [failover] section \
                 (mode, key_prefix, lease_ttl_ms, stale_mark_timeout_ms) and \
                 restart the one that was changed",
                self.meta.node_id,
                mode(self.cfg.failover_id),
                peer.node_id,
                mode(peer.failover)
            )
        })
    }

    /// The peer's `[failover]` section differs from ours: a configuration
    /// error, not a split brain. Refused, but nobody is fenced (the primary
    /// goes on alone).
    pub(super) fn refuse_failover_mismatch(&mut self, peer: Hello, reason: String) {
        self.out
            .push(Action::Notice(format!("refusing the peer: {reason}")));
        self.out.push(Action::Send(Msg::Refuse {
            reason: reason.clone(),
        }));
        self.session.peer = Some(peer);
        self.session.refuse(reason);
    }

    pub(super) fn on_disconnected(&mut self) {
        if self.session.is_down() {
            return;
        }
        self.session.disconnect();
        self.resync_sender = None;
        self.resync_receiver = None;
        self.peer_flushes.clear();
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

    pub(super) fn start_session(&mut self, plan: Plan) {
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
                self.session.refuse(reason);
            }
            Plan::Sender => {
                self.unfence();
                // A restarted primary keeps waiting until the receiver's
                // `Ready`: only then has the receiver dropped whatever it held
                // past our (possibly torn) ring head, so new seqs cannot
                // collide with entries it still has.
                self.session.await_ready();
            }
            Plan::Receiver { truncate_to } => {
                let peer = self.session.peer.clone().expect("hello");
                // A new session: current again only after this one's `InSync`.
                self.roles.current = false;
                if self.roles.promoting() {
                    // The peer came back as the authority while this node
                    // was promoting: promoting now would make two primaries.
                    self.roles.transition = Transition::Steady;
                    self.out.push(Action::Notice(
                        "promote cancelled: the peer returned and holds the authority".into(),
                    ));
                }
                // The authority holds every entry through the fork: what
                // this node keeps is acknowledged.
                self.pipe.ack1 = self.pipe.ack1.max(truncate_to.min(self.log.head()));
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
                self.roles.awaiting_peer = false;
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
                    self.pipe.exec_next = self.pipe.exec_next.min(truncate_to + 1);
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
                    self.roles.became_backup();
                    self.meta.peer_stale_from = None;
                    for w in std::mem::take(&mut self.waiting) {
                        self.out.push(Action::CompleteWrite {
                            id: w.id,
                            result: Err(HostError::NotPrimary),
                        });
                    }
                    changed = true;
                }
                // On a receiver the dirty map lists the extents it needs
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
                self.session.prepare_ready(PendingReceiver {
                    gate,
                    truncate,
                    history: peer.history.clone(),
                });
            }
        }
    }

    /// The pairing was refused. A node that serves in a generation the
    /// operator forced keeps serving (the operator chose it); any other
    /// stops serving until an operator resolves the refusal (I6).
    pub(super) fn fence(&mut self, reason: &str) {
        let chosen = self.serving && self.meta.forced.contains(&self.meta.generation());
        if chosen || self.roles.fenced.is_some() {
            return;
        }
        self.roles.fenced = Some(reason.to_string());
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
    pub(super) fn unfence(&mut self) {
        if self.roles.fenced.take().is_some() {
            self.out.push(Action::Notice(
                "the peer's handshake succeeded: no longer fenced".into(),
            ));
            self.update_path();
        }
    }

    pub(super) fn on_ready(&mut self, head: Seq, rollback: Vec<(u64, u64)>) {
        if head > self.log.head()
            || rollback
                .iter()
                .any(|&(o, l)| o.checked_add(l).is_none_or(|e| e > self.cfg.volume_bytes))
        {
            return self.reset_link(format!("bad Ready (head {head}, ours {})", self.log.head()));
        }
        let peer = self.session.peer.clone().expect("hello");
        self.session.ready_received();
        if self.roles.awaiting_peer {
            self.roles.awaiting_peer = false;
            self.update_path();
        }
        // A new session: the receiver holds (durably) every entry through `head`.
        self.pipe.ack1 = head.min(self.log.head());
        self.ack_times.clear();
        self.note_ack1(self.pipe.ack1);
        self.pipe.sent_ack3 = 0;
        for (o, l) in &rollback {
            self.meta.dirty.mark(*o, *l);
        }
        let first = self.log.first_seq();
        let covered_by_dirty = self.meta.fold_base > 0 && head + 1 >= self.meta.fold_base;
        // The peer confirmed executing everything below our ring (ACK2), even
        // if its own ring lost the tail: its disk has it.
        let covered_by_ack2 = self.cfg.confirm == ConfirmMode::Ack && self.pipe.ack2 + 1 >= first;
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
            self.pipe.ack2
        } else {
            0
        };
        // What the peer executed, it held: as good as ACK1 for our delay buffer.
        self.pipe.ack1 = self.pipe.ack1.max(executed_by_peer.min(self.log.head()));
        let end_seq = (head + 1).max(executed_by_peer + 1).max(first);
        // A resync also carries the jump of the peer's ring to `end_seq`.
        let resync = !self.meta.dirty.is_empty() || peer.resyncing || end_seq > head + 1;
        let backlog = self.log.head() + 1 - end_seq;
        if resync {
            let v = self.persist_meta();
            self.resync_sender = Some(ResyncSender {
                meta_gate: v,
                next_chunk: 0,
                reads_inflight: 0,
                end_seq,
                ended: false,
            });
            self.out.push(Action::Send(Msg::ResyncBegin {
                extents: self.meta.dirty.count(),
                bytes: self.meta.dirty.bytes(),
                full,
            }));
        }
        self.pipe.send_next = end_seq;
        self.state_session(end_seq);
        if backlog > 0 || resync {
            self.stats.replays += 1;
            if resync && !full && !self.meta.dirty.is_empty() {
                self.stats.dirty_resyncs += 1;
            }
            self.replay = Some(ReplayProgress {
                start_ms: self.now_ms,
                last_seq: self.log.head(),
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

    pub(super) fn send_ready(&mut self) {
        if *self.session.state() != SessionState::SendingReady {
            return;
        }
        if let Some(pt) = &self.session.pending {
            // Phase 1 (rollback extents, role) durable; phase 2: drop the
            // entries past the fork once no execution of theirs is in
            // flight; phase 3: adopt the authority's history.
            if self.meta_durable < pt.gate {
                return;
            }
            if let Some(t) = pt.truncate {
                // Entries past the fork, and (as before) any verify read.
                if self.executing.iter().any(|&(tok, _, _)| match tok {
                    Token::Entry(s) => s > t,
                    Token::Verify(_) => true,
                    Token::Extent(_) | Token::Flush(_) => false,
                }) {
                    return;
                }
                self.log.truncate_after(t);
                self.pipe.truncated(self.log.head());
                self.meta.executed = self.meta.executed.min(self.log.head());
            }
            let pt = self.session.pending.take().unwrap();
            if !self.meta.fresh && self.meta.history != pt.history {
                self.meta.history = pt.history;
            }
            self.persist_meta();
            return;
        }
        if self.cfg.ack1_persisted && self.pipe.ring_durable < self.log.head() {
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
        self.pipe.sent_ack1 = self.log.head();
        self.pipe.sent_ack2 = 0;
        self.ack_times.clear();
        self.note_ack1(self.pipe.sent_ack1);
        self.session.ready_sent();
    }
}
