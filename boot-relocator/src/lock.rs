//! Disk locks by identity: one disk can be reached by several names (a file and the loop
//! device attached to it, a partition and its whole disk), and `flock` only sees one
//! inode. [`lock_related`] takes the locks of the other names (sysfs tells them):
//!
//! | the disk is | also locked |
//! | --- | --- |
//! | a whole block device | exclusive: a loop device's backing file |
//! | a partition | shared: its whole disk and that disk's loop backing file |
//! | a regular file | exclusive: every loop device attached to it |
//!
//! A user of the whole disk (exclusive) and a user of one of its partitions (shared)
//! exclude each other; two partitions of one disk do not.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Non-blocking flock; `Ok(false)` when another open file holds a conflicting lock.
pub(crate) fn flock(f: &File, exclusive: bool) -> io::Result<bool> {
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    // SAFETY: plain syscall on an fd we own; no memory is passed.
    let rc = unsafe { libc::flock(f.as_raw_fd(), op | libc::LOCK_NB) };
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

/// Releases a lock taken by [`flock`].
pub(crate) fn unlock(f: &File) {
    // SAFETY: plain syscall on an fd we own; no memory is passed.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_UN) };
}

/// Locks the other names of the disk open as `file`. `Ok(None)`: one of them is held
/// by another streamboot (nothing stays locked).
pub(crate) fn lock_related(file: &File) -> io::Result<Option<Vec<File>>> {
    let meta = file.metadata()?;
    let names = if meta.file_type().is_block_device() {
        device_names(meta.rdev())
    } else if meta.file_type().is_file() {
        loops_backed_by(meta.dev(), meta.ino())
    } else {
        Vec::new()
    };
    let mut held = Vec::new();
    for (path, exclusive) in names {
        // A name that vanished (device detached meanwhile) locks nothing.
        let Ok(f) = File::open(&path) else { continue };
        if !flock(&f, exclusive)? {
            return Ok(None);
        }
        held.push(f);
    }
    Ok(Some(held))
}

/// Other names of block device `rdev`, with the lock mode for each.
fn device_names(rdev: u64) -> Vec<(PathBuf, bool)> {
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let Ok(sys) = fs::canonicalize(format!("/sys/dev/block/{major}:{minor}")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let (disk, exclusive) = if sys.join("partition").exists() {
        let Some(disk) = sys.parent().map(Path::to_path_buf) else {
            return out;
        };
        if let Some(name) = disk.file_name() {
            out.push((Path::new("/dev").join(name), false));
        }
        (disk, false)
    } else {
        (sys, true)
    };
    if let Some(backing) = loop_backing_file(&disk) {
        out.push((backing, exclusive));
    }
    out
}

/// The backing file of the loop device whose sysfs directory is `sys`.
fn loop_backing_file(sys: &Path) -> Option<PathBuf> {
    let s = fs::read_to_string(sys.join("loop/backing_file")).ok()?;
    let s = s.trim_end_matches('\n');
    // A deleted backing file cannot be reached by another name any more.
    (!s.ends_with(" (deleted)") && !s.is_empty()).then(|| PathBuf::from(s))
}

/// Loop devices attached to the file with inode `ino` on device `dev`.
fn loops_backed_by(dev: u64, ino: u64) -> Vec<(PathBuf, bool)> {
    let Ok(dir) = fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    dir.flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
        .filter_map(|e| {
            let backing = loop_backing_file(&e.path())?;
            let m = fs::metadata(backing).ok()?;
            (m.dev() == dev && m.ino() == ino)
                .then(|| (Path::new("/dev").join(e.file_name()), true))
        })
        .collect()
}
