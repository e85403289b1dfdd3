//! Positional I/O on the disk: a regular file or a block device.
//!
//! Everything that touches the disk goes through [`Storage`], so that tests can put a
//! simulated volatile write cache (power loss) between the engine and the file.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

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
    /// True for a block device: its length is fixed and it cannot be truncated.
    fn is_block_device(&self) -> bool;
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
        })
    }

    /// Takes an exclusive advisory lock on the disk (flock), so two streamboot
    /// processes never change one disk at once. Returns false when another holds it.
    pub fn try_lock(&self) -> io::Result<bool> {
        // SAFETY: plain syscall on an fd we own; no memory is passed.
        let rc = unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Ok(false)
        } else {
            Err(e)
        }
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
        self.file.write_all_at(buf, offset)
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
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

    fn set_len(&self, len: u64) -> io::Result<()> {
        if self.block_device {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a block device cannot change its length",
            ));
        }
        self.file.set_len(len)?;
        self.file.sync_all()
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
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
