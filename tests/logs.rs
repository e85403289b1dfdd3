//! What `serve` writes to a log file: plain text, no terminal escape codes.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn serve_logs_to_a_file_carry_no_ansi_escapes() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("plain.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let sock = dir.path().join("vu.sock");
    let log = dir.path().join("serve.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_streamboot"))
        .arg("serve")
        .arg(&disk)
        .arg("--socket")
        .arg(&sock)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !sock.exists() {
        assert!(t.elapsed() < Duration::from_secs(20), "no socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: sending a signal to our own child process by pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("vhost-user-blk listening"), "{text}");
    assert!(
        !text.contains('\u{1b}'),
        "escape codes in a log file: {text:?}"
    );
}

#[test]
fn serve_log_format_json_writes_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("plain.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let sock = dir.path().join("vu.sock");
    let log = dir.path().join("serve.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_streamboot"))
        .args(["--log-format", "json", "serve"])
        .arg(&disk)
        .arg("--socket")
        .arg(&sock)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !sock.exists() {
        assert!(t.elapsed() < Duration::from_secs(20), "no socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: sending a signal to our own child process by pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect();
    assert!(lines.len() >= 2, "{text}");
    for l in &lines {
        assert!(l["level"].is_string(), "no level: {l}");
        assert!(l["message"].is_string(), "no message: {l}");
        assert!(l["timestamp"].is_string(), "no timestamp: {l}");
    }
    assert!(
        lines.iter().any(|l| l["level"] == "INFO"
            && l["message"]
                .as_str()
                .unwrap()
                .contains("vhost-user-blk listening")),
        "{text}"
    );
}

/// A serve that cannot start still writes only JSON lines with `--log-format json`: its
/// final error too, with the error's kind.
#[test]
fn a_failing_serve_with_json_logs_ends_with_a_json_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-disk.img");
    let sock = dir.path().join("vu.sock");
    let out = Command::new(env!("CARGO_BIN_EXE_streamboot"))
        .args(["--log-format", "json", "serve"])
        .arg(&missing)
        .arg("--socket")
        .arg(&sock)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    let text = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect();
    let last = lines.last().expect("an error line");
    assert_eq!(last["level"], "ERROR", "{last}");
    assert_eq!(last["kind"], "io", "{last}");
    let msg = last["message"].as_str().unwrap();
    assert!(msg.starts_with("streamboot: error: "), "{msg}");
    assert!(msg.contains("no-such-disk.img"), "{msg}");
    // A usage error too.
    let out = Command::new(env!("CARGO_BIN_EXE_streamboot"))
        .args(["--log-format", "json", "serve", "--no-such-option"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let line: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stderr).trim()).unwrap();
    assert_eq!(line["kind"], "usage", "{line}");
}
