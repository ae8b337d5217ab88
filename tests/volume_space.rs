//! `volume.preallocate`, with the real binary: `deltamirror format` reserves
//! a file volume's space ("space", the default), writes it ("full") or
//! leaves it sparse ("none"); and refuses, naming the setting, a volume the
//! filesystem cannot hold, leaving nothing behind.
//!
//! The refusal needs a small filesystem: a tmpfs of its own, mounted by the
//! test (root; skipped, testskip, only where mount is refused).

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fresh_dir, EXE};

const MIB: u64 = 1 << 20;

/// `example-config` for node 1 in `dir` with a volume of `bytes` at
/// `volume` (default: the config's own) and `preallocate`.
fn config(dir: &Path, volume: Option<&Path>, bytes: u64, preallocate: &str) -> PathBuf {
    let out = Command::new(EXE)
        .args(["example-config", "--node", "1", "--dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success());
    let mut toml = String::from_utf8(out.stdout).unwrap();
    for (from, to) in [
        ("size_bytes = 1073741824", format!("size_bytes = {bytes}")),
        (
            "preallocate = \"space\"",
            format!("preallocate = \"{preallocate}\""),
        ),
    ] {
        assert!(toml.contains(from), "{toml}");
        toml = toml.replacen(from, &to, 1);
    }
    if let Some(v) = volume {
        let own = format!("path = {:?}", dir.join("node1").join("volume.img"));
        assert!(toml.contains(&own), "{toml}");
        toml = toml.replacen(&own, &format!("path = {v:?}"), 1);
    }
    let cfg = dir.join("node1.toml");
    std::fs::write(&cfg, toml).unwrap();
    cfg
}

/// `deltamirror format --config CFG`: success and stderr.
fn format(cfg: &Path) -> (bool, String) {
    let out = Command::new(EXE)
        .args(["format", "--config"])
        .arg(cfg)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn allocated(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

#[test]
fn format_takes_a_file_volumes_space_as_configured() {
    let base = fresh_dir("volspace");
    for (mode, reserved) in [("none", false), ("space", true), ("full", true)] {
        let dir = base.join(mode);
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = config(&dir, None, 64 * MIB, mode);
        let (ok, err) = format(&cfg);
        assert!(ok, "{mode}: {err}");
        let vol = dir.join("node1").join("volume.img");
        assert_eq!(std::fs::metadata(&vol).unwrap().len(), 64 * MIB);
        let held = allocated(&vol);
        if reserved {
            assert!(held >= 64 * MIB, "{mode}: {held} bytes held");
        } else {
            assert!(held < MIB, "{mode}: {held} bytes held");
        }
    }
    // An existing sparse file an operator made is reserved, data kept.
    let dir = base.join("existing");
    std::fs::create_dir_all(&dir).unwrap();
    let vol = dir.join("mine.img");
    let f = std::fs::File::create(&vol).unwrap();
    f.set_len(64 * MIB).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"operator data", 5 * MIB).unwrap();
    drop(f);
    let cfg = config(&dir, Some(&vol), 0, "space");
    let (ok, err) = format(&cfg);
    assert!(ok, "{err}");
    assert!(allocated(&vol) >= 64 * MIB, "{}", allocated(&vol));
    let data = std::fs::read(&vol).unwrap();
    assert_eq!(&data[5 << 20..(5 << 20) + 13], b"operator data");
    let _ = std::fs::remove_dir_all(&base);
}

/// A tmpfs of `bytes` mounted on a new directory; unmounted on drop.
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(name: &str, bytes: u64) -> Option<SmallFs> {
        let dir = fresh_dir(name);
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(&dir)
            .output()
            .unwrap();
        if !out.status.success() {
            testskip::skip(format!(
                "cannot mount a tmpfs (needs root): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
            return None;
        }
        Some(SmallFs(dir))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn format_refuses_a_volume_its_filesystem_cannot_hold() {
    let Some(fs) = SmallFs::mount("volspace-small", 16 * MIB) else {
        return;
    };
    let dir = fresh_dir("volspace-refuse");
    let vol = fs.0.join("volume.img");
    let cfg = config(&dir, Some(&vol), 64 * MIB, "space");
    let (ok, err) = format(&cfg);
    assert!(!ok, "a 64 MiB volume on a 16 MiB filesystem was formatted");
    assert!(
        err.contains("cannot reserve") && err.contains("volume.preallocate = \"none\""),
        "{err}"
    );
    assert!(!vol.exists(), "the refused volume file stayed behind");
    assert!(
        !dir.join("node1").join("meta").exists(),
        "the node was formatted"
    );
    // Sparse, as asked: the same volume formats (and could fill up later).
    let cfg = config(&dir, Some(&vol), 64 * MIB, "none");
    let (ok, err) = format(&cfg);
    assert!(ok, "{err}");
    assert_eq!(std::fs::metadata(&vol).unwrap().len(), 64 * MIB);
    let _ = std::fs::remove_dir_all(&dir);
}
