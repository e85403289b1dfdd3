//! The chunk map behind the engine: where every target chunk lives (the metadata store's
//! paged map), which chunks are present (one bit each, readable without the metadata
//! lock), the stripe locks that order data I/O against changes of location, and the
//! cache of clean slotted chunks (eviction candidates). The engine reaches the map only
//! through this type.
//!
//! Lock order: stripe → metadata. The metadata mutex is held only for in-memory updates
//! and the read of a map page that is not in memory (a few KiB, bounded cache).

use std::sync::atomic::AtomicU64;

use bitvec::prelude::{BitVec, Lsb0};
use boot_relocator::{Entry, Location, MetaStore, RelocError};
use parking_lot::{Mutex, MutexGuard, RwLock};

use crate::blockdev::BlockError;

/// Number of stripe locks (power of two).
const STRIPES: usize = 1024;

/// Map pages changed since the last commit (pinned in memory, about 5 KiB each, see
/// `boot_relocator::pages`) before the engine commits them without waiting for a flush.
pub(crate) const MAX_DIRTY_PAGES: usize = 1024;

/// The index of a chunk of the target (chunk `i` covers bytes `i * chunk_size ..`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkIdx(pub u64);

impl ChunkIdx {
    /// The chunk `n` chunks after this one.
    pub fn after(self, n: u64) -> ChunkIdx {
        ChunkIdx(self.0 + n)
    }
}

/// The index of a slot of the released area (see `Layout::slot_addr`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SlotIdx(pub u32);

/// The metadata store and the slot cache, under one mutex.
pub(crate) struct Meta {
    pub(crate) store: MetaStore,
    /// Clean slotted chunks in recency order; `None` when the area fits the whole target
    /// (nothing is ever evicted then).
    pub(crate) lru: Option<lru::LruCache<u64, ()>>,
}

/// See the module documentation.
pub(crate) struct ChunkMap {
    meta: Mutex<Meta>,
    /// One bit per chunk: not missing. Kept in step with the map under the metadata
    /// lock; read lock-free by `is_local` (a scheduling hint; the map stays the truth).
    local: BitVec<AtomicU64, Lsb0>,
    stripes: Box<[RwLock<()>]>,
}

/// A metadata error met on the request path, as an I/O error (the cause kept).
pub(crate) fn meta_io(e: RelocError) -> BlockError {
    BlockError::Io(std::io::Error::other(e))
}

impl ChunkMap {
    /// Builds the presence bitmap and (when the area cannot hold every chunk) the slot
    /// cache with one pass over the map.
    pub(crate) fn new(store: MetaStore) -> Result<Self, RelocError> {
        let layout = *store.layout();
        let chunks = layout.chunk_count();
        let saved = store.counts().saved;
        let mut lru = (layout.slot_count < chunks + saved).then(lru::LruCache::unbounded);
        let local: BitVec<AtomicU64, Lsb0> = BitVec::repeat(false, chunks as usize);
        store.scan(|c, e| {
            if e.loc != Location::Missing {
                local.set_aliased(c as usize, true);
            }
            if let (Location::Slot(_), false, Some(l)) = (e.loc, e.dirty, lru.as_mut()) {
                l.put(c, ());
            }
        })?;
        Ok(Self {
            meta: Mutex::new(Meta { store, lru }),
            local,
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
        })
    }

    /// The metadata (store and slot cache).
    pub(crate) fn lock(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock()
    }

    /// The stripe lock of chunk `c`: shared for data I/O, exclusive to change where the
    /// chunk lives.
    pub(crate) fn stripe(&self, c: u64) -> &RwLock<()> {
        &self.stripes[(c as usize) & (STRIPES - 1)]
    }

    /// Changes chunk `c`'s entry (in memory) and keeps the presence bitmap in step.
    pub(crate) fn set_entry(
        &self,
        store: &mut MetaStore,
        c: u64,
        e: Entry,
    ) -> Result<(), BlockError> {
        store.set_entry(c, e).map_err(meta_io)?;
        self.local
            .set_aliased(c as usize, e.loc != Location::Missing);
        Ok(())
    }

    /// True when chunk `c` is missing (under the metadata lock, so that it agrees with
    /// the map).
    pub(crate) fn is_missing(&self, c: u64) -> bool {
        let _m = self.meta.lock();
        !self.local[c as usize]
    }

    /// True when every chunk of `first..=last` is present (lock-free).
    pub(crate) fn all_present(&self, first: u64, last: u64) -> bool {
        self.local[first as usize..=last as usize].all()
    }

    /// Where chunk `c` is now (and, for a clean slot, marks it recently used).
    pub(crate) fn locate(&self, c: u64) -> Result<Entry, BlockError> {
        let mut m = self.meta.lock();
        let e = m.store.entry(c).map_err(meta_io)?;
        if let (Location::Slot(_), false, Some(lru)) = (e.loc, e.dirty, m.lru.as_mut()) {
            lru.get(&c);
        }
        Ok(e)
    }
}

impl super::Engine {
    /// Commits the map when changes pin [`MAX_DIRTY_PAGES`] pages or more, so that
    /// guest writes, write-zeroes and discards without a flush (or fetches between
    /// commits) keep memory bounded. Call without holding stripe or metadata locks.
    pub(crate) fn bound_dirty_pages(&self) -> Result<(), BlockError> {
        if self.map.lock().store.dirty_page_count() < MAX_DIRTY_PAGES {
            return Ok(());
        }
        self.commit_map()
            .map_err(|e| BlockError::Io(std::io::Error::other(e)))
    }
}

impl super::Engine {
    /// Makes clean slotted chunk `c` (a fetched copy of the target) ready for a write in
    /// place. A write into its slot under an entry that is clean on the disk could
    /// survive a crash while the entry does not: the chunk would then read as written,
    /// yet count as a pristine copy of the target, be evicted and fetched again, and the
    /// bytes the guest saw would change under it. So the chunk is copied into a new slot
    /// mapped dirty (the old slot stays quarantined, untouched, until a commit drops it:
    /// a crash before that finds the clean entry and its intact slot). When no slot is
    /// free right now (or commit is moving chunks home), the entry is marked dirty in
    /// place and the map committed before returning (which also frees the slots earlier
    /// copies left in quarantine). The stripe is held exclusively throughout.
    pub(crate) fn make_dirty_durable(&self, c: u64) -> Result<(), BlockError> {
        let _g = self.map.stripe(c).write();
        let e = {
            let m = self.map.lock();
            let e = m.store.entry(c).map_err(meta_io)?;
            if !matches!(e.loc, Location::Slot(_)) || e.dirty {
                return Ok(());
            }
            e
        };
        if !self.to_home.load(std::sync::atomic::Ordering::Acquire) && self.copy_to_new_slot(c, e) {
            return Ok(());
        }
        self.mark_dirty_and_commit(c, e)
    }

    /// Copies clean chunk `c` (entry `e`, stripe held exclusively) into a new slot and
    /// maps it there, dirty. False (nothing changed) when no slot is free or on an I/O
    /// error.
    fn copy_to_new_slot(&self, c: u64, e: Entry) -> bool {
        let Location::Slot(old) = e.loc else {
            return false;
        };
        // Only a slot free right now: evicting fetched chunks (fetched again later) or
        // committing to free one would cost more than the commit this copy avoids.
        let Some(new) = self.map.lock().store.alloc_slot() else {
            return false;
        };
        let l = &self.layout;
        let mut buf = vec![0u8; l.target_len(c)];
        let copied = self
            .storage
            .read_at(l.slot_addr(old), &mut buf)
            .and_then(|()| self.storage.write_at(l.slot_addr(new), &buf));
        let mut m = self.map.lock();
        let dirty = Entry {
            loc: Location::Slot(new),
            dirty: true,
            ..e
        };
        if copied.is_err() || self.map.set_entry(&mut m.store, c, dirty).is_err() {
            m.store.free_unpublished(new);
            return false;
        }
        if let Some(lru) = m.lru.as_mut() {
            lru.pop(&c);
        }
        true
    }

    /// Marks clean chunk `c` (entry `e`) dirty and commits the map; when the commit
    /// fails the entry is clean again (the next write retries).
    fn mark_dirty_and_commit(&self, c: u64, e: Entry) -> Result<(), BlockError> {
        {
            let mut m = self.map.lock();
            self.map
                .set_entry(&mut m.store, c, Entry { dirty: true, ..e })?;
            if let Some(l) = m.lru.as_mut() {
                l.pop(&c);
            }
        }
        let Err(err) = self.commit_map() else {
            return Ok(());
        };
        let mut m = self.map.lock();
        if m.store.entry(c).map_err(meta_io)? == (Entry { dirty: true, ..e }) {
            self.map.set_entry(&mut m.store, c, e)?;
            if let Some(l) = m.lru.as_mut() {
                l.put(c, ());
            }
        }
        Err(BlockError::Io(std::io::Error::other(err)))
    }
}
