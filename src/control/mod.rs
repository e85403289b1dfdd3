//! The control API of `streamboot serve`: HTTP/1.1 + JSON over a private unix socket.
//!
//! The API is independent of the data path (vhost-user-blk) and of how `serve` is wired:
//! `serve` implements [`ControlOps`] over whatever it runs (the streaming engine, the
//! source after a fallback, a plain disk after commit) and hands it to a
//! [`ControlServer`]. The server adds what no single snapshot can give — fetch rates over
//! a sliding window and an ETA — and renders Prometheus metrics.
//!
//! Module map:
//! - [`server`]: socket creation, HTTP routing, JSON and metrics responses, shutdown.
//! - [`client`]: blocking calls for the CLI (`status`, `confirm`, `commit`, ...).
//! - [`metrics`]: the Prometheus (OpenMetrics) exposition of a [`StatusReport`].
//! - [`metrics_http`]: the optional read-only TCP listener for `GET /metrics`.
//! - [`notify`]: background webhook posts (`--notify URL`) for state changes.
//! - `rates`: the sliding-window rate estimator.
//!
//! The wire format is documented in `docs/control-api.md`.

pub mod client;
mod http_serve;
mod listener;
pub mod metrics;
pub mod metrics_http;
pub mod notify;
mod rates;
pub mod server;
mod targets;

use serde::Serialize;

use crate::engine::Status;

pub use client::ClientError;
pub use listener::{BindError, ControlHandle, ControlServer};
pub use metrics_http::MetricsHandle;
pub use notify::{Notifier, NotifyError, NotifyOptions};

/// What `serve` is presenting to the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ServeMode {
    /// The target image, streamed by the engine.
    Target,
    /// The source image (after a fallback or a rollback).
    Source,
    /// A disk served as it is, no migration running (after commit).
    Plain,
}

impl ServeMode {
    /// The name used on the wire and in metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ServeMode::Target => "target",
            ServeMode::Source => "source",
            ServeMode::Plain => "plain",
        }
    }
}

/// The background hydrator, as the control API shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HydrationStatus {
    /// Paused by the operator.
    pub paused: bool,
    /// Rate limit in bytes per second; 0 means unlimited.
    pub rate_bytes_per_sec: u64,
    /// Every target chunk is local (or no hydration applies in this mode).
    pub done: bool,
}

/// One snapshot of what `serve` knows: engine status plus serving information.
///
/// Returned by [`ControlOps::status`]; the server wraps it into a [`StatusReport`].
#[derive(Clone, Debug, Serialize)]
pub struct ServeStatus {
    /// The engine's view of the migration (a default value when no engine runs, in
    /// [`ServeMode::Plain`]).
    #[serde(flatten)]
    pub engine: Status,
    /// What is being served.
    pub mode: ServeMode,
    /// A VMM is connected to the block device socket.
    pub vm_connected: bool,
    /// The background hydrator.
    pub hydration: HydrationStatus,
    /// The last error worth an operator's attention (a failed fetch, a full area, a
    /// failed commit), if any.
    pub last_error: Option<String>,
}

/// Bytes fetched so far, read cheaply (atomics, no locks) for rate sampling.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FetchedBytes {
    /// Fetched because the guest needed them.
    pub demand: u64,
    /// Fetched by the background hydrator.
    pub background: u64,
}

/// Fetch rates over a recent window, computed by the server from successive samples.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Rates {
    /// Bytes per second fetched on demand.
    pub demand_bytes_per_sec: f64,
    /// Bytes per second fetched in the background.
    pub background_bytes_per_sec: f64,
    /// Seconds the rates were measured over (about 10 when sampled steadily; 0 when
    /// there is not yet a second sample, and the rates are then 0).
    pub window_secs: f64,
}

/// The full answer of `GET /v1/status` (flattened into the response object).
#[derive(Clone, Debug, Serialize)]
pub struct StatusReport {
    /// What `serve` reported.
    #[serde(flatten)]
    pub serve: ServeStatus,
    /// Recent fetch rates.
    pub rates: Rates,
    /// Estimated seconds until every chunk is local at the current total fetch rate;
    /// `Some(0.0)` when nothing is missing, `None` when nothing is being fetched.
    pub eta_secs: Option<f64>,
}

impl StatusReport {
    /// Combines a snapshot with rates; computes the ETA from missing bytes and rates.
    pub fn new(serve: ServeStatus, rates: Rates) -> Self {
        let missing_bytes = serve
            .engine
            .chunks_missing
            .saturating_mul(serve.engine.chunk_size);
        let rate = rates.demand_bytes_per_sec + rates.background_bytes_per_sec;
        let eta_secs = if missing_bytes == 0 {
            Some(0.0)
        } else if rate > 0.0 {
            Some(missing_bytes as f64 / rate)
        } else {
            None
        };
        Self {
            serve,
            rates,
            eta_secs,
        }
    }
}

/// Why an operation was refused; decides the HTTP status of the answer.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Not allowed in the current state (wrong migration state, a VM is connected, an
    /// operation already running). HTTP 409.
    #[error("{0}")]
    Conflict(String),
    /// The request itself is wrong (bad value). HTTP 400.
    #[error("{0}")]
    BadRequest(String),
    /// The operation was allowed but failed. HTTP 500.
    #[error("{0}")]
    Internal(String),
}

impl ControlError {
    /// The HTTP status code this error is answered with.
    pub fn http_status(&self) -> u16 {
        match self {
            ControlError::Conflict(_) => 409,
            ControlError::BadRequest(_) => 400,
            ControlError::Internal(_) => 500,
        }
    }

    /// The short machine-readable kind sent as `"error_kind"`.
    pub fn kind(&self) -> &'static str {
        match self {
            ControlError::Conflict(_) => "conflict",
            ControlError::BadRequest(_) => "bad_request",
            ControlError::Internal(_) => "internal",
        }
    }
}

/// What `serve` implements so the control API can observe and steer it.
///
/// Methods other than [`fetched_bytes`](Self::fetched_bytes) run on a blocking thread
/// pool, so they may do disk I/O; each returns a human-readable message on success.
/// Operations that take long (commit) must start in the background and return at once.
pub trait ControlOps: Send + Sync + 'static {
    /// A snapshot for `GET /v1/status` and `GET /metrics`.
    fn status(&self) -> ServeStatus;

    /// Bytes fetched so far (demand and background). Called about once a second from the
    /// server's event loop to measure rates, so it must be cheap and never block: read
    /// counters, take no lock that I/O holds. Zeros when nothing is fetched in this mode.
    fn fetched_bytes(&self) -> FetchedBytes;

    /// Marks the target good (`trial` -> `confirmed`).
    fn confirm(&self) -> Result<String, ControlError>;

    /// Starts commit in the background and returns at once.
    fn commit(&self) -> Result<String, ControlError>;

    /// Rolls back to the source. The implementation refuses with
    /// [`ControlError::Conflict`] while a VM is connected or after commit started.
    fn rollback(&self) -> Result<String, ControlError>;

    /// Pauses/resumes hydration and/or changes its rate limit (bytes/s, 0 = unlimited).
    /// At least one of the two is `Some` (the server checks).
    fn set_hydration(
        &self,
        paused: Option<bool>,
        rate_bytes_per_sec: Option<u64>,
    ) -> Result<String, ControlError>;

    /// Replaces the target's URLs (`POST /v1/target-urls`) after checking that they serve
    /// the pinned image; refused (nothing changed) otherwise. The URLs carry secrets:
    /// never log or echo them unredacted.
    fn set_target_urls(&self, _urls: &[String]) -> Result<String, ControlError> {
        Err(ControlError::Conflict(
            "the target's URLs cannot be replaced here".into(),
        ))
    }
}
