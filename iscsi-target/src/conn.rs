//! One iSCSI connection: login on a short-lived thread, then the full
//! feature phase on a connection reactor ([`netreactor`]).
//!
//! [`IscsiConn`] is the state machine the reactor drives: it frames PDUs
//! from the received bytes with the pure parsers of [`crate::pdu`] (a
//! Data-Out payload is copied once, from the receive buffer into its
//! write's buffer), keeps the CmdSN window, collects Data-Out (R2T,
//! immediate and unsolicited data), answers NOP-Out, text, TMF and logout,
//! and submits SCSI commands to the volume without waiting. A command's
//! completion (on whatever thread the volume completes on) only queues its
//! result in the connection and wakes the reactor; [`netreactor::Conn::poll`]
//! then assigns StatSN and encodes its Data-In and SCSI Response PDUs. No
//! thread per connection after login, no channel between a request and its
//! response.

use std::collections::{HashMap, VecDeque};
use std::io::{self, BufReader, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_queue::SegQueue;
use netreactor::{Input, Outbox, Reactors, RxBuf, RxMode, Waker};
use volume::{IoBuf, PathState, SharedBuf, Volume};

use crate::login::{Login, Outcome, Params, SessionType, Step};
use crate::pdu::{self, ParseError, ParseLimits, Pdu, BHS_LEN, RSVD_TAG};
use crate::scsi::{self, Lun, Nexus, ScsiResult, Sense, STATUS_GOOD};
use crate::{IscsiConfig, QUEUE_DEPTH};

/// Longest wait for each login request PDU before the connection is closed.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Commands a connection has submitted to the volume and not yet answered
/// before the reactor stops receiving from it (TCP pushes back). Above the
/// CmdSN window: immediate commands are outside it.
const MAX_INFLIGHT: usize = 2 * QUEUE_DEPTH as usize;

/// Tasks a connection holds at most (submitted, or collecting Data-Out);
/// a command beyond this gets TASK SET FULL.
const MAX_TASKS: usize = 4 * QUEUE_DEPTH as usize;

/// Encoded responses the reactor has not yet handed to the kernel above
/// which a connection takes no more input: an initiator that sends
/// commands but never reads their responses is pushed back by TCP instead
/// of growing the send buffer.
const MAX_QUEUED_OUT_BYTES: usize = 8 << 20;

/// SAM-5 status TASK SET FULL.
const STATUS_TASK_SET_FULL: u8 = 0x28;

/// Target-wide state shared by all connections.
pub struct Shared {
    pub cfg: IscsiConfig,
    pub addr: SocketAddr,
    pub lun: Arc<Lun>,
    pub stopping: AtomicBool,
    reactors: Arc<Reactors>,
    next_id: AtomicU64,
    next_tsih: AtomicU16,
    /// Connections open (logging in or on a reactor).
    live: AtomicUsize,
    /// Write payload bytes copied in user space on their way to the volume
    /// (received into a connection's buffer instead of straight into the
    /// write's buffer), over all connections.
    pub payload_copied: Arc<AtomicU64>,
    sessions: Mutex<HashMap<u64, SessionReg>>,
    /// Login threads (each ends once its connection is on a reactor).
    logins: Mutex<Vec<JoinHandle<()>>>,
}

struct SessionReg {
    initiator: String,
    isid: [u8; 6],
    /// A handle on the socket, to close it from elsewhere (shutdown, cold
    /// reset, session reinstatement).
    stream: Option<TcpStream>,
    /// Set for a normal session in its full feature phase.
    ctl: Option<Arc<Ctl>>,
}

/// What other connections may ask of a connection on its reactor.
struct Ctl {
    /// Bumped by a reset on another connection: abort every task.
    resets: AtomicU64,
    /// The connection's reactor waker, once it is on a reactor.
    waker: OnceLock<Waker>,
}

impl Shared {
    pub fn new(
        cfg: IscsiConfig,
        vol: Arc<dyn Volume>,
        addr: SocketAddr,
        reactors: Arc<Reactors>,
    ) -> Arc<Shared> {
        let lun = Lun::new(vol, cfg.target_iqn.clone(), cfg.portal_group_tag);
        Arc::new(Shared {
            cfg,
            addr,
            lun,
            stopping: AtomicBool::new(false),
            reactors,
            next_id: AtomicU64::new(1),
            next_tsih: AtomicU16::new(1),
            live: AtomicUsize::new(0),
            payload_copied: Arc::new(AtomicU64::new(0)),
            sessions: Mutex::new(HashMap::new()),
            logins: Mutex::new(Vec::new()),
        })
    }

    /// Connections open (logging in or on a reactor).
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    pub fn close_all(&self) {
        for r in self.sessions.lock().unwrap().values() {
            if let Some(s) = &r.stream {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }

    /// Joins the login threads, then makes the reactors close every
    /// connection of this target (they see `stopping`) and waits for it.
    pub fn join_all(&self) {
        let hs: Vec<_> = std::mem::take(&mut *self.logins.lock().unwrap());
        for h in hs {
            let _ = h.join();
        }
        self.reactors.kick();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while self.live() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn nexus_ids(&self) -> Vec<u64> {
        self.sessions
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, r)| r.ctl.is_some())
            .map(|(&k, _)| k)
            .collect()
    }

    /// A connection is gone (login failed, or closed on its reactor).
    fn forget(&self, id: u64) {
        self.sessions.lock().unwrap().remove(&id);
        self.lun.nexus_gone(id);
        self.live.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Accepts one connection: runs its login on a short-lived thread.
pub fn spawn(shared: Arc<Shared>, stream: TcpStream) {
    if shared.live.load(Ordering::Acquire) >= shared.cfg.max_connections {
        log::warn!(
            "iscsi: max_connections ({}) reached; closing new connection",
            shared.cfg.max_connections
        );
        let _ = stream.shutdown(Shutdown::Both);
        return;
    }
    shared.live.fetch_add(1, Ordering::AcqRel);
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    // Registered before the thread starts, so that shutdown always sees it.
    if let Ok(c) = stream.try_clone() {
        shared.sessions.lock().unwrap().insert(
            id,
            SessionReg {
                initiator: String::new(),
                isid: [0; 6],
                stream: Some(c),
                ctl: None,
            },
        );
    }
    let s2 = shared.clone();
    let h = std::thread::Builder::new()
        .name(format!("iscsi-login-{id}"))
        .spawn(move || {
            if let Err(e) = login(&s2, id, stream) {
                log::debug!("iscsi: connection {id} ended during login: {e}");
                s2.forget(id);
            }
        });
    match h {
        Ok(h) => {
            let mut t = shared.logins.lock().unwrap();
            t.retain(|h| !h.is_finished());
            t.push(h);
        }
        Err(e) => {
            log::error!("iscsi: cannot spawn a login thread: {e}");
            shared.forget(id);
        }
    }
}

fn read_pdu(r: &mut impl Read, lim: &ParseLimits, buf: &mut Vec<u8>) -> io::Result<Pdu> {
    buf.clear();
    buf.resize(BHS_LEN, 0);
    r.read_exact(&mut buf[..])?;
    let bad = |e: ParseError| io::Error::new(io::ErrorKind::InvalidData, format!("login: {e:?}"));
    let total = pdu::pdu_len(buf, lim).map_err(bad)?;
    buf.resize(total, 0);
    r.read_exact(&mut buf[BHS_LEN..])?;
    pdu::parse(buf, lim).map(|(p, _)| p).map_err(bad)
}

/// The login thread: runs the login phase, then hands the socket (and
/// whatever the initiator sent past its last login request) to a reactor.
/// An error means the connection is finished and must be forgotten.
fn login(shared: &Arc<Shared>, id: u64, stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut reader = BufReader::with_capacity(64 * 1024, stream.try_clone()?);
    let mut wstream = stream.try_clone()?;
    let mut buf = Vec::new();
    // A connection that never completes its login must not hold a thread
    // (and a max_connections slot) forever.
    stream.set_read_timeout(Some(LOGIN_TIMEOUT))?;
    // Login phase: no digests; login text is bounded by the login state
    // machine, single PDUs by this limit.
    let lim = ParseLimits {
        header_digest: false,
        data_digest: false,
        max_data_segment_bytes: 65536,
    };
    let mut login = Login::new(&shared.cfg);
    let outcome: Outcome = loop {
        let p = read_pdu(&mut reader, &lim, &mut buf)?;
        if p.opcode() != pdu::OP_LOGIN_REQ {
            // Nothing but Login is allowed before the full feature phase:
            // close the connection (RFC 7143 §6.1).
            let _ = stream.shutdown(Shutdown::Both);
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "non-login PDU during login",
            ));
        }
        let tsih = shared.next_tsih.fetch_add(1, Ordering::Relaxed).max(1);
        login.set_tsih(tsih);
        match login.handle(&p) {
            Step::Continue(mut r) => wstream.write_all(&r.encode(false, false))?,
            Step::Fail(mut r) => {
                let _ = wstream.write_all(&r.encode(false, false));
                let _ = stream.shutdown(Shutdown::Both);
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "login failed",
                ));
            }
            Step::Complete(mut r) => {
                wstream.write_all(&r.encode(false, false))?;
                break login.outcome();
            }
        }
    };
    stream.set_read_timeout(None)?;
    let initial = reader.buffer().to_vec();
    let ctl = Arc::new(Ctl {
        resets: AtomicU64::new(0),
        waker: OnceLock::new(),
    });
    if outcome.session_type == SessionType::Normal {
        // Session reinstatement: an older session of the same initiator
        // port (name + ISID) is closed.
        let mut reg = shared.sessions.lock().unwrap();
        for (&k, r) in reg.iter() {
            if k != id && r.initiator == outcome.initiator && r.isid == outcome.isid {
                if let Some(s) = &r.stream {
                    let _ = s.shutdown(Shutdown::Both);
                }
            }
        }
        if let Some(r) = reg.get_mut(&id) {
            r.initiator = outcome.initiator.clone();
            r.isid = outcome.isid;
            r.ctl = Some(ctl.clone());
        }
    }
    let local_ip = stream.local_addr()?.ip();
    let s2 = shared.clone();
    let make = Box::new(move |waker: Waker| {
        let _ = ctl.waker.set(waker.clone());
        Box::new(IscsiConn::new(s2, id, local_ip, &outcome, ctl, waker))
            as Box<dyn netreactor::Conn>
    });
    if let Err(stream) = shared.reactors.adopt(stream, initial, make) {
        let _ = stream.shutdown(Shutdown::Both);
        return Err(io::Error::other("no reactor can take another connection"));
    }
    Ok(())
}

#[derive(Clone, Copy)]
struct TaskInfo {
    /// Unique per connection: tells a task from an earlier one that used
    /// the same ITT and was aborted while the volume still held it.
    tid: u64,
    lun: u64,
    /// Counted in the CmdSN window (non-immediate).
    windowed: bool,
}

/// How StatSN is filled when a PDU is encoded.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sn {
    /// A status PDU: gets the next StatSN.
    Advance,
    /// Carries the current StatSN without consuming it.
    Current,
}

/// What a response needs beside the command's result.
#[derive(Clone, Copy)]
struct Meta {
    itt: u32,
    tid: u64,
    lun: u64,
    edtl: u32,
    read: bool,
    /// Data-Out bytes the CDB asks for (the residual of a write).
    out_len: Option<u64>,
    /// Write budget the command holds until the volume completes it.
    charged: u64,
}

/// A command's result, queued by its completion for [`IscsiConn::poll`].
struct Done {
    meta: Meta,
    res: ScsiResult,
}

/// A write command collecting its Data-Out.
struct WriteTask {
    lun: u64,
    cdb: Vec<u8>,
    edtl: u32,
    /// The write's buffer (`edtl` bytes, from the volume's pool), once
    /// data arrived; `filled` bytes of it are received (in order).
    buf: Option<IoBuf>,
    filled: usize,
    /// Unsolicited Data-Out is still expected (F bit not yet seen).
    unsolicited_open: bool,
    /// Offset up to which R2Ts have been sent.
    r2t_offset: u32,
    r2t_sn: u32,
    /// Outstanding R2Ts: (ttt, offset, len, next DataSN).
    r2ts: Vec<(u32, u32, u32, u32)>,
    /// Expected DataSN of the unsolicited sequence.
    unsol_data_sn: u32,
    read: bool,
    /// Budget bytes reserved when its R2Ts were allowed to start (0: waiting).
    charged: u64,
}

impl WriteTask {
    /// Takes `len` bytes of data at `filled`: `data` copied into the buffer
    /// (allocated now if it is not yet), or already received there
    /// (`None`). Returns the bytes copied.
    fn take_data(&mut self, data: Option<&[u8]>, len: u32, vol: &dyn Volume) -> usize {
        let at = self.filled;
        self.filled += len as usize;
        let Some(d) = data else {
            return 0;
        };
        let edtl = self.edtl as usize;
        let buf = self
            .buf
            .get_or_insert_with(|| vol.alloc_buf(edtl).unwrap_or_else(|| IoBuf::new(edtl)));
        buf[at..at + d.len()].copy_from_slice(d);
        d.len()
    }
}

/// A PDU split at its data segment: `head` (BHS, AHS, header digest) is
/// in, the data goes into `buf` (lent to the reactor while it receives
/// into it), then `tail` bytes of padding and data digest follow.
struct Split {
    head: Vec<u8>,
    buf: Option<RxBuf>,
    tail: usize,
    /// The data is received straight into `buf` (lent to the reactor);
    /// false: it comes as input, with what follows, and is copied.
    zero_copy: bool,
}

/// Where a PDU's data segment goes.
enum DataPlace {
    Inline,
    Stall,
    Target(RxBuf),
}

/// Solicited Data-Out buffered per session (reserved when a write's R2Ts
/// start, released when the volume completes it): bounds memory whatever
/// the initiator queues. A single write larger than this still proceeds
/// when nothing else is reserved.
const WRITE_BUDGET_BYTES: u64 = 64 << 20;

/// Serial number arithmetic (RFC 1982) on 32-bit sequence numbers.
fn sn_lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// One connection's full feature phase, driven by its reactor.
pub struct IscsiConn {
    shared: Arc<Shared>,
    id: u64,
    /// Our address on this connection (SendTargets on a wildcard listener).
    local_ip: IpAddr,
    params: Params,
    lim: ParseLimits,
    discovery: bool,
    nexus: Arc<Nexus>,
    ctl: Arc<Ctl>,
    seen_resets: u64,
    stat_sn: u32,
    exp_cmd_sn: u32,
    max_cmd_sn: u32,
    /// Active SCSI tasks by ITT. A completion is answered only if its task
    /// is still here; an abort removes it.
    tasks: HashMap<u32, TaskInfo>,
    next_tid: u64,
    /// Writes collecting Data-Out, by ITT.
    writes: HashMap<u32, WriteTask>,
    /// Writes whose R2Ts wait for budget, in arrival order.
    waiting: VecDeque<u32>,
    used_bytes: u64,
    budget_bytes: u64,
    next_ttt: u32,
    done: Arc<SegQueue<Done>>,
    waker: Waker,
    /// Volume submissions whose completion `poll` has not taken yet.
    inflight: usize,
    /// Bytes in the reactor's output buffer when it last called us (it
    /// calls `poll` after each send completes).
    queued_out: usize,
    /// A logout response waiting for the commands in flight.
    logout: Option<Pdu>,
    /// A PDU whose data segment is being received straight into a write's
    /// buffer.
    split: Option<Split>,
    /// The last PDU header waits for a buffer from the volume's pool.
    stalled: bool,
    /// How write data is received: at or above the threshold straight into
    /// its buffer, one PDU header per receive while such writes flow;
    /// below it (and after reads) in bulk, copied.
    rx: RxMode,
    /// Why the connection ends, once it does.
    end: Option<String>,
}

impl IscsiConn {
    fn new(
        shared: Arc<Shared>,
        id: u64,
        local_ip: IpAddr,
        outcome: &Outcome,
        ctl: Arc<Ctl>,
        waker: Waker,
    ) -> IscsiConn {
        let params = outcome.params;
        let nexus = Arc::new(Nexus {
            id,
            initiator: outcome.initiator.clone(),
            isid: outcome.isid,
            seen_epoch: AtomicU64::new(shared.lun.vol.path_epoch()),
        });
        let budget_bytes = WRITE_BUDGET_BYTES.max(shared.lun.max_cmd_bytes as u64);
        let seen_resets = ctl.resets.load(Ordering::Acquire);
        IscsiConn {
            local_ip,
            lim: ParseLimits {
                header_digest: params.header_digest,
                data_digest: params.data_digest,
                max_data_segment_bytes: params.recv_max_data_segment_bytes,
            },
            params,
            discovery: outcome.session_type == SessionType::Discovery,
            nexus,
            ctl,
            seen_resets,
            stat_sn: outcome.stat_sn,
            exp_cmd_sn: outcome.cmd_sn,
            max_cmd_sn: outcome.cmd_sn.wrapping_add(QUEUE_DEPTH - 1),
            tasks: HashMap::new(),
            next_tid: 1,
            writes: HashMap::new(),
            waiting: VecDeque::new(),
            used_bytes: 0,
            budget_bytes,
            next_ttt: 1,
            done: Arc::new(SegQueue::new()),
            waker,
            inflight: 0,
            queued_out: 0,
            logout: None,
            split: None,
            stalled: false,
            rx: RxMode::new(shared.cfg.zero_copy_receive_min_bytes),
            end: None,
            shared,
            id,
        }
    }

    /// Encodes one target PDU with the current StatSN, ExpCmdSN and
    /// MaxCmdSN.
    fn emit(&mut self, out: &mut Outbox, mut p: Pdu, sn: Sn) {
        p.set_u32(24, self.stat_sn);
        if sn == Sn::Advance {
            self.stat_sn = self.stat_sn.wrapping_add(1);
        }
        p.set_u32(28, self.exp_cmd_sn);
        p.set_u32(32, self.max_cmd_sn);
        p.encode_into(
            out.bytes_mut(),
            self.params.header_digest,
            self.params.data_digest,
        );
    }

    fn reject(&mut self, out: &mut Outbox, reason: u8, bhs: &[u8; BHS_LEN]) {
        let mut p = Pdu::new(pdu::OP_REJECT);
        p.bhs[1] = 0x80;
        p.bhs[2] = reason;
        p.set_u32(16, RSVD_TAG);
        p.data = bhs.to_vec();
        self.emit(out, p, Sn::Advance);
    }

    /// One more command fits in the CmdSN window.
    fn retire(&mut self) {
        self.max_cmd_sn = self.max_cmd_sn.wrapping_add(1);
    }

    /// A reset on another connection aborted every task of this one.
    fn check_resets(&mut self, out: &mut Outbox) {
        let r = self.ctl.resets.load(Ordering::Acquire);
        if r != self.seen_resets {
            self.seen_resets = r;
            self.drop_writes(None, None, out);
            self.abort_tasks(None);
        }
    }

    /// Removes every task (matching `lun` if given); returns how many.
    fn abort_tasks(&mut self, lun: Option<u64>) -> usize {
        let before = self.tasks.len();
        let mut freed = 0u32;
        self.tasks.retain(|_, info| {
            let hit = lun.is_none_or(|l| l == info.lun);
            if hit && info.windowed {
                freed += 1;
            }
            !hit
        });
        self.max_cmd_sn = self.max_cmd_sn.wrapping_add(freed);
        before - self.tasks.len()
    }

    /// Drops collecting writes (all, those of `lun`, or `itt`), returning
    /// their budget (which may start the R2Ts of waiting writes). Their
    /// tasks stay (the caller aborts them).
    fn drop_writes(&mut self, lun: Option<u64>, itt: Option<u32>, out: &mut Outbox) {
        let mut freed = 0;
        self.writes.retain(|&k, w| {
            let hit = lun.is_none_or(|l| l == w.lun) && itt.is_none_or(|i| i == k);
            if hit {
                freed += w.charged;
            }
            !hit
        });
        self.release(freed, out);
    }

    /// Reserves budget for a write's R2Ts; false when it must wait.
    fn try_start(&mut self, itt: u32) -> bool {
        let used = self.used_bytes;
        let budget = self.budget_bytes;
        let Some(w) = self.writes.get_mut(&itt) else {
            return false;
        };
        if w.charged > 0 {
            return true;
        }
        let need = (w.edtl as u64).max(1);
        if used == 0 || used + need <= budget {
            w.charged = need;
            self.used_bytes += need;
            true
        } else {
            false
        }
    }

    /// Sends R2Ts for `itt` up to MaxOutstandingR2T.
    fn issue_r2ts(&mut self, itt: u32, out: &mut Outbox) {
        let p = self.params;
        let mut r2ts = Vec::new();
        {
            let Some(w) = self.writes.get_mut(&itt) else {
                return;
            };
            if w.charged == 0 || w.unsolicited_open {
                return;
            }
            while (w.r2ts.len() as u32) < p.max_outstanding_r2t && w.r2t_offset < w.edtl {
                let len = (w.edtl - w.r2t_offset).min(p.max_burst_bytes);
                let ttt = self.next_ttt;
                self.next_ttt = self.next_ttt.wrapping_add(1);
                if self.next_ttt == RSVD_TAG {
                    self.next_ttt = 1;
                }
                let mut r = Pdu::new(pdu::OP_R2T);
                r.bhs[1] = 0x80;
                r.set_u64(8, encode_lun(w.lun));
                r.set_u32(16, itt);
                r.set_u32(20, ttt);
                r.set_u32(36, w.r2t_sn);
                r.set_u32(40, w.r2t_offset);
                r.set_u32(44, len);
                w.r2ts.push((ttt, w.r2t_offset, len, 0));
                w.r2t_sn += 1;
                w.r2t_offset += len;
                r2ts.push(r);
            }
        }
        for r in r2ts {
            self.emit(out, r, Sn::Current);
        }
    }

    /// Returns budget and starts waiting writes that now fit.
    fn release(&mut self, charged: u64, out: &mut Outbox) {
        self.used_bytes = self.used_bytes.saturating_sub(charged);
        while let Some(&itt) = self.waiting.front() {
            if !self.writes.contains_key(&itt) {
                self.waiting.pop_front();
                continue;
            }
            if !self.try_start(itt) {
                break;
            }
            self.waiting.pop_front();
            self.issue_r2ts(itt, out);
        }
    }

    /// CmdSN window check for a non-immediate command: true if accepted.
    fn accept_cmd_sn(&mut self, bhs: &[u8; BHS_LEN]) -> bool {
        if bhs[0] & 0x40 != 0 {
            return true;
        }
        let cmd_sn = u32::from_be_bytes(bhs[24..28].try_into().unwrap());
        let (exp, max) = (self.exp_cmd_sn, self.max_cmd_sn);
        if sn_lt(cmd_sn, exp) || sn_lt(max, cmd_sn) {
            // Outside the window: silently ignored (RFC 7143 §4.2.2.1).
            log::debug!("iscsi: CmdSN {cmd_sn} outside window [{exp}, {max}] ignored");
            return false;
        }
        self.exp_cmd_sn = cmd_sn.wrapping_add(1);
        true
    }

    /// Handles one PDU; `imm` is a SCSI command's immediate data when it
    /// was received straight into a buffer (see [`IscsiConn::data_target`]).
    fn dispatch(&mut self, p: Pdu, imm: Option<IoBuf>, out: &mut Outbox) {
        match p.opcode() {
            pdu::OP_NOP_OUT => {
                if !self.accept_cmd_sn(&p.bhs) {
                    return;
                }
                if !p.immediate() {
                    self.retire();
                }
                if p.itt() != RSVD_TAG {
                    let mut r = Pdu::new(pdu::OP_NOP_IN);
                    r.bhs[1] = 0x80;
                    r.bhs[8..16].copy_from_slice(&p.bhs[8..16]);
                    r.set_u32(16, p.itt());
                    r.set_u32(20, RSVD_TAG);
                    let mut d = p.data;
                    d.truncate(self.params.send_max_data_segment_bytes as usize);
                    r.data = d;
                    self.emit(out, r, Sn::Advance);
                }
            }
            pdu::OP_SCSI_CMD => {
                if self.discovery {
                    self.reject(out, pdu::REJECT_PROTOCOL_ERROR, &p.bhs);
                    return;
                }
                if !self.accept_cmd_sn(&p.bhs) {
                    return;
                }
                self.scsi_command(p, imm, out);
            }
            pdu::OP_TMF_REQ => {
                if !self.accept_cmd_sn(&p.bhs) {
                    return;
                }
                if !p.immediate() {
                    self.retire();
                }
                self.task_management(p, out);
            }
            pdu::OP_TEXT_REQ => {
                if !self.accept_cmd_sn(&p.bhs) {
                    return;
                }
                if !p.immediate() {
                    self.retire();
                }
                self.text(p, out);
            }
            pdu::OP_LOGOUT_REQ => {
                if !self.accept_cmd_sn(&p.bhs) {
                    return;
                }
                if !p.immediate() {
                    self.retire();
                }
                self.logout(p, out);
            }
            pdu::OP_SNACK => self.reject(out, pdu::REJECT_SNACK, &p.bhs),
            pdu::OP_LOGIN_REQ => self.reject(out, pdu::REJECT_PROTOCOL_ERROR, &p.bhs),
            _ => self.reject(out, pdu::REJECT_CMD_NOT_SUPPORTED, &p.bhs),
        }
    }

    fn text(&mut self, p: Pdu, out: &mut Outbox) {
        let mut r = Pdu::new(pdu::OP_TEXT_RESP);
        r.bhs[1] = 0x80;
        r.set_u32(16, p.itt());
        r.set_u32(20, RSVD_TAG);
        let mut kv = Vec::new();
        let Ok(keys) = pdu::parse_text(&p.data) else {
            self.reject(out, pdu::REJECT_INVALID_PDU_FIELD, &p.bhs);
            return;
        };
        for (k, v) in keys {
            if k == "SendTargets" {
                let ok = v == "All"
                    || v == self.shared.cfg.target_iqn
                    || (v.is_empty() && !self.discovery);
                if !ok {
                    continue;
                }
                let cfg = &self.shared.cfg;
                kv.push(("TargetName".to_string(), cfg.target_iqn.clone()));
                // Our portal: the bound port; on a wildcard listener the
                // address this initiator reached (as LIO does).
                let mut own = self.shared.addr;
                if own.ip().is_unspecified() {
                    own.set_ip(self.local_ip);
                }
                let tag = cfg.portal_group_tag;
                kv.push(("TargetAddress".to_string(), format!("{own},{tag}")));
                // The peer's portals only while we are the standby: a
                // host (open-iscsi, `iscsi-ls -s`) logs in to every
                // listed portal, and on the primary the peer's is a
                // standby port where TEST UNIT READY fails (SPC-4).
                let standby = self.shared.lun.vol.path_state() != PathState::Optimized;
                if let (true, Some(peer_tag)) = (standby, cfg.peer_tag()) {
                    for a in &cfg.peer_portals {
                        kv.push(("TargetAddress".to_string(), format!("{a},{peer_tag}")));
                    }
                }
            } else {
                kv.push((k, "NotUnderstood".to_string()));
            }
        }
        let mut d = pdu::encode_text(&kv);
        d.truncate(self.params.send_max_data_segment_bytes as usize);
        r.data = d;
        self.emit(out, r, Sn::Advance);
    }

    fn logout(&mut self, p: Pdu, out: &mut Outbox) {
        let reason = p.flags() & 0x7f;
        let mut r = Pdu::new(pdu::OP_LOGOUT_RESP);
        r.bhs[1] = 0x80;
        r.set_u32(16, p.itt());
        match reason {
            0 | 1 => {
                // Writes still waiting for Data-Out cannot finish: they
                // go. Commands the volume holds are answered before the
                // logout response (`poll` sends it once they are).
                let itts: Vec<u32> = self.writes.keys().copied().collect();
                self.drop_writes(None, None, out);
                for itt in itts {
                    if let Some(info) = self.tasks.remove(&itt) {
                        if info.windowed {
                            self.retire();
                        }
                    }
                }
                r.bhs[2] = 0;
                self.logout = Some(r);
                self.try_logout(out);
            }
            _ => {
                r.bhs[2] = 2; // connection recovery is not supported (ERL 0)
                self.emit(out, r, Sn::Advance);
            }
        }
    }

    /// Sends the pending logout response once nothing is in flight.
    fn try_logout(&mut self, out: &mut Outbox) {
        if self.inflight == 0 {
            if let Some(r) = self.logout.take() {
                self.emit(out, r, Sn::Advance);
                self.end = Some("logged out".into());
            }
        }
    }

    fn task_management(&mut self, p: Pdu, out: &mut Outbox) {
        let func = p.flags() & 0x7f;
        let lun = decode_lun(p.lun());
        let rtt = p.u32_at(20);
        let mut r = Pdu::new(pdu::OP_TMF_RESP);
        r.bhs[1] = 0x80;
        r.set_u32(16, p.itt());
        let mut close_all = false;
        let response = match func {
            1 => {
                // ABORT TASK
                self.drop_writes(None, Some(rtt), out);
                match self.tasks.remove(&rtt) {
                    Some(info) => {
                        if info.windowed {
                            self.retire();
                        }
                        0
                    }
                    None => 1,
                }
            }
            2 | 4 => {
                self.drop_writes(Some(lun), None, out);
                self.abort_tasks(Some(lun));
                0
            }
            5 => {
                if lun != 0 {
                    2
                } else {
                    self.reset_all(scsi::SENSE_LUN_RESET, out);
                    0
                }
            }
            6 | 7 => {
                self.reset_all(scsi::SENSE_RESET_OCCURRED, out);
                close_all = func == 7;
                0
            }
            8 => 4,
            _ => 5,
        };
        r.bhs[2] = response;
        self.emit(out, r, Sn::Advance);
        if close_all {
            // Cold reset: every connection goes, ours after the response.
            self.end = Some("target cold reset".into());
            let me = self.id;
            for (&k, reg) in self.shared.sessions.lock().unwrap().iter() {
                if k != me {
                    if let Some(s) = &reg.stream {
                        let _ = s.shutdown(Shutdown::Both);
                    }
                }
            }
        }
    }

    /// Aborts every task of every session and raises the unit attention.
    fn reset_all(&mut self, ua: Sense, out: &mut Outbox) {
        self.drop_writes(None, None, out);
        self.abort_tasks(None);
        for (&k, reg) in self.shared.sessions.lock().unwrap().iter() {
            if k == self.id {
                continue;
            }
            if let Some(ctl) = &reg.ctl {
                ctl.resets.fetch_add(1, Ordering::AcqRel);
                if let Some(w) = ctl.waker.get() {
                    w.wake();
                }
            }
        }
        let ids = self.shared.nexus_ids();
        // SAM-5: the reset raises a unit attention on every I_T nexus,
        // the requester's included.
        self.shared.lun.reset(&ids, ua);
    }

    /// A SCSI command; `imm` holds its immediate data when that was
    /// received straight into a buffer (`p.data` is then empty).
    fn scsi_command(&mut self, p: Pdu, imm_buf: Option<IoBuf>, out: &mut Outbox) {
        let flags = p.flags();
        let final_bit = flags & 0x80 != 0;
        let read = flags & 0x40 != 0;
        let write = flags & 0x20 != 0;
        let itt = p.itt();
        let edtl = p.u32_at(20);
        let lun = decode_lun(p.lun());
        let mut cdb = p.bhs[32..48].to_vec();
        if let Some(ext) = pdu::extended_cdb(&p.ahs) {
            cdb.extend_from_slice(ext);
        }
        let windowed = !p.immediate();
        let imm = imm_buf.as_ref().map_or(p.data.len(), |b| b.len()) as u32;
        let pp = &self.params;
        let bad = (imm > 0 && (!write || !pp.immediate_data))
            || imm > edtl
            || imm > pp.first_burst_bytes
            || (!final_bit && (pp.initial_r2t || !write))
            || (write && !final_bit && imm >= pp.first_burst_bytes.min(edtl))
            || (read && write);
        if bad || self.tasks.contains_key(&itt) || self.writes.contains_key(&itt) {
            // Data beyond the negotiated burst lengths, data without W, a
            // reused task tag: reject, never execute.
            self.reject(out, pdu::REJECT_INVALID_PDU_FIELD, &p.bhs);
            if windowed {
                self.retire();
            }
            return;
        }
        let tid = self.next_tid;
        self.next_tid += 1;
        self.tasks.insert(itt, TaskInfo { tid, lun, windowed });
        let bs = self.shared.lun.geo.block_size;
        let meta = Meta {
            itt,
            tid,
            lun,
            edtl,
            read,
            out_len: if read {
                None
            } else {
                scsi::data_out_len(&cdb, bs)
            },
            charged: 0,
        };
        if self.tasks.len() > MAX_TASKS {
            let res = ScsiResult {
                status: STATUS_TASK_SET_FULL,
                ..ScsiResult::default()
            };
            self.finish(meta, res, out);
            return;
        }
        if write && edtl > imm {
            if edtl > self.shared.lun.max_cmd_bytes {
                self.finish(meta, ScsiResult::check(scsi::SENSE_INVALID_FIELD_CDB), out);
                return;
            }
            let buf = match imm_buf {
                Some(mut b) => {
                    b.set_len(edtl as usize);
                    Some(b)
                }
                None if imm > 0 => {
                    let mut b = self.payload_buf(edtl as usize);
                    b[..imm as usize].copy_from_slice(&p.data);
                    self.count_copied(imm as usize);
                    Some(b)
                }
                None => None,
            };
            let mut w = WriteTask {
                lun,
                cdb,
                edtl,
                buf,
                filled: imm as usize,
                unsolicited_open: !final_bit,
                r2t_offset: 0,
                r2t_sn: 0,
                r2ts: Vec::new(),
                unsol_data_sn: 0,
                read,
                charged: 0,
            };
            if !w.unsolicited_open {
                w.r2t_offset = imm;
            }
            self.writes.insert(itt, w);
            if self.try_start(itt) {
                self.issue_r2ts(itt, out);
            } else {
                self.waiting.push_back(itt);
            }
            return;
        }
        let data = match imm_buf {
            Some(b) => b,
            None => {
                if write {
                    self.count_copied(p.data.len());
                }
                let mut b = self.payload_buf(p.data.len());
                b.copy_from_slice(&p.data);
                b
            }
        };
        self.execute(meta, cdb, data);
    }

    /// Where the `dlen`-byte data segment of the PDU with header `bhs` goes:
    /// a write command's immediate data or a Data-Out that fits its write
    /// go straight into the write's buffer; anything unusual is framed
    /// whole (and judged) as before.
    fn data_target(&mut self, bhs: &[u8; BHS_LEN], dlen: usize) -> DataPlace {
        let be = |at: usize| u32::from_be_bytes(bhs[at..at + 4].try_into().unwrap());
        let vol = &self.shared.lun.vol;
        if bhs[0] & 0x3f == pdu::OP_SCSI_CMD {
            let edtl = be(20) as usize;
            let plain = !self.discovery
                && self.params.immediate_data
                && dlen <= self.params.first_burst_bytes as usize
                && dlen <= edtl
                && edtl <= self.shared.lun.max_cmd_bytes as usize
                && bhs[1] & 0x40 == 0;
            if !plain {
                return DataPlace::Inline;
            }
            return match vol.alloc_buf(edtl) {
                Some(mut buf) => {
                    buf.set_len(dlen);
                    DataPlace::Target(RxBuf { buf, at: 0 })
                }
                None => DataPlace::Stall,
            };
        }
        let (itt, offset) = (be(16), be(40) as usize);
        let Some(w) = self.writes.get_mut(&itt) else {
            return DataPlace::Inline;
        };
        let edtl = w.edtl as usize;
        if offset != w.filled || offset + dlen > edtl {
            return DataPlace::Inline;
        }
        if w.buf.is_none() {
            w.buf = vol.alloc_buf(edtl);
        }
        let Some(mut buf) = w.buf.take() else {
            return DataPlace::Stall;
        };
        buf.set_len(offset + dlen);
        DataPlace::Target(RxBuf { buf, at: offset })
    }

    /// The split PDU's data is in, and its `tail` (padding, digest): hand
    /// it on as the inline path would.
    fn finish_split(&mut self, tail: &[u8], out: &mut Outbox) {
        let Some(Split {
            head,
            buf: Some(rb),
            ..
        }) = self.split.take()
        else {
            return;
        };
        let mut bhs = [0u8; BHS_LEN];
        bhs.copy_from_slice(&head[..BHS_LEN]);
        let op = bhs[0] & 0x3f;
        let mut buf = rb.buf;
        let start = if op == pdu::OP_DATA_OUT {
            u32::from_be_bytes(bhs[40..44].try_into().unwrap()) as usize
        } else {
            0
        };
        if self.params.data_digest {
            let (pad, digest) = tail.split_at(tail.len() - 4);
            let crc = crc32c::crc32c_append(crc32c::crc32c(&buf[start..]), pad);
            if crc.to_le_bytes() != digest {
                // As for a PDU framed whole: discarded, ERL 0 cannot
                // recover the data.
                self.reject(out, pdu::REJECT_DATA_DIGEST, &bhs);
                if op == pdu::OP_DATA_OUT {
                    let itt = u32::from_be_bytes(bhs[16..20].try_into().unwrap());
                    self.fail_write(itt, out);
                }
                return;
            }
        }
        if op == pdu::OP_DATA_OUT {
            let itt = u32::from_be_bytes(bhs[16..20].try_into().unwrap());
            if let Some(w) = self.writes.get_mut(&itt) {
                buf.set_len(w.edtl as usize);
                w.buf = Some(buf);
            }
            self.data_out(&bhs, None, out);
        } else {
            let ahs_len = bhs[4] as usize * 4;
            let p = Pdu {
                bhs,
                ahs: head[BHS_LEN..BHS_LEN + ahs_len].to_vec(),
                data: Vec::new(),
            };
            self.dispatch(p, Some(buf), out);
        }
    }

    /// A buffer for `len` bytes of a write's data: from the volume's pool,
    /// or (for data already received into the connection's buffer, which
    /// is copied anyway) the heap when the pool is empty.
    fn payload_buf(&self, len: usize) -> IoBuf {
        self.shared
            .lun
            .vol
            .alloc_buf(len)
            .unwrap_or_else(|| IoBuf::new(len))
    }

    fn count_copied(&self, n: usize) {
        self.shared
            .payload_copied
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    /// A Data-Out error under ERL 0: the command ends with CHECK CONDITION.
    fn fail_write(&mut self, itt: u32, out: &mut Outbox) {
        if let Some(w) = self.writes.remove(&itt) {
            self.release(w.charged, out);
            let Some(info) = self.tasks.get(&itt).copied() else {
                return;
            };
            let bs = self.shared.lun.geo.block_size;
            let meta = Meta {
                itt,
                tid: info.tid,
                lun: w.lun,
                edtl: w.edtl,
                read: w.read,
                out_len: scsi::data_out_len(&w.cdb, bs),
                charged: 0,
            };
            let res = ScsiResult::check(Sense::new(0x0b, 0x4b, 0x00)); // DATA PHASE ERROR
            self.finish(meta, res, out);
        }
    }

    /// A Data-Out PDU; `data` is its data segment, or `None` when it was
    /// received in place into the write's buffer (`split` said where).
    fn data_out(&mut self, bhs: &[u8; BHS_LEN], data: Option<&[u8]>, out: &mut Outbox) {
        let be = |at: usize| u32::from_be_bytes(bhs[at..at + 4].try_into().unwrap());
        let (itt, ttt, data_sn, offset) = (be(16), be(20), be(36), be(40));
        let final_bit = bhs[1] & 0x80 != 0;
        let len = data.map_or(be(4) & 0x00ff_ffff, |d| d.len() as u32);
        let mut copied = 0;
        let first_burst = self.params.first_burst_bytes;
        let Some(w) = self.writes.get_mut(&itt) else {
            // Data for an unknown or aborted task: discarded.
            return;
        };
        let ok = if ttt == RSVD_TAG {
            let good = w.unsolicited_open
                && data_sn == w.unsol_data_sn
                && offset as usize == w.filled
                && offset as u64 + len as u64 <= first_burst.min(w.edtl) as u64;
            if good {
                w.unsol_data_sn += 1;
                copied += w.take_data(data, len, &*self.shared.lun.vol);
                if final_bit {
                    w.unsolicited_open = false;
                    w.r2t_offset = w.filled as u32;
                }
            }
            good
        } else {
            match w.r2ts.iter().position(|r| r.0 == ttt) {
                Some(i) => {
                    let (_, r_off, r_len, sn) = w.r2ts[i];
                    let good = !w.unsolicited_open
                        && data_sn == sn
                        && offset as usize == w.filled
                        && offset >= r_off
                        && offset as u64 + len as u64 <= r_off as u64 + r_len as u64;
                    if good {
                        w.r2ts[i].3 += 1;
                        copied += w.take_data(data, len, &*self.shared.lun.vol);
                        if final_bit {
                            if w.filled as u32 != r_off + r_len {
                                false
                            } else {
                                w.r2ts.remove(i);
                                true
                            }
                        } else {
                            true
                        }
                    } else {
                        false
                    }
                }
                None => false,
            }
        };
        self.count_copied(copied);
        if !ok {
            self.reject(out, pdu::REJECT_PROTOCOL_ERROR, bhs);
            self.fail_write(itt, out);
            return;
        }
        let Some(w) = self.writes.get_mut(&itt) else {
            return;
        };
        if w.filled as u32 == w.edtl && w.r2ts.is_empty() && !w.unsolicited_open {
            let Some(w) = self.writes.remove(&itt) else {
                return;
            };
            let Some(info) = self.tasks.get(&itt).copied() else {
                self.release(w.charged, out);
                return; // aborted while collecting data
            };
            let bs = self.shared.lun.geo.block_size;
            let meta = Meta {
                itt,
                tid: info.tid,
                lun: w.lun,
                edtl: w.edtl,
                read: w.read,
                out_len: scsi::data_out_len(&w.cdb, bs),
                charged: w.charged,
            };
            let data = w.buf.unwrap_or_else(|| IoBuf::new(w.edtl as usize));
            self.execute(meta, w.cdb, data);
            return;
        }
        self.issue_r2ts(itt, out);
    }

    /// Submits a command whose Data-Out (if any) is complete. Its result
    /// comes back through `done` and the waker.
    fn execute(&mut self, meta: Meta, cdb: Vec<u8>, data: IoBuf) {
        let (queue, waker) = (self.done.clone(), self.waker.clone());
        let done: scsi::Done = Box::new(move |res| {
            queue.push(Done { meta, res });
            waker.wake();
        });
        self.inflight += 1;
        scsi::execute(&self.shared.lun, &self.nexus, meta.lun, &cdb, data, done);
    }

    /// Encodes a task's response PDUs unless the task was aborted meanwhile.
    fn finish(&mut self, meta: Meta, res: ScsiResult, out: &mut Outbox) {
        match self.tasks.get(&meta.itt) {
            Some(info) if info.tid == meta.tid => {}
            _ => return,
        }
        if let Some(info) = self.tasks.remove(&meta.itt) {
            if info.windowed {
                self.retire();
            }
        }
        for r in build_response(&meta, &self.params, res) {
            match r.data {
                None => self.emit(out, r.pdu, r.sn),
                Some((buf, range)) => self.emit_data(out, r.pdu, r.sn, &buf, range),
            }
        }
    }

    /// Encodes a Data-In PDU whose data is `buf[range]`, sent from there:
    /// the padding comes from a static zero array and the data digest is
    /// computed over the slice (a read, not a copy).
    fn emit_data(
        &mut self,
        out: &mut Outbox,
        mut p: Pdu,
        sn: Sn,
        buf: &SharedBuf,
        range: Range<usize>,
    ) {
        static ZEROS: [u8; 4] = [0; 4];
        p.set_u32(24, self.stat_sn);
        if sn == Sn::Advance {
            self.stat_sn = self.stat_sn.wrapping_add(1);
        }
        p.set_u32(28, self.exp_cmd_sn);
        p.set_u32(32, self.max_cmd_sn);
        let n = range.len();
        p.encode_head_into(out.bytes_mut(), self.params.header_digest, n);
        let pad = &ZEROS[..n.next_multiple_of(4) - n];
        let crc = self
            .params
            .data_digest
            .then(|| crc32c::crc32c_append(crc32c::crc32c(&buf[range.clone()]), pad));
        out.push_shared(buf, range);
        out.extend_from_slice(pad);
        if let Some(crc) = crc {
            out.extend_from_slice(&crc.to_le_bytes());
        }
    }
}

impl netreactor::Conn for IscsiConn {
    fn input(&mut self, input: &[u8], out: &mut Outbox) -> Input {
        let r = self.take_input(input, out);
        self.queued_out = out.len();
        r
    }

    fn poll(&mut self, out: &mut Outbox) {
        self.check_resets(out);
        while let Some(d) = self.done.pop() {
            self.inflight -= 1;
            self.release(d.meta.charged, out);
            self.finish(d.meta, d.res, out);
        }
        if self.logout.is_some() {
            self.try_logout(out);
        }
        self.queued_out = out.len();
    }

    fn wants_input(&self) -> bool {
        self.end.is_none()
            && self.logout.is_none()
            && self.inflight < MAX_INFLIGHT
            && self.queued_out < MAX_QUEUED_OUT_BYTES
    }

    fn closing(&self) -> bool {
        self.end.is_some()
    }

    fn quiescent(&self) -> bool {
        self.inflight == 0 && self.logout.is_none()
    }

    fn aborted(&self) -> bool {
        self.shared.stopping.load(Ordering::Acquire)
    }

    fn take_payload_target(&mut self) -> Option<RxBuf> {
        self.split.as_mut().filter(|sp| sp.zero_copy)?.buf.take()
    }

    fn payload_received(&mut self, buf: RxBuf, out: &mut Outbox) {
        let Some(sp) = &mut self.split else {
            return;
        };
        sp.buf = Some(buf);
        if sp.tail == 0 {
            self.finish_split(&[], out);
            self.queued_out = out.len();
        }
        // Otherwise the padding and digest arrive as input.
    }

    fn receive_limit(&self) -> usize {
        // While writes at or above the zero-copy threshold flow, one PDU
        // header at a time, so that a write's data after it is received
        // straight into its buffer. After smaller writes and reads: in bulk
        // (their data is copied).
        let tail = self.split.as_ref().map_or(0, |sp| sp.tail);
        match &self.split {
            Some(sp) if !sp.zero_copy => return usize::MAX,
            None if !self.rx.header_only() => return usize::MAX,
            _ => {}
        }
        tail + BHS_LEN + if self.params.header_digest { 4 } else { 0 }
    }

    fn stalled(&self) -> bool {
        self.stalled
    }

    fn closed(&mut self, why: &str) {
        log::debug!("iscsi: connection {} closed ({why})", self.id);
        // Tasks still in flight lose their responses; the volume completes
        // them.
        self.tasks.clear();
        self.writes.clear();
        self.shared.forget(self.id);
    }
}

impl IscsiConn {
    /// Sizes the next receives by the PDU whose header is `bhs`: a write
    /// command by its expected transfer length, Data-Out by its data
    /// segment, a read by none (unless Data-Out is still due: then the
    /// mode its write chose stays).
    fn note_pdu(&mut self, bhs: &[u8; BHS_LEN]) {
        let be = |at: usize| u32::from_be_bytes(bhs[at..at + 4].try_into().unwrap()) as usize;
        let data_len = match bhs[0] & 0x3f {
            pdu::OP_SCSI_CMD if bhs[1] & 0x20 != 0 => be(20),
            pdu::OP_SCSI_CMD if self.writes.is_empty() => 0,
            // DataSegmentLength: bytes 5..8.
            pdu::OP_DATA_OUT => be(4) & 0x00ff_ffff,
            _ => return,
        };
        self.rx.saw(data_len);
    }

    /// Frames and handles the PDUs `input` holds, as long as the
    /// connection takes input.
    fn take_input(&mut self, input: &[u8], out: &mut Outbox) -> Input {
        self.check_resets(out);
        let mut at = 0;
        self.stalled = false;
        while self.end.is_none()
            && self.logout.is_none()
            && self.inflight < MAX_INFLIGHT
            && out.len() < MAX_QUEUED_OUT_BYTES
        {
            let rest = &input[at..];
            if let Some(sp) = &mut self.split {
                let Some(b) = sp.buf.as_mut() else {
                    break;
                };
                // Data that came with the header (or a driver without
                // payload targets): copied into the buffer.
                at += b.fill_from(rest, &self.shared.payload_copied);
                if !b.is_full() {
                    break;
                }
                let tail = sp.tail;
                let rest = &input[at..];
                if rest.len() < tail {
                    return Input {
                        consumed: at,
                        need: tail,
                    };
                }
                let tail_bytes = rest[..tail].to_vec();
                at += tail;
                self.finish_split(&tail_bytes, out);
                continue;
            }
            if rest.len() < BHS_LEN {
                return Input {
                    consumed: at,
                    need: BHS_LEN,
                };
            }
            let mut bhs = [0u8; BHS_LEN];
            bhs.copy_from_slice(&rest[..BHS_LEN]);
            let op = bhs[0] & 0x3f;
            self.note_pdu(&bhs);
            if op == pdu::OP_DATA_OUT || op == pdu::OP_SCSI_CMD && bhs[1] & 0x20 != 0 {
                // A write's data: once the header is in, it may go
                // straight into the write's buffer.
                match pdu::frame_head(rest, &self.lim) {
                    Ok(h) if h.dlen > 0 => match self.data_target(&bhs, h.dlen) {
                        DataPlace::Stall => {
                            self.stalled = true;
                            return Input {
                                consumed: at,
                                need: 0,
                            };
                        }
                        DataPlace::Target(buf) => {
                            self.split = Some(Split {
                                head: rest[..h.hlen].to_vec(),
                                buf: Some(buf),
                                tail: h.tail,
                                zero_copy: self.rx.zero_copy(h.dlen),
                            });
                            at += h.hlen;
                            continue;
                        }
                        DataPlace::Inline => {}
                    },
                    Err(ParseError::Incomplete { need }) => {
                        return Input { consumed: at, need };
                    }
                    _ => {}
                }
            }
            let f = match pdu::frame(rest, &self.lim) {
                Ok(f) => f,
                Err(ParseError::Incomplete { need }) => {
                    return Input { consumed: at, need };
                }
                Err(ParseError::DataDigest) => {
                    // The PDU is discarded; ERL 0 cannot recover the data.
                    at += pdu::pdu_len(rest, &self.lim).unwrap_or(rest.len());
                    self.reject(out, pdu::REJECT_DATA_DIGEST, &bhs);
                    if bhs[0] & 0x3f == pdu::OP_DATA_OUT {
                        let itt = u32::from_be_bytes(bhs[16..20].try_into().unwrap());
                        self.fail_write(itt, out);
                    }
                    continue;
                }
                Err(ParseError::BadAhs) => {
                    at += pdu::pdu_len(rest, &self.lim).unwrap_or(rest.len());
                    self.reject(out, pdu::REJECT_INVALID_PDU_FIELD, &bhs);
                    continue;
                }
                Err(ParseError::DataTooLong) => {
                    // We cannot resynchronize on the stream: reject and close.
                    self.reject(out, pdu::REJECT_PROTOCOL_ERROR, &bhs);
                    self.end = Some("data segment too long".into());
                    break;
                }
                Err(ParseError::HeaderDigest) => {
                    self.end = Some("header digest error".into());
                    break;
                }
            };
            at += f.len;
            if f.bhs[0] & 0x3f == pdu::OP_DATA_OUT {
                // The payload goes from the receive buffer straight into
                // its write's buffer.
                self.data_out(&f.bhs, Some(&rest[f.data]), out);
            } else {
                let p = Pdu {
                    bhs: f.bhs,
                    ahs: rest[f.ahs].to_vec(),
                    data: rest[f.data].to_vec(),
                };
                self.dispatch(p, None, out);
            }
        }
        Input {
            consumed: at,
            need: 0,
        }
    }
}

fn decode_lun(raw: u64) -> u64 {
    let b = raw.to_be_bytes();
    match b[0] >> 6 {
        0 if b[2..].iter().all(|&x| x == 0) => b[1] as u64,
        1 if b[2..].iter().all(|&x| x == 0) => (((b[0] & 0x3f) as u64) << 8) | b[1] as u64,
        _ => u64::MAX,
    }
}

fn encode_lun(lun: u64) -> u64 {
    if lun < 256 {
        lun << 48
    } else {
        (0x4000 | (lun & 0x3fff)) << 48
    }
}

/// One response PDU; a Data-In PDU's data is a slice of the command's
/// buffer, encoded by reference.
struct Resp {
    pdu: Pdu,
    sn: Sn,
    data: Option<(SharedBuf, Range<usize>)>,
}

/// Data-In PDUs and the status for one finished command, with residuals.
fn build_response(m: &Meta, p: &Params, res: ScsiResult) -> Vec<Resp> {
    let Meta {
        itt,
        lun,
        edtl,
        read,
        out_len,
        ..
    } = *m;
    let mut pdus = Vec::new();
    // Residuals: for Data-In, what the command produced against the
    // expected length; for Data-Out, what the CDB asked for.
    let produced: Option<u64> = if read {
        Some(res.data.len() as u64)
    } else {
        out_len
    };
    let (over, under) = match produced {
        Some(n) if n > edtl as u64 => ((n - edtl as u64).min(u32::MAX as u64) as u32, 0),
        Some(n) if n < edtl as u64 => (0, edtl - n as u32),
        _ => (0, 0),
    };
    let resid_flags = if over > 0 {
        0x04
    } else if under > 0 {
        0x02
    } else {
        0
    };
    let residual = over.max(under);
    let send_len = if read {
        res.data.len().min(edtl as usize)
    } else {
        0
    };
    let collapse = res.status == STATUS_GOOD && res.sense.is_none() && send_len > 0;
    let (status, sense) = (res.status, res.sense);
    let data = res.data.share();
    let mut data_sn = 0u32;
    if send_len > 0 {
        let seg = p.send_max_data_segment_bytes.max(512) as usize;
        let burst = p.max_burst_bytes.max(512) as usize;
        let mut at = 0usize;
        while at < send_len {
            let burst_end = ((at / burst) + 1) * burst;
            let n = seg.min(send_len - at).min(burst_end - at);
            let last = at + n == send_len;
            let mut d = Pdu::new(pdu::OP_DATA_IN);
            let mut f = 0u8;
            if last || at + n == burst_end {
                f |= 0x80;
            }
            let mut sn = Sn::Current;
            if last && collapse {
                f |= 0x01 | resid_flags;
                d.bhs[3] = status;
                d.set_u32(44, residual);
                sn = Sn::Advance;
            }
            d.bhs[1] = f;
            d.set_u64(8, encode_lun(lun));
            d.set_u32(16, itt);
            d.set_u32(20, RSVD_TAG);
            d.set_u32(36, data_sn);
            d.set_u32(40, at as u32);
            pdus.push(Resp {
                pdu: d,
                sn,
                data: Some((data.clone(), at..at + n)),
            });
            data_sn += 1;
            at += n;
        }
    }
    if collapse {
        return pdus;
    }
    let mut r = Pdu::new(pdu::OP_SCSI_RESP);
    r.bhs[1] = 0x80 | resid_flags;
    r.bhs[2] = 0; // command completed at target
    r.bhs[3] = status;
    r.set_u32(16, itt);
    r.set_u32(36, data_sn);
    r.set_u32(44, residual);
    if let Some(s) = sense {
        let sb = s.to_bytes(false);
        let mut d = (sb.len() as u16).to_be_bytes().to_vec();
        d.extend(sb);
        r.data = d;
    }
    pdus.push(Resp {
        pdu: r,
        sn: Sn::Advance,
        data: None,
    });
    pdus
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lun_encoding_round_trips() {
        for l in [0u64, 1, 255, 256, 1000] {
            assert_eq!(decode_lun(encode_lun(l)), l);
        }
    }

    #[test]
    fn serial_arithmetic_wraps() {
        assert!(sn_lt(0xffff_fff0, 5));
        assert!(!sn_lt(5, 0xffff_fff0));
    }
}
