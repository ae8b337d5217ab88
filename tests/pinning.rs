//! Every entry of `reactor.cores` runs a pinned reactor: the mirror reactor
//! (which hosts connection reactor 0) on `cores[0]`, connection reactor
//! `dm-conn-i` on `cores[i]`. Checked on a real `deltamirror serve
//! --standalone` process through /proc, and in its status, which reports
//! each reactor thread's core and busy and idle time.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{field, format_node, fresh_dir, port_shift, EXE};

/// The CPUs a thread of `pid` named `name` may run on, once it exists.
fn affinity(pid: u32, name: &str) -> Option<String> {
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let t = t.ok()?.path();
        let comm = std::fs::read_to_string(t.join("comm")).unwrap_or_default();
        if comm.trim() == name {
            let status = std::fs::read_to_string(t.join("status")).ok()?;
            return status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|v| v.trim().to_string());
        }
    }
    None
}

/// Waits (bounded) until the thread exists and has pinned itself to `cpu`;
/// returns what it last saw.
fn wait_pinned(child: &mut Child, name: &str, cpu: usize) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = None;
    while Instant::now() < deadline {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("deltamirror exited: {st}");
        }
        seen = affinity(child.id(), name);
        if seen.as_deref() == Some(&cpu.to_string()) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    seen
}

fn online_cpus() -> Vec<usize> {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap_or_default();
    let mut v = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        if let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>()) {
            v.extend(a..=b);
        }
    }
    v
}

#[test]
fn every_reactor_core_runs_a_pinned_reactor() {
    let cpus = online_cpus();
    if cpus.len() < 2 {
        testskip::skip("needs at least 2 online CPUs to pin two reactors");
        return;
    }
    let cores = [cpus[cpus.len() - 1], cpus[0]];
    let dir = fresh_dir("pinning");
    let (cfg, text) = format_node(&dir, 1, 4900 + port_shift(), |_, toml| {
        let (head, rest) = toml.split_at(toml.find("[reactor]").expect("[reactor]"));
        let at = rest.find("cores =").expect("reactor.cores");
        let end = at + rest[at..].find('\n').unwrap();
        format!(
            "{head}{}cores = [{}, {}]{}",
            &rest[..at],
            cores[0],
            cores[1],
            &rest[end..]
        )
    });
    let log = std::fs::File::create(dir.join("node1.log")).unwrap();
    let mut child = Command::new(EXE)
        .args(["serve", "--standalone", "--config"])
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let mirror = wait_pinned(&mut child, "dm-reactor-1", cores[0]);
    let conn1 = wait_pinned(&mut child, "dm-conn-1", cores[1]);
    let reactors = reactors_in_status(field(&text, "admin", "listen"));
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(dir.join("node1.log")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        mirror.as_deref(),
        Some(cores[0].to_string().as_str()),
        "dm-reactor-1 (hosting connection reactor 0); log:\n{log}"
    );
    assert_eq!(
        conn1.as_deref(),
        Some(cores[1].to_string().as_str()),
        "dm-conn-1; log:\n{log}"
    );
    // The status names both threads with their cores; each has run (the
    // mirror reactor and the connection reactor both poll from the start).
    let want = [("dm-reactor-1", cores[0]), ("dm-conn-1", cores[1])];
    assert_eq!(reactors.len(), 2, "{reactors:?}");
    for (r, (thread, core)) in reactors.iter().zip(want) {
        assert_eq!(r["thread"], thread, "{reactors:?}");
        assert_eq!(r["core"], core, "{reactors:?}");
        let time = r["busy_us"].as_u64().unwrap() + r["idle_us"].as_u64().unwrap();
        assert!(time > 0, "{reactors:?}");
    }
}

/// The `reactors` of the node's status at `admin` (once it answers).
fn reactors_in_status(admin: &str) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let out = Command::new(EXE)
            .args(["status", "--json", "--admin", admin])
            .output()
            .unwrap();
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            return v["reactors"].as_array().cloned().unwrap_or_default();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("the node's admin endpoint {admin} never answered");
}
