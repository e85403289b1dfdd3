//! Seeding: target chunks the source disk already holds are copied locally by `prepare`
//! instead of being fetched.
//!
//! Only a chunk-store target can seed: its index gives every chunk's BLAKE3 hash. After
//! the boot chunks are placed, every full source chunk is hashed (the store's chunk size,
//! which must equal the disk's): at its home address, or from the slot it was saved to
//! when a target boot chunk took its place. A missing target chunk whose hash matches
//! (the same address or any other) is copied from the bytes just hashed into a free slot
//! and recorded as a clean `Slot` entry, exactly like a chunk fetched and verified. Data
//! is synced before the map names it (`MetaStore::commit`), so a crash loses at most
//! seeding work, never correctness. The seeded byte count is kept in the superblock.
//!
//! The home address itself is never used for the target here: the source stays intact
//! until commit, so rollback stays exact, and no engine rule changes.

use std::collections::{BTreeMap, HashMap, HashSet};

use boot_relocator::relocate::MIN_WORKING_SLOTS;
use boot_relocator::{Entry, Location, MetaStore, State, Storage};

use crate::source::store::StoreSource;
use crate::source::RemoteSource;
use crate::store::index::ChunkHash;

/// Chunks copied between two map commits.
const BATCH_BYTES: u64 = 8 << 20;

/// What seeding did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SeedReport {
    /// Full source chunks hashed.
    pub chunks_hashed: u64,
    /// Target chunks copied from a local source chunk at the same address.
    pub chunks_same_address: u64,
    /// Target chunks copied from a local source chunk at another address.
    pub chunks_moved: u64,
    /// Bytes seeded (both kinds).
    pub bytes: u64,
    /// Matches left unseeded because the released area had no slot to spare.
    pub chunks_no_room: u64,
}

/// Why seeding could not run.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// The store's chunk size differs from the disk's.
    #[error(
        "the store's chunk size ({store}) differs from the disk's ({disk}): seeding needs equal sizes \
         (prepare with --chunk-size {store}, or --no-seed)"
    )]
    ChunkSize { store: u64, disk: u64 },
    /// The disk is not freshly prepared.
    #[error("seeding runs right after prepare (state prepared), not in state {0}")]
    State(State),
    /// The store image is not the disk's pinned target.
    #[error("the store image is not the disk's pinned target")]
    NotPinned,
    /// Disk or metadata I/O.
    #[error(transparent)]
    Reloc(#[from] boot_relocator::RelocError),
}

/// Where the source disk holds each target chunk hash: built by hashing every full
/// source chunk before prepare writes anything. Every use re-checks the hash of the
/// bytes it reads, so a location that changed since (a boot chunk placed over it) is
/// simply not used.
#[derive(Debug, Default)]
pub struct LocalIndex {
    by_hash: HashMap<ChunkHash, u64>,
    chunk_size: u64,
    /// Full source chunks hashed.
    pub chunks_hashed: u64,
}

impl LocalIndex {
    /// Hashes the full source chunks of `storage` (the first `source_size` bytes) and
    /// keeps those `store`'s image uses. `progress(done, total)`.
    pub fn build(
        storage: &dyn Storage,
        source_size: u64,
        store: &StoreSource,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Self, SeedError> {
        let c = store.chunk_size();
        let zero = ChunkHash::of(&vec![0u8; c as usize]);
        let wanted: HashSet<ChunkHash> = (0..store.chunk_count())
            .filter_map(|t| store.chunk_hash(t))
            .filter(|h| *h != zero)
            .collect();
        let mut idx = LocalIndex {
            by_hash: HashMap::new(),
            chunk_size: c,
            chunks_hashed: 0,
        };
        let n = source_size / c;
        let mut buf = vec![0u8; c as usize];
        for a in 0..n {
            read(storage, a * c, &mut buf, || {
                format!("reading source chunk {a} to hash it")
            })?;
            let h = ChunkHash::of(&buf);
            idx.chunks_hashed += 1;
            if wanted.contains(&h) {
                // Same address first: a target chunk at `a` prefers the source chunk at `a`.
                if store.chunk_hash(a) == Some(h) {
                    idx.by_hash.insert(h, a);
                } else {
                    idx.by_hash.entry(h).or_insert(a);
                }
            }
            if a % 64 == 0 || a + 1 == n {
                progress(a + 1, n);
            }
        }
        Ok(idx)
    }

    /// Fills `buf` (target bytes at `offset`) for prepare's boot placement: whole chunks
    /// the disk holds come from the disk (hash re-checked), the rest from `store`.
    /// Returns the bytes seeded.
    pub fn read_target(
        &self,
        storage: &dyn Storage,
        store: &StoreSource,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<u64, String> {
        let c = self.chunk_size;
        let mut seeded = 0;
        let mut pos = 0usize;
        while pos < buf.len() {
            let off = offset + pos as u64;
            let len = ((c - off % c) as usize).min(buf.len() - pos);
            let piece = &mut buf[pos..pos + len];
            let local = off % c == 0
                && len as u64 == c
                && store
                    .chunk_hash(off / c)
                    .is_some_and(|h| self.fill(storage, h, piece));
            if local {
                seeded += c;
            } else {
                store.read_at(off, piece).map_err(|e| e.to_string())?;
            }
            pos += len;
        }
        Ok(seeded)
    }

    /// Reads the local chunk with hash `h` into `buf` (one chunk) if the disk still holds
    /// it at its home address.
    fn fill(&self, storage: &dyn Storage, h: ChunkHash, buf: &mut [u8]) -> bool {
        let Some(&a) = self.by_hash.get(&h) else {
            return false;
        };
        storage.read_at(a * self.chunk_size, buf).is_ok() && ChunkHash::of(buf) == h
    }
}

/// Copies every missing target chunk whose bytes the source disk holds (per `index`)
/// into a free slot, leaving [`MIN_WORKING_SLOTS`] free.
pub fn seed(
    meta: &mut MetaStore,
    store: &StoreSource,
    index: &LocalIndex,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<SeedReport, SeedError> {
    let l = *meta.layout();
    let c = l.chunk_size();
    if store.chunk_size() != c {
        return Err(SeedError::ChunkSize {
            store: store.chunk_size(),
            disk: c,
        });
    }
    if meta.state() != State::Prepared {
        return Err(SeedError::State(meta.state()));
    }
    if meta.superblock().target.validator != store.index_hash().to_hex()
        || store.chunk_count() != l.chunk_count()
    {
        return Err(SeedError::NotPinned);
    }
    // Missing full target chunks the disk holds, grouped by source address.
    let mut by_addr: BTreeMap<u64, (ChunkHash, Vec<u64>)> = BTreeMap::new();
    meta.scan(|t, e| {
        if e.loc != Location::Missing || l.target_len(t) as u64 != c {
            return;
        }
        let Some(h) = store.chunk_hash(t) else {
            return;
        };
        if let Some(&a) = index.by_hash.get(&h) {
            by_addr.entry(a).or_insert((h, Vec::new())).1.push(t);
        }
    })?;
    let mut report = SeedReport {
        chunks_hashed: index.chunks_hashed,
        ..SeedReport::default()
    };
    let storage = meta.storage().clone();
    let mut buf = vec![0u8; c as usize];
    let mut pending = 0u64;
    let total = by_addr.len() as u64;
    for (done, (a, (h, targets))) in by_addr.into_iter().enumerate() {
        progress(done as u64, total);
        // Past the target's end the map has no entry: the source chunk is untouched.
        let e = if a < l.chunk_count() {
            meta.entry(a)?
        } else {
            Entry::MISSING
        };
        // The source's bytes of chunk `a`: saved in a slot if a boot chunk took its place.
        let addr = e.saved.map_or(a * c, |s| l.slot_addr(s));
        read(storage.as_ref(), addr, &mut buf, || {
            format!("reading source chunk {a}")
        })?;
        if ChunkHash::of(&buf) != h {
            continue;
        }
        for t in targets {
            if meta.free_slots() as u64 <= MIN_WORKING_SLOTS {
                report.chunks_no_room += 1;
                continue;
            }
            let slot = meta.alloc_slot().expect("a free slot was counted");
            storage.write_at(l.slot_addr(slot), &buf).map_err(|e| {
                boot_relocator::RelocError::Io {
                    context: format!("seeding target chunk {t} into slot {slot}"),
                    source: e,
                }
            })?;
            let cur = meta.entry(t)?;
            meta.set_entry(
                t,
                Entry {
                    loc: Location::Slot(slot),
                    dirty: false,
                    ..cur
                },
            )?;
            if t == a {
                report.chunks_same_address += 1;
            } else {
                report.chunks_moved += 1;
            }
            report.bytes += c;
            pending += c;
        }
        if pending >= BATCH_BYTES {
            add_seeded(meta, pending)?;
            pending = 0;
        }
    }
    add_seeded(meta, pending)?;
    progress(total, total);
    Ok(report)
}

fn read(
    storage: &dyn Storage,
    at: u64,
    buf: &mut [u8],
    what: impl FnOnce() -> String,
) -> Result<(), SeedError> {
    storage.read_at(at, buf).map_err(|e| {
        SeedError::Reloc(boot_relocator::RelocError::Io {
            context: what(),
            source: e,
        })
    })
}

/// Syncs the seeded data, commits the map entries naming it, then adds `bytes` to the
/// superblock's seeded count (`update_sb` commits the map first).
pub fn add_seeded(meta: &mut MetaStore, bytes: u64) -> Result<(), SeedError> {
    if bytes == 0 {
        return Ok(());
    }
    meta.update_sb(|sb| sb.seeded_bytes += bytes)?;
    Ok(())
}
