//! Garbage collection: delete chunk objects that no index references.
//!
//! Safety against a concurrent publish rests on the store lock (see `docs/chunk-store.md`,
//! "gc and concurrent publish"): gc holds it exclusively for its whole run, publish holds
//! it shared from before its first "does this object exist?" check until after its index
//! is durable. So while gc runs, no publish is in progress: the set of indexes gc reads is
//! the set of finished publishes, and no publish can be relying on an object gc is about to
//! delete. gc refuses to delete anything when any index fails to parse, because then it
//! does not know what is referenced.

use std::collections::HashSet;
use std::fs;
use std::path::Path;
use std::time::Instant;

use super::index::{ChunkEntry, ChunkHash, Index, Trust};
use super::layout::{self, StoreDir};
use super::StoreError;

/// What gc did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct GcReport {
    /// Indexes read.
    pub indexes: usize,
    /// Distinct objects (hash and form) the indexes reference.
    pub referenced_objects: usize,
    /// Chunk object files looked at.
    pub objects_scanned: u64,
    /// Unreferenced objects deleted (or that would be, in a dry run).
    pub objects_deleted: u64,
    /// Bytes those objects took on disk.
    pub bytes_freed: u64,
    /// Files under `chunks/` that are not chunk objects; left alone.
    pub foreign_files: u64,
    /// Leftover temporary files of interrupted writers, removed.
    pub tmp_files_removed: u64,
    /// Nothing was deleted.
    pub dry_run: bool,
    /// Wall time, seconds.
    pub elapsed_secs: f64,
}

/// Deletes every chunk object no index references, and leftover temporary files.
pub fn gc(store_dir: &Path) -> Result<GcReport, StoreError> {
    gc_with(store_dir, false)
}

/// [`gc`], optionally only reporting what it would delete.
pub fn gc_with(store_dir: &Path, dry_run: bool) -> Result<GcReport, StoreError> {
    let started = Instant::now();
    let store = StoreDir::new(store_dir);
    if !store.chunks_dir().is_dir() || !store.indexes_dir().is_dir() {
        return Err(StoreError::io(
            store_dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "not a chunk store"),
        ));
    }
    let _lock = store.lock_exclusive()?;
    let mut report = GcReport {
        dry_run,
        ..GcReport::default()
    };

    let mut referenced: HashSet<(ChunkHash, bool)> = HashSet::new();
    for name in store.list_indexes()? {
        let path = store.index_path(&name);
        let bytes = fs::read(&path).map_err(|e| StoreError::io(&path, e))?;
        let parsed =
            Index::parse(&bytes, Trust::Unverified).map_err(|source| StoreError::Index {
                path: path.clone(),
                source,
            })?;
        for e in parsed.index.entries() {
            if let ChunkEntry::Stored { hash, compressed } = e {
                referenced.insert((*hash, *compressed));
            }
        }
        report.indexes += 1;
    }
    report.referenced_objects = referenced.len();

    let chunks_dir = store.chunks_dir();
    for sub in fs::read_dir(&chunks_dir).map_err(|e| StoreError::io(&chunks_dir, e))? {
        let sub = sub.map_err(|e| StoreError::io(&chunks_dir, e))?;
        let sub_path = sub.path();
        let sub_name = sub.file_name();
        let prefix = sub_name.to_str().unwrap_or("");
        if !sub_path.is_dir() {
            report.foreign_files += 1;
            continue;
        }
        let mut deleted_here = false;
        for f in fs::read_dir(&sub_path).map_err(|e| StoreError::io(&sub_path, e))? {
            let f = f.map_err(|e| StoreError::io(&sub_path, e))?;
            let file_name = f.file_name();
            let object = file_name
                .to_str()
                .and_then(layout::parse_object_name)
                .filter(|(h, _)| h.to_hex().starts_with(prefix) && prefix.len() == 2);
            let Some(object) = object else {
                report.foreign_files += 1;
                continue;
            };
            report.objects_scanned += 1;
            if referenced.contains(&object) {
                continue;
            }
            let path = f.path();
            let len = f.metadata().map(|m| m.len()).unwrap_or(0);
            if !dry_run {
                match fs::remove_file(&path) {
                    Ok(()) => deleted_here = true,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(StoreError::io(&path, e)),
                }
            }
            report.objects_deleted += 1;
            report.bytes_freed += len;
        }
        if deleted_here {
            layout::sync_dir(&sub_path)?;
        }
    }

    // Under the exclusive lock no writer is active, so every temporary file is a leftover.
    let tmp = store.tmp_dir();
    if tmp.is_dir() {
        for f in fs::read_dir(&tmp).map_err(|e| StoreError::io(&tmp, e))? {
            let f = f.map_err(|e| StoreError::io(&tmp, e))?;
            let path = f.path();
            if !path.is_file() {
                continue;
            }
            if !dry_run {
                fs::remove_file(&path).map_err(|e| StoreError::io(&path, e))?;
            }
            report.tmp_files_removed += 1;
        }
    }

    report.elapsed_secs = started.elapsed().as_secs_f64();
    Ok(report)
}
