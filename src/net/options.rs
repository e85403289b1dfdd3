//! [`HttpOptions`]: timeouts, redirect policy, HTTP/2, retries and credentials of every
//! HTTP(S) request streamboot makes.

use std::time::Duration;

use super::auth::HttpAuth;
use super::retry::Backoff;
use super::NetError;

/// Tuning of HTTP(S) access (raw-image sources and chunk-store fetchers). The defaults suit a guest waiting on a WAN link: fail fast
/// at open, never give up on a transient fault while serving.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpOptions {
    /// Limit for establishing one TCP (and TLS) connection.
    pub connect_timeout: Duration,
    /// Stall limit of one request: the longest wait for the response headers, and then for
    /// each further piece of the body. A slow but steady transfer never hits it; a stalled
    /// connection is abandoned and the range retried (on the next mirror if any).
    pub request_timeout: Duration,
    /// Slowest transfer rate (bytes per second) an attempt is granted: the total budget of
    /// one attempt for `len` bytes is `max(request_timeout, len / min_rate)`
    /// ([`HttpOptions::attempt_budget`]). Bytes received before the budget ran out are kept.
    pub min_rate: u64,
    /// Follow redirects to another origin (scheme, host or port) than the URL given. A
    /// redirect from https to http is refused even then.
    pub allow_cross_origin_redirects: bool,
    /// Retries of the probe of each mirror at open, after the first attempt. Small, so a bad
    /// URL or a dead server is reported quickly.
    pub open_retries: u32,
    /// How long one `read_at` may keep retrying transient errors. `None`: retry forever
    /// (the guest's request waits for the network to come back). The bound is approximate:
    /// an attempt already running when it passes can take up to its budget more
    /// ([`HttpOptions::attempt_budget`]).
    pub deadline: Option<Duration>,
    /// First backoff delay after a full round of mirrors failed (doubles each round).
    pub backoff_base: Duration,
    /// Largest backoff delay.
    pub backoff_max: Duration,
    /// Allow HTTP/2 when a TLS server offers it. Off by default: over one connection,
    /// HTTP/2 flow control tends to cap bulk throughput below several HTTP/1.1 connections.
    pub http2: bool,
    /// Extra headers, bearer token, trusted CAs and client certificate.
    pub auth: HttpAuth,
    /// Host-wide chunk cache the target is read through (`--cache`; see docs/cache.md).
    pub cache: Option<CacheConfig>,
    /// Endpoint, region, addressing and profile of `s3://` targets and stores (docs/s3.md).
    pub s3: super::s3::S3Options,
}

/// Default [`HttpOptions::min_rate`]: 64 KiB/s (a 4 MiB range gets 64 s).
pub const DEFAULT_MIN_RATE: u64 = 64 << 10;

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            min_rate: DEFAULT_MIN_RATE,
            allow_cross_origin_redirects: false,
            open_retries: 2,
            deadline: None,
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
            http2: false,
            auth: HttpAuth::default(),
            cache: None,
            s3: super::s3::S3Options::default(),
        }
    }
}

impl HttpOptions {
    /// Checks the options before anything is read or connected.
    pub fn validate(&self) -> Result<(), NetError> {
        if self.connect_timeout.is_zero() || self.request_timeout.is_zero() {
            return Err(NetError::Invalid(
                "HTTP options: connect_timeout and request_timeout must be non-zero".into(),
            ));
        }
        if self.min_rate == 0 {
            return Err(NetError::Invalid(
                "HTTP options: min_rate must be non-zero".into(),
            ));
        }
        if self.backoff_base.is_zero() || self.backoff_max < self.backoff_base {
            return Err(NetError::Invalid(
                "HTTP options: backoff_base must be non-zero and at most backoff_max".into(),
            ));
        }
        self.auth.validate()
    }

    /// Total time one attempt to fetch `len` bytes may take:
    /// `max(request_timeout, len / min_rate)`.
    pub fn attempt_budget(&self, len: u64) -> Duration {
        let transfer = Duration::from_millis(len.saturating_mul(1000) / self.min_rate.max(1));
        self.request_timeout.max(transfer)
    }

    /// The backoff between rounds of retries.
    pub fn backoff(&self) -> Backoff {
        Backoff {
            base: self.backoff_base,
            max: self.backoff_max,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_validation() {
        assert!(HttpOptions::default().validate().is_ok());
        let zero = HttpOptions {
            request_timeout: Duration::ZERO,
            ..HttpOptions::default()
        };
        assert!(zero.validate().is_err());
        let inverted = HttpOptions {
            backoff_base: Duration::from_secs(5),
            backoff_max: Duration::from_secs(1),
            ..HttpOptions::default()
        };
        assert!(inverted.validate().is_err());
        let no_rate = HttpOptions {
            min_rate: 0,
            ..HttpOptions::default()
        };
        assert!(no_rate.validate().is_err());
    }

    #[test]
    fn attempt_budget_grows_with_the_range() {
        let opts = HttpOptions {
            request_timeout: Duration::from_secs(30),
            min_rate: 64 << 10,
            ..HttpOptions::default()
        };
        assert_eq!(opts.attempt_budget(1), Duration::from_secs(30));
        assert_eq!(opts.attempt_budget(4 << 20), Duration::from_secs(64));
        assert_eq!(
            opts.attempt_budget(u64::MAX),
            Duration::from_millis(u64::MAX / (64 << 10))
        );
    }
}

/// Where the host-wide chunk cache (`--cache`, `crate::source::cache`) lives and how large
/// it may grow. Plain settings carried with the network options, so that every command
/// reaching a target gets them; the cache itself sits in the source layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheConfig {
    /// Cache directory (created with mode 0700 if missing).
    pub dir: std::path::PathBuf,
    /// Size cap in bytes of the entries: the least recently used go beyond it.
    pub max_bytes: u64,
}
