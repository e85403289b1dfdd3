//! Where the released area of a block device goes (format v3): a free gap of the
//! source's partition table (after the last partition, or between partitions), chosen
//! automatically (the largest) or given (`--area START..END`); and putting the device
//! back bit for bit when the area is removed by a rollback.
//!
//! The superblocks stay at the device's last 8 KiB, which on a GPT disk hold the end of
//! the backup GPT: those 8 KiB are copied into the area (with their BLAKE3) before the
//! first superblock write, and written back by rollback. The area's old contents must
//! read as zeros (free space usually does; checked by reading it once) unless the
//! operator gave `--discard-free-space`; rollback zeroes the area again.

use std::ops::Range;

use crate::error::{IoContext, RelocError, Result};
use crate::format::{Layout, Release, Superblock, BLOCK};
use crate::partition::UsedRange;
use crate::storage::Storage;

/// Alignment of the area's start.
pub(crate) const AREA_ALIGN: u64 = 1 << 20;
/// Bytes the superblocks take at the device's end (saved and restored).
pub const TAIL: u64 = 2 * BLOCK as u64;

/// The free gaps of a device of `len` bytes that the partition table `used` leaves, in
/// disk order (byte ranges; the last 8 KiB, the superblocks' place, are never a gap).
pub fn free_gaps(used: &[UsedRange], len: u64) -> Vec<Range<u64>> {
    let mut spans: Vec<Range<u64>> = used.iter().map(|u| u.start..u.end).collect();
    spans.push(len.saturating_sub(TAIL)..len);
    spans.sort_by_key(|r| r.start);
    let mut gaps = Vec::new();
    let mut at = 0u64;
    for r in spans {
        if r.start > at {
            gaps.push(at..r.start.min(len));
        }
        at = at.max(r.end);
    }
    gaps.retain(|g| g.start < g.end);
    gaps
}

/// The usable part of `gap` for an area: from the first 1 MiB boundary at or after both
/// the gap's start and the target's end.
fn usable(gap: &Range<u64>, target_size: u64) -> Range<u64> {
    let start = gap.start.max(target_size).next_multiple_of(AREA_ALIGN);
    start..gap.end.max(start)
}

/// Chooses the area: `requested` (must lie inside one free gap, after the target) or the
/// largest usable gap. `need` is the least size that works; refusals carry the numbers.
pub fn choose(
    used: &[UsedRange],
    dev_len: u64,
    target_size: u64,
    requested: Option<&Range<u64>>,
    need: u64,
) -> Result<Range<u64>> {
    let gaps = free_gaps(used, dev_len);
    if let Some(r) = requested {
        if r.start >= r.end || r.start % BLOCK as u64 != 0 {
            return Err(RelocError::Invalid(format!(
                "--area {}..{}: START must be below END and a multiple of 4096",
                r.start, r.end
            )));
        }
        if r.start < target_size {
            return Err(RelocError::Overlap(format!(
                "--area {}..{} starts inside the target image ({target_size} bytes)",
                r.start, r.end
            )));
        }
        if !gaps.iter().any(|g| g.start <= r.start && r.end <= g.end) {
            let what = used
                .iter()
                .find(|u| u.start < r.end && r.start < u.end)
                .map(|u| format!("{} ({}..{})", u.what, u.start, u.end))
                .unwrap_or_else(|| format!("the superblocks' last {TAIL} bytes of the device"));
            return Err(RelocError::Overlap(format!(
                "--area {}..{} is not free space: it overlaps {what}",
                r.start, r.end
            )));
        }
        return Ok(r.clone());
    }
    let best = gaps
        .iter()
        .map(|g| usable(g, target_size))
        .max_by_key(|g| g.end - g.start)
        .filter(|g| g.end - g.start >= need);
    best.ok_or_else(|| {
        let largest = gaps
            .iter()
            .map(|g| usable(g, target_size))
            .max_by_key(|g| g.end - g.start)
            .filter(|g| g.end > g.start);
        let free: u64 = gaps.iter().map(|g| g.end - g.start).sum();
        let l = match largest {
            Some(g) => format!(
                "the largest free gap after the target is {} bytes ({}..{})",
                g.end - g.start,
                g.start,
                g.end
            ),
            None => "no free gap lies after the target".into(),
        };
        RelocError::TooSmall(format!(
            "no free space large enough for the released area: {l}; {need} bytes are needed \
             ({free} bytes are free in all, the target takes the first {target_size} bytes; \
             the device has {dev_len} bytes)"
        ))
    })
}

/// The first non-zero byte of `[start, end)`, if any; `what` names the range in an I/O
/// error ("reading WHAT").
pub fn first_nonzero(
    storage: &dyn Storage,
    start: u64,
    end: u64,
    what: &str,
) -> Result<Option<u64>> {
    let mut buf = vec![0u8; 1 << 20];
    let mut at = start;
    while at < end {
        let n = (end - at).min(buf.len() as u64) as usize;
        storage
            .read_at(at, &mut buf[..n])
            .ctx(|| format!("reading {what}"))?;
        if let Some(i) = buf[..n].iter().position(|&b| b != 0) {
            return Ok(Some(at + i as u64));
        }
        at += n as u64;
    }
    Ok(None)
}

/// Hash of the device's last 8 KiB (what the superblocks overwrite).
pub fn tail_hash(storage: &dyn Storage, dev_len: u64) -> Result<[u8; 32]> {
    Ok(*blake3::hash(&read_tail(storage, dev_len)?).as_bytes())
}

fn read_tail(storage: &dyn Storage, dev_len: u64) -> Result<Vec<u8>> {
    let mut b = vec![0u8; TAIL as usize];
    storage
        .read_at(dev_len - TAIL, &mut b)
        .ctx(|| "reading the device's last 8 KiB".into())?;
    Ok(b)
}

/// True when `[at, at + 8 KiB)` holds a copy of the device's last 8 KiB (and they are
/// not all zeros).
pub fn holds_tail_copy(storage: &dyn Storage, at: u64, dev_len: u64) -> Result<bool> {
    let tail = read_tail(storage, dev_len)?;
    let mut b = vec![0u8; TAIL as usize];
    storage
        .read_at(at, &mut b)
        .ctx(|| "reading the free space for the area".into())?;
    Ok(b == tail && tail.iter().any(|&x| x != 0))
}

/// Before the first superblock write: copies the device's last 8 KiB into the area,
/// checked against the plan's hash, and syncs.
pub fn save_tail(storage: &dyn Storage, l: &Layout, r: &Release) -> Result<()> {
    if r.saved_tail_at == 0 {
        return Ok(());
    }
    let tail = read_tail(storage, l.disk_len)?;
    if *blake3::hash(&tail).as_bytes() != r.saved_tail_hash {
        return Err(RelocError::Invalid(
            "the device's last 8 KiB changed since prepare planned: run prepare again".into(),
        ));
    }
    storage
        .write_at(r.saved_tail_at, &tail)
        .ctx(|| "saving the device's last 8 KiB".into())?;
    storage.sync().ctx(|| "syncing".into())
}

/// Removes a v3 area after a rollback (or an undone prepare): zeroes the area, writes the
/// saved last 8 KiB back over the superblocks (the disk is plain from then on), then
/// zeroes the saved copy. Refuses, changing nothing, when the saved copy does not match
/// its hash.
pub fn restore(storage: &dyn Storage, sb: &Superblock) -> Result<()> {
    let (l, r) = (&sb.layout, &sb.release);
    let tail = if r.saved_tail_at != 0 {
        let mut b = vec![0u8; TAIL as usize];
        storage
            .read_at(r.saved_tail_at, &mut b)
            .ctx(|| "reading the saved last 8 KiB".into())?;
        if *blake3::hash(&b).as_bytes() != r.saved_tail_hash {
            return Err(RelocError::Corrupt(format!(
                "the saved copy of the device's last 8 KiB (at byte {}) does not match its \
                 hash: refusing to write it back",
                r.saved_tail_at
            )));
        }
        b
    } else {
        vec![0u8; TAIL as usize]
    };
    if r.zero_on_rollback {
        let parts = if r.saved_tail_at == 0 {
            [l.area_offset..r.area_end, 0..0]
        } else {
            [
                l.area_offset..r.saved_tail_at,
                r.saved_tail_at + TAIL..r.area_end,
            ]
        };
        for part in parts.into_iter().filter(|p| p.start < p.end) {
            storage
                .write_zeroes(part.start, part.end - part.start)
                .ctx(|| "zeroing the released area".into())?;
        }
        storage.sync().ctx(|| "syncing".into())?;
    }
    storage
        .write_at(Layout::sb_addr(l.disk_len, 0), &tail)
        .ctx(|| "writing the device's last 8 KiB back".into())?;
    storage.sync().ctx(|| "syncing".into())?;
    if r.zero_on_rollback && r.saved_tail_at != 0 {
        storage
            .write_zeroes(r.saved_tail_at, TAIL)
            .ctx(|| "zeroing the saved copy".into())?;
        storage.sync().ctx(|| "syncing".into())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn used(r: &[(u64, u64)]) -> Vec<UsedRange> {
        r.iter()
            .enumerate()
            .map(|(i, &(start, end))| UsedRange {
                start,
                end,
                what: format!("partition {}", i + 1),
                boot: false,
            })
            .collect()
    }

    const M: u64 = 1 << 20;

    #[test]
    fn gaps_between_and_after_partitions_but_never_the_last_8k() {
        let u = used(&[
            (0, M),
            (M, 20 * M),
            (60 * M, 80 * M),
            (128 * M - 16896, 128 * M),
        ]);
        let g = free_gaps(&u, 128 * M);
        assert_eq!(g, vec![20 * M..60 * M, 80 * M..128 * M - 16896]);
        // No table entries at the end: the gap stops before the superblocks.
        let g = free_gaps(&used(&[(0, M)]), 10 * M);
        assert_eq!(g, vec![M..10 * M - TAIL]);
    }

    #[test]
    fn largest_gap_after_the_target_wins_and_requests_are_checked() {
        let u = used(&[(0, M), (30 * M, 40 * M)]);
        // Gaps 1..30 MiB and 40..(100 MiB - 8K); a 10 MiB target leaves 10..30 of the first.
        let a = choose(&u, 100 * M, 10 * M, None, 5 * M).unwrap();
        assert_eq!(a, 40 * M..100 * M - TAIL);
        let a = choose(&u, 100 * M, 10 * M, Some(&(12 * M..20 * M)), 5 * M).unwrap();
        assert_eq!(a, 12 * M..20 * M);
        let e = choose(&u, 100 * M, 10 * M, Some(&(25 * M..35 * M)), 5 * M).unwrap_err();
        assert!(e.to_string().contains("partition 2"), "{e}");
        let e = choose(&u, 100 * M, 10 * M, Some(&(5 * M..8 * M)), 5 * M).unwrap_err();
        assert!(e.to_string().contains("inside the target"), "{e}");
        let e = choose(&u, 100 * M, 10 * M, None, 90 * M).unwrap_err();
        assert!(e.to_string().contains("bytes are needed"), "{e}");
    }
}
