//! [`ChunkCache`]: verified chunks kept in memory, least recently used evicted first,
//! bounded in bytes and keyed by chunk hash (so images sharing a chunk share its cache
//! entry). Concurrent misses on one chunk make one fetch: the first caller loads, the
//! others wait for its result. Sector-by-sector clients (boot loaders, kernels) thus fetch
//! each chunk once, not once per sector.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use crate::store::ChunkHash;

type Loaded = Result<Arc<Vec<u8>>, String>;

/// A load in progress, waited on by later callers for the same chunk.
#[derive(Default)]
struct Flight {
    done: Mutex<Option<Loaded>>,
    cv: Condvar,
}

impl Flight {
    fn wait(&self) -> Loaded {
        let mut g = self.done.lock();
        while g.is_none() {
            self.cv.wait(&mut g);
        }
        g.clone().expect("set")
    }

    fn complete(&self, r: Loaded) {
        *self.done.lock() = Some(r);
        self.cv.notify_all();
    }
}

struct Inner {
    lru: lru::LruCache<ChunkHash, Arc<Vec<u8>>>,
    bytes: u64,
    flights: HashMap<ChunkHash, Arc<Flight>>,
}

/// Counters of a [`ChunkCache`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    /// Served from memory.
    pub hits: u64,
    /// Loaded (fetched and verified).
    pub loads: u64,
    /// Waited for another caller's load of the same chunk.
    pub coalesced: u64,
    /// Bytes held now.
    pub bytes: u64,
}

/// See the module documentation.
pub struct ChunkCache {
    inner: Mutex<Inner>,
    capacity: u64,
    hits: AtomicU64,
    loads: AtomicU64,
    coalesced: AtomicU64,
}

/// Removes the flight of `hash` and wakes its waiters with `result`, also when the loader
/// unwinds (waiters then see an error instead of blocking forever).
struct FlightGuard<'a> {
    cache: &'a ChunkCache,
    hash: ChunkHash,
    flight: Arc<Flight>,
    result: Option<Loaded>,
}

impl Drop for FlightGuard<'_> {
    fn drop(&mut self) {
        let r = self
            .result
            .take()
            .unwrap_or_else(|| Err("chunk load panicked".into()));
        {
            let mut g = self.cache.inner.lock();
            g.flights.remove(&self.hash);
            if let Ok(data) = &r {
                self.cache.insert_locked(&mut g, self.hash, data.clone());
            }
        }
        self.flight.complete(r);
    }
}

impl ChunkCache {
    /// A cache holding at most `capacity` bytes of chunks (0: nothing is kept, but
    /// concurrent misses are still coalesced).
    pub fn new(capacity: u64) -> Self {
        ChunkCache {
            inner: Mutex::new(Inner {
                lru: lru::LruCache::unbounded(),
                bytes: 0,
                flights: HashMap::new(),
            }),
            capacity,
            hits: AtomicU64::new(0),
            loads: AtomicU64::new(0),
            coalesced: AtomicU64::new(0),
        }
    }

    /// The chunk `hash`: from memory, from a load already in flight, or from `load` (which
    /// must return the chunk's verified bytes).
    pub fn get_or_load<F>(&self, hash: ChunkHash, load: F) -> Loaded
    where
        F: FnOnce() -> Result<Vec<u8>, String>,
    {
        let flight = {
            let mut g = self.inner.lock();
            if let Some(d) = g.lru.get(&hash) {
                self.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(d.clone());
            }
            if let Some(f) = g.flights.get(&hash) {
                let f = f.clone();
                drop(g);
                self.coalesced.fetch_add(1, Ordering::Relaxed);
                return f.wait();
            }
            let f = Arc::new(Flight::default());
            g.flights.insert(hash, f.clone());
            f
        };
        self.loads.fetch_add(1, Ordering::Relaxed);
        let mut guard = FlightGuard {
            cache: self,
            hash,
            flight,
            result: None,
        };
        let r = load().map(Arc::new);
        guard.result = Some(r.clone());
        drop(guard);
        r
    }

    fn insert_locked(&self, g: &mut Inner, hash: ChunkHash, data: Arc<Vec<u8>>) {
        let len = data.len() as u64;
        if len > self.capacity {
            return;
        }
        while g.bytes + len > self.capacity {
            match g.lru.pop_lru() {
                Some((_, old)) => g.bytes -= old.len() as u64,
                None => break,
            }
        }
        if let Some(old) = g.lru.put(hash, data) {
            g.bytes -= old.len() as u64;
        }
        g.bytes += len;
    }

    /// Current counters.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            loads: self.loads.load(Ordering::Relaxed),
            coalesced: self.coalesced.load(Ordering::Relaxed),
            bytes: self.inner.lock().bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;

    fn h(i: u8) -> ChunkHash {
        ChunkHash([i; 32])
    }

    #[test]
    fn evicts_least_recently_used_within_the_byte_bound() {
        let c = ChunkCache::new(3 * 100);
        for i in 0..3 {
            c.get_or_load(h(i), || Ok(vec![i; 100])).unwrap();
        }
        // Touch 0 so 1 is the least recently used.
        assert_eq!(
            *c.get_or_load(h(0), || panic!("cached")).unwrap(),
            vec![0; 100]
        );
        c.get_or_load(h(3), || Ok(vec![3; 100])).unwrap();
        assert_eq!(c.stats().bytes, 300);
        let mut reloaded = false;
        c.get_or_load(h(1), || {
            reloaded = true;
            Ok(vec![1; 100])
        })
        .unwrap();
        assert!(reloaded, "chunk 1 should have been evicted");
        assert_eq!(
            *c.get_or_load(h(3), || panic!("cached")).unwrap(),
            vec![3; 100]
        );
    }

    #[test]
    fn errors_are_not_cached_and_oversized_chunks_not_kept() {
        let c = ChunkCache::new(50);
        assert!(c.get_or_load(h(1), || Err("boom".into())).is_err());
        assert_eq!(
            *c.get_or_load(h(1), || Ok(vec![1; 10])).unwrap(),
            vec![1; 10]
        );
        c.get_or_load(h(2), || Ok(vec![2; 100])).unwrap();
        assert_eq!(c.stats().bytes, 10);
        assert_eq!(c.stats().loads, 3);
    }

    #[test]
    fn concurrent_misses_load_once() {
        let c = Arc::new(ChunkCache::new(1 << 20));
        let loads = Arc::new(AtomicU64::new(0));
        let gate = Arc::new(Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (c, loads, gate) = (c.clone(), loads.clone(), gate.clone());
                std::thread::spawn(move || {
                    gate.wait();
                    c.get_or_load(h(7), || {
                        loads.fetch_add(1, Ordering::SeqCst);
                        // Hold the flight open so the others find it in progress.
                        std::thread::sleep(std::time::Duration::from_millis(200));
                        Ok(vec![7; 4096])
                    })
                    .unwrap()
                })
            })
            .collect();
        for t in threads {
            assert_eq!(*t.join().unwrap(), vec![7; 4096]);
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        let s = c.stats();
        assert_eq!(s.loads, 1);
        assert_eq!(s.hits + s.coalesced, 7);
    }
}
