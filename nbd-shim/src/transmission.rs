//! The transmission phase: requests in, replies out, many in flight.
//!
//! Each connection has a small team of worker threads that take turns on
//! the socket (the leader/follower pattern nbdkit uses): one holds the read
//! side, reads a whole request, lets go, carries the request out against
//! the mirror, then takes the write side to send the reply. Requests are
//! pipelined, replies go out in completion order, and no request is ever
//! handed from one worker to another.
//!
//! The workers are few: one per CPU, shared out among the connections
//! that have requests coming (at least one each; see [`Workers`]). Their
//! work is copying bytes, and more of them than CPUs only take turns at
//! it. What would wait on the disk instead (a FLUSH, a READ that misses
//! the page cache, making a FUA request's change durable) is handed to a
//! second team, the waiters, which does nothing else, so it holds up no
//! other request.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tern_driver::{Mirror, ZeroMode};

use crate::protocol::*;

mod workers;

use workers::Joined;
pub use workers::Workers;

/// What ends a connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionEnd {
    #[error("client disconnected (NBD_CMD_DISC)")]
    Disconnect,
    #[error("client closed the connection")]
    Closed,
    #[error("client closed the connection {got} bytes into a {len}-byte {what}; that request was not carried out")]
    ClosedMidRequest { what: &'static str, got: usize, len: usize },
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("I/O error on the connection")]
    Io(#[source] io::Error),
    #[error("internal error: {0}")]
    Internal(String),
}

/// Bytes of request stream read ahead per connection.
const READ_BUFFER: usize = 64 * 1024;

/// The read timeout a socket's transmission phase runs with: reads return
/// at least this often, so a WRITE received into its journal record can
/// notice that its client is too slow. A timeout is not an error.
pub const RECEIVE_POLL: Duration = Duration::from_millis(100);

/// How long a WRITE's payload may pause, and take in all, while it
/// arrives into its journal record. Until it has, the consumer cannot pass
/// the record (so replication of the whole VM waits) and the range stays
/// locked. A client that pauses longer (a stalled TCP peer) or trickles has
/// its payload moved to a buffer instead; 32 MiB over 1 Gb/s (0.3 s) fits.
const IN_PLACE_PATIENCE: Patience = Patience { idle: Duration::from_millis(250), total: Duration::from_secs(2) };

/// Limits on a read that must not wait for a client for long.
#[derive(Debug, Clone, Copy)]
struct Patience {
    /// The longest time without a byte.
    idle: Duration,
    /// The longest time in all.
    total: Duration,
}

/// Threads per connection that carry out requests waiting on the disk, by
/// default. A connection's reads that miss the page cache run this many at
/// once: the queue depth a disk on a real device sees (nbdkit runs 16
/// threads).
pub const DEFAULT_WAITERS: usize = 16;

/// Requests queued for the waiters, at most, per waiter; past that a worker
/// carries the request out itself (and the client's pipeline slows down).
const WAITING_PER_WAITER: usize = 4;

/// A connection's shared state.
struct Conn<'a, R, W> {
    reader: Mutex<BufReader<R>>,
    writer: Mutex<W>,
    /// Wakes a reader blocked on the socket (shuts the socket down).
    hang_up: &'a (dyn Fn() + Sync),
    closing: AtomicBool,
    end: Mutex<Option<ConnectionEnd>>,
    mirror: &'a Mirror,
    disk: usize,
    session: Session,
    workers: &'a Workers,
    /// This connection's count in `workers`.
    joined: Joined<'a>,
}

/// Ends the connection when a thread of it panics (a bug): its client
/// would wait for that request's reply forever, and its parked workers
/// and waiters for a close that never comes.
struct CloseOnPanic<'c, 'a, R: Read, W: Write>(&'c Conn<'a, R, W>);

impl<R: Read, W: Write> Drop for CloseOnPanic<'_, '_, R, W> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.close(ConnectionEnd::Internal("a request thread panicked; see the log".into()), true);
        }
    }
}

/// Serves requests until the client disconnects or breaks the protocol.
/// `hang_up` must make a blocked read on `reader` return (for a socket:
/// `shutdown(Both)`). Returns why the connection ended.
pub fn serve<R: Read + Send, W: Write + Send>(
    reader: R,
    writer: W,
    hang_up: &(dyn Fn() + Sync),
    mirror: &Mirror,
    disk: usize,
    session: Session,
    workers: &Workers,
) -> ConnectionEnd {
    let conn = Conn {
        // Buffered: a pipelining client's small requests arrive several to
        // a segment, and the next worker finds its request already read.
        // Large payloads bypass the buffer.
        reader: Mutex::new(BufReader::with_capacity(READ_BUFFER, reader)),
        writer: Mutex::new(writer),
        hang_up,
        closing: AtomicBool::new(false),
        end: Mutex::new(None),
        mirror,
        disk,
        session,
        workers,
        joined: workers.join(),
    };
    std::thread::scope(|s| {
        let conn = &conn;
        let (to_waiters, waiting) = crossbeam_channel::bounded::<Handoff>(WAITING_PER_WAITER * workers.waiters);
        // Fewer threads than asked for (the system is out of them) is
        // slower, not wrong: worker 0 is this thread, and without waiters
        // the workers carry every request out themselves.
        for _ in 0..workers.waiters {
            let waiting = waiting.clone();
            if !spawn(s, "nbd-waiter", move || conn.waiter(waiting)) {
                break;
            }
        }
        // Only the waiters receive: were they all gone, handing over fails
        // and the workers carry requests out themselves.
        drop(waiting);
        for index in 1..workers.team() {
            let to_waiters = to_waiters.clone();
            if !spawn(s, "nbd-worker", move || conn.worker(index, &to_waiters)) {
                break;
            }
        }
        conn.worker(0, &to_waiters);
        // The waiters finish what they were handed, then see the channel
        // closed once every worker has returned.
    });
    conn.end.into_inner().unwrap_or_else(|p| p.into_inner()).unwrap_or(ConnectionEnd::Closed)
}

/// Starts a thread of a connection; false (and a warning) when the system
/// has none to give.
fn spawn<'scope>(s: &'scope std::thread::Scope<'scope, '_>, name: &str, run: impl FnOnce() + Send + 'scope) -> bool {
    let spawned = std::thread::Builder::new().name(name.into()).spawn_scoped(s, run);
    if let Err(e) = &spawned {
        log::warn!(
            "cannot start an {name} thread for a connection ({e}); serving it with fewer, which is slower: \
             raise the thread limits (ulimit -u, kernel.threads-max) or lower `tern serve --threads`"
        );
    }
    spawned.is_ok()
}

impl<'a, R: Read, W: Write> Conn<'a, R, W> {
    fn close(&self, why: ConnectionEnd, hang_up: bool) {
        let mut end = self.end.lock().unwrap_or_else(|p| p.into_inner());
        if end.is_none() {
            *end = Some(why);
        }
        self.stop_reading();
        if hang_up {
            (self.hang_up)();
        }
    }

    /// No worker reads another request; parked ones return.
    fn stop_reading(&self) {
        self.closing.store(true, Ordering::Release);
        self.workers.wake_all();
    }

    /// Worker `index` of the connection: parked while past the
    /// connection's share of the server's workers.
    fn worker(&self, index: usize, to_waiters: &crossbeam_channel::Sender<Handoff>) {
        let _unwinding = CloseOnPanic(self);
        let mut payload = Vec::new();
        let mut reply = Vec::new();
        loop {
            // Do not keep a 32 MiB buffer per thread.
            if payload.capacity() > 4 << 20 {
                payload = Vec::new();
            }
            if reply.capacity() > 4 << 20 {
                reply = Vec::new();
            }
            if !self.workers.wait_for_turn(index, &self.closing) {
                return;
            }
            let (req, in_place) = {
                let mut r = self.reader.lock().unwrap_or_else(|p| p.into_inner());
                if self.closing.load(Ordering::Acquire) {
                    return;
                }
                // The share may have shrunk while this worker waited for
                // the read side (a quiet connection had a request again):
                // park, rather than run past it for one more request.
                if index >= self.workers.share() {
                    continue;
                }
                let req = match read_request_head(&mut *r, &self.joined) {
                    // Nothing may be read after these: decide while still
                    // holding the read side, so no other worker reads on.
                    Ok(req) if req.kind == CMD_DISC => {
                        // Requests in flight still get their replies.
                        self.close(ConnectionEnd::Disconnect, false);
                        return;
                    }
                    Ok(req) if req.kind == CMD_WRITE && req.length > MAX_PAYLOAD => {
                        // Its payload was not read: the stream is out of
                        // sync. Answer it, then hang up.
                        self.stop_reading();
                        drop(r);
                        self.execute(&req, &[], &mut reply);
                        let _ = self.send(&reply);
                        let why = format!("WRITE of {} bytes, over the {MAX_PAYLOAD}-byte limit", req.length);
                        self.close(ConnectionEnd::Protocol(why), true);
                        return;
                    }
                    Ok(req) => req,
                    Err(end) => {
                        // A protocol error ends the session at once; a
                        // hang-up lets the requests in flight finish.
                        let hard = matches!(end, ConnectionEnd::Protocol(_));
                        self.close(end, hard);
                        return;
                    }
                };
                // A WRITE's payload goes straight into its journal record
                // where it can (one copy of each byte fewer), else into
                // `payload` (even a WRITE that will be refused: its bytes
                // must leave the stream).
                let mut in_place = None;
                if req.kind == CMD_WRITE {
                    match self.read_write_payload(&mut *r, &req, &mut payload) {
                        Ok(w) => in_place = w,
                        Err(end) => {
                            self.close(end, false);
                            return;
                        }
                    }
                }
                (req, in_place)
            };
            // A FUA request's change is made here and made durable by a
            // waiter (as a FLUSH would), which then replies. A shutdown in
            // between fails that flush, but no client hears of it: the
            // server hangs every socket up (and refuses new ones) before it
            // shuts the mirror down, and the shutdown makes everything
            // durable.
            let fua = req.flags & CMD_FLAG_FUA != 0;
            let changed = match (in_place, req.kind) {
                (Some(w), _) => Some(w.finish(false)),
                (None, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES) if fua && validate(&req, &self.session).is_ok() => {
                    Some(self.change(&req, &payload, false))
                }
                (None, _) => None,
            };
            let handoff = match changed {
                Some(Ok(())) if fua => Some(Handoff::MakeDurable(req)),
                Some(result) => {
                    reply.clear();
                    self.result_reply(&req, result, &mut reply);
                    None
                }
                None if req.kind == CMD_FLUSH => Some(Handoff::Execute(req)),
                None if req.kind == CMD_READ => {
                    (!self.read(&req, &mut reply, Wait::No)).then_some(Handoff::Execute(req))
                }
                None => {
                    self.execute(&req, &payload, &mut reply);
                    None
                }
            };
            if let Some(job) = handoff {
                match to_waiters.try_send(job) {
                    Ok(()) => continue,
                    // Every waiter busy and the queue full: wait here.
                    Err(full) => self.carry_out(full.into_inner(), &mut reply),
                }
            }
            if let Err(e) = self.send(&reply) {
                self.close(ConnectionEnd::Io(e), true);
                return;
            }
        }
    }

    /// Carries out the requests workers hand over (see the module's
    /// documentation) until every worker has returned.
    fn waiter(&self, waiting: crossbeam_channel::Receiver<Handoff>) {
        let _unwinding = CloseOnPanic(self);
        let mut reply = Vec::new();
        for job in waiting {
            self.carry_out(job, &mut reply);
            if let Err(e) = self.send(&reply) {
                self.close(ConnectionEnd::Io(e), true);
            }
            if reply.capacity() > 4 << 20 {
                reply = Vec::new(); // do not keep a 32 MiB READ's buffer per thread
            }
        }
    }

    /// Sends one whole reply; replies never interleave.
    fn send(&self, reply: &[u8]) -> io::Result<()> {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        w.write_all(reply).and_then(|()| w.flush())
    }

    /// Reads a WRITE's payload: straight into its journal record where the
    /// mirror can take it so (see `Mirror::begin_write_in_place`), saving a
    /// copy of every byte; else, or when the client is too slow for that,
    /// into `payload` (even for a WRITE that will be refused: its bytes
    /// must leave the stream).
    fn read_write_payload(
        &self,
        r: &mut impl Read,
        req: &Request,
        payload: &mut Vec<u8>,
    ) -> Result<Option<tern_driver::InPlaceWrite<'a>>, ConnectionEnd> {
        payload.clear();
        let in_place = match validate(req, &self.session) {
            Ok(()) => self.mirror.begin_write_in_place(self.disk, req.offset, req.length as u64),
            Err(_) => None,
        };
        if let Some(mut w) = in_place {
            // Dropped on error: a record half received becomes a pad.
            let got = read_until(r, w.buffer(), PAYLOAD, Some(IN_PLACE_PATIENCE))?;
            if got == req.length as usize {
                return Ok(Some(w));
            }
            // Too slow: give the record up (a pad) and the range back, and
            // take the rest at the client's pace.
            payload.extend_from_slice(&w.buffer()[..got]);
            drop(w);
            log::debug!(
                "disk '{}': a {}-byte WRITE's payload paused or took too long ({IN_PLACE_PATIENCE:?}); received into a buffer",
                self.mirror.disk_name(self.disk),
                req.length
            );
        }
        read_payload(r, req.length, payload)?;
        Ok(None)
    }

    /// Carries out what a worker handed over and encodes its reply.
    fn carry_out(&self, job: Handoff, out: &mut Vec<u8>) {
        match job {
            Handoff::Execute(req) => self.execute(&req, &[], out),
            Handoff::MakeDurable(req) => {
                out.clear();
                self.result_reply(&req, self.mirror.flush(self.disk), out)
            }
        }
    }

    /// Carries a request out and encodes its reply into `out`.
    fn execute(&self, req: &Request, payload: &[u8], out: &mut Vec<u8>) {
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
    fn change(&self, req: &Request, payload: &[u8], durable: bool) -> tern_driver::Result<()> {
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
    fn result_reply(&self, req: &Request, result: tern_driver::Result<()>, out: &mut Vec<u8>) {
        match result {
            Ok(()) => self.ok_reply(req, out),
            Err(e) => self.failed(req, &e, out),
        }
    }

    /// Encodes a READ's reply into `out`. With `Wait::No`, only from the
    /// page cache: `false` (and `out` to be discarded) when the read would
    /// wait on the disk.
    fn read(&self, req: &Request, out: &mut Vec<u8>, wait: Wait) -> bool {
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

    fn block_status(&self, req: &Request, out: &mut Vec<u8>) {
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

    fn ok_reply(&self, req: &Request, out: &mut Vec<u8>) {
        if self.session.structured {
            out.extend_from_slice(&chunk_header(req.cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0));
        } else {
            out.extend_from_slice(&simple_reply(req.cookie, 0));
        }
    }

    fn failed(&self, req: &Request, e: &tern_driver::Error, out: &mut Vec<u8>) {
        let code = wire_error(e.errno());
        // With its cause ("… failed: No space left on device"): the line an
        // operator reads, and the text a structured-reply client gets.
        let message = e.with_causes();
        if code == EIO || code == ENOSPC {
            log::warn!("disk '{}': request {:#x} failed: {message}", self.mirror.disk_name(self.disk), req.kind);
        }
        self.error_reply(req, code, &message, out)
    }

    fn error_reply(&self, req: &Request, code: u32, message: &str, out: &mut Vec<u8>) {
        if self.session.structured {
            out.extend_from_slice(&error_chunk(req.cookie, code, message));
        } else {
            out.extend_from_slice(&simple_reply(req.cookie, code));
        }
    }
}

/// What a worker hands to the waiters.
#[derive(Debug, Clone, Copy)]
enum Handoff {
    /// Carry the request out: a FLUSH, or a READ the page cache could not
    /// answer.
    Execute(Request),
    /// The change a FUA request asked for is made: make it durable (as a
    /// FLUSH would), then reply.
    MakeDurable(Request),
}

/// Whether a read may wait on the disk.
#[derive(Debug, Clone, Copy)]
enum Wait {
    Yes,
    No,
}

/// Whether a read error only means "nothing arrived for a while" (the
/// socket's `RECEIVE_POLL` timeout).
fn timed_out(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted)
}

/// What a request's part is called when the client hangs up in it.
const PAYLOAD: &str = "WRITE payload";
const HEADER: &str = "request header";

/// Fills `buf` (a whole `what`) from `r`, waiting through timeouts, until
/// it is full or, with a `patience`, the client exhausted it. Returns the
/// bytes read.
fn read_until<R: Read>(
    r: &mut R,
    buf: &mut [u8],
    what: &'static str,
    patience: Option<Patience>,
) -> Result<usize, ConnectionEnd> {
    // The clock is read only where patience is kept, and only again once
    // a read leaves the buffer short: most payloads arrive whole, and at
    // 100,000 requests a second its reads were 2% of the server's CPU.
    let start = patience.map(|_| Instant::now());
    let mut progress = start;
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => return Err(ConnectionEnd::ClosedMidRequest { what, got, len: buf.len() }),
            Ok(n) => {
                got += n;
                if got == buf.len() {
                    break;
                }
                progress = patience.map(|_| Instant::now());
            }
            Err(e) if timed_out(&e) => {}
            Err(e) => return Err(ConnectionEnd::Io(e)),
        }
        if let (Some(p), Some(start), Some(progress)) = (patience, start, progress) {
            if progress.elapsed() >= p.idle || start.elapsed() >= p.total {
                break;
            }
        }
    }
    Ok(got)
}

/// Reads one request's header. The connection (`joined`) goes quiet when
/// a [`RECEIVE_POLL`] passes before the request starts to arrive, and is
/// active again once it does.
fn read_request_head<R: BufRead>(r: &mut R, joined: &Joined) -> Result<Request, ConnectionEnd> {
    loop {
        match r.fill_buf() {
            Ok([]) => return Err(ConnectionEnd::Closed),
            Ok(_) => break,
            // A signal, not a quiet poll.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if timed_out(&e) => joined.quiet(),
            Err(e) => return Err(ConnectionEnd::Io(e)),
        }
    }
    joined.active();
    let mut head = [0u8; REQUEST_LEN];
    read_until(r, &mut head, HEADER, None).map_err(|end| match end {
        // Between requests, a hang-up is how a session may end.
        ConnectionEnd::ClosedMidRequest { got: 0, .. } => ConnectionEnd::Closed,
        end => end,
    })?;
    Request::parse(&head).ok_or_else(|| ConnectionEnd::Protocol("request with a bad magic".into()))
}

/// Reads the rest of a WRITE's payload of `len` bytes into `payload`.
fn read_payload<R: Read>(r: &mut R, len: u32, payload: &mut Vec<u8>) -> Result<(), ConnectionEnd> {
    let len = len as usize;
    // read_to_end fills spare capacity without zeroing it first, and keeps
    // what it read when a timeout interrupts it.
    payload.reserve(len - payload.len());
    while payload.len() < len {
        let want = (len - payload.len()) as u64;
        match r.take(want).read_to_end(payload) {
            Ok(n) if (n as u64) < want => {
                return Err(ConnectionEnd::ClosedMidRequest { what: PAYLOAD, got: payload.len(), len })
            }
            Ok(_) => {}
            Err(e) if timed_out(&e) => {}
            Err(e) => return Err(ConnectionEnd::Io(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket that hands out `chunk` bytes per read, each after `pause`.
    /// Its first `quiet_first` reads, and every read once `stall_after`
    /// bytes are out, time out instead (as a read with `RECEIVE_POLL` set
    /// does); at `eof_after` bytes the stream ends.
    struct Slow {
        sent: usize,
        chunk: usize,
        pause: Duration,
        quiet_first: usize,
        stall_after: usize,
        eof_after: Option<usize>,
    }

    impl Read for Slow {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            std::thread::sleep(self.pause);
            if self.quiet_first > 0 || self.sent >= self.stall_after {
                self.quiet_first = self.quiet_first.saturating_sub(1);
                return Err(io::ErrorKind::WouldBlock.into());
            }
            if self.eof_after == Some(self.sent) {
                return Ok(0);
            }
            let n = self.chunk.min(buf.len()).min(self.stall_after - self.sent);
            buf[..n].fill(7);
            self.sent += n;
            Ok(n)
        }
    }

    const PATIENCE: Patience = Patience { idle: Duration::from_millis(100), total: Duration::from_millis(400) };

    fn slow(chunk: usize, pause_ms: u64) -> Slow {
        let pause = Duration::from_millis(pause_ms);
        Slow { sent: 0, chunk, pause, quiet_first: 0, stall_after: usize::MAX, eof_after: None }
    }

    #[test]
    fn a_payload_that_arrives_is_read_whole_through_pauses_shorter_than_the_patience() {
        let mut buf = [0u8; 64];
        let got = read_until(&mut slow(8, 5), &mut buf, PAYLOAD, Some(PATIENCE)).unwrap();
        assert_eq!(got, 64);
        assert!(buf.iter().all(|&b| b == 7));
    }

    #[test]
    fn a_client_that_goes_quiet_is_given_up_on_after_the_idle_patience() {
        let mut buf = [0u8; 64];
        let patient = Patience { total: Duration::from_secs(30), ..PATIENCE };
        let start = Instant::now();
        let got = read_until(&mut Slow { stall_after: 16, ..slow(8, 5) }, &mut buf, PAYLOAD, Some(patient)).unwrap();
        assert_eq!(got, 16, "what arrived before the client went quiet");
        assert!(start.elapsed() < Duration::from_secs(10), "waited for the total patience, not the idle one");
    }

    #[test]
    fn a_client_that_trickles_is_given_up_on_after_the_total_patience() {
        // A byte every 10 ms: never idle for 100 ms, never done in 400 ms.
        let mut buf = [0u8; 4096];
        let got = read_until(&mut slow(1, 10), &mut buf, PAYLOAD, Some(PATIENCE)).unwrap();
        assert!(got > 10 && got < 4096, "read {got} bytes of a payload trickling at 100 B/s");
    }

    #[test]
    fn without_patience_a_read_waits_through_any_quiet_stretch() {
        // A request header: 60 timeouts (60 ms) before any byte, longer
        // than a payload's idle patience would allow.
        let mut buf = [0u8; 8];
        let got = read_until(&mut Slow { quiet_first: 60, ..slow(4, 1) }, &mut buf, HEADER, None).unwrap();
        assert_eq!(got, 8);
    }

    #[test]
    fn a_hang_up_mid_payload_says_how_far_it_got() {
        let mut buf = [0u8; 64];
        match read_until(&mut Slow { eof_after: Some(24), ..slow(8, 0) }, &mut buf, PAYLOAD, Some(PATIENCE)) {
            Err(ConnectionEnd::ClosedMidRequest { got: 24, len: 64, .. }) => {}
            other => panic!("expected a hang-up 24 bytes into 64, got {other:?}"),
        }
    }

    #[test]
    fn the_workers_are_shared_out_among_the_connections_at_least_one_each() {
        let workers = Workers::new(8);
        let shares: Vec<usize> = (1..=10)
            .scan(Vec::new(), |open, _| {
                open.push(workers.join());
                Some(workers.share())
            })
            .collect();
        assert_eq!(shares, [8, 4, 2, 2, 1, 1, 1, 1, 1, 1]);
        assert_eq!(workers.team(), 8, "a connection alone may use them all");
        assert_eq!(Workers::new(0).share(), 1, "a connection always has a worker");
    }

    /// Runs `wait_for_turn(index)` on a thread; its result once it returns.
    fn park(
        workers: &std::sync::Arc<Workers>,
        index: usize,
        closing: &std::sync::Arc<AtomicBool>,
    ) -> std::sync::mpsc::Receiver<bool> {
        let (done, result) = std::sync::mpsc::channel();
        let (workers, closing) = (std::sync::Arc::clone(workers), std::sync::Arc::clone(closing));
        std::thread::spawn(move || done.send(workers.wait_for_turn(index, &closing)));
        result
    }

    #[test]
    fn a_worker_past_its_share_waits_until_a_connection_ends() {
        let workers = std::sync::Arc::new(Workers::new(2));
        let closing = std::sync::Arc::new(AtomicBool::new(false));
        let first = workers.join();
        let _second = workers.join();
        assert!(workers.wait_for_turn(0, &closing), "the first worker of a connection never waits");
        let second_worker = park(&workers, 1, &closing);
        assert!(second_worker.recv_timeout(Duration::from_millis(200)).is_err(), "it ran past its share");
        drop(first);
        assert_eq!(second_worker.recv_timeout(Duration::from_secs(5)), Ok(true), "it stayed parked");
    }

    #[test]
    fn a_quiet_connection_leaves_its_share_to_the_others_until_its_next_request() {
        let workers = Workers::new(4);
        let busy = workers.join();
        let idle = workers.join();
        assert_eq!(workers.share(), 2);
        idle.quiet();
        idle.quiet(); // a second poll without a request counts once
        assert_eq!(workers.share(), 4, "a quiet connection still took a share");
        idle.active();
        idle.active();
        assert_eq!(workers.share(), 2, "a connection with requests again took no share");
        idle.quiet();
        drop(idle); // ends quiet: counted out once, not twice
        assert_eq!(workers.share(), 4);
        let third = workers.join();
        assert_eq!(workers.share(), 2, "the count went wrong when a quiet connection ended");
        drop((busy, third));
        assert_eq!(workers.active_connections(), 0);
    }

    #[test]
    fn a_worker_past_its_share_goes_on_when_another_connection_goes_quiet() {
        let workers = std::sync::Arc::new(Workers::new(2));
        let closing = std::sync::Arc::new(AtomicBool::new(false));
        let _busy = workers.join();
        let idle = workers.join();
        let second_worker = park(&workers, 1, &closing);
        assert!(second_worker.recv_timeout(Duration::from_millis(200)).is_err(), "it ran past its share");
        idle.quiet();
        assert_eq!(second_worker.recv_timeout(Duration::from_secs(5)), Ok(true), "it stayed parked");

        // Four threads among four, three, then two connections: the share
        // grows from one to two only at the second going quiet (4/3
        // rounds down), and that one must wake the parked worker.
        let workers = std::sync::Arc::new(Workers::new(4));
        let _busy = (workers.join(), workers.join());
        let (first, second) = (workers.join(), workers.join());
        let second_worker = park(&workers, 1, &closing);
        first.quiet();
        assert_eq!(workers.share(), 1);
        assert!(second_worker.recv_timeout(Duration::from_millis(200)).is_err(), "it ran past its share");
        second.quiet();
        assert_eq!(workers.share(), 2);
        assert_eq!(second_worker.recv_timeout(Duration::from_secs(5)), Ok(true), "it stayed parked");
    }

    #[test]
    fn a_connection_goes_quiet_while_no_request_comes_and_active_when_one_does() {
        /// Times out `quiet` times, then hands out `bytes`, then ends.
        struct Quiet {
            quiet: usize,
            bytes: io::Cursor<Vec<u8>>,
        }
        impl Read for Quiet {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.quiet > 0 {
                    self.quiet -= 1;
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                self.bytes.read(buf)
            }
        }
        let workers = Workers::new(2);
        let _other = workers.join();
        let joined = workers.join();
        let flush = Request { flags: 0, kind: CMD_FLUSH, cookie: 7, offset: 0, length: 0 };
        let mut r = BufReader::new(Quiet { quiet: 0, bytes: io::Cursor::new(flush.encode().to_vec()) });
        assert_eq!(read_request_head(&mut r, &joined).expect("the request"), flush);
        assert_eq!(workers.share(), 1, "a connection went quiet while its requests came");
        assert!(matches!(read_request_head(&mut r, &joined), Err(ConnectionEnd::Closed)));
        assert_eq!(workers.share(), 1, "a hang-up is not a quiet poll");

        let mut r = BufReader::new(Quiet { quiet: 3, bytes: io::Cursor::new(Vec::new()) });
        assert!(matches!(read_request_head(&mut r, &joined), Err(ConnectionEnd::Closed)));
        assert_eq!(workers.share(), 2, "a connection with no request for three polls still took a share");

        let mut r = BufReader::new(Quiet { quiet: 2, bytes: io::Cursor::new(flush.encode().to_vec()) });
        assert_eq!(read_request_head(&mut r, &joined).expect("the request"), flush);
        assert_eq!(workers.share(), 1, "a connection whose requests came again took no share");
    }

    #[test]
    fn a_parked_worker_returns_when_its_connection_closes() {
        let workers = std::sync::Arc::new(Workers::new(1));
        let closing = std::sync::Arc::new(AtomicBool::new(false));
        let _only = workers.join();
        let parked = park(&workers, 1, &closing);
        assert!(parked.recv_timeout(Duration::from_millis(200)).is_err(), "it ran past its share");
        closing.store(true, Ordering::Release);
        workers.wake_all(); // as `Conn::close` does
        assert_eq!(parked.recv_timeout(Duration::from_secs(5)), Ok(false), "it stayed parked");
        assert!(!workers.wait_for_turn(0, &closing), "a closing connection's first worker went on");
    }
}
