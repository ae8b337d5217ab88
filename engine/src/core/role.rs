//! The node's role: primary or backup (persisted in `Meta::role`), the
//! transition between them in progress, how a primary mirrors (synchronous,
//! degrading, degraded with the backup stale), the fence after a refused
//! pairing, and automatic failover's part (the failover agent's fence, the
//! stale-mark gate before a degrade, the generation floor of a promotion).
//!
//! ```text
//!   Primary: Synchronous ──peer gone past the timeout──► Degrading{meta version}
//!            ──that version durable──► Degraded{sync_from: None}
//!            ──backup near the head──► Degraded{sync_from: Some(next seq)}
//!            ──ACK1 reaches it──► Synchronous{acked_below}
//!   Backup ──promote──► Promoting ──every held entry executed──► Primary
//!   Primary ──demote──► Demoting ──in-flight writes done──► Backup
//! ```
//!
//! The core's steps that drive it live here too: the operator's `promote`
//! and `demote`, the degrade at the peer timeout (behind the stale-mark gate
//! under automatic failover), *current* tracking, the fence, the failover
//! agent's `self_fence` / `lift_self_fence` / `promote_to` /
//! `stale_recorded`, and the serving path.

use super::*;

/// A role change in progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Transition {
    Steady,
    /// `promote`: executing every held entry, then a new generation.
    /// `forced`: `promote --force`, recorded as such.
    Promoting {
        forced: bool,
    },
    /// `demote`: finishing in-flight writes, then backup.
    Demoting,
}

/// How a primary completes writes with respect to its backup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Mirroring {
    /// Every REQ waits for ACK1 before it executes. Seqs below
    /// `acked_below` were acknowledged while catching up from a degraded
    /// stretch and may execute without a new ACK1 (0: none).
    Synchronous { acked_below: Seq },
    /// The peer is gone past the timeout: the new generation and the
    /// backup's stale-from seq are being persisted (metadata `version`);
    /// nothing completes without ACK1 until that is durable.
    Degrading { version: u64, acked_below: Seq },
    /// Writes complete without the backup (recorded durably as stale). Once
    /// the backup is back near the head, seqs from `sync_from` on wait for
    /// ACK1 again; when ACK1 reaches it, the primary is synchronous again.
    Degraded { sync_from: Option<Seq> },
}

impl Mirroring {
    /// Seq `s` may execute (and complete) without ACK1.
    pub fn executes_unacked(self, s: Seq) -> bool {
        match self {
            Mirroring::Synchronous { acked_below } | Mirroring::Degrading { acked_below, .. } => {
                s < acked_below
            }
            Mirroring::Degraded { sync_from: None } => true,
            Mirroring::Degraded { sync_from: Some(n) } => s < n,
        }
    }

    /// The last seq that may execute without ACK1, if any.
    pub fn unacked_through(self) -> Option<Seq> {
        match self {
            Mirroring::Synchronous { acked_below } | Mirroring::Degrading { acked_below, .. } => {
                acked_below.checked_sub(1)
            }
            Mirroring::Degraded { sync_from: None } => Some(Seq::MAX),
            Mirroring::Degraded { sync_from: Some(n) } => n.checked_sub(1),
        }
    }
}

pub(super) struct RoleMachine {
    pub transition: Transition,
    pub mirroring: Mirroring,
    /// A node that (re)started as primary waits for the peer's handshake
    /// before it serves: the peer may have been promoted meanwhile. A
    /// handshake or `promote --force` clears it.
    pub awaiting_peer: bool,
    /// Backup: holds every write the primary may have completed, so a
    /// promote loses nothing. Set once the sender's `InSync` seq is durable
    /// here; false at every start and every new handshake.
    pub current: bool,
    /// The handshake refused the peer (split brain...): this node serves
    /// nothing until an operator resolves it (I6). The reason.
    pub fenced: Option<String>,
    /// The failover agent fenced this node (it lost both etcd and the
    /// peer): it serves nothing until the agent lifts it. The reason.
    pub self_fenced: Option<String>,
    /// The next promotion opens a generation at least this one (the
    /// failover agent's fencing token, newer than any recorded in etcd).
    pub gen_floor: u64,
    /// Automatic failover: the stale mark asked of the agent (gen, from
    /// seq) and since when (ms), while writes wait for it.
    pub stale_wanted: Option<(u64, Seq, u64)>,
    /// The stale mark the agent confirmed recorded in etcd.
    pub stale_recorded: Option<(u64, Seq)>,
    /// Metadata version that made the current role durable.
    pub version: u64,
}

impl RoleMachine {
    /// The role machine of a node that starts as `role`, degraded when its
    /// metadata records the backup as stale.
    pub fn new(role: Role, peer_stale: bool) -> Self {
        RoleMachine {
            transition: Transition::Steady,
            mirroring: if role == Role::Primary && peer_stale {
                Mirroring::Degraded { sync_from: None }
            } else {
                Mirroring::Synchronous { acked_below: 0 }
            },
            awaiting_peer: role == Role::Primary,
            current: false,
            fenced: None,
            self_fenced: None,
            gen_floor: 0,
            stale_wanted: None,
            stale_recorded: None,
            version: 0,
        }
    }

    pub fn promoting(&self) -> bool {
        matches!(self.transition, Transition::Promoting { .. })
    }

    pub fn demoting(&self) -> bool {
        self.transition == Transition::Demoting
    }

    pub fn is_degraded(&self) -> bool {
        matches!(self.mirroring, Mirroring::Degraded { .. })
    }

    /// Degrading or degraded: the peer is being, or has been, left behind.
    pub fn leaving_peer(&self) -> bool {
        !matches!(self.mirroring, Mirroring::Synchronous { .. })
    }

    /// Serves host I/O in `role`, with metadata durable through `durable`.
    pub fn serves(&self, role: Role, durable: u64) -> bool {
        self.fenced.is_none()
            && self.self_fenced.is_none()
            && role == Role::Primary
            && self.transition == Transition::Steady
            && !self.awaiting_peer
            && durable >= self.version
    }

    /// The peer is gone past the timeout: `version` will record it stale.
    pub fn degrade(&mut self, version: u64) {
        let Mirroring::Synchronous { acked_below } = self.mirroring else {
            panic!("role: degrading while {:?}", self.mirroring);
        };
        self.mirroring = Mirroring::Degrading {
            version,
            acked_below,
        };
    }

    /// Metadata is durable through `durable`: a pending degrade takes effect.
    pub fn meta_persisted(&mut self, durable: u64) {
        if let Mirroring::Degrading { version, .. } = self.mirroring {
            if durable >= version {
                self.mirroring = Mirroring::Degraded { sync_from: None };
            }
        }
    }

    /// The backup is back near the head: seqs from `next` wait for ACK1.
    pub fn sync_from(&mut self, next: Seq) {
        assert_eq!(
            self.mirroring,
            Mirroring::Degraded { sync_from: None },
            "role: catching up out of turn"
        );
        self.mirroring = Mirroring::Degraded {
            sync_from: Some(next),
        };
    }

    /// ACK1 reached the catch-up point: synchronous again.
    pub fn caught_up(&mut self) {
        let Mirroring::Degraded { sync_from: Some(n) } = self.mirroring else {
            panic!("role: caught up while {:?}", self.mirroring);
        };
        self.mirroring = Mirroring::Synchronous { acked_below: n };
    }

    /// The node becomes (or returns to being) a backup.
    pub fn became_backup(&mut self) {
        self.transition = Transition::Steady;
        self.mirroring = Mirroring::Synchronous { acked_below: 0 };
        self.current = false;
    }

    /// Asserts what no sequence of events may produce.
    pub fn check(&self, role: Role) {
        if role == Role::Backup {
            assert!(
                matches!(self.mirroring, Mirroring::Synchronous { acked_below: 0 }),
                "role: a backup mirrors {:?}",
                self.mirroring
            );
            assert!(!self.demoting(), "role: a backup demoting");
        } else {
            assert!(!self.current, "role: a primary marked current");
        }
    }
}

impl<L: Log> Core<L> {
    pub(super) fn update_path(&mut self) {
        let serving = self.failed.is_none() && self.roles.serves(self.meta.role, self.meta_durable);
        if serving != self.serving {
            self.serving = serving;
            self.out.push(Action::PathChanged { serving });
        }
    }

    /// The operator's `promote`. Without `force` it is accepted only when
    /// it cannot lose an acknowledged write or create a split brain that
    /// this node can foresee; `force` skips those checks (never the disk's
    /// consistency) and records the new generation as forced.
    pub fn promote(&mut self, force: bool) -> Result<(), String> {
        if self.failed.is_some() {
            return Err("this node failed after a disk error; fix the disk and restart it".into());
        }
        if self.meta.role == Role::Primary {
            if let Some(r) = &self.roles.fenced {
                if !force {
                    return Err(format!(
                        "this node refused its peer ({}) and is fenced; choose the survivor: \
                         run `deltamirror promote --force` on it and \
                         `deltamirror format --replace --force` on the other node",
                        bounded(r, 200)
                    ));
                }
                self.roles.fenced = None;
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
            if self.roles.awaiting_peer && !self.session.is_active() {
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
                if self.roles.demoting() {
                    return Err("a demote is in progress; promote once it has finished".into());
                }
                self.roles.awaiting_peer = false;
                self.roles.transition = Transition::Promoting { forced: true };
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
        if self.meta.inconsistent_until > self.pipe.executed {
            return Err(format!(
                "this node's disk is not consistent: a resync wrote blocks as of the peer's seq \
                 {}, and this node has executed only through seq {}; it cannot be promoted, \
                 even with --force, until it receives the rest from the peer",
                self.meta.inconsistent_until, self.pipe.executed
            ));
        }
        if self.session.is_up() && self.session.peer.as_ref().map(|h| h.role) == Some(Role::Primary)
        {
            return Err("the peer is primary and connected; demote it first".into());
        }
        if !force {
            if self.log.head() < self.meta.behind_until || self.resync_receiver.is_some() {
                return Err(format!(
                    "this node is behind the primary (holds seq {}, the primary had {}): \
                     promoting it would lose acknowledged writes. Start the primary and let \
                     this node catch up, or run `deltamirror promote --force` to accept losing them",
                    self.log.head(),
                    self.meta.behind_until
                ));
            }
            if !self.roles.current {
                return Err(format!(
                    "this node has not caught up with the primary since it started (link {}): \
                     the primary may have completed writes without it (degraded mode) that \
                     it does not hold. Start the primary and let this node catch up, or run \
                     `deltamirror promote --force` to accept losing them",
                    self.session.state().as_str()
                ));
            }
        }
        if let Some(r) = self.roles.fenced.take() {
            self.out.push(Action::Notice(format!(
                "promote --force: the operator chose this node over the refused peer ({})",
                bounded(&r, 200)
            )));
        }
        self.roles.transition = Transition::Promoting { forced: force };
        self.roles.current = false;
        self.out.push(Action::Notice(format!(
            "promote{}: executing every held request, then taking over",
            if force { " --force" } else { "" }
        )));
        Ok(())
    }

    /// `promote` to a generation of at least `floor` (the failover agent's
    /// fencing token, newer than any generation recorded in etcd).
    pub fn promote_to(&mut self, force: bool, floor: u64) -> Result<(), String> {
        self.promote(force)?;
        self.roles.gen_floor = floor;
        Ok(())
    }

    /// The failover agent lost both etcd and the peer: stop serving before
    /// its lease can expire. Writes in flight and waiting fail (the host
    /// retries on the other path); none completes until `lift_self_fence`.
    pub fn self_fence(&mut self, reason: &str) {
        if self.roles.self_fenced.is_some() {
            return;
        }
        self.roles.self_fenced = Some(reason.to_string());
        self.out.push(Action::Notice(format!(
            "fenced by the failover agent: {reason}"
        )));
        self.fail_host_requests(HostError::NotPrimary);
        self.update_path();
    }

    /// The failover agent regained its quorum (lease renewed, or the peer
    /// connected as backup): serve again.
    pub fn lift_self_fence(&mut self, reason: &str) {
        if self.roles.self_fenced.take().is_some() {
            self.out.push(Action::Notice(format!(
                "the failover agent lifted its fence: {reason}"
            )));
            self.update_path();
        }
    }

    /// The failover agent recorded in etcd, under its lease, that the
    /// backup is stale from `from_seq` in generation `gen`: writes may
    /// complete without it (degraded mode).
    pub fn stale_recorded(&mut self, gen: u64, from_seq: Seq) {
        if self.roles.self_fenced.is_none() {
            self.roles.stale_recorded = Some((gen, from_seq));
        }
    }

    pub fn demote(&mut self) -> Result<(), String> {
        if self.meta.role == Role::Backup {
            return Err("this node is already a backup".into());
        }
        if self.roles.promoting() {
            self.out.push(Action::Notice(
                "demote: the promote in progress is cancelled".into(),
            ));
        }
        self.roles.transition = Transition::Demoting;
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

    pub(super) fn record_forced(&mut self, gen: u64) {
        if !self.meta.forced.contains(&gen) {
            self.meta.forced.push(gen);
        }
        if self.meta.forced.len() > crate::core::meta::MAX_FORCED {
            self.meta.forced.remove(0);
        }
    }

    pub(super) fn check_degrade(&mut self) {
        if self.meta.role != Role::Primary || self.roles.leaving_peer() {
            return;
        }
        let peer_gone = !self.session.is_up();
        let need =
            !self.host_of.is_empty() || !self.waiting.is_empty() || !self.host_flushes.is_empty();
        // The new generation starts after the durable ring head, so a crash
        // cannot leave the history pointing past the ring.
        let ring_durable = self.pipe.ring_durable >= self.log.head();
        // `peer_timeout_ms` after the last message from the peer, as the
        // config says: the link reset at that same moment (a silent peer) or
        // earlier (a closed connection), never one timeout later.
        if !peer_gone {
            self.roles.stale_wanted = None;
        }
        if peer_gone
            && need
            && ring_durable
            && self.now_ms - self.session.last_rx_ms >= self.cfg.peer_timeout_ms
        {
            // Durably bump the generation and record the backup as stale
            // before completing anything without ACK1.
            let gen = self.meta.generation() + 1;
            if !self.stale_gate_open(gen) {
                return;
            }
            self.meta.history.push(GenEntry {
                gen,
                first_seq: self.log.next_seq(),
                origin: self.meta.node_id,
            });
            self.meta.peer_stale_from = Some(self.pipe.ack1 + 1);
            self.out.push(Action::Notice(format!(
                "peer unreachable: degraded mode, generation {gen}, backup stale from seq {}",
                self.pipe.ack1 + 1
            )));
            let version = self.persist_meta();
            self.roles.degrade(version);
        }
    }

    /// Automatic failover: whether etcd holds the stale mark for entering
    /// degraded mode in generation `gen` (the backup lacks `ack1 + 1` on).
    /// Until it does, asks the agent for it, and fails the writes that
    /// waited `stale_gate_ms` (retryable: `Unavailable`).
    fn stale_gate_open(&mut self, gen: u64) -> bool {
        let Some(timeout) = self.cfg.stale_gate_ms else {
            return true;
        };
        let from = self.pipe.ack1 + 1;
        if self.roles.stale_recorded == Some((gen, from)) {
            self.roles.stale_wanted = None;
            return true;
        }
        match self.roles.stale_wanted {
            Some((g, f, since)) if g == gen && f == from => {
                if self.now_ms.saturating_sub(since) >= timeout {
                    self.out.push(Action::Notice(format!(
                        "the backup's stale mark (from seq {from}) could not be recorded in etcd \
                         within {timeout} ms: failing the waiting writes (retryable); none \
                         completes without the backup until it is"
                    )));
                    self.fail_host_requests(HostError::Unavailable);
                    self.roles.stale_wanted = Some((gen, from, self.now_ms));
                }
            }
            _ => {
                self.roles.stale_wanted = Some((gen, from, self.now_ms));
                self.out.push(Action::Notice(format!(
                    "peer unreachable: writes wait until the failover agent records in etcd \
                     that the backup is stale from seq {from} (generation {gen})"
                )));
                self.out.push(Action::RecordStale {
                    gen,
                    from_seq: from,
                });
            }
        }
        false
    }

    /// Sender: says `InSync` once per session when it no longer completes
    /// writes without the receiver. Receiver: current once that seq is durable.
    pub(super) fn track_current(&mut self) {
        if !self.session.is_active() {
            return;
        }
        if self.session.is_active_sender() {
            if !self.session.in_sync_sent
                && !self.roles.is_degraded()
                && self.resync_sender.is_none()
                && self.state_sent()
            {
                self.session.in_sync_sent = true;
                self.out.push(Action::Send(Msg::InSync(self.log.head())));
            }
            return;
        }
        if let Some(s) = self.session.in_sync_at {
            if !self.roles.current
                && self.meta.role == Role::Backup
                && self.resync_receiver.is_none()
                && self.session.pending.is_none()
                && !self.meta.fresh
                && !self.meta.resyncing
                && self.pipe.ring_durable >= s
                && self.state_adopted()
            {
                self.roles.current = true;
                self.out.push(Action::Notice(format!(
                    "caught up with the primary (seq {s}): this backup can be promoted"
                )));
            }
        }
    }

    pub(super) fn complete_role_changes(&mut self) {
        if let Transition::Promoting { forced } = self.roles.transition {
            if self.pipe.executed == self.log.head()
                && self.pipe.ring_durable >= self.log.head()
                && self.executing.is_empty()
                && self.exec_queue.is_empty()
            {
                self.promoted(forced);
            }
        }
        if self.roles.demoting() && self.host_of.is_empty() && self.executing.is_empty() {
            self.demoted();
        }
    }

    /// A promotion executed every held entry: primary in a new generation.
    pub(super) fn promoted(&mut self, forced: bool) {
        {
            self.roles.transition = Transition::Steady;
            self.roles.current = false;
            let gen = (self.meta.generation() + 1).max(std::mem::take(&mut self.roles.gen_floor));
            // A forced promote can take a node that adopted the authority's
            // history but never received its entries: generations that
            // start at or past our next seq describe writes this node does
            // not hold, and go (the peer's copy of them then diverges from
            // ours, so the handshake sees the fork).
            let next = self.log.next_seq();
            self.state_promoted(next);
            // Only a forced promote: a current node holds every entry its
            // generations had, and an empty one must stay so that the
            // peer's history remains a prefix of ours.
            while forced
                && self.meta.history.len() > 1
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
            if forced {
                self.record_forced(gen);
                self.out.push(Action::Notice(format!(
                    "promote --force: generation {gen} is recorded as forced; writes the old \
                     primary completed from seq {} on are lost when it rejoins",
                    self.log.next_seq()
                )));
            }
            self.meta.role = Role::Primary;
            self.meta.executed = self.pipe.executed;
            self.pipe.ack1 = self.log.head();
            self.pipe.exec_next = self.log.head() + 1;
            self.roles.version = self.meta_version + 1;
            if !self.session.is_active() && (self.cfg.stale_gate_ms.is_none() || forced) {
                // Serving without the peer from the start: the peer is stale
                // from here on, recorded with the same generation bump.
                // (With automatic failover the first write goes through
                // `check_degrade`, which has etcd record the mark first,
                // unless the operator forced this promotion.)
                self.meta.peer_stale_from = Some(self.log.next_seq());
                self.roles.mirroring = Mirroring::Degraded { sync_from: None };
            }
            self.persist_meta();
            self.out.push(Action::Notice(format!(
                "promoted: primary in generation {gen}"
            )));
            if !self.session.is_down() {
                self.reset_link("role change: new handshake".into());
            }
            self.update_path();
        }
    }

    /// A demotion finished its in-flight writes: backup.
    pub(super) fn demoted(&mut self) {
        {
            self.roles.became_backup();
            self.meta.role = Role::Backup;
            self.roles.version = self.meta_version + 1;
            self.meta.executed = self.pipe.executed;
            self.persist_meta();
            self.out.push(Action::Notice("demoted: now backup".into()));
            if !self.session.is_down() {
                self.reset_link("role change: new handshake".into());
            }
            self.update_path();
        }
    }
}
