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

mod execute;
mod reading;
mod workers;

use reading::{read_payload, read_request_head, read_until, PAYLOAD};
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

#[cfg(test)]
mod tests;
