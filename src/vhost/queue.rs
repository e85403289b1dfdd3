//! Per-queue state shared between a queue's worker thread and the I/O pool.
//!
//! Requests handed to the pool complete out of order: the I/O thread pushes a
//! [`Completion`] here and writes the queue's eventfd; the queue worker, which has that
//! eventfd in its epoll set, puts the completions into the used ring and signals the guest.
//! The in-flight count lets `GET_VRING_BASE` wait until every accepted request is in the
//! used ring, as the vhost-user spec requires before the ring is handed back.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};

use parking_lot::{Condvar, Mutex};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::virtio::Completion;

/// State of one virtqueue that outlives a single kick.
pub(crate) struct QueueCtx {
    /// Completions of deferred requests not yet in the used ring.
    completions: Mutex<Vec<Completion>>,
    /// Written by an I/O thread after pushing a completion.
    event: EventFd,
    /// Requests handed to the pool whose completion is not yet in the used ring.
    inflight: Mutex<usize>,
    idle: Condvar,
    /// Held by the worker while it takes requests off the available ring, so that
    /// stopping the ring can wait for a pass in progress.
    pub(crate) processing: Mutex<()>,
}

impl QueueCtx {
    pub(crate) fn new() -> io::Result<Self> {
        Ok(Self {
            completions: Mutex::new(Vec::new()),
            event: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?,
            inflight: Mutex::new(0),
            idle: Condvar::new(),
            processing: Mutex::new(()),
        })
    }

    /// The eventfd the worker listens on.
    pub(crate) fn event_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }

    /// Counts a request handed to the pool.
    pub(crate) fn begin(&self) {
        *self.inflight.lock() += 1;
    }

    /// Called by an I/O thread when a deferred request finished.
    pub(crate) fn complete(&self, completion: Completion) {
        self.completions.lock().push(completion);
        if let Err(e) = self.event.write(1) {
            tracing::error!(error = %e, "cannot signal a completion to the queue worker");
        }
    }

    /// Makes the worker run its completion handler (with nothing to complete).
    pub(crate) fn wake(&self) {
        if let Err(e) = self.event.write(1) {
            tracing::error!(error = %e, "cannot wake the queue worker");
        }
    }

    /// Takes the pending completions (and clears the eventfd).
    pub(crate) fn take(&self) -> Vec<Completion> {
        // Read before taking: a completion pushed after the read re-arms the eventfd.
        let _ = self.event.read();
        std::mem::take(&mut *self.completions.lock())
    }

    /// Marks `n` deferred requests as returned to the guest.
    pub(crate) fn finish(&self, n: usize) {
        if n == 0 {
            return;
        }
        let mut inflight = self.inflight.lock();
        *inflight = inflight.saturating_sub(n);
        if *inflight == 0 {
            self.idle.notify_all();
        }
    }

    /// Deferred requests not yet returned to the guest.
    pub(crate) fn inflight(&self) -> usize {
        *self.inflight.lock()
    }

    /// Blocks until every deferred request is in the used ring.
    pub(crate) fn wait_idle(&self) {
        let mut inflight = self.inflight.lock();
        while *inflight > 0 {
            self.idle.wait(&mut inflight);
        }
    }
}
