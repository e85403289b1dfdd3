//! Slot allocation for the engine, with LRU eviction of clean fetched chunks.
//!
//! Evicted slots are quarantined by the metadata store until the commit that records the
//! eviction is durable, so the allocator may have to run a commit before it can hand a
//! slot out. Dirty chunks and saved source chunks are never evicted.

use boot_relocator::{Entry, Location};

use super::{Counters, Engine, Meta, SlotIdx};
use crate::blockdev::BlockError;

/// Chunks evicted at once when the area is full (amortizes the commit that frees them).
const EVICT_BATCH: usize = 32;

impl Engine {
    /// A free slot, evicting clean chunks (when `may_evict`) and committing as needed.
    /// `NoSpace` when nothing can be freed.
    pub(crate) fn get_slot(&self, may_evict: bool) -> Result<SlotIdx, BlockError> {
        loop {
            {
                let mut m = self.map.lock();
                if let Some(s) = m.store.alloc_slot() {
                    return Ok(SlotIdx(s));
                }
                if m.store.quarantined_slots() == 0
                    && !(may_evict && self.evict_some(&mut m, EVICT_BATCH))
                {
                    return Err(BlockError::NoSpace);
                }
            }
            self.commit_map()
                .map_err(|e| BlockError::Io(std::io::Error::other(e)))?;
        }
    }

    /// Evicts up to `want` least-recently-used clean chunks whose stripes are free right
    /// now. Returns whether any was evicted.
    fn evict_some(&self, m: &mut Meta, want: usize) -> bool {
        let Meta { store, lru } = m;
        let Some(lru) = lru.as_mut() else {
            return false;
        };
        let candidates: Vec<u64> = lru.iter().rev().map(|(&c, _)| c).take(want * 4).collect();
        let mut evicted = 0;
        for c in candidates {
            if evicted == want {
                break;
            }
            let Some(_g) = self.map.stripe(c).try_write() else {
                continue;
            };
            // A page that cannot be read back is not evicted from.
            let Ok(e) = store.entry(c) else {
                continue;
            };
            if let (Location::Slot(_), false) = (e.loc, e.dirty) {
                let missing = Entry {
                    loc: Location::Missing,
                    ..e
                };
                if self.map.set_entry(store, c, missing).is_err() {
                    continue;
                }
                lru.pop(&c);
                evicted += 1;
            }
        }
        Counters::add(&self.counters.evictions, evicted as u64);
        evicted > 0
    }
}
