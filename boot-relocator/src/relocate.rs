//! The boot relocator: reserve the released area, save the source chunks at the target's
//! boot locations, write the target's boot chunks home; and the way back (rollback) and
//! the final removal of the area.
//!
//! Every step is idempotent and its completion is recorded in the map before the next
//! one starts, so a crash at any point resumes (or undoes) cleanly:
//! 1. superblock (state `preparing`, phase `reserved`): nothing on the source touched;
//!    undo = remove the area.
//! 2. map initialized (phase `map-ready`), boot chunks flagged.
//! 3. per boot chunk: source copied into a slot, synced, `saved` recorded.
//! 4. per boot chunk: target written home, synced, `home` recorded.
//! 5. state `prepared`.

use std::ops::Range;
use std::sync::Arc;

use crate::error::{IoContext, RelocError, Result};
use crate::format::{
    Entry, Layout, Location, PreparePhase, Release, State, Superblock, TargetRecord, BLOCK,
    ENTRIES_PER_PAGE, MAX_CHUNK_SHIFT, MIN_CHUNK_SHIFT,
};
use crate::meta::MetaStore;
use crate::partition::{self, UsedRange};
use crate::storage::Storage;

use crate::area::{self, AREA_ALIGN, TAIL};
/// Free slots required beyond the saved boot chunks, so that serving can make progress.
pub const MIN_WORKING_SLOTS: u64 = 16;
/// Boot partitions larger than this are not staged whole.
const MAX_BOOT_PARTITION: u64 = 1 << 30;
/// Most bytes moved per I/O while relocating.
const IO_BATCH: u64 = 8 << 20;

/// What the caller asks `prepare` to do.
#[derive(Clone, Debug)]
pub struct PrepareSpec {
    /// Chunk size in bytes (power of two, 4 KiB..4 MiB).
    pub chunk_size: u64,
    /// Size of the pinned target image.
    pub target_size: u64,
    /// Identity of the pinned target.
    pub target: TargetRecord,
    /// Target byte ranges to place home (the boot set before partition-table additions).
    pub boot_ranges: Vec<Range<u64>>,
    /// Cap on the released area's size (default: enough for the whole target on a file,
    /// all free space on a block device).
    pub area_size: Option<u64>,
    /// Bytes of the source in use (default: file length; on a block device the end of
    /// the last partition).
    pub source_size: Option<u64>,
    /// Trial starts before automatic fallback.
    pub max_trial_starts: u8,
    /// Where the released area goes on a block device with a partition table (inside
    /// one free gap; default: the largest gap).
    pub area: Option<Range<u64>>,
    /// The operator agrees that the area's old contents are lost (else they must read
    /// as zeros, so rollback can restore them).
    pub discard_free_space: bool,
}

/// The outcome of planning: where everything goes. Nothing is written yet.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Geometry of the migration.
    pub layout: Layout,
    /// Boot-set chunks in ascending order.
    pub boot_chunks: Vec<u64>,
    /// Human-readable remarks (boot partitions added or skipped, ...).
    pub notes: Vec<String>,
    /// The area of a format-v3 disk (all zero: the area follows both images).
    pub release: Release,
}

/// Progress callback: (step name, done, total) in chunks.
pub type Progress<'a> = &'a mut dyn FnMut(&str, u64, u64);

/// Reads bytes of the target image: `(offset, buf)`.
pub type TargetRead<'a> = &'a mut dyn FnMut(u64, &mut [u8]) -> std::result::Result<(), String>;

/// log2 of a valid chunk size (a power of two, 4 KiB..4 MiB).
pub fn chunk_shift(chunk_size: u64) -> Result<u8> {
    if !chunk_size.is_power_of_two() {
        return Err(RelocError::InvalidChunkSize(chunk_size));
    }
    let shift = chunk_size.trailing_zeros() as u8;
    if !(MIN_CHUNK_SHIFT..=MAX_CHUNK_SHIFT).contains(&shift) {
        return Err(RelocError::InvalidChunkSize(chunk_size));
    }
    Ok(shift)
}

fn read_head(storage: &dyn Storage, len: u64) -> Result<(Vec<u8>, partition::SourceTable)> {
    let mut head = vec![0u8; (1u64 << 20).min(len) as usize];
    storage
        .read_at(0, &mut head)
        .ctx(|| "reading partition table".into())?;
    let ranges = partition::source_ranges(storage, &head)?;
    Ok((head, ranges))
}

/// Plans a migration of `storage` to a target whose first bytes are `target_head` (at
/// least its first MiB, or all of it when smaller). Refuses, writing nothing, when the
/// disk is prepared already, too small, or the area would overlap data in use.
pub fn plan(storage: &dyn Storage, spec: &PrepareSpec, target_head: &[u8]) -> Result<Plan> {
    if let Some(sb) = MetaStore::probe(storage)? {
        return Err(RelocError::AlreadyPrepared(sb.state));
    }
    let shift = chunk_shift(spec.chunk_size)?;
    let c = spec.chunk_size;
    if spec.target_size == 0 {
        return Err(RelocError::Invalid("target image is empty".into()));
    }
    if spec.max_trial_starts == 0 {
        return Err(RelocError::Invalid(
            "--max-trial-starts must be at least 1".into(),
        ));
    }
    let dev_len = storage.len().ctx(|| "reading disk size".into())?;
    let (_, table) = read_head(storage, dev_len)?;
    let used = table.used;
    let used_end = used.iter().map(|u| u.end).max().unwrap_or(0);
    let source_size =
        match (spec.source_size, storage.is_block_device()) {
            (Some(s), _) => s,
            (None, false) => dev_len,
            (None, true) if used.is_empty() => return Err(RelocError::Invalid(
                "block device has no partition table: pass --source-size to say how much of it \
                 the source image uses"
                    .into(),
            )),
            (None, true) => used_end,
        };
    if source_size < dev_len && !storage.is_block_device() {
        // The area and the superblocks would land on the file's last bytes, which are
        // part of the source: nothing proves they are unused.
        return Err(RelocError::Invalid(format!(
            "--source-size {source_size} is smaller than the disk file ({dev_len} bytes): the \
             released area would overwrite its last {} bytes; on a regular file the source is \
             the whole file (truncate the file first if its end is really unused)",
            dev_len - source_size
        )));
    }
    if source_size > dev_len && storage.is_block_device() {
        if spec.source_size.is_some() {
            return Err(RelocError::Invalid(format!(
                "--source-size {source_size} is larger than the device ({dev_len} bytes)"
            )));
        }
        // The size came from the partition table: name the entry that does not fit.
        let u = used
            .iter()
            .max_by_key(|u| u.end)
            .expect("a partition table gave the source size");
        return Err(RelocError::Overlap(format!(
            "{} ends at byte {}, past the end of the device ({dev_len} bytes): the partition \
             table does not fit this device",
            u.what, u.end
        )));
    }
    if let Some(u) = used.iter().find(|u| u.end > source_size) {
        return Err(RelocError::Overlap(format!(
            "{} ends at byte {}, past the source's {} bytes: the released area would overwrite it",
            u.what, u.end, source_size
        )));
    }
    let target_size = spec.target_size;
    let chunks = target_size.div_ceil(c);
    let mut notes = table.warnings;

    // Boot set: requested ranges plus the target's boot partitions.
    let mut boot = vec![false; chunks as usize];
    let mut mark = |r: &Range<u64>| {
        let end = r.end.min(target_size);
        if r.start < end {
            for ch in r.start / c..end.div_ceil(c) {
                boot[ch as usize] = true;
            }
        }
    };
    for r in &spec.boot_ranges {
        mark(r);
    }
    // A target's partition table must fit the target image and the device (a regular
    // file grows to hold the target: only the image bounds it).
    let target_parts = partition::target_ranges(target_head);
    let room = if storage.is_block_device() {
        dev_len
    } else {
        u64::MAX
    };
    partition::check_target_fits(&target_parts, target_size, room)?;
    for p in target_parts.iter().filter(|p| p.boot) {
        if p.end - p.start > MAX_BOOT_PARTITION {
            notes.push(format!("{} is larger than 1 GiB: not staged whole", p.what));
        } else {
            notes.push(format!("boot set includes {} (holds the kernel)", p.what));
            mark(&(p.start..p.end));
        }
    }
    let boot_chunks: Vec<u64> = (0..chunks).filter(|&i| boot[i as usize]).collect();
    let saved = boot_chunks.iter().filter(|&&b| b * c < source_size).count() as u64;

    let gap_mode = storage.is_block_device() && spec.source_size.is_none();
    if !gap_mode && (spec.area.is_some() || spec.discard_free_space) {
        return Err(RelocError::Invalid(
            "--area and --discard-free-space apply to a block device with a partition table \
             (without --source-size)"
                .into(),
        ));
    }
    if gap_mode {
        let all = boot_chunks.len() as u64;
        let (layout, release) = plan_gap(storage, spec, &used, dev_len, all)?;
        return Ok(Plan {
            layout,
            boot_chunks,
            notes,
            release,
        });
    }
    let area_offset = source_size.max(target_size).next_multiple_of(AREA_ALIGN);
    let map_pages = chunks.div_ceil(ENTRIES_PER_PAGE as u64);
    let map_bytes = map_pages * 2 * BLOCK as u64;
    let slot_offset = (area_offset + map_bytes).next_multiple_of(c.clamp(BLOCK as u64, AREA_ALIGN));
    let tail = 2 * BLOCK as u64;
    let min_slots = saved + MIN_WORKING_SLOTS;
    let (disk_len, slot_count) = if storage.is_block_device() {
        let room = dev_len.saturating_sub(slot_offset + tail) / c;
        let slots = match spec.area_size {
            Some(a) => room.min(a.saturating_sub(slot_offset - area_offset + tail) / c),
            None => room,
        };
        (dev_len, slots)
    } else {
        let slots = match spec.area_size {
            Some(a) => a.saturating_sub(slot_offset - area_offset + tail) / c,
            // Room for the whole target and the saved chunks, and never less than the
            // minimum (a small target has fewer chunks than the working slots; slots that
            // are never written stay holes in the file).
            None => (chunks + saved).max(min_slots),
        };
        (slot_offset + slots * c + tail, slots)
    };
    if slot_count < min_slots || slot_count > u32::MAX as u64 {
        let need = slot_offset - area_offset + min_slots * c + tail;
        let device = if storage.is_block_device() {
            format!(
                "; the device has {dev_len} bytes, {} are needed",
                area_offset + need
            )
        } else {
            String::new()
        };
        return Err(RelocError::TooSmall(format!(
            "the released area holds {slot_count} chunk slots of {c} bytes; at least {min_slots} are \
             needed ({saved} saved boot chunks + {MIN_WORKING_SLOTS} working slots); the area needs \
             at least {need} bytes after byte {area_offset}{device}"
        )));
    }
    let layout = Layout {
        chunk_shift: shift,
        disk_len,
        source_size,
        target_size,
        area_offset,
        map_offset: area_offset,
        map_pages,
        slot_offset,
        slot_count,
    };
    layout.validate().map_err(RelocError::Invalid)?;
    Ok(Plan {
        layout,
        boot_chunks,
        notes,
        release: Release::default(),
    })
}

/// Format v3 on a block device with a partition table: the area in a free gap (the
/// largest, or `spec.area`), the device's last 8 KiB saved at its start, the source the
/// whole device. `saved`: boot chunks whose source bytes get a slot.
fn plan_gap(
    storage: &dyn Storage,
    spec: &PrepareSpec,
    used: &[UsedRange],
    dev_len: u64,
    saved: u64,
) -> Result<(Layout, Release)> {
    let c = spec.chunk_size;
    let chunks = spec.target_size.div_ceil(c);
    let map_pages = chunks.div_ceil(ENTRIES_PER_PAGE as u64);
    let map_bytes = map_pages * 2 * BLOCK as u64;
    let slot_align = c.clamp(BLOCK as u64, AREA_ALIGN);
    let min_slots = saved + MIN_WORKING_SLOTS;
    let need = TAIL + map_bytes + slot_align + min_slots * c;
    let gap = area::choose(used, dev_len, spec.target_size, spec.area.as_ref(), need)?;
    let area_offset = gap.start;
    let map_offset = area_offset + TAIL;
    let slot_offset = (map_offset + map_bytes).next_multiple_of(slot_align);
    let mut end = gap.end;
    if let Some(a) = spec.area_size {
        end = end.min(area_offset.saturating_add(a));
    }
    let slot_count = end.saturating_sub(slot_offset) / c;
    if slot_count < min_slots || slot_count > u32::MAX as u64 {
        return Err(RelocError::TooSmall(format!(
            "the released area {area_offset}..{end} holds {slot_count} chunk slots of {c} bytes; \
             at least {min_slots} are needed ({saved} saved boot chunks + {MIN_WORKING_SLOTS} \
             working slots): the area needs at least {need} bytes"
        )));
    }
    let slots_end = slot_offset + slot_count * c;
    if !spec.discard_free_space {
        // A copy of the last 8 KiB at the area's start is what a prepare that stopped
        // right after saving them left: free space that read as zeros before.
        let from = if area::holds_tail_copy(storage, area_offset, dev_len)? {
            area_offset + TAIL
        } else {
            area_offset
        };
        if let Some(at) =
            area::first_nonzero(storage, from, slots_end, "the free space for the area")?
        {
            return Err(RelocError::Overlap(format!(
                "the free space for the released area ({area_offset}..{slots_end}) holds data \
                 (byte {at} is not zero), which rollback could not restore: pass \
                 --discard-free-space to give it up, or --area START..END / --area-size to use \
                 a part that reads as zeros"
            )));
        }
    }
    let layout = Layout {
        chunk_shift: chunk_shift(c)?,
        disk_len: dev_len,
        source_size: dev_len,
        target_size: spec.target_size,
        area_offset,
        map_offset,
        map_pages,
        slot_offset,
        slot_count,
    };
    let release = Release {
        area_end: slots_end,
        saved_tail_at: area_offset,
        saved_tail_hash: area::tail_hash(storage, dev_len)?,
        zero_on_rollback: true,
    };
    release.validate(&layout).map_err(RelocError::Invalid)?;
    Ok((layout, release))
}

/// Runs `prepare` from a plan: reserves the area, saves the source boot chunks and
/// writes the target's boot chunks home. Returns the opened metadata in state
/// `prepared`.
pub fn prepare(
    storage: Arc<dyn Storage>,
    spec: &PrepareSpec,
    plan: &Plan,
    uuid: [u8; 16],
    now_unix: u64,
    read_target: TargetRead<'_>,
    progress: Progress<'_>,
) -> Result<MetaStore> {
    let sb = Superblock {
        generation: 1,
        uuid,
        state: State::Preparing,
        phase: PreparePhase::Reserved,
        start_counter: 0,
        max_trial_starts: spec.max_trial_starts,
        layout: plan.layout,
        target: spec.target.clone(),
        created_unix: now_unix,
        seeded_bytes: 0,
        release: plan.release,
    };
    area::save_tail(storage.as_ref(), &plan.layout, &plan.release)?;
    let mut meta = MetaStore::create(storage, sb, &plan.boot_chunks)?;
    meta.init_map()?;
    resume_prepare(&mut meta, read_target, progress)?;
    Ok(meta)
}

/// Continues an interrupted `prepare` (state `preparing`, phase `map-ready`).
pub fn resume_prepare(
    meta: &mut MetaStore,
    read_target: TargetRead<'_>,
    progress: Progress<'_>,
) -> Result<()> {
    let sb = meta.superblock().clone();
    if sb.state != State::Preparing || sb.phase != PreparePhase::MapReady {
        return Err(RelocError::BadState {
            op: "resume prepare",
            state: sb.state,
        });
    }
    let l = sb.layout;
    let c = l.chunk_size();
    let storage = meta.storage().clone();
    let boot: Vec<u64> = meta.chunks_where(|e| e.boot)?;

    // Step 3: save the source chunks at the boot locations.
    let mut to_save = Vec::new();
    for &b in &boot {
        if l.source_len(b) > 0 && meta.entry(b)?.saved.is_none() {
            to_save.push(b);
        }
    }
    let mut buf = vec![0u8; c as usize];
    let per_commit = (IO_BATCH / c).max(1) as usize;
    for (n, group) in to_save.chunks(per_commit).enumerate() {
        let mut done = Vec::with_capacity(group.len());
        for &b in group {
            let slot = meta
                .alloc_slot()
                .ok_or_else(|| RelocError::TooSmall("no free slot to save a boot chunk".into()))?;
            let len = l.source_len(b);
            buf.fill(0);
            storage
                .read_at(b * c, &mut buf[..len])
                .ctx(|| format!("reading source chunk {b}"))?;
            storage
                .write_at(l.slot_addr(slot), &buf)
                .ctx(|| format!("saving source chunk {b}"))?;
            done.push((b, slot));
        }
        for (b, slot) in done {
            let e = meta.entry(b)?;
            meta.set_entry(
                b,
                Entry {
                    saved: Some(slot),
                    ..e
                },
            )?;
        }
        meta.commit()?;
        progress(
            "saving source boot chunks",
            ((n * per_commit + group.len()) as u64).min(to_save.len() as u64),
            to_save.len() as u64,
        );
    }

    // Step 4: write the target's boot chunks home, coalescing neighbours.
    let mut to_place = Vec::new();
    for &b in &boot {
        if meta.entry(b)?.loc != Location::Home {
            to_place.push(b);
        }
    }
    let mut placed = 0u64;
    let mut i = 0;
    let mut big = Vec::new();
    while i < to_place.len() {
        let first = to_place[i];
        let mut n = 1;
        while i + n < to_place.len()
            && to_place[i + n] == first + n as u64
            && (n as u64 + 1) * c <= IO_BATCH
        {
            n += 1;
        }
        let start = first * c;
        let end = ((first + n as u64) * c).min(l.target_size);
        big.resize((end - start) as usize, 0);
        read_target(start, &mut big).map_err(|reason| RelocError::Fetch {
            chunk: first,
            reason,
        })?;
        storage
            .write_at(start, &big)
            .ctx(|| format!("writing target boot chunk {first} home"))?;
        for b in first..first + n as u64 {
            let e = meta.entry(b)?;
            meta.set_entry(
                b,
                Entry {
                    loc: Location::Home,
                    ..e
                },
            )?;
        }
        meta.commit()?;
        placed += n as u64;
        i += n;
        progress("writing target boot chunks", placed, to_place.len() as u64);
    }
    meta.set_state(State::Prepared)
}

/// Restores the source: copies every saved chunk home, then removes the area. Valid in
/// any state before `committing`. Guest writes to the target are discarded.
pub fn rollback(meta: &mut MetaStore, progress: Progress<'_>) -> Result<()> {
    let state = meta.state();
    if !state.source_recoverable() && state != State::RolledBack {
        return Err(RelocError::BadState {
            op: "roll back",
            state,
        });
    }
    if state == State::Preparing && meta.superblock().phase == PreparePhase::Reserved {
        return remove_area(meta);
    }
    if state != State::RolledBack {
        if state != State::RollingBack {
            meta.set_state(State::RollingBack)?;
        }
        let l = *meta.layout();
        let c = l.chunk_size();
        let storage = meta.storage().clone();
        let mut saved: Vec<(u64, u32)> = Vec::new();
        meta.scan(|i, e| {
            if let Some(s) = e.saved {
                saved.push((i, s))
            }
        })?;
        let mut buf = vec![0u8; c as usize];
        for (n, &(b, s)) in saved.iter().enumerate() {
            let len = l.source_len(b);
            storage
                .read_at(l.slot_addr(s), &mut buf[..len])
                .ctx(|| format!("reading saved chunk {b}"))?;
            storage
                .write_at(b * c, &buf[..len])
                .ctx(|| format!("restoring source chunk {b}"))?;
            if n % 64 == 63 || n + 1 == saved.len() {
                progress("restoring source chunks", n as u64 + 1, saved.len() as u64);
            }
        }
        storage.sync().ctx(|| "syncing restored chunks".into())?;
        meta.set_state(State::RolledBack)?;
    }
    remove_area(meta)
}

/// Removes the released area once the disk holds a whole image: in state `committed`
/// (the target) or `rolled-back` / `preparing`-`reserved` (the source). A regular file
/// is truncated to the image's size; on a block device both superblocks are zeroed.
pub fn remove_area(meta: &mut MetaStore) -> Result<()> {
    let sb = meta.superblock();
    let l = sb.layout;
    let final_len = match sb.state {
        State::Committed => l.target_size,
        State::RolledBack => l.source_size,
        State::Preparing if sb.phase == PreparePhase::Reserved => l.source_size,
        state => {
            return Err(RelocError::BadState {
                op: "remove the released area",
                state,
            })
        }
    };
    let storage = meta.storage().clone();
    if storage.is_block_device() && sb.release.area_end != 0 && sb.state != State::Committed {
        area::restore(storage.as_ref(), sb)?;
    } else if storage.is_block_device() {
        storage
            .write_at(Layout::sb_addr(l.disk_len, 0), &vec![0u8; 2 * BLOCK])
            .ctx(|| "wiping superblocks".into())?;
        storage.sync().ctx(|| "syncing".into())?;
    } else {
        storage
            .set_len(final_len)
            .ctx(|| "truncating disk file".into())?;
    }
    Ok(())
}
