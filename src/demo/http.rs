//! The demo's built-in HTTP server: one image from memory on 127.0.0.1, `HEAD` and `GET`
//! with a single `Range: bytes=A-B` (or `A-`), `Content-Range`, `Accept-Ranges` and a
//! strong `ETag` (honouring `If-Match`). It counts the body bytes it sends, so the demo can
//! report what went over the wire and check it against the engine's own counters.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use bytes::Bytes;
use http::header::{ACCEPT_RANGES, CONTENT_LENGTH, CONTENT_RANGE, ETAG, IF_MATCH, RANGE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::sync::oneshot;

use super::DemoError;

/// What the server has sent so far.
#[derive(Debug, Default)]
pub struct WireCounters {
    /// Requests answered.
    pub requests: AtomicU64,
    /// Body bytes sent (GET only).
    pub bytes: AtomicU64,
    /// `GET` requests for exactly `bytes=0-0`: the HTTP source's probe when it opens.
    pub probes: AtomicU64,
}

/// A snapshot of [`WireCounters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Wire {
    pub requests: u64,
    pub bytes: u64,
    pub probes: u64,
}

impl Wire {
    /// What was sent between `earlier` and `self`.
    pub fn since(self, earlier: Wire) -> Wire {
        Wire {
            requests: self.requests - earlier.requests,
            bytes: self.bytes - earlier.bytes,
            probes: self.probes - earlier.probes,
        }
    }
}

/// The running server; stops when dropped.
pub struct ImageServer {
    addr: SocketAddr,
    counters: Arc<WireCounters>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Image {
    data: Bytes,
    etag: String,
}

impl ImageServer {
    /// Serves `data` at `http://127.0.0.1:PORT/NAME` (any path answers with the image).
    pub fn start(data: Bytes) -> Result<Self, DemoError> {
        let etag = format!("\"{}\"", &blake3::hash(&data).to_hex()[..32]);
        let image = Arc::new(Image { data, etag });
        let std_listener =
            std::net::TcpListener::bind(("127.0.0.1", 0)).map_err(DemoError::Http)?;
        std_listener
            .set_nonblocking(true)
            .map_err(DemoError::Http)?;
        let addr = std_listener.local_addr().map_err(DemoError::Http)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(DemoError::Http)?;
        let counters = Arc::new(WireCounters::default());
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        let c = counters.clone();
        let thread = std::thread::Builder::new()
            .name("demo-http".into())
            .spawn(move || {
                rt.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(std_listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!("demo http server: {e}");
                            return;
                        }
                    };
                    loop {
                        tokio::select! {
                            _ = &mut stop_rx => break,
                            accepted = listener.accept() => {
                                let Ok((stream, _)) = accepted else { continue };
                                let (image, c) = (image.clone(), c.clone());
                                tokio::spawn(async move {
                                    let svc = service_fn(move |req| {
                                        let r = answer(&image, &c, &req);
                                        async move { Ok::<_, Infallible>(r) }
                                    });
                                    let _ = http1::Builder::new()
                                        .serve_connection(TokioIo::new(stream), svc)
                                        .await;
                                });
                            }
                        }
                    }
                });
                rt.shutdown_timeout(std::time::Duration::from_secs(1));
            })
            .map_err(DemoError::Http)?;
        Ok(Self {
            addr,
            counters,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The image's URL.
    pub fn url(&self, name: &str) -> String {
        format!("http://{}/{name}", self.addr)
    }

    /// What was sent so far.
    pub fn wire(&self) -> Wire {
        Wire {
            requests: self.counters.requests.load(Relaxed),
            bytes: self.counters.bytes.load(Relaxed),
            probes: self.counters.probes.load(Relaxed),
        }
    }
}

impl Drop for ImageServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Parses a single-range `bytes=A-B` or `bytes=A-` against `len`: `Some(Ok(a..=b))`, or
/// `Some(Err(()))` when it cannot be satisfied, `None` when the header is not one we serve
/// as a range (then the whole image is sent, as RFC 9110 allows).
fn parse_range(v: &str, len: u64) -> Option<Result<(u64, u64), ()>> {
    let spec = v.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let a: u64 = a.trim().parse().ok()?;
    let b: u64 = match b.trim() {
        "" => len.saturating_sub(1),
        s => s.parse().ok()?,
    };
    if a >= len || b < a {
        return Some(Err(()));
    }
    Some(Ok((a, b.min(len - 1))))
}

fn answer(image: &Image, c: &WireCounters, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    c.requests.fetch_add(1, Relaxed);
    let len = image.data.len() as u64;
    let base = |status: StatusCode| {
        Response::builder()
            .status(status)
            .header(ACCEPT_RANGES, "bytes")
            .header(ETAG, image.etag.as_str())
    };
    let head = match *req.method() {
        Method::GET => false,
        Method::HEAD => true,
        _ => {
            return base(StatusCode::METHOD_NOT_ALLOWED)
                .header(http::header::ALLOW, "GET, HEAD")
                .body(Full::new(Bytes::new()))
                .expect("valid response")
        }
    };
    if let Some(m) = req.headers().get(IF_MATCH) {
        let ok = m
            .to_str()
            .map(|m| {
                m.split(',')
                    .any(|t| t.trim() == image.etag || t.trim() == "*")
            })
            .unwrap_or(false);
        if !ok {
            return base(StatusCode::PRECONDITION_FAILED)
                .body(Full::new(Bytes::new()))
                .expect("valid response");
        }
    }
    let range = req
        .headers()
        .get(RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_range(v, len));
    let (status, a, b) = match range {
        None => (StatusCode::OK, 0, len.saturating_sub(1)),
        Some(Ok((a, b))) => (StatusCode::PARTIAL_CONTENT, a, b),
        Some(Err(())) => {
            return base(StatusCode::RANGE_NOT_SATISFIABLE)
                .header(CONTENT_RANGE, format!("bytes */{len}"))
                .body(Full::new(Bytes::new()))
                .expect("valid response")
        }
    };
    let n = if len == 0 { 0 } else { b - a + 1 };
    let mut r = base(status).header(CONTENT_LENGTH, n);
    if status == StatusCode::PARTIAL_CONTENT {
        r = r.header(CONTENT_RANGE, format!("bytes {a}-{b}/{len}"));
    }
    if head {
        return r.body(Full::new(Bytes::new())).expect("valid response");
    }
    if status == StatusCode::PARTIAL_CONTENT && a == 0 && b == 0 {
        c.probes.fetch_add(1, Relaxed);
    }
    c.bytes.fetch_add(n, Relaxed);
    r.body(Full::new(image.data.slice(a as usize..(a + n) as usize)))
        .expect("valid response")
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-0", 10), Some(Ok((0, 0))));
        assert_eq!(parse_range("bytes=3-", 10), Some(Ok((3, 9))));
        assert_eq!(parse_range("bytes=3-100", 10), Some(Ok((3, 9))));
        assert_eq!(parse_range("bytes=10-12", 10), Some(Err(())));
        assert_eq!(parse_range("bytes=5-4", 10), Some(Err(())));
        assert_eq!(parse_range("bytes=0-1,4-5", 10), None);
        assert_eq!(parse_range("items=0-1", 10), None);
    }
}
