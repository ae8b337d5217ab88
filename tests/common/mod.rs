//! The process-level harness of tests/pair.rs, pr_failover.rs, abort.rs
//! and pinning.rs: real `deltamirror` processes in a fresh directory,
//! configured with `example-config`, formatted, started, killed and read
//! through `status --json`; tests/failover.rs uses its small helpers.
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
