//! Many reconnections must not leak file descriptors in the server (eventfds, epoll
//! instances, guest memory mappings). Alone in its binary so that no other test opens
//! or closes descriptors meanwhile.

mod common;

use std::sync::Arc;
use std::thread;

use common::blkio_client::Client;
use streamboot::plain::PlainDisk;
use streamboot::vhost::{ServeOptions, VhostBlkServer};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn reconnections_do_not_leak_descriptors() {
    let file = tempfile::NamedTempFile::new().unwrap();
    file.as_file().set_len(4 << 20).unwrap();
    let disk = Arc::new(PlainDisk::open(file.path(), false).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let mut opts = ServeOptions::new(&path);
    opts.allow_unsealed_memory = true; // libblkio does not seal its buffers
    opts.num_queues = 4;
    let server = VhostBlkServer::bind(disk, opts).unwrap();
    let shutdown = server.shutdown_handle();
    let running = thread::spawn(move || server.run());

    let session = || {
        let mut c = Client::connect(&path, 4, 4096).unwrap();
        assert_eq!(c.read(0, 0, 4096), 0);
    };
    session();
    // Wait until the server has torn the first connection down.
    thread::sleep(std::time::Duration::from_millis(100));
    let before = open_fds();
    for _ in 0..8 {
        session();
    }
    thread::sleep(std::time::Duration::from_millis(100));
    let after = open_fds();
    shutdown.shutdown();
    assert_eq!(running.join().unwrap().unwrap().connections, 9);
    assert_eq!(before, after, "descriptors leaked across reconnections");
}
