//! Request-layer tests with crafted descriptor chains (virtio-queue's mock queue).

use parking_lot::Mutex;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_SCSI_CMD, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use crate::blockdev::{check_range, BlockBackend, BlockError, GuestBuf, GuestBufMut};

use super::*;

const CAPACITY: u64 = 4 << 20;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const MEM_SIZE: usize = 0x80_0000;

/// An in-memory disk that records what it was asked to do.
struct MemDisk {
    data: Mutex<Vec<u8>>,
    read_only: bool,
    block_size: u32,
    local: bool,
    fail_reads: bool,
    log: Mutex<Vec<String>>,
    /// Offset and length of every `read_at` call.
    reads: Mutex<Vec<(u64, usize)>>,
}

impl MemDisk {
    fn new() -> Self {
        let data = (0..CAPACITY).map(|i| (i % 251) as u8).collect();
        Self {
            data: Mutex::new(data),
            read_only: false,
            block_size: 512,
            local: true,
            fail_reads: false,
            log: Mutex::new(Vec::new()),
            reads: Mutex::new(Vec::new()),
        }
    }

    fn log(&self) -> Vec<String> {
        self.log.lock().clone()
    }
}

impl BlockBackend for MemDisk {
    fn capacity(&self) -> u64 {
        CAPACITY
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn logical_block_size(&self) -> u32 {
        self.block_size
    }
    fn read_into(&self, offset: u64, buf: &GuestBufMut<'_>) -> Result<(), BlockError> {
        check_range(offset, buf.len() as u64, CAPACITY)?;
        self.reads.lock().push((offset, buf.len()));
        if self.fail_reads {
            return Err(BlockError::Remote("unreachable".into()));
        }
        let o = offset as usize;
        buf.copy_from(&self.data.lock()[o..o + buf.len()]);
        Ok(())
    }
    fn write_from(&self, offset: u64, buf: &GuestBuf<'_>) -> Result<(), BlockError> {
        check_range(offset, buf.len() as u64, CAPACITY)?;
        let o = offset as usize;
        buf.copy_to(&mut self.data.lock()[o..o + buf.len()]);
        self.log
            .lock()
            .push(format!("write {offset} {}", buf.len()));
        Ok(())
    }
    fn flush(&self) -> Result<(), BlockError> {
        self.log.lock().push("flush".into());
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.log.lock().push(format!("discard {offset} {len}"));
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        check_range(offset, len, CAPACITY)?;
        let o = offset as usize;
        self.data.lock()[o..o + len as usize].fill(0);
        self.log.lock().push(format!("zeroes {offset} {len}"));
        Ok(())
    }
    fn device_id(&self) -> Vec<u8> {
        b"serial-123".to_vec()
    }
    fn is_local(&self, _offset: u64, _len: u64) -> bool {
        self.local
    }
}

fn memory() -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

fn limits(disk: &MemDisk) -> Limits {
    Limits::for_backend(disk)
}

fn rd(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, 0, 0))
}

fn wr(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, VRING_DESC_F_WRITE as u16, 0))
}

fn header(mem: &GuestMemoryMmap<()>, req_type: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&req_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
}

fn range_entry(sector: u64, sectors: u32, flags: u32) -> [u8; 16] {
    let mut e = [0u8; 16];
    e[0..8].copy_from_slice(&sector.to_le_bytes());
    e[8..12].copy_from_slice(&sectors.to_le_bytes());
    e[12..16].copy_from_slice(&flags.to_le_bytes());
    e
}

/// The result of running one chain through parse and execute.
struct Outcome {
    parsed: Result<Request, Rejected>,
    completion: Completion,
}

impl Outcome {
    fn error(&self) -> RequestError {
        self.parsed.clone().unwrap_err().error
    }
}

fn run_chain(
    mem: &GuestMemoryMmap<()>,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap<()>>,
    disk: &MemDisk,
    limits: &Limits,
    opts: ExecOptions,
) -> Outcome {
    // Poison the status byte so a test sees whether it was written.
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let parsed = parse(chain, limits);
    let completion = match &parsed {
        Ok(req) => execute(req, mem, disk, opts),
        Err(rejected) => rejected.complete(mem),
    };
    Outcome { parsed, completion }
}

fn run(mem: &GuestMemoryMmap<()>, descs: &[RawDescriptor], disk: &MemDisk) -> Outcome {
    let vq = MockSplitQueue::new(mem, 256);
    let chain = vq.build_desc_chain(descs).unwrap();
    run_chain(mem, chain, disk, &limits(disk), ExecOptions::default())
}

fn status(mem: &GuestMemoryMmap<()>) -> u8 {
    mem.read_obj(GuestAddress(STATUS)).unwrap()
}

#[test]
fn read_returns_disk_data() {
    let mem = memory();
    let disk = MemDisk::new();
    header(&mem, VIRTIO_BLK_T_IN, 8);
    let out = run(&mem, &[rd(HDR, 16), wr(DATA, 4096), wr(STATUS, 1)], &disk);
    assert_eq!(out.completion.status, Status::Ok);
    assert_eq!(out.completion.used_len, 4097);
    assert_eq!(status(&mem), 0);
    let mut got = vec![0u8; 4096];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, disk.data.lock()[4096..8192]);
}

#[test]
fn read_into_many_segments_and_data_sharing_the_status_descriptor() {
    let mem = memory();
    let disk = MemDisk::new();
    header(&mem, VIRTIO_BLK_T_IN, 1);
    // 512 + 1024 bytes of data, the second data segment shares its descriptor with the
    // status byte (which sits at STATUS).
    let out = run(
        &mem,
        &[rd(HDR, 16), wr(DATA, 512), wr(STATUS - 1024, 1025)],
        &disk,
    );
    assert_eq!(out.completion.status, Status::Ok);
    assert_eq!(out.completion.used_len, 1537);
    assert_eq!(status(&mem), 0);
    let mut a = vec![0u8; 512];
    let mut b = vec![0u8; 1024];
    mem.read_slice(&mut a, GuestAddress(DATA)).unwrap();
    mem.read_slice(&mut b, GuestAddress(STATUS - 1024)).unwrap();
    let d = disk.data.lock();
    assert_eq!(a, d[512..1024]);
    assert_eq!(b, d[1024..2048]);
}

#[test]
fn header_split_over_descriptors_is_accepted() {
    let mem = memory();
    let disk = MemDisk::new();
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let out = run(
        &mem,
        &[rd(HDR, 4), rd(HDR + 4, 12), wr(DATA, 512), wr(STATUS, 1)],
        &disk,
    );
    assert_eq!(out.completion.status, Status::Ok);
}

#[test]
fn write_stores_guest_data() {
    let mem = memory();
    let disk = MemDisk::new();
    header(&mem, VIRTIO_BLK_T_OUT, 16);
    mem.write_slice(&[0xaa; 512], GuestAddress(DATA)).unwrap();
    mem.write_slice(&[0xbb; 1024], GuestAddress(DATA + 0x1000))
        .unwrap();
    let out = run(
        &mem,
        &[
            rd(HDR, 16),
            rd(DATA, 512),
            rd(DATA + 0x1000, 1024),
            wr(STATUS, 1),
        ],
        &disk,
    );
    assert_eq!(out.completion.status, Status::Ok);
    assert_eq!(out.completion.used_len, 1);
    let d = disk.data.lock();
    assert!(d[8192..8704].iter().all(|&b| b == 0xaa));
    assert!(d[8704..9728].iter().all(|&b| b == 0xbb));
    assert_eq!(d[9728], (9728 % 251) as u8);
}

#[test]
fn write_through_flushes_each_write() {
    let mem = memory();
    let disk = MemDisk::new();
    header(&mem, VIRTIO_BLK_T_OUT, 0);
    let vq = MockSplitQueue::new(&mem, 16);
    let chain = vq
        .build_desc_chain(&[rd(HDR, 16), rd(DATA, 512), wr(STATUS, 1)])
        .unwrap();
    let out = run_chain(
        &mem,
        chain,
        &disk,
        &limits(&disk),
        ExecOptions { writeback: false },
    );
    assert_eq!(out.completion.status, Status::Ok);
    assert_eq!(disk.log(), vec!["write 0 512", "flush"]);
}

#[test]
fn flush_and_get_id() {
    let mem = memory();
    let disk = MemDisk::new();
    header(&mem, VIRTIO_BLK_T_FLUSH, 0);
    let out = run(&mem, &[rd(HDR, 16), wr(STATUS, 1)], &disk);
    assert_eq!(out.completion.status, Status::Ok);
    assert_eq!(disk.log(), vec!["flush"]);

    header(&mem, VIRTIO_BLK_T_GET_ID, 0);
    mem.write_slice(&[0x55; 32], GuestAddress(DATA)).unwrap();
    let out = run(&mem, &[rd(HDR, 16), wr(DATA, 32), wr(STATUS, 1)], &disk);
    assert_eq!(out.completion.status, Status::Ok);
    assert_eq!(out.completion.used_len, 21);
    let mut id = [0u8; 32];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..10], b"serial-123");
    assert_eq!(&id[10..20], &[0u8; 10]);
    assert_eq!(&id[20..], &[0x55u8; 12]);
}

#[test]
fn discard_and_write_zeroes_with_several_ranges() {
    let mem = memory();
    let disk = MemDisk::new();
    header(&mem, VIRTIO_BLK_T_DISCARD, 0);
    mem.write_slice(&range_entry(0, 8, 0), GuestAddress(DATA))
        .unwrap();
    mem.write_slice(&range_entry(64, 16, 0), GuestAddress(DATA + 16))
        .unwrap();
    let out = run(&mem, &[rd(HDR, 16), rd(DATA, 32), wr(STATUS, 1)], &disk);
    assert_eq!(out.completion.status, Status::Ok);
    assert_eq!(disk.log(), vec!["discard 0 4096", "discard 32768 8192"]);

    // Write-zeroes ranges spread over two payload descriptors, with UNMAP.
    header(&mem, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    mem.write_slice(&range_entry(2, 2, 1), GuestAddress(DATA + 0x1000))
        .unwrap();
    mem.write_slice(&range_entry(10, 1, 1), GuestAddress(DATA + 0x2000))
        .unwrap();
    let out = run(
        &mem,
        &[
            rd(HDR, 16),
            rd(DATA + 0x1000, 16),
            rd(DATA + 0x2000, 16),
            wr(STATUS, 1),
        ],
        &disk,
    );
    assert_eq!(out.completion.status, Status::Ok);
    match out.parsed.unwrap().kind() {
        RequestKind::WriteZeroes { ranges, unmap } => {
            assert!(*unmap);
            assert_eq!(ranges.len(), 2);
        }
        other => panic!("unexpected {other:?}"),
    }
    let d = disk.data.lock();
    assert!(d[1024..2048].iter().all(|&b| b == 0));
    assert!(d[5120..5632].iter().all(|&b| b == 0));
    assert_ne!(d[2048], 0);
}

#[test]
fn discard_and_write_zeroes_validation() {
    let mem = memory();
    let disk = MemDisk::new();
    let one = |req_type: u32, entry: [u8; 16]| {
        header(&mem, req_type, 0);
        mem.write_slice(&entry, GuestAddress(DATA)).unwrap();
        run(&mem, &[rd(HDR, 16), rd(DATA, 16), wr(STATUS, 1)], &disk)
    };
    // Discard knows no flags: UNMAP or reserved bits are unsupported.
    let out = one(VIRTIO_BLK_T_DISCARD, range_entry(0, 8, 1));
    assert_eq!(out.completion.status, Status::Unsupp);
    assert_eq!(status(&mem), 2);
    let out = one(VIRTIO_BLK_T_WRITE_ZEROES, range_entry(0, 8, 2));
    assert_eq!(out.error(), RequestError::UnsupportedFlags(2));
    assert_eq!(status(&mem), 2);
    // num_sectors zero or above the limit.
    let out = one(VIRTIO_BLK_T_DISCARD, range_entry(0, 0, 0));
    assert_eq!(out.error(), RequestError::BadRangeLength(0));
    assert_eq!(status(&mem), 1);
    let too_many = limits(&disk).max_discard_sectors + 1;
    let out = one(VIRTIO_BLK_T_WRITE_ZEROES, range_entry(0, too_many, 0));
    assert_eq!(out.error(), RequestError::BadRangeLength(too_many));
    // Past the end, and overflowing.
    let out = one(VIRTIO_BLK_T_DISCARD, range_entry(CAPACITY / 512 - 1, 2, 0));
    assert!(matches!(out.error(), RequestError::OutOfRange { .. }));
    let out = one(VIRTIO_BLK_T_DISCARD, range_entry(u64::MAX - 1, 8, 0));
    assert!(matches!(out.error(), RequestError::OutOfRange { .. }));
    assert_eq!(status(&mem), 1);
    assert!(disk.log().is_empty());

    // A payload that is not a whole number of ranges, or too many ranges.
    header(&mem, VIRTIO_BLK_T_DISCARD, 0);
    let out = run(&mem, &[rd(HDR, 16), rd(DATA, 20), wr(STATUS, 1)], &disk);
    assert_eq!(out.error(), RequestError::BadRangePayload(20));
    let out = run(&mem, &[rd(HDR, 16), wr(STATUS, 1)], &disk);
    assert_eq!(out.error(), RequestError::BadRangePayload(0));
    let n = limits(&disk).max_discard_seg + 1;
    for i in 0..n {
        mem.write_slice(
            &range_entry(u64::from(i) * 8, 8, 0),
            GuestAddress(DATA + u64::from(i) * 16),
        )
        .unwrap();
    }
    let out = run(&mem, &[rd(HDR, 16), rd(DATA, n * 16), wr(STATUS, 1)], &disk);
    assert_eq!(out.error(), RequestError::TooManyRanges(u64::from(n)));
    assert_eq!(status(&mem), 1);
}

#[test]
fn discard_must_align_to_the_block_size() {
    let mem = memory();
    let mut disk = MemDisk::new();
    disk.block_size = 4096;
    header(&mem, VIRTIO_BLK_T_DISCARD, 0);
    mem.write_slice(&range_entry(4, 8, 0), GuestAddress(DATA))
        .unwrap();
    let out = run(&mem, &[rd(HDR, 16), rd(DATA, 16), wr(STATUS, 1)], &disk);
    assert_eq!(
        out.error(),
        RequestError::UnalignedRange {
            sector: 4,
            sectors: 8
        }
    );
    mem.write_slice(&range_entry(8, 8, 0), GuestAddress(DATA))
        .unwrap();
    let out = run(&mem, &[rd(HDR, 16), rd(DATA, 16), wr(STATUS, 1)], &disk);
    assert_eq!(out.completion.status, Status::Ok);
}

#[test]
fn unknown_types_are_unsupported() {
    let mem = memory();
    let disk = MemDisk::new();
    for t in [VIRTIO_BLK_T_SCSI_CMD, 3, 99, 0x8000_0000] {
        header(&mem, t, 0);
        let out = run(&mem, &[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)], &disk);
        assert_eq!(out.error(), RequestError::UnsupportedType(t));
        assert_eq!(out.completion.status, Status::Unsupp);
        assert_eq!(out.completion.used_len, 1);
        assert_eq!(status(&mem), 2);
    }
}

#[test]
fn out_of_range_and_unaligned_requests_fail() {
    let mem = memory();
    let disk = MemDisk::new();
    let last = CAPACITY / 512 - 1;
    // The last sector is fine, one more is not.
    header(&mem, VIRTIO_BLK_T_IN, last);
    let out = run(&mem, &[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)], &disk);
    assert_eq!(out.completion.status, Status::Ok);
    let out = run(&mem, &[rd(HDR, 16), wr(DATA, 1024), wr(STATUS, 1)], &disk);
    assert!(matches!(out.error(), RequestError::OutOfRange { .. }));
    assert_eq!(status(&mem), 1);
    // Sector arithmetic that would overflow.
    for sector in [u64::MAX, u64::MAX / 512, u64::MAX / 512 + 1] {
        header(&mem, VIRTIO_BLK_T_OUT, sector);
        let out = run(&mem, &[rd(HDR, 16), rd(DATA, 512), wr(STATUS, 1)], &disk);
        assert!(matches!(out.error(), RequestError::OutOfRange { .. }));
        assert_eq!(status(&mem), 1);
    }
    // Length not a multiple of 512.
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let out = run(&mem, &[rd(HDR, 16), wr(DATA, 100), wr(STATUS, 1)], &disk);
    assert_eq!(out.error(), RequestError::UnalignedLength(100));
    assert_eq!(status(&mem), 1);
    header(&mem, VIRTIO_BLK_T_OUT, 0);
    let out = run(&mem, &[rd(HDR, 16), rd(DATA, 513), wr(STATUS, 1)], &disk);
    assert_eq!(out.error(), RequestError::UnalignedLength(513));
    assert!(disk.log().is_empty());
}

#[test]
fn malformed_chains_fail_without_touching_the_disk() {
    let mem = memory();
    let disk = MemDisk::new();

    // Missing status descriptor: the last one is readable. Nothing can be written.
    header(&mem, VIRTIO_BLK_T_OUT, 0);
    let out = run(&mem, &[rd(HDR, 16), rd(DATA, 512)], &disk);
    assert_eq!(out.error(), RequestError::MissingStatus);
    assert_eq!(out.completion.used_len, 0);
    assert_eq!(out.completion.status, Status::IoErr);

    // Status descriptor too small (empty).
    let out = run(&mem, &[rd(HDR, 16), rd(DATA, 512), wr(STATUS, 0)], &disk);
    assert_eq!(out.error(), RequestError::StatusTooSmall);
    assert_eq!(out.completion.used_len, 0);
    assert_eq!(status(&mem), 0xff);

    // Write-only header.
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let out = run(&mem, &[wr(HDR, 16), wr(DATA, 512), wr(STATUS, 1)], &disk);
    assert_eq!(out.error(), RequestError::HeaderTooShort(0));
    assert_eq!(status(&mem), 1);

    // Short header.
    let out = run(&mem, &[rd(HDR, 8), wr(DATA, 512), wr(STATUS, 1)], &disk);
    assert_eq!(out.error(), RequestError::HeaderTooShort(8));

    // Readable data on a read.
    let out = run(&mem, &[rd(HDR, 16), rd(DATA, 512), wr(STATUS, 1)], &disk);
    assert_eq!(out.error(), RequestError::ReadableData(VIRTIO_BLK_T_IN));
    assert_eq!(status(&mem), 1);

    // Writable data on a write.
    header(&mem, VIRTIO_BLK_T_OUT, 0);
    let out = run(&mem, &[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)], &disk);
    assert_eq!(out.error(), RequestError::WritableData(VIRTIO_BLK_T_OUT));

    // Readable after writable.
    let out = run(
        &mem,
        &[
            rd(HDR, 16),
            wr(DATA, 512),
            rd(DATA + 512, 512),
            wr(STATUS, 1),
        ],
        &disk,
    );
    assert_eq!(out.error(), RequestError::ReadableAfterWritable);
    assert_eq!(status(&mem), 1);

    // Data outside guest memory (and an address that overflows).
    for addr in [MEM_SIZE as u64 - 256, u64::MAX - 100] {
        let out = run(&mem, &[rd(HDR, 16), rd(addr, 512), wr(STATUS, 1)], &disk);
        assert!(matches!(out.error(), RequestError::BadAddress { .. }));
        assert_eq!(status(&mem), 1);
    }

    // Status byte outside guest memory.
    let out = run(
        &mem,
        &[rd(HDR, 16), rd(DATA, 512), wr(MEM_SIZE as u64, 1)],
        &disk,
    );
    assert!(matches!(out.error(), RequestError::BadAddress { .. }));
    assert_eq!(out.completion.used_len, 0);

    assert!(disk.log().is_empty());
}

#[test]
fn oversize_requests_fail() {
    let mem = memory();
    let disk = MemDisk::new();
    let mut lim = limits(&disk);
    lim.size_max = 4096;
    lim.seg_max = 2;
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let vq = MockSplitQueue::new(&mem, 16);

    // Within size_max * seg_max.
    let chain = vq
        .build_desc_chain(&[
            rd(HDR, 16),
            wr(DATA, 4096),
            wr(DATA + 4096, 4096),
            wr(STATUS, 1),
        ])
        .unwrap();
    let out = run_chain(&mem, chain, &disk, &lim, ExecOptions::default());
    assert_eq!(out.completion.status, Status::Ok);

    // One segment too many (12 KiB > size_max * seg_max).
    let chain = vq
        .build_desc_chain(&[
            rd(HDR, 16),
            wr(DATA, 4096),
            wr(DATA + 4096, 4096),
            wr(DATA + 8192, 4096),
            wr(STATUS, 1),
        ])
        .unwrap();
    let out = run_chain(&mem, chain, &disk, &lim, ExecOptions::default());
    assert_eq!(out.error(), RequestError::TooManySegments(3));
    assert_eq!(status(&mem), 1);

    // A single segment larger than size_max is accepted (size_max is advisory)...
    let chain = vq
        .build_desc_chain(&[rd(HDR, 16), wr(DATA, 8192), wr(STATUS, 1)])
        .unwrap();
    let out = run_chain(&mem, chain, &disk, &lim, ExecOptions::default());
    assert_eq!(out.completion.status, Status::Ok);

    // ...but not more than size_max * seg_max in total, whatever the segments.
    let chain = vq
        .build_desc_chain(&[rd(HDR, 16), wr(DATA, 8704), wr(STATUS, 1)])
        .unwrap();
    let out = run_chain(&mem, chain, &disk, &lim, ExecOptions::default());
    assert_eq!(out.error(), RequestError::TooLarge(8704));
    assert_eq!(status(&mem), 1);
    header(&mem, VIRTIO_BLK_T_OUT, 0);
    let chain = vq
        .build_desc_chain(&[
            rd(HDR, 16),
            rd(DATA, 4096),
            rd(DATA + 4096, 4608),
            wr(STATUS, 1),
        ])
        .unwrap();
    let out = run_chain(&mem, chain, &disk, &lim, ExecOptions::default());
    assert_eq!(out.error(), RequestError::TooLarge(8704));
    assert!(disk.log().is_empty());
    header(&mem, VIRTIO_BLK_T_IN, 0);

    // More descriptors than any request needs (header/status allowance included).
    let mut descs = vec![rd(HDR, 16)];
    descs.extend((0..12).map(|i| wr(DATA + i * 512, 512)));
    descs.push(wr(STATUS, 1));
    let chain = vq.build_desc_chain(&descs).unwrap();
    let out = run_chain(&mem, chain, &disk, &lim, ExecOptions::default());
    assert_eq!(out.error(), RequestError::TooManyDescriptors(14));
    assert_eq!(status(&mem), 1);
}

#[test]
fn chains_longer_than_the_queue_fail() {
    let mem = memory();
    let disk = MemDisk::new();
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let vq = MockSplitQueue::new(&mem, 16);
    // Descriptor 1 links to itself: the chain never ends.
    let next = VRING_DESC_F_NEXT as u16;
    let descs = [
        RawDescriptor::from(Descriptor::new(HDR, 16, next, 1)),
        RawDescriptor::from(Descriptor::new(
            STATUS,
            1,
            next | VRING_DESC_F_WRITE as u16,
            1,
        )),
    ];
    let chain = vq.build_multiple_desc_chains(&descs).unwrap();
    let out = run_chain(&mem, chain, &disk, &limits(&disk), ExecOptions::default());
    assert_eq!(out.error(), RequestError::TruncatedChain);
    assert_eq!(out.completion.status, Status::IoErr);
    assert_eq!(status(&mem), 1);

    // A link past the end of the table.
    let descs = [
        RawDescriptor::from(Descriptor::new(HDR, 16, next, 1)),
        RawDescriptor::from(Descriptor::new(
            STATUS,
            1,
            next | VRING_DESC_F_WRITE as u16,
            200,
        )),
    ];
    let chain = vq.build_multiple_desc_chains(&descs).unwrap();
    let out = run_chain(&mem, chain, &disk, &limits(&disk), ExecOptions::default());
    assert_eq!(out.error(), RequestError::TruncatedChain);
    assert!(disk.log().is_empty());
}

#[test]
fn head_index_outside_the_queue_is_an_empty_chain() {
    let mem = memory();
    let disk = MemDisk::new();
    let vq = MockSplitQueue::new(&mem, 16);
    vq.avail().ring().ref_at(0).unwrap().store(u16::to_le(40));
    vq.avail().idx().store(u16::to_le(1));
    let mut q: Queue = vq.create_queue().unwrap();
    let chain = q.pop_descriptor_chain(&mem).unwrap();
    let out = run_chain(&mem, chain, &disk, &limits(&disk), ExecOptions::default());
    assert_eq!(out.error(), RequestError::EmptyChain);
    assert_eq!(out.completion.used_len, 0);
}

#[test]
fn indirect_chain_is_followed() {
    let mem = memory();
    let disk = MemDisk::new();
    header(&mem, VIRTIO_BLK_T_IN, 2);
    let table = GuestAddress(0x40_0000);
    let entries = [
        RawDescriptor::from(Descriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1)),
        RawDescriptor::from(Descriptor::new(
            DATA,
            1024,
            (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16,
            2,
        )),
        RawDescriptor::from(Descriptor::new(STATUS, 1, VRING_DESC_F_WRITE as u16, 0)),
    ];
    for (i, e) in entries.iter().enumerate() {
        mem.write_obj(*e, table.unchecked_add(i as u64 * 16))
            .unwrap();
    }
    let vq = MockSplitQueue::new(&mem, 16);
    let head = RawDescriptor::from(Descriptor::new(
        table.0,
        48,
        VRING_DESC_F_INDIRECT as u16,
        0,
    ));
    let chain = vq.build_desc_chain(&[head]).unwrap();
    let out = run_chain(&mem, chain, &disk, &limits(&disk), ExecOptions::default());
    assert_eq!(out.completion.status, Status::Ok);
    assert_eq!(out.completion.used_len, 1025);
    let mut got = vec![0u8; 1024];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, disk.data.lock()[1024..2048]);
}

#[test]
fn read_only_device_refuses_writes() {
    let mem = memory();
    let mut disk = MemDisk::new();
    disk.read_only = true;
    header(&mem, VIRTIO_BLK_T_OUT, 0);
    mem.write_slice(&[0xcc; 512], GuestAddress(DATA)).unwrap();
    let out = run(&mem, &[rd(HDR, 16), rd(DATA, 512), wr(STATUS, 1)], &disk);
    assert_eq!(out.error(), RequestError::ReadOnly);
    assert_eq!(status(&mem), 1);
    header(&mem, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    mem.write_slice(&range_entry(0, 8, 0), GuestAddress(DATA))
        .unwrap();
    let out = run(&mem, &[rd(HDR, 16), rd(DATA, 16), wr(STATUS, 1)], &disk);
    assert_eq!(out.error(), RequestError::ReadOnly);
    assert!(disk.log().is_empty());
    assert_eq!(disk.data.lock()[0], 0);
    assert_eq!(disk.data.lock()[1], 1);
    // Reads still work.
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let out = run(&mem, &[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)], &disk);
    assert_eq!(out.completion.status, Status::Ok);
}

#[test]
fn backend_failure_is_an_io_error() {
    let mem = memory();
    let mut disk = MemDisk::new();
    disk.fail_reads = true;
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let out = run(&mem, &[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)], &disk);
    assert!(out.parsed.is_ok());
    assert_eq!(out.completion.status, Status::IoErr);
    assert_eq!(out.completion.used_len, 1);
    assert_eq!(status(&mem), 1);
}

#[test]
fn locality_follows_the_backend() {
    let mem = memory();
    let mut disk = MemDisk::new();
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let out = run(&mem, &[rd(HDR, 16), wr(DATA, 512), wr(STATUS, 1)], &disk);
    assert!(out.parsed.as_ref().unwrap().is_local(&disk));
    disk.local = false;
    assert!(!out.parsed.as_ref().unwrap().is_local(&disk));
    header(&mem, VIRTIO_BLK_T_FLUSH, 0);
    let out = run(&mem, &[rd(HDR, 16), wr(STATUS, 1)], &disk);
    assert!(out.parsed.unwrap().is_local(&disk));
}

#[test]
fn large_read_lands_in_guest_memory_in_one_call() {
    let mem = memory();
    let disk = MemDisk::new();
    header(&mem, VIRTIO_BLK_T_IN, 8);
    // 1.5 MiB read in 3 segments of 512 KiB, the middle one elsewhere in memory.
    let seg: u32 = 512 * 1024;
    let at = [0x40_0000, 0x60_0000, 0x48_0000];
    let out = run(
        &mem,
        &[
            rd(HDR, 16),
            wr(at[0], seg),
            wr(at[1], seg),
            wr(at[2], seg),
            wr(STATUS, 1),
        ],
        &disk,
    );
    assert_eq!(out.completion.status, Status::Ok);
    assert_eq!(out.completion.used_len, 3 * seg + 1);
    let s = seg as usize;
    // One backend call for the whole request, all segments in one buffer.
    assert_eq!(*disk.reads.lock(), vec![(4096, 3 * s)]);
    let d = disk.data.lock();
    for (i, addr) in at.into_iter().enumerate() {
        let mut got = vec![0u8; s];
        mem.read_slice(&mut got, GuestAddress(addr)).unwrap();
        let from = 4096 + i * s;
        assert!(got == d[from..from + s], "segment {i}");
    }
}

#[test]
fn large_write_goes_to_the_backend_in_one_call() {
    let mem = memory();
    let disk = MemDisk::new();
    header(&mem, VIRTIO_BLK_T_OUT, 0);
    let seg: u32 = 512 * 1024;
    let at = [0x60_0000, 0x40_0000, 0x68_0000];
    for (i, addr) in at.into_iter().enumerate() {
        mem.write_slice(&vec![i as u8 + 1; seg as usize], GuestAddress(addr))
            .unwrap();
    }
    let out = run(
        &mem,
        &[
            rd(HDR, 16),
            rd(at[0], seg),
            rd(at[1], seg),
            rd(at[2], seg),
            wr(STATUS, 1),
        ],
        &disk,
    );
    assert_eq!(out.completion.status, Status::Ok);
    assert_eq!(disk.log(), vec!["write 0 1572864"]);
    let d = disk.data.lock();
    for i in 0..3usize {
        let s = seg as usize;
        assert!(d[i * s..(i + 1) * s].iter().all(|&b| b == i as u8 + 1));
    }
}

/// Guest memory in two adjacent regions, split at `MEM_SIZE / 2`.
fn two_region_memory() -> GuestMemoryMmap<()> {
    let half = MEM_SIZE / 2;
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), half), (GuestAddress(half as u64), half)])
        .unwrap()
}

#[test]
fn segments_spanning_two_memory_regions_reach_the_backend_whole() {
    let mem = two_region_memory();
    let disk = MemDisk::new();
    let boundary = (MEM_SIZE / 2) as u64;
    // A read whose only segment straddles the boundary: 4 KiB before, 8 KiB after.
    header(&mem, VIRTIO_BLK_T_IN, 2);
    let out = run(
        &mem,
        &[rd(HDR, 16), wr(boundary - 4096, 12288), wr(STATUS, 1)],
        &disk,
    );
    assert_eq!(out.completion.status, Status::Ok);
    assert_eq!(*disk.reads.lock(), vec![(1024, 12288)]);
    let mut got = vec![0u8; 12288];
    mem.read_slice(&mut got, GuestAddress(boundary - 4096))
        .unwrap();
    assert!(got == disk.data.lock()[1024..1024 + 12288]);

    // The same for a write.
    mem.write_slice(&[0x5a; 12288], GuestAddress(boundary - 4096))
        .unwrap();
    header(&mem, VIRTIO_BLK_T_OUT, 64);
    let out = run(
        &mem,
        &[rd(HDR, 16), rd(boundary - 4096, 12288), wr(STATUS, 1)],
        &disk,
    );
    assert_eq!(out.completion.status, Status::Ok);
    assert_eq!(disk.log(), vec!["write 32768 12288"]);
    assert!(disk.data.lock()[32768..32768 + 12288]
        .iter()
        .all(|&b| b == 0x5a));
}

#[test]
fn failed_read_reports_no_data() {
    let mem = memory();
    let mut disk = MemDisk::new();
    disk.fail_reads = true;
    header(&mem, VIRTIO_BLK_T_IN, 0);
    let out = run(
        &mem,
        &[
            rd(HDR, 16),
            wr(DATA, 4096),
            wr(DATA + 0x2000, 4096),
            wr(STATUS, 1),
        ],
        &disk,
    );
    assert_eq!(out.completion.status, Status::IoErr);
    assert_eq!(out.completion.used_len, 1);
    // One call for both segments, which failed.
    assert_eq!(*disk.reads.lock(), vec![(0, 8192)]);
}

#[test]
fn segments_are_checked_again_where_the_pointer_is_made() {
    // Parsed against the full memory, executed against a smaller map (as if the frontend
    // had removed a region in between): nothing reaches the backend, the status says so.
    let mem = memory();
    let small = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE / 2)]).unwrap();
    let disk = MemDisk::new();
    for (req_type, data) in [
        (VIRTIO_BLK_T_IN, wr(0x40_0000, 4096)),
        (VIRTIO_BLK_T_OUT, rd(0x40_0000, 4096)),
    ] {
        header(&mem, req_type, 0);
        let vq = MockSplitQueue::new(&mem, 16);
        let chain = vq
            .build_desc_chain(&[rd(HDR, 16), data, wr(STATUS, 1)])
            .unwrap();
        let req = parse(chain, &limits(&disk)).unwrap();
        let c = execute(&req, &small, &disk, ExecOptions::default());
        assert_eq!(c.status, Status::IoErr);
        assert_eq!(c.used_len, 1);
        assert_eq!(small.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 1);
    }
    assert!(disk.reads.lock().is_empty());
    assert!(disk.log().is_empty());
}
