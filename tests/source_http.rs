//! `HttpSource` against a real nginx (and, for responses nginx would never send, a tiny
//! scripted HTTP server): byte-exact ranges, concurrency, pinning, failover and faults.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::nginx::{set_mtime, Nginx};
use common::{dead_port, random_bytes, test_rng};
use rand::Rng;
use streamboot::source::{
    HttpOptions, HttpSource, NetError, RemoteSource, SourceError, SourceIdentity,
};

const MIB: usize = 1 << 20;

/// Options for tests: short waits so fault tests finish quickly.
fn quick() -> HttpOptions {
    HttpOptions {
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(5),
        open_retries: 1,
        deadline: Some(Duration::from_secs(10)),
        backoff_base: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        ..HttpOptions::default()
    }
}

fn open(url: &str) -> HttpSource {
    HttpSource::open(&[url.to_string()], None, quick()).expect("open HTTP source")
}

fn read(src: &dyn RemoteSource, offset: u64, len: usize) -> Result<Vec<u8>, SourceError> {
    let mut buf = vec![0u8; len];
    src.read_at(offset, &mut buf).map(|()| buf)
}

#[test]
fn random_ranges_are_byte_exact() {
    let nginx = Nginx::start();
    let data = random_bytes(1, 6 * MIB + 12_345);
    nginx.put("disk.img", &data);
    let src = open(&nginx.url("disk.img"));

    let id = src.identity().clone();
    assert_eq!(id.kind, "http");
    assert_eq!(id.size, data.len() as u64);
    assert!(id.validator.starts_with('"'), "strong ETag pin: {id:?}");
    assert_eq!(src.size(), data.len() as u64);
    assert!(src.name().contains("/disk.img"));

    let size = data.len();
    let mut ranges = vec![
        (0, 1),
        (0, 4096),
        (size - 1, 1),
        (size - 4096, 4096),
        (0, size),
    ];
    let mut rng = test_rng(2);
    for _ in 0..200 {
        let len = rng.random_range(1..=2 * MIB);
        let offset = rng.random_range(0..=size - len);
        ranges.push((offset, len));
    }
    for (offset, len) in ranges {
        let got = read(&src, offset as u64, len).expect("read range");
        assert!(
            got == data[offset..offset + len],
            "bytes differ in range {offset}+{len}"
        );
    }
}

#[test]
fn reads_outside_the_image_are_refused_and_empty_reads_are_free() {
    let nginx = Nginx::start();
    nginx.put("disk.img", &random_bytes(3, 10_000));
    let src = open(&nginx.url("disk.img"));
    let requests = nginx.access_log().len();
    assert!(matches!(
        read(&src, 9_999, 2),
        Err(SourceError::OutOfRange { .. })
    ));
    assert!(matches!(
        read(&src, u64::MAX, 1),
        Err(SourceError::OutOfRange { .. })
    ));
    src.read_at(10_000, &mut []).expect("empty read at the end");
    assert_eq!(nginx.access_log().len(), requests, "no request was needed");
}

#[test]
fn eight_threads_read_concurrently_over_pooled_connections() {
    let nginx = Nginx::start();
    let data = Arc::new(random_bytes(4, 8 * MIB));
    nginx.put("disk.img", &data);
    let src = Arc::new(open(&nginx.url("disk.img")));
    let reads_per_thread = 40;

    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let src = Arc::clone(&src);
            let data = Arc::clone(&data);
            std::thread::spawn(move || {
                let mut rng = test_rng(100 + t);
                for _ in 0..reads_per_thread {
                    let len = rng.random_range(1..=MIB);
                    let offset = rng.random_range(0..=data.len() - len);
                    let got = read(&*src, offset as u64, len).expect("concurrent read");
                    assert!(
                        got == data[offset..offset + len],
                        "thread {t}: bytes differ"
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("reader thread");
    }

    let log = nginx.access_log();
    let ranged: Vec<_> = log.iter().filter(|e| e.status == 206).collect();
    assert_eq!(
        ranged.len(),
        1 + 8 * reads_per_thread,
        "one request per read"
    );
    let mut connections: Vec<u64> = ranged.iter().map(|e| e.connection).collect();
    connections.sort_unstable();
    connections.dedup();
    assert!(
        connections.len() <= 16,
        "keep-alive: {} requests used {} connections",
        ranged.len(),
        connections.len()
    );
}

/// A caller that is itself a tokio task on a multi-thread runtime must not make the
/// blocking API panic (it steps out of the async context), nor must dropping the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_api_works_from_inside_a_multi_thread_runtime() {
    let nginx = Nginx::start();
    let data = random_bytes(20, 300_000);
    nginx.put("disk.img", &data);
    let src = open(&nginx.url("disk.img"));
    assert!(read(&src, 1000, 5000).unwrap() == data[1000..6000]);
    drop(src);
}

#[test]
fn missing_image_is_a_clear_status_error() {
    let nginx = Nginx::start();
    let url = nginx.url("nope.img");
    let err = HttpSource::open(std::slice::from_ref(&url), None, quick()).expect_err("404");
    match &err {
        SourceError::Net(NetError::NotFound { url: u, http: true }) => {
            assert_eq!(u, &url);
        }
        other => panic!("expected Status 404, got {other:?}"),
    }
    assert!(!err.is_transient());
    let msg = err.to_string();
    assert!(msg.contains("404") && msg.contains("nope.img"), "{msg}");
}

#[test]
fn server_without_range_support_is_refused() {
    let nginx = Nginx::start();
    nginx.put("disk.img", &random_bytes(5, 100_000));
    let err = HttpSource::open(&[nginx.url("norange/disk.img")], None, quick())
        .expect_err("no range support");
    assert!(
        matches!(err, SourceError::NoRangeSupport { .. }),
        "got {err:?}"
    );
    assert!(err.to_string().contains("byte-range"), "{err}");
}

#[test]
fn unreachable_server_fails_fast_at_open_with_default_options() {
    let url = format!("http://127.0.0.1:{}/disk.img", dead_port());
    let start = Instant::now();
    let err = HttpSource::open(&[url], None, HttpOptions::default()).expect_err("dead port");
    let took = start.elapsed();
    assert!(
        matches!(err, SourceError::Net(NetError::Unreachable { .. })),
        "got {err:?}"
    );
    assert!(err.to_string().contains("refused"), "{err}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

#[test]
fn junk_urls_are_invalid() {
    for urls in [
        vec![],
        vec!["".to_string()],
        vec!["ftp://example.org/disk.img".to_string()],
        vec!["no scheme".to_string()],
        vec![
            "http://127.0.0.1:1/a".to_string(),
            "gopher://127.0.0.1/b".to_string(),
        ],
    ] {
        let err = HttpSource::open(&urls, None, quick()).expect_err("junk URL");
        assert!(
            matches!(err, SourceError::Invalid(_)),
            "{urls:?}: got {err:?}"
        );
    }
}

/// Rewrites the served file after open: the next read must fail with `Changed` and must
/// not hand over any byte of the new image.
fn check_change_is_detected(location: &str, expect_lm_pin: bool) {
    let nginx = Nginx::start();
    let old = random_bytes(6, 2 * MIB);
    let path = nginx.put("disk.img", &old);
    let src = open(&nginx.url(&format!("{location}disk.img")));
    assert_eq!(
        src.identity().validator.starts_with("lm:"),
        expect_lm_pin,
        "{:?}",
        src.identity()
    );
    assert!(read(&src, 0, MIB).expect("read before change") == old[..MIB]);

    let new = random_bytes(7, 2 * MIB);
    let later = std::fs::metadata(&path).unwrap().modified().unwrap() + Duration::from_secs(100);
    nginx.replace("disk.img", &new, later);

    for (offset, len) in [(0, MIB), (MIB, MIB), (12_345, 1)] {
        let mut buf = vec![0xAAu8; len];
        let err = src
            .read_at(offset as u64, &mut buf)
            .expect_err("image changed");
        assert!(matches!(err, SourceError::Changed { .. }), "got {err:?}");
        assert!(!err.is_transient());
        // nginx checks the precondition before sending anything.
        assert!(err.to_string().contains("412"), "{err}");
        assert!(
            buf.iter().all(|&b| b == 0xAA),
            "bytes were written into the buffer"
        );
        assert!(buf != new[offset..offset + len]);
    }
}

#[test]
fn image_replaced_after_open_is_detected_by_etag() {
    check_change_is_detected("", false);
}

#[test]
fn image_replaced_after_open_is_detected_by_last_modified() {
    check_change_is_detected("lmonly/", true);
}

#[test]
fn image_without_validators_cannot_be_pinned() {
    let nginx = Nginx::start();
    nginx.put("disk.img", &random_bytes(8, 10_000));
    let err =
        HttpSource::open(&[nginx.url("unpinned/disk.img")], None, quick()).expect_err("unpinnable");
    assert!(matches!(err, SourceError::Invalid(_)), "got {err:?}");
    assert!(err.to_string().contains("cannot be pinned"), "{err}");
}

#[test]
fn expected_identity_is_enforced_at_open() {
    let nginx = Nginx::start();
    nginx.put("disk.img", &random_bytes(9, 50_000));
    let url = nginx.url("disk.img");
    let id = open(&url).identity().clone();

    let same =
        HttpSource::open(std::slice::from_ref(&url), Some(&id), quick()).expect("same identity");
    assert_eq!(same.identity(), &id);

    for wrong in [
        SourceIdentity {
            validator: "\"0-0\"".into(),
            ..id.clone()
        },
        SourceIdentity {
            size: id.size + 1,
            ..id.clone()
        },
    ] {
        let err = HttpSource::open(std::slice::from_ref(&url), Some(&wrong), quick())
            .expect_err("mismatch");
        assert!(matches!(err, SourceError::Changed { .. }), "got {err:?}");
    }
}

#[test]
fn dead_first_mirror_is_skipped() {
    let nginx = Nginx::start();
    let data = random_bytes(10, 3 * MIB);
    nginx.put("disk.img", &data);
    let dead = format!("http://127.0.0.1:{}/disk.img", dead_port());
    let src = HttpSource::open(&[dead, nginx.url("disk.img")], None, quick()).expect("failover");
    assert!(src.name().contains("+1 mirrors"), "{}", src.name());
    for (offset, len) in [(0, MIB), (MIB + 7, 2 * MIB - 7)] {
        assert!(read(&src, offset as u64, len).unwrap() == data[offset..offset + len]);
    }
}

/// Two servers with the same file (same size and mtime, so nginx gives the same ETag).
fn two_mirrors(data: &[u8]) -> (Nginx, Nginx, tempfile::TempDir) {
    let root = tempfile::TempDir::new().unwrap();
    let path = root.path().join("disk.img");
    std::fs::write(&path, data).unwrap();
    set_mtime(
        &path,
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
    );
    (Nginx::serve(root.path()), Nginx::serve(root.path()), root)
}

#[test]
fn reads_fail_over_when_a_mirror_dies() {
    let data = random_bytes(11, 4 * MIB);
    let (mut a, b, _root) = two_mirrors(&data);
    let src = HttpSource::open(&[a.url("disk.img"), b.url("disk.img")], None, quick())
        .expect("open mirrors");
    assert!(read(&src, 0, MIB).unwrap() == data[..MIB]);
    let b_before = b.access_log().len();

    a.stop();
    let start = Instant::now();
    for i in 0..4 {
        let offset = i * MIB;
        assert!(read(&src, offset as u64, MIB).unwrap() == data[offset..offset + MIB]);
    }
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "failover took {:?}",
        start.elapsed()
    );
    assert_eq!(b.access_log().len() - b_before, 4, "b served every read");
}

#[test]
fn mirrors_serving_different_images_are_refused() {
    let a = Nginx::start();
    let b = Nginx::start();
    a.put("disk.img", &random_bytes(12, 100_000));
    b.put("disk.img", &random_bytes(13, 100_001));
    let err = HttpSource::open(&[a.url("disk.img"), b.url("disk.img")], None, quick())
        .expect_err("mirrors differ");
    assert!(matches!(err, SourceError::Invalid(_)), "got {err:?}");
    assert!(err.to_string().contains("different images"), "{err}");
}

#[test]
fn reads_wait_through_an_outage_without_deadline() {
    let mut nginx = Nginx::start();
    let data = random_bytes(14, 2 * MIB);
    nginx.put("disk.img", &data);
    let opts = HttpOptions {
        deadline: None,
        ..quick()
    };
    let src = HttpSource::open(&[nginx.url("disk.img")], None, opts).unwrap();
    nginx.stop();

    let src = Arc::new(src);
    let reader = {
        let src = Arc::clone(&src);
        std::thread::spawn(move || read(&*src, MIB as u64, MIB))
    };
    std::thread::sleep(Duration::from_millis(800));
    assert!(!reader.is_finished(), "read must wait for the server");
    nginx.restart();
    let got = reader.join().unwrap().expect("read after outage");
    assert!(got == data[MIB..]);
}

#[test]
fn deadline_bounds_retries() {
    let mut nginx = Nginx::start();
    nginx.put("disk.img", &random_bytes(15, MIB));
    let opts = HttpOptions {
        deadline: Some(Duration::from_millis(600)),
        ..quick()
    };
    let src = HttpSource::open(&[nginx.url("disk.img")], None, opts).unwrap();
    nginx.stop();
    let start = Instant::now();
    let err = read(&src, 0, 4096).expect_err("server is down");
    assert!(err.is_transient(), "got {err:?}");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
}

// ---------------------------------------------------------------------------------------
// A scripted HTTP/1.1 server for answers a correct server never gives.

/// What the scripted server saw: the request heads, in order.
type Seen = Arc<Mutex<Vec<String>>>;

/// The script: `(request number, request head) -> (raw answer, close the connection)`.
type Respond = dyn Fn(usize, &str) -> (Vec<u8>, bool) + Send + Sync;

/// Serves each request with `respond(request_number, head)`; the answer is written raw.
/// An answer ending the connection (`close`) drops it after writing.
fn scripted_server<F>(respond: F) -> (String, Seen)
where
    F: Fn(usize, &str) -> (Vec<u8>, bool) + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/disk.img", listener.local_addr().unwrap());
    let seen: Seen = Arc::default();
    let respond = Arc::new(respond);
    let counter = Arc::new(AtomicUsize::new(0));
    let seen2 = Arc::clone(&seen);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let respond = Arc::clone(&respond);
            let counter = Arc::clone(&counter);
            let seen = Arc::clone(&seen2);
            std::thread::spawn(move || serve_connection(stream, &*respond, &counter, &seen));
        }
    });
    (url, seen)
}

fn serve_connection(
    mut stream: TcpStream,
    respond: &Respond,
    counter: &AtomicUsize,
    seen: &Mutex<Vec<String>>,
) {
    let mut pending = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        while !pending.windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
            }
        }
        let end = pending.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let head = String::from_utf8_lossy(&pending[..end]).to_string();
        pending.drain(..end);
        seen.lock().unwrap().push(head.clone());
        let n = counter.fetch_add(1, Ordering::SeqCst);
        let (answer, close) = respond(n, &head);
        if stream.write_all(&answer).is_err() || close {
            return;
        }
    }
}

/// Parses `Range: bytes=a-b` from a request head.
fn requested_range(head: &str) -> (usize, usize) {
    let line = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("range:"))
        .expect("request has a Range header");
    let spec = line.split_once('=').unwrap().1.trim();
    let (a, b) = spec.split_once('-').unwrap();
    (a.parse().unwrap(), b.parse().unwrap())
}

const ETAG: &str = "\"scripted-1\"";

/// A correct 206 answer for the requested range of `data`.
fn partial(data: &[u8], head: &str, extra_headers: &str) -> Vec<u8> {
    let (a, b) = requested_range(head);
    let mut out = format!(
        "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {a}-{b}/{}\r\n\
         Content-Length: {}\r\nETag: {ETAG}\r\n{extra_headers}\r\n",
        data.len(),
        b - a + 1
    )
    .into_bytes();
    out.extend_from_slice(&data[a..=b]);
    out
}

#[test]
fn wrong_content_range_is_never_accepted() {
    let data = Arc::new(random_bytes(16, 64 * 1024));
    let d = Arc::clone(&data);
    let (url, _) = scripted_server(move |n, head| {
        if n == 0 {
            return (partial(&d, head, ""), false);
        }
        // Shifted by one byte: right length, wrong place.
        let (a, b) = requested_range(head);
        let mut out = format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {}-{}/{}\r\n\
             Content-Length: {}\r\nETag: {ETAG}\r\n\r\n",
            a + 1,
            b + 1,
            d.len(),
            b - a + 1
        )
        .into_bytes();
        out.extend_from_slice(&d[a + 1..=b + 1]);
        (out, false)
    });
    let opts = HttpOptions {
        deadline: Some(Duration::from_millis(300)),
        ..quick()
    };
    let src = HttpSource::open(&[url], None, opts).unwrap();
    let err = read(&src, 100, 1000).expect_err("shifted range");
    assert!(
        matches!(err, SourceError::Net(NetError::BadResponse { .. })),
        "got {err:?}"
    );
}

#[test]
fn full_body_answer_to_a_range_request_is_never_data() {
    let data = Arc::new(random_bytes(17, 64 * 1024));
    let d = Arc::clone(&data);
    let (url, seen) = scripted_server(move |n, head| {
        if n == 0 {
            return (partial(&d, head, ""), false);
        }
        let mut out = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nETag: {ETAG}\r\n\r\n",
            d.len()
        )
        .into_bytes();
        out.extend_from_slice(&d);
        (out, false)
    });
    let src = HttpSource::open(&[url], None, quick()).unwrap();
    let mut buf = vec![0x55u8; 4096];
    let err = src.read_at(0, &mut buf).expect_err("200 to a range");
    assert!(
        matches!(err, SourceError::NoRangeSupport { .. }),
        "got {err:?}"
    );
    assert!(buf.iter().all(|&b| b == 0x55));
    let seen = seen.lock().unwrap();
    assert!(
        seen[1]
            .to_ascii_lowercase()
            .contains(&format!("if-match: {ETAG}").to_ascii_lowercase()),
        "range request carries the pin: {}",
        seen[1]
    );
}

#[test]
fn encoded_body_is_refused() {
    let data = Arc::new(random_bytes(18, 64 * 1024));
    let d = Arc::clone(&data);
    let (url, _) = scripted_server(move |n, head| {
        let extra = if n == 0 {
            ""
        } else {
            "Content-Encoding: gzip\r\n"
        };
        (partial(&d, head, extra), false)
    });
    let opts = HttpOptions {
        deadline: Some(Duration::from_millis(300)),
        ..quick()
    };
    let src = HttpSource::open(&[url], None, opts).unwrap();
    let err = read(&src, 0, 100).expect_err("gzip body");
    assert!(
        matches!(err, SourceError::Net(NetError::BadResponse { .. })),
        "got {err:?}"
    );
}

#[test]
fn broken_transfer_resumes_where_it_stopped() {
    let data = Arc::new(random_bytes(19, 256 * 1024));
    let d = Arc::clone(&data);
    let (url, seen) = scripted_server(move |n, head| {
        let full = partial(&d, head, "");
        if n == 1 {
            // Headers and part of the body, then the connection drops.
            let cut = full.len() - 100_000;
            return (full[..cut].to_vec(), true);
        }
        (full, false)
    });
    let src = HttpSource::open(&[url], None, quick()).unwrap();
    let got = read(&src, 1000, 200_000).expect("resumed read");
    assert!(got == data[1000..201_000]);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 3, "probe, broken read, resumed read");
    let (a1, b1) = requested_range(&seen[1]);
    let (a2, b2) = requested_range(&seen[2]);
    assert_eq!((a1, b1), (1000, 200_999));
    assert!(
        a2 > a1 && b2 == b1,
        "second request asks only for the rest: {a2}-{b2}"
    );
}

#[test]
fn stalled_server_times_out() {
    // Accepts connections and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/disk.img", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().take(16) {
            held.push(stream);
        }
        std::thread::sleep(Duration::from_secs(30));
    });
    let opts = HttpOptions {
        request_timeout: Duration::from_millis(300),
        open_retries: 0,
        ..quick()
    };
    let start = Instant::now();
    let err = HttpSource::open(&[url], None, opts).expect_err("stall");
    assert!(
        matches!(err, SourceError::Net(NetError::Timeout { .. })),
        "got {err:?}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
}

// ---------------------------------------------------------------------------------------
// Throughput against curl (manual: `cargo test --release --test source_http -- --ignored
// --nocapture throughput`). The project's goal is hydration at >= 0.9x curl.
// SB_BENCH_THREADS (default 4) and SB_BENCH_RANGE_MIB (default 8) change the read pattern.

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&v| v > 0)
        .unwrap_or(default)
}

#[test]
#[ignore = "benchmark: 512 MiB over loopback, run by hand"]
fn throughput_vs_curl() {
    const SIZE: usize = 512 * MIB;
    let range = env_usize("SB_BENCH_RANGE_MIB", 8) * MIB;
    let threads = env_usize("SB_BENCH_THREADS", 4);
    assert_eq!(SIZE % range, 0, "range size must divide 512 MiB");
    let nginx = Nginx::start();
    let data = random_bytes(42, SIZE);
    nginx.put("big.img", &data);
    let url = nginx.url("big.img");
    let gib_s = |secs: f64| SIZE as f64 / secs / (1u64 << 30) as f64;

    let mut curl_best = f64::MAX;
    for _ in 0..3 {
        let start = Instant::now();
        let status = std::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", &url])
            .status()
            .expect("run curl");
        assert!(status.success());
        curl_best = curl_best.min(start.elapsed().as_secs_f64());
    }

    let src = Arc::new(HttpSource::open(std::slice::from_ref(&url), None, quick()).unwrap());
    let mut ours_best = f64::MAX;
    for round in 0..3 {
        let next = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        let readers: Vec<_> = (0..threads)
            .map(|_| {
                let (src, next) = (Arc::clone(&src), Arc::clone(&next));
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; range];
                    let mut sum = 0u64;
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i * range >= SIZE {
                            return sum;
                        }
                        src.read_at((i * range) as u64, &mut buf).unwrap();
                        sum = sum.wrapping_add(u64::from(buf[0]) + u64::from(buf[range - 1]));
                    }
                })
            })
            .collect();
        let sum: u64 = readers.into_iter().map(|t| t.join().unwrap()).sum();
        let secs = start.elapsed().as_secs_f64();
        ours_best = ours_best.min(secs);
        let expect: u64 = (0..SIZE / range)
            .map(|i| u64::from(data[i * range]) + u64::from(data[i * range + range - 1]))
            .sum();
        assert_eq!(sum, expect, "round {round}: wrong bytes");
    }
    println!(
        "512 MiB over loopback nginx: curl {:.2} GiB/s ({curl_best:.3} s), HttpSource \
         {threads} threads x {} MiB ranges {:.2} GiB/s ({ours_best:.3} s), ratio {:.2}",
        gib_s(curl_best),
        range / MIB,
        gib_s(ours_best),
        curl_best / ours_best
    );
}
