//! End-to-end tests of the vhost-user-blk server with an independent client (libblkio's
//! Rust implementation, the `blkio` crate) over a real unix socket.

mod common;

use std::fs;
use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use common::blkio_client::Client;
use streamboot::blockdev::{BlockBackend, BlockError, GuestBuf, GuestBufMut};
use streamboot::plain::PlainDisk;
use streamboot::vhost::{ServeOptions, ServeSummary, ShutdownHandle, VhostBlkServer, VhostError};

const DISK_SIZE: u64 = 16 << 20;

/// A server running on its own thread, on a socket in a temp dir.
struct Running {
    _dir: tempfile::TempDir,
    path: PathBuf,
    shutdown: ShutdownHandle,
    thread: Option<JoinHandle<Result<ServeSummary, VhostError>>>,
}

impl Running {
    fn start(disk: Arc<dyn BlockBackend>, num_queues: u16) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vhost-blk.sock");
        let mut opts = ServeOptions::new(&path);
        opts.allow_unsealed_memory = true; // libblkio does not seal its buffers
        opts.num_queues = num_queues;
        opts.io_threads = 2;
        let server = VhostBlkServer::bind(disk, opts).unwrap();
        let shutdown = server.shutdown_handle();
        let thread = Some(thread::spawn(move || server.run()));
        Self {
            _dir: dir,
            path,
            shutdown,
            thread,
        }
    }

    fn stop(mut self) -> ServeSummary {
        self.shutdown.shutdown();
        self.thread.take().unwrap().join().unwrap().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.shutdown.shutdown();
            let _ = t.join();
        }
    }
}

fn temp_disk(size: u64) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(size).unwrap();
    file
}

fn random(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

#[test]
fn single_queue_write_read_flush() {
    let file = temp_disk(DISK_SIZE);
    let disk = Arc::new(PlainDisk::open(file.path(), false).unwrap());
    let server = Running::start(disk, 1);
    let mode = fs::symlink_metadata(&server.path).unwrap().mode();
    assert_eq!(mode & 0o777, 0o600);

    let mut c = Client::connect(&server.path, 1, 1 << 20).unwrap();
    assert_eq!(c.capacity, DISK_SIZE);
    let data = random(1, 256 * 1024);
    c.buf(0..data.len()).copy_from_slice(&data);
    assert_eq!(c.write(1 << 20, 0, data.len()), 0);
    assert_eq!(c.flush(), 0);
    c.buf(0..data.len()).fill(0);
    assert_eq!(c.read(1 << 20, 0, data.len()), 0);
    assert_eq!(c.buf(0..data.len()), &data[..]);

    // The bytes are in the file, where the guest put them.
    let mut on_disk = vec![0u8; data.len()];
    file.as_file().read_exact_at(&mut on_disk, 1 << 20).unwrap();
    assert_eq!(on_disk, data);

    // A 1 MiB request (one segment of size_max) works too.
    assert_eq!(c.read(0, 0, 1 << 20), 0);
    drop(c);
    assert_eq!(server.stop().connections, 1);
}

#[test]
fn four_queues_with_many_requests_in_flight() {
    let file = temp_disk(DISK_SIZE);
    let disk = Arc::new(PlainDisk::open(file.path(), false).unwrap());
    let server = Running::start(disk, 4);
    const PER_QUEUE: usize = 32;
    const LEN: usize = 4096;
    let mut c = Client::connect(&server.path, 4, 4 * PER_QUEUE * LEN * 2).unwrap();
    assert_eq!(c.queues.len(), 4);

    let pattern = random(2, 4 * PER_QUEUE * LEN);
    c.buf(0..pattern.len()).copy_from_slice(&pattern);
    // Queue all writes on all queues, then collect them.
    for q in 0..4 {
        for i in 0..PER_QUEUE {
            let n = q * PER_QUEUE + i;
            // Scattered, non-overlapping offsets.
            let offset = ((n * 7919) % 4096) as u64 * LEN as u64;
            c.submit_write(q, offset, n * LEN, LEN, n);
        }
    }
    for q in 0..4 {
        let done = c.wait(q, PER_QUEUE).unwrap();
        assert_eq!(done.len(), PER_QUEUE);
        assert!(done.iter().all(|d| d.ret == 0), "{done:?}");
    }
    // Read everything back into the second half of the buffer, all in flight at once.
    let base = 4 * PER_QUEUE * LEN;
    for q in 0..4 {
        for i in 0..PER_QUEUE {
            let n = q * PER_QUEUE + i;
            let offset = ((n * 7919) % 4096) as u64 * LEN as u64;
            c.submit_read((q + 1) % 4, offset, base + n * LEN, LEN, n);
        }
    }
    for q in 0..4 {
        let done = c.wait(q, PER_QUEUE).unwrap();
        assert!(done.iter().all(|d| d.ret == 0), "{done:?}");
    }
    assert_eq!(c.buf(base..base + pattern.len()), &pattern[..]);
    drop(c);
    server.stop();
}

#[test]
fn reconnecting_client_sees_the_data_of_the_previous_one() {
    let file = temp_disk(DISK_SIZE);
    let disk = Arc::new(PlainDisk::open(file.path(), false).unwrap());
    let server = Running::start(disk, 2);
    let data = random(3, 64 * 1024);
    {
        let mut c = Client::connect(&server.path, 2, 1 << 20).unwrap();
        c.buf(0..data.len()).copy_from_slice(&data);
        assert_eq!(c.write(DISK_SIZE - data.len() as u64, 0, data.len()), 0);
    }
    for _ in 0..3 {
        let mut c = Client::connect(&server.path, 1, 1 << 20).unwrap();
        assert_eq!(c.read(DISK_SIZE - data.len() as u64, 0, data.len()), 0);
        assert_eq!(c.buf(0..data.len()), &data[..]);
    }
    assert_eq!(server.stop().connections, 4);
}

#[test]
fn read_only_device_refuses_writes() {
    let file = temp_disk(DISK_SIZE);
    file.as_file().write_all_at(b"source bytes", 4096).unwrap();
    let disk = Arc::new(PlainDisk::open(file.path(), true).unwrap());
    let server = Running::start(disk, 1);

    // The device says it is read-only: a read-write client cannot even start.
    let err = Client::connect(&server.path, 1, 4096)
        .err()
        .expect("must fail");
    assert_eq!(err.errno(), blkio::Errno::ROFS, "{}", err.message());

    let mut c = Client::connect_with(&server.path, 1, 8192, true).unwrap();
    assert!(c.read_only);
    assert_eq!(c.read(4096, 0, 4096), 0);
    assert_eq!(c.buf(0..12), b"source bytes");
    c.buf(0..12).copy_from_slice(b"guest writes");
    assert_ne!(c.write(4096, 0, 4096), 0);
    assert_eq!(c.flush(), 0);
    drop(c);
    let mut on_disk = [0u8; 12];
    file.as_file().read_exact_at(&mut on_disk, 4096).unwrap();
    assert_eq!(&on_disk, b"source bytes");
    server.stop();
}

#[test]
fn out_of_range_request_fails_and_the_server_keeps_serving() {
    let file = temp_disk(DISK_SIZE);
    let disk = Arc::new(PlainDisk::open(file.path(), false).unwrap());
    let server = Running::start(disk, 1);
    let mut c = Client::connect(&server.path, 1, 1 << 20).unwrap();
    // Straddles the end, starts past the end, and far past the end.
    assert_ne!(c.read(DISK_SIZE - 512, 0, 4096), 0);
    assert_ne!(c.write(DISK_SIZE, 0, 512), 0);
    assert_ne!(c.read(1 << 50, 0, 512), 0);
    // The same connection still works.
    c.buf(0..512).fill(0x5a);
    assert_eq!(c.write(DISK_SIZE - 512, 0, 512), 0);
    c.buf(0..512).fill(0);
    assert_eq!(c.read(DISK_SIZE - 512, 0, 512), 0);
    assert!(c.buf(0..512).iter().all(|&b| b == 0x5a));
    drop(c);
    // And so does a new one.
    let mut c = Client::connect(&server.path, 1, 4096).unwrap();
    assert_eq!(c.read(0, 0, 4096), 0);
    drop(c);
    server.stop();
}

#[test]
fn write_zeroes_and_discard() {
    let file = temp_disk(DISK_SIZE);
    let disk = Arc::new(PlainDisk::open(file.path(), false).unwrap());
    let server = Running::start(disk, 1);
    let mut c = Client::connect(&server.path, 1, 1 << 20).unwrap();
    c.buf(0..65536).fill(0xee);
    assert_eq!(c.write(0, 0, 65536), 0);
    c.queues[0].write_zeroes(4096, 8192, 1, blkio::ReqFlags::empty());
    c.queues[0].discard(32768, 16384, 2, blkio::ReqFlags::empty());
    let done = c.wait(0, 2).unwrap();
    assert!(done.iter().all(|d| d.ret == 0), "{done:?}");
    assert_eq!(c.read(0, 0, 65536), 0);
    let b = c.buf(0..65536);
    assert!(b[..4096].iter().all(|&x| x == 0xee));
    assert!(b[4096..12288].iter().all(|&x| x == 0));
    assert!(b[12288..32768].iter().all(|&x| x == 0xee));
    drop(c);
    server.stop();
}

/// A disk whose `slow` range is "remote": not local, and reads there wait for a gate.
struct SlowDisk {
    inner: PlainDisk,
    slow: Range<u64>,
    open: Mutex<bool>,
    opened: Condvar,
    waiting: AtomicUsize,
    flushes: AtomicUsize,
}

impl SlowDisk {
    fn new(inner: PlainDisk, slow: Range<u64>) -> Self {
        Self {
            inner,
            slow,
            open: Mutex::new(false),
            opened: Condvar::new(),
            waiting: AtomicUsize::new(0),
            flushes: AtomicUsize::new(0),
        }
    }

    fn overlaps(&self, offset: u64, len: u64) -> bool {
        offset < self.slow.end && offset + len > self.slow.start
    }

    fn release(&self) {
        *self.open.lock() = true;
        self.opened.notify_all();
    }

    fn wait_for_waiters(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.waiting.load(Ordering::SeqCst) < n {
            assert!(Instant::now() < deadline, "slow read never started");
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl BlockBackend for SlowDisk {
    fn capacity(&self) -> u64 {
        self.inner.capacity()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn read_into(&self, offset: u64, buf: &GuestBufMut<'_>) -> Result<(), BlockError> {
        if self.overlaps(offset, buf.len() as u64) {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            let mut open = self.open.lock();
            let deadline = Instant::now() + Duration::from_secs(30);
            while !*open {
                if self.opened.wait_until(&mut open, deadline).timed_out() {
                    return Err(BlockError::Remote("gate never opened".into()));
                }
            }
        }
        self.inner.read_into(offset, buf)
    }
    fn write_from(&self, offset: u64, buf: &GuestBuf<'_>) -> Result<(), BlockError> {
        self.inner.write_from(offset, buf)
    }
    fn flush(&self) -> Result<(), BlockError> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.inner.write_zeroes(offset, len)
    }
    fn device_id(&self) -> Vec<u8> {
        self.inner.device_id()
    }
    fn is_local(&self, offset: u64, len: u64) -> bool {
        !self.overlaps(offset, len)
    }
}

#[test]
fn local_read_completes_while_a_remote_one_waits() {
    let file = temp_disk(DISK_SIZE);
    let remote = random(4, 4096);
    let local = random(5, 4096);
    file.as_file().write_all_at(&remote, 8 << 20).unwrap();
    file.as_file().write_all_at(&local, 0).unwrap();
    let disk = Arc::new(SlowDisk::new(
        PlainDisk::open(file.path(), false).unwrap(),
        (8 << 20)..(9 << 20),
    ));
    let server = Running::start(disk.clone(), 1);
    let mut c = Client::connect(&server.path, 1, 8192).unwrap();

    // The remote read goes first and blocks in the I/O pool...
    c.submit_read(0, 8 << 20, 0, 4096, 1);
    let none = c.wait_for(0, 0, Duration::from_millis(10)).unwrap();
    assert!(none.is_empty());
    disk.wait_for_waiters(1);
    // ...while a local read on the same queue completes.
    c.submit_read(0, 0, 4096, 4096, 2);
    let done = c.wait(0, 1).unwrap();
    assert_eq!(done.len(), 1, "{done:?}");
    assert_eq!(done[0].user_data, 2);
    assert_eq!(done[0].ret, 0);
    assert_eq!(c.buf(4096..8192), &local[..]);
    // So does a local write.
    c.submit_write(0, 4096, 4096, 4096, 3);
    let done = c.wait(0, 1).unwrap();
    assert_eq!((done[0].user_data, done[0].ret), (3, 0));

    // Let the remote read finish: it completes afterwards, with the right data.
    disk.release();
    let done = c.wait(0, 1).unwrap();
    assert_eq!((done[0].user_data, done[0].ret), (1, 0));
    assert_eq!(c.buf(0..4096), &remote[..]);
    drop(c);
    server.stop();
}

#[test]
fn disconnect_with_a_request_in_flight_then_reconnect_and_shutdown() {
    let file = temp_disk(DISK_SIZE);
    let disk = Arc::new(SlowDisk::new(
        PlainDisk::open(file.path(), false).unwrap(),
        (8 << 20)..(9 << 20),
    ));
    let server = Running::start(disk.clone(), 1);
    {
        let mut c = Client::connect(&server.path, 1, 8192).unwrap();
        c.submit_read(0, 8 << 20, 0, 4096, 1);
        let _ = c.wait_for(0, 0, Duration::from_millis(10)).unwrap();
        disk.wait_for_waiters(1);
        // The client goes away while its request waits; open the gate a bit later.
        let d = disk.clone();
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(200));
            d.release();
        });
    }
    // The next client is served once the old request drained.
    let mut c = Client::connect(&server.path, 1, 8192).unwrap();
    assert_eq!(c.read(8 << 20, 0, 4096), 0);
    drop(c);

    // Shutdown with a client still connected: the server stops, flushes and removes
    // its socket.
    let _idle = Client::connect(&server.path, 1, 4096).unwrap();
    let path = server.path.clone();
    let flushes = disk.flushes.load(Ordering::SeqCst);
    let summary = server.stop();
    assert_eq!(summary.connections, 3);
    assert!(disk.flushes.load(Ordering::SeqCst) > flushes);
    assert!(!path.exists());
}

#[test]
fn group_socket_and_refusals() {
    let file = temp_disk(DISK_SIZE);
    let disk: Arc<dyn BlockBackend> = Arc::new(PlainDisk::open(file.path(), false).unwrap());
    let dir = tempfile::tempdir().unwrap();

    // A regular file at the socket path is never replaced.
    let taken = dir.path().join("file");
    fs::write(&taken, b"keep me").unwrap();
    let err = VhostBlkServer::bind(disk.clone(), ServeOptions::new(&taken))
        .err()
        .unwrap();
    assert!(matches!(err, VhostError::NotASocket(_)), "{err}");
    assert_eq!(fs::read(&taken).unwrap(), b"keep me");

    // Bad options.
    let mut opts = ServeOptions::new(dir.path().join("q.sock"));
    opts.num_queues = 0;
    assert!(matches!(
        VhostBlkServer::bind(disk.clone(), opts),
        Err(VhostError::InvalidOptions(_))
    ));

    // Group access: 0660.
    let mut opts = ServeOptions::new(dir.path().join("g.sock"));
    opts.socket_group = Some("0".into());
    let server = VhostBlkServer::bind(disk.clone(), opts).unwrap();
    let meta = fs::symlink_metadata(server.socket_path()).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), 0);

    // A second server on a live socket is refused.
    let mut opts = ServeOptions::new(server.socket_path());
    opts.socket_group = None;
    assert!(matches!(
        VhostBlkServer::bind(disk, opts),
        Err(VhostError::SocketInUse(_))
    ));
    let path = server.socket_path().to_path_buf();
    drop(server);
    assert!(!path.exists());
}
