//! Fixed-newstyle handshake and option haggling.
//!
//! [`negotiate`] runs over any `Read`/`Write` pair, so tests and the fuzz
//! driver feed it byte buffers; the server feeds it a socket.

use std::io::{self, Read, Write};

use crate::proto::*;

/// Largest option payload read into memory. The biggest legal option is
/// NBD_OPT_GO/INFO: a name of at most 4096 bytes plus info requests.
pub const MAX_OPTION_BYTES: u32 = 16 * 1024;

/// Options accepted on one connection before the client is judged to be
/// wasting the server's time.
pub const MAX_OPTIONS: usize = 256;

/// What the server tells clients about its one export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
    pub size_bytes: u64,
    pub flags: u16,
    pub min_block_bytes: u32,
    pub preferred_block_bytes: u32,
    pub max_block_bytes: u32,
}

impl ExportInfo {
    /// The empty name selects the default export, which is ours.
    fn matches(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.name.as_bytes()
    }
}

/// How a handshake ended when it did not reach the transmission phase.
#[derive(Debug)]
pub enum HandshakeEnd {
    /// The client sent NBD_OPT_ABORT (soft disconnect).
    Aborted,
    /// The client broke the protocol; the connection is closed.
    Violation(String),
    /// The socket failed or reached end of file.
    Io(io::Error),
}

impl From<io::Error> for HandshakeEnd {
    fn from(e: io::Error) -> Self {
        HandshakeEnd::Io(e)
    }
}

impl std::fmt::Display for HandshakeEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandshakeEnd::Aborted => write!(f, "client aborted the handshake"),
            HandshakeEnd::Violation(m) => write!(f, "protocol violation: {m}"),
            HandshakeEnd::Io(e) => write!(f, "I/O error: {e}"),
        }
    }
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn option_reply(w: &mut impl Write, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let mut h = [0u8; 20];
    h[0..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    h[8..12].copy_from_slice(&opt.to_be_bytes());
    h[12..16].copy_from_slice(&kind.to_be_bytes());
    h[16..20].copy_from_slice(&(data.len() as u32).to_be_bytes());
    w.write_all(&h)?;
    w.write_all(data)
}

fn info_reply(w: &mut impl Write, opt: u32, info: u16, body: &[u8]) -> io::Result<()> {
    let mut data = Vec::with_capacity(2 + body.len());
    data.extend_from_slice(&info.to_be_bytes());
    data.extend_from_slice(body);
    option_reply(w, opt, REP_INFO, &data)
}

/// Parses the NBD_OPT_INFO / NBD_OPT_GO payload:
/// u32 name length, name, u16 count, count x u16 info requests.
fn parse_info_request(data: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let name_len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    let name = data.get(4..4usize.checked_add(name_len)?)?;
    let rest = &data[4 + name_len..];
    let count = u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?) as usize;
    let reqs = &rest[2..];
    if reqs.len() != count * 2 {
        return None;
    }
    Some((
        name,
        reqs.chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect(),
    ))
}

/// Sends the export's NBD_REP_INFO replies. NBD_INFO_EXPORT and
/// NBD_INFO_BLOCK_SIZE always go out (clients ignore what they did not ask
/// for, and the block size tells them our alignment); name and description
/// only on request.
fn send_info(w: &mut impl Write, opt: u32, export: &ExportInfo, reqs: &[u16]) -> io::Result<()> {
    let mut body = [0u8; 10];
    body[0..8].copy_from_slice(&export.size_bytes.to_be_bytes());
    body[8..10].copy_from_slice(&export.flags.to_be_bytes());
    info_reply(w, opt, INFO_EXPORT, &body)?;
    let mut bs = [0u8; 12];
    bs[0..4].copy_from_slice(&export.min_block_bytes.to_be_bytes());
    bs[4..8].copy_from_slice(&export.preferred_block_bytes.to_be_bytes());
    bs[8..12].copy_from_slice(&export.max_block_bytes.to_be_bytes());
    info_reply(w, opt, INFO_BLOCK_SIZE, &bs)?;
    if reqs.contains(&INFO_NAME) {
        info_reply(w, opt, INFO_NAME, export.name.as_bytes())?;
    }
    if reqs.contains(&INFO_DESCRIPTION) {
        info_reply(w, opt, INFO_DESCRIPTION, export.description.as_bytes())?;
    }
    option_reply(w, opt, REP_ACK, &[])
}

/// Runs the handshake to the start of the transmission phase. Returns
/// `Ok(())` when the client chose our export (NBD_OPT_EXPORT_NAME or
/// NBD_OPT_GO); `shutting_down` makes every option but ABORT fail with
/// NBD_REP_ERR_SHUTDOWN.
pub fn negotiate<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
    export: &ExportInfo,
    shutting_down: &dyn Fn() -> bool,
) -> Result<(), HandshakeEnd> {
    let mut greeting = [0u8; 18];
    greeting[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    greeting[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    greeting[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&greeting)?;
    w.flush()?;

    let client_flags = read_u32(r)?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(HandshakeEnd::Violation(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;

    let mut data = Vec::new();
    for _ in 0..MAX_OPTIONS {
        let magic = read_u64(r)?;
        if magic != IHAVEOPT {
            return Err(HandshakeEnd::Violation(format!(
                "bad option magic {magic:#x}"
            )));
        }
        let opt = read_u32(r)?;
        let len = read_u32(r)?;
        if len > MAX_OPTION_BYTES {
            return Err(HandshakeEnd::Violation(format!(
                "option {opt} of {len} bytes"
            )));
        }
        data.clear();
        data.resize(len as usize, 0);
        r.read_exact(&mut data)?;

        if shutting_down() && opt != OPT_ABORT {
            if opt == OPT_EXPORT_NAME {
                return Err(HandshakeEnd::Violation("server shutting down".into()));
            }
            option_reply(w, opt, REP_ERR_SHUTDOWN, b"server shutting down")?;
            w.flush()?;
            continue;
        }
        match opt {
            OPT_EXPORT_NAME => {
                // This option cannot fail with a reply: an unknown name
                // closes the connection.
                if !export.matches(&data) {
                    return Err(HandshakeEnd::Violation(format!(
                        "unknown export {:?}",
                        String::from_utf8_lossy(&data)
                    )));
                }
                let mut reply = [0u8; 10 + 124];
                reply[0..8].copy_from_slice(&export.size_bytes.to_be_bytes());
                reply[8..10].copy_from_slice(&export.flags.to_be_bytes());
                w.write_all(if no_zeroes { &reply[..10] } else { &reply[..] })?;
                w.flush()?;
                return Ok(());
            }
            OPT_ABORT => {
                // The client may already have closed; its loss is not ours.
                let _ = option_reply(w, opt, REP_ACK, &[]).and_then(|_| w.flush());
                return Err(HandshakeEnd::Aborted);
            }
            OPT_LIST => {
                if len != 0 {
                    option_reply(w, opt, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")?;
                } else {
                    let mut server = Vec::with_capacity(4 + export.name.len() + 64);
                    server.extend_from_slice(&(export.name.len() as u32).to_be_bytes());
                    server.extend_from_slice(export.name.as_bytes());
                    server.extend_from_slice(export.description.as_bytes());
                    option_reply(w, opt, REP_SERVER, &server)?;
                    option_reply(w, opt, REP_ACK, &[])?;
                }
            }
            OPT_INFO | OPT_GO => match parse_info_request(&data) {
                None => option_reply(w, opt, REP_ERR_INVALID, b"malformed info request")?,
                Some((name, _)) if !export.matches(name) => {
                    let msg = format!("no export named {:?}", String::from_utf8_lossy(name));
                    option_reply(w, opt, REP_ERR_UNKNOWN, msg.as_bytes())?
                }
                Some((_, reqs)) => {
                    send_info(w, opt, export, &reqs)?;
                    if opt == OPT_GO {
                        w.flush()?;
                        return Ok(());
                    }
                }
            },
            OPT_STARTTLS => option_reply(w, opt, REP_ERR_UNSUP, b"TLS is not supported")?,
            OPT_STRUCTURED_REPLY => option_reply(
                w,
                opt,
                REP_ERR_UNSUP,
                b"structured replies are not supported",
            )?,
            _ => option_reply(w, opt, REP_ERR_UNSUP, b"unsupported option")?,
        }
        w.flush()?;
    }
    Err(HandshakeEnd::Violation(format!(
        "more than {MAX_OPTIONS} options"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_request_parsing_is_total() {
        assert_eq!(
            parse_info_request(&[0, 0, 0, 1, b'a', 0, 1, 0, 3]),
            Some((&b"a"[..], vec![3]))
        );
        assert_eq!(
            parse_info_request(&[0, 0, 0, 0, 0, 0]),
            Some((&b""[..], vec![]))
        );
        assert_eq!(parse_info_request(&[0, 0, 0, 9, b'a', 0, 0]), None);
        assert_eq!(parse_info_request(&[0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(parse_info_request(&[0, 0, 0, 0, 0, 2, 0, 1]), None);
        assert_eq!(parse_info_request(&[]), None);
    }
}
