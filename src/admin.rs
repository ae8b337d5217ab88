//! The admin endpoint: a small HTTP server on its own thread, off the data
//! path, and the matching client used by the CLI.
//!
//! | request | answer |
//! |---|---|
//! | `GET /status` | 200, `NodeStatus` as JSON |
//! | `GET /metrics` | 200, Prometheus text exposition format 0.0.4 |
//! | `POST /promote` | 200 `{"ok":true}`, or 409 `{"error":"..."}`; `?force=1` is `promote --force` |
//! | `POST /demote` | 200 `{"ok":true}`, or 409 `{"error":"..."}` |
//! | `POST /verify` | 200, 400 for a bad parameter, or 409; `?offset=&length=&rate=&repair=1` |
//! | known path, wrong method | 405 with `Allow` |
//! | anything else | 404 |
//!
//! The server only reads snapshots and posts commands through
//! `engine::status::Control`; it never blocks a reactor. Requests are served
//! one at a time on one thread (bounded: no thread per request), so a long
//! promote delays a concurrent status or scrape until it returns.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use engine::status::{Control, Latency, NodeStatus, VerifyRequest};
use tiny_http::{Header, Method, Request, Response, Server};

/// The client's connect timeout.
const CONNECT_TIMEOUT_MS: u64 = 2_000;
/// The client's read/write timeout for `GET /status`.
const STATUS_TIMEOUT_MS: u64 = 5_000;
/// The client's read/write timeout for promote/demote: a promote executes
/// every entry the node holds before it answers.
const COMMAND_TIMEOUT_MS: u64 = 60_000;
/// Largest response the client accepts.
const MAX_RESPONSE_BYTES: u64 = 4 << 20;

/// A running admin endpoint. Dropping it stops it too.
pub struct AdminServer {
    server: Arc<Server>,
    local_addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Binds `listen` and serves the admin endpoint on a thread of its own.
pub fn start(listen: SocketAddr, ctl: Arc<dyn Control>) -> io::Result<AdminServer> {
    let server = Server::http(listen).map_err(|e| {
        let kind = e
            .downcast_ref::<io::Error>()
            .map_or(io::ErrorKind::Other, io::Error::kind);
        io::Error::new(
            kind,
            format!("cannot listen on admin.listen = {listen}: {e}"),
        )
    })?;
    let local_addr = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| io::Error::other("admin endpoint bound to a non-IP address"))?;
    let server = Arc::new(server);
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let server = Arc::clone(&server);
        let stop = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("admin".to_string())
            .spawn(move || serve(&server, &stop, ctl.as_ref()))?
    };
    log::info!("admin endpoint listening on http://{local_addr}");
    Ok(AdminServer {
        server,
        local_addr,
        stop,
        thread: Some(thread),
    })
}

impl AdminServer {
    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting requests and joins the server thread.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.stop.store(true, Ordering::SeqCst);
            self.server.unblock();
            if thread.join().is_err() {
                log::error!("admin endpoint thread panicked");
            }
        }
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

fn serve(server: &Server, stop: &AtomicBool, ctl: &dyn Control) {
    loop {
        match server.recv() {
            Ok(request) => handle(request, ctl),
            Err(_) if stop.load(Ordering::SeqCst) => return,
            // An accept error on one connection; keep serving the others.
            Err(e) => log::warn!("admin endpoint: {e}"),
        }
    }
}

/// The `key=value` pairs of a query string (a bare `key` is `key=`).
fn query_pairs(query: &str) -> impl Iterator<Item = (&str, &str)> {
    query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
}

/// A yes/no parameter: `1`, `true` or the bare key say yes, `0` or `false` no.
fn flag(what: &str, k: &str, v: &str) -> Result<bool, String> {
    match v {
        "1" | "true" | "" => Ok(true),
        "0" | "false" => Ok(false),
        _ => Err(format!("{what}: {k}={v:?} must be 1 or 0")),
    }
}

/// `force` from the query string of `POST /promote`; [`promote_path`]
/// writes it.
fn promote_request(query: &str) -> Result<bool, String> {
    let mut force = false;
    for (k, v) in query_pairs(query) {
        match k {
            "force" => force = flag("promote", k, v)?,
            _ => return Err(format!("promote: unknown parameter {k:?} (force)")),
        }
    }
    Ok(force)
}

/// `offset`, `length`, `rate` (bytes, bytes/s) and `repair` from the query
/// string of `POST /verify`; [`verify_path`] writes them.
fn verify_request(query: &str) -> Result<VerifyRequest, String> {
    let mut r = VerifyRequest::default();
    for (k, v) in query_pairs(query) {
        let num = || {
            v.parse::<u64>()
                .map_err(|_| format!("verify: {k}={v:?} is not a whole number of bytes"))
        };
        match k {
            "offset" => r.offset = num()?,
            "length" => r.length = num()?,
            "rate" => r.bytes_per_sec = num()?,
            "repair" => r.repair = flag("verify", k, v)?,
            _ => {
                return Err(format!(
                    "verify: unknown parameter {k:?} (offset, length, rate, repair)"
                ))
            }
        }
    }
    Ok(r)
}

/// The request path of a promote, as [`promote_request`] reads it.
pub fn promote_path(force: bool) -> String {
    if force {
        "/promote?force=1".into()
    } else {
        "/promote".into()
    }
}

/// The request path of a verify, as [`verify_request`] reads it.
pub fn verify_path(r: &VerifyRequest) -> String {
    format!(
        "/verify?offset={}&length={}&rate={}&repair={}",
        r.offset,
        r.length,
        r.bytes_per_sec,
        u8::from(r.repair)
    )
}

fn handle(request: Request, ctl: &dyn Control) {
    let (path, query) = match request.url().split_once('?') {
        Some((p, q)) => (p.to_string(), q.to_string()),
        None => (request.url().to_string(), String::new()),
    };
    let method = request.method().clone();
    let response = match (path.as_str(), &method) {
        ("/status", Method::Get) => match serde_json::to_string(&ctl.status()) {
            Ok(body) => json(200, body),
            Err(e) => error_json(500, &format!("cannot encode status: {e}")),
        },
        ("/metrics", Method::Get) => Response::from_string(render_metrics(&ctl.status()))
            .with_header(header(
                "Content-Type",
                "text/plain; version=0.0.4; charset=utf-8",
            )),
        ("/promote", Method::Post) => match promote_request(&query) {
            Ok(force) => command_result(ctl.promote(force), "promote"),
            Err(e) => error_json(400, &e),
        },
        ("/demote", Method::Post) => command_result(ctl.demote(), "demote"),
        ("/reset-latency", Method::Post) => command_result(ctl.reset_latency(), "reset-latency"),
        ("/verify", Method::Post) => match verify_request(&query) {
            Ok(r) => command_result(ctl.verify(r), "verify"),
            Err(e) => error_json(400, &e),
        },
        ("/status" | "/metrics", _) => method_not_allowed("GET"),
        ("/promote" | "/demote" | "/reset-latency" | "/verify", _) => method_not_allowed("POST"),
        _ => error_json(
            404,
            &format!(
                "no such endpoint: {method} {path} (try GET /status, GET /metrics, POST /promote, POST /demote, POST /verify, POST /reset-latency)"
            ),
        ),
    };
    if let Err(e) = request.respond(response) {
        log::debug!("admin endpoint: cannot answer {method} {path}: {e}");
    }
}

fn command_result(result: Result<(), String>, what: &str) -> Response<io::Cursor<Vec<u8>>> {
    match result {
        Ok(()) => {
            log::info!("admin endpoint: {what} done");
            json(200, r#"{"ok":true}"#.to_string())
        }
        Err(reason) => {
            log::warn!("admin endpoint: {what} refused: {reason}");
            error_json(409, &reason)
        }
    }
}

fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("static header is valid")
}

fn json(code: u16, body: String) -> Response<io::Cursor<Vec<u8>>> {
    Response::from_string(body)
        .with_status_code(code)
        .with_header(header("Content-Type", "application/json"))
}

fn error_json(code: u16, message: &str) -> Response<io::Cursor<Vec<u8>>> {
    json(code, serde_json::json!({ "error": message }).to_string())
}

fn method_not_allowed(allow: &str) -> Response<io::Cursor<Vec<u8>>> {
    error_json(405, &format!("method not allowed; use {allow}")).with_header(header("Allow", allow))
}

/// The status as Prometheus text exposition format 0.0.4.
fn render_metrics(s: &NodeStatus) -> String {
    let mut m = Metrics::default();
    let node = format!(
        "node_id=\"{}\",node_name=\"{}\"",
        s.node_id,
        escape_label(&s.node_name)
    );
    m.family(
        "deltamirror_node_info",
        "gauge",
        "Constant 1, labelled with the node's id and name.",
    );
    m.sample("deltamirror_node_info", &node, 1.0);

    m.family(
        "deltamirror_role",
        "gauge",
        "1 for the node's current role (primary or backup).",
    );
    for role in ["primary", "backup"] {
        let v = f(s.role == role);
        m.sample("deltamirror_role", &format!("role=\"{role}\""), v);
    }
    m.gauge(
        "deltamirror_generation",
        "Generation: bumped at every role change and entry into degraded mode.",
        s.generation as f64,
    );
    m.family(
        "deltamirror_peer_state",
        "gauge",
        "1 for the current state of the replication link to the peer.",
    );
    for state in ["connected", "replaying", "disconnected", "refused"] {
        let v = f(s.peer_state == state);
        m.sample("deltamirror_peer_state", &format!("state=\"{state}\""), v);
    }
    m.gauge(
        "deltamirror_degraded",
        "1 while the primary serves writes without the backup.",
        f(s.degraded),
    );
    if let Some(seq) = s.peer_stale_from_seq {
        m.gauge(
            "deltamirror_peer_stale_from_seq",
            "The peer misses every request from this seq on (degraded mode only).",
            seq as f64,
        );
    }
    if let Some(fo) = &s.failover {
        m.gauge(
            "deltamirror_failover_holds_lease",
            "Automatic failover: 1 while this node holds the etcd leader key under its lease.",
            f(fo.holds_lease),
        );
        m.gauge(
            "deltamirror_failover_lease_left_seconds",
            "Automatic failover: time left on this node's lease, on its own clock (0: none).",
            fo.lease_left_ms as f64 / 1000.0,
        );
        if let Some(ago) = fo.last_renewal_ms_ago {
            m.gauge(
                "deltamirror_failover_last_renewal_seconds",
                "Automatic failover: time since the lease was last renewed.",
                ago as f64 / 1000.0,
            );
        }
        if let Some(id) = fo.lease_holder_node_id {
            m.gauge(
                "deltamirror_failover_lease_holder_node_id",
                "Automatic failover: the node etcd names primary.",
                id as f64,
            );
        }
        m.gauge(
            "deltamirror_failover_etcd_reachable",
            "Automatic failover: 1 while etcd answers and its keys parse.",
            f(fo.etcd_reachable && fo.etcd_error.is_none()),
        );
        m.gauge(
            "deltamirror_failover_fenced",
            "Automatic failover: 1 while the agent fences this node (it lost etcd and the peer).",
            f(fo.fenced),
        );
        m.gauge(
            "deltamirror_failover_transitions",
            "Automatic failover: transitions of the agent since start.",
            fo.transitions as f64,
        );
    }
    if let Some(w) = &s.stale_mark_wanted {
        m.gauge(
            "deltamirror_failover_stale_mark_wait_seconds",
            "Automatic failover: how long writes have waited for etcd to record the backup stale.",
            w.waiting_ms as f64 / 1000.0,
        );
    }
    m.gauge(
        "deltamirror_head_seq",
        "Highest seq assigned (primary) or received (backup).",
        s.head_seq as f64,
    );
    m.gauge(
        "deltamirror_executed_seq",
        "Highest seq executed on this node's disk, contiguously.",
        s.executed_seq as f64,
    );
    m.gauge(
        "deltamirror_delta_entries",
        "Delta queue: requests the peer is not confirmed to have executed.",
        s.delta_entries as f64,
    );
    m.gauge(
        "deltamirror_delta_bytes",
        "Delta queue size in bytes.",
        s.delta_bytes as f64,
    );
    m.gauge(
        "deltamirror_ring_capacity_bytes",
        "Capacity of the persistent ring.",
        s.ring_capacity_bytes as f64,
    );
    m.gauge(
        "deltamirror_ack1_seq",
        "ACK1 watermark: the backup received every seq up to this.",
        s.ack1_seq as f64,
    );
    m.gauge(
        "deltamirror_ack2_seq",
        "ACK2 watermark: the backup executed every seq up to this.",
        s.ack2_seq as f64,
    );
    m.gauge(
        "deltamirror_ack3_seq",
        "ACK3 watermark: the primary executed every seq up to this.",
        s.ack3_seq as f64,
    );
    m.gauge(
        "deltamirror_dirty_extents",
        "Dirty map: extents written while the delta queue was full.",
        s.dirty_extents as f64,
    );
    m.gauge(
        "deltamirror_dirty_bytes",
        "Dirty map size in bytes.",
        s.dirty_bytes as f64,
    );
    m.gauge(
        "deltamirror_dirty_map_memory_bytes",
        "Memory the dirty map takes (one bit per chunk of the volume).",
        s.dirty_map_memory_bytes as f64,
    );
    m.family(
        "deltamirror_remirrors_total",
        "counter",
        "Full remirrors sent or received since format.",
    );
    m.sample("deltamirror_remirrors_total", "", s.remirrors as f64);
    let v = s.verify.clone().unwrap_or_default();
    m.gauge(
        "deltamirror_verify_running",
        "1 while an online verify runs.",
        (v.state == "running") as u8 as f64,
    );
    m.gauge(
        "deltamirror_verify_done_bytes",
        "Bytes compared by the running or last online verify.",
        v.done_bytes as f64,
    );
    m.gauge(
        "deltamirror_verify_mismatched_chunks",
        "Chunks whose contents differ between the nodes, found by the running or last online verify.",
        v.mismatched_chunks as f64,
    );

    let progress = s.replay_progress.clone().unwrap_or_default();
    m.gauge(
        "deltamirror_replay_active",
        "1 while a replay to or from the peer runs.",
        f(s.replay_progress.is_some()),
    );
    m.gauge(
        "deltamirror_replay_sent_entries",
        "Running replay: entries sent so far.",
        progress.entries as f64,
    );
    m.gauge(
        "deltamirror_replay_sent_bytes",
        "Running replay: bytes sent so far.",
        progress.bytes as f64,
    );
    m.gauge(
        "deltamirror_replay_remaining_entries",
        "Running replay: entries still to send.",
        progress.remaining_entries as f64,
    );
    m.gauge(
        "deltamirror_replay_remaining_bytes",
        "Running replay: bytes still to send.",
        progress.remaining_bytes as f64,
    );

    let last = s.last_replay.clone().unwrap_or_default();
    m.gauge(
        "deltamirror_last_replay_entries",
        "Last finished replay: ring entries sent (0 if none yet).",
        last.entries as f64,
    );
    m.gauge(
        "deltamirror_last_replay_bytes",
        "Last finished replay: bytes sent.",
        last.bytes as f64,
    );
    m.gauge(
        "deltamirror_last_replay_extents",
        "Last finished replay: dirty-map extents sent.",
        last.extents as f64,
    );
    m.gauge(
        "deltamirror_last_replay_seconds",
        "Last finished replay: duration.",
        last.seconds,
    );
    m.gauge(
        "deltamirror_last_replay_full_remirror",
        "1 if the last replay was a full remirror.",
        f(last.full_remirror),
    );

    let io = &s.io;
    m.family(
        "deltamirror_io_ops_total",
        "counter",
        "Host I/O operations completed, by op.",
    );
    m.sample("deltamirror_io_ops_total", "op=\"read\"", io.reads as f64);
    m.sample("deltamirror_io_ops_total", "op=\"write\"", io.writes as f64);
    m.sample(
        "deltamirror_io_ops_total",
        "op=\"flush\"",
        io.flushes as f64,
    );
    m.family(
        "deltamirror_io_bytes_total",
        "counter",
        "Host I/O bytes transferred, by op.",
    );
    m.sample(
        "deltamirror_io_bytes_total",
        "op=\"read\"",
        io.read_bytes as f64,
    );
    m.sample(
        "deltamirror_io_bytes_total",
        "op=\"write\"",
        io.write_bytes as f64,
    );
    m.family(
        "deltamirror_io_errors_total",
        "counter",
        "Host I/O operations completed with an error.",
    );
    m.sample("deltamirror_io_errors_total", "", io.errors as f64);
    m.family(
        "deltamirror_io_latency_seconds",
        "summary",
        "Host I/O latency quantiles, by op.",
    );
    for (op, lat) in [("read", &io.read_latency), ("write", &io.write_latency)] {
        m.latency("deltamirror_io_latency_seconds", "op", op, lat);
    }
    m.family(
        "deltamirror_stage_latency_seconds",
        "summary",
        "Latency of this node's own steps: ring fdatasync and disk writes (host and replayed).",
    );
    for (stage, lat) in [
        ("ring_sync", &io.ring_sync_latency),
        ("disk_write", &io.disk_write_latency),
    ] {
        m.latency("deltamirror_stage_latency_seconds", "stage", stage, lat);
    }
    m.family(
        "deltamirror_write_path_seconds",
        "summary",
        "Where a sampled mirrored write's time goes: time from its start (primary: the \
         front-end's receipt; backup: the REQ's arrival) to each stage.",
    );
    let st = &io.stages;
    for (stage, lat) in [
        ("req_sent", &st.req_sent),
        ("ring_durable", &st.ring_durable),
        ("ack1", &st.ack1),
        ("execute", &st.execute),
        ("executed", &st.executed),
    ] {
        if lat.count > 0 {
            m.latency("deltamirror_write_path_seconds", "stage", stage, lat);
        }
    }

    m.family(
        "deltamirror_link_messages_total",
        "counter",
        "Replication link messages, by direction.",
    );
    m.sample(
        "deltamirror_link_messages_total",
        "direction=\"sent\"",
        s.link_msgs_sent as f64,
    );
    m.sample(
        "deltamirror_link_messages_total",
        "direction=\"received\"",
        s.link_msgs_received as f64,
    );
    m.family(
        "deltamirror_link_bytes_total",
        "counter",
        "Replication link bytes, by direction.",
    );
    m.sample(
        "deltamirror_link_bytes_total",
        "direction=\"sent\"",
        s.link_bytes_sent as f64,
    );
    m.sample(
        "deltamirror_link_bytes_total",
        "direction=\"received\"",
        s.link_bytes_received as f64,
    );
    m.family(
        "deltamirror_link_peers_refused_total",
        "counter",
        "Peers the replication link refused: a failed PSK handshake or a fabric connection request without the handshake's token.",
    );
    m.sample(
        "deltamirror_link_peers_refused_total",
        "",
        s.link_peers_refused as f64,
    );

    let b = &s.buffers;
    m.gauge(
        "deltamirror_buffer_pool_bytes",
        "Bytes of the node's buffer pool (reactor.buffer_pool_mib).",
        b.pool_bytes as f64,
    );
    m.gauge(
        "deltamirror_buffer_pool_in_use_bytes",
        "Bytes of the buffer pool handed out now.",
        b.pool_in_use_bytes as f64,
    );
    m.family(
        "deltamirror_buffer_pool_misses_total",
        "counter",
        "Requests that found the buffer pool empty (back-pressure events).",
    );
    m.sample(
        "deltamirror_buffer_pool_misses_total",
        "",
        b.pool_misses as f64,
    );
    m.gauge(
        "deltamirror_buffer_pool_registered",
        "1 when the buffer pool is registered with the disk's io_uring (fixed-buffer I/O).",
        if b.pool_registered { 1.0 } else { 0.0 },
    );
    m.family(
        "deltamirror_fixed_disk_ops_total",
        "counter",
        "Disk reads and writes issued as io_uring fixed-buffer operations.",
    );
    m.sample(
        "deltamirror_fixed_disk_ops_total",
        "",
        b.fixed_disk_ops as f64,
    );
    m.family(
        "deltamirror_payload_copy_bytes_total",
        "counter",
        "Write payload bytes copied in user space, by where (frontend_receive: the \
         front-ends' copy of writes below reactor.zero_copy_receive_min_bytes).",
    );
    m.sample(
        "deltamirror_payload_copy_bytes_total",
        "where=\"link_receive\"",
        b.link_receive_copy_bytes as f64,
    );
    m.sample(
        "deltamirror_payload_copy_bytes_total",
        "where=\"execute\"",
        b.execute_copy_bytes as f64,
    );
    m.sample(
        "deltamirror_payload_copy_bytes_total",
        "where=\"link_send\"",
        b.link_send_copy_bytes as f64,
    );
    m.sample(
        "deltamirror_payload_copy_bytes_total",
        "where=\"frontend_receive\"",
        b.frontend_receive_copy_bytes as f64,
    );

    m.family(
        "deltamirror_reactor_seconds_total",
        "counter",
        "Time of each reactor thread, busy (passes that found work) or idle (passes \
         that found none, with their yields and sleeps).",
    );
    for r in &s.reactors {
        let core = r.core.map(|c| c.to_string()).unwrap_or_default();
        for (state, us) in [("busy", r.busy_us), ("idle", r.idle_us)] {
            m.sample(
                "deltamirror_reactor_seconds_total",
                &format!("thread=\"{}\",core=\"{core}\",state=\"{state}\"", r.thread),
                us as f64 / 1e6,
            );
        }
    }

    if let Some(h) = &s.disk_handover {
        use storage::backend::HandOver;
        m.gauge(
            "deltamirror_disk_handover_at_once",
            "1 while the disk's io_uring hands each operation to the kernel as it is queued, \
             0 while it hands them over in chunks (reactor.disk_handover).",
            if h.mode == HandOver::AtOnce.name() {
                1.0
            } else {
                0.0
            },
        );
        m.family(
            "deltamirror_disk_handover_comparisons_total",
            "counter",
            "Comparisons of the two hand-over modes (reactor.disk_handover = \"adaptive\"), by \
             the mode each chose.",
        );
        for (chose, n) in [
            (HandOver::AtOnce.name(), h.chose_at_once),
            (HandOver::InChunks.name(), h.comparisons - h.chose_at_once),
        ] {
            m.sample(
                "deltamirror_disk_handover_comparisons_total",
                &format!("chose=\"{chose}\""),
                n as f64,
            );
        }
    }

    m.gauge(
        "deltamirror_resident_memory_bytes",
        "Resident set size of the node process.",
        s.rss_bytes as f64,
    );
    m.gauge(
        "deltamirror_uptime_seconds",
        "Seconds since the node process started.",
        s.uptime_seconds,
    );
    m.0
}

#[derive(Default)]
struct Metrics(String);

impl Metrics {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &str, value: f64) {
        if labels.is_empty() {
            let _ = writeln!(self.0, "{name} {}", number(value));
        } else {
            let _ = writeln!(self.0, "{name}{{{labels}}} {}", number(value));
        }
    }

    fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.family(name, "gauge", help);
        self.sample(name, "", value);
    }

    fn latency(&mut self, name: &str, key: &str, op: &str, l: &Latency) {
        for (q, us) in [("0.5", l.p50_us), ("0.99", l.p99_us), ("0.999", l.p999_us)] {
            let labels = format!("{key}=\"{op}\",quantile=\"{q}\"");
            self.sample(name, &labels, us / 1e6);
        }
        let labels = format!("{key}=\"{op}\"");
        self.sample(&format!("{name}_count"), &labels, l.count as f64);
    }
}

fn f(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

/// Go-style float text: integers without a fraction, `NaN`, `+Inf`, `-Inf`.
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_string()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.to_string()
    } else {
        format!("{v}")
    }
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

// ---- client ----

/// Fetches `GET /status` from the admin endpoint at `addr` ("host:port" or
/// "http://host:port").
pub fn get_status(addr: &str) -> anyhow::Result<NodeStatus> {
    let (code, body) = request(addr, "GET", "/status", STATUS_TIMEOUT_MS)?;
    if code != 200 {
        bail!(
            "GET /status at {addr} answered {code}: {}",
            error_text(&body)
        );
    }
    serde_json::from_slice(&body)
        .with_context(|| format!("GET /status at {addr}: the answer is not a node status"))
}

/// Sends `POST path` (e.g. "/promote") to the admin endpoint at `addr`;
/// Ok on 200, the node's reason otherwise.
pub fn post(addr: &str, path: &str) -> anyhow::Result<()> {
    let (code, body) = request(addr, "POST", path, COMMAND_TIMEOUT_MS)?;
    match code {
        200 => Ok(()),
        409 => bail!("{addr} refused {path}: {}", error_text(&body)),
        _ => bail!(
            "POST {path} at {addr} answered {code}: {}",
            error_text(&body)
        ),
    }
}

/// The `error` field of a JSON error body, or the body itself.
fn error_text(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string())
}

/// One HTTP/1.1 exchange on a fresh connection: returns status code and body.
fn request(
    addr: &str,
    method: &str,
    path: &str,
    timeout_ms: u64,
) -> anyhow::Result<(u16, Vec<u8>)> {
    let host = addr
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let unreachable = |e: &dyn std::fmt::Display| {
        anyhow!("cannot reach the admin endpoint at {host}: {e}; is `deltamirror serve` running?")
    };
    let targets: Vec<SocketAddr> = host
        .to_socket_addrs()
        .map_err(|e| unreachable(&e))?
        .collect();
    let mut last_err = None;
    let mut stream = None;
    for target in &targets {
        match TcpStream::connect_timeout(target, Duration::from_millis(CONNECT_TIMEOUT_MS)) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last_err = Some(e),
        }
    }
    let mut stream = match (stream, last_err) {
        (Some(s), _) => s,
        (None, Some(e)) => return Err(unreachable(&e)),
        (None, None) => return Err(unreachable(&"the address resolves to nothing")),
    };
    let timeout = Some(Duration::from_millis(timeout_ms));
    stream.set_read_timeout(timeout)?;
    stream.set_write_timeout(timeout)?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: deltamirror\r\nAccept: application/json\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(head.as_bytes())
        .map_err(|e| unreachable(&e))?;
    let mut raw = Vec::new();
    stream
        .take(MAX_RESPONSE_BYTES)
        .read_to_end(&mut raw)
        .map_err(|e| anyhow!("{method} {path} at {host}: no complete answer: {e}"))?;
    parse_response(&raw).with_context(|| format!("{method} {path} at {host}: malformed answer"))
}

fn parse_response(raw: &[u8]) -> anyhow::Result<(u16, Vec<u8>)> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("no end of headers"))?;
    let head = std::str::from_utf8(&raw[..end]).context("headers are not UTF-8")?;
    let body = &raw[end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let code: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("bad status line {status_line:?}"))?;
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") && value.eq_ignore_ascii_case("chunked") {
            chunked = true;
        } else if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse::<usize>().context("bad Content-Length")?);
        }
    }
    let body = if chunked {
        dechunk(body)?
    } else if let Some(n) = length {
        if body.len() < n {
            bail!("body truncated: {} of {n} bytes", body.len());
        }
        body[..n].to_vec()
    } else {
        body.to_vec()
    };
    Ok((code, body))
}

fn dechunk(mut data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("chunk size line not terminated"))?;
        let size_text = std::str::from_utf8(&data[..eol])?;
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).context("bad chunk size")?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            bail!("chunk truncated");
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::status::{IoStats, ReplayStats};
    use std::sync::Mutex;

    struct FakeNode {
        status: Mutex<NodeStatus>,
        /// Refuse promote/demote with this reason when set.
        refuse: Option<String>,
    }

    impl Control for FakeNode {
        fn status(&self) -> NodeStatus {
            self.status.lock().unwrap().clone()
        }
        fn promote(&self, force: bool) -> Result<(), String> {
            if let Some(r) = &self.refuse {
                if !force {
                    return Err(r.clone());
                }
            }
            self.status.lock().unwrap().role = "primary".into();
            Ok(())
        }
        fn demote(&self) -> Result<(), String> {
            if let Some(r) = &self.refuse {
                return Err(r.clone());
            }
            self.status.lock().unwrap().role = "backup".into();
            Ok(())
        }
        fn reset_latency(&self) -> Result<(), String> {
            self.status.lock().unwrap().io.write_latency = Latency::default();
            Ok(())
        }
        fn verify(&self, req: VerifyRequest) -> Result<(), String> {
            if let Some(r) = &self.refuse {
                return Err(r.clone());
            }
            self.status.lock().unwrap().verify = Some(engine::status::VerifyStatus {
                state: "running".into(),
                offset: req.offset,
                length: req.length,
                repair: req.repair,
                ..Default::default()
            });
            Ok(())
        }
    }

    fn sample() -> NodeStatus {
        NodeStatus {
            pid: 7,
            node_id: 2,
            node_name: "store \"b\"".into(),
            role: "backup".into(),
            generation: 3,
            peer_state: "replaying".into(),
            head_seq: 100,
            executed_seq: 90,
            delta_entries: 10,
            delta_bytes: 40_960,
            ring_capacity_bytes: 64 << 20,
            ack1_seq: 100,
            ack2_seq: 90,
            ack3_seq: 95,
            remirrors: 1,
            replay_progress: Some(ReplayStats {
                entries: 5,
                bytes: 20_480,
                remaining_entries: 5,
                remaining_bytes: 20_480,
                seconds: 0.25,
                ..ReplayStats::default()
            }),
            io: IoStats {
                reads: 11,
                writes: 22,
                flushes: 3,
                read_bytes: 45_056,
                write_bytes: 90_112,
                errors: 0,
                read_latency: Latency {
                    count: 11,
                    p50_us: 80.0,
                    p99_us: 250.0,
                    p999_us: 900.0,
                },
                write_latency: Latency::default(),
                ..IoStats::default()
            },
            link_msgs_sent: 9,
            uptime_seconds: 12.5,
            rss_bytes: 50 << 20,
            reactors: vec![
                engine::status::ReactorLoad {
                    thread: "dm-reactor-2".into(),
                    core: Some(0),
                    busy_us: 1_500_000,
                    idle_us: 11_000_000,
                },
                engine::status::ReactorLoad {
                    thread: "dm-conn-1".into(),
                    core: None,
                    busy_us: 250_000,
                    idle_us: 12_250_000,
                },
            ],
            disk_handover: Some(engine::status::DiskHandOverStatus {
                mode: "at-once".into(),
                adaptive: true,
                comparisons: 7,
                chose_at_once: 5,
                at_once_ops_per_sec: 93_000,
                in_chunks_ops_per_sec: 87_000,
            }),
            ..NodeStatus::default()
        }
    }

    fn start_fake(refuse: Option<&str>) -> (AdminServer, Arc<FakeNode>) {
        let node = Arc::new(FakeNode {
            status: Mutex::new(sample()),
            refuse: refuse.map(str::to_string),
        });
        let ctl: Arc<dyn Control> = node.clone();
        let server = start("127.0.0.1:0".parse().unwrap(), ctl).unwrap();
        (server, node)
    }

    #[test]
    fn status_round_trips_through_the_client() {
        let (server, _node) = start_fake(None);
        let addr = server.local_addr().to_string();
        assert_eq!(get_status(&addr).unwrap(), sample());
        assert_eq!(get_status(&format!("http://{addr}/")).unwrap(), sample());
        server.shutdown();
    }

    #[test]
    fn verify_takes_its_parameters_from_the_query() {
        let (server, node) = start_fake(None);
        let addr = server.local_addr().to_string();
        let (code, _) = request(
            &addr,
            "POST",
            "/verify?offset=4096&length=8192&repair=1&rate=1000",
            1000,
        )
        .unwrap();
        assert_eq!(code, 200);
        let v = node.status().verify.unwrap();
        assert_eq!((v.offset, v.length, v.repair), (4096, 8192, true));
        let (code, body) = request(&addr, "POST", "/verify?length=lots", 1000).unwrap();
        assert_eq!(code, 400);
        assert!(
            error_text(&body).contains("length"),
            "{}",
            error_text(&body)
        );
        assert_eq!(request(&addr, "GET", "/verify", 1000).unwrap().0, 405);
        assert_eq!(
            verify_request("").unwrap(),
            VerifyRequest::default(),
            "the whole volume, no repair, no rate limit"
        );
        let (code, body) = request(&addr, "POST", "/verify?repair=maybe", 1000).unwrap();
        assert_eq!(code, 400);
        assert!(
            error_text(&body).contains("repair"),
            "{}",
            error_text(&body)
        );
    }

    #[test]
    fn the_client_paths_parse_back_to_the_request() {
        let r = VerifyRequest {
            offset: 4096,
            length: 1 << 30,
            repair: true,
            bytes_per_sec: 50 << 20,
        };
        let path = verify_path(&r);
        let query = path.strip_prefix("/verify?").unwrap();
        assert_eq!(verify_request(query).unwrap(), r);
        let plain = verify_path(&VerifyRequest::default());
        let query = plain.strip_prefix("/verify?").unwrap();
        assert_eq!(verify_request(query).unwrap(), VerifyRequest::default());
        for force in [false, true] {
            let path = promote_path(force);
            let query = path.split_once('?').map_or("", |(_, q)| q);
            assert_eq!(promote_request(query).unwrap(), force);
        }
        assert!(promote_request("force").unwrap(), "a bare key says yes");
        assert!(!promote_request("force=0").unwrap());
    }

    #[test]
    fn promote_and_demote() {
        let (server, node) = start_fake(None);
        let addr = server.local_addr().to_string();
        post(&addr, "/promote").unwrap();
        assert_eq!(node.status().role, "primary");
        post(&addr, "/demote").unwrap();
        assert_eq!(node.status().role, "backup");
        let (code, body) = request(&addr, "POST", "/promote", 1000).unwrap();
        assert_eq!((code, body.as_slice()), (200, br#"{"ok":true}"#.as_slice()));
    }

    #[test]
    fn refused_command_is_409_with_the_reason() {
        let (server, _node) = start_fake(Some("split brain: choose a survivor"));
        let addr = server.local_addr().to_string();
        let (code, body) = request(&addr, "POST", "/promote", 1000).unwrap();
        assert_eq!(code, 409);
        assert_eq!(error_text(&body), "split brain: choose a survivor");
        // `promote --force` reaches the node with force set.
        assert_eq!(
            request(&addr, "POST", &promote_path(true), 1000).unwrap().0,
            200
        );
        let (code, body) = request(&addr, "POST", "/promote?force=yes", 1000).unwrap();
        assert_eq!(code, 400);
        assert!(error_text(&body).contains("force"), "{}", error_text(&body));
        let err = post(&addr, "/demote").unwrap_err().to_string();
        assert!(err.contains("refused /demote: split brain"), "{err}");
    }

    #[test]
    fn unknown_paths_and_methods() {
        let (server, _node) = start_fake(None);
        let addr = server.local_addr().to_string();
        assert_eq!(request(&addr, "GET", "/nope", 1000).unwrap().0, 404);
        assert_eq!(request(&addr, "GET", "/promote", 1000).unwrap().0, 405);
        assert_eq!(request(&addr, "POST", "/status", 1000).unwrap().0, 405);
        let err = post(&addr, "/nope").unwrap_err().to_string();
        assert!(err.contains("answered 404"), "{err}");
        assert_eq!(
            request(&addr, "GET", "/reset-latency", 1000).unwrap().0,
            405
        );
    }

    #[test]
    fn reset_latency_clears_the_histograms() {
        let (server, node) = start_fake(None);
        node.status.lock().unwrap().io.write_latency = Latency {
            count: 5,
            p50_us: 100.0,
            p99_us: 200.0,
            p999_us: 300.0,
        };
        let addr = server.local_addr().to_string();
        let (code, body) = request(&addr, "POST", "/reset-latency", 1000).unwrap();
        assert_eq!((code, body.as_slice()), (200, br#"{"ok":true}"#.as_slice()));
        assert_eq!(node.status().io.write_latency, Latency::default());
    }

    #[test]
    fn unreachable_endpoint_says_what_to_check() {
        // Bind then drop a listener to get a port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = get_status(&format!("127.0.0.1:{port}"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&format!(
                "cannot reach the admin endpoint at 127.0.0.1:{port}: "
            )) && err.ends_with("is `deltamirror serve` running?"),
            "{err}"
        );
    }

    #[test]
    fn busy_port_is_reported_with_the_field() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ctl: Arc<dyn Control> = Arc::new(FakeNode {
            status: Mutex::new(sample()),
            refuse: None,
        });
        let err = start(taken.local_addr().unwrap(), ctl).err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        assert!(err.to_string().contains("admin.listen"), "{err}");
    }

    #[test]
    fn shutdown_frees_the_port() {
        let (server, _node) = start_fake(None);
        let addr = server.local_addr();
        server.shutdown();
        // tiny_http's acceptor thread may take a moment to close the socket.
        let mut bound = false;
        for _ in 0..50 {
            if std::net::TcpListener::bind(addr).is_ok() {
                bound = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(bound, "port {addr} still in use after shutdown");
    }

    #[test]
    fn metrics_over_http() {
        let (server, _node) = start_fake(None);
        let addr = server.local_addr().to_string();
        let (code, body) = request(&addr, "GET", "/metrics", 1000).unwrap();
        assert_eq!(code, 200);
        let text = String::from_utf8(body).unwrap();
        assert_eq!(text, render_metrics(&sample()));
    }

    #[test]
    fn metrics_content() {
        let text = render_metrics(&sample());
        for line in [
            "deltamirror_node_info{node_id=\"2\",node_name=\"store \\\"b\\\"\"} 1",
            "deltamirror_role{role=\"primary\"} 0",
            "deltamirror_role{role=\"backup\"} 1",
            "deltamirror_generation 3",
            "deltamirror_peer_state{state=\"replaying\"} 1",
            "deltamirror_peer_state{state=\"connected\"} 0",
            "deltamirror_degraded 0",
            "deltamirror_delta_entries 10",
            "deltamirror_delta_bytes 40960",
            "deltamirror_ack1_seq 100",
            "deltamirror_ack2_seq 90",
            "deltamirror_ack3_seq 95",
            "deltamirror_dirty_extents 0",
            "# TYPE deltamirror_remirrors_total counter",
            "deltamirror_remirrors_total 1",
            "deltamirror_replay_active 1",
            "deltamirror_replay_remaining_entries 5",
            "deltamirror_replay_remaining_bytes 20480",
            "deltamirror_last_replay_seconds 0",
            "deltamirror_io_ops_total{op=\"write\"} 22",
            "deltamirror_io_bytes_total{op=\"read\"} 45056",
            "# TYPE deltamirror_io_latency_seconds summary",
            "deltamirror_io_latency_seconds{op=\"read\",quantile=\"0.99\"} 0.00025",
            "deltamirror_io_latency_seconds_count{op=\"read\"} 11",
            "deltamirror_link_messages_total{direction=\"sent\"} 9",
            "deltamirror_resident_memory_bytes 52428800",
            "deltamirror_uptime_seconds 12.5",
            "# TYPE deltamirror_reactor_seconds_total counter",
            "deltamirror_reactor_seconds_total{thread=\"dm-reactor-2\",core=\"0\",state=\"busy\"} 1.5",
            "deltamirror_reactor_seconds_total{thread=\"dm-reactor-2\",core=\"0\",state=\"idle\"} 11",
            "deltamirror_reactor_seconds_total{thread=\"dm-conn-1\",core=\"\",state=\"busy\"} 0.25",
            "deltamirror_disk_handover_at_once 1",
            "deltamirror_disk_handover_comparisons_total{chose=\"at-once\"} 5",
            "deltamirror_disk_handover_comparisons_total{chose=\"in-chunks\"} 2",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(!text.contains("deltamirror_peer_stale_from_seq"));
    }

    /// Every sample belongs to a family announced by HELP and TYPE lines
    /// before it, and every family is announced once.
    #[test]
    fn metrics_are_well_formed() {
        let mut s = sample();
        s.degraded = true;
        s.peer_stale_from_seq = Some(91);
        s.stale_mark_wanted = Some(engine::status::StaleMarkWanted {
            generation: 3,
            from_seq: 92,
            waiting_ms: 1500,
        });
        s.failover = Some(engine::status::FailoverStatus {
            mode: "etcd".into(),
            holds_lease: true,
            lease_left_ms: 2500,
            last_renewal_ms_ago: Some(500),
            lease_holder_node_id: Some(1),
            etcd_reachable: true,
            transitions: 2,
            ..Default::default()
        });
        let text = render_metrics(&s);
        for want in [
            "deltamirror_failover_holds_lease 1\n",
            "deltamirror_failover_lease_left_seconds 2.5\n",
            "deltamirror_failover_stale_mark_wait_seconds 1.5\n",
            "deltamirror_failover_fenced 0\n",
        ] {
            assert!(text.contains(want), "{want:?} missing");
        }
        let mut typed = std::collections::HashMap::new();
        let mut helped = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap();
                assert!(helped.insert(name.to_string()), "HELP twice for {name}");
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split(' ');
                let (name, kind) = (it.next().unwrap(), it.next().unwrap());
                assert!(helped.contains(name), "TYPE before HELP for {name}");
                assert!(typed.insert(name.to_string(), kind.to_string()).is_none());
            } else {
                let name = line.split(['{', ' ']).next().unwrap();
                let family = name
                    .strip_suffix("_count")
                    .filter(|f| typed.get(*f).map(String::as_str) == Some("summary"))
                    .unwrap_or(name);
                assert!(typed.contains_key(family), "sample {name} without TYPE");
                assert!(name.starts_with("deltamirror_"));
                let value = line.rsplit(' ').next().unwrap();
                assert!(
                    value.parse::<f64>().is_ok() || ["NaN", "+Inf", "-Inf"].contains(&value),
                    "{line}"
                );
            }
        }
        assert!(text.contains("\ndeltamirror_peer_stale_from_seq 91\n"));
        assert!(text.contains("\ndeltamirror_degraded 1\n"));
    }

    #[test]
    fn number_formatting() {
        assert_eq!(number(3.0), "3");
        assert_eq!(number(0.5), "0.5");
        assert_eq!(number(f64::NAN), "NaN");
        assert_eq!(number(f64::INFINITY), "+Inf");
        assert_eq!(number(1e20), "100000000000000000000");
    }

    #[test]
    fn response_parsing() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n2;x=y\r\nef\r\n0\r\n\r\n";
        assert_eq!(parse_response(raw).unwrap(), (200, b"abcdef".to_vec()));
        let raw = b"HTTP/1.1 409 Conflict\r\nContent-Length: 2\r\n\r\n{}";
        assert_eq!(parse_response(raw).unwrap(), (409, b"{}".to_vec()));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab").is_err());
        assert!(parse_response(b"garbage").is_err());
    }
}
