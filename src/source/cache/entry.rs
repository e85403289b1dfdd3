//! One cache entry on disk: its path, how it is verified when read, and how it is written
//! (temporary file in the same directory, fsync, atomic rename).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use crate::store::index::ChunkHash;

/// First bytes of a raw-image entry; its checksum follows ([`raw_checksum`]), then the
/// bytes. (`SBCRAW01` entries, whose checksum covered the bytes only, read as corrupt.)
pub(super) const RAW_MAGIC: &[u8; 8] = b"SBCRAW02";
/// BLAKE3 key-derivation context of raw-entry checksums.
const RAW_CONTEXT: &str = "streamboot 2026 host-wide cache raw entry v2";
/// Length of a raw-image entry's header (magic + BLAKE3).
pub(super) const RAW_HEADER: usize = RAW_MAGIC.len() + 32;
/// Prefix of temporary files (never taken for an entry; old ones are swept).
pub(super) const TMP_PREFIX: &str = ".tmp-";
/// A hit refreshes the entry's mtime (its LRU age) only when it is older than this.
const TOUCH_AFTER: Duration = Duration::from_secs(60);

/// What a cache entry holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Key {
    /// A chunk-store chunk: named by the BLAKE3 of its bytes.
    Store(ChunkHash),
    /// Chunk `index` of the raw image whose identity hashes to `image` (hex).
    Raw { image: String, index: u64 },
}

impl Key {
    /// Path of the entry below the cache root.
    pub(super) fn rel_path(&self) -> PathBuf {
        match self {
            Key::Store(h) => {
                let hex = h.to_hex();
                PathBuf::from(format!("store/{}/{hex}", &hex[..2]))
            }
            Key::Raw { image, index } => PathBuf::from(format!("raw/{image}/{index}")),
        }
    }
}

/// Outcome of reading an entry into a buffer.
#[derive(Debug)]
pub(super) enum Lookup {
    /// The buffer holds the verified bytes.
    Hit,
    /// No entry.
    Miss,
    /// The entry exists but does not verify (the reason says how); never use it.
    Corrupt(String),
}

/// Reads the entry at `path` into `buf` (whose length is the chunk's) and verifies it.
pub(super) fn read(key: &Key, path: &Path, buf: &mut [u8]) -> io::Result<Lookup> {
    // No symlink is followed, and a FIFO put in place of an entry does not block the open
    // (nor anything else than a regular file gets read).
    let opened = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path);
    let mut f = match opened {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Lookup::Miss),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Ok(Lookup::Corrupt("a symbolic link".into()))
        }
        Err(e) => return Err(e),
    };
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Ok(Lookup::Corrupt("not a regular file".into()));
    }
    let header = match key {
        Key::Store(_) => 0,
        Key::Raw { .. } => RAW_HEADER,
    };
    if meta.len() != (header + buf.len()) as u64 {
        return Ok(Lookup::Corrupt(format!(
            "{} bytes, expected {}",
            meta.len(),
            header + buf.len()
        )));
    }
    let verdict = match key {
        Key::Store(h) => {
            f.read_exact(buf)?;
            if ChunkHash::of(buf) == *h {
                Lookup::Hit
            } else {
                Lookup::Corrupt("content does not match its hash".into())
            }
        }
        Key::Raw { image, index } => {
            let mut head = [0u8; RAW_HEADER];
            f.read_exact(&mut head)?;
            f.read_exact(buf)?;
            if &head[..RAW_MAGIC.len()] != RAW_MAGIC {
                Lookup::Corrupt("not a raw-image cache entry".into())
            } else if raw_checksum(image, *index, buf)[..] != head[RAW_MAGIC.len()..] {
                Lookup::Corrupt("content does not match its checksum".into())
            } else {
                Lookup::Hit
            }
        }
    };
    if matches!(verdict, Lookup::Hit) {
        touch(&f, &meta);
    }
    Ok(verdict)
}

/// Deletes a corrupt entry, whatever it is (a directory put in its place with all it holds;
/// a symlink itself, never what it points to).
pub(super) fn remove(path: &Path) -> io::Result<()> {
    if fs::symlink_metadata(path)?.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
}

/// Marks an entry as recently used (its mtime is its LRU age); best effort.
fn touch(f: &File, meta: &fs::Metadata) {
    let now = SystemTime::now();
    let old = meta
        .modified()
        .ok()
        .and_then(|m| now.duration_since(m).ok())
        .is_none_or(|age| age >= TOUCH_AFTER);
    if old {
        if let Err(e) = f.set_modified(now) {
            tracing::debug!("cache: cannot refresh an entry's age: {e}");
        }
    }
}

/// Writes the entry for `key` holding `bytes` at `path`.
pub(super) fn write(key: &Key, path: &Path, bytes: &[u8]) -> io::Result<()> {
    match key {
        Key::Store(_) => write_atomic(path, &[bytes]),
        Key::Raw { image, index } => write_atomic(
            path,
            &[RAW_MAGIC, &raw_checksum(image, *index, bytes), bytes],
        ),
    }
}

/// Checksum of a raw entry: BLAKE3 (derived key) of its key and bytes. Binding the key
/// means an entry of another chunk or another image (moved, copied or renamed into
/// place) does not verify, even though its bytes match the checksum they came with.
fn raw_checksum(image: &str, index: u64, bytes: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key(RAW_CONTEXT);
    // `image` is fixed-length hex: no ambiguity between key and bytes.
    h.update(image.as_bytes());
    h.update(&index.to_le_bytes());
    h.update(bytes);
    *h.finalize().as_bytes()
}

/// Writes `parts` atomically at `path` (its directory is created if missing): a temporary
/// file in the same directory, fsync, rename over `path`.
pub(super) fn write_atomic(path: &Path, parts: &[&[u8]]) -> io::Result<()> {
    let dir = path.parent().expect("entry paths have a parent");
    create_dir(dir)?;
    let tmp = dir.join(tmp_name());
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        for part in parts {
            f.write_all(part)?;
        }
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Creates `dir` (and missing parents) with mode 0700.
pub(super) fn create_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// A name no other live writer (thread or process) uses.
fn tmp_name() -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    // The time makes a name left by a dead process whose pid came back unlikely to clash
    // (a clash only costs that entry's write: `create_new` refuses it).
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{TMP_PREFIX}{}-{nanos}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}
