//! Data-path benchmark: streamboot's vhost-user-blk server against
//! `qemu-storage-daemon --export type=vhost-user-blk` (aio=threads), all driven by the
//! same libblkio client (the `blkio` crate), one server after the other.
//!
//! Three servers read the same target bytes:
//! - `plain`: streamboot over a [`PlainDisk`] on the raw file;
//! - `engine`: streamboot over an [`Engine`] on a prepared disk whose target was fully
//!   hydrated from the raw file (a [`FileSource`]), so every chunk is local (64 KiB
//!   chunks, most of them in released-area slots);
//! - `qsd`: qemu-storage-daemon on the raw file.
//!
//! Workloads: 4 KiB random reads at queue depth 1 and 32, 1 MiB sequential reads at
//! queue depth 8. Each workload runs `BENCH_RUNS` times per server (the server order
//! rotates from run to run to spread drift); the median of the runs is printed with the
//! ratios streamboot / qemu-storage-daemon. Absolute numbers drift from run to run on a
//! shared machine; the ratios are the figures.
//!
//! Run: `cargo bench --bench vhost_vs_qsd`. Environment:
//! - `BENCH_SECS` (default 2): seconds per run;
//! - `BENCH_RUNS` (default 3): runs per workload and server;
//! - `BENCH_SIZE_MB` (default 256): size of the raw file;
//! - `BENCH_ONLY`: comma-separated workload names to run instead of the first three
//!   (`1m-seqread-qd1`, sequential 1 MiB reads one at a time, runs only when named);
//! - `BENCH_VERBOSE`: also print every run;
//! - `QSD` (default /usr/bin/qemu-storage-daemon): the daemon to compare with; the bench
//!   measures streamboot alone when it is missing.

#[path = "../tests/common/blkio_client.rs"]
mod blkio_client;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use boot_relocator::{relocate, FileStorage, MetaStore, PrepareSpec, Storage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use blkio_client::Client;
use streamboot::blockdev::BlockBackend;
use streamboot::engine::{Engine, EngineOptions, HydrateOptions, Hydrator};
use streamboot::plain::PlainDisk;
use streamboot::source::{FileSource, RemoteSource};
use streamboot::target::target_record;
use streamboot::vhost::{ServeOptions, ShutdownHandle, VhostBlkServer};

/// One workload: request size, queue depth, random or sequential offsets.
#[derive(Clone, Copy)]
struct Workload {
    name: &'static str,
    block: usize,
    depth: usize,
    random: bool,
}

/// The workloads; the first three run by default.
const WORKLOADS: [Workload; 4] = [
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
    Workload {
        name: "1m-seqread-qd1",
        block: 1 << 20,
        depth: 1,
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

/// Chunk size of the engine's prepared disk (the `prepare` default).
const CHUNK_SIZE: u64 = 64 << 10;

/// Prepares a disk for the target `image` (a file source), hydrates every chunk and
/// returns the engine over it.
fn hydrated_engine(dir: &Path, image: &Path) -> Engine {
    let disk = dir.join("prepared.img");
    // The "source" image the disk held before: 16 MiB of filler; the released area
    // grows the file to hold the whole target.
    std::fs::write(&disk, vec![0x11u8; 16 << 20]).unwrap();
    let src: Arc<dyn RemoteSource> = Arc::new(FileSource::open(image, None).unwrap());
    let spec = PrepareSpec {
        chunk_size: CHUNK_SIZE,
        target_size: src.size(),
        target: target_record(src.as_ref(), &[image.display().to_string()]),
        boot_ranges: std::iter::once(0..1 << 20).collect(),
        area_size: None,
        source_size: None,
        max_trial_starts: 3,
        area: None,
        discard_free_space: false,
    };
    let mut head = vec![0u8; 1 << 20];
    src.read_at(0, &mut head).unwrap();
    let st: Arc<dyn Storage> = Arc::new(FileStorage::open(&disk, true).unwrap());
    let plan = relocate::plan(st.as_ref(), &spec, &head).unwrap();
    let meta = relocate::prepare(
        st,
        &spec,
        &plan,
        [1; 16],
        0,
        &mut |o, b| src.read_at(o, b).map_err(|e| e.to_string()),
        &mut |_, _, _| {},
    )
    .unwrap();
    drop(meta);
    let st: Arc<dyn Storage> = Arc::new(FileStorage::open(&disk, true).unwrap());
    let engine = Engine::new(
        MetaStore::open(st).unwrap().unwrap(),
        src,
        EngineOptions::default(),
    )
    .unwrap();
    let report = Hydrator::new(HydrateOptions::default(), 0)
        .run(&engine, &|_, _| {})
        .unwrap();
    assert_eq!(report.missing, 0, "hydration left chunks missing");
    engine.flush().unwrap();
    let size = engine.capacity();
    assert!(engine.is_local(0, size), "hydrated engine is not all local");
    engine
}

/// Serves `disk` on `sock` in a thread; returns the handle to stop it.
fn start_streamboot(
    disk: Arc<dyn BlockBackend>,
    sock: &Path,
) -> (ShutdownHandle, thread::JoinHandle<()>) {
    let mut opts = ServeOptions::new(sock);
    opts.allow_unsealed_memory = true; // libblkio does not seal its buffers
    let server = VhostBlkServer::bind(disk, opts).unwrap();
    let shutdown = server.shutdown_handle();
    let thread = thread::spawn(move || {
        server.run().unwrap();
    });
    (shutdown, thread)
}

/// Reads a few blocks through `sock` and compares them with the raw image.
fn check_data(sock: &Path, image: &Path, size: u64) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(image).unwrap();
    let len = 1 << 20;
    let mut c = Client::connect(sock, 1, len).expect("connect");
    let mut want = vec![0u8; len];
    for offset in [0, size / 2 + 4096, size - len as u64] {
        file.read_exact_at(&mut want, offset).unwrap();
        assert_eq!(c.read(offset, 0, len), 0, "check read failed");
        assert!(
            c.buf(0..len) == &want[..],
            "{} serves wrong data at {offset}",
            sock.display()
        );
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing useful either:
    // only run the measurement under `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        println!("vhost_vs_qsd: run with `cargo bench --bench vhost_vs_qsd`");
        return;
    }
    let secs = env_u64("BENCH_SECS", 2);
    let runs = env_u64("BENCH_RUNS", 3).max(1) as usize;
    let size = env_u64("BENCH_SIZE_MB", 256) << 20;
    let qsd = PathBuf::from(
        std::env::var("QSD").unwrap_or_else(|_| "/usr/bin/qemu-storage-daemon".into()),
    );
    let dir = tempfile::tempdir().unwrap();
    let image = make_image(dir.path(), size);

    let plain_sock = dir.path().join("plain.sock");
    let plain = Arc::new(PlainDisk::open(&image, false).unwrap());
    let plain_server = start_streamboot(plain, &plain_sock);

    let t = Instant::now();
    let engine = Arc::new(hydrated_engine(dir.path(), &image));
    eprintln!(
        "engine: prepared and hydrated {} MiB in {:.1} s",
        size >> 20,
        t.elapsed().as_secs_f64()
    );
    let engine_sock = dir.path().join("engine.sock");
    let engine_server = start_streamboot(engine, &engine_sock);

    let qsd_sock = dir.path().join("qsd.sock");
    let mut qsd_child = qsd.exists().then(|| start_qsd(&qsd, &image, &qsd_sock));
    if qsd_child.is_none() {
        println!("{} not found: measuring streamboot only", qsd.display());
    }

    let mut servers: Vec<(&str, &Path)> = vec![("plain", &plain_sock), ("engine", &engine_sock)];
    if qsd_child.is_some() {
        servers.push(("qsd", &qsd_sock));
    }
    for (_, sock) in &servers {
        check_data(sock, &image, size);
    }

    println!(
        "image {} MiB (page cache), {secs} s per run, median of {runs} runs, 1 queue, \
         blkio client",
        size >> 20
    );
    println!(
        "{:<17} {:>11} {:>12} {:>11} {:>12} {:>11} {:>12} {:>7} {:>7}",
        "workload", "plain", "", "engine", "", "qsd", "", "pl/qsd", "en/qsd"
    );
    let only = std::env::var("BENCH_ONLY").ok();
    let selected: Vec<Workload> = match &only {
        Some(names) => WORKLOADS
            .into_iter()
            .filter(|w| names.split(',').any(|n| n.trim() == w.name))
            .collect(),
        None => WORKLOADS[..3].to_vec(),
    };
    for w in selected {
        let mut rates: Vec<Vec<Rate>> = vec![Vec::new(); servers.len()];
        for run in 0..runs {
            // Rotate which server goes first, to spread drift evenly.
            for k in 0..servers.len() {
                let s = (run + k) % servers.len();
                rates[s].push(run_workload(servers[s].1, size, w, secs));
            }
        }
        let med: Vec<Rate> = rates
            .iter()
            .map(|r| {
                let iops = median(r.iter().map(|x| x.iops).collect());
                Rate {
                    iops,
                    bytes: iops * w.block as f64,
                }
            })
            .collect();
        let cell = |i: usize| match med.get(i) {
            Some(r) => (format!("{:.0} IOPS", r.iops), human(r.bytes)),
            None => ("-".into(), "-".into()),
        };
        let ratio = |i: usize| match med.get(2) {
            Some(q) => format!("{:.2}", med[i].iops / q.iops),
            None => "-".into(),
        };
        let (p, e, q) = (cell(0), cell(1), cell(2));
        println!(
            "{:<17} {:>11} {:>12} {:>11} {:>12} {:>11} {:>12} {:>7} {:>7}",
            w.name,
            p.0,
            p.1,
            e.0,
            e.1,
            q.0,
            q.1,
            ratio(0),
            ratio(1)
        );
        if std::env::var_os("BENCH_VERBOSE").is_some() {
            for (s, r) in servers.iter().zip(&rates) {
                let all: Vec<String> = r.iter().map(|x| format!("{:.0}", x.iops)).collect();
                println!("  {:<8} runs (IOPS): {}", s.0, all.join(" "));
            }
        }
    }

    for (shutdown, thread) in [plain_server, engine_server] {
        shutdown.shutdown();
        thread.join().unwrap();
    }
    if let Some(child) = qsd_child.as_mut() {
        let _ = child.kill();
        let _ = child.wait();
    }
}
