//! The fixed-newstyle handshake: greeting, client flags and option haggling
//! up to the choice of an export.

use std::io::{self, Read, Write};

use crate::protocol::*;

/// One export a client may pick: a disk of the VM.
#[derive(Debug, Clone)]
pub struct ExportInfo {
    pub name: String,
    pub size: u64,
    /// The disk's index in the mirror.
    pub disk: usize,
    pub description: String,
}

/// The outcome of a successful handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// Index into the export list.
    pub export: usize,
    pub session: Session,
}

/// How a handshake ended without an export.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("client aborted the handshake")]
    Aborted,
    #[error("client closed the connection during the handshake")]
    Closed,
    #[error("protocol violation during the handshake: {0}")]
    Protocol(String),
    #[error("I/O error during the handshake")]
    Io(#[source] io::Error),
}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        use io::ErrorKind::*;
        if matches!(e.kind(), UnexpectedEof | BrokenPipe | ConnectionReset) {
            HandshakeError::Closed
        } else {
            HandshakeError::Io(e)
        }
    }
}

/// The id tern gives `base:allocation` in `NBD_REP_META_CONTEXT`.
const BASE_ALLOCATION_ID: u32 = 1;
/// A client that sends more options than this without choosing an export
/// is not a real client.
const MAX_OPTIONS: usize = 4096;

/// Transmission flags of an export for a session.
pub fn transmission_flags(structured: bool) -> u16 {
    let mut f = TF_HAS_FLAGS
        | TF_SEND_FLUSH
        | TF_SEND_FUA
        | TF_SEND_TRIM
        | TF_SEND_WRITE_ZEROES
        | TF_CAN_MULTI_CONN
        | TF_SEND_CACHE
        | TF_SEND_FAST_ZERO;
    if structured {
        f |= TF_SEND_DF;
    }
    f
}

/// Runs the server side of the handshake.
pub fn negotiate<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
    exports: &[ExportInfo],
) -> Result<Negotiated, HandshakeError> {
    let mut greeting = [0u8; 18];
    greeting[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    greeting[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    greeting[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&greeting)?;
    w.flush()?;
    let client_flags = read_u32(r)?;
    if client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(HandshakeError::Protocol(format!("unknown client flags {client_flags:#x}")));
    }
    let no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;
    let mut h = Haggle { w, exports, structured: false, meta_export: None, base_allocation: false };
    for _ in 0..MAX_OPTIONS {
        let mut head = [0u8; 16];
        r.read_exact(&mut head)?;
        if be64(&head, 0) != IHAVEOPT {
            return Err(HandshakeError::Protocol("option without the IHAVEOPT magic".into()));
        }
        let (opt, len) = (be32(&head, 8), be32(&head, 12));
        if len > MAX_OPTION {
            // EXPORT_NAME has no error reply: hanging up is the only answer.
            if len > MAX_OPTION_DISCARD || opt == OPT_EXPORT_NAME {
                return Err(HandshakeError::Protocol(format!("option {opt} claims {len} bytes of data")));
            }
            io::copy(&mut r.by_ref().take(len as u64), &mut io::sink())?;
            h.reply_error(
                opt,
                REP_ERR_TOO_BIG,
                &format!("option data of {len} bytes is over the {MAX_OPTION}-byte limit"),
            )?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data)?;
        match opt {
            OPT_EXPORT_NAME => {
                // No way to report an error here but to hang up.
                let name = std::str::from_utf8(&data)
                    .map_err(|_| HandshakeError::Protocol("export name is not UTF-8".into()))?;
                let Some(export) = find_export(exports, name) else {
                    return Err(HandshakeError::Protocol(format!("EXPORT_NAME for unknown export {name:?}")));
                };
                let mut reply = Vec::with_capacity(134);
                reply.extend_from_slice(&exports[export].size.to_be_bytes());
                reply.extend_from_slice(&transmission_flags(h.structured).to_be_bytes());
                if !no_zeroes {
                    reply.extend_from_slice(&[0u8; 124]);
                }
                h.w.write_all(&reply)?;
                h.w.flush()?;
                return Ok(h.finish(export));
            }
            OPT_ABORT => {
                // The client may already be gone; that is fine.
                let _ = h.reply(opt, REP_ACK, &[]);
                return Err(HandshakeError::Aborted);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    h.reply_error(opt, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")?;
                    continue;
                }
                for e in exports {
                    let mut b = Vec::new();
                    b.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                    b.extend_from_slice(e.name.as_bytes());
                    b.extend_from_slice(e.description.as_bytes());
                    h.reply(opt, REP_SERVER, &b)?;
                }
                h.reply(opt, REP_ACK, &[])?;
            }
            OPT_STARTTLS => {
                h.reply_error(opt, REP_ERR_POLICY, "TLS is not supported; use the Unix socket or a loopback address")?;
            }
            OPT_INFO | OPT_GO => {
                if let Some(export) = h.info(opt, &data)? {
                    if opt == OPT_GO {
                        return Ok(h.finish(export));
                    }
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    h.reply_error(opt, REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data")?;
                } else {
                    h.structured = true;
                    h.reply(opt, REP_ACK, &[])?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => h.meta_context(opt, &data)?,
            _ => h.reply_error(opt, REP_ERR_UNSUP, "option not supported by tern")?,
        }
    }
    Err(HandshakeError::Protocol(format!("more than {MAX_OPTIONS} options without choosing an export")))
}

/// An empty name picks the first disk (the spec's "default export").
fn find_export(exports: &[ExportInfo], name: &str) -> Option<usize> {
    if name.is_empty() {
        return if exports.is_empty() { None } else { Some(0) };
    }
    exports.iter().position(|e| e.name == name)
}

struct Haggle<'a, W> {
    w: &'a mut W,
    exports: &'a [ExportInfo],
    structured: bool,
    /// The export the last SET_META_CONTEXT named.
    meta_export: Option<usize>,
    base_allocation: bool,
}

impl<W: Write> Haggle<'_, W> {
    fn reply(&mut self, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
        let mut b = Vec::with_capacity(20 + data.len());
        b.extend_from_slice(&REPLY_MAGIC_OPT.to_be_bytes());
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.w.write_all(&b)?;
        self.w.flush()
    }

    /// An error reply with a message the client may show its user.
    fn reply_error(&mut self, opt: u32, kind: u32, message: &str) -> io::Result<()> {
        self.reply(opt, kind, message.as_bytes())
    }

    fn finish(&self, export: usize) -> Negotiated {
        let base_allocation =
            (self.structured && self.base_allocation && self.meta_export == Some(export)).then_some(BASE_ALLOCATION_ID);
        Negotiated {
            export,
            session: Session { export_size: self.exports[export].size, structured: self.structured, base_allocation },
        }
    }

    fn unknown_export(&mut self, opt: u32, name: &str) -> io::Result<()> {
        let names: Vec<&str> = self.exports.iter().map(|e| e.name.as_str()).collect();
        self.reply_error(
            opt,
            REP_ERR_UNKNOWN,
            &format!("no export named {name:?}; this server has: {}", names.join(", ")),
        )
    }

    /// NBD_OPT_INFO and NBD_OPT_GO; `Some(export)` when it succeeded.
    fn info(&mut self, opt: u32, data: &[u8]) -> io::Result<Option<usize>> {
        let Some((name, requests)) = parse_info(data) else {
            self.reply_error(opt, REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO data")?;
            return Ok(None);
        };
        let Some(export) = find_export(self.exports, name) else {
            self.unknown_export(opt, name)?;
            return Ok(None);
        };
        let e = &self.exports[export];
        let (size, ename, desc) = (e.size, e.name.clone(), e.description.clone());
        let mut b = Vec::with_capacity(12);
        b.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        b.extend_from_slice(&size.to_be_bytes());
        b.extend_from_slice(&transmission_flags(self.structured).to_be_bytes());
        self.reply(opt, REP_INFO, &b)?;
        if requests.contains(&INFO_NAME) {
            let mut b = INFO_NAME.to_be_bytes().to_vec();
            b.extend_from_slice(ename.as_bytes());
            self.reply(opt, REP_INFO, &b)?;
        }
        if requests.contains(&INFO_DESCRIPTION) {
            let mut b = INFO_DESCRIPTION.to_be_bytes().to_vec();
            b.extend_from_slice(desc.as_bytes());
            self.reply(opt, REP_INFO, &b)?;
        }
        // Always sent: our limits are the defaults but for the maximum,
        // which a client should know.
        let mut b = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        b.extend_from_slice(&MIN_BLOCK.to_be_bytes());
        b.extend_from_slice(&PREFERRED_BLOCK.to_be_bytes());
        b.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
        self.reply(opt, REP_INFO, &b)?;
        self.reply(opt, REP_ACK, &[])?;
        Ok(Some(export))
    }

    fn meta_context(&mut self, opt: u32, data: &[u8]) -> io::Result<()> {
        let set = opt == OPT_SET_META_CONTEXT;
        if set {
            // Every SET replaces the selection, even one that fails.
            self.base_allocation = false;
            self.meta_export = None;
        }
        if !self.structured {
            return self.reply_error(opt, REP_ERR_INVALID, "negotiate NBD_OPT_STRUCTURED_REPLY first");
        }
        let Some((name, queries)) = parse_meta_context(data) else {
            return self.reply_error(opt, REP_ERR_INVALID, "malformed meta context data");
        };
        let Some(export) = find_export(self.exports, name) else {
            return self.unknown_export(opt, name);
        };
        // Only `base:allocation` exists: a query selects it if it names it,
        // or (for LIST) is the `base:` wildcard; an empty LIST lists all.
        let matches = if queries.is_empty() {
            !set
        } else {
            queries.iter().any(|q| *q == BASE_ALLOCATION || (!set && *q == "base:"))
        };
        if matches {
            let mut b = Vec::new();
            b.extend_from_slice(&(if set { BASE_ALLOCATION_ID } else { 0 }).to_be_bytes());
            b.extend_from_slice(BASE_ALLOCATION.as_bytes());
            self.reply(opt, REP_META_CONTEXT, &b)?;
        }
        if set {
            self.base_allocation = matches;
            self.meta_export = Some(export);
        }
        self.reply(opt, REP_ACK, &[])
    }
}

fn read_u32<R: Read>(r: &mut R) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

/// Parses NBD_OPT_INFO/GO data: `{ u32 len | name | u16 n | u16 * n }`.
pub fn parse_info(d: &[u8]) -> Option<(&str, Vec<u16>)> {
    let mut p = Parser(d);
    let name = p.string()?;
    let n = p.u16()? as usize;
    let requests = (0..n).map(|_| p.u16()).collect::<Option<Vec<_>>>()?;
    p.0.is_empty().then_some((name, requests))
}

/// Parses LIST/SET_META_CONTEXT data: `{ u32 len | name | u32 n | (u32 len | query) * n }`.
pub fn parse_meta_context(d: &[u8]) -> Option<(&str, Vec<&str>)> {
    let mut p = Parser(d);
    let name = p.string()?;
    let n = p.u32()? as usize;
    let mut queries = Vec::new();
    for _ in 0..n {
        queries.push(p.string()?);
    }
    p.0.is_empty().then_some((name, queries))
}

/// A bounds-checked reader over option data.
struct Parser<'a>(&'a [u8]);

impl<'a> Parser<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// A length-prefixed string of at most 4096 bytes, UTF-8, no NUL.
    fn string(&mut self) -> Option<&'a str> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            return None;
        }
        let s = std::str::from_utf8(self.take(n)?).ok()?;
        (!s.contains('\0')).then_some(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exports() -> Vec<ExportInfo> {
        vec![
            ExportInfo { name: "disk0".into(), size: 1 << 20, disk: 0, description: "d0".into() },
            ExportInfo { name: "disk1".into(), size: 2 << 20, disk: 1, description: "d1".into() },
        ]
    }

    fn opt(o: u32, data: &[u8]) -> Vec<u8> {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&o.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        b
    }

    fn go(name: &str) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        opt(OPT_GO, &d)
    }

    fn run(client: &[u8]) -> (Result<Negotiated, HandshakeError>, Vec<u8>) {
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend_from_slice(client);
        let mut out = Vec::new();
        let res = negotiate(&mut &input[..], &mut out, &exports());
        (res, out)
    }

    /// The option replies (type of each) in the server's output.
    fn reply_types(out: &[u8]) -> Vec<u32> {
        let mut p = 18;
        let mut types = Vec::new();
        while p + 20 <= out.len() && be64(out, p) == REPLY_MAGIC_OPT {
            types.push(be32(out, p + 12));
            p += 20 + be32(out, p + 16) as usize;
        }
        types
    }

    #[test]
    fn go_picks_the_named_export() {
        let (res, out) = run(&go("disk1"));
        let n = res.unwrap();
        assert_eq!(n.export, 1);
        assert_eq!(n.session.export_size, 2 << 20);
        assert_eq!(reply_types(&out), vec![REP_INFO, REP_INFO, REP_ACK]);
    }

    #[test]
    fn unknown_option_is_unsup_and_the_stream_stays_in_sync() {
        let mut c = opt(200, &[1, 2, 3, 4, 5]);
        c.extend(go("disk0"));
        let (res, out) = run(&c);
        assert!(res.is_ok());
        assert_eq!(reply_types(&out)[0], REP_ERR_UNSUP);
    }

    #[test]
    fn unknown_export_gets_err_unknown_naming_the_real_ones() {
        let mut c = go("nope");
        c.extend(go("disk0"));
        let (res, out) = run(&c);
        assert!(res.is_ok());
        assert_eq!(reply_types(&out)[0], REP_ERR_UNKNOWN);
        assert!(String::from_utf8_lossy(&out).contains("disk0, disk1"));
    }

    #[test]
    fn overlong_names_and_truncated_data_are_invalid() {
        let mut d = 5000u32.to_be_bytes().to_vec();
        d.extend(vec![b'a'; 5000]);
        d.extend_from_slice(&0u16.to_be_bytes());
        let mut c = opt(OPT_GO, &d);
        c.extend(opt(OPT_GO, &[0, 0, 0, 9, b'x']));
        c.extend(opt(OPT_LIST, &[1]));
        c.extend(go("disk0"));
        let (res, out) = run(&c);
        assert!(res.is_ok());
        assert_eq!(reply_types(&out)[..3], [REP_ERR_INVALID, REP_ERR_INVALID, REP_ERR_INVALID]);
    }

    #[test]
    fn huge_option_is_discarded_with_too_big_and_absurd_one_disconnects() {
        let mut c = opt(OPT_LIST, &vec![0; (MAX_OPTION + 1) as usize]);
        c.extend(go("disk0"));
        let (res, out) = run(&c);
        assert!(res.is_ok());
        assert_eq!(reply_types(&out)[0], REP_ERR_TOO_BIG);
        let mut c = IHAVEOPT.to_be_bytes().to_vec();
        c.extend_from_slice(&OPT_LIST.to_be_bytes());
        c.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(run(&c).0, Err(HandshakeError::Protocol(_))));
    }

    #[test]
    fn unknown_client_flags_disconnect() {
        let mut out = Vec::new();
        let input = 0x80u32.to_be_bytes();
        assert!(matches!(negotiate(&mut &input[..], &mut out, &exports()), Err(HandshakeError::Protocol(_))));
    }

    #[test]
    fn base_allocation_is_selected_only_after_structured_replies() {
        let mut q = 5u32.to_be_bytes().to_vec();
        q.extend_from_slice(b"disk0");
        q.extend_from_slice(&1u32.to_be_bytes());
        q.extend_from_slice(&(BASE_ALLOCATION.len() as u32).to_be_bytes());
        q.extend_from_slice(BASE_ALLOCATION.as_bytes());
        let mut c = opt(OPT_SET_META_CONTEXT, &q);
        c.extend(opt(OPT_STRUCTURED_REPLY, &[]));
        c.extend(opt(OPT_SET_META_CONTEXT, &q));
        c.extend(go("disk0"));
        let (res, out) = run(&c);
        let n = res.unwrap();
        assert_eq!(n.session.base_allocation, Some(BASE_ALLOCATION_ID));
        assert!(n.session.structured);
        assert_eq!(reply_types(&out)[..4], [REP_ERR_INVALID, REP_ACK, REP_META_CONTEXT, REP_ACK]);
    }

    #[test]
    fn abort_is_acknowledged() {
        let (res, out) = run(&opt(OPT_ABORT, &[]));
        assert!(matches!(res, Err(HandshakeError::Aborted)));
        assert_eq!(reply_types(&out), vec![REP_ACK]);
    }

    #[test]
    fn export_name_with_no_zeroes_sends_ten_bytes() {
        let (res, out) = run(&opt(OPT_EXPORT_NAME, b"disk0"));
        assert_eq!(res.unwrap().export, 0);
        assert_eq!(out.len(), 18 + 10);
        assert_eq!(be64(&out, 18), 1 << 20);
    }

    #[test]
    fn random_bytes_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for _ in 0..2000 {
            let n = rng.gen_range(0..200);
            let mut input = vec![0u8; n];
            rng.fill(&mut input[..]);
            let mut out = Vec::new();
            let _ = negotiate(&mut &input[..], &mut out, &exports());
        }
    }
}
