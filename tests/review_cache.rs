//! Hostile review of the host-wide chunk cache (`--cache DIR`, docs/cache.md) on the real
//! binary against a real nginx:
//! - an entry replaced by a FIFO, a symlink or a directory: no hang, the disk is right;
//! - a raw entry moved to another chunk index, or entries of another image put into the
//!   directory of this one (checksums consistent with their bytes): never served;
//! - a changed image at the origin (new ETag): the old entries are never served for it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::disk::sha256;
use common::nginx::Nginx;

/// Size of the raw targets: 24 cache chunks and a short one.
const TARGET_LEN: usize = (6 << 20) + 40960;
const SOURCE_LEN: usize = 8 << 20;
/// Longest a step may take before it counts as a hang.
const HANG: Duration = Duration::from_secs(60);

/// Runs the CLI; panics when it fails or does not exit within [`HANG`].
fn run_ok(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_streamboot"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run streamboot");
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > HANG {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "streamboot {args:?} hangs: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "streamboot {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn source_disk(dir: &Path, n: usize) -> PathBuf {
    let d = dir.join(format!("disk{n}.img"));
    std::fs::write(&d, common::random_bytes(2600 + n as u64, SOURCE_LEN)).unwrap();
    d
}

/// prepare, hydrate, confirm and commit `disk` to `url` through `cache`; asserts that the
/// disk then starts with `target`, bit for bit.
fn migrate(disk: &Path, url: &str, cache: &Path, target: &[u8]) {
    let (d, c) = (disk.to_str().unwrap(), cache.to_str().unwrap());
    run_ok(&["prepare", d, "--target", url, "--cache", c]);
    run_ok(&["hydrate", d, "--cache", c]);
    run_ok(&["confirm", d]);
    run_ok(&["commit", d, "--cache", c]);
    let got = std::fs::read(disk).unwrap();
    assert!(
        sha256(&got[..target.len()]) == sha256(target),
        "{}: committed disk != target",
        disk.display()
    );
}

/// The image directories below `cache/raw`.
fn image_dirs(cache: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(cache.join("raw"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    dirs.sort();
    dirs
}

/// One migration through `cache` that fills it; returns the image's directory.
fn filled(dir: &Path, nginx: &Nginx, target: &[u8], cache: &Path) -> PathBuf {
    nginx.put("target.img", target);
    migrate(
        &source_disk(dir, 0),
        &nginx.url("target.img"),
        cache,
        target,
    );
    let dirs = image_dirs(cache);
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    let n = std::fs::read_dir(&dirs[0]).unwrap().count();
    assert_eq!(n, TARGET_LEN.div_ceil(256 << 10) + 1, "entries + identity");
    dirs[0].clone()
}

#[test]
fn entries_replaced_by_a_fifo_a_symlink_or_a_directory_are_no_hang_and_not_used() {
    let target = common::random_bytes(2500, TARGET_LEN);
    let nginx = Nginx::start();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let image = filled(dir.path(), &nginx, &target, &cache);

    // A FIFO: opening it for reading would wait for a writer forever.
    let fifo = image.join("5");
    std::fs::remove_file(&fifo).unwrap();
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    // A symlink to a chunk-sized file of other bytes with a consistent header.
    let foreign = dir.path().join("foreign");
    let other = common::random_bytes(2501, 256 << 10);
    let mut entry = b"SBCRAW01".to_vec();
    entry.extend_from_slice(blake3::hash(&other).as_bytes());
    entry.extend_from_slice(&other);
    std::fs::write(&foreign, &entry).unwrap();
    std::fs::remove_file(image.join("6")).unwrap();
    std::os::unix::fs::symlink(&foreign, image.join("6")).unwrap();
    // A directory.
    std::fs::remove_file(image.join("7")).unwrap();
    std::fs::create_dir(image.join("7")).unwrap();
    std::fs::write(image.join("7").join("junk"), b"x").unwrap();
    // A huge (sparse) file.
    std::fs::File::create(image.join("8"))
        .unwrap()
        .set_len(1 << 40)
        .unwrap();

    migrate(
        &source_disk(dir.path(), 1),
        &nginx.url("target.img"),
        &cache,
        &target,
    );
    // The FIFO, the symlink and the directory were replaced by good entries; what the
    // symlink pointed to is untouched.
    for n in ["5", "6", "7", "8"] {
        assert!(std::fs::symlink_metadata(image.join(n)).unwrap().is_file());
    }
    assert_eq!(std::fs::read(&foreign).unwrap(), entry);
}

/// Every entry of the image holds a checksum consistent with its bytes, so only the key
/// (which image, which chunk) can tell a misplaced one.
#[test]
fn a_raw_entry_moved_to_another_chunk_index_is_never_served() {
    let target = common::random_bytes(2502, TARGET_LEN);
    let nginx = Nginx::start();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let image = filled(dir.path(), &nginx, &target, &cache);
    std::fs::copy(image.join("3"), image.join("9")).unwrap();

    migrate(
        &source_disk(dir.path(), 1),
        &nginx.url("target.img"),
        &cache,
        &target,
    );
}

#[test]
fn a_changed_image_at_the_origin_never_gets_the_old_entries() {
    let old = common::random_bytes(2503, TARGET_LEN);
    let nginx = Nginx::start();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let old_dir = filled(dir.path(), &nginx, &old, &cache);

    // Same name, same size, new bytes and a new ETag.
    let new = common::random_bytes(2504, TARGET_LEN);
    let later = SystemTime::now() + Duration::from_secs(10);
    nginx.replace("target.img", &new, later);
    let url = nginx.url("target.img");
    let second = source_disk(dir.path(), 1);
    migrate(&second, &url, &cache, &new);
    assert_eq!(
        image_dirs(&cache).len(),
        2,
        "a new directory for the new image"
    );

    // The old entries copied into the new image's directory (as someone renaming
    // directories, or a rewritten identity file, would do): never served either.
    let new_dir = image_dirs(&cache)
        .into_iter()
        .find(|d| *d != old_dir)
        .unwrap();
    for e in std::fs::read_dir(&old_dir).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), new_dir.join(e.file_name())).unwrap();
    }
    migrate(&source_disk(dir.path(), 2), &url, &cache, &new);
}

#[test]
fn a_full_cache_disk_or_a_one_byte_cap_never_fails_a_read() {
    let target = common::random_bytes(2505, TARGET_LEN);
    let nginx = Nginx::start();
    nginx.put("target.img", &target);
    let url = nginx.url("target.img");
    let dir = tempfile::tempdir().unwrap();

    // A 2 MiB tmpfs: the 6 MiB image does not fit.
    let cache = dir.path().join("small");
    std::fs::create_dir(&cache).unwrap();
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs"])
        .arg(&cache)
        .status()
        .unwrap();
    assert!(st.success(), "mount tmpfs");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _umount = Unmount(cache.clone());
    migrate(&source_disk(dir.path(), 0), &url, &cache, &target);
    migrate(&source_disk(dir.path(), 1), &url, &cache, &target);

    // --cache-size 1: every entry is evicted as soon as it is written.
    let tiny = dir.path().join("tiny");
    let disk = source_disk(dir.path(), 2);
    let (d, c) = (disk.to_str().unwrap(), tiny.to_str().unwrap());
    let size = ["--cache-size", "1"];
    run_ok(&[&["prepare", d, "--target", &url, "--cache", c][..], &size].concat());
    run_ok(&[&["hydrate", d, "--cache", c][..], &size].concat());
    run_ok(&["confirm", d]);
    run_ok(&[&["commit", d, "--cache", c][..], &size].concat());
    let got = std::fs::read(&disk).unwrap();
    assert!(sha256(&got[..target.len()]) == sha256(&target));
}

/// A process that stops (SIGSTOP, a frozen cgroup, stuck I/O) while it holds entry locks
/// must not stall every other process of the host wanting those chunks: here the test
/// holds the lock shards of two missing chunks, as such a process would.
#[test]
fn a_stuck_lock_holder_does_not_stall_the_others() {
    let target = common::random_bytes(2506, TARGET_LEN);
    let nginx = Nginx::start();
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let image = filled(dir.path(), &nginx, &target, &cache);
    let name = image.file_name().unwrap().to_str().unwrap().to_owned();
    let held: Vec<std::fs::File> = [10, 11]
        .iter()
        .map(|n| {
            std::fs::remove_file(image.join(n.to_string())).unwrap();
            // The shard of an entry: docs/cache.md "Layout on disk".
            let digest = blake3::hash(format!("raw/{name}/{n}").as_bytes());
            let head: [u8; 4] = digest.as_bytes()[..4].try_into().unwrap();
            let shard = u32::from_le_bytes(head) % 1024;
            let f = std::fs::File::create(cache.join("locks").join(shard.to_string())).unwrap();
            // SAFETY: `f` is an open file descriptor for the whole call.
            let r = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_EX) };
            assert_eq!(r, 0);
            f
        })
        .collect();
    migrate(
        &source_disk(dir.path(), 1),
        &nginx.url("target.img"),
        &cache,
        &target,
    );
    drop(held);
}

/// kill -9 of processes in the middle of filling the cache (holding entry locks, writing
/// temporary files), leftovers of dead writers and a torn entry: the others proceed, no
/// lock is stale, and every disk gets the target bit for bit.
#[test]
fn processes_killed_mid_fill_leave_no_stale_lock_and_no_wrong_byte() {
    let target = common::random_bytes(2507, TARGET_LEN);
    let nginx = Nginx::start();
    nginx.put("target.img", &target);
    let url = nginx.url("target.img");
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let c = cache.to_str().unwrap();
    let disks: Vec<PathBuf> = (0..4).map(|n| source_disk(dir.path(), n)).collect();
    for d in &disks {
        run_ok(&[
            "prepare",
            d.to_str().unwrap(),
            "--target",
            &url,
            "--cache",
            c,
        ]);
    }
    let image = image_dirs(&cache)[0].clone();
    // A dead writer's temporary file and a torn entry (a prefix of a real one).
    std::fs::write(image.join(".tmp-999999-1-0"), b"SBCRAW02 half").unwrap();
    let torn = std::fs::read(image.join("0")).unwrap();
    std::fs::write(image.join("20"), &torn[..1000]).unwrap();

    let mut kids: Vec<std::process::Child> = disks
        .iter()
        .map(|d| {
            Command::new(env!("CARGO_BIN_EXE_streamboot"))
                .args(["hydrate", d.to_str().unwrap(), "--cache", c])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(30));
    for k in &mut kids[..2] {
        k.kill().unwrap(); // SIGKILL
    }
    for k in &mut kids {
        k.wait().unwrap();
    }
    for d in &disks {
        let d = d.to_str().unwrap();
        run_ok(&["hydrate", d, "--cache", c]);
        run_ok(&["confirm", d]);
        run_ok(&["commit", d, "--cache", c]);
    }
    for d in &disks {
        let got = std::fs::read(d).unwrap();
        assert!(
            sha256(&got[..target.len()]) == sha256(&target),
            "{}",
            d.display()
        );
    }
}

/// The cache directory is ours, but a subdirectory belongs to another user (or is a
/// symlink to somewhere else): that user could write entries. Refused like a foreign
/// cache directory, nothing changed on the disk.
#[test]
fn a_cache_subdirectory_of_another_user_or_a_symlink_is_refused() {
    let target = common::random_bytes(2508, TARGET_LEN);
    let nginx = Nginx::start();
    nginx.put("target.img", &target);
    let url = nginx.url("target.img");
    let dir = tempfile::tempdir().unwrap();
    let disk = source_disk(dir.path(), 0);
    let before = sha256(&std::fs::read(&disk).unwrap());
    let d = disk.to_str().unwrap();
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    for (n, sub) in ["raw", "store", "locks"].iter().enumerate() {
        let cache = dir.path().join(format!("cache{n}"));
        std::fs::create_dir(&cache).unwrap();
        std::fs::create_dir(cache.join(sub)).unwrap();
        std::os::unix::fs::chown(cache.join(sub), Some(65534), None).unwrap();
        let c = cache.to_str().unwrap();
        let err = common::disk::cli_err(&["prepare", d, "--target", &url, "--cache", c]);
        assert!(
            err.contains("is owned by uid 65534") && err.contains(sub),
            "{err}"
        );

        let linked = dir.path().join(format!("linked{n}"));
        std::fs::create_dir(&linked).unwrap();
        std::os::unix::fs::symlink(&elsewhere, linked.join(sub)).unwrap();
        let c = linked.to_str().unwrap();
        let err = common::disk::cli_err(&["prepare", d, "--target", &url, "--cache", c]);
        assert!(
            err.contains("is not a directory") && err.contains(sub),
            "{err}"
        );
    }
    assert_eq!(
        sha256(&std::fs::read(&disk).unwrap()),
        before,
        "disk changed"
    );
}

/// A process stuck while it holds the directory-wide eviction lock `.lock` must not stall
/// the others (eviction runs when a cache is opened and on the read path).
#[test]
fn a_stuck_eviction_does_not_stall_the_others() {
    let target = common::random_bytes(2509, TARGET_LEN);
    let nginx = Nginx::start();
    nginx.put("target.img", &target);
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    let f = std::fs::File::create(cache.join(".lock")).unwrap();
    // SAFETY: `f` is an open file descriptor for the whole call.
    let r = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_EX) };
    assert_eq!(r, 0);
    let disk = source_disk(dir.path(), 0);
    let (d, c) = (disk.to_str().unwrap(), cache.to_str().unwrap());
    // A cap of 1 MiB: every few entries written start a scan.
    let size = ["--cache-size", "1M"];
    let url = nginx.url("target.img");
    run_ok(&[&["prepare", d, "--target", &url, "--cache", c][..], &size].concat());
    run_ok(&[&["hydrate", d, "--cache", c][..], &size].concat());
    run_ok(&["confirm", d]);
    run_ok(&[&["commit", d, "--cache", c][..], &size].concat());
    let got = std::fs::read(&disk).unwrap();
    assert!(sha256(&got[..target.len()]) == sha256(&target));
    drop(f);
}
