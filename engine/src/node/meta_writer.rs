//! The metadata writer thread.

use super::*;

/// Writes the node metadata (two-slot store, fdatasync) on its own thread,
/// so that a slow fdatasync (hundreds of ms after a large burst of writes
/// on this VM) never holds the reactor: host I/O and heartbeats go on while
/// the core waits for `MetaPersisted`. The core keeps at most one write in
/// flight, so completions arrive in order.
/// Finished metadata writes: (version, result).
pub(super) type MetaDone = Arc<Mutex<VecDeque<(u64, Result<(), String>)>>>;

pub(super) struct MetaWriter {
    tx: Option<std::sync::mpsc::Sender<(u64, Vec<u8>)>>,
    done: MetaDone,
    thread: Option<JoinHandle<()>>,
}

impl MetaWriter {
    pub(super) fn start(mut store: MetaStore, shared: Arc<Shared>) -> MetaWriter {
        let (tx, rx) = std::sync::mpsc::channel::<(u64, Vec<u8>)>();
        let done: MetaDone = Arc::new(Mutex::new(VecDeque::new()));
        let d = done.clone();
        let thread = std::thread::Builder::new()
            .name("dm-meta".into())
            .spawn(move || {
                while let Ok((version, bytes)) = rx.recv() {
                    let r =
                        timed("metadata write", || store.write(&bytes)).map_err(|e| e.to_string());
                    d.lock().unwrap().push_back((version, r));
                    shared.wake.notify();
                }
            })
            .expect("spawn the metadata writer thread");
        MetaWriter {
            tx: Some(tx),
            done,
            thread: Some(thread),
        }
    }

    pub(super) fn write(&mut self, version: u64, bytes: Vec<u8>) {
        if let Some(tx) = &self.tx {
            let _ = tx.send((version, bytes));
        }
    }

    pub(super) fn completed(&mut self) -> Option<(u64, Result<(), String>)> {
        self.done.lock().unwrap().pop_front()
    }
}

impl Drop for MetaWriter {
    fn drop(&mut self) {
        // Finish the write in flight, if any, then stop.
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
