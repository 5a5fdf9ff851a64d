//! Listening sockets and connections: a Unix socket (the default), TCP
//! (loopback unless the operator names another address), or one connection
//! on standard input and output (for fuzzing and inetd-style use).

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tern_driver::Mirror;

use crate::handshake::{self, ExportInfo, HandshakeError};
use crate::transmission::{self, ConnectionEnd, Workers};

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(SocketAddr),
    /// One connection on stdin/stdout.
    Stdio,
}

/// The form `--listen` takes, so messages name an address the way the
/// operator wrote it.
impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
            Listen::Tcp(a) => write!(f, "tcp:{a}"),
            Listen::Stdio => f.write_str("stdio"),
        }
    }
}

impl FromStr for Listen {
    type Err = String;

    /// `unix:PATH`, `tcp:HOST:PORT`, `tcp:PORT` (loopback) or `stdio`.
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "stdio" {
            return Ok(Listen::Stdio);
        }
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path, as in unix:/run/tern/vm.sock".into());
            }
            return Ok(Listen::Unix(PathBuf::from(path)));
        }
        if let Some(addr) = s.strip_prefix("tcp:") {
            if let Ok(port) = addr.parse::<u16>() {
                return Ok(Listen::Tcp(SocketAddr::from(([127, 0, 0, 1], port))));
            }
            use std::net::ToSocketAddrs;
            return addr
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .map(Listen::Tcp)
                .ok_or_else(|| format!("cannot parse TCP address {addr:?}; use tcp:HOST:PORT or tcp:PORT"));
        }
        Err(format!("cannot parse listen address {s:?}; use unix:PATH, tcp:HOST:PORT, tcp:PORT or stdio"))
    }
}

/// Tunables of a server.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Worker threads busy at once, shared out among the active
    /// connections (at least one each; a quiet one counts for nothing;
    /// see [`Workers`]); each connection starts this many and parks those
    /// past its share. Default:
    /// [`ServerOptions::default_threads`].
    pub threads: usize,
    /// Threads per connection that carry out what would wait on the disk
    /// (a FLUSH, a READ the page cache cannot answer, making a FUA request
    /// durable; see `transmission`): the queue depth one connection gives
    /// a slow disk. With 0 the workers carry those out themselves, holding
    /// up the connection meanwhile. Default:
    /// [`transmission::DEFAULT_WAITERS`] (16).
    pub waiters: usize,
    /// Connections served at once; more are refused. Default: 64.
    pub max_connections: usize,
    /// A client must finish the handshake within this. Default: 30s.
    pub handshake_timeout: Duration,
}

impl ServerOptions {
    /// One per CPU (at least 2, at most 64). On two CPUs, 2 (then per
    /// connection, now for the whole server) against 8 (the default until
    /// 2026-11-29) measured 1 MiB sequential writes 60–80% faster, 4 KiB
    /// writes at queue depth 32 at about the same IOPS with a p99 a third
    /// lower, and as many reads (docs/BENCHMARKS.md): a request's work is
    /// CPU work (its bytes copied from the socket and into the page cache),
    /// and more threads than CPUs only take turns at it. What waits on the
    /// disk goes to the waiters (see `transmission`), not to these.
    pub fn default_threads() -> usize {
        std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 64)
    }
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            threads: ServerOptions::default_threads(),
            waiters: transmission::DEFAULT_WAITERS,
            max_connections: 64,
            handshake_timeout: Duration::from_secs(30),
        }
    }
}

/// An NBD server for one VM: one export per disk.
pub struct Server {
    mirror: Arc<Mirror>,
    exports: Vec<ExportInfo>,
    options: ServerOptions,
    workers: Workers,
    active: AtomicUsize,
    next_id: AtomicU64,
    /// Open connections, to shut them down when the server stops.
    connections: Mutex<HashMap<u64, Box<dyn Fn() + Send + Sync>>>,
    /// Set by `disconnect_all`: no connection is served after it.
    stopping: AtomicBool,
}

/// A bound listening socket.
pub enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Server {
    pub fn new(mirror: Arc<Mirror>, options: ServerOptions) -> Self {
        let vm = mirror.config().name.clone();
        let exports = (0..mirror.disk_count())
            .map(|i| ExportInfo {
                name: mirror.disk_name(i).to_string(),
                size: mirror.disk_size(i),
                disk: i,
                description: format!("tern: VM {vm}, disk {}", mirror.disk_name(i)),
            })
            .collect();
        Server {
            mirror,
            exports,
            workers: Workers::new(options.threads).with_waiters(options.waiters),
            options,
            active: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            connections: Mutex::new(HashMap::new()),
            stopping: AtomicBool::new(false),
        }
    }

    /// Binds a listening socket. A stale Unix socket file (no server
    /// behind it) is replaced; a live one is an error.
    pub fn bind(listen: &Listen) -> io::Result<Listener> {
        match listen {
            Listen::Unix(path) => {
                if path.as_os_str().len() >= 108 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("socket path {} is longer than the 107 bytes a Unix socket allows", path.display()),
                    ));
                }
                if path.exists() {
                    if UnixStream::connect(path).is_ok() {
                        return Err(io::Error::new(
                            io::ErrorKind::AddrInUse,
                            format!("{} is in use by a running server", path.display()),
                        ));
                    }
                    std::fs::remove_file(path)?;
                }
                Ok(Listener::Unix(UnixListener::bind(path)?, path.clone()))
            }
            Listen::Tcp(addr) => {
                if !addr.ip().is_loopback() {
                    log::warn!(
                        "listening on {addr}, which is not a loopback address: NBD has no authentication, anyone who can reach it can read and write the disks"
                    );
                }
                Ok(Listener::Tcp(TcpListener::bind(addr)?))
            }
            Listen::Stdio => Err(io::Error::new(io::ErrorKind::InvalidInput, "stdio is not a socket")),
        }
    }

    /// Accepts connections forever, one thread each.
    pub fn accept_loop(self: &Arc<Self>, listener: Listener) {
        loop {
            let accepted = match &listener {
                Listener::Unix(l, _) => l.accept().map(|(s, _)| Stream::Unix(s)),
                Listener::Tcp(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
            };
            let stream = match accepted {
                Ok(s) => s,
                Err(e) => {
                    log::warn!("accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            if self.active.load(Ordering::Acquire) >= self.options.max_connections {
                log::warn!("refusing a connection: already serving {} (the limit)", self.options.max_connections);
                continue;
            }
            let server = Arc::clone(self);
            let spawned = std::thread::Builder::new().name("nbd-conn".into()).spawn(move || server.connection(stream));
            if let Err(e) = spawned {
                log::error!("cannot start a thread for a new connection: {e}");
            }
        }
    }

    /// Serves one connection on standard input and output.
    pub fn serve_stdio(&self) {
        let (stdin, stdout) = (io::stdin(), io::stdout());
        self.serve_streams(stdin, stdout, &|| {}, &|| Ok(()), "stdio");
    }

    /// Runs the handshake, then `after_handshake`, then transmission, on any
    /// pair of streams (sockets, stdio, the fuzzer's bytes).
    pub fn serve_streams<R, W>(
        &self,
        mut r: R,
        mut w: W,
        hang_up: &(dyn Fn() + Sync),
        after_handshake: &dyn Fn() -> io::Result<()>,
        peer: &str,
    ) where
        R: io::Read + Send,
        W: io::Write + Send,
    {
        let n = match handshake::negotiate(&mut r, &mut w, &self.exports) {
            Ok(n) => n,
            Err(HandshakeError::Aborted | HandshakeError::Closed) => {
                return log::debug!("{peer}: left during the handshake");
            }
            Err(e) => return log::warn!("{peer}: {e}"),
        };
        if let Err(e) = after_handshake() {
            return log::warn!("{peer}: {e}");
        }
        let export = &self.exports[n.export];
        log::info!(
            "{peer}: connected to export '{}' ({} replies{})",
            export.name,
            if n.session.structured { "structured" } else { "simple" },
            if n.session.base_allocation.is_some() { ", base:allocation" } else { "" }
        );
        match transmission::serve(r, w, hang_up, &self.mirror, export.disk, n.session, &self.workers) {
            end @ (ConnectionEnd::Disconnect | ConnectionEnd::Closed) => log::info!("{peer}: {end}"),
            end => log::warn!("{peer}: connection ended: {end}"),
        }
    }

    fn connection(&self, stream: Stream) {
        self.active.fetch_add(1, Ordering::AcqRel);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let peer = stream.peer();
        let result = (|| -> io::Result<()> {
            // The handshake is bounded in time; transmission is not (an idle
            // VM disk is normal), though its reads time out to poll.
            stream.prepare(self.options.handshake_timeout)?;
            let closer = stream.try_clone()?;
            {
                let mut open = self.connections.lock().unwrap_or_else(|p| p.into_inner());
                // Checked under the lock `disconnect_all` drains: a
                // connection is either hung up there or refused here.
                if self.stopping.load(Ordering::Acquire) {
                    return Err(io::Error::other(
                        "connection refused: the server is stopping; reconnect once `tern serve` runs again",
                    ));
                }
                open.insert(id, Box::new(move || closer.shutdown()));
            }
            // The concrete socket types, not the `Stream` enum: std reads
            // into a request's uninitialized payload buffer only through
            // their own `read_buf`; a wrapper would zero it first.
            let (hang_up, ready) = (|| stream.shutdown(), || stream.set_transmission_timeout());
            match &stream {
                Stream::Unix(s) => self.serve_streams(s.try_clone()?, s.try_clone()?, &hang_up, &ready, &peer),
                Stream::Tcp(s) => self.serve_streams(s.try_clone()?, s.try_clone()?, &hang_up, &ready, &peer),
            }
            Ok(())
        })();
        if let Err(e) = result {
            log::warn!("{peer}: {e}");
        }
        stream.shutdown();
        self.connections.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        self.active.fetch_sub(1, Ordering::AcqRel);
    }

    /// Shuts every open connection down (requests being carried out still
    /// finish against the mirror) and refuses any accepted from now on.
    pub fn disconnect_all(&self) {
        let mut open = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        self.stopping.store(true, Ordering::Release);
        for (_, close) in open.drain() {
            close();
        }
    }

    pub fn active_connections(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }
}

/// A connected socket of either family.
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn peer(&self) -> String {
        match self {
            Stream::Unix(_) => "unix client".to_string(),
            Stream::Tcp(s) => s.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "tcp client".into()),
        }
    }

    fn prepare(&self, handshake_timeout: Duration) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.set_read_timeout(Some(handshake_timeout)),
            Stream::Tcp(s) => {
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(handshake_timeout))
            }
        }
    }

    /// After the handshake: reads wait at most `RECEIVE_POLL` at a time
    /// (transmission waits through them; an idle VM disk is normal).
    fn set_transmission_timeout(&self) -> io::Result<()> {
        let poll = Some(crate::transmission::RECEIVE_POLL);
        match self {
            Stream::Unix(s) => s.set_read_timeout(poll),
            Stream::Tcp(s) => s.set_read_timeout(poll),
        }
    }

    fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self) {
        let _ = match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }
}

/// Removes the socket file when the listener goes away.
impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

pub fn socket_path(listener: &Listener) -> Option<&Path> {
    match listener {
        Listener::Unix(_, p) => Some(p),
        Listener::Tcp(_) => None,
    }
}
