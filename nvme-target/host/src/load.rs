//! Load generation on top of the initiator: a pipelined I/O run with a
//! latency histogram and data verification, and a multipath failover run
//! that follows ANA and proves no completed write was lost.

use crate::initiator::{
    Callback, Command, Completion, Controller, HostConfig, HostError, HostResult,
};
use hdrhistogram::Histogram;
use nvme_target::fuzz::Rng;
use nvme_target::pdu::rw_sqe;
use nvme_target::spec::*;
use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// Access pattern of an I/O run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rw {
    Read,
    Write,
    RandRead,
    RandWrite,
    RandRw,
}

impl std::str::FromStr for Rw {
    type Err = String;
    fn from_str(s: &str) -> Result<Rw, String> {
        Ok(match s {
            "read" => Rw::Read,
            "write" => Rw::Write,
            "randread" => Rw::RandRead,
            "randwrite" => Rw::RandWrite,
            "randrw" => Rw::RandRw,
            _ => {
                return Err(format!(
                    "unknown --rw {s}: read|write|randread|randwrite|randrw"
                ))
            }
        })
    }
}

#[derive(Clone, Debug)]
pub struct IoSpec {
    pub rw: Rw,
    pub block_bytes: u32,
    pub queue_depth: usize,
    pub duration: Duration,
    /// Bytes of the namespace used (from LBA 0); 0 = whole namespace.
    pub region_bytes: u64,
    pub verify: bool,
    pub seed: u64,
}

#[derive(Clone, Debug, Default)]
pub struct IoReport {
    pub ops: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub iops: f64,
    pub mib_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub errors: u64,
    pub verify_errors: u64,
    pub verified_chunks: u64,
}

impl std::fmt::Display for IoReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ops={} iops={:.0} bw={:.1}MiB/s lat_us p50={:.1} p99={:.1} p99.9={:.1} max={:.1} errors={} verify_errors={} verified={}",
            self.ops,
            self.iops,
            self.mib_per_s,
            self.p50_us,
            self.p99_us,
            self.p999_us,
            self.max_us,
            self.errors,
            self.verify_errors,
            self.verified_chunks
        )
    }
}

/// The data written for (chunk, generation): self-describing so a
/// mismatch says what was found.
pub fn chunk_data(chunk: u64, generation: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    let mut r = Rng::new(chunk ^ (generation << 32) ^ 0xD3);
    for (i, c) in v.chunks_mut(8).enumerate() {
        let w = match i % 4 {
            0 => chunk,
            1 => generation,
            _ => r.next_u64(),
        };
        let n = c.len();
        c.copy_from_slice(&w.to_le_bytes()[..n]);
    }
    v
}

struct Done {
    chunk: u64,
    generation: u64,
    is_write: bool,
    started: Instant,
    result: HostResult<Completion>,
}

/// Runs `spec` on the controller's I/O queues, commands spread round robin.
pub fn run_io(c: &Controller, spec: &IoSpec) -> HostResult<IoReport> {
    let ns =
        c.ns.clone()
            .ok_or_else(|| HostError::Disconnected("no namespace".into()))?;
    let bs = ns.block_size as u64;
    let chunk_bytes = spec.block_bytes as u64;
    if chunk_bytes == 0 || !chunk_bytes.is_multiple_of(bs) {
        return Err(HostError::Disconnected(format!(
            "--bs must be a multiple of the block size {bs}"
        )));
    }
    let ns_bytes = ns.num_blocks * bs;
    let region = if spec.region_bytes == 0 {
        ns_bytes
    } else {
        spec.region_bytes.min(ns_bytes)
    };
    let chunks = region / chunk_bytes;
    if chunks == 0 || c.io.is_empty() {
        return Err(HostError::Disconnected(
            "region smaller than one block or no I/O queue".into(),
        ));
    }
    let nlb = (chunk_bytes / bs) as u32;
    let mut model = vec![0u64; if spec.verify { chunks as usize } else { 0 }];
    let mut busy: HashSet<u64> = HashSet::new();
    let mut rng = Rng::new(spec.seed);
    let mut hist =
        Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds");
    let (tx, rx) = mpsc::channel::<Done>();
    let mut report = IoReport::default();
    let mut seq_next = 0u64;
    let mut generation = 0u64;
    let mut inflight = 0usize;
    let mut n = 0usize;
    let start = Instant::now();
    let deadline = start + spec.duration;
    // Without verification every write sends the same bytes.
    let fill = Arc::new(vec![0xA5; chunk_bytes as usize]);
    loop {
        let running = Instant::now() < deadline;
        // The commands of this round, per queue: one socket write each.
        let mut batches: Vec<Vec<Command>> = c.io.iter().map(|_| Vec::new()).collect();
        while running && inflight < spec.queue_depth {
            let is_write = match spec.rw {
                Rw::Read | Rw::RandRead => false,
                Rw::Write | Rw::RandWrite => true,
                Rw::RandRw => rng.below(2) == 0,
            };
            let mut chunk = match spec.rw {
                Rw::Read | Rw::Write => {
                    seq_next = (seq_next + 1) % chunks;
                    seq_next
                }
                _ => rng.below(chunks),
            };
            // With verification, one command per chunk at a time.
            let mut tries = 0;
            while spec.verify && busy.contains(&chunk) && tries < 64 {
                chunk = (chunk + 1) % chunks;
                tries += 1;
            }
            if spec.verify && busy.contains(&chunk) {
                break;
            }
            busy.insert(chunk);
            let q = n % c.io.len();
            n += 1;
            let slba = chunk * chunk_bytes / bs;
            let tx = tx.clone();
            let started = Instant::now();
            let g = if is_write {
                generation += 1;
                generation
            } else {
                0
            };
            let done: Callback = Box::new(move |result| {
                drop(tx.send(Done {
                    chunk,
                    generation: g,
                    is_write,
                    started,
                    result,
                }))
            });
            batches[q].push(if is_write {
                Command {
                    sqe: rw_sqe(IO_WRITE, 1, slba, nlb, false),
                    data_out: Some(if spec.verify {
                        Arc::new(chunk_data(chunk, g, chunk_bytes as usize))
                    } else {
                        fill.clone()
                    }),
                    data_in_len: 0,
                    done,
                }
            } else {
                Command {
                    sqe: rw_sqe(IO_READ, 1, slba, nlb, false),
                    data_out: None,
                    data_in_len: chunk_bytes as u32,
                    done,
                }
            });
            inflight += 1;
        }
        for (q, batch) in c.io.iter().zip(batches) {
            if !batch.is_empty() {
                q.submit_batch(batch)?;
            }
        }
        if inflight == 0 {
            break;
        }
        // Take every completion that is in, then refill in one round. A
        // polled queue is read here: its completions come on this thread.
        let first = match c.io.as_slice() {
            [q] if q.is_polled() => loop {
                if let Ok(d) = rx.try_recv() {
                    break d;
                }
                q.poll()?;
            },
            _ => rx
                .recv_timeout(c.cfg.timeout)
                .map_err(|_| HostError::Timeout)?,
        };
        let mut next = Some(first);
        while let Some(d) = next.take() {
            next = rx.try_recv().ok();
            inflight -= 1;
            busy.remove(&d.chunk);
            let _ = hist.record(d.started.elapsed().as_nanos().max(1) as u64);
            match d.result.and_then(|c| c.ok()) {
                Ok(comp) => {
                    report.ops += 1;
                    report.bytes += chunk_bytes;
                    if spec.verify {
                        if d.is_write {
                            model[d.chunk as usize] = d.generation;
                        } else if model[d.chunk as usize] != 0 {
                            report.verified_chunks += 1;
                            if comp.data
                                != chunk_data(
                                    d.chunk,
                                    model[d.chunk as usize],
                                    chunk_bytes as usize,
                                )
                            {
                                report.verify_errors += 1;
                            }
                        }
                    }
                }
                Err(HostError::Status(_)) => report.errors += 1,
                Err(e) => return Err(e),
            }
        }
    }
    report.seconds = start.elapsed().as_secs_f64();
    report.iops = report.ops as f64 / report.seconds;
    report.mib_per_s = report.bytes as f64 / report.seconds / (1 << 20) as f64;
    report.p50_us = hist.value_at_quantile(0.50) as f64 / 1000.0;
    report.p99_us = hist.value_at_quantile(0.99) as f64 / 1000.0;
    report.p999_us = hist.value_at_quantile(0.999) as f64 / 1000.0;
    report.max_us = hist.max() as f64 / 1000.0;
    if spec.verify {
        // Read back every chunk written in this run.
        for (chunk, &g) in model.iter().enumerate() {
            if g == 0 {
                continue;
            }
            let data = c.read(chunk as u64 * chunk_bytes / bs, nlb)?;
            report.verified_chunks += 1;
            if data != chunk_data(chunk as u64, g, chunk_bytes as usize) {
                report.verify_errors += 1;
            }
        }
    }
    Ok(report)
}

#[derive(Clone, Debug, Default)]
pub struct FailoverReport {
    pub writes_completed: u64,
    pub writes_retried: u64,
    pub path_switches: u64,
    pub ana_events: u64,
    pub verified_chunks: u64,
    /// Completed writes whose data was not found at the end: must be 0.
    pub lost_writes: u64,
    pub final_path: usize,
}

impl std::fmt::Display for FailoverReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "writes_completed={} retried={} path_switches={} ana_events={} verified={} lost_writes={} final_path={}",
            self.writes_completed, self.writes_retried, self.path_switches, self.ana_events, self.verified_chunks, self.lost_writes, self.final_path
        )
    }
}

/// Whether an error means "this path cannot serve now, try the other".
fn is_path_error(e: &HostError) -> bool {
    match e {
        HostError::Status(s) => s.sct == 3 || *s == SC_TRANSIENT_TRANSPORT,
        _ => true,
    }
}

/// Finds the path whose ANA state for NSID 1 is optimized.
fn find_optimized(ctrls: &[Option<Controller>], deadline: Instant) -> HostResult<usize> {
    loop {
        for (i, c) in ctrls.iter().enumerate() {
            if let Some(c) = c {
                if let Ok(log) = c.ana_log() {
                    if log.state_of(1) == Some(ANA_OPTIMIZED) {
                        return Ok(i);
                    }
                }
            }
        }
        if Instant::now() > deadline {
            return Err(HostError::Disconnected(
                "no path became ANA optimized".into(),
            ));
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Keeps writing `chunk_bytes` chunks over `region_bytes` at queue depth
/// `qd` until `stop`, on whichever path is ANA optimized; then reads every
/// chunk back and counts completed writes whose data is missing.
pub fn run_failover(
    paths: &[SocketAddr],
    cfg: &HostConfig,
    qd: usize,
    chunk_bytes: u32,
    region_bytes: u64,
    stop: Arc<AtomicBool>,
) -> HostResult<FailoverReport> {
    let ana_event = Arc::new(AtomicBool::new(false));
    let mut report = FailoverReport::default();
    let events = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut ctrls: Vec<Option<Controller>> = Vec::new();
    for p in paths {
        let c = Controller::connect(*p, cfg)?;
        let (flag, ev) = (ana_event.clone(), events.clone());
        c.enable_ana_events(Arc::new(move |_dw0| {
            ev.fetch_add(1, Ordering::Relaxed);
            flag.store(true, Ordering::Release);
        }))?;
        ctrls.push(Some(c));
    }
    let ns = ctrls[0]
        .as_ref()
        .and_then(|c| c.ns.clone())
        .ok_or_else(|| HostError::Disconnected("no namespace".into()))?;
    let bs = ns.block_size as u64;
    let chunk_bytes = chunk_bytes as u64;
    let nlb = (chunk_bytes / bs) as u32;
    let chunks = (region_bytes.min(ns.num_blocks * bs) / chunk_bytes).max(1);
    let anatt = Duration::from_secs(30);
    let mut active = find_optimized(&ctrls, Instant::now() + anatt)?;
    let mut model = vec![0u64; chunks as usize];
    let mut retry: VecDeque<(u64, u64)> = VecDeque::new();
    let mut next_chunk = 0u64;
    let mut generation = 0u64;
    let mut inflight = 0usize;
    let mut busy: HashSet<u64> = HashSet::new();
    let mut switch_needed = false;
    let (tx, rx) = mpsc::channel::<Done>();
    loop {
        let stopping = stop.load(Ordering::Acquire);
        if ana_event.swap(false, Ordering::AcqRel) {
            switch_needed = true;
        }
        if switch_needed && inflight == 0 {
            let before = active;
            active = find_optimized(&ctrls, Instant::now() + anatt)?;
            if active != before {
                report.path_switches += 1;
            }
            switch_needed = false;
        }
        while !switch_needed && inflight < qd && (!stopping || !retry.is_empty()) {
            let (chunk, g) = match retry.pop_front() {
                Some(r) => r,
                None => {
                    let mut ch = next_chunk;
                    let mut tries = 0;
                    while busy.contains(&ch) && tries < chunks {
                        ch = (ch + 1) % chunks;
                        tries += 1;
                    }
                    if busy.contains(&ch) {
                        break;
                    }
                    next_chunk = (ch + 1) % chunks;
                    generation += 1;
                    (ch, generation)
                }
            };
            busy.insert(chunk);
            let c = ctrls[active].as_ref().expect("active path connected");
            let q = &c.io[0];
            let tx = tx.clone();
            let started = Instant::now();
            let r = q.submit(
                rw_sqe(IO_WRITE, 1, chunk * chunk_bytes / bs, nlb, false),
                Some(Arc::new(chunk_data(chunk, g, chunk_bytes as usize))),
                0,
                Box::new(move |result| {
                    drop(tx.send(Done {
                        chunk,
                        generation: g,
                        is_write: true,
                        started,
                        result,
                    }))
                }),
            );
            if r.is_err() {
                retry.push_front((chunk, g));
                switch_needed = true;
                break;
            }
            inflight += 1;
        }
        if inflight == 0 {
            if stopping && retry.is_empty() {
                break;
            }
            if !switch_needed {
                thread::sleep(Duration::from_millis(1));
            }
            continue;
        }
        let d = match rx.recv_timeout(Duration::from_millis(20)) {
            Ok(d) => d,
            Err(_) => continue,
        };
        inflight -= 1;
        match d.result.and_then(|c| c.ok()) {
            Ok(_) => {
                // A chunk stays busy while its write waits for a retry, so
                // an older generation never lands after a newer one.
                busy.remove(&d.chunk);
                report.writes_completed += 1;
                if d.generation > model[d.chunk as usize] {
                    model[d.chunk as usize] = d.generation;
                }
            }
            Err(e) if is_path_error(&e) => {
                report.writes_retried += 1;
                retry.push_back((d.chunk, d.generation));
                switch_needed = true;
            }
            Err(e) => return Err(e),
        }
    }
    report.ana_events = events.load(Ordering::Relaxed);
    active = find_optimized(&ctrls, Instant::now() + anatt)?;
    report.final_path = active;
    let c = ctrls[active].as_ref().expect("active path connected");
    for (chunk, &g) in model.iter().enumerate() {
        if g == 0 {
            continue;
        }
        report.verified_chunks += 1;
        let data = c.read(chunk as u64 * chunk_bytes / bs, nlb)?;
        if data != chunk_data(chunk as u64, g, chunk_bytes as usize) {
            report.lost_writes += 1;
        }
    }
    for c in ctrls.iter_mut() {
        if let Some(c) = c.take() {
            c.disconnect();
        }
    }
    Ok(report)
}
