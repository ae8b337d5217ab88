//! How a test that lacks a tool (a client, root, a device) records that it
//! skipped.
//!
//! `cargo test` captures the output of a passing test, so a test that only
//! printed `SKIPPED` and returned was counted as passed. [`skip`] writes one
//! line `SKIPPED <crate>/<binary>::<test>: <reason>` to stderr (shown when
//! the test fails or with `--nocapture`) and appends it to the file named by
//! `DM_SKIP_LOG`, which scripts/test.sh sets, counts in its summary
//! ("N passed, F failed, S skipped") and, under `DM_REQUIRE_TOOLS=1` (root or
//! CI, where the script installs every tool itself), turns into a failure
//! unless the test is listed in scripts/allowed-skips.txt with its reason.
//!
//! A test calls [`skip`] and returns; it never passes silently.

use std::io::Write;

/// The name of the test binary without cargo's hash suffix
/// (`real_clients-0123abcd` -> `real_clients`).
fn binary_name() -> String {
    let exe = std::env::current_exe().ok();
    let stem = exe
        .as_deref()
        .and_then(|p| p.file_stem())
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "?".into());
    match stem.rsplit_once('-') {
        Some((name, hash)) if !hash.is_empty() && hash.bytes().all(|b| b.is_ascii_hexdigit()) => {
            name.to_string()
        }
        _ => stem,
    }
}

/// The identity of the running test as scripts/allowed-skips.txt names it:
/// `<crate>/<binary>::<test>`. libtest runs each test on a thread named
/// after it; the crate comes from `CARGO_PKG_NAME`, which cargo sets when it
/// runs a test binary.
pub fn test_id() -> String {
    let krate = std::env::var("CARGO_PKG_NAME").unwrap_or_else(|_| "?".into());
    let thread = std::thread::current();
    let test = match thread.name() {
        Some(n) if n != "main" => n.to_string(),
        _ => "?".into(),
    };
    format!("{krate}/{}::{test}", binary_name())
}

/// The line [`skip`] records (one line: newlines in the reason are folded).
pub fn skip_line(reason: &str) -> String {
    let reason = reason.split_whitespace().collect::<Vec<_>>().join(" ");
    format!("SKIPPED {}: {reason}", test_id())
}

/// Records that the running test is skipped, and why. The caller returns
/// right after.
pub fn skip(reason: impl std::fmt::Display) {
    let line = skip_line(&reason.to_string());
    eprintln!("{line}");
    if let Some(path) = std::env::var_os("DM_SKIP_LOG") {
        let path = std::path::PathBuf::from(path);
        if let Err(e) = append(&path, &line) {
            panic!(
                "cannot record the skip in DM_SKIP_LOG={}: {e}",
                path.display()
            );
        }
    }
}

/// One write of a short line with O_APPEND: lines of tests running in
/// parallel do not interleave.
fn append(path: &std::path::Path, line: &str) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?
        .write_all(format!("{line}\n").as_bytes())
}

/// Whether `tool` is an executable on PATH.
pub fn on_path(tool: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).any(|d| {
            std::fs::metadata(d.join(tool))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// A loop device over a file for a test, detached on drop (also when the
/// test fails). [`LoopDevice::attach`] gives `None`, with the skip recorded,
/// only where loop devices truly cannot exist: no `losetup` (util-linux) or
/// no `/dev/loop-control` (no loop driver). Any other failure to attach
/// (not root, no free device) fails the test.
pub struct LoopDevice(std::path::PathBuf);

impl LoopDevice {
    /// Attach `file` with logical blocks of `sector_size` bytes.
    pub fn attach(file: &std::path::Path, sector_size: u32) -> Option<LoopDevice> {
        LoopDevice::attach_with(file, sector_size, false)
    }

    /// [`LoopDevice::attach`], and let the kernel scan `file`'s partition
    /// table: partition `n` appears as `{path}p{n}` ([`LoopDevice::partition`]).
    pub fn attach_partitioned(file: &std::path::Path, sector_size: u32) -> Option<LoopDevice> {
        LoopDevice::attach_with(file, sector_size, true)
    }

    /// Partition `n` of a device attached with
    /// [`LoopDevice::attach_partitioned`], once its device node exists;
    /// `None` when the kernel found no such partition (the wait is bounded
    /// only to stop a hung test).
    pub fn partition(&self, n: u32) -> Option<std::path::PathBuf> {
        let mut p = self.0.clone().into_os_string();
        p.push(format!("p{n}"));
        let p = std::path::PathBuf::from(p);
        let name = p.file_name()?.to_owned();
        let sys = std::path::Path::new("/sys/block")
            .join(self.0.file_name()?)
            .join(name);
        if !sys.exists() {
            return None;
        }
        for _ in 0..500 {
            if p.exists() {
                return Some(p);
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!(
            "{} is in sysfs but its device node never appeared",
            p.display()
        );
    }

    fn attach_with(file: &std::path::Path, sector_size: u32, partscan: bool) -> Option<LoopDevice> {
        if !on_path("losetup") {
            skip("losetup is not installed (util-linux; scripts/test.sh installs it)");
            return None;
        }
        if !std::path::Path::new("/dev/loop-control").exists() {
            skip("no /dev/loop-control: this kernel has no loop driver");
            return None;
        }
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show", "-b", &sector_size.to_string()])
            .args(partscan.then_some("-P"))
            .arg(file)
            .output()
            .expect("run losetup");
        assert!(
            out.status.success(),
            "losetup -f --show -b {sector_size} {} failed (loop devices need root): {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = String::from_utf8(out.stdout).expect("losetup prints a device path");
        Some(LoopDevice(dev.trim().into()))
    }

    /// The device, e.g. `/dev/loop3`.
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.0)
            .status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_test_and_folds_the_reason() {
        let line = skip_line("fio is not installed\n  (scripts/test.sh installs it)");
        assert_eq!(
            line,
            "SKIPPED testskip/testskip::tests::names_the_test_and_folds_the_reason: \
             fio is not installed (scripts/test.sh installs it)"
        );
    }

    #[test]
    fn appends_to_the_skip_log() {
        let path = std::env::temp_dir().join(format!("testskip-{}.log", std::process::id()));
        let _ = std::fs::remove_file(&path);
        append(&path, &skip_line("first")).unwrap();
        append(&path, &skip_line("second")).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let id = "testskip/testskip::tests::appends_to_the_skip_log";
        assert_eq!(text, format!("SKIPPED {id}: first\nSKIPPED {id}: second\n"));
    }

    #[test]
    fn finds_tools_on_path() {
        assert!(on_path("sh"));
        assert!(!on_path("no-such-tool-deltamirror"));
    }
}
