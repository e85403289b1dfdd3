//! The vhost-user-blk backend: serves a [`BlockBackend`](crate::blockdev::BlockBackend)
//! to a VMM (QEMU `vhost-user-blk-pci`, cloud-hypervisor `--disk vhost_user=true`) or to
//! any other vhost-user frontend over a unix socket.
//!
//! Module map:
//! - [`server`]: the socket loop ([`serve`], [`VhostBlkServer`]) and its shutdown handle.
//! - [`socket`]: socket creation with safe permissions.
//! - [`config`]: feature bits and the virtio-blk config space.
//! - `backend`: the `VhostUserBackend` implementation (per-queue workers).
//! - [`memory`]: the checks on guest memory a frontend shares (region sizes, seals).
//! - `queue`, `pool`: out-of-order completion of requests that run off the queue worker
//!   (they may wait on the network, or they are large and run in parallel).

mod backend;
pub mod config;
pub mod memory;
mod pool;
mod queue;
pub mod server;
pub mod socket;
mod start;
#[cfg(test)]
mod tests;

use std::io;
use std::path::{Path, PathBuf};

pub use server::{serve, ServeOptions, ServeSummary, ShutdownHandle, VhostBlkServer};

use crate::blockdev::BlockError;

/// Errors of the vhost-user-blk server.
#[derive(Debug, thiserror::Error)]
pub enum VhostError {
    /// The options cannot work.
    #[error("invalid vhost-user-blk options: {0}")]
    InvalidOptions(String),
    /// Something that is not a socket exists at the socket path.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// Another server is accepting on the socket path.
    #[error("{0} is in use by another server")]
    SocketInUse(PathBuf),
    /// Creating or setting up the socket failed.
    #[error("socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The socket group does not exist.
    #[error("unknown group {0}")]
    UnknownGroup(String),
    /// The vhost-user daemon failed (setting up a connection or its workers).
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
    /// Other I/O failure (eventfds, threads, polling).
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    /// The final flush of the block device failed.
    #[error("final flush failed: {0}")]
    Flush(#[source] BlockError),
}

impl VhostError {
    fn socket(path: &Path, source: io::Error) -> Self {
        VhostError::Socket {
            path: path.to_path_buf(),
            source,
        }
    }
}
