//! `prepare`: relocate the target's boot chunks onto the disk and release an area for
//! the rest; resumes an interrupted prepare of the same target.

use std::cell::Cell;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use boot_relocator::{relocate, MetaStore, PreparePhase, PrepareSpec, Storage};
use serde::Serialize;

use super::{check, open_disk, read_meta, step, MigrationError, Op, Progress, Result, StepError};
use crate::engine::{offline_status, Status};
use crate::seed::{add_seeded, seed, LocalIndex, SeedReport};
use crate::source::cache::cached_store;
use crate::source::store::{IndexTrust, StoreSource};
use crate::source::{HttpOptions, RemoteSource};
use crate::target::{is_store_target, open_source, open_store, target_record};

/// Chunk size when neither the options nor a chunk store name one.
pub const DEFAULT_CHUNK_SIZE: u64 = 64 << 10;

/// Boot set when none is given: partition table and boot loader.
pub const DEFAULT_BOOT_RANGE: Range<u64> = 0..1 << 20;

/// What to prepare.
#[derive(Clone, Debug)]
pub struct PrepareOptions {
    /// Disk holding the source image.
    pub disk: PathBuf,
    /// Target image: http(s) URLs (mirrors), a file, or a chunk-store index.
    pub targets: Vec<String>,
    /// Chunk size (default: the store's, else [`DEFAULT_CHUNK_SIZE`]).
    pub chunk_size: Option<u64>,
    /// Keys a chunk-store index must be signed by (any of them).
    pub trusted_keys: Vec<PathBuf>,
    /// Accept a chunk-store index without a signature check.
    pub insecure_unverified_index: bool,
    /// Do not copy target chunks found on the local disk.
    pub no_seed: bool,
    /// Target byte ranges to place home (empty: [`DEFAULT_BOOT_RANGE`]).
    pub boot_ranges: Vec<Range<u64>>,
    /// Boot profile whose chunks join the boot set.
    pub boot_profile: Option<PathBuf>,
    /// Largest size of the released area.
    pub area_size: Option<u64>,
    /// Bytes of a block device the source uses.
    pub source_size: Option<u64>,
    /// Block device: the released area's byte range (inside one free gap).
    pub area: Option<Range<u64>>,
    /// Block device: the area's old contents may be lost.
    pub discard_free_space: bool,
    /// Trial starts before automatic fallback.
    pub max_trial_starts: u8,
    /// HTTP options (the offline fetch deadline applies when none is set).
    pub http: HttpOptions,
}

impl PrepareOptions {
    /// The defaults of `streamboot prepare DISK --target URL...`.
    pub fn new(disk: PathBuf, targets: Vec<String>) -> Self {
        Self {
            disk,
            targets,
            chunk_size: None,
            trusted_keys: Vec::new(),
            insecure_unverified_index: false,
            no_seed: false,
            boot_ranges: Vec::new(),
            boot_profile: None,
            area_size: None,
            source_size: None,
            area: None,
            discard_free_space: false,
            max_trial_starts: 3,
            http: HttpOptions::default(),
        }
    }
}

/// What prepare did.
#[derive(Clone, Debug, Serialize)]
pub struct PrepareReport {
    /// An interrupted prepare was resumed.
    pub resumed: bool,
    /// The disk's status afterwards.
    pub status: Status,
    /// What seeding from local chunks did (`None`: no seeding).
    pub seed: Option<SeedReport>,
    /// Byte offset of the released area.
    pub area_offset: u64,
    /// One past the released area's last byte (format v3: the area in a free gap of a
    /// block device; else where the superblocks start).
    pub area_end: u64,
    /// Length of the disk.
    pub disk_len: u64,
    /// Slots of the released area.
    #[serde(skip)]
    pub slot_count: u64,
    /// Chunk size.
    #[serde(skip)]
    pub chunk_size: u64,
    /// Seconds taken.
    pub secs: f64,
}

/// The opened target: any source, and the chunk store when it is one.
pub(super) struct Target {
    pub(super) source: Arc<dyn RemoteSource>,
    pub(super) store: Option<Arc<StoreSource>>,
}

/// Reads target bytes for prepare: from local chunks when seeding, else the source.
/// Counts the bytes taken from the disk.
struct TargetReader<'a> {
    target: &'a Target,
    local: Option<LocalIndex>,
    disk: Arc<dyn Storage>,
    seeded: Cell<u64>,
}

impl TargetReader<'_> {
    fn read(&self, off: u64, buf: &mut [u8]) -> std::result::Result<(), String> {
        match (&self.local, &self.target.store) {
            (Some(idx), Some(st)) => {
                let n = idx.read_target(self.disk.as_ref(), st, off, buf)?;
                self.seeded.set(self.seeded.get() + n);
                Ok(())
            }
            _ => self
                .target
                .source
                .read_at(off, buf)
                .map_err(|e| e.to_string()),
        }
    }
}

/// Prepares `o.disk` for the target, or resumes an interrupted prepare of the same
/// target (an interrupted prepare that had not placed anything yet is undone and started
/// afresh). Bad options and a disk prepared already are refused before anything is
/// fetched or changed.
pub fn prepare(o: &PrepareOptions, progress: &dyn Progress) -> Result<PrepareReport> {
    let started = Instant::now();
    if let Some(cs) = o.chunk_size {
        relocate::chunk_shift(cs).map_err(MigrationError::ChunkSize)?;
    }
    let trust = index_trust(o)?;
    let profile = o
        .boot_profile
        .as_deref()
        .map(crate::profile::BootProfile::load)
        .transpose()
        .map_err(step("--boot-profile"))?;
    let storage = open_disk(&o.disk)?;
    let existing = read_meta(&o.disk, storage.clone())?;
    if let Some(meta) = &existing {
        check(&o.disk, meta.state(), Op::Prepare)?;
    }
    let target = open_target(o, trust.as_ref())?;
    if existing.is_none() {
        undo_growth(o, &storage)?;
    }
    let chunk_size = o
        .chunk_size
        .or(target.store.as_ref().map(|s| s.chunk_size()))
        .unwrap_or(DEFAULT_CHUNK_SIZE);
    relocate::chunk_shift(chunk_size).map_err(MigrationError::ChunkSize)?;
    let reader = TargetReader {
        local: local_index(o, &storage, &target, chunk_size, progress)?,
        target: &target,
        disk: storage.clone(),
        seeded: Cell::new(0),
    };
    // An interrupted prepare resumes (same target) or is undone and started afresh.
    let (mut meta, resumed) = match existing {
        Some(mut meta) if meta.superblock().phase == PreparePhase::MapReady => {
            resume(o, &mut meta, &reader, progress)?;
            (meta, true)
        }
        Some(mut meta) => {
            relocate::remove_area(&mut meta).map_err(step("undoing the interrupted prepare"))?;
            let spec = spec(o, &target, profile.as_ref(), chunk_size)?;
            (fresh(o, storage, &spec, &reader, progress)?, false)
        }
        None => {
            let spec = spec(o, &target, profile.as_ref(), chunk_size)?;
            (fresh(o, storage, &spec, &reader, progress)?, false)
        }
    };
    let seeded = seed_disk(&mut meta, &reader, progress)?;
    progress.finish();
    Ok(report(&meta, resumed, seeded, started))
}

/// A plain file an interrupted prepare extended (no superblock landed) gets its length
/// back first, so the source is the file as it was, not its extension.
fn undo_growth(o: &PrepareOptions, storage: &Arc<dyn Storage>) -> Result<()> {
    let undone = boot_relocator::growth::undo_interrupted_growth(storage)
        .map_err(step("undoing an interrupted prepare"))?;
    if let Some(rec) = undone {
        tracing::warn!(
            "{}: an interrupted prepare had extended the file and left no superblock: \
             truncated back from {} to {} bytes",
            o.disk.display(),
            rec.disk_len,
            rec.source_size
        );
    }
    Ok(())
}

/// Resumes an interrupted prepare (phase `map-ready`) of the same target.
fn resume(
    o: &PrepareOptions,
    meta: &mut MetaStore,
    reader: &TargetReader<'_>,
    progress: &dyn Progress,
) -> Result<()> {
    let sb = meta.superblock().clone();
    let id = reader.target.source.identity();
    if id.validator != sb.target.validator || id.size != sb.layout.target_size {
        return Err(MigrationError::OtherTarget);
    }
    check(&o.disk, sb.state, Op::ResumePrepare)?;
    relocate::resume_prepare(
        meta,
        &mut |off, buf| reader.read(off, buf),
        &mut |s, d, t| progress.update(s, d, t),
    )
    .map_err(step("resuming prepare"))
}

/// What to prepare: the boot set (given ranges or the default, plus the profile's).
pub(super) fn spec(
    o: &PrepareOptions,
    target: &Target,
    profile: Option<&crate::profile::BootProfile>,
    chunk_size: u64,
) -> Result<PrepareSpec> {
    let size = target.source.identity().size;
    let mut boot_ranges = if o.boot_ranges.is_empty() {
        vec![DEFAULT_BOOT_RANGE]
    } else {
        o.boot_ranges.clone()
    };
    if let Some(p) = profile {
        p.check_image(size).map_err(step("--boot-profile"))?;
        boot_ranges.extend(p.ranges());
    }
    Ok(PrepareSpec {
        chunk_size,
        target_size: size,
        target: target_record(target.source.as_ref(), &o.targets),
        boot_ranges,
        area_size: o.area_size,
        source_size: o.source_size,
        max_trial_starts: o.max_trial_starts,
        area: o.area.clone(),
        discard_free_space: o.discard_free_space,
    })
}

/// A fresh prepare on a plain disk: plans (the target's partition table decides the
/// boot partitions), reserves the area, places the boot chunks.
fn fresh(
    o: &PrepareOptions,
    storage: Arc<dyn Storage>,
    spec: &PrepareSpec,
    reader: &TargetReader<'_>,
    progress: &dyn Progress,
) -> Result<MetaStore> {
    let mut head = vec![0u8; (1u64 << 20).min(spec.target_size) as usize];
    reader
        .read(0, &mut head)
        .map_err(|e| step("reading the target's partition table")(StepError::Fetch(e)))?;
    // Only bytes placed on the disk count as seeded.
    reader.seeded.set(0);
    let plan =
        relocate::plan(storage.as_ref(), spec, &head).map_err(|source| MigrationError::Plan {
            path: o.disk.clone(),
            source,
        })?;
    for n in &plan.notes {
        tracing::info!("{n}");
    }
    let uuid = *uuid::Uuid::new_v4().as_bytes();
    relocate::prepare(
        storage,
        spec,
        &plan,
        uuid,
        now_unix(),
        &mut |off, buf| reader.read(off, buf),
        &mut |s, d, t| progress.update(s, d, t),
    )
    .map_err(step(
        "prepare failed (run prepare again to resume, or rollback)",
    ))
}

/// Opens the target image (a chunk store with its trust policy, or any source).
pub(super) fn open_target(o: &PrepareOptions, trust: Option<&IndexTrust>) -> Result<Target> {
    let http = super::offline_http(&o.http);
    let opening = |source| MigrationError::Target {
        urls: crate::target::shown_urls(&o.targets).join(", "),
        source,
    };
    Ok(match trust {
        Some(t) => {
            let st = Arc::new(open_store(&o.targets, None, &http, Some(t)).map_err(opening)?);
            Target {
                source: cached_store(st.clone(), http.cache.as_ref()).map_err(opening)?,
                store: Some(st),
            }
        }
        None => Target {
            source: open_source(&o.targets, None, &http).map_err(opening)?,
            store: None,
        },
    })
}

/// How a chunk-store index is trusted (`None`: not a chunk-store target). Refuses an
/// unverified index unless the insecure opt-out is explicit.
pub(super) fn index_trust(o: &PrepareOptions) -> Result<Option<IndexTrust>> {
    if !o.targets.iter().any(|t| is_store_target(t)) {
        if !o.trusted_keys.is_empty() || o.insecure_unverified_index {
            return Err(MigrationError::Usage("--trusted-key and --insecure-unverified-index apply to a chunk-store target (…/indexes/NAME.idx) only"));
        }
        return Ok(None);
    }
    if o.insecure_unverified_index {
        if !o.trusted_keys.is_empty() {
            return Err(MigrationError::Usage(
                "give either --trusted-key or --insecure-unverified-index, not both",
            ));
        }
        return Ok(Some(IndexTrust::InsecureUnverified));
    }
    if o.trusted_keys.is_empty() {
        return Err(MigrationError::Usage(
            "a chunk-store target needs --trusted-key FILE.pub (the key its index is signed with), \
             or --insecure-unverified-index to skip the check",
        ));
    }
    let keys = o
        .trusted_keys
        .iter()
        .map(|p| crate::store::sign::load_verifying_key(p))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(step("reading --trusted-key"))?;
    Ok(Some(IndexTrust::Keys(keys)))
}

/// Seeding: hashes the local source chunks before prepare writes anything (`None`: not
/// a chunk-store target, `no_seed`, or another chunk size).
fn local_index(
    o: &PrepareOptions,
    storage: &Arc<dyn Storage>,
    target: &Target,
    chunk_size: u64,
    progress: &dyn Progress,
) -> Result<Option<LocalIndex>> {
    match target.store.as_deref().filter(|_| !o.no_seed) {
        Some(st) if st.chunk_size() == chunk_size => {
            // The bytes prepare's plan takes as the source: the whole file (a block
            // device: its length; partitions beyond it are not hashed).
            let size = match o.source_size {
                Some(s) => s,
                None => storage.len().map_err(step("reading the disk's size"))?,
            };
            let idx = LocalIndex::build(storage.as_ref(), size, st, &mut |d, t| {
                progress.update("hashing local chunks", d, t)
            })
            .map_err(step("hashing the local disk for seeding"))?;
            Ok(Some(idx))
        }
        Some(st) => {
            tracing::warn!(
                "not seeding: the store's chunk size ({}) differs from --chunk-size ({chunk_size})",
                st.chunk_size()
            );
            Ok(None)
        }
        None => Ok(None),
    }
}

/// Seeds a freshly prepared disk from its local source chunks (`None`: no seeding) and
/// records the bytes prepare took from the disk for boot chunks.
fn seed_disk(
    meta: &mut MetaStore,
    reader: &TargetReader<'_>,
    progress: &dyn Progress,
) -> Result<Option<SeedReport>> {
    let (Some(store), Some(local)) = (reader.target.store.as_deref(), reader.local.as_ref()) else {
        return Ok(None);
    };
    let mut r = seed(meta, store, local, &mut |d, t| {
        progress.update("seeding from local chunks", d, t)
    })
    .map_err(step(
        "seeding failed (the disk is prepared and usable; missing chunks are fetched)",
    ))?;
    let boot = reader.seeded.get();
    add_seeded(meta, boot).map_err(step("recording seeded bytes"))?;
    r.bytes += boot;
    Ok(Some(r))
}

fn report(
    meta: &MetaStore,
    resumed: bool,
    seed: Option<SeedReport>,
    started: Instant,
) -> PrepareReport {
    let l = meta.layout();
    PrepareReport {
        resumed,
        status: offline_status(meta),
        seed,
        area_offset: l.area_offset,
        area_end: meta.superblock().release.end(l.disk_len),
        disk_len: l.disk_len,
        slot_count: l.slot_count,
        chunk_size: l.chunk_size(),
        secs: started.elapsed().as_secs_f64(),
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
