//! The highest index version a reader has accepted per image ("last seen"), so that an
//! older, validly signed index is refused later (TUF's rollback attack). Kept in memory,
//! and in a small JSON file when the reader names one (`export --seen-versions FILE`),
//! so the floor survives restarts: `{"images": {"NAME": VERSION, ...}}`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

use super::identity::{now_unix, IdentityError, ImageIdentity};
use super::layout::write_file_atomic;

/// Why the seen-versions file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SeenError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a seen-versions file: {source}")]
    Format {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

#[derive(Default, serde::Serialize, serde::Deserialize)]
struct File {
    images: BTreeMap<String, u64>,
}

/// Highest versions accepted so far, per image name.
#[derive(Default)]
pub struct SeenVersions {
    path: Option<PathBuf>,
    seen: Mutex<BTreeMap<String, u64>>,
}

impl SeenVersions {
    /// Versions kept in memory only (for the life of the process).
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// Versions kept in `path` too (read now if it exists; created on the first accept).
    pub fn persistent(path: &Path) -> Result<Self, SeenError> {
        let seen = match std::fs::read(path) {
            Ok(b) => {
                serde_json::from_slice::<File>(&b)
                    .map_err(|source| SeenError::Format {
                        path: path.to_owned(),
                        source,
                    })?
                    .images
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => {
                return Err(SeenError::Io {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        Ok(SeenVersions {
            path: Some(path.to_owned()),
            seen: Mutex::new(seen),
        })
    }

    /// The floor for `name`: the highest version accepted so far (0: none).
    pub fn floor(&self, name: &str) -> u64 {
        self.seen.lock().get(name).copied().unwrap_or(0)
    }

    /// Checks `id` for image `name` (name, expiry, and a version not below the floor) and,
    /// when it passes, raises the floor to its version (durably, with a file).
    pub fn accept(&self, name: &str, id: &ImageIdentity) -> Result<(), SeenError> {
        let mut seen = self.seen.lock();
        let floor = seen.get(name).copied().unwrap_or(0);
        id.check(name, floor, now_unix())?;
        if id.version > floor {
            let mut next = seen.clone();
            next.insert(name.to_owned(), id.version);
            if let Some(path) = &self.path {
                let file = File {
                    images: next.clone(),
                };
                let mut body = serde_json::to_vec_pretty(&file).expect("serializes");
                body.push(b'\n');
                write_file_atomic(path, &body).map_err(|source| SeenError::Io {
                    path: path.clone(),
                    source,
                })?;
            }
            *seen = next;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(version: u64) -> ImageIdentity {
        ImageIdentity {
            name: "a".into(),
            version,
            created: 1,
            expires: None,
        }
    }

    #[test]
    fn floor_rises_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seen.json");
        let s = SeenVersions::persistent(&path).unwrap();
        s.accept("a", &id(3)).unwrap();
        s.accept("a", &id(3)).unwrap();
        assert!(matches!(
            s.accept("a", &id(2)),
            Err(SeenError::Identity(IdentityError::Rollback { .. }))
        ));
        let again = SeenVersions::persistent(&path).unwrap();
        assert_eq!(again.floor("a"), 3);
        assert!(again.accept("a", &id(1)).is_err());
        again.accept("a", &id(4)).unwrap();
        assert_eq!(SeenVersions::persistent(&path).unwrap().floor("a"), 4);
        std::fs::write(&path, b"nonsense").unwrap();
        assert!(matches!(
            SeenVersions::persistent(&path),
            Err(SeenError::Format { .. })
        ));
    }
}
