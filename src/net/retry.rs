//! Retry timing for remote sources: exponential backoff with jitter, bounded by an optional
//! deadline.
//!
//! Kept separate from the HTTP code so every source that talks to a network (raw HTTP
//! images, chunk stores) waits the same way: quickly at first, then less and less often,
//! never in lock step with other clients (jitter), and never longer than the caller allows.

use std::time::{Duration, Instant};

use rand::Rng;

/// How long to wait between attempts and when to give up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// Delay before the first retry (before jitter).
    pub base: Duration,
    /// Upper bound of any single delay (before jitter).
    pub max: Duration,
}

impl Backoff {
    /// Delay before retry number `retry` (0 = first retry): `min(max, base * 2^retry)`,
    /// scaled by a random factor in `[0.5, 1.0]` so that many waiting clients spread out.
    pub fn delay(&self, retry: u32) -> Duration {
        let nominal = self.nominal(retry);
        let factor: f64 = rand::rng().random_range(0.5..=1.0);
        nominal.mul_f64(factor)
    }

    /// The delay before jitter: `min(max, base * 2^retry)`, saturating.
    pub fn nominal(&self, retry: u32) -> Duration {
        let factor = 1u32.checked_shl(retry.min(31)).unwrap_or(u32::MAX);
        self.base
            .checked_mul(factor)
            .map_or(self.max, |d| d.min(self.max))
    }
}

/// Bounds a sequence of attempts in time. `None` means "keep trying": the guest waits for
/// its data rather than getting an I/O error for a fault that will go away.
#[derive(Clone, Copy, Debug)]
pub struct Deadline {
    end: Option<Instant>,
}

impl Deadline {
    /// A deadline `limit` from now (`None`: no deadline).
    pub fn after(limit: Option<Duration>) -> Self {
        Deadline {
            end: limit.and_then(|l| Instant::now().checked_add(l)),
        }
    }

    /// True when sleeping `delay` and then trying again would still start before the
    /// deadline.
    pub fn allows(&self, delay: Duration) -> bool {
        match self.end {
            None => true,
            Some(end) => Instant::now()
                .checked_add(delay)
                .is_some_and(|wake| wake < end),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_doubles_and_saturates() {
        let b = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        assert_eq!(b.nominal(0), Duration::from_millis(100));
        assert_eq!(b.nominal(1), Duration::from_millis(200));
        assert_eq!(b.nominal(4), Duration::from_millis(1600));
        assert_eq!(b.nominal(5), Duration::from_secs(2));
        assert_eq!(b.nominal(1000), Duration::from_secs(2));
        for retry in 0..40 {
            let d = b.delay(retry);
            assert!(d >= b.nominal(retry) / 2 && d <= b.nominal(retry));
        }
    }

    #[test]
    fn deadline_bounds_waits() {
        assert!(Deadline::after(None).allows(Duration::from_secs(1 << 40)));
        let d = Deadline::after(Some(Duration::from_millis(500)));
        assert!(d.allows(Duration::from_millis(10)));
        assert!(!d.allows(Duration::from_secs(1)));
        let past = Deadline::after(Some(Duration::ZERO));
        assert!(!past.allows(Duration::ZERO));
    }
}
