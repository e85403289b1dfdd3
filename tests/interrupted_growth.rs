//! A power cut right after `prepare`'s first write to a regular file (issue 11): the file
//! is longer, no superblock landed. The first write is one sector at the new end, the
//! growth record (docs/format.md), so the next `prepare` and `rollback` recognise the
//! extension and give the file its length back; a record that does not verify, or an
//! extension that holds data, is left alone. Real `streamboot` binary, real files.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use boot_relocator::format::{GrowthRecord, GROWTH_LEN};
use boot_relocator::{FileStorage, HostKey, MetaStore, Storage};
use common::disk::{cli_err, cli_ok, sha256, sha256_file};
use common::random_bytes;
use tempfile::TempDir;

const MIB: usize = 1 << 20;

struct Fx {
    dir: TempDir,
    disk: PathBuf,
    source: Vec<u8>,
}

impl Fx {
    fn new(seed: u64) -> Fx {
        let dir = TempDir::new().unwrap();
        let source = random_bytes(seed, 3 * MIB + 4096);
        let target = random_bytes(seed + 1, 4 * MIB + 1000);
        fs::write(dir.path().join("target.img"), target).unwrap();
        let disk = dir.path().join("disk.img");
        fs::write(&disk, &source).unwrap();
        Fx { dir, disk, source }
    }
    fn d(&self) -> &str {
        self.disk.to_str().unwrap()
    }
    fn prepare(&self, disk: &Path) {
        let t = self.dir.path().join("target.img");
        cli_ok(&[
            "prepare",
            disk.to_str().unwrap(),
            "--target",
            t.to_str().unwrap(),
            "--chunk-size",
            "64K",
        ]);
    }

    /// Writes to `self.disk` what a power cut after prepare's first write leaves: the
    /// source, zeros, and (at the new end) the last sector that prepare writes first.
    /// That sector is taken from a prepare of a copy of the disk.
    fn cut_after_first_write(&self) -> (u64, Vec<u8>) {
        let copy = self.dir.path().join("copy.img");
        fs::write(&copy, &self.source).unwrap();
        self.prepare(&copy);
        let full = fs::read(&copy).unwrap();
        fs::remove_file(&copy).unwrap();
        let len = full.len();
        let mut img = self.source.clone();
        img.resize(len - GROWTH_LEN, 0);
        img.extend_from_slice(&full[len - GROWTH_LEN..]);
        fs::write(&self.disk, &img).unwrap();
        assert!(
            MetaStore::open(self.storage()).unwrap().is_none(),
            "no superblock"
        );
        (len as u64, img)
    }

    fn storage(&self) -> Arc<dyn Storage> {
        Arc::new(FileStorage::open(&self.disk, true).unwrap())
    }
}

#[test]
fn power_cut_after_the_first_write_of_prepare_gets_the_file_size_back() {
    // rollback truncates the extension away.
    let fx = Fx::new(60);
    fx.cut_after_first_write();
    let st: serde_json::Value =
        serde_json::from_str(&cli_ok(&["--json", "status", fx.d()])).unwrap();
    assert_eq!(st["prepared"], false, "{st}");
    assert_eq!(
        st["interrupted_prepare_source_size"].as_u64(),
        Some(fx.source.len() as u64),
        "{st}"
    );
    cli_ok(&["rollback", fx.d()]);
    assert_eq!(sha256_file(&fx.disk), sha256(&fx.source));

    // prepare takes the original length as the source, and rollback restores it.
    let fx = Fx::new(61);
    fx.cut_after_first_write();
    fx.prepare(&fx.disk);
    let st: serde_json::Value =
        serde_json::from_str(&cli_ok(&["--json", "status", fx.d()])).unwrap();
    assert_eq!(
        st["status"]["source_size"].as_u64(),
        Some(fx.source.len() as u64),
        "{st}"
    );
    cli_ok(&["rollback", fx.d()]);
    assert_eq!(sha256_file(&fx.disk), sha256(&fx.source));
}

#[test]
fn an_extension_holding_data_or_a_forged_record_is_left_alone() {
    // The file was served plain and a guest wrote into the extension: its data stays.
    let fx = Fx::new(62);
    let (_, mut img) = fx.cut_after_first_write();
    img[fx.source.len() + 100] = 1;
    fs::write(&fx.disk, &img).unwrap();
    let err = cli_err(&["rollback", fx.d()]);
    assert!(err.contains("not a prepared disk"), "{err}");
    assert_eq!(sha256_file(&fx.disk), sha256(&img));

    // A record under another key (a guest's) is guest data.
    let fx = Fx::new(63);
    let (len, mut img) = fx.cut_after_first_write();
    let forged = GrowthRecord {
        source_size: fx.source.len() as u64,
        disk_len: len,
    }
    .encode(&HostKey::from_bytes([9; 32]));
    let at = img.len() - GROWTH_LEN;
    img[at..].copy_from_slice(&forged);
    fs::write(&fx.disk, &img).unwrap();
    let err = cli_err(&["rollback", fx.d()]);
    assert!(err.contains("not a prepared disk"), "{err}");
    assert_eq!(sha256_file(&fx.disk), sha256(&img));

    // A record naming another length (the file was resized since) is not ours either.
    let fx = Fx::new(64);
    let (_, mut img) = fx.cut_after_first_write();
    img.extend_from_slice(&[0; 4096]);
    fs::write(&fx.disk, &img).unwrap();
    let err = cli_err(&["rollback", fx.d()]);
    assert!(err.contains("not a prepared disk"), "{err}");
    assert_eq!(sha256_file(&fx.disk), sha256(&img));
}

/// `serve` on such a file would present the extension to a guest as disk space, and its
/// writes there would be lost when the next prepare or rollback cuts the extension away:
/// it refuses, in one line naming the way out, and changes nothing.
#[test]
fn serve_refuses_a_file_an_interrupted_prepare_extended() {
    let fx = Fx::new(31);
    let (_, img) = fx.cut_after_first_write();
    let sock = fx.dir.path().join("vu.sock");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_streamboot"))
        .args(["serve", fx.d(), "--socket"])
        .arg(&sock)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("serve started on a file an interrupted prepare extended");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "serve started: {err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("interrupted prepare") && err.contains("rollback"),
        "{err}"
    );
    assert!(!sock.exists(), "the socket was created");
    assert_eq!(sha256_file(&fx.disk), sha256(&img), "the disk changed");
    // rollback then gives the source back, and serve serves it.
    cli_ok(&["rollback", fx.d()]);
    assert_eq!(sha256_file(&fx.disk), sha256(&fx.source));
}
