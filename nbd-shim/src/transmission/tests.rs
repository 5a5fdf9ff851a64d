//! Unit tests of request reading (a slow or stalling client against the
//! patience) and of sharing the workers among connections.

use super::*;
use reading::HEADER;

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
