//! The control socket itself: creating it (private unix socket), serving it until
//! shutdown (the accept loop, connection limits and timeouts) and removing it. What each
//! request gets is [`super::server`].

use std::future::Future;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::oneshot;

use super::http_serve;
use super::server::{handle, Shared, SHUTDOWN_GRACE};
use super::ControlOps;
use crate::vhost::socket::bind_socket;
use crate::vhost::VhostError;

/// Why the control socket could not be set up or run.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// Something that is not a socket exists at the path.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// Another server accepts connections on the path.
    #[error("{0} is in use: another streamboot serve is listening there")]
    InUse(PathBuf),
    /// Creating or setting up the socket failed.
    #[error("control socket {path}: {source}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// The TCP metrics listener could not be bound.
    #[error("metrics listener {addr}")]
    Tcp {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// The server's runtime or thread could not be started.
    #[error("control server: {0}")]
    Runtime(#[source] io::Error),
}

/// A bound control socket, not yet serving. Dropping it unused removes the socket.
pub struct ControlServer {
    /// `None` once [`serve`](Self::serve) took it.
    listener: Option<std::os::unix::net::UnixListener>,
    path: PathBuf,
    /// `(dev, ino)` of the socket file we created, so shutdown removes only our own.
    ident: (u64, u64),
    ops: Arc<dyn ControlOps>,
    /// Value of the `disk` label of every metric.
    disk: String,
}

impl std::fmt::Debug for ControlServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlServer")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl ControlServer {
    /// Creates the socket at `path`: mode 0600, or 0660 owned by group `gid`; never
    /// world-accessible, not even briefly. A stale socket (nobody listening) is replaced;
    /// a live one or a non-socket file is refused.
    pub fn bind(
        path: impl AsRef<Path>,
        ops: Arc<dyn ControlOps>,
        gid: Option<u32>,
    ) -> Result<Self, BindError> {
        let path = path.as_ref().to_path_buf();
        let listener = bind_socket(&path, gid).map_err(|e| match e {
            VhostError::NotASocket(p) => BindError::NotASocket(p),
            VhostError::SocketInUse(p) => BindError::InUse(p),
            VhostError::Socket { path, source } => BindError::Socket { path, source },
            other => BindError::Socket {
                path: path.clone(),
                source: io::Error::other(other.to_string()),
            },
        })?;
        let socket_err = |source| BindError::Socket {
            path: path.clone(),
            source,
        };
        let meta = std::fs::symlink_metadata(&path).map_err(socket_err)?;
        listener.set_nonblocking(true).map_err(socket_err)?;
        Ok(Self {
            listener: Some(listener),
            ident: (meta.dev(), meta.ino()),
            path,
            ops,
            disk: String::new(),
        })
    }

    /// Sets the `disk` label the metrics carry (the disk `serve` serves).
    pub fn with_disk_label(mut self, disk: impl Into<String>) -> Self {
        self.disk = disk.into();
        self
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves on a new thread with its own small tokio runtime until
    /// [`ControlHandle::shutdown`] (or the handle is dropped).
    pub fn spawn(self) -> Result<ControlHandle, BindError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .max_blocking_threads(4)
            .thread_name("sb-control-blk")
            .build()
            .map_err(BindError::Runtime)?;
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let path = self.path.clone();
        let thread = std::thread::Builder::new()
            .name("sb-control".into())
            .spawn(move || {
                let shutdown = async {
                    // A dropped sender (handle dropped) stops the server too.
                    let _ = stop_rx.await;
                };
                if let Err(e) = rt.block_on(self.serve(shutdown)) {
                    tracing::error!("control server stopped: {e}");
                }
                // An operation stuck in the blocking pool must not hold up shutdown.
                rt.shutdown_timeout(SHUTDOWN_GRACE);
            })
            .map_err(BindError::Runtime)?;
        Ok(ControlHandle {
            path,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// Serves in the calling tokio runtime until `shutdown` completes, then lets open
    /// requests finish (briefly) and removes the socket file.
    pub async fn serve(mut self, shutdown: impl Future<Output = ()>) -> Result<(), BindError> {
        let listener = self.listener.take().expect("a ControlServer serves once");
        let shared = Arc::new(Shared::new(
            self.ops.clone(),
            std::mem::take(&mut self.disk),
        ));
        let result = run(listener, &self.path, shared, shutdown).await;
        remove_own_socket(&self.path, self.ident);
        result
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        if self.listener.take().is_some() {
            remove_own_socket(&self.path, self.ident);
        }
    }
}

/// A running control server; stops it when shut down or dropped.
#[derive(Debug)]
pub struct ControlHandle {
    path: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ControlHandle {
    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting, lets open requests finish (at most about two seconds), removes
    /// the socket and joins the server thread.
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("control server thread panicked");
            }
        }
    }
}

impl Drop for ControlHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// Removes the socket at `path` if it is still the one we created.
fn remove_own_socket(path: &Path, ident: (u64, u64)) {
    match std::fs::symlink_metadata(path) {
        Ok(m) if (m.dev(), m.ino()) == ident => {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!("cannot remove control socket {}: {e}", path.display());
            }
        }
        _ => {}
    }
}

async fn run(
    listener: std::os::unix::net::UnixListener,
    path: &Path,
    shared: Arc<Shared>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), BindError> {
    let listener =
        tokio::net::UnixListener::from_std(listener).map_err(|source| BindError::Socket {
            path: path.to_path_buf(),
            source,
        })?;
    tracing::info!("control API listening on {}", path.display());
    let handler = |shared: Arc<Shared>, req| async move { handle(&shared, req).await };
    http_serve::serve(listener, shared, handler, "control socket", shutdown).await;
    tracing::info!("control API stopped");
    Ok(())
}
