//! The demo's guest when there is no VM: a vhost-user-blk client (the `blkio` crate,
//! independent of our server) that reads the whole device, checks it against v2, writes
//! a block and flushes, like a guest would.

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

use super::DemoError;

/// Bytes per request.
const REQ: usize = 1 << 20;
/// The longest one request may take (a fetch on demand included).
const TIMEOUT: Duration = Duration::from_secs(120);

/// A connected client with one mapped buffer of [`REQ`] bytes.
pub struct Client {
    queue: Blkioq,
    region: MemoryRegion,
    /// Device size in bytes.
    pub capacity: u64,
    // Dropped last: the queue and the region belong to it.
    _blkio: Blkio,
}

fn err(what: &str, e: blkio::Error) -> DemoError {
    DemoError::Guest(format!("{what}: {e}"))
}

impl Client {
    /// Connects to the vhost-user socket at `path` and starts one queue.
    pub fn connect(path: &Path) -> Result<Self, DemoError> {
        let mut b = Blkio::new("virtio-blk-vhost-user").map_err(|e| err("blkio", e))?;
        let p = path
            .to_str()
            .ok_or_else(|| DemoError::Guest("socket path is not UTF-8".into()))?;
        b.set_str("path", p).map_err(|e| err("path", e))?;
        b.connect().map_err(|e| err("connect", e))?;
        let capacity = b.get_u64("capacity").map_err(|e| err("capacity", e))?;
        b.set_i32("num-queues", 1)
            .map_err(|e| err("num-queues", e))?;
        let mut started = b.start().map_err(|e| err("start", e))?;
        let align = b
            .get_u64("mem-region-alignment")
            .map_err(|e| err("alignment", e))? as usize;
        let region = b
            .alloc_mem_region(REQ.div_ceil(align) * align)
            .map_err(|e| err("buffer", e))?;
        b.map_mem_region(&region)
            .map_err(|e| err("map buffer", e))?;
        Ok(Self {
            queue: started.queues.remove(0),
            region,
            capacity,
            _blkio: b,
        })
    }

    /// The mapped buffer.
    fn buf(&mut self) -> &mut [u8] {
        // Requests run only inside `io`, which takes `&mut self`, so the device does not
        // touch the region while the slice lives.
        // SAFETY: the region is a live mapping of `region.len` (>= REQ) bytes owned by
        // `_blkio`, which outlives this borrow of `self`; nothing else accesses it (above).
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, REQ) }
    }

    /// Submits the queued request and waits for its completion.
    fn io(&mut self, what: &str) -> Result<(), DemoError> {
        let mut c = [MaybeUninit::<Completion>::uninit()];
        let mut left = TIMEOUT;
        let n = self
            .queue
            .do_io(&mut c, 1, Some(&mut left), None)
            .map_err(|e| err(what, e))?;
        if n != 1 {
            return Err(DemoError::Guest(format!("{what}: no completion")));
        }
        // SAFETY: do_io initialised the first `n` (= 1) completions.
        let ret = unsafe { c[0].assume_init_ref() }.ret;
        if ret != 0 {
            return Err(DemoError::Guest(format!(
                "{what}: {}",
                std::io::Error::from_raw_os_error(-ret)
            )));
        }
        Ok(())
    }

    /// Reads `out.len()` (<= 1 MiB) bytes at `off` into `out`.
    pub fn read(&mut self, off: u64, out: &mut [u8]) -> Result<(), DemoError> {
        let n = out.len();
        assert!(n <= REQ);
        let p = self.region.addr as *mut u8;
        self.queue.read(off, p, n, 0, ReqFlags::empty());
        self.io(&format!("read {n} bytes at {off}"))?;
        out.copy_from_slice(&self.buf()[..n]);
        Ok(())
    }

    /// Writes `data` (<= 1 MiB) at `off`.
    pub fn write(&mut self, off: u64, data: &[u8]) -> Result<(), DemoError> {
        let n = data.len();
        assert!(n <= REQ);
        self.buf()[..n].copy_from_slice(data);
        let p = self.region.addr as *mut u8;
        self.queue.write(off, p, n, 0, ReqFlags::empty());
        self.io(&format!("write {n} bytes at {off}"))
    }

    /// Flushes the device's write cache.
    pub fn flush(&mut self) -> Result<(), DemoError> {
        self.queue.flush(0, ReqFlags::empty());
        self.io("flush")
    }

    /// Reads the whole device and compares it with `expect`; `progress(done)` after each
    /// request. Returns the offset of the first differing byte, if any.
    pub fn verify(
        &mut self,
        expect: &[u8],
        progress: &dyn Fn(u64),
    ) -> Result<Option<u64>, DemoError> {
        if self.capacity != expect.len() as u64 {
            return Err(DemoError::Guest(format!(
                "device has {} bytes, the image {}",
                self.capacity,
                expect.len()
            )));
        }
        let mut chunk = vec![0u8; REQ];
        let mut off = 0usize;
        while off < expect.len() {
            let n = REQ.min(expect.len() - off);
            self.read(off as u64, &mut chunk[..n])?;
            if chunk[..n] != expect[off..off + n] {
                let i = (0..n).find(|&i| chunk[i] != expect[off + i]).unwrap_or(0);
                return Ok(Some((off + i) as u64));
            }
            off += n;
            progress(off as u64);
        }
        Ok(None)
    }
}
