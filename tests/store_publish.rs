//! Publishing related images into one store, deduplication, stats, and reading images back
//! through `StoreSource` (local directory), on real bytes.

mod store_common;

use std::collections::BTreeSet;
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use store_common::*;
use streamboot::source::store::{StoreSource, StoreSourceOptions};
use streamboot::source::{RemoteSource, SourceError};
use streamboot::store::{self, publish, PublishOptions};

/// Reads `len` bytes at `off` through the source.
fn read(src: &StoreSource, off: u64, len: usize) -> Result<Vec<u8>, SourceError> {
    let mut buf = vec![0u8; len];
    src.read_at(off, &mut buf)?;
    Ok(buf)
}

/// Random ranges (and the edges) must read back exactly as the image.
fn check_round_trip(src: &StoreSource, img: &[u8], seed: u64, n: usize) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let size = img.len() as u64;
    assert_eq!(src.size(), size);
    let mut ranges = vec![(0, img.len()), (size - 1, 1), (size - 5000, 5000), (0, 1)];
    for _ in 0..n {
        let len = match rng.random_range(0..3) {
            0 => rng.random_range(1..4096),
            1 => rng.random_range(1..3 * CS),
            _ => rng.random_range(1..1024 * 1024),
        }
        .min(img.len());
        let off = rng.random_range(0..=size - len as u64);
        ranges.push((off, len));
    }
    for (off, len) in ranges {
        let got = read(src, off, len).unwrap();
        assert!(
            got == img[off as usize..off as usize + len],
            "mismatch at {off}+{len}"
        );
    }
}

#[test]
fn two_related_images_share_chunks_and_read_back() {
    let tmp = tempfile::tempdir().unwrap();
    let a = image_a();
    let b = image_b(&a);
    let pa = write_image(tmp.path(), "a.img", &a);
    let pb = write_image(tmp.path(), "b.img", &b);
    let st = tmp.path().join("store");
    let key = key(7);

    let ma = model(&a, CS);
    let mb = model(&b, CS);
    let da = ma.distinct();
    let db = mb.distinct();
    let shared: BTreeSet<_> = da.intersection(&db).copied().collect();
    let all: BTreeSet<_> = da.union(&db).copied().collect();
    let len_of = |h: &[u8; 32]| ma.lens.get(h).or(mb.lens.get(h)).copied().unwrap();
    assert!(
        shared.len() > 200 && shared.len() < da.len(),
        "test images overlap partly"
    );

    // First image: everything new, in-image duplicates written once.
    let ra = publish(&pa, &st, "a", CS as u64, Some(&key), false).unwrap();
    assert_eq!(ra.chunks_total, ma.chunks.len() as u64);
    assert_eq!(ra.chunks_zero, ma.zero_chunks());
    assert_eq!(ra.chunks_new, da.len() as u64);
    assert_eq!(ra.chunks_reused, 0);
    assert_eq!(
        ra.chunks_repeated,
        ma.chunks.len() as u64 - ma.zero_chunks() - da.len() as u64
    );
    assert_eq!(ra.chunks_repeated, 2, "chunk 50 appears three times");
    assert_eq!(ra.bytes_shared, 0, "no other image yet");
    assert_eq!(ra.bytes_new, da.iter().map(len_of).sum::<u64>());
    assert_eq!(ra.bytes_stored, ra.bytes_new, "uncompressed");
    assert_eq!(
        ra.signed_by.as_deref(),
        Some(
            store::sign::key_id(&key.verifying_key())
                .to_string()
                .as_str()
        )
    );

    // Second image: the shared chunks are reused, not rewritten.
    let rb = publish(&pb, &st, "b", CS as u64, Some(&key), false).unwrap();
    let b_new: BTreeSet<_> = db.difference(&da).copied().collect();
    assert_eq!(rb.chunks_new, b_new.len() as u64);
    let b_reused_positions = mb
        .chunks
        .iter()
        .flatten()
        .filter(|h| da.contains(*h))
        .count() as u64;
    assert_eq!(rb.chunks_reused, b_reused_positions);
    assert_eq!(rb.bytes_shared, shared.iter().map(len_of).sum::<u64>());
    assert_eq!(rb.image_size, b.len() as u64);

    // On disk: each distinct non-zero chunk exactly once, named by its BLAKE3.
    let objs = objects_on_disk(&st);
    assert_eq!(objs.len(), all.len());
    assert_eq!(object_sha_set(&st), all);

    // Stats agree with the independent count.
    let s = store::stats(&st).unwrap();
    assert_eq!(s.images.len(), 2);
    let (sa, sb) = (&s.images[0], &s.images[1]);
    assert_eq!((sa.name.as_str(), sb.name.as_str()), ("a", "b"));
    for (si, m, d) in [(sa, &ma, &da), (sb, &mb, &db)] {
        assert_eq!(si.chunks, m.chunks.len() as u64);
        assert_eq!(si.zero_chunks, m.zero_chunks());
        assert_eq!(si.distinct_chunks, d.len() as u64);
        assert_eq!(si.shared_chunks, shared.len() as u64);
        assert_eq!(si.shared_bytes, shared.iter().map(len_of).sum::<u64>());
        let unique: Vec<_> = d.difference(&shared).collect();
        assert_eq!(si.unique_chunks, unique.len() as u64);
        assert_eq!(
            si.unique_bytes,
            unique.iter().map(|h| len_of(h)).sum::<u64>()
        );
        assert_eq!(si.missing_objects, 0);
    }
    assert_eq!(sa.logical_bytes, a.len() as u64);
    assert_eq!(sb.logical_bytes, b.len() as u64);
    assert_eq!(s.total.images, 2);
    assert_eq!(s.total.logical_bytes, (a.len() + b.len()) as u64);
    assert_eq!(s.total.distinct_chunks, all.len() as u64);
    assert_eq!(s.total.shared_chunks, shared.len() as u64);
    assert_eq!(s.total.shared_bytes, shared.iter().map(len_of).sum::<u64>());
    assert_eq!(s.total.unique_chunks, (all.len() - shared.len()) as u64);
    assert_eq!(s.total.stored_objects, all.len() as u64);
    let on_disk_bytes: u64 = objs.values().map(|d| d.len() as u64).sum();
    assert_eq!(s.total.stored_bytes, on_disk_bytes);
    assert_eq!(s.total.distinct_bytes, on_disk_bytes);
    assert_eq!(s.total.unreferenced_objects, 0);

    // Round trips through StoreSource, with and without the cache.
    let mut sa_entries = Vec::new();
    for cache in [0, 16] {
        let mut o = StoreSourceOptions::trusted(key.verifying_key());
        o.cache_chunks = cache;
        let sa = StoreSource::open(st.to_str().unwrap(), "a", o.clone()).unwrap();
        let sb = StoreSource::open(st.to_str().unwrap(), "b", o).unwrap();
        check_round_trip(&sa, &a, 11 + cache as u64, 150);
        check_round_trip(&sb, &b, 12 + cache as u64, 150);
        assert_eq!(sa.identity().kind, "store");
        assert_eq!(sa.identity().validator, ra.index_hash);
        assert_eq!(sb.identity().validator, rb.index_hash);
        sa_entries = sa.index().entries().to_vec();
    }

    // Publishing the same image again writes nothing new.
    // It is a new publication: the next version, so a new index hash, same chunks.
    let again = publish(&pa, &st, "a", CS as u64, Some(&key), false).unwrap();
    assert_eq!(again.chunks_new, 0);
    assert_eq!((ra.identity.version, again.identity.version), (1, 2));
    assert_ne!(
        again.index_hash, ra.index_hash,
        "a new version is a new index"
    );
    let o = StoreSourceOptions::trusted(key.verifying_key());
    let sa2 = StoreSource::open(st.to_str().unwrap(), "a", o).unwrap();
    assert_eq!(sa2.index().entries(), sa_entries.as_slice());
    assert_eq!(objects_on_disk(&st).len(), all.len());
}

#[test]
fn accessors_known_zero_and_profile() {
    let tmp = tempfile::tempdir().unwrap();
    let a = image_a();
    let pa = write_image(tmp.path(), "a.img", &a);
    let st = tmp.path().join("store");
    let key = key(3);
    let mut opts = PublishOptions::new(CS as u64);
    opts.key = Some(&key);
    opts.boot_profile = vec![0, 1, 2, 300, 17];
    store::publish_with(&pa, &st, "a", &opts).unwrap();

    let src = StoreSource::open(
        st.to_str().unwrap(),
        "a",
        StoreSourceOptions::trusted(key.verifying_key()),
    )
    .unwrap();
    assert_eq!(src.boot_profile(), &[0, 1, 2, 300, 17]);
    assert_eq!(src.chunk_size(), CS as u64);
    assert_eq!(src.chunk_count(), 384);
    let m = model(&a, CS);
    for (c, h) in m.chunks.iter().enumerate() {
        let c = c as u64;
        assert_eq!(src.chunk_hash(c).is_none(), h.is_none(), "chunk {c}");
        if h.is_some() {
            let want = blake3::hash(&a[c as usize * CS..(c as usize + 1) * CS]);
            assert_eq!(src.chunk_hash(c).unwrap().0, *want.as_bytes());
        }
    }
    assert_eq!(src.chunk_hash(384), None);
    let cs = CS as u64;
    assert_eq!(src.known_zero(10 * cs, 10 * cs), Some(true));
    assert_eq!(src.known_zero(10 * cs + 5, 100), Some(true));
    assert_eq!(src.known_zero(9 * cs, 2 * cs), Some(false));
    assert_eq!(
        src.known_zero(30 * cs, 100),
        None,
        "half-zero chunk: unknown"
    );
    assert_eq!(src.known_zero(0, u64::MAX), None);
    assert_eq!(src.read_chunk(12).unwrap(), vec![0u8; CS]);
    assert_eq!(src.read_chunk(51).unwrap(), &a[51 * CS..52 * CS]);

    // Zero chunks are never fetched: deleting every object still reads them.
    std::fs::remove_dir_all(st.join("chunks")).unwrap();
    let src = StoreSource::open(
        st.to_str().unwrap(),
        "a",
        StoreSourceOptions::trusted(key.verifying_key()),
    )
    .unwrap();
    assert_eq!(read(&src, 10 * cs, 10 * CS).unwrap(), vec![0u8; 10 * CS]);
    let err = read(&src, 0, 10).unwrap_err();
    assert!(!err.is_transient(), "a missing object is permanent: {err}");

    // Out of range reads are refused.
    assert!(matches!(
        read(&src, a.len() as u64 - 1, 2),
        Err(SourceError::OutOfRange { .. })
    ));

    // The profile can be replaced later, re-signed by the same key.
    let h = store::set_boot_profile(&st, "a", vec![5, 4], Some(&key)).unwrap();
    let src = StoreSource::open(
        st.to_str().unwrap(),
        "a",
        StoreSourceOptions::trusted(key.verifying_key()),
    )
    .unwrap();
    assert_eq!(src.boot_profile(), &[5, 4]);
    assert_eq!(src.identity().validator, h.to_hex());
    assert!(store::set_boot_profile(&st, "a", vec![1], Some(&store_common::key(4))).is_err());
    assert!(store::set_boot_profile(&st, "a", vec![384], Some(&key)).is_err());
}

#[test]
fn compressed_store_round_trips_and_dedups_across_forms() {
    let tmp = tempfile::tempdir().unwrap();
    // Compressible image: text-like data with zero runs.
    let mut a = Vec::with_capacity(8 * MIB);
    let mut i = 0u64;
    while a.len() < 8 * MIB {
        a.extend_from_slice(format!("line {i} of a compressible image\n").as_bytes());
        i += 1;
    }
    a.truncate(8 * MIB - 100);
    a[MIB..2 * MIB].fill(0);
    // Incompressible half: random.
    let r = random_bytes(9, 2 * MIB);
    a[4 * MIB..6 * MIB].copy_from_slice(&r);
    let pa = write_image(tmp.path(), "a.img", &a);
    let st = tmp.path().join("store");
    let key = key(5);

    let ra = publish(&pa, &st, "z", CS as u64, Some(&key), true).unwrap();
    assert!(
        ra.bytes_stored < ra.bytes_new / 2,
        "text compresses: {ra:?}"
    );
    let objs = std::fs::read_dir(st.join("chunks"))
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .map(|f| f.unwrap().file_name().into_string().unwrap())
        .collect::<Vec<_>>();
    assert!(objs.iter().any(|n| n.ends_with(".zst")));
    assert!(
        objs.iter().any(|n| !n.ends_with(".zst")),
        "random chunks stay raw: compression would not shrink them"
    );
    let src = StoreSource::open(
        st.to_str().unwrap(),
        "z",
        StoreSourceOptions::trusted(key.verifying_key()),
    )
    .unwrap();
    check_round_trip(&src, &a, 21, 60);

    // The same image published without compression reuses the compressed objects.
    let rb = publish(&pa, &st, "raw", CS as u64, Some(&key), false).unwrap();
    assert_eq!(rb.chunks_new, 0);
    assert_eq!(objects_on_disk(&st).len(), objs.len());

    // A tampered compressed object is a verification error, never data.
    let zst = objs.iter().find(|n| n.ends_with(".zst")).unwrap();
    let path = st.join("chunks").join(&zst[..2]).join(zst);
    let mut raw = std::fs::read(&path).unwrap();
    let n = raw.len();
    raw[n / 2] ^= 1;
    std::fs::write(&path, &raw).unwrap();
    let hash = streamboot::store::ChunkHash::from_hex(zst.trim_end_matches(".zst")).unwrap();
    let c = (0..src.chunk_count())
        .find(|&c| src.chunk_hash(c) == Some(hash))
        .unwrap();
    let mut o = StoreSourceOptions::trusted(key.verifying_key());
    o.cache_chunks = 0;
    let src = StoreSource::open(st.to_str().unwrap(), "z", o).unwrap();
    let err = src.read_chunk(c).unwrap_err();
    assert!(matches!(err, SourceError::Verify { .. }), "{err}");
}

#[test]
fn tampered_chunk_is_a_verify_error() {
    let tmp = tempfile::tempdir().unwrap();
    let a = image_a();
    let pa = write_image(tmp.path(), "a.img", &a);
    let st = tmp.path().join("store");
    let key = key(8);
    publish(&pa, &st, "a", CS as u64, Some(&key), false).unwrap();
    let mut o = StoreSourceOptions::trusted(key.verifying_key());
    o.cache_chunks = 0;
    let src = StoreSource::open(st.to_str().unwrap(), "a", o).unwrap();

    let c = 42u64;
    let hash = src.chunk_hash(c).unwrap();
    let path = st
        .join("chunks")
        .join(&hash.to_hex()[..2])
        .join(hash.to_hex());
    let good = std::fs::read(&path).unwrap();

    // One flipped bit.
    let mut bad = good.clone();
    bad[1234] ^= 0x10;
    std::fs::write(&path, &bad).unwrap();
    let off = c * CS as u64;
    let err = read(&src, off + 10, 100).unwrap_err();
    assert!(matches!(err, SourceError::Verify { .. }), "{err}");
    assert!(err.is_transient(), "callers retry verification failures");
    // A read that spans the bad chunk fails whole; one next to it still works.
    assert!(read(&src, off - 10, 20).is_err());
    assert_eq!(
        read(&src, off - 10, 10).unwrap(),
        &a[off as usize - 10..off as usize]
    );

    // Truncated, and swapped for another valid chunk: both refused.
    std::fs::write(&path, &good[..CS - 1]).unwrap();
    assert!(matches!(
        read(&src, off, 1),
        Err(SourceError::Verify { .. })
    ));
    std::fs::write(&path, &a[43 * CS..44 * CS]).unwrap();
    assert!(matches!(
        read(&src, off, 1),
        Err(SourceError::Verify { .. })
    ));
    // Oversized object: refused by the size cap.
    let mut big = good.clone();
    big.push(0);
    std::fs::write(&path, &big).unwrap();
    assert!(read(&src, off, 1).is_err());

    // Restored: reads work again (nothing bad was cached).
    std::fs::write(&path, &good).unwrap();
    assert_eq!(
        read(&src, off, CS).unwrap(),
        &a[off as usize..off as usize + CS]
    );
}

#[test]
fn many_threads_read_one_source() {
    let tmp = tempfile::tempdir().unwrap();
    let a = image_a();
    let pa = write_image(tmp.path(), "a.img", &a);
    let st = tmp.path().join("store");
    publish(&pa, &st, "a", CS as u64, None, false).unwrap();
    // Unsigned index: refused unless the caller opts out explicitly.
    let k = key(1);
    let err = StoreSource::open(
        st.to_str().unwrap(),
        "a",
        StoreSourceOptions::trusted(k.verifying_key()),
    )
    .unwrap_err();
    assert!(err.to_string().contains("not signed"), "{err}");
    let src = Arc::new(
        StoreSource::open(
            st.to_str().unwrap(),
            "a",
            StoreSourceOptions::insecure_unverified(),
        )
        .unwrap(),
    );
    let a = Arc::new(a);
    let handles: Vec<_> = (0..6)
        .map(|t| {
            let (src, a) = (src.clone(), a.clone());
            std::thread::spawn(move || check_round_trip(&src, &a, 100 + t, 80))
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn publish_rejects_bad_arguments() {
    let tmp = tempfile::tempdir().unwrap();
    let pa = write_image(tmp.path(), "a.img", &random_bytes(1, 100_000));
    let st = tmp.path().join("store");
    for cs in [0, 1000, 2048, 8 * MIB as u64, 3 * 4096] {
        assert!(matches!(
            publish(&pa, &st, "a", cs, None, false),
            Err(store::StoreError::BadChunkSize(_))
        ));
    }
    for name in ["", "../x", "a/b", ".hidden"] {
        assert!(matches!(
            publish(&pa, &st, name, 4096, None, false),
            Err(store::StoreError::BadName(_))
        ));
    }
    let mut o = PublishOptions::new(4096);
    o.boot_profile = vec![1, 1];
    assert!(store::publish_with(&pa, &st, "a", &o).is_err());
    // An odd-sized small image at the smallest and largest chunk sizes.
    for cs in [4096u64, 4 * MIB as u64] {
        let r = publish(&pa, &st, &format!("odd{cs}"), cs, None, false).unwrap();
        let src = StoreSource::open(
            st.to_str().unwrap(),
            &format!("odd{cs}"),
            StoreSourceOptions::insecure_unverified(),
        )
        .unwrap();
        assert_eq!(r.chunks_total, 100_000u64.div_ceil(cs));
        check_round_trip(&src, &random_bytes(1, 100_000), cs, 30);
    }
    // An empty image is a valid, empty store image.
    let empty = write_image(tmp.path(), "empty.img", &[]);
    let r = publish(&empty, &st, "empty", 4096, None, false).unwrap();
    assert_eq!(r.chunks_total, 0);
}

/// Publish throughput on a 256 MiB image (ignored by default; run in release):
/// `cargo test --release --test store_publish -- --ignored --nocapture publish_throughput`.
/// The image is half random data, a quarter compressible text and a quarter zeros; it is
/// published into a fresh store without and with compression, then again (all reused).
/// `STORE_BENCH_DIR=/dev/shm` runs it on tmpfs, leaving only the CPU work.
#[test]
#[ignore]
fn publish_throughput_256mib() {
    // STORE_BENCH_DIR picks the file system (e.g. /dev/shm to take the disk out).
    let tmp = match std::env::var_os("STORE_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d).unwrap(),
        None => tempfile::tempdir().unwrap(),
    };
    let mut img = random_bytes(42, 256 * MIB);
    let mut text = Vec::with_capacity(64 * MIB);
    let mut i = 0u64;
    while text.len() < 64 * MIB {
        text.extend_from_slice(format!("{i:08} some log line of a root file system\n").as_bytes());
        i += 1;
    }
    img[128 * MIB..192 * MIB].copy_from_slice(&text[..64 * MIB]);
    img[192 * MIB..].fill(0);
    let p = write_image(tmp.path(), "big.img", &img);
    // CPU cost of the parts, single thread, for comparison with the wall-clock figures.
    let t = std::time::Instant::now();
    for c in img.chunks(MIB) {
        std::hint::black_box(blake3::hash(c));
    }
    let hash_s = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    for c in img[..192 * MIB].chunks(MIB) {
        std::hint::black_box(zstd::bulk::compress(c, 3).unwrap());
    }
    let zstd_s = t.elapsed().as_secs_f64();
    eprintln!(
        "one core: BLAKE3 {:.0} MiB/s, zstd-3 on the non-zero part {:.0} MiB/s",
        256.0 / hash_s,
        192.0 / zstd_s
    );
    drop(img);
    let key = key(1);
    for (store, cs, compress) in [
        ("s1", MIB, false),
        ("s2", MIB, true),
        ("s3", 64 * 1024, false),
    ] {
        let st = tmp.path().join(store);
        for run in ["fresh", "again"] {
            let mut o = PublishOptions::new(cs as u64);
            o.key = Some(&key);
            o.compress = compress;
            o.threads = std::env::var("STORE_BENCH_THREADS").map_or(0, |t| t.parse().unwrap());
            let r = store::publish_with(&p, &st, "big", &o).unwrap();
            eprintln!(
                "publish 256 MiB, {} KiB chunks, compress={compress}, {run}: {:.0} MiB/s \
                 ({:.2} s; new {} reused {} zero {}; stored {} bytes)",
                cs / 1024,
                r.throughput_mib_s,
                r.elapsed_secs,
                r.chunks_new,
                r.chunks_reused,
                r.chunks_zero,
                r.bytes_stored
            );
        }
    }
}
