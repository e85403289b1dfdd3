//! The block device a front end (vhost-user-blk, NBD) presents: the seam between the
//! request layers and the engine. Front ends know nothing of chunks, slots or sources.

use std::io;

mod buf;

pub use buf::{read_storage, write_storage, GuestBuf, GuestBufMut};

/// Errors a block backend reports to a front end.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The request reaches outside the device.
    #[error("request {offset}+{len} is outside the device ({capacity} bytes)")]
    OutOfRange {
        offset: u64,
        len: u64,
        capacity: u64,
    },
    /// The device is read-only.
    #[error("device is read-only")]
    ReadOnly,
    /// The operation is not supported by this device.
    #[error("unsupported: {0}")]
    Unsupported(&'static str),
    /// No room left to store a write (released area full of dirty chunks).
    #[error("no space left in the released area")]
    NoSpace,
    /// The remote source failed permanently (or past the deadline) for this range.
    #[error("remote source failed: {0}")]
    Remote(String),
    /// Local disk I/O failed.
    #[error("disk I/O failed: {0}")]
    Io(#[from] io::Error),
    /// The backend is shutting down or in a state that refuses I/O.
    #[error("{0}")]
    Unavailable(String),
    /// The request was cancelled before it completed (its requester went away, or the
    /// backend is shutting down); it changed nothing.
    #[error("request cancelled")]
    Cancelled,
}

/// A byte-addressed block device with a fixed capacity.
///
/// Implementations are shared by all queues: every method takes `&self` and may block
/// (for example on a network fetch). Front ends call [`BlockBackend::is_local`] to decide
/// whether a request can run inline on the queue worker or must wait off the worker.
pub trait BlockBackend: Send + Sync {
    /// Capacity in bytes.
    fn capacity(&self) -> u64;
    /// True when writes are refused.
    fn read_only(&self) -> bool;
    /// Logical block size in bytes presented to the guest (512 unless configured).
    fn logical_block_size(&self) -> u32 {
        512
    }
    /// Preferred I/O granularity in bytes (the chunk size), for the topology config.
    fn optimal_io_size(&self) -> u32 {
        4096
    }
    /// Reads `buf.len()` bytes at `offset` into `buf` (guest memory: volatile stores only).
    fn read_into(&self, offset: u64, buf: &GuestBufMut<'_>) -> Result<(), BlockError>;
    /// Writes the bytes of `buf` at `offset` (guest memory: volatile loads only).
    fn write_from(&self, offset: u64, buf: &GuestBuf<'_>) -> Result<(), BlockError>;
    /// Reads `buf.len()` bytes at `offset` into an owned buffer.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.read_into(offset, &GuestBufMut::from_slice(buf))
    }
    /// Writes an owned buffer at `offset`.
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
        self.write_from(offset, &GuestBuf::from_slice(buf))
    }
    /// Makes every write acknowledged so far durable.
    fn flush(&self) -> Result<(), BlockError>;
    /// Hints that `[offset, offset+len)` is no longer needed; contents become unspecified
    /// (this implementation keeps them readable as before or as zeros).
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError>;
    /// Makes `[offset, offset+len)` read as zeros.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError>;
    /// Up to 20 bytes of device serial for VIRTIO_BLK_T_GET_ID.
    fn device_id(&self) -> Vec<u8>;
    /// True when a request on `[offset, offset+len)` needs no network round trip now.
    fn is_local(&self, offset: u64, len: u64) -> bool;
    /// Makes every request now waiting on the network fail soon with
    /// [`BlockError::Cancelled`] (front ends call it when the requester went away).
    /// Requests issued afterwards run normally.
    fn cancel_waiting(&self) {}
}

/// How a guest driver started the device (see [`DeviceEvents::device_started`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceStart {
    /// A new boot: fresh queues of a new VM, or of a guest that reset the device (a
    /// reboot inside the same VMM process). Nothing in the guest depends on what was
    /// served before: the contents may switch here.
    Boot,
    /// Fresh queues of an operating system's driver taking over from the firmware's in
    /// the same boot (the firmware read the boot loader and kernel through its own
    /// driver): the boot continues, the contents must not change.
    SameBoot,
    /// The queues continue where they were: the same running guest after a backend
    /// restart (VMM reconnect), a pause/resume or a migration. What the device presents
    /// must not change.
    Resumed,
}

/// What a front end tells the layer above it about the guest's use of the device. Called
/// from the front end's threads; no request of a start runs before `device_started`
/// returns, so an implementation may switch what the device presents there.
pub trait DeviceEvents: Send + Sync {
    /// A front end (VMM) connected.
    fn frontend_connected(&self) {}
    /// The guest driver started the device.
    fn device_started(&self, _start: DeviceStart) {}
    /// The front end went away and every request it issued has completed or was
    /// cancelled (none will touch the device any more).
    fn frontend_gone(&self) {}
}

/// Checks a request against a capacity.
pub fn check_range(offset: u64, len: u64, capacity: u64) -> Result<(), BlockError> {
    match offset.checked_add(len) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(BlockError::OutOfRange {
            offset,
            len,
            capacity,
        }),
    }
}
