//! Hostile review of the paged chunk map (issue 14 point 6): a map larger than its page
//! cache, pages evicted and read back while processes are killed, damaged page copies,
//! slot reuse under concurrency, and the bound on pages pinned by unflushed changes.
//! Seeded: the seed is printed, STREAMBOOT_SEED replays a run.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boot_relocator::{
    format::ENTRIES_PER_PAGE, relocate, FileStorage, Location, MapCounts, MetaStore, Storage,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use streamboot::engine::{Engine, EngineOptions, HydrateOptions};
use streamboot::source::{FileSource, RemoteSource};

use common::disk::{cli, sha256, sha256_file};
use common::powerloss::PowerLossDisk;

const BLOCK: usize = 4096;
const CACHE_ENV: &str = "STREAMBOOT_TEST_MAP_CACHE_PAGES";
/// 8 MiB - 1234 at 4 KiB chunks: 2048 chunks on 9 map pages.
const TARGET_LEN: usize = (8 << 20) - 1234;
const SOURCE_LEN: usize = 6 << 20;
const FLUSH_EVERY: u64 = 5;
/// Blocks guest writes go to (the 6 MiB area has 1,536 slots).
const WRITABLE_BLOCKS: usize = 1_400;
/// Rounds of the crash test (a killed hydrate and killed guest I/O each).
const ROUNDS: u64 = 24;

fn seed() -> u64 {
    let s = std::env::var("STREAMBOOT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    println!("seed {s} (STREAMBOOT_SEED={s} to replay)");
    s
}

fn storage(p: &Path) -> Arc<dyn Storage> {
    Arc::new(FileStorage::open(p, true).unwrap())
}

/// The engine over `disk` with at most `pages` clean map pages in memory.
fn engine(disk: &Path, src: &Arc<dyn RemoteSource>, pages: usize) -> Engine {
    let mut m = MetaStore::open(storage(disk)).unwrap().expect("prepared");
    m.set_page_cache_pages(pages);
    Engine::new(m, src.clone(), EngineOptions::default()).unwrap()
}

/// The counts of a full pass over the map.
fn recount(m: &MetaStore) -> MapCounts {
    let l = *m.layout();
    let mut n = MapCounts::default();
    m.scan(|c, e| {
        match e.loc {
            Location::Missing => n.missing += 1,
            Location::Zero => n.zero += 1,
            Location::Home => n.home += 1,
            Location::Slot(_) => n.slotted += 1,
        }
        n.dirty += e.dirty as u64;
        if e.saved.is_some() {
            n.saved += 1;
            n.saved_bytes += l.source_len(c) as u64;
        }
    })
    .unwrap();
    n
}

struct Fixture {
    dir: tempfile::TempDir,
    source: Vec<u8>,
    target: Vec<u8>,
    target_path: PathBuf,
    src: Arc<dyn RemoteSource>,
}

impl Fixture {
    fn new(seed: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let source = common::random_bytes(seed, SOURCE_LEN);
        let mut target = common::random_bytes(seed + 1, TARGET_LEN);
        target[3 << 20..(3 << 20) + 300_000].fill(0);
        let target_path = dir.path().join("target.img");
        std::fs::write(&target_path, &target).unwrap();
        let src: Arc<dyn RemoteSource> = Arc::new(FileSource::open(&target_path, None).unwrap());
        Fixture {
            dir,
            source,
            target,
            target_path,
            src,
        }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    /// A fresh source disk prepared by the real binary (small map cache), at `name`.
    fn prepared(&self, name: &str, area: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, &self.source).unwrap();
        let out = cmd(&[
            "prepare",
            p.to_str().unwrap(),
            "--target",
            self.target_path.to_str().unwrap(),
            "--chunk-size",
            "4K",
            "--boot-range",
            "0..256K",
            "--area-size",
            area,
        ])
        .output()
        .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        p
    }
}

/// The real binary with a one-page map cache.
fn cmd(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_streamboot"));
    c.args(args).env(CACHE_ENV, "1");
    c
}

fn run_ok(args: &[&str]) {
    let out = cmd(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Op `i` of a worker: (kind 0 write / 1 write-zeroes / 2 read, first block, blocks).
fn op(seed: u64, i: u64) -> (u8, usize, usize) {
    let mut r = ChaCha8Rng::seed_from_u64(seed.wrapping_mul(1_000_003).wrapping_add(i));
    let blocks = TARGET_LEN / BLOCK;
    let n = r.random_range(1..=4);
    let kind = match r.random_range(0..10) {
        0..=4 => 0,
        5 => 1,
        _ => 2,
    };
    // Writes stay within fewer chunks than the area has slots (dirty chunks are never
    // evicted); reads fetch all over, so clean chunks are evicted and pages re-read.
    let top = if kind == 2 { blocks } else { WRITABLE_BLOCKS };
    (kind, r.random_range(0..top - n), n)
}

fn block_bytes(seed: u64, i: u64, b: usize) -> Vec<u8> {
    let tag = format!("seed {seed} op {i} block {b};");
    (0..BLOCK).map(|k| tag.as_bytes()[k % tag.len()]).collect()
}

/// What block `b` holds after op `i` (None: op `i` leaves it alone).
fn op_block(seed: u64, i: u64, b: usize) -> Option<Vec<u8>> {
    let (kind, b0, n) = op(seed, i);
    if !(b0..b0 + n).contains(&b) {
        return None;
    }
    match kind {
        0 => Some(block_bytes(seed, i, b)),
        1 => Some(vec![0; BLOCK]),
        _ => None,
    }
}

fn apply(model: &mut [u8], seed: u64, ops: std::ops::Range<u64>) {
    for i in ops {
        let (_, b0, n) = op(seed, i);
        for b in b0..b0 + n {
            if let Some(v) = op_block(seed, i, b) {
                let end = ((b + 1) * BLOCK).min(model.len());
                model[b * BLOCK..end].copy_from_slice(&v[..end - b * BLOCK]);
            }
        }
    }
}

/// Worker process: guest writes, write-zeroes, reads (fetches) and flushes over a map
/// whose page cache holds one page. Reads are checked against its own model; a
/// mismatch is logged as `BAD`.
#[test]
#[ignore = "worker process of killed_guest_io_with_map_larger_than_cache"]
fn review_pages_worker() {
    let Ok(args) = std::env::var("REVIEW_PAGES_WORKER") else {
        return;
    };
    let v: Vec<&str> = args.split('|').collect();
    let (disk, target, log, seed) = (v[0], v[1], v[2], v[3].parse::<u64>().unwrap());
    let target_bytes = std::fs::read(target).unwrap();
    let src: Arc<dyn RemoteSource> = Arc::new(FileSource::open(Path::new(target), None).unwrap());
    let e = engine(Path::new(disk), &src, 1);
    let mut log = std::fs::OpenOptions::new().append(true).open(log).unwrap();
    let mut model = target_bytes;
    for i in 0.. {
        let (kind, b0, n) = op(seed, i);
        let (o, len) = (b0 * BLOCK, n * BLOCK);
        match kind {
            0 => {
                let data: Vec<u8> = (b0..b0 + n).flat_map(|b| block_bytes(seed, i, b)).collect();
                e.write(o as u64, &data).unwrap();
            }
            1 => e.write_zeroes(o as u64, len as u64).unwrap(),
            _ => {
                let mut buf = vec![0u8; len];
                e.read(o as u64, &mut buf).unwrap();
                if buf != model[o..o + len] {
                    writeln!(log, "BAD read at op {i}").unwrap();
                    log.sync_all().unwrap();
                    panic!("read at op {i} differs from the model");
                }
            }
        }
        apply(&mut model, seed, i..i + 1);
        if (i + 1) % FLUSH_EVERY == 0 {
            e.flush().unwrap();
            let ev = e
                .counters()
                .evictions
                .load(std::sync::atomic::Ordering::Relaxed);
            writeln!(log, "evictions {ev}\n{i}").unwrap();
            log.sync_all().unwrap();
        }
    }
}

/// Runs `c` and SIGKILLs it after `delay`: `None` when killed, else how it exited.
fn run_and_kill(mut c: Command, delay: Duration) -> Option<std::process::ExitStatus> {
    let mut child = c.spawn().unwrap();
    let start = Instant::now();
    while start.elapsed() < delay {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    child.kill().ok();
    child.wait().unwrap();
    None
}

/// Every byte the engine presents (one-page map cache).
fn presented(fx: &Fixture, d: &Path) -> Vec<u8> {
    let e = engine(d, &fx.src, 1);
    let mut all = vec![0u8; TARGET_LEN];
    e.read(0, &mut all).unwrap();
    e.with_meta(|m| assert_eq!(m.counts(), recount(m), "running counts != recount"));
    all
}

#[test]
fn killed_guest_io_with_map_larger_than_cache() {
    let seed = seed();
    let mut rng = common::test_rng(seed);
    let fx = Fixture::new(seed);
    let src_sha = sha256(&fx.source);
    // A 6 MiB area: 1,536 slots for 2,048 chunks, so clean chunks are evicted too.
    let prepared = fx.prepared("prepared.img", "6M");
    let d = fx.path("disk.img");
    let ds = d.to_str().unwrap().to_string();
    std::fs::copy(&prepared, &d).unwrap();
    let t0 = Instant::now();
    run_ok(&["hydrate", &ds, "--threads", "2"]);
    let hydrate_us = t0.elapsed().as_micros() as u64;
    let (mut kills, mut evictions) = (0, 0);
    for round in 0..ROUNDS {
        // hydrate by the real binary, killed: the target is presented exactly.
        std::fs::copy(&prepared, &d).unwrap();
        let t = Duration::from_micros(rng.random_range(0..=hydrate_us * 11 / 10));
        let mut h = cmd(&["hydrate", &ds, "--threads", "2"]);
        h.stderr(Stdio::null()).stdout(Stdio::null());
        kills += run_and_kill(h, t).is_none() as usize;
        assert!(
            presented(&fx, &d) == fx.target,
            "round {round}: after killed hydrate"
        );

        // guest I/O, killed: flushed ops present, nothing foreign, reads were right.
        let log = fx.path("flushes.log");
        std::fs::write(&log, "").unwrap();
        let wseed = seed ^ (round << 20);
        let mut w = Command::new(std::env::current_exe().unwrap());
        w.args([
            "--exact",
            "review_pages_worker",
            "--include-ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(
            "REVIEW_PAGES_WORKER",
            format!(
                "{ds}|{}|{}|{wseed}",
                fx.target_path.display(),
                log.display()
            ),
        );
        let err = fx.path("worker.err");
        let f = std::fs::File::create(&err).unwrap();
        w.stderr(f.try_clone().unwrap()).stdout(f);
        if let Some(st) = run_and_kill(w, Duration::from_millis(rng.random_range(20..600))) {
            panic!(
                "round {round}: the worker exited on its own ({st}): {}",
                std::fs::read_to_string(&err).unwrap()
            );
        }
        kills += 1;
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(!text.contains("BAD"), "round {round}: worker: {text}");
        evictions += text
            .lines()
            .filter_map(|l| l.strip_prefix("evictions ")?.parse::<u64>().ok())
            .max()
            .unwrap_or(0);
        let f = text
            .lines()
            .filter_map(|l| l.parse::<u64>().ok())
            .max()
            .map_or(0, |i| i + 1);
        let mut model = fx.target.clone();
        apply(&mut model, wseed, 0..f);
        let check = |bytes: &[u8], what: &str| {
            for (b, blk) in bytes.chunks(BLOCK).enumerate() {
                let ok = blk == &model[b * BLOCK..b * BLOCK + blk.len()]
                    || (f..f + FLUSH_EVERY + 1)
                        .any(|i| op_block(wseed, i, b).is_some_and(|v| v[..blk.len()] == *blk));
                assert!(ok, "round {round}: {what}: block {b} holds bytes never written there (flushed ops: {f})");
            }
        };
        check(&presented(&fx, &d), "after killed guest I/O");
        if round % 2 == 0 {
            run_ok(&["rollback", &ds]);
            assert_eq!(sha256_file(&d), src_sha, "round {round}: rollback");
        } else {
            run_ok(&["commit", &ds, "--force"]);
            check(&std::fs::read(&d).unwrap(), "committed");
        }
    }
    println!("seed {seed}: {kills} kills, {evictions} chunks evicted by killed workers");
    assert!(evictions > 0, "no clean chunk was ever evicted");
    assert!(kills >= ROUNDS as usize / 2, "only {kills} kills landed");
}

/// Offset of copy `k` of map page `p` of `disk`.
fn page_addr(disk: &Path, p: u64, k: u8) -> u64 {
    let m = MetaStore::open(storage(disk)).unwrap().unwrap();
    m.layout().page_addr(p, k)
}

fn flip(disk: &Path, at: u64) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(disk)
        .unwrap();
    let mut b = [0u8; 16];
    f.read_exact_at(&mut b, at + 200).unwrap();
    for x in &mut b {
        *x ^= 0x5a;
    }
    f.write_all_at(&b, at + 200).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn damaged_page_copies_read_on_demand() {
    let seed = seed();
    let fx = Fixture::new(seed);
    let d = fx.prepared("disk.img", "4M");
    let e = engine(&d, &fx.src, 1);
    // Chunk c on page 5 fetched and committed; page 5 then evicted by reads elsewhere.
    let c = 5 * ENTRIES_PER_PAGE + 7;
    let mut buf = vec![0u8; BLOCK];
    e.read((c * BLOCK) as u64, &mut buf).unwrap();
    assert!(buf == fx.target[c * BLOCK..(c + 1) * BLOCK]);
    e.flush().unwrap();
    let evict = |e: &Engine| {
        let mut b = vec![0u8; BLOCK];
        e.read(0, &mut b).unwrap();
        e.read((ENTRIES_PER_PAGE * BLOCK) as u64, &mut b).unwrap();
        e.flush().unwrap();
        e.read(0, &mut b).unwrap();
        let (pinned, clean) = e.with_meta(|m| m.resident_pages());
        assert!(
            pinned == 0 && clean <= 1,
            "({pinned}, {clean}) pages resident"
        );
    };
    e.flush().unwrap();
    evict(&e);
    let a0 = page_addr(&d, 5, 0);
    let a1 = page_addr(&d, 5, 1);
    flip(&d, a0);
    let mut got = vec![0u8; BLOCK];
    e.read((c * BLOCK) as u64, &mut got).unwrap();
    assert!(got == buf, "one damaged copy: the other one serves");
    evict(&e);
    flip(&d, a1);
    let err = e.read((c * BLOCK) as u64, &mut got);
    assert!(
        err.is_err(),
        "both copies damaged: the read must fail, got {:?}",
        &got[..8]
    );
    let miss = c + 1;
    assert!(
        e.read((miss * BLOCK) as u64, &mut got).is_err(),
        "a missing chunk on a damaged page must not be fetched and published"
    );
    assert!(
        e.write((miss * BLOCK) as u64, &vec![1u8; BLOCK]).is_err(),
        "a write onto a damaged page must fail"
    );
    // Chunks on other pages still work.
    e.read(0, &mut got).unwrap();
    assert!(got == fx.target[..BLOCK]);
    drop(e);
    // Reopening fails with a clear error (both copies bad), it does not serve zeros.
    let r = MetaStore::open(storage(&d));
    assert!(
        r.is_err(),
        "open of a map with a page lacking any valid copy"
    );
}

/// Guest writes without flush dirty one page each: the pages pinned in memory stay
/// bounded (a commit writes them, not only a flush), and concurrent writers never
/// share a slot (reopening checks that no slot is referenced twice).
#[test]
fn unflushed_writes_over_many_pages_stay_bounded() {
    let dir = tempfile::tempdir().unwrap();
    // A sparse 2.5 GiB target at 4 KiB chunks: 2,600 map pages.
    let target = dir.path().join("target.img");
    let size: u64 = 2_600 * ENTRIES_PER_PAGE as u64 * BLOCK as u64;
    std::fs::File::create(&target)
        .unwrap()
        .set_len(size)
        .unwrap();
    let src: Arc<dyn RemoteSource> = Arc::new(FileSource::open(&target, None).unwrap());
    let d = dir.path().join("disk.img");
    std::fs::write(&d, common::random_bytes(3, 1 << 20)).unwrap();
    let out = cli(&[
        "prepare",
        d.to_str().unwrap(),
        "--target",
        target.to_str().unwrap(),
        "--chunk-size",
        "4K",
        "--area-size",
        "40M",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let e = Arc::new(engine(&d, &src, 8));
    let pages = (size / BLOCK as u64).div_ceil(ENTRIES_PER_PAGE as u64);
    assert!(pages > 2 * 1_024 + 100);
    let mut max_pinned = 0;
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..4u64)
            .map(|t| {
                let e = e.clone();
                s.spawn(move || {
                    let mut max = 0;
                    for p in (t..pages).step_by(4) {
                        let c = p * ENTRIES_PER_PAGE as u64 + (p % 5);
                        let data = block_bytes(t, p, c as usize);
                        e.write(c * BLOCK as u64, &data).unwrap();
                        max = max.max(e.with_meta(|m| m.resident_pages().0));
                    }
                    max
                })
            })
            .collect();
        for h in hs {
            max_pinned = max_pinned.max(h.join().unwrap());
        }
    });
    println!("{pages} pages written without flush: at most {max_pinned} pinned");
    // 1,024 dirty pages trigger a commit; pages of the batch being written stay
    // pinned until it is durable while other writers pin new ones: at most twice that.
    assert!(
        max_pinned <= 2 * 1_024 + 8,
        "{max_pinned} map pages pinned by unflushed writes (bound 2 x 1,024)"
    );
    e.flush().unwrap();
    e.with_meta(|m| assert_eq!(m.counts(), recount(m)));
    drop(e);
    // Reopened: no slot referenced twice (open checks), every write there.
    let e = engine(&d, &src, 8);
    for p in 0..pages {
        let t = p % 4;
        let c = p * ENTRIES_PER_PAGE as u64 + (p % 5);
        let mut b = vec![0u8; BLOCK];
        e.read(c * BLOCK as u64, &mut b).unwrap();
        assert!(
            b == block_bytes(t, p, c as usize),
            "chunk {c} lost its write"
        );
    }
    e.with_meta(|m| assert_eq!(m.counts(), recount(m)));
}

/// What a disk may present after a power cut during guest I/O (sector granularity):
/// the bytes acknowledged before the last completed flush, or any later write.
struct Expect {
    flushed: Vec<u8>,
    maybe: HashMap<usize, Vec<Vec<u8>>>,
}

impl Expect {
    fn unflushed(&mut self, at: usize, data: &[u8]) {
        for (s, sec) in data.chunks(SECTOR).enumerate() {
            let v = self.maybe.entry(at / SECTOR + s).or_default();
            v.push(sec.to_vec());
        }
    }
    fn check(&self, bytes: &[u8], what: &str) {
        for (s, sec) in bytes.chunks(SECTOR).enumerate() {
            let at = s * SECTOR;
            let ok = sec == &self.flushed[at..at + sec.len()]
                || self
                    .maybe
                    .get(&s)
                    .is_some_and(|v| v.iter().any(|m| m[..sec.len()] == *sec));
            assert!(ok, "{what}: sector {s} holds bytes never written there");
        }
    }
}

const SECTOR: usize = common::powerloss::SECTOR as usize;

/// An engine on an in-memory power-loss disk: one map page cached, small fetches and
/// frequent map commits (many commit points to cut).
fn pl_engine(fx: &Fixture, d: &Arc<PowerLossDisk>) -> Engine {
    let st: Arc<dyn Storage> = d.clone();
    let mut m = MetaStore::open(st).unwrap().expect("prepared");
    m.set_page_cache_pages(1);
    let opts = EngineOptions {
        demand_fetch_bytes: 2 * BLOCK as u64,
        commit_every_bytes: 8 * BLOCK as u64,
    };
    Engine::new(m, fx.src.clone(), opts).unwrap()
}

fn pl_image(d: &PowerLossDisk) -> Vec<u8> {
    let mut v = vec![0u8; d.len().unwrap() as usize];
    d.read_at(0, &mut v).unwrap();
    v
}

/// Random writes, write-zeroes, flushes and reads until the power fails.
fn pl_guest_io(fx: &Fixture, d: &Arc<PowerLossDisk>, r: &mut ChaCha8Rng) -> (Expect, u64) {
    let e = pl_engine(fx, d);
    let mut model = fx.target.clone();
    let mut exp = Expect {
        flushed: model.clone(),
        maybe: HashMap::new(),
    };
    let mut done = 0;
    for i in 0..400u64 {
        done = i;
        let res = match r.random_range(0..100) {
            0..=44 => {
                let at = r.random_range(0..WRITABLE_BLOCKS * BLOCK / SECTOR - 16) * SECTOR;
                let len = r.random_range(1..=16) * SECTOR;
                let data: Vec<u8> = (0..len).map(|k| (i as u8) ^ (k as u8) ^ 0x77).collect();
                exp.unflushed(at, &data);
                let res = e.write(at as u64, &data);
                if res.is_ok() {
                    model[at..at + len].copy_from_slice(&data);
                }
                res
            }
            45..=54 => {
                let at = r.random_range(0..WRITABLE_BLOCKS) * BLOCK;
                exp.unflushed(at, &[0u8; BLOCK]);
                let res = e.write_zeroes(at as u64, BLOCK as u64);
                if res.is_ok() {
                    model[at..at + BLOCK].fill(0);
                }
                res
            }
            55..=69 => {
                let res = e
                    .flush()
                    .map_err(|e| streamboot::blockdev::BlockError::Io(std::io::Error::other(e)));
                if res.is_ok() {
                    exp.flushed.copy_from_slice(&model);
                    exp.maybe.clear();
                }
                res
            }
            _ => {
                let at = r.random_range(0..TARGET_LEN);
                let len = r.random_range(1..=3 * BLOCK).min(TARGET_LEN - at);
                let mut buf = vec![0u8; len];
                let res = e.read(at as u64, &mut buf);
                if res.is_ok() {
                    assert!(buf == model[at..at + len], "read {at}+{len} before the cut");
                }
                res
            }
        };
        if let Err(err) = res {
            assert!(d.is_dead(), "guest op {i} failed with power on: {err}");
            break;
        }
    }
    (exp, done)
}

#[test]
fn power_cuts_with_map_larger_than_cache() {
    let seed = seed();
    let fx = Fixture::new(seed);
    let prepared = std::fs::read(fx.prepared("prepared.img", "6M")).unwrap();
    let (mut cuts, mut ops) = (0, 0);
    for round in 0..120u64 {
        let mut r = common::test_rng(seed ^ round.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let d = Arc::new(PowerLossDisk::new(prepared.clone(), false));
        d.cut_after(r.random_range(0..1500));
        let (exp, done) = pl_guest_io(&fx, &d, &mut r);
        cuts += d.is_dead() as usize;
        ops += done;
        let d2 = Arc::new(PowerLossDisk::new(d.crash_image(&mut r), false));
        let what = format!("seed {seed} round {round}");
        let before = {
            let e = pl_engine(&fx, &d2);
            let mut all = vec![0u8; TARGET_LEN];
            e.read(0, &mut all).unwrap();
            e.with_meta(|m| assert_eq!(m.counts(), recount(m), "{what}: counts"));
            all
        };
        exp.check(&before, &format!("{what}: after the cut"));
        if round % 2 == 0 {
            let st: Arc<dyn Storage> = d2.clone();
            let mut m = MetaStore::open(st).unwrap().unwrap();
            m.set_page_cache_pages(1);
            relocate::rollback(&mut m, &mut |_, _, _| {}).unwrap();
            assert!(
                pl_image(&d2) == fx.source,
                "{what}: rollback is not the source"
            );
        } else {
            let h = HydrateOptions {
                threads: 2,
                request_bytes: 4 * BLOCK as u64,
                profile: Vec::new(),
            };
            pl_engine(&fx, &d2).commit(true, h, &|_, _, _| {}).unwrap();
            assert!(
                pl_image(&d2)[..TARGET_LEN] == before,
                "{what}: commit changed the presented bytes"
            );
        }
    }
    println!("seed {seed}: {cuts} power cuts landed in guest I/O after {ops} guest ops");
    assert!(cuts >= 60, "only {cuts} cuts landed");
}

/// Four guest threads (each owning every fourth block) write, zero, read back and
/// flush while hydration runs, over a map whose cache holds one page and an area that
/// cannot hold every chunk: pages are evicted and read back during commits and entry
/// changes. Every read sees the thread's model; after a reopen (which rejects a slot
/// referenced twice) every block is what its thread left and the counts equal a recount.
#[test]
fn concurrent_io_and_hydration_with_one_cached_page() {
    let seed = seed();
    let fx = Fixture::new(seed);
    let d = fx.prepared("disk.img", "6M");
    let e = engine(&d, &fx.src, 1);
    let models: Vec<Vec<u8>> = std::thread::scope(|s| {
        let hyd = s.spawn(|| {
            let h = HydrateOptions {
                threads: 2,
                request_bytes: 8 * BLOCK as u64,
                profile: Vec::new(),
            };
            let _ = streamboot::engine::Hydrator::new(h, 0).run(&e, &|_, _| {});
        });
        let hs: Vec<_> = (0..4usize)
            .map(|t| {
                let (e, fx) = (&e, &fx);
                s.spawn(move || {
                    let mut r = common::test_rng(seed ^ t as u64);
                    let mut model = fx.target.clone();
                    for i in 0..1_500u64 {
                        let b = r.random_range(0..WRITABLE_BLOCKS / 4) * 4 + t;
                        let at = b * BLOCK;
                        match r.random_range(0..10) {
                            0..=4 => {
                                let data = block_bytes(seed ^ t as u64, i, b);
                                e.write(at as u64, &data).unwrap();
                                model[at..at + BLOCK].copy_from_slice(&data);
                            }
                            5 => {
                                e.write_zeroes(at as u64, BLOCK as u64).unwrap();
                                model[at..at + BLOCK].fill(0);
                            }
                            6 => e.flush().unwrap(),
                            _ => {
                                let mut buf = vec![0u8; BLOCK];
                                e.read(at as u64, &mut buf).unwrap();
                                assert!(
                                    buf == model[at..at + BLOCK],
                                    "thread {t} op {i} block {b}"
                                );
                            }
                        }
                    }
                    model
                })
            })
            .collect();
        let models = hs.into_iter().map(|h| h.join().unwrap()).collect();
        hyd.join().unwrap();
        models
    });
    e.flush().unwrap();
    e.with_meta(|m| assert_eq!(m.counts(), recount(m), "running counts"));
    drop(e);
    let e = engine(&d, &fx.src, 1);
    let mut all = vec![0u8; TARGET_LEN];
    e.read(0, &mut all).unwrap();
    for (b, blk) in all.chunks(BLOCK).enumerate() {
        let want = if b < WRITABLE_BLOCKS {
            &models[b % 4][b * BLOCK..b * BLOCK + blk.len()]
        } else {
            &fx.target[b * BLOCK..b * BLOCK + blk.len()]
        };
        assert!(blk == want, "block {b} after reopen");
    }
    e.with_meta(|m| assert_eq!(m.counts(), recount(m), "counts after reopen"));
}

/// The real `streamboot serve` (hydrating in the background) with a one-page map
/// cache, driven by libblkio: random writes, discards, reads checked against the model,
/// flushes; killed with SIGKILL after a random number of requests. Every flushed write
/// is there afterwards, nothing else foreign, and rollback restores the source exactly.
#[test]
#[ignore = "intermittent: under parallel load a round's first write sometimes fails with EIO \
            and serve logs nothing; cause not found yet (run with --ignored to reproduce)"]
fn serve_killed_with_one_cached_page() {
    let seed = seed();
    let fx = Fixture::new(seed);
    let src_sha = sha256(&fx.source);
    let prepared = fx.prepared("prepared.img", "6M");
    let d = fx.path("disk.img");
    let ds = d.to_str().unwrap().to_string();
    let sock = fx.path("sb.sock");
    for round in 0..6u64 {
        std::fs::copy(&prepared, &d).unwrap();
        let _ = std::fs::remove_file(&sock);
        let child = cmd(&["serve", &ds, "--socket", sock.to_str().unwrap()])
            .arg("--allow-unsealed-memory")
            .env("STREAMBOOT_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(fx.path("serve.log")).unwrap())
            .spawn()
            .unwrap();
        let served = common::serve::Served {
            child: Some(child),
            socket: sock.clone(),
            log: None,
        };
        let t = Instant::now();
        while !sock.exists() {
            assert!(t.elapsed() < Duration::from_secs(30), "no socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut c = common::blkio_client::Client::connect(&sock, 1, 4 * BLOCK).unwrap();
        let mut r = common::test_rng(seed ^ round);
        let mut model = fx.target.clone();
        let mut exp = Expect {
            flushed: model.clone(),
            maybe: HashMap::new(),
        };
        let n = r.random_range(50..400);
        for i in 0..n {
            let b = r.random_range(0..WRITABLE_BLOCKS - 4);
            let k = r.random_range(1..=4);
            let (at, len) = (b * BLOCK, k * BLOCK);
            match r.random_range(0..10) {
                0..=3 => {
                    let data: Vec<u8> = (b..b + k)
                        .flat_map(|x| block_bytes(seed ^ round, i, x))
                        .collect();
                    c.buf(0..len).copy_from_slice(&data);
                    exp.unflushed(at, &data);
                    let ret = c.write(at as u64, 0, len);
                    if ret != 0 {
                        let log = std::fs::read_to_string(fx.path("serve.log")).unwrap();
                        panic!("round {round} write {i}: {ret}; serve's log:\n{log}");
                    }
                    model[at..at + len].copy_from_slice(&data);
                }
                4 => {
                    // Discard: the contents become unspecified (old or zeros).
                    exp.unflushed(at, &vec![0u8; len]);
                    assert_eq!(c.discard(at as u64, len as u64), 0, "discard {i}");
                    let old = model[at..at + len].to_vec();
                    let mut got = vec![0u8; len];
                    assert_eq!(c.read(at as u64, 0, len), 0);
                    got.copy_from_slice(c.buf(0..len));
                    for (s, sec) in got.chunks(BLOCK).enumerate() {
                        let o = &old[s * BLOCK..(s + 1) * BLOCK];
                        assert!(sec == o || sec.iter().all(|&x| x == 0), "discard {i}");
                    }
                    model[at..at + len].copy_from_slice(&got);
                    exp.unflushed(at, &got);
                }
                5 => {
                    assert_eq!(c.flush(), 0, "flush {i}");
                    exp.flushed.copy_from_slice(&model);
                    exp.maybe.clear();
                }
                _ => {
                    let o = r.random_range(0..TARGET_LEN / BLOCK - 4) * BLOCK;
                    assert_eq!(c.read(o as u64, 0, len), 0, "read {i}");
                    assert!(c.buf(0..len) == &model[o..o + len], "read {i} at {o}");
                }
            }
        }
        served.kill9();
        drop(c);
        exp.check(&presented(&fx, &d), &format!("seed {seed} round {round}"));
        run_ok(&["rollback", &ds]);
        assert_eq!(sha256_file(&d), src_sha, "round {round}: rollback");
    }
}

/// A disk file truncated under a running engine (its map and area gone): a request
/// whose map page must be read back fails; it neither panics nor serves zeros.
#[test]
fn truncated_disk_fails_page_reads() {
    let seed = seed();
    let fx = Fixture::new(seed);
    let d = fx.prepared("disk.img", "4M");
    let e = engine(&d, &fx.src, 1);
    let c = 6 * ENTRIES_PER_PAGE + 3;
    let mut buf = vec![0u8; BLOCK];
    e.read((c * BLOCK) as u64, &mut buf).unwrap();
    e.flush().unwrap();
    e.read(0, &mut buf).unwrap();
    e.read((ENTRIES_PER_PAGE * BLOCK) as u64, &mut buf).unwrap();
    e.flush().unwrap();
    e.read(0, &mut buf).unwrap();
    assert_eq!(e.with_meta(|m| m.resident_pages()), (0, 1));
    let map_offset = e.with_meta(|m| m.layout().page_addr(0, 0));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&d)
        .unwrap()
        .set_len(map_offset)
        .unwrap();
    let r = e.read((c * BLOCK) as u64, &mut buf);
    assert!(
        r.is_err(),
        "read through a vanished map page: {:?}",
        &buf[..8]
    );
    assert!(e.write((c * BLOCK) as u64, &[7u8; BLOCK]).is_err());
}
