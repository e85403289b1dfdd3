//! `streamboot export` end to end: the real binary serves a published store over NBD on
//! loopback; `qemu-img` (a real NBD client) and a small client written here from the
//! protocol read it back. Hostile clients get errors and do not disturb the others.

mod common;
mod nbd_common;
mod store_common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::nginx::Nginx;
use nbd_common::*;
use store_common::{CS, MIB};

// --- tests ------------------------------------------------------------------------------

#[test]
fn qemu_img_reads_the_published_image() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = publish_store(dir.path(), true);
    let d = dir.path().to_str().unwrap();
    let ex = Export::start(&[
        "--store",
        &format!("{d}/store"),
        "--trusted-key",
        &format!("{d}/key.pub"),
    ])
    .unwrap();

    assert_eq!(qemu_img_size(&ex.url("a")), a.len() as u64);
    let got = qemu_img_convert(&ex.url("a"), &dir.path().join("a.out"));
    assert_eq!(sha256(&got), sha256(&a));

    // Image B's size is not a multiple of 512: QEMU rounds it up and needs structured
    // replies to get the last sector right.
    assert_eq!(
        qemu_img_size(&ex.url("b")),
        (b.len() as u64).div_ceil(512) * 512
    );
    let got = qemu_img_convert(&ex.url("b"), &dir.path().join("b.out"));
    assert_eq!(got[..b.len()], b[..]);
    assert!(got[b.len()..].iter().all(|&x| x == 0));

    // Listing, and image B byte for byte through the protocol client (simple replies),
    // in requests that straddle chunk boundaries.
    let mut c = Client::connect(ex.port);
    assert_eq!(c.list(), vec!["a".to_string(), "b".to_string()]);
    assert_eq!(c.go("nope"), Err(0x8000_0006));
    assert_eq!(c.go("b"), Ok(b.len() as u64));
    let got = c.read_all(b.len() as u64, 3 * CS as u32 + 4097);
    assert_eq!(sha256(&got), sha256(&b));
    c.disconnect();
    ex.stop();
}

#[test]
fn hostile_clients_get_errors_and_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _) = publish_store(dir.path(), true);
    let d = dir.path().to_str().unwrap();
    let ex = Export::start(&[
        "--store",
        &format!("{d}/store"),
        "--trusted-key",
        &format!("{d}/key.pub"),
    ])
    .unwrap();
    let size = a.len() as u64;

    // A well-behaved client stays connected through all of it.
    let mut good = Client::connect(ex.port);
    assert_eq!(good.go("a"), Ok(size));

    // Bad option magic: the server closes.
    let mut c = Client::connect(ex.port);
    c.s.write_all(&[0xde; 16]).unwrap();
    assert_closed(&mut c.s);

    // A 4 GiB option: NBD_REP_ERR_TOO_BIG, then closed.
    let mut c = Client::connect(ex.port);
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend(7u32.to_be_bytes());
    m.extend(u32::MAX.to_be_bytes());
    c.s.write_all(&m).unwrap();
    assert_eq!(c.reply().0, 0x8000_0009);
    assert_closed(&mut c.s);

    // Unknown option, then a GO that works.
    let mut c = Client::connect(ex.port);
    c.option(4242, b"whatever");
    assert_eq!(c.reply().0, 0x8000_0001);
    assert_eq!(c.go("a"), Ok(size));
    // Reads beyond the end, a write with its payload, a trim: errors, the connection lives.
    assert_eq!(c.read(size - 10, 11), Err(22));
    assert_eq!(c.read(u64::MAX - 1, 4), Err(22));
    c.request(1, 77, 0, 8);
    c.s.write_all(b"12345678").unwrap();
    assert_eq!(c.simple_reply(), (1, 77));
    c.request(4, 78, 0, 4096);
    assert_eq!(c.simple_reply(), (1, 78));
    c.request(3, 79, 0, 0);
    assert_eq!(c.simple_reply(), (0, 79));
    assert_eq!(c.read(size - 10, 10).unwrap(), a[a.len() - 10..]);
    // Garbage instead of a request: closed.
    c.s.write_all(&[0xff; 28]).unwrap();
    assert_closed(&mut c.s);

    // The image was never written to.
    let mut check = Client::connect(ex.port);
    assert_eq!(check.go("a"), Ok(size));
    assert_eq!(check.read(0, 8).unwrap(), a[..8]);
    check.disconnect();

    // The first client was not disturbed.
    let off = 77 * CS as u64 - 100;
    assert_eq!(
        good.read(off, 1000).unwrap(),
        a[off as usize..off as usize + 1000]
    );
    good.disconnect();
    ex.stop();
}

#[test]
fn signatures_are_required_unless_waived() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _) = publish_store(dir.path(), false);
    let d = dir.path().to_str().unwrap();
    let store = format!("{d}/store");
    let key = format!("{d}/key.pub");

    let err = Export::start(&["--store", &store]).err().unwrap();
    assert!(err.contains("--trusted-key"), "{err}");
    let err = Export::start(&["--store", &store, "--trusted-key", &key])
        .err()
        .unwrap();
    assert!(err.contains("image \"a\""), "{err}");
    assert!(
        err.contains("signature") || err.contains("unsigned"),
        "{err}"
    );

    let ex = Export::start(&["--store", &store, "--insecure-unsigned"]).unwrap();
    let mut c = Client::connect(ex.port);
    assert_eq!(c.go("a"), Ok(a.len() as u64));
    assert_eq!(
        c.read(5 * CS as u64, 4096).unwrap(),
        a[5 * CS..5 * CS + 4096]
    );
    c.disconnect();
    ex.stop();
}

#[test]
fn http_store_sector_by_sector_fetches_each_chunk_once() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _) = publish_store(dir.path(), true);
    let nginx = Nginx::serve(&dir.path().join("store"));
    let key = dir.path().join("key.pub");
    let url = nginx.url("");
    // An HTTP store cannot be listed: the images must be named.
    let err = Export::start(&["--store", &url, "--trusted-key", key.to_str().unwrap()])
        .err()
        .unwrap();
    assert!(err.contains("--image"), "{err}");
    let ex = Export::start(&[
        "--store",
        &url,
        "--image",
        "a",
        "--trusted-key",
        key.to_str().unwrap(),
    ])
    .unwrap();

    // A boot loader's access pattern: 512-byte sectors, one after the other.
    let mut c = Client::connect(ex.port);
    assert_eq!(c.list(), vec!["a".to_string()]);
    assert_eq!(c.go("a"), Ok(a.len() as u64));
    let span = 2 * MIB;
    let got = c.read_all(span as u64, 512);
    assert_eq!(got, a[..span]);
    c.disconnect();
    let chunk_gets = nginx
        .access_log()
        .iter()
        .filter(|e| e.request.contains("/chunks/") && e.status == 200)
        .count();
    let distinct: std::collections::BTreeSet<&[u8]> = a[..span]
        .chunks(CS)
        .filter(|c| c.iter().any(|&b| b != 0))
        .collect();
    assert_eq!(chunk_gets, distinct.len(), "one GET per distinct chunk");

    let out = qemu_img_convert(&ex.url("a"), &dir.path().join("a.out"));
    assert_eq!(sha256(&out), sha256(&a));
    ex.stop();
}

#[test]
fn connections_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let (a, _) = publish_store(dir.path(), true);
    let d = dir.path().to_str().unwrap();
    let ex = Export::start(&[
        "--store",
        &format!("{d}/store"),
        "--trusted-key",
        &format!("{d}/key.pub"),
        "--max-connections",
        "1",
    ])
    .unwrap();
    let mut first = Client::connect(ex.port);
    assert_eq!(first.go("a"), Ok(a.len() as u64));
    // Over the bound: closed before the greeting.
    let mut over = TcpStream::connect(("127.0.0.1", ex.port)).unwrap();
    assert_closed(&mut over);
    first.disconnect();
    // Once the first is gone, a new client is served (its slot is freed by its thread:
    // retry a few times).
    let mut served = false;
    for _ in 0..100 {
        let mut s = TcpStream::connect(("127.0.0.1", ex.port)).unwrap();
        let mut hello = [0u8; 8];
        if s.read_exact(&mut hello).is_ok() {
            assert_eq!(&hello, b"NBDMAGIC");
            served = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(served, "no client served after the first left");
    ex.stop();
}
