//! The host-wide chunk cache (`--cache DIR`, docs/cache.md) against a real nginx whose
//! access log counts the bytes it sent:
//! - 8 disks prepared and served at once (8 `serve` processes, each read whole through
//!   the libblkio client in parallel) against one HTTP target with one shared cache: the
//!   origin sends the image about once, and every disk gives the target bit for bit;
//! - a cache entry with one flipped byte is detected, deleted and fetched again (raw image
//!   and chunk store), and the disk still gets the right bytes;
//! - a chunk-store target through the cache: a second disk fetches no chunk object;
//! - `export --cache` shares the cache with prepare/hydrate/commit.

mod common;
mod nbd_common;
mod store_common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::blkio_client::Client;
use common::disk::{cli, cli_ok, sha256};
use common::nginx::Nginx;
use common::serve::Served;

/// Size of the raw target: not a multiple of the cache's 256 KiB chunks.
const TARGET_LEN: usize = (6 << 20) + 40960;
const SOURCE_LEN: usize = 8 << 20;
const DISKS: usize = 8;

fn target() -> Vec<u8> {
    let mut t = common::random_bytes(1500, TARGET_LEN);
    t[1 << 20..(1 << 20) + 300_000].fill(0);
    t
}

/// A fresh source disk `n` (distinct contents per disk) in `dir`.
fn source_disk(dir: &Path, n: usize) -> PathBuf {
    let d = dir.join(format!("disk{n}.img"));
    std::fs::write(&d, common::random_bytes(1600 + n as u64, SOURCE_LEN)).unwrap();
    d
}

/// Runs the CLI, panics unless it succeeded, returns its output (stderr holds the log).
fn run_ok(args: &[&str]) -> Output {
    let out = cli(args);
    assert!(
        out.status.success(),
        "streamboot {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Reads the whole device behind `socket` through libblkio.
fn read_whole(socket: &Path) -> Vec<u8> {
    const PIECE: usize = 1 << 20;
    let mut c = Client::connect(socket, 1, PIECE).expect("connect blkio client");
    let cap = c.capacity as usize;
    let mut out = Vec::with_capacity(cap);
    let mut off = 0;
    while off < cap {
        let n = PIECE.min(cap - off);
        assert_eq!(c.read(off as u64, 0, n), 0, "read at {off}");
        out.extend_from_slice(c.buf(0..n));
        off += n;
    }
    out
}

/// Paths of the raw-image entries in `cache` (one image directory expected).
fn raw_entries(cache: &Path) -> Vec<PathBuf> {
    let images: Vec<PathBuf> = std::fs::read_dir(cache.join("raw"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(images.len(), 1, "one image directory: {images:?}");
    std::fs::read_dir(&images[0])
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap() != "identity")
        .collect()
}

/// Asserts that the committed `disk` starts with `target`, bit for bit.
fn assert_target(disk: &Path, target: &[u8]) {
    let got = std::fs::read(disk).unwrap();
    assert!(got.len() >= target.len(), "{}: too short", disk.display());
    assert!(
        sha256(&got[..target.len()]) == sha256(target),
        "{}: committed disk != target",
        disk.display()
    );
}

fn flip_last_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(path, &bytes).unwrap();
}

#[test]
fn eight_disks_served_at_once_download_the_image_once() {
    let target = target();
    let nginx = Nginx::start();
    nginx.put("target.img", &target);
    let url = nginx.url("target.img");
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let cache_s = cache.to_str().unwrap();
    let disks: Vec<PathBuf> = (0..DISKS).map(|n| source_disk(dir.path(), n)).collect();

    std::thread::scope(|s| {
        for d in &disks {
            let url = &url;
            s.spawn(move || {
                let d = d.to_str().unwrap();
                run_ok(&["prepare", d, "--target", url, "--cache", cache_s]);
            });
        }
    });
    let served: Vec<Served> = disks
        .iter()
        .enumerate()
        .map(|(n, d)| {
            let socket = dir.path().join(format!("vu{n}.sock"));
            let log = dir.path().join(format!("serve{n}.log"));
            Served::start_logged(d, &socket, Some(&log), &["--cache", cache_s])
        })
        .collect();
    let images: Vec<Vec<u8>> = std::thread::scope(|s| {
        let readers: Vec<_> = served
            .iter()
            .map(|sv| s.spawn(|| read_whole(&sv.socket)))
            .collect();
        readers.into_iter().map(|r| r.join().unwrap()).collect()
    });
    for (n, img) in images.iter().enumerate() {
        assert_eq!(img.len(), target.len(), "disk {n}: capacity");
        assert!(
            sha256(img) == sha256(&target),
            "disk {n} differs from the target; serve log: {}",
            served[n].log()
        );
    }
    let sent = nginx.bytes_sent_total();
    eprintln!("origin sent {sent} bytes for a {} byte image", target.len());
    assert!(
        sent as f64 <= 1.05 * target.len() as f64,
        "origin sent {sent} bytes for a {} byte image to {DISKS} disks",
        target.len()
    );
    // The cache is private to its user.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&cache).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
}

#[test]
fn a_flipped_byte_in_a_raw_entry_is_fetched_again() {
    let target = target();
    let nginx = Nginx::start();
    nginx.put("target.img", &target);
    let url = nginx.url("target.img");
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let cache_s = cache.to_str().unwrap();

    let first = source_disk(dir.path(), 0);
    let d = first.to_str().unwrap();
    run_ok(&["prepare", d, "--target", &url, "--cache", cache_s]);
    run_ok(&["hydrate", d, "--cache", cache_s]);
    let entries = raw_entries(&cache);
    assert_eq!(entries.len(), TARGET_LEN.div_ceil(256 << 10), "{entries:?}");
    let victim = entries.iter().find(|p| p.ends_with("5")).unwrap();
    let good = std::fs::read(victim).unwrap();
    flip_last_byte(victim);

    let before = nginx.bytes_sent_total();
    let second = source_disk(dir.path(), 1);
    let d = second.to_str().unwrap();
    // -v: warnings of offline commands are shown.
    let prep = run_ok(&["-v", "prepare", d, "--target", &url, "--cache", cache_s]);
    let hyd = run_ok(&["-v", "hydrate", d, "--cache", cache_s]);
    let log = String::from_utf8_lossy(&[prep.stderr, hyd.stderr].concat()).into_owned();
    assert!(
        log.contains("corrupt") && log.contains(victim.to_str().unwrap()),
        "no warning about the corrupt entry: {log}"
    );
    run_ok(&["confirm", d]);
    run_ok(&["commit", d, "--cache", cache_s]);
    assert_target(&second, &target);
    // Exactly that chunk came from the origin again, and its entry is whole again.
    let refetched = nginx.bytes_sent_total() - before;
    assert!(
        (256 << 10..2 * (256 << 10)).contains(&refetched),
        "origin sent {refetched} bytes for one corrupt 256 KiB entry"
    );
    assert_eq!(std::fs::read(victim).unwrap(), good);
}

/// Publishes `image` as `NAME` into a signed store; returns (store root, public key).
fn publish(dir: &Path, image: &[u8]) -> (PathBuf, String) {
    let root = dir.join("store");
    let key = dir.join("signer");
    cli_ok(&["keygen", key.to_str().unwrap()]);
    let img = dir.join("v2.img");
    std::fs::write(&img, image).unwrap();
    let (r, k) = (root.to_str().unwrap(), key.with_extension("key"));
    cli_ok(&[
        "publish",
        img.to_str().unwrap(),
        "--store",
        r,
        "--name",
        "v2",
        "--chunk-size",
        "64K",
        "--key",
        k.to_str().unwrap(),
    ]);
    (
        root,
        key.with_extension("pub").to_str().unwrap().to_string(),
    )
}

/// Chunk-object requests nginx answered.
fn chunk_requests(nginx: &Nginx) -> Vec<String> {
    let log = nginx.access_log();
    log.iter()
        .filter(|e| e.request.contains("/chunks/"))
        .map(|e| e.request.clone())
        .collect()
}

#[test]
fn a_store_target_goes_through_the_cache_and_a_flipped_byte_is_fetched_again() {
    let target = target();
    let dir = tempfile::tempdir().unwrap();
    let (root, public) = publish(dir.path(), &target);
    let nginx = Nginx::serve(&root);
    let url = nginx.url("indexes/v2.idx");
    let cache = dir.path().join("cache");
    let cache_s = cache.to_str().unwrap();
    let migrate = |n: usize| -> (PathBuf, String) {
        let disk = source_disk(dir.path(), n);
        let d = disk.to_str().unwrap();
        // -v: warnings of offline commands are shown.
        let prep = [
            "-v",
            "prepare",
            d,
            "--target",
            &url,
            "--trusted-key",
            &public,
        ];
        let prep = run_ok(&[&prep[..], &["--no-seed", "--cache", cache_s]].concat());
        let hyd = run_ok(&["-v", "hydrate", d, "--cache", cache_s]);
        run_ok(&["confirm", d]);
        run_ok(&["commit", d, "--cache", cache_s]);
        assert_target(&disk, &target);
        let log = [prep.stderr, hyd.stderr].concat();
        (disk, String::from_utf8_lossy(&log).into_owned())
    };

    migrate(0);
    let first = chunk_requests(&nginx);
    assert!(!first.is_empty());
    // Second disk: every chunk from the cache.
    migrate(1);
    assert_eq!(chunk_requests(&nginx), first, "chunks fetched again");

    // One stored chunk corrupted: detected, fetched once more, the disk still right.
    let entry = std::fs::read_dir(cache.join("store"))
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .map(|e| e.unwrap().path())
        .next()
        .unwrap();
    flip_last_byte(&entry);
    let (_, log) = migrate(2);
    assert!(log.contains("corrupt"), "no warning: {log}");
    let hex = entry.file_name().unwrap().to_str().unwrap().to_string();
    let again: Vec<String> = chunk_requests(&nginx)[first.len()..].to_vec();
    assert_eq!(again.len(), 1, "{again:?}");
    assert!(again[0].contains(&hex), "{again:?} is not {hex}");
}

#[test]
fn an_unusable_cache_directory_is_a_one_line_error_that_changes_nothing() {
    let target = target();
    let nginx = Nginx::start();
    nginx.put("target.img", &target);
    let url = nginx.url("target.img");
    let dir = tempfile::tempdir().unwrap();
    let disk = source_disk(dir.path(), 0);
    let before = sha256(&std::fs::read(&disk).unwrap());
    let d = disk.to_str().unwrap();
    let foreign = dir.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::os::unix::fs::chown(&foreign, Some(65534), None).unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    for (cache, says) in [
        (foreign.to_str().unwrap(), "is owned by uid 65534"),
        (file.to_str().unwrap(), "is not a directory"),
    ] {
        let err = common::disk::cli_err(&["prepare", d, "--target", &url, "--cache", cache]);
        assert!(err.contains(cache) && err.contains(says), "{err}");
        assert_eq!(err.matches(says).count(), 1, "said twice: {err}");
        let args = ["prepare", d, "--target", &url, "--cache", cache];
        assert_eq!(cli(&args).status.code(), Some(2), "usage error");
        // export opens its cache before anything else.
        let store = dir.path().to_str().unwrap();
        let export = [
            "export",
            "--store",
            store,
            "--insecure-unsigned",
            "--cache",
            cache,
        ];
        let out = cli(&[&export[..], &["--listen", "127.0.0.1:0"]].concat());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.trim().lines().count() == 1 && err.contains(says),
            "{err}"
        );
    }
    // A directory that cannot be created: the cause is named once.
    let blocked = file.join("sub");
    let err = common::disk::cli_err(&[
        "prepare",
        d,
        "--target",
        &url,
        "--cache",
        blocked.to_str().unwrap(),
    ]);
    assert!(err.contains("Not a directory"), "{err}");
    assert_eq!(err.matches("Not a directory").count(), 1, "{err}");
    let zero = dir.path().join("zero");
    let err = common::disk::cli_err(&[
        "prepare",
        d,
        "--target",
        &url,
        "--cache",
        zero.to_str().unwrap(),
        "--cache-size",
        "0",
    ]);
    assert!(err.contains("cache size must be more than 0"), "{err}");
    assert_eq!(
        sha256(&std::fs::read(&disk).unwrap()),
        before,
        "disk changed"
    );
}

#[test]
fn export_and_a_migration_share_the_cache() {
    let target = target();
    let dir = tempfile::tempdir().unwrap();
    let (root, public) = publish(dir.path(), &target);
    let nginx = Nginx::serve(&root);
    let cache = dir.path().join("cache");
    let cache_s = cache.to_str().unwrap();
    let store_url = nginx.url("");
    let export = |n: usize| {
        let ex = nbd_common::Export::start(&[
            "--store",
            &store_url,
            "--image",
            "v2",
            "--trusted-key",
            &public,
            "--cache",
            cache_s,
        ])
        .unwrap();
        let out = dir.path().join(format!("export{n}.raw"));
        let got = nbd_common::qemu_img_convert(&ex.url("v2"), &out);
        ex.stop();
        assert!(sha256(&got) == sha256(&target), "export {n} != target");
    };
    export(0);
    let first = chunk_requests(&nginx);
    assert!(!first.is_empty());
    // A second export process, then a whole migration: every chunk from the cache.
    export(1);
    let disk = source_disk(dir.path(), 0);
    let d = disk.to_str().unwrap();
    let url = nginx.url("indexes/v2.idx");
    let prep = ["prepare", d, "--target", &url, "--trusted-key", &public];
    run_ok(&[&prep[..], &["--no-seed", "--cache", cache_s]].concat());
    run_ok(&["hydrate", d, "--cache", cache_s]);
    run_ok(&["confirm", d]);
    run_ok(&["commit", d, "--cache", cache_s]);
    assert_target(&disk, &target);
    assert_eq!(chunk_requests(&nginx), first, "chunks fetched again");
}

/// Bytes of the entries in `cache` (raw and store).
fn entry_bytes(cache: &Path) -> u64 {
    let mut total = 0;
    for top in ["raw", "store"] {
        for d in std::fs::read_dir(cache.join(top)).unwrap() {
            for e in std::fs::read_dir(d.unwrap().path()).unwrap() {
                let e = e.unwrap();
                if e.file_name() != "identity" {
                    total += e.metadata().unwrap().len();
                }
            }
        }
    }
    total
}

#[test]
fn a_small_cap_keeps_the_cache_small_and_the_disks_right() {
    let target = target();
    let nginx = Nginx::start();
    nginx.put("target.img", &target);
    let url = nginx.url("target.img");
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let cache_s = cache.to_str().unwrap();
    let cap: u64 = 1 << 20;
    for n in 0..2 {
        let disk = source_disk(dir.path(), n);
        let d = disk.to_str().unwrap();
        let net = ["--cache", cache_s, "--cache-size", "1M"];
        run_ok(&[&["prepare", d, "--target", &url][..], &net].concat());
        run_ok(&[&["hydrate", d][..], &net].concat());
        run_ok(&["confirm", d]);
        run_ok(&[&["commit", d][..], &net].concat());
        assert_target(&disk, &target);
        // Over the cap by at most one entry between two scans.
        let held = entry_bytes(&cache);
        assert!(held <= cap + (256 << 10) + 40, "cache holds {held} bytes");
    }
}
