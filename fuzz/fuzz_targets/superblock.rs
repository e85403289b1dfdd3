//! Superblock decoding: any 4 KiB block is either refused with an error or decodes to a
//! superblock whose layout addresses stay inside the disk and that round-trips through
//! `encode`. Blocks are checked under a fixed host key (`FUZZ_HOST_KEY`), as read and
//! with MAC and CRC made right, so every field behind the MAC is reached; the format-v1
//! reader (adoption) is fed the same bytes with the CRC made right.
#![no_main]

use boot_relocator::format::{Superblock, BLOCK};
use libfuzzer_sys::fuzz_target;
use streamboot_fuzz::{fix_block_crc, FUZZ_HOST_KEY};

fuzz_target!(|data: &[u8]| {
    let key = boot_relocator::HostKey::from_bytes(FUZZ_HOST_KEY);
    // As read from the disk: refused at the magic, the checksum or the MAC.
    if let Ok(sb) = Superblock::decode(data, Some(&key)) {
        check(&sb, &key);
    }
    let mut b = vec![0u8; BLOCK];
    let n = data.len().min(BLOCK);
    b[..n].copy_from_slice(&data[..n]);
    let mut legacy = b.clone();
    fix_block_crc(&mut legacy, 12);
    if let Ok(sb) = Superblock::decode_legacy_v1(&legacy) {
        assert!(sb.layout.validate().is_ok());
    }
    Superblock::seal_block(&mut b, &key);
    if let Ok(sb) = Superblock::decode(&b, Some(&key)) {
        check(&sb, &key);
    }
});

fn check(sb: &Superblock, key: &boot_relocator::HostKey) {
    let l = &sb.layout;
    assert!(sb.release.validate(l).is_ok());
    // Every address the metadata store computes for this layout fits in the disk, in
    // order: map pages, then slots (up to the area's end), then the two superblock copies.
    let sb0 = boot_relocator::Layout::sb_addr(l.disk_len, 0);
    assert_eq!(
        boot_relocator::Layout::sb_addr(l.disk_len, 1),
        sb0 + BLOCK as u64
    );
    assert!(l.map_pages > 0);
    let last_page_end = l.page_addr(l.map_pages - 1, 1) + BLOCK as u64;
    assert!(l.map_offset >= l.area_offset && last_page_end <= l.slot_offset);
    if l.slot_count > 0 {
        let last = u32::try_from(l.slot_count - 1).expect("slot count fits u32");
        assert!(l.slot_addr(last) + l.chunk_size() <= sb.release.end(l.disk_len));
        assert!(sb.release.end(l.disk_len) <= sb0);
    }
    let c = l.chunk_count() - 1;
    assert!(l.target_len(c) > 0 && l.target_len(c) as u64 <= l.chunk_size());
    assert!(l.source_len(c) as u64 <= l.chunk_size());
    // Round trip: what decodes re-encodes to a block that decodes to the same value.
    let again =
        Superblock::decode(&sb.encode(key), Some(key)).expect("re-encoded superblock decodes");
    assert_eq!(&again, sb);
}
