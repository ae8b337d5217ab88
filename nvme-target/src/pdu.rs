//! NVMe/TCP PDU codec: the common header, framing from a byte stream,
//! digests, and encoders for every PDU the target and the initiator send.
//! Everything here is a pure function over bytes (the fuzz harness drives it).

use crate::spec::*;
use std::io::{self, Read};

/// The 8-byte common header that starts every PDU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommonHeader {
    pub pdu_type: u8,
    pub flags: u8,
    pub hlen: u8,
    pub pdo: u8,
    pub plen: u32,
}

impl CommonHeader {
    pub fn parse(b: &[u8]) -> CommonHeader {
        CommonHeader {
            pdu_type: b[0],
            flags: b[1],
            hlen: b[2],
            pdo: b[3],
            plen: get_u32(b, 4),
        }
    }
    pub fn write(&self, b: &mut [u8]) {
        b[0] = self.pdu_type;
        b[1] = self.flags;
        b[2] = self.hlen;
        b[3] = self.pdo;
        put_u32(b, 4, self.plen);
    }
}

/// The header length each PDU type must carry.
pub fn expected_hlen(pdu_type: u8) -> Option<usize> {
    match pdu_type {
        PDU_ICREQ | PDU_ICRESP => Some(IC_HLEN),
        PDU_H2C_TERM_REQ | PDU_C2H_TERM_REQ => Some(TERM_HLEN),
        PDU_CAPSULE_CMD => Some(CMD_HLEN),
        PDU_CAPSULE_RESP => Some(RESP_HLEN),
        PDU_H2C_DATA | PDU_C2H_DATA => Some(DATA_HLEN),
        PDU_R2T => Some(R2T_HLEN),
        _ => None,
    }
}

/// Whether digests (when negotiated) apply to this PDU type. ICReq/ICResp
/// and the TermReq PDUs never carry digests.
pub fn digests_apply(pdu_type: u8) -> bool {
    !matches!(
        pdu_type,
        PDU_ICREQ | PDU_ICRESP | PDU_H2C_TERM_REQ | PDU_C2H_TERM_REQ
    )
}

/// Digests negotiated at connection initialisation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Digests {
    pub header: bool,
    pub data: bool,
}

pub fn crc(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// A fatal transport error: the receiver terminates the connection with a
/// TermReq carrying this FES and field offset (FEI).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransportError {
    pub fes: u16,
    pub fei: u32,
}

impl TransportError {
    pub fn new(fes: u16, fei: u32) -> Self {
        TransportError { fes, fei }
    }
}

/// One received PDU, framed but not yet interpreted.
#[derive(Debug)]
pub struct RawPdu {
    pub ch: CommonHeader,
    /// The whole PDU, `plen` bytes.
    pub bytes: Vec<u8>,
}

/// A PDU after digest and layout checks.
#[derive(Debug)]
pub struct CheckedPdu<'a> {
    pub ch: CommonHeader,
    /// `hlen` bytes of header, common header included.
    pub header: &'a [u8],
    /// PDU data (without padding or digest), possibly empty.
    pub data: &'a [u8],
    /// False when the data digest did not match (the command fails with a
    /// transient transport error, the connection survives).
    pub data_digest_ok: bool,
}

/// Reads one PDU from a stream. Only the common header is interpreted:
/// the type must be known, hlen must fit the type and `plen` must be within
/// `max_plen`. Errors: `Err(Ok(te))` for a protocol error that deserves a
/// TermReq, `Err(Err(io))` when the stream ended or failed.
pub fn read_pdu<R: Read>(
    r: &mut R,
    max_plen: u32,
) -> Result<RawPdu, Result<TransportError, io::Error>> {
    let mut ch_bytes = [0u8; CH_LEN];
    r.read_exact(&mut ch_bytes).map_err(Err)?;
    let ch = CommonHeader::parse(&ch_bytes);
    let hlen = match expected_hlen(ch.pdu_type) {
        Some(h) => h,
        None => return Err(Ok(TransportError::new(FES_INVALID_HEADER_FIELD, 0))),
    };
    if ch.hlen as usize != hlen {
        return Err(Ok(TransportError::new(FES_INVALID_HEADER_FIELD, 2)));
    }
    if (ch.plen as usize) < hlen || ch.plen > max_plen {
        return Err(Ok(TransportError::new(FES_INVALID_HEADER_FIELD, 4)));
    }
    let mut bytes = vec![0u8; ch.plen as usize];
    bytes[..CH_LEN].copy_from_slice(&ch_bytes);
    r.read_exact(&mut bytes[CH_LEN..]).map_err(Err)?;
    Ok(RawPdu { ch, bytes })
}

/// For a PDU that carries data: checks what [`check_pdu`] checks that lies
/// before the data (digest flags, the header digest, PDO), given the
/// common header and `head`, the PDU's first PDO bytes. Returns the data's
/// length (without padding or digest); any error means: check the whole PDU
/// with [`check_pdu`] instead. Pure.
pub fn check_head(ch: CommonHeader, head: &[u8], dg: Digests) -> Result<usize, TransportError> {
    let bad = TransportError::new(FES_INVALID_HEADER_FIELD, 0);
    let (hlen, pdo, plen) = (ch.hlen as usize, ch.pdo as usize, ch.plen as usize);
    if !digests_apply(ch.pdu_type) || head.len() != pdo {
        return Err(bad);
    }
    if (ch.flags & FLAG_HDGSTF != 0) != dg.header || (ch.flags & FLAG_DDGSTF != 0) != dg.data {
        return Err(bad);
    }
    let hd_len = if dg.header { DIGEST_LEN } else { 0 };
    let dd_len = if dg.data { DIGEST_LEN } else { 0 };
    if pdo < hlen + hd_len || pdo + dd_len >= plen {
        return Err(bad);
    }
    if dg.header && get_u32(head, hlen) != crc(&head[..hlen]) {
        return Err(TransportError::new(FES_HEADER_DIGEST_ERROR, 0));
    }
    Ok(plen - pdo - dd_len)
}

/// Checks digest flags, the header digest, PDO and the data digest of a
/// framed PDU against the negotiated digests.
pub fn check_pdu(raw: &RawPdu, dg: Digests) -> Result<CheckedPdu<'_>, TransportError> {
    let ch = raw.ch;
    let b = &raw.bytes;
    let hlen = ch.hlen as usize;
    let plen = b.len();
    let applies = digests_apply(ch.pdu_type);
    let hd = applies && dg.header;
    if (ch.flags & FLAG_HDGSTF != 0) != hd {
        return Err(TransportError::new(FES_INVALID_HEADER_FIELD, 1));
    }
    let hd_len = if hd { DIGEST_LEN } else { 0 };
    if plen < hlen + hd_len {
        return Err(TransportError::new(FES_INVALID_HEADER_FIELD, 4));
    }
    if hd {
        let want = crc(&b[..hlen]);
        if get_u32(b, hlen) != want {
            return Err(TransportError::new(FES_HEADER_DIGEST_ERROR, 0));
        }
    }
    let ddgstf = ch.flags & FLAG_DDGSTF != 0;
    if !applies {
        // ICReq/ICResp: fixed size, no data. TermReq: data right after the header.
        if ch.pdo != 0 || ddgstf {
            return Err(TransportError::new(FES_INVALID_HEADER_FIELD, 3));
        }
        return Ok(CheckedPdu {
            ch,
            header: &b[..hlen],
            data: &b[hlen..],
            data_digest_ok: true,
        });
    }
    if plen == hlen + hd_len {
        // No data: PDO must be 0 and no data digest.
        if ch.pdo != 0 || ddgstf {
            return Err(TransportError::new(FES_INVALID_HEADER_FIELD, 3));
        }
        return Ok(CheckedPdu {
            ch,
            header: &b[..hlen],
            data: &[],
            data_digest_ok: true,
        });
    }
    if ddgstf != dg.data {
        return Err(TransportError::new(FES_INVALID_HEADER_FIELD, 1));
    }
    let pdo = ch.pdo as usize;
    let dd_len = if dg.data { DIGEST_LEN } else { 0 };
    if pdo < hlen + hd_len || pdo + dd_len > plen || pdo + dd_len == plen {
        return Err(TransportError::new(FES_INVALID_HEADER_FIELD, 3));
    }
    let data = &b[pdo..plen - dd_len];
    let data_digest_ok = !dg.data || get_u32(b, plen - DIGEST_LEN) == crc(data);
    Ok(CheckedPdu {
        ch,
        header: &b[..hlen],
        data,
        data_digest_ok,
    })
}

fn align_up(v: usize, a: usize) -> usize {
    v.div_ceil(a) * a
}

/// Encodes a PDU. `psh` is the PDU specific header (hlen - 8 bytes).
/// Digests are added when negotiated and applicable; data starts at an
/// offset aligned to `data_align` bytes (the peer's PDA).
pub fn build_pdu(
    pdu_type: u8,
    flags: u8,
    psh: &[u8],
    data: &[u8],
    dg: Digests,
    data_align: usize,
) -> Vec<u8> {
    let mut b = build_pdu_head(pdu_type, flags, psh, data.len(), dg, data_align);
    b.extend_from_slice(data);
    if digests_apply(pdu_type) && dg.data && !data.is_empty() {
        b.extend_from_slice(&crc(data).to_le_bytes());
    }
    b
}

/// The bytes of a PDU that come before its `data_len` bytes of data (the
/// headers, their digest and the padding up to PDO), for a sender that
/// sends the data from a buffer of its own and then, with data digests,
/// the data's CRC32C (little-endian). Pure.
pub fn build_pdu_head(
    pdu_type: u8,
    flags: u8,
    psh: &[u8],
    data_len: usize,
    dg: Digests,
    data_align: usize,
) -> Vec<u8> {
    let mut b = Vec::new();
    put_pdu_head(&mut b, pdu_type, flags, psh, data_len, dg, data_align);
    b
}

/// [`build_pdu_head`], appended to `out` (no allocation of its own). Pure.
pub fn put_pdu_head(
    out: &mut Vec<u8>,
    pdu_type: u8,
    mut flags: u8,
    psh: &[u8],
    data_len: usize,
    dg: Digests,
    data_align: usize,
) {
    let hlen = CH_LEN + psh.len();
    let applies = digests_apply(pdu_type);
    let hd = applies && dg.header;
    let dd = applies && dg.data && data_len > 0;
    if hd {
        flags |= FLAG_HDGSTF;
    }
    if dd {
        flags |= FLAG_DDGSTF;
    }
    let hdr_end = hlen + if hd { DIGEST_LEN } else { 0 };
    let pdo = if data_len == 0 || !applies {
        0
    } else {
        align_up(hdr_end, data_align.max(1))
    };
    let data_start = if data_len == 0 {
        hdr_end
    } else if applies {
        pdo
    } else {
        hlen
    };
    let plen = data_start + data_len + if dd { DIGEST_LEN } else { 0 };
    let at = out.len();
    out.resize(at + data_start, 0);
    let b = &mut out[at..];
    CommonHeader {
        pdu_type,
        flags,
        hlen: hlen as u8,
        pdo: pdo as u8,
        plen: plen as u32,
    }
    .write(b);
    b[CH_LEN..hlen].copy_from_slice(psh);
    if hd {
        let c = crc(&b[..hlen]);
        put_u32(b, hlen, c);
    }
}

/// ICReq / ICResp parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcParams {
    pub pfv: u16,
    /// HPDA (ICReq) or CPDA (ICResp): data alignment is (pda + 1) * 4 bytes.
    pub pda: u8,
    pub digests: Digests,
    /// MAXR2T (ICReq, 0's based) or MAXH2CDATA (ICResp).
    pub max: u32,
}

pub fn encode_ic(pdu_type: u8, p: IcParams) -> Vec<u8> {
    let mut psh = [0u8; IC_HLEN - CH_LEN];
    put_u16(&mut psh, 0, p.pfv);
    psh[2] = p.pda;
    psh[3] = (p.digests.header as u8) | ((p.digests.data as u8) << 1);
    put_u32(&mut psh, 4, p.max);
    build_pdu(pdu_type, 0, &psh, &[], Digests::default(), 4)
}

pub fn decode_ic(header: &[u8]) -> IcParams {
    IcParams {
        pfv: get_u16(header, 8),
        pda: header[10],
        digests: Digests {
            header: header[11] & 1 != 0,
            data: header[11] & 2 != 0,
        },
        max: get_u32(header, 12),
    }
}

/// C2HTermReq / H2CTermReq carrying the offending PDU header.
pub fn encode_term(pdu_type: u8, e: TransportError, offending: &[u8]) -> Vec<u8> {
    let mut psh = [0u8; TERM_HLEN - CH_LEN];
    put_u16(&mut psh, 0, e.fes);
    put_u32(&mut psh, 2, e.fei);
    let n = offending.len().min(TERM_MAX_DATA);
    build_pdu(pdu_type, 0, &psh, &offending[..n], Digests::default(), 4)
}

/// The 16-byte completion queue entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cqe {
    pub dw0: u32,
    pub dw1: u32,
    pub sqhd: u16,
    pub sqid: u16,
    pub cid: u16,
    pub status: Status,
}

impl Cqe {
    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        put_u32(&mut b, 0, self.dw0);
        put_u32(&mut b, 4, self.dw1);
        put_u16(&mut b, 8, self.sqhd);
        put_u16(&mut b, 10, self.sqid);
        put_u16(&mut b, 12, self.cid);
        put_u16(&mut b, 14, self.status.to_field());
        b
    }
    pub fn decode(b: &[u8]) -> Cqe {
        Cqe {
            dw0: get_u32(b, 0),
            dw1: get_u32(b, 4),
            sqhd: get_u16(b, 8),
            sqid: get_u16(b, 10),
            cid: get_u16(b, 12),
            status: Status::from_field(get_u16(b, 14)),
        }
    }
}

/// A CapsuleResp carrying `cqe`, appended to `out`.
pub fn put_capsule_resp(out: &mut Vec<u8>, cqe: &Cqe, dg: Digests) {
    put_pdu_head(out, PDU_CAPSULE_RESP, 0, &cqe.encode(), 0, dg, 4);
}

#[allow(clippy::too_many_arguments)] // one argument per header field
/// H2CData / C2HData / R2T share one layout: cccid, ttag (reserved in
/// C2HData), offset, length.
pub fn encode_xfer(
    pdu_type: u8,
    flags: u8,
    cccid: u16,
    ttag: u16,
    offset: u32,
    len: u32,
    data: &[u8],
    dg: Digests,
    align: usize,
) -> Vec<u8> {
    let mut psh = [0u8; DATA_HLEN - CH_LEN];
    put_u16(&mut psh, 0, cccid);
    put_u16(&mut psh, 2, ttag);
    put_u32(&mut psh, 4, offset);
    put_u32(&mut psh, 8, len);
    build_pdu(pdu_type, flags, &psh, data, dg, align)
}

/// Fields of a received H2CData / C2HData / R2T header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XferHeader {
    pub cccid: u16,
    pub ttag: u16,
    pub offset: u32,
    pub len: u32,
}

/// [`encode_xfer`] without the data: the bytes before it (see
/// [`build_pdu_head`]), appended to `out`.
#[allow(clippy::too_many_arguments)] // one argument per header field
pub fn put_xfer_head(
    out: &mut Vec<u8>,
    pdu_type: u8,
    flags: u8,
    cccid: u16,
    ttag: u16,
    offset: u32,
    len: u32,
    dg: Digests,
    align: usize,
) {
    let mut psh = [0u8; DATA_HLEN - CH_LEN];
    put_u16(&mut psh, 0, cccid);
    put_u16(&mut psh, 2, ttag);
    put_u32(&mut psh, 4, offset);
    put_u32(&mut psh, 8, len);
    put_pdu_head(out, pdu_type, flags, &psh, len as usize, dg, align);
}

pub fn decode_xfer(header: &[u8]) -> XferHeader {
    XferHeader {
        cccid: get_u16(header, 8),
        ttag: get_u16(header, 10),
        offset: get_u32(header, 12),
        len: get_u32(header, 16),
    }
}

/// A 64-byte submission queue entry, with typed accessors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sqe(pub [u8; 64]);

impl Sqe {
    pub fn new(opcode: u8, cid: u16) -> Sqe {
        let mut b = [0u8; 64];
        b[0] = opcode;
        // PSDT 01b: SGLs (the only data pointer type fabrics allow).
        b[1] = 0x40;
        put_u16(&mut b, 2, cid);
        Sqe(b)
    }
    pub fn opcode(&self) -> u8 {
        self.0[0]
    }
    pub fn flags(&self) -> u8 {
        self.0[1]
    }
    pub fn cid(&self) -> u16 {
        get_u16(&self.0, 2)
    }
    pub fn set_cid(&mut self, cid: u16) {
        put_u16(&mut self.0, 2, cid);
    }
    pub fn nsid(&self) -> u32 {
        get_u32(&self.0, 4)
    }
    pub fn set_nsid(&mut self, v: u32) {
        put_u32(&mut self.0, 4, v);
    }
    /// Command dword `n` (10..=15).
    pub fn cdw(&self, n: usize) -> u32 {
        get_u32(&self.0, n * 4)
    }
    pub fn set_cdw(&mut self, n: usize, v: u32) {
        put_u32(&mut self.0, n * 4, v);
    }
    /// SGL descriptor in DPTR: (address, length, identifier).
    pub fn sgl(&self) -> (u64, u32, u8) {
        (get_u64(&self.0, 24), get_u32(&self.0, 32), self.0[39])
    }
    pub fn set_sgl(&mut self, addr: u64, len: u32, id: u8) {
        put_u64(&mut self.0, 24, addr);
        put_u32(&mut self.0, 32, len);
        self.0[36..39].fill(0);
        self.0[39] = id;
    }
    /// Fabrics command type (byte 4 of a fabrics command).
    pub fn fctype(&self) -> u8 {
        self.0[4]
    }
}

/// Builds a Read / Write / Write Zeroes SQE.
pub fn rw_sqe(opcode: u8, nsid: u32, slba: u64, nlb: u32, fua: bool) -> Sqe {
    let mut s = Sqe::new(opcode, 0);
    s.set_nsid(nsid);
    s.set_cdw(10, slba as u32);
    s.set_cdw(11, (slba >> 32) as u32);
    s.set_cdw(12, (nlb - 1) | if fua { 1 << 30 } else { 0 });
    s
}

/// Encodes a CapsuleCmd; `icd` is in-capsule data (may be empty).
pub fn encode_capsule_cmd(sqe: &Sqe, icd: &[u8], dg: Digests) -> Vec<u8> {
    build_pdu(PDU_CAPSULE_CMD, 0, &sqe.0, icd, dg, 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_and_check_round_trip_with_digests() {
        let dg = Digests {
            header: true,
            data: true,
        };
        let b = encode_xfer(PDU_C2H_DATA, FLAG_LAST_PDU, 7, 0, 0, 5, b"hello", dg, 8);
        let raw = read_pdu(&mut &b[..], 1 << 20).unwrap();
        assert_eq!(raw.ch.pdo, 32);
        let p = check_pdu(&raw, dg).unwrap();
        assert_eq!(p.data, b"hello");
        assert!(p.data_digest_ok);
        let x = decode_xfer(p.header);
        assert_eq!((x.cccid, x.len), (7, 5));
        let mut bad = b.clone();
        let n = bad.len();
        bad[n - 1] ^= 1;
        let raw = read_pdu(&mut &bad[..], 1 << 20).unwrap();
        assert!(!check_pdu(&raw, dg).unwrap().data_digest_ok);
        let mut bad = b;
        bad[10] ^= 1;
        let raw = read_pdu(&mut &bad[..], 1 << 20).unwrap();
        assert_eq!(
            check_pdu(&raw, dg).unwrap_err().fes,
            FES_HEADER_DIGEST_ERROR
        );
    }

    #[test]
    fn status_field_layout() {
        let s = SC_ANA_INACCESSIBLE;
        assert_eq!(s.to_field(), (0x02 << 1) | (3 << 9));
        assert_eq!(Status::from_field(s.to_field()), s);
        assert_eq!(SC_INVALID_FIELD.to_field(), 0x8004);
    }

    #[test]
    fn icreq_layout() {
        let b = encode_ic(
            PDU_ICREQ,
            IcParams {
                pfv: 0,
                pda: 0,
                digests: Digests {
                    header: true,
                    data: false,
                },
                max: 3,
            },
        );
        assert_eq!(b.len(), 128);
        assert_eq!(&b[..8], &[0, 0, 128, 0, 128, 0, 0, 0]);
        assert_eq!(b[11], 1);
        assert_eq!(get_u32(&b, 12), 3);
    }
}
