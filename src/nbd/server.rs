//! [`NbdServer`]: accepts TCP connections and runs the protocol on each in its own
//! thread (plus a few read workers), up to a bound; connections over the bound are closed at once. Logs every
//! connection (peer, export, requests served, how it ended).

use std::collections::HashMap;
use std::io::{self, BufReader};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;

use super::{negotiate, transmit, Catalog, Negotiated};

/// Threads per connection serving reads concurrently.
const READ_WORKERS: usize = 4;

/// Limits of a server.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Connections served at once; more are closed right after accept.
    pub max_connections: usize,
    /// Time a client has for each read during negotiation (a silent client is dropped).
    pub handshake_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            max_connections: 64,
            handshake_timeout: Duration::from_secs(30),
        }
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
            let t = std::thread::Builder::new()
                .name(format!("nbd-{id}"))
                .spawn(move || {
                    connection(&stream, peer, catalog.as_ref(), &opts);
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

/// Runs one connection to its end, logging what happened.
fn connection(stream: &TcpStream, peer: SocketAddr, catalog: &dyn Catalog, opts: &ServerOptions) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(opts.handshake_timeout));
    tracing::info!(%peer, "connection");
    let mut s = stream;
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
            return;
        }
    };
    tracing::info!(%peer, export = %name, size = export.size(), structured, "transmission");
    if let Err(e) = stream.set_read_timeout(None) {
        tracing::warn!(%peer, error = %e, "cannot clear the read timeout");
        return;
    }
    let mut r = BufReader::with_capacity(64 * 1024, stream);
    let mut w = stream;
    match transmit(&mut r, &mut w, export.as_ref(), structured, READ_WORKERS) {
        Ok(st) => tracing::info!(%peer, export = %name, reads = st.reads, bytes = st.bytes_read,
                                 errors = st.errors, clean = st.disconnected, "closed"),
        Err(e) => tracing::warn!(%peer, export = %name, error = %e, "connection ended"),
    }
    let _ = stream.shutdown(Shutdown::Both);
}
