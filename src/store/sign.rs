//! Signing keys for indexes: generation, key files, key ids.
//!
//! Keys are ed25519. Files are standard PEM so that other tools interoperate: the private
//! key is PKCS#8 (`-----BEGIN PRIVATE KEY-----`, what `openssl genpkey -algorithm ed25519`
//! writes), the public key is SubjectPublicKeyInfo (`-----BEGIN PUBLIC KEY-----`). The
//! private key file is created with mode 0600 and never overwritten.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{SigningKey, VerifyingKey};
use rand::TryRngCore;

use super::StoreError;

/// Length of a key id in bytes.
pub const KEY_ID_LEN: usize = 16;

/// Short, stable name of a public key: the first 16 bytes of BLAKE3 of the 32-byte
/// public key. Recorded in every signed index so a reader can tell "signed by a key I do
/// not trust" from "signature broken".
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; KEY_ID_LEN]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// The key id of a public key.
pub fn key_id(key: &VerifyingKey) -> KeyId {
    let h = blake3::hash(key.as_bytes());
    let mut id = [0u8; KEY_ID_LEN];
    id.copy_from_slice(&h.as_bytes()[..KEY_ID_LEN]);
    KeyId(id)
}

/// The two files `keygen` wrote.
#[derive(Clone, Debug, serde::Serialize)]
pub struct KeyFiles {
    /// PKCS#8 PEM private key, mode 0600.
    pub private_key: PathBuf,
    /// SubjectPublicKeyInfo PEM public key.
    pub public_key: PathBuf,
    /// Key id (hex) of the public key.
    pub key_id: String,
}

/// Generates a fresh key from the operating system's random source.
pub fn generate_signing_key() -> Result<SigningKey, StoreError> {
    let mut seed = zeroize::Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng
        .try_fill_bytes(seed.as_mut())
        .map_err(|e| StoreError::Key {
            path: PathBuf::new(),
            reason: format!("no randomness from the OS: {e}"),
        })?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Generates a key pair and writes `<prefix>.key` (private, 0600) and `<prefix>.pub`.
/// Refuses to overwrite either file.
pub fn keygen(prefix: &Path) -> Result<KeyFiles, StoreError> {
    let private = with_suffix(prefix, "key");
    let public = with_suffix(prefix, "pub");
    for p in [&private, &public] {
        if p.exists() {
            return Err(StoreError::Key {
                path: p.clone(),
                reason: "already exists; refusing to overwrite".into(),
            });
        }
    }
    let key = generate_signing_key()?;
    let pem = key
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| StoreError::Key {
            path: private.clone(),
            reason: format!("cannot encode: {e}"),
        })?;
    write_new(&private, pem.as_bytes(), 0o600)?;
    let vk = key.verifying_key();
    let pub_pem = vk
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| StoreError::Key {
            path: public.clone(),
            reason: format!("cannot encode: {e}"),
        })?;
    write_new(&public, pub_pem.as_bytes(), 0o644)?;
    Ok(KeyFiles {
        private_key: private,
        public_key: public,
        key_id: key_id(&vk).to_string(),
    })
}

/// `prefix` with `.ext` appended to its file name (not replacing an existing extension).
fn with_suffix(prefix: &Path, ext: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

/// Creates `path` (which must not exist) with `mode`, writes `data` and syncs it.
fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), StoreError> {
    let io = |e| StoreError::io(path, e);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(data).map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok(())
}

/// Reads a PKCS#8 PEM ed25519 private key.
pub fn load_signing_key(path: &Path) -> Result<SigningKey, StoreError> {
    let text = fs::read_to_string(path).map_err(|e| StoreError::io(path, e))?;
    SigningKey::from_pkcs8_pem(&text).map_err(|e| StoreError::Key {
        path: path.to_owned(),
        reason: format!("not a PKCS#8 PEM ed25519 private key: {e}"),
    })
}

/// Reads a SubjectPublicKeyInfo PEM ed25519 public key.
pub fn load_verifying_key(path: &Path) -> Result<VerifyingKey, StoreError> {
    let text = fs::read_to_string(path).map_err(|e| StoreError::io(path, e))?;
    VerifyingKey::from_public_key_pem(&text).map_err(|e| StoreError::Key {
        path: path.to_owned(),
        reason: format!("not a PEM ed25519 public key: {e}"),
    })
}
