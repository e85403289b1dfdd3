//! The deduplicated chunk store (design section 5).
//!
//! A store is a directory of content-addressed chunk objects plus one signed binary index
//! per published image. Images that share content share chunk objects: the combined
//! image. Any static HTTP server can serve a store; [`crate::source::store::StoreSource`]
//! reads an image from one, verifying the index against a trusted key and every chunk
//! against its hash.
//!
//! - [`layout`]: paths, atomic writes, the store lock.
//! - [`index`]: the index format (specified in `docs/chunk-store.md`).
//! - [`identity`]: the signed image name, version and expiry of an index.
//! - [`seen`]: the highest version a reader accepted per image (rollback protection).
//! - [`sign`]: ed25519 key files and key ids.
//! - [`publish()`]: cut an image into chunks and publish it.
//! - [`gc()`]: delete chunk objects no index references.
//! - [`stats()`]: logical, unique and shared bytes per image and in total.
//! - [`fetch`]: getting objects from a local directory or over HTTP, with retries.

pub mod fetch;
pub mod gc;
pub mod identity;
pub mod index;
pub mod layout;
pub mod publish;
pub mod s3;
pub mod seen;
pub mod sign;
pub mod stats;

use std::io;
use std::path::{Path, PathBuf};

pub use gc::{gc, GcReport};
pub use identity::{IdentityError, ImageIdentity};
pub use index::{index_hash, ChunkEntry, ChunkHash, Index, IndexError, IndexHash, Trust};
pub use layout::StoreDir;
pub use publish::{publish, publish_with, set_boot_profile, PublishOptions, PublishReport};
pub use sign::{keygen, load_signing_key, load_verifying_key, KeyFiles, KeyId};
pub use stats::{stats, ImageStats, StoreStats, StoreTotals};

/// Errors of store maintenance (publish, gc, stats, keys).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("invalid image name {0:?}: use 1-128 characters from A-Z a-z 0-9 . _ -, not starting with '.'")]
    BadName(String),
    #[error("invalid chunk size {0}: must be a power of two from 4 KiB to 4 MiB")]
    BadChunkSize(u64),
    #[error("index {path}: {source}")]
    Index { path: PathBuf, source: IndexError },
    #[error("key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("image {path} is too large for chunk size {chunk_size}")]
    TooLarge { path: PathBuf, chunk_size: u64 },
    #[error("chunk object {path}: {reason}")]
    BadObject { path: PathBuf, reason: String },
    #[error("no image named {0:?} in the store")]
    NoSuchImage(String),
    #[error("version {requested} of image {name:?} is not above the store's current version {current}: versions only grow (clients refuse an older one)")]
    VersionNotNewer {
        name: String,
        requested: u64,
        current: u64,
    },
    #[error("index {path}: cannot read the current version to number the new one ({source}); give --version N")]
    Unnumbered { path: PathBuf, source: IndexError },
    /// A store on S3 (`s3://`) could not be read, listed or written.
    #[error(transparent)]
    Remote(crate::net::NetError),
}

impl StoreError {
    /// An I/O error on `path`.
    pub fn io(path: &Path, source: io::Error) -> Self {
        StoreError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// Why an object's bytes are not the chunk the index names.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ObjectError {
    #[error("object is {found} bytes, larger than allowed ({max})")]
    TooLarge { found: u64, max: u64 },
    #[error("zstd frame does not decode: {0}")]
    BadCompression(String),
    #[error("chunk is {found} bytes, expected {expected}")]
    WrongLength { found: u64, expected: u64 },
    #[error("BLAKE3 mismatch: expected {expected}, got {found}")]
    HashMismatch {
        expected: ChunkHash,
        found: ChunkHash,
    },
}

/// Largest object a reader accepts for a chunk of `chunk_len` bytes: the raw length, or
/// the worst-case zstd frame size for a compressed object.
pub fn max_object_len(chunk_len: u64, compressed: bool) -> u64 {
    if compressed {
        zstd::zstd_safe::compress_bound(chunk_len as usize) as u64
    } else {
        chunk_len
    }
}

/// Turns an object's bytes into the chunk's bytes and checks them: decompresses a zstd
/// object into at most `chunk_len` bytes, checks the length, then the BLAKE3 hash.
/// Nothing unverified is ever returned.
pub fn decode_object(
    object: Vec<u8>,
    hash: &ChunkHash,
    compressed: bool,
    chunk_len: u64,
) -> Result<Vec<u8>, ObjectError> {
    let max = max_object_len(chunk_len, compressed);
    if object.len() as u64 > max {
        return Err(ObjectError::TooLarge {
            found: object.len() as u64,
            max,
        });
    }
    let data = if compressed {
        // `decompress` refuses to produce more than `chunk_len` bytes, so a hostile frame
        // cannot make us allocate more than one chunk.
        zstd::bulk::decompress(&object, chunk_len as usize)
            .map_err(|e| ObjectError::BadCompression(e.to_string()))?
    } else {
        object
    };
    if data.len() as u64 != chunk_len {
        return Err(ObjectError::WrongLength {
            found: data.len() as u64,
            expected: chunk_len,
        });
    }
    let found = ChunkHash::of(&data);
    if found != *hash {
        return Err(ObjectError::HashMismatch {
            expected: *hash,
            found,
        });
    }
    Ok(data)
}
