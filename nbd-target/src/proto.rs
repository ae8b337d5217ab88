//! NBD wire constants and the pure request decoder.
//!
//! Everything here is a function of bytes and numbers: no sockets, no
//! threads, no volume. The transmission loop and the fuzz tests both drive
//! [`decode_request`]; the errno mapping for volume errors lives in
//! [`nbd_errno`] and nowhere else.

use volume::IoError;

// Handshake magics.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;

// NBD_REP_INFO payload types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// The transmission flags every deltamirror export advertises.
pub const EXPORT_FLAGS: u16 = TFLAG_HAS_FLAGS
    | TFLAG_SEND_FLUSH
    | TFLAG_SEND_FUA
    | TFLAG_SEND_TRIM
    | TFLAG_SEND_WRITE_ZEROES
    | TFLAG_CAN_MULTI_CONN;

// Transmission phase.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const REQUEST_HEADER_BYTES: usize = 28;
pub const SIMPLE_REPLY_HEADER_BYTES: usize = 16;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

// NBD error values (fixed by the protocol, not the host's errno).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ESHUTDOWN: u32 = 108;

/// A write payload up to this many bytes is read and discarded when the
/// request is refused, so the stream stays in sync. proto.md asks servers
/// not to treat payloads up to 2^25 bytes as a denial of service; beyond
/// that the connection is closed instead of reading the payload.
pub const DRAIN_LIMIT_BYTES: u32 = 1 << 25;

/// What the decoder needs to know about the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub size_bytes: u64,
    /// Logical block size: offsets and lengths must be multiples of it.
    pub block_size: u32,
    /// Largest READ/WRITE payload (the volume's `max_io_bytes`, rounded
    /// down to the block size).
    pub max_payload_bytes: u32,
}

/// A 28-byte request header, fields in host order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub magic: u32,
    pub flags: u16,
    pub kind: u16,
    pub handle: u64,
    pub offset: u64,
    pub length: u32,
}

impl RequestHeader {
    pub fn parse(b: &[u8; REQUEST_HEADER_BYTES]) -> RequestHeader {
        RequestHeader {
            magic: u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            flags: u16::from_be_bytes([b[4], b[5]]),
            kind: u16::from_be_bytes([b[6], b[7]]),
            handle: u64::from_be_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
            offset: u64::from_be_bytes([b[16], b[17], b[18], b[19], b[20], b[21], b[22], b[23]]),
            length: u32::from_be_bytes([b[24], b[25], b[26], b[27]]),
        }
    }
}

/// A request that passed validation and may be handed to the volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// `length` bytes of payload follow the header.
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
    },
}

/// Why the connection must be closed instead of answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Violation {
    BadMagic(u32),
    /// A refused write whose payload is too large to read and discard.
    OversizedPayload(u32),
}

/// What to do with one request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoded {
    Execute(Command),
    /// Read and discard `drain` payload bytes, then reply with `errno`.
    Refuse {
        errno: u32,
        drain: u32,
    },
    /// NBD_CMD_DISC: finish in-flight requests, then close.
    Disconnect,
    /// Close the connection without replying.
    Close(Violation),
}

/// Validates a request header against the export. Pure and total: every
/// input gives an answer, none panics.
pub fn decode_request(h: &RequestHeader, lim: &Limits) -> Decoded {
    if h.magic != REQUEST_MAGIC {
        return Decoded::Close(Violation::BadMagic(h.magic));
    }
    // Only a write carries a payload; a refused write must consume it.
    let payload = if h.kind == CMD_WRITE { h.length } else { 0 };
    let refuse = |errno: u32| {
        if payload > DRAIN_LIMIT_BYTES {
            Decoded::Close(Violation::OversizedPayload(payload))
        } else {
            Decoded::Refuse {
                errno,
                drain: payload,
            }
        }
    };
    // FUA is accepted on every command (proto.md: the server MUST accept
    // it once SEND_FUA is advertised); NO_HOLE only on WRITE_ZEROES.
    let allowed = match h.kind {
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        _ => CMD_FLAG_FUA,
    };
    let fua = h.flags & CMD_FLAG_FUA != 0;
    match h.kind {
        CMD_DISC => return Decoded::Disconnect,
        CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_WRITE_ZEROES => {}
        _ => return refuse(EINVAL),
    }
    if h.flags & !allowed != 0 {
        return refuse(EINVAL);
    }
    if h.kind == CMD_FLUSH {
        // Offset and length are reserved and must be zero.
        return if h.offset == 0 && h.length == 0 {
            Decoded::Execute(Command::Flush)
        } else {
            refuse(EINVAL)
        };
    }
    let len = h.length;
    let bs = lim.block_size.max(1) as u64;
    if len == 0 || !h.offset.is_multiple_of(bs) || !(len as u64).is_multiple_of(bs) {
        return refuse(EINVAL);
    }
    let is_data = matches!(h.kind, CMD_READ | CMD_WRITE);
    if is_data && len > lim.max_payload_bytes {
        return refuse(EOVERFLOW);
    }
    let in_range = matches!(h.offset.checked_add(len as u64), Some(end) if end <= lim.size_bytes);
    if !in_range {
        // proto.md: ENOSPC for a write past the end, EINVAL otherwise.
        return refuse(if h.kind == CMD_READ { EINVAL } else { ENOSPC });
    }
    let offset = h.offset;
    Decoded::Execute(match h.kind {
        CMD_READ => Command::Read { offset, len },
        CMD_WRITE => Command::Write { offset, len, fua },
        CMD_TRIM => Command::Trim { offset, len, fua },
        _ => Command::WriteZeroes { offset, len, fua },
    })
}

/// The one place that turns a volume error into an NBD error value.
/// `mutation` is true for WRITE, TRIM and WRITE_ZEROES.
pub fn nbd_errno(err: IoError, mutation: bool) -> u32 {
    match err {
        IoError::NotPrimary => EPERM,
        IoError::OutOfRange if mutation => ENOSPC,
        IoError::OutOfRange | IoError::Unaligned => EINVAL,
        IoError::TooLarge => EOVERFLOW,
        // proto.md: map EDQUOT and EFBIG (and ENOSPC itself) to ENOSPC.
        IoError::Io(e) if e == libc::ENOSPC || e == libc::EDQUOT || e == libc::EFBIG => ENOSPC,
        IoError::Io(_) => EIO,
        IoError::Unavailable => ESHUTDOWN,
    }
}

/// Encodes a simple reply header.
pub fn simple_reply(errno: u32, handle: u64) -> [u8; SIMPLE_REPLY_HEADER_BYTES] {
    let mut b = [0u8; SIMPLE_REPLY_HEADER_BYTES];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&errno.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIM: Limits = Limits {
        size_bytes: 1 << 20,
        block_size: 512,
        max_payload_bytes: 65536,
    };

    fn hdr(kind: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader {
            magic: REQUEST_MAGIC,
            flags,
            kind,
            handle: 7,
            offset,
            length,
        }
    }

    #[test]
    fn decode_table() {
        use Decoded::*;
        let cases: &[(RequestHeader, Decoded)] = &[
            (
                hdr(CMD_READ, 0, 0, 512),
                Execute(Command::Read {
                    offset: 0,
                    len: 512,
                }),
            ),
            (
                hdr(CMD_WRITE, CMD_FLAG_FUA, 512, 1024),
                Execute(Command::Write {
                    offset: 512,
                    len: 1024,
                    fua: true,
                }),
            ),
            (hdr(CMD_FLUSH, 0, 0, 0), Execute(Command::Flush)),
            (
                hdr(CMD_FLUSH, 0, 512, 0),
                Refuse {
                    errno: EINVAL,
                    drain: 0,
                },
            ),
            (
                hdr(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 1 << 20),
                Execute(Command::WriteZeroes {
                    offset: 0,
                    len: 1 << 20,
                    fua: false,
                }),
            ),
            (
                hdr(CMD_TRIM, CMD_FLAG_NO_HOLE, 0, 512),
                Refuse {
                    errno: EINVAL,
                    drain: 0,
                },
            ),
            (
                hdr(CMD_READ, 0, 1, 512),
                Refuse {
                    errno: EINVAL,
                    drain: 0,
                },
            ),
            (
                hdr(CMD_WRITE, 0, 0, 100),
                Refuse {
                    errno: EINVAL,
                    drain: 100,
                },
            ),
            (
                hdr(CMD_READ, 0, 0, 0),
                Refuse {
                    errno: EINVAL,
                    drain: 0,
                },
            ),
            (
                hdr(CMD_READ, 0, 1 << 20, 512),
                Refuse {
                    errno: EINVAL,
                    drain: 0,
                },
            ),
            (
                hdr(CMD_WRITE, 0, 1 << 20, 512),
                Refuse {
                    errno: ENOSPC,
                    drain: 512,
                },
            ),
            (
                hdr(CMD_TRIM, 0, u64::MAX - 511, 512),
                Refuse {
                    errno: ENOSPC,
                    drain: 0,
                },
            ),
            (
                hdr(CMD_READ, 0, 0, 1 << 17),
                Refuse {
                    errno: EOVERFLOW,
                    drain: 0,
                },
            ),
            (
                hdr(CMD_WRITE, 0, 0, 1 << 17),
                Refuse {
                    errno: EOVERFLOW,
                    drain: 1 << 17,
                },
            ),
            (
                hdr(CMD_WRITE, 0, 0, u32::MAX),
                Close(Violation::OversizedPayload(u32::MAX)),
            ),
            (
                hdr(5, 0, 0, 512),
                Refuse {
                    errno: EINVAL,
                    drain: 0,
                },
            ),
            (
                hdr(99, 0, 0, 512),
                Refuse {
                    errno: EINVAL,
                    drain: 0,
                },
            ),
            (
                hdr(CMD_READ, 1 << 9, 0, 512),
                Refuse {
                    errno: EINVAL,
                    drain: 0,
                },
            ),
            (hdr(CMD_DISC, 0, 0, 0), Disconnect),
            (
                RequestHeader {
                    magic: 1,
                    ..hdr(CMD_READ, 0, 0, 512)
                },
                Close(Violation::BadMagic(1)),
            ),
        ];
        for (h, want) in cases {
            assert_eq!(decode_request(h, &LIM), *want, "{h:?}");
        }
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(nbd_errno(IoError::NotPrimary, true), EPERM);
        assert_eq!(nbd_errno(IoError::OutOfRange, true), ENOSPC);
        assert_eq!(nbd_errno(IoError::OutOfRange, false), EINVAL);
        assert_eq!(nbd_errno(IoError::Unaligned, true), EINVAL);
        assert_eq!(nbd_errno(IoError::TooLarge, false), EOVERFLOW);
        assert_eq!(nbd_errno(IoError::Io(libc::EIO), false), EIO);
        assert_eq!(nbd_errno(IoError::Io(libc::EDQUOT), true), ENOSPC);
        assert_eq!(nbd_errno(IoError::Unavailable, false), ESHUTDOWN);
    }
}
