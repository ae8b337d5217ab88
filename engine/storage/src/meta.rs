//! Crash-safe storage for one small opaque blob: the node's persistent state
//! (role, generation history, dirty map, ...).
//!
//! The file holds two fixed-size slots. Each write goes to the slot that does
//! *not* hold the newest state, with a higher sequence number, and is
//! durable (pwrite + fdatasync) when [`MetaStore::write`] returns. A crash
//! during a write can only tear that slot; the other still holds the previous
//! state, which [`MetaStore::open`] then returns.
//!
//! Slot layout (little-endian), at file offset `slot * slot_size_bytes`:
//!
//! ```text
//!  0  magic "DMIRMETA"      8 bytes
//!  8  version               u32 (1)
//! 12  reserved              u32 (0)
//! 16  slot_size_bytes       u64
//! 24  seq                   u64  (newest valid slot wins; starts at 1)
//! 32  len                   u64  (bytes of state)
//! 40  crc32c                u32  over bytes 0..40 and the state
//! 44  reserved              u32 (0)
//! 48  state                 len bytes
//! ```

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const META_MAGIC: &[u8; 8] = b"DMIRMETA";
const META_VERSION: u32 = 1;
/// Bytes of each slot used by its header.
pub const META_SLOT_HEADER_BYTES: usize = 48;
const S_VERSION: usize = 8;
const S_SLOT_SIZE: usize = 16;
const S_SEQ: usize = 24;
const S_LEN: usize = 32;
const S_CRC: usize = 40;

#[derive(Debug)]
pub enum MetaError {
    Io(io::Error),
    /// The file's size is not two valid slots.
    BadSize {
        path: PathBuf,
        file_bytes: u64,
    },
    /// Neither slot holds a valid state although both were written.
    Corrupt {
        path: PathBuf,
        detail: String,
    },
}

impl fmt::Display for MetaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetaError::Io(e) => write!(
                f,
                "metadata store I/O error: {e}; check the path, permissions and free space"
            ),
            MetaError::BadSize { path, file_bytes } => write!(
                f,
                "{} is {file_bytes} bytes, not two metadata slots (each a multiple of 4096); \
                 check the configured metadata path",
                path.display()
            ),
            MetaError::Corrupt { path, detail } => write!(
                f,
                "{}: no valid metadata slot ({detail}); the node's role and generation history \
                 are lost: keep the file for diagnosis and re-create this node's state from \
                 its peer (this node will need a full remirror)",
                path.display()
            ),
        }
    }
}

impl std::error::Error for MetaError {}

impl From<io::Error> for MetaError {
    fn from(e: io::Error) -> MetaError {
        MetaError::Io(e)
    }
}

pub struct MetaStore {
    path: PathBuf,
    file: File,
    slot_size_bytes: u64,
    /// Slot holding the newest valid state, and its seq (0: none yet).
    newest_slot: usize,
    newest_seq: u64,
    /// Reused for every write so writing does not allocate.
    scratch: Vec<u8>,
}

struct Slot {
    seq: u64,
    bytes: Vec<u8>,
}

fn slot_crc(header: &[u8], bytes: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&header[..S_CRC]), bytes)
}

fn rd_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

impl MetaStore {
    /// Create a new, empty store (refuses to overwrite an existing file).
    /// `slot_size_bytes` is a multiple of 4096, at least 4096; a state can be
    /// up to `slot_size_bytes - 48` bytes.
    pub fn create(path: &Path, slot_size_bytes: u64) -> Result<MetaStore, MetaError> {
        if slot_size_bytes < 4096 || !slot_size_bytes.is_multiple_of(4096) {
            return Err(MetaError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: metadata slot size {slot_size_bytes} must be a multiple of 4096",
                    path.display()
                ),
            )));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "{}: cannot create metadata store: {e} (an existing store is never \
                         overwritten; remove it only if this node's state is to be discarded)",
                        path.display()
                    ),
                )
            })?;
        file.set_len(2 * slot_size_bytes)?;
        file.sync_all()?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        Ok(MetaStore {
            path: path.to_path_buf(),
            file,
            slot_size_bytes,
            newest_slot: 1,
            newest_seq: 0,
            scratch: Vec::with_capacity(slot_size_bytes as usize),
        })
    }

    /// Open a store and return the newest valid state (`None` if nothing was
    /// ever written, or the only write was torn).
    pub fn open(path: &Path) -> Result<(MetaStore, Option<Vec<u8>>), MetaError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("{}: cannot open metadata store: {e}", path.display()),
                )
            })?;
        let file_bytes = file.metadata()?.len();
        let slot_size_bytes = file_bytes / 2;
        if file_bytes % 2 != 0 || slot_size_bytes < 4096 || slot_size_bytes % 4096 != 0 {
            return Err(MetaError::BadSize {
                path: path.to_path_buf(),
                file_bytes,
            });
        }
        let mut slots = [None, None];
        let mut blank = [true, true];
        let mut buf = vec![0u8; slot_size_bytes as usize];
        for (i, slot) in slots.iter_mut().enumerate() {
            file.read_exact_at(&mut buf, i as u64 * slot_size_bytes)?;
            blank[i] = buf[..META_SLOT_HEADER_BYTES].iter().all(|&b| b == 0);
            *slot = Self::parse(&buf, slot_size_bytes);
            if slot.is_none() && !blank[i] {
                log::warn!(
                    "{}: metadata slot {i} is invalid (torn write or damage); using the other",
                    path.display()
                );
            }
        }
        let newest = match (&slots[0], &slots[1]) {
            (Some(a), Some(b)) => Some(if a.seq >= b.seq { 0 } else { 1 }),
            (Some(_), None) => Some(0),
            (None, Some(_)) => Some(1),
            (None, None) if blank[0] || blank[1] => None,
            (None, None) => {
                return Err(MetaError::Corrupt {
                    path: path.to_path_buf(),
                    detail: "both slots fail their checksum".into(),
                })
            }
        };
        let mut store = MetaStore {
            path: path.to_path_buf(),
            file,
            slot_size_bytes,
            newest_slot: 1,
            newest_seq: 0,
            scratch: Vec::with_capacity(slot_size_bytes as usize),
        };
        let state = newest.map(|i| {
            let slot = slots[i].take().expect("valid slot");
            store.newest_slot = i;
            store.newest_seq = slot.seq;
            slot.bytes
        });
        Ok((store, state))
    }

    fn parse(buf: &[u8], slot_size_bytes: u64) -> Option<Slot> {
        let h = &buf[..META_SLOT_HEADER_BYTES];
        let len = rd_u64(h, S_LEN);
        let ok = &h[..8] == META_MAGIC
            && u32::from_le_bytes(h[S_VERSION..S_VERSION + 4].try_into().unwrap()) == META_VERSION
            && h[12..16] == [0; 4]
            && h[44..48] == [0; 4]
            && rd_u64(h, S_SLOT_SIZE) == slot_size_bytes
            && len <= slot_size_bytes - META_SLOT_HEADER_BYTES as u64;
        if !ok {
            return None;
        }
        let bytes = &buf[META_SLOT_HEADER_BYTES..META_SLOT_HEADER_BYTES + len as usize];
        let crc = u32::from_le_bytes(h[S_CRC..S_CRC + 4].try_into().unwrap());
        (slot_crc(h, bytes) == crc).then(|| Slot {
            seq: rd_u64(h, S_SEQ),
            bytes: bytes.to_vec(),
        })
    }

    /// Largest state [`MetaStore::write`] accepts.
    pub fn max_state_bytes(&self) -> usize {
        self.slot_size_bytes as usize - META_SLOT_HEADER_BYTES
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Durably replace the state: written to the older slot, then fdatasync.
    /// On error the previous state is still the one `open` returns.
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        if bytes.len() > self.max_state_bytes() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: metadata of {} bytes does not fit a {}-byte slot (at most {}); \
                     re-create the store with a larger slot size",
                    self.path.display(),
                    bytes.len(),
                    self.slot_size_bytes,
                    self.max_state_bytes()
                ),
            ));
        }
        let slot = 1 - self.newest_slot;
        let seq = self.newest_seq + 1;
        let buf = &mut self.scratch;
        buf.clear();
        buf.extend_from_slice(META_MAGIC);
        buf.extend_from_slice(&META_VERSION.to_le_bytes());
        buf.extend_from_slice(&0u32.to_le_bytes());
        buf.extend_from_slice(&self.slot_size_bytes.to_le_bytes());
        buf.extend_from_slice(&seq.to_le_bytes());
        buf.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        let crc = slot_crc(buf, bytes);
        buf.extend_from_slice(&crc.to_le_bytes());
        buf.extend_from_slice(&0u32.to_le_bytes());
        buf.extend_from_slice(bytes);
        self.file
            .write_all_at(buf, slot as u64 * self.slot_size_bytes)?;
        self.file.sync_data()?;
        self.newest_slot = slot;
        self.newest_seq = seq;
        Ok(())
    }
}
