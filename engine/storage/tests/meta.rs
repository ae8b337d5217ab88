//! Metadata store: round trips, slot alternation and torn writes.

mod common;

use common::TempDir;
use std::os::unix::fs::FileExt;
use storage::meta::{MetaError, MetaStore};

fn damage(path: &std::path::Path, offset: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&[0xde, 0xad, 0xbe, 0xef], offset).unwrap();
}

#[test]
fn write_and_reopen_returns_the_newest() {
    let dir = TempDir::new("meta");
    let path = dir.join("meta");
    drop(MetaStore::create(&path, 4096).unwrap());
    let (mut m2, state) = MetaStore::open(&path).unwrap();
    assert_eq!(state, None, "nothing written yet");
    for i in 0..5u8 {
        m2.write(&vec![i; 100 + i as usize]).unwrap();
    }
    drop(m2);
    let (mut m, state) = MetaStore::open(&path).unwrap();
    assert_eq!(state, Some(vec![4; 104]));
    m.write(b"").unwrap();
    drop(m);
    assert_eq!(MetaStore::open(&path).unwrap().1, Some(vec![]));
    assert!(
        MetaStore::create(&path, 4096).is_err(),
        "never overwrites a store"
    );
}

#[test]
fn torn_slot_falls_back_to_the_other() {
    let dir = TempDir::new("meta-torn");
    let path = dir.join("meta");
    let mut m = MetaStore::create(&path, 8192).unwrap();
    m.write(b"state one").unwrap(); // slot 0, seq 1
    m.write(b"state two").unwrap(); // slot 1, seq 2
    drop(m);
    // A torn write of slot 1 (say, state three) leaves state one readable.
    damage(&path, 8192 + 50);
    let (mut m, state) = MetaStore::open(&path).unwrap();
    assert_eq!(state.as_deref(), Some(&b"state one"[..]));
    // The next write goes to the damaged slot, keeping state one intact.
    m.write(b"state three").unwrap();
    drop(m);
    let (_, state) = MetaStore::open(&path).unwrap();
    assert_eq!(state.as_deref(), Some(&b"state three"[..]));
    // Damage the header of the newest slot: the older state comes back.
    damage(&path, 8192 + 24);
    assert_eq!(
        MetaStore::open(&path).unwrap().1.as_deref(),
        Some(&b"state one"[..])
    );
    // Both slots damaged: an error, not an empty state.
    damage(&path, 10);
    match MetaStore::open(&path) {
        Err(e @ MetaError::Corrupt { .. }) => assert!(e.to_string().contains("remirror")),
        other => panic!("expected Corrupt, got {:?}", other.map(|(_, s)| s)),
    }
}

#[test]
fn torn_first_write_reads_as_empty() {
    let dir = TempDir::new("meta-first");
    let path = dir.join("meta");
    let mut m = MetaStore::create(&path, 4096).unwrap();
    m.write(b"first").unwrap();
    drop(m);
    damage(&path, 48);
    assert_eq!(MetaStore::open(&path).unwrap().1, None);
}

#[test]
fn oversized_state_and_bad_files_are_refused() {
    let dir = TempDir::new("meta-size");
    let path = dir.join("meta");
    let mut m = MetaStore::create(&path, 4096).unwrap();
    assert_eq!(m.max_state_bytes(), 4096 - 48);
    m.write(&vec![1; 4096 - 48]).unwrap();
    let err = m.write(&vec![1; 4096 - 47]).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert_eq!(MetaStore::open(&path).unwrap().1, Some(vec![1; 4096 - 48]));
    assert!(MetaStore::create(&dir.join("x"), 1000).is_err());
    std::fs::write(dir.join("short"), [0u8; 100]).unwrap();
    assert!(matches!(
        MetaStore::open(&dir.join("short")),
        Err(MetaError::BadSize { .. })
    ));
}
