//! Model-based test: random reads, writes, zeroings, flushes, reopenings, evictions and
//! hydration against the engine and a plain in-memory model of the target, comparing
//! every byte read. Seeded; the seed is printed (set STREAMBOOT_SEED to replay).

mod common;

use std::sync::Arc;

use boot_relocator::MetaStore;
use rand::{Rng, RngCore};
use streamboot::engine::{Engine, EngineOptions, HydrateOptions, Hydrator};
use streamboot::source::{FileSource, RemoteSource};

use common::disk;

fn seed() -> u64 {
    std::env::var("STREAMBOOT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random())
}

/// Opens the engine over `disk` keeping at most `page_cache` clean map pages in memory
/// (`None`: the default bound).
fn open_engine(
    disk: &std::path::Path,
    source: &Arc<dyn RemoteSource>,
    page_cache: Option<usize>,
) -> Engine {
    let mut meta = MetaStore::open(disk::storage(disk))
        .expect("open meta")
        .expect("prepared");
    if let Some(n) = page_cache {
        meta.set_page_cache_pages(n);
    }
    Engine::new(meta, source.clone(), EngineOptions::default()).expect("engine")
}

/// One model run: `chunk` size, target/source sizes, an area that holds `area_chunks`
/// slots (small areas force eviction), at most `page_cache` clean map pages in memory
/// (small bounds force map pages out and back in).
fn run(
    seed: u64,
    chunk: u64,
    source_len: usize,
    target_len: usize,
    area_chunks: Option<u64>,
    page_cache: Option<usize>,
    ops: usize,
) {
    println!("engine model: seed {seed} chunk {chunk} source {source_len} target {target_len} area {area_chunks:?} page cache {page_cache:?}");
    let mut rng = common::test_rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let target_path = dir.path().join("target.img");
    let mut target = common::random_bytes(seed ^ 1, target_len);
    // Zero runs, so the engine's zero detection is exercised.
    for _ in 0..4 {
        let at = rng.random_range(0..target_len);
        let n = rng
            .random_range(0..(3 * chunk as usize))
            .min(target_len - at);
        target[at..at + n].fill(0);
    }
    std::fs::write(&target_path, &target).unwrap();
    let disk_path = dir.path().join("disk.img");
    std::fs::write(&disk_path, common::random_bytes(seed ^ 2, source_len)).unwrap();
    let source: Arc<dyn RemoteSource> = Arc::new(FileSource::open(&target_path, None).unwrap());
    let boot_end = rng.random_range(1..4 * chunk);
    let area = area_chunks.map(|n| n * chunk + (64 << 10) + (1 << 20));
    drop(disk::prepare(&disk_path, &source, chunk, 0..boot_end, area));

    // Writes stay inside the first half so dirty chunks cannot fill a small area.
    let write_limit = target_len / 2;
    let mut model = target.clone();
    let mut engine = open_engine(&disk_path, &source, page_cache);
    for op in 0..ops {
        match rng.random_range(0..100) {
            0..=39 => {
                let off = rng.random_range(0..target_len);
                let len = rng
                    .random_range(1..=(3 * chunk as usize))
                    .min(target_len - off);
                let mut buf = vec![0u8; len];
                engine.read(off as u64, &mut buf).unwrap();
                assert!(
                    buf == model[off..off + len],
                    "seed {seed} op {op}: read {off}+{len} differs"
                );
            }
            40..=64 => {
                let off = rng.random_range(0..write_limit);
                let len = rng
                    .random_range(1..=(2 * chunk as usize))
                    .min(write_limit - off);
                let mut data = vec![0u8; len];
                rng.fill_bytes(&mut data);
                engine.write(off as u64, &data).unwrap();
                model[off..off + len].copy_from_slice(&data);
            }
            65..=69 => {
                // Whole-chunk aligned writes (no fetch) and zeroing.
                let c = rng.random_range(0..(write_limit as u64 / chunk));
                let off = (c * chunk) as usize;
                let len = chunk as usize;
                if rng.random_bool(0.5) {
                    let mut data = vec![0u8; len];
                    rng.fill_bytes(&mut data);
                    engine.write(off as u64, &data).unwrap();
                    model[off..off + len].copy_from_slice(&data);
                } else {
                    engine.write_zeroes(off as u64, len as u64).unwrap();
                    model[off..off + len].fill(0);
                }
            }
            70..=79 => {
                engine.flush().unwrap();
                // Committed pages leave the pinned set; clean ones respect the bound.
                let (pinned, clean) = engine.with_meta(|m| m.resident_pages());
                assert_eq!(pinned, 0, "seed {seed} op {op}: pages pinned after a flush");
                if let Some(n) = page_cache {
                    assert!(clean <= n, "seed {seed} op {op}: {clean} clean pages > {n}");
                }
            }
            80..=84 => {
                // Reopen: everything flushed must survive; the model is unchanged.
                engine.flush().unwrap();
                drop(engine);
                engine = open_engine(&disk_path, &source, page_cache);
            }
            85..=89 => {
                // A short burst of background hydration.
                let h = Hydrator::new(
                    HydrateOptions {
                        threads: 2,
                        request_bytes: 4 * chunk,
                        profile: (0..8)
                            .map(|_| rng.random_range(0..target_len as u64 / chunk))
                            .collect(),
                    },
                    0,
                );
                std::thread::scope(|s| {
                    s.spawn(|| {
                        std::thread::sleep(std::time::Duration::from_millis(2));
                        h.stop();
                    });
                    h.run(&engine, &|_, _| {}).unwrap();
                });
            }
            90..=92 => {
                // The lock-free presence bitmap agrees with the map, chunk by chunk.
                let mut missing: Vec<bool> = Vec::new();
                engine
                    .with_meta(|m| {
                        m.scan(|_, e| missing.push(e.loc == boot_relocator::Location::Missing))
                    })
                    .unwrap();
                for (c, &miss) in missing.iter().enumerate() {
                    let local = engine.is_local(c as u64 * chunk, 1);
                    assert_eq!(
                        local, !miss,
                        "seed {seed} op {op}: is_local({c}) disagrees with the map"
                    );
                }
            }
            _ => {
                // Full device sweep.
                let mut all = vec![0u8; target_len];
                engine.read(0, &mut all).unwrap();
                assert!(all == model, "seed {seed} op {op}: full read differs");
            }
        }
    }
    // Commit, then the disk file itself must be the model.
    engine
        .commit(true, HydrateOptions::default(), &|_, _, _| {})
        .unwrap();
    drop(engine);
    let committed = std::fs::read(&disk_path).unwrap();
    assert_eq!(
        committed.len(),
        target_len,
        "seed {seed}: committed disk has the wrong size"
    );
    assert!(
        committed == model,
        "seed {seed}: committed disk differs from the model"
    );
}

#[test]
fn model_4k_chunks_roomy_area() {
    let s = seed();
    run(s, 4096, 300_000, 400_123, None, None, 600);
}

#[test]
fn model_64k_chunks_small_area_evicts() {
    let s = seed();
    // 40 slots for a 3 MiB target of 64 KiB chunks: constant eviction.
    run(s, 65536, 2_000_000, 3_000_017, Some(40), None, 600);
}

#[test]
fn model_target_smaller_than_source() {
    let s = seed();
    run(s, 16384, 1_500_000, 700_001, Some(48), None, 400);
}

#[test]
fn model_map_pages_leave_memory() {
    let s = seed();
    // 1,001 chunks of 4 KiB: four map pages, one clean page in memory at a time, and an
    // area of 300 slots (chunk eviction too).
    run(s, 4096, 2_000_000, 4_100_000, Some(300), Some(1), 600);
}
