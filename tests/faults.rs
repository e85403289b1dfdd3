//! Network faults end to end: the real `streamboot serve` streams a target from nginx through
//! the fault-injecting proxy (tests/common/fault_proxy.rs), and libblkio reads the whole
//! device. Transient faults must end in success with no error reaching the client and no
//! byte differing from the target; permanent faults must fail only the reads that need the
//! remote, with a log line and a status entry, while local chunks keep being served.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::blkio_client::Client;
use common::disk::cli_ok;
use common::fault_proxy::{Fault, FaultProxy, Rule, When};
use common::nginx::Nginx;
use common::serve::Served;

/// Chunk size given to prepare (small, so a few MiB make many chunks and fetches).
const CHUNK: usize = 64 << 10;
/// Size of one guest read.
const REQ: usize = 64 << 10;

/// One test's world: nginx with the target, a proxy in front of it, a prepared disk.
struct World {
    nginx: Nginx,
    proxy: FaultProxy,
    dir: tempfile::TempDir,
    disk: PathBuf,
    target: Vec<u8>,
}

impl World {
    /// A target of `size` bytes (a sector multiple, not a chunk multiple) prepared onto a
    /// smaller random source disk, directly from nginx.
    fn new(seed: u64, size: usize) -> World {
        let nginx = Nginx::start();
        let mut target = common::random_bytes(seed, size);
        target[size / 3..size / 3 + 300_000].fill(0);
        nginx.put("t.img", &target);
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.img");
        std::fs::write(&disk, common::random_bytes(seed + 1, size / 2)).unwrap();
        let chunk = CHUNK.to_string();
        cli_ok(&[
            "prepare",
            disk.to_str().unwrap(),
            "--target",
            &nginx.url("t.img"),
            "--chunk-size",
            &chunk,
        ]);
        let proxy = FaultProxy::start(nginx.port());
        World {
            nginx,
            proxy,
            dir,
            disk,
            target,
        }
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("vu.sock")
    }

    fn control(&self) -> PathBuf {
        self.dir.path().join("ctl.sock")
    }

    /// Serves the disk through the proxy (no background hydration: every fetch is a guest
    /// read's), with short timeouts and a control socket, plus `extra` arguments.
    fn serve(&self, extra: &[&str]) -> Served {
        let url = self.proxy.url("t.img");
        let ctl = self.control();
        let mut args = vec![
            "--target",
            url.as_str(),
            "--no-hydrate",
            "--request-timeout",
            "1",
            "--connect-timeout",
            "1",
            "--control",
            ctl.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        Served::start_logged(
            &self.disk,
            &self.socket(),
            Some(&self.dir.path().join("serve.log")),
            &args,
        )
    }
}

/// What a read pass returned: the bytes, and the offsets whose request failed (with ret).
struct Pass {
    data: Vec<u8>,
    failed: Vec<(usize, i32)>,
}

/// Like [`read_pass`], one request at a time from the end backwards: no miss continues
/// the previous one, so readahead fetches nothing past `to` (the chunks after `to` stay
/// missing for what the test does next).
fn read_pass_backwards(c: &mut Client, from: usize, to: usize, patience: Duration) -> Pass {
    let mut data = vec![0u8; to - from];
    let mut failed = Vec::new();
    let mut end = to;
    while end > from {
        let off = from + (end - from - 1) / REQ * REQ;
        let p = read_pass(c, off, end, 1, patience);
        data[off - from..end - from].copy_from_slice(&p.data);
        failed.extend(p.failed);
        end = off;
    }
    failed.sort_unstable();
    Pass { data, failed }
}

/// Reads `[from, to)` in `REQ`-byte requests, `depth` in flight on one queue, waiting up to
/// `patience` for each completion. Failed requests leave zeros and are listed.
fn read_pass(c: &mut Client, from: usize, to: usize, depth: usize, patience: Duration) -> Pass {
    let mut data = vec![0u8; to - from];
    let mut failed = Vec::new();
    let mut next = from;
    let mut inflight: Vec<(usize, usize, usize)> = Vec::new(); // (slot, offset, len)
    loop {
        while inflight.len() < depth && next < to {
            let len = REQ.min(to - next);
            let slot = (0..depth)
                .find(|s| !inflight.iter().any(|x| x.0 == *s))
                .unwrap();
            c.submit_read(0, next as u64, slot * REQ, len, slot);
            inflight.push((slot, next, len));
            next += len;
        }
        if inflight.is_empty() {
            break;
        }
        for d in c.wait_for(0, 1, patience).expect("wait for completions") {
            let i = inflight.iter().position(|x| x.0 == d.user_data).unwrap();
            let (slot, off, len) = inflight.remove(i);
            if d.ret == 0 {
                data[off - from..off - from + len]
                    .copy_from_slice(c.buf(slot * REQ..slot * REQ + len));
            } else {
                failed.push((off, d.ret));
            }
        }
    }
    failed.sort_unstable();
    Pass { data, failed }
}

fn connect(w: &World) -> Client {
    let c = Client::connect(&w.socket(), 1, 8 * REQ).expect("connect blkio client");
    assert_eq!(
        c.capacity as usize,
        w.target.len(),
        "capacity != target size"
    );
    c
}

/// Asserts `pass` read `[from, ..)` of the target without any error.
fn assert_clean(pass: &Pass, target: &[u8], from: usize, what: &str) {
    assert!(
        pass.failed.is_empty(),
        "{what}: {} reads failed (first {:?})",
        pass.failed.len(),
        &pass.failed[..pass.failed.len().min(4)]
    );
    let want = &target[from..from + pass.data.len()];
    if pass.data != want {
        let first = (0..want.len()).find(|&i| pass.data[i] != want[i]).unwrap();
        panic!(
            "{what}: device differs from the target at byte {}",
            from + first
        );
    }
}

/// A transient fault: the whole device reads back equal to the target with no error,
/// the fault was really injected, and nothing is reported as a fetch failure.
fn transient(seed: u64, rules: Vec<Rule>, extra: &[&str]) {
    let w = World::new(seed, 4 * 1024 * 1024 + 3 * 512);
    let srv = w.serve(extra);
    w.proxy.set_plan(seed, rules);
    let t = Instant::now();
    let mut c = connect(&w);
    let pass = read_pass(&mut c, 0, w.target.len(), 4, Duration::from_secs(60));
    let secs = t.elapsed().as_secs_f64();
    assert_clean(&pass, &w.target, 0, "read through transient faults");
    let hits = w.proxy.hits();
    assert!(hits > 0, "the fault plan never matched a request");
    let status = streamboot::control::client::get_status(&w.control()).expect("status");
    assert!(
        status["last_error"].is_null(),
        "a transient fault was reported as an error: {status}"
    );
    println!(
        "seed {seed}: {hits} faults injected in {} requests, whole device read in {secs:.2} s",
        w.proxy.requests()
    );
    drop(c);
    drop(srv);
}

#[test]
fn connection_resets_are_retried() {
    transient(100, vec![Rule::new(When::Prob(0.4), Fault::Reset)], &[]);
}

#[test]
fn status_500_and_503_are_retried() {
    transient(
        110,
        vec![
            Rule::new(When::EveryNth(2), Fault::Status(500)),
            Rule::new(When::EveryNth(3), Fault::Status(503)),
        ],
        &[],
    );
}

#[test]
fn stalls_longer_than_the_timeout_are_abandoned_and_retried() {
    // --request-timeout is 1 s; each stall holds the body for 5 s.
    transient(
        120,
        vec![
            Rule::new(When::Nth(1), Fault::Stall { after: 0, secs: 5 }),
            Rule::new(
                When::EveryNth(4),
                Fault::Stall {
                    after: 10_000,
                    secs: 5,
                },
            )
            .limit(3),
        ],
        &[],
    );
}

#[test]
fn truncated_bodies_are_completed() {
    transient(
        130,
        vec![Rule::new(When::EveryNth(2), Fault::Truncate(20_000))],
        &[],
    );
}

#[test]
fn wrong_content_range_is_rejected_and_retried() {
    transient(
        140,
        vec![Rule::new(When::EveryNth(2), Fault::ShiftRange(512))],
        &[],
    );
}

/// The server vanishes for 30 s (connections refused, open ones cut): the guest's reads
/// wait and then succeed; reads of chunks already local are served meanwhile.
#[test]
fn server_gone_for_30_s_then_back() {
    let w = World::new(150, 4 * 1024 * 1024 + 512);
    let srv = w.serve(&[]);
    let mut c = connect(&w);
    let half = w.target.len() / 2 / REQ * REQ;
    assert_clean(
        &read_pass_backwards(&mut c, 0, half, Duration::from_secs(20)),
        &w.target,
        0,
        "first half before the outage",
    );
    w.proxy.down();
    let went = Instant::now();
    // Local chunks are served while the server is gone.
    assert_clean(
        &read_pass(&mut c, 0, half, 4, Duration::from_secs(20)),
        &w.target,
        0,
        "local chunks during the outage",
    );
    std::thread::scope(|s| {
        let back = s.spawn(|| {
            std::thread::sleep(Duration::from_secs(30).saturating_sub(went.elapsed()));
            w.proxy.up();
        });
        let pass = read_pass(&mut c, half, w.target.len(), 4, Duration::from_secs(90));
        back.join().unwrap();
        assert!(
            went.elapsed() >= Duration::from_secs(30),
            "the reads of missing chunks finished while the server was gone"
        );
        assert_clean(&pass, &w.target, half, "second half across the outage");
    });
    let status = streamboot::control::client::get_status(&w.control()).expect("status");
    assert!(status["last_error"].is_null(), "{status}");
    assert!(
        srv.log().contains("range request failed, retrying"),
        "no retry logged: {}",
        srv.log()
    );
    println!(
        "outage: second half done {:.1} s after the server went away",
        went.elapsed().as_secs_f64()
    );
}

/// The image is replaced on the server mid-migration (a different file of the same size:
/// another ETag). Pinning stops every fetch: the reads that need the remote fail with
/// IOERR, everything local (fetched before, written by the guest) is still served, and the
/// log, status and metrics say why.
#[test]
fn image_replaced_mid_migration_stops_fetching() {
    let w = World::new(160, 4 * 1024 * 1024);
    // Same size, different content and mtime (nginx's ETag is mtime + size: a replacement
    // within the same second with the same size would be invisible to any validator).
    let mut other = w.target.clone();
    other[3_000_000..3_100_000].fill(0xAB);
    w.nginx.replace(
        "other.img",
        &other,
        std::time::SystemTime::now() - Duration::from_secs(3600),
    );
    let srv = w.serve(&[]);
    let mut c = connect(&w);
    let half = w.target.len() / 2;
    assert_clean(
        &read_pass_backwards(&mut c, 0, half, Duration::from_secs(20)),
        &w.target,
        0,
        "first half before the replacement",
    );
    w.proxy.set_plan(
        160,
        vec![Rule::new(When::Always, Fault::Path("/other.img".into()))],
    );

    // A guest write of one whole chunk in the not yet fetched half succeeds.
    let wr = half + (1 << 20);
    let written = common::random_bytes(161, CHUNK);
    c.buf(0..CHUNK).copy_from_slice(&written);
    assert_eq!(c.write(wr as u64, 0, CHUNK), 0, "write during the fault");
    let mut model = w.target.clone();
    model[wr..wr + CHUNK].copy_from_slice(&written);

    let pass = read_pass(&mut c, 0, w.target.len(), 4, Duration::from_secs(20));
    assert!(w.proxy.hits() > 0, "the replacement was never served");
    // No request that succeeded returned a wrong byte.
    let failed_at = |off: usize| pass.failed.iter().any(|f| f.0 == off);
    for off in (0..w.target.len()).step_by(REQ) {
        let end = (off + REQ).min(w.target.len());
        if !failed_at(off) {
            assert!(
                pass.data[off..end] == model[off..end],
                "read at {off} succeeded with wrong bytes"
            );
        }
    }
    // Local chunks: everything read before and the written chunk.
    let failed_local: Vec<_> = pass
        .failed
        .iter()
        .filter(|f| f.0 < half || f.0 == wr)
        .collect();
    assert!(
        failed_local.is_empty(),
        "local chunks failed: {failed_local:?}"
    );
    // Remote chunks: every other read of the second half failed with an I/O error (but
    // the first 512 KiB of it: slack for chunks the first pass may have fetched along).
    let remote: Vec<usize> = (half + (512 << 10)..w.target.len())
        .step_by(REQ)
        .filter(|&o| o != wr)
        .collect();
    let served: Vec<_> = remote.iter().filter(|&&o| !failed_at(o)).collect();
    assert!(
        served.is_empty(),
        "reads of the changed image did not fail: {served:?}"
    );
    assert!(pass.failed.iter().all(|f| f.1 < 0), "{:?}", pass.failed);

    let status = streamboot::control::client::get_status(&w.control()).expect("status");
    let last = status["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        last.contains("image changed on the server"),
        "status: {status}"
    );
    let metrics = streamboot::control::client::get_metrics(&w.control()).expect("metrics");
    let sample = |name: &str| {
        let prefix = format!("{name}{{");
        let line = metrics.lines().find(|l| l.starts_with(&prefix));
        line.unwrap_or_else(|| panic!("no {name}: {metrics}"))
            .to_owned()
    };
    assert!(
        sample("streamboot_last_error_present").ends_with(" 1.0"),
        "{metrics}"
    );
    assert!(
        !sample("streamboot_fetch_errors_total").ends_with(" 0"),
        "{metrics}"
    );
    let log = srv.log();
    assert!(
        log.contains("fetch failed") && log.contains("image changed on the server"),
        "no clear log line: {log}"
    );
    println!("last_error: {last}");
}

/// The image is replaced underneath a server that ignores `If-Match` and strips `ETag`
/// (issue 11): no read may return a byte of the other image; the reads that need the
/// remote fail, and the log and status say that the server sent no ETag.
#[test]
fn server_without_validators_is_refused_not_mixed() {
    let w = World::new(165, 4 * 1024 * 1024);
    let mut other = w.target.clone();
    for (i, b) in other.iter_mut().enumerate() {
        *b ^= (i % 251) as u8 | 1;
    }
    w.nginx.replace(
        "other.img",
        &other,
        std::time::SystemTime::now() - Duration::from_secs(3600),
    );
    let srv = w.serve(&[]);
    let mut c = connect(&w);
    let half = w.target.len() / 2;
    assert_clean(
        &read_pass_backwards(&mut c, 0, half, Duration::from_secs(20)),
        &w.target,
        0,
        "first half before the replacement",
    );
    w.proxy.set_plan(
        165,
        vec![Rule::new(
            When::Always,
            Fault::Unvalidated("/other.img".into()),
        )],
    );
    let pass = read_pass(&mut c, half, w.target.len(), 4, Duration::from_secs(20));
    assert!(w.proxy.hits() > 0, "the replacement was never served");
    for off in (half..w.target.len()).step_by(REQ) {
        let end = (off + REQ).min(w.target.len());
        if !pass.failed.iter().any(|f| f.0 == off) {
            assert!(
                pass.data[off - half..end - half] == w.target[off..end],
                "read at {off} returned bytes of the other image"
            );
        }
    }
    assert!(
        pass.failed.len() * REQ >= (half - (512 << 10)),
        "reads of the unvalidated server did not fail: {} failed",
        pass.failed.len()
    );
    let status = streamboot::control::client::get_status(&w.control()).expect("status");
    let last = status["last_error"].as_str().unwrap_or_default();
    assert!(last.contains("without the pinned ETag"), "status: {status}");
    assert!(
        srv.log().contains("without the pinned ETag"),
        "no clear log line: {}",
        srv.log()
    );
}

/// A permanent error status: 404 fails at once, 500 after `--fetch-deadline`; only the
/// reads of the affected range fail, and after the server recovers they succeed.
#[test]
fn permanent_status_fails_only_the_affected_reads() {
    for (i, status) in [404u16, 500].into_iter().enumerate() {
        let w = World::new(170 + i as u64, 3 * 1024 * 1024);
        let srv = w.serve(&["--fetch-deadline", "2"]);
        let mut c = connect(&w);
        let (bad_from, bad_to) = (1024 * 1024, 1536 * 1024);
        w.proxy.set_plan(
            0,
            vec![Rule::new(
                When::Overlaps(bad_from as u64, bad_to as u64),
                Fault::Status(status),
            )],
        );
        let t = Instant::now();
        let pass = read_pass(&mut c, 0, w.target.len(), 4, Duration::from_secs(30));
        let secs = t.elapsed().as_secs_f64();
        assert!(!pass.failed.is_empty(), "HTTP {status}: no read failed");
        for &(off, ret) in &pass.failed {
            assert!(ret < 0, "HTTP {status}: ret {ret}");
            // A demand fetch covers up to 512 KiB around the missing chunk.
            assert!(
                off + REQ > bad_from - (512 << 10) && off < bad_to + (512 << 10),
                "HTTP {status}: read at {off} failed, outside the faulty range"
            );
        }
        for off in (0..w.target.len()).step_by(REQ) {
            let end = (off + REQ).min(w.target.len());
            if !pass.failed.iter().any(|f| f.0 == off) {
                assert!(
                    pass.data[off..end] == w.target[off..end],
                    "wrong bytes at {off}"
                );
            }
        }
        let st = streamboot::control::client::get_status(&w.control()).expect("status");
        let last = st["last_error"].as_str().unwrap_or_default().to_string();
        assert!(last.contains(&format!("HTTP {status}")), "{st}");
        assert!(
            srv.log().contains(&format!("HTTP {status}")),
            "{}",
            srv.log()
        );
        // The server recovers: the same reads succeed, the device equals the target.
        w.proxy.clear();
        let again = read_pass(&mut c, 0, w.target.len(), 4, Duration::from_secs(30));
        assert_clean(&again, &w.target, 0, "after the server recovered");
        println!(
            "HTTP {status}: {} reads failed, pass took {secs:.2} s",
            pass.failed.len()
        );
    }
}

/// Two `--target` mirrors; the first starts resetting every connection: reads fail over
/// to the second and the device equals the target.
#[test]
fn mirror_failover() {
    let w = World::new(180, 4 * 1024 * 1024 + 512);
    let healthy = FaultProxy::start(w.nginx.port());
    let second = healthy.url("t.img");
    let srv = w.serve(&["--target", &second]);
    w.proxy
        .set_plan(0, vec![Rule::new(When::Always, Fault::Reset)]);
    let mut c = connect(&w);
    let pass = read_pass(&mut c, 0, w.target.len(), 4, Duration::from_secs(30));
    assert_clean(&pass, &w.target, 0, "read with a failing first mirror");
    assert!(w.proxy.hits() > 0, "the first mirror was never tried");
    assert!(healthy.requests() > 0, "the second mirror was never used");
    let status = streamboot::control::client::get_status(&w.control()).expect("status");
    assert!(status["last_error"].is_null(), "{status}");
    drop(srv);
}

/// The first mirror drips its answers one byte every 300 ms: never a stall for
/// `--request-timeout 1`, but each attempt's total budget runs out and the reads complete
/// from the second mirror (issue 11). On a stall limit alone the reads would never end.
#[test]
fn dripping_mirror_is_abandoned_for_the_next() {
    let w = World::new(185, 2 * 1024 * 1024);
    let healthy = FaultProxy::start(w.nginx.port());
    let second = healthy.url("t.img");
    let srv = w.serve(&["--target", &second]);
    w.proxy.set_plan(
        0,
        vec![Rule::new(When::Always, Fault::Drip { every_ms: 300 })],
    );
    let mut c = connect(&w);
    let t = Instant::now();
    let pass = read_pass(&mut c, 0, w.target.len(), 4, Duration::from_secs(60));
    assert_clean(&pass, &w.target, 0, "read with a dripping first mirror");
    assert!(w.proxy.hits() > 0, "the first mirror was never tried");
    assert!(healthy.requests() > 0, "the second mirror was never used");
    println!("whole device read in {:.1} s", t.elapsed().as_secs_f64());
    drop(srv);
}

/// A chunk-store target served in process (StoreSource over the proxy, Engine,
/// VhostBlkServer): chunk objects with a flipped bit fail their BLAKE3 hash and are fetched
/// again, so a few corrupt responses end in success; when every response is corrupt the
/// affected reads fail with IOERR. No wrong byte reaches the client either way.
#[test]
fn flipped_bits_in_store_chunks_are_refetched_or_fail() {
    use std::sync::Arc;
    use streamboot::blockdev::BlockBackend;
    use streamboot::engine::{Engine, EngineOptions};
    use streamboot::source::store::{StoreSource, StoreSourceOptions};
    use streamboot::source::RemoteSource;
    use streamboot::vhost::{ServeOptions, VhostBlkServer};

    let nginx = Nginx::start();
    let size = 3 * 1024 * 1024;
    let mut target = common::random_bytes(190, size);
    target[size / 4..size / 4 + 200_000].fill(0);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image.raw");
    std::fs::write(&image, &target).unwrap();
    streamboot::store::publish::publish(
        &image,
        &nginx.root().join("store"),
        "img",
        CHUNK as u64,
        None,
        false,
    )
    .expect("publish");
    let proxy = FaultProxy::start(nginx.port());
    let mut opts = StoreSourceOptions::insecure_unverified();
    opts.cache_chunks = 0;
    let source: Arc<dyn RemoteSource> =
        Arc::new(StoreSource::open(&proxy.url("store"), "img", opts).expect("open store"));
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, common::random_bytes(191, size / 2)).unwrap();
    let meta = common::disk::prepare(&disk, &source, CHUNK as u64, 0..CHUNK as u64, None);
    let engine = Arc::new(Engine::new(meta, source, EngineOptions::default()).expect("engine"));
    let sock = dir.path().join("vu.sock");
    let mut sopts = ServeOptions::new(&sock);
    sopts.allow_unsealed_memory = true; // libblkio does not seal its buffers
    sopts.io_threads = 2;
    let backend: Arc<dyn BlockBackend> = engine.clone();
    let server = VhostBlkServer::bind(backend, sopts).expect("bind");
    let shutdown = server.shutdown_handle();
    let thread = std::thread::spawn(move || server.run());

    let mut c = Client::connect(&sock, 1, 8 * REQ).expect("connect");
    let half = size / 2;
    // Transient: the first two chunk responses are corrupt; each object is fetched at most
    // twice corrupt, so its next fetch is good.
    proxy.set_plan(
        190,
        vec![Rule::new(When::Always, Fault::FlipBit { at: 4099, bit: 5 }).limit(2)],
    );
    let pass = read_pass(&mut c, 0, half, 4, Duration::from_secs(30));
    assert_clean(&pass, &target, 0, "first half with two corrupt responses");
    assert_eq!(proxy.hits(), 2, "the corruption was not injected");

    // The reads that need chunks the first pass (with its readahead) did not fetch.
    let remote = (half..size)
        .step_by(REQ)
        .filter(|&o| !engine.is_local(o as u64, REQ.min(size - o) as u64))
        .count();
    assert!(remote > 0, "the first pass fetched the whole image");
    // Permanent: every response corrupt. Local chunks read fine, the rest fail.
    proxy.set_plan(
        191,
        vec![Rule::new(When::Always, Fault::FlipBit { at: 77, bit: 0 })],
    );
    let pass = read_pass(&mut c, 0, size, 4, Duration::from_secs(30));
    assert!(
        pass.failed.iter().all(|f| f.0 >= half && f.1 < 0),
        "local reads failed: {:?}",
        pass.failed
    );
    assert!(
        pass.failed.len() >= remote,
        "{} reads failed, {remote} need corrupt chunks",
        pass.failed.len()
    );
    for off in (0..size).step_by(REQ) {
        if !pass.failed.iter().any(|f| f.0 == off) {
            assert!(
                pass.data[off..off + REQ] == target[off..off + REQ],
                "wrong bytes at {off}"
            );
        }
    }
    let last = engine.last_fetch_error().unwrap_or_default();
    assert!(
        last.contains("verification failed"),
        "last fetch error: {last}"
    );

    // The store serves good objects again: everything reads back equal to the target.
    proxy.clear();
    let pass = read_pass(&mut c, 0, size, 4, Duration::from_secs(30));
    assert_clean(&pass, &target, 0, "after the corruption stopped");
    drop(c);
    shutdown.shutdown();
    thread.join().unwrap().expect("server");
}
