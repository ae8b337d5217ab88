//! Where a mirrored write's time goes: the stages of one sampled write at a
//! time (status `stages`, [`WriteStages`]). A new sample begins once the
//! last one finished, so every write is sampled at queue depth 1 and a
//! fraction of them at depth, for a clock read per stage of the sample.

use super::*;
use crate::status::WriteStages;

/// One sampled write: its seq, when its clock started and which stages it
/// has reached.
struct Sample {
    seq: Seq,
    start: Instant,
    ring: bool,
    ack1: bool,
}

/// A sample older than this is dropped when a new one could begin (its
/// write was refused, or the node changed role under it).
const STALE: Duration = Duration::from_secs(10);

pub(in crate::node) struct Stages {
    req_sent: Histogram<u64>,
    ring_durable: Histogram<u64>,
    ack1: Histogram<u64>,
    execute: Histogram<u64>,
    executed: Histogram<u64>,
    /// The primary's sample: from the front-end's receipt of a host write.
    primary: Option<Sample>,
    /// The backup's sample: from the REQ's arrival.
    backup: Option<Sample>,
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

fn record(h: &mut Histogram<u64>, start: Instant) {
    let _ = h.record((start.elapsed().as_micros() as u64).max(1));
}

/// Whether a new sample may replace `s`.
fn free(s: &Option<Sample>) -> bool {
    s.as_ref().is_none_or(|s| s.start.elapsed() > STALE)
}

impl Stages {
    pub(in crate::node) fn new() -> Self {
        Stages {
            req_sent: hist(),
            ring_durable: hist(),
            ack1: hist(),
            execute: hist(),
            executed: hist(),
            primary: None,
            backup: None,
        }
    }

    /// Primary: the REQ of `seq`, a host write the front-end received at
    /// `start`, was handed to the link.
    pub(in crate::node) fn req_sent(&mut self, seq: Seq, start: Instant) {
        if free(&self.primary) {
            record(&mut self.req_sent, start);
            self.primary = Some(Sample {
                seq,
                start,
                ring: false,
                ack1: false,
            });
        }
    }

    /// Backup: the REQ of `seq` arrived.
    pub(in crate::node) fn req_received(&mut self, seq: Seq) {
        if free(&self.backup) {
            self.backup = Some(Sample {
                seq,
                start: Instant::now(),
                ring: false,
                ack1: false,
            });
        }
    }

    /// Both roles: the ring is durable through `through`.
    pub(in crate::node) fn ring_durable(&mut self, through: Seq) {
        for s in [&mut self.primary, &mut self.backup].into_iter().flatten() {
            if !s.ring && s.seq <= through {
                s.ring = true;
                record(&mut self.ring_durable, s.start);
            }
        }
        self.backup_done();
    }

    /// Primary: ACK1 now covers `acked` (cheap to call on every pass).
    pub(in crate::node) fn ack1_received(&mut self, acked: Seq) {
        if let Some(s) = self.primary.as_mut().filter(|s| !s.ack1 && s.seq <= acked) {
            s.ack1 = true;
            record(&mut self.ack1, s.start);
        }
    }

    /// Backup: an ACK1 covering `acked` was handed to the link.
    pub(in crate::node) fn ack1_sent(&mut self, acked: Seq) {
        if let Some(s) = self.backup.as_mut().filter(|s| !s.ack1 && s.seq <= acked) {
            s.ack1 = true;
            record(&mut self.ack1, s.start);
        }
        self.backup_done();
    }

    fn backup_done(&mut self) {
        if self.backup.as_ref().is_some_and(|s| s.ring && s.ack1) {
            self.backup = None;
        }
    }

    /// Primary: the disk write of `seq` was issued.
    pub(in crate::node) fn execute(&mut self, seq: Seq) {
        if let Some(s) = self.primary.as_ref().filter(|s| s.seq == seq) {
            record(&mut self.execute, s.start);
        }
    }

    /// Primary: the disk write of `seq` finished; the sample ends.
    pub(in crate::node) fn executed(&mut self, seq: Seq) {
        if let Some(s) = self.primary.take_if(|s| s.seq == seq) {
            record(&mut self.executed, s.start);
        }
    }

    /// The link changed: samples waiting for the peer would never finish.
    pub(in crate::node) fn drop_samples(&mut self) {
        self.primary = None;
        self.backup = None;
    }

    pub(in crate::node) fn reset(&mut self) {
        for h in [
            &mut self.req_sent,
            &mut self.ring_durable,
            &mut self.ack1,
            &mut self.execute,
            &mut self.executed,
        ] {
            h.reset();
        }
        self.drop_samples();
    }

    pub(in crate::node) fn report(&self, lat: impl Fn(&Histogram<u64>) -> Latency) -> WriteStages {
        WriteStages {
            req_sent: lat(&self.req_sent),
            ring_durable: lat(&self.ring_durable),
            ack1: lat(&self.ack1),
            execute: lat(&self.execute),
            executed: lat(&self.executed),
        }
    }
}
