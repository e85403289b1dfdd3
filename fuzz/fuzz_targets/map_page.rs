//! Map page decoding with fuzzed page bytes and fuzzed expectations (index, UUID, entry
//! count, slot count): refused with an error or decoded to entries that reference only
//! existing slots and round-trip through `encode_page`.
#![no_main]

use boot_relocator::format::{decode_page, encode_page, Location, BLOCK};
use libfuzzer_sys::fuzz_target;
use streamboot_fuzz::fix_block_crc;

/// Input: `entries: u16 LE`, `slot_count: u64 LE`, `mode: u8`, then the page bytes.
const PARAMS: usize = 11;

fuzz_target!(|data: &[u8]| {
    if data.len() < PARAMS {
        return;
    }
    let expected = u16::from_le_bytes([data[0], data[1]]) as usize;
    let slot_count = u64::from_le_bytes(data[2..10].try_into().unwrap());
    let mode = data[10];
    let page = &data[PARAMS..];
    let mut b = vec![0u8; BLOCK];
    let n = page.len().min(BLOCK);
    b[..n].copy_from_slice(&page[..n]);
    // Expect the index and UUID the page claims (mode bit 0) or fixed ones.
    let (index, uuid) = if mode & 1 != 0 {
        (
            u64::from_le_bytes(b[16..24].try_into().unwrap()),
            b[24..40].try_into().unwrap(),
        )
    } else {
        (3, [1u8; 16])
    };
    check(page, index, &uuid, expected, slot_count);
    if mode & 2 != 0 {
        fix_block_crc(&mut b, 4);
    }
    check(&b, index, &uuid, expected, slot_count);
});

fn check(b: &[u8], index: u64, uuid: &[u8; 16], expected: usize, slot_count: u64) {
    let Ok(page) = decode_page(b, index, uuid, expected, slot_count) else {
        return;
    };
    assert_eq!(page.entries.len(), expected);
    for e in &page.entries {
        if let Location::Slot(s) = e.loc {
            assert!(u64::from(s) < slot_count);
        }
        if let Some(s) = e.saved {
            assert!(u64::from(s) < slot_count);
        }
    }
    let re = encode_page(index, page.generation, uuid, &page.entries);
    let again = decode_page(&re, index, uuid, expected, slot_count).expect("re-encoded page");
    assert_eq!(again.generation, page.generation);
    assert_eq!(again.entries, page.entries);
}
