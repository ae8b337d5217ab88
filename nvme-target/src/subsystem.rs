//! The state every queue of a target shares: its configuration, the
//! volume, and the controllers (one per host association) with their
//! keep-alive timers and ANA change notices.

use crate::queue_io::QueueIo;
use crate::spec::*;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use volume::{Geometry, Volume, VolumeIdentity};

/// A port listed in the discovery log page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveryPort {
    pub addr: SocketAddr,
    pub port_id: u16,
}

/// Target configuration. Build with [`NvmeConfig::new`] and adjust fields.
#[derive(Clone, Debug)]
pub struct NvmeConfig {
    pub listen: SocketAddr,
    pub subnqn: String,
    /// Host NQNs allowed to connect to the NVM subsystem; empty = any host.
    pub allowed_hosts: Vec<String>,
    /// This port's id (discovery log PORTID).
    pub port_id: u16,
    /// ANA group of the namespace (non-zero).
    pub ana_group_id: u32,
    /// Both nodes' ports, listed by the discovery log page. Empty = this port only.
    pub discovery_ports: Vec<DiscoveryPort>,
    /// I/O queues per controller.
    pub max_queues: u16,
    /// Entries per I/O queue (CAP.MQES + 1).
    pub max_queue_depth: u16,
    /// In-capsule data accepted on I/O queues (IOCCSZ).
    pub in_capsule_data_bytes: u32,
    /// Maximum data transfer size (MDTS), a power of two >= 4096.
    pub mdts_bytes: u32,
    /// Largest keep-alive timeout a host may ask for.
    pub keep_alive_max_ms: u32,
    /// Write data of at least this many bytes per PDU is received straight
    /// into its buffer, smaller data in bulk and copied
    /// ([`netreactor::RxMode`]; 0: all zero-copy).
    pub zero_copy_receive_min_bytes: usize,
}

impl NvmeConfig {
    pub fn new(listen: SocketAddr, subnqn: impl Into<String>) -> Self {
        NvmeConfig {
            listen,
            subnqn: subnqn.into(),
            allowed_hosts: Vec::new(),
            port_id: 1,
            ana_group_id: 1,
            discovery_ports: Vec::new(),
            max_queues: 8,
            max_queue_depth: 128,
            in_capsule_data_bytes: 8192,
            mdts_bytes: 1 << 20,
            keep_alive_max_ms: 120_000,
            zero_copy_receive_min_bytes: netreactor::DEFAULT_ZERO_COPY_RECEIVE_MIN_BYTES,
        }
    }

    fn validate(&self) -> io::Result<()> {
        let bad = |m: String| Err(io::Error::new(io::ErrorKind::InvalidInput, m));
        if self.subnqn.is_empty() || self.subnqn.len() > 223 || self.subnqn == DISCOVERY_NQN {
            return bad(format!(
                "nvme: subnqn {:?} must be 1..=223 bytes and not the discovery NQN",
                self.subnqn
            ));
        }
        if !self.mdts_bytes.is_power_of_two() || self.mdts_bytes < 4096 {
            return bad(format!(
                "nvme: mdts_bytes {} must be a power of two >= 4096",
                self.mdts_bytes
            ));
        }
        if self.max_queue_depth < 2 || self.max_queues == 0 || self.ana_group_id == 0 {
            return bad(
                "nvme: max_queue_depth must be >= 2, max_queues >= 1, ana_group_id >= 1".into(),
            );
        }
        if !self.in_capsule_data_bytes.is_multiple_of(16) {
            return bad(format!(
                "nvme: in_capsule_data_bytes {} must be a multiple of 16",
                self.in_capsule_data_bytes
            ));
        }
        Ok(())
    }
}

/// Per-controller state, guarded by the controller's lock.
pub struct CtrlState {
    pub cc: u32,
    pub csts: u32,
    pub kato_ms: u32,
    pub last_keep_alive: Instant,
    pub aen_cfg: u32,
    /// Outstanding Asynchronous Event Request CIDs.
    pub aers: Vec<u16>,
    /// An ANA AEN was sent and the host has not yet read the ANA log.
    pub ana_masked: bool,
    /// Path epoch the host last learned (by AEN or by reading the ANA log).
    pub ana_notified_epoch: u64,
    pub admin: Arc<QueueIo>,
    pub io_queues: HashMap<u16, Arc<QueueIo>>,
    pub nr_io_queues: u16,
    pub dead: bool,
}

/// A controller: the association of one host's admin queue and I/O queues.
pub struct Ctrl {
    pub cntlid: u16,
    pub discovery: bool,
    pub hostnqn: String,
    pub hostid: [u8; 16],
    pub st: Mutex<CtrlState>,
}

/// State shared by every queue of a target.
pub struct Shared {
    pub cfg: NvmeConfig,
    pub vol: Arc<dyn Volume>,
    pub geometry: Geometry,
    pub identity: VolumeIdentity,
    /// Effective MDTS: the config limited by the volume's largest request.
    pub mdts_bytes: u32,
    /// MAXH2CDATA announced in ICResp.
    pub max_h2c_data: u32,
    /// In-capsule data accepted on I/O queues: the config, at most MDTS.
    pub icd_bytes: u32,
    pub local_addr: SocketAddr,
    /// Write payload bytes copied in user space on their way to the volume
    /// (received with a PDU into a connection's buffer instead of straight
    /// into the write's buffer), over all queues.
    pub payload_copied: Arc<AtomicU64>,
    ctrls: Mutex<HashMap<u16, Arc<Ctrl>>>,
    next_cntlid: Mutex<u16>,
    last_epoch: AtomicU64,
}

impl Shared {
    pub fn new(
        cfg: NvmeConfig,
        vol: Arc<dyn Volume>,
        local_addr: SocketAddr,
    ) -> io::Result<Arc<Shared>> {
        cfg.validate()?;
        let mut mdts_bytes = cfg.mdts_bytes;
        while mdts_bytes > vol.max_io_bytes() && mdts_bytes > 4096 {
            mdts_bytes /= 2;
        }
        Ok(Arc::new(Shared {
            geometry: vol.geometry(),
            identity: vol.identity(),
            mdts_bytes,
            max_h2c_data: mdts_bytes,
            icd_bytes: cfg.in_capsule_data_bytes.min(mdts_bytes),
            local_addr,
            payload_copied: Arc::new(AtomicU64::new(0)),
            ctrls: Mutex::new(HashMap::new()),
            next_cntlid: Mutex::new(1),
            last_epoch: AtomicU64::new(vol.path_epoch()),
            cfg,
            vol,
        }))
    }

    pub fn host_allowed(&self, hostnqn: &str) -> bool {
        self.cfg.allowed_hosts.is_empty() || self.cfg.allowed_hosts.iter().any(|h| h == hostnqn)
    }

    /// CAP: MQES, CQR, timeout 7.5 s, NVM command set, 4 KiB pages.
    pub fn cap(&self) -> u64 {
        (self.cfg.max_queue_depth as u64 - 1) | (1 << 16) | (15 << 24) | (1 << 37)
    }

    /// Controller IDs are unique across both nodes of a pair (a multipath
    /// host refuses duplicates within a subsystem): node 1 hands out
    /// 0x0001..=0x7FEF, node 2 0x8001..=0xFFEF.
    pub fn new_controller(
        &self,
        discovery: bool,
        hostnqn: String,
        hostid: [u8; 16],
        kato_ms: u32,
        admin: Arc<QueueIo>,
    ) -> Option<Arc<Ctrl>> {
        let base: u16 = if self.identity.node_index == 2 {
            0x8000
        } else {
            0
        };
        let mut ctrls = self.ctrls.lock().unwrap();
        let mut next = self.next_cntlid.lock().unwrap();
        for _ in 0..0x7FEF {
            let id = base + *next;
            *next = if *next >= 0x7FEF { 1 } else { *next + 1 };
            if ctrls.contains_key(&id) {
                continue;
            }
            let ctrl = Arc::new(Ctrl {
                cntlid: id,
                discovery,
                hostnqn,
                hostid,
                st: Mutex::new(CtrlState {
                    cc: 0,
                    csts: 0,
                    kato_ms,
                    last_keep_alive: Instant::now(),
                    aen_cfg: 0,
                    aers: Vec::new(),
                    ana_masked: false,
                    ana_notified_epoch: self.vol.path_epoch(),
                    admin,
                    io_queues: HashMap::new(),
                    nr_io_queues: self.cfg.max_queues,
                    dead: false,
                }),
            });
            ctrls.insert(id, ctrl.clone());
            return Some(ctrl);
        }
        None
    }

    pub fn controller(&self, cntlid: u16) -> Option<Arc<Ctrl>> {
        self.ctrls.lock().unwrap().get(&cntlid).cloned()
    }

    /// Ends a controller: its queues' connections are closed.
    pub fn remove_controller(&self, ctrl: &Ctrl) {
        self.ctrls.lock().unwrap().remove(&ctrl.cntlid);
        let mut st = ctrl.st.lock().unwrap();
        st.dead = true;
        st.aers.clear();
        st.admin.close();
        for (_, q) in st.io_queues.drain() {
            q.close();
        }
    }

    fn all_controllers(&self) -> Vec<Arc<Ctrl>> {
        self.ctrls.lock().unwrap().values().cloned().collect()
    }

    /// Sends an ANA change notice if the path epoch moved past what the
    /// host knows, the host enabled the notice, the notice is not masked
    /// (awaiting an ANA log read) and an AER is outstanding.
    pub fn maybe_send_ana_aen(&self, ctrl: &Ctrl) {
        if ctrl.discovery {
            return;
        }
        let epoch = self.vol.path_epoch();
        let mut st = ctrl.st.lock().unwrap();
        if st.dead
            || st.aen_cfg & AEN_ANA_CHANGE == 0
            || st.ana_masked
            || epoch == st.ana_notified_epoch
        {
            return;
        }
        if let Some(cid) = st.aers.pop() {
            st.ana_masked = true;
            st.ana_notified_epoch = epoch;
            let admin = st.admin.clone();
            drop(st);
            log::info!(
                "nvme-tcp: ANA change notice to controller {:#x} (epoch {epoch})",
                ctrl.cntlid
            );
            admin.complete(cid, Status::SUCCESS, AER_ANA_CHANGE_DW0 as u64, &[]);
        }
    }

    /// Notices a path-state change (cheap when nothing changed).
    pub fn poll_path_epoch(&self) {
        let epoch = self.vol.path_epoch();
        // Load first: queues on several threads call this per command, and
        // only a change needs the (cache line bouncing) swap.
        if self.last_epoch.load(Ordering::Acquire) != epoch
            && self.last_epoch.swap(epoch, Ordering::AcqRel) != epoch
        {
            for c in self.all_controllers() {
                self.maybe_send_ana_aen(&c);
            }
        }
    }

    /// Ends controllers whose keep-alive timer expired.
    pub fn expire_keep_alive(&self, now: Instant) {
        for c in self.all_controllers() {
            let expired = {
                let st = c.st.lock().unwrap();
                st.kato_ms > 0
                    && now.duration_since(st.last_keep_alive)
                        > Duration::from_millis(st.kato_ms as u64)
            };
            if expired {
                log::warn!(
                    "nvme-tcp: keep-alive timeout, controller {:#x} (host {}) ended",
                    c.cntlid,
                    c.hostnqn
                );
                self.remove_controller(&c);
            }
        }
    }

    /// Number of live controllers (status / tests).
    pub fn controller_count(&self) -> usize {
        self.ctrls.lock().unwrap().len()
    }
}
