//! Issue 12, the rest: partition tables as they are on real disks. MBR logical partitions
//! (free space between them inside the extended partition is a gap), a source GPT checked
//! by its CRC32s (a damaged primary falls back to the backup; both damaged are refused),
//! 4096-byte logical sectors (prepare, rollback, `commit --relocate-backup-gpt`), and a
//! target MBR that must fit. Real `streamboot`, real loop devices and sfdisk.
//!
//! Needs root and loop devices (tests run as root).

mod common;
mod loopdisk;

use std::fs;
use std::os::unix::fs::FileExt;
use std::process::Command;

use common::disk::{cli, cli_err, cli_ok, sha256};
use common::random_bytes;
use loopdisk::{json, run, Disk, LoopDev, MIB};

fn poke(dev: &LoopDev, at: u64, f: impl FnOnce(u8) -> u8) {
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev.p())
        .unwrap();
    let mut b = [0u8; 1];
    file.read_exact_at(&mut b, at).unwrap();
    file.write_all_at(&[f(b[0])], at).unwrap();
    file.sync_all().unwrap();
}

/// An extended partition with two logicals and 68 MiB free between them; the primary
/// gap (1 MiB) is too small: the area goes between the logicals, rollback is bit-exact,
/// commit gives the target.
#[test]
fn mbr_free_space_between_logical_partitions_holds_the_area() {
    // Primary 1..21 MiB; extended 22..128 MiB: logical 5 at 23..33 MiB, logical 6 at
    // 101..111 MiB (ext4), free 33..101 and 111..128 MiB inside the extended partition.
    let d = Disk::new(
        128 * MIB,
        "label: dos\n\
         start=2048, size=40960, type=83\n\
         start=45056, size=217088, type=5\n\
         start=47104, size=20480, type=83\n\
         start=206848, size=20480, type=83\n",
        10 * MIB as usize,
        80,
    );
    d.mkfs(206848 * 512, 20480 * 512, &["mkfs.ext4", "-q", "-F"]);
    let dev = LoopDev::attach(&d.file);
    let before = dev.read();
    let plan = json(&d.prepare(&dev, &["--dry-run"]));
    assert!(sha256(&dev.read()) == sha256(&before), "dry run wrote");
    let r = json(&d.prepare(&dev, &[]));
    let area = r["area_offset"].as_u64().unwrap();
    assert_eq!(plan["area"]["start"], r["area_offset"], "{plan} {r}");
    assert!((33 * MIB..101 * MIB).contains(&area), "{r}");
    // Both logicals and their EBRs (at 22 and 100 MiB) are untouched while prepared.
    let now = dev.read();
    let m = MIB as usize;
    let (l5, l6) = (22 * m..33 * m, 100 * m..111 * m);
    assert!(
        now[l5.clone()] == before[l5],
        "logical 5 or its EBR changed"
    );
    assert!(
        now[l6.clone()] == before[l6],
        "logical 6 or its EBR changed"
    );
    cli_ok(&["rollback", dev.p()]);
    assert!(
        sha256(&dev.read()) == sha256(&before),
        "rollback not bit-exact"
    );
    run("sfdisk", &["--verify", dev.p()], None);
    // --area over the second EBR (at 100 MiB) is refused, naming it.
    let err = cli_err(&[
        "prepare",
        dev.p(),
        "--target",
        d.target.to_str().unwrap(),
        "--area",
        "90M..101M",
    ]);
    assert!(
        err.contains("not free space") && err.contains("extended boot record"),
        "{err}"
    );
    assert!(sha256(&dev.read()) == sha256(&before));

    d.prepare(&dev, &[]);
    cli_ok(&["confirm", dev.p()]);
    cli_ok(&["commit", dev.p()]);
    let after = dev.read();
    let t = d.target_bytes.len();
    assert!(
        after[..t] == d.target_bytes[..],
        "commit did not give the target"
    );
}

/// A broken EBR chain (a link back to itself) is refused in one line, writing nothing.
#[test]
fn mbr_ebr_chain_that_loops_is_refused() {
    let d = Disk::new(
        64 * MIB,
        "label: dos\n\
         start=2048, size=20480, type=83\n\
         start=24576, size=106496, type=5\n\
         start=26624, size=20480, type=83\n\
         start=49152, size=20480, type=83\n",
        4 * MIB as usize,
        81,
    );
    let dev = LoopDev::attach(&d.file);
    // The second EBR's link entry (entry 2) now points at the second EBR itself.
    let ebr2 = {
        let b = dev.read();
        let e = &b[24576 * 512 + 446 + 16..];
        24576 * 512 + u32::from_le_bytes(e[8..12].try_into().unwrap()) as u64 * 512
    };
    let rel = ((ebr2 - 24576 * 512) / 512) as u32;
    let f = fs::OpenOptions::new().write(true).open(dev.p()).unwrap();
    let mut link = [0u8; 16];
    link[4] = 5;
    link[8..12].copy_from_slice(&rel.to_le_bytes());
    link[12..16].copy_from_slice(&1u32.to_le_bytes());
    f.write_all_at(&link, ebr2 + 446 + 16).unwrap();
    f.sync_all().unwrap();
    let before = dev.read();
    let err = cli_err(&["prepare", dev.p(), "--target", d.target.to_str().unwrap()]);
    assert!(
        err.contains("partition table is damaged") && err.contains("loops"),
        "{err}"
    );
    assert!(sha256(&dev.read()) == sha256(&before));
}

/// The GPT layout with its free space in the middle (ESP 1..21 MiB, root 92..128 MiB).
fn middle_gpt(seed: u64) -> Disk {
    let d = Disk::new(
        128 * MIB,
        "label: gpt\n\
         start=2048, size=40960, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n\
         start=188416, size=73600, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n",
        20 * MIB as usize,
        seed,
    );
    d.mkfs(188416 * 512, 73600 * 512, &["mkfs.ext4", "-q", "-F"]);
    d
}

/// One byte of the primary entry array damaged (the root partition's first LBA now
/// points past the device): prepare reads the backup, places the area in the real gap,
/// and rollback gives back every byte, the damage included.
#[test]
fn damaged_primary_gpt_uses_the_backup_and_rollback_keeps_the_damage() {
    let d = middle_gpt(82);
    let dev = LoopDev::attach(&d.file);
    // Entry 2 at byte 1024 + 128; its first LBA at +32; bump its fourth byte.
    poke(&dev, 1024 + 128 + 32 + 3, |b| b ^ 0x10);
    let before = dev.read();
    let t = d.target.to_str().unwrap();
    // The warning: in the dry run's notes, and a log line at -v.
    let plan = json(&d.prepare(&dev, &["--dry-run"]));
    let warning = "the primary GPT is damaged (the entry array fails its CRC32): using the \
                   backup GPT at LBA 262143 (512-byte sectors)";
    assert_eq!(plan["notes"][0], warning, "{plan}");
    let out = cli(&["-v", "--json", "prepare", dev.p(), "--target", t]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stderr.contains(warning) && stderr.contains("WARN"),
        "{stderr}"
    );
    let r = json(&stdout);
    let area = r["area_offset"].as_u64().unwrap();
    assert!((21 * MIB..92 * MIB).contains(&area), "{r}");
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

/// Primary entries and backup header both damaged: refused in one line naming both,
/// nothing written.
#[test]
fn gpt_damaged_in_both_copies_is_refused() {
    let d = middle_gpt(83);
    let dev = LoopDev::attach(&d.file);
    poke(&dev, 1024 + 128 + 32 + 3, |b| b ^ 0x10);
    // The backup header's last-usable-LBA field (offset 48) at the device's last sector.
    poke(&dev, 128 * MIB - 512 + 48, |b| b ^ 0x01);
    let before = dev.read();
    for extra in [&[][..], &["--dry-run"][..]] {
        let mut args = vec!["prepare", dev.p(), "--target", d.target.to_str().unwrap()];
        args.extend_from_slice(extra);
        let err = cli_err(&args);
        assert!(
            err.contains("partition table is damaged")
                && err.contains("the primary GPT at LBA 1: the entry array fails its CRC32")
                && err.contains("the backup at LBA 262143: the header fails its CRC32"),
            "{err}"
        );
    }
    assert!(sha256(&dev.read()) == sha256(&before));
}

/// A disk file attached with 4096-byte logical sectors and partitioned (GPT or MBR) by
/// sfdisk through the loop device (so the table counts in 4 KiB sectors).
fn disk_4k(
    size: u64,
    script: &str,
    dir: &std::path::Path,
    name: &str,
) -> (std::path::PathBuf, LoopDev) {
    let file = dir.join(name);
    fs::File::create(&file).unwrap().set_len(size).unwrap();
    let dev = LoopDev::attach_with(&file, &["--sector-size", "4096"]);
    run(
        "sfdisk",
        &["--no-reread", "--no-tell-kernel", "-q", dev.p()],
        Some(script),
    );
    (file, dev)
}

/// 4096-byte sectors: prepare reads the GPT at byte 4096 (area in the middle gap,
/// rollback bit-exact); commit --relocate-backup-gpt moves the target's backup GPT to
/// the device's end in 4 KiB sectors; the table verifies.
#[test]
fn gpt_with_4096_byte_sectors_prepare_rollback_and_relocate_backup() {
    let dir = tempfile::TempDir::new().unwrap();
    // Source: ESP 1..21 MiB, root 92..128 MiB (in 4 KiB sectors).
    let (_f, dev) = disk_4k(
        128 * MIB,
        "label: gpt\n\
         start=256, size=5120, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n\
         start=23552, size=8960, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n",
        dir.path(),
        "disk.img",
    );
    {
        let f = fs::OpenOptions::new().write(true).open(dev.p()).unwrap();
        f.write_all_at(&random_bytes(84, 4 * MIB as usize), 92 * MIB)
            .unwrap();
        f.sync_all().unwrap();
    }
    // Target: a 40 MiB GPT image in 4 KiB sectors (ESP and root).
    let (tf, tdev) = disk_4k(
        40 * MIB,
        "label: gpt\n\
         start=256, size=2560, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n\
         start=2816, size=5120, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n",
        dir.path(),
        "target.img",
    );
    drop(tdev);
    let target = fs::read(&tf).unwrap();
    let tp = tf.to_str().unwrap();
    let before = dev.read();
    let r = json(&cli_ok(&["--json", "prepare", dev.p(), "--target", tp]));
    let area = r["area_offset"].as_u64().unwrap();
    assert!((40 * MIB..92 * MIB).contains(&area), "{r}");
    cli_ok(&["rollback", dev.p()]);
    assert!(
        sha256(&dev.read()) == sha256(&before),
        "rollback not bit-exact"
    );

    cli_ok(&["prepare", dev.p(), "--target", tp]);
    let r = json(&cli_ok(&[
        "--json",
        "commit",
        dev.p(),
        "--force",
        "--relocate-backup-gpt",
    ]));
    let len = 128 * MIB / 4096;
    assert_eq!(
        r["backup_gpt_moved"][0].as_u64(),
        Some(40 * MIB / 4096 - 1),
        "{r}"
    );
    assert_eq!(r["backup_gpt_moved"][1].as_u64(), Some(len - 1), "{r}");
    let after = dev.read();
    // Partitions and primary entries are the target's (only the headers changed).
    let n = 40 * MIB as usize - 5 * 4096;
    assert!(after[8192..n] == target[8192..n], "target content changed");
    let out = Command::new("sfdisk")
        .args(["--dump", dev.p()])
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&out.stdout);
    assert!(dump.contains("sector-size: 4096"), "{dump}");
    assert!(
        dump.contains("start=         256, size=        2560"),
        "{dump}"
    );
    assert!(
        dump.contains("start=        2816, size=        5120"),
        "{dump}"
    );
    assert!(dump.contains(&format!("last-lba: {}", len - 6)), "{dump}");
    let out = Command::new("sfdisk")
        .args(["--verify", dev.p()])
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && !all.contains("mismatch"), "{all}");
}

/// An MBR on a device with 4096-byte logical sectors counts in 4 KiB sectors (the
/// device's BLKSSZGET): the area goes in the real gap, never over a partition.
#[test]
fn mbr_with_4096_byte_sectors_counts_in_4k_sectors() {
    let dir = tempfile::TempDir::new().unwrap();
    // 1..21 MiB and 92..126 MiB: the gap is 21..92 MiB.
    let (_f, dev) = disk_4k(
        128 * MIB,
        "label: dos
start=256, size=5120, type=83
start=23552, size=8704, type=83
",
        dir.path(),
        "disk.img",
    );
    {
        let f = fs::OpenOptions::new().write(true).open(dev.p()).unwrap();
        f.write_all_at(&random_bytes(86, MIB as usize), 20 * MIB)
            .unwrap();
        f.write_all_at(&random_bytes(87, MIB as usize), 100 * MIB)
            .unwrap();
        f.sync_all().unwrap();
    }
    let t = dir.path().join("t.img");
    fs::write(&t, random_bytes(88, 20 * MIB as usize)).unwrap();
    let before = dev.read();
    let r = json(&cli_ok(&[
        "--json",
        "prepare",
        dev.p(),
        "--target",
        t.to_str().unwrap(),
    ]));
    let area = r["area_offset"].as_u64().unwrap();
    assert!((21 * MIB..92 * MIB).contains(&area), "{r}");
    cli_ok(&["rollback", dev.p()]);
    assert!(
        sha256(&dev.read()) == sha256(&before),
        "rollback not bit-exact"
    );
}

/// A target whose MBR partition reaches past the target image is refused before
/// anything is written, naming the partition and the byte.
#[test]
fn target_mbr_that_does_not_fit_is_refused() {
    let d = middle_gpt(85);
    let bad = d.dir.path().join("mbr-target.img");
    fs::File::create(&bad).unwrap().set_len(64 * MIB).unwrap();
    run(
        "sfdisk",
        &["--no-reread", "-q", bad.to_str().unwrap()],
        Some("label: dos\nstart=2048, size=100000, type=83\n"),
    );
    fs::OpenOptions::new()
        .write(true)
        .open(&bad)
        .unwrap()
        .set_len(20 * MIB)
        .unwrap();
    let dev = LoopDev::attach(&d.file);
    let before = dev.read();
    let err = cli_err(&["prepare", dev.p(), "--target", bad.to_str().unwrap()]);
    let end = (2048 + 100_000) * 512;
    assert!(
        err.contains(&format!(
            "the target's MBR partition 1 (type 0x83) ends at byte {end}, past the target image"
        )),
        "{err}"
    );
    assert!(sha256(&dev.read()) == sha256(&before));
}
