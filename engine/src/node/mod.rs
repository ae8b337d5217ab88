//! A running node: the reactor thread that drives the mirror core with
//! real I/O (a disk [`Backend`]: io_uring in the binary, any backend
//! through [`Node::start_on`]; memory-mapped ring, metadata store, TCP
//! link), and the `Volume` the front-ends export.
//!
//! One reactor thread, pinned to a configured core, owns the core, the
//! backend, the ring and the replication socket. It may also host a
//! connection reactor ([`Node::host_connections`]): host connections whose
//! requests it then takes without a thread hop. Other threads (other
//! connection reactors, front-end threads) post requests to a lock-free
//! mailbox and wake the reactor through an eventfd when it sleeps. Poll
//! modes: `busy` spins; `adaptive` polls for `adaptive_spin_us` after the
//! last work, yielding the core to any other ready thread between passes
//! (`netreactor::Idle`), then sleeps inside the backend's io_uring_enter (with a
//! timeout), with one-shot polls armed on the mailbox, link, socket and
//! hosted connection-reactor fds: one system call per sleep (a backend
//! without a ring of its own sleeps in poll(2) on the same fds).
//!
//! Files: `format.rs` (a new data directory), `ring_log.rs` (the ring as
//! the core's `Log`), `node_volume.rs` (the `Volume` the front-ends export
//! and the operator's control handle), `poll.rs` (the poll loop and its
//! sleep), `meta_writer.rs` (the metadata thread), `reactor.rs` (the mirror
//! reactor; `reactor/link_io.rs` its replication socket), `state.rs` (the
//! replicated state blob), `standalone.rs` (`serve --standalone`).

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::RawFd;
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
    Completion, Geometry, IoBuf, IoBufPool, IoError, PathCell, PathState, Volume, VolumeIdentity,
    VolumeOp,
};

use crate::core::verify::VerifyState;
use crate::core::{
    Action, ConfirmMode, Core, CoreConfig, Event, HostError, Log, Meta, Msg, ReqHeader, ReqKind,
    Role, Seq, SessionState, Token,
};
use crate::link::{Connection, LinkManager, LinkOptions};
use crate::status::{IoStats, Latency, NodeStatus, ReplayStats};
use crate::sys::{now_ms, poll_fds, rss_bytes, EventFd};

mod format;
mod meta_writer;
mod node_volume;
mod poll;
mod reactor;
mod ring_log;
pub mod standalone;
mod state;

pub use format::{check_ring_device, format, format_with_size, FormatFlags};
use meta_writer::MetaWriter;
pub use node_volume::{NodeControl, NodeVolume};
use poll::{poll_loop, sleep_on, Polled};
use reactor::{Overflow, PendingHost, Reactor};
pub use ring_log::{RingFlushIo, RingLog};
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
    /// A file volume keeps its space on discard (`volume.preallocate` is
    /// not "none"): see [`storage::backend::UringConfig::keep_space`].
    pub keep_volume_space: bool,
    pub identity: VolumeIdentity,
    pub core: CoreConfig,
    pub link: LinkOptions,
    pub core_id: Option<usize>,
    pub poll_mode: PollMode,
    pub adaptive_spin_us: u64,
    /// `reactor.disk_submit_hold_us`: see
    /// [`storage::backend::UringConfig::submit_hold_us`].
    pub disk_submit_hold_us: u32,
    /// `reactor.disk_handover`: see
    /// [`storage::backend::UringConfig::hand_over`].
    pub disk_hand_over: storage::backend::HandOverPolicy,
    pub queue_depth: u32,
    pub max_io_bytes: u32,
    pub max_message_bytes: usize,
    /// Bytes of the node's buffer pool (`reactor.buffer_pool_mib`): the
    /// block-aligned buffers write payloads are received into, registered
    /// once with the backend's io_uring.
    pub buffer_pool_bytes: usize,
}

/// Where the ring lives when `ring.path` is not set.
pub fn ring_path(data_dir: &Path) -> PathBuf {
    data_dir.join("ring")
}
pub fn meta_path(data_dir: &Path) -> PathBuf {
    data_dir.join("meta")
}

// ----- the volume the front-ends see -----

/// A host request on its way to the reactor: the operation, where its
/// result goes, and when it was submitted (for the latency histograms).
struct HostOp {
    op: VolumeOp,
    done: Completion,
    start: Instant,
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
    /// The node's buffer pool: what [`Volume::alloc_buf`] hands out, what
    /// the backup receives REQ payloads into, registered with the backend.
    pool: IoBufPool,
    /// Busy and idle time of the reactor thread ([`poll::poll_loop`]).
    load: netreactor::Load,
    /// The reactor thread's name and the core it is pinned to.
    reactor_thread: String,
    core_id: Option<usize>,
}

#[derive(Debug)]
enum Command {
    Promote {
        force: bool,
    },
    /// The failover agent's commands (`crate::status::FailoverCommand`).
    Failover(crate::status::FailoverCommand),
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

/// The name of node `id`'s reactor thread.
fn reactor_thread_name(id: u32) -> String {
    format!("dm-reactor-{id}")
}

/// A running node.
pub struct Node {
    pub volume: Arc<NodeVolume>,
    pub control: Arc<NodeControl>,
    shared: Arc<Shared>,
    reactor: Option<JoinHandle<()>>,
}

impl Node {
    /// Opens the node's state and starts its reactor and link, on the
    /// io_uring backend over `opts.volume_path`.
    pub fn start(opts: NodeOptions) -> Result<Node, String> {
        standalone::check_not_standalone(&opts.data_dir)?;
        let backend = Self::open_backend(&opts)?;
        Self::start_with(opts, backend)
    }

    /// [`Node::start`] on a disk backend of the caller's choice (memory,
    /// fault injection); `opts.volume_path` and `opts.queue_depth` are then
    /// unused. The data directory must be formatted for the backend's size
    /// ([`format_with_size`]).
    pub fn start_on<B: Backend + 'static>(opts: NodeOptions, backend: B) -> Result<Node, String> {
        standalone::check_not_standalone(&opts.data_dir)?;
        Self::start_with(opts, backend)
    }

    fn start_with<B: Backend + 'static>(opts: NodeOptions, backend: B) -> Result<Node, String> {
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
            "ring recovered: {} records (seq {}..{}), torn tail {} bytes; {}",
            recovery.records,
            recovery.first_seq,
            recovery.next_seq,
            recovery.torn_tail_bytes,
            ring.location()
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
            pool: IoBufPool::new(opts.buffer_pool_bytes, opts.max_io_bytes as usize),
            load: netreactor::Load::default(),
            reactor_thread: reactor_thread_name(opts.node_id),
            core_id: opts.core_id,
        });
        let link = LinkManager::start(
            opts.link.clone(),
            opts.max_message_bytes,
            opts.poll_mode == PollMode::Busy,
        )
        .map_err(|e| e.to_string())?;
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
            .name(reactor_thread_name(opts.node_id))
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
                keep_space: opts.keep_volume_space,
                submit_hold_us: opts.disk_submit_hold_us,
                hand_over: opts.disk_hand_over,
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
        Self::start_standalone_on(opts, backend)
    }

    /// [`Node::start_standalone`] on a disk backend of the caller's choice.
    pub fn start_standalone_on<B: Backend + 'static>(
        opts: NodeOptions,
        backend: B,
    ) -> Result<Node, String> {
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
            pool: IoBufPool::new(opts.buffer_pool_bytes, opts.max_io_bytes as usize),
            load: netreactor::Load::default(),
            reactor_thread: reactor_thread_name(opts.node_id),
            core_id: opts.core_id,
        });
        let sh = shared.clone();
        let reactor = std::thread::Builder::new()
            .name(reactor_thread_name(opts.node_id))
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

/// Registers the node's pool with its backend's kernel queue; a failure is
/// logged once and leaves I/O on plain (unregistered) buffers. Returns
/// whether the pool is registered and how many registrations failed.
fn register_pool(backend: &mut impl Backend, pool: &IoBufPool) -> (bool, u64) {
    match backend.register_pool(pool) {
        Ok(true) => {
            log::info!(
                "buffer pool of {} bytes registered with the disk's io_uring (fixed-buffer I/O)",
                pool.total_bytes()
            );
            (true, 0)
        }
        Ok(false) => (false, 0),
        Err(e) => {
            log::warn!("{e}; disk I/O uses plain writes and reads");
            (false, 1)
        }
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
        stale_gate_ms: None,
        failover_id: 0,
    }
}
