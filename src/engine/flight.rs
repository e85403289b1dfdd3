//! Single-flight fetches: one network request per missing chunk, however many readers
//! and writers want it at once.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

/// The index of a chunk of the target (chunk `i` covers bytes `i * chunk_size ..`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkIdx(pub u64);

impl ChunkIdx {
    /// The chunk `n` chunks after this one.
    pub fn after(self, n: u64) -> ChunkIdx {
        ChunkIdx(self.0 + n)
    }
}

/// Why a chunk is fetched: decides its cancellation token, its counters and whether the
/// hydrator yields to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FetchKind {
    /// A guest request waits on it.
    Demand,
    /// Chunks after a sequential guest stream, fetched ahead of its reads.
    Readahead,
    /// Background hydration.
    Hydrate,
    /// Moving chunks home during commit.
    Commit,
}

impl FetchKind {
    /// True for fetches made on behalf of guest requests (cancelled with them, counted
    /// as demand bytes).
    pub fn is_guest(self) -> bool {
        matches!(self, FetchKind::Demand | FetchKind::Readahead)
    }
}

/// What a finished fetch left behind for its waiters.
#[derive(Clone, Debug)]
pub enum FlightResult {
    /// The chunks are now mapped; read them through the map.
    Mapped,
    /// The chunks could not be stored (area full of dirty chunks): here are the bytes of
    /// chunks `first..` for the waiters to copy from.
    Uncached {
        first: ChunkIdx,
        bytes: Arc<Vec<u8>>,
    },
    /// The fetch failed with this message.
    Failed(String),
    /// The fetch was cancelled (its requester went away, or shutdown): nothing was
    /// stored; a waiter that was not cancelled itself tries again.
    Cancelled,
}

/// How often a waiter checks its cancellation token while a fetch it waits on runs.
const CANCEL_POLL_MS: u64 = 20;

/// One fetch in progress.
#[derive(Debug, Default)]
pub struct Flight {
    done: Mutex<Option<FlightResult>>,
    cv: Condvar,
}

impl Flight {
    /// Blocks until the fetch finishes; gives up (`None`) once `cancel` fires.
    pub fn wait_or_cancel(
        &self,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Option<FlightResult> {
        let mut g = self.done.lock();
        while g.is_none() {
            if cancel.is_cancelled() {
                return None;
            }
            self.cv
                .wait_for(&mut g, std::time::Duration::from_millis(CANCEL_POLL_MS));
        }
        g.clone()
    }

    fn complete(&self, r: FlightResult) {
        *self.done.lock() = Some(r);
        self.cv.notify_all();
    }
}

/// Table of chunks being fetched.
#[derive(Debug, Default)]
pub struct InFlight {
    table: Mutex<HashMap<ChunkIdx, Arc<Flight>>>,
}

/// Outcome of trying to claim chunks for fetching.
pub enum Claim {
    /// Someone else is fetching the chunk: wait on this.
    Wait(Arc<Flight>),
    /// We own chunks `first..first+count`.
    Owned {
        first: ChunkIdx,
        count: u64,
        flight: Arc<Flight>,
    },
    /// Nothing to fetch (the chunk is no longer missing).
    NotNeeded,
}

impl InFlight {
    /// Claims chunk `c` and up to `max - 1` following chunks for which `missing` holds
    /// and nobody else is fetching. `missing` is evaluated under the table lock.
    pub fn claim(&self, c: ChunkIdx, max: u64, mut missing: impl FnMut(ChunkIdx) -> bool) -> Claim {
        let mut t = self.table.lock();
        if let Some(f) = t.get(&c) {
            return Claim::Wait(f.clone());
        }
        if !missing(c) {
            return Claim::NotNeeded;
        }
        let mut count = 1;
        while count < max && !t.contains_key(&c.after(count)) && missing(c.after(count)) {
            count += 1;
        }
        let flight = Arc::new(Flight::default());
        for i in 0..count {
            t.insert(c.after(i), flight.clone());
        }
        Claim::Owned {
            first: c,
            count,
            flight,
        }
    }

    /// Releases chunks claimed by `claim` and wakes the waiters.
    pub fn finish(&self, first: ChunkIdx, count: u64, flight: &Flight, r: FlightResult) {
        {
            let mut t = self.table.lock();
            for i in 0..count {
                t.remove(&first.after(i));
            }
        }
        flight.complete(r);
    }
}
