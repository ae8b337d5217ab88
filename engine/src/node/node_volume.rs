//! The volume the front-ends see, and the operator's control handle.

use super::*;

/// The node's block volume: what NBD, NVMe/TCP and iSCSI export.
pub struct NodeVolume {
    pub(super) shared: Arc<Shared>,
}

impl NodeVolume {
    pub(super) fn wake(&self) {
        if self.shared.sleeping.load(Ordering::Acquire) {
            self.shared.wake.notify();
        }
    }
}

impl Volume for NodeVolume {
    fn geometry(&self) -> Geometry {
        self.shared.geometry
    }
    fn identity(&self) -> VolumeIdentity {
        self.shared.identity.clone()
    }
    fn path_state(&self) -> PathState {
        self.shared.path.get()
    }
    fn path_epoch(&self) -> u64 {
        self.shared.path.epoch()
    }
    fn max_io_bytes(&self) -> u32 {
        self.shared.max_io_bytes
    }
    fn submit(&self, op: VolumeOp, done: Completion) {
        let g = self.shared.geometry;
        let check = match &op {
            VolumeOp::Read { offset, len } => g.check_range(*offset, *len as u64).and_then(|_| {
                if *len > self.shared.max_io_bytes {
                    Err(IoError::TooLarge)
                } else {
                    Ok(())
                }
            }),
            VolumeOp::Write { offset, data, .. } => {
                g.check_range(*offset, data.len() as u64).and_then(|_| {
                    if data.len() as u64 > self.shared.max_io_bytes as u64 {
                        Err(IoError::TooLarge)
                    } else {
                        Ok(())
                    }
                })
            }
            VolumeOp::Discard { offset, len } | VolumeOp::WriteZeroes { offset, len } => {
                g.check_range(*offset, *len)
            }
            VolumeOp::Flush => Ok(()),
        };
        if let Err(e) = check {
            return done(Err(e));
        }
        if self.shared.stop.load(Ordering::Acquire) {
            return done(Err(IoError::Unavailable));
        }
        let mut item = HostOp {
            op,
            done,
            start: Instant::now(),
        };
        // The mailbox is bounded; a full mailbox means the reactor is
        // saturated: back off briefly rather than grow memory.
        loop {
            match self.shared.mailbox.push(item) {
                Ok(()) => break,
                Err(back) => {
                    item = back;
                    self.shared.wake.notify();
                    std::thread::yield_now();
                }
            }
        }
        self.wake();
    }
    /// A buffer from the node's pool; `None` when the pool has none free
    /// (the front-end retries on its next poll). A request larger than the
    /// pool's largest buffer gets a heap buffer, so `submit` refuses it
    /// with `TooLarge` instead of the front-end waiting for ever.
    fn alloc_buf(&self, len: usize) -> Option<IoBuf> {
        if len > self.shared.pool.max_buf() {
            return Some(IoBuf::new(len));
        }
        self.shared.pool.get(len)
    }
    fn persistent_state(&self) -> Option<Vec<u8>> {
        self.shared.state.get()
    }
    fn put_persistent_state(&self, blob: Vec<u8>, done: Completion) {
        if self.shared.stop.load(Ordering::Acquire) {
            return done(Err(IoError::Unavailable));
        }
        if self.shared.state.put(blob, done) {
            self.shared.wake.notify();
        }
    }
    fn max_state_bytes(&self) -> usize {
        self.shared.state.max_bytes()
    }
}

/// The control interface of a running node.
pub struct NodeControl {
    pub(super) shared: Arc<Shared>,
}

impl NodeControl {
    /// The status the reactor last published, without the process's
    /// resident set (which `status` reads from /proc): for pollers that
    /// need only the node's state, such as the failover watchdog.
    pub fn published_status(&self) -> NodeStatus {
        self.shared.status.lock().unwrap().clone()
    }

    pub(super) fn command(&self, c: Command) -> Result<(), String> {
        let reply = Arc::new(Reply::default());
        self.shared
            .commands
            .lock()
            .unwrap()
            .push_back((c, reply.clone()));
        self.shared.wake.notify();
        let mut g = reply.r.lock().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(r) = g.take() {
                return r;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("the node did not answer within 30 s".into());
            }
            g = reply.c.wait_timeout(g, left).unwrap().0;
        }
    }
}

impl crate::status::Control for NodeControl {
    fn status(&self) -> NodeStatus {
        let mut s = self.published_status();
        s.rss_bytes = rss_bytes();
        let sh = &self.shared;
        s.reactors = vec![crate::status::ReactorLoad {
            thread: sh.reactor_thread.clone(),
            core: sh.core_id,
            busy_us: sh.load.busy_ns() / 1000,
            idle_us: sh.load.idle_ns() / 1000,
        }];
        s
    }
    fn promote(&self, force: bool) -> Result<(), String> {
        self.command(Command::Promote { force })
    }
    fn demote(&self) -> Result<(), String> {
        self.command(Command::Demote)
    }
    fn reset_latency(&self) -> Result<(), String> {
        self.command(Command::ResetLatency)
    }
    fn verify(&self, req: crate::status::VerifyRequest) -> Result<(), String> {
        self.command(Command::Verify(req))
    }
}

impl NodeControl {
    /// A command of the failover agent (automatic failover), answered by
    /// the reactor between batches.
    pub fn failover(&self, c: crate::status::FailoverCommand) -> Result<(), String> {
        self.command(Command::Failover(c))
    }
}
