//! Cold random reads over a large remote target: streamboot `serve` against
//! qemu-storage-daemon exporting a qcow2 overlay whose backing file is the same HTTP
//! image (QEMU's curl driver) through a copy-on-read filter. Both are driven by the same
//! libblkio client with 4 KiB random reads at queue depth 1 and 16, one server after the
//! other, in the same run; nginx serves a sparse target on loopback and its access log
//! counts the bytes each server fetched.
//!
//! Printed per depth: IOPS of each server, the ratio streamboot / QEMU, and bytes fetched
//! per byte read (read amplification) of each. The target is sparse (zeros): both servers
//! still fetch every byte they read (neither knows the remote holes).
//!
//! Run: `cargo bench --bench cold_random`. Environment:
//! - `BENCH_TARGET_GB` (default 100): size of the sparse target;
//! - `BENCH_SECS` (default 5): measured seconds per server and depth;
//! - `BENCH_QSD=1`: also measure the QEMU side (off by default: in its first run here,
//!   qemu-storage-daemon over the curl backing file stalled and was not yet debugged);
//! - `QSD` (default /usr/bin/qemu-storage-daemon), `QEMU_IMG` (default
//!   /usr/bin/qemu-img): the QEMU side is skipped when either is missing.

#[path = "../tests/common/blkio_client.rs"]
mod blkio_client;
#[allow(dead_code)]
#[path = "../tests/common/nginx.rs"]
mod nginx;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use blkio_client::Client;
use nginx::Nginx;

const BLOCK: usize = 4096;
const DEPTHS: [usize; 2] = [1, 16];

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// IOPS over the measured part and reads completed in all (warm-up included).
struct Run {
    iops: f64,
    reads: u64,
}

/// 4 KiB random reads at `depth` for `secs` seconds (after 300 ms of warm-up).
fn random_reads(sock: &Path, size: u64, depth: usize, secs: u64, seed: u64) -> Run {
    let mut c = Client::connect(sock, 1, BLOCK * depth).expect("connect");
    let blocks = size / BLOCK as u64;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for slot in 0..depth {
        let o = rng.random_range(0..blocks) * BLOCK as u64;
        c.submit_read(0, o, slot * BLOCK, BLOCK, slot);
    }
    let warmup = Instant::now() + Duration::from_millis(300);
    let end = warmup + Duration::from_secs(secs);
    let (mut measured, mut reads, mut start) = (0u64, 0u64, None);
    while Instant::now() < end {
        if start.is_none() && Instant::now() >= warmup {
            start = Some(Instant::now());
            measured = 0;
        }
        for d in c.wait(0, 1).expect("do_io") {
            assert_eq!(d.ret, 0, "read failed");
            measured += 1;
            reads += 1;
            let o = rng.random_range(0..blocks) * BLOCK as u64;
            c.submit_read(0, o, d.user_data * BLOCK, BLOCK, d.user_data);
        }
    }
    let mut left = depth;
    while left > 0 {
        let n = c.wait(0, left).expect("drain").len().min(left);
        reads += n as u64;
        left -= n;
    }
    let secs = start.map_or(1.0, |s| s.elapsed().as_secs_f64());
    Run {
        iops: measured as f64 / secs,
        reads,
    }
}

fn wait_for_socket(path: &Path, child: &mut Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited: {status}");
        }
        assert!(Instant::now() < deadline, "{what}: socket never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn streamboot(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_streamboot"))
        .args(args)
        .output()
        .expect("run streamboot");
    assert!(
        out.status.success(),
        "streamboot {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A prepared, confirmed disk for `url` and a running `serve` on `sock`.
fn start_streamboot(dir: &Path, url: &str, sock: &Path) -> Child {
    let disk = dir.join("disk.img");
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut source = vec![0u8; 64 << 20];
    rng.fill(&mut source[..]);
    std::fs::write(&disk, &source).unwrap();
    let d = disk.to_str().unwrap();
    streamboot(&["prepare", d, "--target", url]);
    streamboot(&["confirm", d]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_streamboot"))
        .args(["serve", d, "--socket"])
        .arg(sock)
        .args(["--no-hydrate", "--allow-unsealed-memory"])
        .env("STREAMBOOT_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start serve");
    wait_for_socket(sock, &mut child, "streamboot serve");
    child
}

/// qemu-storage-daemon on a fresh qcow2 overlay of `url` with a copy-on-read filter.
fn start_qsd(qsd: &str, qemu_img: &str, dir: &Path, url: &str, sock: &Path) -> Child {
    let ov = dir.join("ov.qcow2");
    let st = Command::new(qemu_img)
        .args(["create", "-q", "-f", "qcow2", "-b", url, "-F", "raw"])
        .arg(&ov)
        .status()
        .expect("run qemu-img");
    assert!(st.success(), "qemu-img create failed");
    let mut child = Command::new(qsd)
        .arg("--blockdev")
        .arg(format!(
            "driver=qcow2,node-name=q,file.driver=file,file.filename={}",
            ov.display()
        ))
        .arg("--blockdev")
        .arg("driver=copy-on-read,node-name=cor,file=q")
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e,node-name=cor,addr.type=unix,addr.path={},writable=on,num-queues=1",
            sock.display()
        ))
        .stdout(Stdio::null())
        .spawn()
        .expect("start qemu-storage-daemon");
    wait_for_socket(sock, &mut child, "qemu-storage-daemon");
    child
}

fn stop(mut child: Child) {
    // SAFETY: sending a signal to our own child process by pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// IOPS and bytes fetched per byte read at each depth.
type Figures = Vec<(f64, f64)>;

fn measure(nginx: &Nginx, sock: &Path, size: u64, secs: u64) -> Figures {
    DEPTHS
        .iter()
        .map(|&depth| {
            let before = nginx.bytes_sent_total();
            let run = random_reads(sock, size, depth, secs, depth as u64);
            // nginx logs a request once it finished; the servers are idle now.
            std::thread::sleep(Duration::from_millis(200));
            let fetched = nginx.bytes_sent_total() - before;
            (run.iops, fetched as f64 / (run.reads * BLOCK as u64) as f64)
        })
        .collect()
}

fn main() {
    let size = env_u64("BENCH_TARGET_GB", 100) << 30;
    let secs = env_u64("BENCH_SECS", 5);
    let qsd = std::env::var("QSD").unwrap_or_else(|_| "/usr/bin/qemu-storage-daemon".into());
    let qemu_img = std::env::var("QEMU_IMG").unwrap_or_else(|_| "/usr/bin/qemu-img".into());
    let nginx = Nginx::start();
    let target: PathBuf = nginx.root().join("target.img");
    std::fs::File::create(&target)
        .and_then(|f| f.set_len(size))
        .expect("create the sparse target");
    let url = nginx.url("target.img");
    println!(
        "cold 4 KiB random reads over a {} GiB sparse target, {secs} s per run",
        size >> 30
    );

    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("sb.sock");
    let sb = start_streamboot(dir.path(), &url, &sock);
    let ours = measure(&nginx, &sock, size, secs);
    stop(sb);

    let want_qsd = std::env::var("BENCH_QSD").is_ok_and(|v| v == "1");
    let have_qsd = Path::new(&qsd).exists() && Path::new(&qemu_img).exists();
    let theirs = (want_qsd && have_qsd).then(|| {
        let sock = dir.path().join("qsd.sock");
        let q = start_qsd(&qsd, &qemu_img, dir.path(), &url, &sock);
        let f = measure(&nginx, &sock, size, secs);
        stop(q);
        f
    });

    println!(
        "{:<6} {:>14} {:>12} {:>8} {:>16} {:>14}",
        "depth", "streamboot", "qsd+CoR", "ratio", "fetched/read sb", "fetched/read q"
    );
    for (i, depth) in DEPTHS.iter().enumerate() {
        let (si, sa) = ours[i];
        match &theirs {
            Some(t) => {
                let (qi, qa) = t[i];
                println!(
                    "QD{depth:<4} {si:>10.0} IOPS {qi:>7.0} IOPS {:>7.2}x {sa:>16.1} {qa:>14.1}",
                    si / qi
                );
            }
            None => println!(
                "QD{depth:<4} {si:>10.0} IOPS {:>12} {:>8} {sa:>16.1}",
                "-", "-"
            ),
        }
    }
}
