//! The mirror reactor: one pinned thread that drives the core with real
//! I/O (its backend, io_uring in production; the ring; the replication
//! socket).

use super::*;

mod link_io;
mod stages;

pub(super) use stages::Stages;

/// Backend operations the backend's queue could not take yet: resubmitted
/// in order, and new operations queue behind them so none overtakes another.
#[derive(Default)]
pub(super) struct Overflow(VecDeque<(usize, BackendOp)>);

impl Overflow {
    pub(super) fn submit(&mut self, backend: &mut impl Backend, tag: usize, op: BackendOp) {
        if !self.0.is_empty() {
            self.0.push_back((tag, op));
        } else if let Err(op) = backend.submit(tag as u64, op) {
            self.0.push_back((tag, op));
        }
    }

    pub(super) fn retry(&mut self, backend: &mut impl Backend) {
        while let Some((tag, op)) = self.0.pop_front() {
            if let Err(op) = backend.submit(tag as u64, op) {
                self.0.push_front((tag, op));
                break;
            }
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

pub(super) enum Inflight {
    Exec(Seq),
    ExtentWrite(Token),
    ExtentRead {
        token: Token,
        offset: u64,
    },
    Flush(Token),
    /// One durable write of ring batch number `u64` ([`RingIo`]).
    RingWrite(u64),
    HostRead(usize),
}

/// The ring batches in flight (at most two; see [`RingFlushIo`]), oldest
/// first, and the `FlushRing` requests waiting for a batch.
#[derive(Default)]
pub(super) struct RingIo {
    batches: VecDeque<RingBatch>,
    next_id: u64,
    /// `FlushRing` requests that came while the ring had no batch to spare:
    /// the next batch, begun when one is reported, answers them.
    deferred: usize,
}

struct RingBatch {
    id: u64,
    through: Seq,
    /// Writes not completed yet.
    writes_left: usize,
    /// The first write that failed (errno).
    failed: Option<i32>,
    /// `FlushRing` requests it answers (each gets its event).
    answers: usize,
    started: Instant,
}

pub(super) struct PendingHost {
    pub(super) done: Option<Completion>,
    /// Payload bytes of a write (for the counters).
    pub(super) bytes: u64,
    pub(super) start: Instant,
    pub(super) is_write: bool,
}

/// The mirror reactor over its disk backend `B` (`UringBackend` in the
/// binary; any [`Backend`] in tests).
pub(super) struct Reactor<B: Backend> {
    pub(super) opts: NodeOptions,
    pub(super) shared: Arc<Shared>,
    pub(super) core: Core<RingLog>,
    pub(super) backend: B,
    pub(super) meta: MetaWriter,
    pub(super) link: LinkManager,
    /// The replication connection (TCP or fabric: [`crate::link::Transport`]).
    pub(super) conn: Option<Connection>,
    /// The link socket was found empty and a poll is armed on this fd in
    /// the backend: [`Reactor::read_socket`] waits for it to fire.
    pub(super) link_armed: Option<RawFd>,
    pub(super) start: Instant,
    pub(super) actions: Vec<Action>,
    pub(super) msgs: Vec<Msg>,
    pub(super) comps: Vec<BackendCompletion>,
    pub(super) inflight: Vec<Option<Inflight>>,
    /// When each in-flight backend op was submitted (indexed like `inflight`).
    pub(super) inflight_at: Vec<Instant>,
    pub(super) free_tags: Vec<usize>,
    pub(super) overflow: Overflow,
    pub(super) ring_io: RingIo,
    pub(super) hosts: Vec<Option<PendingHost>>,
    pub(super) free_hosts: Vec<usize>,
    pub(super) write_hist: Histogram<u64>,
    pub(super) read_hist: Histogram<u64>,
    pub(super) sync_hist: Histogram<u64>,
    pub(super) disk_write_hist: Histogram<u64>,
    /// Where a sampled mirrored write's time goes (status `stages`).
    pub(super) stages: Stages,
    pub(super) io: IoStats,
    pub(super) last_status_ms: u64,
    /// `Core::state_changes` when the blob was last published.
    pub(super) state_published: u64,
    pub(super) last_tick_ms: u64,
    pub(super) msgs_sent: u64,
    pub(super) msgs_received: u64,
    pub(super) bytes_sent: u64,
    pub(super) bytes_received: u64,
    pub(super) peer_refused: Option<String>,
    /// The node failed and left the replication link ([`Reactor::leave_link`]).
    pub(super) link_left: bool,
    /// The node's pool is registered with the backend (fixed buffers).
    pub(super) pool_registered: bool,
    pub(super) pool_reg_failures: u64,
    /// Payload bytes of writes copied in user space (`BufferStats`).
    pub(super) copies: Copies,
    /// The status's `ring_location` (the ring does not move).
    pub(super) ring_location: String,
}

impl<B: Backend> Reactor<B> {
    pub(super) fn new(
        opts: NodeOptions,
        shared: Arc<Shared>,
        core: Core<RingLog>,
        mut backend: B,
        store: MetaStore,
        link: LinkManager,
        start: Instant,
    ) -> Self {
        let meta = MetaWriter::start(store, shared.clone());
        let (pool_registered, pool_reg_failures) = register_pool(&mut backend, &shared.pool);
        let ring_location = core.log().0.location();
        Reactor {
            opts,
            shared,
            core,
            backend,
            meta,
            link,
            conn: None,
            link_armed: None,
            start,
            actions: Vec::new(),
            msgs: Vec::new(),
            comps: Vec::new(),
            inflight: Vec::new(),
            inflight_at: Vec::new(),
            free_tags: Vec::new(),
            overflow: Overflow::default(),
            ring_io: RingIo::default(),
            hosts: Vec::new(),
            free_hosts: Vec::new(),
            write_hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
            read_hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
            sync_hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
            disk_write_hist: Histogram::new_with_bounds(1, 60_000_000, 3)
                .expect("histogram bounds"),
            stages: Stages::new(),
            io: IoStats::default(),
            last_status_ms: 0,
            state_published: 0,
            last_tick_ms: u64::MAX,
            msgs_sent: 0,
            msgs_received: 0,
            bytes_sent: 0,
            bytes_received: 0,
            peer_refused: None,
            link_left: false,
            pool_registered,
            pool_reg_failures,
            copies: Copies::default(),
            ring_location,
        }
    }

    pub(super) fn run(&mut self) {
        let (mode, spin_us) = (self.opts.poll_mode, self.opts.adaptive_spin_us);
        poll_loop(self, mode, spin_us);
        // Make the ring durable on the way out.
        if let Err(e) = self.core.flush_log_now() {
            log::error!("cannot make the ring durable on the way out: {e}");
        }
        self.fail_all_hosts();
        self.shared.state.fail_all();
    }
}

impl<B: Backend> Polled for Reactor<B> {
    fn shared(&self) -> &Shared {
        &self.shared
    }

    fn drained(&self) -> bool {
        self.backend.in_flight() == 0 && self.overflow.is_empty()
    }

    fn sleep(&mut self, extra: Option<RawFd>) {
        let mut fds = vec![(self.shared.wake.fd(), false), (self.link.wake.fd(), false)];
        fds.extend(extra.map(|fd| (fd, false)));
        if let Some(c) = self.conn.as_mut() {
            match c.sleep_fd() {
                Some(fd) => fds.push(fd),
                // The connection may have work pending: no sleep.
                None => return,
            }
        }
        // Wake at least every 10 ms for heartbeats and timers.
        let drain = [&self.shared.wake, &self.link.wake];
        sleep_on(&mut self.backend, &fds, &drain, 10);
    }

    /// One pass over every source of work. Returns whether anything happened.
    fn iteration(&mut self) -> bool {
        let mut did = false;
        let now = now_ms(self.start);
        if now != self.last_tick_ms {
            self.last_tick_ms = now;
            self.core.handle(Event::Tick { now_ms: now });
        }
        did |= self.take_commands();
        did |= self.take_meta();
        did |= self.take_host_ops();
        did |= self.take_state_ops();
        if !self.leave_link() {
            did |= self.take_link();
        }
        did |= self.read_socket();
        did |= self.reap_backend();
        self.core.poll();
        did |= self.run_actions();
        self.publish_state();
        // The link first: a REQ starts the backup's path (receive, ring,
        // ACK1), which is longer than this node's own ring write, and an
        // ACK1 is what the primary waits for; a disk submission costs a
        // doorbell (on a virtual disk a VM exit) that would delay them.
        did |= self.write_socket();
        self.overflow.retry(&mut self.backend);
        self.backend.flush_submissions();
        if now >= self.last_status_ms + 100 {
            self.last_status_ms = now;
            self.publish_status(now);
        }
        did
    }
}

impl<B: Backend> Reactor<B> {
    /// A failed node leaves the replication link for good; returns whether
    /// it has failed. Its core would otherwise greet every new connection
    /// and send heartbeats as the primary or backup it was: the backup of a
    /// failed primary would see a connected primary and refuse `promote`,
    /// and the primary of a failed backup would never see its peer go, so
    /// never degrade, and its host writes would wait. The socket closes,
    /// the link manager stops dialing and accepting (the peer then sees a
    /// closed link and, after `peer_timeout_ms`, a gone one), and a
    /// connection it set up meanwhile is closed unused. A restart, once the
    /// disk is fixed, starts a new link.
    pub(super) fn leave_link(&mut self) -> bool {
        if self.core.failed().is_none() {
            return false;
        }
        if !self.link_left {
            self.link_left = true;
            log::error!("the node failed: leaving the replication link so the peer can take over");
            self.link.stop();
            self.close_socket();
        }
        while let Some(mut c) = self.link.take() {
            c.close();
        }
        true
    }

    /// Metadata writes that the writer thread finished.
    pub(super) fn take_meta(&mut self) -> bool {
        let mut did = false;
        while let Some((version, r)) = self.meta.completed() {
            did = true;
            match r {
                Ok(()) => self.core.handle(Event::MetaPersisted { version }),
                Err(e) => {
                    log::error!("cannot write the node metadata: {e}; the node stops serving");
                    self.core.fatal(format!("metadata write failed: {e}"));
                }
            }
        }
        did
    }

    pub(super) fn take_commands(&mut self) -> bool {
        let shared = self.shared.clone();
        shared.answer_commands(|c| match c {
            Command::Promote { force } => self.core.promote(force),
            Command::Failover(c) => {
                use crate::status::FailoverCommand as F;
                match c {
                    F::PromoteTo { force, floor } => self.core.promote_to(force, floor)?,
                    F::SelfFence(reason) => self.core.self_fence(&reason),
                    F::LiftFence(reason) => self.core.lift_self_fence(&reason),
                    F::StaleRecorded { gen, from_seq } => self.core.stale_recorded(gen, from_seq),
                }
                self.last_status_ms = 0;
                Ok(())
            }
            Command::Verify(r) => {
                self.core
                    .start_verify(r.offset, r.length, r.repair, r.bytes_per_sec)
            }
            Command::Demote => self.core.demote(),
            Command::ResetLatency => {
                for h in [
                    &mut self.write_hist,
                    &mut self.read_hist,
                    &mut self.sync_hist,
                    &mut self.disk_write_hist,
                ] {
                    h.reset();
                }
                self.stages.reset();
                self.last_status_ms = 0; // publish the empty histograms now
                Ok(())
            }
        })
    }

    pub(super) fn host_slot(&mut self, h: PendingHost) -> usize {
        match self.free_hosts.pop() {
            Some(i) => {
                self.hosts[i] = Some(h);
                i
            }
            None => {
                self.hosts.push(Some(h));
                self.hosts.len() - 1
            }
        }
    }

    pub(super) fn take_host_ops(&mut self) -> bool {
        let mut did = false;
        // Bound the batch so the link and the disk get their turn.
        for _ in 0..256 {
            let Some(HostOp { op, done, start }) = self.shared.mailbox.pop() else {
                break;
            };
            did = true;
            if self.core.role() != Role::Primary || !self.core.is_serving() {
                let e = if self.core.failed().is_some() {
                    IoError::Unavailable
                } else {
                    IoError::NotPrimary
                };
                self.io.errors += 1;
                done(Err(e));
                continue;
            }
            match op {
                VolumeOp::Read { offset, len } => {
                    let id = self.host_slot(PendingHost {
                        done: Some(done),
                        bytes: 0,
                        start,
                        is_write: false,
                    });
                    let buf = read_buf(&self.shared.pool, len as usize);
                    self.submit(Inflight::HostRead(id), BackendOp::Read { offset, buf });
                }
                VolumeOp::Write { offset, data, fua } => {
                    let len = data.len() as u64;
                    let id = self.host_slot(PendingHost {
                        done: Some(done),
                        bytes: len,
                        start,
                        is_write: true,
                    });
                    self.core
                        .host_write(id as u64, ReqKind::Write, offset, len, fua, data.share());
                }
                VolumeOp::WriteZeroes { offset, len } | VolumeOp::Discard { offset, len } => {
                    let kind = if matches!(op, VolumeOp::Discard { .. }) {
                        ReqKind::Discard
                    } else {
                        ReqKind::WriteZeroes
                    };
                    let id = self.host_slot(PendingHost {
                        done: Some(done),
                        bytes: 0,
                        start,
                        is_write: true,
                    });
                    self.core.host_write(
                        id as u64,
                        kind,
                        offset,
                        len,
                        false,
                        AlignedBuf::empty().share(),
                    );
                }
                VolumeOp::Flush => {
                    let id = self.host_slot(PendingHost {
                        done: Some(done),
                        bytes: 0,
                        start,
                        is_write: false,
                    });
                    self.io.flushes += 1;
                    self.core.host_flush(id as u64);
                }
            }
        }
        did
    }

    pub(super) fn complete_host(&mut self, id: usize, result: Result<AlignedBuf, IoError>) {
        let Some(mut h) = self.hosts.get_mut(id).and_then(|s| s.take()) else {
            return;
        };
        self.free_hosts.push(id);
        let us = h.start.elapsed().as_micros() as u64;
        match &result {
            Ok(_) if h.is_write => {
                self.io.writes += 1;
                self.io.write_bytes += h.bytes;
                let _ = self.write_hist.record(us.max(1));
            }
            Ok(d) => {
                if !d.is_empty() {
                    self.io.reads += 1;
                    self.io.read_bytes += d.len() as u64;
                    let _ = self.read_hist.record(us.max(1));
                }
            }
            Err(_) => self.io.errors += 1,
        }
        if let Some(done) = h.done.take() {
            done(result);
        }
    }

    pub(super) fn fail_all_hosts(&mut self) {
        for i in 0..self.hosts.len() {
            if self.hosts[i].is_some() {
                self.complete_host(i, Err(IoError::Unavailable));
            }
        }
        while let Some(HostOp { done, .. }) = self.shared.mailbox.pop() {
            done(Err(IoError::Unavailable));
        }
    }
}

impl<B: Backend> Reactor<B> {
    pub(super) fn submit(&mut self, what: Inflight, op: BackendOp) {
        // The link first, within the pass too: a message queued before this
        // submission (the backup's ACK1 ahead of the executes it allows, the
        // primary's REQs ahead of its ring write) goes out now, because the
        // backend may hand this entry to the kernel right away (a chunk of
        // them, storage::backend::uring's SUBMIT_CHUNK_ENTRIES, or each one
        // under reactor.disk_handover = "at-once"), a doorbell that costs
        // tens of microseconds on a virtual disk. An error is left to
        // the pass's own `write_socket`, which drops the link.
        if let Some(c) = self.conn.as_mut() {
            if let Ok(n) = c.flush() {
                self.bytes_sent += n;
            }
        }
        let now = Instant::now();
        let tag = match self.free_tags.pop() {
            Some(t) => {
                self.inflight[t] = Some(what);
                self.inflight_at[t] = now;
                t
            }
            None => {
                self.inflight.push(Some(what));
                self.inflight_at.push(now);
                self.inflight.len() - 1
            }
        };
        self.overflow.submit(&mut self.backend, tag, op);
    }

    pub(super) fn reap_backend(&mut self) -> bool {
        self.comps.clear();
        let mut comps = std::mem::take(&mut self.comps);
        if self.backend.reap(&mut comps) == 0 {
            self.comps = comps;
            return false;
        }
        for c in comps.drain(..) {
            let tag = c.tag as usize;
            let Some(what) = self.inflight.get_mut(tag).and_then(|s| s.take()) else {
                continue;
            };
            self.free_tags.push(tag);
            let res = c.result.map(|_| ());
            let us = (self.inflight_at[tag].elapsed().as_micros() as u64).max(1);
            match &what {
                Inflight::Exec(_) | Inflight::ExtentWrite(_) => {
                    let _ = self.disk_write_hist.record(us);
                }
                _ => {}
            }
            match what {
                Inflight::Exec(seq) => {
                    self.stages.executed(seq);
                    self.core.handle(Event::Executed {
                        token: Token::Entry(seq),
                        result: res,
                    })
                }
                Inflight::ExtentWrite(token) => {
                    self.core.handle(Event::Executed { token, result: res })
                }
                Inflight::ExtentRead { token, offset } => {
                    let data = c.buf.map(|b| b.as_slice().to_vec()).unwrap_or_default();
                    self.core.handle(Event::ExtentRead {
                        token,
                        offset,
                        result: res.map(|_| data),
                    });
                }
                Inflight::Flush(token) => {
                    self.core.handle(Event::DiskFlushed { token, result: res })
                }
                Inflight::RingWrite(id) => {
                    if let Some(b) = self.ring_io.batches.iter_mut().find(|b| b.id == id) {
                        if let Err(e) = res {
                            b.failed.get_or_insert(e);
                        }
                        b.writes_left -= 1;
                    }
                    self.ring_advance();
                }
                Inflight::HostRead(id) => {
                    let r = match res {
                        // The buffer the disk read filled goes to the
                        // front-end, which sends from it.
                        Ok(()) => Ok(c.buf.unwrap_or_default()),
                        Err(e) => Err(IoError::Io(e)),
                    };
                    self.complete_host(id, r);
                }
            }
        }
        self.comps = comps;
        true
    }

    /// Begin the ring batch `io` that makes `through` durable, answering
    /// `answers` `FlushRing` requests; or defer them until a batch in
    /// flight is reported. The writes go to the backend's io_uring as
    /// durable writes (`RWF_DSYNC`: one operation each, no fdatasync after
    /// them): the reactor never waits for them.
    fn start_ring_flush(&mut self, through: Seq, io: RingFlushIo, answers: usize) {
        match io {
            RingFlushIo::Busy => self.ring_io.deferred += answers,
            RingFlushIo::Batch { fd, writes } => {
                let id = self.ring_io.next_id;
                self.ring_io.next_id += 1;
                self.ring_io.batches.push_back(RingBatch {
                    id,
                    through,
                    writes_left: writes.len(),
                    failed: None,
                    answers,
                    started: Instant::now(),
                });
                for (offset, segs) in writes {
                    self.submit(
                        Inflight::RingWrite(id),
                        BackendOp::WriteVecFd {
                            fd,
                            offset,
                            segs,
                            dsync: true,
                        },
                    );
                }
            }
        }
    }

    /// Report, oldest first, every batch whose durable writes all
    /// completed: a batch is reported only after every batch begun before
    /// it (reporting it durable reports them durable too), so one whose
    /// writes finished first waits for them. A batch with a failed write
    /// fails.
    fn ring_advance(&mut self) {
        while let Some(b) = self.ring_io.batches.front() {
            if b.writes_left > 0 {
                break;
            }
            let id = b.id;
            match b.failed {
                Some(e) => self.ring_flush_done(id, Err((e, "durable write"))),
                None => self.ring_flush_done(id, Ok(())),
            }
        }
    }

    /// Ring batch `id` finished (its durable writes, or a write that
    /// failed): tell the core, once per request it answers, then begin a
    /// batch for the requests deferred meanwhile.
    fn ring_flush_done(&mut self, id: u64, res: Result<(), (i32, &str)>) {
        let Some(i) = self.ring_io.batches.iter().position(|b| b.id == id) else {
            return;
        };
        let b = self.ring_io.batches.remove(i).expect("found");
        let _ = self
            .sync_hist
            .record((b.started.elapsed().as_micros() as u64).max(1));
        let through = b.through;
        match res {
            Ok(()) => {
                self.stages.ring_durable(through);
                for _ in 0..b.answers {
                    self.core.handle(Event::RingFlushed { through });
                }
                let deferred = std::mem::take(&mut self.ring_io.deferred);
                if deferred > 0 {
                    let (through, io) = self.core.begin_log_flush();
                    self.start_ring_flush(through, io, deferred);
                }
            }
            Err((e, what)) => {
                // The kernel may have dropped what the flush was to write:
                // the core refuses further work.
                log::error!("ring {what} failed (errno {e}); the node stops serving");
                let deferred = std::mem::take(&mut self.ring_io.deferred);
                for _ in 0..b.answers + deferred {
                    self.core.handle(Event::RingFlushFailed {
                        through,
                        why: format!("ring {what} failed (errno {e})"),
                    });
                }
            }
        }
    }

    pub(super) fn run_actions(&mut self) -> bool {
        let mut did = false;
        // Actions can cause events (metadata writes complete inline) which
        // cause more actions: loop until quiet.
        for _ in 0..64 {
            self.actions.clear();
            let mut acts = std::mem::take(&mut self.actions);
            self.core.drain_actions(&mut acts);
            if acts.is_empty() {
                self.actions = acts;
                break;
            }
            did = true;
            for a in acts.drain(..) {
                self.apply(a);
            }
            self.actions = acts;
            self.core.poll();
        }
        did
    }

    pub(super) fn apply(&mut self, a: Action) {
        match a {
            Action::Send(m) => {
                if let Some(c) = self.conn.as_mut() {
                    c.send(&m);
                    self.msgs_sent += 1;
                    if let Msg::Ack1(s) = m {
                        self.stages.ack1_sent(s);
                    }
                }
            }
            Action::SendEntry(seq) => {
                if let Some(c) = self.conn.as_mut() {
                    let log = self.core.log();
                    if let Some((h, p)) = log.get(seq) {
                        // From the buffer the payload arrived in when the
                        // ring still holds it; else from the ring's copy.
                        let copied = match log.payload_buf(seq) {
                            Some(b) if b.len() == p.len() => c.send_req_buf(&h, b),
                            _ => {
                                c.send_req(&h, p);
                                p.len()
                            }
                        };
                        self.copies.link_send += copied as u64;
                        self.msgs_sent += 1;
                        // The host's clock: a host write's REQ (not a
                        // replayed one) starts a sample.
                        let host = self
                            .core
                            .host_id_of(seq)
                            .and_then(|id| self.hosts.get(id as usize)?.as_ref().map(|h| h.start));
                        if let Some(start) = host {
                            self.stages.req_sent(seq, start);
                        }
                    }
                }
            }
            Action::FlushRing => {
                let (through, io) = self.core.begin_log_flush();
                self.start_ring_flush(through, io, 1);
            }
            Action::PersistMeta { version, bytes } => self.meta.write(version, bytes),
            Action::Execute { seq } => {
                self.stages.execute(seq);
                let zeroes = self.backend.discard_reads_zeroes();
                match exec_op(self.core.log(), seq, zeroes, &self.shared.pool) {
                    Ok((op, copied)) => {
                        self.copies.execute += copied;
                        self.submit(Inflight::Exec(seq), op);
                    }
                    Err(e) => {
                        log::error!("{e}");
                        self.core.fatal(e);
                    }
                }
            }
            Action::WriteExtent {
                token,
                offset,
                data,
            } => {
                // A pool buffer when one is free: a fixed-buffer write.
                let mut buf = read_buf(&self.shared.pool, data.len());
                buf.copy_from_slice(&data);
                self.submit(
                    Inflight::ExtentWrite(token),
                    BackendOp::Write {
                        offset,
                        buf,
                        fua: false,
                    },
                );
            }
            Action::ReadExtent { token, offset, len } => {
                let buf = read_buf(&self.shared.pool, len as usize);
                self.submit(
                    Inflight::ExtentRead { token, offset },
                    BackendOp::Read { offset, buf },
                );
            }
            Action::FlushDisk { token } => self.submit(Inflight::Flush(token), BackendOp::Flush),
            Action::CompleteWrite { id, result } => self.complete_host(
                id as usize,
                result.map(|_| AlignedBuf::empty()).map_err(host_err),
            ),
            Action::CompleteFlush { id, result } => self.complete_host(
                id as usize,
                result.map(|_| AlignedBuf::empty()).map_err(host_err),
            ),
            Action::ResetLink { reason } => {
                // The core has already handled the disconnect.
                log::warn!("resetting the replication link: {reason}");
                self.close_socket();
                self.link.request();
            }
            Action::PathChanged { serving } => {
                // What a promotion executed is visible before the path is.
                self.publish_state();
                if serving {
                    log::info!("path state: serving (primary)");
                } else {
                    log::info!(
                        "path state: not serving: {}",
                        self.core.not_serving_reason().unwrap_or_default()
                    );
                }
                self.shared.path.set(if serving {
                    PathState::Optimized
                } else {
                    PathState::Inaccessible
                });
                // The status shows the new path state at once.
                self.last_status_ms = 0;
            }
            Action::Notice(s) => log::info!("{s}"),
            Action::RecordStale { gen, from_seq } => {
                // The failover agent reads the request from the status:
                // publish it now.
                log::info!(
                    "asking the failover agent to record the backup stale from seq {from_seq} \
                     (generation {gen})"
                );
                self.last_status_ms = 0;
            }
        }
    }

    pub(super) fn publish_status(&mut self, now: u64) {
        let c = &self.core;
        let (ack1, ack2, ack3, executed) = c.watermarks();
        let lat = |h: &Histogram<u64>| Latency {
            count: h.len(),
            p50_us: h.value_at_quantile(0.5) as f64,
            p99_us: h.value_at_quantile(0.99) as f64,
            p999_us: h.value_at_quantile(0.999) as f64,
        };
        let replay_stats =
            |p: &crate::core::machine::ReplayProgress, head: Seq, done: bool| ReplayStats {
                entries: p.entries,
                bytes: p.bytes,
                extents: p.extents,
                seconds: if done {
                    (p.end_ms - p.start_ms) as f64 / 1000.0
                } else {
                    (now - p.start_ms) as f64 / 1000.0
                },
                remaining_entries: if done {
                    0
                } else {
                    p.last_seq.saturating_sub(head.min(p.last_seq))
                },
                // Estimated from the average entry size so far.
                remaining_bytes: if done || p.entries == 0 {
                    0
                } else {
                    p.last_seq.saturating_sub(head.min(p.last_seq)) * (p.bytes / p.entries)
                },
                full_remirror: p.full,
                first_seq: p.first_seq,
                last_seq: p.last_seq,
            };
        let peer_state = match c.session_state() {
            SessionState::Down => "disconnected",
            SessionState::Refused(_) => "refused",
            SessionState::Active(_) if c.replay_progress().is_some() => "replaying",
            SessionState::Active(_) => "connected",
            _ => "connecting",
        };
        let meta = c.meta();
        let mut io = self.io.clone();
        io.write_latency = lat(&self.write_hist);
        io.read_latency = lat(&self.read_hist);
        io.ring_sync_latency = lat(&self.sync_hist);
        io.disk_write_latency = lat(&self.disk_write_hist);
        io.stages = self.stages.report(lat);
        let st = NodeStatus {
            pid: std::process::id(),
            node_id: self.opts.node_id,
            node_name: self.opts.node_name.clone(),
            role: c.role().as_str().into(),
            generation: meta.generation(),
            peer_state: peer_state.into(),
            peer_refused_reason: match c.session_state() {
                SessionState::Refused(r) => Some(r.clone()),
                _ => self.peer_refused.clone(),
            },
            serving: c.is_serving(),
            not_serving_reason: c.not_serving_reason(),
            fenced_reason: c.fenced().map(str::to_string),
            self_fenced_reason: c.self_fenced().map(str::to_string),
            stale_mark_wanted: c.stale_wanted().map(|(gen, from_seq, since)| {
                crate::status::StaleMarkWanted {
                    generation: gen,
                    from_seq,
                    waiting_ms: now.saturating_sub(since),
                }
            }),
            failover: None,
            current: c.is_current(),
            forced_generations: meta.forced.clone(),
            degraded: c.is_degraded(),
            peer_stale_from_seq: meta.peer_stale_from,
            head_seq: c.log().head(),
            executed_seq: executed,
            delta_entries: c.log().len(),
            delta_bytes: c.log().payload_bytes(),
            ring_capacity_bytes: c.log().capacity_bytes(),
            ring_location: self.ring_location.clone(),
            ack1_seq: ack1,
            ack2_seq: ack2,
            ack3_seq: ack3,
            dirty_extents: meta.dirty.count(),
            dirty_bytes: meta.dirty.bytes(),
            dirty_granularity_bytes: meta.dirty.granularity,
            dirty_map_memory_bytes: meta.dirty_map_bytes(),
            remirrors: meta.remirrors,
            verify: c.verify_report().map(|r| crate::status::VerifyStatus {
                state: match &r.state {
                    VerifyState::Running => "running",
                    VerifyState::Done => "done",
                    VerifyState::Interrupted(_) => "interrupted",
                }
                .into(),
                reason: match &r.state {
                    VerifyState::Interrupted(w) => Some(w.clone()),
                    _ => None,
                },
                offset: r.offset,
                length: r.length,
                done_bytes: r.done_bytes,
                chunk_bytes: r.chunk_bytes,
                mismatched_chunks: r.mismatched_chunks,
                mismatches: r.mismatches.clone(),
                repair: r.repair,
                repair_chunks: r.repair_chunks,
                seconds: (if r.end_ms > 0 { r.end_ms } else { now }).saturating_sub(r.start_ms)
                    as f64
                    / 1000.0,
            }),
            last_replay: c.last_replay.as_ref().map(|p| replay_stats(p, ack1, true)),
            replay_progress: c.replay_progress().map(|p| replay_stats(p, ack1, false)),
            io,
            link_msgs_sent: self.msgs_sent,
            link_msgs_received: self.msgs_received,
            link_bytes_sent: self.bytes_sent,
            link_bytes_received: self.bytes_received,
            link_peers_refused: self.link.counters.auth_failures.load(Ordering::Relaxed)
                + self.link.counters.fabric_refused.load(Ordering::Relaxed),
            uptime_seconds: now as f64 / 1000.0,
            rss_bytes: 0,
            buffers: buffer_stats(
                &self.shared.pool,
                (self.pool_registered, self.pool_reg_failures),
                &self.backend,
                self.copies,
            ),
            // Read live by `NodeControl::status`.
            reactors: Vec::new(),
            disk_handover: crate::status::DiskHandOverStatus::of(&self.backend),
        };
        *self.shared.status.lock().unwrap() = st;
    }
}

/// The disk operation that executes ring entry `seq`, and the payload
/// bytes copied for it. A write goes to the disk from the buffer its
/// payload arrived in (`Log::payload_buf`: a fixed-buffer write when that
/// buffer is in the registered pool), with no copy; only an entry the log
/// no longer holds the buffer of (older, replayed) is copied out of the
/// ring, into a pool buffer when one is free (a fixed-buffer write still).
/// `discard_reads_zeroes`: the backend's [`Backend::discard_reads_zeroes`].
pub(super) fn exec_op<L: Log>(
    log: &L,
    seq: Seq,
    discard_reads_zeroes: bool,
    pool: &IoBufPool,
) -> Result<(BackendOp, u64), String> {
    let Some((h, p)) = log.get(seq) else {
        return Err(format!("seq {seq} to execute is missing from the ring"));
    };
    let op = match h.kind {
        ReqKind::Write => match log.payload_buf(seq) {
            Some(buf) if buf.len() == p.len() => BackendOp::WriteShared {
                offset: h.offset,
                buf,
                fua: h.fua,
            },
            _ => {
                let mut buf = read_buf(pool, p.len());
                buf.copy_from_slice(p);
                return Ok((
                    BackendOp::Write {
                        offset: h.offset,
                        buf,
                        fua: h.fua,
                    },
                    p.len() as u64,
                ));
            }
        },
        ReqKind::WriteZeroes => BackendOp::WriteZeroes {
            offset: h.offset,
            len: h.len,
        },
        // BLKDISCARD does not promise zeroes: both disks must read the
        // same, so block devices zero the range instead.
        ReqKind::Discard if !discard_reads_zeroes => BackendOp::WriteZeroes {
            offset: h.offset,
            len: h.len,
        },
        ReqKind::Discard => BackendOp::Discard {
            offset: h.offset,
            len: h.len,
        },
        // The core executes State entries itself (metadata).
        ReqKind::State => return Err(format!("seq {seq}: a state entry sent to the disk")),
    };
    Ok((op, 0))
}

/// A buffer of `len` bytes for a host read or a disk write's copy: from
/// the pool (fixed-buffer I/O; a read's buffer is what the front-end sends
/// from), from the heap when the pool has none free (it never waits).
pub(super) fn read_buf(pool: &IoBufPool, len: usize) -> AlignedBuf {
    if len <= pool.max_buf() {
        if let Some(b) = pool.try_get(len) {
            return b;
        }
    }
    AlignedBuf::new(len)
}

/// The status's view of the node's buffers.
pub(super) fn buffer_stats(
    pool: &IoBufPool,
    (registered, registration_failures): (bool, u64),
    backend: &impl Backend,
    c: Copies,
) -> crate::status::BufferStats {
    crate::status::BufferStats {
        pool_bytes: pool.total_bytes() as u64,
        pool_in_use_bytes: pool.in_use_bytes() as u64,
        pool_misses: pool.misses() as u64,
        pool_registered: registered,
        pool_registration_failures: registration_failures,
        fixed_disk_ops: backend.fixed_ops(),
        payload_copy_bytes: c.link_receive + c.execute + c.link_send,
        link_receive_copy_bytes: c.link_receive,
        execute_copy_bytes: c.execute,
        link_send_copy_bytes: c.link_send,
        // The binary adds the front-ends' (they live outside the engine).
        frontend_receive_copy_bytes: 0,
    }
}

/// Payload bytes of writes the reactor copied, by where.
#[derive(Clone, Copy, Default)]
pub(super) struct Copies {
    pub(super) link_receive: u64,
    pub(super) execute: u64,
    pub(super) link_send: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use volume::SharedBuf;

    /// A log that holds each entry's buffer, or (`keeps_bufs` false) only
    /// a copy of its bytes, like a ring that no longer has the buffer.
    struct BufLog {
        entries: Vec<(ReqHeader, SharedBuf)>,
        keeps_bufs: bool,
    }

    impl Log for BufLog {
        type Flush = ();
        fn first_seq(&self) -> Seq {
            1
        }
        fn next_seq(&self) -> Seq {
            self.entries.len() as Seq + 1
        }
        fn fits(&self, _: usize) -> bool {
            true
        }
        fn append(&mut self, h: &ReqHeader, payload: SharedBuf) -> bool {
            self.entries.push((*h, payload));
            true
        }
        fn get(&self, seq: Seq) -> Option<(ReqHeader, &[u8])> {
            let (h, p) = self.entries.get(seq.checked_sub(1)? as usize)?;
            Some((*h, &p[..]))
        }
        fn payload_buf(&self, seq: Seq) -> Option<SharedBuf> {
            let (_, p) = self.entries.get(seq.checked_sub(1)? as usize)?;
            self.keeps_bufs.then(|| p.clone())
        }
        fn trim_through(&mut self, _: Seq) {}
        fn truncate_after(&mut self, _: Seq) {}
        fn reset(&mut self, _: Seq) {}
        fn payload_bytes(&self) -> u64 {
            0
        }
        fn capacity_bytes(&self) -> u64 {
            u64::MAX
        }
        fn begin_flush(&mut self) -> (Seq, ()) {
            (self.next_seq() - 1, ())
        }
        fn flush_completed(&mut self, _: Seq) {}
        fn flush_failed(&mut self, _: Seq, _: String) {}
        fn failure(&self) -> Option<&str> {
            None
        }
        fn flush_now(&mut self) -> Result<(), String> {
            Ok(())
        }
    }

    fn write_hdr(seq: Seq, offset: u64, len: u64) -> ReqHeader {
        ReqHeader {
            seq,
            gen: 1,
            kind: ReqKind::Write,
            fua: false,
            offset,
            len,
        }
    }

    /// Execute writes the disk from the buffer the payload arrived in when
    /// the log holds it (same bytes in memory, a pooled buffer, nothing
    /// copied); from a copy of the ring's bytes only when it does not.
    #[test]
    fn execute_writes_from_the_payload_buffer_the_log_holds() {
        let pool = IoBufPool::new(1 << 20, 64 << 10);
        for keeps_bufs in [true, false] {
            let mut log = BufLog {
                entries: Vec::new(),
                keeps_bufs,
            };
            let mut b = pool.get(8192).unwrap();
            b.fill(0x5a);
            let shared = b.share();
            let ptr = shared.as_ptr();
            log.append(&write_hdr(1, 4096, 8192), shared);
            let mut disk = storage::backend::MemBackend::new(1 << 20, 4096, 4);
            let (op, copied) = exec_op(&log, 1, true, &pool).unwrap();
            match &op {
                BackendOp::WriteShared { offset, buf, .. } => {
                    assert!(keeps_bufs, "a shared write without the log's buffer");
                    assert_eq!(*offset, 4096);
                    assert_eq!(buf.as_ptr(), ptr, "not the payload's own buffer");
                    assert!(buf.is_pooled());
                    assert_eq!(copied, 0);
                }
                BackendOp::Write { buf, .. } => {
                    assert!(!keeps_bufs, "copied although the log holds the buffer");
                    assert_ne!(buf.as_ptr(), ptr);
                    assert!(buf.is_pooled(), "the copy goes to a pool buffer");
                    assert_eq!(copied, 8192);
                }
                other => panic!("unexpected op {other:?}"),
            }
            disk.submit(1, op).unwrap();
            let mut done: Vec<BackendCompletion> = Vec::new();
            disk.reap(&mut done);
            assert_eq!(done[0].result, Ok(8192));
            // A shared write hands no buffer back; a plain one its own.
            assert_eq!(done[0].buf.is_some(), !keeps_bufs);
            drop(done);
            assert_eq!(&disk.contents()[4096..4096 + 8192], &[0x5a; 8192][..]);
            assert_eq!(disk.shared_writes(), (keeps_bufs as u64, keeps_bufs as u64));
        }
        // The write's buffer went back to the pool with the log and the op.
        assert_eq!(pool.in_use_bytes(), 0);
        // A missing entry and a state entry are refused, not guessed at.
        let log = BufLog {
            entries: vec![(
                ReqHeader {
                    kind: ReqKind::State,
                    ..write_hdr(1, 0, 0)
                },
                IoBuf::empty().share(),
            )],
            keeps_bufs: true,
        };
        assert!(exec_op(&log, 2, true, &pool)
            .unwrap_err()
            .contains("missing"));
        assert!(exec_op(&log, 1, true, &pool)
            .unwrap_err()
            .contains("state entry"));
    }
}
