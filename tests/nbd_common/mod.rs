//! Shared by the NBD export tests: publishing a store, running the real `streamboot
//! export`, and a small NBD client written from the protocol.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::store_common::{image_a, image_b};

pub const BIN: &str = env!("CARGO_BIN_EXE_streamboot");

pub fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

pub fn run_ok(args: &[&str]) {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "streamboot {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A store in `dir/store` holding image A as `a` and image B as `b`, signed with
/// `dir/key.key`; returns the images.
pub fn publish_store(dir: &Path, sign: bool) -> (Vec<u8>, Vec<u8>) {
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
pub struct Export {
    pub child: Child,
    pub port: u16,
}

impl Export {
    pub fn start(args: &[&str]) -> Result<Export, String> {
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

    pub fn url(&self, name: &str) -> String {
        format!("nbd://127.0.0.1:{}/{name}", self.port)
    }

    /// SIGTERM; the server must exit 0.
    pub fn stop(mut self) {
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

pub fn qemu_img_convert(url: &str, out: &Path) -> Vec<u8> {
    let st = Command::new("timeout")
        .args(["300", "qemu-img", "convert", "-f", "raw", "-O", "raw", url])
        .arg(out)
        .status()
        .unwrap();
    assert!(st.success(), "qemu-img convert {url}: {st}");
    std::fs::read(out).unwrap()
}

pub fn qemu_img_size(url: &str) -> u64 {
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

pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;

pub struct Client {
    pub s: TcpStream,
}

impl Client {
    /// Connects and does the greeting (fixed newstyle, no zeroes).
    pub fn connect(port: u16) -> Client {
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

    pub fn option(&mut self, opt: u32, data: &[u8]) {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend(opt.to_be_bytes());
        m.extend((data.len() as u32).to_be_bytes());
        m.extend(data);
        self.s.write_all(&m).unwrap();
    }

    /// One option reply: (type, data).
    pub fn reply(&mut self) -> (u32, Vec<u8>) {
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

    pub fn list(&mut self) -> Vec<String> {
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
    pub fn go(&mut self, name: &str) -> Result<u64, u32> {
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

    pub fn request(&mut self, kind: u16, cookie: u64, offset: u64, len: u32) {
        let mut m = 0x2560_9513u32.to_be_bytes().to_vec();
        m.extend(0u16.to_be_bytes());
        m.extend(kind.to_be_bytes());
        m.extend(cookie.to_be_bytes());
        m.extend(offset.to_be_bytes());
        m.extend(len.to_be_bytes());
        self.s.write_all(&m).unwrap();
    }

    /// A simple reply: (error, cookie).
    pub fn simple_reply(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(u32::from_be_bytes(h[..4].try_into().unwrap()), 0x6744_6698);
        (
            u32::from_be_bytes(h[4..8].try_into().unwrap()),
            u64::from_be_bytes(h[8..16].try_into().unwrap()),
        )
    }

    /// Reads `len` bytes at `offset`: Ok(data) or Err(errno).
    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
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
    pub fn read_all(&mut self, size: u64, step: u32) -> Vec<u8> {
        let mut out = Vec::with_capacity(size as usize);
        let mut off = 0;
        while off < size {
            let n = (size - off).min(step.into()) as u32;
            out.extend(self.read(off, n).unwrap());
            off += u64::from(n);
        }
        out
    }

    pub fn disconnect(mut self) {
        self.request(2, 0, 0, 0);
        // The server closes without a reply.
        let mut b = [0u8; 1];
        assert_eq!(self.s.read(&mut b).unwrap(), 0);
    }
}

/// The server closed the connection (a close with unread input arrives as a reset).
pub fn assert_closed(s: &mut TcpStream) {
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("connection still open: {other:?}"),
    }
}
