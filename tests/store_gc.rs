//! Garbage collection: exactly the unreferenced objects go, and a gc running alongside
//! publishes never removes an object that a finished index references.

mod store_common;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use store_common::*;
use streamboot::source::store::{StoreSource, StoreSourceOptions};
use streamboot::source::RemoteSource;
use streamboot::store::{self, gc, publish};

#[test]
fn gc_removes_exactly_the_unreferenced_objects() {
    let tmp = tempfile::tempdir().unwrap();
    let a = image_a();
    let b = image_b(&a);
    // C shares its first half with A only.
    let mut c = a[..12 * MIB].to_vec();
    c.extend_from_slice(&random_bytes(77, 4 * MIB));
    let st = tmp.path().join("store");
    let key = key(1);
    for (name, img) in [("a", &a), ("b", &b), ("c", &c)] {
        let p = write_image(tmp.path(), &format!("{name}.img"), img);
        publish(&p, &st, name, CS as u64, Some(&key), name != "b").unwrap();
    }
    let (da, db, dc) = (
        model(&a, CS).distinct(),
        model(&b, CS).distinct(),
        model(&c, CS).distinct(),
    );
    let all: BTreeSet<_> = da.iter().chain(&db).chain(&dc).copied().collect();
    assert_eq!(object_sha_set(&st), all);

    // Nothing to collect while every index exists.
    let r = gc(&st).unwrap();
    assert_eq!((r.indexes, r.objects_deleted), (3, 0));
    assert_eq!(r.objects_scanned, all.len() as u64);

    // Drop A: the objects only A referenced are garbage.
    std::fs::remove_file(st.join("indexes/a.idx")).unwrap();
    let keep: BTreeSet<_> = db.union(&dc).copied().collect();
    let garbage = da.difference(&keep).count() as u64;
    assert!(garbage >= 20, "{garbage}");
    let before = objects_on_disk(&st);
    let s = store::stats(&st).unwrap();
    assert_eq!(s.total.unreferenced_objects, garbage);

    let dry = store::gc::gc_with(&st, true).unwrap();
    assert_eq!(dry.objects_deleted, garbage);
    assert_eq!(objects_on_disk(&st), before, "dry run deletes nothing");

    // A leftover temp file of a crashed writer is removed too.
    std::fs::write(st.join("tmp/123-dead.tmp"), b"partial").unwrap();
    // A foreign file is left alone.
    std::fs::write(st.join("chunks/README"), b"not an object").unwrap();

    let sizes_before = object_sizes(&st);
    let r = gc(&st).unwrap();
    assert_eq!(r.objects_deleted, garbage);
    assert_eq!(r.tmp_files_removed, 1);
    assert_eq!(r.foreign_files, 1);
    assert!(st.join("chunks/README").exists());
    std::fs::remove_file(st.join("chunks/README")).unwrap();
    assert_eq!(object_sha_set(&st), keep);
    let after = objects_on_disk(&st);
    let freed: u64 = sizes_before
        .iter()
        .filter(|(n, _)| !after.contains_key(*n))
        .map(|(_, len)| len)
        .sum();
    assert_eq!(r.bytes_freed, freed);

    // B and C still read back whole.
    for (name, img) in [("b", &b), ("c", &c)] {
        let src = StoreSource::open(
            st.to_str().unwrap(),
            name,
            StoreSourceOptions::trusted(key.verifying_key()),
        )
        .unwrap();
        let mut buf = vec![0u8; img.len()];
        src.read_at(0, &mut buf).unwrap();
        assert!(buf == *img, "{name} intact after gc");
    }
    let s = store::stats(&st).unwrap();
    assert_eq!(s.total.unreferenced_objects, 0);
    assert_eq!(s.total.missing_objects, 0);

    // An index that does not parse stops gc before it deletes anything.
    std::fs::remove_file(st.join("indexes/c.idx")).unwrap();
    std::fs::write(st.join("indexes/broken.idx"), b"garbage").unwrap();
    let n = objects_on_disk(&st).len();
    assert!(gc(&st).is_err());
    assert_eq!(objects_on_disk(&st).len(), n);
}

/// On-disk size of each object file, by file name.
fn object_sizes(st: &std::path::Path) -> HashMap<String, u64> {
    objects_on_disk(st)
        .keys()
        .map(|n| {
            let p = st.join("chunks").join(&n[..2]).join(n);
            (n.clone(), std::fs::metadata(p).unwrap().len())
        })
        .collect()
}

/// The race gc must survive: an image is deleted, its objects become garbage, and a new
/// publish that contains the same chunks finds them present and reuses them while gc is
/// deciding what to delete. Without the store lock, gc would delete objects the new index
/// references. Two publishers and a gc loop run in parallel threads; each round a
/// publisher publishes a fresh image as its "victim" (which the gc thread keeps deleting)
/// and then the same chunks as a "keeper". After every finished publish, and at the end,
/// every keeper must read back exactly its image.
#[test]
fn concurrent_publish_and_gc_never_lose_referenced_chunks() {
    let tmp = tempfile::tempdir().unwrap();
    let st = tmp.path().join("store");
    let cs = 4096u64;
    let base = Arc::new(random_bytes(500, 2 * MIB));
    // Which image each keeper name holds (last finished publish wins).
    let published: Arc<Mutex<HashMap<String, Arc<Vec<u8>>>>> = Arc::default();
    let stop = AtomicBool::new(false);
    let gcs = AtomicU64::new(0);
    let deleted_by_gc = AtomicU64::new(0);
    let deadline = Instant::now() + Duration::from_secs(10);

    let verify = |name: &str, img: &[u8]| {
        let src = StoreSource::open(
            st.to_str().unwrap(),
            name,
            StoreSourceOptions::insecure_unverified(),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut buf = vec![0u8; img.len()];
        src.read_at(0, &mut buf)
            .unwrap_or_else(|e| panic!("{name} lost a chunk: {e}"));
        assert!(buf == img, "{name} reads back its image");
    };

    /// Stops the gc loop when dropped, also when a publisher panics (so a failure is
    /// reported instead of hanging the scope).
    struct StopOnDrop<'a>(&'a AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }

    std::thread::scope(|s| {
        let _stop_guard = StopOnDrop(&stop);
        // gc loop: keep deleting the victims and collecting.
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                for p in 0..2 {
                    let _ = std::fs::remove_file(st.join(format!("indexes/victim{p}.idx")));
                }
                if st.join("chunks").exists() {
                    let r = gc(&st).unwrap();
                    deleted_by_gc.fetch_add(r.objects_deleted, Ordering::Relaxed);
                    gcs.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let publishers: Vec<_> = (0..2u64)
            .map(|p| {
                let (base, published, st, verify) = (&base, &published, &st, &verify);
                let tmp = tmp.path();
                s.spawn(move || {
                    let mut round = 0u64;
                    while Instant::now() < deadline && round < 15 {
                        // A fresh image: the shared base with a new 256 KiB patch.
                        let mut img = base.to_vec();
                        let patch = random_bytes(1000 * (p + 1) + round, 256 * 1024);
                        let at = ((round as usize * 7 + p as usize) % 7) * 256 * 1024;
                        img[at..at + patch.len()].copy_from_slice(&patch);
                        let path = write_image(tmp, &format!("p{p}.img"), &img);
                        publish(&path, st, &format!("victim{p}"), cs, None, false).unwrap();
                        // The keeper holds the same chunks: it reuses the victim's objects,
                        // which gc is trying to collect.
                        let name = format!("keeper{p}-{}", round % 3);
                        publish(&path, st, &name, cs, None, false).unwrap();
                        let img = Arc::new(img);
                        published.lock().unwrap().insert(name.clone(), img.clone());
                        // Finished: it must read back whole even while gc runs.
                        verify(&name, &img);
                        round += 1;
                    }
                    round
                })
            })
            .collect();
        let rounds: u64 = publishers.into_iter().map(|h| h.join().unwrap()).sum();
        eprintln!("{rounds} publish rounds");
        assert!(rounds >= 6, "only {rounds} rounds ran");
    });
    assert!(gcs.load(Ordering::Relaxed) > 5, "gc ran concurrently");
    assert!(
        deleted_by_gc.load(Ordering::Relaxed) > 0,
        "gc really collected objects"
    );

    // Final check: every keeper reads back; nothing is missing or left over.
    for p in 0..2 {
        let _ = std::fs::remove_file(st.join(format!("indexes/victim{p}.idx")));
    }
    gc(&st).unwrap();
    let published = published.lock().unwrap().clone();
    for (name, img) in &published {
        verify(name, img);
    }
    let s = store::stats(&st).unwrap();
    assert_eq!(s.total.missing_objects, 0);
    assert_eq!(s.total.unreferenced_objects, 0);
    assert_eq!(s.images.len(), published.len());
}
