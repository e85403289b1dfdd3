//! Secrets in chunk-store locations (issue 11): a userinfo (`user:secret@`) and a
//! presigned query string (`?X-Amz-Signature=topsecret`) in a store URL never appear in
//! what `prepare`, `serve` and `export` print when the store fails: not on stderr (with
//! debug logs of every crate), not in `--json` output.

mod common;

use common::disk::cli;
use common::nginx::Nginx;

/// Every form in which a secret could leak: the plain strings, and the Basic credentials
/// as they travel (base64 of `user:secret`).
const SECRETS: [&str; 3] = ["secret", "topsecret", "dXNlcjpzZWNyZXQ"];

fn assert_no_secret(what: &str, text: &[u8]) {
    let text = String::from_utf8_lossy(text);
    for s in SECRETS {
        assert!(!text.contains(s), "{what} contains {s:?}:\n{text}");
    }
}

/// Runs `streamboot -vvv ARGS` and, separately, `streamboot --json ARGS`; asserts both
/// fail and print no secret; returns the text run's stderr.
fn fails_without_secrets(args: &[&str]) -> String {
    let mut text = vec!["-vvv"];
    text.extend_from_slice(args);
    let out = cli(&text);
    assert!(!out.status.success(), "streamboot {args:?} succeeded");
    assert_no_secret("stdout", &out.stdout);
    assert_no_secret("stderr", &out.stderr);
    let mut json = vec!["--json"];
    json.extend_from_slice(args);
    let j = cli(&json);
    assert!(!j.status.success(), "streamboot --json {args:?} succeeded");
    assert_no_secret("--json stdout", &j.stdout);
    assert_no_secret("--json stderr", &j.stderr);
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `http://user:secret@127.0.0.1:PORT/PATH` with PATH as given.
fn secret_url(port: u16, path: &str) -> String {
    format!("http://user:secret@127.0.0.1:{port}/{path}")
}

#[test]
fn prepare_on_a_failing_store_shows_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, common::random_bytes(3, 1 << 20)).unwrap();
    let d = disk.to_str().unwrap();
    let dead = common::dead_port();
    // Unreachable store; then a store whose base carries a presigned query.
    for url in [
        secret_url(dead, "st/indexes/a.idx"),
        secret_url(dead, "st?X-Amz-Signature=topsecret/indexes/a.idx"),
    ] {
        let err = fails_without_secrets(&[
            "prepare",
            d,
            "--target",
            &url,
            "--insecure-unverified-index",
            "--connect-timeout",
            "1",
        ]);
        assert!(err.contains("127.0.0.1"), "the error names no store: {err}");
    }
    // A store that answers 404 (nginx has no such store).
    let nginx = Nginx::start();
    let url = secret_url(nginx.port(), "nostore/indexes/a.idx");
    fails_without_secrets(&[
        "prepare",
        d,
        "--target",
        &url,
        "--insecure-unverified-index",
    ]);
    assert!(std::fs::read(&disk).unwrap() == common::random_bytes(3, 1 << 20));
}

#[test]
fn export_of_a_failing_store_shows_no_secret() {
    let dead = common::dead_port();
    for store in [
        secret_url(dead, "st?X-Amz-Signature=topsecret"),
        secret_url(dead, "st"),
    ] {
        let err = fails_without_secrets(&[
            "export",
            "--store",
            &store,
            "--image",
            "a",
            "--insecure-unsigned",
            "--listen",
            "127.0.0.1:0",
        ]);
        assert!(err.contains("127.0.0.1"), "the error names no store: {err}");
    }
}

#[test]
fn serve_on_a_failing_store_shows_no_secret() {
    // A real store on nginx (which ignores the credentials), a disk prepared from it.
    let nginx = Nginx::start();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("t.img");
    std::fs::write(&image, common::random_bytes(5, 2 << 20)).unwrap();
    let store = nginx.root().join("st");
    let out = cli(&[
        "publish",
        image.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
        "--name",
        "a",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, common::random_bytes(6, 3 << 20)).unwrap();
    let d = disk.to_str().unwrap();
    let url = secret_url(nginx.port(), "st/indexes/a.idx");
    let out = cli(&[
        "prepare",
        d,
        "--target",
        &url,
        "--insecure-unverified-index",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The store fails: its index is gone.
    std::fs::remove_file(store.join("indexes/a.idx")).unwrap();
    let sock = dir.path().join("vu.sock");
    let err = fails_without_secrets(&[
        "serve",
        d,
        "--socket",
        sock.to_str().unwrap(),
        "--target",
        &url,
    ]);
    assert!(err.contains("127.0.0.1"), "the error names no store: {err}");
}
