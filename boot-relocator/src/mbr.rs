//! MBR parsing: the four primary entries and the chain of extended boot records (EBRs)
//! that describes the logical partitions inside an extended partition.
//!
//! An EBR is one sector with the MBR's layout: a data entry (the logical partition, its
//! start relative to the EBR) and a link entry (the next EBR, its start relative to the
//! extended partition's start). The chain is bounded ([`MAX_LOGICALS`]); a loop, an EBR
//! without its 0x55AA signature, or an EBR or logical partition outside the extended
//! partition is refused: nothing tells which bytes such a table really uses.

use std::collections::HashSet;

use crate::error::{IoContext, RelocError, Result};
use crate::partition::UsedRange;

/// At most this many logical partitions (EBRs) are followed.
pub const MAX_LOGICALS: usize = 128;

/// One non-empty primary entry, in bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Primary {
    /// 1-based entry number.
    pub index: usize,
    pub ty: u8,
    pub start: u64,
    pub end: u64,
}

/// True for the extended partition types (CHS, LBA, Linux).
pub(crate) fn is_extended(ty: u8) -> bool {
    matches!(ty, 0x05 | 0x0F | 0x85)
}

fn u32_at(b: &[u8], at: usize) -> u64 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes")) as u64
}

/// The non-empty entries of the MBR in `sector` (its first 512 bytes), `ss` bytes per
/// sector: every entry with a length, type 0x00 included (Linux and sfdisk count such an
/// entry as a partition, so its bytes are not free space); `None` when it is no MBR: no 0x55AA signature, or a boot indicator other than
/// 0x00/0x80 (boot code of a file system's boot sector, random data), as Linux checks.
pub(crate) fn primaries(sector: &[u8], ss: u64) -> Option<Vec<Primary>> {
    if sector.len() < 512 || sector[510] != 0x55 || sector[511] != 0xAA {
        return None;
    }
    let entries = (0..4).map(|i| &sector[446 + 16 * i..446 + 16 * (i + 1)]);
    if entries.clone().any(|e| e[0] != 0 && e[0] != 0x80) {
        return None;
    }
    Some(
        entries
            .enumerate()
            .filter(|(_, e)| u32_at(e, 12) != 0)
            .map(|(i, e)| Primary {
                index: i + 1,
                ty: e[4],
                start: u32_at(e, 8) * ss,
                end: (u32_at(e, 8) + u32_at(e, 12)) * ss,
            })
            .collect(),
    )
}

/// The ranges the logical partitions of extended partition `ext` use: each EBR's sector
/// and each logical partition (numbered from `first` on, as Linux numbers them). Free
/// space between them stays free. `read` reads the disk.
pub(crate) fn logicals(
    ext: &Primary,
    ss: u64,
    first: usize,
    read: &mut dyn FnMut(u64, &mut [u8]) -> std::io::Result<()>,
) -> Result<Vec<UsedRange>> {
    let bad = |m: String| {
        RelocError::PartitionTable(format!(
            "the extended partition (MBR partition {}, bytes {}..{}) {m}",
            ext.index, ext.start, ext.end
        ))
    };
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut ebr_at = Some(ext.start);
    let mut sector = vec![0u8; 512];
    while let Some(at) = ebr_at.take() {
        if seen.len() == MAX_LOGICALS {
            return Err(bad(format!(
                "has more than {MAX_LOGICALS} extended boot records"
            )));
        }
        if !seen.insert(at) {
            return Err(bad(format!(
                "has an extended boot record chain that loops (back to byte {at})"
            )));
        }
        if at < ext.start || at + ss > ext.end {
            return Err(bad(format!(
                "links to an extended boot record at byte {at}, outside it"
            )));
        }
        read(at, &mut sector).ctx(|| format!("reading the extended boot record at byte {at}"))?;
        let signed = sector[510] == 0x55 && sector[511] == 0xAA;
        if !signed && at == ext.start {
            // No first EBR: an extended partition without logical partitions (or one
            // this parser cannot read): it counts as used whole, as before.
            return Ok(vec![UsedRange {
                start: ext.start,
                end: ext.end,
                what: format!("MBR partition {} (type {:#04x})", ext.index, ext.ty),
                boot: false,
            }]);
        }
        if !signed {
            return Err(bad(format!(
                "has an extended boot record without its 0x55AA signature at byte {at}"
            )));
        }
        out.push(UsedRange {
            start: at,
            end: at + ss,
            what: format!("extended boot record at byte {at}"),
            boot: false,
        });
        for i in 0..4 {
            let e = &sector[446 + 16 * i..446 + 16 * (i + 1)];
            let (ty, rel, len) = (e[4], u32_at(e, 8) * ss, u32_at(e, 12) * ss);
            // A type 0x00 entry with a length is a logical partition to Linux too.
            if len == 0 {
                continue;
            }
            if is_extended(ty) {
                if ebr_at.is_none() {
                    ebr_at = Some(ext.start + rel);
                }
                continue;
            }
            let n = first + seen.len() - 1;
            let (start, end) = (at + rel, at + rel + len);
            if start <= at || end > ext.end {
                return Err(bad(format!(
                    "holds logical partition {n} at bytes {start}..{end}, outside it"
                )));
            }
            out.push(UsedRange {
                start,
                end,
                what: format!("MBR logical partition {n} (type {ty:#04x})"),
                boot: ty == 0xEF,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(b: &mut [u8], i: usize, ty: u8, start: u32, len: u32) {
        let e = &mut b[446 + 16 * i..];
        e[4] = ty;
        e[8..12].copy_from_slice(&start.to_le_bytes());
        e[12..16].copy_from_slice(&len.to_le_bytes());
        b[510] = 0x55;
        b[511] = 0xAA;
    }

    /// A disk image of `sectors` with an extended partition at sector 100 (len 1000).
    fn disk(ebrs: &[(u32, (u32, u32), Option<u32>)]) -> (Vec<u8>, Primary) {
        let mut d = vec![0u8; 1200 * 512];
        for &(at, (rel, len), next) in ebrs {
            let s = &mut d[at as usize * 512..(at as usize + 1) * 512];
            entry(s, 0, 0x83, rel, len);
            if let Some(n) = next {
                entry(s, 1, 0x05, n, 10);
            }
        }
        let ext = Primary {
            index: 2,
            ty: 5,
            start: 100 * 512,
            end: 1100 * 512,
        };
        (d, ext)
    }

    fn run(d: &[u8], ext: &Primary) -> Result<Vec<UsedRange>> {
        logicals(ext, 512, 5, &mut |off, buf| {
            buf.copy_from_slice(&d[off as usize..off as usize + buf.len()]);
            Ok(())
        })
    }

    #[test]
    fn chain_gives_ebrs_and_logicals_and_leaves_gaps_free() {
        let (d, ext) = disk(&[(100, (2, 100), Some(500)), (600, (2, 100), None)]);
        let r = run(&d, &ext).unwrap();
        let spans: Vec<_> = r.iter().map(|u| (u.start / 512, u.end / 512)).collect();
        assert_eq!(spans, [(100, 101), (102, 202), (600, 601), (602, 702)]);
        assert_eq!(r[3].what, "MBR logical partition 6 (type 0x83)");
    }

    #[test]
    fn a_logical_entry_of_type_zero_with_a_length_is_used() {
        let (mut d, ext) = disk(&[(100, (2, 100), None)]);
        d[100 * 512 + 446 + 4] = 0;
        let r = run(&d, &ext).unwrap();
        let spans: Vec<_> = r.iter().map(|u| (u.start / 512, u.end / 512)).collect();
        assert_eq!(spans, [(100, 101), (102, 202)]);
    }

    #[test]
    fn loops_outside_links_and_missing_signatures_are_refused() {
        let (d, ext) = disk(&[(100, (2, 100), Some(500)), (600, (2, 100), Some(0))]);
        let e = run(&d, &ext).unwrap_err().to_string();
        assert!(e.contains("loops"), "{e}");
        let (d, ext) = disk(&[(100, (2, 100), Some(1050))]);
        let e = run(&d, &ext).unwrap_err().to_string();
        assert!(e.contains("outside it"), "{e}");
        let (d, ext) = disk(&[(100, (2, 2000), None)]);
        let e = run(&d, &ext).unwrap_err().to_string();
        assert!(e.contains("logical partition 5"), "{e}");
        let (d, ext) = disk(&[(100, (2, 100), Some(300))]);
        let e = run(&d, &ext).unwrap_err().to_string();
        assert!(e.contains("0x55AA"), "{e}");
        // No first EBR: the extended partition is used whole.
        let (d, ext) = disk(&[]);
        let r = run(&d, &ext).unwrap();
        assert_eq!((r.len(), r[0].start, r[0].end), (1, ext.start, ext.end));
    }

    #[test]
    fn a_long_chain_is_bounded() {
        let mut chain: Vec<_> = (0..130u32)
            .map(|i| (100 + 7 * i, (1, 5), Some(7 * (i + 1))))
            .collect();
        chain.last_mut().unwrap().2 = None;
        let (d, ext) = disk(&chain);
        let e = run(&d, &ext).unwrap_err().to_string();
        assert!(e.contains("more than 128"), "{e}");
    }

    #[test]
    fn boot_code_is_not_an_mbr() {
        let mut s = vec![0u8; 512];
        entry(&mut s, 0, 0x83, 2048, 100);
        assert_eq!(primaries(&s, 512).unwrap().len(), 1);
        s[446 + 16] = 0x33;
        assert!(primaries(&s, 512).is_none());
    }
}
