//! Getting store files (indexes, chunk objects) from a local directory or an HTTP(S)
//! server, with bounded sizes and retries.
//!
//! HTTP uses plain `GET`s of whole files: chunk objects are small and immutable, so any
//! static server or object store can serve them without Range support. Transient failures
//! (connection errors, timeouts, 408/429/5xx, cut bodies) are retried with exponential
//! backoff and jitter; permanent ones (404, 403, ...) are returned at once. Every body is
//! capped at a size the caller gives, checked against `Content-Length` before reading and
//! again while reading, so a hostile server cannot make the client allocate without bound.
//!
//! The calls are blocking: [`Fetcher`] owns a small tokio runtime and may be used from many
//! threads at once, each call driving its own requests on that runtime.

use std::fs::File;
use std::io::{self, Read};
use std::path::PathBuf;
use std::time::Duration;

use futures_util::StreamExt;

use crate::source::http::redact_url;
use crate::source::SourceError;

/// Where a store is. Its `Debug` form hides a URL's secrets ([`redact_url`]).
#[derive(Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// A directory on a local file system.
    Dir(PathBuf),
    /// Base URL of a store served over HTTP(S) (no trailing slash).
    Http(String),
    /// `s3://bucket/prefix` (docs/s3.md).
    S3(String),
}

impl std::fmt::Debug for StoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreLocation::Dir(d) => f.debug_tuple("Dir").field(d).finish(),
            StoreLocation::Http(base) => f.debug_tuple("Http").field(&redact_url(base)).finish(),
            StoreLocation::S3(base) => f.debug_tuple("S3").field(base).finish(),
        }
    }
}

impl StoreLocation {
    /// `http://...` and `https://...` are URLs; anything else is a directory path.
    pub fn parse(s: &str) -> Self {
        let lower = s.to_ascii_lowercase();
        if lower.starts_with("http://") || lower.starts_with("https://") {
            StoreLocation::Http(s.trim_end_matches('/').to_owned())
        } else if crate::source::s3::is_s3_url(s) {
            StoreLocation::S3(s.trim_end_matches('/').to_owned())
        } else {
            StoreLocation::Dir(PathBuf::from(s))
        }
    }

    /// Human-readable location of the file at `rel` (a path, or a URL without its
    /// secrets: [`redact_url`]), for logs and errors.
    pub fn describe(&self, rel: &str) -> String {
        match self {
            StoreLocation::Dir(d) => d.join(rel).display().to_string(),
            StoreLocation::Http(base) => redact_url(&object_url(base, rel)),
            StoreLocation::S3(base) => format!("{base}/{rel}"),
        }
    }
}

/// URL of the file at `rel` of the store at `base`. A query string on the base (a token
/// valid for the whole store, such as a container SAS) goes after the file's path.
fn object_url(base: &str, rel: &str) -> String {
    let (path, query) = match base.split_once('?') {
        Some((p, q)) => (p.trim_end_matches('/'), Some(q)),
        None => (base, None),
    };
    match query {
        Some(q) => format!("{path}/{rel}?{q}"),
        None => format!("{path}/{rel}"),
    }
}

/// Retry and timeout policy for HTTP.
#[derive(Clone, Debug)]
pub struct FetchOptions {
    /// Tries per file, first included (at least 1).
    pub attempts: u32,
    /// Wait before the first retry; doubles per retry.
    pub initial_backoff: Duration,
    /// Longest wait between tries.
    pub max_backoff: Duration,
    /// Whole-request timeout.
    pub request_timeout: Duration,
    /// TCP/TLS connect timeout.
    pub connect_timeout: Duration,
    /// Requests in flight at once for one multi-chunk read.
    pub concurrency: usize,
    /// Extra headers and TLS trust (`--header`, `--cacert`...; docs/sources.md).
    pub auth: crate::source::HttpAuth,
    /// Endpoint, region and credentials profile of `s3://` stores (docs/s3.md).
    pub s3: crate::source::s3::S3Options,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            attempts: 6,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            request_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            concurrency: 8,
            auth: crate::source::HttpAuth::default(),
            s3: crate::source::s3::S3Options::default(),
        }
    }
}

/// Gets files of one store.
#[derive(Debug)]
pub struct Fetcher {
    location: StoreLocation,
    opts: FetchOptions,
    http: Option<Http>,
    s3: Option<super::s3::S3Store>,
}

#[derive(Debug)]
struct Http {
    client: reqwest::Client,
    /// `Some` until drop; taken there to shut down without blocking.
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for Http {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside another runtime's context;
        // shutting down in the background is safe anywhere.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Fetcher {
    /// A fetcher for `location`; builds the HTTP client and runtime for a URL.
    pub fn new(location: StoreLocation, opts: FetchOptions) -> Result<Self, SourceError> {
        let s3 = match &location {
            StoreLocation::S3(base) => Some(super::s3::S3Store::open(base, &opts)?),
            _ => None,
        };
        let http = match &location {
            StoreLocation::Dir(_) | StoreLocation::S3(_) => None,
            StoreLocation::Http(base) => {
                let invalid = |e: &dyn std::fmt::Display| {
                    SourceError::Invalid(format!("{}: cannot set up HTTP: {e}", redact_url(base)))
                };
                let builder = reqwest::Client::builder()
                    .connect_timeout(opts.connect_timeout)
                    .timeout(opts.request_timeout)
                    .user_agent(concat!("streamboot/", env!("CARGO_PKG_VERSION")));
                let client = opts
                    .auth
                    .configure(builder)?
                    .build()
                    .map_err(|e| invalid(&e))?;
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("store-http")
                    .enable_all()
                    .build()
                    .map_err(|e| invalid(&e))?;
                Some(Http {
                    client,
                    rt: Some(rt),
                })
            }
        };
        Ok(Fetcher {
            location,
            opts,
            http,
            s3,
        })
    }

    /// The store's location.
    pub fn location(&self) -> &StoreLocation {
        &self.location
    }

    /// Gets the file at `rel` (relative to the store root), at most `max_len` bytes.
    pub fn get(&self, rel: &str, max_len: u64) -> Result<Vec<u8>, SourceError> {
        self.get_many(&[(rel.to_owned(), max_len)])
            .pop()
            .expect("one result per request")
    }

    /// Gets several files, concurrently over HTTP; one result per request, in order.
    pub fn get_many(&self, reqs: &[(String, u64)]) -> Vec<Result<Vec<u8>, SourceError>> {
        match (&self.location, &self.http) {
            (StoreLocation::Dir(dir), _) => reqs
                .iter()
                .map(|(rel, max)| read_local(&dir.join(rel), *max))
                .collect(),
            (StoreLocation::Http(base), Some(http)) => {
                let client = &http.client;
                let opts = &self.opts;
                let fut = futures_util::stream::iter(reqs.iter())
                    .map(|(rel, max)| get_with_retry(client, object_url(base, rel), *max, opts))
                    .buffered(opts.concurrency.max(1))
                    .collect::<Vec<_>>();
                let rt = http.rt.as_ref().expect("runtime lives until drop");
                if tokio::runtime::Handle::try_current().is_ok() {
                    // Called from async code: blocking this thread on our runtime would
                    // panic, so drive the requests from a plain thread instead.
                    std::thread::scope(|s| {
                        s.spawn(|| rt.block_on(fut))
                            .join()
                            .expect("fetch thread panicked")
                    })
                } else {
                    rt.block_on(fut)
                }
            }
            (StoreLocation::Http(_), None) => unreachable!("HTTP location without a client"),
            (StoreLocation::S3(_), _) => self
                .s3
                .as_ref()
                .expect("S3 location with a client")
                .get_many(reqs),
        }
    }
}

/// Reads a local store file of at most `max_len` bytes.
fn read_local(path: &std::path::Path, max_len: u64) -> Result<Vec<u8>, SourceError> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(SourceError::Invalid(format!(
                "{}: not in the store",
                path.display()
            )))
        }
        Err(e) => return Err(SourceError::Io(e)),
    };
    let len = f.metadata()?.len();
    if len > max_len {
        return Err(too_large(&path.display().to_string(), len, max_len));
    }
    let mut buf = Vec::with_capacity(len as usize);
    // `take` guards against the file growing after the size check.
    f.take(max_len + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > max_len {
        return Err(too_large(
            &path.display().to_string(),
            buf.len() as u64,
            max_len,
        ));
    }
    Ok(buf)
}

fn too_large(url: &str, len: u64, max: u64) -> SourceError {
    SourceError::BadResponse {
        url: url.to_owned(),
        reason: format!("{len} bytes, more than the {max} allowed"),
    }
}

/// One GET with retries for transient errors.
async fn get_with_retry(
    client: &reqwest::Client,
    url: String,
    max_len: u64,
    opts: &FetchOptions,
) -> Result<Vec<u8>, SourceError> {
    let mut delay = opts.initial_backoff;
    let attempts = opts.attempts.max(1);
    let mut attempt = 1;
    loop {
        match get_once(client, &url, max_len, opts).await {
            Ok(b) => return Ok(b),
            Err(e) if e.is_transient() && attempt < attempts => {
                // `e` names the URL in its redacted form already.
                tracing::debug!("attempt {attempt} failed ({e}); retrying");
                // Full jitter on the upper half keeps many clients from retrying in step.
                let jitter = rand::random::<f64>() * 0.5 + 0.5;
                tokio::time::sleep(delay.mul_f64(jitter)).await;
                delay = (delay * 2).min(opts.max_backoff);
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// One GET of a whole file, body capped at `max_len`. Errors name the URL without its
/// secrets ([`redact_url`]).
async fn get_once(
    client: &reqwest::Client,
    raw_url: &str,
    max_len: u64,
    opts: &FetchOptions,
) -> Result<Vec<u8>, SourceError> {
    let shown = redact_url(raw_url);
    let url = shown.as_str();
    let map = |e: reqwest::Error| map_reqwest(url, e, opts);
    let mut resp = client.get(raw_url).send().await.map_err(map)?;
    let status = resp.status().as_u16();
    if status != 200 {
        return Err(SourceError::Status {
            url: url.to_owned(),
            status,
        });
    }
    // Read it now: reqwest's value is a size hint of what is left to read.
    let declared = resp.content_length();
    if let Some(n) = declared {
        if n > max_len {
            return Err(too_large(url, n, max_len));
        }
    }
    let mut body = Vec::with_capacity(declared.unwrap_or(0).min(max_len) as usize);
    while let Some(part) = resp.chunk().await.map_err(map)? {
        if (body.len() + part.len()) as u64 > max_len {
            return Err(too_large(url, (body.len() + part.len()) as u64, max_len));
        }
        body.extend_from_slice(&part);
    }
    if let Some(n) = declared {
        if n != body.len() as u64 {
            return Err(SourceError::BadResponse {
                url: url.to_owned(),
                reason: format!("body is {} bytes, Content-Length said {n}", body.len()),
            });
        }
    }
    Ok(body)
}

/// Classifies a reqwest error; `url` is the redacted form (the error's own copy of the
/// URL, which carries the secrets, is dropped).
fn map_reqwest(url: &str, e: reqwest::Error, opts: &FetchOptions) -> SourceError {
    let e = e.without_url();
    if e.is_timeout() {
        SourceError::Timeout {
            url: url.to_owned(),
            secs: opts.request_timeout.as_secs(),
        }
    } else if e.is_body() || e.is_decode() {
        SourceError::BadResponse {
            url: url.to_owned(),
            reason: e.to_string(),
        }
    } else if e.is_builder() {
        SourceError::Invalid(format!("{url}: {e}"))
    } else {
        SourceError::Unreachable {
            url: url.to_owned(),
            reason: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_urls_keep_a_store_wide_query_and_show_no_secret() {
        let plain = StoreLocation::parse("http://h/st/");
        assert_eq!(plain.describe("indexes/a.idx"), "http://h/st/indexes/a.idx");
        let base = "https://user:secret@h/st/?sv=1&sig=topsecret";
        assert_eq!(
            object_url(base, "indexes/a.idx"),
            "https://user:secret@h/st/indexes/a.idx?sv=1&sig=topsecret"
        );
        let loc = StoreLocation::parse(base);
        let shown = format!("{} {loc:?}", loc.describe("indexes/a.idx"));
        assert!(!shown.contains("secret"), "{shown}");
        assert!(
            shown.contains("https://***@h/st/indexes/a.idx?***"),
            "{shown}"
        );
    }
}
