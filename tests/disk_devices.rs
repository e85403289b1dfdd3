//! Disk identity and failing devices (issue 11), on real loop devices and the real
//! `streamboot` binary:
//!
//! - the disk lock covers every name of a disk: a file and the loop device attached to
//!   it, a partition and its whole disk;
//! - the first failed sync takes the disk out of service: a loop device over a sparse file
//!   on a full tmpfs fails its writeback with EIO, and Linux then drops the dirty pages,
//!   so a retried `fdatasync` would "succeed" with the data gone.
//!
//! Needs root, loop devices and tmpfs mounts. Without them each test prints a `SKIP:`
//! line and passes, unless `STREAMBOOT_REQUIRE_LOOP` is set.

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boot_relocator::{FileStorage, Storage};
use common::blkio_client::Client;
use common::disk::{cli_err, cli_ok};
use common::random_bytes;
use common::serve::Served;
use tempfile::TempDir;

const MIB: usize = 1 << 20;

fn skip(why: &str) -> bool {
    if std::env::var_os("STREAMBOOT_REQUIRE_LOOP").is_some() {
        panic!("loop devices required (STREAMBOOT_REQUIRE_LOOP is set) but: {why}");
    }
    let _ = writeln!(std::io::stderr(), "SKIP: disk device test: {why}");
    false
}

fn usable() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return skip("needs root");
    }
    Path::new("/dev/loop-control").exists() || skip("no loop driver")
}

/// A loop device attached to a file (with `-P`: partitions scanned); detached on drop.
struct LoopDev(PathBuf);

impl LoopDev {
    fn attach(file: &Path, partscan: bool) -> LoopDev {
        let mut last = String::new();
        for attempt in 0..10 {
            let mut cmd = Command::new("losetup");
            if partscan {
                cmd.arg("-P");
            }
            let out = cmd.args(["--find", "--show"]).arg(file).output().unwrap();
            if out.status.success() {
                let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
                return LoopDev(dev.into());
            }
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            std::thread::sleep(Duration::from_millis(50 * (attempt + 1)));
        }
        panic!("losetup {}: {last}", file.display());
    }
    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// `streamboot status DISK` must refuse because the disk is in use.
fn in_use(disk: &str) {
    let err = cli_err(&["status", disk]);
    assert!(err.contains("in use"), "status {disk}: {err}");
}

#[test]
fn a_file_and_its_loop_device_are_one_disk() {
    if !usable() {
        return;
    }
    let dir = TempDir::new().unwrap();
    let file = dir.path().join("back.img");
    fs::write(&file, random_bytes(1, 4 * MIB)).unwrap();
    let f = file.to_str().unwrap();
    let lo = LoopDev::attach(&file, false);
    let sock = dir.path().join("s.sock");
    {
        let _serve = Served::start(Path::new(lo.path()), &sock, &[]);
        in_use(f);
        in_use(lo.path());
    }
    {
        let _serve = Served::start(Path::new(f), &sock, &[]);
        in_use(lo.path());
    }
    // Nothing holds it any more.
    assert!(cli_ok(&["status", f]).contains("plain disk"));
    assert!(cli_ok(&["status", lo.path()]).contains("plain disk"));
}

#[test]
fn a_partition_and_its_whole_disk_are_one_disk() {
    if !usable() {
        return;
    }
    let dir = TempDir::new().unwrap();
    let file = dir.path().join("parts.img");
    let mut img = random_bytes(2, 8 * MIB);
    // Two MBR partitions: sectors 2048..8192 and 8192..16384.
    img[446..510].fill(0);
    for (i, (start, len)) in [(2048u32, 6144u32), (8192, 8192)].into_iter().enumerate() {
        let e = &mut img[446 + 16 * i..462 + 16 * i];
        e[4] = 0x83;
        e[8..12].copy_from_slice(&start.to_le_bytes());
        e[12..16].copy_from_slice(&len.to_le_bytes());
    }
    img[510] = 0x55;
    img[511] = 0xAA;
    fs::write(&file, &img).unwrap();
    let lo = LoopDev::attach(&file, true);
    let (p1, p2) = (format!("{}p1", lo.path()), format!("{}p2", lo.path()));
    let t = Instant::now();
    while !(Path::new(&p1).exists() && Path::new(&p2).exists()) {
        if t.elapsed() > Duration::from_secs(1) {
            skip("the kernel made no partitions for the loop device (partscan)");
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let sock = dir.path().join("s.sock");
    {
        let _serve = Served::start(Path::new(&p1), &sock, &[]);
        in_use(lo.path());
        in_use(file.to_str().unwrap());
        // Another partition of the same disk is another disk.
        assert!(cli_ok(&["status", &p2]).contains("plain disk"));
    }
    {
        let _serve = Served::start(Path::new(lo.path()), &sock, &[]);
        in_use(&p1);
        in_use(&p2);
    }
}

/// A tmpfs of 2 MiB holding a sparse 16 MiB file: writeback past 2 MiB fails.
struct SmallTmpfs(TempDir);

impl SmallTmpfs {
    fn mount() -> Option<SmallTmpfs> {
        let dir = TempDir::new().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=2M", "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            skip("cannot mount a tmpfs");
            return None;
        }
        Some(SmallTmpfs(dir))
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        // The loop device lets go of its backing file shortly after `losetup -d`.
        for _ in 0..50 {
            let ok = Command::new("umount")
                .arg(self.0.path())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("warning: could not unmount {}", self.0.path().display());
    }
}

/// A loop device whose writeback fails, over its tmpfs (fields drop in order: the
/// device is detached before the tmpfs is unmounted).
struct FailingDevice {
    lo: LoopDev,
    _fs: SmallTmpfs,
}

fn failing_device() -> Option<FailingDevice> {
    if !usable() {
        return None;
    }
    let fs_ = SmallTmpfs::mount()?;
    let file = fs_.0.path().join("b.img");
    fs::File::create(&file)
        .unwrap()
        .set_len(16 * MIB as u64)
        .unwrap();
    Some(FailingDevice {
        lo: LoopDev::attach(&file, false),
        _fs: fs_,
    })
}

#[test]
fn first_failed_sync_takes_the_storage_out_of_service() {
    let Some(dev) = failing_device() else {
        return;
    };
    let st = FileStorage::open(Path::new(dev.lo.path()), true).unwrap();
    st.write_at(0, &vec![7u8; 8 * MIB]).unwrap();
    let first = st
        .sync()
        .expect_err("writeback past the tmpfs size must fail");
    // Linux has dropped the dirty pages: a retry would succeed. It must not.
    let again = st
        .sync()
        .expect_err("second sync succeeded after a failed one");
    assert!(again.to_string().contains("out of service"), "{again}");
    let w = st
        .write_at(0, &[1u8; 4096])
        .expect_err("write after a failed sync");
    assert!(w.to_string().contains("out of service"), "{w}");
    // The later errors name the first failure (the kernel's error of the first sync).
    let first = first.to_string();
    let cause = first
        .split_once("failed (")
        .and_then(|(_, rest)| rest.split_once("): "))
        .map(|(cause, _)| cause)
        .unwrap_or_else(|| panic!("first error does not give its cause: {first}"));
    assert!(w.to_string().contains(cause), "{w} does not name {cause}");
    assert!(
        again.to_string().contains(cause),
        "{again} does not name {cause}"
    );
    let st: Arc<dyn Storage> = Arc::new(st);
    assert!(st.write_zeroes(0, 4096).is_err());
}

#[test]
fn serve_fails_every_flush_after_the_first_failed_one() {
    let Some(dev) = failing_device() else {
        return;
    };
    let dir = TempDir::new().unwrap();
    let sock = dir.path().join("s.sock");
    let serve = Served::start(Path::new(dev.lo.path()), &sock, &[]);
    let mut c = Client::connect(&sock, 1, 4 * MIB).unwrap();
    c.buf(0..4 * MIB).fill(9);
    for i in 0..2 {
        assert_eq!(c.write((i * 4 * MIB) as u64, 0, 4 * MIB), 0, "write {i}");
    }
    assert_ne!(c.flush(), 0, "the flush of data the device lost succeeded");
    assert_ne!(
        c.flush(),
        0,
        "a retried flush succeeded after the data was dropped"
    );
    assert_ne!(
        c.write(0, 0, 4096),
        0,
        "a write after a failed flush succeeded"
    );
    drop(c);
    drop(serve);
}
