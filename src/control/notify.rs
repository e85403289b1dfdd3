//! `--notify URL`: posts each state change and the final success or failure as JSON.
//!
//! [`Notifier::notify`] never blocks: it stamps the event and puts it in a bounded queue
//! that one background thread delivers in order. A failed post (connection error, timeout,
//! HTTP 5xx, 408 or 429) is retried with exponential backoff; other 4xx answers are
//! permanent and logged. When the queue is full new events are dropped with a warning, so
//! a dead webhook can never hold up the disk. [`Notifier::close`] waits (up to a deadline)
//! for queued events, for the final event before the process exits.
//!
//! Each post is `{"id": UUID, "event": EVENT, "time": RFC 3339 UTC, ...payload fields}`;
//! a payload that is not an object is sent as `"data"`. `id` is the same for every try of
//! one event (receivers deduplicate with it). With a secret (`--notify-secret FILE`) each
//! try carries `X-Streamboot-Timestamp: UNIX_SECONDS` and `X-Streamboot-Signature:
//! sha256=HEX`, the HMAC-SHA256 of `TIMESTAMP.BODY` under the secret.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use hmac::{Hmac, Mac};
use parking_lot::Mutex;
use serde_json::{Map, Value};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::net::redact_url;

/// Header with the signing time (Unix seconds) of a post.
pub const TIMESTAMP_HEADER: &str = "x-streamboot-timestamp";
/// Header with `sha256=HEX`, the HMAC-SHA256 of `TIMESTAMP.BODY`.
pub const SIGNATURE_HEADER: &str = "x-streamboot-signature";

/// The webhook signing key (`--notify-secret FILE`); never shown, wiped when dropped.
#[derive(Clone)]
pub struct NotifySecret(Zeroizing<Vec<u8>>);

impl std::fmt::Debug for NotifySecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NotifySecret(<redacted>)")
    }
}

impl NotifySecret {
    /// Reads the secret from `path` (one trailing line feed is not part of it). A file
    /// that group or others may read or write is refused, like the host key.
    pub fn from_file(path: &Path) -> Result<Self, NotifyError> {
        use std::io::Read;
        use std::os::unix::fs::PermissionsExt;
        let err = |source| NotifyError::Secret {
            path: path.to_path_buf(),
            source,
        };
        let mut f = std::fs::File::open(path).map_err(err)?;
        let meta = f.metadata().map_err(err)?;
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(NotifyError::SecretMode {
                path: path.to_path_buf(),
                mode: mode & 0o7777,
            });
        }
        // Sized up front so that reading never leaves an unwiped copy behind.
        let len = usize::try_from(meta.len()).unwrap_or(0).min(1 << 20);
        let mut bytes = Zeroizing::new(Vec::with_capacity(len + 1));
        f.read_to_end(&mut bytes).map_err(err)?;
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
            if bytes.last() == Some(&b'\r') {
                bytes.pop();
            }
        }
        if bytes.is_empty() {
            return Err(NotifyError::EmptySecret(path.to_path_buf()));
        }
        Ok(Self(bytes))
    }

    /// A secret from bytes (tests, config files).
    pub fn from_bytes(b: &[u8]) -> Self {
        Self(Zeroizing::new(b.to_vec()))
    }

    /// `sha256=HEX` over `timestamp.body`.
    pub fn sign(&self, timestamp: u64, body: &[u8]) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC accepts keys of any length");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    }
}

/// How events are queued and delivered.
#[derive(Clone, Debug)]
pub struct NotifyOptions {
    /// Events waiting for delivery at most; more are dropped.
    pub queue: usize,
    /// Tries per event, the first included.
    pub attempts: u32,
    /// Wait before the first retry; doubled for each further one.
    pub initial_backoff: Duration,
    /// Longest wait between tries.
    pub max_backoff: Duration,
    /// Deadline of one post.
    pub request_timeout: Duration,
    /// Signs each post when set.
    pub secret: Option<NotifySecret>,
}

impl Default for NotifyOptions {
    fn default() -> Self {
        Self {
            queue: 64,
            attempts: 6,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            request_timeout: Duration::from_secs(10),
            secret: None,
        }
    }
}

/// Why a notifier could not be created.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// The URL is not an absolute http(s) URL (shown redacted: no user:password@, no query).
    #[error("invalid notify URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The secret file cannot be read (its content is never shown).
    #[error("cannot read the notify secret {}", path.display())]
    Secret {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Group or others may read or write the secret file.
    #[error(
        "the notify secret {} has mode {mode:o}: readable or writable by group or others (chmod 600 it)",
        path.display()
    )]
    SecretMode {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The secret file is empty.
    #[error("the notify secret {} is empty", .0.display())]
    EmptySecret(PathBuf),
    /// The delivery thread or its HTTP client could not be set up.
    #[error("cannot start the notifier: {0}")]
    Setup(String),
}

/// Posts events to a webhook in the background; does nothing without a URL.
#[derive(Debug)]
pub struct Notifier {
    inner: Option<Inner>,
}

#[derive(Debug)]
struct Inner {
    url: String,
    tx: Mutex<Option<SyncSender<Value>>>,
    /// Signalled (by disconnection) when the delivery thread exits.
    done: Mutex<Option<Receiver<()>>>,
    /// Once set, retries that would end after this instant are abandoned.
    give_up_at: Arc<Mutex<Option<Instant>>>,
    dropped: AtomicU64,
}

impl Notifier {
    /// A notifier posting to `url` with default options; `None` disables it.
    pub fn new(url: Option<String>) -> Result<Self, NotifyError> {
        Self::with_options(url, NotifyOptions::default())
    }

    /// A notifier posting to `url` (`None` disables it).
    pub fn with_options(url: Option<String>, opts: NotifyOptions) -> Result<Self, NotifyError> {
        let Some(url) = url else {
            return Ok(Self { inner: None });
        };
        let invalid = |reason: String| NotifyError::InvalidUrl {
            url: redact_url(&url),
            reason,
        };
        let parsed = reqwest::Url::parse(&url).map_err(|e| invalid(e.to_string()))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(invalid("only http:// and https:// are supported".into()));
        }
        // Redirects are not followed: a 301/302/303 would turn the post into a GET without
        // the event (then counted as delivered), and any redirect would send the event and
        // its signature somewhere the operator did not name.
        let client = reqwest::Client::builder()
            .timeout(opts.request_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("streamboot/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| NotifyError::Setup(e.to_string()))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| NotifyError::Setup(e.to_string()))?;
        let (tx, rx) = mpsc::sync_channel::<Value>(opts.queue.max(1));
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let give_up_at = Arc::new(Mutex::new(None));
        let worker = Worker {
            client,
            url: parsed,
            opts,
            give_up_at: give_up_at.clone(),
        };
        std::thread::Builder::new()
            .name("sb-notify".into())
            .spawn(move || {
                let _done = done_tx;
                while let Ok(event) = rx.recv() {
                    rt.block_on(worker.deliver(&event));
                }
            })
            .map_err(|e| NotifyError::Setup(e.to_string()))?;
        Ok(Self {
            inner: Some(Inner {
                url,
                tx: Mutex::new(Some(tx)),
                done: Mutex::new(Some(done_rx)),
                give_up_at,
                dropped: AtomicU64::new(0),
            }),
        })
    }

    /// True when events are posted somewhere.
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// The webhook URL, if any.
    pub fn url(&self) -> Option<&str> {
        self.inner.as_ref().map(|i| i.url.as_str())
    }

    /// Events dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.inner
            .as_ref()
            .map_or(0, |i| i.dropped.load(Ordering::Relaxed))
    }

    /// Queues `event` with `payload` (an object's fields are merged into the post) and
    /// returns at once. Dropped, with a warning, when the queue is full or closed.
    pub fn notify(&self, event: &str, payload: Value) {
        let Some(inner) = &self.inner else { return };
        let body = envelope(event, SystemTime::now(), payload);
        let tx = inner.tx.lock();
        let Some(tx) = tx.as_ref() else {
            tracing::warn!("notify: {event} after close, not sent");
            return;
        };
        match tx.try_send(body) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                inner.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("notify: queue full (webhook slow or down), dropped {event}");
            }
            Err(TrySendError::Disconnected(_)) => {
                tracing::warn!("notify: delivery thread gone, dropped {event}");
            }
        }
    }

    /// Stops taking events and waits up to `deadline` for the queued ones to be delivered
    /// (retries that cannot finish in time are abandoned). True when everything queued was
    /// dealt with in time. Later calls return at once.
    pub fn close(&self, deadline: Duration) -> bool {
        let Some(inner) = &self.inner else {
            return true;
        };
        *inner.give_up_at.lock() = Some(Instant::now() + deadline);
        inner.tx.lock().take();
        let Some(done) = inner.done.lock().take() else {
            return true;
        };
        match done.recv_timeout(deadline) {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => true,
            Err(RecvTimeoutError::Timeout) => {
                tracing::warn!("notify: gave up waiting for the webhook to take queued events");
                false
            }
        }
    }
}

/// The post body: payload fields, then `id`, `event` and `time` (which win).
fn envelope(event: &str, at: SystemTime, payload: Value) -> Value {
    let mut obj = match payload {
        Value::Object(m) => m,
        Value::Null => Map::new(),
        other => Map::from_iter([("data".to_owned(), other)]),
    };
    obj.insert("id".into(), uuid::Uuid::new_v4().to_string().into());
    obj.insert("event".into(), event.into());
    obj.insert(
        "time".into(),
        humantime::format_rfc3339_millis(at).to_string().into(),
    );
    Value::Object(obj)
}

/// A delivery error with its causes, without the URL (its query or path may hold a token).
fn describe(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

struct Worker {
    client: reqwest::Client,
    url: reqwest::Url,
    opts: NotifyOptions,
    give_up_at: Arc<Mutex<Option<Instant>>>,
}

impl Worker {
    /// Posts one event, retrying transient failures.
    async fn deliver(&self, event: &Value) {
        let name = event.get("event").and_then(Value::as_str).unwrap_or("?");
        let body = serde_json::to_vec(event).expect("a JSON value always encodes");
        let mut backoff = self.opts.initial_backoff;
        let attempts = self.opts.attempts.max(1);
        for attempt in 1..=attempts {
            let mut req = self
                .client
                .post(self.url.clone())
                .header(reqwest::header::CONTENT_TYPE, "application/json");
            if let Some(secret) = &self.opts.secret {
                let ts = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                req = req
                    .header(TIMESTAMP_HEADER, ts)
                    .header(SIGNATURE_HEADER, secret.sign(ts, &body));
            }
            let result = req.body(body.clone()).send().await;
            let failure = match result {
                Ok(r) if r.status().is_success() => {
                    tracing::debug!("notify: {name} delivered");
                    return;
                }
                Ok(r) if r.status().is_redirection() => {
                    tracing::warn!(
                        "notify: {name} not delivered: the webhook answered with a redirect \
                         (HTTP {}), which is not followed; give the final URL",
                        r.status()
                    );
                    return;
                }
                Ok(r) => {
                    let s = r.status();
                    if s.is_client_error() && s.as_u16() != 408 && s.as_u16() != 429 {
                        tracing::warn!("notify: webhook refused {name} with HTTP {s}; not retried");
                        return;
                    }
                    format!("HTTP {s}")
                }
                Err(e) => describe(e),
            };
            if attempt == attempts {
                tracing::warn!("notify: {name} not delivered after {attempts} tries: {failure}");
                return;
            }
            let give_up = *self.give_up_at.lock();
            if give_up.is_some_and(|t| Instant::now() + backoff > t) {
                tracing::warn!("notify: {name} not delivered before shutdown: {failure}");
                return;
            }
            tracing::info!(
                "notify: {name} try {attempt}/{attempts} failed ({failure}); retrying in {:?}",
                backoff
            );
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.opts.max_backoff);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_merges_objects_and_wraps_others() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let v = envelope(
            "confirmed",
            at,
            serde_json::json!({"state": "confirmed", "event": "spoof"}),
        );
        let id = v["id"].as_str().unwrap().to_owned();
        assert_eq!(
            v,
            serde_json::json!({"id": id, "event": "confirmed", "time": "2023-11-14T22:13:20.123Z", "state": "confirmed"})
        );
        let v = envelope("x", at, Value::Null);
        assert_eq!(v.as_object().unwrap().len(), 3);
        assert_ne!(v["id"].as_str().unwrap(), id, "each event has its own id");
        let v = envelope("x", at, serde_json::json!([1, 2]));
        assert_eq!(v["data"], serde_json::json!([1, 2]));
    }

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_and_body() {
        // RFC 4231 test case 2 (key "Jefe"), message "what do ya want for nothing?".
        let s = NotifySecret::from_bytes(b"Jefe");
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(s.sign(12, b"{}"), s.sign(12, b"{}"));
        assert_ne!(s.sign(12, b"{}"), s.sign(13, b"{}"));
        assert!(s.sign(1, b"x").starts_with("sha256="));
        assert_eq!(format!("{s:?}"), "NotifySecret(<redacted>)");
    }

    #[test]
    fn bad_urls_are_refused_and_none_is_disabled() {
        assert!(matches!(
            Notifier::new(Some("not a url".into())),
            Err(NotifyError::InvalidUrl { .. })
        ));
        assert!(matches!(
            Notifier::new(Some("ftp://example.com/x".into())),
            Err(NotifyError::InvalidUrl { .. })
        ));
        let n = Notifier::new(None).unwrap();
        assert!(!n.is_enabled());
        n.notify("x", Value::Null);
        assert!(n.close(Duration::ZERO));
    }
}
