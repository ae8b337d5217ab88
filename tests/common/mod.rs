//! The process-level harness of tests/pair.rs, pr_failover.rs, abort.rs,
//! pinning.rs and ring_device.rs: real `deltamirror` processes in a fresh
//! directory, configured with `example-config`, formatted, started, killed
//! and read through `status --json`, and the oracle of acknowledged writes
//! (`nbd_writer`); tests/failover.rs uses its small helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const EXE: &str = env!("CARGO_BIN_EXE_deltamirror");

/// `DM_TEST_PORT_SHIFT` (default 0) moves every pair's ports, so that runs
/// on a machine shared with other pairs do not collide. Keep the sum below
/// 18000 to stay out of the ephemeral port range.
pub fn port_shift() -> u16 {
    std::env::var("DM_TEST_PORT_SHIFT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// `DM_TEST_LINK=fabric`: the pairs replicate over libfabric
/// (`link.transport = "fabric"`, its tcp provider).
pub fn fabric_link() -> bool {
    std::env::var("DM_TEST_LINK").is_ok_and(|v| v == "fabric")
}

/// False, with the skip recorded for scripts/test.sh (testskip), when a
/// tool is absent: the caller returns.
pub fn need(tools: &[&str]) -> bool {
    for t in tools {
        if !testskip::on_path(t) {
            testskip::skip(format!(
                "{t} is not installed (scripts/test.sh installs it)"
            ));
            return false;
        }
    }
    true
}

/// The unsigned field `k` of a status, which must be there.
pub fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
}

/// The two image files are byte-identical (`cmp -s`).
pub fn images_identical(a: &Path, b: &Path) -> bool {
    Command::new("cmp")
        .arg("-s")
        .arg(a)
        .arg(b)
        .status()
        .unwrap()
        .success()
}

/// The value of `key` in `[section]` of a TOML text, unquoted.
pub fn field<'a>(toml: &'a str, section: &str, key: &str) -> &'a str {
    let sec = toml
        .find(&format!("[{section}]"))
        .unwrap_or_else(|| panic!("no [{section}]"));
    let rest = &toml[sec..];
    let line = rest
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{key} =")))
        .unwrap();
    line.split('=').nth(1).unwrap().trim().trim_matches('"')
}

/// An empty directory for test `name` under the system's temp directory.
pub fn fresh_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dm-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `example-config` for node `id` with its files in `dir`, edited by
/// `tweak`, written to `dir/node{id}.toml` and formatted: the config's path
/// and text. The link is the one `DM_TEST_LINK` names ([`fabric_link`]).
pub fn format_node(
    dir: &Path,
    id: u32,
    port_offset: u16,
    tweak: impl Fn(u32, String) -> String,
) -> (PathBuf, String) {
    format_node_on(dir, id, port_offset, fabric_link(), tweak)
}

/// [`format_node`] with the link on libfabric (`fabric`) or TCP.
pub fn format_node_on(
    dir: &Path,
    id: u32,
    port_offset: u16,
    fabric: bool,
    tweak: impl Fn(u32, String) -> String,
) -> (PathBuf, String) {
    let out = Command::new(EXE)
        .args(["example-config", "--node", &id.to_string(), "--dir"])
        .arg(dir)
        .args(["--port-offset", &port_offset.to_string()])
        .args(if fabric {
            &["--link", "fabric"][..]
        } else {
            &[]
        })
        .output()
        .unwrap();
    assert!(out.status.success());
    let toml = tweak(id, String::from_utf8(out.stdout).unwrap());
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
    (cfg, toml)
}

pub struct Node {
    pub cfg: PathBuf,
    pub admin: String,
    pub nbd: String,
    pub iscsi: String,
    pub volume: PathBuf,
    pub log: PathBuf,
    pub child: Option<Child>,
}

/// Two formatted nodes; dropping the pair kills them and, unless the test
/// failed, removes the directory.
pub struct Pair {
    pub dir: PathBuf,
    /// The port offset in use: the test's own plus `DM_TEST_PORT_SHIFT`.
    pub offset: u16,
    pub n: [Node; 2],
}

impl Pair {
    /// Formats a pair in a fresh directory. `tweak` edits each node's TOML.
    /// The link is the one `DM_TEST_LINK` names ([`fabric_link`]).
    pub fn new(name: &str, port_offset: u16, tweak: impl Fn(u32, String) -> String) -> Pair {
        Pair::new_on(name, port_offset, fabric_link(), tweak)
    }

    /// [`Pair::new`] with the link on libfabric (`fabric`) or TCP.
    pub fn new_on(
        name: &str,
        port_offset: u16,
        fabric: bool,
        tweak: impl Fn(u32, String) -> String,
    ) -> Pair {
        let port_offset = port_offset + port_shift();
        let dir = fresh_dir(name);
        let mk = |id: u32| {
            let (cfg, toml) = format_node_on(&dir, id, port_offset, fabric, &tweak);
            Node {
                admin: field(&toml, "admin", "listen").to_string(),
                nbd: field(&toml, "nbd", "listen").to_string(),
                iscsi: field(&toml, "iscsi", "listen").to_string(),
                volume: PathBuf::from(field(&toml, "volume", "path")),
                log: dir.join(format!("node{id}.log")),
                cfg,
                child: None,
            }
        };
        let n = [mk(1), mk(2)];
        Pair {
            dir,
            offset: port_offset,
            n,
        }
    }

    /// Starts node `i` (`serve`), its output appended to its log.
    pub fn start(&mut self, i: usize) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.n[i].log)
            .unwrap();
        let child = Command::new(EXE)
            .args(["serve", "--config"])
            .arg(&self.n[i].cfg)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.n[i].child = Some(child);
    }

    pub fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.n[i].child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// Node `i`'s `status --json`, or None while it does not answer.
    pub fn status(&self, i: usize) -> Option<Value> {
        let out = Command::new(EXE)
            .args(["status", "--json", "--admin", &self.n[i].admin])
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Polls node `i`'s status until `f` holds and returns that status. The
    /// bound of `secs` only stops a hung test; nothing is asserted about
    /// how long it took.
    pub fn wait(&self, i: usize, what: &str, secs: u64, f: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut last = None;
        while Instant::now() < deadline {
            if let Some(s) = self.status(i) {
                if f(&s) {
                    return s;
                }
                last = Some(s);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "node {} never reached '{what}' in {secs} s; last status: {}\nlog:\n{}",
            i + 1,
            last.map(|s| s.to_string()).unwrap_or_default(),
            std::fs::read_to_string(&self.n[i].log).unwrap_or_default()
        );
    }

    /// Runs `deltamirror ARGS --admin ADDR` for node `i`: success and
    /// stderr.
    pub fn admin_args(&self, i: usize, args: &[&str]) -> (bool, String) {
        let out = Command::new(EXE)
            .args(args)
            .args(["--admin", &self.n[i].admin])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
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

/// The 4 KiB block `blk` of an image file.
pub fn block_of(img: &Path, blk: u64) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(img).unwrap();
    f.seek(SeekFrom::Start(blk * 4096)).unwrap();
    let mut b = vec![0u8; 4096];
    f.read_exact(&mut b).unwrap();
    b
}

/// Data of the oracle write to block `blk` in the run `salt`: distinct for
/// every block, so a block holding it proves that exact write landed.
pub fn oracle_block(salt: u64, blk: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(4096);
    for i in 0..512u64 {
        let w = (salt << 48) ^ (blk << 12) ^ i ^ 0x5a5a_0000_0000_0000;
        b.extend_from_slice(&w.to_le_bytes());
    }
    b
}

/// What one run of `nbd_writer` saw.
pub struct Written {
    /// Blocks whose write reply arrived without error, in reply order.
    pub acked: Vec<u64>,
    /// Replies that carried an NBD error.
    pub errors: u64,
    /// Why the run ended early (connection lost), if it did.
    pub broken: Option<String>,
}

/// A small NBD client (fixed newstyle, NBD_OPT_GO, simple replies): the
/// oracle of acknowledged writes. It writes `oracle_block(salt, b)` to
/// blocks `first_blk..first_blk + count` in order, keeping `qd` writes in
/// flight, and records a block only once the server's reply for it arrived
/// without error. It stops early when `stop` is set (finishing what is in
/// flight) or when the connection breaks (a killed server). `acks` counts
/// the acknowledged writes as they arrive.
pub fn nbd_writer(
    addr: &str,
    salt: u64,
    first_blk: u64,
    count: u64,
    qd: usize,
    stop: &std::sync::atomic::AtomicBool,
    acks: &std::sync::atomic::AtomicU64,
) -> Written {
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering;
    let mut w = Written {
        acked: Vec::new(),
        errors: 0,
        broken: None,
    };
    let mut s = match nbd_open(addr) {
        Ok(s) => s,
        Err(e) => {
            w.broken = Some(format!("connect: {e}"));
            return w;
        }
    };
    let mut inflight = std::collections::HashSet::new();
    let mut next = first_blk;
    loop {
        while inflight.len() < qd && next < first_blk + count && !stop.load(Ordering::Acquire) {
            let mut r = Vec::with_capacity(28 + 4096);
            r.extend_from_slice(&0x2560_9513u32.to_be_bytes());
            r.extend_from_slice(&0u16.to_be_bytes()); // flags
            r.extend_from_slice(&1u16.to_be_bytes()); // NBD_CMD_WRITE
            r.extend_from_slice(&next.to_be_bytes()); // handle = block
            r.extend_from_slice(&(next * 4096).to_be_bytes());
            r.extend_from_slice(&4096u32.to_be_bytes());
            r.extend_from_slice(&oracle_block(salt, next));
            if let Err(e) = s.write_all(&r) {
                w.broken = Some(format!("send: {e}"));
                return w;
            }
            inflight.insert(next);
            next += 1;
        }
        if inflight.is_empty() {
            return w;
        }
        let mut h = [0u8; 16];
        if let Err(e) = s.read_exact(&mut h) {
            w.broken = Some(format!("reply: {e}"));
            return w;
        }
        assert_eq!(
            u32::from_be_bytes(h[0..4].try_into().unwrap()),
            0x6744_6698,
            "NBD simple reply magic"
        );
        let blk = u64::from_be_bytes(h[8..16].try_into().unwrap());
        assert!(inflight.remove(&blk), "reply for a write not in flight");
        if u32::from_be_bytes(h[4..8].try_into().unwrap()) == 0 {
            w.acked.push(blk);
            acks.fetch_add(1, Ordering::AcqRel);
        } else {
            w.errors += 1;
        }
    }
}

/// Opens an NBD connection to export "deltamirror" (fixed newstyle,
/// NBD_OPT_GO). A stalled server ends a read after 120 s with an error.
pub fn nbd_open(addr: &str) -> std::io::Result<std::net::TcpStream> {
    use std::io::{Error, Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut b = [0u8; 18];
    s.read_exact(&mut b)?;
    if &b[0..8] != b"NBDMAGIC" || &b[8..16] != b"IHAVEOPT" {
        return Err(Error::other("not an NBD server"));
    }
    s.write_all(&3u32.to_be_bytes())?; // FIXED_NEWSTYLE | NO_ZEROES
    let export = b"deltamirror";
    let mut opt = Vec::new();
    opt.extend_from_slice(b"IHAVEOPT");
    opt.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
    opt.extend_from_slice(&((4 + export.len() + 2) as u32).to_be_bytes());
    opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
    opt.extend_from_slice(export);
    opt.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&opt)?;
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h)?;
        let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut data = vec![0u8; len];
        s.read_exact(&mut data)?;
        match typ {
            1 => return Ok(s), // NBD_REP_ACK
            t if t & 0x8000_0000 != 0 => {
                return Err(Error::other(format!("NBD_OPT_GO refused: {t:#x}")))
            }
            _ => {}
        }
    }
}
