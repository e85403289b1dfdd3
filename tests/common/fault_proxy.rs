//! A fault-injecting HTTP/1.1 proxy for tests: listens on `127.0.0.1:0`, forwards every
//! request to an upstream server on loopback (nginx), and breaks chosen exchanges on the way
//! back according to a plan that can be switched while the proxy runs.
//!
//! The proxy parses each request's headers (GET without a body, as streamboot sends),
//! forwards it upstream on a fresh connection, reads the whole response (framed by
//! `Content-Length`), then applies the first matching [`Rule`] and answers the client. The
//! client side keeps its connection alive between requests, as HTTP/1.1 clients expect.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// What to do to a matched exchange.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Reset the connection (RST) after reading the request, before any response byte.
    Reset,
    /// Answer with this status (e.g. 500, 503, 404) and a short body, keeping the
    /// connection alive.
    Status(u16),
    /// Send the headers and the first `after` body bytes, then stall for `secs`, then close.
    Stall { after: usize, secs: u64 },
    /// Send the headers (with the full `Content-Length`) and only the first `len` body
    /// bytes, then close.
    Truncate(usize),
    /// Answer with a `Content-Range` that starts `shift` bytes later than the real one
    /// (same length and total), body unchanged.
    ShiftRange(u64),
    /// Flip one bit of the body: bit `bit` of the byte at `at % body length`.
    FlipBit { at: usize, bit: u8 },
    /// Forward the request for this upstream path instead (the image was replaced).
    Path(String),
    /// The image was replaced by this upstream path on a server that ignores
    /// preconditions (`If-Match`, `If-Unmodified-Since` are dropped from the request) and
    /// sends no validators (`ETag` and `Last-Modified` are dropped from the answer).
    Unvalidated(String),
    /// Answer `302 Found` with this `Location`.
    Redirect(String),
    /// Answer `status` unless the request head contains every one of these strings,
    /// compared without case (a server that wants credentials or a signed query string);
    /// else forward unchanged.
    Require { needles: Vec<String>, status: u16 },
    /// Send the headers, then the body one byte every `every_ms` milliseconds (never a
    /// stall long enough for a per-read timeout), until the body ends or the client leaves.
    Drip { every_ms: u64 },
}

/// Which requests a rule applies to. Requests are counted from 1 since the last
/// [`FaultProxy::set_plan`].
#[derive(Clone, Debug)]
pub enum When {
    /// Every request.
    Always,
    /// Only request number `n`.
    Nth(u64),
    /// Every `n`th request (`n`, `2n`, ...).
    EveryNth(u64),
    /// Each request with probability `p` (seeded by the plan's seed).
    Prob(f64),
    /// Requests whose `Range` overlaps `[start, end)` (requests without `Range` never).
    Overlaps(u64, u64),
    /// Requests for this path (query string included, as sent).
    Path(String),
}

/// One line of the plan: apply `fault` to requests matching `when`, at most `limit` times.
#[derive(Clone, Debug)]
pub struct Rule {
    pub when: When,
    pub fault: Fault,
    pub limit: Option<u64>,
}

impl Rule {
    /// `fault` on every request matching `when`, without limit.
    pub fn new(when: When, fault: Fault) -> Rule {
        Rule {
            when,
            fault,
            limit: None,
        }
    }

    /// Stops applying the rule after `n` hits.
    pub fn limit(mut self, n: u64) -> Rule {
        self.limit = Some(n);
        self
    }
}

struct Plan {
    rules: Vec<(Rule, u64)>,
    requests: u64,
    rng: ChaCha8Rng,
}

impl Plan {
    fn empty(seed: u64) -> Plan {
        Plan {
            rules: Vec::new(),
            requests: 0,
            rng: super::test_rng(seed),
        }
    }

    /// Counts the request and returns the fault of the first matching rule, if any.
    fn pick(&mut self, range: Option<(u64, u64)>, path: &str) -> Option<Fault> {
        self.requests += 1;
        let n = self.requests;
        for (rule, hits) in &mut self.rules {
            if rule.limit.is_some_and(|l| *hits >= l) {
                continue;
            }
            let matched = match rule.when {
                When::Always => true,
                When::Nth(k) => n == k,
                When::EveryNth(k) => k > 0 && n % k == 0,
                When::Prob(p) => self.rng.random_bool(p),
                When::Overlaps(s, e) => range.is_some_and(|(a, b)| a < e && b >= s),
                When::Path(ref p) => p == path,
            };
            if matched {
                *hits += 1;
                return Some(rule.fault.clone());
            }
        }
        None
    }
}

struct Shared {
    upstream: SocketAddr,
    plan: Mutex<Plan>,
    /// Faults applied since the proxy started.
    hits: AtomicU64,
    /// Requests seen since the proxy started.
    requests: AtomicU64,
    /// While set, the listener is closed and every client connection is cut.
    down: AtomicBool,
    stop: AtomicBool,
}

/// A running proxy; stops its accept thread on drop.
pub struct FaultProxy {
    shared: Arc<Shared>,
    port: u16,
    accept: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts a proxy in front of `upstream_port` on 127.0.0.1 with an empty plan.
    pub fn start(upstream_port: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let shared = Arc::new(Shared {
            upstream: SocketAddr::from(([127, 0, 0, 1], upstream_port)),
            plan: Mutex::new(Plan::empty(0)),
            hits: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            down: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let accept = std::thread::Builder::new()
            .name("fault-proxy".into())
            .spawn(move || accept_loop(s, listener, port))
            .expect("spawn proxy thread");
        FaultProxy {
            shared,
            port,
            accept: Some(accept),
        }
    }

    /// The proxy's URL for `name` (same paths as upstream).
    pub fn url(&self, name: &str) -> String {
        format!(
            "http://127.0.0.1:{}/{}",
            self.port,
            name.trim_start_matches('/')
        )
    }

    /// Replaces the plan; `seed` drives [`When::Prob`]. The request count restarts at 0.
    pub fn set_plan(&self, seed: u64, rules: Vec<Rule>) {
        let mut plan = Plan::empty(seed);
        plan.rules = rules.into_iter().map(|r| (r, 0)).collect();
        *self.shared.plan.lock().unwrap() = plan;
    }

    /// Forwards everything unchanged from now on.
    pub fn clear(&self) {
        self.set_plan(0, Vec::new());
    }

    /// Faults applied so far (all plans).
    pub fn hits(&self) -> u64 {
        self.shared.hits.load(Ordering::SeqCst)
    }

    /// Requests seen so far (all plans).
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// The server goes away: the listener closes (connections are refused) and open
    /// connections are cut, until [`FaultProxy::up`].
    pub fn down(&self) {
        self.shared.down.store(true, Ordering::SeqCst);
    }

    /// The server comes back on the same port.
    pub fn up(&self) {
        self.shared.down.store(false, Ordering::SeqCst);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// Accepts connections (polling, so that `down` and `stop` take effect); while down, the
/// listening socket is closed so that connects are refused.
fn accept_loop(shared: Arc<Shared>, listener: TcpListener, port: u16) {
    let mut listener = Some(listener);
    while !shared.stop.load(Ordering::SeqCst) {
        if shared.down.load(Ordering::SeqCst) {
            listener = None;
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        let l = match &listener {
            Some(l) => l,
            None => match TcpListener::bind(("127.0.0.1", port)) {
                Ok(l) => listener.insert(l),
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
            },
        };
        l.set_nonblocking(true).expect("nonblocking listener");
        match l.accept() {
            Ok((stream, _)) => {
                let s = shared.clone();
                std::thread::spawn(move || serve_client(&s, stream));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// A parsed HTTP message head.
struct Head {
    /// Request line or status line.
    first: String,
    headers: Vec<(String, String)>,
}

impl Head {
    fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn set(&mut self, name: &str, value: String) {
        self.headers.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
        self.headers.push((name.to_string(), value));
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = format!("{}\r\n", self.first);
        for (k, v) in &self.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str("\r\n");
        out.into_bytes()
    }
}

/// Reads a message head; `None` at a clean end of stream.
fn read_head(r: &mut impl BufRead) -> std::io::Result<Option<Head>> {
    let mut first = String::new();
    if r.read_line(&mut first)? == 0 {
        return Ok(None);
    }
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    Ok(Some(Head {
        first: first.trim_end().to_string(),
        headers,
    }))
}

/// `Range: bytes=a-b` as the inclusive pair `(a, b)`.
fn parse_range(head: &Head) -> Option<(u64, u64)> {
    let spec = head.get("range")?.strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Serves one client connection until it closes, the proxy goes down, or a fault ends it.
fn serve_client(shared: &Shared, stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_millis(50)));
    let mut reader = BufReader::new(stream.try_clone().expect("clone client stream"));
    let mut out = stream;
    loop {
        // Wait for the next request, watching for `down`.
        let head = loop {
            if shared.down.load(Ordering::SeqCst) || shared.stop.load(Ordering::SeqCst) {
                reset(&out);
                return;
            }
            match reader.fill_buf() {
                Ok([]) => return,
                Ok(_) => break read_head(&mut reader),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(_) => return,
            }
        };
        let Ok(Some(mut head)) = head else { return };
        shared.requests.fetch_add(1, Ordering::SeqCst);
        let path = head.first.split(' ').nth(1).unwrap_or_default().to_string();
        let fault = shared.plan.lock().unwrap().pick(parse_range(&head), &path);
        if fault.is_some() {
            shared.hits.fetch_add(1, Ordering::SeqCst);
        }
        if let Some(Fault::Path(path) | Fault::Unvalidated(path)) = &fault {
            let mut parts = head.first.splitn(3, ' ');
            let (method, _, version) = (parts.next(), parts.next(), parts.next());
            head.first = format!(
                "{} {path} {}",
                method.unwrap_or("GET"),
                version.unwrap_or("HTTP/1.1")
            );
        }
        if let Some(Fault::Unvalidated(_)) = &fault {
            for name in ["if-match", "if-unmodified-since", "if-none-match"] {
                head.headers.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
            }
        }
        let answer = match &fault {
            Some(Fault::Reset) => {
                reset(&out);
                return;
            }
            Some(Fault::Status(code)) => Some((*code, Vec::new())),
            Some(Fault::Redirect(location)) => {
                Some((302, vec![("Location".to_string(), location.clone())]))
            }
            Some(Fault::Require { needles, status }) => {
                // Header names arrive in any case (hyper sends them in lower case).
                let text = String::from_utf8_lossy(&head.encode()).to_ascii_lowercase();
                let present = |n: &String| text.contains(&n.to_ascii_lowercase());
                (!needles.iter().all(present)).then_some((*status, Vec::new()))
            }
            _ => None,
        };
        if let Some((code, extra)) = answer {
            if answer_status(&mut out, code, extra).is_err() {
                return;
            }
            continue;
        }
        let Ok((mut rhead, mut body)) = forward(shared.upstream, &mut head) else {
            reset(&out);
            return;
        };
        match fault {
            Some(Fault::Stall { after, secs }) => {
                let cut = after.min(body.len());
                let _ = out.write_all(&rhead.encode());
                let _ = out.write_all(&body[..cut]);
                let end = Instant::now() + Duration::from_secs(secs);
                while Instant::now() < end && !shared.stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = out.shutdown(Shutdown::Both);
                return;
            }
            Some(Fault::Truncate(len)) => {
                let cut = len.min(body.len().saturating_sub(1));
                let _ = out.write_all(&rhead.encode());
                let _ = out.write_all(&body[..cut]);
                let _ = out.shutdown(Shutdown::Both);
                return;
            }
            Some(Fault::ShiftRange(shift)) => {
                if let Some(cr) = rhead.get("content-range").map(str::to_string) {
                    rhead.set("Content-Range", shift_content_range(&cr, shift));
                }
            }
            Some(Fault::FlipBit { at, bit }) if !body.is_empty() => {
                let i = at % body.len();
                body[i] ^= 1 << (bit % 8);
            }
            Some(Fault::Unvalidated(_)) => {
                for name in ["etag", "last-modified"] {
                    rhead.headers.retain(|(k, _)| !k.eq_ignore_ascii_case(name));
                }
            }
            Some(Fault::Drip { every_ms }) => {
                drip(shared, &mut out, &rhead, &body, every_ms);
                return;
            }
            _ => {}
        }
        if out.write_all(&rhead.encode()).is_err() || out.write_all(&body).is_err() {
            return;
        }
    }
}

/// Answers `code` with a short text body and `extra` headers, keeping the connection.
fn answer_status(
    out: &mut TcpStream,
    code: u16,
    extra: Vec<(String, String)>,
) -> std::io::Result<()> {
    let body = format!("fault proxy: injected {code}\n");
    let mut headers = vec![
        ("Content-Type".to_string(), "text/plain".to_string()),
        ("Content-Length".to_string(), body.len().to_string()),
    ];
    headers.extend(extra);
    let head = Head {
        first: format!("HTTP/1.1 {code} Injected"),
        headers,
    };
    out.write_all(&head.encode())?;
    out.write_all(body.as_bytes())
}

/// Sends `rhead`, then `body` one byte every `every_ms` ms; closes the connection at the
/// end, when the client goes away, or when the proxy stops.
fn drip(shared: &Shared, out: &mut TcpStream, rhead: &Head, body: &[u8], every_ms: u64) {
    if out.write_all(&rhead.encode()).is_err() {
        return;
    }
    for byte in body {
        if shared.stop.load(Ordering::SeqCst) || out.write_all(std::slice::from_ref(byte)).is_err()
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(every_ms));
    }
    let _ = out.shutdown(Shutdown::Both);
}

/// `bytes a-b/t` moved `shift` bytes later.
fn shift_content_range(cr: &str, shift: u64) -> String {
    let parse = || -> Option<String> {
        let spec = cr.strip_prefix("bytes ")?;
        let (range, total) = spec.split_once('/')?;
        let (a, b) = range.split_once('-')?;
        let (a, b): (u64, u64) = (a.parse().ok()?, b.parse().ok()?);
        Some(format!("bytes {}-{}/{total}", a + shift, b + shift))
    };
    parse().unwrap_or_else(|| cr.to_string())
}

/// Forwards the request on a fresh upstream connection and reads the whole response.
fn forward(upstream: SocketAddr, head: &mut Head) -> std::io::Result<(Head, Vec<u8>)> {
    let mut up = TcpStream::connect_timeout(&upstream, Duration::from_secs(5))?;
    up.set_read_timeout(Some(Duration::from_secs(30)))?;
    head.set("Connection", "close".into());
    up.write_all(&head.encode())?;
    let mut r = BufReader::new(up);
    let rhead = read_head(&mut r)?.ok_or(std::io::ErrorKind::UnexpectedEof)?;
    let mut body = Vec::new();
    match rhead
        .get("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        Some(len) => {
            body.resize(len, 0);
            r.read_exact(&mut body)?;
        }
        None => {
            r.read_to_end(&mut body)?;
        }
    }
    let mut rhead = rhead;
    // The client connection stays open; framing is by Content-Length.
    rhead.set("Content-Length", body.len().to_string());
    rhead
        .headers
        .retain(|(k, _)| !k.eq_ignore_ascii_case("connection"));
    Ok((rhead, body))
}

/// Makes the close of `stream` a TCP reset (linger 0) instead of an orderly FIN.
fn reset(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket fd we own, with a pointer to a live `linger` of the
    // size we pass; a failure only means the close below is a FIN instead of a RST.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    // The caller drops every handle of the socket next: that close sends the RST.
}
