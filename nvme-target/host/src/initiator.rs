//! A small NVMe/TCP host (initiator): connects an admin queue and I/O
//! queues, identifies, and runs I/O with any number of commands in flight.
//! Built from the same codec as the target; used by tests and `dm-nvme`.
//!
//! Each queue is one TCP connection with a reader thread that matches
//! responses to commands by CID, answers R2Ts with H2CData, collects
//! C2HData and runs the command's callback.

use nvme_target::pdu::*;
use nvme_target::spec::*;
use std::collections::HashMap;
use std::io::{self, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Errors of the host side.
#[derive(Debug)]
pub enum HostError {
    Io(io::Error),
    /// The connection is gone (closed, terminated, or a protocol error).
    Disconnected(String),
    /// The command completed with an error status.
    Status(Status),
    Timeout,
}

impl std::fmt::Display for HostError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostError::Io(e) => write!(f, "I/O error: {e}"),
            HostError::Disconnected(m) => write!(f, "disconnected: {m}"),
            HostError::Status(s) => write!(f, "command failed: {s}"),
            HostError::Timeout => write!(f, "command timed out"),
        }
    }
}

impl std::error::Error for HostError {}

impl From<io::Error> for HostError {
    fn from(e: io::Error) -> Self {
        HostError::Io(e)
    }
}

pub type HostResult<T> = Result<T, HostError>;

/// A command's completion.
#[derive(Debug, Clone)]
pub struct Completion {
    pub status: Status,
    pub dw0: u32,
    pub dw1: u32,
    pub data: Vec<u8>,
}

impl Completion {
    /// Turns an error status into `HostError::Status`.
    pub fn ok(self) -> HostResult<Completion> {
        if self.status.is_success() {
            Ok(self)
        } else {
            Err(HostError::Status(self.status))
        }
    }
}

pub type Callback = Box<dyn FnOnce(HostResult<Completion>) + Send + 'static>;

/// One command for [`QueuePair::submit_batch`]: the SQE, the data to send
/// (in-capsule when it fits, else on R2T), the bytes to receive, and what
/// to call with the completion.
pub struct Command {
    pub sqe: Sqe,
    pub data_out: Option<Arc<Vec<u8>>>,
    pub data_in_len: u32,
    pub done: Callback,
}

/// Host settings.
#[derive(Clone, Debug)]
pub struct HostConfig {
    pub hostnqn: String,
    pub hostid: [u8; 16],
    pub subnqn: String,
    pub digests: Digests,
    /// Keep-alive timeout asked for in Connect (0 = none).
    pub kato_ms: u32,
    /// Send Keep Alive every kato/2 (turn off to test the target's timer).
    pub send_keep_alive: bool,
    pub io_queues: u16,
    /// Commands in flight per I/O queue.
    pub queue_depth: u16,
    /// Ask the controller to disable SQ flow control (enables C2H SUCCESS).
    pub disable_sqflow: bool,
    /// I/O queues without a reader thread: the thread that waits for a
    /// completion reads the socket itself ([`QueuePair::poll`]) and runs
    /// the callbacks inline, as SPDK's perf tool polls its qpairs. The
    /// admin queue always has its reader (AERs, keep-alive).
    pub polled_io: bool,
    pub timeout: Duration,
}

impl HostConfig {
    pub fn new(subnqn: impl Into<String>) -> Self {
        HostConfig {
            hostnqn: "nqn.2014-08.org.nvmexpress:uuid:dm-nvme-host".into(),
            hostid: *b"dm-nvme-host-id!",
            subnqn: subnqn.into(),
            digests: Digests::default(),
            kato_ms: 10_000,
            send_keep_alive: true,
            io_queues: 1,
            queue_depth: 32,
            disable_sqflow: false,
            polled_io: false,
            timeout: Duration::from_secs(10),
        }
    }
}

struct Pending {
    data_out: Option<Arc<Vec<u8>>>,
    data_in: Vec<u8>,
    digest_error: bool,
    done: Callback,
}

struct Slots {
    free: Vec<u16>,
    pending: HashMap<u16, Pending>,
}

struct QShared {
    slots: Mutex<Slots>,
    cv: Condvar,
    dead: AtomicBool,
}

/// One queue: a TCP connection with its own reader thread.
pub struct QueuePair {
    pub qid: u16,
    stream: TcpStream,
    /// Shared with the reader thread (H2CData): one writer at a time, so
    /// PDUs never interleave on the socket.
    writer: Arc<Mutex<TcpStream>>,
    shared: Arc<QShared>,
    dg: Digests,
    icd_max: u32,
    reader: Mutex<Option<JoinHandle<()>>>,
    /// A polled queue's receiving side (no reader thread).
    polled: Option<Mutex<BufReader<TcpStream>>>,
    ctx: Arc<ReaderCtx>,
}

struct ReaderCtx {
    shared: Arc<QShared>,
    writer: Arc<Mutex<TcpStream>>,
    dg: Digests,
    max_h2c: u32,
    hpda_align: usize,
}

impl QueuePair {
    /// Opens the connection, does ICReq/ICResp and Connect. `icd_max` is
    /// the in-capsule data the controller accepts on this queue (8 KiB on
    /// the admin queue, IOCCSZ * 16 - 64 on I/O queues).
    pub fn connect(
        addr: SocketAddr,
        qid: u16,
        entries: u16,
        cfg: &HostConfig,
        cntlid: u16,
        icd_max: u32,
    ) -> HostResult<(Arc<QueuePair>, u16)> {
        let stream = TcpStream::connect_timeout(&addr, cfg.timeout)?;
        stream.set_nodelay(true)?;
        let mut w = stream.try_clone()?;
        w.write_all(&encode_ic(
            PDU_ICREQ,
            IcParams {
                pfv: 0,
                pda: 0,
                digests: cfg.digests,
                max: 0,
            },
        ))?;
        let mut r = stream.try_clone()?;
        r.set_read_timeout(Some(cfg.timeout))?;
        let raw = read_pdu(&mut r, 4096)
            .map_err(|e| HostError::Disconnected(format!("no ICResp: {e:?}")))?;
        if raw.ch.pdu_type != PDU_ICRESP {
            return Err(HostError::Disconnected(format!(
                "expected ICResp, got PDU type {:#x}",
                raw.ch.pdu_type
            )));
        }
        let ic = decode_ic(&raw.bytes);
        if ic.pfv != 0 || ic.digests != cfg.digests || ic.max < 4096 {
            return Err(HostError::Disconnected(format!("bad ICResp {ic:?}")));
        }
        let polled = cfg.polled_io && qid != 0;
        // A polled queue reads only while a completion is due: a silent
        // controller for the whole timeout is a lost connection.
        r.set_read_timeout(polled.then_some(cfg.timeout))?;
        let shared = Arc::new(QShared {
            slots: Mutex::new(Slots {
                free: (0..entries.saturating_sub(1).max(1)).rev().collect(),
                pending: HashMap::new(),
            }),
            cv: Condvar::new(),
            dead: AtomicBool::new(false),
        });
        let writer = Arc::new(Mutex::new(stream.try_clone()?));
        let ctx = Arc::new(ReaderCtx {
            shared: shared.clone(),
            writer: writer.clone(),
            dg: cfg.digests,
            max_h2c: ic.max,
            hpda_align: (ic.pda as usize + 1) * 4,
        });
        let (reader, polled) = if polled {
            (
                None,
                Some(Mutex::new(BufReader::with_capacity(READ_BUFFER_BYTES, r))),
            )
        } else {
            let ctx = ctx.clone();
            let h = thread::Builder::new()
                .name(format!("dm-nvme-q{qid}"))
                .spawn(move || reader_loop(r, &ctx))?;
            (Some(h), None)
        };
        let qp = Arc::new(QueuePair {
            qid,
            writer,
            stream,
            shared,
            dg: cfg.digests,
            icd_max,
            reader: Mutex::new(reader),
            polled,
            ctx,
        });
        let mut sqe = Sqe::new(OPC_FABRICS, 0);
        sqe.0[4] = FCTYPE_CONNECT;
        put_u16(&mut sqe.0, 42, qid);
        put_u16(&mut sqe.0, 44, entries - 1);
        sqe.0[46] = if cfg.disable_sqflow { 0x04 } else { 0 };
        put_u32(&mut sqe.0, 48, if qid == 0 { cfg.kato_ms } else { 0 });
        let mut data = vec![0u8; 1024];
        data[..16].copy_from_slice(&cfg.hostid);
        put_u16(&mut data, 16, cntlid);
        put_str0(&mut data, 256, 256, &cfg.subnqn);
        put_str0(&mut data, 512, 256, &cfg.hostnqn);
        let c = qp.exec(sqe, Some(Arc::new(data)), 0, cfg.timeout)?.ok()?;
        Ok((qp, c.dw0 as u16))
    }

    pub fn is_dead(&self) -> bool {
        self.shared.dead.load(Ordering::Acquire)
    }

    /// Submits a command; blocks only while all CIDs are in use.
    /// `data_out` goes in-capsule when it fits, else via R2T/H2CData.
    pub fn submit(
        &self,
        sqe: Sqe,
        data_out: Option<Arc<Vec<u8>>>,
        data_in_len: u32,
        done: Callback,
    ) -> HostResult<()> {
        self.submit_batch(vec![Command {
            sqe,
            data_out,
            data_in_len,
            done,
        }])
    }

    /// Submits commands in order with one socket write for all their
    /// capsules (a host's doorbell batching); blocks only while all CIDs
    /// are in use.
    pub fn submit_batch(&self, cmds: Vec<Command>) -> HostResult<()> {
        let mut pdus = Vec::new();
        for c in cmds {
            let Command {
                mut sqe,
                data_out,
                data_in_len,
                done,
            } = c;
            let mut s = self.shared.slots.lock().unwrap();
            let cid = loop {
                if self.is_dead() {
                    return Err(HostError::Disconnected("queue closed".into()));
                }
                if let Some(c) = s.free.pop() {
                    break c;
                }
                if !pdus.is_empty() {
                    // Send what is encoded before waiting: its completions
                    // are what frees a CID.
                    drop(s);
                    self.write_pdus(&pdus)?;
                    pdus.clear();
                    s = self.shared.slots.lock().unwrap();
                    continue;
                }
                s = self.shared.cv.wait(s).unwrap();
            };
            sqe.set_cid(cid);
            let mut icd: &[u8] = &[];
            match &data_out {
                Some(d) if d.len() as u32 <= self.icd_max => {
                    sqe.set_sgl(0, d.len() as u32, SGL_ICD);
                    icd = d;
                }
                Some(d) => sqe.set_sgl(0, d.len() as u32, SGL_TRANSPORT),
                None => sqe.set_sgl(0, data_in_len, SGL_TRANSPORT),
            }
            pdus.extend_from_slice(&encode_capsule_cmd(&sqe, icd, self.dg));
            s.pending.insert(
                cid,
                Pending {
                    data_out,
                    data_in: Vec::with_capacity(data_in_len as usize),
                    digest_error: false,
                    done,
                },
            );
        }
        self.write_pdus(&pdus)
    }

    fn write_pdus(&self, pdus: &[u8]) -> HostResult<()> {
        let r = self.writer.lock().unwrap().write_all(pdus);
        if let Err(e) = r {
            self.fail_all(&format!("send failed: {e}"));
            return Err(HostError::Io(e));
        }
        Ok(())
    }

    /// Submits raw PDU bytes (tests of malformed input).
    pub fn send_raw(&self, bytes: &[u8]) -> HostResult<()> {
        Ok(self.writer.lock().unwrap().write_all(bytes)?)
    }

    /// Submits and waits.
    pub fn exec(
        &self,
        sqe: Sqe,
        data_out: Option<Arc<Vec<u8>>>,
        data_in_len: u32,
        timeout: Duration,
    ) -> HostResult<Completion> {
        let (tx, rx) = mpsc::channel();
        self.submit(
            sqe,
            data_out,
            data_in_len,
            Box::new(move |r| drop(tx.send(r))),
        )?;
        if self.is_polled() {
            let deadline = Instant::now() + timeout;
            loop {
                if let Ok(r) = rx.try_recv() {
                    return r;
                }
                if Instant::now() > deadline {
                    return Err(HostError::Timeout);
                }
                self.poll()?;
            }
        }
        match rx.recv_timeout(timeout) {
            Ok(r) => r,
            Err(_) => Err(HostError::Timeout),
        }
    }

    /// The queue has no reader thread: its owner calls [`QueuePair::poll`].
    pub fn is_polled(&self) -> bool {
        self.polled.is_some()
    }

    /// A polled queue: waits for the controller's next PDU, then handles
    /// it and every further one already received (completions run their
    /// callbacks on this thread; R2Ts are answered). Call it only while a
    /// command is in flight. A no-op on a queue with a reader thread.
    pub fn poll(&self) -> HostResult<()> {
        let Some(r) = &self.polled else {
            return Ok(());
        };
        let mut r = r.lock().unwrap();
        if self.is_dead() {
            return Err(HostError::Disconnected("queue closed".into()));
        }
        loop {
            if let Err(why) = read_and_handle(&mut r, &self.ctx) {
                end_queue(&self.ctx, &why);
                return Err(HostError::Disconnected(why));
            }
            if r.buffer().is_empty() {
                return Ok(());
            }
        }
    }

    fn fail_all(&self, why: &str) {
        fail_all(&self.shared, why);
    }

    pub fn close(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
        if let Some(h) = self.reader.lock().unwrap().take() {
            if h.thread().id() != thread::current().id() {
                let _ = h.join();
            }
        }
    }
}

impl Drop for QueuePair {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

fn fail_all(shared: &QShared, why: &str) {
    shared.dead.store(true, Ordering::Release);
    let pending: Vec<Pending> = {
        let mut s = shared.slots.lock().unwrap();
        s.pending.drain().map(|(_, p)| p).collect()
    };
    shared.cv.notify_all();
    for p in pending {
        (p.done)(Err(HostError::Disconnected(why.to_string())));
    }
}

fn finish(ctx: &ReaderCtx, cid: u16, status: Status, dw0: u32, dw1: u32) {
    let p = {
        let mut s = ctx.shared.slots.lock().unwrap();
        let p = s.pending.remove(&cid);
        if p.is_some() {
            s.free.push(cid);
        }
        p
    };
    ctx.shared.cv.notify_one();
    if let Some(p) = p {
        let status = if p.digest_error && status.is_success() {
            SC_TRANSIENT_TRANSPORT
        } else {
            status
        };
        (p.done)(Ok(Completion {
            status,
            dw0,
            dw1,
            data: p.data_in,
        }));
    }
}

/// Bytes a queue's receiving side buffers (one read takes many PDUs).
const READ_BUFFER_BYTES: usize = 256 * 1024;

fn reader_loop(stream: TcpStream, ctx: &ReaderCtx) {
    let mut r = BufReader::with_capacity(READ_BUFFER_BYTES, stream);
    let why = loop {
        if let Err(why) = read_and_handle(&mut r, ctx) {
            break why;
        }
    };
    end_queue(ctx, &why);
}

/// The queue's receiving side ended (`why`): close the socket and fail
/// every command still pending.
fn end_queue(ctx: &ReaderCtx, why: &str) {
    let _ = ctx.writer.lock().unwrap().shutdown(Shutdown::Both);
    fail_all(&ctx.shared, why);
}

/// Reads the controller's next PDU and handles it; `Err` ends the queue
/// (with why).
fn read_and_handle(r: &mut BufReader<TcpStream>, ctx: &ReaderCtx) -> Result<(), String> {
    let raw = read_pdu(r, 16 << 20).map_err(|e| format!("{e:?}"))?;
    let p = check_pdu(&raw, ctx.dg).map_err(|e| format!("bad PDU from controller: {e:?}"))?;
    match p.ch.pdu_type {
        PDU_CAPSULE_RESP => {
            let cqe = Cqe::decode(&p.header[CH_LEN..]);
            finish(ctx, cqe.cid, cqe.status, cqe.dw0, cqe.dw1);
        }
        PDU_C2H_DATA => {
            let x = decode_xfer(p.header);
            let ok = {
                let mut s = ctx.shared.slots.lock().unwrap();
                match s.pending.get_mut(&x.cccid) {
                    Some(pd) if pd.data_in.len() == x.offset as usize => {
                        pd.data_in.extend_from_slice(p.data);
                        pd.digest_error |= !p.data_digest_ok;
                        true
                    }
                    _ => false,
                }
            };
            if !ok {
                return Err(format!("unexpected C2HData for cid {}", x.cccid));
            }
            if p.ch.flags & FLAG_SUCCESS != 0 {
                finish(ctx, x.cccid, Status::SUCCESS, 0, 0);
            }
        }
        PDU_R2T => {
            let x = decode_xfer(p.header);
            let data = ctx
                .shared
                .slots
                .lock()
                .unwrap()
                .pending
                .get(&x.cccid)
                .and_then(|pd| pd.data_out.clone());
            let data = match data {
                Some(d) if x.offset as usize + x.len as usize <= d.len() => d,
                _ => return Err(format!("unexpected R2T for cid {}", x.cccid)),
            };
            let mut off = x.offset as usize;
            let end = off + x.len as usize;
            let mut bytes = Vec::new();
            while off < end {
                let n = (end - off).min(ctx.max_h2c as usize);
                let flags = if off + n == end { FLAG_LAST_PDU } else { 0 };
                bytes.extend_from_slice(&encode_xfer(
                    PDU_H2C_DATA,
                    flags,
                    x.cccid,
                    x.ttag,
                    off as u32,
                    n as u32,
                    &data[off..off + n],
                    ctx.dg,
                    ctx.hpda_align,
                ));
                off += n;
            }
            if ctx.writer.lock().unwrap().write_all(&bytes).is_err() {
                return Err("send failed".into());
            }
        }
        PDU_C2H_TERM_REQ => {
            return Err(format!(
                "controller terminated the connection: FES {:#x} FEI {}",
                get_u16(p.header, 8),
                get_u32(p.header, 10)
            ))
        }
        t => return Err(format!("unexpected PDU type {t:#x}")),
    }
    Ok(())
}

/// Identify Controller fields the host uses.
#[derive(Clone, Debug, Default)]
pub struct IdCtrl {
    pub serial: String,
    pub model: String,
    pub firmware: String,
    pub cmic: u8,
    pub mdts_bytes: u32,
    pub cntlid: u16,
    pub ver: u32,
    pub oaes: u32,
    pub cntrltype: u8,
    pub anacap: u8,
    pub anagrpmax: u32,
    pub nanagrpid: u32,
    pub maxcmd: u16,
    pub nn: u32,
    pub oncs: u16,
    pub vwc: u8,
    pub sgls: u32,
    pub subnqn: String,
    pub ioccsz: u32,
    pub iorcsz: u32,
}

impl IdCtrl {
    pub fn parse(b: &[u8]) -> IdCtrl {
        let trim = |s: &[u8]| String::from_utf8_lossy(s).trim_end().to_string();
        IdCtrl {
            serial: trim(&b[4..24]),
            model: trim(&b[24..64]),
            firmware: trim(&b[64..72]),
            cmic: b[76],
            mdts_bytes: if b[77] == 0 { 0 } else { 4096u32 << b[77] },
            cntlid: get_u16(b, 78),
            ver: get_u32(b, 80),
            oaes: get_u32(b, 92),
            cntrltype: b[111],
            anacap: b[343],
            anagrpmax: get_u32(b, 344),
            nanagrpid: get_u32(b, 348),
            maxcmd: get_u16(b, 514),
            nn: get_u32(b, 516),
            oncs: get_u16(b, 520),
            vwc: b[525],
            sgls: get_u32(b, 536),
            subnqn: get_str0(b, 768, 256),
            ioccsz: get_u32(b, 1792),
            iorcsz: get_u32(b, 1796),
        }
    }
}

/// Identify Namespace fields plus identification descriptors.
#[derive(Clone, Debug, Default)]
pub struct NsInfo {
    pub num_blocks: u64,
    pub block_size: u32,
    pub nmic: u8,
    pub anagrpid: u32,
    pub nguid: [u8; 16],
    pub uuid: Option<[u8; 16]>,
}

/// One ANA group descriptor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnaGroup {
    pub grpid: u32,
    pub state: u8,
    pub chgcnt: u64,
    pub nsids: Vec<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnaLog {
    pub chgcnt: u64,
    pub groups: Vec<AnaGroup>,
}

impl AnaLog {
    pub fn parse(b: &[u8]) -> AnaLog {
        let ngrps = get_u16(b, 8) as usize;
        let mut groups = Vec::new();
        let mut o = 16;
        for _ in 0..ngrps {
            if o + 32 > b.len() {
                break;
            }
            let nnsid = get_u32(b, o + 4) as usize;
            let nsids = (0..nnsid)
                .filter(|i| o + 32 + i * 4 + 4 <= b.len())
                .map(|i| get_u32(b, o + 32 + i * 4))
                .collect();
            groups.push(AnaGroup {
                grpid: get_u32(b, o),
                chgcnt: get_u64(b, o + 8),
                state: b[o + 16] & 0xF,
                nsids,
            });
            o += 32 + nnsid * 4;
        }
        AnaLog {
            chgcnt: get_u64(b, 0),
            groups,
        }
    }

    /// ANA state of namespace `nsid`, if listed.
    pub fn state_of(&self, nsid: u32) -> Option<u8> {
        self.groups
            .iter()
            .find(|g| g.nsids.contains(&nsid))
            .map(|g| g.state)
    }
}

/// One discovery log entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveryEntry {
    pub trtype: u8,
    pub adrfam: u8,
    pub subtype: u8,
    pub treq: u8,
    pub portid: u16,
    pub cntlid: u16,
    pub trsvcid: String,
    pub subnqn: String,
    pub traddr: String,
}

/// A connected controller: admin queue, I/O queues, identify data.
pub struct Controller {
    pub cfg: HostConfig,
    pub addr: SocketAddr,
    pub admin: Arc<QueuePair>,
    pub io: Vec<Arc<QueuePair>>,
    pub cntlid: u16,
    pub id: IdCtrl,
    pub ns: Option<NsInfo>,
    ka_stop: Arc<AtomicBool>,
    ka: Option<JoinHandle<()>>,
}

impl Controller {
    /// Connects the admin queue, enables the controller, identifies it and
    /// (for an NVM subsystem) connects `cfg.io_queues` I/O queues.
    pub fn connect(addr: SocketAddr, cfg: &HostConfig) -> HostResult<Controller> {
        let (admin, cntlid) = QueuePair::connect(addr, 0, 32, cfg, 0xFFFF, 8192)?;
        let t = cfg.timeout;
        let cc = 1 | (6 << 16) | (4 << 20);
        let mut set = Sqe::new(OPC_FABRICS, 0);
        set.0[4] = FCTYPE_PROPERTY_SET;
        put_u32(&mut set.0, 44, PROP_CC);
        put_u64(&mut set.0, 48, cc);
        admin.exec(set, None, 0, t)?.ok()?;
        let deadline = Instant::now() + t;
        loop {
            let csts = Self::property_get_on(&admin, PROP_CSTS, t)?;
            if csts & 1 == 1 {
                break;
            }
            if csts & 2 != 0 || Instant::now() > deadline {
                return Err(HostError::Disconnected(format!(
                    "controller not ready (CSTS {csts:#x})"
                )));
            }
            thread::sleep(Duration::from_millis(5));
        }
        let mut c = Controller {
            cfg: cfg.clone(),
            addr,
            admin,
            io: Vec::new(),
            cntlid,
            id: IdCtrl::default(),
            ns: None,
            ka_stop: Arc::new(AtomicBool::new(false)),
            ka: None,
        };
        c.id = IdCtrl::parse(&c.identify(CNS_CONTROLLER, 0)?);
        if cfg.kato_ms > 0 && cfg.send_keep_alive {
            let (admin, stop, every) = (
                c.admin.clone(),
                c.ka_stop.clone(),
                Duration::from_millis((cfg.kato_ms / 2).max(1) as u64),
            );
            c.ka = Some(thread::spawn(move || {
                let mut last = Instant::now();
                while !stop.load(Ordering::Acquire) && !admin.is_dead() {
                    thread::sleep(Duration::from_millis(10));
                    if last.elapsed() >= every {
                        last = Instant::now();
                        let _ =
                            admin.submit(Sqe::new(ADM_KEEP_ALIVE, 0), None, 0, Box::new(|_| {}));
                    }
                }
            }));
        }
        if cfg.subnqn == DISCOVERY_NQN {
            return Ok(c);
        }
        let nq = cfg.io_queues.max(1);
        let mut sf = Sqe::new(ADM_SET_FEATURES, 0);
        sf.set_cdw(10, FID_NUM_QUEUES as u32);
        sf.set_cdw(11, (nq as u32 - 1) | ((nq as u32 - 1) << 16));
        let granted = (c.admin.exec(sf, None, 0, t)?.ok()?.dw0 & 0xFFFF) as u16 + 1;
        c.ns = Some(c.identify_ns(1)?);
        let icd_max = (c.id.ioccsz * 16).saturating_sub(64);
        for qid in 1..=nq.min(granted) {
            let (q, _) = QueuePair::connect(
                addr,
                qid,
                cfg.queue_depth.saturating_add(1).max(2),
                cfg,
                cntlid,
                icd_max,
            )?;
            c.io.push(q);
        }
        Ok(c)
    }

    fn property_get_on(admin: &QueuePair, ofst: u32, t: Duration) -> HostResult<u64> {
        let mut g = Sqe::new(OPC_FABRICS, 0);
        g.0[4] = FCTYPE_PROPERTY_GET;
        g.0[40] = if ofst == PROP_CAP { 1 } else { 0 };
        put_u32(&mut g.0, 44, ofst);
        let c = admin.exec(g, None, 0, t)?.ok()?;
        Ok(c.dw0 as u64 | ((c.dw1 as u64) << 32))
    }

    pub fn property_get(&self, ofst: u32) -> HostResult<u64> {
        Self::property_get_on(&self.admin, ofst, self.cfg.timeout)
    }

    pub fn admin_exec(
        &self,
        sqe: Sqe,
        data_out: Option<Vec<u8>>,
        data_in_len: u32,
    ) -> HostResult<Completion> {
        self.admin
            .exec(sqe, data_out.map(Arc::new), data_in_len, self.cfg.timeout)
    }

    pub fn identify(&self, cns: u8, nsid: u32) -> HostResult<Vec<u8>> {
        let mut s = Sqe::new(ADM_IDENTIFY, 0);
        s.set_nsid(nsid);
        s.set_cdw(10, cns as u32);
        Ok(self.admin_exec(s, None, 4096)?.ok()?.data)
    }

    pub fn identify_ns(&self, nsid: u32) -> HostResult<NsInfo> {
        let b = self.identify(CNS_NAMESPACE, nsid)?;
        let lbaf = b[26] & 0xF;
        let lbads = b[128 + 4 * lbaf as usize + 2];
        let mut nguid = [0u8; 16];
        nguid.copy_from_slice(&b[104..120]);
        let mut ns = NsInfo {
            num_blocks: get_u64(&b, 0),
            block_size: 1 << lbads,
            nmic: b[30],
            anagrpid: get_u32(&b, 92),
            nguid,
            uuid: None,
        };
        let d = self.identify(CNS_NS_DESC_LIST, nsid)?;
        let mut o = 0;
        while o + 4 <= d.len() && d[o] != 0 {
            let (t, l) = (d[o], d[o + 1] as usize);
            if t == 3 && l == 16 && o + 20 <= d.len() {
                let mut u = [0u8; 16];
                u.copy_from_slice(&d[o + 4..o + 20]);
                ns.uuid = Some(u);
            }
            o += 4 + l;
        }
        Ok(ns)
    }

    /// Get Log Page; `rae` retains the asynchronous event.
    pub fn get_log(
        &self,
        lid: u8,
        lsp: u8,
        len: u32,
        offset: u64,
        rae: bool,
    ) -> HostResult<Vec<u8>> {
        let numd = len / 4 - 1;
        let mut s = Sqe::new(ADM_GET_LOG_PAGE, 0);
        s.set_nsid(0xFFFF_FFFF);
        s.set_cdw(
            10,
            lid as u32 | ((lsp as u32) << 8) | ((rae as u32) << 15) | ((numd & 0xFFFF) << 16),
        );
        s.set_cdw(11, numd >> 16);
        s.set_cdw(12, offset as u32);
        s.set_cdw(13, (offset >> 32) as u32);
        Ok(self.admin_exec(s, None, len)?.ok()?.data)
    }

    pub fn ana_log(&self) -> HostResult<AnaLog> {
        let len = 16 + 32 * self.id.nanagrpid.max(1) + 4 * self.id.nn.max(1);
        Ok(AnaLog::parse(&self.get_log(
            LID_ANA,
            0,
            len.div_ceil(4) * 4,
            0,
            false,
        )?))
    }

    pub fn discovery_log(&self) -> HostResult<Vec<DiscoveryEntry>> {
        let hdr = self.get_log(LID_DISCOVERY, 0, 1024, 0, false)?;
        let n = get_u64(&hdr, 8) as u32;
        let all = self.get_log(LID_DISCOVERY, 0, 1024 * (n + 1), 0, false)?;
        Ok((0..n as usize)
            .map(|i| {
                let e = &all[1024 * (i + 1)..1024 * (i + 2)];
                DiscoveryEntry {
                    trtype: e[0],
                    adrfam: e[1],
                    subtype: e[2],
                    treq: e[3],
                    portid: get_u16(e, 4),
                    cntlid: get_u16(e, 6),
                    trsvcid: get_str0(e, 32, 32),
                    subnqn: get_str0(e, 256, 256),
                    traddr: get_str0(e, 512, 256),
                }
            })
            .collect())
    }

    pub fn set_features(&self, fid: u8, value: u32) -> HostResult<Completion> {
        let mut s = Sqe::new(ADM_SET_FEATURES, 0);
        s.set_cdw(10, fid as u32);
        s.set_cdw(11, value);
        self.admin_exec(s, None, 0)?.ok()
    }

    /// Enables ANA change notices and arms one AER; `on_event` runs on the
    /// admin reader thread with the AER dword 0 each time one completes
    /// (the AER is re-armed after each event).
    pub fn enable_ana_events(&self, on_event: Arc<dyn Fn(u32) + Send + Sync>) -> HostResult<()> {
        self.set_features(FID_ASYNC_EVENT_CFG, AEN_ANA_CHANGE)?;
        arm_aer(self.admin.clone(), on_event)
    }

    fn queue(&self, i: usize) -> HostResult<&Arc<QueuePair>> {
        self.io
            .get(i % self.io.len().max(1))
            .ok_or_else(|| HostError::Disconnected("no I/O queue".into()))
    }

    fn ns_nlb(&self, bytes: usize) -> u32 {
        (bytes / self.block_size() as usize) as u32
    }

    pub fn block_size(&self) -> u32 {
        self.ns.as_ref().map(|n| n.block_size).unwrap_or(512)
    }

    pub fn read(&self, slba: u64, nlb: u32) -> HostResult<Vec<u8>> {
        let len = nlb * self.block_size();
        Ok(self
            .queue(0)?
            .exec(
                rw_sqe(IO_READ, 1, slba, nlb, false),
                None,
                len,
                self.cfg.timeout,
            )?
            .ok()?
            .data)
    }

    pub fn write(&self, slba: u64, data: Vec<u8>, fua: bool) -> HostResult<()> {
        let nlb = self.ns_nlb(data.len());
        self.queue(0)?
            .exec(
                rw_sqe(IO_WRITE, 1, slba, nlb, fua),
                Some(Arc::new(data)),
                0,
                self.cfg.timeout,
            )?
            .ok()?;
        Ok(())
    }

    pub fn flush(&self) -> HostResult<()> {
        let mut s = Sqe::new(IO_FLUSH, 0);
        s.set_nsid(1);
        self.queue(0)?.exec(s, None, 0, self.cfg.timeout)?.ok()?;
        Ok(())
    }

    pub fn write_zeroes(&self, slba: u64, nlb: u32) -> HostResult<()> {
        self.queue(0)?
            .exec(
                rw_sqe(IO_WRITE_ZEROES, 1, slba, nlb, false),
                None,
                0,
                self.cfg.timeout,
            )?
            .ok()?;
        Ok(())
    }

    /// Dataset Management, deallocate: ranges of (slba, nlb).
    pub fn deallocate(&self, ranges: &[(u64, u32)]) -> HostResult<()> {
        let mut data = vec![0u8; 16 * ranges.len()];
        for (i, (slba, nlb)) in ranges.iter().enumerate() {
            put_u32(&mut data, i * 16 + 4, *nlb);
            put_u64(&mut data, i * 16 + 8, *slba);
        }
        let mut s = Sqe::new(IO_DSM, 0);
        s.set_nsid(1);
        s.set_cdw(10, ranges.len() as u32 - 1);
        s.set_cdw(11, 1 << 2);
        self.queue(0)?
            .exec(s, Some(Arc::new(data)), 0, self.cfg.timeout)?
            .ok()?;
        Ok(())
    }

    /// Closes every queue (the target ends the controller with the admin queue).
    pub fn disconnect(mut self) {
        self.shutdown_inner();
    }

    fn shutdown_inner(&mut self) {
        self.ka_stop.store(true, Ordering::Release);
        if let Some(h) = self.ka.take() {
            let _ = h.join();
        }
        for q in &self.io {
            q.close();
        }
        self.admin.close();
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.shutdown_inner();
    }
}

fn arm_aer(admin: Arc<QueuePair>, on_event: Arc<dyn Fn(u32) + Send + Sync>) -> HostResult<()> {
    let again = admin.clone();
    let f = on_event.clone();
    admin.submit(
        Sqe::new(ADM_ASYNC_EVENT, 0),
        None,
        0,
        Box::new(move |r| {
            if let Ok(c) = r {
                if c.status.is_success() {
                    f(c.dw0);
                    // Re-arm from a fresh thread: submitting may block on CIDs.
                    thread::spawn(move || {
                        let _ = arm_aer(again, f);
                    });
                }
            }
        }),
    )
}
