//! `streamboot serve`: the vhost-user-blk backend over the engine (the daemon wiring is
//! [`crate::migration::daemon`]; this parses the arguments and prints the ready line).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

use super::size::{human, parse_size};
use super::NetArgs;
use crate::migration::daemon::{Daemon, DaemonOptions};
use crate::service::ServiceConfig;

/// Arguments of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Disk (prepared, or plain: then it is served as it is).
    pub disk: PathBuf,
    /// vhost-user socket to create (mode 0600, or 0660 with --socket-group).
    #[arg(long)]
    pub socket: PathBuf,
    /// Number of virtqueues (one worker thread each).
    #[arg(long, default_value_t = 1)]
    pub queues: u16,
    /// Refuse guest writes.
    #[arg(long)]
    pub read_only: bool,
    /// Group given access to the sockets (mode 0660).
    #[arg(long)]
    pub socket_group: Option<String>,
    /// Accept guest memory that is not sealed against shrinking (F_SEAL_SHRINK). QEMU's
    /// memory-backend-memfd seals by default; a frontend that does not (libblkio) needs
    /// this, and could then crash serve (SIGBUS) by truncating its memory.
    #[arg(long)]
    pub allow_unsealed_memory: bool,
    /// Trial starts (VM boots) without confirm before falling back to the source
    /// (default: the value given to prepare).
    #[arg(long)]
    pub max_trial_starts: Option<u8>,
    /// Fetch from these URLs instead of the recorded ones (same pinned image).
    #[arg(long = "target")]
    pub targets: Vec<String>,
    /// Do not hydrate in the background (fetch on demand only).
    #[arg(long)]
    pub no_hydrate: bool,
    /// Background hydration limit in bytes per second (0 = unlimited).
    #[arg(long, default_value = "0", value_parser = parse_size)]
    pub rate: u64,
    /// Control socket (HTTP/JSON: status, confirm, commit, rollback, hydration, metrics).
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// URL to POST each state change and the final success or failure to (JSON).
    #[arg(long)]
    pub notify: Option<String>,
    /// Sign each notification with the key in FILE (HMAC-SHA256 header; never logged).
    #[arg(long, value_name = "FILE", requires = "notify")]
    pub notify_secret: Option<PathBuf>,
    /// Serve GET /metrics (Prometheus, read-only) on this TCP address too.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Record the chunks the guest reads, from its connection until confirm (or until
    /// serve stops), as a boot profile in FILE (for prepare/serve/publish --boot-profile).
    #[arg(long, value_name = "FILE")]
    pub record_profile: Option<PathBuf>,
    /// Hydrate the chunks of this boot profile first, in its order.
    #[arg(long, value_name = "FILE")]
    pub boot_profile: Option<PathBuf>,
    #[command(flatten)]
    pub net: NetArgs,
}

/// Runs the backend until SIGTERM/SIGINT; then drains, flushes and returns.
pub fn run(a: &ServeArgs, json: bool) -> Result<()> {
    let boot_profile = a
        .boot_profile
        .as_deref()
        .map(crate::profile::BootProfile::load)
        .transpose()
        .context("--boot-profile")?;
    let service = ServiceConfig {
        disk: a.disk.clone(),
        read_only: a.read_only,
        max_trial_starts: a.max_trial_starts,
        targets: a.targets.clone(),
        http: a.net.http_options(),
        hydrate: !a.no_hydrate,
        hydrate_rate: a.rate,
        record_profile: a.record_profile.clone(),
        boot_profile,
    };
    let daemon = Daemon::start(DaemonOptions {
        queues: a.queues,
        socket_group: a.socket_group.clone(),
        control: a.control.clone(),
        notify: a.notify.clone(),
        notify_secret: a.notify_secret.clone(),
        metrics_listen: a.metrics_listen,
        signals: true,
        allow_unsealed_memory: a.allow_unsealed_memory,
        ..DaemonOptions::new(service, a.socket.clone())
    })?;
    let svc = daemon.service();
    let st = svc.status();
    let capacity = daemon.capacity();
    if json {
        let line = serde_json::json!({"event": "ready", "socket": a.socket, "mode": svc.mode(),
                                      "state": st.state, "capacity": capacity});
        println!("{line}");
    } else {
        println!(
            "serving {} ({:?}, state {}, {}) on {}",
            a.disk.display(),
            svc.mode(),
            st.state,
            human(capacity),
            a.socket.display()
        );
    }
    std::io::stdout().flush().ok();
    daemon.run()?;
    Ok(())
}
