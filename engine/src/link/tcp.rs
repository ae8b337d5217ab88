//! The TCP transport: frames written to and read from the authenticated,
//! non-blocking socket the link manager hands over.
//!
//! Sending: small messages are encoded into a byte segment; a REQ whose
//! payload is a shared buffer is queued as its frame header and REQ header
//! bytes (CRC computed over them and the payload in place) followed by the
//! buffer itself, and [`Transport::flush`] writes the queued segments with
//! one `writev` (up to [`MAX_IOVECS`] of them), resuming a partial write
//! where it stopped. The queue holds each buffer's clone until its last
//! byte left, then drops it (the buffer returns to its pool once its other
//! owners are done too).
//!
//! Receiving: a REQ's payload is decoded straight into the buffer the
//! reactor's allocator gives (the node's pool); when it gives none, the
//! frame stays in the receive buffer, nothing more is read once that is
//! full (TCP holds the sender back), and the next `recv` tries again.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};

use super::{parse_frames, push_frame, push_req_frame, req_frame_head, Transport};
use crate::core::msg::Msg;
use crate::core::ReqHeader;
use volume::{IoBuf, SharedBuf};

/// Bytes buffered for reading, at least one largest frame.
pub const RX_BUF_BYTES: usize = 4 << 20;

/// Most segments one `writev` takes.
pub const MAX_IOVECS: usize = 64;

/// A byte segment grows up to this before a new one starts (so a sent
/// segment's memory is reused, not one vector growing for ever).
const SEGMENT_BYTES: usize = 256 << 10;

/// One piece of the transmit queue.
enum Seg {
    /// Encoded frames, or the head of a REQ frame.
    Bytes(Vec<u8>),
    /// A REQ's payload, sent from the buffer it arrived in.
    Buf(SharedBuf),
}

impl Seg {
    fn bytes(&self) -> &[u8] {
        match self {
            Seg::Bytes(v) => v,
            Seg::Buf(b) => b,
        }
    }
}

pub struct TcpLink {
    sock: TcpStream,
    rx: Vec<u8>,
    rx_len: usize,
    /// A complete frame waits in `rx` for a payload buffer.
    rx_blocked: bool,
    /// The last `recv` read the socket until it would block and left no
    /// frame waiting in `rx` for a buffer.
    rx_empty: bool,
    tx: VecDeque<Seg>,
    /// Bytes of the front segment already sent.
    tx_off: usize,
    /// Emptied byte segments, kept for reuse.
    spare: Vec<Vec<u8>>,
    max_frame: usize,
}

impl TcpLink {
    pub fn new(sock: TcpStream, max_frame: usize) -> TcpLink {
        TcpLink {
            sock,
            // Filled with a non-zero byte so that every page is resident
            // from the start (a zeroed allocation's pages would become
            // resident one by one as frames first reach them: a memory
            // step in the middle of a long run). Its contents before
            // `rx_len` are never read.
            rx: vec![0xa5; RX_BUF_BYTES.max(max_frame + 64)],
            rx_len: 0,
            rx_blocked: false,
            rx_empty: false,
            tx: VecDeque::new(),
            tx_off: 0,
            spare: Vec::new(),
            max_frame,
        }
    }

    /// The byte segment at the back of the queue to append to (a new one
    /// when the back is a buffer or full).
    fn tail(&mut self) -> &mut Vec<u8> {
        let fresh = match self.tx.back() {
            Some(Seg::Bytes(v)) => v.len() >= SEGMENT_BYTES,
            _ => true,
        };
        if fresh {
            let v = self.spare.pop().unwrap_or_default();
            self.tx.push_back(Seg::Bytes(v));
        }
        match self.tx.back_mut() {
            Some(Seg::Bytes(v)) => v,
            _ => unreachable!("a byte segment was just put at the back"),
        }
    }

    /// Drops the first `n` sent bytes from the queue.
    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(front) = self.tx.front() else { break };
            let left = front.bytes().len() - self.tx_off;
            if n < left {
                self.tx_off += n;
                return;
            }
            n -= left;
            self.tx_off = 0;
            if let Some(Seg::Bytes(mut v)) = self.tx.pop_front() {
                if v.capacity() <= SEGMENT_BYTES * 2 && self.spare.len() < 4 {
                    v.clear();
                    self.spare.push(v);
                }
            }
        }
    }

    /// Bytes queued and not yet sent.
    pub fn queued_bytes(&self) -> usize {
        self.tx.iter().map(|s| s.bytes().len()).sum::<usize>() - self.tx_off
    }
}

impl Transport for TcpLink {
    fn kind(&self) -> &'static str {
        "tcp"
    }

    fn send(&mut self, m: &Msg) {
        push_frame(self.tail(), m);
    }

    fn send_req(&mut self, hdr: &ReqHeader, payload: &[u8]) {
        push_req_frame(self.tail(), hdr, payload);
    }

    fn send_req_buf(&mut self, hdr: &ReqHeader, payload: SharedBuf) -> usize {
        req_frame_head(self.tail(), hdr, &payload);
        if !payload.is_empty() {
            self.tx.push_back(Seg::Buf(payload));
        }
        0
    }

    fn recv(
        &mut self,
        out: &mut Vec<Msg>,
        alloc: &mut dyn FnMut(usize) -> Option<IoBuf>,
    ) -> Result<u64, String> {
        let mut got = 0u64;
        let mut drained = false;
        self.rx_empty = false;
        while self.rx_len < self.rx.len() {
            match self.sock.read(&mut self.rx[self.rx_len..]) {
                Ok(0) => return Err("replication peer closed the connection".into()),
                Ok(n) => {
                    self.rx_len += n;
                    got += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    drained = true;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("replication link read error: {e}")),
            }
        }
        if got == 0 && !self.rx_blocked {
            self.rx_empty = drained;
            return Ok(0);
        }
        let p = parse_frames(&self.rx[..self.rx_len], self.max_frame, out, alloc)
            .map_err(|e| format!("replication link: {e}; dropping the connection"))?;
        self.rx_blocked = p.blocked;
        self.rx_empty = drained && !p.blocked;
        self.rx.copy_within(p.used..self.rx_len, 0);
        self.rx_len -= p.used;
        Ok(got)
    }

    fn flush(&mut self) -> Result<u64, String> {
        let mut sent = 0u64;
        while !self.tx.is_empty() {
            let mut iov: [IoSlice<'_>; MAX_IOVECS] = [IoSlice::new(&[]); MAX_IOVECS];
            let mut n = 0;
            for (i, s) in self.tx.iter().take(MAX_IOVECS).enumerate() {
                let b = s.bytes();
                iov[i] = IoSlice::new(if i == 0 { &b[self.tx_off..] } else { b });
                n += 1;
            }
            match self.sock.write_vectored(&iov[..n]) {
                Ok(0) => return Err("replication link write returned 0 bytes".into()),
                Ok(w) => {
                    self.advance(w);
                    sent += w as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("replication link write error: {e}")),
            }
        }
        Ok(sent)
    }

    fn sleep_fd(&mut self) -> Option<(RawFd, bool)> {
        Some((self.sock.as_raw_fd(), !self.tx.is_empty()))
    }

    fn idle_fd(&self) -> Option<RawFd> {
        self.rx_empty.then(|| self.sock.as_raw_fd())
    }

    fn close(&mut self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        self.rx_len = 0;
        self.rx_blocked = false;
        self.rx_empty = false;
        self.tx.clear();
        self.tx_off = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::ReqKind;
    use crate::link::heap;
    use std::net::TcpListener;
    use volume::IoBufPool;

    /// Sets a socket buffer size (`SO_SNDBUF` / `SO_RCVBUF`).
    fn set_buf(s: &TcpStream, opt: libc::c_int, bytes: libc::c_int) {
        // SAFETY: setsockopt reads one c_int from a live local; the
        // descriptor is the stream's own.
        let rc = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                &bytes as *const libc::c_int as *const libc::c_void,
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "setsockopt: {}", io::Error::last_os_error());
    }

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    fn hdr(seq: u64, len: u64) -> ReqHeader {
        ReqHeader {
            seq,
            gen: 1,
            kind: ReqKind::Write,
            fua: false,
            offset: seq * 65536,
            len,
        }
    }

    /// REQ frames sent from shared pool buffers with writev, between small
    /// messages, through a socket with tiny buffers: the first flush stops
    /// part-way (a partial write), later flushes resume where it stopped,
    /// and the peer decodes every frame in order with the payloads intact.
    /// Each buffer is let go once its bytes left.
    #[test]
    fn vectored_send_resumes_partial_writes() {
        let (a, b) = pair();
        set_buf(&a, libc::SO_SNDBUF, 32 << 10);
        set_buf(&b, libc::SO_RCVBUF, 32 << 10);
        a.set_nonblocking(true).unwrap();
        let mut link = TcpLink::new(a, 8 << 20);
        let pool = IoBufPool::new(12 << 20, 64 << 10);
        const N: u64 = 40;
        let payload_of = |i: u64| -> Vec<u8> {
            (0..65536u64)
                .map(|j| ((i * 31 + j * 7) % 251) as u8)
                .collect()
        };
        for i in 0..N {
            link.send(&Msg::Ack1(i));
            let mut buf = pool.get(65536).unwrap();
            buf.copy_from_slice(&payload_of(i));
            assert_eq!(link.send_req_buf(&hdr(i, 65536), buf.share()), 0);
        }
        link.send(&Msg::Ack2(N));
        let total = link.queued_bytes();
        assert!(total > (N * 65536) as usize);
        let first = link.flush().unwrap() as usize;
        assert!(
            first > 0 && first < total,
            "first flush sent {first} of {total}"
        );
        assert!(link.sleep_fd().unwrap().1, "waits for writability");
        // The reader decodes frames as they come.
        let reader = std::thread::spawn(move || {
            let mut b = b;
            let mut rx = Vec::new();
            let mut chunk = vec![0u8; 3000];
            let mut out = Vec::new();
            while out.len() < 2 * N as usize + 1 {
                let n = b.read(&mut chunk).unwrap();
                assert!(n > 0, "sender closed early");
                rx.extend_from_slice(&chunk[..n]);
                let p = parse_frames(&rx, 8 << 20, &mut out, &mut heap).unwrap();
                rx.drain(..p.used);
            }
            assert!(rx.is_empty());
            out
        });
        let mut sent = first;
        let mut flushes = 1;
        while link.queued_bytes() > 0 {
            sent += link.flush().unwrap() as usize;
            flushes += 1;
            std::thread::yield_now();
        }
        assert_eq!(sent, total);
        assert!(flushes > 2);
        assert!(!link.sleep_fd().unwrap().1);
        // Every buffer left the queue with its bytes.
        assert_eq!(pool.in_use_bytes(), 0);
        let out = reader.join().unwrap();
        for i in 0..N {
            assert_eq!(out[2 * i as usize], Msg::Ack1(i));
            match &out[2 * i as usize + 1] {
                Msg::Req { hdr: h, payload } => {
                    assert_eq!(*h, hdr(i, 65536));
                    assert!(payload[..] == payload_of(i)[..], "payload {i} differs");
                }
                m => panic!("frame {i}: expected a REQ, got {m:?}"),
            }
        }
        assert_eq!(out[2 * N as usize], Msg::Ack2(N));
    }

    /// A REQ that finds no payload buffer stays in the receive buffer (with
    /// what follows it) and is decoded on a later call, even when no new
    /// bytes arrived meanwhile.
    #[test]
    fn a_req_waits_for_a_pool_buffer() {
        let (a, b) = pair();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        let mut tx = TcpLink::new(a, 1 << 20);
        let mut rx = TcpLink::new(b, 1 << 20);
        let pool = IoBufPool::new(1 << 20, 4096);
        tx.send(&Msg::Ack1(1));
        tx.send_req(&hdr(2, 4096), &[9u8; 4096]);
        tx.send(&Msg::Ack2(1));
        while tx.queued_bytes() > 0 {
            tx.flush().unwrap();
        }
        let mut out = Vec::new();
        let mut got = 0;
        while got < tx_len(&hdr(2, 4096)) {
            got += rx.recv(&mut out, &mut |_| None).unwrap();
            std::thread::yield_now();
        }
        assert_eq!(out, vec![Msg::Ack1(1)]);
        assert!(rx.rx_blocked);
        // Still no buffer: nothing more.
        assert_eq!(rx.recv(&mut out, &mut |_| None).unwrap(), 0);
        assert_eq!(out.len(), 1);
        // A buffer: the REQ and the ACK2 behind it, in order.
        assert_eq!(rx.recv(&mut out, &mut |n| pool.get(n)).unwrap(), 0);
        assert_eq!(out.len(), 3);
        assert!(
            matches!(&out[1], Msg::Req { payload, .. } if payload.is_pooled() && payload[..] == [9u8; 4096][..])
        );
        assert_eq!(out[2], Msg::Ack2(1));
        assert!(!rx.rx_blocked);
    }

    /// Bytes of the three frames `a_req_waits_for_a_pool_buffer` sends.
    fn tx_len(h: &ReqHeader) -> u64 {
        let mut v = Vec::new();
        push_frame(&mut v, &Msg::Ack1(1));
        push_req_frame(&mut v, h, &[9u8; 4096]);
        push_frame(&mut v, &Msg::Ack2(1));
        v.len() as u64
    }
}
