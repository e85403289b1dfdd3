//! The migration lifecycle, owned in one place: the transition table
//! ([`transitions`]), the offline operations on a disk ([`prepare()`], [`confirm()`],
//! [`commit()`], [`rollback()`], [`hydrate()`], [`status()`]) returning typed reports,
//! and the daemon wiring of `serve` ([`daemon`]).
//!
//! Front ends (the CLI, the demo) parse their input, call these, and present the
//! reports; none of them checks a state itself. Progress goes through [`Progress`] (the
//! CLI draws bars with it).

pub mod daemon;
mod ops;
mod plan;
mod prepare;
pub mod transitions;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use boot_relocator::{MetaStore, RelocError, State, Storage};

pub use ops::{
    adopt, commit, confirm, hydrate, rollback, status, AdoptReport, CommitOptions, CommitReport,
    ConfirmReport, HydrateOutcome, HydrateRequest, RollbackReport, StatusReport,
};
pub use plan::{plan_prepare, ByteRange, PlanReport, SavedRange};
pub use prepare::{prepare, PrepareOptions, PrepareReport, DEFAULT_BOOT_RANGE, DEFAULT_CHUNK_SIZE};
pub use transitions::{device_start, transition, Conflict, Next, Op, Reason};

use crate::service::ServiceError;
use crate::source::{HttpOptions, RemoteSource, SourceError};
use crate::target::{open_source, pinned_identity};

/// Errors of the lifecycle operations. Each says what was being done; the cause is its
/// [`std::error::Error::source`]. A refused operation ([`MigrationError::Conflict`],
/// [`MigrationError::NotPrepared`], [`MigrationError::Usage`]) changed nothing on disk.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The state does not allow the operation.
    #[error("{}", path.display())]
    Conflict {
        /// The disk.
        path: PathBuf,
        /// The refused transition.
        #[source]
        source: Conflict,
    },
    /// The disk carries no streamboot superblock.
    #[error("{} is not a prepared disk (no streamboot superblock)", path.display())]
    NotPrepared {
        /// The disk.
        path: PathBuf,
    },
    /// Options that do not go together.
    #[error("{0}")]
    Usage(&'static str),
    /// An interrupted prepare for another image is on the disk.
    #[error("an interrupted prepare for another target image is on this disk: roll it back first")]
    OtherTarget,
    /// Opening (and locking) the disk failed.
    #[error("opening {}", path.display())]
    Open {
        /// The disk.
        path: PathBuf,
        /// Cause.
        #[source]
        source: ServiceError,
    },
    /// Reading the disk's metadata failed.
    #[error("reading {}", path.display())]
    Read {
        /// The disk.
        path: PathBuf,
        /// Cause.
        #[source]
        source: RelocError,
    },
    /// Opening the target image failed.
    #[error("opening target {urls}")]
    Target {
        /// The URLs tried.
        urls: String,
        /// Cause.
        #[source]
        source: SourceError,
    },
    /// Planning the relocation failed (the disk does not fit).
    #[error("planning {}", path.display())]
    Plan {
        /// The disk.
        path: PathBuf,
        /// Cause.
        #[source]
        source: RelocError,
    },
    /// An invalid chunk size.
    #[error(transparent)]
    ChunkSize(RelocError),
    /// Opening the engine over the disk failed.
    #[error(transparent)]
    Engine(crate::engine::EngineError),
    /// A step of an operation failed; `what` says which (and how to go on).
    #[error("{what}")]
    Step {
        /// What failed.
        what: &'static str,
        /// Cause.
        #[source]
        source: StepError,
    },
}

/// The cause of a failed step.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// Metadata or relocation.
    #[error(transparent)]
    Reloc(#[from] RelocError),
    /// The engine.
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
    /// Seeding from local chunks.
    #[error(transparent)]
    Seed(#[from] crate::seed::SeedError),
    /// A boot profile.
    #[error(transparent)]
    Profile(#[from] crate::profile::ProfileError),
    /// A signing key.
    #[error(transparent)]
    Key(#[from] crate::store::StoreError),
    /// Reading the target.
    #[error("{0}")]
    Fetch(String),
    /// Disk I/O.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// `Result` of the lifecycle operations.
pub type Result<T, E = MigrationError> = std::result::Result<T, E>;

/// Wraps a step's failure with what was being done.
fn step<E: Into<StepError>>(what: &'static str) -> impl FnOnce(E) -> MigrationError {
    move |e| MigrationError::Step {
        what,
        source: e.into(),
    }
}

/// Progress of long work: `(step, done, total)` updates.
pub trait Progress: Sync {
    /// `done` of `total` of `step` (bytes or chunks, as the step counts).
    fn update(&self, step: &str, done: u64, total: u64);
    /// The current step is done.
    fn finish(&self) {}
}

/// No progress display.
pub struct Quiet;

impl Progress for Quiet {
    fn update(&self, _: &str, _: u64, _: u64) {}
}

/// Seconds an offline operation keeps retrying a failing fetch unless told otherwise.
pub const OFFLINE_DEADLINE_SECS: u64 = 300;

/// `http` with the offline fetch deadline when it has none.
pub fn offline_http(http: &HttpOptions) -> HttpOptions {
    let mut h = http.clone();
    h.deadline
        .get_or_insert(std::time::Duration::from_secs(OFFLINE_DEADLINE_SECS));
    h
}

/// Opens `path` for an offline operation and takes its exclusive lock (refused while a
/// `serve` holds it).
fn open_disk(path: &Path) -> Result<Arc<dyn Storage>> {
    crate::service::open_locked(path, true).map_err(|source| MigrationError::Open {
        path: path.to_path_buf(),
        source,
    })
}

/// The disk's metadata, or `None` for a plain disk.
fn read_meta(path: &Path, storage: Arc<dyn Storage>) -> Result<Option<MetaStore>> {
    MetaStore::open(storage).map_err(|source| MigrationError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Opens a prepared disk.
fn open_meta(path: &Path) -> Result<MetaStore> {
    read_meta(path, open_disk(path)?)?.ok_or_else(|| MigrationError::NotPrepared {
        path: path.to_path_buf(),
    })
}

/// Asks the transition table; a refusal names the disk.
fn check(path: &Path, state: State, op: Op) -> Result<Next> {
    transition(state, op).map_err(|source| MigrationError::Conflict {
        path: path.to_path_buf(),
        source,
    })
}

/// Opens the pinned target of a prepared disk (the recorded URLs unless `targets`).
fn open_pinned(
    meta: &MetaStore,
    targets: &[String],
    http: &HttpOptions,
) -> Result<Arc<dyn RemoteSource>> {
    let sb = meta.superblock();
    let urls = if targets.is_empty() {
        sb.target.urls.clone()
    } else {
        targets.to_vec()
    };
    open_source(&urls, Some(&pinned_identity(sb)), &offline_http(http)).map_err(|source| {
        MigrationError::Target {
            urls: crate::target::shown_urls(&urls).join(", "),
            source,
        }
    })
}

#[cfg(test)]
mod tests;
