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
