//! `streamboot serve`: the vhost-user-blk backend over the engine (the daemon wiring is
//! [`crate::migration::daemon`]; this parses the arguments and the config file, takes a
//! socket handed over by systemd or `--fd`, writes the pidfile and prints the ready line).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};

use super::config;
use super::size::{human, parse_size};
use super::NetArgs;
use crate::migration::daemon::{Daemon, DaemonOptions};
use crate::service::ServiceConfig;
use crate::vhost::socket::{inherited_listener, listener_path, systemd_listener};

/// Arguments of `serve`. Every one is also a key of `--config` (its long name; the disk
/// is `disk`): so every field is optional here, and defaults are applied after the
/// command line and the file are merged ([`config::merge`]). A new option is a new
/// field (an `Option`, a `bool` or a `Vec`) plus one line in `config::merge`.
#[derive(Debug, Clone, Default, Args, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct ServeArgs {
    /// Disk (prepared, or plain: then it is served as it is).
    pub disk: Option<PathBuf>,
    /// vhost-user socket to create (mode 0600, or 0660 with --socket-group). Not needed
    /// when systemd passes the socket (LISTEN_FDS) or with --fd.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Serve on this listening unix socket, already open as file descriptor N (handed
    /// over by the parent process) instead of creating --socket.
    #[arg(long, value_name = "N")]
    pub fd: Option<i32>,
    /// Read options from this TOML file (keys: the long option names, e.g.
    /// `socket = "/run/streamboot/disk1.sock"`; the disk is `disk`). Options on the
    /// command line override the file's.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Write the process id to FILE once the socket listens (removed at exit).
    #[arg(long, value_name = "FILE")]
    pub pidfile: Option<PathBuf>,
    /// Number of virtqueues, one worker thread each (default 1).
    #[arg(long)]
    pub queues: Option<u16>,
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
    #[serde(rename = "target")]
    pub targets: Vec<String>,
    /// Like --target, with the URLs read from FILE (one a line): for URLs that carry
    /// credentials, which then stay off the command line and out of config files.
    #[arg(long = "target-file", value_name = "FILE")]
    #[serde(rename = "target-file")]
    pub target_files: Vec<PathBuf>,
    /// Do not hydrate in the background (fetch on demand only).
    #[arg(long)]
    pub no_hydrate: bool,
    /// Background hydration limit in bytes per second (default 0 = unlimited).
    #[arg(long, value_parser = parse_size)]
    #[serde(deserialize_with = "config::de_size")]
    pub rate: Option<u64>,
    /// Control socket (HTTP/JSON: status, confirm, commit, rollback, hydration, metrics).
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// URL to POST each state change and the final success or failure to (JSON).
    #[arg(long)]
    pub notify: Option<String>,
    /// Sign each notification with the key in FILE (HMAC-SHA256 header; never logged;
    /// the file must be 0600 or 0400: readable by group or others is refused).
    /// Needs --notify or --notify-file.
    #[arg(long, value_name = "FILE")]
    pub notify_secret: Option<PathBuf>,
    /// Serve GET /metrics (Prometheus, read-only) on this TCP address too.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Like --notify, with the URL read from FILE.
    #[arg(long, value_name = "FILE")]
    pub notify_file: Option<PathBuf>,
    /// Record the chunks the guest reads, from its connection until confirm (or until
    /// serve stops), as a boot profile in FILE (for prepare/serve/publish --boot-profile).
    #[arg(long, value_name = "FILE")]
    pub record_profile: Option<PathBuf>,
    /// Hydrate the chunks of this boot profile first, in its order.
    #[arg(long, value_name = "FILE")]
    pub boot_profile: Option<PathBuf>,
    #[command(flatten)]
    #[serde(flatten)]
    pub net: NetArgs,
}

/// Runs the backend until SIGTERM/SIGINT; then drains, flushes and returns.
pub fn run(cli: &ServeArgs, json: bool) -> Result<()> {
    let a = match &cli.config {
        Some(path) => config::merge(cli.clone(), config::load(path)?),
        None => cli.clone(),
    };
    let disk = config::required(&a.disk, "a DISK")?;
    let mut targets = a.targets.clone();
    for f in &a.target_files {
        targets.extend(config::read_secret_urls(f)?);
    }
    let notify = notify_url(&a)?;
    if a.notify_secret.is_some() && notify.is_none() {
        bail!("--notify-secret needs --notify or --notify-file (nothing would be signed)");
    }
    let (listener, socket) = vhost_socket(&a)?;
    let boot_profile = a
        .boot_profile
        .as_deref()
        .map(crate::profile::BootProfile::load)
        .transpose()
        .context("--boot-profile")?;
    let service = ServiceConfig {
        disk: disk.clone(),
        read_only: a.read_only,
        max_trial_starts: a.max_trial_starts,
        targets,
        http: a.net.http_options(),
        hydrate: !a.no_hydrate,
        hydrate_rate: a.rate.unwrap_or(0),
        record_profile: a.record_profile.clone(),
        boot_profile,
    };
    let daemon = Daemon::start(DaemonOptions {
        queues: a.queues.unwrap_or(1),
        socket_group: a.socket_group.clone(),
        control: a.control.clone(),
        notify,
        notify_secret: a.notify_secret.clone(),
        metrics_listen: a.metrics_listen,
        signals: true,
        allow_unsealed_memory: a.allow_unsealed_memory,
        listener: listener.map(Arc::new),
        sd_notify: true,
        ..DaemonOptions::new(service, socket.clone())
    })?;
    // After the start, so that an error stays the one line printed.
    warn_secrets_in_argv(cli);
    let _pidfile = match a.pidfile.as_deref().map(PidFile::write).transpose() {
        Ok(p) => p,
        Err(e) => {
            // Stop as after SIGTERM (flushed, socket removed) before reporting.
            daemon.shutdown_handle().shutdown();
            let _ = daemon.run();
            return Err(e);
        }
    };
    daemon.notify_ready();
    let svc = daemon.service();
    let st = svc.status();
    let capacity = daemon.capacity();
    if json {
        let line = serde_json::json!({"event": "ready", "socket": socket, "mode": svc.mode(),
                                      "state": st.state, "capacity": capacity});
        println!("{line}");
    } else {
        println!(
            "serving {} ({:?}, state {}, {}) on {}",
            disk.display(),
            svc.mode(),
            st.state,
            human(capacity),
            socket.display()
        );
    }
    std::io::stdout().flush().ok();
    daemon.run()?;
    Ok(())
}

/// A URL with credentials given on the command line is readable by every local user
/// (`ps`, /proc/PID/cmdline): say so, and where it belongs instead (never showing it).
fn warn_secrets_in_argv(cli: &ServeArgs) {
    use crate::net::redact_url;
    let urls = cli.targets.iter().map(|u| ("--target", "--target-file", u));
    for (flag, file, url) in urls.chain(cli.notify.iter().map(|u| ("--notify", "--notify-file", u)))
    {
        if redact_url(url) != *url {
            tracing::warn!(
                "{flag} {} carries credentials (user:password@ or a ?query) on the command line, \
                 where every local user can read it (ps); give it in a 0600 file with {file}",
                redact_url(url)
            );
        }
    }
}

/// `--notify URL`, or the one URL of `--notify-file FILE`.
fn notify_url(a: &ServeArgs) -> Result<Option<String>> {
    match (&a.notify, &a.notify_file) {
        (Some(_), Some(_)) => bail!("give --notify or --notify-file, not both"),
        (_, Some(f)) => match config::read_secret_urls(f)?.as_slice() {
            [url] => Ok(Some(url.clone())),
            urls => bail!(
                "the URL file {} holds {} URLs; --notify-file takes one",
                f.display(),
                urls.len()
            ),
        },
        (n, None) => Ok(n.clone()),
    }
}

/// The socket to serve on: one handed over (`--fd`, or systemd's `LISTEN_FDS`) or
/// `--socket` to create; with the path shown in messages.
fn vhost_socket(a: &ServeArgs) -> Result<(Option<std::os::unix::net::UnixListener>, PathBuf)> {
    let passed = match a.fd {
        Some(fd) => Some(inherited_listener(fd).context("--fd")?),
        None => systemd_listener()?,
    };
    match passed {
        Some(l) => {
            if let Some(s) = &a.socket {
                tracing::info!(socket = %s.display(), "serving on the socket passed in; --socket is not created");
            }
            let path = listener_path(&l).unwrap_or_else(|| PathBuf::from("(passed socket)"));
            Ok((Some(l), path))
        }
        None => Ok((
            None,
            config::required(
                &a.socket,
                "--socket (or a socket passed by systemd, or --fd)",
            )?,
        )),
    }
}

/// `--pidfile`: written atomically (a temporary file renamed over it) once the socket
/// listens, removed when serve exits if it still holds our pid.
struct PidFile {
    path: PathBuf,
    content: String,
}

impl PidFile {
    fn write(path: &Path) -> Result<Self> {
        let content = format!("{}\n", std::process::id());
        let name = path
            .file_name()
            .with_context(|| format!("--pidfile {}: not a file name", path.display()))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        // A random name created with O_EXCL: nothing planted there is followed.
        tmp_name.push(format!(".{:016x}.tmp", rand::random::<u64>()));
        let tmp = path.with_file_name(tmp_name);
        let written = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)?;
            f.write_all(content.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e).with_context(|| format!("writing --pidfile {}", path.display()));
        }
        Ok(Self {
            path: path.to_path_buf(),
            content,
        })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if std::fs::read_to_string(&self.path).is_ok_and(|c| c == self.content) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
