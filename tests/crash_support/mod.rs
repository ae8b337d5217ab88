//! Pieces of the randomized crash test (tests/crash.rs) that know nothing
//! of faults: a seeded generator, a minimal NBD client (fixed newstyle
//! handshake, NBD_OPT_GO, pipelined NBD_CMD_WRITE with cookies), the
//! self-describing 4 KiB write patterns, the oracle of acknowledged writes
//! and a bare HTTP client for the admin endpoint.
//!
//! Written for this test from the NBD protocol document; nothing here is a
//! mock: the client talks to the real `deltamirror serve` processes.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

pub const BLOCK: usize = 4096;

/// splitmix64: small, seedable, good enough to draw faults and blocks.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x6a09_e667_f3bc_c908)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in lo..=hi.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
    pub fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }
}

// ---------------------------------------------------------------- patterns

const MAGIC: &[u8; 8] = b"DMCRASH1";

/// The 4 KiB written as the `counter`-th write of the run, to `block`: a
/// header naming both, then a stream derived from them and the run's salt.
/// Any block read back tells which write (if any) put it there.
pub fn pattern(block: u64, counter: u64, salt: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(BLOCK);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&block.to_le_bytes());
    b.extend_from_slice(&counter.to_le_bytes());
    b.extend_from_slice(&salt.to_le_bytes());
    let mut r = Rng::new(block.rotate_left(32) ^ counter ^ salt);
    while b.len() < BLOCK {
        b.extend_from_slice(&r.next().to_le_bytes());
    }
    b
}

/// What a block read back from a volume image holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// Never written (all zeroes).
    Zero,
    /// Exactly the pattern of write `counter` to `block`.
    Write { block: u64, counter: u64 },
    /// Anything else: torn, foreign salt, garbage.
    Garbage,
}

pub fn identify(data: &[u8], salt: u64) -> Found {
    if data.iter().all(|&x| x == 0) {
        return Found::Zero;
    }
    if data.len() != BLOCK || &data[0..8] != MAGIC {
        return Found::Garbage;
    }
    let word = |i: usize| u64::from_le_bytes(data[i..i + 8].try_into().unwrap());
    let (block, counter, s) = (word(8), word(16), word(24));
    if s != salt || pattern(block, counter, salt) != data {
        return Found::Garbage;
    }
    Found::Write { block, counter }
}

// ------------------------------------------------------------------ oracle

/// Per block: the last acknowledged write and every write issued after it
/// (acknowledged or not yet / never). Writes to one block are issued one at
/// a time, so acknowledgements of one block arrive in issue order.
#[derive(Clone, Default)]
struct Hist {
    acked: Option<u64>,
    later: Vec<u64>,
}

/// A block whose content is not an allowed value.
#[derive(Clone, Debug)]
pub struct Violation {
    pub block: u64,
    pub found: Found,
    pub acked: Option<u64>,
    pub later: Vec<u64>,
    /// True when the block holds older data than its last acknowledged
    /// write (or zeroes): an acknowledged write was lost.
    pub lost_ack: bool,
}

pub struct Oracle {
    blocks: Vec<Hist>,
    pub salt: u64,
}

impl Oracle {
    pub fn new(blocks: u64, salt: u64) -> Oracle {
        Oracle {
            blocks: vec![Hist::default(); blocks as usize],
            salt,
        }
    }

    /// Called before the write is sent.
    pub fn issue(&mut self, block: u64, counter: u64) {
        self.blocks[block as usize].later.push(counter);
    }

    /// Called only after the write's successful reply.
    pub fn ack(&mut self, block: u64, counter: u64) {
        let h = &mut self.blocks[block as usize];
        debug_assert!(h.acked.is_none_or(|a| a < counter));
        h.acked = Some(counter);
        h.later.retain(|&c| c > counter);
    }

    /// Checks one block's content against the allowed values: its last
    /// acknowledged write (zeroes if none) or any write issued after it.
    pub fn check(&self, block: u64, data: &[u8]) -> Option<Violation> {
        let h = &self.blocks[block as usize];
        let found = identify(data, self.salt);
        let ok = match found {
            Found::Zero => h.acked.is_none(),
            Found::Write { block: b, counter } => {
                b == block && (h.acked == Some(counter) || h.later.contains(&counter))
            }
            Found::Garbage => false,
        };
        if ok {
            return None;
        }
        let lost_ack = match (found, h.acked) {
            (Found::Zero, Some(_)) => true,
            (Found::Write { block: b, counter }, Some(a)) => b == block && counter < a,
            _ => false,
        };
        Some(Violation {
            block,
            found,
            acked: h.acked,
            later: h.later.clone(),
            lost_ack,
        })
    }

    /// Blocks that have an acknowledged write.
    pub fn acked_blocks(&self) -> u64 {
        self.blocks.iter().filter(|h| h.acked.is_some()).count() as u64
    }
}

// -------------------------------------------------------------- NBD client

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const INFO_EXPORT: u16 = 0;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const CMD_WRITE: u16 = 1;

fn bad(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// One NBD connection in the transmission phase. Requests are pipelined;
/// only writes are sent, so every reply is a 16-byte simple reply.
pub struct NbdConn {
    s: TcpStream,
    rx: Vec<u8>,
    pub size: u64,
}

impl NbdConn {
    /// Fixed newstyle handshake and NBD_OPT_GO for `export`. Times out
    /// (error) against a stalled server.
    pub fn connect(addr: &str, export: &str) -> io::Result<NbdConn> {
        let sa: SocketAddr = addr.parse().map_err(|e| bad(format!("{addr}: {e}")))?;
        let s = TcpStream::connect_timeout(&sa, Duration::from_secs(1))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.set_write_timeout(Some(Duration::from_secs(30)))?;
        let mut c = NbdConn {
            s,
            rx: Vec::new(),
            size: 0,
        };
        if c.u64()? != NBDMAGIC || c.u64()? != IHAVEOPT {
            return Err(bad("not an NBD newstyle server".into()));
        }
        let flags = c.u16()?;
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(bad(format!("server flags {flags:#x}: no fixed newstyle")));
        }
        let cflags = (flags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)) as u32;
        let mut m = cflags.to_be_bytes().to_vec();
        let mut data = (export.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&OPT_GO.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(&data);
        c.s.write_all(&m)?;
        loop {
            if c.u64()? != OPTION_REPLY_MAGIC || c.u32()? != OPT_GO {
                return Err(bad("bad option reply".into()));
            }
            let kind = c.u32()?;
            let len = c.u32()? as usize;
            let d = c.bytes(len)?;
            if kind == REP_INFO && len == 12 && d[0..2] == INFO_EXPORT.to_be_bytes() {
                c.size = u64::from_be_bytes(d[2..10].try_into().unwrap());
            } else if kind == REP_ACK {
                break;
            } else if kind & (1 << 31) != 0 {
                return Err(bad(format!(
                    "NBD_OPT_GO refused: {kind:#x} {}",
                    String::from_utf8_lossy(&d)
                )));
            }
        }
        // Replies are polled: a short timeout lets the writer look at its
        // flags while a stalled server holds its requests.
        c.s.set_read_timeout(Some(Duration::from_millis(100)))?;
        Ok(c)
    }

    fn bytes(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut b = vec![0; n];
        self.s.read_exact(&mut b)?;
        Ok(b)
    }
    fn u16(&mut self) -> io::Result<u16> {
        Ok(u16::from_be_bytes(self.bytes(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> io::Result<u32> {
        Ok(u32::from_be_bytes(self.bytes(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> io::Result<u64> {
        Ok(u64::from_be_bytes(self.bytes(8)?.try_into().unwrap()))
    }

    pub fn send_write(&mut self, cookie: u64, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut m = Vec::with_capacity(28 + data.len());
        m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        m.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&CMD_WRITE.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.s.write_all(&m)
    }

    /// The next reply `(errno, cookie)`, `None` if none arrived within the
    /// poll timeout; an error once the connection is gone.
    pub fn poll_reply(&mut self) -> io::Result<Option<(u32, u64)>> {
        loop {
            if self.rx.len() >= 16 {
                let r: Vec<u8> = self.rx.drain(..16).collect();
                let magic = u32::from_be_bytes(r[0..4].try_into().unwrap());
                if magic != SIMPLE_REPLY_MAGIC {
                    return Err(bad(format!("reply magic {magic:#x}")));
                }
                let errno = u32::from_be_bytes(r[4..8].try_into().unwrap());
                let cookie = u64::from_be_bytes(r[8..16].try_into().unwrap());
                return Ok(Some((errno, cookie)));
            }
            let mut buf = [0u8; 4096];
            match self.s.read(&mut buf) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.rx.extend_from_slice(&buf[..n]),
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut =>
                {
                    return Ok(None)
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

// -------------------------------------------------------------------- HTTP

/// `METHOD path` on the admin endpoint: (status code, body). `None` when
/// the node does not answer within `timeout` (down or stopped).
pub fn http(addr: &str, method: &str, path: &str, timeout: Duration) -> Option<(u16, Vec<u8>)> {
    let sa: SocketAddr = addr.parse().ok()?;
    let mut s = TcpStream::connect_timeout(&sa, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.set_write_timeout(Some(timeout)).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..end]).to_string();
    let code: u16 = head.split_whitespace().nth(1)?.parse().ok()?;
    let mut body = raw[end + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body)?;
    }
    Some((code, body))
}

fn dechunk(mut d: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = d.windows(2).position(|w| w == b"\r\n")?;
        let line = std::str::from_utf8(&d[..eol]).ok()?;
        let n = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
        d = &d[eol + 2..];
        if n == 0 {
            return Some(out);
        }
        out.extend_from_slice(d.get(..n)?);
        d = d.get(n + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_identify_themselves() {
        let p = pattern(7, 42, 99);
        assert_eq!(p.len(), BLOCK);
        assert_eq!(
            identify(&p, 99),
            Found::Write {
                block: 7,
                counter: 42
            }
        );
        assert_eq!(identify(&p, 98), Found::Garbage);
        let mut torn = p.clone();
        torn[2048..].copy_from_slice(&pattern(7, 43, 99)[2048..]);
        assert_eq!(identify(&torn, 99), Found::Garbage);
        assert_eq!(identify(&[0u8; BLOCK], 99), Found::Zero);
    }

    #[test]
    fn oracle_allows_the_last_ack_and_later_writes_only() {
        let mut o = Oracle::new(4, 1);
        assert!(o.check(0, &[0u8; BLOCK]).is_none());
        o.issue(0, 1);
        assert!(o.check(0, &[0u8; BLOCK]).is_none(), "unacked: zero allowed");
        assert!(o.check(0, &pattern(0, 1, 1)).is_none());
        o.ack(0, 1);
        let v = o.check(0, &[0u8; BLOCK]).unwrap();
        assert!(v.lost_ack);
        o.issue(0, 5);
        assert!(o.check(0, &pattern(0, 1, 1)).is_none());
        assert!(o.check(0, &pattern(0, 5, 1)).is_none());
        o.issue(0, 9);
        o.ack(0, 9);
        assert!(o.check(0, &pattern(0, 5, 1)).unwrap().lost_ack);
        assert!(!o.check(0, &pattern(1, 9, 1)).unwrap().lost_ack);
        assert!(o.check(0, &pattern(0, 9, 1)).is_none());
    }
}
