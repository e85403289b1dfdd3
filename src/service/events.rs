//! What the vhost layer tells the service: connections and device starts (trial boots,
//! fallback); and the engine's failed fetches, forwarded as events.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::blockdev::{DeviceEvents, DeviceStart};
use crate::migration::transitions::{device_start, Next, Op};

use super::Service;

impl DeviceEvents for Service {
    fn frontend_connected(&self) {
        self.connected
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn frontend_gone(&self) {
        // Every request of the frontend is done (the vhost layer waited): a rollback may
        // run from now on. A disconnect is never a failed boot.
        self.connected
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    fn device_started(&self, start: DeviceStart) {
        if start != DeviceStart::Boot {
            // The same guest carries on (backend restart, VM resume, the OS taking over
            // from the firmware): nothing changes.
            return;
        }
        let _op = self.ops.lock();
        if let Some(r) = &self.recorder {
            // A profile is one boot: a new boot before confirm starts it over.
            r.restart();
        }
        let Some(e) = self.engine() else { return };
        let (state, n) = e.with_meta(|m| (m.state(), m.superblock().start_counter));
        let next = match device_start(state, n, self.max_trial) {
            (Op::Fallback, Ok(_)) => return self.fall_back(n),
            (_, Ok(Next::Enter(next))) => next,
            _ => return, // confirmed or committing: no trial to count
        };
        let r = e.update_superblock(|sb| {
            sb.state = next;
            sb.start_counter = sb.start_counter.saturating_add(1);
        });
        match r {
            Ok(()) => self.emit(
                "trial-start",
                &format!("trial start {} of {}", n.saturating_add(1), self.max_trial),
            ),
            Err(err) => tracing::error!("recording the trial start failed: {err}"),
        }
    }
}

/// At most one `fetch-error` (and one `integrity-error`) event per this interval; the
/// failures in between are counted into the next event.
const FETCH_EVENT_EVERY: Duration = Duration::from_secs(10);

/// Rate limit of one kind of fetch failure event.
#[derive(Default)]
struct Throttle {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// `Some(failures since the last event, this one included)` when an event is due.
    fn hit(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < FETCH_EVENT_EVERY)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed) + 1)
    }
}

impl Service {
    /// Emits `fetch-error` / `integrity-error` events for failed fetches of the engine
    /// (at most one of each kind per 10 s, counting the failures in between). The hook
    /// runs on the data path and only queues the event.
    pub fn forward_fetch_errors(&self) {
        let Some(e) = self.engine() else { return };
        let me = self.me.lock().clone();
        let throttle: Mutex<[Throttle; 2]> = Mutex::default();
        e.counters().set_error_hook(move |integrity, msg| {
            let due = throttle.lock()[usize::from(integrity)].hit(Instant::now());
            let (Some(n), Some(svc)) = (due, me.upgrade()) else {
                return;
            };
            let event = if integrity {
                "integrity-error"
            } else {
                "fetch-error"
            };
            svc.emit(
                event,
                &format!("{msg} ({n} failed fetches since the last report)"),
            );
        });
    }

    /// A fresh device start with the trial starts used up: roll back; this start sees the
    /// source. The caller holds `ops`; no request of the start has run yet.
    fn fall_back(&self, starts: u8) {
        tracing::warn!(
            starts,
            "trial start limit reached without confirm: falling back to the source"
        );
        match self.do_rollback("fell back", false) {
            Ok(_) => {
                *self.last_error.lock() = Some(
                    "trial start limit reached without confirm: fell back to the source".into(),
                );
                self.emit("fallback", "fell back to the source at a device start");
            }
            Err(err) => {
                tracing::error!("fallback failed: {err}");
                *self.last_error.lock() = Some(format!("fallback failed: {err}"));
            }
        }
    }
}
