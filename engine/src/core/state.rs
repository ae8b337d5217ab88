//! The replicated state blob: a small opaque record the front-ends keep
//! beside the blocks (the iSCSI receiver's persistent reservations), carried
//! as `ReqKind::State` REQs.
//!
//! A State REQ goes through the ring like a write: it gets a seq, is
//! ordered with the writes, covered by ACK1, replayed after an outage, and
//! completes to the host only when the primary has "executed" it and ACK1
//! covers it (I2). Executing it stores the blob in the node's metadata
//! (`Meta::state`, with the seq it came from) instead of writing the disk;
//! an entry replaces the blob only when its seq is higher, so executing
//! entries again after a restart never goes back. The entry is executed once
//! that metadata version is durable.
//!
//! Entries do not always reach the peer through the stream: the overflow
//! folds them into the dirty map, a resync jumps past trimmed entries, and a
//! receiver drops the entries past a fork. So the sender also sends its own
//! blob once per session (`Msg::State`), once it has executed everything
//! below the stream's start, and before `InSync`; the receiver adopts it when
//! its seq is higher than its own, and is *current* (promotable) only once
//! the adopted blob is durable. A receiver that drops entries past a fork
//! drops a blob that came from one of them in the same durable step.
//!
//! This module is part of `machine` (it sees the core's fields); the hooks
//! in `machine.rs` are one line each.

use super::*;

/// Per-session bookkeeping of the state blob.
#[derive(Debug, Default)]
pub(super) struct StateSync {
    /// Executing State entries: (seq, metadata version that holds the
    /// outcome). Executed once that version is durable.
    execs: Vec<(Seq, u64)>,
    /// Sender: the session's `Msg::State` is still to be sent, once
    /// everything below this seq (the stream's start) is executed.
    due: Option<Seq>,
    /// Receiver: the sender's `Msg::State` arrived in this session and is
    /// durable once this metadata version is.
    adopted: Option<u64>,
    /// Bumped whenever the blob changes (drivers publish it then).
    changes: u64,
}

impl<L: Log> Core<L> {
    /// A host update of the replicated state blob. Completes later with
    /// `Action::CompleteWrite { id }`, like a write.
    pub fn host_put_state(&mut self, id: u64, blob: &[u8]) {
        if blob.len() > MAX_STATE_BYTES {
            self.out.push(Action::CompleteWrite {
                id,
                result: Err(HostError::Unavailable),
            });
            return;
        }
        // FUA: with `ack1 = "received"` the backup acknowledges it only
        // once its ring holds it durably.
        self.host_write(
            id,
            ReqKind::State,
            0,
            0,
            true,
            volume::IoBuf::from_slice(blob).share(),
        );
    }

    /// The replicated state blob as executed here, and its seq.
    pub fn persistent_state(&self) -> (Seq, Option<&[u8]>) {
        (self.meta.state_seq, self.meta.state.as_deref())
    }

    /// A counter bumped at every change of the blob.
    pub fn state_changes(&self) -> u64 {
        self.st.changes
    }

    /// Executes State entry `seq`: the blob goes into the metadata.
    pub(super) fn execute_state(&mut self, seq: Seq) {
        if seq > self.meta.state_seq {
            let Some((_, blob)) = self.log.get(seq) else {
                return self.fail(format!("state entry {seq} is missing from the ring"));
            };
            self.meta.state = Some(blob.to_vec());
            self.meta.state_seq = seq;
            self.st.changes += 1;
        }
        // Even when a newer blob superseded it: that newer blob must be
        // durable before this entry counts as executed.
        let v = self.persist_meta();
        self.executing.push((Token::Entry(seq), 0, 0));
        self.st.execs.push((seq, v));
    }

    /// A metadata version became durable: State entries it holds are
    /// executed.
    pub(super) fn state_persisted(&mut self) {
        let durable = self.meta_durable;
        let done: Vec<Seq> = self
            .st
            .execs
            .iter()
            .filter(|&&(_, v)| v <= durable)
            .map(|&(s, _)| s)
            .collect();
        if done.is_empty() {
            return;
        }
        self.st.execs.retain(|&(_, v)| v > durable);
        for s in done {
            self.on_executed(Token::Entry(s), Ok(()));
        }
    }

    /// Receiver: the handshake with the authority `peer` drops whatever this
    /// node holds past the point where the histories fork; a blob that came
    /// from there goes too (the authority's follows in `Msg::State`). A blob
    /// adopted earlier from a seq this node's ring does not reach yet stays
    /// when the authority's history contains it. True when the metadata
    /// changed.
    pub(super) fn state_truncate(&mut self, peer: &Hello) -> bool {
        let k = self
            .meta
            .history
            .iter()
            .zip(&peer.history)
            .take_while(|(a, b)| a == b)
            .count();
        let fork = if k < self.meta.history.len() || self.meta.history.is_empty() {
            // Our history goes on where the authority's does not (or we
            // have none): only what both share is common.
            match (self.meta.history.get(k), peer.history.get(k)) {
                (Some(a), Some(b)) => a.first_seq.min(b.first_seq) - 1,
                (Some(a), None) => a.first_seq - 1,
                (None, Some(b)) => b.first_seq - 1,
                (None, None) => 0,
            }
        } else if let Some(b) = peer.history.get(k) {
            b.first_seq - 1
        } else {
            peer.head
        };
        if self.meta.state_seq > fork || (self.meta.history.is_empty() && self.meta.state.is_some())
        {
            self.meta.state_seq = 0;
            self.meta.state = None;
            self.st.changes += 1;
            return true;
        }
        false
    }

    /// A promotion starts a generation at `next`: a blob adopted from the
    /// peer with a seq at or past it stands for entries this node does not
    /// hold (a forced promote), and must not hide the new generation's own
    /// State entries.
    pub(super) fn state_promoted(&mut self, next: Seq) {
        if self.meta.state_seq >= next {
            self.meta.state_seq = next - 1;
        }
    }

    /// Sender: a new session streams from `end`.
    pub(super) fn state_session(&mut self, end: Seq) {
        self.st.due = Some(end);
        self.st.adopted = None;
    }

    pub(super) fn state_disconnected(&mut self) {
        self.st.due = None;
        self.st.adopted = None;
    }

    /// Sender: sends the session's `Msg::State` once everything below the
    /// stream's start (or the resync's end, which can move up) is executed.
    pub(super) fn send_state(&mut self) {
        if !self.session.is_active_sender() {
            return;
        }
        let Some(end) = self.st.due else { return };
        let end = self
            .resync_sender
            .as_ref()
            .map_or(end, |r| r.end_seq.max(end));
        if self.pipe.executed + 1 < end {
            return;
        }
        self.st.due = None;
        self.out.push(Action::Send(Msg::State {
            seq: self.meta.state_seq,
            blob: self.meta.state.clone(),
        }));
    }

    /// Sender: `InSync` waits for the session's `Msg::State`.
    pub(super) fn state_sent(&self) -> bool {
        self.st.due.is_none()
    }

    /// Receiver: the sender's blob arrived.
    pub(super) fn on_state_msg(&mut self, seq: Seq, blob: Option<Vec<u8>>) {
        if !self.session.is_active_receiver() {
            return self.reset_link("unexpected State".into());
        }
        let newer = seq > self.meta.state_seq || (self.meta.state.is_none() && blob.is_some());
        let v = if newer {
            self.meta.state_seq = seq;
            self.meta.state = blob;
            self.st.changes += 1;
            self.persist_meta()
        } else {
            self.meta_version
        };
        self.st.adopted = Some(v);
    }

    /// Receiver: holds the sender's blob durably (a condition of *current*).
    pub(super) fn state_adopted(&self) -> bool {
        self.st.adopted.is_some_and(|v| self.meta_durable >= v)
    }
}
