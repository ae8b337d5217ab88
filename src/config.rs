//! Node configuration: one TOML file per node, loaded and checked once at
//! start-up.
//!
//! Every limit is explicit and carries its unit last in its name
//! (`ring.size_bytes`, `link.peer_timeout_ms`). `validate` collects every
//! problem in one pass, and each message names the field, says what is wrong
//! and shows a value that would be accepted, so an operator fixes a file in
//! one edit rather than one restart per mistake.
//!
//! Relative paths in a loaded file (`node.data_dir`, `volume.path`,
//! `link.psk_file`) are taken relative to the directory of that file.

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// Smallest accepted persistent ring.
pub const MIN_RING_SIZE_BYTES: u64 = 16 * MIB;
/// Room a link message needs beyond its batch payload (message and entry
/// headers): `link.max_message_bytes >= mirror.max_batch_bytes + this`.
pub const MESSAGE_HEADROOM_BYTES: u64 = 64 * KIB;
/// Shortest PSK accepted, in bytes (file) or characters (inline).
pub const MIN_PSK_BYTES: usize = 16;

/// A node's full configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    pub volume: VolumeConfig,
    pub ring: RingConfig,
    #[serde(default)]
    pub mirror: MirrorConfig,
    pub link: LinkConfig,
    #[serde(default)]
    pub reactor: ReactorConfig,
    pub admin: AdminConfig,
    #[serde(default)]
    pub nbd: NbdConfig,
    #[serde(default)]
    pub nvme: NvmeConfig,
    #[serde(default)]
    pub iscsi: IscsiConfig,
    #[serde(default, skip_serializing_if = "FailoverConfig::is_manual_default")]
    pub failover: FailoverConfig,
    /// Deprecated keys the file used (each accepted under its new name):
    /// what to rename, logged at start-up.
    #[serde(skip)]
    pub deprecations: Vec<String>,
}

/// How the pair fails over: by an operator (`manual`) or by itself through
/// an etcd lease (`etcd`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailoverMode {
    #[default]
    Manual,
    Etcd,
}

/// `[failover]`: automatic failover with an etcd lease (issue 12). Both
/// nodes of a pair must have the same section (checked at the handshake).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailoverConfig {
    pub mode: FailoverMode,
    /// etcd client URLs, `http://host:port`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub etcd_endpoints: Vec<String>,
    /// Prefix of the pair's keys in etcd (default `/deltamirror/<volume uuid>`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_prefix: Option<String>,
    /// The primary's lease, whole seconds (etcd counts leases in seconds).
    pub lease_ttl_ms: u64,
    /// How long writes wait for the backup's stale mark to be recorded in
    /// etcd before they fail with a retryable error.
    pub stale_mark_timeout_ms: u64,
}

/// Bounds of `failover.lease_ttl_ms`.
pub const MIN_LEASE_TTL_MS: u64 = 1_000;
pub const MAX_LEASE_TTL_MS: u64 = 60_000;

impl Default for FailoverConfig {
    fn default() -> Self {
        FailoverConfig {
            mode: FailoverMode::Manual,
            etcd_endpoints: Vec::new(),
            key_prefix: None,
            lease_ttl_ms: 3_000,
            stale_mark_timeout_ms: 5_000,
        }
    }
}

impl FailoverConfig {
    fn is_manual_default(&self) -> bool {
        *self == FailoverConfig::default()
    }
}

/// The role a node is formatted with. After `format` the persisted role
/// rules; this one is never read again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Backup,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// 1 or 2; the two nodes of a pair must differ.
    pub id: u32,
    pub name: String,
    /// Used by `deltamirror format` only.
    pub initial_role: Role,
    /// Holds the ring and meta files.
    pub data_dir: PathBuf,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    /// A regular file or a block device.
    pub path: PathBuf,
    /// For a file: created sparse at this size if missing. 0 = use the size
    /// of the existing file or device.
    pub size_bytes: u64,
    /// 512 or 4096.
    pub block_size_bytes: u32,
    /// 32 hex digits (dashes allowed); the same on both nodes.
    pub uuid: String,
    /// At most 20 printable ASCII characters (NVMe SN, SCSI unit serial).
    pub serial: String,
    /// At most 16 printable ASCII characters (SCSI product id, NVMe MN).
    pub model: String,
    /// How a file volume takes its space (a block device: ignored).
    #[serde(default)]
    pub preallocate: Preallocate,
}

/// How `format` takes a file volume's space, and whether a discard gives it
/// back ([`storage::backend::Preallocate`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preallocate {
    /// Sparse: space is taken as blocks are first written, and a discard
    /// punches it out again; a write can fail once the filesystem is full.
    None,
    /// Every block reserved at `format` (also an existing file's holes),
    /// and kept through discards: no write fails for want of space.
    #[default]
    Space,
    /// As `space`, and the file `format` creates is written with zeroes:
    /// no first write to a block pays for allocating or converting it.
    Full,
}

impl Preallocate {
    pub fn storage(self) -> storage::backend::Preallocate {
        match self {
            Preallocate::None => storage::backend::Preallocate::None,
            Preallocate::Space => storage::backend::Preallocate::Space,
            Preallocate::Full => storage::backend::Preallocate::Full,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RingConfig {
    /// Persistent ring (delay buffer + delta queue) size.
    pub size_bytes: u64,
    /// The ring file; default `<node.data_dir>/ring`. A regular file on any
    /// local filesystem, or a block device of its own (a raw device or
    /// partition: no filesystem, so no inode update per ring write): put it
    /// on a device whose flush is cheap (a power-loss-protected SSD,
    /// persistent memory) and every write's ring flush gets cheaper.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
}

/// How delta-queue entries are confirmed executed on the peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConfirmMode {
    /// ACK2/ACK3 watermarks.
    Ack,
    /// Dropped `confirm_timeout_ms` after ACK1 while heartbeats show the peer
    /// alive with the same incarnation.
    Timeout,
}

/// When the backup sends ACK1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ack1Mode {
    /// After the backup's ring range is flushed (survives losing both nodes).
    Persisted,
    /// On receipt (lower latency).
    Received,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MirrorConfig {
    pub confirm: ConfirmMode,
    /// Only used with `confirm = "timeout"`.
    pub confirm_timeout_ms: u64,
    pub ack1: Ack1Mode,
    pub dirty_granularity_bytes: u64,
    /// Most entries sent to the backup and not yet acknowledged (ACK1): the
    /// send window. Formerly `max_batch_entries` (still accepted, with a
    /// deprecation warning).
    pub max_unacked_entries: u32,
    pub max_batch_bytes: u64,
    /// 0 = unlimited.
    pub max_replay_bytes_per_sec: u64,
    /// Replay never drops below this rate, however busy the host I/O is:
    /// while it would, new host writes wait.
    pub min_replay_bytes_per_sec: u64,
    /// One cumulative ACK per reactor pass (true) or one ACK per REQ (false,
    /// only to measure what coalescing saves).
    pub coalesce_acks: bool,
}

impl Default for MirrorConfig {
    fn default() -> Self {
        MirrorConfig {
            confirm: ConfirmMode::Ack,
            confirm_timeout_ms: 5_000,
            ack1: Ack1Mode::Persisted,
            dirty_granularity_bytes: 4 * KIB,
            max_unacked_entries: 256,
            max_batch_bytes: 4 * MIB,
            max_replay_bytes_per_sec: 0,
            min_replay_bytes_per_sec: 16 * MIB,
            coalesce_acks: true,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkConfig {
    pub listen: SocketAddr,
    pub peer: SocketAddr,
    /// Exactly one of `psk_file` and `psk`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psk_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub psk: Option<String>,
    #[serde(default = "default_heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
    #[serde(default = "default_peer_timeout_ms")]
    pub peer_timeout_ms: u64,
    #[serde(default = "default_connect_retry_ms")]
    pub connect_retry_ms: u64,
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: u64,
    /// What carries the frames: the TCP socket or libfabric.
    #[serde(default)]
    pub transport: LinkTransportKind,
    /// libfabric provider with `transport = "fabric"`: "verbs" (RoCE,
    /// InfiniBand) or "tcp" (any network; tests).
    #[serde(default = "default_fabric_provider")]
    pub fabric_provider: String,
    /// Bytes of the landing ring (and of the staging ring) with `transport =
    /// "fabric"`: locked memory, twice this per node.
    #[serde(default = "default_fabric_ring_bytes")]
    pub fabric_ring_bytes: u64,
    /// The fabric port node 2 listens on (node 1 learns it in the
    /// handshake); absent: link.listen's port + 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fabric_port: Option<u16>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinkTransportKind {
    /// Frames over the authenticated TCP socket.
    #[default]
    Tcp,
    /// One-sided RDMA writes into the peer's landing ring (libfabric).
    Fabric,
}

impl LinkConfig {
    /// The port node 2 listens on for the fabric connection.
    pub fn fabric_listen(&self) -> Option<SocketAddr> {
        let port = match self.fabric_port {
            Some(p) => p,
            None => self.listen.port().checked_add(1)?,
        };
        Some(SocketAddr::new(self.listen.ip(), port))
    }
}

fn default_fabric_provider() -> String {
    "tcp".to_string()
}
fn default_fabric_ring_bytes() -> u64 {
    16 * MIB
}

fn default_heartbeat_interval_ms() -> u64 {
    100
}
fn default_peer_timeout_ms() -> u64 {
    1_000
}
fn default_connect_retry_ms() -> u64 {
    500
}
fn default_max_message_bytes() -> u64 {
    8 * MIB
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PollMode {
    /// Poll `adaptive_spin_us` after the last work, yielding the core to
    /// any other ready thread between passes, then sleep until work arrives.
    Adaptive,
    /// Spin forever: lowest latency, one core busy per reactor.
    Busy,
}

/// `reactor.disk_handover`: when queued disk operations go to the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskHandOver {
    /// Whichever of the two completes more operations per second,
    /// measured as the node runs (storage::backend::handover).
    Adaptive,
    /// Each operation as it is queued.
    AtOnce,
    /// Eight at a time, the rest at the end of the reactor's pass (or
    /// after `disk_submit_hold_us`).
    InChunks,
}

impl DiskHandOver {
    pub fn policy(self) -> storage::backend::HandOverPolicy {
        use storage::backend::{HandOver, HandOverPolicy};
        match self {
            DiskHandOver::Adaptive => HandOverPolicy::Adaptive,
            DiskHandOver::AtOnce => HandOverPolicy::Fixed(HandOver::AtOnce),
            DiskHandOver::InChunks => HandOverPolicy::Fixed(HandOver::InChunks),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReactorConfig {
    /// CPU ids, one pinned reactor thread each.
    pub cores: Vec<usize>,
    pub poll_mode: PollMode,
    pub adaptive_spin_us: u64,
    /// How long a reactor may hold back a few queued disk operations while
    /// the disk works on earlier ones, so that more join them under one
    /// device notification (a VM exit on a virtual disk). Never for
    /// flushes, durable ring writes or FUA writes, nor when the disk has
    /// nothing in flight (QD1 is not delayed). 0 = off; at most 1000.
    /// Only while operations go in chunks (`disk_handover`).
    pub disk_submit_hold_us: u32,
    /// Whether queued disk operations go to the kernel one at a time (the
    /// disk starts sooner) or in chunks (fewer system calls and device
    /// notifications): "adaptive" (default) measures which completes more
    /// and uses it; "at-once" or "in-chunks" fixes it.
    pub disk_handover: DiskHandOver,
    /// Outstanding host I/Os per reactor, 1..=4096.
    pub queue_depth: u32,
    /// Largest single host I/O accepted (the pool's largest buffer).
    pub max_io_bytes: u64,
    /// MiB of block-aligned buffers write payloads are received into (one
    /// pool per node, registered with the disk's io_uring): 8 to 1024 and
    /// at least 8 × max_io_bytes. An empty pool is back-pressure: the
    /// front-ends stop reading until writes complete.
    pub buffer_pool_mib: u64,
    /// Front-ends receive a write's data straight into its pool buffer when
    /// a PDU carries at least this many bytes of it (one receive per
    /// write); smaller data is received in bulk with the requests around
    /// it and copied once (a memcpy costs less than a receive). 0: every
    /// write zero-copy. At most 1 MiB.
    pub zero_copy_receive_min_bytes: u64,
}

impl Default for ReactorConfig {
    fn default() -> Self {
        ReactorConfig {
            cores: vec![0],
            poll_mode: PollMode::Adaptive,
            adaptive_spin_us: netreactor::DEFAULT_ADAPTIVE_SPIN_US,
            disk_submit_hold_us: storage::backend::DEFAULT_SUBMIT_HOLD_US,
            disk_handover: DiskHandOver::Adaptive,
            queue_depth: 128,
            max_io_bytes: MIB,
            buffer_pool_mib: 64,
            zero_copy_receive_min_bytes: netreactor::DEFAULT_ZERO_COPY_RECEIVE_MIN_BYTES as u64,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NbdConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    pub export_name: String,
}

impl Default for NbdConfig {
    fn default() -> Self {
        NbdConfig {
            enabled: false,
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 10809),
            export_name: "deltamirror".to_string(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NvmeConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    pub subnqn: String,
    /// Host NQNs allowed to connect; empty = any host.
    pub allowed_hosts: Vec<String>,
    /// NVMe-oF port id (discovery log PORTID, ANA reporting).
    pub port_id: u16,
    /// The peer node's NVMe/TCP address, listed by the discovery log page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_listen: Option<SocketAddr>,
    /// The peer node's port id.
    pub peer_port_id: u16,
}

impl Default for NvmeConfig {
    fn default() -> Self {
        NvmeConfig {
            enabled: false,
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 4420),
            subnqn: "nqn.2026-11.io.deltamirror:vol0".to_string(),
            allowed_hosts: Vec::new(),
            port_id: 1,
            peer_listen: None,
            peer_port_id: 2,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IscsiConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    pub target_iqn: String,
    /// CHAP: both or neither.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chap_user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chap_secret: Option<String>,
    pub portal_group_tag: u16,
    /// The peer node's iSCSI portal, listed by SendTargets.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_listen: Option<SocketAddr>,
    /// The peer node's `portal_group_tag` (default: the other of 1 and 2).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub peer_portal_group_tag: Option<u16>,
}

impl Default for IscsiConfig {
    fn default() -> Self {
        IscsiConfig {
            enabled: false,
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 3260),
            target_iqn: "iqn.2026-11.io.deltamirror:vol0".to_string(),
            chap_user: None,
            chap_secret: None,
            portal_group_tag: 1,
            peer_listen: None,
            peer_portal_group_tag: None,
        }
    }
}

/// Why a configuration cannot be used.
#[derive(Debug)]
pub enum ConfigError {
    /// The file could not be read.
    Read { path: PathBuf, source: io::Error },
    /// Not valid TOML, an unknown field, a missing field or a wrong type.
    Parse { path: PathBuf, message: String },
    /// Parsed, but some values are out of range or inconsistent. One line
    /// per problem.
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
    /// The PSK file could not be read at use time.
    Psk { path: PathBuf, source: io::Error },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Read { path, source } => {
                write!(f, "cannot read config file {}: {source}", path.display())
            }
            ConfigError::Parse { path, message } => {
                write!(f, "config file {}: {}", path.display(), message.trim_end())
            }
            ConfigError::Invalid { path, problems } => {
                write!(
                    f,
                    "config file {}: {} problem{}:",
                    path.display(),
                    problems.len(),
                    if problems.len() == 1 { "" } else { "s" }
                )?;
                for p in problems {
                    write!(f, "\n  - {p}")?;
                }
                Ok(())
            }
            ConfigError::Psk { path, source } => {
                write!(f, "cannot read link.psk_file {}: {source}", path.display())
            }
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConfigError::Read { source, .. } | ConfigError::Psk { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl Config {
    /// Reads, parses and validates a node's config file. Relative paths in
    /// the file are resolved against the file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Config::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })?;
        for d in &config.deprecations {
            log::warn!("{}: {d}", path.display());
        }
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        config.validate().map_err(|problems| ConfigError::Invalid {
            path: path.to_path_buf(),
            problems,
        })?;
        Ok(config)
    }

    /// Parses TOML text without validating it. A deprecated key is taken
    /// under its new name and noted in `deprecations`.
    pub fn parse(text: &str) -> Result<Config, String> {
        let mut table: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut deprecations = Vec::new();
        if let Some(toml::Value::Table(m)) = table.get_mut("mirror") {
            if let Some(v) = m.remove("max_batch_entries") {
                if m.contains_key("max_unacked_entries") {
                    return Err(
                        "mirror.max_batch_entries and mirror.max_unacked_entries are \
                                the same setting and both are set: keep only \
                                mirror.max_unacked_entries"
                            .into(),
                    );
                }
                m.insert("max_unacked_entries".into(), v);
                deprecations.push(
                    "mirror.max_batch_entries is deprecated: rename it to \
                     mirror.max_unacked_entries (the same setting: most entries sent to the \
                     backup and not yet acknowledged)"
                        .to_string(),
                );
            }
        }
        if deprecations.is_empty() {
            // Straight from the text, so errors point at a line.
            return toml::from_str(text).map_err(|e| e.to_string());
        }
        let mut config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| e.to_string())?;
        config.deprecations = deprecations;
        Ok(config)
    }

    /// The configuration as TOML, loadable by `Config::load`.
    pub fn to_toml_string(&self) -> String {
        toml::to_string_pretty(self).expect("a Config always serializes to TOML")
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut self.node.data_dir);
        resolve(&mut self.volume.path);
        if let Some(p) = self.link.psk_file.as_mut() {
            resolve(p);
        }
    }

    /// Checks every rule; returns one message per problem, each naming the
    /// field, the rule and an accepted value. Reads `link.psk_file` and the
    /// machine's online CPU list.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut v = Problems::default();
        self.check_node(&mut v);
        self.check_volume(&mut v);
        self.check_ring_and_mirror(&mut v);
        self.check_link(&mut v);
        self.check_reactor(&mut v);
        self.check_targets(&mut v);
        self.check_listen_addresses(&mut v);
        self.check_failover(&mut v);
        if v.0.is_empty() {
            Ok(())
        } else {
            Err(v.0)
        }
    }

    fn check_node(&self, v: &mut Problems) {
        let n = &self.node;
        if n.id != 1 && n.id != 2 {
            v.push(format!(
                "node.id = {}: must be 1 or 2 (the two nodes of a pair use different ids); e.g. node.id = 1",
                n.id
            ));
        }
        if n.name.is_empty() || n.name.len() > 64 || !n.name.chars().all(|c| c.is_ascii_graphic()) {
            v.push(format!(
                "node.name = {:?}: must be 1 to 64 printable ASCII characters without spaces; e.g. node.name = \"store-a\"",
                n.name
            ));
        }
        if n.data_dir.as_os_str().is_empty() {
            v.push(
                "node.data_dir is empty: set the directory that holds the ring and meta files; e.g. node.data_dir = \"/var/lib/deltamirror\""
                    .to_string(),
            );
        } else if n.data_dir.exists() && !n.data_dir.is_dir() {
            v.push(format!(
                "node.data_dir = {:?}: exists but is not a directory; point it at a directory (created by `deltamirror format` if missing)",
                n.data_dir
            ));
        }
    }

    fn check_volume(&self, v: &mut Problems) {
        let vol = &self.volume;
        if vol.path.as_os_str().is_empty() {
            v.push(
                "volume.path is empty: set the file or block device to mirror; e.g. volume.path = \"/dev/nvme1n1\""
                    .to_string(),
            );
        }
        let bs = u64::from(vol.block_size_bytes);
        if bs != 512 && bs != 4096 {
            v.push(format!(
                "volume.block_size_bytes = {bs}: must be 512 or 4096; e.g. volume.block_size_bytes = 4096"
            ));
        } else if vol.size_bytes != 0
            && (!vol.size_bytes.is_multiple_of(bs) || vol.size_bytes < 1024 * KIB)
        {
            let suggestion = (vol.size_bytes / bs).max(1024 * KIB / bs) * bs;
            v.push(format!(
                "volume.size_bytes = {}: must be 0 (use the existing size) or a multiple of volume.block_size_bytes ({bs}) of at least 1 MiB; e.g. volume.size_bytes = {suggestion}",
                vol.size_bytes
            ));
        }
        if parse_uuid(&vol.uuid).is_none() {
            v.push(format!(
                "volume.uuid = {:?}: must be 32 hex digits (dashes allowed), the same on both nodes; generate one with `uuidgen` and copy it to both files",
                vol.uuid
            ));
        }
        if vol.serial.is_empty() || vol.serial.len() > 20 || !is_printable_ascii(&vol.serial) {
            v.push(format!(
                "volume.serial = {:?}: must be 1 to 20 printable ASCII characters (NVMe and SCSI serial fields); e.g. volume.serial = \"DM0001\"",
                vol.serial
            ));
        }
        if vol.model.is_empty() || vol.model.len() > 16 || !is_printable_ascii(&vol.model) {
            v.push(format!(
                "volume.model = {:?}: must be 1 to 16 printable ASCII characters (SCSI product id); e.g. volume.model = \"deltamirror\"",
                vol.model
            ));
        }
    }

    /// The ring file: `ring.path`, or `ring` in `node.data_dir`.
    pub fn ring_path(&self) -> PathBuf {
        self.ring
            .path
            .clone()
            .unwrap_or_else(|| self.node.data_dir.join("ring"))
    }

    fn check_ring_path(&self, v: &mut Problems) {
        let Some(p) = &self.ring.path else { return };
        let example = "e.g. ring.path = \"/mnt/fast-ssd/deltamirror.ring\", or a block device of its own such as ring.path = \"/dev/nvme1n1p1\" (or remove the line to keep the ring in node.data_dir)";
        if p.as_os_str().is_empty() || !p.is_absolute() {
            v.push(format!(
                "ring.path = {p:?}: must be an absolute path to a file or a block device; {example}"
            ));
            return;
        }
        let meta = std::fs::metadata(p).ok();
        let device = meta
            .as_ref()
            .is_some_and(|m| m.file_type().is_block_device());
        if p.is_dir() {
            v.push(format!(
                "ring.path = {p:?}: is a directory; name the ring file in it; {example}"
            ));
        } else if meta.is_some() && !p.is_file() && !device {
            v.push(format!(
                "ring.path = {p:?}: exists but is neither a regular file nor a block device; {example}"
            ));
        }
        if *p == self.volume.path {
            v.push(format!(
                "ring.path = {p:?}: is volume.path; the ring must be its own file or device; {example}"
            ));
        } else if let Some(why) = overlaps(p, &self.volume.path) {
            v.push(format!(
                "ring.path = {p:?}: {why} volume.path ({:?}); the ring must be its own file or device; {example}",
                self.volume.path
            ));
        }
        let meta_file = self.node.data_dir.join("meta");
        if *p == meta_file || same_file(p, &meta_file) {
            v.push(format!(
                "ring.path = {p:?}: is the node's metadata file; {example}"
            ));
        }
        if device {
            self.check_ring_device_size(p, v);
        }
        match p.parent() {
            Some(dir) if dir.is_dir() => {}
            _ => v.push(format!(
                "ring.path = {p:?}: its directory does not exist; create it (on the device meant for the ring) or {example}"
            )),
        }
    }

    /// The ring and its header slots must fit on the block device
    /// `ring.path` names (its size from sysfs; `deltamirror format` checks
    /// again with the device open).
    fn check_ring_device_size(&self, p: &Path, v: &mut Problems) {
        let Some(bytes) = sysfs_block_dir(p)
            .and_then(|d| std::fs::read_to_string(d.join("size")).ok())
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(|sectors| sectors * 512)
        else {
            return;
        };
        let header = storage::ring::RING_HEADER_BYTES;
        let ring = self.ring.size_bytes;
        if ring.saturating_add(header) > bytes {
            let most = storage::ring::largest_capacity_on(bytes);
            v.push(format!(
                "ring.size_bytes = {ring}: does not fit on the ring device {p:?} ({bytes} bytes), which also holds the ring's {header} bytes of header slots; lower ring.size_bytes to at most {most} or give ring.path a larger device"
            ));
        }
    }

    fn check_ring_and_mirror(&self, v: &mut Problems) {
        self.check_ring_path(v);
        let ring = self.ring.size_bytes;
        if !ring.is_multiple_of(4096) || ring < MIN_RING_SIZE_BYTES {
            v.push(format!(
                "ring.size_bytes = {ring}: must be a multiple of 4096 and at least 16 MiB; e.g. ring.size_bytes = {}",
                256 * MIB
            ));
        }
        let m = &self.mirror;
        if m.confirm == ConfirmMode::Timeout && m.confirm_timeout_ms <= self.link.peer_timeout_ms {
            v.push(format!(
                "mirror.confirm_timeout_ms = {}: with confirm = \"timeout\" it must exceed link.peer_timeout_ms ({}) so that a dead peer is noticed before its entries are dropped; e.g. mirror.confirm_timeout_ms = {}",
                m.confirm_timeout_ms,
                self.link.peer_timeout_ms,
                (self.link.peer_timeout_ms * 5).max(5_000)
            ));
        }
        if m.confirm_timeout_ms == 0 || m.confirm_timeout_ms > 3_600_000 {
            v.push(format!(
                "mirror.confirm_timeout_ms = {}: must be 1 to 3600000 (one hour); e.g. mirror.confirm_timeout_ms = 5000",
                m.confirm_timeout_ms
            ));
        }
        let bs = u64::from(self.volume.block_size_bytes);
        let g = m.dirty_granularity_bytes;
        if !g.is_power_of_two() || g < bs.max(512) || g > GIB {
            v.push(format!(
                "mirror.dirty_granularity_bytes = {g}: must be a power of two from volume.block_size_bytes ({bs}) to 1 GiB; e.g. mirror.dirty_granularity_bytes = {}",
                64 * KIB
            ));
        }
        if m.max_unacked_entries == 0 || m.max_unacked_entries > 65_536 {
            v.push(format!(
                "mirror.max_unacked_entries = {}: must be 1 to 65536; e.g. mirror.max_unacked_entries = 256",
                m.max_unacked_entries
            ));
        }
        let io = self.reactor.max_io_bytes;
        if m.max_batch_bytes < io || m.max_batch_bytes > 64 * MIB {
            v.push(format!(
                "mirror.max_batch_bytes = {}: must be at least reactor.max_io_bytes ({io}) so one write fits a batch, and at most 64 MiB; e.g. mirror.max_batch_bytes = {}",
                m.max_batch_bytes,
                (4 * MIB).max(io).min(64 * MIB)
            ));
        }
        if ring >= MIN_RING_SIZE_BYTES && m.max_batch_bytes.saturating_mul(4) > ring {
            v.push(format!(
                "mirror.max_batch_bytes = {}: must be at most a quarter of ring.size_bytes ({ring}) so the ring holds several batches in flight; lower it or raise ring.size_bytes to {}",
                m.max_batch_bytes,
                round_up(m.max_batch_bytes.saturating_mul(4), 4096)
            ));
        }
        if m.min_replay_bytes_per_sec == 0 {
            v.push(format!(
                "mirror.min_replay_bytes_per_sec = 0: must be above 0 so a replay always makes progress under host load; e.g. mirror.min_replay_bytes_per_sec = {}",
                16 * MIB
            ));
        }
        if m.max_replay_bytes_per_sec != 0
            && m.max_replay_bytes_per_sec < m.min_replay_bytes_per_sec
        {
            v.push(format!(
                "mirror.max_replay_bytes_per_sec = {}: must be 0 (unlimited) or at least mirror.min_replay_bytes_per_sec ({}); e.g. mirror.max_replay_bytes_per_sec = 0",
                m.max_replay_bytes_per_sec, m.min_replay_bytes_per_sec
            ));
        }
    }

    fn check_link(&self, v: &mut Problems) {
        let l = &self.link;
        if l.listen == l.peer {
            v.push(format!(
                "link.peer = {}: equals link.listen; set it to the other node's link.listen address",
                l.peer
            ));
        }
        if l.peer.ip().is_unspecified() || l.peer.port() == 0 {
            v.push(format!(
                "link.peer = {}: must be a concrete address and port (the other node's link.listen); e.g. link.peer = \"192.0.2.12:7400\"",
                l.peer
            ));
        }
        match (&l.psk_file, &l.psk) {
            (Some(_), Some(_)) => v.push(
                "link.psk_file and link.psk are both set: keep exactly one (prefer psk_file)"
                    .to_string(),
            ),
            (None, None) => v.push(
                "link.psk_file: not set; set link.psk_file to a file of at least 16 secret bytes shared by both nodes, e.g. link.psk_file = \"/etc/deltamirror/psk\" (create it with `head -c 32 /dev/urandom | base64 > /etc/deltamirror/psk; chmod 600 /etc/deltamirror/psk`)"
                    .to_string(),
            ),
            (Some(path), None) => check_psk_file(path, v),
            (None, Some(psk)) => {
                if psk.chars().count() < MIN_PSK_BYTES {
                    v.push(format!(
                        "link.psk: {} characters: must be at least {MIN_PSK_BYTES}; better, use link.psk_file",
                        psk.chars().count()
                    ));
                }
            }
        }
        let hb = l.heartbeat_interval_ms;
        if !(10..=60_000).contains(&hb) {
            v.push(format!(
                "link.heartbeat_interval_ms = {hb}: must be 10 to 60000; e.g. link.heartbeat_interval_ms = 100"
            ));
        }
        if l.peer_timeout_ms <= hb.saturating_mul(2) {
            v.push(format!(
                "link.peer_timeout_ms = {}: must exceed 2 × link.heartbeat_interval_ms ({hb}) so one lost heartbeat is not an outage; e.g. link.peer_timeout_ms = {}",
                l.peer_timeout_ms,
                hb.saturating_mul(10)
            ));
        }
        if !(10..=600_000).contains(&l.connect_retry_ms) {
            v.push(format!(
                "link.connect_retry_ms = {}: must be 10 to 600000; e.g. link.connect_retry_ms = 500",
                l.connect_retry_ms
            ));
        }
        let need = self
            .mirror
            .max_batch_bytes
            .saturating_add(MESSAGE_HEADROOM_BYTES);
        if l.max_message_bytes < need || l.max_message_bytes > 256 * MIB {
            v.push(format!(
                "link.max_message_bytes = {}: must be at least mirror.max_batch_bytes ({}) + 64 KiB of headers = {need}, and at most 256 MiB; e.g. link.max_message_bytes = {}",
                l.max_message_bytes,
                self.mirror.max_batch_bytes,
                round_up(need, MIB)
            ));
        }
        self.check_fabric(v);
    }

    fn check_fabric(&self, v: &mut Problems) {
        let l = &self.link;
        if l.transport != LinkTransportKind::Fabric {
            return;
        }
        if l.fabric_provider.is_empty()
            || !l
                .fabric_provider
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ';')
        {
            v.push(format!(
                "link.fabric_provider = {:?}: must name a libfabric provider: \"verbs\" on RoCE or InfiniBand, \"tcp\" on any network (list them with `fi_info -l`)",
                l.fabric_provider
            ));
        }
        let need = l.max_message_bytes.saturating_add(MESSAGE_HEADROOM_BYTES);
        let max = rdma::channel::MAX_RING_BYTES as u64;
        if l.fabric_ring_bytes < need
            || l.fabric_ring_bytes > max
            || !l.fabric_ring_bytes.is_multiple_of(4096)
        {
            v.push(format!(
                "link.fabric_ring_bytes = {}: must be a multiple of 4096 from link.max_message_bytes ({}) + 64 KiB = {need} to {max}; e.g. link.fabric_ring_bytes = {} (twice this is locked in memory: see RLIMIT_MEMLOCK in docs/operations.md)",
                l.fabric_ring_bytes,
                l.max_message_bytes,
                round_up(need.saturating_mul(2), MIB)
            ));
        }
        match l.fabric_listen() {
            None => v.push(format!(
                "link.fabric_port: not set and link.listen's port {} + 1 is no port; set link.fabric_port, e.g. link.fabric_port = 7402",
                l.listen.port()
            )),
            Some(a) if a.port() == l.listen.port() => v.push(format!(
                "link.fabric_port = {}: equals link.listen's port; pick another (remove the line to use link.listen's port + 1)",
                a.port()
            )),
            Some(_) => {}
        }
    }

    fn check_reactor(&self, v: &mut Problems) {
        let r = &self.reactor;
        let online = online_cpus();
        if r.cores.is_empty() {
            v.push(
                "reactor.cores = []: list at least one CPU id; e.g. reactor.cores = [1]"
                    .to_string(),
            );
        }
        let mut seen = BTreeSet::new();
        for &c in &r.cores {
            if !seen.insert(c) {
                v.push(format!(
                    "reactor.cores: CPU {c} is listed twice; list each CPU once"
                ));
            }
            if !online.contains(&c) {
                v.push(format!(
                    "reactor.cores: CPU {c} is not online on this machine (online: {}); pick ids from that list",
                    cpu_list_string(&online)
                ));
            }
        }
        if r.poll_mode == PollMode::Adaptive && r.adaptive_spin_us > 100_000 {
            v.push(format!(
                "reactor.adaptive_spin_us = {}: must be at most 100000 (0.1 s); e.g. reactor.adaptive_spin_us = 500",
                r.adaptive_spin_us
            ));
        }
        if r.disk_submit_hold_us > 1000 {
            v.push(format!(
                "reactor.disk_submit_hold_us = {}: must be at most 1000 (1 ms; a hold only batches device notifications, a longer one only adds latency); e.g. reactor.disk_submit_hold_us = {}",
                r.disk_submit_hold_us,
                storage::backend::DEFAULT_SUBMIT_HOLD_US
            ));
        }
        if !(1..=4096).contains(&r.queue_depth) {
            v.push(format!(
                "reactor.queue_depth = {}: must be 1 to 4096; e.g. reactor.queue_depth = 128",
                r.queue_depth
            ));
        }
        let io = r.max_io_bytes;
        if !io.is_multiple_of(4096) || !(4096..=32 * MIB).contains(&io) {
            v.push(format!(
                "reactor.max_io_bytes = {io}: must be a multiple of 4096 from 4 KiB to 32 MiB; e.g. reactor.max_io_bytes = {MIB}"
            ));
        }
        let pool = r.buffer_pool_mib;
        // io_uring registers at most 1 GiB as one fixed buffer.
        let least = (8 * io).div_ceil(MIB).max(8);
        if !(least..=1024).contains(&pool) {
            v.push(format!(
                "reactor.buffer_pool_mib = {pool}: must be {least} to 1024 (at least 8 MiB and 8 × reactor.max_io_bytes, at most the 1 GiB io_uring registers as one buffer); e.g. reactor.buffer_pool_mib = {}",
                least.clamp(64, 1024)
            ));
        }
        if r.zero_copy_receive_min_bytes > MIB {
            v.push(format!(
                "reactor.zero_copy_receive_min_bytes = {}: must be 0 to 1048576 (1 MiB); writes below it are copied, so a larger value only adds copies; e.g. reactor.zero_copy_receive_min_bytes = {}",
                r.zero_copy_receive_min_bytes,
                netreactor::DEFAULT_ZERO_COPY_RECEIVE_MIN_BYTES
            ));
        }
    }

    fn check_targets(&self, v: &mut Problems) {
        if !self.nbd.enabled && !self.nvme.enabled && !self.iscsi.enabled {
            v.push(
                "nbd.enabled, nvme.enabled, iscsi.enabled: all false; enable at least one target so hosts can reach the volume; e.g. nvme.enabled = true"
                    .to_string(),
            );
        }
        let nbd = &self.nbd;
        if nbd.enabled && (nbd.export_name.is_empty() || nbd.export_name.len() > 4096) {
            v.push(format!(
                "nbd.export_name = {:?}: must be 1 to 4096 bytes; e.g. nbd.export_name = \"deltamirror\"",
                nbd.export_name
            ));
        }
        let nvme = &self.nvme;
        if nvme.enabled {
            if !is_valid_nqn(&nvme.subnqn) {
                v.push(format!(
                    "nvme.subnqn = {:?}: must be an NVMe qualified name (\"nqn.yyyy-mm.reverse.domain:name\", at most 223 bytes); e.g. nvme.subnqn = \"nqn.2026-11.io.deltamirror:vol0\"",
                    nvme.subnqn
                ));
            }
            for h in &nvme.allowed_hosts {
                if !is_valid_nqn(h) {
                    v.push(format!(
                        "nvme.allowed_hosts: {h:?} is not a host NQN; use the host's /etc/nvme/hostnqn, e.g. \"nqn.2014-08.org.nvmexpress:uuid:...\""
                    ));
                }
            }
            if nvme.port_id == 0 || nvme.port_id == 0xffff {
                v.push(format!(
                    "nvme.port_id = {}: must be 1 to 65534; e.g. nvme.port_id = 1",
                    nvme.port_id
                ));
            }
        }
        let iscsi = &self.iscsi;
        if iscsi.enabled {
            if !is_valid_iscsi_name(&iscsi.target_iqn) {
                v.push(format!(
                    "iscsi.target_iqn = {:?}: must be a lowercase iSCSI name (\"iqn.yyyy-mm.reverse.domain:name\", \"eui.\" or \"naa.\", at most 223 bytes); e.g. iscsi.target_iqn = \"iqn.2026-11.io.deltamirror:vol0\"",
                    iscsi.target_iqn
                ));
            }
            if iscsi.portal_group_tag == 0 {
                v.push(
                    "iscsi.portal_group_tag = 0: must be 1 to 65535; e.g. iscsi.portal_group_tag = 1"
                        .to_string(),
                );
            }
            match iscsi.peer_portal_group_tag {
                Some(0) => v.push(
                    "iscsi.peer_portal_group_tag = 0: must be 1 to 65535 (the peer's iscsi.portal_group_tag); e.g. iscsi.peer_portal_group_tag = 2"
                        .to_string(),
                ),
                Some(t) if t == iscsi.portal_group_tag => v.push(format!(
                    "iscsi.peer_portal_group_tag = {t}: equals this node's iscsi.portal_group_tag; the two nodes' tags must differ (the peer's is the other one), e.g. iscsi.peer_portal_group_tag = {}",
                    if t == 1 { 2 } else { 1 }
                )),
                None if iscsi.peer_listen.is_some() && !matches!(iscsi.portal_group_tag, 1 | 2) => v.push(format!(
                    "iscsi.peer_portal_group_tag is missing: with iscsi.portal_group_tag = {} the peer's tag cannot be inferred; set it to the peer's iscsi.portal_group_tag",
                    iscsi.portal_group_tag
                )),
                _ => {}
            }
            match (&iscsi.chap_user, &iscsi.chap_secret) {
                (None, None) => {}
                (Some(user), Some(secret)) => {
                    if user.is_empty() || !is_printable_ascii(user) || user.len() > 255 {
                        v.push(format!(
                            "iscsi.chap_user = {user:?}: must be 1 to 255 printable ASCII characters"
                        ));
                    }
                    let n = secret.chars().count();
                    if !(12..=255).contains(&n) {
                        v.push(format!(
                            "iscsi.chap_secret: {n} characters: must be 12 to 255 (RFC 7143 requires at least 96 bits; the Windows initiator accepts at most 16)"
                        ));
                    }
                }
                _ => v.push(
                    "iscsi.chap_user / iscsi.chap_secret: set both (CHAP on) or neither (CHAP off)"
                        .to_string(),
                ),
            }
        }
    }

    /// No two enabled listeners of this node may share an address.
    fn check_listen_addresses(&self, v: &mut Problems) {
        let mut listeners: Vec<(&str, SocketAddr)> = vec![
            ("admin.listen", self.admin.listen),
            ("link.listen", self.link.listen),
        ];
        if self.nbd.enabled {
            listeners.push(("nbd.listen", self.nbd.listen));
        }
        if self.nvme.enabled {
            listeners.push(("nvme.listen", self.nvme.listen));
        }
        if self.iscsi.enabled {
            listeners.push(("iscsi.listen", self.iscsi.listen));
        }
        for (i, (name_a, a)) in listeners.iter().enumerate() {
            for (name_b, b) in &listeners[i + 1..] {
                let same_port = a.port() == b.port() && a.port() != 0;
                let overlapping_ip =
                    a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified();
                if same_port && overlapping_ip {
                    v.push(format!(
                        "{name_b} = {b}: conflicts with {name_a} = {a}; give each listener its own port"
                    ));
                }
            }
        }
    }

    fn check_failover(&self, v: &mut Problems) {
        let f = &self.failover;
        if f.mode == FailoverMode::Manual {
            if !f.etcd_endpoints.is_empty() || f.key_prefix.is_some() {
                v.push(
                    "failover.etcd_endpoints / failover.key_prefix are set but failover.mode = \"manual\" (the default) ignores them; set failover.mode = \"etcd\" for automatic failover, or remove them"
                        .to_string(),
                );
            }
            return;
        }
        if f.etcd_endpoints.is_empty() {
            v.push(
                "failover.etcd_endpoints is empty: with failover.mode = \"etcd\" list the etcd cluster's client URLs (three members on separate hosts); e.g. failover.etcd_endpoints = [\"http://10.0.0.1:2379\", \"http://10.0.0.2:2379\", \"http://10.0.0.3:2379\"]"
                    .to_string(),
            );
        }
        for e in &f.etcd_endpoints {
            if let Err(why) = check_etcd_endpoint(e) {
                v.push(format!(
                    "failover.etcd_endpoints: {e:?} {why}; write each as http://HOST:PORT, e.g. \"http://10.0.0.1:2379\""
                ));
            }
        }
        let uniq: BTreeSet<&String> = f.etcd_endpoints.iter().collect();
        if uniq.len() != f.etcd_endpoints.len() {
            v.push(
                "failover.etcd_endpoints lists an endpoint twice; list each etcd member once"
                    .to_string(),
            );
        }
        if let Some(p) = &f.key_prefix {
            if !p.starts_with('/')
                || p.ends_with('/')
                || p.len() > 200
                || !p.bytes().all(|b| b.is_ascii_graphic())
            {
                v.push(format!(
                    "failover.key_prefix = {p:?}: must start with '/', not end with '/', and be at most 200 printable ASCII characters without spaces, the same on both nodes and unique to this pair; e.g. failover.key_prefix = \"/deltamirror/pair-a\" (or remove it for /deltamirror/<volume uuid>)"
                ));
            }
        }
        let ttl = f.lease_ttl_ms;
        if !(MIN_LEASE_TTL_MS..=MAX_LEASE_TTL_MS).contains(&ttl) || !ttl.is_multiple_of(1000) {
            let fix = (ttl.div_ceil(1000) * 1000).clamp(MIN_LEASE_TTL_MS, MAX_LEASE_TTL_MS);
            v.push(format!(
                "failover.lease_ttl_ms = {ttl}: must be whole seconds (etcd counts leases in seconds) from {MIN_LEASE_TTL_MS} to {MAX_LEASE_TTL_MS}; e.g. failover.lease_ttl_ms = {fix}"
            ));
        }
        let t = f.stale_mark_timeout_ms;
        if !(100..=600_000).contains(&t) {
            v.push(format!(
                "failover.stale_mark_timeout_ms = {t}: must be 100 to 600000 (how long writes wait for etcd before failing, retryable); e.g. failover.stale_mark_timeout_ms = 5000"
            ));
        }
    }

    /// The etcd key prefix of this pair: `failover.key_prefix`, or
    /// `/deltamirror/<volume uuid>`.
    pub fn failover_key_prefix(&self) -> String {
        match &self.failover.key_prefix {
            Some(p) => p.clone(),
            None => format!(
                "/deltamirror/{}",
                self.volume_uuid_bytes()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            ),
        }
    }

    /// Fingerprint of the failover configuration, sent in the handshake
    /// (both nodes must agree): 0 for manual failover.
    pub fn failover_fingerprint(&self) -> u64 {
        let f = &self.failover;
        if f.mode == FailoverMode::Manual {
            return 0;
        }
        // The endpoints may differ: each node may reach the same cluster
        // through other addresses (its nearest member first, a local proxy).
        let canon = format!(
            "etcd|{}|{}|{}",
            self.failover_key_prefix(),
            f.lease_ttl_ms,
            f.stale_mark_timeout_ms
        );
        // FNV-1a, 64 bits: stable across versions and platforms.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in canon.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h.max(1)
    }

    /// The volume UUID as 16 bytes.
    pub fn volume_uuid_bytes(&self) -> [u8; 16] {
        parse_uuid(&self.volume.uuid).expect("volume.uuid is checked by validate()")
    }

    /// The link pre-shared key: the contents of `link.psk_file` (trailing
    /// whitespace removed, so a file written with `echo` matches one written
    /// with `printf`) or the bytes of `link.psk`.
    pub fn psk_bytes(&self) -> Result<Vec<u8>, ConfigError> {
        match (&self.link.psk_file, &self.link.psk) {
            (Some(path), _) => read_psk_file(path).map_err(|source| ConfigError::Psk {
                path: path.clone(),
                source,
            }),
            (None, Some(psk)) => Ok(psk.as_bytes().to_vec()),
            (None, None) => Err(ConfigError::Psk {
                path: PathBuf::new(),
                source: io::Error::new(io::ErrorKind::NotFound, "no link.psk_file or link.psk"),
            }),
        }
    }

    /// The demo configuration of node 1 or 2 of a pair on this machine,
    /// with files under `base_dir/node<id>` and every port raised by
    /// `port_offset` (tests run several pairs side by side).
    ///
    /// Ports (offset 0): node 1 NBD 10809, admin 9400, NVMe 4420,
    /// iSCSI 3260, link 7400; node 2 NBD 10810, admin 9401, NVMe 4421,
    /// iSCSI 3261, link 7401.
    /// Switches the link to `transport = "fabric"` with `provider`, sized
    /// so both rings (2 × 2 MiB) fit a default 8 MiB RLIMIT_MEMLOCK: 1 MiB
    /// batches, 1 MiB + 64 KiB messages.
    pub fn with_fabric_link(mut self, provider: &str) -> Config {
        self.link.transport = LinkTransportKind::Fabric;
        self.link.fabric_provider = provider.to_string();
        self.mirror.max_batch_bytes = self.reactor.max_io_bytes.max(MIB);
        self.link.max_message_bytes = self.mirror.max_batch_bytes + MESSAGE_HEADROOM_BYTES;
        self.link.fabric_ring_bytes = round_up(self.link.max_message_bytes * 2, MIB).max(2 * MIB);
        self
    }

    pub fn example(node_id: u32, base_dir: &Path, port_offset: u16) -> Config {
        assert!(node_id == 1 || node_id == 2, "node_id must be 1 or 2");
        let i = (node_id - 1) as u16;
        let local =
            |port: u16| SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port + i + port_offset);
        let peer_link = SocketAddr::new(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            7400 + (1 - i) + port_offset,
        );
        let peer = |port: u16| {
            SocketAddr::new(
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                port + (1 - i) + port_offset,
            )
        };
        let dir = base_dir.join(format!("node{node_id}"));
        let ncpu = online_cpus();
        // Two nodes on one machine: spread them over the first two CPUs.
        let core = ncpu.iter().copied().nth(i as usize).unwrap_or(0);
        Config {
            node: NodeConfig {
                id: node_id,
                name: format!("demo-{node_id}"),
                initial_role: if node_id == 1 {
                    Role::Primary
                } else {
                    Role::Backup
                },
                data_dir: dir.clone(),
            },
            volume: VolumeConfig {
                path: dir.join("volume.img"),
                size_bytes: GIB,
                block_size_bytes: 4096,
                uuid: "6d6972726f722d64656d6f2d766f6c30".to_string(),
                serial: "DMDEMO0001".to_string(),
                model: "deltamirror".to_string(),
                preallocate: Preallocate::Space,
            },
            ring: RingConfig {
                size_bytes: 64 * MIB,
                path: None,
            },
            mirror: MirrorConfig::default(),
            link: LinkConfig {
                listen: local(7400),
                peer: peer_link,
                psk_file: None,
                psk: Some("deltamirror-demo-key-not-secret".to_string()),
                heartbeat_interval_ms: default_heartbeat_interval_ms(),
                peer_timeout_ms: default_peer_timeout_ms(),
                connect_retry_ms: default_connect_retry_ms(),
                max_message_bytes: default_max_message_bytes(),
                transport: LinkTransportKind::Tcp,
                fabric_provider: default_fabric_provider(),
                fabric_ring_bytes: default_fabric_ring_bytes(),
                fabric_port: None,
            },
            reactor: ReactorConfig {
                cores: vec![core],
                ..ReactorConfig::default()
            },
            admin: AdminConfig {
                listen: local(9400),
            },
            nbd: NbdConfig {
                enabled: true,
                listen: local(10809),
                export_name: "deltamirror".to_string(),
            },
            nvme: NvmeConfig {
                enabled: true,
                listen: local(4420),
                subnqn: "nqn.2026-11.io.deltamirror:demo".to_string(),
                allowed_hosts: Vec::new(),
                port_id: node_id as u16,
                peer_listen: Some(peer(4420)),
                peer_port_id: 3 - node_id as u16,
            },
            iscsi: IscsiConfig {
                enabled: true,
                listen: local(3260),
                target_iqn: "iqn.2026-11.io.deltamirror:demo".to_string(),
                chap_user: None,
                chap_secret: None,
                portal_group_tag: node_id as u16,
                peer_listen: Some(peer(3260)),
                peer_portal_group_tag: Some(3 - node_id as u16),
            },
            failover: FailoverConfig::default(),
            deprecations: Vec::new(),
        }
    }
}

#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn push(&mut self, p: String) {
        self.0.push(p);
    }
}

fn check_psk_file(path: &Path, v: &mut Problems) {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => {
            v.push(format!(
                "link.psk_file = {:?}: cannot read it ({e}); create it on one node with `head -c 32 /dev/urandom | base64 > {}; chmod 600 {}` and copy it to the other",
                path,
                path.display(),
                path.display()
            ));
            return;
        }
    };
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        v.push(format!(
            "link.psk_file = {:?}: readable or writable by group/others (mode {:o}); run `chmod 600 {}`",
            path,
            mode & 0o777,
            path.display()
        ));
    }
    match read_psk_file(path) {
        Ok(key) if key.len() < MIN_PSK_BYTES => v.push(format!(
            "link.psk_file = {:?}: holds {} bytes: must hold at least {MIN_PSK_BYTES}; e.g. `head -c 32 /dev/urandom | base64 > {}`",
            path,
            key.len(),
            path.display()
        )),
        Ok(_) => {}
        Err(e) => v.push(format!("link.psk_file = {path:?}: cannot read it ({e})")),
    }
}

fn read_psk_file(path: &Path) -> io::Result<Vec<u8>> {
    let mut key = std::fs::read(path)?;
    while key.last().is_some_and(|b| b.is_ascii_whitespace()) {
        key.pop();
    }
    Ok(key)
}

/// An etcd client URL: `http://HOST:PORT` (no TLS yet, no path).
fn check_etcd_endpoint(e: &str) -> Result<(), &'static str> {
    if e.starts_with("https://") {
        return Err("uses https, which this build does not support yet (plain http only; keep etcd's client port on a trusted network)");
    }
    let Some(rest) = e.strip_prefix("http://") else {
        return Err("does not start with http://");
    };
    let Some((host, port)) = rest.rsplit_once(':') else {
        return Err("has no :PORT");
    };
    if host.is_empty() || host.contains('/') || rest.contains('/') {
        return Err("must be http://HOST:PORT with no path");
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err("has a port that is not 1 to 65535"),
    }
}

fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let hex: Vec<u8> = s.bytes().filter(|&b| b != b'-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

fn is_printable_ascii(s: &str) -> bool {
    s.bytes().all(|b| (0x20..0x7f).contains(&b))
}

/// NVMe Base spec 4.5: "nqn.yyyy-mm.reverse-domain:..." or the UUID form
/// "nqn.2014-08.org.nvmexpress:uuid:...", at most 223 bytes.
fn is_valid_nqn(s: &str) -> bool {
    s.len() <= 223 && s.is_ascii() && has_date_prefix(s, "nqn.") && s.contains(':')
}

/// RFC 7143 §4.2.7: iqn./eui./naa. names, lowercase, at most 223 bytes.
fn is_valid_iscsi_name(s: &str) -> bool {
    if s.len() > 223 || !s.is_ascii() || s.bytes().any(|b| b.is_ascii_uppercase() || b == b' ') {
        return false;
    }
    if s.starts_with("iqn.") {
        return has_date_prefix(s, "iqn.");
    }
    let hex_tail = |rest: &str, lens: &[usize]| {
        lens.contains(&rest.len()) && rest.bytes().all(|b| b.is_ascii_hexdigit())
    };
    if let Some(rest) = s.strip_prefix("eui.") {
        return hex_tail(rest, &[16]);
    }
    if let Some(rest) = s.strip_prefix("naa.") {
        return hex_tail(rest, &[16, 32]);
    }
    false
}

/// `prefix` then "yyyy-mm." then at least one more character.
fn has_date_prefix(s: &str, prefix: &str) -> bool {
    let Some(rest) = s.strip_prefix(prefix) else {
        return false;
    };
    let b = rest.as_bytes();
    b.len() > 8
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && b[5..7].iter().all(u8::is_ascii_digit)
        && b[7] == b'.'
}

fn round_up(x: u64, to: u64) -> u64 {
    x.div_ceil(to) * to
}

/// Online CPU ids from /sys/devices/system/cpu/online ("0-3,6"); falls back
/// to 0..available_parallelism when that file is missing.
fn online_cpus() -> BTreeSet<usize> {
    if let Ok(text) = std::fs::read_to_string("/sys/devices/system/cpu/online") {
        if let Some(set) = parse_cpu_list(text.trim()) {
            return set;
        }
    }
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    (0..n).collect()
}

fn parse_cpu_list(text: &str) -> Option<BTreeSet<usize>> {
    let mut set = BTreeSet::new();
    for part in text.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().ok()?, b.parse().ok()?);
                set.extend(a..=b);
            }
            None => {
                set.insert(part.parse().ok()?);
            }
        }
    }
    (!set.is_empty()).then_some(set)
}

fn cpu_list_string(set: &BTreeSet<usize>) -> String {
    let ids: Vec<String> = set.iter().map(usize::to_string).collect();
    ids.join(",")
}

/// Why `ring` and `volume` share storage under different names, if they
/// do: the same file (device and inode), the same block device (device
/// number), or one a partition of the other. Paths that do not exist yet
/// share nothing.
fn overlaps(ring: &Path, volume: &Path) -> Option<&'static str> {
    use std::os::unix::fs::MetadataExt;
    let (r, v) = (
        std::fs::metadata(ring).ok()?,
        std::fs::metadata(volume).ok()?,
    );
    let (rb, vb) = (
        r.file_type().is_block_device(),
        v.file_type().is_block_device(),
    );
    if rb && vb {
        if r.rdev() == v.rdev() {
            return Some("is the same block device (device number) as");
        }
        let (rs, vs) = (sysfs_block_dir(ring)?, sysfs_block_dir(volume)?);
        let partition_of = |part: &Path, disk: &Path| {
            part.join("partition").exists() && part.parent() == Some(disk)
        };
        if partition_of(&rs, &vs) {
            return Some("is a partition of the device of");
        }
        if partition_of(&vs, &rs) {
            return Some("is a whole device that holds, as a partition,");
        }
        return None;
    }
    (!rb && !vb && same_file(ring, volume)).then_some("is the same file (device and inode) as")
}

/// Whether `a` and `b` are the same file under two names.
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// The sysfs directory of the block device at `path`
/// (`/sys/dev/block/MAJOR:MINOR`, resolved: a partition's directory sits in
/// its disk's).
fn sysfs_block_dir(path: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(path).ok()?.rdev();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    std::fs::canonicalize(format!("/sys/dev/block/{major}:{minor}")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "deltamirror-config-test-{}-{name}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn base() -> Config {
        Config::example(1, Path::new("/tmp/deltamirror-test"), 0)
    }

    /// Asserts that `c` fails validation with exactly one problem that
    /// mentions `field`, and returns that message.
    fn check_rejects(c: &Config, field: &str) -> String {
        let problems = c.validate().expect_err("config should be rejected");
        assert!(
            problems.iter().any(|p| p.contains(field)),
            "no problem mentions {field}: {problems:#?}"
        );
        assert_eq!(problems.len(), 1, "{problems:#?}");
        problems.into_iter().next().unwrap()
    }

    #[test]
    fn examples_are_valid_and_round_trip() {
        for id in [1, 2] {
            let c = Config::example(id, Path::new("/tmp/dm"), 0);
            c.validate().unwrap();
            let text = c.to_toml_string();
            assert_eq!(Config::parse(&text).unwrap(), c, "{text}");
        }
    }

    fn etcd_mode() -> Config {
        let mut c = base();
        c.failover.mode = FailoverMode::Etcd;
        c.failover.etcd_endpoints = vec!["http://127.0.0.1:2379".into()];
        c
    }

    #[test]
    fn failover_section_is_checked_field_by_field() {
        etcd_mode().validate().unwrap();
        let text = etcd_mode().to_toml_string();
        assert!(text.contains("[failover]"), "{text}");
        assert_eq!(Config::parse(&text).unwrap(), etcd_mode());
        // Manual mode (the default) writes no section and stays as before.
        assert!(!base().to_toml_string().contains("failover"));
        let mut c = etcd_mode();
        c.failover.etcd_endpoints.clear();
        assert!(check_rejects(&c, "failover.etcd_endpoints").contains("http://10.0.0.1:2379"));
        for bad in [
            "127.0.0.1:2379",
            "http://127.0.0.1",
            "https://e:2379",
            "http://e:0",
            "http://e:2379/v3",
        ] {
            let mut c = etcd_mode();
            c.failover.etcd_endpoints = vec![bad.into()];
            check_rejects(&c, "failover.etcd_endpoints");
        }
        let mut c = etcd_mode();
        c.failover.lease_ttl_ms = 1500;
        assert!(check_rejects(&c, "failover.lease_ttl_ms").contains("lease_ttl_ms = 2000"));
        c.failover.lease_ttl_ms = 0;
        check_rejects(&c, "failover.lease_ttl_ms");
        let mut c = etcd_mode();
        c.failover.key_prefix = Some("deltamirror/".into());
        check_rejects(&c, "failover.key_prefix");
        let mut c = etcd_mode();
        c.failover.stale_mark_timeout_ms = 10;
        check_rejects(&c, "failover.stale_mark_timeout_ms");
        let mut c = base();
        c.failover.etcd_endpoints = vec!["http://127.0.0.1:2379".into()];
        check_rejects(&c, "failover.mode");
    }

    #[test]
    fn failover_fingerprint_differs_with_the_section() {
        assert_eq!(base().failover_fingerprint(), 0);
        let a = etcd_mode();
        assert_ne!(a.failover_fingerprint(), 0);
        let mut b = Config::example(2, Path::new("/tmp/elsewhere"), 3);
        b.failover = a.failover.clone();
        b.failover.etcd_endpoints = vec!["http://10.0.0.9:2379".into()];
        assert_eq!(a.failover_fingerprint(), b.failover_fingerprint());
        b.failover.lease_ttl_ms = 5000;
        assert_ne!(a.failover_fingerprint(), b.failover_fingerprint());
        assert_eq!(
            a.failover_key_prefix(),
            "/deltamirror/6d6972726f722d64656d6f2d766f6c30"
        );
    }

    #[test]
    fn example_ports() {
        let a = Config::example(1, Path::new("/tmp/dm"), 0);
        let b = Config::example(2, Path::new("/tmp/dm"), 0);
        assert_eq!(a.nbd.listen.port(), 10809);
        assert_eq!(b.nbd.listen.port(), 10810);
        assert_eq!((a.admin.listen.port(), b.admin.listen.port()), (9400, 9401));
        assert_eq!((a.nvme.listen.port(), b.nvme.listen.port()), (4420, 4421));
        assert_eq!((a.iscsi.listen.port(), b.iscsi.listen.port()), (3260, 3261));
        assert_eq!(a.link.peer, b.link.listen);
        assert_eq!(b.link.peer, a.link.listen);
        assert_eq!(a.volume.uuid, b.volume.uuid);
        assert_eq!(a.node.initial_role, Role::Primary);
        assert_eq!(b.node.initial_role, Role::Backup);
        let c = Config::example(2, Path::new("/tmp/dm"), 100);
        assert_eq!(c.nbd.listen.port(), 10910);
        assert_eq!(c.link.peer.port(), 7500);
    }

    #[test]
    fn node_id_must_be_1_or_2() {
        let mut c = base();
        c.node.id = 3;
        check_rejects(&c, "node.id = 3");
    }

    #[test]
    fn node_name_must_be_printable() {
        let mut c = base();
        c.node.name = "has space".into();
        check_rejects(&c, "node.name");
        c.node.name = String::new();
        check_rejects(&c, "node.name");
    }

    #[test]
    fn data_dir_must_be_set_and_a_directory() {
        let mut c = base();
        c.node.data_dir = PathBuf::new();
        check_rejects(&c, "node.data_dir");
        let dir = tmpdir("datadir");
        let file = dir.join("f");
        std::fs::write(&file, b"x").unwrap();
        c.node.data_dir = file;
        check_rejects(&c, "not a directory");
    }

    #[test]
    fn ring_path_is_optional_and_checked() {
        let mut c = base();
        assert_eq!(c.ring_path(), c.node.data_dir.join("ring"));
        let dir = tmpdir("ringpath");
        let text = c.to_toml_string().replace(
            "[ring]",
            &format!("[ring]\npath = {:?}", dir.join("r.ring")),
        );
        let parsed = Config::parse(&text).unwrap();
        assert_eq!(parsed.ring_path(), dir.join("r.ring"));
        parsed.validate().unwrap();
        c.ring.path = Some(PathBuf::from("relative/ring"));
        check_rejects(
            &c,
            "ring.path = \"relative/ring\": must be an absolute path",
        );
        c.ring.path = Some(dir.clone());
        check_rejects(&c, "is a directory");
        c.ring.path = Some(dir.join("missing").join("r.ring"));
        check_rejects(&c, "its directory does not exist");
        c.volume.path = dir.join("vol.img");
        c.ring.path = Some(c.volume.path.clone());
        check_rejects(&c, "is volume.path");
    }

    #[test]
    fn ring_path_may_be_a_block_device_but_not_the_volume_under_another_name() {
        let dir = tmpdir("ringdev");
        let backing = dir.join("backing");
        std::fs::File::create(&backing)
            .unwrap()
            .set_len(32 * MIB)
            .unwrap();
        let Some(dev) = testskip::LoopDevice::attach(&backing, 512) else {
            let _ = std::fs::remove_dir_all(&dir);
            return;
        };
        let mut c = base();
        c.volume.path = dir.join("vol.img");
        c.ring.path = Some(dev.path().to_path_buf());
        c.ring.size_bytes = 16 * MIB;
        c.validate().unwrap();
        // The device too small for ring.size_bytes and the header slots.
        c.ring.size_bytes = 32 * MIB;
        let msg = check_rejects(
            &c,
            "ring.size_bytes = 33554432: does not fit on the ring device",
        );
        assert!(msg.contains("at most 33542144"), "{msg}");
        c.ring.size_bytes = 16 * MIB;
        // The volume on the same device, by its name or by another one.
        c.volume.path = dev.path().to_path_buf();
        check_rejects(&c, "is volume.path");
        let alias = dir.join("alias");
        std::os::unix::fs::symlink(dev.path(), &alias).unwrap();
        c.volume.path = alias;
        check_rejects(
            &c,
            "is the same block device (device number) as volume.path",
        );
        // A file volume of another name for the ring file (a hard link).
        let ring_file = dir.join("r.ring");
        std::fs::write(&ring_file, b"x").unwrap();
        let link = dir.join("vol-link.img");
        std::fs::hard_link(&ring_file, &link).unwrap();
        c.volume.path = link;
        c.ring.path = Some(ring_file);
        check_rejects(&c, "is the same file (device and inode) as volume.path");
        // Neither a file nor a block device.
        c.volume.path = dir.join("vol.img");
        c.ring.path = Some(PathBuf::from("/dev/null"));
        check_rejects(&c, "neither a regular file nor a block device");
        drop(dev);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn ring_path_on_a_partition_of_the_volume_device_is_refused() {
        let dir = tmpdir("ringpart");
        // An MBR partition table with one partition of 16 MiB at 1 MiB.
        let mut disk = vec![0u8; 32 * MIB as usize];
        disk[446 + 4] = 0x83;
        disk[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
        disk[446 + 12..446 + 16].copy_from_slice(&32768u32.to_le_bytes());
        disk[510..512].copy_from_slice(&[0x55, 0xAA]);
        let backing = dir.join("backing");
        std::fs::write(&backing, &disk).unwrap();
        let Some(disk) = testskip::LoopDevice::attach_partitioned(&backing, 512) else {
            let _ = std::fs::remove_dir_all(&dir);
            return;
        };
        let Some(part) = disk.partition(1) else {
            testskip::skip(format!(
                "the kernel found no partition on {} (a kernel without partition table \
                 support, CONFIG_MSDOS_PARTITION)",
                disk.path().display()
            ));
            drop(disk);
            let _ = std::fs::remove_dir_all(&dir);
            return;
        };
        let mut c = base();
        c.ring.size_bytes = 16 * MIB - 16 * KIB;
        c.volume.path = disk.path().to_path_buf();
        c.ring.path = Some(part.clone());
        check_rejects(&c, "is a partition of the device of volume.path");
        c.volume.path = part;
        c.ring.path = Some(disk.path().to_path_buf());
        check_rejects(
            &c,
            "is a whole device that holds, as a partition, volume.path",
        );
        drop(disk);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unknown_field_is_rejected_with_its_name() {
        let text = base()
            .to_toml_string()
            .replace("[ring]", "[ring]\nsize_mb = 5");
        let err = Config::parse(&text).unwrap_err();
        assert!(err.contains("size_mb"), "{err}");
    }

    #[test]
    fn disk_handover_takes_its_three_modes_and_names_them_on_a_bad_one() {
        use storage::backend::{HandOver, HandOverPolicy};
        let text = base().to_toml_string();
        assert!(text.contains("disk_handover = \"adaptive\""), "{text}");
        for (name, policy) in [
            ("adaptive", HandOverPolicy::Adaptive),
            ("at-once", HandOverPolicy::Fixed(HandOver::AtOnce)),
            ("in-chunks", HandOverPolicy::Fixed(HandOver::InChunks)),
        ] {
            let t = text.replace(
                "disk_handover = \"adaptive\"",
                &format!("disk_handover = \"{name}\""),
            );
            let c = Config::parse(&t).unwrap();
            assert_eq!(c.reactor.disk_handover.policy(), policy);
        }
        let t = text.replace("disk_handover = \"adaptive\"", "disk_handover = \"fast\"");
        let err = Config::parse(&t).unwrap_err();
        for want in ["disk_handover", "fast", "adaptive", "at-once", "in-chunks"] {
            assert!(err.contains(want), "{want} missing from: {err}");
        }
    }

    #[test]
    fn the_old_max_batch_entries_key_is_accepted_with_a_deprecation() {
        let text = base()
            .to_toml_string()
            .replace("max_unacked_entries = 256", "max_batch_entries = 100");
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.mirror.max_unacked_entries, 100);
        assert_eq!(c.deprecations.len(), 1);
        assert!(
            c.deprecations[0].contains("rename it to mirror.max_unacked_entries"),
            "{:?}",
            c.deprecations
        );
        assert!(base().deprecations.is_empty());
        let both = base().to_toml_string().replace(
            "max_unacked_entries = 256",
            "max_unacked_entries = 256\nmax_batch_entries = 100",
        );
        let err = Config::parse(&both).unwrap_err();
        assert!(
            err.contains("keep only mirror.max_unacked_entries"),
            "{err}"
        );
    }

    #[test]
    fn bad_enum_value_is_rejected() {
        let text = base()
            .to_toml_string()
            .replace("confirm = \"ack\"", "confirm = \"sometimes\"");
        let err = Config::parse(&text).unwrap_err();
        assert!(err.contains("sometimes"), "{err}");
    }

    #[test]
    fn block_size_must_be_512_or_4096() {
        let mut c = base();
        c.volume.block_size_bytes = 1024;
        check_rejects(&c, "volume.block_size_bytes = 1024");
        c.volume.block_size_bytes = 512;
        c.mirror.dirty_granularity_bytes = 512;
        c.validate().unwrap();
    }

    #[test]
    fn volume_size_multiple_of_block() {
        let mut c = base();
        c.volume.size_bytes = 256 * MIB + 512;
        let msg = check_rejects(&c, "volume.size_bytes");
        assert!(
            msg.contains(&format!("volume.size_bytes = {}", 256 * MIB)),
            "{msg}"
        );
        c.volume.size_bytes = 0;
        c.validate().unwrap();
    }

    #[test]
    fn uuid_must_be_32_hex() {
        let mut c = base();
        c.volume.uuid = "xyz".into();
        check_rejects(&c, "volume.uuid");
        c.volume.uuid = "6d6972726f722d64656d6f2d766f6c3g".into();
        check_rejects(&c, "volume.uuid");
        c.volume.uuid = "6d697272-6f72-2d64-656d-6f2d766f6c30".into();
        c.validate().unwrap();
        assert_eq!(c.volume_uuid_bytes()[..4], [0x6d, 0x69, 0x72, 0x72]);
    }

    #[test]
    fn serial_and_model_lengths() {
        let mut c = base();
        c.volume.serial = "123456789012345678901".into();
        check_rejects(&c, "volume.serial");
        c.volume.serial = "12345678901234567890".into();
        c.volume.model = "a-very-long-model-name".into();
        check_rejects(&c, "volume.model");
    }

    #[test]
    fn ring_size_rule_and_message() {
        let mut c = base();
        c.ring.size_bytes = 1000;
        let msg = check_rejects(&c, "ring.size_bytes = 1000");
        assert_eq!(
            msg,
            "ring.size_bytes = 1000: must be a multiple of 4096 and at least 16 MiB; e.g. ring.size_bytes = 268435456"
        );
        c.ring.size_bytes = 16 * MIB + 4096;
        c.validate().unwrap();
        c.ring.size_bytes = 16 * MIB + 1;
        check_rejects(&c, "ring.size_bytes");
    }

    #[test]
    fn confirm_timeout_exceeds_peer_timeout() {
        let mut c = base();
        c.mirror.confirm = ConfirmMode::Timeout;
        c.mirror.confirm_timeout_ms = c.link.peer_timeout_ms;
        check_rejects(&c, "mirror.confirm_timeout_ms");
        c.mirror.confirm_timeout_ms = c.link.peer_timeout_ms + 1;
        c.validate().unwrap();
        // In ack mode the timeout is unused and only range-checked.
        c.mirror.confirm = ConfirmMode::Ack;
        c.mirror.confirm_timeout_ms = 10;
        c.validate().unwrap();
    }

    #[test]
    fn peer_portal_group_tag_must_differ_and_be_set_when_it_cannot_be_inferred() {
        let mut c = base();
        assert!(c.iscsi.enabled);
        c.iscsi.peer_portal_group_tag = Some(c.iscsi.portal_group_tag);
        let m = check_rejects(&c, "iscsi.peer_portal_group_tag");
        assert!(m.contains("must differ"), "{m}");
        c.iscsi.peer_portal_group_tag = Some(0);
        check_rejects(&c, "iscsi.peer_portal_group_tag");
        c.iscsi.peer_portal_group_tag = None;
        c.iscsi.portal_group_tag = 7;
        c.iscsi.peer_listen = Some("127.0.0.1:3261".parse().unwrap());
        let m = check_rejects(&c, "iscsi.peer_portal_group_tag");
        assert!(m.contains("cannot be inferred"), "{m}");
        c.iscsi.peer_portal_group_tag = Some(8);
        c.validate().unwrap();
    }

    #[test]
    fn fabric_link_fields_are_checked_with_the_fix() {
        let c = base().with_fabric_link("tcp");
        c.validate().unwrap();
        assert_eq!(
            c.link.fabric_listen().unwrap().port(),
            c.link.listen.port() + 1
        );
        // Round trip through TOML.
        let back: Config = toml::from_str(&c.to_toml_string()).unwrap();
        assert_eq!(back, c);
        let mut d = c.clone();
        d.link.fabric_ring_bytes = d.link.max_message_bytes;
        let m = check_rejects(&d, "link.fabric_ring_bytes");
        assert!(m.contains("e.g. link.fabric_ring_bytes = "), "{m}");
        d.link.fabric_ring_bytes = 2 * MIB + 1;
        check_rejects(&d, "link.fabric_ring_bytes");
        let mut d = c.clone();
        d.link.fabric_provider = "no such".into();
        let m = check_rejects(&d, "link.fabric_provider");
        assert!(m.contains("fi_info"), "{m}");
        let mut d = c.clone();
        d.link.fabric_port = Some(d.link.listen.port());
        check_rejects(&d, "link.fabric_port");
        d.link.fabric_port = None;
        d.link.listen.set_port(65535);
        check_rejects(&d, "link.fabric_port");
        // The fabric fields do not matter while transport = "tcp".
        let mut d = c;
        d.link.transport = LinkTransportKind::Tcp;
        d.link.fabric_ring_bytes = 1;
        d.validate().unwrap();
        // An unknown transport names the field.
        let t = base()
            .to_toml_string()
            .replace("transport = \"tcp\"", "transport = \"udp\"");
        let e = toml::from_str::<Config>(&t).unwrap_err().to_string();
        assert!(e.contains("transport") && e.contains("fabric"), "{e}");
    }

    #[test]
    fn dirty_granularity_power_of_two_at_least_block() {
        let mut c = base();
        c.mirror.dirty_granularity_bytes = 3 * 4096;
        check_rejects(&c, "mirror.dirty_granularity_bytes");
        c.mirror.dirty_granularity_bytes = 2048;
        check_rejects(&c, "mirror.dirty_granularity_bytes");
        c.mirror.dirty_granularity_bytes = 4096;
        c.validate().unwrap();
    }

    #[test]
    fn batch_limits() {
        let mut c = base();
        c.mirror.max_unacked_entries = 0;
        check_rejects(&c, "mirror.max_unacked_entries");
        let mut c = base();
        c.mirror.max_batch_bytes = c.reactor.max_io_bytes - 4096;
        check_rejects(&c, "mirror.max_batch_bytes");
        let mut c = base();
        c.mirror.max_batch_bytes = 32 * MIB;
        c.link.max_message_bytes = 64 * MIB;
        check_rejects(&c, "a quarter of ring.size_bytes");
    }

    #[test]
    fn replay_rates() {
        let mut c = base();
        c.mirror.min_replay_bytes_per_sec = 0;
        check_rejects(&c, "mirror.min_replay_bytes_per_sec");
        let mut c = base();
        c.mirror.max_replay_bytes_per_sec = c.mirror.min_replay_bytes_per_sec - 1;
        check_rejects(&c, "mirror.max_replay_bytes_per_sec");
        c.mirror.max_replay_bytes_per_sec = c.mirror.min_replay_bytes_per_sec;
        c.validate().unwrap();
    }

    #[test]
    fn link_peer_differs_from_listen() {
        let mut c = base();
        c.link.peer = c.link.listen;
        check_rejects(&c, "link.peer");
        c.link.peer = "0.0.0.0:7401".parse().unwrap();
        check_rejects(&c, "link.peer");
    }

    #[test]
    fn exactly_one_psk_source() {
        let mut c = base();
        c.link.psk = None;
        check_rejects(&c, "link.psk_file");
        c.link.psk = Some("short".into());
        check_rejects(&c, "link.psk");
        let dir = tmpdir("psk-both");
        let f = dir.join("psk");
        std::fs::write(&f, "0123456789abcdef0123\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        c.link.psk = Some("0123456789abcdef".into());
        c.link.psk_file = Some(f);
        check_rejects(&c, "both set");
    }

    #[test]
    fn psk_file_rules() {
        let dir = tmpdir("psk");
        let f = dir.join("psk");
        let mut c = base();
        c.link.psk = None;
        c.link.psk_file = Some(f.clone());
        check_rejects(&c, "cannot read it");
        std::fs::write(&f, "short\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        check_rejects(&c, "holds 5 bytes");
        std::fs::write(&f, "0123456789abcdef0123\n").unwrap();
        c.validate().unwrap();
        assert_eq!(c.psk_bytes().unwrap(), b"0123456789abcdef0123");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        check_rejects(&c, "chmod 600");
    }

    #[test]
    fn peer_timeout_exceeds_two_heartbeats() {
        let mut c = base();
        c.link.heartbeat_interval_ms = 100;
        c.link.peer_timeout_ms = 200;
        check_rejects(&c, "link.peer_timeout_ms = 200");
        c.link.peer_timeout_ms = 201;
        c.validate().unwrap();
        c.link.heartbeat_interval_ms = 5;
        c.link.peer_timeout_ms = 1000;
        check_rejects(&c, "link.heartbeat_interval_ms");
    }

    #[test]
    fn connect_retry_range() {
        let mut c = base();
        c.link.connect_retry_ms = 0;
        check_rejects(&c, "link.connect_retry_ms");
    }

    #[test]
    fn message_must_fit_a_batch() {
        let mut c = base();
        c.link.max_message_bytes = c.mirror.max_batch_bytes;
        let msg = check_rejects(&c, "link.max_message_bytes");
        assert!(
            msg.contains("e.g. link.max_message_bytes = 5242880"),
            "{msg}"
        );
    }

    #[test]
    fn reactor_cores_checked_against_machine() {
        let mut c = base();
        c.reactor.cores = vec![];
        check_rejects(&c, "reactor.cores = []");
        c.reactor.cores = vec![100_000];
        check_rejects(&c, "CPU 100000 is not online");
        c.reactor.cores = vec![0, 0];
        check_rejects(&c, "listed twice");
    }

    #[test]
    fn cpu_list_parsing() {
        let s = parse_cpu_list("0-3,6,8-9").unwrap();
        assert_eq!(s.into_iter().collect::<Vec<_>>(), vec![0, 1, 2, 3, 6, 8, 9]);
        assert!(parse_cpu_list("x").is_none());
        assert!(!online_cpus().is_empty());
    }

    #[test]
    fn reactor_limits() {
        let mut c = base();
        c.reactor.queue_depth = 0;
        check_rejects(&c, "reactor.queue_depth");
        c.reactor.queue_depth = 4097;
        check_rejects(&c, "reactor.queue_depth");
        c.reactor.queue_depth = 4096;
        c.validate().unwrap();
        c.reactor.max_io_bytes = 5000;
        check_rejects(&c, "reactor.max_io_bytes");
        let mut c = base();
        c.reactor.adaptive_spin_us = 1_000_000;
        check_rejects(&c, "reactor.adaptive_spin_us");
        let mut c = base();
        c.reactor.disk_submit_hold_us = 1001;
        check_rejects(&c, "reactor.disk_submit_hold_us");
        c.reactor.disk_submit_hold_us = 0;
        c.validate().unwrap();
        let mut c = base();
        c.reactor.buffer_pool_mib = 4;
        check_rejects(&c, "reactor.buffer_pool_mib");
        c.reactor.buffer_pool_mib = 2048;
        check_rejects(&c, "reactor.buffer_pool_mib");
        c.reactor.buffer_pool_mib = 16;
        c.reactor.max_io_bytes = 4 * MIB;
        let e = check_rejects(&c, "reactor.buffer_pool_mib");
        assert!(e.contains("must be 32 to 1024"), "{e}");
        c.reactor.buffer_pool_mib = 32;
        c.validate().unwrap();
        let mut c = base();
        c.reactor.zero_copy_receive_min_bytes = MIB + 1;
        let e = check_rejects(&c, "reactor.zero_copy_receive_min_bytes");
        assert!(e.contains("must be 0 to 1048576"), "{e}");
        for ok in [0, 4096, 16 * 1024, MIB] {
            c.reactor.zero_copy_receive_min_bytes = ok;
            c.validate().unwrap();
        }
    }

    #[test]
    fn at_least_one_target() {
        let mut c = base();
        c.nbd.enabled = false;
        c.nvme.enabled = false;
        c.iscsi.enabled = false;
        check_rejects(&c, "enable at least one target");
    }

    #[test]
    fn nbd_export_name() {
        let mut c = base();
        c.nbd.export_name = String::new();
        check_rejects(&c, "nbd.export_name");
    }

    #[test]
    fn nvme_names() {
        let mut c = base();
        c.nvme.subnqn = "vol0".into();
        check_rejects(&c, "nvme.subnqn");
        let mut c = base();
        c.nvme.allowed_hosts = vec!["nqn.2014-08.org.nvmexpress:uuid:1234".into(), "host".into()];
        check_rejects(&c, "\"host\" is not a host NQN");
        let mut c = base();
        c.nvme.port_id = 0;
        check_rejects(&c, "nvme.port_id");
        // Disabled targets are not checked.
        c.nvme.enabled = false;
        c.validate().unwrap();
    }

    #[test]
    fn iscsi_names_and_chap() {
        let mut c = base();
        c.iscsi.target_iqn = "iqn.2026-11.IO.deltamirror:vol0".into();
        check_rejects(&c, "iscsi.target_iqn");
        c.iscsi.target_iqn = "eui.0123456789abcdef".into();
        c.validate().unwrap();
        c.iscsi.portal_group_tag = 0;
        check_rejects(&c, "iscsi.portal_group_tag");
        let mut c = base();
        c.iscsi.chap_user = Some("host1".into());
        check_rejects(&c, "set both");
        c.iscsi.chap_secret = Some("elevenchars".into());
        check_rejects(&c, "iscsi.chap_secret: 11 characters");
        c.iscsi.chap_secret = Some("twelve-chars".into());
        c.validate().unwrap();
    }

    #[test]
    fn listeners_must_not_collide() {
        let mut c = base();
        c.nbd.listen = c.admin.listen;
        check_rejects(&c, "conflicts with admin.listen");
        let mut c = base();
        c.nvme.listen = format!("0.0.0.0:{}", c.link.listen.port()).parse().unwrap();
        check_rejects(&c, "conflicts with link.listen");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let mut c = base();
        c.node.id = 0;
        c.ring.size_bytes = 1;
        c.reactor.queue_depth = 0;
        assert_eq!(c.validate().unwrap_err().len(), 3);
    }

    #[test]
    fn load_resolves_relative_paths_and_reports_errors() {
        let dir = tmpdir("load");
        let mut c = base();
        c.node.data_dir = PathBuf::from("data");
        c.volume.path = PathBuf::from("data/volume.img");
        let file = dir.join("node.toml");
        std::fs::write(&file, c.to_toml_string()).unwrap();
        let loaded = Config::load(&file).unwrap();
        assert_eq!(loaded.node.data_dir, dir.join("data"));
        assert_eq!(loaded.volume.path, dir.join("data/volume.img"));

        let err = Config::load(&dir.join("missing.toml")).unwrap_err();
        assert!(err.to_string().contains("cannot read config file"), "{err}");

        std::fs::write(&file, "[node]\nid = 1\n").unwrap();
        let err = Config::load(&file).unwrap_err().to_string();
        assert!(err.contains("missing field"), "{err}");

        c.ring.size_bytes = 1000;
        std::fs::write(&file, c.to_toml_string()).unwrap();
        let err = Config::load(&file).unwrap_err().to_string();
        assert!(
            err.contains("1 problem:\n  - ring.size_bytes = 1000"),
            "{err}"
        );
    }

    #[test]
    fn shipped_configs_parse_and_validate() {
        let dir = tmpdir("shipped");
        let psk = dir.join("psk");
        std::fs::write(&psk, "0123456789abcdef0123456789abcdef\n").unwrap();
        std::fs::set_permissions(&psk, std::fs::Permissions::from_mode(0o600)).unwrap();
        let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let mut pair = Vec::new();
        for name in ["primary.toml", "backup.toml"] {
            let text = std::fs::read_to_string(configs.join(name)).unwrap();
            let mut c = Config::parse(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
            // The shipped files point at /etc/deltamirror/psk and pin CPUs
            // of the target machine; check the rest on this one.
            c.link.psk_file = Some(psk.clone());
            c.reactor.cores = vec![0];
            c.validate().unwrap_or_else(|p| panic!("{name}: {p:#?}"));
            pair.push(c);
        }
        assert_eq!(pair[0].volume.uuid, pair[1].volume.uuid);
        assert_eq!(pair[0].volume.serial, pair[1].volume.serial);
        assert_eq!(pair[0].link.peer, pair[1].link.listen);
        assert_eq!(pair[1].link.peer, pair[0].link.listen);
        assert_eq!(pair[0].nvme.subnqn, pair[1].nvme.subnqn);
        assert_ne!(pair[0].nvme.port_id, pair[1].nvme.port_id);
        assert_eq!(pair[0].iscsi.target_iqn, pair[1].iscsi.target_iqn);
        assert_ne!(
            pair[0].iscsi.portal_group_tag,
            pair[1].iscsi.portal_group_tag
        );
        assert_ne!(pair[0].node.id, pair[1].node.id);
        assert_eq!(pair[0].node.initial_role, Role::Primary);
        assert_eq!(pair[1].node.initial_role, Role::Backup);
    }
}
