//! Migrating v1 → v2 where v2 is a chunk-store image served by a real nginx: with seeding,
//! only the chunks v1 does not hold are downloaded (nginx access log); without, every
//! distinct non-zero chunk of v2 once. Commit gives v2 bit for bit, rollback v1; guest
//! writes to seeded chunks never touch the source. Tampered chunks, tampered or truncated
//! indexes and wrong keys give a clear error and change nothing.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use streamboot::source::{HttpOptions, RemoteSource, SourceIdentity};
use streamboot::store::index::ChunkHash;
use streamboot::store::layout::chunk_rel;

use common::disk::{self, cli, cli_err, cli_ok, sha256, sha256_file};
use common::nginx::Nginx;

const CHUNK: usize = 64 << 10;
const CHUNKS: usize = 256;

/// v1 (the source) and v2 (the target): v2 keeps most of v1, moves a run of chunks to
/// other addresses, changes a few (one inside the boot range), zeroes some, repeats one new
/// chunk at several addresses, and has a different, unaligned size.
fn images() -> (Vec<u8>, Vec<u8>) {
    let v1 = common::random_bytes(1, CHUNKS * CHUNK + 5000);
    let mut v2 = v1[..CHUNKS * CHUNK].to_vec();
    v2.extend_from_slice(&common::random_bytes(2, 777));
    let fresh = common::random_bytes(3, 40 * CHUNK);
    let chunk = |i: usize| i * CHUNK..(i + 1) * CHUNK;
    // Moved: chunks 100..140 take v1's chunks 37 further on.
    for i in 100..140 {
        v2[chunk(i)].copy_from_slice(&v1[chunk((i + 37) % CHUNKS)]);
    }
    // Changed: one boot chunk and 20 others.
    for (n, i) in std::iter::once(3).chain(150..170).enumerate() {
        v2[chunk(i)].copy_from_slice(&fresh[chunk(n)]);
    }
    // Zeroed.
    for i in 180..190 {
        v2[chunk(i)].fill(0);
    }
    // One new chunk at five addresses.
    for i in 200..205 {
        v2[chunk(i)].copy_from_slice(&fresh[chunk(30)]);
    }
    (v1, v2)
}

/// Bytes of v2's distinct non-zero chunks that v1 does not hold at any chunk address:
/// what a seeding migration has to download, computed from the images alone.
fn differing_bytes(v1: &[u8], v2: &[u8]) -> u64 {
    let local: HashSet<&[u8]> = v1.chunks_exact(CHUNK).collect();
    let mut seen: HashSet<&[u8]> = HashSet::new();
    v2.chunks(CHUNK)
        .filter(|c| c.iter().any(|&b| b != 0) && !local.contains(c) && seen.insert(c))
        .map(|c| c.len() as u64)
        .sum()
}

/// Distinct non-zero chunks of v2.
fn distinct_nonzero(v2: &[u8]) -> usize {
    v2.chunks(CHUNK)
        .filter(|c| c.iter().any(|&b| b != 0))
        .collect::<HashSet<_>>()
        .len()
}

/// A signed store holding v2, served by nginx.
struct Store {
    _dir: tempfile::TempDir,
    root: PathBuf,
    public: String,
    nginx: Nginx,
    v1: Vec<u8>,
    v2: Vec<u8>,
}

impl Store {
    fn new() -> Store {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let key = dir.path().join("signer");
        cli_ok(&["keygen", key.to_str().unwrap()]);
        let (v1, v2) = images();
        let img = dir.path().join("v2.img");
        std::fs::write(&img, &v2).unwrap();
        cli_ok(&[
            "publish",
            img.to_str().unwrap(),
            "--store",
            root.to_str().unwrap(),
            "--name",
            "v2",
            "--chunk-size",
            "64K",
            "--key",
            key.with_extension("key").to_str().unwrap(),
        ]);
        let nginx = Nginx::serve(&root);
        Store {
            public: key.with_extension("pub").to_str().unwrap().to_string(),
            _dir: dir,
            root,
            nginx,
            v1,
            v2,
        }
    }

    fn index_url(&self) -> String {
        self.nginx.url("indexes/v2.idx")
    }

    /// A new disk holding v1.
    fn disk(&self, dir: &Path) -> PathBuf {
        let d = dir.join("disk.img");
        std::fs::write(&d, &self.v1).unwrap();
        d
    }

    /// Bytes nginx sent so far, and the chunk objects it served (one path per request).
    fn downloads(&self) -> (u64, Vec<String>) {
        let log = self.nginx.access_log();
        let chunks = log
            .iter()
            .filter(|e| e.status == 200 && e.request.contains("/chunks/"))
            .map(|e| e.request.clone())
            .collect();
        (log.iter().map(|e| e.bytes_sent).sum(), chunks)
    }

    /// Path of the stored object of v2's chunk `c` (stored uncompressed).
    fn object(&self, c: usize) -> PathBuf {
        let h = ChunkHash::of(&self.v2[c * CHUNK..(c + 1) * CHUNK]);
        self.root.join(chunk_rel(&h, false))
    }
}

fn prepare(s: &Store, d: &Path, extra: &[&str]) -> serde_json::Value {
    let url = s.index_url();
    let mut args = vec![
        "--json",
        "prepare",
        d.to_str().unwrap(),
        "--target",
        &url,
        "--trusted-key",
        &s.public,
    ];
    args.extend_from_slice(extra);
    serde_json::from_str(cli_ok(&args).trim()).unwrap()
}

#[test]
fn seeding_downloads_only_differing_chunks() {
    let s = Store::new();
    let dir = tempfile::tempdir().unwrap();
    let d = s.disk(dir.path());
    let dp = d.to_str().unwrap();
    let out = prepare(&s, &d, &[]);
    let seeded = out["seed"]["bytes"].as_u64().unwrap();
    cli_ok(&["hydrate", dp]);
    let st: serde_json::Value =
        serde_json::from_str(cli_ok(&["--json", "status", dp]).trim()).unwrap();
    assert_eq!(st["status"]["bytes_seeded"].as_u64(), Some(seeded), "{st}");
    cli_ok(&["commit", "--force", dp]);
    assert_eq!(sha256_file(&d), sha256(&s.v2), "committed disk != v2");

    let (sent, chunks) = s.downloads();
    let differ = differing_bytes(&s.v1, &s.v2);
    println!(
        "seeding: downloaded {sent} bytes in {} chunk requests; differing chunks {differ} bytes; \
         seeded {seeded} bytes",
        chunks.len()
    );
    assert!(differ > 0);
    assert!(
        sent as f64 <= 1.05 * differ as f64,
        "downloaded {sent} bytes, more than 1.05 × {differ} differing"
    );
    // Everything v2 shares with v1 was seeded: all non-zero chunks minus the differing.
    let nonzero: u64 =
        s.v2.chunks(CHUNK)
            .filter(|c| c.iter().any(|&b| b != 0))
            .map(|c| c.len() as u64)
            .sum();
    assert_eq!(seeded, nonzero - differ - 4 * CHUNK as u64, "seeded bytes");
}

#[test]
fn without_seeding_every_distinct_chunk_is_downloaded_once() {
    let s = Store::new();
    let dir = tempfile::tempdir().unwrap();
    let d = s.disk(dir.path());
    let dp = d.to_str().unwrap();
    let out = prepare(&s, &d, &["--no-seed"]);
    assert!(out["seed"].is_null(), "{out}");
    cli_ok(&["hydrate", dp]);
    cli_ok(&["commit", "--force", dp]);
    assert_eq!(sha256_file(&d), sha256(&s.v2), "committed disk != v2");
    let (sent, chunks) = s.downloads();
    let distinct: HashSet<&String> = chunks.iter().collect();
    for c in &distinct {
        let n = chunks.iter().filter(|x| x == c).count();
        if n > 1 {
            let at: Vec<usize> = (0..s.v2.len().div_ceil(CHUNK))
                .filter(|&i| {
                    let h = ChunkHash::of(&s.v2[i * CHUNK..((i + 1) * CHUNK).min(s.v2.len())]);
                    c.contains(&h.to_hex())
                })
                .collect();
            println!("{c} x{n} at {at:?}");
        }
    }
    println!(
        "no seeding: downloaded {sent} bytes in {} chunk requests",
        chunks.len()
    );
    assert_eq!(distinct.len(), distinct_nonzero(&s.v2), "chunks fetched");
    assert_eq!(chunks.len(), distinct.len(), "a chunk was fetched twice");
}

/// Guest writes to seeded chunks land in slots: rollback restores v1 exactly; commit gives
/// v2 with the writes.
#[test]
fn writes_to_seeded_chunks_then_rollback_or_commit() {
    let s = Store::new();
    for commit in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let d = s.disk(dir.path());
        let dp = d.to_str().unwrap();
        prepare(&s, &d, &[]);
        let sb = boot_relocator::MetaStore::open(disk::storage(&d))
            .unwrap()
            .unwrap()
            .superblock()
            .clone();
        let pinned = SourceIdentity {
            kind: sb.target.kind.clone(),
            size: sb.layout.target_size,
            validator: sb.target.validator.clone(),
        };
        let src: Arc<dyn RemoteSource> = streamboot::target::open_source(
            &[s.index_url()],
            Some(&pinned),
            &HttpOptions::default(),
        )
        .unwrap();
        let mut model = s.v2.clone();
        {
            let engine = disk::engine(&d, &src);
            // Same-address seeded (10, 50), moved seeded (120), boot (0), fetched (160).
            for (c, fill) in [
                (10usize, 0xA1u8),
                (50, 0xA2),
                (120, 0xA3),
                (0, 0xA4),
                (160, 0xA5),
            ] {
                let off = c * CHUNK + 1000;
                engine.write(off as u64, &[fill; 3000]).unwrap();
                model[off..off + 3000].fill(fill);
                let mut back = vec![0u8; CHUNK];
                engine.read((c * CHUNK) as u64, &mut back).unwrap();
                assert!(
                    back == model[c * CHUNK..(c + 1) * CHUNK],
                    "chunk {c} read back"
                );
            }
            engine.flush().unwrap();
        }
        if commit {
            cli_ok(&["commit", "--force", dp]);
            assert_eq!(sha256_file(&d), sha256(&model), "commit != v2 + writes");
        } else {
            cli_ok(&["rollback", dp]);
            assert_eq!(sha256_file(&d), sha256(&s.v1), "rollback != v1");
        }
    }
}

/// A chunk object whose bytes do not match its hash: fetching it fails (after retries)
/// with a verification error, every other chunk is served, nothing wrong is stored.
#[test]
fn tampered_chunk_is_an_error_never_data() {
    let s = Store::new();
    let dir = tempfile::tempdir().unwrap();
    let d = s.disk(dir.path());
    let dp = d.to_str().unwrap();
    prepare(&s, &d, &[]);
    let obj = s.object(155);
    let good = std::fs::read(&obj).unwrap();
    let mut bad = good.clone();
    bad[100] ^= 0xFF;
    std::fs::write(&obj, &bad).unwrap();

    let err = cli_err(&["hydrate", dp, "--fetch-deadline", "2"]);
    assert!(err.contains("verification failed"), "{err}");
    let st: serde_json::Value =
        serde_json::from_str(cli_ok(&["--json", "status", dp]).trim()).unwrap();
    assert!(
        st["status"]["chunks_missing"].as_u64().unwrap() >= 1,
        "{st}"
    );

    // In the engine: the tampered chunk is an I/O error, its neighbours read fine.
    {
        let sb = boot_relocator::MetaStore::open(disk::storage(&d))
            .unwrap()
            .unwrap()
            .superblock()
            .clone();
        let pinned = streamboot::target::pinned_identity(&sb);
        let src = streamboot::target::open_source(
            &[s.index_url()],
            Some(&pinned),
            &HttpOptions::default(),
        )
        .unwrap();
        let engine = disk::engine(&d, &src);
        let mut buf = vec![0u8; CHUNK];
        assert!(engine.read((155 * CHUNK) as u64, &mut buf).is_err());
        engine.read((156 * CHUNK) as u64, &mut buf).unwrap();
        assert!(buf == s.v2[156 * CHUNK..157 * CHUNK]);
        assert!(engine.status().fetch_errors >= 1);
    }

    // Repaired: the migration completes with exactly v2 (nothing wrong was stored).
    std::fs::write(&obj, &good).unwrap();
    cli_ok(&["hydrate", dp]);
    cli_ok(&["commit", "--force", dp]);
    assert_eq!(sha256_file(&d), sha256(&s.v2), "committed disk != v2");
}

/// Index problems stop prepare before the disk is touched, with one clear line.
#[test]
fn bad_index_or_key_fails_prepare_and_changes_nothing() {
    let s = Store::new();
    let dir = tempfile::tempdir().unwrap();
    let d = s.disk(dir.path());
    let dp = d.to_str().unwrap();
    let before = sha256_file(&d);
    let url = s.index_url();
    let idx = s.root.join("indexes/v2.idx");
    let good = std::fs::read(&idx).unwrap();
    let other = dir.path().join("other");
    cli_ok(&["keygen", other.to_str().unwrap()]);
    let other_pub = other.with_extension("pub");

    let base = ["prepare", dp, "--target", url.as_str()];
    let with = |extra: &[&str]| {
        let mut a: Vec<&str> = base.to_vec();
        a.extend_from_slice(extra);
        cli_err(&a)
    };

    let err = with(&[]);
    assert!(err.contains("--trusted-key"), "no key: {err}");
    let err = with(&["--trusted-key", other_pub.to_str().unwrap()]);
    assert!(
        err.contains("signature") || err.contains("key"),
        "wrong key: {err}"
    );

    let mut tampered = good.clone();
    let mid = tampered.len() / 2;
    tampered[mid] ^= 0x01;
    std::fs::write(&idx, &tampered).unwrap();
    let err = with(&["--trusted-key", &s.public]);
    assert!(err.contains("verification failed"), "tampered index: {err}");

    std::fs::write(&idx, &good[..good.len() / 2]).unwrap();
    let err = with(&["--trusted-key", &s.public]);
    assert!(
        err.contains("verification failed"),
        "truncated index: {err}"
    );

    std::fs::write(&idx, &good).unwrap();
    assert_eq!(sha256_file(&d), before, "a failed prepare changed the disk");
    // The insecure opt-out only skips the signature: a good index prepares.
    cli_ok(&[
        "prepare",
        dp,
        "--target",
        &url,
        "--insecure-unverified-index",
    ]);
    let out = cli(&["status", dp]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("seeded"));
}
