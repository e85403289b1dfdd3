//! Remote sources: where target bytes come from.
//!
//! Every source sits behind [`RemoteSource`]: a pinned, read-only image of a fixed size that
//! can be read at any byte range. The engine never learns whether the bytes came from an
//! HTTP server, a local file or a chunk store; each source verifies what it returns
//! (pinned validators, exact ranges, chunk hashes) before handing it over.

pub mod store;

mod chunk_share;

use std::fmt;

pub mod file;
pub mod http;
pub mod http_parse;
pub mod retry;
pub mod s3;

pub use file::FileSource;
pub use http::{HttpAuth, HttpOptions, HttpSource};
pub use tokio_util::sync::CancellationToken;

/// What pins a remote image: a migration refuses to continue when this changes.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct SourceIdentity {
    /// Kind of source: "http", "file" or "store".
    pub kind: String,
    /// Exact size of the image in bytes.
    pub size: u64,
    /// Strong validator of the content: an HTTP ETag, a file's mtime+inode, an index hash.
    pub validator: String,
}

impl fmt::Display for SourceIdentity {
    /// `kind size=N validator`: short enough for a log line or an error message.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} size={} {}", self.kind, self.size, self.validator)
    }
}

/// Errors a source reports. `is_transient` tells the engine whether a retry can help.
///
/// Every variant names the URL or path involved so that an operator can act on the message
/// alone. On any error, the caller's buffer holds unspecified bytes and must not be used.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The server could not be reached at all (DNS failure, connection refused or reset
    /// before a response). Transient: the network or the server may come back.
    #[error("cannot reach {url}: {reason}")]
    Unreachable { url: String, reason: String },
    /// The server answered with an unexpected HTTP status. Transient only for the statuses
    /// that mean "try again later" (408, 429, 5xx gateway/availability errors).
    #[error("{url}: server answered HTTP {status}")]
    Status { url: String, status: u16 },
    /// The server ignores `Range` (answers 200 with the whole file). Permanent: streaming
    /// needs random access.
    #[error("{url}: server does not support byte-range requests")]
    NoRangeSupport { url: String },
    /// The pinned image is no longer what the source serves (validator, size or content
    /// changed). Permanent: continuing would mix bytes of two images.
    #[error("{url}: the image changed on the server (was {expected}, now {found}); stopping")]
    Changed {
        url: String,
        expected: String,
        found: String,
    },
    /// A response that breaks the protocol contract (wrong `Content-Range`, wrong length,
    /// encoded body). Treated as transient: another attempt or mirror may answer properly,
    /// and the bad bytes are never handed over.
    #[error("{url}: bad response: {reason}")]
    BadResponse { url: String, reason: String },
    /// A transfer broke off after the response started (connection reset, truncated body).
    /// Transient; bytes received before the break are kept and the rest is requested again.
    #[error("{url}: transfer failed: {reason}")]
    Transfer { url: String, reason: String },
    /// No progress within the configured time (connect, response headers or body stall).
    #[error("{url}: timed out after {secs} s")]
    Timeout { url: String, secs: u64 },
    /// The caller asked for bytes outside the image. A bug in the caller, never retried.
    #[error("read {offset}+{len} is outside the image ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// Fetched bytes did not match their expected hash (chunk stores).
    #[error("verification failed for {what}: {reason}")]
    Verify { what: String, reason: String },
    /// The source description itself is unusable (bad URL, unpinnable image, mirrors that
    /// disagree, a path that is not a regular file). Permanent.
    #[error("invalid source {0}")]
    Invalid(String),
    /// Local I/O failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The server refused the request for lack of (valid) credentials: HTTP 401/403.
    /// Permanent until the operator gives a working URL or credentials.
    #[error("{url}: server answered HTTP {status}: {hint}")]
    Unauthorized {
        url: String,
        status: u16,
        hint: &'static str,
    },
    /// A redirect leaves the origin (or downgrades https to http) without permission.
    #[error("{url}: {reason}")]
    RedirectRefused { url: String, reason: String },
    /// The server does not prove that it serves the pinned image (no pinned validator on
    /// its answers): it is not used.
    #[error("{url}: {reason}")]
    Unvalidated { url: String, reason: String },
    /// TLS failed: the server's certificate is not trusted, or the server refused ours (or
    /// wants one). Permanent until the operator gives the CA or the client certificate.
    #[error("{url}: TLS: {reason}")]
    Tls { url: String, reason: String },
    /// HTTP 403 on a request for a pinned image: a presigned URL that expired, or access
    /// withdrawn. Not transient (opening fails at once), but a read of an open source
    /// waits and retries until its deadline ([`SourceError::awaits_refresh`]): a refreshed
    /// URL (`POST /v1/target-urls`) recovers.
    #[error("{url}: server answered HTTP 403: expired or forbidden: {hint}")]
    Forbidden { url: String, hint: &'static str },
    /// The caller cancelled the read (its requester went away, or shutdown). Never retried.
    #[error("fetch cancelled")]
    Cancelled,
    /// S3 object storage (`s3://`) refused or failed a request.
    #[error(transparent)]
    S3(s3::S3Error),
}

impl SourceError {
    /// True when retrying the same request later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            SourceError::Unreachable { .. }
            | SourceError::Timeout { .. }
            | SourceError::BadResponse { .. }
            | SourceError::Transfer { .. }
            | SourceError::Verify { .. } => true,
            SourceError::Status { status, .. } => {
                matches!(*status, 408 | 429 | 500 | 502 | 503 | 504)
            }
            SourceError::Io(_) => true,
            SourceError::S3(e) => e.is_transient(),
            SourceError::NoRangeSupport { .. }
            | SourceError::Changed { .. }
            | SourceError::OutOfRange { .. }
            | SourceError::Invalid(_)
            | SourceError::Unauthorized { .. }
            | SourceError::RedirectRefused { .. }
            | SourceError::Unvalidated { .. }
            | SourceError::Tls { .. }
            | SourceError::Forbidden { .. }
            | SourceError::Cancelled => false,
        }
    }

    /// True for an error that new URLs of the same image can cure (an expired presigned
    /// URL): reads of an open source retry it like a transient error until their deadline.
    pub fn awaits_refresh(&self) -> bool {
        matches!(self, SourceError::Forbidden { .. })
    }
}

/// A pinned, read-only remote image.
pub trait RemoteSource: Send + Sync + fmt::Debug {
    /// Identity pinned when the source was opened.
    fn identity(&self) -> &SourceIdentity;

    /// Size of the image in bytes.
    fn size(&self) -> u64 {
        self.identity().size
    }

    /// Fills `buf` with the image bytes at `[offset, offset + buf.len())`, which must lie
    /// inside the image. Returns only verified bytes of the pinned image. Blocking; may
    /// be called from many threads at once (the source keeps several requests in flight).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError>;

    /// [`Self::read_at`] that gives up with [`SourceError::Cancelled`] once `cancel` fires
    /// (retries and waits included). Sources that talk to a network override it; the
    /// default checks the token before reading and is meant for local sources.
    fn read_at_cancellable(
        &self,
        offset: u64,
        buf: &mut [u8],
        cancel: &CancellationToken,
    ) -> Result<(), SourceError> {
        if cancel.is_cancelled() {
            return Err(SourceError::Cancelled);
        }
        self.read_at(offset, buf)
    }

    /// Tells whether `[offset, offset+len)` is known to be all zeros without fetching it
    /// (a chunk store's index knows; a raw HTTP image does not: `None`).
    fn known_zero(&self, _offset: u64, _len: u64) -> Option<bool> {
        None
    }

    /// Replaces the URLs the image is fetched from while it is in use (a refreshed
    /// presigned URL), after checking that they serve the pinned image (same identity);
    /// otherwise nothing changes. Sources without replaceable URLs refuse.
    fn replace_urls(&self, _urls: &[String]) -> Result<(), SourceError> {
        Err(SourceError::Invalid(format!(
            "{}: the location of this target cannot be replaced while serving",
            self.name()
        )))
    }

    /// A short human-readable name for logs (URL or path).
    fn name(&self) -> String;
}

/// Checks that `[offset, offset+len)` lies inside an image of `size` bytes.
pub fn check_range(offset: u64, len: usize, size: u64) -> Result<(), SourceError> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(SourceError::OutOfRange {
            offset,
            len: len as u64,
            size,
        }),
    }
}
