//! `streamboot bench`: parses the options, runs [`crate::bench`] with progress on stderr,
//! prints the results (a table, or JSON lines with `--json`) and writes `--out` and
//! `--report`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};

use super::progress::Bars;
use super::size::parse_size;
use crate::bench::{self, BenchOptions, Hooks, RunResult, Strategy, WorkloadKind};

/// Guest workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WorkloadArg {
    /// Reads at random block-aligned offsets (the same offsets in every run).
    Random,
    /// Reads from offset 0 on.
    Sequential,
    /// Reads the chunks of --profile (a boot profile file) in its order.
    Replay,
}

/// Serving strategies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StrategyArg {
    /// Fetch on demand only (serve --no-hydrate).
    Cold,
    /// Background hydration on (serve's default).
    Hydrate,
    /// prepare places the chunks of --profile home first (--boot-profile), then on demand
    /// only.
    Staged,
}

/// Arguments of `bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The target image: http://HOST[:PORT]/PATH (the origin the bench's proxy forwards to).
    #[arg(long)]
    pub target: String,
    /// What the guest (libblkio's vhost-user-blk client) does.
    #[arg(long, value_enum, default_value_t = WorkloadArg::Random)]
    pub workload: WorkloadArg,
    /// Boot profile file (`serve --record-profile`): what --workload replay reads and
    /// what --strategy staged places home.
    #[arg(long, value_name = "FILE")]
    pub profile: Option<PathBuf>,
    /// Bytes per read (multiple of 512, at most 1M).
    #[arg(long, default_value = "4K", value_parser = parse_size)]
    pub block_size: u64,
    /// Reads in flight (1..=256).
    #[arg(long, default_value_t = 4)]
    pub queue_depth: usize,
    /// Reads per run (default 1000, or no limit with --duration; replay: the whole profile).
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop issuing reads after this long per run (e.g. 10s).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Serving strategies, each a run (comma-separated or repeated).
    #[arg(long = "strategy", value_enum, value_delimiter = ',', default_values_t = [StrategyArg::Cold])]
    pub strategies: Vec<StrategyArg>,
    /// Chunk sizes given to prepare, each a run (comma-separated or repeated).
    #[arg(long = "chunk-size", value_delimiter = ',', default_values = ["64K"], value_parser = parse_size)]
    pub chunk_sizes: Vec<u64>,
    /// Network profiles, each a run (repeat the option, or separate with ';'): `loopback`
    /// or `rtt=20ms[,bw=100M]` (bandwidth in bits per second, per direction).
    #[arg(long = "network", default_values = ["loopback"])]
    pub networks: Vec<String>,
    /// Rounds; each round runs every configuration once (interleaved).
    #[arg(long, default_value_t = 1)]
    pub rounds: u32,
    /// Seed of the random offsets.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Also write every result to FILE (JSON: machine, runs, summary).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Write an HTML report (inline SVG timelines and the comparison table) to FILE.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Scratch directory (disks, logs), kept afterwards (default: a temporary directory,
    /// removed when the bench succeeds).
    #[arg(long)]
    pub work: Option<PathBuf>,
}

/// A bad option: reported as a usage error (exit code 2).
macro_rules! bail {
    ($($t:tt)*) => {
        return Err(bench::BenchError::Usage(format!($($t)*)).into())
    };
}

/// Progress on stderr: a line per run, a bar for the reads.
struct CliHooks {
    bars: Bars,
}

impl Hooks for CliHooks {
    fn message(&self, msg: &str) {
        self.bars.finish();
        eprintln!("{msg}");
    }

    fn progress(&self, done: u64, total: Option<u64>) {
        self.bars.update("guest reads", done, total.unwrap_or(0));
    }
}

/// The options checked and turned into the library's.
fn options(a: &BenchArgs, work: PathBuf) -> Result<BenchOptions> {
    if a.block_size == 0 || a.block_size % 512 != 0 || a.block_size > 1 << 20 {
        bail!(
            "--block-size {} must be a multiple of 512, at most 1M",
            a.block_size
        );
    }
    if !(1..=256).contains(&a.queue_depth) {
        bail!("--queue-depth {} must be 1..=256", a.queue_depth);
    }
    if a.block_size * a.queue_depth as u64 > 64 << 20 {
        bail!("--block-size times --queue-depth must be at most 64M (the guest's buffer)");
    }
    if a.rounds == 0 || a.count == Some(0) {
        bail!("--rounds and --count must be at least 1");
    }
    let staged = a.strategies.contains(&StrategyArg::Staged);
    if let Some(p) = &a.profile {
        if a.workload != WorkloadArg::Replay && !staged {
            bail!("--profile is for --workload replay or --strategy staged");
        }
        crate::profile::BootProfile::load(p).map_err(bench::BenchError::Profile)?;
    } else if staged || a.workload == WorkloadArg::Replay {
        bail!("--workload replay and --strategy staged need --profile FILE");
    }
    let workload = match (a.workload, &a.profile) {
        (WorkloadArg::Replay, Some(p)) => WorkloadKind::Replay(p.clone()),
        (WorkloadArg::Sequential, _) => WorkloadKind::Sequential,
        _ => WorkloadKind::Random,
    };
    let mut networks = Vec::new();
    for spec in a.networks.iter().flat_map(|n| n.split(';')) {
        networks.push(bench::parse_network(spec).map_err(bench::BenchError::Usage)?);
    }
    let mut strategies = Vec::new();
    for s in &a.strategies {
        let s = match s {
            StrategyArg::Cold => Strategy::Cold,
            StrategyArg::Hydrate => Strategy::Hydrate,
            StrategyArg::Staged => Strategy::Staged,
        };
        if !strategies.contains(&s) {
            strategies.push(s);
        }
    }
    // Checked here so a typo fails before the first run, not in its prepare.
    bench::split_target(&a.target)?;
    let count = match (a.count, a.duration, &workload) {
        (None, None, WorkloadKind::Random | WorkloadKind::Sequential) => Some(1000),
        (c, _, _) => c,
    };
    Ok(BenchOptions {
        target: a.target.clone(),
        work,
        exe: std::env::current_exe().context("the streamboot executable")?,
        workload,
        block_size: a.block_size as usize,
        queue_depth: a.queue_depth,
        count,
        duration: a.duration,
        strategies,
        boot_profile: a.profile.clone(),
        chunk_sizes: a.chunk_sizes.clone(),
        networks,
        rounds: a.rounds,
        seed: a.seed,
    })
}

/// Runs `streamboot bench`.
pub fn run(a: &BenchArgs, json: bool) -> Result<()> {
    if !bench::BUILT_IN {
        return Err(bench::BenchError::NotBuiltIn.into());
    }
    let (work, keep) = match &a.work {
        Some(w) => (w.clone(), true),
        None => (
            std::env::temp_dir().join(format!("streamboot-bench-{}", std::process::id())),
            false,
        ),
    };
    let o = options(a, work.clone())?;
    // The bench writes only into a directory it made or one that is empty, so it never
    // overwrites (or, without --work, removes) anything it did not create.
    let reuse = keep && std::fs::read_dir(&work).is_ok_and(|mut d| d.next().is_none());
    if !reuse && std::fs::symlink_metadata(&work).is_ok() {
        bail!(
            "--work {} exists and is not an empty directory (give a new or empty one)",
            work.display()
        );
    }
    // Before anything is created: an unreachable origin fails at once.
    bench::check_origin(&a.target)?;
    if !reuse {
        if let Err(e) = std::fs::create_dir(&work) {
            bail!("--work {}: {e}", work.display());
        }
    }
    let hooks = CliHooks {
        bars: Bars::new(false, false),
    };
    let results = bench::run_all(&o, &hooks, &mut |r| {
        if json {
            println!("{}", serde_json::to_string(r).unwrap_or_default());
        }
    })
    .with_context(|| format!("bench failed (work directory kept: {})", work.display()))?;
    hooks.bars.finish();
    let summary = bench::stats::summarize(&results);
    let machine = bench::Machine::here();
    if json {
        for s in &summary {
            println!("{}", serde_json::to_string(s)?);
        }
    } else {
        print!("{}", text_table(&results, &summary));
    }
    if let Some(out) = &a.out {
        let doc = serde_json::json!({"machine": machine, "runs": results, "summary": summary});
        std::fs::write(out, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("--out {}", out.display()))?;
    }
    if let Some(path) = &a.report {
        let title = format!(
            "streamboot bench: {} ({} reads of {} bytes, queue depth {})",
            a.target,
            o.workload.name(),
            o.block_size,
            o.queue_depth
        );
        let html = bench::report::render(&results, &summary, &machine, &title);
        std::fs::write(path, html).with_context(|| format!("--report {}", path.display()))?;
    }
    if !keep {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(())
}

/// The results as text: a line per run, then median [min, max] per configuration.
fn text_table(results: &[RunResult], summary: &[bench::stats::Summary]) -> String {
    let mut t = format!(
        "{:<32} {:>5} {:>12} {:>11} {:>9} {:>9} {:>12} {:>6} {:>8}\n",
        "run", "round", "first read", "finish", "p50", "p99", "fetched", "ampl", "requests"
    );
    for r in results {
        t += &format!(
            "{:<32} {:>5} {:>9} ms {:>8.0} ms {:>6.2} ms {:>6.2} ms {:>12} {:>6} {:>8}{}\n",
            r.run,
            r.round,
            r.time_to_first_read_ms
                .map_or("-".into(), |v| format!("{v:.1}")),
            r.time_to_finish_ms,
            r.latency_ms.p50,
            r.latency_ms.p99,
            r.bytes_fetched,
            r.read_amplification
                .map_or("-".into(), |v| format!("{v:.2}")),
            r.origin_requests,
            if r.fetch_counts_agree {
                ""
            } else {
                "  (proxy count differs)"
            },
        );
    }
    t += "\nmedian [min, max] over rounds:\n";
    for s in summary {
        t += &format!(
            "{:<32} first read {:.1} [{:.1}, {:.1}] ms, finish {:.0} [{:.0}, {:.0}] ms, p99 {:.2} [{:.2}, {:.2}] ms\n",
            s.run,
            s.time_to_first_read_ms.median,
            s.time_to_first_read_ms.min,
            s.time_to_first_read_ms.max,
            s.time_to_finish_ms.median,
            s.time_to_finish_ms.min,
            s.time_to_finish_ms.max,
            s.latency_p99_ms.median,
            s.latency_p99_ms.min,
            s.latency_p99_ms.max,
        );
    }
    t
}
