//! Data-path benchmark: streamboot's vhost-user-blk server over a `PlainDisk` against
//! `qemu-storage-daemon --export type=vhost-user-blk` (aio=threads) on the same raw file,
//! both driven by the same libblkio client (the `blkio` crate), one after the other.
//!
//! Workloads: 4 KiB random reads at queue depth 1 and 32, 1 MiB sequential reads at
//! queue depth 8. Prints both results and the ratio streamboot / qemu-storage-daemon;
//! absolute numbers drift from run to run on a shared machine, the ratio is the figure.
//!
//! Run: `cargo bench --bench vhost_vs_qsd`. Environment:
//! - `BENCH_SECS` (default 3): seconds per workload and server;
//! - `BENCH_SIZE_MB` (default 256): size of the raw file;
//! - `QSD` (default /usr/bin/qemu-storage-daemon): the daemon to compare with; the bench
//!   runs streamboot alone when it is missing.

#[path = "../tests/common/blkio_client.rs"]
mod blkio_client;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use blkio_client::Client;
use streamboot::plain::PlainDisk;
use streamboot::vhost::{ServeOptions, VhostBlkServer};

/// One workload: request size, queue depth, random or sequential offsets.
#[derive(Clone, Copy)]
struct Workload {
    name: &'static str,
    block: usize,
    depth: usize,
    random: bool,
}

const WORKLOADS: [Workload; 3] = [
    Workload {
        name: "4k-randread-qd1",
        block: 4096,
        depth: 1,
        random: true,
    },
    Workload {
        name: "4k-randread-qd32",
        block: 4096,
        depth: 32,
        random: true,
    },
    Workload {
        name: "1m-seqread-qd8",
        block: 1 << 20,
        depth: 8,
        random: false,
    },
];

/// Requests per second and bytes per second of one run.
#[derive(Clone, Copy, Default)]
struct Rate {
    iops: f64,
    bytes: f64,
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `w` for `secs` seconds against the server at `sock`.
fn run_workload(sock: &Path, size: u64, w: Workload, secs: u64) -> Rate {
    let mut c = Client::connect(sock, 1, w.block * w.depth).expect("connect");
    let blocks = size / w.block as u64;
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let mut next_seq = 0u64;
    let mut offset = |rng: &mut ChaCha8Rng| {
        let b = if w.random {
            rng.random_range(0..blocks)
        } else {
            next_seq = (next_seq + 1) % blocks;
            next_seq
        };
        b * w.block as u64
    };
    // Warm up, then measure.
    for slot in 0..w.depth {
        let o = offset(&mut rng);
        c.submit_read(0, o, slot * w.block, w.block, slot);
    }
    let mut done = 0u64;
    let warmup = Instant::now() + Duration::from_millis(300);
    let mut start = None;
    let end = warmup + Duration::from_secs(secs);
    loop {
        let now = Instant::now();
        if start.is_none() && now >= warmup {
            start = Some(now);
            done = 0;
        }
        if now >= end {
            break;
        }
        for d in c.wait(0, 1).expect("do_io") {
            assert_eq!(d.ret, 0, "read failed");
            done += 1;
            let o = offset(&mut rng);
            c.submit_read(0, o, d.user_data * w.block, w.block, d.user_data);
        }
    }
    // Drain what is still in flight before disconnecting.
    let mut left = w.depth;
    while left > 0 {
        left -= c.wait(0, left).expect("drain").len().min(left);
    }
    let elapsed = start.map_or(1.0, |s| s.elapsed().as_secs_f64());
    let iops = done as f64 / elapsed;
    Rate {
        iops,
        bytes: iops * w.block as f64,
    }
}

fn make_image(dir: &Path, size: u64) -> PathBuf {
    let path = dir.join("disk.raw");
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut chunk = vec![0u8; 1 << 20];
    let file = std::fs::File::create(&path).unwrap();
    use std::os::unix::fs::FileExt;
    for i in 0..size >> 20 {
        rng.fill(&mut chunk[..]);
        file.write_all_at(&chunk, i << 20).unwrap();
    }
    file.sync_all().unwrap();
    path
}

fn wait_for_socket(path: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("qemu-storage-daemon exited: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "qemu-storage-daemon socket never appeared"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

fn start_qsd(qsd: &Path, image: &Path, sock: &Path) -> Child {
    let mut child = Command::new(qsd)
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f,filename={},aio=threads",
            image.display()
        ))
        .arg("--blockdev")
        .arg("driver=raw,node-name=d,file=f")
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path={},writable=on,num-queues=1",
            sock.display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start qemu-storage-daemon");
    wait_for_socket(sock, &mut child);
    child
}

fn human(bytes: f64) -> String {
    if bytes >= (1u64 << 30) as f64 {
        format!("{:.2} GiB/s", bytes / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB/s", bytes / (1u64 << 20) as f64)
    }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing useful either:
    // only run the measurement under `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        println!("vhost_vs_qsd: run with `cargo bench --bench vhost_vs_qsd`");
        return;
    }
    let secs = env_u64("BENCH_SECS", 3);
    let size = env_u64("BENCH_SIZE_MB", 256) << 20;
    let qsd = PathBuf::from(
        std::env::var("QSD").unwrap_or_else(|_| "/usr/bin/qemu-storage-daemon".into()),
    );
    let dir = tempfile::tempdir().unwrap();
    let image = make_image(dir.path(), size);

    let sb_sock = dir.path().join("streamboot.sock");
    let disk = Arc::new(PlainDisk::open(&image, false).unwrap());
    let server = VhostBlkServer::bind(disk, ServeOptions::new(&sb_sock)).unwrap();
    let shutdown = server.shutdown_handle();
    let sb = thread::spawn(move || server.run());

    let qsd_sock = dir.path().join("qsd.sock");
    let mut qsd_child = qsd.exists().then(|| start_qsd(&qsd, &image, &qsd_sock));
    if qsd_child.is_none() {
        println!("{} not found: measuring streamboot only", qsd.display());
    }

    println!(
        "image {} MiB (page cache), {secs} s per run, 1 queue, blkio client",
        size >> 20
    );
    println!(
        "{:<18} {:>14} {:>12} {:>14} {:>12} {:>7}",
        "workload", "streamboot", "", "qsd", "", "ratio"
    );
    for (i, w) in WORKLOADS.into_iter().enumerate() {
        // Alternate which server goes first per workload, to spread drift evenly.
        let with_qsd = qsd_child.is_some();
        let (sb_rate, qsd_rate) = if i % 2 == 0 || !with_qsd {
            let sb = run_workload(&sb_sock, size, w, secs);
            (sb, with_qsd.then(|| run_workload(&qsd_sock, size, w, secs)))
        } else {
            let q = run_workload(&qsd_sock, size, w, secs);
            (run_workload(&sb_sock, size, w, secs), Some(q))
        };
        let (q_iops, q_bw, ratio) = match qsd_rate {
            Some(q) => (
                format!("{:.0} IOPS", q.iops),
                human(q.bytes),
                format!("{:.2}", sb_rate.iops / q.iops),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            "{:<18} {:>14} {:>12} {:>14} {:>12} {:>7}",
            w.name,
            format!("{:.0} IOPS", sb_rate.iops),
            human(sb_rate.bytes),
            q_iops,
            q_bw,
            ratio
        );
    }

    shutdown.shutdown();
    sb.join().unwrap().unwrap();
    if let Some(child) = qsd_child.as_mut() {
        let _ = child.kill();
        let _ = child.wait();
    }
}
