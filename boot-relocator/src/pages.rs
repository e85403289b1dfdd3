//! The chunk map in memory: map pages read on demand into a bounded cache, pages changed
//! since their last commit pinned until a commit wrote them, per-kind counts, and the
//! slot allocator as a bitmap. Memory is independent of the target's size except for
//! the bitmap of slots (one bit per slot).
//!
//! A page leaves memory only when its two disk copies hold exactly what memory holds:
//! pages changed since their last completed commit (dirty, or in a batch being written)
//! are pinned. Reading a page back from the disk therefore always yields the latest
//! entries.

use std::collections::HashMap;
use std::num::NonZeroUsize;

use bitvec::prelude::{BitVec, Lsb0};

use crate::error::{IoContext, RelocError, Result};
use crate::format::{decode_page, DecodedPage, Entry, Layout, Location, BLOCK, ENTRIES_PER_PAGE};
use crate::storage::Storage;

/// Clean map pages kept in memory (about 5 KiB each).
pub const PAGE_CACHE_PAGES: usize = 2048;

/// Chunks of each kind in a map (kept up to date on every change).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapCounts {
    /// Missing chunks.
    pub missing: u64,
    /// Zero chunks.
    pub zero: u64,
    /// Chunks at home.
    pub home: u64,
    /// Chunks in a slot.
    pub slotted: u64,
    /// Chunks holding guest writes.
    pub dirty: u64,
    /// Chunks whose source chunk is saved in a slot.
    pub saved: u64,
    /// Bytes of the saved source chunks.
    pub saved_bytes: u64,
}

impl MapCounts {
    fn apply(&mut self, l: &Layout, c: u64, e: &Entry, add: bool) {
        let f = |v: &mut u64, n: u64| {
            if add {
                *v += n
            } else {
                *v -= n
            }
        };
        match e.loc {
            Location::Missing => f(&mut self.missing, 1),
            Location::Zero => f(&mut self.zero, 1),
            Location::Home => f(&mut self.home, 1),
            Location::Slot(_) => f(&mut self.slotted, 1),
        }
        f(&mut self.dirty, e.dirty as u64);
        if e.saved.is_some() {
            f(&mut self.saved, 1);
            f(&mut self.saved_bytes, l.source_len(c) as u64);
        }
    }

    /// Replaces `old` by `new` for chunk `c`.
    pub(crate) fn change(&mut self, l: &Layout, c: u64, old: &Entry, new: &Entry) {
        self.apply(l, c, old, false);
        self.apply(l, c, new, true);
    }

    /// Counts of a map whose every entry is missing.
    pub(crate) fn all_missing(l: &Layout) -> Self {
        Self {
            missing: l.chunk_count(),
            ..Self::default()
        }
    }
}

/// Slots a map entry references (target chunk and saved source chunk).
pub(crate) fn slots_of(e: &Entry) -> impl Iterator<Item = u32> {
    let loc = match e.loc {
        Location::Slot(s) => Some(s),
        _ => None,
    };
    [loc, e.saved].into_iter().flatten()
}

/// Free slots: one bit per slot, allocation lowest first.
#[derive(Debug)]
pub(crate) struct SlotBits {
    free: BitVec<u64, Lsb0>,
    count: usize,
    /// No free slot below this one.
    cursor: usize,
}

impl SlotBits {
    /// Every slot not set in `used` is free.
    pub(crate) fn from_used(used: BitVec<u64, Lsb0>) -> Self {
        let free = !used;
        let count = free.count_ones();
        Self {
            free,
            count,
            cursor: 0,
        }
    }
    pub(crate) fn alloc(&mut self) -> Option<u32> {
        let s = self.cursor + self.free[self.cursor..].first_one()?;
        self.free.set(s, false);
        self.count -= 1;
        self.cursor = s + 1;
        Some(s as u32)
    }
    pub(crate) fn release(&mut self, s: u32) {
        let s = s as usize;
        debug_assert!(!self.free[s], "slot {s} freed twice");
        self.free.set(s, true);
        self.count += 1;
        self.cursor = self.cursor.min(s);
    }
    pub(crate) fn is_free(&self, s: u32) -> bool {
        self.free[s as usize]
    }
    pub(crate) fn count(&self) -> usize {
        self.count
    }
}

/// Picks the current version of page `p` from its two decoded copies: the newer when
/// both verify, the valid one when only one does. `true` with it: the copies differ (the
/// page is to be rewritten).
pub(crate) fn pick(
    p: u64,
    copies: [std::result::Result<DecodedPage, String>; 2],
) -> Result<(DecodedPage, bool)> {
    Ok(match copies {
        [Ok(a), Ok(b)] => {
            // A commit cut between its two writes was never acknowledged: either copy
            // is acceptable; take the newer.
            let stale = a.generation != b.generation || a.entries != b.entries;
            (if b.generation > a.generation { b } else { a }, stale)
        }
        [Ok(x), Err(_)] | [Err(_), Ok(x)] => (x, true),
        [Err(a), Err(b)] => {
            return Err(RelocError::Corrupt(format!(
                "map page {p} has no valid copy ({a}; {b})"
            )))
        }
    })
}

/// Number of entries page `p` holds.
pub(crate) fn page_len(l: &Layout, p: u64) -> usize {
    (l.chunk_count() - p * ENTRIES_PER_PAGE as u64).min(ENTRIES_PER_PAGE as u64) as usize
}

/// Reads the raw bytes of pages `first..first+count` (both copies of each) into `buf`.
pub(crate) fn read_raw(
    storage: &dyn Storage,
    l: &Layout,
    first: u64,
    count: u64,
    buf: &mut Vec<u8>,
) -> Result<()> {
    buf.resize((2 * count) as usize * BLOCK, 0);
    storage
        .read_at(l.page_addr(first, 0), buf)
        .ctx(|| format!("reading map page {first}"))
}

/// Decodes page `p` from `buf` filled by [`read_raw`] starting at page `first`.
pub(crate) fn decode_at(
    buf: &[u8],
    first: u64,
    p: u64,
    l: &Layout,
    uuid: &[u8; 16],
) -> Result<(DecodedPage, bool)> {
    let at = |k: u64| (2 * (p - first) + k) as usize * BLOCK;
    let copies = [0, 1].map(|k| {
        decode_page(
            &buf[at(k)..at(k) + BLOCK],
            p,
            uuid,
            page_len(l, p),
            l.slot_count,
        )
    });
    pick(p, copies)
}

/// Map pages in memory.
pub(crate) struct MapPages {
    /// Pages whose disk copies may be older than memory: never evicted.
    pinned: HashMap<u64, Box<[Entry]>>,
    /// Pages equal to their disk copies, least recently used first out.
    clean: lru::LruCache<u64, Box<[Entry]>>,
    /// Pages in batches being written, and how many batches hold each.
    writing: HashMap<u64, u32>,
    /// No map on disk yet (or any more): a page not in memory is all missing.
    pub(crate) virtual_map: bool,
    /// Boot-set chunks of a map not written yet (see `MetaStore::create`).
    pub(crate) boot: Vec<u64>,
}

impl MapPages {
    pub(crate) fn new(virtual_map: bool) -> Self {
        Self {
            pinned: HashMap::new(),
            clean: lru::LruCache::new(NonZeroUsize::new(PAGE_CACHE_PAGES).expect("nonzero")),
            writing: HashMap::new(),
            virtual_map,
            boot: Vec::new(),
        }
    }

    /// Entries of a page that is not on the disk (virtual map).
    fn fresh(&self, l: &Layout, p: u64) -> Box<[Entry]> {
        let mut v = vec![Entry::MISSING; page_len(l, p)];
        let first = p * ENTRIES_PER_PAGE as u64;
        for &c in &self.boot {
            if (first..first + v.len() as u64).contains(&c) {
                v[(c - first) as usize].boot = true;
            }
        }
        v.into_boxed_slice()
    }

    fn load(
        &mut self,
        storage: &dyn Storage,
        l: &Layout,
        uuid: &[u8; 16],
        p: u64,
    ) -> Result<Box<[Entry]>> {
        if self.virtual_map {
            return Ok(self.fresh(l, p));
        }
        let mut buf = Vec::new();
        read_raw(storage, l, p, 1, &mut buf)?;
        Ok(decode_at(&buf, p, p, l, uuid)?.0.entries.into_boxed_slice())
    }

    /// The entries of page `p` (read from the disk when not in memory).
    pub(crate) fn page(
        &mut self,
        storage: &dyn Storage,
        l: &Layout,
        uuid: &[u8; 16],
        p: u64,
    ) -> Result<&[Entry]> {
        if self.pinned.contains_key(&p) {
            return Ok(&self.pinned[&p]);
        }
        if !self.clean.contains(&p) {
            let page = self.load(storage, l, uuid, p)?;
            self.clean.put(p, page);
        }
        Ok(self.clean.get(&p).expect("just cached"))
    }

    /// Page `p` for a change: pinned from now until a commit wrote it.
    pub(crate) fn page_mut(
        &mut self,
        storage: &dyn Storage,
        l: &Layout,
        uuid: &[u8; 16],
        p: u64,
    ) -> Result<&mut [Entry]> {
        if !self.pinned.contains_key(&p) {
            let page = match self.clean.pop(&p) {
                Some(page) => page,
                None => self.load(storage, l, uuid, p)?,
            };
            self.pinned.insert(p, page);
        }
        Ok(self.pinned.get_mut(&p).expect("just pinned"))
    }

    /// Notes that a batch holding page `p` is being written.
    pub(crate) fn start_write(&mut self, p: u64) {
        *self.writing.entry(p).or_default() += 1;
    }

    /// A batch holding page `p` finished (written or not). `still_dirty`: the page
    /// changed again meanwhile or the write failed; otherwise it may be unpinned once no
    /// other batch holds it.
    pub(crate) fn end_write(&mut self, p: u64, still_dirty: bool) {
        if let Some(n) = self.writing.get_mut(&p) {
            *n -= 1;
            if *n == 0 {
                self.writing.remove(&p);
            }
        }
        if !still_dirty && !self.writing.contains_key(&p) {
            self.unpin(p);
        }
    }

    /// Moves page `p` from the pinned set to the clean cache.
    pub(crate) fn unpin(&mut self, p: u64) {
        if self.virtual_map {
            return;
        }
        if let Some(page) = self.pinned.remove(&p) {
            self.clean.put(p, page);
        }
    }

    /// Keeps at most `n` (at least 1) clean pages in memory.
    pub(crate) fn set_capacity(&mut self, n: usize) {
        self.clean
            .resize(NonZeroUsize::new(n.max(1)).expect("nonzero"));
    }

    /// Pages in memory: (pinned, clean).
    pub(crate) fn resident(&self) -> (usize, usize) {
        (self.pinned.len(), self.clean.len())
    }

    /// Page `p` when it is in memory (without changing its recency).
    pub(crate) fn cached(&self, p: u64) -> Option<&[Entry]> {
        self.pinned
            .get(&p)
            .or_else(|| self.clean.peek(&p))
            .map(|b| &b[..])
    }

    /// Leaves virtual mode (the map is on the disk now): pages only the boot set made
    /// differ are written, so nothing needs pinning any more.
    pub(crate) fn written(&mut self, dirty: &std::collections::BTreeSet<u64>) {
        self.virtual_map = false;
        self.boot = Vec::new();
        let pages: Vec<u64> = self.pinned.keys().copied().collect();
        for p in pages {
            if !dirty.contains(&p) && !self.writing.contains_key(&p) {
                self.unpin(p);
            }
        }
    }
}

#[cfg(test)]
#[path = "pages_tests.rs"]
mod tests;
