//! Map pages and their entries (see `docs/format.md`, "Map pages").

use super::{
    block_crc, get_u32, get_u64, put_u32, put_u64, BLOCK, ENTRIES_PER_PAGE, ENTRY_SIZE,
    PAGE_HEADER, PAGE_MAGIC,
};

/// What the target image's chunk `c` currently is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Location {
    /// Not local: fetch from the remote source.
    Missing,
    /// Known to be all zeros; nothing stored.
    Zero,
    /// At its home address on the disk.
    Home,
    /// In slot `n` of the released area.
    Slot(u32),
}

/// One map entry: where target chunk `c` is, and where the source chunk saved from its
/// home address is (for boot chunks that were relocated).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Entry {
    /// Where the target chunk lives.
    pub loc: Location,
    /// The chunk holds guest writes (never evicted; only in a slot or home).
    pub dirty: bool,
    /// Slot holding the source chunk saved from this chunk's home address.
    pub saved: Option<u32>,
    /// The chunk belongs to the boot set relocated by `prepare`.
    pub boot: bool,
}

impl Entry {
    /// A chunk nobody has touched.
    pub const MISSING: Entry = Entry {
        loc: Location::Missing,
        dirty: false,
        saved: None,
        boot: false,
    };

    fn encode(&self, b: &mut [u8]) {
        b.fill(0);
        let (kind, slot) = match self.loc {
            Location::Missing => (0, 0),
            Location::Zero => (1, 0),
            Location::Home => (2, 0),
            Location::Slot(s) => (3, s),
        };
        b[0] = kind;
        b[1] = (self.dirty as u8) | ((self.saved.is_some() as u8) << 1) | ((self.boot as u8) << 2);
        put_u32(b, 4, slot);
        put_u32(b, 8, self.saved.unwrap_or(0));
    }

    fn decode(b: &[u8], slot_count: u64) -> Result<Self, String> {
        let slot = get_u32(b, 4);
        let loc = match b[0] {
            0 => Location::Missing,
            1 => Location::Zero,
            2 => Location::Home,
            3 => Location::Slot(slot),
            k => return Err(format!("unknown entry kind {k}")),
        };
        if b[1] & !7 != 0 || b[2..4] != [0, 0] || b[12..16] != [0; 4] {
            return Err("reserved entry bits set".into());
        }
        let saved = (b[1] & 2 != 0).then(|| get_u32(b, 8));
        for s in [matches!(loc, Location::Slot(_)).then_some(slot), saved]
            .into_iter()
            .flatten()
        {
            if s as u64 >= slot_count {
                return Err(format!("slot {s} out of range"));
            }
        }
        Ok(Entry {
            loc,
            dirty: b[1] & 1 != 0,
            saved,
            boot: b[1] & 4 != 0,
        })
    }
}

/// Encodes map page `index` with `entries` (at most [`ENTRIES_PER_PAGE`]; the rest of the
/// page is zero).
pub fn encode_page(index: u64, generation: u64, uuid: &[u8; 16], entries: &[Entry]) -> Vec<u8> {
    assert!(entries.len() <= ENTRIES_PER_PAGE);
    let mut b = vec![0u8; BLOCK];
    b[0..4].copy_from_slice(&PAGE_MAGIC);
    put_u64(&mut b, 8, generation);
    put_u64(&mut b, 16, index);
    b[24..40].copy_from_slice(uuid);
    put_u32(&mut b, 40, entries.len() as u32);
    for (i, e) in entries.iter().enumerate() {
        let at = PAGE_HEADER + i * ENTRY_SIZE;
        e.encode(&mut b[at..at + ENTRY_SIZE]);
    }
    let crc = block_crc(&b, 4);
    put_u32(&mut b, 4, crc);
    b
}

/// A decoded, verified map page.
#[derive(Debug)]
pub struct DecodedPage {
    /// Generation of this copy.
    pub generation: u64,
    /// Entries in order.
    pub entries: Vec<Entry>,
}

/// Decodes a map page copy, checking magic, CRC, page index, UUID and entry count.
pub fn decode_page(
    b: &[u8],
    index: u64,
    uuid: &[u8; 16],
    expected_entries: usize,
    slot_count: u64,
) -> Result<DecodedPage, String> {
    if b.len() != BLOCK || b[0..4] != PAGE_MAGIC {
        return Err("no page magic".into());
    }
    if get_u32(b, 4) != block_crc(b, 4) {
        return Err("checksum mismatch".into());
    }
    if get_u64(b, 16) != index || b[24..40] != uuid[..] {
        return Err("page of another index or migration".into());
    }
    if get_u32(b, 40) as usize != expected_entries {
        return Err("entry count mismatch".into());
    }
    if expected_entries > ENTRIES_PER_PAGE {
        return Err(format!("{expected_entries} entries do not fit in a page"));
    }
    let entries = (0..expected_entries)
        .map(|i| {
            let at = PAGE_HEADER + i * ENTRY_SIZE;
            Entry::decode(&b[at..at + ENTRY_SIZE], slot_count)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(DecodedPage {
        generation: get_u64(b, 8),
        entries,
    })
}
