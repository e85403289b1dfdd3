//! Crash test for fetched chunks: `streamboot serve` (the real binary, from a real nginx)
//! is killed with SIGKILL while a burst of guest reads (random 4 KiB misses, sequential
//! runs that grow readahead windows, and FLUSHes that commit the map) is in flight.
//! Fetched chunks become readable before any sync and their map entries are committed in
//! batches, so a crash may only forget fetched chunks: after every kill the disk serves
//! again and every byte read equals the target. Seeded: the seed is printed, and
//! STREAMBOOT_SEED replays a run.

mod common;

use std::path::Path;
use std::time::Duration;

use rand::Rng;

use common::blkio_client::Client;
use common::disk::cli_ok;
use common::nginx::Nginx;
use common::serve::Served;

const TARGET: usize = 8 << 20;
const REQ: usize = 64 << 10;
const DEPTH: usize = 8;
const ROUNDS: usize = 40;

fn serve(d: &Path, dir: &Path) -> (Served, Client) {
    let sock = dir.join("vu.sock");
    let srv = Served::start(d, &sock, &["--no-hydrate"]);
    let c = Client::connect(&sock, 1, DEPTH * REQ).unwrap();
    (srv, c)
}

/// Reads `(offset, len)` pairs at queue depth `DEPTH` and checks them against `target`.
fn read_and_check(c: &mut Client, reads: &[(usize, usize)], target: &[u8], what: &str) {
    for batch in reads.chunks(DEPTH) {
        for (slot, &(off, len)) in batch.iter().enumerate() {
            c.submit_read(0, off as u64, slot * REQ, len, slot);
        }
        let done = c.wait(0, batch.len()).expect("read completions");
        assert_eq!(done.len(), batch.len());
        for d in done {
            let (off, len) = batch[d.user_data];
            assert_eq!(d.ret, 0, "{what}: read at {off} failed");
            let from = d.user_data * REQ;
            assert!(
                c.buf(from..from + len) == &target[off..off + len],
                "{what}: wrong bytes at {off}+{len}"
            );
        }
    }
}

/// A burst of reads: random 4 KiB reads mixed with sequential runs of whole requests.
fn burst(rng: &mut impl Rng) -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    while v.len() < 48 {
        if rng.random_bool(0.5) {
            let off = rng.random_range(0..TARGET / 4096) * 4096;
            v.push((off, 4096));
        } else {
            let start = rng.random_range(0..TARGET / REQ - 8) * REQ;
            v.extend((0..rng.random_range(2..8)).map(|i| (start + i * REQ, REQ)));
        }
    }
    v
}

#[test]
fn sigkill_during_demand_misses_forgets_nothing_wrong() {
    let seed = std::env::var("STREAMBOOT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("crash_fetch seed {seed} (replay with STREAMBOOT_SEED={seed})");
    let mut rng = common::test_rng(seed);
    let nginx = Nginx::start();
    let target = common::random_bytes(seed, TARGET);
    nginx.put("t.img", &target);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("disk.img");
    std::fs::write(&d, common::random_bytes(seed + 1, 2 << 20)).unwrap();
    let url = nginx.url("t.img");
    // A released area smaller than the target: publishing fetched chunks also evicts
    // and commits the map in the middle of bursts.
    cli_ok(&[
        "prepare",
        d.to_str().unwrap(),
        "--target",
        &url,
        "--chunk-size",
        "16K",
        "--area-size",
        "3M",
    ]);
    // Confirmed: the many connections below are not trial boots.
    cli_ok(&["confirm", d.to_str().unwrap()]);
    let mut previous: Vec<(usize, usize)> = Vec::new();
    for round in 0..ROUNDS {
        let (srv, mut c) = serve(&d, dir.path());
        let what = format!("seed {seed} round {round}");
        // What the last round read (fetched, maybe committed, maybe forgotten) reads
        // back exactly.
        read_and_check(&mut c, &previous, &target, &what);
        let reads = burst(&mut rng);
        let kill_after = rng.random_range(0..reads.len());
        for (i, &(off, len)) in reads.iter().enumerate() {
            if i == kill_after {
                break;
            }
            let slot = i % DEPTH;
            c.submit_read(0, off as u64, slot * REQ, len, slot);
            if rng.random_bool(0.1) {
                c.submit_flush(0, DEPTH);
            }
            if slot == DEPTH - 1 {
                // Submit without waiting: the kill lands with misses in flight.
                let _ = c.wait_for(0, 0, Duration::from_millis(1));
                std::thread::sleep(Duration::from_micros(rng.random_range(0..3000)));
            }
        }
        let _ = c.wait_for(0, 0, Duration::from_millis(1));
        std::thread::sleep(Duration::from_micros(rng.random_range(0..5000)));
        srv.kill9();
        drop(c);
        previous = reads;
    }
    // The whole device after the last kill.
    let (srv, mut c) = serve(&d, dir.path());
    let all: Vec<(usize, usize)> = (0..TARGET).step_by(REQ).map(|o| (o, REQ)).collect();
    read_and_check(&mut c, &all, &target, &format!("seed {seed} final"));
    srv.stop();
    eprintln!("{} requests to nginx", nginx.access_log().len());
}
