//! Trial boots, restarts, rollback and shutdown under the lifecycles real VMMs and
//! operators produce (issue 10): the real `streamboot serve`, a real nginx (behind the
//! fault proxy where the server must be slow or dead) and libblkio as the guest.
//!
//! A libblkio connection is a new VM: its rings start at 0, a *fresh* device start.
//! Seeds are printed; `STREAMBOOT_SEED` replays one.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::blkio_client::Client;
use common::disk::{cli_ok, sha256, sha256_file};
use common::fault_proxy::{Fault, FaultProxy, Rule, When};
use common::nginx::Nginx;
use common::serve::Served;
use serde_json::Value;

const CHUNK: usize = 64 << 10;

struct Setup {
    dir: tempfile::TempDir,
    disk: PathBuf,
    source: Vec<u8>,
    target: Vec<u8>,
}

impl Setup {
    /// A source disk prepared for a target served by nginx (through `url` when given).
    fn new(nginx: &Nginx, seed: u64, url: Option<&str>, prepare: &[&str]) -> Setup {
        let source = common::random_bytes(seed, 3 << 20);
        let target = common::random_bytes(seed + 1, 4 << 20);
        nginx.put("t.img", &target);
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.img");
        std::fs::write(&disk, &source).unwrap();
        let url = url.map_or_else(|| nginx.url("t.img"), str::to_string);
        let mut args = vec!["prepare", disk.to_str().unwrap(), "--target", &url];
        args.extend_from_slice(prepare);
        args.extend_from_slice(&["--boot-range", "0..64K"]);
        cli_ok(&args);
        Setup {
            dir,
            disk,
            source,
            target,
        }
    }

    fn sock(&self) -> PathBuf {
        self.dir.path().join("vu.sock")
    }

    fn ctl(&self) -> PathBuf {
        self.dir.path().join("ctl.sock")
    }

    fn offline_status(&self) -> Value {
        let out = cli_ok(&["--json", "status", self.disk.to_str().unwrap()]);
        let v: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
        v["status"].clone()
    }
}

/// Reads `len` bytes at `offset` through a client already connected.
fn read(c: &mut Client, offset: u64, len: usize) -> Vec<u8> {
    assert_eq!(c.read(offset, 0, len), 0, "read {offset}+{len} failed");
    c.buf(0..len).to_vec()
}

fn seed() -> u64 {
    let s = std::env::var("STREAMBOOT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("seed {s} (STREAMBOOT_SEED={s} replays it)");
    s
}

/// SIGTERM to a backend with a trial VM attached is a restart, not a failed boot: the
/// counter stays, a serve started at the limit serves the target (the running guest
/// reconnects to it); only the next *fresh* device start falls back, and that start
/// already sees the source.
#[test]
fn backend_restart_at_the_limit_is_not_a_failed_boot() {
    let nginx = Nginx::start();
    let s = Setup::new(&nginx, 11, None, &["--max-trial-starts", "2"]);
    let sock = s.sock();
    let ctl = s.ctl();
    let ctl_arg = ["--control", ctl.to_str().unwrap(), "--no-hydrate"];
    let mut srv = Served::start(&s.disk, &sock, &ctl_arg);
    {
        let mut boot1 = Client::connect(&sock, 1, 1 << 20).unwrap();
        assert!(read(&mut boot1, 0, 1 << 20) == s.target[..1 << 20]);
    }
    let mut boot2 = Client::connect(&sock, 1, 1 << 20).unwrap();
    assert!(read(&mut boot2, 1 << 20, 1 << 20) == s.target[1 << 20..2 << 20]);
    // The backend restarts under the running trial guest.
    let (st, _) = srv.sigterm_within(Duration::from_secs(10));
    assert!(st.success(), "serve exit: {st:?}");
    drop(boot2);
    let v = s.offline_status();
    assert_eq!(v["state"], "trial", "a backend stop changed the state: {v}");
    assert_eq!(v["start_counter"], 2, "{v}");
    let srv = Served::start(&s.disk, &sock, &ctl_arg);
    let v = streamboot::control::client::get_status(&ctl).unwrap();
    assert_eq!(
        v["mode"], "target",
        "serve started at the limit fell back: {v}"
    );
    assert_eq!(v["state"], "trial", "{v}");
    // A new VM (fresh device start) with the starts used up: falls back at its start,
    // so its very first read is the source.
    {
        let mut boot3 = Client::connect(&sock, 1, 1 << 20).unwrap();
        assert!(
            read(&mut boot3, 0, 1 << 20) == s.source[..1 << 20],
            "the third fresh start did not see the source"
        );
    }
    let v = streamboot::control::client::get_status(&ctl).unwrap();
    assert_eq!(v["mode"], "source", "{v}");
    srv.stop();
    assert_eq!(sha256_file(&s.disk), sha256(&s.source));
}

/// A VM that goes away with reads of missing chunks stuck on a slow server and
/// whole-chunk writes queued behind them, then an immediate rollback: no request of the
/// departed VM may run after the switch (it would land on the restored source).
#[test]
fn rollback_waits_for_every_request_of_a_departed_vm() {
    let nginx = Nginx::start();
    let base = seed();
    for round in 0..8u64 {
        let seed = base.wrapping_add(round);
        let mut rng = common::test_rng(seed);
        let proxy = FaultProxy::start(nginx.port());
        let url = proxy.url("t.img");
        let s = Setup::new(&nginx, seed, Some(&url), &[]);
        let (sock, ctl) = (s.sock(), s.ctl());
        let srv = Served::start(
            &s.disk,
            &sock,
            &["--control", ctl.to_str().unwrap(), "--no-hydrate"],
        );
        // Every fetch from now on is slow: headers and a few bytes, then a stall.
        proxy.set_plan(
            seed,
            vec![Rule::new(
                When::Always,
                Fault::Stall {
                    after: 100,
                    secs: 2,
                },
            )],
        );
        let chunks = s.target.len() / CHUNK;
        let mut c = Client::connect(&sock, 1, 64 * CHUNK).unwrap();
        let mut tag = 0;
        // Reads of missing chunks occupy every I/O thread...
        for _ in 0..8 {
            let ch = rand::Rng::random_range(&mut rng, 1..chunks);
            c.submit_read(0, (ch * CHUNK) as u64, tag * CHUNK, CHUNK, tag);
            tag += 1;
        }
        // ... and whole-chunk writes to missing chunks queue behind them.
        for _ in 0..16 {
            let ch = rand::Rng::random_range(&mut rng, 1..chunks);
            c.buf(tag * CHUNK..(tag + 1) * CHUNK).fill(0xa5);
            c.submit_write(0, (ch * CHUNK) as u64, tag * CHUNK, CHUNK, tag);
            tag += 1;
        }
        std::thread::sleep(Duration::from_millis(100 + (seed % 200)));
        drop(c);
        let t = Instant::now();
        loop {
            match streamboot::control::client::rollback(&ctl) {
                Ok(_) => break,
                Err(e) if e.is_conflict() && t.elapsed() < Duration::from_secs(30) => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => panic!("rollback: {e}"),
            }
        }
        proxy.clear();
        // Give any straggler the time to land before looking.
        std::thread::sleep(Duration::from_millis(500));
        srv.stop();
        assert_eq!(
            sha256_file(&s.disk),
            sha256(&s.source),
            "round {round} (seed {seed}): the disk is not the source after rollback"
        );
    }
}

/// SIGTERM while guest reads wait on a dead server (a departed VM's and a connected
/// VM's): serve exits within 5 s, and the disk reopens consistent and complete.
#[test]
fn sigterm_with_fetches_stuck_on_a_dead_server_is_prompt() {
    let nginx = Nginx::start();
    for connected in [false, true] {
        let proxy = FaultProxy::start(nginx.port());
        let url = proxy.url("t.img");
        let s = Setup::new(&nginx, 30 + connected as u64, Some(&url), &[]);
        let sock = s.sock();
        let mut srv = Served::start(&s.disk, &sock, &["--no-hydrate"]);
        proxy.down();
        let mut c = Client::connect(&sock, 1, 8 * CHUNK).unwrap();
        for tag in 0..8 {
            c.submit_read(0, ((tag + 2) * CHUNK) as u64, tag * CHUNK, CHUNK, tag);
        }
        std::thread::sleep(Duration::from_millis(500));
        if !connected {
            drop(c);
            std::thread::sleep(Duration::from_millis(200));
            c = Client::connect(&sock, 1, CHUNK).unwrap_or_else(|e| panic!("{e}"));
        }
        let (st, took) = srv.sigterm_within(Duration::from_secs(5));
        assert!(st.success(), "serve exit {st:?}");
        eprintln!("serve exited {took:?} after SIGTERM (client connected: {connected})");
        drop(c);
        proxy.up();
        let v = s.offline_status();
        assert_eq!(v["state"], "trial", "{v}");
        let srv = Served::start(&s.disk, &sock, &[]);
        let mut c = Client::connect(&sock, 1, s.target.len()).unwrap();
        assert!(read(&mut c, 0, s.target.len()) == s.target);
        drop(c);
        srv.stop();
    }
}

/// `--read-only` is the guest's view only: missing chunks are fetched and cached, the
/// start is recorded, guest writes fail.
#[test]
fn read_only_serve_of_a_prepared_disk() {
    let nginx = Nginx::start();
    let s = Setup::new(&nginx, 50, None, &[]);
    let sock = s.sock();
    let srv = Served::start(&s.disk, &sock, &["--read-only", "--no-hydrate"]);
    let mut c = Client::connect_with(&sock, 1, s.target.len(), true).unwrap();
    assert!(c.read_only, "the device is not read-only");
    assert!(read(&mut c, 0, s.target.len()) == s.target);
    assert_ne!(
        c.write(0, 0, 4096),
        0,
        "a write to a read-only device succeeded"
    );
    drop(c);
    srv.stop();
    let v = s.offline_status();
    assert_eq!(v["state"], "trial", "{v}");
    assert_eq!(v["start_counter"], 1, "{v}");
    assert_eq!(v["chunks_missing"], 0, "fetched chunks were not kept: {v}");
}

/// A discard covering whole missing chunks makes them zero chunks: never downloaded,
/// not on demand, not by hydration, not by commit (issue 14).
#[test]
fn discarded_missing_chunks_are_never_fetched() {
    let nginx = Nginx::start();
    let s = Setup::new(&nginx, 60, None, &[]);
    let (sock, ctl) = (s.sock(), s.ctl());
    let srv = Served::start(
        &s.disk,
        &sock,
        &["--control", ctl.to_str().unwrap(), "--no-hydrate"],
    );
    let mut c = Client::connect(&sock, 1, 1 << 20).unwrap();
    // Chunks 1.5 .. 8.5: only the whole chunks 2..8 become zero.
    let (from, to) = (CHUNK * 3 / 2, CHUNK * 17 / 2);
    assert_eq!(c.discard(from as u64, (to - from) as u64), 0);
    let got = read(&mut c, (2 * CHUNK) as u64, 6 * CHUNK);
    assert!(
        got.iter().all(|&b| b == 0),
        "discarded chunks do not read as zeros"
    );
    let v = streamboot::control::client::get_status(&ctl).unwrap();
    assert_eq!(
        v["bytes_fetched_demand"], 0,
        "a discarded chunk was fetched: {v}"
    );
    // The partly discarded chunks still hold the target.
    assert!(read(&mut c, CHUNK as u64, CHUNK) == s.target[CHUNK..2 * CHUNK]);
    drop(c);
    streamboot::control::client::confirm(&ctl).unwrap();
    srv.stop();
    cli_ok(&["commit", s.disk.to_str().unwrap()]);
    let disk = std::fs::read(&s.disk).unwrap();
    let mut want = s.target.clone();
    want[2 * CHUNK..8 * CHUNK].fill(0);
    // Commit fetched everything still missing; the discarded chunks stayed zeros.
    assert!(
        disk == want,
        "committed disk is not the target with zeroed chunks"
    );
}
