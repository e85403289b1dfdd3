//! [`CachedSource`]: a [`RemoteSource`] that reads through a [`SharedCache`].

use std::sync::Arc;

use super::entry::Key;
use super::{CacheConfig, SharedCache};
use crate::source::http::identity_url;
use crate::source::store::StoreSource;
use crate::source::{check_range, CancellationToken, RemoteSource, SourceError, SourceIdentity};

/// Size of the cache entries of a raw image (the last one may be shorter).
pub const RAW_CHUNK_SIZE: u64 = 256 << 10;

/// How the chunks of the wrapped source are named in the cache.
enum Keying {
    /// A raw image: chunk index below the image's directory.
    Raw { image: String },
    /// A chunk store: the index's hash of each chunk (zero chunks are not cached).
    Store(Arc<StoreSource>),
}

/// A source whose chunks go through a host-wide [`SharedCache`]. Same identity, name and
/// bytes as the wrapped source.
pub struct CachedSource {
    inner: Arc<dyn RemoteSource>,
    cache: Arc<SharedCache>,
    keying: Keying,
    chunk_size: u64,
}

impl std::fmt::Debug for CachedSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedSource")
            .field("inner", &self.inner)
            .field("cache", &self.cache.root())
            .finish_non_exhaustive()
    }
}

/// `src`, a raw image opened from `urls`, read through the cache `cfg` (unchanged when
/// `cfg` is `None`).
pub fn cached_raw(
    src: Arc<dyn RemoteSource>,
    urls: &[String],
    cfg: Option<&CacheConfig>,
) -> Result<Arc<dyn RemoteSource>, SourceError> {
    let Some(cfg) = cfg else { return Ok(src) };
    let cache = open(cfg)?;
    let id = src.identity();
    let mut shown: Vec<String> = urls.iter().map(|u| identity_url(u)).collect();
    shown.sort();
    let text = format!(
        "kind {}\nsize {}\nvalidator {}\nchunk-size {RAW_CHUNK_SIZE}\nurls {}\n",
        id.kind,
        id.size,
        id.validator,
        shown.join(" ")
    );
    let image = blake3::hash(text.as_bytes()).to_hex().to_string();
    cache.describe_image(&image, &text);
    Ok(Arc::new(CachedSource {
        inner: src,
        cache,
        keying: Keying::Raw { image },
        chunk_size: RAW_CHUNK_SIZE,
    }))
}

/// `store` read through the cache `cfg`, its chunks keyed by their hash (unchanged when
/// `cfg` is `None`).
pub fn cached_store(
    store: Arc<StoreSource>,
    cfg: Option<&CacheConfig>,
) -> Result<Arc<dyn RemoteSource>, SourceError> {
    let Some(cfg) = cfg else { return Ok(store) };
    let cache = open(cfg)?;
    Ok(Arc::new(CachedSource {
        inner: store.clone(),
        cache,
        chunk_size: store.chunk_size(),
        keying: Keying::Store(store),
    }))
}

fn open(cfg: &CacheConfig) -> Result<Arc<SharedCache>, SourceError> {
    SharedCache::open(cfg).map_err(|e| SourceError::Invalid(format!("(--cache): {e}")))
}

impl CachedSource {
    /// Reads chunk `c`'s part `[pos, pos + piece.len())` (absolute offsets).
    fn read_piece(
        &self,
        c: u64,
        pos: u64,
        piece: &mut [u8],
        cancel: &CancellationToken,
    ) -> Result<(), SourceError> {
        let start = c * self.chunk_size;
        let end = (start + self.chunk_size).min(self.size());
        let key = match &self.keying {
            Keying::Raw { image } => Key::Raw {
                image: image.clone(),
                index: c,
            },
            Keying::Store(store) => match store.chunk_hash(c) {
                Some(h) => Key::Store(h),
                // A zero chunk: the store fills it without fetching.
                None => return self.inner.read_at_cancellable(pos, piece, cancel),
            },
        };
        let fetch = |buf: &mut [u8]| self.inner.read_at_cancellable(start, buf, cancel);
        if pos == start && piece.len() as u64 == end - start {
            return self.cache.get(&key, piece, cancel, fetch);
        }
        let mut whole = vec![0u8; (end - start) as usize];
        self.cache.get(&key, &mut whole, cancel, fetch)?;
        let from = (pos - start) as usize;
        piece.copy_from_slice(&whole[from..from + piece.len()]);
        Ok(())
    }
}

impl RemoteSource for CachedSource {
    fn identity(&self) -> &SourceIdentity {
        self.inner.identity()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        self.read_at_cancellable(offset, buf, &CancellationToken::new())
    }

    fn read_at_cancellable(
        &self,
        offset: u64,
        buf: &mut [u8],
        cancel: &CancellationToken,
    ) -> Result<(), SourceError> {
        check_range(offset, buf.len(), self.size())?;
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            if cancel.is_cancelled() {
                return Err(SourceError::Cancelled);
            }
            let c = pos / self.chunk_size;
            let piece_end = ((c + 1) * self.chunk_size).min(end);
            let at = (pos - offset) as usize;
            let piece = &mut buf[at..at + (piece_end - pos) as usize];
            self.read_piece(c, pos, piece, cancel)?;
            pos = piece_end;
        }
        Ok(())
    }

    fn known_zero(&self, offset: u64, len: u64) -> Option<bool> {
        self.inner.known_zero(offset, len)
    }

    fn replace_urls(&self, urls: &[String]) -> Result<(), SourceError> {
        self.inner.replace_urls(urls)
    }

    fn name(&self) -> String {
        self.inner.name()
    }
}
