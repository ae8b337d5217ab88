//! The exported logical unit (LUN 0) and the I_T nexuses that reach it:
//! the volume, its limits and identifiers, reservations (persistent and
//! RESERVE(6)), pending unit attentions and the slow-path worker thread.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};

use volume::{Geometry, IoError, PathState, Volume, VolumeIdentity};

use crate::pr::{apply_out, PrState};
use crate::sense::{
    io_error_sense, Done, ScsiResult, Sense, KEY_ILLEGAL_REQUEST, SENSE_ALUA_CHANGED,
    SENSE_STANDBY, STATUS_GOOD,
};

pub(crate) type Job = Box<dyn FnOnce() + Send + 'static>;

/// One I_T nexus (an iSCSI session) as seen by the logical unit.
pub struct Nexus {
    pub id: u64,
    pub initiator: String,
    pub isid: [u8; 6],
    /// The path epoch this nexus last saw; a change raises a unit attention.
    pub seen_epoch: AtomicU64,
}

impl Nexus {
    /// The initiator port name (RFC 7143 §13.2.2 style): name + ",i,0x" + ISID.
    pub fn port_name(&self) -> String {
        let mut s = format!("{},i,0x", self.initiator);
        for b in self.isid {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }
}

/// The exported logical unit (LUN 0): the volume, reservations and pending
/// unit attentions.
pub struct Lun {
    pub vol: Arc<dyn Volume>,
    pub geo: Geometry,
    pub ident: VolumeIdentity,
    pub target_iqn: String,
    pub portal_group_tag: u16,
    /// Largest Data-Out/Data-In buffer of a single command.
    pub max_cmd_bytes: u32,
    /// Persistent reservations as last loaded from or stored to the volume
    /// (`pr()` reloads them after a path change).
    pr: Mutex<PrState>,
    /// The path epoch `pr` was loaded in.
    pr_epoch: AtomicU64,
    /// SPC-2 RESERVE(6) holder (nexus id).
    pub reserve6: Mutex<Option<u64>>,
    ua: Mutex<HashMap<u64, Vec<Sense>>>,
    slow: Mutex<mpsc::Sender<Job>>,
    /// Outcomes of recent EXTENDED COPY commands.
    pub copy_results: Mutex<Vec<CopyResult>>,
}

pub const MAX_UNMAP_BLOCKS: u32 = 1 << 20;
pub const MAX_UNMAP_DESCRIPTORS: u32 = 256;
pub const MAX_WRITE_SAME_BLOCKS: u64 = 1 << 22;
pub const MAX_COMPARE_WRITE_BLOCKS: u8 = 128;

impl Lun {
    pub fn new(vol: Arc<dyn Volume>, target_iqn: String, portal_group_tag: u16) -> Arc<Lun> {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("iscsi-slow".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            })
            .expect("spawn iscsi slow-path thread");
        let geo = vol.geometry();
        let ident = vol.identity();
        Arc::new(Lun {
            max_cmd_bytes: 32 << 20,
            geo,
            ident,
            vol,
            target_iqn,
            portal_group_tag,
            pr: Mutex::new(PrState::default()),
            pr_epoch: AtomicU64::new(u64::MAX),
            reserve6: Mutex::new(None),
            ua: Mutex::new(HashMap::new()),
            slow: Mutex::new(tx),
            copy_results: Mutex::new(Vec::new()),
        })
    }

    pub(crate) fn slow(&self, job: Job) {
        let _ = self.slow.lock().unwrap().send(job);
    }

    /// The persistent reservations. Loaded from the volume's replicated
    /// state when the LUN starts and again whenever the path state changed
    /// (a promote brings the state the old primary mirrored); on a standby
    /// port at every call, so it shows what the primary mirrored so far.
    pub fn pr(&self) -> std::sync::MutexGuard<'_, PrState> {
        let mut g = self.pr.lock().unwrap();
        let epoch = self.vol.path_epoch();
        if self.pr_epoch.swap(epoch, Ordering::AcqRel) != epoch || self.standby() {
            *g = match self.vol.persistent_state() {
                None => PrState::default(),
                Some(b) => PrState::decode(&b).unwrap_or_else(|e| {
                    log::error!(
                        "the volume's persistent reservation state does not decode ({e}); \
                         serving with none"
                    );
                    PrState::default()
                }),
            };
        }
        g
    }

    /// Stores the state a PERSISTENT RESERVE OUT made durable.
    pub(crate) fn pr_commit(&self, s: PrState) {
        let mut g = self.pr();
        *g = s;
    }

    /// Queues a unit attention for every nexus except `except`.
    pub fn ua_all(&self, s: Sense, nexuses: &[u64], except: Option<u64>) {
        let mut ua = self.ua.lock().unwrap();
        for &n in nexuses {
            if Some(n) != except {
                let q = ua.entry(n).or_default();
                if !q.contains(&s) && q.len() < 8 {
                    q.push(s);
                }
            }
        }
    }

    pub(crate) fn take_ua(&self, nx: &Nexus) -> Option<Sense> {
        let epoch = self.vol.path_epoch();
        if nx.seen_epoch.swap(epoch, Ordering::AcqRel) != epoch {
            return Some(SENSE_ALUA_CHANGED);
        }
        let mut ua = self.ua.lock().unwrap();
        let q = ua.get_mut(&nx.id)?;
        if q.is_empty() {
            None
        } else {
            Some(q.remove(0))
        }
    }

    /// Forgets a nexus that went away (its RESERVE(6) goes with it).
    pub fn nexus_gone(&self, id: u64) {
        self.ua.lock().unwrap().remove(&id);
        self.copy_results.lock().unwrap().retain(|r| r.nexus != id);
        let mut r = self.reserve6.lock().unwrap();
        if *r == Some(id) {
            *r = None;
        }
    }

    /// LUN reset / target reset: release RESERVE(6) and raise a unit
    /// attention on every nexus.
    pub fn reset(&self, nexuses: &[u64], s: Sense) {
        *self.reserve6.lock().unwrap() = None;
        self.ua_all(s, nexuses, None);
    }

    pub(crate) fn standby(&self) -> bool {
        self.vol.path_state() != PathState::Optimized
    }
}

/// Outcome of one EXTENDED COPY, for RECEIVE COPY RESULTS.
#[derive(Clone, Copy, Debug)]
pub struct CopyResult {
    /// Results belong to the I_T nexus that issued the copy.
    pub nexus: u64,
    pub list_id: u8,
    pub ok: bool,
    pub segments: u16,
    pub blocks: u64,
}

/// NAA type 6 (IEEE registered extended) identifier derived from the volume
/// uuid, the same on both nodes.
pub fn naa(uuid: &[u8; 16]) -> [u8; 16] {
    let mut n = *uuid;
    n[0] = 0x60 | (uuid[0] & 0x0f);
    n
}

/// Largest WRITE ATOMIC (16) in blocks: one volume request, never split.
pub fn max_atomic_blocks(lun: &Lun) -> u32 {
    (lun.vol.max_io_bytes() / lun.geo.block_size).min(lun.max_cmd_bytes / lun.geo.block_size)
}

/// Logical blocks per physical block exponent: 512-byte logical blocks sit
/// on 4 KiB physical blocks on every backend we target.
pub fn lbppbe(block_size: u32) -> u8 {
    if block_size == 512 {
        3
    } else {
        0
    }
}

/// PERSISTENT RESERVE OUT: runs on the logical unit's slow-path thread
/// (one at a time), and answers once a change is durable and mirrored.
pub fn pr_out(lun: &Arc<Lun>, nx: &Nexus, cdb: &[u8], data: &[u8], done: Done) {
    let (l, port, cdb, data) = (lun.clone(), nx.port_name(), cdb.to_vec(), data.to_vec());
    lun.slow(Box::new(move || done(pr_out_now(&l, port, &cdb, &data))));
}

fn pr_out_now(lun: &Lun, port: String, cdb: &[u8], data: &[u8]) -> ScsiResult {
    if lun.standby() {
        // The backup cannot originate a mirrored change; the primary's
        // port takes it (docs/iscsi.md).
        return ScsiResult::check(SENSE_STANDBY);
    }
    let current = lun.pr().clone();
    let mut next = current.clone();
    let r = apply_out(&mut next, port, cdb, data);
    if r.status != STATUS_GOOD || next == current {
        return r;
    }
    let blob = next.encode();
    if blob.len() > lun.vol.max_state_bytes() {
        // INSUFFICIENT REGISTRATION RESOURCES.
        return ScsiResult::check(Sense::new(KEY_ILLEGAL_REQUEST, 0x55, 0x04));
    }
    match put_wait(&*lun.vol, blob) {
        Ok(()) => {
            lun.pr_commit(next);
            r
        }
        Err(e) => {
            log::warn!("PERSISTENT RESERVE OUT not applied: the state update failed: {e}");
            ScsiResult::check(io_error_sense(e, true))
        }
    }
}

/// `put_persistent_state` and wait for it.
fn put_wait(vol: &dyn Volume, blob: Vec<u8>) -> Result<(), IoError> {
    let slot = Arc::new((Mutex::new(None), Condvar::new()));
    let s2 = slot.clone();
    vol.put_persistent_state(
        blob,
        Box::new(move |r| {
            *s2.0.lock().unwrap() = Some(r);
            s2.1.notify_one();
        }),
    );
    let mut g = slot.0.lock().unwrap();
    loop {
        if let Some(r) = g.take() {
            return r.map(|_| ());
        }
        g = slot.1.wait(g).unwrap();
    }
}
