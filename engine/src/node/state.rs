//! The replicated state blob on a running node (`Volume::persistent_state`,
//! `Volume::put_persistent_state`).
//!
//! Mirrored: an update goes from the front-end's thread to the reactor
//! through its own small queue (like operator commands) and into the core as
//! a `ReqKind::State` REQ (`core/state.rs`); it completes like a write. The
//! blob the front-ends read is published by the reactor whenever the core's
//! changes, and before the path turns optimized, so a front-end that reloads
//! its state when the path changes sees what the promotion executed.
//!
//! Standalone (no peer, no ring): the blob lives in `data_dir/state`,
//! replaced atomically (write, fsync, rename, fsync of the directory) on the
//! caller's thread.

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use volume::{Completion, IoError};

use super::{PendingHost, Reactor};
use crate::core::Role;
use storage::Backend;

pub(super) struct StateOp {
    blob: Vec<u8>,
    done: Completion,
    start: Instant,
}

/// The state blob as the front-ends see it, and the updates on their way
/// to the reactor.
pub(super) struct SharedState {
    published: Mutex<Option<Vec<u8>>>,
    ops: Mutex<VecDeque<StateOp>>,
    max_bytes: usize,
    /// Standalone: the file that holds the blob.
    file: Option<PathBuf>,
}

/// The standalone node's state file.
pub fn state_file(data_dir: &Path) -> PathBuf {
    data_dir.join("state")
}

impl SharedState {
    pub(super) fn mirrored(initial: Option<Vec<u8>>, max_bytes: usize) -> Self {
        SharedState {
            published: Mutex::new(initial),
            ops: Mutex::new(VecDeque::new()),
            max_bytes,
            file: None,
        }
    }

    pub(super) fn standalone(data_dir: &Path) -> Result<Self, String> {
        let file = state_file(data_dir);
        let initial = match std::fs::read(&file) {
            Ok(b) => Some(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(format!("cannot read {}: {e}", file.display())),
        };
        Ok(SharedState {
            published: Mutex::new(initial),
            ops: Mutex::new(VecDeque::new()),
            max_bytes: volume::MAX_STATE_BYTES,
            file: Some(file),
        })
    }

    pub(super) fn get(&self) -> Option<Vec<u8>> {
        self.published.lock().unwrap().clone()
    }

    pub(super) fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Queues an update for the reactor; false when it is handled here
    /// (standalone) or refused.
    pub(super) fn put(&self, blob: Vec<u8>, done: Completion) -> bool {
        if blob.len() > self.max_bytes {
            done(Err(IoError::TooLarge));
            return false;
        }
        if let Some(f) = &self.file {
            let mut g = self.published.lock().unwrap();
            match write_atomically(f, &blob) {
                Ok(()) => {
                    *g = Some(blob);
                    drop(g);
                    done(Ok(storage::AlignedBuf::empty()))
                }
                Err(e) => {
                    drop(g);
                    log::error!("cannot write {}: {e}", f.display());
                    done(Err(IoError::Io(e.raw_os_error().unwrap_or(libc::EIO))))
                }
            }
            return false;
        }
        self.ops.lock().unwrap().push_back(StateOp {
            blob,
            done,
            start: Instant::now(),
        });
        true
    }

    /// Fails every queued update (the node stops).
    pub(super) fn fail_all(&self) {
        let ops: Vec<_> = self.ops.lock().unwrap().drain(..).collect();
        for op in ops {
            (op.done)(Err(IoError::Unavailable));
        }
    }
}

fn write_atomically(path: &Path, blob: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("new");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(blob)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

impl<B: Backend> Reactor<B> {
    /// Hands queued state updates to the core (as State REQs).
    pub(super) fn take_state_ops(&mut self) -> bool {
        let ops: Vec<StateOp> = {
            let mut q = self.shared.state.ops.lock().unwrap();
            if q.is_empty() {
                return false;
            }
            q.drain(..).collect()
        };
        for op in ops {
            if self.core.role() != Role::Primary || !self.core.is_serving() {
                let e = if self.core.failed().is_some() {
                    IoError::Unavailable
                } else {
                    IoError::NotPrimary
                };
                (op.done)(Err(e));
                continue;
            }
            let id = self.host_slot(PendingHost {
                done: Some(op.done),
                bytes: 0,
                start: op.start,
                is_write: false,
            });
            self.core.host_put_state(id as u64, &op.blob);
        }
        true
    }

    /// Publishes the core's blob when it changed.
    pub(super) fn publish_state(&mut self) {
        let changes = self.core.state_changes();
        if changes == self.state_published {
            return;
        }
        self.state_published = changes;
        let blob = self.core.persistent_state().1.map(<[u8]>::to_vec);
        *self.shared.state.published.lock().unwrap() = blob;
    }
}
