//! The listener: accepts connections and runs one [`session`] per
//! connection on its own thread (plus that session's reply thread).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use volume::Volume;

use crate::session::{self, SessionCtx, SessionEnd, Transport};

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
}

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

/// Starts serving `vol`: binds `cfg.listen` at once and accepts on a
/// background thread.
pub fn start(cfg: NbdConfig, vol: Arc<dyn Volume>) -> io::Result<NbdServer> {
    check_config(&cfg, &*vol)?;
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
    let ctx = Arc::new(SessionCtx::new(
        vol,
        cfg.export_name.clone(),
        cfg.description.clone(),
        MAX_INFLIGHT_PER_CONNECTION,
        stop.clone(),
    ));
    let conns: Conns = Arc::new(Mutex::new(HashMap::new()));
    let accept = {
        let (stop, conns) = (stop.clone(), conns.clone());
        thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || accept_loop(listener, ctx, stop, conns, cfg.max_connections))?
    };
    log::info!("nbd: serving export {:?} on {local_addr}", cfg.export_name);
    Ok(NbdServer {
        local_addr,
        stop,
        accept: Some(accept),
        conns,
    })
}

fn accept_loop(
    listener: TcpListener,
    ctx: Arc<SessionCtx>,
    stop: Arc<AtomicBool>,
    conns: Conns,
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
        if let Err(e) = spawn_connection(stream, peer, next_id, &ctx, &conns) {
            log::warn!("nbd: cannot serve {peer}: {e}");
        }
        next_id += 1;
    }
}

struct SocketTransport {
    stream: TcpStream,
}

impl Transport for SocketTransport {
    fn negotiated(&self) {
        let _ = self.stream.set_read_timeout(None);
    }
    fn close(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

fn spawn_connection(
    stream: TcpStream,
    peer: SocketAddr,
    id: u64,
    ctx: &Arc<SessionCtx>,
    conns: &Conns,
) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_millis(HANDSHAKE_TIMEOUT_MS)))?;
    let reader = stream.try_clone()?;
    let writer = stream.try_clone()?;
    let transport = SocketTransport {
        stream: stream.try_clone()?,
    };
    // Registered before the thread starts so shutdown always sees it.
    if let Ok(mut c) = conns.lock() {
        c.insert(
            id,
            Conn {
                stream,
                thread: None,
            },
        );
    }
    let (ctx2, conns2) = (ctx.clone(), conns.clone());
    let spawned = thread::Builder::new()
        .name(format!("nbd-conn-{id}"))
        .spawn(move || {
            let peer = peer.to_string();
            log::info!("nbd {peer}: connected");
            match session::serve(reader, writer, &ctx2, &peer, &transport) {
                SessionEnd::Handshake(e) => log::info!("nbd {peer}: handshake ended: {e}"),
                end => log::info!("nbd {peer}: disconnected ({end:?})"),
            }
            transport.close();
            if let Ok(mut c) = conns2.lock() {
                c.remove(&id);
            }
        });
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

impl NbdServer {
    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
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
        let conns: Vec<Conn> = match self.conns.lock() {
            Ok(mut c) => c.drain().map(|(_, conn)| conn).collect(),
            Err(_) => Vec::new(),
        };
        for c in &conns {
            let _ = c.stream.shutdown(Shutdown::Both);
        }
        for c in conns {
            if let Some(t) = c.thread {
                let _ = t.join();
            }
        }
        log::info!("nbd: server on {} stopped", self.local_addr);
    }
}
