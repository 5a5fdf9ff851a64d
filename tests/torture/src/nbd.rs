//! A minimal NBD client (fixed newstyle, `NBD_OPT_GO`, simple replies, one
//! request at a time) whose every failure is an error, never a panic: the
//! server it talks to is killed under it on purpose.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const FLAG_FUA: u16 = 1;
pub const FLAG_NO_HOLE: u16 = 2;

pub struct Client {
    sock: UnixStream,
    cookie: u64,
}

fn bad(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

impl Client {
    /// Connects and selects `export`. `patience` bounds every later wait
    /// for a reply: a server that is alive and never answers is a hang.
    pub fn connect(socket: &Path, export: &str, patience: Duration) -> io::Result<Client> {
        let mut sock = UnixStream::connect(socket)?;
        sock.set_read_timeout(Some(patience))?;
        let mut greeting = [0u8; 18];
        sock.read_exact(&mut greeting)?;
        if &greeting[..8] != b"NBDMAGIC" {
            return Err(bad("not an NBD server"));
        }
        sock.write_all(&3u32.to_be_bytes())?; // fixed newstyle, no zeroes
        let mut data = (export.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut opt = 0x4948_4156_454f_5054u64.to_be_bytes().to_vec();
        opt.extend_from_slice(&7u32.to_be_bytes()); // GO
        opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
        opt.extend_from_slice(&data);
        sock.write_all(&opt)?;
        let mut sized = false;
        loop {
            let mut h = [0u8; 20];
            sock.read_exact(&mut h)?;
            let kind = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
            let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize;
            if len > 4096 {
                return Err(bad("option reply too long"));
            }
            let mut d = vec![0u8; len];
            sock.read_exact(&mut d)?;
            match kind {
                1 => break,
                3 if len >= 12 && d[..2] == [0, 0] => sized = true,
                3 => {}
                other => return Err(bad(format!("GO refused ({other:#x}): {}", String::from_utf8_lossy(&d)))),
            }
        }
        if !sized {
            return Err(bad("no export size"));
        }
        Ok(Client { sock, cookie: 0 })
    }

    /// Sends one request and waits for its reply: the error code (0 on
    /// success), with the data of a READ.
    pub fn request(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> io::Result<(u32, Vec<u8>)> {
        self.cookie += 1;
        let mut b = Vec::with_capacity(28 + payload.len());
        b.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&self.cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&length.to_be_bytes());
        b.extend_from_slice(payload);
        self.sock.write_all(&b)?;
        let mut h = [0u8; 16];
        self.sock.read_exact(&mut h)?;
        if h[..4] != 0x6744_6698u32.to_be_bytes() {
            return Err(bad("not a simple reply"));
        }
        let error = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
        if u64::from_be_bytes(h[8..16].try_into().map_err(|_| bad("cookie"))?) != self.cookie {
            return Err(bad("a reply to another request"));
        }
        let mut data = Vec::new();
        if kind == CMD_READ && error == 0 {
            data.resize(length as usize, 0);
            self.sock.read_exact(&mut data)?;
        }
        Ok((error, data))
    }
}
