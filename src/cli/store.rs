//! Chunk-store commands: `publish`, `keygen`, `store stats`, `store gc`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde_json::json;

use super::size::parse_size;
use crate::store;

/// Arguments of `publish`.
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Raw image to publish.
    pub image: PathBuf,
    /// Store directory (created if missing; serve it with any static HTTP server), or
    /// s3://bucket/prefix (docs/s3.md).
    #[arg(long)]
    pub store: PathBuf,
    /// Name of the image's index (`indexes/NAME.idx`).
    #[arg(long)]
    pub name: String,
    /// Chunk size (power of two, 4K..4M).
    #[arg(long, default_value = "64K", value_parser = parse_size)]
    pub chunk_size: u64,
    /// Private key (PEM, from `keygen`) to sign the index with.
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Store new chunks zstd-compressed (when that makes them smaller).
    #[arg(long)]
    pub compress: bool,
    /// Boot profile (from `serve --record-profile`) to embed in the index.
    #[arg(long, value_name = "FILE")]
    pub boot_profile: Option<PathBuf>,
    /// Version recorded in the signed index (default: one more than the store's current
    /// index of this name). Must be above the current one: clients refuse older versions.
    #[arg(long = "version", value_name = "N")]
    pub image_version: Option<u64>,
    /// The index expires this long after publishing (e.g. 3600, 90m, 12h, 30d); readers
    /// that check the signature refuse it then. Default: never.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_secs)]
    pub valid_for: Option<u64>,
    #[command(flatten)]
    pub net: super::NetArgs,
}

/// Parses `N`, `Ns`, `Nm`, `Nh` or `Nd` into seconds (0 allowed).
pub fn parse_duration_secs(s: &str) -> Result<u64, String> {
    let (num, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c),
        _ => (s, 's'),
    };
    let mult = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(format!("{s:?}: unit must be s, m, h or d")),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?}: expected a duration such as 3600, 90m, 12h, 30d"))
}

/// `store` subcommands.
#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Bytes shared and unique per image and in total.
    Stats {
        /// Store directory, or s3://bucket/prefix.
        dir: PathBuf,
        #[command(flatten)]
        net: super::NetArgs,
    },
    /// Delete chunks no index references (safe against a concurrent publish).
    Gc {
        /// Store directory, or s3://bucket/prefix.
        dir: PathBuf,
        /// Only report what would be deleted.
        #[arg(long)]
        dry_run: bool,
        /// S3 stores only (they have no lock): keep unreferenced objects younger than this
        /// (e.g. 3600, 90m, 12h), which a publish still running may have uploaded before
        /// its index.
        #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration_secs)]
        grace: u64,
        #[command(flatten)]
        net: super::NetArgs,
    },
}

fn emit(json_out: bool, value: serde_json::Value, text: impl FnOnce() -> String) {
    if json_out {
        println!("{value}");
    } else {
        println!("{}", text());
    }
}

/// `publish`.
pub fn publish(a: &PublishArgs, json_out: bool) -> Result<()> {
    let key = a
        .key
        .as_deref()
        .map(store::load_signing_key)
        .transpose()
        .context("loading the signing key")?;
    let mut opts = store::PublishOptions::new(a.chunk_size);
    opts.key = key.as_ref();
    opts.compress = a.compress;
    opts.version = a.image_version;
    if a.valid_for == Some(0) {
        anyhow::bail!("--valid-for must be more than 0 seconds");
    }
    opts.valid_for = a.valid_for;
    if let Some(path) = &a.boot_profile {
        opts.boot_profile = crate::profile::store_profile(path, &a.image, a.chunk_size)
            .context("--boot-profile")?;
    }
    let r = match s3_store(&a.store, &a.net)? {
        Some(s3) => store::s3::publish(&a.image, &s3, &a.name, &opts),
        None => store::publish_with(&a.image, &a.store, &a.name, &opts),
    }
    .with_context(|| format!("publishing {}", a.image.display()))?;
    emit(json_out, json!({"ok": true, "report": r}), || {
        format!("published {} version {}: {r:?}", a.name, r.identity.version)
    });
    Ok(())
}

/// The S3 store named by `location` (`s3://bucket/prefix`), or `None` for a directory.
fn s3_store(
    location: &std::path::Path,
    net: &super::NetArgs,
) -> Result<Option<store::s3::S3Store>> {
    let Some(url) = location.to_str().filter(|l| crate::net::s3::is_s3_url(l)) else {
        return Ok(None);
    };
    let http = net.http_options();
    let opts = store::fetch::FetchOptions {
        http,
        ..Default::default()
    };
    let s3 =
        store::s3::S3Store::open(url, &opts).with_context(|| format!("opening store {url}"))?;
    Ok(Some(s3))
}

/// `keygen`.
pub fn keygen(prefix: &std::path::Path, json_out: bool) -> Result<()> {
    let k = store::keygen(prefix).context("generating a key pair")?;
    emit(json_out, json!({"ok": true, "keys": k}), || {
        format!(
            "private key {} (keep it secret), public key {}, key id {}",
            k.private_key.display(),
            k.public_key.display(),
            k.key_id
        )
    });
    Ok(())
}

/// `store ...`.
pub fn run(cmd: &StoreCommand, json_out: bool) -> Result<()> {
    match cmd {
        StoreCommand::Stats { dir, net } => {
            let s = match s3_store(dir, net)? {
                Some(s3) => store::s3::stats(&s3),
                None => store::stats(dir),
            }
            .with_context(|| format!("reading store {}", dir.display()))?;
            emit(json_out, json!({"ok": true, "stats": s}), || {
                let mut t = String::new();
                for i in &s.images {
                    t.push_str(&format!("{i:?}\n"));
                }
                t.push_str(&format!("total: {:?}", s.total));
                t
            });
        }
        StoreCommand::Gc {
            dir,
            dry_run,
            grace,
            net,
        } => {
            let context = || format!("collecting garbage in {}", dir.display());
            if let Some(s3) = s3_store(dir, net)? {
                let grace = std::time::Duration::from_secs(*grace);
                let r = store::s3::gc(&s3, grace, *dry_run).with_context(context)?;
                emit(json_out, json!({"ok": true, "report": r}), || {
                    format!("gc: {r:?}")
                });
                return Ok(());
            }
            let r = store::gc::gc_with(dir, *dry_run).with_context(context)?;
            emit(json_out, json!({"ok": true, "report": r}), || {
                format!("gc: {r:?}")
            });
        }
    }
    Ok(())
}
