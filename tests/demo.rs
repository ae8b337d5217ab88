//! `deltamirror demo --serve` survives the death of one node: kill -9 of
//! either node leaves the other running, the demo names the node that died
//! and how, and prints the command that restarts it; that command brings
//! the node back into the pair, and Ctrl-C (SIGTERM) stops it with the rest.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use serde_json::Value;

const EXE: &str = env!("CARGO_BIN_EXE_deltamirror");
/// Added to every demo port (tests/pair.rs uses 3100..=3900).
const PORT_OFFSET: u16 = 4700;

fn admin(node: usize) -> String {
    format!("127.0.0.1:{}", 9400 + node as u16 - 1 + PORT_OFFSET)
}

fn status(node: usize) -> Option<Value> {
    let out = Command::new(EXE)
        .args(["status", "--json", "--admin", &admin(node)])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// Waits until `f` holds for node `node`'s status; panics with the last
/// status after `secs` (a liveness bound, not a measurement).
fn wait_status(node: usize, what: &str, secs: u64, f: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut last = None;
    while Instant::now() < deadline {
        if let Some(s) = status(node) {
            if f(&s) {
                return s;
            }
            last = Some(s);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("node {node} did not reach '{what}' within {secs} s; last status {last:#?}");
}

/// The demo's stdout, line by line.
struct Demo {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Demo {
    fn start(dir: &std::path::Path) -> Demo {
        let mut child = Command::new(EXE)
            .args(["demo", "--serve", "--port-offset", &PORT_OFFSET.to_string()])
            .arg("--dir")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Demo {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The next line of output for which `f` holds, skipping others.
    fn line(&mut self, what: &str, f: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if f(&l) {
                        return l;
                    }
                }
                Err(e) => panic!(
                    "the demo printed no line '{what}' ({e:?}; exit: {:?}); it printed:\n{}",
                    self.child.try_wait(),
                    self.seen.join("\n")
                ),
            }
        }
    }

    fn still_running(&mut self) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "the demo exited; it printed:\n{}",
            self.seen.join("\n")
        );
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// A node process restarted by the test, killed if the test fails first.
struct Restarted(Child);

impl Drop for Restarted {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The node's pid from its status (0 until its first status is published).
fn pid_of(node: usize) -> u32 {
    let s = wait_status(node, "status with its pid", 60, |s| {
        s["pid"].as_u64() > Some(0)
    });
    s["pid"].as_u64().unwrap() as u32
}

fn kill9(pid: u32) {
    assert!(pid > 0, "never kill(0): that is the whole process group");
    // SAFETY: kill(2) has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
}

fn in_sync(s: &Value) -> bool {
    s["role"] == "primary"
        && s["peer_state"] == "connected"
        && s["degraded"] == false
        && s["replay_progress"].is_null()
        && s["ack2_seq"] == s["head_seq"]
}

/// Kills node `node` with SIGKILL, checks the demo's report and that the
/// other node still answers, runs the printed restart command and waits for
/// the pair to be whole again. Returns the restarted process.
fn kill_and_restart(demo: &mut Demo, node: usize) -> Restarted {
    let other = 3 - node;
    let survivor = pid_of(other);
    kill9(pid_of(node));
    let died = demo.line("node died", |l| {
        l.starts_with("node ") && l.contains(" died")
    });
    assert!(
        died.starts_with(&format!("node {node} died (signal: 9 (SIGKILL)")),
        "names the node and its exit status: {died}"
    );
    assert!(
        died.contains(&format!("node {other} keeps running")),
        "{died}"
    );
    demo.line("restart hint", |l| {
        l.trim() == format!("restart node {node} with:")
    });
    let cmd = demo.line("restart command", |_| true);
    let cmd = cmd.trim();
    assert!(
        cmd.contains(" serve --config ") && cmd.contains(&format!("node{node}.toml")),
        "{cmd}"
    );
    assert!(
        cmd.contains(">>") && cmd.contains(&format!("node{node}.log")),
        "{cmd}"
    );
    // The survivor is the same process and still answers.
    demo.still_running();
    assert_eq!(pid_of(other), survivor, "node {other} kept running");
    // The printed command restarts the node.
    let restarted = Restarted(
        Command::new("sh")
            .arg("-c")
            .arg(format!("exec {cmd}"))
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let back = demo.line("node back", |l| {
        l.starts_with(&format!("node {node} is back"))
    });
    let pid = pid_of(node);
    assert!(back.contains(&format!("(pid {pid},")), "{back}");
    assert_eq!(
        pid,
        restarted.0.id(),
        "the node answering is the one restarted"
    );
    wait_status(1, "primary with the backup in sync", 120, in_sync);
    demo.still_running();
    restarted
}

#[test]
fn demo_serve_keeps_the_survivor_and_prints_the_restart_command() {
    let dir = std::env::temp_dir().join(format!("deltamirror-demo-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut demo = Demo::start(&dir);
    demo.line("serving", |l| l.starts_with("running until interrupted"));
    wait_status(1, "primary with the backup in sync", 60, in_sync);

    // The backup, then the primary.
    let mut restarted = vec![kill_and_restart(&mut demo, 2)];
    restarted.push(kill_and_restart(&mut demo, 1));

    // SIGTERM stops the pair, nodes restarted by hand included.
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(demo.child.id() as libc::pid_t, libc::SIGTERM) };
    demo.line("stopping", |l| l == "stopping the pair");
    let st = demo.child.wait().unwrap();
    assert!(st.success(), "demo exit: {st}");
    for mut c in restarted {
        let deadline = Instant::now() + Duration::from_secs(30);
        while c.0.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                panic!("the demo did not stop node pid {}", c.0.id());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    assert!(status(1).is_none() && status(2).is_none());
    println!("the demo printed:\n{}", demo.seen.join("\n"));
    let _ = std::fs::remove_dir_all(&dir);
}
