//! Counters the engine keeps for status, metrics and benchmarks.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use serde::Serialize;

/// Monotonic counters, updated lock-free.
#[derive(Debug)]
pub struct Counters {
    started: Instant,
    /// Bytes fetched because a guest request needed them.
    pub fetched_demand: AtomicU64,
    /// Bytes fetched by the hydrator.
    pub fetched_background: AtomicU64,
    /// Bytes copied from the local disk instead of fetched (seeding).
    pub seeded: AtomicU64,
    /// Remote fetch requests issued.
    pub fetch_requests: AtomicU64,
    /// Remote fetches that failed (after the source's own retries).
    pub fetch_errors: AtomicU64,
    /// Chunks evicted from slots.
    pub evictions: AtomicU64,
    /// Bytes read by the guest.
    pub read_bytes: AtomicU64,
    /// Bytes written by the guest.
    pub written_bytes: AtomicU64,
    /// Reads served without caching because the area was full.
    pub uncached_reads: AtomicU64,
    /// Writes refused because the area was full of dirty chunks.
    pub nospace_errors: AtomicU64,
    /// Microseconds from open to the first guest read (0 = none yet).
    pub first_read_us: AtomicU64,
    /// Map commits written.
    pub commits: AtomicU64,
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            fetched_demand: AtomicU64::new(0),
            fetched_background: AtomicU64::new(0),
            seeded: AtomicU64::new(0),
            fetch_requests: AtomicU64::new(0),
            fetch_errors: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            read_bytes: AtomicU64::new(0),
            written_bytes: AtomicU64::new(0),
            uncached_reads: AtomicU64::new(0),
            nospace_errors: AtomicU64::new(0),
            first_read_us: AtomicU64::new(0),
            commits: AtomicU64::new(0),
        }
    }
}

impl Counters {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }

    pub(crate) fn note_read(&self, n: u64) {
        self.read_bytes.fetch_add(n, Relaxed);
        if self.first_read_us.load(Relaxed) == 0 {
            let us = self.started.elapsed().as_micros().max(1) as u64;
            let _ = self.first_read_us.compare_exchange(0, us, Relaxed, Relaxed);
        }
    }

    /// Seconds since the engine opened.
    pub fn uptime_secs(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }
}

/// A point-in-time view of the migration, for `status`, the control API and metrics.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Status {
    pub state: String,
    pub chunk_size: u64,
    pub target_size: u64,
    pub source_size: u64,
    pub chunks_total: u64,
    pub chunks_home: u64,
    pub chunks_slotted: u64,
    pub chunks_zero: u64,
    pub chunks_missing: u64,
    pub chunks_dirty: u64,
    pub chunks_saved_source: u64,
    pub slots_total: u64,
    pub slots_free: u64,
    pub bytes_fetched_demand: u64,
    pub bytes_fetched_background: u64,
    pub bytes_seeded: u64,
    pub bytes_saved_source: u64,
    pub fetch_requests: u64,
    pub fetch_errors: u64,
    pub evictions: u64,
    pub start_counter: u8,
    pub max_trial_starts: u8,
    pub target_kind: String,
    pub target_validator: String,
    pub target_urls: Vec<String>,
    pub first_read_ms: Option<f64>,
    pub uptime_secs: f64,
}

impl Status {
    /// Fraction of target chunks that are local (home, slotted or known zero).
    pub fn local_fraction(&self) -> f64 {
        if self.chunks_total == 0 {
            return 1.0;
        }
        1.0 - self.chunks_missing as f64 / self.chunks_total as f64
    }
}
