//! Errors of the boot relocator and metadata store.

use std::io;
use std::path::PathBuf;

use crate::format::State;

/// Everything that can go wrong while reading or changing a prepared disk.
#[derive(Debug, thiserror::Error)]
pub enum RelocError {
    /// Disk I/O failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The disk carries no streamboot metadata.
    #[error("not a prepared disk (no streamboot superblock)")]
    NotPrepared,
    /// The disk already carries streamboot metadata.
    #[error("disk is already prepared (state {0}); use status, commit or rollback")]
    AlreadyPrepared(State),
    /// Metadata failed its checksums or is inconsistent.
    #[error("corrupted metadata: {0}")]
    Corrupt(String),
    /// The operation is not valid in the current state.
    #[error("cannot {op} in state {state}")]
    BadState { op: &'static str, state: State },
    /// The disk has no room for the released area.
    #[error("disk too small: {0}")]
    TooSmall(String),
    /// The released area or a target home range would overlap data in use.
    #[error("refusing to prepare: {0}")]
    Overlap(String),
    /// A chunk size outside 4 KiB..4 MiB or not a power of two.
    #[error("invalid chunk size {0}: must be a power of two from 4 KiB to 4 MiB")]
    InvalidChunkSize(u64),
    /// Invalid arguments.
    #[error("{0}")]
    Invalid(String),
    /// The host key (see [`crate::hostkey`]) cannot be read or created.
    #[error("host key {}: {source}", path.display())]
    HostKey {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Fetching target data failed.
    #[error("fetching target chunk {chunk}: {reason}")]
    Fetch { chunk: u64, reason: String },
    /// The source's partition table cannot be read safely (a GPT damaged in both copies,
    /// a broken EBR chain): nothing tells which bytes of the disk are in use.
    #[error("refusing to prepare: the partition table is damaged: {0}")]
    PartitionTable(String),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, RelocError>;

/// Adds context to an `io::Error`.
pub(crate) trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| RelocError::Io {
            context: context(),
            source,
        })
    }
}
