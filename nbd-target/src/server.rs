//! The listener: accepts connections, runs each one's handshake on a
//! short-lived thread, then hands its socket to a connection reactor
//! ([`netreactor`]) for the transmission phase. After the handshake a
//! connection has no thread of its own.

use std::collections::HashMap;
use std::io::{self, BufReader, BufWriter};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use netreactor::{ReactorConfig, Reactors};
use volume::Volume;

use crate::conn::NbdConn;
use crate::handshake::negotiate;
use crate::session::{SessionCtx, READ_BUFFER_BYTES, REPLY_BUFFER_BYTES};

/// Unanswered requests per connection before the server stops reading
/// from it.
pub const MAX_INFLIGHT_PER_CONNECTION: usize = 128;

/// A client that has not finished the handshake after this long is dropped.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 30_000;

/// Longest export name or description (proto.md's string limit).
const MAX_STRING_BYTES: usize = 4096;

/// NBD front-end settings.
#[derive(Clone, Debug)]
pub struct NbdConfig {
    /// Address to listen on (port 10809 is NBD's; port 0 picks one).
    pub listen: SocketAddr,
    /// Name clients ask for; the empty name also selects this export.
    pub export_name: String,
    /// Free text shown by `nbdinfo` and NBD_OPT_LIST.
    pub description: String,
    /// Connections served at once; further ones are closed at accept.
    pub max_connections: usize,
    /// Write payloads of at least this many bytes are received straight
    /// into their buffers, smaller ones in bulk and copied
    /// ([`netreactor::RxMode`]; 0: all zero-copy).
    pub zero_copy_receive_min_bytes: usize,
}

/// One open connection: a handle on its socket (to close it at shutdown)
/// and, while it negotiates, its handshake thread.
struct Conn {
    stream: TcpStream,
    thread: Option<JoinHandle<()>>,
}

type Conns = Arc<Mutex<HashMap<u64, Conn>>>;

/// A running NBD server. Dropping it without [`NbdServer::shutdown`] leaves
/// its threads running.
pub struct NbdServer {
    local_addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    conns: Conns,
    reactors: Arc<Reactors>,
    /// Reactors this server started itself (and stops).
    own_reactors: bool,
    payload_copied: Arc<AtomicU64>,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

fn check_config(cfg: &NbdConfig, vol: &dyn Volume) -> io::Result<()> {
    if cfg.max_connections == 0 {
        return Err(invalid(
            "nbd: max_connections is 0; set it to at least 1".into(),
        ));
    }
    if cfg.export_name.len() > MAX_STRING_BYTES || cfg.export_name.contains('\0') {
        return Err(invalid(format!(
            "nbd: export_name must be at most {MAX_STRING_BYTES} bytes without NUL"
        )));
    }
    if cfg.description.len() > MAX_STRING_BYTES || cfg.description.contains('\0') {
        return Err(invalid(format!(
            "nbd: description must be at most {MAX_STRING_BYTES} bytes without NUL"
        )));
    }
    let g = vol.geometry();
    if !g.block_size.is_power_of_two() || !(512..=65536).contains(&g.block_size) {
        return Err(invalid(format!(
            "nbd: volume block size {} is not a power of two between 512 and 65536",
            g.block_size
        )));
    }
    if vol.max_io_bytes() < g.block_size {
        return Err(invalid(format!(
            "nbd: volume max_io_bytes {} is smaller than its block size {}",
            vol.max_io_bytes(),
            g.block_size
        )));
    }
    Ok(())
}

/// Starts serving `vol` on reactors of its own (one adaptive thread):
/// binds `cfg.listen` at once and accepts on a background thread.
pub fn start(cfg: NbdConfig, vol: Arc<dyn Volume>) -> io::Result<NbdServer> {
    check_config(&cfg, &*vol)?;
    let reactors = Reactors::start(&ReactorConfig::single("nbd-reactor"))?;
    start_inner(cfg, vol, reactors, true)
}

/// Starts serving `vol` with its connections on `reactors` (shared with the
/// node's other targets).
pub fn start_on(
    cfg: NbdConfig,
    vol: Arc<dyn Volume>,
    reactors: Arc<Reactors>,
) -> io::Result<NbdServer> {
    check_config(&cfg, &*vol)?;
    start_inner(cfg, vol, reactors, false)
}

fn start_inner(
    cfg: NbdConfig,
    vol: Arc<dyn Volume>,
    reactors: Arc<Reactors>,
    own_reactors: bool,
) -> io::Result<NbdServer> {
    let listener = TcpListener::bind(cfg.listen).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "nbd: cannot listen on {}: {e} (is another NBD server running?)",
                cfg.listen
            ),
        )
    })?;
    let local_addr = listener.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut ctx = SessionCtx::new(
        vol,
        cfg.export_name.clone(),
        cfg.description.clone(),
        MAX_INFLIGHT_PER_CONNECTION,
        stop.clone(),
    );
    ctx.zero_copy_receive_min_bytes = cfg.zero_copy_receive_min_bytes;
    let ctx = Arc::new(ctx);
    let payload_copied = ctx.payload_copied.clone();
    let conns: Conns = Arc::new(Mutex::new(HashMap::new()));
    let accept = {
        let (stop, conns, reactors) = (stop.clone(), conns.clone(), reactors.clone());
        thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || accept_loop(listener, ctx, stop, conns, reactors, cfg.max_connections))?
    };
    log::info!("nbd: serving export {:?} on {local_addr}", cfg.export_name);
    Ok(NbdServer {
        local_addr,
        stop,
        accept: Some(accept),
        conns,
        reactors,
        own_reactors,
        payload_copied,
    })
}

fn accept_loop(
    listener: TcpListener,
    ctx: Arc<SessionCtx>,
    stop: Arc<AtomicBool>,
    conns: Conns,
    reactors: Arc<Reactors>,
    max_connections: usize,
) {
    let mut next_id = 0u64;
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(x) => x,
            Err(e) => {
                if stop.load(Ordering::Acquire) {
                    break;
                }
                // EMFILE and friends: back off instead of spinning.
                log::warn!("nbd: accept failed: {e}");
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if stop.load(Ordering::Acquire) {
            break;
        }
        let active = conns.lock().map(|c| c.len()).unwrap_or(usize::MAX);
        if active >= max_connections {
            log::warn!("nbd: refusing {peer}: already {active} connections (max_connections)");
            continue;
        }
        if let Err(e) = spawn_handshake(stream, peer, next_id, &ctx, &conns, &reactors) {
            log::warn!("nbd: cannot serve {peer}: {e}");
        }
        next_id += 1;
    }
}

fn spawn_handshake(
    stream: TcpStream,
    peer: SocketAddr,
    id: u64,
    ctx: &Arc<SessionCtx>,
    conns: &Conns,
    reactors: &Arc<Reactors>,
) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_millis(HANDSHAKE_TIMEOUT_MS)))?;
    // Registered before the thread starts so shutdown always sees it.
    if let Ok(mut c) = conns.lock() {
        c.insert(
            id,
            Conn {
                stream: stream.try_clone()?,
                thread: None,
            },
        );
    }
    let (ctx2, conns2, reactors2) = (ctx.clone(), conns.clone(), reactors.clone());
    let spawned = thread::Builder::new()
        .name(format!("nbd-hs-{id}"))
        .spawn(move || handshake(stream, peer.to_string(), id, ctx2, conns2, reactors2));
    match spawned {
        Ok(handle) => {
            if let Ok(mut c) = conns.lock() {
                // If the connection already ended, its entry is gone and
                // the handle is dropped: the thread is finishing anyway.
                if let Some(conn) = c.get_mut(&id) {
                    conn.thread = Some(handle);
                }
            }
            Ok(())
        }
        Err(e) => {
            if let Ok(mut c) = conns.lock() {
                c.remove(&id);
            }
            Err(e)
        }
    }
}

/// The handshake thread: negotiates, then hands the socket (and whatever
/// the client sent past the handshake) to a reactor, and ends.
fn handshake(
    stream: TcpStream,
    peer: String,
    id: u64,
    ctx: Arc<SessionCtx>,
    conns: Conns,
    reactors: Arc<Reactors>,
) {
    let forget = |conns: &Conns| {
        if let Ok(mut c) = conns.lock() {
            c.remove(&id);
        }
    };
    log::info!("nbd {peer}: connected");
    let negotiated = match (stream.try_clone(), stream.try_clone()) {
        (Ok(rs), Ok(ws)) => {
            let mut r = BufReader::with_capacity(READ_BUFFER_BYTES, rs);
            let mut w = BufWriter::with_capacity(REPLY_BUFFER_BYTES, ws);
            negotiate(&mut r, &mut w, &ctx.export, &|| {
                ctx.stop.load(Ordering::Relaxed)
            })
            .map(|_| r.buffer().to_vec())
            .map_err(|e| format!("{e:?}"))
        }
        (Err(e), _) | (_, Err(e)) => Err(e.to_string()),
    };
    let initial = match negotiated {
        Ok(initial) => initial,
        Err(e) => {
            log::info!("nbd {peer}: handshake ended: {e}");
            let _ = stream.shutdown(Shutdown::Both);
            forget(&conns);
            return;
        }
    };
    if let Err(e) = stream.set_read_timeout(None) {
        log::info!("nbd {peer}: {e}");
    }
    log::debug!("nbd {peer}: transmission phase");
    let conns2 = conns.clone();
    let on_close: Box<dyn FnOnce() + Send> = Box::new(move || {
        if let Ok(mut c) = conns2.lock() {
            c.remove(&id);
        }
    });
    let make = Box::new(move |waker| {
        Box::new(NbdConn::new(&ctx, peer, waker, Some(on_close))) as Box<dyn netreactor::Conn>
    });
    if let Err(stream) = reactors.adopt(stream, initial, make) {
        log::warn!("nbd: no reactor can take another connection; closing it");
        let _ = stream.shutdown(Shutdown::Both);
        forget(&conns);
    }
}

impl NbdServer {
    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Write payload bytes copied in user space on their way to the volume:
    /// writes below `zero_copy_receive_min_bytes`, received in bulk with
    /// the PDUs around them and copied once into their buffer, and the
    /// part of a larger write that came in the same receive as its header.
    pub fn payload_copied_bytes(&self) -> u64 {
        self.payload_copied.load(Ordering::Relaxed)
    }

    /// The counter behind [`Self::payload_copied_bytes`], to read after the
    /// server is gone or from another thread (the node's status).
    pub fn payload_copied_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.payload_copied)
    }

    /// Number of connections currently open.
    pub fn connections(&self) -> usize {
        self.conns.lock().map(|c| c.len()).unwrap_or(0)
    }

    /// Stops accepting, closes every connection and joins all threads.
    /// Requests already submitted to the volume still complete; their
    /// replies are dropped.
    pub fn shutdown(mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept thread with a connection of our own.
        let wake_ip = match self.local_addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        let _ = TcpStream::connect_timeout(
            &SocketAddr::new(wake_ip, self.local_addr.port()),
            Duration::from_secs(1),
        );
        if let Some(a) = self.accept.take() {
            let _ = a.join();
        }
        // Handshakes end on their closed sockets; connections on the
        // reactors see the stop flag (`Conn::aborted`) once kicked.
        let threads: Vec<JoinHandle<()>> = match self.conns.lock() {
            Ok(mut c) => c
                .values_mut()
                .filter_map(|conn| {
                    let _ = conn.stream.shutdown(Shutdown::Both);
                    conn.thread.take()
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        for t in threads {
            let _ = t.join();
        }
        self.reactors.kick();
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.connections() > 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(2));
        }
        if self.own_reactors {
            self.reactors.shutdown();
        }
        log::info!("nbd: server on {} stopped", self.local_addr);
    }
}
