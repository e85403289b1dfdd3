//! Pinning at open: one `GET` with `Range: bytes=0-0` per mirror learns the image size and
//! its validators; [`pin_mirrors`] chooses the pin and checks that every mirror answering
//! serves the same image with the same kind of validator.

use reqwest::header::{CONTENT_RANGE, ETAG, LAST_MODIFIED, RANGE};
use reqwest::{Client, StatusCode};

use super::check::{check_identity_coding, content_range, header_label, header_str, status_error};
use super::{HttpOptions, Mirror, Pin, LAST_MODIFIED_PREFIX};
use crate::net::attempt::{request_error, Clock};
use crate::net::auth::Auth;
use crate::source::http_parse::is_strong_etag;
use crate::source::{SourceError, SourceIdentity};

/// What a probe learned about one mirror: the size and the validators it sends (at least
/// one of them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Probe {
    size: u64,
    /// A strong ETag, verbatim.
    etag: Option<String>,
    /// A non-empty `Last-Modified`, verbatim.
    last_modified: Option<String>,
}

impl Probe {
    /// The pin of the kind `like` (the same header), or without `like` the strong ETag when
    /// there is one, else `Last-Modified`. `None`: this server does not send that header.
    fn pin(&self, like: Option<&Pin>) -> Option<Pin> {
        let etag = || self.etag.clone().map(Pin::ETag);
        let date = || self.last_modified.clone().map(Pin::LastModified);
        match like {
            Some(Pin::ETag(_)) => etag(),
            Some(Pin::LastModified(_)) => date(),
            None => etag().or_else(date),
        }
    }
}

/// The kind of pin a recorded validator is (`lm:` prefix: `Last-Modified`).
fn recorded_pin(expected: &SourceIdentity) -> Pin {
    match expected.validator.strip_prefix(LAST_MODIFIED_PREFIX) {
        Some(date) => Pin::LastModified(date.to_string()),
        None => Pin::ETag(expected.validator.clone()),
    }
}

/// Chooses the pin from the probes of all mirrors: the first mirror that answered decides
/// (with `expected`, the kind of validator recorded then: a server that added ETags since
/// still matches a `Last-Modified` pin); every other mirror that answered must send the same
/// kind of validator with the same value and size. Unreachable mirrors are tolerated while
/// one answers. Returns the index of the first mirror that answered, the size and the pin.
pub(super) fn pin_mirrors(
    mirrors: &[Mirror],
    probes: Vec<Result<Probe, SourceError>>,
    expected: Option<&SourceIdentity>,
) -> Result<(usize, u64, Pin), SourceError> {
    let like = expected.map(recorded_pin);
    let mut pinned: Option<(usize, u64, Pin)> = None;
    let mut first_transient: Option<SourceError> = None;
    for (i, result) in probes.into_iter().enumerate() {
        let probe = match result {
            Ok(probe) => probe,
            Err(e) if !e.is_transient() => return Err(e),
            Err(e) => {
                if mirrors.len() > 1 {
                    tracing::warn!(
                        url = %mirrors[i].shown,
                        error = %e,
                        "mirror unavailable at open; it will be tried again on failover"
                    );
                }
                first_transient.get_or_insert(e);
                continue;
            }
        };
        let want = pinned.as_ref().map(|p| &p.2).or(like.as_ref());
        let Some(pin) = probe.pin(want) else {
            return Err(missing_validator(&mirrors[i], want, pinned.is_some()));
        };
        match &pinned {
            None => pinned = Some((i, probe.size, pin)),
            Some((j, size, first)) if (*size, first) != (probe.size, &pin) => {
                return Err(SourceError::Invalid(format!(
                    "mirrors serve different images: {} has size {size} validator {}, \
                     {} has size {} validator {}",
                    mirrors[*j].shown,
                    first.validator(),
                    mirrors[i].shown,
                    probe.size,
                    pin.validator()
                )));
            }
            Some(_) => {}
        }
    }
    pinned.ok_or_else(|| {
        first_transient.unwrap_or_else(|| SourceError::Invalid("no mirror could be probed".into()))
    })
}

/// A mirror that does not send the kind of validator the image is pinned by (`want`;
/// `None` cannot happen: a probe carries at least one validator).
fn missing_validator(m: &Mirror, want: Option<&Pin>, by_mirror: bool) -> SourceError {
    let Some(want) = want else {
        return SourceError::Unvalidated {
            url: m.shown.clone(),
            reason: "the server sends no validator".into(),
        };
    };
    let label = header_label(want);
    let by = if by_mirror {
        "the other mirrors"
    } else {
        "the disk"
    };
    SourceError::Unvalidated {
        url: m.shown.clone(),
        reason: format!(
            "the image is pinned by {label} ({by} recorded {}), but this server sends no \
             {}{label}: nothing would prove that it serves the pinned image, so it is not used",
            want.validator(),
            if matches!(want, Pin::ETag(_)) {
                "strong "
            } else {
                ""
            }
        ),
    }
}

/// Probes `mirror`, retrying transient errors `opts.open_retries` times.
pub(super) async fn probe_with_retries(
    client: &Client,
    auth: &Auth,
    opts: &HttpOptions,
    mirror: &Mirror,
) -> Result<Probe, SourceError> {
    let backoff = opts.backoff();
    let mut retry = 0;
    loop {
        match probe(client, auth, opts, mirror).await {
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
async fn probe(
    client: &Client,
    auth: &Auth,
    opts: &HttpOptions,
    mirror: &Mirror,
) -> Result<Probe, SourceError> {
    let clock = Clock::start(opts, 1);
    let request = client.get(mirror.url.clone()).header(RANGE, "bytes=0-0");
    let mut response = auth.send(&clock, opts, &mirror.shown, request).await?;
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
        status => return Err(status_error(mirror, status, &opts.auth)),
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
    let etag = header_str(headers, ETAG.as_str());
    let last_modified = header_str(headers, LAST_MODIFIED.as_str()).filter(|d| !d.is_empty());
    let probe = Probe {
        size,
        etag: etag.filter(|e| is_strong_etag(e)).map(str::to_string),
        last_modified: last_modified.map(str::to_string),
    };
    if probe.etag.is_none() && probe.last_modified.is_none() {
        return Err(SourceError::Invalid(format!(
            "{}: the image cannot be pinned: the server sends {} and no Last-Modified, \
             so a change of the image during the migration could not be detected",
            mirror.shown,
            match etag {
                Some(weak) => format!("only a weak ETag ({weak})"),
                None => "no ETag".to_string(),
            }
        )));
    }
    // Drain the one-byte body so the connection goes back to the pool.
    let mut body_len = 0usize;
    while let Some(piece) = clock
        .run(&mirror.shown, response.chunk())
        .await?
        .map_err(|e| request_error(opts, &mirror.shown, e))?
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
    Ok(probe)
}
