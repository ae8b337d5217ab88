//! The write pipeline's cursors: how far the ring is durable, acknowledged
//! by the peer, executed here, scheduled and streamed, and the ring flushes
//! in flight.
//!
//! ```text
//!   seq:  first ... ack2/ack3 ... executed < exec_next ... ack1 ... ring_durable ... head
//!                                                      send_next (sender) ≤ head + 1
//! ```
//!
//! (ACK1 may run ahead of this node's own durable ring: the peer's copy
//! and ours are made durable independently.) Cursors only move forward,
//! except where the ring itself is cut back (`truncated`, on a receiver
//! dropping entries past a fork) or jumps (`reset`, at the end of a resync).
//!
//! The core's steps that move them live here too: assigning seqs to host
//! writes, flushing the ring, appending what a receiver got, streaming,
//! scheduling executions (I1), completing them (I2), acknowledging,
//! trimming (I3) and host flushes.

use std::collections::BTreeSet;
use volume::SharedBuf;

use super::*;

/// Ring flushes that may overlap.
const MAX_RING_FLUSHES: u8 = 2;

pub(super) struct Pipeline {
    /// Every ring entry through this seq is durable.
    pub ring_durable: Seq,
    /// Ring flushes in flight (at most `MAX_RING_FLUSHES`) and the head the
    /// newest one covers: a second flush overlaps the first so appends made
    /// meanwhile do not wait for two full fdatasyncs.
    flushes_inflight: u8,
    flush_issued: Seq,
    /// Sender: the peer holds (durably, or received) every entry through
    /// this seq. Receiver: what the authority held at the handshake.
    pub ack1: Seq,
    /// Sender: the peer executed every entry through this seq.
    pub ack2: Seq,
    /// Receiver: the sender executed every entry through this seq.
    pub ack3: Seq,
    /// Every entry through this seq has executed here.
    pub executed: Seq,
    /// Executed entries above `executed` (a gap below them still runs).
    done_out_of_order: BTreeSet<Seq>,
    /// The next entry to put into the execution queue.
    pub exec_next: Seq,
    /// Sender: the next entry to stream.
    pub send_next: Seq,
    /// Receiver: the ACK1/ACK2 last sent; sender: the ACK3 last sent.
    pub sent_ack1: Seq,
    pub sent_ack2: Seq,
    pub sent_ack3: Seq,
    /// Receiver: the highest FUA entry appended (with `ack1 = "received"`
    /// it is acknowledged only once durable).
    pub fua_through: Seq,
}

impl Pipeline {
    /// The cursors of a node whose ring holds `first..=head`, with entries
    /// through `executed` executed.
    pub fn new(first: Seq, head: Seq, executed: Seq) -> Self {
        Pipeline {
            ring_durable: head,
            flushes_inflight: 0,
            flush_issued: head,
            ack1: executed,
            ack2: first - 1,
            ack3: first - 1,
            executed,
            done_out_of_order: BTreeSet::new(),
            exec_next: executed + 1,
            send_next: head + 1,
            sent_ack1: 0,
            sent_ack2: 0,
            sent_ack3: 0,
            fua_through: 0,
        }
    }

    /// Whether to flush the ring now (the caller emits `FlushRing`): when
    /// something is not durable and not covered by the flush in flight, or
    /// when the ring asks for one with none in flight.
    pub fn ring_flush_due(&mut self, head: Seq, ring_wants_flush: bool) -> bool {
        let more =
            self.ring_durable < head && (self.flushes_inflight == 0 || head > self.flush_issued);
        if self.flushes_inflight < MAX_RING_FLUSHES
            && (more || (self.flushes_inflight == 0 && ring_wants_flush))
        {
            self.flushes_inflight += 1;
            self.flush_issued = head;
            return true;
        }
        false
    }

    /// A ring flush finished: entries through `through` are durable, as far
    /// as the ring still holds them (a truncation may have come meanwhile).
    /// A ring flush failed (or completed after one failed): it makes
    /// nothing durable; the core refuses further work.
    pub fn ring_flush_failed(&mut self) {
        self.flushes_inflight = self.flushes_inflight.saturating_sub(1);
    }

    pub fn ring_flushed(&mut self, through: Seq, head: Seq) {
        self.flushes_inflight = self.flushes_inflight.saturating_sub(1);
        self.ring_durable = self.ring_durable.max(through.min(head));
    }

    /// Sender: ACK1 `s` arrived. True when it moved the watermark.
    pub fn ack1_received(&mut self, s: Seq) -> bool {
        if s > self.ack1 {
            self.ack1 = s;
            return true;
        }
        false
    }

    /// Entry `seq` executed here; `executed` advances over every gap closed.
    pub fn entry_executed(&mut self, seq: Seq) {
        if seq > self.executed {
            self.done_out_of_order.insert(seq);
            while self.done_out_of_order.remove(&(self.executed + 1)) {
                self.executed += 1;
            }
        }
    }

    /// The ring was cut back to `head` (a receiver dropping entries past a
    /// fork).
    pub fn truncated(&mut self, head: Seq) {
        self.ring_durable = self.ring_durable.min(head);
        self.exec_next = self.exec_next.min(head + 1);
        self.executed = self.executed.min(head);
        self.done_out_of_order.retain(|&s| s <= head);
    }

    /// The ring now continues at `next` (a resync wrote everything below it).
    pub fn reset(&mut self, next: Seq) {
        self.ring_durable = next - 1;
        self.executed = next - 1;
        self.exec_next = next;
        self.done_out_of_order.clear();
    }

    /// Asserts what no sequence of events may produce, for a ring whose
    /// head is `head`.
    pub fn check(&self, head: Seq) {
        assert!(
            self.ring_durable <= head,
            "pipeline: ring durable through {} past the head {head}",
            self.ring_durable
        );
        assert!(
            self.done_out_of_order
                .first()
                .is_none_or(|&s| s > self.executed + 1),
            "pipeline: an executed entry next to the watermark {}",
            self.executed
        );
    }
}

impl<L: Log> Core<L> {
    pub(super) fn assign(
        &mut self,
        id: u64,
        kind: ReqKind,
        offset: u64,
        len: u64,
        fua: bool,
        payload: SharedBuf,
    ) {
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

    pub(super) fn admit_waiting(&mut self) {
        if self.replay_starved() {
            return;
        }
        while let Some(w) = self.waiting.front() {
            if self.log.fits(w.payload.len()) {
                let w = self.waiting.pop_front().unwrap();
                self.assign(w.id, w.kind, w.offset, w.len, w.fua, w.payload);
                continue;
            }
            // Overflow: fold executed entries into the dirty map, only while
            // the peer is away (when it is connected, writes wait for ACKs).
            if self.roles.is_degraded() && !self.session.is_active() && self.fold_pending.is_none()
            {
                let first = self.log.first_seq();
                let n = (self.log.len() / 4).max(1);
                let through = (first + n - 1).min(self.pipe.executed);
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

    /// A new ring flush when something is not durable and not already
    /// covered by the flush in flight.
    pub(super) fn flush_ring(&mut self) {
        if self
            .pipe
            .ring_flush_due(self.log.head(), self.log.wants_sync())
        {
            self.out.push(Action::FlushRing);
        }
    }

    /// Receiver: append what arrived, in order, as the ring has room.
    pub(super) fn drain_backlog(&mut self) {
        if self.resync_receiver.is_some() {
            return;
        }
        while let Some((hdr, payload)) = self.session.rx_backlog.front() {
            let next = self.log.next_seq();
            if hdr.seq < next {
                self.session.rx_backlog.pop_front();
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
            let (hdr, payload) = self.session.rx_backlog.pop_front().unwrap();
            assert!(self.log.append(&hdr, payload));
            if hdr.fua {
                self.pipe.fua_through = hdr.seq;
            }
        }
    }

    pub(super) fn stream(&mut self) {
        if !self.session.is_active_sender() {
            return;
        }
        if self.resync_sender.as_ref().is_some_and(|r| !r.ended) {
            return;
        }
        let limit = self.pipe.ack1 + self.cfg.max_unacked_entries;
        while self.pipe.send_next <= self.log.head() && self.pipe.send_next <= limit {
            let replaying = self
                .replay
                .as_ref()
                .is_some_and(|p| self.pipe.send_next <= p.last_seq);
            if replaying {
                let bytes = self.log.get(self.pipe.send_next).map_or(0, |(h, _)| {
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
            self.out.push(Action::SendEntry(self.pipe.send_next));
            self.stats.entries_sent += 1;
            self.pipe.send_next += 1;
        }
    }

    pub(super) fn exec_limit(&self) -> Seq {
        let head = match self.session.pending_truncate() {
            Some(t) => self.log.head().min(t),
            None => self.log.head(),
        };
        // Nothing reaches a disk before its ring entry is durable: an entry
        // a crash drops from the ring must not survive on the disk, or no
        // handshake could know to rewrite it.
        if self.meta.role == Role::Backup || self.roles.promoting() {
            return head.min(self.pipe.ring_durable);
        }
        let mut limit = self.pipe.ack1.min(self.pipe.ring_durable);
        if let Some(unacked) = self.roles.mirroring.unacked_through() {
            limit = limit.max(unacked.min(self.pipe.ring_durable));
        }
        limit.min(head)
    }

    /// A verify read goes into the queue right after its ring entry, so it
    /// sees every entry up to it and none after it: queues every verify
    /// whose entry is already scheduled.
    fn queue_due_verifies(&mut self) {
        while let Some(q) = self.verify_queued.front().copied() {
            if q.after >= self.pipe.exec_next {
                break;
            }
            self.verify_queued.pop_front();
            self.exec_queue
                .push_back(ExecItem::Verify(q.token, q.offset, q.len));
        }
    }

    pub(super) fn schedule_executions(&mut self) {
        let limit = self.exec_limit();
        self.queue_due_verifies();
        while self.pipe.exec_next <= limit {
            if let Some((h, _)) = self.log.get(self.pipe.exec_next) {
                self.exec_queue.push_back(if h.kind == ReqKind::State {
                    ExecItem::State(h.seq)
                } else {
                    ExecItem::Entry(h.seq, h.offset, h.len)
                });
            }
            self.pipe.exec_next += 1;
            self.queue_due_verifies();
        }
        let extents_gate = self.resync_receiver.as_ref().map(|r| r.meta_version);
        let mut i = 0;
        let mut scanned = 0;
        while i < self.exec_queue.len()
            && self.executing.len() < self.cfg.max_executing
            && scanned < 256
        {
            scanned += 1;
            let item = self.exec_queue[i];
            let (token, off, len) = match item {
                ExecItem::Entry(seq, o, l) => (Token::Entry(seq), o, l),
                ExecItem::Verify(t, o, l) => (t, o, l),
                ExecItem::State(seq) => (Token::Entry(seq), 0, 0),
                ExecItem::Extent(t, o, l) => {
                    // Extents run after every ring entry held before them,
                    // and only once the "resyncing" state is durable.
                    if self.pipe.executed < self.log.head()
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
                if self.meta.role == Role::Primary && !self.roles.promoting() {
                    // I1: the primary never executes a REQ before ACK1 covers
                    // it, except in degraded mode.
                    assert!(
                        s <= self.pipe.ack1 || self.roles.mirroring.executes_unacked(s),
                        "I1: executing seq {s} beyond ACK1 {} outside degraded mode",
                        self.pipe.ack1
                    );
                    assert!(
                        s <= self.pipe.ring_durable,
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

    pub(super) fn on_executed(&mut self, token: Token, result: Result<(), i32>) {
        let Some(i) = self.executing.iter().position(|&(t, _, _)| t == token) else {
            return;
        };
        self.executing.swap_remove(i);
        let seq = match token {
            Token::Entry(seq) => seq,
            Token::Extent(_) => {
                self.extents.remove(&token);
                if let Err(e) = result {
                    self.fail(format!(
                        "disk write error {e} while applying a resync extent"
                    ));
                }
                return;
            }
            // Reads and flushes complete through their own events.
            Token::Verify(_) | Token::Flush(_) => return,
        };
        if let Err(e) = result {
            if let Some(id) = self.host_of.remove(&seq) {
                self.out.push(Action::CompleteWrite {
                    id,
                    result: Err(HostError::Io(e)),
                });
            }
            return self.fail(format!("disk write error {e} executing seq {seq}"));
        }
        self.pipe.entry_executed(seq);
        self.log.release_through(self.pipe.executed);
        if let Some(id) = self.host_of.remove(&seq) {
            // I2: durable in the ring, executed, and covered by ACK1 (or
            // degraded with the peer durably recorded as stale).
            assert!(
                seq <= self.pipe.ring_durable,
                "I2: completing seq {seq} not durable in the ring"
            );
            assert!(
                seq <= self.pipe.ack1
                    || (self.roles.mirroring.executes_unacked(seq)
                        && self.meta.peer_stale_from.is_some()),
                "I2: completing seq {seq} without ACK1 ({}) outside degraded mode",
                self.pipe.ack1
            );
            self.out.push(Action::CompleteWrite { id, result: Ok(()) });
        }
    }

    pub(super) fn send_acks(&mut self) {
        if !self.session.is_active() {
            return;
        }
        if self.session.is_active_sender() {
            if self.pipe.executed > self.pipe.sent_ack3 && self.cfg.confirm == ConfirmMode::Ack {
                if !self.cfg.coalesce_acks {
                    for s in self.pipe.sent_ack3 + 1..self.pipe.executed {
                        self.out.push(Action::Send(Msg::Ack3(s)));
                    }
                }
                self.pipe.sent_ack3 = self.pipe.executed;
                self.out.push(Action::Send(Msg::Ack3(self.pipe.executed)));
            }
            return;
        }
        if self.resync_receiver.is_some() {
            return;
        }
        // ACK1 covers what is durable in the ring (persisted mode), or
        // everything received (received mode) unless a FUA entry still
        // waits for the ring to be durable.
        let a1 = if self.cfg.ack1_persisted || self.pipe.ring_durable < self.pipe.fua_through {
            self.pipe.ring_durable
        } else {
            self.log.head()
        }
        .min(self.log.head());
        if a1 > self.pipe.sent_ack1 {
            // Uncoalesced (a measurement setting): one message per REQ.
            if !self.cfg.coalesce_acks {
                for s in self.pipe.sent_ack1 + 1..a1 {
                    self.out.push(Action::Send(Msg::Ack1(s)));
                }
            }
            self.pipe.sent_ack1 = a1;
            self.note_ack1(a1);
            self.out.push(Action::Send(Msg::Ack1(a1)));
        }
        if self.cfg.confirm == ConfirmMode::Ack
            && self.pipe.executed > self.pipe.sent_ack2
            && self.pipe.executed <= self.log.head()
        {
            if !self.cfg.coalesce_acks {
                for s in self.pipe.sent_ack2 + 1..self.pipe.executed {
                    self.out.push(Action::Send(Msg::Ack2(s)));
                }
            }
            self.pipe.sent_ack2 = self.pipe.executed;
            self.out.push(Action::Send(Msg::Ack2(self.pipe.executed)));
        }
    }

    /// Starts the timeout confirm rule's clock for ACK1 through `s` (sent
    /// or received). Only `ConfirmMode::Timeout` reads and drains these
    /// times (`trim`); under `ConfirmMode::Ack` they are not kept, since
    /// nothing would ever drop them: one entry per ACK1 for the whole
    /// session, the steady heap rise of the 600 s soak.
    pub(super) fn note_ack1(&mut self, s: Seq) {
        if matches!(self.cfg.confirm, ConfirmMode::Timeout { .. }) {
            self.ack_times.push_back((s, self.now_ms));
        }
    }

    pub(super) fn trim(&mut self) {
        let peer_done = match self.cfg.confirm {
            ConfirmMode::Ack => {
                if self.session.is_sender() {
                    self.pipe.ack2
                } else {
                    self.pipe.ack3
                }
            }
            ConfirmMode::Timeout { period_ms } => {
                // Dropped once `period_ms` passed since ACK1 while heartbeats
                // showed the same peer alive the whole time: a message from
                // it arrived after the period, with no heartbeat missed
                // since ACK1 (`alive_since_ms`).
                let mut through = 0;
                if self.session.is_active() {
                    // An ACK1 from before the last incident counts from the
                    // incident: the full period must pass again without one.
                    while let Some(&(s, t)) = self.ack_times.front() {
                        if t.max(self.session.alive_since_ms) + period_ms <= self.session.last_rx_ms
                        {
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
        let through = peer_done.min(self.pipe.executed);
        if through >= self.log.first_seq() && self.fold_pending.is_none() {
            // I3: only what the peer is known to have executed (and this
            // node executed too) leaves the queue.
            assert!(
                through <= self.pipe.executed && through < self.log.next_seq(),
                "I3: trimming through seq {through} past the executed {}",
                self.pipe.executed
            );
            if self.cfg.confirm == ConfirmMode::Ack {
                assert!(
                    through <= self.pipe.ack2.max(self.pipe.ack3),
                    "I3: trimming through seq {through} the peer did not confirm executing \
                     (ACK2 {}, ACK3 {})",
                    self.pipe.ack2,
                    self.pipe.ack3
                );
            }
            self.log.trim_through(through);
        }
        if self.meta.role == Role::Primary
            && self.roles.is_degraded()
            && self.session.is_active()
            && self.resync_sender.is_none()
        {
            // Caught up with the live stream: back to synchronous mirroring,
            // from the next seq on.
            if self.roles.mirroring == (Mirroring::Degraded { sync_from: None })
                && self.pipe.ack1 + self.cfg.max_unacked_entries / 2 >= self.log.head()
            {
                self.roles.sync_from(self.log.next_seq());
            }
            if let Mirroring::Degraded { sync_from: Some(n) } = self.roles.mirroring {
                if self.pipe.ack1 + 1 >= n {
                    self.roles.caught_up();
                    self.meta.peer_stale_from = None;
                    self.persist_meta();
                    self.out.push(Action::Notice(
                        "backup caught up: synchronous mirroring again".into(),
                    ));
                }
            }
        }
    }

    pub(super) fn flushes(&mut self) {
        // Backup side: flush once executed through the requested seq.
        for i in 0..self.peer_flushes.len() {
            if self.peer_flushes[i].token.is_none()
                && self.pipe.executed >= self.peer_flushes[i].through.min(self.log.head())
            {
                let t = self.token();
                self.peer_flushes[i].token = Some(t);
                self.out.push(Action::FlushDisk {
                    token: Token::Flush(t),
                });
            }
        }
        let degraded_ok = self.roles.is_degraded() && self.meta_durable == self.meta_version;
        if self.session.is_active_sender() && self.resync_sender.is_none() {
            let head = self.log.head();
            for f in self
                .host_flushes
                .iter_mut()
                .filter(|f| !f.peer_done && f.session != self.session.number)
            {
                f.session = self.session.number;
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
}
