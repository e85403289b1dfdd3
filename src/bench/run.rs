//! One run of the bench: a fresh streamed disk behind a fresh proxy, the guest's workload,
//! and the figures (from the guest, serve's control API and the proxy).

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;
use serde_json::Value;

use super::proxy::{Proxy, Snapshot};
use super::stats::Percentiles;
use super::{workload, BenchError, BenchOptions, Hooks, Machine, Ops, RunConfig, Strategy};
use crate::control::client;

/// Longest wait for serve's ready line, for serve to stop, and for counts to settle.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// How often serve's fetch counters are sampled for the timeline.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// Serve's fetch counters at one moment: (seconds since serve start, demand, background).
pub type FetchSample = (f64, u64, u64);

/// The figures of one run (one JSON object per run).
#[derive(Clone, Debug, Serialize)]
pub struct RunResult {
    /// Always `"run"` (tells run lines from summary lines).
    pub kind: &'static str,
    /// `strategy/chunk size/network`.
    pub run: String,
    pub round: u32,
    pub strategy: Strategy,
    pub chunk_size: u64,
    pub network: String,
    pub rtt_ms: f64,
    pub bandwidth_bytes_per_sec: Option<u64>,
    pub workload: &'static str,
    pub block_size: usize,
    pub queue_depth: usize,
    /// Reads completed.
    pub ops: u64,
    /// Serve start (spawn) to its ready line.
    pub serve_ready_ms: f64,
    /// Serve start to the first guest read's completion.
    pub time_to_first_read_ms: Option<f64>,
    /// How long that first read took.
    pub first_read_latency_ms: Option<f64>,
    /// Serve start to the last read's completion.
    pub time_to_finish_ms: f64,
    pub latency_ms: Percentiles,
    pub bytes_read: u64,
    /// Serve's count (control API): on demand + in the background.
    pub bytes_fetched: u64,
    pub bytes_fetched_demand: u64,
    pub bytes_fetched_background: u64,
    /// The proxy's count of image bytes (response bodies, the open's 1-byte probes aside).
    pub proxy_bytes_fetched: u64,
    /// `bytes_fetched == proxy_bytes_fetched` (and every response body could be counted).
    pub fetch_counts_agree: bool,
    /// bytes_fetched / bytes_read.
    pub read_amplification: Option<f64>,
    /// HTTP requests the origin got while serving (probes included).
    pub origin_requests: u64,
    pub origin_probe_requests: u64,
    /// Bytes the origin sent while serving (headers included).
    pub origin_wire_bytes: u64,
    /// Serve's own count of fetch requests.
    pub serve_fetch_requests: u64,
    pub prepare_origin_requests: u64,
    pub prepare_origin_wire_bytes: u64,
    pub machine: Machine,
    /// Serve's fetch counters over time (for the report; not in the JSON).
    #[serde(skip)]
    pub fetch_samples: Vec<FetchSample>,
    /// (seconds since serve start, latency ms) per read (for the report; not in the JSON).
    #[serde(skip)]
    pub latencies: Vec<(f64, f64)>,
}

/// `http://HOST[:PORT]/PATH` → (origin address, `HOST[:PORT]`, `/PATH`).
pub fn split_target(url: &str) -> Result<(SocketAddr, String, String), BenchError> {
    let bad = |why: &str| BenchError::Usage(format!("--target {url:?}: {why}"));
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| bad("must be an http:// URL (the bench's proxy forwards plain HTTP)"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(bad("needs a host (and no user:password@)"));
    }
    let with_port = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let addr = with_port
        .to_socket_addrs()
        .map_err(|e| bad(&format!("cannot resolve {authority}: {e}")))?
        .next()
        .ok_or_else(|| bad(&format!("{authority} has no address")))?;
    Ok((addr, authority.to_string(), path.to_string()))
}

/// The target's size: `Range: bytes=0-0` to `addr` (the run's proxy, so the request is
/// counted with prepare's), read from the answer's `Content-Range: bytes 0-0/SIZE`.
fn target_size(addr: SocketAddr, path: &str, url: &str) -> Result<u64, BenchError> {
    use std::io::Write;
    let fail = |reason: String| BenchError::TargetSize {
        url: url.to_string(),
        reason,
    };
    let mut c = std::net::TcpStream::connect_timeout(&addr, STEP_TIMEOUT)
        .map_err(|e| fail(e.to_string()))?;
    c.set_read_timeout(Some(STEP_TIMEOUT))
        .map_err(|e| fail(e.to_string()))?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nRange: bytes=0-0\r\nConnection: close\r\n\r\n"
    );
    c.write_all(req.as_bytes())
        .map_err(|e| fail(e.to_string()))?;
    let mut answer = Vec::new();
    // The header block (and the 1-byte body): at most 64 KiB.
    (&mut c)
        .take(64 << 10)
        .read_to_end(&mut answer)
        .map_err(|e| fail(e.to_string()))?;
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    resp.parse(&answer).map_err(|e| fail(e.to_string()))?;
    if resp.code != Some(206) {
        return Err(fail(format!(
            "answered {:?} to a range request (expected 206)",
            resp.code
        )));
    }
    resp.headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-range"))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .and_then(|v| v.rsplit_once('/'))
        .and_then(|(_, n)| n.trim().parse::<u64>().ok())
        .filter(|&n| n > 0)
        .ok_or_else(|| fail("no Content-Range with the size".into()))
}

/// The last lines of a log file, on one line.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join(" | ")
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BenchError + '_ {
    move |source| BenchError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A `serve` child process, stopped (SIGTERM, then SIGKILL) when dropped.
struct ServeProc {
    child: Child,
    log: PathBuf,
}

impl ServeProc {
    /// SIGTERM and wait; an exit other than 0 is an error naming the log.
    fn stop(mut self) -> Result<(), BenchError> {
        let status = self.terminate();
        match status {
            Some(s) if s.success() => Ok(()),
            other => Err(BenchError::Step {
                what: format!("serve (exit {other:?})"),
                log: self.log.clone(),
                tail: tail(&self.log),
            }),
        }
    }

    fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        if let Ok(Some(s)) = self.child.try_wait() {
            return Some(s);
        }
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) on our own child's pid (not reaped yet, so not reused).
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let end = Instant::now() + STEP_TIMEOUT;
        while Instant::now() < end {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        self.child.wait().ok()
    }
}

impl Drop for ServeProc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.terminate();
        }
    }
}

/// Runs `exe prepare` on `disk` through the proxy URL.
fn prepare(
    o: &BenchOptions,
    dir: &Path,
    disk: &Path,
    url: &str,
    cfg: &RunConfig,
) -> Result<(), BenchError> {
    let log = dir.join("prepare.log");
    let out = std::fs::File::create(&log).map_err(io(&log))?;
    let err = out.try_clone().map_err(io(&log))?;
    let mut cmd = Command::new(&o.exe);
    cmd.arg("prepare").arg(disk).args([
        "--target",
        url,
        "--chunk-size",
        &cfg.chunk_size.to_string(),
    ]);
    if cfg.strategy == Strategy::Staged {
        if let Some(p) = &o.boot_profile {
            cmd.arg("--boot-profile").arg(p);
        }
    }
    let status = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .status()
        .map_err(|source| BenchError::Spawn {
            what: format!("{} prepare", o.exe.display()),
            source,
        })?;
    if !status.success() {
        return Err(BenchError::Step {
            what: "prepare".into(),
            log: log.clone(),
            tail: tail(&log),
        });
    }
    Ok(())
}

/// Spawns `exe serve` and waits for its ready line; returns it with the time it took.
fn serve(
    o: &BenchOptions,
    dir: &Path,
    disk: &Path,
    cfg: &RunConfig,
) -> Result<ServeProc, BenchError> {
    let log = dir.join("serve.log");
    let err = std::fs::File::create(&log).map_err(io(&log))?;
    let mut cmd = Command::new(&o.exe);
    cmd.args(["--json", "serve"])
        .arg(disk)
        .arg("--socket")
        .arg(dir.join("vhost.sock"))
        .arg("--control")
        .arg(dir.join("control.sock"))
        .arg("--allow-unsealed-memory")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(err);
    if cfg.strategy != Strategy::Hydrate {
        cmd.arg("--no-hydrate");
    }
    let mut child = cmd.spawn().map_err(|source| BenchError::Spawn {
        what: format!("{} serve", o.exe.display()),
        source,
    })?;
    let stdout = child.stdout.take();
    let mut proc = ServeProc { child, log };
    let (tx, rx) = std::sync::mpsc::channel();
    if let Some(stdout) = stdout {
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut line = String::new();
            let _ = r.read_line(&mut line);
            let _ = tx.send(line);
            // Keep reading so serve never blocks on a full pipe.
            let _ = std::io::copy(&mut r.take(u64::MAX), &mut std::io::sink());
        });
    }
    let line = rx.recv_timeout(STEP_TIMEOUT).unwrap_or_default();
    let ready = serde_json::from_str::<Value>(&line)
        .ok()
        .is_some_and(|v| v["event"] == "ready");
    if !ready {
        proc.terminate();
        return Err(BenchError::Step {
            what: "serve".into(),
            log: proc.log.clone(),
            tail: tail(&proc.log),
        });
    }
    Ok(proc)
}

/// Serve's fetch counters: (demand, background, fetch requests).
fn fetched(ctl: &Path) -> Result<(u64, u64, u64), BenchError> {
    let v = client::get_status(ctl).map_err(BenchError::Control)?;
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    Ok((
        n("bytes_fetched_demand"),
        n("bytes_fetched_background"),
        n("fetch_requests"),
    ))
}

/// Samples serve's fetch counters until dropped.
struct Sampler {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<FetchSample>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(ctl: PathBuf, t0: Instant) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (s, v) = (stop.clone(), samples.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Relaxed) {
                if let Ok((d, b, _)) = fetched(&ctl) {
                    v.lock().push((t0.elapsed().as_secs_f64(), d, b));
                }
                std::thread::sleep(SAMPLE_EVERY);
            }
        });
        Self {
            stop,
            samples,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<FetchSample> {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::mem::take(&mut self.samples.lock())
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
    }
}

/// Waits until serve's fetched bytes equal the proxy's count (nothing in flight) or
/// `STEP_TIMEOUT` passes; returns serve's last counters.
fn settle(ctl: &Path, proxy: &Proxy, pre: &Snapshot) -> Result<(u64, u64, u64), BenchError> {
    let end = Instant::now() + STEP_TIMEOUT;
    let mut last = None;
    loop {
        let now = fetched(ctl)?;
        let proxied = proxy.snapshot().since(pre).body_bytes;
        if (now.0 + now.1 == proxied && last == Some(now)) || Instant::now() >= end {
            return Ok(now);
        }
        last = Some(now);
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Measures one configuration: its own disk, proxy and serve in `work/run-I-rR`.
pub fn run_one(
    o: &BenchOptions,
    cfg: &RunConfig,
    round: u32,
    index: usize,
    machine: &Machine,
    hooks: &dyn Hooks,
) -> Result<RunResult, BenchError> {
    let (origin, host, path) = split_target(&o.target)?;
    let replay = match &o.workload {
        super::WorkloadKind::Replay(p) => {
            let prof = crate::profile::BootProfile::load(p).map_err(BenchError::Profile)?;
            let cs = prof.chunk_size;
            Some(prof.chunks.iter().map(|&c| (c * cs, cs)).collect())
        }
        _ => None,
    };
    let dir = o.work.join(format!("run-{index}-r{round}"));
    // The work directory was empty: a run's directory is new (nothing is overwritten).
    std::fs::create_dir(&dir).map_err(io(&dir))?;
    let proxy = Proxy::start(origin, &host, cfg.network.link).map_err(BenchError::Proxy)?;
    let url = format!("http://{}{path}", proxy.addr());
    // The source disk: sparse zeros of the target's size (a partition table of the target
    // must fit the disk).
    let disk = dir.join("disk.img");
    let size = target_size(proxy.addr(), &path, &o.target)?;
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(size))
        .map_err(io(&disk))?;
    prepare(o, &dir, &disk, &url, cfg)?;
    let pre = proxy.snapshot();

    let ctl = dir.join("control.sock");
    let t0 = Instant::now();
    let served = serve(o, &dir, &disk, cfg)?;
    let serve_ready_ms = t0.elapsed().as_secs_f64() * 1e3;
    let sampler = Sampler::start(ctl.clone(), t0);
    let mut ops = Ops::new(o, replay);
    let total = o.count;
    let w = workload::run(
        &dir.join("vhost.sock"),
        &mut ops,
        o.block_size,
        o.queue_depth,
        &|d| hooks.progress(d, total),
    )?;
    if cfg.strategy == Strategy::Hydrate {
        client::set_hydration(&ctl, Some(true), None).map_err(BenchError::Control)?;
    }
    let (demand, background, requests) = settle(&ctl, &proxy, &pre)?;
    let fetch_samples = sampler.finish();
    served.stop()?;
    // Serve's connections close with it; then the origin has sent all it will.
    let end = Instant::now() + STEP_TIMEOUT;
    while proxy.snapshot().open_connections > 0 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    let wire = proxy.snapshot().since(&pre);
    drop(proxy);
    let ms = |t: Instant| t.duration_since(t0).as_secs_f64() * 1e3;
    let offset = w.start.duration_since(t0).as_secs_f64();
    let bytes_fetched = demand + background;
    let result = RunResult {
        kind: "run",
        run: cfg.name(),
        round,
        strategy: cfg.strategy,
        chunk_size: cfg.chunk_size,
        network: cfg.network.name.clone(),
        rtt_ms: cfg.network.link.rtt.as_secs_f64() * 1e3,
        bandwidth_bytes_per_sec: cfg.network.link.bytes_per_sec,
        workload: o.workload.name(),
        block_size: o.block_size,
        queue_depth: o.queue_depth,
        ops: w.ops,
        serve_ready_ms,
        time_to_first_read_ms: w.first_done.map(ms),
        first_read_latency_ms: w.first_latency.map(|d| d.as_secs_f64() * 1e3),
        time_to_finish_ms: ms(w.end),
        latency_ms: Percentiles::of(w.latencies.iter().map(|l| l.1)),
        bytes_read: w.bytes_read,
        bytes_fetched,
        bytes_fetched_demand: demand,
        bytes_fetched_background: background,
        proxy_bytes_fetched: wire.body_bytes,
        fetch_counts_agree: bytes_fetched == wire.body_bytes && wire.uncounted_responses == 0,
        read_amplification: (w.bytes_read > 0).then(|| bytes_fetched as f64 / w.bytes_read as f64),
        origin_requests: wire.requests,
        origin_probe_requests: wire.probes,
        origin_wire_bytes: wire.from_origin,
        serve_fetch_requests: requests,
        prepare_origin_requests: pre.requests,
        prepare_origin_wire_bytes: pre.from_origin,
        machine: machine.clone(),
        fetch_samples,
        latencies: w.latencies.iter().map(|&(t, l)| (t + offset, l)).collect(),
    };
    let _ = std::fs::remove_file(&disk);
    Ok(result)
}
