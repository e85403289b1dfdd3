//! Chunk-store index parsing under every trust mode: an index is refused with an error or
//! parses to a value that keeps the format's invariants and re-encodes to the very same
//! bytes; a signature is accepted only from a trusted key, and a structurally valid
//! index re-signed by the trusted key always verifies.
#![no_main]

use ed25519_dalek::Signer;
use libfuzzer_sys::fuzz_target;
use streamboot::store::index::{Index, Trust, TRAILER_LEN};
use streamboot::store::sign::{key_id, KEY_ID_LEN};
use streamboot_fuzz::{other_key, trusted_key};

fuzz_target!(|data: &[u8]| {
    let key = trusted_key();
    let vk = key.verifying_key();
    let both = [other_key().verifying_key(), vk];

    let unverified = Index::parse(data, Trust::Unverified);
    let keyed = Index::parse(data, Trust::Key(&vk));
    let any = Index::parse(data, Trust::AnyOf(&both));
    let Ok(p) = unverified else {
        assert!(
            keyed.is_err() && any.is_err(),
            "structure refused but signature accepted"
        );
        return;
    };
    let index = &p.index;
    check_invariants(index);
    assert!(!p.verified);

    match p.signer {
        None => {
            // Unsigned: no trust mode that needs a signature accepts it, and the encoding
            // is canonical.
            assert!(keyed.is_err() && any.is_err());
            assert_eq!(index.encode(None), data);
        }
        Some(id) => {
            let trusted = id == key_id(&vk);
            if let Ok(k) = &keyed {
                assert!(trusted && k.verified && k.signer == Some(id));
                assert_eq!(&k.index, index);
                // Ed25519 signatures are deterministic: re-signing reproduces the file.
                assert_eq!(index.encode(Some(&key)), data);
            }
            if let Ok(a) = &any {
                assert!(a.verified && a.signer == Some(id));
            }
            assert_eq!(keyed.is_ok() && trusted, any.is_ok() && trusted);
            // The same structure signed by the trusted key must verify.
            let mut resigned = data.to_vec();
            let at = resigned.len() - TRAILER_LEN;
            resigned[at..at + KEY_ID_LEN].copy_from_slice(&key_id(&vk).0);
            let sig = key.sign(&resigned[..at + KEY_ID_LEN]);
            resigned[at + KEY_ID_LEN..].copy_from_slice(&sig.to_bytes());
            let k = Index::parse(&resigned, Trust::Key(&vk)).expect("re-signed index verifies");
            assert!(k.verified);
            assert_eq!(&k.index, index);
        }
    }
    // Unsigned re-encoding parses back to the same content.
    let plain = index.encode(None);
    let back = Index::parse(&plain, Trust::Unverified).expect("re-encoded index parses");
    assert_eq!(&back.index, index);
});

fn check_invariants(index: &Index) {
    let shift = index.chunk_shift();
    assert!((12..=22).contains(&shift));
    assert_eq!(
        index.chunk_count(),
        index.image_size().div_ceil(1u64 << shift)
    );
    let mut seen = std::collections::HashSet::new();
    for &c in index.boot_profile() {
        assert!(u64::from(c) < index.chunk_count());
        assert!(seen.insert(c), "chunk {c} twice in the boot profile");
    }
    let n = index.chunk_count();
    if n > 0 {
        let last = n - 1;
        assert!(index.chunk_len(last) > 0);
        assert_eq!(
            index.chunk_offset(last) + index.chunk_len(last),
            index.image_size()
        );
    }
    assert_eq!(index.chunk_len(n), 0);
}
