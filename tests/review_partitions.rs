//! Hostile review of issue 12's partition-table reading: entries that Linux and
//! sfdisk count as partitions must never be taken as free space for the released area.
//! Real `streamboot`, real loop devices and sfdisk.
//!
//! Needs root and loop devices (tests run as root).

mod common;
mod loopdisk;

use std::fs;
use std::os::unix::fs::FileExt;

use common::disk::{cli_err, sha256};
use loopdisk::{json, Disk, LoopDev, MIB};

/// CRC32 (IEEE), as GPT uses.
fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn write_at(path: &std::path::Path, at: u64, bytes: &[u8]) {
    let f = fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
    f.sync_all().unwrap();
}

/// An MBR entry of type 0x00 with a size is a partition to Linux (msdos.c skips only
/// entries without a size) and to sfdisk: its bytes are not free space, even with
/// --discard-free-space (which gives up free space, not partitions).
#[test]
fn mbr_entry_of_type_zero_with_a_size_is_not_free_space() {
    // Partition 1 at 1..11 MiB, partition 2 at 20..40 MiB (data), then set to type 0.
    let d = Disk::new(
        64 * MIB,
        "label: dos\n\
         start=2048, size=20480, type=83\n\
         start=40960, size=40960, type=83\n",
        4 * MIB as usize,
        120,
    );
    write_at(&d.file, 446 + 16 + 4, &[0]);
    write_at(&d.file, 20 * MIB + 4096, &[0x5A; 4096]);
    let dev = LoopDev::attach(&d.file);
    let before = dev.read();
    let plan = json(&d.prepare(&dev, &["--dry-run", "--discard-free-space"]));
    let (start, end) = (
        plan["area"]["start"].as_u64().unwrap(),
        plan["area"]["end"].as_u64().unwrap(),
    );
    assert!(
        start >= 40 * MIB || end <= 20 * MIB,
        "the area {start}..{end} overwrites MBR partition 2 (type 0x00, 20..40 MiB): {plan}"
    );
    // Asked for explicitly: refused, naming it.
    let err = cli_err(&[
        "prepare",
        dev.p(),
        "--target",
        d.target.to_str().unwrap(),
        "--area",
        "24M..30M",
        "--discard-free-space",
    ]);
    assert!(
        err.contains("not free space") && err.contains("MBR partition 2 (type 0x00)"),
        "{err}"
    );
    assert!(sha256(&dev.read()) == sha256(&before), "a refusal wrote");
}

/// A GPT entry whose last LBA is below its first (sfdisk --verify: "Partition 2 ends
/// before it starts"; Linux keeps it, truncated at the device's end) is refused in one
/// line, writing nothing, even with --discard-free-space.
#[test]
fn gpt_entry_that_ends_before_it_starts_is_refused() {
    let d = Disk::new(
        64 * MIB,
        "label: gpt\nstart=2048, size=20480, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n",
        4 * MIB as usize,
        121,
    );
    // Entry 2 (both copies): a Linux partition from LBA 40960 "to" LBA 30000.
    let mut img = fs::read(&d.file).unwrap();
    let last_lba = img.len() / 512 - 1;
    for lba in [1, last_lba] {
        let h = lba * 512;
        let elba = u64::from_le_bytes(img[h + 72..h + 80].try_into().unwrap()) as usize;
        let e = elba * 512 + 128;
        let ty = img[elba * 512..elba * 512 + 16].to_vec();
        img[e..e + 16].copy_from_slice(&ty);
        img[e + 16] = 1; // a unique GUID that is not zero
        img[e + 32..e + 40].copy_from_slice(&40960u64.to_le_bytes());
        img[e + 40..e + 48].copy_from_slice(&30000u64.to_le_bytes());
        let crc = crc32(&img[elba * 512..elba * 512 + 128 * 128]);
        img[h + 88..h + 92].copy_from_slice(&crc.to_le_bytes());
        img[h + 16..h + 20].fill(0);
        let crc = crc32(&img[h..h + 92]);
        img[h + 16..h + 20].copy_from_slice(&crc.to_le_bytes());
    }
    img[20 * MIB as usize + 4096..20 * MIB as usize + 8192].fill(0x5A);
    fs::write(&d.file, &img).unwrap();
    let dev = LoopDev::attach(&d.file);
    let before = dev.read();
    let t = d.target.to_str().unwrap();
    for extra in [&[][..], &["--discard-free-space"][..]] {
        let mut args = vec!["prepare", dev.p(), "--target", t, "--dry-run"];
        args.extend_from_slice(extra);
        let err = cli_err(&args);
        assert!(
            err.contains("GPT partition 2 ends before it starts") && err.lines().count() == 1,
            "{err}"
        );
    }
    assert!(sha256(&dev.read()) == sha256(&before), "a refusal wrote");
}

/// Sets the header CRC32 of the GPT header at byte `h` of `img`.
fn seal_header(img: &mut [u8], h: usize) {
    img[h + 16..h + 20].fill(0);
    let crc = crc32(&img[h..h + 92]);
    img[h + 16..h + 20].copy_from_slice(&crc.to_le_bytes());
}

/// A backup GPT that is not at the device's end, its entries right *after* its header
/// (LBA 40961..40993, 20 MiB + 512): they are in use whether the primary is valid (it
/// names the backup) or damaged (the backup's own view), so an `--area` over them is
/// refused, even with --discard-free-space.
#[test]
fn backup_gpt_entries_after_their_header_are_not_free_space() {
    let d = Disk::new(
        64 * MIB,
        "label: gpt\n\
         start=2048, size=20480, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n\
         start=81920, size=20480, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n",
        4 * MIB as usize,
        122,
    );
    let mut img = fs::read(&d.file).unwrap();
    let last = img.len() / 512 - 1;
    let (h, e) = (40960usize, 40961usize);
    let entries = img[1024..1024 + 128 * 128].to_vec();
    let mut backup = img[512..1024].to_vec();
    backup[24..32].copy_from_slice(&(h as u64).to_le_bytes());
    backup[32..40].copy_from_slice(&1u64.to_le_bytes());
    backup[72..80].copy_from_slice(&(e as u64).to_le_bytes());
    seal_header(&mut backup, 0);
    // The old backup at the device's end is gone; the primary names the new one.
    img[(last - 32) * 512..].fill(0);
    img[h * 512..(h + 1) * 512].copy_from_slice(&backup);
    img[e * 512..e * 512 + entries.len()].copy_from_slice(&entries);
    img[512 + 32..512 + 40].copy_from_slice(&(h as u64).to_le_bytes());
    seal_header(&mut img, 512);
    let t = d.target.to_str().unwrap();
    for damage_primary in [false, true] {
        if damage_primary {
            img[512 + 56] ^= 1; // the header CRC fails: the backup at LBA 40960 is used
        }
        fs::write(&d.file, &img).unwrap();
        let dev = LoopDev::attach(&d.file);
        let before = dev.read();
        let area = format!("{}..{}", 20 * MIB + 4096, 30 * MIB);
        let err = cli_err(&[
            "prepare",
            dev.p(),
            "--target",
            t,
            "--area",
            &area,
            "--discard-free-space",
        ]);
        assert!(
            err.contains("not free space") && err.contains("backup GPT"),
            "primary damaged: {damage_primary}: {err}"
        );
        assert!(sha256(&dev.read()) == sha256(&before), "a refusal wrote");
    }
}

/// `--area` at the edges: exactly the gap between two partitions (touching both) is
/// taken, rollback gives every byte back and commit gives the target; one sector more on
/// either side, or an area that runs to the backup GPT or to the device's end, is refused
/// in one line naming what it overlaps, writing nothing.
#[test]
fn area_edges_touching_partitions_and_the_backup_gpt() {
    let d = Disk::new(
        64 * MIB,
        "label: gpt\n\
         start=2048, size=20480, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n\
         start=81920, size=20480, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n",
        4 * MIB as usize,
        123,
    );
    let dev = LoopDev::attach(&d.file);
    let before = dev.read();
    let t = d.target.to_str().unwrap();
    let backup = 64 * MIB - 33 * 512;
    let refused = [
        (11 * MIB - 4096, 40 * MIB, "GPT partition 1"),
        (11 * MIB, 40 * MIB + 512, "GPT partition 2"),
        (50 * MIB, backup + 512, "backup GPT"),
        (50 * MIB, 64 * MIB, "backup GPT"),
    ];
    for (start, end, what) in refused {
        let area = format!("{start}..{end}");
        let err = cli_err(&["prepare", dev.p(), "--target", t, "--area", &area]);
        assert!(
            err.contains("not free space") && err.contains(what),
            "{area}: {err}"
        );
        assert!(
            sha256(&dev.read()) == sha256(&before),
            "{area}: a refusal wrote"
        );
    }
    // Up to the backup GPT's first byte is free.
    let area = format!("{}..{backup}", 50 * MIB);
    let plan = json(&d.prepare(&dev, &["--dry-run", "--area", &area]));
    assert_eq!(plan["area"]["start"], 50 * MIB, "{plan}");
    // The whole gap between the partitions: prepare, rollback, prepare, commit.
    let area = format!("{}..{}", 11 * MIB, 40 * MIB);
    let r = json(&d.prepare(&dev, &["--area", &area]));
    assert_eq!(r["area_offset"], 11 * MIB, "{r}");
    assert!(r["area_end"].as_u64().unwrap() <= 40 * MIB, "{r}");
    common::disk::cli_ok(&["rollback", dev.p()]);
    assert!(
        sha256(&dev.read()) == sha256(&before),
        "rollback not bit-exact"
    );
    d.prepare(&dev, &["--area", &area]);
    common::disk::cli_ok(&["confirm", dev.p()]);
    common::disk::cli_ok(&["commit", dev.p()]);
    let after = dev.read();
    assert!(
        after[..d.target_bytes.len()] == d.target_bytes[..],
        "commit did not give the target"
    );
    // Past the target and the area, the second partition is as it was.
    let p2 = (40 * MIB) as usize..(50 * MIB) as usize;
    assert!(after[p2.clone()] == before[p2], "partition 2 changed");
}

/// `commit --relocate-backup-gpt` with a target whose primary GPT claims a last usable
/// LBA up to the device's end (no room for the backup entries there): the commit stands,
/// the move is refused in one line that says why, and nothing of the GPT is written.
#[test]
fn relocate_backup_gpt_refuses_a_last_usable_lba_without_room() {
    let d = Disk::new(
        64 * MIB,
        "label: gpt\nstart=2048, size=20480, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n",
        4 * MIB as usize,
        124,
    );
    // The target: an 8 MiB GPT image whose primary says "usable up to LBA 131070".
    fs::File::create(&d.target)
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    loopdisk::run(
        "sfdisk",
        &["--no-reread", "-q", d.target.to_str().unwrap()],
        Some("label: gpt\nstart=2048, size=4096, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B\n"),
    );
    let mut t = fs::read(&d.target).unwrap();
    t[512 + 48..512 + 56].copy_from_slice(&131070u64.to_le_bytes());
    seal_header(&mut t, 512);
    fs::write(&d.target, &t).unwrap();
    let dev = LoopDev::attach(&d.file);
    d.prepare(&dev, &[]);
    common::disk::cli_ok(&["confirm", dev.p()]);
    let err = cli_err(&["commit", dev.p(), "--relocate-backup-gpt"]);
    assert!(
        err.contains("committed, but moving the backup GPT failed")
            && err.contains("last usable LBA 131070 leaves no room"),
        "{err}"
    );
    let after = dev.read();
    assert!(after[..t.len()] == t[..], "the target changed");
}

/// A hybrid MBR (the protective 0xEE entry plus an MBR-only partition over GPT free
/// space, 30..40 MiB) counts both tables: the area avoids the MBR partition. The plain
/// 512-byte GPT on a 4096-byte-sector device is read in 512-byte sectors: prepare, then
/// rollback gives every byte back.
#[test]
fn hybrid_mbr_and_a_512_byte_gpt_on_a_4k_device() {
    let d = Disk::new(
        64 * MIB,
        "label: gpt\nstart=2048, size=20480, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n",
        4 * MIB as usize,
        125,
    );
    let mut e = [0u8; 16];
    e[4] = 0x83;
    e[8..12].copy_from_slice(&61440u32.to_le_bytes());
    e[12..16].copy_from_slice(&20480u32.to_le_bytes());
    write_at(&d.file, 446 + 16, &e);
    let dev = LoopDev::attach(&d.file);
    let plan = json(&d.prepare(&dev, &["--dry-run", "--discard-free-space"]));
    let start = plan["area"]["start"].as_u64().unwrap();
    assert!(
        start >= 40 * MIB,
        "the area overlaps the hybrid MBR's partition: {plan}"
    );
    let err = cli_err(&[
        "prepare",
        dev.p(),
        "--target",
        d.target.to_str().unwrap(),
        "--area",
        "25M..35M",
    ]);
    assert!(err.contains("MBR partition 2 (type 0x83)"), "{err}");
    drop(dev);

    // Without the hybrid entry (an MBR there would count in 4 KiB sectors).
    write_at(&d.file, 446 + 16, &[0; 16]);
    let dev = LoopDev::attach_with(&d.file, &["--sector-size", "4096"]);
    let before = dev.read();
    let r = json(&d.prepare(&dev, &[]));
    assert!(r["area_offset"].as_u64().unwrap() >= 11 * MIB, "{r}");
    common::disk::cli_ok(&["rollback", dev.p()]);
    assert!(
        sha256(&dev.read()) == sha256(&before),
        "rollback not bit-exact"
    );
}

/// A 512-byte-sector GPT image with a hybrid MBR on a 4096-byte-sector device: the MBR's
/// own partition (30..40 MiB in the image's 512-byte sectors) is in use in the GPT's
/// sector size too, not only at 8 times its offset: an `--area` over it is refused.
#[test]
fn hybrid_mbr_of_a_512_byte_gpt_on_a_4k_device_counts_in_512_byte_sectors() {
    let d = Disk::new(
        1024 * MIB,
        "label: gpt\nstart=2048, size=20480, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n",
        4 * MIB as usize,
        126,
    );
    let mut e = [0u8; 16];
    e[4] = 0x83;
    e[8..12].copy_from_slice(&61440u32.to_le_bytes());
    e[12..16].copy_from_slice(&20480u32.to_le_bytes());
    write_at(&d.file, 446 + 16, &e);
    let dev = LoopDev::attach_with(&d.file, &["--sector-size", "4096"]);
    let before = sha256(&dev.read());
    let err = cli_err(&[
        "prepare",
        dev.p(),
        "--target",
        d.target.to_str().unwrap(),
        "--area",
        "25M..35M",
        "--discard-free-space",
        "--dry-run",
    ]);
    assert!(
        err.contains("not free space") && err.contains("MBR partition 2 (type 0x83)"),
        "{err}"
    );
    assert!(sha256(&dev.read()) == before, "a refusal wrote");
}
