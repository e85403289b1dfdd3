//! Real loop devices and partitioned disk files for the partition-table tests
//! (`tests/gpt_loop.rs`, `tests/partition_loop.rs`): `mod loopdisk;` brings them in.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use tempfile::TempDir;

use crate::common::disk::cli_ok;
use crate::common::random_bytes;

pub const MIB: u64 = 1 << 20;

/// A loop device attached to a file; detached on drop, even when the test fails.
pub struct LoopDev(pub PathBuf);

impl LoopDev {
    pub fn attach(file: &Path) -> LoopDev {
        Self::attach_with(file, &[])
    }

    /// Attaches with extra losetup arguments (`--sector-size 4096`).
    pub fn attach_with(file: &Path, extra: &[&str]) -> LoopDev {
        let mut last = String::new();
        for attempt in 0..10 {
            let out = Command::new("losetup")
                .args(["--find", "--show"])
                .args(extra)
                .arg(file)
                .output()
                .expect("run losetup");
            if out.status.success() {
                let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
                return LoopDev(dev.into());
            }
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            std::thread::sleep(std::time::Duration::from_millis(50 * (attempt + 1)));
        }
        panic!("losetup {}: {last}", file.display());
    }
    pub fn p(&self) -> &str {
        self.0.to_str().unwrap()
    }
    pub fn read(&self) -> Vec<u8> {
        fs::read(&self.0).unwrap()
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

pub fn run(cmd: &str, args: &[&str], stdin: Option<&str>) {
    let mut c = Command::new(cmd);
    c.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    if let Some(s) = stdin {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A disk file of `size` bytes partitioned by sfdisk with `script`; `fs` makes file
/// systems on partition files (offset, length, mkfs command).
pub struct Disk {
    pub dir: TempDir,
    pub file: PathBuf,
    pub target: PathBuf,
    pub target_bytes: Vec<u8>,
}

impl Disk {
    pub fn new(size: u64, script: &str, target_len: usize, seed: u64) -> Disk {
        let dir = TempDir::new().unwrap();
        let file = dir.path().join("disk.img");
        fs::File::create(&file).unwrap().set_len(size).unwrap();
        run(
            "sfdisk",
            &["--no-reread", "-q", file.to_str().unwrap()],
            Some(script),
        );
        let target_bytes = random_bytes(seed, target_len);
        let target = dir.path().join("target.img");
        fs::write(&target, &target_bytes).unwrap();
        Disk {
            dir,
            file,
            target,
            target_bytes,
        }
    }

    /// Makes a file system of `mkfs` (with its args) in `[start, start+len)` of the disk.
    pub fn mkfs(&self, start: u64, len: u64, mkfs: &[&str]) {
        let part = self.dir.path().join("part.img");
        fs::File::create(&part).unwrap().set_len(len).unwrap();
        let mut args: Vec<&str> = mkfs[1..].to_vec();
        args.push(part.to_str().unwrap());
        run(mkfs[0], &args, None);
        let bytes = fs::read(&part).unwrap();
        let f = fs::OpenOptions::new().write(true).open(&self.file).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &bytes, start).unwrap();
        fs::remove_file(&part).unwrap();
    }

    pub fn prepare(&self, dev: &LoopDev, extra: &[&str]) -> String {
        let mut args = vec!["--json", "prepare", dev.p(), "--target"];
        args.push(self.target.to_str().unwrap());
        args.extend_from_slice(extra);
        cli_ok(&args)
    }
}

/// The result object of a `--json` command: its last line (commit and hydrate print
/// JSON-lines progress events before it).
pub fn json(s: &str) -> serde_json::Value {
    let last = s.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
    let v: serde_json::Value = serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {s}"));
    assert!(v.get("event").is_none(), "no result line: {s}");
    v
}
