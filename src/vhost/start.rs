//! Telling device starts apart: a guest driver starting the device with fresh rings (a new
//! VM, or a reboot inside the same VMM process) versus the same running guest carrying on
//! after a backend restart, a pause/resume or a migration.
//!
//! What the vhost-user protocol shows us (QEMU 7.2, measured; docs/architecture.md):
//! - The device is *stopped* with `SET_VRING_ENABLE 0` and `GET_VRING_BASE` on every ring:
//!   at a guest reset (the driver writes status 0), at a VM pause, before a migration, and
//!   when the VMM quits. The backend cannot tell these apart when they happen.
//! - The device is *started* with `SET_FEATURES`, `SET_MEM_TABLE`, and per ring
//!   `SET_VRING_NUM/BASE/ADDR/KICK/CALL`, then `SET_VRING_ENABLE 1`. After a reset the
//!   virtio core has zeroed its ring positions, so every `SET_VRING_BASE` is 0. When the
//!   same driver carries on (resume, reconnect to a restarted backend) the base is where
//!   the ring stood, which is not 0 once the guest has issued any request (the kernel
//!   reads the partition table at probe).
//!
//! So the first kick after the connection began or after every ring stopped is a device
//! start, *fresh* when every ring that is set up starts at position 0, *resumed*
//! otherwise. A kick that races a stop (the ring is no longer ready when the worker gets
//! to it) starts nothing.
//!
//! Firmware that boots from the disk (SeaBIOS, OVMF) drives it with its own virtio driver
//! first, then the kernel's driver resets and starts it again: two fresh starts in one
//! boot. Firmware drivers do not negotiate `VIRTIO_RING_F_EVENT_IDX`; the drivers of
//! operating systems (Linux, Windows' viostor) do. A fresh start of an OS driver right
//! after a firmware start on the same connection continues that boot
//! ([`DeviceStart::SameBoot`]); every other fresh start is a new boot
//! ([`DeviceStart::Boot`]). So each boot counts once and the contents can only switch at
//! its first start, before the firmware read anything.
//!
//! A resumed ring whose position wrapped to exactly 0 (a multiple of 65536 requests) on
//! every ring reads as fresh: about one backend restart in 65536 with one queue. At the
//! trial limit that would fall back under the running guest; the vhost-user protocol as
//! the vhost crates implement it offers no stronger signal (QEMU's inflight-tracking
//! memory would be one).

use std::sync::Arc;

use parking_lot::Mutex;
use vhost_user_backend::VringT;
use virtio_queue::QueueT;

use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

use crate::blockdev::{DeviceEvents, DeviceStart};

use super::backend::Vring;

/// Device start bookkeeping of one connection.
pub(crate) struct StartTracker {
    events: Option<Arc<dyn DeviceEvents>>,
    /// Every queue's vring, as the workers hand them to us (see `BlkBackend::prime`).
    vrings: Mutex<Vec<Option<Vring>>>,
    /// True between a device start and the stop of every ring. Held while a start is
    /// decided, so no queue processes a request of a start before `device_started` ran.
    running: Mutex<bool>,
    /// The last fresh start on this connection was a firmware driver's.
    after_firmware: Mutex<bool>,
}

impl StartTracker {
    pub(crate) fn new(num_queues: usize, events: Option<Arc<dyn DeviceEvents>>) -> Self {
        Self {
            events,
            vrings: Mutex::new(vec![None; num_queues]),
            running: Mutex::new(false),
            after_firmware: Mutex::new(false),
        }
    }

    /// Remembers queue `q`'s vring (the same object for the whole connection).
    pub(crate) fn remember(&self, q: usize, vring: &Vring) {
        let mut v = self.vrings.lock();
        if let Some(slot @ None) = v.get_mut(q) {
            *slot = Some(vring.clone());
        }
    }

    /// Number of queues whose vring we know.
    pub(crate) fn known(&self) -> usize {
        self.vrings.lock().iter().filter(|v| v.is_some()).count()
    }

    /// Called by a queue worker that holds its queue's processing lock and found its ring
    /// ready, before it takes requests: on the first call of a start, decides what kind
    /// of start it is and tells the layer above, then `after_start` runs (still before any
    /// request of the start). `acked` are the driver's negotiated virtio features.
    pub(crate) fn before_processing(&self, acked: u64, after_start: impl FnOnce()) {
        let mut running = self.running.lock();
        if *running {
            return;
        }
        let Some(start) = self.classify(acked) else {
            return; // no ring is ready: a kick that raced a stop
        };
        tracing::info!(?start, "guest started the device");
        if let Some(ev) = &self.events {
            ev.device_started(start);
        }
        after_start();
        *running = true;
    }

    /// `None` when no ring is ready; else fresh or resumed (module documentation).
    fn classify(&self, acked: u64) -> Option<DeviceStart> {
        let (mut any_ready, mut resumed) = (false, false);
        for v in self.vrings.lock().iter().flatten() {
            let state = v.get_ref();
            let queue = state.get_queue();
            if queue.ready() {
                any_ready = true;
                resumed |= queue.next_avail() != 0;
            }
        }
        if !any_ready {
            return None;
        }
        if resumed {
            return Some(DeviceStart::Resumed);
        }
        let firmware = acked & (1 << VIRTIO_RING_F_EVENT_IDX) == 0;
        let mut after_firmware = self.after_firmware.lock();
        let start = if !firmware && *after_firmware {
            DeviceStart::SameBoot
        } else {
            DeviceStart::Boot
        };
        *after_firmware = firmware;
        Some(start)
    }

    /// Called when a ring stopped (`GET_VRING_BASE`) or the device was reset: once no
    /// ring is running, the next kick is a new device start.
    pub(crate) fn ring_stopped(&self) {
        let any_ready = self
            .vrings
            .lock()
            .iter()
            .flatten()
            .any(|v| v.get_ref().get_queue().ready());
        if !any_ready {
            let mut running = self.running.lock();
            if *running {
                tracing::info!("guest stopped the device");
            }
            *running = false;
        }
    }

    /// Forgets the running start (device reset).
    pub(crate) fn reset(&self) {
        *self.running.lock() = false;
    }
}
