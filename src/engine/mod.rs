//! The streaming engine: presents the target image of a prepared disk.
//!
//! A read of chunk `c` is served from home, its slot, zeros, or — when missing — fetched
//! from the remote source (single-flight, coalesced with missing neighbours), stored in a
//! free slot, mapped and then served. Writes go to the chunk's slot (a partial write to a
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
mod flight;
mod hydrate;
mod stats;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bitvec::prelude::{BitVec, Lsb0};
use boot_relocator::{Entry, Layout, Location, MetaStore, RelocError, State, Storage};
use parking_lot::{Mutex, RwLock};

use crate::blockdev::{check_range, BlockBackend, BlockError};
use crate::source::{CancellationToken, RemoteSource, SourceError};

pub use flight::FlightResult;
pub use hydrate::{HydrateOptions, HydrateReport, Hydrator, RateLimit};
pub use stats::{Counters, Status};

use flight::{Claim, InFlight};

thread_local! {
    /// Reused fetch buffer of the current thread.
    static FETCH_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Largest fetch buffer a thread keeps between fetches.
const MAX_KEPT_FETCH_BUF: usize = 16 << 20;

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
    /// Most bytes fetched in one on-demand request (neighbouring missing chunks are
    /// coalesced up to this).
    pub demand_fetch_bytes: u64,
    /// Commit the map after this many bytes of fetched chunks were published without a
    /// flush. Clean fetched chunks lost in a crash are only fetched again, so this bounds
    /// re-download work, not data safety.
    pub commit_every_bytes: u64,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            demand_fetch_bytes: 512 << 10,
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
        let saved = meta.entries().iter().filter(|e| e.saved.is_some()).count() as u64;
        let lru = (layout.slot_count < chunks + saved).then(|| {
            let mut l = lru::LruCache::unbounded();
            for (c, e) in meta.entries().iter().enumerate() {
                if matches!(e.loc, Location::Slot(_)) && !e.dirty {
                    l.put(c as u64, ());
                }
            }
            l
        });
        let local = meta
            .entries()
            .iter()
            .map(|e| e.loc != Location::Missing)
            .collect();
        Ok(Self {
            local,
            storage: meta.storage().clone(),
            layout,
            source,
            to_home: AtomicBool::new(sb.state == State::Committing),
            meta: Mutex::new(Meta { store: meta, lru }),
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
            inflight: InFlight::default(),
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
    pub(crate) fn set_entry(&self, store: &mut MetaStore, c: u64, e: Entry) {
        store.set_entry(c, e);
        self.local
            .set_aliased(c as usize, e.loc != Location::Missing);
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
        tally(&mut s, m.store.entries(), &self.layout);
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
        s
    }

    /// Where chunk `c` is now (and, for a clean slot, marks it recently used).
    fn locate(&self, c: u64) -> Entry {
        let mut m = self.meta.lock();
        let e = m.store.entry(c);
        if let (Location::Slot(_), false, Some(lru)) = (e.loc, e.dirty, m.lru.as_mut()) {
            lru.get(&c);
        }
        e
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

    /// Reads `buf.len()` bytes of the target at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        check_range(offset, buf.len() as u64, self.layout.target_size)?;
        self.counters.note_read(buf.len() as u64);
        for (c, within, r) in self.pieces(offset, buf.len()) {
            if let Some(rec) = &self.recorder {
                rec.note(c);
            }
            self.read_chunk(c, within, &mut buf[r])?;
        }
        Ok(())
    }

    fn read_chunk(&self, c: u64, within: u64, out: &mut [u8]) -> Result<(), BlockError> {
        loop {
            {
                let _g = self.stripe(c).read();
                let e = self.locate(c);
                match e.loc {
                    Location::Home | Location::Slot(_) => {
                        self.storage.read_at(self.addr(c, e.loc) + within, out)?;
                        return Ok(());
                    }
                    Location::Zero => {
                        out.fill(0);
                        return Ok(());
                    }
                    Location::Missing => {}
                }
            }
            match self.fetch(c, true)? {
                FlightResult::Uncached { first, bytes } => {
                    let at = ((c - first) * self.chunk_size() + within) as usize;
                    out.copy_from_slice(&bytes[at..at + out.len()]);
                    Counters::add(&self.counters.uncached_reads, 1);
                    return Ok(());
                }
                FlightResult::Mapped => continue,
                FlightResult::Failed(m) => return Err(BlockError::Remote(m)),
                FlightResult::Cancelled => return Err(BlockError::Cancelled),
            }
        }
    }

    /// Writes `data` at `offset` of the target.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(offset, data.len() as u64, self.layout.target_size)?;
        Counters::add(&self.counters.written_bytes, data.len() as u64);
        for (c, within, r) in self.pieces(offset, data.len()) {
            self.write_chunk(c, within, &data[r])?;
        }
        Ok(())
    }

    fn write_chunk(&self, c: u64, within: u64, data: &[u8]) -> Result<(), BlockError> {
        let whole = within == 0 && data.len() == self.layout.target_len(c);
        loop {
            {
                let _g = self.stripe(c).read();
                let mut m = self.meta.lock();
                let e = m.store.entry(c);
                match e.loc {
                    Location::Home | Location::Slot(_) => {
                        if matches!(e.loc, Location::Slot(_)) && !e.dirty {
                            self.set_entry(&mut m.store, c, Entry { dirty: true, ..e });
                            if let Some(l) = m.lru.as_mut() {
                                l.pop(&c);
                            }
                        }
                        drop(m);
                        self.storage.write_at(self.addr(c, e.loc) + within, data)?;
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
            match self.fetch(c, true)? {
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
    fn materialize(&self, c: u64, data: Option<&[u8]>) -> Result<(), BlockError> {
        let len = self.layout.target_len(c);
        let zeros;
        let bytes = match data {
            Some(d) => d,
            None => {
                zeros = vec![0u8; len];
                &zeros
            }
        };
        let home = self.to_home.load(Ordering::Acquire);
        let slot = if home {
            None
        } else {
            Some(self.get_slot(true)?)
        };
        if let Some(s) = slot {
            self.storage.write_at(self.layout.slot_addr(s), bytes)?;
        }
        let _g = self.stripe(c).write();
        let mut m = self.meta.lock();
        let e = m.store.entry(c);
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
                );
            }
            (Location::Missing | Location::Zero, None) => {
                drop(m);
                self.storage.write_at(self.addr(c, Location::Home), bytes)?;
                let mut m = self.meta.lock();
                self.set_entry(
                    &mut m.store,
                    c,
                    Entry {
                        loc: Location::Home,
                        dirty: true,
                        ..e
                    },
                );
            }
            (loc, s) => {
                // Someone mapped the chunk meanwhile: our write still has to land, on top.
                if let Some(s) = s {
                    m.store.free_unpublished(s);
                }
                if let Location::Slot(_) = loc {
                    self.set_entry(&mut m.store, c, Entry { dirty: true, ..e });
                    if let Some(l) = m.lru.as_mut() {
                        l.pop(&c);
                    }
                }
                drop(m);
                if data.is_some() {
                    self.storage.write_at(self.addr(c, loc), bytes)?;
                }
            }
        }
        Ok(())
    }

    /// The token that cancels fetches of this kind started from now on.
    fn cancel_token(&self, demand: bool) -> CancellationToken {
        let c = self.cancel.lock();
        if demand {
            c.demand.clone()
        } else {
            c.background.clone()
        }
    }

    /// Cancels every guest (demand) fetch in progress and every guest request waiting on
    /// one: they fail with [`BlockError::Cancelled`] and store nothing. For requests whose
    /// requester is gone (a departed VM connection, shutdown). Later fetches run normally.
    pub fn cancel_demand(&self) {
        let mut c = self.cancel.lock();
        c.demand.cancel();
        c.demand = CancellationToken::new();
    }

    /// Cancels background fetches (hydration, commit) in progress; both stop and resume
    /// later from the disk's state.
    pub fn cancel_background(&self) {
        let mut c = self.cancel.lock();
        c.background.cancel();
        c.background = CancellationToken::new();
    }

    /// Fetches chunk `c` (and missing neighbours) unless someone else already is; waits
    /// for the result either way. `demand`: a guest request waits on it. Fails with
    /// [`BlockError::Cancelled`] when this kind of fetch is cancelled meanwhile; a fetch
    /// of the other kind being cancelled under us is simply tried again.
    pub(crate) fn fetch(&self, c: u64, demand: bool) -> Result<FlightResult, BlockError> {
        let cancel = self.cancel_token(demand);
        loop {
            match self.fetch_once(c, demand, &cancel)? {
                FlightResult::Cancelled if !cancel.is_cancelled() => continue,
                FlightResult::Cancelled => return Err(BlockError::Cancelled),
                r => return Ok(r),
            }
        }
    }

    fn fetch_once(
        &self,
        c: u64,
        demand: bool,
        cancel: &CancellationToken,
    ) -> Result<FlightResult, BlockError> {
        let max = (self.opts.demand_fetch_bytes / self.chunk_size()).max(1);
        let claim = self.inflight.claim(c, max, |i| {
            i < self.layout.chunk_count()
                && self.meta.lock().store.entry(i).loc == Location::Missing
        });
        match claim {
            Claim::NotNeeded => Ok(FlightResult::Mapped),
            Claim::Wait(f) => {
                self.demand_waiting
                    .fetch_add(demand as u64, Ordering::Relaxed);
                let r = f.wait_or_cancel(cancel);
                self.demand_waiting
                    .fetch_sub(demand as u64, Ordering::Relaxed);
                r.ok_or(BlockError::Cancelled)
            }
            Claim::Owned {
                first,
                count,
                flight,
            } => {
                self.demand_waiting
                    .fetch_add(demand as u64, Ordering::Relaxed);
                let r = self.fetch_run_with(first, count, demand, cancel);
                self.demand_waiting
                    .fetch_sub(demand as u64, Ordering::Relaxed);
                self.inflight.finish(first, count, &flight, r.clone());
                Ok(r)
            }
        }
    }

    /// Fetches chunks `first..first+count` (claimed by the caller) and publishes them.
    pub(crate) fn fetch_run(&self, first: u64, count: u64, demand: bool) -> FlightResult {
        let cancel = self.cancel_token(demand);
        self.fetch_run_with(first, count, demand, &cancel)
    }

    fn fetch_run_with(
        &self,
        first: u64,
        count: u64,
        demand: bool,
        cancel: &CancellationToken,
    ) -> FlightResult {
        let cs = self.chunk_size();
        let start = first * cs;
        let end = ((first + count) * cs).min(self.layout.target_size);
        // A per-thread buffer: hydration moves gigabytes in 8 MiB requests, and a fresh
        // zeroed allocation per request costs a noticeable share of memory bandwidth.
        let mut bytes = FETCH_BUF.with(|b| std::mem::take(&mut *b.borrow_mut()));
        bytes.resize((count * cs) as usize, 0);
        bytes[(end - start) as usize..].fill(0);
        let r = self.fetch_into((first, count), demand, (start, end), &mut bytes, cancel);
        if bytes.capacity() <= MAX_KEPT_FETCH_BUF {
            FETCH_BUF.with(|b| *b.borrow_mut() = bytes);
        }
        r
    }

    fn fetch_into(
        &self,
        (first, count): (u64, u64),
        demand: bool,
        (start, end): (u64, u64),
        bytes: &mut [u8],
        cancel: &CancellationToken,
    ) -> FlightResult {
        Counters::add(&self.counters.fetch_requests, 1);
        let got =
            self.source
                .read_at_cancellable(start, &mut bytes[..(end - start) as usize], cancel);
        if let Err(SourceError::Cancelled) = got {
            tracing::debug!(chunk = first, count, "fetch cancelled");
            return FlightResult::Cancelled;
        }
        if let Err(e) = got {
            Counters::add(&self.counters.fetch_errors, 1);
            tracing::error!(
                chunk = first,
                count,
                source = %self.source.name(),
                "fetch failed, the requests that need these chunks get an I/O error: {e}"
            );
            *self.last_fetch_error.lock() = Some(format!("fetch failed: {e}"));
            return FlightResult::Failed(e.to_string());
        }
        let counter = if demand {
            &self.counters.fetched_demand
        } else {
            &self.counters.fetched_background
        };
        Counters::add(counter, end - start);
        match self.publish_fetched(first, bytes, demand) {
            Ok(true) => FlightResult::Mapped,
            Ok(false) => FlightResult::Uncached {
                first,
                bytes: Arc::new(bytes.to_vec()),
            },
            Err(e) => FlightResult::Failed(e.to_string()),
        }
    }

    /// Stores fetched chunks and maps them. Returns false when some chunk could not be
    /// stored for lack of space (its bytes are then only handed to the waiters).
    /// Chunks that land in consecutive slots are written with one I/O.
    pub(crate) fn publish_fetched(
        &self,
        first: u64,
        bytes: &[u8],
        may_evict: bool,
    ) -> Result<bool, BlockError> {
        let retired = self.retired.read_recursive();
        if *retired {
            return Err(BlockError::Unavailable(
                "the migration was rolled back".into(),
            ));
        }
        let cs = self.chunk_size() as usize;
        let to_home = self.to_home.load(Ordering::Acquire);
        let mut all_stored = true;
        // (chunk, slot) of the chunks to store in slots, in order.
        let mut slotted: Vec<(u64, u32)> = Vec::new();
        for (i, chunk) in bytes.chunks(cs).enumerate() {
            let c = first + i as u64;
            let chunk = &chunk[..self.layout.target_len(c)];
            let zero = chunk.iter().all(|&b| b == 0);
            if to_home {
                let _g = self.stripe(c).write();
                let e = self.meta.lock().store.entry(c);
                if e.loc == Location::Missing {
                    let home = self.addr(c, Location::Home);
                    if zero {
                        self.storage.write_zeroes(home, chunk.len() as u64)?;
                    } else {
                        self.storage.write_at(home, chunk)?;
                    }
                    self.set_entry(
                        &mut self.meta.lock().store,
                        c,
                        Entry {
                            loc: Location::Home,
                            ..e
                        },
                    );
                }
            } else if zero {
                self.publish_if_missing(c, Location::Zero);
            } else {
                match self.get_slot(may_evict) {
                    Ok(s) => slotted.push((c, s)),
                    Err(BlockError::NoSpace) => all_stored = false,
                    Err(e) => {
                        self.with_meta(|m| {
                            slotted.iter().for_each(|&(_, s)| m.free_unpublished(s))
                        });
                        return Err(e);
                    }
                }
            }
        }
        // Write runs of consecutive chunks in consecutive slots with one I/O each.
        let mut i = 0;
        while i < slotted.len() {
            let mut j = i + 1;
            while j < slotted.len()
                && slotted[j].0 == slotted[j - 1].0 + 1
                && slotted[j].1 == slotted[j - 1].1 + 1
            {
                j += 1;
            }
            let from = (slotted[i].0 - first) as usize * cs;
            let to = ((slotted[j - 1].0 - first) as usize * cs + cs).min(bytes.len());
            let at = self.layout.slot_addr(slotted[i].1);
            if let Err(e) = self.storage.write_at(at, &bytes[from..to]) {
                self.with_meta(|m| slotted.iter().for_each(|&(_, s)| m.free_unpublished(s)));
                return Err(e.into());
            }
            if !may_evict {
                // Background bulk data: let writeback overlap the download.
                self.storage.start_writeback(at, (to - from) as u64);
            }
            i = j;
        }
        for (c, s) in slotted {
            if !self.publish_if_missing(c, Location::Slot(s)) {
                self.with_meta(|m| m.free_unpublished(s));
            }
        }
        let n = self
            .unflushed
            .fetch_add(bytes.len().div_ceil(cs) as u64, Ordering::Relaxed);
        if n * self.chunk_size() >= self.opts.commit_every_bytes {
            self.commit_map()
                .map_err(|e| BlockError::Io(std::io::Error::other(e.to_string())))?;
        }
        Ok(all_stored)
    }

    /// Stops every later background write (fetch publication, map commits) and waits
    /// for those in progress. Used before a rollback removes the released area.
    pub fn retire(&self) {
        *self.retired.write() = true;
    }

    /// Maps chunk `c` to `loc` (clean) under its stripe lock if it is still missing (a
    /// guest write may have mapped it meanwhile). Returns whether it did.
    fn publish_if_missing(&self, c: u64, loc: Location) -> bool {
        let _g = self.stripe(c).write();
        let mut m = self.meta.lock();
        let e = m.store.entry(c);
        if e.loc != Location::Missing {
            return false;
        }
        self.set_entry(
            &mut m.store,
            c,
            Entry {
                loc,
                dirty: false,
                ..e
            },
        );
        if let (Location::Slot(_), Some(l)) = (loc, m.lru.as_mut()) {
            l.put(c, ());
        }
        true
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
        let batch = self.meta.lock().store.take_dirty();
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

    /// Makes `[offset, offset+len)` read as zeros; whole chunks become `zero` entries
    /// (their slots are released), partial ones are written.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(offset, len, self.layout.target_size)?;
        let cs = self.chunk_size();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let c = pos / cs;
            let within = pos % cs;
            let n = (cs - within).min(end - pos);
            // Once commit started, zeros must land home: no `zero` shortcut then.
            let whole = within == 0 && n as usize == self.layout.target_len(c);
            if whole && !self.to_home.load(Ordering::Acquire) {
                let _g = self.stripe(c).write();
                let mut m = self.meta.lock();
                let e = m.store.entry(c);
                if let Some(l) = m.lru.as_mut() {
                    l.pop(&c);
                }
                self.set_entry(
                    &mut m.store,
                    c,
                    Entry {
                        loc: Location::Zero,
                        dirty: false,
                        ..e
                    },
                );
            } else {
                self.write_chunk(c, within, &vec![0u8; n as usize])?;
            }
            pos += n;
        }
        Ok(())
    }
}

impl Engine {
    /// A discard covering whole chunks that are still missing makes them zero chunks:
    /// space the guest gave up is never downloaded (discarded contents are unspecified;
    /// zeros are a valid answer). Local chunks keep their contents.
    fn discard_missing(&self, offset: u64, len: u64) {
        if self.to_home.load(Ordering::Acquire) {
            return; // commit moves chunks home; let it fetch rather than race it
        }
        let cs = self.chunk_size();
        let first = offset.div_ceil(cs);
        let end = offset + len;
        for c in first..self.layout.chunk_count() {
            let chunk_end = (c * cs + cs).min(self.layout.target_size);
            if chunk_end > end {
                break;
            }
            let _g = self.stripe(c).write();
            let mut m = self.meta.lock();
            let e = m.store.entry(c);
            if e.loc == Location::Missing {
                self.set_entry(
                    &mut m.store,
                    c,
                    Entry {
                        loc: Location::Zero,
                        dirty: false,
                        ..e
                    },
                );
            }
        }
    }
}

/// Counts entries by kind into a status.
fn tally(s: &mut Status, entries: &[Entry], layout: &Layout) {
    for (c, e) in entries.iter().enumerate() {
        match e.loc {
            Location::Missing => s.chunks_missing += 1,
            Location::Zero => s.chunks_zero += 1,
            Location::Home => s.chunks_home += 1,
            Location::Slot(_) => s.chunks_slotted += 1,
        }
        s.chunks_dirty += e.dirty as u64;
        if e.saved.is_some() {
            s.chunks_saved_source += 1;
            s.bytes_saved_source += layout.source_len(c as u64) as u64;
        }
    }
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
    tally(&mut s, meta.entries(), &l);
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
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.read(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
        self.write(offset, buf)
    }
    fn flush(&self) -> Result<(), BlockError> {
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
        self.discard_missing(offset, len);
        Ok(())
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
