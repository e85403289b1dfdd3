//! Positional I/O on the disk: a regular file or a block device.
//!
//! Everything that touches the disk goes through [`Storage`], so that tests can put a
//! simulated volatile write cache (power loss) between the engine and the file.
//!
//! [`FileStorage`] is *fail-stop* on sync errors: Linux reports a failed writeback once
//! and may drop the dirty pages, so a retried `fdatasync` can succeed with the data
//! lost. The first failed sync takes the disk out of service: every later write and sync
//! fails, naming that first failure.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use parking_lot::Mutex;

/// Positional, thread-safe access to a disk.
pub trait Storage: Send + Sync {
    /// Reads exactly `buf.len()` bytes at `offset`; bytes past the end read as zeros.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Makes every completed write durable (fdatasync / flush of the device cache).
    fn sync(&self) -> io::Result<()>;
    /// Hints that `[offset, offset+len)` was written in bulk and will be synced soon:
    /// start writing it back now so the later sync has little left to do. No guarantee.
    fn start_writeback(&self, _offset: u64, _len: u64) {}
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// True when the length is zero.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// False when opened read-only (metadata repairs are then left for a writable open).
    fn is_writable(&self) -> bool {
        true
    }
    /// True for a block device: its length is fixed and it cannot be truncated.
    fn is_block_device(&self) -> bool;
    /// A block device's logical sector size (what its partition tables count in);
    /// `None` for a regular file.
    fn logical_sector_size(&self) -> io::Result<Option<u64>> {
        Ok(None)
    }
    /// The open file behind this storage, for vectored I/O straight between the disk and
    /// caller memory (`preadv`/`pwritev`); `None` (the default) sends callers through
    /// `read_at`/`write_at`. When `write` is set, fails as `write_at` would (out of service).
    fn direct_file(&self, _write: bool) -> io::Result<Option<&File>> {
        Ok(None)
    }
    /// Changes the length of a regular file (error on a block device).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes `[offset, offset+len)` read as zeros. The default writes zero buffers;
    /// implementations may punch holes or use the device's zero-out.
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        const STEP: usize = 1 << 20;
        let zeros = vec![0u8; STEP.min(len as usize).max(1)];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.write_at(offset + done, &zeros[..n])?;
            done += n as u64;
        }
        Ok(())
    }
}

/// A disk backed by an open file descriptor (regular file or block device).
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    path: PathBuf,
    block_device: bool,
    writable: bool,
    /// The first failed sync: the disk is out of service from then on.
    failed: OnceLock<String>,
    /// Locks held on the disk's other names (loop backing file, whole disk, ...).
    related_locks: Mutex<Vec<File>>,
}

impl FileStorage {
    /// Opens `path` read-write (or read-only).
    pub fn open(path: &Path, writable: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(writable).open(path)?;
        let block_device = file.metadata()?.file_type().is_block_device();
        Ok(Self {
            file,
            path: path.to_path_buf(),
            block_device,
            writable,
            failed: OnceLock::new(),
            related_locks: Mutex::new(Vec::new()),
        })
    }

    /// Takes an exclusive advisory lock on the disk (flock), so two streamboot
    /// processes never change one disk at once. Returns false when another holds it.
    ///
    /// The lock covers the disk's identity, not only this name: a loop device also locks
    /// its backing file, a partition locks its whole disk (shared, so that two partitions
    /// of one disk can be used at once), and a regular file locks the loop devices it is
    /// attached to (see [`crate::lock`]).
    pub fn try_lock(&self) -> io::Result<bool> {
        if !crate::lock::flock(&self.file, true)? {
            return Ok(false);
        }
        match crate::lock::lock_related(&self.file) {
            Ok(Some(held)) => {
                *self.related_locks.lock() = held;
                Ok(true)
            }
            other => {
                crate::lock::unlock(&self.file);
                other.map(|_| false)
            }
        }
    }

    /// Fails once a sync has failed (see the module documentation).
    fn in_service(&self) -> io::Result<()> {
        match self.failed.get() {
            None => Ok(()),
            Some(first) => Err(io::Error::other(format!(
                "{} is out of service since a sync failed ({first}); nothing more is written \
                 to it: check the device, then restart",
                self.path.display()
            ))),
        }
    }

    /// Records the first sync failure.
    fn sync_failed(&self, e: io::Error) -> io::Error {
        let first = self.failed.get_or_init(|| e.to_string());
        io::Error::new(
            e.kind(),
            format!(
                "syncing {} failed ({first}): the disk is out of service",
                self.path.display()
            ),
        )
    }

    /// The path this storage was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn device_len(&self) -> io::Result<u64> {
        // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
        const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
        let mut size: u64 = 0;
        // SAFETY: the fd is open for the lifetime of `self.file`, and BLKGETSIZE64 writes
        // exactly one u64 through the pointer, which points at a live, aligned u64.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), BLKGETSIZE64 as _, &mut size) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(size)
    }
}

impl Storage for FileStorage {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.in_service()?;
        self.file.write_all_at(buf, offset)
    }

    fn sync(&self) -> io::Result<()> {
        self.in_service()?;
        self.file.sync_data().map_err(|e| self.sync_failed(e))
    }

    fn start_writeback(&self, offset: u64, len: u64) {
        // SAFETY: plain syscall on an fd we own; no memory is passed. Failure only means
        // the later fdatasync does all the work, so the result is ignored.
        unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                offset as i64,
                len as i64,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }

    fn len(&self) -> io::Result<u64> {
        if self.block_device {
            self.device_len()
        } else {
            Ok(self.file.metadata()?.len())
        }
    }

    fn is_block_device(&self) -> bool {
        self.block_device
    }

    fn logical_sector_size(&self) -> io::Result<Option<u64>> {
        if !self.block_device {
            return Ok(None);
        }
        // BLKSSZGET = _IO(0x12, 104)
        const BLKSSZGET: libc::c_ulong = 0x1268;
        let mut size: libc::c_int = 0;
        // SAFETY: the fd is open for the lifetime of `self.file`, and BLKSSZGET writes
        // exactly one int through the pointer, which points at a live, aligned c_int.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), BLKSSZGET as _, &mut size) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Some(size as u64))
    }

    fn direct_file(&self, write: bool) -> io::Result<Option<&File>> {
        if write {
            self.in_service()?;
        }
        Ok(Some(&self.file))
    }

    fn is_writable(&self) -> bool {
        self.writable
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.in_service()?;
        if self.block_device {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a block device cannot change its length",
            ));
        }
        self.file.set_len(len)?;
        self.file.sync_all().map_err(|e| self.sync_failed(e))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.in_service()?;
        if len == 0 {
            return Ok(());
        }
        if !self.block_device {
            // Punching a hole keeps the file's length and makes the range read as zeros
            // without spending space; fall back to writing zeros where unsupported.
            let flags = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            // SAFETY: plain syscall on an fd we own; no memory is passed.
            let rc =
                unsafe { libc::fallocate(self.file.as_raw_fd(), flags, offset as i64, len as i64) };
            if rc == 0 {
                return Ok(());
            }
        }
        let zeros = vec![0u8; (1usize << 20).min(len as usize)];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.write_at(offset + done, &zeros[..n])?;
            done += n as u64;
        }
        Ok(())
    }
}
