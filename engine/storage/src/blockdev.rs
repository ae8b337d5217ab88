//! Block devices: their size and logical block size (the block-layer
//! ioctls), exclusive opens, and the on-disk signatures that say a device
//! already holds something.
//!
//! The io_uring backend probes the volume's device here, the ring its own
//! device (`ring.path` naming a raw device or partition), and
//! `deltamirror format` asks [`signature`] before it writes a new ring onto
//! a device.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::backend::AlignedBuf;

// BLKGETSIZE64 = _IOR(0x12, 114, size_t) from <linux/fs.h> (generic
// encoding, as on x86_64 and aarch64); libc has no constant for it.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// What the block layer says about a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Bytes the device holds (BLKGETSIZE64).
    pub size_bytes: u64,
    /// Its logical block size (BLKSSZGET): the unit of O_DIRECT I/O.
    pub logical_block_bytes: u32,
}

/// Size and logical block size of the block device open as `file`.
pub fn geometry(file: &File) -> io::Result<Geometry> {
    let fd = file.as_raw_fd();
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points
    // to a live local.
    if unsafe { libc::ioctl(fd, BLKGETSIZE64 as _, &mut size as *mut u64) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("BLKGETSIZE64 failed: {e}"),
        ));
    }
    let mut ssz: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points to
    // a live local.
    if unsafe { libc::ioctl(fd, libc::BLKSSZGET as _, &mut ssz as *mut libc::c_int) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("BLKSSZGET failed: {e}")));
    }
    Ok(Geometry {
        size_bytes: size,
        logical_block_bytes: ssz as u32,
    })
}

/// Whether `path` names a block device (false if it names nothing).
pub fn is_block_device(path: &Path) -> io::Result<bool> {
    match std::fs::metadata(path) {
        Ok(m) => Ok(m.file_type().is_block_device()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Open the block device at `path` exclusively (O_EXCL on a block device:
/// the kernel refuses it while the device is mounted, is part of an md or
/// device-mapper device, or another process holds it open exclusively, and
/// refuses them while we hold it), for reading and `write`, with `flags`
/// added (O_DIRECT). A refusal for being in use (EBUSY) says so, once the
/// device has stayed busy for [`BUSY_PATIENCE`]: a claim can outlive its
/// holder's close by a moment (the kernel releases it at the last
/// reference to the file, which can come later than the close; a ring
/// reopened right after it was dropped met EBUSY under the full test
/// suite), and a partition rescan claims the device for a moment too.
pub fn open_exclusive(path: &Path, write: bool, flags: i32) -> io::Result<File> {
    let since = Instant::now();
    loop {
        let r = OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(libc::O_EXCL | flags)
            .open(path);
        match r {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                if since.elapsed() < BUSY_PATIENCE {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "{} is in use ({e}, for {} s): it is mounted, part of a RAID, LVM or \
                         device-mapper device, or another process (another deltamirror node?) \
                         has it open exclusively; the ring needs a device of its own",
                        path.display(),
                        BUSY_PATIENCE.as_secs()
                    ),
                ));
            }
            r => return r,
        }
    }
}

/// How long [`open_exclusive`] retries a device that is busy.
pub const BUSY_PATIENCE: Duration = Duration::from_secs(2);

/// Bytes from the start of a device that [`signature`] reads: the btrfs
/// superblock (64 KiB + 64) and a 64 KiB-page swap signature are the
/// furthest in.
pub const SIGNATURE_SCAN_BYTES: usize = 128 << 10;

/// What [`signature`] recognises at the start of a device: only signatures
/// that are cheap to check and certain when they match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signature {
    /// A deltamirror ring header (magic `DMIRRING` in one of its header
    /// slots).
    Ring,
    /// ext2/3/4 (superblock magic 0xEF53 at byte 1080).
    Ext,
    /// XFS (`XFSB` at byte 0).
    Xfs,
    /// btrfs (`_BHRfS_M` at byte 65600).
    Btrfs,
    /// A GPT partition table (`EFI PART` at byte 512 or 4096).
    Gpt,
    /// An MBR boot signature (0x55 0xAA at byte 510): a DOS partition
    /// table, or a FAT/NTFS boot sector.
    Mbr,
    /// An LVM2 physical volume label (`LABELONE` ... `LVM2 001` in one of
    /// the first four 512-byte sectors).
    Lvm2,
    /// Linux swap (`SWAPSPACE2` or `SWAP-SPACE` at the end of the first
    /// page, for pages of 4, 8, 16 or 64 KiB).
    Swap,
}

impl Signature {
    /// What was found, for an operator.
    pub fn describe(self) -> &'static str {
        match self {
            Signature::Ring => "a deltamirror ring",
            Signature::Ext => "an ext2/ext3/ext4 filesystem",
            Signature::Xfs => "an XFS filesystem",
            Signature::Btrfs => "a btrfs filesystem",
            Signature::Gpt => "a GPT partition table",
            Signature::Mbr => {
                "an MBR boot signature (a DOS partition table or a FAT/NTFS boot sector)"
            }
            Signature::Lvm2 => "an LVM2 physical volume label",
            Signature::Swap => "a Linux swap signature",
        }
    }
}

/// The first signature found in `head`, the first bytes of a device (up to
/// [`SIGNATURE_SCAN_BYTES`]; a shorter device gives fewer). Our own ring is
/// checked first: its header slots hold nothing at the other offsets.
pub fn find_signature(head: &[u8]) -> Option<Signature> {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    let slot = crate::ring::RING_HEADER_SLOT_BYTES as usize;
    if (0..crate::ring::RING_HEADER_SLOTS).any(|i| at(i * slot, crate::ring::RING_MAGIC)) {
        return Some(Signature::Ring);
    }
    if at(1080, &0xEF53u16.to_le_bytes()) {
        return Some(Signature::Ext);
    }
    if at(0, b"XFSB") {
        return Some(Signature::Xfs);
    }
    if at(65536 + 64, b"_BHRfS_M") {
        return Some(Signature::Btrfs);
    }
    if at(512, b"EFI PART") || at(4096, b"EFI PART") {
        return Some(Signature::Gpt);
    }
    if (0..4).any(|s| at(s * 512, b"LABELONE") && at(s * 512 + 24, b"LVM2 001")) {
        return Some(Signature::Lvm2);
    }
    let swap = [4096usize, 8192, 16384, 65536]
        .iter()
        .any(|page| at(page - 10, b"SWAPSPACE2") || at(page - 10, b"SWAP-SPACE"));
    if swap {
        return Some(Signature::Swap);
    }
    // Last: a GPT disk carries a protective MBR too, and FAT/NTFS boot
    // sectors end with the same two bytes.
    if at(510, &[0x55, 0xAA]) {
        return Some(Signature::Mbr);
    }
    None
}

/// The signature at the start of the block device at `path`, read with an
/// exclusive open (a device in use is refused as [`open_exclusive`] says).
pub fn signature(path: &Path) -> io::Result<Option<Signature>> {
    let file = open_exclusive(path, false, libc::O_DIRECT)?;
    let len = geometry(&file)?.size_bytes.min(SIGNATURE_SCAN_BYTES as u64) as usize;
    let mut buf = AlignedBuf::new(SIGNATURE_SCAN_BYTES);
    let b = &mut buf.as_mut_slice()[..len];
    file.read_exact_at(b, 0)?;
    Ok(find_signature(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(off: usize, bytes: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; SIGNATURE_SCAN_BYTES];
        v[off..off + bytes.len()].copy_from_slice(bytes);
        v
    }

    #[test]
    fn recognises_each_signature_at_its_offset() {
        assert_eq!(find_signature(&vec![0u8; SIGNATURE_SCAN_BYTES]), None);
        assert_eq!(find_signature(&[]), None);
        let cases: [(usize, &[u8], Signature); 10] = [
            (8192, b"DMIRRING", Signature::Ring),
            (1080, &[0x53, 0xEF], Signature::Ext),
            (0, b"XFSB", Signature::Xfs),
            (65600, b"_BHRfS_M", Signature::Btrfs),
            (512, b"EFI PART", Signature::Gpt),
            (4096, b"EFI PART", Signature::Gpt),
            (510, &[0x55, 0xAA], Signature::Mbr),
            (4086, b"SWAPSPACE2", Signature::Swap),
            (65526, b"SWAP-SPACE", Signature::Swap),
            (65527, b"SWAPSPACE2", Signature::Swap),
        ];
        for (off, magic, want) in cases {
            let found = find_signature(&with(off, magic));
            if off == 65527 {
                assert_eq!(found, None, "a magic one byte off is no signature");
            } else {
                assert_eq!(found, Some(want), "{want:?} at {off}");
            }
        }
        let mut lvm = with(512, b"LABELONE");
        lvm[512 + 24..512 + 32].copy_from_slice(b"LVM2 001");
        assert_eq!(find_signature(&lvm), Some(Signature::Lvm2));
        assert_eq!(find_signature(&with(512, b"LABELONE")), None);
        // A GPT disk's protective MBR does not hide its GPT.
        let mut gpt = with(512, b"EFI PART");
        gpt[510..512].copy_from_slice(&[0x55, 0xAA]);
        assert_eq!(find_signature(&gpt), Some(Signature::Gpt));
        // A device shorter than an offset is no match there.
        assert_eq!(find_signature(&[0u8; 1081][..1081]), None);
    }
}
