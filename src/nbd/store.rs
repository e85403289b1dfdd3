//! [`StoreCatalog`]: the images of a chunk store as NBD exports.
//!
//! Each image is opened through [`StoreSource`] (index checked against the trusted keys,
//! every chunk against its BLAKE3 hash) once, on first use, and then stays pinned to that
//! index for the life of the server: a client never sees an image change under it. Zero
//! chunks are synthesized; other chunks go through the shared [`ChunkCache`].

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use super::{Catalog, ChunkCache, Export};
use crate::source::cache::SharedCache;
use crate::source::store::{StoreSource, StoreSourceOptions};
use crate::source::RemoteSource;
use crate::store::fetch::StoreLocation;
use crate::store::layout::validate_name;
use crate::store::seen::SeenVersions;
use crate::store::StoreDir;

/// One image of the store, served read-only.
pub struct StoreImage {
    source: StoreSource,
    cache: Arc<ChunkCache>,
    /// Host-wide cache on disk (`export --cache`), behind the memory cache.
    shared: Option<Arc<SharedCache>>,
}

impl StoreImage {
    /// The verified source behind the export.
    pub fn source(&self) -> &StoreSource {
        &self.source
    }
}

impl Export for StoreImage {
    fn size(&self) -> u64 {
        self.source.size()
    }

    fn preferred_block_size(&self) -> u32 {
        // Chunk sizes are powers of two from 4 KiB to 4 MiB: reading whole chunks is what
        // the store is fastest at.
        self.source.chunk_size() as u32
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        let size = self.source.size();
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= size)
            .ok_or_else(|| format!("read {offset}+{} outside the image", buf.len()))?;
        if buf.is_empty() {
            return Ok(());
        }
        let cs = self.source.chunk_size();
        for c in offset / cs..=(end - 1) / cs {
            let c_start = c * cs;
            let from = offset.max(c_start);
            let to = end.min(c_start + cs);
            let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
            match self.source.chunk_hash(c) {
                None => dst.fill(0),
                Some(hash) => {
                    let data = self.cache.get_or_load(hash, || {
                        let len = self.source.index().chunk_len(c) as usize;
                        match &self.shared {
                            Some(s) => s.store_chunk(hash, len, || self.source.read_chunk(c)),
                            None => self.source.read_chunk(c),
                        }
                        .map_err(|e| e.to_string())
                    })?;
                    let src = data
                        .get((from - c_start) as usize..(to - c_start) as usize)
                        .ok_or_else(|| format!("chunk {c} is shorter than the index says"))?;
                    dst.copy_from_slice(src);
                }
            }
        }
        Ok(())
    }
}

/// The images of one store.
pub struct StoreCatalog {
    location: String,
    opts: StoreSourceOptions,
    cache: Arc<ChunkCache>,
    /// Only these names are exported (`None`: every image of a directory store).
    only: Option<Vec<String>>,
    open: Mutex<HashMap<String, Arc<StoreImage>>>,
    /// Highest index version accepted per image: an older one is refused (rollback).
    seen: SeenVersions,
    shared: Option<Arc<SharedCache>>,
}

impl StoreCatalog {
    /// A catalog of the store at `location` (directory or `http(s)://` URL). `only` limits
    /// the exports to these names; a store served over HTTP cannot be listed, so it needs
    /// them. Chunks are fetched with `opts` and kept in `cache`.
    pub fn new(
        location: &str,
        only: Option<Vec<String>>,
        mut opts: StoreSourceOptions,
        cache: Arc<ChunkCache>,
    ) -> Result<Self, String> {
        if let Some(names) = &only {
            for n in names {
                validate_name(n).map_err(|e| e.to_string())?;
            }
        }
        if only.is_none() && !matches!(StoreLocation::parse(location), StoreLocation::Dir(_)) {
            return Err(format!(
                "{}: a store served over HTTP or on S3 cannot be listed: name its images with --image",
                crate::net::redact_url(location)
            ));
        }
        // The shared cache replaces the source's own.
        opts.cache_chunks = 0;
        Ok(StoreCatalog {
            location: location.to_owned(),
            opts,
            cache,
            only,
            open: Mutex::new(HashMap::new()),
            seen: SeenVersions::in_memory(),
            shared: None,
        })
    }

    /// Keeps the chunks in the host-wide cache `shared` too (`export --cache`).
    pub fn with_shared_cache(mut self, shared: Option<Arc<SharedCache>>) -> Self {
        self.shared = shared;
        self
    }

    /// Remembers accepted versions in `seen` (e.g. a file, so that the rollback floor
    /// survives restarts) instead of in memory only.
    pub fn with_seen_versions(mut self, seen: SeenVersions) -> Self {
        self.seen = seen;
        self
    }

    /// Opens every image now (checking each index), so a bad key or a missing image is
    /// reported at start rather than to the first client. Returns the names.
    pub fn open_all(&self) -> Result<Vec<String>, String> {
        let names = self.names()?;
        for n in &names {
            self.image(n)?;
        }
        Ok(names)
    }

    /// The opened image `name` (opening it on first use).
    fn image(&self, name: &str) -> Result<Arc<StoreImage>, String> {
        if let Some(img) = self.open.lock().get(name) {
            return Ok(img.clone());
        }
        let source = StoreSource::open(&self.location, name, self.opts.clone())
            .map_err(|e| format!("image {name:?}: {e}"))?;
        // Rollback: never an older version than one accepted before. (A version-1 index
        // has none; StoreSource accepts it only without a signature check.)
        if let Some(id) = source.image_identity() {
            self.seen
                .accept(name, id)
                .map_err(|e| format!("image {name:?}: {e}"))?;
        }
        tracing::info!(
            image = name,
            version = source.image_identity().map(|i| i.version),
            size = source.size(),
            index = %source.index_hash(),
            signed_by = ?source.signer(),
            "opened image"
        );
        let img = Arc::new(StoreImage {
            source,
            cache: self.cache.clone(),
            shared: self.shared.clone(),
        });
        // If two clients opened it at once, the first one stays pinned.
        Ok(self
            .open
            .lock()
            .entry(name.to_owned())
            .or_insert(img)
            .clone())
    }

    /// True when `name` is one of the exported images (without opening it).
    fn exists(&self, name: &str) -> Result<bool, String> {
        if validate_name(name).is_err() {
            return Ok(false);
        }
        match &self.only {
            Some(only) => Ok(only.iter().any(|n| n == name)),
            None => Ok(self.names()?.iter().any(|n| n == name)),
        }
    }
}

impl Catalog for StoreCatalog {
    fn names(&self) -> Result<Vec<String>, String> {
        match (&self.only, StoreLocation::parse(&self.location)) {
            (Some(only), _) => Ok(only.clone()),
            (None, StoreLocation::Dir(dir)) => StoreDir::new(&dir)
                .list_indexes()
                .map_err(|e| format!("listing the store: {e}")),
            (None, StoreLocation::Http(url) | StoreLocation::S3(url)) => {
                Err(format!("{} cannot be listed", crate::net::redact_url(&url)))
            }
        }
    }

    fn open(&self, name: &str) -> Result<Option<Arc<dyn Export>>, String> {
        // The empty name (the default export) means the only image, if there is one.
        let name = match name {
            "" => match self.names()?.as_slice() {
                [only] => only.clone(),
                _ => return Ok(None),
            },
            n => n.to_owned(),
        };
        if !self.exists(&name)? {
            return Ok(None);
        }
        Ok(Some(self.image(&name)? as Arc<dyn Export>))
    }
}
