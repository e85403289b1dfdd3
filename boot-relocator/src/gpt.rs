//! `commit --relocate-backup-gpt`: after a commit on a device larger than the target, the
//! target's backup GPT (header and entries) sits at the end of the target image; this
//! moves it to the end of the device, as `sgdisk -e` does: the backup entries and header
//! at the device's end, the last usable LBA extended up to them (both headers), the
//! protective MBR covering the device, the primary header naming the new backup. The
//! partitions themselves do not change. 512-byte sectors only.
//!
//! Crash-safe: the new backup (entries, then header) is written and synced before the
//! primary header names it; until then the primary still names the old, intact backup.

use crate::error::{IoContext, RelocError, Result};
use crate::storage::Storage;

const SECTOR: u64 = 512;

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// CRC32 (IEEE) of a GPT header of `size` bytes with its CRC field zero.
fn header_crc(h: &[u8], size: usize) -> u32 {
    let mut c = h[..size].to_vec();
    c[16..20].fill(0);
    crc32(&c)
}

/// CRC32 (IEEE 802.3), as GPT uses.
fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

/// Where the backup GPT went: `(old header LBA, new header LBA)`; `None` when there was
/// nothing to move (no GPT, or its backup already at the device's end).
pub fn relocate_backup(storage: &dyn Storage) -> Result<Option<(u64, u64)>> {
    let bad = |m: String| RelocError::Invalid(format!("--relocate-backup-gpt: {m}"));
    let len = storage.len().ctx(|| "reading disk size".into())?;
    let mut hdr = vec![0u8; SECTOR as usize];
    storage
        .read_at(SECTOR, &mut hdr)
        .ctx(|| "reading the GPT header".into())?;
    if &hdr[0..8] != b"EFI PART" {
        return Ok(None);
    }
    let size = u32_at(&hdr, 12) as usize;
    if !(92..=SECTOR as usize).contains(&size) || header_crc(&hdr, size) != u32_at(&hdr, 16) {
        return Err(bad("the primary GPT header fails its checksum".into()));
    }
    let (old_alt, entries_lba) = (u64_at(&hdr, 32), u64_at(&hdr, 72));
    let (count, esize) = (u32_at(&hdr, 80) as u64, u32_at(&hdr, 84) as u64);
    if !(128..=4096).contains(&esize) || count == 0 || count > 16384 {
        return Err(bad("unsupported GPT entry geometry".into()));
    }
    let entries_at = entries_lba
        .checked_mul(SECTOR)
        .filter(|&a| a < len)
        .ok_or_else(|| bad(format!("GPT entries at LBA {entries_lba}, past the device")))?;
    let mut entries = vec![0u8; (count * esize) as usize];
    storage
        .read_at(entries_at, &mut entries)
        .ctx(|| "reading the GPT entries".into())?;
    if crc32(&entries) != u32_at(&hdr, 88) {
        return Err(bad("the GPT entries fail their checksum".into()));
    }
    let new_alt = len / SECTOR - 1;
    if old_alt == new_alt {
        return Ok(None);
    }
    let entry_sectors = (entries.len() as u64).div_ceil(SECTOR);
    let last_usable = u64_at(&hdr, 48);
    if old_alt > new_alt || last_usable.saturating_add(entry_sectors) >= new_alt {
        return Err(bad(format!(
            "the GPT's backup header is at LBA {old_alt}, the device ends at LBA {new_alt}"
        )));
    }
    // Both headers: the usable range now runs up to the new backup entries.
    put_u64(&mut hdr, 48, new_alt - entry_sectors - 1);
    // The new backup: entries right before its header.
    let mut backup = hdr.clone();
    put_u64(&mut backup, 24, new_alt);
    put_u64(&mut backup, 32, 1);
    put_u64(&mut backup, 72, new_alt - entry_sectors);
    let crc = header_crc(&backup, size);
    put_u32(&mut backup, 16, crc);
    storage
        .write_at((new_alt - entry_sectors) * SECTOR, &entries)
        .ctx(|| "writing the backup GPT entries".into())?;
    storage
        .write_at(new_alt * SECTOR, &backup)
        .ctx(|| "writing the backup GPT header".into())?;
    storage.sync().ctx(|| "syncing".into())?;
    // Then the protective MBR covers the device and the primary names the new backup.
    let mut mbr = vec![0u8; SECTOR as usize];
    storage
        .read_at(0, &mut mbr)
        .ctx(|| "reading the protective MBR".into())?;
    if let Some(i) = (0..4).find(|&i| mbr[446 + 16 * i + 4] == 0xEE) {
        let sectors = (len / SECTOR - 1).min(u32::MAX as u64) as u32;
        put_u32(&mut mbr, 446 + 16 * i + 12, sectors);
        storage
            .write_at(0, &mbr)
            .ctx(|| "writing the protective MBR".into())?;
    }
    put_u64(&mut hdr, 32, new_alt);
    let crc = header_crc(&hdr, size);
    put_u32(&mut hdr, 16, crc);
    storage
        .write_at(SECTOR, &hdr)
        .ctx(|| "writing the primary GPT header".into())?;
    storage.sync().ctx(|| "syncing".into())?;
    Ok(Some((old_alt, new_alt)))
}

#[cfg(test)]
mod tests {
    use super::crc32;

    #[test]
    fn crc32_is_ieee() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }
}
