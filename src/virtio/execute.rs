//! Execution of a validated request against a [`BlockBackend`].
//!
//! Reads and writes move no data through the device: each data segment is looked up
//! through vm-memory (bounds-checked, one host-contiguous [`VolatileSlice`] at a time) and
//! handed to the backend as a byte slice over guest memory, so the backend's
//! `pread`/`pwrite` goes straight between the disk (or page cache) and the guest's buffer,
//! as qemu-storage-daemon's `preadv` does. See [`guest_read`] and [`guest_write`] for why
//! that is sound.

use vm_memory::bitmap::{Bitmap, BS};
use vm_memory::{Bytes, GuestMemory, Permissions, VolatileSlice};

use crate::blockdev::{BlockBackend, BlockError};

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
pub fn execute<G: GuestMemory + ?Sized>(
    req: &Request,
    mem: &G,
    backend: &dyn BlockBackend,
    opts: ExecOptions,
) -> Completion {
    let (status, data_len) = match run(req, mem, backend, opts) {
        Ok(n) => (Status::Ok, n),
        Err(e) => {
            tracing::debug!(head = req.head_index(), error = %e, "virtio-blk request failed");
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
    fn status(&self) -> Status {
        match self {
            ExecError::Backend(BlockError::Unsupported(_)) => Status::Unsupp,
            _ => Status::IoErr,
        }
    }
}

/// Executes the request; returns the number of data bytes written into guest memory.
fn run<G: GuestMemory + ?Sized>(
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

/// Calls `f` on each host-contiguous piece of guest segment `seg` (one piece unless the
/// segment spans two memory regions), as vm-memory hands them out after checking them
/// against the memory map for `access`; fails unless the pieces cover the whole segment.
fn for_each_piece<G, F>(
    mem: &G,
    seg: &Segment,
    access: Permissions,
    mut f: F,
) -> Result<(), ExecError>
where
    G: GuestMemory + ?Sized,
    F: FnMut(&VolatileSlice<'_, BS<'_, G::Bitmap>>) -> Result<(), ExecError>,
{
    let want = seg.len as usize;
    let mut got = 0usize;
    for slice in mem.get_slices(seg.addr, want, access)? {
        let slice = slice?;
        got += slice.len();
        f(&slice)?;
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

/// Reads `len` device bytes at `offset` straight into the guest's `segments`: one
/// `backend.read_at` per segment (per piece of it, when it spans two memory regions),
/// on a slice over guest memory, at the device offset accumulated so far.
///
/// The parser checked every segment against guest memory; vm-memory checks each again
/// where the pointer is made. Should that fail midway (the memory map changed between
/// parsing and execution), the request ends with an error and the bytes already read
/// are, as for any failed read, unspecified.
fn guest_read<G: GuestMemory + ?Sized>(
    mem: &G,
    backend: &dyn BlockBackend,
    offset: u64,
    len: u64,
    segments: &[Segment],
) -> Result<(), ExecError> {
    let mut pos = offset;
    for seg in segments {
        for_each_piece(mem, seg, Permissions::Write, |slice| {
            let guard = slice.ptr_guard_mut();
            let n = guard.len();
            {
                // Soundness: `guard` points at `n` bytes of guest memory that vm-memory
                // found inside one mapped region (bounds-checked by `get_slices`, for
                // writing). The mapping outlives `buf`: `mem` is the memory snapshot the
                // caller holds for the whole request, which keeps every region of it
                // mapped even if the frontend replaces the memory table meanwhile, and
                // `guard` keeps any per-access mapping alive; `buf` ends with this block.
                // The pointer is non-null and `n` lies within one mmap (< isize::MAX).
                //
                // Aliasing: these bytes are shared with the guest (and with any other
                // request naming the same guest pages), which may change them at any
                // time, as it may during a real DMA transfer. The slice exists only for
                // this one backend call, which stores into it (pread, memcpy) and does not
                // rely on reading back what it stored; a guest touching its own buffer
                // meanwhile only makes those bytes of that buffer unspecified. Nothing
                // outside the checked range is reachable through `buf`.
                // SAFETY: sound for the reasons given just above.
                let buf = unsafe { std::slice::from_raw_parts_mut(guard.as_ptr(), n) };
                backend.read_at(pos, buf)?;
            }
            // The backend stored through a raw pointer, past vm-memory's dirty tracking.
            slice.bitmap().mark_dirty(0, n);
            pos += n as u64;
            Ok(())
        })?;
    }
    debug_assert_eq!(pos - offset, len, "segments do not add up to the request");
    Ok(())
}

/// Writes the guest's `segments` (`len` bytes) at device offset `offset`: one
/// `backend.write_at` per segment (per piece of it), on a slice over guest memory.
/// Checked as in [`guest_read`]; a failure midway leaves the range partly written, as
/// any failed write may.
fn guest_write<G: GuestMemory + ?Sized>(
    mem: &G,
    backend: &dyn BlockBackend,
    offset: u64,
    len: u64,
    segments: &[Segment],
) -> Result<(), ExecError> {
    let mut pos = offset;
    for seg in segments {
        for_each_piece(mem, seg, Permissions::Read, |slice| {
            let guard = slice.ptr_guard();
            let n = guard.len();
            // Soundness: as in `guest_read`: `n` bytes inside one mapped region, checked for
            // reading, kept mapped by `mem` and `guard` for longer than `buf` lives (this
            // one call). The guest may change the bytes while the backend reads them
            // (pwrite, memcpy); then what reaches the disk for those bytes is unspecified,
            // as with DMA from a buffer the driver did not leave alone.
            // SAFETY: sound for the reasons given just above.
            let buf = unsafe { std::slice::from_raw_parts(guard.as_ptr(), n) };
            backend.write_at(pos, buf)?;
            pos += n as u64;
            Ok(())
        })?;
    }
    debug_assert_eq!(pos - offset, len, "segments do not add up to the request");
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
