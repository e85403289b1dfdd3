//! How much a store holds and how much its images share.
//!
//! Definitions (also in `docs/chunk-store.md`): a *distinct chunk* is a distinct BLAKE3
//! hash among an image's non-zero chunks; its size is its uncompressed length. A distinct
//! chunk is *shared* when more than one image (index) references it, *unique* when exactly
//! one does. Zero chunks are neither: they are never stored. Chunks repeated inside one
//! image count once for that image and do not make it shared.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::path::Path;

use super::index::{ChunkEntry, ChunkHash, Index, Trust};
use super::layout::{self, StoreDir};
use super::StoreError;

/// Figures for one image.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ImageStats {
    /// Image name.
    pub name: String,
    /// Hash of its index (hex).
    pub index_hash: String,
    /// Key id of the signer, if the index is signed (not verified here).
    pub signed_by: Option<String>,
    /// Image size: logical bytes.
    pub logical_bytes: u64,
    /// Chunk size.
    pub chunk_size: u64,
    /// Chunks of the image.
    pub chunks: u64,
    /// All-zero chunks.
    pub zero_chunks: u64,
    /// Bytes in all-zero chunks.
    pub zero_bytes: u64,
    /// Distinct non-zero chunks.
    pub distinct_chunks: u64,
    /// Their bytes.
    pub distinct_bytes: u64,
    /// Distinct chunks no other image references.
    pub unique_chunks: u64,
    /// Their bytes.
    pub unique_bytes: u64,
    /// Distinct chunks at least one other image references too.
    pub shared_chunks: u64,
    /// Their bytes.
    pub shared_bytes: u64,
    /// On-disk bytes of the objects this image references (shared ones included).
    pub stored_bytes: u64,
    /// Referenced objects missing from `chunks/` (a damaged store).
    pub missing_objects: u64,
}

/// Figures for the whole store.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StoreTotals {
    /// Number of images.
    pub images: u64,
    /// Sum of image sizes.
    pub logical_bytes: u64,
    /// Sum of all-zero bytes over images.
    pub zero_bytes: u64,
    /// Distinct non-zero chunks over all images.
    pub distinct_chunks: u64,
    /// Their bytes (what the store holds before compression).
    pub distinct_bytes: u64,
    /// Distinct chunks referenced by exactly one image.
    pub unique_chunks: u64,
    /// Their bytes.
    pub unique_bytes: u64,
    /// Distinct chunks referenced by more than one image, each counted once.
    pub shared_chunks: u64,
    /// Their bytes, each counted once.
    pub shared_bytes: u64,
    /// Referenced object files present.
    pub stored_objects: u64,
    /// Their on-disk bytes (after compression).
    pub stored_bytes: u64,
    /// Referenced objects missing (a damaged store).
    pub missing_objects: u64,
    /// Object files no index references (what gc would delete).
    pub unreferenced_objects: u64,
    /// Their on-disk bytes.
    pub unreferenced_bytes: u64,
}

/// Per-image figures and totals.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StoreStats {
    /// One entry per image, by name.
    pub images: Vec<ImageStats>,
    /// The whole store.
    pub total: StoreTotals,
}

/// Computes [`StoreStats`] for the store at `store_dir`. Holds the store lock shared, so
/// it sees no gc half done. Fails if an index does not parse (its figures would be wrong).
pub fn stats(store_dir: &Path) -> Result<StoreStats, StoreError> {
    let store = StoreDir::new(store_dir);
    let _lock = store.lock_shared()?;

    let mut indexes = Vec::new();
    for name in store.list_indexes()? {
        let path = store.index_path(&name);
        let bytes = fs::read(&path).map_err(|e| StoreError::io(&path, e))?;
        indexes.push((name, path, bytes));
    }

    // Sizes of the object files present.
    let mut on_disk: HashMap<(ChunkHash, bool), u64> = HashMap::new();
    let chunks_dir = store.chunks_dir();
    for sub in fs::read_dir(&chunks_dir).map_err(|e| StoreError::io(&chunks_dir, e))? {
        let sub = sub.map_err(|e| StoreError::io(&chunks_dir, e))?;
        if !sub.path().is_dir() {
            continue;
        }
        let sub_path = sub.path();
        for f in fs::read_dir(&sub_path).map_err(|e| StoreError::io(&sub_path, e))? {
            let f = f.map_err(|e| StoreError::io(&sub_path, e))?;
            if let Some(obj) = f.file_name().to_str().and_then(layout::parse_object_name) {
                let len = f
                    .metadata()
                    .map_err(|e| StoreError::io(&f.path(), e))?
                    .len();
                on_disk.insert(obj, len);
            }
        }
    }

    compute(indexes, &on_disk)
}

/// [`StoreStats`] from every index (name, location for errors, bytes) and the size of
/// every object present (by hash and form): the part shared by directory and S3 stores.
pub(crate) fn compute(
    indexes: Vec<(String, std::path::PathBuf, Vec<u8>)>,
    on_disk: &HashMap<(ChunkHash, bool), u64>,
) -> Result<StoreStats, StoreError> {
    // Per image: distinct chunks with their lengths and forms.
    struct Img {
        stats: ImageStats,
        distinct: HashMap<ChunkHash, (u64, bool)>,
    }
    let mut imgs = Vec::new();
    for (name, path, bytes) in indexes {
        let parsed =
            Index::parse(&bytes, Trust::Unverified).map_err(|source| StoreError::Index {
                path: path.clone(),
                source,
            })?;
        let idx = &parsed.index;
        let mut s = ImageStats {
            name,
            index_hash: parsed.hash.to_hex(),
            signed_by: parsed.signer.map(|k| k.to_string()),
            logical_bytes: idx.image_size(),
            chunk_size: idx.chunk_size(),
            chunks: idx.chunk_count(),
            ..ImageStats::default()
        };
        let mut distinct = HashMap::new();
        for (c, e) in idx.entries().iter().enumerate() {
            let len = idx.chunk_len(c as u64);
            match e {
                ChunkEntry::Zero => {
                    s.zero_chunks += 1;
                    s.zero_bytes += len;
                }
                ChunkEntry::Stored { hash, compressed } => {
                    distinct.entry(*hash).or_insert((len, *compressed));
                }
            }
        }
        imgs.push(Img { stats: s, distinct });
    }

    // How many images reference each distinct chunk.
    let mut refs: HashMap<ChunkHash, (u32, u64)> = HashMap::new();
    for img in &imgs {
        for (h, (len, _)) in &img.distinct {
            refs.entry(*h).or_insert((0, *len)).0 += 1;
        }
    }

    let mut total = StoreTotals::default();
    let mut referenced_objects: HashSet<(ChunkHash, bool)> = HashSet::new();
    for img in &mut imgs {
        let s = &mut img.stats;
        for (h, (len, compressed)) in &img.distinct {
            s.distinct_chunks += 1;
            s.distinct_bytes += len;
            if refs[h].0 > 1 {
                s.shared_chunks += 1;
                s.shared_bytes += len;
            } else {
                s.unique_chunks += 1;
                s.unique_bytes += len;
            }
            match on_disk.get(&(*h, *compressed)) {
                Some(n) => s.stored_bytes += n,
                None => s.missing_objects += 1,
            }
            referenced_objects.insert((*h, *compressed));
        }
        total.images += 1;
        total.logical_bytes += s.logical_bytes;
        total.zero_bytes += s.zero_bytes;
    }
    for (count, len) in refs.values() {
        total.distinct_chunks += 1;
        total.distinct_bytes += len;
        if *count > 1 {
            total.shared_chunks += 1;
            total.shared_bytes += len;
        } else {
            total.unique_chunks += 1;
            total.unique_bytes += len;
        }
    }
    for obj in &referenced_objects {
        match on_disk.get(obj) {
            Some(n) => {
                total.stored_objects += 1;
                total.stored_bytes += n;
            }
            None => total.missing_objects += 1,
        }
    }
    for (obj, n) in on_disk {
        if !referenced_objects.contains(obj) {
            total.unreferenced_objects += 1;
            total.unreferenced_bytes += n;
        }
    }

    Ok(StoreStats {
        images: imgs.into_iter().map(|i| i.stats).collect(),
        total,
    })
}
