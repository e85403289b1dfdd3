//! The host key: proves that a superblock was written by this host's streamboot.
//!
//! The last 8 KiB of a disk are the guest's own bytes whenever the disk is served plain
//! (never prepared, or after commit / rollback), so a superblock found there is trusted
//! only when its MAC (BLAKE3 keyed hash) verifies under a 32-byte key kept outside every
//! disk: `/var/lib/streamboot/host.key`, or the file named by `STREAMBOOT_HOST_KEY`.
//! The key is created (mode 0600) the first time `prepare` needs it; concurrent first
//! uses agree on one key (the file is published with `link`, which never replaces).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{RelocError, Result};

/// Environment variable naming the host key file.
pub const HOST_KEY_ENV: &str = "STREAMBOOT_HOST_KEY";
/// Host key file when [`HOST_KEY_ENV`] is not set.
pub const DEFAULT_HOST_KEY: &str = "/var/lib/streamboot/host.key";
/// Bytes of a host key.
pub const HOST_KEY_LEN: usize = 32;

/// A host key (never printed).
#[derive(Clone, PartialEq, Eq)]
pub struct HostKey([u8; HOST_KEY_LEN]);

impl Drop for HostKey {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

impl std::fmt::Debug for HostKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HostKey(..)")
    }
}

fn key_err(path: &Path, source: io::Error) -> RelocError {
    RelocError::HostKey {
        path: path.to_path_buf(),
        source,
    }
}

impl HostKey {
    /// A key from its bytes (tests, tools).
    pub fn from_bytes(bytes: [u8; HOST_KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// The key file this process uses: `$STREAMBOOT_HOST_KEY`, else the default path.
    pub fn path() -> PathBuf {
        match std::env::var_os(HOST_KEY_ENV) {
            Some(p) if !p.is_empty() => PathBuf::from(p),
            _ => PathBuf::from(DEFAULT_HOST_KEY),
        }
    }

    /// Reads the key file. `Ok(None)`: it does not exist (no disk was prepared here yet).
    pub fn load() -> Result<Option<Self>> {
        Self::load_from(&Self::path())
    }

    /// Reads the key at `path` (see [`Self::load`]).
    pub fn load_from(path: &Path) -> Result<Option<Self>> {
        let mut f = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(key_err(path, e)),
        };
        let meta = f.metadata().map_err(|e| key_err(path, e))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(key_err(
                path,
                io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    "readable or writable by group or others (chmod 600 it)",
                ),
            ));
        }
        let mut bytes = zeroize::Zeroizing::new(Vec::with_capacity(HOST_KEY_LEN + 1));
        Read::by_ref(&mut f)
            .take(HOST_KEY_LEN as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| key_err(path, e))?;
        let key: [u8; HOST_KEY_LEN] = bytes.as_slice().try_into().map_err(|_| {
            key_err(
                path,
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("not a host key (must be exactly {HOST_KEY_LEN} bytes)"),
                ),
            )
        })?;
        Ok(Some(Self(key)))
    }

    /// Reads the key file, creating it with a fresh random key if it does not exist.
    pub fn load_or_create() -> Result<Self> {
        Self::load_or_create_at(&Self::path())
    }

    /// [`Self::load_or_create`] at `path`.
    pub fn load_or_create_at(path: &Path) -> Result<Self> {
        if let Some(k) = Self::load_from(path)? {
            return Ok(k);
        }
        create(path).map_err(|e| key_err(path, e))?;
        Self::load_from(path)?.ok_or_else(|| {
            key_err(
                path,
                io::Error::new(io::ErrorKind::NotFound, "vanished after creation"),
            )
        })
    }

    /// MAC of `data` under this key.
    pub fn mac(&self, data: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.0, data).as_bytes()
    }
}

/// Writes a random key into a private temporary file next to `path`, then links it to
/// `path`: a concurrent creator's key is never replaced (the loser reads the winner's).
fn create(path: &Path) -> io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(d) = dir {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(d)?;
    }
    let mut key = zeroize::Zeroizing::new([0u8; HOST_KEY_LEN]);
    random(&mut key[..])?;
    let tmp = path.with_file_name(format!(
        ".{}.{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("host.key"),
        uuid::Uuid::new_v4().simple()
    ));
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    let published = f
        .write_all(&key[..])
        .and_then(|()| f.sync_all())
        .and_then(|()| match fs::hard_link(&tmp, path) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            r => r,
        });
    let _ = fs::remove_file(&tmp);
    published?;
    if let Some(d) = dir {
        File::open(d)?.sync_all()?;
    }
    Ok(())
}

fn random(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the live, writable tail of `buf`.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        } else {
            done += n as usize;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_private_and_stable() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/host.key");
        assert!(HostKey::load_from(&p).unwrap().is_none());
        let k = HostKey::load_or_create_at(&p).unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(HostKey::load_or_create_at(&p).unwrap(), k);
        assert_eq!(fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn concurrent_first_uses_agree() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("host.key");
        let keys: Vec<HostKey> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| s.spawn(|| HostKey::load_or_create_at(&p).unwrap()))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(keys.iter().all(|k| *k == keys[0]));
    }

    #[test]
    fn bad_key_files_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("host.key");
        fs::write(&p, [1u8; 31]).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        assert!(HostKey::load_from(&p).is_err());
        fs::write(&p, [1u8; 32]).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(HostKey::load_from(&p).is_err());
    }
}
