//! A presigned target URL that expires while serving (issue 15 point 3), on the real binary
//! with nginx and the libblkio client: the 403 is a distinct, clear error ("expired or
//! forbidden"), the guest's read waits instead of failing, `POST /v1/target-urls` refuses
//! URLs that do not serve the pinned image (nothing changes) and accepts a fresh URL of the
//! same image, after which the waiting read completes. No signature reaches the status or
//! the log.

mod common;

use std::time::Duration;

use serde_json::json;
use streamboot::control::client;

use common::blkio_client::Client;
use common::disk::{cli, cli_err, cli_ok};
use common::nginx::Nginx;
use common::serve::Served;

const OLD_SIG: &str = "sigOLDx1y2";
const NEW_SIG: &str = "sigNEWx3y4";

#[test]
fn expired_presigned_url_is_refreshed_through_the_control_api() {
    let flags = tempfile::tempdir().unwrap();
    let expired = flags.path().join("expired");
    // The "signature" valid now is OLD_SIG; once `expired` exists only NEW_SIG is.
    let rule = format!(
        "set $valid \"{OLD_SIG}\"; if (-f {}) {{ set $valid \"{NEW_SIG}\"; }} \
         if ($arg_sig != $valid) {{ return 403; }}",
        expired.display()
    );
    let nginx = Nginx::start_custom("", &rule);
    let target = common::random_bytes(21, 3 << 20);
    nginx.put("t.img", &target);
    nginx.replace(
        "other.img",
        &common::random_bytes(22, 3 << 20),
        std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000),
    );
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, common::random_bytes(23, 2 << 20)).unwrap();
    let d = disk.to_str().unwrap();
    let old_url = format!("{}?sig={OLD_SIG}", nginx.url("t.img"));
    let new_url = format!("{}?sig={NEW_SIG}", nginx.url("t.img"));
    cli_ok(&["prepare", d, "--target", &old_url, "--chunk-size", "65536"]);

    let sock = dir.path().join("vu.sock");
    let ctl = dir.path().join("ctl.sock");
    let log = dir.path().join("serve.log");
    let c = ctl.to_str().unwrap();
    let served = Served::start_logged(
        &disk,
        &sock,
        Some(&log),
        &["--target", &old_url, "--control", c, "--no-hydrate"],
    );
    let mut vm = Client::connect(&sock, 1, 1 << 20).unwrap();
    assert_eq!(vm.read(0, 0, 1 << 20), 0);
    assert_eq!(vm.buf(0..1 << 20), &target[..1 << 20]);

    // The URL expires: the guest's read waits (no I/O error), the log says why.
    std::fs::write(&expired, b"").unwrap();
    vm.submit_read(0, 2 << 20, 0, 1 << 20, 7);
    let early = vm.wait_for(0, 1, Duration::from_secs(3));
    assert!(
        early.as_ref().map_or(true, |done| done.is_empty()),
        "the read completed on an expired URL: {:?}",
        early.map(|d| d.iter().map(|c| c.ret).collect::<Vec<_>>())
    );
    let text = served.log();
    assert!(
        text.contains("403") && text.contains("expired or forbidden"),
        "no clear 403 in the log: {text}"
    );

    // Refused, nothing changed: another image (nginx's ETag is mtime and size, so give
    // it another mtime); the expired URL itself.
    let other = format!("{}?sig={NEW_SIG}", nginx.url("other.img"));
    for (urls, why) in [
        (vec![other], "not a location of this target"),
        (vec![old_url.clone()], "403"),
    ] {
        let e = client::post(&ctl, "/v1/target-urls", &json!({ "urls": urls }))
            .expect_err("wrong URLs accepted");
        let msg = e.to_string();
        assert!(
            msg.contains("refused") && msg.contains(why) && !msg.contains(NEW_SIG),
            "unclear refusal: {msg}"
        );
    }
    // A bad body is a bad request that echoes nothing.
    let e = client::post(&ctl, "/v1/target-urls", &json!({ "urls": new_url }))
        .expect_err("a string accepted as a list");
    assert!(!e.to_string().contains(NEW_SIG), "{e}");

    // The CLI: the expired URL is refused in one clear line; the fresh URL of the same
    // image (from a file, off the process list) is taken and the waiting read completes.
    let err = cli_err(&["target-urls", d, &old_url, "--control", c]);
    assert!(
        err.contains("refused") && err.contains("expired or forbidden") && !err.contains(OLD_SIG),
        "{err}"
    );
    let url_file = dir.path().join("urls");
    std::fs::write(&url_file, format!("{new_url}\n")).unwrap();
    let out = cli_ok(&[
        "target-urls",
        d,
        "--url-file",
        url_file.to_str().unwrap(),
        "--control",
        c,
    ]);
    assert!(out.contains("replaced") && !out.contains(NEW_SIG), "{out}");
    let done = vm
        .wait(0, 1)
        .expect("the read never completed after the refresh");
    assert_eq!(done[0].ret, 0);
    assert_eq!(vm.buf(0..1 << 20), &target[2 << 20..3 << 20]);
    assert_eq!(vm.read(1 << 20, 0, 1 << 20), 0);
    assert_eq!(vm.buf(0..1 << 20), &target[1 << 20..2 << 20]);

    let status = client::get_status(&ctl).unwrap().to_string();
    drop(vm);
    drop(served);
    let out = cli(&["status", d, "--json"]);
    let text = std::fs::read_to_string(&log).unwrap();
    for (what, s) in [
        ("control status", status.as_str()),
        ("status --json", &String::from_utf8_lossy(&out.stdout)),
        ("serve log", &text),
    ] {
        assert!(
            !s.contains(OLD_SIG) && !s.contains(NEW_SIG),
            "{what} shows a signature: {s}"
        );
    }
    let disk_bytes = std::fs::read(&disk).unwrap();
    for sig in [OLD_SIG, NEW_SIG] {
        assert!(
            !disk_bytes.windows(sig.len()).any(|w| w == sig.as_bytes()),
            "{sig} on the disk"
        );
    }
}

/// New URLs of the same location that serve another image (size or validator differ)
/// are refused and the source keeps its URLs.
#[test]
fn new_urls_must_serve_the_pinned_image() {
    use streamboot::source::{HttpOptions, HttpSource, RemoteSource, SourceError};
    let nginx = Nginx::start();
    let first = common::random_bytes(31, 1 << 20);
    nginx.put("t.img", &first);
    let src = HttpSource::open(&[nginx.url("t.img")], None, HttpOptions::default()).unwrap();
    let urls = src.urls();
    nginx.replace(
        "t.img",
        &common::random_bytes(32, 1 << 20),
        std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000),
    );
    let e = src
        .replace_urls(&[format!("{}?sig=fresh", nginx.url("t.img"))])
        .expect_err("another image accepted");
    assert!(matches!(e, SourceError::Changed { .. }), "{e}");
    assert!(!e.to_string().contains("fresh"), "{e}");
    assert_eq!(src.urls(), urls, "the URLs changed after a refusal");
}
