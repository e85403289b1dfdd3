//! What the device offers: virtio feature bits, vhost-user protocol features and the
//! virtio-blk configuration space.

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::virtio::Limits;

/// Size of the configuration space we expose: `struct virtio_blk_config` up to and
/// including `write_zeroes_may_unmap` and its padding (no secure-erase, no zoned fields).
pub const CONFIG_SIZE: usize = 60;
/// Offset of the `writeback` byte, the only field a driver may write (CONFIG_WCE).
pub const WRITEBACK_OFFSET: usize = 32;

/// Virtio feature bits offered for a device.
pub fn virtio_features(read_only: bool) -> u64 {
    let mut bits = [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_CONFIG_WCE,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_MQ,
    ]
    .iter()
    .fold(0u64, |acc, bit| acc | (1u64 << bit));
    if read_only {
        bits |= 1 << VIRTIO_BLK_F_RO;
    } else {
        // Discard and write-zeroes modify the disk: not offered on a read-only device.
        bits |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
    }
    bits | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
}

/// True when `features` has virtio feature bit `bit`.
pub fn has_feature(features: u64, bit: u32) -> bool {
    features & (1u64 << bit) != 0
}

/// vhost-user protocol features offered.
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::REPLY_ACK
}

/// Builds the little-endian `struct virtio_blk_config`.
///
/// `optimal_io_size` is in bytes (the backend's chunk size); the config carries it in
/// logical blocks.
pub fn config_space(
    limits: &Limits,
    optimal_io_size: u32,
    num_queues: u16,
    writeback: bool,
) -> [u8; CONFIG_SIZE] {
    let mut c = [0u8; CONFIG_SIZE];
    let lbs = limits.logical_block_size;
    let put32 = |c: &mut [u8; CONFIG_SIZE], at: usize, v: u32| {
        c[at..at + 4].copy_from_slice(&v.to_le_bytes())
    };
    c[0..8].copy_from_slice(&limits.capacity_sectors.to_le_bytes());
    put32(&mut c, 8, limits.size_max);
    put32(&mut c, 12, limits.seg_max);
    // 16..20: geometry, left zero (not offered).
    put32(&mut c, 20, lbs);
    // Topology: one logical block per physical block, no alignment offset, minimum I/O of
    // one block, optimal I/O of a chunk.
    c[24] = 0; // physical_block_exp
    c[25] = 0; // alignment_offset
    c[26..28].copy_from_slice(&1u16.to_le_bytes()); // min_io_size (blocks)
    put32(&mut c, 28, (optimal_io_size / lbs).max(1)); // opt_io_size (blocks)
    c[WRITEBACK_OFFSET] = u8::from(writeback);
    // 33: unused0
    c[34..36].copy_from_slice(&num_queues.to_le_bytes());
    put32(&mut c, 36, limits.max_discard_sectors);
    put32(&mut c, 40, limits.max_discard_seg);
    put32(&mut c, 44, (lbs / 512).max(1)); // discard_sector_alignment
    put32(&mut c, 48, limits.max_write_zeroes_sectors);
    put32(&mut c, 52, limits.max_write_zeroes_seg);
    c[56] = 1; // write_zeroes_may_unmap
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            capacity_sectors: 2048,
            read_only: false,
            logical_block_size: 512,
            size_max: 1 << 20,
            seg_max: 128,
            max_discard_sectors: 1 << 21,
            max_discard_seg: 16,
            max_write_zeroes_sectors: 1 << 20,
            max_write_zeroes_seg: 8,
        }
    }

    #[test]
    fn config_layout_matches_virtio_blk_config() {
        let c = config_space(&limits(), 65536, 4, true);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2048);
        assert_eq!(u32::from_le_bytes(c[8..12].try_into().unwrap()), 1 << 20);
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), 128);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
        assert_eq!(u32::from_le_bytes(c[28..32].try_into().unwrap()), 128);
        assert_eq!(c[32], 1);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 4);
        assert_eq!(u32::from_le_bytes(c[36..40].try_into().unwrap()), 1 << 21);
        assert_eq!(u32::from_le_bytes(c[40..44].try_into().unwrap()), 16);
        assert_eq!(u32::from_le_bytes(c[44..48].try_into().unwrap()), 1);
        assert_eq!(u32::from_le_bytes(c[48..52].try_into().unwrap()), 1 << 20);
        assert_eq!(u32::from_le_bytes(c[52..56].try_into().unwrap()), 8);
        assert_eq!(c[56], 1);
    }

    #[test]
    fn read_only_offers_ro_and_no_discard() {
        let ro = virtio_features(true);
        assert!(has_feature(ro, VIRTIO_BLK_F_RO));
        assert!(!has_feature(ro, VIRTIO_BLK_F_DISCARD));
        let rw = virtio_features(false);
        assert!(!has_feature(rw, VIRTIO_BLK_F_RO));
        assert!(has_feature(rw, VIRTIO_BLK_F_WRITE_ZEROES));
        assert!(has_feature(rw, VIRTIO_F_VERSION_1));
        assert!(rw & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0);
    }
}
