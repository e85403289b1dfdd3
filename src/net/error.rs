//! [`NetError`]: the one classification of network failures, shared by every source and
//! fetcher. Every variant names the URL involved in its [`super::redact_url`] form.

/// What a caller can do about a [`NetError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetErrorKind {
    /// Trying again later may succeed (connection failure, timeout, 5xx, broken body).
    Transient,
    /// The object does not exist (HTTP 404, a missing file in a local store).
    NotFound,
    /// HTTP 403: access withdrawn or a presigned URL expired; new URLs can cure it.
    Forbidden,
    /// HTTP 401: the server wants (other) credentials.
    Unauthorized,
    /// TLS failed: an untrusted server certificate, or a client certificate missing/refused.
    Tls,
    /// Unusable as given (bad URL or option, unexpected status, refused redirect).
    Invalid,
}

/// A failed network (or store file) access.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The server could not be reached (DNS, connection refused or reset before a response).
    #[error("cannot reach {url}: {reason}")]
    Unreachable { url: String, reason: String },
    /// An unexpected HTTP status. Transient only for 408, 429 and 500/502/503/504.
    #[error("{url}: server answered HTTP {status}")]
    Status { url: String, status: u16 },
    /// The object is not there: HTTP 404 (`http`), or a missing file of a local store.
    #[error("{url}: {}", if *.http { "server answered HTTP 404 (not found)" } else { "not in the store" })]
    NotFound { url: String, http: bool },
    /// A response that breaks the protocol contract (wrong range or length, too large,
    /// encoded body). Transient: another attempt may answer properly.
    #[error("{url}: bad response: {reason}")]
    BadResponse { url: String, reason: String },
    /// The transfer broke off after the response started. Transient.
    #[error("{url}: transfer failed: {reason}")]
    Transfer { url: String, reason: String },
    /// No progress within the configured time (connect, headers or body stall).
    #[error("{url}: timed out after {secs} s")]
    Timeout { url: String, secs: u64 },
    /// HTTP 401: no (valid) credentials; the hint names the option to give.
    #[error("{url}: server answered HTTP {status}: {hint}")]
    Unauthorized {
        url: String,
        status: u16,
        hint: &'static str,
    },
    /// HTTP 403: a presigned URL that expired, or access withdrawn.
    #[error("{url}: server answered HTTP 403: expired or forbidden: {hint}")]
    Forbidden { url: String, hint: &'static str },
    /// A redirect leaves the origin (or downgrades https to http) without permission.
    #[error("{url}: {reason}")]
    RedirectRefused { url: String, reason: String },
    /// TLS failed; the reason says which option fixes it (`--cacert`, `--client-cert`).
    #[error("{url}: TLS: {reason}")]
    Tls { url: String, reason: String },
    /// An unusable URL, option, credential file or client setup. Permanent.
    #[error("invalid source {0}")]
    Invalid(String),
    /// Local I/O failed (a store directory).
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// S3 object storage (`s3://`) refused or failed a request.
    #[error(transparent)]
    S3(#[from] super::s3::S3Error),
}

impl NetError {
    /// What the failure means for the caller.
    pub fn kind(&self) -> NetErrorKind {
        match self {
            NetError::Unreachable { .. }
            | NetError::BadResponse { .. }
            | NetError::Transfer { .. }
            | NetError::Timeout { .. }
            | NetError::Io(_) => NetErrorKind::Transient,
            NetError::Status { status, .. } => {
                if matches!(*status, 408 | 429 | 500 | 502 | 503 | 504) {
                    NetErrorKind::Transient
                } else {
                    NetErrorKind::Invalid
                }
            }
            NetError::NotFound { .. } => NetErrorKind::NotFound,
            NetError::Unauthorized { .. } => NetErrorKind::Unauthorized,
            NetError::Forbidden { .. } => NetErrorKind::Forbidden,
            NetError::Tls { .. } => NetErrorKind::Tls,
            NetError::RedirectRefused { .. } | NetError::Invalid(_) => NetErrorKind::Invalid,
            NetError::S3(e) => e.kind(),
        }
    }

    /// True when retrying the same request later may succeed.
    pub fn is_transient(&self) -> bool {
        self.kind() == NetErrorKind::Transient
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds() {
        let url = || "http://h/x".to_string();
        let status = |status| NetError::Status { url: url(), status };
        assert!(status(503).is_transient() && status(429).is_transient());
        assert_eq!(status(400).kind(), NetErrorKind::Invalid);
        let nf = NetError::NotFound {
            url: url(),
            http: true,
        };
        assert_eq!(nf.kind(), NetErrorKind::NotFound);
        assert!(nf.to_string().contains("404"), "{nf}");
        let forbidden = NetError::Forbidden {
            url: url(),
            hint: "h",
        };
        assert_eq!(forbidden.kind(), NetErrorKind::Forbidden);
    }
}
