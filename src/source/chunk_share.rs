//! Sharing verified chunks between reads of a [`super::store::StoreSource`], so that each
//! chunk hash is downloaded once even when an image holds it at several addresses or
//! several threads want it at the same time.
//!
//! - An LRU keeps recently verified chunks (small reads inside one chunk).
//! - A chunk the index lists at several addresses stays *pinned* after its fetch until
//!   every other address was served once (within a memory budget; beyond it only the LRU
//!   helps).
//! - A hash being fetched is *in flight*: other readers wait for that fetch instead of
//!   starting their own, and fetch it themselves only if it failed.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroUsize;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use crate::store::index::ChunkHash;

/// What a reader should do for one chunk hash.
pub(crate) enum Claim {
    /// Verified bytes are at hand.
    Have(Arc<Vec<u8>>),
    /// The caller fetches it and must report the outcome with [`ChunkShare::finish`].
    Fetch,
    /// Another reader is fetching it: call [`ChunkShare::wait`].
    Wait,
}

struct State {
    lru: Option<lru::LruCache<ChunkHash, Arc<Vec<u8>>>>,
    /// Addresses per hash, for hashes the index lists more than once.
    occurrences: HashMap<ChunkHash, u32>,
    /// Pinned duplicates: (addresses still to serve, bytes).
    pinned: HashMap<ChunkHash, (u32, Arc<Vec<u8>>)>,
    pinned_bytes: u64,
    in_flight: HashSet<ChunkHash>,
}

/// See the module documentation.
pub(crate) struct ChunkShare {
    state: Mutex<State>,
    done: Condvar,
    pin_budget: u64,
}

impl ChunkShare {
    /// `hashes`: the stored chunk hash of every address of the image; `lru_chunks`: LRU
    /// size (0: none); `pin_budget`: bytes pinned duplicates may hold at most.
    pub(crate) fn new(
        hashes: impl Iterator<Item = ChunkHash>,
        lru_chunks: usize,
        pin_budget: u64,
    ) -> Self {
        let mut occurrences: HashMap<ChunkHash, u32> = HashMap::new();
        for h in hashes {
            *occurrences.entry(h).or_default() += 1;
        }
        occurrences.retain(|_, n| *n > 1);
        ChunkShare {
            state: Mutex::new(State {
                lru: NonZeroUsize::new(lru_chunks).map(lru::LruCache::new),
                occurrences,
                pinned: HashMap::new(),
                pinned_bytes: 0,
                in_flight: HashSet::new(),
            }),
            done: Condvar::new(),
            pin_budget,
        }
    }

    /// Claims `hash` for one address.
    pub(crate) fn claim(&self, hash: ChunkHash) -> Claim {
        let mut st = self.state.lock();
        Self::claim_locked(&mut st, hash)
    }

    fn claim_locked(st: &mut State, hash: ChunkHash) -> Claim {
        if let Some((left, data)) = st.pinned.get_mut(&hash) {
            let data = data.clone();
            *left -= 1;
            if *left == 0 {
                st.pinned.remove(&hash);
                st.pinned_bytes -= data.len() as u64;
                if let Some(l) = st.lru.as_mut() {
                    l.put(hash, data.clone());
                }
            }
            return Claim::Have(data);
        }
        if let Some(data) = st.lru.as_mut().and_then(|l| l.get(&hash).cloned()) {
            return Claim::Have(data);
        }
        if st.in_flight.contains(&hash) {
            return Claim::Wait;
        }
        st.in_flight.insert(hash);
        Claim::Fetch
    }

    /// Reports the outcome of a [`Claim::Fetch`] (`None`: it failed) and wakes waiters.
    pub(crate) fn finish(&self, hash: ChunkHash, data: Option<&Arc<Vec<u8>>>) {
        let mut st = self.state.lock();
        st.in_flight.remove(&hash);
        if let Some(data) = data {
            let others = st.occurrences.get(&hash).map_or(0, |n| n - 1);
            let len = data.len() as u64;
            if others > 0
                && !st.pinned.contains_key(&hash)
                && st.pinned_bytes + len <= self.pin_budget
            {
                st.pinned.insert(hash, (others, data.clone()));
                st.pinned_bytes += len;
            } else if let Some(l) = st.lru.as_mut() {
                l.put(hash, data.clone());
            }
        }
        drop(st);
        self.done.notify_all();
    }

    /// Waits until nobody fetches `hash`, then claims it again ([`Claim::Fetch`] when the
    /// other fetch failed or its bytes are gone already).
    pub(crate) fn wait(&self, hash: ChunkHash) -> Claim {
        let mut st = self.state.lock();
        while st.in_flight.contains(&hash) {
            self.done.wait(&mut st);
        }
        Self::claim_locked(&mut st, hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(b: u8) -> ChunkHash {
        ChunkHash::of(&[b])
    }

    #[test]
    fn duplicates_stay_pinned_until_every_address_was_served() {
        // Hash 1 at three addresses, hash 2 once; no LRU.
        let s = ChunkShare::new([h(1), h(2), h(1), h(1)].into_iter(), 0, 1 << 20);
        assert!(matches!(s.claim(h(1)), Claim::Fetch));
        assert!(matches!(s.claim(h(1)), Claim::Wait));
        let data = Arc::new(vec![7u8; 10]);
        s.finish(h(1), Some(&data));
        for _ in 0..2 {
            match s.claim(h(1)) {
                Claim::Have(d) => assert_eq!(*d, vec![7u8; 10]),
                _ => panic!("pinned duplicate not served"),
            }
        }
        // Every address served: unpinned (no LRU), so a new read fetches again.
        assert!(matches!(s.claim(h(1)), Claim::Fetch));
        // A single-address chunk is not pinned.
        assert!(matches!(s.claim(h(2)), Claim::Fetch));
        s.finish(h(2), Some(&Arc::new(vec![1])));
        assert!(matches!(s.claim(h(2)), Claim::Fetch));
    }

    #[test]
    fn a_failed_fetch_hands_the_claim_to_a_waiter() {
        let s = Arc::new(ChunkShare::new([h(3)].into_iter(), 4, 0));
        assert!(matches!(s.claim(h(3)), Claim::Fetch));
        let s2 = s.clone();
        let waiter = std::thread::spawn(move || matches!(s2.wait(h(3)), Claim::Fetch));
        std::thread::sleep(std::time::Duration::from_millis(50));
        s.finish(h(3), None);
        assert!(waiter.join().unwrap(), "waiter did not take over the fetch");
    }
}
