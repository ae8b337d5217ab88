//! Standalone mode: one node serving its volume with no peer, no ring and
//! no mirroring — the unmirrored baseline (`deltamirror serve --standalone`).
//!
//! Host I/O goes from the mailbox straight to the backend (io_uring in the
//! binary, any [`Backend`] in tests) on one pinned reactor thread, with the
//! same poll modes as a mirrored node. The writes bypass the ring, so the
//! peer can no longer be brought up to date by a replay: starting
//! standalone leaves a marker file in the data directory, and a mirrored
//! start refuses to run until the operator has reformatted one side (see
//! [`check_not_standalone`]).

use std::fs::File;
use std::os::unix::io::RawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use hdrhistogram::Histogram;
use storage::{AlignedBuf, Backend, BackendCompletion, BackendOp};
use volume::{Completion, IoError, PathState, VolumeOp};

use super::{
    poll_loop, register_pool, sleep_on, Command, HostOp, NodeOptions, Overflow, Polled, Shared,
};
use crate::status::{IoStats, Latency, NodeStatus};
use crate::sys::now_ms;

/// The marker a standalone start leaves in the data directory.
pub fn marker_path(data_dir: &Path) -> PathBuf {
    data_dir.join("STANDALONE")
}

/// Leaves the marker (durably) before any standalone write can happen.
pub(super) fn leave_marker(data_dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(data_dir)
        .map_err(|e| format!("cannot create node.data_dir {}: {e}", data_dir.display()))?;
    let p = marker_path(data_dir);
    let text = "This node's volume was written in standalone mode (no mirroring).\n\
                Its peer does not have those writes; see docs/operations.md.\n";
    let write = || -> std::io::Result<()> {
        std::fs::write(&p, text)?;
        File::open(&p)?.sync_all()?;
        File::open(data_dir)?.sync_all()
    };
    write().map_err(|e| format!("cannot write {}: {e}", p.display()))
}

/// A mirrored start refuses a volume that was served standalone: the peer
/// lacks those writes and no replay can bring them over.
pub fn check_not_standalone(data_dir: &Path) -> Result<(), String> {
    if marker_path(data_dir).exists() {
        return Err(format!(
            "{} was served in standalone mode, so the peer does not have its writes. \
             To keep this node's data: `deltamirror format --force` on this node (as primary) \
             and `deltamirror format --replace` on the peer, which then receives a full copy. \
             To drop them: `deltamirror format --replace` on this node. A format removes the \
             marker {}.",
            data_dir.display(),
            marker_path(data_dir).display()
        ));
    }
    Ok(())
}

struct Pending {
    done: Completion,
    start: Instant,
    /// The host's write buffer, handed back on completion.
    /// Payload bytes of a write (for the counters).
    bytes: u64,
    kind: Kind,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Read,
    Write,
    Other,
}

pub(super) struct Standalone<B: Backend> {
    opts: NodeOptions,
    shared: Arc<Shared>,
    backend: B,
    pending: Vec<Option<Pending>>,
    free: Vec<usize>,
    overflow: Overflow,
    comps: Vec<BackendCompletion>,
    write_hist: Histogram<u64>,
    read_hist: Histogram<u64>,
    disk_write_hist: Histogram<u64>,
    io: IoStats,
    start: Instant,
    last_status_ms: u64,
    /// (the pool is registered with the backend, registrations failed)
    pool_registered: (bool, u64),
}

impl<B: Backend> Standalone<B> {
    pub(super) fn new(opts: NodeOptions, shared: Arc<Shared>, mut backend: B) -> Self {
        // Writes go to the disk from the front-end's pool buffer, reads
        // fill one: fixed-buffer I/O once the pool is registered.
        let pool_registered = register_pool(&mut backend, &shared.pool);
        let hist = || Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
        Standalone {
            opts,
            shared,
            backend,
            pending: Vec::new(),
            free: Vec::new(),
            overflow: Overflow::default(),
            comps: Vec::new(),
            write_hist: hist(),
            read_hist: hist(),
            disk_write_hist: hist(),
            io: IoStats::default(),
            start: Instant::now(),
            last_status_ms: 0,
            pool_registered,
        }
    }

    pub(super) fn run(&mut self) {
        self.shared.path.set(PathState::Optimized);
        let (mode, spin_us) = (self.opts.poll_mode, self.opts.adaptive_spin_us);
        poll_loop(self, mode, spin_us);
        self.shared.path.set(PathState::Inaccessible);
        for i in 0..self.pending.len() {
            self.complete(i, Err(IoError::Unavailable));
        }
        while let Some(HostOp { done, .. }) = self.shared.mailbox.pop() {
            done(Err(IoError::Unavailable));
        }
    }
}

impl<B: Backend> Polled for Standalone<B> {
    fn shared(&self) -> &Shared {
        &self.shared
    }

    fn drained(&self) -> bool {
        self.backend.in_flight() == 0 && self.overflow.is_empty()
    }

    fn sleep(&mut self, extra: Option<RawFd>) {
        let mut fds = vec![(self.shared.wake.fd(), false)];
        fds.extend(extra.map(|fd| (fd, false)));
        let drain = [&self.shared.wake];
        sleep_on(&mut self.backend, &fds, &drain, 100);
    }

    fn iteration(&mut self) -> bool {
        let mut did = self.take_commands();
        did |= self.take_host_ops();
        did |= self.reap();
        self.overflow.retry(&mut self.backend);
        self.backend.flush_submissions();
        let now = now_ms(self.start);
        if now >= self.last_status_ms + 100 {
            self.last_status_ms = now;
            self.publish_status(now);
        }
        did
    }
}

impl<B: Backend> Standalone<B> {
    fn take_commands(&mut self) -> bool {
        let shared = self.shared.clone();
        shared.answer_commands(|cmd| match cmd {
            Command::ResetLatency => {
                for h in [
                    &mut self.write_hist,
                    &mut self.read_hist,
                    &mut self.disk_write_hist,
                ] {
                    h.reset();
                }
                self.last_status_ms = 0;
                Ok(())
            }
            Command::Promote { .. } | Command::Demote | Command::Failover(_) => {
                Err("this node runs standalone (no peer): promote and demote do not apply".into())
            }
            Command::Verify(_) => {
                Err("this node runs standalone (no peer): there is no replica to verify".into())
            }
        })
    }

    fn take_host_ops(&mut self) -> bool {
        let mut did = false;
        for _ in 0..256 {
            let Some(HostOp { op, done, start }) = self.shared.mailbox.pop() else {
                break;
            };
            did = true;
            let (kind, data, bop) = match op {
                VolumeOp::Read { offset, len } => (
                    Kind::Read,
                    0,
                    BackendOp::Read {
                        offset,
                        buf: super::reactor::read_buf(&self.shared.pool, len as usize),
                    },
                ),
                // The payload's buffer is the disk write's: no copy.
                VolumeOp::Write { offset, data, fua } => (
                    Kind::Write,
                    data.len() as u64,
                    BackendOp::Write {
                        offset,
                        buf: data,
                        fua,
                    },
                ),
                VolumeOp::WriteZeroes { offset, len } => {
                    (Kind::Other, 0, BackendOp::WriteZeroes { offset, len })
                }
                // Discard follows the mirrored node's rule (block devices
                // zero the range so reads stay defined).
                VolumeOp::Discard { offset, len } if !self.backend.discard_reads_zeroes() => {
                    (Kind::Other, 0, BackendOp::WriteZeroes { offset, len })
                }
                VolumeOp::Discard { offset, len } => {
                    (Kind::Other, 0, BackendOp::Discard { offset, len })
                }
                VolumeOp::Flush => {
                    self.io.flushes += 1;
                    (Kind::Other, 0, BackendOp::Flush)
                }
            };
            let p = Pending {
                done,
                start,
                bytes: data,
                kind,
            };
            let tag = match self.free.pop() {
                Some(t) => {
                    self.pending[t] = Some(p);
                    t
                }
                None => {
                    self.pending.push(Some(p));
                    self.pending.len() - 1
                }
            };
            self.overflow.submit(&mut self.backend, tag, bop);
        }
        did
    }

    fn reap(&mut self) -> bool {
        let mut comps = std::mem::take(&mut self.comps);
        comps.clear();
        let n = self.backend.reap(&mut comps);
        for c in comps.drain(..) {
            let tag = c.tag as usize;
            let r = match c.result {
                // A read hands the front-end the buffer the disk filled.
                Ok(_) => Ok(c.buf.unwrap_or_default()),
                Err(e) => Err(IoError::Io(e)),
            };
            self.complete(tag, r);
        }
        self.comps = comps;
        n > 0
    }

    fn complete(&mut self, tag: usize, r: Result<AlignedBuf, IoError>) {
        let Some(p) = self.pending.get_mut(tag).and_then(|s| s.take()) else {
            return;
        };
        self.free.push(tag);
        let us = (p.start.elapsed().as_micros() as u64).max(1);
        let r = match (r, p.kind) {
            (Ok(_), Kind::Write) => {
                self.io.writes += 1;
                self.io.write_bytes += p.bytes;
                let _ = self.write_hist.record(us);
                let _ = self.disk_write_hist.record(us);
                Ok(AlignedBuf::empty())
            }
            (Ok(d), Kind::Read) => {
                self.io.reads += 1;
                self.io.read_bytes += d.len() as u64;
                let _ = self.read_hist.record(us);
                Ok(d)
            }
            (Ok(_), Kind::Other) => Ok(AlignedBuf::empty()),
            (Err(e), _) => {
                self.io.errors += 1;
                Err(e)
            }
        };
        (p.done)(r);
    }

    fn publish_status(&mut self, now: u64) {
        let lat = |h: &Histogram<u64>| Latency {
            count: h.len(),
            p50_us: h.value_at_quantile(0.5) as f64,
            p99_us: h.value_at_quantile(0.99) as f64,
            p999_us: h.value_at_quantile(0.999) as f64,
        };
        let mut io = self.io.clone();
        io.write_latency = lat(&self.write_hist);
        io.read_latency = lat(&self.read_hist);
        io.disk_write_latency = lat(&self.disk_write_hist);
        let st = NodeStatus {
            pid: std::process::id(),
            node_id: self.opts.node_id,
            node_name: self.opts.node_name.clone(),
            role: "standalone".into(),
            peer_state: "none".into(),
            io,
            uptime_seconds: now as f64 / 1000.0,
            // The standalone node copies no payload: the front-end's
            // buffer is the disk write's.
            buffers: super::reactor::buffer_stats(
                &self.shared.pool,
                self.pool_registered,
                &self.backend,
                super::reactor::Copies::default(),
            ),
            disk_handover: crate::status::DiskHandOverStatus::of(&self.backend),
            ..NodeStatus::default()
        };
        *self.shared.status.lock().unwrap() = st;
    }
}
