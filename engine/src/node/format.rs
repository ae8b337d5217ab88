//! Formatting a node's data directory: ring and metadata.

use super::*;
use storage::blockdev::{self, Signature};

/// What `deltamirror format` may overwrite, and how the node starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FormatFlags {
    /// Erase an already formatted node: its metadata and its ring, a ring
    /// on a block device (`ring.path`) included.
    pub force: bool,
    /// The disk is new or replaced: it gets a full remirror from the peer.
    pub replace: bool,
    /// Write the ring onto a block device that holds a filesystem, a
    /// partition table, an LVM label or swap (see [`blockdev::Signature`]).
    /// `force` does not: it erases deltamirror's own state only.
    pub force_ring_device: bool,
}

/// Prepares a node's persistent state for the volume at `opts.volume_path`.
/// Refuses an already formatted data directory unless `flags.force`, and a
/// ring device that holds something ([`check_ring_device`]).
pub fn format(
    opts: &NodeOptions,
    ring_bytes: u64,
    role: Role,
    flags: FormatFlags,
) -> Result<(), String> {
    prepare_dir(opts, flags.force)?;
    let dev = UringBackend::open(
        &opts.volume_path,
        &UringConfig {
            queue_depth: 4,
            file_block_size: opts.block_size,
            keep_space: opts.keep_volume_space,
            submit_hold_us: 0,
            hand_over: Default::default(),
        },
    )
    .map_err(|e| {
        format!(
            "cannot open volume.path {}: {e}",
            opts.volume_path.display()
        )
    })?;
    let size = dev.size_bytes();
    drop(dev);
    format_with_size(opts, size, ring_bytes, role, flags)
}

/// Creates the data directory; refuses one already formatted unless `force`.
fn prepare_dir(opts: &NodeOptions, force: bool) -> Result<(), String> {
    std::fs::create_dir_all(&opts.data_dir).map_err(|e| {
        format!(
            "cannot create node.data_dir {}: {e}",
            opts.data_dir.display()
        )
    })?;
    let mp = meta_path(&opts.data_dir);
    if mp.exists() && !force {
        return Err(format!(
            "{} is already formatted (node metadata at {}); add --force to erase this node's ring and state",
            opts.data_dir.display(),
            mp.display()
        ));
    }
    Ok(())
}

/// [`format()`] for a volume of `volume_bytes` that is not at
/// `opts.volume_path` (a node started with [`Node::start_on`] on another
/// backend, e.g. in memory).
pub fn format_with_size(
    opts: &NodeOptions,
    volume_bytes: u64,
    ring_bytes: u64,
    role: Role,
    flags: FormatFlags,
) -> Result<(), String> {
    let FormatFlags { force, replace, .. } = flags;
    if volume_bytes == 0 {
        return Err(format!(
            "the volume for {} is 0 bytes: give it a size (volume.size_bytes) before formatting",
            opts.data_dir.display()
        ));
    }
    prepare_dir(opts, force)?;
    check_ring_device(&opts.ring_path, flags)?;
    let size = volume_bytes;
    let mp = meta_path(&opts.data_dir);
    if force && mp.exists() {
        // The metadata store never overwrites itself: --force erases it.
        std::fs::remove_file(&mp)
            .map_err(|e| format!("cannot remove the old metadata {}: {e}", mp.display()))?;
    }
    Ring::create(&opts.ring_path, ring_bytes, 1)
        .map_err(|e| format!("cannot create the ring {}: {e}", opts.ring_path.display()))?;
    let meta = Meta::formatted(
        opts.node_id,
        role,
        size,
        opts.core.dirty_granularity_bytes,
        replace,
    );
    let bytes = meta.encode();
    // Room for the densest dirty map: the encoding is sparse while clean.
    let slot = (meta.encoded_len_bound() as u64 + 4096).div_ceil(4096) * 4096 + 4096;
    let mut store = MetaStore::create(&mp, slot)
        .map_err(|e| format!("cannot create the metadata store: {e}"))?;
    store
        .write(&bytes)
        .map_err(|e| format!("cannot write the metadata: {e}"))?;
    // A new format settles what a standalone run left behind.
    match std::fs::remove_file(standalone::marker_path(&opts.data_dir)) {
        Ok(()) => log::info!("removed the standalone marker"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot remove the standalone marker: {e}")),
    }
    Ok(())
}

/// When `ring_path` names a block device: refuses it while it is in use
/// (mounted, or held open exclusively) and, unless the flags allow it, when
/// it already holds something ([`blockdev::signature`]): a deltamirror ring
/// (`--force`, or `--force-ring-device`) or a filesystem, partition table,
/// LVM label or swap (`--force-ring-device` only). A regular file passes.
pub fn check_ring_device(ring_path: &Path, flags: FormatFlags) -> Result<(), String> {
    let shown = ring_path.display();
    match blockdev::is_block_device(ring_path) {
        Ok(false) => return Ok(()),
        Ok(true) => {}
        Err(e) => return Err(format!("cannot stat ring.path {shown}: {e}")),
    }
    let found = blockdev::signature(ring_path)
        .map_err(|e| format!("cannot use the ring device {shown} (ring.path): {e}"))?;
    let Some(sig) = found else { return Ok(()) };
    let allowed = match sig {
        Signature::Ring => flags.force || flags.force_ring_device,
        _ => flags.force_ring_device,
    };
    if allowed {
        log::warn!("overwriting {} on the ring device {shown}", sig.describe());
        return Ok(());
    }
    Err(match sig {
        Signature::Ring => format!(
            "the ring device {shown} (ring.path) already holds a deltamirror ring (this \
             node's from an earlier format, or another node's): check that ring.path names \
             this node's ring device; add --force to erase that ring"
        ),
        _ => format!(
            "the ring device {shown} (ring.path) holds {}: refusing to write a ring over it; \
             check that ring.path names the device meant for the ring, or add \
             --force-ring-device to overwrite it (--force does not)",
            sig.describe()
        ),
    })
}
