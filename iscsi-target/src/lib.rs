//! iSCSI target (RFC 7143) exporting one `Volume` as LUN 0, with ALUA path
//! states that follow the mirror role.
//!
//! Threads: one acceptor, and per connection a short-lived login thread that
//! hands the socket to a connection reactor ([`netreactor`]) once the login
//! completes. From then on the connection has no thread of its own: its
//! reactor frames PDUs from the received bytes, collects Data-Out, submits
//! to the volume without waiting, and encodes the responses when the
//! volume's completions wake it (`conn::IscsiConn`). Many commands are in
//! flight per connection, bounded by the CmdSN window (`QUEUE_DEPTH`).
//!
//! Architecture invariant: nothing here knows about mirroring; the volume's
//! path state is the only role information, and volume errors become SCSI
//! sense in exactly one place (`scsi::io_error_sense`).

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use netreactor::{ReactorConfig, Reactors};
use volume::Volume;

pub use netreactor::DEFAULT_ZERO_COPY_RECEIVE_MIN_BYTES;

mod conn;
pub mod login;
mod lun;
mod opcodes;
pub mod pdu;
mod pr;
pub mod scsi;
mod sense;
mod vpd;
mod xcopy;

/// Commands a session may have in flight (the CmdSN window size).
pub const QUEUE_DEPTH: u32 = 128;

/// CHAP secrets. `user`/`secret` authenticate the initiator; `mutual`
/// (user, secret) is what the target answers with when the initiator asks
/// the target to authenticate itself.
#[derive(Clone, Debug)]
pub struct ChapConfig {
    pub user: String,
    pub secret: String,
    pub mutual: Option<(String, String)>,
}

#[derive(Clone, Debug)]
pub struct IscsiConfig {
    pub listen: SocketAddr,
    pub target_iqn: String,
    /// Require CHAP (None: AuthMethod=None).
    pub chap: Option<ChapConfig>,
    pub portal_group_tag: u16,
    /// Portals of the peer node. SendTargets lists them beside our own
    /// while this node's path is standby (so a host that discovers through
    /// the standby finds the primary); the primary lists only its own, as
    /// a host that logs in to every listed portal must find the LU there.
    pub peer_portals: Vec<SocketAddr>,
    /// The peer's portal group tag. None: the other of 1 and 2 when ours
    /// is 1 or 2 (as the shipped configs and the generator set them);
    /// otherwise unknown, and the peer's portals are not listed.
    pub peer_portal_group_tag: Option<u16>,
    /// Connections served at once (further ones are closed at accept).
    pub max_connections: usize,
    /// Our MaxRecvDataSegmentLength.
    pub max_recv_data_segment_bytes: u32,
    /// Upper bound offered for MaxBurstLength.
    pub max_burst_bytes: u32,
    /// Upper bound offered for FirstBurstLength.
    pub first_burst_bytes: u32,
    /// Write data of at least this many bytes per PDU is received straight
    /// into its buffer, smaller data in bulk and copied
    /// ([`netreactor::RxMode`]; 0: all zero-copy).
    pub zero_copy_receive_min_bytes: usize,
}

impl IscsiConfig {
    pub fn new(listen: SocketAddr, target_iqn: impl Into<String>) -> IscsiConfig {
        IscsiConfig {
            listen,
            target_iqn: target_iqn.into(),
            chap: None,
            portal_group_tag: 1,
            peer_portals: Vec::new(),
            peer_portal_group_tag: None,
            max_connections: 64,
            max_recv_data_segment_bytes: 256 * 1024,
            max_burst_bytes: 1024 * 1024,
            first_burst_bytes: 256 * 1024,
            zero_copy_receive_min_bytes: DEFAULT_ZERO_COPY_RECEIVE_MIN_BYTES,
        }
    }

    /// The portal group tag the peer's portals are listed with.
    pub fn peer_tag(&self) -> Option<u16> {
        match (self.peer_portal_group_tag, self.portal_group_tag) {
            (Some(t), _) => Some(t),
            (None, 1) => Some(2),
            (None, 2) => Some(1),
            (None, _) => None,
        }
    }

    /// Checks limits at start-up and says what to fix.
    pub fn validate(&self) -> io::Result<()> {
        let bad = |m: String| Err(io::Error::new(io::ErrorKind::InvalidInput, m));
        if !self.target_iqn.starts_with("iqn.") && !self.target_iqn.starts_with("eui.") {
            return bad(format!(
                "iscsi target_iqn {:?} must start with \"iqn.\" or \"eui.\"",
                self.target_iqn
            ));
        }
        for (name, v) in [
            (
                "max_recv_data_segment_bytes",
                self.max_recv_data_segment_bytes,
            ),
            ("max_burst_bytes", self.max_burst_bytes),
            ("first_burst_bytes", self.first_burst_bytes),
        ] {
            if !(512..=16_777_215).contains(&v) {
                return bad(format!(
                    "iscsi {name} = {v} must be within 512..=16777215 (RFC 7143)"
                ));
            }
        }
        if self.first_burst_bytes > self.max_burst_bytes {
            return bad("iscsi first_burst_bytes must not exceed max_burst_bytes".into());
        }
        if self.max_connections == 0 {
            return bad("iscsi max_connections must be at least 1".into());
        }
        if let Some(c) = &self.chap {
            if c.secret.len() < 12 || c.secret.len() > 255 {
                return bad("iscsi CHAP secret must be 12..=255 characters".into());
            }
        }
        Ok(())
    }
}

/// A running target. Dropping it without `shutdown` leaves it running.
pub struct IscsiTarget {
    addr: SocketAddr,
    shared: Arc<conn::Shared>,
    acceptor: Option<JoinHandle<()>>,
    reactors: Arc<Reactors>,
    /// Reactors this target started itself (and stops).
    own_reactors: bool,
}

/// Starts listening and serving `vol` as LUN 0 of `cfg.target_iqn`, with
/// its connections on a reactor of its own (one adaptive thread).
pub fn start(cfg: IscsiConfig, vol: Arc<dyn Volume>) -> io::Result<IscsiTarget> {
    cfg.validate()?;
    let reactors = Reactors::start(&ReactorConfig::single("iscsi-reactor"))?;
    start_inner(cfg, vol, reactors, true)
}

/// Starts serving `vol` with its connections on `reactors` (shared with
/// the node's other targets).
pub fn start_on(
    cfg: IscsiConfig,
    vol: Arc<dyn Volume>,
    reactors: Arc<Reactors>,
) -> io::Result<IscsiTarget> {
    cfg.validate()?;
    start_inner(cfg, vol, reactors, false)
}

fn start_inner(
    cfg: IscsiConfig,
    vol: Arc<dyn Volume>,
    reactors: Arc<Reactors>,
    own_reactors: bool,
) -> io::Result<IscsiTarget> {
    if !cfg.peer_portals.is_empty() && cfg.peer_tag().is_none() {
        log::warn!(
            "iscsi: the peer's portal group tag is unknown (ours is {}, not 1 or 2): SendTargets will not list the peer's portals {:?}",
            cfg.portal_group_tag,
            cfg.peer_portals
        );
    }
    let listener = TcpListener::bind(cfg.listen).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("iscsi: cannot listen on {}: {e}", cfg.listen),
        )
    })?;
    let addr = listener.local_addr()?;
    let shared = conn::Shared::new(cfg, vol, addr, reactors.clone());
    let s2 = shared.clone();
    let acceptor = std::thread::Builder::new()
        .name("iscsi-accept".into())
        .spawn(move || accept_loop(listener, s2))?;
    Ok(IscsiTarget {
        addr,
        shared,
        acceptor: Some(acceptor),
        reactors,
        own_reactors,
    })
}

fn accept_loop(listener: TcpListener, shared: Arc<conn::Shared>) {
    for stream in listener.incoming() {
        if shared.stopping.load(Ordering::Acquire) {
            break;
        }
        match stream {
            Ok(s) => conn::spawn(shared.clone(), s),
            Err(e) => {
                log::warn!("iscsi: accept failed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}

impl IscsiTarget {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Write payload bytes copied in user space on their way to the volume:
    /// writes below `zero_copy_receive_min_bytes`, received in bulk with
    /// the PDUs around them and copied once into their buffer, and the
    /// part of a larger write that came in the same receive as its header.
    pub fn payload_copied_bytes(&self) -> u64 {
        self.shared.payload_copied.load(Ordering::Relaxed)
    }

    /// The counter behind [`Self::payload_copied_bytes`], to read after the
    /// target is gone or from another thread (the node's status).
    pub fn payload_copied_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.shared.payload_copied)
    }

    /// Connections open (logging in or in the full feature phase).
    pub fn connections(&self) -> usize {
        self.shared.live()
    }

    /// Stops accepting, closes every connection (requests the volume still
    /// holds complete; their responses are dropped) and joins the threads.
    pub fn shutdown(mut self) {
        self.shared.stopping.store(true, Ordering::Release);
        // Wake the acceptor.
        let _ = TcpStream::connect(self.addr);
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
        self.shared.close_all();
        self.shared.join_all();
        if self.own_reactors {
            self.reactors.shutdown();
        }
    }
}
