//! The embedded demo: a primary and a backup as two `serve` processes on
//! 127.0.0.1 with file-backed 1 GiB volumes. It writes through the NBD
//! export, kills the backup, writes more, restarts it, and shows that only
//! the missed writes were replayed and that both images are identical.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use engine::node::FormatFlags;
use engine::status::NodeStatus;

use crate::config::Config;
use crate::nbdclient::NbdClient;
use crate::{admin, cmd_format};

struct Pair {
    dir: PathBuf,
    cfgs: [Config; 2],
    children: [Option<Child>; 2],
}

impl Pair {
    /// Writes both nodes' configuration files into `dir` and formats a node
    /// whose data directory holds no metadata yet.
    fn create(dir: &Path, cfgs: [Config; 2]) -> Result<Pair> {
        let pair = Pair {
            dir: dir.to_path_buf(),
            cfgs,
            children: [None, None],
        };
        for i in 0..2 {
            let p = pair.config_path(i);
            std::fs::write(&p, pair.cfgs[i].to_toml_string())?;
            if !pair.cfgs[i].node.data_dir.join("meta").exists() {
                cmd_format(&p, FormatFlags::default())?;
            }
        }
        Ok(pair)
    }

    fn config_path(&self, i: usize) -> PathBuf {
        self.dir.join(format!("node{}.toml", i + 1))
    }

    fn log_path(&self, i: usize) -> PathBuf {
        self.dir.join(format!("node{}.log", i + 1))
    }

    /// The shell command that starts node `i` as the demo does, its output
    /// appended to the node's log.
    fn restart_command(&self, i: usize) -> Result<String> {
        let exe = std::env::current_exe()?;
        Ok(format!(
            "{} serve --config {} >>{} 2>&1",
            sh_quote(&exe),
            sh_quote(&self.config_path(i)),
            sh_quote(&self.log_path(i))
        ))
    }

    fn spawn(&mut self, i: usize) -> Result<()> {
        let exe = std::env::current_exe()?;
        let log = File::create(self.log_path(i))?;
        let child = Command::new(exe)
            .arg("serve")
            .arg("--config")
            .arg(self.config_path(i))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting a serve process")?;
        self.children[i] = Some(child);
        Ok(())
    }

    fn admin(&self, i: usize) -> String {
        self.cfgs[i].admin.listen.to_string()
    }

    fn status(&self, i: usize) -> Result<NodeStatus> {
        admin::get_status(&self.admin(i))
    }

    fn wait<F: Fn(&NodeStatus) -> bool>(
        &self,
        i: usize,
        what: &str,
        secs: u64,
        f: F,
    ) -> Result<NodeStatus> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Ok(s) = self.status(i) {
                if f(&s) {
                    return Ok(s);
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "node {} did not reach '{what}' within {secs} s (see {})",
                    i + 1,
                    self.log_path(i).display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            engine::sys::terminate(c.id());
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.stop(0);
        self.stop(1);
    }
}

fn setup(dir: Option<PathBuf>, port_offset: u16, fabric: Option<&str>) -> Result<Pair> {
    let dir = match dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("deltamirror-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let cfg = |id| {
        let c = Config::example(id, &dir, port_offset);
        match fabric {
            Some(provider) => c.with_fabric_link(provider),
            None => c,
        }
    };
    let cfgs = [cfg(1), cfg(2)];
    let mut pair = Pair::create(&dir, cfgs)?;
    pair.spawn(0)?;
    pair.spawn(1)?;
    pair.wait(0, "serving as primary, backup connected", 30, |s| {
        s.role == "primary" && s.peer_state == "connected"
    })?;
    Ok(pair)
}

/// Deterministic 4 KiB blocks: block `n` of round `r`.
fn block(r: u64, n: u64) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    for (i, c) in b.chunks_mut(8).enumerate() {
        c.copy_from_slice(&(r << 48 | n << 16 | i as u64).to_le_bytes());
    }
    b
}

fn write_round(c: &mut NbdClient, r: u64, count: u64, blocks_in_volume: u64) -> Result<u64> {
    let mut x: u64 = 0x9E37_79B9 ^ r;
    for n in 0..count {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let blk = (x >> 20) % blocks_in_volume;
        c.write(blk * 4096, &block(r, n))?;
    }
    c.flush()?;
    Ok(count * 4096)
}

fn files_identical(a: &Path, b: &Path) -> Result<bool> {
    let (mut fa, mut fb) = (File::open(a)?, File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 4 << 20], vec![0u8; 4 << 20]);
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(true);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

/// Quotes a path for a POSIX shell (single quotes, `'` as `'\''`).
fn sh_quote(p: &Path) -> String {
    let s = p.to_string_lossy();
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+=:,@".contains(&b))
    {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Whether a process is running (a zombie its parent has not reaped yet
/// counts as dead).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !matches!(rest.trim_start().chars().next(), Some('Z' | 'X'))),
        Err(_) => false,
    }
}

/// What the demo knows of one node while it serves.
enum Watch {
    /// The demo's own child process.
    Child,
    /// Dead: the restart command was printed; waiting for its admin port.
    Dead,
    /// Restarted by the user (not the demo's child): its pid from status.
    ByHand(u32),
}

/// `demo --serve`: keeps the pair running until SIGINT or SIGTERM. When a
/// node dies (kill -9, a crash), the other keeps running; the demo says
/// which node died and how, and prints the command that restarts it. A node
/// restarted that way is watched through its admin port and stopped with
/// the pair.
fn serve_until_stopped(pair: &mut Pair) -> Result<()> {
    let stop = engine::sys::stop_on_signals();
    let mut watch = [Watch::Child, Watch::Child];
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(100));
        for i in [0, 1] {
            let other = 1 - i;
            let died = match &watch[i] {
                Watch::Child => match pair.children[i].as_mut().map(|c| c.try_wait()) {
                    Some(Ok(Some(st))) => {
                        pair.children[i] = None;
                        Some(st.to_string())
                    }
                    _ => None,
                },
                Watch::ByHand(pid) => (!alive(*pid)).then(|| format!("pid {pid} exited")),
                Watch::Dead => {
                    // pid 0: the admin port is up, the node's first status
                    // not yet published.
                    if let Some(s) = pair.status(i).ok().filter(|s| s.pid != 0) {
                        println!(
                            "node {} is back (pid {}, {}); follow it with: deltamirror status --admin {} --watch",
                            i + 1,
                            s.pid,
                            s.role,
                            pair.admin(i)
                        );
                        watch[i] = Watch::ByHand(s.pid);
                    }
                    None
                }
            };
            if let Some(how) = died {
                watch[i] = Watch::Dead;
                if matches!(watch[other], Watch::Dead) {
                    println!(
                        "node {} died ({how}); node {} is down too",
                        i + 1,
                        other + 1
                    );
                } else {
                    println!(
                        "node {} died ({how}); node {} keeps running (deltamirror status --admin {})",
                        i + 1,
                        other + 1,
                        pair.admin(other)
                    );
                }
                println!("  restart node {} with:", i + 1);
                println!("    {}", pair.restart_command(i)?);
            }
        }
    }
    println!("stopping the pair");
    // The demo's children stop when the pair drops; nodes restarted by hand
    // are part of the pair too.
    for (i, w) in watch.iter().enumerate() {
        if let Watch::ByHand(pid) = *w {
            println!("stopping node {} (pid {pid}, restarted by hand)", i + 1);
            engine::sys::terminate(pid);
            let deadline = Instant::now() + Duration::from_secs(10);
            while alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    Ok(())
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

/// `fabric`: run the link on libfabric with that provider (`--link fabric`).
pub fn run(
    serve: bool,
    dir: Option<PathBuf>,
    port_offset: u16,
    fabric: Option<&str>,
) -> Result<()> {
    let mut pair = setup(dir, port_offset, fabric)?;
    let (a, b) = (pair.cfgs[0].clone(), pair.cfgs[1].clone());
    println!(
        "deltamirror demo pair in {} (replication link: {})",
        pair.dir.display(),
        match fabric {
            Some(p) => format!("libfabric, provider {p}"),
            None => "tcp".to_string(),
        }
    );
    println!(
        "  primary: nbd://{}  nvme-tcp {}  iscsi {}  admin http://{}",
        a.nbd.listen, a.nvme.listen, a.iscsi.listen, a.admin.listen
    );
    println!(
        "  backup:  nbd://{}  nvme-tcp {}  iscsi {}  admin http://{}",
        b.nbd.listen, b.nvme.listen, b.iscsi.listen, b.admin.listen
    );
    if serve {
        println!("  status:  deltamirror status --admin {}", a.admin.listen);
        println!(
            "  try:     kill -9 either node (its pid is in `deltamirror status --admin ADMIN --json`): \
             the other keeps running, and this prints the command that restarts it"
        );
        println!("running until interrupted (Ctrl-C)");
        serve_until_stopped(&mut pair)?;
        return Ok(());
    }

    let nbd = a.nbd.listen.to_string();
    let mut c = NbdClient::connect(&nbd, &a.nbd.export_name)?;
    let blocks = c.size / 4096;
    let start_head = pair.status(0)?.head_seq;
    println!("\n1. writing 2000 x 4 KiB through nbd://{nbd} with both nodes up");
    write_round(&mut c, 1, 2000, blocks)?;
    // Read one block back through the export.
    let x: u64 = (0x9E37_79B9u64 ^ 1)
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let first = (x >> 20) % blocks;
    let back = c.read(first * 4096, 4096)?;
    println!(
        "   read back block {first} through NBD: {}",
        if back.len() == 4096 { "ok" } else { "short" }
    );
    let s = pair.wait(0, "backup caught up", 30, |s| {
        s.head_seq >= start_head + 2000 && s.ack2_seq == s.head_seq
    })?;
    println!(
        "   primary at seq {}, backup acknowledged through {}",
        s.head_seq, s.ack2_seq
    );

    println!("2. kill -9 the backup");
    pair.kill9(1);
    let head_before = s.head_seq;
    println!("3. writing 1500 x 4 KiB more while the backup is down");
    let t = Instant::now();
    let missed_bytes = write_round(&mut c, 2, 1500, blocks)?;
    let s = pair.wait(0, "status shows the writes", 10, |s| {
        s.head_seq >= head_before + 1500
    })?;
    let missed = s.head_seq - head_before;
    println!(
        "   {} writes ({:.1} MiB) missed by the backup in {:.1} s; primary degraded={}, generation {}, backup stale from seq {:?}",
        missed,
        mib(missed_bytes),
        t.elapsed().as_secs_f64(),
        s.degraded,
        s.generation,
        s.peer_stale_from_seq
    );

    println!("4. restarting the backup");
    pair.spawn(1)?;
    let s = pair.wait(0, "replay finished and backup in sync", 60, |s| {
        s.peer_state == "connected"
            && s.replay_progress.is_none()
            && s.ack2_seq == s.head_seq
            && !s.degraded
    })?;
    let backup = pair.wait(1, "backup executed everything", 30, |b| {
        b.executed_seq == s.head_seq
    })?;
    let r = s.last_replay.clone().unwrap_or_default();
    println!(
        "   replayed {} entries ({:.1} MiB) in {:.2} s; dirty extents {}; full remirrors: primary {}, backup {}",
        r.entries,
        mib(r.bytes),
        r.seconds,
        r.extents,
        s.remirrors,
        backup.remirrors
    );
    c.disconnect();

    let same = files_identical(&a.volume.path, &b.volume.path)?;
    println!("\nsummary");
    println!(
        "  missed by the backup : {missed} writes, {:.1} MiB",
        mib(missed_bytes)
    );
    println!(
        "  replayed to it       : {} writes, {:.1} MiB (ratio {:.3})",
        r.entries,
        mib(r.bytes),
        r.bytes as f64 / missed_bytes.max(1) as f64
    );
    println!(
        "  full remirrors       : {}",
        s.remirrors + backup.remirrors
    );
    println!(
        "  images byte-identical: {}",
        if same { "yes" } else { "NO" }
    );
    pair.stop(0);
    pair.stop(1);
    if !same || r.entries != missed || s.remirrors + backup.remirrors != 0 {
        bail!(
            "the demo did not end as it should (see the logs in {})",
            pair.dir.display()
        );
    }
    println!("(state and logs kept in {})", pair.dir.display());
    Ok(())
}

/// A local single-member etcd for `demo --auto-failover` (tests only: a
/// real deployment runs three members on separate hosts).
struct LocalEtcd {
    child: Option<Child>,
    client: String,
}

impl LocalEtcd {
    fn start(dir: &Path) -> Result<LocalEtcd> {
        let free = || -> Result<u16> {
            Ok(std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port())
        };
        let (client, peer) = (free()?, free()?);
        let log = File::create(dir.join("etcd.log"))?;
        let child = Command::new("etcd")
            .args(["--name", "demo"])
            .arg("--data-dir")
            .arg(dir.join("etcd-data"))
            .args([
                "--listen-client-urls",
                &format!("http://127.0.0.1:{client}"),
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{client}"),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer}"),
                "--initial-cluster",
                &format!("demo=http://127.0.0.1:{peer}"),
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting etcd")?;
        let e = LocalEtcd {
            child: Some(child),
            client: format!("http://127.0.0.1:{client}"),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", client)).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "etcd did not start (see {})",
                    dir.join("etcd.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(e)
    }
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `demo --auto-failover`: a pair with automatic failover through a local
/// etcd. Kills the primary under writes; the backup takes over by itself;
/// every acknowledged write is read back from it; the old primary returns
/// as backup and receives only the delta.
pub fn run_auto_failover(dir: Option<PathBuf>, port_offset: u16) -> Result<()> {
    if !std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .any(|d| d.join("etcd").is_file())
    {
        bail!(
            "--auto-failover needs the etcd server binary, which is not installed \
             (Debian: apt-get install etcd-server; scripts/test.sh installs it)"
        );
    }
    let dir = match dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("deltamirror-demo-fo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let etcd = LocalEtcd::start(&dir)?;
    let ttl = 1000;
    let mut cfgs = [
        Config::example(1, &dir, port_offset),
        Config::example(2, &dir, port_offset),
    ];
    for c in cfgs.iter_mut() {
        c.failover.mode = crate::config::FailoverMode::Etcd;
        c.failover.etcd_endpoints = vec![etcd.client.clone()];
        c.failover.lease_ttl_ms = ttl;
    }
    let mut pair = Pair::create(&dir, cfgs)?;
    println!(
        "deltamirror automatic failover demo in {} (etcd at {}, lease {ttl} ms)",
        dir.display(),
        etcd.client
    );
    pair.spawn(0)?;
    pair.spawn(1)?;
    let s = pair.wait(
        0,
        "primary holding the etcd lease, backup caught up",
        30,
        |s| {
            s.role == "primary"
                && s.serving
                && s.peer_state == "connected"
                && s.failover.as_ref().is_some_and(|f| f.holds_lease)
        },
    )?;
    pair.wait(1, "backup caught up", 30, |s| s.current)?;
    println!(
        "1. node 1 is primary in generation {} and holds the lease ({})",
        s.generation,
        s.failover
            .as_ref()
            .map(crate::statusfmt::failover_line)
            .unwrap_or_default()
    );
    let (a, b) = (pair.cfgs[0].clone(), pair.cfgs[1].clone());
    // Writes through node 1, one at a time: a write counts once its reply
    // arrived. The primary is killed while they run.
    let acked = std::sync::atomic::AtomicU64::new(0);
    let nbd_a = a.nbd.listen.to_string();
    let killed_at = std::thread::scope(|sc| -> Result<Instant> {
        let writer = sc.spawn(|| -> Result<()> {
            let mut c = NbdClient::connect(&nbd_a, &a.nbd.export_name)?;
            for n in 0.. {
                if c.write(n * 4096, &block(1, n)).is_err() {
                    return Ok(());
                }
                acked.store(n + 1, Ordering::Release);
            }
            Ok(())
        });
        while acked.load(Ordering::Acquire) < 1000 && !writer.is_finished() {
            std::thread::sleep(Duration::from_millis(5));
        }
        println!(
            "2. writing through nbd://{nbd_a}; after {} acknowledged writes: kill -9 the primary",
            acked.load(Ordering::Acquire)
        );
        pair.kill9(0);
        let t = Instant::now();
        writer
            .join()
            .map_err(|_| anyhow::anyhow!("the writer panicked"))??;
        Ok(t)
    })?;
    let acked = acked.load(Ordering::Acquire);
    let s = pair.wait(1, "primary by itself", 30, |s| {
        s.role == "primary" && s.serving
    })?;
    println!(
        "3. node 2 took over by itself {:.2} s after the kill: generation {}, {}",
        killed_at.elapsed().as_secs_f64(),
        s.generation,
        s.failover
            .as_ref()
            .map(crate::statusfmt::failover_line)
            .unwrap_or_default()
    );
    let mut c = NbdClient::connect(&b.nbd.listen.to_string(), &b.nbd.export_name)?;
    let mut lost = 0;
    for n in 0..acked {
        if c.read(n * 4096, 4096)? != block(1, n) {
            lost += 1;
        }
    }
    println!(
        "4. read back the {acked} writes acknowledged before the kill from node 2: {} lost",
        lost
    );
    let head = s.head_seq;
    for n in 0..500u64 {
        c.write((200_000 + n) * 4096, &block(2, n))?;
    }
    c.flush()?;
    println!("5. 500 more writes through node 2; restarting node 1");
    pair.spawn(0)?;
    pair.wait(0, "old primary back as backup", 30, |s| s.role == "backup")?;
    let s = pair.wait(1, "in sync", 60, |s| {
        s.peer_state == "connected" && s.replay_progress.is_none() && s.ack2_seq == s.head_seq
    })?;
    let back = pair.wait(0, "backup executed everything", 30, |x| {
        x.executed_seq == s.head_seq
    })?;
    let r = s.last_replay.clone().unwrap_or_default();
    println!(
        "6. node 1 rejoined as backup in generation {}: replayed {} entries ({:.1} MiB), {} \
         extents; full remirrors {}",
        back.generation,
        r.entries,
        mib(r.bytes),
        r.extents,
        s.remirrors + back.remirrors
    );
    c.disconnect();
    let same = files_identical(&a.volume.path, &b.volume.path)?;
    println!("\nsummary");
    println!("  takeover             : by itself, no operator");
    println!("  acknowledged writes  : {acked} before the kill, {lost} lost");
    println!(
        "  replayed to node 1   : {} entries for the {} writes made since the takeover (head {} -> {})",
        r.entries,
        s.head_seq - head,
        head,
        s.head_seq
    );
    println!("  full remirrors       : {}", s.remirrors + back.remirrors);
    println!(
        "  images byte-identical: {}",
        if same { "yes" } else { "NO" }
    );
    pair.stop(0);
    pair.stop(1);
    if !same || lost != 0 || s.remirrors + back.remirrors != 0 || r.entries < s.head_seq - head {
        bail!(
            "the demo did not end as it should (see the logs in {})",
            pair.dir.display()
        );
    }
    println!("(state and logs kept in {})", pair.dir.display());
    Ok(())
}
