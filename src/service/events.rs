//! What the vhost layer tells the service: connections and device starts (trial boots,
//! fallback).

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

impl Service {
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
