//! Opening the pinned target named on the command line or recorded in a superblock.

use std::path::Path;
use std::sync::Arc;

use boot_relocator::{Superblock, TargetRecord};

use crate::source::{
    FileSource, HttpOptions, HttpSource, RemoteSource, SourceError, SourceIdentity,
};

/// Opens the target at `urls` (mirrors of one image: all `http(s)://`, or a single local
/// path / `file://` URL). With `expected`, refuses an image other than the pinned one.
pub fn open_source(
    urls: &[String],
    expected: Option<&SourceIdentity>,
    http: &HttpOptions,
) -> Result<Arc<dyn RemoteSource>, SourceError> {
    let Some(first) = urls.first() else {
        return Err(SourceError::Invalid("no target given".into()));
    };
    let is_http = |u: &String| u.starts_with("http://") || u.starts_with("https://");
    if urls.iter().all(is_http) {
        return Ok(Arc::new(HttpSource::open(urls, expected, http.clone())?));
    }
    if urls.len() > 1 {
        return Err(SourceError::Invalid(
            "mirrors (several --target) must all be http:// or https:// URLs".into(),
        ));
    }
    if first.contains("://") && !first.starts_with("file://") {
        return Err(SourceError::Invalid(format!(
            "{first}: unsupported URL scheme (http, https, file or a path)"
        )));
    }
    let path = first.strip_prefix("file://").unwrap_or(first);
    Ok(Arc::new(FileSource::open(Path::new(path), expected)?))
}

/// The identity a prepared disk pinned.
pub fn pinned_identity(sb: &Superblock) -> SourceIdentity {
    SourceIdentity {
        kind: sb.target.kind.clone(),
        size: sb.layout.target_size,
        validator: sb.target.validator.clone(),
    }
}

/// What to record in the superblock for a source opened from `urls`.
pub fn target_record(src: &dyn RemoteSource, urls: &[String]) -> TargetRecord {
    let id = src.identity();
    TargetRecord {
        kind: id.kind.clone(),
        validator: id.validator.clone(),
        urls: urls.to_vec(),
    }
}
