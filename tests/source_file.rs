//! `FileSource`: byte-exact positioned reads, concurrency, and pinning by size, mtime and
//! inode.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::nginx::set_mtime;
use common::{random_bytes, test_rng};
use rand::Rng;
use streamboot::source::{FileSource, RemoteSource, SourceError, SourceIdentity};
use tempfile::TempDir;

const MIB: usize = 1 << 20;

fn image(dir: &TempDir, seed: u64, len: usize) -> (std::path::PathBuf, Vec<u8>) {
    let data = random_bytes(seed, len);
    let path = dir.path().join("disk.img");
    fs::write(&path, &data).unwrap();
    (path, data)
}

fn read(src: &dyn RemoteSource, offset: u64, len: usize) -> Result<Vec<u8>, SourceError> {
    let mut buf = vec![0u8; len];
    src.read_at(offset, &mut buf).map(|()| buf)
}

#[test]
fn random_ranges_are_byte_exact() {
    let dir = TempDir::new().unwrap();
    let (path, data) = image(&dir, 1, 5 * MIB + 77);
    let src = FileSource::open(&path, None).unwrap();
    let id = src.identity();
    assert_eq!(id.kind, "file");
    assert_eq!(id.size, data.len() as u64);
    assert_eq!(src.name(), path.display().to_string());

    let size = data.len();
    let mut ranges = vec![(0, 1), (size - 1, 1), (0, size)];
    let mut rng = test_rng(2);
    for _ in 0..300 {
        let len = rng.random_range(1..=MIB);
        ranges.push((rng.random_range(0..=size - len), len));
    }
    for (offset, len) in ranges {
        let got = read(&src, offset as u64, len).unwrap();
        assert!(
            got == data[offset..offset + len],
            "bytes differ at {offset}+{len}"
        );
    }
    assert!(matches!(
        read(&src, size as u64, 1),
        Err(SourceError::OutOfRange { .. })
    ));
    src.read_at(size as u64, &mut []).unwrap();
}

#[test]
fn eight_threads_read_concurrently() {
    let dir = TempDir::new().unwrap();
    let (path, data) = image(&dir, 3, 4 * MIB);
    let data = Arc::new(data);
    let src = Arc::new(FileSource::open(&path, None).unwrap());
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let (src, data) = (Arc::clone(&src), Arc::clone(&data));
            std::thread::spawn(move || {
                let mut rng = test_rng(10 + t);
                for _ in 0..200 {
                    let len = rng.random_range(1..=256 * 1024);
                    let offset = rng.random_range(0..=data.len() - len);
                    let got = read(&*src, offset as u64, len).unwrap();
                    assert!(
                        got == data[offset..offset + len],
                        "thread {t}: bytes differ"
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

fn assert_changed(src: &FileSource) {
    let err = read(src, 0, 4096).expect_err("file changed");
    assert!(matches!(err, SourceError::Changed { .. }), "got {err:?}");
    assert!(!err.is_transient());
}

#[test]
fn write_in_place_is_detected() {
    let dir = TempDir::new().unwrap();
    let (path, _) = image(&dir, 4, MIB);
    let src = FileSource::open(&path, None).unwrap();
    read(&src, 0, 4096).unwrap();
    // Make sure the mtime moves even on a coarse clock.
    std::thread::sleep(Duration::from_millis(20));
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .write_all_at(b"changed", 500_000)
        .unwrap();
    assert_changed(&src);
}

#[test]
fn truncation_is_detected() {
    let dir = TempDir::new().unwrap();
    let (path, _) = image(&dir, 5, MIB);
    let src = FileSource::open(&path, None).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(1000)
        .unwrap();
    assert_changed(&src);
    let err = read(&src, 500_000, 10).expect_err("past the new end");
    assert!(matches!(err, SourceError::Changed { .. }), "got {err:?}");
}

#[test]
fn mtime_change_alone_is_detected() {
    let dir = TempDir::new().unwrap();
    let (path, _) = image(&dir, 6, 100_000);
    let src = FileSource::open(&path, None).unwrap();
    set_mtime(
        &path,
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000),
    );
    assert_changed(&src);
}

#[test]
fn replaced_path_keeps_serving_the_pinned_file() {
    let dir = TempDir::new().unwrap();
    let (path, data) = image(&dir, 7, 200_000);
    let src = FileSource::open(&path, None).unwrap();
    let tmp = dir.path().join("new.img");
    fs::write(&tmp, random_bytes(8, 200_000)).unwrap();
    fs::rename(&tmp, &path).unwrap();
    // The open file is the pinned inode: still the pinned bytes.
    assert!(read(&src, 0, 200_000).unwrap() == data);
    // Reopening the path pins the new file, which differs from the old identity.
    let err = FileSource::open(&path, Some(src.identity())).expect_err("new file");
    assert!(matches!(err, SourceError::Changed { .. }), "got {err:?}");
}

#[test]
fn expected_identity_is_enforced_at_open() {
    let dir = TempDir::new().unwrap();
    let (path, _) = image(&dir, 9, 10_000);
    let id = FileSource::open(&path, None).unwrap().identity().clone();
    FileSource::open(&path, Some(&id)).expect("same identity");
    let wrong = SourceIdentity {
        validator: format!("{}x", id.validator),
        ..id.clone()
    };
    let err = FileSource::open(&path, Some(&wrong)).expect_err("mismatch");
    assert!(matches!(err, SourceError::Changed { .. }), "got {err:?}");
    let msg = err.to_string();
    assert!(msg.contains("disk.img") && msg.contains("changed"), "{msg}");
}

#[test]
fn unusable_paths_are_invalid() {
    let dir = TempDir::new().unwrap();
    for path in [dir.path().to_path_buf(), dir.path().join("missing.img")] {
        let err = FileSource::open(&path, None).expect_err("not a file");
        assert!(
            matches!(err, SourceError::Invalid(_)),
            "{path:?}: got {err:?}"
        );
    }
}
