//! Memory of `streamboot serve` over large targets: prepares a disk for a sparse 100 GiB
//! and a sparse 1 TiB target served by nginx on loopback (64 KiB chunks), runs `serve`,
//! reads random 4 KiB blocks at queue depth 16 through the libblkio client, and prints
//! VmRSS and VmHWM of the serve process (from `/proc/PID/status`) after start and after
//! the reads.
//!
//! Run: `cargo bench --bench rss`. Environment:
//! - `BENCH_SIZES_GB` (default `100,1024`): target sizes, comma-separated;
//! - `BENCH_READS` (default 4000): random 4 KiB reads per target.
//!
//! The disk file grows by the map (32 bytes per chunk: two copies of 16-byte entries,
//! about 520 MiB at 1 TiB) and is deleted at the end.

#[path = "../tests/common/blkio_client.rs"]
mod blkio_client;
#[allow(dead_code)]
#[path = "../tests/common/nginx.rs"]
mod nginx;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use blkio_client::Client;
use nginx::Nginx;

const BLOCK: usize = 4096;
const DEPTH: usize = 16;

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

/// (VmRSS, VmHWM) of process `pid` in KiB.
fn rss(pid: u32) -> (u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// `n` random 4 KiB reads at queue depth 16 over `size` bytes.
fn random_reads(sock: &Path, size: u64, n: u64, seed: u64) {
    let mut c = Client::connect(sock, 1, BLOCK * DEPTH).expect("connect");
    let blocks = size / BLOCK as u64;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut submitted = 0;
    for slot in 0..DEPTH {
        let o = rng.random_range(0..blocks) * BLOCK as u64;
        c.submit_read(0, o, slot * BLOCK, BLOCK, slot);
        submitted += 1;
    }
    let mut done = 0;
    while done < submitted {
        for d in c.wait(0, 1).expect("do_io") {
            assert_eq!(d.ret, 0, "read failed");
            done += 1;
            if submitted < n {
                let o = rng.random_range(0..blocks) * BLOCK as u64;
                c.submit_read(0, o, d.user_data * BLOCK, BLOCK, d.user_data);
                submitted += 1;
            }
        }
    }
}

fn wait_for_socket(path: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while !path.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("serve exited: {status}");
        }
        assert!(Instant::now() < deadline, "serve: socket never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
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

fn one(nginx: &Nginx, gib: u64, reads: u64) {
    let size = gib << 30;
    let name = format!("target-{gib}.img");
    let target = nginx.root().join(&name);
    std::fs::File::create(&target)
        .and_then(|f| f.set_len(size))
        .expect("create the sparse target");
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut source = vec![0u8; 64 << 20];
    rng.fill(&mut source[..]);
    std::fs::write(&disk, &source).unwrap();
    let d = disk.to_str().unwrap();
    streamboot(&["prepare", d, "--target", &nginx.url(&name)]);
    streamboot(&["confirm", d]);
    let sock = dir.path().join("sb.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_streamboot"))
        .args(["serve", d, "--socket"])
        .arg(&sock)
        .args(["--no-hydrate", "--allow-unsealed-memory"])
        .env("STREAMBOOT_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("start serve");
    wait_for_socket(&sock, &mut child);
    let (rss0, _) = rss(child.id());
    random_reads(&sock, size, reads, gib);
    let (rss1, hwm) = rss(child.id());
    stop(child);
    let _ = std::fs::remove_file(&target);
    let chunks = size >> 16;
    println!(
        "{gib:>6} GiB {chunks:>10} chunks   RSS after start {:>7.1} MiB   after {reads} reads {:>7.1} MiB   peak (VmHWM) {:>7.1} MiB",
        rss0 as f64 / 1024.0,
        rss1 as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
}

fn main() {
    let sizes: Vec<u64> = std::env::var("BENCH_SIZES_GB")
        .unwrap_or_else(|_| "100,1024".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let reads = std::env::var("BENCH_READS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4000);
    let nginx = Nginx::start();
    println!("streamboot serve memory, 64 KiB chunks, {reads} random 4 KiB reads at QD{DEPTH}");
    for gib in sizes {
        one(&nginx, gib, reads);
    }
}
