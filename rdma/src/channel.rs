//! The fabric channel: a reliable, ordered stream of records between two
//! nodes, each record written with one `fi_writedata` straight into the
//! peer's landing ring.
//!
//! Each side owns a landing ring (anonymous memory, locked, registered for
//! remote write with a key that is new on every connection) and a staging
//! ring of the same size (registered for local use), where a record is
//! built before the fabric reads it. The rings are byte rings: a record is
//! `header (32 bytes) | payload`, aligned to 64 bytes, at the same offset in
//! the writer's staging ring and the reader's landing ring; a record that
//! would cross the end starts over at offset 0, the bytes skipped counting
//! as used.
//!
//! ```text
//! header: len u32 | crc32c(bytes 8..32+len) u32 | conn u64 | consumed_bytes u64 | consumed_records u64
//! immediate data (32 bits, what verbs carries): record number mod 256 << 24 | offset / 64
//! ```
//!
//! The reader, on each completion, checks that the immediate data names
//! the next record at the expected offset, the CRC, and the connection's
//! id (`conn`, agreed over the authenticated TCP handshake), then hands the
//! payload to its caller. Credit flows back in every record's header: how
//! far the sender has consumed the ring its peer writes into. The engine's
//! cumulative ACK1 (one per poll) is therefore also the credit; a side that
//! consumed a quarter of its ring and has nothing to send writes an empty
//! record, from a reserve data records never use, so credit cannot
//! deadlock.
//!
//! Writes carrying immediate data consume a posted receive under verbs
//! (FI_RX_CQ_DATA): the channel keeps `RECV_DEPTH` receives posted and
//! never has more records in flight than that.

use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use crate::mem::Region;
use crate::sys::{consts, CmEvent, Comp, Cq, Desc, Domain, Ep, Eq, Error, Fabric, Info, Mr};

/// Record header bytes.
pub const HDR: usize = 32;
/// Record alignment (and the unit of the offset in the immediate data).
pub const ALIGN: usize = 64;
/// Receives kept posted; the most records in flight in one direction.
pub const RECV_DEPTH: usize = 64;
/// Records in flight that only credit-only records may use.
const RECORD_RESERVE: u64 = 4;
/// Largest ring the 24-bit offset field addresses (24 bits × 64 bytes).
pub const MAX_RING_BYTES: usize = (1 << 24) * ALIGN;
/// Smallest ring.
pub const MIN_RING_BYTES: usize = 64 * 1024;
/// Length of the token that ties a fabric connection to its handshake.
pub const TOKEN_BYTES: usize = 16;

const RECV_SLOT: usize = 64;
const RECV_CTX: u64 = 1 << 63;

/// What a channel is made of.
#[derive(Clone, Debug)]
pub struct ChannelConfig {
    /// libfabric provider: "tcp" (tests, any Ethernet), "verbs" (RoCE, InfiniBand).
    pub provider: String,
    /// Bytes of each ring (landing and staging); a multiple of 4096.
    pub ring_bytes: usize,
    /// Open the CQ with a wait fd (adaptive polling) instead of none (busy).
    pub wait_fd: bool,
}

impl ChannelConfig {
    /// Locked memory one channel needs: its two rings and its receive slots.
    pub fn locked_bytes(&self) -> u64 {
        2 * self.ring_bytes as u64 + 4096
    }

    fn check(&self) -> Result<(), String> {
        if self.ring_bytes < MIN_RING_BYTES
            || self.ring_bytes > MAX_RING_BYTES
            || !self.ring_bytes.is_multiple_of(4096)
        {
            return Err(format!(
                "fabric ring of {} bytes: must be a multiple of 4096 from {MIN_RING_BYTES} to {MAX_RING_BYTES}",
                self.ring_bytes
            ));
        }
        Ok(())
    }
}

/// Where a peer may write: sent over the authenticated TCP handshake only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingDesc {
    pub addr: u64,
    pub len: u64,
    pub key: u64,
}

impl RingDesc {
    pub const BYTES: usize = 24;

    pub fn to_bytes(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..16].copy_from_slice(&self.len.to_le_bytes());
        b[16..].copy_from_slice(&self.key.to_le_bytes());
        b
    }

    pub fn from_bytes(b: &[u8; 24]) -> RingDesc {
        let u = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        RingDesc {
            addr: u(0),
            len: u(8),
            key: u(16),
        }
    }
}

fn err(e: Error) -> String {
    e.to_string()
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_err()
    {
        // Keys only need to differ between connections; time does that.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        return t.as_nanos() as u64 ^ (std::process::id() as u64) << 32;
    }
    u64::from_le_bytes(b)
}

fn align(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// A listening fabric endpoint (the accepting node's fabric port).
pub struct Listener {
    pep: crate::sys::PassiveEp,
    eq: Eq,
    _info: Info,
    _fabric: Fabric,
    provider: String,
}

impl Listener {
    /// Listens on `addr` with `provider`.
    pub fn bind(provider: &str, addr: SocketAddr) -> Result<Listener, String> {
        let info = Info::get(provider, addr, true).map_err(|e| {
            format!("no libfabric provider \"{provider}\" for an RMA message endpoint on {addr}: {e} (check with `fi_info -p {provider} -t FI_EP_MSG`)")
        })?;
        let fabric = Fabric::open(&info).map_err(err)?;
        let eq = Eq::open(&fabric).map_err(err)?;
        let pep = crate::sys::PassiveEp::listen(&fabric, &info, &eq)
            .map_err(|e| format!("cannot listen on the fabric port {addr}: {e}"))?;
        Ok(Listener {
            pep,
            eq,
            _info: info,
            _fabric: fabric,
            provider: provider.to_string(),
        })
    }

    pub fn port(&self) -> Result<u16, String> {
        self.pep.port().map_err(err)
    }

    /// Rejects every pending connection request: none is expected outside
    /// a handshake. Each refusal is described in `refused`.
    pub fn reject_strays(&self, refused: &mut Vec<String>) {
        while let Ok(Some(ev)) = self.eq.read(0) {
            if let CmEvent::ConnReq { info, data } = ev {
                let _ = self.pep.reject(&info);
                refused.push(describe_stray(&data));
            }
        }
    }

    /// Waits up to `timeout` for the connection request that carries
    /// `token` (sent to the peer over the authenticated handshake), rejects
    /// every other one (described in `refused`), and accepts it.
    pub fn accept(
        &self,
        cfg: &ChannelConfig,
        token: &[u8; TOKEN_BYTES],
        timeout: Duration,
        refused: &mut Vec<String>,
    ) -> Result<Channel, String> {
        if cfg.provider != self.provider {
            return Err(format!(
                "listener runs provider {}, channel wants {}",
                self.provider, cfg.provider
            ));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("the peer did not connect to the fabric port in time".into());
            }
            let ev = self
                .eq
                .read(left.as_millis().clamp(1, 100) as i32)
                .map_err(err)?;
            match ev {
                Some(CmEvent::ConnReq { info, data }) if data == token[..] => {
                    let ch = Channel::open(cfg, &info, token)?;
                    ch.ep.accept().map_err(err)?;
                    ch.wait_connected(deadline)?;
                    return Ok(ch);
                }
                Some(CmEvent::ConnReq { info, data }) => {
                    let _ = self.pep.reject(&info);
                    refused.push(describe_stray(&data));
                }
                _ => {}
            }
        }
    }
}

fn describe_stray(data: &[u8]) -> String {
    if data.len() < TOKEN_BYTES {
        "a fabric connection request without a handshake token: rejected, nothing written".into()
    } else {
        "a fabric connection request with a token that is not the current handshake's (stale or forged): rejected, nothing written".into()
    }
}

/// Connects to the peer's fabric port at `addr` with `token` (the
/// handshake's [`TOKEN_BYTES`]; any other length is refused by a listener,
/// which is what a test of that refusal sends).
pub fn connect(
    cfg: &ChannelConfig,
    addr: SocketAddr,
    token: &[u8],
    timeout: Duration,
) -> Result<Channel, String> {
    if token.len() > 48 {
        return Err("a fabric connection token is at most 48 bytes".into());
    }
    let info = Info::get(&cfg.provider, addr, false).map_err(|e| {
        format!(
            "no libfabric provider \"{}\" reaching {addr}: {e} (check with `fi_info -p {} -t FI_EP_MSG`)",
            cfg.provider, cfg.provider
        )
    })?;
    let deadline = Instant::now() + timeout;
    let ch = Channel::open(cfg, &info, token)?;
    ch.ep.connect(&info, token).map_err(err)?;
    ch.wait_connected(deadline)?;
    Ok(ch)
}

/// Counters for the status page and the bench.
#[derive(Default, Clone, Copy, Debug)]
pub struct ChannelStats {
    pub records_sent: u64,
    pub records_received: u64,
    pub credit_records_sent: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Sends refused for want of credit (the peer had not consumed yet).
    pub credit_waits: u64,
}

/// One connection. Fields drop in order: the endpoint and registrations
/// before the queues, domain and fabric, and those before the memory.
pub struct Channel {
    ep: Ep,
    _land_mr: Mr,
    _stage_mr: Mr,
    _recv_mr: Mr,
    cq: Cq,
    eq: Eq,
    _domain: Domain,
    fabric: Fabric,
    land: Region,
    stage: Region,
    recvbuf: Region,
    stage_desc: Desc,
    recv_desc: Desc,
    local: RingDesc,
    peer: Option<RingDesc>,
    conn: u64,
    ring: u64,
    wait_fd: Option<RawFd>,
    // Writer side (into the peer's landing ring).
    tail: u64,
    records_written: u64,
    peer_consumed_bytes: u64,
    peer_consumed_records: u64,
    local_done: u64,
    // Reader side (of our landing ring).
    cursor: u64,
    records_read: u64,
    reported_bytes: u64,
    reported_records: u64,
    polls: u64,
    pub stats: ChannelStats,
}

impl Channel {
    fn open(cfg: &ChannelConfig, info: &Info, token: &[u8]) -> Result<Channel, String> {
        cfg.check()?;
        let a = info.attrs();
        if a.cq_data_size < 4 {
            return Err(format!(
                "provider {} carries {} bytes of immediate data; the fabric link needs 4",
                cfg.provider, a.cq_data_size
            ));
        }
        crate::mem::check_memlock(cfg.locked_bytes(), "link.fabric_ring_bytes")?;
        let fabric = Fabric::open(info).map_err(err)?;
        let domain = Domain::open(&fabric, info).map_err(err)?;
        let eq = Eq::open(&fabric).map_err(err)?;
        let cq = Cq::open(&domain, 2 * RECV_DEPTH + 16, cfg.wait_fd).map_err(err)?;
        let wait_fd = if cfg.wait_fd {
            Some(cq.wait_fd().map_err(err)?)
        } else {
            None
        };
        let ep = Ep::open(&domain, info, &eq, &cq).map_err(err)?;
        let map = |e: std::io::Error| e.to_string();
        let land = Region::new(cfg.ring_bytes).map_err(map)?;
        let stage = Region::new(cfg.ring_bytes).map_err(map)?;
        let recvbuf = Region::new(RECV_DEPTH * RECV_SLOT).map_err(map)?;
        // Keys: the provider's own (FI_MR_PROV_KEY) or fresh random ones
        // fitting its key size; new on every connection either way.
        let key_mask = if a.mr_key_size >= 8 {
            u64::MAX
        } else {
            (1u64 << (8 * a.mr_key_size.max(1))) - 1
        };
        let base_key = random_u64() & key_mask & !3;
        let (land_mr, land_key, _) = Mr::reg(
            &domain,
            land.as_ptr(),
            land.len(),
            consts::remote_write(),
            base_key,
        )
        .map_err(err)?;
        let (stage_mr, _, stage_desc) = Mr::reg(
            &domain,
            stage.as_ptr(),
            stage.len(),
            consts::write(),
            base_key | 1,
        )
        .map_err(err)?;
        let (recv_mr, _, recv_desc) = Mr::reg(
            &domain,
            recvbuf.as_ptr(),
            recvbuf.len(),
            consts::recv(),
            base_key | 2,
        )
        .map_err(err)?;
        let local = RingDesc {
            addr: if a.mr_mode & consts::mr_virt_addr() != 0 {
                land.as_ptr() as u64
            } else {
                0
            },
            len: land.len() as u64,
            key: land_key,
        };
        let ch = Channel {
            ep,
            _land_mr: land_mr,
            _stage_mr: stage_mr,
            _recv_mr: recv_mr,
            cq,
            eq,
            _domain: domain,
            fabric,
            land,
            stage,
            recvbuf,
            stage_desc,
            recv_desc,
            local,
            peer: None,
            conn: {
                let mut c = [0u8; 8];
                let n = token.len().min(8);
                c[..n].copy_from_slice(&token[..n]);
                u64::from_le_bytes(c)
            },
            ring: cfg.ring_bytes as u64,
            wait_fd,
            tail: 0,
            records_written: 0,
            peer_consumed_bytes: 0,
            peer_consumed_records: 0,
            local_done: 0,
            cursor: 0,
            records_read: 0,
            reported_bytes: 0,
            reported_records: 0,
            polls: 0,
            stats: ChannelStats::default(),
        };
        // Receives are posted before the connection exists, so the first
        // write finds one (verbs would otherwise answer receiver-not-ready).
        for i in 0..RECV_DEPTH {
            ch.post_recv(i)?;
        }
        Ok(ch)
    }

    fn post_recv(&self, i: usize) -> Result<(), String> {
        // The slot lives in `recvbuf`, owned by the channel and dropped
        // after the endpoint, as `Ep::recv` requires.
        let p = self.recvbuf.as_ptr().wrapping_add(i * RECV_SLOT);
        match self
            .ep
            .recv(p, RECV_SLOT, self.recv_desc, RECV_CTX | i as u64)
        {
            Ok(true) => Ok(()),
            Ok(false) => Err("fi_recv: receive queue full".into()),
            Err(e) => Err(err(e)),
        }
    }

    fn wait_connected(&self, deadline: Instant) -> Result<(), String> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("fabric connection not established in time".into());
            }
            match self
                .eq
                .read(left.as_millis().clamp(1, 100) as i32)
                .map_err(err)?
            {
                Some(CmEvent::Connected) => return Ok(()),
                Some(CmEvent::Error(e)) => {
                    return Err(format!("fabric connection refused or failed: {e}"))
                }
                Some(CmEvent::Shutdown) => return Err("fabric connection shut down".into()),
                _ => {}
            }
        }
    }

    /// Where the peer may write (send it over the authenticated handshake).
    pub fn local_ring(&self) -> RingDesc {
        self.local
    }

    /// The peer's landing ring, received over the authenticated handshake.
    pub fn set_peer(&mut self, d: RingDesc) -> Result<(), String> {
        if d.len != self.ring {
            return Err(format!(
                "the peer's landing ring is {} bytes, this node's {}: set the same link.fabric_ring_bytes on both nodes",
                d.len, self.ring
            ));
        }
        self.peer = Some(d);
        Ok(())
    }

    /// The CQ's wait fd (adaptive polling), if opened with one.
    pub fn wait_fd(&self) -> Option<RawFd> {
        self.wait_fd
    }

    /// Whether the caller may now block on [`Self::wait_fd`] (`fi_trywait`):
    /// false when completions may be pending.
    pub fn trywait(&self) -> Result<bool, String> {
        self.fabric.trywait(&self.cq).map_err(err)
    }

    /// The largest payload one record can carry.
    pub fn max_payload(&self) -> usize {
        self.ring as usize - HDR - ALIGN
    }

    /// Room, in payload bytes, for a data record at the ring's next offset
    /// now (a larger one may still fit after the end of the ring is
    /// skipped: [`Self::send`] decides).
    pub fn space(&self) -> usize {
        let Some((_, _, room)) = self.place(0, false) else {
            return 0;
        };
        room
    }

    /// Where a record of `payload` bytes would go: (padding, offset, the
    /// largest payload that would fit at that offset), or None.
    fn place(&self, payload: usize, credit_only: bool) -> Option<(u64, u64, usize)> {
        let reserve_records = if credit_only { 0 } else { RECORD_RESERVE };
        let in_flight = self.records_written - self.peer_consumed_records.min(self.records_written);
        if in_flight + 1 + reserve_records > RECV_DEPTH as u64 {
            return None;
        }
        let reserve_bytes = if credit_only { 0 } else { 4 * ALIGN as u64 };
        let base = self.peer_consumed_bytes.min(self.local_done);
        let free = (self.ring - (self.tail - base)).saturating_sub(reserve_bytes);
        let off = self.tail % self.ring;
        let need = align(HDR + payload) as u64;
        let to_end = self.ring - off;
        if to_end >= need && free >= need {
            let room = (to_end.min(free) as usize / ALIGN * ALIGN).saturating_sub(HDR);
            return Some((0, off, room));
        }
        if to_end < need && free >= to_end + need {
            let room =
                ((free - to_end).min(self.ring) as usize / ALIGN * ALIGN).saturating_sub(HDR);
            return Some((to_end, 0, room));
        }
        None
    }

    /// Writes one record holding `payload` into the peer's landing ring.
    /// Ok(false): no room yet (wait for credit, poll, retry).
    pub fn send(&mut self, payload: &[u8]) -> Result<bool, String> {
        self.send_record(payload, false)
    }

    fn send_record(&mut self, payload: &[u8], credit_only: bool) -> Result<bool, String> {
        let Some(peer) = self.peer else {
            return Err("the peer's landing ring is not known yet".into());
        };
        if payload.len() > self.max_payload() {
            return Err(format!(
                "a record of {} bytes exceeds the fabric ring ({} bytes)",
                payload.len(),
                self.ring
            ));
        }
        let Some((pad, off, _)) = self.place(payload.len(), credit_only) else {
            self.stats.credit_waits += 1;
            return Ok(false);
        };
        let total = align(HDR + payload.len());
        let (conn, cb, cr) = (self.conn, self.cursor, self.records_read);
        let rec = self.stage.slice_mut(off as usize, total);
        rec[0..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        rec[8..16].copy_from_slice(&conn.to_le_bytes());
        rec[16..24].copy_from_slice(&cb.to_le_bytes());
        rec[24..32].copy_from_slice(&cr.to_le_bytes());
        rec[HDR..HDR + payload.len()].copy_from_slice(payload);
        let crc = crc32c::crc32c(&rec[8..HDR + payload.len()]);
        rec[4..8].copy_from_slice(&crc.to_le_bytes());
        let imm = ((self.records_written as u32 & 0xff) << 24) | (off / ALIGN as u64) as u32;
        let end = self.tail + pad + total as u64;
        let src = self.stage.as_ptr().wrapping_add(off as usize);
        let len = HDR + payload.len();
        if !self
            .ep
            .write_data(
                src,
                len,
                self.stage_desc,
                imm,
                peer.addr + off,
                peer.key,
                end,
            )
            .map_err(err)?
        {
            // The transmit queue is full: nothing was posted.
            self.stats.credit_waits += 1;
            return Ok(false);
        }
        self.tail = end;
        self.records_written += 1;
        self.reported_bytes = cb;
        self.reported_records = cr;
        self.stats.records_sent += 1;
        self.stats.bytes_sent += len as u64;
        if credit_only {
            self.stats.credit_records_sent += 1;
        }
        Ok(true)
    }

    /// Sends an empty record when a quarter of the landing ring (or of the
    /// receives) has been consumed without telling the peer. Call after the
    /// last send of a poll.
    pub fn send_credit_if_due(&mut self) -> Result<(), String> {
        let bytes_due = self.cursor - self.reported_bytes >= self.ring / 4;
        let recs_due = self.records_read - self.reported_records >= RECV_DEPTH as u64 / 4;
        if (bytes_due || recs_due) && self.peer.is_some() {
            self.send_record(&[], true)?;
        }
        Ok(())
    }

    /// Reaps completions: records that landed are checked and handed to
    /// `deliver` in order (empty credit-only records are not); finished
    /// local writes free staging space. Returns how many records were
    /// delivered; an error means the connection is unusable.
    pub fn poll(&mut self, mut deliver: impl FnMut(&[u8])) -> Result<usize, String> {
        let mut delivered = 0;
        self.polls += 1;
        if self.polls.is_multiple_of(1024) {
            self.check_eq()?;
        }
        for _ in 0..16 {
            let mut comps = [Comp::default(); 32];
            let n = self.cq.read(&mut comps).map_err(err)?;
            for c in &comps[..n] {
                if c.err != 0 {
                    return Err(format!(
                        "fabric completion error: {} (provider error {})",
                        crate::sys::strerror(c.err),
                        c.prov_errno
                    ));
                }
                if c.flags & consts::remote_cq_data() != 0 {
                    self.land_record(c.data as u32, &mut deliver, &mut delivered)?;
                    if c.context & RECV_CTX != 0 {
                        self.post_recv((c.context & 0xffff) as usize)?;
                    }
                } else if c.context & RECV_CTX != 0 {
                    return Err("the peer sent a message the fabric link does not use".into());
                } else {
                    // A local write finished: its staging bytes are free.
                    self.local_done = self.local_done.max(c.context);
                }
            }
            if n < 32 {
                break;
            }
        }
        Ok(delivered)
    }

    fn check_eq(&self) -> Result<(), String> {
        match self.eq.read(0).map_err(err)? {
            Some(CmEvent::Shutdown) => Err("the peer shut the fabric connection down".into()),
            Some(CmEvent::Error(e)) => Err(format!("fabric connection error: {e}")),
            _ => Ok(()),
        }
    }

    fn land_record(
        &mut self,
        imm: u32,
        deliver: &mut impl FnMut(&[u8]),
        delivered: &mut usize,
    ) -> Result<(), String> {
        let off = (imm & 0xff_ffff) as u64 * ALIGN as u64;
        let expect = self.cursor % self.ring;
        if off != expect {
            if off != 0 {
                return Err(format!(
                    "fabric record at offset {off}, expected {expect}: the peer broke the ring protocol"
                ));
            }
            // The writer skipped the end of the ring.
            self.cursor += self.ring - expect;
        }
        if imm >> 24 != (self.records_read as u32 & 0xff) {
            return Err(format!(
                "fabric record number {} where {} was due",
                imm >> 24,
                self.records_read & 0xff
            ));
        }
        let off = off as usize;
        let hdr = self.land.slice(off, HDR);
        let len = u32::from_le_bytes(hdr[0..4].try_into().expect("4")) as usize;
        if off + HDR + len > self.ring as usize {
            return Err(format!("fabric record of {len} bytes overruns the ring"));
        }
        let rec = self.land.slice(off, HDR + len);
        let crc = u32::from_le_bytes(rec[4..8].try_into().expect("4"));
        if crc32c::crc32c(&rec[8..]) != crc {
            return Err("fabric record checksum mismatch".into());
        }
        let u = |i: usize| u64::from_le_bytes(rec[i..i + 8].try_into().expect("8"));
        if u(8) != self.conn {
            return Err("fabric record of another connection".into());
        }
        let (cb, cr) = (u(16), u(24));
        if cb < self.peer_consumed_bytes
            || cb > self.tail
            || cr < self.peer_consumed_records
            || cr > self.records_written
        {
            return Err("fabric record carries impossible credit".into());
        }
        self.peer_consumed_bytes = cb;
        self.peer_consumed_records = cr;
        if len > 0 {
            deliver(&rec[HDR..]);
            *delivered += 1;
        }
        self.cursor += align(HDR + len) as u64;
        self.records_read += 1;
        self.stats.records_received += 1;
        self.stats.bytes_received += (HDR + len) as u64;
        Ok(())
    }

    /// Tells the peer the connection ends (it sees a shutdown event).
    pub fn shutdown(&self) {
        self.ep.shutdown();
    }
}
