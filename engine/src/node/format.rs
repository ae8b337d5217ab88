//! Formatting a node's data directory: ring and metadata.

use super::*;

/// Prepares a node's persistent state for the volume at `opts.volume_path`.
/// Refuses an already formatted data directory unless `force`. `replace`:
/// the disk is new and gets a full remirror from the peer.
pub fn format(
    opts: &NodeOptions,
    ring_bytes: u64,
    role: Role,
    force: bool,
    replace: bool,
) -> Result<(), String> {
    prepare_dir(opts, force)?;
    let dev = UringBackend::open(
        &opts.volume_path,
        &UringConfig {
            queue_depth: 4,
            file_block_size: opts.block_size,
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
    format_with_size(opts, size, ring_bytes, role, force, replace)
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

/// [`format`] for a volume of `volume_bytes` that is not at
/// `opts.volume_path` (a node started with [`Node::start_on`] on another
/// backend, e.g. in memory).
pub fn format_with_size(
    opts: &NodeOptions,
    volume_bytes: u64,
    ring_bytes: u64,
    role: Role,
    force: bool,
    replace: bool,
) -> Result<(), String> {
    if volume_bytes == 0 {
        return Err(format!(
            "the volume for {} is 0 bytes: give it a size (volume.size_bytes) before formatting",
            opts.data_dir.display()
        ));
    }
    prepare_dir(opts, force)?;
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
