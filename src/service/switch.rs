//! The block device `serve` hands to the front end: its backing (engine, plain source,
//! plain disk, or a failed-rollback stand-in) is switched only while no request runs.

use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::blockdev::{BlockBackend, BlockError, GuestBuf, GuestBufMut};

/// A block device whose backing can be replaced between VM connections. Requests hold
/// a shared lock for their whole run, so a switch waits for requests in flight.
pub struct SwitchDisk {
    pub(super) inner: RwLock<Arc<dyn BlockBackend>>,
    /// The same backend as `inner`, reachable without waiting for requests in flight.
    current: Mutex<Arc<dyn BlockBackend>>,
}

impl SwitchDisk {
    pub(super) fn new(b: Arc<dyn BlockBackend>) -> Self {
        Self {
            inner: RwLock::new(b.clone()),
            current: Mutex::new(b),
        }
    }

    /// Replaces the backend; the caller holds the write lock of `inner`.
    pub(super) fn replace(&self, slot: &mut Arc<dyn BlockBackend>, b: Arc<dyn BlockBackend>) {
        *slot = b.clone();
        *self.current.lock() = b;
    }
}

impl BlockBackend for SwitchDisk {
    fn capacity(&self) -> u64 {
        self.inner.read().capacity()
    }
    fn read_only(&self) -> bool {
        self.inner.read().read_only()
    }
    fn logical_block_size(&self) -> u32 {
        self.inner.read().logical_block_size()
    }
    fn optimal_io_size(&self) -> u32 {
        self.inner.read().optimal_io_size()
    }
    fn read_into(&self, offset: u64, buf: &GuestBufMut<'_>) -> Result<(), BlockError> {
        self.inner.read().read_into(offset, buf)
    }
    fn write_from(&self, offset: u64, buf: &GuestBuf<'_>) -> Result<(), BlockError> {
        self.inner.read().write_from(offset, buf)
    }
    fn flush(&self) -> Result<(), BlockError> {
        self.inner.read().flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.inner.read().discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.inner.read().write_zeroes(offset, len)
    }
    fn device_id(&self) -> Vec<u8> {
        self.inner.read().device_id()
    }
    fn is_local(&self, offset: u64, len: u64) -> bool {
        self.inner.read().is_local(offset, len)
    }
    fn cancel_waiting(&self) {
        // Not through `inner.read()`: a rollback waiting for the write lock must not keep
        // this from reaching the requests it waits for.
        let current = self.current.lock().clone();
        current.cancel_waiting();
    }
}

/// What is served after a rollback failed half-way: every request fails (never a mix of
/// source and target bytes) until a restart resumes the rollback from the disk.
pub(super) struct FailedDisk {
    pub(super) capacity: u64,
    pub(super) why: String,
}

impl BlockBackend for FailedDisk {
    fn capacity(&self) -> u64 {
        self.capacity
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read_into(&self, _: u64, _: &GuestBufMut<'_>) -> Result<(), BlockError> {
        Err(BlockError::Unavailable(self.why.clone()))
    }
    fn write_from(&self, _: u64, _: &GuestBuf<'_>) -> Result<(), BlockError> {
        Err(BlockError::Unavailable(self.why.clone()))
    }
    fn flush(&self) -> Result<(), BlockError> {
        Err(BlockError::Unavailable(self.why.clone()))
    }
    fn discard(&self, _: u64, _: u64) -> Result<(), BlockError> {
        Err(BlockError::Unavailable(self.why.clone()))
    }
    fn write_zeroes(&self, _: u64, _: u64) -> Result<(), BlockError> {
        Err(BlockError::Unavailable(self.why.clone()))
    }
    fn device_id(&self) -> Vec<u8> {
        b"streamboot-failed".to_vec()
    }
    fn is_local(&self, _: u64, _: u64) -> bool {
        true
    }
}
