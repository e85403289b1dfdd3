//! The control socket server: HTTP/1.1 (hyper) over a private unix socket.
//!
//! Endpoints (see `docs/control-api.md`):
//!
//! | method | path             | answer                                      |
//! |--------|------------------|---------------------------------------------|
//! | GET    | `/v1/status`     | `{"ok":true, ...StatusReport}`              |
//! | POST   | `/v1/confirm`    | `{"ok":true,"message":...}`                 |
//! | POST   | `/v1/commit`     | same                                        |
//! | POST   | `/v1/rollback`   | same                                        |
//! | POST   | `/v1/hydration`  | same; body `{"paused":bool?,"rate":u64?}`   |
//! | GET    | `/metrics`       | OpenMetrics text (Prometheus)               |
//! | GET    | `/v1/metrics`    | the same                                    |
//!
//! Errors are `{"ok":false,"error":MESSAGE,"error_kind":KIND}` with 400 (bad request),
//! 404 (unknown path), 405 (wrong method, with `Allow`), 408 (body too slow), 409
//! (conflict), 413 (body over [`MAX_BODY`]) or 500. Request lines or headers hyper cannot parse are answered by hyper
//! itself (400/431, empty body) and the connection is closed.
//!
//! [`ControlOps`] calls run on tokio's blocking pool, so a slow confirm or status never
//! stalls the event loop or other connections.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch, Semaphore};
use tokio::task::JoinSet;

use super::rates::RateWindow;
use super::{metrics, ControlError, ControlOps, FetchedBytes, StatusReport};
use crate::vhost::socket::bind_socket;
use crate::vhost::VhostError;

/// Largest request body accepted (the only body with content is `/v1/hydration`'s).
pub const MAX_BODY: usize = 16 * 1024;

/// Clients must send a request's headers (and, separately, its body) within this time;
/// an idle keep-alive connection is closed after it too.
pub(super) const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Most connections served at once; more wait in the listen backlog.
pub(super) const MAX_CONNECTIONS: usize = 32;

/// Window of the fetch rates.
const RATE_WINDOW: Duration = Duration::from_secs(10);

/// How often the counters are sampled for rates.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// How long open connections get to finish their request at shutdown.
pub(super) const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Why the control socket could not be set up or run.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// Something that is not a socket exists at the path.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// Another server accepts connections on the path.
    #[error("{0} is in use: another streamboot serve is listening there")]
    InUse(PathBuf),
    /// Creating or setting up the socket failed.
    #[error("control socket {path}: {source}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// The TCP metrics listener could not be bound.
    #[error("metrics listener {addr}")]
    Tcp {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// The server's runtime or thread could not be started.
    #[error("control server: {0}")]
    Runtime(#[source] io::Error),
}

/// A bound control socket, not yet serving. Dropping it unused removes the socket.
pub struct ControlServer {
    /// `None` once [`serve`](Self::serve) took it.
    listener: Option<std::os::unix::net::UnixListener>,
    path: PathBuf,
    /// `(dev, ino)` of the socket file we created, so shutdown removes only our own.
    ident: (u64, u64),
    ops: Arc<dyn ControlOps>,
    /// Value of the `disk` label of every metric.
    disk: String,
}

impl std::fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlServer")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl ControlServer {
    /// Creates the socket at `path`: mode 0600, or 0660 owned by group `gid`; never
    /// world-accessible, not even briefly. A stale socket (nobody listening) is replaced;
    /// a live one or a non-socket file is refused.
    pub fn bind(
        path: impl AsRef<Path>,
        ops: Arc<dyn ControlOps>,
        gid: Option<u32>,
    ) -> Result<Self, BindError> {
        let path = path.as_ref().to_path_buf();
        let listener = bind_socket(&path, gid).map_err(|e| match e {
            VhostError::NotASocket(p) => BindError::NotASocket(p),
            VhostError::SocketInUse(p) => BindError::InUse(p),
            VhostError::Socket { path, source } => BindError::Socket { path, source },
            other => BindError::Socket {
                path: path.clone(),
                source: io::Error::other(other.to_string()),
            },
        })?;
        let socket_err = |source| BindError::Socket {
            path: path.clone(),
            source,
        };
        let meta = std::fs::symlink_metadata(&path).map_err(socket_err)?;
        listener.set_nonblocking(true).map_err(socket_err)?;
        Ok(Self {
            listener: Some(listener),
            ident: (meta.dev(), meta.ino()),
            path,
            ops,
            disk: String::new(),
        })
    }

    /// Sets the `disk` label the metrics carry (the disk `serve` serves).
    pub fn with_disk_label(mut self, disk: impl Into<String>) -> Self {
        self.disk = disk.into();
        self
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves on a new thread with its own small tokio runtime until
    /// [`ControlHandle::shutdown`] (or the handle is dropped).
    pub fn spawn(self) -> Result<ControlHandle, BindError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .max_blocking_threads(4)
            .thread_name("sb-control-blk")
            .build()
            .map_err(BindError::Runtime)?;
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let path = self.path.clone();
        let thread = std::thread::Builder::new()
            .name("sb-control".into())
            .spawn(move || {
                let shutdown = async {
                    // A dropped sender (handle dropped) stops the server too.
                    let _ = stop_rx.await;
                };
                if let Err(e) = rt.block_on(self.serve(shutdown)) {
                    tracing::error!("control server stopped: {e}");
                }
                // An operation stuck in the blocking pool must not hold up shutdown.
                rt.shutdown_timeout(SHUTDOWN_GRACE);
            })
            .map_err(BindError::Runtime)?;
        Ok(ControlHandle {
            path,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// Serves in the calling tokio runtime until `shutdown` completes, then lets open
    /// requests finish (briefly) and removes the socket file.
    pub async fn serve(mut self, shutdown: impl Future<Output = ()>) -> Result<(), BindError> {
        let listener = self.listener.take().expect("a ControlServer serves once");
        let shared = Arc::new(Shared::new(
            self.ops.clone(),
            std::mem::take(&mut self.disk),
        ));
        let result = run(listener, &self.path, shared, shutdown).await;
        remove_own_socket(&self.path, self.ident);
        result
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        if self.listener.take().is_some() {
            remove_own_socket(&self.path, self.ident);
        }
    }
}

/// A running control server; stops it when shut down or dropped.
#[derive(Debug)]
pub struct ControlHandle {
    path: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ControlHandle {
    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting, lets open requests finish (at most about two seconds), removes
    /// the socket and joins the server thread.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("control server thread panicked");
            }
        }
    }
}

impl Drop for ControlHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Removes the socket at `path` if it is still the one we created.
fn remove_own_socket(path: &Path, ident: (u64, u64)) {
    match std::fs::symlink_metadata(path) {
        Ok(m) if (m.dev(), m.ino()) == ident => {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!("cannot remove control socket {}: {e}", path.display());
            }
        }
        _ => {}
    }
}

/// State shared by every connection.
pub(super) struct Shared {
    ops: Arc<dyn ControlOps>,
    rates: Mutex<RateWindow>,
    disk: String,
}

impl Shared {
    pub(super) fn new(ops: Arc<dyn ControlOps>, disk: String) -> Self {
        Self {
            ops,
            rates: Mutex::new(RateWindow::new(RATE_WINDOW)),
            disk,
        }
    }

    fn sample(&self, fetched: FetchedBytes) {
        self.rates.lock().record(Instant::now(), fetched);
    }
}

async fn run(
    listener: std::os::unix::net::UnixListener,
    path: &Path,
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), BindError> {
    let listener =
        tokio::net::UnixListener::from_std(listener).map_err(|source| BindError::Socket {
            path: path.to_path_buf(),
            source,
        })?;
    let sampler = tokio::spawn(sample_loop(shared.clone()));
    let (closing_tx, closing_rx) = watch::channel(false);
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    tracing::info!("control API listening on {}", path.display());
    loop {
        // Reap finished connection tasks so the set does not grow.
        while conns.try_join_next().is_some() {}
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = permits.clone().acquire_owned() => p.expect("semaphore is never closed"),
        };
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning.
                    tracing::warn!("control socket accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let shared = shared.clone();
        let mut closing = closing_rx.clone();
        conns.spawn(async move {
            let _permit = permit;
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, req).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::pin!(conn);
            let closed = async move {
                let _ = closing.wait_for(|c| *c).await;
            };
            let result = tokio::select! {
                r = conn.as_mut() => r,
                () = closed => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!("control connection: {e}");
            }
        });
    }
    drop(listener);
    sampler.abort();
    let _ = closing_tx.send(true);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        conns.abort_all();
    }
    tracing::info!("control API stopped");
    Ok(())
}

/// Samples the fetch counters every [`SAMPLE_EVERY`] for the rates.
pub(super) async fn sample_loop(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let ops = shared.ops.clone();
        match tokio::task::spawn_blocking(move || ops.fetched_bytes()).await {
            Ok(f) => shared.sample(f),
            Err(e) => tracing::warn!("fetched_bytes failed: {e}"),
        }
    }
}

/// Body of every successful action.
#[derive(Serialize)]
struct Message<'a> {
    ok: bool,
    message: &'a str,
}

/// Body of every error.
#[derive(Serialize)]
struct ErrorBody<'a> {
    ok: bool,
    error: &'a str,
    error_kind: &'a str,
}

/// `{"ok":true, ...report}`.
#[derive(Serialize)]
struct StatusBody<'a> {
    ok: bool,
    #[serde(flatten)]
    report: &'a StatusReport,
}

/// The body of `/v1/hydration`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HydrationRequest {
    paused: Option<bool>,
    #[serde(alias = "rate_bytes_per_sec")]
    rate: Option<u64>,
}

/// A validated state-changing request.
#[derive(Debug)]
enum Action {
    Confirm,
    Commit,
    Rollback,
    Hydration {
        paused: Option<bool>,
        rate: Option<u64>,
    },
}

impl Action {
    fn run(self, ops: &dyn ControlOps) -> Result<String, ControlError> {
        match self {
            Action::Confirm => ops.confirm(),
            Action::Commit => ops.commit(),
            Action::Rollback => ops.rollback(),
            Action::Hydration { paused, rate } => ops.set_hydration(paused, rate),
        }
    }
}

/// The body of the actions without parameters: nothing, or `{}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

pub(super) type Resp = Response<Full<Bytes>>;

fn json_response(status: StatusCode, body: &impl Serialize) -> Resp {
    let mut bytes = serde_json::to_vec(body).unwrap_or_else(|e| {
        format!(r#"{{"ok":false,"error":"cannot encode the answer: {e}","error_kind":"internal"}}"#)
            .into_bytes()
    });
    bytes.push(b'\n');
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(bytes)))
        .expect("static response parts are valid")
}

pub(super) fn error_response(status: StatusCode, kind: &str, message: &str) -> Resp {
    json_response(
        status,
        &ErrorBody {
            ok: false,
            error: message,
            error_kind: kind,
        },
    )
}

fn control_error(e: &ControlError) -> Resp {
    let status = StatusCode::from_u16(e.http_status()).expect("valid status code");
    error_response(status, e.kind(), &e.to_string())
}

/// The endpoints, with the one method each accepts.
const ROUTES: &[(&str, Method)] = &[
    ("/v1/status", Method::GET),
    ("/metrics", Method::GET),
    ("/v1/metrics", Method::GET),
    ("/v1/confirm", Method::POST),
    ("/v1/commit", Method::POST),
    ("/v1/rollback", Method::POST),
    ("/v1/hydration", Method::POST),
];

async fn handle(shared: &Arc<Shared>, req: Request<Incoming>) -> Resp {
    let path = req.uri().path().to_owned();
    tracing::debug!("control API: {} {}", req.method(), path);
    let Some((route, method)) = ROUTES.iter().find(|(p, _)| *p == path) else {
        return error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no such endpoint: {path}"),
        );
    };
    if req.method() != method {
        let mut resp = error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            &format!("{route} accepts {method} only, not {}", req.method()),
        );
        resp.headers_mut().insert(
            ALLOW,
            http::HeaderValue::from_static(if *method == Method::GET {
                "GET"
            } else {
                "POST"
            }),
        );
        return resp;
    }
    match *route {
        "/v1/status" => match report(shared).await {
            Ok(r) => json_response(
                StatusCode::OK,
                &StatusBody {
                    ok: true,
                    report: &r,
                },
            ),
            Err(resp) => resp,
        },
        "/metrics" | "/v1/metrics" => metrics_response(shared).await,
        action => {
            let body = match read_body(req).await {
                Ok(b) => b,
                Err(resp) => return resp,
            };
            let parsed = if action == "/v1/hydration" {
                parse_hydration(&body).map(|r| Action::Hydration {
                    paused: r.paused,
                    rate: r.rate,
                })
            } else {
                parse_no_params(&body).map(|()| match action {
                    "/v1/confirm" => Action::Confirm,
                    "/v1/commit" => Action::Commit,
                    _ => Action::Rollback,
                })
            };
            let call = match parsed {
                Ok(call) => call,
                Err(msg) => return error_response(StatusCode::BAD_REQUEST, "bad_request", &msg),
            };
            let ops = shared.ops.clone();
            match tokio::task::spawn_blocking(move || call.run(&*ops)).await {
                Ok(Ok(message)) => json_response(
                    StatusCode::OK,
                    &Message {
                        ok: true,
                        message: &message,
                    },
                ),
                Ok(Err(e)) => {
                    tracing::info!("control API: {action} refused: {e}");
                    control_error(&e)
                }
                Err(e) => internal_panic(action, e),
            }
        }
    }
}

fn internal_panic(what: &str, e: tokio::task::JoinError) -> Resp {
    tracing::error!("control API: {what} panicked: {e}");
    error_response(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        &format!("{what} failed unexpectedly (see the serve log)"),
    )
}

/// The answer of `GET /metrics`.
pub(super) async fn metrics_response(shared: &Arc<Shared>) -> Resp {
    match report(shared).await {
        Ok(r) => Response::builder()
            .status(StatusCode::OK)
            .header(CONTENT_TYPE, metrics::CONTENT_TYPE)
            .body(Full::new(Bytes::from(metrics::render(&r, &shared.disk))))
            .expect("static response parts are valid"),
        Err(resp) => resp,
    }
}

/// Takes a status snapshot, samples its counters and adds rates and ETA.
async fn report(shared: &Arc<Shared>) -> Result<StatusReport, Resp> {
    let ops = shared.ops.clone();
    let serve = tokio::task::spawn_blocking(move || ops.status())
        .await
        .map_err(|e| internal_panic("status", e))?;
    let rates = {
        let mut w = shared.rates.lock();
        w.record(
            Instant::now(),
            FetchedBytes {
                demand: serve.engine.bytes_fetched_demand,
                background: serve.engine.bytes_fetched_background,
            },
        );
        w.rates()
    };
    Ok(StatusReport::new(serve, rates))
}

/// Reads the whole body, at most [`MAX_BODY`] bytes.
async fn read_body(req: Request<Incoming>) -> Result<Bytes, Resp> {
    let too_large = || {
        error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            &format!("request body larger than {MAX_BODY} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    let collect = Limited::new(req.into_body(), MAX_BODY).collect();
    let Ok(collected) = tokio::time::timeout(HEADER_TIMEOUT, collect).await else {
        return Err(error_response(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            &format!("request body not received within {HEADER_TIMEOUT:?}"),
        ));
    };
    match collected {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(too_large()),
        Err(e) => Err(error_response(
            StatusCode::BAD_REQUEST,
            "bad_request",
            &format!("cannot read the request body: {e}"),
        )),
    }
}

fn parse_hydration(body: &[u8]) -> Result<HydrationRequest, String> {
    const USAGE: &str = r#"expected a JSON object {"paused": true|false, "rate": BYTES_PER_SECOND (0 = unlimited)}"#;
    if body.trim_ascii().is_empty() {
        return Err(format!("empty body: {USAGE}"));
    }
    let r: HydrationRequest = parse_object(body).map_err(|e| format!("{e}; {USAGE}"))?;
    if r.paused.is_none() && r.rate.is_none() {
        return Err(format!("nothing to change: {USAGE}"));
    }
    Ok(r)
}

fn parse_no_params(body: &[u8]) -> Result<(), String> {
    if body.trim_ascii().is_empty() {
        return Ok(());
    }
    parse_object::<NoParams>(body)
        .map(|_| ())
        .map_err(|e| format!("{e}; this endpoint takes no parameters (send no body or {{}})"))
}

/// Parses a JSON object into `T`. serde would also fill a struct from an array
/// (`[true, 5]`), which is not part of the API, so anything but an object is refused.
fn parse_object<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err("invalid body: expected a JSON object".into());
    }
    serde_json::from_slice(body).map_err(|e| format!("invalid body: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hydration_body_is_strict() {
        let r = parse_hydration(br#"{"paused":true}"#).unwrap();
        assert_eq!((r.paused, r.rate), (Some(true), None));
        let r = parse_hydration(br#"{"rate":1048576,"paused":false}"#).unwrap();
        assert_eq!((r.paused, r.rate), (Some(false), Some(1 << 20)));
        let r = parse_hydration(br#"{"rate_bytes_per_sec":5}"#).unwrap();
        assert_eq!(r.rate, Some(5));
        for (body, want) in [
            (&b""[..], "empty body"),
            (b"{}", "nothing to change"),
            (b"{\"paused\":null}", "nothing to change"),
            (b"{\"paused\":\"yes\"}", "invalid type"),
            (b"{\"rate\":-1}", "invalid value"),
            (b"{\"rate\":1.5}", "invalid type"),
            (b"{\"speed\":1}", "unknown field `speed`"),
            (b"{\"rate\":1", "EOF"),
            (b"[true, 5]", "expected a JSON object"),
            (
                b"{\"paused\":true,\"paused\":false}",
                "duplicate field `paused`",
            ),
            (b"{\"rate\":1} x", "trailing characters"),
        ] {
            let err = parse_hydration(body).unwrap_err();
            assert!(err.contains(want), "{body:?}: {err}");
        }
    }

    #[test]
    fn unknown_field_message() {
        // Quoted in docs/control-api.md.
        let err = parse_hydration(br#"{"paused":true,"speed":3}"#).unwrap_err();
        assert_eq!(
            err,
            "invalid body: unknown field `speed`, expected one of `paused`, `rate`, \
             `rate_bytes_per_sec` at line 1 column 22; expected a JSON object \
             {\"paused\": true|false, \"rate\": BYTES_PER_SECOND (0 = unlimited)}"
        );
    }

    #[test]
    fn actions_take_no_params() {
        parse_no_params(b"").unwrap();
        parse_no_params(b" \n").unwrap();
        parse_no_params(b"{}").unwrap();
        let err = parse_no_params(br#"{"force":true}"#).unwrap_err();
        assert!(err.contains("unknown field `force`"), "{err}");
        assert!(parse_no_params(b"nope").is_err());
    }
}
