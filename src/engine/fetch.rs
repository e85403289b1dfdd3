//! Fetching missing chunks: single flight per chunk, coalesced neighbours, cancellation
//! (demand and background tokens), publishing fetched chunks into slots or home.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use boot_relocator::{Entry, Location};

use super::chunk_map::MAX_DIRTY_PAGES;
use super::flight::{Claim, FetchKind};
use super::ChunkIdx;
use super::{meta_io, Counters, Engine, FlightResult, SlotIdx};
use crate::blockdev::BlockError;
use crate::source::{CancellationToken, SourceError};

thread_local! {
    /// Reused fetch buffer of the current thread.
    static FETCH_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Largest fetch buffer a thread keeps between fetches.
const MAX_KEPT_FETCH_BUF: usize = 16 << 20;

impl Engine {
    /// The token that cancels fetches of this kind started from now on.
    fn cancel_token(&self, kind: FetchKind) -> CancellationToken {
        let c = self.cancel.lock();
        if kind.is_guest() {
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

    /// Fetches chunk `c` unless someone else already is (with the missing chunks of its
    /// readahead window when it continues a sequential guest stream, or up to the
    /// largest window for commit), and waits
    /// for the result either way. `kind` says who waits on it. Fails with
    /// [`BlockError::Cancelled`] when this kind of fetch is cancelled meanwhile; a fetch
    /// of the other kind being cancelled under us is simply tried again.
    pub(crate) fn fetch(&self, c: ChunkIdx, kind: FetchKind) -> Result<FlightResult, BlockError> {
        let cancel = self.cancel_token(kind);
        loop {
            match self.fetch_once(c, kind, &cancel)? {
                FlightResult::Cancelled if !cancel.is_cancelled() => continue,
                FlightResult::Cancelled => return Err(BlockError::Cancelled),
                r => return Ok(r),
            }
        }
    }

    fn fetch_once(
        &self,
        c: ChunkIdx,
        kind: FetchKind,
        cancel: &CancellationToken,
    ) -> Result<FlightResult, BlockError> {
        let demand = kind == FetchKind::Demand;
        let max = (self.opts.demand_fetch_bytes / self.chunk_size()).max(1);
        let max = if demand {
            self.streams.lock().window(c, max)
        } else {
            max
        };
        let claim = self.inflight.claim(c, max, |ChunkIdx(i)| {
            i < self.layout.chunk_count() && self.map.is_missing(i)
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
                let r = self.fetch_run_with(first, count, kind, cancel);
                self.demand_waiting
                    .fetch_sub(demand as u64, Ordering::Relaxed);
                self.inflight.finish(first, count, &flight, r.clone());
                Ok(r)
            }
        }
    }

    /// Fetches chunks `first..first+count` (claimed by the caller) and publishes them.
    pub(crate) fn fetch_run(&self, first: ChunkIdx, count: u64, kind: FetchKind) -> FlightResult {
        let cancel = self.cancel_token(kind);
        self.fetch_run_with(first, count, kind, &cancel)
    }

    fn fetch_run_with(
        &self,
        ChunkIdx(first): ChunkIdx,
        count: u64,
        kind: FetchKind,
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
        let r = self.fetch_into(
            (ChunkIdx(first), count),
            kind,
            (start, end),
            &mut bytes,
            cancel,
        );
        if bytes.capacity() <= MAX_KEPT_FETCH_BUF {
            FETCH_BUF.with(|b| *b.borrow_mut() = bytes);
        }
        r
    }

    fn fetch_into(
        &self,
        (first, count): (ChunkIdx, u64),
        kind: FetchKind,
        (start, end): (u64, u64),
        bytes: &mut [u8],
        cancel: &CancellationToken,
    ) -> FlightResult {
        Counters::add(&self.counters.fetch_requests, 1);
        let timer = self.counters.latency.fetch(kind).timer();
        let got =
            self.source
                .read_at_cancellable(start, &mut bytes[..(end - start) as usize], cancel);
        if let Err(SourceError::Cancelled) = got {
            tracing::debug!(chunk = first.0, count, "fetch cancelled");
            timer.discard();
            return FlightResult::Cancelled;
        }
        drop(timer);
        if let Err(e) = got {
            Counters::add(&self.counters.fetch_errors, 1);
            let integrity = matches!(e, SourceError::Verify { .. } | SourceError::Changed { .. });
            self.counters.fetch_failed(integrity, &e.to_string());
            tracing::error!(
                chunk = first.0,
                count,
                source = %self.source.name(),
                "fetch failed, the requests that need these chunks get an I/O error: {e}"
            );
            *self.last_fetch_error.lock() = Some(format!("fetch failed: {e}"));
            return FlightResult::Failed(e.to_string());
        }
        let counter = if kind.is_guest() {
            &self.counters.fetched_demand
        } else {
            &self.counters.fetched_background
        };
        Counters::add(counter, end - start);
        match self.publish_fetched(first, bytes, kind.is_guest()) {
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
        ChunkIdx(first): ChunkIdx,
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
        let mut slotted: Vec<(u64, SlotIdx)> = Vec::new();
        for (i, chunk) in bytes.chunks(cs).enumerate() {
            let c = first + i as u64;
            let chunk = &chunk[..self.layout.target_len(c)];
            let zero = chunk.iter().all(|&b| b == 0);
            if to_home {
                let _g = self.map.stripe(c).write();
                let e = self.map.lock().store.entry(c).map_err(meta_io)?;
                if e.loc == Location::Missing {
                    let home = self.addr(c, Location::Home);
                    if zero {
                        self.storage.write_zeroes(home, chunk.len() as u64)?;
                    } else {
                        self.storage.write_at(home, chunk)?;
                    }
                    self.map.set_entry(
                        &mut self.map.lock().store,
                        c,
                        Entry {
                            loc: Location::Home,
                            ..e
                        },
                    )?;
                }
            } else if zero {
                self.publish_if_missing(c, Location::Zero)?;
            } else {
                match self.get_slot(may_evict) {
                    Ok(s) => slotted.push((c, s)),
                    Err(BlockError::NoSpace) => all_stored = false,
                    Err(e) => {
                        self.with_meta(|m| {
                            slotted.iter().for_each(|&(_, s)| m.free_unpublished(s.0))
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
                && slotted[j].1 .0 == slotted[j - 1].1 .0 + 1
            {
                j += 1;
            }
            let from = (slotted[i].0 - first) as usize * cs;
            let to = ((slotted[j - 1].0 - first) as usize * cs + cs).min(bytes.len());
            let at = self.layout.slot_addr(slotted[i].1 .0);
            if let Err(e) = self.storage.write_at(at, &bytes[from..to]) {
                self.with_meta(|m| slotted.iter().for_each(|&(_, s)| m.free_unpublished(s.0)));
                return Err(e.into());
            }
            if !may_evict {
                // Background bulk data: let writeback overlap the download.
                self.storage.start_writeback(at, (to - from) as u64);
            }
            i = j;
        }
        for (k, &(c, s)) in slotted.iter().enumerate() {
            match self.publish_if_missing(c, Location::Slot(s.0)) {
                Ok(true) => {}
                Ok(false) => self.with_meta(|m| m.free_unpublished(s.0)),
                Err(e) => {
                    self.with_meta(|m| {
                        slotted[k..]
                            .iter()
                            .for_each(|&(_, s)| m.free_unpublished(s.0))
                    });
                    return Err(e);
                }
            }
        }
        let n = self
            .unflushed
            .fetch_add(bytes.len().div_ceil(cs) as u64, Ordering::Relaxed);
        // Map pages changed since the last commit stay in memory until one writes them:
        // commit often enough that they stay few (scattered fetches dirty one page each).
        let pinned = self.map.lock().store.dirty_page_count();
        if n * self.chunk_size() >= self.opts.commit_every_bytes || pinned >= MAX_DIRTY_PAGES {
            self.commit_map()
                .map_err(|e| BlockError::Io(std::io::Error::other(e)))?;
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
    fn publish_if_missing(&self, c: u64, loc: Location) -> Result<bool, BlockError> {
        let _g = self.map.stripe(c).write();
        let mut m = self.map.lock();
        let e = m.store.entry(c).map_err(meta_io)?;
        if e.loc != Location::Missing {
            return Ok(false);
        }
        self.map.set_entry(
            &mut m.store,
            c,
            Entry {
                loc,
                dirty: false,
                ..e
            },
        )?;
        if let (Location::Slot(_), Some(l)) = (loc, m.lru.as_mut()) {
            l.put(c, ());
        }
        Ok(true)
    }
}
