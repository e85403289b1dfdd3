//! The [`VhostUserBackend`] implementation: one worker thread per queue, requests for
//! local data run inline on the worker, the others (and large local ones while the queue
//! has other work, see `BlkBackend::lane_for`) go to the I/O pool and complete out of
//! order through the queue's eventfd.
//!
//! One [`BlkBackend`] serves one frontend connection; the block device and the I/O pool
//! behind it are shared by all connections.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_FLUSH};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::blockdev::{BlockBackend, DeviceEvents};
use crate::virtio::{self, Completion, ExecOptions, Limits, Request, RequestKind};

use super::config::{self, CONFIG_SIZE, WRITEBACK_OFFSET};
use super::pool::{IoPool, Lane};
use super::queue::QueueCtx;
use super::start::StartTracker;

/// Guest memory as the vhost-user-backend crate hands it over.
pub(crate) type GuestMem = GuestMemoryAtomic<GuestMemoryMmap<()>>;
/// The vring type used by the backend.
pub(crate) type Vring = VringRwLock<GuestMem>;

/// Largest config space a vhost-user frontend may ask for.
const VHOST_USER_CONFIG_MAX: u32 = 256;

/// Static parameters of a device.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DeviceParams {
    pub(crate) num_queues: u16,
    pub(crate) queue_size: u16,
}

struct Inner {
    disk: Arc<dyn BlockBackend>,
    /// Re-read at every device start: the device may present something else then.
    limits: parking_lot::RwLock<Limits>,
    params: DeviceParams,
    optimal_io_size: u32,
    mem: GuestMem,
    event_idx: AtomicBool,
    acked_features: AtomicU64,
    /// The `writeback` config byte (CONFIG_WCE); write-back until the driver says otherwise.
    writeback: AtomicBool,
    queues: Vec<Arc<QueueCtx>>,
    pool: Arc<IoPool>,
    /// Exit eventfds handed to the epoll handlers, which keep them open forever; closed
    /// by [`BlkBackend::close_exit_events`] once the workers are gone.
    exit_fds: Mutex<Vec<RawFd>>,
    /// Device starts of this connection.
    start: StartTracker,
    /// Set once the frontend is gone: deferred requests not yet running are dropped
    /// (never acknowledged) instead of touching the disk or guest memory.
    departed: Arc<AtomicBool>,
    /// Accept guest memory not sealed against shrinking.
    allow_unsealed: AtomicBool,
    /// False once the frontend offered memory we refused: no ring is touched any more.
    memory_ok: AtomicBool,
}

/// The vhost-user-blk device for one frontend connection.
#[derive(Clone)]
pub(crate) struct BlkBackend {
    inner: Arc<Inner>,
}

impl BlkBackend {
    pub(crate) fn new(
        disk: Arc<dyn BlockBackend>,
        params: DeviceParams,
        pool: Arc<IoPool>,
        mem: GuestMem,
        events: Option<Arc<dyn DeviceEvents>>,
    ) -> io::Result<Self> {
        let queues = (0..params.num_queues)
            .map(|_| QueueCtx::new().map(Arc::new))
            .collect::<io::Result<Vec<_>>>()?;
        let limits = Limits::for_backend(disk.as_ref());
        let optimal_io_size = disk.optimal_io_size();
        Ok(Self {
            inner: Arc::new(Inner {
                disk,
                limits: parking_lot::RwLock::new(limits),
                params,
                optimal_io_size,
                mem,
                event_idx: AtomicBool::new(false),
                acked_features: AtomicU64::new(0),
                writeback: AtomicBool::new(true),
                queues,
                pool,
                exit_fds: Mutex::new(Vec::new()),
                start: StartTracker::new(usize::from(params.num_queues), events),
                departed: Arc::new(AtomicBool::new(false)),
                allow_unsealed: AtomicBool::new(false),
                memory_ok: AtomicBool::new(true),
            }),
        })
    }

    /// Makes every queue worker hand us its vring (through a completion event), so that
    /// a device start can look at all rings. Waits up to a second for the workers.
    pub(crate) fn prime(&self) {
        for q in &self.inner.queues {
            q.wake();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        while self.inner.start.known() < self.inner.queues.len()
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// Accept guest memory not sealed against shrinking (`serve --allow-unsealed-memory`).
    pub(crate) fn allow_unsealed_memory(&self, allow: bool) {
        self.inner.allow_unsealed.store(allow, Ordering::Release);
    }

    /// The frontend is gone: drop deferred requests that have not started.
    pub(crate) fn depart(&self) {
        self.inner.departed.store(true, Ordering::Release);
    }

    /// Runs at a device start, before any request of it: the device may present another
    /// capacity now (a fallback to a source of another size). Requests are held to the new
    /// one. The frontend keeps the capacity it read when it connected (QEMU reads the
    /// config once per VMM process, and the vhost crate cannot send the backend's
    /// config-change message): the guest sees the new size once its VMM process restarts.
    fn refresh_limits(&self) {
        let fresh = Limits::for_backend(self.inner.disk.as_ref());
        let old = std::mem::replace(&mut *self.inner.limits.write(), fresh);
        if old.capacity_sectors != fresh.capacity_sectors {
            tracing::warn!(
                old = old.capacity_bytes(),
                new = fresh.capacity_bytes(),
                "device capacity changed; the VMM keeps the size it read at its start until \
                 its process restarts (requests past the new end fail)"
            );
        }
    }

    fn limits(&self) -> Limits {
        *self.inner.limits.read()
    }

    /// The epoll token of the completion eventfd in every worker's epoll set (the crate
    /// reserves `0..=num_queues` for the rings and its exit event).
    pub(crate) fn completion_token(&self) -> u64 {
        u64::from(self.inner.params.num_queues) + 1
    }

    /// The completion eventfd of queue `q`.
    pub(crate) fn completion_fd(&self, q: usize) -> RawFd {
        self.inner.queues[q].event_fd()
    }

    /// Closes the exit eventfds the epoll handlers leaked. Call only after the daemon and
    /// its worker threads are gone.
    pub(crate) fn close_exit_events(&self) {
        for fd in self.inner.exit_fds.lock().drain(..) {
            // `fd` came from `EventConsumer::into_raw_fd` inside the crate's epoll handler,
            // which never closes it; its workers have exited and the handler is dropped.
            // SAFETY: nothing else uses or owns this descriptor (above).
            unsafe { libc::close(fd) };
        }
    }

    /// Deferred requests of this connection not yet returned to the guest.
    pub(crate) fn inflight(&self) -> usize {
        self.inner.queues.iter().map(|q| q.inflight()).sum()
    }

    fn exec_options(&self) -> ExecOptions {
        let acked = self.inner.acked_features.load(Ordering::Acquire);
        // Without FLUSH the driver cannot order writes: run write-through.
        let writeback = config::has_feature(acked, VIRTIO_BLK_F_FLUSH)
            && self.inner.writeback.load(Ordering::Acquire);
        ExecOptions { writeback }
    }

    /// Takes every available request off queue `q`'s ring.
    fn process_queue(&self, q: usize, vring: &Vring) -> io::Result<()> {
        let ctx = &self.inner.queues[q];
        let _processing = ctx.processing.lock();
        if !vring.get_ref().get_queue().ready() || !self.inner.memory_ok.load(Ordering::Acquire) {
            return Ok(());
        }
        // Under the processing lock with the ring ready: a stop (which waits for this
        // lock) cannot slip in between, so a start is only ever seen on a live ring.
        let acked = self.inner.acked_features.load(Ordering::Acquire);
        self.inner
            .start
            .before_processing(acked, || self.refresh_limits());
        let event_idx = self.inner.event_idx.load(Ordering::Acquire);
        loop {
            if event_idx {
                vring.disable_notification().map_err(io::Error::other)?;
            }
            self.drain_available(q, vring)?;
            // With EVENT_IDX, re-enabling notifications tells whether the driver added
            // requests meanwhile; without it, one pass per kick is enough.
            if !event_idx || !vring.enable_notification().map_err(io::Error::other)? {
                return Ok(());
            }
        }
    }

    fn drain_available(&self, q: usize, vring: &Vring) -> io::Result<()> {
        let mem = self.inner.mem.memory();
        let mut completed = 0usize;
        loop {
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone());
            let Some(chain) = chain else { break };
            let completion = match virtio::parse(chain, &self.limits()) {
                Err(rejected) => {
                    tracing::debug!(queue = q, error = %rejected.error, "rejected virtio-blk request");
                    rejected.complete(&*mem)
                }
                Ok(req) => match self.lane_for(q, &req, vring, &mem) {
                    None => {
                        tracing::trace!(queue = q, head = req.head_index(), kind = ?req.kind(), "virtio-blk request");
                        virtio::execute(&req, &*mem, self.inner.disk.as_ref(), self.exec_options())
                    }
                    Some(lane) => {
                        tracing::trace!(queue = q, head = req.head_index(), kind = ?req.kind(), ?lane, "deferred virtio-blk request");
                        self.defer(q, req, lane);
                        continue;
                    }
                },
            };
            self.add_used(vring, completion)?;
            completed += 1;
        }
        if completed > 0 {
            signal(vring)?;
        }
        Ok(())
    }

    /// Where a request of queue `q` runs: inline on the worker (`None`) or on a lane of
    /// the I/O pool.
    ///
    /// - Not local (may wait on the network): the remote lane, so that it does not stall
    ///   the requests behind it.
    /// - A large local read or write ([`BULK_MIN_BYTES`]) while the queue has other work
    ///   (requests of it still in the pool, or more requests in the ring): the bulk lane,
    ///   so that several run at once (one thread copies about half what two do; measured
    ///   in docs/vhost-user-blk.md). Alone, it runs inline: a thread hop would only add
    ///   latency.
    /// - Anything else runs inline: a small local request costs less than a hop.
    fn lane_for(
        &self,
        q: usize,
        req: &Request,
        vring: &Vring,
        mem: &GuestMemoryMmap<()>,
    ) -> Option<Lane> {
        if !req.is_local(self.inner.disk.as_ref()) {
            return Some(Lane::Remote);
        }
        let busy = || self.inner.queues[q].inflight() > 0 || more_available(vring, mem);
        (is_bulk(req) && busy()).then_some(Lane::Bulk)
    }

    /// Hands a request to the I/O pool: one that may wait on the network (remote lane)
    /// or a large local one (bulk lane).
    fn defer(&self, q: usize, req: Request, lane: Lane) {
        let ctx = self.inner.queues[q].clone();
        let mem = self.inner.mem.memory();
        let disk = self.inner.disk.clone();
        let opts = self.exec_options();
        let departed = self.inner.departed.clone();
        ctx.begin();
        let job = Box::new(move || {
            if departed.load(Ordering::Acquire) {
                // Never acknowledged: the frontend resubmits it if it comes back.
                ctx.finish(1);
                return;
            }
            let completion = virtio::execute(&req, &*mem, disk.as_ref(), opts);
            ctx.complete(completion);
        });
        if let Err(job) = self.inner.pool.submit(lane, job) {
            // The pool is shutting down: finish the request here rather than drop it.
            job();
        }
    }

    /// Returns the completions of deferred requests of queue `q` to the guest.
    fn process_completions(&self, q: usize, vring: &Vring) -> io::Result<()> {
        let ctx = &self.inner.queues[q];
        let done = ctx.take();
        if !self.inner.memory_ok.load(Ordering::Acquire) {
            ctx.finish(done.len());
            return Ok(());
        }
        let mut result = Ok(());
        for c in &done {
            if let Err(e) = self.add_used(vring, *c) {
                result = Err(e);
            }
        }
        if !done.is_empty() && result.is_ok() {
            result = signal(vring);
        }
        ctx.finish(done.len());
        result
    }

    fn add_used(&self, vring: &Vring, c: Completion) -> io::Result<()> {
        vring
            .add_used(c.head_index, c.used_len)
            .map_err(io::Error::other)
    }
}

/// Local reads and writes of at least this many bytes may run on the bulk lane of the
/// I/O pool, so that several proceed in parallel (see `BlkBackend::lane_for`).
pub(crate) const BULK_MIN_BYTES: u64 = 256 << 10;

/// True for a read or write large enough for the bulk lane.
fn is_bulk(req: &Request) -> bool {
    match req.kind() {
        RequestKind::Read { len, .. } | RequestKind::Write { len, .. } => *len >= BULK_MIN_BYTES,
        _ => false,
    }
}

/// True when the driver has made requests available that the worker has not taken yet.
fn more_available(vring: &Vring, mem: &GuestMemoryMmap<()>) -> bool {
    let state = vring.get_ref();
    let queue = state.get_queue();
    queue
        .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
        .is_ok_and(|idx| idx.0 != queue.next_avail())
}

/// Interrupts the guest if it asked to be (respects EVENT_IDX and NO_INTERRUPT).
fn signal(vring: &Vring) -> io::Result<()> {
    if vring.needs_notification().map_err(io::Error::other)? {
        vring.signal_used_queue()?;
    }
    Ok(())
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        usize::from(self.inner.params.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.inner.params.queue_size)
    }

    fn features(&self) -> u64 {
        config::virtio_features(self.limits().read_only)
    }

    fn acked_features(&self, features: u64) {
        self.inner.acked_features.store(features, Ordering::Release);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        config::protocol_features()
    }

    fn reset_device(&self) {
        // A deferred request must not land in a ring the driver has reset: wait for
        // them first (the rings are already disabled, so no new ones are taken).
        for ctx in &self.inner.queues {
            drop(ctx.processing.lock());
            ctx.wait_idle();
        }
        self.inner.writeback.store(true, Ordering::Release);
        self.inner.start.reset();
    }

    fn set_event_idx(&self, enabled: bool) {
        self.inner.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let cfg = config::config_space(
            &self.limits(),
            self.inner.optimal_io_size,
            self.inner.params.num_queues,
            self.inner.writeback.load(Ordering::Acquire),
        );
        let Some(end) = offset.checked_add(size) else {
            return Vec::new();
        };
        if end > VHOST_USER_CONFIG_MAX {
            return Vec::new();
        }
        // Fields past what we implement read as zero.
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(CONFIG_SIZE);
        let stop = (end as usize).min(CONFIG_SIZE);
        out[..stop - start].copy_from_slice(&cfg[start..stop]);
        out
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let acked = self.inner.acked_features.load(Ordering::Acquire);
        if offset as usize == WRITEBACK_OFFSET
            && buf.len() == 1
            && buf[0] <= 1
            && config::has_feature(acked, VIRTIO_BLK_F_CONFIG_WCE)
        {
            self.inner.writeback.store(buf[0] == 1, Ordering::Release);
            tracing::info!(
                writeback = buf[0] == 1,
                "guest changed the write cache mode"
            );
            return Ok(());
        }
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("config write of {} bytes at {offset} refused", buf.len()),
        ))
    }

    fn update_memory(&self, mem: GuestMem) -> io::Result<()> {
        // The crate updated the GuestMemoryAtomic it was created with (the one this
        // backend holds a clone of) before calling us: check what it now maps. Refused
        // memory stays mapped in the crate, so from then on no ring is touched.
        let allow = self.inner.allow_unsealed.load(Ordering::Acquire);
        let checked = super::memory::check_regions(&mem.memory(), allow);
        if let Err(e) = &checked {
            self.inner.memory_ok.store(false, Ordering::Release);
            // Requests still queued are dropped as if the frontend had gone.
            self.depart();
            tracing::error!("{e}");
        }
        checked
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.inner.params.num_queues)
            .map(|q| 1u64 << q)
            .collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok((consumer, notifier)) => {
                self.inner.exit_fds.lock().push(consumer.as_raw_fd());
                Some((consumer, notifier))
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot create a worker exit event");
                None
            }
        }
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        let Some(ctx) = self.inner.queues.get(queue_index as usize) else {
            return Ok(());
        };
        // The ring is marked not ready before this is called: once a pass in progress
        // ends, no new request is taken; then wait for deferred ones to be returned.
        drop(ctx.processing.lock());
        if ctx.inflight() > 0 {
            tracing::info!(
                queue = queue_index,
                inflight = ctx.inflight(),
                "waiting for in-flight requests before stopping the ring"
            );
        }
        ctx.wait_idle();
        self.inner.start.ring_stopped();
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // One queue per worker: the thread index is the queue index and the worker's
        // only vring is at index 0.
        let q = thread_id;
        let (Some(vring), true) = (vrings.first(), q < self.inner.queues.len()) else {
            return Ok(());
        };
        self.inner.start.remember(q, vring);
        let result = match u64::from(device_event) {
            0 => self.process_queue(q, vring),
            t if t == self.completion_token() => self.process_completions(q, vring),
            other => Err(io::Error::other(format!("unknown device event {other}"))),
        };
        // An error here comes from a ring the guest set up badly. Returning it would end
        // the worker thread for good; log it and keep serving instead.
        if let Err(e) = result {
            tracing::warn!(queue = q, error = %e, "virtqueue processing failed");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plain::PlainDisk;
    use virtio_bindings::virtio_blk::VIRTIO_BLK_F_RO;

    fn backend(read_only: bool) -> BlkBackend {
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(8 << 20).unwrap();
        let disk = PlainDisk::open(file.path(), read_only)
            .unwrap()
            .with_optimal_io_size(1 << 20);
        BlkBackend::new(
            Arc::new(disk),
            DeviceParams {
                num_queues: 3,
                queue_size: 256,
            },
            Arc::new(IoPool::new(1).unwrap()),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            None,
        )
        .unwrap()
    }

    #[test]
    fn config_reads_are_sliced_and_padded() {
        let b = backend(false);
        let full = b.get_config(0, CONFIG_SIZE as u32);
        assert_eq!(full.len(), CONFIG_SIZE);
        assert_eq!(u64::from_le_bytes(full[0..8].try_into().unwrap()), 16384);
        assert_eq!(u32::from_le_bytes(full[28..32].try_into().unwrap()), 2048);
        assert_eq!(u16::from_le_bytes(full[34..36].try_into().unwrap()), 3);
        // A frontend built against a newer virtio_blk_config asks for more: zeros.
        let more = b.get_config(0, 96);
        assert_eq!(&more[..CONFIG_SIZE], &full[..]);
        assert!(more[CONFIG_SIZE..].iter().all(|&x| x == 0));
        assert_eq!(b.get_config(34, 2), vec![3, 0]);
        // Nonsense ranges get an empty answer (the vhost crate turns it into an error).
        assert!(b.get_config(u32::MAX, 2).is_empty());
        assert!(b.get_config(0, 4096).is_empty());
    }

    #[test]
    fn only_the_writeback_byte_is_writable_and_only_with_config_wce() {
        let b = backend(false);
        assert!(b.set_config(WRITEBACK_OFFSET as u32, &[0]).is_err());
        b.acked_features(b.features());
        assert!(b.exec_options().writeback);
        b.set_config(WRITEBACK_OFFSET as u32, &[0]).unwrap();
        assert!(!b.exec_options().writeback);
        assert_eq!(b.get_config(WRITEBACK_OFFSET as u32, 1), vec![0]);
        assert!(b.set_config(WRITEBACK_OFFSET as u32, &[2]).is_err());
        assert!(b.set_config(0, &[0; 8]).is_err());
        b.reset_device();
        assert!(b.exec_options().writeback);
        // Without FLUSH negotiated, writes are write-through whatever the config says.
        b.acked_features(b.features() & !(1 << VIRTIO_BLK_F_FLUSH));
        assert!(!b.exec_options().writeback);
    }

    #[test]
    fn features_and_worker_map() {
        assert!(config::has_feature(
            backend(true).features(),
            VIRTIO_BLK_F_RO
        ));
        let b = backend(false);
        assert_eq!(b.queues_per_thread(), vec![1, 2, 4]);
        assert_eq!(b.num_queues(), 3);
        assert_eq!(b.max_queue_size(), 256);
        assert_eq!(b.completion_token(), 4);
        assert_eq!(b.inflight(), 0);
        b.stop_vring(1).unwrap();
        b.stop_vring(99).unwrap();
    }
}
