//! Fuzzes the pure parsers of `tern-nbd` and checks what they promise:
//!
//! - `protocol::Request::parse` on a 28-byte header (refused iff the magic
//!   is wrong, and `encode` gives the same bytes back);
//! - `protocol::validate` of that request against an arbitrary `Session`
//!   (an accepted request is a known command with allowed flags, inside the
//!   export, within the payload limit; a refusal is EINVAL or ENOSPC);
//! - `handshake::parse_info` and `handshake::parse_meta_context` on
//!   arbitrary option data (what they accept re-encodes to exactly the
//!   input, with names of at most 4096 bytes and no NUL).
//!
//! Input layout: 28 bytes of request header, 8 bytes export size, 1 byte
//! session flags (bit 0 structured, bit 1 base:allocation selected), 4
//! bytes context id, then option data. Shorter inputs are zero-padded; the
//! option parsers also see the whole input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tern_nbd::handshake::{parse_info, parse_meta_context};
use tern_nbd::protocol::*;

const FIXED: usize = REQUEST_LEN + 8 + 1 + 4;

fuzz_target!(|data: &[u8]| {
    let mut fixed = [0u8; FIXED];
    let n = data.len().min(FIXED);
    fixed[..n].copy_from_slice(&data[..n]);
    let rest = &data[n..];

    let mut head: [u8; REQUEST_LEN] = fixed[..REQUEST_LEN].try_into().unwrap();
    let parsed = Request::parse(&head);
    assert_eq!(parsed.is_some(), be32(&head, 0) == REQUEST_MAGIC);
    // Give validate a request even when the fuzzer has not found the magic.
    head[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    let req = Request::parse(&head).expect("the magic is right");
    assert_eq!(req.encode(), head);

    let session = Session {
        export_size: be64(&fixed, REQUEST_LEN),
        structured: fixed[REQUEST_LEN + 8] & 1 != 0,
        base_allocation: (fixed[REQUEST_LEN + 8] & 2 != 0).then(|| be32(&fixed, REQUEST_LEN + 9)),
    };
    check_validate(&req, &session);

    for d in [rest, data] {
        check_info(d);
        check_meta_context(d);
    }
});

fn check_validate(req: &Request, s: &Session) {
    if let Err(code) = validate(req, s) {
        assert!(code == EINVAL || code == ENOSPC, "{req:?} {s:?}: error {code}");
        return;
    }
    let allowed = CMD_FLAG_FUA
        | match req.kind {
            CMD_READ if s.structured => CMD_FLAG_DF,
            CMD_READ | CMD_WRITE | CMD_DISC | CMD_FLUSH | CMD_TRIM | CMD_CACHE => 0,
            CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            _ => panic!("{req:?} {s:?}: unknown command accepted"),
        };
    assert_eq!(req.flags & !allowed, 0, "{req:?} {s:?}: flags not allowed for the command were accepted");
    let ranged = matches!(req.kind, CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES | CMD_CACHE | CMD_BLOCK_STATUS);
    if ranged {
        let end = req.offset.checked_add(req.length as u64);
        assert!(end.is_some_and(|e| e <= s.export_size), "{req:?} {s:?}: range past the end accepted");
    }
    if matches!(req.kind, CMD_READ | CMD_WRITE) {
        assert!(req.length <= MAX_PAYLOAD, "{req:?} {s:?}: oversized payload accepted");
    }
    if req.kind == CMD_BLOCK_STATUS {
        assert!(s.structured && s.base_allocation.is_some() && req.length > 0, "{req:?} {s:?}: bad BLOCK_STATUS");
    }
}

fn put_string(b: &mut Vec<u8>, s: &str) {
    assert!(s.len() <= MAX_STRING && !s.contains('\0'), "bad string {s:?} accepted");
    b.extend_from_slice(&(s.len() as u32).to_be_bytes());
    b.extend_from_slice(s.as_bytes());
}

fn check_info(d: &[u8]) {
    let Some((name, requests)) = parse_info(d) else { return };
    let mut b = Vec::new();
    put_string(&mut b, name);
    b.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in &requests {
        b.extend_from_slice(&r.to_be_bytes());
    }
    assert_eq!(b, d, "parse_info accepted data it does not consume exactly");
}

fn check_meta_context(d: &[u8]) {
    let Some((name, queries)) = parse_meta_context(d) else { return };
    let mut b = Vec::new();
    put_string(&mut b, name);
    b.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in &queries {
        put_string(&mut b, q);
    }
    assert_eq!(b, d, "parse_meta_context accepted data it does not consume exactly");
}
