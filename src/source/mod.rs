//! Remote sources: where target bytes come from.
//!
//! Every source sits behind [`RemoteSource`]: a pinned, read-only image of a fixed size that
//! can be read at any byte range. The engine never learns whether the bytes came from an
//! HTTP server, a local file or a chunk store; each source verifies what it returns
//! (pinned validators, exact ranges, chunk hashes) before handing it over.

pub mod cache;
pub mod store;

mod chunk_share;

use std::fmt;

pub use crate::net::NetError;

pub mod file;
pub mod http;
pub mod http_parse;
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
    /// The server does not prove that it serves the pinned image (no pinned validator on
    /// its answers): it is not used.
    #[error("{url}: {reason}")]
    Unvalidated { url: String, reason: String },
    /// A network failure ([`NetError`]): unreachable, timed out, an HTTP error status,
    /// 401/403, TLS. A 403 on an open source is not transient (opening fails at once),
    /// but a read waits and retries it until its deadline ([`SourceError::awaits_refresh`]):
    /// a refreshed URL (`POST /v1/target-urls`) recovers.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The caller cancelled the read (its requester went away, or shutdown). Never retried.
    #[error("fetch cancelled")]
    Cancelled,
    /// The host-wide chunk cache (`--cache DIR`) cannot be used. Permanent.
    #[error("--cache")]
    Cache(#[from] cache::CacheError),
}

impl From<crate::net::s3::S3Error> for SourceError {
    fn from(e: crate::net::s3::S3Error) -> Self {
        SourceError::Net(e.into())
    }
}

impl SourceError {
    /// True when retrying the same request later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            SourceError::Net(e) => e.is_transient(),
            SourceError::Verify { .. } | SourceError::Io(_) => true,
            SourceError::NoRangeSupport { .. }
            | SourceError::Changed { .. }
            | SourceError::OutOfRange { .. }
            | SourceError::Invalid(_)
            | SourceError::Unvalidated { .. }
            | SourceError::Cache(_)
            | SourceError::Cancelled => false,
        }
    }

    /// True for an error that new URLs of the same image can cure (an expired presigned
    /// URL): reads of an open source retry it like a transient error until their deadline.
    pub fn awaits_refresh(&self) -> bool {
        matches!(self, SourceError::Net(NetError::Forbidden { .. }))
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
