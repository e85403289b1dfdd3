//! Checks of every answer to a ranged request before one byte of it reaches the caller:
//! status, the pinned validator (required, not only compared), `Content-Range`,
//! `Content-Length`, content coding.

use reqwest::header::{
    HeaderMap, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_RANGE, ETAG, LAST_MODIFIED,
};
use reqwest::{Response, StatusCode};

use super::mirrors::MirrorSet;
use super::{HttpAuth, Inner, Mirror, Pin};
use crate::net::NetError;
use crate::source::http_parse::{parse_content_length, parse_content_range};
use crate::source::SourceError;

impl Inner {
    /// Checks everything but the body of an answer to a ranged request for `start..=end`
    /// from mirror number `index`. An answer without the pinned validator marks the mirror
    /// refused (see [`Inner::refuse`]).
    pub(super) fn check_response(
        &self,
        set: &MirrorSet,
        index: usize,
        response: &Response,
        start: u64,
        end: u64,
    ) -> Result<(), SourceError> {
        let m = &set.mirrors[index];
        let headers = response.headers();
        let changed = |found: String| SourceError::Changed {
            url: m.shown.clone(),
            expected: self.identity.to_string(),
            found,
        };
        match response.status() {
            StatusCode::PARTIAL_CONTENT => {}
            StatusCode::PRECONDITION_FAILED => {
                let found = match header_str(headers, ETAG.as_str()) {
                    Some(etag) => format!("ETag {etag} (412 Precondition Failed)"),
                    None => "a different version (412 Precondition Failed)".to_string(),
                };
                return Err(changed(found));
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                return Err(changed(format!(
                    "a shorter image (416 Range Not Satisfiable, Content-Range {:?})",
                    header_str(headers, CONTENT_RANGE.as_str())
                )));
            }
            StatusCode::OK => {
                // Never hand out a 200 body: it is not the range asked for.
                if let Validation::Different(found) = self.validation(headers) {
                    return Err(changed(found));
                }
                return Err(SourceError::NoRangeSupport {
                    url: m.shown.clone(),
                });
            }
            status => return Err(status_error(m, status, &self.opts.auth)),
        }
        match self.validation(headers) {
            Validation::Same => {}
            Validation::Different(found) => return Err(changed(found)),
            Validation::Missing => return Err(self.refuse(set, index)),
        }
        check_identity_coding(m, headers)?;
        match content_range(headers) {
            Some((s, e, Some(total))) if s == start && e == end && total == self.identity.size => {}
            Some((_, _, Some(total))) if total != self.identity.size => {
                return Err(changed(format!("size {total}")));
            }
            _ => {
                return Err(NetError::BadResponse {
                    url: m.shown.clone(),
                    reason: format!(
                        "asked for bytes {start}-{end}/{}, got Content-Range {:?}",
                        self.identity.size,
                        header_str(headers, CONTENT_RANGE.as_str())
                    ),
                }
                .into())
            }
        }
        if let Some(length) = header_str(headers, CONTENT_LENGTH.as_str()) {
            if parse_content_length(length) != Some(end - start + 1) {
                return Err(NetError::BadResponse {
                    url: m.shown.clone(),
                    reason: format!(
                        "asked for {} bytes, got Content-Length {length:?}",
                        end - start + 1
                    ),
                }
                .into());
            }
        }
        Ok(())
    }

    /// Compares the validator of an answer with the pinned one.
    fn validation(&self, headers: &HeaderMap) -> Validation {
        let (name, pinned) = match &self.pin {
            Pin::ETag(etag) => (ETAG, etag),
            Pin::LastModified(date) => (LAST_MODIFIED, date),
        };
        match header_str(headers, name.as_str()) {
            None => Validation::Missing,
            Some(found) if found == pinned => Validation::Same,
            Some(found) => Validation::Different(format!("{} {found}", header_label(&self.pin))),
        }
    }
}

/// How an answer's validator relates to the pinned one.
enum Validation {
    Same,
    /// Another validator: the image changed.
    Different(String),
    /// No validator at all: nothing proves these bytes belong to the pinned image.
    Missing,
}

/// The header that carries the pinned validator, as named in messages.
pub(super) fn header_label(pin: &Pin) -> &'static str {
    match pin {
        Pin::ETag(_) => "ETag",
        Pin::LastModified(_) => "Last-Modified",
    }
}

/// The error for an unexpected status from mirror `m` ([`crate::net::status`]).
pub(super) fn status_error(m: &Mirror, status: StatusCode, auth: &HttpAuth) -> SourceError {
    let https = m.url.scheme() == "https";
    crate::net::status::status_error(&m.shown, https, m.has_secrets, status, auth).into()
}

pub(super) fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Refuses a body with a content coding: its bytes would not be image bytes.
pub(super) fn check_identity_coding(m: &Mirror, headers: &HeaderMap) -> Result<(), SourceError> {
    match header_str(headers, CONTENT_ENCODING.as_str()) {
        None => Ok(()),
        Some(coding) if coding.trim().eq_ignore_ascii_case("identity") => Ok(()),
        Some(coding) => Err(NetError::BadResponse {
            url: m.shown.clone(),
            reason: format!("body has Content-Encoding {coding:?}"),
        }
        .into()),
    }
}

/// Parses `Content-Range: bytes START-END/TOTAL` (TOTAL may be `*`: `None`).
pub(super) fn content_range(headers: &HeaderMap) -> Option<(u64, u64, Option<u64>)> {
    parse_content_range(header_str(headers, CONTENT_RANGE.as_str())?)
}
