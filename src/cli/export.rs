//! `streamboot export`: the images of a chunk store as read-only NBD exports.

use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use signal_hook::consts::{SIGINT, SIGTERM};

use super::size::{human, parse_size};
use crate::nbd::{ChunkCache, NbdServer, ServerHandle, ServerOptions, StoreCatalog};
use crate::source::store::StoreSourceOptions;

/// Arguments of `export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Store: a directory, or the http(s):// URL of a store on a static server.
    #[arg(long)]
    pub store: String,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:10809")]
    pub listen: String,
    /// Public key (from `keygen`) whose signature an index must carry (repeatable).
    #[arg(long = "trusted-key")]
    pub trusted_keys: Vec<PathBuf>,
    /// Serve indexes without checking their signature (chunks are still checked against
    /// the index). Only for testing.
    #[arg(long, conflicts_with = "trusted_keys")]
    pub insecure_unsigned: bool,
    /// Export only this image (repeatable; required for an HTTP store, which cannot be
    /// listed). Default for a directory store: every image in it.
    #[arg(long = "image")]
    pub images: Vec<String>,
    /// Memory for verified chunks shared by all exports.
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub cache_size: u64,
    /// Clients served at once (more are closed right away).
    #[arg(long, default_value_t = 64)]
    pub max_connections: usize,
}

/// Runs the NBD server until SIGTERM/SIGINT.
pub fn run(a: &ExportArgs, json: bool) -> Result<()> {
    let mut opts = if a.insecure_unsigned {
        StoreSourceOptions::insecure_unverified()
    } else {
        let mut keys = Vec::new();
        for p in &a.trusted_keys {
            keys.push(
                crate::store::load_verifying_key(p)
                    .with_context(|| format!("loading --trusted-key {}", p.display()))?,
            );
        }
        let Some(first) = keys.first() else {
            bail!("--trusted-key FILE is required (or --insecure-unsigned to serve indexes nobody signed)");
        };
        let mut o = StoreSourceOptions::trusted(*first);
        o.trust = crate::source::store::IndexTrust::Keys(keys);
        o
    };
    opts.cache_chunks = 0;
    if a.max_connections == 0 {
        bail!("--max-connections must be at least 1");
    }
    let listen: SocketAddr = a
        .listen
        .to_socket_addrs()
        .with_context(|| format!("--listen {}", a.listen))?
        .next()
        .ok_or_else(|| anyhow!("--listen {}: no address", a.listen))?;
    let only = (!a.images.is_empty()).then(|| a.images.clone());
    let cache = Arc::new(ChunkCache::new(a.cache_size));
    let catalog = Arc::new(StoreCatalog::new(&a.store, only, opts, cache).map_err(|e| anyhow!(e))?);
    let names = catalog
        .open_all()
        .map_err(|e| anyhow!(e))
        .with_context(|| format!("opening the images of {}", a.store))?;
    let server = NbdServer::bind(
        listen,
        catalog,
        ServerOptions {
            max_connections: a.max_connections,
            ..ServerOptions::default()
        },
    )
    .with_context(|| format!("listening on {listen}"))?;
    let addr = server.local_addr()?;
    spawn_signal_thread(server.handle())?;
    if json {
        println!(
            "{}",
            serde_json::json!({"event": "ready", "listen": addr.to_string(), "exports": names})
        );
    } else {
        println!(
            "exporting {} image(s) of {} on nbd://{addr}/ ({}; cache {})",
            names.len(),
            a.store,
            names.join(", "),
            human(a.cache_size)
        );
    }
    std::io::stdout().flush().ok();
    let summary = server.run().context("NBD server failed")?;
    tracing::info!(
        connections = summary.connections,
        refused = summary.refused,
        "stopped"
    );
    Ok(())
}

fn spawn_signal_thread(handle: ServerHandle) -> Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .context("installing signal handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                tracing::info!(signal = sig, "shutting down: closing connections");
                handle.shutdown();
            }
        })?;
    Ok(())
}
