//! A minimal NBD client (fixed newstyle, NBD_OPT_GO, simple replies) for
//! the demo: it writes and reads through the real export over TCP.

use std::io::{Read, Write};
use std::net::TcpStream;

use anyhow::{bail, Context, Result};

const NBDMAGIC: u64 = 0x4e42444d41474943;
const IHAVEOPT: u64 = 0x49484156454F5054;
const OPT_REPLY_MAGIC: u64 = 0x0003e889045565a9;
const REQUEST_MAGIC: u32 = 0x25609513;
const SIMPLE_REPLY_MAGIC: u32 = 0x67446698;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const INFO_EXPORT: u16 = 0;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;

pub struct NbdClient {
    s: TcpStream,
    pub size: u64,
    handle: u64,
}

impl NbdClient {
    pub fn connect(addr: &str, export: &str) -> Result<NbdClient> {
        let mut s =
            TcpStream::connect(addr).with_context(|| format!("connecting to nbd://{addr}"))?;
        s.set_nodelay(true)?;
        let mut b = [0u8; 18];
        s.read_exact(&mut b)?;
        if u64::from_be_bytes(b[0..8].try_into()?) != NBDMAGIC
            || u64::from_be_bytes(b[8..16].try_into()?) != IHAVEOPT
        {
            bail!("{addr} is not an NBD server");
        }
        // Client flags: FIXED_NEWSTYLE | NO_ZEROES.
        s.write_all(&3u32.to_be_bytes())?;
        let mut opt = Vec::new();
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&((4 + export.len() + 2) as u32).to_be_bytes());
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        opt.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&opt)?;
        let mut size = 0;
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h)?;
            if u64::from_be_bytes(h[0..8].try_into()?) != OPT_REPLY_MAGIC {
                bail!("bad option reply from {addr}");
            }
            let typ = u32::from_be_bytes(h[12..16].try_into()?);
            let len = u32::from_be_bytes(h[16..20].try_into()?) as usize;
            let mut data = vec![0u8; len];
            s.read_exact(&mut data)?;
            match typ {
                REP_ACK => break,
                REP_INFO if len >= 12 && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT => {
                    size = u64::from_be_bytes(data[2..10].try_into()?);
                }
                REP_INFO => {}
                t if t & 0x8000_0000 != 0 => {
                    bail!("the NBD server refused export {export:?} (error {t:#x})")
                }
                _ => {}
            }
        }
        Ok(NbdClient { s, size, handle: 1 })
    }

    fn request(&mut self, cmd: u16, flags: u16, offset: u64, len: u32, data: &[u8]) -> Result<()> {
        let mut r = Vec::with_capacity(28 + data.len());
        r.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        r.extend_from_slice(&flags.to_be_bytes());
        r.extend_from_slice(&cmd.to_be_bytes());
        r.extend_from_slice(&self.handle.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        r.extend_from_slice(data);
        self.s.write_all(&r)?;
        Ok(())
    }

    fn reply(&mut self, out: &mut [u8]) -> Result<()> {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h)?;
        if u32::from_be_bytes(h[0..4].try_into()?) != SIMPLE_REPLY_MAGIC {
            bail!("bad NBD reply magic");
        }
        let err = u32::from_be_bytes(h[4..8].try_into()?);
        if err != 0 {
            bail!("NBD error {err}");
        }
        self.s.read_exact(out)?;
        self.handle += 1;
        Ok(())
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.request(CMD_WRITE, 0, offset, data.len() as u32, data)?;
        self.reply(&mut [])
    }

    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>> {
        self.request(CMD_READ, 0, offset, len, &[])?;
        let mut v = vec![0u8; len as usize];
        self.reply(&mut v)?;
        Ok(v)
    }

    pub fn flush(&mut self) -> Result<()> {
        self.request(CMD_FLUSH, 0, 0, 0, &[])?;
        self.reply(&mut [])
    }

    pub fn disconnect(mut self) {
        let _ = self.request(CMD_DISC, 0, 0, 0, &[]);
    }
}
