//! `streamboot export`: the images of a chunk store as read-only NBD exports.

use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use signal_hook::consts::{SIGINT, SIGTERM};

use super::size::{human, parse_size};
use super::store::parse_duration_secs;
use crate::nbd::server::MAX_READ_CHARGE;
use crate::nbd::{ChunkCache, NbdServer, ServerHandle, ServerOptions, StoreCatalog};
use crate::net::redact_url;
use crate::source::cache::{CacheConfig, SharedCache, DEFAULT_CACHE_SIZE};
use crate::source::store::StoreSourceOptions;
use crate::store::seen::SeenVersions;

/// Arguments of `export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Store: a directory, the http(s):// URL of a store on a static server, or
    /// s3://bucket/prefix (docs/s3.md).
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
    /// Memory for verified chunks shared by all exports. (The host-wide cache on disk is
    /// --cache DIR / --cache-size, as for every command: chunks missing in memory are
    /// looked up there before the store is asked; docs/cache.md.)
    #[arg(long, default_value = "64M", value_parser = parse_size)]
    pub memory_cache_size: u64,
    /// Clients served at once (more are closed right away).
    #[arg(long, default_value_t = 64)]
    pub max_connections: usize,
    /// File that remembers the highest index version served per image (created if
    /// missing): an older index is refused even after a restart. Default: remembered
    /// for the life of the process only.
    #[arg(long, value_name = "FILE")]
    pub seen_versions: Option<PathBuf>,
    /// Memory for reply buffers shared by all clients (at least 37M); a read waits for
    /// its share rather than allocate. One client may hold a quarter of it.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub reply_budget: u64,
    /// Close a connection with no request and no reply pending for this long (0: never;
    /// a client that stays connected while idle, e.g. a root file system over NBD, then
    /// needs to reconnect, like QEMU's `reconnect-delay`).
    #[arg(long, default_value = "15m", value_parser = parse_duration_secs)]
    pub idle_timeout: u64,
    /// Time a client has for the whole handshake, from connect to choosing an export.
    #[arg(long, default_value = "30s", value_parser = parse_duration_secs)]
    pub handshake_timeout: u64,
    /// Close a connection whose client does not take a whole reply within this long
    /// (a 32 MiB read then needs about 0.6 MB/s; slower links: smaller reads or more).
    #[arg(long, default_value = "60s", value_parser = parse_duration_secs)]
    pub reply_timeout: u64,
    /// HTTP(S) options for a store given as a URL (headers, token, CAs, timeouts).
    #[command(flatten)]
    pub net: super::NetArgs,
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
    opts.fetch.http = a.net.http_options();
    // No control API can give an export new URLs: a 403 fails the read at once unless
    // --fetch-deadline says to wait.
    opts.fetch
        .http
        .deadline
        .get_or_insert(std::time::Duration::ZERO);
    if a.max_connections == 0 {
        bail!("--max-connections must be at least 1");
    }
    if a.handshake_timeout == 0 || a.reply_timeout == 0 {
        bail!("--handshake-timeout and --reply-timeout must be more than 0 seconds");
    }
    if a.reply_budget < MAX_READ_CHARGE {
        bail!(
            "--reply-budget must be at least {} (one maximal read)",
            human(MAX_READ_CHARGE)
        );
    }
    let listen: SocketAddr = a
        .listen
        .to_socket_addrs()
        .with_context(|| format!("--listen {}", a.listen))?
        .next()
        .ok_or_else(|| anyhow!("--listen {}: no address", a.listen))?;
    let only = (!a.images.is_empty()).then(|| a.images.clone());
    let cache = Arc::new(ChunkCache::new(a.memory_cache_size));
    let shared = match &a.net.cache {
        Some(dir) => Some(SharedCache::open(&CacheConfig {
            dir: dir.clone(),
            max_bytes: a.net.cache_size.unwrap_or(DEFAULT_CACHE_SIZE),
        })?),
        None => None,
    };
    let seen = match &a.seen_versions {
        Some(p) => SeenVersions::persistent(p).context("--seen-versions")?,
        None => SeenVersions::in_memory(),
    };
    let catalog = Arc::new(
        StoreCatalog::new(&a.store, only, opts, cache)
            .map_err(|e| anyhow!(e))?
            .with_seen_versions(seen)
            .with_shared_cache(shared),
    );
    let names = catalog
        .open_all()
        .map_err(|e| anyhow!(e))
        .with_context(|| format!("opening the images of {}", redact_url(&a.store)))?;
    let server = NbdServer::bind(
        listen,
        catalog,
        ServerOptions {
            max_connections: a.max_connections,
            handshake_timeout: Duration::from_secs(a.handshake_timeout),
            idle_timeout: (a.idle_timeout > 0).then(|| Duration::from_secs(a.idle_timeout)),
            reply_timeout: Duration::from_secs(a.reply_timeout),
            reply_budget: a.reply_budget,
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
            redact_url(&a.store),
            names.join(", "),
            human(a.memory_cache_size)
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
