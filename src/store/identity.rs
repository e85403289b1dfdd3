//! The identity block of an index (format version 2): which image the index is, which
//! publication of it, when it was made and until when it may be used.
//!
//! The block sits right after the fixed header, so the signature covers it. It defeats the
//! two attacks of TUF's threat model that a signature alone does not: *mix and match*
//! (an index of image `b`, validly signed, served as image `a`: the name inside the signed
//! bytes must be the name asked for) and *rollback* (an older, validly signed index of the
//! same image replayed: its version is lower than one the reader pinned or has seen).
//! Layout and rules: `docs/chunk-store.md` section 2.

use std::time::{SystemTime, UNIX_EPOCH};

use super::index::IndexError;
use super::layout::MAX_NAME_LEN;

/// Length of the identity block.
pub const IDENTITY_LEN: usize = 160;
/// Offset of the name field inside the block.
const NAME_AT: usize = 32;

/// Who an index says it is. Part of the signed bytes of a version-2 index.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct ImageIdentity {
    /// The image name (a valid store image name).
    pub name: String,
    /// Publication number of this image, at least 1; a republish makes it larger.
    pub version: u64,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
    /// Expiry time, seconds since the Unix epoch; `None`: never expires.
    pub expires: Option<u64>,
}

/// Why an index's identity is not acceptable for the image a reader asked for.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("index is for image {found:?}, not {expected:?} (an index copied or served under another image's name)")]
    WrongName { expected: String, found: String },
    #[error("index of {name:?} is version {found}, older than version {floor} already pinned or seen (rollback refused)")]
    Rollback {
        name: String,
        found: u64,
        floor: u64,
    },
    #[error("index of {name:?} version {version} expired at {expires} (now {now}, Unix seconds); republish it")]
    Expired {
        name: String,
        version: u64,
        expires: u64,
        now: u64,
    },
    #[error("index has format version 1, which carries no image name or version; republish it with this streamboot (`streamboot publish`) to serve it with a signature check")]
    Legacy,
}

/// Seconds since the Unix epoch now (0 if the clock is before 1970).
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl ImageIdentity {
    /// Checks the fields: a valid image name, version ≥ 1, expiry after creation.
    pub fn validate(&self) -> Result<(), IndexError> {
        if super::layout::validate_name(&self.name).is_err() {
            return Err(IndexError::BadIdentity(
                "image name is not a valid store name",
            ));
        }
        if self.version == 0 {
            return Err(IndexError::BadIdentity("image version 0"));
        }
        if self.expires.is_some_and(|e| e <= self.created) {
            return Err(IndexError::BadIdentity("expiry not after creation"));
        }
        Ok(())
    }

    /// Appends the 160-byte block (the identity must be valid).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.created.to_le_bytes());
        out.extend_from_slice(&self.expires.unwrap_or(0).to_le_bytes());
        out.push(self.name.len() as u8);
        out.extend_from_slice(&[0u8; NAME_AT - 25]);
        out.extend_from_slice(self.name.as_bytes());
        out.resize(start + IDENTITY_LEN, 0);
    }

    /// Decodes and validates a block; every unused byte must be zero.
    pub fn decode(b: &[u8; IDENTITY_LEN]) -> Result<Self, IndexError> {
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let name_len = usize::from(b[24]);
        if b[25..NAME_AT].iter().any(|&x| x != 0) {
            return Err(IndexError::BadIdentity("reserved bytes are not zero"));
        }
        if name_len == 0 || name_len > MAX_NAME_LEN {
            return Err(IndexError::BadIdentity("image name length out of range"));
        }
        let (name, pad) = b[NAME_AT..].split_at(name_len);
        if pad.iter().any(|&x| x != 0) {
            return Err(IndexError::BadIdentity("name padding is not zero"));
        }
        let name = std::str::from_utf8(name)
            .map_err(|_| IndexError::BadIdentity("image name is not a valid store name"))?;
        let expires = u64_at(16);
        let id = ImageIdentity {
            name: name.to_owned(),
            version: u64_at(0),
            created: u64_at(8),
            expires: (expires != 0).then_some(expires),
        };
        id.validate()?;
        Ok(id)
    }

    /// Checks this identity for a reader of image `name` at time `now`, that has pinned or
    /// seen version `floor` (0: none): the name must match, the version must not be lower
    /// than the floor, and the index must not have expired.
    pub fn check(&self, name: &str, floor: u64, now: u64) -> Result<(), IdentityError> {
        if self.name != name {
            return Err(IdentityError::WrongName {
                expected: name.to_owned(),
                found: self.name.clone(),
            });
        }
        if self.version < floor {
            return Err(IdentityError::Rollback {
                name: name.to_owned(),
                found: self.version,
                floor,
            });
        }
        if let Some(expires) = self.expires.filter(|&e| now >= e) {
            return Err(IdentityError::Expired {
                name: name.to_owned(),
                version: self.version,
                expires,
                now,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> ImageIdentity {
        ImageIdentity {
            name: "debian-12.img".into(),
            version: 7,
            created: 1_700_000_000,
            expires: Some(1_800_000_000),
        }
    }

    #[test]
    fn round_trip_and_checks() {
        let mut b = Vec::new();
        id().encode_into(&mut b);
        assert_eq!(b.len(), IDENTITY_LEN);
        let back = ImageIdentity::decode(b.as_slice().try_into().unwrap()).unwrap();
        assert_eq!(back, id());
        assert!(back.check("debian-12.img", 7, 1_750_000_000).is_ok());
        assert!(matches!(
            back.check("other", 0, 1_750_000_000),
            Err(IdentityError::WrongName { .. })
        ));
        assert!(matches!(
            back.check("debian-12.img", 8, 1_750_000_000),
            Err(IdentityError::Rollback {
                found: 7,
                floor: 8,
                ..
            })
        ));
        assert!(matches!(
            back.check("debian-12.img", 0, 1_800_000_000),
            Err(IdentityError::Expired { .. })
        ));
    }

    #[test]
    fn malformed_blocks_are_refused() {
        let mut good = Vec::new();
        id().encode_into(&mut good);
        let bad = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = good.clone();
            f(&mut b);
            ImageIdentity::decode(b.as_slice().try_into().unwrap()).is_err()
        };
        assert!(bad(&|b| b[0..8].fill(0))); // version 0
        assert!(bad(&|b| b[24] = 0)); // empty name
        assert!(bad(&|b| b[24] = 129)); // name too long
        assert!(bad(&|b| b[26] = 1)); // reserved
        assert!(bad(&|b| b[159] = b'x')); // padding
        assert!(bad(&|b| b[NAME_AT] = b'.')); // name starting with '.'
        assert!(bad(&|b| b[NAME_AT] = b'/')); // not a store name
        assert!(bad(&|b| b[16..24].copy_from_slice(&1u64.to_le_bytes()))); // expiry < created
    }
}
