//! A running node: the reactor thread that drives the mirror core with
//! real I/O (io_uring backend, memory-mapped ring, metadata store, TCP
//! link), and the `Volume` the front-ends export.
//!
//! One reactor thread, pinned to a configured core, owns the core, the
//! backend, the ring and the replication socket. It may also host a
//! connection reactor ([`Node::host_connections`]): host connections whose
//! requests it then takes without a thread hop. Other threads (other
//! connection reactors, front-end threads) post requests to a lock-free
//! mailbox and wake the reactor through an eventfd when it sleeps. Poll
//! modes: `busy` spins; `adaptive` spins for `adaptive_spin_us` after the
//! last work, then sleeps inside the backend's io_uring_enter (with a
//! timeout), with one-shot polls armed on the mailbox, link, socket and
//! hosted connection-reactor fds: one system call per sleep.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use hdrhistogram::Histogram;
use storage::backend::uring::{UringBackend, UringConfig};
use storage::meta::MetaStore;
use storage::ring::{RecordHeader, Ring};
use storage::{AlignedBuf, Backend, BackendCompletion, BackendOp};
use volume::{
    Completion, Geometry, IoError, PathCell, PathState, Volume, VolumeIdentity, VolumeOp,
};

use crate::core::verify::VerifyState;
use crate::core::{
    Action, ConfirmMode, Core, CoreConfig, Event, HostError, Log, Meta, Msg, ReqHeader, ReqKind,
    Role, Seq, SessionState, Token,
};
use crate::link::{parse_frames, push_frame, push_req_frame, LinkManager, LinkOptions};
use crate::status::{IoStats, Latency, NodeStatus, ReplayStats};
use crate::sys::{now_ms, poll_fds, rss_bytes, EventFd};

pub mod standalone;
mod state;
pub use state::state_file;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollMode {
    Busy,
    Adaptive,
}

/// Everything a node needs, resolved from the configuration file.
#[derive(Clone)]
pub struct NodeOptions {
    pub node_id: u32,
    pub node_name: String,
    pub data_dir: PathBuf,
    /// The persistent ring file: [`ring_path`] of `data_dir` unless the
    /// operator put it elsewhere (`ring.path`, e.g. a device whose flush is
    /// cheap).
    pub ring_path: PathBuf,
    pub volume_path: PathBuf,
    pub block_size: u32,
    pub identity: VolumeIdentity,
    pub core: CoreConfig,
    pub link: LinkOptions,
    pub core_id: Option<usize>,
    pub poll_mode: PollMode,
    pub adaptive_spin_us: u64,
    pub queue_depth: u32,
    pub max_io_bytes: u32,
    pub max_message_bytes: usize,
}

/// Where the ring lives when `ring.path` is not set.
pub fn ring_path(data_dir: &Path) -> PathBuf {
    data_dir.join("ring")
}
pub fn meta_path(data_dir: &Path) -> PathBuf {
    data_dir.join("meta")
}

/// Adapts the persistent ring to the core's `Log`.
pub struct RingLog(pub Ring);

fn to_record(h: &ReqHeader) -> RecordHeader {
    RecordHeader {
        seq: h.seq,
        gen: h.gen,
        kind: h.kind as u8,
        flags: h.fua as u8,
        offset: h.offset,
        len: h.len,
    }
}

fn from_record(r: &RecordHeader) -> ReqHeader {
    ReqHeader {
        seq: r.seq,
        gen: r.gen,
        kind: ReqKind::from_code(r.kind).unwrap_or(ReqKind::Write),
        fua: r.flags & 1 != 0,
        offset: r.offset,
        len: r.len,
    }
}

impl Log for RingLog {
    fn first_seq(&self) -> Seq {
        self.0.first_seq()
    }
    fn next_seq(&self) -> Seq {
        self.0.next_seq()
    }
    fn fits(&self, payload_len: usize) -> bool {
        self.0.fits(payload_len)
    }
    fn append(&mut self, h: &ReqHeader, payload: &[u8]) -> bool {
        self.0.append(&to_record(h), payload).is_ok()
    }
    fn get(&self, seq: Seq) -> Option<(ReqHeader, &[u8])> {
        self.0.get(seq).map(|(r, p)| (from_record(&r), p))
    }
    fn trim_through(&mut self, seq: Seq) {
        self.0.trim_through(seq)
    }
    fn truncate_after(&mut self, seq: Seq) {
        timed("ring truncation", || self.0.truncate_after(seq))
    }
    fn reset(&mut self, next_seq: Seq) {
        timed("ring reset", || self.0.reset(next_seq))
    }
    fn payload_bytes(&self) -> u64 {
        self.0.payload_bytes()
    }
    fn capacity_bytes(&self) -> u64 {
        self.0.capacity_bytes()
    }
    fn wants_sync(&self) -> bool {
        // Every regular sync also makes trimmed space reusable; a sync just
        // for that is worth it only when the ring is getting full.
        self.0.reclaim_pending() && self.0.used_bytes() > self.0.capacity_bytes() / 2
    }
}

/// Prepares a node's persistent state. Refuses an already formatted data
/// directory unless `force`. `replace`: the disk is new and gets a full
/// remirror from the peer.
pub fn format(
    opts: &NodeOptions,
    ring_bytes: u64,
    role: Role,
    force: bool,
    replace: bool,
) -> Result<(), String> {
    std::fs::create_dir_all(&opts.data_dir).map_err(|e| {
        format!(
            "cannot create node.data_dir {}: {e}",
            opts.data_dir.display()
        )
    })?;
    let mp = meta_path(&opts.data_dir);
    if mp.exists() && !force {
        return Err(format!(
            "{} is already formatted (node metadata at {}); add --force to erase this node's ring and state",
            opts.data_dir.display(),
            mp.display()
        ));
    }
    let dev = UringBackend::open(
        &opts.volume_path,
        &UringConfig {
            queue_depth: 4,
            file_block_size: opts.block_size,
        },
    )
    .map_err(|e| {
        format!(
            "cannot open volume.path {}: {e}",
            opts.volume_path.display()
        )
    })?;
    let size = dev.size_bytes();
    drop(dev);
    if force && mp.exists() {
        // The metadata store never overwrites itself: --force erases it.
        std::fs::remove_file(&mp)
            .map_err(|e| format!("cannot remove the old metadata {}: {e}", mp.display()))?;
    }
    Ring::create(&opts.ring_path, ring_bytes, 1)
        .map_err(|e| format!("cannot create the ring {}: {e}", opts.ring_path.display()))?;
    let meta = Meta::formatted(
        opts.node_id,
        role,
        size,
        opts.core.dirty_granularity_bytes,
        replace,
    );
    let bytes = meta.encode();
    // Room for the densest dirty map: the encoding is sparse while clean.
    let slot = (meta.encoded_len_bound() as u64 + 4096).div_ceil(4096) * 4096 + 4096;
    let mut store = MetaStore::create(&mp, slot)
        .map_err(|e| format!("cannot create the metadata store: {e}"))?;
    store
        .write(&bytes)
        .map_err(|e| format!("cannot write the metadata: {e}"))?;
    // A new format settles what a standalone run left behind.
    match std::fs::remove_file(standalone::marker_path(&opts.data_dir)) {
        Ok(()) => log::info!("removed the standalone marker"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot remove the standalone marker: {e}")),
    }
    Ok(())
}

// ----- the volume the front-ends see -----

enum HostOp {
    Io {
        op: VolumeOp,
        done: Completion,
        start: Instant,
    },
}

struct Shared {
    mailbox: ArrayQueue<HostOp>,
    wake: EventFd,
    sleeping: AtomicBool,
    path: PathCell,
    geometry: Geometry,
    identity: VolumeIdentity,
    max_io_bytes: u32,
    stop: AtomicBool,
    status: Mutex<NodeStatus>,
    commands: Mutex<VecDeque<(Command, Arc<Reply>)>>,
    /// The replicated state blob (`state.rs`).
    state: state::SharedState,
    /// A connection reactor handed over for the reactor thread to drive.
    hosted: Mutex<Option<netreactor::Hosted>>,
    hosted_new: AtomicBool,
}

#[derive(Debug)]
enum Command {
    Promote { force: bool },
    Verify(crate::status::VerifyRequest),
    Demote,
    ResetLatency,
}

#[derive(Default)]
struct Reply {
    r: Mutex<Option<Result<(), String>>>,
    c: Condvar,
}

impl Shared {
    /// Answers every queued operator command with `f` (on the reactor);
    /// true if there was any.
    fn answer_commands(&self, mut f: impl FnMut(Command) -> Result<(), String>) -> bool {
        let cmds: Vec<_> = self.commands.lock().unwrap().drain(..).collect();
        let did = !cmds.is_empty();
        for (c, reply) in cmds {
            *reply.r.lock().unwrap() = Some(f(c));
            reply.c.notify_all();
        }
        did
    }
}

/// Backend operations the backend's queue could not take yet: resubmitted
/// in order, and new operations queue behind them so none overtakes another.
#[derive(Default)]
struct Overflow(VecDeque<(usize, BackendOp)>);

impl Overflow {
    fn submit(&mut self, backend: &mut UringBackend, tag: usize, op: BackendOp) {
        if !self.0.is_empty() {
            self.0.push_back((tag, op));
        } else if let Err(op) = backend.submit(tag as u64, op) {
            self.0.push_back((tag, op));
        }
    }

    fn retry(&mut self, backend: &mut UringBackend) {
        while let Some((tag, op)) = self.0.pop_front() {
            if let Err(op) = backend.submit(tag as u64, op) {
                self.0.push_front((tag, op));
                break;
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The node's block volume: what NBD, NVMe/TCP and iSCSI export.
pub struct NodeVolume {
    shared: Arc<Shared>,
}

impl NodeVolume {
    fn wake(&self) {
        if self.shared.sleeping.load(Ordering::Acquire) {
            self.shared.wake.notify();
        }
    }
}

impl Volume for NodeVolume {
    fn geometry(&self) -> Geometry {
        self.shared.geometry
    }
    fn identity(&self) -> VolumeIdentity {
        self.shared.identity.clone()
    }
    fn path_state(&self) -> PathState {
        self.shared.path.get()
    }
    fn path_epoch(&self) -> u64 {
        self.shared.path.epoch()
    }
    fn max_io_bytes(&self) -> u32 {
        self.shared.max_io_bytes
    }
    fn submit(&self, op: VolumeOp, done: Completion) {
        let g = self.shared.geometry;
        let check = match &op {
            VolumeOp::Read { offset, len } => g.check_range(*offset, *len as u64).and_then(|_| {
                if *len > self.shared.max_io_bytes {
                    Err(IoError::TooLarge)
                } else {
                    Ok(())
                }
            }),
            VolumeOp::Write { offset, data, .. } => {
                g.check_range(*offset, data.len() as u64).and_then(|_| {
                    if data.len() as u64 > self.shared.max_io_bytes as u64 {
                        Err(IoError::TooLarge)
                    } else {
                        Ok(())
                    }
                })
            }
            VolumeOp::Discard { offset, len } | VolumeOp::WriteZeroes { offset, len } => {
                g.check_range(*offset, *len)
            }
            VolumeOp::Flush => Ok(()),
        };
        if let Err(e) = check {
            return done(Err(e));
        }
        if self.shared.stop.load(Ordering::Acquire) {
            return done(Err(IoError::Unavailable));
        }
        let mut item = HostOp::Io {
            op,
            done,
            start: Instant::now(),
        };
        // The mailbox is bounded; a full mailbox means the reactor is
        // saturated: back off briefly rather than grow memory.
        loop {
            match self.shared.mailbox.push(item) {
                Ok(()) => break,
                Err(back) => {
                    item = back;
                    self.shared.wake.notify();
                    std::thread::yield_now();
                }
            }
        }
        self.wake();
    }
    fn persistent_state(&self) -> Option<Vec<u8>> {
        self.shared.state.get()
    }
    fn put_persistent_state(&self, blob: Vec<u8>, done: Completion) {
        if self.shared.stop.load(Ordering::Acquire) {
            return done(Err(IoError::Unavailable));
        }
        if self.shared.state.put(blob, done) {
            self.shared.wake.notify();
        }
    }
    fn max_state_bytes(&self) -> usize {
        self.shared.state.max_bytes()
    }
}

/// The control interface of a running node.
pub struct NodeControl {
    shared: Arc<Shared>,
}

impl NodeControl {
    fn command(&self, c: Command) -> Result<(), String> {
        let reply = Arc::new(Reply::default());
        self.shared
            .commands
            .lock()
            .unwrap()
            .push_back((c, reply.clone()));
        self.shared.wake.notify();
        let mut g = reply.r.lock().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(r) = g.take() {
                return r;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("the node did not answer within 30 s".into());
            }
            g = reply.c.wait_timeout(g, left).unwrap().0;
        }
    }
}

impl crate::status::Control for NodeControl {
    fn status(&self) -> NodeStatus {
        let mut s = self.shared.status.lock().unwrap().clone();
        s.rss_bytes = rss_bytes();
        s
    }
    fn promote(&self, force: bool) -> Result<(), String> {
        self.command(Command::Promote { force })
    }
    fn demote(&self) -> Result<(), String> {
        self.command(Command::Demote)
    }
    fn reset_latency(&self) -> Result<(), String> {
        self.command(Command::ResetLatency)
    }
    fn verify(&self, req: crate::status::VerifyRequest) -> Result<(), String> {
        self.command(Command::Verify(req))
    }
}

/// A running node.
pub struct Node {
    pub volume: Arc<NodeVolume>,
    pub control: Arc<NodeControl>,
    shared: Arc<Shared>,
    reactor: Option<JoinHandle<()>>,
}

impl Node {
    /// Opens the node's state and starts its reactor and link.
    pub fn start(opts: NodeOptions) -> Result<Node, String> {
        standalone::check_not_standalone(&opts.data_dir)?;
        let backend = Self::open_backend(&opts)?;
        let (mut store, meta_bytes) = MetaStore::open(&meta_path(&opts.data_dir)).map_err(|e| {
            format!(
                "cannot open the node metadata in {}: {e} (run `deltamirror format` first?)",
                opts.data_dir.display()
            )
        })?;
        let mut meta = Meta::decode(
            &meta_bytes.ok_or("the node metadata is empty; run `deltamirror format`")?,
        )?;
        if meta.node_id != opts.node_id {
            return Err(format!(
                "node.id = {} but {} was formatted for node {}; fix node.id or reformat",
                opts.node_id,
                opts.data_dir.display(),
                meta.node_id
            ));
        }
        let (ring, recovery) = Ring::open(&opts.ring_path).map_err(|e| {
            format!(
                "ring {}: {e} (if ring.path changed since `deltamirror format`, move the ring \
                 file there or set ring.path back)",
                opts.ring_path.display()
            )
        })?;
        log::info!(
            "ring recovered: {} records (seq {}..{}), torn tail {} bytes",
            recovery.records,
            recovery.first_seq,
            recovery.next_seq,
            recovery.torn_tail_bytes
        );
        meta.incarnation += 1;
        store
            .write(&meta.encode())
            .map_err(|e| format!("cannot write the node metadata: {e}"))?;
        let size = backend.size_bytes();
        let geometry = Geometry {
            block_size: backend.block_size(),
            num_blocks: size / backend.block_size() as u64,
        };
        // Room for the state blob in the metadata slots (stores formatted
        // before the blob existed have less than `MAX_STATE_BYTES`).
        let state_room = (store.max_state_bytes() + crate::core::MAX_STATE_BYTES + 8)
            .saturating_sub(meta.encoded_len_bound())
            .min(crate::core::MAX_STATE_BYTES);
        let initial_state = meta.state.clone();
        let mut core_cfg = opts.core.clone();
        core_cfg.volume_bytes = size;
        core_cfg.dirty_granularity_bytes = meta.dirty.granularity;
        let shared = Arc::new(Shared {
            mailbox: ArrayQueue::new(4096),
            wake: EventFd::new().map_err(|e| e.to_string())?,
            sleeping: AtomicBool::new(false),
            path: PathCell::new(PathState::Inaccessible),
            geometry,
            identity: opts.identity.clone(),
            max_io_bytes: opts.max_io_bytes,
            stop: AtomicBool::new(false),
            status: Mutex::new(NodeStatus::default()),
            commands: Mutex::new(VecDeque::new()),
            state: state::SharedState::mirrored(initial_state, state_room),
            hosted: Mutex::new(None),
            hosted_new: AtomicBool::new(false),
        });
        let link = LinkManager::start(opts.link.clone()).map_err(|e| e.to_string())?;
        let start = Instant::now();
        let core = Core::new(core_cfg, meta, RingLog(ring), 0);
        log::info!(
            "starting as {}, generation {}: not serving yet ({})",
            core.role().as_str(),
            core.meta().generation(),
            core.not_serving_reason().unwrap_or_default()
        );
        let sh = shared.clone();
        let reactor = std::thread::Builder::new()
            .name(format!("dm-reactor-{}", opts.node_id))
            .spawn(move || {
                if let Some(id) = opts.core_id {
                    if !core_affinity::set_for_current(core_affinity::CoreId { id }) {
                        log::warn!("could not pin the reactor to core {id}");
                    }
                }
                if std::env::var_os("DM_TEST_PANIC_REACTOR").is_some() {
                    // Fault injection for the test that a panicking reactor
                    // ends the process (panic = "abort").
                    panic!("forced reactor panic (DM_TEST_PANIC_REACTOR is set)");
                }
                let mut r = Reactor::new(opts, sh, core, backend, store, link, start);
                r.run();
            })
            .map_err(|e| e.to_string())?;
        Ok(Node {
            volume: Arc::new(NodeVolume {
                shared: shared.clone(),
            }),
            control: Arc::new(NodeControl {
                shared: shared.clone(),
            }),
            shared,
            reactor: Some(reactor),
        })
    }

    fn open_backend(opts: &NodeOptions) -> Result<UringBackend, String> {
        UringBackend::open(
            &opts.volume_path,
            &UringConfig {
                queue_depth: opts.queue_depth,
                file_block_size: opts.block_size,
            },
        )
        .map_err(|e| {
            format!(
                "cannot open volume.path {}: {e}",
                opts.volume_path.display()
            )
        })
    }

    /// Serves the volume alone: no peer, no ring, no mirroring (the
    /// unmirrored baseline). See [`standalone`].
    pub fn start_standalone(opts: NodeOptions) -> Result<Node, String> {
        let backend = Self::open_backend(&opts)?;
        standalone::leave_marker(&opts.data_dir)?;
        let size = backend.size_bytes();
        let shared = Arc::new(Shared {
            mailbox: ArrayQueue::new(4096),
            wake: EventFd::new().map_err(|e| e.to_string())?,
            sleeping: AtomicBool::new(false),
            path: PathCell::new(PathState::Inaccessible),
            geometry: Geometry {
                block_size: backend.block_size(),
                num_blocks: size / backend.block_size() as u64,
            },
            identity: opts.identity.clone(),
            max_io_bytes: opts.max_io_bytes,
            stop: AtomicBool::new(false),
            status: Mutex::new(NodeStatus::default()),
            commands: Mutex::new(VecDeque::new()),
            state: state::SharedState::standalone(&opts.data_dir)?,
            hosted: Mutex::new(None),
            hosted_new: AtomicBool::new(false),
        });
        let sh = shared.clone();
        let reactor = std::thread::Builder::new()
            .name(format!("dm-reactor-{}", opts.node_id))
            .spawn(move || {
                if let Some(id) = opts.core_id {
                    if !core_affinity::set_for_current(core_affinity::CoreId { id }) {
                        log::warn!("could not pin the reactor to core {id}");
                    }
                }
                standalone::Standalone::new(opts, sh, backend).run();
            })
            .map_err(|e| e.to_string())?;
        Ok(Node {
            volume: Arc::new(NodeVolume {
                shared: shared.clone(),
            }),
            control: Arc::new(NodeControl {
                shared: shared.clone(),
            }),
            shared,
            reactor: Some(reactor),
        })
    }

    /// Makes the reactor thread drive `hosted` (a connection reactor) in
    /// its poll loop: those connections' requests reach the mirror without
    /// a thread hop and their replies leave from the same thread.
    pub fn host_connections(&self, hosted: netreactor::Hosted) {
        *self.shared.hosted.lock().unwrap() = Some(hosted);
        self.shared.hosted_new.store(true, Ordering::Release);
        self.shared.wake.notify();
    }

    /// Stops the reactor after in-flight work drains (bounded wait).
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake.notify();
        if let Some(t) = self.reactor.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
    }
}

// ----- the reactor -----

/// What the poll loop drives: the mirrored reactor and the standalone one.
trait Polled {
    fn shared(&self) -> &Shared;
    /// One pass over every source of work; whether anything happened.
    fn iteration(&mut self) -> bool;
    /// Nothing in flight on the disk: stopping may finish.
    fn drained(&self) -> bool;
    /// Sleep until one of the thread's fds, or `extra` (a hosted
    /// connection reactor's), has work (see [`sleep_on`]).
    fn sleep(&mut self, extra: Option<RawFd>);
}

/// The reactor loop. `busy` spins; `adaptive` spins `spin_us` after the last
/// work, then sleeps. On stop it runs until the disk work drains (at most
/// 5 s more).
fn poll_loop(p: &mut impl Polled, mode: PollMode, spin_us: u64) {
    let spin = Duration::from_micros(spin_us);
    let mut last_work = Instant::now();
    let mut stopping_since: Option<Instant> = None;
    let mut hosted: Option<netreactor::Hosted> = None;
    loop {
        if p.shared().hosted_new.swap(false, Ordering::AcqRel) {
            hosted = p.shared().hosted.lock().unwrap().take();
        }
        // Connections first: the requests they receive are taken by the
        // core in the same pass.
        let mut did = hosted.as_mut().is_some_and(|h| h.poll());
        did |= p.iteration();
        if p.shared().stop.load(Ordering::Acquire) {
            let since = *stopping_since.get_or_insert_with(Instant::now);
            if p.drained() || since.elapsed() > Duration::from_secs(5) {
                break;
            }
        }
        if did {
            last_work = Instant::now();
            continue;
        }
        if mode == PollMode::Busy || last_work.elapsed() < spin {
            std::hint::spin_loop();
            continue;
        }
        let extra = match hosted.as_mut().map(|h| h.prepare_sleep()) {
            None => None,
            Some(Some(fd)) => Some(fd),
            // Work arrived for the hosted connections: no sleep.
            Some(None) => continue,
        };
        let sh = p.shared();
        sh.sleeping.store(true, Ordering::Release);
        // A host op posted before `sleeping` was set would not wake us.
        if sh.mailbox.is_empty() && !sh.stop.load(Ordering::Acquire) {
            p.sleep(extra);
        }
        p.shared().sleeping.store(false, Ordering::Release);
        if let Some(h) = hosted.as_mut() {
            h.woke();
        }
        last_work = Instant::now() - spin;
    }
    // Dropping the hosted reactor closes its connections.
    drop(hosted);
}

/// Sleeps for at most `timeout_ms` inside the backend's io_uring_enter
/// until a backend operation completes or one of `fds` is ready, then
/// drains those of the eventfds `drain` that were written. One system
/// call; a poll(2) on the fds and the backend's eventfd only if the ring
/// had no room for the polls.
fn sleep_on(
    backend: &mut UringBackend,
    fds: &[(RawFd, bool)],
    drain: &[&EventFd],
    timeout_ms: u64,
) {
    if backend.wait(fds, timeout_ms) {
        // Drain only the eventfds that were written: no read on the rest.
        for e in drain {
            if backend.take_fired(e.fd()) {
                e.drain();
            }
        }
    } else {
        let mut all = fds.to_vec();
        all.extend(backend.wait_fd().map(|fd| (fd, false)));
        poll_fds(&all, timeout_ms as i32);
        for e in drain {
            e.drain();
        }
    }
}

/// Writes the node metadata (two-slot store, fdatasync) on its own thread,
/// so that a slow fdatasync (hundreds of ms after a large burst of writes
/// on this VM) never holds the reactor: host I/O and heartbeats go on while
/// the core waits for `MetaPersisted`. The core keeps at most one write in
/// flight, so completions arrive in order.
/// Finished metadata writes: (version, result).
type MetaDone = Arc<Mutex<VecDeque<(u64, Result<(), String>)>>>;

struct MetaWriter {
    tx: Option<std::sync::mpsc::Sender<(u64, Vec<u8>)>>,
    done: MetaDone,
    thread: Option<JoinHandle<()>>,
}

impl MetaWriter {
    fn start(mut store: MetaStore, shared: Arc<Shared>) -> MetaWriter {
        let (tx, rx) = std::sync::mpsc::channel::<(u64, Vec<u8>)>();
        let done: MetaDone = Arc::new(Mutex::new(VecDeque::new()));
        let d = done.clone();
        let thread = std::thread::Builder::new()
            .name("dm-meta".into())
            .spawn(move || {
                while let Ok((version, bytes)) = rx.recv() {
                    let r =
                        timed("metadata write", || store.write(&bytes)).map_err(|e| e.to_string());
                    d.lock().unwrap().push_back((version, r));
                    shared.wake.notify();
                }
            })
            .expect("spawn the metadata writer thread");
        MetaWriter {
            tx: Some(tx),
            done,
            thread: Some(thread),
        }
    }

    fn write(&mut self, version: u64, bytes: Vec<u8>) {
        if let Some(tx) = &self.tx {
            let _ = tx.send((version, bytes));
        }
    }

    fn completed(&mut self) -> Option<(u64, Result<(), String>)> {
        self.done.lock().unwrap().pop_front()
    }
}

impl Drop for MetaWriter {
    fn drop(&mut self) {
        // Finish the write in flight, if any, then stop.
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

enum Inflight {
    Exec(Seq),
    ExtentWrite(Token),
    ExtentRead { token: Token, offset: u64 },
    Flush(Token),
    LogSync(Seq),
    HostRead(usize),
}

struct PendingHost {
    done: Option<Completion>,
    data: Vec<u8>,
    start: Instant,
    is_write: bool,
}

struct Reactor {
    opts: NodeOptions,
    shared: Arc<Shared>,
    core: Core<RingLog>,
    backend: UringBackend,
    meta: MetaWriter,
    link: LinkManager,
    sock: Option<TcpStream>,
    rx: Vec<u8>,
    rx_len: usize,
    tx: Vec<u8>,
    tx_off: usize,
    start: Instant,
    actions: Vec<Action>,
    msgs: Vec<Msg>,
    comps: Vec<BackendCompletion>,
    inflight: Vec<Option<Inflight>>,
    /// When each in-flight backend op was submitted (indexed like `inflight`).
    inflight_at: Vec<Instant>,
    free_tags: Vec<usize>,
    overflow: Overflow,
    hosts: Vec<Option<PendingHost>>,
    free_hosts: Vec<usize>,
    write_hist: Histogram<u64>,
    read_hist: Histogram<u64>,
    sync_hist: Histogram<u64>,
    disk_write_hist: Histogram<u64>,
    io: IoStats,
    last_status_ms: u64,
    /// `Core::state_changes` when the blob was last published.
    state_published: u64,
    last_tick_ms: u64,
    msgs_sent: u64,
    msgs_received: u64,
    bytes_sent: u64,
    bytes_received: u64,
    peer_refused: Option<String>,
}

const RX_BUF_BYTES: usize = 4 << 20;

impl Reactor {
    fn new(
        opts: NodeOptions,
        shared: Arc<Shared>,
        core: Core<RingLog>,
        backend: UringBackend,
        store: MetaStore,
        link: LinkManager,
        start: Instant,
    ) -> Self {
        let rx_cap = RX_BUF_BYTES.max(opts.max_message_bytes + 64);
        let meta = MetaWriter::start(store, shared.clone());
        Reactor {
            opts,
            shared,
            core,
            backend,
            meta,
            link,
            sock: None,
            rx: vec![0; rx_cap],
            rx_len: 0,
            tx: Vec::with_capacity(1 << 20),
            tx_off: 0,
            start,
            actions: Vec::new(),
            msgs: Vec::new(),
            comps: Vec::new(),
            inflight: Vec::new(),
            inflight_at: Vec::new(),
            free_tags: Vec::new(),
            overflow: Overflow::default(),
            hosts: Vec::new(),
            free_hosts: Vec::new(),
            write_hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
            read_hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
            sync_hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds"),
            disk_write_hist: Histogram::new_with_bounds(1, 60_000_000, 3)
                .expect("histogram bounds"),
            io: IoStats::default(),
            last_status_ms: 0,
            state_published: 0,
            last_tick_ms: u64::MAX,
            msgs_sent: 0,
            msgs_received: 0,
            bytes_sent: 0,
            bytes_received: 0,
            peer_refused: None,
        }
    }

    fn run(&mut self) {
        let (mode, spin_us) = (self.opts.poll_mode, self.opts.adaptive_spin_us);
        poll_loop(self, mode, spin_us);
        // Make the ring durable on the way out.
        let _ = self.core.log.0.sync();
        self.fail_all_hosts();
        self.shared.state.fail_all();
    }
}

impl Polled for Reactor {
    fn shared(&self) -> &Shared {
        &self.shared
    }

    fn drained(&self) -> bool {
        self.backend.in_flight() == 0 && self.overflow.is_empty()
    }

    fn sleep(&mut self, extra: Option<RawFd>) {
        let mut fds = vec![(self.shared.wake.fd(), false), (self.link.wake.fd(), false)];
        fds.extend(extra.map(|fd| (fd, false)));
        if let Some(s) = &self.sock {
            fds.push((s.as_raw_fd(), self.tx_off < self.tx.len()));
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
        did |= self.take_link();
        did |= self.read_socket();
        did |= self.reap_backend();
        self.core.poll();
        did |= self.run_actions();
        self.publish_state();
        self.ring_failed();
        self.overflow.retry(&mut self.backend);
        self.backend.flush_submissions();
        did |= self.write_socket();
        if now >= self.last_status_ms + 100 {
            self.last_status_ms = now;
            self.publish_status(now);
        }
        did
    }
}

impl Reactor {
    /// Metadata writes that the writer thread finished.
    fn take_meta(&mut self) -> bool {
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

    fn take_commands(&mut self) -> bool {
        let shared = self.shared.clone();
        shared.answer_commands(|c| match c {
            Command::Promote { force } => self.core.promote(force),
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
                self.last_status_ms = 0; // publish the empty histograms now
                Ok(())
            }
        })
    }

    fn host_slot(&mut self, h: PendingHost) -> usize {
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

    fn take_host_ops(&mut self) -> bool {
        let mut did = false;
        // Bound the batch so the link and the disk get their turn.
        for _ in 0..256 {
            let Some(HostOp::Io { op, done, start }) = self.shared.mailbox.pop() else {
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
                        data: Vec::new(),
                        start,
                        is_write: false,
                    });
                    let buf = AlignedBuf::new(len as usize);
                    self.submit(Inflight::HostRead(id), BackendOp::Read { offset, buf });
                }
                VolumeOp::Write { offset, data, fua } => {
                    let len = data.len() as u64;
                    let id = self.host_slot(PendingHost {
                        done: Some(done),
                        data: Vec::new(),
                        start,
                        is_write: true,
                    });
                    self.core
                        .host_write(id as u64, ReqKind::Write, offset, len, fua, &data);
                    if let Some(h) = self.hosts[id].as_mut() {
                        h.data = data;
                    }
                }
                VolumeOp::WriteZeroes { offset, len } => {
                    let id = self.host_slot(PendingHost {
                        done: Some(done),
                        data: Vec::new(),
                        start,
                        is_write: true,
                    });
                    self.core
                        .host_write(id as u64, ReqKind::WriteZeroes, offset, len, false, &[]);
                }
                VolumeOp::Discard { offset, len } => {
                    let id = self.host_slot(PendingHost {
                        done: Some(done),
                        data: Vec::new(),
                        start,
                        is_write: true,
                    });
                    self.core
                        .host_write(id as u64, ReqKind::Discard, offset, len, false, &[]);
                }
                VolumeOp::Flush => {
                    let id = self.host_slot(PendingHost {
                        done: Some(done),
                        data: Vec::new(),
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

    fn complete_host(&mut self, id: usize, result: Result<Vec<u8>, IoError>) {
        let Some(mut h) = self.hosts.get_mut(id).and_then(|s| s.take()) else {
            return;
        };
        self.free_hosts.push(id);
        let us = h.start.elapsed().as_micros() as u64;
        match &result {
            Ok(d) if h.is_write => {
                self.io.writes += 1;
                self.io.write_bytes += h.data.len().max(d.len()) as u64;
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
        let result = result.map(|d| {
            if h.is_write {
                std::mem::take(&mut h.data)
            } else {
                d
            }
        });
        if let Some(done) = h.done.take() {
            done(result);
        }
    }

    fn fail_all_hosts(&mut self) {
        for i in 0..self.hosts.len() {
            if self.hosts[i].is_some() {
                self.complete_host(i, Err(IoError::Unavailable));
            }
        }
        while let Some(HostOp::Io { done, .. }) = self.shared.mailbox.pop() {
            done(Err(IoError::Unavailable));
        }
    }

    fn take_link(&mut self) -> bool {
        let Some(s) = self.link.take() else {
            return false;
        };
        if self.sock.is_some() {
            self.drop_socket(false);
        }
        // Every path that closes a socket also empties the buffers.
        self.sock = Some(s);
        self.peer_refused = None;
        self.core.handle(Event::PeerConnected);
        true
    }

    /// Closes the replication socket and forgets its buffered bytes.
    fn close_socket(&mut self) {
        if let Some(s) = self.sock.take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        self.rx_len = 0;
        self.tx.clear();
        self.tx_off = 0;
    }

    fn drop_socket(&mut self, reconnect: bool) {
        self.close_socket();
        self.core.handle(Event::PeerDisconnected);
        if reconnect {
            self.link.request();
        }
    }

    fn read_socket(&mut self) -> bool {
        let Some(s) = self.sock.as_mut() else {
            return false;
        };
        let mut did = false;
        loop {
            if self.rx_len == self.rx.len() {
                break;
            }
            match s.read(&mut self.rx[self.rx_len..]) {
                Ok(0) => {
                    log::warn!("replication peer closed the connection");
                    self.drop_socket(true);
                    return true;
                }
                Ok(n) => {
                    self.rx_len += n;
                    self.bytes_received += n as u64;
                    did = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("replication link read error: {e}");
                    self.drop_socket(true);
                    return true;
                }
            }
        }
        if !did {
            return false;
        }
        self.msgs.clear();
        match parse_frames(
            &self.rx[..self.rx_len],
            self.opts.max_message_bytes,
            &mut self.msgs,
        ) {
            Ok(used) => {
                self.rx.copy_within(used..self.rx_len, 0);
                self.rx_len -= used;
            }
            Err(e) => {
                log::error!("replication link: {e}; dropping the connection");
                self.drop_socket(true);
                return true;
            }
        }
        self.msgs_received += self.msgs.len() as u64;
        for m in std::mem::take(&mut self.msgs) {
            if let Msg::Refuse { reason } = &m {
                self.peer_refused = Some(reason.clone());
            }
            self.core.handle(Event::PeerMsg(m));
        }
        true
    }

    fn write_socket(&mut self) -> bool {
        let Some(s) = self.sock.as_mut() else {
            self.tx.clear();
            self.tx_off = 0;
            return false;
        };
        let mut did = false;
        while self.tx_off < self.tx.len() {
            match s.write(&self.tx[self.tx_off..]) {
                Ok(n) => {
                    self.tx_off += n;
                    self.bytes_sent += n as u64;
                    did = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("replication link write error: {e}");
                    self.drop_socket(true);
                    return true;
                }
            }
        }
        if self.tx_off == self.tx.len() {
            self.tx.clear();
            self.tx_off = 0;
        }
        did
    }

    fn submit(&mut self, what: Inflight, op: BackendOp) {
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

    fn reap_backend(&mut self) -> bool {
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
                Inflight::LogSync(_) => {
                    let _ = self.sync_hist.record(us);
                }
                Inflight::Exec(_) | Inflight::ExtentWrite(_) => {
                    let _ = self.disk_write_hist.record(us);
                }
                _ => {}
            }
            match what {
                Inflight::Exec(seq) => self.core.handle(Event::Executed {
                    token: Token::Entry(seq),
                    result: res,
                }),
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
                Inflight::LogSync(through) => match res {
                    Ok(()) => {
                        self.core.log.0.sync_completed(through);
                        self.core.handle(Event::RingFlushed { through });
                    }
                    Err(e) => {
                        // The kernel may have dropped dirty ring pages: refuse
                        // further work rather than guess.
                        log::error!("ring fdatasync failed (errno {e}); the node stops serving");
                        self.core
                            .fatal(format!("ring fdatasync failed (errno {e})"));
                    }
                },
                Inflight::HostRead(id) => {
                    let r = match res {
                        Ok(()) => Ok(c.buf.map(|b| b.as_slice().to_vec()).unwrap_or_default()),
                        Err(e) => Err(IoError::Io(e)),
                    };
                    self.complete_host(id, r);
                }
            }
        }
        self.comps = comps;
        true
    }

    /// A failed ring write or sync leaves the ring's on-disk state unknown:
    /// the node stops serving (once) and a restart recovers from the ring.
    fn ring_failed(&mut self) -> bool {
        let Some(e) = self.core.log.0.write_error() else {
            return false;
        };
        if self.core.failed().is_none() {
            let e = e.to_string();
            log::error!("ring write failed: {e}; the node stops serving");
            self.core.fatal(format!("ring write failed: {e}"));
        }
        true
    }

    fn run_actions(&mut self) -> bool {
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

    fn apply(&mut self, a: Action) {
        match a {
            Action::Send(m) => {
                if self.sock.is_some() {
                    push_frame(&mut self.tx, &m);
                    self.msgs_sent += 1;
                }
            }
            Action::SendEntry(seq) => {
                if self.sock.is_some() {
                    if let Some((h, p)) = self.core.log.0.get(seq) {
                        push_req_frame(&mut self.tx, &from_record(&h), p);
                        self.msgs_sent += 1;
                    }
                }
            }
            Action::FlushRing => {
                let through = self.core.log.0.prepare_sync();
                if self.ring_failed() {
                    return;
                }
                let fd = self.core.log.0.fd();
                self.submit(Inflight::LogSync(through), BackendOp::SyncFd { fd });
            }
            Action::PersistMeta { version, bytes } => self.meta.write(version, bytes),
            Action::Execute { seq } => {
                let Some((h, p)) = self.core.log.0.get(seq) else {
                    log::error!("execute of seq {seq} missing from the ring");
                    self.core
                        .fatal(format!("seq {seq} to execute is missing from the ring"));
                    return;
                };
                let h = from_record(&h);
                let op = match h.kind {
                    ReqKind::Write => BackendOp::Write {
                        offset: h.offset,
                        buf: AlignedBuf::from_slice(p),
                        fua: h.fua,
                    },
                    ReqKind::WriteZeroes => BackendOp::WriteZeroes {
                        offset: h.offset,
                        len: h.len,
                    },
                    // BLKDISCARD does not promise zeroes: both disks must read
                    // the same, so block devices zero the range instead.
                    ReqKind::Discard if self.backend.is_block_device() => BackendOp::WriteZeroes {
                        offset: h.offset,
                        len: h.len,
                    },
                    ReqKind::Discard => BackendOp::Discard {
                        offset: h.offset,
                        len: h.len,
                    },
                    ReqKind::State => {
                        // The core executes State entries itself (metadata).
                        self.core
                            .fatal(format!("seq {seq}: a state entry sent to the disk"));
                        return;
                    }
                };
                self.submit(Inflight::Exec(seq), op);
            }
            Action::WriteExtent {
                token,
                offset,
                data,
            } => {
                let buf = AlignedBuf::from_slice(&data);
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
                let buf = AlignedBuf::new(len as usize);
                self.submit(
                    Inflight::ExtentRead { token, offset },
                    BackendOp::Read { offset, buf },
                );
            }
            Action::FlushDisk { token } => self.submit(Inflight::Flush(token), BackendOp::Flush),
            Action::CompleteWrite { id, result } => {
                self.complete_host(id as usize, result.map(|_| Vec::new()).map_err(host_err))
            }
            Action::CompleteFlush { id, result } => {
                self.complete_host(id as usize, result.map(|_| Vec::new()).map_err(host_err))
            }
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
            }
            Action::Notice(s) => log::info!("{s}"),
        }
    }

    fn publish_status(&mut self, now: u64) {
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
            current: c.is_current(),
            forced_generations: meta.forced.clone(),
            degraded: c.is_degraded(),
            peer_stale_from_seq: meta.peer_stale_from,
            head_seq: c.log.head(),
            executed_seq: executed,
            delta_entries: c.log.len(),
            delta_bytes: c.log.payload_bytes(),
            ring_capacity_bytes: c.log.capacity_bytes(),
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
            uptime_seconds: now as f64 / 1000.0,
            rss_bytes: 0,
        };
        *self.shared.status.lock().unwrap() = st;
    }
}

/// Runs `f`; a synchronous step that holds the reactor for more than
/// 100 ms (no host I/O, no heartbeats meanwhile) is logged.
fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let r = f();
    let ms = t.elapsed().as_millis();
    if ms > 100 {
        log::warn!("{what} held the reactor for {ms} ms");
    }
    r
}

fn host_err(e: HostError) -> IoError {
    match e {
        HostError::NotPrimary => IoError::NotPrimary,
        HostError::Io(e) => IoError::Io(e),
        HostError::Unavailable => IoError::Unavailable,
    }
}

/// Default core settings for a node (the binary overrides from config).
pub fn default_core_config(node_id: u32) -> CoreConfig {
    CoreConfig {
        node_id,
        confirm: ConfirmMode::Ack,
        ack1_persisted: true,
        volume_bytes: 0,
        dirty_granularity_bytes: 1 << 20,
        max_executing: 128,
        max_unacked_entries: 256,
        max_resync_inflight: 8,
        heartbeat_interval_ms: 100,
        peer_timeout_ms: 1000,
        max_replay_bytes_per_sec: 0,
        min_replay_bytes_per_sec: 0,
        coalesce_acks: true,
    }
}
