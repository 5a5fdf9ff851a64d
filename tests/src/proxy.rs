//! A TCP proxy the tests put between tern and an object store, to do to
//! the link what a WAN and a busy store do: cut it (every connection
//! dropped, new ones refused) and answer requests with `503 SlowDown`, as
//! S3 does when it throttles. Plain threads, one pair per connection.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
    /// Live connections, to drop at a cut.
    open: Mutex<Vec<TcpStream>>,
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
        pump(client, server, |chunk| {
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
            true
        })
    });
    pump(s2, c2, |_| {
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

/// Copies `from` to `to` while `pass` lets each chunk through; closes
/// both when it does not.
fn pump(mut from: TcpStream, mut to: TcpStream, mut pass: impl FnMut(&[u8]) -> bool) {
    let mut buf = [0u8; 64 * 1024];
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
