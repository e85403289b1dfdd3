//! One network layer (issue 15 point 5) for `streamboot export`: a store reached over HTTPS
//! with a private CA and a bearer token is exported over NBD when `--cacert` and
//! `--bearer-token-file` are given (the same options as `prepare`/`serve`); without the CA
//! the image is not exported.

mod common;
mod nbd_common;
mod store_common;

use common::nginx::Nginx;
use common::pki::Pki;
use nbd_common::*;

const TOKEN: &str = "tokEXPORTsecret";

#[test]
fn export_reads_an_https_store_with_the_http_options() {
    let pki = Pki::new();
    let rule = format!(
        "{} if ($http_authorization != \"Bearer {TOKEN}\") {{ return 401; }}",
        pki.nginx_tls()
    );
    let nginx = Nginx::start_custom("ssl", &rule);
    let (a, _) = publish_store(nginx.root(), true);
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let key = nginx.root().join("key.pub");
    let url = nginx.https_url("store");
    let ca = pki.arg("ca.pem");

    // Without the CA the image cannot be opened: the client is refused, nothing served.
    let ex = Export::start(&[
        "--store",
        &url,
        "--image",
        "a",
        "--trusted-key",
        key.to_str().unwrap(),
        "--bearer-token-file",
        token.to_str().unwrap(),
    ]);
    match ex {
        Err(e) => assert!(e.contains("--cacert"), "unclear: {e}"),
        Ok(ex) => {
            let mut c = Client::connect(ex.port);
            assert!(
                c.go("a").is_err(),
                "an untrusted server's image was exported"
            );
            ex.stop();
        }
    }

    let ex = Export::start(&[
        "--store",
        &url,
        "--image",
        "a",
        "--trusted-key",
        key.to_str().unwrap(),
        "--cacert",
        &ca,
        "--no-default-roots",
        "--bearer-token-file",
        token.to_str().unwrap(),
    ])
    .expect("export with the HTTP options");
    let mut c = Client::connect(ex.port);
    assert_eq!(c.go("a"), Ok(a.len() as u64));
    let span = 2 << 20;
    assert_eq!(c.read_all(span as u64, 1 << 16), a[..span]);
    c.disconnect();
    ex.stop();
    let log = nginx.access_log();
    assert!(
        log.iter()
            .any(|e| e.status == 200 && e.request.contains("/store/chunks/")),
        "no chunk was fetched over HTTPS: {log:?}"
    );
}
