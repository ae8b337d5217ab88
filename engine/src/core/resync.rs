//! Replay and resync: what a sender sends a receiver that misses entries
//! after an outage.
//!
//! A *replay* streams ring entries from where the receiver's ring ends. A
//! *resync* first sends the current data of every extent in the dirty map
//! (entries folded out of a full ring, rollback extents past a fork, or the
//! whole volume for a full remirror), then the ring continues at the seq
//! `ResyncEnd` names:
//!
//! ```text
//!   sender:   ResyncBegin ─► Extent* (reads of the dirty chunks) ─► ResyncEnd{next_seq}
//!   receiver: resyncing (durable) ─► executes its ring, then the extents ─► flush
//!             ─► ring reset to next_seq, consistent (durable) ─► ResyncDone
//!   sender:   dirty map cleared; entries stream from next_seq
//! ```
//!
//! The replay floor and ceiling (`min/max_replay_bytes_per_sec`) pace both.

use super::*;

/// Sender side of a dirty-map resync / full remirror.
pub(super) struct ResyncSender {
    /// Metadata version holding the dirty map this resync sends: no
    /// extent is read before it is durable.
    pub meta_gate: u64,
    pub next_chunk: u64,
    pub reads_inflight: usize,
    pub end_seq: Seq,
    pub ended: bool,
}

/// Receiver side of a resync.
pub(super) struct ResyncReceiver {
    pub meta_version: u64,
    pub end: Option<Seq>,
    pub full: bool,
    /// The disk flush that makes the resynced data durable before the node
    /// records its disk consistent: `Some(token)` while in flight.
    pub flush_token: Option<u64>,
    pub flushed: bool,
    /// From `ResyncEnd`: the extents hold the sender's disk as of this seq.
    pub consistent_at: Seq,
    /// Everything is applied and flushed, and the metadata version
    /// recording the disk consistent is `meta_version`: `ResyncDone` goes
    /// once it is durable.
    pub consistent_recorded: bool,
}

#[derive(Clone, Debug, Default)]
pub struct ReplayProgress {
    pub start_ms: u64,
    pub end_ms: u64,
    pub entries: u64,
    pub bytes: u64,
    pub extents: u64,
    pub last_seq: Seq,
    pub first_seq: Seq,
    pub full: bool,
    pub done: bool,
}

impl<L: Log> Core<L> {
    /// Sender: a dirty extent was read; it goes to the receiver.
    pub(super) fn on_extent_read(&mut self, offset: u64, result: Result<Vec<u8>, i32>) {
        match result {
            Ok(data) => {
                if let Some(r) = self.resync_sender.as_mut() {
                    r.reads_inflight -= 1;
                }
                if let Some(p) = self.replay.as_mut() {
                    p.extents += 1;
                    p.bytes += data.len() as u64;
                }
                self.stats.resync_extents += 1;
                self.stats.replayed_bytes += data.len() as u64;
                if self.session.is_active() {
                    self.out.push(Action::Send(Msg::Extent { offset, data }));
                }
            }
            Err(e) => self.fail(format!(
                "disk read error {e} at offset {offset} during resync"
            )),
        }
    }

    /// Receiver: a resync begins; the node records itself resyncing.
    pub(super) fn on_resync_begin(&mut self, full: bool) {
        if !self.session.is_active_receiver() {
            return self.reset_link("unexpected ResyncBegin".into());
        }
        if !self.meta.fresh {
            self.meta.resyncing = true;
        }
        let v = self.persist_meta();
        self.resync_receiver = Some(ResyncReceiver {
            meta_version: v,
            end: None,
            full,
            flush_token: None,
            flushed: false,
            consistent_at: 0,
            consistent_recorded: false,
        });
    }

    /// Receiver: one extent's current data, written after every ring entry
    /// held before it.
    pub(super) fn on_extent(&mut self, offset: u64, data: Vec<u8>) {
        if self
            .resync_receiver
            .as_ref()
            .is_none_or(|r| r.end.is_some())
            || offset
                .checked_add(data.len() as u64)
                .is_none_or(|e| e > self.cfg.volume_bytes)
        {
            return self.reset_link("unexpected or out-of-range Extent".into());
        }
        let token = Token::Extent(self.token());
        let len = data.len() as u64;
        self.extents.insert(token, (offset, data));
        self.exec_queue
            .push_back(ExecItem::Extent(token, offset, len));
    }

    /// Receiver: every extent was sent; the ring continues at `next_seq`.
    pub(super) fn on_resync_end(&mut self, next_seq: Seq, consistent_at: Seq) {
        match self.resync_receiver.as_mut() {
            Some(r) if r.end.is_none() && next_seq >= self.log.next_seq() => {
                r.end = Some(next_seq);
                r.consistent_at = consistent_at;
            }
            _ => self.reset_link("unexpected ResyncEnd".into()),
        }
    }

    /// Sender: the receiver applied the resync durably; the dirty map goes.
    pub(super) fn on_resync_done(&mut self, next_seq: Seq) {
        if let Some(r) = &self.resync_sender {
            if r.ended && next_seq == r.end_seq {
                self.resync_sender = None;
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

    /// The replay floor: true while a replay that has run for a second moved
    /// fewer than `min_replay_bytes_per_sec` over the last second. New host
    /// writes then wait (as if the ring were full) so the replay catches up.
    pub(super) fn replay_starved(&self) -> bool {
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

    pub(super) fn sample_replay_rate(&mut self) {
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

    pub(super) fn resync_send(&mut self) {
        if !self.session.is_active() {
            return;
        }
        let Some(r) = self.resync_sender.as_mut() else {
            return;
        };
        if r.ended || self.meta_durable < r.meta_gate {
            return;
        }
        // Extent data must include every entry below the stream start.
        if self.pipe.executed + 1 < r.end_seq {
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
                    let token = Token::Extent(self.next_token);
                    self.out.push(Action::ReadExtent { token, offset, len });
                }
                None => {
                    if r.reads_inflight == 0 && self.fold_pending.is_none() {
                        // Entries folded meanwhile are in the dirty map just sent.
                        r.end_seq = r.end_seq.max(self.log.first_seq());
                        self.pipe.send_next = r.end_seq;
                        r.ended = true;
                        self.out.push(Action::Send(Msg::ResyncEnd {
                            next_seq: r.end_seq,
                            consistent_at: self.pipe.executed,
                        }));
                    }
                    return;
                }
            }
        }
    }

    pub(super) fn resync_receive(&mut self) {
        let Some(r) = self.resync_receiver.as_ref() else {
            return;
        };
        let Some(end) = r.end else { return };
        if !self.exec_queue.is_empty()
            || !self.executing.is_empty()
            || self.pipe.executed < self.log.head()
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
                self.resync_receiver.as_mut().unwrap().flush_token = Some(token);
                self.out.push(Action::FlushDisk {
                    token: Token::Flush(token),
                });
            }
            return;
        }
        if !r.consistent_recorded {
            // Everything applied and flushed: continue the ring at `end` and
            // record the disk consistent again, durably, before telling the
            // sender.
            if end > self.log.next_seq() {
                self.log.reset(end);
                self.pipe.reset(end);
            }
            self.meta.executed = self.pipe.executed;
            self.meta.resyncing = false;
            if r.consistent_at > self.pipe.executed {
                self.meta.inconsistent_until = r.consistent_at;
            }
            self.meta.dirty.clear();
            self.meta.fold_base = 0;
            if self.meta.fresh || r.full {
                if let Some(h) = &self.session.peer {
                    self.meta.history = h.history.clone();
                }
                if self.meta.fresh {
                    self.meta.remirrors += 1;
                }
                self.meta.fresh = false;
            }
            let v = self.persist_meta();
            let r = self.resync_receiver.as_mut().unwrap();
            r.meta_version = v;
            r.consistent_recorded = true;
            return;
        }
        if self.meta_durable >= r.meta_version {
            self.out
                .push(Action::Send(Msg::ResyncDone { next_seq: end }));
            self.resync_receiver = None;
            self.out
                .push(Action::Notice("resync applied; disk consistent".into()));
            self.drain_backlog();
        }
    }

    pub(super) fn update_replay(&mut self) {
        let done = match &self.replay {
            Some(p) => {
                self.resync_sender.is_none()
                    && self.pipe.ack1 >= p.last_seq
                    && self.session.is_active()
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
