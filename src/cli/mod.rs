//! The `streamboot` command line.

mod bench;
mod config;
mod demo;
mod docs;
pub mod exit;
mod export;
mod lifecycle;
mod progress;
mod report;
mod serve;
pub mod size;
mod store;
mod targets;

use std::path::PathBuf;
use std::time::Duration;

use clap::error::ErrorKind;
use clap::{Args, Parser, Subcommand};

use crate::net::s3::S3Options;
use crate::source::cache::{CacheConfig, DEFAULT_CACHE_SIZE};
use crate::source::{HttpAuth, HttpOptions};

/// Boot a VM on a remote disk image while it streams.
#[derive(Debug, Parser)]
#[command(name = "streamboot", version, about, after_help = exit::help_table())]
pub struct Cli {
    /// Machine-readable JSON on stdout instead of text and progress bars (errors too:
    /// `{"ok": false, "kind": ..., "error": ...}`; `hydrate` and `commit` print progress
    /// events as JSON lines before the result).
    #[arg(long, global = true)]
    pub json: bool,
    /// More log output (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Log line format on stderr: `text`, or `json` (one object per line with `timestamp`,
    /// `level`, `target`, `message` and the event's fields; the final error line too).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (colours only when stderr is a terminal).
    Text,
    /// One JSON object per line.
    Json,
}

/// Options for reaching the remote source (also keys of `serve --config`; unset ones take
/// the defaults named in their help). Debug is written by hand: header values are secrets.
#[derive(Clone, Default, Args, serde::Serialize, serde::Deserialize)]
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
    /// Extra request header 'Name: value' (repeatable). Its value is never printed, logged
    /// or written to the disk; prefer --header-file for secrets (a command line is visible
    /// to other users).
    #[arg(long = "header", value_name = "NAME: VALUE")]
    #[serde(rename = "header")]
    pub headers: Vec<String>,
    /// File with one 'Name: value' header per line (repeatable; '#' starts a comment line).
    #[arg(long = "header-file", value_name = "FILE")]
    #[serde(rename = "header-file")]
    pub header_files: Vec<PathBuf>,
    /// File holding a bearer token (sent as 'Authorization: Bearer TOKEN'); read again when
    /// a request gets 401, which is then retried once (rotate the token by replacing the
    /// file).
    #[arg(long, value_name = "FILE")]
    pub bearer_token_file: Option<PathBuf>,
    /// PEM bundle of CA certificates to trust in addition to the bundled roots
    /// (repeatable).
    #[arg(long = "cacert", value_name = "PEM")]
    #[serde(rename = "cacert")]
    pub cacerts: Vec<PathBuf>,
    /// Trust only the CAs given with --cacert (and --system-roots), not the bundled roots.
    #[arg(long)]
    pub no_default_roots: bool,
    /// Also trust the operating system's certificate store.
    #[arg(long)]
    pub system_roots: bool,
    /// PEM client certificate for servers that require one (mutual TLS); needs
    /// --client-key.
    #[arg(long, value_name = "PEM", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of --client-cert.
    #[arg(long, value_name = "PEM", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// Host-wide chunk cache shared by every streamboot on the host (created 0700 if
    /// missing): each chunk of a target is fetched from its origin once; entries are
    /// verified on every read (docs/cache.md).
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
    /// Size cap of --cache: least recently used entries are evicted beyond it (default
    /// 10G).
    #[arg(long, value_name = "SIZE", value_parser = size::parse_size)]
    #[serde(deserialize_with = "config::de_size")]
    pub cache_size: Option<u64>,
    /// Endpoint of an S3-compatible service for s3:// targets and stores (default:
    /// AWS_ENDPOINT_URL, else AWS). Give no credentials in it: see docs/s3.md.
    #[arg(long, value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// S3 region (default: AWS_REGION, AWS_DEFAULT_REGION, the profile's, us-east-1).
    #[arg(long, value_name = "REGION")]
    pub s3_region: Option<String>,
    /// Path-style S3 requests (ENDPOINT/bucket/key) instead of virtual-hosted ones
    /// (bucket.ENDPOINT/key).
    #[arg(long)]
    pub s3_path_style: bool,
    /// Profile of the shared AWS credentials file (AWS_SHARED_CREDENTIALS_FILE or
    /// ~/.aws/credentials) to use instead of AWS_* environment keys.
    #[arg(long, value_name = "NAME")]
    pub aws_profile: Option<String>,
}

impl std::fmt::Debug for NetArgs {
    /// As the HTTP options (header values are secrets and not shown).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("NetArgs")
            .field(&self.http_options())
            .finish()
    }
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
            auth: HttpAuth {
                headers: self.headers.clone(),
                header_files: self.header_files.clone(),
                bearer_token_file: self.bearer_token_file.clone(),
                cacerts: self.cacerts.clone(),
                no_default_roots: self.no_default_roots,
                system_roots: self.system_roots,
                client_cert: self.client_cert.clone(),
                client_key: self.client_key.clone(),
            },
            cache: self.cache.clone().map(|dir| CacheConfig {
                dir,
                max_bytes: self.cache_size.unwrap_or(DEFAULT_CACHE_SIZE),
            }),
            s3: S3Options {
                endpoint: self.s3_endpoint.clone(),
                region: self.s3_region.clone(),
                path_style: self.s3_path_style,
                profile: self.aws_profile.clone(),
            },
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
    Serve(Box<serve::ServeArgs>),
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
    /// Measure a workload on a streamed disk: strategies and emulated networks (RTT,
    /// bandwidth) side by side, through a built-in proxy to the origin; JSON results and
    /// an HTML report (needs the demo-blkio feature: libblkio's client is the guest).
    Bench(Box<bench::BenchArgs>),
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
    /// Give a running serve fresh URLs of its target (an expired presigned URL); checked
    /// against the pinned image, refused otherwise.
    TargetUrls(targets::TargetUrlsArgs),
    /// Write the man pages (one per subcommand) and shell completions (bash, zsh, fish)
    /// under DIR: DIR/man/*.1, DIR/completions/. For packaging.
    #[command(hide = true)]
    GenerateDocs {
        /// Output directory.
        dir: PathBuf,
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
        println!("{}", error_json(exit::Kind::Usage, &msg));
    }
    let json_logs = std::env::args()
        .collect::<Vec<_>>()
        .windows(2)
        .any(|w| w[0] == "--log-format" && w[1] == "json")
        || std::env::args().any(|a| a == "--log-format=json");
    report_error(exit::Kind::Usage, &msg, json_logs);
    exit::Kind::Usage.code()
}

/// The error line on stderr: `streamboot: error: MSG`, or with `--log-format json` a log
/// object like the others (so every stderr line of a JSON-logging process is JSON).
fn report_error(kind: exit::Kind, msg: &str, json_logs: bool) {
    if json_logs {
        let now = humantime::format_rfc3339_micros(std::time::SystemTime::now());
        let line = serde_json::json!({
            "timestamp": now.to_string(),
            "level": "ERROR",
            "target": "streamboot",
            "message": format!("streamboot: error: {msg}"),
            "kind": kind.name(),
            "exit_code": kind.code(),
        });
        eprintln!("{line}");
    } else {
        eprintln!("streamboot: error: {msg}");
    }
}

/// A `--json` error line.
fn error_json(kind: exit::Kind, msg: &str) -> serde_json::Value {
    serde_json::json!({ "ok": false, "kind": kind.name(), "error": msg })
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
    init_logs(level, cli.log_format);
    match lifecycle::run(&cli) {
        Ok(()) => 0,
        Err(e) => {
            let msg = format!("{e:#}").replace('\n', " ");
            let kind = exit::classify(&e);
            if cli.json {
                println!("{}", error_json(kind, &msg));
            }
            report_error(kind, &msg, cli.log_format == LogFormat::Json);
            kind.code()
        }
    }
}

/// Logs to stderr at `level` (or as `STREAMBOOT_LOG` says), as text or JSON lines.
fn init_logs(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("STREAMBOOT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        // The message and the event's fields at the top level of each object.
        LogFormat::Json => logs.json().flatten_event(true).init(),
        // Colours only for a person at a terminal: a log file or journal gets plain text.
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}
