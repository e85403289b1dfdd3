//! Single flight: one piece of work (a fetch) per key, however many callers want it at
//! once; the others wait for its result. Generic over the key and the result; the
//! engine's table is keyed by chunk ([`InFlight`]).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use super::chunk_map::ChunkIdx;

/// A key of a single-flight table; runs of keys (`first.after(0..count)`) can be claimed
/// together.
pub trait FlightKey: Copy + Eq + Hash {
    /// The key `n` places after this one.
    fn after(self, n: u64) -> Self;
}

impl FlightKey for ChunkIdx {
    fn after(self, n: u64) -> Self {
        ChunkIdx::after(self, n)
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

/// One piece of work in progress, and its result once done.
#[derive(Debug)]
pub struct Flight<R = FlightResult> {
    done: Mutex<Option<R>>,
    cv: Condvar,
}

impl<R> Default for Flight<R> {
    fn default() -> Self {
        Self {
            done: Mutex::new(None),
            cv: Condvar::new(),
        }
    }
}

impl<R: Clone> Flight<R> {
    /// Blocks until the fetch finishes; gives up (`None`) once `cancel` fires.
    pub fn wait_or_cancel(&self, cancel: &tokio_util::sync::CancellationToken) -> Option<R> {
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

    fn complete(&self, r: R) {
        *self.done.lock() = Some(r);
        self.cv.notify_all();
    }
}

/// Table of keys being worked on.
#[derive(Debug)]
pub struct SingleFlight<K, R = FlightResult> {
    table: Mutex<HashMap<K, Arc<Flight<R>>>>,
}

impl<K, R> Default for SingleFlight<K, R> {
    fn default() -> Self {
        Self {
            table: Mutex::new(HashMap::new()),
        }
    }
}

/// The engine's table: chunks being fetched.
pub type InFlight = SingleFlight<ChunkIdx, FlightResult>;

/// Outcome of trying to claim keys.
pub enum Claim<K = ChunkIdx, R = FlightResult> {
    /// Someone else works on the key: wait on this.
    Wait(Arc<Flight<R>>),
    /// We own keys `first.after(0..count)`.
    Owned {
        first: K,
        count: u64,
        flight: Arc<Flight<R>>,
    },
    /// Nothing to do (e.g. the chunk is no longer missing).
    NotNeeded,
}

impl<K: FlightKey, R: Clone> SingleFlight<K, R> {
    /// Claims key `c` and up to `max - 1` following keys for which `missing` holds and
    /// nobody else works on. `missing` is evaluated under the table lock.
    pub fn claim(&self, c: K, max: u64, mut missing: impl FnMut(K) -> bool) -> Claim<K, R> {
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
    pub fn finish(&self, first: K, count: u64, flight: &Flight<R>, r: R) {
        {
            let mut t = self.table.lock();
            for i in 0..count {
                t.remove(&first.after(i));
            }
        }
        flight.complete(r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_stop_at_claimed_or_present_keys() {
        let t: InFlight = SingleFlight::default();
        let Claim::Owned {
            first,
            count,
            flight,
        } = t.claim(ChunkIdx(10), 8, |c| c.0 != 14)
        else {
            panic!("first claim must own");
        };
        assert_eq!((first, count), (ChunkIdx(10), 4));
        // A key inside the run waits on the same flight; a run ends before it.
        let Claim::Wait(w) = t.claim(ChunkIdx(12), 8, |_| true) else {
            panic!("claimed key must wait");
        };
        assert!(Arc::ptr_eq(&w, &flight));
        let Claim::Owned { count, .. } = t.claim(ChunkIdx(8), 8, |_| true) else {
            panic!("free key must own");
        };
        assert_eq!(count, 2);
        assert!(matches!(
            t.claim(ChunkIdx(14), 8, |c| c.0 != 14),
            Claim::NotNeeded
        ));
        t.finish(first, 4, &flight, FlightResult::Mapped);
        let never = tokio_util::sync::CancellationToken::new();
        assert!(matches!(
            w.wait_or_cancel(&never),
            Some(FlightResult::Mapped)
        ));
        assert!(matches!(
            t.claim(ChunkIdx(12), 1, |_| true),
            Claim::Owned { .. }
        ));
    }
}
