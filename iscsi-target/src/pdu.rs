//! iSCSI PDU framing (RFC 7143 §11): the basic header segment, additional
//! header segments, data segment, padding and CRC32C digests.
//!
//! Parsing is a pure function over bytes so that it can be fuzzed without a
//! socket: `pdu_len` tells a stream reader how many bytes a PDU occupies
//! once its 48-byte BHS is known, `frame` validates a complete PDU and says
//! where its parts lie (for use in place), and `parse` copies them out.

/// Length of the basic header segment.
pub const BHS_LEN: usize = 48;
/// A reserved / "no tag" value for ITT and TTT.
pub const RSVD_TAG: u32 = 0xffff_ffff;

// Initiator opcodes.
pub const OP_NOP_OUT: u8 = 0x00;
pub const OP_SCSI_CMD: u8 = 0x01;
pub const OP_TMF_REQ: u8 = 0x02;
pub const OP_LOGIN_REQ: u8 = 0x03;
pub const OP_TEXT_REQ: u8 = 0x04;
pub const OP_DATA_OUT: u8 = 0x05;
pub const OP_LOGOUT_REQ: u8 = 0x06;
pub const OP_SNACK: u8 = 0x10;

// Target opcodes.
pub const OP_NOP_IN: u8 = 0x20;
pub const OP_SCSI_RESP: u8 = 0x21;
pub const OP_TMF_RESP: u8 = 0x22;
pub const OP_LOGIN_RESP: u8 = 0x23;
pub const OP_TEXT_RESP: u8 = 0x24;
pub const OP_DATA_IN: u8 = 0x25;
pub const OP_LOGOUT_RESP: u8 = 0x26;
pub const OP_R2T: u8 = 0x31;
pub const OP_ASYNC: u8 = 0x32;
pub const OP_REJECT: u8 = 0x3f;

// Reject reasons (RFC 7143 §11.17.1).
pub const REJECT_DATA_DIGEST: u8 = 0x02;
pub const REJECT_SNACK: u8 = 0x03;
pub const REJECT_PROTOCOL_ERROR: u8 = 0x04;
pub const REJECT_CMD_NOT_SUPPORTED: u8 = 0x05;
pub const REJECT_INVALID_PDU_FIELD: u8 = 0x09;

/// Digest and size limits that apply to incoming PDUs on one connection.
#[derive(Clone, Copy, Debug)]
pub struct ParseLimits {
    pub header_digest: bool,
    pub data_digest: bool,
    /// Our MaxRecvDataSegmentLength: the largest data segment we accept.
    pub max_data_segment_bytes: u32,
}

/// Why a PDU could not be parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// More bytes are needed: the PDU is `need` bytes long in total.
    Incomplete { need: usize },
    /// The header digest does not match: the connection cannot be trusted.
    HeaderDigest,
    /// The data digest does not match: the PDU is discarded (and rejected).
    DataDigest,
    /// DataSegmentLength exceeds our MaxRecvDataSegmentLength.
    DataTooLong,
    /// AHS malformed (length, type) for this opcode.
    BadAhs,
}

/// One parsed PDU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pdu {
    pub bhs: [u8; BHS_LEN],
    pub ahs: Vec<u8>,
    pub data: Vec<u8>,
}

fn pad4(n: usize) -> usize {
    (n + 3) & !3
}

impl Pdu {
    /// A target PDU with the given opcode and all other fields zero.
    pub fn new(opcode: u8) -> Pdu {
        let mut bhs = [0u8; BHS_LEN];
        bhs[0] = opcode & 0x3f;
        Pdu {
            bhs,
            ahs: Vec::new(),
            data: Vec::new(),
        }
    }

    pub fn opcode(&self) -> u8 {
        self.bhs[0] & 0x3f
    }
    pub fn immediate(&self) -> bool {
        self.bhs[0] & 0x40 != 0
    }
    pub fn flags(&self) -> u8 {
        self.bhs[1]
    }
    pub fn final_bit(&self) -> bool {
        self.bhs[1] & 0x80 != 0
    }
    pub fn lun(&self) -> u64 {
        self.u64_at(8)
    }
    pub fn itt(&self) -> u32 {
        self.u32_at(16)
    }
    pub fn u32_at(&self, at: usize) -> u32 {
        u32::from_be_bytes(self.bhs[at..at + 4].try_into().unwrap())
    }
    pub fn u64_at(&self, at: usize) -> u64 {
        u64::from_be_bytes(self.bhs[at..at + 8].try_into().unwrap())
    }
    pub fn set_u32(&mut self, at: usize, v: u32) {
        self.bhs[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }
    pub fn set_u64(&mut self, at: usize, v: u64) {
        self.bhs[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }
    pub fn set_u16(&mut self, at: usize, v: u16) {
        self.bhs[at..at + 2].copy_from_slice(&v.to_be_bytes());
    }

    /// Serializes with padding and the negotiated digests. The
    /// DataSegmentLength and TotalAHSLength fields are filled in here.
    pub fn encode_into(&mut self, out: &mut Vec<u8>, header_digest: bool, data_digest: bool) {
        debug_assert!(self.ahs.len().is_multiple_of(4));
        self.bhs[4] = (self.ahs.len() / 4) as u8;
        let dlen = self.data.len() as u32;
        self.bhs[5..8].copy_from_slice(&dlen.to_be_bytes()[1..4]);
        let start = out.len();
        out.extend_from_slice(&self.bhs);
        out.extend_from_slice(&self.ahs);
        if header_digest {
            let crc = crc32c::crc32c(&out[start..]);
            out.extend_from_slice(&crc.to_le_bytes());
        }
        if !self.data.is_empty() {
            let dstart = out.len();
            out.extend_from_slice(&self.data);
            out.resize(dstart + pad4(self.data.len()), 0);
            if data_digest {
                let crc = crc32c::crc32c(&out[dstart..]);
                out.extend_from_slice(&crc.to_le_bytes());
            }
        }
    }

    /// Serializes the header part of a PDU whose `data_len` bytes of data
    /// the caller sends from a buffer of its own (then the padding to 4
    /// bytes and, with data digests, the digest over data and padding).
    /// `self.data` must be empty.
    pub fn encode_head_into(&mut self, out: &mut Vec<u8>, header_digest: bool, data_len: usize) {
        debug_assert!(self.ahs.len().is_multiple_of(4) && self.data.is_empty());
        self.bhs[4] = (self.ahs.len() / 4) as u8;
        let dlen = data_len as u32;
        self.bhs[5..8].copy_from_slice(&dlen.to_be_bytes()[1..4]);
        let start = out.len();
        out.extend_from_slice(&self.bhs);
        out.extend_from_slice(&self.ahs);
        if header_digest {
            let crc = crc32c::crc32c(&out[start..]);
            out.extend_from_slice(&crc.to_le_bytes());
        }
    }

    pub fn encode(&mut self, header_digest: bool, data_digest: bool) -> Vec<u8> {
        let mut v = Vec::with_capacity(BHS_LEN + 8 + pad4(self.data.len()) + 4);
        self.encode_into(&mut v, header_digest, data_digest);
        v
    }
}

/// Total length in bytes of the PDU whose BHS is `bhs` (AHS, digests, data
/// and padding included), or an error if the header announces more data than
/// we accept.
pub fn pdu_len(bhs: &[u8], lim: &ParseLimits) -> Result<usize, ParseError> {
    if bhs.len() < BHS_LEN {
        return Err(ParseError::Incomplete { need: BHS_LEN });
    }
    let ahs_len = bhs[4] as usize * 4;
    let dlen = u32::from_be_bytes([0, bhs[5], bhs[6], bhs[7]]);
    if dlen > lim.max_data_segment_bytes {
        return Err(ParseError::DataTooLong);
    }
    let mut n = BHS_LEN + ahs_len;
    if lim.header_digest {
        n += 4;
    }
    if dlen > 0 {
        n += pad4(dlen as usize);
        if lim.data_digest {
            n += 4;
        }
    }
    Ok(n)
}

/// Where the parts of one complete, checked PDU lie in a buffer: what a
/// stream reader needs to use a PDU's data segment in place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub bhs: [u8; BHS_LEN],
    /// The additional header segments.
    pub ahs: std::ops::Range<usize>,
    /// The data segment, without padding or digest.
    pub data: std::ops::Range<usize>,
    /// Bytes the whole PDU occupies.
    pub len: usize,
}

/// Frames one complete PDU at the front of `buf` and checks its digests
/// and AHS. Pure: no I/O, no copy of the data segment, no panics on any
/// input.
pub fn frame(buf: &[u8], lim: &ParseLimits) -> Result<Frame, ParseError> {
    let total = pdu_len(buf, lim)?;
    if buf.len() < total {
        return Err(ParseError::Incomplete { need: total });
    }
    let mut bhs = [0u8; BHS_LEN];
    bhs.copy_from_slice(&buf[..BHS_LEN]);
    let ahs_len = bhs[4] as usize * 4;
    let dlen = u32::from_be_bytes([0, bhs[5], bhs[6], bhs[7]]) as usize;
    let mut at = BHS_LEN + ahs_len;
    if lim.header_digest {
        let want = u32::from_le_bytes(buf[at..at + 4].try_into().unwrap());
        if crc32c::crc32c(&buf[..at]) != want {
            return Err(ParseError::HeaderDigest);
        }
        at += 4;
    }
    check_ahs(&buf[BHS_LEN..BHS_LEN + ahs_len])?;
    if dlen > 0 {
        let padded = pad4(dlen);
        if lim.data_digest {
            let want = u32::from_le_bytes(buf[at + padded..at + padded + 4].try_into().unwrap());
            if crc32c::crc32c(&buf[at..at + padded]) != want {
                return Err(ParseError::DataDigest);
            }
        }
    }
    Ok(Frame {
        bhs,
        ahs: BHS_LEN..BHS_LEN + ahs_len,
        data: at..at + dlen,
        len: total,
    })
}

/// Where the data segment of the PDU at the front of `buf` starts and how
/// it ends, once its header segments are in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Head {
    /// Bytes before the data segment (BHS, AHS, header digest).
    pub hlen: usize,
    /// The data segment's length, without padding.
    pub dlen: usize,
    /// Bytes after the data segment: padding to 4 bytes, data digest.
    pub tail: usize,
}

/// Checks what [`frame`] checks of a PDU's header segments (length limit,
/// header digest, AHS) with only those in `buf`, for a reader that
/// receives the data segment elsewhere. Any error other than `Incomplete`
/// means: frame the whole PDU with [`frame`], which reports it. Pure.
pub fn frame_head(buf: &[u8], lim: &ParseLimits) -> Result<Head, ParseError> {
    pdu_len(buf, lim)?;
    let ahs_len = buf[4] as usize * 4;
    let dlen = u32::from_be_bytes([0, buf[5], buf[6], buf[7]]) as usize;
    let digest_at = BHS_LEN + ahs_len;
    let hlen = digest_at + if lim.header_digest { 4 } else { 0 };
    if buf.len() < hlen {
        return Err(ParseError::Incomplete { need: hlen });
    }
    if lim.header_digest {
        let want = u32::from_le_bytes(buf[digest_at..hlen].try_into().unwrap());
        if crc32c::crc32c(&buf[..digest_at]) != want {
            return Err(ParseError::HeaderDigest);
        }
    }
    check_ahs(&buf[BHS_LEN..digest_at])?;
    let tail = pad4(dlen) - dlen + if lim.data_digest && dlen > 0 { 4 } else { 0 };
    Ok(Head { hlen, dlen, tail })
}

/// Parses one complete PDU from the front of `buf`; returns it and the number
/// of bytes consumed. Pure: no I/O, no panics on any input.
pub fn parse(buf: &[u8], lim: &ParseLimits) -> Result<(Pdu, usize), ParseError> {
    let f = frame(buf, lim)?;
    Ok((
        Pdu {
            bhs: f.bhs,
            ahs: buf[f.ahs].to_vec(),
            data: buf[f.data].to_vec(),
        },
        f.len,
    ))
}

/// Each AHS is: AHSLength (2 bytes, length of the specific field), type (1),
/// then the field, padded to 4 bytes. The segments must exactly fill the
/// announced TotalAHSLength.
fn check_ahs(ahs: &[u8]) -> Result<(), ParseError> {
    let mut at = 0;
    while at < ahs.len() {
        if at + 3 > ahs.len() {
            return Err(ParseError::BadAhs);
        }
        let len = u16::from_be_bytes([ahs[at], ahs[at + 1]]) as usize;
        let ty = ahs[at + 2];
        // Types: 1 extended CDB, 2 bidirectional expected read length.
        if ty != 1 && ty != 2 {
            return Err(ParseError::BadAhs);
        }
        let seg = pad4(3 + len);
        if len == 0 || at + seg > ahs.len() {
            return Err(ParseError::BadAhs);
        }
        at += seg;
    }
    Ok(())
}

/// The extended CDB bytes carried in an AHS of type 1 (after its reserved
/// byte), if any.
pub fn extended_cdb(ahs: &[u8]) -> Option<&[u8]> {
    let mut at = 0;
    while at + 3 <= ahs.len() {
        let len = u16::from_be_bytes([ahs[at], ahs[at + 1]]) as usize;
        let ty = ahs[at + 2];
        if ty == 1 && len >= 1 && at + 3 + len <= ahs.len() {
            return Some(&ahs[at + 4..at + 3 + len]);
        }
        at += pad4(3 + len.max(1));
    }
    None
}

/// A text data segment that is not `key=value` pairs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadText;

/// Parses a text data segment of `key=value` pairs separated by NULs.
pub fn parse_text(data: &[u8]) -> Result<Vec<(String, String)>, BadText> {
    let mut out = Vec::new();
    for item in data.split(|&b| b == 0) {
        if item.is_empty() {
            continue;
        }
        let s = std::str::from_utf8(item).map_err(|_| BadText)?;
        let (k, v) = s.split_once('=').ok_or(BadText)?;
        if k.is_empty() || k.len() > 63 {
            return Err(BadText);
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

/// Encodes `key=value` pairs as a text data segment.
pub fn encode_text(pairs: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIM: ParseLimits = ParseLimits {
        header_digest: true,
        data_digest: true,
        max_data_segment_bytes: 8192,
    };

    #[test]
    fn round_trip_with_digests() {
        let mut p = Pdu::new(OP_NOP_OUT);
        p.set_u32(16, 7);
        p.data = b"hello".to_vec();
        let bytes = p.encode(true, true);
        let (q, n) = parse(&bytes, &LIM).unwrap();
        assert_eq!(n, bytes.len());
        assert_eq!(q.data, b"hello");
        assert_eq!(q.itt(), 7);
        let mut bad = bytes.clone();
        bad[49] ^= 1;
        assert_eq!(parse(&bad, &LIM), Err(ParseError::HeaderDigest));
        let mut bad = bytes;
        bad[BHS_LEN + 4] ^= 1;
        assert_eq!(parse(&bad, &LIM), Err(ParseError::DataDigest));
    }

    #[test]
    fn crc32c_matches_rfc_vector() {
        // RFC 7143 appendix: 32 bytes of zeros.
        assert_eq!(crc32c::crc32c(&[0u8; 32]), 0x8a91_36aa);
    }
}
