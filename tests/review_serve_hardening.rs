//! Hostile review of serve's webhooks and metrics listener (issue 16), on the real binary
//! over a plain disk: a webhook URL's secrets never reach the log, a webhook that
//! redirects is not followed (the event is neither lost silently nor sent elsewhere), and
//! clients that pipeline scrapes without reading the answers cannot hold the metrics
//! listener's connection slots for ever.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::serve::Served;

/// A plain disk file (served as it is: no target, no preparation).
fn plain_disk(dir: &Path) -> std::path::PathBuf {
    let disk = dir.join("disk.img");
    std::fs::write(&disk, common::random_bytes(3, 1 << 20)).unwrap();
    disk
}

/// Starts `streamboot -vvv serve DISK --socket S EXTRA` with its log in `log`.
fn serve_verbose(dir: &Path, extra: &[&str]) -> Served {
    let disk = plain_disk(dir);
    let socket = dir.join("vhost.sock");
    let log = dir.join("serve.log");
    let child = Command::new(env!("CARGO_BIN_EXE_streamboot"))
        .arg("-vvv")
        .arg("serve")
        .arg(&disk)
        .arg("--socket")
        .arg(&socket)
        .args(extra)
        .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
        .stderr(Stdio::from(
            std::fs::OpenOptions::new().append(true).open(&log).unwrap(),
        ))
        .spawn()
        .expect("start serve");
    let served = Served {
        child: Some(child),
        socket: socket.clone(),
        log: Some(log),
    };
    let t = Instant::now();
    while !socket.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no socket: {}",
            served.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    served
}

#[test]
fn webhook_url_secrets_never_reach_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::dead_port();
    let url = format!("http://user:secret@127.0.0.1:{port}/hook?token=topsecret");
    let mut served = serve_verbose(dir.path(), &["--notify", &url]);
    let (st, _) = served.sigterm_within(Duration::from_secs(30));
    assert!(st.success(), "{st:?}");
    let log = served.log();
    assert!(
        log.contains("not delivered"),
        "the failed delivery is not logged:\n{log}"
    );
    for s in ["secret", "topsecret"] {
        assert!(!log.contains(s), "log shows {s:?}:\n{log}");
    }

    // A URL that does not parse is refused without showing its secrets either.
    let err = common::disk::cli_err(&[
        "serve",
        "/nonexistent",
        "--socket",
        "/nonexistent.sock",
        "--notify",
        "http://user:topsecret@exa mple.com/x?sig=topsecret",
    ]);
    assert!(!err.contains("topsecret"), "{err}");
    assert!(err.contains("notify"), "{err}");
}

/// A webhook receiver answering every POST to /hook with `status` and a Location to
/// /elsewhere (which would answer 200). Returns the requests seen ("METHOD PATH").
fn redirecting_receiver(status: &'static str) -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { continue };
            let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match c.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let head = String::from_utf8_lossy(&buf).into_owned();
            let line = head.lines().next().unwrap_or_default().to_owned();
            let mut parts = line.split(' ');
            let what = format!(
                "{} {}",
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default()
            );
            let resp = if what.ends_with("/hook") {
                format!("HTTP/1.1 {status}\r\nLocation: /elsewhere\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            } else {
                "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_owned()
            };
            s.lock().unwrap().push(what);
            let _ = c.write_all(resp.as_bytes());
        }
    });
    (port, seen)
}

#[test]
fn webhook_redirects_are_not_followed() {
    for status in ["302 Found", "307 Temporary Redirect"] {
        let dir = tempfile::tempdir().unwrap();
        let (port, seen) = redirecting_receiver(status);
        let url = format!("http://127.0.0.1:{port}/hook");
        let mut served = serve_verbose(dir.path(), &["--notify", &url]);
        let (st, _) = served.sigterm_within(Duration::from_secs(30));
        assert!(st.success(), "{st:?}");
        let seen = seen.lock().unwrap().clone();
        let log = served.log();
        assert!(
            seen.iter().any(|r| r == "POST /hook"),
            "{status}: no event posted: {seen:?}\n{log}"
        );
        assert!(
            !seen.iter().any(|r| r.ends_with("/elsewhere")),
            "{status}: the redirect was followed: {seen:?}\n{log}"
        );
        assert!(
            log.contains("redirect") && log.contains("not delivered"),
            "{status}: the undelivered event is not reported:\n{log}"
        );
    }
}

#[test]
fn pipelining_clients_that_never_read_cannot_starve_the_metrics_listener() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::dead_port();
    let listen = format!("127.0.0.1:{port}");
    let served = Served::start(
        &plain_disk(dir.path()),
        &dir.path().join("vhost.sock"),
        &["--metrics-listen", &listen],
    );
    let t = Instant::now();
    while TcpStream::connect(&listen).is_err() {
        assert!(t.elapsed() < Duration::from_secs(10), "no metrics listener");
        std::thread::sleep(Duration::from_millis(20));
    }
    // More connections than the listener serves at once, each pipelining thousands of
    // scrapes and never reading one answer.
    let pipeline = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(3000);
    let mut hogs = Vec::new();
    for _ in 0..40 {
        let mut s = TcpStream::connect(&listen).unwrap();
        s.set_nonblocking(true).unwrap();
        let _ = s.write(&pipeline);
        hogs.push(s);
    }
    std::thread::sleep(Duration::from_secs(2));
    for s in &mut hogs {
        let _ = s.write(&pipeline);
    }
    // A real scraper still gets its answer (a hang is the failure; the bound is generous).
    let mut s = TcpStream::connect(&listen).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(45))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = [0u8; 32];
    let n = s
        .read(&mut answer)
        .expect("metrics listener starved by clients that never read");
    assert!(
        answer[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&answer[..n])
    );
    drop(hogs);
    served.stop();
}

#[test]
fn a_notify_secret_others_may_read_or_write_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let disk = plain_disk(dir.path());
    let sock = dir.path().join("vhost.sock");
    let key = dir.path().join("hook.key");
    std::fs::write(&key, b"topsecret-key\n").unwrap();
    // (The disk does not exist: the secret is checked first, and a serve that took the
    // secret fails instead of running.)
    for mode in [0o644, 0o640, 0o602] {
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
        let err = common::disk::cli_err(&[
            "serve",
            dir.path().join("missing.img").to_str().unwrap(),
            "--socket",
            sock.to_str().unwrap(),
            "--notify",
            "http://127.0.0.1:1/hook",
            "--notify-secret",
            key.to_str().unwrap(),
        ]);
        assert!(err.contains("chmod 600"), "{mode:o}: {err}");
        assert!(!err.contains("topsecret"), "{err}");
        assert!(!sock.exists(), "{mode:o}: serve started");
    }
    // 0600 (and 0400) are taken.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o400)).unwrap();
    let served = Served::start(
        &disk,
        &sock,
        &[
            "--notify",
            "http://127.0.0.1:1/hook",
            "--notify-secret",
            key.to_str().unwrap(),
        ],
    );
    served.stop();
}

#[test]
fn url_secrets_on_the_command_line_are_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::dead_port();
    let url = format!("http://127.0.0.1:{port}/hook?token=topsecret");
    let mut served = serve_verbose(dir.path(), &["--notify", &url]);
    let (st, _) = served.sigterm_within(Duration::from_secs(30));
    assert!(st.success(), "{st:?}");
    let log = served.log();
    assert!(
        log.contains("--notify-file"),
        "no advice to keep the secret out of ps:\n{log}"
    );
    assert!(!log.contains("topsecret"), "{log}");
}

#[test]
fn pipelining_clients_that_never_read_cannot_starve_the_control_socket() {
    use std::os::unix::net::UnixStream;
    let dir = tempfile::tempdir().unwrap();
    let ctl = dir.path().join("ctl.sock");
    let served = Served::start(
        &plain_disk(dir.path()),
        &dir.path().join("vhost.sock"),
        &["--control", ctl.to_str().unwrap()],
    );
    let t = Instant::now();
    while UnixStream::connect(&ctl).is_err() {
        assert!(t.elapsed() < Duration::from_secs(10), "no control socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pipeline = b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n".repeat(3000);
    let mut hogs = Vec::new();
    for _ in 0..40 {
        let mut s = UnixStream::connect(&ctl).unwrap();
        s.set_nonblocking(true).unwrap();
        let _ = s.write(&pipeline);
        hogs.push(s);
    }
    std::thread::sleep(Duration::from_secs(2));
    for s in &mut hogs {
        let _ = s.write(&pipeline);
    }
    let mut s = UnixStream::connect(&ctl).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(45))).unwrap();
    s.write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = [0u8; 32];
    let n = s
        .read(&mut answer)
        .expect("control socket starved by clients that never read");
    assert!(
        answer[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&answer[..n])
    );
    drop(hogs);
    served.stop();
}
