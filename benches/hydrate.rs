//! Hydration throughput of a 1 GiB image from loopback nginx, against `curl -o /dev/null`
//! of the same file in the same run. Prints figures and the ratio; asserts nothing.
//!
//! `cargo bench --bench hydrate` (STREAMBOOT_BENCH_MIB changes the image size; the disk
//! is put in $STREAMBOOT_BENCH_DIR, default the system temp dir).

#[path = "../tests/common/nginx.rs"]
#[allow(dead_code)]
mod nginx;

use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use boot_relocator::{relocate, FileStorage, MetaStore, PrepareSpec, Storage};
use rand::{RngCore, SeedableRng};
use streamboot::engine::{Engine, EngineOptions, HydrateOptions, Hydrator};
use streamboot::source::{HttpOptions, HttpSource, RemoteSource};
use streamboot::target::target_record;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn curl_secs(url: &str) -> f64 {
    let t = Instant::now();
    let st = Command::new("curl")
        .args(["-s", "-f", "-o", "/dev/null", url])
        .status()
        .expect("run curl");
    assert!(st.success(), "curl failed");
    t.elapsed().as_secs_f64()
}

/// `curl -o FILE` on the disk's file system, then fsync: what any downloader that keeps
/// the bytes durably pays, the fair baseline when the disk is slower than the network.
fn curl_to_disk_secs(url: &str, dir: &std::path::Path) -> f64 {
    let out = dir.join("curl-out.img");
    let t = Instant::now();
    let st = Command::new("curl")
        .args(["-s", "-f", "-o"])
        .arg(&out)
        .arg(url)
        .status()
        .expect("run curl");
    assert!(st.success(), "curl failed");
    std::fs::File::open(&out).unwrap().sync_all().unwrap();
    let secs = t.elapsed().as_secs_f64();
    std::fs::remove_file(&out).unwrap();
    secs
}

fn hydrate_secs(dir: &std::path::Path, url: &str, threads: usize) -> f64 {
    let disk = dir.join("bench-disk.img");
    std::fs::write(&disk, vec![0x11u8; 16 << 20]).unwrap();
    let st: Arc<dyn Storage> = Arc::new(FileStorage::open(&disk, true).unwrap());
    let src: Arc<dyn RemoteSource> =
        Arc::new(HttpSource::open(&[url.to_string()], None, HttpOptions::default()).unwrap());
    let spec = PrepareSpec {
        chunk_size: 64 << 10,
        target_size: src.size(),
        target: target_record(src.as_ref(), &[url.to_string()]),
        boot_ranges: std::iter::once(0..1 << 20).collect(),
        area_size: None,
        source_size: None,
        max_trial_starts: 3,
        area: None,
        discard_free_space: false,
    };
    let mut head = vec![0u8; 1 << 20];
    src.read_at(0, &mut head).unwrap();
    let plan = relocate::plan(st.as_ref(), &spec, &head).unwrap();
    let meta = relocate::prepare(
        st,
        &spec,
        &plan,
        [1; 16],
        0,
        &mut |o, b| src.read_at(o, b).map_err(|e| e.to_string()),
        &mut |_, _, _| {},
    )
    .unwrap();
    drop(meta);
    let st: Arc<dyn Storage> = Arc::new(FileStorage::open(&disk, true).unwrap());
    let engine = Engine::new(
        MetaStore::open(st).unwrap().unwrap(),
        src,
        EngineOptions::default(),
    )
    .unwrap();
    let h = Hydrator::new(
        HydrateOptions {
            threads,
            ..HydrateOptions::default()
        },
        0,
    );
    let t = Instant::now();
    let r = h.run(&engine, &|_, _| {}).unwrap();
    let fetched = t.elapsed().as_secs_f64();
    engine.flush().unwrap();
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "  (run: fetch+store {fetched:.3} s, final flush {:.3} s)",
        secs - fetched
    );
    assert_eq!(r.missing, 0);
    std::fs::remove_file(&disk).unwrap();
    secs
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let mib: usize = std::env::var("STREAMBOOT_BENCH_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024);
    let bytes = (mib as u64) << 20;
    let server = nginx::Nginx::start();
    let mut data = vec![0u8; bytes as usize];
    rand_chacha::ChaCha8Rng::seed_from_u64(1).fill_bytes(&mut data);
    server.put("bench.img", &data);
    drop(data);
    let url = server.url("bench.img");
    let dir = std::env::var("STREAMBOOT_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    let tmp = tempfile::tempdir_in(&dir).unwrap();
    curl_secs(&url); // warm the page cache
    let threads: usize = std::env::var("STREAMBOOT_BENCH_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let mut curl = Vec::new();
    let mut curl_disk = Vec::new();
    let mut hyd = Vec::new();
    for _ in 0..3 {
        curl.push(curl_secs(&url));
        curl_disk.push(curl_to_disk_secs(&url, tmp.path()));
        hyd.push(hydrate_secs(tmp.path(), &url, threads));
    }
    let (c, cd, h) = (median(curl), median(curl_disk), median(hyd));
    let gib = bytes as f64 / (1u64 << 30) as f64;
    println!(
        "hydrate bench: {mib} MiB image, loopback nginx, disk in {}",
        dir.display()
    );
    println!(
        "  curl -o /dev/null     : {:.3} s  {:.2} GiB/s (median of 3)",
        c,
        gib / c
    );
    println!("  curl -o FILE + fsync  : {:.3} s  {:.2} GiB/s (median of 3, same file system as the disk)", cd, gib / cd);
    println!("  streamboot hydrate    : {:.3} s  {:.2} GiB/s (median of 3; {threads} requests in flight, 64 KiB chunks, incl. final flush)", h, gib / h);
    println!(
        "  ratio hydrate / curl -o /dev/null  : {:.2} (goal >= 0.90)",
        c / h
    );
    println!("  ratio hydrate / curl -o FILE+fsync : {:.2}", cd / h);
}
