//! The offline operations on a prepared disk: `status`, `hydrate`, `confirm`, `commit`,
//! `rollback`. Each takes the disk's exclusive lock (refused while a `serve` runs on it),
//! asks the transition table, and returns a typed report.

use std::path::{Path, PathBuf};
use std::time::Instant;

use boot_relocator::growth::undo_interrupted_growth;
use boot_relocator::{relocate, MetaStore, State};
use serde::Serialize;

use super::{
    check, open_disk, open_meta, open_pinned, read_meta, step, MigrationError, Next, Op, Progress,
    Result,
};
use crate::engine::{
    offline_status, Engine, EngineOptions, HydrateOptions, HydrateReport, Hydrator, Status,
};
use crate::source::HttpOptions;

/// What `status` found.
#[derive(Clone, Debug, Serialize)]
pub struct StatusReport {
    /// The disk carries a streamboot superblock.
    pub prepared: bool,
    /// The migration's status (prepared disks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// A plain disk that ends in superblock-like bytes this host's key does not verify
    /// (guest data, another host's disk, or a format-v1 disk to `adopt`): what was seen.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ignored_superblocks: Vec<String>,
    /// A plain file that an interrupted prepare extended (no superblock landed): the
    /// length it had before, which `prepare` and `rollback` give it back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interrupted_prepare_source_size: Option<u64>,
}

/// The disk's migration status (a plain disk reports `prepared: false`).
pub fn status(disk: &Path) -> Result<StatusReport> {
    let storage = open_disk(disk)?;
    let meta = read_meta(disk, storage.clone())?;
    let ignored_superblocks = match meta {
        Some(_) => Vec::new(),
        None => MetaStore::unverified_superblocks(storage.as_ref()).map_err(|source| {
            MigrationError::Read {
                path: disk.to_path_buf(),
                source,
            }
        })?,
    };
    let interrupted_prepare_source_size = match meta {
        Some(_) => None,
        None => boot_relocator::growth::interrupted_growth(&storage)
            .map_err(|source| MigrationError::Read {
                path: disk.to_path_buf(),
                source,
            })?
            .map(|r| r.source_size),
    };
    Ok(StatusReport {
        prepared: meta.is_some(),
        status: meta.as_ref().map(offline_status),
        ignored_superblocks,
        interrupted_prepare_source_size,
    })
}

/// What `adopt` did.
#[derive(Clone, Debug, Serialize)]
pub struct AdoptReport {
    /// The disk's status once adopted.
    pub status: Status,
}

/// Adopts a disk prepared by a streamboot before format v2 (unauthenticated superblocks)
/// on this host: its metadata is rewritten in format v2 under this host's key. Only for
/// disks the operator knows were prepared here: adoption is what makes a guest-writable
/// superblock trusted.
pub fn adopt(disk: &Path) -> Result<AdoptReport> {
    let meta =
        MetaStore::adopt_legacy(open_disk(disk)?).map_err(|source| MigrationError::Read {
            path: disk.to_path_buf(),
            source,
        })?;
    Ok(AdoptReport {
        status: offline_status(&meta),
    })
}

/// What to hydrate.
#[derive(Clone, Debug)]
pub struct HydrateRequest {
    /// Prepared disk.
    pub disk: PathBuf,
    /// Fetch from these URLs instead of the recorded ones (same pinned image).
    pub targets: Vec<String>,
    /// Limit in bytes per second (0 = unlimited).
    pub rate: u64,
    /// Requests in flight.
    pub threads: usize,
    /// HTTP options (the offline fetch deadline applies when none is set).
    pub http: HttpOptions,
}

/// What `hydrate` did.
#[derive(Clone, Debug, Serialize)]
pub struct HydrateOutcome {
    /// The hydration run.
    pub report: HydrateReport,
    /// The disk's status afterwards.
    pub status: Status,
}

/// Downloads every missing target chunk into the released area (until it is full).
/// Progress in bytes, step "hydrating".
pub fn hydrate(r: &HydrateRequest, progress: &dyn Progress) -> Result<HydrateOutcome> {
    let meta = open_meta(&r.disk)?;
    check(&r.disk, meta.state(), Op::Hydrate)?;
    let engine = open_engine(meta, &r.targets, &r.http)?;
    let h = Hydrator::new(
        HydrateOptions {
            threads: r.threads,
            ..HydrateOptions::default()
        },
        r.rate,
    );
    let report = h
        .run(&engine, &|d, t| progress.update("hydrating", d, t))
        .map_err(step("hydration failed"))?;
    progress.finish();
    engine.flush().map_err(step("flushing"))?;
    Ok(HydrateOutcome {
        report,
        status: engine.status(),
    })
}

/// What `confirm` did.
#[derive(Clone, Debug, Serialize)]
pub struct ConfirmReport {
    /// The state now: `confirmed`.
    pub state: &'static str,
    /// It was confirmed already (nothing changed).
    #[serde(skip)]
    pub already: bool,
}

/// Marks the target good (ends the trial).
pub fn confirm(disk: &Path) -> Result<ConfirmReport> {
    let mut meta = open_meta(disk)?;
    let next = check(disk, meta.state(), Op::Confirm)?;
    if let Next::Enter(s) = next {
        meta.set_state(s).map_err(step("recording the confirm"))?;
    }
    Ok(ConfirmReport {
        state: State::Confirmed.name(),
        already: next == Next::Already,
    })
}

/// What to commit.
#[derive(Clone, Debug)]
pub struct CommitOptions {
    /// Prepared disk.
    pub disk: PathBuf,
    /// Commit even though the target was not confirmed.
    pub force: bool,
    /// Fetch from these URLs instead of the recorded ones (same pinned image).
    pub targets: Vec<String>,
    /// HTTP options (the offline fetch deadline applies when none is set).
    pub http: HttpOptions,
    /// Afterwards, move the target's backup GPT to the end of the device.
    pub relocate_backup_gpt: bool,
}

/// What `commit` did.
#[derive(Clone, Debug, Serialize)]
pub struct CommitReport {
    /// The state reached: `committed` (the released area is gone: a plain disk).
    pub state: &'static str,
    /// Only an interrupted commit's last step was left (`Some(true)`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resumed: Option<bool>,
    /// Where `--relocate-backup-gpt` moved the backup GPT header: `[old LBA, new LBA]`
    /// (absent: not asked, or nothing to move).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup_gpt_moved: Option<(u64, u64)>,
    /// The engine's final status (absent when only the last step was left).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// Seconds taken.
    pub secs: f64,
    /// Size of the target (the disk's size now, on a file).
    #[serde(skip)]
    pub target_size: u64,
    /// Bytes fetched during commit.
    #[serde(skip)]
    pub fetched: u64,
}

/// Moves every target chunk home and removes the released area; resumes an interrupted
/// commit. State errors come first: they never depend on the server being reachable.
pub fn commit(o: &CommitOptions, progress: &dyn Progress) -> Result<CommitReport> {
    let started = Instant::now();
    let mut meta = open_meta(&o.disk)?;
    let op = if o.force { Op::ForceCommit } else { Op::Commit };
    const FAILED: &str = "commit failed (run commit again to resume)";
    if check(&o.disk, meta.state(), op)? == Next::Finish {
        // Every target chunk is home already (a commit was interrupted while removing
        // the released area): finish without the engine, which no longer serves it.
        relocate::remove_area(&mut meta).map_err(step(FAILED))?;
        let storage = meta.storage().clone();
        return Ok(CommitReport {
            state: State::Committed.name(),
            resumed: Some(true),
            backup_gpt_moved: relocate_gpt(o, storage.as_ref())?,
            status: None,
            secs: started.elapsed().as_secs_f64(),
            target_size: meta.layout().target_size,
            fetched: 0,
        });
    }
    let engine = open_engine(meta, &o.targets, &o.http)?;
    engine
        .commit(o.force, HydrateOptions::default(), &|s, d, t| {
            progress.update(s, d, t)
        })
        .map_err(step(FAILED))?;
    progress.finish();
    let s = engine.status();
    let storage = engine.with_meta(|m| m.storage().clone());
    Ok(CommitReport {
        state: State::Committed.name(),
        resumed: None,
        backup_gpt_moved: relocate_gpt(o, storage.as_ref())?,
        target_size: s.target_size,
        fetched: s.bytes_fetched_background + s.bytes_fetched_demand,
        status: Some(s),
        secs: started.elapsed().as_secs_f64(),
    })
}

/// `commit --relocate-backup-gpt`: moves the committed target's backup GPT to the end
/// of the device (a regular file ends with the target: nothing to move).
fn relocate_gpt(
    o: &CommitOptions,
    storage: &dyn boot_relocator::Storage,
) -> Result<Option<(u64, u64)>> {
    if !o.relocate_backup_gpt {
        return Ok(None);
    }
    boot_relocator::gpt::relocate_backup(storage).map_err(step(
        "committed, but moving the backup GPT failed (the disk holds the target; sgdisk -e \
             moves it)",
    ))
}

/// What `rollback` did.
#[derive(Clone, Debug, Serialize)]
pub struct RollbackReport {
    /// The state reached: `rolled-back` (the released area is gone: the plain source).
    pub state: &'static str,
    /// Writes made while the target ran were discarded.
    pub guest_writes_discarded: bool,
}

/// Restores the source bit for bit and removes the released area; resumes an
/// interrupted rollback.
///
/// A regular file that an interrupted prepare extended without leaving a superblock
/// (a power cut right after its first write) is truncated back to its length before
/// prepare: that is its rollback.
pub fn rollback(disk: &Path, progress: &dyn Progress) -> Result<RollbackReport> {
    let storage = open_disk(disk)?;
    let Some(mut meta) = read_meta(disk, storage.clone())? else {
        return match undo_interrupted_growth(&storage)
            .map_err(step("undoing an interrupted prepare"))?
        {
            Some(rec) => {
                tracing::warn!(
                    "{}: an interrupted prepare had extended the file and left no superblock: \
                     truncated back from {} to {} bytes",
                    disk.display(),
                    rec.disk_len,
                    rec.source_size
                );
                Ok(RollbackReport {
                    state: State::RolledBack.name(),
                    guest_writes_discarded: false,
                })
            }
            None => Err(MigrationError::NotPrepared {
                path: disk.to_path_buf(),
            }),
        };
    };
    let state = meta.state();
    check(disk, state, Op::Rollback)?;
    let dirty = offline_status(&meta).chunks_dirty;
    relocate::rollback(&mut meta, &mut |s, d, t| progress.update(s, d, t))
        .map_err(step("rollback failed (run rollback again to resume)"))?;
    progress.finish();
    Ok(RollbackReport {
        state: State::RolledBack.name(),
        guest_writes_discarded: matches!(state, State::Trial | State::Confirmed) || dirty > 0,
    })
}

/// The engine over a prepared disk whose state presents the target.
fn open_engine(meta: MetaStore, targets: &[String], http: &HttpOptions) -> Result<Engine> {
    let source = open_pinned(&meta, targets, http)?;
    Engine::new(meta, source, EngineOptions::default()).map_err(MigrationError::Engine)
}
