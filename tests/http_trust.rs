//! What an `HttpSource` trusts (issue 11): every range answer must carry the pinned
//! validator, redirects keep their origin, each request has a total time budget, and no
//! secret of a URL (userinfo, query string) appears in an error. Real nginx behind the
//! fault-injecting proxy (tests/common/fault_proxy.rs).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::fault_proxy::{Fault, FaultProxy, Rule, When};
use common::nginx::{set_mtime, Nginx};
use common::random_bytes;
use streamboot::source::{HttpOptions, HttpSource, NetError, RemoteSource, SourceError};

const KIB: usize = 1 << 10;

/// Short waits so fault tests finish quickly.
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

fn read(src: &dyn RemoteSource, offset: u64, len: usize) -> Result<Vec<u8>, SourceError> {
    let mut buf = vec![0u8; len];
    src.read_at(offset, &mut buf).map(|()| buf)
}

/// Runs `read` on another thread and waits at most `limit` for it (a hang fails the test
/// instead of hanging it).
fn read_within(
    src: &Arc<HttpSource>,
    offset: u64,
    len: usize,
    limit: Duration,
) -> Result<Vec<u8>, SourceError> {
    let src = Arc::clone(src);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(read(&*src, offset, len));
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("read {offset}+{len} still running after {limit:?}"))
}

/// nginx with `disk.img` (v1) and `v2.img` (same size, other bytes and mtime), and a proxy
/// in front of it.
fn replaced_world() -> (Nginx, FaultProxy, Vec<u8>, Vec<u8>) {
    let nginx = Nginx::start();
    let v1 = random_bytes(1, 512 * KIB);
    let v2 = random_bytes(2, 512 * KIB);
    nginx.put("disk.img", &v1);
    let later = SystemTime::now() + Duration::from_secs(3600);
    nginx.replace("v2.img", &v2, later);
    let proxy = FaultProxy::start(nginx.port());
    (nginx, proxy, v1, v2)
}

/// The image is replaced underneath a server that ignores `If-Match` and sends no
/// validator: no byte of v2 may come out, and the error says why.
fn unvalidated_answers_are_refused(location: &str, validator: &str) {
    let (_nginx, proxy, v1, v2) = replaced_world();
    let src = HttpSource::open(&[proxy.url(&format!("{location}disk.img"))], None, quick())
        .expect("open through the proxy");
    assert!(read(&src, 0, 4 * KIB).unwrap() == v1[..4 * KIB]);
    proxy.set_plan(
        1,
        vec![Rule::new(
            When::Always,
            Fault::Unvalidated(format!("/{location}v2.img")),
        )],
    );
    let mut buf = vec![0xAAu8; 64 * KIB];
    let err = src
        .read_at(64 * KIB as u64, &mut buf)
        .expect_err("v2 bytes accepted");
    assert!(proxy.hits() > 0, "the fault was never applied");
    assert!(
        buf != v2[64 * KIB..128 * KIB],
        "v2 bytes reached the caller"
    );
    assert!(!err.is_transient(), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains(validator) && text.contains("not used"),
        "unclear error: {text}"
    );
    // The server stays refused, even for ranges it would answer properly now.
    proxy.clear();
    let again = read(&src, 0, 4 * KIB).expect_err("refused server used again");
    assert!(again.to_string().contains(validator), "{again}");
}

#[test]
fn range_answer_without_the_pinned_etag_is_refused() {
    unvalidated_answers_are_refused("", "ETag");
}

#[test]
fn range_answer_without_the_pinned_last_modified_is_refused() {
    unvalidated_answers_are_refused("lmonly/", "Last-Modified");
}

/// Two nginx serving one root (same file, same ETag) and a proxy in front of the first.
fn mirrors_with_proxy(data: &[u8]) -> (Nginx, Nginx, FaultProxy, tempfile::TempDir) {
    let root = tempfile::TempDir::new().unwrap();
    let path = root.path().join("disk.img");
    std::fs::write(&path, data).unwrap();
    set_mtime(
        &path,
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
    );
    let a = Nginx::serve(root.path());
    let b = Nginx::serve(root.path());
    let proxy = FaultProxy::start(a.port());
    (a, b, proxy, root)
}

#[test]
fn mirror_without_validators_is_dropped_and_the_other_serves() {
    let data = random_bytes(3, 256 * KIB);
    let (_a, b, proxy, _root) = mirrors_with_proxy(&data);
    let src = HttpSource::open(&[proxy.url("disk.img"), b.url("disk.img")], None, quick())
        .expect("open mirrors");
    proxy.set_plan(
        3,
        vec![Rule::new(
            When::Always,
            Fault::Unvalidated("/disk.img".into()),
        )],
    );
    let before = proxy.requests();
    for i in 0..8 {
        let off = i * 32 * KIB;
        let got = read(&src, off as u64, 32 * KIB).expect("read served by the good mirror");
        assert!(got == data[off..off + 32 * KIB], "bytes differ at {off}");
    }
    assert_eq!(
        proxy.requests() - before,
        1,
        "the mirror without validators was asked again after it was refused"
    );
}

#[test]
fn cross_origin_redirect_is_refused_unless_allowed() {
    let nginx = Nginx::start();
    let data = random_bytes(4, 128 * KIB);
    nginx.put("disk.img", &data);
    let proxy = FaultProxy::start(nginx.port());
    // Another port is another origin.
    proxy.set_plan(
        4,
        vec![Rule::new(
            When::Always,
            Fault::Redirect(format!(
                "{}?X-Amz-Signature=topsecret",
                nginx.url("disk.img")
            )),
        )],
    );
    let err = HttpSource::open(&[proxy.url("disk.img")], None, quick()).expect_err("redirect");
    assert!(
        matches!(err, SourceError::Net(NetError::RedirectRefused { .. })),
        "{err:?}"
    );
    let text = err.to_string();
    assert!(text.contains("another origin"), "{text}");
    assert!(!text.contains("topsecret"), "secret in the error: {text}");

    let allowed = HttpOptions {
        allow_cross_origin_redirects: true,
        ..quick()
    };
    let src = HttpSource::open(&[proxy.url("disk.img")], None, allowed).expect("allowed");
    assert!(read(&src, 1000, 50_000).unwrap() == data[1000..51_000]);
}

#[test]
fn same_origin_redirect_is_followed() {
    let nginx = Nginx::start();
    let data = random_bytes(5, 128 * KIB);
    nginx.put("disk.img", &data);
    let proxy = FaultProxy::start(nginx.port());
    proxy.set_plan(
        5,
        vec![Rule::new(
            When::Path("/alias.img".into()),
            Fault::Redirect(proxy.url("disk.img")),
        )],
    );
    let src = HttpSource::open(&[proxy.url("alias.img")], None, quick()).expect("same origin");
    assert!(read(&src, 7, 60_000).unwrap() == data[7..60_007]);
}

/// Options for the drip tests: a byte every 200 ms never trips the 1 s stall limit, only
/// the total budget of an attempt (1 s here: the minimum rate is high).
fn drip_opts(deadline: Option<Duration>) -> HttpOptions {
    HttpOptions {
        request_timeout: Duration::from_secs(1),
        min_rate: 1 << 20,
        deadline,
        ..quick()
    }
}

#[test]
fn dripping_server_fails_over_to_a_mirror() {
    let data = random_bytes(6, 256 * KIB);
    let (_a, b, proxy, _root) = mirrors_with_proxy(&data);
    let src = Arc::new(
        HttpSource::open(
            &[proxy.url("disk.img"), b.url("disk.img")],
            None,
            drip_opts(None),
        )
        .expect("open mirrors"),
    );
    proxy.set_plan(
        6,
        vec![Rule::new(When::Always, Fault::Drip { every_ms: 200 })],
    );
    let got = read_within(&src, 4096, 64 * KIB, Duration::from_secs(20)).expect("from mirror");
    assert!(got == data[4096..4096 + 64 * KIB]);
    assert!(proxy.hits() > 0, "the drip was never applied");
}

#[test]
fn dripping_server_without_mirror_errors_at_the_deadline() {
    let nginx = Nginx::start();
    nginx.put("disk.img", &random_bytes(7, 256 * KIB));
    let proxy = FaultProxy::start(nginx.port());
    let src = Arc::new(
        HttpSource::open(
            &[proxy.url("disk.img")],
            None,
            drip_opts(Some(Duration::from_secs(2))),
        )
        .expect("open"),
    );
    proxy.set_plan(
        7,
        vec![Rule::new(When::Always, Fault::Drip { every_ms: 200 })],
    );
    let start = Instant::now();
    let err = read_within(&src, 0, 64 * KIB, Duration::from_secs(20)).expect_err("drip");
    assert!(
        matches!(err, SourceError::Net(NetError::Timeout { .. })),
        "{err:?}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
}

/// `user:secret@` and a presigned query string never show in an error or a name.
#[test]
fn errors_and_names_never_show_url_secrets() {
    let nginx = Nginx::start();
    nginx.put("disk.img", &random_bytes(8, 64 * KIB));
    let with_secrets = |url: &str| {
        url.replacen("http://", "http://user:secret@", 1) + "?X-Amz-Signature=topsecret"
    };
    let src = HttpSource::open(&[with_secrets(&nginx.url("disk.img"))], None, quick())
        .expect("nginx ignores both");
    let shown = format!("{} {:?} {:?}", src.name(), src.urls(), src);
    assert!(!shown.contains("secret"), "{shown}");

    let dead = format!("http://127.0.0.1:{}/disk.img", common::dead_port());
    for url in [with_secrets(&nginx.url("missing.img")), with_secrets(&dead)] {
        let opts = HttpOptions {
            open_retries: 0,
            ..quick()
        };
        let err = HttpSource::open(&[url], None, opts).expect_err("fails");
        let text = format!("{err} {err:?}");
        assert!(!text.contains("secret"), "{text}");
    }
}

/// A server that wants credentials (or a signed query) the URL does not carry: a clear
/// one-line error that points to the credential files (`--bearer-token-file`,
/// `--header-file`), never to credentials on the command line.
#[test]
fn missing_credentials_get_a_clear_error() {
    let nginx = Nginx::start();
    nginx.put("disk.img", &random_bytes(9, 64 * KIB));
    let proxy = FaultProxy::start(nginx.port());
    for status in [401u16, 403] {
        proxy.set_plan(
            9,
            vec![Rule::new(
                When::Always,
                Fault::Require {
                    needles: vec!["Authorization: Basic dXNlcjpzZWNyZXQ=".into()],
                    status,
                },
            )],
        );
        let err = HttpSource::open(&[proxy.url("disk.img")], None, quick()).expect_err("denied");
        let text = err.to_string();
        assert!(!err.is_transient());
        assert!(
            text.contains(&status.to_string())
                && text.contains("--bearer-token-file")
                && text.contains("--header-file"),
            "unclear: {text}"
        );
        assert!(status == 403 || !text.contains("--target"), "{text}");
        assert!(!text.contains('\n'), "{text}");
        let ok = proxy
            .url("disk.img")
            .replacen("http://", "http://user:secret@", 1);
        HttpSource::open(&[ok], None, quick()).expect("with credentials");
    }
}

/// At open, a mirror that does not send the kind of validator the others pin by is refused
/// with the reason, not as "different images".
#[test]
fn mirror_without_the_pinned_kind_of_validator_is_refused_at_open() {
    let nginx = Nginx::start();
    nginx.put("disk.img", &random_bytes(10, 64 * KIB));
    let err = HttpSource::open(
        &[nginx.url("disk.img"), nginx.url("lmonly/disk.img")],
        None,
        quick(),
    )
    .expect_err("the second mirror sends no ETag");
    assert!(!err.is_transient());
    let text = err.to_string();
    assert!(
        text.contains("lmonly/disk.img") && text.contains("sends no strong ETag"),
        "unclear: {text}"
    );
}

/// Reopening a disk pinned by ETag on a server that no longer sends one: refused at open,
/// saying why. Pinned by Last-Modified on a server that now also sends an ETag: still the
/// same image, accepted.
#[test]
fn reopening_checks_the_recorded_kind_of_validator() {
    let nginx = Nginx::start();
    let data = random_bytes(11, 64 * KIB);
    nginx.put("disk.img", &data);
    let by_etag = HttpSource::open(&[nginx.url("disk.img")], None, quick())
        .unwrap()
        .identity()
        .clone();
    let by_date = HttpSource::open(&[nginx.url("lmonly/disk.img")], None, quick())
        .unwrap()
        .identity()
        .clone();
    assert!(by_date.validator.starts_with("lm:"), "{by_date:?}");

    let err = HttpSource::open(&[nginx.url("lmonly/disk.img")], Some(&by_etag), quick())
        .expect_err("no ETag any more");
    assert!(matches!(err, SourceError::Unvalidated { .. }), "{err:?}");
    assert!(err.to_string().contains("sends no strong ETag"), "{err}");

    let src = HttpSource::open(&[nginx.url("disk.img")], Some(&by_date), quick())
        .expect("Last-Modified pin on a server that also sends an ETag");
    assert_eq!(src.identity(), &by_date);
    assert!(read(&src, 100, 1000).unwrap() == data[100..1100]);
}
