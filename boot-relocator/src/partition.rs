//! Just enough MBR/GPT parsing (`mbr`, `gpt` for the details) to know which byte ranges of a disk are in use, and which
//! partition holds the kernel (EFI system partition, XBOOTLDR, MBR type 0xEF).

use crate::error::{IoContext, RelocError, Result};
use crate::gpt;
use crate::mbr;
use crate::storage::Storage;

/// A byte range the partition table says is in use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsedRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// What lives there, for error messages.
    pub what: String,
    /// True for a partition that holds boot files (ESP, XBOOTLDR, MBR 0xEF).
    pub boot: bool,
}

const ESP: [u8; 16] = guid_bytes(
    0xC12A7328,
    0xF81F,
    0x11D2,
    [0xBA, 0x4B, 0x00, 0xA0, 0xC9, 0x3E, 0xC9, 0x3B],
);
const XBOOTLDR: [u8; 16] = guid_bytes(
    0xBC13C2FF,
    0x59E6,
    0x4262,
    [0xA3, 0x52, 0xB2, 0x75, 0xFD, 0x77, 0x9F, 0x17],
);

/// A GUID in its on-disk (mixed-endian) byte order.
const fn guid_bytes(a: u32, b: u16, c: u16, d: [u8; 8]) -> [u8; 16] {
    let a = a.to_le_bytes();
    let b = b.to_le_bytes();
    let c = c.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6],
        d[7],
    ]
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Reads bytes of a disk: `(offset, buf)`.
pub type Read<'a> = &'a mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>;

/// The source's partition table as far as placing the area goes.
#[derive(Clone, Debug, Default)]
pub struct SourceTable {
    /// The ranges in use.
    pub used: Vec<UsedRange>,
    /// Warnings for the operator (a damaged primary GPT), also logged at warn level.
    pub warnings: Vec<String>,
}

/// The ranges the source's partition table on `storage` says are in use; `head` is the
/// disk's first bytes (at least 1 MiB, or all of a smaller disk). An absent table gives
/// an empty list. Logical partitions of an MBR are found through the EBR chain; a GPT
/// is checked (header and entries CRC32): a damaged primary with a valid backup gives
/// the backup's view (with a warning), both damaged is refused.
pub fn source_ranges(storage: &dyn Storage, head: &[u8]) -> Result<SourceTable> {
    let dev_len = storage.len().ctx(|| "reading disk size".into())?;
    let hint = storage
        .logical_sector_size()
        .ctx(|| "reading the device's sector size".into())?;
    let mut warnings = Vec::new();
    let used = ranges(
        head,
        dev_len,
        hint,
        &mut |off, buf| storage.read_at(off, buf),
        Some(&mut warnings),
    )?;
    for w in &warnings {
        tracing::warn!("{w}");
    }
    Ok(SourceTable { used, warnings })
}

/// The ranges the target's partition table in `head` (its first MiB, or all of a smaller
/// image) uses, as far as `head` shows them; an extended partition counts whole, with
/// the logical partitions whose EBRs `head` holds. Anything unreadable gives what was
/// read so far (nothing for a damaged GPT): this is a sanity check, not a source view.
pub fn target_ranges(head: &[u8]) -> Vec<UsedRange> {
    let len = head.len() as u64;
    let mut read = |off: u64, buf: &mut [u8]| {
        read_slice(head, off, buf, &mut |_, _| {
            Err(std::io::Error::other("past the target's first MiB"))
        })
    };
    ranges(head, len, None, &mut read, None).unwrap_or_default()
}

/// Refuses a target whose partition table (`target_ranges`) reaches past the target
/// image or the device.
pub fn check_target_fits(parts: &[UsedRange], target_size: u64, dev_len: u64) -> Result<()> {
    match parts
        .iter()
        .find(|p| p.end > target_size || p.end > dev_len)
    {
        Some(p) => Err(RelocError::Overlap(format!(
            "the target's {} ends at byte {}, past the target image ({target_size} bytes) or \
             the device ({dev_len} bytes): its partition table does not fit",
            p.what, p.end
        ))),
        None => Ok(()),
    }
}

/// `warnings`: `Some` for the source (strict: a broken EBR chain or GPT is an error,
/// a GPT's backup view comes with a warning); `None` for the target (lenient).
fn ranges(
    head: &[u8],
    dev_len: u64,
    hint: Option<u64>,
    read_more: Read,
    mut warnings: Option<&mut Vec<String>>,
) -> Result<Vec<UsedRange>> {
    let target = warnings.is_none();
    let mut out = Vec::new();
    let Some(primaries) = mbr::primaries(head, hint.unwrap_or(512)) else {
        return Ok(out);
    };
    let mut read = |off: u64, buf: &mut [u8]| read_slice(head, off, buf, read_more);
    let mut protective = false;
    for p in primaries {
        let what = format!("MBR partition {} (type {:#04x})", p.index, p.ty);
        if p.ty == 0xEE {
            protective = true;
        } else if mbr::is_extended(p.ty) && target {
            out.extend(mbr::logicals(&p, hint.unwrap_or(512), 5, &mut read).unwrap_or_default());
            out.push(UsedRange {
                start: p.start,
                end: p.end,
                what,
                boot: false,
            });
        } else if mbr::is_extended(p.ty) {
            out.extend(mbr::logicals(&p, hint.unwrap_or(512), 5, &mut read)?);
        } else {
            out.push(UsedRange {
                start: p.start,
                end: p.end,
                what,
                boot: p.ty == 0xEF,
            });
        }
    }
    if protective {
        let mut w = Vec::new();
        out.extend(gpt_ranges(&mut read, hint, dev_len, &mut w, !target)?);
        if let Some(warnings) = warnings.as_mut() {
            warnings.extend(w);
        }
        // A hybrid MBR next to a GPT of another sector size than the device's (a
        // 512-byte image on a 4 KiB device) counts in the GPT's sectors as well.
        let ss = hint.unwrap_or(512);
        if let Some(gss) = gpt::sector_size(&mut read, hint)?.filter(|&g| g != ss) {
            out.extend(hybrid_ranges(head, gss));
        }
    }
    Ok(out)
}

/// The entries of a hybrid MBR other than the protective one, in sectors of `ss` bytes
/// (an extended partition whole).
fn hybrid_ranges(head: &[u8], ss: u64) -> Vec<UsedRange> {
    let primaries = mbr::primaries(head, ss).unwrap_or_default();
    primaries
        .into_iter()
        .filter(|p| p.ty != 0xEE)
        .map(|p| UsedRange {
            start: p.start,
            end: p.end,
            what: format!("MBR partition {} (type {:#04x})", p.index, p.ty),
            boot: p.ty == 0xEF,
        })
        .collect()
}

/// The ranges a GPT uses, from its primary copy, or from its backup (the header at the
/// device's last LBA, or where the primary says) when the primary fails its checks.
/// `strict` (the source): an entry that ends before it starts is refused; else skipped.
fn gpt_ranges(
    read: Read,
    hint: Option<u64>,
    dev_len: u64,
    warnings: &mut Vec<String>,
    strict: bool,
) -> Result<Vec<UsedRange>> {
    let sizes: Vec<u64> = match gpt::sector_size(read, hint)? {
        Some(ss) => vec![ss],
        None => hint.map_or(vec![512, 4096], |h| vec![h]),
    };
    let mut why = Vec::new();
    for ss in sizes {
        let primary = match gpt::read_checked(read, 1, ss, dev_len)? {
            Ok(g) => {
                // The backup the primary names, when it reads as valid: its entries may
                // lie anywhere, not only right before it (an I/O error: not counted).
                let alt = gpt::read_checked(read, g.alt_lba, ss, dev_len).ok();
                return gpt_view(&g, false, alt.and_then(|r| r.ok()).as_ref(), strict);
            }
            Err(w) => w,
        };
        let mut hdr = vec![0u8; ss as usize];
        read(ss, &mut hdr).ctx(|| "reading the GPT header".into())?;
        let mut tried = vec![(dev_len / ss).saturating_sub(1)];
        if &hdr[0..8] == b"EFI PART" && u64_at(&hdr, 32) != tried[0] {
            tried.push(u64_at(&hdr, 32));
        }
        let mut backup = Vec::new();
        for lba in tried {
            match gpt::read_checked(read, lba, ss, dev_len)? {
                Ok(g) => {
                    warnings.push(format!(
                        "the primary GPT is damaged ({primary}): using the backup GPT at \
                         LBA {lba} ({ss}-byte sectors)"
                    ));
                    return gpt_view(&g, true, None, strict);
                }
                Err(w) => backup.push(format!("the backup at LBA {lba}: {w}")),
            }
        }
        why.push(format!(
            "with {ss}-byte sectors, the primary GPT at LBA 1: {primary}; {}",
            backup.join("; ")
        ));
    }
    Err(RelocError::PartitionTable(format!(
        "a protective MBR but no valid GPT: {} (repair it with gdisk or sgdisk first)",
        why.join("; ")
    )))
}

/// The used ranges of a checked GPT copy `g` (`backup`: the copy at the disk's end;
/// `alt`: for a primary, the valid backup header it names, if any). An
/// entry that ends before it starts is refused when `strict`: Linux keeps such a
/// partition (up to the device's end), so nothing tells which bytes it really uses.
fn gpt_view(
    g: &gpt::Gpt,
    backup: bool,
    alt: Option<&gpt::Gpt>,
    strict: bool,
) -> Result<Vec<UsedRange>> {
    let ss = g.ss;
    // The primary copy: the protective MBR, the header and its entries (at LBA 2 when
    // the backup is all there is to go by), up to the first usable LBA.
    let entries_lba = if backup { 2 } else { g.entries_lba };
    let head_end = (entries_lba + g.entry_sectors())
        .max(g.first_usable)
        .saturating_mul(ss);
    let mut out = vec![UsedRange {
        start: 0,
        end: head_end,
        what: "GPT header and entries".into(),
        boot: false,
    }];
    for (i, e) in g.entries.chunks_exact(g.esize as usize).enumerate() {
        if e[0..16].iter().all(|&b| b == 0) {
            continue;
        }
        let (first, last) = (u64_at(e, 32), u64_at(e, 40));
        if last < first {
            if !strict {
                continue;
            }
            return Err(RelocError::PartitionTable(format!(
                "GPT partition {} ends before it starts (first LBA {first}, last LBA {last}; \
                 repair it with gdisk or sgdisk first)",
                i + 1
            )));
        }
        out.push(UsedRange {
            start: first.saturating_mul(ss),
            end: last.saturating_add(1).saturating_mul(ss),
            what: format!("GPT partition {}", i + 1),
            boot: e[0..16] == ESP || e[0..16] == XBOOTLDR,
        });
    }
    // The backup copy: from the backup itself, its header and entries where it says;
    // from the primary, the entries right before the header it names, and where that
    // header (when valid) says they are.
    if backup {
        out.push(copy_range(g));
    } else {
        if g.alt_lba > 0 {
            let header = g.alt_lba;
            out.push(UsedRange {
                start: header.saturating_sub(g.entry_sectors()).saturating_mul(ss),
                end: header.saturating_add(1).saturating_mul(ss),
                what: "backup GPT".into(),
                boot: false,
            });
        }
        if let Some(r) = alt.map(copy_range).filter(|r| !out.contains(r)) {
            out.push(r);
        }
    }
    Ok(out)
}

/// The bytes a checked GPT copy's header and entry array take (either order; both lie
/// inside the disk, `read_checked` made sure).
fn copy_range(g: &gpt::Gpt) -> UsedRange {
    UsedRange {
        start: g.entries_lba.min(g.my_lba) * g.ss,
        end: (g.entries_lba + g.entry_sectors()).max(g.my_lba + 1) * g.ss,
        what: "backup GPT".into(),
        boot: false,
    }
}

fn read_slice(head: &[u8], offset: u64, out: &mut [u8], read_more: Read) -> std::io::Result<()> {
    match (offset as usize).checked_add(out.len()) {
        Some(end) if end <= head.len() => {
            out.copy_from_slice(&head[offset as usize..end]);
            Ok(())
        }
        _ => read_more(offset, out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mbr(parts: &[(u8, u32, u32)]) -> Vec<u8> {
        let mut b = vec![0u8; 1 << 20];
        for (i, &(ty, start, len)) in parts.iter().enumerate() {
            let e = &mut b[446 + 16 * i..];
            e[4] = ty;
            e[8..12].copy_from_slice(&start.to_le_bytes());
            e[12..16].copy_from_slice(&len.to_le_bytes());
        }
        b[510] = 0x55;
        b[511] = 0xAA;
        b
    }

    fn used_ranges(b: &[u8]) -> Result<Vec<UsedRange>> {
        let mut no_more = |_: u64, _: &mut [u8]| -> std::io::Result<()> {
            Err(std::io::Error::other("unexpected read"))
        };
        ranges(b, b.len() as u64, None, &mut no_more, Some(&mut Vec::new()))
    }

    #[test]
    fn mbr_partitions_are_used_ranges() {
        let b = mbr(&[(0x83, 2048, 4096), (0xEF, 8192, 100)]);
        let r = used_ranges(&b).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(
            (r[0].start, r[0].end, r[0].boot),
            (2048 * 512, 6144 * 512, false)
        );
        assert_eq!(
            (r[1].start, r[1].end, r[1].boot),
            (8192 * 512, 8292 * 512, true)
        );
    }

    #[test]
    fn an_mbr_entry_of_type_zero_with_a_length_is_used() {
        let r = used_ranges(&mbr(&[(0x83, 2048, 10), (0x00, 4096, 100)])).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!((r[1].start, r[1].end), (4096 * 512, 4196 * 512));
        assert_eq!(r[1].what, "MBR partition 2 (type 0x00)");
    }

    #[test]
    fn a_gpt_entry_that_ends_before_it_starts_is_refused() {
        let mut b = gpt_disk(512);
        let n = b.len();
        for (h, e) in [(512, 1024), (n - 512, n - 512 - 16384)] {
            b[e + 40..e + 48].copy_from_slice(&1000u64.to_le_bytes());
            let crc = crc32fast::hash(&b[e..e + 16384]);
            b[h + 88..h + 92].copy_from_slice(&crc.to_le_bytes());
            b[h + 16..h + 20].fill(0);
            let crc = crc32fast::hash(&b[h..h + 92]);
            b[h + 16..h + 20].copy_from_slice(&crc.to_le_bytes());
        }
        let e = used_ranges(&b).unwrap_err().to_string();
        assert!(
            e.contains("GPT partition 1 ends before it starts (first LBA 1024, last LBA 1000"),
            "{e}"
        );
        // A target's table is a sanity check: the entry is skipped, the rest still counts.
        let r = target_ranges(&b);
        assert!(r.iter().any(|u| u.what == "backup GPT"), "{r:?}");
        assert!(!r.iter().any(|u| u.what == "GPT partition 1"), "{r:?}");
    }

    #[test]
    fn no_signature_means_no_table() {
        assert!(used_ranges(&vec![0u8; 4096]).unwrap().is_empty());
    }

    /// A 1 MiB disk image: protective MBR, a GPT (ESP at 1024..1535) at `ss`-byte
    /// sectors, backup at the last LBA; CRCs right.
    fn gpt_disk(ss: usize) -> Vec<u8> {
        let mut b = mbr(&[(0xEE, 1, 0xFFFF_FFFF)]);
        let last = (b.len() / ss - 1) as u64;
        let mut entries = vec![0u8; 128 * 128];
        entries[0..16].copy_from_slice(&ESP);
        entries[32..40].copy_from_slice(&1024u64.to_le_bytes());
        entries[40..48].copy_from_slice(&1535u64.to_le_bytes());
        let esec = (entries.len() / ss) as u64;
        for (lba, alt, elba) in [(1, last, 2), (last, 1, last - esec)] {
            let mut h = vec![0u8; 92];
            h[0..8].copy_from_slice(b"EFI PART");
            h[12..16].copy_from_slice(&92u32.to_le_bytes());
            h[24..32].copy_from_slice(&lba.to_le_bytes());
            h[32..40].copy_from_slice(&alt.to_le_bytes());
            h[40..48].copy_from_slice(&(2 + esec).to_le_bytes());
            h[48..56].copy_from_slice(&(last - esec - 1).to_le_bytes());
            h[72..80].copy_from_slice(&elba.to_le_bytes());
            h[80..84].copy_from_slice(&128u32.to_le_bytes());
            h[84..88].copy_from_slice(&128u32.to_le_bytes());
            h[88..92].copy_from_slice(&crc32fast::hash(&entries).to_le_bytes());
            let crc = crc32fast::hash(&h);
            h[16..20].copy_from_slice(&crc.to_le_bytes());
            let at = lba as usize * ss;
            b[at..at + 92].copy_from_slice(&h);
            let at = elba as usize * ss;
            b[at..at + entries.len()].copy_from_slice(&entries);
        }
        b
    }

    #[test]
    fn gpt_partitions_and_backup_are_used_at_both_sector_sizes() {
        for ss in [512u64, 4096] {
            let b = gpt_disk(ss as usize);
            let r = used_ranges(&b).unwrap();
            let esp = r.iter().find(|u| u.boot).unwrap();
            assert_eq!((esp.start, esp.end), (1024 * ss, 1536 * ss));
            let backup = r.iter().find(|u| u.what == "backup GPT").unwrap();
            assert_eq!(backup.end, b.len() as u64);
            assert_eq!(backup.start, b.len() as u64 - ss - 16384);
        }
    }

    #[test]
    fn a_damaged_primary_gives_the_backups_view_and_both_damaged_are_refused() {
        let mut b = gpt_disk(512);
        let want = used_ranges(&b).unwrap();
        // One byte of the primary's ESP entry: its CRC fails, the backup is used.
        b[1024 + 40] ^= 1;
        assert_eq!(used_ranges(&b).unwrap(), want);
        // Its header too.
        b[512 + 56] ^= 1;
        assert_eq!(used_ranges(&b).unwrap(), want);
        // And the backup's header: refused, naming both.
        let n = b.len();
        b[n - 512 + 56] ^= 1;
        let e = used_ranges(&b).unwrap_err().to_string();
        assert!(
            e.contains("primary GPT at LBA 1: the header fails its CRC32")
                && e.contains("the backup at LBA 2047: the header fails its CRC32"),
            "{e}"
        );
    }

    #[test]
    fn target_tables_are_checked_whole() {
        let b = mbr(&[(0x83, 2048, 4096), (0x05, 8192, 100_000)]);
        let r = target_ranges(&b);
        assert!(check_target_fits(&r, 8192 * 512 + 100_000 * 512, u64::MAX).is_ok());
        let e = check_target_fits(&r, 50 << 20, u64::MAX)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("MBR partition 2 (type 0x05) ends at byte 55394304"),
            "{e}"
        );
    }
}
