//! Parsing and validation of virtio-blk descriptor chains.
//!
//! A chain is read as the virtio spec lays it out, without assuming how the driver split
//! it into descriptors: device-readable bytes first (the 16-byte header, then any payload),
//! then device-writable bytes (any data, then the status byte). The status byte is the last
//! byte of the last descriptor, which must be writable.
//!
//! Anything that does not fit that shape, reaches outside guest memory or outside the
//! device, or exceeds the advertised limits is turned into a [`Rejected`] value that
//! carries the status to report; nothing here panics on guest input.

use std::ops::Deref;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use crate::blockdev::BlockBackend;

use super::{Completion, Limits, Status, SECTOR_SIZE};

/// Size of the request header (`le32 type, le32 reserved, le64 sector`).
pub const HEADER_SIZE: u64 = 16;
/// Size of one discard / write-zeroes range (`le64 sector, le32 num_sectors, le32 flags`).
pub const RANGE_SIZE: u64 = 16;
/// Descriptors beyond `seg_max` that a chain may use for the header and status.
const EXTRA_DESCRIPTORS: usize = 8;

/// Why a chain was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The chain yielded no descriptor at all.
    #[error("empty descriptor chain")]
    EmptyChain,
    /// The chain ended on a descriptor that still points further: it is longer than the
    /// queue (a loop), links outside the table, or has a broken indirect table.
    #[error("descriptor chain is truncated (longer than the queue or broken link)")]
    TruncatedChain,
    /// More descriptors than any valid request needs.
    #[error("descriptor chain has {0} descriptors")]
    TooManyDescriptors(usize),
    /// The last descriptor is not device-writable, so there is no status byte.
    #[error("last descriptor is not writable: no status byte")]
    MissingStatus,
    /// The last descriptor is writable but empty.
    #[error("status descriptor is empty")]
    StatusTooSmall,
    /// A device-readable descriptor follows a device-writable one.
    #[error("readable descriptor after a writable one")]
    ReadableAfterWritable,
    /// A descriptor points outside guest memory.
    #[error("descriptor {addr:#x}+{len} is outside guest memory")]
    BadAddress { addr: u64, len: u64 },
    /// Fewer than 16 readable bytes for the header (for example a write-only header).
    #[error("request header is {0} bytes, want 16")]
    HeaderTooShort(u64),
    /// Unknown request type.
    #[error("unsupported request type {0}")]
    UnsupportedType(u32),
    /// A request that only returns data (read, get-id) carries device-readable data.
    #[error("request type {0} with device-readable data")]
    ReadableData(u32),
    /// A request other than a read carries device-writable data.
    #[error("request type {0} with device-writable data")]
    WritableData(u32),
    /// A write-type request on a read-only device.
    #[error("device is read-only")]
    ReadOnly,
    /// Data length is not a multiple of 512.
    #[error("data length {0} is not a multiple of 512")]
    UnalignedLength(u64),
    /// The request reaches past the end of the device (or overflows).
    #[error("sector {sector} + {sectors} sectors is past the end ({capacity} sectors)")]
    OutOfRange {
        sector: u64,
        sectors: u64,
        capacity: u64,
    },
    /// More data segments than `seg_max`.
    #[error("{0} data segments, more than seg_max")]
    TooManySegments(usize),
    /// More data than `size_max * seg_max`.
    #[error("request of {0} bytes, more than size_max * seg_max")]
    TooLarge(u64),
    /// Discard / write-zeroes payload is empty or not a whole number of ranges.
    #[error("discard/write-zeroes payload of {0} bytes")]
    BadRangePayload(u64),
    /// More discard / write-zeroes ranges than the device accepts.
    #[error("{0} discard/write-zeroes ranges, more than allowed")]
    TooManyRanges(u64),
    /// A discard / write-zeroes range with flags the device does not support.
    #[error("unsupported discard/write-zeroes flags {0:#x}")]
    UnsupportedFlags(u32),
    /// A discard / write-zeroes range that is empty or longer than allowed.
    #[error("discard/write-zeroes range of {0} sectors")]
    BadRangeLength(u32),
    /// A discard / write-zeroes range not aligned to the logical block size.
    #[error("discard/write-zeroes range {sector}+{sectors} not aligned to the block size")]
    UnalignedRange { sector: u64, sectors: u32 },
}

impl RequestError {
    /// The status byte this error is reported with.
    pub fn status(&self) -> Status {
        match self {
            RequestError::UnsupportedType(_) | RequestError::UnsupportedFlags(_) => Status::Unsupp,
            _ => Status::IoErr,
        }
    }
}

/// A contiguous piece of guest memory holding request data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes (never zero).
    pub len: u32,
}

/// A byte range of the device (for discard and write-zeroes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// What a validated request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// `VIRTIO_BLK_T_IN`: read `len` bytes at `offset` into the (writable) segments.
    Read {
        offset: u64,
        len: u64,
        segments: Vec<Segment>,
    },
    /// `VIRTIO_BLK_T_OUT`: write the (readable) segments, `len` bytes, at `offset`.
    Write {
        offset: u64,
        len: u64,
        segments: Vec<Segment>,
    },
    /// `VIRTIO_BLK_T_FLUSH`.
    Flush,
    /// `VIRTIO_BLK_T_GET_ID`: the device serial goes into the (writable) segments.
    GetId { segments: Vec<Segment> },
    /// `VIRTIO_BLK_T_DISCARD`.
    Discard { ranges: Vec<Range> },
    /// `VIRTIO_BLK_T_WRITE_ZEROES`; `unmap` is the driver's permission to deallocate.
    WriteZeroes { ranges: Vec<Range>, unmap: bool },
}

/// A parsed, validated request: every guest address in it was checked against guest
/// memory and every device range against the capacity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    head_index: u16,
    status: GuestAddress,
    kind: RequestKind,
}

impl Request {
    /// Head descriptor index (what goes into the used ring).
    pub fn head_index(&self) -> u16 {
        self.head_index
    }

    /// Guest address of the status byte.
    pub fn status_addr(&self) -> GuestAddress {
        self.status
    }

    /// What the request asks for.
    pub fn kind(&self) -> &RequestKind {
        &self.kind
    }

    /// True when the request can run without a network round trip, so a queue worker
    /// may run it inline; otherwise it must be completed off the worker.
    pub fn is_local(&self, backend: &dyn BlockBackend) -> bool {
        match &self.kind {
            RequestKind::Read { offset, len, .. } | RequestKind::Write { offset, len, .. } => {
                *len == 0 || backend.is_local(*offset, *len)
            }
            RequestKind::Discard { ranges } | RequestKind::WriteZeroes { ranges, .. } => {
                ranges.iter().all(|r| backend.is_local(r.offset, r.len))
            }
            RequestKind::Flush | RequestKind::GetId { .. } => true,
        }
    }
}

/// A chain that cannot be executed, with what to tell the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// Head descriptor index.
    pub head_index: u16,
    /// The status byte, when the chain has a usable one.
    pub status_addr: Option<GuestAddress>,
    /// Why.
    pub error: RequestError,
}

impl Rejected {
    /// Writes the error status (when there is a status byte) and returns the completion.
    pub fn complete<G: GuestMemory + ?Sized>(&self, mem: &G) -> Completion {
        let status = self.error.status();
        let used_len = match self.status_addr {
            Some(addr) if mem.write_obj(status as u8, addr).is_ok() => 1,
            _ => 0,
        };
        Completion {
            head_index: self.head_index,
            used_len,
            status,
        }
    }
}

/// Parses and validates one descriptor chain.
pub fn parse<M>(chain: DescriptorChain<M>, limits: &Limits) -> Result<Request, Rejected>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    let head_index = chain.head_index();
    let mem = chain.memory();
    let cap = limits.seg_max as usize + EXTRA_DESCRIPTORS;

    let mut descs: Vec<Descriptor> = Vec::new();
    let mut count = 0usize;
    let mut last: Option<Descriptor> = None;
    for desc in chain.clone() {
        count += 1;
        if descs.len() < cap {
            descs.push(desc);
        }
        last = Some(desc);
    }

    let status_addr = last.and_then(|d| status_byte(mem, &d));
    let reject = |error| Rejected {
        head_index,
        status_addr,
        error,
    };

    let Some(last) = last else {
        return Err(reject(RequestError::EmptyChain));
    };
    if last.has_next() {
        return Err(reject(RequestError::TruncatedChain));
    }
    if count > cap {
        return Err(reject(RequestError::TooManyDescriptors(count)));
    }
    if !last.is_write_only() {
        return Err(reject(RequestError::MissingStatus));
    }
    if last.len() == 0 {
        return Err(reject(RequestError::StatusTooSmall));
    }
    let Some(status) = status_addr else {
        return Err(reject(RequestError::BadAddress {
            addr: last.addr().raw_value(),
            len: u64::from(last.len()),
        }));
    };

    // Split into readable then writable segments, dropping the status byte.
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    let mut seen_writable = false;
    let n = descs.len();
    for (i, d) in descs.iter().enumerate() {
        let write = d.is_write_only();
        if !write && seen_writable {
            return Err(reject(RequestError::ReadableAfterWritable));
        }
        seen_writable |= write;
        let len = if i + 1 == n { d.len() - 1 } else { d.len() };
        if len == 0 {
            continue;
        }
        let access = if write {
            Permissions::Write
        } else {
            Permissions::Read
        };
        check_guest_range(mem, d.addr(), u64::from(len), access).map_err(&reject)?;
        let seg = Segment {
            addr: d.addr(),
            len,
        };
        if write {
            writable.push(seg);
        } else {
            readable.push(seg);
        }
    }

    let readable_len: u64 = readable.iter().map(|s| u64::from(s.len)).sum();
    if readable_len < HEADER_SIZE {
        return Err(reject(RequestError::HeaderTooShort(readable_len)));
    }
    let mut header = [0u8; HEADER_SIZE as usize];
    gather(mem, &readable, &mut header).map_err(&reject)?;
    let req_type = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
    let payload = skip(&readable, HEADER_SIZE);

    let kind = match req_type {
        VIRTIO_BLK_T_IN => {
            if !payload.is_empty() {
                return Err(reject(RequestError::ReadableData(req_type)));
            }
            let (offset, len) = check_data(&writable, sector, limits).map_err(&reject)?;
            RequestKind::Read {
                offset,
                len,
                segments: writable,
            }
        }
        VIRTIO_BLK_T_OUT => {
            no_writable_data(&writable, req_type).map_err(&reject)?;
            if limits.read_only {
                return Err(reject(RequestError::ReadOnly));
            }
            let (offset, len) = check_data(&payload, sector, limits).map_err(&reject)?;
            RequestKind::Write {
                offset,
                len,
                segments: payload,
            }
        }
        VIRTIO_BLK_T_FLUSH => {
            no_writable_data(&writable, req_type).map_err(&reject)?;
            RequestKind::Flush
        }
        VIRTIO_BLK_T_GET_ID => {
            if !payload.is_empty() {
                return Err(reject(RequestError::ReadableData(req_type)));
            }
            RequestKind::GetId { segments: writable }
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            no_writable_data(&writable, req_type).map_err(&reject)?;
            if limits.read_only {
                return Err(reject(RequestError::ReadOnly));
            }
            let discard = req_type == VIRTIO_BLK_T_DISCARD;
            let (ranges, unmap) = parse_ranges(mem, &payload, discard, limits).map_err(&reject)?;
            if discard {
                RequestKind::Discard { ranges }
            } else {
                RequestKind::WriteZeroes { ranges, unmap }
            }
        }
        other => return Err(reject(RequestError::UnsupportedType(other))),
    };

    Ok(Request {
        head_index,
        status,
        kind,
    })
}

/// The address of the status byte of `desc`, when it is a usable status descriptor.
fn status_byte<G: GuestMemory + ?Sized>(mem: &G, desc: &Descriptor) -> Option<GuestAddress> {
    if !desc.is_write_only() || desc.len() == 0 {
        return None;
    }
    let addr = desc.addr().checked_add(u64::from(desc.len()) - 1)?;
    mem.check_range(addr, 1, Permissions::Write).then_some(addr)
}

fn check_guest_range<G: GuestMemory + ?Sized>(
    mem: &G,
    addr: GuestAddress,
    len: u64,
    access: Permissions,
) -> Result<(), RequestError> {
    let ok = addr.checked_add(len).is_some()
        && usize::try_from(len).is_ok_and(|l| mem.check_range(addr, l, access));
    if ok {
        Ok(())
    } else {
        Err(RequestError::BadAddress {
            addr: addr.raw_value(),
            len,
        })
    }
}

/// The segments that remain after skipping the first `bytes` bytes.
fn skip(segments: &[Segment], mut bytes: u64) -> Vec<Segment> {
    let mut out = Vec::new();
    for s in segments {
        let len = u64::from(s.len);
        if bytes >= len {
            bytes -= len;
            continue;
        }
        out.push(Segment {
            addr: s.addr.unchecked_add(bytes),
            len: (len - bytes) as u32,
        });
        bytes = 0;
    }
    out
}

/// Copies the first `buf.len()` bytes of `segments` out of guest memory.
fn gather<G: GuestMemory + ?Sized>(
    mem: &G,
    segments: &[Segment],
    buf: &mut [u8],
) -> Result<(), RequestError> {
    let mut done = 0usize;
    for s in segments {
        if done == buf.len() {
            break;
        }
        let n = (buf.len() - done).min(s.len as usize);
        mem.read_slice(&mut buf[done..done + n], s.addr)
            .map_err(|_| RequestError::BadAddress {
                addr: s.addr.raw_value(),
                len: n as u64,
            })?;
        done += n;
    }
    Ok(())
}

fn no_writable_data(writable: &[Segment], req_type: u32) -> Result<(), RequestError> {
    if writable.is_empty() {
        Ok(())
    } else {
        Err(RequestError::WritableData(req_type))
    }
}

/// Validates the data of a read or write; returns its byte offset and length.
fn check_data(
    segments: &[Segment],
    sector: u64,
    limits: &Limits,
) -> Result<(u64, u64), RequestError> {
    if segments.len() > limits.seg_max as usize {
        return Err(RequestError::TooManySegments(segments.len()));
    }
    let total: u64 = segments.iter().map(|s| u64::from(s.len)).sum();
    if total > limits.max_transfer() {
        return Err(RequestError::TooLarge(total));
    }
    if total % SECTOR_SIZE != 0 {
        return Err(RequestError::UnalignedLength(total));
    }
    let sectors = total / SECTOR_SIZE;
    check_sectors(sector, sectors, limits)?;
    Ok((sector * SECTOR_SIZE, total))
}

fn check_sectors(sector: u64, sectors: u64, limits: &Limits) -> Result<(), RequestError> {
    match sector.checked_add(sectors) {
        Some(end) if end <= limits.capacity_sectors => Ok(()),
        _ => Err(RequestError::OutOfRange {
            sector,
            sectors,
            capacity: limits.capacity_sectors,
        }),
    }
}

/// Reads and validates the ranges of a discard or write-zeroes payload.
fn parse_ranges<G: GuestMemory + ?Sized>(
    mem: &G,
    payload: &[Segment],
    discard: bool,
    limits: &Limits,
) -> Result<(Vec<Range>, bool), RequestError> {
    let bytes: u64 = payload.iter().map(|s| u64::from(s.len)).sum();
    if bytes == 0 || bytes % RANGE_SIZE != 0 {
        return Err(RequestError::BadRangePayload(bytes));
    }
    let count = bytes / RANGE_SIZE;
    let (max_seg, max_sectors) = if discard {
        (limits.max_discard_seg, limits.max_discard_sectors)
    } else {
        (limits.max_write_zeroes_seg, limits.max_write_zeroes_sectors)
    };
    if count > u64::from(max_seg) {
        return Err(RequestError::TooManyRanges(count));
    }
    let mut raw = vec![0u8; bytes as usize];
    gather(mem, payload, &mut raw)?;

    let mut ranges = Vec::with_capacity(count as usize);
    let mut unmap = true;
    for entry in raw.chunks_exact(RANGE_SIZE as usize) {
        let sector = u64::from_le_bytes(entry[0..8].try_into().unwrap_or_default());
        let sectors = u32::from_le_bytes(entry[8..12].try_into().unwrap_or_default());
        let flags = u32::from_le_bytes(entry[12..16].try_into().unwrap_or_default());
        // Discard has no flags at all; write-zeroes only knows UNMAP.
        let allowed = if discard {
            0
        } else {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        };
        if flags & !allowed != 0 {
            return Err(RequestError::UnsupportedFlags(flags));
        }
        unmap &= flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        if sectors == 0 || sectors > max_sectors {
            return Err(RequestError::BadRangeLength(sectors));
        }
        let align = limits.block_sectors();
        if sector % align != 0 || u64::from(sectors) % align != 0 {
            return Err(RequestError::UnalignedRange { sector, sectors });
        }
        check_sectors(sector, u64::from(sectors), limits)?;
        ranges.push(Range {
            offset: sector * SECTOR_SIZE,
            len: u64::from(sectors) * SECTOR_SIZE,
        });
    }
    Ok((ranges, unmap))
}
