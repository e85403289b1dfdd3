use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Barrier;

use super::entry::{Key, Lookup};
use super::*;
use crate::store::index::ChunkHash;

fn open_at(dir: &Path, max: u64) -> Arc<SharedCache> {
    SharedCache::open(&CacheConfig {
        dir: dir.to_path_buf(),
        max_bytes: max,
    })
    .unwrap()
}

fn raw_key(index: u64) -> Key {
    Key::Raw {
        image: "img".into(),
        index,
    }
}

#[test]
fn creates_a_private_directory_and_tightens_an_open_one() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("a/b");
    open_at(&dir, 1 << 20);
    assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    open_at(&dir, 1 << 20);
    assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
}

#[test]
fn refuses_a_file_a_zero_cap_and_a_directory_of_another_user() {
    let t = tempfile::tempdir().unwrap();
    let file = t.path().join("f");
    fs::write(&file, b"x").unwrap();
    let cfg = |dir: &Path, max_bytes| CacheConfig {
        dir: dir.to_path_buf(),
        max_bytes,
    };
    assert!(SharedCache::open(&cfg(&file, 1)).is_err());
    let e = SharedCache::open(&cfg(t.path(), 0)).unwrap_err();
    assert!(matches!(e, CacheError::ZeroSize), "{e}");
    let other = t.path().join("other");
    fs::create_dir(&other).unwrap();
    std::os::unix::fs::chown(&other, Some(65534), None).unwrap();
    let e = SharedCache::open(&cfg(&other, 1 << 20)).unwrap_err();
    assert!(matches!(e, CacheError::NotOwned { .. }), "{e}");
    assert!(e.to_string().contains("owned by uid 65534"), "{e}");
}

#[test]
fn a_miss_fetches_once_and_a_hit_reads_the_entry() {
    let t = tempfile::tempdir().unwrap();
    let c = open_at(t.path(), 1 << 20);
    let fetches = AtomicUsize::new(0);
    let cancel = CancellationToken::new();
    for _ in 0..3 {
        let mut buf = [0u8; 100];
        c.get(&raw_key(7), &mut buf, &cancel, |b| {
            fetches.fetch_add(1, Ordering::SeqCst);
            b.fill(9);
            Ok(())
        })
        .unwrap();
        assert_eq!(buf, [9u8; 100]);
    }
    assert_eq!(fetches.load(Ordering::SeqCst), 1);
}

#[test]
fn a_failed_fetch_stores_nothing() {
    let t = tempfile::tempdir().unwrap();
    let c = open_at(t.path(), 1 << 20);
    let mut buf = [0u8; 10];
    let cancel = CancellationToken::new();
    let e = c
        .get(&raw_key(1), &mut buf, &cancel, |_| {
            Err(SourceError::Invalid("boom".into()))
        })
        .unwrap_err();
    assert!(matches!(e, SourceError::Invalid(_)));
    let path = t.path().join(raw_key(1).rel_path());
    assert!(matches!(
        entry::read(&raw_key(1), &path, &mut buf).unwrap(),
        Lookup::Miss
    ));
}

#[test]
fn a_flipped_byte_is_detected_deleted_and_fetched_again() {
    let t = tempfile::tempdir().unwrap();
    let c = open_at(t.path(), 1 << 20);
    let data: Vec<u8> = (0..200u32).map(|i| i as u8).collect();
    let store_key = Key::Store(ChunkHash::of(&data));
    let cancel = CancellationToken::new();
    for key in [raw_key(3), store_key] {
        let fetches = AtomicUsize::new(0);
        let fetch = |b: &mut [u8]| {
            fetches.fetch_add(1, Ordering::SeqCst);
            b.copy_from_slice(&data);
            Ok(())
        };
        let mut buf = vec![0u8; data.len()];
        c.get(&key, &mut buf, &cancel, fetch).unwrap();
        let path = t.path().join(key.rel_path());
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            entry::read(&key, &path, &mut buf).unwrap(),
            Lookup::Corrupt(_)
        ));
        buf.fill(0);
        c.get(&key, &mut buf, &cancel, fetch).unwrap();
        assert_eq!(buf, data);
        assert_eq!(fetches.load(Ordering::SeqCst), 2, "{key:?}");
        // The entry was rewritten with the right bytes.
        buf.fill(0);
        assert!(matches!(
            entry::read(&key, &path, &mut buf).unwrap(),
            Lookup::Hit
        ));
        assert_eq!(buf, data);
    }
}

#[test]
fn a_truncated_or_foreign_entry_is_corrupt() {
    let t = tempfile::tempdir().unwrap();
    let key = raw_key(0);
    let path = t.path().join(key.rel_path());
    entry::write(&key, &path, &[5u8; 64]).unwrap();
    let mut buf = [0u8; 64];
    assert!(matches!(
        entry::read(&key, &path, &mut buf).unwrap(),
        Lookup::Hit
    ));
    let mut short = [0u8; 63];
    assert!(matches!(
        entry::read(&key, &path, &mut short).unwrap(),
        Lookup::Corrupt(_)
    ));
    let store = Key::Store(ChunkHash::of(&[5u8; 64]));
    // A raw entry's bytes under a store name (header included): wrong length.
    let spath = t.path().join(store.rel_path());
    fs::create_dir_all(spath.parent().unwrap()).unwrap();
    fs::copy(&path, &spath).unwrap();
    assert!(matches!(
        entry::read(&store, &spath, &mut buf).unwrap(),
        Lookup::Corrupt(_)
    ));
}

#[test]
fn threads_wanting_the_same_missing_entry_fetch_it_once() {
    let t = tempfile::tempdir().unwrap();
    let c = open_at(t.path(), 1 << 20);
    let fetches = AtomicUsize::new(0);
    let barrier = Barrier::new(8);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                let cancel = CancellationToken::new();
                let mut buf = vec![0u8; 4096];
                barrier.wait();
                c.get(&raw_key(42), &mut buf, &cancel, |b| {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(100));
                    b.fill(3);
                    Ok(())
                })
                .unwrap();
                assert!(buf.iter().all(|&x| x == 3));
            });
        }
    });
    assert_eq!(fetches.load(Ordering::SeqCst), 1);
}

#[test]
fn a_waiter_gives_up_when_cancelled() {
    let t = tempfile::tempdir().unwrap();
    let c = open_at(t.path(), 1 << 20);
    let key = raw_key(5);
    let mut buf = [0u8; 8];
    let cancel = CancellationToken::new();
    let held = c.lock_entry(&key, &mut buf, &cancel).unwrap();
    assert!(matches!(held, Some(EntryLock { _file: Some(_) })));
    assert!(c.try_lock_entry(&key).is_none(), "the lock is exclusive");
    let other = CancellationToken::new();
    other.cancel();
    let e = c
        .get(&key, &mut buf, &other, |_| unreachable!())
        .unwrap_err();
    assert!(matches!(e, SourceError::Cancelled));
}

#[test]
fn eviction_removes_the_least_recently_used_down_to_the_low_water_mark() {
    let t = tempfile::tempdir().unwrap();
    // 16 entries of 1000 bytes (+40 header) fit a cap of 20000; the next scan then
    // evicts down to 18000.
    let c = open_at(t.path(), 20_000);
    let cancel = CancellationToken::new();
    let now = std::time::SystemTime::now();
    for i in 0..16u64 {
        let mut buf = vec![0u8; 1000];
        c.get(&raw_key(i), &mut buf, &cancel, |b| {
            b.fill(i as u8);
            Ok(())
        })
        .unwrap();
        // Entry i was last used i hours ago minus a bit: entry 15 is the oldest.
        let f = File::options()
            .write(true)
            .open(t.path().join(raw_key(i).rel_path()))
            .unwrap();
        f.set_modified(now - Duration::from_secs(3600 * i)).unwrap();
    }
    for i in 16..22u64 {
        let mut buf = vec![0u8; 1000];
        c.get(&raw_key(i), &mut buf, &cancel, |b| {
            b.fill(1);
            Ok(())
        })
        .unwrap();
    }
    let present: Vec<u64> = (0..22)
        .filter(|i| t.path().join(raw_key(*i).rel_path()).exists())
        .collect();
    let kept = present.len() as u64 * 1040;
    assert!(kept <= 20_000 + 20_000 / 16 + 1040, "{present:?}");
    // The oldest went first.
    assert!(!present.contains(&15), "{present:?}");
    assert!(present.contains(&0) && present.contains(&21), "{present:?}");
}

#[test]
fn a_cached_source_reads_any_range_and_fills_the_cache_in_runs() {
    use crate::source::{FileSource, RemoteSource};
    let t = tempfile::tempdir().unwrap();
    let len = 5 * RAW_CHUNK_SIZE as usize + 12_345;
    let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    let img = t.path().join("img");
    fs::write(&img, &data).unwrap();
    let cfg = CacheConfig {
        dir: t.path().join("cache"),
        max_bytes: 1 << 30,
    };
    let file: Arc<dyn RemoteSource> = Arc::new(FileSource::open(&img, None).unwrap());
    let src = cached_raw(file, &["http://h/img?sig=secret".into()], Some(&cfg)).unwrap();
    // One read across chunks 1..=4 (partial at both ends): one run fills all four.
    let (a, b) = (RAW_CHUNK_SIZE + 100, 4 * RAW_CHUNK_SIZE + 200);
    let mut buf = vec![0u8; (b - a) as usize];
    src.read_at(a, &mut buf).unwrap();
    assert_eq!(buf, data[a as usize..b as usize]);
    let image_dir = fs::read_dir(cfg.dir.join("raw"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut names: Vec<String> = fs::read_dir(&image_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["1", "2", "3", "4", "identity"]);
    let identity = fs::read_to_string(image_dir.join("identity")).unwrap();
    assert!(identity.contains("http://h/img\n"), "{identity}");
    assert!(!identity.contains("secret"), "{identity}");
    // Any range, including the short last chunk, gives the image's bytes.
    for (off, n) in [
        (0, 1),
        (0, len),
        (len - 1, 1),
        (len - 12_345, 12_345),
        (777, 300_000),
    ] {
        let mut buf = vec![0u8; n];
        src.read_at(off as u64, &mut buf).unwrap();
        assert_eq!(buf, data[off..off + n], "{off}+{n}");
    }
    let mut buf = vec![0u8; 2];
    assert!(matches!(
        src.read_at(len as u64 - 1, &mut buf),
        Err(SourceError::OutOfRange { .. })
    ));
}

#[test]
fn eviction_of_entries_of_one_minute_stops_at_the_low_water_mark() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("store/ab");
    std::fs::create_dir_all(&dir).unwrap();
    for i in 0..10 {
        std::fs::write(dir.join(format!("e{i}")), vec![0u8; 1000]).unwrap();
    }
    let scan = super::evict::evict(t.path(), 9000, 6000).unwrap();
    assert_eq!(scan.evicted, 4);
    assert_eq!(scan.kept_bytes, 6000);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 6);
    // Under the cap: nothing goes.
    let scan = super::evict::evict(t.path(), 9000, 6000).unwrap();
    assert_eq!((scan.evicted, scan.kept_bytes), (0, 6000));
}
