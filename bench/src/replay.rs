//! `bench --replay`: what an outage costs, with the same in-process pair as
//! the mirrored rows.
//!
//! - Replay scaling: node 2 stops, node 1 takes N random 4 KiB writes
//!   (degraded), node 2 restarts; how long until node 1 has replayed the N
//!   entries and the pair is in sync, and how many bytes went over the link
//!   against the N × 4 KiB that node 2 missed.
//! - Foreground latency during a replay: QD1 4 KiB writes on node 1 while
//!   idle and in sync, then while a replay of `--fg-entries` runs; once with
//!   no replay rate limits, once with a ceiling and a floor.
//! - Full remirror: node 1 holds `--remirror-mib` of written data; node 2's
//!   disk and state are deleted and reformatted as a new disk; time until the
//!   remirror is done, against the disk's sequential write bandwidth and the
//!   loopback TCP bandwidth measured in the same run.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::core::{CoreConfig, Role};
use engine::node::{format, FormatFlags, Node, NodeOptions, PollMode};
use engine::status::{Control, NodeStatus};
use storage::backend::uring::{create_file_device, UringBackend, UringConfig};
use storage::{AlignedBuf, Backend, BackendCompletion, BackendOp};
use volume::{submit_wait, Volume, VolumeOp};

use crate::json::J;
use crate::{hist, node_opts, rng, rss_mib, Args};

const MIB: f64 = (1u64 << 20) as f64;

type Res<T> = Result<T, String>;

/// A two-node pair whose node 2 can be stopped, restarted or replaced.
struct Pair {
    n1: Node,
    n2: Option<Node>,
    opts2: NodeOptions,
    ring_bytes: u64,
    dir: PathBuf,
    vol_bytes: u64,
}

impl Pair {
    fn start(
        args: &Args,
        run: u16,
        ring_bytes: u64,
        vol_bytes: u64,
        tweak: &dyn Fn(&mut CoreConfig),
    ) -> Res<Pair> {
        let dir = args.dir.join(format!("pair-{run}"));
        let _ = std::fs::remove_dir_all(&dir);
        let port = args.port + run * 10;
        let mut opts = Vec::new();
        for id in 1..=2u32 {
            let mut o = node_opts(&dir, id, port, PollMode::Adaptive);
            tweak(&mut o.core);
            std::fs::create_dir_all(&o.data_dir).map_err(|e| e.to_string())?;
            create_file_device(&o.volume_path, vol_bytes).map_err(|e| e.to_string())?;
            let role = if id == 1 { Role::Primary } else { Role::Backup };
            let force = FormatFlags {
                force: true,
                ..FormatFlags::default()
            };
            format(&o, ring_bytes, role, force)?;
            opts.push(o);
        }
        let n1 = Node::start(opts[0].clone())?;
        let n2 = Node::start(opts[1].clone())?;
        let p = Pair {
            n1,
            n2: Some(n2),
            opts2: opts[1].clone(),
            ring_bytes,
            dir,
            vol_bytes,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while p.n1.volume.path_state() != volume::PathState::Optimized {
            if Instant::now() > deadline {
                return Err("the pair did not connect within 20 s".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(p)
    }

    fn status(&self) -> NodeStatus {
        self.n1.control.status()
    }

    fn stop2(&mut self) {
        if let Some(n) = self.n2.take() {
            n.shutdown();
        }
    }

    fn restart2(&mut self) -> Res<()> {
        self.n2 = Some(Node::start(self.opts2.clone())?);
        Ok(())
    }

    /// Deletes node 2's data directory and volume, and formats it as a new
    /// disk (`format --replace`: empty history, so node 1 remirrors it).
    fn replace2(&mut self) -> Res<()> {
        self.stop2();
        let o = &self.opts2;
        std::fs::remove_dir_all(&o.data_dir).map_err(|e| e.to_string())?;
        std::fs::create_dir_all(&o.data_dir).map_err(|e| e.to_string())?;
        create_file_device(&o.volume_path, self.vol_bytes).map_err(|e| e.to_string())?;
        let flags = FormatFlags {
            force: true,
            replace: true,
            ..FormatFlags::default()
        };
        format(o, self.ring_bytes, Role::Backup, flags)
    }

    fn finish(mut self) {
        self.stop2();
        self.n1.shutdown();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Polls node 1's status (published every 100 ms) until `pred` holds.
fn wait_status(
    p: &Pair,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&NodeStatus) -> bool,
) -> Res<NodeStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        let s = p.status();
        if pred(&s) {
            return Ok(s);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "node 1 not {what} within {} s: peer_state {}, head {}, ack1 {}, ack2 {}, degraded {}, \
                 replay_progress {:?}, last_replay {:?}",
                timeout.as_secs(),
                s.peer_state,
                s.head_seq,
                s.ack1_seq,
                s.ack2_seq,
                s.degraded,
                s.replay_progress,
                s.last_replay
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// `n` writes of `bs` bytes at queue depth `qd`, offsets from `off`.
/// Returns the seconds taken.
fn write_many(
    vol: &dyn Volume,
    n: u64,
    qd: u32,
    bs: usize,
    mut off: impl FnMut(u64) -> u64,
) -> Res<f64> {
    let slots = Arc::new((std::sync::Mutex::new(0u32), std::sync::Condvar::new()));
    let failed = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    for i in 0..n {
        {
            let (m, c) = &*slots;
            let mut k = m.lock().unwrap();
            while *k >= qd {
                k = c.wait(k).unwrap();
            }
            *k += 1;
        }
        if failed.load(Ordering::Acquire) {
            break;
        }
        let (sl, f) = (slots.clone(), failed.clone());
        vol.submit(
            VolumeOp::Write {
                offset: off(i),
                data: vec![(i as u8) | 1; bs].into(),
                fua: false,
            },
            Box::new(move |r| {
                if r.is_err() {
                    f.store(true, Ordering::Release);
                }
                let (m, c) = &*sl;
                *m.lock().unwrap() -= 1;
                c.notify_one();
            }),
        );
    }
    let (m, c) = &*slots;
    let mut k = m.lock().unwrap();
    while *k > 0 {
        k = c.wait(k).unwrap();
    }
    if failed.load(Ordering::Acquire) {
        return Err("a write failed".into());
    }
    Ok(start.elapsed().as_secs_f64())
}

fn write4k(vol: &dyn Volume, off: u64) -> Res<()> {
    submit_wait(
        vol,
        VolumeOp::Write {
            offset: off,
            data: vec![0x5c; 4096].into(),
            fua: false,
        },
    )
    .map(|_| ())
    .map_err(|e| format!("write at {off} failed: {e}"))
}

struct Outage {
    /// Head seq on node 1 when node 2 restarted.
    head: u64,
    /// Seconds the first write after the stop waited (until degraded).
    degraded_wait_s: f64,
    fill_s: f64,
    fill_iops: f64,
}

/// Stops node 2 and writes `n` random 4 KiB blocks to node 1 (the first one
/// alone: it waits out the peer timeout; the rest at QD32).
fn outage(p: &mut Pair, n: u64, seed: u64) -> Res<Outage> {
    let head0 = p.status().head_seq;
    p.stop2();
    let blocks = p.vol_bytes / 4096;
    let mut x = seed;
    let t = Instant::now();
    write4k(&*p.n1.volume, (rng(&mut x) % blocks) * 4096)?;
    let degraded_wait_s = t.elapsed().as_secs_f64();
    let fill_s = write_many(&*p.n1.volume, n - 1, 32, 4096, |_| {
        (rng(&mut x) % blocks) * 4096
    })?;
    let s = wait_status(p, "at the new head", Duration::from_secs(10), |s| {
        s.head_seq >= head0 + n
    })?;
    Ok(Outage {
        head: s.head_seq,
        degraded_wait_s,
        fill_s,
        fill_iops: (n - 1) as f64 / fill_s.max(1e-9),
    })
}

fn replayed(s: &NodeStatus, head: u64) -> bool {
    s.peer_state == "connected" && s.last_replay.as_ref().is_some_and(|r| r.last_seq >= head)
}

// ---------------------------------------------------------------- 1. scaling

struct Scaling {
    n: u64,
    o: Outage,
    /// Restart of node 2 to node 1 reporting the replay finished.
    wall_replay_s: f64,
    /// Restart of node 2 to the pair in sync (ACK2 = head: node 2 executed
    /// everything).
    wall_s: f64,
    st: NodeStatus,
    rss: f64,
}

fn scaling(args: &Args, n: u64, run: u16, timeout: Duration) -> Res<Scaling> {
    let ring = args.replay_ring_mib << 20;
    let mut p = Pair::start(args, run, ring, args.size_mib << 20, &|_| {})?;
    let o = outage(&mut p, n, 11 + n)?;
    let t0 = Instant::now();
    p.restart2()?;
    wait_status(&p, "done replaying", timeout, |s| replayed(s, o.head))?;
    let wall_replay_s = t0.elapsed().as_secs_f64();
    let st = wait_status(&p, "in sync after the replay", timeout, |s| {
        replayed(s, o.head) && s.ack2_seq >= s.head_seq
    })?;
    let wall_s = t0.elapsed().as_secs_f64();
    let rss = rss_mib();
    p.finish();
    Ok(Scaling {
        n,
        o,
        wall_replay_s,
        wall_s,
        st,
        rss,
    })
}

// ---------------------------------------------------------------- 2. foreground

struct Foreground {
    label: String,
    max_bps: u64,
    min_bps: u64,
    idle: (f64, f64, u64),
    during: (f64, f64, u64),
    o: Outage,
    st: NodeStatus,
    wall_s: f64,
    rss: f64,
}

fn foreground(
    args: &Args,
    label: &str,
    max_bps: u64,
    min_bps: u64,
    run: u16,
    timeout: Duration,
) -> Res<Foreground> {
    let ring = args.replay_ring_mib << 20;
    let mut p = Pair::start(args, run, ring, args.size_mib << 20, &|c| {
        c.max_replay_bytes_per_sec = max_bps;
        c.min_replay_bytes_per_sec = min_bps;
    })?;
    let blocks = p.vol_bytes / 4096;
    let mut x = 99 + run as u64;
    let mut h = hist();
    for _ in 0..args.qd1_ops.min(2000) {
        let off = (rng(&mut x) % blocks) * 4096;
        let t = Instant::now();
        write4k(&*p.n1.volume, off)?;
        h.record(t.elapsed().as_micros().max(1) as u64).unwrap();
    }
    let idle = (
        h.value_at_quantile(0.5) as f64,
        h.value_at_quantile(0.99) as f64,
        h.len(),
    );
    wait_status(
        &p,
        "in sync before the outage",
        Duration::from_secs(30),
        |s| s.ack2_seq >= s.head_seq,
    )?;
    let o = outage(&mut p, args.fg_entries, 1234 + run as u64)?;
    let mut h = hist();
    let t0 = Instant::now();
    p.restart2()?;
    let deadline = t0 + timeout;
    let mut last_check = Instant::now();
    loop {
        let off = (rng(&mut x) % blocks) * 4096;
        let t = Instant::now();
        write4k(&*p.n1.volume, off)?;
        h.record(t.elapsed().as_micros().max(1) as u64).unwrap();
        if last_check.elapsed() >= Duration::from_millis(20) {
            last_check = Instant::now();
            if replayed(&p.status(), o.head) {
                break;
            }
            if last_check > deadline {
                return Err(format!(
                    "replay of {} entries not finished within {} s",
                    args.fg_entries,
                    timeout.as_secs()
                ));
            }
        }
    }
    let wall_s = t0.elapsed().as_secs_f64();
    let during = (
        h.value_at_quantile(0.5) as f64,
        h.value_at_quantile(0.99) as f64,
        h.len(),
    );
    let st = wait_status(
        &p,
        "in sync after the replay",
        Duration::from_secs(60),
        |s| replayed(s, o.head) && s.ack2_seq >= s.head_seq,
    )?;
    let rss = rss_mib();
    p.finish();
    Ok(Foreground {
        label: label.into(),
        max_bps,
        min_bps,
        idle,
        during,
        o,
        st,
        wall_s,
        rss,
    })
}

// ---------------------------------------------------------------- 3. remirror

struct Remirror {
    mib: u64,
    /// Replay sessions node 1 reported: (seconds, bytes sent, full_remirror)
    /// as last seen while running.
    sessions: Vec<(f64, u64, bool)>,
    /// (seconds since node 2's start, node 1 peer_state, remirrors) at each change.
    trace: Vec<(f64, String, u64)>,
    fill_s: f64,
    wall_s: f64,
    st: NodeStatus,
    remirrors_before: u64,
    same: Option<bool>,
    rss: f64,
}

fn remirror(args: &Args, run: u16, timeout: Duration) -> Res<Remirror> {
    let mib = args.remirror_mib.max(16);
    let mut p = Pair::start(args, run, 256 << 20, mib << 20, &|_| {})?;
    let fill_s = write_many(&*p.n1.volume, mib, 8, 1 << 20, |i| i << 20)?;
    wait_status(
        &p,
        "in sync after the fill",
        Duration::from_secs(120),
        |s| s.ack2_seq >= s.head_seq,
    )?;
    let before = p.status().remirrors;
    p.replace2()?;
    let t0 = Instant::now();
    p.restart2()?;
    // Done: a remirror was counted, no replay is running, the peer is
    // connected and has executed everything. Every change of node 1's
    // peer_state / remirrors on the way is kept (a dropped session shows).
    // A replay whose `seconds` went down is a new session (the 100 ms
    // status can hide a short disconnect in between).
    let mut trace: Vec<(f64, String, u64)> = Vec::new();
    let mut sessions: Vec<(f64, u64, bool)> = Vec::new();
    let mut last_secs = f64::MAX;
    let deadline = t0 + timeout;
    let st = loop {
        let s = p.status();
        let mut state = s.peer_state.clone();
        if let Some(rp) = &s.replay_progress {
            if rp.seconds < last_secs {
                sessions.push((0.0, 0, rp.full_remirror));
                state = format!("replaying (session {})", sessions.len());
            } else {
                state = trace.last().map_or(state, |t| t.1.clone());
            }
            last_secs = rp.seconds;
            let cur = sessions.last_mut().unwrap();
            cur.0 = rp.seconds;
            cur.1 = rp.bytes;
        } else {
            last_secs = f64::MAX;
        }
        if trace
            .last()
            .is_none_or(|(_, ps, r)| *ps != state || *r != s.remirrors)
        {
            trace.push((t0.elapsed().as_secs_f64(), state, s.remirrors));
        }
        if s.remirrors > before
            && s.peer_state == "connected"
            && s.replay_progress.is_none()
            && s.last_replay.is_some()
            && s.ack2_seq >= s.head_seq
        {
            break s;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "node 1 not in sync after the remirror within {} s: peer_state {}, remirrors {} (before {before}), \
                 head {}, ack2 {}, replay_progress {:?}, last_replay {:?}, trace {trace:?}",
                timeout.as_secs(),
                s.peer_state,
                s.remirrors,
                s.head_seq,
                s.ack2_seq,
                s.replay_progress,
                s.last_replay
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let wall_s = t0.elapsed().as_secs_f64();
    let rss = rss_mib();
    let path1 = p.dir.join("node1").join("volume.img");
    let path2 = p.opts2.volume_path.clone();
    let dir = p.dir.clone();
    p.stop2();
    p.n1.shutdown();
    let same = compare_files(&path1, &path2, mib);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Remirror {
        mib,
        sessions,
        trace,
        fill_s,
        wall_s,
        st,
        remirrors_before: before,
        same,
        rss,
    })
}

/// Compares 16 spread 1 MiB pieces of the two volume files (after both nodes
/// stopped): a sanity check that the remirror copied the data.
fn compare_files(a: &Path, b: &Path, mib: u64) -> Option<bool> {
    use std::os::unix::fs::FileExt;
    let fa = std::fs::File::open(a).ok()?;
    let fb = std::fs::File::open(b).ok()?;
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    for k in 0..16u64 {
        let off = (k * mib / 16) << 20;
        fa.read_exact_at(&mut ba, off).ok()?;
        fb.read_exact_at(&mut bb, off).ok()?;
        if ba != bb {
            return Some(false);
        }
    }
    Some(true)
}

/// Sequential 1 MiB O_DIRECT writes at QD8 over a new (sparse) file of
/// `mib` MiB, like a remirror target: MiB/s.
fn disk_seq_mibs(dir: &Path, mib: u64) -> Res<f64> {
    let path = dir.join("seq.img");
    let _ = std::fs::remove_file(&path);
    create_file_device(&path, mib << 20).map_err(|e| e.to_string())?;
    let mut be = UringBackend::open(
        &path,
        &UringConfig {
            queue_depth: 16,
            file_block_size: 4096,
            // The raw disk: every pass's entries go at once.
            submit_hold_us: 0,
            ..UringConfig::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let mut bufs: Vec<AlignedBuf> = (0..8)
        .map(|_| AlignedBuf::from_slice(&vec![0x6b; 1 << 20]))
        .collect();
    let mut comps: Vec<BackendCompletion> = Vec::new();
    let (mut next, mut done) = (0u64, 0u64);
    let start = Instant::now();
    while done < mib {
        while next < mib {
            let Some(b) = bufs.pop() else { break };
            be.submit(
                next,
                BackendOp::Write {
                    offset: next << 20,
                    buf: b,
                    fua: false,
                },
            )
            .map_err(|e| format!("{e:?}"))?;
            next += 1;
        }
        be.flush_submissions();
        comps.clear();
        be.reap(&mut comps);
        for c in comps.drain(..) {
            if let Err(e) = c.result {
                return Err(format!("disk seq write failed: {e:?}"));
            }
            done += 1;
            bufs.push(c.buf.unwrap());
        }
    }
    let secs = start.elapsed().as_secs_f64();
    drop(be);
    let _ = std::fs::remove_file(&path);
    Ok(mib as f64 / secs)
}

/// 1 MiB buffers blasted over a 127.0.0.1 socket between two threads for
/// about a second: MiB/s received.
fn loopback_mibs() -> Res<f64> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = l.local_addr().map_err(|e| e.to_string())?;
    let server = std::thread::spawn(move || -> u64 {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return got,
                Ok(k) => got += k as u64,
            }
        }
    });
    let mut c = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    let buf = vec![0x42u8; 1 << 20];
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(1) {
        c.write_all(&buf).map_err(|e| e.to_string())?;
    }
    drop(c);
    let got = server.join().map_err(|_| "loopback reader panicked")?;
    Ok(got as f64 / MIB / start.elapsed().as_secs_f64())
}

// ---------------------------------------------------------------- driver

fn replay_json(s: &NodeStatus) -> J {
    match &s.last_replay {
        None => J::null(),
        Some(r) => J::obj()
            .with("seconds", r.seconds)
            .with("entries", r.entries)
            .with("bytes", r.bytes)
            .with("extents", r.extents)
            .with("full_remirror", r.full_remirror)
            .with("first_seq", r.first_seq)
            .with("last_seq", r.last_seq),
    }
}

pub fn run(args: &Args) -> Res<J> {
    let timeout = Duration::from_secs(args.replay_timeout);
    let ns: Vec<u64> = args
        .replay_n
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            s.trim()
                .parse::<u64>()
                .map_err(|e| format!("--replay-n {s}: {e}"))
        })
        .collect::<Res<_>>()?;
    println!(
        "deltamirror bench --replay: volume {} MiB, ring {} MiB, adaptive poll, in {}",
        args.size_mib,
        args.replay_ring_mib,
        args.dir.display()
    );
    let mut out = J::obj();
    out.set("mode", "replay");
    out.set("volume_mib", args.size_mib);
    out.set("ring_mib", args.replay_ring_mib);
    let ld = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    out.set("loadavg_before", ld.trim());

    let part = |name: &str| args.replay_parts.split(',').any(|p| p.trim() == name);
    // 1. Replay scaling.
    let mut rows = Vec::new();
    for (i, &n) in ns.iter().enumerate().filter(|_| part("scaling")) {
        if n < 2 {
            return Err("--replay-n values must be >= 2".into());
        }
        let r = scaling(args, n, 10 + i as u16, timeout)?;
        let lr = r.st.last_replay.clone().unwrap_or_default();
        println!(
            "replay N={n}: {:.2} s (core), {:.2} s wall, {} entries, {} bytes, {} extents, remirrors {}",
            lr.seconds, r.wall_s, lr.entries, lr.bytes, lr.extents, r.st.remirrors
        );
        rows.push(r);
    }
    if !rows.is_empty() {
        println!();
        println!("### Replay after an outage of node 2 (N random 4 KiB writes to node 1)");
        println!();
        println!(
        "| N | replay s (core) | wall s (restart to replay done) | wall s (restart to ACK2 = head) | s per 1k entries | entries | bytes replayed | bytes missed | replayed / missed | extents | full remirror | remirrors | degraded fill IOPS | RSS MiB |"
    );
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        let mut jr = Vec::new();
        for r in &rows {
            let lr = r.st.last_replay.clone().unwrap_or_default();
            let missed = r.n * 4096;
            let per_k = lr.seconds / (r.n as f64 / 1000.0);
            let ratio = lr.bytes as f64 / missed as f64;
            println!(
            "| {} | {:.3} | {:.3} | {:.3} | {:.4} | {} | {} | {} | {:.3} | {} | {} | {} | {:.0} | {:.0} |",
            r.n,
            lr.seconds,
            r.wall_replay_s,
            r.wall_s,
            per_k,
            lr.entries,
            lr.bytes,
            missed,
            ratio,
            lr.extents,
            lr.full_remirror,
            r.st.remirrors,
            r.o.fill_iops,
            r.rss
        );
            jr.push(
                J::obj()
                    .with("n", r.n)
                    .with("replay_seconds", lr.seconds)
                    .with("wall_replay_seconds", r.wall_replay_s)
                    .with("wall_seconds", r.wall_s)
                    .with("seconds_per_1k_entries", per_k)
                    .with(
                        "wall_seconds_per_1k_entries",
                        r.wall_s / (r.n as f64 / 1000.0),
                    )
                    .with("entries", lr.entries)
                    .with("bytes_replayed", lr.bytes)
                    .with("bytes_missed", missed)
                    .with("bytes_ratio", ratio)
                    .with("extents", lr.extents)
                    .with("full_remirror", lr.full_remirror)
                    .with("remirrors", r.st.remirrors)
                    .with("head_at_restart", r.o.head)
                    .with("degraded_wait_seconds", r.o.degraded_wait_s)
                    .with("fill_seconds", r.o.fill_s)
                    .with("fill_iops", r.o.fill_iops)
                    .with("last_replay", replay_json(&r.st))
                    .with("rss_mib", r.rss),
            );
        }
        if let (Some(a), Some(b)) = (rows.first(), rows.last()) {
            if rows.len() > 1 {
                let pk = |r: &Scaling| {
                    r.st.last_replay.as_ref().map_or(0.0, |l| l.seconds) / (r.n as f64 / 1000.0)
                };
                println!();
                println!(
                "s per 1k entries, N={} / N={}: {:.2} (1.0 = linear; replay s is the core's own clock, 1 ms resolution; wall includes the handshake and 100 ms status polling)",
                b.n,
                a.n,
                pk(b) / pk(a).max(1e-9)
            );
            }
        }
        out.set("replay", J::arr(jr));
    }

    // 2. Foreground latency during a replay.
    let ceil = args.replay_max_mibs << 20;
    let floor = args.replay_min_mibs << 20;
    let fg = if !part("foreground") {
        vec![]
    } else {
        vec![
            foreground(args, "no replay limits", 0, 0, 20, timeout)?,
            foreground(
                args,
                &format!(
                    "ceiling {} MiB/s, floor {} MiB/s",
                    args.replay_max_mibs, args.replay_min_mibs
                ),
                ceil,
                floor,
                21,
                timeout,
            )?,
        ]
    };
    if !fg.is_empty() {
        println!();
        println!(
            "### Foreground QD1 4 KiB writes on node 1 during a replay of {} entries",
            args.fg_entries
        );
        println!();
        println!(
        "| replay limits | idle p50 µs | idle p99 µs | during replay p50 µs | during p99 µs | p50 during / idle | writes during | replay s | replay MiB/s | RSS MiB |"
    );
        println!("|---|---|---|---|---|---|---|---|---|---|");
        let mut jf = Vec::new();
        for f in &fg {
            let lr = f.st.last_replay.clone().unwrap_or_default();
            let mibs = lr.bytes as f64 / MIB / lr.seconds.max(1e-9);
            let ratio = f.during.0 / f.idle.0.max(1.0);
            println!(
                "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {} | {:.2} | {:.0} | {:.0} |",
                f.label,
                f.idle.0,
                f.idle.1,
                f.during.0,
                f.during.1,
                ratio,
                f.during.2,
                lr.seconds,
                mibs,
                f.rss
            );
            jf.push(
                J::obj()
                    .with("label", f.label.as_str())
                    .with("max_replay_bytes_per_sec", f.max_bps)
                    .with("min_replay_bytes_per_sec", f.min_bps)
                    .with("entries", args.fg_entries)
                    .with("idle_p50_us", f.idle.0)
                    .with("idle_p99_us", f.idle.1)
                    .with("idle_writes", f.idle.2)
                    .with("during_p50_us", f.during.0)
                    .with("during_p99_us", f.during.1)
                    .with("during_writes", f.during.2)
                    .with("p50_ratio", ratio)
                    .with("replay_seconds", lr.seconds)
                    .with("wall_seconds", f.wall_s)
                    .with("replay_mibs", mibs)
                    .with("bytes_replayed", lr.bytes)
                    .with("fill_iops", f.o.fill_iops)
                    .with("last_replay", replay_json(&f.st))
                    .with("rss_mib", f.rss),
            );
        }
        out.set("foreground", J::arr(jf));
    }
    if !part("remirror") {
        return Ok(out);
    }

    // 3. Full remirror, with its two floors.
    let disk = disk_seq_mibs(&args.dir, args.remirror_mib.max(16))?;
    let lo = loopback_mibs()?;
    let r = remirror(args, 22, timeout)?;
    let lr = r.st.last_replay.clone().unwrap_or_default();
    let core_mibs = lr.bytes as f64 / MIB / lr.seconds.max(1e-9);
    let wall_mibs = (r.mib as f64) / r.wall_s.max(1e-9);
    // The core's own figure covers the whole remirror only when it ran in
    // one session (last_replay marked full_remirror); otherwise the wall
    // clock (node 2's start to in sync) is the honest one.
    let one_session = lr.full_remirror;
    let mibs = if one_session { core_mibs } else { wall_mibs };
    let ratio = mibs / disk.min(lo);
    println!();
    println!(
        "### Full remirror of a new node 2 ({} MiB volume, all written)",
        r.mib
    );
    println!();
    println!(
        "| MiB | remirror s (core, last session) | wall s | MiB/s (core) | MiB/s (wall) | disk seq write MiB/s | loopback TCP MiB/s | MiB/s / min(disk, loopback) | bytes | extents | remirrors | data check | RSS MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {:.2} | {:.2} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {} | {} | {} → {} | {} | {:.0} |",
        r.mib,
        lr.seconds,
        r.wall_s,
        core_mibs,
        wall_mibs,
        disk,
        lo,
        ratio,
        lr.bytes,
        lr.extents,
        r.remirrors_before,
        r.st.remirrors,
        match r.same {
            Some(true) => "16 pieces equal",
            Some(false) => "DIFFER",
            None => "not read",
        },
        r.rss
    );
    out.set(
        "remirror",
        J::obj()
            .with("mib", r.mib)
            .with("fill_seconds", r.fill_s)
            .with("replay_seconds", lr.seconds)
            .with("wall_seconds", r.wall_s)
            .with("mibs", mibs)
            .with("mibs_basis", if one_session { "core" } else { "wall" })
            .with("core_mibs", core_mibs)
            .with("wall_mibs", wall_mibs)
            .with("one_session", one_session)
            .with("disk_seq_mibs", disk)
            .with("loopback_mibs", lo)
            .with("ratio", ratio)
            .with("bytes", lr.bytes)
            .with("extents", lr.extents)
            .with("full_remirror", lr.full_remirror)
            .with("remirrors_before", r.remirrors_before)
            .with("remirrors_after", r.st.remirrors)
            .with("data_check", r.same)
            .with("last_replay", replay_json(&r.st))
            .with("rss_mib", r.rss),
    );
    let tr: Vec<String> = r
        .trace
        .iter()
        .map(|(t, ps, n)| format!("{t:.2} s {ps} (remirrors {n})"))
        .collect();
    println!();
    println!("node 1 during the remirror: {}", tr.join(" → "));
    println!(
        "replay sessions seen (seconds, bytes sent so far, full_remirror at the last 100 ms sample): {:?}",
        r.sessions
    );
    if lr.full_remirror {
        println!("last_replay covers the whole remirror (one session).");
    } else {
        println!(
            "last_replay is not marked full_remirror: the remirror ran over more than one session, and \
             \"remirror s (core)\" covers only the last one; the wall time covers all."
        );
    }
    out.set(
        "remirror_sessions",
        J::arr(
            r.sessions
                .iter()
                .map(|(t, b, f)| {
                    J::obj()
                        .with("seconds", *t)
                        .with("bytes", *b)
                        .with("full_remirror", *f)
                })
                .collect(),
        ),
    );
    out.set(
        "remirror_trace",
        J::arr(
            r.trace
                .iter()
                .map(|(t, ps, n)| {
                    J::obj()
                        .with("t", *t)
                        .with("peer_state", ps.as_str())
                        .with("remirrors", *n)
                })
                .collect(),
        ),
    );
    println!();
    println!("RSS includes both nodes of the pair (one process), mapped ring pages included.");
    Ok(out)
}
