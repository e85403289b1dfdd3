//! The control API over its real unix socket: every endpoint through the blocking client
//! and through raw HTTP bytes, error mapping, socket safety, the metrics format, and
//! webhook notifications against a real local HTTP listener.
//!
//! The serve side is a test implementation of `ControlOps` with real state (the trait is
//! the seam; the engine-backed implementation is tested with `serve`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use streamboot::control::{
    client, BindError, ClientError, ControlError, ControlHandle, ControlOps, ControlServer,
    FetchedBytes, HydrationStatus, Notifier, NotifyOptions, ServeMode, ServeStatus,
};
use streamboot::engine::Status;

const CHUNK: u64 = 64 << 10;
/// An ETag-like validator with characters that need escaping in metric labels.
const VALIDATOR: &str = "W/\"abc\\def\"\nx";

/// A small state machine standing in for `serve`.
struct TestOps {
    state: Mutex<String>,
    vm_connected: AtomicBool,
    paused: AtomicBool,
    rate: AtomicU64,
    demand: AtomicU64,
    background: AtomicU64,
    missing: AtomicU64,
    /// The next action fails with an internal error.
    fail_next: AtomicBool,
    /// Confirm takes this long (ms).
    confirm_delay_ms: AtomicU64,
}

impl TestOps {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new("trial".into()),
            vm_connected: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            rate: AtomicU64::new(0),
            demand: AtomicU64::new(0),
            background: AtomicU64::new(0),
            missing: AtomicU64::new(65),
            fail_next: AtomicBool::new(false),
            confirm_delay_ms: AtomicU64::new(0),
        })
    }

    fn state(&self) -> String {
        self.state.lock().unwrap().clone()
    }

    fn failing(&self) -> Result<(), ControlError> {
        if self.fail_next.swap(false, Ordering::SeqCst) {
            return Err(ControlError::Internal("metadata write failed: EIO".into()));
        }
        Ok(())
    }
}

impl ControlOps for TestOps {
    fn status(&self) -> ServeStatus {
        let missing = self.missing.load(Ordering::SeqCst);
        ServeStatus {
            engine: Status {
                state: self.state(),
                chunk_size: CHUNK,
                target_size: 100 * CHUNK,
                source_size: 80 * CHUNK,
                chunks_total: 100,
                chunks_home: 10,
                chunks_slotted: 90 - missing,
                chunks_zero: 5,
                chunks_missing: missing,
                chunks_dirty: 3,
                chunks_saved_source: 10,
                slots_total: 200,
                slots_free: 150,
                bytes_fetched_demand: self.demand.load(Ordering::SeqCst),
                bytes_fetched_background: self.background.load(Ordering::SeqCst),
                bytes_seeded: 7 * CHUNK,
                bytes_saved_source: 10 * CHUNK,
                fetch_requests: 42,
                fetch_errors: 1,
                evictions: 2,
                start_counter: 1,
                max_trial_starts: 3,
                target_kind: "http".into(),
                target_validator: VALIDATOR.into(),
                target_urls: vec!["http://127.0.0.1/img".into()],
                first_read_ms: Some(12.5),
                uptime_secs: 3.25,
                start_time_secs: 1_700_000_000.5,
                latency: Default::default(),
            },
            mode: ServeMode::Target,
            vm_connected: self.vm_connected.load(Ordering::SeqCst),
            hydration: HydrationStatus {
                paused: self.paused.load(Ordering::SeqCst),
                rate_bytes_per_sec: self.rate.load(Ordering::SeqCst),
                done: missing == 0,
            },
            last_error: Some("fetch of chunk 7 failed: timeout".into()),
        }
    }

    fn fetched_bytes(&self) -> FetchedBytes {
        FetchedBytes {
            demand: self.demand.load(Ordering::SeqCst),
            background: self.background.load(Ordering::SeqCst),
        }
    }

    fn confirm(&self) -> Result<String, ControlError> {
        std::thread::sleep(Duration::from_millis(
            self.confirm_delay_ms.load(Ordering::SeqCst),
        ));
        self.failing()?;
        let mut s = self.state.lock().unwrap();
        if *s != "trial" {
            return Err(ControlError::Conflict(format!(
                "cannot confirm in state {s}"
            )));
        }
        *s = "confirmed".into();
        Ok("target confirmed".into())
    }

    fn commit(&self) -> Result<String, ControlError> {
        self.failing()?;
        let mut s = self.state.lock().unwrap();
        if *s != "confirmed" {
            return Err(ControlError::Conflict(format!(
                "commit needs state confirmed, not {s}"
            )));
        }
        *s = "committing".into();
        Ok("commit started".into())
    }

    fn rollback(&self) -> Result<String, ControlError> {
        self.failing()?;
        if self.vm_connected.load(Ordering::SeqCst) {
            return Err(ControlError::Conflict(
                "a VM is connected; stop it before rolling back".into(),
            ));
        }
        let mut s = self.state.lock().unwrap();
        if s.starts_with("commit") {
            return Err(ControlError::Conflict(format!(
                "cannot roll back in state {s}"
            )));
        }
        *s = "rolled-back".into();
        Ok("rolled back: the disk holds the source again".into())
    }

    fn set_hydration(
        &self,
        paused: Option<bool>,
        rate: Option<u64>,
    ) -> Result<String, ControlError> {
        self.failing()?;
        if rate.is_some_and(|r| r > 1 << 40) {
            return Err(ControlError::BadRequest("rate above 1 TiB/s".into()));
        }
        if let Some(p) = paused {
            self.paused.store(p, Ordering::SeqCst);
        }
        if let Some(r) = rate {
            self.rate.store(r, Ordering::SeqCst);
        }
        Ok(format!(
            "hydration {}, rate {}",
            if self.paused.load(Ordering::SeqCst) {
                "paused"
            } else {
                "running"
            },
            self.rate.load(Ordering::SeqCst)
        ))
    }
}

struct Running {
    _dir: tempfile::TempDir,
    path: PathBuf,
    ops: Arc<TestOps>,
    handle: Option<ControlHandle>,
}

fn start() -> Running {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.sock");
    let ops = TestOps::new();
    let handle = ControlServer::bind(&path, ops.clone(), None)
        .unwrap()
        .spawn()
        .unwrap();
    Running {
        _dir: dir,
        path,
        ops,
        handle: Some(handle),
    }
}

/// A raw HTTP answer.
struct Raw {
    status: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Raw {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

/// Writes `request` as is and reads the answer until the server closes.
fn raw(path: &Path, request: &[u8]) -> Raw {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The server may answer and close before it read everything (too-large bodies).
    let _ = s.write_all(request);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, _) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no complete answer: {text:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers = lines
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap();
            (k.trim().to_ascii_lowercase(), v.trim().to_owned())
        })
        .collect();
    Raw {
        status,
        headers,
        body: out[head.len() + 4..].to_vec(),
    }
}

fn post_raw(path: &Path, endpoint: &str, body: &str) -> Raw {
    raw(
        path,
        format!(
            "POST {endpoint} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
}

fn get_raw(path: &Path, endpoint: &str) -> Raw {
    raw(
        path,
        format!("GET {endpoint} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
}

fn assert_error(r: &Raw, status: u16, kind: &str, needle: &str) {
    assert_eq!(r.status, status, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.headers["content-type"], "application/json");
    let v = r.json();
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["error_kind"], kind, "{v}");
    let msg = v["error"].as_str().unwrap();
    assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
}

fn api_err(e: ClientError) -> (u16, String, String) {
    match e {
        ClientError::Api {
            status,
            kind,
            message,
        } => (status, kind, message),
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[test]
fn status_reports_engine_serving_and_hydration_fields() {
    let r = start();
    let v = client::get_status(&r.path).unwrap();
    assert_eq!(v["ok"], true);
    // Engine fields are flattened into the top level.
    assert_eq!(v["state"], "trial");
    assert_eq!(v["chunk_size"], CHUNK);
    assert_eq!(v["chunks_missing"], 65);
    assert_eq!(v["target_validator"], VALIDATOR);
    assert_eq!(v["first_read_ms"], 12.5);
    // Serving information.
    assert_eq!(v["mode"], "target");
    assert_eq!(v["vm_connected"], false);
    assert_eq!(
        v["hydration"],
        json!({"paused": false, "rate_bytes_per_sec": 0, "done": false})
    );
    assert_eq!(v["last_error"], "fetch of chunk 7 failed: timeout");
    for k in [
        "demand_bytes_per_sec",
        "background_bytes_per_sec",
        "window_secs",
    ] {
        assert!(v["rates"][k].is_number(), "rates.{k} in {v}");
    }
    // Nothing fetched: no ETA.
    assert_eq!(v["eta_secs"], Value::Null);
    // The query string is ignored.
    let q = get_raw(&r.path, "/v1/status?pretty=1");
    assert_eq!(q.status, 200);
    assert_eq!(q.headers["content-type"], "application/json");
    assert_eq!(q.json()["ok"], true);
}

#[test]
fn rates_and_eta_come_from_successive_samples() {
    let r = start();
    client::get_status(&r.path).unwrap();
    let t = Instant::now();
    r.ops.background.store(6_000_000, Ordering::SeqCst);
    r.ops.demand.store(2_000_000, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(1500));
    let v = client::get_status(&r.path).unwrap();
    let elapsed = t.elapsed().as_secs_f64();
    let window = v["rates"]["window_secs"].as_f64().unwrap();
    assert!(window >= 1.4 && window <= elapsed + 0.5, "{v}");
    let bg = v["rates"]["background_bytes_per_sec"].as_f64().unwrap();
    let dm = v["rates"]["demand_bytes_per_sec"].as_f64().unwrap();
    assert!((bg - 6e6 / window).abs() < 1.0, "{bg} over {window}s");
    assert!((dm - 2e6 / window).abs() < 1.0, "{dm} over {window}s");
    let eta = v["eta_secs"].as_f64().unwrap();
    let want = (65 * CHUNK) as f64 / (bg + dm);
    assert!((eta - want).abs() < 1e-6, "eta {eta}, want {want}");
    // Nothing missing: ETA 0, hydration done.
    r.ops.missing.store(0, Ordering::SeqCst);
    let v = client::get_status(&r.path).unwrap();
    assert_eq!(v["eta_secs"], 0.0);
    assert_eq!(v["hydration"]["done"], true);
}

#[test]
fn actions_follow_the_state_machine_and_map_errors() {
    let r = start();
    assert_eq!(client::confirm(&r.path).unwrap(), "target confirmed");
    assert_eq!(r.ops.state(), "confirmed");
    // Confirm again: 409.
    let e = client::confirm(&r.path).unwrap_err();
    assert!(e.is_conflict(), "{e:?}");
    assert_eq!(e.to_string(), "cannot confirm in state confirmed");
    // Rollback with a VM connected: 409, state unchanged.
    r.ops.vm_connected.store(true, Ordering::SeqCst);
    let (status, kind, msg) = api_err(client::rollback(&r.path).unwrap_err());
    assert_eq!((status, kind.as_str()), (409, "conflict"));
    assert!(msg.contains("VM is connected"), "{msg}");
    assert_eq!(r.ops.state(), "confirmed");
    // The same through raw HTTP.
    let raw_answer = post_raw(&r.path, "/v1/rollback", "");
    assert_error(&raw_answer, 409, "conflict", "VM is connected");
    // Internal failures: 500.
    r.ops.fail_next.store(true, Ordering::SeqCst);
    let (status, kind, msg) = api_err(client::commit(&r.path).unwrap_err());
    assert_eq!(
        (status, kind.as_str(), msg.as_str()),
        (500, "internal", "metadata write failed: EIO")
    );
    // Commit returns at once with a message.
    let v = client::post(&r.path, "commit", &json!({})).unwrap();
    assert_eq!(v, json!({"ok": true, "message": "commit started"}));
    assert_eq!(client::get_status(&r.path).unwrap()["state"], "committing");
    r.ops.vm_connected.store(false, Ordering::SeqCst);
    let e = client::rollback(&r.path).unwrap_err();
    assert!(e.is_conflict());
}

#[test]
fn rollback_from_trial_without_vm() {
    let r = start();
    let v = client::post(&r.path, "/v1/rollback", &json!({})).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(r.ops.state(), "rolled-back");
}

#[test]
fn hydration_pause_resume_and_rate() {
    let r = start();
    let msg = client::set_hydration(&r.path, Some(true), None).unwrap();
    assert_eq!(msg, "hydration paused, rate 0");
    let msg = client::set_hydration(&r.path, None, Some(50 << 20)).unwrap();
    assert_eq!(msg, format!("hydration paused, rate {}", 50 << 20));
    let v = client::get_status(&r.path).unwrap();
    assert_eq!(
        v["hydration"],
        json!({"paused": true, "rate_bytes_per_sec": 50 << 20, "done": false})
    );
    let v = client::post(&r.path, "hydration", &json!({"paused": false, "rate": 0})).unwrap();
    assert_eq!(v["message"], "hydration running, rate 0");
    assert!(!r.ops.paused.load(Ordering::SeqCst));
    // The implementation's own validation: 400.
    let (status, kind, msg) =
        api_err(client::set_hydration(&r.path, None, Some(u64::MAX)).unwrap_err());
    assert_eq!(
        (status, kind.as_str(), msg.as_str()),
        (400, "bad_request", "rate above 1 TiB/s")
    );
    // Nothing to change: 400 from the server, never reaching the implementation.
    let (status, _, msg) = api_err(client::set_hydration(&r.path, None, None).unwrap_err());
    assert_eq!(status, 400);
    assert!(msg.contains("nothing to change"), "{msg}");
}

#[test]
fn raw_http_bad_requests() {
    let r = start();
    let p = &r.path;
    // Unknown path and wrong methods.
    assert_error(&get_raw(p, "/v1/nope"), 404, "not_found", "/v1/nope");
    assert_error(&get_raw(p, "/"), 404, "not_found", "no such endpoint");
    let a = post_raw(p, "/v1/status", "");
    assert_error(&a, 405, "method_not_allowed", "GET only");
    assert_eq!(a.headers["allow"], "GET");
    let a = get_raw(p, "/v1/confirm");
    assert_error(&a, 405, "method_not_allowed", "POST only");
    assert_eq!(a.headers["allow"], "POST");
    let a = raw(
        p,
        b"DELETE /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_error(&a, 405, "method_not_allowed", "GET only");
    // Bad JSON, wrong types, unknown fields, parameters where none are taken.
    for (endpoint, body, needle) in [
        ("/v1/hydration", "{\"paused\": tru", "invalid body"),
        ("/v1/hydration", "{\"paused\": \"yes\"}", "invalid type"),
        ("/v1/hydration", "{\"rate\": -5}", "invalid value"),
        ("/v1/hydration", "{\"rate\": 1e3}", "invalid type"),
        (
            "/v1/hydration",
            "{\"paused\": true, \"speed\": 3}",
            "unknown field `speed`",
        ),
        ("/v1/hydration", "", "empty body"),
        ("/v1/hydration", "{}", "nothing to change"),
        ("/v1/hydration", "[true, 5]", "expected a JSON object"),
        (
            "/v1/hydration",
            "{\"rate\": 1, \"rate\": 2}",
            "duplicate field `rate`",
        ),
        ("/v1/confirm", "{\"force\": true}", "unknown field `force`"),
        ("/v1/commit", "not json", "expected a JSON object"),
        ("/v1/rollback", "{\"x\"", "invalid body"),
    ] {
        assert_error(&post_raw(p, endpoint, body), 400, "bad_request", needle);
    }
    assert_eq!(
        r.ops.state(),
        "trial",
        "no bad request reached the implementation"
    );
    // An empty object is fine where no parameters are taken.
    let ok = post_raw(p, "/v1/confirm", "{}");
    assert_eq!(ok.status, 200);
    assert_eq!(
        ok.json(),
        json!({"ok": true, "message": "target confirmed"})
    );
}

#[test]
fn raw_http_malformed_and_oversized() {
    let r = start();
    let p = &r.path;
    // Malformed request lines: hyper answers 400 itself and closes.
    for req in [
        &b"HELLO\r\n\r\n"[..],
        b"GET /v1/status HTTP/9.9 trailing junk\r\n\r\n",
        b"GET /v1/status HTTP/1.1\r\nBad Header Line\r\n\r\n",
    ] {
        let a = raw(p, req);
        assert_eq!(a.status, 400, "{:?}", String::from_utf8_lossy(req));
    }
    // Headers beyond the buffer limit.
    let big_header = format!(
        "GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 << 10)
    );
    let a = raw(p, big_header.as_bytes());
    assert!(a.status == 431 || a.status == 400, "{}", a.status);
    // A declared huge body is refused before it is read.
    let a = raw(
        p,
        b"POST /v1/hydration HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n{\"paused\":",
    );
    assert_error(&a, 413, "payload_too_large", "larger than 16384 bytes");
    // A chunked body that grows past the limit is cut off.
    let chunk = format!("{{\"paused\":true,\"pad\":\"{}\"}}", "x".repeat(20_000));
    let req = format!(
        "POST /v1/hydration HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\
         Connection: close\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len()
    );
    assert_error(
        &raw(p, req.as_bytes()),
        413,
        "payload_too_large",
        "larger than",
    );
    // The server is still fine.
    assert_eq!(client::get_status(p).unwrap()["ok"], true);
    assert!(!r.ops.paused.load(Ordering::SeqCst));
}

#[test]
fn keep_alive_serves_several_requests_on_one_connection() {
    let r = start();
    let mut s = UnixStream::connect(&r.path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n\
          POST /v1/confirm HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 2, "{out}");
    assert!(out.contains(r#""message":"target confirmed""#), "{out}");
}

#[test]
fn slow_operations_do_not_block_status_and_finish_at_shutdown() {
    let mut r = start();
    r.ops.confirm_delay_ms.store(1500, Ordering::SeqCst);
    let path = r.path.clone();
    let confirm = std::thread::spawn(move || client::confirm(&path));
    std::thread::sleep(Duration::from_millis(150));
    let t = Instant::now();
    assert_eq!(client::get_status(&r.path).unwrap()["state"], "trial");
    assert!(
        t.elapsed() < Duration::from_millis(1000),
        "{:?}",
        t.elapsed()
    );
    // Shut down while confirm runs: it still gets its answer.
    r.handle.take().unwrap().shutdown();
    assert_eq!(confirm.join().unwrap().unwrap(), "target confirmed");
    assert!(!r.path.exists(), "socket removed at shutdown");
    assert!(client::get_status(&r.path).unwrap_err().is_not_listening());
}

#[test]
fn socket_is_private_and_safely_created() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.sock");
    let ops = TestOps::new();
    let server = ControlServer::bind(&path, ops.clone(), None).unwrap();
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.mode() & 0o777, 0o600);
    assert_eq!(server.path(), path);
    // A second server on the same live path is refused.
    let live = server.spawn().unwrap();
    match ControlServer::bind(&path, ops.clone(), None) {
        Err(e @ BindError::InUse(_)) => assert!(e.to_string().contains("in use")),
        other => panic!("expected InUse, got {other:?}"),
    }
    live.shutdown();
    assert!(!path.exists());

    // A stale socket (nobody listening) is replaced.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let h = ControlServer::bind(&path, ops.clone(), None)
        .unwrap()
        .spawn()
        .unwrap();
    assert_eq!(client::get_status(&path).unwrap()["ok"], true);
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no leftovers"
    );
    // Shutdown removes only its own socket: one that replaced it stays.
    std::fs::remove_file(&path).unwrap();
    let other = UnixListener::bind(&path).unwrap();
    h.shutdown();
    assert!(path.exists());
    drop(other);
    std::fs::remove_file(&path).unwrap();

    // A regular file is never replaced.
    std::fs::write(&path, b"precious").unwrap();
    match ControlServer::bind(&path, ops.clone(), None) {
        Err(e @ BindError::NotASocket(_)) => {
            assert!(e.to_string().contains("not a socket"), "{e}")
        }
        other => panic!("expected NotASocket, got {other:?}"),
    }
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");

    // With a group: 0660 and that group (our own group, which we may always set).
    let gid = std::fs::metadata(dir.path()).unwrap().gid();
    let gpath = dir.path().join("g.sock");
    let g = ControlServer::bind(&gpath, ops, Some(gid)).unwrap();
    let meta = std::fs::symlink_metadata(&gpath).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), gid);
    // A server dropped without serving removes its socket.
    drop(g);
    assert!(!gpath.exists());
}

/// One parsed sample line.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

/// Parses `name{k="v",...} value` with the format's escapes; panics on anything else.
fn parse_sample(line: &str) -> Sample {
    let name_end = line
        .find(['{', ' '])
        .unwrap_or_else(|| panic!("no value: {line:?}"));
    let name = &line[..name_end];
    assert!(
        !name.is_empty()
            && name
                .chars()
                .enumerate()
                .all(|(i, c)| c.is_ascii_alphabetic()
                    || c == '_'
                    || c == ':'
                    || (i > 0 && c.is_ascii_digit())),
        "bad metric name in {line:?}"
    );
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(r) = rest.strip_prefix('{') {
        let mut chars = r.char_indices().peekable();
        loop {
            let (start, c) = chars
                .next()
                .unwrap_or_else(|| panic!("open labels: {line:?}"));
            if c == '}' {
                rest = &r[start + 1..];
                break;
            }
            let eq = r[start..].find('=').unwrap() + start;
            let key = &r[start..eq];
            assert!(
                key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "bad label name {key:?} in {line:?}"
            );
            while chars.peek().is_some_and(|&(i, _)| i <= eq) {
                chars.next();
            }
            assert_eq!(chars.next().map(|x| x.1), Some('"'), "{line:?}");
            let mut value = String::new();
            loop {
                match chars.next().map(|x| x.1) {
                    Some('\\') => match chars.next().map(|x| x.1) {
                        Some('\\') => value.push('\\'),
                        Some('"') => value.push('"'),
                        Some('n') => value.push('\n'),
                        other => panic!("bad escape {other:?} in {line:?}"),
                    },
                    Some('"') => break,
                    Some('\n') | None => panic!("unterminated label value in {line:?}"),
                    Some(c) => value.push(c),
                }
            }
            labels.push((key.to_owned(), value));
            match chars.peek().map(|x| x.1) {
                Some(',') => {
                    chars.next();
                }
                Some('}') => {}
                other => panic!("expected , or }} not {other:?} in {line:?}"),
            }
        }
    }
    let value = rest
        .strip_prefix(' ')
        .unwrap_or_else(|| panic!("no space before value: {line:?}"));
    assert!(
        !value.contains(' '),
        "timestamps are not expected: {line:?}"
    );
    let value = match value {
        "NaN" => f64::NAN,
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}")),
    };
    Sample {
        name: name.to_owned(),
        labels,
        value,
    }
}

/// Checks the exposition format line by line; returns the samples.
fn parse_exposition(text: &str) -> Vec<Sample> {
    assert!(text.ends_with('\n'), "exposition must end with a newline");
    let mut families = HashSet::new();
    let mut helped: Option<String> = None;
    let mut typed: Option<String> = None;
    let mut samples = Vec::new();
    assert!(text.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
    for line in text.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap();
            assert!(!help.is_empty(), "empty help for {name}");
            assert!(families.insert(name.to_owned()), "family {name} repeated");
            helped = Some(name.to_owned());
            typed = None;
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert_eq!(
                helped.as_deref(),
                Some(name),
                "TYPE {name} without HELP before it"
            );
            assert!(
                ["counter", "gauge", "histogram"].contains(&kind),
                "type {kind}"
            );
            typed = Some(format!("{name} {kind}"));
        } else {
            assert!(
                !line.starts_with('#') && !line.is_empty(),
                "stray line {line:?}"
            );
            let s = parse_sample(line);
            let (family, kind) = typed.as_deref().unwrap().split_once(' ').unwrap();
            let ok = match kind {
                "counter" => s.name == format!("{family}_total"),
                "histogram" => ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|x| s.name == format!("{family}{x}")),
                _ => s.name == family,
            };
            assert!(ok, "sample outside its HELP/TYPE family: {line:?}");
            assert_eq!(s.labels[0].0, "disk", "every sample has the disk label");
            samples.push(s);
        }
    }
    samples
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && s.labels.len() == labels.len() + 1
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.iter().any(|(sk, sv)| sk == k && sv == v))
        })
        .unwrap_or_else(|| panic!("no sample {name}{labels:?}"))
        .value
}

#[test]
fn metrics_are_valid_prometheus_text() {
    let r = start();
    r.ops.background.store(1 << 20, Ordering::SeqCst);
    r.ops.demand.store(3 << 20, Ordering::SeqCst);
    r.ops.vm_connected.store(true, Ordering::SeqCst);
    client::set_hydration(&r.path, Some(true), Some(1000)).unwrap();

    let raw_answer = get_raw(&r.path, "/metrics");
    assert_eq!(raw_answer.status, 200);
    assert_eq!(
        raw_answer.headers["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let text = client::get_metrics(&r.path).unwrap();
    let s = parse_exposition(&text);

    assert_eq!(value(&s, "streamboot_chunks", &[("state", "home")]), 10.0);
    assert_eq!(
        value(&s, "streamboot_chunks", &[("state", "slotted")]),
        25.0
    );
    assert_eq!(value(&s, "streamboot_chunks", &[("state", "zero")]), 5.0);
    assert_eq!(
        value(&s, "streamboot_chunks", &[("state", "missing")]),
        65.0
    );
    assert_eq!(value(&s, "streamboot_target_chunks", &[]), 100.0);
    let fetched = "streamboot_fetched_bytes_total";
    assert_eq!(
        value(&s, fetched, &[("reason", "demand")]),
        (3 << 20) as f64
    );
    assert_eq!(
        value(&s, fetched, &[("reason", "background")]),
        (1 << 20) as f64
    );
    assert_eq!(
        value(&s, "streamboot_seeded_bytes_total", &[]),
        (7 * CHUNK) as f64
    );
    assert_eq!(
        value(&s, "streamboot_saved_source_bytes", &[]),
        (10 * CHUNK) as f64
    );
    assert_eq!(value(&s, "streamboot_fetch_requests_total", &[]), 42.0);
    assert_eq!(value(&s, "streamboot_fetch_errors_total", &[]), 1.0);
    assert_eq!(value(&s, "streamboot_evictions_total", &[]), 2.0);
    assert_eq!(value(&s, "streamboot_state", &[("state", "trial")]), 1.0);
    assert_eq!(value(&s, "streamboot_trial_starts", &[]), 1.0);
    assert_eq!(value(&s, "streamboot_trial_starts_limit", &[]), 3.0);
    assert_eq!(value(&s, "streamboot_hydration_paused", &[]), 1.0);
    assert_eq!(
        value(&s, "streamboot_hydration_rate_limit_bytes_per_second", &[]),
        1000.0
    );
    assert_eq!(value(&s, "streamboot_hydration_done", &[]), 0.0);
    assert_eq!(value(&s, "streamboot_vm_connected", &[]), 1.0);
    assert_eq!(value(&s, "streamboot_slots", &[("state", "used")]), 50.0);
    assert_eq!(value(&s, "streamboot_first_read_seconds", &[]), 0.0125);
    assert_eq!(value(&s, "streamboot_last_error_present", &[]), 1.0);
    // The validator needs every escape and comes back intact.
    let info = s.iter().find(|x| x.name == "streamboot_info").unwrap();
    assert!(info
        .labels
        .contains(&("target_validator".to_owned(), VALIDATOR.to_owned())));
    assert!(info
        .labels
        .contains(&("mode".to_owned(), "target".to_owned())));
    assert!(
        text.contains(r#"target_validator="W/\"abc\\def\"\nx""#),
        "{text}"
    );
    for reason in ["demand", "background"] {
        let v = value(
            &s,
            "streamboot_fetch_rate_bytes_per_second",
            &[("reason", reason)],
        );
        assert!(v.is_finite() && v >= 0.0);
    }
}

/// A webhook receiver on 127.0.0.1: answers each POST with the next scripted status
/// (200 once the script is empty) and reports what it received.
struct Hook {
    url: String,
    received: mpsc::Receiver<(String, HashMap<String, String>, Value)>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Hook {
    fn start(listener: std::net::TcpListener, script: Vec<u16>) -> Hook {
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        listener.set_nonblocking(true).unwrap();
        let (tx, received) = mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let script = Arc::new(Mutex::new(VecDeque::from(script)));
                let serve = async {
                    loop {
                        let (sock, _) = listener.accept().await.unwrap();
                        let tx = tx.clone();
                        let script = script.clone();
                        tokio::spawn(async move {
                            let _ = hook_conn(sock, tx, script).await;
                        });
                    }
                };
                tokio::select! {
                    _ = serve => {}
                    _ = stop_rx => {}
                }
            });
        });
        Hook {
            url,
            received,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn next(&self, within: Duration) -> (String, HashMap<String, String>, Value) {
        self.received
            .recv_timeout(within)
            .expect("the webhook received nothing in time")
    }
}

impl Drop for Hook {
    fn drop(&mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.thread.take().unwrap().join().unwrap();
    }
}

/// Reads one request (head + Content-Length body), answers, closes.
async fn hook_conn(
    mut sock: tokio::net::TcpStream,
    tx: mpsc::Sender<(String, HashMap<String, String>, Value)>,
    script: Arc<Mutex<VecDeque<u16>>>,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    let head_end = loop {
        let n = sock.read(&mut tmp).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&tmp[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap().to_owned();
    let headers: HashMap<String, String> = lines
        .map(|l| {
            let (k, v) = l.split_once(':').unwrap();
            (k.trim().to_ascii_lowercase(), v.trim().to_owned())
        })
        .collect();
    let len: usize = headers["content-length"].parse().unwrap();
    while buf.len() < head_end + 4 + len {
        let n = sock.read(&mut tmp).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
    let body: Value = serde_json::from_slice(&buf[head_end + 4..head_end + 4 + len]).unwrap();
    let status = script.lock().unwrap().pop_front().unwrap_or(200);
    let _ = tx.send((request_line, headers, body));
    sock.write_all(
        format!("HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    sock.shutdown().await
}

fn fast_retries() -> NotifyOptions {
    NotifyOptions {
        queue: 16,
        attempts: 100,
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
        request_timeout: Duration::from_secs(2),
        secret: None,
    }
}

#[test]
fn notify_posts_json_events_in_order() {
    let hook = Hook::start(std::net::TcpListener::bind("127.0.0.1:0").unwrap(), vec![]);
    let n = Notifier::new(Some(hook.url.clone())).unwrap();
    assert!(n.is_enabled());
    assert_eq!(n.url(), Some(hook.url.as_str()));
    n.notify("serving", json!({"state": "trial", "mode": "target"}));
    n.notify("confirmed", json!({"state": "confirmed"}));
    n.notify("committed", Value::Null);
    let (line, headers, body) = hook.next(Duration::from_secs(10));
    assert_eq!(line, "POST /hook HTTP/1.1");
    assert_eq!(headers["content-type"], "application/json");
    assert!(headers["user-agent"].starts_with("streamboot/"));
    assert_eq!(body["event"], "serving");
    assert_eq!(body["state"], "trial");
    assert_eq!(body["mode"], "target");
    let time = body["time"].as_str().unwrap();
    let t = humantime::parse_rfc3339(time).unwrap();
    let age = std::time::SystemTime::now().duration_since(t).unwrap();
    assert!(age < Duration::from_secs(60), "{time}");
    assert_eq!(hook.next(Duration::from_secs(10)).2["event"], "confirmed");
    let (_, _, last) = hook.next(Duration::from_secs(10));
    assert_eq!(last["event"], "committed");
    assert_eq!(
        last.as_object().unwrap().len(),
        3,
        "id, event, time: {last}"
    );
    assert!(n.close(Duration::from_secs(5)));
    // After close, events are not sent (and the caller is not blocked).
    n.notify("late", Value::Null);
    assert!(hook
        .received
        .recv_timeout(Duration::from_millis(300))
        .is_err());
}

#[test]
fn notify_survives_a_webhook_that_is_down_and_retries() {
    // Reserve a port, then leave it closed: connections are refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/hook");
    let n = Notifier::with_options(Some(url), fast_retries()).unwrap();
    let t = Instant::now();
    n.notify("failed", json!({"error": "fetch failed"}));
    for i in 0..5 {
        n.notify("progress", json!({"i": i}));
    }
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "notify blocked for {:?}",
        t.elapsed()
    );
    std::thread::sleep(Duration::from_millis(400));
    // The webhook comes up: the retried event arrives, then the rest, in order.
    let hook = Hook::start(
        std::net::TcpListener::bind(("127.0.0.1", port)).unwrap(),
        vec![],
    );
    let (_, _, first) = hook.next(Duration::from_secs(10));
    assert_eq!(first["event"], "failed");
    assert_eq!(first["error"], "fetch failed");
    for i in 0..5 {
        assert_eq!(hook.next(Duration::from_secs(10)).2["i"], i);
    }
    assert!(n.close(Duration::from_secs(5)));
    assert_eq!(n.dropped(), 0);
}

#[test]
fn notify_retries_server_errors_but_not_client_errors() {
    let hook = Hook::start(
        std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
        vec![503, 500, 400],
    );
    let n = Notifier::with_options(Some(hook.url.clone()), fast_retries()).unwrap();
    n.notify("a", Value::Null);
    n.notify("b", Value::Null);
    n.notify("c", Value::Null);
    let posts: Vec<Value> = (0..4)
        .map(|_| hook.next(Duration::from_secs(10)).2)
        .collect();
    let events: Vec<&str> = posts.iter().map(|p| p["event"].as_str().unwrap()).collect();
    // a: 503, 500, then 400 (permanent, dropped); b and c delivered once each.
    assert_eq!(events, ["a", "a", "a", "b"]);
    // The id is the event's, the same on every try (receivers deduplicate with it).
    assert_eq!(posts[0]["id"], posts[1]["id"]);
    assert_eq!(posts[0]["id"], posts[2]["id"]);
    assert_ne!(posts[0]["id"], posts[3]["id"]);
    assert_eq!(hook.next(Duration::from_secs(10)).2["event"], "c");
    assert!(n.close(Duration::from_secs(5)));
    assert!(hook
        .received
        .recv_timeout(Duration::from_millis(300))
        .is_err());
}

#[test]
fn notify_never_blocks_when_the_queue_is_full_and_close_is_bounded() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let opts = NotifyOptions {
        queue: 4,
        ..fast_retries()
    };
    let n = Notifier::with_options(Some(format!("http://127.0.0.1:{port}/")), opts).unwrap();
    let t = Instant::now();
    for i in 0..1000 {
        n.notify("progress", json!({"i": i}));
    }
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    assert!(n.dropped() >= 990, "dropped {}", n.dropped());
    let t = Instant::now();
    let _ = n.close(Duration::from_millis(300));
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "close took {:?}",
        t.elapsed()
    );
}
