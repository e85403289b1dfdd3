//! The release fields of a format-v3 superblock (bytes 152..201): where the released
//! area of a block device ends and what rollback puts back (see `crate::area`).

use super::{Layout, BLOCK, MAX_CHUNK_SHIFT, MIN_CHUNK_SHIFT};

/// The released area of a format-v3 disk: a free gap of the source (between or after its
/// partitions), and what rollback restores so that the whole device is bit-exact again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Release {
    /// One past the area's last byte (0: format v2, the area runs up to the superblocks).
    pub area_end: u64,
    /// Where the 8 KiB the superblocks overwrite (the disk's last 8 KiB, e.g. the end of a
    /// backup GPT) are kept inside the area (0: nothing saved).
    pub saved_tail_at: u64,
    /// BLAKE3 of those 8 KiB.
    pub saved_tail_hash: [u8; 32],
    /// The area read as zeros when prepared: rollback zeroes it again.
    pub zero_on_rollback: bool,
}

impl Release {
    /// End of the area usable for map and slots on a disk of `disk_len` bytes.
    pub fn end(&self, disk_len: u64) -> u64 {
        if self.area_end == 0 {
            disk_len.saturating_sub(2 * BLOCK as u64)
        } else {
            self.area_end
        }
    }

    /// Checks the area against `l` (v3: inside the disk, after the target, slots inside).
    pub fn validate(&self, l: &Layout) -> Result<(), String> {
        let sbs = l.disk_len.saturating_sub(2 * BLOCK as u64);
        if self.area_end == 0 {
            if self.saved_tail_at != 0 || self.zero_on_rollback {
                return Err("release fields without an area end".into());
            }
            return l.validate();
        }
        if !(MIN_CHUNK_SHIFT..=MAX_CHUNK_SHIFT).contains(&l.chunk_shift) {
            return Err(format!("chunk shift {} out of range", l.chunk_shift));
        }
        let slots_end = l
            .slot_count
            .checked_mul(l.chunk_size())
            .and_then(|b| b.checked_add(l.slot_offset))
            .ok_or("slot region overflows")?;
        let tail_ok = self.saved_tail_at == 0
            || (self.saved_tail_at >= l.area_offset
                && self
                    .saved_tail_at
                    .checked_add(2 * BLOCK as u64)
                    .is_some_and(|end| end <= l.map_offset));
        let checks = [
            (self.area_end <= sbs, "area overlaps superblocks"),
            (l.area_offset >= l.target_size, "area overlaps the target"),
            (slots_end <= self.area_end, "slots past the area"),
            (tail_ok, "saved tail outside the area"),
        ];
        for (ok, what) in checks {
            if !ok {
                return Err(what.to_string());
            }
        }
        l.validate_parts(slots_end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `superblock` fuzz target: huge fields overflowed instead of failing.
    #[test]
    fn huge_fields_are_refused_not_overflowed() {
        let l = Layout {
            chunk_shift: 12,
            disk_len: 16 << 20,
            source_size: 16 << 20,
            target_size: 1 << 20,
            area_offset: 2 << 20,
            map_offset: (2 << 20) + 8192,
            map_pages: 2,
            slot_offset: 3 << 20,
            slot_count: 4,
        };
        for (area_end, saved_tail_at) in [(u64::MAX, u64::MAX), (8 << 20, u64::MAX)] {
            let r = Release {
                area_end,
                saved_tail_at,
                saved_tail_hash: [0; 32],
                zero_on_rollback: true,
            };
            assert!(r.validate(&l).is_err());
        }
        let ok = Release {
            area_end: 8 << 20,
            saved_tail_at: 2 << 20,
            saved_tail_hash: [0; 32],
            zero_on_rollback: true,
        };
        assert_eq!(ok.validate(&l), Ok(()));
        // A chunk shift out of range is refused before it is used.
        let bad = Layout {
            chunk_shift: 140,
            ..l
        };
        assert!(ok.validate(&bad).is_err());
    }
}
