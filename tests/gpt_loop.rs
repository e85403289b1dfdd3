//! Issue 12: `prepare` on the disks people have. A block device (real loop device) with a
//! GPT or MBR partition table gets its released area in a free gap (after the last
//! partition or between partitions); the superblocks overwrite the device's last 8 KiB
//! (the end of a backup GPT), which are saved first. prepare → commit gives the target;
//! prepare → rollback gives the whole device back byte for byte, backup GPT included.
//! Real `streamboot` binary, real sfdisk, mkfs.vfat and mkfs.ext4.
//!
//! Needs root and loop devices (tests run as root).

mod common;
mod loopdisk;

use std::fs;
use std::process::Command;

use common::disk::{cli_err, cli_ok, sha256};
use common::random_bytes;
use loopdisk::{json, run, Disk, LoopDev, MIB};
use tempfile::TempDir;

/// The cloud-style GPT source: BIOS boot, ESP (FAT), ext4 root; free space after it.
fn cloud_gpt(seed: u64) -> Disk {
    let d = Disk::new(
        128 * MIB,
        "label: gpt\n\
         start=2048, size=2048, type=21686148-6449-6E6F-744E-656564454649\n\
         start=4096, size=40960, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n\
         start=45056, size=57344, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n",
        40 * MIB as usize + 4096,
        seed,
    );
    d.mkfs(4096 * 512, 40960 * 512, &["mkfs.vfat", "-F", "32"]);
    d.mkfs(45056 * 512, 57344 * 512, &["mkfs.ext4", "-q", "-F"]);
    d
}

#[test]
fn gpt_cloud_source_rollback_is_bit_exact_and_commit_gives_the_target() {
    let d = cloud_gpt(70);
    let dev = LoopDev::attach(&d.file);
    let before = dev.read();
    // --dry-run --json: the plan, as stable JSON, and nothing written.
    let plan = json(&d.prepare(&dev, &["--dry-run"]));
    assert!(sha256(&dev.read()) == sha256(&before), "dry run wrote");
    let mut keys: Vec<&str> = plan
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "area",
            "area_zeroed_on_rollback",
            "boot_chunks",
            "boot_ranges",
            "chunk_size",
            "disk",
            "disk_len",
            "dry_run",
            "notes",
            "ok",
            "saved_ranges",
            "slot_count",
            "source_size",
            "target_size"
        ],
        "{plan}"
    );
    let len = before.len() as u64;
    assert_eq!(plan["dry_run"], true);
    assert_eq!(plan["disk_len"].as_u64(), Some(len));
    assert_eq!(plan["source_size"].as_u64(), Some(len));
    assert_eq!(
        plan["saved_ranges"][0]["from"]["start"].as_u64(),
        Some(len - 8192)
    );
    assert_eq!(plan["saved_ranges"][0]["from"]["end"].as_u64(), Some(len));
    assert_eq!(plan["area_zeroed_on_rollback"], true);
    // The boot set: the first MiB and the ESP of the target's table (none here: random).
    assert_eq!(plan["boot_ranges"][0]["start"].as_u64(), Some(0));
    let r = json(&d.prepare(&dev, &[]));
    assert_eq!(plan["area"]["start"], r["area_offset"], "{plan} {r}");
    assert_eq!(plan["saved_ranges"][0]["to"], r["area_offset"]);
    // The area is in the free space after the root partition (ends at 50 MiB).
    let area = r["area_offset"].as_u64().unwrap();
    assert!((50 * MIB..128 * MIB).contains(&area), "{r}");
    let st = json(&cli_ok(&["--json", "status", dev.p()]));
    assert_eq!(st["status"]["state"], "prepared", "{st}");
    cli_ok(&["rollback", dev.p()]);
    let after = dev.read();
    assert!(
        sha256(&after) == sha256(&before),
        "rollback is not bit-exact (backup GPT included)"
    );
    run("sfdisk", &["--verify", dev.p()], None);

    // prepare stopped right after saving the last 8 KiB (a kill, a power cut): its copy
    // at the area's start is no obstacle, and rollback still gives the device back.
    {
        let f = fs::OpenOptions::new().write(true).open(dev.p()).unwrap();
        let tail = &before[before.len() - 8192..];
        std::os::unix::fs::FileExt::write_all_at(&f, tail, area).unwrap();
        f.sync_all().unwrap();
    }
    let r2 = json(&d.prepare(&dev, &[]));
    assert_eq!(r2["area_offset"], r["area_offset"], "{r2}");
    cli_ok(&["rollback", dev.p()]);
    assert!(
        sha256(&dev.read()) == sha256(&before),
        "rollback after a stopped prepare"
    );

    d.prepare(&dev, &[]);
    cli_ok(&["confirm", dev.p()]);
    cli_ok(&["commit", dev.p()]);
    let after = dev.read();
    let t = d.target_bytes.len();
    assert!(
        after[..t] == d.target_bytes[..],
        "commit did not give the target"
    );
    let st = json(&cli_ok(&["--json", "status", dev.p()]));
    assert_eq!(st["prepared"], false, "{st}");
}

#[test]
fn gpt_with_the_free_space_in_the_middle() {
    // Root at the end of the disk: the only gap is between ESP and root.
    let d = Disk::new(
        128 * MIB,
        "label: gpt\n\
         start=2048, size=40960, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n\
         start=188416, size=73600, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n",
        20 * MIB as usize,
        71,
    );
    d.mkfs(188416 * 512, 73600 * 512, &["mkfs.ext4", "-q", "-F"]);
    let dev = LoopDev::attach(&d.file);
    let before = dev.read();
    let r = json(&d.prepare(&dev, &[]));
    let area = r["area_offset"].as_u64().unwrap();
    assert!((21 * MIB..92 * MIB).contains(&area), "{r}");
    // The root partition is untouched while prepared.
    let now = dev.read();
    let root = 188416 * 512..(188416 + 73600) * 512;
    assert!(
        now[root.clone()] == before[root],
        "the root partition changed"
    );
    cli_ok(&["rollback", dev.p()]);
    assert!(
        sha256(&dev.read()) == sha256(&before),
        "rollback not bit-exact"
    );
}

#[test]
fn mbr_with_an_extended_partition_and_a_gap_between_partitions() {
    // Primary 1 at 1 MiB (20 MiB), a gap of 60 MiB, extended 84..128 MiB with two logicals.
    let d = Disk::new(
        128 * MIB,
        "label: dos\n\
         start=2048, size=40960, type=83\n\
         start=172032, size=90112, type=5\n\
         start=174080, size=20480, type=83\n\
         start=196608, size=20480, type=83\n",
        10 * MIB as usize,
        72,
    );
    let dev = LoopDev::attach(&d.file);
    let before = dev.read();
    let r = json(&d.prepare(&dev, &[]));
    let area = r["area_offset"].as_u64().unwrap();
    assert!((21 * MIB..84 * MIB).contains(&area), "{r}");
    cli_ok(&["rollback", dev.p()]);
    assert!(
        sha256(&dev.read()) == sha256(&before),
        "rollback not bit-exact"
    );
    // The area can be given; one overlapping a partition is refused, changing nothing.
    let err = cli_err(&[
        "prepare",
        dev.p(),
        "--target",
        d.target.to_str().unwrap(),
        "--area",
        "80M..90M",
    ]);
    assert!(err.contains("not free space"), "{err}");
    assert!(sha256(&dev.read()) == sha256(&before));
    let r = json(&d.prepare(&dev, &["--area", "30M..60M"]));
    assert_eq!(r["area_offset"].as_u64(), Some(30 * MIB), "{r}");
    cli_ok(&["rollback", dev.p()]);
    assert!(
        sha256(&dev.read()) == sha256(&before),
        "rollback not bit-exact"
    );
}

#[test]
fn refusals_with_numbers_and_free_space_that_holds_data() {
    // Partitions fill the disk but for 2 MiB: no room for a 20 MiB target's area.
    let d = Disk::new(
        64 * MIB,
        "label: gpt\nstart=2048, size=126976, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n",
        20 * MIB as usize,
        73,
    );
    let dev = LoopDev::attach(&d.file);
    let before = dev.read();
    let t = d.target.to_str().unwrap();
    for dry in [&[][..], &["--dry-run"][..]] {
        let mut args = vec!["prepare", dev.p(), "--target", t];
        args.extend_from_slice(dry);
        let err = cli_err(&args);
        assert!(
            err.contains("no free space large enough") && err.contains("bytes are needed"),
            "{err}"
        );
    }
    assert!(sha256(&dev.read()) == sha256(&before));
    drop(dev);

    // Free space holding data: refused unless --discard-free-space; then rollback gives
    // everything back but the area, which reads as zeros.
    let d = cloud_gpt(74);
    {
        let f = fs::OpenOptions::new().write(true).open(&d.file).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"old data", 100 * MIB).unwrap();
    }
    let dev = LoopDev::attach(&d.file);
    let before = dev.read();
    let t = d.target.to_str().unwrap();
    let err = cli_err(&["prepare", dev.p(), "--target", t]);
    assert!(err.contains("--discard-free-space"), "{err}");
    assert!(sha256(&dev.read()) == sha256(&before));
    d.prepare(&dev, &["--discard-free-space"]);
    cli_ok(&["rollback", dev.p()]);
    let mut want = before.clone();
    want[100 * MIB as usize..100 * MIB as usize + 8].fill(0);
    assert!(
        sha256(&dev.read()) == sha256(&want),
        "rollback after discard"
    );

    drop(dev);

    // A target whose GPT claims more than the target image (a 64 MiB table on a
    // 40 MiB image) is refused before anything is written.
    let d = cloud_gpt(75);
    let bad = d.dir.path().join("bad-target.img");
    fs::File::create(&bad).unwrap().set_len(64 * MIB).unwrap();
    run(
        "sfdisk",
        &["--no-reread", "-q", bad.to_str().unwrap()],
        Some("label: gpt\nstart=2048, size=100000, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n"),
    );
    fs::OpenOptions::new()
        .write(true)
        .open(&bad)
        .unwrap()
        .set_len(40 * MIB)
        .unwrap();
    let dev = LoopDev::attach(&d.file);
    let before = dev.read();
    let err = cli_err(&["prepare", dev.p(), "--target", bad.to_str().unwrap()]);
    assert!(err.contains("its partition table does not fit"), "{err}");
    assert!(sha256(&dev.read()) == sha256(&before));
}

/// `commit --relocate-backup-gpt`: the target's backup GPT moves from the end of the
/// target image to the end of the device; the table verifies and every partition is kept.
#[test]
fn commit_relocates_the_targets_backup_gpt_on_request() {
    let d = cloud_gpt(76);
    // The target: a GPT image of 40 MiB with an ESP and a root partition.
    let t = d.dir.path().join("gpt-target.img");
    fs::File::create(&t).unwrap().set_len(40 * MIB).unwrap();
    run(
        "sfdisk",
        &["--no-reread", "-q", t.to_str().unwrap()],
        Some(
            "label: gpt\n\
             start=2048, size=20480, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n\
             start=22528, size=40960, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n",
        ),
    );
    let target = fs::read(&t).unwrap();
    let dev = LoopDev::attach(&d.file);
    let tp = t.to_str().unwrap();
    cli_ok(&["prepare", dev.p(), "--target", tp]);
    let err = cli_err(&[
        "commit",
        dev.p(),
        "--relocate-backup-gpt",
        "--control",
        "/nonexistent",
    ]);
    assert!(err.contains("cannot be used with"), "{err}");
    let r = json(&cli_ok(&[
        "--json",
        "commit",
        dev.p(),
        "--force",
        "--relocate-backup-gpt",
    ]));
    let len = 128 * MIB / 512;
    assert_eq!(
        r["backup_gpt_moved"][0].as_u64(),
        Some(40 * MIB / 512 - 1),
        "{r}"
    );
    assert_eq!(r["backup_gpt_moved"][1].as_u64(), Some(len - 1), "{r}");
    run("sfdisk", &["--verify", dev.p()], None);
    let after = dev.read();
    // The partitions and the primary entries are the target's (the header changed).
    let n = 40 * MIB as usize - 33 * 512;
    assert!(after[1024..n] == target[1024..n], "target content changed");
    let out = Command::new("sfdisk")
        .args(["--dump", dev.p()])
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&out.stdout);
    assert!(
        dump.contains("start=        2048, size=       20480"),
        "{dump}"
    );
    assert!(
        dump.contains("start=       22528, size=       40960"),
        "{dump}"
    );
    assert!(dump.contains(&format!("last-lba: {}", len - 34)), "{dump}");
    let out = Command::new("sfdisk")
        .args(["--verify", dev.p()])
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!all.contains("mismatch"), "{all}");
}

/// `--area` / `--discard-free-space` on a regular file (its area follows the file) are
/// refused, writing nothing.
#[test]
fn area_options_on_a_regular_file_are_refused() {
    let dir = TempDir::new().unwrap();
    let disk = dir.path().join("disk.img");
    let src = random_bytes(77, 3 * MIB as usize);
    fs::write(&disk, &src).unwrap();
    let t = dir.path().join("t.img");
    fs::write(&t, random_bytes(78, 2 * MIB as usize)).unwrap();
    for extra in [&["--area", "4M..8M"][..], &["--discard-free-space"][..]] {
        let mut args = vec![
            "prepare",
            disk.to_str().unwrap(),
            "--target",
            t.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let err = cli_err(&args);
        assert!(err.contains("apply to a block device"), "{err}");
        assert!(fs::read(&disk).unwrap() == src, "the file changed");
    }
}
