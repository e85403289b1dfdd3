//! The `streamboot` command line.

mod config;
mod demo;
mod export;
mod lifecycle;
mod progress;
mod report;
mod serve;
pub mod size;
mod store;

use std::path::PathBuf;
use std::time::Duration;

use clap::error::ErrorKind;
use clap::{Args, Parser, Subcommand};

use crate::source::HttpOptions;

/// Boot a VM on a remote disk image while it streams.
#[derive(Debug, Parser)]
#[command(name = "streamboot", version, about)]
pub struct Cli {
    /// Machine-readable JSON on stdout instead of text and progress bars.
    #[arg(long, global = true)]
    pub json: bool,
    /// More log output (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

/// Options for reaching the remote source (also keys of `serve --config`; unset ones take
/// the defaults named in their help).
#[derive(Debug, Clone, Default, Args, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct NetArgs {
    /// Seconds to wait for a connection (default 10).
    #[arg(long)]
    pub connect_timeout: Option<u64>,
    /// Seconds a request may stall before it is retried (default 30).
    #[arg(long)]
    pub request_timeout: Option<u64>,
    /// Give up on a fetch after this many seconds of transient failures (default: keep
    /// retrying while the request waits).
    #[arg(long)]
    pub fetch_deadline: Option<u64>,
    /// Slowest rate (bytes/s) one request attempt is granted: its time budget is
    /// max(--request-timeout, length / rate); a server dripping slower is retried or left
    /// for a mirror (default 64K).
    #[arg(long, value_parser = size::parse_size)]
    #[serde(deserialize_with = "config::de_size")]
    pub min_rate: Option<u64>,
    /// Follow redirects to another origin (scheme, host, port); https to http is always
    /// refused.
    #[arg(long)]
    pub allow_cross_origin_redirects: bool,
}

impl NetArgs {
    /// HTTP options for these arguments.
    pub fn http_options(&self) -> HttpOptions {
        let d = HttpOptions::default();
        HttpOptions {
            connect_timeout: self
                .connect_timeout
                .map_or(d.connect_timeout, Duration::from_secs),
            request_timeout: self
                .request_timeout
                .map_or(d.request_timeout, Duration::from_secs),
            deadline: self.fetch_deadline.map(Duration::from_secs),
            min_rate: self.min_rate.unwrap_or(d.min_rate),
            allow_cross_origin_redirects: self.allow_cross_origin_redirects,
            ..d
        }
    }
}

/// Subcommands.
// Parsed once per process: the size of the largest variant (serve's options) is no cost.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Relocate the target's boot chunks onto DISK (reversible; resumes if interrupted).
    Prepare(lifecycle::PrepareArgs),
    /// Show the migration state of DISK.
    Status {
        /// Disk (raw file or block device).
        disk: PathBuf,
        /// Control socket of a running `serve` on DISK: act through it (falls back to
        /// acting on the disk when nothing listens there).
        #[arg(long)]
        control: Option<PathBuf>,
    },
    /// Download every missing target chunk into the released area.
    Hydrate(lifecycle::HydrateArgs),
    /// Mark the target good (ends the trial).
    Confirm {
        /// Disk (raw file or block device).
        disk: PathBuf,
        /// Control socket of a running `serve` on DISK: act through it (falls back to
        /// acting on the disk when nothing listens there).
        #[arg(long)]
        control: Option<PathBuf>,
    },
    /// Move every target chunk home and remove the released area: DISK becomes a plain
    /// copy of the target (plus guest writes).
    Commit(lifecycle::CommitArgs),
    /// Serve DISK to a VM as a vhost-user-blk device: the target while it streams (or a
    /// plain disk). Runs until SIGTERM/SIGINT.
    Serve(serve::ServeArgs),
    /// Serve every image of a chunk store as a read-only NBD export (each chunk verified
    /// before it is served). Runs until SIGTERM/SIGINT.
    Export(export::ExportArgs),
    /// Publish an image into a deduplicated chunk store (each distinct chunk stored once).
    Publish(store::PublishArgs),
    /// Make an ed25519 key pair for signing indexes: PREFIX.key (0600) and PREFIX.pub.
    Keygen {
        /// Path prefix of the key files.
        prefix: PathBuf,
    },
    /// Chunk store maintenance.
    #[command(subcommand)]
    Store(store::StoreCommand),
    /// The whole migration on an embedded example, in one command: builds a v1/v2 image
    /// pair, serves v2 over loopback HTTP, prepares, serves (a VM boots it when QEMU is
    /// installed, else a blkio client reads it), confirms, commits and verifies.
    Demo(demo::DemoArgs),
    /// Trust a disk prepared on this host by a streamboot before format v2: rewrite its
    /// metadata authenticated with this host's key. Only for disks you know were prepared
    /// here (the metadata sits where a guest can write).
    Adopt {
        /// Disk (raw file or block device).
        disk: PathBuf,
    },
    /// Restore the source bit for bit and remove the released area. Guest writes to the
    /// target are discarded.
    Rollback {
        /// Disk (raw file or block device).
        disk: PathBuf,
        /// Control socket of a running `serve` on DISK: act through it (falls back to
        /// acting on the disk when nothing listens there).
        #[arg(long)]
        control: Option<PathBuf>,
    },
}

/// Reports a command-line parsing error like every other error: one line
/// `streamboot: error: ...` (help and version output are printed as clap prints them).
fn usage_error(e: &clap::Error) -> i32 {
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return e.exit_code();
    }
    let msg = one_line_usage_error(&e.render().to_string());
    if std::env::args().any(|a| a == "--json") {
        println!("{}", serde_json::json!({ "ok": false, "error": msg }));
    }
    eprintln!("streamboot: error: {msg}");
    e.exit_code()
}

/// Folds clap's multi-line error text into one line: the message, the items listed under
/// it, and the usage line, without the `error:` prefix and the `--help` hint.
fn one_line_usage_error(rendered: &str) -> String {
    let mut parts: Vec<String> = Vec::new();
    for line in rendered.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.starts_with("For more information") {
            continue;
        }
        if let Some(usage) = line.strip_prefix("Usage:") {
            parts.push(format!("(usage: {})", usage.trim()));
        } else {
            parts.push(
                line.strip_prefix("error:")
                    .unwrap_or(line)
                    .trim()
                    .to_string(),
            );
        }
    }
    parts.push("(see --help)".into());
    parts.join(" ")
}

/// Parses the command line and runs it. Returns the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    // Offline commands report failures in their one-line error, so their logs are
    // opt-in; a long-running serve logs what it does.
    let serving = matches!(cli.command, Command::Serve(_) | Command::Export(_));
    let level = match cli.verbose {
        0 if serving => "info",
        0 => "off",
        1 => "warn",
        2 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STREAMBOOT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal: a log file or journal gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match lifecycle::run(&cli) {
        Ok(()) => 0,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            if cli.json {
                println!("{}", serde_json::json!({ "ok": false, "error": msg }));
            }
            eprintln!("streamboot: error: {msg}");
            1
        }
    }
}
