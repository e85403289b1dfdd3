//! Where things live in a store directory, atomic file writes, and the store lock.
//!
//! ```text
//! STORE/
//!   chunks/<h0h1>/<64 hex>        chunk object, raw bytes
//!   chunks/<h0h1>/<64 hex>.zst    chunk object, one zstd frame
//!   indexes/<NAME>.idx            one index per published image
//!   tmp/                          temporary files of writers in progress (not served)
//!   .lock                         advisory lock: publish holds it shared, gc exclusive
//! ```
//!
//! Everything a reader needs is a plain file at a fixed relative path, so any static HTTP
//! server can serve the directory as is.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use rustix::fs::{flock, FlockOperation};

use super::index::ChunkHash;
use super::StoreError;

/// Directory of chunk objects.
pub const CHUNKS_DIR: &str = "chunks";
/// Directory of index files.
pub const INDEXES_DIR: &str = "indexes";
/// Directory of temporary files.
pub const TMP_DIR: &str = "tmp";
/// The lock file.
pub const LOCK_FILE: &str = ".lock";
/// File name suffix of index files.
pub const INDEX_SUFFIX: &str = ".idx";
/// File name suffix of compressed chunk objects.
pub const ZSTD_SUFFIX: &str = ".zst";
/// Longest image name.
pub const MAX_NAME_LEN: usize = 128;

/// Relative path (with `/` separators, usable in URLs) of a chunk object.
pub fn chunk_rel(hash: &ChunkHash, compressed: bool) -> String {
    let hex = hash.to_hex();
    let suffix = if compressed { ZSTD_SUFFIX } else { "" };
    format!("{CHUNKS_DIR}/{}/{hex}{suffix}", &hex[..2])
}

/// Relative path of an image's index.
pub fn index_rel(name: &str) -> String {
    format!("{INDEXES_DIR}/{name}{INDEX_SUFFIX}")
}

/// Checks an image name: 1..=128 characters from `[A-Za-z0-9._-]`, not starting with a
/// dot (so names are safe as file names and in URLs, and never hidden or `..`).
pub fn validate_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadName(name.to_owned()))
    }
}

/// Parses a chunk object's file name into its hash and compressed flag.
pub fn parse_object_name(file_name: &str) -> Option<(ChunkHash, bool)> {
    let (hex, compressed) = match file_name.strip_suffix(ZSTD_SUFFIX) {
        Some(h) => (h, true),
        None => (file_name, false),
    };
    if hex.len() != 64 || hex.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    ChunkHash::from_hex(hex).map(|h| (h, compressed))
}

/// A store directory on the local file system.
#[derive(Clone, Debug)]
pub struct StoreDir {
    root: PathBuf,
}

impl StoreDir {
    /// Refers to an existing store (does not touch the file system).
    pub fn new(root: &Path) -> Self {
        StoreDir {
            root: root.to_owned(),
        }
    }

    /// Creates the store's directories if missing, durably. `chunks/` comes last, so a
    /// directory with `chunks/` is a complete store to a concurrent reader (`gc`).
    pub fn create(root: &Path) -> Result<Self, StoreError> {
        let s = StoreDir::new(root);
        let mut created = false;
        for p in [s.root.clone(), s.indexes_dir(), s.tmp_dir(), s.chunks_dir()] {
            match fs::create_dir(&p) {
                Ok(()) => created = true,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && p.is_dir() => {}
                Err(e) => return Err(StoreError::io(&p, e)),
            }
        }
        if created {
            sync_dir(&s.root)?;
            if let Some(parent) = s.root.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent)?;
            }
        }
        Ok(s)
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `chunks/`.
    pub fn chunks_dir(&self) -> PathBuf {
        self.root.join(CHUNKS_DIR)
    }

    /// `indexes/`.
    pub fn indexes_dir(&self) -> PathBuf {
        self.root.join(INDEXES_DIR)
    }

    /// `tmp/`.
    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join(TMP_DIR)
    }

    /// Path of a chunk object.
    pub fn chunk_path(&self, hash: &ChunkHash, compressed: bool) -> PathBuf {
        self.root.join(chunk_rel(hash, compressed))
    }

    /// Path of an image's index.
    pub fn index_path(&self, name: &str) -> PathBuf {
        self.root.join(index_rel(name))
    }

    /// Names of all published images, sorted.
    pub fn list_indexes(&self) -> Result<Vec<String>, StoreError> {
        let dir = self.indexes_dir();
        let mut names = BTreeSet::new();
        for e in fs::read_dir(&dir).map_err(|e| StoreError::io(&dir, e))? {
            let e = e.map_err(|e| StoreError::io(&dir, e))?;
            let file_name = e.file_name();
            let Some(file_name) = file_name.to_str() else {
                continue;
            };
            if let Some(name) = file_name.strip_suffix(INDEX_SUFFIX) {
                if validate_name(name).is_ok() {
                    names.insert(name.to_owned());
                }
            }
        }
        Ok(names.into_iter().collect())
    }

    /// Takes the store lock shared (publish, stats): many holders at once, none while gc
    /// holds it exclusively. Blocks until granted.
    pub fn lock_shared(&self) -> Result<StoreLock, StoreError> {
        self.lock(FlockOperation::LockShared)
    }

    /// Takes the store lock exclusively (gc). Blocks until every shared holder is done.
    pub fn lock_exclusive(&self) -> Result<StoreLock, StoreError> {
        self.lock(FlockOperation::LockExclusive)
    }

    fn lock(&self, op: FlockOperation) -> Result<StoreLock, StoreError> {
        let path = self.root.join(LOCK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| StoreError::io(&path, e))?;
        loop {
            match flock(&file, op) {
                Ok(()) => return Ok(StoreLock { _file: file }),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(StoreError::io(&path, e.into())),
            }
        }
    }

    /// Writes `data` to `dest` atomically: a unique temporary file in `tmp/` is written
    /// and fsynced, then renamed over `dest`. The caller syncs `dest`'s directory (see
    /// [`sync_dir`]) before it relies on the rename being durable.
    pub fn write_atomic(&self, dest: &Path, data: &[u8]) -> Result<(), StoreError> {
        let tmp = self.write_temp(data, true)?;
        fs::rename(&tmp, dest).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            StoreError::io(dest, e)
        })
    }

    /// Writes `data` to a new uniquely named file in `tmp/` and returns its path; fsyncs it
    /// when `sync` is set. Publish writes objects unsynced and makes them all durable with
    /// one [`sync_fs`] before renaming them into place: one flush instead of one per chunk.
    pub fn write_temp(&self, data: &[u8], sync: bool) -> Result<PathBuf, StoreError> {
        let tmp = self.tmp_dir().join(format!(
            "{}-{}.tmp",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .map_err(|e| StoreError::io(&tmp, e))?;
            f.write_all(data).map_err(|e| StoreError::io(&tmp, e))?;
            if sync {
                f.sync_all().map_err(|e| StoreError::io(&tmp, e))?;
            }
            Ok(())
        })();
        match result {
            Ok(()) => Ok(tmp),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        }
    }
}

/// Flushes every file of the file system holding `path` (`syncfs(2)`), reporting
/// write-back errors.
pub fn sync_fs(path: &Path) -> Result<(), StoreError> {
    let f = File::open(path).map_err(|e| StoreError::io(path, e))?;
    rustix::fs::syncfs(&f).map_err(|e| StoreError::io(path, e.into()))
}

/// Held store lock; released when dropped (the kernel also releases it if the process
/// dies, so a crashed publish never blocks gc forever).
#[derive(Debug)]
pub struct StoreLock {
    _file: File,
}

/// Fsyncs a directory so that entries created or renamed in it are durable.
pub fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(dir, e))
}

/// Replaces `dest` atomically with `data`: writes a new file with a random name next to it
/// (`.NAME.<uuid>.tmp`, created with `O_EXCL`, so a file or symlink planted at a
/// predictable name is never opened or followed), syncs it, renames it over `dest` and
/// syncs the directory. A reader sees the old file or the whole new one; on error the
/// temporary file is removed and `dest` is untouched.
pub fn write_file_atomic(dest: &Path, data: &[u8]) -> io::Result<()> {
    let dir = match dest.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = dest
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", uuid::Uuid::new_v4().simple()));
    let tmp = dir.join(tmp_name);
    let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
    let result = (|| {
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, dest)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Creates `dir` if missing; returns true when it was created (its parent then needs a
/// [`sync_dir`]).
pub fn ensure_dir(dir: &Path) -> Result<bool, StoreError> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(StoreError::io(dir, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "ubuntu-24.04_amd64", "X"] {
            validate_name(ok).unwrap();
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a b",
            "é",
            &"x".repeat(129),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn object_names() {
        let h = ChunkHash([0xab; 32]);
        let rel = chunk_rel(&h, true);
        assert!(rel.starts_with("chunks/ab/abab"));
        let file = rel.rsplit('/').next().unwrap();
        assert_eq!(parse_object_name(file), Some((h, true)));
        assert_eq!(parse_object_name(&h.to_hex()), Some((h, false)));
        assert_eq!(parse_object_name(&h.to_hex().to_uppercase()), None);
        assert_eq!(parse_object_name("abc"), None);
    }
}
