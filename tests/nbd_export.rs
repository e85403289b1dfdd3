//! `streamboot export` end to end: the real binary serves a published store over NBD on
//! loopback; `qemu-img` (a real NBD client) and a small client written here from the
//! protocol read it back. Hostile clients get errors and do not disturb the others.

mod common;
mod store_common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::nginx::Nginx;
use sha2::{Digest, Sha256};
use store_common::{image_a, image_b, CS, MIB};

const BIN: &str = env!("CARGO_BIN_EXE_streamboot");

fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn run_ok(args: &[&str]) {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "streamboot {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A store in `dir/store` holding image A as `a` and image B as `b`, signed with
/// `dir/key.key`; returns the images.
fn publish_store(dir: &Path, sign: bool) -> (Vec<u8>, Vec<u8>) {
    let a = image_a();
    let b = image_b(&a);
    std::fs::write(dir.join("a.img"), &a).unwrap();
    std::fs::write(dir.join("b.img"), &b).unwrap();
    let d = dir.to_str().unwrap();
    run_ok(&["keygen", &format!("{d}/key")]);
    for n in ["a", "b"] {
        let img = format!("{d}/{n}.img");
        let store = format!("{d}/store");
        let key = format!("{d}/key.key");
        let mut args = vec!["publish", &img, "--store", &store, "--name", n];
        if sign {
            args.extend(["--key", &key]);
        }
        run_ok(&args);
    }
    (a, b)
}

/// A running `streamboot export`; killed on drop unless stopped.
struct Export {
    child: Child,
    port: u16,
}

impl Export {
    fn start(args: &[&str]) -> Result<Export, String> {
        let mut child = Command::new(BIN)
            .arg("--json")
            .arg("export")
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        if line.is_empty() {
            let mut err = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            child.wait().unwrap();
            return Err(err);
        }
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["ok"] == false {
            child.wait().unwrap();
            return Err(v["error"].as_str().unwrap().to_owned());
        }
        assert_eq!(v["event"], "ready", "{line}");
        let port = v["listen"]
            .as_str()
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        // Drain the log so the server never blocks on a full pipe.
        let mut err = child.stderr.take().unwrap();
        std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
        Ok(Export { child, port })
    }

    fn url(&self, name: &str) -> String {
        format!("nbd://127.0.0.1:{}/{name}", self.port)
    }

    /// SIGTERM; the server must exit 0.
    fn stop(mut self) {
        // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet.
        let rc = unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        assert_eq!(rc, 0);
        let st = self.child.wait().unwrap();
        assert!(st.success(), "export exited with {st}");
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn qemu_img_convert(url: &str, out: &Path) -> Vec<u8> {
    let st = Command::new("timeout")
        .args(["300", "qemu-img", "convert", "-f", "raw", "-O", "raw", url])
        .arg(out)
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img convert {url}: {st}");
    std::fs::read(out).unwrap()
}

fn qemu_img_size(url: &str) -> u64 {
    let out = Command::new("timeout")
        .args(["60", "qemu-img", "info", "--output=json", url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

// --- a small NBD client, written from the protocol -----------------------------------

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;

struct Client {
    s: TcpStream,
}

impl Client {
    /// Connects and does the greeting (fixed newstyle, no zeroes).
    fn connect(port: u16) -> Client {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut c = Client { s };
        let mut hello = [0u8; 18];
        c.s.read_exact(&mut hello).unwrap();
        assert_eq!(&hello[..8], b"NBDMAGIC");
        assert_eq!(
            u64::from_be_bytes(hello[8..16].try_into().unwrap()),
            IHAVEOPT
        );
        c.s.write_all(&3u32.to_be_bytes()).unwrap();
        c
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend(opt.to_be_bytes());
        m.extend((data.len() as u32).to_be_bytes());
        m.extend(data);
        self.s.write_all(&m).unwrap();
    }

    /// One option reply: (type, data).
    fn reply(&mut self) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(
            u64::from_be_bytes(h[..8].try_into().unwrap()),
            0x0003_e889_0455_65a9
        );
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut d = vec![0u8; len as usize];
        self.s.read_exact(&mut d).unwrap();
        (kind, d)
    }

    fn list(&mut self) -> Vec<String> {
        self.option(3, &[]);
        let mut names = Vec::new();
        loop {
            match self.reply() {
                (1, _) => return names,
                (2, d) => names.push(String::from_utf8(d[4..].to_vec()).unwrap()),
                other => panic!("LIST reply {other:?}"),
            }
        }
    }

    /// NBD_OPT_GO; Ok(size) or Err(error reply type).
    fn go(&mut self, name: &str) -> Result<u64, u32> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend(name.as_bytes());
        d.extend(0u16.to_be_bytes());
        self.option(7, &d);
        let mut size = None;
        loop {
            match self.reply() {
                (1, _) => return Ok(size.expect("INFO_EXPORT before ACK")),
                (3, d) if d[..2] == [0, 0] => {
                    size = Some(u64::from_be_bytes(d[2..10].try_into().unwrap()))
                }
                (3, _) => {}
                (e, _) => return Err(e),
            }
        }
    }

    fn request(&mut self, kind: u16, cookie: u64, offset: u64, len: u32) {
        let mut m = 0x2560_9513u32.to_be_bytes().to_vec();
        m.extend(0u16.to_be_bytes());
        m.extend(kind.to_be_bytes());
        m.extend(cookie.to_be_bytes());
        m.extend(offset.to_be_bytes());
        m.extend(len.to_be_bytes());
        self.s.write_all(&m).unwrap();
    }

    /// A simple reply: (error, cookie).
    fn simple_reply(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), 0x6744_6698);
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }

    /// Reads `len` bytes at `offset`: Ok(data) or Err(errno).
    fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.request(0, offset ^ 0x5555, offset, len);
        let (err, cookie) = self.simple_reply();
        assert_eq!(cookie, offset ^ 0x5555);
        if err != 0 {
            return Err(err);
        }
        let mut d = vec![0u8; len as usize];
        self.s.read_exact(&mut d).unwrap();
        Ok(d)
    }

    /// Reads the whole export in `step`-byte requests.
    fn read_all(&mut self, size: u64, step: u32) -> Vec<u8> {
        let mut out = Vec::with_capacity(size as usize);
        let mut off = 0;
        while off < size {
            let n = (size - off).min(step.into()) as u32;
            out.extend(self.read(off, n).unwrap());
            off += u64::from(n);
        }
        out
    }

    fn disconnect(mut self) {
        self.request(2, 0, 0, 0);
        // The server closes without a reply.
        let mut b = [0u8; 1];
        assert_eq!(self.s.read(&mut b).unwrap(), 0);
    }
}

/// The server closed the connection (a close with unread input arrives as a reset).
fn assert_closed(s: &mut TcpStream) {
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("connection still open: {other:?}"),
    }
}

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
