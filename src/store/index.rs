//! The binary index of one published image: which chunk object holds each chunk, which
//! chunks are all zeros, the boot profile, and a detached ed25519 signature.
//!
//! The byte layout is specified in `docs/chunk-store.md`; this module is its only reader
//! and writer. The parser treats its input as hostile: it checks every length against the
//! input before it allocates, never panics, and reports what is wrong with a typed
//! [`IndexError`]. The signature is checked before the per-chunk table is interpreted, so
//! unauthenticated data is never acted upon beyond the fixed-size header.

use std::fmt;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey, SIGNATURE_LENGTH};

use super::identity::{ImageIdentity, IDENTITY_LEN};
use super::sign::{key_id, KeyId, KEY_ID_LEN};

/// First eight bytes of every index file.
pub const MAGIC: [u8; 8] = *b"SBSTIDX\n";
/// The format version this code writes: the header is followed by the identity block
/// ([`ImageIdentity`]: image name, version, creation and expiry time).
pub const VERSION: u16 = 2;
/// The first format version, without an identity block: still parsed (gc, stats, disks
/// pinned to such an index), refused where a signature is checked (see
/// `docs/chunk-store.md` section 2.7).
pub const LEGACY_VERSION: u16 = 1;
/// Length of the fixed header (the identity block of a version-2 index follows it).
pub const HEADER_LEN: usize = 40;
/// Length of one per-chunk entry: 32-byte hash + 1 flag byte.
pub const ENTRY_LEN: usize = 33;
/// Length of one boot-profile entry (a little-endian `u32` chunk number).
pub const PROFILE_ENTRY_LEN: usize = 4;
/// Length of the trailer: key id + ed25519 signature.
pub const TRAILER_LEN: usize = KEY_ID_LEN + SIGNATURE_LENGTH;
/// Smallest chunk size: 4 KiB (shift 12).
pub const MIN_CHUNK_SHIFT: u8 = 12;
/// Largest chunk size: 4 MiB (shift 22).
pub const MAX_CHUNK_SHIFT: u8 = 22;
/// Largest index file any reader accepts (1 GiB: a 2 TiB image in 64 KiB chunks). Readers
/// check this before they download or read an index, so a hostile server cannot make a
/// client allocate without bound.
pub const MAX_INDEX_LEN: u64 = 1 << 30;

/// Header flag: the trailer holds a real key id and signature.
const HEADER_FLAG_SIGNED: u16 = 1;
/// Chunk flag: the chunk is all zeros; it has no object and its hash field is zero.
const CHUNK_FLAG_ZERO: u8 = 1;
/// Chunk flag: the chunk's object is stored zstd-compressed (`<hash>.zst`).
const CHUNK_FLAG_ZSTD: u8 = 2;

/// A BLAKE3 hash of a chunk's uncompressed bytes: the chunk's name in the store.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkHash(pub [u8; 32]);

impl ChunkHash {
    /// Hashes chunk bytes.
    pub fn of(data: &[u8]) -> Self {
        ChunkHash(*blake3::hash(data).as_bytes())
    }

    /// Lower-case hex, the object's file name.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits (either case).
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(ChunkHash(out))
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkHash({})", self.to_hex())
    }
}

/// BLAKE3 hash of a whole index file, signature included: what a migration pins.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct IndexHash(pub [u8; 32]);

impl IndexHash {
    /// Lower-case hex, used as the source's identity validator.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for IndexHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for IndexHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IndexHash({})", self.to_hex())
    }
}

/// Computes the hash that pins an index: BLAKE3 over every byte of the file.
pub fn index_hash(bytes: &[u8]) -> IndexHash {
    IndexHash(*blake3::hash(bytes).as_bytes())
}

/// What one chunk of the image is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChunkEntry {
    /// All zeros: nothing is stored, readers synthesize it.
    Zero,
    /// Stored as object `hash`, compressed with zstd when `compressed`.
    Stored { hash: ChunkHash, compressed: bool },
}

impl ChunkEntry {
    /// The object hash, `None` for a zero chunk.
    pub fn hash(&self) -> Option<ChunkHash> {
        match self {
            ChunkEntry::Zero => None,
            ChunkEntry::Stored { hash, .. } => Some(*hash),
        }
    }
}

/// Which keys an index must be signed by.
#[derive(Clone, Copy, Debug)]
pub enum Trust<'a> {
    /// Signed by this key.
    Key(&'a VerifyingKey),
    /// Signed by any of these keys (key rotation).
    AnyOf(&'a [VerifyingKey]),
    /// No signature check at all (structure is still checked). Only for explicit opt-out,
    /// and for store maintenance (`gc`, `stats`) that never serves data.
    Unverified,
}

/// Everything that can be wrong with an index.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IndexError {
    #[error("index truncated: need {needed} bytes, have {found}")]
    Truncated { needed: u64, found: u64 },
    #[error("index has {extra} unexpected bytes after its end")]
    TrailingBytes { extra: u64 },
    #[error("index is {len} bytes, more than the {max}-byte limit")]
    TooLarge { len: u64, max: u64 },
    #[error("not a streamboot index (bad magic)")]
    BadMagic,
    #[error(
        "unsupported index version {0} (this build reads versions {LEGACY_VERSION} and {VERSION})"
    )]
    BadVersion(u16),
    #[error("bad index header: {0}")]
    BadHeader(&'static str),
    #[error("bad index identity block: {0}")]
    BadIdentity(&'static str),
    #[error("bad chunk size 2^{shift}: must be a power of two from 4 KiB to 4 MiB")]
    BadChunkSize { shift: u8 },
    #[error("chunk count {declared} does not match image size {image_size} in {chunk_size}-byte chunks ({expected})")]
    CountMismatch {
        declared: u64,
        expected: u64,
        image_size: u64,
        chunk_size: u64,
    },
    #[error("image too large: {chunks} chunks (at most {max})")]
    TooManyChunks { chunks: u64, max: u64 },
    #[error("bad entry for chunk {chunk}: {reason}")]
    BadChunkEntry { chunk: u64, reason: &'static str },
    #[error("bad boot profile entry {position}: {reason}")]
    BadProfile { position: u64, reason: &'static str },
    #[error("index is not signed, and a signature is required")]
    Unsigned,
    #[error("index is signed by key {found}, which is not trusted (trusted: {trusted})")]
    WrongKey { found: KeyId, trusted: String },
    #[error("bad index signature (key {0})")]
    BadSignature(KeyId),
    #[error("bad index trailer: {0}")]
    BadTrailer(&'static str),
}

/// A parsed, validated index.
///
/// Invariants (enforced by [`Index::new`] and [`Index::parse`]): the chunk size is a power
/// of two in 4 KiB..=4 MiB, there is exactly one entry per chunk of the image, and the
/// boot profile lists distinct chunk numbers below the chunk count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Index {
    image_size: u64,
    chunk_shift: u8,
    entries: Vec<ChunkEntry>,
    boot_profile: Vec<u32>,
    /// `None` only for a version-1 index (parsed, never written by publish).
    identity: Option<ImageIdentity>,
}

/// An index as read from a file: the content plus what pins and authenticates it.
#[derive(Clone, Debug)]
pub struct ParsedIndex {
    /// The content.
    pub index: Index,
    /// Hash of the whole file (see [`index_hash`]).
    pub hash: IndexHash,
    /// Key id recorded in the trailer, `None` for an unsigned index.
    pub signer: Option<KeyId>,
    /// True when the signature was checked against a trusted key.
    pub verified: bool,
}

/// Number of chunks for `image_size` bytes at `1 << shift` per chunk.
fn chunks_for(image_size: u64, shift: u8) -> u64 {
    image_size.div_ceil(1u64 << shift)
}

/// Length of the header plus, for version 2, the identity block.
fn head_len(identity: bool) -> usize {
    HEADER_LEN + if identity { IDENTITY_LEN } else { 0 }
}

/// Total file length for the given counts; `None` on overflow.
fn file_len(identity: bool, chunks: u64, profile_len: u64) -> Option<u64> {
    (head_len(identity) as u64)
        .checked_add(chunks.checked_mul(ENTRY_LEN as u64)?)?
        .checked_add(profile_len.checked_mul(PROFILE_ENTRY_LEN as u64)?)?
        .checked_add(TRAILER_LEN as u64)
}

/// Checks the chunk-size shift.
fn check_shift(shift: u8) -> Result<(), IndexError> {
    if (MIN_CHUNK_SHIFT..=MAX_CHUNK_SHIFT).contains(&shift) {
        Ok(())
    } else {
        Err(IndexError::BadChunkSize { shift })
    }
}

/// Checks that a boot profile lists distinct chunk numbers below `chunks`.
pub fn check_profile(profile: &[u32], chunks: u64) -> Result<(), IndexError> {
    // One bit per chunk; `chunks` was already bounded by the input length or by the
    // caller's own entry vector, so this allocation is bounded too.
    let mut seen = bitvec::vec::BitVec::<u64>::repeat(false, chunks as usize);
    for (position, &c) in profile.iter().enumerate() {
        let position = position as u64;
        if u64::from(c) >= chunks {
            return Err(IndexError::BadProfile {
                position,
                reason: "chunk number past the end of the image",
            });
        }
        if seen.replace(c as usize, true) {
            return Err(IndexError::BadProfile {
                position,
                reason: "chunk listed twice",
            });
        }
    }
    Ok(())
}

impl Index {
    /// Builds an index, checking every invariant of the format.
    pub fn new(
        image_size: u64,
        chunk_size: u64,
        entries: Vec<ChunkEntry>,
        boot_profile: Vec<u32>,
    ) -> Result<Self, IndexError> {
        if !chunk_size.is_power_of_two() {
            return Err(IndexError::BadChunkSize { shift: 0 });
        }
        let shift = chunk_size.trailing_zeros() as u8;
        check_shift(shift)?;
        let expected = chunks_for(image_size, shift);
        if expected > u64::from(u32::MAX) {
            return Err(IndexError::TooManyChunks {
                chunks: expected,
                max: u64::from(u32::MAX),
            });
        }
        if entries.len() as u64 != expected {
            return Err(IndexError::CountMismatch {
                declared: entries.len() as u64,
                expected,
                image_size,
                chunk_size,
            });
        }
        check_profile(&boot_profile, expected)?;
        Ok(Index {
            image_size,
            chunk_shift: shift,
            entries,
            boot_profile,
            identity: None,
        })
    }

    /// Returns a copy carrying `identity` (encoded as a version-2 index).
    pub fn with_identity(&self, identity: ImageIdentity) -> Result<Self, IndexError> {
        identity.validate()?;
        Ok(Index {
            identity: Some(identity),
            ..self.clone()
        })
    }

    /// The image identity; `None` for a version-1 index.
    pub fn identity(&self) -> Option<&ImageIdentity> {
        self.identity.as_ref()
    }

    /// Returns a copy with `profile` as the boot profile.
    pub fn with_boot_profile(&self, profile: Vec<u32>) -> Result<Self, IndexError> {
        check_profile(&profile, self.entries.len() as u64)?;
        Ok(Index {
            boot_profile: profile,
            ..self.clone()
        })
    }

    /// Size of the image in bytes.
    pub fn image_size(&self) -> u64 {
        self.image_size
    }

    /// Chunk size in bytes (a power of two).
    pub fn chunk_size(&self) -> u64 {
        1u64 << self.chunk_shift
    }

    /// log2 of the chunk size.
    pub fn chunk_shift(&self) -> u8 {
        self.chunk_shift
    }

    /// Number of chunks (the last one may be short).
    pub fn chunk_count(&self) -> u64 {
        self.entries.len() as u64
    }

    /// All entries, in chunk order.
    pub fn entries(&self) -> &[ChunkEntry] {
        &self.entries
    }

    /// Entry of chunk `c`, `None` past the end.
    pub fn entry(&self, c: u64) -> Option<&ChunkEntry> {
        usize::try_from(c).ok().and_then(|c| self.entries.get(c))
    }

    /// Image offset of chunk `c`'s first byte.
    pub fn chunk_offset(&self, c: u64) -> u64 {
        c << self.chunk_shift
    }

    /// Length of chunk `c` in bytes: the chunk size, shorter for the image's last chunk,
    /// 0 past the end.
    pub fn chunk_len(&self, c: u64) -> u64 {
        let start = c.saturating_mul(self.chunk_size());
        self.image_size.saturating_sub(start).min(self.chunk_size())
    }

    /// Ordered chunk numbers that a boot reads first (may be empty).
    pub fn boot_profile(&self) -> &[u32] {
        &self.boot_profile
    }

    /// Serializes the index (version 2 with its identity, version 1 without one); signs
    /// it when `key` is given.
    pub fn encode(&self, key: Option<&SigningKey>) -> Vec<u8> {
        let chunks = self.entries.len();
        let ident = self.identity.is_some();
        // Cannot overflow: the chunk count was bounded to u32::MAX by `new`/`parse`.
        let len = file_len(ident, chunks as u64, self.boot_profile.len() as u64)
            .expect("index length fits in u64") as usize;
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(&MAGIC);
        let version = if ident { VERSION } else { LEGACY_VERSION };
        out.extend_from_slice(&version.to_le_bytes());
        let flags = if key.is_some() { HEADER_FLAG_SIGNED } else { 0 };
        out.extend_from_slice(&flags.to_le_bytes());
        out.push(self.chunk_shift);
        out.extend_from_slice(&[0u8; 3]);
        out.extend_from_slice(&self.image_size.to_le_bytes());
        out.extend_from_slice(&(chunks as u64).to_le_bytes());
        out.extend_from_slice(&(self.boot_profile.len() as u32).to_le_bytes());
        out.extend_from_slice(&[0u8; 4]);
        debug_assert_eq!(out.len(), HEADER_LEN);
        if let Some(id) = &self.identity {
            id.encode_into(&mut out);
        }
        for e in &self.entries {
            match e {
                ChunkEntry::Zero => {
                    out.extend_from_slice(&[0u8; 32]);
                    out.push(CHUNK_FLAG_ZERO);
                }
                ChunkEntry::Stored { hash, compressed } => {
                    out.extend_from_slice(&hash.0);
                    out.push(if *compressed { CHUNK_FLAG_ZSTD } else { 0 });
                }
            }
        }
        for c in &self.boot_profile {
            out.extend_from_slice(&c.to_le_bytes());
        }
        match key {
            Some(key) => {
                out.extend_from_slice(&key_id(&key.verifying_key()).0);
                let sig = key.sign(&out);
                out.extend_from_slice(&sig.to_bytes());
            }
            None => out.extend_from_slice(&[0u8; TRAILER_LEN]),
        }
        debug_assert_eq!(out.len(), len);
        out
    }

    /// Parses and validates an index file, checking its signature as `trust` demands.
    pub fn parse(bytes: &[u8], trust: Trust<'_>) -> Result<ParsedIndex, IndexError> {
        let found = bytes.len() as u64;
        if found > MAX_INDEX_LEN {
            return Err(IndexError::TooLarge {
                len: found,
                max: MAX_INDEX_LEN,
            });
        }
        let header: &[u8; HEADER_LEN] = bytes
            .get(..HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or(IndexError::Truncated {
                needed: HEADER_LEN as u64,
                found,
            })?;
        let h = Header::decode(header)?;
        let head = head_len(h.identity);
        let needed = file_len(h.identity, h.chunks, u64::from(h.profile_len)).ok_or(
            IndexError::TooManyChunks {
                chunks: h.chunks,
                max: u64::from(u32::MAX),
            },
        )?;
        if found < needed {
            return Err(IndexError::Truncated { needed, found });
        }
        if found > needed {
            return Err(IndexError::TrailingBytes {
                extra: found - needed,
            });
        }
        // From here on every offset is below `needed == bytes.len()`, so slicing is in
        // bounds and `usize` conversions cannot truncate.
        let identity = match h.identity {
            true => Some(ImageIdentity::decode(
                bytes[HEADER_LEN..head]
                    .try_into()
                    .expect("identity block length"),
            )?),
            false => None,
        };
        let trailer_at = bytes.len() - TRAILER_LEN;
        let (signer, verified) = check_trailer(bytes, trailer_at, h.signed, trust)?;

        let table_end = head + h.chunks as usize * ENTRY_LEN;
        let mut entries = Vec::with_capacity(h.chunks as usize);
        for (i, raw) in bytes[head..table_end].chunks_exact(ENTRY_LEN).enumerate() {
            entries.push(decode_entry(i as u64, raw)?);
        }
        let profile: Vec<u32> = bytes[table_end..trailer_at]
            .chunks_exact(PROFILE_ENTRY_LEN)
            .map(|p| u32::from_le_bytes([p[0], p[1], p[2], p[3]]))
            .collect();
        check_profile(&profile, h.chunks)?;

        Ok(ParsedIndex {
            index: Index {
                image_size: h.image_size,
                chunk_shift: h.shift,
                entries,
                boot_profile: profile,
                identity,
            },
            hash: index_hash(bytes),
            signer,
            verified,
        })
    }
}

/// The decoded fixed header.
struct Header {
    /// Version 2: the identity block follows.
    identity: bool,
    signed: bool,
    shift: u8,
    image_size: u64,
    chunks: u64,
    profile_len: u32,
}

impl Header {
    fn decode(b: &[u8; HEADER_LEN]) -> Result<Self, IndexError> {
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        if b[..8] != MAGIC {
            return Err(IndexError::BadMagic);
        }
        let version = u16_at(8);
        if version != VERSION && version != LEGACY_VERSION {
            return Err(IndexError::BadVersion(version));
        }
        let flags = u16_at(10);
        if flags & !HEADER_FLAG_SIGNED != 0 {
            return Err(IndexError::BadHeader("unknown header flags"));
        }
        let shift = b[12];
        check_shift(shift)?;
        if b[13..16] != [0u8; 3] || u32_at(36) != 0 {
            return Err(IndexError::BadHeader("reserved bytes are not zero"));
        }
        let image_size = u64_at(16);
        let chunks = u64_at(24);
        let expected = chunks_for(image_size, shift);
        if chunks != expected {
            return Err(IndexError::CountMismatch {
                declared: chunks,
                expected,
                image_size,
                chunk_size: 1u64 << shift,
            });
        }
        if chunks > u64::from(u32::MAX) {
            return Err(IndexError::TooManyChunks {
                chunks,
                max: u64::from(u32::MAX),
            });
        }
        let profile_len = u32_at(32);
        if u64::from(profile_len) > chunks {
            return Err(IndexError::BadProfile {
                position: u64::from(profile_len),
                reason: "profile longer than the chunk count",
            });
        }
        Ok(Header {
            identity: version == VERSION,
            signed: flags & HEADER_FLAG_SIGNED != 0,
            shift,
            image_size,
            chunks,
            profile_len,
        })
    }
}

/// Checks the trailer at `at` (exactly [`TRAILER_LEN`] bytes before the end) against
/// `trust`. Returns the signer's key id and whether the signature was verified.
fn check_trailer(
    bytes: &[u8],
    at: usize,
    signed: bool,
    trust: Trust<'_>,
) -> Result<(Option<KeyId>, bool), IndexError> {
    let trailer = &bytes[at..];
    let mut id = [0u8; KEY_ID_LEN];
    id.copy_from_slice(&trailer[..KEY_ID_LEN]);
    let id = KeyId(id);
    if !signed {
        if trailer.iter().any(|&b| b != 0) {
            return Err(IndexError::BadTrailer(
                "unsigned index with a non-zero trailer",
            ));
        }
        return match trust {
            Trust::Unverified => Ok((None, false)),
            _ => Err(IndexError::Unsigned),
        };
    }
    let keys: &[VerifyingKey] = match trust {
        Trust::Unverified => return Ok((Some(id), false)),
        Trust::Key(k) => std::slice::from_ref(k),
        Trust::AnyOf(ks) => ks,
    };
    let key = keys
        .iter()
        .find(|k| key_id(k) == id)
        .ok_or_else(|| IndexError::WrongKey {
            found: id,
            trusted: keys
                .iter()
                .map(|k| key_id(k).to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    let mut sig = [0u8; SIGNATURE_LENGTH];
    sig.copy_from_slice(&trailer[KEY_ID_LEN..]);
    let sig = Signature::from_bytes(&sig);
    // The signed message is everything before the signature: header, tables, key id.
    key.verify_strict(&bytes[..at + KEY_ID_LEN], &sig)
        .map_err(|_| IndexError::BadSignature(id))?;
    Ok((Some(id), true))
}

/// Decodes one 33-byte chunk entry.
fn decode_entry(chunk: u64, raw: &[u8]) -> Result<ChunkEntry, IndexError> {
    let mut hash = [0u8; 32];
    hash.copy_from_slice(&raw[..32]);
    let flags = raw[32];
    if flags & !(CHUNK_FLAG_ZERO | CHUNK_FLAG_ZSTD) != 0 {
        return Err(IndexError::BadChunkEntry {
            chunk,
            reason: "unknown flags",
        });
    }
    if flags & CHUNK_FLAG_ZERO != 0 {
        if flags & CHUNK_FLAG_ZSTD != 0 {
            return Err(IndexError::BadChunkEntry {
                chunk,
                reason: "zero chunk flagged compressed",
            });
        }
        if hash != [0u8; 32] {
            return Err(IndexError::BadChunkEntry {
                chunk,
                reason: "zero chunk with a non-zero hash field",
            });
        }
        return Ok(ChunkEntry::Zero);
    }
    Ok(ChunkEntry::Stored {
        hash: ChunkHash(hash),
        compressed: flags & CHUNK_FLAG_ZSTD != 0,
    })
}

#[cfg(test)]
#[path = "index_tests.rs"]
mod tests;
