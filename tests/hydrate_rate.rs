//! The hydrator's rate limiter is exact: every byte it lets through is a byte fetched,
//! budget a worker did not use is given back (counted tokens, not wall time).

mod common;

use std::sync::Arc;

use common::disk::{engine, prepare};
use streamboot::engine::{HydrateOptions, Hydrator};
use streamboot::source::{FileSource, RemoteSource};

#[test]
fn limited_hydration_takes_exactly_the_bytes_it_fetches() {
    for (len, threads, request) in [
        (7 << 20, 8, 8 << 20),
        (7_000_448, 3, 1 << 20),
        (300_032, 8, 256 << 10),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target.img");
        std::fs::write(&target, common::random_bytes(len as u64, len)).unwrap();
        let disk = dir.path().join("disk.img");
        std::fs::write(&disk, common::random_bytes(len as u64 + 1, 1 << 20)).unwrap();
        let src: Arc<dyn RemoteSource> = Arc::new(FileSource::open(&target, None).unwrap());
        prepare(&disk, &src, 64 << 10, 0..64 << 10, None);
        let e = engine(&disk, &src);
        let missing = e.status().chunks_missing;
        assert!(missing > 0);
        let opts = HydrateOptions {
            threads,
            request_bytes: request,
            profile: Vec::new(),
        };
        // A high rate: the test is about accounting, not about time.
        let h = Hydrator::new(opts, 1 << 30);
        let r = h.run(&e, &|_, _| {}).unwrap();
        assert_eq!(r.missing, 0);
        assert!(r.bytes > 0);
        assert_eq!(
            h.rate.taken(),
            r.bytes,
            "limiter let {} bytes through for {} bytes fetched ({len} bytes, {threads} threads)",
            h.rate.taken(),
            r.bytes
        );
    }
}
