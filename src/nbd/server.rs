//! [`NbdServer`]: accepts TCP connections and runs the protocol on each in its own
//! thread (plus a few read workers), up to a bound; connections over the bound are closed at once. Logs every
//! connection (peer, export, requests served, how it ended).

use std::collections::HashMap;
use std::io::{self, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::budget::{ConnectionBudget, ReplyBudget};
use super::proto::{MAX_REQUEST_LEN, STRUCTURED_REPLY_LEN};
use super::transmit::{transmit_with, TransmitOptions};
use super::{negotiate, Catalog, NbdError, Negotiated};

/// Threads per connection serving reads concurrently.
const READ_WORKERS: usize = 4;
/// How often a connection waiting for a request wakes up to check its idle time and its
/// workers' replies.
const TICK: Duration = Duration::from_millis(500);
/// Largest budget share of one read: the longest reply plus one 4 MiB chunk the export
/// may load meanwhile. Every connection may take at least this much, so a maximal read
/// always fits.
pub const MAX_READ_CHARGE: u64 =
    MAX_REQUEST_LEN as u64 + STRUCTURED_REPLY_LEN as u64 + 8 + (4 << 20);

/// Limits of a server.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Connections served at once; more are closed right after accept.
    pub max_connections: usize,
    /// Time a client has for the whole negotiation, from accept to the choice of an
    /// export (a slow or silent client is dropped).
    pub handshake_timeout: Duration,
    /// A connection with no request and no reply pending for this long is closed
    /// (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// A reply the client does not take whole within about this long (it stopped
    /// reading, or reads a byte now and then) ends the connection, giving back its share
    /// of the reply budget.
    pub reply_timeout: Duration,
    /// Bytes of reply buffers all connections together may hold; a read waits for its
    /// share before it allocates. Each connection may hold a quarter of it (at least
    /// [`MAX_READ_CHARGE`]).
    pub reply_budget: u64,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_connections: 64,
            handshake_timeout: Duration::from_secs(30),
            idle_timeout: Some(Duration::from_secs(15 * 60)),
            reply_timeout: Duration::from_secs(60),
            reply_budget: 256 << 20,
        }
    }
}

impl ServerOptions {
    /// The share of the reply budget one connection may hold at once.
    pub fn connection_cap(&self) -> u64 {
        (self.reply_budget / 4)
            .max(MAX_READ_CHARGE)
            .min(self.reply_budget)
    }
}

/// Stops a running [`NbdServer`] from another thread (a signal handler thread).
#[derive(Clone, Debug)]
pub struct ServerHandle {
    stop: Arc<AtomicBool>,
    wake: SocketAddr,
}

impl ServerHandle {
    /// Makes [`NbdServer::run`] close every connection and return.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.wake, Duration::from_secs(1));
    }
}

/// What a server did, returned when it stops.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerSummary {
    /// Connections accepted and served.
    pub connections: u64,
    /// Connections refused because the bound was reached.
    pub refused: u64,
}

/// See the module documentation.
pub struct NbdServer {
    listener: TcpListener,
    catalog: Arc<dyn Catalog>,
    opts: ServerOptions,
    handle: ServerHandle,
}

impl NbdServer {
    /// Listens on `addr` (port 0 picks a free port: see [`NbdServer::local_addr`]).
    pub fn bind(
        addr: SocketAddr,
        catalog: Arc<dyn Catalog>,
        opts: ServerOptions,
    ) -> io::Result<Self> {
        let listener = TcpListener::bind(addr)?;
        let local = listener.local_addr()?;
        let wake_ip = match local.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        Ok(NbdServer {
            listener,
            catalog,
            opts,
            handle: ServerHandle {
                stop: Arc::new(AtomicBool::new(false)),
                wake: SocketAddr::new(wake_ip, local.port()),
            },
        })
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// A handle that stops the server.
    pub fn handle(&self) -> ServerHandle {
        self.handle.clone()
    }

    /// Serves until [`ServerHandle::shutdown`]; then closes every connection and waits
    /// for their threads.
    pub fn run(self) -> io::Result<ServerSummary> {
        let budget = Arc::new(ReplyBudget::new(self.opts.reply_budget));
        let live: Arc<Mutex<HashMap<u64, TcpStream>>> = Arc::default();
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        let mut summary = ServerSummary::default();
        let mut next_id = 0u64;
        loop {
            let accepted = self.listener.accept();
            if self.handle.stop.load(Ordering::SeqCst) {
                break;
            }
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            };
            threads.retain(|t| !t.is_finished());
            if live.lock().len() >= self.opts.max_connections {
                summary.refused += 1;
                tracing::warn!(%peer, max = self.opts.max_connections, "too many connections: closing");
                continue;
            }
            // A second handle, so that a stop can shut the connection down.
            let handle = match stream.try_clone() {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "cannot register the connection: closing");
                    continue;
                }
            };
            next_id += 1;
            summary.connections += 1;
            let id = next_id;
            live.lock().insert(id, handle);
            let (live2, catalog, opts) = (live.clone(), self.catalog.clone(), self.opts.clone());
            let share = ConnectionBudget::new(budget.clone(), self.opts.connection_cap());
            let t = std::thread::Builder::new()
                .name(format!("nbd-{id}"))
                .spawn(move || {
                    connection(&stream, peer, catalog.as_ref(), &opts, share);
                    live2.lock().remove(&id);
                });
            match t {
                Ok(t) => threads.push(t),
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "cannot start a connection thread");
                    live.lock().remove(&id);
                }
            }
        }
        for s in live.lock().values() {
            let _ = s.shutdown(Shutdown::Both);
        }
        for t in threads {
            let _ = t.join();
        }
        Ok(summary)
    }
}

/// The client during the negotiation: every read and write must finish before one
/// deadline for the whole handshake (each socket operation gets the time that is left),
/// so a client sending a byte now and then cannot hold a slot.
struct Deadline<'a> {
    s: &'a TcpStream,
    until: Instant,
    limit: Duration,
}

impl Deadline<'_> {
    fn left(&self) -> io::Result<Duration> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                NbdError::HandshakeDeadline(self.limit),
            ));
        }
        Ok(left)
    }
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.s.set_read_timeout(Some(self.left()?))?;
        self.s.read(buf)
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.s.set_write_timeout(Some(self.left()?))?;
        self.s.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Runs one connection to its end, logging what happened.
fn connection(
    stream: &TcpStream,
    peer: SocketAddr,
    catalog: &dyn Catalog,
    opts: &ServerOptions,
    budget: ConnectionBudget,
) {
    let _ = stream.set_nodelay(true);
    tracing::info!(%peer, "connection");
    let mut s = Deadline {
        s: stream,
        until: Instant::now() + opts.handshake_timeout,
        limit: opts.handshake_timeout,
    };
    let (name, export, structured) = match negotiate(&mut s, catalog) {
        Ok(Negotiated::Export {
            name,
            export,
            structured,
        }) => (name, export, structured),
        Ok(Negotiated::Aborted) => {
            tracing::info!(%peer, "client ended the negotiation");
            return;
        }
        Err(e) => {
            tracing::warn!(%peer, error = %e, "negotiation failed: closing");
            // A plain close: the error reply just sent (small) must reach the client.
            let _ = stream.shutdown(Shutdown::Both);
            return;
        }
    };
    tracing::info!(%peer, export = %name, size = export.size(), structured, "transmission");
    // Reads wake up every tick (idle time, failed replies); a reply the client does not
    // take within the reply timeout fails.
    let timeouts = stream
        .set_read_timeout(Some(TICK))
        .and_then(|()| stream.set_write_timeout(Some(opts.reply_timeout)));
    if let Err(e) = timeouts {
        tracing::warn!(%peer, error = %e, "cannot set socket timeouts");
        return;
    }
    let mut r = BufReader::with_capacity(64 * 1024, stream);
    let mut w = stream;
    let topts = TransmitOptions {
        workers: READ_WORKERS,
        budget: Some(budget),
        idle_timeout: opts.idle_timeout,
        reply_timeout: Some(opts.reply_timeout),
    };
    match transmit_with(&mut r, &mut w, export.as_ref(), structured, &topts) {
        Ok(st) => {
            tracing::info!(%peer, export = %name, reads = st.reads, bytes = st.bytes_read,
                           errors = st.errors, clean = st.disconnected, "closed");
            let _ = stream.shutdown(Shutdown::Both);
        }
        Err(e @ NbdError::Idle(_)) => {
            // Nothing is pending: a plain close.
            tracing::info!(%peer, export = %name, error = %e, "connection ended");
            let _ = stream.shutdown(Shutdown::Both);
        }
        Err(e) => {
            tracing::warn!(%peer, export = %name, error = %e, "connection ended");
            abort(stream);
        }
    }
}

/// Makes the coming close of `stream` abortive (`SO_LINGER` 0: a reset): replies still
/// queued for a client that stopped reading are dropped at once instead of occupying
/// kernel memory until it reads them, and the client learns of the close right away.
fn abort(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own, with a pointer to a live `linger` and its
    // exact size; the kernel only reads it.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(stream),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        let _ = stream.shutdown(Shutdown::Both);
    }
}
