//! `POST /v1/target-urls`: replace the target's URLs while serving (a presigned URL that
//! expired), body `{"urls": ["https://...", ...]}` (several URLs are mirrors). The service
//! checks the new URLs against the pinned identity before using them.
//!
//! The URLs carry secrets (signatures, credentials): they are never logged or echoed; a
//! body that does not parse gets a message with the position of the fault, not its text.

use std::fmt;

use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetUrlsRequest {
    urls: Vec<String>,
}

/// URLs that may carry secrets: `Debug` shows them redacted.
pub(super) struct SecretUrls(pub(super) Vec<String>);

impl fmt::Debug for SecretUrls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: Vec<String> = self.0.iter().map(|u| crate::net::redact_url(u)).collect();
        f.debug_tuple("SecretUrls").field(&shown).finish()
    }
}

const USAGE: &str = r#"expected a JSON object {"urls": ["https://...", ...]}"#;

/// Parses the body of `POST /v1/target-urls`; the error never contains the body's text.
pub(super) fn parse_target_urls(body: &[u8]) -> Result<SecretUrls, String> {
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(format!("invalid body: {USAGE}"));
    }
    let r: TargetUrlsRequest = serde_json::from_slice(body).map_err(|e| {
        format!(
            "invalid body ({:?} error at line {} column {}): {USAGE}",
            e.classify(),
            e.line(),
            e.column()
        )
    })?;
    if r.urls.is_empty() || r.urls.iter().any(|u| u.trim().is_empty()) {
        return Err(format!("no URL given (or an empty one): {USAGE}"));
    }
    Ok(SecretUrls(r.urls))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_strict_and_never_echoed() {
        let ok = parse_target_urls(br#"{"urls": ["https://h/a.img?sig=s3cret"]}"#).unwrap();
        assert_eq!(ok.0, ["https://h/a.img?sig=s3cret"]);
        assert!(!format!("{ok:?}").contains("s3cret"));
        for bad in [
            &br#"{"urls": "https://h/a.img?sig=s3cret"}"#[..],
            br#"["https://h/a.img?sig=s3cret"]"#,
            br#"{"urls": ["https://h/a.img?sig=s3cret"], "x": 1}"#,
            br#"{"urls": []}"#,
            br#"{"urls": ["https://h/a.img?sig=s3cret""#,
            b"",
        ] {
            let e = parse_target_urls(bad).unwrap_err();
            assert!(!e.contains("s3cret") && e.contains("urls"), "{e}");
        }
    }
}
