//! A host-wide, verified chunk cache shared by every streamboot process on the host
//! (`--cache DIR`): prepare, serve, hydrate and commit of several disks fetch each chunk
//! of a target from its origin once. See docs/cache.md.
//!
//! - Chunk-store chunks are keyed by their BLAKE3 hash (`store/<hh>/<hash>`) and verified
//!   by hashing them again on every read.
//! - Raw-image chunks are keyed by the pinned identity of the image (kind, size,
//!   validator, URLs without secrets: hashed into a directory name) and the chunk index
//!   (`raw/<image>/<index>`); each entry carries the BLAKE3 of its bytes, checked on every
//!   read.
//! - An entry that does not verify is deleted and fetched again from the origin (with a
//!   warning): the cache is never trusted, only used.
//! - Writers use a temporary file in the entry's directory, fsync and an atomic rename.
//!   A missing chunk is fetched by the process holding the `flock` of its lock shard
//!   (`locks/<n>`); others wait for that lock (or the entry to appear) and then read the
//!   entry. A holder that dies releases its lock with its file descriptors.
//! - LRU eviction to the size cap (an entry's mtime is its last use) runs under the
//!   directory-wide lock `.lock`; an entry being read stays readable after its unlink.
//!
//! The cache sits in front of a source as a [`RemoteSource`](super::RemoteSource)
//! ([`CachedSource`]), so the engine does not know about it.

mod entry;
mod evict;
mod wrap;

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rustix::fs::{flock, FlockOperation};

use super::{CancellationToken, SourceError};
use crate::store::index::ChunkHash;
use entry::{Key, Lookup};
pub use wrap::{cached_raw, cached_store, CachedSource, RAW_CHUNK_SIZE};

/// Default size cap of a cache (`--cache-size`).
pub const DEFAULT_CACHE_SIZE: u64 = 10 << 30;
/// Lock files that missing entries are spread over (by a hash of their key).
const LOCK_SHARDS: u32 = 1024;
/// Name of the file in `raw/<image>/` that says which image it is (for people).
const IDENTITY_FILE: &str = "identity";
/// Directory-wide lock file (eviction).
const DIR_LOCK: &str = ".lock";
/// How often a reader waiting for another process's fetch looks again.
const WAIT_POLL: Duration = Duration::from_millis(5);
/// Longest a reader waits for an entry lock: a holder that takes longer is taken as stuck
/// (stopped, frozen, hung I/O) and the reader fetches without the lock (writes are atomic
/// renames, so two writers of one entry are harmless).
const LOCK_WAIT: Duration = Duration::from_secs(10);
/// For this long after a wait for a shard timed out, readers of this process do not wait
/// for that shard again (a stuck holder costs one [`LOCK_WAIT`] per shard, not per read).
const STUCK_FOR: Duration = Duration::from_secs(60);

pub use crate::net::options::CacheConfig;

/// Errors opening a cache directory. Failures while the cache is in use are not errors of
/// a read: the bytes then come from the origin and a warning is logged.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The directory cannot be created or inspected (the cause follows in the chain).
    #[error("cache directory {}", path.display())]
    Io { path: PathBuf, source: io::Error },
    /// The directory belongs to another user (who could then swap entries in and out
    /// under our feet; they are verified, but the cache would be theirs to fill).
    #[error("cache directory {} is owned by uid {owner}, not by this user (uid {me}): use a directory of your own", path.display())]
    NotOwned { path: PathBuf, owner: u32, me: u32 },
    /// The path exists but is not a directory.
    #[error("cache directory {} is not a directory", path.display())]
    NotADirectory { path: PathBuf },
    /// A zero size cap.
    #[error("cache size must be more than 0 bytes")]
    ZeroSize,
}

impl CacheError {
    fn io(path: &Path, source: io::Error) -> Self {
        CacheError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// An open cache directory. Cheap to share; safe for many threads and processes.
#[derive(Debug)]
pub struct SharedCache {
    root: PathBuf,
    max_bytes: u64,
    /// Bytes this process added since its last eviction scan.
    since_scan: AtomicU64,
    /// Lock shards whose holder did not let go within [`LOCK_WAIT`], and when that was.
    stuck: Mutex<HashMap<u32, Instant>>,
}

impl SharedCache {
    /// Opens (creating if missing) the cache at `cfg.dir`: a directory owned by this user,
    /// mode 0700 (tightened if it was more open). Runs an eviction scan.
    pub fn open(cfg: &CacheConfig) -> Result<Arc<Self>, CacheError> {
        if cfg.max_bytes == 0 {
            return Err(CacheError::ZeroSize);
        }
        let root = cfg.dir.clone();
        match fs::metadata(&root) {
            Ok(m) if !m.is_dir() => return Err(CacheError::NotADirectory { path: root }),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                entry::create_dir(&root).map_err(|e| CacheError::io(&root, e))?
            }
            Err(e) => return Err(CacheError::io(&root, e)),
        }
        let meta = fs::metadata(&root).map_err(|e| CacheError::io(&root, e))?;
        check_owner(&root, &meta)?;
        if meta.mode() & 0o077 != 0 {
            fs::set_permissions(&root, fs::Permissions::from_mode(0o700))
                .map_err(|e| CacheError::io(&root, e))?;
        }
        for sub in ["store", "raw", "locks"] {
            // Ours too, and no symlink (to a directory others may write): else another
            // user could put entries in.
            let p = root.join(sub);
            entry::create_dir(&p).map_err(|e| CacheError::io(&p, e))?;
            let meta = fs::symlink_metadata(&p).map_err(|e| CacheError::io(&p, e))?;
            if !meta.is_dir() {
                return Err(CacheError::NotADirectory { path: p });
            }
            check_owner(&p, &meta)?;
        }
        let cache = SharedCache {
            root,
            max_bytes: cfg.max_bytes,
            since_scan: AtomicU64::new(0),
            stuck: Mutex::new(HashMap::new()),
        };
        cache.evict();
        Ok(Arc::new(cache))
    }

    /// The cache directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The verified bytes (`len` of them) of the chunk-store chunk `hash`: from the cache,
    /// or from `fetch` (verified bytes of the origin), then kept. For readers that do not
    /// go through a [`CachedSource`] (the NBD export).
    pub fn store_chunk(
        &self,
        hash: ChunkHash,
        len: usize,
        fetch: impl FnOnce() -> Result<Vec<u8>, SourceError>,
    ) -> Result<Vec<u8>, SourceError> {
        let mut buf = vec![0u8; len];
        let cancel = CancellationToken::new();
        self.get(&Key::Store(hash), &mut buf, &cancel, |b| {
            let got = fetch()?;
            if got.len() != b.len() {
                return Err(SourceError::Verify {
                    what: format!("chunk {hash}"),
                    reason: format!("{} bytes, the index says {}", got.len(), b.len()),
                });
            }
            b.copy_from_slice(&got);
            Ok(())
        })?;
        Ok(buf)
    }

    /// Fills `buf` with the bytes of the entry `key`: from the cache when a verified entry
    /// is there, else from `fetch` (which must return verified bytes of the origin) by
    /// exactly one process of the host at a time, the others reading its entry afterwards.
    fn get(
        &self,
        key: &Key,
        buf: &mut [u8],
        cancel: &CancellationToken,
        fetch: impl FnOnce(&mut [u8]) -> Result<(), SourceError>,
    ) -> Result<(), SourceError> {
        if self.lookup(key, buf) {
            return Ok(());
        }
        let Some(_lock) = self.lock_entry(key, buf, cancel)? else {
            return Ok(()); // another process fetched it while we waited
        };
        if self.recheck(key, buf) {
            return Ok(());
        }
        fetch(buf)?;
        self.store(key, buf);
        Ok(())
    }

    /// True when `key` has a verified entry, now in `buf`.
    fn lookup(&self, key: &Key, buf: &mut [u8]) -> bool {
        matches!(
            entry::read(key, &self.root.join(key.rel_path()), buf),
            Ok(Lookup::Hit)
        )
    }

    /// Under the entry's lock: true when a verified entry is there (now in `buf`); else
    /// a corrupt entry is deleted (with a warning) and the caller fetches.
    fn recheck(&self, key: &Key, buf: &mut [u8]) -> bool {
        let path = self.root.join(key.rel_path());
        match entry::read(key, &path, buf) {
            Ok(Lookup::Hit) => return true,
            Ok(Lookup::Miss) => {}
            Ok(Lookup::Corrupt(why)) => {
                tracing::warn!(
                    "cache entry {} is corrupt ({why}): deleted, fetching the chunk again from the origin",
                    path.display()
                );
                if let Err(e) = entry::remove(&path) {
                    tracing::warn!("cache: cannot delete {}: {e}", path.display());
                }
            }
            Err(e) => tracing::warn!("cache: cannot read {}: {e}", path.display()),
        }
        false
    }

    /// Under the entry's lock: keeps verified `bytes` as the entry of `key` (best effort).
    fn store(&self, key: &Key, bytes: &[u8]) {
        let path = self.root.join(key.rel_path());
        match entry::write(key, &path, bytes) {
            Ok(()) => self.added(bytes.len() as u64),
            Err(e) => tracing::warn!("cache: cannot store {}: {e}", path.display()),
        }
    }

    /// The lock file of `key`'s shard, opened. `None` (with a warning) when it cannot be:
    /// the caller then fetches without a lock.
    fn lock_file(&self, key: &Key) -> Option<(u32, File)> {
        let digest = blake3::hash(key.rel_path().as_os_str().as_encoded_bytes());
        let head: [u8; 4] = digest.as_bytes()[..4].try_into().expect("4 bytes");
        let shard = u32::from_le_bytes(head) % LOCK_SHARDS;
        let lock_path = self.root.join("locks").join(shard.to_string());
        match open_lock_file(&lock_path) {
            Ok(f) => Some((shard, f)),
            Err(e) => {
                tracing::warn!("cache: cannot open {}: {e}", lock_path.display());
                None
            }
        }
    }

    /// Takes the lock of `key`, waiting while another process (or thread) holds it.
    /// Returns `None` when the entry became readable (into `buf`) during the wait.
    fn lock_entry(
        &self,
        key: &Key,
        buf: &mut [u8],
        cancel: &CancellationToken,
    ) -> Result<Option<EntryLock>, SourceError> {
        let Some((shard, file)) = self.lock_file(key) else {
            return Ok(Some(EntryLock { _file: None }));
        };
        let deadline = Instant::now() + self.lock_wait(shard);
        loop {
            match flock(&file, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => {
                    self.stuck_lock().remove(&shard);
                    return Ok(Some(EntryLock { _file: Some(file) }));
                }
                Err(rustix::io::Errno::WOULDBLOCK) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    tracing::warn!("cache: cannot lock an entry: {e}");
                    return Ok(Some(EntryLock { _file: None }));
                }
            }
            if self.lookup(key, buf) {
                return Ok(None);
            }
            if cancel.is_cancelled() {
                return Err(SourceError::Cancelled);
            }
            if Instant::now() >= deadline {
                if self.stuck_lock().insert(shard, Instant::now()).is_none() {
                    tracing::warn!(
                        "cache {}: lock locks/{shard} held for over {}s (a stuck process?): fetching without it",
                        self.root.display(),
                        LOCK_WAIT.as_secs()
                    );
                }
                return Ok(Some(EntryLock { _file: None }));
            }
            std::thread::sleep(WAIT_POLL);
        }
    }

    /// How long to wait for the lock of `shard`: none while it is known to be stuck.
    fn lock_wait(&self, shard: u32) -> Duration {
        let mut stuck = self.stuck_lock();
        match stuck.get(&shard) {
            Some(since) if since.elapsed() < STUCK_FOR => Duration::ZERO,
            Some(_) => {
                stuck.remove(&shard);
                LOCK_WAIT
            }
            None => LOCK_WAIT,
        }
    }

    fn stuck_lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Instant>> {
        self.stuck.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes the lock of `key` only if nobody holds it (never waits: a caller holding
    /// other entry locks must not wait for one, or two processes could wait for each
    /// other).
    fn try_lock_entry(&self, key: &Key) -> Option<EntryLock> {
        let (_, file) = self.lock_file(key)?;
        flock(&file, FlockOperation::NonBlockingLockExclusive).ok()?;
        Some(EntryLock { _file: Some(file) })
    }

    /// Counts `len` new bytes; scans for eviction when this process added a sixteenth of
    /// the cap since its last scan (so the cap is exceeded by at most that much per process).
    fn added(&self, len: u64) {
        let step = (self.max_bytes / 16).max(1);
        let before = self.since_scan.fetch_add(len, Ordering::Relaxed);
        if before + len >= step {
            self.since_scan.store(0, Ordering::Relaxed);
            self.evict();
        }
    }

    /// Evicts the least recently used entries down to 90% of the cap if over it (one
    /// process at a time, under the directory lock). Best effort: failures are logged.
    /// Never waits: while another process holds the directory lock, it is scanning (or
    /// stuck, and must not stall readers), and the next scan of this process catches up.
    fn evict(&self) {
        let lock_path = self.root.join(DIR_LOCK);
        let lock = open_lock_file(&lock_path).and_then(|f| {
            flock(&f, FlockOperation::NonBlockingLockExclusive)
                .map(|()| f)
                .map_err(io::Error::from)
        });
        match lock {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                tracing::debug!("cache {}: another process is evicting", self.root.display());
                return;
            }
            Err(e) => {
                tracing::warn!("cache: cannot lock {}: {e}", lock_path.display());
                return;
            }
        }
        let low_water = self.max_bytes / 10 * 9;
        match evict::evict(&self.root, self.max_bytes, low_water) {
            Ok(s) if s.evicted > 0 => tracing::info!(
                "cache {}: evicted {} least recently used entries, {} bytes kept",
                self.root.display(),
                s.evicted,
                s.kept_bytes
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!("cache {}: eviction failed: {e}", self.root.display()),
        }
    }

    /// Records which image a `raw/<image>` directory holds (for people; never read back).
    fn describe_image(&self, image: &str, text: &str) {
        let dir = self.root.join("raw").join(image);
        let path = dir.join(IDENTITY_FILE);
        if path.exists() {
            return;
        }
        if let Err(e) = entry::write_atomic(&path, &[text.as_bytes()]) {
            tracing::debug!("cache: cannot write {}: {e}", path.display());
        }
    }
}

/// `path` (with metadata `meta`) must belong to the user running streamboot.
fn check_owner(path: &Path, meta: &fs::Metadata) -> Result<(), CacheError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(CacheError::NotOwned {
            path: path.to_path_buf(),
            owner: meta.uid(),
            me,
        });
    }
    Ok(())
}

/// A held entry lock (released when dropped; `None`: fetching without a lock).
struct EntryLock {
    _file: Option<File>,
}

fn open_lock_file(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
}

#[cfg(test)]
mod tests;
