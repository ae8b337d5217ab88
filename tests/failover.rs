//! Automatic failover with an etcd lease (issue 12), against real etcd
//! servers started here on 127.0.0.1 (random free ports, a temporary data
//! directory, killed at the end) and two real `deltamirror serve`
//! processes.
//!
//! etcd listens on one client port per node, so that nftables can cut one
//! node from etcd and leave the other connected. Link cuts and those cuts
//! need nft and root. `DM_FAILOVER_REPS` raises the observer test's
//! repetitions (50 by default).

mod common;

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{block_of, field, images_identical, nbd_writer, need, oracle_block, u, Written, EXE};
use serde_json::Value;

/// The lease of every test pair: short, so the file stays quick.
const TTL_MS: u64 = 1000;

/// The tests share the machine's two cores: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn is_root() -> bool {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() == 0 }
}

fn need_root(what: &str) -> bool {
    if !is_root() {
        testskip::skip(format!("{what} needs root (CI runs as root)"));
        return false;
    }
    true
}

/// A port nothing listens on now, and never handed out before in this
/// process (the kernel may give a just-closed ephemeral port again: two of
/// one pair's listeners once got the same one).
fn free_port() -> u16 {
    static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    loop {
        let p = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if GIVEN.lock().unwrap_or_else(|e| e.into_inner()).insert(p) {
            return p;
        }
    }
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dm-fo-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// An etcd cluster of `members` on 127.0.0.1. Member k listens for clients
/// on `clients[k][0]` (node 1's port) and `clients[k][1]` (node 2's).
struct Etcd {
    dir: PathBuf,
    procs: Vec<Option<Child>>,
    clients: Vec<[u16; 2]>,
}

impl Etcd {
    fn start(name: &str, members: usize) -> Etcd {
        let dir = tmp(&format!("etcd-{name}"));
        let peers: Vec<u16> = (0..members).map(|_| free_port()).collect();
        let clients: Vec<[u16; 2]> = (0..members).map(|_| [free_port(), free_port()]).collect();
        let cluster = (0..members)
            .map(|k| format!("m{k}=http://127.0.0.1:{}", peers[k]))
            .collect::<Vec<_>>()
            .join(",");
        let mut procs = Vec::new();
        for k in 0..members {
            let log = std::fs::File::create(dir.join(format!("m{k}.log"))).unwrap();
            let urls = format!(
                "http://127.0.0.1:{},http://127.0.0.1:{}",
                clients[k][0], clients[k][1]
            );
            let child = Command::new("etcd")
                .args(["--name", &format!("m{k}")])
                .arg("--data-dir")
                .arg(dir.join(format!("m{k}.etcd")))
                .args(["--listen-client-urls", &urls])
                .args(["--advertise-client-urls", &urls])
                .args([
                    "--listen-peer-urls",
                    &format!("http://127.0.0.1:{}", peers[k]),
                ])
                .args([
                    "--initial-advertise-peer-urls",
                    &format!("http://127.0.0.1:{}", peers[k]),
                ])
                .args(["--initial-cluster", &cluster])
                .args(["--initial-cluster-state", "new"])
                .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("etcd");
            procs.push(Some(child));
        }
        let e = Etcd {
            dir,
            procs,
            clients,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !e.healthy() {
            assert!(Instant::now() < deadline, "etcd did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        e
    }

    /// The client URLs node `i` (0 or 1) uses.
    fn endpoints(&self, i: usize) -> Vec<String> {
        self.clients
            .iter()
            .map(|c| format!("http://127.0.0.1:{}", c[i]))
            .collect()
    }

    fn etcdctl(&self, args: &[&str]) -> (bool, String) {
        let live: Vec<String> = (0..self.procs.len())
            .filter(|&k| self.procs[k].is_some())
            .map(|k| format!("http://127.0.0.1:{}", self.clients[k][0]))
            .collect();
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &live.join(","), "--dial-timeout", "2s"])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }

    fn healthy(&self) -> bool {
        self.etcdctl(&["put", "/dm-test-probe", "1"]).0
    }

    fn get(&self, key: &str) -> Option<String> {
        let (ok, out) = self.etcdctl(&["get", key, "--print-value-only"]);
        assert!(ok, "etcdctl get {key}: {out}");
        let v = out.trim().to_string();
        (!v.is_empty()).then_some(v)
    }

    fn put(&self, key: &str, value: &str) {
        let (ok, out) = self.etcdctl(&["put", key, value]);
        assert!(ok, "etcdctl put {key}: {out}");
    }

    fn kill(&mut self, k: usize) {
        if let Some(mut c) = self.procs[k].take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for k in 0..self.procs.len() {
            self.kill(k);
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// nftables rules that drop every packet to or from some loopback ports;
/// removed on drop.
struct Cut {
    table: String,
}

impl Cut {
    fn new(tag: &str, ports: &[u16]) -> Cut {
        let table = format!("dmfo{tag}{}", std::process::id());
        let nft = |args: &str| {
            let st = Command::new("sh")
                .arg("-c")
                .arg(format!("nft {args}"))
                .status()
                .unwrap();
            assert!(st.success(), "nft {args}");
        };
        nft(&format!("add table inet {table}"));
        nft(&format!(
            "'add chain inet {table} out {{ type filter hook output priority 0 ; }}'"
        ));
        for p in ports {
            nft(&format!("add rule inet {table} out tcp dport {p} drop"));
            nft(&format!("add rule inet {table} out tcp sport {p} drop"));
        }
        Cut { table }
    }
}

impl Drop for Cut {
    fn drop(&mut self) {
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!("nft delete table inet {}", self.table))
            .status();
    }
}

struct Node {
    cfg: PathBuf,
    admin: String,
    nbd: String,
    link_port: u16,
    volume: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

struct Pair {
    dir: PathBuf,
    n: [Node; 2],
}

/// The `[failover]` section of a test node.
fn failover_section(endpoints: &[String], extra: &str) -> String {
    format!(
        "\n[failover]\nmode = \"etcd\"\netcd_endpoints = [{}]\nlease_ttl_ms = {TTL_MS}\nstale_mark_timeout_ms = 3000\n{extra}",
        endpoints
            .iter()
            .map(|e| format!("{e:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

impl Pair {
    /// A formatted pair; `section(i)` is node i's `[failover]` text. The
    /// demo configuration's ports (at `offset`) are replaced by free ones,
    /// so that other tests on the machine never collide with these.
    fn new(name: &str, offset: u16, section: impl Fn(usize) -> String) -> Pair {
        let dir = tmp(name);
        let mut tomls: Vec<String> = (1..=2u32)
            .map(|id| {
                let out = Command::new(EXE)
                    .args(["example-config", "--node", &id.to_string(), "--dir"])
                    .arg(&dir)
                    .args(["--port-offset", &offset.to_string()])
                    .output()
                    .unwrap();
                assert!(out.status.success());
                let mut toml = String::from_utf8(out.stdout).unwrap();
                // No NVMe or iSCSI: NBD is the host path here.
                toml = toml.replace("[nvme]\nenabled = true", "[nvme]\nenabled = false");
                toml = toml.replace("[iscsi]\nenabled = true", "[iscsi]\nenabled = false");
                toml.push_str(&section(id as usize - 1));
                toml
            })
            .collect();
        for base in [9400u16, 10809, 7400] {
            for k in 0..2 {
                let from = format!(":{}\"", base + offset + k);
                let to = format!(":{}\"", free_port());
                for t in tomls.iter_mut() {
                    *t = t.replace(&from, &to);
                }
            }
        }
        let mut mk = |id: u32| {
            let toml = std::mem::take(&mut tomls[id as usize - 1]);
            let cfg = dir.join(format!("node{id}.toml"));
            std::fs::write(&cfg, &toml).unwrap();
            let out = Command::new(EXE)
                .args(["format", "--config"])
                .arg(&cfg)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "format failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let link: std::net::SocketAddr = field(&toml, "link", "listen").parse().unwrap();
            Node {
                admin: field(&toml, "admin", "listen").to_string(),
                nbd: field(&toml, "nbd", "listen").to_string(),
                link_port: link.port(),
                volume: PathBuf::from(field(&toml, "volume", "path")),
                log: dir.join(format!("node{id}.log")),
                cfg,
                child: None,
            }
        };
        let n = [mk(1), mk(2)];
        Pair { dir, n }
    }

    /// A pair with automatic failover through `etcd`, in sync, node 1
    /// primary holding the lease.
    fn up(name: &str, offset: u16, etcd: &Etcd) -> Pair {
        let mut p = Pair::new(name, offset, |i| failover_section(&etcd.endpoints(i), ""));
        p.start(0);
        p.start(1);
        p.wait_in_sync(0);
        p.wait(0, "holding the lease", 30, |s| {
            s["failover"]["holds_lease"] == true
        });
        p
    }

    fn start(&mut self, i: usize) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.n[i].log)
            .unwrap();
        let child = Command::new(EXE)
            .args(["serve", "--config"])
            .arg(&self.n[i].cfg)
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.n[i].child = Some(child);
    }

    fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.n[i].child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    fn status(&self, i: usize) -> Option<Value> {
        get_status(&self.n[i].admin)
    }

    fn logs(&self) -> String {
        format!(
            "node 1 log:\n{}\nnode 2 log:\n{}",
            std::fs::read_to_string(&self.n[0].log).unwrap_or_default(),
            std::fs::read_to_string(&self.n[1].log).unwrap_or_default()
        )
    }

    fn wait(&self, i: usize, what: &str, secs: u64, f: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut last = None;
        while Instant::now() < deadline {
            if let Some(s) = self.status(i) {
                if f(&s) {
                    return s;
                }
                last = Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "node {} never reached '{what}' in {secs} s; last status: {}\n{}",
            i + 1,
            last.map(|s| s.to_string()).unwrap_or_default(),
            self.logs()
        );
    }

    /// Node `p` primary and in sync with its backup.
    fn wait_in_sync(&self, p: usize) -> (Value, Value) {
        let b = 1 - p;
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let (Some(sp), Some(sb)) = (self.status(p), self.status(b)) {
                let head = sp["head_seq"].as_u64();
                if sp["role"] == "primary"
                    && sp["serving"] == true
                    && sp["peer_state"] == "connected"
                    && sp["degraded"] == false
                    && sp["executed_seq"] == sp["head_seq"]
                    && sb["executed_seq"].as_u64() == head
                    && sb["head_seq"].as_u64() == head
                    && sb["current"] == true
                {
                    return (sp, sb);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the pair never got in sync\n{}", self.logs());
    }

    /// `deltamirror ARGS --admin` on node `i`: success and output.
    fn cli(&self, i: usize, args: &[&str]) -> (bool, String) {
        let out = Command::new(EXE)
            .args(args)
            .args(["--admin", &self.n[i].admin])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.kill9(0);
        self.kill9(1);
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// GET /status over a plain socket (no process per poll: the observer
/// polls every 10 ms).
fn get_status(addr: &str) -> Option<Value> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET /status HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let body = &out[out.find("\r\n\r\n")? + 4..];
    serde_json::from_str(body).ok()
}

fn serving_primary(s: &Value) -> bool {
    s["role"] == "primary" && s["serving"] == true
}

/// A fixed number of writes through node `i` that must all succeed.
fn writes_ok(p: &Pair, i: usize, salt: u64, first: u64, count: u64) -> Written {
    let (stop, acks) = (AtomicBool::new(false), AtomicU64::new(0));
    let w = nbd_writer(&p.n[i].nbd, salt, first, count, 8, &stop, &acks);
    assert!(
        w.broken.is_none() && w.errors == 0 && w.acked.len() as u64 == count,
        "writes through node {}: {} acknowledged, {} errors, {:?}\n{}",
        i + 1,
        w.acked.len(),
        w.errors,
        w.broken,
        p.logs()
    );
    w
}

/// Sleeps `ms` while checking that `f` holds for both nodes' statuses.
fn holds_for(p: &Pair, ms: u64, what: &str, f: impl Fn(&Value, &Value) -> bool) {
    let end = Instant::now() + Duration::from_millis(ms);
    while Instant::now() < end {
        if let (Some(a), Some(b)) = (p.status(0), p.status(1)) {
            assert!(f(&a, &b), "{what}: node 1 {a}\nnode 2 {b}\n{}", p.logs());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_kill9_of_the_primary_under_load_the_backup_takes_over_and_the_old_one_rejoins_with_the_delta()
{
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !need(&["etcd", "etcdctl"]) {
        return;
    }
    let etcd = Etcd::start("a", 1);
    let mut p = Pair::up("a", 4000, &etcd);
    let gen0 = u(&p.status(0).unwrap(), "generation");
    // Under the oracle's writes (QD 4), the primary dies.
    let stop = AtomicBool::new(false);
    let acks = AtomicU64::new(0);
    let nbd0 = p.n[0].nbd.clone();
    let (before, killed_at) = std::thread::scope(|sc| {
        let writer = sc.spawn(|| nbd_writer(&nbd0, 1, 100_000, 90_000, 4, &stop, &acks));
        while acks.load(Ordering::Acquire) < 300 && !writer.is_finished() {
            std::thread::sleep(Duration::from_millis(5));
        }
        p.kill9(0);
        let t = Instant::now();
        stop.store(true, Ordering::Release);
        (writer.join().unwrap(), t)
    });
    assert!(before.acked.len() >= 300 && before.broken.is_some());
    let s1 = p.wait(1, "primary by itself", 30, serving_primary);
    let took = killed_at.elapsed();
    println!(
        "takeover {} ms after the kill (lease_ttl_ms {TTL_MS}); {} writes acknowledged before",
        took.as_millis(),
        before.acked.len()
    );
    assert!(
        took <= Duration::from_millis(TTL_MS + 2000),
        "the backup took {} ms to take over (bound: lease_ttl_ms + 2 s)",
        took.as_millis()
    );
    let gen1 = u(&s1, "generation");
    assert!(gen1 > gen0);
    let fo = &s1["failover"];
    assert_eq!(fo["holds_lease"], true, "{s1}");
    assert_eq!(fo["lease_holder_node_id"], 2);
    // Writes through the new primary succeed (it records the old primary
    // stale in etcd first).
    let after = writes_ok(&p, 1, 2, 200_000, 1000);
    let stale = etcd
        .get(&format!(
            "{}/stale",
            fo["key"].as_str().unwrap().trim_end_matches("/leader")
        ))
        .expect("the new primary recorded the old one stale");
    assert!(stale.contains("\"node_id\":1"), "{stale}");
    // The old primary returns: it learns the newer generation, rejoins as
    // backup and receives only the delta.
    p.start(0);
    let s0 = p.wait(0, "backup", 30, |s| s["role"] == "backup");
    assert!(u(&s0, "generation") >= gen1);
    let (sp, sb) = p.wait_in_sync(1);
    let r = &sp["last_replay"];
    println!("failback replay: {r}");
    assert_eq!(u(&sp, "remirrors") + u(&sb, "remirrors"), 0, "no remirror");
    assert!(u(r, "entries") >= 1000, "the writes since the takeover");
    assert!(u(r, "entries") < 1000 + 64, "only the delta: {r}");
    // No acknowledged write lost, on either node.
    for i in [1, 0] {
        for (salt, w) in [(1, &before), (2, &after)] {
            for &blk in &w.acked {
                assert!(
                    block_of(&p.n[i].volume, blk) == oracle_block(salt, blk),
                    "node {}: acknowledged write to block {blk} lost",
                    i + 1
                );
            }
        }
    }
    assert!(images_identical(&p.n[0].volume, &p.n[1].volume));
    // The stale mark goes once the old primary caught up.
    let key = fo["key"]
        .as_str()
        .unwrap()
        .trim_end_matches("/leader")
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    while etcd.get(&format!("{key}/stale")).is_some() {
        assert!(Instant::now() < deadline, "the stale mark stayed");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn b_a_link_cut_with_etcd_reachable_marks_the_backup_stale_and_it_does_not_take_over() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !need(&["etcd", "etcdctl", "nft"]) || !need_root("cutting the link with nftables") {
        return;
    }
    let etcd = Etcd::start("b", 1);
    let p = Pair::up("b", 4010, &etcd);
    let key = p.status(0).unwrap()["failover"]["key"]
        .as_str()
        .unwrap()
        .trim_end_matches("/leader")
        .to_string();
    let gen0 = u(&p.status(0).unwrap(), "generation");
    writes_ok(&p, 0, 1, 0, 200);
    let cut = Cut::new("b", &[p.n[1].link_port]);
    // Writes go on through the primary once etcd holds the stale mark.
    writes_ok(&p, 0, 2, 1000, 500);
    let s0 = p.wait(0, "degraded", 10, |s| s["degraded"] == true);
    let stale = etcd
        .get(&format!("{key}/stale"))
        .expect("stale mark in etcd");
    let from = u(&s0, "peer_stale_from_seq");
    assert!(
        stale.contains("\"node_id\":2") && stale.contains(&format!("\"from_seq\":{from}")),
        "{stale} (primary: backup stale from {from})"
    );
    // The primary keeps renewing its lease, and etcd marks the backup
    // stale: it never takes over.
    holds_for(&p, 3 * TTL_MS, "nobody else takes over", |a, b| {
        serving_primary(a) && b["role"] == "backup" && b["serving"] == false
    });
    assert_eq!(u(&p.status(1).unwrap(), "generation"), gen0);
    drop(cut);
    let (sp, _) = p.wait_in_sync(0);
    assert!(u(&sp["last_replay"], "entries") >= 500);
    assert!(images_identical(&p.n[0].volume, &p.n[1].volume));
}

#[test]
fn c_a_primary_cut_from_etcd_and_its_backup_fences_before_the_backup_takes_over() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !need(&["etcd", "etcdctl", "nft"]) || !need_root("cutting links with nftables") {
        return;
    }
    let reps: u32 = std::env::var("DM_FAILOVER_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let etcd = Etcd::start("c", 1);
    let p = Pair::up("c", 4020, &etcd);
    // The observer: both nodes every 10 ms, back to back; never both
    // serving as primary in one round.
    let stop = AtomicBool::new(false);
    let rounds = AtomicU64::new(0);
    let admins = [p.n[0].admin.clone(), p.n[1].admin.clone()];
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ std::process::id() as u64;
    let mut rand = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    std::thread::scope(|sc| {
        let observer = sc.spawn(|| {
            let mut both = None;
            while !stop.load(Ordering::Acquire) {
                let a = get_status(&admins[0]);
                let b = get_status(&admins[1]);
                if let (Some(a), Some(b)) = (&a, &b) {
                    if serving_primary(a) && serving_primary(b) && both.is_none() {
                        both = Some(format!("node 1 {a}\nnode 2 {b}"));
                    }
                }
                rounds.fetch_add(1, Ordering::AcqRel);
                std::thread::sleep(Duration::from_millis(10));
            }
            both
        });
        let mut primary = 0;
        for rep in 0..reps {
            p.wait_in_sync(primary);
            p.wait(primary, "holding the lease", 20, |s| {
                s["failover"]["holds_lease"] == true
            });
            std::thread::sleep(Duration::from_millis(rand(TTL_MS)));
            let backup = 1 - primary;
            // The primary loses etcd (its client port) and the link.
            let port = etcd.clients[0][primary];
            let cut = Cut::new(&format!("c{rep}"), &[port, p.n[1].link_port]);
            let sf = p.wait(primary, "fenced", 20, |s| {
                s["self_fenced_reason"].is_string()
            });
            let sb = p.wait(backup, "took over", 20, serving_primary);
            assert!(u(&sb, "generation") > u(&sf, "generation"));
            std::thread::sleep(Duration::from_millis(rand(300)));
            drop(cut);
            let s = p.wait(primary, "rejoined as backup", 30, |s| {
                s["role"] == "backup" && s["self_fenced_reason"].is_null()
            });
            assert_eq!(s["serving"], false);
            primary = backup;
        }
        stop.store(true, Ordering::Release);
        let both = observer.join().unwrap();
        println!(
            "{reps} repetitions, {} observer rounds",
            rounds.load(Ordering::Acquire)
        );
        assert!(
            both.is_none(),
            "both nodes served at once:\n{}",
            both.unwrap()
        );
    });
}

#[test]
fn d_etcd_down_nothing_changes_and_without_it_only_a_forced_promote_works() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !need(&["etcd", "etcdctl"]) {
        return;
    }
    let mut etcd = Etcd::start("d", 1);
    let mut p = Pair::up("d", 4030, &etcd);
    let gen0 = u(&p.status(0).unwrap(), "generation");
    etcd.kill(0);
    // I/O goes on; nobody fences, nobody is promoted.
    writes_ok(&p, 0, 1, 0, 500);
    holds_for(&p, 3 * TTL_MS, "a healthy pair without etcd", |a, b| {
        serving_primary(a)
            && a["self_fenced_reason"].is_null()
            && b["role"] == "backup"
            && a["generation"] == b["generation"]
    });
    writes_ok(&p, 0, 2, 1000, 500);
    let s = p.status(0).unwrap();
    assert_eq!(u(&s, "generation"), gen0);
    assert_eq!(s["failover"]["etcd_reachable"], false);
    // The primary dies: no automatic promotion.
    p.kill9(0);
    let end = Instant::now() + Duration::from_millis(3 * TTL_MS);
    while Instant::now() < end {
        let b = p.status(1).unwrap();
        assert_eq!(b["role"], "backup", "promoted without etcd: {b}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (ok, out) = p.cli(1, &["promote"]);
    assert!(!ok && out.contains("etcd"), "{out}");
    let (ok, out) = p.cli(1, &["promote", "--force"]);
    assert!(ok, "{out}");
    assert!(out.contains("etcd is unreachable"), "{out}");
    p.wait(1, "serving", 20, serving_primary);
    writes_ok(&p, 1, 3, 2000, 200);
}

#[test]
fn e_a_three_member_etcd_losing_one_member_changes_nothing() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !need(&["etcd", "etcdctl"]) {
        return;
    }
    let mut etcd = Etcd::start("e", 3);
    let p = Pair::up("e", 4040, &etcd);
    let gen0 = u(&p.status(0).unwrap(), "generation");
    let transitions0 = u(&p.status(0).unwrap()["failover"], "transitions");
    // The first member: the one both nodes' clients try first.
    let log_lines_before: Vec<usize> = (0..2).map(|i| log_lines(&p, i).len()).collect();
    etcd.kill(0);
    writes_ok(&p, 0, 1, 0, 500);
    holds_for(&p, 3 * TTL_MS, "nothing changes", |a, b| {
        serving_primary(a)
            && a["failover"]["holds_lease"] == true
            && a["self_fenced_reason"].is_null()
            && b["role"] == "backup"
    });
    writes_ok(&p, 0, 2, 1000, 500);
    let s = p.status(0).unwrap();
    assert_eq!(u(&s, "generation"), gen0);
    assert_eq!(u(&s["failover"], "transitions"), transitions0, "{s}");
    // Renewals go on through the two members left. While etcd elects a new
    // leader (when the dead member led) no renewal is answered, so with
    // this test's 1 s TTL the last one may be over a TTL old at any one
    // moment (etcd's new leader extends every lease); within two TTLs
    // there is a fresh one.
    let end = Instant::now() + Duration::from_millis(2 * TTL_MS);
    loop {
        let s = p.status(0).unwrap();
        if u(&s["failover"], "last_renewal_ms_ago") < TTL_MS {
            break;
        }
        assert!(Instant::now() < end, "no lease renewal for over a TTL: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Each agent's requests fail while etcd elects a new leader (when the
    // dead member led) and while it tries the dead member; once one is
    // answered again, the agent stays with a live member. It used to keep
    // sending the dead one a share of its requests (each failing; once the
    // lease's keep-alives failed until the lease lapsed, with two members
    // up).
    for (i, before) in log_lines_before.into_iter().enumerate() {
        let lines = log_lines(&p, i);
        let after_kill = &lines[before..];
        let back = after_kill
            .iter()
            .position(|l| l.contains("failover: etcd answers again"))
            .unwrap_or(after_kill.len());
        let late: Vec<&String> = after_kill[back..]
            .iter()
            .filter(|l| l.contains("failover: etcd: "))
            .collect();
        assert!(
            late.is_empty(),
            "node {}: etcd requests failed after etcd answered again with one member down: {late:#?}",
            i + 1
        );
    }
}

/// Node `i`'s log, line by line.
fn log_lines(p: &Pair, i: usize) -> Vec<String> {
    std::fs::read_to_string(&p.n[i].log)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

#[test]
fn f_bad_input_gives_clear_errors_and_no_promotion() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !need(&["etcd", "etcdctl"]) {
        return;
    }
    // Unreachable endpoints: the pair serves (quorum through the link), the
    // error says what to check, and a dead primary is not replaced.
    let closed = free_port();
    let mut p = Pair::new("f1", 4050, |_| {
        failover_section(&[format!("http://127.0.0.1:{closed}")], "")
    });
    p.start(0);
    p.start(1);
    p.wait_in_sync(0);
    let s = p.wait(1, "etcd error", 20, |s| {
        s["failover"]["etcd_error"].is_string()
    });
    let e = s["failover"]["etcd_error"].as_str().unwrap().to_string();
    assert!(
        e.contains("failover.etcd_endpoints") && e.contains(&closed.to_string()),
        "{e}"
    );
    writes_ok(&p, 0, 1, 0, 100);
    p.kill9(0);
    std::thread::sleep(Duration::from_millis(3 * TTL_MS));
    assert_eq!(p.status(1).unwrap()["role"], "backup");
    drop(p);

    // Not etcd at all (an HTTP/1 server): a clear error, no promotion.
    let etcd = Etcd::start("f", 1);
    // An HTTP/1 server, not etcd's gRPC.
    let http = TcpListener::bind("127.0.0.1:0").unwrap();
    let http_port = http.local_addr().unwrap().port();
    // Answers every connection with an HTTP/1 404 (until the test binary
    // ends).
    std::thread::spawn(move || {
        use std::io::Write;
        for c in http.incoming().flatten() {
            let mut c = c;
            let _ = c.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
        }
    });
    let mut p = Pair::new("f2", 4060, |_| {
        failover_section(&[format!("http://127.0.0.1:{http_port}")], "")
    });
    p.start(0);
    p.start(1);
    p.wait_in_sync(0);
    let s = p.wait(1, "etcd error", 20, |s| {
        s["failover"]["etcd_error"].is_string()
    });
    assert!(
        s["failover"]["etcd_error"]
            .as_str()
            .unwrap()
            .contains("not etcd"),
        "{s}"
    );
    p.kill9(0);
    std::thread::sleep(Duration::from_millis(3 * TTL_MS));
    assert_eq!(p.status(1).unwrap()["role"], "backup");
    drop(p);

    // A key held by a node of another pair, then a value that does not
    // parse: the error names the key and the fix; no promotion.
    for (k, (value, says)) in [
        (
            r#"{"pair":"00000000000000000000000000000000","node_id":1,"node_name":"other","generation":9}"#,
            "another pair",
        ),
        ("node1-was-here", "does not parse"),
    ]
    .into_iter()
    .enumerate()
    {
        let prefix = format!("/dmtest/f{k}");
        let mut p = Pair::new(&format!("f3{k}"), 4070 + 10 * k as u16, |i| {
            failover_section(&etcd.endpoints(i), &format!("key_prefix = {prefix:?}\n"))
        });
        etcd.put(&format!("{prefix}/leader"), value);
        p.start(0);
        p.start(1);
        p.wait_in_sync(0);
        let s = p.wait(1, "doubt", 20, |s| {
            s["failover"]["etcd_error"]
                .as_str()
                .is_some_and(|e| e.contains(says))
        });
        let e = s["failover"]["etcd_error"].as_str().unwrap();
        assert!(e.contains(&format!("{prefix}/leader")), "{e}");
        // The primary cannot hold the key either: it stays up through its
        // backup, and never names itself in etcd.
        assert_eq!(p.status(0).unwrap()["failover"]["holds_lease"], false);
        p.kill9(0);
        std::thread::sleep(Duration::from_millis(3 * TTL_MS));
        let s = p.status(1).unwrap();
        assert_eq!(s["role"], "backup", "{s}");
        assert_eq!(etcd.get(&format!("{prefix}/leader")).unwrap(), value);
        drop(p);
    }

    // The two nodes disagree on [failover]: refused at the handshake with
    // the reason, on both nodes.
    let mut p = Pair::new("f5", 4090, |i| {
        if i == 0 {
            failover_section(&etcd.endpoints(i), "")
        } else {
            String::new()
        }
    });
    p.start(0);
    p.start(1);
    for i in 0..2 {
        let s = p.wait(i, "refused", 20, |s| {
            s["peer_refused_reason"]
                .as_str()
                .is_some_and(|r| r.contains("[failover] sections differ"))
        });
        assert!(
            s["fenced_reason"].is_null(),
            "a config error fences nobody: {s}"
        );
    }
}

#[test]
fn g_the_auto_failover_demo_shows_a_takeover_with_nothing_lost() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !need(&["etcd"]) {
        return;
    }
    let dir = tmp("demo");
    let out = Command::new(EXE)
        .args(["demo", "--auto-failover", "--port-offset", "4800", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    println!("{text}");
    assert!(out.status.success(), "{text}");
    assert!(text.contains("took over by itself"), "{text}");
    assert!(text.contains(", 0 lost"), "{text}");
    assert!(text.contains("full remirrors       : 0"), "{text}");
    assert!(text.contains("images byte-identical: yes"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn h_etcd_down_then_a_link_cut_writes_wait_then_fail_and_none_completes_alone() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !need(&["etcd", "etcdctl", "nft"]) || !need_root("cutting the link with nftables") {
        return;
    }
    let mut etcd = Etcd::start("h", 1);
    let p = Pair::up("h", 4100, &etcd);
    writes_ok(&p, 0, 1, 0, 200);
    let head0 = u(&p.status(0).unwrap(), "head_seq");
    etcd.kill(0);
    let cut = Cut::new("h", &[p.n[1].link_port]);
    // Two of three are gone: the writes in flight wait for the stale mark
    // (3 s, stale_mark_timeout_ms), then fail; the primary fences itself.
    let (stop, acks) = (AtomicBool::new(false), AtomicU64::new(0));
    let w = nbd_writer(&p.n[0].nbd, 2, 5000, 50, 4, &stop, &acks);
    println!(
        "while cut from etcd and backup: {} acknowledged, {} errors, {:?}",
        w.acked.len(),
        w.errors,
        w.broken
    );
    assert!(
        w.acked.is_empty(),
        "a write completed without the backup and etcd"
    );
    assert!(w.errors > 0 || w.broken.is_some());
    let s0 = p.wait(0, "fenced", 20, |s| s["self_fenced_reason"].is_string());
    assert_eq!(s0["degraded"], false, "never degraded: {s0}");
    assert!(s0["peer_stale_from_seq"].is_null());
    // The backup has no etcd either: it never takes over.
    holds_for(&p, 2 * TTL_MS, "nobody serves", |a, b| {
        !serving_primary(a) && b["role"] == "backup"
    });
    drop(cut);
    // The link returns: the pair has its quorum again, the primary serves
    // in the same generation, and the writes that failed may be retried.
    p.wait(0, "serving again", 30, |s| {
        serving_primary(s) && s["self_fenced_reason"].is_null()
    });
    writes_ok(&p, 0, 3, 6000, 100);
    // Status is published every 100 ms: wait until it shows the 100
    // writes before judging the pair in sync.
    p.wait(0, "the 100 writes in the status", 10, |s| {
        u(s, "head_seq") >= head0 + 100
    });
    let (sp, _) = p.wait_in_sync(0);
    assert!(
        u(&sp, "head_seq") >= head0 + 100,
        "head {} after 100 more writes from {head0}: {sp}",
        u(&sp, "head_seq")
    );
    assert!(images_identical(&p.n[0].volume, &p.n[1].volume));
}
