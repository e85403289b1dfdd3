//! `s3://` targets and chunk stores against a real S3-compatible server with signature
//! checking (moto's server mode, tests/common/moto.rs): prepare → serve (libblkio client)
//! → commit gives the target bit for bit, from a raw image object and from a store
//! published to the bucket; wrong credentials, a missing object or bucket, an unreachable
//! endpoint and a replaced object fail with one clear line and leave the disk unchanged;
//! no credential shows up on the disk, in `status`, the control API or the logs.

mod common;

use std::path::Path;
use std::process::Output;

use common::blkio_client::Client;
use common::disk::{sha256, sha256_file};
use common::moto::Moto;

/// The device's whole content, read through a libblkio client.
fn read_device(sock: &Path) -> Vec<u8> {
    let chunk = 256 << 10;
    let mut c = Client::connect(sock, 1, chunk).unwrap();
    let cap = c.capacity as usize;
    let mut out = Vec::with_capacity(cap);
    while out.len() < cap {
        let len = chunk.min(cap - out.len());
        assert_eq!(c.read(out.len() as u64, 0, len), 0, "read failed");
        out.extend_from_slice(c.buf(0..len));
    }
    out
}

/// Source and target images: the target shares a stretch with the source and has zeros;
/// its size is whole sectors (as a device shows it) but not whole chunks.
fn images(seed: u64) -> (Vec<u8>, Vec<u8>) {
    let source = common::random_bytes(seed, 3_000_000);
    let mut target = common::random_bytes(seed + 1, 4_100_096);
    target[1_000_000..1_500_000].fill(0);
    target[..200_000].copy_from_slice(&source[..200_000]);
    (source, target)
}

/// Asserts `out` failed with exit code `code` and one line containing `want`; returns it.
fn one_line_error(out: &Output, code: i32, want: &str) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "not one line: {err}");
    assert!(lines[0].contains(want), "{want:?} not in: {err}");
    assert_eq!(out.status.code(), Some(code), "{err}");
    err
}

/// Asserts no credential of `moto` is in `bytes` (`what` names them in the failure).
fn assert_no_credentials(moto: &Moto, what: &str, bytes: &[u8]) {
    for secret in [&moto.key_id, &moto.secret] {
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{what} holds a credential"
        );
    }
}

/// prepare → serve (the device reads as the target, nothing hydrated in the background)
/// → confirm → commit, everything with the keys in the environment. Checks that no
/// credential reaches the disk, `status` (text and JSON), the control API or serve's
/// debug log. Returns nothing: panics on any difference.
fn lifecycle(moto: &Moto, target_url: &str, source: &[u8], target: &[u8], prepare: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, source).unwrap();
    let d = disk.to_str().unwrap();
    let mut args = vec!["prepare", d, "--target", target_url, "--chunk-size", "64K"];
    args.extend_from_slice(prepare);
    moto.cli_ok(&args);
    assert_no_credentials(moto, "the prepared disk", &std::fs::read(&disk).unwrap());
    let sock = dir.path().join("vu.sock");
    let ctl = dir.path().join("ctl.sock");
    let log = dir.path().join("serve.log");
    let ctl_arg = ctl.to_str().unwrap();
    let srv = moto.serve(&disk, &sock, &log, &["--no-hydrate", "--control", ctl_arg]);
    let device = read_device(&sock);
    assert!(device == target, "the served device is not the target");
    let api = streamboot::control::client::get_status(&ctl).expect("control status");
    assert!(api.to_string().contains(target_url), "{api}");
    assert_no_credentials(moto, "the control API status", api.to_string().as_bytes());
    srv.stop();
    let log_text = std::fs::read(&log).unwrap();
    assert!(!log_text.is_empty(), "serve logged nothing");
    assert_no_credentials(moto, "serve's log", &log_text);
    for json in [&["status", d][..], &["--json", "status", d][..]] {
        let st = common::disk::cli_ok(json);
        assert!(st.contains(target_url), "{st}");
        assert_no_credentials(moto, "status", st.as_bytes());
    }
    common::disk::cli_ok(&["confirm", d]);
    moto.cli_ok(&["commit", d]);
    assert_eq!(
        sha256_file(&disk),
        sha256(target),
        "committed disk != target"
    );
}

#[test]
fn raw_image_on_s3_prepare_serve_commit_gives_target() {
    let moto = Moto::start();
    let (source, target) = images(1);
    moto.put("images/t.raw", &target);
    lifecycle(&moto, "s3://bkt/images/t.raw", &source, &target, &[]);
}

#[test]
fn chunk_store_on_s3_publish_prepare_serve_commit_gives_target() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let (source, target) = images(2);
    let image = dir.path().join("t.img");
    std::fs::write(&image, &target).unwrap();
    let key = dir.path().join("k");
    common::disk::cli_ok(&["keygen", key.to_str().unwrap()]);
    let (key, public) = (key.with_extension("key"), key.with_extension("pub"));
    let publish = |name: &str| {
        let img = image.to_str().unwrap();
        let k = key.to_str().unwrap();
        let st = "s3://bkt/st";
        let out = moto.cli_ok(&[
            "--json", "publish", img, "--store", st, "--name", name, "--key", k,
        ]);
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["report"].clone()
    };
    let first = publish("a");
    assert!(first["chunks_new"].as_u64().unwrap() > 0, "{first}");
    // The same image again under another name: every object is in the bucket already.
    let second = publish("b");
    assert_eq!(
        second["index_path"], "s3://bkt/st/indexes/b.idx",
        "{second}"
    );
    let stats = moto.cli_ok(&["--json", "store", "stats", "s3://bkt/st"]);
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    let total = &stats["stats"]["total"];
    assert_eq!(total["images"], 2, "{stats}");
    assert_eq!(total["missing_objects"], 0, "{stats}");
    assert_eq!(total["stored_objects"], first["chunks_new"], "{stats}");
    let trusted = ["--trusted-key", public.to_str().unwrap()];
    lifecycle(
        &moto,
        "s3://bkt/st/indexes/a.idx",
        &source,
        &target,
        &trusted,
    );
}

#[test]
fn store_gc_on_s3_deletes_only_old_unreferenced_objects() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("t.img");
    std::fs::write(&image, common::random_bytes(9, 1 << 20)).unwrap();
    let img = image.to_str().unwrap();
    moto.cli_ok(&["publish", img, "--store", "s3://bkt/st", "--name", "a"]);
    // An object no index references (a publish that never finished).
    let stray = common::random_bytes(10, 4096);
    let hash = blake3::hash(&stray).to_hex().to_string();
    moto.put(&format!("st/chunks/{}/{hash}", &hash[..2]), &stray);
    let gc = |extra: &[&str]| {
        let mut args = vec!["--json", "store", "gc", "s3://bkt/st"];
        args.extend_from_slice(extra);
        let out = moto.cli_ok(&args);
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["report"].clone()
    };
    let young = gc(&[]);
    assert_eq!(young["objects_too_young"], 1, "{young}");
    assert_eq!(young["objects_removed"], 0, "{young}");
    let dry = gc(&["--grace", "0", "--dry-run"]);
    assert_eq!(dry["objects_removed"], 1, "{dry}");
    let done = gc(&["--grace", "0"]);
    assert_eq!(done["objects_removed"], 1, "{done}");
    assert_eq!(done["bytes_removed"], 4096, "{done}");
    let after = gc(&["--grace", "0"]);
    assert_eq!(after["objects_removed"], 0, "{after}");
    assert_eq!(after["objects_kept"], 16, "{after}");
}

#[test]
fn s3_failures_are_one_line_and_change_nothing() {
    let moto = Moto::start();
    let (source, target) = images(3);
    moto.put("images/t.raw", &target);
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, &source).unwrap();
    let d = disk.to_str().unwrap();
    fn prepare<'a>(d: &'a str, url: &'a str) -> Vec<&'a str> {
        vec!["prepare", d, "--target", url]
    }
    let unchanged = || assert!(std::fs::read(&disk).unwrap() == source, "disk changed");

    let wrong = moto
        .command_with_secret("wrongwrongwrongwrongwrongwrongwrongwrong")
        .args(prepare(d, "s3://bkt/images/t.raw"))
        .args(moto.args())
        .output()
        .unwrap();
    let err = one_line_error(
        &wrong,
        5,
        "S3 refused the credentials for s3://bkt/images/t.raw: SignatureDoesNotMatch",
    );
    assert!(
        !err.contains(&moto.secret) && !err.contains("wrongwrong"),
        "{err}"
    );
    unchanged();

    let missing = moto.cli(&prepare(d, "s3://bkt/images/nope.raw"));
    one_line_error(&missing, 5, "s3://bkt/images/nope.raw: no such object");
    unchanged();

    let no_bucket = moto.cli(&prepare(d, "s3://nobucket/t.raw"));
    one_line_error(&no_bucket, 5, "no such bucket \"nobucket\"");
    unchanged();

    let missing_store = moto.cli(&[
        "prepare",
        d,
        "--target",
        "s3://bkt/st/indexes/a.idx",
        "--insecure-unverified-index",
    ]);
    one_line_error(
        &missing_store,
        5,
        "s3://bkt/st/indexes/a.idx: no such object",
    );
    unchanged();

    let dead = format!("http://127.0.0.1:{}", common::dead_port());
    let unreachable = moto
        .command()
        .args(prepare(d, "s3://bkt/images/t.raw"))
        .args(["--s3-endpoint", &dead, "--s3-path-style"])
        .output()
        .unwrap();
    one_line_error(
        &unreachable,
        5,
        "cannot reach the S3 endpoint for s3://bkt/images/t.raw",
    );
    unchanged();

    // Prepared, then the object is replaced: reopening refuses the other image.
    moto.cli_ok(&prepare(d, "s3://bkt/images/t.raw"));
    let prepared = std::fs::read(&disk).unwrap();
    let mut other = target.clone();
    other[0] ^= 1;
    moto.put("images/t.raw", &other);
    let commit = moto.cli(&["commit", d, "--force"]);
    one_line_error(&commit, 6, "the image changed on the server");
    assert!(
        std::fs::read(&disk).unwrap() == prepared,
        "commit changed the disk"
    );
}

#[test]
fn credentials_come_from_the_profile_the_environment_or_the_credentials_file() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("credentials");
    std::fs::write(
        &file,
        format!(
            "[default]\naws_access_key_id = {id}\naws_secret_access_key = wrongwrongwrong\n\n\
             [sb]\naws_access_key_id = {id}\naws_secret_access_key = {secret}\n",
            id = moto.key_id,
            secret = moto.secret
        ),
    )
    .unwrap();
    let stats = |env: &[(&str, &str)], extra: &[&str]| {
        let mut c = moto.command_without_keys();
        c.env("AWS_SHARED_CREDENTIALS_FILE", &file)
            .envs(env.iter().copied())
            .args(["store", "stats", "s3://bkt/st"])
            .args(moto.args())
            .args(extra);
        c.output().unwrap()
    };
    let refused = "S3 refused the credentials for s3://bkt/st";
    // No keys in the environment: the file's [default], then AWS_PROFILE or --aws-profile.
    one_line_error(&stats(&[], &[]), 5, refused);
    assert!(stats(&[("AWS_PROFILE", "sb")], &[]).status.success());
    assert!(stats(&[], &["--aws-profile", "sb"]).status.success());
    // Keys in the environment win over the file's default profile...
    let env_keys = [
        ("AWS_ACCESS_KEY_ID", moto.key_id.as_str()),
        ("AWS_SECRET_ACCESS_KEY", moto.secret.as_str()),
    ];
    assert!(stats(&env_keys, &[]).status.success());
    // ...and --aws-profile wins over them.
    one_line_error(&stats(&env_keys, &["--aws-profile", "default"]), 5, refused);
    let missing = stats(&[], &["--aws-profile", "nope"]);
    let err = one_line_error(&missing, 2, "AWS credentials: ");
    assert!(err.contains("no profile [nope]"), "{err}");
    assert!(
        !err.contains(&moto.secret) && !err.contains("wrongwrong"),
        "{err}"
    );
}

#[test]
fn publish_uploads_again_an_object_no_index_references() {
    let moto = Moto::start();
    let dir = tempfile::tempdir().unwrap();
    let data = common::random_bytes(11, 256 << 10);
    let image = dir.path().join("t.img");
    std::fs::write(&image, &data).unwrap();
    // A leftover under the name of the image's first chunk, referenced by no index (gc
    // may delete it any time), and damaged.
    let hash = blake3::hash(&data[..64 << 10]).to_hex().to_string();
    let rel = format!("st/chunks/{}/{hash}", &hash[..2]);
    moto.put(&rel, b"leftover");
    let img = image.to_str().unwrap();
    moto.cli_ok(&["publish", img, "--store", "s3://bkt/st", "--name", "a"]);
    assert!(
        moto.get(&rel) == data[..64 << 10],
        "the leftover object was kept"
    );
}
