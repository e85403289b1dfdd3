//! LRU eviction to the size cap. Runs under the directory-wide lock, so one process at a
//! time scans; an entry another process is reading stays readable after its unlink (the
//! reader opened it first).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::entry::TMP_PREFIX;

/// A temporary file older than this belongs to a writer that died: removed by a scan.
const STALE_TMP: Duration = Duration::from_secs(3600);

/// What a scan found and did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Scan {
    /// Bytes of entries kept.
    pub kept_bytes: u64,
    /// Entries removed to get under the cap.
    pub evicted: u64,
}

/// Removes the least recently used entries below `root` (the `store/` and `raw/` trees)
/// until they hold at most `low_water` bytes, when they hold more than `cap`.
pub(super) fn evict(root: &Path, cap: u64, low_water: u64) -> io::Result<Scan> {
    let mut entries = Vec::new();
    for top in ["store", "raw"] {
        collect(&root.join(top), &mut entries)?;
    }
    let mut total: u64 = entries.iter().map(|e| e.1).sum();
    let mut scan = Scan::default();
    if total > cap {
        entries.sort_by_key(|e| e.0);
        for (_, len, path) in &entries {
            if total <= low_water {
                break;
            }
            match fs::remove_file(path) {
                Ok(()) => {
                    total -= len;
                    scan.evicted += 1;
                }
                // Evicted or replaced meanwhile by a corruption fix: fine either way.
                Err(e) if e.kind() == io::ErrorKind::NotFound => total -= len,
                Err(e) => return Err(e),
            }
        }
    }
    scan.kept_bytes = total;
    Ok(scan)
}

/// Entries (mtime, length, path) two levels below `top` (`top/<dir>/<entry>`); sweeps
/// stale temporary files on the way.
fn collect(top: &Path, out: &mut Vec<(SystemTime, u64, PathBuf)>) -> io::Result<()> {
    let dirs = match fs::read_dir(top) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for dir in dirs {
        let dir = dir?;
        if !dir.file_type()?.is_dir() {
            continue;
        }
        for file in fs::read_dir(dir.path())? {
            let file = file?;
            let Ok(meta) = file.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let mtime = meta.modified()?;
            let name = file.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(TMP_PREFIX) {
                let stale = SystemTime::now()
                    .duration_since(mtime)
                    .is_ok_and(|age| age > STALE_TMP);
                if stale {
                    let _ = fs::remove_file(file.path());
                }
                continue;
            }
            if name == super::IDENTITY_FILE {
                continue;
            }
            out.push((mtime, meta.len(), file.path()));
        }
    }
    Ok(())
}
