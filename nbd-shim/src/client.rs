//! A small blocking NBD client: fixed newstyle, `NBD_OPT_GO`, simple
//! replies, one request at a time. `tern demo` uses it to write through a
//! real NBD connection with nothing but the tern binary; tools that need
//! speed use qemu, libnbd or the kernel.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use crate::protocol::*;

pub struct Client {
    sock: UnixStream,
    size: u64,
    cookie: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot talk to the NBD server")]
    Io(#[from] io::Error),
    #[error("the NBD server refused: {0}")]
    Refused(String),
    #[error("request failed with NBD error {0}")]
    Request(u32),
}

impl Client {
    /// Connects to a Unix socket and opens `export`.
    pub fn connect(socket: &Path, export: &str) -> Result<Self, ClientError> {
        let mut sock = UnixStream::connect(socket)?;
        let mut greeting = [0u8; 18];
        sock.read_exact(&mut greeting)?;
        if be64(&greeting, 0) != NBDMAGIC || be64(&greeting, 8) != IHAVEOPT {
            return Err(ClientError::Refused("not a fixed-newstyle NBD server".into()));
        }
        sock.write_all(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes())?;
        let mut data = (export.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut opt = IHAVEOPT.to_be_bytes().to_vec();
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
        opt.extend_from_slice(&data);
        sock.write_all(&opt)?;
        let mut size = None;
        loop {
            let mut h = [0u8; 20];
            sock.read_exact(&mut h)?;
            let (kind, len) = (be32(&h, 12), be32(&h, 16) as usize);
            if len > MAX_OPTION as usize {
                return Err(ClientError::Refused(format!("option reply of {len} bytes")));
            }
            let mut d = vec![0u8; len];
            sock.read_exact(&mut d)?;
            match kind {
                REP_ACK => break,
                REP_INFO if d.len() >= 12 && be16(&d, 0) == INFO_EXPORT => size = Some(be64(&d, 2)),
                REP_INFO => {}
                _ => return Err(ClientError::Refused(String::from_utf8_lossy(&d).into_owned())),
            }
        }
        let size = size.ok_or_else(|| ClientError::Refused("no export size in the reply".into()))?;
        Ok(Client { sock, size, cookie: 0 })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    fn request(&mut self, kind: u16, flags: u16, offset: u64, length: u32, payload: &[u8]) -> Result<(), ClientError> {
        self.cookie += 1;
        let req = Request { flags, kind, cookie: self.cookie, offset, length };
        self.sock.write_all(&req.encode())?;
        self.sock.write_all(payload)?;
        Ok(())
    }

    fn simple_reply(&mut self) -> Result<(), ClientError> {
        let mut h = [0u8; 16];
        self.sock.read_exact(&mut h)?;
        if be32(&h, 0) != SIMPLE_REPLY_MAGIC || be64(&h, 8) != self.cookie {
            return Err(ClientError::Refused("unexpected reply".into()));
        }
        match be32(&h, 4) {
            0 => Ok(()),
            e => Err(ClientError::Request(e)),
        }
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), ClientError> {
        self.request(CMD_WRITE, 0, offset, data.len() as u32, data)?;
        self.simple_reply()
    }

    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ClientError> {
        self.request(CMD_READ, 0, offset, buf.len() as u32, &[])?;
        self.simple_reply()?;
        self.sock.read_exact(buf)?;
        Ok(())
    }

    pub fn zero(&mut self, offset: u64, len: u32) -> Result<(), ClientError> {
        self.request(CMD_WRITE_ZEROES, 0, offset, len, &[])?;
        self.simple_reply()
    }

    pub fn trim(&mut self, offset: u64, len: u32) -> Result<(), ClientError> {
        self.request(CMD_TRIM, 0, offset, len, &[])?;
        self.simple_reply()
    }

    pub fn flush(&mut self) -> Result<(), ClientError> {
        self.request(CMD_FLUSH, 0, 0, 0, &[])?;
        self.simple_reply()
    }

    /// Sends NBD_CMD_DISC and closes.
    pub fn disconnect(mut self) -> Result<(), ClientError> {
        self.request(CMD_DISC, 0, 0, 0, &[])?;
        Ok(())
    }
}
