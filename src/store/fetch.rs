//! Getting store files (indexes, chunk objects) from a local directory or an HTTP(S)
//! server, with bounded sizes and retries, on the network layer ([`crate::net`]).
//!
//! HTTP uses plain `GET`s of whole files: chunk objects are small and immutable, so any
//! static server or object store can serve them without Range support. Every
//! [`HttpOptions`] option applies as for a raw image: timeouts and min-rate, redirect
//! policy, HTTP/2, extra headers, the bearer token file (read again after a 401), trusted
//! CAs and the client certificate. Transient failures (connection errors, timeouts,
//! 408/429/5xx, cut bodies) are retried with the network layer's backoff; permanent ones
//! (404, 401, 403, TLS...) are returned at once, classified as [`NetError`]. Every body is
//! capped at a size the caller gives, checked against `Content-Length` before reading and
//! again while reading, so a hostile server cannot make the client allocate without bound.
//!
//! The calls are blocking and may come from many threads at once; the requests run on the
//! network layer's shared runtime.

use std::fs::File;
use std::io::{self, Read};
use std::path::PathBuf;

use futures_util::StreamExt;
use reqwest::{Client, StatusCode};
use tokio::runtime::Handle;

use crate::net::attempt::{request_error, Clock};
use crate::net::auth::Auth;
use crate::net::client::{block_on_anywhere, build_client, runtime};
use crate::net::status::status_error;
use crate::net::{redact_url, HttpOptions, NetError};

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
        } else if crate::net::s3::is_s3_url(s) {
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

/// Retry and HTTP policy of a store fetcher.
#[derive(Clone, Debug)]
pub struct FetchOptions {
    /// Tries per file, first included (at least 1).
    pub attempts: u32,
    /// Requests in flight at once for one multi-chunk read.
    pub concurrency: usize,
    /// Timeouts, min-rate, backoff, redirects, headers, token, TLS (the `serve`/`prepare`
    /// HTTP options; docs/sources.md).
    pub http: HttpOptions,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            attempts: 6,
            concurrency: 8,
            http: HttpOptions::default(),
        }
    }
}

/// Gets files of one store.
pub struct Fetcher {
    location: StoreLocation,
    opts: FetchOptions,
    http: Option<Http>,
    s3: Option<super::s3::S3Store>,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("location", &self.location)
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

struct Http {
    client: Client,
    auth: Auth,
    handle: Handle,
}

impl Fetcher {
    /// A fetcher for `location`; builds the HTTP client for a URL.
    pub fn new(location: StoreLocation, opts: FetchOptions) -> Result<Self, NetError> {
        let s3 = match &location {
            StoreLocation::S3(base) => Some(super::s3::S3Store::open(base, &opts)?),
            _ => None,
        };
        let http = match &location {
            StoreLocation::Dir(_) | StoreLocation::S3(_) => None,
            StoreLocation::Http(_) => {
                opts.http.validate()?;
                Some(Http {
                    client: build_client(&opts.http)?,
                    auth: Auth::new(&opts.http.auth)?,
                    handle: runtime()?,
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
    pub fn get(&self, rel: &str, max_len: u64) -> Result<Vec<u8>, NetError> {
        self.get_many(&[(rel.to_owned(), max_len)])
            .pop()
            .expect("one result per request")
    }

    /// Gets several files, concurrently over HTTP; one result per request, in order.
    pub fn get_many(&self, reqs: &[(String, u64)]) -> Vec<Result<Vec<u8>, NetError>> {
        match (&self.location, &self.http) {
            (StoreLocation::Dir(dir), _) => reqs
                .iter()
                .map(|(rel, max)| read_local(&dir.join(rel), *max))
                .collect(),
            (StoreLocation::Http(base), Some(http)) => {
                let opts = &self.opts;
                let fut = futures_util::stream::iter(reqs.iter())
                    .map(|(rel, max)| get_with_retry(http, object_url(base, rel), *max, opts))
                    .buffered(opts.concurrency.max(1))
                    .collect::<Vec<_>>();
                block_on_anywhere(&http.handle, fut)
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
fn read_local(path: &std::path::Path, max_len: u64) -> Result<Vec<u8>, NetError> {
    let shown = || path.display().to_string();
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(NetError::NotFound {
                url: shown(),
                http: false,
            })
        }
        Err(e) => return Err(NetError::Io(e)),
    };
    let len = f.metadata()?.len();
    if len > max_len {
        return Err(too_large(&shown(), len, max_len));
    }
    let mut buf = Vec::with_capacity(len as usize);
    // `take` guards against the file growing after the size check.
    f.take(max_len + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > max_len {
        return Err(too_large(&shown(), buf.len() as u64, max_len));
    }
    Ok(buf)
}

fn too_large(url: &str, len: u64, max: u64) -> NetError {
    NetError::BadResponse {
        url: url.to_owned(),
        reason: format!("{len} bytes, more than the {max} allowed"),
    }
}

/// One GET with retries for transient errors, waiting the network layer's backoff.
async fn get_with_retry(
    http: &Http,
    url: String,
    max_len: u64,
    opts: &FetchOptions,
) -> Result<Vec<u8>, NetError> {
    let backoff = opts.http.backoff();
    let attempts = opts.attempts.max(1);
    let mut attempt = 1;
    loop {
        match get_once(http, &url, max_len, &opts.http).await {
            Ok(b) => return Ok(b),
            Err(e) if e.is_transient() && attempt < attempts => {
                // `e` names the URL in its redacted form already.
                tracing::debug!("attempt {attempt} failed ({e}); retrying");
                tokio::time::sleep(backoff.delay(attempt - 1)).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// One GET of a whole file, body capped at `max_len`, within the stall limit and the
/// attempt budget of `opts`. Errors name the URL without its secrets ([`redact_url`]).
async fn get_once(
    http: &Http,
    raw_url: &str,
    max_len: u64,
    opts: &HttpOptions,
) -> Result<Vec<u8>, NetError> {
    let shown = redact_url(raw_url);
    let url = shown.as_str();
    let parsed = reqwest::Url::parse(raw_url)
        .map_err(|e| NetError::Invalid(format!("{url:?}: not a URL ({e})")))?;
    let clock = Clock::start(opts, max_len);
    let mut resp = http
        .auth
        .send(&clock, opts, url, http.client.get(parsed.clone()))
        .await?;
    let status = resp.status();
    if status != StatusCode::OK {
        let https = parsed.scheme() == "https";
        let secrets = crate::net::url::has_secrets(&parsed);
        return Err(status_error(url, https, secrets, status, &opts.auth));
    }
    // Read it now: reqwest's value is a size hint of what is left to read.
    let declared = resp.content_length();
    if let Some(n) = declared {
        if n > max_len {
            return Err(too_large(url, n, max_len));
        }
    }
    let mut body = Vec::with_capacity(declared.unwrap_or(0).min(max_len) as usize);
    while let Some(part) = clock
        .run(url, resp.chunk())
        .await?
        .map_err(|e| request_error(opts, url, e))?
    {
        if (body.len() + part.len()) as u64 > max_len {
            return Err(too_large(url, (body.len() + part.len()) as u64, max_len));
        }
        body.extend_from_slice(&part);
    }
    if let Some(n) = declared {
        if n != body.len() as u64 {
            return Err(NetError::BadResponse {
                url: url.to_owned(),
                reason: format!("body is {} bytes, Content-Length said {n}", body.len()),
            });
        }
    }
    Ok(body)
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
