//! A connection's execution of a request against the mirror: READ (from
//! the page cache by a worker, or handed to a waiter when it would wait on
//! the disk), WRITE, WRITE_ZEROES, TRIM, FLUSH, FUA and BLOCK_STATUS, and
//! the encoding of each reply, errors mapped onto NBD's codes.

use super::*;

impl<R: Read, W: Write> Conn<'_, R, W> {
    /// Carries out what a worker handed over and encodes its reply.
    pub(super) fn carry_out(&self, job: Handoff, out: &mut Vec<u8>) {
        match job {
            Handoff::Execute(req) => self.execute(&req, &[], out),
            Handoff::MakeDurable(req) => {
                out.clear();
                self.result_reply(&req, self.mirror.flush(self.disk), out)
            }
        }
    }

    /// Carries a request out and encodes its reply into `out`.
    pub(super) fn execute(&self, req: &Request, payload: &[u8], out: &mut Vec<u8>) {
        if req.kind == CMD_READ {
            self.read(req, out, Wait::Yes); // validates it
            return;
        }
        out.clear();
        if let Err(code) = validate(req, &self.session) {
            let why = match code {
                ENOSPC => "request reaches past the end of the disk",
                _ => "invalid command, flags, length or range",
            };
            return self.error_reply(req, code, why, out);
        }
        let (m, disk, fua) = (self.mirror, self.disk, req.flags & CMD_FLAG_FUA != 0);
        let (off, len) = (req.offset, req.length as u64);
        let result = match req.kind {
            CMD_BLOCK_STATUS => return self.block_status(req, out),
            CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES => self.change(req, payload, fua),
            CMD_FLUSH => m.flush(disk),
            CMD_CACHE => m.prefetch(disk, off, len),
            _ => return self.error_reply(req, EINVAL, "unknown command", out),
        };
        self.result_reply(req, result, out)
    }

    /// Carries out a validated request that changes the disk (WRITE, TRIM,
    /// WRITE_ZEROES); with `durable`, makes it durable before returning.
    pub(super) fn change(&self, req: &Request, payload: &[u8], durable: bool) -> tern_driver::Result<()> {
        let (m, disk) = (self.mirror, self.disk);
        let (off, len) = (req.offset, req.length as u64);
        match req.kind {
            CMD_WRITE => m.write(disk, off, payload, durable),
            CMD_TRIM => m.trim(disk, off, len, durable),
            CMD_WRITE_ZEROES => {
                let mode = ZeroMode {
                    may_punch: req.flags & CMD_FLAG_NO_HOLE == 0,
                    fast_only: req.flags & CMD_FLAG_FAST_ZERO != 0,
                };
                m.zero(disk, off, len, mode, durable)
            }
            kind => Err(tern_driver::Error::Invalid(format!("command {kind:#x} does not change the disk"))),
        }
    }

    /// The reply to a request carried out with `result` (no data).
    pub(super) fn result_reply(&self, req: &Request, result: tern_driver::Result<()>, out: &mut Vec<u8>) {
        match result {
            Ok(()) => self.ok_reply(req, out),
            Err(e) => self.failed(req, &e, out),
        }
    }

    /// Encodes a READ's reply into `out`. With `Wait::No`, only from the
    /// page cache: `false` (and `out` to be discarded) when the read would
    /// wait on the disk.
    pub(super) fn read(&self, req: &Request, out: &mut Vec<u8>, wait: Wait) -> bool {
        if let Err(code) = validate(req, &self.session) {
            out.clear();
            self.error_reply(req, code, "invalid command, flags, length or range", out);
            return true;
        }
        let len = req.length as usize;
        if len == 0 {
            out.clear();
            self.ok_reply(req, out);
            return true;
        }
        // Read straight into the reply buffer, behind room for the header.
        // What earlier replies left in it is overwritten, not zeroed first:
        // a read fills every byte or fails. Zeroing first cost 1 MiB READs
        // 3–11% of their throughput (docs/BENCHMARKS.md).
        let prefix = if self.session.structured { 28 } else { 16 };
        out.resize(prefix + len, 0); // zeroes only what grows
        let buf = &mut out[prefix..];
        let read = match wait {
            Wait::Yes => self.mirror.read(self.disk, req.offset, buf).map(|()| true),
            Wait::No => self.mirror.read_if_cached(self.disk, req.offset, buf),
        };
        match read {
            Ok(true) => {}
            Ok(false) => return false,
            Err(e) => {
                out.clear();
                self.failed(req, &e, out);
                return true;
            }
        }
        if self.session.structured {
            out[..20].copy_from_slice(&chunk_header(
                req.cookie,
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                8 + len as u32,
            ));
            out[20..28].copy_from_slice(&req.offset.to_be_bytes());
        } else {
            out[..16].copy_from_slice(&simple_reply(req.cookie, 0));
        }
        true
    }

    pub(super) fn block_status(&self, req: &Request, out: &mut Vec<u8>) {
        let extents = match self.mirror.block_status(self.disk, req.offset, req.length as u64) {
            Ok(x) => x,
            Err(e) => return self.failed(req, &e, out),
        };
        let limit = if req.flags & CMD_FLAG_REQ_ONE != 0 { 1 } else { MAX_EXTENTS };
        let extents: Vec<_> = extents.iter().filter(|e| e.len > 0).take(limit).collect();
        let Some(id) = self.session.base_allocation else {
            return self.error_reply(req, EINVAL, "base:allocation was not negotiated", out);
        };
        out.extend_from_slice(&chunk_header(
            req.cookie,
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            4 + 8 * extents.len() as u32,
        ));
        out.extend_from_slice(&id.to_be_bytes());
        for e in extents {
            // Each extent lies inside the request, whose length is a u32.
            out.extend_from_slice(&(e.len as u32).to_be_bytes());
            let flags = if e.hole { STATE_HOLE | STATE_ZERO } else { 0 };
            out.extend_from_slice(&flags.to_be_bytes());
        }
    }

    pub(super) fn ok_reply(&self, req: &Request, out: &mut Vec<u8>) {
        if self.session.structured {
            out.extend_from_slice(&chunk_header(req.cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0));
        } else {
            out.extend_from_slice(&simple_reply(req.cookie, 0));
        }
    }

    pub(super) fn failed(&self, req: &Request, e: &tern_driver::Error, out: &mut Vec<u8>) {
        let code = wire_error(e.errno());
        // With its cause ("… failed: No space left on device"): the line an
        // operator reads, and the text a structured-reply client gets.
        let message = e.with_causes();
        if code == EIO || code == ENOSPC {
            log::warn!("disk '{}': request {:#x} failed: {message}", self.mirror.disk_name(self.disk), req.kind);
        }
        self.error_reply(req, code, &message, out)
    }

    pub(super) fn error_reply(&self, req: &Request, code: u32, message: &str, out: &mut Vec<u8>) {
        if self.session.structured {
            out.extend_from_slice(&error_chunk(req.cookie, code, message));
        } else {
            out.extend_from_slice(&simple_reply(req.cookie, code));
        }
    }
}
