//! The index header and identity block (format version 2: image name, version, creation
//! and expiry time), which a reader trusts for mix-and-match and rollback decisions.
//!
//! The first 200 bytes of the input are taken as header + identity block; the rest of the
//! file is completed to the length the header declares (zero chunks, profile 0..p, a
//! trailer), so nearly every input reaches the identity decoder. The completed file is
//! parsed unsigned, then signed by the trusted key. Asserts: parsing never panics; an
//! accepted identity is valid (store-safe name, version ≥ 1, expiry after creation) and
//! the file re-encodes to the same bytes; a signature verifies exactly when the structure
//! is valid, and then yields the same identity; the identity checks refuse another name,
//! a version below the floor and a time at or after the expiry, and accept the rest.
#![no_main]

use libfuzzer_sys::fuzz_target;
use streamboot::store::identity::{IdentityError, IDENTITY_LEN};
use streamboot::store::index::{Index, Trust, HEADER_LEN, TRAILER_LEN};
use streamboot::store::layout::validate_name;
use streamboot_fuzz::trusted_key;

const HEAD: usize = HEADER_LEN + IDENTITY_LEN;
/// Completed files stay small: at most this many chunks.
const MAX_CHUNKS: u64 = 256;

fuzz_target!(|data: &[u8]| {
    // As given: any bytes.
    let _ = Index::parse(data, Trust::Unverified);
    if data.len() < HEAD {
        return;
    }
    let mut head = data[..HEAD].to_vec();
    // Keep the count consistent with the size so the fuzzer spends its time on the
    // identity; a few inputs still carry their own count (bit 0 of the last byte).
    let shift = head[12];
    let size = u64::from_le_bytes(head[16..24].try_into().unwrap()) % (MAX_CHUNKS << 12);
    if data[HEAD - 1] & 1 == 0 && (12..=22).contains(&shift) {
        head[16..24].copy_from_slice(&size.to_le_bytes());
        head[24..32].copy_from_slice(&size.div_ceil(1 << shift).to_le_bytes());
    }
    let chunks = u64::from_le_bytes(head[24..32].try_into().unwrap());
    let profile = u64::from(u32::from_le_bytes(head[32..36].try_into().unwrap()));
    if chunks > MAX_CHUNKS || profile > chunks {
        let _ = Index::parse(&head, Trust::Unverified);
        return;
    }
    let mut file = head;
    for _ in 0..chunks {
        file.extend_from_slice(&[0u8; 32]);
        file.push(1); // ZERO
    }
    for p in 0..profile as u32 {
        file.extend_from_slice(&p.to_le_bytes());
    }
    file.extend_from_slice(&[0u8; TRAILER_LEN]);
    // Unsigned form: the header flags say unsigned.
    let mut unsigned = file.clone();
    unsigned[10] &= !1;
    let plain = Index::parse(&unsigned, Trust::Unverified);
    if let Ok(p) = &plain {
        assert_eq!(p.index.encode(None), unsigned, "canonical encoding");
        if let Some(id) = p.index.identity() {
            check_identity(id);
        }
    }
    // Signed by the trusted key: verifies exactly when the structure is valid.
    let key = trusted_key();
    let vk = key.verifying_key();
    let signed_file = match &plain {
        Ok(p) => p.index.encode(Some(&key)),
        Err(_) => {
            // Sign the raw bytes anyway: a valid signature must not rescue bad structure.
            use ed25519_dalek::Signer;
            let mut f = unsigned.clone();
            f[10] |= 1;
            let at = f.len() - TRAILER_LEN;
            let id = streamboot::store::sign::key_id(&vk);
            f[at..at + 16].copy_from_slice(&id.0);
            let sig = key.sign(&f[..at + 16]);
            f[at + 16..].copy_from_slice(&sig.to_bytes());
            f
        }
    };
    let signed = Index::parse(&signed_file, Trust::Key(&vk));
    match (&plain, &signed) {
        (Ok(p), Ok(s)) => {
            assert!(s.verified);
            assert_eq!(p.index, s.index);
        }
        (Err(_), Err(_)) => {}
        (p, s) => panic!("unsigned {:?} but signed {:?}", p.is_ok(), s.is_ok()),
    }
});

fn check_identity(id: &streamboot::store::ImageIdentity) {
    assert!(validate_name(&id.name).is_ok(), "name {:?}", id.name);
    assert!(id.version >= 1);
    if let Some(e) = id.expires {
        assert!(e > id.created);
    }
    let live = id.expires.map_or(u64::MAX, |e| e - 1);
    assert!(id.check(&id.name, id.version, live).is_ok());
    assert!(id.check(&id.name, 0, id.created).is_ok());
    let other = format!("{}x", &id.name[..id.name.len().min(100)]);
    assert!(matches!(
        id.check(&other, 0, id.created),
        Err(IdentityError::WrongName { .. })
    ));
    if let Some(floor) = id.version.checked_add(1) {
        assert!(matches!(
            id.check(&id.name, floor, id.created),
            Err(IdentityError::Rollback { .. })
        ));
    }
    if let Some(e) = id.expires {
        assert!(matches!(
            id.check(&id.name, 0, e),
            Err(IdentityError::Expired { .. })
        ));
    }
}
