//! A TCP proxy the tests put between tern and an object store, to do to
//! the link what a WAN and a busy store do: cut it (every connection
//! dropped, new ones refused), slow it to a rate, stall it (connections
//! stay open and nothing moves), drop the connection of chosen reads, and
//! answer requests with `503 SlowDown`, as S3 does when it throttles.
//! Plain threads, one pair per connection.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the proxy does to the link now.
#[derive(Default)]
struct Faults {
    /// Connections are dropped and refused.
    cut: AtomicBool,
    /// The next this many requests are answered `503 SlowDown` (their
    /// connection then closed) instead of reaching the store.
    slow_down: AtomicU32,
    /// Requests answered 503 so far.
    slowed: AtomicU32,
    /// The next this many PUTs reach the store, but their answer is lost
    /// (the connection dropped as it comes back): the client cannot know
    /// whether the write happened.
    lose_put_answers: AtomicU32,
    /// Answers lost so far.
    lost: AtomicU32,
    /// Bytes per second each direction of the link carries, all
    /// connections together (0: as fast as loopback).
    rate: AtomicU64,
    /// When each direction's link is next free: a chunk waits its turn,
    /// then takes its size at `rate`.
    up_free: Mutex<Option<Instant>>,
    down_free: Mutex<Option<Instant>>,
    /// Nothing is forwarded (connections stay open, as across a link
    /// that went dark or a store that stopped reading).
    stalled: AtomicBool,
    /// GETs of a single object whose path holds the fragment, and how many
    /// more of them have their connection dropped before they reach the
    /// store (listings, whose prefix is in the query, pass).
    fail_gets: Mutex<Vec<(String, u32)>>,
    /// GETs dropped so far.
    failed_gets: AtomicU32,
    /// Live connections, to drop at a cut.
    open: Mutex<Vec<TcpStream>>,
}

impl Faults {
    /// Waits while the link is stalled, then for `n` bytes' turn on the
    /// link in one direction.
    fn pass(&self, n: usize, free: &Mutex<Option<Instant>>) {
        while self.stalled.load(Ordering::Acquire) && !self.cut.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let rate = self.rate.load(Ordering::Acquire);
        if rate == 0 {
            return;
        }
        let done = {
            let mut free = free.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let start = free.filter(|t| *t > now).unwrap_or(now);
            let done = start + Duration::from_secs_f64(n as f64 / rate as f64);
            *free = Some(done);
            done
        };
        std::thread::sleep(done.saturating_duration_since(Instant::now()));
    }
}

pub struct FaultProxy {
    port: u16,
    faults: Arc<Faults>,
}

impl FaultProxy {
    /// Listens on an ephemeral port of 127.0.0.1, forwarding to `upstream`.
    pub fn start(upstream: std::net::SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let faults = Arc::new(Faults::default());
        let f = Arc::clone(&faults);
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if f.cut.load(Ordering::Acquire) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let f = Arc::clone(&f);
                std::thread::spawn(move || serve(client, upstream, &f));
            }
        });
        FaultProxy { port, faults }
    }

    /// `http://127.0.0.1:<port>`: the endpoint to give tern.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Cuts the link (`true`) or mends it.
    pub fn cut(&self, cut: bool) {
        self.faults.cut.store(cut, Ordering::Release);
        if cut {
            for c in self.faults.open.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
    }

    /// Answers the next `n` requests with 503 SlowDown.
    pub fn slow_down(&self, n: u32) {
        self.faults.slow_down.store(n, Ordering::Release);
    }

    /// Requests answered 503 so far.
    pub fn slowed(&self) -> u32 {
        self.faults.slowed.load(Ordering::Acquire)
    }

    /// Lets the next `n` PUTs through but loses their answers.
    pub fn lose_put_answers(&self, n: u32) {
        self.faults.lose_put_answers.store(n, Ordering::Release);
    }

    /// PUT answers lost so far.
    pub fn lost(&self) -> u32 {
        self.faults.lost.load(Ordering::Acquire)
    }

    /// Carries at most `bytes_per_second` each way, all connections
    /// together (0: no limit), as a slow link does.
    pub fn throttle(&self, bytes_per_second: u64) {
        self.faults.rate.store(bytes_per_second, Ordering::Release);
    }

    /// Stops forwarding anything (`true`), connections left open, or
    /// forwards again.
    pub fn stall(&self, stalled: bool) {
        self.faults.stalled.store(stalled, Ordering::Release);
    }

    /// Drops the connection of the next `n` GETs of an object whose path
    /// holds `fragment` (0: none more), before they reach the store.
    pub fn fail_gets(&self, fragment: &str, n: u32) {
        let mut fail = self.faults.fail_gets.lock().unwrap_or_else(|p| p.into_inner());
        fail.retain(|(f, _)| f != fragment);
        fail.push((fragment.to_string(), n));
    }

    /// GETs dropped so far.
    pub fn failed_gets(&self) -> u32 {
        self.faults.failed_gets.load(Ordering::Acquire)
    }
}

fn serve(client: TcpStream, upstream: std::net::SocketAddr, f: &Arc<Faults>) {
    if f.slow_down.load(Ordering::Acquire) > 0 {
        let taken = f.slow_down.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1)).is_ok();
        if taken {
            answer_slow_down(client);
            f.slowed.fetch_add(1, Ordering::AcqRel);
            return;
        }
    }
    let Ok(server) = TcpStream::connect_timeout(&upstream, Duration::from_secs(5)) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    {
        let mut open = f.open.lock().unwrap_or_else(|p| p.into_inner());
        open.extend([client.try_clone(), server.try_clone()].into_iter().flatten());
    }
    // Set when a PUT whose answer is to be lost goes up; the answer's
    // first bytes then drop the connection instead of passing.
    let lose = Arc::new(AtomicBool::new(false));
    let (c2, s2) = (client.try_clone().expect("clone"), server.try_clone().expect("clone"));
    let (f_up, lose_up) = (Arc::clone(f), Arc::clone(&lose));
    let up = std::thread::spawn(move || {
        // The stream so far, as far as a request line can reach back: a
        // request starts the connection or follows a CRLF, and a read may
        // split it anywhere.
        let mut seen: Vec<u8> = b"\r\n".to_vec();
        let mut lines = RequestLines::default();
        pump(client, server, |chunk| {
            f_up.pass(chunk.len(), &f_up.up_free);
            if f_up.cut.load(Ordering::Acquire) {
                return false;
            }
            let from = seen.len();
            seen.extend_from_slice(chunk);
            let starts = seen.windows(7).skip(from.saturating_sub(6)).filter(|w| *w == b"\r\nPUT /").count();
            for _ in 0..starts {
                if f_up.lose_put_answers.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1)).is_ok()
                {
                    lose_up.store(true, Ordering::Release);
                }
            }
            seen.drain(..seen.len().saturating_sub(6));
            if lines.fails_a_get(chunk, &f_up) {
                f_up.failed_gets.fetch_add(1, Ordering::AcqRel);
                return false;
            }
            true
        })
    });
    pump(s2, c2, |chunk| {
        f.pass(chunk.len(), &f.down_free);
        if f.cut.load(Ordering::Acquire) {
            return false;
        }
        if lose.load(Ordering::Acquire) {
            f.lost.fetch_add(1, Ordering::AcqRel);
            return false;
        }
        true
    });
    let _ = up.join();
}

/// The lines a client sends on one connection, as they complete, to find
/// the GETs [`FaultProxy::fail_gets`] asks to fail.
#[derive(Default)]
struct RequestLines {
    line: Vec<u8>,
}

impl RequestLines {
    /// Whether `chunk` completes the request line of a GET of one object
    /// (no query) that is to fail: takes one of those.
    fn fails_a_get(&mut self, chunk: &[u8], f: &Faults) -> bool {
        let mut fails = false;
        for &b in chunk {
            if b != b'\n' {
                if self.line.len() < 8192 {
                    self.line.push(b);
                }
                continue;
            }
            let line = String::from_utf8_lossy(&self.line).into_owned();
            self.line.clear();
            let Some(path) = line.strip_prefix("GET ").and_then(|rest| rest.split(' ').next()) else { continue };
            let mut fail = f.fail_gets.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((_, n)) =
                fail.iter_mut().find(|(f, n)| *n > 0 && path.contains(f.as_str()) && !path.contains('?'))
            {
                *n -= 1;
                fails = true;
            }
        }
        fails
    }
}

/// Copies `from` to `to` while `pass` lets each chunk through; closes
/// both when it does not.
fn pump(mut from: TcpStream, mut to: TcpStream, mut pass: impl FnMut(&[u8]) -> bool) {
    // Small chunks, so that a throttled link moves evenly.
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if !pass(&buf[..n]) {
                    let _ = from.shutdown(Shutdown::Both);
                    let _ = to.shutdown(Shutdown::Both);
                    return;
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Reads the request head and answers as S3 does when it throttles.
fn answer_slow_down(mut client: TcpStream) {
    let _ = client.set_read_timeout(Some(Duration::from_secs(5)));
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 64 * 1024 {
        match client.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
    let _ = write!(
        client,
        "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = client.shutdown(Shutdown::Both);
}
