//! Counters the engine keeps for status, metrics and benchmarks.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

/// Monotonic counters, updated lock-free.
#[derive(Debug)]
pub struct Counters {
    started: Instant,
    started_at: SystemTime,
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
    /// Latencies of guest requests and fetches.
    pub latency: Latencies,
    /// Called for each fetch that failed (set once, by the service).
    error_hook: OnceLock<ErrorHook>,
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            started_at: SystemTime::now(),
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
            latency: Latencies::default(),
            error_hook: OnceLock::new(),
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

    /// Installs the function told about each failed fetch (`integrity` is true for a
    /// verification failure or a changed image). Only the first call has an effect. The
    /// hook runs on the data path: it must not block.
    pub fn set_error_hook(&self, f: impl Fn(bool, &str) + Send + Sync + 'static) {
        let _ = self.error_hook.set(ErrorHook(Box::new(f)));
    }

    pub(crate) fn fetch_failed(&self, integrity: bool, msg: &str) {
        if let Some(h) = self.error_hook.get() {
            (h.0)(integrity, msg);
        }
    }

    /// Seconds since the Unix epoch when the engine opened.
    pub fn start_time_secs(&self) -> f64 {
        self.started_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64())
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
    /// Seconds since the Unix epoch when the engine opened.
    pub start_time_secs: f64,
    /// Latency histograms (metrics only; not in the status JSON).
    #[serde(skip)]
    pub latency: LatencySnapshot,
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

/// What a failed fetch is reported to: `(integrity, message)`.
type ErrorFn = dyn Fn(bool, &str) + Send + Sync;

struct ErrorHook(Box<ErrorFn>);

impl std::fmt::Debug for ErrorHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ErrorHook")
    }
}

/// Upper bounds (seconds) of the latency histogram buckets; a last `+Inf` bucket follows.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// A lock-free latency histogram with the fixed [`LATENCY_BUCKETS`].
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Observations per bucket (not cumulative); the last one is `+Inf`.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

impl LatencyHistogram {
    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Relaxed);
    }

    /// A guard that records the time until it is dropped.
    pub fn timer(&self) -> Timer<'_> {
        Timer {
            hist: self,
            start: Instant::now(),
        }
    }

    /// The current counts.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let buckets: Vec<u64> = self.buckets.iter().map(|b| b.load(Relaxed)).collect();
        HistogramSnapshot {
            count: buckets.iter().sum(),
            sum_secs: self.sum_ns.load(Relaxed) as f64 / 1e9,
            buckets,
        }
    }
}

/// Records the time from [`LatencyHistogram::timer`] to its drop.
#[derive(Debug)]
pub struct Timer<'a> {
    hist: &'a LatencyHistogram,
    start: Instant,
}

impl Timer<'_> {
    /// Drops the timer without recording (an operation that did not complete).
    pub fn discard(self) {
        std::mem::forget(self);
    }
}

impl Drop for Timer<'_> {
    fn drop(&mut self) {
        self.hist.observe(self.start.elapsed());
    }
}

/// The latency histograms the engine keeps.
#[derive(Debug, Default)]
pub struct Latencies {
    /// Guest reads.
    pub read: LatencyHistogram,
    /// Guest writes.
    pub write: LatencyHistogram,
    /// Guest flushes.
    pub flush: LatencyHistogram,
    /// Fetches a guest request waits for.
    pub fetch_demand: LatencyHistogram,
    /// Fetches of the background hydrator.
    pub fetch_background: LatencyHistogram,
}

impl Latencies {
    /// The fetch histogram for fetches of this kind (guest or background).
    pub fn fetch(&self, kind: super::FetchKind) -> &LatencyHistogram {
        if kind.is_guest() {
            &self.fetch_demand
        } else {
            &self.fetch_background
        }
    }

    /// The current counts of every histogram.
    pub fn snapshot(&self) -> LatencySnapshot {
        LatencySnapshot {
            read: self.read.snapshot(),
            write: self.write.snapshot(),
            flush: self.flush.snapshot(),
            fetch_demand: self.fetch_demand.snapshot(),
            fetch_background: self.fetch_background.snapshot(),
        }
    }
}

/// Counts of one histogram at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HistogramSnapshot {
    /// Observations per bucket of [`LATENCY_BUCKETS`] plus `+Inf` (not cumulative); empty
    /// when nothing was measured (no engine).
    pub buckets: Vec<u64>,
    /// Sum of the observations in seconds.
    pub sum_secs: f64,
    /// Number of observations.
    pub count: u64,
}

/// Counts of every latency histogram at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LatencySnapshot {
    pub read: HistogramSnapshot,
    pub write: HistogramSnapshot,
    pub flush: HistogramSnapshot,
    pub fetch_demand: HistogramSnapshot,
    pub fetch_background: HistogramSnapshot,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_and_sum() {
        let h = LatencyHistogram::default();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_millis(1));
        h.observe(Duration::from_secs(60));
        let s = h.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.buckets.len(), LATENCY_BUCKETS.len() + 1);
        assert_eq!(s.buckets[0], 1);
        assert_eq!(s.buckets[3], 1, "1 ms falls in the le=0.001 bucket");
        assert_eq!(s.buckets[LATENCY_BUCKETS.len()], 1, "60 s only in +Inf");
        assert!((s.sum_secs - 60.00105).abs() < 1e-9);
        drop(h.timer());
        assert_eq!(h.snapshot().count, 4);
    }
}
