//! Publishing an image: cut it into chunks, store each distinct non-zero chunk once, write
//! the signed index.
//!
//! Ordering is what makes a store crash-safe and gc-safe:
//! 1. take the store lock shared (gc holds it exclusively, so gc never runs while a publish
//!    is between "this chunk already exists, reuse it" and "the index naming it is
//!    written");
//! 2. write every new chunk object to a temporary file in `tmp/`, never rewriting an
//!    object that exists (in either form);
//! 3. make all of them durable with one `syncfs` (one flush instead of an fsync per
//!    object, which dominates with small chunks), rename each into place, and `syncfs`
//!    again: all objects are now durable under their names, and none was ever visible
//!    under its name before its data was durable;
//! 4. only then write the index atomically (temp, fsync, rename) and fsync `indexes/`.
//!
//! A crash at any point leaves either the old index (or none) plus some unreferenced
//! objects that gc removes, or the new index with all of its objects durable.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;

use super::identity::{now_unix, ImageIdentity};
use super::index::{
    check_profile, ChunkEntry, ChunkHash, Index, Trust, MAX_CHUNK_SHIFT, MIN_CHUNK_SHIFT,
};
use super::layout::{self, StoreDir};
use super::sign::key_id;
use super::{IndexHash, StoreError};

/// Default zstd level: fast, and most of the gain on disk images.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// Everything `publish` can be told.
#[derive(Clone, Debug)]
pub struct PublishOptions<'a> {
    /// Chunk size: a power of two from 4 KiB to 4 MiB.
    pub chunk_size: u64,
    /// Signs the index when given.
    pub key: Option<&'a SigningKey>,
    /// Store new objects zstd-compressed (each only when that makes it smaller).
    pub compress: bool,
    /// zstd level used when `compress` is set.
    pub zstd_level: i32,
    /// Boot profile to record (chunk numbers, in boot order).
    pub boot_profile: Vec<u32>,
    /// Worker threads; 0 means one per CPU (at most 8).
    pub threads: usize,
    /// Version of the image to write; `None`: one more than the store's current index
    /// of that name (1 for a new name). Must be above the current one.
    pub version: Option<u64>,
    /// Seconds after creation when the index expires (readers that check the signature
    /// refuse it from then on); `None`: never.
    pub valid_for: Option<u64>,
}

impl<'a> PublishOptions<'a> {
    /// Options with defaults for everything but the chunk size.
    pub fn new(chunk_size: u64) -> Self {
        PublishOptions {
            chunk_size,
            key: None,
            compress: false,
            zstd_level: DEFAULT_ZSTD_LEVEL,
            boot_profile: Vec::new(),
            threads: 0,
            version: None,
            valid_for: None,
        }
    }
}

/// What a publish did. Byte counts are of uncompressed chunk data unless they say
/// "stored".
#[derive(Clone, Debug, serde::Serialize)]
pub struct PublishReport {
    /// Image name.
    pub name: String,
    /// Path of the written index.
    pub index_path: PathBuf,
    /// Hash of the index (hex): pin it to migrate to exactly this image.
    pub index_hash: String,
    /// Key id of the signing key, if signed.
    pub signed_by: Option<String>,
    /// Image name, version, creation and expiry time recorded in the index.
    pub identity: ImageIdentity,
    /// Image size in bytes.
    pub image_size: u64,
    /// Chunk size in bytes.
    pub chunk_size: u64,
    /// Number of chunks of the image.
    pub chunks_total: u64,
    /// All-zero chunks (never stored).
    pub chunks_zero: u64,
    /// Objects this publish wrote (distinct chunks that were not in the store).
    pub chunks_new: u64,
    /// Chunk positions whose object was already in the store.
    pub chunks_reused: u64,
    /// Chunk positions repeating a new object written for an earlier position of this image.
    pub chunks_repeated: u64,
    /// Bytes in all-zero chunks.
    pub bytes_zero: u64,
    /// Bytes of the new objects' chunk data.
    pub bytes_new: u64,
    /// Bytes the new objects take on disk (after compression).
    pub bytes_stored: u64,
    /// Bytes of this image's distinct chunks that another image in the store also
    /// references (see `docs/chunk-store.md`, "shared").
    pub bytes_shared: u64,
    /// Wall time of the publish, seconds.
    pub elapsed_secs: f64,
    /// Image bytes per second of wall time, in MiB/s.
    pub throughput_mib_s: f64,
}

/// Publishes `image_path` into the store at `store_dir` as `name` (replacing an earlier
/// index of that name). Creates the store if needed.
pub fn publish(
    image_path: &Path,
    store_dir: &Path,
    name: &str,
    chunk_size: u64,
    key: Option<&SigningKey>,
    compress: bool,
) -> Result<PublishReport, StoreError> {
    let mut opts = PublishOptions::new(chunk_size);
    opts.key = key;
    opts.compress = compress;
    publish_with(image_path, store_dir, name, &opts)
}

/// What one worker found out about a chunk object.
#[derive(Clone, Copy, Debug)]
struct Obj {
    compressed: bool,
    /// True when this publish wrote it.
    written: bool,
    stored_len: u64,
}

/// What one worker found: chunk number and hash (`None`: all zeros).
type Found = Vec<(u64, Option<ChunkHash>)>;

/// State shared by the publish workers.
struct Work<'a> {
    store: &'a StoreDir,
    image: &'a File,
    image_path: &'a Path,
    image_size: u64,
    chunk_size: u64,
    chunks: u64,
    compress: bool,
    level: i32,
    next: AtomicU64,
    abort: AtomicBool,
    /// Objects claimed in this run: `None` while the claiming worker is still writing it.
    objects: Mutex<HashMap<ChunkHash, Option<Obj>>>,
    /// New objects written to `tmp/` (unsynced), with their destinations.
    pending: Mutex<Vec<(PathBuf, PathBuf)>>,
}

/// [`publish`] with every option.
pub fn publish_with(
    image_path: &Path,
    store_dir: &Path,
    name: &str,
    opts: &PublishOptions<'_>,
) -> Result<PublishReport, StoreError> {
    let started = Instant::now();
    layout::validate_name(name)?;
    let cs = opts.chunk_size;
    if !cs.is_power_of_two() || !(1 << MIN_CHUNK_SHIFT..=1 << MAX_CHUNK_SHIFT).contains(&cs) {
        return Err(StoreError::BadChunkSize(cs));
    }
    let mut image = File::open(image_path).map_err(|e| StoreError::io(image_path, e))?;
    // Seeking to the end gives the size of block devices too (their metadata says 0).
    let image_size = image
        .seek(SeekFrom::End(0))
        .map_err(|e| StoreError::io(image_path, e))?;
    let chunks = image_size.div_ceil(cs);
    if chunks > u64::from(u32::MAX) {
        return Err(StoreError::TooLarge {
            path: image_path.to_owned(),
            chunk_size: cs,
        });
    }
    // Validate the profile before any work is done.
    check_profile(&opts.boot_profile, chunks).map_err(|source| StoreError::Index {
        path: image_path.to_owned(),
        source,
    })?;

    let store = StoreDir::create(store_dir)?;
    let _lock = store.lock_shared()?;
    let identity = new_identity(&store, name, opts.version, opts.valid_for)?;

    let work = Work {
        store: &store,
        image: &image,
        image_path,
        image_size,
        chunk_size: cs,
        chunks,
        compress: opts.compress,
        level: opts.zstd_level,
        next: AtomicU64::new(0),
        abort: AtomicBool::new(false),
        objects: Mutex::new(HashMap::new()),
        pending: Mutex::new(Vec::new()),
    };
    let threads = match opts.threads {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get().min(8)),
        n => n,
    };
    let mut hashes: Vec<Option<ChunkHash>> = vec![None; chunks as usize];
    let results: Vec<Result<Found, StoreError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads).map(|_| s.spawn(|| work.run())).collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("publish worker panicked"))
            .collect()
    });
    let pending = work.pending.into_inner().expect("pending lock");
    let found: Result<Vec<Found>, StoreError> = results.into_iter().collect();
    let found = match found {
        Ok(f) => f,
        Err(e) => {
            for (tmp, _) in &pending {
                let _ = std::fs::remove_file(tmp);
            }
            return Err(e);
        }
    };
    for (c, h) in found.into_iter().flatten() {
        hashes[c as usize] = h;
    }
    // New objects: durable first (one flush of the file system), then visible under
    // their names, then their directory entries durable. See the module docs.
    install_objects(&store, pending)?;

    let objects: HashMap<ChunkHash, Obj> = work
        .objects
        .into_inner()
        .expect("objects lock")
        .into_iter()
        .map(|(h, o)| (h, o.expect("every claimed object is resolved")))
        .collect();

    // Build the index and count.
    let mut report_counts = Counts::default();
    let mut entries = Vec::with_capacity(chunks as usize);
    let mut seen = HashSet::new();
    let mut distinct_len: HashMap<ChunkHash, u64> = HashMap::new();
    for (c, h) in hashes.iter().enumerate() {
        let len = (image_size - c as u64 * cs).min(cs);
        match h {
            None => {
                report_counts.zero += 1;
                report_counts.bytes_zero += len;
                entries.push(ChunkEntry::Zero);
            }
            Some(h) => {
                let o = objects[h];
                let first = seen.insert(*h);
                if first {
                    distinct_len.insert(*h, len);
                }
                match (o.written, first) {
                    (true, true) => {
                        report_counts.new += 1;
                        report_counts.bytes_new += len;
                        report_counts.bytes_stored += o.stored_len;
                    }
                    (true, false) => report_counts.repeated += 1,
                    (false, _) => report_counts.reused += 1,
                }
                entries.push(ChunkEntry::Stored {
                    hash: *h,
                    compressed: o.compressed,
                });
            }
        }
    }
    let index = Index::new(image_size, cs, entries, opts.boot_profile.clone())
        .and_then(|i| i.with_identity(identity.clone()))
        .map_err(|source| StoreError::Index {
            path: store.index_path(name),
            source,
        })?;

    let others = referenced_by_others(&store, name)?;
    let bytes_shared = distinct_len
        .iter()
        .filter(|(h, _)| others.contains(*h))
        .map(|(_, l)| *l)
        .sum();

    let bytes = index.encode(opts.key);
    let index_path = store.index_path(name);
    store.write_atomic(&index_path, &bytes)?;
    layout::sync_dir(&store.indexes_dir())?;
    drop(image);

    let elapsed = started.elapsed();
    Ok(PublishReport {
        name: name.to_owned(),
        index_path,
        index_hash: super::index_hash(&bytes).to_hex(),
        signed_by: opts.key.map(|k| key_id(&k.verifying_key()).to_string()),
        identity,
        image_size,
        chunk_size: cs,
        chunks_total: chunks,
        chunks_zero: report_counts.zero,
        chunks_new: report_counts.new,
        chunks_reused: report_counts.reused,
        chunks_repeated: report_counts.repeated,
        bytes_zero: report_counts.bytes_zero,
        bytes_new: report_counts.bytes_new,
        bytes_stored: report_counts.bytes_stored,
        bytes_shared,
        elapsed_secs: elapsed.as_secs_f64(),
        throughput_mib_s: throughput(image_size, elapsed),
    })
}

/// Moves new objects from `tmp/` to their names, durably: `syncfs` makes the data of
/// every temporary file durable, so no object ever appears under its name with contents
/// that a crash could lose; then each is renamed into place, and a second `syncfs` makes
/// the new entries durable, so the index written after this names only durable objects.
/// On error the remaining temporary files are removed (gc would remove them too).
fn install_objects(store: &StoreDir, pending: Vec<(PathBuf, PathBuf)>) -> Result<(), StoreError> {
    if pending.is_empty() {
        return Ok(());
    }
    let cleanup = |rest: &[(PathBuf, PathBuf)]| {
        for (tmp, _) in rest {
            let _ = std::fs::remove_file(tmp);
        }
    };
    if let Err(e) = layout::sync_fs(&store.tmp_dir()) {
        cleanup(&pending);
        return Err(e);
    }
    for (i, (tmp, dest)) in pending.iter().enumerate() {
        let dir = dest.parent().expect("object path has a parent");
        let step = layout::ensure_dir(dir)
            .and_then(|_| std::fs::rename(tmp, dest).map_err(|e| StoreError::io(dest, e)));
        if let Err(e) = step {
            cleanup(&pending[i..]);
            return Err(e);
        }
    }
    // One more flush makes the new directory entries durable: cheaper than an fsync of
    // each of up to 257 directories.
    layout::sync_fs(&store.chunks_dir())
}

#[derive(Default)]
struct Counts {
    zero: u64,
    new: u64,
    reused: u64,
    repeated: u64,
    bytes_zero: u64,
    bytes_new: u64,
    bytes_stored: u64,
}

fn throughput(bytes: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        bytes as f64 / (1024.0 * 1024.0) / secs
    } else {
        0.0
    }
}

/// Hashes of every chunk object referenced by an index other than `name`'s. An index that
/// does not parse is skipped with a warning: it cannot make this publish wrong, only its
/// "shared" figure incomplete.
fn referenced_by_others(store: &StoreDir, name: &str) -> Result<HashSet<ChunkHash>, StoreError> {
    let mut set = HashSet::new();
    for other in store.list_indexes()? {
        if other == name {
            continue;
        }
        let path = store.index_path(&other);
        let parsed = std::fs::read(&path)
            .map_err(|e| StoreError::io(&path, e))
            .and_then(|b| {
                Index::parse(&b, Trust::Unverified).map_err(|source| StoreError::Index {
                    path: path.clone(),
                    source,
                })
            });
        match parsed {
            Ok(p) => set.extend(p.index.entries().iter().filter_map(|e| e.hash())),
            Err(e) => tracing::warn!("ignoring index for shared-bytes count: {e}"),
        }
    }
    Ok(set)
}

impl Work<'_> {
    /// Worker loop: takes chunk numbers until none are left; returns what it found.
    fn run(&self) -> Result<Found, StoreError> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; self.chunk_size as usize];
        loop {
            if self.abort.load(Ordering::Relaxed) {
                return Ok(out);
            }
            let c = self.next.fetch_add(1, Ordering::Relaxed);
            if c >= self.chunks {
                return Ok(out);
            }
            match self.one(c, &mut buf) {
                Ok(h) => out.push((c, h)),
                Err(e) => {
                    self.abort.store(true, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
    }

    /// Reads, hashes and (if new) stores chunk `c`. `None` for an all-zero chunk.
    fn one(&self, c: u64, buf: &mut [u8]) -> Result<Option<ChunkHash>, StoreError> {
        let off = c * self.chunk_size;
        let len = (self.image_size - off).min(self.chunk_size) as usize;
        let data = &mut buf[..len];
        self.image
            .read_exact_at(data, off)
            .map_err(|e| StoreError::io(self.image_path, e))?;
        if is_zero(data) {
            return Ok(None);
        }
        let hash = ChunkHash::of(data);
        {
            let mut objs = self.objects.lock().expect("objects lock");
            if objs.contains_key(&hash) {
                return Ok(Some(hash));
            }
            objs.insert(hash, None);
        }
        let obj = self.store_object(&hash, data)?;
        self.objects
            .lock()
            .expect("objects lock")
            .insert(hash, Some(obj));
        Ok(Some(hash))
    }

    /// Stores one chunk object unless it exists in either form.
    fn store_object(&self, hash: &ChunkHash, data: &[u8]) -> Result<Obj, StoreError> {
        // Prefer the form this publish would write, but reuse whatever exists.
        let forms = if self.compress {
            [true, false]
        } else {
            [false, true]
        };
        for compressed in forms {
            let p = self.store.chunk_path(hash, compressed);
            match std::fs::metadata(&p) {
                Ok(m) => {
                    return Ok(Obj {
                        compressed,
                        written: false,
                        stored_len: m.len(),
                    })
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(StoreError::io(&p, e)),
            }
        }
        let packed = if self.compress {
            zstd::bulk::compress(data, self.level)
                .map_err(|e| StoreError::io(self.image_path, e))?
        } else {
            Vec::new()
        };
        let compressed = self.compress && packed.len() < data.len();
        let body: &[u8] = if compressed { &packed } else { data };
        let dest = self.store.chunk_path(hash, compressed);
        let tmp = self.store.write_temp(body, false)?;
        self.pending.lock().expect("pending lock").push((tmp, dest));
        Ok(Obj {
            compressed,
            written: true,
            stored_len: body.len() as u64,
        })
    }
}

/// True when every byte is zero. Compares 16 bytes at a time, which the compiler
/// vectorizes even at low optimization levels.
fn is_zero(data: &[u8]) -> bool {
    let mut words = data.chunks_exact(16);
    words
        .by_ref()
        .all(|w| u128::from_ne_bytes(w.try_into().expect("16-byte chunk")) == 0)
        && words.remainder().iter().all(|&b| b == 0)
}

/// Replaces the boot profile of image `name`, re-signing the index with `key`. With a key,
/// the current index must verify against that key's public half (so re-signing never
/// launders an index someone else altered); without one, the result is unsigned.
pub fn set_boot_profile(
    store_dir: &Path,
    name: &str,
    profile: Vec<u32>,
    key: Option<&SigningKey>,
) -> Result<IndexHash, StoreError> {
    layout::validate_name(name)?;
    let store = StoreDir::new(store_dir);
    let _lock = store.lock_shared()?;
    let path = store.index_path(name);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(StoreError::NoSuchImage(name.to_owned()))
        }
        Err(e) => return Err(StoreError::io(&path, e)),
    };
    let vk = key.map(|k| k.verifying_key());
    let trust = match &vk {
        Some(vk) => Trust::Key(vk),
        None => Trust::Unverified,
    };
    let idx_err = |source| StoreError::Index {
        path: path.clone(),
        source,
    };
    let parsed = Index::parse(&bytes, trust).map_err(idx_err)?;
    // A new index of the same image: the next version, created now, same lifetime.
    let current = parsed.index.identity().map_or(0, |i| i.version);
    let lifetime = parsed
        .index
        .identity()
        .and_then(|i| Some(i.expires?.saturating_sub(i.created)));
    let identity = identity_at(name, current + 1, lifetime);
    let index = parsed
        .index
        .with_boot_profile(profile)
        .and_then(|i| i.with_identity(identity))
        .map_err(idx_err)?;
    let out = index.encode(key);
    store.write_atomic(&path, &out)?;
    layout::sync_dir(&store.indexes_dir())?;
    Ok(super::index_hash(&out))
}

/// The identity of a new index of `name`: `version`, or one more than the store's current
/// index of that name (1 when there is none, or a version-1 index without a number).
fn new_identity(
    store: &StoreDir,
    name: &str,
    version: Option<u64>,
    valid_for: Option<u64>,
) -> Result<ImageIdentity, StoreError> {
    let path = store.index_path(name);
    let current = match std::fs::read(&path) {
        Ok(b) => match Index::parse(&b, Trust::Unverified) {
            Ok(p) => p.index.identity().map_or(0, |i| i.version),
            // An unreadable current index does not block an explicit version.
            Err(_) if version.is_some() => 0,
            Err(source) => return Err(StoreError::Unnumbered { path, source }),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(StoreError::io(&path, e)),
    };
    let version = match version {
        Some(v) if v > current => v,
        Some(requested) => {
            return Err(StoreError::VersionNotNewer {
                name: name.to_owned(),
                requested,
                current,
            })
        }
        None => current.checked_add(1).ok_or(StoreError::VersionNotNewer {
            name: name.to_owned(),
            requested: current,
            current,
        })?,
    };
    Ok(identity_at(name, version, valid_for))
}

/// `name` at `version`, created now, expiring `valid_for` seconds from now (a lifetime of
/// 0 is one second: the expiry must follow the creation).
fn identity_at(name: &str, version: u64, valid_for: Option<u64>) -> ImageIdentity {
    let created = now_unix();
    ImageIdentity {
        name: name.to_owned(),
        version,
        created,
        expires: valid_for.map(|s| created.saturating_add(s.max(1))),
    }
}
