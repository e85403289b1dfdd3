//! Blocking client of the control API, for the CLI (`streamboot status`, `confirm`, ...).
//!
//! Each call connects, sends one HTTP/1.1 request (hyper) and reads the answer, all under
//! a deadline, on a private single-threaded tokio runtime; so these functions must not be
//! called from inside a tokio runtime. [`ClientError::NotListening`] tells the CLI that no
//! `serve` runs on the socket, so it can act offline on the disk instead.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST};
use http::{Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// Deadline of a whole request (connect, send, answer) unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Deadline of the connect alone: a live server accepts at once.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Largest answer read (a status is a few KiB; metrics some more).
const MAX_ANSWER: usize = 8 << 20;

/// Why a call to the control API failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket (no file, or a stale socket).
    #[error("no streamboot serve is listening on {}", path.display())]
    NotListening {
        /// The socket path.
        path: PathBuf,
    },
    /// The socket exists but we may not connect.
    #[error(
        "permission denied on {}: run as the owner of the socket or a member of its group",
        path.display()
    )]
    PermissionDenied {
        /// The socket path.
        path: PathBuf,
    },
    /// No answer within the deadline.
    #[error("streamboot serve on {} did not answer within {}s", path.display(), after.as_secs_f64())]
    Timeout {
        /// The socket path.
        path: PathBuf,
        /// The deadline.
        after: Duration,
    },
    /// Connecting or talking failed.
    #[error("control socket {}: {source}", path.display())]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// The answer is not what the control API sends.
    #[error("unexpected answer from {}: {reason}", path.display())]
    Protocol {
        /// The socket path.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The server refused or failed the request (`"ok": false`).
    #[error("{message}")]
    Api {
        /// HTTP status code (400, 404, 405, 409, 413, 500).
        status: u16,
        /// The answer's `error_kind` (`conflict`, `bad_request`, `internal`, ...).
        kind: String,
        /// The answer's `error` message.
        message: String,
    },
}

impl ClientError {
    /// True when no server runs on the socket (the CLI then works offline).
    pub fn is_not_listening(&self) -> bool {
        matches!(self, ClientError::NotListening { .. })
    }

    /// True when the server refused because of the current state (HTTP 409).
    pub fn is_conflict(&self) -> bool {
        matches!(self, ClientError::Api { status: 409, .. })
    }
}

/// `GET /v1/status`: the whole status object (see [`StatusReport`](super::StatusReport)
/// for its fields, flattened, plus `"ok": true`).
pub fn get_status(socket: &Path) -> Result<Value, ClientError> {
    call_json(socket, Method::GET, "/v1/status", None, DEFAULT_TIMEOUT)
}

/// `GET /metrics`: the Prometheus exposition text.
pub fn get_metrics(socket: &Path) -> Result<String, ClientError> {
    let (status, body) = call(socket, Method::GET, "/metrics", None, DEFAULT_TIMEOUT)?;
    if status != 200 {
        return Err(api_error(socket, status, &body));
    }
    String::from_utf8(body.to_vec()).map_err(|_| protocol(socket, "metrics are not UTF-8"))
}

/// `POST` of `body` to `endpoint` (`"/v1/confirm"`, or just `"confirm"`), returning the
/// answer object when it says `"ok": true`, else [`ClientError::Api`].
pub fn post(socket: &Path, endpoint: &str, body: &Value) -> Result<Value, ClientError> {
    post_with_timeout(socket, endpoint, body, DEFAULT_TIMEOUT)
}

/// [`post`] with a deadline for the whole request.
pub fn post_with_timeout(
    socket: &Path,
    endpoint: &str,
    body: &Value,
    timeout: Duration,
) -> Result<Value, ClientError> {
    let endpoint = if endpoint.starts_with('/') {
        endpoint.to_owned()
    } else {
        format!("/v1/{endpoint}")
    };
    call_json(socket, Method::POST, &endpoint, Some(body), timeout)
}

/// `POST /v1/confirm`; returns the server's message.
pub fn confirm(socket: &Path) -> Result<String, ClientError> {
    action(socket, "/v1/confirm", &serde_json::json!({}))
}

/// `POST /v1/commit` (starts commit in the background); returns the server's message.
pub fn commit(socket: &Path) -> Result<String, ClientError> {
    action(socket, "/v1/commit", &serde_json::json!({}))
}

/// `POST /v1/rollback`; returns the server's message.
pub fn rollback(socket: &Path) -> Result<String, ClientError> {
    action(socket, "/v1/rollback", &serde_json::json!({}))
}

/// `POST /v1/hydration`: pause/resume and/or set the rate (bytes/s, 0 = unlimited).
pub fn set_hydration(
    socket: &Path,
    paused: Option<bool>,
    rate_bytes_per_sec: Option<u64>,
) -> Result<String, ClientError> {
    let mut body = serde_json::Map::new();
    if let Some(p) = paused {
        body.insert("paused".into(), p.into());
    }
    if let Some(r) = rate_bytes_per_sec {
        body.insert("rate".into(), r.into());
    }
    action(socket, "/v1/hydration", &Value::Object(body))
}

fn action(socket: &Path, endpoint: &str, body: &Value) -> Result<String, ClientError> {
    let v = post(socket, endpoint, body)?;
    Ok(v.get("message")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned())
}

fn protocol(socket: &Path, reason: impl Into<String>) -> ClientError {
    ClientError::Protocol {
        path: socket.to_path_buf(),
        reason: reason.into(),
    }
}

/// The error for a non-`ok` answer (JSON error body, or whatever else came).
fn api_error(socket: &Path, status: u16, body: &[u8]) -> ClientError {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) if v.get("ok") == Some(&Value::Bool(false)) => ClientError::Api {
            status,
            kind: v
                .get("error_kind")
                .and_then(Value::as_str)
                .unwrap_or("unknown")
                .to_owned(),
            message: v
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("request failed")
                .to_owned(),
        },
        _ => protocol(
            socket,
            format!("HTTP {status} without a control API error body"),
        ),
    }
}

fn call_json(
    socket: &Path,
    method: Method,
    endpoint: &str,
    body: Option<&Value>,
    timeout: Duration,
) -> Result<Value, ClientError> {
    let (status, bytes) = call(socket, method, endpoint, body, timeout)?;
    let v: Value = serde_json::from_slice(&bytes)
        .map_err(|e| protocol(socket, format!("HTTP {status}, body is not JSON: {e}")))?;
    match v.get("ok") {
        Some(Value::Bool(true)) if status == 200 => Ok(v),
        Some(Value::Bool(_)) => Err(api_error(socket, status, &bytes)),
        _ => Err(protocol(socket, format!("HTTP {status}, no \"ok\" field"))),
    }
}

/// One request: returns the status code and the body.
fn call(
    socket: &Path,
    method: Method,
    endpoint: &str,
    body: Option<&Value>,
    timeout: Duration,
) -> Result<(u16, Bytes), ClientError> {
    let path = socket.to_path_buf();
    let io_err = |source: io::Error| match source.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            ClientError::NotListening { path: path.clone() }
        }
        io::ErrorKind::PermissionDenied => ClientError::PermissionDenied { path: path.clone() },
        _ => ClientError::Io {
            path: path.clone(),
            source,
        },
    };
    let timed_out = || ClientError::Timeout {
        path: path.clone(),
        after: timeout,
    };
    let payload = match body {
        Some(v) => Bytes::from(serde_json::to_vec(v).expect("a JSON value always encodes")),
        None => Bytes::new(),
    };
    let mut req = Request::builder()
        .method(method)
        .uri(endpoint)
        .header(HOST, "streamboot");
    if body.is_some() {
        req = req.header(CONTENT_TYPE, "application/json");
    }
    let req = req
        .body(Full::new(payload))
        .map_err(|e| protocol(socket, format!("invalid request to {endpoint}: {e}")))?;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| ClientError::Io {
            path: path.clone(),
            source,
        })?;
    rt.block_on(async {
        let stream = tokio::time::timeout(
            CONNECT_TIMEOUT.min(timeout),
            tokio::net::UnixStream::connect(socket),
        )
        .await
        .map_err(|_| timed_out())?
        .map_err(io_err)?;
        let exchange = async {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| protocol(socket, format!("HTTP handshake: {e}")))?;
            let driver = tokio::spawn(conn);
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| protocol(socket, format!("no answer: {e}")))?;
            let status = resp.status().as_u16();
            let body = Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| protocol(socket, format!("reading the answer: {e}")))?
                .to_bytes();
            driver.abort();
            Ok::<_, ClientError>((status, body))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| timed_out())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_socket_is_not_listening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("none.sock");
        let err = get_status(&path).unwrap_err();
        assert!(err.is_not_listening(), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("no streamboot serve is listening on {}", path.display())
        );
    }

    #[test]
    fn stale_socket_is_not_listening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let err = post(&path, "confirm", &serde_json::json!({})).unwrap_err();
        assert!(err.is_not_listening(), "{err:?}");
    }

    #[test]
    fn silent_server_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("silent.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let t = std::time::Instant::now();
        let err = post_with_timeout(
            &path,
            "/v1/confirm",
            &serde_json::json!({}),
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(matches!(err, ClientError::Timeout { .. }), "{err:?}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
