//! The metadata store: superblock pair, mirrored map pages, slot allocator.
//!
//! Durability protocol (see `docs/format.md`):
//! - A map commit first *snapshots* the dirty pages, then syncs the disk (so the data of
//!   every mapping in the snapshot is durable: a mapping is published only after its data
//!   write returned), then writes each page into copy 0, syncs, into copy 1, syncs.
//!   A commit is acknowledged only when both copies hold it, so when one copy fails its
//!   checksum later the other one is *current*, never an older version: the older copy
//!   is used only when it is proven current this way (see [`MetaStore::open`]).
//! - A released slot is *quarantined* until a commit that contains its unmapping has
//!   completed; only then can it be handed out again. A durable map entry therefore never
//!   points at a slot whose contents changed underneath it.
//! - The superblock is written the same way: copy 0, sync, copy 1, sync, both with the
//!   same generation. A pair found out of step (a crash between the two writes) is
//!   brought in step by `open` before anything acts on it.
//! - A superblock is ours only when its MAC verifies under the host key
//!   ([`crate::hostkey`]); anything else at the end of a disk is guest data.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bitvec::prelude::{BitVec, Lsb0};
use parking_lot::Mutex;

use crate::error::{IoContext, RelocError, Result};
use crate::format::{
    encode_page, Entry, Layout, PreparePhase, SbDecodeError, State, Superblock, BLOCK,
    ENTRIES_PER_PAGE, GROWTH_AT, GROWTH_LEN, SB_MAGIC,
};
use crate::hostkey::HostKey;
use crate::pages::{decode_at, read_raw, slots_of, MapCounts, MapPages, SlotBits};
use crate::storage::Storage;

/// Encoded pages to write in one commit, and the slots it will release.
#[derive(Debug, Default)]
pub struct PageBatch {
    pages: Vec<(u64, Vec<u8>)>,
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

    /// Syncs data, writes the pages into copy 0, syncs, into copy 1, syncs. Call
    /// without holding engine locks.
    pub fn write(&self, storage: &dyn Storage, layout: &Layout) -> Result<()> {
        storage
            .sync()
            .ctx(|| "syncing data before map commit".into())?;
        if self.pages.is_empty() {
            return Ok(());
        }
        for copy in 0..2u8 {
            for (index, bytes) in &self.pages {
                storage
                    .write_at(layout.page_addr(*index, copy), bytes)
                    .ctx(|| format!("writing map page {index}"))?;
            }
            storage.sync().ctx(|| "syncing map pages".into())?;
        }
        Ok(())
    }
}

/// In-memory view of a prepared disk's metadata, and the only code that writes it.
///
/// Map pages are read on demand into a bounded cache (see [`crate::pages`]); memory
/// does not grow with the target's size, only with the slots (one bit each).
pub struct MetaStore {
    storage: Arc<dyn Storage>,
    key: HostKey,
    sb: Superblock,
    map: Mutex<MapPages>,
    counts: MapCounts,
    pub(crate) dirty_pages: BTreeSet<u64>,
    pub(crate) next_page_gen: u64,
    free: SlotBits,
    quarantine: Vec<u32>,
}

/// What a pass over a map found: slots in use, counts, and pages to rewrite.
pub(crate) struct MapScan {
    pub(crate) used: BitVec<u64, Lsb0>,
    pub(crate) counts: MapCounts,
    pub(crate) stale: Vec<u64>,
    pub(crate) max_gen: u64,
    /// No map on disk: every entry is missing.
    pub(crate) virtual_map: bool,
}

impl MapScan {
    /// The scan of a map not written yet (all missing).
    pub(crate) fn empty(l: &Layout) -> Self {
        Self {
            used: BitVec::repeat(false, l.slot_count as usize),
            counts: MapCounts::all_missing(l),
            stale: Vec::new(),
            max_gen: 1,
            virtual_map: true,
        }
    }
}

impl std::fmt::Debug for MetaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaStore")
            .field("sb", &self.sb)
            .field("free_slots", &self.free.count())
            .finish_non_exhaustive()
    }
}

/// What the two superblock copies of a disk say.
pub(crate) struct SbScan {
    /// The current superblock, and whether both copies hold it.
    pub(crate) current: Option<(Superblock, bool)>,
    /// Copies with a magic that are not ours (guest data, another host's, format v1).
    pub(crate) foreign: Vec<String>,
}

static WARNED_FOREIGN: AtomicBool = AtomicBool::new(false);

/// Reads both superblock copies of a disk of `disk_len` bytes.
pub(crate) fn read_superblocks(
    storage: &dyn Storage,
    disk_len: u64,
    key: Option<&HostKey>,
) -> Result<SbScan> {
    let mut scan = SbScan {
        current: None,
        foreign: Vec::new(),
    };
    if disk_len < 2 * BLOCK as u64 {
        return Ok(scan);
    }
    let mut ours: [Option<Superblock>; 2] = [None, None];
    let mut unusable = Vec::new();
    for k in 0..2u8 {
        let mut b = vec![0u8; BLOCK];
        storage
            .read_at(Layout::sb_addr(disk_len, k), &mut b)
            .ctx(|| "reading superblock".into())?;
        match Superblock::decode(&b, key) {
            Ok(sb) if sb.layout.disk_len != disk_len => unusable.push(format!(
                "copy {k} was written for a disk of {} bytes, this one has {disk_len}",
                sb.layout.disk_len
            )),
            Ok(sb) => ours[k as usize] = Some(sb),
            Err(SbDecodeError::NoMagic) => {
                // The body of an interrupted prepare's first write (its magic follows).
                ours[k as usize] = key
                    .and_then(|key| Superblock::decode_body_without_magic(&b, key))
                    .filter(|sb| {
                        sb.layout.disk_len == disk_len
                            && sb.state == State::Preparing
                            && sb.phase == PreparePhase::Reserved
                    });
            }
            Err(SbDecodeError::Invalid(why)) => unusable.push(format!("copy {k}: {why}")),
            Err(SbDecodeError::Damaged(why)) => scan.foreign.push(format!("copy {k}: {why}")),
            Err(SbDecodeError::Legacy) => scan
                .foreign
                .push(format!("copy {k}: format v1 (unauthenticated)")),
            Err(SbDecodeError::Unverified) => scan.foreign.push(format!(
                "copy {k}: MAC does not verify under this host's key"
            )),
        }
    }
    let [a, b] = ours;
    scan.current = match (a, b) {
        (Some(a), Some(b)) if a == b => Some((a, true)),
        (Some(a), Some(b)) => Some((if a.generation >= b.generation { a } else { b }, false)),
        (Some(x), None) | (None, Some(x)) => Some((x, false)),
        (None, None) if !unusable.is_empty() => {
            return Err(RelocError::Corrupt(format!(
                "no usable superblock copy ({})",
                unusable.join("; ")
            )))
        }
        (None, None) => None,
    };
    if scan.current.is_none()
        && !scan.foreign.is_empty()
        && !WARNED_FOREIGN.swap(true, Ordering::Relaxed)
    {
        tracing::warn!(
            "ignoring streamboot-like bytes at the end of the disk ({}): they do not verify \
             under this host's key ({}), so they are guest data and the disk is plain. A disk \
             prepared on another host needs that host's key; one prepared before format v2 \
             must be adopted explicitly",
            scan.foreign.join("; "),
            HostKey::path().display()
        );
    }
    Ok(scan)
}

impl MetaStore {
    /// Reads the superblock of `storage` without loading the map. `Ok(None)`: plain disk
    /// (no superblock this host's key verifies). The key comes from [`HostKey::load`].
    pub fn probe(storage: &dyn Storage) -> Result<Option<Superblock>> {
        Self::probe_with_key(storage, HostKey::load()?.as_ref())
    }

    /// [`Self::probe`] with an explicit key (`None`: no key, nothing verifies).
    pub fn probe_with_key(
        storage: &dyn Storage,
        key: Option<&HostKey>,
    ) -> Result<Option<Superblock>> {
        let len = storage.len().ctx(|| "reading disk size".into())?;
        Ok(read_superblocks(storage, len, key)?
            .current
            .map(|(sb, _)| sb))
    }

    /// On a disk that reads as plain, what was found and ignored at the end of it (copies
    /// with a magic that this host's key does not verify: guest data, another host's
    /// disk, format v1), for a hint in `status`. Empty on a prepared disk.
    pub fn unverified_superblocks(storage: &dyn Storage) -> Result<Vec<String>> {
        let len = storage.len().ctx(|| "reading disk size".into())?;
        let scan = read_superblocks(storage, len, HostKey::load()?.as_ref())?;
        Ok(match scan.current {
            Some(_) => Vec::new(),
            None => scan.foreign,
        })
    }

    /// Writes a fresh superblock (state `Preparing`, phase `Reserved`) into both copies,
    /// which also extends a regular file to the layout's length. `boot` lists the
    /// boot-set chunks, flagged in the map that [`Self::init_map`] writes. The host key
    /// is created if this host has none yet.
    ///
    /// The copies are written without their magic and synced first; the magics follow
    /// in a second write. A power cut can tear a write at sector granularity, and a torn
    /// copy that carries the magic would not verify: this way a copy either has no magic
    /// or is whole. A body without its magic still verifies (MAC), so `open` recognises
    /// an interrupted first write and the area can be removed (the file truncated back).
    pub fn create(storage: Arc<dyn Storage>, sb: Superblock, boot: &[u64]) -> Result<Self> {
        Self::create_with_key(storage, HostKey::load_or_create()?, sb, boot)
    }

    /// [`Self::create`] with an explicit key.
    pub fn create_with_key(
        storage: Arc<dyn Storage>,
        key: HostKey,
        sb: Superblock,
        boot: &[u64],
    ) -> Result<Self> {
        let l = sb.layout;
        let one = sb.encode(&key);
        let magic = SB_MAGIC.len();
        let mut body = one.clone();
        body[..magic].fill(0);
        // A regular file first gets its final length from one sector, the growth record
        // (see `crate::growth`): a crash leaves the old length or a record naming it.
        if !storage.is_block_device() {
            storage
                .write_at(l.disk_len - GROWTH_LEN as u64, &one[GROWTH_AT..])
                .ctx(|| "extending the disk file".into())?;
            storage.sync().ctx(|| "syncing the disk file".into())?;
        }
        for k in [1, 0] {
            storage
                .write_at(Layout::sb_addr(l.disk_len, k), &body)
                .ctx(|| "writing superblocks".into())?;
        }
        storage.sync().ctx(|| "syncing superblocks".into())?;
        for k in 0..2 {
            storage
                .write_at(Layout::sb_addr(l.disk_len, k), &one[..magic])
                .ctx(|| "writing superblocks".into())?;
        }
        storage.sync().ctx(|| "syncing superblocks".into())?;
        let m = Self::from_parts(storage, key, sb, MapScan::empty(&l));
        let mut boot = boot.to_vec();
        boot.sort_unstable();
        boot.dedup();
        m.map.lock().boot = boot;
        Ok(m)
    }

    pub(crate) fn from_parts(
        storage: Arc<dyn Storage>,
        key: HostKey,
        sb: Superblock,
        scan: MapScan,
    ) -> Self {
        let mut map = MapPages::new(scan.virtual_map);
        if let Some(n) = test_page_cache_pages() {
            map.set_capacity(n);
        }
        Self {
            storage,
            key,
            sb,
            map: Mutex::new(map),
            counts: scan.counts,
            dirty_pages: BTreeSet::new(),
            next_page_gen: scan.max_gen + 1,
            free: SlotBits::from_used(scan.used),
            quarantine: Vec::new(),
        }
    }

    /// Writes every map page (all entries missing) into both copies and records phase
    /// `MapReady` in the superblock.
    pub fn init_map(&mut self) -> Result<()> {
        let l = self.sb.layout;
        let uuid = self.sb.uuid;
        const PAGES_PER_WRITE: u64 = 256;
        let mut i = 0;
        while i < l.map_pages {
            let n = PAGES_PER_WRITE.min(l.map_pages - i);
            // Copies 0 and 1 interleave: write both copies of n pages together (nothing
            // refers to the map before the superblock's phase says it is ready).
            let mut buf = Vec::with_capacity((2 * n) as usize * BLOCK);
            for p in i..i + n {
                let page = encode_page(p, 1, &uuid, &self.page_entries(p)?);
                buf.extend_from_slice(&page);
                buf.extend_from_slice(&page);
            }
            self.storage
                .write_at(l.page_addr(i, 0), &buf)
                .ctx(|| "initializing map".into())?;
            i += n;
        }
        self.storage.sync().ctx(|| "syncing map".into())?;
        self.map.get_mut().written(&self.dirty_pages);
        self.update_sb(|sb| sb.phase = PreparePhase::MapReady)
    }

    /// Opens the metadata of a prepared disk. `Ok(None)`: a plain disk (no superblock
    /// this host's key verifies: see [`HostKey::load`]).
    ///
    /// A copy (superblock or map page) that fails its checks is replaced by the other
    /// one, which the write protocol proves current; on a writable disk both copies are
    /// made equal again before this returns, so nothing ever acts on a state that only
    /// one copy holds.
    pub fn open(storage: Arc<dyn Storage>) -> Result<Option<Self>> {
        match HostKey::load()? {
            Some(key) => Self::open_with_key(storage, key),
            None => {
                // Without a key nothing verifies; still note foreign bytes for the log.
                let len = storage.len().ctx(|| "reading disk size".into())?;
                read_superblocks(storage.as_ref(), len, None)?;
                Ok(None)
            }
        }
    }

    /// [`Self::open`] with an explicit key.
    pub fn open_with_key(storage: Arc<dyn Storage>, key: HostKey) -> Result<Option<Self>> {
        let len = storage.len().ctx(|| "reading disk size".into())?;
        let Some((sb, in_sync)) = read_superblocks(storage.as_ref(), len, Some(&key))?.current
        else {
            return Ok(None);
        };
        // No map yet (reserved), or none needed any more: a v3 rollback that reached
        // `rolled-back` only removes the area, whose zeroing takes the map away first.
        let no_map = (sb.state == State::Preparing && sb.phase == PreparePhase::Reserved)
            || (sb.state == State::RolledBack && sb.release.area_end != 0);
        if no_map {
            let empty = MapScan::empty(&sb.layout);
            return Ok(Some(Self::from_parts(storage, key, sb, empty)));
        }
        let mut scan = read_map(storage.as_ref(), &sb)?;
        let stale = std::mem::take(&mut scan.stale);
        let mut m = Self::from_parts(storage, key, sb, scan);
        if (!in_sync || !stale.is_empty()) && m.storage.is_writable() {
            m.dirty_pages.extend(stale);
            m.commit()?;
            if !in_sync {
                m.write_sb(m.sb.clone())?;
            }
        }
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
    /// Entry of target chunk `c` (its map page is read from the disk when it is not in
    /// memory).
    pub fn entry(&self, c: u64) -> Result<Entry> {
        let p = c / ENTRIES_PER_PAGE as u64;
        let mut map = self.map.lock();
        let page = map.page(self.storage.as_ref(), &self.sb.layout, &self.sb.uuid, p)?;
        Ok(page[(c % ENTRIES_PER_PAGE as u64) as usize])
    }

    /// Keeps at most `n` clean map pages in memory (default [`crate::PAGE_CACHE_PAGES`]);
    /// pages changed since their last commit are kept whatever the bound.
    pub fn set_page_cache_pages(&mut self, n: usize) {
        self.map.get_mut().set_capacity(n);
    }

    /// Map pages in memory: (pinned until a commit writes them, clean).
    pub fn resident_pages(&self) -> (usize, usize) {
        self.map.lock().resident()
    }

    /// Chunks of each kind.
    pub fn counts(&self) -> MapCounts {
        self.counts
    }

    /// Calls `f` with every chunk's entry in order, reading the map pages that are not
    /// in memory in large reads without caching them. `f` runs under the page cache's
    /// lock: it must not call back into this store.
    pub fn scan(&self, mut f: impl FnMut(u64, Entry)) -> Result<()> {
        const PAGES_PER_READ: u64 = 256;
        let l = self.sb.layout;
        let mut buf = Vec::new();
        let mut i = 0;
        while i < l.map_pages {
            let cnt = PAGES_PER_READ.min(l.map_pages - i);
            let mut map = self.map.lock();
            let all_cached = (i..i + cnt).all(|p| map.cached(p).is_some());
            if !all_cached && !map.virtual_map {
                read_raw(self.storage.as_ref(), &l, i, cnt, &mut buf)?;
            }
            for p in i..i + cnt {
                let first = p * ENTRIES_PER_PAGE as u64;
                let from_disk;
                let entries: &[Entry] = match map.cached(p) {
                    Some(e) => e,
                    None if map.virtual_map => {
                        map.page(self.storage.as_ref(), &l, &self.sb.uuid, p)?;
                        map.cached(p).expect("just cached")
                    }
                    None => {
                        from_disk = decode_at(&buf, i, p, &l, &self.sb.uuid)?.0.entries;
                        &from_disk
                    }
                };
                for (k, e) in entries.iter().enumerate() {
                    f(first + k as u64, *e);
                }
            }
            drop(map);
            i += cnt;
        }
        Ok(())
    }

    /// The chunks `f` selects, in order (a [`Self::scan`]).
    pub fn chunks_where(&self, mut f: impl FnMut(&Entry) -> bool) -> Result<Vec<u64>> {
        let mut v = Vec::new();
        self.scan(|c, e| {
            if f(&e) {
                v.push(c)
            }
        })?;
        Ok(v)
    }

    /// Changes the entry of chunk `c` in memory (durable at the next commit). A slot the
    /// entry stops referencing is quarantined.
    pub fn set_entry(&mut self, c: u64, e: Entry) -> Result<()> {
        let p = c / ENTRIES_PER_PAGE as u64;
        let l = self.sb.layout;
        // An unchanged entry leaves its page as it is (not pinned).
        if self.entry(c)? == e {
            return Ok(());
        }
        let page = self
            .map
            .get_mut()
            .page_mut(self.storage.as_ref(), &l, &self.sb.uuid, p)?;
        let old = std::mem::replace(&mut page[(c % ENTRIES_PER_PAGE as u64) as usize], e);
        let keeps = |s: u32| slots_of(&e).any(|k| k == s);
        for s in slots_of(&old) {
            if !keeps(s) {
                self.quarantine.push(s);
            }
        }
        self.counts.change(&l, c, &old, &e);
        self.dirty_pages.insert(p);
        Ok(())
    }

    /// Takes a free slot (never one still referenced by durable metadata).
    pub fn alloc_slot(&mut self) -> Option<u32> {
        self.free.alloc()
    }

    /// Returns a slot that was allocated but never published in an entry.
    pub fn free_unpublished(&mut self, s: u32) {
        debug_assert!(!self.free.is_free(s));
        self.free.release(s);
    }

    /// Free slots right now (quarantined ones excluded).
    pub fn free_slots(&self) -> usize {
        self.free.count()
    }
    /// Slots waiting for a commit before they can be reused.
    pub fn quarantined_slots(&self) -> usize {
        self.quarantine.len()
    }
    /// Map pages changed since the last commit took them (kept in memory until written).
    pub fn dirty_page_count(&self) -> usize {
        self.dirty_pages.len()
    }
    /// True when some page or quarantined slot awaits a commit.
    pub fn has_pending(&self) -> bool {
        !self.dirty_pages.is_empty() || !self.quarantine.is_empty()
    }

    fn page_entries(&self, p: u64) -> Result<Vec<Entry>> {
        let mut map = self.map.lock();
        Ok(map
            .page(self.storage.as_ref(), &self.sb.layout, &self.sb.uuid, p)?
            .to_vec())
    }

    /// Snapshots the dirty pages into a batch (first half of a commit). The pages stay
    /// in memory until [`Self::finish_batch`] or [`Self::abort_batch`]. Fails (changing
    /// nothing) only when a dirty page that is not in memory cannot be read back.
    pub fn take_dirty(&mut self) -> Result<PageBatch> {
        let uuid = self.sb.uuid;
        let gen = self.next_page_gen;
        let mut pages = Vec::with_capacity(self.dirty_pages.len());
        for &p in &self.dirty_pages {
            pages.push((p, encode_page(p, gen, &uuid, &self.page_entries(p)?)));
        }
        self.next_page_gen += 1;
        self.dirty_pages.clear();
        let map = self.map.get_mut();
        for (p, _) in &pages {
            map.start_write(*p);
        }
        Ok(PageBatch {
            pages,
            released: std::mem::take(&mut self.quarantine),
        })
    }

    /// Records a written batch (second half of a commit): the batch's quarantined slots
    /// become free and its pages may leave memory unless they changed again.
    pub fn finish_batch(&mut self, batch: PageBatch) {
        let map = self.map.get_mut();
        for (p, _) in &batch.pages {
            map.end_write(*p, self.dirty_pages.contains(p));
        }
        for s in batch.released {
            self.free.release(s);
        }
    }

    /// Puts a batch that failed to write back: its pages are dirty again and its slots
    /// stay quarantined.
    pub fn abort_batch(&mut self, batch: PageBatch) {
        let map = self.map.get_mut();
        for (p, _) in &batch.pages {
            map.end_write(*p, true);
            self.dirty_pages.insert(*p);
        }
        self.quarantine.extend(batch.released);
    }

    /// A whole commit for single-threaded callers: snapshot, sync data, write pages,
    /// sync.
    pub fn commit(&mut self) -> Result<()> {
        if !self.has_pending() {
            return Ok(());
        }
        let batch = self.take_dirty()?;
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

    /// Applies `f` to a copy of the superblock and writes it durably into both copies.
    /// Pending map changes are committed first, so the superblock never runs ahead of
    /// the map it describes.
    pub fn update_sb(&mut self, f: impl FnOnce(&mut Superblock)) -> Result<()> {
        self.commit()?;
        let mut sb = self.sb.clone();
        f(&mut sb);
        sb.generation += 1;
        self.write_sb(sb)
    }

    /// Writes `sb` into copy 0, syncs, into copy 1, syncs: a torn write leaves the other
    /// copy whole, and once this returns both copies hold `sb`.
    fn write_sb(&mut self, sb: Superblock) -> Result<()> {
        let bytes = sb.encode(&self.key);
        for copy in 0..2u8 {
            self.storage
                .write_at(Layout::sb_addr(sb.layout.disk_len, copy), &bytes)
                .ctx(|| "writing superblock".into())?;
            self.storage.sync().ctx(|| "syncing superblock".into())?;
        }
        self.sb = sb;
        Ok(())
    }

    /// Durably moves to `state`.
    pub fn set_state(&mut self, state: State) -> Result<()> {
        self.update_sb(|sb| sb.state = state)
    }
}

/// Debug builds only: `STREAMBOOT_TEST_MAP_CACHE_PAGES=N` bounds the clean map pages in
/// memory to N, so that crash tests of the real binary run with a map larger than the
/// page cache (pages evicted and read back while it is killed). Release builds ignore it.
fn test_page_cache_pages() -> Option<usize> {
    if !cfg!(debug_assertions) {
        return None;
    }
    std::env::var("STREAMBOOT_TEST_MAP_CACHE_PAGES")
        .ok()?
        .parse()
        .ok()
}

/// Reads the whole map of `sb` once, page by page: slots in use (a slot referenced twice
/// is corruption), counts, the pages whose two copies differ (to rewrite), and the
/// highest page generation seen. Memory: one bit per slot.
pub(crate) fn read_map(storage: &dyn Storage, sb: &Superblock) -> Result<MapScan> {
    let l = sb.layout;
    let mut scan = MapScan::empty(&l);
    scan.virtual_map = false;
    scan.counts = MapCounts::default();
    const PAGES_PER_READ: u64 = 256;
    let mut buf = Vec::new();
    let mut i = 0;
    while i < l.map_pages {
        let cnt = PAGES_PER_READ.min(l.map_pages - i);
        read_raw(storage, &l, i, cnt, &mut buf)?;
        for p in i..i + cnt {
            let (page, stale) = decode_at(&buf, i, p, &l, &sb.uuid)?;
            if stale {
                scan.stale.push(p);
            }
            scan.max_gen = scan.max_gen.max(page.generation);
            let first = p * ENTRIES_PER_PAGE as u64;
            for (k, e) in page.entries.iter().enumerate() {
                let c = first + k as u64;
                scan.counts.missing += 1;
                scan.counts.change(&l, c, &Entry::MISSING, e);
                for s in slots_of(e) {
                    if scan.used.replace(s as usize, true) {
                        return Err(RelocError::Corrupt(format!(
                            "slot {s} is referenced twice (chunk {c})"
                        )));
                    }
                }
            }
        }
        i += cnt;
    }
    Ok(scan)
}
