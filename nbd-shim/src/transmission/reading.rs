//! Reading a request off the socket: its header, then its WRITE payload,
//! waiting through the socket's receive timeouts but, for a payload in a
//! write already reserved in the journal, only with a [`Patience`], so a
//! client that stalls mid-request cannot hold a journal record forever.

use super::*;

/// Whether a read error only means "nothing arrived for a while" (the
/// socket's `RECEIVE_POLL` timeout).
pub(super) fn timed_out(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted)
}

/// What a request's part is called when the client hangs up in it.
pub(super) const PAYLOAD: &str = "WRITE payload";
pub(super) const HEADER: &str = "request header";

/// Fills `buf` (a whole `what`) from `r`, waiting through timeouts, until
/// it is full or, with a `patience`, the client exhausted it. Returns the
/// bytes read.
pub(super) fn read_until<R: Read>(
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
pub(super) fn read_request_head<R: BufRead>(r: &mut R, joined: &Joined) -> Result<Request, ConnectionEnd> {
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
pub(super) fn read_payload<R: Read>(r: &mut R, len: u32, payload: &mut Vec<u8>) -> Result<(), ConnectionEnd> {
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
