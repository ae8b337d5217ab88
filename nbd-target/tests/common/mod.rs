//! A small NBD client for tests: raw handshake and request helpers.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use nbd_target::proto::*;
use nbd_target::{start, NbdConfig, NbdServer};
use volume::MemVolume;

pub const EXPORT: &str = "vol0";

pub fn serve(vol: &Arc<MemVolume>) -> NbdServer {
    serve_dyn(vol.clone())
}

pub struct Client {
    pub s: TcpStream,
}

impl Client {
    /// Connects and reads the server greeting; returns the handshake flags.
    pub fn connect(addr: SocketAddr) -> (Client, u16) {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_nodelay(true).unwrap();
        let mut c = Client { s };
        assert_eq!(c.u64(), NBDMAGIC);
        assert_eq!(c.u64(), IHAVEOPT);
        let flags = c.u16();
        (c, flags)
    }

    /// Connects and sends client flags (fixed newstyle + no zeroes).
    pub fn negotiating(addr: SocketAddr) -> Client {
        let (mut c, flags) = Client::connect(addr);
        assert_eq!(flags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        c.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        c
    }

    /// Full handshake with NBD_OPT_GO; returns (size, transmission flags).
    pub fn go(addr: SocketAddr) -> (Client, u64, u16) {
        let mut c = Client::negotiating(addr);
        let replies = c.option(OPT_GO, &info_request(EXPORT, &[]));
        let (size, flags) = export_info(&replies).unwrap();
        assert_eq!(replies.last().unwrap().0, REP_ACK);
        (c, size, flags)
    }

    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0; n];
        self.s.read_exact(&mut b).unwrap();
        b
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.bytes(2).try_into().unwrap())
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.bytes(4).try_into().unwrap())
    }
    pub fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.bytes(8).try_into().unwrap())
    }

    pub fn send_option(&mut self, opt: u32, data: &[u8]) {
        let mut m = Vec::new();
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.send(&m);
    }

    /// One option reply: (type, data).
    pub fn option_reply(&mut self, opt: u32) -> (u32, Vec<u8>) {
        assert_eq!(self.u64(), OPTION_REPLY_MAGIC);
        assert_eq!(self.u32(), opt);
        let kind = self.u32();
        let len = self.u32() as usize;
        (kind, self.bytes(len))
    }

    /// Sends an option and collects replies up to the final one.
    pub fn option(&mut self, opt: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
        self.send_option(opt, data);
        let mut out = Vec::new();
        loop {
            let r = self.option_reply(opt);
            let last = r.0 == REP_ACK || r.0 & (1 << 31) != 0;
            out.push(r);
            if last {
                return out;
            }
        }
    }

    pub fn request(
        &mut self,
        kind: u16,
        flags: u16,
        handle: u64,
        offset: u64,
        len: u32,
        data: &[u8],
    ) {
        let mut m = Vec::with_capacity(28 + data.len());
        m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&handle.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(data);
        self.send(&m);
    }

    /// Reads a simple reply header: (errno, handle).
    pub fn reply(&mut self) -> (u32, u64) {
        assert_eq!(self.u32(), SIMPLE_REPLY_MAGIC);
        let errno = self.u32();
        (errno, self.u64())
    }

    /// Request and wait for its reply (one in flight); returns (errno, data).
    pub fn call(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> (u32, Vec<u8>) {
        self.request(kind, flags, 42, offset, len, data);
        let (errno, handle) = self.reply();
        assert_eq!(handle, 42);
        let payload = if kind == CMD_READ && errno == 0 {
            self.bytes(len as usize)
        } else {
            vec![]
        };
        (errno, payload)
    }

    /// How the connection ends on the next read: EOF, a reset, bytes, or
    /// silence until the read timeout.
    pub fn next_read(&mut self) -> ReadEnd {
        let mut b = [0u8; 1];
        loop {
            return match self.s.read(&mut b) {
                Ok(0) => ReadEnd::Eof,
                Ok(_) => ReadEnd::Data(b[0]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    ReadEnd::Reset
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    ReadEnd::Timeout
                }
                Err(e) => ReadEnd::Other(e.kind()),
            };
        }
    }

    /// True once the server has closed the connection (EOF or reset). A
    /// server that goes silent (the read times out) or sends more bytes has
    /// not closed it.
    pub fn is_closed(&mut self) -> bool {
        matches!(self.next_read(), ReadEnd::Eof | ReadEnd::Reset)
    }

    /// Asserts that the server closed the connection (EOF or reset), naming
    /// what was seen instead.
    #[track_caller]
    pub fn expect_closed(&mut self) {
        let end = self.next_read();
        assert!(
            matches!(end, ReadEnd::Eof | ReadEnd::Reset),
            "expected the server to close the connection (EOF or reset), got {end:?}"
        );
    }
}

/// What [`Client::next_read`] saw.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadEnd {
    Eof,
    Reset,
    /// The read timed out: the server is silent, the connection open.
    Timeout,
    /// A byte arrived (the first one).
    Data(u8),
    Other(std::io::ErrorKind),
}

pub fn info_request(name: &str, reqs: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
    for r in reqs {
        d.extend_from_slice(&r.to_be_bytes());
    }
    d
}

/// Finds NBD_INFO_EXPORT among option replies.
pub fn export_info(replies: &[(u32, Vec<u8>)]) -> Option<(u64, u16)> {
    replies.iter().find_map(|(k, d)| {
        (*k == REP_INFO && d.len() == 12 && d[0..2] == INFO_EXPORT.to_be_bytes()).then(|| {
            (
                u64::from_be_bytes(d[2..10].try_into().unwrap()),
                u16::from_be_bytes([d[10], d[11]]),
            )
        })
    })
}

/// Finds the payload of one NBD_REP_INFO type.
pub fn info_payload(replies: &[(u32, Vec<u8>)], info: u16) -> Option<Vec<u8>> {
    replies.iter().find_map(|(k, d)| {
        (*k == REP_INFO && d.len() >= 2 && d[0..2] == info.to_be_bytes()).then(|| d[2..].to_vec())
    })
}

pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A MemVolume whose requests complete on a separate thread, like the
/// engine's: exercises the reply thread rather than the inline path.
pub struct AsyncVolume {
    pub inner: Arc<MemVolume>,
    queue: std::sync::Mutex<std::sync::mpsc::Sender<(volume::VolumeOp, volume::Completion)>>,
}

impl AsyncVolume {
    pub fn new(inner: Arc<MemVolume>) -> Arc<AsyncVolume> {
        let (tx, rx) = std::sync::mpsc::channel::<(volume::VolumeOp, volume::Completion)>();
        let worker_vol = inner.clone();
        std::thread::spawn(move || {
            for (op, done) in rx {
                volume::Volume::submit(&*worker_vol, op, done);
            }
        });
        Arc::new(AsyncVolume {
            inner,
            queue: std::sync::Mutex::new(tx),
        })
    }
}

impl volume::Wrapper for AsyncVolume {
    fn inner(&self) -> &dyn volume::Volume {
        &*self.inner
    }
    fn take(&self, op: volume::VolumeOp, done: volume::Completion) {
        let _ = self.queue.lock().unwrap().send((op, done));
    }
}

pub fn serve_dyn(vol: Arc<dyn volume::Volume>) -> NbdServer {
    serve_with(vol, 8)
}

/// The loopback configuration the tests serve with: export [`EXPORT`] on
/// an ephemeral port, at most `max_connections` clients.
pub fn config(max_connections: usize) -> NbdConfig {
    NbdConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        export_name: EXPORT.into(),
        description: "deltamirror test volume".into(),
        max_connections,
        zero_copy_receive_min_bytes: nbd_target::DEFAULT_ZERO_COPY_RECEIVE_MIN_BYTES,
    }
}

pub fn serve_with(vol: Arc<dyn volume::Volume>, max_connections: usize) -> NbdServer {
    let _ = env_logger::builder().is_test(true).try_init();
    start(config(max_connections), vol).unwrap()
}
