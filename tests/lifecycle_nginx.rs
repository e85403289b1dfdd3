//! The whole offline lifecycle against a real nginx: prepare → hydrate → commit gives the
//! target bit for bit; prepare → partial hydrate (+ guest writes) → rollback gives the
//! source bit for bit. Chunk sizes 4 KiB, 64 KiB, 1 MiB; sizes that are not chunk
//! multiples; target larger and smaller than the source.

mod common;

use std::sync::Arc;

use rand::Rng;
use streamboot::source::{HttpOptions, HttpSource, RemoteSource};

use common::disk::{self, cli_ok, sha256, sha256_file};
use common::nginx::Nginx;

const CHUNKS: [(&str, u64); 3] = [("4K", 4096), ("64K", 65536), ("1M", 1 << 20)];
/// (source bytes, target bytes): target larger, then smaller.
const SIZES: [(usize, usize); 2] = [(5_000_001, 7_300_007), (9_000_003, 3_100_009)];

fn images(seed: u64, s: usize, t: usize) -> (Vec<u8>, Vec<u8>) {
    let source = common::random_bytes(seed, s);
    let mut target = common::random_bytes(seed + 1, t);
    // A zero run and a stretch identical to the source, as real images have.
    target[t / 3..t / 3 + 300_000].fill(0);
    let n = 200_000.min(s).min(t);
    target[..n].copy_from_slice(&source[..n]);
    (source, target)
}

/// Serves a fresh target as `name`, writes the source to a new disk file and prepares it
/// with the CLI. Returns (temp dir, disk path, source, target).
fn prepared(
    nginx: &Nginx,
    name: &str,
    seed: u64,
    s: usize,
    t: usize,
    chunk: &str,
) -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>, Vec<u8>) {
    let (source, target) = images(seed, s, t);
    nginx.put(name, &target);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("disk.img");
    std::fs::write(&d, &source).unwrap();
    let url = nginx.url(name);
    cli_ok(&[
        "prepare",
        d.to_str().unwrap(),
        "--target",
        &url,
        "--chunk-size",
        chunk,
    ]);
    (dir, d, source, target)
}

#[test]
fn prepare_hydrate_commit_gives_target() {
    let nginx = Nginx::start();
    for (ci, (cname, _)) in CHUNKS.iter().enumerate() {
        for (si, &(s, t)) in SIZES.iter().enumerate() {
            let seed = 100 + (ci * 10 + si) as u64;
            let (_dir, d, _source, target) =
                prepared(&nginx, &format!("t-{cname}-{si}.img"), seed, s, t, cname);
            let dp = d.to_str().unwrap();
            cli_ok(&["status", dp]);
            cli_ok(&["hydrate", dp]);
            cli_ok(&["confirm", dp]);
            cli_ok(&["commit", dp]);
            assert_eq!(
                sha256_file(&d),
                sha256(&target),
                "chunk {cname} sizes {s}/{t}: committed disk != target"
            );
            let st = cli_ok(&["--json", "status", dp]);
            assert!(st.contains("\"prepared\":false"), "area not removed: {st}");
        }
    }
}

#[test]
fn partial_hydrate_then_rollback_gives_source() {
    let nginx = Nginx::start();
    let mut rng = common::test_rng(7);
    for (ci, (cname, chunk)) in CHUNKS.iter().enumerate() {
        for (si, &(s, t)) in SIZES.iter().enumerate() {
            let seed = 200 + (ci * 10 + si) as u64;
            let name = format!("r-{cname}-{si}.img");
            let (_dir, d, source, target) = prepared(&nginx, &name, seed, s, t, cname);
            let dp = d.to_str().unwrap();
            assert_ne!(sha256_file(&d), sha256(&source), "prepare changed nothing?");
            {
                // Partial hydration by a "guest": reads fetch chunks, writes dirty them,
                // including writes to the boot chunks that sit at their home addresses.
                let src: Arc<dyn RemoteSource> = Arc::new(
                    HttpSource::open(&[nginx.url(&name)], None, HttpOptions::default()).unwrap(),
                );
                let engine = disk::engine(&d, &src);
                let mut model = target.clone();
                for _ in 0..20 {
                    let off = rng.random_range(0..t - 10_000);
                    let mut buf = vec![0u8; 10_000];
                    engine.read(off as u64, &mut buf).unwrap();
                    assert!(
                        buf[..] == model[off..off + 10_000],
                        "read differs from target"
                    );
                    let w = rng.random_range(0..t - 5000);
                    engine.write(w as u64, &[0xA5; 5000]).unwrap();
                    model[w..w + 5000].fill(0xA5);
                }
                engine.write(0, &vec![0x5A; *chunk as usize]).unwrap();
                engine.flush().unwrap();
            }
            let out = cli_ok(&["rollback", dp]);
            assert!(
                out.contains("discarded") || out.contains("rolled back"),
                "{out}"
            );
            assert_eq!(
                sha256_file(&d),
                sha256(&source),
                "chunk {cname} sizes {s}/{t}: rollback != source"
            );
        }
    }
}
