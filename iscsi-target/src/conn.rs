//! One iSCSI connection: login, then the full feature phase with a reader
//! thread (PDU parsing, CmdSN window, Data-Out collection, TMF) and a writer
//! thread (StatSN assignment, digests, batching of responses).

use std::collections::{HashMap, VecDeque};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use volume::{PathState, Volume};

use crate::login::{Login, Outcome, Params, SessionType, Step};
use crate::pdu::{self, ParseError, ParseLimits, Pdu, BHS_LEN, RSVD_TAG};
use crate::scsi::{self, Lun, Nexus, ScsiResult, Sense, STATUS_GOOD};
use crate::{IscsiConfig, QUEUE_DEPTH};

/// How long the writer polls for more responses before it sleeps.
const WRITER_SPIN: Duration = Duration::from_micros(20);

/// Longest wait for each login request PDU before the connection is closed.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Target-wide state shared by all connections.
pub struct Shared {
    pub cfg: IscsiConfig,
    pub addr: SocketAddr,
    pub lun: Arc<Lun>,
    pub stopping: AtomicBool,
    next_id: AtomicU64,
    next_tsih: AtomicU16,
    live: AtomicUsize,
    sessions: Mutex<HashMap<u64, SessionReg>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

struct SessionReg {
    initiator: String,
    isid: [u8; 6],
    stream: Option<TcpStream>,
    sess: Option<Arc<Sess>>,
}

impl Shared {
    pub fn new(cfg: IscsiConfig, vol: Arc<dyn Volume>, addr: SocketAddr) -> Arc<Shared> {
        let lun = Lun::new(vol, cfg.target_iqn.clone(), cfg.portal_group_tag);
        Arc::new(Shared {
            cfg,
            addr,
            lun,
            stopping: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            next_tsih: AtomicU16::new(1),
            live: AtomicUsize::new(0),
            sessions: Mutex::new(HashMap::new()),
            threads: Mutex::new(Vec::new()),
        })
    }

    pub fn close_all(&self) {
        for r in self.sessions.lock().unwrap().values() {
            if let Some(s) = &r.stream {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }

    pub fn join_all(&self) {
        let hs: Vec<_> = std::mem::take(&mut *self.threads.lock().unwrap());
        for h in hs {
            let _ = h.join();
        }
    }

    fn nexus_ids(&self) -> Vec<u64> {
        self.sessions
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, r)| r.sess.is_some())
            .map(|(&k, _)| k)
            .collect()
    }
}

/// Accepts one connection: serves it on its own reader thread.
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
    let s2 = shared.clone();
    let h = std::thread::Builder::new()
        .name("iscsi-conn".into())
        .spawn(move || {
            let id = s2.next_id.fetch_add(1, Ordering::Relaxed);
            if let Ok(c) = stream.try_clone() {
                s2.sessions.lock().unwrap().insert(
                    id,
                    SessionReg {
                        initiator: String::new(),
                        isid: [0; 6],
                        stream: Some(c),
                        sess: None,
                    },
                );
            }
            if let Err(e) = serve(&s2, id, stream) {
                log::debug!("iscsi: connection {id} ended: {e}");
            }
            s2.sessions.lock().unwrap().remove(&id);
            s2.lun.nexus_gone(id);
            s2.live.fetch_sub(1, Ordering::AcqRel);
        });
    match h {
        Ok(h) => {
            let mut t = shared.threads.lock().unwrap();
            t.retain(|h| !h.is_finished());
            t.push(h);
        }
        Err(e) => {
            log::error!("iscsi: cannot spawn connection thread: {e}");
            shared.live.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

enum ReadErr {
    Io(io::Error),
    /// A parse error with the offending BHS (for the Reject PDU).
    Parse(ParseError, Box<[u8; BHS_LEN]>),
}

impl From<io::Error> for ReadErr {
    fn from(e: io::Error) -> Self {
        ReadErr::Io(e)
    }
}

fn read_pdu(r: &mut impl Read, lim: &ParseLimits, buf: &mut Vec<u8>) -> Result<Pdu, ReadErr> {
    buf.clear();
    buf.resize(BHS_LEN, 0);
    r.read_exact(&mut buf[..])?;
    let mut bhs = [0u8; BHS_LEN];
    bhs.copy_from_slice(&buf[..BHS_LEN]);
    let total = pdu::pdu_len(buf, lim).map_err(|e| ReadErr::Parse(e, Box::new(bhs)))?;
    buf.resize(total, 0);
    r.read_exact(&mut buf[BHS_LEN..])?;
    pdu::parse(buf, lim)
        .map(|(p, _)| p)
        .map_err(|e| ReadErr::Parse(e, Box::new(bhs)))
}

fn serve(shared: &Arc<Shared>, id: u64, stream: TcpStream) -> io::Result<()> {
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
        let p = match read_pdu(&mut reader, &lim, &mut buf) {
            Ok(p) => p,
            Err(ReadErr::Io(e)) => return Err(e),
            Err(ReadErr::Parse(e, _)) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("login: {e:?}"),
                ))
            }
        };
        if p.opcode() != pdu::OP_LOGIN_REQ {
            // Nothing but Login is allowed before the full feature phase:
            // close the connection (RFC 7143 §6.1).
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
                wstream.write_all(&r.encode(false, false))?;
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
    let params = outcome.params;
    let nexus = Arc::new(Nexus {
        id,
        initiator: outcome.initiator.clone(),
        isid: outcome.isid,
        seen_epoch: AtomicU64::new(shared.lun.vol.path_epoch()),
    });
    let sess = Arc::new(Sess {
        exp_cmd_sn: AtomicU32::new(outcome.cmd_sn),
        max_cmd_sn: AtomicU32::new(outcome.cmd_sn.wrapping_add(QUEUE_DEPTH - 1)),
        tasks: Mutex::new(HashMap::new()),
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
            r.sess = Some(sess.clone());
        }
    }
    let (tx, rx) = mpsc::channel::<Out>();
    let wsess = sess.clone();
    let stat_sn = outcome.stat_sn;
    let writer = std::thread::Builder::new()
        .name("iscsi-writer".into())
        .spawn(move || writer_loop(wstream, rx, wsess, params, stat_sn))?;
    let mut c = Conn {
        shared: shared.clone(),
        local_ip: stream.local_addr()?.ip(),
        out: tx.clone(),
        params,
        discovery: outcome.session_type == SessionType::Discovery,
        sess: sess.clone(),
        nexus,
        wctx: Arc::new(WriteCtx {
            w: Mutex::new(Writes {
                tasks: HashMap::new(),
                waiting: VecDeque::new(),
                used_bytes: 0,
                next_ttt: 1,
            }),
            out: tx.clone(),
            params,
            budget_bytes: WRITE_BUDGET_BYTES.max(shared.lun.max_cmd_bytes as u64),
        }),
    };
    let res = c.reader_loop(&mut reader, &mut buf);
    // Tasks still in flight lose their responses; the volume completes them.
    sess.tasks.lock().unwrap().clear();
    let _ = c.out.send(Out::Close);
    drop(c);
    let _ = writer.join();
    let _ = stream.shutdown(Shutdown::Both);
    res
}

/// Per-session state shared between reader, writer and completions.
pub struct Sess {
    exp_cmd_sn: AtomicU32,
    max_cmd_sn: AtomicU32,
    /// Active SCSI tasks by ITT. A completion sends its response only if it
    /// still finds its task here; an abort removes it.
    tasks: Mutex<HashMap<u32, TaskInfo>>,
}

#[derive(Clone, Copy)]
struct TaskInfo {
    lun: u64,
    /// Counted in the CmdSN window (non-immediate).
    windowed: bool,
}

impl Sess {
    fn retire(&self) {
        self.max_cmd_sn.fetch_add(1, Ordering::AcqRel);
    }

    /// Removes every task (matching `lun` if given); returns how many.
    fn abort_all(&self, lun: Option<u64>) -> usize {
        let mut t = self.tasks.lock().unwrap();
        let before = t.len();
        t.retain(|_, info| {
            let hit = lun.is_none_or(|l| l == info.lun);
            if hit && info.windowed {
                self.retire();
            }
            !hit
        });
        before - t.len()
    }
}

/// How the writer fills StatSN.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sn {
    /// A status PDU: gets the next StatSN.
    Advance,
    /// Carries the current StatSN without consuming it.
    Current,
}

enum Out {
    Pdu(Pdu, Sn),
    /// Flush and close the connection.
    Close,
}

fn writer_loop(
    stream: TcpStream,
    rx: mpsc::Receiver<Out>,
    sess: Arc<Sess>,
    p: Params,
    mut stat_sn: u32,
) {
    let mut w = BufWriter::with_capacity(64 * 1024, stream);
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut closing = false;
    loop {
        // Adaptive wait: poll briefly for the next response before sleeping
        // in the channel, so a busy connection does not pay a futex wake-up
        // per PDU; an idle one sleeps after WRITER_SPIN.
        let mut first = rx.try_recv().ok();
        if first.is_none() {
            let until = Instant::now() + WRITER_SPIN;
            while first.is_none() && Instant::now() < until {
                std::hint::spin_loop();
                first = rx.try_recv().ok();
            }
        }
        let first = match first {
            Some(m) => m,
            None => match rx.recv() {
                Ok(m) => m,
                Err(_) => break,
            },
        };
        let mut next = Some(first);
        while let Some(m) = next.take() {
            match m {
                Out::Pdu(mut pdu, sn) => {
                    pdu.set_u32(24, stat_sn);
                    if sn == Sn::Advance {
                        stat_sn = stat_sn.wrapping_add(1);
                    }
                    pdu.set_u32(28, sess.exp_cmd_sn.load(Ordering::Acquire));
                    pdu.set_u32(32, sess.max_cmd_sn.load(Ordering::Acquire));
                    buf.clear();
                    pdu.encode_into(&mut buf, p.header_digest, p.data_digest);
                    if w.write_all(&buf).is_err() {
                        closing = true;
                    }
                }
                Out::Close => closing = true,
            }
            if closing {
                break;
            }
            next = rx.try_recv().ok();
        }
        if w.flush().is_err() || closing {
            break;
        }
    }
    let _ = w.flush();
    let _ = w.get_ref().shutdown(Shutdown::Both);
}

/// A write command collecting its Data-Out.
struct WriteTask {
    lun: u64,
    cdb: Vec<u8>,
    edtl: u32,
    buf: Vec<u8>,
    /// Unsolicited Data-Out is still expected (F bit not yet seen).
    unsolicited_open: bool,
    /// Offset up to which R2Ts have been sent.
    r2t_offset: u32,
    r2t_sn: u32,
    /// Outstanding R2Ts: ttt -> (offset, len, next DataSN)
    r2ts: Vec<(u32, u32, u32, u32)>,
    /// Expected DataSN of the unsolicited sequence.
    unsol_data_sn: u32,
    read: bool,
    /// Budget bytes reserved when its R2Ts were allowed to start (0: waiting).
    charged: u64,
}

/// Solicited Data-Out buffered per session (reserved when a write's R2Ts
/// start, released when the volume completes it): bounds memory whatever
/// the initiator queues. A single write larger than this still proceeds
/// when nothing else is reserved.
const WRITE_BUDGET_BYTES: u64 = 64 << 20;

/// Data-Out collection state shared by the reader and write completions, so
/// that a completion can start the R2Ts of writes waiting for budget.
struct Writes {
    tasks: HashMap<u32, WriteTask>,
    /// Writes whose R2Ts wait for budget, in arrival order.
    waiting: VecDeque<u32>,
    used_bytes: u64,
    next_ttt: u32,
}

struct WriteCtx {
    w: Mutex<Writes>,
    out: mpsc::Sender<Out>,
    params: Params,
    budget_bytes: u64,
}

impl WriteCtx {
    /// Reserves budget for a write's R2Ts; false when it must wait.
    fn try_start(&self, g: &mut Writes, itt: u32) -> bool {
        let used = g.used_bytes;
        let Some(w) = g.tasks.get_mut(&itt) else {
            return false;
        };
        if w.charged > 0 {
            return true;
        }
        let need = (w.edtl as u64).max(1);
        if used == 0 || used + need <= self.budget_bytes {
            w.charged = need;
            g.used_bytes += need;
            true
        } else {
            false
        }
    }

    /// Sends R2Ts for `itt` up to MaxOutstandingR2T.
    fn issue_r2ts(&self, g: &mut Writes, itt: u32) {
        let Writes {
            tasks, next_ttt, ..
        } = g;
        let Some(w) = tasks.get_mut(&itt) else { return };
        if w.charged == 0 || w.unsolicited_open {
            return;
        }
        let p = &self.params;
        while (w.r2ts.len() as u32) < p.max_outstanding_r2t && w.r2t_offset < w.edtl {
            let len = (w.edtl - w.r2t_offset).min(p.max_burst_bytes);
            let ttt = *next_ttt;
            *next_ttt = next_ttt.wrapping_add(1);
            if *next_ttt == RSVD_TAG {
                *next_ttt = 1;
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
            let _ = self.out.send(Out::Pdu(r, Sn::Current));
        }
    }

    /// Returns budget and starts waiting writes that now fit.
    fn release_locked(&self, g: &mut Writes, charged: u64) {
        g.used_bytes = g.used_bytes.saturating_sub(charged);
        while let Some(&itt) = g.waiting.front() {
            if !g.tasks.contains_key(&itt) {
                g.waiting.pop_front();
                continue;
            }
            if !self.try_start(g, itt) {
                break;
            }
            g.waiting.pop_front();
            self.issue_r2ts(g, itt);
        }
    }

    fn release(&self, charged: u64) {
        if charged > 0 {
            let mut g = self.w.lock().unwrap();
            self.release_locked(&mut g, charged);
        }
    }

    /// Drops collecting writes (all, or those of `lun`), returning budget.
    fn drop_tasks(&self, lun: Option<u64>, itt: Option<u32>) {
        let mut g = self.w.lock().unwrap();
        let mut freed = 0;
        g.tasks.retain(|&k, w| {
            let hit = lun.is_none_or(|l| l == w.lun) && itt.is_none_or(|i| i == k);
            if hit {
                freed += w.charged;
            }
            !hit
        });
        self.release_locked(&mut g, freed);
    }
}

struct Conn {
    shared: Arc<Shared>,
    /// Our address on this connection (SendTargets on a wildcard listener).
    local_ip: IpAddr,
    out: mpsc::Sender<Out>,
    params: Params,
    discovery: bool,
    sess: Arc<Sess>,
    nexus: Arc<Nexus>,
    wctx: Arc<WriteCtx>,
}

/// Serial number arithmetic (RFC 1982) on 32-bit sequence numbers.
fn sn_lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

enum Flow {
    Continue,
    Close,
}

impl Conn {
    fn send(&self, p: Pdu, sn: Sn) {
        let _ = self.out.send(Out::Pdu(p, sn));
    }

    fn reject(&self, reason: u8, bhs: &[u8; BHS_LEN]) {
        let mut p = Pdu::new(pdu::OP_REJECT);
        p.bhs[1] = 0x80;
        p.bhs[2] = reason;
        p.set_u32(16, RSVD_TAG);
        p.data = bhs.to_vec();
        self.send(p, Sn::Advance);
    }

    fn reader_loop(&mut self, r: &mut impl Read, buf: &mut Vec<u8>) -> io::Result<()> {
        let lim = ParseLimits {
            header_digest: self.params.header_digest,
            data_digest: self.params.data_digest,
            max_data_segment_bytes: self.params.recv_max_data_segment_bytes,
        };
        loop {
            let p = match read_pdu(r, &lim, buf) {
                Ok(p) => p,
                Err(ReadErr::Io(e)) => return Err(e),
                Err(ReadErr::Parse(e, bhs)) => match e {
                    ParseError::DataDigest => {
                        // The PDU is discarded; ERL 0 cannot recover the data.
                        self.reject(pdu::REJECT_DATA_DIGEST, &bhs);
                        if bhs[0] & 0x3f == pdu::OP_DATA_OUT {
                            let itt = u32::from_be_bytes(bhs[16..20].try_into().unwrap());
                            self.fail_write(itt);
                        }
                        continue;
                    }
                    ParseError::BadAhs => {
                        self.reject(pdu::REJECT_INVALID_PDU_FIELD, &bhs);
                        continue;
                    }
                    ParseError::DataTooLong => {
                        // We cannot resynchronize on the stream: reject and close.
                        self.reject(pdu::REJECT_PROTOCOL_ERROR, &bhs);
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "data segment too long",
                        ));
                    }
                    ParseError::HeaderDigest | ParseError::Incomplete { .. } => {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{e:?}")));
                    }
                },
            };
            match self.dispatch(p) {
                Flow::Continue => {}
                Flow::Close => return Ok(()),
            }
        }
    }

    /// CmdSN window check for a non-immediate command: true if accepted.
    fn accept_cmd_sn(&self, p: &Pdu) -> bool {
        if p.immediate() {
            return true;
        }
        let cmd_sn = p.u32_at(24);
        let exp = self.sess.exp_cmd_sn.load(Ordering::Acquire);
        let max = self.sess.max_cmd_sn.load(Ordering::Acquire);
        if sn_lt(cmd_sn, exp) || sn_lt(max, cmd_sn) {
            // Outside the window: silently ignored (RFC 7143 §4.2.2.1).
            log::debug!("iscsi: CmdSN {cmd_sn} outside window [{exp}, {max}] ignored");
            return false;
        }
        self.sess
            .exp_cmd_sn
            .store(cmd_sn.wrapping_add(1), Ordering::Release);
        true
    }

    fn dispatch(&mut self, p: Pdu) -> Flow {
        let op = p.opcode();
        match op {
            pdu::OP_NOP_OUT => {
                if !self.accept_cmd_sn(&p) {
                    return Flow::Continue;
                }
                if !p.immediate() {
                    self.sess.retire();
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
                    self.send(r, Sn::Advance);
                }
                Flow::Continue
            }
            pdu::OP_SCSI_CMD => {
                if self.discovery {
                    self.reject(pdu::REJECT_PROTOCOL_ERROR, &p.bhs);
                    return Flow::Continue;
                }
                if !self.accept_cmd_sn(&p) {
                    return Flow::Continue;
                }
                self.scsi_command(p);
                Flow::Continue
            }
            pdu::OP_DATA_OUT => {
                self.data_out(p);
                Flow::Continue
            }
            pdu::OP_TMF_REQ => {
                if !self.accept_cmd_sn(&p) {
                    return Flow::Continue;
                }
                if !p.immediate() {
                    self.sess.retire();
                }
                self.task_management(p)
            }
            pdu::OP_TEXT_REQ => {
                if !self.accept_cmd_sn(&p) {
                    return Flow::Continue;
                }
                if !p.immediate() {
                    self.sess.retire();
                }
                self.text(p);
                Flow::Continue
            }
            pdu::OP_LOGOUT_REQ => {
                if !self.accept_cmd_sn(&p) {
                    return Flow::Continue;
                }
                if !p.immediate() {
                    self.sess.retire();
                }
                self.logout(p)
            }
            pdu::OP_SNACK => {
                self.reject(pdu::REJECT_SNACK, &p.bhs);
                Flow::Continue
            }
            pdu::OP_LOGIN_REQ => {
                self.reject(pdu::REJECT_PROTOCOL_ERROR, &p.bhs);
                Flow::Continue
            }
            _ => {
                self.reject(pdu::REJECT_CMD_NOT_SUPPORTED, &p.bhs);
                Flow::Continue
            }
        }
    }

    fn text(&mut self, p: Pdu) {
        let mut r = Pdu::new(pdu::OP_TEXT_RESP);
        r.bhs[1] = 0x80;
        r.set_u32(16, p.itt());
        r.set_u32(20, RSVD_TAG);
        let mut kv = Vec::new();
        if let Ok(keys) = pdu::parse_text(&p.data) {
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
        } else {
            self.reject(pdu::REJECT_INVALID_PDU_FIELD, &p.bhs);
            return;
        }
        let mut d = pdu::encode_text(&kv);
        d.truncate(self.params.send_max_data_segment_bytes as usize);
        r.data = d;
        self.send(r, Sn::Advance);
    }

    fn logout(&mut self, p: Pdu) -> Flow {
        let reason = p.flags() & 0x7f;
        let mut r = Pdu::new(pdu::OP_LOGOUT_RESP);
        r.bhs[1] = 0x80;
        r.set_u32(16, p.itt());
        let close = match reason {
            0 | 1 => {
                // Let in-flight commands finish (bounded) so their
                // responses precede the logout response.
                let until = Instant::now() + Duration::from_secs(5);
                while !self.sess.tasks.lock().unwrap().is_empty() && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(1));
                }
                r.bhs[2] = 0;
                true
            }
            _ => {
                r.bhs[2] = 2; // connection recovery is not supported (ERL 0)
                false
            }
        };
        self.send(r, Sn::Advance);
        if close {
            let _ = self.out.send(Out::Close);
            Flow::Close
        } else {
            Flow::Continue
        }
    }

    fn task_management(&mut self, p: Pdu) -> Flow {
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
                self.wctx.drop_tasks(None, Some(rtt));
                let found = self.sess.tasks.lock().unwrap().remove(&rtt);
                match found {
                    Some(info) => {
                        if info.windowed {
                            self.sess.retire();
                        }
                        0
                    }
                    None => 1,
                }
            }
            2 | 4 => {
                self.wctx.drop_tasks(Some(lun), None);
                self.sess.abort_all(Some(lun));
                0
            }
            5 => {
                if lun != 0 {
                    2
                } else {
                    self.reset_all(scsi::SENSE_LUN_RESET);
                    0
                }
            }
            6 | 7 => {
                self.reset_all(scsi::SENSE_RESET_OCCURRED);
                close_all = func == 7;
                0
            }
            8 => 4,
            _ => 5,
        };
        r.bhs[2] = response;
        self.send(r, Sn::Advance);
        if close_all {
            // Cold reset: every connection goes, ours after the response.
            let _ = self.out.send(Out::Close);
            let me = self.nexus.id;
            for (&k, reg) in self.shared.sessions.lock().unwrap().iter() {
                if k != me {
                    if let Some(s) = &reg.stream {
                        let _ = s.shutdown(Shutdown::Both);
                    }
                }
            }
            return Flow::Close;
        }
        Flow::Continue
    }

    fn reset_all(&mut self, ua: Sense) {
        self.wctx.drop_tasks(None, None);
        let sessions: Vec<Arc<Sess>> = self
            .shared
            .sessions
            .lock()
            .unwrap()
            .values()
            .filter_map(|r| r.sess.clone())
            .collect();
        for s in sessions {
            s.abort_all(None);
        }
        self.sess.abort_all(None);
        let ids = self.shared.nexus_ids();
        // SAM-5: the reset raises a unit attention on every I_T nexus,
        // the requester's included.
        self.shared.lun.reset(&ids, ua);
    }

    fn scsi_command(&mut self, p: Pdu) {
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
        let imm = p.data.len() as u32;
        let bad = (imm > 0 && (!write || !self.params.immediate_data))
            || imm > edtl
            || imm > self.params.first_burst_bytes
            || (!final_bit && (self.params.initial_r2t || !write))
            || (write && !final_bit && imm >= self.params.first_burst_bytes.min(edtl))
            || (read && write);
        if bad
            || self.sess.tasks.lock().unwrap().contains_key(&itt)
            || self.wctx.w.lock().unwrap().tasks.contains_key(&itt)
        {
            // Data beyond the negotiated burst lengths, data without W, a
            // reused task tag: reject, never execute.
            self.reject(pdu::REJECT_INVALID_PDU_FIELD, &p.bhs);
            if windowed {
                self.sess.retire();
            }
            return;
        }
        self.sess
            .tasks
            .lock()
            .unwrap()
            .insert(itt, TaskInfo { lun, windowed });
        if write && edtl > imm {
            if edtl > self.shared.lun.max_cmd_bytes {
                self.finish(
                    itt,
                    edtl,
                    read,
                    &cdb,
                    ScsiResult::check(scsi::SENSE_INVALID_FIELD_CDB),
                );
                return;
            }
            let mut buf = Vec::with_capacity(edtl as usize);
            buf.extend_from_slice(&p.data);
            let mut w = WriteTask {
                lun,
                cdb,
                edtl,
                buf,
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
            let mut g = self.wctx.w.lock().unwrap();
            g.tasks.insert(itt, w);
            if self.wctx.try_start(&mut g, itt) {
                self.wctx.issue_r2ts(&mut g, itt);
            } else {
                g.waiting.push_back(itt);
            }
            return;
        }
        self.execute(itt, lun, cdb, p.data, edtl, read, 0);
    }

    /// A Data-Out error under ERL 0: the command ends with CHECK CONDITION.
    fn fail_write(&mut self, itt: u32) {
        let w = self.wctx.w.lock().unwrap().tasks.remove(&itt);
        if let Some(w) = w {
            self.wctx.release(w.charged);
            let res = ScsiResult::check(Sense::new(0x0b, 0x4b, 0x00)); // DATA PHASE ERROR
            self.finish(itt, w.edtl, w.read, &w.cdb, res);
        }
    }

    fn data_out(&mut self, p: Pdu) {
        let itt = p.itt();
        let ttt = p.u32_at(20);
        let data_sn = p.u32_at(36);
        let offset = p.u32_at(40);
        let len = p.data.len() as u32;
        let mut g = self.wctx.w.lock().unwrap();
        let Some(mut w) = g.tasks.remove(&itt) else {
            // Data for an unknown or aborted task: discarded.
            return;
        };
        let first_burst = self.params.first_burst_bytes;
        let ok = if ttt == RSVD_TAG {
            let good = w.unsolicited_open
                && data_sn == w.unsol_data_sn
                && offset == w.buf.len() as u32
                && offset as u64 + len as u64 <= first_burst.min(w.edtl) as u64;
            if good {
                w.unsol_data_sn += 1;
                w.buf.extend_from_slice(&p.data);
                if p.final_bit() {
                    w.unsolicited_open = false;
                    w.r2t_offset = w.buf.len() as u32;
                }
            }
            good
        } else {
            match w.r2ts.iter().position(|r| r.0 == ttt) {
                Some(i) => {
                    let (_, r_off, r_len, sn) = w.r2ts[i];
                    let good = !w.unsolicited_open
                        && data_sn == sn
                        && offset == w.buf.len() as u32
                        && offset >= r_off
                        && offset as u64 + len as u64 <= r_off as u64 + r_len as u64;
                    if good {
                        w.r2ts[i].3 += 1;
                        w.buf.extend_from_slice(&p.data);
                        if p.final_bit() {
                            if w.buf.len() as u32 != r_off + r_len {
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
        if !ok {
            g.tasks.insert(itt, w);
            drop(g);
            self.reject(pdu::REJECT_PROTOCOL_ERROR, &p.bhs);
            self.fail_write(itt);
            return;
        }
        if w.buf.len() as u32 == w.edtl && w.r2ts.is_empty() && !w.unsolicited_open {
            drop(g);
            let WriteTask {
                lun,
                cdb,
                buf,
                edtl,
                read,
                charged,
                ..
            } = w;
            self.execute(itt, lun, cdb, buf, edtl, read, charged);
            return;
        }
        g.tasks.insert(itt, w);
        self.wctx.issue_r2ts(&mut g, itt);
    }

    /// Submits a command whose Data-Out (if any) is complete; `charged` is
    /// the write budget it holds until the volume completes it.
    #[allow(clippy::too_many_arguments)]
    fn execute(
        &mut self,
        itt: u32,
        lun: u64,
        cdb: Vec<u8>,
        data: Vec<u8>,
        edtl: u32,
        read: bool,
        charged: u64,
    ) {
        if !self.sess.tasks.lock().unwrap().contains_key(&itt) {
            self.wctx.release(charged);
            return; // aborted while collecting data
        }
        let wctx = self.wctx.clone();
        let out = self.out.clone();
        let sess = self.sess.clone();
        let params = self.params;
        let bs = self.shared.lun.geo.block_size;
        let cdb2 = cdb.clone();
        let done: scsi::Done = Box::new(move |res| {
            wctx.release(charged);
            let pdus = build_response(itt, lun, edtl, read, &cdb2, bs, &params, res);
            send_final(&sess, &out, itt, pdus);
        });
        scsi::execute(&self.shared.lun, &self.nexus, lun, &cdb, data, done);
    }

    fn finish(&mut self, itt: u32, edtl: u32, read: bool, cdb: &[u8], res: ScsiResult) {
        let lun = 0;
        let pdus = build_response(
            itt,
            lun,
            edtl,
            read,
            cdb,
            self.shared.lun.geo.block_size,
            &self.params,
            res,
        );
        send_final(&self.sess, &self.out, itt, pdus);
    }
}

/// Sends a task's response PDUs unless the task was aborted meanwhile.
fn send_final(sess: &Sess, out: &mpsc::Sender<Out>, itt: u32, pdus: Vec<(Pdu, Sn)>) {
    let mut t = sess.tasks.lock().unwrap();
    if let Some(info) = t.remove(&itt) {
        if info.windowed {
            sess.retire();
        }
        for (p, sn) in pdus {
            let _ = out.send(Out::Pdu(p, sn));
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

/// Data-In PDUs and the status for one finished command, with residuals.
#[allow(clippy::too_many_arguments)]
fn build_response(
    itt: u32,
    lun: u64,
    edtl: u32,
    read: bool,
    cdb: &[u8],
    bs: u32,
    p: &Params,
    mut res: ScsiResult,
) -> Vec<(Pdu, Sn)> {
    let mut pdus = Vec::new();
    // Residuals: for Data-In, what the command produced against the
    // expected length; for Data-Out, what the CDB asked for.
    let produced: Option<u64> = if read {
        Some(res.data.len() as u64)
    } else {
        scsi::data_out_len(cdb, bs)
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
                d.bhs[3] = res.status;
                d.set_u32(44, residual);
                sn = Sn::Advance;
            }
            d.bhs[1] = f;
            d.set_u64(8, encode_lun(lun));
            d.set_u32(16, itt);
            d.set_u32(20, RSVD_TAG);
            d.set_u32(36, data_sn);
            d.set_u32(40, at as u32);
            // A single Data-In PDU takes the buffer without a copy.
            d.data = if at == 0 && n == res.data.len() {
                std::mem::take(&mut res.data)
            } else {
                res.data[at..at + n].to_vec()
            };
            data_sn += 1;
            at += n;
            pdus.push((d, sn));
        }
    }
    if collapse {
        return pdus;
    }
    let mut r = Pdu::new(pdu::OP_SCSI_RESP);
    r.bhs[1] = 0x80 | resid_flags;
    r.bhs[2] = 0; // command completed at target
    r.bhs[3] = res.status;
    r.set_u32(16, itt);
    r.set_u32(36, data_sn);
    r.set_u32(44, residual);
    if let Some(s) = res.sense {
        let sb = s.to_bytes(false);
        let mut d = (sb.len() as u16).to_be_bytes().to_vec();
        d.extend(sb);
        r.data = d;
    }
    pdus.push((r, Sn::Advance));
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
