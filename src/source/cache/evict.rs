//! LRU eviction to the size cap. Runs under the directory-wide lock, so one process at a
//! time scans; an entry another process is reading stays readable after its unlink (the
//! reader opened it first).

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::Path;
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

/// Granularity of the LRU age in a scan: an entry's age is refreshed at most once a
/// minute anyway (`entry::TOUCH_AFTER`).
const AGE_STEP: u64 = 60;

/// Removes the least recently used entries below `root` (the `store/` and `raw/` trees)
/// until they hold at most `low_water` bytes, when they hold more than `cap`.
///
/// Two passes over the tree: the first sums the bytes per minute of last use, the second
/// deletes the oldest minutes. Memory is bounded by the cache's age in minutes, not by its
/// number of entries (millions with 4 KiB store chunks).
pub(super) fn evict(root: &Path, cap: u64, low_water: u64) -> io::Result<Scan> {
    let mut by_age: BTreeMap<u64, u64> = BTreeMap::new();
    let mut total: u64 = 0;
    walk(root, &mut |mtime, len, _| {
        *by_age.entry(minute(mtime)).or_default() += len;
        total += len;
        Ok(())
    })?;
    let mut scan = Scan::default();
    if total <= cap {
        scan.kept_bytes = total;
        return Ok(scan);
    }
    // Minutes older than `cutoff` go whole; of minute `cutoff`, `partial` bytes more.
    let mut need = total - low_water;
    let mut cutoff = u64::MAX;
    let mut partial = 0;
    for (&m, &bytes) in &by_age {
        if bytes < need {
            need -= bytes;
        } else {
            (cutoff, partial) = (m, need);
            break;
        }
    }
    walk(root, &mut |mtime, len, path| {
        let m = minute(mtime);
        let go = m < cutoff || (m == cutoff && partial > 0);
        if !go {
            return Ok(());
        }
        if m == cutoff {
            partial = partial.saturating_sub(len);
        }
        match fs::remove_file(path) {
            Ok(()) => scan.evicted += 1,
            // Evicted or replaced meanwhile by a corruption fix: fine either way.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        total = total.saturating_sub(len);
        Ok(())
    })?;
    scan.kept_bytes = total;
    Ok(scan)
}

/// Minutes since the epoch of `t` (0 before it).
fn minute(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / AGE_STEP)
}

/// Calls `f` with (mtime, length, path) of each entry below `root` (`store/<dir>/<entry>`,
/// `raw/<dir>/<entry>`); sweeps stale temporary files on the way.
fn walk(
    root: &Path,
    f: &mut dyn FnMut(SystemTime, u64, &Path) -> io::Result<()>,
) -> io::Result<()> {
    for top in ["store", "raw"] {
        walk_top(&root.join(top), f)?;
    }
    Ok(())
}

fn walk_top(
    top: &Path,
    f: &mut dyn FnMut(SystemTime, u64, &Path) -> io::Result<()>,
) -> io::Result<()> {
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
            f(mtime, meta.len(), &file.path())?;
        }
    }
    Ok(())
}
