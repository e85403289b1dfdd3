//! One cache entry on disk: its path, how it is verified when read, and how it is written
//! (temporary file in the same directory, fsync, atomic rename).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use crate::store::index::ChunkHash;

/// First bytes of a raw-image entry; the BLAKE3 of the chunk bytes follows, then the bytes.
pub(super) const RAW_MAGIC: &[u8; 8] = b"SBCRAW01";
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
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Lookup::Miss),
        Err(e) => return Err(e),
    };
    let meta = f.metadata()?;
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
        Key::Raw { .. } => {
            let mut head = [0u8; RAW_HEADER];
            f.read_exact(&mut head)?;
            f.read_exact(buf)?;
            if &head[..RAW_MAGIC.len()] != RAW_MAGIC {
                Lookup::Corrupt("not a raw-image cache entry".into())
            } else if blake3::hash(buf).as_bytes()[..] != head[RAW_MAGIC.len()..] {
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
        Key::Raw { .. } => write_atomic(path, &[RAW_MAGIC, blake3::hash(bytes).as_bytes(), bytes]),
    }
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
