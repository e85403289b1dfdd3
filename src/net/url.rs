//! URLs of HTTP sources: the redacted form shown in logs, errors and status output, the
//! credential-free form recorded on disk as the target's identity, and the redirect policy.
//!
//! Secrets live in two places of a URL: the userinfo (`user:password@`) and the query string
//! (presigned URLs carry their signature there, e.g. `?X-Amz-Signature=...`). Neither is ever
//! written to disk or shown: [`redact_url`] hides both, [`identity_url`] removes both.

use std::fmt;

use reqwest::redirect::{Attempt, Policy};
use reqwest::Url;

/// Most redirects followed for one request.
const MAX_REDIRECTS: usize = 10;

/// `raw` with every secret hidden, for logs, errors and status output: a userinfo becomes
/// `***@`, a query string `?***`, a fragment is dropped. Works on the text (also on a URL
/// that does not parse); a string without `://` (a local path) is returned unchanged.
pub fn redact_url(raw: &str) -> String {
    let Some((scheme, rest)) = raw.split_once("://") else {
        return raw.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let host = match authority.rfind('@') {
        Some(at) => format!("***@{}", &authority[at + 1..]),
        None => authority.to_string(),
    };
    let tail = tail.split('#').next().unwrap_or_default();
    let tail = match tail.split_once('?') {
        Some((path, _)) => format!("{path}?***"),
        None => tail.to_string(),
    };
    format!("{scheme}://{host}{tail}")
}

/// The form of a target URL recorded on disk: `http(s)` URLs lose their userinfo, query
/// string and fragment (credentials are given again at run time with `--target`); other
/// strings (paths, `file://`) are kept as given. A URL that does not parse is redacted
/// ([`redact_url`]) rather than kept verbatim.
pub fn identity_url(raw: &str) -> String {
    let raw = raw.trim();
    if !(raw.starts_with("http://") || raw.starts_with("https://")) {
        return raw.to_string();
    }
    match Url::parse(raw) {
        Ok(mut url) => {
            // Cannot fail for http(s) URLs, which always have a host.
            let _ = url.set_username("");
            let _ = url.set_password(None);
            url.set_query(None);
            url.set_fragment(None);
            url.to_string()
        }
        Err(_) => redact_url(raw),
    }
}

/// True when `url` carries a userinfo or a query string (secrets, see the module docs).
pub fn has_secrets(url: &Url) -> bool {
    !url.username().is_empty() || url.password().is_some() || url.query().is_some()
}

/// A redirect the policy refused; the reason is shown with redacted URLs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedirectRefused {
    /// From `https` to `http`: the bytes would travel unauthenticated.
    #[error(
        "refused a redirect from https to plain http ({to}): the image would travel \
         unauthenticated; give the http:// URL directly if that is really wanted"
    )]
    Downgrade { to: String },
    /// To another scheme, host or port than the URL given.
    #[error(
        "refused a redirect to another origin ({to}); allow it explicitly \
         (--allow-cross-origin-redirects) if that server is trusted"
    )]
    CrossOrigin { to: String },
    /// More than [`MAX_REDIRECTS`] hops.
    #[error("more than {MAX_REDIRECTS} redirects")]
    TooMany,
}

/// Decides one redirect hop from the URL first requested (`first`) to `next`.
pub fn check_redirect(
    first: &Url,
    next: &Url,
    hops: usize,
    allow_cross_origin: bool,
) -> Result<(), RedirectRefused> {
    if hops >= MAX_REDIRECTS {
        return Err(RedirectRefused::TooMany);
    }
    let to = || redact_url(next.as_str());
    if first.scheme() == "https" && next.scheme() != "https" {
        return Err(RedirectRefused::Downgrade { to: to() });
    }
    let same_origin = first.scheme() == next.scheme()
        && first.host_str() == next.host_str()
        && first.port_or_known_default() == next.port_or_known_default();
    if !same_origin && !allow_cross_origin {
        return Err(RedirectRefused::CrossOrigin { to: to() });
    }
    Ok(())
}

/// The client's redirect policy: same-origin redirects are followed; a downgrade from
/// https to http never is; other origins only with `allow_cross_origin`.
pub fn redirect_policy(allow_cross_origin: bool) -> Policy {
    Policy::custom(move |attempt: Attempt<'_>| {
        let previous = attempt.previous();
        let Some(first) = previous.first() else {
            return attempt.follow();
        };
        match check_redirect(first, attempt.url(), previous.len(), allow_cross_origin) {
            Ok(()) => attempt.follow(),
            Err(refused) => attempt.error(refused),
        }
    })
}

/// Finds a [`RedirectRefused`] among the causes of `e`.
pub fn refused_redirect(e: &(dyn std::error::Error + 'static)) -> Option<RedirectRefused> {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(r) = c.downcast_ref::<RedirectRefused>() {
            return Some(r.clone());
        }
        cause = c.source();
    }
    None
}

/// A URL to show: its [`redact_url`] form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redacted(pub String);

impl fmt::Display for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_hides_userinfo_and_query() {
        let cases = [
            (
                "https://user:secret@example.org/img.raw?X-Amz-Signature=top#frag",
                "https://***@example.org/img.raw?***",
            ),
            ("http://token@h:8080?sig=1", "http://***@h:8080?***"),
            ("http://h/a@b/c", "http://h/a@b/c"),
            ("http://u:p@h", "http://***@h"),
            ("/srv/images/a.img", "/srv/images/a.img"),
            ("http://u:p@bad port/x?q", "http://***@bad port/x?***"),
        ];
        for (raw, want) in cases {
            assert_eq!(redact_url(raw), want, "{raw}");
            assert_eq!(Redacted(raw.into()).to_string(), want);
        }
    }

    #[test]
    fn identity_drops_secrets() {
        assert_eq!(
            identity_url(" https://user:secret@example.org:8443/img.raw?X-Amz-Signature=t#f "),
            "https://example.org:8443/img.raw"
        );
        assert_eq!(identity_url("http://h/a.img"), "http://h/a.img");
        assert_eq!(identity_url("/srv/a.img"), "/srv/a.img");
        assert_eq!(identity_url("file:///srv/a.img"), "file:///srv/a.img");
        assert_eq!(
            identity_url("http://u:p@bad port/x?q"),
            "http://***@bad port/x?***"
        );
    }

    #[test]
    fn redirects_keep_origin_and_never_downgrade() {
        let u = |s: &str| Url::parse(s).unwrap();
        let first = u("https://a.example/img");
        assert!(check_redirect(&first, &u("https://a.example/other"), 1, false).is_ok());
        assert!(check_redirect(&first, &u("https://a.example:443/x"), 1, false).is_ok());
        for (next, allowed_with_option) in [
            ("https://b.example/img", true),
            ("https://a.example:8443/img", true),
            ("http://a.example/img", false),
            ("http://b.example/img?sig=1", false),
        ] {
            let next = u(next);
            assert!(check_redirect(&first, &next, 1, false).is_err(), "{next}");
            assert_eq!(
                check_redirect(&first, &next, 1, true).is_ok(),
                allowed_with_option,
                "{next}"
            );
        }
        let refused = check_redirect(&first, &u("http://b.example/x?sig=top"), 1, true);
        assert!(!refused.unwrap_err().to_string().contains("top"));
        let plain = u("http://a.example/img");
        assert!(check_redirect(&plain, &u("https://a.example/img"), 1, false).is_err());
        assert!(check_redirect(&plain, &u("https://a.example/img"), 1, true).is_ok());
        assert_eq!(
            check_redirect(&plain, &plain, MAX_REDIRECTS, true),
            Err(RedirectRefused::TooMany)
        );
    }
}
