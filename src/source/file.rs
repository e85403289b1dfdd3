//! A local regular file as a remote source (`file` kind).
//!
//! Useful for tests, for images on a mounted share, and for staging from a download that
//! already finished. The file is pinned like an HTTP image: its identity is size, mtime
//! (nanoseconds) and inode, and every read re-checks them with one `fstat` after reading,
//! so a file rewritten in place stops the migration instead of mixing two images.
//!
//! The source keeps the file open: if the path is later replaced by a new file (rename
//! over it), reads keep returning the pinned inode's bytes, which are still the pinned
//! image.

use std::fs::{File, Metadata};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::{check_range, RemoteSource, SourceError, SourceIdentity};

/// Kind string of [`FileSource`] identities.
pub const FILE_KIND: &str = "file";

/// A pinned local file, read with positioned reads (`pread`): safe to share between
/// threads, no seek position, no lock.
#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
    file: File,
    identity: SourceIdentity,
    stamp: Stamp,
}

/// The metadata that must stay the same for the file to count as unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    size: u64,
    mtime_sec: i64,
    mtime_nsec: i64,
    ino: u64,
    dev: u64,
}

impl Stamp {
    fn of(meta: &Metadata) -> Self {
        Stamp {
            size: meta.size(),
            mtime_sec: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
            ino: meta.ino(),
            dev: meta.dev(),
        }
    }

    /// The validator string: `size:mtime_ns:inode`. The mtime is written as seconds and
    /// nanoseconds so that pre-1970 times stay exact.
    fn validator(&self) -> String {
        format!(
            "{}:{}.{:09}:{}",
            self.size, self.mtime_sec, self.mtime_nsec, self.ino
        )
    }
}

impl FileSource {
    /// Opens and pins `path`. With `expected`, refuses a file whose identity differs
    /// ([`SourceError::Changed`]): the file was modified since the migration was planned.
    ///
    /// Only regular files are accepted: a block device or a pipe has no validator that
    /// reflects its content.
    pub fn open(path: &Path, expected: Option<&SourceIdentity>) -> Result<Self, SourceError> {
        let file = File::open(path)
            .map_err(|e| SourceError::Invalid(format!("{}: cannot open: {e}", path.display())))?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(SourceError::Invalid(format!(
                "{}: not a regular file (a file source must be a regular file so that it \
                 can be pinned by size, mtime and inode)",
                path.display()
            )));
        }
        let stamp = Stamp::of(&meta);
        let identity = SourceIdentity {
            kind: FILE_KIND.to_string(),
            size: stamp.size,
            validator: stamp.validator(),
        };
        if let Some(expected) = expected {
            if *expected != identity {
                return Err(SourceError::Changed {
                    url: path.display().to_string(),
                    expected: expected.to_string(),
                    found: identity.to_string(),
                });
            }
        }
        Ok(FileSource {
            path: path.to_path_buf(),
            file,
            identity,
            stamp,
        })
    }

    /// The path the source was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Fails with [`SourceError::Changed`] when the open file's metadata no longer matches
    /// the pinned stamp.
    fn check_unchanged(&self) -> Result<(), SourceError> {
        let now = Stamp::of(&self.file.metadata()?);
        if now == self.stamp {
            return Ok(());
        }
        Err(SourceError::Changed {
            url: self.path.display().to_string(),
            expected: self.identity.to_string(),
            found: format!("{} size={} {}", FILE_KIND, now.size, now.validator()),
        })
    }
}

impl RemoteSource for FileSource {
    fn identity(&self) -> &SourceIdentity {
        &self.identity
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        check_range(offset, buf.len(), self.identity.size)?;
        if buf.is_empty() {
            return Ok(());
        }
        match self.file.read_exact_at(buf, offset) {
            Ok(()) => {}
            // A pinned file cannot end before its pinned size unless it was truncated.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                self.check_unchanged()?;
                return Err(SourceError::Changed {
                    url: self.path.display().to_string(),
                    expected: self.identity.to_string(),
                    found: "a shorter file".to_string(),
                });
            }
            Err(e) => return Err(e.into()),
        }
        // Checked after the read: a write that landed before or during the read has
        // already bumped the mtime (the kernel updates it before copying data in).
        self.check_unchanged()
    }

    fn name(&self) -> String {
        self.path.display().to_string()
    }
}
