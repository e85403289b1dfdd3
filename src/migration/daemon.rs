//! The daemon wiring of `streamboot serve`, written once (the CLI's `serve` and the demo
//! use it): opens the [`Service`] on the disk, binds the vhost-user-blk server on its
//! block device, the control API, the `--notify` hooks, and (optionally) the signal
//! thread that stops everything on SIGTERM/SIGINT, and the service manager's
//! notifications (sd_notify: `READY=1`, `STATUS=`, `STOPPING=1`).

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use signal_hook::consts::{SIGINT, SIGTERM};

use crate::blockdev::BlockBackend;
use crate::control::notify::NotifySecret;
use crate::control::{
    BindError, ControlHandle, ControlServer, MetricsHandle, Notifier, NotifyError,
};
use crate::service::{Service, ServiceConfig, ServiceError};
use crate::vhost::{ServeOptions, ServeSummary, ShutdownHandle, VhostBlkServer, VhostError};

/// How long the final notification may take at shutdown.
const NOTIFY_CLOSE: Duration = Duration::from_secs(5);

/// What to run.
#[derive(Clone, Debug)]
pub struct DaemonOptions {
    /// The service (disk, target, hydration, trial limit, profiles).
    pub service: ServiceConfig,
    /// vhost-user socket to create (with `listener`: its path, for the logs only).
    pub socket: PathBuf,
    /// A listening socket handed over (systemd socket activation, `--fd`) to serve on
    /// instead of creating `socket`.
    pub listener: Option<Arc<UnixListener>>,
    /// Tell the service manager (`NOTIFY_SOCKET`, when set) the state changes and
    /// `STOPPING=1` at shutdown; `READY=1` is [`Daemon::notify_ready`].
    pub sd_notify: bool,
    /// Number of virtqueues.
    pub queues: u16,
    /// Group given access to the sockets (mode 0660).
    pub socket_group: Option<String>,
    /// Control socket (`None`: no control API).
    pub control: Option<PathBuf>,
    /// URL to POST each state change to.
    pub notify: Option<String>,
    /// File holding the key that signs the notifications (HMAC-SHA256).
    pub notify_secret: Option<PathBuf>,
    /// TCP address serving `GET /metrics` only.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Stop on SIGTERM/SIGINT (a process that owns its signals: `serve`).
    pub signals: bool,
    /// Accept guest memory not sealed against shrinking (`--allow-unsealed-memory`).
    pub allow_unsealed_memory: bool,
}

impl DaemonOptions {
    /// One queue, no control API, no notifications, no signal handling.
    pub fn new(service: ServiceConfig, socket: PathBuf) -> Self {
        Self {
            service,
            socket,
            listener: None,
            sd_notify: false,
            queues: 1,
            socket_group: None,
            control: None,
            notify: None,
            notify_secret: None,
            metrics_listen: None,
            signals: false,
            allow_unsealed_memory: false,
        }
    }
}

/// Errors of the daemon: what was being done; the cause is the source.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The service could not start on the disk.
    #[error("starting to serve {}", disk.display())]
    Start {
        /// The disk.
        disk: PathBuf,
        /// Cause.
        #[source]
        source: ServiceError,
    },
    /// The vhost-user socket could not be created.
    #[error("creating the vhost-user socket")]
    Socket(#[source] VhostError),
    /// The socket handed over could not be taken (no descriptor left to duplicate it).
    #[error("taking the passed vhost-user socket")]
    Inherited(#[source] std::io::Error),
    /// Other vhost setup (shutdown handle, socket group).
    #[error(transparent)]
    Vhost(VhostError),
    /// The notification URL is not usable.
    #[error("--notify")]
    Notify(#[source] NotifyError),
    /// The control socket could not be created.
    #[error("creating the control socket")]
    ControlBind(#[source] BindError),
    /// The control API could not start.
    #[error("starting the control API")]
    ControlStart(#[source] BindError),
    /// The metrics listener could not start.
    #[error("--metrics-listen")]
    Metrics(#[source] BindError),
    /// The signal handlers could not be installed.
    #[error("installing signal handlers")]
    Signals(#[source] std::io::Error),
    /// The vhost-user server failed while running.
    #[error("vhost-user server failed")]
    Server(#[source] VhostError),
    /// Flushing at shutdown failed.
    #[error("flushing at shutdown")]
    Shutdown(#[source] ServiceError),
}

/// A started daemon: every socket exists (a VM may connect); [`Daemon::run`] serves.
pub struct Daemon {
    svc: Arc<Service>,
    server: VhostBlkServer,
    shutdown: ShutdownHandle,
    control: Option<ControlHandle>,
    metrics: Option<MetricsHandle>,
    notifier: Arc<Notifier>,
    disk: PathBuf,
    sd_notify: bool,
}

impl Daemon {
    /// Opens the service and binds the sockets.
    pub fn start(o: DaemonOptions) -> Result<Self, DaemonError> {
        let disk = o.service.disk.clone();
        // Operator mistakes (secret file, URL) are refused before the disk is opened.
        let secret = o.notify_secret.as_deref().map(NotifySecret::from_file);
        let secret = secret.transpose().map_err(DaemonError::Notify)?;
        let nopts = crate::control::NotifyOptions {
            secret,
            ..Default::default()
        };
        let notifier = Notifier::with_options(o.notify, nopts).map_err(DaemonError::Notify)?;
        let notifier = Arc::new(notifier);
        let svc = Service::start(o.service).map_err(|source| DaemonError::Start {
            disk: disk.clone(),
            source,
        })?;
        let shutdown = ShutdownHandle::new().map_err(DaemonError::Vhost)?;
        let mut opts = ServeOptions::new(&o.socket);
        opts.num_queues = o.queues;
        opts.socket_group = o.socket_group.clone();
        opts.shutdown = Some(shutdown.clone());
        opts.events = Some(svc.clone());
        opts.allow_unsealed_memory = o.allow_unsealed_memory;
        {
            let n = notifier.clone();
            let disk = disk.display().to_string();
            svc.on_event(move |ev, msg| {
                n.notify(ev, serde_json::json!({"disk": disk, "message": msg}))
            });
            svc.forward_fetch_errors();
        }
        let label = disk.display().to_string();
        let metrics = o
            .metrics_listen
            .map(|a| MetricsHandle::start(a, svc.clone(), &label));
        let metrics = metrics.transpose().map_err(DaemonError::Metrics)?;
        if o.sd_notify {
            // Events can fire under the service's locks: the line is made from the event
            // alone, without asking the service for its status.
            svc.on_event(|ev, msg| sd_status(&format!("{ev}: {msg}")));
        }
        let control = match &o.control {
            Some(path) => {
                let gid = o
                    .socket_group
                    .as_deref()
                    .map(crate::vhost::socket::resolve_group)
                    .transpose()
                    .map_err(DaemonError::Vhost)?;
                let ops: Arc<dyn crate::control::ControlOps> = svc.clone();
                let c = ControlServer::bind(path, ops, gid).map_err(DaemonError::ControlBind)?;
                let c = c.with_disk_label(label);
                Some(c.spawn().map_err(DaemonError::ControlStart)?)
            }
            None => None,
        };
        // The vhost-user socket last: a VM may connect the moment it exists, and by then
        // the control API (to confirm its trial) and the metrics listener answer.
        let server = match &o.listener {
            Some(l) => {
                let l = l.try_clone().map_err(DaemonError::Inherited)?;
                VhostBlkServer::with_listener(svc.block_device(), opts, l)
            }
            None => VhostBlkServer::bind(svc.block_device(), opts),
        }
        .map_err(DaemonError::Socket)?;
        if o.signals {
            spawn_signal_thread(shutdown.clone(), o.sd_notify).map_err(DaemonError::Signals)?;
        }
        Ok(Self {
            svc,
            server,
            shutdown,
            control,
            metrics,
            notifier,
            disk,
            sd_notify: o.sd_notify,
        })
    }

    /// Tells the service manager the daemon is ready (`READY=1`, with the state as
    /// `STATUS=`): call once every socket exists, so a frontend started after it connects.
    /// Without `sd_notify` (or without `NOTIFY_SOCKET`) nothing is sent.
    pub fn notify_ready(&self) {
        if self.sd_notify {
            let status = status_line(&self.svc);
            send_sd(&[
                sd_notify::NotifyState::Ready,
                sd_notify::NotifyState::Status(&status),
            ]);
        }
    }

    /// The service.
    pub fn service(&self) -> &Arc<Service> {
        &self.svc
    }

    /// Size of the device presented.
    pub fn capacity(&self) -> u64 {
        self.svc.block_device().capacity()
    }

    /// A handle that stops [`Daemon::run`] (drains requests, flushes).
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// Serves until shut down; then stops background work, makes everything durable,
    /// stops the control API and sends the final notification (`stopped` or `failed`).
    pub fn run(self) -> Result<ServeSummary, DaemonError> {
        let summary = self.server.run();
        if self.sd_notify {
            send_sd(&[
                sd_notify::NotifyState::Stopping,
                sd_notify::NotifyState::Status("stopping: flushing the disk"),
            ]);
        }
        let stopped = self.svc.shutdown();
        if let Some(c) = self.control {
            c.shutdown();
        }
        if let Some(m) = self.metrics {
            m.shutdown();
        }
        let st = self.svc.status();
        self.notifier.notify(
            if summary.is_ok() && stopped.is_ok() {
                "stopped"
            } else {
                "failed"
            },
            serde_json::json!({"disk": self.disk.display().to_string(), "state": st.state,
                               "last_error": self.svc.last_error()}),
        );
        self.notifier.close(NOTIFY_CLOSE);
        let summary = summary.map_err(DaemonError::Server)?;
        stopped.map_err(DaemonError::Shutdown)?;
        tracing::info!(connections = summary.connections, "stopped");
        Ok(summary)
    }
}

/// The state as the service manager shows it (`systemctl status`).
fn status_line(svc: &Service) -> String {
    let st = svc.status();
    format!("{:?}, state {}", svc.mode(), st.state).to_lowercase()
}

fn sd_status(status: &str) {
    // One line: a newline would start another assignment of the protocol.
    let line = status.replace(['\n', '\r'], " ");
    send_sd(&[sd_notify::NotifyState::Status(&line)]);
}

/// Sends to `NOTIFY_SOCKET` (nothing when unset); a failure is logged, never fatal.
fn send_sd(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET)");
    }
}

fn spawn_signal_thread(shutdown: ShutdownHandle, sd_notify: bool) -> std::io::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                tracing::info!(
                    signal = sig,
                    "shutting down: draining requests and flushing"
                );
                if sd_notify {
                    send_sd(&[
                        sd_notify::NotifyState::Stopping,
                        sd_notify::NotifyState::Status("stopping: draining requests"),
                    ]);
                }
                shutdown.shutdown();
            }
        })?;
    Ok(())
}
