//! Issue 16 points 6 and 7 on the real binary: the Prometheus metrics of a `serve` with a
//! real nginx and libblkio as the guest, checked by `promtool check metrics` (Debian
//! package `prometheus`, installed by vm-tests/setup.sh) and scraped over
//! `--metrics-listen`; signed webhooks of a real prepare -> serve -> confirm -> commit
//! run, verified by a receiver in the test, and `fetch-error` when nginx stops.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::blkio_client::Client;
use common::disk::cli_ok;
use common::nginx::Nginx;
use common::serve::Served;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

const CHUNK: usize = 64 << 10;

/// A source disk prepared for a 4 MiB target on nginx.
fn setup(nginx: &Nginx, dir: &Path) -> (PathBuf, Vec<u8>) {
    let target = common::random_bytes(16, 4 << 20);
    nginx.put("t.img", &target);
    let disk = dir.join("disk.img");
    std::fs::write(&disk, common::random_bytes(17, 3 << 20)).unwrap();
    cli_ok(&[
        "prepare",
        disk.to_str().unwrap(),
        "--target",
        &nginx.url("t.img"),
        "--boot-range",
        "0..64K",
    ]);
    (disk, target)
}

/// `GET path` over plain TCP; (status, content type, body).
fn http_get(addr: &str, method: &str, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head[9..12].parse().unwrap();
    let ctype = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type: ")
                .map(str::to_owned)
        })
        .unwrap_or_default();
    (status, ctype, body.to_owned())
}

/// The value of the sample `name{labels...}` (labels in any order, all given).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, "}"));
        let ok = n == name
            && labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
        ok.then(|| value.parse().unwrap())
    })
}

#[test]
fn metrics_pass_promtool_and_carry_histograms() {
    let nginx = Nginx::start();
    let dir = tempfile::tempdir().unwrap();
    let (disk, target) = setup(&nginx, dir.path());
    let port = common::dead_port();
    let addr = format!("127.0.0.1:{port}");
    let ctl = dir.path().join("ctl.sock");
    let srv = Served::start(
        &disk,
        &dir.path().join("vu.sock"),
        &[
            "--no-hydrate",
            "--control",
            ctl.to_str().unwrap(),
            "--metrics-listen",
            &addr,
        ],
    );
    let mut c = Client::connect(&srv.socket, 1, 4 * CHUNK).unwrap();
    assert_eq!(c.read(10 * CHUNK as u64, 0, 2 * CHUNK), 0);
    assert!(*c.buf(0..2 * CHUNK) == target[10 * CHUNK..12 * CHUNK]);
    assert_eq!(c.write(0, 0, 4096), 0);
    c.submit_flush(0, 1);
    c.wait(0, 1).unwrap();

    let (status, ctype, text) = http_get(&addr, "GET", "/metrics");
    assert_eq!(status, 200, "{text}");
    assert_eq!(
        ctype,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    // The control socket serves the same families.
    let via_ctl = streamboot::control::client::get_metrics(&ctl).unwrap();
    assert!(
        via_ctl.contains("# TYPE streamboot_fetched_bytes counter"),
        "{via_ctl}"
    );

    // promtool lints the Prometheus text format; the one thing it reports on OpenMetrics
    // is that a counter's `_total` samples have no HELP of their own (OpenMetrics puts HELP
    // and TYPE on the name without `_total`). Anything else is a failure.
    let mut p = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; vm-tests/setup.sh installs it)");
    p.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = p.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        matches!(out.status.code(), Some(0 | 3)),
        "promtool: {report}\n{text}"
    );
    for line in report.lines().filter(|l| !l.trim().is_empty()) {
        let counter = line
            .strip_suffix("_total no help text")
            .unwrap_or_else(|| panic!("promtool: {line}\n{text}"));
        assert!(
            text.contains(&format!("# TYPE {counter} counter\n")),
            "promtool: {line}"
        );
    }

    let disk_s = disk.display().to_string();
    let d = ("disk", disk_s.as_str());
    let demand = sample(
        &text,
        "streamboot_fetched_bytes_total",
        &[d, ("reason", "demand")],
    );
    assert!(demand.unwrap() >= (2 * CHUNK) as f64, "{text}");
    assert!(sample(&text, "streamboot_start_time_seconds", &[d]).unwrap() > 1.7e9);
    assert!(!text.contains("uptime"), "{text}");
    for (op, min) in [("read", 1.0), ("write", 1.0), ("flush", 1.0)] {
        let h = "streamboot_guest_request_duration_seconds";
        let count = sample(&text, &format!("{h}_count"), &[d, ("op", op)]).unwrap();
        assert!(count >= min, "{op}: {text}");
        let inf = sample(
            &text,
            &format!("{h}_bucket"),
            &[d, ("op", op), ("le", "+Inf")],
        );
        assert_eq!(inf, Some(count), "{op}");
        let les: Vec<&str> = text
            .lines()
            .filter(|l| {
                l.starts_with(&format!("{h}_bucket{{")) && l.contains(&format!("op=\"{op}\""))
            })
            .map(|l| l.split("le=\"").nth(1).unwrap().split('"').next().unwrap())
            .collect();
        assert_eq!(
            les.len(),
            streamboot::engine::LATENCY_BUCKETS.len() + 1,
            "{les:?}"
        );
        assert_eq!(les[0], "0.0001");
        assert_eq!(les.last(), Some(&"+Inf"));
    }
    let f = "streamboot_fetch_duration_seconds_count";
    assert!(
        sample(&text, f, &[d, ("reason", "demand")]).unwrap() >= 1.0,
        "{text}"
    );
    assert_eq!(sample(&text, f, &[d, ("reason", "background")]), Some(0.0));

    // Read-only: nothing but GET /metrics on the TCP listener.
    assert_eq!(http_get(&addr, "POST", "/metrics").0, 405);
    assert_eq!(http_get(&addr, "GET", "/v1/status").0, 404);
    assert_eq!(http_get(&addr, "POST", "/v1/confirm").0, 404);
    drop(c);
    srv.stop();
}

/// What the receiver got: headers (lower-case names) and body.
type Posts = Arc<Mutex<Vec<(HashMap<String, String>, Vec<u8>)>>>;

/// A webhook receiver on loopback answering 200 to every POST.
fn receiver() -> (String, Posts) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", l.local_addr().unwrap());
    let posts: Posts = Arc::default();
    let p = posts.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { continue };
            let mut r = BufReader::new(s);
            let mut headers = HashMap::new();
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            loop {
                line.clear();
                r.read_line(&mut line).unwrap();
                if line.trim().is_empty() {
                    break;
                }
                let (k, v) = line.split_once(':').unwrap();
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
            }
            let len: usize = headers["content-length"].parse().unwrap();
            let mut body = vec![0; len];
            r.read_exact(&mut body).unwrap();
            r.get_mut()
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .unwrap();
            p.lock().unwrap().push((headers, body));
        }
    });
    (url, posts)
}

/// The receiver's check: `sha256=HMAC(secret, TIMESTAMP.BODY)`, compared in constant time.
fn verify(secret: &[u8], headers: &HashMap<String, String>, body: &[u8]) -> bool {
    let (Some(ts), Some(sig)) = (
        headers.get("x-streamboot-timestamp"),
        headers.get("x-streamboot-signature"),
    ) else {
        return false;
    };
    let Some(Ok(sig)) = sig.strip_prefix("sha256=").map(hex::decode) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
    mac.update(ts.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

fn wait_event(posts: &Posts, event: &str, limit: Duration) -> (HashMap<String, String>, Value) {
    let t = Instant::now();
    loop {
        let found = posts.lock().unwrap().iter().find_map(|(h, b)| {
            let v: Value = serde_json::from_slice(b).unwrap();
            (v["event"] == event).then(|| (h.clone(), v))
        });
        if let Some(f) = found {
            return f;
        }
        let got: Vec<String> = posts
            .lock()
            .unwrap()
            .iter()
            .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
            .collect();
        assert!(
            t.elapsed() < limit,
            "no {event} event within {limit:?}; got {got:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn signed_webhooks_of_a_real_lifecycle() {
    let nginx = Nginx::start();
    let dir = tempfile::tempdir().unwrap();
    let (disk, _) = setup(&nginx, dir.path());
    let secret_file = dir.path().join("hook.key");
    let secret = b"s3cr3t-\x01-key";
    std::fs::write(&secret_file, [&secret[..], b"\n"].concat()).unwrap();
    owner_only(&secret_file);
    let (url, posts) = receiver();
    let ctl = dir.path().join("ctl.sock");
    let log = dir.path().join("serve.log");
    let srv = Served::start_logged(
        &disk,
        &dir.path().join("vu.sock"),
        Some(&log),
        &[
            "--control",
            ctl.to_str().unwrap(),
            "--notify",
            &url,
            "--notify-secret",
            secret_file.to_str().unwrap(),
        ],
    );
    let c = Client::connect(&srv.socket, 1, CHUNK).unwrap();
    wait_event(&posts, "trial-start", Duration::from_secs(10));
    drop(c);
    streamboot::control::client::confirm(&ctl).unwrap();
    wait_event(&posts, "confirmed", Duration::from_secs(10));
    wait_event(&posts, "hydration-done", Duration::from_secs(60));
    streamboot::control::client::commit(&ctl).unwrap();
    wait_event(&posts, "commit-done", Duration::from_secs(60));
    srv.stop();

    let posts = posts.lock().unwrap().clone();
    let mut ids = std::collections::HashSet::new();
    for (h, body) in &posts {
        assert!(verify(secret, h, body), "bad signature: {h:?}");
        let v: Value = serde_json::from_slice(body).unwrap();
        assert!(
            ids.insert(v["id"].as_str().unwrap().to_owned()),
            "id repeated: {v}"
        );
        assert!(v["time"].as_str().unwrap().ends_with('Z'), "{v}");
    }
    // Forged: a changed body, another key, no signature.
    let (h, body) = &posts[0];
    let mut forged = body.clone();
    forged.extend_from_slice(b" ");
    assert!(!verify(secret, h, &forged));
    assert!(!verify(b"other", h, body));
    let mut unsigned = h.clone();
    unsigned.remove("x-streamboot-signature");
    assert!(!verify(secret, &unsigned, body));
    // The secret never reaches the log.
    let logged = std::fs::read(&log).unwrap();
    assert!(!logged.windows(secret.len()).any(|w| w == secret));
}

#[test]
fn fetch_error_event_when_nginx_stops() {
    let mut nginx = Nginx::start();
    let dir = tempfile::tempdir().unwrap();
    let (disk, _) = setup(&nginx, dir.path());
    let secret_file = dir.path().join("hook.key");
    std::fs::write(&secret_file, b"k").unwrap();
    owner_only(&secret_file);
    let (url, posts) = receiver();
    let srv = Served::start(
        &disk,
        &dir.path().join("vu.sock"),
        &[
            "--no-hydrate",
            "--notify",
            &url,
            "--notify-secret",
            secret_file.to_str().unwrap(),
            "--fetch-deadline",
            "2",
        ],
    );
    nginx.stop();
    let mut c = Client::connect(&srv.socket, 1, CHUNK).unwrap();
    assert_ne!(
        c.read(20 * CHUNK as u64, 0, CHUNK),
        0,
        "read with nginx down succeeded"
    );
    let (_, v) = wait_event(&posts, "fetch-error", Duration::from_secs(30));
    assert!(posts
        .lock()
        .unwrap()
        .iter()
        .all(|(h, b)| verify(b"k", h, b)));
    assert!(v["message"].as_str().unwrap().contains("fetch"), "{v}");
    drop(c);
    srv.stop();
}

/// Secret files must be 0600 (serve refuses others).
fn owner_only(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[test]
fn a_bad_secret_file_is_refused_before_the_disk_is_opened() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let empty = dir.path().join("empty.key");
    std::fs::write(&empty, b"\n").unwrap();
    owner_only(&empty);
    let sock = dir.path().join("vu.sock");
    for (secret, want) in [
        (
            dir.path().join("missing.key"),
            "cannot read the notify secret",
        ),
        (empty, "is empty"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_streamboot"))
            .args([
                "serve",
                disk.to_str().unwrap(),
                "--socket",
                sock.to_str().unwrap(),
            ])
            .args(["--notify", "http://127.0.0.1:1/x", "--notify-secret"])
            .arg(&secret)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "one line: {err}");
        assert!(lines[0].contains(want), "{err}");
        assert!(!sock.exists(), "the socket was created before the check");
    }
    // A secret with nothing to sign is an operator mistake, refused the same way.
    let out = Command::new(env!("CARGO_BIN_EXE_streamboot"))
        .args(["serve", disk.to_str().unwrap(), "--socket"])
        .arg(&sock)
        .arg("--notify-secret")
        .arg(dir.path().join("missing.key"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains("needs --notify"), "{err}");
    assert!(!sock.exists(), "the socket was created before the check");
}

#[test]
fn integrity_error_event_when_the_image_changes_on_the_server() {
    let nginx = Nginx::start();
    let dir = tempfile::tempdir().unwrap();
    let (disk, _) = setup(&nginx, dir.path());
    let (url, posts) = receiver();
    let srv = Served::start(
        &disk,
        &dir.path().join("vu.sock"),
        &["--no-hydrate", "--notify", &url],
    );
    let later = std::time::SystemTime::now() + Duration::from_secs(3600);
    nginx.replace("t.img", &common::random_bytes(99, 4 << 20), later);
    let mut c = Client::connect(&srv.socket, 1, CHUNK).unwrap();
    assert_ne!(
        c.read(30 * CHUNK as u64, 0, CHUNK),
        0,
        "read of a changed image succeeded"
    );
    let (_, v) = wait_event(&posts, "integrity-error", Duration::from_secs(30));
    assert!(v["message"].as_str().unwrap().contains("changed"), "{v}");
    let fetch_errors = posts
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, b)| serde_json::from_slice::<Value>(b).unwrap()["event"] == "fetch-error")
        .count();
    assert_eq!(
        fetch_errors, 0,
        "a changed image is an integrity error, not a fetch error"
    );
    drop(c);
    srv.stop();
}

/// `curl -s URL` (installed by vm-tests/setup.sh), parsed as JSON.
fn curl_json(url: &str) -> Option<Value> {
    let out = Command::new("curl")
        .args(["-s", "--max-time", "5", url])
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

#[test]
fn a_real_prometheus_scrapes_the_metrics_listener() {
    let nginx = Nginx::start();
    let dir = tempfile::tempdir().unwrap();
    let (disk, _) = setup(&nginx, dir.path());
    let addr = format!("127.0.0.1:{}", common::dead_port());
    let srv = Served::start(
        &disk,
        &dir.path().join("vu.sock"),
        &["--no-hydrate", "--metrics-listen", &addr],
    );
    let mut c = Client::connect(&srv.socket, 1, CHUNK).unwrap();
    assert_eq!(c.read(5 * CHUNK as u64, 0, CHUNK), 0);
    let cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: streamboot\n    \
             static_configs:\n      - targets: ['{addr}']\n"
        ),
    )
    .unwrap();
    let web = format!("127.0.0.1:{}", common::dead_port());
    let mut prom = Command::new("prometheus")
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
        .spawn()
        .expect("prometheus (Debian package prometheus; vm-tests/setup.sh installs it)");
    let query = format!(
        "http://{web}/api/v1/query?query=streamboot_fetched_bytes_total%7Breason%3D%22demand%22%7D"
    );
    let t = Instant::now();
    let result = loop {
        let r = curl_json(&query);
        if let Some(v) = r.as_ref().and_then(|v| v["data"]["result"].get(0)).cloned() {
            break v;
        }
        if t.elapsed() > Duration::from_secs(60) {
            let _ = prom.kill();
            let log = std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap();
            panic!("Prometheus has no streamboot sample after 60 s: {r:?}\n{log}");
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let targets = curl_json(&format!("http://{web}/api/v1/targets")).unwrap();
    let _ = prom.kill();
    let _ = prom.wait();
    let target = &targets["data"]["activeTargets"][0];
    assert_eq!(target["health"], "up", "{target}");
    assert_eq!(target["lastError"], "", "{target}");
    assert_eq!(result["metric"]["disk"], disk.display().to_string());
    let v: f64 = result["value"][1].as_str().unwrap().parse().unwrap();
    assert!(v >= CHUNK as f64, "{result}");
    drop(c);
    srv.stop();
}
