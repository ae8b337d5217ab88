//! The fabric transport: the same frames as TCP, carried as records that
//! the sender writes with `fi_writedata` straight into the receiver's
//! landing ring (see the `rdma` crate's `channel`), over an FI_EP_MSG
//! endpoint with manual progress.
//!
//! Set-up rides on the authenticated TCP handshake, after both PSK proofs:
//! ```text
//! acceptor -> dialer : "DMFAB001" | fabric port u16 | token [16]
//! dialer             : fi_connect to (link.peer's address, port) with the token as private data
//! acceptor           : accepts only the request carrying the token (any other is rejected and logged)
//! both, over TCP     : landing ring address u64 | length u64 | key u64 (a new registration per connection)
//! ```
//! No key ever leaves a node before the peer proved the PSK, and a token
//! serves one connection only.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rdma::{Channel, ChannelConfig, Listener, RingDesc, TOKEN_BYTES};

use super::{parse_frames, push_frame, push_req_frame, Transport, FRAME_HEADER_BYTES};
use crate::core::msg::Msg;
use crate::core::ReqHeader;
use crate::sys::random_bytes;
use volume::IoBuf;

const FABRIC_MAGIC: &[u8; 8] = b"DMFAB001";

/// `link.transport = "fabric"`: the provider and the ring size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FabricOptions {
    /// libfabric provider: "tcp" or "verbs".
    pub provider: String,
    /// Bytes of the landing ring (and of the staging ring).
    pub ring_bytes: usize,
    /// Where the accepting node (node 2) listens for the fabric connection.
    pub listen: SocketAddr,
}

impl FabricOptions {
    pub fn channel(&self, busy: bool) -> ChannelConfig {
        ChannelConfig {
            provider: self.provider.clone(),
            ring_bytes: self.ring_bytes,
            wait_fd: !busy,
        }
    }
}

/// Acceptor side, after the PSK handshake on `s`.
pub fn setup_accept(
    s: &mut TcpStream,
    listener: &Listener,
    cfg: &ChannelConfig,
    timeout: Duration,
    refusals: &AtomicU64,
) -> Result<Channel, String> {
    let mut token = [0u8; TOKEN_BYTES];
    random_bytes(&mut token).map_err(|e| e.to_string())?;
    let port = listener.port()?;
    let mut hello = Vec::with_capacity(26);
    hello.extend_from_slice(FABRIC_MAGIC);
    hello.extend_from_slice(&port.to_le_bytes());
    hello.extend_from_slice(&token);
    s.write_all(&hello).map_err(|e| e.to_string())?;
    let mut refused = Vec::new();
    let r = listener.accept(cfg, &token, timeout, &mut refused);
    for why in refused {
        refusals.fetch_add(1, Ordering::Relaxed);
        log::warn!("fabric port: {why}");
    }
    let mut ch = r?;
    exchange_rings(s, &mut ch)?;
    Ok(ch)
}

/// Dialer side, after the PSK handshake on `s` with the peer at `peer`.
pub fn setup_dial(
    s: &mut TcpStream,
    peer: SocketAddr,
    cfg: &ChannelConfig,
    timeout: Duration,
) -> Result<Channel, String> {
    let mut hello = [0u8; 26];
    s.read_exact(&mut hello).map_err(|e| e.to_string())?;
    if &hello[..8] != FABRIC_MAGIC {
        return Err("the peer did not offer a fabric connection".into());
    }
    let port = u16::from_le_bytes([hello[8], hello[9]]);
    let token: [u8; TOKEN_BYTES] = hello[10..26].try_into().expect("16 bytes");
    let mut ch = rdma::connect(cfg, SocketAddr::new(peer.ip(), port), &token, timeout)?;
    exchange_rings(s, &mut ch)?;
    Ok(ch)
}

fn exchange_rings(s: &mut TcpStream, ch: &mut Channel) -> Result<(), String> {
    s.write_all(&ch.local_ring().to_bytes())
        .map_err(|e| e.to_string())?;
    let mut b = [0u8; RingDesc::BYTES];
    s.read_exact(&mut b).map_err(|e| e.to_string())?;
    ch.set_peer(RingDesc::from_bytes(&b))
}

pub struct FabricLink {
    ch: Channel,
    tx: Vec<u8>,
    tx_off: usize,
    max_frame: usize,
}

impl FabricLink {
    pub fn new(ch: Channel, max_frame: usize) -> FabricLink {
        FabricLink {
            ch,
            tx: Vec::with_capacity(1 << 20),
            tx_off: 0,
            max_frame,
        }
    }

    pub fn stats(&self) -> rdma::ChannelStats {
        self.ch.stats
    }

    /// Bytes of whole frames at the front of `buf`, at most `room` (but
    /// always the first frame).
    fn whole_frames(buf: &[u8], room: usize) -> usize {
        let mut n = 0;
        while buf.len() - n >= FRAME_HEADER_BYTES {
            let len = u32::from_le_bytes(buf[n..n + 4].try_into().expect("4 bytes")) as usize;
            let f = FRAME_HEADER_BYTES + len;
            if n > 0 && n + f > room {
                break;
            }
            n += f;
            if n >= room {
                break;
            }
        }
        n
    }
}

impl Transport for FabricLink {
    fn kind(&self) -> &'static str {
        "fabric"
    }

    fn send(&mut self, m: &Msg) {
        push_frame(&mut self.tx, m);
    }

    fn send_req(&mut self, hdr: &ReqHeader, payload: &[u8]) {
        push_req_frame(&mut self.tx, hdr, payload);
    }

    /// A landing-ring record is taken whole: a REQ whose payload finds no
    /// buffer in `alloc` gets a heap one (the fabric has no back-pressure
    /// through its ring short of not reading it).
    fn recv(
        &mut self,
        out: &mut Vec<Msg>,
        alloc: &mut dyn FnMut(usize) -> Option<IoBuf>,
    ) -> Result<u64, String> {
        let mut bytes = 0u64;
        let mut bad = None;
        let max = self.max_frame;
        let polled = self.ch.poll(|rec| {
            bytes += rec.len() as u64;
            if bad.is_some() {
                return;
            }
            let mut alloc = |n| alloc(n).or_else(|| Some(IoBuf::new(n)));
            match parse_frames(rec, max, out, &mut alloc) {
                Ok(p) if p.used == rec.len() => {}
                Ok(_) => bad = Some("a fabric record ends inside a frame".to_string()),
                Err(e) => bad = Some(e.to_string()),
            }
        });
        polled.map_err(|e| format!("replication link lost (fabric): {e}"))?;
        match bad {
            Some(e) => Err(format!("replication link: {e}; dropping the connection")),
            None => Ok(bytes),
        }
    }

    fn flush(&mut self) -> Result<u64, String> {
        let mut sent = 0u64;
        while self.tx_off < self.tx.len() {
            let room = self.ch.space().min(self.ch.max_payload());
            let n = Self::whole_frames(&self.tx[self.tx_off..], room.max(1));
            let sent_now = self
                .ch
                .send(&self.tx[self.tx_off..self.tx_off + n])
                .map_err(|e| format!("replication link lost (fabric): {e}"))?;
            if !sent_now {
                break;
            }
            self.tx_off += n;
            sent += n as u64;
        }
        if self.tx_off == self.tx.len() {
            self.tx.clear();
            self.tx_off = 0;
        }
        self.ch
            .send_credit_if_due()
            .map_err(|e| format!("replication link lost (fabric): {e}"))?;
        Ok(sent)
    }

    fn sleep_fd(&mut self) -> Option<(RawFd, bool)> {
        let fd = self.ch.wait_fd()?;
        match self.ch.trywait() {
            Ok(true) => Some((fd, false)),
            // Completions may be pending: poll again instead of sleeping
            // (an error shows in the next poll).
            _ => None,
        }
    }

    fn close(&mut self) {
        self.ch.shutdown();
        self.tx.clear();
        self.tx_off = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_frames_never_splits_a_frame() {
        let mut b = Vec::new();
        push_frame(&mut b, &Msg::Ack1(1));
        let one = b.len();
        push_frame(&mut b, &Msg::Ack2(2));
        push_frame(&mut b, &Msg::Ack3(3));
        assert_eq!(FabricLink::whole_frames(&b, b.len()), b.len());
        assert_eq!(FabricLink::whole_frames(&b, one + 1), one);
        // The first frame is always offered (the channel may fit it after
        // skipping the end of its ring).
        assert_eq!(FabricLink::whole_frames(&b, 1), one);
    }
}
