//! Volume errors become SCSI sense in one place (`scsi::io_error_sense`).

mod common;

use common::*;
use std::sync::{Arc, Mutex};
use volume::{
    Completion, Geometry, IoError, MemVolume, PathState, Volume, VolumeIdentity, VolumeOp,
};

/// A MemVolume whose next requests fail with a chosen error.
struct FailingVolume {
    inner: MemVolume,
    fail: Mutex<Option<IoError>>,
}

impl Volume for FailingVolume {
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }
    fn identity(&self) -> VolumeIdentity {
        self.inner.identity()
    }
    fn path_state(&self) -> PathState {
        self.inner.path_state()
    }
    fn path_epoch(&self) -> u64 {
        self.inner.path_epoch()
    }
    fn max_io_bytes(&self) -> u32 {
        self.inner.max_io_bytes()
    }
    fn submit(&self, op: VolumeOp, done: Completion) {
        match *self.fail.lock().unwrap() {
            Some(e) => done(Err(e)),
            None => self.inner.submit(op, done),
        }
    }
}

#[test]
fn volume_errors_map_to_sense() {
    let vol = Arc::new(FailingVolume {
        inner: MemVolume::new(512, 1024),
        fail: Mutex::new(None),
    });
    let cfg = iscsi_target::IscsiConfig::new("127.0.0.1:0".parse().unwrap(), IQN);
    let t = iscsi_target::start(cfg, vol.clone()).unwrap();
    let mut i = Initiator::connect(t.local_addr());
    i.login(&[]);
    let cases = [
        (IoError::Io(5), (3, 0x0c, 0x00), (3, 0x11, 0x00)),
        (IoError::NotPrimary, (2, 0x04, 0x0b), (2, 0x04, 0x0b)),
        (IoError::Unavailable, (2, 0x04, 0x00), (2, 0x04, 0x00)),
        (IoError::OutOfRange, (5, 0x21, 0x00), (5, 0x21, 0x00)),
    ];
    for (err, on_write, on_read) in cases {
        *vol.fail.lock().unwrap() = Some(err);
        assert_eq!(
            i.write10(0, &[1; 512]).key_asc(),
            on_write,
            "{err:?} on write"
        );
        assert_eq!(i.read10(0, 1).key_asc(), on_read, "{err:?} on read");
    }
    *vol.fail.lock().unwrap() = None;
    assert_eq!(i.read10(0, 1).status, 0);
    t.shutdown();
}
