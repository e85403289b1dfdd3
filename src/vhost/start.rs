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
//! otherwise. A resumed ring whose position wrapped to exactly 0 (a multiple of 65536
//! requests on every ring) would read as fresh; the layer above treats a fresh start as
//! a new boot, which at worst counts one trial start too many.

use std::sync::Arc;

use parking_lot::Mutex;
use vhost_user_backend::VringT;
use virtio_queue::QueueT;

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
}

impl StartTracker {
    pub(crate) fn new(num_queues: usize, events: Option<Arc<dyn DeviceEvents>>) -> Self {
        Self {
            events,
            vrings: Mutex::new(vec![None; num_queues]),
            running: Mutex::new(false),
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

    /// Called before a queue processes requests: on the first call of a start, decides
    /// fresh or resumed and tells the layer above, then `after_start` runs (still before
    /// any request of the start). Returns true when this call started the device.
    pub(crate) fn before_processing(&self, after_start: impl FnOnce()) -> bool {
        let mut running = self.running.lock();
        if *running {
            return false;
        }
        let start = self.classify();
        tracing::info!(?start, "guest started the device");
        if let Some(ev) = &self.events {
            ev.device_started(start);
        }
        after_start();
        *running = true;
        true
    }

    /// Fresh when every ring that is set up starts at position 0.
    fn classify(&self) -> DeviceStart {
        let vrings = self.vrings.lock();
        let resumed = vrings.iter().flatten().any(|v| {
            let state = v.get_ref();
            let queue = state.get_queue();
            queue.ready() && queue.next_avail() != 0
        });
        if resumed {
            DeviceStart::Resumed
        } else {
            DeviceStart::Fresh
        }
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
