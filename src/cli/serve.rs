//! `streamboot serve`: the vhost-user-blk backend over the engine.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use signal_hook::consts::{SIGINT, SIGTERM};

use super::size::{human, parse_size};
use super::NetArgs;
use crate::service::{Service, ServiceConfig};
use crate::vhost::{ServeOptions, ShutdownHandle, VhostBlkServer};

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
    let svc = Service::start(ServiceConfig {
        disk: a.disk.clone(),
        read_only: a.read_only,
        max_trial_starts: a.max_trial_starts,
        targets: a.targets.clone(),
        http: a.net.http_options(),
        hydrate: !a.no_hydrate,
        hydrate_rate: a.rate,
        record_profile: a.record_profile.clone(),
        boot_profile,
    })
    .with_context(|| format!("starting to serve {}", a.disk.display()))?;
    let shutdown = ShutdownHandle::new()?;
    let mut opts = ServeOptions::new(&a.socket);
    opts.num_queues = a.queues;
    opts.socket_group = a.socket_group.clone();
    opts.shutdown = Some(shutdown.clone());
    opts.events = Some(svc.clone());
    let server =
        VhostBlkServer::bind(svc.block_device(), opts).context("creating the vhost-user socket")?;
    let notifier = Arc::new(crate::control::Notifier::new(a.notify.clone()).context("--notify")?);
    {
        let n = notifier.clone();
        let disk = a.disk.display().to_string();
        svc.on_event(move |ev, msg| {
            n.notify(ev, serde_json::json!({"disk": disk, "message": msg}))
        });
    }
    let control = match &a.control {
        Some(path) => {
            let gid = a
                .socket_group
                .as_deref()
                .map(crate::vhost::socket::resolve_group)
                .transpose()?;
            let ops: Arc<dyn crate::control::ControlOps> = svc.clone();
            Some(
                crate::control::ControlServer::bind(path, ops, gid)
                    .context("creating the control socket")?
                    .spawn()
                    .context("starting the control API")?,
            )
        }
        None => None,
    };
    spawn_signal_thread(shutdown)?;

    let st = svc.status();
    let line = serde_json::json!({"event": "ready", "socket": a.socket, "mode": svc.mode(), "state": st.state,
                                  "capacity": crate::blockdev::BlockBackend::capacity(svc.block_device().as_ref())});
    if json {
        println!("{line}");
    } else {
        println!(
            "serving {} ({:?}, state {}, {}) on {}",
            a.disk.display(),
            svc.mode(),
            st.state,
            human(crate::blockdev::BlockBackend::capacity(
                svc.block_device().as_ref()
            )),
            a.socket.display()
        );
    }
    std::io::stdout().flush().ok();

    let summary = server.run().context("vhost-user server failed");
    let stopped = svc.shutdown().context("flushing at shutdown");
    if let Some(c) = control {
        c.shutdown();
    }
    let st = svc.status();
    notifier.notify(
        if summary.is_ok() && stopped.is_ok() {
            "stopped"
        } else {
            "failed"
        },
        serde_json::json!({"disk": a.disk.display().to_string(), "state": st.state,
                           "last_error": svc.last_error()}),
    );
    notifier.close(std::time::Duration::from_secs(5));
    let summary = summary?;
    stopped?;
    tracing::info!(connections = summary.connections, "stopped");
    Ok(())
}

fn spawn_signal_thread(shutdown: ShutdownHandle) -> Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .context("installing signal handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                tracing::info!(
                    signal = sig,
                    "shutting down: draining requests and flushing"
                );
                shutdown.shutdown();
            }
        })?;
    Ok(())
}
