//! Boot profiles: the ordered, distinct target chunks a boot reads, recorded by `serve
//! --record-profile` and used by `prepare`, `serve` and `publish --boot-profile`.
//!
//! The file is JSON (see docs/format.md, "Boot profile file"): chunk size, target size,
//! target validator and the chunk numbers in first-read order. It is written atomically
//! (temporary file, fsync, rename, fsync of the directory), so a reader sees the old
//! profile or the new one, never a torn one. Consumers with another chunk size convert
//! through byte ranges, so a profile recorded at 64 KiB serves a 16 KiB prepare too.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// Format name written into every profile file.
const FORMAT: &str = "streamboot-boot-profile";
/// Current format version.
const VERSION: u32 = 1;

/// Errors reading, checking or writing a profile.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// File concerned.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not a valid profile.
    #[error("{path}: not a valid boot profile: {reason}")]
    Invalid {
        /// File concerned.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The profile was recorded for an image of another size.
    #[error("boot profile is for a {profile} byte image, the target has {target} bytes")]
    WrongImage {
        /// Target size in the profile.
        profile: u64,
        /// Size of the image it is applied to.
        target: u64,
    },
}

/// A boot profile: chunks of `chunk_size` bytes of a `target_size` byte image, in the
/// order a boot first read them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootProfile {
    /// Always [`FORMAT`].
    pub format: String,
    /// Format version ([`VERSION`]).
    pub version: u32,
    /// Chunk size in bytes (power of two).
    pub chunk_size: u64,
    /// Size of the image the profile was recorded on.
    pub target_size: u64,
    /// Validator of that image (ETag, index hash, ...); informational.
    pub target_validator: String,
    /// Chunk numbers in first-read order, each once.
    pub chunks: Vec<u64>,
}

impl BootProfile {
    /// A profile of `chunks` (distinct, below the chunk count).
    pub fn new(
        chunk_size: u64,
        target_size: u64,
        target_validator: String,
        chunks: Vec<u64>,
    ) -> Self {
        Self {
            format: FORMAT.into(),
            version: VERSION,
            chunk_size,
            target_size,
            target_validator,
            chunks,
        }
    }

    /// Checks the invariants: format, version, chunk size, distinct in-range chunks.
    fn check(&self) -> Result<(), String> {
        if self.format != FORMAT {
            return Err(format!("format is {:?}, expected {FORMAT:?}", self.format));
        }
        if self.version != VERSION {
            return Err(format!("unsupported version {}", self.version));
        }
        if !self.chunk_size.is_power_of_two() || self.chunk_size < 512 {
            return Err(format!(
                "chunk size {} is not a power of two >= 512",
                self.chunk_size
            ));
        }
        let count = self.target_size.div_ceil(self.chunk_size);
        let mut seen = std::collections::HashSet::with_capacity(self.chunks.len());
        for (i, &c) in self.chunks.iter().enumerate() {
            if c >= count {
                return Err(format!(
                    "entry {i}: chunk {c} is past the image's {count} chunks"
                ));
            }
            if !seen.insert(c) {
                return Err(format!("entry {i}: chunk {c} is listed twice"));
            }
        }
        Ok(())
    }

    /// Reads and checks a profile file.
    pub fn load(path: &Path) -> Result<Self, ProfileError> {
        let bytes = std::fs::read(path).map_err(|source| ProfileError::Io {
            path: path.into(),
            source,
        })?;
        let invalid = |reason: String| ProfileError::Invalid {
            path: path.into(),
            reason,
        };
        let p: Self = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
        p.check().map_err(invalid)?;
        Ok(p)
    }

    /// Writes the profile atomically: a reader sees the old file or the whole new one. The
    /// temporary file has a random name and is created with `O_EXCL` in the same
    /// directory, so nothing planted there beforehand (a symlink at a guessable name) is
    /// followed.
    pub fn save(&self, path: &Path) -> Result<(), ProfileError> {
        let mut body = serde_json::to_vec_pretty(self).expect("a profile always serializes");
        body.push(b'\n');
        crate::store::layout::write_file_atomic(path, &body).map_err(|source| ProfileError::Io {
            path: path.into(),
            source,
        })
    }

    /// Checks that the profile belongs to an image of `target_size` bytes.
    pub fn check_image(&self, target_size: u64) -> Result<(), ProfileError> {
        if self.target_size != target_size {
            return Err(ProfileError::WrongImage {
                profile: self.target_size,
                target: target_size,
            });
        }
        Ok(())
    }

    /// Byte range of each chunk, in profile order (the last one clipped to the image).
    pub fn ranges(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        self.chunks.iter().map(|&c| {
            let start = c * self.chunk_size;
            start..(start + self.chunk_size).min(self.target_size)
        })
    }

    /// The profile as chunk numbers of `chunk_size` bytes: in order, each once.
    pub fn chunks_at(&self, chunk_size: u64) -> Vec<u64> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for r in self.ranges() {
            for c in r.start / chunk_size..r.end.div_ceil(chunk_size) {
                if seen.insert(c) {
                    out.push(c);
                }
            }
        }
        out
    }
}

/// Loads the profile at `path` for publishing `image` in `chunk_size` chunks: checks it
/// belongs to an image of that size and returns the index's chunk numbers.
pub fn store_profile(path: &Path, image: &Path, chunk_size: u64) -> Result<Vec<u32>, ProfileError> {
    let p = BootProfile::load(path)?;
    let size = std::fs::metadata(image)
        .map_err(|source| ProfileError::Io {
            path: image.into(),
            source,
        })?
        .len();
    p.check_image(size)?;
    // Chunk numbers of an image the index can describe fit in u32 (the index checks
    // its chunk count); a larger one is refused there with its own error.
    Ok(p.chunks_at(chunk_size)
        .into_iter()
        .map(|c| u32::try_from(c).unwrap_or(u32::MAX))
        .collect())
}

/// Records the chunks guest reads touch, in first-touch order, until frozen. The hot
/// path is one atomic load per chunk piece once a chunk is known; only a first touch
/// takes the mutex.
#[derive(Debug)]
pub struct Recorder {
    path: PathBuf,
    seen: Box<[AtomicU64]>,
    order: Mutex<Vec<u64>>,
    frozen: AtomicBool,
    chunk_size: u64,
    target_size: u64,
    validator: String,
}

impl Recorder {
    /// A recorder for an image of `target_size` bytes in `chunk_size` chunks, saving
    /// to `path`.
    pub fn new(path: PathBuf, chunk_size: u64, target_size: u64, validator: String) -> Self {
        let chunks = target_size.div_ceil(chunk_size);
        Self {
            path,
            seen: (0..chunks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            order: Mutex::new(Vec::new()),
            frozen: AtomicBool::new(false),
            chunk_size,
            target_size,
            validator,
        }
    }

    /// Notes a guest read of chunk `c`.
    #[inline]
    pub fn note(&self, c: u64) {
        let (w, bit) = ((c / 64) as usize, 1u64 << (c % 64));
        let Some(word) = self.seen.get(w) else { return };
        if word.load(Ordering::Relaxed) & bit != 0 || self.frozen.load(Ordering::Relaxed) {
            return;
        }
        if word.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
            let mut order = self.order.lock();
            // Checked again under the lock: nothing is appended after `freeze`.
            if !self.frozen.load(Ordering::Relaxed) {
                order.push(c);
            }
        }
    }

    /// Starts over (a new boot): forgets what was recorded unless already frozen.
    pub fn restart(&self) {
        let mut order = self.order.lock();
        if self.frozen.load(Ordering::Relaxed) {
            return;
        }
        for w in self.seen.iter() {
            w.store(0, Ordering::Relaxed);
        }
        order.clear();
    }

    /// Stops recording and saves the profile. Only the first call saves; later calls
    /// return `Ok(false)`.
    pub fn freeze_and_save(&self) -> Result<bool, ProfileError> {
        let chunks = {
            let order = self.order.lock();
            if self.frozen.swap(true, Ordering::Relaxed) {
                return Ok(false);
            }
            order.clone()
        };
        BootProfile::new(
            self.chunk_size,
            self.target_size,
            self.validator.clone(),
            chunks,
        )
        .save(&self.path)?;
        Ok(true)
    }

    /// Chunks recorded so far.
    pub fn len(&self) -> usize {
        self.order.lock().len()
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorder_keeps_first_touch_order_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("boot.profile");
        let r = Recorder::new(path.clone(), 4096, 10 * 4096 + 100, "v1".into());
        for c in [5, 0, 5, 10, 0, 3, 200] {
            r.note(c);
        }
        assert!(r.freeze_and_save().unwrap());
        r.note(7);
        assert!(!r.freeze_and_save().unwrap());
        let p = BootProfile::load(&path).unwrap();
        assert_eq!(p.chunks, vec![5, 0, 10, 3]);
        assert_eq!(p.chunk_size, 4096);
        assert_eq!(p.target_size, 10 * 4096 + 100);
        let ranges: Vec<_> = p.ranges().collect();
        assert_eq!(
            ranges[2],
            40960..41060,
            "last chunk is clipped to the image"
        );
        assert_eq!(p.chunks_at(8192), vec![2, 0, 5, 1]);
        assert_eq!(p.chunks_at(2048), vec![10, 11, 0, 1, 20, 6, 7]);
        p.check_image(10 * 4096 + 100).unwrap();
        assert!(p.check_image(4096).is_err());
    }

    #[test]
    fn restart_forgets_until_frozen() {
        let dir = tempfile::tempdir().unwrap();
        let r = Recorder::new(dir.path().join("p"), 4096, 1 << 20, String::new());
        r.note(1);
        r.note(2);
        r.restart();
        r.note(3);
        r.note(1);
        assert_eq!(r.len(), 2);
        r.freeze_and_save().unwrap();
        r.restart();
        assert_eq!(
            BootProfile::load(&dir.path().join("p")).unwrap().chunks,
            vec![3, 1]
        );
    }

    #[test]
    fn bad_files_are_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p");
        let mut p = BootProfile::new(4096, 8192, String::new(), vec![0, 1]);
        p.save(&path).unwrap();
        assert_eq!(BootProfile::load(&path).unwrap(), p);
        for (chunks, want) in [(vec![0, 0], "twice"), (vec![2], "past the image")] {
            p.chunks = chunks;
            p.save(&path).unwrap();
            let e = BootProfile::load(&path).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        std::fs::write(&path, b"{\"format\": \"streamboot-boot-profile\"").unwrap();
        assert!(matches!(
            BootProfile::load(&path),
            Err(ProfileError::Invalid { .. })
        ));
        assert!(matches!(
            BootProfile::load(&dir.path().join("missing")),
            Err(ProfileError::Io { .. })
        ));
    }
}
