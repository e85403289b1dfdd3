//! `streamboot bench`: measures a workload on a streamed disk, for several strategies and
//! emulated networks side by side.
//!
//! Each *run* (strategy × chunk size × network, repeated for `rounds`, rounds interleaved)
//! sets up its own streamed disk in a scratch directory: a sparse source disk file,
//! `streamboot prepare --target URL` and `streamboot serve` (this executable, spawned as
//! child processes), with the origin reached through the bench's [`proxy`] (delay,
//! bandwidth cap, byte and request counts). The guest is libblkio's vhost-user-blk client
//! ([`workload`]); [`run`] measures one run, [`report`] draws the HTML/SVG report.

pub mod http_count;
pub mod proxy;
pub mod report;
mod run;
pub mod stats;
#[cfg_attr(not(feature = "demo-blkio"), path = "workload_stub.rs")]
mod workload;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde::Serialize;

pub use proxy::Link;
pub use run::{run_one, split_target};

/// Whether this build has the bench's guest (libblkio; the `demo-blkio` feature).
pub const BUILT_IN: bool = cfg!(feature = "demo-blkio");

/// Errors of the bench.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(
        "streamboot bench is not built in: this build has no blkio client (built without the \
         `demo-blkio` feature)"
    )]
    NotBuiltIn,
    /// A bad option value (the CLI reports it as a usage error).
    #[error("{0}")]
    Usage(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The origin does not accept connections (checked before the first run).
    #[error("cannot connect to the origin {addr}")]
    Origin {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The target's size could not be learnt (a `Range: bytes=0-0` request).
    #[error("size of the target {url}: {reason}")]
    TargetSize { url: String, reason: String },
    #[error("bench proxy")]
    Proxy(#[source] std::io::Error),
    #[error("cannot run {what}")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} failed (log {}): {tail}", log.display())]
    Step {
        what: String,
        log: PathBuf,
        tail: String,
    },
    #[error("control API of the bench's serve")]
    Control(#[source] crate::control::client::ClientError),
    #[cfg(feature = "demo-blkio")]
    #[error("blkio {what}")]
    Blkio {
        what: &'static str,
        #[source]
        source: blkio::Error,
    },
    #[error("vhost-user socket path is not UTF-8")]
    NotUtf8,
    #[error("guest: {0}")]
    Guest(String),
    #[error("--profile")]
    Profile(#[source] crate::profile::ProfileError),
    #[error("timed out: {0}")]
    Timeout(String),
}

/// How the streamed disk is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// On demand only (`serve --no-hydrate`).
    Cold,
    /// With background hydration (serve's default).
    Hydrate,
    /// The boot profile's chunks placed home by prepare (`--boot-profile`), then on
    /// demand only.
    Staged,
}

impl Strategy {
    /// The name used on the command line and in results.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Cold => "cold",
            Strategy::Hydrate => "hydrate",
            Strategy::Staged => "staged",
        }
    }
}

/// A named network profile.
#[derive(Clone, Debug, PartialEq)]
pub struct Network {
    /// As given: `loopback`, `rtt=20ms`, `rtt=20ms,bw=100M`.
    pub name: String,
    pub link: Link,
}

/// Parses `loopback` or `rtt=DURATION[,bw=RATE]` (RATE in bits per second, suffixes
/// K/M/G decimal, e.g. `100M`; `bw=` alone with `loopback` is `rtt=0ms,bw=...`).
pub fn parse_network(s: &str) -> Result<Network, String> {
    let s = s.trim();
    if s == "loopback" {
        return Ok(Network {
            name: s.into(),
            link: Link::default(),
        });
    }
    let mut link = Link::default();
    let mut seen_rtt = false;
    for part in s.split(',') {
        let (k, v) = part.split_once('=').ok_or_else(|| {
            format!("network profile {s:?}: expected loopback or rtt=20ms[,bw=100M]")
        })?;
        match k.trim() {
            "rtt" if !seen_rtt => {
                seen_rtt = true;
                link.rtt = humantime::parse_duration(v.trim())
                    .map_err(|e| format!("network profile {s:?}: rtt {v:?}: {e}"))?;
            }
            "bw" if link.bytes_per_sec.is_none() => {
                let bits = parse_bits(v.trim())
                    .ok_or_else(|| format!("network profile {s:?}: bw {v:?} is not a rate like 100M (bits/s)"))?;
                link.bytes_per_sec = Some(bits / 8);
            }
            _ => return Err(format!("network profile {s:?}: unknown or repeated key {k:?} (known: rtt, bw; loss is not emulated)")),
        }
    }
    Ok(Network {
        name: s.into(),
        link,
    })
}

/// `100M` → 100_000_000 (bits per second; at least 8 so a byte per second remains).
fn parse_bits(v: &str) -> Option<u64> {
    let (num, mult) = match v.char_indices().last()? {
        (i, 'k' | 'K') => (&v[..i], 1_000),
        (i, 'm' | 'M') => (&v[..i], 1_000_000),
        (i, 'g' | 'G') => (&v[..i], 1_000_000_000),
        _ => (v, 1),
    };
    let n: u64 = num.parse().ok()?;
    n.checked_mul(mult).filter(|&b| b >= 8)
}

/// What the guest does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WorkloadKind {
    /// Reads at uniformly random block-aligned offsets.
    Random,
    /// Reads from offset 0 on, wrapping at the end.
    Sequential,
    /// The chunks of a boot profile file, in its order, each read in blocks.
    Replay(PathBuf),
}

impl WorkloadKind {
    pub fn name(&self) -> &'static str {
        match self {
            WorkloadKind::Random => "random",
            WorkloadKind::Sequential => "sequential",
            WorkloadKind::Replay(_) => "replay",
        }
    }
}

/// What to measure.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// `http://HOST[:PORT]/PATH` of the target image on the origin.
    pub target: String,
    /// Scratch directory (one subdirectory per run).
    pub work: PathBuf,
    /// The streamboot executable to spawn for prepare and serve.
    pub exe: PathBuf,
    pub workload: WorkloadKind,
    pub block_size: usize,
    pub queue_depth: usize,
    /// Stop after this many reads (None: no limit).
    pub count: Option<u64>,
    /// Stop issuing reads after this long (None: no limit).
    pub duration: Option<Duration>,
    pub strategies: Vec<Strategy>,
    /// Boot profile file prepare stages for [`Strategy::Staged`].
    pub boot_profile: Option<PathBuf>,
    pub chunk_sizes: Vec<u64>,
    pub networks: Vec<Network>,
    pub rounds: u32,
    /// Seed of the random offsets (the same in every run).
    pub seed: u64,
}

/// One configuration measured in each round.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub strategy: Strategy,
    pub chunk_size: u64,
    pub network: Network,
}

impl RunConfig {
    /// `cold/64K/rtt=20ms`.
    pub fn name(&self) -> String {
        format!(
            "{}/{}/{}",
            self.strategy.name(),
            size_name(self.chunk_size),
            self.network.name
        )
    }
}

impl BenchOptions {
    /// Every configuration, in the order each round runs them.
    pub fn configs(&self) -> Vec<RunConfig> {
        let mut out = Vec::new();
        for n in &self.networks {
            for &c in &self.chunk_sizes {
                for &s in &self.strategies {
                    out.push(RunConfig {
                        strategy: s,
                        chunk_size: c,
                        network: n.clone(),
                    });
                }
            }
        }
        out
    }
}

/// `65536` → `64K`, `1048576` → `1M`.
pub fn size_name(b: u64) -> String {
    match b {
        0 => "0".into(),
        b if b % (1 << 20) == 0 => format!("{}M", b >> 20),
        b if b % (1 << 10) == 0 => format!("{}K", b >> 10),
        b => b.to_string(),
    }
}

/// The reads a run issues.
pub struct Ops {
    kind: OpsKind,
    block: u64,
    count: Option<u64>,
    duration: Option<Duration>,
    issued: u64,
    capacity: u64,
    rng: rand::rngs::StdRng,
}

enum OpsKind {
    Random,
    Sequential,
    /// Byte ranges still to read, in order (the first one partly read: `.0` moves).
    Replay(std::collections::VecDeque<(u64, u64)>),
}

impl Ops {
    /// Reads of `block` bytes for `kind`; `replay` holds a profile's byte ranges.
    pub fn new(o: &BenchOptions, replay: Option<Vec<(u64, u64)>>) -> Self {
        let kind = match (&o.workload, replay) {
            (WorkloadKind::Replay(_), Some(r)) => OpsKind::Replay(r.into()),
            (WorkloadKind::Sequential, _) => OpsKind::Sequential,
            _ => OpsKind::Random,
        };
        Self {
            kind,
            block: o.block_size as u64,
            count: o.count,
            duration: o.duration,
            issued: 0,
            capacity: 0,
            rng: rand::rngs::StdRng::seed_from_u64(o.seed),
        }
    }

    /// The device size (reads stay below it).
    pub fn set_capacity(&mut self, capacity: u64) {
        self.capacity = capacity;
    }

    /// The next read (offset, length), or None when the workload is over.
    pub fn next(&mut self, elapsed: Duration) -> Option<(u64, usize)> {
        if self.count.is_some_and(|c| self.issued >= c)
            || self.duration.is_some_and(|d| elapsed >= d)
            || self.capacity < self.block
        {
            return None;
        }
        let blocks = self.capacity / self.block;
        let (off, len) = match &mut self.kind {
            OpsKind::Random => (self.rng.random_range(0..blocks) * self.block, self.block),
            OpsKind::Sequential => ((self.issued % blocks) * self.block, self.block),
            OpsKind::Replay(ranges) => loop {
                let r = ranges.front_mut()?;
                let end = (r.0 + r.1).min(self.capacity);
                if r.0 >= end {
                    ranges.pop_front();
                    continue;
                }
                let (off, len) = (r.0, self.block.min(end - r.0));
                r.1 -= len.min(r.1);
                r.0 += len;
                break (off, len);
            },
        };
        self.issued += 1;
        Some((off, len as usize))
    }
}

/// What the guest saw in one run.
#[derive(Clone, Debug)]
pub struct WorkloadResult {
    pub start: Instant,
    pub end: Instant,
    /// When the first read completed.
    pub first_done: Option<Instant>,
    /// How long the first completed read took.
    pub first_latency: Option<Duration>,
    pub ops: u64,
    pub bytes_read: u64,
    /// (seconds since `start`, latency in ms) per read, in completion order.
    pub latencies: Vec<(f64, f64)>,
}

impl WorkloadResult {
    fn new(start: Instant) -> Self {
        Self {
            start,
            end: start,
            first_done: None,
            first_latency: None,
            ops: 0,
            bytes_read: 0,
            latencies: Vec::new(),
        }
    }
}

impl Default for WorkloadResult {
    fn default() -> Self {
        Self::new(Instant::now())
    }
}

/// Facts about the machine the bench ran on.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub kernel: String,
    pub streamboot_version: &'static str,
}

impl Machine {
    /// Reads /proc.
    pub fn here() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or_else(|| "unknown".into(), |(_, v)| v.trim().to_string());
        Self {
            cpu_model,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map_or_else(|_| "unknown".into(), |k| k.trim().to_string()),
            streamboot_version: env!("CARGO_PKG_VERSION"),
        }
    }
}

/// What the caller shows while the bench runs (on stderr).
pub trait Hooks: Sync {
    /// A run begins or ends, or another step worth a line.
    fn message(&self, msg: &str);
    /// Reads done in the current run (`total` when known).
    fn progress(&self, done: u64, total: Option<u64>);
}

/// Checks that `target` is an http:// URL whose origin accepts connections.
pub fn check_origin(target: &str) -> Result<(), BenchError> {
    let (origin, _, _) = split_target(target)?;
    std::net::TcpStream::connect_timeout(&origin, Duration::from_secs(5))
        .map(drop)
        .map_err(|source| BenchError::Origin {
            addr: origin,
            source,
        })
}

/// Runs every configuration `rounds` times, rounds interleaved (round 1 of each, then
/// round 2 of each, ...); `each` gets every result as it is measured.
pub fn run_all(
    o: &BenchOptions,
    hooks: &dyn Hooks,
    each: &mut dyn FnMut(&run::RunResult),
) -> Result<Vec<run::RunResult>, BenchError> {
    if !BUILT_IN {
        return Err(BenchError::NotBuiltIn);
    }
    check_origin(&o.target)?;
    let machine = Machine::here();
    let configs = o.configs();
    let total = configs.len() * o.rounds as usize;
    let mut results = Vec::with_capacity(total);
    for round in 1..=o.rounds {
        for (i, cfg) in configs.iter().enumerate() {
            hooks.message(&format!(
                "[{}/{total}] {} round {round}",
                results.len() + 1,
                cfg.name()
            ));
            let r = run_one(o, cfg, round, i, &machine, hooks)?;
            hooks.message(&format!(
                "    first read {} ms, finished {:.0} ms, p99 {:.2} ms, fetched {} bytes",
                r.time_to_first_read_ms
                    .map_or("-".into(), |v| format!("{v:.1}")),
                r.time_to_finish_ms,
                r.latency_ms.p99,
                r.bytes_fetched
            ));
            each(&r);
            results.push(r);
        }
    }
    Ok(results)
}

pub use run::RunResult;
