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

use std::collections::BTreeSet;

use super::types::Seq;

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
