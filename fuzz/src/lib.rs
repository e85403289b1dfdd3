//! Shared parts of the fuzz targets: block checksum fix-up (so the fuzzer reaches the
//! fields behind a CRC), a deterministic signing key, an in-memory block device that
//! panics on any request outside the disk, and the guest-memory layout of the virtio
//! target. The seed corpus generator (`gen_corpus`) uses the same layouts, so seeds and
//! targets agree on what an input means.

use ed25519_dalek::SigningKey;
use parking_lot::Mutex;
use streamboot::blockdev::{BlockBackend, BlockError, GuestBuf, GuestBufMut};

/// CRC32C of a 4 KiB block with its CRC field at `crc_at` taken as zero, written into that
/// field (the same rule as boot-relocator's format; recomputed here independently).
pub fn fix_block_crc(b: &mut [u8], crc_at: usize) {
    let c = crc32c::crc32c(&b[..crc_at]);
    let c = crc32c::crc32c_append(c, &[0; 4]);
    let c = crc32c::crc32c_append(c, &b[crc_at + 4..]);
    b[crc_at..crc_at + 4].copy_from_slice(&c.to_le_bytes());
}

/// The host key the superblock seeds are sealed with and the superblock target uses.
pub const FUZZ_HOST_KEY: [u8; 32] = [0x5b; 32];

/// The key the index seeds are signed with and the index target trusts.
pub fn trusted_key() -> SigningKey {
    SigningKey::from_bytes(&[7u8; 32])
}

/// A second trusted key (key rotation: `Trust::AnyOf`).
pub fn other_key() -> SigningKey {
    SigningKey::from_bytes(&[9u8; 32])
}

/// Guest memory of the virtio target: the queue and buffers in region 0, then a hole, then
/// a small region 1 (so chains can straddle a gap in guest memory).
pub mod guest {
    /// Region 0: `[0, REGION0_LEN)`.
    pub const REGION0_LEN: usize = 0x1_0000;
    /// Region 1 starts here (the gap below it is unmapped).
    pub const REGION1_START: u64 = 0x2_0000;
    /// Region 1 length.
    pub const REGION1_LEN: usize = 0x1000;
    /// Queue size (descriptor table entries).
    pub const QUEUE_SIZE: u16 = 16;
    /// Bytes of the descriptor table at guest address 0.
    pub const DESC_TABLE_LEN: usize = 16 * QUEUE_SIZE as usize;
    /// Where the fuzz input's payload is copied into guest memory (past the rings).
    pub const PAYLOAD_AT: u64 = 0x400;
    /// Fuzz input layout: descriptor table, then head index, then option bits, then payload.
    pub const HEAD_AT: usize = DESC_TABLE_LEN;
    /// Option bits: bit 0 read-only, bit 1 write-through, bit 2 4 KiB logical blocks.
    pub const OPTS_AT: usize = DESC_TABLE_LEN + 1;
    /// First payload byte of the fuzz input.
    pub const PAYLOAD_INPUT_AT: usize = DESC_TABLE_LEN + 2;
}

/// Capacity of [`FuzzDisk`]: 64 KiB plus 300 bytes, so the last sector is partial.
pub const DISK_CAPACITY: u64 = (64 << 10) + 300;

/// An in-memory disk that panics when asked for anything outside its capacity, or to
/// write while read-only: the request layer must have refused such a request.
pub struct FuzzDisk {
    data: Mutex<Vec<u8>>,
    read_only: bool,
    block_size: u32,
}

impl FuzzDisk {
    /// A disk with a recognisable byte pattern.
    pub fn new(read_only: bool, block_size: u32) -> Self {
        let data = (0..DISK_CAPACITY).map(|i| (i % 251) as u8).collect();
        Self {
            data: Mutex::new(data),
            read_only,
            block_size,
        }
    }

    /// The disk bytes `[offset, offset + len)`.
    pub fn bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let o = offset as usize;
        self.data.lock()[o..o + len].to_vec()
    }

    fn check(&self, offset: u64, len: u64, write: bool) -> usize {
        let end = offset.checked_add(len).expect("request range overflows");
        assert!(
            end <= DISK_CAPACITY,
            "request {offset}+{len} reaches past the disk ({DISK_CAPACITY} bytes)"
        );
        assert!(!(write && self.read_only), "write reached a read-only disk");
        offset as usize
    }
}

impl BlockBackend for FuzzDisk {
    fn capacity(&self) -> u64 {
        DISK_CAPACITY
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn logical_block_size(&self) -> u32 {
        self.block_size
    }
    fn read_into(&self, offset: u64, buf: &GuestBufMut<'_>) -> Result<(), BlockError> {
        let o = self.check(offset, buf.len() as u64, false);
        buf.copy_from(&self.data.lock()[o..o + buf.len()]);
        Ok(())
    }
    fn write_from(&self, offset: u64, buf: &GuestBuf<'_>) -> Result<(), BlockError> {
        let o = self.check(offset, buf.len() as u64, true);
        buf.copy_to(&mut self.data.lock()[o..o + buf.len()]);
        Ok(())
    }
    fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.check(offset, len, true);
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let o = self.check(offset, len, true);
        self.data.lock()[o..o + len as usize].fill(0);
        Ok(())
    }
    fn device_id(&self) -> Vec<u8> {
        b"fuzz-serial".to_vec()
    }
    fn is_local(&self, offset: u64, len: u64) -> bool {
        self.check(offset, len, false);
        true
    }
}

/// A strict reference parser for `Content-Range` (RFC 9110 §14.4, `bytes` unit only),
/// written independently of the one under test: digits only, optional spaces/tabs where
/// the parser under test tolerates them.
pub fn reference_content_range(value: &str) -> Option<(u64, u64, Option<u64>)> {
    let ows = |s: &str| s.trim_matches([' ', '\t']).to_string();
    let digits = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    let v = ows(value);
    let rest = v.strip_prefix("bytes ")?;
    let slash = rest.find('/')?;
    let (range, total) = (ows(&rest[..slash]), ows(&rest[slash + 1..]));
    let dash = range.find('-')?;
    let start = digits(&range[..dash])?;
    let end = digits(&range[dash + 1..])?;
    if end < start {
        return None;
    }
    let total = if total == "*" {
        None
    } else {
        let t = digits(&total)?;
        if end >= t {
            return None;
        }
        Some(t)
    };
    Some((start, end, total))
}

/// The images the NBD target's catalog offers: the default export (`""`, with a partial
/// last sector), a small named one and an empty one.
pub fn nbd_images() -> Vec<(&'static str, Vec<u8>)> {
    let pattern = |len: usize| (0..len).map(|i| (i % 253) as u8).collect::<Vec<u8>>();
    vec![
        ("", pattern((64 << 10) + 17)),
        ("boot.img", pattern(3 * 4096)),
        ("empty", Vec::new()),
    ]
}
