//! Secrets of a target URL (issue 11, issue 15 point 3): a userinfo (`user:secret@`) and a
//! presigned query string (`?X-Amz-Signature=...`) are used for the requests but never
//! written to the disk and never printed: not by `prepare -v`, `status` (text and JSON),
//! `serve -v` or its control API. A later `serve` without the credentials gets a clear
//! one-line error telling to give the full URL with `--target`.
//!
//! nginx ignores both secrets; the fault proxy in front of it plays a server that wants them
//! (403 otherwise).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::disk::cli;
use common::fault_proxy::{Fault, FaultProxy, Rule, When};
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

fn assert_no_secret_bytes(what: &str, bytes: &[u8]) {
    for s in SECRETS {
        assert!(
            !bytes.windows(s.len()).any(|w| w == s.as_bytes()),
            "{what} contains {s:?}"
        );
    }
}

/// Runs `streamboot -vvv ARGS` (debug logs of every crate) and returns (success, stdout, stderr).
fn run(args: &[&str]) -> (bool, Vec<u8>, Vec<u8>) {
    let mut all = vec!["-vvv"];
    all.extend_from_slice(args);
    let out = cli(&all);
    (out.status.success(), out.stdout, out.stderr)
}

#[test]
fn url_secrets_never_reach_disk_status_or_logs() {
    let nginx = Nginx::start();
    let target = common::random_bytes(1, 2 << 20);
    nginx.put("t.img", &target);
    let proxy = FaultProxy::start(nginx.port());
    proxy.set_plan(
        1,
        vec![Rule::new(
            When::Always,
            Fault::Require {
                needles: vec![
                    "authorization: Basic dXNlcjpzZWNyZXQ=".into(),
                    "X-Amz-Signature=topsecret".into(),
                ],
                status: 403,
            },
        )],
    );
    let secret_url =
        proxy
            .url("t.img?X-Amz-Signature=topsecret")
            .replacen("http://", "http://user:secret@", 1);
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, common::random_bytes(2, 1 << 20)).unwrap();
    let d = disk.to_str().unwrap();

    let (ok, out, err) = run(&[
        "prepare",
        d,
        "--target",
        &secret_url,
        "--chunk-size",
        "65536",
    ]);
    assert!(ok, "prepare failed: {}", String::from_utf8_lossy(&err));
    assert_no_secret("prepare stdout", &out);
    assert_no_secret("prepare stderr", &err);
    assert_no_secret_bytes("the disk image", &std::fs::read(&disk).unwrap());

    let (ok, text, err) = run(&["status", d]);
    assert!(ok, "{}", String::from_utf8_lossy(&err));
    assert_no_secret("status", &text);
    assert_no_secret("status stderr", &err);
    let recorded = proxy.url("t.img");
    assert!(
        String::from_utf8_lossy(&text).contains(&recorded),
        "status does not show the target {recorded}: {}",
        String::from_utf8_lossy(&text)
    );
    let (ok, json, err) = run(&["status", d, "--json"]);
    assert!(ok, "{}", String::from_utf8_lossy(&err));
    assert_no_secret("status --json", &json);

    // Without the credentials, serve refuses with one clear line.
    let socket = dir.path().join("vu.sock");
    let s = socket.to_str().unwrap();
    let (ok, _, err) = run(&["serve", d, "--socket", s, "--request-timeout", "2"]);
    assert!(!ok, "serve started without credentials");
    let err_text = String::from_utf8_lossy(&err);
    let last = err_text.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("streamboot: error: ")
            && last.contains("403")
            && last.contains("--target"),
        "unclear error: {err_text}"
    );
    assert_no_secret("serve error", &err);

    // With them (given again at run time) it serves; the control API shows no secret.
    let ctl = dir.path().join("ctl.sock");
    let log = dir.path().join("serve.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_streamboot"))
        .args(["-vvv", "serve", d, "--socket", s, "--target", &secret_url])
        .arg("--control")
        .arg(&ctl)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start serve");
    let status = wait_for_status(&ctl, &log);
    // Let background hydration send a few requests (with the secrets) first.
    std::thread::sleep(Duration::from_millis(500));
    let _ = child.kill();
    let _ = child.wait();
    assert_no_secret("control API status", status.to_string().as_bytes());
    let log_text = std::fs::read(&log).unwrap();
    assert_no_secret("serve -vvv log", &log_text);
    // The log did name the target (redacted), so the check above looked at URL lines.
    let shown = format!("***@127.0.0.1:{}", proxy.url("").split(':').nth(2).unwrap());
    assert!(
        String::from_utf8_lossy(&log_text).contains(shown.trim_end_matches('/')),
        "the serve log never names the target: {}",
        String::from_utf8_lossy(&log_text)
    );
    assert!(
        proxy.requests() > 3,
        "serve sent no request with the secrets"
    );
    assert_no_secret_bytes("the disk image after serve", &std::fs::read(&disk).unwrap());
}

/// Polls the control socket until `serve` answers (or fails with its log).
fn wait_for_status(ctl: &Path, log: &Path) -> serde_json::Value {
    let start = Instant::now();
    loop {
        if let Ok(v) = streamboot::control::client::get_status(ctl) {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "serve did not come up: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A failing `prepare` names the target in its one-line error without the secrets.
#[test]
fn failing_prepare_error_shows_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, common::random_bytes(3, 1 << 20)).unwrap();
    let url = format!(
        "http://user:secret@127.0.0.1:{}/t.img?X-Amz-Signature=topsecret",
        common::dead_port()
    );
    let (ok, out, err) = run(&[
        "prepare",
        disk.to_str().unwrap(),
        "--target",
        &url,
        "--connect-timeout",
        "1",
    ]);
    assert!(!ok, "prepare succeeded against a dead port");
    assert_no_secret("prepare stdout", &out);
    assert_no_secret("prepare error", &err);
    assert!(String::from_utf8_lossy(&err).contains("cannot reach"));
}

/// `prepare`, `hydrate` and `commit` take a URL with secrets from `--target-file` (one
/// URL a line), so the secret stays off the command line (`ps`) too; the disk and the
/// output never show it, and the commit gives the target.
#[test]
fn target_file_for_prepare_hydrate_and_commit() {
    let nginx = Nginx::start();
    let target = common::random_bytes(4, 2 << 20);
    nginx.put("t.img", &target);
    let proxy = FaultProxy::start(nginx.port());
    proxy.set_plan(
        1,
        vec![Rule::new(
            When::Always,
            Fault::Require {
                needles: vec!["X-Amz-Signature=topsecret".into()],
                status: 403,
            },
        )],
    );
    let dir = tempfile::tempdir().unwrap();
    let urls = dir.path().join("target.url");
    std::fs::write(
        &urls,
        format!(
            "# the presigned URL\n{}\n",
            proxy.url("t.img?X-Amz-Signature=topsecret")
        ),
    )
    .unwrap();
    let f = urls.to_str().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, common::random_bytes(5, 1 << 20)).unwrap();
    let d = disk.to_str().unwrap();

    let (ok, out, err) = run(&["prepare", d, "--target-file", f, "--chunk-size", "64K"]);
    assert!(ok, "prepare failed: {}", String::from_utf8_lossy(&err));
    assert_no_secret("prepare output", &[out, err].concat());
    let (ok, out, err) = run(&["hydrate", d, "--target-file", f]);
    assert!(ok, "hydrate failed: {}", String::from_utf8_lossy(&err));
    assert_no_secret("hydrate output", &[out, err].concat());
    let (ok, out, err) = run(&["commit", d, "--force", "--target-file", f]);
    assert!(ok, "commit failed: {}", String::from_utf8_lossy(&err));
    assert_no_secret("commit output", &[out, err].concat());
    let after = std::fs::read(&disk).unwrap();
    assert!(
        after[..target.len()] == target[..],
        "commit did not give the target"
    );
    assert_no_secret_bytes("the committed disk", &after[target.len()..]);
}
