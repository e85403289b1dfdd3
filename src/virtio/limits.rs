//! Device geometry and request limits.
//!
//! The same values are advertised in the virtio-blk config space (so a well-behaved driver
//! stays inside them) and enforced by the request parser (so a hostile one cannot make the
//! device allocate or walk unbounded amounts of memory).

use crate::blockdev::BlockBackend;

use super::SECTOR_SIZE;

/// Largest single data segment a driver should use (`size_max`), in bytes.
///
/// Together with [`DEFAULT_SEG_MAX`] this bounds a request to just under 32 MiB. The
/// product must stay below 32 MiB (65536 sectors): SeaBIOS computes the sectors per
/// request as `(u16)(size_max * seg_max / blk_size)` and, when that truncates to 0, loops
/// forever issuing zero-length reads (seen with 1 MiB * 128: the guest hangs at
/// "Probing EDD" during boot).
pub const DEFAULT_SIZE_MAX: u32 = 128 << 10;
/// Largest number of data segments in one request (`seg_max`): the usual queue size of
/// 256 minus the header and status descriptors, as QEMU does.
pub const DEFAULT_SEG_MAX: u32 = 254;
/// Largest discard or write-zeroes range, in sectors (1 GiB).
pub const DEFAULT_MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Largest number of ranges in one discard or write-zeroes request.
pub const DEFAULT_MAX_DISCARD_SEG: u32 = 16;

/// What the request layer holds every request to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Capacity in 512-byte sectors (a trailing partial sector is not addressable).
    pub capacity_sectors: u64,
    /// Writes, discards and write-zeroes are refused.
    pub read_only: bool,
    /// Logical block size in bytes (a power of two, at least 512): discard and
    /// write-zeroes ranges must be aligned to it.
    pub logical_block_size: u32,
    /// Largest single data segment a driver should use, in bytes. Advertised, not
    /// enforced per segment (libblkio, for one, does not split buffers); the total of a
    /// request is held to `size_max * seg_max`.
    pub size_max: u32,
    /// Largest number of data segments.
    pub seg_max: u32,
    /// Largest discard range, in sectors.
    pub max_discard_sectors: u32,
    /// Largest number of discard ranges in one request.
    pub max_discard_seg: u32,
    /// Largest write-zeroes range, in sectors.
    pub max_write_zeroes_sectors: u32,
    /// Largest number of write-zeroes ranges in one request.
    pub max_write_zeroes_seg: u32,
}

impl Limits {
    /// Limits for a backend, with the default transfer limits.
    pub fn for_backend(backend: &dyn BlockBackend) -> Self {
        let lbs = backend.logical_block_size();
        let logical_block_size = if lbs.is_power_of_two() && lbs >= SECTOR_SIZE as u32 {
            lbs
        } else {
            SECTOR_SIZE as u32
        };
        Self {
            capacity_sectors: backend.capacity() / SECTOR_SIZE,
            read_only: backend.read_only(),
            logical_block_size,
            size_max: DEFAULT_SIZE_MAX,
            seg_max: DEFAULT_SEG_MAX,
            max_discard_sectors: DEFAULT_MAX_DISCARD_SECTORS,
            max_discard_seg: DEFAULT_MAX_DISCARD_SEG,
            max_write_zeroes_sectors: DEFAULT_MAX_DISCARD_SECTORS,
            max_write_zeroes_seg: DEFAULT_MAX_DISCARD_SEG,
        }
    }

    /// Capacity in bytes as the guest sees it.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_sectors * SECTOR_SIZE
    }

    /// Largest data transfer of one read or write request, in bytes.
    pub fn max_transfer(&self) -> u64 {
        u64::from(self.size_max) * u64::from(self.seg_max)
    }

    /// Largest data transfer of one request, in 512-byte sectors.
    pub fn max_transfer_sectors(&self) -> u64 {
        self.max_transfer() / SECTOR_SIZE
    }

    /// Logical block size in sectors.
    pub fn block_sectors(&self) -> u64 {
        u64::from(self.logical_block_size) / SECTOR_SIZE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_transfer_limit_fits_seabios_u16_sector_count() {
        let sectors = u64::from(DEFAULT_SIZE_MAX) * u64::from(DEFAULT_SEG_MAX) / SECTOR_SIZE;
        assert!(sectors > 0 && sectors < 65536, "{sectors}");
    }
}
