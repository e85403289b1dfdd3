//! One network layer (issue 15 point 5): a chunk store reached over HTTP(S) takes every
//! HTTP option a raw image takes, on the real binary against a real nginx: a private CA
//! (`--cacert`), a header the server requires (`--header-file`) and a bearer token file
//! (`--bearer-token-file`, read again after a 401 while serving). Without them, `prepare`
//! fails in one clear line naming the option to give, and the disk is unchanged.
//!
//! A store that redirects to another origin is refused, as a raw image is. And
//! `POST /v1/target-urls` for a chunk-store target: a new index URL is taken when its
//! index hash is the pinned one, otherwise refused with nothing changed.

mod common;

use std::path::Path;
use std::time::Duration;

use serde_json::json;
use streamboot::control::client;

use common::blkio_client::Client;
use common::disk::{cli, cli_err, cli_ok, sha256, sha256_file};
use common::nginx::Nginx;
use common::pki::Pki;
use common::serve::Served;

const TOKEN_ONE: &str = "tokONEstore1";
const TOKEN_TWO: &str = "tokTWOstore2";
const HEADER_SECRET: &str = "hdrSECRETstore";

/// Publishes `image` as `name` into the store directory `store`.
fn publish(image: &Path, store: &Path, name: &str) {
    std::fs::create_dir_all(store.parent().unwrap()).unwrap();
    let out = cli(&[
        "publish",
        image.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
        "--name",
        name,
        "--chunk-size",
        "65536",
    ]);
    assert!(
        out.status.success(),
        "publish: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Reads the whole device served on `sock`.
fn read_device(sock: &Path) -> Vec<u8> {
    let mut c = Client::connect(sock, 1, 1 << 20).unwrap();
    let mut all = Vec::new();
    let mut off = 0u64;
    while off < c.capacity {
        let len = (c.capacity - off).min(1 << 20) as usize;
        assert_eq!(c.read(off, 0, len), 0, "read at {off} failed");
        all.extend_from_slice(c.buf(0..len));
        off += len as u64;
    }
    all
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Requests nginx answered 401 so far.
fn count_401(nginx: &Nginx) -> usize {
    nginx
        .access_log()
        .iter()
        .filter(|e| e.status == 401)
        .count()
}

fn one_line(err: &str) -> &str {
    let line = err.trim();
    assert_eq!(line.lines().count(), 1, "not one line: {err}");
    line
}

#[test]
fn store_over_https_takes_the_http_options() {
    let pki = Pki::new();
    let flags = tempfile::tempdir().unwrap();
    let rotated = flags.path().join("rotated");
    let rule = format!(
        "{} set $want \"Bearer {TOKEN_ONE}\"; if (-f {}) {{ set $want \"Bearer {TOKEN_TWO}\"; }} \
         if ($http_authorization != $want) {{ return 401; }} \
         if ($http_x_store_key != \"{HEADER_SECRET}\") {{ return 403; }}",
        pki.nginx_tls(),
        rotated.display()
    );
    let nginx = Nginx::start_custom("ssl", &rule);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("t.img");
    let target = common::random_bytes(41, 3 << 20);
    std::fs::write(&image, &target).unwrap();
    publish(&image, &nginx.root().join("st"), "a");
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, common::random_bytes(42, 2 << 20)).unwrap();
    let d = disk.to_str().unwrap();
    let url = nginx.https_url("st/indexes/a.idx");
    let before = sha256_file(&disk);

    let token = dir.path().join("token");
    std::fs::write(&token, format!("{TOKEN_ONE}\n")).unwrap();
    let headers = dir.path().join("headers");
    std::fs::write(&headers, format!("X-Store-Key: {HEADER_SECRET}\n")).unwrap();
    let (ca, t, h) = (
        pki.arg("ca.pem"),
        token.to_str().unwrap().to_string(),
        headers.to_str().unwrap().to_string(),
    );
    let base = [
        "prepare",
        d,
        "--target",
        &url,
        "--insecure-unverified-index",
        "--connect-timeout",
        "5",
    ];
    let run = |extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };

    // The private CA is not trusted without --cacert: a clear TLS error.
    let err = cli_err(&strs(&run(&[
        "--bearer-token-file",
        &t,
        "--header-file",
        &h,
    ])));
    let line = one_line(&err);
    assert!(
        line.contains("certificate") && line.contains("--cacert"),
        "unclear TLS error for a store: {line}"
    );
    // Without the token: a 401 that points to the token file, not to --target.
    let err = cli_err(&strs(&run(&["--cacert", &ca, "--header-file", &h])));
    let line = one_line(&err);
    assert!(
        line.contains("401") && line.contains("--bearer-token-file") && !line.contains("--target"),
        "unclear 401 for a store: {line}"
    );
    // Without the header: refused (403), clearly.
    let err = cli_err(&strs(&run(&["--cacert", &ca, "--bearer-token-file", &t])));
    let line = one_line(&err);
    assert!(
        line.contains("403") && line.contains("--header-file"),
        "{line}"
    );
    assert!(
        !err.contains(TOKEN_ONE) && !err.contains(HEADER_SECRET),
        "{err}"
    );
    assert_eq!(
        sha256_file(&disk),
        before,
        "a failed prepare changed the disk"
    );

    cli_ok(&strs(&run(&[
        "--cacert",
        &ca,
        "--no-default-roots",
        "--bearer-token-file",
        &t,
        "--header-file",
        &h,
    ])));

    // serve: the token is rotated while serving; the 401 reads the file again.
    let sock = dir.path().join("vu.sock");
    let log = dir.path().join("serve.log");
    let served = Served::start_logged(
        &disk,
        &sock,
        Some(&log),
        &[
            "--cacert",
            &ca,
            "--bearer-token-file",
            &t,
            "--header-file",
            &h,
            "--no-hydrate",
        ],
    );
    let mut vm = Client::connect(&sock, 1, 1 << 20).unwrap();
    assert_eq!(vm.read(0, 0, 1 << 20), 0);
    assert_eq!(vm.buf(0..1 << 20), &target[..1 << 20]);
    drop(vm);
    std::fs::write(&token, format!("{TOKEN_TWO}\n")).unwrap();
    std::fs::write(&rotated, b"").unwrap();
    let rejected_before = count_401(&nginx);
    assert_eq!(sha256(&read_device(&sock)), sha256(&target));
    drop(served);
    assert!(
        count_401(&nginx) > rejected_before,
        "no chunk request got 401 after the rotation: the token file was not exercised"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains(TOKEN_ONE) && !text.contains(TOKEN_TWO) && !text.contains(HEADER_SECRET),
        "a secret in the serve log: {text}"
    );
}

#[test]
fn store_target_urls_are_replaced_only_for_the_pinned_index() {
    let flags = tempfile::tempdir().unwrap();
    let moved = flags.path().join("moved");
    // Location /a/ is withdrawn (403) once `moved` exists; /b/ serves the same store.
    // /r/ redirects to another origin (localhost is not 127.0.0.1).
    let rule = format!(
        "location /a/ {{ if (-f {}) {{ return 403; }} }} \
         location /r/ {{ return 302 http://localhost:$server_port/a/st/indexes/img.idx; }}",
        moved.display()
    );
    let nginx = Nginx::start_custom("", &rule);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("t.img");
    let target = common::random_bytes(51, 3 << 20);
    std::fs::write(&image, &target).unwrap();
    // The same store (byte for byte: an index records when it was published) at /b/.
    publish(&image, &nginx.root().join("a/st"), "img");
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(nginx.root().join("a"))
        .arg(nginx.root().join("b"))
        .status()
        .unwrap();
    assert!(copied.success());
    // Another image under the same name: a different index hash.
    let other = dir.path().join("o.img");
    std::fs::write(&other, common::random_bytes(52, 3 << 20)).unwrap();
    publish(&other, &nginx.root().join("c/st"), "img");

    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, common::random_bytes(53, 2 << 20)).unwrap();
    let d = disk.to_str().unwrap();
    let url_a = nginx.url("a/st/indexes/img.idx");
    let url_b = nginx.url("b/st/indexes/img.idx");
    let url_c = nginx.url("c/st/indexes/img.idx");
    cli_ok(&[
        "prepare",
        d,
        "--target",
        &url_a,
        "--insecure-unverified-index",
    ]);

    let sock = dir.path().join("vu.sock");
    let ctl = dir.path().join("ctl.sock");
    let c = ctl.to_str().unwrap();
    let served = Served::start(
        &disk,
        &sock,
        &["--target", &url_a, "--control", c, "--no-hydrate"],
    );
    let mut vm = Client::connect(&sock, 1, 1 << 20).unwrap();
    assert_eq!(vm.read(0, 0, 1 << 20), 0);
    assert_eq!(vm.buf(0..1 << 20), &target[..1 << 20]);

    // The old location is withdrawn: a read of chunks not fetched yet waits (no I/O
    // error) for a new location.
    std::fs::write(&moved, b"").unwrap();
    vm.submit_read(0, 2 << 20, 0, 1 << 20, 7);
    let early = vm.wait_for(0, 1, Duration::from_secs(3));
    assert!(
        early.as_ref().map_or(true, |done| done.is_empty()),
        "the read completed on a withdrawn location: {:?}",
        early.map(|d| d.iter().map(|c| c.ret).collect::<Vec<_>>())
    );
    // Refused, nothing changed: another image's index; a URL that is not an index.
    for (urls, why) in [
        (vec![url_c.clone()], "the image changed"),
        (vec![nginx.url("b/st/t.img")], "index"),
    ] {
        let e = client::post(&ctl, "/v1/target-urls", &json!({ "urls": urls }))
            .expect_err("wrong URLs accepted");
        let msg = e.to_string();
        assert!(
            msg.contains("refused") && msg.contains(why),
            "unclear refusal: {msg}"
        );
    }
    let err = cli_err(&["target-urls", d, &url_c, "--control", c]);
    assert!(err.contains("refused"), "{err}");
    // The same store at its new location is taken; the waiting read completes.
    let out = cli_ok(&["target-urls", d, &url_b, "--control", c]);
    assert!(out.contains("replaced") && out.contains("/b/st/"), "{out}");
    let done = vm
        .wait(0, 1)
        .expect("the read never completed after the refresh");
    assert_eq!(done[0].ret, 0);
    assert_eq!(vm.buf(0..1 << 20), &target[2 << 20..3 << 20]);
    assert_eq!(vm.read(1 << 20, 0, 1 << 20), 0, "read after the refresh");
    assert_eq!(vm.buf(0..1 << 20), &target[1 << 20..2 << 20]);
    drop(vm);
    drop(served);
    let log = nginx.access_log();
    assert!(
        log.iter()
            .any(|e| e.status == 200 && e.request.contains("/b/st/chunks/")),
        "no chunk came from the new location: {log:?}"
    );
}
