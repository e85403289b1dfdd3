//! The growth record: the last 512 bytes of a regular file that `prepare` extends.
//!
//! `prepare`'s very first write to a regular file is this one sector at the new end of
//! the file (its final length), synced before anything else: a sector is written whole
//! or not at all, so a crash leaves either the old length or a longer file whose last
//! sector names the length it had before (`source_size`). Every superblock copy carries
//! the same record in its last 512 bytes, so rewriting superblock copy 1 (the last 4 KiB
//! of the disk) never changes it, torn or not. The record is MAC'd under the host key:
//! a guest cannot make a later `prepare` or `rollback` truncate a file.

use crate::hostkey::HostKey;

/// Bytes of the record: one sector.
pub const GROWTH_LEN: usize = 512;
/// Magic of the record.
pub const GROWTH_MAGIC: [u8; 8] = *b"SBOOT-GR";
const GROWTH_VERSION: u32 = 1;
const MAC_AT: usize = 32;

/// What the growth record says: the file had `source_size` bytes and was extended to
/// `disk_len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrowthRecord {
    /// Length of the file before prepare extended it.
    pub source_size: u64,
    /// Length prepare extended it to (the record's own end).
    pub disk_len: u64,
}

impl GrowthRecord {
    /// Encodes into one sector, authenticated with `key`.
    pub fn encode(&self, key: &HostKey) -> [u8; GROWTH_LEN] {
        let mut b = [0u8; GROWTH_LEN];
        b[0..8].copy_from_slice(&GROWTH_MAGIC);
        b[8..12].copy_from_slice(&GROWTH_VERSION.to_le_bytes());
        b[16..24].copy_from_slice(&self.source_size.to_le_bytes());
        b[24..32].copy_from_slice(&self.disk_len.to_le_bytes());
        let mac = key.mac(&b);
        b[MAC_AT..MAC_AT + 32].copy_from_slice(&mac);
        b
    }

    /// Decodes a sector; `None` unless the magic, version, MAC under `key` and the
    /// lengths (`source_size < disk_len`) all check.
    pub fn decode(b: &[u8], key: &HostKey) -> Option<Self> {
        if b.len() != GROWTH_LEN
            || b[0..8] != GROWTH_MAGIC
            || b[8..12] != GROWTH_VERSION.to_le_bytes()
        {
            return None;
        }
        let mut c = [0u8; GROWTH_LEN];
        c.copy_from_slice(b);
        c[MAC_AT..MAC_AT + 32].fill(0);
        if key.mac(&c) != b[MAC_AT..MAC_AT + 32] {
            return None;
        }
        let u = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        let r = Self {
            source_size: u(16),
            disk_len: u(24),
        };
        (r.source_size < r.disk_len).then_some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_bit_flip_rejected() {
        let key = HostKey::from_bytes([7; 32]);
        let r = GrowthRecord {
            source_size: 300_000,
            disk_len: 1 << 20,
        };
        let b = r.encode(&key);
        assert_eq!(GrowthRecord::decode(&b, &key), Some(r));
        assert_eq!(
            GrowthRecord::decode(&b, &HostKey::from_bytes([8; 32])),
            None
        );
        for bit in 0..GROWTH_LEN * 8 {
            let mut c = b;
            c[bit / 8] ^= 1 << (bit % 8);
            assert_eq!(GrowthRecord::decode(&c, &key), None, "bit {bit}");
        }
        let shrink = GrowthRecord {
            source_size: 10,
            disk_len: 10,
        };
        assert_eq!(GrowthRecord::decode(&shrink.encode(&key), &key), None);
    }
}
