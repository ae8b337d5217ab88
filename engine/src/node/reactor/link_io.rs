//! The reactor's replication socket: taking a connection from the link
//! manager, reading frames into the core and writing its output.

use super::*;

impl<B: Backend> Reactor<B> {
    pub(super) fn take_link(&mut self) -> bool {
        let Some(s) = self.link.take() else {
            return false;
        };
        if self.sock.is_some() {
            self.drop_socket(false);
        }
        // Every path that closes a socket also empties the buffers.
        self.sock = Some(s);
        self.peer_refused = None;
        self.core.handle(Event::PeerConnected);
        true
    }

    /// Closes the replication socket and forgets its buffered bytes.
    pub(super) fn close_socket(&mut self) {
        if let Some(s) = self.sock.take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        self.rx_len = 0;
        self.tx.clear();
        self.tx_off = 0;
    }

    pub(super) fn drop_socket(&mut self, reconnect: bool) {
        self.close_socket();
        self.core.handle(Event::PeerDisconnected);
        if reconnect {
            self.link.request();
        }
    }

    pub(super) fn read_socket(&mut self) -> bool {
        let Some(s) = self.sock.as_mut() else {
            return false;
        };
        let mut did = false;
        loop {
            if self.rx_len == self.rx.len() {
                break;
            }
            match s.read(&mut self.rx[self.rx_len..]) {
                Ok(0) => {
                    log::warn!("replication peer closed the connection");
                    self.drop_socket(true);
                    return true;
                }
                Ok(n) => {
                    self.rx_len += n;
                    self.bytes_received += n as u64;
                    did = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("replication link read error: {e}");
                    self.drop_socket(true);
                    return true;
                }
            }
        }
        if !did {
            return false;
        }
        self.msgs.clear();
        match parse_frames(
            &self.rx[..self.rx_len],
            self.opts.max_message_bytes,
            &mut self.msgs,
        ) {
            Ok(used) => {
                self.rx.copy_within(used..self.rx_len, 0);
                self.rx_len -= used;
            }
            Err(e) => {
                log::error!("replication link: {e}; dropping the connection");
                self.drop_socket(true);
                return true;
            }
        }
        self.msgs_received += self.msgs.len() as u64;
        for m in std::mem::take(&mut self.msgs) {
            if let Msg::Refuse { reason } = &m {
                self.peer_refused = Some(reason.clone());
            }
            self.core.handle(Event::PeerMsg(m));
        }
        true
    }

    pub(super) fn write_socket(&mut self) -> bool {
        let Some(s) = self.sock.as_mut() else {
            self.tx.clear();
            self.tx_off = 0;
            return false;
        };
        let mut did = false;
        while self.tx_off < self.tx.len() {
            match s.write(&self.tx[self.tx_off..]) {
                Ok(n) => {
                    self.tx_off += n;
                    self.bytes_sent += n as u64;
                    did = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("replication link write error: {e}");
                    self.drop_socket(true);
                    return true;
                }
            }
        }
        if self.tx_off == self.tx.len() {
            self.tx.clear();
            self.tx_off = 0;
        }
        did
    }
}
