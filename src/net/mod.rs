//! The network layer below every remote source: one way to build an HTTP(S) client from
//! the operator's options ([`HttpOptions`]: timeouts, redirect policy, HTTP/2, extra
//! headers, bearer token, trusted CAs, client certificate), one retry/backoff policy, one
//! classification of request failures, and the URL forms that keep secrets out of logs
//! and off the disk ([`redact_url`], [`identity_url`]).
//!
//! Both the raw-image HTTP source ([`crate::source::http`]) and the chunk-store fetcher
//! ([`crate::store::fetch`]) are built on it; neither imports the other's network code.

pub mod attempt;
pub mod auth;
pub mod client;
pub mod error;
pub mod options;
pub mod retry;
pub mod s3;
pub mod status;
pub mod url;

pub use auth::HttpAuth;
pub use error::{NetError, NetErrorKind};
pub use options::{HttpOptions, DEFAULT_MIN_RATE};
pub use url::{identity_url, redact_url};
