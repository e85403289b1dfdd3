//! prepare / status / hydrate / confirm / commit / rollback, acting on the disk directly.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use boot_relocator::{relocate, MetaStore, PreparePhase, PrepareSpec, State, Storage};
use clap::Args;
use serde_json::json;

use super::progress::Bars;
use super::size::{human, parse_range, parse_size};
use super::{Cli, Command, NetArgs};
use crate::engine::{offline_status, Engine, EngineOptions, HydrateOptions, Hydrator, Status};
use crate::seed::{add_seeded, seed, LocalIndex, SeedReport};
use crate::source::store::{IndexTrust, StoreSource};
use crate::source::RemoteSource;
use crate::target::{is_store_target, open_source, open_store, pinned_identity, target_record};

/// Chunk size when neither `--chunk-size` nor a chunk store names one.
const DEFAULT_CHUNK_SIZE: u64 = 64 << 10;

/// Seconds an offline command keeps retrying a failing fetch unless told otherwise.
const OFFLINE_DEADLINE_SECS: u64 = 300;

/// Boot set when no `--boot-range` is given: partition table and boot loader.
const DEFAULT_BOOT_RANGE: std::ops::Range<u64> = 0..1 << 20;

/// Arguments of `prepare`.
#[derive(Debug, Args)]
pub struct PrepareArgs {
    /// Disk holding the source image (raw file or block device).
    pub disk: PathBuf,
    /// Target image: http(s) URL (repeat for mirrors), file:// URL or path, or a
    /// chunk-store image as the path/URL of its index file (`STORE/indexes/NAME.idx`).
    #[arg(long = "target", required = true)]
    pub targets: Vec<String>,
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
    /// Bytes of a block device the source uses (default: end of its last partition).
    #[arg(long, value_parser = parse_size)]
    pub source_size: Option<u64>,
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
    /// Fetch from these URLs instead of the recorded ones (must be the same image).
    #[arg(long = "target")]
    pub targets: Vec<String>,
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
        Command::Commit(a) => match online(cli, &a.control, "commit")? {
            true => Ok(()),
            false => commit(cli, a),
        },
        Command::Rollback { disk, control } => match online(cli, control, "rollback")? {
            true => Ok(()),
            false => rollback(cli, disk),
        },
        Command::Serve(a) => super::serve::run(a, cli.json),
        Command::Export(a) => super::export::run(a, cli.json),
        Command::Publish(a) => super::store::publish(a, cli.json),
        Command::Keygen { prefix } => super::store::keygen(prefix, cli.json),
        Command::Store(c) => super::store::run(c, cli.json),
        Command::Demo(a) => super::demo::run(a, cli.json),
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
        Err(e) => Err(anyhow::anyhow!("{op} through {}: {e}", sock.display())),
    }
}

fn open_disk(path: &Path) -> Result<Arc<dyn Storage>> {
    crate::service::open_locked(path, true).with_context(|| format!("opening {}", path.display()))
}

fn open_meta(path: &Path) -> Result<MetaStore> {
    let storage = open_disk(path)?;
    MetaStore::open(storage)
        .with_context(|| format!("reading {}", path.display()))?
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{} is not a prepared disk (no streamboot superblock)",
                path.display()
            )
        })
}

fn net_with_default(net: &NetArgs) -> NetArgs {
    let mut n = net.clone();
    n.fetch_deadline.get_or_insert(OFFLINE_DEADLINE_SECS);
    n
}

/// Opens the pinned source of a prepared disk (recorded URLs unless overridden).
fn open_pinned(
    meta: &MetaStore,
    targets: &[String],
    net: &NetArgs,
) -> Result<Arc<dyn RemoteSource>> {
    let sb = meta.superblock();
    let urls = if targets.is_empty() {
        sb.target.urls.clone()
    } else {
        targets.to_vec()
    };
    let expected = pinned_identity(sb);
    open_source(
        &urls,
        Some(&expected),
        &net_with_default(net).http_options(),
    )
    .with_context(|| format!("opening target {}", urls.join(", ")))
}

fn emit(cli: &Cli, value: serde_json::Value, text: impl FnOnce() -> String) {
    if cli.json {
        println!("{value}");
    } else {
        println!("{}", text());
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn prepare(cli: &Cli, a: &PrepareArgs) -> Result<()> {
    let started = Instant::now();
    // Bad arguments are reported before anything is opened or fetched.
    if let Some(cs) = a.chunk_size {
        relocate::chunk_shift(cs)?;
    }
    let store_target = a.targets.iter().any(|t| is_store_target(t));
    let trust = index_trust(a, store_target)?;
    let profile = a
        .boot_profile
        .as_deref()
        .map(crate::profile::BootProfile::load)
        .transpose()
        .context("--boot-profile")?;
    let storage = open_disk(&a.disk)?;
    let net = net_with_default(&a.net);
    let opening = || format!("opening target {}", a.targets.join(", "));
    let (source, store): (Arc<dyn RemoteSource>, Option<Arc<StoreSource>>) = match &trust {
        Some(t) => {
            let st = Arc::new(
                open_store(&a.targets, None, &net.http_options(), Some(t)).with_context(opening)?,
            );
            (st.clone(), Some(st))
        }
        None => (
            open_source(&a.targets, None, &net.http_options()).with_context(opening)?,
            None,
        ),
    };
    let chunk_size = a
        .chunk_size
        .or(store.as_ref().map(|s| s.chunk_size()))
        .unwrap_or(DEFAULT_CHUNK_SIZE);
    relocate::chunk_shift(chunk_size)?;
    let bars = Bars::new(cli.json, false);
    // Seeding: hash the local source chunks before prepare writes anything.
    let local = match store.as_deref().filter(|_| !a.no_seed) {
        Some(st) if st.chunk_size() == chunk_size => Some(
            LocalIndex::build(
                storage.as_ref(),
                local_source_size(a, &storage)?,
                st,
                &mut |d, t| bars.update("hashing local chunks", d, t),
            )
            .context("hashing the local disk for seeding")?,
        ),
        Some(st) => {
            tracing::warn!(
                "not seeding: the store's chunk size ({}) differs from --chunk-size ({chunk_size})",
                st.chunk_size()
            );
            None
        }
        None => None,
    };
    let boot_seeded = std::cell::Cell::new(0u64);
    let disk = storage.clone();
    let mut read_target = |off: u64, buf: &mut [u8]| match (&local, &store) {
        (Some(idx), Some(st)) => {
            let n = idx.read_target(disk.as_ref(), st, off, buf)?;
            boot_seeded.set(boot_seeded.get() + n);
            Ok(())
        }
        _ => source.read_at(off, buf).map_err(|e| e.to_string()),
    };

    // An interrupted prepare resumes (same target) or is undone and started afresh.
    if let Some(mut meta) = MetaStore::open(storage.clone()).context("reading disk metadata")? {
        let sb = meta.superblock().clone();
        if sb.state != State::Preparing {
            bail!(
                "{} is already prepared (state {}); use status, commit or rollback",
                a.disk.display(),
                sb.state
            );
        }
        if sb.phase == PreparePhase::MapReady {
            let id = source.identity();
            if id.validator != sb.target.validator || id.size != sb.layout.target_size {
                bail!("an interrupted prepare for another target image is on this disk: roll it back first");
            }
            relocate::resume_prepare(&mut meta, &mut read_target, &mut |s, d, t| {
                bars.update(s, d, t)
            })
            .context("resuming prepare")?;
            let seeded = seed_disk(
                &mut meta,
                store.as_deref(),
                local.as_ref(),
                boot_seeded.get(),
                &bars,
            )?;
            bars.finish();
            return report_prepared(cli, &meta, true, seeded, started);
        }
        relocate::remove_area(&mut meta).context("undoing the interrupted prepare")?;
    }

    let id = source.identity().clone();
    let mut boot_ranges = if a.boot_ranges.is_empty() {
        vec![DEFAULT_BOOT_RANGE]
    } else {
        a.boot_ranges.clone()
    };
    if let Some(p) = &profile {
        p.check_image(id.size).context("--boot-profile")?;
        boot_ranges.extend(p.ranges());
    }
    let spec = PrepareSpec {
        chunk_size,
        target_size: id.size,
        target: target_record(source.as_ref(), &a.targets),
        boot_ranges,
        area_size: a.area_size,
        source_size: a.source_size,
        max_trial_starts: a.max_trial_starts,
    };
    let mut head = vec![0u8; (1u64 << 20).min(id.size) as usize];
    read_target(0, &mut head)
        .map_err(anyhow::Error::msg)
        .context("reading the target's partition table")?;
    // Only bytes placed on the disk count as seeded.
    boot_seeded.set(0);
    let plan = relocate::plan(storage.as_ref(), &spec, &head)
        .with_context(|| format!("planning {}", a.disk.display()))?;
    for n in &plan.notes {
        tracing::info!("{n}");
    }
    let uuid = *uuid::Uuid::new_v4().as_bytes();
    let mut meta = relocate::prepare(
        storage,
        &spec,
        &plan,
        uuid,
        now_unix(),
        &mut read_target,
        &mut |s, d, t| bars.update(s, d, t),
    )
    .context("prepare failed (run prepare again to resume, or rollback)")?;
    let seeded = seed_disk(
        &mut meta,
        store.as_deref(),
        local.as_ref(),
        boot_seeded.get(),
        &bars,
    )?;
    bars.finish();
    report_prepared(cli, &meta, false, seeded, started)
}

/// How a chunk-store index is trusted (`None`: not a chunk-store target). Refuses an
/// unverified index unless the insecure opt-out is explicit.
fn index_trust(a: &PrepareArgs, store_target: bool) -> Result<Option<IndexTrust>> {
    if !store_target {
        if !a.trusted_keys.is_empty() || a.insecure_unverified_index {
            bail!("--trusted-key and --insecure-unverified-index apply to a chunk-store target (…/indexes/NAME.idx) only");
        }
        return Ok(None);
    }
    if a.insecure_unverified_index {
        if !a.trusted_keys.is_empty() {
            bail!("give either --trusted-key or --insecure-unverified-index, not both");
        }
        return Ok(Some(IndexTrust::InsecureUnverified));
    }
    if a.trusted_keys.is_empty() {
        bail!(
            "a chunk-store target needs --trusted-key FILE.pub (the key its index is signed with), \
             or --insecure-unverified-index to skip the check"
        );
    }
    let keys = a
        .trusted_keys
        .iter()
        .map(|p| crate::store::sign::load_verifying_key(p))
        .collect::<Result<Vec<_>, _>>()
        .context("reading --trusted-key")?;
    Ok(Some(IndexTrust::Keys(keys)))
}

/// Bytes of the disk the source uses, as prepare's plan will take them: `--source-size`,
/// else the whole file (a block device: its length; partitions beyond it are not hashed).
fn local_source_size(a: &PrepareArgs, storage: &Arc<dyn Storage>) -> Result<u64> {
    match a.source_size {
        Some(s) => Ok(s),
        None => storage.len().context("reading the disk's size"),
    }
}

/// Seeds a freshly prepared disk from its local source chunks (`None`: no seeding) and
/// records the bytes prepare took from the disk for boot chunks.
fn seed_disk(
    meta: &mut MetaStore,
    store: Option<&StoreSource>,
    local: Option<&LocalIndex>,
    boot_seeded: u64,
    bars: &Bars,
) -> Result<Option<SeedReport>> {
    let (Some(store), Some(local)) = (store, local) else {
        return Ok(None);
    };
    let mut r = seed(meta, store, local, &mut |d, t| {
        bars.update("seeding from local chunks", d, t)
    })
    .context("seeding failed (the disk is prepared and usable; missing chunks are fetched)")?;
    add_seeded(meta, boot_seeded).context("recording seeded bytes")?;
    r.bytes += boot_seeded;
    Ok(Some(r))
}

fn report_prepared(
    cli: &Cli,
    meta: &MetaStore,
    resumed: bool,
    seeded: Option<SeedReport>,
    started: Instant,
) -> Result<()> {
    let s = offline_status(meta);
    let l = meta.layout();
    emit(
        cli,
        json!({"ok": true, "resumed": resumed, "status": s, "seed": seeded, "area_offset": l.area_offset,
               "disk_len": l.disk_len, "secs": started.elapsed().as_secs_f64()}),
        || {
            let seed = match seeded {
                Some(r) => format!(
                    "; seeded {} from the local disk ({} chunks at the same address, {} moved)",
                    human(r.bytes),
                    r.chunks_same_address,
                    r.chunks_moved
                ),
                None => String::new(),
            };
            format!(
                "prepared: {} boot chunks home ({} of source saved), released area of {} at byte {}, \
                 {} slots of {}; state {}{seed}",
                s.chunks_home,
                human(s.bytes_saved_source),
                human(l.disk_len - l.area_offset),
                l.area_offset,
                l.slot_count,
                human(l.chunk_size()),
                s.state
            )
        },
    );
    Ok(())
}

fn status_text(s: &Status) -> String {
    format!(
        "state:        {}\ntarget:       {} ({}, {})\nchunks:       {} of {}: {} home, {} in slots, {} zero, {} \
         missing ({:.1}% local)\ndirty chunks: {}\nsaved source: {} chunks ({})\nslots:        {} free of {}\n\
         seeded:       {}\ntrial starts: {} of {}",
        s.state,
        s.target_urls.join(", "),
        human(s.target_size),
        s.target_kind,
        s.chunks_total,
        human(s.chunk_size),
        s.chunks_home,
        s.chunks_slotted,
        s.chunks_zero,
        s.chunks_missing,
        s.local_fraction() * 100.0,
        s.chunks_dirty,
        s.chunks_saved_source,
        human(s.bytes_saved_source),
        s.slots_free,
        s.slots_total,
        human(s.bytes_seeded),
        s.start_counter,
        s.max_trial_starts
    )
}

fn status(cli: &Cli, disk: &Path) -> Result<()> {
    let storage = open_disk(disk)?;
    match MetaStore::open(storage).with_context(|| format!("reading {}", disk.display()))? {
        None => emit(cli, json!({"ok": true, "prepared": false}), || {
            format!("{}: plain disk (not prepared)", disk.display())
        }),
        Some(meta) => {
            let s = offline_status(&meta);
            emit(
                cli,
                json!({"ok": true, "prepared": true, "status": s}),
                || status_text(&s),
            );
        }
    }
    Ok(())
}

fn open_engine(meta: MetaStore, targets: &[String], net: &NetArgs) -> Result<Engine> {
    let state = meta.state();
    if state == State::Preparing {
        bail!("prepare was interrupted: run prepare again to resume it, or rollback");
    }
    let source = open_pinned(&meta, targets, net)?;
    Ok(Engine::new(meta, source, EngineOptions::default())?)
}

fn hydrate(cli: &Cli, a: &HydrateArgs) -> Result<()> {
    let meta = open_meta(&a.disk)?;
    let engine = open_engine(meta, &a.targets, &a.net)?;
    let bars = Bars::new(cli.json, true);
    let h = Hydrator::new(
        HydrateOptions {
            threads: a.threads,
            ..HydrateOptions::default()
        },
        a.rate,
    );
    let r = h
        .run(&engine, &|d, t| bars.update("hydrating", d, t))
        .context("hydration failed")?;
    bars.finish();
    engine.flush().context("flushing")?;
    emit(
        cli,
        json!({"ok": true, "report": r, "status": engine.status()}),
        || {
            let mut t = format!(
                "hydrated {} in {:.1} s ({}/s), {} requests; {} chunks still missing",
                human(r.bytes),
                r.secs,
                human((r.bytes as f64 / r.secs.max(1e-9)) as u64),
                r.requests,
                r.missing
            );
            if r.area_full {
                t.push_str("\nthe released area is full: commit fetches the rest straight to its home addresses");
            }
            t
        },
    );
    Ok(())
}

fn confirm(cli: &Cli, disk: &Path) -> Result<()> {
    let mut meta = open_meta(disk)?;
    match meta.state() {
        State::Prepared | State::Trial => meta.set_state(State::Confirmed)?,
        State::Confirmed => {}
        s => bail!("cannot confirm in state {s}"),
    }
    emit(cli, json!({"ok": true, "state": "confirmed"}), || {
        "target confirmed".into()
    });
    Ok(())
}

fn commit(cli: &Cli, a: &CommitArgs) -> Result<()> {
    let started = Instant::now();
    let mut meta = open_meta(&a.disk)?;
    // State errors first: they must not depend on the server being reachable, and they
    // are not failures that running commit again would resume.
    match meta.state() {
        s @ (State::Prepared | State::Trial) if !a.force => {
            bail!("the target is in state {s}, not confirmed: confirm it first, or commit --force")
        }
        s @ (State::RollingBack | State::RolledBack) => {
            bail!("cannot commit in state {s}: a rollback was started; run rollback to finish it")
        }
        State::Committed => {
            // Every target chunk is home already (a commit was interrupted while removing
            // the released area): finish without the engine, which no longer serves it.
            relocate::remove_area(&mut meta)
                .context("commit failed (run commit again to resume)")?;
            let target_size = meta.layout().target_size;
            emit(
                cli,
                json!({"ok": true, "state": "committed", "resumed": true,
                       "secs": started.elapsed().as_secs_f64()}),
                || {
                    format!(
                        "committed: {} now holds the target ({}); finished an interrupted commit",
                        a.disk.display(),
                        human(target_size)
                    )
                },
            );
            return Ok(());
        }
        _ => {}
    }
    let engine = open_engine(meta, &a.targets, &a.net)?;
    let bars = Bars::new(cli.json, false);
    engine
        .commit(a.force, HydrateOptions::default(), &|s, d, t| {
            bars.update(s, d, t)
        })
        .context("commit failed (run commit again to resume)")?;
    bars.finish();
    let s = engine.status();
    emit(
        cli,
        json!({"ok": true, "state": "committed", "status": s, "secs": started.elapsed().as_secs_f64()}),
        || {
            format!(
                "committed: {} now holds the target ({}); fetched {} during commit",
                a.disk.display(),
                human(s.target_size),
                human(s.bytes_fetched_background + s.bytes_fetched_demand)
            )
        },
    );
    Ok(())
}

fn rollback(cli: &Cli, disk: &Path) -> Result<()> {
    let mut meta = open_meta(disk)?;
    let before = offline_status(&meta);
    let state = meta.state();
    let bars = Bars::new(cli.json, false);
    relocate::rollback(&mut meta, &mut |s, d, t| bars.update(s, d, t))
        .context("rollback failed (run rollback again to resume)")?;
    bars.finish();
    let discarded = matches!(state, State::Trial | State::Confirmed) || before.chunks_dirty > 0;
    emit(
        cli,
        json!({"ok": true, "state": "rolled-back", "guest_writes_discarded": discarded}),
        || {
            let mut t = format!("rolled back: {} holds the source again", disk.display());
            if discarded {
                t.push_str(" (writes made while the target ran were discarded)");
            }
            t
        },
    );
    Ok(())
}
