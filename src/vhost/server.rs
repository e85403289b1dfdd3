//! The socket server: accepts one frontend at a time and, when it goes away, serves the
//! next one with the same block device, until shut down.
//!
//! Each connection gets a fresh vhost-user device (rings, workers, negotiated features);
//! the block device and the I/O pool are shared by all of them. Before the next
//! connection is accepted, every request of the previous one that reached the I/O pool
//! has finished, so a reconnecting VM never races its own predecessor's writes.

use std::os::unix::fs::MetadataExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{Error as DaemonError, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::blockdev::{BlockBackend, DeviceEvents};

use super::backend::{BlkBackend, DeviceParams};
use super::pool::IoPool;
use super::socket::{bind_socket, resolve_group};
use super::VhostError;

/// How long a shutdown waits for requests of the departed frontend (they are cancelled
/// first; only a source that ignores cancellation is still running then).
const SHUTDOWN_DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

/// Largest number of queues (the worker map is a 64-bit mask).
pub const MAX_QUEUES: u16 = 64;

/// How to serve.
#[derive(Clone)]
pub struct ServeOptions {
    /// Path of the listening unix socket.
    pub socket_path: PathBuf,
    /// Number of virtqueues offered (`num-queues`), 1 to 64; one worker thread each.
    pub num_queues: u16,
    /// Largest virtqueue size a frontend may configure (a power of two).
    pub queue_size: u16,
    /// Threads that run requests which may wait on the network.
    pub io_threads: usize,
    /// Group (name or number) given access to the socket: mode 0660 instead of 0600.
    pub socket_group: Option<String>,
    /// Shutdown handle to obey; a new one is made when `None`
    /// (see [`VhostBlkServer::shutdown_handle`]).
    pub shutdown: Option<ShutdownHandle>,
    /// Told of connections and device starts (trial boots are counted there).
    pub events: Option<Arc<dyn DeviceEvents>>,
    /// Accept guest memory not sealed against shrinking (see `vhost::memory`).
    pub allow_unsealed_memory: bool,
}

impl std::fmt::Debug for ServeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeOptions")
            .field("socket_path", &self.socket_path)
            .field("num_queues", &self.num_queues)
            .field("queue_size", &self.queue_size)
            .field("io_threads", &self.io_threads)
            .field("socket_group", &self.socket_group)
            .finish_non_exhaustive()
    }
}

impl ServeOptions {
    /// One queue, queues of up to 1024 entries, four I/O threads, socket mode 0600.
    pub fn new(socket_path: impl Into<PathBuf>) -> Self {
        Self {
            socket_path: socket_path.into(),
            num_queues: 1,
            queue_size: 1024,
            io_threads: 4,
            socket_group: None,
            shutdown: None,
            events: None,
            allow_unsealed_memory: false,
        }
    }

    fn validate(&self) -> Result<(), VhostError> {
        if self.num_queues == 0 || self.num_queues > MAX_QUEUES {
            return Err(VhostError::InvalidOptions(format!(
                "num-queues must be 1..={MAX_QUEUES}, not {}",
                self.num_queues
            )));
        }
        if !self.queue_size.is_power_of_two() || self.queue_size < 2 {
            return Err(VhostError::InvalidOptions(format!(
                "queue size must be a power of two of at least 2, not {}",
                self.queue_size
            )));
        }
        if self.io_threads == 0 {
            return Err(VhostError::InvalidOptions(
                "io-threads must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

struct ShutdownInner {
    requested: AtomicBool,
    event: EventFd,
    connection: Mutex<Option<vhost_user_backend::ShutdownHandle>>,
}

/// Stops a running server: the current connection is closed, in-flight requests are
/// drained, the block device is flushed and [`VhostBlkServer::run`] returns.
///
/// Cheap to clone and to call from any thread (not from inside a signal handler: hook
/// SIGTERM/SIGINT with a thread that waits for signals and calls [`Self::shutdown`]).
#[derive(Clone)]
pub struct ShutdownHandle {
    inner: Arc<ShutdownInner>,
}

impl std::fmt::Debug for ShutdownHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShutdownHandle")
            .field("requested", &self.is_requested())
            .finish()
    }
}

impl ShutdownHandle {
    /// A handle not yet triggered.
    pub fn new() -> Result<Self, VhostError> {
        Ok(Self {
            inner: Arc::new(ShutdownInner {
                requested: AtomicBool::new(false),
                event: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?,
                connection: Mutex::new(None),
            }),
        })
    }

    /// Asks the server to stop. Idempotent.
    pub fn shutdown(&self) {
        self.inner.requested.store(true, Ordering::SeqCst);
        if let Err(e) = self.inner.event.write(1) {
            tracing::error!(error = %e, "cannot wake the vhost-user server");
        }
        if let Some(conn) = self.inner.connection.lock().as_ref() {
            conn.shutdown();
        }
    }

    /// True once [`Self::shutdown`] was called.
    pub fn is_requested(&self) -> bool {
        self.inner.requested.load(Ordering::SeqCst)
    }

    /// True while a frontend is connected, or its requests are still finishing.
    pub fn is_connected(&self) -> bool {
        self.inner.connection.lock().is_some()
    }

    fn set_connection(&self, conn: Option<vhost_user_backend::ShutdownHandle>) {
        *self.inner.connection.lock() = conn;
        // A shutdown that raced with the connection being set still reaches it.
        if self.is_requested() {
            if let Some(conn) = self.inner.connection.lock().as_ref() {
                conn.shutdown();
            }
        }
    }
}

/// What a finished [`VhostBlkServer::run`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServeSummary {
    /// Frontend connections served.
    pub connections: u64,
}

/// A bound vhost-user-blk server: the socket exists once [`VhostBlkServer::bind`]
/// returns, so a frontend may connect before [`VhostBlkServer::run`] is called.
pub struct VhostBlkServer {
    disk: Arc<dyn BlockBackend>,
    opts: ServeOptions,
    listener: Listener,
    /// Device and inode of the socket we created, to remove only our own socket (`None`:
    /// a socket handed to us, which its owner removes).
    socket_id: Option<(u64, u64)>,
    shutdown: ShutdownHandle,
    pool: Arc<IoPool>,
}

impl VhostBlkServer {
    /// Validates the options and creates the socket.
    pub fn bind(disk: Arc<dyn BlockBackend>, opts: ServeOptions) -> Result<Self, VhostError> {
        Self::listen(disk, opts, None)
    }

    /// Validates the options and serves on `listener`, a listening socket handed to us
    /// (systemd socket activation, `serve --fd`): its path is `opts.socket_path` for the
    /// logs only; it is neither created nor removed here.
    pub fn with_listener(
        disk: Arc<dyn BlockBackend>,
        opts: ServeOptions,
        listener: std::os::unix::net::UnixListener,
    ) -> Result<Self, VhostError> {
        Self::listen(disk, opts, Some(listener))
    }

    fn listen(
        disk: Arc<dyn BlockBackend>,
        opts: ServeOptions,
        inherited: Option<std::os::unix::net::UnixListener>,
    ) -> Result<Self, VhostError> {
        opts.validate()?;
        let gid = opts
            .socket_group
            .as_deref()
            .map(resolve_group)
            .transpose()?;
        let shutdown = match &opts.shutdown {
            Some(handle) => handle.clone(),
            None => ShutdownHandle::new()?,
        };
        let pool = Arc::new(IoPool::new(opts.io_threads)?);
        let (listener, socket_id) = match inherited {
            Some(listener) => (listener, None),
            None => {
                let listener = bind_socket(&opts.socket_path, gid)?;
                let meta = std::fs::symlink_metadata(&opts.socket_path)
                    .map_err(|e| VhostError::socket(&opts.socket_path, e))?;
                (listener, Some((meta.dev(), meta.ino())))
            }
        };
        tracing::info!(
            socket = %opts.socket_path.display(),
            capacity = disk.capacity(),
            read_only = disk.read_only(),
            queues = opts.num_queues,
            "vhost-user-blk listening"
        );
        Ok(Self {
            disk,
            listener: Listener::from(listener),
            socket_id,
            opts,
            shutdown,
            pool,
        })
    }

    /// The socket path.
    pub fn socket_path(&self) -> &Path {
        &self.opts.socket_path
    }

    /// A handle that stops [`Self::run`].
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// Serves frontends one after the other until shut down, then drains in-flight
    /// requests, flushes the block device and removes the socket.
    pub fn run(mut self) -> Result<ServeSummary, VhostError> {
        let mut summary = ServeSummary::default();
        let result = loop {
            match wait_readable(
                self.listener.as_raw_fd(),
                self.shutdown.inner.event.as_raw_fd(),
            ) {
                Ok(true) => {}
                Ok(false) => break Ok(()),
                Err(e) => break Err(e.into()),
            }
            if self.shutdown.is_requested() {
                break Ok(());
            }
            match self.serve_connection() {
                Ok(()) => summary.connections += 1,
                Err(e) => break Err(e),
            }
        };
        self.drain();
        self.pool.shutdown();
        let flushed = self.disk.flush().map_err(VhostError::Flush);
        tracing::info!(
            connections = summary.connections,
            "vhost-user-blk server stopped"
        );
        result.and(flushed).map(|()| summary)
    }

    /// Accepts one frontend and serves it until it disconnects or shutdown.
    fn serve_connection(&mut self) -> Result<(), VhostError> {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::<()>::new());
        let params = DeviceParams {
            num_queues: self.opts.num_queues,
            queue_size: self.opts.queue_size,
        };
        let backend = BlkBackend::new(
            self.disk.clone(),
            params,
            self.pool.clone(),
            mem.clone(),
            self.opts.events.clone(),
        )?;
        backend.allow_unsealed_memory(self.opts.allow_unsealed_memory);
        let result = self.run_daemon(&backend, mem);
        // The daemon and its workers are gone: release what they leaked. Requests of the
        // departed frontend are never acknowledged: drop those not started, cancel those
        // waiting on the network (`drain`), let the rest finish before anything else happens
        // (a rollback, the next connection), so none runs after a switch.
        backend.close_exit_events();
        backend.depart();
        if self.pool.pending() > 0 {
            tracing::info!(
                pending = self.pool.pending(),
                "waiting for in-flight requests of the departed frontend"
            );
        }
        self.drain();
        self.shutdown.set_connection(None);
        if let Some(ev) = &self.opts.events {
            ev.frontend_gone();
        }
        result
    }

    /// Waits until no request of a departed frontend is left, cancelling those that wait
    /// on the network again and again (a request that started its fetch after a cancel
    /// is caught by the next one). Once shutdown is requested the wait is bounded: a
    /// request still running then waits on a source that ignores cancellation; it was
    /// never acknowledged, and the process exiting under it is a crash the disk format
    /// is built for.
    fn drain(&self) {
        let mut deadline = None;
        loop {
            self.disk.cancel_waiting();
            if self
                .pool
                .wait_idle_for(std::time::Duration::from_millis(20))
            {
                return;
            }
            if self.shutdown.is_requested() {
                let d = *deadline.get_or_insert_with(|| std::time::Instant::now() + SHUTDOWN_DRAIN);
                if std::time::Instant::now() >= d {
                    break;
                }
            }
        }
        if self.pool.pending() > 0 {
            tracing::warn!(
                pending = self.pool.pending(),
                "requests still waiting on the network at shutdown; not waiting for them"
            );
        }
    }

    fn run_daemon(
        &mut self,
        backend: &BlkBackend,
        mem: GuestMemoryAtomic<GuestMemoryMmap<()>>,
    ) -> Result<(), VhostError> {
        let mut daemon = VhostUserDaemon::new("vhost-blk".into(), backend.clone(), mem)
            .map_err(|e| VhostError::Daemon(e.to_string()))?;
        for (q, handler) in daemon.get_epoll_handlers().iter().enumerate() {
            handler.register_listener(
                backend.completion_fd(q),
                EventSet::IN,
                backend.completion_token(),
            )?;
        }
        backend.prime();
        daemon
            .start(&mut self.listener)
            .map_err(|e| VhostError::Daemon(e.to_string()))?;
        tracing::info!("vhost-user frontend connected");
        if let Some(ev) = &self.opts.events {
            ev.frontend_connected();
        }
        self.shutdown.set_connection(daemon.shutdown_handle());
        let result = daemon.wait();
        // Still "connected" (see `is_connected`) until its requests are done.
        match result {
            Ok(()) => tracing::info!("vhost-user frontend disconnected"),
            Err(DaemonError::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => tracing::info!("vhost-user frontend disconnected"),
            // A frontend that breaks the protocol loses its connection, not the server.
            Err(e) => tracing::warn!(error = %e, "vhost-user connection ended with an error"),
        }
        if backend.inflight() > 0 {
            tracing::info!(
                inflight = backend.inflight(),
                "connection closed with requests in flight; they finish unacknowledged"
            );
        }
        Ok(())
    }
}

impl Drop for VhostBlkServer {
    fn drop(&mut self) {
        // Remove the socket only if it is still the one we created.
        let path = &self.opts.socket_path;
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if Some((meta.dev(), meta.ino())) == self.socket_id {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// Binds the socket and serves until the shutdown handle in `opts` (if any) fires.
pub fn serve(backend: Arc<dyn BlockBackend>, opts: ServeOptions) -> Result<(), VhostError> {
    VhostBlkServer::bind(backend, opts)?.run().map(|_| ())
}

/// Waits until `listener` has a connection (true) or `shutdown` fires (false).
fn wait_readable(listener: RawFd, shutdown: RawFd) -> std::io::Result<bool> {
    let mut fds = [
        libc::pollfd {
            fd: listener,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: shutdown,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a live array of two initialised pollfd structs and the count
        // passed matches its length; poll only writes their `revents` fields.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[1].revents != 0 {
            return Ok(false);
        }
        if fds[0].revents != 0 {
            return Ok(true);
        }
    }
}
