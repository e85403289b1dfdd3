//! Background hydration: fetch every missing chunk, profile order first, then address
//! order, with several requests in flight, a runtime-adjustable rate limit, and yielding
//! to guest requests that wait on the network.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::flight::Claim;
use super::{ChunkIdx, Engine, EngineError, FetchKind, FlightResult};

/// A token bucket in bytes per second; 0 means unlimited. Adjustable while running.
#[derive(Debug)]
pub struct RateLimit {
    bytes_per_sec: AtomicU64,
    bucket: Mutex<(f64, Instant)>,
    /// Bytes taken and not given back (while limited): what the limiter let through.
    taken: AtomicU64,
}

impl RateLimit {
    /// A limiter at `bytes_per_sec` (0 = unlimited).
    pub fn new(bytes_per_sec: u64) -> Self {
        Self {
            bytes_per_sec: AtomicU64::new(bytes_per_sec),
            bucket: Mutex::new((0.0, Instant::now())),
            taken: AtomicU64::new(0),
        }
    }
    /// Changes the rate.
    pub fn set(&self, bytes_per_sec: u64) {
        self.bytes_per_sec.store(bytes_per_sec, Ordering::Relaxed);
    }
    /// Current rate (0 = unlimited).
    pub fn get(&self) -> u64 {
        self.bytes_per_sec.load(Ordering::Relaxed)
    }
    /// Bytes the limiter let through so far (taken minus given back), counted while a
    /// rate was set.
    pub fn taken(&self) -> u64 {
        self.taken.load(Ordering::Relaxed)
    }

    /// Blocks until `n` bytes may be sent.
    pub fn acquire(&self, n: u64) {
        self.acquire_unless(n, &|| false);
    }

    /// Gives back `n` bytes taken but not sent: the next request may use them at once.
    pub fn refund(&self, n: u64) {
        if n > 0 && self.get() > 0 {
            self.bucket.lock().0 += n as f64;
            let _ = self
                .taken
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                    Some(t.saturating_sub(n))
                });
        }
    }

    /// Like [`Self::acquire`], but gives up (returning false, nothing taken) as soon as
    /// `give_up` says so.
    pub fn acquire_unless(&self, n: u64, give_up: &dyn Fn() -> bool) -> bool {
        loop {
            if give_up() {
                return false;
            }
            let rate = self.get();
            if rate == 0 {
                return true;
            }
            let wait = {
                let mut b = self.bucket.lock();
                let now = Instant::now();
                // Allow at most a quarter second of burst.
                b.0 = (b.0 + now.duration_since(b.1).as_secs_f64() * rate as f64)
                    .min(rate as f64 / 4.0);
                b.1 = now;
                if b.0 >= n as f64 || b.0 >= rate as f64 / 4.0 {
                    b.0 -= n as f64;
                    self.taken.fetch_add(n, Ordering::Relaxed);
                    return true;
                }
                (n as f64 - b.0) / rate as f64
            };
            std::thread::sleep(Duration::from_secs_f64(wait.min(0.1)));
        }
    }
}

/// How the hydrator works.
#[derive(Clone, Debug)]
pub struct HydrateOptions {
    /// Worker threads (= requests in flight).
    pub threads: usize,
    /// Most bytes per request (neighbouring missing chunks coalesced up to this).
    pub request_bytes: u64,
    /// Chunks to fetch first, in order (a boot profile).
    pub profile: Vec<u64>,
}

impl Default for HydrateOptions {
    fn default() -> Self {
        Self {
            // Eight 8 MiB requests in flight keep a loopback or LAN link busy while the
            // previous responses are written (measured: 2 threads 0.58x, 8 threads 0.94x
            // curl on tmpfs; see docs/benchmarks.md).
            threads: 8,
            request_bytes: 8 << 20,
            profile: Vec::new(),
        }
    }
}

/// What a hydration run did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct HydrateReport {
    /// Bytes fetched.
    pub bytes: u64,
    /// Requests issued.
    pub requests: u64,
    /// Seconds spent.
    pub secs: f64,
    /// Chunks still missing at the end.
    pub missing: u64,
    /// Stopped because the released area is full (commit finishes the rest).
    pub area_full: bool,
    /// Stopped on request.
    pub stopped: bool,
}

/// Controls for a running hydrator, shared with the control API.
#[derive(Debug)]
pub struct Hydrator {
    /// Rate limit.
    pub rate: RateLimit,
    paused: AtomicBool,
    stop: AtomicBool,
    opts: HydrateOptions,
}

struct Cursor {
    profile_pos: usize,
    next: u64,
}

impl Hydrator {
    /// A hydrator with `opts` and a rate of `bytes_per_sec` (0 = unlimited).
    pub fn new(opts: HydrateOptions, bytes_per_sec: u64) -> Self {
        Self {
            rate: RateLimit::new(bytes_per_sec),
            paused: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            opts,
        }
    }
    /// Pauses or resumes.
    pub fn set_paused(&self, p: bool) {
        self.paused.store(p, Ordering::Relaxed);
    }
    /// True while paused.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }
    /// Asks a running `run` to return soon.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Claims the next run of missing chunks, or `None` when there is none left.
    fn next_claim(
        &self,
        engine: &Engine,
        cur: &Mutex<Cursor>,
    ) -> Option<(ChunkIdx, u64, Arc<super::flight::Flight>)> {
        let total = engine.layout.chunk_count();
        let max = (self.opts.request_bytes / engine.chunk_size()).max(1);
        let missing = |ChunkIdx(i): ChunkIdx| i < total && engine.map.is_missing(i);
        let mut cur = cur.lock();
        while cur.profile_pos < self.opts.profile.len() {
            let c = self.opts.profile[cur.profile_pos];
            cur.profile_pos += 1;
            if c < total {
                if let Claim::Owned {
                    first,
                    count,
                    flight,
                } = engine.inflight.claim(ChunkIdx(c), max, missing)
                {
                    return Some((first, count, flight));
                }
            }
        }
        while cur.next < total {
            let c = cur.next;
            match engine.inflight.claim(ChunkIdx(c), max, missing) {
                Claim::Owned {
                    first,
                    count,
                    flight,
                } => {
                    cur.next = first.0 + count;
                    return Some((first, count, flight));
                }
                Claim::NotNeeded | Claim::Wait(_) => cur.next += 1,
            }
        }
        None
    }

    /// Fetches every missing chunk; returns when none is left, the area is full, a
    /// fetch failed permanently, or `stop` was called. `progress(done, total)` in bytes.
    pub fn run(
        &self,
        engine: &Engine,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<HydrateReport, EngineError> {
        let start = Instant::now();
        let cur = Mutex::new(Cursor {
            profile_pos: 0,
            next: 0,
        });
        let bytes = AtomicU64::new(0);
        let requests = AtomicU64::new(0);
        let area_full = AtomicBool::new(false);
        let exhausted = AtomicBool::new(false);
        let failure: Mutex<Option<String>> = Mutex::new(None);
        let total_missing = engine.status().chunks_missing * engine.chunk_size();
        std::thread::scope(|s| {
            for _ in 0..self.opts.threads.max(1) {
                s.spawn(|| loop {
                    if self.stop.load(Ordering::Relaxed)
                        || area_full.load(Ordering::Relaxed)
                        || failure.lock().is_some()
                    {
                        return;
                    }
                    if self.is_paused() || engine.demand_waiting.load(Ordering::Relaxed) > 0 {
                        std::thread::sleep(Duration::from_millis(if self.is_paused() {
                            50
                        } else {
                            2
                        }));
                        continue;
                    }
                    // Wait for the rate limit before claiming anything, so a stop (or a
                    // guest waiting on a claimed chunk) never waits on the limiter.
                    let budget = self.opts.request_bytes.max(engine.chunk_size());
                    let give_up =
                        || self.stop.load(Ordering::Relaxed) || exhausted.load(Ordering::Relaxed);
                    if !self.rate.acquire_unless(budget, &give_up) {
                        return;
                    }
                    let Some((first, count, flight)) = self.next_claim(engine, &cur) else {
                        // Nothing left to claim: the budget goes back, and the other
                        // workers stop waiting for budget they would not use.
                        exhausted.store(true, Ordering::Relaxed);
                        self.rate.refund(budget);
                        return;
                    };
                    let len = ((first.0 + count) * engine.chunk_size())
                        .min(engine.layout.target_size)
                        - first.0 * engine.chunk_size();
                    self.rate.refund(budget.saturating_sub(len));
                    let r = engine.fetch_run(first, count, FetchKind::Hydrate);
                    match &r {
                        FlightResult::Mapped => {
                            let done = bytes.fetch_add(len, Ordering::Relaxed) + len;
                            requests.fetch_add(1, Ordering::Relaxed);
                            progress(done, total_missing);
                        }
                        FlightResult::Uncached { .. } => area_full.store(true, Ordering::Relaxed),
                        FlightResult::Failed(m) => *failure.lock() = Some(m.clone()),
                        // Background fetches were cancelled (stop, shutdown): end quietly.
                        FlightResult::Cancelled => self.stop(),
                    }
                    engine.inflight.finish(first, count, &flight, r);
                });
            }
        });
        engine.commit_map()?;
        if let Some(m) = failure.into_inner() {
            return Err(EngineError::Block(crate::blockdev::BlockError::Remote(m)));
        }
        Ok(HydrateReport {
            bytes: bytes.into_inner(),
            requests: requests.into_inner(),
            secs: start.elapsed().as_secs_f64(),
            missing: engine.status().chunks_missing,
            area_full: area_full.into_inner(),
            stopped: self.stop.load(Ordering::Relaxed),
        })
    }
}
