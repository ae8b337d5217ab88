//! Constants from the NVMe Base specification (1.4/2.0) and the NVMe/TCP
//! transport specification, and the little-endian field helpers used to
//! read and write them. Names follow the specifications.

/// The well-known discovery subsystem NQN.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";

// PDU types (NVMe/TCP, "PDU Type").
pub const PDU_ICREQ: u8 = 0x00;
pub const PDU_ICRESP: u8 = 0x01;
pub const PDU_H2C_TERM_REQ: u8 = 0x02;
pub const PDU_C2H_TERM_REQ: u8 = 0x03;
pub const PDU_CAPSULE_CMD: u8 = 0x04;
pub const PDU_CAPSULE_RESP: u8 = 0x05;
pub const PDU_H2C_DATA: u8 = 0x06;
pub const PDU_C2H_DATA: u8 = 0x07;
pub const PDU_R2T: u8 = 0x09;

// PDU common header flags.
pub const FLAG_HDGSTF: u8 = 0x01;
pub const FLAG_DDGSTF: u8 = 0x02;
/// H2CData / C2HData: last PDU of the transfer.
pub const FLAG_LAST_PDU: u8 = 0x04;
/// C2HData: command completed successfully, no CapsuleResp follows.
pub const FLAG_SUCCESS: u8 = 0x08;

// Header lengths.
pub const CH_LEN: usize = 8;
pub const IC_HLEN: usize = 128;
pub const TERM_HLEN: usize = 24;
pub const CMD_HLEN: usize = 72;
pub const RESP_HLEN: usize = 24;
pub const DATA_HLEN: usize = 24;
pub const R2T_HLEN: usize = 24;
pub const DIGEST_LEN: usize = 4;
/// Largest data carried in a C2HTermReq / H2CTermReq (the offending header).
pub const TERM_MAX_DATA: usize = 152 - TERM_HLEN;

// Fatal error status (TermReq FES).
pub const FES_INVALID_HEADER_FIELD: u16 = 0x01;
pub const FES_PDU_SEQUENCE_ERROR: u16 = 0x02;
pub const FES_HEADER_DIGEST_ERROR: u16 = 0x03;
pub const FES_DATA_OUT_OF_RANGE: u16 = 0x04;
pub const FES_DATA_LIMIT_EXCEEDED: u16 = 0x05;
pub const FES_UNSUPPORTED_PARAMETER: u16 = 0x06;

// SGL descriptor identifiers (type << 4 | subtype).
/// Data Block descriptor, Offset subtype: in-capsule data.
pub const SGL_ICD: u8 = 0x01;
/// Transport Data Block descriptor, transport specific subtype: data moved
/// by R2T/H2CData (host to controller) or C2HData (controller to host).
pub const SGL_TRANSPORT: u8 = 0x5A;

// Admin opcodes.
pub const ADM_GET_LOG_PAGE: u8 = 0x02;
pub const ADM_IDENTIFY: u8 = 0x06;
pub const ADM_ABORT: u8 = 0x08;
pub const ADM_SET_FEATURES: u8 = 0x09;
pub const ADM_GET_FEATURES: u8 = 0x0A;
pub const ADM_ASYNC_EVENT: u8 = 0x0C;
pub const ADM_KEEP_ALIVE: u8 = 0x18;
pub const OPC_FABRICS: u8 = 0x7F;

// Fabrics command types.
pub const FCTYPE_PROPERTY_SET: u8 = 0x00;
pub const FCTYPE_CONNECT: u8 = 0x01;
pub const FCTYPE_PROPERTY_GET: u8 = 0x04;

// NVM (I/O) opcodes.
pub const IO_FLUSH: u8 = 0x00;
pub const IO_WRITE: u8 = 0x01;
pub const IO_READ: u8 = 0x02;
pub const IO_WRITE_ZEROES: u8 = 0x08;
pub const IO_DSM: u8 = 0x09;

// Controller properties (offsets).
pub const PROP_CAP: u32 = 0x00;
pub const PROP_VS: u32 = 0x08;
pub const PROP_CC: u32 = 0x14;
pub const PROP_CSTS: u32 = 0x1C;

// Identify CNS values.
pub const CNS_NAMESPACE: u8 = 0x00;
pub const CNS_CONTROLLER: u8 = 0x01;
pub const CNS_ACTIVE_NS_LIST: u8 = 0x02;
pub const CNS_NS_DESC_LIST: u8 = 0x03;
pub const CNS_CSI_NAMESPACE: u8 = 0x05;
pub const CNS_CSI_CONTROLLER: u8 = 0x06;

// Log page identifiers.
pub const LID_ERROR: u8 = 0x01;
pub const LID_SMART: u8 = 0x02;
pub const LID_FW_SLOT: u8 = 0x03;
pub const LID_CHANGED_NS: u8 = 0x04;
pub const LID_ANA: u8 = 0x0C;
pub const LID_DISCOVERY: u8 = 0x70;

// Feature identifiers.
pub const FID_ARBITRATION: u8 = 0x01;
pub const FID_POWER_MGMT: u8 = 0x02;
pub const FID_TEMP_THRESHOLD: u8 = 0x04;
pub const FID_ERROR_RECOVERY: u8 = 0x05;
pub const FID_WRITE_ATOMICITY: u8 = 0x0A;
pub const FID_VOLATILE_WC: u8 = 0x06;
pub const FID_NUM_QUEUES: u8 = 0x07;
pub const FID_ASYNC_EVENT_CFG: u8 = 0x0B;
pub const FID_KEEP_ALIVE: u8 = 0x0F;
pub const FID_HOST_ID: u8 = 0x81;

/// Identify Controller CTRATT bit 0: 128-bit Host Identifier supported
/// (the HOSTID of Connect; Get Features Host Identifier with EXHID = 1).
pub const CTRATT_HOST_ID_128: u32 = 1 << 0;

/// Async event configuration / OAES bit: ANA change notices.
pub const AEN_ANA_CHANGE: u32 = 1 << 11;
/// AER completion dword 0 for an ANA change notice: type Notice (2),
/// info ANA change (3), log page ANA (0Ch).
pub const AER_ANA_CHANGE_DW0: u32 = 0x02 | (0x03 << 8) | ((LID_ANA as u32) << 16);

// ANA states (ANA group descriptor byte 16).
pub const ANA_OPTIMIZED: u8 = 0x01;
pub const ANA_NON_OPTIMIZED: u8 = 0x02;
pub const ANA_INACCESSIBLE: u8 = 0x03;

/// A completion status: status code type and status code, plus Do Not Retry.
/// Encoded in CQE dword 3 bits 31:17 (the phase bit is always 0 on fabrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    pub sct: u8,
    pub sc: u8,
    pub dnr: bool,
}

impl Status {
    pub const SUCCESS: Status = Status {
        sct: 0,
        sc: 0,
        dnr: false,
    };

    pub const fn generic(sc: u8) -> Status {
        Status {
            sct: 0,
            sc,
            dnr: true,
        }
    }
    pub const fn cmd_specific(sc: u8) -> Status {
        Status {
            sct: 1,
            sc,
            dnr: true,
        }
    }
    pub const fn path(sc: u8) -> Status {
        Status {
            sct: 3,
            sc,
            dnr: false,
        }
    }
    pub fn is_success(&self) -> bool {
        self.sct == 0 && self.sc == 0
    }
    /// The 16-bit CQE status field (phase tag bit 0 clear).
    pub fn to_field(self) -> u16 {
        ((self.sc as u16) << 1) | (((self.sct & 7) as u16) << 9) | ((self.dnr as u16) << 15)
    }
    pub fn from_field(f: u16) -> Status {
        Status {
            sc: (f >> 1) as u8,
            sct: ((f >> 9) & 7) as u8,
            dnr: f & 0x8000 != 0,
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SCT {:#x} SC {:#04x}{}",
            self.sct,
            self.sc,
            if self.dnr { " DNR" } else { "" }
        )
    }
}

// Generic command status (SCT 0).
pub const SC_INVALID_OPCODE: Status = Status::generic(0x01);
pub const SC_INVALID_FIELD: Status = Status::generic(0x02);
pub const SC_CID_CONFLICT: Status = Status::generic(0x03);
pub const SC_INTERNAL: Status = Status::generic(0x06);
pub const SC_INVALID_NS: Status = Status::generic(0x0B);
pub const SC_CMD_SEQ_ERROR: Status = Status::generic(0x0C);
pub const SC_SGL_DATA_LEN_INVALID: Status = Status::generic(0x0F);
pub const SC_SGL_TYPE_INVALID: Status = Status::generic(0x11);
pub const SC_SGL_OFFSET_INVALID: Status = Status::generic(0x16);
/// Transient Transport Error (data digest mismatch): the host may retry.
pub const SC_TRANSIENT_TRANSPORT: Status = Status {
    sct: 0,
    sc: 0x22,
    dnr: false,
};
pub const SC_LBA_OUT_OF_RANGE: Status = Status::generic(0x80);

// Command specific status (SCT 1).
pub const SC_AER_LIMIT: Status = Status::cmd_specific(0x05);
pub const SC_INVALID_LOG_PAGE: Status = Status::cmd_specific(0x09);
pub const SC_FEATURE_NOT_SAVEABLE: Status = Status::cmd_specific(0x0D);
pub const SC_CONNECT_INCOMPATIBLE_FORMAT: Status = Status::cmd_specific(0x80);
pub const SC_CONNECT_INVALID_PARAM: Status = Status::cmd_specific(0x82);
pub const SC_CONNECT_INVALID_HOST: Status = Status::cmd_specific(0x84);

// Media errors (SCT 2).
pub const SC_WRITE_FAULT: Status = Status {
    sct: 2,
    sc: 0x80,
    dnr: false,
};
pub const SC_UNRECOVERED_READ: Status = Status {
    sct: 2,
    sc: 0x81,
    dnr: false,
};

// Path related status (SCT 3).
pub const SC_INTERNAL_PATH_ERROR: Status = Status::path(0x00);
pub const SC_ANA_INACCESSIBLE: Status = Status::path(0x02);

pub fn get_u16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
pub fn get_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}
pub fn get_u64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}
pub fn put_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
pub fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
pub fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}
/// Writes an ASCII string space padded (identify strings) into `b[off..off+len]`.
pub fn put_ascii(b: &mut [u8], off: usize, len: usize, s: &str) {
    let field = &mut b[off..off + len];
    field.fill(b' ');
    let n = s.len().min(len);
    field[..n].copy_from_slice(&s.as_bytes()[..n]);
}
/// Writes a NUL padded string (NQNs, transport addresses).
pub fn put_str0(b: &mut [u8], off: usize, len: usize, s: &str) {
    let field = &mut b[off..off + len];
    field.fill(0);
    let n = s.len().min(len - 1);
    field[..n].copy_from_slice(&s.as_bytes()[..n]);
}
/// Reads a NUL terminated (or full-length) string field.
pub fn get_str0(b: &[u8], off: usize, len: usize) -> String {
    let field = &b[off..off + len];
    let end = field.iter().position(|&c| c == 0).unwrap_or(len);
    String::from_utf8_lossy(&field[..end]).into_owned()
}
