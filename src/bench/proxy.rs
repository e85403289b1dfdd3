//! The bench's WAN emulator: a TCP proxy between streamboot and the origin that delays
//! every chunk of bytes by half the round-trip time in each direction (order preserved),
//! caps the bandwidth of each direction (one link shared by every connection), and counts
//! what crosses it: bytes on the wire, HTTP requests, and response body bytes (so its count
//! can be compared with what serve says it fetched).
//!
//! Each direction of a connection is one task: it reads a chunk, waits until the link is
//! free to send it (`len / bandwidth` after the previous chunk: the cap, which also stops
//! reading while the link is busy, so the origin sees TCP back-pressure), then hands it to
//! a writer task that delivers it `delay` later. Loss is not emulated.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::http_count::{RequestInfo, RequestParser, ResponseParser};

/// Read size per chunk of bytes forwarded.
const CHUNK: usize = 64 << 10;

/// An emulated network: one-way delay and bandwidth per direction.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Link {
    /// Round-trip time added (half in each direction).
    pub rtt: Duration,
    /// Bandwidth cap per direction in bytes per second (None: unlimited).
    pub bytes_per_sec: Option<u64>,
}

/// What crossed the proxy (monotonic counters).
#[derive(Debug, Default)]
pub struct Counters {
    /// Bytes received from the origin (what the origin sent).
    pub from_origin: AtomicU64,
    /// Bytes delivered to the origin (requests).
    pub to_origin: AtomicU64,
    /// HTTP requests forwarded to the origin.
    pub requests: AtomicU64,
    /// Requests with `Range: bytes=0-0` (the probe streamboot sends when it opens a source).
    pub probes: AtomicU64,
    /// Response body bytes delivered for requests other than probes: the image bytes.
    pub body_bytes: AtomicU64,
    /// Responses whose body length could not be told (no Content-Length): body not counted.
    pub uncounted_responses: AtomicU64,
    /// Connections open now.
    pub open_connections: AtomicU64,
}

/// A copy of the counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Snapshot {
    pub from_origin: u64,
    pub to_origin: u64,
    pub requests: u64,
    pub probes: u64,
    pub body_bytes: u64,
    pub uncounted_responses: u64,
    pub open_connections: u64,
}

impl Snapshot {
    /// Counts since `earlier` (open connections: now).
    pub fn since(&self, earlier: &Snapshot) -> Snapshot {
        Snapshot {
            from_origin: self.from_origin - earlier.from_origin,
            to_origin: self.to_origin - earlier.to_origin,
            requests: self.requests - earlier.requests,
            probes: self.probes - earlier.probes,
            body_bytes: self.body_bytes - earlier.body_bytes,
            uncounted_responses: self.uncounted_responses - earlier.uncounted_responses,
            open_connections: self.open_connections,
        }
    }
}

impl Counters {
    /// The counters now.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            from_origin: self.from_origin.load(Relaxed),
            to_origin: self.to_origin.load(Relaxed),
            requests: self.requests.load(Relaxed),
            probes: self.probes.load(Relaxed),
            body_bytes: self.body_bytes.load(Relaxed),
            uncounted_responses: self.uncounted_responses.load(Relaxed),
            open_connections: self.open_connections.load(Relaxed),
        }
    }
}

/// When one direction's link is free again (shared by all connections).
#[derive(Default)]
struct Pacer {
    next_free: Mutex<Option<Instant>>,
}

impl Pacer {
    /// The time `len` bytes read now have left the link (now when unlimited).
    fn leave(&self, len: usize, bytes_per_sec: Option<u64>) -> Instant {
        let now = Instant::now();
        let Some(bw) = bytes_per_sec else {
            return now;
        };
        let mut next = self.next_free.lock();
        let start = next.map_or(now, |n| n.max(now));
        let done = start + Duration::from_secs_f64(len as f64 / bw.max(1) as f64);
        *next = Some(done);
        done
    }
}

/// Shared state of a running proxy.
struct Shared {
    link: Link,
    origin: SocketAddr,
    /// The origin's `Host` (from the target URL).
    host: String,
    counters: Counters,
    up: Pacer,
    down: Pacer,
}

/// A running proxy; stopped (every connection closed) on drop.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards each connection to `origin`, whose
    /// requests get `Host: host`.
    pub fn start(origin: SocketAddr, host: &str, link: Link) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("bench-proxy")
            .enable_all()
            .build()?;
        let listener =
            runtime.block_on(TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            link,
            origin,
            host: host.to_string(),
            counters: Counters::default(),
            up: Pacer::default(),
            down: Pacer::default(),
        });
        let s = shared.clone();
        runtime.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(client, s).await {
                        tracing::debug!("bench proxy connection: {e}");
                    }
                });
            }
        });
        Ok(Self {
            addr,
            shared,
            runtime: Some(runtime),
        })
    }

    /// The address streamboot connects to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The counters now.
    pub fn snapshot(&self) -> Snapshot {
        self.shared.counters.snapshot()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Counts an open connection while it lives.
struct Open<'a>(&'a AtomicU64);

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Forwards one client connection to the origin until both directions end.
async fn connection(client: TcpStream, s: Arc<Shared>) -> std::io::Result<()> {
    s.counters.open_connections.fetch_add(1, Relaxed);
    let _open = Open(&s.counters.open_connections);
    let origin = TcpStream::connect(s.origin).await?;
    client.set_nodelay(true)?;
    origin.set_nodelay(true)?;
    let (cr, cw) = client.into_split();
    let (or, ow) = origin.into_split();
    // The requests in flight on this connection, oldest first (HTTP/1.1 answers in order).
    let pending: Arc<Mutex<VecDeque<RequestInfo>>> = Arc::default();
    let up = pump(cr, ow, s.clone(), Dir::Up(pending.clone()));
    let down = pump(or, cw, s.clone(), Dir::Down(pending));
    let (a, b) = tokio::join!(up, down);
    a.and(b)
}

/// Which way bytes flow, with what the direction's parser needs.
enum Dir {
    /// Client to origin: requests.
    Up(Arc<Mutex<VecDeque<RequestInfo>>>),
    /// Origin to client: responses.
    Down(Arc<Mutex<VecDeque<RequestInfo>>>),
}

/// One direction: read, pace, delay, deliver; then shut the writing side down.
async fn pump(
    mut r: OwnedReadHalf,
    mut w: OwnedWriteHalf,
    s: Arc<Shared>,
    dir: Dir,
) -> std::io::Result<()> {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let delay = s.link.rtt / 2;
    let is_up = matches!(dir, Dir::Up(_));
    let pending = match &dir {
        Dir::Down(p) => Some(p.clone()),
        Dir::Up(_) => None,
    };
    let reader = {
        let s = s.clone();
        async move {
            let mut requests = RequestParser::with_host(s.host.clone());
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = r.read(&mut buf).await?;
                if n == 0 {
                    return Ok::<(), std::io::Error>(());
                }
                let mut bytes = Vec::with_capacity(n);
                if let Dir::Up(pending) = &dir {
                    for req in requests.feed(&buf[..n], &mut bytes) {
                        s.counters.requests.fetch_add(1, Relaxed);
                        if req.probe {
                            s.counters.probes.fetch_add(1, Relaxed);
                        }
                        pending.lock().push_back(req);
                    }
                } else {
                    bytes.extend_from_slice(&buf[..n]);
                    s.counters.from_origin.fetch_add(n as u64, Relaxed);
                }
                if bytes.is_empty() {
                    // A request's header block is not complete yet.
                    continue;
                }
                let pacer = if is_up { &s.up } else { &s.down };
                let leave = pacer.leave(bytes.len(), s.link.bytes_per_sec);
                tokio::time::sleep_until(leave).await;
                if tx.send((leave + delay, bytes)).is_err() {
                    return Ok(());
                }
            }
        }
    };
    let writer = async move {
        let mut responses = ResponseParser::default();
        while let Some((at, bytes)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            w.write_all(&bytes).await?;
            match &pending {
                Some(p) => {
                    let c = responses.feed(&bytes, &mut p.lock());
                    s.counters.body_bytes.fetch_add(c.body_bytes, Relaxed);
                    s.counters
                        .uncounted_responses
                        .fetch_add(c.uncounted, Relaxed);
                }
                None => {
                    s.counters.to_origin.fetch_add(bytes.len() as u64, Relaxed);
                }
            }
        }
        w.shutdown().await
    };
    let (a, b) = tokio::join!(reader, writer);
    a.and(b)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::Instant;

    use super::*;

    /// An origin answering one request with `body`; returns what it received.
    fn origin(body: Vec<u8>) -> (SocketAddr, std::thread::JoinHandle<String>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut req = Vec::new();
            let mut b = [0u8; 1];
            while !req.ends_with(b"\r\n\r\n") {
                c.read_exact(&mut b).unwrap();
                req.push(b[0]);
            }
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
            c.write_all(head.as_bytes()).unwrap();
            c.write_all(&body).unwrap();
            String::from_utf8(req).unwrap()
        });
        (addr, t)
    }

    #[test]
    fn delays_caps_counts_and_keeps_the_bytes() {
        let body: Vec<u8> = (0..256u32 << 10).map(|i| (i % 251) as u8).collect();
        let (addr, got) = origin(body.clone());
        let link = Link {
            rtt: Duration::from_millis(100),
            bytes_per_sec: Some(1 << 20),
        };
        let proxy = Proxy::start(addr, "img.example", link).unwrap();
        let t = Instant::now();
        let mut c = TcpStream::connect(proxy.addr()).unwrap();
        c.write_all(b"GET /x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .unwrap();
        let mut answer = Vec::new();
        c.read_to_end(&mut answer).unwrap();
        let took = t.elapsed();
        // The RTT, plus 256 KiB at 1 MiB/s.
        assert!(took >= Duration::from_millis(100 + 250), "{took:?}");
        let split = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert_eq!(&answer[split..], &body[..]);
        let req = got.join().unwrap();
        assert!(req.contains("\r\nHost: img.example\r\n"), "{req}");
        let s = proxy.snapshot();
        assert_eq!((s.requests, s.probes), (1, 0));
        assert_eq!(s.body_bytes, body.len() as u64);
        assert_eq!(s.from_origin, answer.len() as u64);
        assert_eq!(s.to_origin, req.len() as u64);
    }
}
