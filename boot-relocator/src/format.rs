//! On-disk format v2 of the released area: superblocks and map pages.
//!
//! Byte layout is documented in `docs/format.md`; this module is its single source of
//! truth in code. Every structure is a 4 KiB block with a magic, a CRC32C over the whole
//! block (with the CRC field zeroed), a generation number and the migration's UUID, so
//! that torn writes, stale blocks of an earlier migration and random bytes are rejected.
//! A superblock also carries a MAC under the host key ([`crate::hostkey`]): the guest
//! owns the last 8 KiB of a plain-served disk, so nothing there is ours unless it
//! verifies.

use std::fmt;

use crate::hostkey::HostKey;

mod growth;
mod map;
mod release;
pub use growth::{GrowthRecord, GROWTH_LEN, GROWTH_MAGIC};
pub use map::{decode_page, encode_page, DecodedPage, Entry, Location};
pub use release::Release;

/// Size of every metadata block.
pub const BLOCK: usize = 4096;
/// Superblock magic.
pub const SB_MAGIC: [u8; 8] = *b"SBOOT-SB";
/// Map page magic.
pub const PAGE_MAGIC: [u8; 4] = *b"SBMP";
/// Format version written by this code (3: the released area may lie in a gap between
/// partitions, see [`Release`]).
pub const VERSION: u32 = 3;
/// The format before [`Release`] (its bytes 148..224 are zero): read like v3.
pub const VERSION_2: u32 = 2;
/// The previous, unauthenticated format (read only to adopt a disk).
pub const LEGACY_VERSION: u32 = 1;
/// Bytes 224..256 of a superblock: BLAKE3 keyed hash under the host key.
const MAC_AT: usize = 224;
const MAC_LEN: usize = 32;
/// Smallest and largest chunk size (log2).
pub const MIN_CHUNK_SHIFT: u8 = 12;
/// Largest chunk size (log2): 4 MiB.
pub const MAX_CHUNK_SHIFT: u8 = 22;
/// Bytes of map page header.
pub const PAGE_HEADER: usize = 64;
/// Bytes of one map entry.
pub const ENTRY_SIZE: usize = 16;
/// Map entries per 4 KiB page.
pub const ENTRIES_PER_PAGE: usize = (BLOCK - PAGE_HEADER) / ENTRY_SIZE;
/// Most bytes of validator string stored.
pub const MAX_VALIDATOR: usize = 768;
/// Most bytes of the NUL-separated URL list written (the block's last sector holds the
/// growth record).
pub const MAX_URLS: usize = GROWTH_AT - URLS_AT;
/// The last sector of every superblock copy: the disk's [`GrowthRecord`].
pub const GROWTH_AT: usize = BLOCK - GROWTH_LEN;

const VALIDATOR_AT: usize = 256;
const URLS_AT: usize = 1024;

/// Migration state recorded in the superblock (an A/B updater's boot status code, plus
/// the intent records of multi-step operations).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    /// `prepare` is running or was interrupted; `phase` says how far it got.
    Preparing,
    /// Boot chunks are in place; the target has not been started yet.
    Prepared,
    /// The target has been started `start_counter` times without a confirm.
    Trial,
    /// The target was confirmed good.
    Confirmed,
    /// Commit is moving target chunks home; the source is abandoned.
    Committing,
    /// Every target chunk is home; only the released area remains to be removed.
    Committed,
    /// Rollback is copying saved source chunks home.
    RollingBack,
    /// The source is home again; only the released area remains to be removed.
    RolledBack,
}

impl State {
    fn to_u8(self) -> u8 {
        match self {
            State::Preparing => 1,
            State::Prepared => 2,
            State::Trial => 3,
            State::Confirmed => 4,
            State::Committing => 5,
            State::Committed => 6,
            State::RollingBack => 7,
            State::RolledBack => 8,
        }
    }

    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => State::Preparing,
            2 => State::Prepared,
            3 => State::Trial,
            4 => State::Confirmed,
            5 => State::Committing,
            6 => State::Committed,
            7 => State::RollingBack,
            8 => State::RolledBack,
            _ => return None,
        })
    }

    /// Name used by the CLI and the control API.
    pub fn name(self) -> &'static str {
        match self {
            State::Preparing => "preparing",
            State::Prepared => "prepared",
            State::Trial => "trial",
            State::Confirmed => "confirmed",
            State::Committing => "committing",
            State::Committed => "committed",
            State::RollingBack => "rolling-back",
            State::RolledBack => "rolled-back",
        }
    }

    /// True while the source is still recoverable by rollback.
    pub fn source_recoverable(self) -> bool {
        matches!(
            self,
            State::Preparing
                | State::Prepared
                | State::Trial
                | State::Confirmed
                | State::RollingBack
        )
    }

    /// True in states where the target image is presented.
    pub fn serves_target(self) -> bool {
        matches!(
            self,
            State::Prepared | State::Trial | State::Confirmed | State::Committing
        )
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How `prepare` has progressed while in [`State::Preparing`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreparePhase {
    /// Superblock written; map pages not yet initialized.
    Reserved,
    /// Map pages initialized; boot chunks are being saved and written (progress is in
    /// the map entries themselves).
    MapReady,
}

/// Where the released area's parts are on the disk. All offsets are absolute disk bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// log2 of the chunk size.
    pub chunk_shift: u8,
    /// Length of the disk while the migration runs (file length or device size).
    pub disk_len: u64,
    /// Bytes of the source image at the start of the disk.
    pub source_size: u64,
    /// Bytes of the target image.
    pub target_size: u64,
    /// First byte of the released area.
    pub area_offset: u64,
    /// First byte of the map (pages, two copies each, interleaved).
    pub map_offset: u64,
    /// Number of map pages.
    pub map_pages: u64,
    /// First byte of slot 0.
    pub slot_offset: u64,
    /// Number of slots.
    pub slot_count: u64,
}

impl Layout {
    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u64 {
        1 << self.chunk_shift
    }
    /// Number of target chunks (the last one may be partial).
    pub fn chunk_count(&self) -> u64 {
        self.target_size.div_ceil(self.chunk_size())
    }
    /// Disk offset of slot `s`.
    pub fn slot_addr(&self, s: u32) -> u64 {
        self.slot_offset + ((s as u64) << self.chunk_shift)
    }
    /// Disk offset of map page `i`, copy `k`.
    pub fn page_addr(&self, i: u64, k: u8) -> u64 {
        self.map_offset + (2 * i + k as u64) * BLOCK as u64
    }
    /// Disk offset of superblock copy `k` (the last two blocks of the disk).
    pub fn sb_addr(disk_len: u64, k: u8) -> u64 {
        disk_len - 2 * BLOCK as u64 + k as u64 * BLOCK as u64
    }
    /// Bytes of target chunk `c` that lie inside the target image.
    pub fn target_len(&self, c: u64) -> usize {
        let start = c << self.chunk_shift;
        (self.target_size.saturating_sub(start)).min(self.chunk_size()) as usize
    }
    /// Bytes of the source image inside home chunk `c` (0 when `c` lies past the source).
    pub fn source_len(&self, c: u64) -> usize {
        let start = c << self.chunk_shift;
        (self.source_size.saturating_sub(start)).min(self.chunk_size()) as usize
    }

    /// Checks the layout's internal consistency for a format-v2 area (after both
    /// images, up to the superblocks; used on every load).
    pub fn validate(&self) -> Result<(), String> {
        if self.area_offset < self.source_size.max(self.target_size) {
            return Err("area overlaps an image".into());
        }
        let slots_end = self
            .slot_count
            .checked_mul(1u64 << self.chunk_shift.min(63))
            .and_then(|b| b.checked_add(self.slot_offset))
            .ok_or("slot region overflows")?;
        if slots_end > self.disk_len.saturating_sub(2 * BLOCK as u64) {
            return Err("slots overlap superblocks".into());
        }
        self.validate_parts(slots_end)
    }

    /// The checks common to both formats.
    pub(crate) fn validate_parts(&self, slots_end: u64) -> Result<(), String> {
        if !(MIN_CHUNK_SHIFT..=MAX_CHUNK_SHIFT).contains(&self.chunk_shift) {
            return Err(format!("chunk shift {} out of range", self.chunk_shift));
        }
        let pages = self.chunk_count().div_ceil(ENTRIES_PER_PAGE as u64);
        let checks = [
            (self.target_size > 0, "target size is zero"),
            (slots_end <= self.disk_len, "slots past the disk"),
            (self.map_offset >= self.area_offset, "map before area"),
            (
                self.map_pages == pages,
                "map page count does not match target",
            ),
            (
                self.map_pages
                    .checked_mul(2 * BLOCK as u64)
                    .and_then(|b| b.checked_add(self.map_offset))
                    .is_some_and(|end| self.slot_offset >= end),
                "slots overlap map",
            ),
            (self.slot_offset % BLOCK as u64 == 0, "slots misaligned"),
            (self.slot_count <= u32::MAX as u64, "too many slots"),
        ];
        for (ok, what) in checks {
            if !ok {
                return Err(what.to_string());
            }
        }
        Ok(())
    }
}

/// Identity of the pinned target, as the source reported it when prepared.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct TargetRecord {
    /// "http", "file" or "store".
    pub kind: String,
    /// Validator (ETag, index hash, ...).
    pub validator: String,
    /// Where it was fetched from (mirrors in order).
    pub urls: Vec<String>,
}

/// The decoded superblock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// Monotonic update counter; the valid copy with the highest one wins.
    pub generation: u64,
    /// Identifies this migration; stamped into every map page.
    pub uuid: [u8; 16],
    /// Lifecycle state.
    pub state: State,
    /// Progress of prepare (meaningful in [`State::Preparing`]).
    pub phase: PreparePhase,
    /// Starts of the target while in trial.
    pub start_counter: u8,
    /// Trial starts allowed before automatic fallback.
    pub max_trial_starts: u8,
    /// Disk geometry of the migration.
    pub layout: Layout,
    /// The pinned target.
    pub target: TargetRecord,
    /// Seconds since the epoch when prepare began.
    pub created_unix: u64,
    /// Bytes of target chunks seeded from local source chunks instead of fetched
    /// (bytes 120..128; zero on disks written before seeding existed).
    pub seeded_bytes: u64,
    /// Where the released area ends and what rollback puts back (format v3; all zero on
    /// a v2 disk).
    pub release: Release,
}

pub(crate) fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
pub(crate) fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
pub(crate) fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
pub(crate) fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// CRC32C of a block with its 4-byte CRC field (at `crc_at`) taken as zero.
pub(crate) fn block_crc(b: &[u8], crc_at: usize) -> u32 {
    let c = crc32c::crc32c(&b[..crc_at]);
    let c = crc32c::crc32c_append(c, &[0; 4]);
    crc32c::crc32c_append(c, &b[crc_at + 4..])
}

/// Why a superblock copy was not accepted.
#[derive(Debug, PartialEq, Eq)]
pub enum SbDecodeError {
    /// No magic: this block never held a superblock.
    NoMagic,
    /// Magic present but the block is damaged (torn, or bytes that merely start with the
    /// magic): nothing in it can be trusted.
    Damaged(String),
    /// A format-v1 superblock (no MAC): written by an older streamboot, or by a guest.
    Legacy,
    /// Checksum intact but the MAC does not verify under this host's key: guest data, or
    /// a disk prepared on another host.
    Unverified,
    /// The MAC verifies but the content is not usable (a bug or a newer streamboot).
    Invalid(String),
}

/// MAC of a superblock block: over the whole block with the CRC and MAC fields zero.
fn block_mac(b: &[u8], key: &HostKey) -> [u8; MAC_LEN] {
    let mut c = b.to_vec();
    c[12..16].fill(0);
    c[MAC_AT..MAC_AT + MAC_LEN].fill(0);
    key.mac(&c)
}

impl Superblock {
    /// Encodes into a 4 KiB block, authenticated with `key`.
    pub fn encode(&self, key: &HostKey) -> Vec<u8> {
        let mut b = self.encode_fields(VERSION);
        b[GROWTH_AT..].copy_from_slice(&self.growth_record().encode(key));
        Self::seal_block(&mut b, key);
        b
    }

    /// The growth record of this superblock's disk (see [`GrowthRecord`]).
    pub fn growth_record(&self) -> GrowthRecord {
        GrowthRecord {
            source_size: self.layout.source_size,
            disk_len: self.layout.disk_len,
        }
    }

    /// Encodes the fields (no MAC, no CRC) with format `version`.
    fn encode_fields(&self, version: u32) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK];
        b[0..8].copy_from_slice(&SB_MAGIC);
        put_u32(&mut b, 8, version);
        put_u64(&mut b, 16, self.generation);
        b[24..40].copy_from_slice(&self.uuid);
        b[40] = self.state.to_u8();
        b[41] = self.layout.chunk_shift;
        b[42] = self.start_counter;
        b[43] = self.max_trial_starts;
        b[44] = match self.phase {
            PreparePhase::Reserved => 0,
            PreparePhase::MapReady => 1,
        };
        let l = &self.layout;
        for (i, v) in [
            l.disk_len,
            l.source_size,
            l.target_size,
            l.area_offset,
            l.map_offset,
            l.map_pages,
            l.slot_offset,
            l.slot_count,
            self.created_unix,
            self.seeded_bytes,
        ]
        .into_iter()
        .enumerate()
        {
            put_u64(&mut b, 48 + 8 * i, v);
        }
        let kind = self.target.kind.as_bytes();
        let kind_len = kind.len().min(16);
        b[128..128 + kind_len].copy_from_slice(&kind[..kind_len]);
        let v = self.target.validator.as_bytes();
        let v_len = v.len().min(MAX_VALIDATOR);
        b[144..146].copy_from_slice(&(v_len as u16).to_le_bytes());
        b[VALIDATOR_AT..VALIDATOR_AT + v_len].copy_from_slice(&v[..v_len]);
        let urls = encode_urls(&self.target.urls);
        b[146..148].copy_from_slice(&(urls.len() as u16).to_le_bytes());
        b[URLS_AT..URLS_AT + urls.len()].copy_from_slice(&urls);
        let r = &self.release;
        put_u64(&mut b, 152, r.area_end);
        put_u64(&mut b, 160, r.saved_tail_at);
        b[168..200].copy_from_slice(&r.saved_tail_hash);
        b[200] = r.zero_on_rollback as u8;
        b
    }

    /// Puts the MAC under `key` and then the CRC into any 4 KiB block (fuzzing and
    /// tests: lets arbitrary bytes reach the field checks behind the MAC).
    pub fn seal_block(b: &mut [u8], key: &HostKey) {
        assert_eq!(b.len(), BLOCK);
        let mac = block_mac(b, key);
        b[MAC_AT..MAC_AT + MAC_LEN].copy_from_slice(&mac);
        let crc = block_crc(b, 12);
        put_u32(b, 12, crc);
    }

    /// Encodes as format v1 (no MAC): only for tests of adoption and of forged blocks.
    pub fn encode_legacy_v1(&self) -> Vec<u8> {
        let mut b = self.encode_fields(LEGACY_VERSION);
        let crc = block_crc(&b, 12);
        put_u32(&mut b, 12, crc);
        b
    }

    /// Decodes a 4 KiB block and verifies its checksum and its MAC under `key` (`None`:
    /// no host key exists, so nothing verifies).
    pub fn decode(b: &[u8], key: Option<&HostKey>) -> Result<Self, SbDecodeError> {
        if b.len() != BLOCK || b[0..8] != SB_MAGIC {
            return Err(SbDecodeError::NoMagic);
        }
        if get_u32(b, 12) != block_crc(b, 12) {
            return Err(SbDecodeError::Damaged("checksum mismatch".into()));
        }
        match get_u32(b, 8) {
            LEGACY_VERSION => return Err(SbDecodeError::Legacy),
            VERSION | VERSION_2 => {}
            v => {
                return Err(SbDecodeError::Damaged(format!(
                    "format version {v} not supported (this build reads {VERSION})"
                )))
            }
        }
        let key = key.ok_or(SbDecodeError::Unverified)?;
        if b[MAC_AT..MAC_AT + MAC_LEN] != block_mac(b, key) {
            return Err(SbDecodeError::Unverified);
        }
        Self::parse(b).map_err(SbDecodeError::Invalid)
    }

    /// Decodes a format-v1 block (checksum only: nothing proves who wrote it). Only for
    /// an explicit adoption of a disk prepared by an older streamboot.
    pub fn decode_legacy_v1(b: &[u8]) -> Result<Self, SbDecodeError> {
        if b.len() != BLOCK || b[0..8] != SB_MAGIC {
            return Err(SbDecodeError::NoMagic);
        }
        if get_u32(b, 12) != block_crc(b, 12) {
            return Err(SbDecodeError::Damaged("checksum mismatch".into()));
        }
        if get_u32(b, 8) != LEGACY_VERSION {
            return Err(SbDecodeError::Damaged("not a format-v1 superblock".into()));
        }
        Self::parse(b).map_err(SbDecodeError::Invalid)
    }

    /// Decodes a copy whose magic is missing: the body `MetaStore::create` writes before
    /// the magic. Accepted only when it verifies with the magic put back.
    pub fn decode_body_without_magic(b: &[u8], key: &HostKey) -> Option<Self> {
        if b.len() != BLOCK || b[0..8] != [0; 8] {
            return None;
        }
        let mut c = b.to_vec();
        c[0..8].copy_from_slice(&SB_MAGIC);
        Self::decode(&c, Some(key)).ok()
    }

    fn parse(b: &[u8]) -> Result<Self, String> {
        let bad = |m: &str| m.to_string();
        let state = State::from_u8(b[40]).ok_or_else(|| bad("unknown state"))?;
        let phase = match b[44] {
            0 => PreparePhase::Reserved,
            1 => PreparePhase::MapReady,
            _ => return Err(bad("unknown prepare phase")),
        };
        let f = |i: usize| get_u64(b, 48 + 8 * i);
        let layout = Layout {
            chunk_shift: b[41],
            disk_len: f(0),
            source_size: f(1),
            target_size: f(2),
            area_offset: f(3),
            map_offset: f(4),
            map_pages: f(5),
            slot_offset: f(6),
            slot_count: f(7),
        };
        let release = Release {
            area_end: get_u64(b, 152),
            saved_tail_at: get_u64(b, 160),
            saved_tail_hash: b[168..200].try_into().expect("32 bytes"),
            zero_on_rollback: match b[200] {
                0 => false,
                1 => true,
                _ => return Err(bad("unknown release flags")),
            },
        };
        if get_u32(b, 8) != VERSION && release != Release::default() {
            return Err(bad("release fields before format v3"));
        }
        release
            .validate(&layout)
            .map_err(|e| format!("layout: {e}"))?;
        let kind_end = b[128..144].iter().position(|&x| x == 0).unwrap_or(16);
        let kind = std::str::from_utf8(&b[128..128 + kind_end])
            .map_err(|_| bad("kind not UTF-8"))?
            .to_string();
        let v_len = u16::from_le_bytes([b[144], b[145]]) as usize;
        let u_len = u16::from_le_bytes([b[146], b[147]]) as usize;
        if v_len > MAX_VALIDATOR || u_len > MAX_URLS {
            return Err(bad("string length out of range"));
        }
        let validator = std::str::from_utf8(&b[VALIDATOR_AT..VALIDATOR_AT + v_len])
            .map_err(|_| bad("validator not UTF-8"))?
            .to_string();
        let urls = decode_urls(&b[URLS_AT..URLS_AT + u_len]).ok_or_else(|| bad("urls"))?;
        Ok(Superblock {
            generation: get_u64(b, 16),
            uuid: b[24..40].try_into().expect("16 bytes"),
            state,
            phase,
            start_counter: b[42],
            max_trial_starts: b[43],
            layout,
            target: TargetRecord {
                kind,
                validator,
                urls,
            },
            created_unix: f(8),
            seeded_bytes: f(9),
            release,
        })
    }
}

fn encode_urls(urls: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    for u in urls {
        if out.len() + u.len() + 1 > MAX_URLS {
            break;
        }
        out.extend_from_slice(u.as_bytes());
        out.push(0);
    }
    out
}

fn decode_urls(b: &[u8]) -> Option<Vec<String>> {
    if b.is_empty() {
        return Some(Vec::new());
    }
    if *b.last()? != 0 {
        return None;
    }
    b[..b.len() - 1]
        .split(|&x| x == 0)
        .map(|s| std::str::from_utf8(s).ok().map(str::to_string))
        .collect()
}

#[cfg(test)]
mod tests;
