//! The index as a security boundary: a published index that is tampered with, truncated,
//! signed by another key, or unsigned is refused with a typed error, both by the parser
//! and by `StoreSource::open`. Also key files from `keygen`.

mod store_common;

use std::os::unix::fs::PermissionsExt;

use store_common::*;
use streamboot::source::store::{IndexTrust, StoreSource, StoreSourceOptions};
use streamboot::source::SourceError;
use streamboot::store::identity::IDENTITY_LEN;
use streamboot::store::index::{HEADER_LEN, TRAILER_LEN};
use streamboot::store::{self, publish, Index, IndexError, Trust};

/// Publishes image A signed by `key` and returns (store dir, index path, index bytes).
fn published(
    tmp: &std::path::Path,
    key: &ed25519_dalek::SigningKey,
) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    let a = image_a();
    let pa = write_image(tmp, "a.img", &a);
    let st = tmp.join("store");
    let r = publish(&pa, &st, "a", CS as u64, Some(key), false).unwrap();
    let bytes = std::fs::read(&r.index_path).unwrap();
    assert_eq!(store::index_hash(&bytes).to_hex(), r.index_hash);
    (st, r.index_path, bytes)
}

fn open(st: &std::path::Path, trust: IndexTrust) -> Result<StoreSource, SourceError> {
    let mut o = StoreSourceOptions::insecure_unverified();
    o.trust = trust;
    StoreSource::open(st.to_str().unwrap(), "a", o)
}

#[test]
fn published_index_layout_and_hash() {
    let tmp = tempfile::tempdir().unwrap();
    let key = key(1);
    let (_, _, bytes) = published(tmp.path(), &key);
    assert_eq!(&bytes[..8], b"SBSTIDX\n");
    assert_eq!(&bytes[8..10], &[2, 0], "format version 2");
    assert_eq!(
        bytes.len(),
        HEADER_LEN + IDENTITY_LEN + 384 * 33 + TRAILER_LEN
    );
    let vk = key.verifying_key();
    let p = Index::parse(&bytes, Trust::Key(&vk)).unwrap();
    assert!(p.verified);
    assert_eq!(p.index.image_size(), 24 * MIB as u64);
    assert_eq!(p.index.chunk_count(), 384);
    let id = p.index.identity().expect("identity block");
    assert_eq!((id.name.as_str(), id.version, id.expires), ("a", 1, None));
    assert_eq!(p.hash.0, *blake3::hash(&bytes).as_bytes());
    // Re-encoding the parsed index with the same key gives the same bytes (ed25519 is
    // deterministic), so the hash pins the content and signature exactly.
    assert_eq!(p.index.encode(Some(&key)), bytes);
}

#[test]
fn every_tampered_byte_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let key = key(2);
    let (st, idx_path, bytes) = published(tmp.path(), &key);
    let vk = key.verifying_key();

    // Each byte of the file, flipped: the parser refuses it with the signature checked.
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 0x01;
        let err = Index::parse(&b, Trust::Key(&vk)).unwrap_err();
        // Depending on the byte, the structure check or the signature catches it.
        let expected = match i {
            0..=7 => matches!(err, IndexError::BadMagic),
            8..=9 => matches!(err, IndexError::BadVersion(_)),
            _ => true,
        };
        assert!(expected, "byte {i}: {err:?}");
    }
    // A flipped bit in a chunk hash only the signature can catch.
    let mut b = bytes.clone();
    b[HEADER_LEN + 5 * 33 + 3] ^= 0x80;
    assert!(matches!(
        Index::parse(&b, Trust::Key(&vk)),
        Err(IndexError::BadSignature(_))
    ));
    // Through the source: refused at open.
    std::fs::write(&idx_path, &b).unwrap();
    let err = open(&st, IndexTrust::Keys(vec![vk])).unwrap_err();
    assert!(
        matches!(&err, SourceError::Verify { reason, .. } if reason.contains("signature")),
        "{err}"
    );
    // Opting out of signatures still catches structural damage.
    let mut b = bytes.clone();
    b[0] = b'X';
    std::fs::write(&idx_path, &b).unwrap();
    assert!(open(&st, IndexTrust::InsecureUnverified).is_err());
}

#[test]
fn truncated_and_extended_indexes_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let key = key(3);
    let (st, idx_path, bytes) = published(tmp.path(), &key);
    let vk = key.verifying_key();
    for cut in [0, 1, 7, HEADER_LEN - 1, HEADER_LEN, 1000, bytes.len() - 1] {
        let err = Index::parse(&bytes[..cut], Trust::Key(&vk)).unwrap_err();
        assert!(
            matches!(err, IndexError::Truncated { .. }),
            "cut {cut}: {err:?}"
        );
    }
    let mut long = bytes.clone();
    long.push(0);
    assert_eq!(
        Index::parse(&long, Trust::Key(&vk)).unwrap_err(),
        IndexError::TrailingBytes { extra: 1 }
    );
    std::fs::write(&idx_path, &bytes[..bytes.len() / 2]).unwrap();
    let err = open(&st, IndexTrust::Keys(vec![vk])).unwrap_err();
    assert!(err.to_string().contains("truncated"), "{err}");
}

#[test]
fn wrong_key_and_unsigned_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let key = key(4);
    let other = store_common::key(5);
    let (st, _, bytes) = published(tmp.path(), &key);
    let err = Index::parse(&bytes, Trust::Key(&other.verifying_key())).unwrap_err();
    assert!(matches!(err, IndexError::WrongKey { .. }), "{err:?}");
    let err = open(&st, IndexTrust::Keys(vec![other.verifying_key()])).unwrap_err();
    assert!(err.to_string().contains("not trusted"), "{err}");
    // Any of several trusted keys (rotation).
    let keys = [other.verifying_key(), key.verifying_key()];
    assert!(Index::parse(&bytes, Trust::AnyOf(&keys)).unwrap().verified);
    open(&st, IndexTrust::Keys(keys.to_vec())).unwrap();

    // A signature made by another key, with the trusted key's id: bad signature.
    let mut forged = bytes.clone();
    let n = forged.len();
    let sig = {
        use ed25519_dalek::Signer;
        other.sign(&forged[..n - 64]).to_bytes()
    };
    forged[n - 64..].copy_from_slice(&sig);
    assert!(matches!(
        Index::parse(&forged, Trust::Key(&key.verifying_key())),
        Err(IndexError::BadSignature(_))
    ));

    // Stripping the signature (clear the signed flag and the trailer) does not help.
    let mut stripped = bytes.clone();
    stripped[10] = 0;
    stripped[n - TRAILER_LEN..].fill(0);
    assert_eq!(
        Index::parse(&stripped, Trust::Key(&key.verifying_key())).unwrap_err(),
        IndexError::Unsigned
    );
    assert!(!Index::parse(&stripped, Trust::Unverified).unwrap().verified);
}

#[test]
fn missing_index_and_bad_names() {
    let tmp = tempfile::tempdir().unwrap();
    let o = StoreSourceOptions::insecure_unverified();
    let err = StoreSource::open(tmp.path().to_str().unwrap(), "nope", o.clone()).unwrap_err();
    assert!(!err.is_transient(), "{err}");
    assert!(StoreSource::open(tmp.path().to_str().unwrap(), "../etc", o.clone()).is_err());
    assert!(StoreSource::open_index("/x/y/z.idx", o.clone()).is_err());
    assert!(StoreSource::open_index("relative-no-slash.idx", o).is_err());
}

#[test]
fn open_by_index_path() {
    let tmp = tempfile::tempdir().unwrap();
    let key = key(6);
    let (_, idx_path, _) = published(tmp.path(), &key);
    let src = StoreSource::open_index(
        idx_path.to_str().unwrap(),
        StoreSourceOptions::trusted(key.verifying_key()),
    )
    .unwrap();
    assert_eq!(src.chunk_count(), 384);
}

#[test]
fn keygen_writes_pem_files_private_0600() {
    let tmp = tempfile::tempdir().unwrap();
    let prefix = tmp.path().join("release");
    let files = store::keygen(&prefix).unwrap();
    assert_eq!(files.private_key, tmp.path().join("release.key"));
    assert_eq!(files.public_key, tmp.path().join("release.pub"));
    let mode = std::fs::metadata(&files.private_key)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let text = std::fs::read_to_string(&files.private_key).unwrap();
    assert!(text.starts_with("-----BEGIN PRIVATE KEY-----"));
    let sk = store::load_signing_key(&files.private_key).unwrap();
    let vk = store::load_verifying_key(&files.public_key).unwrap();
    assert_eq!(sk.verifying_key(), vk);
    assert_eq!(store::sign::key_id(&vk).to_string(), files.key_id);
    // Never overwrites.
    assert!(store::keygen(&prefix).is_err());
    // Two key pairs differ.
    let f2 = store::keygen(&tmp.path().join("second")).unwrap();
    assert_ne!(f2.key_id, files.key_id);
    // Wrong file types are refused.
    assert!(store::load_signing_key(&files.public_key).is_err());
    assert!(store::load_verifying_key(&files.private_key).is_err());
    // A key written by keygen signs an index that the public file verifies.
    let a = random_bytes(1, 300_000);
    let pa = write_image(tmp.path(), "a.img", &a);
    let st = tmp.path().join("store");
    publish(&pa, &st, "a", 4096, Some(&sk), false).unwrap();
    StoreSource::open(st.to_str().unwrap(), "a", StoreSourceOptions::trusted(vk)).unwrap();
}

#[test]
fn parser_survives_random_garbage() {
    // Random bytes and random mutations of a valid index never panic.
    use rand::{Rng, SeedableRng};
    let key = key(9);
    let vk = key.verifying_key();
    let tmp = tempfile::tempdir().unwrap();
    let (_, _, bytes) = published(tmp.path(), &key);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    for _ in 0..2000 {
        let mut b = if rng.random_bool(0.5) {
            bytes.clone()
        } else {
            let n = rng.random_range(0..200);
            (0..n).map(|_| rng.random()).collect()
        };
        if !b.is_empty() {
            for _ in 0..rng.random_range(1..8) {
                let i = rng.random_range(0..b.len());
                b[i] = rng.random();
            }
            if rng.random_bool(0.3) {
                b.truncate(rng.random_range(0..b.len()));
            }
        }
        let _ = Index::parse(&b, Trust::Unverified);
        let _ = Index::parse(&b, Trust::Key(&vk));
    }
}
