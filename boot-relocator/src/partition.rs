//! Just enough MBR/GPT parsing to know which byte ranges of a disk are in use, and which
//! partition holds the kernel (EFI system partition, XBOOTLDR, MBR type 0xEF).

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

fn u32_at(b: &[u8], at: usize) -> u64 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes")) as u64
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Parses the partition table found in `head` (the first bytes of a disk: at least
/// 1 MiB is plenty for any GPT with 128 entries and 4 KiB sectors) and returns the
/// ranges in use. An absent table gives an empty list; GPT entries beyond `head` are
/// read through `read_more`.
pub fn used_ranges(
    head: &[u8],
    read_more: &mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>,
) -> std::io::Result<Vec<UsedRange>> {
    let mut out = Vec::new();
    if head.len() < 512 || head[510] != 0x55 || head[511] != 0xAA {
        return Ok(out);
    }
    let mut protective = false;
    for i in 0..4 {
        let e = &head[446 + 16 * i..446 + 16 * (i + 1)];
        let ty = e[4];
        let start = u32_at(e, 8) * 512;
        let len = u32_at(e, 12) * 512;
        if ty == 0 || len == 0 {
            continue;
        }
        if ty == 0xEE {
            protective = true;
            continue;
        }
        out.push(UsedRange {
            start,
            end: start + len,
            what: format!("MBR partition {} (type {ty:#04x})", i + 1),
            boot: ty == 0xEF,
        });
    }
    if !protective {
        return Ok(out);
    }
    for ss in [512u64, 4096] {
        let mut hdr = vec![0u8; 512];
        read_slice(head, ss, &mut hdr, read_more)?;
        if &hdr[0..8] != b"EFI PART" {
            continue;
        }
        let alt_lba = u64_at(&hdr, 32);
        let entries_lba = u64_at(&hdr, 72);
        let count = u32_at(&hdr, 80).min(4096);
        let esize = u32_at(&hdr, 84);
        if !(128..=4096).contains(&esize) {
            continue;
        }
        let mut table = vec![0u8; (count * esize) as usize];
        read_slice(head, entries_lba * ss, &mut table, read_more)?;
        out.push(UsedRange {
            start: 0,
            end: (entries_lba * ss + table.len() as u64).div_ceil(ss) * ss,
            what: "GPT header and entries".into(),
            boot: false,
        });
        for (i, e) in table.chunks_exact(esize as usize).enumerate() {
            if e[0..16].iter().all(|&b| b == 0) {
                continue;
            }
            let first = u64_at(e, 32);
            let last = u64_at(e, 40);
            if last < first {
                continue;
            }
            out.push(UsedRange {
                start: first * ss,
                end: (last + 1) * ss,
                what: format!("GPT partition {}", i + 1),
                boot: e[0..16] == ESP || e[0..16] == XBOOTLDR,
            });
        }
        if alt_lba > 0 {
            // The backup entries sit right before the backup header.
            let tbl_sectors = table.len() as u64 / ss;
            out.push(UsedRange {
                start: alt_lba.saturating_sub(tbl_sectors) * ss,
                end: (alt_lba + 1) * ss,
                what: "backup GPT".into(),
                boot: false,
            });
        }
        break;
    }
    Ok(out)
}

fn read_slice(
    head: &[u8],
    offset: u64,
    out: &mut [u8],
    read_more: &mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let end = offset as usize + out.len();
    if end <= head.len() {
        out.copy_from_slice(&head[offset as usize..end]);
        Ok(())
    } else {
        read_more(offset, out)
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

    fn no_more(_: u64, _: &mut [u8]) -> std::io::Result<()> {
        Err(std::io::Error::other("unexpected read"))
    }

    #[test]
    fn mbr_partitions_are_used_ranges() {
        let b = mbr(&[(0x83, 2048, 4096), (0xEF, 8192, 100)]);
        let r = used_ranges(&b, &mut no_more).unwrap();
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
    fn no_signature_means_no_table() {
        assert!(used_ranges(&vec![0u8; 4096], &mut no_more)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn gpt_partitions_and_backup_are_used() {
        let mut b = mbr(&[(0xEE, 1, 0xFFFF_FFFF)]);
        let h = &mut b[512..];
        h[0..8].copy_from_slice(b"EFI PART");
        h[32..40].copy_from_slice(&(20479u64).to_le_bytes());
        h[72..80].copy_from_slice(&2u64.to_le_bytes());
        h[80..84].copy_from_slice(&128u32.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        let e = &mut b[1024..1024 + 128];
        e[0..16].copy_from_slice(&ESP);
        e[32..40].copy_from_slice(&2048u64.to_le_bytes());
        e[40..48].copy_from_slice(&4095u64.to_le_bytes());
        let r = used_ranges(&b, &mut no_more).unwrap();
        let esp = r.iter().find(|u| u.boot).unwrap();
        assert_eq!((esp.start, esp.end), (2048 * 512, 4096 * 512));
        let backup = r.iter().find(|u| u.what == "backup GPT").unwrap();
        assert_eq!(backup.end, 20480 * 512);
        assert_eq!(backup.start, (20479 - 32) * 512);
    }
}
