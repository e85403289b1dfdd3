//! Unit tests of the on-disk encoding.

use super::*;

fn layout() -> Layout {
    Layout {
        chunk_shift: 16,
        disk_len: 1 << 30,
        source_size: 100 << 20,
        target_size: (120 << 20) + 5,
        area_offset: 121 << 20,
        map_offset: 121 << 20,
        map_pages: ((120u64 << 20) + 5)
            .div_ceil(1 << 16)
            .div_ceil(ENTRIES_PER_PAGE as u64),
        slot_offset: 122 << 20,
        slot_count: 1000,
    }
}

fn sb() -> Superblock {
    Superblock {
        generation: 7,
        uuid: [9; 16],
        state: State::Trial,
        phase: PreparePhase::MapReady,
        start_counter: 2,
        max_trial_starts: 3,
        layout: layout(),
        target: TargetRecord {
            kind: "http".into(),
            validator: "\"abc-123\"".into(),
            urls: vec!["http://127.0.0.1:1/a.img".into(), "http://m/b".into()],
        },
        created_unix: 1_700_000_000,
        seeded_bytes: 5 << 20,
        release: Default::default(),
    }
}

fn key() -> HostKey {
    HostKey::from_bytes([5; 32])
}

#[test]
fn superblock_round_trips() {
    let s = sb();
    assert_eq!(
        Superblock::decode(&s.encode(&key()), Some(&key())).unwrap(),
        s
    );
}

#[test]
fn superblock_rejects_every_single_bit_flip() {
    let b = sb().encode(&key());
    for byte in (0..BLOCK).step_by(7) {
        let mut c = b.clone();
        c[byte] ^= 0x10;
        assert!(
            Superblock::decode(&c, Some(&key())).is_err(),
            "flip at {byte} accepted"
        );
    }
}

#[test]
fn superblock_without_magic_is_not_damaged() {
    assert_eq!(
        Superblock::decode(&[0u8; BLOCK], Some(&key())),
        Err(SbDecodeError::NoMagic)
    );
}

/// A guest can write any bytes with a valid CRC; without the host key its block is
/// never ours, whatever version it claims.
#[test]
fn forged_superblocks_do_not_verify() {
    let other = HostKey::from_bytes([6; 32]);
    let forged = sb().encode(&other);
    assert_eq!(
        Superblock::decode(&forged, Some(&key())),
        Err(SbDecodeError::Unverified)
    );
    assert_eq!(
        Superblock::decode(&sb().encode(&key()), None),
        Err(SbDecodeError::Unverified)
    );
    let legacy = sb().encode_legacy_v1();
    assert_eq!(
        Superblock::decode(&legacy, Some(&key())),
        Err(SbDecodeError::Legacy)
    );
    assert_eq!(Superblock::decode_legacy_v1(&legacy).unwrap(), sb());
}

#[test]
fn magic_less_body_verifies_only_with_the_key() {
    let mut b = sb().encode(&key());
    b[0..8].fill(0);
    assert_eq!(
        Superblock::decode_body_without_magic(&b, &key()),
        Some(sb())
    );
    let other = HostKey::from_bytes([6; 32]);
    assert_eq!(Superblock::decode_body_without_magic(&b, &other), None);
}

#[test]
fn page_round_trips_and_checks_identity() {
    let entries: Vec<Entry> = (0..ENTRIES_PER_PAGE as u32)
        .map(|i| Entry {
            loc: match i % 4 {
                0 => Location::Missing,
                1 => Location::Zero,
                2 => Location::Home,
                _ => Location::Slot(i),
            },
            dirty: i % 3 == 0 && i % 4 >= 2,
            saved: (i % 5 == 0).then_some(i + 1),
            boot: i % 7 == 0,
        })
        .collect();
    let p = encode_page(3, 42, &[1; 16], &entries);
    let d = decode_page(&p, 3, &[1; 16], entries.len(), 1000).unwrap();
    assert_eq!(d.generation, 42);
    assert_eq!(d.entries, entries);
    assert!(decode_page(&p, 4, &[1; 16], entries.len(), 1000).is_err());
    assert!(decode_page(&p, 3, &[2; 16], entries.len(), 1000).is_err());
    assert!(decode_page(&p, 3, &[1; 16], entries.len(), 10).is_err());
    let mut torn = p.clone();
    torn[2000] ^= 1;
    assert!(decode_page(&torn, 3, &[1; 16], entries.len(), 1000).is_err());
}

/// A page (checksum intact) whose entry count is past the page's capacity, with a
/// caller expecting that count: an error, not a slice past the end of the block.
#[test]
fn page_with_more_entries_than_fit_is_refused() {
    let n = ENTRIES_PER_PAGE + 1;
    let mut p = encode_page(0, 1, &[1; 16], &[]);
    p[40..44].copy_from_slice(&(n as u32).to_le_bytes());
    let crc = block_crc(&p, 4);
    p[4..8].copy_from_slice(&crc.to_le_bytes());
    assert!(decode_page(&p, 0, &[1; 16], n, 1000).is_err());
}
