//! [`CachedSource`]: a [`RemoteSource`] that reads through a [`SharedCache`].

use std::sync::Arc;

use super::entry::Key;
use super::{CacheConfig, SharedCache};
use crate::net::identity_url;
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
    Ok(SharedCache::open(cfg)?)
}

/// Most bytes one origin request of a run of missing chunks asks for.
const MAX_RUN_BYTES: u64 = 16 << 20;

impl CachedSource {
    /// The cache key of chunk `c`; `None` for a chunk-store zero chunk (never fetched).
    fn key(&self, c: u64) -> Option<Key> {
        match &self.keying {
            Keying::Raw { image } => Some(Key::Raw {
                image: image.clone(),
                index: c,
            }),
            Keying::Store(store) => store.chunk_hash(c).map(Key::Store),
        }
    }

    /// Image bytes `[start, end)` of chunk `c`.
    fn bounds(&self, c: u64) -> (u64, u64) {
        let start = c * self.chunk_size;
        (start, (start + self.chunk_size).min(self.size()))
    }

    /// Verified bytes of chunk `c` and, when it was missing, of the missing chunks after
    /// it up to chunk `last` (one origin request for the run). Returns the bytes and the
    /// image offset they start at.
    fn chunks_from(
        &self,
        c: u64,
        key: Key,
        last: u64,
        cancel: &CancellationToken,
    ) -> Result<(Vec<u8>, u64), SourceError> {
        let (start, end) = self.bounds(c);
        let mut first = vec![0u8; (end - start) as usize];
        if self.cache.lookup(&key, &mut first) {
            return Ok((first, start));
        }
        let Some(lock) = self.cache.lock_entry(&key, &mut first, cancel)? else {
            return Ok((first, start)); // fetched by another process meanwhile
        };
        if self.cache.recheck(&key, &mut first) {
            return Ok((first, start));
        }
        // Extend the run with the next missing chunks whose locks are free.
        let mut run = vec![(key, lock)];
        let mut probe = vec![0u8; self.chunk_size as usize];
        let max_chunks = (MAX_RUN_BYTES / self.chunk_size).max(1);
        let mut n = c + 1;
        while n <= last && n - c < max_chunks {
            let Some(k) = self.key(n) else { break };
            let Some(l) = self.cache.try_lock_entry(&k) else {
                break;
            };
            let (s, e) = self.bounds(n);
            if self.cache.recheck(&k, &mut probe[..(e - s) as usize]) {
                break;
            }
            run.push((k, l));
            n += 1;
        }
        let run_end = self.bounds(n - 1).1;
        let mut bytes = vec![0u8; (run_end - start) as usize];
        self.inner.read_at_cancellable(start, &mut bytes, cancel)?;
        for (i, (k, _lock)) in run.iter().enumerate() {
            let (s, e) = self.bounds(c + i as u64);
            self.cache
                .store(k, &bytes[(s - start) as usize..(e - start) as usize]);
        }
        Ok((bytes, start))
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
            let at = (pos - offset) as usize;
            let Some(key) = self.key(c) else {
                // A zero chunk: the store fills it without fetching.
                let to = self.bounds(c).1.min(end);
                let piece = &mut buf[at..at + (to - pos) as usize];
                self.inner.read_at_cancellable(pos, piece, cancel)?;
                pos = to;
                continue;
            };
            let last = (end - 1) / self.chunk_size;
            let (bytes, start) = self.chunks_from(c, key, last, cancel)?;
            let to = (start + bytes.len() as u64).min(end);
            buf[at..at + (to - pos) as usize]
                .copy_from_slice(&bytes[(pos - start) as usize..(to - start) as usize]);
            pos = to;
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
