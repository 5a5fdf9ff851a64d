//! NBD wire constants and the pure parsing and encoding of transmission
//! messages (no I/O here, so it can be tested and fuzzed alone). The
//! protocol is `doc/proto.md` of the NBD project; all integers big-endian.

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const REPLY_MAGIC_OPT: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1;
pub const CLIENT_NO_ZEROES: u32 = 2;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_SHUTDOWN: u32 = 0x8000_0007;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

// Info types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_CACHE: u16 = 1 << 10;
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply chunks.
pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = 0x8001;

// base:allocation.
pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;
pub const BASE_ALLOCATION: &str = "base:allocation";

// Error values on the wire (protocol values, not host errno).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// The largest READ or WRITE payload tern accepts: 32 MiB, the size the spec
/// says a server should never treat as abuse.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Block sizes advertised in `NBD_INFO_BLOCK_SIZE`: any byte alignment
/// works, 4 KiB is what the page cache likes.
pub const MIN_BLOCK: u32 = 1;
pub const PREFERRED_BLOCK: u32 = 4096;
/// Longest string (export name, query) the spec allows.
pub const MAX_STRING: usize = 4096;
/// Option data longer than this is read and discarded, then refused with
/// `ERR_TOO_BIG`; longer than `MAX_OPTION_DISCARD`, the client is dropped.
pub const MAX_OPTION: u32 = 64 * 1024;
pub const MAX_OPTION_DISCARD: u32 = 16 << 20;
/// At most this many block-status descriptors per reply.
pub const MAX_EXTENTS: usize = 1024;

/// Maps a host errno onto the NBD error set (the one place this happens).
pub fn wire_error(errno: i32) -> u32 {
    match errno {
        libc_errno::EPERM | libc_errno::EROFS => EPERM,
        libc_errno::ENOMEM => ENOMEM,
        libc_errno::EINVAL => EINVAL,
        libc_errno::ENOSPC | libc_errno::EDQUOT | libc_errno::EFBIG => ENOSPC,
        libc_errno::EOVERFLOW => EOVERFLOW,
        libc_errno::EOPNOTSUPP => ENOTSUP,
        libc_errno::ESHUTDOWN => ESHUTDOWN,
        _ => EIO,
    }
}

/// The Linux errno values `wire_error` needs (x86_64 and aarch64 agree).
mod libc_errno {
    pub const EPERM: i32 = 1;
    pub const ENOMEM: i32 = 12;
    pub const EINVAL: i32 = 22;
    pub const EFBIG: i32 = 27;
    pub const ENOSPC: i32 = 28;
    pub const EROFS: i32 = 30;
    pub const EOVERFLOW: i32 = 75;
    pub const EOPNOTSUPP: i32 = 95;
    pub const ESHUTDOWN: i32 = 108;
    pub const EDQUOT: i32 = 122;
}

/// A transmission request header (28 bytes on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

pub const REQUEST_LEN: usize = 28;

impl Request {
    /// Parses a header; `None` when the magic is wrong (the stream is out of
    /// sync and the connection must end).
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Option<Self> {
        if be32(b, 0) != REQUEST_MAGIC {
            return None;
        }
        Some(Request {
            flags: be16(b, 4),
            kind: be16(b, 6),
            cookie: be64(b, 8),
            offset: be64(b, 16),
            length: be32(b, 24),
        })
    }

    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// What the connection negotiated that changes how requests are checked
/// and answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    pub export_size: u64,
    pub structured: bool,
    /// The context id of `base:allocation`, if the client selected it.
    pub base_allocation: Option<u32>,
}

/// Checks a request against the export and the session, returning the NBD
/// error to answer with. Pure, so every bad-input rule is unit-tested here.
pub fn validate(req: &Request, s: &Session) -> Result<(), u32> {
    // FUA is accepted on every command (the spec requires it once
    // SEND_FUA is advertised); the others only where documented.
    let allowed = CMD_FLAG_FUA
        | match req.kind {
            CMD_READ if s.structured => CMD_FLAG_DF,
            CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            CMD_READ | CMD_WRITE | CMD_DISC | CMD_FLUSH | CMD_TRIM | CMD_CACHE => 0,
            _ => return Err(EINVAL),
        };
    if req.flags & !allowed != 0 {
        return Err(EINVAL);
    }
    let len = req.length as u64;
    let end = req.offset.checked_add(len);
    let past_end = end.is_none_or(|e| e > s.export_size);
    match req.kind {
        CMD_READ | CMD_WRITE if req.length > MAX_PAYLOAD => Err(EINVAL),
        CMD_WRITE | CMD_WRITE_ZEROES if past_end => Err(if end.is_none() { EINVAL } else { ENOSPC }),
        CMD_READ | CMD_TRIM | CMD_CACHE | CMD_BLOCK_STATUS if past_end => Err(EINVAL),
        CMD_BLOCK_STATUS if s.base_allocation.is_none() || !s.structured || req.length == 0 => Err(EINVAL),
        _ => Ok(()),
    }
}

/// A simple reply header.
pub fn simple_reply(cookie: u64, error: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk header for a payload of `len` bytes.
pub fn chunk_header(cookie: u64, flags: u16, kind: u16, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// A complete `NBD_REPLY_TYPE_ERROR` chunk (with DONE) carrying a message.
pub fn error_chunk(cookie: u64, error: u32, message: &str) -> Vec<u8> {
    // Cut at a character boundary: the message is UTF-8 on the wire too.
    let mut cut = message.len().min(MAX_STRING);
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    let msg = &message.as_bytes()[..cut];
    let mut b = Vec::with_capacity(20 + 6 + msg.len());
    b.extend_from_slice(&chunk_header(cookie, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 6 + msg.len() as u32));
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    b.extend_from_slice(msg);
    b
}

pub fn be16(b: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([b[o], b[o + 1]])
}

pub fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

pub fn be64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Session = Session { export_size: 1 << 20, structured: true, base_allocation: Some(1) };

    #[test]
    fn a_long_error_message_is_cut_at_a_character_boundary() {
        let message = format!("{}é and more", "x".repeat(MAX_STRING - 1));
        let chunk = error_chunk(1, EIO, &message);
        let len = be16(&chunk, 24) as usize;
        assert_eq!(len, MAX_STRING - 1, "'é' straddles the limit: cut before it");
        assert!(std::str::from_utf8(&chunk[26..]).is_ok());
        assert_eq!(chunk.len(), 26 + len);
    }

    fn req(kind: u16, flags: u16, offset: u64, length: u32) -> Request {
        Request { flags, kind, cookie: 9, offset, length }
    }

    #[test]
    fn request_round_trips_and_bad_magic_is_refused() {
        let r = req(CMD_WRITE, CMD_FLAG_FUA, 4096, 512);
        assert_eq!(Request::parse(&r.encode()), Some(r));
        let mut b = r.encode();
        b[0] ^= 1;
        assert_eq!(Request::parse(&b), None);
    }

    #[test]
    fn past_the_end_gets_the_spec_error_per_command() {
        let off = (1 << 20) - 10;
        assert_eq!(validate(&req(CMD_READ, 0, off, 11), &S), Err(EINVAL));
        assert_eq!(validate(&req(CMD_WRITE, 0, off, 11), &S), Err(ENOSPC));
        assert_eq!(validate(&req(CMD_WRITE_ZEROES, 0, off, 11), &S), Err(ENOSPC));
        assert_eq!(validate(&req(CMD_TRIM, 0, off, 11), &S), Err(EINVAL));
        assert_eq!(validate(&req(CMD_CACHE, 0, off, 11), &S), Err(EINVAL));
        assert_eq!(validate(&req(CMD_BLOCK_STATUS, 0, off, 11), &S), Err(EINVAL));
        assert_eq!(validate(&req(CMD_READ, 0, off, 10), &S), Ok(()));
    }

    #[test]
    fn offset_plus_length_overflow_is_einval() {
        for kind in [CMD_READ, CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS, CMD_CACHE] {
            assert_eq!(validate(&req(kind, 0, u64::MAX - 2, 4096), &S), Err(EINVAL), "kind {kind}");
        }
    }

    #[test]
    fn unknown_commands_and_flags_are_einval() {
        assert_eq!(validate(&req(99, 0, 0, 1), &S), Err(EINVAL));
        assert_eq!(validate(&req(CMD_READ, 1 << 9, 0, 1), &S), Err(EINVAL));
        assert_eq!(validate(&req(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 1), &S), Err(EINVAL));
        assert_eq!(validate(&req(CMD_READ, CMD_FLAG_REQ_ONE, 0, 1), &S), Err(EINVAL));
        let simple = Session { structured: false, ..S };
        assert_eq!(validate(&req(CMD_READ, CMD_FLAG_DF, 0, 1), &simple), Err(EINVAL));
        // FUA is fine everywhere.
        assert_eq!(validate(&req(CMD_FLUSH, CMD_FLAG_FUA, 0, 0), &S), Ok(()));
    }

    #[test]
    fn oversized_payloads_are_einval_but_large_trims_are_fine() {
        assert_eq!(
            validate(&req(CMD_READ, 0, 0, MAX_PAYLOAD + 1), &Session { export_size: u64::MAX, ..S }),
            Err(EINVAL)
        );
        assert_eq!(
            validate(&req(CMD_WRITE, 0, 0, MAX_PAYLOAD + 1), &Session { export_size: u64::MAX, ..S }),
            Err(EINVAL)
        );
        assert_eq!(validate(&req(CMD_TRIM, 0, 0, u32::MAX), &Session { export_size: u64::MAX, ..S }), Ok(()));
    }

    #[test]
    fn block_status_needs_the_negotiated_context() {
        let none = Session { base_allocation: None, ..S };
        assert_eq!(validate(&req(CMD_BLOCK_STATUS, 0, 0, 512), &none), Err(EINVAL));
        assert_eq!(validate(&req(CMD_BLOCK_STATUS, 0, 0, 0), &S), Err(EINVAL));
        assert_eq!(validate(&req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 512), &S), Ok(()));
    }

    #[test]
    fn errno_maps_onto_the_nbd_set() {
        assert_eq!(wire_error(28), ENOSPC);
        assert_eq!(wire_error(122), ENOSPC);
        assert_eq!(wire_error(95), ENOTSUP);
        assert_eq!(wire_error(5), EIO);
        assert_eq!(wire_error(4242), EIO);
    }
}
