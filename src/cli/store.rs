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
    /// Store directory (created if missing; serve it with any static HTTP server).
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
}

/// `store` subcommands.
#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Bytes shared and unique per image and in total.
    Stats {
        /// Store directory.
        dir: PathBuf,
    },
    /// Delete chunks no index references (safe against a concurrent publish).
    Gc {
        /// Store directory.
        dir: PathBuf,
        /// Only report what would be deleted.
        #[arg(long)]
        dry_run: bool,
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
    if let Some(path) = &a.boot_profile {
        opts.boot_profile = crate::profile::store_profile(path, &a.image, a.chunk_size)
            .context("--boot-profile")?;
    }
    let r = store::publish_with(&a.image, &a.store, &a.name, &opts)
        .with_context(|| format!("publishing {}", a.image.display()))?;
    emit(json_out, json!({"ok": true, "report": r}), || {
        format!("published {}: {r:?}", a.name)
    });
    Ok(())
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
        StoreCommand::Stats { dir } => {
            let s =
                store::stats(dir).with_context(|| format!("reading store {}", dir.display()))?;
            emit(json_out, json!({"ok": true, "stats": s}), || {
                let mut t = String::new();
                for i in &s.images {
                    t.push_str(&format!("{i:?}\n"));
                }
                t.push_str(&format!("total: {:?}", s.total));
                t
            });
        }
        StoreCommand::Gc { dir, dry_run } => {
            let r = store::gc::gc_with(dir, *dry_run)
                .with_context(|| format!("collecting garbage in {}", dir.display()))?;
            emit(json_out, json!({"ok": true, "report": r}), || {
                format!("gc: {r:?}")
            });
        }
    }
    Ok(())
}
