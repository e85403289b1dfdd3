//! Adaptive readahead end to end: the real `streamboot serve` streams a target from a
//! real nginx, read through libblkio. Bytes and requests are counted in nginx's access
//! log, so the figures are what really went over the network.

mod common;

use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;

use common::blkio_client::Client;
use common::disk::{cli_ok, sha256};
use common::nginx::{AccessEntry, Nginx};
use common::serve::Served;

const CHUNK: usize = 64 << 10;
const TARGET: usize = 32 << 20;

fn setup(nginx: &Nginx, name: &str, seed: u64) -> (tempfile::TempDir, PathBuf, Vec<u8>) {
    let source = common::random_bytes(seed, 4 << 20);
    let target = common::random_bytes(seed + 1, TARGET);
    nginx.put(name, &target);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("disk.img");
    std::fs::write(&d, &source).unwrap();
    let url = nginx.url(name);
    cli_ok(&[
        "prepare",
        d.to_str().unwrap(),
        "--target",
        &url,
        "--chunk-size",
        "64K",
    ]);
    (dir, d, target)
}

/// The ranged downloads (206 answers) logged after the first `skip` log lines.
fn range_gets(nginx: &Nginx, skip: usize) -> Vec<AccessEntry> {
    nginx
        .access_log()
        .into_iter()
        .skip(skip)
        .filter(|e| e.status == 206)
        .collect()
}

fn serve(d: &Path, dir: &Path) -> (Served, Client) {
    let sock = dir.join("vu.sock");
    let srv = Served::start(d, &sock, &["--no-hydrate"]);
    let c = Client::connect(&sock, 1, 256 << 10).unwrap();
    (srv, c)
}

#[test]
fn random_4k_reads_fetch_about_one_chunk_each() {
    let nginx = Nginx::start();
    let (dir, d, target) = setup(&nginx, "r.img", 140);
    let (srv, mut c) = serve(&d, dir.path());
    let skip = nginx.access_log().len();
    // 150 chunks, no two adjacent (adjacent misses would rightly count as a stream),
    // in random order; one 4 KiB read somewhere inside each.
    let mut chunks: Vec<usize> = (0..TARGET / CHUNK).step_by(3).collect();
    chunks.shuffle(&mut common::test_rng(141));
    chunks.truncate(150);
    let mut rng = common::test_rng(142);
    for (i, &ch) in chunks.iter().enumerate() {
        let off = ch * CHUNK + rand::Rng::random_range(&mut rng, 0..CHUNK / 4096) * 4096;
        assert_eq!(c.read(off as u64, 0, 4096), 0, "read {i} at {off} failed");
        assert!(
            c.buf(0..4096) == &target[off..off + 4096],
            "read {i} at {off}: wrong bytes"
        );
    }
    let gets = range_gets(&nginx, skip);
    let fetched: u64 = gets.iter().map(|e| e.bytes_sent).sum();
    let read = (chunks.len() * 4096) as u64;
    let ratio = fetched as f64 / read as f64;
    // One 64 KiB chunk per 4 KiB read is 16; response headers are the slack.
    assert!(
        ratio <= 16.5,
        "{fetched} bytes in {} requests fetched for {read} bytes read: {ratio:.1}x",
        gets.len()
    );
    srv.stop();
}

#[test]
fn sequential_read_fetches_each_chunk_once_with_growing_windows() {
    let nginx = Nginx::start();
    let (dir, d, target) = setup(&nginx, "s.img", 150);
    let (srv, mut c) = serve(&d, dir.path());
    let skip = nginx.access_log().len();
    let req = 128 << 10;
    let mut all = Vec::with_capacity(TARGET);
    for off in (0..TARGET).step_by(req) {
        assert_eq!(c.read(off as u64, 0, req), 0, "read at {off} failed");
        all.extend_from_slice(c.buf(0..req));
    }
    assert_eq!(sha256(&all), sha256(&target), "device != target");
    let gets = range_gets(&nginx, skip);
    let fetched: u64 = gets.iter().map(|e| e.bytes_sent).sum();
    // Each chunk at most once (prepare already placed the boot chunks), headers aside.
    assert!(
        fetched <= TARGET as u64 + gets.len() as u64 * 1024,
        "{fetched} bytes fetched for a {TARGET}-byte target"
    );
    // Windows of 1, 2, 4, .. 128 chunks (8 MiB): 512 chunks in about a dozen requests,
    // where fixed 512 KiB requests take 64.
    let sizes: Vec<u64> = gets.iter().map(|e| e.bytes_sent).collect();
    assert!(
        gets.len() <= 16,
        "{} requests, bytes sent: {sizes:?}",
        gets.len()
    );
    srv.stop();
}
