//! libiscsi's conformance suite (`iscsi-test-cu -d -t ALL`) against a
//! MemVolume-backed target. Tests that only printed [SKIPPED] count apart
//! from real passes (CUnit counts them as passed).
//!
//! Reference on the same kind of VM: tgtd 1.0.85 has 160 real passes, 62
//! skips and 8 failures out of 230. This target reaches 204 real passes, 25
//! skips and 1 failure (GetLBAStatus.UnmapSingle, which expects a descriptor
//! starting at a different LBA than the one asked for once the LU reports
//! 4 KiB physical blocks); the thresholds below are those numbers.

use std::process::Command;
use std::sync::Arc;

const MIN_REAL_PASSES: u32 = 204;
const MAX_FAILURES: u32 = 1;

#[derive(Debug, Default)]
struct Counts {
    total: u32,
    passed: u32,
    failed: u32,
    skipped: u32,
}

fn parse(log: &str) -> Option<Counts> {
    let mut c = Counts::default();
    let mut suite = String::new();
    let mut current = String::new();
    let mut skipped = std::collections::BTreeSet::new();
    let mut summary = false;
    for line in log.lines() {
        if let Some(s) = line.strip_prefix("Suite: ") {
            suite = s.trim().to_string();
        }
        if let Some(t) = line.strip_prefix("  Test: ") {
            let name = t.split(" ...").next().unwrap_or(t);
            current = format!("{suite}.{name}");
        }
        if line.contains("[SKIPPED]") && !current.is_empty() {
            skipped.insert(current.clone());
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 5 && f[0] == "tests" && f[1].parse::<u32>().is_ok() {
            c.total = f[1].parse().ok()?;
            c.passed = f[3].parse().ok()?;
            c.failed = f[4].parse().ok()?;
            summary = true;
        }
    }
    c.skipped = skipped.len() as u32;
    summary.then_some(c)
}

#[test]
fn iscsi_test_cu_all() {
    if Command::new("iscsi-test-cu")
        .arg("--list")
        .output()
        .is_err()
    {
        testskip::skip("iscsi-test-cu is not installed (scripts/test.sh installs libiscsi-bin)");
        return;
    }
    let vol = Arc::new(volume::MemVolume::new(512, 131_072));
    let iqn = "iqn.2026-01.io.deltamirror:conformance";
    let cfg = iscsi_target::IscsiConfig::new("127.0.0.1:0".parse().unwrap(), iqn);
    let t = iscsi_target::start(cfg, vol).unwrap();
    let url = format!("iscsi://{}/{iqn}/0", t.local_addr());
    let out = Command::new("timeout")
        .args(["600", "iscsi-test-cu", "-d", "-t", "ALL", &url])
        .output()
        .expect("run iscsi-test-cu");
    let log =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let path = std::env::temp_dir().join("iscsi-test-cu.log");
    let _ = std::fs::write(&path, &log);
    let c =
        parse(&log).unwrap_or_else(|| panic!("no CUnit summary (crash or hang); log in {path:?}"));
    let real = c.passed - c.skipped;
    println!(
        "iscsi-test-cu: total {} real passes {} skips {} failures {} (tgtd: 160 / 62 / 8); log {:?}",
        c.total, real, c.skipped, c.failed, path
    );
    t.shutdown();
    assert_eq!(c.total, c.passed + c.failed, "every test ran");
    assert!(
        c.failed <= MAX_FAILURES,
        "{} failures (allowed {MAX_FAILURES}); see {path:?}",
        c.failed
    );
    assert!(
        real >= MIN_REAL_PASSES,
        "{real} real passes (want {MIN_REAL_PASSES}); see {path:?}"
    );
}
