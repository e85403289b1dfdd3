//! `StoreSource` over HTTP, against a minimal static file server on 127.0.0.1 that can
//! inject failures (503s, cut bodies). Only loopback traffic; the server lives as long as
//! the test process.

mod store_common;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use store_common::*;
use streamboot::source::store::{StoreSource, StoreSourceOptions};
use streamboot::source::{NetError, RemoteSource, SourceError};
use streamboot::store::publish;

/// Failure injection knobs and counters of the test server.
#[derive(Default)]
struct Knobs {
    /// Answer this many next requests with 503.
    fail_next: AtomicU32,
    /// Cut this many next bodies in half (Content-Length promises more).
    cut_next: AtomicU32,
    /// Requests served.
    requests: AtomicU64,
}

/// Takes one unit from a counter if it is positive.
fn take(c: &AtomicU32) -> bool {
    c.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

/// Serves files under `root` over HTTP/1.1 on an ephemeral loopback port.
fn serve(root: PathBuf) -> (String, Arc<Knobs>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let knobs = Arc::new(Knobs::default());
    let k = knobs.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let (root, k) = (root.clone(), k.clone());
            std::thread::spawn(move || {
                let _ = handle(stream, &root, &k);
            });
        }
    });
    (url, knobs)
}

fn handle(mut stream: TcpStream, root: &Path, k: &Knobs) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
    }
    k.requests.fetch_add(1, Ordering::SeqCst);
    let path = request_line.split(' ').nth(1).unwrap_or("/").to_owned();
    if take(&k.fail_next) {
        return stream.write_all(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
    }
    let rel = path.trim_start_matches('/');
    let body = if rel.split('/').any(|p| p == ".." || p.is_empty()) {
        None
    } else {
        std::fs::read(root.join(rel)).ok()
    };
    let Some(body) = body else {
        return stream.write_all(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
    };
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    if take(&k.cut_next) {
        stream.write_all(&body[..body.len() / 2])?;
        return stream.shutdown(std::net::Shutdown::Both);
    }
    stream.write_all(&body)
}

fn opts(key: &ed25519_dalek::SigningKey) -> StoreSourceOptions {
    let mut o = StoreSourceOptions::trusted(key.verifying_key());
    o.fetch.http.backoff_base = Duration::from_millis(5);
    o.fetch.http.backoff_max = Duration::from_millis(50);
    o.fetch.attempts = 4;
    o.cache_chunks = 0;
    o
}

fn read(src: &StoreSource, off: u64, len: usize) -> Result<Vec<u8>, SourceError> {
    let mut buf = vec![0u8; len];
    src.read_at(off, &mut buf)?;
    Ok(buf)
}

#[test]
fn store_over_http() {
    let tmp = tempfile::tempdir().unwrap();
    let a = image_a();
    let pa = write_image(tmp.path(), "a.img", &a);
    let st = tmp.path().join("store");
    let key = key(1);
    let r = publish(&pa, &st, "a", CS as u64, Some(&key), true).unwrap();
    let (url, knobs) = serve(st.clone());

    // Whole image and some ranges, with a trailing slash on the base URL.
    let src = StoreSource::open(&format!("{url}/"), "a", opts(&key)).unwrap();
    assert_eq!(src.identity().validator, r.index_hash);
    assert!(src.name().starts_with("http://127.0.0.1:"));
    assert!(read(&src, 0, a.len()).unwrap() == a);
    for (off, len) in [
        (1u64, 100usize),
        (CS as u64 - 3, 7),
        (5 * MIB as u64 + 11, MIB),
    ] {
        assert_eq!(
            read(&src, off, len).unwrap(),
            &a[off as usize..off as usize + len]
        );
    }
    // Zero chunks cost no request.
    let before = knobs.requests.load(Ordering::SeqCst);
    assert_eq!(
        read(&src, 10 * CS as u64, 10 * CS).unwrap(),
        vec![0; 10 * CS]
    );
    assert_eq!(knobs.requests.load(Ordering::SeqCst), before);

    // Transient failures are retried inside one read: 503s and a cut body.
    knobs.fail_next.store(2, Ordering::SeqCst);
    knobs.cut_next.store(1, Ordering::SeqCst);
    assert_eq!(read(&src, 0, CS).unwrap(), &a[..CS]);
    assert_eq!(knobs.fail_next.load(Ordering::SeqCst), 0);
    assert_eq!(knobs.cut_next.load(Ordering::SeqCst), 0);
    // ...but not forever: a persistent 503 surfaces as a transient error.
    knobs.fail_next.store(100, Ordering::SeqCst);
    let err = read(&src, 0, 1).unwrap_err();
    assert!(
        matches!(err, SourceError::Net(NetError::Status { status: 503, .. })),
        "{err}"
    );
    assert!(err.is_transient());
    knobs.fail_next.store(0, Ordering::SeqCst);

    // The index is retried too.
    knobs.fail_next.store(1, Ordering::SeqCst);
    StoreSource::open(&url, "a", opts(&key)).unwrap();

    // A tampered object over HTTP is a verify error; a missing one a permanent 404.
    let c = 42u64;
    let h = src.chunk_hash(c).unwrap().to_hex();
    let dir = st.join("chunks").join(&h[..2]);
    let obj = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_str().unwrap().starts_with(&h))
        .unwrap();
    let good = std::fs::read(&obj).unwrap();
    let mut bad = good.clone();
    let n = bad.len();
    bad[n - 5] ^= 0xff;
    std::fs::write(&obj, &bad).unwrap();
    let err = read(&src, c * CS as u64, 10).unwrap_err();
    assert!(matches!(err, SourceError::Verify { .. }), "{err}");
    std::fs::remove_file(&obj).unwrap();
    let err = read(&src, c * CS as u64, 10).unwrap_err();
    assert!(
        matches!(err, SourceError::Net(NetError::NotFound { .. })),
        "{err}"
    );
    assert!(!err.is_transient());
    std::fs::write(&obj, &good).unwrap();

    // Wrong key over HTTP.
    let err = StoreSource::open(&url, "a", opts(&store_common::key(2))).unwrap_err();
    assert!(err.to_string().contains("not trusted"), "{err}");
    // No such image.
    let err = StoreSource::open(&url, "nope", opts(&key)).unwrap_err();
    assert!(
        matches!(err, SourceError::Net(NetError::NotFound { .. })),
        "{err}"
    );

    // Blocking calls made from inside a tokio runtime still work (they move off the
    // runtime's thread instead of panicking).
    let rt = tokio::runtime::Runtime::new().unwrap();
    let got = rt.block_on(async { read(&src, 0, 4096) }).unwrap();
    assert_eq!(got, &a[..4096]);
    drop(rt);

    // Many threads at once.
    let src = Arc::new(src);
    let a = Arc::new(a);
    let hs: Vec<_> = (0..4)
        .map(|t| {
            let (src, a) = (src.clone(), a.clone());
            std::thread::spawn(move || {
                for i in 0..20u64 {
                    let off = (t * 7919 + i * 104_729) * 97 % (a.len() as u64 - 300_000);
                    let got = read(&src, off, 300_000).unwrap();
                    assert!(got == a[off as usize..off as usize + 300_000]);
                }
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
}
