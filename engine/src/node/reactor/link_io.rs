//! The reactor's side of the replication link: taking a connection from
//! the link manager, feeding what arrives to the core and sending its
//! output, through the [`crate::link::Transport`] seam (TCP or fabric).

use super::*;

impl<B: Backend> Reactor<B> {
    pub(super) fn take_link(&mut self) -> bool {
        let Some(c) = self.link.take() else {
            return false;
        };
        if self.conn.is_some() {
            self.drop_socket(false);
        }
        self.conn = Some(c);
        self.link_armed = None;
        self.stages.drop_samples();
        self.peer_refused = None;
        self.core.handle(Event::PeerConnected);
        true
    }

    /// Closes the replication connection and forgets what it buffered.
    pub(super) fn close_socket(&mut self) {
        if let Some(mut c) = self.conn.take() {
            // A poll still armed on the socket fires on the shutdown (and
            // the kernel lets go of the socket then).
            c.close();
        }
        self.link_armed = None;
    }

    pub(super) fn drop_socket(&mut self, reconnect: bool) {
        self.close_socket();
        self.stages.drop_samples();
        self.core.handle(Event::PeerDisconnected);
        if reconnect {
            self.link.request();
        }
    }

    pub(super) fn read_socket(&mut self) -> bool {
        let Some(c) = self.conn.as_mut() else {
            return false;
        };
        // The socket was empty: no receive until its poll fires (a
        // `recvfrom` per pass otherwise: hundreds of thousands a second
        // on two cores the peer and the hosts share).
        if let Some(fd) = self.link_armed {
            if !self.backend.poll_fired(fd) {
                return false;
            }
            self.link_armed = None;
        }
        self.msgs.clear();
        // A REQ's payload is copied once, from the link's receive buffer
        // into a buffer of the node's pool: the buffer the ring keeps and
        // the disk write uses. No free buffer: the frame waits (see
        // `Transport::recv`). A payload larger than the pool's largest
        // buffer (a peer with a larger reactor.max_io_bytes) gets a heap
        // buffer.
        let pool = &self.shared.pool;
        let mut copied = 0u64;
        let mut alloc = |n: usize| {
            let b = if n > pool.max_buf() {
                Some(IoBuf::new(n))
            } else {
                pool.get(n)
            };
            if b.is_some() {
                copied += n as u64;
            }
            b
        };
        let r = c.recv(&mut self.msgs, &mut alloc);
        self.copies.link_receive += copied;
        // Read until it would block: the next receive waits for the poll
        // (armed now, it fires at once if bytes came in meanwhile).
        if let Some(fd) = c.idle_fd() {
            if self.backend.arm_poll(fd) {
                self.link_armed = Some(fd);
            }
        }
        match r {
            Ok(0) if self.msgs.is_empty() => return false,
            Ok(n) => self.bytes_received += n,
            Err(e) => {
                log::warn!("{e}");
                self.drop_socket(true);
                return true;
            }
        }
        self.msgs_received += self.msgs.len() as u64;
        for m in std::mem::take(&mut self.msgs) {
            match &m {
                Msg::Refuse { reason } => self.peer_refused = Some(reason.clone()),
                Msg::Req { hdr, .. } => self.stages.req_received(hdr.seq),
                _ => {}
            }
            self.core.handle(Event::PeerMsg(m));
        }
        self.stages.ack1_received(self.core.watermarks().0);
        true
    }

    pub(super) fn write_socket(&mut self) -> bool {
        let Some(c) = self.conn.as_mut() else {
            return false;
        };
        match c.flush() {
            Ok(n) => {
                self.bytes_sent += n;
                n > 0
            }
            Err(e) => {
                log::warn!("{e}");
                self.drop_socket(true);
                true
            }
        }
    }
}
