//! Execution of a validated request against a [`BlockBackend`].
//!
//! Reads and writes move no data through the device: the data segments are looked up
//! through vm-memory (bounds-checked, host-contiguous [`VolatileSlice`]s) and handed to
//! the backend as one [`GuestBuf`]/[`GuestBufMut`], so the backend's `preadv`/`pwritev`
//! goes straight between the disk (or page cache) and the guest's buffers, as
//! qemu-storage-daemon's does. No Rust reference is ever made over guest memory.

use vm_memory::{Bytes, GuestMemory, Permissions, VolatileSlice};

use crate::blockdev::{BlockBackend, BlockError, GuestBuf, GuestBufMut};

use super::request::{Request, RequestKind, Segment};
use super::{Completion, Status, ID_BYTES};

/// Device state that changes how requests run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExecOptions {
    /// Write-back cache mode. When false (write-through: the driver turned the cache off
    /// or did not negotiate FLUSH), every write is flushed before it completes.
    pub writeback: bool,
}

impl Default for ExecOptions {
    fn default() -> Self {
        Self { writeback: true }
    }
}

/// Runs `req`, writes its status byte and returns the completion for the used ring.
pub fn execute<G: GuestMemory<Bitmap = ()> + ?Sized>(
    req: &Request,
    mem: &G,
    backend: &dyn BlockBackend,
    opts: ExecOptions,
) -> Completion {
    let (status, data_len) = match run(req, mem, backend, opts) {
        Ok(n) => (Status::Ok, n),
        Err(e) => {
            // Failures of the backend (space, disk, network) are the operator's business;
            // what a guest asks wrongly (range, read-only, unsupported) is the guest's.
            if e.is_backend_failure() {
                tracing::warn!(head = req.head_index(), error = %e, "virtio-blk request failed");
            } else {
                tracing::debug!(head = req.head_index(), error = %e, "virtio-blk request failed");
            }
            (e.status(), 0)
        }
    };
    // The status address was checked when the request was parsed; a failure here means
    // the memory map changed under us, and there is nobody left to tell.
    let status_written = mem.write_obj(status as u8, req.status_addr()).is_ok();
    Completion {
        head_index: req.head_index(),
        used_len: data_len + u32::from(status_written),
        status,
    }
}

/// Why an execution failed.
#[derive(Debug, thiserror::Error)]
enum ExecError {
    #[error(transparent)]
    Backend(#[from] BlockError),
    #[error("guest memory access failed: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

impl ExecError {
    fn is_backend_failure(&self) -> bool {
        matches!(
            self,
            ExecError::Backend(
                BlockError::NoSpace
                    | BlockError::Remote(_)
                    | BlockError::Io(_)
                    | BlockError::Unavailable(_)
            )
        )
    }

    fn status(&self) -> Status {
        match self {
            ExecError::Backend(BlockError::Unsupported(_)) => Status::Unsupp,
            _ => Status::IoErr,
        }
    }
}

/// Executes the request; returns the number of data bytes written into guest memory.
fn run<G: GuestMemory<Bitmap = ()> + ?Sized>(
    req: &Request,
    mem: &G,
    backend: &dyn BlockBackend,
    opts: ExecOptions,
) -> Result<u32, ExecError> {
    match req.kind() {
        RequestKind::Read {
            offset,
            len,
            segments,
        } => {
            guest_read(mem, backend, *offset, *len, segments)?;
            // Bounded by size_max * seg_max, which fits in u32 for any sane limits;
            // saturate rather than wrap if it ever does not.
            Ok(u32::try_from(*len).unwrap_or(u32::MAX))
        }
        RequestKind::Write {
            offset,
            len,
            segments,
        } => {
            guest_write(mem, backend, *offset, *len, segments)?;
            if !opts.writeback {
                backend.flush()?;
            }
            Ok(0)
        }
        RequestKind::Flush => {
            backend.flush()?;
            Ok(0)
        }
        RequestKind::GetId { segments } => {
            let mut id = backend.device_id();
            id.resize(ID_BYTES, 0);
            let room: usize = segments.iter().map(|s| s.len as usize).sum();
            let n = room.min(ID_BYTES);
            scatter(mem, segments, &id[..n])?;
            Ok(n as u32)
        }
        RequestKind::Discard { ranges } => {
            for r in ranges {
                backend.discard(r.offset, r.len)?;
            }
            Ok(0)
        }
        RequestKind::WriteZeroes { ranges, .. } => {
            for r in ranges {
                backend.write_zeroes(r.offset, r.len)?;
            }
            if !opts.writeback {
                backend.flush()?;
            }
            Ok(0)
        }
    }
}

/// Appends the host-contiguous pieces of guest segment `seg` (one piece unless the
/// segment spans two memory regions), as vm-memory hands them out after checking them
/// against the memory map for `access`, to `push`; fails unless they cover the segment.
fn pieces_of<'m, G>(
    mem: &'m G,
    seg: &Segment,
    access: Permissions,
    mut push: impl FnMut(VolatileSlice<'m>),
) -> Result<(), ExecError>
where
    G: GuestMemory<Bitmap = ()> + ?Sized,
{
    let want = seg.len as usize;
    let mut got = 0usize;
    for slice in mem.get_slices(seg.addr, want, access)? {
        let slice = slice?;
        got += slice.len();
        push(slice);
    }
    if got != want {
        return Err(vm_memory::GuestMemoryError::PartialBuffer {
            expected: want,
            completed: got,
        }
        .into());
    }
    Ok(())
}

/// Reads `len` device bytes at `offset` straight into the guest's `segments`: the
/// segments become one [`GuestBufMut`] (volatile slices over guest memory, never a Rust
/// reference) and the backend stores into it, with one `preadv` per contiguous device
/// range for local data and volatile copies for fetched data.
///
/// The parser checked every segment against guest memory; vm-memory checks each again
/// where the slice is made, before any byte moves. The guest may change its buffers while
/// the backend stores into them, as during a real DMA transfer: those bytes are then
/// unspecified, nothing else is affected. The slices borrow `mem`, the memory snapshot
/// the caller holds for the whole request, which keeps every region mapped even if the
/// frontend replaces the memory table meanwhile.
fn guest_read<G: GuestMemory<Bitmap = ()> + ?Sized>(
    mem: &G,
    backend: &dyn BlockBackend,
    offset: u64,
    len: u64,
    segments: &[Segment],
) -> Result<(), ExecError> {
    let mut buf = GuestBufMut::new();
    for seg in segments {
        pieces_of(mem, seg, Permissions::Write, |s| buf.push(s))?;
    }
    debug_assert_eq!(
        buf.len() as u64,
        len,
        "segments do not add up to the request"
    );
    backend.read_into(offset, &buf)?;
    Ok(())
}

/// Writes the guest's `segments` (`len` bytes) at device offset `offset`, taken straight
/// from guest memory as one [`GuestBuf`] (`pwritev` for local data). Checked as in
/// [`guest_read`]; bytes the guest changes meanwhile reach the disk unspecified, as with
/// DMA from a buffer the driver did not leave alone. A failure midway leaves the range
/// partly written, as any failed write may.
fn guest_write<G: GuestMemory<Bitmap = ()> + ?Sized>(
    mem: &G,
    backend: &dyn BlockBackend,
    offset: u64,
    len: u64,
    segments: &[Segment],
) -> Result<(), ExecError> {
    let mut buf = GuestBuf::new();
    for seg in segments {
        pieces_of(mem, seg, Permissions::Read, |s| buf.push(s))?;
    }
    debug_assert_eq!(
        buf.len() as u64,
        len,
        "segments do not add up to the request"
    );
    backend.write_from(offset, &buf)?;
    Ok(())
}

/// Copies `data` into the start of `segments` (small replies such as the device id).
fn scatter<G: GuestMemory + ?Sized>(
    mem: &G,
    segments: &[Segment],
    data: &[u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut done = 0usize;
    for seg in segments {
        if done == data.len() {
            break;
        }
        let n = (data.len() - done).min(seg.len as usize);
        mem.write_slice(&data[done..done + n], seg.addr)?;
        done += n;
    }
    Ok(())
}
