//! Unit tests of the index format (`index.rs`).
use super::*;

fn sample() -> Index {
    let entries = vec![
        ChunkEntry::Stored {
            hash: ChunkHash([7; 32]),
            compressed: false,
        },
        ChunkEntry::Zero,
        ChunkEntry::Stored {
            hash: ChunkHash([9; 32]),
            compressed: true,
        },
    ];
    Index::new(4096 * 2 + 100, 4096, entries, vec![2, 0]).unwrap()
}

#[test]
fn round_trip_unsigned_and_signed() {
    let idx = sample();
    let bytes = idx.encode(None);
    assert_eq!(
        bytes.len(),
        HEADER_LEN + 3 * ENTRY_LEN + 2 * 4 + TRAILER_LEN
    );
    let p = Index::parse(&bytes, Trust::Unverified).unwrap();
    assert_eq!(p.index, idx);
    assert_eq!(p.signer, None);
    assert_eq!(
        Index::parse(&bytes, Trust::AnyOf(&[])).unwrap_err(),
        IndexError::Unsigned
    );

    let key = SigningKey::from_bytes(&[42; 32]);
    let bytes = idx.encode(Some(&key));
    let vk = key.verifying_key();
    let p = Index::parse(&bytes, Trust::Key(&vk)).unwrap();
    assert!(p.verified);
    assert_eq!(p.index, idx);
    assert_eq!(p.hash, index_hash(&bytes));
    assert_eq!(idx.chunk_len(2), 100);
    assert_eq!(idx.chunk_len(3), 0);
}

#[test]
fn every_single_byte_flip_is_rejected_when_signed() {
    let key = SigningKey::from_bytes(&[1; 32]);
    let vk = key.verifying_key();
    let bytes = sample().encode(Some(&key));
    for i in 0..bytes.len() {
        for bit in [0x01u8, 0x80] {
            let mut b = bytes.clone();
            b[i] ^= bit;
            assert!(Index::parse(&b, Trust::Key(&vk)).is_err(), "byte {i}");
        }
    }
    for cut in 0..bytes.len() {
        assert!(Index::parse(&bytes[..cut], Trust::Unverified).is_err());
    }
}

#[test]
fn hostile_header_sizes_do_not_allocate() {
    let mut b = sample().encode(None);
    // A huge image with a consistent chunk count: must be refused by length, not by
    // trying to allocate the table.
    b[16..24].copy_from_slice(&(u64::MAX).to_le_bytes());
    let chunks = u64::MAX.div_ceil(4096);
    b[24..32].copy_from_slice(&chunks.to_le_bytes());
    assert!(matches!(
        Index::parse(&b, Trust::Unverified),
        Err(IndexError::TooManyChunks { .. })
    ));
    let mut b = sample().encode(None);
    b[16..24].copy_from_slice(&(u64::from(u32::MAX) * 4096).to_le_bytes());
    b[24..32].copy_from_slice(&u64::from(u32::MAX).to_le_bytes());
    assert!(matches!(
        Index::parse(&b, Trust::Unverified),
        Err(IndexError::Truncated { .. })
    ));
}

#[test]
fn version_2_carries_the_identity_and_version_1_still_parses() {
    let id = ImageIdentity {
        name: "img".into(),
        version: 3,
        created: 10,
        expires: Some(20),
    };
    let key = SigningKey::from_bytes(&[5; 32]);
    let vk = key.verifying_key();
    let v2 = sample().with_identity(id.clone()).unwrap();
    let bytes = v2.encode(Some(&key));
    assert_eq!(bytes[8], 2);
    assert_eq!(
        bytes.len(),
        HEADER_LEN + IDENTITY_LEN + 3 * ENTRY_LEN + 2 * 4 + TRAILER_LEN
    );
    let p = Index::parse(&bytes, Trust::Key(&vk)).unwrap();
    assert_eq!(p.index.identity(), Some(&id));
    assert_eq!(p.index, v2);
    // The identity is signed: changing the version breaks the signature.
    let mut b = bytes.clone();
    b[HEADER_LEN] ^= 1;
    assert!(matches!(
        Index::parse(&b, Trust::Key(&vk)),
        Err(IndexError::BadSignature(_))
    ));
    // A version-2 header without room for its identity block is truncated.
    let v1 = sample().encode(Some(&key));
    let mut relabeled = v1.clone();
    relabeled[8] = 2;
    assert!(matches!(
        Index::parse(&relabeled, Trust::Unverified),
        Err(IndexError::Truncated { .. })
    ));
    let p1 = Index::parse(&v1, Trust::Key(&vk)).unwrap();
    assert_eq!(p1.index.identity(), None);
    assert!(sample()
        .with_identity(ImageIdentity { version: 0, ..id })
        .is_err());
}
