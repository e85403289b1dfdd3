//! The metadata store: superblock pair, double-buffered map pages, slot allocator.
//!
//! Durability protocol (see `docs/format.md`):
//! - A map commit first *snapshots* the dirty pages, then syncs the disk (so the data of
//!   every mapping in the snapshot is durable: a mapping is published only after its data
//!   write returned), then writes each page into its older copy, then syncs again.
//!   Commits are serialized, so a copy is never overwritten before the other copy of the
//!   same page is durable: one valid, durable version of every page always survives.
//! - A released slot is *quarantined* until a commit that contains its unmapping has
//!   completed; only then can it be handed out again. A durable map entry therefore never
//!   points at a slot whose contents changed underneath it.
//! - The superblock alternates between its two copies the same way, with a generation
//!   number deciding which copy is current.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::error::{IoContext, RelocError, Result};
use crate::format::{
    decode_page, encode_page, Entry, Layout, Location, PreparePhase, SbDecodeError, State,
    Superblock, BLOCK, ENTRIES_PER_PAGE, SB_MAGIC,
};
use crate::storage::Storage;

/// Encoded pages to write in one commit, and the slots it will release.
#[derive(Debug, Default)]
pub struct PageBatch {
    pages: Vec<(u64, u8, Vec<u8>)>,
    released: Vec<u32>,
}

impl PageBatch {
    /// True when nothing is to be written or released.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty() && self.released.is_empty()
    }

    /// Number of pages in the batch.
    pub fn page_count(&self) -> usize {
        self.pages.len()
    }

    /// Syncs data, writes the pages, syncs again. Call without holding engine locks.
    pub fn write(&self, storage: &dyn Storage, layout: &Layout) -> Result<()> {
        storage
            .sync()
            .ctx(|| "syncing data before map commit".into())?;
        if self.pages.is_empty() {
            return Ok(());
        }
        for (index, copy, bytes) in &self.pages {
            storage
                .write_at(layout.page_addr(*index, *copy), bytes)
                .ctx(|| format!("writing map page {index}"))?;
        }
        storage.sync().ctx(|| "syncing map pages".into())
    }
}

/// In-memory view of a prepared disk's metadata, and the only code that writes it.
pub struct MetaStore {
    storage: Arc<dyn Storage>,
    sb: Superblock,
    sb_copy: u8,
    entries: Vec<Entry>,
    page_copy: Vec<u8>,
    dirty_pages: BTreeSet<u64>,
    next_page_gen: u64,
    free: Vec<u32>,
    quarantine: Vec<u32>,
}

impl std::fmt::Debug for MetaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaStore")
            .field("sb", &self.sb)
            .field("free_slots", &self.free.len())
            .finish_non_exhaustive()
    }
}

/// Reads both superblock copies of a disk of `disk_len` bytes.
fn read_superblocks(storage: &dyn Storage, disk_len: u64) -> Result<Option<(Superblock, u8)>> {
    if disk_len < 2 * BLOCK as u64 {
        return Ok(None);
    }
    let mut found: Option<(Superblock, u8)> = None;
    let mut damaged = Vec::new();
    for k in 0..2u8 {
        let mut b = vec![0u8; BLOCK];
        storage
            .read_at(Layout::sb_addr(disk_len, k), &mut b)
            .ctx(|| "reading superblock".into())?;
        match Superblock::decode(&b) {
            Ok(sb) if sb.layout.disk_len != disk_len => damaged.push(format!(
                "copy {k} was written for a disk of {} bytes, this one has {disk_len}",
                sb.layout.disk_len
            )),
            Ok(sb) => {
                if found
                    .as_ref()
                    .is_none_or(|(f, _)| sb.generation > f.generation)
                {
                    found = Some((sb, k));
                }
            }
            Err(SbDecodeError::NoMagic) => {}
            Err(SbDecodeError::Damaged(why)) => damaged.push(format!("copy {k}: {why}")),
        }
    }
    match found {
        Some(x) => Ok(Some(x)),
        None if damaged.is_empty() => Ok(None),
        None => Err(RelocError::Corrupt(format!(
            "both superblock copies are damaged ({})",
            damaged.join("; ")
        ))),
    }
}

impl MetaStore {
    /// Reads the superblock of `storage` without loading the map. `Ok(None)`: plain disk.
    pub fn probe(storage: &dyn Storage) -> Result<Option<Superblock>> {
        let len = storage.len().ctx(|| "reading disk size".into())?;
        Ok(read_superblocks(storage, len)?.map(|(sb, _)| sb))
    }

    /// Writes a fresh superblock (state `Preparing`, phase `Reserved`) into both copies,
    /// which also extends a regular file to the layout's length. `boot` lists the
    /// boot-set chunks, flagged in the map that [`Self::init_map`] writes.
    ///
    /// The copies are written without their magic and synced first; the magics follow
    /// in a second write. A power cut can tear a write at sector granularity, and a torn
    /// copy that carries the magic would make the disk read as corrupted: this way a copy
    /// either has no magic (the disk is plain) or is whole.
    pub fn create(storage: Arc<dyn Storage>, sb: Superblock, boot: &[u64]) -> Result<Self> {
        let l = sb.layout;
        let one = sb.encode();
        let magic = SB_MAGIC.len();
        let mut both = one.clone();
        both.extend_from_slice(&one);
        both[..magic].fill(0);
        both[BLOCK..BLOCK + magic].fill(0);
        storage
            .write_at(Layout::sb_addr(l.disk_len, 0), &both)
            .ctx(|| "writing superblocks".into())?;
        storage.sync().ctx(|| "syncing superblocks".into())?;
        for k in 0..2 {
            storage
                .write_at(Layout::sb_addr(l.disk_len, k), &one[..magic])
                .ctx(|| "writing superblocks".into())?;
        }
        storage.sync().ctx(|| "syncing superblocks".into())?;
        let mut entries = vec![Entry::MISSING; l.chunk_count() as usize];
        for &c in boot {
            entries[c as usize].boot = true;
        }
        Ok(Self::from_parts(storage, sb, 1, entries))
    }

    fn from_parts(
        storage: Arc<dyn Storage>,
        sb: Superblock,
        sb_copy: u8,
        entries: Vec<Entry>,
    ) -> Self {
        let l = sb.layout;
        let mut used = vec![false; l.slot_count as usize];
        for e in &entries {
            if let Location::Slot(s) = e.loc {
                used[s as usize] = true;
            }
            if let Some(s) = e.saved {
                used[s as usize] = true;
            }
        }
        let free = (0..l.slot_count as u32)
            .rev()
            .filter(|&s| !used[s as usize])
            .collect();
        Self {
            storage,
            sb,
            sb_copy,
            entries,
            page_copy: vec![0; l.map_pages as usize],
            dirty_pages: BTreeSet::new(),
            next_page_gen: 2,
            free,
            quarantine: Vec::new(),
        }
    }

    /// Writes every map page (all entries missing) into copy 0 and records phase
    /// `MapReady` in the superblock.
    pub fn init_map(&mut self) -> Result<()> {
        let l = self.sb.layout;
        let uuid = self.sb.uuid;
        const PAGES_PER_WRITE: u64 = 256;
        let mut i = 0;
        while i < l.map_pages {
            let n = PAGES_PER_WRITE.min(l.map_pages - i);
            // Copies 0 and 1 interleave, so write page copy 0 and a zero copy 1 together.
            let mut buf = Vec::with_capacity((2 * n) as usize * BLOCK);
            for p in i..i + n {
                buf.extend_from_slice(&encode_page(p, 1, &uuid, &self.page_entries(p)));
                buf.extend_from_slice(&[0u8; BLOCK]);
            }
            self.storage
                .write_at(l.page_addr(i, 0), &buf)
                .ctx(|| "initializing map".into())?;
            i += n;
        }
        self.storage.sync().ctx(|| "syncing map".into())?;
        self.page_copy.fill(0);
        self.update_sb(|sb| sb.phase = PreparePhase::MapReady)
    }

    /// Opens the metadata of a prepared disk. `Ok(None)`: a plain disk.
    pub fn open(storage: Arc<dyn Storage>) -> Result<Option<Self>> {
        let len = storage.len().ctx(|| "reading disk size".into())?;
        let Some((sb, sb_copy)) = read_superblocks(storage.as_ref(), len)? else {
            return Ok(None);
        };
        let l = sb.layout;
        let n = l.chunk_count() as usize;
        if sb.state == State::Preparing && sb.phase == PreparePhase::Reserved {
            let mut m = Self::from_parts(storage, sb, sb_copy, vec![Entry::MISSING; n]);
            m.page_copy.fill(1);
            return Ok(Some(m));
        }
        let mut entries = Vec::with_capacity(n);
        let mut page_copy = vec![0u8; l.map_pages as usize];
        let mut max_gen = 1;
        const PAGES_PER_READ: u64 = 256;
        let mut buf = vec![0u8; (2 * PAGES_PER_READ) as usize * BLOCK];
        let mut i = 0;
        while i < l.map_pages {
            let cnt = PAGES_PER_READ.min(l.map_pages - i);
            let bytes = &mut buf[..(2 * cnt) as usize * BLOCK];
            storage
                .read_at(l.page_addr(i, 0), bytes)
                .ctx(|| "reading map".into())?;
            for p in i..i + cnt {
                let want = (n - (p as usize * ENTRIES_PER_PAGE)).min(ENTRIES_PER_PAGE);
                let mut best: Option<(crate::format::DecodedPage, u8)> = None;
                let mut errs = Vec::new();
                for k in 0..2u8 {
                    let at = (2 * (p - i) + k as u64) as usize * BLOCK;
                    match decode_page(&bytes[at..at + BLOCK], p, &sb.uuid, want, l.slot_count) {
                        Ok(d) => {
                            if best
                                .as_ref()
                                .is_none_or(|(b, _)| d.generation > b.generation)
                            {
                                best = Some((d, k));
                            }
                        }
                        Err(e) => errs.push(e),
                    }
                }
                let (page, k) = best.ok_or_else(|| {
                    RelocError::Corrupt(format!(
                        "map page {p} has no valid copy ({})",
                        errs.join("; ")
                    ))
                })?;
                max_gen = max_gen.max(page.generation);
                page_copy[p as usize] = k;
                entries.extend(page.entries);
            }
            i += cnt;
        }
        let mut seen = vec![false; l.slot_count as usize];
        for (c, e) in entries.iter().enumerate() {
            let slots = [
                match e.loc {
                    Location::Slot(s) => Some(s),
                    _ => None,
                },
                e.saved,
            ];
            for s in slots.into_iter().flatten() {
                if std::mem::replace(&mut seen[s as usize], true) {
                    return Err(RelocError::Corrupt(format!(
                        "slot {s} is referenced twice (chunk {c})"
                    )));
                }
            }
        }
        let mut m = Self::from_parts(storage, sb, sb_copy, entries);
        m.page_copy = page_copy;
        m.next_page_gen = max_gen + 1;
        Ok(Some(m))
    }

    /// The current superblock.
    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }
    /// The layout.
    pub fn layout(&self) -> &Layout {
        &self.sb.layout
    }
    /// Lifecycle state.
    pub fn state(&self) -> State {
        self.sb.state
    }
    /// The storage this metadata lives on.
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }
    /// Entry of target chunk `c`.
    pub fn entry(&self, c: u64) -> Entry {
        self.entries[c as usize]
    }
    /// All entries.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Changes the entry of chunk `c` in memory (durable at the next commit). A slot the
    /// entry stops referencing is quarantined.
    pub fn set_entry(&mut self, c: u64, e: Entry) {
        let old = std::mem::replace(&mut self.entries[c as usize], e);
        if old == e {
            return;
        }
        let keeps = |s: u32| e.loc == Location::Slot(s) || e.saved == Some(s);
        if let Location::Slot(s) = old.loc {
            if !keeps(s) {
                self.quarantine.push(s);
            }
        }
        if let Some(s) = old.saved {
            if !keeps(s) {
                self.quarantine.push(s);
            }
        }
        self.dirty_pages.insert(c / ENTRIES_PER_PAGE as u64);
    }

    /// Takes a free slot (never one still referenced by durable metadata).
    pub fn alloc_slot(&mut self) -> Option<u32> {
        self.free.pop()
    }

    /// Returns a slot that was allocated but never published in an entry.
    pub fn free_unpublished(&mut self, s: u32) {
        debug_assert!(!self
            .entries
            .iter()
            .any(|e| e.loc == Location::Slot(s) || e.saved == Some(s)));
        self.free.push(s);
    }

    /// Free slots right now (quarantined ones excluded).
    pub fn free_slots(&self) -> usize {
        self.free.len()
    }
    /// Slots waiting for a commit before they can be reused.
    pub fn quarantined_slots(&self) -> usize {
        self.quarantine.len()
    }
    /// True when some page or quarantined slot awaits a commit.
    pub fn has_pending(&self) -> bool {
        !self.dirty_pages.is_empty() || !self.quarantine.is_empty()
    }

    fn page_entries(&self, p: u64) -> Vec<Entry> {
        let start = p as usize * ENTRIES_PER_PAGE;
        let end = (start + ENTRIES_PER_PAGE).min(self.entries.len());
        self.entries[start..end].to_vec()
    }

    /// Snapshots the dirty pages into a batch (first half of a commit).
    pub fn take_dirty(&mut self) -> PageBatch {
        let uuid = self.sb.uuid;
        let gen = self.next_page_gen;
        self.next_page_gen += 1;
        let pages = std::mem::take(&mut self.dirty_pages)
            .into_iter()
            .map(|p| {
                let copy = 1 - self.page_copy[p as usize];
                (p, copy, encode_page(p, gen, &uuid, &self.page_entries(p)))
            })
            .collect();
        PageBatch {
            pages,
            released: std::mem::take(&mut self.quarantine),
        }
    }

    /// Records a written batch (second half of a commit): pages now live in their new
    /// copies and the batch's quarantined slots become free.
    pub fn finish_batch(&mut self, batch: PageBatch) {
        for (p, copy, _) in batch.pages {
            self.page_copy[p as usize] = copy;
        }
        self.free.extend(batch.released);
    }

    /// Puts a batch that failed to write back: its pages are dirty again and its slots
    /// stay quarantined.
    pub fn abort_batch(&mut self, batch: PageBatch) {
        self.dirty_pages
            .extend(batch.pages.iter().map(|(p, _, _)| *p));
        self.quarantine.extend(batch.released);
    }

    /// A whole commit for single-threaded callers: snapshot, sync data, write pages,
    /// sync.
    pub fn commit(&mut self) -> Result<()> {
        if !self.has_pending() {
            return Ok(());
        }
        let batch = self.take_dirty();
        match batch.write(self.storage.as_ref(), &self.sb.layout) {
            Ok(()) => {
                self.finish_batch(batch);
                Ok(())
            }
            Err(e) => {
                self.abort_batch(batch);
                Err(e)
            }
        }
    }

    /// Applies `f` to a copy of the superblock and writes it durably into the older copy.
    /// Pending map changes are committed first, so the superblock never runs ahead of
    /// the map it describes.
    pub fn update_sb(&mut self, f: impl FnOnce(&mut Superblock)) -> Result<()> {
        self.commit()?;
        let mut sb = self.sb.clone();
        f(&mut sb);
        sb.generation += 1;
        let copy = 1 - self.sb_copy;
        self.storage
            .write_at(Layout::sb_addr(sb.layout.disk_len, copy), &sb.encode())
            .ctx(|| "writing superblock".into())?;
        self.storage.sync().ctx(|| "syncing superblock".into())?;
        self.sb = sb;
        self.sb_copy = copy;
        Ok(())
    }

    /// Durably moves to `state`.
    pub fn set_state(&mut self, state: State) -> Result<()> {
        self.update_sb(|sb| sb.state = state)
    }
}
