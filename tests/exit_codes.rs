//! Exit codes per kind of error, `"kind"` in `--json` errors, and JSON-lines progress
//! events of `hydrate` and `commit` (`--wait` through a running serve too).
//!
//! Every case runs the real `streamboot` binary against real files, a real nginx on
//! loopback and (for in-use and `commit --wait`) a real `streamboot serve`. A refused
//! command must leave the disk byte-identical.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::disk::{cli_ok, sha256};
use common::fault_proxy::{Fault, FaultProxy, Rule, When};
use common::nginx::Nginx;
use common::random_bytes;
use common::serve::Served;
use serde_json::Value;
use tempfile::TempDir;

const MIB: usize = 1 << 20;

/// What a failed command left: its exit code, its last stdout line as JSON, its stderr.
struct Failure {
    code: i32,
    json: Value,
    stderr: String,
}

/// Runs `streamboot --json ARGS`, expecting a failure.
fn fails(args: &[&str]) -> Failure {
    let out = Command::new(env!("CARGO_BIN_EXE_streamboot"))
        .arg("--json")
        .args(args)
        .output()
        .expect("run streamboot");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} succeeded: {stdout}");
    let last = stdout.lines().last().unwrap_or_default();
    let json: Value =
        serde_json::from_str(last).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout:?}"));
    Failure {
        code: out.status.code().expect("exited, not killed"),
        json,
        stderr,
    }
}

/// Asserts that `args` fail with `code` and `kind`, one error line, the disk unchanged.
fn refused(disk: &Path, args: &[&str], code: i32, kind: &str, phrase: &str) -> Failure {
    let before = fs::read(disk).ok().map(|d| sha256(&d));
    let f = fails(args);
    assert_eq!(f.json["ok"], false, "{}", f.json);
    assert_eq!(f.json["kind"], kind, "{args:?}: {}", f.json);
    assert_eq!(f.code, code, "{args:?}: {}", f.stderr);
    assert!(f.stderr.starts_with("streamboot: error: "), "{}", f.stderr);
    assert_eq!(f.stderr.trim_end().lines().count(), 1, "{}", f.stderr);
    let msg = f.json["error"].as_str().unwrap_or_default();
    assert!(msg.contains(phrase), "{args:?}: {msg:?} lacks {phrase:?}");
    assert_eq!(
        fs::read(disk).ok().map(|d| sha256(&d)),
        before,
        "{args:?} changed the disk"
    );
    f
}

/// A source disk and a target image served by nginx.
struct Setup {
    dir: TempDir,
    nginx: Nginx,
    disk: PathBuf,
    target: Vec<u8>,
}

impl Setup {
    fn new(seed: u64, target_len: usize) -> Setup {
        let dir = tempfile::tempdir().expect("temp dir");
        let nginx = Nginx::start();
        let target = random_bytes(seed ^ 0x7a7a, target_len);
        nginx.put("target.img", &target);
        let disk = dir.path().join("disk.img");
        fs::write(&disk, random_bytes(seed, 2 * MIB)).expect("write source disk");
        Setup {
            dir,
            nginx,
            disk,
            target,
        }
    }

    fn disk(&self) -> &str {
        self.disk.to_str().expect("utf-8 temp path")
    }

    fn prepare(&self, url: &str) {
        cli_ok(&[
            "prepare",
            self.disk(),
            "--target",
            url,
            "--chunk-size",
            "64K",
        ]);
    }
}

#[test]
fn help_lists_the_exit_codes() {
    let help = cli_ok(&["--help"]);
    for line in [
        "1  other",
        "2  usage",
        "3  in_use",
        "4  invalid_state",
        "5  network",
        "6  integrity",
        "7  io",
    ] {
        assert!(help.contains(line), "--help lacks {line:?}: {help}");
    }
}

#[test]
fn usage_errors_exit_2() {
    let s = Setup::new(1, 3 * MIB);
    // clap's own: a missing required option, an option without the one it needs.
    refused(&s.disk, &["prepare", s.disk()], 2, "usage", "--target");
    refused(
        &s.disk,
        &["commit", s.disk(), "--wait"],
        2,
        "usage",
        "--control",
    );
    // The library's: a chunk size it cannot use, a target that is no usable URL.
    let url = s.nginx.url("target.img");
    refused(
        &s.disk,
        &["prepare", s.disk(), "--target", &url, "--chunk-size", "3K"],
        2,
        "usage",
        "chunk size",
    );
    refused(
        &s.disk,
        &["prepare", s.disk(), "--target", "ftp://127.0.0.1/x.img"],
        2,
        "usage",
        "ftp://127.0.0.1/x.img",
    );
    // A config file that is wrong is a wrong command line too: an unknown key, a value of
    // the wrong type, a secret written into the file, a serve without a socket.
    let dir = TempDir::new().unwrap();
    for (body, phrase) in [
        ("sokcet = \"/x\"\n", "unknown key `sokcet`"),
        ("connect-timeout = \"soon\"\n", "`connect-timeout`"),
        (
            "target = [\"http://u:pw@127.0.0.1/t.img\"]\n",
            "holds a secret",
        ),
    ] {
        let cfg = dir.path().join("serve.toml");
        fs::write(&cfg, body).unwrap();
        let f = refused(
            &s.disk,
            &["serve", s.disk(), "--config", cfg.to_str().unwrap()],
            2,
            "usage",
            phrase,
        );
        assert!(!f.stderr.contains("pw@"), "{}", f.stderr);
    }
    let cfg = dir.path().join("nosock.toml");
    fs::write(&cfg, format!("target = [\"{url}\"]\n")).unwrap();
    refused(
        &s.disk,
        &["serve", s.disk(), "--config", cfg.to_str().unwrap()],
        2,
        "usage",
        "--socket",
    );
}

#[test]
fn a_disk_in_use_exits_3() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("plain.img");
    fs::write(&disk, vec![0u8; MIB]).unwrap();
    let control = dir.path().join("control.sock");
    let ctl = control.to_str().unwrap();
    let served = Served::start(&disk, &dir.path().join("vu.sock"), &["--control", ctl]);
    let d = disk.to_str().unwrap();
    refused(&disk, &["status", d], 3, "in_use", "in use");
    refused(&disk, &["rollback", d], 3, "in_use", "in use");
    // Through the running serve: its refusal (HTTP 409) is a state error.
    refused(
        &disk,
        &["commit", d, "--control", ctl],
        4,
        "invalid_state",
        "nothing to commit",
    );
    served.stop();
    // Free again: the same command works.
    cli_ok(&["status", d]);
}

#[test]
fn invalid_states_exit_4() {
    let s = Setup::new(2, 3 * MIB);
    refused(
        &s.disk,
        &["confirm", s.disk()],
        4,
        "invalid_state",
        "not a prepared disk",
    );
    s.prepare(&s.nginx.url("target.img"));
    refused(
        &s.disk,
        &["commit", s.disk()],
        4,
        "invalid_state",
        "confirm",
    );
    refused(
        &s.disk,
        &["prepare", s.disk(), "--target", &s.nginx.url("target.img")],
        4,
        "invalid_state",
        "already prepared",
    );
}

#[test]
fn network_failures_exit_5() {
    let s = Setup::new(3, 3 * MIB);
    let url = format!("http://127.0.0.1:{}/target.img", common::dead_port());
    refused(
        &s.disk,
        &["prepare", s.disk(), "--target", &url],
        5,
        "network",
        "cannot reach",
    );
    refused(
        &s.disk,
        &["prepare", s.disk(), "--target", &s.nginx.url("missing.img")],
        5,
        "network",
        "404",
    );
}

#[test]
fn integrity_failures_exit_6() {
    let s = Setup::new(4, 3 * MIB);
    let dir = s.dir.path();
    let (k1, k2) = (dir.join("k1"), dir.join("k2"));
    cli_ok(&["keygen", k1.to_str().unwrap()]);
    cli_ok(&["keygen", k2.to_str().unwrap()]);
    let image = dir.join("image.raw");
    fs::write(&image, &s.target).unwrap();
    let store = dir.join("store");
    cli_ok(&[
        "publish",
        image.to_str().unwrap(),
        "--store",
        store.to_str().unwrap(),
        "--name",
        "img",
        "--key",
        dir.join("k1.key").to_str().unwrap(),
    ]);
    let index = store.join("indexes/img.idx");
    refused(
        &s.disk,
        &[
            "prepare",
            s.disk(),
            "--target",
            index.to_str().unwrap(),
            "--trusted-key",
            dir.join("k2.pub").to_str().unwrap(),
        ],
        6,
        "integrity",
        "not trusted",
    );
    // Signed by a trusted key: the same command works.
    cli_ok(&[
        "prepare",
        s.disk(),
        "--target",
        index.to_str().unwrap(),
        "--trusted-key",
        dir.join("k1.pub").to_str().unwrap(),
    ]);
}

#[test]
fn io_errors_exit_7() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-disk.img");
    let f = refused(
        &missing,
        &["status", missing.to_str().unwrap()],
        7,
        "io",
        "No such file",
    );
    assert!(!missing.exists(), "{}", f.stderr);
}

#[test]
fn other_errors_exit_1() {
    let s = Setup::new(5, 3 * MIB);
    let url = s.nginx.url("target.img");
    refused(
        &s.disk,
        &[
            "prepare",
            s.disk(),
            "--target",
            &url,
            "--chunk-size",
            "4K",
            "--area-size",
            "512K",
        ],
        1,
        "other",
        "disk too small",
    );
}

/// Every stdout line of a `--json` run: progress events, then the result.
fn json_lines(args: &[&str]) -> Vec<Value> {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    cli_ok(&all)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect()
}

/// Asserts progress events of `op` (done never above total, never going back within a
/// step), then one result line with `"ok": true`.
fn assert_progress_then_result(lines: &[Value], op: &str) {
    let (result, events) = lines.split_last().expect("output");
    assert_eq!(result["ok"], true, "{result}");
    assert!(result.get("event").is_none(), "{result}");
    assert!(!events.is_empty(), "no progress events: {lines:?}");
    let mut last: Option<(String, u64)> = None;
    for e in events {
        assert_eq!(e["event"], "progress", "{e}");
        assert_eq!(e["op"], op, "{e}");
        let (step, done, total) = (
            e["step"].as_str().unwrap().to_string(),
            e["done"].as_u64().unwrap(),
            e["total"].as_u64().unwrap(),
        );
        assert!(done <= total, "{e}");
        if let Some((s, d)) = &last {
            assert!(s != &step || *d <= done, "progress went back: {e}");
        }
        last = Some((step, done));
    }
}

#[test]
fn hydrate_and_commit_print_json_lines_progress() {
    let s = Setup::new(6, 4 * MIB);
    s.prepare(&s.nginx.url("target.img"));
    let lines = json_lines(&["hydrate", s.disk()]);
    assert_progress_then_result(&lines, "hydrate");
    cli_ok(&["confirm", s.disk()]);
    let lines = json_lines(&["commit", s.disk()]);
    assert_progress_then_result(&lines, "commit");
    let disk = fs::read(&s.disk).unwrap();
    assert_eq!(sha256(&disk[..s.target.len()]), sha256(&s.target));
}

#[test]
fn commit_wait_through_serve_follows_the_background_commit() {
    let s = Setup::new(7, 4 * MIB);
    let proxy = FaultProxy::start(s.nginx.port());
    s.prepare(&proxy.url("target.img"));
    let sock = s.dir.path().join("vu.sock");
    let control = s.dir.path().join("control.sock");
    let ctl = control.to_str().unwrap();
    let served = Served::start(&s.disk, &sock, &["--control", ctl, "--no-hydrate"]);
    cli_ok(&["confirm", s.disk(), "--control", ctl]);
    // The commit's first fetch stalls for a second (then the source retries it), so the
    // commit is still running when `--wait` first looks.
    proxy.set_plan(
        7,
        vec![Rule::new(When::Always, Fault::Stall { after: 0, secs: 1 }).limit(1)],
    );
    let lines = json_lines(&["commit", s.disk(), "--control", ctl, "--wait"]);
    assert_progress_then_result(&lines, "commit");
    assert_eq!(lines.last().unwrap()["state"], "committed");
    served.stop();
    // The disk holds the target.
    let st: Value = serde_json::from_str(&cli_ok(&["--json", "status", s.disk()])).unwrap();
    assert_eq!(st["prepared"], false, "{st}");
    let disk = fs::read(&s.disk).unwrap();
    assert_eq!(sha256(&disk[..s.target.len()]), sha256(&s.target));
}
