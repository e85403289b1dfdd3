//! The GPT: reading and checking a header and its entry array (CRC32, both copies), and
//! `commit --relocate-backup-gpt`: after a commit on a device larger than the target, the
//! target's backup GPT (header and entries) sits at the end of the target image; this
//! moves it to the end of the device, as `sgdisk -e` does: the backup entries and header
//! at the device's end, the last usable LBA extended up to them (both headers), the
//! protective MBR covering the device, the primary header naming the new backup. The
//! partitions themselves do not change. Sectors of 512 or 4096 bytes: the size is the
//! device's logical sector size when it has one, else where the "EFI PART" signature is.
//!
//! Crash-safe: the new backup (entries, then header) is written and synced before the
//! primary header names it; until then the primary still names the old, intact backup.

use crate::error::{IoContext, RelocError, Result};
use crate::storage::Storage;

/// Largest entry array read (a GPT's is 16 KiB; 4096 entries of 1 KiB at most).
const MAX_ENTRIES_BYTES: u64 = 4 << 20;

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

/// A GPT header that passed its checks, with its entry array.
#[derive(Clone, Debug)]
pub(crate) struct Gpt {
    /// The header sector (`ss` bytes).
    pub raw: Vec<u8>,
    /// Bytes per sector.
    pub ss: u64,
    /// Where this header is (LBA).
    pub my_lba: u64,
    /// Where the other copy's header is (LBA).
    pub alt_lba: u64,
    pub first_usable: u64,
    pub last_usable: u64,
    /// Where this copy's entry array starts (LBA).
    pub entries_lba: u64,
    /// Size of one entry.
    pub esize: u64,
    /// The entry array (count × esize bytes), its CRC checked.
    pub entries: Vec<u8>,
}

impl Gpt {
    /// Sectors the entry array takes.
    pub fn entry_sectors(&self) -> u64 {
        (self.entries.len() as u64).div_ceil(self.ss)
    }
    fn size(&self) -> usize {
        u32_at(&self.raw, 12) as usize
    }
}

/// Reads the GPT header at `lba` (sectors of `ss` bytes) of a disk of `dev_len` bytes
/// and its entries. `Ok(Err(why))` when they are not a valid GPT (signature, size,
/// header CRC32, entry geometry, entries CRC32); `Err` only for an I/O error.
pub(crate) fn read_checked(
    read: &mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>,
    lba: u64,
    ss: u64,
    dev_len: u64,
) -> Result<std::result::Result<Gpt, String>> {
    if lba.saturating_add(1).saturating_mul(ss) > dev_len || lba == 0 {
        return Ok(Err(format!("LBA {lba} is outside the disk")));
    }
    let mut raw = vec![0u8; ss as usize];
    read(lba * ss, &mut raw).ctx(|| format!("reading the GPT header at LBA {lba}"))?;
    if &raw[0..8] != b"EFI PART" {
        return Ok(Err("no \"EFI PART\" signature".into()));
    }
    let size = u32_at(&raw, 12) as usize;
    if !(92..=ss as usize).contains(&size) || header_crc(&raw, size) != u32_at(&raw, 16) {
        return Ok(Err("the header fails its CRC32".into()));
    }
    if u64_at(&raw, 24) != lba {
        return Ok(Err(format!(
            "the header says it is at LBA {}",
            u64_at(&raw, 24)
        )));
    }
    let (count, esize) = (u32_at(&raw, 80) as u64, u32_at(&raw, 84) as u64);
    let entries_lba = u64_at(&raw, 72);
    if !(128..=4096).contains(&esize) || count == 0 || count * esize > MAX_ENTRIES_BYTES {
        return Ok(Err(format!(
            "unsupported entry geometry ({count} entries of {esize} bytes)"
        )));
    }
    let end = entries_lba
        .checked_mul(ss)
        .and_then(|a| a.checked_add(count * esize));
    if entries_lba == 0 || end.is_none_or(|e| e > dev_len) {
        return Ok(Err(format!(
            "its entries at LBA {entries_lba} lie outside the disk"
        )));
    }
    let mut entries = vec![0u8; (count * esize) as usize];
    read(entries_lba * ss, &mut entries)
        .ctx(|| format!("reading the GPT entries at LBA {entries_lba}"))?;
    if crc32(&entries) != u32_at(&raw, 88) {
        return Ok(Err("the entry array fails its CRC32".into()));
    }
    Ok(Ok(Gpt {
        my_lba: lba,
        alt_lba: u64_at(&raw, 32),
        first_usable: u64_at(&raw, 40),
        last_usable: u64_at(&raw, 48),
        raw,
        ss,
        entries_lba,
        esize,
        entries,
    }))
}

/// The sector size of a GPT disk: `hint` (the device's logical sector size) when the
/// signature is there, else 512 or 4096, whichever sector 1 carries "EFI PART" at; `None`
/// when neither does.
pub(crate) fn sector_size(
    read: &mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>,
    hint: Option<u64>,
) -> Result<Option<u64>> {
    let mut sig = [0u8; 8];
    for ss in hint.into_iter().chain([512, 4096]) {
        read(ss, &mut sig).ctx(|| "reading the GPT header".into())?;
        if &sig == b"EFI PART" {
            return Ok(Some(ss));
        }
    }
    Ok(None)
}

/// Where the backup GPT went: `(old header LBA, new header LBA)`; `None` when there was
/// nothing to move (no GPT, or its backup already at the device's end).
pub fn relocate_backup(storage: &dyn Storage) -> Result<Option<(u64, u64)>> {
    let bad = |m: String| RelocError::Invalid(format!("--relocate-backup-gpt: {m}"));
    let len = storage.len().ctx(|| "reading disk size".into())?;
    let hint = storage
        .logical_sector_size()
        .ctx(|| "reading the device's sector size".into())?;
    let read = &mut |off: u64, buf: &mut [u8]| storage.read_at(off, buf);
    let Some(ss) = sector_size(read, hint)? else {
        return Ok(None);
    };
    let mut g = read_checked(read, 1, ss, len)?
        .map_err(|why| bad(format!("the primary GPT is not valid: {why}")))?;
    let (old_alt, new_alt) = (g.alt_lba, len / ss - 1);
    if old_alt == new_alt {
        return Ok(None);
    }
    let entry_sectors = g.entry_sectors();
    if old_alt > new_alt {
        return Err(bad(format!(
            "the GPT's backup header is at LBA {old_alt}, the device ends at LBA {new_alt}"
        )));
    }
    if g.last_usable.saturating_add(entry_sectors) >= new_alt {
        return Err(bad(format!(
            "the GPT's last usable LBA {} leaves no room for its {entry_sectors} sectors of \
             backup entries before the device's last LBA {new_alt}",
            g.last_usable
        )));
    }
    let size = g.size();
    // Both headers: the usable range now runs up to the new backup entries.
    put_u64(&mut g.raw, 48, new_alt - entry_sectors - 1);
    // The new backup: entries right before its header.
    let mut backup = g.raw.clone();
    put_u64(&mut backup, 24, new_alt);
    put_u64(&mut backup, 32, 1);
    put_u64(&mut backup, 72, new_alt - entry_sectors);
    let crc = header_crc(&backup, size);
    put_u32(&mut backup, 16, crc);
    storage
        .write_at((new_alt - entry_sectors) * ss, &g.entries)
        .ctx(|| "writing the backup GPT entries".into())?;
    storage
        .write_at(new_alt * ss, &backup)
        .ctx(|| "writing the backup GPT header".into())?;
    storage.sync().ctx(|| "syncing".into())?;
    // Then the protective MBR covers the device and the primary names the new backup.
    let mut mbr = vec![0u8; ss as usize];
    storage
        .read_at(0, &mut mbr)
        .ctx(|| "reading the protective MBR".into())?;
    if let Some(i) = (0..4).find(|&i| mbr[446 + 16 * i + 4] == 0xEE) {
        let sectors = (len / ss - 1).min(u32::MAX as u64) as u32;
        put_u32(&mut mbr, 446 + 16 * i + 12, sectors);
        storage
            .write_at(0, &mbr)
            .ctx(|| "writing the protective MBR".into())?;
    }
    put_u64(&mut g.raw, 32, new_alt);
    let crc = header_crc(&g.raw, size);
    put_u32(&mut g.raw, 16, crc);
    storage
        .write_at(ss, &g.raw)
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
