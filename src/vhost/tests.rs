//! Where requests run, end to end: a real server and libblkio's Rust client (the `blkio`
//! crate) over a unix socket.

#[path = "../../tests/common/blkio_client.rs"]
mod blkio_client;

use std::collections::HashSet;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use parking_lot::Mutex;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use blkio_client::Client;

use super::{ServeOptions, VhostBlkServer};
use crate::blockdev::{BlockBackend, BlockError, GuestBuf, GuestBufMut};
use crate::plain::PlainDisk;

const MIB: usize = 1 << 20;

/// A plain disk that records which threads ran reads and writes, and how many ran at
/// once; large ones are slowed down so that concurrent ones overlap for sure.
struct Watched {
    inner: PlainDisk,
    state: Mutex<WatchState>,
}

#[derive(Default)]
struct WatchState {
    running: usize,
    max_running: usize,
    threads: HashSet<String>,
}

impl Watched {
    fn enter(&self, len: usize) {
        let mut s = self.state.lock();
        s.running += 1;
        s.max_running = s.max_running.max(s.running);
        let name = thread::current().name().unwrap_or("?").to_string();
        s.threads.insert(name);
        drop(s);
        if len >= MIB {
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn leave(&self) {
        self.state.lock().running -= 1;
    }

    /// Takes the record so far: (most calls at once, threads that ran them).
    fn take(&self) -> (usize, HashSet<String>) {
        let mut s = self.state.lock();
        let out = (s.max_running, std::mem::take(&mut s.threads));
        s.max_running = 0;
        out
    }
}

impl BlockBackend for Watched {
    fn capacity(&self) -> u64 {
        self.inner.capacity()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_into(&self, offset: u64, buf: &GuestBufMut<'_>) -> Result<(), BlockError> {
        self.enter(buf.len());
        let r = self.inner.read_into(offset, buf);
        self.leave();
        r
    }
    fn write_from(&self, offset: u64, buf: &GuestBuf<'_>) -> Result<(), BlockError> {
        self.enter(buf.len());
        let r = self.inner.write_from(offset, buf);
        self.leave();
        r
    }
    fn flush(&self) -> Result<(), BlockError> {
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
    fn is_local(&self, _offset: u64, _len: u64) -> bool {
        true
    }
}

fn on_bulk_lane(threads: &HashSet<String>) -> bool {
    threads.iter().any(|t| t.starts_with("vhost-blk-bulk"))
}

#[test]
fn large_requests_in_flight_together_run_in_parallel_alone_inline() {
    const N: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let file = tempfile::NamedTempFile::new_in(dir.path()).unwrap();
    file.as_file().set_len((2 * N * MIB) as u64).unwrap();
    let disk = Arc::new(Watched {
        inner: PlainDisk::open(file.path(), false).unwrap(),
        state: Mutex::new(WatchState::default()),
    });
    let sock = dir.path().join("vhost-blk.sock");
    let mut opts = ServeOptions::new(&sock);
    opts.allow_unsealed_memory = true; // libblkio does not seal its buffers
    let server = VhostBlkServer::bind(disk.clone(), opts).unwrap();
    let shutdown = server.shutdown_handle();
    let running = thread::spawn(move || server.run());

    let mut c = Client::connect(&sock, 1, 2 * N * MIB).unwrap();
    let mut pattern = vec![0u8; N * MIB];
    ChaCha8Rng::seed_from_u64(9).fill_bytes(&mut pattern);
    c.buf(0..N * MIB).copy_from_slice(&pattern);

    // One large write alone, and one small one: inline on the queue worker.
    assert_eq!(c.write(0, 0, MIB), 0);
    assert_eq!(c.write(MIB as u64, MIB, 4096), 0);
    let (max, threads) = disk.take();
    assert_eq!(max, 1);
    assert!(!on_bulk_lane(&threads), "{threads:?}");

    // N large writes in flight together: on the bulk lane, several at once.
    for i in 0..N {
        c.submit_write(0, (i * MIB) as u64, i * MIB, MIB, i);
    }
    let done = c.wait(0, N).unwrap();
    assert!(done.iter().all(|d| d.ret == 0), "{done:?}");
    let (max, threads) = disk.take();
    assert!(max >= 2, "writes ran one at a time");
    assert!(on_bulk_lane(&threads), "{threads:?}");
    let mut on_disk = vec![0u8; N * MIB];
    file.as_file().read_exact_at(&mut on_disk, 0).unwrap();
    assert!(on_disk == pattern, "written data differs");

    // The same for reads, into the second half of the buffer.
    for i in 0..N {
        c.submit_read(0, (i * MIB) as u64, (N + i) * MIB, MIB, i);
    }
    let done = c.wait(0, N).unwrap();
    assert!(done.iter().all(|d| d.ret == 0), "{done:?}");
    let (max, threads) = disk.take();
    assert!(max >= 2, "reads ran one at a time");
    assert!(on_bulk_lane(&threads), "{threads:?}");
    assert!(
        c.buf(N * MIB..2 * N * MIB) == &pattern[..],
        "read data differs"
    );

    drop(c);
    shutdown.shutdown();
    running.join().unwrap().unwrap();
}
