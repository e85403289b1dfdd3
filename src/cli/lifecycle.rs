//! prepare / status / hydrate / confirm / commit / rollback: parse the arguments, call
//! the library's [`crate::migration`] operations (or a running serve's control API), print
//! their reports (text, or one JSON line with `--json`).

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use serde_json::json;

use super::progress::Bars;
use super::report::{emit, ok_json};
use super::size::{parse_range, parse_size};
use super::{Cli, Command, NetArgs};
use crate::migration::{self, CommitOptions, HydrateRequest, PrepareOptions};

/// Arguments of `prepare`.
#[derive(Debug, Args)]
pub struct PrepareArgs {
    /// Disk holding the source image (raw file or block device).
    pub disk: PathBuf,
    /// Target image: http(s) URL (repeat for mirrors), file:// URL or path, or a
    /// chunk-store image as the path/URL of its index file (`STORE/indexes/NAME.idx`).
    #[arg(long = "target", required_unless_present = "target_files")]
    pub targets: Vec<String>,
    /// Like --target, with the URLs read from FILE (one a line, `#` comments): for URLs
    /// that carry credentials or a presigned query, which then stay off the command line.
    #[arg(long = "target-file", value_name = "FILE")]
    pub target_files: Vec<PathBuf>,
    /// Chunk size (power of two, 4K..4M; default: the store's for a chunk-store target,
    /// else 64K).
    #[arg(long, value_parser = parse_size)]
    pub chunk_size: Option<u64>,
    /// Public key (`.pub` from `streamboot keygen`) a chunk-store index must be signed by
    /// (repeatable: any of them).
    #[arg(long = "trusted-key")]
    pub trusted_keys: Vec<PathBuf>,
    /// Accept a chunk-store index without checking its signature (chunks are still
    /// verified against it). Insecure: only for tests and trusted networks.
    #[arg(long)]
    pub insecure_unverified_index: bool,
    /// Do not copy target chunks found on the local disk (chunk-store targets); fetch
    /// everything.
    #[arg(long)]
    pub no_seed: bool,
    /// Target byte range to place home before the first boot (repeatable; default 0..1M:
    /// partition table and boot loader). Boot partitions (ESP, XBOOTLDR) are added.
    #[arg(long = "boot-range", value_parser = parse_range)]
    pub boot_ranges: Vec<std::ops::Range<u64>>,
    /// Boot profile (from `serve --record-profile`): its chunks join the boot set.
    #[arg(long, value_name = "FILE")]
    pub boot_profile: Option<PathBuf>,
    /// Largest size of the released area (default: room for the whole target on a file,
    /// all free space on a block device).
    #[arg(long, value_parser = parse_size)]
    pub area_size: Option<u64>,
    /// Bytes of a block device the source uses, the area following them (default: the
    /// whole device, the area in a free gap of its partition table).
    #[arg(long, value_parser = parse_size)]
    pub source_size: Option<u64>,
    /// Block device with a partition table: place the released area at START..END
    /// (byte range, e.g. 64M..120M) inside one free gap (default: the largest gap).
    #[arg(long, value_parser = parse_range, value_name = "START..END")]
    pub area: Option<std::ops::Range<u64>>,
    /// Block device: the area's free space need not read as zeros; its old contents are
    /// lost (rollback leaves zeros there).
    #[arg(long)]
    pub discard_free_space: bool,
    /// Print the plan (area, saved ranges, boot chunks; JSON with --json) and write
    /// nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Trial starts of the target before automatic fallback to the source.
    #[arg(long, default_value_t = 3)]
    pub max_trial_starts: u8,
    #[command(flatten)]
    pub net: NetArgs,
}

/// Arguments of `hydrate`.
#[derive(Debug, Args)]
pub struct HydrateArgs {
    /// Prepared disk.
    pub disk: PathBuf,
    /// Fetch from these URLs instead of the recorded ones (must be the same image).
    #[arg(long = "target")]
    pub targets: Vec<String>,
    /// Like --target, with the URLs read from FILE (one a line, `#` comments).
    #[arg(long = "target-file", value_name = "FILE")]
    pub target_files: Vec<PathBuf>,
    /// Limit in bytes per second (0 = unlimited).
    #[arg(long, default_value = "0", value_parser = parse_size)]
    pub rate: u64,
    /// Requests in flight.
    #[arg(long, default_value_t = 8)]
    pub threads: usize,
    #[command(flatten)]
    pub net: NetArgs,
}

/// Arguments of `commit`.
#[derive(Debug, Args)]
pub struct CommitArgs {
    /// Prepared disk.
    pub disk: PathBuf,
    /// Commit even though the target was not confirmed.
    #[arg(long)]
    pub force: bool,
    /// Control socket of a running `serve` on DISK: commit through it, in the background
    /// while the VM runs (falls back to acting on the disk when nothing listens there).
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// With --control: wait until the background commit finished, showing its progress
    /// (JSON-lines events with --json). Without --control, commit always waits.
    #[arg(long, requires = "control")]
    pub wait: bool,
    /// Fetch from these URLs instead of the recorded ones (must be the same image).
    #[arg(long = "target")]
    pub targets: Vec<String>,
    /// Like --target, with the URLs read from FILE (one a line, `#` comments).
    #[arg(long = "target-file", value_name = "FILE")]
    pub target_files: Vec<PathBuf>,
    /// Afterwards, move the target's backup GPT from the end of the target image to the
    /// end of the device (as `sgdisk -e` does). Offline only.
    #[arg(long, conflicts_with = "control")]
    pub relocate_backup_gpt: bool,
    #[command(flatten)]
    pub net: NetArgs,
}

/// Runs a parsed command line.
pub fn run(cli: &Cli) -> Result<()> {
    match &cli.command {
        Command::Prepare(a) => prepare(cli, a),
        Command::Status { disk, control } => match online(cli, control, "status")? {
            true => Ok(()),
            false => status(cli, disk),
        },
        Command::Hydrate(a) => hydrate(cli, a),
        Command::Confirm { disk, control } => match online(cli, control, "confirm")? {
            true => Ok(()),
            false => confirm(cli, disk),
        },
        Command::Commit(a) => match (online(cli, &a.control, "commit")?, &a.control) {
            (true, Some(sock)) if a.wait => wait_for_commit(cli, sock),
            (true, _) => Ok(()),
            (false, _) => commit(cli, a),
        },
        Command::Rollback { disk, control } => match online(cli, control, "rollback")? {
            true => Ok(()),
            false => rollback(cli, disk),
        },
        Command::Adopt { disk } => {
            let r = migration::adopt(disk)?;
            emit(cli, ok_json(&r), || {
                format!(
                    "{}: adopted (format v3, authenticated with this host's key); {}",
                    disk.display(),
                    super::report::status_text(&r.status)
                )
            })
        }
        Command::Serve(a) => super::serve::run(a, cli.json),
        Command::TargetUrls(a) => super::targets::run(a, cli.json),
        Command::Export(a) => super::export::run(a, cli.json),
        Command::Publish(a) => super::store::publish(a, cli.json),
        Command::Keygen { prefix } => super::store::keygen(prefix, cli.json),
        Command::Store(c) => super::store::run(c, cli.json),
        Command::Demo(a) => super::demo::run(a, cli.json),
        Command::GenerateDocs { dir } => super::docs::generate(dir),
    }
}

/// Runs `op` through a running serve's control socket. Ok(false): nothing listens there
/// (the caller acts on the disk itself).
fn online(cli: &Cli, control: &Option<PathBuf>, op: &str) -> Result<bool> {
    use crate::control::client;
    let Some(sock) = control else {
        return Ok(false);
    };
    let r = match op {
        "status" => client::get_status(sock),
        other => client::post(sock, other, &json!({})),
    };
    match r {
        // `commit --wait` reports when the commit is done, not that it started.
        Ok(_) if matches!(&cli.command, Command::Commit(a) if a.wait) => Ok(true),
        Ok(v) => {
            if cli.json {
                println!("{v}");
            } else if op == "status" {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                println!(
                    "{}",
                    v.get("message").and_then(|m| m.as_str()).unwrap_or("done")
                );
            }
            Ok(true)
        }
        Err(e) if e.is_not_listening() => {
            tracing::warn!("no serve listens on {}: acting on the disk", sock.display());
            Ok(false)
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!("{op} through {}", sock.display()))),
    }
}

/// Polls a running serve's status until the commit it runs has finished: progress as
/// chunks home of all (a bar, or JSON-lines events with `--json`), then the result.
fn wait_for_commit(cli: &Cli, sock: &Path) -> Result<()> {
    use crate::control::client;
    use anyhow::Context;
    let bars = Bars::or_events(cli.json, "commit", false);
    loop {
        let v = client::get_status(sock)
            .with_context(|| format!("waiting for the commit through {}", sock.display()))?;
        let field = |k: &str| v.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
        let state = v.get("state").and_then(|s| s.as_str()).unwrap_or("");
        if state == "committing" {
            bars.update("commit", field("chunks_home"), field("chunks_total"));
        }
        if let Some(err) = v.get("last_error").and_then(|e| e.as_str()) {
            if err.starts_with("commit failed") {
                bars.finish();
                anyhow::bail!("{err} (the commit resumes with `streamboot commit`)");
            }
        }
        if !matches!(state, "committing" | "plain" | "committed") {
            bars.finish();
            anyhow::bail!(
                "the commit through {} is not running: the disk is in state {state}",
                sock.display()
            );
        }
        if matches!(state, "plain" | "committed") {
            bars.finish();
            let size = field("target_size");
            return emit(
                cli,
                json!({ "ok": true, "state": "committed", "target_size": size }),
                || {
                    format!(
                        "committed: the disk now holds the target ({})",
                        super::size::human(size)
                    )
                },
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn prepare(cli: &Cli, a: &PrepareArgs) -> Result<()> {
    let o = PrepareOptions {
        chunk_size: a.chunk_size,
        trusted_keys: a.trusted_keys.clone(),
        insecure_unverified_index: a.insecure_unverified_index,
        no_seed: a.no_seed,
        boot_ranges: a.boot_ranges.clone(),
        boot_profile: a.boot_profile.clone(),
        area_size: a.area_size,
        source_size: a.source_size,
        area: a.area.clone(),
        discard_free_space: a.discard_free_space,
        max_trial_starts: a.max_trial_starts,
        http: a.net.http_options(),
        ..PrepareOptions::new(a.disk.clone(), all_targets(&a.targets, &a.target_files)?)
    };
    if a.dry_run {
        let p = migration::plan_prepare(&o)?;
        return emit(cli, ok_json(&p), || p.text());
    }
    let r = migration::prepare(&o, &Bars::new(cli.json, false))?;
    emit(cli, ok_json(&r), || super::report::prepared_text(&r))
}

fn status(cli: &Cli, disk: &Path) -> Result<()> {
    let r = migration::status(disk)?;
    emit(cli, ok_json(&r), || match &r.status {
        None if r.ignored_superblocks.is_empty() => {
            format!("{}: plain disk (not prepared)", disk.display())
        }
        None => format!(
            "{}: plain disk (not prepared); superblock-like bytes at its end were ignored \
             (guest data, a disk prepared on another host: copy its host key, or a format-v1 \
             disk: `streamboot adopt`): {}",
            disk.display(),
            r.ignored_superblocks.join("; ")
        ),
        Some(s) => super::report::status_text(s),
    })
}

/// The URLs of `--target` followed by those read from each `--target-file`.
fn all_targets(targets: &[String], files: &[PathBuf]) -> Result<Vec<String>> {
    let mut all = targets.to_vec();
    for f in files {
        all.extend(super::config::read_secret_urls(f)?);
    }
    Ok(all)
}

fn hydrate(cli: &Cli, a: &HydrateArgs) -> Result<()> {
    let r = migration::hydrate(
        &HydrateRequest {
            disk: a.disk.clone(),
            targets: all_targets(&a.targets, &a.target_files)?,
            rate: a.rate,
            threads: a.threads,
            http: a.net.http_options(),
        },
        &Bars::or_events(cli.json, "hydrate", true),
    )?;
    emit(cli, ok_json(&r), || super::report::hydrated_text(&r.report))
}

fn confirm(cli: &Cli, disk: &Path) -> Result<()> {
    let r = migration::confirm(disk)?;
    emit(cli, ok_json(&r), || "target confirmed".into())
}

fn commit(cli: &Cli, a: &CommitArgs) -> Result<()> {
    let r = migration::commit(
        &CommitOptions {
            disk: a.disk.clone(),
            force: a.force,
            targets: all_targets(&a.targets, &a.target_files)?,
            http: a.net.http_options(),
            relocate_backup_gpt: a.relocate_backup_gpt,
        },
        &Bars::or_events(cli.json, "commit", false),
    )?;
    emit(cli, ok_json(&r), || {
        super::report::committed_text(&a.disk, &r)
    })
}

fn rollback(cli: &Cli, disk: &Path) -> Result<()> {
    let r = migration::rollback(disk, &Bars::new(cli.json, false))?;
    emit(cli, ok_json(&r), || {
        let mut t = format!("rolled back: {} holds the source again", disk.display());
        if r.guest_writes_discarded {
            t.push_str(" (writes made while the target ran were discarded)");
        }
        t
    })
}
