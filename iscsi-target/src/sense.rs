//! SCSI status, sense data and the outcome of a command: the vocabulary the
//! command modules (`scsi`, `pr`, `xcopy`, `opcodes`) answer in, and the one
//! place where volume errors become sense (`io_error_sense`).

use volume::{IoBuf, IoError};

pub const STATUS_GOOD: u8 = 0x00;
pub const STATUS_CHECK_CONDITION: u8 = 0x02;
pub const STATUS_RESERVATION_CONFLICT: u8 = 0x18;

pub const KEY_NO_SENSE: u8 = 0x0;
pub const KEY_NOT_READY: u8 = 0x2;
pub const KEY_MEDIUM_ERROR: u8 = 0x3;
pub const KEY_ILLEGAL_REQUEST: u8 = 0x5;
pub const KEY_UNIT_ATTENTION: u8 = 0x6;
pub const KEY_MISCOMPARE: u8 = 0xe;

/// Fixed-format sense data fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
    pub info: Option<u32>,
    /// Sense-key specific field pointer into the CDB (byte index).
    pub cdb_field: Option<u16>,
}

impl Sense {
    pub const fn new(key: u8, asc: u8, ascq: u8) -> Sense {
        Sense {
            key,
            asc,
            ascq,
            info: None,
            cdb_field: None,
        }
    }
    /// INVALID FIELD IN CDB pointing at CDB byte `byte`.
    pub const fn invalid_cdb_field(byte: u16) -> Sense {
        Sense {
            key: KEY_ILLEGAL_REQUEST,
            asc: 0x24,
            ascq: 0,
            info: None,
            cdb_field: Some(byte),
        }
    }
    /// 18-byte fixed format sense (or descriptor format when `desc`).
    pub fn to_bytes(self, desc: bool) -> Vec<u8> {
        if desc {
            let mut s = vec![0x72, self.key, self.asc, self.ascq, 0, 0, 0, 0];
            if let Some(i) = self.info {
                s[7] = 12;
                s.extend_from_slice(&[0x00, 0x0a, 0x80, 0]);
                s.extend_from_slice(&(i as u64).to_be_bytes());
            }
            return s;
        }
        let mut s = vec![0u8; 18];
        s[0] = 0x70;
        if let Some(i) = self.info {
            s[0] |= 0x80;
            s[3..7].copy_from_slice(&i.to_be_bytes());
        }
        s[2] = self.key;
        s[7] = 10;
        s[12] = self.asc;
        s[13] = self.ascq;
        if let Some(f) = self.cdb_field {
            s[15] = 0xc0; // SKSV, C/D = CDB
            s[16..18].copy_from_slice(&f.to_be_bytes());
        }
        s
    }
}

pub const SENSE_INVALID_OPCODE: Sense = Sense::new(KEY_ILLEGAL_REQUEST, 0x20, 0x00);
pub const SENSE_LBA_OUT_OF_RANGE: Sense = Sense::new(KEY_ILLEGAL_REQUEST, 0x21, 0x00);
pub const SENSE_INVALID_FIELD_CDB: Sense = Sense::new(KEY_ILLEGAL_REQUEST, 0x24, 0x00);
pub const SENSE_LUN_NOT_SUPPORTED: Sense = Sense::new(KEY_ILLEGAL_REQUEST, 0x25, 0x00);
pub const SENSE_INVALID_FIELD_PARAM: Sense = Sense::new(KEY_ILLEGAL_REQUEST, 0x26, 0x00);
pub const SENSE_PARAM_LIST_LENGTH: Sense = Sense::new(KEY_ILLEGAL_REQUEST, 0x1a, 0x00);
pub const SENSE_SAVING_NOT_SUPPORTED: Sense = Sense::new(KEY_ILLEGAL_REQUEST, 0x39, 0x00);
pub const SENSE_STANDBY: Sense = Sense::new(KEY_NOT_READY, 0x04, 0x0b);
pub const SENSE_NOT_READY: Sense = Sense::new(KEY_NOT_READY, 0x04, 0x00);
pub const SENSE_WRITE_ERROR: Sense = Sense::new(KEY_MEDIUM_ERROR, 0x0c, 0x00);
pub const SENSE_READ_ERROR: Sense = Sense::new(KEY_MEDIUM_ERROR, 0x11, 0x00);
pub const SENSE_ALUA_CHANGED: Sense = Sense::new(KEY_UNIT_ATTENTION, 0x2a, 0x06);
pub const SENSE_RESET_OCCURRED: Sense = Sense::new(KEY_UNIT_ATTENTION, 0x29, 0x00);
pub const SENSE_LUN_RESET: Sense = Sense::new(KEY_UNIT_ATTENTION, 0x29, 0x03);
pub const SENSE_RESERVATIONS_PREEMPTED: Sense = Sense::new(KEY_UNIT_ATTENTION, 0x2a, 0x03);
pub const SENSE_RESERVATIONS_RELEASED: Sense = Sense::new(KEY_UNIT_ATTENTION, 0x2a, 0x04);
pub const SENSE_REGISTRATIONS_PREEMPTED: Sense = Sense::new(KEY_UNIT_ATTENTION, 0x2a, 0x05);

/// The outcome of one SCSI command.
#[derive(Debug, Default)]
pub struct ScsiResult {
    pub status: u8,
    pub sense: Option<Sense>,
    /// Data-In (before truncation to the expected transfer length): for a
    /// READ, the buffer the volume read into (sent from there).
    pub data: IoBuf,
}

impl ScsiResult {
    /// Success with Data-In: a read's buffer as is, or (for the small
    /// replies of control commands) a copy of a vector.
    pub fn good(data: impl Into<IoBuf>) -> ScsiResult {
        ScsiResult {
            status: STATUS_GOOD,
            sense: None,
            data: data.into(),
        }
    }
    pub fn check(s: Sense) -> ScsiResult {
        ScsiResult {
            status: STATUS_CHECK_CONDITION,
            sense: Some(s),
            data: IoBuf::empty(),
        }
    }
    pub fn conflict() -> ScsiResult {
        ScsiResult {
            status: STATUS_RESERVATION_CONFLICT,
            sense: None,
            data: IoBuf::empty(),
        }
    }
}

/// The one place where volume errors become SCSI sense.
pub fn io_error_sense(e: IoError, write: bool) -> Sense {
    match e {
        IoError::NotPrimary => SENSE_STANDBY,
        IoError::OutOfRange => SENSE_LBA_OUT_OF_RANGE,
        IoError::Unaligned | IoError::TooLarge => SENSE_INVALID_FIELD_CDB,
        IoError::Io(_) if write => SENSE_WRITE_ERROR,
        IoError::Io(_) => SENSE_READ_ERROR,
        IoError::Unavailable => SENSE_NOT_READY,
    }
}

/// Callback receiving the result of one command.
pub type Done = Box<dyn FnOnce(ScsiResult) + Send + 'static>;
