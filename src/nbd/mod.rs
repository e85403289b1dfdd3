//! NBD export: every image of a chunk store as a read-only NBD export, so a machine with
//! no local disk can boot an image sector by sector (design section 5).
//!
//! - [`proto`]: the wire protocol, pure (handshake, options, requests, simple replies)
//!   over any `Read + Write`; [`negotiate`] and [`transmit`] are its entry points.
//! - [`cache`]: a byte-bounded LRU of verified chunks shared by all exports, with
//!   single-flight misses.
//! - [`store`]: the catalog of a store's images, read through the verified
//!   [`crate::source::store::StoreSource`].
//! - [`transmit`]: the transmission phase (requests and replies).
//! - [`budget`]: the memory budget of reply buffers shared by all connections.
//! - [`server`]: the TCP server (a thread per connection, bounded; handshake deadline,
//!   idle timeout).

pub mod budget;
pub mod cache;
pub mod proto;
pub mod server;
pub mod store;
pub mod transmit;

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;

pub use budget::{ConnectionBudget, ReplyBudget};
pub use cache::ChunkCache;
pub use proto::{negotiate, Negotiated};
pub use server::{NbdServer, ServerHandle, ServerOptions};
pub use store::StoreCatalog;
pub use transmit::{transmit, transmit_with, TransmitOptions, TransmitStats};

/// A read-only image served over NBD.
pub trait Export: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Preferred request size (a power of two), advertised with `NBD_INFO_BLOCK_SIZE`.
    fn preferred_block_size(&self) -> u32 {
        4096
    }
    /// Fills `buf` with the bytes at `offset` (the range is inside the image: the protocol
    /// layer checked). `Err` is a message for the log; the client gets `EIO`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String>;
}

/// The exports a server offers, by name.
pub trait Catalog: Send + Sync {
    /// Names for `NBD_OPT_LIST` (an `Err` goes to the log only).
    fn names(&self) -> Result<Vec<String>, String>;
    /// The export called `name` (`""` is the default export), `None` if there is none,
    /// `Err` when it exists but cannot be opened (the message goes to the log only: it
    /// may name host paths; the client gets a generic one).
    fn open(&self, name: &str) -> Result<Option<Arc<dyn Export>>, String>;
}

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error("bad {what} magic {found:#x}")]
    BadMagic { what: &'static str, found: u64 },
    #[error("unknown client flags {0:#x}")]
    ClientFlags(u32),
    #[error("option {option} carries {len} bytes, more than the server accepts")]
    OptionTooLong { option: u32, len: u32 },
    #[error("too many options in one negotiation")]
    TooManyOptions,
    #[error("no export named {0:?}")]
    UnknownExport(String),
    #[error("export {name:?} cannot be opened: {reason}")]
    ExportUnavailable { name: String, reason: String },
    #[error("write request of {0} bytes exceeds the request limit")]
    RequestTooLong(u32),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("idle for {0:?}: closing")]
    Idle(std::time::Duration),
    #[error("handshake not finished within {0:?}")]
    HandshakeDeadline(std::time::Duration),
}

/// A catalog of in-memory images: for protocol tests and fuzzing of [`negotiate`] and
/// [`transmit`] without a store.
#[derive(Default)]
pub struct MemoryCatalog {
    images: BTreeMap<String, Arc<MemoryExport>>,
}

/// An image held in memory.
pub struct MemoryExport(pub Vec<u8>);

impl Export for MemoryExport {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        let start = usize::try_from(offset).map_err(|e| e.to_string())?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.0.get(start..end))
            .ok_or("read outside the image")?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

impl MemoryCatalog {
    /// Adds (or replaces) the image `name`.
    pub fn insert(&mut self, name: &str, data: Vec<u8>) {
        self.images
            .insert(name.to_owned(), Arc::new(MemoryExport(data)));
    }
}

impl Catalog for MemoryCatalog {
    fn names(&self) -> Result<Vec<String>, String> {
        Ok(self.images.keys().cloned().collect())
    }

    fn open(&self, name: &str) -> Result<Option<Arc<dyn Export>>, String> {
        Ok(self.images.get(name).map(|e| e.clone() as Arc<dyn Export>))
    }
}

#[cfg(test)]
mod tests;
