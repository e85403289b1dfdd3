//! [`StoreSource`]: a target image read out of a chunk store (local directory or HTTP).
//!
//! Opening fetches the image's index and checks it against the trusted key(s) (or, only if
//! the caller opted out explicitly, not at all). The index hash becomes the source's
//! identity validator, so a migration pins one exact image. Reads fetch the chunk objects
//! covering the range, decompress and check each against its BLAKE3 hash before a single
//! byte is copied out; zero chunks are filled without fetching. Verified chunks are shared
//! between reads (see [`super::chunk_share`]): each hash is downloaded once even when the
//! image holds it at several addresses or several threads want it at once.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use ed25519_dalek::VerifyingKey;
use parking_lot::RwLock;

mod refresh;

use self::refresh::Replaced;
use super::chunk_share::{ChunkShare, Claim};
use super::{check_range, RemoteSource, SourceError, SourceIdentity};
use crate::net::redact_url;
use crate::net::NetError;
use crate::store::fetch::{FetchOptions, Fetcher, StoreLocation};
use crate::store::identity::{now_unix, IdentityError, ImageIdentity};
use crate::store::index::{ChunkEntry, ChunkHash, Index, IndexHash, Trust, MAX_INDEX_LEN};
use crate::store::layout::{chunk_rel, index_rel, validate_name, INDEXES_DIR, INDEX_SUFFIX};
use crate::store::{decode_object, max_object_len, KeyId};

/// Whose signature the index must carry.
#[derive(Clone, Debug)]
pub enum IndexTrust {
    /// Any of these keys (at least one).
    Keys(Vec<VerifyingKey>),
    /// Do not check the signature. The chunks are still verified against the index, but
    /// nothing proves the index is the publisher's: only for tests and explicit opt-out.
    InsecureUnverified,
}

/// How to open a [`StoreSource`]. There is no default trust: the caller names a key or
/// opts out explicitly.
#[derive(Clone, Debug)]
pub struct StoreSourceOptions {
    /// Trusted signing keys, or the explicit opt-out.
    pub trust: IndexTrust,
    /// Retries and timeouts for HTTP.
    pub fetch: FetchOptions,
    /// Verified chunks kept in memory (0 disables the cache).
    pub cache_chunks: usize,
}

impl StoreSourceOptions {
    /// Options that require the index to be signed by `key`.
    pub fn trusted(key: VerifyingKey) -> Self {
        Self::with_trust(IndexTrust::Keys(vec![key]))
    }

    /// Options that skip the index signature check (explicit opt-out).
    pub fn insecure_unverified() -> Self {
        Self::with_trust(IndexTrust::InsecureUnverified)
    }

    fn with_trust(trust: IndexTrust) -> Self {
        StoreSourceOptions {
            trust,
            fetch: FetchOptions::default(),
            cache_chunks: 16,
        }
    }
}

/// An image in a chunk store, as a [`RemoteSource`].
pub struct StoreSource {
    /// Replaced as a whole by [`RemoteSource::replace_urls`].
    fetcher: RwLock<Arc<Fetcher>>,
    /// The image's name in the store (`indexes/<image>.idx`).
    image: String,
    fetch_opts: FetchOptions,
    /// Wakes reads waiting out a 403 when the location was replaced.
    replaced: Replaced,
    index: Index,
    index_hash: IndexHash,
    signer: Option<KeyId>,
    identity: SourceIdentity,
    zero_hash_full: ChunkHash,
    share: ChunkShare,
}

impl std::fmt::Debug for StoreSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreSource")
            .field("location", self.fetcher().location())
            .field("image", &self.image)
            .field("index_hash", &self.index_hash)
            .finish_non_exhaustive()
    }
}

impl StoreSource {
    /// Opens image `name` of the store at `location`: a directory path, or an `http://` /
    /// `https://` base URL (the directory that holds `chunks/` and `indexes/`).
    pub fn open(location: &str, name: &str, opts: StoreSourceOptions) -> Result<Self, SourceError> {
        validate_name(name).map_err(|e| SourceError::Invalid(e.to_string()))?;
        let location = StoreLocation::parse(location);
        let fetcher = Fetcher::new(location, opts.fetch.clone())?;
        let rel = index_rel(name);
        let what = fetcher.location().describe(&rel);
        let bytes = fetcher.get(&rel, MAX_INDEX_LEN)?;
        let trust = match &opts.trust {
            IndexTrust::Keys(keys) => Trust::AnyOf(keys),
            IndexTrust::InsecureUnverified => Trust::Unverified,
        };
        let parsed = Index::parse(&bytes, trust).map_err(|e| SourceError::Verify {
            what: what.clone(),
            reason: e.to_string(),
        })?;
        if !parsed.verified {
            tracing::warn!("{what}: index signature NOT checked (explicit opt-out or pinned hash)");
        }
        check_identity(&parsed.index, name, parsed.verified).map_err(|e| SourceError::Verify {
            what: what.clone(),
            reason: e.to_string(),
        })?;
        let index = parsed.index;
        let identity = SourceIdentity {
            kind: "store".into(),
            size: index.image_size(),
            validator: parsed.hash.to_hex(),
        };
        let zero_hash_full = ChunkHash::of(&vec![0u8; index.chunk_size() as usize]);
        let share = ChunkShare::new(
            index.entries().iter().filter_map(|e| e.hash()),
            opts.cache_chunks,
            DUPLICATE_PIN_BYTES,
        );
        Ok(StoreSource {
            fetcher: RwLock::new(Arc::new(fetcher)),
            image: name.to_owned(),
            fetch_opts: opts.fetch,
            replaced: Replaced::default(),
            index,
            index_hash: parsed.hash,
            signer: parsed.signer,
            identity,
            zero_hash_full,
            share,
        })
    }

    /// Opens from the location of an index file itself:
    /// `<store>/indexes/<name>.idx` (path or URL).
    pub fn open_index(index_location: &str, opts: StoreSourceOptions) -> Result<Self, SourceError> {
        let (base, name) = split_index_location(index_location)?;
        Self::open(base, name, opts)
    }

    /// The fetcher in use now.
    fn fetcher(&self) -> Arc<Fetcher> {
        self.fetcher.read().clone()
    }

    /// The image identity of the index (name, version, times); `None` for a version-1
    /// index, which only an open without a signature check accepts.
    pub fn image_identity(&self) -> Option<&ImageIdentity> {
        self.index.identity()
    }

    /// The parsed, verified index.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// Hash of the index (what the identity validator is the hex of).
    pub fn index_hash(&self) -> IndexHash {
        self.index_hash
    }

    /// Key id that signed the index, `None` if unsigned.
    pub fn signer(&self) -> Option<KeyId> {
        self.signer
    }

    /// Chunk size of the store image.
    pub fn chunk_size(&self) -> u64 {
        self.index.chunk_size()
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> u64 {
        self.index.chunk_count()
    }

    /// BLAKE3 hash of chunk `c`'s bytes, `None` for a zero chunk or past the end. For
    /// seeding: a local chunk with this hash can be used instead of fetching.
    pub fn chunk_hash(&self, c: u64) -> Option<ChunkHash> {
        self.index.entry(c).and_then(|e| e.hash())
    }

    /// True when chunk `c` is all zeros per the index.
    pub fn is_zero_chunk(&self, c: u64) -> bool {
        matches!(self.index.entry(c), Some(ChunkEntry::Zero))
    }

    /// The recorded boot profile: chunk numbers in the order a boot reads them.
    pub fn boot_profile(&self) -> &[u32] {
        self.index.boot_profile()
    }

    /// Reads and verifies one whole chunk (the last may be short).
    pub fn read_chunk(&self, c: u64) -> Result<Vec<u8>, SourceError> {
        let len = self.index.chunk_len(c);
        let mut buf = vec![0u8; len as usize];
        self.read_at(self.index.chunk_offset(c), &mut buf)?;
        Ok(buf)
    }

    /// Verified bytes of the given non-zero chunks: shared (cached, pinned duplicate,
    /// or fetched by another reader right now) or fetched.
    fn load(&self, chunks: &[u64]) -> Result<HashMap<ChunkHash, Arc<Vec<u8>>>, SourceError> {
        let mut have: HashMap<ChunkHash, Arc<Vec<u8>>> = HashMap::new();
        let mut want: Vec<(ChunkHash, bool, u64)> = Vec::new();
        let mut waits: Vec<(ChunkHash, bool, u64)> = Vec::new();
        let mut seen: HashSet<ChunkHash> = HashSet::new();
        for &c in chunks {
            let Some(ChunkEntry::Stored { hash, compressed }) = self.index.entry(c).copied() else {
                continue;
            };
            if !seen.insert(hash) {
                continue;
            }
            let item = (hash, compressed, self.index.chunk_len(c));
            match self.share.claim(hash) {
                Claim::Have(data) => {
                    have.insert(hash, data);
                }
                Claim::Fetch => want.push(item),
                Claim::Wait => waits.push(item),
            }
        }
        // Every claim taken is finished before waiting on others (no wait cycles).
        let mut first_err = self.fetch_claimed(&want, &mut have).err();
        for item in waits {
            match self.share.wait(item.0) {
                Claim::Have(data) => {
                    have.insert(item.0, data);
                }
                _ => {
                    if let Err(e) = self.fetch_claimed(std::slice::from_ref(&item), &mut have) {
                        first_err.get_or_insert(e);
                    }
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(have),
        }
    }

    /// Fetches and verifies chunks claimed with [`Claim::Fetch`], finishing every claim
    /// (success or not) before returning.
    fn fetch_claimed(
        &self,
        want: &[(ChunkHash, bool, u64)],
        have: &mut HashMap<ChunkHash, Arc<Vec<u8>>>,
    ) -> Result<(), SourceError> {
        if want.is_empty() {
            return Ok(());
        }
        let reqs: Vec<(String, u64)> = want
            .iter()
            .map(|(h, z, len)| (chunk_rel(h, *z), max_object_len(*len, *z)))
            .collect();
        let results = self.fetcher().get_many(&reqs);
        let mut first_err = None;
        for (&(hash, compressed, len), (rel, result)) in want.iter().zip(reqs.iter().zip(results)) {
            let outcome = self
                .verify(rel, result, hash, compressed, len)
                .map(Arc::new);
            self.share.finish(hash, outcome.as_ref().ok());
            match outcome {
                Ok(data) => {
                    have.insert(hash, data);
                }
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Decodes and checks one fetched object. A bad object may be a transfer fault a proxy
    /// or mirror repairs: it is fetched again a few times; a persistent mismatch is an
    /// error, never data.
    fn verify(
        &self,
        rel: &(String, u64),
        result: Result<Vec<u8>, NetError>,
        hash: ChunkHash,
        compressed: bool,
        len: u64,
    ) -> Result<Vec<u8>, SourceError> {
        let fetcher = self.fetcher();
        let mut outcome = decode_object(result?, &hash, compressed, len);
        for _ in 1..VERIFY_ATTEMPTS {
            if outcome.is_ok() {
                break;
            }
            outcome = decode_object(fetcher.get(&rel.0, rel.1)?, &hash, compressed, len);
        }
        outcome.map_err(|e| SourceError::Verify {
            what: fetcher.location().describe(&rel.0),
            reason: e.to_string(),
        })
    }

    /// True when chunk `c` is all zeros: flagged, or (for an index written by another tool)
    /// stored under the hash of a zero chunk.
    fn chunk_is_zero(&self, c: u64) -> bool {
        match self.index.entry(c) {
            Some(ChunkEntry::Zero) => true,
            Some(ChunkEntry::Stored { hash, .. }) => {
                let len = self.index.chunk_len(c);
                if len == self.index.chunk_size() {
                    *hash == self.zero_hash_full
                } else {
                    *hash == ChunkHash::of(&vec![0u8; len as usize])
                }
            }
            None => false,
        }
    }
}

impl RemoteSource for StoreSource {
    fn identity(&self) -> &SourceIdentity {
        &self.identity
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        self.read_waiting(offset, buf, None)
    }

    fn read_at_cancellable(
        &self,
        offset: u64,
        buf: &mut [u8],
        cancel: &super::CancellationToken,
    ) -> Result<(), SourceError> {
        self.read_waiting(offset, buf, Some(cancel))
    }

    fn known_zero(&self, offset: u64, len: u64) -> Option<bool> {
        self.known_zero_range(offset, len)
    }

    /// Takes the index location `urls` (exactly one: `<store>/indexes/<name>.idx`) when
    /// the index found there is the pinned one (same hash); otherwise nothing changes.
    fn replace_urls(&self, urls: &[String]) -> Result<(), SourceError> {
        self.replace_location(urls)
    }

    fn name(&self) -> String {
        self.fetcher().location().describe(&index_rel(&self.image))
    }
}

/// Splits `<store>/indexes/<name>.idx` (a path or URL) into the store base and the name.
fn split_index_location(index_location: &str) -> Result<(&str, &str), SourceError> {
    let bad = || {
        SourceError::Invalid(format!(
            "{}: expected a chunk-store index location <store>/{INDEXES_DIR}/<name>{INDEX_SUFFIX}",
            redact_url(index_location)
        ))
    };
    let trimmed = index_location.trim().trim_end_matches('/');
    let trimmed = trimmed.strip_prefix("file://").unwrap_or(trimmed);
    let (dir, file) = trimmed.rsplit_once('/').ok_or_else(bad)?;
    let name = file.strip_suffix(INDEX_SUFFIX).ok_or_else(bad)?;
    let base = dir
        .strip_suffix(INDEXES_DIR)
        .filter(|b| b.is_empty() || b.ends_with('/'))
        .ok_or_else(bad)?;
    let base = match base.trim_end_matches('/') {
        "" if base.starts_with('/') => "/",
        "" => ".",
        b => b,
    };
    Ok((base, name))
}

/// The identity rules of an open (docs/chunk-store.md section 2.7): the signed name must
/// be the name asked for; when the signature was checked (the index is trusted through
/// it) the index must also carry an identity (version 2) and must not have expired. An
/// unverified open (explicit opt-out, or a disk whose pinned index hash vouches for the
/// index) skips those two: expiry must not strand a disk prepared while it was valid.
fn check_identity(index: &Index, name: &str, verified: bool) -> Result<(), IdentityError> {
    match index.identity() {
        Some(id) if verified => id.check(name, 0, now_unix()),
        Some(id) => id.check(name, 0, 0),
        None if verified => Err(IdentityError::Legacy),
        None => Ok(()),
    }
}

/// Memory that chunks listed at several addresses may stay pinned in until each address
/// was served (so each is downloaded once).
const DUPLICATE_PIN_BYTES: u64 = 64 << 20;

/// Fetches of one chunk object whose bytes fail verification before the read fails.
const VERIFY_ATTEMPTS: u32 = 3;

/// Chunks fetched per batch by one `read_at`.
const READ_BATCH: usize = 32;

impl StoreSource {
    /// One attempt at [`RemoteSource::read_at`] (a 403 is returned, not waited out).
    fn read_once(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        check_range(offset, buf.len(), self.index.image_size())?;
        if buf.is_empty() {
            return Ok(());
        }
        let shift = self.index.chunk_shift();
        let end = offset + buf.len() as u64;
        let first = offset >> shift;
        let last = (end - 1) >> shift;
        // Batches bound the memory one large read holds to a few dozen chunks.
        let all: Vec<u64> = (first..=last).collect();
        for batch in all.chunks(READ_BATCH) {
            self.copy_batch(batch, offset, buf)?;
        }
        Ok(())
    }

    /// Copies the parts of `batch`'s chunks that overlap `[offset, offset + buf.len())`.
    fn copy_batch(&self, batch: &[u64], offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let shift = self.index.chunk_shift();
        let end = offset + buf.len() as u64;
        let data = self.load(batch)?;
        for &c in batch {
            let c_start = c << shift;
            let from = offset.max(c_start);
            let to = end.min(c_start + self.index.chunk_size());
            let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
            match self.index.entry(c) {
                Some(ChunkEntry::Stored { hash, .. }) => {
                    let src = &data[hash];
                    dst.copy_from_slice(&src[(from - c_start) as usize..(to - c_start) as usize]);
                }
                _ => dst.fill(0),
            }
        }
        Ok(())
    }

    /// See [`RemoteSource::known_zero`]: `Some(true)` when every chunk touched is zero,
    /// `Some(false)` when the range covers a whole non-zero chunk, else `None`.
    fn known_zero_range(&self, offset: u64, len: u64) -> Option<bool> {
        let end = offset.checked_add(len)?;
        if end > self.index.image_size() {
            return None;
        }
        if len == 0 {
            return Some(true);
        }
        let shift = self.index.chunk_shift();
        let mut all_zero = true;
        for c in (offset >> shift)..=((end - 1) >> shift) {
            if self.chunk_is_zero(c) {
                continue;
            }
            all_zero = false;
            let c_start = c << shift;
            let c_end = c_start + self.index.chunk_len(c);
            // A non-zero chunk has a non-zero byte somewhere; only a range covering it
            // whole is known to contain that byte.
            if offset <= c_start && end >= c_end {
                return Some(false);
            }
        }
        if all_zero {
            Some(true)
        } else {
            None
        }
    }
}
