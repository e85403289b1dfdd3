//! Pinning at open: one `GET` with `Range: bytes=0-0` per mirror learns the image size and
//! its validator.

use reqwest::header::{CONTENT_RANGE, ETAG, LAST_MODIFIED, RANGE};
use reqwest::{Client, StatusCode};

use super::attempt::{request_error, Clock};
use super::check::{check_identity_coding, content_range, header_str, status_error};
use super::{HttpOptions, Mirror, Pin, Probe};
use crate::source::http_parse::is_strong_etag;
use crate::source::SourceError;

/// Probes `mirror`, retrying transient errors `opts.open_retries` times.
pub(super) async fn probe_with_retries(
    client: &Client,
    opts: &HttpOptions,
    mirror: &Mirror,
) -> Result<Probe, SourceError> {
    let backoff = opts.backoff();
    let mut retry = 0;
    loop {
        match probe(client, opts, mirror).await {
            Ok(p) => return Ok(p),
            Err(e) if e.is_transient() && retry < opts.open_retries => {
                let delay = backoff.delay(retry);
                tracing::warn!(
                    url = %mirror.shown,
                    error = %e,
                    retry = retry + 1,
                    of = opts.open_retries,
                    delay_ms = delay.as_millis() as u64,
                    "probe failed, retrying"
                );
                tokio::time::sleep(delay).await;
                retry += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// One probe: `GET` with `Range: bytes=0-0`; learns size and validator. The answer must
/// carry a strong `ETag` or a `Last-Modified`, else the image cannot be pinned.
async fn probe(client: &Client, opts: &HttpOptions, mirror: &Mirror) -> Result<Probe, SourceError> {
    let clock = Clock::start(opts, 1);
    let request = client.get(mirror.url.clone()).header(RANGE, "bytes=0-0");
    let mut response = clock
        .run(mirror, request.send())
        .await?
        .map_err(|e| request_error(opts, mirror, e))?;
    match response.status() {
        StatusCode::PARTIAL_CONTENT => {}
        StatusCode::OK => {
            return Err(SourceError::NoRangeSupport {
                url: mirror.shown.clone(),
            })
        }
        StatusCode::RANGE_NOT_SATISFIABLE => {
            return Err(SourceError::Invalid(format!(
                "{}: the image is empty (the server cannot serve its first byte)",
                mirror.shown
            )))
        }
        status => return Err(status_error(mirror, status)),
    }
    let headers = response.headers();
    check_identity_coding(mirror, headers)?;
    let size = match content_range(headers) {
        Some((0, 0, Some(total))) if total > 0 => total,
        _ => {
            return Err(SourceError::BadResponse {
                url: mirror.shown.clone(),
                reason: format!(
                    "probe for bytes 0-0 answered Content-Range {:?}",
                    header_str(headers, CONTENT_RANGE.as_str())
                ),
            })
        }
    };
    let pin = match (
        header_str(headers, ETAG.as_str()),
        header_str(headers, LAST_MODIFIED.as_str()),
    ) {
        (Some(etag), _) if is_strong_etag(etag) => Pin::ETag(etag.to_string()),
        (_, Some(date)) if !date.is_empty() => Pin::LastModified(date.to_string()),
        (etag, _) => {
            return Err(SourceError::Invalid(format!(
                "{}: the image cannot be pinned: the server sends {} and no Last-Modified, \
                 so a change of the image during the migration could not be detected",
                mirror.shown,
                match etag {
                    Some(weak) => format!("only a weak ETag ({weak})"),
                    None => "no ETag".to_string(),
                }
            )))
        }
    };
    // Drain the one-byte body so the connection goes back to the pool.
    let mut body_len = 0usize;
    while let Some(piece) = clock
        .run(mirror, response.chunk())
        .await?
        .map_err(|e| request_error(opts, mirror, e))?
    {
        body_len += piece.len();
        if body_len > 1 {
            break;
        }
    }
    if body_len != 1 {
        return Err(SourceError::BadResponse {
            url: mirror.shown.clone(),
            reason: format!(
                "probe for 1 byte returned {}",
                if body_len == 0 {
                    "no byte"
                } else {
                    "more than 1 byte"
                }
            ),
        });
    }
    Ok(Probe { size, pin })
}
