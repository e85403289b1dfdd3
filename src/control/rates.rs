//! Fetch rates over a sliding window of counter samples.
//!
//! The server samples [`FetchedBytes`] about once a second (and on every status request);
//! a rate is the counter difference between the newest sample and the youngest sample at
//! least one window older, divided by the time between them. Until the history spans a
//! whole window the oldest sample is used instead, so rates are available after the
//! second sample.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::{FetchedBytes, Rates};

/// Samples closer together than this are not recorded (bounds memory when status is
/// polled in a tight loop: at most `window / MIN_SPACING` + 1 samples are kept).
const MIN_SPACING: Duration = Duration::from_millis(100);

/// Shortest span a rate is computed over; shorter spans are too noisy.
const MIN_SPAN: Duration = Duration::from_millis(500);

/// A sliding window of `(time, counters)` samples.
#[derive(Debug)]
pub(crate) struct RateWindow {
    window: Duration,
    samples: VecDeque<(Instant, FetchedBytes)>,
}

impl RateWindow {
    /// An empty history measuring over `window`.
    pub(crate) fn new(window: Duration) -> Self {
        Self {
            window,
            samples: VecDeque::new(),
        }
    }

    /// Records the counters as of `now`. A counter that went down (the engine was
    /// replaced, e.g. after a fallback) restarts the history.
    pub(crate) fn record(&mut self, now: Instant, fetched: FetchedBytes) {
        if let Some(&(last_t, last)) = self.samples.back() {
            if fetched.demand < last.demand || fetched.background < last.background {
                self.samples.clear();
            } else if now.saturating_duration_since(last_t) < MIN_SPACING {
                return;
            }
        }
        self.samples.push_back((now, fetched));
        // Keep exactly one sample at least a window old (the reference), drop older ones.
        while self.samples.len() >= 2
            && now.saturating_duration_since(self.samples[1].0) >= self.window
        {
            self.samples.pop_front();
        }
    }

    /// The rates between the reference sample and the newest one.
    pub(crate) fn rates(&self) -> Rates {
        let (Some(&(t0, a)), Some(&(t1, b))) = (self.samples.front(), self.samples.back()) else {
            return Rates::default();
        };
        let span = t1.saturating_duration_since(t0);
        if span < MIN_SPAN {
            return Rates::default();
        }
        let secs = span.as_secs_f64();
        Rates {
            demand_bytes_per_sec: b.demand.saturating_sub(a.demand) as f64 / secs,
            background_bytes_per_sec: b.background.saturating_sub(a.background) as f64 / secs,
            window_secs: secs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(demand: u64, background: u64) -> FetchedBytes {
        FetchedBytes { demand, background }
    }

    #[test]
    fn no_rate_before_two_samples_half_a_second_apart() {
        let t = Instant::now();
        let mut w = RateWindow::new(Duration::from_secs(10));
        assert_eq!(w.rates(), Rates::default());
        w.record(t, f(0, 0));
        assert_eq!(w.rates(), Rates::default());
        w.record(t + Duration::from_millis(200), f(100, 100));
        assert_eq!(w.rates(), Rates::default());
        w.record(t + Duration::from_secs(2), f(2000, 4000));
        let r = w.rates();
        assert_eq!(r.window_secs, 2.0);
        assert_eq!(r.demand_bytes_per_sec, 1000.0);
        assert_eq!(r.background_bytes_per_sec, 2000.0);
    }

    #[test]
    fn steady_sampling_measures_over_the_last_window_only() {
        let t = Instant::now();
        let mut w = RateWindow::new(Duration::from_secs(10));
        // 30 s at 1 MB/s background, then 10 s at 5 MB/s.
        let mut bg = 0;
        for s in 0..=40u64 {
            if s > 0 {
                bg += if s <= 30 { 1_000_000 } else { 5_000_000 };
            }
            w.record(t + Duration::from_secs(s), f(0, bg));
        }
        let r = w.rates();
        assert_eq!(r.window_secs, 10.0);
        assert_eq!(r.background_bytes_per_sec, 5_000_000.0);
        assert_eq!(r.demand_bytes_per_sec, 0.0);
        assert!(w.samples.len() <= 12, "{} samples kept", w.samples.len());
    }

    #[test]
    fn sparse_sampling_uses_the_previous_sample() {
        let t = Instant::now();
        let mut w = RateWindow::new(Duration::from_secs(10));
        w.record(t, f(0, 0));
        w.record(t + Duration::from_secs(15), f(15_000, 0));
        w.record(t + Duration::from_secs(30), f(45_000, 0));
        let r = w.rates();
        assert_eq!(r.window_secs, 15.0);
        assert_eq!(r.demand_bytes_per_sec, 2000.0);
    }

    #[test]
    fn counter_reset_restarts_the_history() {
        let t = Instant::now();
        let mut w = RateWindow::new(Duration::from_secs(10));
        w.record(t, f(0, 0));
        w.record(t + Duration::from_secs(5), f(5000, 5000));
        w.record(t + Duration::from_secs(6), f(10, 0));
        assert_eq!(w.rates(), Rates::default());
        w.record(t + Duration::from_secs(8), f(2010, 0));
        assert_eq!(w.rates().demand_bytes_per_sec, 1000.0);
    }

    #[test]
    fn tight_polling_keeps_memory_bounded() {
        let t = Instant::now();
        let mut w = RateWindow::new(Duration::from_secs(10));
        for ms in 0..60_000u64 {
            w.record(t + Duration::from_millis(ms), f(ms, 0));
        }
        assert!(w.samples.len() <= 102, "{} samples kept", w.samples.len());
        let r = w.rates();
        assert!((r.demand_bytes_per_sec - 1000.0).abs() < 1.0, "{r:?}");
    }
}
