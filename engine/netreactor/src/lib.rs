//! Connection reactors: a few threads, each owning one io_uring, that drive
//! every host connection of the node by its socket completions.
//!
//! A front-end accepts a connection and runs its login or negotiation on
//! whatever thread it likes, then hands the socket to [`Reactors::adopt`]
//! with a [`Conn`]: the protocol's state machine for the data phase. From
//! then on the connection belongs to one reactor thread. That thread's ring
//! receives into the connection's buffer; the reactor hands the bytes to
//! [`Conn::input`], which parses requests in place (with the protocol's pure
//! parser) and submits them to the volume without waiting; the volume's
//! completion callbacks queue their results in the connection and call
//! [`Waker::wake`]; the reactor then calls [`Conn::poll`], which encodes the
//! replies, and sends them from the same ring. No thread per connection, no
//! channel between a receive and its reply.
//!
//! Connections are spread over the reactors (the one with the fewest
//! connections takes the next), the way SPDK spreads qpairs over poll
//! groups. In adaptive mode a reactor that found no work for `spin_us`
//! sleeps inside `io_uring_enter` (wait for one completion, with a timeout):
//! a socket completion, or a read posted on the reactor's eventfd that a
//! waker writes, ends the sleep. There is no separate poll(2).
//!
//! Architecture invariants:
//! - A buffer handed to the kernel (a connection's receive or send buffer)
//!   is neither moved nor freed until its completion is reaped: a
//!   connection's slot is freed only when no operation of it is in flight.
//! - A connection that misbehaves (garbage, a byte per second, never reading
//!   its replies) costs its reactor only its own completions: nothing on a
//!   reactor blocks.
//! - Memory is bounded: at most `max_connections_per_reactor` slots per
//!   reactor, a receive buffer that grows only to what [`Conn::input`] asks
//!   for (the protocol bounds that), and queues of fixed capacity.

use std::io;
use std::net::{Shutdown, TcpStream};
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use io_uring::{opcode, types, IoUring};
pub use volume::{IoBuf, SharedBuf};

/// Bytes a connection's receive buffer starts with.
pub const RECV_BUFFER_BYTES: usize = 64 * 1024;

/// Microseconds an adaptive reactor keeps polling after its last work
/// before it sleeps: a node's `reactor.adaptive_spin_us` and `dm-nvme
/// serve-mem --spin-us` by default. Long enough to span the gap between a
/// request's disk or link operation and its next step (a QD32 round on a
/// 2-core VM's disk took 150–400 µs, a mirrored QD1 write 340–380 µs end to
/// end), so a loaded reactor does not pay a wake-up (an interrupt and a
/// scheduler pass, several µs to tens of µs in a VM) on every round; while
/// it polls it yields the core (see [`Idle`]). docs/performance.md has the
/// measurements.
pub const DEFAULT_ADAPTIVE_SPIN_US: u64 = 500;

/// What a reactor does after a pass that found no work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Idle {
    /// `busy` mode: poll again at once; the core is the reactor's alone.
    Spin,
    /// `adaptive` mode within its spin: let any other thread that is ready
    /// to run on this core run first (`sched_yield`), then poll again. The
    /// spin costs the core's other threads nothing: with nothing else
    /// ready the yield returns at once.
    Yield,
    /// `adaptive` mode past its spin: sleep until work arrives.
    Sleep,
}

impl Idle {
    /// The step for a reactor in `busy` mode or not, `since_work` after
    /// its last work, that spins `spin` in adaptive mode.
    pub fn after(busy: bool, since_work: Duration, spin: Duration) -> Idle {
        if busy {
            Idle::Spin
        } else if since_work < spin {
            Idle::Yield
        } else {
            Idle::Sleep
        }
    }

    /// Spins or yields once; false (nothing done) for [`Idle::Sleep`].
    pub fn pause(self) -> bool {
        match self {
            Idle::Spin => std::hint::spin_loop(),
            Idle::Yield => std::thread::yield_now(),
            Idle::Sleep => return false,
        }
        true
    }
}

/// Where a reactor thread's time went since it started: passes that found
/// work (parsing, submitting, completing, sending, with the system calls
/// they made) are busy; passes that found none, with the yields and sleeps
/// after them, are idle. SPDK reports the same split per reactor (busy and
/// idle ticks). Busy time over the I/Os it served is the reactor's cost
/// per I/O, so `1 s / that` is the most I/Os a second one reactor core
/// could serve at that cost (the bench's reactor-ceiling rows).
#[derive(Debug, Default)]
pub struct Load {
    busy_ns: AtomicU64,
    idle_ns: AtomicU64,
}

impl Load {
    pub fn busy_ns(&self) -> u64 {
        self.busy_ns.load(Ordering::Relaxed)
    }

    pub fn idle_ns(&self) -> u64 {
        self.idle_ns.load(Ordering::Relaxed)
    }

    /// Adds `ns` to busy or idle. Only the reactor's own thread charges its
    /// load: a plain load and store, no read-modify-write.
    fn charge(&self, busy: bool, ns: u64) {
        let c = if busy { &self.busy_ns } else { &self.idle_ns };
        c.store(c.load(Ordering::Relaxed) + ns, Ordering::Relaxed);
    }
}

/// Times the passes of one reactor loop into a [`Load`], with one clock
/// read per pass: at the start of a pass, the time since the previous one
/// began is charged to busy or idle by whether that pass found work.
#[derive(Debug)]
pub struct PassClock {
    last: Instant,
}

impl PassClock {
    pub fn new() -> PassClock {
        PassClock {
            last: Instant::now(),
        }
    }

    /// Starts a pass: charges the time since the previous pass began (with
    /// its yield or sleep, if it had one) to busy if that pass found work
    /// (`prev_did`), else to idle; returns the time now.
    pub fn pass(&mut self, prev_did: bool, load: &Load) -> Instant {
        let now = Instant::now();
        load.charge(prev_did, now.duration_since(self.last).as_nanos() as u64);
        self.last = now;
        now
    }
}

impl Default for PassClock {
    fn default() -> PassClock {
        PassClock::new()
    }
}

/// How long a sleeping reactor waits in `io_uring_enter` before it looks at
/// its stop flag again even without a wake-up.
const SLEEP_TIMEOUT_MS: u64 = 100;

/// What [`Conn::input`] did with the bytes it was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Input {
    /// Bytes at the start of the input that are used up.
    pub consumed: usize,
    /// The least number of unconsumed bytes the connection needs before it
    /// can make progress (e.g. a whole write payload); 0 if any will do.
    pub need: usize,
}

/// A connection's protocol state machine for its data phase. Every method
/// runs on the connection's reactor thread and must not block.
pub trait Conn: Send {
    /// Parses and submits the requests `input` holds (bytes received and not
    /// yet consumed, oldest first) and appends any replies it can give at
    /// once (refusals) to `out`.
    fn input(&mut self, input: &[u8], out: &mut Outbox) -> Input;
    /// Takes the completions that arrived since the last call (the
    /// connection's [`Waker`] was woken) and appends their replies to `out`.
    fn poll(&mut self, out: &mut Outbox);
    /// May the reactor hand it more input now? False while too much is in
    /// flight: the reactor then stops receiving (TCP pushes back).
    fn wants_input(&self) -> bool;
    /// The protocol has ended (disconnect, violation): receive no more,
    /// send what is queued and close once [`Conn::quiescent`].
    fn closing(&self) -> bool;
    /// Nothing submitted is still unanswered.
    fn quiescent(&self) -> bool;
    /// The server is stopping: close at once.
    fn aborted(&self) -> bool;
    /// The connection is gone (`why` says how); called once, last.
    fn closed(&mut self, why: &str);
    /// After [`Conn::input`] consumed everything it was given: a payload
    /// buffer whose unfilled rest (`buf[at..]`) the next bytes of the stream
    /// belong in. The reactor receives them straight into it (no copy) and
    /// gives it back through [`Conn::payload_received`] once full. `None`:
    /// the next bytes go to the connection's receive buffer as usual.
    fn take_payload_target(&mut self) -> Option<RxBuf> {
        None
    }
    /// The buffer from [`Conn::take_payload_target`], now full.
    fn payload_received(&mut self, _buf: RxBuf, _out: &mut Outbox) {}
    /// At most this many bytes go to the connection's receive buffer per
    /// receive, counting those it holds unconsumed (e.g. one request
    /// header, so that a payload that follows is not received there but
    /// straight into its own buffer), or more if [`Input::need`] asks for
    /// more. With a payload target posted, 0 is allowed (receive only the
    /// payload). Default: no limit.
    fn receive_limit(&self) -> usize {
        usize::MAX
    }
    /// Waiting for a resource that comes back without a wake-up (a payload
    /// buffer from the volume's pool): the reactor receives nothing more
    /// for it and drives it again at its next pass or, asleep, within
    /// [`STALL_RETRY`].
    fn stalled(&self) -> bool {
        false
    }
}

/// How soon a sleeping reactor drives a [`Conn::stalled`] connection again.
pub const STALL_RETRY: Duration = Duration::from_millis(1);

/// A payload buffer handed to the reactor to receive into: `buf[..at]` is
/// filled, `buf[at..]` is what the stream's next bytes fill.
#[derive(Debug)]
pub struct RxBuf {
    pub buf: IoBuf,
    pub at: usize,
}

impl RxBuf {
    /// Copies what `src` holds of the rest of the buffer (payload bytes that
    /// came in the same receive as their header), counts them in `copied`,
    /// and returns how many bytes of `src` it took.
    pub fn fill_from(&mut self, src: &[u8], copied: &AtomicU64) -> usize {
        let n = (self.buf.len() - self.at).min(src.len());
        self.buf[self.at..self.at + n].copy_from_slice(&src[..n]);
        self.at += n;
        copied.fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    /// Every byte of the buffer is in.
    pub fn is_full(&self) -> bool {
        self.at == self.buf.len()
    }
}

/// Default of [`RxMode`]'s threshold (`reactor.zero_copy_receive_min_bytes`):
/// a write whose data in one PDU is below this is received in bulk and
/// copied once; at or above it, straight into its buffer. See
/// docs/performance.md for the measurement behind the value.
pub const DEFAULT_ZERO_COPY_RECEIVE_MIN_BYTES: usize = 64 * 1024;

/// How a connection receives a write's data, chosen per PDU: at or above
/// the threshold straight into the write's buffer (one receive per write:
/// the rest of its data and the next PDU header), below it in bulk (many
/// PDUs per receive into the connection's buffer) with the data copied
/// once into the write's buffer ([`RxBuf::fill_from`]). A memcpy of a few
/// KiB costs less than the receive round trip a zero-copy receive adds
/// per write; for large writes the copy costs more. SPDK's posix sock
/// layer makes the same choice.
///
/// A PDU's size is known only once its header is in, so the receive
/// that brings the next header is sized by the last PDU seen: header-only
/// after a write received zero-copy (the next is likely large too, and
/// then none of its data lands in the connection's buffer), in bulk after
/// anything else. A large write that arrives in a bulk receive has the
/// part that came with its header copied and the rest received zero-copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxMode {
    zero_copy_min: usize,
    header_only: bool,
}

impl RxMode {
    /// `zero_copy_min_bytes`: the threshold (0: every write's data is
    /// received zero-copy).
    pub fn new(zero_copy_min_bytes: usize) -> RxMode {
        RxMode {
            zero_copy_min: zero_copy_min_bytes,
            header_only: true,
        }
    }

    /// Is a PDU with `data_len` bytes of write data received straight into
    /// its buffer?
    pub fn zero_copy(&self, data_len: usize) -> bool {
        data_len >= self.zero_copy_min
    }

    /// A PDU header was parsed that carries or announces `data_len` bytes
    /// of write data (0: none, e.g. a read): sizes the next receives.
    pub fn saw(&mut self, data_len: usize) {
        self.header_only = data_len > 0 && self.zero_copy(data_len);
    }

    /// Receive one PDU header at a time (true) or in bulk.
    pub fn header_only(&self) -> bool {
        self.header_only
    }

    /// The threshold.
    pub fn zero_copy_min_bytes(&self) -> usize {
        self.zero_copy_min
    }
}

/// The most iovecs a connection's vectored send or receive hands the
/// kernel at once (the kernel's UIO_MAXIOV). A burst of 32 read replies
/// is 65 segments (a header run before each buffer, the last response
/// after them): with 64 the last response waited for the next send.
const MAX_IOV: usize = 1024;

/// Replies queued for a connection's socket: bytes, with buffers (read data)
/// spliced in between them by reference: a read's data is sent from the
/// buffer the volume filled, never copied here.
#[derive(Default)]
pub struct Outbox {
    bytes: Vec<u8>,
    spliced: Vec<Spliced>,
    spliced_bytes: usize,
}

/// `buf[start..end]`, to be sent after `bytes[..at]`.
struct Spliced {
    at: usize,
    buf: SharedBuf,
    start: usize,
    end: usize,
}

impl Outbox {
    pub fn new() -> Outbox {
        Outbox::default()
    }

    /// Appends a copy of `b` (headers and other small replies).
    pub fn extend_from_slice(&mut self, b: &[u8]) {
        self.bytes.extend_from_slice(b);
    }

    /// The byte part, to encode into in place: append only (bytes already
    /// there may have buffers spliced after them).
    pub fn bytes_mut(&mut self) -> &mut Vec<u8> {
        &mut self.bytes
    }

    /// Appends a whole buffer by reference.
    pub fn push_buf(&mut self, buf: IoBuf) {
        let len = buf.len();
        self.push_shared(&buf.share(), 0..len);
    }

    /// Appends `buf[range]` by reference (a clone of the handle, not of the
    /// bytes): the buffer is dropped once the send completed.
    ///
    /// # Panics
    /// If `range` is not within the buffer (a caller bug).
    pub fn push_shared(&mut self, buf: &SharedBuf, range: Range<usize>) {
        assert!(
            range.start <= range.end && range.end <= buf.len(),
            "Outbox::push_shared: range {range:?} outside a {}-byte buffer",
            buf.len()
        );
        if range.is_empty() {
            return;
        }
        self.spliced_bytes += range.len();
        self.spliced.push(Spliced {
            at: self.bytes.len(),
            buf: buf.clone(),
            start: range.start,
            end: range.end,
        });
    }

    /// Moves everything `other` holds to the end of this one (its buffers
    /// by reference).
    pub fn append(&mut self, other: Outbox) {
        let base = self.bytes.len();
        self.bytes.extend_from_slice(&other.bytes);
        self.spliced_bytes += other.spliced_bytes;
        self.spliced
            .extend(other.spliced.into_iter().map(|s| Spliced {
                at: base + s.at,
                ..s
            }));
    }

    /// Bytes queued, spliced buffers included.
    pub fn len(&self) -> usize {
        self.bytes.len() + self.spliced_bytes
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes queued by reference (read data).
    pub fn spliced_bytes(&self) -> usize {
        self.spliced_bytes
    }

    pub fn clear(&mut self) {
        self.bytes.clear();
        self.spliced.clear();
        self.spliced_bytes = 0;
    }

    /// The queued bytes in order, as slices (for a plain stream: write
    /// each; the byte-buffer drivers of tests and fuzzers).
    pub fn segments(&self) -> impl Iterator<Item = &[u8]> {
        let mut prev = 0;
        let tail = self.spliced.last().map_or(0, |s| s.at);
        self.spliced
            .iter()
            .flat_map(move |s| {
                let before = &self.bytes[prev..s.at];
                prev = s.at;
                [before, &s.buf[s.start..s.end]]
            })
            .chain(std::iter::once(&self.bytes[tail..]))
            .filter(|b| !b.is_empty())
    }

    /// Everything queued, copied into one vector (tests, fuzzers).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len());
        for seg in self.segments() {
            v.extend_from_slice(seg);
        }
        v
    }
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("len", &self.len())
            .field("spliced_bytes", &self.spliced_bytes)
            .finish()
    }
}

struct WakerInner {
    shared: Arc<Shared>,
    slot: usize,
    queued: AtomicBool,
}

/// Wakes a connection's reactor so that it calls [`Conn::poll`]. Clone it
/// into completion callbacks; cheap when the reactor is awake (one queue
/// push, deduplicated), one eventfd write when it sleeps.
#[derive(Clone)]
pub struct Waker(Option<Arc<WakerInner>>);

impl Waker {
    /// A waker that does nothing: for connections driven by a caller that
    /// polls on its own (byte-buffer tests, fuzzers).
    pub fn noop() -> Waker {
        Waker(None)
    }

    pub fn wake(&self) {
        let Some(w) = &self.0 else { return };
        if w.queued.swap(true, Ordering::AcqRel) {
            return;
        }
        if w.shared.ready.push(w.slot).is_err() {
            // Stale wakers of closed connections can fill the queue; the
            // reactor then looks at every connection.
            w.shared.ready_overflow.store(true, Ordering::Release);
        }
        w.shared.wake();
    }
}

struct Incoming {
    stream: TcpStream,
    initial: Vec<u8>,
    make: MakeConn,
}

type MakeConn = Box<dyn FnOnce(Waker) -> Box<dyn Conn> + Send>;

/// What other threads share with one reactor.
struct Shared {
    incoming: ArrayQueue<Incoming>,
    ready: ArrayQueue<usize>,
    ready_overflow: AtomicBool,
    sleeping: AtomicBool,
    wake_fd: OwnedFd,
    stop: AtomicBool,
    /// Connections this reactor holds (or has been handed).
    conns: AtomicUsize,
    /// Times the reactor slept in io_uring_enter, and eventfd wake-ups
    /// other threads issued: the cost of sleeping.
    sleeps: AtomicU64,
    wakes: AtomicU64,
    /// Busy and idle time of the reactor's own thread (none for a hosted
    /// reactor: its host's loop accounts for it).
    load: Load,
    /// The reactor's loop ended and every connection of it is closed.
    finished: AtomicBool,
}

impl Shared {
    fn wake(&self) {
        if self.sleeping.swap(false, Ordering::SeqCst) {
            self.wakes.fetch_add(1, Ordering::Relaxed);
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live local u64 to our eventfd;
            // the result is ignored on purpose (the counter cannot
            // overflow in practice, and a failed wake-up is bounded by the
            // reactor's sleep timeout).
            unsafe {
                libc::write(
                    self.wake_fd.as_raw_fd(),
                    &one as *const u64 as *const libc::c_void,
                    8,
                );
            }
        }
    }
}

/// Settings of a set of reactors.
#[derive(Clone, Debug)]
pub struct ReactorConfig {
    /// Thread name prefix (`<name>-<i>`).
    pub name: String,
    /// Number of reactor threads.
    pub threads: usize,
    /// CPU ids to pin reactor i to (`cores[i % len]`); empty: not pinned.
    pub cores: Vec<usize>,
    /// Spin forever (true) or sleep after `spin_us` without work.
    pub busy: bool,
    pub spin_us: u64,
    /// Connections one reactor holds at most.
    pub max_connections_per_reactor: usize,
}

impl ReactorConfig {
    /// One adaptive, unpinned reactor: for tests and single-target tools.
    pub fn single(name: &str) -> ReactorConfig {
        ReactorConfig {
            name: name.into(),
            threads: 1,
            cores: Vec::new(),
            busy: false,
            spin_us: 0,
            max_connections_per_reactor: 256,
        }
    }
}

/// Counters of one reactor, for status and the bench.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReactorStats {
    /// Its thread's name (`ReactorConfig::name`-i); a hosted reactor runs
    /// in its host's thread instead.
    pub thread: String,
    pub connections: usize,
    pub sleeps: u64,
    pub wakes: u64,
    /// The core the reactor's thread is pinned to, if any.
    pub core: Option<usize>,
    /// Driven by another poll loop, which accounts for its time (then
    /// `busy_ns` and `idle_ns` are 0).
    pub hosted: bool,
    /// [`Load`] of the reactor's thread.
    pub busy_ns: u64,
    pub idle_ns: u64,
}

/// The name of reactor `i`'s thread in a set named `name`.
fn thread_name(name: &str, i: usize) -> String {
    format!("{name}-{i}")
}

/// The core reactor `i` is pinned to: `cores[i % len]`, none if `cores`
/// is empty.
fn core_of(cores: &[usize], i: usize) -> Option<usize> {
    (!cores.is_empty()).then(|| cores[i % cores.len()])
}

/// A running set of reactor threads.
pub struct Reactors {
    shared: Vec<Arc<Shared>>,
    /// `ReactorConfig::name` and `cores`: reactor i's thread is
    /// [`thread_name`]`(name, i)`, pinned to [`core_of`]`(cores, i)`.
    name: String,
    cores: Vec<usize>,
    /// Reactor 0 is driven by another poll loop ([`Reactors::start_hosted`]).
    hosted_first: bool,
    threads: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl Reactors {
    /// Starts `cfg.threads` reactor threads.
    pub fn start(cfg: &ReactorConfig) -> io::Result<Arc<Reactors>> {
        Ok(Self::start_inner(cfg, false)?.0)
    }

    /// Like [`Reactors::start`], but reactor 0 gets no thread: it is
    /// returned as a [`Hosted`] for another poll loop (the mirror reactor)
    /// to drive, so that its connections run on that loop's thread.
    pub fn start_hosted(cfg: &ReactorConfig) -> io::Result<(Arc<Reactors>, Hosted)> {
        let (r, hosted) = Self::start_inner(cfg, true)?;
        Ok((r, hosted.expect("reactor 0 is hosted")))
    }

    fn start_inner(
        cfg: &ReactorConfig,
        host_first: bool,
    ) -> io::Result<(Arc<Reactors>, Option<Hosted>)> {
        if cfg.threads == 0 || cfg.max_connections_per_reactor == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "netreactor: threads and max_connections_per_reactor must be at least 1",
            ));
        }
        let mut shared = Vec::new();
        let mut threads = Vec::new();
        let mut hosted = None;
        for i in 0..cfg.threads {
            let mut r = Reactor::new(cfg)?;
            shared.push(r.shared.clone());
            if i == 0 && host_first {
                hosted = Some(Hosted {
                    r,
                    stop_since: None,
                    finished: false,
                });
                continue;
            }
            let core = core_of(&cfg.cores, i);
            let t = std::thread::Builder::new()
                .name(thread_name(&cfg.name, i))
                .spawn(move || {
                    if let Some(id) = core {
                        if !core_affinity::set_for_current(core_affinity::CoreId { id }) {
                            log::warn!("netreactor: could not pin reactor {i} to core {id}");
                        }
                    }
                    r.run();
                })?;
            threads.push(t);
        }
        let r = Arc::new(Reactors {
            shared,
            name: cfg.name.clone(),
            cores: cfg.cores.clone(),
            hosted_first: host_first,
            threads: std::sync::Mutex::new(threads),
        });
        Ok((r, hosted))
    }

    /// Hands a connection to the reactor with the fewest: `initial` is what
    /// the login/negotiation already read past its end, `make` builds the
    /// state machine once the connection has its waker. On failure (every
    /// reactor full, or stopped) the stream is given back.
    pub fn adopt(
        &self,
        stream: TcpStream,
        initial: Vec<u8>,
        make: MakeConn,
    ) -> Result<(), TcpStream> {
        let sh = self
            .shared
            .iter()
            .filter(|s| !s.stop.load(Ordering::Acquire))
            .min_by_key(|s| s.conns.load(Ordering::Acquire));
        let Some(sh) = sh else { return Err(stream) };
        // Replies go out as they complete, often smaller than a segment
        // while earlier ones are unacknowledged: Nagle would hold each one
        // back until the host's ACK came.
        if let Err(e) = stream.set_nodelay(true) {
            log::debug!("TCP_NODELAY on an adopted connection failed: {e}");
        }
        let cap = sh.incoming.capacity();
        if sh.conns.fetch_add(1, Ordering::AcqRel) >= cap {
            sh.conns.fetch_sub(1, Ordering::AcqRel);
            return Err(stream);
        }
        if let Err(inc) = sh.incoming.push(Incoming {
            stream,
            initial,
            make,
        }) {
            sh.conns.fetch_sub(1, Ordering::AcqRel);
            return Err(inc.stream);
        }
        sh.wake();
        Ok(())
    }

    /// Makes every reactor look at every connection (e.g. after a server
    /// set the stop flag its connections report as [`Conn::aborted`]).
    pub fn kick(&self) {
        for sh in &self.shared {
            sh.ready_overflow.store(true, Ordering::Release);
            sh.wake();
        }
    }

    /// Connections held, over all reactors.
    pub fn connections(&self) -> usize {
        self.shared
            .iter()
            .map(|s| s.conns.load(Ordering::Acquire))
            .sum()
    }

    pub fn stats(&self) -> Vec<ReactorStats> {
        self.shared
            .iter()
            .enumerate()
            .map(|(i, s)| ReactorStats {
                connections: s.conns.load(Ordering::Acquire),
                sleeps: s.sleeps.load(Ordering::Relaxed),
                wakes: s.wakes.load(Ordering::Relaxed),
                core: core_of(&self.cores, i),
                thread: thread_name(&self.name, i),
                hosted: self.hosted_first && i == 0,
                busy_ns: s.load.busy_ns(),
                idle_ns: s.load.idle_ns(),
            })
            .collect()
    }

    /// Closes every connection and joins the threads.
    pub fn shutdown(&self) {
        for sh in &self.shared {
            sh.stop.store(true, Ordering::Release);
            sh.sleeping.store(true, Ordering::SeqCst);
            sh.wake();
        }
        let threads: Vec<_> = self
            .threads
            .lock()
            .map(|mut t| t.drain(..).collect())
            .unwrap_or_default();
        for t in threads {
            let _ = t.join();
        }
        // A hosted reactor finishes on its host's thread.
        let deadline = Instant::now() + Duration::from_secs(5);
        while self
            .shared
            .iter()
            .any(|s| !s.finished.load(Ordering::Acquire))
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for Reactors {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A reactor without a thread of its own, driven by another poll loop (the
/// mirror reactor's): its connections' requests reach the mirror without a
/// thread hop, and their completions are sent from that same thread.
pub struct Hosted {
    r: Reactor,
    stop_since: Option<Instant>,
    finished: bool,
}

impl Hosted {
    /// One pass over the reactor's work; whether anything happened.
    pub fn poll(&mut self) -> bool {
        if self.finished {
            return false;
        }
        let did = self.r.iteration();
        if self.r.stopping(&mut self.stop_since) {
            self.finished = true;
            self.r.finish();
        }
        did
    }

    /// Before the host sleeps: the fd to add to its poll(2) set (the
    /// io_uring, readable once a completion, a wake-up included, is
    /// queued), or None if work is pending and the host must not sleep.
    pub fn prepare_sleep(&mut self) -> Option<RawFd> {
        if self.finished {
            return Some(self.r.shared.wake_fd.as_raw_fd());
        }
        if self.r.prepare_sleep() {
            self.r.shared.sleeps.fetch_add(1, Ordering::Relaxed);
            Some(self.r.ring.as_raw_fd())
        } else {
            None
        }
    }

    /// After the host's sleep.
    pub fn woke(&mut self) {
        self.r.shared.sleeping.store(false, Ordering::SeqCst);
    }
}

impl Drop for Hosted {
    /// The host stops: close the connections before their buffers go.
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        self.r.shared.stop.store(true, Ordering::Release);
        while !self.r.stopping(&mut self.stop_since) {
            self.r.iteration();
            std::thread::sleep(Duration::from_micros(100));
        }
        self.r.finish();
    }
}

/// One connection on a reactor.
struct Slot {
    stream: TcpStream,
    conn: Box<dyn Conn>,
    waker: Arc<WakerInner>,
    /// Received bytes live in `rx[lo..hi]`; the kernel receives into
    /// `rx[hi..]`. Never resized while a receive is posted.
    rx: Vec<u8>,
    lo: usize,
    hi: usize,
    need: usize,
    recv_posted: bool,
    /// The payload buffer the next bytes are received into, ahead of
    /// `rx[hi..]` (see [`Conn::take_payload_target`]); held here, not moved
    /// or dropped, while a receive is posted.
    target: Option<RxBuf>,
    rx_msg: MsgHdr,
    /// Bytes being sent (`tx`, from byte `tx_off` on); never touched while a
    /// send is posted. Replies produced meanwhile collect in `out`.
    tx: Outbox,
    tx_off: usize,
    send_posted: bool,
    tx_msg: MsgHdr,
    out: Outbox,
    /// The peer closed, or the socket failed.
    eof: Option<String>,
    shut: bool,
}

/// A `msghdr` and its iovecs for a vectored send or receive; it lives in
/// the (boxed) slot, so its address is stable while the operation is
/// posted, and it is rebuilt only when none is.
struct MsgHdr {
    msg: libc::msghdr,
    iov: Vec<libc::iovec>,
}

// SAFETY: the raw pointers point into buffers of the same slot, and only
// the reactor thread that owns the slot touches them.
unsafe impl Send for MsgHdr {}

impl MsgHdr {
    fn new() -> MsgHdr {
        MsgHdr {
            // SAFETY: an all-zero msghdr is valid (no name, no iovecs, no
            // control data).
            msg: unsafe { std::mem::zeroed() },
            iov: Vec::new(),
        }
    }

    /// Points the header at `segs` (at most [`MAX_IOV`] of them).
    fn set(&mut self, segs: impl Iterator<Item = (*mut u8, usize)>) -> *mut libc::msghdr {
        self.iov.clear();
        for (base, len) in segs.take(MAX_IOV) {
            self.iov.push(libc::iovec {
                iov_base: base as *mut libc::c_void,
                iov_len: len,
            });
        }
        self.msg.msg_iov = self.iov.as_mut_ptr();
        self.msg.msg_iovlen = self.iov.len() as _;
        &mut self.msg
    }
}

const OP_RECV: u64 = 0;
const OP_SEND: u64 = 1;
const WAKE_TAG: u64 = u64::MAX;
const TICK_TAG: u64 = u64::MAX - 1;

struct Reactor {
    ring: IoUring,
    shared: Arc<Shared>,
    slots: Vec<Option<Box<Slot>>>,
    dirty: Vec<usize>,
    /// Completions taken in one pass (kept for reuse).
    cqes: Vec<(u64, i32)>,
    is_dirty: Vec<bool>,
    /// The eventfd read's target; boxed so its address is stable.
    wake_buf: Box<u64>,
    wake_posted: bool,
    /// Connections that reported [`Conn::stalled`], driven again at the
    /// next pass; while any is, a sleep ends after [`STALL_RETRY`].
    stalled: Vec<usize>,
    is_stalled: Vec<bool>,
    tick: Box<types::Timespec>,
    tick_posted: bool,
    busy: bool,
    spin: Duration,
}

impl Reactor {
    fn new(cfg: &ReactorConfig) -> io::Result<Reactor> {
        // SAFETY: eventfd takes no pointers; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let wake_fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let max = cfg.max_connections_per_reactor;
        let shared = Arc::new(Shared {
            incoming: ArrayQueue::new(max),
            ready: ArrayQueue::new(2 * max),
            ready_overflow: AtomicBool::new(false),
            sleeping: AtomicBool::new(false),
            wake_fd,
            stop: AtomicBool::new(false),
            conns: AtomicUsize::new(0),
            sleeps: AtomicU64::new(0),
            wakes: AtomicU64::new(0),
            load: Load::default(),
            finished: AtomicBool::new(false),
        });
        Ok(Reactor {
            // Completions are posted when this thread next enters the
            // kernel, not by interrupting it (the pass checks the ring's
            // task-run flag): no inter-processor interrupt per completion
            // while the reactor spins. A plain ring before Linux 5.19.
            ring: {
                let entries = (2 * max as u32 + 8).next_power_of_two();
                IoUring::builder()
                    .setup_coop_taskrun()
                    .setup_taskrun_flag()
                    .build(entries)
                    .or_else(|_| IoUring::new(entries))?
            },
            shared,
            slots: (0..max).map(|_| None).collect(),
            dirty: Vec::new(),
            cqes: Vec::new(),
            is_dirty: vec![false; max],
            wake_buf: Box::new(0),
            wake_posted: false,
            stalled: Vec::new(),
            is_stalled: vec![false; max],
            tick: Box::new(types::Timespec::from(STALL_RETRY)),
            tick_posted: false,
            busy: cfg.busy,
            spin: Duration::from_micros(cfg.spin_us),
        })
    }

    fn run(&mut self) {
        let mut last_work = Instant::now();
        let mut stop_since: Option<Instant> = None;
        let mut clock = PassClock::new();
        let mut did = false;
        loop {
            let now = clock.pass(did, &self.shared.load);
            did = self.iteration();
            if self.stopping(&mut stop_since) {
                break;
            }
            if did {
                last_work = now;
                continue;
            }
            if Idle::after(self.busy, now.duration_since(last_work), self.spin).pause() {
                continue;
            }
            if self.prepare_sleep() {
                self.shared.sleeps.fetch_add(1, Ordering::Relaxed);
                let ts = types::Timespec::from(Duration::from_millis(SLEEP_TIMEOUT_MS));
                let args = types::SubmitArgs::new().timespec(&ts);
                match self.ring.submitter().submit_with_args(1, &args) {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                    Err(e) => log::warn!("netreactor: io_uring_enter failed: {e}"),
                }
            }
            self.shared.sleeping.store(false, Ordering::SeqCst);
            last_work = Instant::now() - self.spin;
        }
        self.finish();
    }

    /// On stop: closes every connection; true once all are gone (or after
    /// 5 s, when the rest are leaked rather than freed under the kernel).
    fn stopping(&mut self, since: &mut Option<Instant>) -> bool {
        if !self.shared.stop.load(Ordering::Acquire) {
            return false;
        }
        let since = *since.get_or_insert_with(Instant::now);
        self.abort_all();
        if self.slots.iter().all(|s| s.is_none()) {
            return true;
        }
        if since.elapsed() > Duration::from_secs(5) {
            log::error!("netreactor: connections did not close within 5 s; leaking them");
            for s in self.slots.iter_mut() {
                std::mem::forget(s.take());
            }
            return true;
        }
        false
    }

    fn finish(&mut self) {
        if self.wake_posted {
            // The eventfd read stays posted; `wake_buf` is leaked with it
            // so that its late completion cannot write freed memory.
            std::mem::forget(std::mem::replace(&mut self.wake_buf, Box::new(0)));
            self.wake_posted = false;
        }
        if self.tick_posted {
            // Likewise the stall retry's timespec.
            let zero = types::Timespec::new();
            std::mem::forget(std::mem::replace(&mut self.tick, Box::new(zero)));
            self.tick_posted = false;
        }
        self.shared.finished.store(true, Ordering::Release);
    }

    /// Posts the wake-up read and announces the sleep; false if work
    /// arrived meanwhile (then the caller must not sleep).
    fn prepare_sleep(&mut self) -> bool {
        self.post_wake_read();
        if !self.stalled.is_empty() && !self.tick_posted {
            let ts: *const types::Timespec = &*self.tick;
            self.push(opcode::Timeout::new(ts).build().user_data(TICK_TAG));
            self.tick_posted = true;
        }
        if !self.ring.submission().is_empty() {
            if let Err(e) = self.ring.submit() {
                log::warn!("netreactor: io_uring submit failed: {e}");
            }
        }
        self.shared.sleeping.store(true, Ordering::SeqCst);
        // Work posted before `sleeping` was set did not write the eventfd.
        let idle = self.shared.ready.is_empty()
            && self.shared.incoming.is_empty()
            && !self.shared.ready_overflow.load(Ordering::Acquire)
            && !self.shared.stop.load(Ordering::Acquire)
            && self.ring.completion().is_empty()
            // Completions waiting for this thread to enter the kernel.
            && !self.ring.submission().taskrun();
        if !idle {
            self.shared.sleeping.store(false, Ordering::SeqCst);
        }
        idle
    }

    fn post_wake_read(&mut self) {
        if self.wake_posted {
            return;
        }
        let ptr: *mut u64 = &mut *self.wake_buf;
        let e = opcode::Read::new(
            types::Fd(self.shared.wake_fd.as_raw_fd()),
            ptr as *mut u8,
            8,
        )
        .build()
        .user_data(WAKE_TAG);
        self.push(e);
        self.wake_posted = true;
    }

    fn push(&mut self, e: io_uring::squeue::Entry) {
        loop {
            // SAFETY: every entry pushed here points at memory that stays
            // valid until its completion is reaped: a slot's rx/tx buffers,
            // payload target and msghdrs (not moved or freed while posted,
            // see `Slot`), `wake_buf` or `tick`.
            if unsafe { self.ring.submission().push(&e) }.is_ok() {
                return;
            }
            if let Err(err) = self.ring.submit() {
                log::warn!("netreactor: io_uring submit failed: {err}");
            }
        }
    }

    fn mark(&mut self, i: usize) {
        if !self.is_dirty[i] {
            self.is_dirty[i] = true;
            self.dirty.push(i);
        }
    }

    /// One pass: new connections, completions, wake-ups; whether anything
    /// happened.
    fn iteration(&mut self) -> bool {
        let mut did = false;
        // Stalled connections try again (not counted as work: a reactor
        // with nothing else to do still sleeps, for at most STALL_RETRY).
        for i in std::mem::take(&mut self.stalled) {
            self.is_stalled[i] = false;
            self.mark(i);
        }
        while let Some(inc) = self.shared.incoming.pop() {
            did = true;
            self.add(inc);
        }
        if self.ring.completion().is_empty() && self.ring.submission().taskrun() {
            // Completions wait in the kernel for this thread to enter it.
            let _ = self.ring.submit();
        }
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        for &(tag, res) in &cqes {
            did = true;
            self.complete(tag, res);
        }
        cqes.clear();
        self.cqes = cqes;
        while let Some(i) = self.shared.ready.pop() {
            did = true;
            if let Some(Some(s)) = self.slots.get(i) {
                s.waker.queued.store(false, Ordering::Release);
            }
            self.mark(i);
        }
        if self.shared.ready_overflow.swap(false, Ordering::AcqRel) {
            did = true;
            for i in 0..self.slots.len() {
                if let Some(s) = &self.slots[i] {
                    s.waker.queued.store(false, Ordering::Release);
                    self.mark(i);
                }
            }
        }
        while let Some(i) = self.dirty.pop() {
            self.is_dirty[i] = false;
            self.drive(i);
        }
        if !self.ring.submission().is_empty() {
            if let Err(e) = self.ring.submit() {
                log::warn!("netreactor: io_uring submit failed: {e}");
            }
        }
        did
    }

    fn add(&mut self, inc: Incoming) {
        let Some(i) = self.slots.iter().position(|s| s.is_none()) else {
            // `adopt` counts before it queues, so this cannot happen.
            log::error!("netreactor: no free slot; closing the connection");
            self.shared.conns.fetch_sub(1, Ordering::AcqRel);
            return;
        };
        let waker = Arc::new(WakerInner {
            shared: self.shared.clone(),
            slot: i,
            queued: AtomicBool::new(false),
        });
        let conn = (inc.make)(Waker(Some(waker.clone())));
        let mut rx = vec![0u8; RECV_BUFFER_BYTES.max(inc.initial.len())];
        rx[..inc.initial.len()].copy_from_slice(&inc.initial);
        self.slots[i] = Some(Box::new(Slot {
            stream: inc.stream,
            conn,
            waker,
            hi: inc.initial.len(),
            rx,
            lo: 0,
            need: 0,
            recv_posted: false,
            target: None,
            rx_msg: MsgHdr::new(),
            tx: Outbox::new(),
            tx_off: 0,
            send_posted: false,
            tx_msg: MsgHdr::new(),
            out: Outbox::new(),
            eof: None,
            shut: false,
        }));
        self.mark(i);
    }

    fn complete(&mut self, tag: u64, res: i32) {
        if tag == WAKE_TAG {
            self.wake_posted = false;
            return;
        }
        if tag == TICK_TAG {
            self.tick_posted = false;
            return;
        }
        let (i, op) = ((tag >> 1) as usize, tag & 1);
        let Some(Some(s)) = self.slots.get_mut(i) else {
            log::error!("netreactor: completion for an empty slot {i}");
            return;
        };
        if op == OP_RECV {
            s.recv_posted = false;
            match res {
                n if n > 0 => {
                    let mut n = n as usize;
                    if let Some(t) = &mut s.target {
                        let k = n.min(t.buf.len() - t.at);
                        t.at += k;
                        n -= k;
                    }
                    s.hi += n;
                }
                0 => {
                    s.eof.get_or_insert_with(|| "closed by the peer".into());
                }
                e if e == -libc::EAGAIN || e == -libc::EINTR => {}
                e => {
                    s.eof
                        .get_or_insert_with(|| io::Error::from_raw_os_error(-e).to_string());
                }
            }
        } else {
            s.send_posted = false;
            match res {
                n if n >= 0 => {
                    s.tx_off += n as usize;
                    if s.tx_off >= s.tx.len() {
                        s.tx.clear();
                        s.tx_off = 0;
                    }
                }
                e if e == -libc::EAGAIN || e == -libc::EINTR => {}
                e => {
                    // Nothing more can be sent: drop what is queued.
                    s.eof
                        .get_or_insert_with(|| io::Error::from_raw_os_error(-e).to_string());
                    s.tx.clear();
                    s.tx_off = 0;
                    s.out.clear();
                }
            }
        }
        self.mark(i);
    }

    fn abort_all(&mut self) {
        for i in 0..self.slots.len() {
            if let Some(s) = &mut self.slots[i] {
                if !s.shut {
                    s.eof.get_or_insert_with(|| "reactor stopped".into());
                    s.out.clear();
                    let _ = s.stream.shutdown(Shutdown::Both);
                    s.shut = true;
                }
                self.mark(i);
            }
        }
        while let Some(i) = self.dirty.pop() {
            self.is_dirty[i] = false;
            self.drive(i);
        }
        if !self.ring.submission().is_empty() {
            let _ = self.ring.submit();
        }
    }

    /// Advances one connection: completions, input, send, receive, close.
    fn drive(&mut self, i: usize) {
        let stopping = self.shared.stop.load(Ordering::Acquire);
        let mut posts: Vec<io_uring::squeue::Entry> = Vec::new();
        let mut free = false;
        {
            let Some(s) = self.slots[i].as_deref_mut() else {
                return;
            };
            s.conn.poll(&mut s.out);
            // A payload target that is full goes back to the connection
            // before anything received after it.
            if !s.recv_posted && s.target.as_ref().is_some_and(|t| t.at >= t.buf.len()) {
                if let Some(t) = s.target.take() {
                    s.conn.payload_received(t, &mut s.out);
                }
            }
            // Feed what was received, as long as the connection takes it.
            // (Input received before the peer closed is still served.)
            while s.target.is_none()
                && s.lo < s.hi
                && s.hi - s.lo >= s.need
                && !s.conn.closing()
                && s.conn.wants_input()
            {
                let r = s.conn.input(&s.rx[s.lo..s.hi], &mut s.out);
                s.lo += r.consumed.min(s.hi - s.lo);
                s.need = r.need;
                s.conn.poll(&mut s.out);
                if r.consumed == 0 {
                    break;
                }
            }
            if s.lo == s.hi {
                s.lo = 0;
                s.hi = 0;
                if s.target.is_none() && !s.recv_posted {
                    s.target = s.conn.take_payload_target();
                }
            }
            let fd = s.stream.as_raw_fd();
            if !s.send_posted && s.tx.is_empty() && !s.out.is_empty() && !s.shut {
                std::mem::swap(&mut s.tx, &mut s.out);
            }
            if !s.send_posted && s.tx_off < s.tx.len() && !s.shut {
                if s.tx.spliced.is_empty() {
                    posts.push(send_entry(fd, &s.tx.bytes[s.tx_off..], i));
                } else {
                    let mut skip = s.tx_off;
                    let segs = s.tx.segments().filter_map(|seg| {
                        if skip >= seg.len() {
                            skip -= seg.len();
                            return None;
                        }
                        let rest = &seg[skip..];
                        skip = 0;
                        Some((rest.as_ptr() as *mut u8, rest.len()))
                    });
                    posts.push(sendmsg_entry(fd, s.tx_msg.set(segs), i));
                }
                s.send_posted = true;
            }
            let ending = stopping
                || s.conn.aborted()
                || (s.eof.is_some() || s.conn.closing())
                    && s.conn.quiescent()
                    && s.tx.is_empty()
                    && s.out.is_empty();
            let more = s.conn.wants_input() && !s.conn.stalled();
            if !s.recv_posted
                && !ending
                && s.eof.is_none()
                && !s.conn.closing()
                && (more || s.target.is_some())
            {
                // How much may go to the receive buffer: none while only a
                // payload is wanted, else up to the connection's limit.
                let mut rx_n = 0;
                if more {
                    make_room(s);
                    let want = s.conn.receive_limit().max(s.need);
                    let want = want.saturating_sub(s.hi - s.lo);
                    let floor = if s.target.is_some() { 0 } else { 1 };
                    rx_n = (s.rx.len() - s.hi).min(want.max(floor));
                }
                // (A lent target is never full: a full one went back above.)
                if let Some(t) = s.target.as_mut().filter(|t| t.at < t.buf.len()) {
                    let at = t.at;
                    let payload = &mut t.buf[at..];
                    let segs = [
                        (payload.as_mut_ptr(), payload.len()),
                        (s.rx[s.hi..].as_mut_ptr(), rx_n),
                    ];
                    let segs = segs.into_iter().filter(|&(_, n)| n > 0);
                    posts.push(recvmsg_entry(fd, s.rx_msg.set(segs), i));
                    s.recv_posted = true;
                } else if rx_n > 0 {
                    posts.push(recv_entry(fd, &mut s.rx[s.hi..s.hi + rx_n], i));
                    s.recv_posted = true;
                }
            }
            if ending {
                if !s.shut {
                    // Ends a posted receive or send (their completions
                    // come back with an error or 0).
                    let _ = s.stream.shutdown(Shutdown::Both);
                    s.shut = true;
                }
                free = !s.recv_posted && !s.send_posted;
            }
        }
        for e in posts {
            self.push(e);
        }
        if !free && !self.is_stalled[i] && self.slots[i].as_ref().is_some_and(|s| s.conn.stalled())
        {
            self.is_stalled[i] = true;
            self.stalled.push(i);
        }
        if free {
            if let Some(mut s) = self.slots[i].take() {
                let why = if s.conn.aborted() {
                    "closed by the server".to_string()
                } else if s.conn.closing() {
                    "closed by the protocol".to_string()
                } else {
                    s.eof.take().unwrap_or_default()
                };
                s.conn.closed(&why);
                self.shared.conns.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

/// Moves unconsumed bytes to the front and grows the buffer to what the
/// connection needs. Only called with no receive posted.
fn make_room(s: &mut Slot) {
    let have = s.hi - s.lo;
    let want = s.need.max(have + 1);
    if s.lo > 0 && (s.rx.len() - s.hi < 4096 || s.rx.len() - s.lo < want) {
        s.rx.copy_within(s.lo..s.hi, 0);
        s.lo = 0;
        s.hi = have;
    }
    if s.rx.len() - s.lo < want {
        s.rx.resize(s.lo + want, 0);
    } else if s.need <= RECV_BUFFER_BYTES && have == 0 && s.rx.len() > RECV_BUFFER_BYTES {
        // Give back a buffer grown for one large request.
        s.rx.truncate(RECV_BUFFER_BYTES);
        s.rx.shrink_to_fit();
    }
}

fn recv_entry(fd: RawFd, buf: &mut [u8], slot: usize) -> io_uring::squeue::Entry {
    opcode::Recv::new(types::Fd(fd), buf.as_mut_ptr(), buf.len() as u32)
        .build()
        .user_data(((slot as u64) << 1) | OP_RECV)
}

fn recvmsg_entry(fd: RawFd, msg: *mut libc::msghdr, slot: usize) -> io_uring::squeue::Entry {
    opcode::RecvMsg::new(types::Fd(fd), msg)
        .build()
        .user_data(((slot as u64) << 1) | OP_RECV)
}

fn sendmsg_entry(fd: RawFd, msg: *mut libc::msghdr, slot: usize) -> io_uring::squeue::Entry {
    opcode::SendMsg::new(types::Fd(fd), msg)
        .flags(libc::MSG_NOSIGNAL as u32)
        .build()
        .user_data(((slot as u64) << 1) | OP_SEND)
}

fn send_entry(fd: RawFd, buf: &[u8], slot: usize) -> io_uring::squeue::Entry {
    opcode::Send::new(types::Fd(fd), buf.as_ptr(), buf.len() as u32)
        .flags(libc::MSG_NOSIGNAL)
        .build()
        .user_data(((slot as u64) << 1) | OP_SEND)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;
    use std::sync::Mutex;

    /// Busy mode spins whatever the time; adaptive mode yields the core
    /// within its spin (never a bare spin, which would keep a client or the
    /// other node sharing the core from running) and sleeps after it.
    #[test]
    fn an_idle_reactor_spins_yields_or_sleeps_by_its_mode() {
        let spin = Duration::from_micros(DEFAULT_ADAPTIVE_SPIN_US);
        let us = Duration::from_micros;
        assert_eq!(Idle::after(true, us(0), spin), Idle::Spin);
        assert_eq!(Idle::after(true, us(10_000_000), spin), Idle::Spin);
        assert_eq!(Idle::after(false, us(0), spin), Idle::Yield);
        assert_eq!(Idle::after(false, spin - us(1), spin), Idle::Yield);
        assert_eq!(Idle::after(false, spin, spin), Idle::Sleep);
        assert_eq!(Idle::after(false, us(0), us(0)), Idle::Sleep);
        assert!(Idle::Spin.pause() && Idle::Yield.pause() && !Idle::Sleep.pause());
    }

    #[test]
    fn a_pass_is_charged_to_busy_or_idle_by_whether_it_found_work() {
        let load = Load::default();
        let mut clock = PassClock::new();
        let nap = || std::thread::sleep(Duration::from_millis(2));
        // Two passes that found nothing (the time before the first counts
        // as idle too): idle only.
        nap();
        clock.pass(false, &load);
        nap();
        clock.pass(false, &load);
        assert_eq!(load.busy_ns(), 0);
        let idle = load.idle_ns();
        assert!(idle >= 4_000_000, "{idle}");
        // The pass before this one found work: its time is busy only.
        nap();
        clock.pass(true, &load);
        assert_eq!(load.idle_ns(), idle);
        assert!(load.busy_ns() >= 2_000_000, "{}", load.busy_ns());
    }

    /// Answers every line with its upper-case copy, from another thread
    /// (as a volume's completion would), through the waker.
    struct Upper {
        waker: Waker,
        done: Arc<Mutex<Vec<u8>>>,
        inflight: usize,
        closed: Arc<AtomicBool>,
    }

    impl Conn for Upper {
        fn input(&mut self, input: &[u8], _out: &mut Outbox) -> Input {
            let Some(n) = input.iter().position(|&b| b == b'\n') else {
                return Input {
                    consumed: 0,
                    need: input.len() + 1,
                };
            };
            let line = input[..=n].to_ascii_uppercase();
            let (done, waker) = (self.done.clone(), self.waker.clone());
            self.inflight += 1;
            std::thread::spawn(move || {
                done.lock().unwrap().extend_from_slice(&line);
                waker.wake();
            });
            Input {
                consumed: n + 1,
                need: 0,
            }
        }
        fn poll(&mut self, out: &mut Outbox) {
            let mut d = self.done.lock().unwrap();
            self.inflight -= d.iter().filter(|&&b| b == b'\n').count();
            out.extend_from_slice(&d);
            d.clear();
        }
        fn wants_input(&self) -> bool {
            true
        }
        fn closing(&self) -> bool {
            false
        }
        fn quiescent(&self) -> bool {
            self.inflight == 0
        }
        fn aborted(&self) -> bool {
            false
        }
        fn closed(&mut self, _why: &str) {
            self.closed.store(true, Ordering::Release);
        }
    }

    #[test]
    fn an_outbox_keeps_bytes_and_spliced_buffers_in_order() {
        let buf = SharedBuf::from(b"0123456789".to_vec());
        let mut o = Outbox::new();
        o.extend_from_slice(b"<h1>");
        o.push_shared(&buf, 2..5);
        o.push_shared(&buf, 5..5);
        o.push_shared(&buf, 0..1);
        o.extend_from_slice(b"<h2>");
        let mut o2 = Outbox::new();
        o2.extend_from_slice(b"[");
        o2.push_buf(IoBuf::from_slice(b"xyz"));
        o2.extend_from_slice(b"]");
        o.append(o2);
        assert_eq!(o.to_vec(), b"<h1>2340<h2>[xyz]".to_vec());
        assert_eq!(o.len(), 17);
        assert_eq!(o.spliced_bytes(), 7);
        let segs: Vec<&[u8]> = o.segments().collect();
        assert_eq!(
            segs,
            [&b"<h1>"[..], b"234", b"0", b"<h2>[", b"xyz", b"]"].to_vec()
        );
        o.clear();
        assert!(o.is_empty() && o.segments().next().is_none());
    }

    #[test]
    fn rx_mode_receives_a_header_alone_only_after_a_zero_copy_write() {
        let mut m = RxMode::new(16 * 1024);
        assert!(m.header_only(), "the first header comes alone");
        assert!(!m.zero_copy(16 * 1024 - 1) && m.zero_copy(16 * 1024));
        m.saw(4096);
        assert!(!m.header_only(), "after a small write: in bulk");
        m.saw(128 * 1024);
        assert!(m.header_only(), "after a zero-copy write: one header");
        m.saw(0);
        assert!(!m.header_only(), "after a read: in bulk");
        // Threshold 0: every write zero-copy, as before the knob.
        let mut z = RxMode::new(0);
        assert!(z.zero_copy(1) && z.zero_copy(4096));
        z.saw(512);
        assert!(z.header_only());
        z.saw(0);
        assert!(!z.header_only());
        assert_eq!(z.zero_copy_min_bytes(), 0);
    }

    /// Answers each line with 300 spliced one-byte buffers around header
    /// bytes (more iovecs than one `sendmsg` used to take).
    struct Spliced300;

    impl Conn for Spliced300 {
        fn input(&mut self, input: &[u8], out: &mut Outbox) -> Input {
            let Some(n) = input.iter().position(|&b| b == b'\n') else {
                return Input {
                    consumed: 0,
                    need: input.len() + 1,
                };
            };
            let digits = SharedBuf::from(b"0123456789".to_vec());
            for i in 0..300 {
                out.extend_from_slice(b"<");
                out.push_shared(&digits, i % 10..i % 10 + 1);
            }
            out.extend_from_slice(b"\n");
            Input {
                consumed: n + 1,
                need: 0,
            }
        }
        fn poll(&mut self, _out: &mut Outbox) {}
        fn wants_input(&self) -> bool {
            true
        }
        fn closing(&self) -> bool {
            false
        }
        fn quiescent(&self) -> bool {
            true
        }
        fn aborted(&self) -> bool {
            false
        }
        fn closed(&mut self, _why: &str) {}
    }

    #[test]
    fn a_reply_of_hundreds_of_spliced_buffers_arrives_whole_and_in_order() {
        let r = Reactors::start(&ReactorConfig::single("test-iov")).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        r.adopt(
            s,
            Vec::new(),
            Box::new(|_| Box::new(Spliced300) as Box<dyn Conn>),
        )
        .map_err(|_| ())
        .unwrap();
        let want: Vec<u8> = (0..300)
            .flat_map(|i| [b'<', b'0' + (i % 10) as u8])
            .chain([b'\n'])
            .collect();
        for _ in 0..3 {
            c.write_all(b"go\n").unwrap();
            let mut got = vec![0u8; want.len()];
            c.read_exact(&mut got).unwrap();
            assert_eq!(got, want);
        }
        drop(c);
        r.shutdown();
    }

    #[test]
    fn completions_from_other_threads_wake_a_sleeping_reactor() {
        let r = Reactors::start(&ReactorConfig::single("test-reactor")).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let probe = s.try_clone().unwrap();
        assert!(!probe.nodelay().unwrap());
        let closed = Arc::new(AtomicBool::new(false));
        let closed2 = closed.clone();
        r.adopt(
            s,
            b"hel".to_vec(),
            Box::new(move |waker| {
                Box::new(Upper {
                    waker,
                    done: Arc::default(),
                    inflight: 0,
                    closed: closed2,
                }) as Box<dyn Conn>
            }),
        )
        .map_err(|_| ())
        .unwrap();
        // Replies are not held back for the host's ACK (Nagle).
        assert!(probe.nodelay().unwrap());
        drop(probe);
        let mut got = vec![0u8; 6];
        for (i, part) in [&b"lo\nwor"[..], b"ld\n"].iter().enumerate() {
            // Let the reactor fall asleep between the two.
            std::thread::sleep(Duration::from_millis(20));
            c.write_all(part).unwrap();
            c.read_exact(&mut got).unwrap();
            assert_eq!(&got, if i == 0 { b"HELLO\n" } else { b"WORLD\n" });
        }
        let st = &r.stats()[0];
        assert_eq!(st.connections, 1);
        assert!(st.sleeps > 0 && st.wakes > 0, "{st:?}");
        drop(c);
        let deadline = Instant::now() + Duration::from_secs(5);
        while r.connections() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(r.connections(), 0);
        assert!(closed.load(Ordering::Acquire));
        r.shutdown();
    }
}
