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
mod chunk_map;
mod commit;
mod fetch;
mod flight;
mod hydrate;
mod io;
mod readahead;
mod stats;
mod zero;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use boot_relocator::{Layout, MapCounts, MetaStore, RelocError, State, Storage};
use parking_lot::{Mutex, RwLock};

use crate::blockdev::{check_range, BlockBackend, BlockError, GuestBuf, GuestBufMut};
use crate::source::{CancellationToken, RemoteSource};

pub use chunk_map::{ChunkIdx, SlotIdx};
pub use flight::{FetchKind, FlightResult};
pub use hydrate::{HydrateOptions, HydrateReport, Hydrator, RateLimit};
pub use stats::{Counters, HistogramSnapshot, LatencySnapshot, Status, LATENCY_BUCKETS};

use chunk_map::{meta_io, ChunkMap, Meta};
use flight::InFlight;

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

/// The engine over one prepared disk.
pub struct Engine {
    storage: Arc<dyn Storage>,
    layout: Layout,
    source: Arc<dyn RemoteSource>,
    /// Where chunks live, presence, stripe locks, slot cache.
    pub(crate) map: ChunkMap,
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
        Ok(Self {
            storage: meta.storage().clone(),
            layout,
            source,
            to_home: AtomicBool::new(sb.state == State::Committing),
            map: ChunkMap::new(meta)?,
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
        self.map.lock().store.state()
    }
    /// True once commit removed the released area.
    pub fn is_finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }

    fn chunk_size(&self) -> u64 {
        self.layout.chunk_size()
    }

    /// Applies `f` to the metadata store (in memory only).
    pub fn with_meta<R>(&self, f: impl FnOnce(&mut MetaStore) -> R) -> R {
        f(&mut self.map.lock().store)
    }

    /// A snapshot of the migration's state and counters.
    pub fn status(&self) -> Status {
        let m = self.map.lock();
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
        let batch = self.map.lock().store.take_dirty()?;
        match batch.write(self.storage.as_ref(), &self.layout) {
            Ok(()) => {
                self.map.lock().store.finish_batch(batch);
                Counters::add(&self.counters.commits, 1);
                Ok(())
            }
            Err(e) => {
                self.map.lock().store.abort_batch(batch);
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
        self.map.lock().store.update_sb(f)?;
        Ok(())
    }

    /// True when `[offset, offset+len)` can be served without the network.
    pub fn is_local(&self, offset: u64, len: u64) -> bool {
        if len == 0 || offset >= self.layout.target_size {
            return true;
        }
        let cs = self.chunk_size();
        let last = (offset + len - 1).min(self.layout.target_size - 1) / cs;
        self.map.all_present(offset / cs, last)
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
        let v = self.map.lock().store.superblock().uuid;
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
