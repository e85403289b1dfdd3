//! Execution of a validated request against a [`BlockBackend`].
//!
//! Data moves through a caller-owned bounce buffer, at most [`BOUNCE_MAX`] bytes at a time,
//! so a large request never allocates more than that and guest memory is only touched
//! through vm-memory's checked, volatile copies.

use vm_memory::{Bytes, GuestMemory};

use crate::blockdev::{BlockBackend, BlockError};

use super::request::{Request, RequestKind, Segment};
use super::{Completion, Status, ID_BYTES};

/// Largest piece of a read or write moved through the bounce buffer at once.
pub const BOUNCE_MAX: usize = 1 << 20;

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
///
/// `scratch` is a reusable bounce buffer; it grows up to [`BOUNCE_MAX`] bytes.
pub fn execute<G: GuestMemory + ?Sized>(
    req: &Request,
    mem: &G,
    backend: &dyn BlockBackend,
    opts: ExecOptions,
    scratch: &mut Vec<u8>,
) -> Completion {
    let (status, data_len) = match run(req, mem, backend, opts, scratch) {
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
    scratch: &mut Vec<u8>,
) -> Result<u32, ExecError> {
    match req.kind() {
        RequestKind::Read {
            offset,
            len,
            segments,
        } => {
            let mut cursor = Cursor::new(segments);
            let mut done = 0u64;
            while done < *len {
                let n = (*len - done).min(BOUNCE_MAX as u64) as usize;
                let buf = bounce(scratch, n);
                backend.read_at(offset + done, buf)?;
                cursor.scatter(mem, buf)?;
                done += n as u64;
            }
            // Bounded by size_max * seg_max, which fits in u32 for any sane limits;
            // saturate rather than wrap if it ever does not.
            Ok(u32::try_from(*len).unwrap_or(u32::MAX))
        }
        RequestKind::Write {
            offset,
            len,
            segments,
        } => {
            let mut cursor = Cursor::new(segments);
            let mut done = 0u64;
            while done < *len {
                let n = (*len - done).min(BOUNCE_MAX as u64) as usize;
                let buf = bounce(scratch, n);
                cursor.gather(mem, buf)?;
                backend.write_at(offset + done, buf)?;
                done += n as u64;
            }
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
            Cursor::new(segments).scatter(mem, &id[..n])?;
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

/// The first `n` bytes of the bounce buffer, growing it when needed.
fn bounce(scratch: &mut Vec<u8>, n: usize) -> &mut [u8] {
    if scratch.len() < n {
        scratch.resize(n, 0);
    }
    &mut scratch[..n]
}

/// A position in a list of guest segments, for copying a request's data piecewise.
struct Cursor<'a> {
    segments: &'a [Segment],
    index: usize,
    offset: u32,
}

impl<'a> Cursor<'a> {
    fn new(segments: &'a [Segment]) -> Self {
        Self {
            segments,
            index: 0,
            offset: 0,
        }
    }

    /// Copies `buf` into guest memory at the cursor and advances it.
    fn scatter<G: GuestMemory + ?Sized>(
        &mut self,
        mem: &G,
        buf: &[u8],
    ) -> Result<(), vm_memory::GuestMemoryError> {
        let mut done = 0;
        while done < buf.len() {
            let (addr, n) = self.next_piece(buf.len() - done)?;
            mem.write_slice(&buf[done..done + n], addr)?;
            done += n;
        }
        Ok(())
    }

    /// Fills `buf` from guest memory at the cursor and advances it.
    fn gather<G: GuestMemory + ?Sized>(
        &mut self,
        mem: &G,
        buf: &mut [u8],
    ) -> Result<(), vm_memory::GuestMemoryError> {
        let mut done = 0;
        while done < buf.len() {
            let (addr, n) = self.next_piece(buf.len() - done)?;
            mem.read_slice(&mut buf[done..done + n], addr)?;
            done += n;
        }
        Ok(())
    }

    /// The next contiguous guest range of at most `want` bytes.
    fn next_piece(
        &mut self,
        want: usize,
    ) -> Result<(vm_memory::GuestAddress, usize), vm_memory::GuestMemoryError> {
        use vm_memory::Address;
        let seg =
            self.segments
                .get(self.index)
                .ok_or(vm_memory::GuestMemoryError::PartialBuffer {
                    expected: want,
                    completed: 0,
                })?;
        let avail = (seg.len - self.offset) as usize;
        let n = want.min(avail);
        let addr = seg.addr.unchecked_add(u64::from(self.offset));
        self.offset += n as u32;
        if self.offset == seg.len {
            self.index += 1;
            self.offset = 0;
        }
        Ok((addr, n))
    }
}
