//! DISK as a real block device: a loop device over a temporary file, driven through the
//! `streamboot` binary with the target served by a real nginx.
//!
//! On a block device the released area is a free gap of its partition table (here: after
//! the last partition; `tests/gpt_loop.rs` has the other layouts) or the space after
//! `--source-size`; nothing is ever truncated; commit wipes the superblocks in the
//! device's last 8 KiB, rollback writes back what they overwrote.
//!
//! Needs root and loop devices. Without them each test prints a `SKIP:` line and passes,
//! unless `STREAMBOOT_REQUIRE_LOOP` is set, which turns the skip into a failure (set it
//! where loop devices are expected, such as CI, so that a lost capability cannot pass
//! silently).

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::disk::{cli_err, cli_ok, sha256};
use common::nginx::Nginx;
use common::random_bytes;
use tempfile::TempDir;

const MIB: usize = 1 << 20;

/// A loop device attached to a file; detached on drop.
struct LoopDev {
    dev: PathBuf,
}

impl LoopDev {
    /// Attaches `file` to a free loop device, or returns `None` after printing why loop
    /// devices cannot be used here (panics instead when `STREAMBOOT_REQUIRE_LOOP` is set).
    fn attach(file: &Path) -> Option<LoopDev> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return skip("loop devices need root");
        }
        if !Path::new("/dev/loop-control").exists() {
            return skip("no /dev/loop-control (loop driver not available)");
        }
        // Several tests (and other processes) attach at once: `--find` can race.
        let mut last = String::new();
        for attempt in 0..10 {
            let out = match Command::new("losetup")
                .arg("--find")
                .arg("--show")
                .arg(file)
                .output()
            {
                Ok(out) => out,
                Err(e) => return skip(&format!("cannot run losetup: {e}")),
            };
            if out.status.success() {
                let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
                assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
                return Some(LoopDev { dev: dev.into() });
            }
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            std::thread::sleep(Duration::from_millis(50 * (attempt + 1)));
        }
        panic!("losetup --find --show {} failed: {last}", file.display());
    }

    fn path(&self) -> &str {
        self.dev.to_str().expect("utf-8 device path")
    }

    /// The whole device, read through the device itself.
    fn read(&self) -> Vec<u8> {
        let mut data = Vec::new();
        File::open(&self.dev)
            .and_then(|mut f| f.read_to_end(&mut data))
            .unwrap_or_else(|e| panic!("reading {}: {e}", self.path()));
        data
    }

    /// Writes `data` at `offset` of the device and syncs.
    fn write_at(&self, offset: u64, data: &[u8]) {
        let f = OpenOptions::new().write(true).open(&self.dev).unwrap();
        f.write_all_at(data, offset).unwrap();
        f.sync_all().unwrap();
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        match Command::new("losetup").arg("-d").arg(&self.dev).status() {
            Ok(s) if s.success() => {}
            other => eprintln!("warning: losetup -d {} failed: {other:?}", self.path()),
        }
    }
}

fn skip(why: &str) -> Option<LoopDev> {
    if std::env::var_os("STREAMBOOT_REQUIRE_LOOP").is_some() {
        panic!("loop devices required (STREAMBOOT_REQUIRE_LOOP is set) but: {why}");
    }
    // Straight to the stderr handle: the test harness captures `eprintln!` of passing
    // tests, and a skip must be visible.
    let _ = writeln!(std::io::stderr(), "SKIP: block device test: {why}");
    None
}

/// Writes an MBR with one Linux partition of sectors `[start, end)` into `img`.
fn write_mbr(img: &mut [u8], start: u32, end: u32) {
    img[446..510].fill(0);
    let e = &mut img[446..462];
    e[4] = 0x83;
    e[8..12].copy_from_slice(&start.to_le_bytes());
    e[12..16].copy_from_slice(&(end - start).to_le_bytes());
    img[510] = 0x55;
    img[511] = 0xAA;
}

/// A loop device holding `original`, and nginx serving `target.img`.
/// Field order matters: the device is detached before its backing file is removed.
struct Fixture {
    lo: LoopDev,
    nginx: Nginx,
    original: Vec<u8>,
    target: Vec<u8>,
    _dir: TempDir,
}

impl Fixture {
    /// A device of `dev_len` random bytes; with `part_end`, an MBR whose only partition
    /// runs from sector 2048 to byte `part_end` (a multiple of 512), else no partition
    /// table at all.
    fn new(seed: u64, dev_len: usize, part_end: Option<usize>, target_len: usize) -> Option<Self> {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut original = random_bytes(seed, dev_len);
        match part_end {
            Some(end) => {
                assert_eq!(end % 512, 0);
                write_mbr(&mut original, 2048, (end / 512) as u32);
                // Free space reads as zeros (else prepare wants --discard-free-space).
                original[end..].fill(0);
            }
            None => original[510..512].fill(0),
        }
        let backing = dir.path().join("device.img");
        fs::write(&backing, &original).expect("write backing file");
        let lo = LoopDev::attach(&backing)?;
        assert_eq!(lo.read().len(), dev_len, "loop device size");
        let nginx = Nginx::start();
        let target = random_bytes(seed ^ 0x5eed, target_len);
        nginx.put("target.img", &target);
        Some(Fixture {
            lo,
            nginx,
            original,
            target,
            _dir: dir,
        })
    }

    fn dev(&self) -> &str {
        self.lo.path()
    }

    fn url(&self) -> String {
        self.nginx.url("target.img")
    }

    /// `streamboot --json prepare DEV --target URL extra...`; returns the area offset.
    fn prepare(&self, extra: &[&str]) -> u64 {
        let url = self.url();
        let mut args = vec!["--json", "prepare", self.dev(), "--target", &url];
        args.extend_from_slice(extra);
        let out: serde_json::Value = serde_json::from_str(&cli_ok(&args)).expect("json");
        assert_eq!(out["ok"], true, "{out}");
        assert_eq!(
            out["disk_len"].as_u64(),
            Some(self.original.len() as u64),
            "a block device keeps its size: {out}"
        );
        out["area_offset"].as_u64().expect("area_offset")
    }

    /// The `status` object of a prepared device.
    fn status_json(&self) -> serde_json::Value {
        let out: serde_json::Value =
            serde_json::from_str(&cli_ok(&["--json", "status", self.dev()])).expect("json");
        assert_eq!(out["prepared"], true, "{out}");
        out["status"].clone()
    }

    /// Asserts the device is a plain disk again: status says so and both superblock
    /// blocks at the end are zero.
    fn assert_plain(&self) {
        let out = cli_ok(&["status", self.dev()]);
        assert!(out.contains("plain disk (not prepared)"), "{out}");
        let d = self.lo.read();
        assert!(
            d[d.len() - 8192..].iter().all(|&b| b == 0),
            "superblocks not wiped"
        );
    }

    /// Asserts the device starts with the target image.
    fn assert_target_home(&self) {
        let d = self.lo.read();
        assert_eq!(
            sha256(&d[..self.target.len()]),
            sha256(&self.target),
            "first {} bytes of the device are not the target",
            self.target.len()
        );
    }

    /// Asserts the device starts with the original source's first `n` bytes.
    fn assert_source_home(&self, n: usize) {
        let d = self.lo.read();
        assert_eq!(
            sha256(&d[..n]),
            sha256(&self.original[..n]),
            "first {n} bytes of the device are not the source"
        );
    }

    /// Runs `args`, which must fail with a one-line error containing every phrase and
    /// leave the whole device byte-identical.
    fn refuses(&self, args: &[&str], phrases: &[&str]) -> String {
        let before = sha256(&self.lo.read());
        let err = cli_err(args);
        for p in phrases {
            assert!(
                err.contains(p),
                "streamboot {args:?}: expected {p:?} in the error, got: {err}"
            );
        }
        assert_eq!(
            sha256(&self.lo.read()),
            before,
            "streamboot {args:?} failed but changed the device"
        );
        err
    }
}

/// (a) prepare → hydrate → commit on a partitioned device: the device begins with the
/// target and the area is gone.
fn commit_on_partitioned_device(seed: u64, chunk: &str, part_end: usize, target_len: usize) {
    let Some(f) = Fixture::new(seed, 24 * MIB, Some(part_end), target_len) else {
        return;
    };
    let area = f.prepare(&["--chunk-size", chunk]);
    assert_eq!(
        area,
        (part_end.max(target_len) as u64).next_multiple_of(MIB as u64),
        "area must start after the partition and the target"
    );
    let s = f.status_json();
    assert_eq!(
        s["source_size"].as_u64(),
        Some(24 * MIB as u64),
        "the source is the whole device (rollback restores all of it): {s}"
    );
    assert_eq!(s["target_size"].as_u64(), Some(target_len as u64));
    let out = cli_ok(&["hydrate", f.dev()]);
    assert!(out.contains("0 chunks still missing"), "{out}");
    cli_ok(&["confirm", f.dev()]);
    let out = cli_ok(&["commit", f.dev()]);
    assert!(out.contains("now holds the target"), "{out}");
    f.assert_target_home();
    f.assert_plain();
}

#[test]
fn commit_on_partitioned_device_target_larger_64k_chunks() {
    commit_on_partitioned_device(1, "64K", 5 * MIB + 1536, 7 * MIB + 1234);
}

#[test]
fn commit_on_partitioned_device_target_smaller_4k_chunks() {
    commit_on_partitioned_device(2, "4K", 5 * MIB + 1536, 3 * MIB + 777);
}

/// (b) prepare → partial hydrate → rollback: the partitioned part of the device is the
/// source again. The area is capped so that hydration stops with chunks still missing.
#[test]
fn rollback_after_partial_hydrate_on_partitioned_device_64k_chunks() {
    let part_end = 5 * MIB + 1536;
    let Some(f) = Fixture::new(3, 24 * MIB, Some(part_end), 7 * MIB + 1234) else {
        return;
    };
    f.prepare(&["--chunk-size", "64K", "--area-size", "3M"]);
    let out = cli_ok(&["hydrate", f.dev()]);
    assert!(out.contains("released area is full"), "{out}");
    let s = f.status_json();
    let missing = s["chunks_missing"].as_u64().unwrap();
    let slotted = s["chunks_slotted"].as_u64().unwrap();
    assert!(
        missing > 0 && slotted > 0,
        "hydration should be partial: {s}"
    );
    let out = cli_ok(&["rollback", f.dev()]);
    assert!(out.contains("holds the source again"), "{out}");
    f.assert_source_home(part_end);
    f.assert_plain();
}

#[test]
fn rollback_without_hydrate_on_partitioned_device_4k_chunks() {
    let part_end = 5 * MIB + 1536;
    let Some(f) = Fixture::new(4, 24 * MIB, Some(part_end), 3 * MIB + 777) else {
        return;
    };
    f.prepare(&["--chunk-size", "4K"]);
    // The boot set moved: the device does not hold the source right now.
    assert_ne!(
        sha256(&f.lo.read()[..part_end]),
        sha256(&f.original[..part_end])
    );
    cli_ok(&["confirm", f.dev()]);
    let out = cli_ok(&["rollback", f.dev()]);
    assert!(
        out.contains("writes made while the target ran were discarded"),
        "{out}"
    );
    f.assert_source_home(part_end);
    f.assert_plain();
}

/// (c) No partition table: the source size must be given; with it both ways work.
#[test]
fn device_without_partition_table_needs_source_size() {
    let Some(f) = Fixture::new(5, 16 * MIB, None, 5 * MIB + 99) else {
        return;
    };
    let url = f.url();
    f.refuses(
        &["prepare", f.dev(), "--target", &url, "--chunk-size", "4K"],
        &["block device has no partition table", "--source-size"],
    );
    let source_size = 3 * MIB + 512;
    let ss = source_size.to_string();
    let area = f.prepare(&["--chunk-size", "4K", "--source-size", &ss]);
    assert_eq!(area, 6 * MIB as u64);
    assert_eq!(
        f.status_json()["source_size"].as_u64(),
        Some(source_size as u64)
    );
    cli_ok(&["rollback", f.dev()]);
    f.assert_source_home(source_size);
    f.assert_plain();
    // Again, and commit without hydrating first: commit fetches the rest straight home.
    f.prepare(&["--chunk-size", "64K", "--source-size", &ss]);
    cli_ok(&["commit", "--force", f.dev()]);
    f.assert_target_home();
    f.assert_plain();
}

/// (d) No room after the images for the area, or a target larger than the device.
#[test]
fn device_too_small_for_target_and_area() {
    let part_end = MIB + 512;
    let dev_len = 4 * MIB;
    let Some(mut f) = Fixture::new(6, dev_len, Some(part_end), 3 * MIB + MIB / 2 + 3) else {
        return;
    };
    let url = f.url();
    let device_has = format!("the device has {dev_len} bytes");
    for chunk in ["4K", "64K"] {
        f.refuses(
            &["prepare", f.dev(), "--target", &url, "--chunk-size", chunk],
            &["disk too small", &device_has],
        );
    }
    // A target larger than the whole device.
    f.target = random_bytes(66, 6 * MIB + 5);
    f.nginx.put("target.img", &f.target);
    f.refuses(
        &["prepare", f.dev(), "--target", &url],
        &["disk too small", &device_has],
    );
    // A target that leaves room for the area is accepted on the same device.
    f.target = random_bytes(67, MIB + MIB / 2 + 5);
    f.nginx.put("target.img", &f.target);
    f.prepare(&["--chunk-size", "4K"]);
    cli_ok(&["commit", "--force", f.dev()]);
    f.assert_target_home();
    f.assert_plain();
}

/// (e) A source size that cuts into the partition table's ranges, or exceeds the device.
#[test]
fn source_size_smaller_than_the_partition_end_is_refused() {
    let part_end = 5 * MIB + 1536;
    let dev_len = 16 * MIB;
    let Some(mut f) = Fixture::new(7, dev_len, Some(part_end), 4 * MIB + 4097) else {
        return;
    };
    let url = f.url();
    let dev = f.dev().to_string();
    let prep = |ss: &str| -> Vec<String> {
        ["prepare", &dev, "--target", &url, "--source-size", ss]
            .map(String::from)
            .to_vec()
    };
    let refuses = |args: Vec<String>, phrases: &[&str]| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        f.refuses(&args, phrases);
    };
    refuses(
        prep("4M"),
        &[
            "refusing to prepare",
            "MBR partition 1",
            &format!("ends at byte {part_end}"),
        ],
    );
    refuses(prep(&(part_end - 512).to_string()), &["MBR partition 1"]);
    refuses(
        prep("17M"),
        &["--source-size 17825792 is larger than the device"],
    );
    // A partition table that reaches past the end of the device (an image written to a
    // smaller device) names the partition, not a --source-size nobody passed.
    let mut mbr = f.original[..512].to_vec();
    write_mbr(&mut mbr, 2048, (20 * MIB / 512) as u32);
    f.lo.write_at(0, &mbr);
    f.original[..512].copy_from_slice(&mbr);
    let err = f.refuses(
        &["prepare", f.dev(), "--target", &url],
        &[
            "MBR partition 1",
            &format!("ends at byte {}", 20 * MIB),
            "past the end of the device",
        ],
    );
    assert!(!err.contains("--source-size"), "{err}");
    // Back to the real table: the exact partition end is accepted.
    write_mbr(&mut mbr, 2048, (part_end / 512) as u32);
    f.lo.write_at(0, &mbr);
    f.original[..512].copy_from_slice(&mbr);
    f.prepare(&["--chunk-size", "4K", "--source-size", &part_end.to_string()]);
    cli_ok(&["rollback", f.dev()]);
    f.assert_source_home(part_end);
    f.assert_plain();
}
