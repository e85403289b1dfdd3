//! The streaming engine: presents the target image of a prepared disk.
//!
//! A read of chunk `c` is served from home, its slot, zeros, or — when missing — fetched
//! from the remote source (single-flight; alone, or with a readahead window when it
//! continues a sequential stream), stored in a free slot, mapped and then served. Writes go to the chunk's slot (a partial write to a
//! missing chunk fetches it first; a whole-chunk write does not) and mark it dirty.
//! [`Engine::flush`] makes every acknowledged write and the map entries it needs durable.
//!
//! Concurrency: chunk data I/O runs under a shared *stripe* lock of the chunk (a fixed
//! array of RW locks indexed by chunk number); anything that changes where a chunk lives
//! (publish, evict, move home) takes the stripe exclusively. The metadata mutex is only
//! held for in-memory updates, never across disk or network I/O. Lock order: in-flight
//! table → stripe → metadata; eviction only *tries* stripe locks, so it cannot deadlock.

mod cache;
mod commit;
mod fetch;
mod flight;
mod hydrate;
mod readahead;
mod stats;
mod zero;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bitvec::prelude::{BitVec, Lsb0};
use boot_relocator::{Entry, Layout, Location, MapCounts, MetaStore, RelocError, State, Storage};
use parking_lot::{Mutex, RwLock};

use crate::blockdev::{
    check_range, read_storage, write_storage, BlockBackend, BlockError, GuestBuf, GuestBufMut,
};
use crate::source::{CancellationToken, RemoteSource};

pub use flight::{ChunkIdx, FetchKind, FlightResult};
pub use hydrate::{HydrateOptions, HydrateReport, Hydrator, RateLimit};
pub use stats::{Counters, HistogramSnapshot, LatencySnapshot, Status, LATENCY_BUCKETS};

use flight::InFlight;

/// Number of stripe locks (power of two).
const STRIPES: usize = 1024;

/// Errors of engine-level operations (not per-request I/O).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Metadata or relocation failed.
    #[error(transparent)]
    Reloc(#[from] RelocError),
    /// A request failed.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// The disk is not in a state that allows this.
    #[error("{0}")]
    State(String),
    /// The remote image does not match the one pinned at prepare.
    #[error("remote image does not match the pinned target: {0}")]
    Mismatch(String),
}

/// Tunables of the engine.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// The largest readahead window: a guest miss fetches just its chunk unless it
    /// continues a sequential stream, whose window (missing chunks fetched with the
    /// asked one) doubles per miss up to this.
    pub demand_fetch_bytes: u64,
    /// Commit the map after this many bytes of fetched chunks were published without a
    /// flush. Clean fetched chunks lost in a crash are only fetched again, so this bounds
    /// re-download work, not data safety.
    pub commit_every_bytes: u64,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            demand_fetch_bytes: 8 << 20,
            commit_every_bytes: 256 << 20,
        }
    }
}

pub(crate) struct Meta {
    pub(crate) store: MetaStore,
    /// Clean slotted chunks in recency order; `None` when the area fits the whole target
    /// (nothing is ever evicted then).
    pub(crate) lru: Option<lru::LruCache<u64, ()>>,
}

/// The engine over one prepared disk.
pub struct Engine {
    storage: Arc<dyn Storage>,
    layout: Layout,
    source: Arc<dyn RemoteSource>,
    pub(crate) meta: Mutex<Meta>,
    /// One bit per chunk: not missing. Mirrors the map for lock-free `is_local` checks
    /// on the request path (a hint for scheduling; the map stays the truth).
    local: BitVec<AtomicU64, Lsb0>,
    stripes: Box<[RwLock<()>]>,
    inflight: InFlight,
    /// Recent sequential guest streams (readahead windows).
    streams: Mutex<readahead::Streams>,
    commit_lock: Mutex<()>,
    /// Fetches to home instead of slots (set once commit started).
    to_home: AtomicBool,
    /// Set when the released area has been removed (after commit): metadata is gone.
    finished: AtomicBool,
    /// True once the engine was retired (rollback): background work must not write to
    /// the disk any more. Writers hold it shared for their whole write.
    retired: RwLock<bool>,
    read_only: bool,
    opts: EngineOptions,
    /// Chunks published since the last map commit.
    unflushed: AtomicU64,
    /// Guest requests currently waiting on the network (the hydrator yields to them).
    pub(crate) demand_waiting: AtomicU64,
    pub(crate) counters: Counters,
    /// The last fetch that failed (after the source's own retries), for status.
    last_fetch_error: Mutex<Option<String>>,
    /// Records the chunks guest reads touch (`serve --record-profile`).
    recorder: Option<Arc<crate::profile::Recorder>>,
    /// Cancellation of fetches: guest requests (demand) and background work (hydration,
    /// commit). Cancelling replaces the token, so later fetches run normally.
    cancel: Mutex<Cancels>,
}

struct Cancels {
    demand: CancellationToken,
    background: CancellationToken,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Opens the engine over prepared metadata. `source` must be the pinned target.
    pub fn new(
        meta: MetaStore,
        source: Arc<dyn RemoteSource>,
        opts: EngineOptions,
    ) -> Result<Self, EngineError> {
        let sb = meta.superblock().clone();
        if !sb.state.serves_target() {
            return Err(EngineError::State(format!(
                "disk is in state {}; the target can only be served in states prepared, trial, \
                 confirmed or committing",
                sb.state
            )));
        }
        let id = source.identity();
        if id.size != sb.layout.target_size || id.validator != sb.target.validator {
            return Err(EngineError::Mismatch(format!(
                "pinned {} bytes, validator {}; source has {} bytes, validator {}",
                sb.layout.target_size, sb.target.validator, id.size, id.validator
            )));
        }
        let layout = sb.layout;
        let chunks = layout.chunk_count();
        let saved = meta.counts().saved;
        let mut lru = (layout.slot_count < chunks + saved).then(lru::LruCache::unbounded);
        let local: BitVec<AtomicU64, Lsb0> = BitVec::repeat(false, chunks as usize);
        meta.scan(|c, e| {
            if e.loc != Location::Missing {
                local.set_aliased(c as usize, true);
            }
            if let (Location::Slot(_), false, Some(l)) = (e.loc, e.dirty, lru.as_mut()) {
                l.put(c, ());
            }
        })?;
        Ok(Self {
            local,
            storage: meta.storage().clone(),
            layout,
            source,
            to_home: AtomicBool::new(sb.state == State::Committing),
            meta: Mutex::new(Meta { store: meta, lru }),
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
            inflight: InFlight::default(),
            streams: Mutex::new(readahead::Streams::default()),
            commit_lock: Mutex::new(()),
            finished: AtomicBool::new(false),
            retired: RwLock::new(false),
            read_only: false,
            opts,
            unflushed: AtomicU64::new(0),
            demand_waiting: AtomicU64::new(0),
            counters: Counters::default(),
            last_fetch_error: Mutex::new(None),
            recorder: None,
            cancel: Mutex::new(Cancels {
                demand: CancellationToken::new(),
                background: CancellationToken::new(),
            }),
        })
    }

    /// Makes the engine refuse writes.
    pub fn set_read_only(&mut self, ro: bool) {
        self.read_only = ro;
    }

    /// Records the chunks guest reads touch into `r` (a boot profile).
    pub fn set_recorder(&mut self, r: Arc<crate::profile::Recorder>) {
        self.recorder = Some(r);
    }

    /// The disk layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }
    /// The remote source.
    pub fn source(&self) -> &Arc<dyn RemoteSource> {
        &self.source
    }
    /// Counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }
    /// The error of the last fetch that failed, if any did: the guest got an I/O error
    /// for the reads that needed it.
    pub fn last_fetch_error(&self) -> Option<String> {
        self.last_fetch_error.lock().clone()
    }
    /// Current lifecycle state.
    pub fn state(&self) -> State {
        self.meta.lock().store.state()
    }
    /// True once commit removed the released area.
    pub fn is_finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
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

    /// True when chunk `c` is missing (from the presence bitmap, under the metadata
    /// lock so that it agrees with the map).
    pub(crate) fn is_missing(&self, c: u64) -> bool {
        let _m = self.meta.lock();
        !self.local[c as usize]
    }

    pub(crate) fn stripe(&self, c: u64) -> &RwLock<()> {
        &self.stripes[(c as usize) & (STRIPES - 1)]
    }

    fn chunk_size(&self) -> u64 {
        self.layout.chunk_size()
    }

    /// Applies `f` to the metadata store (in memory only).
    pub fn with_meta<R>(&self, f: impl FnOnce(&mut MetaStore) -> R) -> R {
        f(&mut self.meta.lock().store)
    }

    /// A snapshot of the migration's state and counters.
    pub fn status(&self) -> Status {
        let m = self.meta.lock();
        let sb = m.store.superblock();
        let mut s = Status {
            state: sb.state.to_string(),
            chunk_size: self.layout.chunk_size(),
            target_size: self.layout.target_size,
            source_size: self.layout.source_size,
            chunks_total: self.layout.chunk_count(),
            slots_total: self.layout.slot_count,
            slots_free: m.store.free_slots() as u64,
            start_counter: sb.start_counter,
            max_trial_starts: sb.max_trial_starts,
            target_kind: sb.target.kind.clone(),
            target_validator: sb.target.validator.clone(),
            target_urls: crate::target::shown_urls(&sb.target.urls),
            ..Status::default()
        };
        let sb_seeded = sb.seeded_bytes;
        tally(&mut s, &m.store.counts());
        drop(m);
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        s.bytes_fetched_demand = get(&c.fetched_demand);
        s.bytes_fetched_background = get(&c.fetched_background);
        s.bytes_seeded = sb_seeded + get(&c.seeded);
        s.fetch_requests = get(&c.fetch_requests);
        s.fetch_errors = get(&c.fetch_errors);
        s.evictions = get(&c.evictions);
        let fr = get(&c.first_read_us);
        s.first_read_ms = (fr > 0).then(|| fr as f64 / 1000.0);
        s.uptime_secs = c.uptime_secs();
        s.start_time_secs = c.start_time_secs();
        s.latency = c.latency.snapshot();
        s
    }

    /// Where chunk `c` is now (and, for a clean slot, marks it recently used).
    fn locate(&self, c: u64) -> Result<Entry, BlockError> {
        let mut m = self.meta.lock();
        let e = m.store.entry(c).map_err(meta_io)?;
        if let (Location::Slot(_), false, Some(lru)) = (e.loc, e.dirty, m.lru.as_mut()) {
            lru.get(&c);
        }
        Ok(e)
    }

    /// Disk address of chunk `c`'s bytes at `loc`.
    fn addr(&self, c: u64, loc: Location) -> u64 {
        match loc {
            Location::Home => c << self.layout.chunk_shift,
            Location::Slot(s) => self.layout.slot_addr(s),
            _ => unreachable!("no address for {loc:?}"),
        }
    }

    /// Splits the byte range `offset..offset+len` at chunk boundaries: yields (chunk,
    /// offset inside the chunk, range of the caller's buffer).
    fn pieces(
        &self,
        offset: u64,
        len: usize,
    ) -> impl Iterator<Item = (u64, u64, std::ops::Range<usize>)> {
        let cs = self.chunk_size();
        let mut done = 0usize;
        std::iter::from_fn(move || {
            if done >= len {
                return None;
            }
            let pos = offset + done as u64;
            let within = pos % cs;
            let n = ((cs - within) as usize).min(len - done);
            let piece = (pos / cs, within, done..done + n);
            done += n;
            Some(piece)
        })
    }

    /// Reads `buf.len()` bytes of the target at `offset` into an owned buffer.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.read_into(offset, &GuestBufMut::from_slice(buf))
    }

    /// Reads `buf.len()` bytes of the target at `offset` into `buf` (guest memory): local
    /// chunks with one `preadv` each, fetched bytes with volatile copies.
    pub fn read_into(&self, offset: u64, buf: &GuestBufMut<'_>) -> Result<(), BlockError> {
        let _timer = self.counters.latency.read.timer();
        check_range(offset, buf.len() as u64, self.layout.target_size)?;
        self.counters.note_read(buf.len() as u64);
        for (c, within, r) in self.pieces(offset, buf.len()) {
            if let Some(rec) = &self.recorder {
                rec.note(c);
            }
            self.read_chunk(c, within, &buf.range(r))?;
        }
        Ok(())
    }

    fn read_chunk(&self, c: u64, within: u64, out: &GuestBufMut<'_>) -> Result<(), BlockError> {
        loop {
            {
                let _g = self.stripe(c).read();
                let e = self.locate(c)?;
                match e.loc {
                    Location::Home | Location::Slot(_) => {
                        read_storage(self.storage.as_ref(), self.addr(c, e.loc) + within, out)?;
                        return Ok(());
                    }
                    Location::Zero => {
                        out.fill_zero();
                        return Ok(());
                    }
                    Location::Missing => {}
                }
            }
            match self.fetch(ChunkIdx(c), FetchKind::Demand)? {
                FlightResult::Uncached { first, bytes } => {
                    let at = ((c - first.0) * self.chunk_size() + within) as usize;
                    out.copy_from(&bytes[at..at + out.len()]);
                    Counters::add(&self.counters.uncached_reads, 1);
                    return Ok(());
                }
                FlightResult::Mapped => continue,
                FlightResult::Failed(m) => return Err(BlockError::Remote(m)),
                FlightResult::Cancelled => return Err(BlockError::Cancelled),
            }
        }
    }

    /// Writes `data` (an owned buffer) at `offset` of the target.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), BlockError> {
        self.write_from(offset, &GuestBuf::from_slice(data))
    }

    /// Writes `data` (guest memory) at `offset` of the target: one `pwritev` per chunk.
    pub fn write_from(&self, offset: u64, data: &GuestBuf<'_>) -> Result<(), BlockError> {
        let _timer = self.counters.latency.write.timer();
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(offset, data.len() as u64, self.layout.target_size)?;
        Counters::add(&self.counters.written_bytes, data.len() as u64);
        for (c, within, r) in self.pieces(offset, data.len()) {
            self.write_chunk(c, within, &data.range(r))?;
        }
        Ok(())
    }

    fn write_chunk(&self, c: u64, within: u64, data: &GuestBuf<'_>) -> Result<(), BlockError> {
        let whole = within == 0 && data.len() == self.layout.target_len(c);
        loop {
            {
                let _g = self.stripe(c).read();
                let mut m = self.meta.lock();
                let e = m.store.entry(c).map_err(meta_io)?;
                match e.loc {
                    Location::Home | Location::Slot(_) => {
                        if matches!(e.loc, Location::Slot(_)) && !e.dirty {
                            self.set_entry(&mut m.store, c, Entry { dirty: true, ..e })?;
                            if let Some(l) = m.lru.as_mut() {
                                l.pop(&c);
                            }
                        }
                        drop(m);
                        write_storage(self.storage.as_ref(), self.addr(c, e.loc) + within, data)?;
                        return Ok(());
                    }
                    Location::Zero | Location::Missing if whole => {}
                    Location::Zero => {
                        drop(m);
                        drop(_g);
                        self.materialize(c, None)?;
                        continue;
                    }
                    Location::Missing => {}
                }
            }
            if whole {
                return self.materialize(c, Some(data));
            }
            match self.fetch(ChunkIdx(c), FetchKind::Demand)? {
                FlightResult::Mapped => continue,
                FlightResult::Uncached { .. } => {
                    Counters::add(&self.counters.nospace_errors, 1);
                    return Err(BlockError::NoSpace);
                }
                FlightResult::Failed(m) => return Err(BlockError::Remote(m)),
                FlightResult::Cancelled => return Err(BlockError::Cancelled),
            }
        }
    }

    /// Gives chunk `c` (missing or zero) a dirty slot holding `data` (a whole chunk) or
    /// zeros. After commit started the chunk goes straight home instead.
    fn materialize(&self, c: u64, data: Option<&GuestBuf<'_>>) -> Result<(), BlockError> {
        let len = self.layout.target_len(c);
        let zeros;
        let bytes = match data {
            Some(d) => d.clone(),
            None => {
                zeros = vec![0u8; len];
                GuestBuf::from_slice(&zeros)
            }
        };
        let st = self.storage.as_ref();
        let home = self.to_home.load(Ordering::Acquire);
        let slot = if home {
            None
        } else {
            Some(self.get_slot(true)?)
        };
        if let Some(s) = slot {
            write_storage(st, self.layout.slot_addr(s), &bytes)?;
        }
        let _g = self.stripe(c).write();
        let mut m = self.meta.lock();
        let e = match m.store.entry(c) {
            Ok(e) => e,
            Err(err) => {
                if let Some(s) = slot {
                    m.store.free_unpublished(s);
                }
                return Err(meta_io(err));
            }
        };
        match (e.loc, slot) {
            (Location::Missing | Location::Zero, Some(s)) => {
                self.set_entry(
                    &mut m.store,
                    c,
                    Entry {
                        loc: Location::Slot(s),
                        dirty: true,
                        ..e
                    },
                )?;
            }
            (Location::Missing | Location::Zero, None) => {
                drop(m);
                write_storage(st, self.addr(c, Location::Home), &bytes)?;
                let mut m = self.meta.lock();
                self.set_entry(
                    &mut m.store,
                    c,
                    Entry {
                        loc: Location::Home,
                        dirty: true,
                        ..e
                    },
                )?;
            }
            (loc, s) => {
                // Someone mapped the chunk meanwhile: our write still has to land, on top.
                if let Some(s) = s {
                    m.store.free_unpublished(s);
                }
                if let Location::Slot(_) = loc {
                    self.set_entry(&mut m.store, c, Entry { dirty: true, ..e })?;
                    if let Some(l) = m.lru.as_mut() {
                        l.pop(&c);
                    }
                }
                drop(m);
                if data.is_some() {
                    write_storage(st, self.addr(c, loc), &bytes)?;
                }
            }
        }
        Ok(())
    }

    /// Makes every completed write and every published mapping durable.
    pub fn flush(&self) -> Result<(), EngineError> {
        if self.is_finished() {
            self.storage.sync().map_err(BlockError::from)?;
            return Ok(());
        }
        self.commit_map()
    }

    /// One map commit (see `boot_relocator::meta` for the protocol).
    pub(crate) fn commit_map(&self) -> Result<(), EngineError> {
        let retired = self.retired.read_recursive();
        if *retired {
            return Err(EngineError::State("the migration was rolled back".into()));
        }
        let _c = self.commit_lock.lock();
        self.unflushed.store(0, Ordering::Relaxed);
        let batch = self.meta.lock().store.take_dirty()?;
        match batch.write(self.storage.as_ref(), &self.layout) {
            Ok(()) => {
                self.meta.lock().store.finish_batch(batch);
                Counters::add(&self.counters.commits, 1);
                Ok(())
            }
            Err(e) => {
                self.meta.lock().store.abort_batch(batch);
                Err(e.into())
            }
        }
    }

    /// Durably updates the superblock (after committing pending map changes).
    pub fn update_superblock(
        &self,
        f: impl FnOnce(&mut boot_relocator::Superblock),
    ) -> Result<(), EngineError> {
        let _c = self.commit_lock.lock();
        self.meta.lock().store.update_sb(f)?;
        Ok(())
    }

    /// True when `[offset, offset+len)` can be served without the network.
    pub fn is_local(&self, offset: u64, len: u64) -> bool {
        if len == 0 || offset >= self.layout.target_size {
            return true;
        }
        let cs = self.chunk_size();
        let last = (offset + len - 1).min(self.layout.target_size - 1) / cs;
        self.local[(offset / cs) as usize..=last as usize].all()
    }
}

/// Copies the map's counts into a status.
fn tally(s: &mut Status, n: &MapCounts) {
    s.chunks_missing = n.missing;
    s.chunks_zero = n.zero;
    s.chunks_home = n.home;
    s.chunks_slotted = n.slotted;
    s.chunks_dirty = n.dirty;
    s.chunks_saved_source = n.saved;
    s.bytes_saved_source = n.saved_bytes;
}

/// A metadata error met on the request path, as an I/O error (the cause kept).
pub(crate) fn meta_io(e: RelocError) -> BlockError {
    BlockError::Io(std::io::Error::other(e))
}

/// Status of a prepared disk read offline (no engine, no source).
pub fn offline_status(meta: &MetaStore) -> Status {
    let sb = meta.superblock();
    let l = sb.layout;
    let mut s = Status {
        state: sb.state.to_string(),
        chunk_size: l.chunk_size(),
        target_size: l.target_size,
        source_size: l.source_size,
        chunks_total: l.chunk_count(),
        slots_total: l.slot_count,
        slots_free: meta.free_slots() as u64,
        start_counter: sb.start_counter,
        max_trial_starts: sb.max_trial_starts,
        target_kind: sb.target.kind.clone(),
        target_validator: sb.target.validator.clone(),
        target_urls: crate::target::shown_urls(&sb.target.urls),
        bytes_seeded: sb.seeded_bytes,
        ..Status::default()
    };
    tally(&mut s, &meta.counts());
    s
}

impl BlockBackend for Engine {
    fn capacity(&self) -> u64 {
        self.layout.target_size
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn optimal_io_size(&self) -> u32 {
        self.chunk_size() as u32
    }
    fn read_into(&self, offset: u64, buf: &GuestBufMut<'_>) -> Result<(), BlockError> {
        Engine::read_into(self, offset, buf)
    }
    fn write_from(&self, offset: u64, buf: &GuestBuf<'_>) -> Result<(), BlockError> {
        Engine::write_from(self, offset, buf)
    }
    fn flush(&self) -> Result<(), BlockError> {
        let _timer = self.counters.latency.flush.timer();
        Engine::flush(self).map_err(|e| match e {
            EngineError::Block(b) => b,
            other => BlockError::Io(std::io::Error::other(other.to_string())),
        })
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        check_range(offset, len, self.layout.target_size)?;
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        self.discard_missing(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        Engine::write_zeroes(self, offset, len)
    }
    fn device_id(&self) -> Vec<u8> {
        let v = self.meta.lock().store.superblock().uuid;
        let mut id = b"streamboot-".to_vec();
        id.extend(
            v[..4]
                .iter()
                .flat_map(|b| format!("{b:02x}").into_bytes())
                .take(9),
        );
        id
    }
    fn cancel_waiting(&self) {
        self.cancel_demand();
    }
    fn is_local(&self, offset: u64, len: u64) -> bool {
        Engine::is_local(self, offset, len)
    }
}
