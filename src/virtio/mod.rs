//! The virtio-blk request layer: turns a descriptor chain into a typed, validated
//! [`Request`], executes it against a [`BlockBackend`](crate::blockdev::BlockBackend) and
//! writes the status byte back.
//!
//! This layer knows nothing of vhost-user (the transport) nor of the engine behind the
//! backend: it is the part that must be safe against a hostile guest. Every guest address
//! is checked through vm-memory before any backend I/O happens. Read and write data is not
//! copied by the device: each data segment is handed to the backend as a byte slice over
//! guest memory for the duration of one call, so the backend's pread/pwrite moves the
//! bytes directly (see [`execute`] for why that is sound).
//!
//! Module map:
//! - [`limits`]: the device geometry and limits the guest is told and held to.
//! - [`request`]: parsing and validation of a descriptor chain.
//! - [`execute`]: running a parsed request against a backend.

pub mod execute;
pub mod limits;
pub mod request;

pub use execute::{execute, ExecOptions};
pub use limits::Limits;
pub use request::{parse, Range, Rejected, Request, RequestError, RequestKind, Segment};

/// Size of a virtio-blk sector: request offsets are always in 512-byte units.
pub const SECTOR_SIZE: u64 = 512;

/// Number of bytes of a device serial returned by `VIRTIO_BLK_T_GET_ID`.
pub const ID_BYTES: usize = 20;

/// The status byte a device writes at the end of each request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// `VIRTIO_BLK_S_OK`.
    Ok = 0,
    /// `VIRTIO_BLK_S_IOERR`: the request failed or was malformed.
    IoErr = 1,
    /// `VIRTIO_BLK_S_UNSUPP`: the request type (or a flag of it) is not supported.
    Unsupp = 2,
}

/// The outcome of one request, as the queue needs it to fill a used-ring element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// Head descriptor index of the chain.
    pub head_index: u16,
    /// Bytes written into the chain's writable buffers (data plus status byte).
    pub used_len: u32,
    /// The status written to the guest (or that would have been, when the chain had no
    /// status byte).
    pub status: Status,
}

#[cfg(test)]
mod tests;
