//! A raw image behind any HTTP(S) server that supports `Range` (nginx, Apache, S3-style
//! object stores), with optional mirrors.
//!
//! # Pinning
//! [`HttpSource::open`] probes every mirror with `GET` + `Range: bytes=0-0` (not `HEAD`:
//! some servers and caches answer `HEAD` differently from `GET`, and the probe must prove
//! that ranges really work). The answer fixes the image size (`Content-Range` total) and the
//! validator: the strong `ETag` when there is one, otherwise `lm:` + `Last-Modified`. An image
//! with neither cannot be pinned and is refused. Reopening a pinned image uses the kind of
//! validator recorded then. All reachable mirrors must send that kind of validator (a mirror
//! that does not is refused, saying so) and report the same identity.
//!
//! Every later range request carries the validator as a precondition (`If-Match`, or
//! `If-Unmodified-Since`) and every response is checked before one byte reaches the caller:
//! status 206, `Content-Range` exactly the requested range with the pinned total, no content
//! coding, the validator echoed unchanged, and the body exactly as long as requested. A
//! changed image (412, a different validator or total) is [`SourceError::Changed`], which is
//! permanent: the migration stops rather than mixing two images.
//!
//! The echoed validator is required, not only compared: a server that ignores `If-Match`
//! and drops `ETag` could serve a replaced image unnoticed. A mirror that answers a range
//! request without the pinned validator is refused for the rest of the source's life (a
//! warning says why); the other mirrors carry on, and when none is left every read fails
//! with [`SourceError::Unvalidated`] naming the missing header.
//!
//! # Redirects and secrets
//! Redirects are followed only within the origin (scheme, host, port) of the URL given; a
//! redirect to another origin needs [`HttpOptions::allow_cross_origin_redirects`], and one
//! from https to http is always refused. No `Referer` is sent. URLs appear in errors and
//! logs only in their [`redact_url`] form (no userinfo, no query string).
//!
//! # Credentials and TLS
//! [`HttpAuth`] adds request headers (values marked sensitive, never shown), a bearer token
//! read from a file (read again after a 401, and the request retried once), trusted CAs,
//! the OS store and a client certificate (`auth.rs`). A 403 is
//! [`SourceError::Forbidden`] ("expired or forbidden"): opening fails at once, a read
//! waits for new URLs ([`RemoteSource::replace_urls`], `mirrors.rs`) until its deadline.
//!
//! # Threads and I/O
//! The source owns a small multi-thread tokio runtime (2 workers) that drives the pooled
//! connections (HTTP/1.1 keep-alive). [`RemoteSource::read_at`] runs the request future on
//! the caller's own thread with `Handle::block_on`, so N blocking callers keep N requests in
//! flight, and the response body is copied straight from the network buffers into the
//! caller's slice, with no intermediate whole-body buffer.
//!
//! # Faults
//! Each attempt has a stall limit ([`HttpOptions::request_timeout`], the longest wait for
//! any piece of the answer) and a total budget ([`HttpOptions::attempt_budget`]: at least
//! `request_timeout`, more for long ranges at [`HttpOptions::min_rate`]), so a server
//! dripping a byte now and then cannot hold an attempt forever: it ends as
//! [`SourceError::Timeout`] and the retry logic below takes over (the next mirror, or, with
//! a deadline, an error once it passed).
//!
//! Transient errors ([`SourceError::is_transient`]) are retried: the next mirror at once,
//! then, after a full round of mirrors failed, with exponential backoff and jitter. Reads keep
//! retrying until [`HttpOptions::deadline`] (default: forever, the guest waits); bytes received
//! before a connection broke are kept and only the rest is requested again. Permanent errors
//! return at once. Opening retries only [`HttpOptions::open_retries`] times, so that a wrong
//! URL fails fast.

mod attempt;
mod auth;
mod check;
mod mirrors;
mod probe;
mod read;
pub mod url;

use std::fmt;
use std::future::Future;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use parking_lot::RwLock;
use reqwest::{Client, Url};
use tokio::runtime::{Handle, Runtime, RuntimeFlavor};
use tokio::sync::Notify;

use self::attempt::chain;
use self::auth::Auth;
pub use self::auth::HttpAuth;
use self::mirrors::MirrorSet;
use self::probe::{pin_mirrors, probe_with_retries};
pub use self::url::{identity_url, redact_url};
use super::retry::Backoff;
use super::{check_range, RemoteSource, SourceError, SourceIdentity};

/// Kind string of [`HttpSource`] identities.
pub const HTTP_KIND: &str = "http";

/// Prefix of a validator taken from `Last-Modified` (when the server sends no strong ETag).
pub const LAST_MODIFIED_PREFIX: &str = "lm:";

/// Tuning of an [`HttpSource`]. The defaults suit a guest waiting on a WAN link: fail fast
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
    /// Endpoint, region, addressing and profile of `s3://` targets (docs/s3.md).
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
            s3: super::s3::S3Options::default(),
        }
    }
}

impl HttpOptions {
    fn validate(&self) -> Result<(), SourceError> {
        if self.connect_timeout.is_zero() || self.request_timeout.is_zero() {
            return Err(SourceError::Invalid(
                "HTTP options: connect_timeout and request_timeout must be non-zero".into(),
            ));
        }
        if self.min_rate == 0 {
            return Err(SourceError::Invalid(
                "HTTP options: min_rate must be non-zero".into(),
            ));
        }
        if self.backoff_base.is_zero() || self.backoff_max < self.backoff_base {
            return Err(SourceError::Invalid(
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

    fn backoff(&self) -> Backoff {
        Backoff {
            base: self.backoff_base,
            max: self.backoff_max,
        }
    }
}

/// One URL of the image.
struct Mirror {
    url: Url,
    /// The URL as shown in logs and errors ([`redact_url`]: no userinfo, no query).
    shown: String,
    /// The URL carries a userinfo or a query string.
    has_secrets: bool,
}

impl Mirror {
    fn parse(raw: &str) -> Result<Self, SourceError> {
        let shown = redact_url(raw.trim());
        let url = Url::parse(raw.trim())
            .map_err(|e| SourceError::Invalid(format!("{shown:?}: not a URL ({e})")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(SourceError::Invalid(format!(
                "{shown:?}: scheme {:?} not supported (use http:// or https://)",
                url.scheme()
            )));
        }
        if url.host_str().is_none_or(|h| h.is_empty()) {
            return Err(SourceError::Invalid(format!("{shown:?}: URL has no host")));
        }
        Ok(Mirror {
            has_secrets: url::has_secrets(&url),
            url,
            shown,
        })
    }
}

/// What the source was pinned to, sent as a precondition with every range request.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Pin {
    /// A strong ETag, verbatim (quotes included): sent as `If-Match`.
    ETag(String),
    /// A `Last-Modified` date, verbatim: sent as `If-Unmodified-Since`.
    LastModified(String),
}

impl Pin {
    fn validator(&self) -> String {
        match self {
            Pin::ETag(etag) => etag.clone(),
            Pin::LastModified(date) => format!("{LAST_MODIFIED_PREFIX}{date}"),
        }
    }
}

/// A pinned raw image served over HTTP(S) by one or more mirrors. See the module docs.
pub struct HttpSource {
    /// Owned runtime; `None` only during drop.
    runtime: Option<Runtime>,
    handle: Handle,
    inner: Inner,
}

/// Everything the async request code needs (kept apart from the runtime that runs it).
struct Inner {
    client: Client,
    auth: Auth,
    /// The URLs in use; replaced as a whole by [`HttpSource::replace_urls`].
    set: RwLock<Arc<MirrorSet>>,
    /// Wakes reads waiting out a backoff when the URLs were replaced.
    replaced: Notify,
    identity: SourceIdentity,
    pin: Pin,
    opts: HttpOptions,
    /// Mirror to try first; moves on when it fails.
    preferred: AtomicUsize,
}

impl fmt::Debug for HttpSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpSource")
            .field(
                "mirrors",
                &self
                    .inner
                    .mirror_set()
                    .mirrors
                    .iter()
                    .map(|m| m.shown.as_str())
                    .collect::<Vec<_>>(),
            )
            .field("identity", &self.inner.identity)
            .field("opts", &self.inner.opts)
            .finish()
    }
}

impl HttpSource {
    /// Opens and pins the image served at `urls` (several URLs are mirrors of the same
    /// image).
    ///
    /// Fails with [`SourceError::Invalid`] for an unusable URL or option, an image that
    /// cannot be pinned, or mirrors that serve different images;
    /// [`SourceError::NoRangeSupport`] when a server ignores `Range`; [`SourceError::Status`]
    /// for an error status (404...); [`SourceError::Changed`] when `expected` is given and
    /// the image differs from it. Mirrors that are unreachable at open are tolerated (and
    /// used later on failover, guarded by the pinned validator) as long as one mirror
    /// answers; if none does, the first mirror's error is returned.
    pub fn open(
        urls: &[String],
        expected: Option<&SourceIdentity>,
        opts: HttpOptions,
    ) -> Result<Self, SourceError> {
        if urls.is_empty() {
            return Err(SourceError::Invalid("no URL given for the image".into()));
        }
        opts.validate()?;
        let mirrors = urls
            .iter()
            .map(|u| Mirror::parse(u))
            .collect::<Result<Vec<_>, _>>()?;
        let client = build_client(&opts)?;
        let auth = Auth::new(&opts.auth)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("streamboot-http")
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();

        let probes = block_on(
            &handle,
            join_all(
                mirrors
                    .iter()
                    .map(|m| probe_with_retries(&client, &auth, &opts, m)),
            ),
        );
        let (first_ok, size, pin) = pin_mirrors(&mirrors, probes, expected)?;
        let identity = SourceIdentity {
            kind: HTTP_KIND.to_string(),
            size,
            validator: pin.validator(),
        };
        if let Some(expected) = expected {
            if *expected != identity {
                return Err(SourceError::Changed {
                    url: mirrors[first_ok].shown.clone(),
                    expected: expected.to_string(),
                    found: identity.to_string(),
                });
            }
        }
        tracing::debug!(url = %mirrors[first_ok].shown, %identity, "pinned HTTP source");
        Ok(HttpSource {
            runtime: Some(runtime),
            handle,
            inner: Inner {
                client,
                auth,
                set: RwLock::new(Arc::new(MirrorSet::new(mirrors))),
                replaced: Notify::new(),
                identity,
                pin,
                opts,
                preferred: AtomicUsize::new(first_ok),
            },
        })
    }

    /// The mirrors' URLs as shown in logs ([`redact_url`]), in the order given.
    pub fn urls(&self) -> Vec<String> {
        let set = self.inner.mirror_set();
        set.mirrors.iter().map(|m| m.shown.clone()).collect()
    }

    /// The options the source was opened with.
    pub fn options(&self) -> &HttpOptions {
        &self.inner.opts
    }
}

impl Drop for HttpSource {
    fn drop(&mut self) {
        // Dropping a runtime blocks until its tasks end, which panics inside an async
        // context; nothing of ours needs a graceful end (idle pooled connections).
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl RemoteSource for HttpSource {
    fn identity(&self) -> &SourceIdentity {
        &self.inner.identity
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        check_range(offset, buf.len(), self.inner.identity.size)?;
        if buf.is_empty() {
            return Ok(());
        }
        block_on(&self.handle, self.inner.read_range(offset, buf))
    }

    fn read_at_cancellable(
        &self,
        offset: u64,
        buf: &mut [u8],
        cancel: &super::CancellationToken,
    ) -> Result<(), SourceError> {
        check_range(offset, buf.len(), self.inner.identity.size)?;
        if buf.is_empty() {
            return Ok(());
        }
        block_on(&self.handle, async {
            tokio::select! {
                r = self.inner.read_range(offset, buf) => r,
                () = cancel.cancelled() => Err(SourceError::Cancelled),
            }
        })
    }

    fn replace_urls(&self, urls: &[String]) -> Result<(), SourceError> {
        block_on(&self.handle, self.inner.replace_urls(urls))
    }

    fn name(&self) -> String {
        let set = self.inner.mirror_set();
        let first = &set.mirrors[0].shown;
        match set.mirrors.len() {
            1 => first.clone(),
            n => format!("{first} (+{} mirrors)", n - 1),
        }
    }
}

/// Runs `fut` to completion on the calling thread, with `handle`'s runtime driving I/O and
/// timers.
///
/// From a plain thread (the normal case) this is `Handle::block_on`. From inside a
/// multi-thread tokio runtime it steps out of the async context first (`block_in_place`), so
/// a caller there does not panic. Calling it from the async thread of a current-thread
/// runtime is a caller bug (it would block that runtime) and panics inside tokio.
fn block_on<F: Future>(handle: &Handle, fut: F) -> F::Output {
    match Handle::try_current() {
        Ok(outer) if outer.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| handle.block_on(fut))
        }
        _ => handle.block_on(fut),
    }
}

fn build_client(opts: &HttpOptions) -> Result<Client, SourceError> {
    let mut builder = Client::builder()
        .connect_timeout(opts.connect_timeout)
        .tcp_nodelay(true)
        .tcp_keepalive(Some(Duration::from_secs(30)))
        .pool_idle_timeout(Some(Duration::from_secs(60)))
        .user_agent(concat!("streamboot/", env!("CARGO_PKG_VERSION")));
    builder = builder
        .redirect(url::redirect_policy(opts.allow_cross_origin_redirects))
        .referer(false);
    builder = if opts.http2 {
        builder.http2_adaptive_window(true)
    } else {
        builder.http1_only()
    };
    builder = opts.auth.configure(builder)?;
    builder
        .build()
        .map_err(|e| SourceError::Invalid(format!("cannot set up the HTTP client: {}", chain(&e))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_validation() {
        for bad in [
            "",
            "not a url",
            "ftp://host/x",
            "file:///etc/passwd",
            "http://",
        ] {
            assert!(
                matches!(Mirror::parse(bad), Err(SourceError::Invalid(_))),
                "{bad:?} accepted"
            );
        }
        let m = Mirror::parse("https://user:secret@example.org/img.raw").unwrap();
        assert!(!m.shown.contains("secret"), "{}", m.shown);
        assert!(m.has_secrets);
        let m = Mirror::parse("https://example.org/img.raw?X-Amz-Signature=secret").unwrap();
        assert!(!m.shown.contains("secret") && m.has_secrets, "{}", m.shown);
        assert!(
            !Mirror::parse("https://example.org/img.raw")
                .unwrap()
                .has_secrets
        );
        let bad = Mirror::parse("ftp://user:secret@example.org/x?sig=secret")
            .err()
            .unwrap();
        assert!(!bad.to_string().contains("secret"), "{bad}");
        assert!(Mirror::parse(" http://127.0.0.1:8080/a ").is_ok());
    }

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
