//! Image identity of signed chunk-store indexes, on the real binary: a signed index is
//! bound to its image name (an index of `b` copied over `a.idx` is refused: TUF's
//! mix-and-match), to a version that only grows (an older signed index replayed is
//! refused: rollback), and may expire. Version-1 indexes (no identity) are refused where a
//! signature is checked, accepted only without one (docs/chunk-store.md section 2.7).

mod common;
mod nbd_common;
mod store_common;

use std::path::Path;
use std::process::Command;

use nbd_common::*;
use store_common::CS;
use streamboot::store::index::{Index, Trust};
use streamboot::store::{load_signing_key, ImageIdentity};

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn export_args(d: &str) -> Vec<String> {
    vec![
        "--store".into(),
        format!("{d}/store"),
        "--trusted-key".into(),
        format!("{d}/key.pub"),
    ]
}

fn start(args: &[String]) -> Result<Export, String> {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    Export::start(&a)
}

/// Rewrites `idx` (signed by `d/key.key`) with `identity` (None: a version-1 index).
fn resign(d: &str, idx: &Path, identity: Option<ImageIdentity>) {
    let key = load_signing_key(Path::new(&format!("{d}/key.key"))).unwrap();
    let p = Index::parse(&std::fs::read(idx).unwrap(), Trust::Unverified).unwrap();
    let mut index = p.index.clone();
    if let Some(id) = identity {
        index = index.with_identity(id).unwrap();
    } else {
        // A version-1 index: the same content without an identity block.
        index = Index::new(
            index.image_size(),
            index.chunk_size(),
            index.entries().to_vec(),
            index.boot_profile().to_vec(),
        )
        .unwrap();
    }
    std::fs::write(idx, index.encode(Some(&key))).unwrap();
}

#[test]
fn an_index_copied_over_another_image_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _b) = publish_store(dir.path(), true);
    let d = dir.path().to_str().unwrap();
    let idx = |n: &str| dir.path().join(format!("store/indexes/{n}.idx"));
    // Both signed by the trusted key; b's index now sits at a's name.
    std::fs::copy(idx("b"), idx("a")).unwrap();

    let err = start(&export_args(d)).err().expect("export served b as a");
    assert!(err.contains("index is for image \"b\", not \"a\""), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");

    // A new migration to it is refused too, and leaves the disk untouched.
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, &a[..4 * 1024 * 1024]).unwrap();
    let before = std::fs::read(&disk).unwrap();
    let (ok, out) = run(&[
        "prepare",
        disk.to_str().unwrap(),
        "--target",
        idx("a").to_str().unwrap(),
        "--trusted-key",
        &format!("{d}/key.pub"),
    ]);
    assert!(!ok && out.contains("not \"a\""), "{out}");
    assert!(std::fs::read(&disk).unwrap() == before, "disk changed");
}

#[test]
fn publish_numbers_versions_and_export_refuses_a_rollback() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _) = publish_store(dir.path(), true);
    let d = dir.path().to_str().unwrap();
    let idx = dir.path().join("store/indexes/a.idx");
    let version = |p: &Path| {
        let b = std::fs::read(p).unwrap();
        let p = Index::parse(&b, Trust::Unverified).unwrap();
        p.index.identity().unwrap().version
    };
    assert_eq!(version(&idx), 1);
    let old = dir.path().join("a-v1.idx");
    std::fs::copy(&idx, &old).unwrap();
    // Republish: the next version; an explicit version must be above the current one.
    let (img, key) = (format!("{d}/a.img"), format!("{d}/key.key"));
    let publish = [
        "publish",
        &img,
        "--store",
        &format!("{d}/store"),
        "--name",
        "a",
    ];
    let (ok, out) = run(&[&publish[..], &["--key", &key]].concat());
    assert!(ok, "{out}");
    assert_eq!(version(&idx), 2);
    let (ok, out) = run(&[&publish[..], &["--key", &key, "--version", "2"]].concat());
    assert!(
        !ok && out.contains("not above the store's current version 2"),
        "{out}"
    );
    assert_eq!(version(&idx), 2, "a refused publish changed the index");

    // The export remembers the versions it served (--seen-versions).
    let state = dir.path().join("seen.json");
    let mut args = export_args(d);
    args.extend(["--seen-versions".into(), state.to_str().unwrap().into()]);
    let ex = start(&args).unwrap();
    let mut c = Client::connect(ex.port);
    assert_eq!(c.go("a"), Ok(a.len() as u64));
    assert_eq!(c.read(3 * CS as u64, 100).unwrap(), a[3 * CS..3 * CS + 100]);
    c.disconnect();
    ex.stop();

    // An attacker (or a stale mirror) puts the older, validly signed index back.
    std::fs::copy(&old, &idx).unwrap();
    let err = start(&args).err().expect("rollback served");
    assert!(err.contains("version 1, older than version 2"), "{err}");
    // The state file was not lowered by the refused start.
    let seen: serde_json::Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert_eq!(seen["images"]["a"], 2, "{seen}");
}

#[test]
fn an_expired_index_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    publish_store(dir.path(), true);
    let d = dir.path().to_str().unwrap();
    let idx = dir.path().join("store/indexes/a.idx");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let id = |expires| ImageIdentity {
        name: "a".into(),
        version: 5,
        created: now - 7200,
        expires: Some(expires),
    };
    resign(d, &idx, Some(id(now - 3600)));
    let err = start(&export_args(d)).err().expect("expired index served");
    assert!(err.contains("expired"), "{err}");
    // Still valid for an hour: served.
    resign(d, &idx, Some(id(now + 3600)));
    start(&export_args(d)).unwrap().stop();
    // `publish --valid-for` records the expiry.
    let (ok, out) = run(&[
        "--json",
        "publish",
        &format!("{d}/a.img"),
        "--store",
        &format!("{d}/store"),
        "--name",
        "a",
        "--key",
        &format!("{d}/key.key"),
        "--valid-for",
        "2h",
    ]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    let ident = &v["report"]["identity"];
    assert_eq!(ident["version"], 6, "{v}");
    assert_eq!(
        ident["expires"].as_u64().unwrap() - ident["created"].as_u64().unwrap(),
        7200
    );
}

#[test]
fn version_1_indexes_need_an_explicit_opt_out() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _) = publish_store(dir.path(), true);
    let d = dir.path().to_str().unwrap();
    let idx = dir.path().join("store/indexes/a.idx");
    resign(d, &idx, None);
    assert_eq!(std::fs::read(&idx).unwrap()[8], 1, "a version-1 index");
    let err = start(&export_args(d))
        .err()
        .expect("v1 index served with a key");
    assert!(err.contains("format version 1"), "{err}");
    assert!(err.contains("republish"), "{err}");
    // Store maintenance still reads it (gc must know what it references).
    let (ok, out) = run(&["store", "gc", "--dry-run", &format!("{d}/store")]);
    assert!(ok, "{out}");
    // Without a signature check (explicit opt-out) it is served.
    let ex = start(&[
        "--store".into(),
        format!("{d}/store"),
        "--insecure-unsigned".into(),
    ])
    .unwrap();
    let mut c = Client::connect(ex.port);
    assert_eq!(c.go("a"), Ok(a.len() as u64));
    c.disconnect();
    ex.stop();
    // Republishing turns it into version 2 of the format, numbered 1.
    let (ok, out) = run(&[
        "publish",
        &format!("{d}/a.img"),
        "--store",
        &format!("{d}/store"),
        "--name",
        "a",
        "--key",
        &format!("{d}/key.key"),
    ]);
    assert!(ok, "{out}");
    start(&export_args(d)).unwrap().stop();
}

#[test]
fn a_prepared_disk_refuses_an_older_index() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _) = publish_store(dir.path(), true);
    let d = dir.path().to_str().unwrap();
    let idx = dir.path().join("store/indexes/a.idx");
    let old = dir.path().join("a-v1.idx");
    std::fs::copy(&idx, &old).unwrap();
    let (ok, out) = run(&[
        "publish",
        &format!("{d}/a.img"),
        "--store",
        &format!("{d}/store"),
        "--name",
        "a",
        "--key",
        &format!("{d}/key.key"),
    ]);
    assert!(ok, "{out}");
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, &a[..4 * 1024 * 1024]).unwrap();
    let (ok, out) = run(&[
        "prepare",
        disk.to_str().unwrap(),
        "--target",
        idx.to_str().unwrap(),
        "--trusted-key",
        &format!("{d}/key.pub"),
    ]);
    assert!(ok, "{out}");
    // Version 2 is pinned (by its index hash); the store is rolled back to version 1.
    std::fs::copy(&old, &idx).unwrap();
    let before = std::fs::read(&disk).unwrap();
    let sock = dir.path().join("vu.sock");
    let (ok, out) = run(&[
        "serve",
        disk.to_str().unwrap(),
        "--socket",
        sock.to_str().unwrap(),
    ]);
    assert!(!ok, "serve started on a rolled-back index: {out}");
    assert!(out.contains("changed") || out.contains("pinned"), "{out}");
    // Nor through `serve --target` naming a copy of the older index elsewhere.
    std::fs::create_dir_all(dir.path().join("old/indexes")).unwrap();
    let old_idx = dir.path().join("old/indexes/a.idx");
    std::fs::copy(&old, &old_idx).unwrap();
    let (ok, out) = run(&[
        "serve",
        disk.to_str().unwrap(),
        "--socket",
        sock.to_str().unwrap(),
        "--target",
        old_idx.to_str().unwrap(),
    ]);
    assert!(!ok, "serve --target accepted an older index: {out}");
    assert!(out.contains("changed") || out.contains("pinned"), "{out}");
    assert!(std::fs::read(&disk).unwrap() == before, "disk changed");
}
