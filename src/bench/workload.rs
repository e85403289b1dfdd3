//! The bench's guest: libblkio's vhost-user-blk client (independent of our server) issuing
//! reads at a queue depth and timing each one.

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::{Duration, Instant};

use blkio::{Blkio, Completion, ReqFlags};

use super::{BenchError, Ops, WorkloadResult};

/// The longest one request may take (fetches on demand over a slow link included).
const TIMEOUT: Duration = Duration::from_secs(120);

fn err(what: &'static str, e: blkio::Error) -> BenchError {
    BenchError::Blkio { what, source: e }
}

/// A request in flight.
#[derive(Clone, Copy)]
struct Slot {
    submitted: Instant,
    len: usize,
}

/// Connects to `sock` and runs `ops` with `queue_depth` reads of at most `block_size`
/// bytes in flight; `progress(done)` after each completion.
pub fn run(
    sock: &Path,
    ops: &mut Ops,
    block_size: usize,
    queue_depth: usize,
    progress: &dyn Fn(u64),
) -> Result<WorkloadResult, BenchError> {
    let mut b = Blkio::new("virtio-blk-vhost-user").map_err(|e| err("blkio", e))?;
    let p = sock.to_str().ok_or(BenchError::NotUtf8)?;
    b.set_str("path", p).map_err(|e| err("path", e))?;
    b.connect().map_err(|e| err("connect", e))?;
    let capacity = b.get_u64("capacity").map_err(|e| err("capacity", e))?;
    b.set_i32("num-queues", 1)
        .map_err(|e| err("num-queues", e))?;
    let mut started = b.start().map_err(|e| err("start", e))?;
    let align = b
        .get_u64("mem-region-alignment")
        .map_err(|e| err("alignment", e))? as usize;
    let size = (block_size * queue_depth).div_ceil(align) * align;
    let region = b.alloc_mem_region(size).map_err(|e| err("buffer", e))?;
    b.map_mem_region(&region)
        .map_err(|e| err("map buffer", e))?;
    let mut queue = started.queues.remove(0);
    ops.set_capacity(capacity);

    let start = Instant::now();
    let mut res = WorkloadResult::new(start);
    let mut slots: Vec<Option<Slot>> = vec![None; queue_depth];
    let mut in_flight = 0usize;
    let mut done = 0u64;
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..queue_depth).map(|_| MaybeUninit::uninit()).collect();
    loop {
        // Fill every free slot.
        for (i, slot) in slots.iter_mut().enumerate() {
            if slot.is_some() {
                continue;
            }
            let Some((off, len)) = ops.next(start.elapsed()) else {
                break;
            };
            let len = len.min(block_size);
            // Each slot owns its block_size bytes of the region.
            let buf = (region.addr + i * block_size) as *mut u8;
            queue.read(off, buf, len, i, ReqFlags::empty());
            *slot = Some(Slot {
                submitted: Instant::now(),
                len,
            });
            in_flight += 1;
        }
        if in_flight == 0 {
            break;
        }
        let mut left = TIMEOUT;
        let n = queue
            .do_io(&mut completions, 1, Some(&mut left), None)
            .map_err(|e| err("read", e))?;
        if n == 0 {
            return Err(BenchError::Guest(format!(
                "no read completed within {} s",
                TIMEOUT.as_secs()
            )));
        }
        let now = Instant::now();
        for c in &completions[..n] {
            // SAFETY: do_io initialised the first `n` completions.
            let c = unsafe { c.assume_init_ref() };
            let slot = slots
                .get_mut(c.user_data)
                .and_then(Option::take)
                .ok_or_else(|| BenchError::Guest("completion of an unknown request".into()))?;
            in_flight -= 1;
            if c.ret != 0 {
                return Err(BenchError::Guest(format!(
                    "read failed: {}",
                    std::io::Error::from_raw_os_error(-c.ret)
                )));
            }
            let latency = now - slot.submitted;
            res.first_done.get_or_insert(now);
            res.first_latency.get_or_insert(latency);
            res.bytes_read += slot.len as u64;
            res.latencies
                .push(((now - start).as_secs_f64(), latency.as_secs_f64() * 1e3));
            done += 1;
        }
        progress(done);
    }
    res.end = Instant::now();
    res.ops = done;
    // The region belongs to `b`; both go together (queue first).
    drop(queue);
    drop(b);
    Ok(res)
}
