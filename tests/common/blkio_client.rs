//! A vhost-user-blk client on top of the `blkio` crate (libblkio's Rust implementation),
//! independent of the server under test. Shared by the integration tests and the bench.

#![allow(dead_code)]

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

/// How long any single wait for completions may take before the test fails.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// A connected, started vhost-user-blk client with one shared buffer region.
pub struct Client {
    pub queues: Vec<Blkioq>,
    region: MemoryRegion,
    pub capacity: u64,
    pub read_only: bool,
    // Dropped last: the queues and the region belong to it.
    blkio: Blkio,
}

/// Result of one request: its user data and its return value (0 or -errno).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Done {
    pub user_data: usize,
    pub ret: i32,
}

impl Client {
    /// Connects to `path`, starts `num_queues` queues and maps a buffer of `buf_len` bytes.
    pub fn connect(path: &Path, num_queues: i32, buf_len: usize) -> Result<Self, blkio::Error> {
        Self::connect_with(path, num_queues, buf_len, false)
    }

    /// Like [`Self::connect`]; `read_only` opens the device read-only (libblkio refuses to
    /// start on a device that offers VIRTIO_BLK_F_RO otherwise).
    pub fn connect_with(
        path: &Path,
        num_queues: i32,
        buf_len: usize,
        read_only: bool,
    ) -> Result<Self, blkio::Error> {
        let mut blkio = Blkio::new("virtio-blk-vhost-user")?;
        blkio.set_str("path", path.to_str().expect("utf-8 socket path"))?;
        blkio.set_bool("read-only", read_only)?;
        blkio.connect()?;
        let capacity = blkio.get_u64("capacity")?;
        let read_only = blkio.get_bool("read-only")?;
        blkio.set_i32("num-queues", num_queues)?;
        let started = blkio.start()?;
        let align = blkio.get_u64("mem-region-alignment")? as usize;
        let len = buf_len.div_ceil(align) * align;
        let region = blkio.alloc_mem_region(len)?;
        blkio.map_mem_region(&region)?;
        Ok(Self {
            queues: started.queues,
            region,
            capacity,
            read_only,
            blkio,
        })
    }

    /// Bytes `range` of the mapped buffer. Only look at bytes no request in flight uses.
    pub fn buf(&mut self, range: std::ops::Range<usize>) -> &mut [u8] {
        assert!(range.start <= range.end && range.end <= self.region.len);
        // Soundness: the region is a live shared mapping of `region.len` bytes owned by
        // `self.blkio`, which outlives the returned borrow of `self`, and `range` lies
        // inside it. Callers only ask for bytes that no in-flight request targets, so the
        // device does not write them while the slice is alive.
        // SAFETY: sound for the reasons given just above.
        unsafe {
            std::slice::from_raw_parts_mut((self.region.addr + range.start) as *mut u8, range.len())
        }
    }

    fn ptr(&self, buf_off: usize, len: usize) -> *mut u8 {
        assert!(buf_off + len <= self.region.len, "buffer too small");
        (self.region.addr + buf_off) as *mut u8
    }

    /// Queues a read of `len` bytes at `offset` into the buffer at `buf_off`.
    pub fn submit_read(&mut self, q: usize, offset: u64, buf_off: usize, len: usize, tag: usize) {
        let p = self.ptr(buf_off, len);
        self.queues[q].read(offset, p, len, tag, ReqFlags::empty());
    }

    /// Queues a write of `len` bytes from the buffer at `buf_off` to `offset`.
    pub fn submit_write(&mut self, q: usize, offset: u64, buf_off: usize, len: usize, tag: usize) {
        let p = self.ptr(buf_off, len);
        self.queues[q].write(offset, p, len, tag, ReqFlags::empty());
    }

    /// Queues a flush.
    pub fn submit_flush(&mut self, q: usize, tag: usize) {
        self.queues[q].flush(tag, ReqFlags::empty());
    }

    /// Submits the queued requests and waits for at least `min` completions.
    pub fn wait(&mut self, q: usize, min: usize) -> Result<Vec<Done>, blkio::Error> {
        self.wait_for(q, min, IO_TIMEOUT)
    }

    /// Like [`Self::wait`] with an explicit timeout.
    pub fn wait_for(
        &mut self,
        q: usize,
        min: usize,
        timeout: Duration,
    ) -> Result<Vec<Done>, blkio::Error> {
        let mut done = Vec::new();
        let mut left = timeout;
        while done.len() < min.max(1) {
            let mut completions: Vec<MaybeUninit<Completion>> =
                (0..64).map(|_| MaybeUninit::uninit()).collect();
            let want = (min - done.len().min(min)).min(64);
            let n = self.queues[q].do_io(&mut completions, want, Some(&mut left), None)?;
            for c in &completions[..n] {
                // SAFETY: do_io initialised the first `n` completions.
                let c = unsafe { c.assume_init_ref() };
                done.push(Done {
                    user_data: c.user_data,
                    ret: c.ret,
                });
            }
            if min == 0 {
                break;
            }
        }
        Ok(done)
    }

    /// One synchronous request on queue 0; returns its `ret`.
    pub fn read(&mut self, offset: u64, buf_off: usize, len: usize) -> i32 {
        self.submit_read(0, offset, buf_off, len, 0);
        self.wait(0, 1).expect("read completion")[0].ret
    }

    /// One synchronous write on queue 0; returns its `ret`.
    pub fn write(&mut self, offset: u64, buf_off: usize, len: usize) -> i32 {
        self.submit_write(0, offset, buf_off, len, 0);
        self.wait(0, 1).expect("write completion")[0].ret
    }

    /// One synchronous discard on queue 0; returns its `ret`.
    pub fn discard(&mut self, offset: u64, len: u64) -> i32 {
        self.queues[0].discard(offset, len, 0, ReqFlags::empty());
        self.wait(0, 1).expect("discard completion")[0].ret
    }

    /// One synchronous flush on queue 0; returns its `ret`.
    pub fn flush(&mut self) -> i32 {
        self.submit_flush(0, 0);
        self.wait(0, 1).expect("flush completion")[0].ret
    }
}
