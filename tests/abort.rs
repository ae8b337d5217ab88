//! A panicking reactor ends the whole process (issue 14 item 4): with
//! `panic = "abort"` a broken invariant stops the node instead of leaving a
//! dead reactor behind a live admin endpoint and an optimized path.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{format_node, fresh_dir, EXE};

#[test]
fn a_reactor_panic_ends_the_process_with_a_clear_message() {
    use std::os::unix::process::ExitStatusExt;
    let dir = fresh_dir("abort");
    let (cfg, _) = format_node(&dir, 1, 4800, |_, toml| toml);
    let log = dir.join("node1.log");
    let mut child = Command::new(EXE)
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("DM_TEST_PANIC_REACTOR", "1")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "the node kept running after its reactor panicked:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.signal(), Some(libc::SIGABRT), "{status:?}\n{text}");
    assert!(
        text.contains("forced reactor panic") && text.contains("the process stops now"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
