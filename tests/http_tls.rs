//! HTTP(S) options of every command that reaches a target (issue 15 point 2), on the real
//! binary against a real nginx: a private CA made here with `openssl` (`--cacert`,
//! `--no-default-roots`), mutual TLS (`--client-cert`/`--client-key` against
//! `ssl_verify_client on`), a header the server requires (`--header`, `--header-file`: the
//! value never appears in output, logs, the disk or `status --json`), and a bearer token
//! file rotated while serving (`--bearer-token-file`: the 401 re-reads it).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::blkio_client::Client;
use common::disk::{cli, cli_err, cli_ok, sha256, sha256_file};
use common::nginx::Nginx;
use common::pki::Pki;
use common::serve::Served;

/// A temp dir with `disk.img` (source bytes) and nginx serving `t.img` (target bytes).
fn setup(nginx: &Nginx, seed: u64) -> (tempfile::TempDir, PathBuf, Vec<u8>) {
    let target = common::random_bytes(seed, 3 << 20);
    nginx.put("t.img", &target);
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, common::random_bytes(seed + 1, 2 << 20)).unwrap();
    (dir, disk, target)
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

fn prepare(disk: &Path, url: &str, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "prepare".to_string(),
        disk.to_str().unwrap().to_string(),
        "--target".to_string(),
        url.to_string(),
        "--chunk-size".to_string(),
        "65536".to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn private_ca_works_with_cacert_and_fails_clearly_without() {
    let pki = Pki::new();
    let nginx = Nginx::start_custom("ssl", &pki.nginx_tls());
    let (dir, disk, target) = setup(&nginx, 1);
    let url = nginx.https_url("t.img");
    let before = sha256_file(&disk);

    let err = cli_err(&strs(&prepare(&disk, &url, &["--connect-timeout", "2"])));
    assert!(
        err.contains("certificate") && err.contains("--cacert"),
        "unclear TLS error: {err}"
    );
    assert_eq!(
        sha256_file(&disk),
        before,
        "a failed prepare changed the disk"
    );

    // Only the private CA, not the bundled roots: still enough.
    let ca = pki.arg("ca.pem");
    cli_ok(&strs(&prepare(
        &disk,
        &url,
        &["--cacert", &ca, "--no-default-roots"],
    )));

    // serve without the CA cannot reach the target; with it, the device is the target.
    let sock = dir.path().join("vu.sock");
    let out = cli(&[
        "serve",
        disk.to_str().unwrap(),
        "--socket",
        sock.to_str().unwrap(),
    ]);
    assert!(!out.status.success(), "serve trusted an unknown CA");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--cacert"), "unclear serve error: {stderr}");
    let served = Served::start(&disk, &sock, &["--cacert", &ca, "--no-hydrate"]);
    assert_eq!(sha256(&read_device(&sock)), sha256(&target));
    drop(served);
}

#[test]
fn client_certificate_is_sent_when_required() {
    let pki = Pki::new();
    let verify = format!(
        "{} ssl_client_certificate {}; ssl_verify_client on;",
        pki.nginx_tls(),
        pki.path("ca.pem").display()
    );
    let nginx = Nginx::start_custom("ssl", &verify);
    let (_dir, disk, _) = setup(&nginx, 3);
    let url = nginx.https_url("t.img");
    let ca = pki.arg("ca.pem");
    let before = sha256_file(&disk);

    let err = cli_err(&strs(&prepare(&disk, &url, &["--cacert", &ca])));
    assert!(
        err.contains("client certificate") && err.contains("--client-cert"),
        "unclear mutual-TLS error: {err}"
    );
    assert_eq!(
        sha256_file(&disk),
        before,
        "a failed prepare changed the disk"
    );

    // A key that is not a key: one clear line naming the file, disk unchanged.
    let err = cli_err(&strs(&prepare(
        &disk,
        &url,
        &[
            "--cacert",
            &ca,
            "--client-cert",
            &pki.arg("client.pem"),
            "--client-key",
            &pki.arg("client.ext"),
        ],
    )));
    assert!(err.contains("client.ext"), "{err}");
    assert_eq!(sha256_file(&disk), before);

    // A certificate the server does not trust (self-signed): refused, clearly.
    pki.openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "rogue.key",
        "-out",
        "rogue.pem",
        "-days",
        "2",
        "-subj",
        "/CN=rogue",
    ]);
    let err = cli_err(&strs(&prepare(
        &disk,
        &url,
        &[
            "--cacert",
            &ca,
            "--client-cert",
            &pki.arg("rogue.pem"),
            "--client-key",
            &pki.arg("rogue.key"),
        ],
    )));
    assert!(err.contains("refused the client certificate"), "{err}");
    assert_eq!(sha256_file(&disk), before);

    cli_ok(&strs(&prepare(
        &disk,
        &url,
        &[
            "--cacert",
            &ca,
            "--client-cert",
            &pki.arg("client.pem"),
            "--client-key",
            &pki.arg("client.key"),
        ],
    )));
}

const TOKEN: &str = "s3cretXtoken";

fn assert_no_token(what: &str, bytes: &[u8]) {
    assert!(
        !bytes.windows(TOKEN.len()).any(|w| w == TOKEN.as_bytes()),
        "{what} contains the header value:\n{}",
        String::from_utf8_lossy(bytes)
    );
}

#[test]
fn required_header_works_and_never_leaks() {
    let rule = format!("if ($http_x_token != \"{TOKEN}\") {{ return 403; }}");
    let nginx = Nginx::start_custom("", &rule);
    let (dir, disk, target) = setup(&nginx, 5);
    let url = nginx.url("t.img");
    let d = disk.to_str().unwrap();
    let before = sha256_file(&disk);

    let err = cli_err(&strs(&prepare(&disk, &url, &[])));
    assert!(err.contains("403"), "{err}");
    assert_eq!(sha256_file(&disk), before);

    let header = format!("X-Token: {TOKEN}");
    let mut args = vec!["-vvv".to_string()];
    args.extend(prepare(&disk, &url, &["--header", &header]));
    let out = cli(&strs(&args));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_no_token("prepare stdout", &out.stdout);
    assert_no_token("prepare -vvv log", &out.stderr);
    assert_no_token("the disk", &std::fs::read(&disk).unwrap());

    for args in [vec!["status", d], vec!["status", d, "--json"]] {
        let out = cli(&args);
        assert!(out.status.success());
        assert_no_token("status", &out.stdout);
    }

    // serve with the header from a file; its log, control API and the disk stay clean.
    let hfile = dir.path().join("headers");
    std::fs::write(&hfile, format!("# the origin's token\n{header}\n")).unwrap();
    let sock = dir.path().join("vu.sock");
    let ctl = dir.path().join("ctl.sock");
    let log = dir.path().join("serve.log");
    let served = Served::start_logged(
        &disk,
        &sock,
        Some(&log),
        &[
            "--header-file",
            hfile.to_str().unwrap(),
            "--control",
            ctl.to_str().unwrap(),
            "--no-hydrate",
        ],
    );
    assert_eq!(sha256(&read_device(&sock)), sha256(&target));
    let status = streamboot::control::client::get_status(&ctl).unwrap();
    assert_no_token("control API status", status.to_string().as_bytes());
    let out = cli(&["status", d, "--control", ctl.to_str().unwrap(), "--json"]);
    assert_no_token("status --json --control", &out.stdout);
    drop(served);
    assert_no_token("serve log", &std::fs::read(&log).unwrap());
    assert_no_token("the disk after serve", &std::fs::read(&disk).unwrap());
}

#[test]
fn bearer_token_file_is_reread_after_401() {
    let dir0 = tempfile::tempdir().unwrap();
    let flag = dir0.path().join("rotated");
    let rule = format!(
        "set $want \"Bearer tok-one-AAAA\"; if (-f {}) {{ set $want \"Bearer tok-two-BBBB\"; }} \
         if ($http_authorization != $want) {{ return 401; }}",
        flag.display()
    );
    let nginx = Nginx::start_custom("", &rule);
    let (dir, disk, target) = setup(&nginx, 7);
    let url = nginx.url("t.img");
    let token = dir.path().join("token");
    std::fs::write(&token, "tok-one-AAAA\n").unwrap();
    let t = token.to_str().unwrap();
    cli_ok(&strs(&prepare(&disk, &url, &["--bearer-token-file", t])));

    let sock = dir.path().join("vu.sock");
    let log = dir.path().join("serve.log");
    let served = Served::start_logged(
        &disk,
        &sock,
        Some(&log),
        &[
            "--bearer-token-file",
            t,
            "--no-hydrate",
            "--fetch-deadline",
            "20",
        ],
    );
    let mut c = Client::connect(&sock, 1, 1 << 20).unwrap();
    assert_eq!(c.read(0, 0, 1 << 20), 0);
    assert_eq!(c.buf(0..1 << 20), &target[..1 << 20]);

    // The origin rotates the token; the operator replaces the file.
    std::fs::write(dir.path().join("token.new"), "tok-two-BBBB\n").unwrap();
    std::fs::rename(dir.path().join("token.new"), &token).unwrap();
    std::fs::write(&flag, b"").unwrap();
    assert_eq!(c.read(2 << 20, 0, 1 << 20), 0, "{}", served.log());
    assert_eq!(c.buf(0..1 << 20), &target[2 << 20..3 << 20]);
    let statuses: Vec<u16> = nginx.access_log().iter().map(|e| e.status).collect();
    assert!(statuses.contains(&401), "no 401 was seen: {statuses:?}");
    drop(c);
    drop(served);
    let text = std::fs::read(&log).unwrap();
    assert!(
        !String::from_utf8_lossy(&text).contains("tok-two"),
        "token in the log"
    );
}

/// Proxy variables are honoured (reqwest reads HTTP_PROXY/HTTPS_PROXY/ALL_PROXY and
/// NO_PROXY), loopback targets included: NO_PROXY must name them to bypass the proxy.
#[test]
fn proxy_variables_are_honoured() {
    let nginx = Nginx::start();
    let (_dir, disk, _) = setup(&nginx, 9);
    let proxy = common::fault_proxy::FaultProxy::start(nginx.port());
    let run = |no_proxy: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_streamboot"))
            .args(strs(&prepare(&disk, &nginx.url("t.img"), &[])))
            .env("HTTP_PROXY", proxy.url(""))
            .env("NO_PROXY", no_proxy)
            .env_remove("http_proxy")
            .env_remove("no_proxy")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run("127.0.0.1");
    assert_eq!(
        proxy.requests(),
        0,
        "NO_PROXY=127.0.0.1 still used the proxy"
    );
    cli_ok(&["rollback", disk.to_str().unwrap()]);
    run("");
    assert!(proxy.requests() > 0, "HTTP_PROXY was ignored");
}

/// `--system-roots` trusts the OS store (rustls-native-certs, which honours
/// `SSL_CERT_FILE`: the test points it at its CA instead of changing the host's store);
/// without the option the OS store is not consulted.
#[test]
fn system_roots_option_uses_the_os_store() {
    let pki = Pki::new();
    let nginx = Nginx::start_custom("ssl", &pki.nginx_tls());
    let (_dir, disk, _) = setup(&nginx, 11);
    let url = nginx.https_url("t.img");
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_streamboot"))
            .args(strs(&prepare(&disk, &url, extra)))
            .env("SSL_CERT_FILE", pki.path("ca.pem"))
            .env_remove("SSL_CERT_DIR")
            .output()
            .unwrap()
    };
    let before = sha256_file(&disk);
    let out = run(&[]);
    assert!(
        !out.status.success(),
        "the OS store was used without --system-roots"
    );
    assert_eq!(sha256_file(&disk), before);
    let out = run(&["--system-roots", "--no-default-roots"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A chunk-store target behind HTTPS with a private CA: the store fetcher trusts what
/// `--cacert` says, like the raw-image source.
#[test]
fn chunk_store_target_uses_the_same_tls_options() {
    let pki = Pki::new();
    let nginx = Nginx::start_custom("ssl", &pki.nginx_tls());
    let (dir, disk, _) = setup(&nginx, 13);
    let image = dir.path().join("v.img");
    std::fs::write(&image, common::random_bytes(14, 3 << 20)).unwrap();
    let key = dir.path().join("k");
    cli_ok(&["keygen", key.to_str().unwrap()]);
    let store = nginx.root().join("store");
    cli_ok(&[
        "publish",
        image.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
        "--name",
        "v",
        "--key",
        &format!("{}.key", key.display()),
    ]);
    let url = nginx.https_url("store/indexes/v.idx");
    let public = format!("{}.pub", key.display());
    let d = disk.to_str().unwrap();
    let before = sha256_file(&disk);
    let base = ["prepare", d, "--target", &url, "--trusted-key", &public];
    let out = cli(&base);
    assert!(!out.status.success(), "an unknown CA was trusted");
    assert_eq!(sha256_file(&disk), before);
    let ca = pki.arg("ca.pem");
    let mut with_ca = base.to_vec();
    with_ca.extend(["--cacert", ca.as_str()]);
    cli_ok(&with_ca);
}
