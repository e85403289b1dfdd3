//! Opening the pinned target named on the command line or recorded in a superblock.
//!
//! A target is one of: `http(s)://` URLs of a raw image (several = mirrors), an `s3://bucket/key`
//! object (docs/s3.md), a local path
//! or `file://` URL of a raw image, or a chunk-store image named by the location of its
//! index file, `<store>/indexes/<name>.idx` (a path, an `http(s)://` or `s3://` URL; see
//! docs/chunk-store.md). A new chunk-store target is trusted only through a signing key
//! (or an explicit insecure opt-out); a prepared disk pins the index hash, so reopening
//! it later needs no key: an index whose hash differs is refused.
//!
//! # Recorded identity and secrets
//! The superblock records what identifies the target, never what grants access to it: each
//! URL in its [`identity_url`] form (no `user:password@`, no query string, no fragment),
//! next to the kind, size and validator that pin the image. A target that needs credentials
//! or a presigned query string is reopened by giving the full URL again at run time
//! (`serve --target URL`, or `--target` of `hydrate`/`commit`); the pinned validator, not
//! the URL, decides whether it is the same image. Errors show URLs only in their
//! [`redact_url`] form.

use std::path::Path;
use std::sync::Arc;

use boot_relocator::{Superblock, TargetRecord};

use crate::net::{identity_url, redact_url};
use crate::source::cache;
use crate::source::store::{IndexTrust, StoreSource, StoreSourceOptions};
use crate::source::{
    FileSource, HttpOptions, HttpSource, RemoteSource, SourceError, SourceIdentity,
};
use crate::store::fetch::FetchOptions;

/// True when `target` names a chunk-store image (the location of its `.idx` index file).
pub fn is_store_target(target: &str) -> bool {
    target
        .trim_end_matches('/')
        .ends_with(crate::store::layout::INDEX_SUFFIX)
}

/// Opens the target at `urls` (mirrors of one image: all `http(s)://`, or a single local
/// path / `file://` URL). With `expected`, refuses an image other than the pinned one.
/// A chunk-store target opens only with `expected` (its pinned index hash); a new one
/// needs [`open_target`] with a trust policy.
pub fn open_source(
    urls: &[String],
    expected: Option<&SourceIdentity>,
    http: &HttpOptions,
) -> Result<Arc<dyn RemoteSource>, SourceError> {
    open_target(urls, expected, http, None)
}

/// [`open_source`] with the trust policy for a chunk-store index that is not pinned yet
/// (`None`: refuse unpinned store targets).
pub fn open_target(
    urls: &[String],
    expected: Option<&SourceIdentity>,
    http: &HttpOptions,
    trust: Option<&IndexTrust>,
) -> Result<Arc<dyn RemoteSource>, SourceError> {
    let Some(first) = urls.first() else {
        return Err(SourceError::Invalid("no target given".into()));
    };
    if urls.iter().any(|u| is_store_target(u)) {
        let store = Arc::new(open_store(urls, expected, http, trust)?);
        return cache::cached_store(store, http.cache.as_ref());
    }
    if urls.iter().any(|u| crate::net::s3::is_s3_url(u)) {
        let [url] = urls else {
            return Err(SourceError::Invalid(
                "an s3:// target takes exactly one --target (no mirrors)".into(),
            ));
        };
        let src = Arc::new(crate::source::s3::S3Source::open(
            url, expected, &http.s3, http,
        )?);
        return cache::cached_raw(src, urls, http.cache.as_ref());
    }
    let is_http = |u: &String| u.starts_with("http://") || u.starts_with("https://");
    if urls.iter().all(is_http) {
        let src = Arc::new(HttpSource::open(urls, expected, http.clone())?);
        return cache::cached_raw(src, urls, http.cache.as_ref());
    }
    if urls.len() > 1 {
        return Err(SourceError::Invalid(
            "mirrors (several --target) must all be http:// or https:// URLs".into(),
        ));
    }
    if first.contains("://") && !first.starts_with("file://") {
        return Err(SourceError::Invalid(format!(
            "{}: unsupported URL scheme (http, https, file or a path)",
            redact_url(first)
        )));
    }
    let path = first.strip_prefix("file://").unwrap_or(first);
    Ok(Arc::new(FileSource::open(Path::new(path), expected)?))
}

/// Opens a chunk-store image from the location of its index file.
///
/// Pinned (`expected` given): the index is parsed without a signature check and accepted
/// only if its hash is the pinned one; the hash was checked against a trusted key (or
/// explicitly not) when the disk was prepared. Not pinned: `trust` decides.
pub fn open_store(
    urls: &[String],
    expected: Option<&SourceIdentity>,
    http: &HttpOptions,
    trust: Option<&IndexTrust>,
) -> Result<StoreSource, SourceError> {
    let [url] = urls else {
        return Err(SourceError::Invalid(
            "a chunk-store target takes exactly one --target (store mirrors are not supported)"
                .into(),
        ));
    };
    let url = url.strip_prefix("file://").unwrap_or(url);
    let shown = redact_url(url);
    if !is_store_target(url) {
        return Err(SourceError::Invalid(format!(
            "{shown}: a chunk-store target is the location of an index file (…/indexes/NAME.idx)"
        )));
    }
    let trust = match (expected, trust) {
        (Some(_), _) => IndexTrust::InsecureUnverified,
        (None, Some(t)) => t.clone(),
        (None, None) => {
            return Err(SourceError::Invalid(format!(
                "{shown}: a chunk-store index must be verified: give --trusted-key FILE.pub \
                 (or --insecure-unverified-index to skip the check)"
            )))
        }
    };
    let fetch = FetchOptions {
        http: http.clone(),
        ..FetchOptions::default()
    };
    let src = StoreSource::open_index(
        url,
        StoreSourceOptions {
            trust,
            fetch,
            cache_chunks: 64,
        },
    )?;
    if let Some(want) = expected {
        let found = src.identity();
        if found != want {
            return Err(SourceError::Changed {
                url: shown,
                expected: want.to_string(),
                found: found.to_string(),
            });
        }
    }
    Ok(src)
}

/// The identity a prepared disk pinned.
pub fn pinned_identity(sb: &Superblock) -> SourceIdentity {
    SourceIdentity {
        kind: sb.target.kind.clone(),
        size: sb.layout.target_size,
        validator: sb.target.validator.clone(),
    }
}

/// What to record in the superblock for a source opened from `urls`: the pinned identity
/// and the URLs without their secrets ([`identity_url`]; see the module docs).
pub fn target_record(src: &dyn RemoteSource, urls: &[String]) -> TargetRecord {
    let id = src.identity();
    TargetRecord {
        kind: id.kind.clone(),
        validator: id.validator.clone(),
        urls: urls.iter().map(|u| identity_url(u)).collect(),
    }
}

/// The recorded target URLs as shown to a user (status text, JSON, control API): each in
/// its [`redact_url`] form, so that even a disk prepared before secrets were stripped
/// never shows them.
pub fn shown_urls(urls: &[String]) -> Vec<String> {
    urls.iter().map(|u| redact_url(u)).collect()
}
