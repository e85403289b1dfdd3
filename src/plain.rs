//! [`PlainDisk`]: a [`BlockBackend`] that serves a disk as it is, with no engine in between.
//!
//! Used to serve the disk after commit (it holds exactly the target), after rollback or
//! fallback (it holds exactly the source), and as the data-path baseline in benchmarks.

use std::path::Path;
use std::sync::Arc;

use boot_relocator::{FileStorage, Storage};

use crate::blockdev::{
    check_range, read_storage, write_storage, BlockBackend, BlockError, GuestBuf, GuestBufMut,
};

/// A plain disk over a [`Storage`]: every range is local.
pub struct PlainDisk {
    storage: Arc<dyn Storage>,
    capacity: u64,
    read_only: bool,
    serial: Vec<u8>,
    optimal_io_size: u32,
}

impl std::fmt::Debug for PlainDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlainDisk")
            .field("capacity", &self.capacity)
            .field("read_only", &self.read_only)
            .field("serial", &String::from_utf8_lossy(&self.serial))
            .finish()
    }
}

impl PlainDisk {
    /// Serves the whole of `storage` (its current length is the capacity).
    pub fn new(storage: Arc<dyn Storage>, read_only: bool) -> Result<Self, BlockError> {
        let capacity = storage.len()?;
        Ok(Self {
            storage,
            capacity,
            read_only,
            serial: b"streamboot".to_vec(),
            optimal_io_size: 4096,
        })
    }

    /// Opens a file or block device and serves all of it.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let storage = FileStorage::open(path, !read_only)?;
        Self::new(Arc::new(storage), read_only)
    }

    /// Serves only the first `capacity` bytes (for example the image size on a block
    /// device larger than the image). A capacity past the end of a regular file reads as
    /// zeros there, and writes extend the file.
    pub fn with_capacity(mut self, capacity: u64) -> Self {
        self.capacity = capacity;
        self
    }

    /// Sets the serial returned by `VIRTIO_BLK_T_GET_ID` (truncated to 20 bytes).
    pub fn with_serial(mut self, serial: &[u8]) -> Self {
        self.serial = serial[..serial.len().min(crate::virtio::ID_BYTES)].to_vec();
        self
    }

    /// Sets the optimal I/O size advertised in the topology (bytes, a power of two).
    pub fn with_optimal_io_size(mut self, size: u32) -> Self {
        if size.is_power_of_two() {
            self.optimal_io_size = size;
        }
        self
    }

    fn writable(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(offset, len, self.capacity)
    }
}

impl BlockBackend for PlainDisk {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn optimal_io_size(&self) -> u32 {
        self.optimal_io_size
    }

    fn read_into(&self, offset: u64, buf: &GuestBufMut<'_>) -> Result<(), BlockError> {
        check_range(offset, buf.len() as u64, self.capacity)?;
        Ok(read_storage(self.storage.as_ref(), offset, buf)?)
    }

    fn write_from(&self, offset: u64, buf: &GuestBuf<'_>) -> Result<(), BlockError> {
        self.writable(offset, buf.len() as u64)?;
        Ok(write_storage(self.storage.as_ref(), offset, buf)?)
    }

    fn flush(&self) -> Result<(), BlockError> {
        if self.read_only {
            return Ok(());
        }
        Ok(self.storage.sync()?)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        // Contents after a discard are unspecified; zeroing (a punched hole on a file)
        // releases the space and keeps reads deterministic.
        self.writable(offset, len)?;
        Ok(self.storage.write_zeroes(offset, len)?)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.writable(offset, len)?;
        Ok(self.storage.write_zeroes(offset, len)?)
    }

    fn device_id(&self) -> Vec<u8> {
        self.serial.clone()
    }

    fn is_local(&self, _offset: u64, _len: u64) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_writes_and_refuses_outside() {
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(1 << 20).unwrap();
        let disk = PlainDisk::open(file.path(), false).unwrap();
        assert_eq!(disk.capacity(), 1 << 20);
        disk.write_at(4096, b"hello").unwrap();
        let mut buf = [0u8; 5];
        disk.read_at(4096, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        disk.write_zeroes(0, 8192).unwrap();
        disk.read_at(4096, &mut buf).unwrap();
        assert_eq!(buf, [0; 5]);
        assert!(matches!(
            disk.read_at((1 << 20) - 2, &mut buf),
            Err(BlockError::OutOfRange { .. })
        ));
        assert!(matches!(
            disk.write_at(u64::MAX - 1, b"xx"),
            Err(BlockError::OutOfRange { .. })
        ));
        disk.flush().unwrap();
    }

    #[test]
    fn read_only_refuses_writes() {
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(65536).unwrap();
        let disk = PlainDisk::open(file.path(), true)
            .unwrap()
            .with_serial(b"abc");
        assert!(disk.read_only());
        assert!(matches!(disk.write_at(0, b"x"), Err(BlockError::ReadOnly)));
        assert!(matches!(disk.discard(0, 512), Err(BlockError::ReadOnly)));
        assert!(matches!(
            disk.write_zeroes(0, 512),
            Err(BlockError::ReadOnly)
        ));
        assert_eq!(disk.device_id(), b"abc");
        disk.flush().unwrap();
    }
}
