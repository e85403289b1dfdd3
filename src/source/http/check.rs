//! Checks of every answer to a ranged request before one byte of it reaches the caller:
//! status, the pinned validator (required, not only compared), `Content-Range`,
//! `Content-Length`, content coding.

use reqwest::header::{
    HeaderMap, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_RANGE, ETAG, LAST_MODIFIED,
};
use reqwest::{Response, StatusCode};

use super::mirrors::MirrorSet;
use super::{HttpAuth, Inner, Mirror, Pin};
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
                return Err(SourceError::BadResponse {
                    url: m.shown.clone(),
                    reason: format!(
                        "asked for bytes {start}-{end}/{}, got Content-Range {:?}",
                        self.identity.size,
                        header_str(headers, CONTENT_RANGE.as_str())
                    ),
                })
            }
        }
        if let Some(length) = header_str(headers, CONTENT_LENGTH.as_str()) {
            if parse_content_length(length) != Some(end - start + 1) {
                return Err(SourceError::BadResponse {
                    url: m.shown.clone(),
                    reason: format!(
                        "asked for {} bytes, got Content-Length {length:?}",
                        end - start + 1
                    ),
                });
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

/// The error for an unexpected status; 401 and 403 say how to give credentials, a 400
/// over https that the client certificate may be missing or refused (nginx with
/// `ssl_verify_client on` answers so after a TLS 1.3 handshake).
pub(super) fn status_error(m: &Mirror, status: StatusCode, auth: &HttpAuth) -> SourceError {
    let client_cert = auth.client_cert.is_some();
    match status {
        StatusCode::BAD_REQUEST if m.url.scheme() == "https" => SourceError::Tls {
            url: m.shown.clone(),
            reason: if client_cert {
                "server answered HTTP 400: it may have refused the client certificate \
                 (--client-cert: is it signed by a CA the server trusts, and not expired?)"
            } else {
                "server answered HTTP 400: it may require a client certificate \
                 (mutual TLS); give --client-cert PEM --client-key PEM"
            }
            .into(),
        },
        StatusCode::FORBIDDEN => SourceError::Forbidden {
            url: m.shown.clone(),
            hint: if m.has_secrets {
                "the signature (query string) or credentials of the URL were refused; give \
                 a fresh URL (serve: POST /v1/target-urls or `streamboot target-urls`; \
                 otherwise --target)"
            } else {
                "the server refuses access; give credentials (--header-file, \
                 --bearer-token-file) or a signed URL with --target"
            },
        },
        StatusCode::UNAUTHORIZED if auth.bearer_token_file.is_some() => SourceError::Unauthorized {
            url: m.shown.clone(),
            status: status.as_u16(),
            hint: "the bearer token was refused, also after reading --bearer-token-file \
                   again; put a valid token in that file",
        },
        StatusCode::UNAUTHORIZED => SourceError::Unauthorized {
            url: m.shown.clone(),
            status: status.as_u16(),
            hint: if m.has_secrets {
                "the credentials or the signature (query string) of the URL were refused \
                     (expired presigned URL?); give a valid URL with --target"
            } else {
                "the server wants credentials or a signed URL; streamboot never records \
                     them on the disk, so give the full URL (user:password@ or presigned \
                     query string) with --target"
            },
        },
        status => SourceError::Status {
            url: m.shown.clone(),
            status: status.as_u16(),
        },
    }
}

pub(super) fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Refuses a body with a content coding: its bytes would not be image bytes.
pub(super) fn check_identity_coding(m: &Mirror, headers: &HeaderMap) -> Result<(), SourceError> {
    match header_str(headers, CONTENT_ENCODING.as_str()) {
        None => Ok(()),
        Some(coding) if coding.trim().eq_ignore_ascii_case("identity") => Ok(()),
        Some(coding) => Err(SourceError::BadResponse {
            url: m.shown.clone(),
            reason: format!("body has Content-Encoding {coding:?}"),
        }),
    }
}

/// Parses `Content-Range: bytes START-END/TOTAL` (TOTAL may be `*`: `None`).
pub(super) fn content_range(headers: &HeaderMap) -> Option<(u64, u64, Option<u64>)> {
    parse_content_range(header_str(headers, CONTENT_RANGE.as_str())?)
}
