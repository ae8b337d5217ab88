//! The TCP transport: frames written to and read from the authenticated,
//! non-blocking socket the link manager hands over.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};

use super::{parse_frames, push_frame, push_req_frame, Transport};
use crate::core::msg::Msg;
use crate::core::ReqHeader;

/// Bytes buffered for reading, at least one largest frame.
pub const RX_BUF_BYTES: usize = 4 << 20;

pub struct TcpLink {
    sock: TcpStream,
    rx: Vec<u8>,
    rx_len: usize,
    tx: Vec<u8>,
    tx_off: usize,
    max_frame: usize,
}

impl TcpLink {
    pub fn new(sock: TcpStream, max_frame: usize) -> TcpLink {
        TcpLink {
            sock,
            rx: vec![0; RX_BUF_BYTES.max(max_frame + 64)],
            rx_len: 0,
            tx: Vec::with_capacity(1 << 20),
            tx_off: 0,
            max_frame,
        }
    }
}

impl Transport for TcpLink {
    fn kind(&self) -> &'static str {
        "tcp"
    }

    fn send(&mut self, m: &Msg) {
        push_frame(&mut self.tx, m);
    }

    fn send_req(&mut self, hdr: &ReqHeader, payload: &[u8]) {
        push_req_frame(&mut self.tx, hdr, payload);
    }

    fn recv(&mut self, out: &mut Vec<Msg>) -> Result<u64, String> {
        let mut got = 0u64;
        while self.rx_len < self.rx.len() {
            match self.sock.read(&mut self.rx[self.rx_len..]) {
                Ok(0) => return Err("replication peer closed the connection".into()),
                Ok(n) => {
                    self.rx_len += n;
                    got += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("replication link read error: {e}")),
            }
        }
        if got == 0 {
            return Ok(0);
        }
        let used = parse_frames(&self.rx[..self.rx_len], self.max_frame, out)
            .map_err(|e| format!("replication link: {e}; dropping the connection"))?;
        self.rx.copy_within(used..self.rx_len, 0);
        self.rx_len -= used;
        Ok(got)
    }

    fn flush(&mut self) -> Result<u64, String> {
        let mut sent = 0u64;
        while self.tx_off < self.tx.len() {
            match self.sock.write(&self.tx[self.tx_off..]) {
                Ok(n) => {
                    self.tx_off += n;
                    sent += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("replication link write error: {e}")),
            }
        }
        if self.tx_off == self.tx.len() {
            self.tx.clear();
            self.tx_off = 0;
        }
        Ok(sent)
    }

    fn sleep_fd(&mut self) -> Option<(RawFd, bool)> {
        Some((self.sock.as_raw_fd(), self.tx_off < self.tx.len()))
    }

    fn close(&mut self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        self.rx_len = 0;
        self.tx.clear();
        self.tx_off = 0;
    }
}
