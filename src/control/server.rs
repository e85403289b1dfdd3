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
//! stalls the event loop or other connections. This module answers requests (the routes);
//! the socket, its accept loop and its lifetime are [`super::listener`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::rates::RateWindow;
use super::targets::{parse_target_urls, SecretUrls};
use super::{metrics, ControlError, ControlOps, FetchedBytes, StatusReport};

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
    TargetUrls(SecretUrls),
}

impl Action {
    fn run(self, ops: &dyn ControlOps) -> Result<String, ControlError> {
        match self {
            Action::Confirm => ops.confirm(),
            Action::Commit => ops.commit(),
            Action::Rollback => ops.rollback(),
            Action::Hydration { paused, rate } => ops.set_hydration(paused, rate),
            Action::TargetUrls(urls) => ops.set_target_urls(&urls.0),
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
    ("/v1/target-urls", Method::POST),
];

pub(super) async fn handle(shared: &Arc<Shared>, req: Request<Incoming>) -> Resp {
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
            } else if action == "/v1/target-urls" {
                parse_target_urls(&body).map(Action::TargetUrls)
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
