//! One attempt's limits (stall limit and total budget) and the classification of client
//! errors.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use super::{url, HttpOptions};
use crate::source::SourceError;

/// Time limits of one attempt: each wait at most the stall limit, all of them together at
/// most the attempt budget (see [`HttpOptions::attempt_budget`]).
pub struct Clock {
    stall: Duration,
    started: Instant,
    end: Instant,
}

impl Clock {
    /// Starts the clock of an attempt for `len` bytes.
    pub fn start(opts: &HttpOptions, len: u64) -> Clock {
        let started = Instant::now();
        let end = started
            .checked_add(opts.attempt_budget(len))
            .unwrap_or_else(far_future);
        Clock {
            stall: opts.request_timeout,
            started,
            end,
        }
    }

    /// Awaits `fut` within the stall limit and the rest of the budget.
    pub async fn run<F: Future>(&self, shown: &str, fut: F) -> Result<F::Output, SourceError> {
        let stall_end = Instant::now()
            .checked_add(self.stall)
            .unwrap_or_else(far_future);
        let stalled = stall_end <= self.end;
        tokio::time::timeout_at(stall_end.min(self.end), fut)
            .await
            .map_err(|_| SourceError::Timeout {
                url: shown.to_owned(),
                secs: ceil_secs(if stalled {
                    self.stall
                } else {
                    self.started.elapsed()
                }),
            })
    }
}

/// An instant no timer reaches (about 30 years from now).
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365 * 30)
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Classifies a reqwest error: connection problems are `Unreachable`, broken transfers are
/// `Transfer`, both transient; a client that cannot even build the request is `Invalid`.
pub fn request_error(opts: &HttpOptions, shown: &str, e: reqwest::Error) -> SourceError {
    let url = shown.to_owned();
    // reqwest's message names the URL it was requesting, query string included.
    let e = e.without_url();
    let reason = chain(&e);
    if let Some(refused) = url::refused_redirect(&e) {
        return SourceError::RedirectRefused {
            url,
            reason: refused.to_string(),
        };
    }
    if let Some(reason) = tls_failure(&e) {
        return SourceError::Tls { url, reason };
    }
    if e.is_timeout() {
        SourceError::Timeout {
            url,
            secs: ceil_secs(opts.connect_timeout),
        }
    } else if e.is_builder() {
        SourceError::Invalid(format!("{url}: {reason}"))
    } else if e.is_redirect() {
        SourceError::Invalid(format!("{url}: redirect loop: {reason}"))
    } else if e.is_connect() {
        SourceError::Unreachable { url, reason }
    } else if e.is_body() || e.is_decode() {
        SourceError::Transfer { url, reason }
    } else {
        // Request errors without a connect failure: typically a pooled connection that
        // the server closed as we reused it.
        SourceError::Unreachable { url, reason }
    }
}

/// What to tell about a TLS failure among the causes of `e` (rustls errors travel inside
/// `io::Error`s, whose `source` skips them).
fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    use rustls::{AlertDescription as A, Error as T};
    let mut cause = Some(e);
    while let Some(c) = cause {
        match rustls_error(c) {
            Some(T::InvalidCertificate(why)) => {
                return Some(format!(
                    "the server's certificate is not trusted ({why}); trust its CA with \
                     --cacert PEM (or the OS store with --system-roots)"
                ))
            }
            Some(T::AlertReceived(
                alert @ (A::CertificateRequired
                | A::HandshakeFailure
                | A::BadCertificate
                | A::UnknownCA
                | A::CertificateUnknown
                | A::AccessDenied),
            )) => {
                return Some(format!(
                    "the server refused the handshake ({alert:?}): it requires a client \
                     certificate it trusts (--client-cert PEM --client-key PEM)"
                ))
            }
            Some(other) => return Some(other.to_string()),
            None => cause = c.source(),
        }
    }
    None
}

/// `e` as a rustls error, also when wrapped in (nested) `io::Error`s.
fn rustls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(tls) = e.downcast_ref::<rustls::Error>() {
        return Some(tls);
    }
    let inner = e.downcast_ref::<std::io::Error>()?.get_ref()?;
    rustls_error(inner)
}

/// An error and all its causes on one line (reqwest's own message omits the cause, which
/// is where "Connection refused" lives).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
