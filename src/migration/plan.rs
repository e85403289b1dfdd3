//! `prepare --dry-run`: the plan of a fresh prepare, as stable JSON, writing nothing.

use std::path::PathBuf;

use boot_relocator::relocate;
use serde::Serialize;

use super::prepare::{index_trust, open_target, spec, DEFAULT_CHUNK_SIZE};
use super::{step, MigrationError, PrepareOptions, Result, StepError};

/// What `prepare --dry-run` would do (nothing is written). Field names and meanings are
/// stable (`--json`): see docs/format.md.
#[derive(Clone, Debug, Serialize)]
pub struct PlanReport {
    /// Always true: nothing was written.
    pub dry_run: bool,
    /// The disk.
    pub disk: PathBuf,
    /// Its length (a regular file: the length prepare would give it).
    pub disk_len: u64,
    /// Bytes of the disk taken as the source (restored by rollback).
    pub source_size: u64,
    /// Bytes of the target.
    pub target_size: u64,
    /// Chunk size.
    pub chunk_size: u64,
    /// The released area `[start, end)` (map and slots).
    pub area: ByteRange,
    /// Slots of the area.
    pub slot_count: u64,
    /// Bytes that are not free and that the superblocks overwrite: saved first (`to` is
    /// where) and written back by rollback.
    pub saved_ranges: Vec<SavedRange>,
    /// Whether rollback zeroes the area (it reads as zeros, or --discard-free-space).
    pub area_zeroed_on_rollback: bool,
    /// The boot set: target byte ranges placed home by prepare (their source bytes are
    /// saved in slots first).
    pub boot_ranges: Vec<ByteRange>,
    /// Boot chunks.
    pub boot_chunks: u64,
    /// Remarks of the planner (boot partitions added or skipped).
    pub notes: Vec<String>,
}

/// A byte range `[start, end)`.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

/// Bytes saved before being overwritten.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct SavedRange {
    /// The bytes overwritten.
    pub from: ByteRange,
    /// Where their copy goes.
    pub to: u64,
}

impl PlanReport {
    /// One line of text.
    pub fn text(&self) -> String {
        let saved: Vec<String> = self
            .saved_ranges
            .iter()
            .map(|r| format!("{}..{} saved at {}", r.from.start, r.from.end, r.to))
            .collect();
        format!(
            "{}: dry run, nothing written: area {}..{} ({} slots of {} bytes), {} boot chunks \
             placed home, {}",
            self.disk.display(),
            self.area.start,
            self.area.end,
            self.slot_count,
            self.chunk_size,
            self.boot_chunks,
            if saved.is_empty() {
                "nothing else saved".to_string()
            } else {
                saved.join(", ")
            }
        )
    }
}

/// `prepare --dry-run`: the checks and the plan of a fresh prepare, writing nothing (a
/// disk prepared already, even partly, is refused: run prepare or rollback on it).
pub fn plan_prepare(o: &PrepareOptions) -> Result<PlanReport> {
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
    let storage =
        crate::service::open_locked(&o.disk, false).map_err(|source| MigrationError::Open {
            path: o.disk.clone(),
            source,
        })?;
    let target = open_target(o, trust.as_ref())?;
    let chunk_size = o
        .chunk_size
        .or(target.store.as_ref().map(|s| s.chunk_size()))
        .unwrap_or(DEFAULT_CHUNK_SIZE);
    relocate::chunk_shift(chunk_size).map_err(MigrationError::ChunkSize)?;
    let spec = spec(o, &target, profile.as_ref(), chunk_size)?;
    let mut head = vec![0u8; (1u64 << 20).min(spec.target_size) as usize];
    target.source.read_at(0, &mut head).map_err(|e| {
        step("reading the target's partition table")(StepError::Fetch(e.to_string()))
    })?;
    let plan =
        relocate::plan(storage.as_ref(), &spec, &head).map_err(|source| MigrationError::Plan {
            path: o.disk.clone(),
            source,
        })?;
    let l = plan.layout;
    let r = plan.release;
    let c = l.chunk_size();
    let mut boot_ranges: Vec<ByteRange> = Vec::new();
    for &b in &plan.boot_chunks {
        let (start, end) = (b * c, ((b + 1) * c).min(l.target_size));
        match boot_ranges.last_mut() {
            Some(last) if last.end == start => last.end = end,
            _ => boot_ranges.push(ByteRange { start, end }),
        }
    }
    let tail = boot_relocator::area::TAIL;
    Ok(PlanReport {
        dry_run: true,
        disk: o.disk.clone(),
        disk_len: l.disk_len,
        source_size: l.source_size,
        target_size: l.target_size,
        chunk_size: c,
        area: ByteRange {
            start: l.area_offset,
            end: r.end(l.disk_len),
        },
        slot_count: l.slot_count,
        saved_ranges: (r.saved_tail_at != 0)
            .then(|| SavedRange {
                from: ByteRange {
                    start: l.disk_len - tail,
                    end: l.disk_len,
                },
                to: r.saved_tail_at,
            })
            .into_iter()
            .collect(),
        area_zeroed_on_rollback: r.zero_on_rollback,
        boot_ranges,
        boot_chunks: plan.boot_chunks.len() as u64,
        notes: plan.notes,
    })
}
