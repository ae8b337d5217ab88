//! `bench`: the mirror engine's benchmark. In one run it measures 4 KiB
//! QD1 write latency (p50/p99/p99.9) and QD32 write IOPS for
//!
//! - the local io_uring backend alone (O_DIRECT file on the data disk),
//! - the replication link round trip (4 KiB request, small ACK, loopback TCP),
//! - the mirrored volume (two nodes in this process, linked over loopback),
//!   in busy and adaptive poll mode,
//!
//! and prints mirrored p50 / (local p50 + link p50) and mirrored QD32 IOPS /
//! local QD32 IOPS, with the resident memory next to the speed figures. The
//! adaptive pair also runs with ACK coalescing off (`coalesce_acks = false`
//! on both nodes), next to link messages received per write.
//!
//! `--link-only` runs only the local-disk and link rows (the floors);
//! `--replay` runs the replay / remirror benchmark instead (replay.rs);
//! `--json PATH` also writes the results as JSON.

mod json;
mod replay;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use engine::core::Role;
use engine::link::fabric::FabricOptions;
use engine::link::{LinkOptions, LinkTransport};
use engine::node::{default_core_config, format, FormatFlags, Node, NodeOptions, PollMode};
use hdrhistogram::Histogram;
use json::J;
use storage::backend::uring::{create_file_device, UringBackend, UringConfig};
use storage::{AlignedBuf, Backend, BackendCompletion, BackendOp};
use volume::{submit_wait, Volume, VolumeIdentity, VolumeOp};

#[derive(Parser)]
#[command(about = "deltamirror engine benchmark: local disk vs link vs mirrored volume")]
pub(crate) struct Args {
    /// Directory on the disk to measure (not tmpfs).
    #[arg(long, default_value = "/var/tmp/deltamirror-bench")]
    dir: PathBuf,
    /// QD1 writes per measurement.
    #[arg(long, default_value_t = 5000)]
    qd1_ops: u64,
    /// Seconds per QD32 measurement.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Volume size in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Port base for the two nodes' links (each pair uses port + run * 10).
    #[arg(long, default_value_t = 17400)]
    port: u16,
    /// Only the local-disk and link round-trip rows (the floors).
    #[arg(long, conflicts_with = "replay")]
    link_only: bool,
    /// Run the replay / remirror benchmark instead of the write benchmark.
    #[arg(long)]
    replay: bool,
    /// Replay mode: outage sizes (random 4 KiB writes while node 2 is down).
    #[arg(long, default_value = "1000,10000,100000")]
    replay_n: String,
    /// Replay mode: ring size in MiB (must hold the largest N x 8192 bytes:
    /// a 4 KiB write takes a header block and a payload block).
    #[arg(long, default_value_t = 1024)]
    replay_ring_mib: u64,
    /// Replay mode: entries replayed while measuring foreground latency.
    #[arg(long, default_value_t = 100_000)]
    fg_entries: u64,
    /// Replay mode: the ceiling (core.max_replay_bytes_per_sec) in MiB/s for
    /// the second foreground run.
    #[arg(long, default_value_t = 16)]
    replay_max_mibs: u64,
    /// Replay mode: the floor (core.min_replay_bytes_per_sec) in MiB/s for
    /// the second foreground run.
    #[arg(long, default_value_t = 8)]
    replay_min_mibs: u64,
    /// Replay mode: MiB written to node 1 and then remirrored to a new node 2
    /// (also the size of that pair's volume).
    #[arg(long, default_value_t = 1024)]
    remirror_mib: u64,
    /// Replay mode: which parts to run (scaling, foreground, remirror).
    #[arg(long, default_value = "scaling,foreground,remirror")]
    replay_parts: String,
    /// Replay mode: give up (exit 1) when a replay takes longer (seconds).
    #[arg(long, default_value_t = 300)]
    replay_timeout: u64,
    /// Also write every result as JSON to this path.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Which replication transports to measure: tcp alone, or both (TCP
    /// and, beside it, libfabric with `--fabric-provider`).
    #[arg(long, default_value = "both", value_parser = ["tcp", "both"])]
    link: String,
    /// libfabric provider for the fabric rows ("tcp" on any machine,
    /// "verbs" on RDMA hardware).
    #[arg(long, default_value = "tcp")]
    fabric_provider: String,
}

/// Ring bytes of each fabric channel in the bench: both nodes run in this
/// process, so their four rings (6 MiB) fit the common 8 MiB RLIMIT_MEMLOCK.
const BENCH_FABRIC_RING: usize = 1536 << 10;
/// Largest link message in the fabric rows (fits the ring above).
const BENCH_FABRIC_MAX_MESSAGE: usize = (1 << 20) + (64 << 10);

struct Result1 {
    name: String,
    p50: f64,
    p99: f64,
    p999: f64,
    iops32: f64,
    rss_mib: f64,
    /// Mirrored rows: node 1's link messages received / sent per QD32 write.
    msgs_rx_per_write: Option<f64>,
    msgs_tx_per_write: Option<f64>,
}

impl Result1 {
    fn json(&self) -> J {
        J::obj()
            .with("name", self.name.as_str())
            .with("p50_us", self.p50)
            .with("p99_us", self.p99)
            .with("p999_us", self.p999)
            .with("qd32_iops", (self.iops32 > 0.0).then_some(self.iops32))
            .with("rss_mib", self.rss_mib)
            .with("link_msgs_received_per_write", self.msgs_rx_per_write)
            .with("link_msgs_sent_per_write", self.msgs_tx_per_write)
    }
}

pub(crate) fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 10_000_000, 3).unwrap()
}

pub(crate) fn rng(x: &mut u64) -> u64 {
    *x = x
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *x >> 16
}

pub(crate) fn rss_mib() -> f64 {
    engine::sys::rss_bytes() as f64 / (1 << 20) as f64
}

/// The local backend alone: QD1 latency and QD32 IOPS.
fn bench_local(path: &Path, args: &Args) -> Result1 {
    let mut be = UringBackend::open(
        path,
        &UringConfig {
            queue_depth: 64,
            file_block_size: 4096,
            // The raw disk: every pass's entries go at once.
            submit_hold_us: 0,
            ..UringConfig::default()
        },
    )
    .unwrap();
    let blocks = be.size_bytes() / 4096;
    let mut h = hist();
    let mut x = 1;
    let mut comps: Vec<BackendCompletion> = Vec::new();
    let mut buf = Some(AlignedBuf::from_slice(&[0x5a; 4096]));
    for i in 0..args.qd1_ops {
        let t = Instant::now();
        let off = (rng(&mut x) % blocks) * 4096;
        be.submit(
            i,
            BackendOp::Write {
                offset: off,
                buf: buf.take().unwrap(),
                fua: false,
            },
        )
        .unwrap();
        be.flush_submissions();
        loop {
            comps.clear();
            if be.reap(&mut comps) > 0 {
                buf = comps.pop().unwrap().buf;
                break;
            }
        }
        h.record(t.elapsed().as_micros().max(1) as u64).unwrap();
    }
    let mut bufs: Vec<AlignedBuf> = (0..32)
        .map(|_| AlignedBuf::from_slice(&[0xa5; 4096]))
        .collect();
    let end = Instant::now() + Duration::from_secs(args.seconds);
    let mut done = 0u64;
    let mut tag = 0;
    let start = Instant::now();
    while Instant::now() < end {
        while let Some(b) = bufs.pop() {
            tag += 1;
            let off = (rng(&mut x) % blocks) * 4096;
            be.submit(
                tag,
                BackendOp::Write {
                    offset: off,
                    buf: b,
                    fua: false,
                },
            )
            .unwrap();
        }
        be.flush_submissions();
        comps.clear();
        be.reap(&mut comps);
        for c in comps.drain(..) {
            done += 1;
            bufs.push(c.buf.unwrap());
        }
    }
    while be.in_flight() > 0 {
        comps.clear();
        be.reap(&mut comps);
    }
    let iops = done as f64 / start.elapsed().as_secs_f64();
    result("local disk (io_uring, O_DIRECT)", &h, iops)
}

fn result(name: &str, h: &Histogram<u64>, iops32: f64) -> Result1 {
    Result1 {
        name: name.into(),
        p50: h.value_at_quantile(0.5) as f64,
        p99: h.value_at_quantile(0.99) as f64,
        p999: h.value_at_quantile(0.999) as f64,
        iops32,
        rss_mib: rss_mib(),
        msgs_rx_per_write: None,
        msgs_tx_per_write: None,
    }
}

/// Link round trip: a 4 KiB request frame one way, a 16-byte ACK back.
fn bench_link(args: &Args, busy: bool) -> Result1 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let n = args.qd1_ops;
    let server = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_nodelay(true).unwrap();
        s.set_nonblocking(busy).unwrap();
        let mut req = vec![0u8; 4096 + 64];
        for _ in 0..n {
            read_full(&mut s, &mut req);
            s.write_all(&[7u8; 16]).unwrap();
        }
    });
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_nodelay(true).unwrap();
    c.set_nonblocking(busy).unwrap();
    let req = vec![1u8; 4096 + 64];
    let mut ack = [0u8; 16];
    let mut h = hist();
    for _ in 0..n {
        let t = Instant::now();
        c.write_all(&req).unwrap();
        read_full(&mut c, &mut ack);
        h.record(t.elapsed().as_micros().max(1) as u64).unwrap();
    }
    server.join().unwrap();
    result(
        if busy {
            "link round trip (busy poll)"
        } else {
            "link round trip (blocking)"
        },
        &h,
        0.0,
    )
}

/// The same round trip (4 KiB + 64 B request, 16-byte answer) over two
/// fabric channels: each message one `fi_writedata` into the other's
/// landing ring. `busy` spins on the CQ; otherwise each side sleeps on its
/// CQ's wait fd when `fi_trywait` allows, as the adaptive reactor does.
fn bench_link_fabric(args: &Args, busy: bool) -> Result1 {
    let cfg = rdma::ChannelConfig {
        provider: args.fabric_provider.clone(),
        ring_bytes: BENCH_FABRIC_RING,
        wait_fd: !busy,
    };
    let l = rdma::Listener::bind(&cfg.provider, "127.0.0.1:0".parse().unwrap())
        .unwrap_or_else(|e| panic!("fabric bench: {e}"));
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], l.port().unwrap()).into();
    let token = [0x42u8; rdma::TOKEN_BYTES];
    let n = args.qd1_ops;
    let (tx, rx) = std::sync::mpsc::channel();
    let (tx2, rx2) = std::sync::mpsc::channel();
    let c2 = cfg.clone();
    let server = std::thread::spawn(move || {
        let mut refused = Vec::new();
        let mut s = l
            .accept(&c2, &token, Duration::from_secs(10), &mut refused)
            .unwrap();
        tx.send(s.local_ring()).unwrap();
        s.set_peer(rx2.recv().unwrap()).unwrap();
        for _ in 0..n {
            let mut got = false;
            while !got {
                wait_fabric(&s, busy);
                s.poll(|_| got = true).unwrap();
            }
            while !s.send(&[7u8; 16]).unwrap() {
                s.poll(|_| {}).unwrap();
            }
        }
        // Let the last answer's completion be reaped before closing.
        for _ in 0..1000 {
            s.poll(|_| {}).unwrap();
        }
    });
    let mut c = rdma::connect(&cfg, addr, &token, Duration::from_secs(10)).unwrap();
    tx2.send(c.local_ring()).unwrap();
    c.set_peer(rx.recv().unwrap()).unwrap();
    let req = vec![1u8; 4096 + 64];
    let mut h = hist();
    for _ in 0..n {
        let t = Instant::now();
        while !c.send(&req).unwrap() {
            c.poll(|_| {}).unwrap();
        }
        let mut got = false;
        while !got {
            wait_fabric(&c, busy);
            c.poll(|_| got = true).unwrap();
        }
        h.record(t.elapsed().as_micros().max(1) as u64).unwrap();
        c.send_credit_if_due().unwrap();
    }
    server.join().unwrap();
    result(
        if busy {
            "fabric link round trip (busy poll)"
        } else {
            "fabric link round trip (wait fd)"
        },
        &h,
        0.0,
    )
}

/// Sleeps on the channel's wait fd when it has one and fi_trywait allows.
fn wait_fabric(c: &rdma::Channel, busy: bool) {
    if busy {
        return;
    }
    let Some(fd) = c.wait_fd() else { return };
    if c.trywait().unwrap_or(false) {
        engine::sys::poll_fds(&[(fd, false)], 100);
    }
}

fn read_full(s: &mut TcpStream, buf: &mut [u8]) {
    let mut got = 0;
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) => panic!("peer closed"),
            Ok(k) => got += k,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::hint::spin_loop(),
            Err(e) => panic!("{e}"),
        }
    }
}

/// A 4 KiB write payload in a buffer from the volume (the node's pool, as
/// a front-end receives into), or the heap when the pool has none free.
fn payload(vol: &dyn Volume, byte: u8) -> volume::IoBuf {
    let mut b = vol
        .alloc_buf(4096)
        .unwrap_or_else(|| volume::IoBuf::new(4096));
    b.fill(byte);
    b
}

pub(crate) fn node_opts(dir: &Path, id: u32, port: u16, mode: PollMode) -> NodeOptions {
    let d = dir.join(format!("node{id}"));
    NodeOptions {
        node_id: id,
        node_name: format!("bench-{id}"),
        data_dir: d.clone(),
        ring_path: d.join("ring"),
        volume_path: d.join("volume.img"),
        block_size: 4096,
        keep_volume_space: false,
        identity: VolumeIdentity {
            uuid: *b"deltamirror-benc",
            serial: "BENCH".into(),
            model: "bench".into(),
            node_index: id as u16,
        },
        core: {
            let mut c = default_core_config(id);
            c.ack1_persisted = std::env::var("DM_BENCH_ACK1").map_or(true, |v| v != "received");
            if let Some(ms) = std::env::var("DM_BENCH_PEER_TIMEOUT_MS")
                .ok()
                .and_then(|v| v.parse().ok())
            {
                c.peer_timeout_ms = ms;
            }
            c
        },
        link: LinkOptions {
            node_id: id,
            listen: format!("127.0.0.1:{}", port + id as u16 - 1)
                .parse()
                .unwrap(),
            peer: format!("127.0.0.1:{}", port + 2 - id as u16)
                .parse()
                .unwrap(),
            psk: b"bench-pre-shared-key-0123456789".to_vec(),
            connect_retry_ms: 50,
            handshake_timeout_ms: 2000,
            transport: LinkTransport::Tcp,
        },
        core_id: Some(
            (id as usize - 1) % core_affinity::get_core_ids().map_or(1, |c| c.len()).max(1),
        ),
        poll_mode: mode,
        adaptive_spin_us: std::env::var("DM_BENCH_SPIN_US")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(50),
        disk_submit_hold_us: storage::backend::DEFAULT_SUBMIT_HOLD_US,
        disk_hand_over: Default::default(),
        queue_depth: 128,
        max_io_bytes: 1 << 20,
        max_message_bytes: 8 << 20,
        buffer_pool_bytes: 64 << 20,
    }
}

/// Where the time went, from each node's own stage histograms.
fn print_stages(nodes: &[Node], what: &str) {
    use engine::status::Control;
    std::thread::sleep(Duration::from_millis(150));
    for (i, n) in nodes.iter().enumerate() {
        let io = n.control.status().io;
        println!(
            "  node {} after {what}: host write p50 {:.0} µs, ring sync p50 {:.0} µs (n={}), disk write p50 {:.0} µs (n={})",
            i + 1,
            io.write_latency.p50_us,
            io.ring_sync_latency.p50_us,
            io.ring_sync_latency.count,
            io.disk_write_latency.p50_us,
            io.disk_write_latency.count
        );
    }
}

/// Two nodes in this process, mirrored over loopback: QD1 and QD32 writes
/// through the primary's volume. `coalesce` sets `core.coalesce_acks` on
/// both nodes.
fn bench_mirrored(args: &Args, mode: PollMode, run: u16, coalesce: bool, fabric: bool) -> Result1 {
    use engine::status::Control;
    let dir = args.dir.join(format!("pair-{run}"));
    let _ = std::fs::remove_dir_all(&dir);
    let port = args.port + run * 10;
    let mut nodes = Vec::new();
    for id in 1..=2u32 {
        let mut o = node_opts(&dir, id, port, mode);
        o.core.coalesce_acks = coalesce;
        if fabric {
            o.max_message_bytes = BENCH_FABRIC_MAX_MESSAGE;
            o.link.transport = LinkTransport::Fabric(FabricOptions {
                provider: args.fabric_provider.clone(),
                ring_bytes: BENCH_FABRIC_RING,
                listen: format!("127.0.0.1:{}", port + 2).parse().unwrap(),
            });
        }
        std::fs::create_dir_all(&o.data_dir).unwrap();
        create_file_device(&o.volume_path, args.size_mib << 20).unwrap();
        format(
            &o,
            256 << 20,
            if id == 1 { Role::Primary } else { Role::Backup },
            FormatFlags {
                force: true,
                ..FormatFlags::default()
            },
        )
        .unwrap();
        nodes.push(Node::start(o).unwrap());
    }
    let vol = nodes[0].volume.clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    while vol.path_state() != volume::PathState::Optimized {
        assert!(Instant::now() < deadline, "the pair did not connect");
        std::thread::sleep(Duration::from_millis(10));
    }
    let blocks = (args.size_mib << 20) / 4096;
    let mut x = 7;
    let mut h = hist();
    for _ in 0..args.qd1_ops {
        let off = (rng(&mut x) % blocks) * 4096;
        let t = Instant::now();
        submit_wait(
            &*vol,
            VolumeOp::Write {
                offset: off,
                data: payload(&*vol, 0x33),
                fua: false,
            },
        )
        .unwrap();
        h.record(t.elapsed().as_micros().max(1) as u64).unwrap();
    }
    print_stages(&nodes, "QD1");
    // print_stages waited out a status publication: the counters are current.
    let before = nodes[0].control.status();
    // QD32: keep 32 writes in flight from one submitting thread, which
    // sleeps (it must not steal a core from the reactors) until a slot frees.
    let slots = Arc::new((std::sync::Mutex::new(0u32), std::sync::Condvar::new()));
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let end = start + Duration::from_secs(args.seconds);
    while Instant::now() < end {
        {
            let (m, c) = &*slots;
            let mut n = m.lock().unwrap();
            while *n >= 32 {
                n = c.wait(n).unwrap();
            }
            *n += 1;
        }
        let (sl, d, f) = (slots.clone(), done.clone(), failed.clone());
        let off = (rng(&mut x) % blocks) * 4096;
        vol.submit(
            VolumeOp::Write {
                offset: off,
                data: payload(&*vol, 0x44),
                fua: false,
            },
            Box::new(move |r| {
                if r.is_err() {
                    f.store(true, Ordering::Release);
                }
                d.fetch_add(1, Ordering::AcqRel);
                let (m, c) = &*sl;
                *m.lock().unwrap() -= 1;
                c.notify_one();
            }),
        );
    }
    {
        let (m, c) = &*slots;
        let mut n = m.lock().unwrap();
        while *n > 0 {
            n = c.wait(n).unwrap();
        }
    }
    assert!(!failed.load(Ordering::Acquire), "a mirrored write failed");
    let secs = start.elapsed().as_secs_f64();
    print_stages(&nodes, "QD32 (cumulative)");
    let after = nodes[0].control.status();
    let writes = done.load(Ordering::Acquire);
    let iops = writes as f64 / secs;
    let name = match (mode, coalesce) {
        (PollMode::Busy, _) => "mirrored volume (busy poll)",
        (PollMode::Adaptive, true) => "mirrored volume (adaptive poll)",
        (PollMode::Adaptive, false) => "mirrored volume (adaptive, ACK coalescing off)",
    };
    let name = if fabric {
        name.replace("mirrored volume", "mirrored volume over fabric")
    } else {
        name.to_string()
    };
    let mut r = result(&name, &h, iops);
    let w = writes.max(1) as f64;
    r.msgs_rx_per_write = Some(
        after
            .link_msgs_received
            .saturating_sub(before.link_msgs_received) as f64
            / w,
    );
    r.msgs_tx_per_write =
        Some(after.link_msgs_sent.saturating_sub(before.link_msgs_sent) as f64 / w);
    for n in nodes {
        n.shutdown();
    }
    let _ = std::fs::remove_dir_all(&dir);
    r
}

fn write_json(args: &Args, v: &J) {
    if let Some(p) = &args.json {
        if let Some(d) = p.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        if let Err(e) = std::fs::write(p, v.render()) {
            eprintln!("bench: cannot write {}: {e}", p.display());
            std::process::exit(1);
        }
    }
}

fn print_rows(rows: &[&Result1]) {
    println!("| what | QD1 p50 µs | p99 µs | p99.9 µs | QD32 IOPS | RSS MiB |");
    println!("|---|---|---|---|---|---|");
    for r in rows {
        let iops = if r.iops32 > 0.0 {
            format!("{:.0}", r.iops32)
        } else {
            "-".into()
        };
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {} | {:.0} |",
            r.name, r.p50, r.p99, r.p999, iops, r.rss_mib
        );
    }
}

fn main() {
    // Engine warnings (a stalled reactor, a dropped link) go to stderr.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    std::fs::create_dir_all(&args.dir).unwrap();
    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    if args.replay {
        println!("load average before: {}", loadavg.trim());
        match replay::run(&args) {
            Ok(v) => write_json(&args, &v),
            Err(e) => {
                eprintln!("bench --replay: FAILED: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    let local_path = args.dir.join("local.img");
    create_file_device(&local_path, args.size_mib << 20).unwrap();
    println!(
        "deltamirror bench: 4 KiB writes, {} QD1 ops, {} s at QD32, volume {} MiB in {}",
        args.qd1_ops,
        args.seconds,
        args.size_mib,
        args.dir.display()
    );
    println!("load average before: {}", loadavg.trim());
    let local = bench_local(&local_path, &args);
    let link_block = bench_link(&args, false);
    let link_busy = bench_link(&args, true);
    let fabric = args.link == "both";
    let fabric_links = if fabric {
        vec![
            bench_link_fabric(&args, false),
            bench_link_fabric(&args, true),
        ]
    } else {
        Vec::new()
    };
    let _ = std::fs::remove_file(&local_path);
    let mut out = J::obj()
        .with("mode", if args.link_only { "link-only" } else { "write" })
        .with("qd1_ops", args.qd1_ops)
        .with("seconds", args.seconds)
        .with("volume_mib", args.size_mib)
        .with("loadavg_before", loadavg.trim());
    if args.link_only {
        println!();
        let mut rows = vec![&local, &link_block, &link_busy];
        rows.extend(fabric_links.iter());
        print_rows(&rows);
        out.set("rows", J::arr(rows.iter().map(|r| r.json()).collect()));
        write_json(&args, &out);
        return;
    }
    let m_busy = if std::env::var("DM_BENCH_SKIP_BUSY").is_ok() {
        Result1 {
            name: "mirrored volume (busy poll) skipped".into(),
            p50: 0.0,
            p99: 0.0,
            p999: 0.0,
            iops32: 0.0,
            rss_mib: 0.0,
            msgs_rx_per_write: None,
            msgs_tx_per_write: None,
        }
    } else {
        bench_mirrored(&args, PollMode::Busy, 0, true, false)
    };
    let m_adapt = bench_mirrored(&args, PollMode::Adaptive, 1, true, false);
    let m_nocoal = bench_mirrored(&args, PollMode::Adaptive, 2, false, false);
    // The same pairs with the link on libfabric (runs 3 and 4).
    let mut fabric_rows = Vec::new();
    if fabric {
        if std::env::var("DM_BENCH_SKIP_BUSY").is_err() {
            fabric_rows.push(bench_mirrored(&args, PollMode::Busy, 3, true, true));
        }
        fabric_rows.push(bench_mirrored(&args, PollMode::Adaptive, 4, true, true));
    }
    println!();
    let mut all = vec![
        &local,
        &link_block,
        &link_busy,
        &m_busy,
        &m_adapt,
        &m_nocoal,
    ];
    all.extend(fabric_links.iter());
    all.extend(fabric_rows.iter());
    print_rows(&all);
    println!();
    let ratio = |m: &Result1, l: &Result1| m.p50 / (local.p50 + l.p50);
    println!(
        "mirrored p50 / (local p50 + link p50): busy {:.2} (aim <= 1.25), adaptive {:.2}",
        ratio(&m_busy, &link_busy),
        ratio(&m_adapt, &link_block)
    );
    println!(
        "mirrored / local QD32 IOPS: busy {:.2}, adaptive {:.2} (aim >= 0.7)",
        m_busy.iops32 / local.iops32,
        m_adapt.iops32 / local.iops32
    );
    println!();
    println!("| ACK coalescing (adaptive pair, QD32) | QD32 IOPS | node 1 link msgs received per write | node 1 link msgs sent per write | QD1 p50 µs |");
    println!("|---|---|---|---|---|");
    let mut coalescing = vec![("on (default)", &m_adapt), ("off", &m_nocoal)];
    if let Some(r) = fabric_rows.last() {
        coalescing.push(("on, over fabric", r));
    }
    for (what, r) in coalescing {
        println!(
            "| {what} | {:.0} | {:.2} | {:.2} | {:.0} |",
            r.iops32,
            r.msgs_rx_per_write.unwrap_or(0.0),
            r.msgs_tx_per_write.unwrap_or(0.0),
            r.p50
        );
    }
    println!(
        "QD32 IOPS coalescing off / on: {:.2}",
        m_nocoal.iops32 / m_adapt.iops32.max(1.0)
    );
    println!("RSS includes both nodes of the pair (one process), mapped ring pages included.");
    if fabric {
        println!(
            "fabric rows: libfabric provider {:?}; on loopback its tcp provider runs over the same kernel TCP, so it need not beat the TCP rows (docs/performance.md)",
            args.fabric_provider
        );
    }
    out.set("rows", J::arr(all.iter().map(|r| r.json()).collect()));
    write_json(&args, &out);
}
